//! A simulated Eurotherm 2000/3000-series temperature controller and the box furnace it drives.
//!
//! # Plant
//!
//! `C·dT/dt = u·P_max − (T − T_amb)/R_th − εA·σ·(T⁴ − T_amb⁴)` (Kelvin in the T⁴ term), with an
//! optional heater dead time, and a first-order thermocouple lag `τ` between the furnace
//! temperature and the measured PV. Cooling is passive.
//!
//! # Controller
//!
//! Positional PID on `working SP − PV`: proportional band `Xp` in % of the input span
//! (`range_hi_c − range_lo_c`), `Ti`/`Td` in seconds (0 = off), derivative on PV (filtered),
//! output clamped to 0–100 % with conditional integration as anti-windup. The setpoint rate
//! limit works like a real Eurotherm ("servo to PV"): when the target SP changes while the rate
//! limit is non-zero, the working SP restarts from the current PV and moves toward the target at
//! the rate; with rate 0 the working SP equals the target immediately. Manual mode is bumpless in
//! both directions.
//!
//! # Time
//!
//! The model advances lazily: every access first integrates from the last simulated instant to
//! [`Clock::now_s`] in fixed steps of [`FurnaceConfig::step_s`] on a grid anchored at the
//! furnace's creation, so the trajectory does not depend on how often it is polled. Writes take
//! effect at the last grid point. [`FurnaceModel`] exposes the same model with an explicit
//! [`FurnaceModel::advance_to`] for wall-clock-free use.
//!
//! # Register map (integer region, function codes 03/04 read, 06/16 write)
//!
//! Temperatures (°C) and the rate limit (°C/min) are signed 16-bit scaled by `10^dp`
//! ([`FurnaceConfig::decimal_places`]); percentages have one fixed decimal; Ti/Td are whole
//! seconds; the measured input has two decimals (mV).
//!
//! | reg | parameter | access |
//! |---|---|---|
//! | 1 | PV | RO |
//! | 2 | target SP (range `sp_min_c..=sp_max_c`) | RW |
//! | 3 | output power % | RO |
//! | 4 | working output % (equals reg 3) | RW in manual only |
//! | 5 | working SP | RO |
//! | 6 / 8 / 9 | Xp % (0.1–999.9) / Ti s (0–9999) / Td s (0–9999) | RW |
//! | 15 | active SP select (only 0 = SP1) | RW |
//! | 24 / 25 | SP1 (alias of reg 2) / SP2 (stored, unused) | RW |
//! | 26 | remote SP (stored, unused) | RW |
//! | 35 | SP rate limit, units/min (0 = off) | RW |
//! | 39 | error PV − working SP | RO |
//! | 74 | fast status: bits 0–3 alarms 1–4, 4 manual, 5 sensor break, 6 loop break, 7 heater fail | RO |
//! | 75 | status: bits 0–3 alarms 1–4, 5 sensor break, 6 loop break, 7 heater fail, 9 program end, 10 PV out of range, 12 new alarm, 13 ramp running | RO |
//! | 107 | firmware version | RO |
//! | 122 | instrument ident ([`FurnaceConfig::ident`], default `0x2440`: a 2404) | RO |
//! | 202 | measured input mV | RO |
//! | 273 | auto (0) / manual (1) | RW |
//! | 274 | acknowledge all alarms (write any value; reads 0) | RW |
//! | 22 | program number, 1–[`FurnaceConfig::programs`]; writable while reset or complete | RW |
//! | 23 | program state, bit-coded: 1 reset, 2 run, 4 hold, 16 complete; write 1, 2 or 4 | RW |
//! | 29 | type of the current segment (0 when reset) | RO |
//! | 36 | time left in the current segment, programmer time units | RO |
//! | 56 | current segment, 1-based (0 when reset) | RO |
//! | 58 | time left in the program, programmer time units | RO |
//! | 8192 + 136·p + 8·s | program `p` (1-based) segment `s` (1–16; 0: general block, plain words): `+0` type (0 end, 1 ramp at rate, 2 ramp in time, 3 dwell, 4 step), `+1` target, `+2` rate (°C/min, scaled like temperatures) or duration (time units), `+3..+7` stored words | RW (not the running program) |
//!
//! Alarm 1 is a latching high alarm at [`FurnaceConfig::alarm1_high_c`]; it stays set until it
//! is acknowledged (reg 274) after its condition has cleared. Bit 12 latches on the rising edge of
//! alarm 1, sensor break, loop break or heater failure and is cleared by an acknowledge. During a
//! sensor break, PV holds its last good value and the output goes to
//! [`FurnaceConfig::sensor_break_output_pct`] (auto mode). Loop break (bit 6) is set when the
//! output has been at 100 % for [`FurnaceConfig::loop_break_time_s`] without PV rising by
//! [`FurnaceConfig::loop_break_delta_c`].
//!
//! The programmer ([`FurnaceConfig::programs`] programs of 16 segments) runs a written program:
//! run starts from PV ("servo to PV"), the programmer setpoint then drives the working setpoint
//! (register 2 keeps the controller's own setpoint, used again after reset), hold freezes it,
//! and after an end segment (or the 16th) the program is complete: status bit 9, setpoint kept
//! until reset. Holdback (state 8) is not simulated. Programmer durations are in
//! [`FurnaceConfig::program_time_unit_s`] units (minutes by default) in the integer region.
//!
//! Every other address answers exception 02 (also when a multi-register read spans one); an
//! out-of-range value or a write to a read-only register answers 03.
//!
//! # Float region
//!
//! Parameter `n` is also available at `0x8000 + 2n` as an IEEE-754 `f32`, high word first
//! (unscaled engineering units); Ti/Td there are unsigned 32-bit milliseconds. Float writes must
//! cover both words of a parameter (function 16), else exception 03.

