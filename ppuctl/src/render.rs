//! Human-readable rendering of ppu.v1 messages: tables, detail views and one-line summaries.

use std::fmt::Write as _;

use ppu_proto::v1 as pb;
use ppu_schema::render as generic;
use prost_types::Timestamp;

use crate::families;

// ---------------------------------------------------------------------------------------------
// Enums.
// ---------------------------------------------------------------------------------------------

/// Short name of an enum value (`EXPERIMENT_STATE_RUNNING` → `RUNNING`), or `UNKNOWN(n)` for a
/// value this client does not know.
fn short<E>(value: i32, prefix: &str, name: impl Fn(&E) -> &'static str) -> String
where
    E: TryFrom<i32>,
{
    match E::try_from(value) {
        Ok(e) => {
            let n = name(&e);
            n.strip_prefix(prefix).unwrap_or(n).to_owned()
        }
        Err(_) => format!("UNKNOWN({value})"),
    }
}

pub fn experiment_state(v: i32) -> String {
    short(v, "EXPERIMENT_STATE_", pb::ExperimentState::as_str_name)
}

pub fn step_outcome(v: i32) -> String {
    short(v, "STEP_OUTCOME_", pb::StepOutcome::as_str_name)
}

pub fn queue_state(v: i32) -> String {
    short(v, "QUEUE_STATE_", pb::QueueState::as_str_name)
}

pub fn device_family(v: i32) -> String {
    short(v, "DEVICE_FAMILY_", pb::DeviceFamily::as_str_name).to_ascii_lowercase()
}

pub fn capability(v: i32) -> String {
    short(v, "CAPABILITY_", pb::Capability::as_str_name).to_ascii_lowercase()
}

pub fn connection(v: i32) -> String {
    short(v, "CONNECTION_STATE_", pb::ConnectionState::as_str_name).to_ascii_lowercase()
}

pub fn alarm_severity(v: i32) -> String {
    short(v, "ALARM_SEVERITY_", pb::AlarmSeverity::as_str_name)
}

// ---------------------------------------------------------------------------------------------
// Scalars.
// ---------------------------------------------------------------------------------------------

/// RFC 3339 UTC with milliseconds, e.g. `2026-05-01T12:00:00.123Z`; `-` if unset.
pub fn time(ts: Option<&Timestamp>) -> String {
    let Some(ts) = ts else { return "-".to_owned() };
    let mut t = *ts;
    t.normalize();
    t.nanos -= t.nanos % 1_000_000;
    let s = t.to_string();
    // Display omits the fraction when it is zero; keep the width constant.
    match s.strip_suffix('Z') {
        Some(head) if !head.contains('.') => format!("{head}.000Z"),
        _ => s,
    }
}

/// Seconds between two timestamps, if both are set.
pub fn seconds_between(a: Option<&Timestamp>, b: Option<&Timestamp>) -> Option<f64> {
    let (a, b) = (a?, b?);
    Some((b.seconds - a.seconds) as f64 + f64::from(b.nanos - a.nanos) / 1e9)
}

/// A number as typed: `150`, `2.5`, `0.05` (shortest round-trip form).
pub fn num(v: f64) -> String {
    generic::num(v)
}

/// A measured value with at most `decimals` decimals, trailing zeros dropped.
pub fn measured(v: f64, decimals: usize) -> String {
    generic::measured(v, decimals)
}

/// A physical duration: `45 s`, `1 min 30 s`, `1 h`, `2 h 05 min`.
pub fn duration(secs: f64) -> String {
    generic::duration(secs)
}

/// `key=value, key=value`, sorted by key.
pub fn labels<'a>(labels: impl IntoIterator<Item = (&'a String, &'a String)>) -> String {
    let mut pairs: Vec<_> = labels.into_iter().collect();
    pairs.sort();
    pairs
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Renders rows as a left-aligned table with a header, columns separated by two spaces.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    generic::table(headers, rows)
}

fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_owned()
    } else {
        let mut t: String = s.chars().take(max.saturating_sub(1)).collect();
        t.push('…');
        t
    }
}

fn or_dash(s: &str) -> &str {
    if s.is_empty() { "-" } else { s }
}

// ---------------------------------------------------------------------------------------------
// Steps.
// ---------------------------------------------------------------------------------------------

/// A step's kind: its command's step name from the schema (`furnace`, `gas_flow`), else the
/// name of the `Step` member set (`transfer`).
pub fn step_kind_name(step: &pb::Step) -> String {
    match families::step_command(step) {
        Some((c, _)) => c.name().to_owned(),
        None => families::oneof_member("ppu.v1.Step", step, "kind")
            .unwrap_or_else(|| "(none)".to_owned()),
    }
}

/// What a step does, without its device, as its command's schema says it reads (`dispense
/// 2.5 mL of ethanol at 1 mL/min`); a command that declares no summary reads as its step name
/// and fields. Transfers are the daemon's own.
pub fn step_body(step: &pb::Step) -> String {
    use pb::step::Kind;
    match &step.kind {
        Some(Kind::Transfer(t)) => format!(
            "transfer sample {} from {} to {}",
            or_dash(&t.sample_id),
            if t.from_device_id.is_empty() {
                "(no location)"
            } else {
                &t.from_device_id
            },
            or_dash(&t.to_device_id)
        ),
        None => "(no step kind)".to_owned(),
        Some(kind) => match families::step_command(step) {
            Some((c, m)) => named_summary(c, &m),
            None => match kind {
                Kind::Command(any) => {
                    format!("command {} (not in the daemon's schema)", any.type_url)
                }
                _ => format!("{} (not in the daemon's schema)", step_kind_name(step)),
            },
        },
    }
}

/// A command's or result's summary as its schema declares it; one that declares none reads as
/// its command's step name and its fields (`gas_flow: gas=CO2 …`).
fn named_summary(c: &ppu_schema::Command, m: &ppu_schema::prost_reflect::DynamicMessage) -> String {
    let schema = families::get();
    let text = generic::summary(schema, m);
    if generic::has_summary(schema, m) {
        text
    } else {
        format!("{}: {text}", c.name())
    }
}

