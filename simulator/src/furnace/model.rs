//! The deterministic furnace model: plant, controller, alarms and register access, advanced by
//! explicit time.

use std::collections::VecDeque;

use tokio_modbus::ExceptionCode;

use super::programmer::{self, Cell, Programmer};
use super::registers::{self, Kind, Param, Slot};
use super::{FurnaceConfig, FurnaceSnapshot, status};

const STEFAN_BOLTZMANN: f64 = 5.670_374_419e-8;
const KELVIN: f64 = 273.15;
/// Thermocouple sensitivity used for the measured-input register (type K, linearised), mV/K.
const MV_PER_K: f64 = 0.0406;
/// Derivative filter: time constant = Td / N.
const DERIVATIVE_FILTER_N: f64 = 8.0;
const OUTPUT_MIN: f64 = 0.0;
const OUTPUT_MAX: f64 = 100.0;
/// Above this many steps in one catch-up (about 11 physical days at the default step), the
/// excess time is skipped with the state held, so that one access after a very long idle period
/// cannot stall the caller for more than a fraction of a second.
const MAX_CATCHUP_STEPS: u64 = 4_000_000;

/// A furnace controller and plant advanced by explicit physical time.
///
/// [`super::SimFurnace`] wraps one of these and calls [`FurnaceModel::advance_to`] with the
/// clock's time on every access. Use it directly for fully deterministic tests.
#[derive(Clone, Debug)]
pub struct FurnaceModel {
    cfg: FurnaceConfig,
    dt: f64,
    sensor_alpha: f64,
    t0_s: f64,
    steps: u64,

    temp_c: f64,
    sensor_c: f64,
    pv_c: f64,
    heater_delay: VecDeque<f64>,
    rng: u64,

    target_sp_c: f64,
    working_sp_c: f64,
    sp2_c: f64,
    remote_sp_c: f64,
    rate_c_per_min: f64,
    xp_pct: f64,
    ti_s: f64,
    td_s: f64,
    manual: bool,
    output_pct: f64,
    integral_pct: f64,
    dpv_filtered: f64,
    prev_pv_c: f64,

    sensor_break: bool,
    heater_fail: bool,
    alarm1_active: bool,
    alarm1_latched: bool,
    new_alarm: bool,
    prev_alarm_bits: u16,
    loop_break: bool,
    /// (seconds at full output, PV when the window started)
    loop_break_window: Option<(f64, f64)>,

    programmer: Programmer,
}

fn finite_or(value: f64, fallback: f64) -> f64 {
    if value.is_finite() { value } else { fallback }
}

fn sanitise(mut c: FurnaceConfig) -> FurnaceConfig {
    let d = FurnaceConfig::default();
    c.ambient_c = finite_or(c.ambient_c, d.ambient_c);
    c.decimal_places = c.decimal_places.min(3);
    c.heater_power_w = finite_or(c.heater_power_w, d.heater_power_w).max(0.0);
    c.thermal_resistance_k_per_w =
        finite_or(c.thermal_resistance_k_per_w, d.thermal_resistance_k_per_w).max(1e-6);
    c.heat_capacity_j_per_k = finite_or(c.heat_capacity_j_per_k, d.heat_capacity_j_per_k).max(1.0);
    c.emissivity_area_m2 = finite_or(c.emissivity_area_m2, d.emissivity_area_m2).max(0.0);
    c.heater_dead_time_s = finite_or(c.heater_dead_time_s, 0.0).clamp(0.0, 3600.0);
    c.sensor_lag_s = finite_or(c.sensor_lag_s, d.sensor_lag_s).max(0.0);
    c.pv_noise_c = finite_or(c.pv_noise_c, 0.0).max(0.0);
    c.step_s = finite_or(c.step_s, d.step_s).clamp(0.01, 0.5);
    c.range_lo_c = finite_or(c.range_lo_c, d.range_lo_c);
    c.range_hi_c = finite_or(c.range_hi_c, d.range_hi_c);
    if c.range_hi_c <= c.range_lo_c {
        c.range_hi_c = c.range_lo_c + 1.0;
    }
    c.sp_min_c = finite_or(c.sp_min_c, d.sp_min_c);
    c.sp_max_c = finite_or(c.sp_max_c, d.sp_max_c).max(c.sp_min_c);
    c.alarm1_high_c = finite_or(c.alarm1_high_c, c.sp_max_c);
    c.alarm_hysteresis_c = finite_or(c.alarm_hysteresis_c, d.alarm_hysteresis_c).max(0.0);
    c.rate_limit_max_c_per_min =
        finite_or(c.rate_limit_max_c_per_min, d.rate_limit_max_c_per_min).max(0.0);
    c.initial_sp_c = finite_or(c.initial_sp_c, c.ambient_c).clamp(c.sp_min_c, c.sp_max_c);
    c.xp_pct = finite_or(c.xp_pct, d.xp_pct).clamp(0.1, 999.9);
    c.ti_s = finite_or(c.ti_s, d.ti_s).clamp(0.0, 9999.0);
    c.td_s = finite_or(c.td_s, d.td_s).clamp(0.0, 9999.0);
    c.sensor_break_output_pct =
        finite_or(c.sensor_break_output_pct, 0.0).clamp(OUTPUT_MIN, OUTPUT_MAX);
    c.loop_break_time_s = finite_or(c.loop_break_time_s, 0.0).max(0.0);
    c.loop_break_delta_c = finite_or(c.loop_break_delta_c, d.loop_break_delta_c).max(0.0);
    c.programs = c.programs.clamp(1, programmer::MAX_PROGRAMS);
    c.program_time_unit_s = finite_or(c.program_time_unit_s, d.program_time_unit_s).max(1e-3);
    c
}

