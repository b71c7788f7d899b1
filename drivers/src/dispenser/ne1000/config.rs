//! The `driver = "ne1000"` entry of `[[devices]]`: one pump, its syringe and the reagent in it.
//! Its keys, defaults and checks, and how it builds the driver on a port of its own or on a
//! daisy chain, weighed by the balance it names.

use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use super::{Ne1000Config, Ne1000Pump};
use crate::balance::sics::SicsBalance;
use crate::device::{Device, Limits};
use crate::registry::{
    BuildContext, BusUse, DeviceSpec, DeviceUse, DriverFactory, KeyError, PortUse, parse_table,
};
use crate::transport::serial::{Framing, SerialConfig};

/// The driver's registration.
pub struct Factory;

impl DriverFactory for Factory {
    fn name(&self) -> &'static str {
        "ne1000"
    }
    fn family(&self) -> &'static str {
        "dispenser"
    }
    fn parse(&self, table: toml::Table) -> Result<Box<dyn DeviceSpec>, KeyError> {
        parse_table::<Ne1000Entry>(table).map(|e| Box::new(e) as Box<dyn DeviceSpec>)
    }
}

/// Keys of a `driver = "ne1000"` device: a New Era NE-1000/NE-4000 syringe pump holding one
/// reagent, over RS-232.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ne1000Entry {
    pub id: String,
    /// Serial device, e.g. `/dev/ttyUSB0` or `/dev/serial/by-id/…`, for a pump on a port of
    /// its own; empty when `bus` is given.
    #[serde(default)]
    pub port: String,
    /// The id of a `serial` bus (a daisy chain) this pump is on (instead of `port`); `address`
    /// tells it from its neighbours, and the bus's `baud_rate` and `gap_ms` apply.
    #[serde(default)]
    pub bus: Option<String>,
    #[serde(default = "baud_9600")]
    pub baud_rate: u32,
    /// Pump address on the line, 0–99.
    #[serde(default)]
    pub address: u8,
    #[serde(default = "timeout_ms")]
    pub timeout_ms: u64,
    #[serde(default = "retries")]
    pub retries: u32,
    /// Least real milliseconds between the end of one exchange and the next command.
    #[serde(default)]
    pub gap_ms: u64,
    /// The reagent in the syringe; dispense and refill steps name it.
    pub reagent: String,
    pub density_g_per_ml: f64,
    pub syringe_inner_diameter_mm: f64,
    pub syringe_volume_ml: f64,
    /// Fill at the daemon's first start; afterwards the daemon's tracked fill is used.
    pub fill_ml: f64,
    /// Id of the `mt_sics` balance under this pump's station, if any.
    #[serde(default)]
    pub balance: Option<String>,
    /// Largest accepted |measured − expected| / expected of a weighed dispense.
    #[serde(default = "dispense_tolerance")]
    pub tolerance: f64,
    #[serde(default = "refill_rate")]
    pub refill_rate_ml_per_min: f64,
    /// Safe mode with this watchdog, 1–255 s; omit for basic mode.
    #[serde(default)]
    pub safe_mode_watchdog_s: Option<u8>,
    /// Physical seconds between status polls while pumping.
    #[serde(default = "poll_s")]
    pub poll_interval_s: f64,
    /// Real seconds the balance may take to settle for the tare and the weighing.
    #[serde(default = "weigh_timeout_s")]
    pub weigh_timeout_s: f64,
    #[serde(default)]
    pub limits: Limits,
}

fn baud_9600() -> u32 {
    9600
}
fn timeout_ms() -> u64 {
    500
}
fn retries() -> u32 {
    2
}
fn dispense_tolerance() -> f64 {
    0.02
}
fn refill_rate() -> f64 {
    10.0
}
fn poll_s() -> f64 {
    2.0
}
fn weigh_timeout_s() -> f64 {
    10.0
}