mod model;
mod programmer;
mod registers;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use ppu_drivers::Clock;
use tokio_modbus::ExceptionCode;

pub use model::FurnaceModel;
pub use programmer::ProgramState;

/// Plant, controller and register configuration.
///
/// [`Default`] is a typical lab box furnace (3 kW, `R_th` 1 K/W, `R·C` 20 min, limit 1200 °C)
/// with a type-K input and a PID tuned for 1–20 °C/min ramps.
#[derive(Clone, Debug, PartialEq)]
pub struct FurnaceConfig {
    /// Ambient temperature, and the initial temperature of the furnace, °C.
    pub ambient_c: f64,
    /// Decimal places of temperatures in the integer register region (0–3).
    pub decimal_places: u8,
    /// Modbus unit (slave) id, 1–247.
    pub unit_id: u8,

    /// Heater power at 100 % output, W.
    pub heater_power_w: f64,
    /// Conductive thermal resistance to ambient, K/W.
    pub thermal_resistance_k_per_w: f64,
    /// Heat capacity of the furnace, J/K.
    pub heat_capacity_j_per_k: f64,
    /// Effective emissivity × radiating area (ε·A), m².
    pub emissivity_area_m2: f64,
    /// Delay between the output and the heat reaching the load, s.
    pub heater_dead_time_s: f64,
    /// Thermocouple first-order time constant, s.
    pub sensor_lag_s: f64,
    /// Standard deviation of Gaussian PV noise, °C (0 = none).
    pub pv_noise_c: f64,
    /// Seed of the noise generator (reproducible runs).
    pub seed: u64,
    /// Integration step, s (clamped to 0.01–0.5).
    pub step_s: f64,

