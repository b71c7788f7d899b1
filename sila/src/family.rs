//! The SiLA feature of a device family, generated from its schema (`ppu.schema.v1`), and the
//! translation between the feature's messages and the family's own.
//!
//! Mapping (docs/sila.md): family → Feature `ppu/devices/<Family>/v1`; each command message →
//! Command (observable when the schema says so, with its `intermediate` message as
//! intermediate responses); each field → Parameter, units → `Unit` constraints, static bounds
//! → `MinimalInclusive`/`MaximalInclusive`/…, accepted sets → `Set`, repeated → `List`,
//! nested messages → `Structure`; the result message → Responses; readings → observable
//! properties; device faults → defined execution errors. Every command also takes a `Device`
//! parameter (empty: any capable device) and answers the `ExperimentId` of the experiment it
//! became.

use std::collections::HashMap;

use prost::Message as _;
use prost_reflect::{
    DescriptorPool, DynamicMessage, FieldDescriptor, Kind, MessageDescriptor, ReflectMessage,
    Value as ReflectValue,
};

use crate::descriptor;
use crate::error::SilaError;
use crate::fdl::{
    Basic, Command, Constraints, DataType, DataTypeDefinition, DefinedExecutionError, Element,
    Feature, Property, Unit, UnitComponent,
};
use crate::value::{self, Value};

/// Originator of every feature ppud generates.
pub const ORIGINATOR: &str = "ppu";
/// Category of the device-family features.
pub const CATEGORY: &str = "devices";

/// The extra first parameter of every command: which device runs it.
pub const DEVICE: &str = "Device";
/// The extra first response of every command: the experiment it became.
pub const EXPERIMENT_ID: &str = "ExperimentId";
/// Defined execution errors of every family feature.
pub const DEVICE_FAULT: &str = "DeviceFault";
pub const ABORTED: &str = "Aborted";
pub const REFUSED: &str = "Refused";

/// A family's generated feature and what is needed to translate calls to it.
#[derive(Debug, Clone)]
pub struct FamilyFeature {
    /// The family's schema name (`furnace`).
    pub family: String,
    pub feature: Feature,
    pub commands: Vec<FamilyCommand>,
    /// The family's readings, one observable property each.
    pub readings: Vec<FamilyReading>,
}

/// One generated command and the family command message behind it.
#[derive(Debug, Clone)]
pub struct FamilyCommand {
    /// SiLA identifier (`FurnaceProgram`).
    pub identifier: String,
    /// The family's command message (`ppu.devices.furnace.v1.FurnaceProgram`).
    pub message: String,
    /// The capability it needs (`furnace_program`).
    pub capability: String,
    /// The result message, if the command has one.
    pub result: Option<String>,
    /// The intermediate message, if the command has one.
    pub intermediate: Option<String>,
    /// Whether it is a SiLA observable command (the schema's `observable`).
    pub observable: bool,
    /// The command message's descriptor (from the schema's pool).
    pub descriptor: MessageDescriptor,
    pub result_descriptor: Option<MessageDescriptor>,
    pub intermediate_descriptor: Option<MessageDescriptor>,
}

/// One reading of the family as an observable property: a list of `{Device, Value}`.
#[derive(Debug, Clone, PartialEq)]
pub struct FamilyReading {
    /// SiLA property identifier (`PvC`).
    pub identifier: String,
    /// The reading's name in `DeviceReading.values` (`pv_c`).
    pub name: String,
    pub unit: String,
}

/// A call's parameters translated for ppu.
#[derive(Debug, Clone)]
pub struct Call {
    /// The family command message, ready to pack into a step.
    pub command: DynamicMessage,
    /// `Device` parameter; empty for any capable device.
    pub device: String,
}

/// Why a family has no feature.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("family {family}: {reason}")]
pub struct FamilyError {
    pub family: String,
    pub reason: String,
}

/// `temperature_c` → `TemperatureC`, `furnace` → `Furnace`, `FurnaceProgram` stays.
pub fn upper_camel(name: &str) -> String {
    name.split(['_', '-', '.', ' '])
        .filter(|p| !p.is_empty())
        .map(|p| {
            let mut chars = p.chars();
            chars
                .next()
                .map(|c| c.to_ascii_uppercase().to_string() + chars.as_str())
                .unwrap_or_default()
        })
        .collect()
}

/// `RateCPerMin` → `Rate C Per Min`, `FurnaceProgram` → `Furnace Program`: a space before
/// each capital that starts a word (after a lower-case letter or digit, or before a
/// lower-case letter after a capital).
pub fn display_name(identifier: &str) -> String {
    let chars: Vec<char> = identifier.chars().collect();
    let mut out = String::new();
    for (i, &c) in chars.iter().enumerate() {
        if i > 0 && c.is_ascii_uppercase() {
            let previous = chars[i - 1];
            let next_lower = chars.get(i + 1).is_some_and(|n| n.is_ascii_lowercase());
            if previous.is_ascii_lowercase()
                || previous.is_ascii_digit()
                || (previous.is_ascii_uppercase() && next_lower)
            {
                out.push(' ');
            }
        }
        out.push(c);
    }
    out
}

