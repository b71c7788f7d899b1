//! `ppuctl export`: a step's result as CSV or JSON, whatever its family, or as AIF (the
//! Adsorption Information File, CIF syntax, readable by pyGAPS and other adsorption software)
//! where the result carries an adsorption isotherm.
//!
//! The result is read through the daemon's family schema: CSV has one row per item of the
//! result's table (its repeated message field: an isotherm's points, a furnace's trace, a flow
//! trace), JSON has the result's fields with the step's metadata. AIF is a format for one
//! adsorption isotherm; it exports any result with the fields the format needs (see [`Aif`]),
//! whichever family declares it. AIF units: temperature K, pressure bar (absolute), amount
//! mmol/g, mass g, degas time h. One AIF data block holds one isotherm, so an experiment with
//! several is exported one step at a time (`--step`).

use std::fmt::Write as _;
use std::path::PathBuf;

use crate::InputError;
use crate::conn::Channel;
use crate::families;
use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use ppu_proto::v1 as pb;
use ppu_proto::v1::experiment_service_client::ExperimentServiceClient;
use ppu_schema::prost_reflect::{DynamicMessage, ReflectMessage, Value as PValue};
use serde_json::{Value, json};

/// The AIF dictionary version written (the one pyGAPS' parser implements).
const AIF_VERSION: &str = "d546195";
const KELVIN: f64 = 273.15;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ExportFormat {
    /// Adsorption Information File (CIF syntax), for a result holding an adsorption isotherm.
    Aif,
    /// One row per item of the result's table (e.g. per isotherm point, per trace sample).
    Csv,
    /// The result with its metadata.
    Json,
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// Experiment id.
    pub id: String,
    /// Output format.
    #[arg(long, value_enum, default_value = "aif")]
    pub format: ExportFormat,
    /// Write to FILE instead of stdout.
    #[arg(long, short, value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Index of the step whose result to export when the experiment has several (default: the
    /// last one the format can export, e.g. the last isotherm measured for AIF).
    #[arg(long, value_name = "INDEX")]
    pub step: Option<u32>,
}

/// One step result of an experiment, decoded as its family's result message.
pub struct Output<'a> {
    pub experiment: &'a pb::Experiment,
    pub step_index: u32,
    /// The step name of the command it answers (`isotherm`, `gas_flow`).
    pub command: &'static str,
    pub result: DynamicMessage,
}

impl Output<'_> {
    fn f64(&self, name: &str) -> f64 {
        field_f64(&self.result, name)
    }

    fn text(&self, name: &str) -> String {
        self.result
            .get_field_by_name(name)
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default()
    }

    /// The result's table: its first repeated message field, as (name, rows).
    fn table(&self) -> Option<(String, Vec<DynamicMessage>)> {
        self.result.descriptor().fields().find_map(|f| {
            if !f.is_list() || f.kind().as_message().is_none() {
                return None;
            }
            let v = self.result.get_field(&f);
            let rows = v
                .as_list()?
                .iter()
                .filter_map(|i| i.as_message().cloned())
                .collect::<Vec<_>>();
            Some((f.name().to_owned(), rows))
        })
    }

    fn exports_as(&self, format: ExportFormat) -> bool {
        match format {
            ExportFormat::Aif => Aif::of(self).is_some(),
            ExportFormat::Csv | ExportFormat::Json => self.table().is_some(),
        }
    }
}

fn field_f64(m: &DynamicMessage, name: &str) -> f64 {
    m.get_field_by_name(name)
        .and_then(|v| match &*v {
            PValue::F64(x) => Some(*x),
            PValue::F32(x) => Some(f64::from(*x)),
            _ => None,
        })
        .unwrap_or(0.0)
}

/// The family results of an experiment, in step order.
pub fn outputs(e: &pb::Experiment) -> Vec<Output<'_>> {
    e.results
        .iter()
        .filter_map(|r| {
            let (command, result) = families::step_output(r)?;
            Some(Output {
                experiment: e,
                step_index: r.step_index,
                command: command.name(),
                result,
            })
        })
        .collect()
}