impl Ne1000Entry {
    /// An entry for a pump at `port` holding `reagent`: a 10 mL syringe (14.43 mm), full,
    /// and every other key at its default.
    pub fn new(id: impl Into<String>, port: impl Into<String>, reagent: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            port: port.into(),
            bus: None,
            baud_rate: baud_9600(),
            address: 0,
            timeout_ms: timeout_ms(),
            retries: retries(),
            gap_ms: 0,
            reagent: reagent.into(),
            density_g_per_ml: 1.0,
            syringe_inner_diameter_mm: 14.43,
            syringe_volume_ml: 10.0,
            fill_ml: 10.0,
            balance: None,
            tolerance: dispense_tolerance(),
            refill_rate_ml_per_min: refill_rate(),
            safe_mode_watchdog_s: None,
            poll_interval_s: poll_s(),
            weigh_timeout_s: weigh_timeout_s(),
            limits: Limits::default(),
        }
    }

    /// An entry for the pump at `address` on the bus `bus` holding `reagent`, otherwise as
    /// [`Ne1000Entry::new`].
    pub fn on_bus(
        id: impl Into<String>,
        bus: impl Into<String>,
        address: u8,
        reagent: impl Into<String>,
    ) -> Self {
        Self {
            bus: Some(bus.into()),
            address,
            ..Self::new(id, "", reagent)
        }
    }

    /// The driver's config for a pump on a port of its own.
    pub fn driver_config(&self) -> Ne1000Config {
        let mut serial = SerialConfig::new(self.port.as_str(), Framing::Ne1000);
        serial.baud_rate = self.baud_rate;
        serial.timeout = Duration::from_millis(self.timeout_ms.max(1));
        serial.retries = self.retries;
        serial.gap = Duration::from_millis(self.gap_ms);
        let mut c = Ne1000Config::new(self.id.clone(), serial, self.reagent.clone());
        c.address = self.address;
        c.density_g_per_ml = self.density_g_per_ml;
        c.syringe_inner_diameter_mm = self.syringe_inner_diameter_mm;
        c.syringe_volume_ml = self.syringe_volume_ml;
        c.fill_ml = self.fill_ml;
        c.limits = self.limits.clone();
        c.tolerance = self.tolerance;
        c.refill_rate_ml_per_min = self.refill_rate_ml_per_min;
        c.safe_mode_watchdog_s = self.safe_mode_watchdog_s;
        c.poll_interval_s = self.poll_interval_s;
        c.weigh_timeout =
            Duration::try_from_secs_f64(self.weigh_timeout_s.max(0.0)).unwrap_or(Duration::MAX);
        c
    }
}

impl DeviceSpec for Ne1000Entry {
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
        let mut out: Vec<String> = self.driver_config().problems();
        match (self.port.is_empty(), &self.bus) {
            (true, None) => {
                out.push("port: give port (or bus) for the pump's serial line".to_owned())
            }
            (false, Some(_)) => {
                out.push("bus: give port or bus, not both (a bus owns its port)".to_owned())
            }
            _ => {}
        }
        if self.baud_rate == 0 {
            out.push("baud_rate: must be positive".to_owned());
        }
        if !(self.poll_interval_s.is_finite() && self.poll_interval_s > 0.0) {
            out.push("poll_interval_s: must be a positive number".to_owned());
        }
        out
    }

    fn limits(&self) -> Option<&Limits> {
        Some(&self.limits)
    }

    fn serial_port(&self) -> Option<PortUse<'_>> {
        (self.bus.is_none() && !self.port.is_empty()).then_some(PortUse {
            key: "port",
            port: &self.port,
        })
    }

    fn bus(&self) -> Option<BusUse<'_>> {
        self.bus.as_deref().map(|bus| BusUse {
            bus,
            address_key: "address",
            address: self.address,
            kinds: &["serial"],
        })
    }

    fn uses(&self) -> Vec<DeviceUse<'_>> {
        self.balance
            .as_deref()
            .map(|id| DeviceUse {
                key: "balance",
                id,
                driver: crate::balance::sics::config::Factory.name(),
            })
            .into_iter()
            .collect()
    }

    fn build(&self, ctx: &mut BuildContext) -> Result<Arc<dyn Device>, String> {
        // The balance is one driver object: its own device, and this pump's gravimetric check.
        let balance = match &self.balance {
            Some(id) => Some(ctx.get::<SicsBalance>(id).ok_or_else(|| {
                format!(
                    "device {}: balance: no mt_sics device \"{id}\" is configured",
                    self.id
                )
            })?),
            None => None,
        };
        let pump = match &self.bus {
            Some(name) => {
                let bus = ctx
                    .serial_bus(name, Framing::Ne1000)
                    .ok_or_else(|| {
                        format!(
                            "device {}: bus: no serial bus \"{name}\" is configured",
                            self.id
                        )
                    })?
                    .map_err(|e| format!("device {}: bus: {e}", self.id))?;
                let mut c = self.driver_config();
                c.serial = SerialConfig {
                    timeout: c.serial.timeout,
                    retries: c.serial.retries,
                    ..bus.config().clone()
                };
                let transport = bus.device(c.serial.timeout, c.serial.retries);
                Ne1000Pump::with_transport(c, transport, balance)
            }
            None => Ne1000Pump::new(self.driver_config(), balance),
        };
        Ok(Arc::new(pump))
    }

    fn clone_box(&self) -> Box<dyn DeviceSpec> {
        Box::new(self.clone())
    }
}
