//! The daemon's TOML configuration (`ppud serve --config FILE`). deploy/ppud.example.toml
//! documents every key; unknown keys are errors, so a typo never silently means "default".

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ppu_drivers::Device;
use ppu_drivers::analyser::{SorptionAnalyser, SorptionConfig};
use ppu_drivers::device::Limits;
use ppu_drivers::furnace::eurotherm::{Eurotherm, EurothermConfig, IdentCheck};
use ppu_drivers::transport::modbus::{ModbusBus, ModbusConfig, ModbusEndpoint};
use ppu_drivers::transport::mqtt::{BrokerUrl, MqttConfig, MqttTls, ParseBrokerUrlError};
use ppu_drivers::transport::serial::{Framing, SerialBus};
use serde::Deserialize;

mod security;

pub use security::{
    AuthConfig, LocalConfig, LogConfig, LogFormat, MetricsConfig, SecurityConfig, TlsConfig,
};

use crate::devices::{PollSettings, RetryPolicy};
use crate::recovery::RecoveryPolicy;

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

/// The whole configuration file, except the policy tables ([`Policies`]). Unknown top-level
/// keys are refused by [`Config::parse`] (which knows both), nested ones by serde.
#[derive(Debug, Clone, Deserialize)]
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
    /// Shared lines (RS-485 Modbus RTU multi-drop, NE-1000 daisy chains, a Modbus TCP
    /// gateway), each configured once; devices on one name it with their address.
    #[serde(default)]
    pub buses: Vec<BusConfig>,
    #[serde(default)]
    pub devices: Vec<DeviceConfig>,
}

/// One shared line, tagged by its kind. A serial port opens exclusively, so the bus owns the
/// port and serves every device that names it, one exchange at a time, each device with its
/// own address, timeout and retries.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum BusConfig {
    /// Modbus RTU on an RS-485 (or RS-232) line: Eurotherm controllers by `unit_id`.
    ModbusRtu(ModbusRtuBus),
    /// One Modbus TCP connection to a TCP-to-RTU gateway: Eurotherm controllers by `unit_id`.
    ModbusTcp(ModbusTcpBus),
    /// An RS-232 line with NE-1000 pumps daisy-chained by `address`.
    Serial(SerialBusEntry),
}

/// Keys of a `kind = "modbus_rtu"` bus.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModbusRtuBus {
    pub id: String,
    /// Serial device, e.g. `/dev/serial/by-id/…`.
    pub port: String,
    #[serde(default = "baud_9600")]
    pub baud_rate: u32,
}

/// Keys of a `kind = "modbus_tcp"` bus.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModbusTcpBus {
    pub id: String,
    /// The gateway, `IP:PORT`.
    pub address: String,
}

/// Keys of a `kind = "serial"` bus.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialBusEntry {
    pub id: String,
    pub port: String,
    #[serde(default = "baud_9600")]
    pub baud_rate: u32,
    /// Least real milliseconds between the end of one exchange and the next command.
    #[serde(default)]
    pub gap_ms: u64,
}

impl BusConfig {
    pub fn id(&self) -> &str {
        match self {
            BusConfig::ModbusRtu(b) => &b.id,
            BusConfig::ModbusTcp(b) => &b.id,
            BusConfig::Serial(b) => &b.id,
        }
    }

    /// The `kind` key's value.
    pub fn kind(&self) -> &'static str {
        match self {
            BusConfig::ModbusRtu(_) => "modbus_rtu",
            BusConfig::ModbusTcp(_) => "modbus_tcp",
            BusConfig::Serial(_) => "serial",
        }
    }

    /// The serial port the bus opens exclusively, if it is on one.
    fn serial_port(&self) -> Option<&str> {
        match self {
            BusConfig::ModbusRtu(b) => Some(&b.port),
            BusConfig::Serial(b) => Some(&b.port),
            BusConfig::ModbusTcp(_) => None,
        }
    }

    /// The Modbus endpoint of a Modbus bus.
    fn modbus_endpoint(&self) -> Option<Result<ModbusEndpoint, String>> {
        match self {
            BusConfig::ModbusRtu(b) => Some(Ok(ModbusEndpoint::Rtu {
                path: b.port.clone(),
                baud_rate: b.baud_rate,
            })),
            BusConfig::ModbusTcp(b) => Some(
                b.address
                    .parse::<SocketAddr>()
                    .map(ModbusEndpoint::Tcp)
                    .map_err(|_| {
                        format!(
                            "{:?} is not an IP address and port, e.g. 192.168.10.20:502",
                            b.address
                        )
                    }),
            ),
            BusConfig::Serial(_) => None,
        }
    }

    /// Problems, each starting with the key's name.
    fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.id().is_empty() {
            out.push("id: must not be empty".to_owned());
        }
        if let Some(port) = self.serial_port()
            && port.is_empty()
        {
            out.push("port: must not be empty".to_owned());
        }
        match self {
            BusConfig::ModbusRtu(ModbusRtuBus { baud_rate, .. })
            | BusConfig::Serial(SerialBusEntry { baud_rate, .. })
                if *baud_rate == 0 =>
            {
                out.push("baud_rate: must be positive".to_owned());
            }
            _ => {}
        }
        if let Some(Err(m)) = self.modbus_endpoint() {
            out.push(format!("address: {m}"));
        }
        out
    }
}

