//! SiLA 2 instruments as ppu devices: the `sila_instrument` family (folder `sila2`) and its
//! `sila2` driver.
//!
//! Any SiLA 2 server (a shaker, an incubator, a plate reader) is a device. On connect the
//! driver asks the server's `SiLAService` for its `ImplementedFeatures` and each feature's
//! definition (`GetFeatureDefinition`), reads the FDL ([`ppu_sila::fdl`]) and builds the
//! feature's gRPC messages as descriptors at run time ([`ppu_sila::descriptor`], the
//! standard's Part B mapping). Calls go over tonic with a raw codec ([`client`]); nothing is
//! compiled per instrument.
//!
//! **One command, checked against the server's own FDL.** The family has one command,
//! [`schema::Call`] `{ feature, command, parameters }` (parameters as a JSON object, typed by
//! the FDL: [`json`]), with one capability, `sila_call`. A device cannot declare a capability
//! per SiLA command: capabilities are the names of the family schema's commands, fixed when
//! ppud is built, while a server's features are known only when it answers. So every `sila2`
//! device offers `sila_call`, and [`Device::check`] decides whether a given Call is one it can
//! run: a feature the server does not implement is [`DeviceError::Unsupported`] (the daemon's
//! "not mine", so an unpinned Call goes to the device that has the feature, and a Call no
//! device has is refused naming `sila_call.feature`); an unknown command, a missing or
//! unknown parameter, a value of the wrong type or one that breaks an FDL constraint is
//! refused naming the parameter (`sila_call.parameters.Speed`), numbers as
//! [`DeviceError::Limit`]. The daemon runs `check` at submission, so a bad Call never enters
//! the queue; `execute` checks again against the FDL the server has then. A device may
//! further restrict the features it offers (`limits.accepted.sila_feature`). Before the first
//! connection the driver knows no FDL and `check` accepts (it cannot judge; the call is
//! checked at run time), so a daemon starting while an instrument is off does not fail the
//! Calls in its queue.
//!
//! **Execution.** An observable command is started, then followed on `<Command>_Info`
//! (ExecutionInfo → [`StepUpdate::Progress`] with the estimated remaining time) and
//! `<Command>_Intermediate` (→ [`StepUpdate::Intermediate`], a [`schema::CallIntermediate`]),
//! and its `<Command>_Result` is the step's [`schema::CallResult`]. A link that drops while
//! it runs is reconnected and the same execution followed again (SiLA lets a client
//! re-subscribe by its execution UUID) within `outage_grace_s` of real time; longer, the step
//! fails as disconnected. An unobservable command is one call. SiLA errors become device
//! errors: a defined or undefined execution error is a fault naming it, a validation error a
//! refusal naming the parameter. Numeric properties are the device's readings, by property
//! identifier (`CurrentSpeed`).
//!
//! **Safe state.** The configured `safe_command` (an unobservable command without parameters,
//! e.g. `ShakerController/Stop`), else the cancellation of the command ppu started through the
//! server's `CancelController` feature (`org.silastandard/core.commands/CancelController/v1`);
//! with neither, the driver refuses ([`DeviceError::Unsupported`]) and the daemon keeps the
//! device unsafe and alarmed rather than pretend. `confirm_safe` reads `safe_property` back
//! (safe when its magnitude is at most `safe_max`), else asks the execution's `_Info` whether
//! ppu's command has ended. A command started before a daemon restart is not known to the new
//! process (SiLA has no standard way to list running executions): configure `safe_command` for
//! instruments that must be stopped. A `sila_call` is `not_rerunnable`: ppu cannot tell how far
//! an interrupted instrument command got.
//!
//! **Two readings.** The simulated instrument (`simulator/sila/shaker.py`) is served by the
//! third-party `sila2` Python package: its Part B encoding, ExecutionInfo, errors and
//! constraint checks are that package's reading of the standard, not ours, so the tests of
//! this driver against it are already an independent reading, which is what golden
//! transcripts give the other families.

