//! Batch files: the TOML/JSON documents `ppuctl submit` reads.
//!
//! A batch file is `ppu.v1.SubmitBatchRequest` in the proto3 JSON mapping with proto field
//! names (see `examples/batch.toml` for an annotated example), whether written as TOML or
//! JSON. A step names its command by the command's step name: a typed v1 member (`furnace`,
//! `dispense`, ...) or any command of a family the daemon's schema declares (`gas_flow`), which
//! travels as `Step.command`. No family is known here by name: the file is read through the
//! message descriptors of the [`Schema`] the caller passes.
//!
//! The file is parsed into one tree (`serde_json::Value`), checked against the descriptors for
//! what proto3 JSON does not check (unknown keys, one-ofs, the keys a command requires, see
//! [`Checker`]), then converted by prost-reflect; every refusal names the path of the
//! offending key, e.g.
//! `experiments[0].steps[1].furnace.segments[0].ramp: unknown field `rate`, expected ...`.

use std::fmt;
use std::path::Path;

use ppu_proto::v1 as pb;
use ppu_schema::Schema;
use ppu_schema::prost_reflect::{
    DeserializeOptions, DynamicMessage, FieldDescriptor, Kind, MessageDescriptor,
};
use serde::Deserialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

/// Format of a batch file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Toml,
    Json,
}

impl Format {
    /// Picks the format from a file name: `.toml` or `.json`; `-` (stdin) is JSON.
    pub fn from_path(path: &Path) -> Result<Format, BatchError> {
        if path == Path::new("-") {
            return Ok(Format::Json);
        }
        match path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase)
        {
            Some(e) if e == "toml" => Ok(Format::Toml),
            Some(e) if e == "json" => Ok(Format::Json),
            _ => Err(BatchError::new(format!(
                "{}: cannot tell the format from the file name; use a .toml or .json extension \
                 (or `-` for JSON on stdin)",
                path.display()
            ))),
        }
    }
}

/// A batch file that could not be read, parsed or converted. The message names the path of the
/// offending key when there is one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchError {
    /// Where in the document, e.g. `experiments[0].steps[1]`; `None` for the whole document.
    pub path: Option<String>,
    pub message: String,
}

impl BatchError {
    fn new(message: impl Into<String>) -> Self {
        BatchError {
            path: None,
            message: message.into(),
        }
    }

    fn at(path: impl Into<String>, message: impl Into<String>) -> Self {
        BatchError {
            path: Some(path.into()),
            message: message.into(),
        }
    }
}

impl fmt::Display for BatchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.path {
            Some(p) if !p.is_empty() => write!(f, "{p}: {}", self.message),
            _ => f.write_str(&self.message),
        }
    }
}

impl std::error::Error for BatchError {}

// ---------------------------------------------------------------------------------------------
// Parsing and conversion: the file's tree, checked against the message descriptors, then
// converted by prost-reflect's proto3 JSON mapping.
// ---------------------------------------------------------------------------------------------

/// A parsed and converted batch, ready to submit.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// The key from the file, if it has one.
    pub idempotency_key: Option<String>,
    pub experiments: Vec<pb::ExperimentSpec>,
}

/// The schema of ppu.v1 alone, with no device family: what a batch file is checked against
/// when the daemon's schema cannot be had. Typed v1 steps still convert (without the families'
/// required-key rules); family commands outside v1 are unknown keys.
pub fn offline_schema() -> Schema {
    match Schema::new(&[pb::FILE_DESCRIPTOR_SET]) {
        Ok(schema) => schema,
        // ppu.v1's own descriptors are compiled in: they always load.
        Err(e) => unreachable!("ppu.v1 descriptors do not load: {e}"),
    }
}

/// The envelope's keys a batch file must write (proto3 has no required fields; these are the
/// ones a batch is meaningless without). Family commands declare theirs in their schema.
const ENVELOPE_REQUIRED: &[(&str, &str)] = &[
    ("ppu.v1.SubmitBatchRequest", "experiments"),
    ("ppu.v1.ExperimentSpec", "name"),
    ("ppu.v1.ExperimentSpec", "steps"),
];

