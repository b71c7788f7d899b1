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
use prost_types::FileDescriptorProto;

use crate::fdl::Feature;

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

/// The feature's `.proto` file as a descriptor (it imports the framework file).
pub fn file_descriptor(feature: &Feature) -> Result<FileDescriptorProto, DescriptorError> {
    let _ = feature;
    todo!("ppu-sila: Part B mapping")
}

/// A pool holding the framework file and every feature's file.
pub fn pool(features: &[Feature]) -> Result<DescriptorPool, DescriptorError> {
    let _ = features;
    todo!("ppu-sila: pool")
}
