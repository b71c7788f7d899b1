//! SiLA errors as they cross the wire: a `sila2.org.silastandard.SiLAError`, serialized and
//! base64-encoded, as the details of a gRPC status with code `ABORTED` (Part B, "Error
//! Handling"). Transport-neutral: the daemon's edge builds the status, the driver reads it.

use prost::Message;

use crate::framework;

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
    /// The details string of the `ABORTED` status that carries this error: the serialized
    /// `SiLAError`, standard base64 with padding.
    pub fn to_details(&self) -> String {
        base64::encode(&self.to_message().encode_to_vec())
    }

    /// Reads the details of an `ABORTED` status.
    pub fn from_details(details: &[u8]) -> Result<SilaError, NotSilaError> {
        let text = std::str::from_utf8(details)
            .map_err(|_| NotSilaError("details are not text".into()))?;
        let bytes = base64::decode(text.trim())
            .ok_or_else(|| NotSilaError("details are not base64".into()))?;
        let message = framework::SiLaError::decode(bytes.as_slice())
            .map_err(|e| NotSilaError(format!("details are not a SiLAError: {e}")))?;
        SilaError::from_message(message)
    }

    /// The framework message.
    pub fn to_message(&self) -> framework::SiLaError {
        use framework::si_la_error::Error;
        let error = match self {
            SilaError::Validation { parameter, message } => {
                Error::ValidationError(framework::ValidationError {
                    parameter: parameter.clone(),
                    message: message.clone(),
                })
            }
            SilaError::DefinedExecution {
                identifier,
                message,
            } => Error::DefinedExecutionError(framework::DefinedExecutionError {
                error_identifier: identifier.clone(),
                message: message.clone(),
            }),
            SilaError::UndefinedExecution { message } => {
                Error::UndefinedExecutionError(framework::UndefinedExecutionError {
                    message: message.clone(),
                })
            }
            SilaError::Framework { kind, message } => {
                Error::FrameworkError(framework::FrameworkError {
                    error_type: kind.to_wire() as i32,
                    message: message.clone(),
                })
            }
        };
        framework::SiLaError { error: Some(error) }
    }

    /// Reads the framework message; one without an error set is not a SiLA error.
    pub fn from_message(message: framework::SiLaError) -> Result<SilaError, NotSilaError> {
        use framework::si_la_error::Error;
        Ok(match message.error {
            Some(Error::ValidationError(e)) => SilaError::Validation {
                parameter: e.parameter,
                message: e.message,
            },
            Some(Error::DefinedExecutionError(e)) => SilaError::DefinedExecution {
                identifier: e.error_identifier,
                message: e.message,
            },
            Some(Error::UndefinedExecutionError(e)) => {
                SilaError::UndefinedExecution { message: e.message }
            }
            Some(Error::FrameworkError(e)) => SilaError::Framework {
                kind: FrameworkErrorKind::from_wire(e.error_type)
                    .ok_or_else(|| NotSilaError(format!("unknown error type {}", e.error_type)))?,
                message: e.message,
            },
            None => return Err(NotSilaError("SiLAError without an error".into())),
        })
    }
}

impl FrameworkErrorKind {
    fn to_wire(self) -> framework::framework_error::ErrorType {
        use framework::framework_error::ErrorType;
        match self {
            FrameworkErrorKind::CommandExecutionNotAccepted => {
                ErrorType::CommandExecutionNotAccepted
            }
            FrameworkErrorKind::InvalidCommandExecutionUuid => {
                ErrorType::InvalidCommandExecutionUuid
            }
            FrameworkErrorKind::CommandExecutionNotFinished => {
                ErrorType::CommandExecutionNotFinished
            }
            FrameworkErrorKind::InvalidMetadata => ErrorType::InvalidMetadata,
            FrameworkErrorKind::NoMetadataAllowed => ErrorType::NoMetadataAllowed,
        }
    }

