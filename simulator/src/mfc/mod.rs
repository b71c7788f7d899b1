//! A simulated Alicat-style mass-flow controller on a real pseudo-terminal.
//!
//! # Protocol
//!
//! Read from Alicat's documentation independently of the driver (no code shared with
//! `ppu_drivers::mfc`): the MC-Series operating manual's "RS-232 / RS-485 Output and Input"
//! (polling, data format, gas select, sending a setpoint, gas numbers) and the Alicat Serial
//! Communications Primer ("Command Description Format", "Status/Error Codes"). Commands are
//! one line ending in `<CR>` (a following `<LF>` is ignored), not case-sensitive, and start
//! with the unit id; a line for another unit id gets no reply, as on a multi-drop line.
//!
//! - `A` → the data frame
//!   `A +014.70 +025.00 +000.00 +000.00 +000.00 CO2`: unit id, absolute pressure (PSIA),
//!   temperature (°C), volumetric flow, mass flow, setpoint (device units), gas, then any
//!   status words (`ADC`, `OPL`, `MOV`, …).
//! - `AS <value>` (or `AS<value>`) → new setpoint in device units, answered with the frame.
//!   The simulated firmware clamps it to 0…full scale.
//! - `AG <n>` (or `AG<n>`) → select gas number `n`, answered with the frame; a number not in
//!   the gas table is an unknown command.
//! - Anything else → `A ?`.
//!
//! # Physics
//!
//! The mass flow follows the setpoint as a first-order lag with time constant `tau_s` on the
//! physical [`Clock`], advanced lazily on every exchange (exactly: the setpoint is constant
//! between commands). The volumetric flow is the mass flow at line conditions against
//! Alicat's standard conditions (25 °C, 14.696 PSIA). Readings carry seeded Gaussian noise.
//!
//! # Faults
//!
//! [`SimMfc::set_fault`] switches a device fault on or off: a sensor fault (`ADC` in the frame,
//! the mass flow reads 0), an over-pressure (`OPL`, the inlet pressure reads high) or a stuck
//! valve (the flow stops following the setpoint; the frame shows nothing, as on a real
//! controller). Line faults (no reply, garbage, dropped bytes, unplugging) are the pty's:
//! [`PtyServer::faults`] and [`PtyServer::unplug`].

pub mod cli;
pub mod plugin;

/// The family's registration as a simulator plugin.
pub static SIM: plugin::MfcFamily = plugin::MfcFamily;

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use ppu_drivers::Clock;

use crate::pty::{FaultConfig, PtyServer, ReplyFuture, Request, RequestKind, SerialDevice};

/// Alicat's standard conditions for volumetric ↔ mass conversion.
const STD_PRESSURE_PSIA: f64 = 14.696;
const STD_TEMPERATURE_K: f64 = 298.15;

/// Gas numbers and the names the frame prints (MC-Series manual, "Gas Lists with
/// Viscosities, Densities and Compressibilities"; helium is 7, oxygen 11, neon 10 in its own
/// examples). The simulator's own copy.
const GAS_TABLE: [&str; 20] = [
    "Air", "Ar", "CH4", "CO", "CO2", "C2H6", "H2", "He", "N2", "N2O", "Ne", "O2", "C3H8", "nC4H10",
    "C2H2", "C2H4", "iC4H10", "Kr", "Xe", "SF6",
];

/// A device fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MfcFault {
    /// The flow sensor's converter fails: `ADC`, mass and volumetric flow read 0.
    Sensor,
    /// Inlet pressure above the limit: `OPL`, pressure reads [`MfcConfig::overpressure_psia`].
    OverPressure,
    /// The valve sticks where it is: the flow stops following the setpoint, nothing in the
    /// frame says so.
    ValveStuck,
}

/// Static properties of a simulated controller.
#[derive(Debug, Clone, PartialEq)]
pub struct MfcConfig {
    /// `A`–`Z`.
    pub unit_id: char,
    /// Full scale in device units.
    pub full_scale: f64,
    /// Time constant of the flow response, physical s.
    pub tau_s: f64,
    pub pressure_psia: f64,
    pub temperature_c: f64,
    /// Pressure shown during an over-pressure fault, PSIA.
    pub overpressure_psia: f64,
    /// Gas number at power-up.
    pub gas: u8,
    /// Standard deviation of the flow reading noise, fraction of full scale.
    pub noise_fs: f64,
    pub seed: u64,
}

