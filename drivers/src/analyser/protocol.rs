//! The ppu sorption-bridge MQTT contract, as the driver speaks it: topic names and JSON
//! payloads (schema 1). docs/mqtt-contract.md is the normative description; this module is
//! one implementation of it.
//!
//! Parsing is strict about what the driver relies on (the schema number, the fields it reads,
//! finite non-negative quantities) and lenient about everything else (unknown fields are
//! ignored), so a bridge can add fields without breaking ppu. Whatever fails the strict part
//! is [`Malformed`]: logged, counted and dropped by the caller, never acted upon.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::schema::IsothermPoint;
use crate::device::Reading;
use crate::transport::mqtt::Message;

/// The payload schema this driver speaks. A payload with another number is malformed.
pub const SCHEMA: u32 = 1;

/// Topic names of one bridge: `{prefix}/{bridge_id}/...`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    base: String,
}

/// Which of a bridge's topics a message came on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopicKind {
    Status,
    Telemetry,
    CmdAck,
    Event,
    Result,
}

impl Topics {
    /// `prefix` without a trailing slash, e.g. `lab/site-a/analyser`.
    pub fn new(prefix: &str, bridge_id: &str) -> Self {
        let prefix = prefix.trim_end_matches('/');
        let base = if prefix.is_empty() {
            bridge_id.to_owned()
        } else {
            format!("{prefix}/{bridge_id}")
        };
        Self { base }
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// Bridge liveness and state; retained; the bridge's will.
    pub fn status(&self) -> String {
        format!("{}/status", self.base)
    }
    /// Live readings, QoS 0.
    pub fn telemetry(&self) -> String {
        format!("{}/telemetry", self.base)
    }
    /// Commands to the bridge.
    pub fn cmd(&self) -> String {
        format!("{}/cmd", self.base)
    }
    /// The bridge's acknowledgement of each command.
    pub fn cmd_ack(&self) -> String {
        format!("{}/cmd/ack", self.base)
    }
    /// Alarms and progress.
    pub fn event(&self) -> String {
        format!("{}/event", self.base)
    }
    /// Points and final results.
    pub fn result(&self) -> String {
        format!("{}/result", self.base)
    }
    /// ppu's end-to-end acknowledgement of a final result.
    pub fn result_ack(&self) -> String {
        format!("{}/result/ack", self.base)
    }
    /// ppu's own liveness (retained; ppu's will).
    pub fn controller(&self) -> String {
        format!("{}/controller", self.base)
    }

    /// The topics the driver subscribes to.
    pub fn subscriptions(&self) -> Vec<String> {
        vec![
            self.status(),
            self.telemetry(),
            self.cmd_ack(),
            self.event(),
            self.result(),
        ]
    }

    pub fn kind_of(&self, topic: &str) -> Option<TopicKind> {
        let rest = topic.strip_prefix(&self.base)?.strip_prefix('/')?;
        Some(match rest {
            "status" => TopicKind::Status,
            "telemetry" => TopicKind::Telemetry,
            "cmd/ack" => TopicKind::CmdAck,
            "event" => TopicKind::Event,
            "result" => TopicKind::Result,
            _ => return None,
        })
    }
}

/// Operations a bridge performs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    Degas,
    FreeSpace,
    Isotherm,
    Abort,
    Status,
}

impl Op {
    pub fn name(self) -> &'static str {
        match self {
            Op::Degas => "degas",
            Op::FreeSpace => "free_space",
            Op::Isotherm => "isotherm",
            Op::Abort => "abort",
            Op::Status => "status",
        }
    }
}

/// A command as published on `cmd`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Command {
    pub schema: u32,
    pub request_id: String,
    pub op: Op,
    /// The sample the operation concerns, as the instrument software knows it.
    pub sample_id: String,
    pub params: Value,
}

