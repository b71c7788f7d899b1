//! The daemon's TOML configuration (`ppud serve --config FILE`). deploy/ppud.example.toml
//! documents every key; unknown keys are errors, so a typo never silently means "default".

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ppu_drivers::Device;
use ppu_drivers::device::Limits;
use ppu_drivers::furnace::eurotherm::{Eurotherm, EurothermConfig};
use ppu_drivers::transport::modbus::{ModbusConfig, ModbusEndpoint};
use serde::Deserialize;

use crate::devices::PollSettings;

/// Default gRPC address: loopback only.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:50051";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// gRPC listen address.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Where the store lives.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// Physical seconds per real second; 1 for a real lab.
    #[serde(default = "one")]
    pub time_scale: f64,
    #[serde(default)]
    pub poll: PollConfig,
    #[serde(default)]
    pub devices: Vec<DeviceConfig>,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 50051))
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("/var/lib/ppu")
}

fn one() -> f64 {
    1.0
}

/// Device polling.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PollConfig {
    /// Real milliseconds between status reads of each device.
    pub interval_ms: u64,
    /// Real seconds between readings written to the event log (live watchers get every one).
    pub reading_log_interval_s: f64,
}

impl Default for PollConfig {
    fn default() -> Self {
        Self {
            interval_ms: 1000,
            reading_log_interval_s: 10.0,
        }
    }
}

impl PollConfig {
    pub fn settings(&self) -> PollSettings {
        PollSettings {
            poll_interval: Duration::from_millis(self.interval_ms.max(10)),
            reading_log_interval: Duration::try_from_secs_f64(self.reading_log_interval_s.max(0.0))
                .unwrap_or(Duration::MAX),
        }
    }
}

/// One device, tagged by its driver.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "driver", rename_all = "snake_case")]
pub enum DeviceConfig {
    /// A Eurotherm 2000/3000-series controller over Modbus.
    Eurotherm(EurothermEntry),
}

/// Keys of a `driver = "eurotherm"` device.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EurothermEntry {
    pub id: String,
    /// `modbus-tcp://IP:PORT` or `modbus-rtu://PATH@BAUD`.
    pub endpoint: String,
    #[serde(default = "unit_one")]
    pub unit_id: u8,
    #[serde(default = "timeout_ms")]
    pub timeout_ms: u64,
    #[serde(default = "retries")]
    pub retries: u32,
    #[serde(default = "dp")]
    pub decimal_places: u8,
    #[serde(default = "safe_sp")]
    pub safe_setpoint_c: f64,
    #[serde(default = "tolerance")]
    pub tolerance_c: f64,
    #[serde(default = "sample_s")]
    pub sample_interval_s: f64,
    #[serde(default = "settle_s")]
    pub settle_timeout_s: f64,
    #[serde(default)]
    pub limits: Limits,
}

fn unit_one() -> u8 {
    1
}
fn timeout_ms() -> u64 {
    1000
}
fn retries() -> u32 {
    2
}
fn dp() -> u8 {
    1
}
fn safe_sp() -> f64 {
    25.0
}
fn tolerance() -> f64 {
    2.0
}
fn sample_s() -> f64 {
    10.0
}
fn settle_s() -> f64 {
    3600.0
}

impl EurothermEntry {
    /// An entry for a controller at `endpoint` with every default and the given limits.
    pub fn new(id: impl Into<String>, endpoint: impl Into<String>, limits: Limits) -> Self {
        Self {
            id: id.into(),
            endpoint: endpoint.into(),
            unit_id: unit_one(),
            timeout_ms: timeout_ms(),
            retries: retries(),
            decimal_places: dp(),
            safe_setpoint_c: safe_sp(),
            tolerance_c: tolerance(),
            sample_interval_s: sample_s(),
            settle_timeout_s: settle_s(),
            limits,
        }
    }