impl Default for MfcConfig {
    /// A 500 SCCM controller (unit A) on CO2 at 14.70 PSIA and 25 °C, τ = 0.5 s, no noise.
    fn default() -> Self {
        Self {
            unit_id: 'A',
            full_scale: 500.0,
            tau_s: 0.5,
            pressure_psia: 14.70,
            temperature_c: 25.0,
            overpressure_psia: 160.0,
            gas: 4,
            noise_fs: 0.0,
            seed: 11,
        }
    }
}

#[derive(Debug)]
struct State {
    cfg: MfcConfig,
    t_s: f64,
    mass_flow: f64,
    setpoint: f64,
    gas: u8,
    fault: Option<MfcFault>,
    rng: u64,
    input: Vec<u8>,
    commands: u64,
}

impl State {
    fn advance(&mut self, t_s: f64) {
        let dt = t_s - self.t_s;
        if dt <= 0.0 {
            return;
        }
        self.t_s = t_s;
        if self.fault == Some(MfcFault::ValveStuck) {
            return;
        }
        let tau = self.cfg.tau_s.max(1e-6);
        self.mass_flow = self.setpoint + (self.mass_flow - self.setpoint) * (-dt / tau).exp();
    }

    fn gauss(&mut self) -> f64 {
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

    fn frame(&mut self) -> String {
        let noise = if self.cfg.noise_fs > 0.0 {
            self.cfg.noise_fs * self.cfg.full_scale * self.gauss()
        } else {
            0.0
        };
        let mut status = Vec::new();
        let mut pressure = self.cfg.pressure_psia;
        let mut mass = self.mass_flow + noise;
        match self.fault {
            Some(MfcFault::Sensor) => {
                mass = 0.0;
                status.push("ADC");
            }
            Some(MfcFault::OverPressure) => {
                pressure = self.cfg.overpressure_psia;
                status.push("OPL");
            }
            Some(MfcFault::ValveStuck) | None => {}
        }
        let temperature_k = self.cfg.temperature_c + 273.15;
        let volumetric =
            mass * (STD_PRESSURE_PSIA / pressure) * (temperature_k / STD_TEMPERATURE_K);
        // Beyond 10 % over full scale the flow sensor is out of its range.
        if mass > 1.1 * self.cfg.full_scale {
            status.push("MOV");
        }
        let gas = GAS_TABLE
            .get(usize::from(self.gas))
            .copied()
            .unwrap_or("Air");
        let mut line = format!(
            "{} {} {} {} {} {} {gas}",
            self.cfg.unit_id,
            reading(pressure),
            reading(self.cfg.temperature_c),
            reading(volumetric),
            reading(mass),
            reading(self.setpoint),
        );
        for word in status {
            line.push(' ');
            line.push_str(word);
        }
        line.push('\r');
        line
    }
}

/// A reading as the frame prints it: sign, at least three integer digits, two decimals
/// (`+014.70`, `-000.02`). A value that rounds to zero prints `+000.00`.
fn reading(v: f64) -> String {
    let v = if v.is_finite() { v } else { 0.0 };
    let rounded = (v * 100.0).round() / 100.0;
    let rounded = if rounded == 0.0 { 0.0 } else { rounded };
    format!("{rounded:+07.2}")
}

/// A simulated controller. Clones share the same device.
#[derive(Debug, Clone)]
pub struct SimMfc {
    state: Arc<Mutex<State>>,
    clock: Clock,
}

impl SimMfc {
    pub fn new(cfg: MfcConfig, clock: Clock) -> Self {
        let state = State {
            t_s: clock.now_s(),
            mass_flow: 0.0,
            setpoint: 0.0,
            gas: cfg.gas,
            fault: None,
            rng: cfg.seed,
            input: Vec::new(),
            commands: 0,
            cfg,
        };
        Self {
            state: Arc::new(Mutex::new(state)),
            clock,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Switches a device fault on (`Some`) or off.
    pub fn set_fault(&self, fault: Option<MfcFault>) {
        let now = self.clock.now_s();
        let mut s = self.lock();
        s.advance(now);
        s.fault = fault;
    }

    /// The setpoint in force, device units.
    pub fn setpoint(&self) -> f64 {
        self.lock().setpoint
    }

    /// The true mass flow now, device units (no noise, no fault).
    pub fn mass_flow(&self) -> f64 {
        let now = self.clock.now_s();
        let mut s = self.lock();
        s.advance(now);
        s.mass_flow
    }

    /// The selected gas's name.
    pub fn gas(&self) -> &'static str {
        GAS_TABLE
            .get(usize::from(self.lock().gas))
            .copied()
            .unwrap_or("Air")
    }

    /// Commands answered since start (for tests: what reached the device).
    pub fn commands(&self) -> u64 {
        self.lock().commands
    }

    /// Answers one command line (without its `<CR>`); `None` = not for this unit.
    pub fn respond(&self, line: &[u8]) -> Option<String> {
        let now = self.clock.now_s();
        let mut s = self.lock();
        s.advance(now);
        let text = String::from_utf8_lossy(line).trim().to_ascii_uppercase();
        let mut chars = text.chars();
        let id = chars.next()?;
        if id != s.cfg.unit_id.to_ascii_uppercase() && id != '*' {
            return None;
        }
        s.commands += 1;
        let unit = s.cfg.unit_id;
        let args = chars.as_str();
        let unknown = || Some(format!("{unit} ?\r"));
        if args.is_empty() {
            return Some(s.frame());
        }
        if let Some(value) = args.strip_prefix('S') {
            let Some(v) = number(value.trim()) else {
                return unknown();
            };
            s.setpoint = v.clamp(0.0, s.cfg.full_scale);
            return Some(s.frame());
        }
        if let Some(n) = args.strip_prefix('G') {
            let Some(n) = n
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|n| usize::from(*n) < GAS_TABLE.len())
            else {
                return unknown();
            };
            s.gas = n;
            return Some(s.frame());
        }
        unknown()
    }
}

/// A setpoint argument: optional sign, digits, at most one point.
fn number(s: &str) -> Option<f64> {
    let body = s.strip_prefix(['+', '-']).unwrap_or(s);
    let ok = !body.is_empty()
        && body.bytes().all(|b| b.is_ascii_digit() || b == b'.')
        && body.bytes().filter(|b| *b == b'.').count() <= 1
        && body.bytes().any(|b| b.is_ascii_digit());
    ok.then(|| s.parse().ok()).flatten()
}

impl SerialDevice for SimMfc {
    fn receive(&self, bytes: &[u8]) -> Vec<Request> {
        let mut s = self.lock();
        let mut out = Vec::new();
        for &b in bytes {
            match b {
                b'\r' => {
                    let line = std::mem::take(&mut s.input);
                    if !line.is_empty() {
                        out.push(Request {
                            bytes: line,
                            kind: RequestKind::Plain,
                        });
                    }
                }
                b'\n' => {}
                _ if s.input.len() < 256 => s.input.push(b),
                // An endless line is noise: drop it.
                _ => s.input.clear(),
            }
        }
        out
    }

