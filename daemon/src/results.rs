//! Driver results to API results: one function per step kind, so adding a device family only
//! adds a conversion here, never a change to the scheduler.

use pb::step_result::Result as R;
use ppu_drivers::device::{
    DegasResult, DispenseResult, FurnaceResult, IsothermPoint, IsothermResult, RefillResult,
    StepOutput, WeighResult,
};
use ppu_proto::v1 as pb;

/// The API form of a step's typed result.
pub fn to_proto(out: StepOutput) -> R {
    match out {
        StepOutput::Furnace(f) => R::Furnace(furnace(f)),
        StepOutput::Dispense(d) => R::Dispense(dispense(d)),
        StepOutput::Refill(r) => R::Refill(refill(r)),
        StepOutput::Weigh(w) => R::Weigh(weigh(w)),
        StepOutput::Degas(d) => R::Degas(degas(d)),
        StepOutput::Isotherm(i) => R::Isotherm(isotherm(i)),
    }
}

fn furnace(f: FurnaceResult) -> pb::FurnaceResult {
    pb::FurnaceResult {
        trace: f
            .trace
            .into_iter()
            .map(|s| pb::FurnaceSample {
                t_s: s.t_s,
                pv_c: s.pv_c,
                working_sp_c: s.working_sp_c,
                output_pct: s.output_pct,
            })
            .collect(),
        max_overshoot_c: f.max_overshoot_c,
        targets: f
            .targets
            .into_iter()
            .map(|t| pb::TargetReached {
                segment_index: t.segment_index,
                temperature_c: t.temperature_c,
                reached_at_s: t.reached_at_s,
                tolerance_c: t.tolerance_c,
            })
            .collect(),
    }
}

fn dispense(d: DispenseResult) -> pb::DispenseResult {
    pb::DispenseResult {
        reagent: d.reagent,
        requested_volume_ml: d.requested_volume_ml,
        pump_volume_ml: d.pump_volume_ml,
        measured_mass_g: d.measured_mass_g,
        expected_mass_g: d.expected_mass_g,
        relative_deviation: d.relative_deviation,
        remaining_ml: d.remaining_ml,
    }
}

fn refill(r: RefillResult) -> pb::RefillResult {
    pb::RefillResult {
        reagent: r.reagent,
        volume_ml: r.volume_ml,
        fill_ml: r.fill_ml,
    }
}

fn weigh(w: WeighResult) -> pb::WeighResult {
    pb::WeighResult {
        mass_g: w.mass_g,
        stable: w.stable,
    }
}

fn degas(d: DegasResult) -> pb::DegasResult {
    pb::DegasResult {
        temperature_c: d.temperature_c,
        duration_s: d.duration_s,
        final_pressure_bar: d.final_pressure_bar,
    }
}

/// One isotherm point in API form (also used for the per-point event).
pub fn isotherm_point(p: IsothermPoint) -> pb::IsothermPoint {
    pb::IsothermPoint {
        pressure_bar: p.pressure_bar,
        p0_bar: p.p0_bar,
        amount_mmol_per_g: p.amount_mmol_per_g,
        equilibration_time_s: p.equilibration_time_s,
    }
}

fn isotherm(i: IsothermResult) -> pb::IsothermResult {
    pb::IsothermResult {
        adsorptive: i.adsorptive,
        temperature_c: i.temperature_c,
        sample_mass_g: i.sample_mass_g,
        degas_temperature_c: i.degas_temperature_c,
        degas_duration_s: i.degas_duration_s,
        points: i.points.into_iter().map(isotherm_point).collect(),
        instrument: i.instrument,
    }
}