impl Command {
    pub fn new(request_id: String, op: Op, sample_id: String, params: Value) -> Self {
        Self {
            schema: SCHEMA,
            request_id,
            op,
            sample_id,
            params,
        }
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// `params` of a `degas` command (§5.1).
pub fn degas_params(temperature_c: f64, duration_s: f64) -> Value {
    serde_json::json!({ "temperature_c": temperature_c, "duration_s": duration_s })
}

/// `params` of a `free_space` command: the analysis temperature (§5.1).
pub fn free_space_params(temperature_c: f64) -> Value {
    serde_json::json!({ "temperature_c": temperature_c })
}

/// `params` of an `abort` command: the operation to abort, or whatever runs (§5.1).
pub fn abort_params(target_request_id: Option<&str>) -> Value {
    match target_request_id {
        Some(t) => serde_json::json!({ "target_request_id": t }),
        None => serde_json::json!({}),
    }
}

/// `params` of an `isotherm` command (§5.1), with the pressure tolerance of revision 1.1.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct IsothermParams {
    pub adsorptive: String,
    pub temperature_c: f64,
    pub pressures_bar: Vec<f64>,
    pub equilibration_interval_s: f64,
    pub max_equilibration_s: f64,
    pub sample_mass_g: f64,
    pub tolerance_bar: f64,
    pub tolerance_relative: f64,
}

impl IsothermParams {
    pub fn to_value(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }
}

/// Whether a point measured at `pressure_bar` is on its target (§5.1, revision 1.1):
/// `|P − target| ≤ max(tolerance_relative × target, tolerance_bar)`, with a hair of slack
/// for the decimal round trip through JSON.
pub fn within_tolerance(
    pressure_bar: f64,
    target_bar: f64,
    tolerance_bar: f64,
    tolerance_relative: f64,
) -> bool {
    let band = (tolerance_relative * target_bar).max(tolerance_bar);
    (pressure_bar - target_bar).abs() <= band * (1.0 + 1e-9)
}

/// ppu's end-to-end acknowledgement of a request's final result.
pub fn result_ack(request_id: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({"schema": SCHEMA, "request_id": request_id}))
        .unwrap_or_default()
}

/// ppu's controller status payload (`online` as birth, `offline` as will).
pub fn controller_status(state: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({"schema": SCHEMA, "state": state})).unwrap_or_default()
}

/// The bridge's coarse state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BridgeState {
    Idle,
    Busy,
    Fault,
    Offline,
}

/// A `status` payload.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Status {
    pub state: BridgeState,
    #[serde(default)]
    pub instrument: String,
    #[serde(default)]
    pub request_id: Option<String>,
    #[serde(default)]
    pub sample_id: Option<String>,
    #[serde(default)]
    pub reason: String,
}

/// A `cmd/ack` payload.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Ack {
    pub request_id: String,
    pub accepted: bool,
    #[serde(default)]
    pub duplicate: bool,
    #[serde(default)]
    pub code: String,
    #[serde(default)]
    pub reason: String,
    /// Present in the answer to a `status` command.
    #[serde(default)]
    pub status: Option<Value>,
}

/// An `event` payload.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Event {
    Alarm {
        code: String,
        #[serde(default)]
        message: String,
        #[serde(default)]
        severity: String,
        active: bool,
    },
    Progress {
        request_id: String,
        fraction: f64,
        #[serde(default)]
        message: String,
    },
}

/// The final summary of a completed operation; which fields are set depends on the op.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
pub struct Complete {
    pub request_id: String,
    pub op: String,
    /// Isotherm: the number of points the result has (indices 0..points).
    #[serde(default)]
    pub points: Option<u32>,
    #[serde(default)]
    pub adsorptive: Option<String>,
    #[serde(default)]
    pub temperature_c: Option<f64>,
    #[serde(default)]
    pub sample_mass_g: Option<f64>,
    #[serde(default)]
    pub degas_temperature_c: Option<f64>,
    #[serde(default)]
    pub degas_duration_s: Option<f64>,
    #[serde(default)]
    pub instrument: Option<String>,
    /// Degas: the time held and the vacuum reached.
    #[serde(default)]
    pub duration_s: Option<f64>,
    #[serde(default)]
    pub final_pressure_bar: Option<f64>,
    /// Free space: warm and cold free space, cm³.
    #[serde(default)]
    pub warm_free_space_cm3: Option<f64>,
    #[serde(default)]
    pub cold_free_space_cm3: Option<f64>,
}