impl FurnaceModel {
    /// A furnace at ambient temperature whose time grid starts at `t0_s` (physical seconds).
    pub fn new(config: FurnaceConfig, t0_s: f64) -> Self {
        let cfg = sanitise(config);
        let dt = cfg.step_s;
        let sensor_alpha = if cfg.sensor_lag_s > 0.0 {
            1.0 - (-dt / cfg.sensor_lag_s).exp()
        } else {
            1.0
        };
        let delay_len = (cfg.heater_dead_time_s / dt).round() as usize;
        let ambient = cfg.ambient_c;
        let sp = cfg.initial_sp_c;
        let mut model = Self {
            dt,
            sensor_alpha,
            t0_s: finite_or(t0_s, 0.0),
            steps: 0,
            temp_c: ambient,
            sensor_c: ambient,
            pv_c: ambient,
            heater_delay: std::iter::repeat_n(0.0, delay_len).collect(),
            rng: cfg.seed,
            target_sp_c: sp,
            working_sp_c: sp,
            sp2_c: sp,
            remote_sp_c: sp,
            rate_c_per_min: 0.0,
            xp_pct: cfg.xp_pct,
            ti_s: cfg.ti_s,
            td_s: cfg.td_s,
            manual: false,
            output_pct: 0.0,
            integral_pct: 0.0,
            dpv_filtered: 0.0,
            prev_pv_c: ambient,
            sensor_break: false,
            heater_fail: false,
            alarm1_active: false,
            alarm1_latched: false,
            new_alarm: false,
            prev_alarm_bits: 0,
            loop_break: false,
            loop_break_window: None,
            programmer: Programmer::new(cfg.programs),
            cfg,
        };
        model.update_alarms();
        model
    }

    /// The (sanitised) configuration.
    pub fn config(&self) -> &FurnaceConfig {
        &self.cfg
    }

    /// Physical time of the last simulated grid point, s.
    pub fn time_s(&self) -> f64 {
        self.t0_s + self.steps as f64 * self.dt
    }

    /// Integrates up to the last grid point at or before `t_s`. Earlier times are a no-op.
    pub fn advance_to(&mut self, t_s: f64) {
        self.advance_observing(t_s, 1.0, &mut |_, _| {});
    }