/// The SiLA `Unit` of one of the schema's unit strings: its conversion to SI and its base
/// units. A unit ppu does not know is kept as a dimensionless label (units are informative).
pub fn unit(label: &str) -> Unit {
    const K: &str = "Kelvin";
    const S: &str = "Second";
    const M: &str = "Meter";
    const KG: &str = "Kilogram";
    const MOL: &str = "Mole";
    const A: &str = "Ampere";
    let pressure: &[(&str, i64)] = &[(KG, 1), (M, -1), (S, -2)];
    let flow: &[(&str, i64)] = &[(M, 3), (S, -1)];
    let (factor, offset, components): (f64, f64, &[(&str, i64)]) = match label {
        "°C" | "degC" | "C" => (1.0, 273.15, &[(K, 1)]),
        "K" => (1.0, 0.0, &[(K, 1)]),
        // Rates of temperature are differences: no offset.
        "°C/min" | "K/min" => (1.0 / 60.0, 0.0, &[(K, 1), (S, -1)]),
        "°C/s" | "K/s" => (1.0, 0.0, &[(K, 1), (S, -1)]),
        "ms" => (1e-3, 0.0, &[(S, 1)]),
        "s" => (1.0, 0.0, &[(S, 1)]),
        "min" => (60.0, 0.0, &[(S, 1)]),
        "h" => (3600.0, 0.0, &[(S, 1)]),
        "µL" | "uL" => (1e-9, 0.0, &[(M, 3)]),
        "mL" => (1e-6, 0.0, &[(M, 3)]),
        "L" => (1e-3, 0.0, &[(M, 3)]),
        "µL/min" | "uL/min" => (1e-9 / 60.0, 0.0, flow),
        "mL/min" => (1e-6 / 60.0, 0.0, flow),
        "L/min" => (1e-3 / 60.0, 0.0, flow),
        // Standard cubic centimetres (litres) per minute: volume flow at standard conditions.
        "sccm" => (1e-6 / 60.0, 0.0, flow),
        "slpm" | "slm" => (1e-3 / 60.0, 0.0, flow),
        "µg" | "ug" => (1e-9, 0.0, &[(KG, 1)]),
        "mg" => (1e-6, 0.0, &[(KG, 1)]),
        "g" => (1e-3, 0.0, &[(KG, 1)]),
        "kg" => (1.0, 0.0, &[(KG, 1)]),
        "Pa" => (1.0, 0.0, pressure),
        "hPa" | "mbar" => (100.0, 0.0, pressure),
        "kPa" => (1e3, 0.0, pressure),
        "MPa" => (1e6, 0.0, pressure),
        "bar" => (1e5, 0.0, pressure),
        "psi" | "psia" => (6_894.757_293_168, 0.0, pressure),
        "Torr" | "torr" => (101_325.0 / 760.0, 0.0, pressure),
        "mmol/g" | "mol/kg" => (1.0, 0.0, &[(MOL, 1), (KG, -1)]),
        "µmol/g" | "umol/g" | "mmol/kg" => (1e-3, 0.0, &[(MOL, 1), (KG, -1)]),
        "mol" => (1.0, 0.0, &[(MOL, 1)]),
        "mmol" => (1e-3, 0.0, &[(MOL, 1)]),
        "m" => (1.0, 0.0, &[(M, 1)]),
        "cm" => (1e-2, 0.0, &[(M, 1)]),
        "mm" => (1e-3, 0.0, &[(M, 1)]),
        "rpm" => (1.0 / 60.0, 0.0, &[(S, -1)]),
        "Hz" => (1.0, 0.0, &[(S, -1)]),
        "A" => (1.0, 0.0, &[(A, 1)]),
        "mA" => (1e-3, 0.0, &[(A, 1)]),
        "V" => (1.0, 0.0, &[(KG, 1), (M, 2), (S, -3), (A, -1)]),
        "W" => (1.0, 0.0, &[(KG, 1), (M, 2), (S, -3)]),
        "%" => (0.01, 0.0, &[("Dimensionless", 1)]),
        _ => return Unit::dimensionless(label),
    };
    Unit {
        label: label.to_owned(),
        factor,
        offset,
        components: components
            .iter()
            .map(|(si_unit, exponent)| UnitComponent {
                si_unit: (*si_unit).to_owned(),
                exponent: *exponent,
            })
            .collect(),
    }
}

