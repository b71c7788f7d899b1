//! The daemon's TOML configuration (`ppud serve --config FILE`). deploy/ppud.example.toml
//! documents every key; unknown keys are errors, so a typo never silently means "default".

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ppu_drivers::Device;
use ppu_drivers::registry::{self, BuildContext, BusUse, DeviceSpec, DeviceUse, PortUse};
use ppu_drivers::transport::modbus::{ModbusBus, ModbusEndpoint};
use ppu_schema::{Schema, validate};
use serde::Deserialize;

mod fleet;
mod security;

pub use fleet::{
    FleetAuth, FleetConfig, FleetSettings, FleetTls, FleetTlsConfig, default_lab_id,
    lab_id_problem, redact_url, redacted_servers,
};

pub use security::{
    AuthConfig, LocalConfig, LogConfig, LogFormat, MetricsConfig, SecurityConfig, SilaConfig,
    TlsConfig,
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
    /// An error at a line of the file, e.g. in a device's table.
    #[error("{path}:{line}: {message}")]
    At {
        path: PathBuf,
        line: usize,
        message: String,
    },
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
    /// The `[[devices]]` tables, each read by its driver (see [`Config::parse_unchecked`]).
    #[serde(skip)]
    pub devices: Vec<DeviceConfig>,
}

/// One `[[devices]]` entry: the config type of the driver its `driver` key names (e.g.
/// `ppu_drivers::furnace::eurotherm::config::EurothermEntry`), with its defaults applied.
pub type DeviceConfig = Box<dyn DeviceSpec>;

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

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 50051))
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("/var/lib/ppu")
}

fn one() -> f64 {
    1.0
}

fn baud_9600() -> u32 {
    9600
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

/// Every top-level key of the config file: [`Config`]'s and [`Policies`]'.
const TOP_LEVEL_KEYS: [&str; 17] = [
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
    "sila",
    "fleet",
];

/// Daemon-wide policies: the `[recovery]` and `[retry]` tables. Parsed from the same file as
/// [`Config`] but kept apart from it, so code that builds a `Config` field by field needs no
/// change when a policy is added.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Policies {
    /// Crash recovery (`on_restart`, and per family `adopt` or `safe`).
    #[serde(default)]
    pub recovery: RecoveryPolicy,
    /// Retries of transient device errors.
    #[serde(default)]
    pub retry: RetryConfig,
    /// Who may connect and how: `[auth]`, `[tls]`, `[local]`, `[metrics]`, `[log]`, `[limits]`.
    #[serde(flatten)]
    pub security: SecurityConfig,
    /// `[fleet]`: this lab in a fleet on NATS JetStream; `None` starts nothing NATS-related.
    #[serde(default)]
    pub fleet: Option<FleetConfig>,
}

