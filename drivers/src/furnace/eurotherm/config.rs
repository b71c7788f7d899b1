//! The `driver = "eurotherm"` entry of `[[devices]]`: its keys, defaults and checks, and how it
//! builds the driver on a link of its own or on a shared Modbus bus.

use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use super::{Eurotherm, EurothermConfig, IdentCheck};
use crate::device::{Device, Limits};
use crate::registry::{
    BuildContext, BusUse, DeviceSpec, DriverFactory, KeyError, PortUse, parse_table,
};
use crate::transport::modbus::{ModbusConfig, ModbusEndpoint, ParseEndpointError};

/// The driver's registration.
pub struct Factory;

impl DriverFactory for Factory {
    fn name(&self) -> &'static str {
        "eurotherm"
    }
    fn family(&self) -> &'static str {
        "furnace"
    }
    fn parse(&self, table: toml::Table) -> Result<Box<dyn DeviceSpec>, KeyError> {
        parse_table::<EurothermEntry>(table).map(|e| Box::new(e) as Box<dyn DeviceSpec>)
    }
}

/// Keys of a `driver = "eurotherm"` device: a Eurotherm 2000/3000-series controller over
/// Modbus.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EurothermEntry {
    pub id: String,
    /// `modbus-tcp://IP:PORT` or `modbus-rtu://PATH@BAUD`, for a controller on a link of its
    /// own; empty when `bus` is given.
    #[serde(default)]
    pub endpoint: String,
    /// The id of a `modbus_rtu` or `modbus_tcp` bus this controller is on (instead of
    /// `endpoint`); `unit_id` is its address there.
    #[serde(default)]
    pub bus: Option<String>,
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
    /// Instrument idents accepted at the address (register 122): a list such as
    /// `[0x2440, 0x2480]`, or `"skip"`. Absent: the driver's known models (2404, 2408).
    #[serde(default)]
    pub expected_ident: Option<ExpectedIdent>,
    #[serde(default)]
    pub limits: Limits,
}

/// The `expected_ident` key of a Eurotherm device.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum ExpectedIdent {
    /// Register 122 must read one of these.
    OneOf(Vec<u16>),
    /// Only `"skip"` is valid: do not read register 122.
    Word(String),
}

impl ExpectedIdent {
    fn check(&self) -> Result<IdentCheck, String> {
        match self {
            ExpectedIdent::OneOf(list) if list.is_empty() => Err(
                "expected_ident: an empty list accepts nothing; write \"skip\" to skip the check"
                    .to_owned(),
            ),
            ExpectedIdent::OneOf(list) => Ok(IdentCheck::OneOf(list.clone())),
            ExpectedIdent::Word(word) if word == "skip" => Ok(IdentCheck::Skip),
            ExpectedIdent::Word(word) => Err(format!(
                "expected_ident: \"{word}\" is neither a list of 16-bit idents nor \"skip\""
            )),
        }
    }
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
            bus: None,
            unit_id: unit_one(),
            timeout_ms: timeout_ms(),
            retries: retries(),
            decimal_places: dp(),
            safe_setpoint_c: safe_sp(),
            tolerance_c: tolerance(),
            sample_interval_s: sample_s(),
            settle_timeout_s: settle_s(),
            expected_ident: None,
            limits,
        }
    }

    /// An entry for unit `unit_id` on the bus `bus`, with every default and the given limits.
    pub fn on_bus(
        id: impl Into<String>,
        bus: impl Into<String>,
        unit_id: u8,
        limits: Limits,
    ) -> Self {
        Self {
            bus: Some(bus.into()),
            unit_id,
            ..Self::new(id, "", limits)
        }
    }

    fn driver(&self, ctx: &BuildContext) -> Result<Eurotherm, String> {
        let bus = match &self.bus {
            Some(name) => Some(ctx.modbus_bus(name).ok_or_else(|| {
                format!(
                    "device {}: bus: no Modbus bus \"{name}\" is configured",
                    self.id
                )
            })?),
            None => None,
        };
        let endpoint: ModbusEndpoint = match &bus {
            Some(bus) => bus.endpoint().clone(),
            None => self
                .endpoint
                .parse()
                .map_err(|e: ParseEndpointError| e.to_string())?,
        };
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
        if let Some(expected) = &self.expected_ident {
            c.ident = expected.check()?;
        }
        Ok(match bus {
            Some(bus) => {
                let unit = bus.unit(c.modbus.unit_id, c.modbus.timeout, c.modbus.retries);
                Eurotherm::with_transport(c, unit)
            }
            None => Eurotherm::new(c),
        })
    }
}

impl DeviceSpec for EurothermEntry {
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
        match (self.endpoint.is_empty(), &self.bus) {
            (true, None) => {
                out.push("endpoint: give endpoint (or bus) for the controller's link".to_owned())
            }
            (false, Some(_)) => {
                out.push("bus: give endpoint or bus, not both (a bus owns its link)".to_owned())
            }
            (false, None) => {
                if let Err(m) = self.endpoint.parse::<ModbusEndpoint>() {
                    out.push(format!("endpoint: {m}"));
                }
            }
            (true, Some(_)) => {}
        }
        if self.decimal_places > 3 {
            out.push(format!(
                "decimal_places: {} is more than 3",
                self.decimal_places
            ));
        }
        if !(self.tolerance_c.is_finite() && self.tolerance_c > 0.0) {
            out.push("tolerance_c: must be a positive number".to_owned());
        }
        if let Some(Err(m)) = self.expected_ident.as_ref().map(ExpectedIdent::check) {
            out.push(m);
        }
        out
    }

    fn limits(&self) -> Option<&Limits> {
        Some(&self.limits)
    }

    fn serial_port(&self) -> Option<PortUse<'_>> {
        if self.bus.is_some() {
            return None;
        }
        match self.endpoint.parse() {
            Ok(ModbusEndpoint::Rtu { path, .. }) => {
                let start = self.endpoint.find(path.as_str()).unwrap_or(0);
                self.endpoint
                    .get(start..start + path.len())
                    .map(|port| PortUse {
                        key: "endpoint",
                        port,
                    })
            }
            _ => None,
        }
    }

    fn bus(&self) -> Option<BusUse<'_>> {
        self.bus.as_deref().map(|bus| BusUse {
            bus,
            address_key: "unit_id",
            address: self.unit_id,
            kinds: &["modbus_rtu", "modbus_tcp"],
        })
    }

    fn build(&self, ctx: &mut BuildContext) -> Result<Arc<dyn Device>, String> {
        self.driver(ctx).map(|d| Arc::new(d) as Arc<dyn Device>)
    }

    fn clone_box(&self) -> Box<dyn DeviceSpec> {
        Box::new(self.clone())
    }
}