pub async fn run(ch: Channel, args: ExportArgs) -> Result<()> {
    let mut client = ExperimentServiceClient::new(ch);
    let e = crate::call(client.get_experiment(pb::GetExperimentRequest {
        id: args.id.clone(),
    }))
    .await?;
    let what = match args.format {
        ExportFormat::Aif => "isotherm result (AIF)",
        ExportFormat::Csv | ExportFormat::Json => "result with a table of values",
    };
    let all = outputs(&e);
    let chosen = match args.step {
        Some(k) => all
            .into_iter()
            .find(|o| o.step_index == k && o.exports_as(args.format))
            .ok_or_else(|| InputError(format!("experiment {}: step {k} has no {what}", e.id)))?,
        None => all
            .into_iter()
            .filter(|o| o.exports_as(args.format))
            .last()
            .ok_or_else(|| {
                InputError(format!(
                    "experiment {} has no {what} yet (state {})",
                    e.id,
                    crate::render::experiment_state(e.state)
                ))
            })?,
    };
    let text = match args.format {
        ExportFormat::Aif => to_aif(&chosen),
        ExportFormat::Csv => to_csv(&chosen),
        ExportFormat::Json => serde_json::to_string_pretty(&to_json(&chosen))? + "\n",
    };
    match &args.output {
        Some(path) => {
            std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
        }
        None => crate::out(&text),
    }
}

/// A CIF value: bare when safe, else quoted, else a text field.
fn cif_value(s: &str) -> String {
    let special = s.is_empty()
        || s.chars().any(char::is_whitespace)
        || s.starts_with(['_', '#', '$', '\'', '"', '[', ']', ';'])
        || ["data_", "loop_", "save_", "global_", "stop_"]
            .iter()
            .any(|k| s.to_ascii_lowercase().starts_with(k));
    if !special {
        s.to_owned()
    } else if !s.contains('\'') && !s.contains('\n') {
        format!("'{s}'")
    } else if !s.contains('"') && !s.contains('\n') {
        format!("\"{s}\"")
    } else {
        format!("\n;\n{}\n;", s.replace("\n;", "\n ;"))
    }
}

