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
        todo!("ppu-sila: FDL writer")
    }

    /// Reads a feature definition; any deviation from the schema's structure is an error
    /// naming where it is.
    pub fn from_xml(xml: &str) -> Result<Feature, FdlError> {
        let _ = xml;
        todo!("ppu-sila: FDL reader")
    }

    pub fn command(&self, identifier: &str) -> Option<&Command> {
        self.commands.iter().find(|c| c.identifier == identifier)
    }

    pub fn property(&self, identifier: &str) -> Option<&Property> {
        self.properties.iter().find(|p| p.identifier == identifier)
    }
}