impl Policies {
    /// The `[fleet]` settings, paths resolved against the config file's directory; `None`
    /// without the table.
    pub fn fleet_settings(&self) -> Option<Result<FleetSettings, Vec<String>>> {
        self.fleet
            .as_ref()
            .map(|f| f.resolve(&self.security.base_dir))
    }
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
        let lines = KeyLines::new(text);
        c.problems_with(&p)
            .into_iter()
            .next()
            .map_or(Ok((c, p)), |message| {
                match lines.line_of_problem(&message) {
                    Some(line) => Err(ConfigError::At {
                        path: path.to_owned(),
                        line,
                        message,
                    }),
                    None => Err(ConfigError::Invalid {
                        path: path.to_owned(),
                        message,
                    }),
                }
            })
    }

    /// Parses config text (refusing unknown keys) without checking values; see
    /// [`Config::problems_with`]. Each `[[devices]]` table goes to the registered driver its
    /// `driver` key names. Every error names the key's full path and its line
    /// (`FILE:LINE: retry.devices.f.retires: unknown field …`).
    pub fn parse_unchecked(text: &str, path: &Path) -> Result<(Config, Policies), ConfigError> {
        let lines = KeyLines::new(text);
        let at = |e: KeyError| lines.error(path, e);
        let syntax = |e: toml::de::Error| {
            let line = e
                .span()
                .and_then(|s| text.get(..s.start))
                .map(|before| before.matches('\n').count() + 1);
            at(KeyError {
                path: String::new(),
                message: e.message().trim_end().to_owned(),
                line,
            })
        };
        let mut table: toml::Table = toml::from_str(text).map_err(syntax)?;
        if let Some(key) = table.keys().find(|k| !TOP_LEVEL_KEYS.contains(&k.as_str())) {
            return Err(at(KeyError::new(
                key,
                format!("unknown key, expected one of {}", TOP_LEVEL_KEYS.join(", ")),
            )));
        }
        let whole = toml::Value::Table(table.clone());
        let mut c: Config = deserialize_at(whole.clone(), "").map_err(at)?;
        // The policy tables one by one: `Policies` flattens the security tables, and serde
        // loses the key's path inside a flattened struct.
        check_recovery(table.get("recovery")).map_err(at)?;
        if let Some(retry) = table.get("retry") {
            deserialize_at::<RetryConfig>(retry.clone(), "retry").map_err(at)?;
        }
        deserialize_at::<SecurityConfig>(whole, "").map_err(at)?;
        if let Some(fleet) = table.get("fleet") {
            deserialize_at::<FleetConfig>(fleet.clone(), "fleet").map_err(at)?;
        }
        let mut p: Policies = toml::from_str(text).map_err(syntax)?;
        p.security.base_dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        c.devices = parse_devices(table.remove("devices")).map_err(at)?;
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
        if let Some(Err(problems)) = policies.fleet_settings() {
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
            out.extend(
                d.problems()
                    .into_iter()
                    .map(|m| format!("devices[{i}].{m}")),
            );
            for used in d.uses() {
                if !self
                    .devices
                    .iter()
                    .any(|o| o.id() == used.id && o.driver() == used.driver)
                {
                    out.push(format!(
                        "devices[{i}].{}: no {} device \"{}\" is configured",
                        used.key, used.driver, used.id
                    ));
                }
            }
            // Serial ports open exclusively: two devices on one port would lock each other out.
            if let Some(PortUse { key, port }) = d.serial_port() {
                if let Some(j) = self.devices[..i]
                    .iter()
                    .position(|o| o.serial_port().map(|u| u.port) == Some(port))
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
            out.extend(self.bus_problems_of(i, d.as_ref()));
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

    /// Problems of device `i`'s place on a bus: the bus exists, is of a kind the driver can be
    /// on, and no earlier device holds the same address on it.
    fn bus_problems_of(&self, i: usize, d: &dyn DeviceSpec) -> Vec<String> {
        let Some(BusUse {
            bus: name,
            address_key: key,
            address,
            kinds,
        }) = d.bus()
        else {
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
        let mut out = Vec::new();
        if !kinds.contains(&bus.kind()) {
            out.push(format!(
                "devices[{i}].bus: \"{name}\" is a {} bus; a {} device needs a {} bus",
                bus.kind(),
                d.driver(),
                kinds.join(" or ")
            ));
        }
        if let BusConfig::ModbusRtu(_) = bus
            && !(1..=247).contains(&address)
        {
            out.push(format!(
                "devices[{i}].{key}: {address} is not a Modbus RTU slave address (1–247)"
            ));
        }
        if let Some(j) = self.devices[..i]
            .iter()
            .position(|o| o.bus().map(|b| (b.bus, b.address)) == Some((name, address)))
        {
            out.push(format!(
                "devices[{i}].{key}: {address} on bus \"{name}\" is already used by devices[{j}] ({})",
                self.devices[j].id()
            ));
        }
        out
    }

    /// Instantiates the configured drivers, each bus opened once and shared by its devices,
    /// each device after the devices it uses (a pump after its balance). In config order.
    pub fn drivers(&self) -> Result<Vec<Arc<dyn Device>>, String> {
        let mut ctx = BuildContext::new();
        for b in &self.buses {
            match (b, b.modbus_endpoint()) {
                (BusConfig::Serial(s), _) => {
                    ctx.add_serial_bus(&s.id, &s.port, s.baud_rate, Duration::from_millis(s.gap_ms))
                }
                (_, Some(Ok(endpoint))) => ctx.add_modbus_bus(b.id(), ModbusBus::new(endpoint)),
                (_, Some(Err(m))) => return Err(format!("bus {}: address: {m}", b.id())),
                (_, None) => return Err(format!("bus {}: not a Modbus bus", b.id())),
            }
        }
        let mut built: Vec<Option<Arc<dyn Device>>> = vec![None; self.devices.len()];
        loop {
            let mut progress = false;
            for (i, d) in self.devices.iter().enumerate() {
                let waits = |used: &DeviceUse<'_>| {
                    self.devices
                        .iter()
                        .zip(&built)
                        .any(|(o, b)| o.id() == used.id && b.is_none())
                };
                if built[i].is_none() && !d.uses().iter().any(waits) {
                    built[i] = Some(d.build(&mut ctx)?);
                    progress = true;
                }
            }
            if !progress {
                break;
            }
        }
        let waiting: Vec<&str> = self
            .devices
            .iter()
            .zip(&built)
            .filter(|(_, b)| b.is_none())
            .map(|(d, _)| d.id())
            .collect();
        if !waiting.is_empty() {
            return Err(format!(
                "devices {} use each other in a cycle",
                waiting.join(", ")
            ));
        }
        Ok(built.into_iter().flatten().collect())
    }
}

/// A bad key: its full path (`devices[1].limits.max_hold_s`, empty for the file itself), what
/// is wrong, and its line when known better than by the path (a syntax error).
#[derive(Debug)]
struct KeyError {
    path: String,
    message: String,
    line: Option<usize>,
}

impl KeyError {
    fn new(path: impl Into<String>, message: impl Into<String>) -> KeyError {
        KeyError {
            path: path.into(),
            message: message.into(),
            line: None,
        }
    }
}

/// Finds the line of a key path (`devices[1].limits.max_hold_s`) in the config text: the
/// key's own line, or else the line of its deepest table that is in the file.
pub struct KeyLines<'t> {
    text: &'t str,
    root: Option<toml::Spanned<toml::de::DeTable<'t>>>,
}

impl<'t> KeyLines<'t> {
    pub fn new(text: &'t str) -> KeyLines<'t> {
        KeyLines {
            text,
            root: toml::de::DeTable::parse(text).ok(),
        }
    }

    /// The line of `path`, if any part of it is in the file.
    pub fn line(&self, path: &str) -> Option<usize> {
        self.line_of(&PathPart::parse(path))
    }

    /// The line of the key a problem names by its leading path (`devices[0].endpoint: …`).
    pub fn line_of_problem(&self, problem: &str) -> Option<usize> {
        let (path, _) = problem.split_once(": ")?;
        if path.contains(' ') {
            return None;
        }
        self.line(path)
    }

    fn line_of(&self, parts: &[PathPart<'_>]) -> Option<usize> {
        let at = locate(self.root.as_ref()?.get_ref(), parts)?;
        Some(self.text.get(..at.start)?.matches('\n').count() + 1)
    }

    /// `FILE:LINE: path: message` (without the line when no part of the path is in the file).
    fn error(&self, file: &Path, e: KeyError) -> ConfigError {
        let message = if e.path.is_empty() {
            e.message
        } else {
            format!("{}: {}", e.path, e.message)
        };
        match e.line.or_else(|| self.line(&e.path)) {
            Some(line) => ConfigError::At {
                path: file.to_owned(),
                line,
                message,
            },
            None => ConfigError::Parse {
                path: file.to_owned(),
                message,
            },
        }
    }
}

/// Deserializes `value` (the table at `prefix`), naming the key path of an error. Where serde
/// loses the path (inside an internally tagged enum such as a `[[buses]]` entry), an unknown
/// field's name is taken from the message.
fn deserialize_at<T: serde::de::DeserializeOwned>(
    value: toml::Value,
    prefix: &str,
) -> Result<T, KeyError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let inner = e.path().to_string();
        let mut path = match (prefix, inner.as_str()) {
            (p, ".") => p.to_owned(),
            ("", i) => i.to_owned(),
            (p, i) if i.starts_with('[') => format!("{p}{i}"),
            (p, i) => format!("{p}.{i}"),
        };
        let message = e.inner().message().trim_end().to_owned();
        if let Some(field) = message
            .strip_prefix("unknown field `")
            .and_then(|m| m.split_once('`'))
            .map(|(f, _)| f)
            && !path.ends_with(field)
        {
            if !path.is_empty() {
                path.push('.');
            }
            path.push_str(field);
        }
        KeyError::new(path, message)
    })
}

