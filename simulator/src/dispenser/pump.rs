//! A simulated NE-1000 syringe pump: the pump's firmware (basic and safe-mode framing, command
//! set, errors, alarms reported once) in front of a syringe whose plunger moves at the set rate
//! on the physical clock.
//!
//! # Physics
//!
//! While running, the counted volume grows as rate × physical time until the target volume
//! (`VOL`, 0 = no target), the end of the syringe, or an injected stall. The liquid actually
//! delivered is the counted volume × (1 + [`PumpConfig::delivery_error`]) — the error a wrong
//! diameter setting or a worn syringe makes — and goes into the station's vessel (and into the
//! [`World`] record of the sample placed at this pump). Infusing from an empty syringe, or
//! withdrawing past its end, stalls the motor (`A?S`), as the plunger hits its stop. Like the
//! furnace, the model advances lazily on every access.
//!
//! # Firmware
//!
//! - Basic mode: `<addr><CMD><args>\r` (spaces and case ignored; an empty command is a status
//!   poll), answered `STX <addr><status>[data] ETX`. A command for another address gets no
//!   reply (another pump on the same line). The address `*` (a "system command") reaches every
//!   pump. Bytes inside an `STX … ETX` frame are ignored.
//! - Volumes count in µL for syringes up to 14 mm, in mL above; `VOL UL` / `VOL ML` choose the
//!   units instead, until the next `DIA`. `SAF` alone queries the watchdog (0 = basic mode).
//! - `ADR` queries the network address; `ADR n [B baud]` sets it (0–99; baud 300, 1200, 2400,
//!   9600 or 19200, which a pty ignores). Like `*`, it is accepted whatever address it carries;
//!   the reply, and every later one, carries the new address. The address is kept across power
//!   cycles (non-volatile, like the other settings).
//! - Safe mode (`SAF n`, n = 1–255): requests and replies are `STX len payload CRC ETX`; a frame
//!   whose CRC or `ETX` is wrong is answered `?COM`; bytes outside frames are ignored. If no valid
//!   frame arrives for n seconds of *real* time (a protocol timeout, like the driver's
//!   keep-alive), the pump stops and raises `A?T`. `SAF 0` returns to basic mode. The reply to a
//!   `SAF` command is framed the way the command arrived.
//! - Numbers with more than four digits, or out of range, answer `?OOR`; unknown commands `?`;
//!   changing the diameter, volume, direction or counters while running answers `?NA`, as does
//!   `RUN` while running.
//! - An alarm is reported once, in place of the status, in reply to the next valid command,
//!   which is then *not* carried out. The pump powers up with `A?R` pending; a simulated power
//!   cycle stops it, clears its counters, leaves safe mode and raises `A?R` again (settings stay:
//!   the NE-1000 keeps them in non-volatile memory).

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use ppu_drivers::Clock;

use super::{crc16, format_number, parse_number};
use crate::pty::{ReplyFuture, Request, RequestKind, SerialDevice};
use crate::world::World;

const STX: u8 = 0x02;
const ETX: u8 = 0x03;

/// Static properties of a simulated pump and its syringe.
#[derive(Debug, Clone, PartialEq)]
pub struct PumpConfig {
    /// Address on the line, 0–99.
    pub address: u8,
    /// Reagent in the syringe (for the world record).
    pub reagent: String,
    pub density_g_per_ml: f64,
    /// Syringe capacity, mL.
    pub syringe_volume_ml: f64,
    /// Liquid in the syringe at start, mL.
    pub contents_ml: f64,
    /// Fastest plunger travel, mm/min: with the diameter this sets the highest rate.
    pub max_speed_mm_per_min: f64,
    /// Relative error of the delivered volume against the counted one.
    pub delivery_error: f64,
    /// Inner diameter at power-up, mm.
    pub diameter_mm: f64,
    /// `VER` reply.
    pub firmware: String,
    /// Raise `A?R` in reply to the first command after start.
    pub power_up_alarm: bool,
}

