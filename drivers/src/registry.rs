//! The registry: every family's schema, in one descriptor set, and every driver's factory, in
//! one list.
//!
//! A family registers by being a folder with a `.proto` (compiled by `build.rs`, no list to
//! edit) and one `pub mod` line in `lib.rs`. The daemon builds its [`Schema`] from
//! [`FILE_DESCRIPTOR_SET`] and never names a family.
//!
//! A driver registers in its family's `DRIVERS`; a family with one line in `lib.rs`. Its [`DriverFactory`] reads its
//! `[[devices]]` table (`driver = "…"`) into its own config type, a [`DeviceSpec`], which tells
//! the daemon what its cross-device checks need (the port it opens, the bus and address it
//! names, the devices it uses) and builds the driver. The daemon's config names no driver
//! (compare vector's `SourceConfig::build`).

use std::any::Any;
use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use ppu_schema::{Schema, SchemaError};
use serde::de::DeserializeOwned;

use crate::device::{Device, Limits};
use crate::transport::modbus::ModbusBus;
use crate::transport::serial::{Framing, SerialBus, SerialConfig};

/// Encoded `FileDescriptorSet` of every family's schema (with its imports).
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/ppu_families.bin"));

/// The schema of every registered family.
pub fn schema() -> Result<Schema, SchemaError> {
    Schema::new(&[FILE_DESCRIPTOR_SET])
}

/// Every registered driver: each family's `DRIVERS`, in the order of the family list in
/// `lib.rs` (one line per family).
pub fn drivers() -> impl Iterator<Item = &'static dyn DriverFactory> {
    crate::FAMILY_DRIVERS.iter().flat_map(|d| d.iter().copied())
}

/// The driver registered as `name` (the `driver` key's value).
pub fn driver(name: &str) -> Option<&'static dyn DriverFactory> {
    drivers().find(|d| d.name() == name)
}

/// The registered drivers' names, in registration order.
pub fn driver_names() -> Vec<&'static str> {
    drivers().map(|d| d.name()).collect()
}

/// A driver, as the config sees it: reads its devices' tables.
pub trait DriverFactory: Send + Sync {
    /// The `driver = "…"` value selecting it.
    fn name(&self) -> &'static str;
    /// The family (its schema's name) of the devices it drives.
    fn family(&self) -> &'static str;
    /// Reads one `[[devices]]` table, without its `driver` key. Unknown keys are errors.
    fn parse(&self, table: toml::Table) -> Result<Box<dyn DeviceSpec>, KeyError>;
}

/// A bad key in a device's table: its path within the table (`limits.max_hold_s`, empty for
/// the table itself) and what is wrong.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{}{message}", if path.is_empty() { String::new() } else { format!("{path}: ") })]
pub struct KeyError {
    pub path: String,
    pub message: String,
}

/// Deserializes a device's table into a driver's config type; an error names the key's path,
/// down to an unknown key itself (`limits.colour`, not just `limits`).
pub fn parse_table<T: DeserializeOwned>(table: toml::Table) -> Result<T, KeyError> {
    let limits = table.get("limits").and_then(toml::Value::as_table).cloned();
    serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
        let mut path = e.path().to_string();
        if path == "." {
            path.clear();
        }
        let message = e.inner().message().to_owned();
        // `Limits` is a flattened map, whose errors stop at `limits`: name the limit that is
        // not a number.
        if path == "limits"
            && let Some(name) = limits.iter().flatten().find_map(|(k, v)| {
                (k != "accepted" && !matches!(v, toml::Value::Float(_) | toml::Value::Integer(_)))
                    .then_some(k)
            })
        {
            path = format!("limits.{name}");
        }
        // Some deserializers report an unknown key at its table; name the key itself.
        if let Some(key) = message
            .strip_prefix("unknown field `")
            .and_then(|rest| rest.split('`').next())
            && path.rsplit('.').next() != Some(key)
        {
            path = if path.is_empty() {
                key.to_owned()
            } else {
                format!("{path}.{key}")
            };
        }
        KeyError { path, message }
    })
}

/// The serial port a device opens exclusively itself, and the key naming it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortUse<'a> {
    pub key: &'static str,
    pub port: &'a str,
}

/// A shared bus a device names, its address there, and the bus kinds it can be on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BusUse<'a> {
    /// The bus's id.
    pub bus: &'a str,
    /// The key giving the address (`unit_id`, `address`) and its value.
    pub address_key: &'static str,
    pub address: u8,
    /// `[[buses]]` kinds the device can be on (`modbus_rtu`, `modbus_tcp`, `serial`).
    pub kinds: &'static [&'static str],
}