/// The lines `show` prints for a step: its command's `detail` where it declares one (a
/// program's segments, numbered), else its one-line body.
fn step_lines(step: &pb::Step) -> Vec<String> {
    families::step_command(step)
        .and_then(|(_, m)| generic::detail(families::get(), &m))
        .unwrap_or_else(|| vec![step_body(step)])
}

fn device_pin(step: &pb::Step) -> String {
    if step.device_id.is_empty() {
        "any device".to_owned()
    } else {
        step.device_id.clone()
    }
}

// ---------------------------------------------------------------------------------------------
// Experiments.
// ---------------------------------------------------------------------------------------------

/// `n/m`: the step running (or where the experiment stopped), 1-based, out of the step count.
pub fn step_progress(e: &pb::Experiment) -> String {
    let total = e.spec.as_ref().map_or(0, |s| s.steps.len());
    let state = pb::ExperimentState::try_from(e.state).ok();
    let n = match state {
        Some(pb::ExperimentState::Succeeded) => total,
        Some(pb::ExperimentState::Running | pb::ExperimentState::Interrupted) => {
            e.current_step as usize + 1
        }
        _ if !e.results.is_empty() => e.current_step as usize + 1,
        _ => 0,
    };
    format!("{}/{}", n.min(total), total)
}

pub fn experiment_table(experiments: &[pb::Experiment]) -> String {
    let rows: Vec<Vec<String>> = experiments
        .iter()
        .map(|e| {
            let spec = e.spec.clone().unwrap_or_default();
            vec![
                e.id.clone(),
                experiment_state(e.state),
                spec.priority.to_string(),
                step_progress(e),
                truncate(&spec.name, 40),
                or_dash(&spec.sample_id).to_owned(),
            ]
        })
        .collect();
    table(&["ID", "STATE", "PRI", "STEP", "NAME", "SAMPLE"], &rows)
}

pub fn experiment_detail(e: &pb::Experiment) -> String {
    let spec = e.spec.clone().unwrap_or_default();
    let mut o = String::new();
    let _ = writeln!(o, "experiment {}", e.id);
    let _ = writeln!(o, "  name:      {}", spec.name);
    let _ = writeln!(o, "  sample:    {}", or_dash(&spec.sample_id));
    let _ = writeln!(o, "  batch:     {}", or_dash(&e.batch_id));
    let held = if e.held { ", held" } else { "" };
    let _ = writeln!(
        o,
        "  state:     {}{held} (step {})",
        experiment_state(e.state),
        step_progress(e)
    );
    if !e.message.is_empty() {
        let _ = writeln!(o, "  message:   {}", e.message);
    }
    let _ = writeln!(o, "  priority:  {}", spec.priority);
    if !spec.labels.is_empty() {
        let _ = writeln!(o, "  labels:    {}", labels(&spec.labels));
    }
    let _ = writeln!(o, "  created:   {}", time(e.created_at.as_ref()));
    let _ = writeln!(o, "  updated:   {}", time(e.updated_at.as_ref()));

    let running = e.state == pb::ExperimentState::Running as i32;
    let total = spec.steps.len();
    for (i, step) in spec.steps.iter().enumerate() {
        let marker = if running && i == e.current_step as usize {
            "   ← running"
        } else {
            ""
        };
        let _ = writeln!(
            o,
            "step {}/{}: {} on {}{marker}",
            i + 1,
            total,
            step_kind_name(step),
            device_pin(step)
        );
        for line in step_lines(step) {
            let _ = writeln!(o, "    {line}");
        }
        for r in e.results.iter().filter(|r| r.step_index as usize == i) {
            step_result(&mut o, r);
        }
    }
    // Results whose index is out of range (should not happen) are still shown.
    for r in e.results.iter().filter(|r| r.step_index as usize >= total) {
        let _ = writeln!(o, "result for step index {}:", r.step_index);
        step_result(&mut o, r);
    }
    o
}

fn step_result(o: &mut String, r: &pb::StepResult) {
    let took = seconds_between(r.started_at.as_ref(), r.finished_at.as_ref())
        .map(|s| format!(", took {}", duration(s)))
        .unwrap_or_default();
    let _ = writeln!(
        o,
        "    result: {} on {} ({} → {}{took})",
        step_outcome(r.outcome),
        or_dash(&r.device_id),
        time(r.started_at.as_ref()),
        time(r.finished_at.as_ref()),
    );
    if !r.message.is_empty() {
        let _ = writeln!(o, "      message: {}", r.message);
    }
    use pb::step_result::Result as R;
    match (&r.result, families::step_output(r)) {
        (None, _) => {}
        (Some(R::Transfer(_)), _) | (Some(_), None) => {
            if let Some(result) = &r.result {
                let _ = writeln!(o, "      {}", result_summary(result));
            }
        }
        (Some(_), Some((c, m))) => {
            let schema = families::get();
            if let Some(lines) = generic::detail(schema, &m) {
                for line in lines {
                    let _ = writeln!(o, "      {line}");
                }
            } else if generic::has_summary(schema, &m) {
                let _ = writeln!(o, "      {}", generic::summary(schema, &m));
            } else {
                // Nothing declared: its fields inline, then every field with its unit.
                let _ = writeln!(o, "      {}: {}", c.name(), generic::summary(schema, &m));
                for (path, value) in generic::rows(schema, &m) {
                    let _ = writeln!(o, "        {path}: {value}");
                }
            }
        }
    }
}

/// Relative deviation as a signed percentage with a real minus sign: `−0.05 %`, `+1.20 %`
/// (results declare it as the `pct` format; kept for the tests that pin the rule).
#[cfg(test)]
pub fn deviation_pct(fraction: f64) -> String {
    generic::signed_pct(fraction)
}