impl Default for PumpConfig {
    /// A 10 mL syringe (14.43 mm) full of water on address 0; 125 mm/min top speed (~20 mL/min
    /// with this syringe).
    fn default() -> Self {
        Self {
            address: 0,
            reagent: "water".to_owned(),
            density_g_per_ml: 1.0,
            syringe_volume_ml: 10.0,
            contents_ml: 10.0,
            max_speed_mm_per_min: 125.0,
            delivery_error: 0.0,
            diameter_mm: 14.43,
            firmware: "NE1000V3.928".to_owned(),
            power_up_alarm: true,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dir {
    Infuse,
    Withdraw,
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Run {
    dir: Dir,
    /// Counted volume of this run, mL.
    moved_ml: f64,
    /// Stop when `moved_ml` reaches this; `None` = run until stopped.
    target_ml: Option<f64>,
    purge: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Alarm {
    Reset,
    Stall,
    Watchdog,
}

impl Alarm {
    fn code(self) -> &'static str {
        match self {
            Alarm::Reset => "A?R",
            Alarm::Stall => "A?S",
            Alarm::Watchdog => "A?T",
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Safe {
    watchdog_s: u8,
    last_valid: Instant,
    tripped: bool,
}

/// Inspection view of a pump (not reachable over the wire).
#[derive(Debug, Clone, PartialEq)]
pub struct PumpSnapshot {
    pub t_s: f64,
    pub running: bool,
    pub infusing: bool,
    pub diameter_mm: f64,
    pub rate_ml_per_min: f64,
    /// Counter values, mL.
    pub infused_ml: f64,
    pub withdrawn_ml: f64,
    /// Liquid in the syringe, mL.
    pub contents_ml: f64,
    /// Liquid delivered into the vessel since start, mL.
    pub delivered_ml: f64,
    pub safe_mode: bool,
    pub pending_alarm: Option<String>,
}

/// The deterministic pump model, advanced by explicit physical time.
#[derive(Debug, Clone)]
pub struct PumpModel {
    cfg: PumpConfig,
    t_s: f64,
    diameter_mm: f64,
    rate_value: f64,
    rate_unit: &'static str,
    target_ml: f64,
    dir: Dir,
    run: Option<Run>,
    infused_ml: f64,
    withdrawn_ml: f64,
    contents_ml: f64,
    delivered_ml: f64,
    alarm: Option<Alarm>,
    stall_after_ml: Option<f64>,
    safe: Option<Safe>,
    /// Volume units chosen with `VOL UL|ML` (µL = true); `None` = by the diameter.
    volume_ul: Option<bool>,
}

fn volume_unit_ul(diameter_mm: f64) -> bool {
    diameter_mm <= 14.0
}

impl PumpModel {
    pub fn new(cfg: PumpConfig, t_s: f64) -> Self {
        let contents = cfg.contents_ml.clamp(0.0, cfg.syringe_volume_ml.max(0.0));
        Self {
            t_s,
            diameter_mm: cfg.diameter_mm,
            rate_value: 0.0,
            rate_unit: "MM",
            target_ml: 0.0,
            dir: Dir::Infuse,
            run: None,
            infused_ml: 0.0,
            withdrawn_ml: 0.0,
            contents_ml: contents,
            delivered_ml: 0.0,
            alarm: cfg.power_up_alarm.then_some(Alarm::Reset),
            stall_after_ml: None,
            safe: None,
            volume_ul: None,
            cfg,
        }
    }

    pub fn config(&self) -> &PumpConfig {
        &self.cfg
    }

    fn rate_ml_per_min(&self) -> f64 {
        let per = match self.rate_unit {
            "UM" => 1000.0,
            "UH" => 60_000.0,
            "MH" => 60.0,
            _ => 1.0,
        };
        self.rate_value / per
    }

    fn max_rate_ml_per_min(&self) -> f64 {
        let r = self.diameter_mm / 2.0;
        std::f64::consts::PI * r * r * self.cfg.max_speed_mm_per_min / 1000.0
    }

    /// Volumes count in µL for small syringes, mL for large ones, unless `VOL UL|ML` chose.
    fn volume_in_ul(&self) -> bool {
        self.volume_ul
            .unwrap_or_else(|| volume_unit_ul(self.diameter_mm))
    }

    fn unit_code(&self) -> &'static str {
        if self.volume_in_ul() { "UL" } else { "ML" }
    }

    fn to_unit(&self, ml: f64) -> f64 {
        if self.volume_in_ul() { ml * 1000.0 } else { ml }
    }

    fn unit_to_ml(&self, v: f64) -> f64 {
        if self.volume_in_ul() { v / 1000.0 } else { v }
    }

    /// Advances the plunger to physical time `t_s`; returns the volume delivered into the vessel
    /// in that interval, mL.
    pub fn advance_to(&mut self, t_s: f64) -> f64 {
        let dt = t_s - self.t_s;
        if dt <= 0.0 {
            return 0.0;
        }
        self.t_s = t_s;
        let Some(mut run) = self.run else { return 0.0 };
        let rate = if run.purge {
            self.max_rate_ml_per_min()
        } else {
            self.rate_ml_per_min()
        };
        let gain = 1.0 + self.cfg.delivery_error;
        let target_left = run
            .target_ml
            .map_or(f64::INFINITY, |t| (t - run.moved_ml).max(0.0));
        let stall_left = self
            .stall_after_ml
            .map_or(f64::INFINITY, |at| (at - run.moved_ml).max(0.0));
        // The plunger's ends: counted volume that still fits the syringe.
        let room = match run.dir {
            Dir::Infuse => self.contents_ml / gain,
            Dir::Withdraw => (self.cfg.syringe_volume_ml - self.contents_ml).max(0.0) / gain,
        };
        let obstacle = stall_left.min(room);
        let step = (rate * dt / 60.0).min(target_left).min(obstacle);
        // The motor stalls only if it hits the obstacle before the target (a syringe may be
        // filled or emptied exactly to its end).
        let stall = obstacle < target_left - 1e-9 && step >= obstacle;
        let stop = !stall && (step >= target_left || step >= obstacle);
        run.moved_ml += step;
        let actual = step * gain;
        let mut delivered = 0.0;
        match run.dir {
            Dir::Infuse => {
                self.infused_ml += step;
                self.contents_ml = (self.contents_ml - actual).max(0.0);
                self.delivered_ml += actual;
                delivered = actual;
            }
            Dir::Withdraw => {
                self.withdrawn_ml += step;
                self.contents_ml = (self.contents_ml + actual).min(self.cfg.syringe_volume_ml);
            }
        }
        if stall {
            self.run = None;
            self.alarm = Some(Alarm::Stall);
            self.stall_after_ml = None;
        } else if stop {
            self.run = None;
        } else {
            self.run = Some(run);
        }
        delivered
    }

    /// Checks the safe-mode watchdog against real time; on expiry stops the pump at the physical
    /// time the watchdog ran out (so the plunger does not travel on) and raises `A?T`.
    fn check_watchdog(&mut self, now_s: f64, scale: f64) -> f64 {
        let Some(safe) = self.safe.as_mut() else {
            return 0.0;
        };
        let limit = std::time::Duration::from_secs(u64::from(safe.watchdog_s));
        let elapsed = safe.last_valid.elapsed();
        if safe.tripped || elapsed <= limit {
            return 0.0;
        }
        safe.tripped = true;
        let overdue_s = (elapsed - limit).as_secs_f64() * scale;
        let delivered = self.advance_to((now_s - overdue_s).max(self.t_s));
        if self.run.take().is_some() || self.alarm.is_none() {
            self.alarm = Some(Alarm::Watchdog);
        }
        delivered
    }

    /// Power cut and restored: motion stops, counters clear, safe mode off, `A?R` pending.
    pub fn power_cycle(&mut self) {
        self.run = None;
        self.infused_ml = 0.0;
        self.withdrawn_ml = 0.0;
        self.safe = None;
        self.alarm = Some(Alarm::Reset);
    }

    /// The next run (or the current one) stalls after `ml` of counted volume.
    /// Sets the syringe to what it holds after the pump, starting full, counted its plunger
    /// down to `counted_ml` (the volume the pump's counters and a driver's ledger speak of):
    /// the physical contents differ by the delivery error. A restarted `ppud dev` puts back
    /// what its lab's syringes held.
    pub fn set_counted_fill(&mut self, counted_ml: f64) {
        if counted_ml.is_finite() {
            let full = self.cfg.syringe_volume_ml.max(0.0);
            let gain = 1.0 + self.cfg.delivery_error;
            self.contents_ml = (full - (full - counted_ml) * gain).clamp(0.0, full);
        }
    }

    pub fn stall_after(&mut self, ml: Option<f64>) {
        self.stall_after_ml = ml;
    }

    pub fn snapshot(&self) -> PumpSnapshot {
        PumpSnapshot {
            t_s: self.t_s,
            running: self.run.is_some(),
            infusing: self.run.is_some_and(|r| r.dir == Dir::Infuse),
            diameter_mm: self.diameter_mm,
            rate_ml_per_min: self.rate_ml_per_min(),
            infused_ml: self.infused_ml,
            withdrawn_ml: self.withdrawn_ml,
            contents_ml: self.contents_ml,
            delivered_ml: self.delivered_ml,
            safe_mode: self.safe.is_some(),
            pending_alarm: self.alarm.map(|a| a.code().to_owned()),
        }
    }

    fn status_char(&self) -> char {
        match self.run {
            Some(r) if r.purge => 'X',
            Some(r) if r.dir == Dir::Withdraw => 'W',
            Some(_) => 'I',
            None => 'S',
        }
    }

    /// Executes one command payload; returns the reply payload, or `None` when the command is
    /// for another address.
    pub fn execute(&mut self, payload: &[u8]) -> Option<String> {
        let text: String = payload
            .iter()
            .filter(|b| **b != b' ')
            .map(|b| char::from(*b).to_ascii_uppercase())
            .collect();
        let (system, text) = match text.strip_prefix('*') {
            Some(rest) => (true, rest),
            None => (false, text.as_str()),
        };
        let digits = text.bytes().take(2).take_while(u8::is_ascii_digit).count();
        let (addr, body) = text.split_at(digits);
        let address = if addr.is_empty() {
            0
        } else {
            addr.parse::<u8>().unwrap_or(u8::MAX)
        };
        // `ADR` is a system command: accepted whatever address it carries.
        if !system && !body.starts_with("ADR") && address != self.cfg.address {
            return None;
        }
        if let Some(safe) = self.safe.as_mut() {
            safe.last_valid = Instant::now();
            safe.tripped = false;
        }
        if let Some(alarm) = self.alarm.take() {
            return Some(format!("{:02}{}", self.cfg.address, alarm.code()));
        }
        let result = self.command(body);
        // After `ADR n` the pump answers with its new address.
        let prefix = format!("{:02}", self.cfg.address);
        let reply = match result {
            Ok(data) => format!("{prefix}{}{data}", self.status_char()),
            Err(code) => format!("{prefix}{}{code}", self.status_char()),
        };
        Some(reply)
    }

    fn command(&mut self, body: &str) -> Result<String, &'static str> {
        let name_len = body
            .bytes()
            .take(3)
            .take_while(u8::is_ascii_alphabetic)
            .count();
        let (name, args) = body.split_at(name_len);
        let running = self.run.is_some();
        let number = |s: &str| parse_number(s).ok_or("?OOR");
        match (name, args) {
            ("", "") => Ok(String::new()),
            ("DIA", "") => format_number(self.diameter_mm).ok_or("?OOR"),
            ("DIA", v) => {
                if running {
                    return Err("?NA");
                }
                let d = number(v)?;
                if !(0.1..=80.0).contains(&d) {
                    return Err("?OOR");
                }
                self.diameter_mm = d;
                // Setting the diameter sets the volume units that fit it.
                self.volume_ul = None;
                Ok(String::new())
            }
            ("RAT", "") => Ok(format!(
                "{}{}",
                format_number(self.rate_value).ok_or("?OOR")?,
                self.rate_unit
            )),
            ("RAT", v) => {
                let cut = v.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(v.len());
                let (num, unit) = v.split_at(cut);
                let unit = match unit {
                    "" => self.rate_unit,
                    "UM" => "UM",
                    "MM" => "MM",
                    "UH" => "UH",
                    "MH" => "MH",
                    _ => return Err("?OOR"),
                };
                let value = number(num)?;
                let previous = (self.rate_value, self.rate_unit);
                self.rate_value = value;
                self.rate_unit = unit;
                let rate = self.rate_ml_per_min();
                if rate <= 0.0 || rate > self.max_rate_ml_per_min() {
                    (self.rate_value, self.rate_unit) = previous;
                    return Err("?OOR");
                }
                Ok(String::new())
            }
            ("VOL", "") => Ok(format!(
                "{}{}",
                format_number(self.to_unit(self.target_ml)).ok_or("?OOR")?,
                self.unit_code()
            )),
            ("VOL", v) => {
                if running {
                    return Err("?NA");
                }
                // `VOL UL` / `VOL ML` choose the volume units; the target keeps its volume.
                match v {
                    "UL" => {
                        self.volume_ul = Some(true);
                        return Ok(String::new());
                    }
                    "ML" => {
                        self.volume_ul = Some(false);
                        return Ok(String::new());
                    }
                    _ => {}
                }
                let cut = v.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(v.len());
                let (num, unit) = v.split_at(cut);
                if !unit.is_empty() {
                    return Err("?OOR");
                }
                let value = number(num)?;
                self.target_ml = self.unit_to_ml(value);
                Ok(String::new())
            }
            ("DIR", "") => Ok(match self.dir {
                Dir::Infuse => "INF".to_owned(),
                Dir::Withdraw => "WDR".to_owned(),
            }),
            ("DIR", v) => {
                if running {
                    return Err("?NA");
                }
                self.dir = match (v, self.dir) {
                    ("INF", _) | ("REV", Dir::Withdraw) => Dir::Infuse,
                    ("WDR", _) | ("REV", Dir::Infuse) => Dir::Withdraw,
                    _ => return Err("?OOR"),
                };
                Ok(String::new())
            }
            ("RUN", "") => {
                if running {
                    return Err("?NA");
                }
                if self.rate_ml_per_min() <= 0.0
                    || self.rate_ml_per_min() > self.max_rate_ml_per_min()
                {
                    return Err("?NA");
                }
                self.run = Some(Run {
                    dir: self.dir,
                    moved_ml: 0.0,
                    target_ml: (self.target_ml > 0.0).then_some(self.target_ml),
                    purge: false,
                });
                Ok(String::new())
            }
            ("STP", "") => {
                self.run = None;
                Ok(String::new())
            }
            ("PUR", "") => {
                if running {
                    return Err("?NA");
                }
                self.run = Some(Run {
                    dir: Dir::Infuse,
                    moved_ml: 0.0,
                    target_ml: None,
                    purge: true,
                });
                Ok(String::new())
            }
            ("DIS", "") => Ok(format!(
                "I{}W{}{}",
                format_number(self.to_unit(self.infused_ml)).ok_or("?OOR")?,
                format_number(self.to_unit(self.withdrawn_ml)).ok_or("?OOR")?,
                self.unit_code()
            )),
            ("CLD", v) => {
                if running {
                    return Err("?NA");
                }
                match v {
                    "INF" => self.infused_ml = 0.0,
                    "WDR" => self.withdrawn_ml = 0.0,
                    _ => return Err("?OOR"),
                }
                Ok(String::new())
            }
            ("VER", "") => Ok(self.cfg.firmware.clone()),
            // A query answers in the format its setting takes.
            ("ADR", "") => Ok(self.cfg.address.to_string()),
            ("ADR", v) => {
                let (addr, baud) = match v.split_once('B') {
                    Some((a, b)) => (a, Some(b)),
                    None => (v, None),
                };
                let addr: u8 = addr.parse().map_err(|_| "?OOR")?;
                if addr > 99 {
                    return Err("?OOR");
                }
                if let Some(baud) = baud
                    && !matches!(baud, "300" | "1200" | "2400" | "9600" | "19200")
                {
                    return Err("?OOR");
                }
                self.cfg.address = addr;
                Ok(String::new())
            }
            ("SAF", "") => Ok(self.safe.map_or(0, |s| s.watchdog_s).to_string()),
            ("SAF", v) => {
                let n: u16 = v.parse().map_err(|_| "?OOR")?;
                match n {
                    0 => self.safe = None,
                    1..=255 => {
                        self.safe = Some(Safe {
                            watchdog_s: n as u8,
                            last_valid: Instant::now(),
                            tripped: false,
                        })
                    }
                    _ => return Err("?OOR"),
                }
                Ok(String::new())
            }
            _ => Err("?"),
        }
    }
}

/// Input framing state of the pump's UART.
#[derive(Debug, Default)]
struct Input {
    line: Vec<u8>,
    /// Inside an `STX … ETX` frame while in basic mode: ignored.
    skipping: bool,
    frame: Vec<u8>,
}

struct Shared {
    model: Mutex<PumpModel>,
    input: Mutex<Input>,
    clock: Clock,
    /// Where delivered liquid is recorded: the world and this pump's device id there.
    world: Option<(World, String)>,
}

/// A simulated pump; clones share the same pump.
#[derive(Clone)]
pub struct SimPump {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for SimPump {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimPump")
            .field("address", &self.lock_raw().cfg.address)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl SimPump {
    /// A pump starting at the clock's current physical time. With `world`, delivered liquid is
    /// recorded for the sample the world places at `device_id`.
    pub fn new(config: PumpConfig, clock: Clock, world: Option<(World, String)>) -> Self {
        Self {
            shared: Arc::new(Shared {
                model: Mutex::new(PumpModel::new(config, clock.now_s())),
                input: Mutex::new(Input::default()),
                clock,
                world,
            }),
        }
    }

    pub fn config(&self) -> PumpConfig {
        self.lock_raw().cfg.clone()
    }

    /// Test/inspection view; advances the plunger to "now" first.
    pub fn snapshot(&self) -> PumpSnapshot {
        self.with_model(|m| m.snapshot())
    }

    /// Liquid delivered into the vessel up to now, g.
    pub fn delivered_g(&self) -> f64 {
        self.with_model(|m| m.delivered_ml * m.cfg.density_g_per_ml)
    }

    /// Advances to physical time `t_s` (for a balance integrating the vessel on its own grid);
    /// returns the liquid delivered up to then, g.
    pub fn delivered_g_at(&self, t_s: f64) -> f64 {
        let (delivered, total) = {
            let mut m = self.lock_raw();
            let d = m.advance_to(t_s);
            (d, m.delivered_ml * m.cfg.density_g_per_ml)
        };
        self.record(delivered);
        total
    }

    /// See [`PumpModel::set_counted_fill`].
    pub fn set_counted_fill(&self, counted_ml: f64) {
        self.with_model(|m| m.set_counted_fill(counted_ml));
    }

    /// Fault: the next run (or the current one) stalls after `ml` of counted volume.
    pub fn stall_after(&self, ml: Option<f64>) {
        self.with_model(|m| m.stall_after(ml));
    }

    /// Fault: power cut and restored (see the module docs).
    pub fn power_cycle(&self) {
        self.with_model(PumpModel::power_cycle);
        *lock(&self.shared.input) = Input::default();
    }

    fn lock_raw(&self) -> MutexGuard<'_, PumpModel> {
        lock(&self.shared.model)
    }

    /// Runs `f` on the model advanced to now, recording delivered liquid afterwards.
    fn with_model<T>(&self, f: impl FnOnce(&mut PumpModel) -> T) -> T {
        let (out, delivered) = {
            let mut m = self.lock_raw();
            let now = self.shared.clock.now_s();
            let mut delivered = m.check_watchdog(now, self.shared.clock.scale());
            delivered += m.advance_to(now);
            (f(&mut m), delivered)
        };
        self.record(delivered);
        out
    }

    fn record(&self, delivered_ml: f64) {
        if delivered_ml <= 0.0 {
            return;
        }
        if let Some((world, device)) = &self.shared.world {
            let reagent = self.lock_raw().cfg.reagent.clone();
            world.record_dispense_at(device, &reagent, delivered_ml);
        }
    }

    fn safe_mode(&self) -> bool {
        self.lock_raw().safe.is_some()
    }

    fn address(&self) -> u8 {
        self.lock_raw().cfg.address
    }

    /// Answers one request synchronously.
    pub fn respond(&self, request: Request) -> Option<Vec<u8>> {
        let safe_at_request = self.safe_mode();
        let payload = match request.kind {
            RequestKind::Corrupt if safe_at_request => {
                let status = self.with_model(|m| m.status_char());
                Some(format!("{:02}{status}?COM", self.address()))
            }
            RequestKind::Corrupt => None,
            RequestKind::Framed | RequestKind::Plain => {
                self.with_model(|m| m.execute(&request.bytes))
            }
        }?;
        let bytes = payload.into_bytes();
        Some(if safe_at_request {
            frame_safe(&bytes)
        } else {
            let mut out = vec![STX];
            out.extend_from_slice(&bytes);
            out.push(ETX);
            out
        })
    }
}

/// `STX len payload CRC ETX`.
fn frame_safe(payload: &[u8]) -> Vec<u8> {
    let mut out = vec![STX, (payload.len() + 4).min(255) as u8];
    out.extend_from_slice(payload);
    out.extend_from_slice(&crc16(payload).to_be_bytes());
    out.push(ETX);
    out
}

impl SerialDevice for SimPump {
    fn receive(&self, bytes: &[u8]) -> Vec<Request> {
        let safe = self.safe_mode();
        let mut input = lock(&self.shared.input);
        let mut out = Vec::new();
        if safe {
            input.frame.extend_from_slice(bytes);
            loop {
                let Some(start) = input.frame.iter().position(|b| *b == STX) else {
                    input.frame.clear();
                    break;
                };
                input.frame.drain(..start);
                let Some(&len) = input.frame.get(1) else {
                    break;
                };
                let len = usize::from(len);
                if !(4..=44).contains(&len) {
                    input.frame.drain(..1);
                    continue;
                }
                if input.frame.len() < len + 1 {
                    break;
                }
                let frame: Vec<u8> = input.frame.drain(..=len).collect();
                let payload = &frame[2..len - 2];
                let crc = u16::from_be_bytes([frame[len - 2], frame[len - 1]]);
                let kind = if frame[len] == ETX && crc16(payload) == crc {
                    RequestKind::Framed
                } else {
                    RequestKind::Corrupt
                };
                out.push(Request {
                    bytes: payload.to_vec(),
                    kind,
                });
            }
            return out;
        }
        for &b in bytes {
            if input.skipping {
                if b == ETX {
                    input.skipping = false;
                }
                continue;
            }
            match b {
                STX => {
                    input.skipping = true;
                    input.line.clear();
                }
                b'\r' => {
                    let line = std::mem::take(&mut input.line);
                    out.push(Request {
                        bytes: line,
                        kind: RequestKind::Plain,
                    });
                }
                0x20..=0x7E => {
                    if input.line.len() >= 64 {
                        input.line.clear();
                    }
                    input.line.push(b);
                }
                _ => {}
            }
        }
        out
    }

    fn answer(&self, request: Request) -> ReplyFuture {
        let reply = self.respond(request);
        Box::pin(std::future::ready(reply))
    }

    fn reset_input(&self) {
        *lock(&self.shared.input) = Input::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model() -> PumpModel {
        PumpModel::new(
            PumpConfig {
                power_up_alarm: false,
                ..PumpConfig::default()
            },
            0.0,
        )
    }

    fn cmd(m: &mut PumpModel, c: &str) -> String {
        m.execute(c.as_bytes()).unwrap()
    }

    #[test]
    fn dispenses_rate_times_time_up_to_the_target() {
        let mut m = model();
        assert_eq!(cmd(&mut m, "0DIA14.43"), "00S");
        assert_eq!(cmd(&mut m, "0RAT1.000MM"), "00S");
        assert_eq!(cmd(&mut m, "0VOL2.500"), "00S");
        assert_eq!(cmd(&mut m, "0DIR INF"), "00S");
        assert_eq!(cmd(&mut m, "0RUN"), "00I");
        m.advance_to(60.0);
        assert_eq!(cmd(&mut m, "0"), "00I");
        assert_eq!(cmd(&mut m, "0DIS"), "00II1.000W0.000ML");
        assert_eq!(cmd(&mut m, "0RUN"), "00I?NA");
        m.advance_to(1000.0);
        assert_eq!(cmd(&mut m, "0DIS"), "00SI2.500W0.000ML");
        assert!((m.snapshot().contents_ml - 7.5).abs() < 1e-9);
        assert_eq!(cmd(&mut m, "0CLDINF"), "00S");
        assert_eq!(cmd(&mut m, "0DIS"), "00SI0.000W0.000ML");
    }

    #[test]
    fn bad_numbers_and_commands_are_refused() {
        let mut m = model();
        assert_eq!(cmd(&mut m, "0DIA90"), "00S?OOR");
        assert_eq!(cmd(&mut m, "0DIA14.435"), "00S?OOR");
        assert_eq!(cmd(&mut m, "0RAT25MM"), "00S?OOR");
        assert_eq!(cmd(&mut m, "0RAT1.0XX"), "00S?OOR");
        assert_eq!(cmd(&mut m, "0XYZ"), "00S?");
        assert_eq!(cmd(&mut m, "0SAF300"), "00S?OOR");
        assert_eq!(m.execute(b"1DIS"), None);
        assert_eq!(cmd(&mut m, "DIS"), "00SI0.000W0.000ML");
    }

    #[test]
    fn alarms_are_reported_once_and_the_command_is_not_carried_out() {
        let mut m = model();
        cmd(&mut m, "0RAT1MM");
        cmd(&mut m, "0VOL5");
        m.stall_after(Some(1.0));
        cmd(&mut m, "0RUN");
        m.advance_to(600.0);
        assert_eq!(cmd(&mut m, "0DIS"), "00A?S");
        assert_eq!(cmd(&mut m, "0DIS"), "00SI1.000W0.000ML");
        m.power_cycle();
        assert_eq!(cmd(&mut m, "0CLDINF"), "00A?R");
        assert_eq!(cmd(&mut m, "0DIS"), "00SI0.000W0.000ML");
    }

    #[test]
    fn an_empty_syringe_stalls_the_motor() {
        let mut m = PumpModel::new(
            PumpConfig {
                contents_ml: 1.0,
                power_up_alarm: false,
                ..PumpConfig::default()
            },
            0.0,
        );
        cmd(&mut m, "0RAT1MM");
        cmd(&mut m, "0VOL2");
        cmd(&mut m, "0RUN");
        m.advance_to(600.0);
        assert_eq!(cmd(&mut m, "0"), "00A?S");
        assert_eq!(cmd(&mut m, "0DIS"), "00SI1.000W0.000ML");
        // Withdrawing refills, up to the syringe's end.
        cmd(&mut m, "0DIRWDR");
        cmd(&mut m, "0VOL20");
        cmd(&mut m, "0RUN");
        m.advance_to(6000.0);
        assert_eq!(cmd(&mut m, "0"), "00A?S");
        assert!((m.snapshot().contents_ml - 10.0).abs() < 1e-9);
    }

    #[test]
    fn adr_queries_and_sets_the_network_address() {
        let mut m = model();
        assert_eq!(cmd(&mut m, "*ADR"), "00S0");
        assert_eq!(cmd(&mut m, "ADR"), "00S0");
        // A system command: whatever address it carries.
        assert_eq!(cmd(&mut m, "7ADR"), "00S0");
        assert_eq!(cmd(&mut m, "*ADR 3"), "03S");
        assert_eq!(m.execute(b"0DIS"), None);
        assert_eq!(cmd(&mut m, "3DIS"), "03SI0.000W0.000ML");
        assert_eq!(cmd(&mut m, "*DIS"), "03SI0.000W0.000ML");
        assert_eq!(cmd(&mut m, "*ADR"), "03S3");
        assert_eq!(cmd(&mut m, "*ADR 5 B 1200"), "05S");
        assert_eq!(cmd(&mut m, "*ADR 100"), "05S?OOR");
        assert_eq!(cmd(&mut m, "*ADR 5 B 1234"), "05S?OOR");
        assert_eq!(cmd(&mut m, "*ADRX"), "05S?OOR");
        // Non-volatile: kept across a power cycle.
        m.power_cycle();
        assert_eq!(cmd(&mut m, "5"), "05A?R");
        assert_eq!(cmd(&mut m, "*ADR0"), "00S");
    }

    #[test]
    fn saf_without_a_number_queries_the_watchdog() {
        let mut m = model();
        assert_eq!(cmd(&mut m, "0SAF"), "00S0");
        assert_eq!(cmd(&mut m, "0SAF12"), "00S");
        assert_eq!(cmd(&mut m, "0SAF"), "00S12");
    }

    #[test]
    fn small_syringes_count_in_microlitres() {
        let mut m = model();
        cmd(&mut m, "0DIA4.78");
        cmd(&mut m, "0RAT100UM");
        cmd(&mut m, "0VOL250.0");
        assert_eq!(cmd(&mut m, "0VOL"), "00S250.0UL");
        cmd(&mut m, "0RUN");
        m.advance_to(600.0);
        assert_eq!(cmd(&mut m, "0DIS"), "00SI250.0W0.000UL");
        // `VOL ML` switches the units; the target stays the same volume.
        assert_eq!(cmd(&mut m, "0VOL ML"), "00S");
        assert_eq!(cmd(&mut m, "0VOL"), "00S0.250ML");
        assert_eq!(cmd(&mut m, "0DIS"), "00SI0.250W0.000ML");
        // A new diameter brings back the units that fit it.
        assert_eq!(cmd(&mut m, "0DIA4.78"), "00S");
        assert_eq!(cmd(&mut m, "0VOL"), "00S250.0UL");
    }
}
