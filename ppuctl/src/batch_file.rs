//! Batch files: the TOML/JSON documents `ppuctl submit` reads.
//!
//! The serde structs below mirror `ppu.v1.SubmitBatchRequest` field for field (see
//! `examples/batch.toml` for an annotated example). Every struct denies unknown keys, and every
//! error names the path of the offending key, e.g.
//! `experiments[0].steps[1].furnace.segments[0].ramp: unknown field `rate`, expected ...`.
//!
//! Paths are tracked by parsing the file into a `serde_json::Value` first (TOML or JSON, same
//! tree), then deserializing the typed structs from that tree through [`PathDeserializer`],
//! which records where in the tree an error was raised.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use ppu_proto::v1 as pb;
use serde::Deserialize;
use serde::de::{self, DeserializeSeed, IntoDeserializer, MapAccess, SeqAccess, Visitor};
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
// The file format (mirrors ppu.v1).
// ---------------------------------------------------------------------------------------------

/// The whole file: one `SubmitBatchRequest`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchFile {
    /// Optional idempotency key; `--key` overrides it, and without either the key is
    /// `sha256:<hex of the file's bytes>`.
    #[serde(default)]
    pub idempotency_key: Option<String>,
    /// At least one experiment.
    pub experiments: Vec<ExperimentFile>,
}

/// One `ExperimentSpec`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExperimentFile {
    pub name: String,
    #[serde(default)]
    pub sample_id: String,
    #[serde(default)]
    pub priority: i32,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub steps: Vec<StepFile>,
}