/// Another device a device uses, e.g. the balance under a pump's outlet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceUse<'a> {
    /// The key naming it.
    pub key: &'static str,
    pub id: &'a str,
    /// The driver the used device must have.
    pub driver: &'static str,
}

/// One configured device: a driver's own config type, with its defaults applied.
pub trait DeviceSpec: fmt::Debug + Send + Sync + Any {
    fn id(&self) -> &str;
    /// The `driver` key's value.
    fn driver(&self) -> &'static str;
    /// The family of the device.
    fn family(&self) -> &'static str;
    /// Problems of its values, each starting with the key's path (`fill_ml: …`).
    fn problems(&self) -> Vec<String>;
    /// The declared limits, checked against the family's schema.
    fn limits(&self) -> Option<&Limits> {
        None
    }
    /// The serial port it opens exclusively itself (not through a bus), if any.
    fn serial_port(&self) -> Option<PortUse<'_>> {
        None
    }
    /// The bus it is on, if it names one.
    fn bus(&self) -> Option<BusUse<'_>> {
        None
    }
    /// Other devices it uses; they are built first.
    fn uses(&self) -> Vec<DeviceUse<'_>> {
        Vec::new()
    }
    /// Builds the driver. Devices it [uses](DeviceSpec::uses) are already in `ctx`.
    fn build(&self, ctx: &mut BuildContext) -> Result<Arc<dyn Device>, String>;
    fn clone_box(&self) -> Box<dyn DeviceSpec>;
}

impl Clone for Box<dyn DeviceSpec> {
    fn clone(&self) -> Self {
        self.clone_box()
    }
}

impl dyn DeviceSpec {
    /// The driver's own config type, e.g. to adjust a key in a test.
    pub fn downcast_ref<T: DeviceSpec>(&self) -> Option<&T> {
        (self as &dyn Any).downcast_ref()
    }

    /// The driver's own config type, mutably.
    pub fn downcast_mut<T: DeviceSpec>(&mut self) -> Option<&mut T> {
        (self as &mut dyn Any).downcast_mut()
    }
}

/// What building a device may need: the configured shared buses, and the devices built
/// before it (by id, as their concrete driver type).
#[derive(Default)]
pub struct BuildContext {
    modbus: BTreeMap<String, Arc<ModbusBus>>,
    serial: BTreeMap<String, SerialLine>,
    built: BTreeMap<String, Arc<dyn Any + Send + Sync>>,
}

/// A serial bus: its line settings, opened with the framing of the first device built on it.
struct SerialLine {
    port: String,
    baud_rate: u32,
    gap: Duration,
    bus: Option<Arc<SerialBus>>,
}

impl BuildContext {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a Modbus bus (an RTU line or a TCP gateway connection).
    pub fn add_modbus_bus(&mut self, id: &str, bus: Arc<ModbusBus>) {
        self.modbus.insert(id.to_owned(), bus);
    }

    /// Adds a serial bus; it is created when the first device on it is built.
    pub fn add_serial_bus(&mut self, id: &str, port: &str, baud_rate: u32, gap: Duration) {
        self.serial.insert(
            id.to_owned(),
            SerialLine {
                port: port.to_owned(),
                baud_rate,
                gap,
                bus: None,
            },
        );
    }

    /// The Modbus bus `id`, if one is configured.
    pub fn modbus_bus(&self, id: &str) -> Option<Arc<ModbusBus>> {
        self.modbus.get(id).cloned()
    }

    /// The serial bus `id` speaking `framing`, if one is configured; an error if a device
    /// built earlier on it speaks another framing.
    pub fn serial_bus(
        &mut self,
        id: &str,
        framing: Framing,
    ) -> Option<Result<Arc<SerialBus>, String>> {
        let line = self.serial.get_mut(id)?;
        let bus = line.bus.get_or_insert_with(|| {
            let mut c = SerialConfig::new(line.port.clone(), framing);
            c.baud_rate = line.baud_rate;
            c.gap = line.gap;
            SerialBus::new(c)
        });
        Some(if bus.config().framing == framing {
            Ok(Arc::clone(bus))
        } else {
            Err(format!(
                "bus \"{id}\" already serves devices of another framing ({:?})",
                bus.config().framing
            ))
        })
    }

    /// Records a built device as its concrete type, for devices that use it.
    pub fn provide<T: Any + Send + Sync>(&mut self, id: &str, device: Arc<T>) {
        self.built.insert(id.to_owned(), device);
    }

