//! A simulated Mettler Toledo balance speaking MT-SICS, weighing its station's vessel.
//!
//! # Physics
//!
//! The gross load is the container on the pan, plus whatever the station's pumps delivered
//! into it (their delivered volume × density, integrated on the pumps' own model), plus an
//! extra load a test may put on the pan. The displayed weight follows the load through a
//! first-order settling lag τ, plus a slow linear drift and Gaussian noise, rounded to the
//! readability. The reading is stable (`S`) once |d(displayed)/dt| has stayed below the
//! stability threshold for the stability window, dynamic (`D`) otherwise — so while a pump
//! runs, and for a few τ after it stops, the balance is unstable.
//!
//! # Protocol
//!
//! As the MT-SICS Reference Manual describes level 0/1 (read from the manual, independently of
//! the driver's protocol module). Lines end in `\r\n`. `S`, `T` and `Z` wait until stable, for
//! at most the balance's stability timeout (physical time, like every process inside the
//! simulated instrument), then answer `S I` / `T I` / `Z I`. `SI` answers at once, with the
//! reply identifier `S`: `S S <weight> g` when stable, `S D <weight> g` when dynamic. `ZI`
//! answers `ZI S` or `ZI D` after its zeroing. `T` tares with the current gross weight
//! (`T S <tare> g`), `TAC` clears the tare (`TAC A`), `TA` reports it (`TA A <tare> g`) and
//! `TA <value> g` presets it (`TA L` outside 0…capacity), `Z` sets the zero point (and clears
//! the tare, `Z A`), `@` resets (clears the tare, answers the serial number as `I4 A "…"`),
//! `I0`–`I5` identify. Gross load beyond the capacity answers `+` (`S +`, `Z +`, …), below
//! −1 % of it `-`. An unknown command answers `ES`; a known one with arguments it does not
//! take `EL`; a line with non-printable bytes (a corrupted command) `ET`.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use ppu_drivers::Clock;

use super::Station;
use crate::pty::{ReplyFuture, Request, SerialDevice};

/// Static properties of a simulated balance.
#[derive(Debug, Clone, PartialEq)]
pub struct BalanceConfig {
    /// Largest gross load, g.
    pub capacity_g: f64,
    /// Display resolution, g.
    pub readability_g: f64,
    /// Standard deviation of the reading noise, g.
    pub noise_g: f64,
    /// Linear drift of the reading, g/s.
    pub drift_g_per_s: f64,
    /// Settling time constant of the weighing cell, s.
    pub settle_tau_s: f64,
    /// |dm/dt| below which the reading may count as stable, g/s.
    pub stability_threshold_g_per_s: f64,
    /// How long |dm/dt| must stay below the threshold, s.
    pub stability_window_s: f64,
    /// How long `S`/`T`/`Z` wait for stability before `… I`, physical s.
    pub stability_timeout_s: f64,
    /// Container on the pan at start, g.
    pub container_g: f64,
    pub serial_number: String,
    pub model: String,
    pub seed: u64,
}

impl Default for BalanceConfig {
    /// An analytical balance (220 g × 0.1 mg) with a 20 g vial on the pan.
    fn default() -> Self {
        Self {
            capacity_g: 220.0,
            readability_g: 0.0001,
            noise_g: 0.00005,
            drift_g_per_s: 0.0,
            settle_tau_s: 1.0,
            stability_threshold_g_per_s: 0.0005,
            stability_window_s: 0.5,
            stability_timeout_s: 10.0,
            container_g: 20.0,
            serial_number: "B123456789".to_owned(),
            model: "XPE205".to_owned(),
            seed: 7,
        }
    }
}

/// Integration step of the settling lag, physical s.
const STEP_S: f64 = 0.05;
/// Above this many steps in one catch-up the state jumps (idle balances read rarely).
const MAX_STEPS: u64 = 200_000;