/// A one-line summary of a step result (used in `show` and for `step_finished`), as its
/// result message's schema says it reads.
pub fn result_summary(r: &pb::step_result::Result) -> String {
    use pb::step_result::Result as R;
    if let R::Transfer(t) = r {
        return format!("transfer confirmed by {}", or_dash(&t.confirmed_by));
    }
    let holder = pb::StepResult {
        result: Some(r.clone()),
        ..Default::default()
    };
    match families::step_output(&holder) {
        Some((c, m)) => named_summary(c, &m),
        None => match r {
            R::Output(any) => format!("result {} (not in the daemon's schema)", any.type_url),
            _ => "result (not in the daemon's schema)".to_owned(),
        },
    }
}

// ---------------------------------------------------------------------------------------------
// Queue and devices.
// ---------------------------------------------------------------------------------------------

pub fn queue(q: &pb::Queue) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "queue: {}", queue_state(q.state));
    let _ = writeln!(o, "running ({}):", q.running_ids.len());
    for id in &q.running_ids {
        let _ = writeln!(o, "  {id}");
    }
    let _ = writeln!(o, "queued ({}), in start order:", q.queued_ids.len());
    for id in &q.queued_ids {
        if q.held_ids.contains(id) {
            let _ = writeln!(o, "  {id}  (held)");
        } else {
            let _ = writeln!(o, "  {id}");
        }
    }
    o
}

/// `pv_c=150.2 working_sp_c=150 …`, plus active alarms.
pub fn reading_values(r: &pb::DeviceReading, max: usize) -> String {
    let mut parts: Vec<String> = r
        .values
        .iter()
        .take(max)
        .map(|v| format!("{}={}", v.name, measured(v.value, 3)))
        .collect();
    if r.values.len() > max {
        parts.push(format!("(+{} more)", r.values.len() - max));
    }
    if !r.alarms.is_empty() {
        parts.push(format!("ALARMS: {}", r.alarms.join(", ")));
    }
    parts.join(" ")
}

pub fn device_table(devices: &[pb::Device]) -> String {
    let rows: Vec<Vec<String>> = devices
        .iter()
        .map(|d| {
            vec![
                d.id.clone(),
                device_family(d.family),
                d.driver.clone(),
                {
                    let mut c = connection(d.connection);
                    if d.maintenance {
                        c.push_str(" (maintenance)");
                    }
                    if d.r#unsafe {
                        c.push_str(" UNSAFE");
                    }
                    c
                },
                d.capabilities
                    .iter()
                    .map(|c| capability(*c))
                    .collect::<Vec<_>>()
                    .join(","),
                d.latest
                    .as_ref()
                    .map_or_else(|| "-".to_owned(), |r| reading_values(r, 4)),
            ]
        })
        .collect();
    table(
        &[
            "ID",
            "FAMILY",
            "DRIVER",
            "CONNECTION",
            "CAPABILITIES",
            "READINGS",
        ],
        &rows,
    )
}

pub fn device_detail(d: &pb::Device) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "device {}", d.id);
    let _ = writeln!(o, "  family:       {}", device_family(d.family));
    let _ = writeln!(o, "  driver:       {}", d.driver);
    let _ = writeln!(o, "  transport:    {}", or_dash(&d.transport));
    let _ = write!(o, "  connection:   {}", connection(d.connection));
    if !d.connection_error.is_empty() {
        let _ = write!(o, " ({})", d.connection_error);
    }
    o.push('\n');
    let caps: Vec<String> = d.capabilities.iter().map(|c| capability(*c)).collect();
    let _ = writeln!(o, "  capabilities: {}", or_dash(&caps.join(", ")));
    if d.maintenance {
        let _ = write!(o, "  maintenance:  yes");
        if !d.maintenance_reason.is_empty() {
            let _ = write!(o, " ({})", d.maintenance_reason);
        }
        o.push('\n');
    } else {
        let _ = writeln!(o, "  maintenance:  no");
    }
    if d.r#unsafe {
        let _ = writeln!(
            o,
            "  safe state:   UNSAFE, not confirmed ({}); retried on every reconnect",
            or_dash(&d.unsafe_reason)
        );
    } else {
        let _ = writeln!(o, "  safe state:   ok");
    }
    let _ = writeln!(o, "  holds sample: {}", or_dash(&d.holds_sample_id));
    let _ = writeln!(o, "limits:");
    let l = d.limits.clone().unwrap_or_default();
    let limits = [
        ("max temperature", l.max_temperature_c, "°C"),
        ("min temperature", l.min_temperature_c, "°C"),
        ("max ramp rate", l.max_rate_c_per_min, "°C/min"),
        ("max hold", l.max_hold_s, "s"),
        ("max volume", l.max_volume_ml, "mL"),
        ("max flow rate", l.max_rate_ml_per_min, "mL/min"),
        ("max pressure", l.max_pressure_bar, "bar"),
    ];
    let mut any = false;
    for (name, value, unit) in limits {
        if let Some(v) = value {
            any = true;
            let extra = if unit == "s" {
                format!(" ({})", duration(v))
            } else {
                String::new()
            };
            let _ = writeln!(o, "  {name:<16} {} {unit}{extra}", num(v));
        }
    }
    for (parameter, values) in &l.accepted {
        any = true;
        let name = format!("{parameter}s");
        let _ = writeln!(o, "  {name:<16} {}", values.values.join(", "));
    }
    if !any {
        let _ = writeln!(o, "  (none declared)");
    }
    match &d.latest {
        None => {
            let _ = writeln!(o, "latest reading: none yet");
        }
        Some(r) => {
            let _ = writeln!(o, "latest reading at {}:", time(r.time.as_ref()));
            let width = r
                .values
                .iter()
                .map(|v| v.name.chars().count())
                .max()
                .unwrap_or(0);
            for v in &r.values {
                let _ = writeln!(o, "  {:<width$}  {}", v.name, measured(v.value, 3));
            }
            if !r.alarms.is_empty() {
                let _ = writeln!(o, "  alarms: {}", r.alarms.join(", "));
            }
        }
    }
    o
}

/// One line per live reading for `device ID --watch`.
pub fn reading_line(r: &pb::DeviceReading) -> String {
    format!(
        "{} {} {}",
        time(r.time.as_ref()),
        r.device_id,
        reading_values(r, usize::MAX)
    )
}

// ---------------------------------------------------------------------------------------------
// Events.
// ---------------------------------------------------------------------------------------------