    /// Input range low, °C (PV below it sets "PV out of range"; with `range_hi_c` it defines
    /// the span that Xp is a percentage of).
    pub range_lo_c: f64,
    /// Input range high, °C.
    pub range_hi_c: f64,
    /// Lowest accepted setpoint, °C.
    pub sp_min_c: f64,
    /// Highest accepted setpoint, °C (the furnace's limit).
    pub sp_max_c: f64,
    /// Alarm 1 (latching high alarm) threshold, °C.
    pub alarm1_high_c: f64,
    /// Alarm hysteresis, °C.
    pub alarm_hysteresis_c: f64,
    /// Highest accepted rate limit, °C/min.
    pub rate_limit_max_c_per_min: f64,
    /// Target SP at power-up, °C.
    pub initial_sp_c: f64,

    /// Proportional band, % of the input span.
    pub xp_pct: f64,
    /// Integral time, s (0 = off).
    pub ti_s: f64,
    /// Derivative time, s (0 = off).
    pub td_s: f64,
    /// Output in auto mode while the sensor is broken, %.
    pub sensor_break_output_pct: f64,
    /// Loop-break detection time, s (0 = off).
    pub loop_break_time_s: f64,
    /// PV rise that counts as "the loop responds" for loop-break detection, °C.
    pub loop_break_delta_c: f64,

    /// Programs the setpoint programmer stores (1–20).
    pub programs: u16,
    /// Seconds per programmer time unit (dwell and ramp-time durations, time remaining): 60
    /// for minutes, 3600 for hours, 1 for seconds.
    pub program_time_unit_s: f64,

    /// Register 107.
    pub firmware_version: u16,
    /// Register 122, the instrument ident: hex `>ABCD` with A = 2 (series 2000), B = 4 (2400),
    /// C = the DIN size (4 = 1/4 DIN, 8 = 1/8 DIN), D = 0 (PID controller). Default `0x2440`,
    /// a 2404; a 2408 is `0x2480`.
    pub ident: u16,
}

impl Default for FurnaceConfig {
    fn default() -> Self {
        Self {
            ambient_c: 25.0,
            decimal_places: 1,
            unit_id: 1,
            heater_power_w: 3000.0,
            thermal_resistance_k_per_w: 1.0,
            heat_capacity_j_per_k: 1200.0,
            emissivity_area_m2: 0.004,
            heater_dead_time_s: 5.0,
            sensor_lag_s: 10.0,
            pv_noise_c: 0.0,
            seed: 0x5eed_f00d,
            step_s: 0.25,
            range_lo_c: -200.0,
            range_hi_c: 1372.0,
            sp_min_c: 0.0,
            sp_max_c: 1200.0,
            alarm1_high_c: 1200.0,
            alarm_hysteresis_c: 1.0,
            rate_limit_max_c_per_min: 999.9,
            initial_sp_c: 25.0,
            xp_pct: 1.3,
            ti_s: 150.0,
            td_s: 10.0,
            sensor_break_output_pct: 0.0,
            loop_break_time_s: 600.0,
            loop_break_delta_c: 2.0,
            programs: 4,
            program_time_unit_s: 60.0,
            firmware_version: 0x0312,
            ident: 0x2440,
        }
    }
}

/// Inspection view of a furnace (not reachable over Modbus).
#[derive(Clone, Debug, PartialEq)]
pub struct FurnaceSnapshot {
    /// Physical time of this snapshot (the last grid point), s.
    pub t_s: f64,
    /// Measured PV as register 1 shows it, °C.
    pub pv_c: f64,
    /// True furnace temperature, °C.
    pub true_temp_c: f64,
    pub target_sp_c: f64,
    pub working_sp_c: f64,
    pub output_pct: f64,
    /// 0 = off.
    pub rate_limit_c_per_min: f64,
    /// Register 75.
    pub status_bits: u16,
    pub manual: bool,
    pub sensor_break: bool,
    pub heater_fail: bool,
    /// Programmer state (register 23).
    pub program_state: ProgramState,
    /// Current program segment, 1-based; 0 when reset (register 56).
    pub program_segment: u16,
}