/// The deterministic balance model; the load comes from a callback so tests can drive it.
#[derive(Debug, Clone)]
pub struct BalanceModel {
    cfg: BalanceConfig,
    t_s: f64,
    displayed_g: f64,
    stable_for_s: f64,
    zero_g: f64,
    tare_g: f64,
    extra_g: f64,
    rng: u64,
}

impl BalanceModel {
    pub fn new(cfg: BalanceConfig, t_s: f64, load_g: f64) -> Self {
        Self {
            t_s,
            displayed_g: cfg.container_g + load_g,
            stable_for_s: cfg.stability_window_s,
            zero_g: 0.0,
            tare_g: 0.0,
            extra_g: 0.0,
            rng: cfg.seed,
            cfg,
        }
    }

    fn gross_true(&self, load_g: f64) -> f64 {
        self.cfg.container_g + self.extra_g + load_g
    }

    /// Advances to `t_s`; `load_at(t)` is the vessel's load at physical time `t`.
    pub fn advance_to(&mut self, t_s: f64, mut load_at: impl FnMut(f64) -> f64) {
        let dt_total = t_s - self.t_s;
        if dt_total <= 0.0 {
            return;
        }
        let tau = self.cfg.settle_tau_s.max(1e-3);
        let steps = (dt_total / STEP_S).ceil() as u64;
        if steps > MAX_STEPS {
            let target = self.gross_true(load_at(t_s));
            self.displayed_g = target;
            self.stable_for_s = self.cfg.stability_window_s;
            self.t_s = t_s;
            return;
        }
        let mut t = self.t_s;
        while t < t_s {
            let dt = STEP_S.min(t_s - t);
            t += dt;
            let target = self.gross_true(load_at(t));
            self.displayed_g += (target - self.displayed_g) * (1.0 - (-dt / tau).exp());
            let slope = ((target - self.displayed_g) / tau + self.cfg.drift_g_per_s).abs();
            if slope < self.cfg.stability_threshold_g_per_s {
                self.stable_for_s += dt;
            } else {
                self.stable_for_s = 0.0;
            }
        }
        self.t_s = t_s;
    }

    pub fn is_stable(&self) -> bool {
        self.stable_for_s >= self.cfg.stability_window_s
    }

    fn gauss(&mut self) -> f64 {
        // splitmix64 + Box-Muller: reproducible for a given seed.
        let mut next = || {
            self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.rng;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            ((z >> 11) as f64 + 0.5) / (1u64 << 53) as f64
        };
        let (u1, u2) = (next(), next());
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }

    /// The gross reading now (drift and noise included, not rounded).
    fn gross_reading(&mut self) -> f64 {
        let noise = self.cfg.noise_g * self.gauss();
        self.displayed_g + self.cfg.drift_g_per_s * self.t_s + noise
    }

    fn round(&self, g: f64) -> f64 {
        let d = self.cfg.readability_g;
        // `+ 0.0` turns a rounded −0 into 0, which a balance never prints.
        if d > 0.0 {
            (g / d).round() * d + 0.0
        } else {
            g
        }
    }

    /// Overload / underload of the gross load relative to the zero point.
    fn range_error(&self) -> Option<&'static str> {
        let gross = self.displayed_g - self.zero_g;
        if gross > self.cfg.capacity_g {
            Some("+")
        } else if gross < -0.01 * self.cfg.capacity_g {
            Some("-")
        } else {
            None
        }
    }

    fn weight_line(&mut self, id: &str, stable: bool) -> String {
        if let Some(e) = self.range_error() {
            return format!("{id} {e}");
        }
        let raw = self.gross_reading() - self.zero_g - self.tare_g;
        let net = self.round(raw);
        let decimals = decimals_of(self.cfg.readability_g);
        format!(
            "{id} {} {} g",
            if stable { "S" } else { "D" },
            weight_field(net, decimals)
        )
    }
}

/// A weight value right-aligned in a 10-character field, as the manual's examples print it
/// (`S S     100.00 g`).
fn weight_field(value: f64, decimals: usize) -> String {
    format!("{value:>10.decimals$}")
}

