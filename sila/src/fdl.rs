//! The SiLA 2 Feature Definition (FDL): one feature's commands, properties, data types,
//! errors and metadata, as the standard's `FeatureDefinition.xsd` describes them.
//!
//! [`Feature::to_xml`] writes a definition that validates against the official schema;
//! [`Feature::from_xml`] reads one from any server (the `sila2` driver family).

/// The SiLA namespace of every FDL element.
pub const NAMESPACE: &str = "http://www.sila-standard.org";

/// A feature: `Originator/Category/Identifier/vMajor` names it.
#[derive(Debug, Clone, PartialEq)]
pub struct Feature {
    /// `SiLA2Version` attribute, e.g. `1.0`.
    pub sila2_version: String,
    /// `FeatureVersion` attribute, `Major.Minor`.
    pub feature_version: String,
    /// `MaturityLevel` attribute: `Draft`, `Verified` or `Normative`.
    pub maturity_level: String,
    /// `Originator` attribute, lower case and dots (`org.silastandard`).
    pub originator: String,
    /// `Category` attribute, lower case and dots (`core`); `none` when absent.
    pub category: String,
    /// `Locale` attribute, `en-us` when absent.
    pub locale: String,
    pub identifier: String,
    pub display_name: String,
    pub description: String,
    pub commands: Vec<Command>,
    pub properties: Vec<Property>,
    pub metadata: Vec<Metadata>,
    pub errors: Vec<DefinedExecutionError>,
    pub data_types: Vec<DataTypeDefinition>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Command {
    pub identifier: String,
    pub display_name: String,
    pub description: String,
    pub observable: bool,
    pub parameters: Vec<Element>,
    pub responses: Vec<Element>,
    /// Observable commands only.
    pub intermediate_responses: Vec<Element>,
    /// Identifiers of the feature's [`DefinedExecutionError`]s this command may raise.
    pub errors: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Property {
    pub identifier: String,
    pub display_name: String,
    pub description: String,
    pub observable: bool,
    pub data_type: DataType,
    pub errors: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Metadata {
    pub identifier: String,
    pub display_name: String,
    pub description: String,
    pub data_type: DataType,
    pub errors: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DefinedExecutionError {
    pub identifier: String,
    pub display_name: String,
    pub description: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DataTypeDefinition {
    pub identifier: String,
    pub display_name: String,
    pub description: String,
    pub data_type: DataType,
}

/// A named, typed value: a parameter, a response, an intermediate response, or an element of
/// a structure.
#[derive(Debug, Clone, PartialEq)]
pub struct Element {
    pub identifier: String,
    pub display_name: String,
    pub description: String,
    pub data_type: DataType,
}

/// The SiLA basic types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Basic {
    String,
    Integer,
    Real,
    Boolean,
    Binary,
    Date,
    Time,
    Timestamp,
    Any,
}

#[derive(Debug, Clone, PartialEq)]
pub enum DataType {
    Basic(Basic),
    List(Box<DataType>),
    Structure(Vec<Element>),
    /// Boxed constraints keep every `DataType` (and so every `Element`) small.
    Constrained(Box<DataType>, Box<Constraints>),
    /// A [`DataTypeDefinition`] of the same feature, by identifier.
    Identifier(String),
}

/// The constraints of a `Constrained` type; `None`/empty means absent. Numbers are kept as
/// written in the FDL (their type follows the constrained type).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Constraints {
    pub length: Option<u64>,
    pub minimal_length: Option<u64>,
    pub maximal_length: Option<u64>,
    /// `Set`: the accepted values, as written.
    pub set: Vec<String>,
    pub pattern: Option<String>,
    pub maximal_exclusive: Option<String>,
    pub maximal_inclusive: Option<String>,
    pub minimal_exclusive: Option<String>,
    pub minimal_inclusive: Option<String>,
    pub unit: Option<Unit>,
    pub content_type: Option<String>,
    pub element_count: Option<u64>,
    pub minimal_element_count: Option<u64>,
    pub maximal_element_count: Option<u64>,
    /// `FullyQualifiedIdentifier`: which kind of identifier a string must be.
    pub fully_qualified_identifier: Option<String>,
    /// `Schema`: `(Type, Url)`, e.g. `("Xml", "https://…/FeatureDefinition.xsd")`.
    pub schema: Option<(String, String)>,
    /// `AllowedTypes` of an `Any`.
    pub allowed_types: Vec<DataType>,
}

/// A SiLA `Unit` constraint: a label, its conversion to SI (`value_si = value * factor +
/// offset`) and the SI base units it is made of.
#[derive(Debug, Clone, PartialEq)]
pub struct Unit {
    pub label: String,
    pub factor: f64,
    pub offset: f64,
    pub components: Vec<UnitComponent>,
}

/// One SI base unit with its exponent, e.g. `("Kelvin", 1)`.
#[derive(Debug, Clone, PartialEq)]
pub struct UnitComponent {
    /// `Dimensionless`, `Meter`, `Kilogram`, `Second`, `Ampere`, `Kelvin`, `Mole`, `Candela`.
    pub si_unit: String,
    pub exponent: i64,
}

/// Why an FDL document could not be read.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("feature definition: {path}: {reason}")]
pub struct FdlError {
    /// Where, e.g. `Command[2]/Parameter[0]/DataType`.
    pub path: String,
    pub reason: String,
}

impl Feature {
    /// `Originator/Category/Identifier/vMajor`, e.g. `org.silastandard/core/SiLAService/v1`.
    pub fn fully_qualified_identifier(&self) -> String {
        format!(
            "{}/{}/{}/v{}",
            self.originator,
            self.category,
            self.identifier,
            self.major_version()
        )
    }

    /// The major part of [`Feature::feature_version`].
    pub fn major_version(&self) -> &str {
        self.feature_version
            .split('.')
            .next()
            .unwrap_or(&self.feature_version)
    }

    /// The feature as FDL XML, valid against `FeatureDefinition.xsd`.
    pub fn to_xml(&self) -> String {
        write::feature(self)
    }

    /// Reads a feature definition; any deviation from the schema's structure is an error
    /// naming where it is.
    pub fn from_xml(xml: &str) -> Result<Feature, FdlError> {
        read::feature(xml)
    }

    pub fn command(&self, identifier: &str) -> Option<&Command> {
        self.commands.iter().find(|c| c.identifier == identifier)
    }

    pub fn property(&self, identifier: &str) -> Option<&Property> {
        self.properties.iter().find(|p| p.identifier == identifier)
    }

    pub fn metadata(&self, identifier: &str) -> Option<&Metadata> {
        self.metadata.iter().find(|m| m.identifier == identifier)
    }

    pub fn data_type_definition(&self, identifier: &str) -> Option<&DataTypeDefinition> {
        self.data_types.iter().find(|d| d.identifier == identifier)
    }

    /// Follows [`DataType::Identifier`]s to the definition's type (at most as deep as the
    /// feature has definitions, so a cycle ends in `None`).
    pub fn resolve<'a>(&'a self, data_type: &'a DataType) -> Option<&'a DataType> {
        let mut current = data_type;
        for _ in 0..=self.data_types.len() {
            match current {
                DataType::Identifier(id) => current = &self.data_type_definition(id)?.data_type,
                other => return Some(other),
            }
        }
        None
    }
}

impl Basic {
    pub const ALL: [Basic; 9] = [
        Basic::String,
        Basic::Integer,
        Basic::Real,
        Basic::Boolean,
        Basic::Binary,
        Basic::Date,
        Basic::Time,
        Basic::Timestamp,
        Basic::Any,
    ];

    /// The FDL name, which is also the framework message's name (`Real`).
    pub fn name(self) -> &'static str {
        match self {
            Basic::String => "String",
            Basic::Integer => "Integer",
            Basic::Real => "Real",
            Basic::Boolean => "Boolean",
            Basic::Binary => "Binary",
            Basic::Date => "Date",
            Basic::Time => "Time",
            Basic::Timestamp => "Timestamp",
            Basic::Any => "Any",
        }
    }

    pub fn from_name(name: &str) -> Option<Basic> {
        Basic::ALL.into_iter().find(|b| b.name() == name)
    }
}

impl DataType {
    /// The type as a stand-alone `<DataType>` element in the SiLA namespace: how an `Any`
    /// value names its type.
    pub fn to_xml(&self) -> String {
        let mut out = String::new();
        write::data_type_root(&mut out, self);
        out
    }

    /// Reads a stand-alone `<DataType>` element (the `type` of an `Any`).
    pub fn from_xml(xml: &str) -> Result<DataType, FdlError> {
        read::data_type_root(xml)
    }
}

impl Unit {
    /// A unit without dimension (or one ppu does not know): kept as a label only.
    pub fn dimensionless(label: &str) -> Unit {
        Unit {
            label: label.to_owned(),
            factor: 1.0,
            offset: 0.0,
            components: vec![UnitComponent {
                si_unit: "Dimensionless".into(),
                exponent: 1,
            }],
        }
    }
}

/// The FDL writer: plain string building (the structure is fixed by the schema).
mod write {
    use std::fmt::Write as _;

    use super::*;

    const SCHEMA_LOCATION: &str = "http://www.sila-standard.org https://gitlab.com/SiLA2/sila_base/raw/master/schema/FeatureDefinition.xsd";

    pub(super) fn feature(f: &Feature) -> String {
        let mut out = String::from("<?xml version=\"1.0\" encoding=\"utf-8\"?>\n");
        let _ = writeln!(
            out,
            "<Feature xmlns=\"{NAMESPACE}\" xmlns:xsi=\"http://www.w3.org/2001/XMLSchema-instance\" \
             xsi:schemaLocation=\"{SCHEMA_LOCATION}\" SiLA2Version=\"{}\" FeatureVersion=\"{}\" \
             MaturityLevel=\"{}\" Originator=\"{}\" Category=\"{}\" Locale=\"{}\">",
            attr(&f.sila2_version),
            attr(&f.feature_version),
            attr(&f.maturity_level),
            attr(&f.originator),
            attr(&f.category),
            attr(&f.locale),
        );
        let d = 1;
        header(&mut out, d, &f.identifier, &f.display_name, &f.description);
        for c in &f.commands {
            open(&mut out, d, "Command");
            header(
                &mut out,
                d + 1,
                &c.identifier,
                &c.display_name,
                &c.description,
            );
            leaf(&mut out, d + 1, "Observable", yes_no(c.observable));
            for (tag, elements) in [
                ("Parameter", &c.parameters),
                ("Response", &c.responses),
                ("IntermediateResponse", &c.intermediate_responses),
            ] {
                for e in elements {
                    element(&mut out, d + 1, tag, e);
                }
            }
            errors(&mut out, d + 1, &c.errors);
            close(&mut out, d, "Command");
        }
        for p in &f.properties {
            open(&mut out, d, "Property");
            header(
                &mut out,
                d + 1,
                &p.identifier,
                &p.display_name,
                &p.description,
            );
            leaf(&mut out, d + 1, "Observable", yes_no(p.observable));
            data_type(&mut out, d + 1, &p.data_type);
            errors(&mut out, d + 1, &p.errors);
            close(&mut out, d, "Property");
        }
        for m in &f.metadata {
            open(&mut out, d, "Metadata");
            header(
                &mut out,
                d + 1,
                &m.identifier,
                &m.display_name,
                &m.description,
            );
            data_type(&mut out, d + 1, &m.data_type);
            errors(&mut out, d + 1, &m.errors);
            close(&mut out, d, "Metadata");
        }
        for e in &f.errors {
            open(&mut out, d, "DefinedExecutionError");
            header(
                &mut out,
                d + 1,
                &e.identifier,
                &e.display_name,
                &e.description,
            );
            close(&mut out, d, "DefinedExecutionError");
        }
        for t in &f.data_types {
            open(&mut out, d, "DataTypeDefinition");
            header(
                &mut out,
                d + 1,
                &t.identifier,
                &t.display_name,
                &t.description,
            );
            data_type(&mut out, d + 1, &t.data_type);
            close(&mut out, d, "DataTypeDefinition");
        }
        out.push_str("</Feature>\n");
        out
    }

    pub(super) fn data_type_root(out: &mut String, t: &DataType) {
        let _ = writeln!(out, "<DataType xmlns=\"{NAMESPACE}\">");
        data_type_content(out, 1, t);
        out.push_str("</DataType>");
    }

    fn yes_no(b: bool) -> &'static str {
        if b { "Yes" } else { "No" }
    }

    fn indent(out: &mut String, depth: usize) {
        for _ in 0..depth {
            out.push_str("  ");
        }
    }

    fn open(out: &mut String, depth: usize, tag: &str) {
        indent(out, depth);
        let _ = writeln!(out, "<{tag}>");
    }

    fn close(out: &mut String, depth: usize, tag: &str) {
        indent(out, depth);
        let _ = writeln!(out, "</{tag}>");
    }

    fn leaf(out: &mut String, depth: usize, tag: &str, text_value: &str) {
        indent(out, depth);
        let _ = writeln!(out, "<{tag}>{}</{tag}>", text(text_value));
    }

    fn header(out: &mut String, depth: usize, identifier: &str, display: &str, description: &str) {
        leaf(out, depth, "Identifier", identifier);
        leaf(out, depth, "DisplayName", display);
        leaf(out, depth, "Description", description);
    }

    fn errors(out: &mut String, depth: usize, errors: &[String]) {
        if errors.is_empty() {
            return;
        }
        open(out, depth, "DefinedExecutionErrors");
        for e in errors {
            leaf(out, depth + 1, "Identifier", e);
        }
        close(out, depth, "DefinedExecutionErrors");
    }

    fn element(out: &mut String, depth: usize, tag: &str, e: &Element) {
        open(out, depth, tag);
        header(
            out,
            depth + 1,
            &e.identifier,
            &e.display_name,
            &e.description,
        );
        data_type(out, depth + 1, &e.data_type);
        close(out, depth, tag);
    }

    fn data_type(out: &mut String, depth: usize, t: &DataType) {
        open(out, depth, "DataType");
        data_type_content(out, depth + 1, t);
        close(out, depth, "DataType");
    }

    fn data_type_content(out: &mut String, depth: usize, t: &DataType) {
        match t {
            DataType::Basic(b) => leaf(out, depth, "Basic", b.name()),
            DataType::List(inner) => {
                open(out, depth, "List");
                data_type(out, depth + 1, inner);
                close(out, depth, "List");
            }
            DataType::Structure(elements) => {
                open(out, depth, "Structure");
                for e in elements {
                    element(out, depth + 1, "Element", e);
                }
                close(out, depth, "Structure");
            }
            DataType::Constrained(inner, c) => {
                open(out, depth, "Constrained");
                data_type(out, depth + 1, inner);
                constraints(out, depth + 1, c);
                close(out, depth, "Constrained");
            }
            DataType::Identifier(id) => leaf(out, depth, "DataTypeIdentifier", id),
        }
    }

    fn constraints(out: &mut String, depth: usize, c: &Constraints) {
        open(out, depth, "Constraints");
        let d = depth + 1;
        let number = |out: &mut String, tag: &str, v: Option<u64>| {
            if let Some(v) = v {
                leaf(out, d, tag, &v.to_string());
            }
        };
        let string = |out: &mut String, tag: &str, v: &Option<String>| {
            if let Some(v) = v {
                leaf(out, d, tag, v);
            }
        };
        number(out, "Length", c.length);
        number(out, "MinimalLength", c.minimal_length);
        number(out, "MaximalLength", c.maximal_length);
        if !c.set.is_empty() {
            open(out, d, "Set");
            for v in &c.set {
                leaf(out, d + 1, "Value", v);
            }
            close(out, d, "Set");
        }
        string(out, "Pattern", &c.pattern);
        string(out, "MaximalExclusive", &c.maximal_exclusive);
        string(out, "MaximalInclusive", &c.maximal_inclusive);
        string(out, "MinimalExclusive", &c.minimal_exclusive);
        string(out, "MinimalInclusive", &c.minimal_inclusive);
        if let Some(u) = &c.unit {
            open(out, d, "Unit");
            leaf(out, d + 1, "Label", &u.label);
            leaf(out, d + 1, "Factor", &decimal(u.factor));
            leaf(out, d + 1, "Offset", &decimal(u.offset));
            for component in &u.components {
                open(out, d + 1, "UnitComponent");
                leaf(out, d + 2, "SIUnit", &component.si_unit);
                leaf(out, d + 2, "Exponent", &component.exponent.to_string());
                close(out, d + 1, "UnitComponent");
            }
            close(out, d, "Unit");
        }
        if let Some(content_type) = &c.content_type {
            let mut parts = content_type.split(';');
            let (kind, sub) = parts
                .next()
                .unwrap_or_default()
                .split_once('/')
                .unwrap_or((content_type.as_str(), ""));
            open(out, d, "ContentType");
            leaf(out, d + 1, "Type", kind.trim());
            leaf(out, d + 1, "Subtype", sub.trim());
            let parameters: Vec<(&str, &str)> = parts
                .filter_map(|p| p.split_once('='))
                .map(|(a, v)| (a.trim(), v.trim()))
                .collect();
            if !parameters.is_empty() {
                open(out, d + 1, "Parameters");
                for (a, v) in parameters {
                    open(out, d + 2, "Parameter");
                    leaf(out, d + 3, "Attribute", a);
                    leaf(out, d + 3, "Value", v);
                    close(out, d + 2, "Parameter");
                }
                close(out, d + 1, "Parameters");
            }
            close(out, d, "ContentType");
        }
        number(out, "ElementCount", c.element_count);
        number(out, "MinimalElementCount", c.minimal_element_count);
        number(out, "MaximalElementCount", c.maximal_element_count);
        string(
            out,
            "FullyQualifiedIdentifier",
            &c.fully_qualified_identifier,
        );
        if let Some((kind, url)) = &c.schema {
            open(out, d, "Schema");
            leaf(out, d + 1, "Type", kind);
            leaf(out, d + 1, "Url", url);
            close(out, d, "Schema");
        }
        if !c.allowed_types.is_empty() {
            open(out, d, "AllowedTypes");
            for t in &c.allowed_types {
                data_type(out, d + 1, t);
            }
            close(out, d, "AllowedTypes");
        }
        close(out, depth, "Constraints");
    }

    /// `xs:decimal` has no exponent; Rust's `Display` for `f64` never writes one.
    fn decimal(v: f64) -> String {
        if v.is_finite() {
            v.to_string()
        } else {
            "0".into()
        }
    }

    fn text(s: &str) -> String {
        s.replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
    }

    fn attr(s: &str) -> String {
        text(s).replace('"', "&quot;")
    }
}

/// The FDL reader: the document into a small element tree (quick-xml), then the tree into the
/// model, naming the path of whatever does not fit.
mod read {
    use quick_xml::events::Event;

