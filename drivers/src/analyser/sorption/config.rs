//! The `driver = "sorption_mqtt"` entry of `[[devices]]`: an analyser reached through its MQTT
//! bridge (docs/mqtt-contract.md). Its keys, defaults and checks, and how it builds the driver.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use super::{SorptionAnalyser, SorptionConfig};
use crate::device::{Device, Limits};
use crate::registry::{BuildContext, DeviceSpec, DriverFactory, KeyError, parse_table};
use crate::transport::mqtt::{BrokerUrl, MqttConfig, MqttTls, ParseBrokerUrlError, Password};

/// The driver's registration.
pub struct Factory;

impl DriverFactory for Factory {
    fn name(&self) -> &'static str {
        "sorption_mqtt"
    }
    fn family(&self) -> &'static str {
        "analyser"
    }
    fn parse(&self, table: toml::Table) -> Result<Box<dyn DeviceSpec>, KeyError> {
        parse_table::<SorptionMqttEntry>(table).map(|e| Box::new(e) as Box<dyn DeviceSpec>)
    }
}

/// Keys of a `driver = "sorption_mqtt"` device: an analyser reached through its MQTT bridge.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SorptionMqttEntry {
    pub id: String,
    /// `mqtt://HOST[:PORT]` (default port 1883) or `mqtts://HOST[:PORT]` (TLS, 8883).
    pub broker: String,
    /// MQTT client id; default `ppud-{id}`. Keep it stable: the broker keeps the session under it.
    #[serde(default)]
    pub client_id: Option<String>,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<String>,
    /// Name of an environment variable holding the password (instead of `password`).
    #[serde(default)]
    pub password_env: Option<String>,
    #[serde(default)]
    pub tls_ca_file: Option<PathBuf>,
    #[serde(default)]
    pub tls_client_cert_file: Option<PathBuf>,
    #[serde(default)]
    pub tls_client_key_file: Option<PathBuf>,
    #[serde(default = "prefix")]
    pub topic_prefix: String,
    /// The bridge's id in its topics; default: the device id.
    #[serde(default)]
    pub bridge_id: Option<String>,
    #[serde(default = "keep_alive")]
    pub keep_alive_s: u64,
    #[serde(default = "ack_timeout")]
    pub ack_timeout_ms: u64,
    #[serde(default = "retries")]
    pub request_retries: u32,
    #[serde(default = "reconnect_max")]
    pub reconnect_max_ms: u64,
    #[serde(default = "outage_grace")]
    pub outage_grace_s: u64,
    #[serde(default = "malformed_limit")]
    pub malformed_limit: u32,
    #[serde(default = "malformed_window")]
    pub malformed_window_s: u64,
    #[serde(default = "mass")]
    pub default_sample_mass_g: f64,
    #[serde(default = "equilibration_interval")]
    pub equilibration_interval_s: f64,
    #[serde(default = "max_equilibration")]
    pub max_equilibration_s: f64,
    #[serde(default = "yes")]
    pub measure_free_space: bool,
    /// A point is accepted within `max(tolerance_relative · target, tolerance_bar)` of its
    /// target pressure; the driver refuses any other (docs/mqtt-contract.md §5.1).
    #[serde(default = "tolerance_bar")]
    pub tolerance_bar: f64,
    #[serde(default = "tolerance_relative")]
    pub tolerance_relative: f64,
    #[serde(default = "min_t")]
    pub min_isotherm_temperature_c: f64,
    #[serde(default = "max_t")]
    pub max_isotherm_temperature_c: f64,
    /// `max_pressure_bar` (isotherm), `max_temperature_c`/`min_temperature_c` (degas),
    /// `max_hold_s` (degas duration), `accepted.adsorptive` (the gases the instrument has).
    /// Absent keys take the driver's defaults.
    #[serde(default)]
    pub limits: Option<Limits>,
}

fn tolerance_bar() -> f64 {
    0.005
}
fn tolerance_relative() -> f64 {
    0.05
}
fn prefix() -> String {
    "lab/ppu/analyser".to_owned()
}
fn keep_alive() -> u64 {
    5
}
fn ack_timeout() -> u64 {
    3000
}
fn retries() -> u32 {
    2
}
fn reconnect_max() -> u64 {
    5000
}
fn outage_grace() -> u64 {
    30
}
fn malformed_limit() -> u32 {
    5
}
fn malformed_window() -> u64 {
    60
}
fn mass() -> f64 {
    0.1
}
fn equilibration_interval() -> f64 {
    10.0
}
fn max_equilibration() -> f64 {
    3600.0
}
fn min_t() -> f64 {
    -200.0
}
fn max_t() -> f64 {
    100.0
}
fn yes() -> bool {
    true
}