fn decimals_of(readability: f64) -> usize {
    let mut d = 0;
    let mut r = readability;
    while d < 6 && r > 0.0 && (r - r.round()).abs() > 1e-9 {
        r *= 10.0;
        d += 1;
    }
    d
}

struct Shared {
    model: Mutex<BalanceModel>,
    input: Mutex<Vec<u8>>,
    station: Station,
    clock: Clock,
}

/// A simulated balance under a station's vessel; clones share it.
#[derive(Clone)]
pub struct SimBalance {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for SimBalance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimBalance").finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Inspection view (not reachable over the wire).
#[derive(Debug, Clone, PartialEq)]
pub struct BalanceSnapshot {
    pub t_s: f64,
    /// Displayed gross weight (settling included, no noise), g.
    pub displayed_g: f64,
    /// True gross load, g.
    pub load_g: f64,
    pub tare_g: f64,
    pub stable: bool,
}

impl SimBalance {
    pub fn new(config: BalanceConfig, station: Station, clock: Clock) -> Self {
        let now = clock.now_s();
        let load = station.load_g_at(now);
        Self {
            shared: Arc::new(Shared {
                model: Mutex::new(BalanceModel::new(config, now, load)),
                input: Mutex::new(Vec::new()),
                station,
                clock,
            }),
        }
    }

    pub fn station(&self) -> &Station {
        &self.shared.station
    }

    fn lock_now(&self) -> MutexGuard<'_, BalanceModel> {
        let mut m = lock(&self.shared.model);
        let now = self.shared.clock.now_s();
        let station = &self.shared.station;
        m.advance_to(now, |t| station.load_g_at(t));
        m
    }

    pub fn snapshot(&self) -> BalanceSnapshot {
        let m = self.lock_now();
        BalanceSnapshot {
            t_s: m.t_s,
            displayed_g: m.displayed_g,
            load_g: m.gross_true(self.shared.station.load_g_at(m.t_s)),
            tare_g: m.tare_g,
            stable: m.is_stable(),
        }
    }

    /// Fault/test: extra mass on the pan, g (e.g. 500 for an overload).
    pub fn set_extra_load(&self, g: f64) {
        self.lock_now().extra_g = g;
    }

    /// Answers one command line; waits (on the physical clock) for stability where the
    /// command does.
    pub async fn respond(&self, line: Vec<u8>) -> String {
        if !line.iter().all(|b| (0x20..=0x7E).contains(b)) {
            return "ET".to_owned();
        }
        let text = String::from_utf8_lossy(&line).trim().to_owned();
        let (name, args) = text.split_once(' ').unwrap_or((text.as_str(), ""));
        let args = args.trim();
        if !args.is_empty() {
            return match name {
                "TA" => self.preset_tare(args),
                "S" | "SI" | "Z" | "ZI" | "T" | "TAC" | "@" | "I0" | "I1" | "I2" | "I3" | "I4"
                | "I5" => "EL".to_owned(),
                _ => "ES".to_owned(),
            };
        }
        match text.as_str() {
            "S" | "T" | "Z" => self.when_stable(&text).await,
            // Send immediately: answered with the identifier `S`, never `SI`.
            "SI" => {
                let mut m = self.lock_now();
                let stable = m.is_stable();
                m.weight_line("S", stable)
            }
            "ZI" => {
                let mut m = self.lock_now();
                if let Some(e) = m.range_error() {
                    return format!("ZI {e}");
                }
                m.zero_g = m.displayed_g;
                m.tare_g = 0.0;
                format!("ZI {}", if m.is_stable() { "S" } else { "D" })
            }
            "TA" => {
                let m = self.lock_now();
                let decimals = decimals_of(m.cfg.readability_g);
                format!("TA A {} g", weight_field(m.tare_g, decimals))
            }
            "TAC" => {
                self.lock_now().tare_g = 0.0;
                "TAC A".to_owned()
            }
            "@" => {
                let mut m = self.lock_now();
                m.tare_g = 0.0;
                format!("I4 A \"{}\"", m.cfg.serial_number)
            }
            "I0" => "I0 B 0 \"I0\"\r\nI0 B 0 \"I1\"\r\nI0 B 0 \"I2\"\r\nI0 B 0 \"I3\"\r\n\
                     I0 B 0 \"I4\"\r\nI0 B 0 \"I5\"\r\nI0 B 1 \"S\"\r\nI0 B 1 \"SI\"\r\n\
                     I0 B 1 \"T\"\r\nI0 B 1 \"TA\"\r\nI0 B 1 \"TAC\"\r\nI0 B 1 \"Z\"\r\n\
                     I0 B 1 \"ZI\"\r\nI0 A 1 \"@\""
                .to_owned(),
            "I1" => "I1 A \"01\" \"2.20\" \"2.20\" \"\" \"\"".to_owned(),
            "I2" => {
                let m = self.lock_now();
                let decimals = decimals_of(m.cfg.readability_g);
                format!("I2 A \"{} {:.decimals$} g\"", m.cfg.model, m.cfg.capacity_g)
            }
            "I3" => "I3 A \"1.10.18\"".to_owned(),
            "I4" => format!("I4 A \"{}\"", self.lock_now().cfg.serial_number),
            "I5" => "I5 A \"11671158C\"".to_owned(),
            _ => "ES".to_owned(),
        }
    }