/// The generator's state: the data type definitions made so far, one per message type.
struct Generator<'a> {
    schema: &'a ppu_schema::Schema,
    family: &'a str,
    definitions: Vec<DataTypeDefinition>,
    /// Message full name → definition identifier.
    by_message: HashMap<String, String>,
}

impl FamilyFeature {
    /// Generates the feature of `family` from `schema`.
    pub fn generate(
        schema: &ppu_schema::Schema,
        family: &str,
    ) -> Result<FamilyFeature, FamilyError> {
        let fail = |reason: String| FamilyError {
            family: family.to_owned(),
            reason,
        };
        let f = schema
            .family(family)
            .ok_or_else(|| fail("no such family in the schema".into()))?;
        let identifier = upper_camel(family);
        let mut g = Generator {
            schema,
            family,
            definitions: Vec::new(),
            by_message: HashMap::new(),
        };
        let errors = vec![
            DEVICE_FAULT.to_owned(),
            ABORTED.to_owned(),
            REFUSED.to_owned(),
        ];
        let mut commands = Vec::new();
        let mut sila_commands = Vec::new();
        for full_name in &f.commands {
            let c = schema
                .command(full_name)
                .ok_or_else(|| fail(format!("command {full_name} is not indexed")))?;
            let id = upper_camel(c.message.name());
            let mut parameters = vec![Element {
                identifier: DEVICE.into(),
                display_name: "Device".into(),
                description: "The id of the device to run on (as ppu's configuration names it); \
                              empty for any capable device."
                    .into(),
                data_type: DataType::Basic(Basic::String),
            }];
            parameters.extend(g.elements(&c.message)?);
            let mut responses = vec![Element {
                identifier: EXPERIMENT_ID.into(),
                display_name: "Experiment Id".into(),
                description: "The id (ULID) of the experiment this call became in ppu's queue."
                    .into(),
                data_type: DataType::Basic(Basic::String),
            }];
            if let Some(result) = &c.result {
                responses.extend(g.elements(result)?);
            }
            let intermediate_responses = match (&c.intermediate, c.options.observable) {
                (Some(m), true) => g.elements(m)?,
                _ => Vec::new(),
            };
            for (what, list) in [("parameter", &parameters), ("response", &responses)] {
                let mut seen = std::collections::HashSet::new();
                if let Some(dup) = list.iter().find(|e| !seen.insert(e.identifier.as_str())) {
                    return Err(fail(format!("{id}: two {what}s {}", dup.identifier)));
                }
            }
            let description = comment_of_message(&c.message)
                .unwrap_or_else(|| format!("Runs the family's `{}` command.", c.name()));
            sila_commands.push(Command {
                identifier: id.clone(),
                display_name: display_name(&id),
                description: format!(
                    "{description} Becomes an experiment in ppu's queue (capability `{}`); {}",
                    c.capability(),
                    if c.options.observable {
                        "its execution follows the experiment."
                    } else {
                        "the call returns when the experiment has finished."
                    }
                ),
                observable: c.options.observable,
                parameters,
                responses,
                intermediate_responses,
                errors: errors.clone(),
            });
            commands.push(FamilyCommand {
                identifier: id,
                message: c.full_name().to_owned(),
                capability: c.capability().to_owned(),
                result: c.result.as_ref().map(|m| m.full_name().to_owned()),
                intermediate: c.intermediate.as_ref().map(|m| m.full_name().to_owned()),
                observable: c.options.observable,
                descriptor: c.message.clone(),
                result_descriptor: c.result.clone(),
                intermediate_descriptor: c.intermediate.clone(),
            });
        }
        let mut readings = Vec::new();
        let mut properties = Vec::new();
        for r in &f.options.readings {
            let id = upper_camel(&r.name);
            let value_type = if r.unit.is_empty() {
                DataType::Basic(Basic::Real)
            } else {
                DataType::Constrained(
                    Box::new(DataType::Basic(Basic::Real)),
                    Box::new(Constraints {
                        unit: Some(unit(&r.unit)),
                        ..Constraints::default()
                    }),
                )
            };
            let label = if r.label.is_empty() {
                &r.name
            } else {
                &r.label
            };
            properties.push(Property {
                identifier: id.clone(),
                display_name: display_name(&id),
                description: format!(
                    "The latest `{}` reading ({label}{}) of every device of the family that reports it.",
                    r.name,
                    if r.unit.is_empty() { String::new() } else { format!(", {}", r.unit) }
                ),
                observable: true,
                data_type: DataType::List(Box::new(DataType::Structure(vec![
                    Element {
                        identifier: DEVICE.into(),
                        display_name: "Device".into(),
                        description: "The device's id.".into(),
                        data_type: DataType::Basic(Basic::String),
                    },
                    Element {
                        identifier: "Value".into(),
                        display_name: "Value".into(),
                        description: format!("The reading, {label}."),
                        data_type: value_type,
                    },
                ]))),
                errors: Vec::new(),
            });
            readings.push(FamilyReading {
                identifier: id,
                name: r.name.clone(),
                unit: r.unit.clone(),
            });
        }
        let mut description = f.options.description.trim().to_owned();
        if !description.is_empty() && !description.ends_with('.') {
            description.push('.');
        }
        if !f.options.safe_state.is_empty() {
            description.push_str(&format!(" Safe state: {}.", f.options.safe_state.trim()));
        }
        description.push_str(&format!(
            " Generated by ppu from the `{family}` family schema; every command runs as an \
             experiment in ppu's durable queue."
        ));
        let feature = Feature {
            sila2_version: "1.0".into(),
            feature_version: "1.0".into(),
            maturity_level: "Draft".into(),
            originator: ORIGINATOR.into(),
            category: CATEGORY.into(),
            locale: "en-us".into(),
            display_name: display_name(&identifier),
            identifier,
            description: description.trim().to_owned(),
            commands: sila_commands,
            properties,
            metadata: Vec::new(),
            errors: vec![
                DefinedExecutionError {
                    identifier: DEVICE_FAULT.into(),
                    display_name: "Device Fault".into(),
                    description: "The device reported a fault or stopped answering; it has been \
                                  driven to its safe state."
                        .into(),
                },
                DefinedExecutionError {
                    identifier: ABORTED.into(),
                    display_name: "Aborted".into(),
                    description: "The experiment was cancelled or interrupted before it finished."
                        .into(),
                },
                DefinedExecutionError {
                    identifier: REFUSED.into(),
                    display_name: "Refused".into(),
                    description: "ppu refused the command when it came to run (the device's \
                                  limits, accepted values or state)."
                        .into(),
                },
            ],
            data_types: g.definitions,
        };
        descriptor::file_descriptor(&feature).map_err(|e| fail(e.reason))?;
        Ok(FamilyFeature {
            family: family.to_owned(),
            feature,
            commands,
            readings,
        })
    }

