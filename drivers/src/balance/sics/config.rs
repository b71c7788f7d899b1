//! The `driver = "mt_sics"` entry of `[[devices]]`: a Mettler Toledo balance speaking MT-SICS
//! over RS-232. Its keys, defaults and checks, and how it builds the driver, which the pumps
//! it weighs for share.

use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use super::{SicsBalance, SicsConfig};
use crate::device::{Device, Limits};
use crate::registry::{BuildContext, DeviceSpec, DriverFactory, KeyError, PortUse, parse_table};
use crate::transport::serial::{Framing, SerialConfig};

/// The driver's registration.
pub struct Factory;

impl DriverFactory for Factory {
    fn name(&self) -> &'static str {
        "mt_sics"
    }
    fn family(&self) -> &'static str {
        "balance"
    }
    fn parse(&self, table: toml::Table) -> Result<Box<dyn DeviceSpec>, KeyError> {
        parse_table::<MtSicsEntry>(table).map(|e| Box::new(e) as Box<dyn DeviceSpec>)
    }
}

/// Keys of a `driver = "mt_sics"` device.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MtSicsEntry {
    pub id: String,
    pub port: String,
    #[serde(default = "baud_9600")]
    pub baud_rate: u32,
    #[serde(default = "timeout_ms")]
    pub timeout_ms: u64,
    #[serde(default = "retries")]
    pub retries: u32,
    #[serde(default)]
    pub gap_ms: u64,
    /// Real seconds a weighing waits for a stable reading.
    #[serde(default = "ten")]
    pub stability_timeout_s: f64,
    #[serde(default)]
    pub limits: Limits,
}

fn baud_9600() -> u32 {
    9600
}
fn timeout_ms() -> u64 {
    1000
}
fn retries() -> u32 {
    2
}
fn ten() -> f64 {
    10.0
}

impl MtSicsEntry {
    /// An entry for a balance at `port` with every default.
    pub fn new(id: impl Into<String>, port: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            port: port.into(),
            baud_rate: baud_9600(),
            timeout_ms: timeout_ms(),
            retries: retries(),
            gap_ms: 0,
            stability_timeout_s: ten(),
            limits: Limits::default(),
        }
    }

    /// The driver.
    pub fn driver(&self) -> SicsBalance {
        let mut serial = SerialConfig::new(self.port.as_str(), Framing::CrLf);
        serial.baud_rate = self.baud_rate;
        serial.timeout = Duration::from_millis(self.timeout_ms.max(1));
        serial.retries = self.retries;
        serial.gap = Duration::from_millis(self.gap_ms);
        let mut c = SicsConfig::new(self.id.clone(), serial);
        c.stability_timeout =
            Duration::try_from_secs_f64(self.stability_timeout_s.max(0.0)).unwrap_or(Duration::MAX);
        c.limits = self.limits.clone();
        SicsBalance::new(c)
    }
}

impl DeviceSpec for MtSicsEntry {
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
        let mut out = Vec::new();
        if self.port.is_empty() {
            out.push("port: must not be empty".to_owned());
        }
        if self.baud_rate == 0 {
            out.push("baud_rate: must be positive".to_owned());
        }
        if !(self.stability_timeout_s.is_finite() && self.stability_timeout_s >= 0.0) {
            out.push("stability_timeout_s: must be a non-negative number".to_owned());
        }
        out
    }

    fn limits(&self) -> Option<&Limits> {
        Some(&self.limits)
    }

    fn serial_port(&self) -> Option<PortUse<'_>> {
        Some(PortUse {
            key: "port",
            port: &self.port,
        })
    }

    fn build(&self, ctx: &mut BuildContext) -> Result<Arc<dyn Device>, String> {
        let balance = Arc::new(self.driver());
        ctx.provide(&self.id, Arc::clone(&balance));
        Ok(balance)
    }

    fn clone_box(&self) -> Box<dyn DeviceSpec> {
        Box::new(self.clone())
    }
}