mod client;
pub mod config;
mod device;
pub mod json;

use std::sync::Arc;
use std::time::Duration;

use ppu_sila::fdl::{self, Feature};
use prost::Message;
use serde_json::Value as Json;

use crate::device::{DeviceError, Limits};

/// The family's schema (`sila2.proto`): the `Call` command and its result and intermediate.
pub mod schema {
    #![allow(clippy::all, clippy::pedantic, missing_docs)]
    include!(concat!(env!("OUT_DIR"), "/ppu.devices.sila2.v1.rs"));
}

/// The family's name in its schema (`sila2.proto`): `sila_instrument`, not `sila2`, whose SiLA
/// feature package `sila2.ppu.devices.sila2.v1` would shadow the root package `sila2` in
/// protoc's relative name resolution (clients that compile the feature, the `sila2` Python
/// package among them, could not). The driver is `sila2`.
pub const FAMILY: &str = "sila_instrument";

/// This family's drivers, as the registry builds them from `[[devices]]` tables.
pub static DRIVERS: &[&dyn crate::registry::DriverFactory] = &[&config::Factory];

pub use device::Sila2Device;

/// How the link is secured.
#[derive(Debug, Clone, PartialEq)]
pub enum Tls {
    /// No TLS (an explicit opt-in: `insecure = true`).
    Plaintext,
    /// TLS, the server's certificate checked against `ca_file` for `domain`.
    Ca { ca_file: String, domain: String },
}

/// Configuration of one SiLA 2 server.
#[derive(Debug, Clone)]
pub struct Sila2Config {
    pub id: String,
    /// `host:port`.
    pub address: String,
    pub tls: Tls,
    /// `(feature, command)` run to make the instrument safe.
    pub safe_command: Option<(String, String)>,
    /// `(feature, property)` read back to confirm the safe state.
    pub safe_property: Option<(String, String)>,
    /// Largest magnitude of `safe_property` that is safe.
    pub safe_max: f64,
    /// Real time one call may take.
    pub timeout: Duration,
    /// Real time between readings while a command runs.
    pub poll_interval: Duration,
    /// Real time a running command may go unheard before its step fails.
    pub outage_grace: Duration,
    pub limits: Limits,
}

/// The mandatory SiLAService feature's gRPC service (Part B name of
/// `org.silastandard/core/SiLAService/v1`).
const SILA_SERVICE: &str = "sila2.org.silastandard.core.silaservice.v1.SiLAService";
/// The standard's feature for cancelling a running observable command.
const CANCEL_CONTROLLER: &str = "org.silastandard/core.commands/CancelController/v1";

/// `Get_ImplementedFeatures_Responses`: a list of framework `String`s at field 1.
#[derive(Clone, PartialEq, prost::Message)]
struct Strings {
    #[prost(message, repeated, tag = "1")]
    values: Vec<ppu_sila::framework::String>,
}

/// A message with one framework `String` at field 1 (`GetFeatureDefinition`'s parameters
/// and responses).
#[derive(Clone, PartialEq, prost::Message)]
struct OneString {
    #[prost(message, optional, tag = "1")]
    value: Option<ppu_sila::framework::String>,
}

/// A property's response when it is a Real.
#[derive(Clone, PartialEq, prost::Message)]
struct OneReal {
    #[prost(message, optional, tag = "1")]
    value: Option<ppu_sila::framework::Real>,
}

/// A property's response when it is an Integer.
#[derive(Clone, PartialEq, prost::Message)]
struct OneInteger {
    #[prost(message, optional, tag = "1")]
    value: Option<ppu_sila::framework::Integer>,
}

/// What a server implements, read when the driver connects.
#[derive(Debug)]
pub struct Model {
    pub features: Vec<Feature>,
    pub pool: ppu_schema::prost_reflect::DescriptorPool,
}

/// A Call checked against the FDL: what to send.
#[derive(Debug)]
pub struct Checked<'a> {
    pub feature: &'a Feature,
    pub command: &'a fdl::Command,
    pub values: Vec<(String, ppu_sila::value::Value)>,
}