/// A configured bus, opened (lazily) once and shared by the devices naming it.
enum Bus {
    Modbus(Arc<ModbusBus>),
    Serial(Arc<SerialBus>),
}

impl Bus {
    fn open(config: &BusConfig) -> Result<Bus, String> {
        match config {
            BusConfig::Serial(b) => {
                let mut s = ppu_drivers::transport::serial::SerialConfig::new(
                    b.port.clone(),
                    Framing::Ne1000,
                );
                s.baud_rate = b.baud_rate;
                s.gap = Duration::from_millis(b.gap_ms);
                Ok(Bus::Serial(SerialBus::new(s)))
            }
            _ => match config.modbus_endpoint() {
                Some(Ok(endpoint)) => Ok(Bus::Modbus(ModbusBus::new(endpoint))),
                Some(Err(m)) => Err(format!("bus {}: address: {m}", config.id())),
                None => Err(format!("bus {}: not a Modbus bus", config.id())),
            },
        }
    }
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
    /// A gas-sorption analyser behind an MQTT bridge (docs/mqtt-contract.md).
    SorptionMqtt(SorptionMqttEntry),
    /// A New Era NE-1000/NE-4000 syringe pump holding one reagent, over RS-232.
    Ne1000(Ne1000Entry),
    /// A Mettler Toledo balance speaking MT-SICS over RS-232.
    MtSics(MtSicsEntry),
}

/// Keys of a `driver = "eurotherm"` device.
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

    fn driver(&self, buses: &BTreeMap<&str, Bus>) -> Result<Eurotherm, String> {
        let bus = match &self.bus {
            Some(name) => match buses.get(name.as_str()) {
                Some(Bus::Modbus(bus)) => Some(bus),
                _ => {
                    return Err(format!(
                        "device {}: bus: no Modbus bus \"{name}\" is configured",
                        self.id
                    ));
                }
            },
            None => None,
        };
        let endpoint: ModbusEndpoint = match bus {
            Some(bus) => bus.endpoint().clone(),
            None => self
                .endpoint
                .parse()
                .map_err(|e: ppu_drivers::transport::modbus::ParseEndpointError| e.to_string())?,
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

/// Every top-level key of the config file: [`Config`]'s and [`Policies`]'.
const TOP_LEVEL_KEYS: [&str; 15] = [
    "listen",
    "data_dir",
    "time_scale",
    "poll",
    "buses",
    "devices",
    "recovery",
    "retry",
    "insecure_plaintext",
    "auth",
    "tls",
    "local",
    "metrics",
    "log",
    "limits",
];

/// Daemon-wide policies: the `[recovery]` and `[retry]` tables. Parsed from the same file as
/// [`Config`] but kept apart from it, so code that builds a `Config` field by field needs no
/// change when a policy is added.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Policies {
    /// Crash recovery (`on_restart`, `furnace`).
    #[serde(default)]
    pub recovery: RecoveryPolicy,
    /// Retries of transient device errors.
    #[serde(default)]
    pub retry: RetryConfig,
    /// Who may connect and how: `[auth]`, `[tls]`, `[local]`, `[metrics]`, `[log]`, `[limits]`.
    #[serde(flatten)]
    pub security: SecurityConfig,
}

/// The `[retry]` table: retries of transient link errors (timeouts, disconnects) around status
/// reads, safe-state commands and alarm acknowledgements, on top of the transport's own
/// per-request retries. Steps are never re-sent.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// Extra attempts after the first.
    pub retries: u32,
    /// Real milliseconds before the first retry; doubles per retry, at most 5 s.
    pub retry_backoff_ms: u64,
    /// Per-device overrides, by device id.
    pub devices: BTreeMap<String, DeviceRetry>,
}

/// A `[retry.devices.ID]` table; unset keys fall back to `[retry]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceRetry {
    pub retries: Option<u32>,
    pub retry_backoff_ms: Option<u64>,
}

/// Most retries a policy may ask for: beyond this a dead link only delays the safe state.
const MAX_RETRIES: u32 = 20;
/// Longest backoff a policy may ask for, ms.
const MAX_RETRY_BACKOFF_MS: u64 = 60_000;

impl Default for RetryConfig {
    fn default() -> Self {
        let d = RetryPolicy::default();
        Self {
            retries: d.retries,
            retry_backoff_ms: d.backoff.as_millis() as u64,
            devices: BTreeMap::new(),
        }
    }
}

impl RetryConfig {
    /// The policy of one device.
    pub fn policy(&self, device_id: &str) -> RetryPolicy {
        let o = self.devices.get(device_id).cloned().unwrap_or_default();
        RetryPolicy {
            retries: o.retries.unwrap_or(self.retries),
            backoff: Duration::from_millis(o.retry_backoff_ms.unwrap_or(self.retry_backoff_ms)),
        }
    }