/// Status bits of register 75.
pub mod status {
    pub const ALARM1: u16 = 1 << 0;
    pub const ALARM2: u16 = 1 << 1;
    pub const ALARM3: u16 = 1 << 2;
    pub const ALARM4: u16 = 1 << 3;
    pub const SENSOR_BREAK: u16 = 1 << 5;
    pub const LOOP_BREAK: u16 = 1 << 6;
    pub const HEATER_FAIL: u16 = 1 << 7;
    pub const LOAD_FAIL: u16 = 1 << 8;
    pub const PROGRAM_END: u16 = 1 << 9;
    pub const PV_OUT_OF_RANGE: u16 = 1 << 10;
    pub const NEW_ALARM: u16 = 1 << 12;
    pub const RAMP_RUNNING: u16 = 1 << 13;
    pub const REMOTE_SP_FAIL: u16 = 1 << 14;
}

/// Register numbers of the integer region.
pub mod reg {
    pub const PV: u16 = 1;
    pub const TARGET_SP: u16 = 2;
    pub const OUTPUT: u16 = 3;
    pub const WORKING_OUTPUT: u16 = 4;
    pub const WORKING_SP: u16 = 5;
    pub const XP: u16 = 6;
    pub const TI: u16 = 8;
    pub const TD: u16 = 9;
    pub const SP_SELECT: u16 = 15;
    pub const SP1: u16 = 24;
    pub const SP2: u16 = 25;
    pub const REMOTE_SP: u16 = 26;
    pub const RATE_LIMIT: u16 = 35;
    pub const ERROR: u16 = 39;
    pub const FAST_STATUS: u16 = 74;
    pub const STATUS: u16 = 75;
    pub const FIRMWARE: u16 = 107;
    pub const IDENT: u16 = 122;
    pub const INPUT_MV: u16 = 202;
    pub const AUTO_MANUAL: u16 = 273;
    pub const ACK_ALARMS: u16 = 274;
    /// Programmer: selected program (1-based).
    pub const PROGRAM_NUMBER: u16 = 22;
    /// Programmer state, bit-coded: 1 reset, 2 run, 4 hold, 8 holdback, 16 complete.
    pub const PROGRAM_STATE: u16 = 23;
    /// Type of the current segment.
    pub const SEGMENT_TYPE: u16 = 29;
    /// Time left in the current segment, programmer time units.
    pub const SEGMENT_TIME_LEFT: u16 = 36;
    /// Current segment, 1-based.
    pub const PROGRAM_SEGMENT: u16 = 56;
    /// Time left in the program, programmer time units.
    pub const PROGRAM_TIME_LEFT: u16 = 58;
    /// Program data: program `p` (1-based), segment `s` (1–16; 0 is the program's general
    /// block) at `PROGRAM_DATA + 136·p + 8·s`; `+0` type, `+1` target, `+2` rate or duration.
    pub const PROGRAM_DATA: u16 = 8192;
    /// Start of the float region: parameter `n` is at `FLOAT_BASE + 2n`.
    pub const FLOAT_BASE: u16 = 0x8000;
}

/// Physical seconds between the samples of the true temperature given to an observer.
const OBSERVE_EVERY_S: f64 = 5.0;

/// Told the furnace's true temperature every [`OBSERVE_EVERY_S`] of physical time on the
/// model's grid (caught up at each access), e.g. to record the thermal history of the sample
/// inside (the simulated world): the history is the physics', whatever the time scale and
/// however often the controller is polled. Called with the furnace's lock held: an observer
/// must not call back into the furnace.
pub trait FurnaceObserver: Send + Sync {
    fn observe(&self, t_s: f64, temp_c: f64);
}

struct Shared {
    model: Mutex<FurnaceModel>,
    clock: Clock,
    unit_id: u8,
    silent: AtomicBool,
    observer: Mutex<Option<Arc<dyn FurnaceObserver>>>,
}

/// A simulated controller + plant. Clones share the same state.
#[derive(Clone)]
pub struct SimFurnace {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for SimFurnace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimFurnace")
            .field("unit_id", &self.unit_id())
            .field("silent", &self.is_silent())
            .finish_non_exhaustive()
    }
}

