//! The standard's Part B mapping: a feature becomes one gRPC service in package
//! `sila2.<originator>.<category>.<identifier lower case>.v<major>`, named after the feature,
//! with messages `<Command>_Parameters`, `<Command>_Responses`,
//! `<Command>_IntermediateResponses`, `Get_<Property>_Parameters`/`_Responses`, …; every value
//! is wrapped in a framework type (`sila2.org.silastandard.Real`).
//!
//! Built as descriptors at run time rather than compiled from `.proto` files: ppud generates
//! its features from the family schemas, and the `sila2` driver learns a server's features
//! only when it connects.

use prost_reflect::DescriptorPool;
use prost_types::field_descriptor_proto::{Label, Type};
use prost_types::{
    DescriptorProto, FieldDescriptorProto, FileDescriptorProto, MethodDescriptorProto,
    ServiceDescriptorProto,
};

use crate::fdl::{Basic, DataType, Element, Feature};
use crate::framework;

/// Why a feature has no descriptor (an FDL that references an unknown data type, two members
/// with one identifier).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("feature {feature}: {reason}")]
pub struct DescriptorError {
    pub feature: String,
    pub reason: String,
}

/// `sila2.org.silastandard.core.silaservice.v1`.
pub fn package(feature: &Feature) -> String {
    format!(
        "sila2.{}.{}.{}.v{}",
        feature.originator,
        feature.category,
        feature.identifier.to_lowercase(),
        feature.major_version()
    )
}

/// The gRPC service's full name, `<package>.<Identifier>`.
pub fn service_name(feature: &Feature) -> String {
    format!("{}.{}", package(feature), feature.identifier)
}

/// The gRPC method names Part B gives a feature's members.
pub mod rpc {
    /// `Get_<Property>` (unobservable) .
    pub fn get_property(property: &str) -> String {
        format!("Get_{property}")
    }
    /// `Subscribe_<Property>` (observable).
    pub fn subscribe_property(property: &str) -> String {
        format!("Subscribe_{property}")
    }
    /// `<Command>_Info` (observable commands).
    pub fn info(command: &str) -> String {
        format!("{command}_Info")
    }
    /// `<Command>_Intermediate` (observable commands with intermediate responses).
    pub fn intermediate(command: &str) -> String {
        format!("{command}_Intermediate")
    }
    /// `<Command>_Result` (observable commands).
    pub fn result(command: &str) -> String {
        format!("{command}_Result")
    }
    /// `Get_FCPAffectedByMetadata_<Metadata>`.
    pub fn affected_by_metadata(metadata: &str) -> String {
        format!("Get_FCPAffectedByMetadata_{metadata}")
    }
}

/// The gRPC header that carries a metadata value: `sila-` and the metadata's fully qualified
/// identifier in lower case with `/` as `-`, ending `-bin`; the value is the serialized
/// `Metadata_<Identifier>` message.
pub fn metadata_header(feature: &Feature, metadata: &str) -> String {
    format!(
        "sila-{}-metadata-{}-bin",
        feature.fully_qualified_identifier().replace('/', "-"),
        metadata
    )
    .to_lowercase()
}

/// The full name of one of the feature's messages (`<package>.<local>`), e.g.
/// `message_name(f, "LockServer_Parameters")`.
pub fn message_name(feature: &Feature, local: &str) -> String {
    format!("{}.{}", package(feature), local)
}

/// The name of the feature's file inside a pool: its package as a path, then
/// `<Identifier>.proto`, so features with one identifier from two originators do not collide.
pub fn file_name(feature: &Feature) -> String {
    format!(
        "{}/{}.proto",
        package(feature).replace('.', "/"),
        feature.identifier
    )
}