    /// `TA <value> <unit>`: presets the tare; `TA L` when the value is out of range.
    fn preset_tare(&self, args: &str) -> String {
        let mut parts = args.split_whitespace();
        let (Some(value), Some("g"), None) = (parts.next(), parts.next(), parts.next()) else {
            return "EL".to_owned();
        };
        let Ok(value) = value.parse::<f64>() else {
            return "EL".to_owned();
        };
        let mut m = self.lock_now();
        if !(value.is_finite() && (0.0..=m.cfg.capacity_g).contains(&value)) {
            return "TA L".to_owned();
        }
        m.tare_g = m.round(value);
        let decimals = decimals_of(m.cfg.readability_g);
        format!("TA A {} g", weight_field(m.tare_g, decimals))
    }

    async fn when_stable(&self, command: &str) -> String {
        let clock = self.shared.clock;
        let start = clock.now_s();
        loop {
            {
                let mut m = self.lock_now();
                if let Some(e) = m.range_error() {
                    return format!("{command} {e}");
                }
                if m.is_stable() {
                    return match command {
                        "S" => m.weight_line("S", true),
                        "T" => {
                            let raw = m.gross_reading() - m.zero_g;
                            let gross = m.round(raw);
                            m.tare_g = gross;
                            let decimals = decimals_of(m.cfg.readability_g);
                            format!("T S {} g", weight_field(gross, decimals))
                        }
                        _ => {
                            m.zero_g = m.displayed_g;
                            m.tare_g = 0.0;
                            "Z A".to_owned()
                        }
                    };
                }
                if clock.now_s() - start > m.cfg.stability_timeout_s {
                    return format!("{command} I");
                }
            }
            let step = clock.to_real(STEP_S).max(Duration::from_millis(1));
            tokio::time::sleep(step).await;
        }
    }
}

impl SerialDevice for SimBalance {
    fn receive(&self, bytes: &[u8]) -> Vec<Request> {
        let mut input = lock(&self.shared.input);
        input.extend_from_slice(bytes);
        let mut out = Vec::new();
        while let Some(i) = input.windows(2).position(|w| w == b"\r\n") {
            let line: Vec<u8> = input.drain(..i + 2).take(i).collect();
            if !line.is_empty() {
                out.push(Request {
                    bytes: line,
                    kind: crate::pty::RequestKind::Plain,
                });
            }
        }
        if input.len() > 256 {
            input.clear();
        }
        out
    }

    fn answer(&self, request: Request) -> ReplyFuture {
        let this = self.clone();
        Box::pin(async move {
            let mut reply = this.respond(request.bytes).await.into_bytes();
            reply.extend_from_slice(b"\r\n");
            Some(reply)
        })
    }