    use super::*;

    /// One element: local name, attributes (local names), children, and its text content.
    struct Node {
        name: String,
        attributes: Vec<(String, String)>,
        children: Vec<Node>,
        text: String,
    }

    fn error(path: &str, reason: impl Into<String>) -> FdlError {
        FdlError {
            path: path.to_owned(),
            reason: reason.into(),
        }
    }

    fn tree(xml: &str) -> Result<Node, FdlError> {
        let mut reader = quick_xml::Reader::from_str(xml);
        let mut stack: Vec<Node> = Vec::new();
        let xml_error = |e: &dyn std::fmt::Display, at: u64| {
            error(&format!("byte {at}"), format!("not well-formed XML: {e}"))
        };
        let start = |e: &quick_xml::events::BytesStart| -> Result<Node, FdlError> {
            let name = String::from_utf8_lossy(e.local_name().as_ref()).into_owned();
            let mut attributes = Vec::new();
            for a in e.attributes() {
                let a = a.map_err(|e| error(&name, format!("bad attribute: {e}")))?;
                let value = a
                    .unescape_value()
                    .map_err(|e| error(&name, format!("bad attribute value: {e}")))?;
                attributes.push((
                    String::from_utf8_lossy(a.key.local_name().as_ref()).into_owned(),
                    value.into_owned(),
                ));
            }
            Ok(Node {
                name,
                attributes,
                children: Vec::new(),
                text: String::new(),
            })
        };
        loop {
            let position = reader.buffer_position();
            let event = reader.read_event().map_err(|e| xml_error(&e, position))?;
            match event {
                Event::Start(e) => stack.push(start(&e)?),
                Event::Empty(e) => {
                    let node = start(&e)?;
                    match stack.last_mut() {
                        Some(parent) => parent.children.push(node),
                        None => return Ok(node),
                    }
                }
                Event::End(_) => {
                    let node = stack
                        .pop()
                        .ok_or_else(|| error("/", "unbalanced end tag"))?;
                    match stack.last_mut() {
                        Some(parent) => parent.children.push(node),
                        None => return Ok(node),
                    }
                }
                Event::Text(t) => {
                    if let Some(node) = stack.last_mut() {
                        let s = t.decode().map_err(|e| xml_error(&e, position))?;
                        node.text.push_str(&s.replace("\r\n", "\n"));
                    }
                }
                Event::CData(t) => {
                    if let Some(node) = stack.last_mut() {
                        let s = t.decode().map_err(|e| xml_error(&e, position))?;
                        node.text.push_str(&s);
                    }
                }
                Event::GeneralRef(r) => {
                    if let Some(node) = stack.last_mut() {
                        if let Some(c) =
                            r.resolve_char_ref().map_err(|e| xml_error(&e, position))?
                        {
                            node.text.push(c);
                        } else {
                            let name = r.decode().map_err(|e| xml_error(&e, position))?;
                            let value = quick_xml::escape::resolve_predefined_entity(&name)
                                .ok_or_else(|| {
                                    error(&node.name, format!("unknown entity &{name};"))
                                })?;
                            node.text.push_str(value);
                        }
                    }
                }
                Event::Eof => return Err(error("/", "no Feature element")),
                Event::Decl(_) | Event::PI(_) | Event::DocType(_) | Event::Comment(_) => {}
            }
        }
    }