    /// The device `id` built earlier, if it is a `T`.
    pub fn get<T: Any + Send + Sync>(&self, id: &str) -> Option<Arc<T>> {
        Arc::clone(self.built.get(id)?).downcast().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(text: &str) -> toml::Table {
        toml::from_str(text).expect("test table parses")
    }

    #[test]
    fn every_driver_is_registered_once_with_a_family_of_the_schema() {
        let schema = schema().expect("the families' schema loads");
        let names = driver_names();
        for (i, d) in drivers().enumerate() {
            assert!(!names[..i].contains(&d.name()), "{} twice", d.name());
            assert!(schema.family(d.family()).is_some(), "{}", d.family());
        }
        assert_eq!(driver("mt_sics").map(|d| d.family()), Some("balance"));
        assert!(driver("nope").is_none());
    }

    #[test]
    fn a_bad_key_is_named_by_its_full_path() {
        let eurotherm = driver("eurotherm").expect("registered");
        let base = "id = \"f\"\nendpoint = \"modbus-tcp://127.0.0.1:502\"\n";
        let spec = eurotherm.parse(table(base)).expect("parses");
        assert_eq!(spec.id(), "f");
        assert_eq!(spec.family(), "furnace");
        let e = eurotherm
            .parse(table(&format!("{base}timeout_mss = 5\n")))
            .unwrap_err();
        assert_eq!(e.path, "timeout_mss");
        assert!(e.message.starts_with("unknown field `timeout_mss`"), "{e}");
        let e = eurotherm
            .parse(table(&format!("{base}unit_id = 300\n")))
            .unwrap_err();
        assert_eq!(e.path, "unit_id", "{e}");
        let e = eurotherm
            .parse(table(&format!(
                "{base}[limits]\nmax_temperature_c = \"hot\"\n"
            )))
            .unwrap_err();
        assert!(e.path.starts_with("limits"), "{e}");
        let e = driver("sorption_mqtt")
            .expect("registered")
            .parse(table("id = \"a\"\n"))
            .unwrap_err();
        assert_eq!(
            (e.path.as_str(), e.to_string().contains("broker")),
            ("", true),
            "{e}"
        );
    }

    #[test]
    fn a_pump_gets_the_balance_it_names_from_the_context() {
        let balance = driver("mt_sics")
            .expect("registered")
            .parse(table("id = \"b\"\nport = \"/dev/ppu-none-b\"\n"))
            .expect("parses");
        let pump = driver("ne1000")
            .expect("registered")
            .parse(table(
                "id = \"p\"\nport = \"/dev/ppu-none-p\"\nreagent = \"A\"\n\
                 density_g_per_ml = 1.0\nsyringe_inner_diameter_mm = 14.43\n\
                 syringe_volume_ml = 10.0\nfill_ml = 5.0\nbalance = \"b\"\n",
            ))
            .expect("parses");
        assert_eq!(
            pump.uses(),
            [DeviceUse {
                key: "balance",
                id: "b",
                driver: "mt_sics"
            }]
        );
        let mut ctx = BuildContext::new();
        let e = pump.build(&mut ctx).err().expect("no balance built yet");
        assert!(e.contains("balance"), "{e}");
        balance.build(&mut ctx).expect("balance builds");
        let built = pump.build(&mut ctx).expect("pump builds");
        assert!(
            built.info().transport.contains("weighed by b"),
            "{}",
            built.info().transport
        );
    }

    #[test]
    fn every_family_loads_with_its_commands() {
        let schema = schema().expect("the families' schema loads");
        let families: Vec<&str> = schema.families().iter().map(|f| f.name()).collect();
        for f in ["furnace", "dispenser", "balance", "analyser"] {
            assert!(families.contains(&f), "{f} missing from {families:?}");
        }
        for c in schema.commands() {
            assert!(
                c.result.is_some(),
                "{} has no result message",
                c.full_name()
            );
        }
        let furnace = schema.command_named("furnace").expect("furnace command");
        assert_eq!(furnace.capability(), "furnace_program");
        assert_eq!(
            schema.command_by_v1_step(12).map(|c| c.name()),
            Some("furnace")
        );
        let temp = furnace
            .message
            .get_field_by_name("segments")
            .expect("segments");
        assert_eq!(schema.field_options(&temp).min_items, 1);
    }
}

/// The generic validators of `ppu_schema::validate` against the real families' schemas: the
/// same walk checks every family, so these pin what it reads from the options.
#[cfg(test)]
mod validate_tests {
    use ppu_schema::prost_reflect::DynamicMessage;
    use ppu_schema::validate::{self, DeviceRefusal};