    pub fn command(&self, identifier: &str) -> Option<&FamilyCommand> {
        self.commands.iter().find(|c| c.identifier == identifier)
    }

    /// The fully qualified identifier of a parameter of a command.
    pub fn parameter_identifier(&self, command: &str, parameter: &str) -> String {
        format!(
            "{}/Command/{command}/Parameter/{parameter}",
            self.feature.fully_qualified_identifier()
        )
    }

    /// The fully qualified identifier of one of the defined execution errors
    /// ([`DEVICE_FAULT`], [`ABORTED`], [`REFUSED`]).
    pub fn error_identifier(&self, error: &str) -> String {
        format!(
            "{}/DefinedExecutionError/{error}",
            self.feature.fully_qualified_identifier()
        )
    }

    fn find(&self, command: &str) -> Result<(&FamilyCommand, &Command), SilaError> {
        let unknown = || SilaError::UndefinedExecution {
            message: format!(
                "{} has no command {command}",
                self.feature.fully_qualified_identifier()
            ),
        };
        let fc = self.command(command).ok_or_else(unknown)?;
        let sc = self.feature.command(command).ok_or_else(unknown)?;
        Ok((fc, sc))
    }

    /// Translates a `<Command>_Parameters` message into the family's command; a value that
    /// breaks a static constraint is a [`SilaError::Validation`] naming the parameter.
    /// (Device-dependent limits and accepted values are checked by ppu's submit path.)
    pub fn call(&self, command: &str, parameters: &DynamicMessage) -> Result<Call, SilaError> {
        let (fc, sc) = self.find(command)?;
        let invalid = |e: value::ValueError| {
            let parameter = e
                .path
                .split(['.', '['])
                .next()
                .unwrap_or_default()
                .to_owned();
            SilaError::Validation {
                parameter: self.parameter_identifier(command, &parameter),
                message: e.to_string(),
            }
        };
        let values = value::from_message(parameters).map_err(invalid)?;
        value::check_parameters(&self.feature, sc, &values)?;
        let mut device = String::new();
        let mut elements = Vec::new();
        for (name, v) in values {
            match v {
                Value::String(d) if name == DEVICE => device = d,
                v => elements.push((name, v)),
            }
        }
        let command = to_proto(&fc.descriptor, &elements, "").map_err(invalid)?;
        Ok(Call { command, device })
    }