const STEP: &str = "ppu.v1.Step";
/// The `Step` member clients never submit (the scheduler inserts transfers).
const TRANSFER: &str = "transfer";
/// The `Step` member carrying any family's command as `google.protobuf.Any`; a batch file names
/// the command instead (`gas_flow = { ... }`).
const COMMAND: &str = "command";

/// Parses a batch file's bytes in the given format and converts it to proto specs, resolving
/// step kinds through `schema` (the daemon's families plus ppu.v1, or [`offline_schema`]).
pub fn parse(bytes: &[u8], format: Format, schema: &Schema) -> Result<Batch, BatchError> {
    let text = std::str::from_utf8(bytes)
        .map_err(|e| BatchError::new(format!("the file is not valid UTF-8: {e}")))?;
    let mut tree: Value = match format {
        Format::Toml => toml::from_str(text)
            .map_err(|e| BatchError::new(format!("invalid TOML: {}", e.to_string().trim_end())))?,
        Format::Json => {
            serde_json::from_str(text).map_err(|e| BatchError::new(format!("invalid JSON: {e}")))?
        }
    };
    let desc = schema
        .pool()
        .get_message_by_name("ppu.v1.SubmitBatchRequest")
        .ok_or_else(|| BatchError::new("the schema has no ppu.v1.SubmitBatchRequest"))?;
    Checker { schema }.message(&mut tree, &desc, "", Mode::Envelope)?;
    let mut track = serde_path_to_error::Track::new();
    let msg = DynamicMessage::deserialize_with_options(
        desc,
        serde_path_to_error::Deserializer::new(&tree, &mut track),
        &DeserializeOptions::new(),
    )
    .map_err(|e| {
        let path = track.path();
        let path = (path.iter().next().is_some()).then(|| path.to_string());
        BatchError {
            path,
            message: e.to_string(),
        }
    })?;
    let request: pb::SubmitBatchRequest = msg
        .transcode_to()
        .map_err(|e| BatchError::new(format!("the batch does not convert: {e}")))?;
    // An absent key and an empty one are the same in proto3; the file's key is optional.
    let has_key = tree.get("idempotency_key").is_some_and(|k| !k.is_null());
    Ok(Batch {
        idempotency_key: has_key.then_some(request.idempotency_key),
        experiments: request.experiments,
    })
}

/// The default idempotency key of a file: `sha256:` + the hex SHA-256 of its bytes.
pub fn content_key(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    let mut key = String::with_capacity(7 + 64);
    key.push_str("sha256:");
    for b in digest {
        key.push_str(&format!("{b:02x}"));
    }
    key
}

/// Which rules a message's keys follow.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// ppu.v1's envelope (batch, experiment, step): [`ENVELOPE_REQUIRED`].
    Envelope,
    /// Inside a family's command, read through its schema: every field is required unless
    /// its options say 0 means a default (`zero_is_default`), it is optional, or it is a list
    /// that may be empty.
    Family,
    /// Inside a v1 message no family schema describes (offline): nothing required.
    Loose,
}

/// The checks proto3 JSON does not make, with the path of every refusal: unknown keys (named
/// with the keys that would do), one-ofs with exactly one member, keys a command requires,
/// numbers written as numbers. It also rewrites a step naming a family command outside v1
/// (`gas_flow = {...}`) into the `Step.command` Any that carries it.
struct Checker<'a> {
    schema: &'a Schema,
}