/// An event's kind: the name of the `Event` member set (`step_started`).
pub fn event_kind_name(e: &pb::Event) -> String {
    families::oneof_member("ppu.v1.Event", e, "kind").unwrap_or_else(|| "unknown".to_owned())
}

/// A readable summary of an event's payload.
pub fn event_summary(e: &pb::Event) -> String {
    use pb::event::Kind;
    match &e.kind {
        Some(Kind::ExperimentStateChanged(c)) => {
            let mut s = if c.from == pb::ExperimentState::Unspecified as i32 {
                format!("accepted as {}", experiment_state(c.to))
            } else {
                format!("{} → {}", experiment_state(c.from), experiment_state(c.to))
            };
            if !c.reason.is_empty() {
                let _ = write!(s, ": {}", c.reason);
            }
            s
        }
        Some(Kind::StepStarted(s)) => match &s.step {
            Some(step) => format!("step {} started: {}", s.step_index + 1, step_body(step)),
            None => format!("step {} started", s.step_index + 1),
        },
        Some(Kind::StepProgress(p)) => {
            let mut s = format!("step {} {:.0}%", p.step_index + 1, p.fraction * 100.0);
            if !p.message.is_empty() {
                let _ = write!(s, " {}", p.message);
            }
            if p.remaining_s >= 0.0 {
                let _ = write!(s, " (~{} left)", duration(p.remaining_s));
            }
            s
        }
        Some(Kind::StepFinished(f)) => match &f.result {
            None => "step finished".to_owned(),
            Some(r) => {
                let mut s = format!("step {} {}", r.step_index + 1, step_outcome(r.outcome));
                if !r.message.is_empty() {
                    let _ = write!(s, ": {}", r.message);
                }
                if let Some(result) = &r.result {
                    let _ = write!(s, " ({})", result_summary(result));
                }
                s
            }
        },
        Some(Kind::DeviceReading(r)) => reading_values(r, usize::MAX),
        Some(Kind::DeviceConnectionChanged(c)) => {
            let mut s = connection(c.state);
            if !c.reason.is_empty() {
                let _ = write!(s, ": {}", c.reason);
            }
            s
        }
        Some(Kind::Alarm(a)) => {
            let what = if a.cleared { "cleared" } else { "raised" };
            let mut s = format!("{} {} {what}", alarm_severity(a.severity), a.code);
            if !a.message.is_empty() {
                let _ = write!(s, ": {}", a.message);
            }
            s
        }
        Some(Kind::QueueStateChanged(q)) => {
            let mut s = if q.paused {
                "paused".to_owned()
            } else {
                "resumed".to_owned()
            };
            if !q.reason.is_empty() {
                let _ = write!(s, ": {}", q.reason);
            }
            s
        }
        Some(Kind::StepIntermediate(m)) => {
            let mut s = format!("step {} response {}", m.step_index + 1, m.index + 1);
            if let Some(v) = m.value.as_ref().and_then(families::decode_any) {
                let _ = write!(s, ": {}", generic::summary(families::get(), &v));
            }
            s
        }
        Some(Kind::DeviceReserved(r)) => format!("reserved for step {}", r.step_index + 1),
        Some(Kind::DeviceReleased(r)) => format!("released after step {}", r.step_index + 1),
        Some(Kind::TransferRequested(t)) => match &t.transfer {
            Some(t) => format!("transfer {} requested: {}", t.id, transfer_move(t)),
            None => "transfer requested".to_owned(),
        },
        Some(Kind::TransferConfirmed(c)) => {
            let mut s = match &c.transfer {
                Some(t) => format!("transfer {} confirmed: {}", t.id, transfer_move(t)),
                None => "transfer confirmed".to_owned(),
            };
            if !c.confirmed_by.is_empty() {
                let _ = write!(s, " (by {})", c.confirmed_by);
            }
            s
        }
        Some(Kind::RecoveryDecision(r)) => {
            let mut s = format!("recovery of step {}: {}", r.step_index + 1, r.action);
            if !r.detail.is_empty() {
                let _ = write!(s, ": {}", r.detail);
            }
            s
        }
        Some(Kind::MaintenanceChanged(m)) => {
            let mut s = if m.maintenance {
                "entered maintenance".to_owned()
            } else {
                "left maintenance".to_owned()
            };
            if !m.reason.is_empty() {
                let _ = write!(s, ": {}", m.reason);
            }
            s
        }
        Some(Kind::AlarmAcknowledged(a)) => {
            let mut s = format!("alarm {} acknowledged", a.code);
            if !a.acknowledged_by.is_empty() {
                let _ = write!(s, " by {}", a.acknowledged_by);
            }
            s
        }
        Some(Kind::ExperimentHeld(h)) => {
            let mut s = if h.held {
                "held".to_owned()
            } else {
                "released".to_owned()
            };
            if !h.reason.is_empty() {
                let _ = write!(s, ": {}", h.reason);
            }
            s
        }
        Some(Kind::ExperimentMoved(m)) => format!(
            "moved to position {} in the start order (0 = next), priority now {}",
            m.position, m.priority
        ),
        Some(Kind::Audit(a)) => {
            let mut s = format!(
                "{} ({}, {}) called {}",
                a.principal, a.role, a.transport, a.method
            );
            if !a.target.is_empty() {
                let _ = write!(s, " on {}", a.target);
            }
            let _ = write!(s, ": {}", a.code);
            if !a.message.is_empty() {
                let _ = write!(s, " ({})", a.message);
            }
            let _ = write!(s, " [request {}]", a.request_id);
            s
        }
        // The typed v1 alias of a family's intermediate response (a command's
        // `v1_intermediate_event`), or a kind this ppuctl does not know.
        Some(_) => {
            v1_intermediate(e).unwrap_or_else(|| "(event kind unknown to this ppuctl)".to_owned())
        }
        None => "(event kind unknown to this ppuctl)".to_owned(),
    }
}