/// Checks the `[recovery]` table key by key: `on_restart`, or a device family's name (whose
/// value is `adopt` or `safe`). `RecoveryPolicy` takes the families as a flattened map, so
/// serde alone would read a typo'd `on_restart` as a family and name neither the key nor
/// its line.
fn check_recovery(value: Option<&toml::Value>) -> Result<(), KeyError> {
    use crate::recovery::{AdoptPolicy, OnRestart};
    let Some(value) = value else {
        return Ok(());
    };
    let Some(table) = value.as_table() else {
        return Err(KeyError::new("recovery", "must be a table ([recovery])"));
    };
    let families = crate::schema::schema()
        .families()
        .iter()
        .map(|f| f.name().to_owned())
        .collect::<Vec<_>>();
    for (key, v) in table {
        let at = format!("recovery.{key}");
        if key == "on_restart" {
            deserialize_at::<OnRestart>(v.clone(), &at)?;
        } else if families.contains(key) {
            deserialize_at::<AdoptPolicy>(v.clone(), &at)?;
        } else {
            return Err(KeyError::new(
                at,
                format!(
                    "unknown key, expected on_restart or a device family ({})",
                    families.join(", ")
                ),
            ));
        }
    }
    Ok(())
}

/// Reads `[[devices]]`: each table through the registered driver its `driver` key names, its
/// limit names checked against the family's schema.
fn parse_devices(value: Option<toml::Value>) -> Result<Vec<DeviceConfig>, KeyError> {
    let Some(value) = value else {
        return Ok(Vec::new());
    };
    let toml::Value::Array(items) = value else {
        return Err(KeyError::new(
            "devices",
            "must be an array of tables ([[devices]])",
        ));
    };
    let schema = crate::schema::schema();
    let mut out = Vec::with_capacity(items.len());
    for (i, item) in items.into_iter().enumerate() {
        let id = item
            .get("id")
            .and_then(toml::Value::as_str)
            .map(str::to_owned);
        let error = |key: &str, message: String| {
            let device = id
                .as_ref()
                .map(|id| format!(" (device \"{id}\")"))
                .unwrap_or_default();
            let dot = if key.is_empty() || key.starts_with('[') {
                ""
            } else {
                "."
            };
            KeyError::new(
                format!("devices[{i}]{dot}{key}"),
                format!("{message}{device}"),
            )
        };
        let toml::Value::Table(mut table) = item else {
            return Err(error("", "must be a table ([[devices]])".to_owned()));
        };
        let registered = || registry::driver_names().join(", ");
        let driver = match table.remove("driver") {
            Some(toml::Value::String(d)) => d,
            Some(_) => {
                return Err(error(
                    "driver",
                    format!("must be a driver's name, one of {}", registered()),
                ));
            }
            None => {
                return Err(error(
                    "driver",
                    format!("missing; name a driver, one of {}", registered()),
                ));
            }
        };
        let Some(factory) = registry::driver(&driver) else {
            return Err(error(
                "driver",
                format!("unknown driver \"{driver}\" (registered: {})", registered()),
            ));
        };
        let spec = factory
            .parse(table)
            .map_err(|e| error(&e.path, e.message))?;
        if let Some((key, message)) = unknown_limit(spec.as_ref(), schema) {
            return Err(error(&key, message));
        }
        out.push(spec);
    }
    Ok(out)
}