    /// [`FurnaceModel::advance_to`], calling `observe(t_s, true temperature °C)` at every
    /// grid point passed whose time (since the model's start) is a whole multiple of
    /// `every_s` (rounded to whole steps). The samples lie on a fixed physical grid, so what an
    /// observer sees does not depend on when, or how often, the model is advanced.
    pub fn advance_observing(&mut self, t_s: f64, every_s: f64, observe: &mut dyn FnMut(f64, f64)) {
        if !t_s.is_finite() {
            return;
        }
        let every = if every_s.is_finite() {
            ((every_s / self.dt).round() as u64).max(1)
        } else {
            1
        };
        let target_steps = ((t_s - self.t0_s) / self.dt).floor();
        if target_steps <= self.steps as f64 {
            return;
        }
        let mut todo = (target_steps - self.steps as f64).min(u64::MAX as f64) as u64;
        if todo > MAX_CATCHUP_STEPS {
            // Skip (hold the state over) the excess idle time.
            self.steps = self.steps.saturating_add(todo - MAX_CATCHUP_STEPS);
            todo = MAX_CATCHUP_STEPS;
        }
        for _ in 0..todo {
            self.step();
            self.steps += 1;
            if self.steps.is_multiple_of(every) {
                observe(self.time_s(), self.temp_c);
            }
        }
    }

    /// Inspection view at the last grid point.
    pub fn snapshot(&self) -> FurnaceSnapshot {
        FurnaceSnapshot {
            t_s: self.time_s(),
            pv_c: self.pv_c,
            true_temp_c: self.temp_c,
            target_sp_c: self.target_sp_c,
            working_sp_c: self.working_sp_c,
            output_pct: self.output_pct,
            rate_limit_c_per_min: self.rate_c_per_min,
            status_bits: self.status_bits(),
            manual: self.manual,
            sensor_break: self.sensor_break,
            heater_fail: self.heater_fail,
            program_state: self.programmer.state(),
            program_segment: self.programmer.segment_number(),
        }
    }

    pub fn set_sensor_break(&mut self, on: bool) {
        if self.sensor_break == on {
            return;
        }
        self.sensor_break = on;
        if on {
            if !self.manual {
                self.output_pct = self.cfg.sensor_break_output_pct;
            }
        } else {
            // Resume bumplessly from the live measurement.
            self.pv_c = self.sensor_c;
            self.prev_pv_c = self.pv_c;
            self.dpv_filtered = 0.0;
        }
        self.update_alarms();
    }

    /// Power cycle of the controller (not the plant): the setpoints and the mode come back at
    /// their configured power-up values, the control loop restarts from the live measurement,
    /// and the controller keeps regulating at its power-up setpoint. The furnace's
    /// temperature, the configuration, the stored programs and any plant fault survive.
    pub fn power_cycle(&mut self) {
        let sp = self.cfg.initial_sp_c;
        self.target_sp_c = sp;
        self.working_sp_c = sp;
        self.sp2_c = sp;
        self.remote_sp_c = sp;
        self.manual = false;
        self.output_pct = 0.0;
        self.integral_pct = 0.0;
        self.dpv_filtered = 0.0;
        self.prev_pv_c = self.pv_c;
        self.alarm1_latched = false;
        self.new_alarm = false;
        self.loop_break = false;
        self.loop_break_window = None;
        self.update_alarms();
    }

    pub fn set_heater_fail(&mut self, on: bool) {
        self.heater_fail = on;
        self.update_alarms();
    }

    /// Function 03/04.
    pub fn read_registers(&self, addr: u16, count: u16) -> Result<Vec<u16>, ExceptionCode> {
        if u32::from(addr) + u32::from(count) > 0x1_0000 {
            return Err(ExceptionCode::IllegalDataAddress);
        }
        (0..count)
            .map(|i| match registers::slot(addr + i)? {
                Slot::Int(p) => {
                    let (kind, value) = self.value_of(p)?;
                    Ok(self.encode_int(kind, value))
                }
                Slot::Float(p, low) => {
                    let (kind, value) = self.value_of(p)?;
                    Ok(registers::encode_float(kind, value)[usize::from(low)])
                }
            })
            .collect()
    }

    /// A parameter's representation and value (program data cells have their own).
    fn value_of(&self, p: Param) -> Result<(Kind, f64), ExceptionCode> {
        let Param::ProgramData(addr) = p else {
            return Ok((p.kind(), self.get(p)));
        };
        let (program, block, field) =
            programmer::locate(addr, self.cfg.programs).ok_or(ExceptionCode::IllegalDataAddress)?;
        let cell = self
            .programmer
            .cell(program, block, field)
            .ok_or(ExceptionCode::IllegalDataAddress)?;
        Ok(match cell {
            Cell::Word(w) => (Kind::Word, f64::from(w)),
            Cell::Temp(v) => (Kind::Temp, v),
            Cell::Time(s) => (Kind::ProgramTime, s),
        })
    }