    impl Node {
        fn attribute(&self, name: &str) -> Option<&str> {
            self.attributes
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
        }

        /// The only child called `name`.
        fn child(&self, path: &str, name: &str) -> Result<&Node, FdlError> {
            let mut found = self.children.iter().filter(|c| c.name == name);
            let first = found
                .next()
                .ok_or_else(|| error(path, format!("missing {name}")))?;
            if found.next().is_some() {
                return Err(error(path, format!("more than one {name}")));
            }
            Ok(first)
        }

        fn optional(&self, path: &str, name: &str) -> Result<Option<&Node>, FdlError> {
            if self.children.iter().any(|c| c.name == name) {
                self.child(path, name).map(Some)
            } else {
                Ok(None)
            }
        }

        fn text_of(&self, path: &str, name: &str) -> Result<String, FdlError> {
            Ok(self.child(path, name)?.text.clone())
        }

        /// Refuses children outside `allowed`.
        fn only(&self, path: &str, allowed: &[&str]) -> Result<(), FdlError> {
            match self
                .children
                .iter()
                .find(|c| !allowed.contains(&c.name.as_str()))
            {
                Some(c) => Err(error(path, format!("unexpected element {}", c.name))),
                None => Ok(()),
            }
        }
    }

    fn identifier(path: &str, node: &Node) -> Result<String, FdlError> {
        let id = node.text_of(path, "Identifier")?.trim().to_owned();
        check_identifier(&format!("{path}/Identifier"), &id)?;
        Ok(id)
    }