    use super::schema;
    use crate::device::Limits;
    use crate::furnace::schema as furnace;
    use crate::mfc::schema as mfc;

    fn dynamic<M: prost::Name>(s: &ppu_schema::Schema, m: &M) -> DynamicMessage {
        s.decode(&M::full_name(), &m.encode_to_vec())
            .expect("a family message decodes")
    }

    fn program(segments: Vec<furnace::furnace_segment::Kind>) -> furnace::FurnaceProgram {
        furnace::FurnaceProgram {
            segments: segments
                .into_iter()
                .map(|k| furnace::FurnaceSegment { kind: Some(k) })
                .collect(),
        }
    }

    #[test]
    fn structure_names_the_field_and_the_reason() {
        let s = schema().expect("schema");
        use furnace::furnace_segment::Kind::{Hold, Ramp};
        let ok = program(vec![
            Ramp(furnace::Ramp {
                temperature_c: 150.0,
                rate_c_per_min: 5.0,
            }),
            Hold(furnace::Hold { duration_s: 60.0 }),
        ]);
        assert_eq!(
            validate::structure(&s, &dynamic(&s, &ok), "furnace"),
            Ok(())
        );
        let cases = [
            (
                program(vec![]),
                "furnace.segments",
                "at least one segment is required",
            ),
            (
                program(vec![Ramp(furnace::Ramp {
                    temperature_c: 150.0,
                    rate_c_per_min: 0.0,
                })]),
                "furnace.segments[0].ramp.rate_c_per_min",
                "0 must be greater than 0",
            ),
            (
                program(vec![
                    Hold(furnace::Hold { duration_s: 1.0 }),
                    Hold(furnace::Hold { duration_s: -1.0 }),
                ]),
                "furnace.segments[1].hold.duration_s",
                "-1 must not be negative",
            ),
            (
                furnace::FurnaceProgram {
                    segments: vec![furnace::FurnaceSegment { kind: None }],
                },
                "furnace.segments[0]",
                "no kind set (one of ramp, hold, step)",
            ),
        ];
        for (m, path, reason) in cases {
            let e = validate::structure(&s, &dynamic(&s, &m), "furnace").expect_err(path);
            assert_eq!((e.path.as_str(), e.reason.as_str()), (path, reason));
        }
    }

    #[test]
    fn device_checks_declared_limits_and_accepted_values_by_name() {
        let s = schema().expect("schema");
        let limits = Limits::default()
            .with("max_flow_sccm", 500.0)
            .accepting("gas", ["CO2", "N2"]);
        let flow = |gas: &str, flow_sccm: f64| mfc::GasFlow {
            gas: gas.into(),
            flow_sccm,
            duration_s: 60.0,
        };
        let check = |m: &mfc::GasFlow| validate::device(&s, &dynamic(&s, m), "gas_flow", &limits);
        assert_eq!(check(&flow("co2", 500.0)), Ok(()));
        assert_eq!(
            check(&flow("CO2", 900.0)),
            Err(DeviceRefusal::Limit {
                path: "gas_flow.flow_sccm".into(),
                value: 900.0,
                limit: "max_flow_sccm 500".into(),
            })
        );
        assert!(matches!(
            check(&flow("He", 10.0)),
            Err(DeviceRefusal::Value { path, .. }) if path == "gas_flow.gas"
        ));
        // A device that declares no such limit does not bound the field.
        let open = Limits::default();
        assert_eq!(
            validate::device(&s, &dynamic(&s, &flow("He", 9000.0)), "gas_flow", &open),
            Ok(())
        );
    }

    #[test]
    fn bounds_follow_the_limit_keys_the_schema_names() {
        let s = schema().expect("schema");
        use furnace::furnace_segment::Kind::Hold;
        let m = program(vec![Hold(furnace::Hold { duration_s: 1.0 }); 3]);
        let limit = |max: usize| move |k: &str| (k == "max_program_segments").then_some(max);
        assert_eq!(
            validate::bounds(&s, &dynamic(&s, &m), "furnace", &limit(3)),
            Ok(())
        );
        let e = validate::bounds(&s, &dynamic(&s, &m), "furnace", &limit(2)).expect_err("over");
        assert_eq!(e.path, "furnace.segments");
        assert_eq!(
            e.reason,
            "3 segments, at most 2 (limits.max_program_segments)"
        );
    }
}