    fn encode_int(&self, kind: Kind, value: f64) -> u16 {
        match kind {
            Kind::ProgramTime => {
                registers::encode_int(Kind::Word, value / self.cfg.program_time_unit_s, 0)
            }
            _ => registers::encode_int(kind, value, self.cfg.decimal_places),
        }
    }

    fn decode_int(&self, kind: Kind, word: u16) -> f64 {
        match kind {
            Kind::ProgramTime => f64::from(word) * self.cfg.program_time_unit_s,
            _ => registers::decode_int(kind, word, self.cfg.decimal_places),
        }
    }

    /// Function 06. A single write into the float region is refused (03): floats take two
    /// words.
    pub fn write_register(&mut self, addr: u16, value: u16) -> Result<(), ExceptionCode> {
        match registers::slot(addr)? {
            Slot::Int(p) => {
                let (kind, _) = self.value_of(p)?;
                self.set(p, self.decode_int(kind, value))
            }
            Slot::Float(p, _) => {
                // Unmapped program data is an address error even here.
                self.value_of(p)?;
                Err(ExceptionCode::IllegalDataValue)
            }
        }
    }

    /// Function 16: all or nothing.
    pub fn write_registers(&mut self, addr: u16, values: &[u16]) -> Result<(), ExceptionCode> {
        if values.is_empty() {
            return Err(ExceptionCode::IllegalDataValue);
        }
        if u32::from(addr) + values.len() as u32 > 0x1_0000 {
            return Err(ExceptionCode::IllegalDataAddress);
        }
        // Check every address first so that an unmapped one answers 02 whatever the values.
        for i in 0..values.len() {
            let (Slot::Int(p) | Slot::Float(p, _)) = registers::slot(addr + i as u16)?;
            self.value_of(p)?;
        }
        let mut next = self.clone();
        let mut i = 0;
        while i < values.len() {
            let a = addr + i as u16;
            match registers::slot(a)? {
                Slot::Int(p) => {
                    // The kind after the earlier words of this write (a segment's type first).
                    let (kind, _) = next.value_of(p)?;
                    let v = next.decode_int(kind, values[i]);
                    next.set(p, v)?;
                    i += 1;
                }
                Slot::Float(p, false) => {
                    let low = *values.get(i + 1).ok_or(ExceptionCode::IllegalDataValue)?;
                    let (kind, _) = next.value_of(p)?;
                    next.set(p, registers::decode_float(kind, [values[i], low]))?;
                    i += 2;
                }
                Slot::Float(_, true) => return Err(ExceptionCode::IllegalDataValue),
            }
        }
        *self = next;
        Ok(())
    }