/// A `result` payload.
#[derive(Debug, Clone, PartialEq)]
pub enum ResultMsg {
    Point {
        request_id: String,
        index: u32,
        point: IsothermPoint,
        /// The target the bridge dosed toward, if it says (optional in schema 1).
        target_pressure_bar: Option<f64>,
    },
    Complete(Complete),
    Failed {
        request_id: String,
        op: String,
        code: String,
        reason: String,
    },
}

impl ResultMsg {
    pub fn request_id(&self) -> &str {
        match self {
            ResultMsg::Point { request_id, .. } | ResultMsg::Failed { request_id, .. } => {
                request_id
            }
            ResultMsg::Complete(c) => &c.request_id,
        }
    }
}

#[derive(Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum RawResult {
    Point {
        request_id: String,
        index: u32,
        pressure_bar: f64,
        #[serde(default)]
        p0_bar: f64,
        amount_mmol_per_g: f64,
        equilibration_time_s: f64,
        #[serde(default)]
        target_pressure_bar: Option<f64>,
    },
    Complete(Complete),
    Failed {
        request_id: String,
        op: String,
        #[serde(default)]
        code: String,
        reason: String,
    },
}

#[derive(Deserialize)]
struct RawTelemetry {
    readings: BTreeMap<String, f64>,
}

/// A payload received from the bridge.
#[derive(Debug, Clone, PartialEq)]
pub enum Inbound {
    Status(Status),
    Telemetry(Vec<Reading>),
    Ack(Ack),
    Event(Event),
    Result(ResultMsg),
}

/// Why a payload was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed payload on {topic}: {reason}")]
pub struct Malformed {
    pub topic: String,
    pub reason: String,
}

/// Parses a message from one of the bridge's topics; `Ok(None)` for a topic that is not one
/// of the bridge's outbound topics.
pub fn parse(topics: &Topics, message: &Message) -> Result<Option<Inbound>, Malformed> {
    let Some(kind) = topics.kind_of(&message.topic) else {
        return Ok(None);
    };
    let bad = |reason: String| Malformed {
        topic: message.topic.clone(),
        reason,
    };
    let value: Value =
        serde_json::from_slice(&message.payload).map_err(|e| bad(format!("not JSON: {e}")))?;
    parse_value(kind, &message.topic, value).map(Some)
}

/// The `status` object of a bridge's acknowledgement of a `status` command (§5.1), parsed
/// exactly as a retained `status` payload (§4.1); `None` when the acknowledgement carries none.
/// The object may leave out `schema`, which the acknowledgement around it already declared.
pub fn ack_status(topics: &Topics, ack: &Ack) -> Option<Result<Status, Malformed>> {
    let mut value = ack.status.clone()?;
    if let Value::Object(object) = &mut value {
        object
            .entry("schema")
            .or_insert_with(|| Value::from(SCHEMA));
    }
    let topic = format!(
        "{} (status in the acknowledgement of {})",
        topics.cmd_ack(),
        ack.request_id
    );
    Some(
        parse_value(TopicKind::Status, &topic, value).and_then(|inbound| match inbound {
            Inbound::Status(s) => Ok(s),
            _ => Err(Malformed {
                topic,
                reason: "not a status object".to_owned(),
            }),
        }),
    )
}