impl Checker<'_> {
    fn message(
        &self,
        value: &mut Value,
        desc: &MessageDescriptor,
        path: &str,
        mode: Mode,
    ) -> Result<(), BatchError> {
        // Anything but a table is the converter's to refuse, with its own wording.
        let Value::Object(map) = value else {
            return Ok(());
        };
        let is_step = desc.full_name() == STEP;
        // Unknown keys first, reported at the table holding them.
        for key in map.keys() {
            let known = field(desc, key).is_some_and(|f| !(is_step && f.name() == COMMAND))
                || (is_step && self.step_command(key).is_some());
            if !known {
                return Err(BatchError::at(path, unknown_field(key, &self.keys(desc))));
            }
        }
        for f in desc.fields() {
            let required = match mode {
                Mode::Envelope => ENVELOPE_REQUIRED.contains(&(desc.full_name(), f.name())),
                Mode::Family => {
                    let opts = self.schema.field_options(&f);
                    let optional = f.containing_oneof().is_some()
                        || f.supports_presence()
                        || opts.zero_is_default
                        || f.is_map()
                        || (f.is_list() && opts.min_items == 0);
                    !optional
                }
                Mode::Loose => false,
            };
            if required && !map.contains_key(f.name()) && !map.contains_key(f.json_name()) {
                return Err(BatchError::at(
                    path,
                    format!("missing field `{}`", f.name()),
                ));
            }
        }
        let keys: Vec<String> = map.keys().cloned().collect();
        for key in &keys {
            let here = join_key(path, key);
            if is_step && key == TRANSFER {
                continue; // refused below, whatever its content
            }
            let Some(v) = map.get_mut(key) else { continue };
            if is_step && let Some(cmd) = self.step_command(key) {
                let message = cmd.message.clone();
                self.message(v, &message, &here, Mode::Family)?;
                continue;
            }
            let Some(f) = field(desc, key) else { continue };
            // A v1 alias is read through its family's message when the schema has it (same
            // bytes, same keys, plus the family's rules).
            if is_step && let Some(cmd) = self.schema.command_by_v1_step(f.number()) {
                let message = cmd.message.clone();
                self.message(v, &message, &here, Mode::Family)?;
                continue;
            }
            let inner = match (mode, &f.kind()) {
                (Mode::Envelope, Kind::Message(_)) if is_step => Mode::Loose,
                _ => mode,
            };
            self.field_value(v, &f, &here, inner)?;
        }
        if is_step && map.contains_key(TRANSFER) {
            return Err(BatchError::at(
                join_key(path, TRANSFER),
                "transfer steps cannot be submitted: the scheduler inserts a transfer \
                 whenever the next step needs the sample on another device",
            ));
        }
        for oneof in desc.oneofs().filter(|o| !o.is_synthetic()) {
            let allowed: Vec<String> = if is_step {
                self.step_kinds(&oneof)
            } else {
                oneof.fields().map(|f| f.name().to_owned()).collect()
            };
            let found: Vec<&String> = allowed.iter().filter(|k| map.contains_key(*k)).collect();
            if found.len() != 1 {
                let what = words(desc.name());
                let allowed = allowed.join(", ");
                let found = match found.len() {
                    0 => "none".to_owned(),
                    n => {
                        let names: Vec<&str> = found.iter().map(|s| s.as_str()).collect();
                        format!("{n} ({})", names.join(", "))
                    }
                };
                return Err(BatchError::at(
                    path,
                    format!("a {what} needs exactly one of: {allowed}; found {found}"),
                ));
            }
        }
        // The command outside v1 travels as `Step.command`, an Any of its message.
        if is_step {
            let named = keys
                .iter()
                .find_map(|k| self.step_command(k).map(|c| (k, c)));
            if let Some((key, cmd)) = named {
                let type_url = ppu_schema::type_url(cmd.full_name());
                if let Some(Value::Object(mut body)) = map.remove(key.as_str()) {
                    body.insert("@type".into(), Value::String(type_url));
                    map.insert(COMMAND.into(), Value::Object(body));
                }
            }
        }
        Ok(())
    }

    fn field_value(
        &self,
        value: &mut Value,
        f: &FieldDescriptor,
        path: &str,
        mode: Mode,
    ) -> Result<(), BatchError> {
        if f.is_map() {
            let Kind::Message(entry) = f.kind() else {
                return Ok(());
            };
            let vf = entry.map_entry_value_field();
            if let Value::Object(m) = value {
                for (k, v) in m.iter_mut() {
                    self.single(v, &vf, &join_key(path, k), mode)?;
                }
            }
            return Ok(());
        }
        if f.is_list() {
            if let Value::Array(items) = value {
                for (i, v) in items.iter_mut().enumerate() {
                    self.single(v, f, &format!("{path}[{i}]"), mode)?;
                }
            }
            return Ok(());
        }
        self.single(value, f, path, mode)
    }

    fn single(
        &self,
        value: &mut Value,
        f: &FieldDescriptor,
        path: &str,
        mode: Mode,
    ) -> Result<(), BatchError> {
        let number = |r: Result<f64, serde_json::Error>| {
            r.map(|_| ())
                .map_err(|e| BatchError::at(path, e.to_string()))
        };
        match f.kind() {
            Kind::Message(m) => self.message(value, &m, path, mode),
            // proto3 JSON also takes numbers as strings; a batch file writes numbers.
            Kind::Double | Kind::Float => number(f64::deserialize(&*value)),
            Kind::Int32
            | Kind::Sint32
            | Kind::Sfixed32
            | Kind::Int64
            | Kind::Sint64
            | Kind::Sfixed64 => number(i64::deserialize(&*value).map(|v| v as f64)),
            Kind::Uint32 | Kind::Fixed32 | Kind::Uint64 | Kind::Fixed64 => {
                number(u64::deserialize(&*value).map(|v| v as f64))
            }
            _ => Ok(()),
        }
    }

    /// A command of the schema named `key` that has no typed member in `ppu.v1.Step`.
    fn step_command(&self, key: &str) -> Option<&ppu_schema::Command> {
        self.schema
            .command_named(key)
            .filter(|c| c.options.v1_step_field == 0)
    }

    /// The step kinds a batch file may write: the typed v1 members (in field order) and every
    /// command of the schema without one, never `transfer` or the raw `command`.
    fn step_kinds(&self, oneof: &ppu_schema::prost_reflect::OneofDescriptor) -> Vec<String> {
        let mut kinds: Vec<String> = oneof
            .fields()
            .map(|f| f.name().to_owned())
            .filter(|n| n != TRANSFER && n != COMMAND)
            .collect();
        kinds.extend(
            self.schema
                .commands()
                .iter()
                .filter(|c| c.options.v1_step_field == 0)
                .map(|c| c.name().to_owned()),
        );
        kinds
    }

    /// The keys a table of `desc` may hold, for an unknown key's message.
    fn keys(&self, desc: &MessageDescriptor) -> Vec<String> {
        if desc.full_name() == STEP {
            let mut keys = vec!["device_id".to_owned()];
            for oneof in desc.oneofs() {
                keys.extend(self.step_kinds(&oneof));
            }
            return keys;
        }
        desc.fields().map(|f| f.name().to_owned()).collect()
    }
}