impl SorptionMqttEntry {
    /// An entry for a bridge on `broker` with every default.
    pub fn new(id: impl Into<String>, broker: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            broker: broker.into(),
            client_id: None,
            username: None,
            password: None,
            password_env: None,
            tls_ca_file: None,
            tls_client_cert_file: None,
            tls_client_key_file: None,
            topic_prefix: prefix(),
            bridge_id: None,
            keep_alive_s: keep_alive(),
            ack_timeout_ms: ack_timeout(),
            request_retries: retries(),
            reconnect_max_ms: reconnect_max(),
            outage_grace_s: outage_grace(),
            malformed_limit: malformed_limit(),
            malformed_window_s: malformed_window(),
            default_sample_mass_g: mass(),
            equilibration_interval_s: equilibration_interval(),
            max_equilibration_s: max_equilibration(),
            measure_free_space: true,
            tolerance_bar: tolerance_bar(),
            tolerance_relative: tolerance_relative(),
            min_isotherm_temperature_c: min_t(),
            max_isotherm_temperature_c: max_t(),
            limits: None,
        }
    }

    fn driver(&self) -> Result<SorptionAnalyser, String> {
        let broker: BrokerUrl = self
            .broker
            .parse()
            .map_err(|e: ParseBrokerUrlError| e.to_string())?;
        let tls = broker.tls;
        let mut mqtt = MqttConfig::new(
            broker,
            self.client_id
                .clone()
                .unwrap_or_else(|| format!("ppud-{}", self.id)),
        );
        let password = match (&self.password, &self.password_env) {
            (Some(p), _) => Some(p.clone()),
            (None, Some(var)) => Some(std::env::var(var).map_err(|_| {
                format!(
                    "device {}: password_env: environment variable {var} is not set",
                    self.id
                )
            })?),
            (None, None) => None,
        };
        if let Some(user) = &self.username {
            mqtt.credentials = Some((user.clone(), Password(password.unwrap_or_default())));
        }
        if tls {
            mqtt.tls = Some(MqttTls {
                ca_file: self.tls_ca_file.clone(),
                client_cert_file: self.tls_client_cert_file.clone(),
                client_key_file: self.tls_client_key_file.clone(),
            });
        }
        mqtt.keep_alive = Duration::from_secs(self.keep_alive_s.max(1));
        mqtt.ack_timeout = Duration::from_millis(self.ack_timeout_ms.max(1));
        mqtt.request_retries = self.request_retries;
        mqtt.reconnect_max = Duration::from_millis(self.reconnect_max_ms.max(100));
        let mut c = SorptionConfig::new(self.id.clone(), mqtt);
        c.topic_prefix = self.topic_prefix.clone();
        c.bridge_id = self.bridge_id.clone().unwrap_or_else(|| self.id.clone());
        if let Some(l) = &self.limits {
            let d = c.limits.clone();
            // Per limit and per parameter: a configured value (or list of the gases plumbed
            // to this instrument) replaces the driver's default one.
            c.limits = Limits {
                values: d.values.into_iter().chain(l.values.clone()).collect(),
                accepted: d.accepted.into_iter().chain(l.accepted.clone()).collect(),
            };
        }
        c.min_isotherm_temperature_c = self.min_isotherm_temperature_c;
        c.max_isotherm_temperature_c = self.max_isotherm_temperature_c;
        c.default_sample_mass_g = self.default_sample_mass_g;
        c.default_equilibration_interval_s = self.equilibration_interval_s;
        c.default_max_equilibration_s = self.max_equilibration_s;
        c.measure_free_space = self.measure_free_space;
        c.tolerance_bar = self.tolerance_bar;
        c.tolerance_relative = self.tolerance_relative;
        c.outage_grace = Duration::from_secs(self.outage_grace_s);
        c.malformed_limit = self.malformed_limit;
        c.malformed_window = Duration::from_secs(self.malformed_window_s.max(1));
        Ok(SorptionAnalyser::new(c))
    }
}

impl DeviceSpec for SorptionMqttEntry {
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
        if let Err(e) = self.broker.parse::<BrokerUrl>() {
            out.push(format!("broker: {e}"));
        }
        if self.password.is_some() && self.password_env.is_some() {
            out.push("password: give password or password_env, not both".to_owned());
        }
        if self.tls_client_cert_file.is_some() != self.tls_client_key_file.is_some() {
            out.push("tls_client_cert_file: needs tls_client_key_file (and vice versa)".to_owned());
        }
        if self.keep_alive_s == 0 {
            out.push("keep_alive_s: must be at least 1".to_owned());
        }
        for (key, v) in [
            ("default_sample_mass_g", self.default_sample_mass_g),
            ("equilibration_interval_s", self.equilibration_interval_s),
            ("max_equilibration_s", self.max_equilibration_s),
            ("tolerance_bar", self.tolerance_bar),
        ] {
            if !(v.is_finite() && v > 0.0) {
                out.push(format!("{key}: must be a positive number"));
            }
        }
        if !(self.tolerance_relative.is_finite() && (0.0..1.0).contains(&self.tolerance_relative)) {
            out.push("tolerance_relative: must be a fraction from 0 to below 1".to_owned());
        }
        let (lo, hi) = (
            self.min_isotherm_temperature_c,
            self.max_isotherm_temperature_c,
        );
        if lo.is_nan() || hi.is_nan() || lo >= hi {
            out.push(
                "min_isotherm_temperature_c: must be below max_isotherm_temperature_c".to_owned(),
            );
        }
        out
    }

    fn limits(&self) -> Option<&Limits> {
        self.limits.as_ref()
    }

    fn build(&self, _ctx: &mut BuildContext) -> Result<Arc<dyn Device>, String> {
        self.driver().map(|d| Arc::new(d) as Arc<dyn Device>)
    }

    fn clone_box(&self) -> Box<dyn DeviceSpec> {
        Box::new(self.clone())
    }
}
