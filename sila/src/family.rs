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

use prost_reflect::DynamicMessage;

use crate::error::SilaError;
use crate::fdl::Feature;

/// Originator of every feature ppud generates.
pub const ORIGINATOR: &str = "ppu";
/// Category of the device-family features.
pub const CATEGORY: &str = "devices";

/// A family's generated feature and what is needed to translate calls to it.
#[derive(Debug, Clone)]
pub struct FamilyFeature {
    /// The family's schema name (`furnace`).
    pub family: String,
    pub feature: Feature,
    pub commands: Vec<FamilyCommand>,
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

impl FamilyFeature {
    /// Generates the feature of `family` from `schema`.
    pub fn generate(
        schema: &ppu_schema::Schema,
        family: &str,
    ) -> Result<FamilyFeature, FamilyError> {
        let _ = (schema, family);
        todo!("ppu-sila: family feature")
    }

    pub fn command(&self, identifier: &str) -> Option<&FamilyCommand> {
        self.commands.iter().find(|c| c.identifier == identifier)
    }

    /// Translates a `<Command>_Parameters` message into the family's command; a value that
    /// breaks a static constraint is a [`SilaError::Validation`] naming the parameter.
    pub fn call(&self, command: &str, parameters: &DynamicMessage) -> Result<Call, SilaError> {
        let _ = (command, parameters);
        todo!("ppu-sila: parameters to family command")
    }

    /// The `<Command>_Responses` message for a step's result (`output`: the family's result
    /// message, packed) and the experiment id.
    pub fn responses(
        &self,
        pool: &prost_reflect::DescriptorPool,
        command: &str,
        output: Option<&prost_types::Any>,
        experiment_id: &str,
    ) -> Result<DynamicMessage, SilaError> {
        let _ = (pool, command, output, experiment_id);
        todo!("ppu-sila: family result to responses")
    }

    /// The `<Command>_IntermediateResponses` message for one intermediate value.
    pub fn intermediate(
        &self,
        pool: &prost_reflect::DescriptorPool,
        command: &str,
        value: &prost_types::Any,
    ) -> Result<DynamicMessage, SilaError> {
        let _ = (pool, command, value);
        todo!("ppu-sila: intermediate")
    }
}