impl Model {
    /// The model of a server implementing the features `fdl` (FDL documents), as if read from
    /// it (tests, fuzzing).
    pub fn from_fdl(fdl: &[&str]) -> Result<Model, DeviceError> {
        let features = fdl
            .iter()
            .map(|xml| Feature::from_xml(xml))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| DeviceError::Corrupt {
                what: "feature definition".to_owned(),
                reason: e.to_string(),
            })?;
        let pool = ppu_sila::descriptor::pool(&features).map_err(|e| DeviceError::Corrupt {
            what: "feature definitions".to_owned(),
            reason: e.to_string(),
        })?;
        Ok(Model { features, pool })
    }

    /// The feature named by identifier or by fully qualified identifier.
    pub fn feature(&self, name: &str) -> Option<&Feature> {
        let name = name.trim();
        self.features.iter().find(|f| {
            f.identifier == name || f.fully_qualified_identifier().eq_ignore_ascii_case(name)
        })
    }

    /// Checks a Call against the feature's FDL; refusals name the parameter
    /// (`parameters.Speed`).
    pub fn check(&self, call: &schema::Call, device: &str) -> Result<Checked<'_>, DeviceError> {
        let feature = self.feature(&call.feature).ok_or_else(|| {
            DeviceError::Unsupported(format!(
                "{device} does not implement feature {:?} (it has {})",
                call.feature,
                self.features
                    .iter()
                    .map(|f| f.identifier.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })?;
        let command = feature.command(call.command.trim()).ok_or_else(|| DeviceError::Refused {
            what: format!("command {:?}", call.command),
            reason: format!(
                "feature {} of {device} has no such command (it has {})",
                feature.identifier,
                feature
                    .commands
                    .iter()
                    .map(|c| c.identifier.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        })?;
        let text = call.parameters.trim();
        let json: Json = if text.is_empty() {
            Json::Object(Default::default())
        } else {
            serde_json::from_str(text).map_err(|e| DeviceError::Refused {
                what: "parameters".to_owned(),
                reason: format!("not JSON: {e}"),
            })?
        };
        let values = json::elements_from_json(feature, &command.parameters, &json, "")
            .map_err(|e| DeviceError::Refused {
                what: if e.path.is_empty() {
                    "parameters".to_owned()
                } else {
                    format!("parameters.{}", e.path)
                },
                reason: format!("{} ({}/{})", e.reason, feature.identifier, command.identifier),
            })?;
        for (element, (_, value)) in command.parameters.iter().zip(&values) {
            if let Err(e) =
                ppu_sila::value::check(feature, &element.data_type, value, &element.identifier)
            {
                let field = format!("parameters.{}", e.path);
                let at = format!("{}/{}", feature.identifier, command.identifier);
                return Err(match number_at(value, &e.path, &element.identifier) {
                    Some(v) => DeviceError::Limit {
                        field,
                        value: v,
                        limit: format!("the FDL constraint of {at} ({})", e.reason),
                    },
                    None => DeviceError::Refused {
                        what: field,
                        reason: format!("{} ({at})", e.reason),
                    },
                });
            }
        }
        Ok(Checked {
            feature,
            command,
            values,
        })
    }

    /// The server's CancelController, if it has one.
    pub fn cancel_controller(&self) -> Option<&Feature> {
        self.features
            .iter()
            .find(|f| f.fully_qualified_identifier() == CANCEL_CONTROLLER)
    }
}

/// The number a constraint error points at, when the parameter itself is one.
fn number_at(value: &ppu_sila::value::Value, path: &str, identifier: &str) -> Option<f64> {
    use ppu_sila::value::Value;
    if path != identifier {
        return None;
    }
    match value {
        Value::Real(v) => Some(*v),
        Value::Integer(v) => Some(*v as f64),
        _ => None,
    }
}

/// Reads what a server implements: its features' definitions, and their descriptors.
async fn load_model(client: &client::Client) -> Result<Model, DeviceError> {
    let what = "SiLAService/ImplementedFeatures";
    let bytes = client
        .unary(SILA_SERVICE, "Get_ImplementedFeatures", Vec::new())
        .await
        .map_err(|e| e.into_device(what))?;
    let names = Strings::decode(bytes.as_slice()).map_err(|e| DeviceError::Corrupt {
        what: what.to_owned(),
        reason: e.to_string(),
    })?;
    let mut features = Vec::new();
    for name in names.values.into_iter().map(|s| s.value) {
        let what = format!("SiLAService/GetFeatureDefinition({name})");
        let request = OneString {
            value: Some(ppu_sila::framework::String {
                value: name.clone(),
            }),
        };
        let bytes = client
            .unary(SILA_SERVICE, "GetFeatureDefinition", request.encode_to_vec())
            .await
            .map_err(|e| e.into_device(&what))?;
        let xml = OneString::decode(bytes.as_slice())
            .map_err(|e| DeviceError::Corrupt {
                what: what.clone(),
                reason: e.to_string(),
            })?
            .value
            .unwrap_or_default()
            .value;
        let feature = Feature::from_xml(&xml).map_err(|e| DeviceError::Corrupt {
            what: what.clone(),
            reason: e.to_string(),
        })?;
        features.push(feature);
    }
    let pool = ppu_sila::descriptor::pool(&features).map_err(|e| DeviceError::Corrupt {
        what: "the server's feature definitions".to_owned(),
        reason: e.to_string(),
    })?;
    Ok(Model { features, pool })
}

/// A shared model, swapped whole on reconnect.
type SharedModel = std::sync::RwLock<Option<Arc<Model>>>;

#[cfg(test)]
mod tests {
    use super::*;

    /// The simulated shaker's FDL (its "manual"), so the checks run without its server.
    fn shaker() -> Model {
        Model::from_fdl(&[include_str!(
            "../../../simulator/sila/ShakerController.sila.xml"
        )])
        .expect("the shaker's FDL reads")
    }

    fn call(feature: &str, command: &str, parameters: &str) -> schema::Call {
        schema::Call {
            feature: feature.into(),
            command: command.into(),
            parameters: parameters.into(),
        }
    }

    #[test]
    fn calls_are_checked_against_the_fdl_naming_the_parameter() {
        let m = shaker();
        let ok = m
            .check(
                &call("ShakerController", "Shake", r#"{"Speed": 1500, "Duration": 1}"#),
                "s",
            )
            .expect("at the bound");
        assert_eq!(ok.command.identifier, "Shake");
        assert_eq!(ok.values.len(), 2);
        m.check(&call("org.ppu/simulation/ShakerController/v1", "Stop", ""), "s")
            .expect("by fully qualified identifier, no parameters");
        match m.check(
            &call("ShakerController", "Shake", r#"{"Speed": -1, "Duration": 1}"#),
            "s",
        ) {
            Err(DeviceError::Limit {
                field,
                value,
                limit,
            }) => {
                assert_eq!((field.as_str(), value), ("parameters.Speed", -1.0));
                assert!(limit.starts_with("the FDL constraint of ShakerController/Shake"), "{limit}");
            }
            other => panic!("below the minimum: {other:?}"),
        }
        let refused = |c: schema::Call| match m.check(&c, "s") {
            Err(DeviceError::Refused { what, .. }) => what,
            other => panic!("{c:?}: {other:?}"),
        };
        assert_eq!(
            refused(call("ShakerController", "Shake", r#"{"Speed": 1}"#)),
            "parameters.Duration"
        );
        assert_eq!(
            refused(call("ShakerController", "Stop", r#"{"Now": true}"#)),
            "parameters.Now"
        );
        assert_eq!(refused(call("ShakerController", "Spin", "")), "command \"Spin\"");
        assert!(matches!(
            m.check(&call("Incubator", "Open", ""), "s"),
            Err(DeviceError::Unsupported(_))
        ));
        assert!(m.cancel_controller().is_none());
    }
}