    /// The `<Command>_Responses` message for a step's result (`output`: the family's result
    /// message, packed) and the experiment id.
    pub fn responses(
        &self,
        pool: &DescriptorPool,
        command: &str,
        output: Option<&prost_types::Any>,
        experiment_id: &str,
    ) -> Result<DynamicMessage, SilaError> {
        let (fc, _) = self.find(command)?;
        let mut values = vec![(
            EXPERIMENT_ID.to_owned(),
            Value::String(experiment_id.to_owned()),
        )];
        if let Some(result) = &fc.result_descriptor {
            let message = match output {
                Some(any) => unpack(result, any)?,
                None => DynamicMessage::new(result.clone()),
            };
            values.extend(from_proto(&message).map_err(undefined)?);
        }
        let name = descriptor::message_name(&self.feature, &format!("{command}_Responses"));
        build(pool, &name, &values)
    }

    /// The `<Command>_IntermediateResponses` message for one intermediate value.
    pub fn intermediate(
        &self,
        pool: &DescriptorPool,
        command: &str,
        value: &prost_types::Any,
    ) -> Result<DynamicMessage, SilaError> {
        let (fc, sc) = self.find(command)?;
        let Some(intermediate) = fc
            .intermediate_descriptor
            .as_ref()
            .filter(|_| sc.observable)
        else {
            return Err(SilaError::UndefinedExecution {
                message: format!("{command} has no intermediate responses"),
            });
        };
        let message = unpack(intermediate, value)?;
        let values = from_proto(&message).map_err(undefined)?;
        let name =
            descriptor::message_name(&self.feature, &format!("{command}_IntermediateResponses"));
        build(pool, &name, &values)
    }

    /// The response of the reading property `property` (`Subscribe_<Property>_Responses`):
    /// one `{Device, Value}` per device, in the order given.
    pub fn reading(
        &self,
        pool: &DescriptorPool,
        property: &str,
        values: &[(String, f64)],
    ) -> Result<DynamicMessage, SilaError> {
        if !self.readings.iter().any(|r| r.identifier == property) {
            return Err(SilaError::UndefinedExecution {
                message: format!("no reading property {property}"),
            });
        }
        let list = values
            .iter()
            .map(|(device, v)| {
                Value::Structure(vec![
                    (DEVICE.to_owned(), Value::String(device.clone())),
                    ("Value".to_owned(), Value::Real(*v)),
                ])
            })
            .collect();
        let name = descriptor::message_name(
            &self.feature,
            &format!(
                "{}_Responses",
                descriptor::rpc::subscribe_property(property)
            ),
        );
        build(pool, &name, &[(property.to_owned(), Value::List(list))])
    }
}

fn undefined(e: value::ValueError) -> SilaError {
    SilaError::UndefinedExecution {
        message: e.to_string(),
    }
}

fn build(
    pool: &DescriptorPool,
    name: &str,
    values: &[(String, Value)],
) -> Result<DynamicMessage, SilaError> {
    let d = pool
        .get_message_by_name(name)
        .ok_or_else(|| SilaError::UndefinedExecution {
            message: format!("{name} is not in the descriptor pool"),
        })?;
    value::to_message(&d, values).map_err(undefined)
}

fn unpack(
    expected: &MessageDescriptor,
    any: &prost_types::Any,
) -> Result<DynamicMessage, SilaError> {
    let name = ppu_schema::type_name(&any.type_url);
    if name != expected.full_name() {
        return Err(SilaError::UndefinedExecution {
            message: format!("expected a {}, got a {name}", expected.full_name()),
        });
    }
    DynamicMessage::decode(expected.clone(), any.value.as_slice()).map_err(|e| {
        SilaError::UndefinedExecution {
            message: format!("{name} does not decode: {e}"),
        }
    })
}

/// A field is an "optional" element (a list of at most one) when proto3 tracks its presence
/// explicitly: `optional` scalars and oneof members.
fn is_optional(field: &FieldDescriptor) -> bool {
    field.containing_oneof().is_some() && !field.is_list()
}