    fn scaled_equal(&self, a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    fn get(&self, p: Param) -> f64 {
        match p {
            Param::Pv => self.pv_c,
            Param::TargetSp | Param::Sp1 => self.target_sp_c,
            Param::Output | Param::WorkingOutput => self.output_pct,
            Param::WorkingSp => self.working_sp_c,
            Param::Xp => self.xp_pct,
            Param::Ti => self.ti_s,
            Param::Td => self.td_s,
            Param::SpSelect => 0.0,
            Param::Sp2 => self.sp2_c,
            Param::RemoteSp => self.remote_sp_c,
            Param::RateLimit => self.rate_c_per_min,
            Param::Error => self.pv_c - self.working_sp_c,
            Param::FastStatus => f64::from(self.fast_status()),
            Param::Status => f64::from(self.status_bits()),
            Param::Firmware => f64::from(self.cfg.firmware_version),
            Param::Ident => f64::from(self.cfg.ident),
            Param::InputMv => {
                if self.sensor_break {
                    0.0
                } else {
                    (self.sensor_c - self.cfg.ambient_c) * MV_PER_K
                }
            }
            Param::AutoManual => f64::from(u8::from(self.manual)),
            Param::AckAlarms => 0.0,
            Param::ProgramNumber => f64::from(self.programmer.number()),
            Param::ProgramState => f64::from(self.programmer.state().bits()),
            Param::SegmentType => f64::from(self.programmer.segment_type()),
            Param::SegmentTimeLeft => self.programmer.segment_time_left_s(),
            Param::ProgramSegment => f64::from(self.programmer.segment_number()),
            Param::ProgramTimeLeft => self.programmer.program_time_left_s(),
            // Read through `value_of`.
            Param::ProgramData(_) => 0.0,
        }
    }

    fn check_sp(&self, v: f64) -> Result<f64, ExceptionCode> {
        if v < self.cfg.sp_min_c - 1e-9 || v > self.cfg.sp_max_c + 1e-9 {
            return Err(ExceptionCode::IllegalDataValue);
        }
        Ok(v.clamp(self.cfg.sp_min_c, self.cfg.sp_max_c))
    }

    fn set(&mut self, p: Param, v: f64) -> Result<(), ExceptionCode> {
        if !v.is_finite() {
            return Err(ExceptionCode::IllegalDataValue);
        }
        let in_range = |lo: f64, hi: f64| {
            if v < lo - 1e-9 || v > hi + 1e-9 {
                Err(ExceptionCode::IllegalDataValue)
            } else {
                Ok(v.clamp(lo, hi))
            }
        };
        let whole = |v: f64| (v - v.round()).abs() < 1e-6;
        match p {
            Param::Pv
            | Param::Output
            | Param::WorkingSp
            | Param::Error
            | Param::FastStatus
            | Param::Status
            | Param::Firmware
            | Param::Ident
            | Param::InputMv
            | Param::SegmentType
            | Param::SegmentTimeLeft
            | Param::ProgramSegment
            | Param::ProgramTimeLeft => return Err(ExceptionCode::IllegalDataValue),
            Param::ProgramNumber => {
                if !whole(v) || v < 0.0 || v > f64::from(u16::MAX) {
                    return Err(ExceptionCode::IllegalDataValue);
                }
                self.programmer.select(v.round() as u16)?;
            }
            Param::ProgramState => {
                if !whole(v) || v < 0.0 || v > f64::from(u16::MAX) {
                    return Err(ExceptionCode::IllegalDataValue);
                }
                let was_active = self.programmer.setpoint().is_some();
                self.programmer.command(v.round() as u16, self.pv_c)?;
                if was_active && self.programmer.setpoint().is_none() {
                    // Reset: back to the controller's own setpoint, ramping from PV if a
                    // rate limit is set, as after a setpoint change.
                    self.working_sp_c = if self.rate_c_per_min > 0.0 {
                        self.pv_c
                    } else {
                        self.target_sp_c
                    };
                }
            }
            Param::ProgramData(addr) => {
                let (program, block, field) = programmer::locate(addr, self.cfg.programs)
                    .ok_or(ExceptionCode::IllegalDataAddress)?;
                let max_rate = self.cfg.rate_limit_max_c_per_min;
                self.programmer.set_cell(
                    program,
                    block,
                    field,
                    v,
                    (self.cfg.sp_min_c, self.cfg.sp_max_c),
                    max_rate,
                )?;
            }
            Param::TargetSp | Param::Sp1 => {
                let v = self.check_sp(v)?;
                if !self.scaled_equal(v, self.target_sp_c) {
                    self.target_sp_c = v;
                    if self.rate_c_per_min > 0.0 {
                        // Servo to PV: the ramp restarts from the measured value.
                        self.working_sp_c = self.pv_c;
                    } else {
                        self.working_sp_c = v;
                    }
                }
            }
            Param::WorkingOutput => {
                if !self.manual {
                    return Err(ExceptionCode::IllegalDataValue);
                }
                self.output_pct = in_range(OUTPUT_MIN, OUTPUT_MAX)?;
            }
            Param::Xp => self.xp_pct = in_range(0.1, 999.9)?,
            Param::Ti => self.ti_s = in_range(0.0, 9999.0)?,
            Param::Td => self.td_s = in_range(0.0, 9999.0)?,
            Param::SpSelect => {
                if v != 0.0 {
                    return Err(ExceptionCode::IllegalDataValue);
                }
            }
            Param::Sp2 => self.sp2_c = self.check_sp(v)?,
            Param::RemoteSp => self.remote_sp_c = self.check_sp(v)?,
            Param::RateLimit => {
                let rate = in_range(0.0, self.cfg.rate_limit_max_c_per_min)?;
                self.rate_c_per_min = rate;
                if rate == 0.0 {
                    self.working_sp_c = self.target_sp_c;
                }
            }
            Param::AutoManual => {
                if !whole(v) {
                    return Err(ExceptionCode::IllegalDataValue);
                }
                match v.round() as i64 {
                    0 => {
                        if self.manual {
                            self.manual = false;
                            // Bumpless transfer: the integral absorbs the difference.
                            let (p, d) = (self.p_term(), self.d_term());
                            self.integral_pct =
                                (self.output_pct - p - d).clamp(OUTPUT_MIN, OUTPUT_MAX);
                        }
                    }
                    1 => self.manual = true,
                    _ => return Err(ExceptionCode::IllegalDataValue),
                }
            }
            Param::AckAlarms => self.acknowledge(),
        }
        self.update_alarms();
        Ok(())
    }

    fn acknowledge(&mut self) {
        if !self.alarm1_condition() {
            self.alarm1_latched = false;
        }
        self.new_alarm = false;
    }

    fn gain(&self) -> f64 {
        let span = self.cfg.range_hi_c - self.cfg.range_lo_c;
        // Output % per kelvin of error.
        100.0 / (self.xp_pct / 100.0 * span)
    }

    fn p_term(&self) -> f64 {
        self.gain() * (self.working_sp_c - self.pv_c)
    }

    fn d_term(&self) -> f64 {
        -self.gain() * self.td_s * self.dpv_filtered
    }

    fn next_noise(&mut self) -> f64 {
        // splitmix64 + Box-Muller: reproducible for a given seed.
        let mut next_unit = || {
            self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.rng;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            ((z >> 11) as f64 + 0.5) / (1u64 << 53) as f64
        };
        let (u1, u2) = (next_unit(), next_unit());
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    fn step(&mut self) {
        let dt = self.dt;

        // A program in progress drives the working setpoint; otherwise it follows the target
        // at the rate limit.
        self.programmer.advance(dt);
        if let Some(sp) = self.programmer.setpoint() {
            self.working_sp_c = sp;
        } else if self.rate_c_per_min > 0.0 {
            let max_step = self.rate_c_per_min / 60.0 * dt;
            let diff = self.target_sp_c - self.working_sp_c;
            if diff.abs() <= max_step {
                self.working_sp_c = self.target_sp_c;
            } else {
                self.working_sp_c += max_step.copysign(diff);
            }
        } else {
            self.working_sp_c = self.target_sp_c;
        }

        // Measurement.
        self.sensor_c += self.sensor_alpha * (self.temp_c - self.sensor_c);
        if !self.sensor_break {
            let noise = if self.cfg.pv_noise_c > 0.0 {
                self.cfg.pv_noise_c * self.next_noise()
            } else {
                0.0
            };
            self.pv_c = self.sensor_c + noise;
        }

        self.control(dt);

        // Plant.
        let commanded = if self.heater_fail {
            0.0
        } else {
            self.output_pct
        };
        let applied = if self.heater_delay.is_empty() {
            commanded
        } else {
            self.heater_delay.push_back(commanded);
            self.heater_delay.pop_front().unwrap_or(0.0)
        };
        let t_k = self.temp_c + KELVIN;
        let a_k = self.cfg.ambient_c + KELVIN;
        let q_in = applied / 100.0 * self.cfg.heater_power_w;
        let q_cond = (self.temp_c - self.cfg.ambient_c) / self.cfg.thermal_resistance_k_per_w;
        let q_rad = self.cfg.emissivity_area_m2
            * STEFAN_BOLTZMANN
            * (t_k * t_k * t_k * t_k - a_k * a_k * a_k * a_k);
        self.temp_c += dt * (q_in - q_cond - q_rad) / self.cfg.heat_capacity_j_per_k;
        self.temp_c = self.temp_c.clamp(-KELVIN, 5000.0);

        self.update_loop_break(dt);
        self.update_alarms();
    }

    fn control(&mut self, dt: f64) {
        if self.manual {
            self.prev_pv_c = self.pv_c;
            self.dpv_filtered = 0.0;
            return;
        }
        if self.sensor_break {
            self.output_pct = self.cfg.sensor_break_output_pct;
            return;
        }
        if self.td_s > 0.0 {
            let raw = (self.pv_c - self.prev_pv_c) / dt;
            let tf = self.td_s / DERIVATIVE_FILTER_N;
            self.dpv_filtered += dt / (tf + dt) * (raw - self.dpv_filtered);
        } else {
            self.dpv_filtered = 0.0;
        }
        self.prev_pv_c = self.pv_c;

        let error = self.working_sp_c - self.pv_c;
        let p = self.p_term();
        let d = self.d_term();
        if self.ti_s > 0.0 {
            let di = self.gain() * dt / self.ti_s * error;
            let trial = p + self.integral_pct + di + d;
            // Conditional integration: never integrate further into saturation.
            let winding_up = (trial > OUTPUT_MAX && di > 0.0) || (trial < OUTPUT_MIN && di < 0.0);
            if !winding_up {
                self.integral_pct += di;
            }
            self.integral_pct = self.integral_pct.clamp(OUTPUT_MIN, OUTPUT_MAX);
        } else {
            self.integral_pct = 0.0;
        }
        self.output_pct = (p + self.integral_pct + d).clamp(OUTPUT_MIN, OUTPUT_MAX);
    }

    fn update_loop_break(&mut self, dt: f64) {
        let saturated = !self.manual && !self.sensor_break && self.output_pct >= OUTPUT_MAX;
        if self.cfg.loop_break_time_s <= 0.0 || !saturated {
            self.loop_break = false;
            self.loop_break_window = None;
            return;
        }
        let (elapsed, start_pv) = self.loop_break_window.unwrap_or((0.0, self.pv_c));
        if self.pv_c - start_pv >= self.cfg.loop_break_delta_c {
            // The loop responds: start a new window.
            self.loop_break = false;
            self.loop_break_window = Some((0.0, self.pv_c));
            return;
        }
        let elapsed = elapsed + dt;
        if elapsed >= self.cfg.loop_break_time_s {
            self.loop_break = true;
        }
        self.loop_break_window = Some((elapsed, start_pv));
    }

    fn alarm1_condition(&self) -> bool {
        if self.alarm1_active {
            self.pv_c > self.cfg.alarm1_high_c - self.cfg.alarm_hysteresis_c
        } else {
            self.pv_c > self.cfg.alarm1_high_c
        }
    }

    fn update_alarms(&mut self) {
        let active = self.alarm1_condition();
        if active && !self.alarm1_active {
            self.alarm1_latched = true;
        }
        self.alarm1_active = active;
        let alarms = self.status_bits()
            & (status::ALARM1 | status::SENSOR_BREAK | status::LOOP_BREAK | status::HEATER_FAIL);
        if alarms & !self.prev_alarm_bits != 0 {
            self.new_alarm = true;
        }
        self.prev_alarm_bits = alarms;
    }

    fn status_bits(&self) -> u16 {
        let mut bits = 0;
        if self.alarm1_active || self.alarm1_latched {
            bits |= status::ALARM1;
        }
        if self.sensor_break {
            bits |= status::SENSOR_BREAK;
        }
        if self.loop_break {
            bits |= status::LOOP_BREAK;
        }
        if self.heater_fail {
            bits |= status::HEATER_FAIL;
        }
        if self.pv_c < self.cfg.range_lo_c || self.pv_c > self.cfg.range_hi_c {
            bits |= status::PV_OUT_OF_RANGE;
        }
        if self.new_alarm {
            bits |= status::NEW_ALARM;
        }
        let following_target = self.programmer.setpoint().is_none();
        if self.programmer.ramping()
            || (following_target && !self.scaled_equal(self.working_sp_c, self.target_sp_c))
        {
            bits |= status::RAMP_RUNNING;
        }
        if self.programmer.state() == super::ProgramState::Complete {
            bits |= status::PROGRAM_END;
        }
        bits
    }

    fn fast_status(&self) -> u16 {
        let status = self.status_bits();
        let mut bits = status & (status::ALARM1 | status::ALARM2 | status::ALARM3 | status::ALARM4);
        if self.manual {
            bits |= 1 << 4;
        }
        bits | (status & (status::SENSOR_BREAK | status::LOOP_BREAK | status::HEATER_FAIL))
    }
}