/// The feature's `.proto` file as a descriptor (it imports the framework file).
///
/// Follows the standard's mapping as the reference XSLT (`fdl2proto.xsl`) writes it: one
/// field per element, named by its identifier and numbered from 1 in FDL order; a basic type
/// is the framework message of that name; a list is a repeated field; a data type identifier
/// is the message `DataType_<Identifier>`; a structure is a message `<Element>_Struct` nested
/// in the message that holds the element (also when it is the item of a list).
pub fn file_descriptor(feature: &Feature) -> Result<FileDescriptorProto, DescriptorError> {
    let builder = Builder {
        feature,
        package: package(feature),
    };
    builder.check_unique()?;
    let mut messages = Vec::new();
    let mut methods = Vec::new();
    let framework = |name: &str| format!(".{}.{name}", framework::PACKAGE);
    let local = |name: &str| format!(".{}.{name}", builder.package);

    for t in &feature.data_types {
        let name = format!("DataType_{}", t.identifier);
        messages.push(builder.message(&name, &[(&t.identifier, &t.data_type)])?);
    }
    for c in &feature.commands {
        let parameters = format!("{}_Parameters", c.identifier);
        let responses = format!("{}_Responses", c.identifier);
        messages.push(builder.message(&parameters, &elements(&c.parameters))?);
        messages.push(builder.message(&responses, &elements(&c.responses))?);
        if c.observable {
            methods.push(method(
                &c.identifier,
                &local(&parameters),
                &framework("CommandConfirmation"),
                false,
            ));
            methods.push(method(
                &rpc::info(&c.identifier),
                &framework("CommandExecutionUUID"),
                &framework("ExecutionInfo"),
                true,
            ));
            if !c.intermediate_responses.is_empty() {
                let intermediate = format!("{}_IntermediateResponses", c.identifier);
                messages
                    .push(builder.message(&intermediate, &elements(&c.intermediate_responses))?);
                methods.push(method(
                    &rpc::intermediate(&c.identifier),
                    &framework("CommandExecutionUUID"),
                    &local(&intermediate),
                    true,
                ));
            }
            methods.push(method(
                &rpc::result(&c.identifier),
                &framework("CommandExecutionUUID"),
                &local(&responses),
                false,
            ));
        } else {
            if !c.intermediate_responses.is_empty() {
                return Err(builder.error(format!(
                    "command {} is unobservable but has intermediate responses",
                    c.identifier
                )));
            }
            methods.push(method(
                &c.identifier,
                &local(&parameters),
                &local(&responses),
                false,
            ));
        }
    }
    for p in &feature.properties {
        let rpc_name = if p.observable {
            rpc::subscribe_property(&p.identifier)
        } else {
            rpc::get_property(&p.identifier)
        };
        let parameters = format!("{rpc_name}_Parameters");
        let responses = format!("{rpc_name}_Responses");
        messages.push(builder.message(&parameters, &[])?);
        messages.push(builder.message(&responses, &[(&p.identifier, &p.data_type)])?);
        methods.push(method(
            &rpc_name,
            &local(&parameters),
            &local(&responses),
            p.observable,
        ));
    }
    for m in &feature.metadata {
        let rpc_name = rpc::affected_by_metadata(&m.identifier);
        let parameters = format!("{rpc_name}_Parameters");
        let responses = format!("{rpc_name}_Responses");
        messages.push(builder.message(&parameters, &[])?);
        let affected = DataType::List(Box::new(DataType::Basic(Basic::String)));
        messages.push(builder.message(&responses, &[("AffectedCalls", &affected)])?);
        messages.push(builder.message(
            &format!("Metadata_{}", m.identifier),
            &[(&m.identifier, &m.data_type)],
        )?);
        methods.push(method(
            &rpc_name,
            &local(&parameters),
            &local(&responses),
            false,
        ));
    }

    Ok(FileDescriptorProto {
        name: Some(file_name(feature)),
        package: Some(builder.package.clone()),
        dependency: vec![framework::FILE_NAME.to_owned()],
        message_type: messages,
        service: vec![ServiceDescriptorProto {
            name: Some(feature.identifier.clone()),
            method: methods,
            ..Default::default()
        }],
        syntax: Some("proto3".into()),
        ..Default::default()
    })
}

/// A pool holding the framework file and every feature's file.
pub fn pool(features: &[Feature]) -> Result<DescriptorPool, DescriptorError> {
    let mut pool =
        DescriptorPool::decode(framework::FILE_DESCRIPTOR_SET).map_err(|e| DescriptorError {
            feature: framework::PACKAGE.into(),
            reason: e.to_string(),
        })?;
    for f in features {
        add(&mut pool, f)?;
    }
    Ok(pool)
}

/// Adds one feature's file to a pool that already holds the framework file (the `sila2`
/// driver adds the features of a server as it learns them).
pub fn add(pool: &mut DescriptorPool, feature: &Feature) -> Result<(), DescriptorError> {
    let file = file_descriptor(feature)?;
    pool.add_file_descriptor_proto(file)
        .map_err(|e| DescriptorError {
            feature: feature.fully_qualified_identifier(),
            reason: e.to_string(),
        })
}

fn elements(elements: &[Element]) -> Vec<(&str, &DataType)> {
    elements
        .iter()
        .map(|e| (e.identifier.as_str(), &e.data_type))
        .collect()
}

fn method(name: &str, input: &str, output: &str, server_streaming: bool) -> MethodDescriptorProto {
    MethodDescriptorProto {
        name: Some(name.to_owned()),
        input_type: Some(input.to_owned()),
        output_type: Some(output.to_owned()),
        client_streaming: Some(false),
        server_streaming: Some(server_streaming),
        ..Default::default()
    }
}