/// An event that is the typed v1 alias of a command's intermediate response, read through the
/// schema: its wrapper (`step_index`, an item index, the response message) from ppu.v1's
/// descriptor, the response as the family's intermediate message, e.g.
/// `step 3 point 1: 0.05 bar (P/P0 0.0494) → 4.5679 mmol/g, equilibrated in 1 min 30 s`.
fn v1_intermediate(e: &pb::Event) -> Option<String> {
    use ppu_schema::prost_reflect::{DynamicMessage, Kind as FieldKind, Value};
    let schema = families::get();
    let bytes = prost::Message::encode_to_vec(e);
    let (command, field) = ppu_schema::wire::len_fields(&bytes)?
        .into_iter()
        .find_map(|f| {
            let c = schema
                .commands()
                .iter()
                .find(|c| f.number != 0 && c.options.v1_intermediate_event == f.number)?;
            Some((c, f))
        })?;
    let event = schema.pool().get_message_by_name("ppu.v1.Event")?;
    let FieldKind::Message(wrapper) = event.get_field(field.number)?.kind() else {
        return None;
    };
    let wrapper = DynamicMessage::decode(wrapper, field.payload).ok()?;
    let index = |f: &ppu_schema::prost_reflect::FieldDescriptor| match &*wrapper.get_field(f) {
        Value::U32(n) => Some(u64::from(*n) + 1),
        Value::U64(n) => Some(n + 1),
        _ => None,
    };
    let desc = ppu_schema::prost_reflect::ReflectMessage::descriptor(&wrapper);
    let step = desc
        .get_field_by_name("step_index")
        .and_then(|f| index(&f))?;
    let item = desc
        .fields()
        .find(|f| matches!(f.kind(), FieldKind::Message(_)))?;
    let number = desc
        .fields()
        .find(|f| f.name() != "step_index" && index(f).is_some())
        .and_then(|f| index(&f))
        .unwrap_or(1);
    let mut s = format!("step {step} {} {number}", item.name());
    if wrapper.has_field(&item)
        && let Value::Message(m) = &*wrapper.get_field(&item)
        && let Some(intermediate) = &command.intermediate
        && let Ok(m) = schema.decode(intermediate.full_name(), &prost::Message::encode_to_vec(m))
    {
        let _ = write!(s, ": {}", generic::summary(schema, &m));
    }
    Some(s)
}

pub fn transfer_table(transfers: &[pb::PendingTransfer]) -> String {
    let rows: Vec<Vec<String>> = transfers
        .iter()
        .map(|t| {
            vec![
                t.id.clone(),
                or_dash(&t.sample_id).to_owned(),
                or_dash(&t.from_device_id).to_owned(),
                or_dash(&t.to_device_id).to_owned(),
                t.experiment_id.clone(),
                (t.step_index + 1).to_string(),
                time(t.requested_at.as_ref()),
            ]
        })
        .collect();
    table(
        &[
            "ID",
            "SAMPLE",
            "FROM",
            "TO",
            "EXPERIMENT",
            "STEP",
            "REQUESTED",
        ],
        &rows,
    )
}

/// `active`, `cleared`, plus `, acknowledged by alice`.
fn alarm_status(a: &pb::ActiveAlarm) -> String {
    let mut s = if a.cleared { "cleared" } else { "active" }.to_owned();
    if a.acknowledged {
        s.push_str(", acknowledged");
        if !a.acknowledged_by.is_empty() {
            let _ = write!(s, " by {}", a.acknowledged_by);
        }
    } else {
        s.push_str(", unacknowledged");
    }
    s
}

pub fn alarm_table(alarms: &[pb::ActiveAlarm]) -> String {
    let rows: Vec<Vec<String>> = alarms
        .iter()
        .map(|a| {
            vec![
                a.device_id.clone(),
                a.code.clone(),
                alarm_severity(a.severity),
                alarm_status(a),
                time(a.raised_at.as_ref()),
                a.message.clone(),
            ]
        })
        .collect();
    table(
        &["DEVICE", "CODE", "SEVERITY", "STATUS", "RAISED", "MESSAGE"],
        &rows,
    )
}

/// One alarm on one line, e.g. the reply to `alarm ack`.
pub fn alarm_line(a: &pb::ActiveAlarm) -> String {
    let mut s = format!(
        "{} {} {} ({})",
        a.device_id,
        alarm_severity(a.severity),
        a.code,
        alarm_status(a)
    );
    if !a.message.is_empty() {
        let _ = write!(s, ": {}", a.message);
    }
    s
}

/// `sample S1: furnace-1 → analyser-1 (step 3)`.
pub fn transfer_move(t: &pb::PendingTransfer) -> String {
    format!(
        "sample {}: {} → {} (step {})",
        or_dash(&t.sample_id),
        if t.from_device_id.is_empty() {
            "(no location)"
        } else {
            &t.from_device_id
        },
        or_dash(&t.to_device_id),
        t.step_index + 1
    )
}