    fn problems(&self, devices: &[DeviceConfig]) -> Vec<String> {
        let mut out = Vec::new();
        let mut check = |path: String, retries: Option<u32>, backoff: Option<u64>| {
            if let Some(r) = retries.filter(|r| *r > MAX_RETRIES) {
                out.push(format!("{path}.retries: {r} is more than {MAX_RETRIES}"));
            }
            if let Some(b) = backoff.filter(|b| *b > MAX_RETRY_BACKOFF_MS) {
                out.push(format!(
                    "{path}.retry_backoff_ms: {b} is more than {MAX_RETRY_BACKOFF_MS}"
                ));
            }
        };
        check(
            "retry".to_owned(),
            Some(self.retries),
            Some(self.retry_backoff_ms),
        );
        for (id, d) in &self.devices {
            check(format!("retry.devices.{id}"), d.retries, d.retry_backoff_ms);
        }
        for id in self.devices.keys() {
            if !devices.iter().any(|c| c.id() == id) {
                out.push(format!(
                    "retry.devices.{id}: no device \"{id}\" is configured"
                ));
            }
        }
        out
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
    #[serde(default = "sorption_prefix")]
    pub topic_prefix: String,
    /// The bridge's id in its topics; default: the device id.
    #[serde(default)]
    pub bridge_id: Option<String>,
    #[serde(default = "sorption_keep_alive")]
    pub keep_alive_s: u64,
    #[serde(default = "sorption_ack_timeout")]
    pub ack_timeout_ms: u64,
    #[serde(default = "retries")]
    pub request_retries: u32,
    #[serde(default = "sorption_reconnect_max")]
    pub reconnect_max_ms: u64,
    #[serde(default = "sorption_outage_grace")]
    pub outage_grace_s: u64,
    #[serde(default = "sorption_malformed_limit")]
    pub malformed_limit: u32,
    #[serde(default = "sorption_malformed_window")]
    pub malformed_window_s: u64,
    #[serde(default = "sorption_mass")]
    pub default_sample_mass_g: f64,
    #[serde(default = "sample_s")]
    pub equilibration_interval_s: f64,
    #[serde(default = "settle_s")]
    pub max_equilibration_s: f64,
    #[serde(default = "yes")]
    pub measure_free_space: bool,
    /// A point is accepted within `max(tolerance_relative · target, tolerance_bar)` of its
    /// target pressure; the driver refuses any other (docs/mqtt-contract.md §5.1).
    #[serde(default = "sorption_tolerance_bar")]
    pub tolerance_bar: f64,
    #[serde(default = "sorption_tolerance_relative")]
    pub tolerance_relative: f64,
    #[serde(default = "sorption_min_t")]
    pub min_isotherm_temperature_c: f64,
    #[serde(default = "sorption_max_t")]
    pub max_isotherm_temperature_c: f64,
    /// `max_pressure_bar` (isotherm), `max_temperature_c`/`min_temperature_c` (degas),
    /// `max_hold_s` (degas duration), `accepted.adsorptive` (the gases the instrument has).
    /// Absent keys take the driver's defaults.
    #[serde(default)]
    pub limits: Option<Limits>,
}

fn sorption_tolerance_bar() -> f64 {
    0.005
}
fn sorption_tolerance_relative() -> f64 {
    0.05
}
fn sorption_prefix() -> String {
    "lab/ppu/analyser".to_owned()
}
fn sorption_keep_alive() -> u64 {
    5
}
fn sorption_ack_timeout() -> u64 {
    3000
}
fn sorption_reconnect_max() -> u64 {
    5000
}
fn sorption_outage_grace() -> u64 {
    30
}
fn sorption_malformed_limit() -> u32 {
    5
}
fn sorption_malformed_window() -> u64 {
    60
}
fn sorption_mass() -> f64 {
    0.1
}
fn sorption_min_t() -> f64 {
    -200.0
}
fn sorption_max_t() -> f64 {
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
            topic_prefix: sorption_prefix(),
            bridge_id: None,
            keep_alive_s: sorption_keep_alive(),
            ack_timeout_ms: sorption_ack_timeout(),
            request_retries: retries(),
            reconnect_max_ms: sorption_reconnect_max(),
            outage_grace_s: sorption_outage_grace(),
            malformed_limit: sorption_malformed_limit(),
            malformed_window_s: sorption_malformed_window(),
            default_sample_mass_g: sorption_mass(),
            equilibration_interval_s: sample_s(),
            max_equilibration_s: settle_s(),
            measure_free_space: true,
            tolerance_bar: sorption_tolerance_bar(),
            tolerance_relative: sorption_tolerance_relative(),
            min_isotherm_temperature_c: sorption_min_t(),
            max_isotherm_temperature_c: sorption_max_t(),
            limits: None,
        }
    }

    /// Problems, each starting with the key's name.
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
            mqtt.credentials = Some((
                user.clone(),
                ppu_drivers::transport::mqtt::Password(password.unwrap_or_default()),
            ));
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

/// Keys of a `driver = "ne1000"` device: one pump, its syringe and the reagent in it.
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
    #[serde(default = "pump_timeout_ms")]
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
    #[serde(default = "pump_poll_s")]
    pub poll_interval_s: f64,
    /// Real seconds the balance may take to settle for the tare and the weighing.
    #[serde(default = "ten")]
    pub weigh_timeout_s: f64,
    #[serde(default)]
    pub limits: Limits,
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
fn pump_timeout_ms() -> u64 {
    500
}
fn dispense_tolerance() -> f64 {
    0.02
}
fn refill_rate() -> f64 {
    10.0
}
fn pump_poll_s() -> f64 {
    2.0
}
fn ten() -> f64 {
    10.0
}