/// A CIF block name: letters, digits, `-` and `_` only.
fn block_name(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Shortest round-tripping decimal form.
fn num(v: f64) -> String {
    if v.is_finite() {
        format!("{v}")
    } else {
        "?".to_owned()
    }
}

fn material_id(i: &Output<'_>) -> String {
    let sample = i
        .experiment
        .spec
        .as_ref()
        .map(|s| s.sample_id.clone())
        .unwrap_or_default();
    if sample.is_empty() {
        i.experiment.id.clone()
    } else {
        sample
    }
}

fn operator(i: &Output<'_>) -> String {
    i.experiment
        .spec
        .as_ref()
        .and_then(|s| s.labels.get("operator").cloned())
        .filter(|o| !o.is_empty())
        .unwrap_or_else(|| "ppu".to_owned())
}

fn measured_at(i: &Output<'_>) -> String {
    let finished = i
        .experiment
        .results
        .iter()
        .find(|r| r.step_index == i.step_index)
        .and_then(|r| r.finished_at.as_ref());
    crate::render::time(finished.or(i.experiment.updated_at.as_ref()))
}

/// What AIF needs of a result, by field name: an adsorptive, a temperature (°C) and a table
/// of points with an absolute pressure (bar), a saturation pressure and an amount adsorbed
/// (mmol/g); sample mass, instrument and the preceding degas are written when present.
struct Aif {
    points: Vec<DynamicMessage>,
}

impl Aif {
    const POINT_FIELDS: [&str; 3] = ["pressure_bar", "p0_bar", "amount_mmol_per_g"];

    fn of(o: &Output<'_>) -> Option<Aif> {
        let d = o.result.descriptor();
        d.get_field_by_name("adsorptive")?;
        d.get_field_by_name("temperature_c")?;
        let (_, points) = o.table()?;
        let point = d
            .fields()
            .find(|f| f.is_list() && f.kind().as_message().is_some())?
            .kind();
        let point = point.as_message()?;
        if Self::POINT_FIELDS
            .iter()
            .any(|n| point.get_field_by_name(n).is_none())
        {
            return None;
        }
        Some(Aif { points })
    }
}

/// The result as an AIF data block (empty if it holds no isotherm; [`Output::exports_as`]
/// says beforehand).
pub fn to_aif(i: &Output<'_>) -> String {
    let Some(aif) = Aif::of(i) else {
        return String::new();
    };
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# Exported by ppuctl from experiment {} step {}",
        i.experiment.id, i.step_index
    );
    let _ = writeln!(
        s,
        "data_{}",
        block_name(&format!("ppu_{}_step{}", i.experiment.id, i.step_index))
    );
    let _ = writeln!(s);
    let pairs: [(&str, String); 16] = [
        ("_audit_aif_version", AIF_VERSION.to_owned()),
        ("_audit_creation_method", cif_value("ppuctl export")),
        ("_exptl_operator", cif_value(&operator(i))),
        (
            "_exptl_date",
            match measured_at(i).as_str() {
                "-" => "?".to_owned(),
                t => cif_value(t),
            },
        ),
        ("_exptl_adsorptive", cif_value(&i.text("adsorptive"))),
        ("_exptl_temperature", num(i.f64("temperature_c") + KELVIN)),
        ("_exptl_method", cif_value("volumetric")),
        ("_exptl_instrument", cif_value(&i.text("instrument"))),
        ("_adsnt_material_id", cif_value(&material_id(i))),
        ("_adsnt_sample_mass", num(i.f64("sample_mass_g"))),
        (
            "_adsnt_degas_temperature",
            num(i.f64("degas_temperature_c") + KELVIN),
        ),
        ("_adsnt_degas_time", num(i.f64("degas_duration_s") / 3600.0)),
        ("_units_temperature", "K".to_owned()),
        ("_units_pressure", "bar".to_owned()),
        ("_units_mass", "g".to_owned()),
        ("_units_loading", cif_value("mmol/g")),
    ];
    let width = pairs.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    for (k, v) in pairs {
        let _ = writeln!(s, "{k:<width$} {v}");
    }
    let _ = writeln!(s);
    let _ = writeln!(s, "loop_\n_adsorp_pressure\n_adsorp_p0\n_adsorp_amount");
    for p in &aif.points {
        let [pressure, p0, amount] = Aif::POINT_FIELDS.map(|n| num(field_f64(p, n)));
        let _ = writeln!(s, "{pressure} {p0} {amount}");
    }
    s
}

/// The result's table as CSV: a header (`point` then the row message's field names), then one
/// row per item, numbers in their shortest round-tripping form.
pub fn to_csv(i: &Output<'_>) -> String {
    let Some((_, rows)) = i.table() else {
        return String::new();
    };
    let Some(first) = rows.first() else {
        return String::new();
    };
    let fields: Vec<_> = first.descriptor().fields().collect();
    let mut s = String::from("point");
    for f in &fields {
        s.push(',');
        s.push_str(f.name());
    }
    s.push('\n');
    for (k, row) in rows.iter().enumerate() {
        let _ = write!(s, "{k}");
        for f in &fields {
            let cell = match &*row.get_field(f) {
                PValue::F64(x) => num(*x),
                PValue::F32(x) => num(f64::from(*x)),
                PValue::String(t) => csv_text(t),
                PValue::Bool(b) => b.to_string(),
                PValue::I32(n) | PValue::EnumNumber(n) => n.to_string(),
                PValue::I64(n) => n.to_string(),
                PValue::U32(n) => n.to_string(),
                PValue::U64(n) => n.to_string(),
                // A nested message or list has no one-cell form.
                _ => String::new(),
            };
            let _ = write!(s, ",{cell}");
        }
        s.push('\n');
    }
    s
}

/// A CSV cell: quoted when it holds a separator, quote or line break.
fn csv_text(t: &str) -> String {
    if t.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", t.replace('"', "\"\""))
    } else {
        t.to_owned()
    }
}