    fn check_identifier(path: &str, id: &str) -> Result<(), FdlError> {
        let mut chars = id.chars();
        let valid = chars.next().is_some_and(|c| c.is_ascii_uppercase())
            && chars.all(|c| c.is_ascii_alphanumeric())
            && id.len() <= 255;
        if valid {
            Ok(())
        } else {
            Err(error(
                path,
                format!("{id:?} is not an identifier ([A-Z][a-zA-Z0-9]*)"),
            ))
        }
    }

    /// Identifier, DisplayName, Description.
    fn header(path: &str, node: &Node) -> Result<(String, String, String), FdlError> {
        Ok((
            identifier(path, node)?,
            node.text_of(path, "DisplayName")?,
            node.text_of(path, "Description")?,
        ))
    }

    fn observable(path: &str, node: &Node) -> Result<bool, FdlError> {
        match node.text_of(path, "Observable")?.trim() {
            "Yes" => Ok(true),
            "No" => Ok(false),
            other => Err(error(
                &format!("{path}/Observable"),
                format!("{other:?} is neither Yes nor No"),
            )),
        }
    }

    fn errors(path: &str, node: &Node) -> Result<Vec<String>, FdlError> {
        let Some(list) = node.optional(path, "DefinedExecutionErrors")? else {
            return Ok(Vec::new());
        };
        let path = format!("{path}/DefinedExecutionErrors");
        list.only(&path, &["Identifier"])?;
        list.children
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let id = c.text.trim().to_owned();
                check_identifier(&format!("{path}/Identifier[{i}]"), &id)?;
                Ok(id)
            })
            .collect()
    }

    fn elements(path: &str, node: &Node, tag: &str) -> Result<Vec<Element>, FdlError> {
        node.children
            .iter()
            .filter(|c| c.name == tag)
            .enumerate()
            .map(|(i, c)| element(&format!("{path}/{tag}[{i}]"), c))
            .collect()
    }

    fn element(path: &str, node: &Node) -> Result<Element, FdlError> {
        node.only(
            path,
            &["Identifier", "DisplayName", "Description", "DataType"],
        )?;
        let (identifier, display_name, description) = header(path, node)?;
        Ok(Element {
            identifier,
            display_name,
            description,
            data_type: data_type(&format!("{path}/DataType"), node.child(path, "DataType")?)?,
        })
    }

    pub(super) fn data_type_root(xml: &str) -> Result<DataType, FdlError> {
        let root = tree(xml)?;
        if root.name != "DataType" {
            return Err(error(
                "/",
                format!("root element is {}, not DataType", root.name),
            ));
        }
        data_type("DataType", &root)
    }

    /// A `DataType` element (its one child says which kind).
    fn data_type(path: &str, node: &Node) -> Result<DataType, FdlError> {
        let [kind] = node.children.as_slice() else {
            return Err(error(path, "a data type has exactly one child element"));
        };
        let here = format!("{path}/{}", kind.name);
        match kind.name.as_str() {
            "Basic" => Basic::from_name(kind.text.trim())
                .map(DataType::Basic)
                .ok_or_else(|| error(&here, format!("unknown basic type {:?}", kind.text))),
            "List" => {
                kind.only(&here, &["DataType"])?;
                let inner = data_type(&format!("{here}/DataType"), kind.child(&here, "DataType")?)?;
                Ok(DataType::List(Box::new(inner)))
            }
            "Structure" => {
                kind.only(&here, &["Element"])?;
                let elements = elements(&here, kind, "Element")?;
                if elements.is_empty() {
                    return Err(error(&here, "a structure has at least one element"));
                }
                Ok(DataType::Structure(elements))
            }
            "Constrained" => {
                kind.only(&here, &["DataType", "Constraints"])?;
                let inner = data_type(&format!("{here}/DataType"), kind.child(&here, "DataType")?)?;
                let c = constraints(
                    &format!("{here}/Constraints"),
                    kind.child(&here, "Constraints")?,
                )?;
                Ok(DataType::Constrained(Box::new(inner), Box::new(c)))
            }
            "DataTypeIdentifier" => {
                let id = kind.text.trim().to_owned();
                check_identifier(&here, &id)?;
                Ok(DataType::Identifier(id))
            }
            other => Err(error(path, format!("unknown data type kind {other}"))),
        }
    }

    fn constraints(path: &str, node: &Node) -> Result<Constraints, FdlError> {
        node.only(
            path,
            &[
                "Length",
                "MinimalLength",
                "MaximalLength",
                "Set",
                "Pattern",
                "MaximalExclusive",
                "MaximalInclusive",
                "MinimalExclusive",
                "MinimalInclusive",
                "Unit",
                "ContentType",
                "ElementCount",
                "MinimalElementCount",
                "MaximalElementCount",
                "FullyQualifiedIdentifier",
                "Schema",
                "AllowedTypes",
            ],
        )?;
        let number = |tag: &str| -> Result<Option<u64>, FdlError> {
            node.optional(path, tag)?
                .map(|n| {
                    n.text.trim().parse::<u64>().map_err(|_| {
                        error(
                            &format!("{path}/{tag}"),
                            format!("{:?} is not a count", n.text),
                        )
                    })
                })
                .transpose()
        };
        let string = |tag: &str| -> Result<Option<String>, FdlError> {
            Ok(node.optional(path, tag)?.map(|n| n.text.clone()))
        };
        let trimmed = |tag: &str| -> Result<Option<String>, FdlError> {
            Ok(string(tag)?.map(|s| s.trim().to_owned()))
        };
        let mut c = Constraints {
            length: number("Length")?,
            minimal_length: number("MinimalLength")?,
            maximal_length: number("MaximalLength")?,
            pattern: string("Pattern")?,
            maximal_exclusive: trimmed("MaximalExclusive")?,
            maximal_inclusive: trimmed("MaximalInclusive")?,
            minimal_exclusive: trimmed("MinimalExclusive")?,
            minimal_inclusive: trimmed("MinimalInclusive")?,
            element_count: number("ElementCount")?,
            minimal_element_count: number("MinimalElementCount")?,
            maximal_element_count: number("MaximalElementCount")?,
            fully_qualified_identifier: trimmed("FullyQualifiedIdentifier")?,
            ..Constraints::default()
        };
        if let Some(set) = node.optional(path, "Set")? {
            let here = format!("{path}/Set");
            set.only(&here, &["Value"])?;
            if set.children.is_empty() {
                return Err(error(&here, "a set has at least one value"));
            }
            c.set = set.children.iter().map(|v| v.text.clone()).collect();
        }
        if let Some(unit) = node.optional(path, "Unit")? {
            let here = format!("{path}/Unit");
            unit.only(&here, &["Label", "Factor", "Offset", "UnitComponent"])?;
            let decimal = |tag: &str| -> Result<f64, FdlError> {
                let t = unit.text_of(&here, tag)?;
                t.trim()
                    .parse::<f64>()
                    .map_err(|_| error(&format!("{here}/{tag}"), format!("{t:?} is not a decimal")))
            };
            let mut components = Vec::new();
            for (i, uc) in unit
                .children
                .iter()
                .filter(|n| n.name == "UnitComponent")
                .enumerate()
            {
                let p = format!("{here}/UnitComponent[{i}]");
                uc.only(&p, &["SIUnit", "Exponent"])?;
                let si_unit = uc.text_of(&p, "SIUnit")?.trim().to_owned();
                if !SI_UNITS.contains(&si_unit.as_str()) {
                    return Err(error(
                        &format!("{p}/SIUnit"),
                        format!("unknown SI unit {si_unit:?}"),
                    ));
                }
                let e = uc.text_of(&p, "Exponent")?;
                let exponent = e.trim().parse::<i64>().map_err(|_| {
                    error(&format!("{p}/Exponent"), format!("{e:?} is not an integer"))
                })?;
                components.push(UnitComponent { si_unit, exponent });
            }
            if components.is_empty() {
                return Err(error(&here, "a unit has at least one UnitComponent"));
            }
            c.unit = Some(Unit {
                label: unit.text_of(&here, "Label")?,
                factor: decimal("Factor")?,
                offset: decimal("Offset")?,
                components,
            });
        }
        if let Some(ct) = node.optional(path, "ContentType")? {
            let here = format!("{path}/ContentType");
            ct.only(&here, &["Type", "Subtype", "Parameters"])?;
            let mut s = format!(
                "{}/{}",
                ct.text_of(&here, "Type")?.trim(),
                ct.text_of(&here, "Subtype")?.trim()
            );
            if let Some(parameters) = ct.optional(&here, "Parameters")? {
                for (i, p) in parameters.children.iter().enumerate() {
                    let pp = format!("{here}/Parameters/Parameter[{i}]");
                    s.push_str(&format!(
                        "; {}={}",
                        p.text_of(&pp, "Attribute")?.trim(),
                        p.text_of(&pp, "Value")?.trim()
                    ));
                }
            }
            c.content_type = Some(s);
        }
        if let Some(schema) = node.optional(path, "Schema")? {
            let here = format!("{path}/Schema");
            schema.only(&here, &["Type", "Url", "Inline"])?;
            let kind = schema.text_of(&here, "Type")?.trim().to_owned();
            // An inline schema is kept in the same place as a URL (the model has one slot).
            let location = match schema.optional(&here, "Url")? {
                Some(url) => url.text.trim().to_owned(),
                None => schema.text_of(&here, "Inline")?,
            };
            c.schema = Some((kind, location));
        }
        if let Some(allowed) = node.optional(path, "AllowedTypes")? {
            let here = format!("{path}/AllowedTypes");
            allowed.only(&here, &["DataType"])?;
            c.allowed_types = allowed
                .children
                .iter()
                .enumerate()
                .map(|(i, t)| data_type(&format!("{here}/DataType[{i}]"), t))
                .collect::<Result<_, _>>()?;
        }
        Ok(c)
    }

    const SI_UNITS: [&str; 8] = [
        "Dimensionless",
        "Meter",
        "Kilogram",
        "Second",
        "Ampere",
        "Kelvin",
        "Mole",
        "Candela",
    ];

    pub(super) fn feature(xml: &str) -> Result<Feature, FdlError> {
        let root = tree(xml)?;
        if root.name != "Feature" {
            return Err(error(
                "/",
                format!("root element is {}, not Feature", root.name),
            ));
        }
        let path = "Feature";
        let required = |name: &str| -> Result<String, FdlError> {
            root.attribute(name)
                .map(str::to_owned)
                .ok_or_else(|| error(path, format!("missing attribute {name}")))
        };
        let version = |name: &str| -> Result<String, FdlError> {
            let v = required(name)?;
            let ok = v
                .split_once('.')
                .is_some_and(|(a, b)| is_digits(a) && is_digits(b));
            if ok {
                Ok(v)
            } else {
                Err(error(path, format!("{name} {v:?} is not Major.Minor")))
            }
        };
        let dotted = |name: &str, value: String| -> Result<String, FdlError> {
            let ok = value.starts_with(|c: char| c.is_ascii_lowercase())
                && value.chars().all(|c| c.is_ascii_lowercase() || c == '.');
            if ok {
                Ok(value)
            } else {
                Err(error(
                    path,
                    format!("{name} {value:?} is not lower case and dots"),
                ))
            }
        };
        let maturity_level = root
            .attribute("MaturityLevel")
            .unwrap_or("Draft")
            .to_owned();
        if !["Draft", "Verified", "Normative"].contains(&maturity_level.as_str()) {
            return Err(error(
                path,
                format!("unknown MaturityLevel {maturity_level:?}"),
            ));
        }
        root.only(
            path,
            &[
                "Identifier",
                "DisplayName",
                "Description",
                "Command",
                "Property",
                "Metadata",
                "DefinedExecutionError",
                "DataTypeDefinition",
            ],
        )?;
        let (identifier, display_name, description) = header(path, &root)?;
        let mut feature = Feature {
            sila2_version: version("SiLA2Version")?,
            feature_version: version("FeatureVersion")?,
            maturity_level,
            originator: dotted("Originator", required("Originator")?)?,
            category: dotted(
                "Category",
                root.attribute("Category").unwrap_or("none").to_owned(),
            )?,
            locale: root.attribute("Locale").unwrap_or("en-us").to_owned(),
            identifier,
            display_name,
            description,
            commands: Vec::new(),
            properties: Vec::new(),
            metadata: Vec::new(),
            errors: Vec::new(),
            data_types: Vec::new(),
        };
        let mut counts = [0usize; 5];
        for node in &root.children {
            let kind = match node.name.as_str() {
                "Command" => 0,
                "Property" => 1,
                "Metadata" => 2,
                "DefinedExecutionError" => 3,
                "DataTypeDefinition" => 4,
                _ => continue,
            };
            let p = format!("{}[{}]", node.name, counts[kind]);
            counts[kind] += 1;
            match kind {
                0 => {
                    node.only(
                        &p,
                        &[
                            "Identifier",
                            "DisplayName",
                            "Description",
                            "Observable",
                            "Parameter",
                            "Response",
                            "IntermediateResponse",
                            "DefinedExecutionErrors",
                        ],
                    )?;
                    let (identifier, display_name, description) = header(&p, node)?;
                    let observable = observable(&p, node)?;
                    let intermediate_responses = elements(&p, node, "IntermediateResponse")?;
                    if !observable && !intermediate_responses.is_empty() {
                        return Err(error(
                            &p,
                            "an unobservable command has no intermediate responses",
                        ));
                    }
                    feature.commands.push(Command {
                        identifier,
                        display_name,
                        description,
                        observable,
                        parameters: elements(&p, node, "Parameter")?,
                        responses: elements(&p, node, "Response")?,
                        intermediate_responses,
                        errors: errors(&p, node)?,
                    });
                }
                1 => {
                    node.only(
                        &p,
                        &[
                            "Identifier",
                            "DisplayName",
                            "Description",
                            "Observable",
                            "DataType",
                            "DefinedExecutionErrors",
                        ],
                    )?;
                    let (identifier, display_name, description) = header(&p, node)?;
                    feature.properties.push(Property {
                        identifier,
                        display_name,
                        description,
                        observable: observable(&p, node)?,
                        data_type: data_type(
                            &format!("{p}/DataType"),
                            node.child(&p, "DataType")?,
                        )?,
                        errors: errors(&p, node)?,
                    });
                }
                2 => {
                    node.only(
                        &p,
                        &[
                            "Identifier",
                            "DisplayName",
                            "Description",
                            "DataType",
                            "DefinedExecutionErrors",
                        ],
                    )?;
                    let (identifier, display_name, description) = header(&p, node)?;
                    feature.metadata.push(Metadata {
                        identifier,
                        display_name,
                        description,
                        data_type: data_type(
                            &format!("{p}/DataType"),
                            node.child(&p, "DataType")?,
                        )?,
                        errors: errors(&p, node)?,
                    });
                }
                3 => {
                    node.only(&p, &["Identifier", "DisplayName", "Description"])?;
                    let (identifier, display_name, description) = header(&p, node)?;
                    feature.errors.push(DefinedExecutionError {
                        identifier,
                        display_name,
                        description,
                    });
                }
                _ => {
                    let e = element(&p, node)?;
                    feature.data_types.push(DataTypeDefinition {
                        identifier: e.identifier,
                        display_name: e.display_name,
                        description: e.description,
                        data_type: e.data_type,
                    });
                }
            }
        }
        Ok(feature)
    }

    fn is_digits(s: &str) -> bool {
        !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
    }
}