fn serial_config(
    port: &str,
    baud_rate: u32,
    framing: ppu_drivers::transport::serial::Framing,
    timeout_ms: u64,
    retries: u32,
    gap_ms: u64,
) -> ppu_drivers::transport::serial::SerialConfig {
    let mut s = ppu_drivers::transport::serial::SerialConfig::new(port, framing);
    s.baud_rate = baud_rate;
    s.timeout = Duration::from_millis(timeout_ms.max(1));
    s.retries = retries;
    s.gap = Duration::from_millis(gap_ms);
    s
}

fn real_seconds(s: f64) -> Duration {
    Duration::try_from_secs_f64(s.max(0.0)).unwrap_or(Duration::MAX)
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
            timeout_ms: pump_timeout_ms(),
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
            poll_interval_s: pump_poll_s(),
            weigh_timeout_s: ten(),
            limits: Limits::default(),
        }
    }

    pub fn driver_config(&self) -> ppu_drivers::dispenser::ne1000::Ne1000Config {
        use ppu_drivers::transport::serial::Framing;
        let serial = serial_config(
            &self.port,
            self.baud_rate,
            Framing::Ne1000,
            self.timeout_ms,
            self.retries,
            self.gap_ms,
        );
        let mut c = ppu_drivers::dispenser::ne1000::Ne1000Config::new(
            self.id.clone(),
            serial,
            self.reagent.clone(),
        );
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
        c.weigh_timeout = real_seconds(self.weigh_timeout_s);
        c
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

    fn problems(&self, balances: &[&str]) -> Vec<String> {
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
        if let Some(b) = &self.balance
            && !balances.contains(&b.as_str())
        {
            out.push(format!("balance: no mt_sics device \"{b}\" is configured"));
        }
        out
    }
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

    pub fn driver(&self) -> ppu_drivers::balance::sics::SicsBalance {
        use ppu_drivers::balance::sics::{SicsBalance, SicsConfig};
        let serial = serial_config(
            &self.port,
            self.baud_rate,
            ppu_drivers::transport::serial::Framing::CrLf,
            self.timeout_ms,
            self.retries,
            self.gap_ms,
        );
        let mut c = SicsConfig::new(self.id.clone(), serial);
        c.stability_timeout = real_seconds(self.stability_timeout_s);
        c.limits = self.limits.clone();
        SicsBalance::new(c)
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
}

impl DeviceConfig {
    pub fn id(&self) -> &str {
        match self {
            DeviceConfig::Eurotherm(e) => &e.id,
            DeviceConfig::SorptionMqtt(e) => &e.id,
            DeviceConfig::Ne1000(e) => &e.id,
            DeviceConfig::MtSics(e) => &e.id,
        }
    }

    /// The serial port a device opens exclusively itself (not through a bus), if it is on one.
    fn serial_port(&self) -> Option<&str> {
        match self {
            DeviceConfig::Ne1000(e) if e.bus.is_none() && !e.port.is_empty() => Some(&e.port),
            DeviceConfig::MtSics(e) => Some(&e.port),
            DeviceConfig::Eurotherm(e) if e.bus.is_none() => match e.endpoint.parse() {
                Ok(ModbusEndpoint::Rtu { path, .. }) => {
                    let start = e.endpoint.find(path.as_str()).unwrap_or(0);
                    e.endpoint.get(start..start + path.len())
                }
                _ => None,
            },
            _ => None,
        }
    }

    /// The key naming [`DeviceConfig::serial_port`].
    fn port_key(&self) -> &'static str {
        match self {
            DeviceConfig::Eurotherm(_) => "endpoint",
            _ => "port",
        }
    }

    /// The bus a device names and its address there.
    fn bus_address(&self) -> Option<(&str, u8)> {
        match self {
            DeviceConfig::Eurotherm(e) => e.bus.as_deref().map(|b| (b, e.unit_id)),
            DeviceConfig::Ne1000(e) => e.bus.as_deref().map(|b| (b, e.address)),
            _ => None,
        }
    }

    /// The `driver` key's value.
    fn driver_name(&self) -> &'static str {
        match self {
            DeviceConfig::Eurotherm(_) => "eurotherm",
            DeviceConfig::SorptionMqtt(_) => "sorption_mqtt",
            DeviceConfig::Ne1000(_) => "ne1000",
            DeviceConfig::MtSics(_) => "mt_sics",
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
        Self::parse_with_policies(text, path).map(|(c, _)| c)
    }

    /// Reads and validates a config file with its policy tables.
    pub fn load_with_policies(path: &Path) -> Result<(Config, Policies), ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse_with_policies(&text, path)
    }

    /// Parses and validates config text with its policy tables.
    pub fn parse_with_policies(text: &str, path: &Path) -> Result<(Config, Policies), ConfigError> {
        let (c, p) = Self::parse_unchecked(text, path)?;
        c.problems_with(&p)
            .into_iter()
            .next()
            .map_or(Ok((c, p)), |message| {
                Err(ConfigError::Invalid {
                    path: path.to_owned(),
                    message,
                })
            })
    }

    /// Parses config text (refusing unknown keys) without checking values; see
    /// [`Config::problems_with`].
    pub fn parse_unchecked(text: &str, path: &Path) -> Result<(Config, Policies), ConfigError> {
        let parse_error = |e: toml::de::Error| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        };
        let table: toml::Table = toml::from_str(text).map_err(parse_error)?;
        if let Some(key) = table.keys().find(|k| !TOP_LEVEL_KEYS.contains(&k.as_str())) {
            return Err(ConfigError::Parse {
                path: path.to_owned(),
                message: format!(
                    "unknown key `{key}`, expected one of {}",
                    TOP_LEVEL_KEYS.join(", ")
                ),
            });
        }
        let c: Config = toml::from_str(text).map_err(parse_error)?;
        let mut p: Policies = toml::from_str(text).map_err(parse_error)?;
        p.security.base_dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        Ok((c, p))
    }

    /// Every problem of the config and its policies, one line each.
    pub fn problems_with(&self, policies: &Policies) -> Vec<String> {
        let mut out = self.problems();
        out.extend(policies.retry.problems(&self.devices));
        out.extend(policies.recovery.problems());
        if let Err(problems) = policies.security.resolve(self.listen) {
            out.extend(problems);
        }
        out
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
                    match (e.endpoint.is_empty(), &e.bus) {
                        (true, None) => out.push(format!(
                            "devices[{i}].endpoint: give endpoint (or bus) for the controller's link"
                        )),
                        (false, Some(_)) => out.push(format!(
                            "devices[{i}].bus: give endpoint or bus, not both (a bus owns its link)"
                        )),
                        (false, None) => {
                            if let Err(m) = e.endpoint.parse::<ModbusEndpoint>() {
                                out.push(format!("devices[{i}].endpoint: {m}"));
                            }
                        }
                        (true, Some(_)) => {}
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
                    if let Some(Err(m)) = e.expected_ident.as_ref().map(ExpectedIdent::check) {
                        out.push(format!("devices[{i}].{m}"));
                    }
                }
                DeviceConfig::SorptionMqtt(e) => {
                    out.extend(
                        e.problems()
                            .into_iter()
                            .map(|m| format!("devices[{i}].{m}")),
                    );
                }
                DeviceConfig::Ne1000(e) => {
                    let balances: Vec<&str> = self
                        .devices
                        .iter()
                        .filter_map(|d| match d {
                            DeviceConfig::MtSics(b) => Some(b.id.as_str()),
                            _ => None,
                        })
                        .collect();
                    out.extend(
                        e.problems(&balances)
                            .into_iter()
                            .map(|m| format!("devices[{i}].{m}")),
                    );
                }
                DeviceConfig::MtSics(e) => {
                    out.extend(
                        e.problems()
                            .into_iter()
                            .map(|m| format!("devices[{i}].{m}")),
                    );
                }
            }
            // Serial ports open exclusively: two devices on one port would lock each other out.
            if let Some(port) = d.serial_port() {
                let key = d.port_key();
                if let Some(j) = self.devices[..i]
                    .iter()
                    .position(|o| o.serial_port() == Some(port))
                {
                    out.push(format!(
                        "devices[{i}].{key}: \"{port}\" is already used by devices[{j}] (a serial port opens exclusively; put both on a [[buses]] entry)"
                    ));
                } else if let Some(j) = self
                    .buses
                    .iter()
                    .position(|b| b.serial_port() == Some(port))
                {
                    out.push(format!(
                        "devices[{i}].{key}: \"{port}\" is the port of buses[{j}]; name the bus instead (bus = \"{}\")",
                        self.buses[j].id()
                    ));
                }
            }
            out.extend(self.bus_problems_of(i, d));
        }
        out.extend(self.buses_problems());
        out
    }

    /// Problems of the buses themselves: ids, ports, keys.
    fn buses_problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (i, b) in self.buses.iter().enumerate() {
            out.extend(b.problems().into_iter().map(|m| format!("buses[{i}].{m}")));
            if let Some(j) = self.buses[..i].iter().position(|o| o.id() == b.id()) {
                out.push(format!(
                    "buses[{i}].id: duplicate id \"{}\" (buses[{j}])",
                    b.id()
                ));
            }
            if let Some(port) = b.serial_port()
                && let Some(j) = self.buses[..i]
                    .iter()
                    .position(|o| o.serial_port() == Some(port))
            {
                out.push(format!(
                    "buses[{i}].port: \"{port}\" is already used by buses[{j}] (a serial port opens exclusively)"
                ));
            }
        }
        out
    }

    /// Problems of device `i`'s place on a bus: the bus exists, is of the right kind, and no
    /// earlier device holds the same address on it.
    fn bus_problems_of(&self, i: usize, d: &DeviceConfig) -> Vec<String> {
        let Some((name, address)) = d.bus_address() else {
            return Vec::new();
        };
        let Some(bus) = self.buses.iter().find(|b| b.id() == name) else {
            let known: Vec<&str> = self.buses.iter().map(BusConfig::id).collect();
            return vec![format!(
                "devices[{i}].bus: no bus \"{name}\" is configured (buses: {})",
                if known.is_empty() {
                    "none".to_owned()
                } else {
                    known.join(", ")
                }
            )];
        };
        let (wanted, key): (&[&str], &str) = match d {
            DeviceConfig::Eurotherm(_) => (&["modbus_rtu", "modbus_tcp"], "unit_id"),
            _ => (&["serial"], "address"),
        };
        let mut out = Vec::new();
        if !wanted.contains(&bus.kind()) {
            out.push(format!(
                "devices[{i}].bus: \"{name}\" is a {} bus; a {} device needs a {} bus",
                bus.kind(),
                d.driver_name(),
                wanted.join(" or ")
            ));
        }
        if let BusConfig::ModbusRtu(_) = bus
            && !(1..=247).contains(&address)
        {
            out.push(format!(
                "devices[{i}].unit_id: {address} is not a Modbus RTU slave address (1–247)"
            ));
        }
        if let Some(j) = self.devices[..i]
            .iter()
            .position(|o| o.bus_address() == Some((name, address)))
        {
            out.push(format!(
                "devices[{i}].{key}: {address} on bus \"{name}\" is already used by devices[{j}] ({})",
                self.devices[j].id()
            ));
        }
        out
    }

    /// Instantiates the configured drivers, each bus opened once and shared by its devices.
    pub fn drivers(&self) -> Result<Vec<Arc<dyn Device>>, String> {
        let buses = self
            .buses
            .iter()
            .map(|b| Bus::open(b).map(|bus| (b.id(), bus)))
            .collect::<Result<BTreeMap<&str, Bus>, String>>()?;
        // A balance is one driver object: its own device, and the gravimetric check of the
        // pumps whose `balance` names it.
        let balances: std::collections::HashMap<
            &str,
            Arc<ppu_drivers::balance::sics::SicsBalance>,
        > = self
            .devices
            .iter()
            .filter_map(|d| match d {
                DeviceConfig::MtSics(b) => Some((b.id.as_str(), Arc::new(b.driver()))),
                _ => None,
            })
            .collect();
        self.devices
            .iter()
            .map(|d| match d {
                DeviceConfig::Eurotherm(e) => {
                    e.driver(&buses).map(|x| Arc::new(x) as Arc<dyn Device>)
                }
                DeviceConfig::SorptionMqtt(e) => e.driver().map(|x| Arc::new(x) as Arc<dyn Device>),
                DeviceConfig::MtSics(b) => balances
                    .get(b.id.as_str())
                    .map(|x| Arc::clone(x) as Arc<dyn Device>)
                    .ok_or_else(|| format!("balance {} missing", b.id)),
                DeviceConfig::Ne1000(p) => {
                    let balance = match &p.balance {
                        Some(id) => {
                            Some(Arc::clone(balances.get(id.as_str()).ok_or_else(|| {
                                format!(
                                    "device {}: balance: no mt_sics device \"{id}\" is configured",
                                    p.id
                                )
                            })?))
                        }
                        None => None,
                    };
                    let pump = match &p.bus {
                        Some(name) => {
                            let Some(Bus::Serial(bus)) = buses.get(name.as_str()) else {
                                return Err(format!(
                                    "device {}: bus: no serial bus \"{name}\" is configured",
                                    p.id
                                ));
                            };
                            let mut c = p.driver_config();
                            c.serial = ppu_drivers::transport::serial::SerialConfig {
                                timeout: c.serial.timeout,
                                retries: c.serial.retries,
                                ..bus.config().clone()
                            };
                            let transport = bus.device(c.serial.timeout, c.serial.retries);
                            ppu_drivers::dispenser::ne1000::Ne1000Pump::with_transport(
                                c, transport, balance,
                            )
                        }
                        None => ppu_drivers::dispenser::ne1000::Ne1000Pump::new(
                            p.driver_config(),
                            balance,
                        ),
                    };
                    Ok(Arc::new(pump) as Arc<dyn Device>)
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example's real path: its tokens_file is relative to it.
    fn example_path() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/ppud.example.toml")
    }

    #[test]
    fn the_example_config_parses() {
        let text = include_str!("../../deploy/ppud.example.toml");
        let c = Config::parse(text, &example_path()).unwrap();
        assert!(!c.devices.is_empty());
        assert!(c.drivers().is_ok());
    }

    #[test]
    fn policies_parse_with_defaults_overrides_and_named_errors() {
        use crate::recovery::{AdoptPolicy, OnRestart};
        let dev = "[auth]\nopen = true\n[[devices]]\ndriver = \"eurotherm\"\nid = \"f\"\nendpoint = \"modbus-tcp://127.0.0.1:502\"\n";
        let (_, p) = Config::parse_with_policies(dev, Path::new("x.toml")).unwrap();
        assert_eq!(p.recovery.on_restart, OnRestart::Interrupt);
        assert_eq!(p.recovery.for_family("furnace"), AdoptPolicy::Safe);
        assert_eq!(p.retry.policy("f"), RetryPolicy::default());
        let text = format!(
            "[recovery]\non_restart = \"resume\"\nfurnace = \"adopt\"\n[retry]\nretries = 1\n\
             [retry.devices.f]\nretry_backoff_ms = 900\n{dev}"
        );
        let (_, p) = Config::parse_with_policies(&text, Path::new("x.toml")).unwrap();
        assert_eq!(p.recovery.on_restart, OnRestart::Resume);
        assert_eq!(p.recovery.for_family("furnace"), AdoptPolicy::Adopt);
        assert_eq!(
            p.retry.policy("f"),
            RetryPolicy {
                retries: 1,
                backoff: Duration::from_millis(900)
            }
        );
        let e = Config::parse("[recovery]\nfurnace = \"melt\"\n", Path::new("x.toml")).unwrap_err();
        assert!(e.to_string().contains("melt"), "{e}");
        let e = Config::parse(
            &format!("[retry.devices.g]\nretries = 1\n{dev}"),
            Path::new("x.toml"),
        )
        .unwrap_err();
        assert!(e.to_string().contains("retry.devices.g"), "{e}");
        let e = Config::parse("[retry]\nretries = 99\n", Path::new("x.toml")).unwrap_err();
        assert!(e.to_string().contains("retry.retries"), "{e}");
    }

    #[test]
    fn dispensing_stations_parse_and_bad_references_are_named() {
        let text = include_str!("../../deploy/ppud.example.toml");
        let c = Config::parse(text, &example_path()).unwrap();
        let drivers = c.drivers().unwrap();
        let pump = drivers.iter().find(|d| d.info().id == "pump-a").unwrap();
        assert_eq!(pump.info().driver, "ne1000");
        assert!(pump.info().transport.contains("weighed by balance-1"));
        assert!(drivers.iter().any(|d| d.info().driver == "mt_sics"));
        let base = "[auth]\nopen = true\n[[devices]]\ndriver = \"ne1000\"\nid = \"p\"\nport = \"/dev/ttyUSB3\"\n\
                    reagent = \"A\"\ndensity_g_per_ml = 1.0\nsyringe_inner_diameter_mm = 14.43\n\
                    syringe_volume_ml = 10.0\nfill_ml = 5.0\n";
        Config::parse(base, Path::new("x.toml")).unwrap();
        let e =
            Config::parse(&format!("{base}balance = \"nope\"\n"), Path::new("x.toml")).unwrap_err();
        assert!(e.to_string().contains("devices[0].balance"), "{e}");
        let e = Config::parse(
            &base.replace("fill_ml = 5.0", "fill_ml = 12.0"),
            Path::new("x.toml"),
        )
        .unwrap_err();
        assert!(e.to_string().contains("devices[0].fill_ml"), "{e}");
        let second = base
            .replace("id = \"p\"", "id = \"q\"")
            .replace("[auth]\nopen = true\n", "");
        let twice = format!("{base}{second}");
        let e = Config::parse(&twice, Path::new("x.toml")).unwrap_err();
        assert!(e.to_string().contains("devices[1].port"), "{e}");
    }

    #[test]
    fn shared_buses_parse_and_misconfigurations_are_named() {
        let buses = "[auth]\nopen = true\n\
            [[buses]]\nid = \"rs485-a\"\nkind = \"modbus_rtu\"\nport = \"/dev/ttyUSB0\"\nbaud_rate = 19200\n\
            [[buses]]\nid = \"chain\"\nkind = \"serial\"\nport = \"/dev/ttyUSB1\"\n";
        let furnace = |id: &str, unit: u8| {
            format!(
                "[[devices]]\ndriver = \"eurotherm\"\nid = \"{id}\"\nbus = \"rs485-a\"\nunit_id = {unit}\n"
            )
        };
        let pump = |id: &str, bus: &str, address: u8| {
            format!(
                "[[devices]]\ndriver = \"ne1000\"\nid = \"{id}\"\nbus = \"{bus}\"\naddress = {address}\n\
                 reagent = \"{id}\"\ndensity_g_per_ml = 1.0\nsyringe_inner_diameter_mm = 14.43\n\
                 syringe_volume_ml = 10.0\nfill_ml = 5.0\n"
            )
        };
        let good = format!(
            "{buses}{}{}{}{}",
            furnace("f1", 1),
            furnace("f2", 2),
            pump("p1", "chain", 1),
            pump("p2", "chain", 2)
        );
        let c = Config::parse(&good, Path::new("x.toml")).unwrap();
        let drivers = c.drivers().unwrap();
        let info = |id: &str| {
            drivers
                .iter()
                .find(|d| d.info().id == id)
                .unwrap()
                .info()
                .transport
                .clone()
        };
        assert_eq!(info("f2"), "modbus-rtu:///dev/ttyUSB0@19200 unit 2");
        assert!(
            info("p2").starts_with("serial:///dev/ttyUSB1@9600 address 2"),
            "{}",
            info("p2")
        );
        // Controllers behind a Modbus TCP gateway share one connection the same way.
        let gateway = format!(
            "[auth]\nopen = true\n[[buses]]\nid = \"gw\"\nkind = \"modbus_tcp\"\naddress = \"10.0.0.2:502\"\n{}",
            furnace("f9", 9).replace("rs485-a", "gw")
        );
        let c = Config::parse(&gateway, Path::new("x.toml")).unwrap();
        let drivers = c.drivers().unwrap();
        assert_eq!(
            drivers[0].info().transport,
            "modbus-tcp://10.0.0.2:502 unit 9"
        );

        let problem = |text: String| {
            Config::parse(&text, Path::new("x.toml"))
                .unwrap_err()
                .to_string()
        };
        // Two devices at one address.
        let e = problem(format!("{buses}{}{}", furnace("f1", 2), furnace("f2", 2)));
        assert!(
            e.contains(
                "devices[1].unit_id: 2 on bus \"rs485-a\" is already used by devices[0] (f1)"
            ),
            "{e}"
        );
        let e = problem(format!(
            "{buses}{}{}",
            pump("p1", "chain", 3),
            pump("p2", "chain", 3)
        ));
        assert!(e.contains("devices[1].address: 3 on bus \"chain\""), "{e}");
        // An unknown bus; a bus of the wrong kind.
        let e = problem(format!(
            "{buses}{}",
            furnace("f1", 1).replace("rs485-a", "rs485-b")
        ));
        assert!(
            e.contains("devices[0].bus: no bus \"rs485-b\" is configured (buses: rs485-a, chain)"),
            "{e}"
        );
        let e = problem(format!("{buses}{}", pump("p1", "rs485-a", 1)));
        assert!(e.contains("devices[0].bus: \"rs485-a\" is a modbus_rtu bus; a ne1000 device needs a serial bus"), "{e}");
        // Both a link of its own and a bus; neither.
        let e = problem(format!(
            "{buses}{}port = \"/dev/ttyUSB5\"\n",
            pump("p1", "chain", 1)
        ));
        assert!(
            e.contains("devices[0].bus: give port or bus, not both"),
            "{e}"
        );
        let e = problem(format!(
            "{buses}{}endpoint = \"modbus-tcp://127.0.0.1:502\"\n",
            furnace("f1", 1)
        ));
        assert!(
            e.contains("devices[0].bus: give endpoint or bus, not both"),
            "{e}"
        );
        let e = problem("[[devices]]\ndriver = \"eurotherm\"\nid = \"f\"\n".to_owned());
        assert!(
            e.contains("devices[0].endpoint: give endpoint (or bus)"),
            "{e}"
        );
        // A device opening a bus's port itself; two controllers on one RTU port without a bus.
        let e = problem(format!(
            "{buses}[[devices]]\ndriver = \"mt_sics\"\nid = \"b\"\nport = \"/dev/ttyUSB1\"\n"
        ));
        assert!(
            e.contains(
                "devices[0].port: \"/dev/ttyUSB1\" is the port of buses[1]; name the bus instead"
            ),
            "{e}"
        );
        let rtu = |id: &str, unit: u8| {
            format!(
                "[[devices]]\ndriver = \"eurotherm\"\nid = \"{id}\"\nendpoint = \"modbus-rtu:///dev/ttyS0@9600\"\nunit_id = {unit}\n"
            )
        };
        let e = problem(format!("{}{}", rtu("f1", 1), rtu("f2", 2)));
        assert!(
            e.contains("devices[1].endpoint: \"/dev/ttyS0\" is already used by devices[0]"),
            "{e}"
        );
        // Bus keys: duplicate ids, a bad gateway address, an unknown kind.
        let e = problem(format!(
            "{buses}[[buses]]\nid = \"chain\"\nkind = \"modbus_tcp\"\naddress = \"gw:502\"\n"
        ));
        assert!(e.contains("buses[2].address"), "{e}");
        let e = problem(format!(
            "{buses}[[buses]]\nid = \"chain\"\nkind = \"modbus_tcp\"\naddress = \"10.0.0.2:502\"\n"
        ));
        assert!(e.contains("buses[2].id: duplicate id \"chain\""), "{e}");
        let e = problem("[[buses]]\nid = \"x\"\nkind = \"canbus\"\n".to_owned());
        assert!(e.contains("canbus"), "{e}");
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
        let furnace = "[auth]\nopen = true\n[[devices]]\ndriver = \"eurotherm\"\nid = \"f\"\nendpoint = \"modbus-tcp://127.0.0.1:502\"\n";
        for (key, expected) in [
            ("", None),
            (
                "expected_ident = [0x2440, 0x3216]\n",
                Some(ExpectedIdent::OneOf(vec![0x2440, 0x3216])),
            ),
            (
                "expected_ident = \"skip\"\n",
                Some(ExpectedIdent::Word("skip".into())),
            ),
        ] {
            let c = Config::parse(&format!("{furnace}{key}"), Path::new("x.toml")).unwrap();
            let DeviceConfig::Eurotherm(entry) = &c.devices[0] else {
                panic!("not a eurotherm entry");
            };
            assert_eq!(entry.expected_ident, expected, "{key}");
            assert!(c.drivers().is_ok());
        }
        for bad in ["expected_ident = []\n", "expected_ident = \"none\"\n"] {
            let e = Config::parse(&format!("{furnace}{bad}"), Path::new("x.toml")).unwrap_err();
            assert!(
                e.to_string().contains("devices[0].expected_ident"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn analyser_point_tolerance_is_configurable_and_checked() {
        let analyser = "[auth]\nopen = true\n[[devices]]\ndriver = \"sorption_mqtt\"\nid = \"a\"\nbroker = \"mqtt://127.0.0.1:1883\"\n";
        let c = Config::parse(
            &format!("{analyser}tolerance_bar = 0.002\ntolerance_relative = 0.02\n"),
            Path::new("x.toml"),
        )
        .unwrap();
        let DeviceConfig::SorptionMqtt(entry) = &c.devices[0] else {
            panic!("not an analyser entry");
        };
        assert_eq!(
            (entry.tolerance_bar, entry.tolerance_relative),
            (0.002, 0.02)
        );
        for (bad, key) in [
            ("tolerance_bar = 0.0\n", "tolerance_bar"),
            ("tolerance_relative = 1.5\n", "tolerance_relative"),
        ] {
            let e = Config::parse(&format!("{analyser}{bad}"), Path::new("x.toml")).unwrap_err();
            assert!(e.to_string().contains(key), "{bad}: {e}");
        }
    }
}