impl SimFurnace {
    /// A furnace at ambient temperature, starting at the clock's current physical time.
    pub fn new(config: FurnaceConfig, clock: Clock) -> Self {
        let model = FurnaceModel::new(config, clock.now_s());
        Self {
            shared: Arc::new(Shared {
                unit_id: model.config().unit_id,
                model: Mutex::new(model),
                clock,
                silent: AtomicBool::new(false),
                observer: Mutex::new(None),
            }),
        }
    }

    /// The configuration (after sanitising).
    pub fn config(&self) -> FurnaceConfig {
        self.lock_raw().config().clone()
    }

    /// Modbus unit id.
    pub fn unit_id(&self) -> u8 {
        self.shared.unit_id
    }

    /// The clock this furnace runs on.
    pub fn clock(&self) -> Clock {
        self.shared.clock
    }

    /// Test/inspection view; advances the physics to "now" first.
    pub fn snapshot(&self) -> FurnaceSnapshot {
        self.lock_now().snapshot()
    }

    /// Fault switch: while true, the Modbus server drops every request for this furnace
    /// without answering (connections stay open).
    pub fn set_silent(&self, silent: bool) {
        self.shared.silent.store(silent, Ordering::SeqCst);
    }

    pub fn is_silent(&self) -> bool {
        self.shared.silent.load(Ordering::SeqCst)
    }

    /// Sensor break: status bit 5, PV frozen, output to its sensor-break level (auto mode).
    pub fn set_sensor_break(&self, on: bool) {
        self.lock_now().set_sensor_break(on);
    }

    /// Heater failure: status bit 7, the heater gives no power.
    pub fn set_heater_fail(&self, on: bool) {
        self.lock_now().set_heater_fail(on);
    }

    /// Power cycle of the controller: setpoints and mode back at their power-up
    /// values (`initial_sp_c`, automatic); the furnace keeps its heat and the controller
    /// keeps regulating, now at its power-up setpoint.
    pub fn power_cycle(&self) {
        self.lock_now().power_cycle();
    }

    /// Reads `count` holding registers from `addr` (function 03/04).
    pub fn read_registers(&self, addr: u16, count: u16) -> Result<Vec<u16>, ExceptionCode> {
        self.lock_now().read_registers(addr, count)
    }

    /// Writes one register (function 06).
    pub fn write_register(&self, addr: u16, value: u16) -> Result<(), ExceptionCode> {
        self.lock_now().write_register(addr, value)
    }

    /// Writes consecutive registers (function 16); all or nothing.
    pub fn write_registers(&self, addr: u16, values: &[u16]) -> Result<(), ExceptionCode> {
        self.lock_now().write_registers(addr, values)
    }

    fn lock_raw(&self) -> MutexGuard<'_, FurnaceModel> {
        // A panic while holding the lock cannot leave the model half-updated in a way that
        // matters more than refusing service would, so recover from poisoning.
        self.shared
            .model
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn lock_now(&self) -> MutexGuard<'_, FurnaceModel> {
        let mut model = self.lock_raw();
        let observer = self
            .shared
            .observer
            .lock()
            .ok()
            .and_then(|o| o.as_ref().cloned());
        let now = self.shared.clock.now_s();
        match observer {
            // On the physics' own grid, never at the instants of access: those depend on
            // the time scale and on the driver's polling.
            Some(observer) => {
                model.advance_observing(now, OBSERVE_EVERY_S, &mut |t, c| observer.observe(t, c))
            }
            None => model.advance_to(now),
        }
        model
    }

    /// Installs (or with `None` removes) the observer of this furnace's temperature.
    pub fn set_observer(&self, observer: Option<Arc<dyn FurnaceObserver>>) {
        if let Ok(mut slot) = self.shared.observer.lock() {
            *slot = observer;
        }
    }
}

#[cfg(test)]
mod tests;