/// A limit name the device's family never refers to would bound nothing: it is refused, so a
/// typo in a limit is not silently no limit. Returns the key and the reason.
fn unknown_limit(spec: &dyn DeviceSpec, schema: &Schema) -> Option<(String, String)> {
    let limits = spec.limits()?;
    let family = spec.family();
    let known = |names: &[String]| {
        if names.is_empty() {
            "it has none".to_owned()
        } else {
            format!("it has {}", names.join(", "))
        }
    };
    let names = validate::limit_names(schema, family);
    if let Some(name) = limits.values.keys().find(|n| !names.contains(n)) {
        return Some((
            format!("limits.{name}"),
            format!(
                "the {family} family refers to no limit \"{name}\" ({})",
                known(&names)
            ),
        ));
    }
    let parameters = validate::accepted_names(schema, family);
    limits
        .accepted
        .keys()
        .find(|n| !parameters.contains(n))
        .map(|name| {
            (
                format!("limits.accepted.{name}"),
                format!(
                    "the {family} family has no parameter \"{name}\" with accepted values ({})",
                    known(&parameters)
                ),
            )
        })
}

/// One step of a key's path: a table key or an array index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PathPart<'a> {
    Key(&'a str),
    Index(usize),
}

impl<'a> PathPart<'a> {
    /// The steps of a path such as `limits.accepted.adsorptive[0]`.
    fn parse(path: &'a str) -> Vec<PathPart<'a>> {
        let mut out = Vec::new();
        for part in path.split('.').filter(|p| !p.is_empty()) {
            let (key, indices) = part.split_once('[').unwrap_or((part, ""));
            if !key.is_empty() {
                out.push(PathPart::Key(key));
            }
            out.extend(
                indices
                    .split('[')
                    .filter_map(|i| i.trim_end_matches(']').parse().ok())
                    .map(PathPart::Index),
            );
        }
        out
    }
}

/// The span of the deepest key (or array item) of `path` found in the document.
fn locate(root: &toml::de::DeTable<'_>, path: &[PathPart<'_>]) -> Option<std::ops::Range<usize>> {
    use toml::de::DeValue;
    enum Node<'d, 'i> {
        Table(&'d toml::de::DeTable<'i>),
        Array(&'d toml::de::DeArray<'i>),
        Leaf,
    }
    let mut best = None;
    let mut node = Node::Table(root);
    for part in path {
        let found = match (part, &node) {
            (PathPart::Key(k), Node::Table(t)) => t
                .iter()
                .find(|(key, _)| key.get_ref().as_ref() == *k)
                .map(|(key, v)| (key.span(), v)),
            (PathPart::Index(i), Node::Array(a)) => a.get(*i).map(|v| (v.span(), v)),
            _ => None,
        };
        let Some((span, value)) = found else {
            break;
        };
        best = Some(span);
        node = match value.get_ref() {
            DeValue::Table(t) => Node::Table(t),
            DeValue::Array(a) => Node::Array(a),
            _ => Node::Leaf,
        };
    }
    best
}