    fn answer(&self, request: Request) -> ReplyFuture {
        let reply = self.respond(&request.bytes).map(String::into_bytes);
        Box::pin(std::future::ready(reply))
    }

    fn reset_input(&self) {
        self.lock().input.clear();
    }
}

/// A controller served on its own pty.
#[derive(Debug)]
pub struct RunningMfc {
    pub id: String,
    pub sim: SimMfc,
    pub port: PtyServer,
}

impl RunningMfc {
    /// Plugs a controller in on a new pty (a symlink `link_dir/<id>` when given).
    pub async fn start(
        id: impl Into<String>,
        cfg: MfcConfig,
        faults: FaultConfig,
        link_dir: Option<PathBuf>,
        clock: Clock,
    ) -> std::io::Result<RunningMfc> {
        let id = id.into();
        let sim = SimMfc::new(cfg, clock);
        let link = link_dir.map(|d| d.join(&id));
        let port = PtyServer::start(Arc::new(sim.clone()), faults, link).await?;
        Ok(RunningMfc { id, sim, port })
    }

    /// The path a driver opens.
    pub fn path(&self) -> String {
        self.port.path()
    }

    pub async fn shutdown(self) {
        self.port.shutdown().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn sim() -> SimMfc {
        SimMfc::new(MfcConfig::default(), Clock::new(1.0))
    }

    fn ask(sim: &SimMfc, line: &str) -> Option<String> {
        sim.respond(line.as_bytes())
    }

    #[tokio::test(start_paused = true)]
    async fn polls_answer_the_manual_frame() {
        let s = sim();
        assert_eq!(
            ask(&s, "A").as_deref(),
            Some("A +014.70 +025.00 +000.00 +000.00 +000.00 CO2\r")
        );
        // Not case-sensitive; another unit's command is not answered.
        assert!(ask(&s, "a").is_some());
        assert_eq!(ask(&s, "B"), None);
        assert_eq!(ask(&s, "AX").as_deref(), Some("A ?\r"));
        assert_eq!(ask(&s, "AS abc").as_deref(), Some("A ?\r"));
        assert_eq!(ask(&s, "AG99").as_deref(), Some("A ?\r"));
    }

    #[tokio::test(start_paused = true)]
    async fn flow_follows_the_setpoint_with_a_first_order_lag() {
        let s = sim();
        let reply = ask(&s, "AS 50.0").unwrap_or_default();
        assert!(reply.ends_with("+000.00 +000.00 +050.00 CO2\r"), "{reply}");
        // One time constant: 1 - 1/e of the step.
        tokio::time::advance(Duration::from_millis(500)).await;
        let m = s.mass_flow();
        assert!((m - 50.0 * (1.0 - (-1.0f64).exp())).abs() < 0.5, "{m}");
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!((s.mass_flow() - 50.0).abs() < 1e-3);
        // Full scale clamps the setpoint.
        ask(&s, "AS600");
        assert_eq!(s.setpoint(), 500.0);
        ask(&s, "AS -5");
        assert_eq!(s.setpoint(), 0.0);
    }

    #[tokio::test(start_paused = true)]
    async fn gas_select_and_faults_show_in_the_frame() {
        let s = sim();
        let reply = ask(&s, "AG7").unwrap_or_default();
        assert!(reply.ends_with(" He\r"), "{reply}");
        assert!(ask(&s, "AG 8").unwrap_or_default().ends_with(" N2\r"));
        ask(&s, "AS 100");
        tokio::time::advance(Duration::from_secs(10)).await;
        s.set_fault(Some(MfcFault::Sensor));
        let reply = ask(&s, "A").unwrap_or_default();
        assert!(
            reply.ends_with("+000.00 +000.00 +100.00 N2 ADC\r"),
            "{reply}"
        );
        s.set_fault(Some(MfcFault::OverPressure));
        let reply = ask(&s, "A").unwrap_or_default();
        assert!(
            reply.starts_with("A +160.00 ") && reply.ends_with(" OPL\r"),
            "{reply}"
        );
        // A stuck valve keeps the flow where it was whatever the setpoint.
        s.set_fault(Some(MfcFault::ValveStuck));
        ask(&s, "AS 0");
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!((s.mass_flow() - 100.0).abs() < 1e-3);
        s.set_fault(None);
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(s.mass_flow().abs() < 1e-3);
    }

    #[test]
    fn requests_split_on_cr_and_survive_noise() {
        let s = sim();
        let reqs = s.receive(b"A\r\nAS 5");
        assert_eq!(reqs.len(), 1);
        assert_eq!(reqs[0].bytes, b"A");
        let reqs = s.receive(b"0.0\r");
        assert_eq!(reqs[0].bytes, b"AS 50.0");
        assert!(s.receive(&[b'x'; 1000]).is_empty());
        assert_eq!(reading(-0.001), "+000.00");
        assert_eq!(reading(14.7), "+014.70");
        assert_eq!(reading(-0.02), "-000.02");
        assert_eq!(reading(1000.0), "+1000.00");
    }

    #[tokio::test]
    async fn noise_is_seeded() {
        let cfg = MfcConfig {
            noise_fs: 0.01,
            ..MfcConfig::default()
        };
        let a = SimMfc::new(cfg.clone(), Clock::new(1.0));
        let b = SimMfc::new(cfg, Clock::new(1.0));
        let fa: Vec<_> = (0..5).map(|_| a.respond(b"A")).collect();
        let fb: Vec<_> = (0..5).map(|_| b.respond(b"A")).collect();
        assert_eq!(fa, fb);
    }
}
