//! SiLA errors as they cross the wire: a `sila2.org.silastandard.SiLAError`, serialized and
//! base64-encoded, as the details of a gRPC status with code `ABORTED` (Part B, "Error
//! Handling"). Transport-neutral: the daemon's edge builds the status, the driver reads it.

/// The four kinds of SiLA error.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SilaError {
    /// A parameter is invalid; `parameter` is its fully qualified identifier
    /// (`ppu/devices/Furnace/v1/Command/RunProgram/Parameter/Segments`).
    #[error("validation error for {parameter}: {message}")]
    Validation { parameter: String, message: String },
    /// An error the feature defines; `identifier` is its fully qualified identifier
    /// (`…/DefinedExecutionError/DeviceFault`).
    #[error("{identifier}: {message}")]
    DefinedExecution { identifier: String, message: String },
    #[error("execution error: {message}")]
    UndefinedExecution { message: String },
    #[error("framework error ({kind:?}): {message}")]
    Framework {
        kind: FrameworkErrorKind,
        message: String,
    },
}

/// `FrameworkError.ErrorType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameworkErrorKind {
    CommandExecutionNotAccepted,
    InvalidCommandExecutionUuid,
    CommandExecutionNotFinished,
    InvalidMetadata,
    NoMetadataAllowed,
}

/// Why status details are not a SiLA error.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("not a SiLA error: {0}")]
pub struct NotSilaError(pub String);

impl SilaError {
    /// The details string of the `ABORTED` status that carries this error.
    pub fn to_details(&self) -> String {
        todo!("ppu-sila: encode SiLAError")
    }

    /// Reads the details of an `ABORTED` status.
    pub fn from_details(details: &[u8]) -> Result<SilaError, NotSilaError> {
        let _ = details;
        todo!("ppu-sila: decode SiLAError")
    }
}