#[cfg(test)]
mod tests {
    use ppu_drivers::analyser::sorption::config::SorptionMqttEntry;
    use ppu_drivers::furnace::eurotherm::config::{EurothermEntry, ExpectedIdent};

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
    fn the_sila_table_resolves_under_the_listening_rules() {
        use crate::security::SilaSettings;
        let open = "[auth]\nopen = true\n";
        let resolve = |text: &str| {
            let (c, p) = Config::parse_unchecked(text, Path::new("x.toml")).unwrap();
            p.security.resolve(c.listen)
        };
        assert_eq!(resolve(open).unwrap().sila, None);
        let on = resolve(&format!("{open}[sila]\n")).unwrap();
        assert_eq!(
            on.sila,
            Some(SilaSettings::at("127.0.0.1:50052".parse().unwrap()))
        );
        let set = resolve(&format!(
            "{open}[sila]\nlisten = \"127.0.0.1:6000\"\nserver_name = \"bench\"\nmdns = true\n"
        ))
        .unwrap();
        assert_eq!(
            set.sila,
            Some(SilaSettings {
                listen: "127.0.0.1:6000".parse().unwrap(),
                server_name: "bench".into(),
                mdns: true,
            })
        );
        let off = resolve(&format!("{open}[sila]\nenabled = false\n")).unwrap();
        assert_eq!(off.sila, None);
        // Off loopback, an open daemon's SiLA endpoint is refused like its gRPC one.
        let e = resolve(&format!("{open}[sila]\nlisten = \"0.0.0.0:50052\"\n")).unwrap_err();
        assert!(e.iter().any(|p| p.starts_with("sila.listen: ")), "{e:?}");
        let e = resolve(&format!("{open}[sila]\nserver_name = \"\"\n")).unwrap_err();
        assert!(e.iter().any(|p| p.starts_with("sila.server_name")), "{e:?}");
        assert!(Config::parse("[sila]\nport = 1\n", Path::new("x.toml")).is_err());
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
            let entry = c.devices[0]
                .downcast_ref::<EurothermEntry>()
                .expect("a eurotherm entry");
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
        let entry = c.devices[0]
            .downcast_ref::<SorptionMqttEntry>()
            .expect("an analyser entry");
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

    #[test]
    fn a_typo_in_a_device_names_its_full_path_and_line() {
        let text = "[auth]\nopen = true\n\n\
            [[devices]]\ndriver = \"mt_sics\"\nid = \"balance-1\"\nport = \"/dev/ttyUSB9\"\n\n\
            [[devices]]\ndriver = \"eurotherm\"\nid = \"furnace-1\"\n\
            endpoint = \"modbus-tcp://127.0.0.1:502\"\ntimeout_mss = 5\n";
        let e = Config::parse(text, Path::new("x.toml")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "x.toml:13: devices[1].timeout_mss: unknown field `timeout_mss`, expected one of \
             `id`, `endpoint`, `bus`, `unit_id`, `timeout_ms`, `retries`, `decimal_places`, \
             `safe_setpoint_c`, `tolerance_c`, `sample_interval_s`, `settle_timeout_s`, \
             `expected_ident`, `limits` (device \"furnace-1\")"
        );
        // In a nested table, and a value of the wrong type.
        let limits = text.replace(
            "timeout_mss = 5\n",
            "[devices.limits]\nmax_hold_s = \"long\"\n",
        );
        let e = Config::parse(&limits, Path::new("x.toml")).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("x.toml:14: devices[1].limits.max_hold_s"),
            "{e}"
        );
        let ident = text.replace("timeout_mss = 5", "expected_ident = [1, -2]");
        let e = Config::parse(&ident, Path::new("x.toml")).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("x.toml:13: devices[1].expected_ident"),
            "{e}"
        );
        // A missing key: the device's table.
        let e = Config::parse(
            &text.replace("port = \"/dev/ttyUSB9\"\n", ""),
            Path::new("x.toml"),
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("devices[0]: missing field `port`"),
            "{e}"
        );
        // An unknown driver lists the registered ones.
        let e = Config::parse(
            &text.replace("\"mt_sics\"", "\"mt_sisc\""),
            Path::new("x.toml"),
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "x.toml:5: devices[0].driver: unknown driver \"mt_sisc\" (registered: {}) \
                 (device \"balance-1\")",
                registry::driver_names().join(", ")
            )
        );
    }

    /// A typo'd key in every table is reported as `FILE:LINE: key.path: reason`, the line
    /// being the key's own.
    #[test]
    fn a_typo_in_any_table_names_its_key_path_and_line() {
        let open = "[auth]\nopen = true\n";
        let furnace = "[[devices]]\ndriver = \"eurotherm\"\nid = \"f\"\n\
            endpoint = \"modbus-tcp://127.0.0.1:502\"\n";
        let cases: Vec<(String, &str)> = vec![
            ("listne = 1\n".to_owned(), "x.toml:1: listne: unknown key"),
            (
                "[auth]\nopen = true\ntokens_fle = \"t\"\n".to_owned(),
                "x.toml:3: auth.tokens_fle: unknown field `tokens_fle`",
            ),
            (
                format!("{open}[tls]\ncert_file = \"a\"\nkey_fle = \"b\"\n"),
                "x.toml:5: tls.key_fle: unknown field",
            ),
            (
                format!("{open}[local]\nsockt = \"/run/x\"\n"),
                "x.toml:4: local.sockt: unknown field",
            ),
            (
                format!("{open}[metrics]\nlistne = \"127.0.0.1:9\"\n"),
                "x.toml:4: metrics.listne: unknown field",
            ),
            (
                format!("{open}[log]\nfromat = \"json\"\n"),
                "x.toml:4: log.fromat: unknown field",
            ),
            (
                format!("{open}[limits]\nmax_streams = 3\nmax_stream = 2\n"),
                "x.toml:5: limits.max_stream: unknown field",
            ),
            (
                format!("{open}[poll]\ninterval = 3\n"),
                "x.toml:4: poll.interval: unknown field",
            ),
            (
                format!("{open}[recovery]\non_restrat = \"resume\"\n"),
                "x.toml:4: recovery.on_restrat: unknown key, expected on_restart or a device \
                 family (",
            ),
            (
                format!("{open}[recovery]\nfurnace = \"adopt\"\non_restart = \"resme\"\n"),
                "x.toml:5: recovery.on_restart: unknown variant `resme`",
            ),
            (
                format!("{open}[retry]\nretires = 2\n"),
                "x.toml:4: retry.retires: unknown field",
            ),
            (
                format!("{open}[retry.devices.f]\nretries = 1\nbackoff = 2\n{furnace}"),
                "x.toml:5: retry.devices.f.backoff: unknown field",
            ),
            (
                format!(
                    "{open}[[buses]]\nid = \"a\"\nkind = \"serial\"\nport = \"/dev/x\"\n\
                     [[buses]]\nid = \"b\"\nkind = \"serial\"\nport = \"/dev/y\"\nbaud = 3\n"
                ),
                "x.toml:11: buses[1].baud: unknown field `baud`",
            ),
            (
                format!("{open}{furnace}[devices.limit]\nmax_temperature_c = 1.0\n"),
                "x.toml:7: devices[0].limit: unknown field `limit`",
            ),
            (
                format!("{open}{furnace}{furnace}[devices.limits]\nmax_temperature = 1.0\n"),
                "x.toml:12: devices[1].limits.max_temperature: the furnace family refers to no",
            ),
        ];
        for (text, expected) in cases {
            let e = Config::parse(&text, Path::new("x.toml"))
                .unwrap_err()
                .to_string();
            assert!(e.starts_with(expected), "{text}\n{e}\nexpected {expected}");
        }
        // A syntax error: its line.
        let e = Config::parse("[auth]\nopen = true\nlisten =\n", Path::new("x.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("x.toml:3: "), "{e}");
        // A bad value found after parsing names its key's line too.
        let e = Config::parse(
            "time_scale = -1.0\n[auth]\nopen = true\n",
            Path::new("x.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("x.toml:1: time_scale: -1 must be a positive number"),
            "{e}"
        );
    }

    #[test]
    fn a_limit_the_family_never_refers_to_is_refused_by_name() {
        let furnace = "[auth]\nopen = true\n[[devices]]\ndriver = \"eurotherm\"\nid = \"f\"\n\
            endpoint = \"modbus-tcp://127.0.0.1:502\"\n[devices.limits]\nmax_temperature_c = 900.0\n";
        let c = Config::parse(furnace, Path::new("x.toml")).unwrap();
        assert_eq!(
            c.devices[0]
                .limits()
                .and_then(|l| l.get("max_temperature_c")),
            Some(900.0)
        );
        let e = Config::parse(
            &format!("{furnace}max_temprature_c = 1000.0\n"),
            Path::new("x.toml"),
        )
        .unwrap_err();
        let e = e.to_string();
        assert!(
            e.starts_with(
                "x.toml:9: devices[0].limits.max_temprature_c: the furnace family refers to no \
                 limit \"max_temprature_c\" (it has "
            ),
            "{e}"
        );
        assert!(e.contains("max_temperature_c"), "{e}");
        // A limit of another family.
        let e = Config::parse(
            &format!("{furnace}max_volume_ml = 10.0\n"),
            Path::new("x.toml"),
        )
        .unwrap_err();
        assert!(e.to_string().contains("limits.max_volume_ml"), "{e}");
        // Accepted values of a parameter the family does not have.
        let analyser = "[auth]\nopen = true\n[[devices]]\ndriver = \"sorption_mqtt\"\nid = \"a\"\n\
            broker = \"mqtt://127.0.0.1:1883\"\n[devices.limits.accepted]\n";
        Config::parse(
            &format!("{analyser}adsorptive = [\"CO2\"]\n"),
            Path::new("x.toml"),
        )
        .unwrap();
        let e = Config::parse(&format!("{analyser}gas = [\"CO2\"]\n"), Path::new("x.toml"))
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("devices[0].limits.accepted.gas: the analyser family has no parameter"),
            "{e}"
        );
    }

    #[test]
    fn devices_are_built_after_the_devices_they_use_in_config_order() {
        let text = "[auth]\nopen = true\n\
            [[devices]]\ndriver = \"ne1000\"\nid = \"p\"\nport = \"/dev/ttyUSB3\"\nreagent = \"A\"\n\
            density_g_per_ml = 1.0\nsyringe_inner_diameter_mm = 14.43\nsyringe_volume_ml = 10.0\n\
            fill_ml = 5.0\nbalance = \"b\"\n\
            [[devices]]\ndriver = \"mt_sics\"\nid = \"b\"\nport = \"/dev/ttyUSB4\"\n";
        let c = Config::parse(text, Path::new("x.toml")).unwrap();
        let drivers = c.drivers().unwrap();
        let ids: Vec<&str> = drivers.iter().map(|d| d.info().id.as_str()).collect();
        assert_eq!(ids, ["p", "b"]);
        assert!(drivers[0].info().transport.contains("weighed by b"));
        // The balance must be an mt_sics device.
        let e = Config::parse(
            &text.replace(
                "driver = \"mt_sics\"\nid = \"b\"\nport = \"/dev/ttyUSB4\"",
                "driver = \"eurotherm\"\nid = \"b\"\nendpoint = \"modbus-tcp://127.0.0.1:502\"",
            ),
            Path::new("x.toml"),
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("devices[0].balance: no mt_sics device \"b\" is configured"),
            "{e}"
        );
    }
}