    fn from_wire(value: i32) -> Option<FrameworkErrorKind> {
        use framework::framework_error::ErrorType;
        Some(match ErrorType::try_from(value).ok()? {
            ErrorType::CommandExecutionNotAccepted => {
                FrameworkErrorKind::CommandExecutionNotAccepted
            }
            ErrorType::InvalidCommandExecutionUuid => {
                FrameworkErrorKind::InvalidCommandExecutionUuid
            }
            ErrorType::CommandExecutionNotFinished => {
                FrameworkErrorKind::CommandExecutionNotFinished
            }
            ErrorType::InvalidMetadata => FrameworkErrorKind::InvalidMetadata,
            ErrorType::NoMetadataAllowed => FrameworkErrorKind::NoMetadataAllowed,
        })
    }
}

/// Standard base64 (RFC 4648 §4, `+/`, `=` padding), as Python's `standard_b64encode` writes
/// it; small enough not to be worth a dependency.
mod base64 {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

    pub fn encode(bytes: &[u8]) -> String {
        let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
        for chunk in bytes.chunks(3) {
            let b = [
                chunk[0],
                chunk.get(1).copied().unwrap_or(0),
                chunk.get(2).copied().unwrap_or(0),
            ];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for i in 0..4 {
                if i <= chunk.len() {
                    out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
                } else {
                    out.push('=');
                }
            }
        }
        out
    }

    pub fn decode(text: &str) -> Option<Vec<u8>> {
        let text = text.as_bytes();
        if !text.len().is_multiple_of(4) {
            return None;
        }
        let mut out = Vec::with_capacity(text.len() / 4 * 3);
        for (index, chunk) in text.chunks(4).enumerate() {
            let last = index + 1 == text.len() / 4;
            let pad = chunk.iter().rev().take_while(|&&c| c == b'=').count();
            if pad > 2 || (pad > 0 && !last) {
                return None;
            }
            let mut n = 0u32;
            for &c in &chunk[..4 - pad] {
                let v = ALPHABET.iter().position(|&a| a == c)? as u32;
                n = (n << 6) | v;
            }
            n <<= 6 * pad as u32;
            let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
            out.extend_from_slice(&bytes[..3 - pad]);
        }
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (plain, coded) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64::encode(plain.as_bytes()), coded);
            assert_eq!(base64::decode(coded).unwrap(), plain.as_bytes());
        }
        assert_eq!(base64::encode(&[0xfb, 0xff]), "+/8=");
        assert!(base64::decode("Zg=").is_none());
        assert!(base64::decode("Zg==Zg==").is_none());
        assert!(base64::decode("Z!==").is_none());
    }

    #[test]
    fn every_kind_round_trips() {
        let errors = [
            SilaError::Validation {
                parameter: "ppu/devices/Furnace/v1/Command/FurnaceProgram/Parameter/Segments"
                    .into(),
                message: "segments[0].target_c: 2000 is above the maximum 1100".into(),
            },
            SilaError::DefinedExecution {
                identifier: "ppu/devices/Furnace/v1/DefinedExecutionError/DeviceFault".into(),
                message: "thermocouple break".into(),
            },
            SilaError::UndefinedExecution {
                message: "boom".into(),
            },
            SilaError::Framework {
                kind: FrameworkErrorKind::InvalidMetadata,
                message: "no access token".into(),
            },
        ];
        for error in errors {
            let details = error.to_details();
            assert_eq!(SilaError::from_details(details.as_bytes()).unwrap(), error);
        }
    }

    #[test]
    fn details_are_the_standard_encoding() {
        // SiLAError{validationError{parameter:"a", message:"b"}}: 0a 06 0a 01 61 12 01 62.
        let error = SilaError::Validation {
            parameter: "a".into(),
            message: "b".into(),
        };
        assert_eq!(error.to_details(), "CgYKAWESAWI=");
    }

    #[test]
    fn foreign_details_are_refused() {
        assert!(SilaError::from_details(b"not base64!").is_err());
        assert!(SilaError::from_details(&[0xff, 0xfe]).is_err());
        // Valid base64 of an empty SiLAError.
        assert!(SilaError::from_details(b"").is_err());
    }
}