/// `seq time kind [experiment=… batch=… device=…] summary`.
pub fn event_line(e: &pb::Event) -> String {
    let mut ids = Vec::new();
    if !e.experiment_id.is_empty() {
        ids.push(format!("experiment={}", e.experiment_id));
    }
    if !e.batch_id.is_empty() {
        ids.push(format!("batch={}", e.batch_id));
    }
    if !e.device_id.is_empty() {
        ids.push(format!("device={}", e.device_id));
    }
    let mut line = format!(
        "{:>6} {} {:<25}",
        e.sequence,
        time(e.time.as_ref()),
        event_kind_name(e)
    );
    for id in ids {
        line.push(' ');
        line.push_str(&id);
    }
    line.push_str("  ");
    line.push_str(&event_summary(e));
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_shows_the_values_it_accepts() {
        let d = pb::Device {
            id: "analyser-1".into(),
            limits: Some(pb::DeviceLimits {
                max_pressure_bar: Some(1.1),
                accepted: [(
                    "adsorptive".to_owned(),
                    pb::AcceptedValues {
                        values: vec!["CO2".into(), "N2".into()],
                    },
                )]
                .into_iter()
                .collect(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let text = device_detail(&d);
        assert!(text.contains("  max pressure     1.1 bar\n"), "{text}");
        assert!(text.contains("  adsorptives      CO2, N2\n"), "{text}");
        let json = crate::json::device(&d);
        assert_eq!(
            json["limits"]["accepted"]["adsorptive"],
            serde_json::json!(["CO2", "N2"])
        );
    }

    #[test]
    fn durations_read_naturally() {
        assert_eq!(duration(45.0), "45 s");
        assert_eq!(duration(12.34), "12.3 s");
        assert_eq!(duration(90.0), "1 min 30 s");
        assert_eq!(duration(1800.0), "30 min");
        assert_eq!(duration(3600.0), "1 h");
        assert_eq!(duration(5400.0), "1 h 30 min");
        assert_eq!(duration(3725.0), "1 h 02 min 05 s");
    }

    #[test]
    fn numbers_and_times() {
        assert_eq!(num(150.0), "150");
        assert_eq!(num(2.5), "2.5");
        assert_eq!(measured(149.96, 1), "150");
        assert_eq!(measured(-0.01, 1), "0");
        assert_eq!(measured(1.25, 3), "1.25");
        let ts = Timestamp {
            seconds: 1_767_225_600,
            nanos: 123_456_789,
        };
        assert_eq!(time(Some(&ts)), "2026-01-01T00:00:00.123Z");
        let ts = Timestamp {
            seconds: 1_767_225_600,
            nanos: 0,
        };
        assert_eq!(time(Some(&ts)), "2026-01-01T00:00:00.000Z");
        assert_eq!(time(None), "-");
    }

    #[test]
    fn enum_names_are_short() {
        assert_eq!(
            experiment_state(pb::ExperimentState::Running as i32),
            "RUNNING"
        );
        assert_eq!(experiment_state(99), "UNKNOWN(99)");
        assert_eq!(
            capability(pb::Capability::FurnaceProgram as i32),
            "furnace_program"
        );
    }

    #[test]
    fn furnace_step_reads_as_a_program() {
        let step = pb::Step {
            device_id: String::new(),
            kind: Some(pb::step::Kind::Furnace(pb::FurnaceProgram {
                segments: vec![
                    pb::FurnaceSegment {
                        kind: Some(pb::furnace_segment::Kind::Ramp(pb::Ramp {
                            temperature_c: 150.0,
                            rate_c_per_min: 5.0,
                        })),
                    },
                    pb::FurnaceSegment {
                        kind: Some(pb::furnace_segment::Kind::Hold(pb::Hold {
                            duration_s: 3600.0,
                        })),
                    },
                ],
            })),
        };
        assert_eq!(
            step_body(&step),
            "furnace: ramp to 150 °C at 5 °C/min → hold 1 h"
        );
    }

    #[test]
    fn event_lines_are_readable() {
        let base = pb::Event {
            sequence: 42,
            time: Some(Timestamp {
                seconds: 1_767_225_600,
                nanos: 5_000_000,
            }),
            experiment_id: "E1".into(),
            batch_id: "B1".into(),
            device_id: "furnace-1".into(),
            kind: None,
        };
        let with = |kind| pb::Event {
            kind: Some(kind),
            ..base.clone()
        };
        use pb::event::Kind;
        let line = event_line(&with(Kind::ExperimentStateChanged(
            pb::ExperimentStateChanged {
                from: pb::ExperimentState::Running as i32,
                to: pb::ExperimentState::Failed as i32,
                reason: "sensor break".into(),
            },
        )));
        assert_eq!(
            line,
            "    42 2026-01-01T00:00:00.005Z experiment_state_changed  experiment=E1 batch=B1 \
             device=furnace-1  RUNNING → FAILED: sensor break"
        );
        let line = event_line(&with(Kind::StepProgress(pb::StepProgress {
            step_index: 0,
            fraction: 0.456,
            message: "segment 2/3: hold 3600 s at 450 °C".into(),
            remaining_s: 1500.0,
        })));
        assert!(line.ends_with("step 1 46% segment 2/3: hold 3600 s at 450 °C (~25 min left)"));
        let line = event_line(&with(Kind::Alarm(pb::Alarm {
            code: "sensor_break".into(),
            message: "thermocouple open".into(),
            severity: pb::AlarmSeverity::Critical as i32,
            cleared: false,
        })));
        assert!(
            line.ends_with("CRITICAL sensor_break raised: thermocouple open"),
            "{line}"
        );
        let line = event_line(&with(Kind::DeviceReading(pb::DeviceReading {
            device_id: "furnace-1".into(),
            time: None,
            values: vec![pb::Reading {
                name: "pv_c".into(),
                value: 149.96,
            }],
            alarms: vec![],
        })));
        assert!(line.ends_with("  pv_c=149.96"), "{line}");
    }

    fn result(step_index: u32, result: pb::step_result::Result) -> pb::StepResult {
        pb::StepResult {
            step_index,
            device_id: "dev-1".into(),
            outcome: pb::StepOutcome::Succeeded as i32,
            message: String::new(),
            started_at: Some(Timestamp {
                seconds: 1_767_225_600,
                nanos: 0,
            }),
            finished_at: Some(Timestamp {
                seconds: 1_767_225_690,
                nanos: 0,
            }),
            result: Some(result),
        }
    }

    /// The lines `show` prints for one result, below its `result:` header line.
    fn detail_of(r: &pb::StepResult) -> String {
        let mut o = String::new();
        step_result(&mut o, r);
        let (header, rest) = o.split_once('\n').unwrap();
        assert_eq!(
            header,
            "    result: SUCCEEDED on dev-1 (2026-01-01T00:00:00.000Z → \
             2026-01-01T00:01:30.000Z, took 1 min 30 s)"
        );
        rest.to_owned()
    }

    fn dispense_result(measured_mass_g: Option<f64>) -> pb::DispenseResult {
        let expected_mass_g = 1.973;
        pb::DispenseResult {
            reagent: "A".into(),
            requested_volume_ml: 2.5,
            pump_volume_ml: 2.498,
            measured_mass_g,
            expected_mass_g,
            relative_deviation: measured_mass_g.map(|m| (m - expected_mass_g) / expected_mass_g),
            remaining_ml: 7.5,
        }
    }

    #[test]
    fn dispense_result_shows_pump_and_balance() {
        use pb::step_result::Result as R;
        let r = result(0, R::Dispense(dispense_result(Some(1.972))));
        assert_eq!(
            detail_of(&r),
            "      dispensed 2.500 mL of A: pump 2.498 mL, balance 1.972 g (expected 1.973 g, \
             −0.05 %); 7.500 mL left in the syringe\n"
        );
        let r = result(0, R::Dispense(dispense_result(None)));
        assert_eq!(
            detail_of(&r),
            "      dispensed 2.500 mL of A: pump 2.498 mL (no balance); 7.500 mL left in the \
             syringe\n"
        );
        assert_eq!(deviation_pct(0.0123), "+1.23 %");
        assert_eq!(deviation_pct(-0.00001), "0.00 %");
    }

    #[test]
    fn weigh_degas_refill_and_transfer_results_read_as_one_line() {
        use pb::step_result::Result as R;
        let cases = [
            (
                R::Weigh(pb::WeighResult {
                    mass_g: 0.12345,
                    stable: true,
                }),
                "weighed 0.1235 g (stable)",
            ),
            (
                R::Weigh(pb::WeighResult {
                    mass_g: 1.5,
                    stable: false,
                }),
                "weighed 1.5000 g (NOT stable)",
            ),
            (
                R::Degas(pb::DegasResult {
                    temperature_c: 150.0,
                    duration_s: 7200.0,
                    final_pressure_bar: 0.00002,
                }),
                "degassed at 150 °C for 2 h, final pressure 2.0e-5 bar",
            ),
            (
                R::Refill(pb::RefillResult {
                    reagent: "ethanol".into(),
                    volume_ml: 7.5,
                    fill_ml: 10.0,
                }),
                "refilled 7.500 mL of ethanol; syringe now holds 10.000 mL",
            ),
            (
                R::Transfer(pb::TransferResult {
                    confirmed_by: "robot-2".into(),
                }),
                "transfer confirmed by robot-2",
            ),
        ];
        for (r, expected) in cases {
            assert_eq!(result_summary(&r), expected);
            assert_eq!(detail_of(&result(0, r)), format!("      {expected}\n"));
        }
    }

    fn isotherm_result() -> pb::IsothermResult {
        let point =
            |pressure_bar, p0_bar, amount_mmol_per_g, equilibration_time_s| pb::IsothermPoint {
                pressure_bar,
                p0_bar,
                amount_mmol_per_g,
                equilibration_time_s,
            };
        pb::IsothermResult {
            adsorptive: "N2".into(),
            temperature_c: -196.15,
            sample_mass_g: 0.1234,
            degas_temperature_c: 150.0,
            degas_duration_s: 7200.0,
            points: vec![
                point(0.05, 1.013, 4.56789, 90.0),
                point(0.5, 1.013, 8.9, 600.0),
            ],
            instrument: "sorption-bridge 1.2 (sim)".into(),
        }
    }

    #[test]
    fn isotherm_result_is_a_table_of_points() {
        use pb::step_result::Result as R;
        let r = result(2, R::Isotherm(isotherm_result()));
        assert_eq!(
            detail_of(&r),
            "      N2 isotherm at -196.15 °C, sample 0.1234 g, degassed at 150 °C for 2 h\n\
             \x20     instrument: sorption-bridge 1.2 (sim)\n\
             \x20     #  P (bar)  P/P0    UPTAKE (mmol/g)  EQUILIBRATED IN\n\
             \x20     1  0.05     0.0494  4.5679           1 min 30 s\n\
             \x20     2  0.5      0.4936  8.9000           10 min\n"
        );
        // Supercritical adsorptive: no P/P0.
        let mut co2 = isotherm_result();
        co2.adsorptive = "CO2".into();
        co2.temperature_c = 25.0;
        co2.degas_duration_s = 0.0;
        co2.instrument.clear();
        co2.points.truncate(1);
        co2.points[0].p0_bar = 0.0;
        assert_eq!(
            detail_of(&result(0, R::Isotherm(co2.clone()))),
            "      CO2 isotherm at 25 °C, sample 0.1234 g\n\
             \x20     #  P (bar)  P/P0  UPTAKE (mmol/g)  EQUILIBRATED IN\n\
             \x20     1  0.05     -     4.5679           1 min 30 s\n"
        );
        assert_eq!(
            result_summary(&R::Isotherm(co2)),
            "CO2 isotherm at 25 °C: 1 point, 4.568 mmol/g at 0.05 bar"
        );
    }

    #[test]
    fn new_step_kinds_read_naturally() {
        let step = |kind| pb::Step {
            device_id: String::new(),
            kind: Some(kind),
        };
        use pb::step::Kind;
        let cases = [
            (
                Kind::Refill(pb::Refill {
                    reagent: "ethanol".into(),
                    volume_ml: 5.0,
                    rate_ml_per_min: 2.0,
                }),
                "refill",
                "refill 5 mL of ethanol at 2 mL/min",
            ),
            (
                Kind::Refill(pb::Refill {
                    reagent: "water".into(),
                    volume_ml: 0.0,
                    rate_ml_per_min: 0.0,
                }),
                "refill",
                "refill the water syringe to full at the pump's default rate",
            ),
            (
                Kind::Transfer(pb::Transfer {
                    sample_id: "S-1".into(),
                    from_device_id: "balance-1".into(),
                    to_device_id: "furnace-1".into(),
                }),
                "transfer",
                "transfer sample S-1 from balance-1 to furnace-1",
            ),
            (
                Kind::Transfer(pb::Transfer {
                    sample_id: "S-1".into(),
                    from_device_id: String::new(),
                    to_device_id: "balance-1".into(),
                }),
                "transfer",
                "transfer sample S-1 from (no location) to balance-1",
            ),
            (
                Kind::Isotherm(pb::Isotherm {
                    adsorptive: "CO2".into(),
                    temperature_c: 25.0,
                    pressure_bar: vec![0.1, 1.0],
                    equilibration_interval_s: 15.0,
                    max_equilibration_s: 1800.0,
                    sample_mass_g: 0.12,
                }),
                "isotherm",
                "CO2 isotherm at 25 °C, 2 points 0.1, 1 bar, sample 0.12 g, equilibration \
                 interval 15 s, at most 30 min per point",
            ),
        ];
        for (kind, name, body) in cases {
            let s = step(kind);
            assert_eq!(step_kind_name(&s), name);
            assert_eq!(step_body(&s), body);
        }
    }

    #[test]
    fn new_event_kinds_have_one_line_summaries() {
        use pb::event::Kind;
        let transfer = pb::PendingTransfer {
            id: "T1".into(),
            experiment_id: "E1".into(),
            step_index: 1,
            sample_id: "S-1".into(),
            from_device_id: "balance-1".into(),
            to_device_id: "furnace-1".into(),
            requested_at: None,
        };
        let cases = [
            (
                Kind::IsothermPointMeasured(pb::IsothermPointMeasured {
                    step_index: 2,
                    point_index: 0,
                    point: Some(isotherm_result().points[0]),
                }),
                "isotherm_point_measured",
                "step 3 point 1: 0.05 bar (P/P0 0.0494) → 4.5679 mmol/g, equilibrated in \
                 1 min 30 s",
            ),
            (
                Kind::DeviceReserved(pb::DeviceReserved { step_index: 0 }),
                "device_reserved",
                "reserved for step 1",
            ),
            (
                Kind::DeviceReleased(pb::DeviceReleased { step_index: 0 }),
                "device_released",
                "released after step 1",
            ),
            (
                Kind::TransferRequested(pb::TransferRequested {
                    transfer: Some(transfer.clone()),
                }),
                "transfer_requested",
                "transfer T1 requested: sample S-1: balance-1 → furnace-1 (step 2)",
            ),
            (
                Kind::TransferConfirmed(pb::TransferConfirmed {
                    transfer: Some(transfer),
                    confirmed_by: "alice".into(),
                }),
                "transfer_confirmed",
                "transfer T1 confirmed: sample S-1: balance-1 → furnace-1 (step 2) (by alice)",
            ),
            (
                Kind::RecoveryDecision(pb::RecoveryDecision {
                    action: "furnace_adopted".into(),
                    step_index: 0,
                    detail: "pv 448.9 °C within 5 °C of the program".into(),
                }),
                "recovery_decision",
                "recovery of step 1: furnace_adopted: pv 448.9 °C within 5 °C of the program",
            ),
            (
                Kind::MaintenanceChanged(pb::MaintenanceChanged {
                    maintenance: true,
                    reason: "thermocouple replacement".into(),
                }),
                "maintenance_changed",
                "entered maintenance: thermocouple replacement",
            ),
            (
                Kind::MaintenanceChanged(pb::MaintenanceChanged {
                    maintenance: false,
                    reason: String::new(),
                }),
                "maintenance_changed",
                "left maintenance",
            ),
            (
                Kind::AlarmAcknowledged(pb::AlarmAcknowledged {
                    code: "sensor_break".into(),
                    acknowledged_by: "alice".into(),
                }),
                "alarm_acknowledged",
                "alarm sensor_break acknowledged by alice",
            ),
            (
                Kind::ExperimentHeld(pb::ExperimentHeld {
                    held: true,
                    reason: "precursor late".into(),
                }),
                "experiment_held",
                "held: precursor late",
            ),
            (
                Kind::ExperimentHeld(pb::ExperimentHeld {
                    held: false,
                    reason: String::new(),
                }),
                "experiment_held",
                "released",
            ),
            (
                Kind::ExperimentMoved(pb::ExperimentMoved {
                    position: 0,
                    priority: 11,
                }),
                "experiment_moved",
                "moved to position 0 in the start order (0 = next), priority now 11",
            ),
            (
                Kind::StepFinished(pb::StepFinished {
                    result: Some(result(
                        1,
                        pb::step_result::Result::Dispense(dispense_result(Some(1.972))),
                    )),
                }),
                "step_finished",
                "step 2 SUCCEEDED (dispensed 2.500 mL of A: pump 2.498 mL, balance 1.972 g \
                 (expected 1.973 g, −0.05 %); 7.500 mL left in the syringe)",
            ),
        ];
        for (kind, name, summary) in cases {
            let e = pb::Event {
                sequence: 1,
                time: None,
                experiment_id: String::new(),
                batch_id: String::new(),
                device_id: String::new(),
                kind: Some(kind),
            };
            assert_eq!(event_kind_name(&e), name);
            assert_eq!(event_summary(&e), summary);
        }
    }

    #[test]
    fn queue_marks_held_experiments() {
        let q = pb::Queue {
            state: pb::QueueState::Running as i32,
            running_ids: vec![],
            queued_ids: vec!["E1".into(), "E2".into()],
            held_ids: vec!["E2".into()],
        };
        assert_eq!(
            queue(&q),
            "queue: RUNNING\nrunning (0):\nqueued (2), in start order:\n  E1\n  E2  (held)\n"
        );
    }

    #[test]
    fn table_aligns_columns() {
        let t = table(&["A", "BB"], &[vec!["xyz".into(), "1".into()]]);
        assert_eq!(t, "A    BB\nxyz  1\n");
    }

    #[test]
    fn an_unsafe_device_says_so_in_the_list_and_the_detail() {
        let mut d = pb::Device {
            id: "furnace-1".into(),
            connection: pb::ConnectionState::Connected as i32,
            ..Default::default()
        };
        assert!(device_detail(&d).contains("  safe state:   ok\n"));
        assert!(!device_table(std::slice::from_ref(&d)).contains("UNSAFE"));
        d.r#unsafe = true;
        d.unsafe_reason = "safe state pending: target setpoint reads 150 °C".into();
        assert!(device_table(std::slice::from_ref(&d)).contains("connected UNSAFE"));
        assert!(
            device_detail(&d).contains(
                "  safe state:   UNSAFE, not confirmed (safe state pending: target setpoint reads 150 °C)"
            ),
            "{}",
            device_detail(&d)
        );
    }
}