/// Checks a decoded payload received on a topic of `kind` (named `topic` in errors).
fn parse_value(kind: TopicKind, topic: &str, value: Value) -> Result<Inbound, Malformed> {
    let bad = |reason: String| Malformed {
        topic: topic.to_owned(),
        reason,
    };
    let Some(object) = value.as_object() else {
        return Err(bad("not a JSON object".to_owned()));
    };
    match object.get("schema") {
        Some(Value::Number(n)) if n.as_u64() == Some(u64::from(SCHEMA)) => {}
        Some(other) => {
            return Err(bad(format!(
                "schema {other} is not the supported schema {SCHEMA}"
            )));
        }
        None => return Err(bad("no schema field".to_owned())),
    }
    let inbound = match kind {
        TopicKind::Status => Inbound::Status(from_value(value, &bad)?),
        TopicKind::Telemetry => {
            let raw: RawTelemetry = from_value(value, &bad)?;
            let mut readings = Vec::with_capacity(raw.readings.len());
            for (name, v) in raw.readings {
                if name.is_empty() || name.len() > 64 {
                    return Err(bad(format!("reading name {name:?} is empty or too long")));
                }
                finite(&format!("readings.{name}"), v, &bad)?;
                readings.push(Reading::new(name, v));
            }
            Inbound::Telemetry(readings)
        }
        TopicKind::CmdAck => {
            let ack: Ack = from_value(value, &bad)?;
            if ack.request_id.is_empty() {
                return Err(bad("empty request_id".to_owned()));
            }
            Inbound::Ack(ack)
        }
        TopicKind::Event => {
            let event: Event = from_value(value, &bad)?;
            if let Event::Progress { fraction, .. } = &event {
                finite("fraction", *fraction, &bad)?;
            }
            Inbound::Event(event)
        }
        TopicKind::Result => Inbound::Result(match from_value::<RawResult>(value, &bad)? {
            RawResult::Point {
                request_id,
                index,
                pressure_bar,
                p0_bar,
                amount_mmol_per_g,
                equilibration_time_s,
                target_pressure_bar,
            } => {
                non_negative("pressure_bar", pressure_bar, &bad)?;
                if let Some(t) = target_pressure_bar {
                    non_negative("target_pressure_bar", t, &bad)?;
                }
                non_negative("p0_bar", p0_bar, &bad)?;
                finite("amount_mmol_per_g", amount_mmol_per_g, &bad)?;
                non_negative("equilibration_time_s", equilibration_time_s, &bad)?;
                ResultMsg::Point {
                    request_id,
                    index,
                    point: IsothermPoint {
                        pressure_bar,
                        p0_bar,
                        amount_mmol_per_g,
                        equilibration_time_s,
                    },
                    target_pressure_bar,
                }
            }
            RawResult::Complete(c) => {
                for (name, v) in [
                    ("temperature_c", c.temperature_c),
                    ("sample_mass_g", c.sample_mass_g),
                    ("degas_temperature_c", c.degas_temperature_c),
                    ("degas_duration_s", c.degas_duration_s),
                    ("duration_s", c.duration_s),
                    ("final_pressure_bar", c.final_pressure_bar),
                    ("warm_free_space_cm3", c.warm_free_space_cm3),
                    ("cold_free_space_cm3", c.cold_free_space_cm3),
                ] {
                    if let Some(v) = v {
                        finite(name, v, &bad)?;
                    }
                }
                ResultMsg::Complete(c)
            }
            RawResult::Failed {
                request_id,
                op,
                code,
                reason,
            } => ResultMsg::Failed {
                request_id,
                op,
                code,
                reason,
            },
        }),
    };
    Ok(inbound)
}

fn from_value<T: serde::de::DeserializeOwned>(
    value: Value,
    bad: &dyn Fn(String) -> Malformed,
) -> Result<T, Malformed> {
    serde_json::from_value(value).map_err(|e| bad(e.to_string()))
}

fn finite(name: &str, v: f64, bad: &dyn Fn(String) -> Malformed) -> Result<(), Malformed> {
    if v.is_finite() {
        Ok(())
    } else {
        Err(bad(format!("{name} is not a finite number")))
    }
}