/// The result with its metadata as JSON: the step's identity, then the result's own fields.
pub fn to_json(i: &Output<'_>) -> Value {
    let mut v = json!({
        "experiment_id": i.experiment.id,
        "step_index": i.step_index,
        "command": i.command,
        "sample_id": material_id(i),
        "measured_at": measured_at(i),
    });
    if let (Value::Object(o), Value::Object(fields)) =
        (&mut v, crate::json::dynamic(families::get(), &i.result))
    {
        o.extend(fields);
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn experiment() -> pb::Experiment {
        pb::Experiment {
            id: "01EXP".into(),
            spec: Some(pb::ExperimentSpec {
                sample_id: "S 1".into(),
                ..Default::default()
            }),
            results: vec![pb::StepResult {
                step_index: 2,
                result: Some(pb::step_result::Result::Isotherm(pb::IsothermResult {
                    adsorptive: "CO2".into(),
                    temperature_c: 25.0,
                    sample_mass_g: 0.1,
                    degas_temperature_c: 300.0,
                    degas_duration_s: 7200.0,
                    points: vec![
                        pb::IsothermPoint {
                            pressure_bar: 0.15,
                            p0_bar: 64.4,
                            amount_mmol_per_g: 2.8,
                            equilibration_time_s: 300.0,
                        },
                        pb::IsothermPoint {
                            pressure_bar: 1.0,
                            p0_bar: 64.4,
                            amount_mmol_per_g: 3.8,
                            equilibration_time_s: 200.0,
                        },
                    ],
                    instrument: "sim 'x'".into(),
                })),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn aif_has_the_required_items_and_the_points() {
        let e = experiment();
        let all = outputs(&e);
        let aif = to_aif(&all[0]);
        assert!(aif.contains("data_ppu_01EXP_step2\n"), "{aif}");
        assert!(
            aif.contains("_exptl_temperature") && aif.contains("298.15"),
            "{aif}"
        );
        let item = |key: &str| {
            aif.lines()
                .find_map(|l| l.strip_prefix(key).map(|v| v.trim().to_owned()))
                .unwrap_or_default()
        };
        assert_eq!(item("_adsnt_material_id"), "'S 1'");
        assert_eq!(item("_exptl_instrument"), "\"sim 'x'\"");
        assert_eq!(item("_adsnt_degas_time"), "2");
        assert_eq!(item("_exptl_date"), "?");
        assert!(
            aif.ends_with(
                "loop_\n_adsorp_pressure\n_adsorp_p0\n_adsorp_amount\n0.15 64.4 2.8\n1 64.4 3.8\n"
            ),
            "{aif}"
        );
        let csv = to_csv(&all[0]);
        assert_eq!(csv.lines().count(), 3);
        assert_eq!(to_json(&all[0])["points"][1]["amount_mmol_per_g"], 3.8);
    }

    /// CSV and JSON come from the result's descriptor: the isotherm's table and keys are the
    /// ones the hand-written export wrote.
    #[test]
    fn csv_and_json_are_read_from_the_result_message() {
        let e = experiment();
        let all = outputs(&e);
        assert_eq!(all[0].command, "isotherm");
        assert_eq!(
            to_csv(&all[0]),
            "point,pressure_bar,p0_bar,amount_mmol_per_g,equilibration_time_s\n\
             0,0.15,64.4,2.8,300\n1,1,64.4,3.8,200\n"
        );
        let j = to_json(&all[0]);
        for key in [
            "experiment_id",
            "step_index",
            "sample_id",
            "measured_at",
            "adsorptive",
            "temperature_c",
            "sample_mass_g",
            "degas_temperature_c",
            "degas_duration_s",
            "instrument",
            "points",
        ] {
            assert!(j.get(key).is_some(), "{key} missing from {j:#}");
        }
        assert_eq!(j["sample_id"], "S 1");
        assert!(all[0].exports_as(ExportFormat::Aif));
    }

    #[test]
    fn cif_values_are_quoted_only_when_needed() {
        assert_eq!(cif_value("CO2"), "CO2");
        assert_eq!(cif_value("a b"), "'a b'");
        assert_eq!(cif_value("_x"), "'_x'");
        assert_eq!(cif_value(""), "''");
        assert_eq!(cif_value("it's \"x\""), "\n;\nit's \"x\"\n;");
    }
}