impl Generator<'_> {
    fn fail(&self, reason: String) -> FamilyError {
        FamilyError {
            family: self.family.to_owned(),
            reason,
        }
    }

    /// One element per field of `message`.
    fn elements(&mut self, message: &MessageDescriptor) -> Result<Vec<Element>, FamilyError> {
        let mut out: Vec<Element> = Vec::new();
        for field in message.fields() {
            let identifier = upper_camel(field.name());
            if out.iter().any(|e| e.identifier == identifier) {
                return Err(self.fail(format!(
                    "{}: two fields are {identifier} in SiLA",
                    message.full_name()
                )));
            }
            let data_type = self.field_type(&field)?;
            let description = self.field_description(&field);
            out.push(Element {
                display_name: display_name(&identifier),
                identifier,
                description,
                data_type,
            });
        }
        Ok(out)
    }

    fn field_type(&mut self, field: &FieldDescriptor) -> Result<DataType, FamilyError> {
        if field.is_map() {
            return Err(self.fail(format!(
                "{}: map fields have no SiLA mapping yet",
                field.full_name()
            )));
        }
        let options = self.schema.field_options(field);
        let item = match field.kind() {
            Kind::Message(m) => DataType::Identifier(self.definition(&m)?),
            kind => {
                let (basic, mut c) = scalar(&kind);
                if !options.unit.is_empty() {
                    c.unit = Some(unit(&options.unit));
                }
                // A 0 that means "the device's default" passes every bound: no static bound.
                if !options.zero_is_default {
                    let number = |v: f64| {
                        if basic == Basic::Integer && v.fract() == 0.0 {
                            format!("{v:.0}")
                        } else {
                            v.to_string()
                        }
                    };
                    if let Some(min) = options.min {
                        if options.exclusive_min {
                            c.minimal_exclusive = Some(number(min));
                        } else {
                            c.minimal_inclusive = Some(number(min));
                        }
                    }
                    if let Some(max) = options.max {
                        c.maximal_inclusive = Some(number(max));
                    }
                }
                if options.required && basic == Basic::String {
                    c.minimal_length = Some(1);
                }
                constrained(DataType::Basic(basic), c)
            }
        };
        if field.is_list() {
            let mut c = Constraints::default();
            if options.min_items > 0 {
                c.minimal_element_count = Some(u64::from(options.min_items));
            }
            return Ok(constrained(DataType::List(Box::new(item)), c));
        }
        if is_optional(field) {
            return Ok(constrained(
                DataType::List(Box::new(item)),
                Constraints {
                    maximal_element_count: Some(1),
                    ..Constraints::default()
                },
            ));
        }
        Ok(item)
    }

    /// The data type definition of a message type, made on first use.
    fn definition(&mut self, message: &MessageDescriptor) -> Result<String, FamilyError> {
        if let Some(id) = self.by_message.get(message.full_name()) {
            return Ok(id.clone());
        }
        let id = upper_camel(message.name());
        if self.definitions.iter().any(|d| d.identifier == id) {
            return Err(self.fail(format!(
                "{} and another message are both the data type {id}",
                message.full_name()
            )));
        }
        // Registered before its fields, so a message that contains itself refers to itself.
        self.by_message
            .insert(message.full_name().to_owned(), id.clone());
        let index = self.definitions.len();
        self.definitions.push(DataTypeDefinition {
            identifier: id.clone(),
            display_name: display_name(&id),
            description: String::new(),
            data_type: DataType::Basic(Basic::String),
        });
        let elements = self.elements(message)?;
        let mut description = comment_of_message(message)
            .unwrap_or_else(|| format!("The family's `{}` message.", message.name()));
        let oneofs: Vec<String> = message
            .oneofs()
            .filter(|o| !o.is_synthetic())
            .map(|o| {
                o.fields()
                    .map(|f| upper_camel(f.name()))
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .collect();
        for members in oneofs {
            description.push_str(&format!(" At most one of {members} has an item."));
        }
        let data_type = if elements.is_empty() {
            // A structure needs an element; an empty message is an empty string.
            constrained(
                DataType::Basic(Basic::String),
                Constraints {
                    length: Some(0),
                    ..Constraints::default()
                },
            )
        } else {
            DataType::Structure(elements)
        };
        self.definitions[index] = DataTypeDefinition {
            identifier: id.clone(),
            display_name: display_name(&id),
            description,
            data_type,
        };
        Ok(id)
    }

    fn field_description(&self, field: &FieldDescriptor) -> String {
        let options = self.schema.field_options(field);
        let mut out = comment(&field.parent_file(), field.path()).unwrap_or_else(|| {
            format!(
                "The `{}` of {}.",
                field.name(),
                field.parent_message().name()
            )
        });
        let mut note = |s: String| {
            if !out.ends_with('.') {
                out.push('.');
            }
            out.push(' ');
            out.push_str(&s);
        };
        if !options.unit.is_empty() {
            note(format!("In {}.", options.unit));
        }
        if !options.max_limit.is_empty() {
            note(format!(
                "At most the device's limit `{}`.",
                options.max_limit
            ));
        }
        if !options.min_limit.is_empty() {
            note(format!(
                "At least the device's limit `{}`.",
                options.min_limit
            ));
        }
        if !options.accepted.is_empty() {
            note(format!(
                "One of the device's accepted `{}` values.",
                options.accepted
            ));
        }
        if options.zero_is_default {
            note("0 means the device's default.".into());
        }
        if !options.max_items_limit.is_empty() {
            note(format!(
                "At most `{}` items (ppu's limits).",
                options.max_items_limit
            ));
        }
        if options.increasing {
            note("Strictly increasing.".into());
        }
        if !options.example.is_empty() {
            note(format!("E.g. {}.", options.example));
        }
        if is_optional(field) {
            note("An empty list when not set.".into());
        }
        out
    }
}

fn constrained(t: DataType, c: Constraints) -> DataType {
    if c == Constraints::default() {
        t
    } else {
        DataType::Constrained(Box::new(t), Box::new(c))
    }
}

/// The SiLA basic type of a scalar kind, and the constraints the kind itself implies.
fn scalar(kind: &Kind) -> (Basic, Constraints) {
    let mut c = Constraints::default();
    let basic = match kind {
        Kind::Double | Kind::Float => Basic::Real,
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => {
            c.minimal_inclusive = Some(i32::MIN.to_string());
            c.maximal_inclusive = Some(i32::MAX.to_string());
            Basic::Integer
        }
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => Basic::Integer,
        Kind::Uint32 | Kind::Fixed32 => {
            c.minimal_inclusive = Some("0".into());
            c.maximal_inclusive = Some(u32::MAX.to_string());
            Basic::Integer
        }
        Kind::Uint64 | Kind::Fixed64 => {
            c.minimal_inclusive = Some("0".into());
            Basic::Integer
        }
        Kind::Bool => Basic::Boolean,
        Kind::String => Basic::String,
        Kind::Bytes => Basic::Binary,
        Kind::Enum(e) => {
            c.set = e.values().map(|v| v.name().to_owned()).collect();
            Basic::String
        }
        Kind::Message(_) => Basic::String,
    };
    (basic, c)
}

/// A message's leading comment from its file's source info, if the descriptor carries it.
fn comment_of_message(message: &MessageDescriptor) -> Option<String> {
    comment(&message.parent_file(), message.path())
}

fn comment(file: &prost_reflect::FileDescriptor, path: &[i32]) -> Option<String> {
    let info = file.file_descriptor_proto().source_code_info.as_ref()?;
    let location = info.location.iter().find(|l| l.path == path)?;
    let text = location.leading_comments.as_deref()?;
    let joined = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    (!joined.is_empty()).then_some(joined)
}

/// SiLA element values (by identifier) into the family message `descriptor`.
fn to_proto(
    descriptor: &MessageDescriptor,
    values: &[(String, Value)],
    path: &str,
) -> Result<DynamicMessage, value::ValueError> {
    let fail = |p: &str, reason: String| value::ValueError {
        path: p.to_owned(),
        reason,
    };
    let mut message = DynamicMessage::new(descriptor.clone());
    let mut set_members: HashMap<String, String> = HashMap::new();
    for field in descriptor.fields() {
        let id = upper_camel(field.name());
        let p = if path.is_empty() {
            id.clone()
        } else {
            format!("{path}.{id}")
        };
        let Some((_, v)) = values.iter().find(|(name, _)| *name == id) else {
            continue;
        };
        if field.is_list() {
            let Value::List(items) = v else {
                return Err(fail(&p, format!("expected a list, got {}", v.kind())));
            };
            let items = items
                .iter()
                .enumerate()
                .map(|(i, item)| scalar_to_proto(&field, item, &format!("{p}[{i}]")))
                .collect::<Result<Vec<_>, _>>()?;
            message.set_field(&field, ReflectValue::List(items));
        } else if is_optional(&field) {
            let Value::List(items) = v else {
                return Err(fail(&p, format!("expected a list, got {}", v.kind())));
            };
            match items.as_slice() {
                [] => {}
                [item] => {
                    if let Some(oneof) = field.containing_oneof().filter(|o| !o.is_synthetic())
                        && let Some(other) = set_members.insert(oneof.name().to_owned(), id.clone())
                    {
                        return Err(fail(
                            &p,
                            format!("{other} and {id} are alternatives: set only one"),
                        ));
                    }
                    let v = scalar_to_proto(&field, item, &format!("{p}[0]"))?;
                    message.set_field(&field, v);
                }
                _ => return Err(fail(&p, "at most one item".into())),
            }
        } else {
            message.set_field(&field, scalar_to_proto(&field, v, &p)?);
        }
    }
    Ok(message)
}

/// One (non-repeated) value of `field`'s kind.
fn scalar_to_proto(
    field: &FieldDescriptor,
    v: &Value,
    path: &str,
) -> Result<ReflectValue, value::ValueError> {
    let fail = |reason: String| value::ValueError {
        path: path.to_owned(),
        reason,
    };
    let range = |i: &i64| fail(format!("{i} is out of range for {}", field.name()));
    Ok(match (field.kind(), v) {
        (Kind::Double, Value::Real(r)) => ReflectValue::F64(*r),
        (Kind::Double, Value::Integer(i)) => ReflectValue::F64(*i as f64),
        (Kind::Float, Value::Real(r)) => ReflectValue::F32(*r as f32),
        (Kind::Float, Value::Integer(i)) => ReflectValue::F32(*i as f32),
        (Kind::Int32 | Kind::Sint32 | Kind::Sfixed32, Value::Integer(i)) => {
            ReflectValue::I32(i32::try_from(*i).map_err(|_| range(i))?)
        }
        (Kind::Int64 | Kind::Sint64 | Kind::Sfixed64, Value::Integer(i)) => ReflectValue::I64(*i),
        (Kind::Uint32 | Kind::Fixed32, Value::Integer(i)) => {
            ReflectValue::U32(u32::try_from(*i).map_err(|_| range(i))?)
        }
        (Kind::Uint64 | Kind::Fixed64, Value::Integer(i)) => {
            ReflectValue::U64(u64::try_from(*i).map_err(|_| range(i))?)
        }
        (Kind::Bool, Value::Boolean(b)) => ReflectValue::Bool(*b),
        (Kind::String, Value::String(s)) => ReflectValue::String(s.clone()),
        (Kind::Bytes, Value::Binary(b)) => ReflectValue::Bytes(b.clone().into()),
        (Kind::Enum(e), Value::String(s)) => ReflectValue::EnumNumber(
            e.get_value_by_name(s)
                .ok_or_else(|| fail(format!("{s:?} is not a value of {}", e.name())))?
                .number(),
        ),
        (Kind::Message(m), Value::Structure(elements)) => {
            ReflectValue::Message(to_proto(&m, elements, path)?)
        }
        // An empty message travels as an empty string (a structure needs an element).
        (Kind::Message(m), Value::String(_)) if m.fields().len() == 0 => {
            ReflectValue::Message(DynamicMessage::new(m))
        }
        (kind, v) => return Err(fail(format!("{} does not fit {kind:?}", v.kind()))),
    })
}

/// A family message as SiLA element values, by identifier, in field order.
fn from_proto(message: &DynamicMessage) -> Result<Vec<(String, Value)>, value::ValueError> {
    let mut out = Vec::new();
    for field in message.descriptor().fields() {
        let id = upper_camel(field.name());
        let v = if field.is_list() {
            let items = match &*message.get_field(&field) {
                ReflectValue::List(items) => items
                    .iter()
                    .map(|item| scalar_from_proto(item, &field.kind(), &id))
                    .collect::<Result<Vec<_>, _>>()?,
                _ => Vec::new(),
            };
            Value::List(items)
        } else if is_optional(&field) {
            if message.has_field(&field) {
                Value::List(vec![scalar_from_proto(
                    &message.get_field(&field),
                    &field.kind(),
                    &id,
                )?])
            } else {
                Value::List(Vec::new())
            }
        } else {
            scalar_from_proto(&message.get_field(&field), &field.kind(), &id)?
        };
        out.push((id, v));
    }
    Ok(out)
}

fn scalar_from_proto(
    v: &ReflectValue,
    kind: &Kind,
    path: &str,
) -> Result<Value, value::ValueError> {
    let fail = |reason: &str| value::ValueError {
        path: path.to_owned(),
        reason: reason.to_owned(),
    };
    Ok(match v {
        ReflectValue::F64(x) => Value::Real(*x),
        ReflectValue::F32(x) => Value::Real(f64::from(*x)),
        ReflectValue::I32(x) => Value::Integer(i64::from(*x)),
        ReflectValue::I64(x) => Value::Integer(*x),
        ReflectValue::U32(x) => Value::Integer(i64::from(*x)),
        ReflectValue::U64(x) => {
            Value::Integer(i64::try_from(*x).map_err(|_| fail("above the SiLA Integer range"))?)
        }
        ReflectValue::Bool(b) => Value::Boolean(*b),
        ReflectValue::String(s) => Value::String(s.clone()),
        ReflectValue::Bytes(b) => Value::Binary(b.to_vec()),
        // By name, as the feature's `Set` lists them; a number the enum does not know (a newer
        // peer) as its digits.
        ReflectValue::EnumNumber(n) => Value::String(match kind {
            Kind::Enum(e) => e
                .get_value(*n)
                .map_or_else(|| n.to_string(), |v| v.name().to_owned()),
            _ => n.to_string(),
        }),
        ReflectValue::Message(m) => {
            if m.descriptor().fields().len() == 0 {
                Value::String(String::new())
            } else {
                Value::Structure(from_proto(m)?)
            }
        }
        ReflectValue::List(_) | ReflectValue::Map(_) => return Err(fail("nested list")),
    })
}

/// Packs a family message as `google.protobuf.Any` (what a step's command or result is).
pub fn pack(message: &DynamicMessage) -> prost_types::Any {
    prost_types::Any {
        type_url: ppu_schema::type_url(message.descriptor().full_name()),
        value: message.encode_to_vec(),
    }
}