    fn reset_input(&self) {
        lock(&self.shared.input).clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model() -> BalanceModel {
        BalanceModel::new(
            BalanceConfig {
                noise_g: 0.0,
                ..BalanceConfig::default()
            },
            0.0,
            0.0,
        )
    }

    #[test]
    fn the_reading_settles_and_becomes_stable() {
        let mut m = model();
        assert!(m.is_stable());
        // 2.5 g poured in over 150 s at a constant rate.
        let load = |t: f64| (t / 150.0).clamp(0.0, 1.0) * 2.5;
        m.advance_to(75.0, load);
        assert!(!m.is_stable(), "unstable while the pump runs");
        m.advance_to(151.0, load);
        assert!(!m.is_stable(), "still settling right after");
        m.advance_to(170.0, load);
        assert!(m.is_stable());
        assert!((m.displayed_g - 22.5).abs() < 1e-4, "{}", m.displayed_g);
        assert_eq!(m.weight_line("S", true), "S S    22.5000 g");
        m.tare_g = 22.5;
        assert_eq!(m.weight_line("S", true), "S S     0.0000 g");
    }

    #[test]
    fn overload_and_underload() {
        let mut m = model();
        m.extra_g = 500.0;
        m.advance_to(60.0, |_| 0.0);
        assert_eq!(m.weight_line("S", true), "S +");
        m.extra_g = -30.0;
        m.advance_to(120.0, |_| 0.0);
        assert_eq!(m.weight_line("S", false), "S -");
    }

    fn balance(config: BalanceConfig) -> SimBalance {
        SimBalance::new(config, Station::new(), Clock::real())
    }

    /// Paused tokio time: the clock (physical time) moves only when the test advances it.
    #[tokio::test(start_paused = true)]
    async fn si_answers_with_the_s_identifier_stable_or_dynamic() {
        let b = balance(BalanceConfig {
            noise_g: 0.0,
            ..BalanceConfig::default()
        });
        assert_eq!(b.respond(b"SI".to_vec()).await, "S S    20.0000 g");
        // A load put on the pan: the cell is still settling, so the weight is dynamic.
        b.set_extra_load(5.0);
        tokio::time::advance(Duration::from_millis(500)).await;
        let reply = b.respond(b"SI".to_vec()).await;
        assert!(reply.starts_with("S D "), "{reply}");
        assert!(reply.ends_with(" g"), "{reply}");
        tokio::time::advance(Duration::from_secs(30)).await;
        assert_eq!(b.respond(b"SI".to_vec()).await, "S S    25.0000 g");
        b.set_extra_load(500.0);
        tokio::time::advance(Duration::from_secs(30)).await;
        assert_eq!(b.respond(b"SI".to_vec()).await, "S +");
        b.set_extra_load(-30.0);
        tokio::time::advance(Duration::from_secs(30)).await;
        assert_eq!(b.respond(b"SI".to_vec()).await, "S -");
    }

    #[tokio::test]
    async fn errors_and_identification() {
        let b = balance(BalanceConfig::default());
        assert_eq!(b.respond(b"XYZ".to_vec()).await, "ES");
        assert_eq!(b.respond(b"SI 3".to_vec()).await, "EL");
        assert_eq!(b.respond(b"S\x01".to_vec()).await, "ET");
        assert_eq!(b.respond(b"TA 500 g".to_vec()).await, "TA L");
        assert_eq!(b.respond(b"TA 1.5 g".to_vec()).await, "TA A     1.5000 g");
        assert_eq!(b.respond(b"TAC".to_vec()).await, "TAC A");
        assert_eq!(b.respond(b"@".to_vec()).await, "I4 A \"B123456789\"");
        assert_eq!(
            b.respond(b"I2".to_vec()).await,
            "I2 A \"XPE205 220.0000 g\""
        );
    }

    #[test]
    fn readability_sets_the_decimals() {
        assert_eq!(decimals_of(0.0001), 4);
        assert_eq!(decimals_of(0.01), 2);
        assert_eq!(decimals_of(1.0), 0);
    }
}
