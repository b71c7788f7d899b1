//! The `driver = "sila2"` entry of `[[devices]]`: a SiLA 2 server at `address`. Its keys are
//! [`Sila2Settings`] plus the device's `id` and optional `[limits]`.

use std::sync::Arc;
use std::time::Duration;

use super::{Sila2Config, Sila2Device, Tls};
use crate::device::{Device, Limits};
use crate::registry::{BuildContext, DeviceSpec, DriverFactory, KeyError, parse_table};

/// The driver's registration.
pub struct Factory;

impl DriverFactory for Factory {
    fn name(&self) -> &'static str {
        "sila2"
    }
    fn family(&self) -> &'static str {
        super::FAMILY
    }
    fn parse(&self, mut table: toml::Table) -> Result<Box<dyn DeviceSpec>, KeyError> {
        let id = match table.remove("id") {
            Some(toml::Value::String(id)) => id,
            Some(_) => {
                return Err(KeyError {
                    path: "id".into(),
                    message: "must be a string".into(),
                });
            }
            None => {
                return Err(KeyError {
                    path: String::new(),
                    message: "missing field `id`".into(),
                });
            }
        };
        let settings: Sila2Settings = parse_table(table)?;
        Ok(Box::new(Sila2Entry { id, settings }))
    }
}

/// A SiLA 2 server's settings as a configuration file gives them. Unknown keys are refused.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sila2Settings {
    /// `host:port` of the SiLA 2 server.
    pub address: String,
    /// PEM file of the CA that signed the server's certificate (SiLA 2 servers often present
    /// a self-signed one: give it here). Without it and without `insecure`, no connection.
    #[serde(default)]
    pub ca_file: Option<String>,
    /// The name the server's certificate is checked against; default: the host of `address`.
    #[serde(default)]
    pub tls_domain: Option<String>,
    /// Plaintext, no TLS: an explicit opt-in (SiLA 2 requires encryption), meant for a
    /// server on loopback such as the dev lab's simulated instrument.
    #[serde(default)]
    pub insecure: bool,
    /// An unobservable command without parameters that makes the instrument safe
    /// (`"ShakerController/Stop"`). Without it the safe state is the cancellation of the
    /// running command through the server's CancelController feature.
    #[serde(default)]
    pub safe_command: Option<String>,
    /// A numeric property read back to confirm the safe state
    /// (`"ShakerController/CurrentSpeed"`): safe when its magnitude is at most `safe_max`.
    #[serde(default)]
    pub safe_property: Option<String>,
    #[serde(default)]
    pub safe_max: f64,
    /// Real time one call may take before it is a timeout.
    #[serde(default = "Sila2Settings::default_timeout_ms")]
    pub timeout_ms: u64,
    /// Real time between readings taken while a command runs.
    #[serde(default = "Sila2Settings::default_poll_interval_ms")]
    pub poll_interval_ms: u64,
    /// Real time a running command may go without an answer from the server (it follows the
    /// command again after a reconnect meanwhile) before its step fails.
    #[serde(default = "Sila2Settings::default_outage_grace_s")]
    pub outage_grace_s: f64,
    /// Declared limits: `accepted.sila_feature = ["ShakerController"]` restricts the features
    /// offered through this device.
    #[serde(default)]
    pub limits: Limits,
}

impl Sila2Settings {
    fn default_timeout_ms() -> u64 {
        5_000
    }
    fn default_poll_interval_ms() -> u64 {
        1_000
    }
    fn default_outage_grace_s() -> f64 {
        10.0
    }

