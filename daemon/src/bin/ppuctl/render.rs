//! Human-readable rendering of ppu.v1 messages: tables, detail views and one-line summaries.

use std::fmt::Write as _;

use ppu_proto::v1 as pb;
use prost_types::Timestamp;

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
    format!("{v}")
}

/// A measured value with at most `decimals` decimals, trailing zeros dropped.
pub fn measured(v: f64, decimals: usize) -> String {
    let s = format!("{v:.decimals$}");
    if s.contains('.') {
        let s = s.trim_end_matches('0').trim_end_matches('.');
        if s == "-0" {
            "0".to_owned()
        } else {
            s.to_owned()
        }
    } else {
        s
    }
}

/// A physical duration: `45 s`, `1 min 30 s`, `1 h`, `2 h 05 min`.
pub fn duration(secs: f64) -> String {
    if !secs.is_finite() {
        return format!("{secs} s");
    }
    if secs < 0.0 {
        return format!("-{}", duration(-secs));
    }
    if secs < 60.0 {
        return format!("{} s", measured(secs, 1));
    }
    let total = secs.round() as u64;
    let (h, m, s) = (total / 3600, (total % 3600) / 60, total % 60);
    match (h, m, s) {
        (0, m, 0) => format!("{m} min"),
        (0, m, s) => format!("{m} min {s:02} s"),
        (h, 0, 0) => format!("{h} h"),
        (h, m, 0) => format!("{h} h {m:02} min"),
        (h, m, s) => format!("{h} h {m:02} min {s:02} s"),
    }
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
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut l = String::new();
        for (i, (cell, w)) in cells.zip(&widths).enumerate() {
            if i + 1 == widths.len() {
                l.push_str(cell);
            } else {
                let pad = w.saturating_sub(cell.chars().count());
                l.push_str(cell);
                l.extend(std::iter::repeat_n(' ', pad + 2));
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(&mut headers.iter().copied());
    for row in rows {
        line(&mut row.iter().map(String::as_str));
    }
    out
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

pub fn step_kind_name(step: &pb::Step) -> &'static str {
    use pb::step::Kind;
    match &step.kind {
        Some(Kind::Dispense(_)) => "dispense",
        Some(Kind::Weigh(_)) => "weigh",
        Some(Kind::Furnace(_)) => "furnace",
        Some(Kind::Degas(_)) => "degas",
        Some(Kind::Isotherm(_)) => "isotherm",
        None => "(none)",
    }
}

pub fn segment(seg: &pb::FurnaceSegment) -> String {
    use pb::furnace_segment::Kind;
    match &seg.kind {
        Some(Kind::Ramp(r)) => {
            format!(
                "ramp to {} °C at {} °C/min",
                num(r.temperature_c),
                num(r.rate_c_per_min)
            )
        }
        Some(Kind::Hold(h)) => format!("hold {}", duration(h.duration_s)),
        Some(Kind::Step(s)) => format!("step to {} °C", num(s.temperature_c)),
        None => "(empty segment)".to_owned(),
    }
}

/// What a step does, without its device: `dispense 2.5 mL of ethanol at 1 mL/min`, or for a
/// furnace `ramp to 150 °C at 5 °C/min → hold 1 h → step to 25 °C`.
pub fn step_body(step: &pb::Step) -> String {
    use pb::step::Kind;
    match &step.kind {
        Some(Kind::Dispense(d)) => format!(
            "dispense {} mL of {} at {} mL/min",
            num(d.volume_ml),
            d.reagent,
            num(d.rate_ml_per_min)
        ),
        Some(Kind::Weigh(w)) if w.stability_timeout_s > 0.0 => {
            format!(
                "weigh (stability timeout {})",
                duration(w.stability_timeout_s)
            )
        }
        Some(Kind::Weigh(_)) => "weigh".to_owned(),
        Some(Kind::Furnace(f)) => {
            let segs: Vec<String> = f.segments.iter().map(segment).collect();
            format!("furnace: {}", segs.join(" → "))
        }
        Some(Kind::Degas(d)) => {
            format!(
                "degas at {} °C for {}",
                num(d.temperature_c),
                duration(d.duration_s)
            )
        }
        Some(Kind::Isotherm(i)) => format!(
            "{} isotherm at {} °C, {} points {} bar",
            i.adsorptive,
            num(i.temperature_c),
            i.pressure_bar.len(),
            i.pressure_bar
                .iter()
                .map(|p| num(*p))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        None => "(no step kind)".to_owned(),
    }
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
    let _ = writeln!(
        o,
        "  state:     {} (step {})",
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
        match &step.kind {
            Some(pb::step::Kind::Furnace(f)) => {
                for (k, seg) in f.segments.iter().enumerate() {
                    let _ = writeln!(o, "    {}. {}", k + 1, segment(seg));
                }
            }
            _ => {
                let _ = writeln!(o, "    {}", step_body(step));
            }
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
    match &r.result {
        Some(pb::step_result::Result::Furnace(f)) => furnace_result(o, f),
        None => {}
    }
}

fn furnace_result(o: &mut String, f: &pb::FurnaceResult) {
    for t in &f.targets {
        let _ = writeln!(
            o,
            "      segment {}: {} °C reached at {} (±{} °C)",
            t.segment_index + 1,
            num(t.temperature_c),
            duration(t.reached_at_s),
            measured(t.tolerance_c, 2),
        );
    }
    let _ = writeln!(
        o,
        "      max overshoot: {} °C",
        measured(f.max_overshoot_c, 2)
    );
    let _ = write!(o, "      trace: {} samples", f.trace.len());
    if let (Some(first), Some(last)) = (f.trace.first(), f.trace.last()) {
        let _ = write!(
            o,
            "\n        first: {}\n        last:  {}",
            sample(first),
            sample(last)
        );
    }
    o.push('\n');
}

fn sample(s: &pb::FurnaceSample) -> String {
    format!(
        "t={} pv={} °C sp={} °C out={} %",
        duration(s.t_s),
        measured(s.pv_c, 1),
        measured(s.working_sp_c, 1),
        measured(s.output_pct, 1)
    )
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
        let _ = writeln!(o, "  {id}");
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
                connection(d.connection),
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
    let _ = writeln!(o, "limits:");
    let l = d.limits.unwrap_or_default();
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

pub fn event_kind_name(e: &pb::Event) -> &'static str {
    use pb::event::Kind;
    match &e.kind {
        Some(Kind::ExperimentStateChanged(_)) => "experiment_state_changed",
        Some(Kind::StepStarted(_)) => "step_started",
        Some(Kind::StepProgress(_)) => "step_progress",
        Some(Kind::StepFinished(_)) => "step_finished",
        Some(Kind::DeviceReading(_)) => "device_reading",
        Some(Kind::DeviceConnectionChanged(_)) => "device_connection_changed",
        Some(Kind::Alarm(_)) => "alarm",
        Some(Kind::QueueStateChanged(_)) => "queue_state_changed",
        None => "unknown",
    }
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
                if let Some(pb::step_result::Result::Furnace(fr)) = &r.result {
                    let _ = write!(
                        s,
                        " (targets reached {}, max overshoot {} °C, {} samples)",
                        fr.targets.len(),
                        measured(fr.max_overshoot_c, 2),
                        fr.trace.len()
                    );
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
        None => "(event kind unknown to this ppuctl)".to_owned(),
    }
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

    #[test]
    fn table_aligns_columns() {
        let t = table(&["A", "BB"], &[vec!["xyz".into(), "1".into()]]);
        assert_eq!(t, "A    BB\nxyz  1\n");
    }
}