/// The field a key names: its proto name or its JSON (lowerCamelCase) name.
fn field(desc: &MessageDescriptor, key: &str) -> Option<FieldDescriptor> {
    desc.get_field_by_name(key)
        .or_else(|| desc.get_field_by_json_name(key))
}

/// serde's wording for an unknown key, so messages read as they always have.
fn unknown_field(key: &str, expected: &[String]) -> String {
    let quoted: Vec<String> = expected.iter().map(|k| format!("`{k}`")).collect();
    match quoted.as_slice() {
        [] => format!("unknown field `{key}`, there are no fields"),
        [one] => format!("unknown field `{key}`, expected {one}"),
        [a, b] => format!("unknown field `{key}`, expected {a} or {b}"),
        _ => format!(
            "unknown field `{key}`, expected one of {}",
            quoted.join(", ")
        ),
    }
}

/// `FurnaceSegment` → `furnace segment`: a message's name as words, for messages.
fn words(name: &str) -> String {
    let mut out = String::new();
    for (i, c) in name.chars().enumerate() {
        if c.is_uppercase() {
            if i > 0 {
                out.push(' ');
            }
            out.extend(c.to_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

fn join_key(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// ppu.v1 and the four families the drivers register, as a daemon serves them.
    fn schema() -> Schema {
        Schema::new(&[
            pb::FILE_DESCRIPTOR_SET,
            ppu_drivers::registry::FILE_DESCRIPTOR_SET,
        ])
        .expect("the schema loads")
    }

    const EXAMPLE_TOML: &str = include_str!("../../examples/batch.toml");
    const EXAMPLE_JSON: &str = include_str!("../../examples/batch.json");

    fn toml_err(text: &str) -> String {
        parse(text.as_bytes(), Format::Toml, &schema())
            .expect_err("should be refused")
            .to_string()
    }

    fn json_err(text: &str) -> String {
        parse(text.as_bytes(), Format::Json, &schema())
            .expect_err("should be refused")
            .to_string()
    }

    #[test]
    fn example_files_convert_to_identical_specs() {
        let from_toml =
            parse(EXAMPLE_TOML.as_bytes(), Format::Toml, &schema()).expect("batch.toml parses");
        let from_json =
            parse(EXAMPLE_JSON.as_bytes(), Format::Json, &schema()).expect("batch.json parses");
        assert_eq!(from_toml, from_json);
        assert_eq!(
            from_toml.idempotency_key.as_deref(),
            Some("calcination-round-1")
        );
        assert_eq!(from_toml.experiments.len(), 3);
    }

    /// The examples are realistic furnace programs: ≤ 600 °C, ≤ 10 °C/min, roughly 2 h each.
    #[test]
    fn example_programs_are_realistic() {
        let batch = parse(EXAMPLE_TOML.as_bytes(), Format::Toml, &schema()).unwrap();
        for spec in &batch.experiments {
            assert!(!spec.name.is_empty() && !spec.sample_id.is_empty());
            let mut setpoint = 25.0_f64; // room temperature
            let mut minutes = 0.0;
            for step in &spec.steps {
                let Some(pb::step::Kind::Furnace(program)) = &step.kind else {
                    panic!("{}: every example step is a furnace program", spec.name);
                };
                for seg in &program.segments {
                    match seg.kind.as_ref().unwrap() {
                        pb::furnace_segment::Kind::Ramp(r) => {
                            assert!(r.temperature_c <= 600.0 && r.rate_c_per_min <= 10.0);
                            assert!(r.rate_c_per_min > 0.0);
                            minutes += (r.temperature_c - setpoint).abs() / r.rate_c_per_min;
                            setpoint = r.temperature_c;
                        }
                        pb::furnace_segment::Kind::Hold(h) => minutes += h.duration_s / 60.0,
                        pb::furnace_segment::Kind::Step(s) => {
                            assert!(s.temperature_c <= 600.0);
                            setpoint = s.temperature_c;
                        }
                    }
                }
            }
            assert!(
                (100.0..=140.0).contains(&minutes),
                "{}: {minutes} min",
                spec.name
            );
        }
    }

    #[test]
    fn step_with_two_kinds_is_refused_naming_the_step() {
        let text = r#"
[[experiments]]
name = "x"
[[experiments.steps]]
weigh = {}
[[experiments.steps]]
weigh = {}
degas = { temperature_c = 120.0, duration_s = 600.0 }
"#;
        let err = toml_err(text);
        assert!(err.starts_with("experiments[0].steps[1]: "), "{err}");
        assert!(
            err.contains("exactly one of") && err.contains("weigh, degas"),
            "{err}"
        );
    }

    #[test]
    fn step_without_kind_is_refused() {
        let err = json_err(r#"{"experiments":[{"name":"x","steps":[{"device_id":"furnace-1"}]}]}"#);
        assert!(err.starts_with("experiments[0].steps[0]: "), "{err}");
        assert!(err.contains("found none"), "{err}");
    }

    #[test]
    fn segment_with_two_kinds_is_refused_naming_the_segment() {
        let err = json_err(
            r#"{"experiments":[{"name":"x","steps":[{"furnace":{"segments":[
                {"hold":{"duration_s":1}},
                {"ramp":{"temperature_c":100,"rate_c_per_min":5},"hold":{"duration_s":1}}
            ]}}]}]}"#,
        );
        assert!(
            err.starts_with("experiments[0].steps[0].furnace.segments[1]: "),
            "{err}"
        );
    }

    #[test]
    fn unknown_key_is_refused_naming_the_path() {
        let text = r#"
[[experiments]]
name = "x"
[[experiments.steps]]
furnace = { segments = [{ ramp = { temperature_c = 150.0, rate = 5.0 } }] }
"#;
        let err = toml_err(text);
        assert!(
            err.starts_with(
                "experiments[0].steps[0].furnace.segments[0].ramp: unknown field `rate`"
            ),
            "{err}"
        );

        let err = json_err(r#"{"experiments":[{"name":"x","steps":[{"furnce":{}}]}]}"#);
        assert!(
            err.starts_with("experiments[0].steps[0]: unknown field `furnce`"),
            "{err}"
        );

        let err = json_err(r#"{"idempotency":"k","experiments":[]}"#);
        assert!(err.starts_with("unknown field `idempotency`"), "{err}");
    }

    #[test]
    fn wrong_type_and_missing_field_name_the_path() {
        let err = toml_err(
            r#"
[[experiments]]
name = "x"
labels = { round = 1 }
steps = []
"#,
        );
        assert!(
            err.starts_with("experiments[0].labels.round: invalid type: integer"),
            "{err}"
        );

        let err =
            json_err(r#"{"experiments":[{"name":"x","steps":[{"degas":{"temperature_c":1}}]}]}"#);
        assert!(
            err.starts_with("experiments[0].steps[0].degas: missing field `duration_s`"),
            "{err}"
        );
    }

    #[test]
    fn integers_are_accepted_for_float_fields() {
        let batch = parse(
            br#"{"experiments":[{"name":"x","steps":[{"dispense":{"reagent":"EtOH","volume_ml":5,"rate_ml_per_min":2}}]}]}"#,
            Format::Json,
            &schema(),
        )
        .unwrap();
        let Some(pb::step::Kind::Dispense(d)) = &batch.experiments[0].steps[0].kind else {
            panic!()
        };
        assert_eq!((d.volume_ml, d.rate_ml_per_min), (5.0, 2.0));
    }

    #[test]
    fn refill_is_accepted_with_defaults_for_volume_and_rate() {
        let text = r#"
[[experiments]]
name = "x"
[[experiments.steps]]
refill = { reagent = "ethanol", volume_ml = 5.0, rate_ml_per_min = 2.5 }
[[experiments.steps]]
device_id = "pump-1"
refill = { reagent = "water" }
"#;
        let batch = parse(text.as_bytes(), Format::Toml, &schema()).unwrap();
        let steps = &batch.experiments[0].steps;
        assert_eq!(
            steps[0].kind,
            Some(pb::step::Kind::Refill(pb::Refill {
                reagent: "ethanol".into(),
                volume_ml: 5.0,
                rate_ml_per_min: 2.5,
            }))
        );
        assert_eq!(steps[1].device_id, "pump-1");
        assert_eq!(
            steps[1].kind,
            Some(pb::step::Kind::Refill(pb::Refill {
                reagent: "water".into(),
                volume_ml: 0.0,
                rate_ml_per_min: 0.0,
            }))
        );

        let err = json_err(r#"{"experiments":[{"name":"x","steps":[{"refill":{}}]}]}"#);
        assert!(
            err.starts_with("experiments[0].steps[0].refill: missing field `reagent`"),
            "{err}"
        );
        let err = json_err(
            r#"{"experiments":[{"name":"x","steps":[{"refill":{"reagent":"a","volume":1}}]}]}"#,
        );
        assert!(
            err.starts_with("experiments[0].steps[0].refill: unknown field `volume`"),
            "{err}"
        );
        let err = json_err(
            r#"{"experiments":[{"name":"x","steps":[{"refill":{"reagent":"a"},"weigh":{}}]}]}"#,
        );
        assert!(err.contains("weigh, refill"), "{err}");
        assert!(
            err.contains("dispense, weigh, furnace, degas, isotherm, refill"),
            "{err}"
        );
    }

    #[test]
    fn isotherm_keys_are_accepted_and_default_to_zero() {
        let text = r#"
[[experiments]]
name = "x"
[[experiments.steps]]
isotherm = { adsorptive = "CO2", temperature_c = 25.0, pressure_bar = [0.1, 0.5, 1.0], equilibration_interval_s = 15.0, max_equilibration_s = 1800.0, sample_mass_g = 0.1234 }
[[experiments.steps]]
isotherm = { adsorptive = "N2", temperature_c = -196.0, pressure_bar = [0.05] }
"#;
        let batch = parse(text.as_bytes(), Format::Toml, &schema()).unwrap();
        let steps = &batch.experiments[0].steps;
        assert_eq!(
            steps[0].kind,
            Some(pb::step::Kind::Isotherm(pb::Isotherm {
                adsorptive: "CO2".into(),
                temperature_c: 25.0,
                pressure_bar: vec![0.1, 0.5, 1.0],
                equilibration_interval_s: 15.0,
                max_equilibration_s: 1800.0,
                sample_mass_g: 0.1234,
            }))
        );
        let Some(pb::step::Kind::Isotherm(i)) = &steps[1].kind else {
            panic!("{steps:?}")
        };
        assert_eq!(
            (
                i.equilibration_interval_s,
                i.max_equilibration_s,
                i.sample_mass_g
            ),
            (0.0, 0.0, 0.0)
        );

        let err = json_err(
            r#"{"experiments":[{"name":"x","steps":[{"isotherm":{"adsorptive":"CO2",
                "temperature_c":25,"pressure_bar":[1],"sample_mass_g":"heavy"}}]}]}"#,
        );
        assert!(
            err.starts_with("experiments[0].steps[0].isotherm.sample_mass_g: invalid type"),
            "{err}"
        );
    }

    #[test]
    fn transfer_steps_are_refused_because_the_scheduler_inserts_them() {
        let text = r#"
[[experiments]]
name = "x"
[[experiments.steps]]
weigh = {}
[[experiments.steps]]
transfer = { sample_id = "S-1", from_device_id = "balance-1", to_device_id = "furnace-1" }
"#;
        let err = toml_err(text);
        assert!(
            err.starts_with("experiments[0].steps[1].transfer: transfer steps cannot be submitted"),
            "{err}"
        );
        assert!(err.contains("the scheduler inserts"), "{err}");
        // Refused whatever its content, even next to a valid kind.
        let err =
            json_err(r#"{"experiments":[{"name":"x","steps":[{"weigh":{},"transfer":{}}]}]}"#);
        assert!(
            err.starts_with("experiments[0].steps[0].transfer: transfer steps cannot be submitted"),
            "{err}"
        );
    }

    /// A family the daemon serves that ppuctl was not built with (and v1 has no member for):
    /// its descriptors are made here as GetSchema would send them.
    fn schema_with_a_new_family() -> Schema {
        let set = r#"{"file":[{
            "name": "test/mfc.proto", "package": "test.mfc.v1", "syntax": "proto3",
            "dependency": ["ppu/schema/v1/options.proto"],
            "options": {"[ppu.schema.v1.family]": {"name": "mfc"}},
            "messageType": [
              {"name": "GasFlow",
               "options": {"[ppu.schema.v1.command]": {"name": "gas_flow",
                  "capability": "gas_flow", "result": "test.mfc.v1.GasFlowResult"}},
               "field": [
                 {"name": "gas", "number": 1, "type": "TYPE_STRING", "label": "LABEL_OPTIONAL",
                  "jsonName": "gas", "options": {"[ppu.schema.v1.field]": {"required": true}}},
                 {"name": "flow_sccm", "number": 2, "type": "TYPE_DOUBLE",
                  "label": "LABEL_OPTIONAL", "jsonName": "flowSccm",
                  "options": {"[ppu.schema.v1.field]": {"unit": "sccm"}}},
                 {"name": "duration_s", "number": 3, "type": "TYPE_DOUBLE",
                  "label": "LABEL_OPTIONAL", "jsonName": "durationS"}]},
              {"name": "GasFlowResult",
               "field": [{"name": "mean_flow_sccm", "number": 1, "type": "TYPE_DOUBLE",
                  "label": "LABEL_OPTIONAL", "jsonName": "meanFlowSccm"}]}]}]}"#;
        let base = schema();
        let desc = base
            .pool()
            .get_message_by_name("google.protobuf.FileDescriptorSet")
            .expect("descriptor.proto is in the pool");
        let mut de = serde_json::Deserializer::from_str(set);
        let set = DynamicMessage::deserialize(desc, &mut de).expect("the test family is valid");
        use prost::Message as _;
        // ppu.v1 and the made-up family only: the compiled-in families have their own
        // (real) gas_flow, and step names are unique across a schema.
        Schema::new(&[pb::FILE_DESCRIPTOR_SET, &set.encode_to_vec()])
            .expect("the schema with the test family loads")
    }

    #[test]
    fn a_command_of_a_family_outside_v1_travels_as_an_any() {
        let schema = schema_with_a_new_family();
        let text = r#"
[[experiments]]
name = "flow"
[[experiments.steps]]
device_id = "mfc-1"
gas_flow = { gas = "CO2", flow_sccm = 50, duration_s = 60 }
"#;
        let batch = parse(text.as_bytes(), Format::Toml, &schema).unwrap();
        let step = &batch.experiments[0].steps[0];
        assert_eq!(step.device_id, "mfc-1");
        let Some(pb::step::Kind::Command(any)) = &step.kind else {
            panic!("{step:?}")
        };
        assert_eq!(any.type_url, "type.googleapis.com/test.mfc.v1.GasFlow");
        let m = schema.decode(&any.type_url, &any.value).unwrap();
        assert_eq!(m.get_field_by_name("gas").unwrap().as_str(), Some("CO2"));
        assert_eq!(
            m.get_field_by_name("flow_sccm").unwrap().as_f64(),
            Some(50.0)
        );

        // Its keys follow the family's schema, with the path named.
        let err = parse(
            br#"{"experiments":[{"name":"x","steps":[{"gas_flow":{"gas":"CO2","flow":5,"duration_s":1}}]}]}"#,
            Format::Json,
            &schema,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.starts_with("experiments[0].steps[0].gas_flow: unknown field `flow`"),
            "{err}"
        );
        let err = parse(
            br#"{"experiments":[{"name":"x","steps":[{"gas_flow":{"gas":"CO2","duration_s":1}}]}]}"#,
            Format::Json,
            &schema,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.starts_with("experiments[0].steps[0].gas_flow: missing field `flow_sccm`"),
            "{err}"
        );
        let err = parse(
            br#"{"experiments":[{"name":"x","steps":[{"weigh":{},
                "gas_flow":{"gas":"CO2","flow_sccm":5,"duration_s":1}}]}]}"#,
            Format::Json,
            &schema,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("dispense, weigh, furnace, degas, isotherm, refill, gas_flow; found 2"),
            "{err}"
        );
        // Without the daemon's schema the command is not known.
        let err = parse(text.as_bytes(), Format::Toml, &offline_schema())
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("experiments[0].steps[0]: unknown field `gas_flow`"),
            "{err}"
        );
    }

    #[test]
    fn syntax_errors_are_reported() {
        assert!(toml_err("experiments = [").starts_with("invalid TOML"));
        assert!(json_err("{").starts_with("invalid JSON"));
    }

    #[test]
    fn content_key_is_sha256_of_bytes() {
        assert_eq!(
            content_key(b"abc"),
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn format_from_extension() {
        assert_eq!(
            Format::from_path(Path::new("a/b.TOML")).unwrap(),
            Format::Toml
        );
        assert_eq!(
            Format::from_path(Path::new("b.json")).unwrap(),
            Format::Json
        );
        assert_eq!(Format::from_path(Path::new("-")).unwrap(), Format::Json);
        assert!(Format::from_path(Path::new("b.yaml")).is_err());
    }
}