    /// The driver configuration for device `id`, or the first setting that is wrong, named.
    pub fn into_config(self, id: impl Into<String>) -> Result<Sila2Config, String> {
        let (host, port) = self
            .address
            .rsplit_once(':')
            .ok_or_else(|| format!("address: {:?} is not host:port", self.address))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() || port.parse::<u16>().is_err() {
            return Err(format!("address: {:?} is not host:port", self.address));
        }
        let tls = match (self.insecure, &self.ca_file) {
            (true, Some(_)) => {
                return Err("insecure: plaintext and ca_file exclude each other".to_owned());
            }
            (true, None) => Tls::Plaintext,
            (false, Some(ca)) => Tls::Ca {
                ca_file: ca.clone(),
                domain: self.tls_domain.clone().unwrap_or_else(|| host.to_owned()),
            },
            (false, None) => {
                return Err(
                    "ca_file: required for TLS (the server's CA), or set insecure = true for \
                     plaintext on a trusted link"
                        .to_owned(),
                );
            }
        };
        let member = |key: &str, v: &Option<String>| -> Result<Option<(String, String)>, String> {
            v.as_ref()
                .map(|s| {
                    s.split_once('/')
                        .filter(|(f, m)| !f.is_empty() && !m.is_empty() && !m.contains('/'))
                        .map(|(f, m)| (f.to_owned(), m.to_owned()))
                        .ok_or_else(|| {
                            format!("{key}: {s:?} is not Feature/Member (e.g. ShakerController/Stop)")
                        })
                })
                .transpose()
        };
        let safe_command = member("safe_command", &self.safe_command)?;
        let safe_property = member("safe_property", &self.safe_property)?;
        if !(self.safe_max.is_finite() && self.safe_max >= 0.0) {
            return Err("safe_max: must be a non-negative number".to_owned());
        }
        if self.timeout_ms == 0 {
            return Err("timeout_ms: must be positive".to_owned());
        }
        if self.poll_interval_ms == 0 {
            return Err("poll_interval_ms: must be positive".to_owned());
        }
        if !(self.outage_grace_s.is_finite() && self.outage_grace_s >= 0.0) {
            return Err("outage_grace_s: must be a non-negative number of seconds".to_owned());
        }
        Ok(Sila2Config {
            id: id.into(),
            address: self.address,
            tls,
            safe_command,
            safe_property,
            safe_max: self.safe_max,
            timeout: Duration::from_millis(self.timeout_ms),
            poll_interval: Duration::from_millis(self.poll_interval_ms),
            outage_grace: Duration::from_secs_f64(self.outage_grace_s),
            limits: self.limits,
        })
    }
}

/// One configured SiLA 2 server.
#[derive(Debug, Clone)]
pub struct Sila2Entry {
    pub id: String,
    pub settings: Sila2Settings,
}

impl DeviceSpec for Sila2Entry {
    fn id(&self) -> &str {
        &self.id
    }
    fn driver(&self) -> &'static str {
        Factory.name()
    }
    fn family(&self) -> &'static str {
        Factory.family()
    }

    fn problems(&self) -> Vec<String> {
        match self.settings.clone().into_config(self.id.clone()) {
            Ok(_) => Vec::new(),
            Err(e) => vec![e],
        }
    }

    fn limits(&self) -> Option<&Limits> {
        Some(&self.settings.limits)
    }

    fn build(&self, _ctx: &mut BuildContext) -> Result<Arc<dyn Device>, String> {
        let config = self.settings.clone().into_config(self.id.clone())?;
        Ok(Arc::new(Sila2Device::new(config)?))
    }

    fn clone_box(&self) -> Box<dyn DeviceSpec> {
        Box::new(self.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Box<dyn DeviceSpec>, KeyError> {
        Factory.parse(toml::from_str(text).expect("toml"))
    }

    #[test]
    fn settings_have_defaults_and_name_bad_keys() {
        let spec = parse(
            "id = \"shaker-1\"\naddress = \"127.0.0.1:50053\"\ninsecure = true\n\
             safe_command = \"ShakerController/Stop\"\n",
        )
        .expect("parses");
        assert!(spec.problems().is_empty(), "{:?}", spec.problems());
        let entry = spec.downcast_ref::<Sila2Entry>().expect("a sila2 entry");
        let c = entry.settings.clone().into_config("shaker-1").expect("valid");
        assert_eq!(c.tls, Tls::Plaintext);
        assert_eq!(c.timeout, Duration::from_secs(5));
        assert_eq!(
            c.safe_command,
            Some(("ShakerController".into(), "Stop".into()))
        );
        let e = parse("id = \"s\"\naddress = \"h:1\"\ninsecure = true\nsafe_cmd = \"x\"\n")
            .expect_err("unknown key");
        assert_eq!(e.path, "safe_cmd");
        for (extra, key) in [
            ("address = \"nohost\"\ninsecure = true", "address"),
            ("address = \"h:1\"", "ca_file"),
            (
                "address = \"h:1\"\ninsecure = true\nsafe_command = \"Stop\"",
                "safe_command",
            ),
            (
                "address = \"h:1\"\ninsecure = true\nca_file = \"ca.pem\"",
                "insecure",
            ),
        ] {
            let spec = parse(&format!("id = \"s\"\n{extra}\n")).expect("parses");
            let problems = spec.problems();
            assert!(
                problems.first().is_some_and(|p| p.starts_with(key)),
                "{extra}: {problems:?}"
            );
        }
    }
}