struct Builder<'a> {
    feature: &'a Feature,
    package: String,
}

impl Builder<'_> {
    fn error(&self, reason: String) -> DescriptorError {
        DescriptorError {
            feature: self.feature.fully_qualified_identifier(),
            reason,
        }
    }

    /// Two members of one kind with one identifier would be two messages with one name.
    fn check_unique(&self) -> Result<(), DescriptorError> {
        let f = self.feature;
        let groups: [(&str, Vec<&str>); 5] = [
            (
                "command",
                f.commands.iter().map(|c| c.identifier.as_str()).collect(),
            ),
            (
                "property",
                f.properties.iter().map(|p| p.identifier.as_str()).collect(),
            ),
            (
                "metadata",
                f.metadata.iter().map(|m| m.identifier.as_str()).collect(),
            ),
            (
                "data type",
                f.data_types.iter().map(|d| d.identifier.as_str()).collect(),
            ),
            (
                "error",
                f.errors.iter().map(|e| e.identifier.as_str()).collect(),
            ),
        ];
        for (kind, ids) in groups {
            let mut seen = std::collections::HashSet::new();
            if let Some(dup) = ids.iter().find(|id| !seen.insert(**id)) {
                return Err(self.error(format!("two of {kind} {dup}")));
            }
        }
        Ok(())
    }

    /// The message `name` (full name `scope`) with one field per element; the structures
    /// its elements hold become nested messages.
    fn message(
        &self,
        name: &str,
        elements: &[(&str, &DataType)],
    ) -> Result<DescriptorProto, DescriptorError> {
        let scope = format!("{}.{name}", self.package);
        self.message_in(name, &scope, elements)
    }

    fn message_in(
        &self,
        name: &str,
        scope: &str,
        elements: &[(&str, &DataType)],
    ) -> Result<DescriptorProto, DescriptorError> {
        let mut message = DescriptorProto {
            name: Some(name.to_owned()),
            ..Default::default()
        };
        let mut seen = std::collections::HashSet::new();
        for (index, (identifier, data_type)) in elements.iter().enumerate() {
            if !seen.insert(*identifier) {
                return Err(self.error(format!("{scope}: two elements {identifier}")));
            }
            if let Some(structure) = structure_of(data_type) {
                let nested = format!("{identifier}_Struct");
                let nested_scope = format!("{scope}.{nested}");
                let members = structure
                    .iter()
                    .map(|e| (e.identifier.as_str(), &e.data_type))
                    .collect::<Vec<_>>();
                message
                    .nested_type
                    .push(self.message_in(&nested, &nested_scope, &members)?);
            }
            let (repeated, type_name) = self.field_type(scope, identifier, data_type, false)?;
            let number = i32::try_from(index + 1)
                .map_err(|_| self.error(format!("{scope}: too many elements")))?;
            message.field.push(FieldDescriptorProto {
                name: Some((*identifier).to_owned()),
                json_name: Some((*identifier).to_owned()),
                number: Some(number),
                label: Some(if repeated {
                    Label::Repeated
                } else {
                    Label::Optional
                } as i32),
                r#type: Some(Type::Message as i32),
                type_name: Some(type_name),
                ..Default::default()
            });
        }
        Ok(message)
    }

    /// Whether the field is repeated, and its message type.
    fn field_type(
        &self,
        scope: &str,
        identifier: &str,
        data_type: &DataType,
        in_list: bool,
    ) -> Result<(bool, String), DescriptorError> {
        match data_type {
            DataType::Basic(b) => Ok((false, format!(".{}.{}", framework::PACKAGE, b.name()))),
            DataType::Constrained(inner, _) => self.field_type(scope, identifier, inner, in_list),
            DataType::List(inner) => {
                if in_list {
                    return Err(self.error(format!("{scope}.{identifier}: a list of lists")));
                }
                let (_, name) = self.field_type(scope, identifier, inner, true)?;
                Ok((true, name))
            }
            DataType::Identifier(id) => {
                if self.feature.data_type_definition(id).is_none() {
                    return Err(self.error(format!("{scope}.{identifier}: unknown data type {id}")));
                }
                Ok((false, format!(".{}.DataType_{id}", self.package)))
            }
            DataType::Structure(_) => Ok((false, format!(".{scope}.{identifier}_Struct"))),
        }
    }
}

/// The elements of the structure an element's type is (or is a list of).
fn structure_of(data_type: &DataType) -> Option<&[Element]> {
    match data_type {
        DataType::Structure(elements) => Some(elements),
        DataType::List(inner) | DataType::Constrained(inner, _) => structure_of(inner),
        _ => None,
    }
}