    fn driver(&self) -> Result<Eurotherm, String> {
        let endpoint: ModbusEndpoint = self
            .endpoint
            .parse()
            .map_err(|e: ppu_drivers::transport::modbus::ParseEndpointError| e.to_string())?;
        let mut modbus = ModbusConfig::new(endpoint);
        modbus.unit_id = self.unit_id;
        modbus.timeout = Duration::from_millis(self.timeout_ms.max(1));
        modbus.retries = self.retries;
        let mut c = EurothermConfig::new(self.id.clone(), modbus);
        c.decimal_places = self.decimal_places;
        c.limits = self.limits.clone();
        c.safe_setpoint_c = self.safe_setpoint_c;
        c.tolerance_c = self.tolerance_c;
        c.sample_interval_s = self.sample_interval_s;
        c.settle_timeout_s = self.settle_timeout_s;
        Ok(Eurotherm::new(c))
    }
}

impl DeviceConfig {
    pub fn id(&self) -> &str {
        match self {
            DeviceConfig::Eurotherm(e) => &e.id,
        }
    }
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses and validates config text; `path` only names the source in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let c: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        c.problems().into_iter().next().map_or(Ok(c), |message| {
            Err(ConfigError::Invalid {
                path: path.to_owned(),
                message,
            })
        })
    }

    /// Every problem found, one line each; empty when the config is usable.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if !(self.time_scale.is_finite() && self.time_scale > 0.0) {
            out.push(format!(
                "time_scale: {} must be a positive number",
                self.time_scale
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for (i, d) in self.devices.iter().enumerate() {
            if d.id().is_empty() {
                out.push(format!("devices[{i}].id: must not be empty"));
            } else if !seen.insert(d.id().to_owned()) {
                out.push(format!("devices[{i}].id: duplicate id \"{}\"", d.id()));
            }
            match d {
                DeviceConfig::Eurotherm(e) => {
                    if let Err(m) = e.endpoint.parse::<ModbusEndpoint>() {
                        out.push(format!("devices[{i}].endpoint: {m}"));
                    }
                    if e.decimal_places > 3 {
                        out.push(format!(
                            "devices[{i}].decimal_places: {} is more than 3",
                            e.decimal_places
                        ));
                    }
                    if !(e.tolerance_c.is_finite() && e.tolerance_c > 0.0) {
                        out.push(format!(
                            "devices[{i}].tolerance_c: must be a positive number"
                        ));
                    }
                }
            }
        }
        out
    }

    /// Instantiates the configured drivers.
    pub fn drivers(&self) -> Result<Vec<Arc<dyn Device>>, String> {
        self.devices
            .iter()
            .map(|d| match d {
                DeviceConfig::Eurotherm(e) => e.driver().map(|x| Arc::new(x) as Arc<dyn Device>),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_config_parses() {
        let text = include_str!("../../deploy/ppud.example.toml");
        let c = Config::parse(text, Path::new("ppud.example.toml")).unwrap();
        assert!(!c.devices.is_empty());
        assert!(c.drivers().is_ok());
    }

    #[test]
    fn unknown_keys_and_bad_endpoints_are_named() {
        let e = Config::parse("listne = \"1.2.3.4:5\"", Path::new("x.toml")).unwrap_err();
        assert!(e.to_string().contains("listne"), "{e}");
        let text = "[[devices]]\ndriver = \"eurotherm\"\nid = \"f\"\nendpoint = \"tcp://nope\"\n";
        let e = Config::parse(text, Path::new("x.toml")).unwrap_err();
        assert!(e.to_string().contains("devices[0].endpoint"), "{e}");
        let text = "[[devices]]\ndriver = \"eurotherm\"\nid = \"f\"\nendpoint = \"modbus-tcp://127.0.0.1:502\"\ncolour = 1\n";
        let e = Config::parse(text, Path::new("x.toml")).unwrap_err();
        assert!(e.to_string().contains("colour"), "{e}");
    }
}