fn non_negative(name: &str, v: f64, bad: &dyn Fn(String) -> Malformed) -> Result<(), Malformed> {
    finite(name, v, bad)?;
    if v >= 0.0 {
        Ok(())
    } else {
        Err(bad(format!("{name} {v} is negative")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(topic: &str, payload: &str) -> Message {
        Message {
            topic: topic.to_owned(),
            payload: payload.as_bytes().to_vec(),
            retain: false,
        }
    }

    #[test]
    fn topics_are_classified() {
        let t = Topics::new("lab/a/analyser/", "asap-1");
        assert_eq!(t.cmd(), "lab/a/analyser/asap-1/cmd");
        assert_eq!(
            t.kind_of("lab/a/analyser/asap-1/cmd/ack"),
            Some(TopicKind::CmdAck)
        );
        assert_eq!(t.kind_of("lab/a/analyser/asap-1/cmd"), None);
        assert_eq!(t.kind_of("lab/a/analyser/asap-10/status"), None);
    }

    #[test]
    fn valid_payloads_parse_and_unknown_fields_are_ignored() {
        let t = Topics::new("p", "b");
        let point = r#"{"schema":1,"kind":"point","request_id":"r1","index":2,
            "pressure_bar":0.15,"p0_bar":64.4,"amount_mmol_per_g":2.8,
            "equilibration_time_s":120,"target_pressure_bar":0.15,"extra":[1,2]}"#;
        let Ok(Some(Inbound::Result(ResultMsg::Point { index, point, .. }))) =
            parse(&t, &msg("p/b/result", point))
        else {
            panic!("point did not parse");
        };
        assert_eq!(index, 2);
        assert_eq!(point.amount_mmol_per_g, 2.8);
        let status = r#"{"schema":1,"state":"busy","instrument":"sim"}"#;
        assert!(matches!(
            parse(&t, &msg("p/b/status", status)),
            Ok(Some(Inbound::Status(Status {
                state: BridgeState::Busy,
                ..
            })))
        ));
        assert_eq!(parse(&t, &msg("elsewhere", "garbage")), Ok(None));
    }

    #[test]
    fn malformed_payloads_say_why() {
        let t = Topics::new("p", "b");
        for (topic, payload, why) in [
            ("p/b/telemetry", "not json", "not JSON"),
            ("p/b/telemetry", "[1]", "not a JSON object"),
            ("p/b/status", r#"{"state":"idle"}"#, "no schema"),
            ("p/b/status", r#"{"schema":2,"state":"idle"}"#, "schema 2"),
            (
                "p/b/status",
                r#"{"schema":1,"state":"dancing"}"#,
                "unknown variant",
            ),
            (
                "p/b/result",
                r#"{"schema":1,"kind":"point","request_id":"r","index":0,"pressure_bar":-1,"amount_mmol_per_g":1,"equilibration_time_s":1}"#,
                "negative",
            ),
            (
                "p/b/cmd/ack",
                r#"{"schema":1,"request_id":"","accepted":true}"#,
                "empty request_id",
            ),
        ] {
            let e = parse(&t, &msg(topic, payload)).unwrap_err();
            assert!(e.reason.contains(why), "{payload}: {e}");
        }
    }

    #[test]
    fn the_status_in_a_status_acknowledgement_parses_as_a_retained_status() {
        let t = Topics::new("p", "b");
        let ack = |status: &str| {
            let payload =
                format!(r#"{{"schema":1,"request_id":"r1","accepted":true,"status":{status}}}"#);
            match parse(&t, &msg("p/b/cmd/ack", &payload)) {
                Ok(Some(Inbound::Ack(ack))) => ack,
                other => panic!("{payload}: {other:?}"),
            }
        };
        let s = ack_status(
            &t,
            &ack(r#"{"schema":1,"state":"busy","instrument":"sim"}"#),
        )
        .expect("has a status")
        .expect("valid");
        assert_eq!((s.state, s.instrument.as_str()), (BridgeState::Busy, "sim"));
        // The acknowledgement already declared the schema.
        let s = ack_status(&t, &ack(r#"{"state":"idle"}"#)).expect("has a status");
        assert_eq!(s.map(|s| s.state), Ok(BridgeState::Idle));
        for (status, why) in [
            (r#"{"schema":2,"state":"idle"}"#, "schema 2"),
            (r#"{"schema":1,"state":"dancing"}"#, "unknown variant"),
            ("[1]", "not a JSON object"),
        ] {
            let e = ack_status(&t, &ack(status))
                .expect("has a status")
                .unwrap_err();
            assert!(e.reason.contains(why), "{status}: {e}");
            assert!(e.topic.contains("acknowledgement of r1"), "{e}");
        }
        let without = parse(
            &t,
            &msg(
                "p/b/cmd/ack",
                r#"{"schema":1,"request_id":"r2","accepted":true}"#,
            ),
        );
        let Ok(Some(Inbound::Ack(without))) = without else {
            panic!("{without:?}")
        };
        assert_eq!(ack_status(&t, &without), None);
    }
}
