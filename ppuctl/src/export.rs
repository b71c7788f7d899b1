//! `ppuctl export`: an experiment's measured isotherm as AIF (the Adsorption Information File,
//! CIF syntax, readable by pyGAPS and other adsorption software), CSV or JSON.
//!
//! AIF units: temperature K, pressure bar (absolute), amount mmol/g, mass g, degas time h.
//! One AIF data block holds one isotherm, so an experiment with several isotherm steps is
//! exported one step at a time (`--step`).

use std::fmt::Write as _;
use std::path::PathBuf;

use crate::InputError;
use crate::conn::Channel;
use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use ppu_proto::v1 as pb;
use ppu_proto::v1::experiment_service_client::ExperimentServiceClient;
use serde_json::{Value, json};

/// The AIF dictionary version written (the one pyGAPS' parser implements).
const AIF_VERSION: &str = "d546195";
const KELVIN: f64 = 273.15;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ExportFormat {
    /// Adsorption Information File (CIF syntax).
    Aif,
    /// One row per point.
    Csv,
    /// The isotherm with its metadata.
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
    /// Index of the isotherm step to export when the experiment has several (default: the
    /// last isotherm measured).
    #[arg(long, value_name = "INDEX")]
    pub step: Option<u32>,
}

/// One isotherm of an experiment, with what the export needs to describe it.
pub struct Isotherm<'a> {
    pub experiment: &'a pb::Experiment,
    pub step_index: u32,
    pub result: &'a pb::IsothermResult,
}

/// The isotherm results of an experiment, in step order.
pub fn isotherms(e: &pb::Experiment) -> Vec<Isotherm<'_>> {
    e.results
        .iter()
        .filter_map(|r| match &r.result {
            Some(pb::step_result::Result::Isotherm(i)) => Some(Isotherm {
                experiment: e,
                step_index: r.step_index,
                result: i,
            }),
            _ => None,
        })
        .collect()
}

pub async fn run(ch: Channel, args: ExportArgs) -> Result<()> {
    let mut client = ExperimentServiceClient::new(ch);
    let e = crate::call(client.get_experiment(pb::GetExperimentRequest {
        id: args.id.clone(),
    }))
    .await?;
    let all = isotherms(&e);
    let chosen = match args.step {
        Some(k) => all.into_iter().find(|i| i.step_index == k).ok_or_else(|| {
            InputError(format!(
                "experiment {}: step {k} has no isotherm result",
                e.id
            ))
        })?,
        None => all.into_iter().last().ok_or_else(|| {
            InputError(format!(
                "experiment {} has no isotherm result yet (state {})",
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

fn material_id(i: &Isotherm<'_>) -> String {
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

fn operator(i: &Isotherm<'_>) -> String {
    i.experiment
        .spec
        .as_ref()
        .and_then(|s| s.labels.get("operator").cloned())
        .filter(|o| !o.is_empty())
        .unwrap_or_else(|| "ppu".to_owned())
}

fn measured_at(i: &Isotherm<'_>) -> String {
    let finished = i
        .experiment
        .results
        .iter()
        .find(|r| r.step_index == i.step_index)
        .and_then(|r| r.finished_at.as_ref());
    crate::render::time(finished.or(i.experiment.updated_at.as_ref()))
}

/// The isotherm as an AIF data block.
pub fn to_aif(i: &Isotherm<'_>) -> String {
    let r = i.result;
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
        ("_exptl_adsorptive", cif_value(&r.adsorptive)),
        ("_exptl_temperature", num(r.temperature_c + KELVIN)),
        ("_exptl_method", cif_value("volumetric")),
        ("_exptl_instrument", cif_value(&r.instrument)),
        ("_adsnt_material_id", cif_value(&material_id(i))),
        ("_adsnt_sample_mass", num(r.sample_mass_g)),
        (
            "_adsnt_degas_temperature",
            num(r.degas_temperature_c + KELVIN),
        ),
        ("_adsnt_degas_time", num(r.degas_duration_s / 3600.0)),
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
    for p in &r.points {
        let _ = writeln!(
            s,
            "{} {} {}",
            num(p.pressure_bar),
            num(p.p0_bar),
            num(p.amount_mmol_per_g)
        );
    }
    s
}

/// The isotherm as CSV: a header, then one row per point.
pub fn to_csv(i: &Isotherm<'_>) -> String {
    let mut s = String::from("point,pressure_bar,p0_bar,amount_mmol_per_g,equilibration_time_s\n");
    for (k, p) in i.result.points.iter().enumerate() {
        let _ = writeln!(
            s,
            "{k},{},{},{},{}",
            num(p.pressure_bar),
            num(p.p0_bar),
            num(p.amount_mmol_per_g),
            num(p.equilibration_time_s)
        );
    }
    s
}

/// The isotherm with its metadata as JSON.
pub fn to_json(i: &Isotherm<'_>) -> Value {
    let r = i.result;
    json!({
        "experiment_id": i.experiment.id,
        "step_index": i.step_index,
        "sample_id": material_id(i),
        "measured_at": measured_at(i),
        "adsorptive": r.adsorptive,
        "temperature_c": r.temperature_c,
        "sample_mass_g": r.sample_mass_g,
        "degas_temperature_c": r.degas_temperature_c,
        "degas_duration_s": r.degas_duration_s,
        "instrument": r.instrument,
        "points": r.points.iter().map(|p| json!({
            "pressure_bar": p.pressure_bar,
            "p0_bar": p.p0_bar,
            "amount_mmol_per_g": p.amount_mmol_per_g,
            "equilibration_time_s": p.equilibration_time_s,
        })).collect::<Vec<_>>(),
    })
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
        let all = isotherms(&e);
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

    #[test]
    fn cif_values_are_quoted_only_when_needed() {
        assert_eq!(cif_value("CO2"), "CO2");
        assert_eq!(cif_value("a b"), "'a b'");
        assert_eq!(cif_value("_x"), "'_x'");
        assert_eq!(cif_value(""), "''");
        assert_eq!(cif_value("it's \"x\""), "\n;\nit's \"x\"\n;");
    }
}