/// One `Step`: an optional device pin and exactly one step kind.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepFile {
    #[serde(default)]
    pub device_id: Option<String>,
    #[serde(default)]
    pub dispense: Option<DispenseFile>,
    #[serde(default)]
    pub weigh: Option<WeighFile>,
    #[serde(default)]
    pub furnace: Option<FurnaceFile>,
    #[serde(default)]
    pub degas: Option<DegasFile>,
    #[serde(default)]
    pub isotherm: Option<IsothermFile>,
    #[serde(default)]
    pub refill: Option<RefillFile>,
    /// Accepted by the parser only to refuse it with a clear message: the scheduler inserts
    /// transfers, clients never submit them.
    #[serde(default)]
    pub transfer: Option<Value>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DispenseFile {
    pub reagent: String,
    pub volume_ml: f64,
    pub rate_ml_per_min: f64,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WeighFile {
    /// 0 (the default) means the device's own default.
    #[serde(default)]
    pub stability_timeout_s: f64,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FurnaceFile {
    pub segments: Vec<SegmentFile>,
}

/// One `FurnaceSegment`: exactly one of `ramp`, `hold`, `step`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SegmentFile {
    #[serde(default)]
    pub ramp: Option<RampFile>,
    #[serde(default)]
    pub hold: Option<HoldFile>,
    #[serde(default)]
    pub step: Option<StepToFile>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RampFile {
    pub temperature_c: f64,
    pub rate_c_per_min: f64,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HoldFile {
    pub duration_s: f64,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepToFile {
    pub temperature_c: f64,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DegasFile {
    pub temperature_c: f64,
    pub duration_s: f64,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IsothermFile {
    pub adsorptive: String,
    pub temperature_c: f64,
    pub pressure_bar: Vec<f64>,
    /// 0 (the default) means the device default.
    #[serde(default)]
    pub equilibration_interval_s: f64,
    /// 0 (the default) means the device default.
    #[serde(default)]
    pub max_equilibration_s: f64,
    /// 0 (the default) means the mass last weighed for the sample, else the device default.
    #[serde(default)]
    pub sample_mass_g: f64,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RefillFile {
    pub reagent: String,
    /// 0 (the default) means "fill the syringe".
    #[serde(default)]
    pub volume_ml: f64,
    /// 0 (the default) means the pump's default rate.
    #[serde(default)]
    pub rate_ml_per_min: f64,
}

// ---------------------------------------------------------------------------------------------
// Parsing and conversion.
// ---------------------------------------------------------------------------------------------

/// A parsed and converted batch, ready to submit.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// The key from the file, if it has one.
    pub idempotency_key: Option<String>,
    pub experiments: Vec<pb::ExperimentSpec>,
}

/// Parses a batch file's bytes in the given format and converts it to proto specs.
pub fn parse(bytes: &[u8], format: Format) -> Result<Batch, BatchError> {
    let text = std::str::from_utf8(bytes)
        .map_err(|e| BatchError::new(format!("the file is not valid UTF-8: {e}")))?;
    let tree: Value = match format {
        Format::Toml => toml::from_str(text)
            .map_err(|e| BatchError::new(format!("invalid TOML: {}", e.to_string().trim_end())))?,
        Format::Json => {
            serde_json::from_str(text).map_err(|e| BatchError::new(format!("invalid JSON: {e}")))?
        }
    };
    let file = BatchFile::deserialize(PathDeserializer::root(&tree)).map_err(|e| BatchError {
        path: e.path,
        message: e.message,
    })?;
    file.into_batch()
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

impl BatchFile {
    /// Converts to proto specs, checking the one-of rules the types cannot express.
    pub fn into_batch(self) -> Result<Batch, BatchError> {
        let experiments = self
            .experiments
            .into_iter()
            .enumerate()
            .map(|(i, e)| e.into_spec(&format!("experiments[{i}]")))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Batch {
            idempotency_key: self.idempotency_key,
            experiments,
        })
    }
}

impl ExperimentFile {
    fn into_spec(self, path: &str) -> Result<pb::ExperimentSpec, BatchError> {
        let steps = self
            .steps
            .into_iter()
            .enumerate()
            .map(|(j, s)| s.into_step(&format!("{path}.steps[{j}]")))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(pb::ExperimentSpec {
            name: self.name,
            sample_id: self.sample_id,
            // `collect` so this works whether prost generated a HashMap or a BTreeMap.
            labels: self.labels.into_iter().collect(),
            priority: self.priority,
            steps,
        })
    }
}

/// Names of the step kinds, in proto order, for error messages.
const STEP_KINDS: &str = "dispense, weigh, furnace, degas, isotherm, refill";

impl StepFile {
    fn into_step(self, path: &str) -> Result<pb::Step, BatchError> {
        use pb::step::Kind;
        if self.transfer.is_some() {
            return Err(BatchError::at(
                format!("{path}.transfer"),
                "transfer steps cannot be submitted: the scheduler inserts a transfer \
                 whenever the next step needs the sample on another device",
            ));
        }
        let mut kinds: Vec<(&str, Kind)> = Vec::new();
        if let Some(d) = self.dispense {
            kinds.push((
                "dispense",
                Kind::Dispense(pb::Dispense {
                    reagent: d.reagent,
                    volume_ml: d.volume_ml,
                    rate_ml_per_min: d.rate_ml_per_min,
                }),
            ));
        }
        if let Some(w) = self.weigh {
            kinds.push((
                "weigh",
                Kind::Weigh(pb::Weigh {
                    stability_timeout_s: w.stability_timeout_s,
                }),
            ));
        }
        if let Some(f) = self.furnace {
            let segments = f
                .segments
                .into_iter()
                .enumerate()
                .map(|(k, s)| s.into_segment(&format!("{path}.furnace.segments[{k}]")))
                .collect::<Result<Vec<_>, _>>()?;
            kinds.push(("furnace", Kind::Furnace(pb::FurnaceProgram { segments })));
        }
        if let Some(d) = self.degas {
            kinds.push((
                "degas",
                Kind::Degas(pb::Degas {
                    temperature_c: d.temperature_c,
                    duration_s: d.duration_s,
                }),
            ));
        }
        if let Some(i) = self.isotherm {
            kinds.push((
                "isotherm",
                Kind::Isotherm(pb::Isotherm {
                    adsorptive: i.adsorptive,
                    temperature_c: i.temperature_c,
                    pressure_bar: i.pressure_bar,
                    equilibration_interval_s: i.equilibration_interval_s,
                    max_equilibration_s: i.max_equilibration_s,
                    sample_mass_g: i.sample_mass_g,
                }),
            ));
        }
        if let Some(r) = self.refill {
            kinds.push((
                "refill",
                Kind::Refill(pb::Refill {
                    reagent: r.reagent,
                    volume_ml: r.volume_ml,
                    rate_ml_per_min: r.rate_ml_per_min,
                }),
            ));
        }
        let kind = exactly_one(path, "step", STEP_KINDS, kinds)?;
        Ok(pb::Step {
            device_id: self.device_id.unwrap_or_default(),
            kind: Some(kind),
        })
    }
}

impl SegmentFile {
    fn into_segment(self, path: &str) -> Result<pb::FurnaceSegment, BatchError> {
        use pb::furnace_segment::Kind;
        let mut kinds: Vec<(&str, Kind)> = Vec::new();
        if let Some(r) = self.ramp {
            kinds.push((
                "ramp",
                Kind::Ramp(pb::Ramp {
                    temperature_c: r.temperature_c,
                    rate_c_per_min: r.rate_c_per_min,
                }),
            ));
        }
        if let Some(h) = self.hold {
            kinds.push((
                "hold",
                Kind::Hold(pb::Hold {
                    duration_s: h.duration_s,
                }),
            ));
        }
        if let Some(s) = self.step {
            kinds.push((
                "step",
                Kind::Step(pb::StepTo {
                    temperature_c: s.temperature_c,
                }),
            ));
        }
        let kind = exactly_one(path, "furnace segment", "ramp, hold, step", kinds)?;
        Ok(pb::FurnaceSegment { kind: Some(kind) })
    }
}

fn exactly_one<K>(
    path: &str,
    what: &str,
    allowed: &str,
    mut kinds: Vec<(&str, K)>,
) -> Result<K, BatchError> {
    match kinds.len() {
        1 => Ok(kinds.pop().expect("one element").1),
        0 => Err(BatchError::at(
            path,
            format!("a {what} needs exactly one of: {allowed}; found none"),
        )),
        _ => {
            let found: Vec<&str> = kinds.iter().map(|(n, _)| *n).collect();
            Err(BatchError::at(
                path,
                format!(
                    "a {what} needs exactly one of: {allowed}; found {} ({})",
                    found.len(),
                    found.join(", ")
                ),
            ))
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A serde Deserializer over `serde_json::Value` that records the path of the first error.
// ---------------------------------------------------------------------------------------------

/// Error of [`PathDeserializer`]: a message and the path where it was raised.
#[derive(Debug)]
pub struct PathError {
    path: Option<String>,
    message: String,
}

impl PathError {
    /// Sets the path unless a deeper level already did.
    fn at(mut self, path: &str) -> Self {
        if self.path.is_none() {
            self.path = Some(path.to_owned());
        }
        self
    }
}

impl fmt::Display for PathError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.path {
            Some(p) if !p.is_empty() => write!(f, "{p}: {}", self.message),
            _ => f.write_str(&self.message),
        }
    }
}

impl std::error::Error for PathError {}

impl de::Error for PathError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        PathError {
            path: None,
            message: msg.to_string(),
        }
    }
}

/// Deserializes from a `Value`, attributing errors to the path of the node that raised them.
pub struct PathDeserializer<'a> {
    value: &'a Value,
    path: String,
}

impl<'a> PathDeserializer<'a> {
    pub fn root(value: &'a Value) -> Self {
        PathDeserializer {
            value,
            path: String::new(),
        }
    }
}

fn join_key(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

impl<'de, 'a> de::Deserializer<'de> for PathDeserializer<'a> {
    type Error = PathError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, PathError> {
        let path = self.path;
        let result = match self.value {
            Value::Null => visitor.visit_unit(),
            Value::Bool(b) => visitor.visit_bool(*b),
            Value::Number(n) => {
                if let Some(u) = n.as_u64() {
                    visitor.visit_u64(u)
                } else if let Some(i) = n.as_i64() {
                    visitor.visit_i64(i)
                } else {
                    visitor.visit_f64(n.as_f64().unwrap_or(f64::NAN))
                }
            }
            Value::String(s) => visitor.visit_str(s),
            Value::Array(items) => visitor.visit_seq(PathSeq {
                items: items.iter().enumerate(),
                path: &path,
            }),
            Value::Object(map) => visitor.visit_map(PathMap {
                entries: map.iter(),
                pending: None,
                path: &path,
            }),
        };
        result.map_err(|e| e.at(&path))
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, PathError> {
        match self.value {
            Value::Null => visitor.visit_none(),
            _ => visitor.visit_some(self),
        }
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        unit unit_struct newtype_struct seq tuple tuple_struct map struct enum identifier
        ignored_any
    }
}

struct PathSeq<'a, 'p, I: Iterator<Item = (usize, &'a Value)>> {
    items: I,
    path: &'p str,
}

impl<'de, 'a, 'p, I: Iterator<Item = (usize, &'a Value)>> SeqAccess<'de> for PathSeq<'a, 'p, I> {
    type Error = PathError;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, PathError> {
        match self.items.next() {
            None => Ok(None),
            Some((i, value)) => {
                let path = format!("{}[{i}]", self.path);
                seed.deserialize(PathDeserializer {
                    value,
                    path: path.clone(),
                })
                .map(Some)
                .map_err(|e| e.at(&path))
            }
        }
    }
}

struct PathMap<'a, 'p, I: Iterator<Item = (&'a String, &'a Value)>> {
    entries: I,
    pending: Option<(&'a String, &'a Value)>,
    path: &'p str,
}

impl<'de, 'a, 'p, I: Iterator<Item = (&'a String, &'a Value)>> MapAccess<'de>
    for PathMap<'a, 'p, I>
{
    type Error = PathError;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, PathError> {
        match self.entries.next() {
            None => Ok(None),
            Some((key, value)) => {
                self.pending = Some((key, value));
                let key_de: de::value::StrDeserializer<'_, PathError> =
                    key.as_str().into_deserializer();
                // An unknown key is reported at the path of the map holding it, so the message
                // reads `experiments[0].steps[1]: unknown field `furnce`, expected one of ...`.
                seed.deserialize(key_de)
                    .map(Some)
                    .map_err(|e| e.at(self.path))
            }
        }
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, PathError> {
        let (key, value) = self.pending.take().ok_or_else(|| {
            <PathError as de::Error>::custom("internal error: map value requested before its key")
        })?;
        let path = join_key(self.path, key);
        seed.deserialize(PathDeserializer {
            value,
            path: path.clone(),
        })
        .map_err(|e| e.at(&path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE_TOML: &str = include_str!("../../examples/batch.toml");
    const EXAMPLE_JSON: &str = include_str!("../../examples/batch.json");

    fn toml_err(text: &str) -> String {
        parse(text.as_bytes(), Format::Toml)
            .expect_err("should be refused")
            .to_string()
    }

    fn json_err(text: &str) -> String {
        parse(text.as_bytes(), Format::Json)
            .expect_err("should be refused")
            .to_string()
    }

    #[test]
    fn example_files_convert_to_identical_specs() {
        let from_toml = parse(EXAMPLE_TOML.as_bytes(), Format::Toml).expect("batch.toml parses");
        let from_json = parse(EXAMPLE_JSON.as_bytes(), Format::Json).expect("batch.json parses");
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
        let batch = parse(EXAMPLE_TOML.as_bytes(), Format::Toml).unwrap();
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
        let batch = parse(text.as_bytes(), Format::Toml).unwrap();
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
        assert!(err.contains(STEP_KINDS), "{err}");
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
        let batch = parse(text.as_bytes(), Format::Toml).unwrap();
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
