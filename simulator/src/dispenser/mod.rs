//! Simulated dispensing stations: NE-1000 syringe pumps and an MT-SICS balance sharing one
//! physical vessel, each served on its own real pseudo-terminal ([`crate::pty`]).
//!
//! - [`pump`]: the pump's firmware and plunger physics;
//! - [`balance`]: the balance's firmware and weighing cell;
//! - [`Station`]: the vessel — the balance's load is what the station's pumps delivered;
//! - [`SimStation`]: pumps and balance started together on ptys, as `ppu-sim dispenser` and
//!   `ppud dev` run them.

pub mod balance;
pub mod pump;

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use ppu_drivers::Clock;

use crate::pty::{FaultConfig, PtyServer, ReplyFuture, Request, SerialDevice};
use crate::world::World;
use balance::{BalanceConfig, SimBalance};
use pump::{PumpConfig, SimPump};

/// The vessel of a station: what its pumps delivered, minus what was there when the vessel
/// was last swapped.
#[derive(Clone, Default)]
pub struct Station {
    pumps: Arc<Mutex<Vec<SimPump>>>,
    swapped_at_g: Arc<Mutex<f64>>,
}

impl std::fmt::Debug for Station {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Station").finish_non_exhaustive()
    }
}

impl Station {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a pump whose delivery goes into this station's vessel.
    pub fn add_pump(&self, pump: SimPump) {
        self.pumps
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(pump);
    }

    /// Liquid in the vessel at physical time `t_s`, g (advances the pumps to `t_s`).
    pub fn load_g_at(&self, t_s: f64) -> f64 {
        let pumps = self.pumps.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let total: f64 = pumps.iter().map(|p| p.delivered_g_at(t_s)).sum();
        total - *self.swapped_at_g.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A fresh, empty vessel replaces the current one.
    pub fn swap_vessel(&self) {
        let pumps = self.pumps.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let total: f64 = pumps.iter().map(SimPump::delivered_g).sum();
        *self.swapped_at_g.lock().unwrap_or_else(|p| p.into_inner()) = total;
    }
}

/// CRC-16-CCITT (poly 0x1021, init 0), as the NE-1000 safe mode frames use it. The simulator
/// keeps its own copy so that a bug in the driver's cannot hide behind an identical one here.
pub fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in data {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// The pump firmware's number printing: at most four digits plus a decimal point.
pub fn format_number(v: f64) -> Option<String> {
    if !v.is_finite() || v < 0.0 {
        return None;
    }
    (0..=3usize).rev().find_map(|d| {
        let s = format!("{v:.d$}");
        (s.bytes().filter(u8::is_ascii_digit).count() <= 4).then_some(s)
    })
}

/// The pump firmware's number reading: digits and at most one point, at most four digits.
pub fn parse_number(s: &str) -> Option<f64> {
    let digits = s.bytes().filter(u8::is_ascii_digit).count();
    let points = s.bytes().filter(|b| *b == b'.').count();
    if digits == 0 || digits > 4 || points > 1 || digits + points != s.len() {
        return None;
    }
    s.parse().ok()
}

/// One pump of a [`SimStation`].
#[derive(Debug, Clone)]
pub struct PumpSpec {
    /// Device id (as the daemon's config names it; also the world's placement key).
    pub id: String,
    pub config: PumpConfig,
}

/// What a [`SimStation`] is made of.
#[derive(Debug, Clone)]
pub struct StationSpec {
    pub pumps: Vec<PumpSpec>,
    /// `Some((id, config))` for a station with a balance.
    pub balance: Option<(String, BalanceConfig)>,
    /// Line faults of every port (each port gets its own seed: seed + index).
    pub faults: FaultConfig,
    /// Directory for stable symlinks (`<dir>/<id>`) to the ptys; `None` = bare `/dev/pts/N`.
    pub link_dir: Option<PathBuf>,
    /// Record delivered liquid in this world, for the sample placed at each pump.
    pub world: Option<World>,
    /// `Some(name)`: every pump on one pty, daisy-chained by address (the addresses in their
    /// configs must differ); `name` names the symlink under `link_dir`. `None`: a pty per pump.
    pub chain: Option<String>,
}

/// Pumps daisy-chained on one RS-232 line (NE-1000 network): every pump hears every command
/// and only the one whose address it names answers. A pump taken off the chain
/// ([`RunningPump::set_unplugged`]) neither hears nor answers while its neighbours go on. A
/// pump on a port of its own is a chain of one.
struct PumpChain {
    members: Vec<(SimPump, Arc<AtomicBool>)>,
    /// Which member each request returned by `receive` belongs to, in order.
    pending: Mutex<VecDeque<usize>>,
}

impl SerialDevice for PumpChain {
    fn receive(&self, bytes: &[u8]) -> Vec<Request> {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::new();
        for (i, (pump, unplugged)) in self.members.iter().enumerate() {
            if unplugged.load(Ordering::SeqCst) {
                continue;
            }
            for request in pump.receive(bytes) {
                pending.push_back(i);
                out.push(request);
            }
        }
        out
    }

    fn answer(&self, request: Request) -> ReplyFuture {
        let member = self
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop_front()
            .and_then(|i| self.members.get(i));
        match member {
            Some((pump, unplugged)) if !unplugged.load(Ordering::SeqCst) => pump.answer(request),
            _ => Box::pin(std::future::ready(None)),
        }
    }

    fn reset_input(&self) {
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        for (pump, _) in &self.members {
            pump.reset_input();
        }
    }
}

/// A running pump: model and pty (shared with the other pumps of its chain, if any).
#[derive(Debug)]
pub struct RunningPump {
    pub id: String,
    pub sim: SimPump,
    pub port: Arc<PtyServer>,
    unplugged: Arc<AtomicBool>,
}

impl RunningPump {
    /// Takes this pump off its line (it stops hearing and answering; the port and the other
    /// pumps on it stay) or puts it back.
    pub fn set_unplugged(&self, unplugged: bool) {
        self.unplugged.store(unplugged, Ordering::SeqCst);
    }
}

/// A running balance: model and pty.
#[derive(Debug)]
pub struct RunningBalance {
    pub id: String,
    pub sim: SimBalance,
    pub port: PtyServer,
}

/// Pumps and a balance on one vessel, each on its own pty.
#[derive(Debug)]
pub struct SimStation {
    pub station: Station,
    pub pumps: Vec<RunningPump>,
    pub balance: Option<RunningBalance>,
}

impl SimStation {
    pub async fn start(spec: StationSpec, clock: Clock) -> std::io::Result<SimStation> {
        let station = Station::new();
        let link = |id: &str| spec.link_dir.as_ref().map(|d| d.join(id));
        let faults = |i: usize| FaultConfig {
            seed: spec.faults.seed.wrapping_add(i as u64),
            ..spec.faults.clone()
        };
        let mut pumps = Vec::with_capacity(spec.pumps.len());
        let mut chain = Vec::new();
        for (i, p) in spec.pumps.iter().enumerate() {
            let world = spec.world.clone().map(|w| (w, p.id.clone()));
            let sim = SimPump::new(p.config.clone(), clock, world);
            station.add_pump(sim.clone());
            let unplugged = Arc::new(AtomicBool::new(false));
            if spec.chain.is_some() {
                chain.push((p.id.clone(), sim, unplugged));
                continue;
            }
            let device = PumpChain {
                members: vec![(sim.clone(), Arc::clone(&unplugged))],
                pending: Mutex::new(VecDeque::new()),
            };
            let port = PtyServer::start(Arc::new(device), faults(i), link(&p.id)).await?;
            pumps.push(RunningPump {
                id: p.id.clone(),
                sim,
                port: Arc::new(port),
                unplugged,
            });
        }
        if let Some(name) = &spec.chain {
            let device = PumpChain {
                members: chain
                    .iter()
                    .map(|(_, sim, unplugged)| (sim.clone(), Arc::clone(unplugged)))
                    .collect(),
                pending: Mutex::new(VecDeque::new()),
            };
            let port = Arc::new(PtyServer::start(Arc::new(device), faults(0), link(name)).await?);
            for (id, sim, unplugged) in chain {
                pumps.push(RunningPump {
                    id,
                    sim,
                    port: Arc::clone(&port),
                    unplugged,
                });
            }
        }
        let balance = match &spec.balance {
            Some((id, config)) => {
                let sim = SimBalance::new(config.clone(), station.clone(), clock);
                let port =
                    PtyServer::start(Arc::new(sim.clone()), faults(spec.pumps.len()), link(id))
                        .await?;
                Some(RunningBalance {
                    id: id.clone(),
                    sim,
                    port,
                })
            }
            None => None,
        };
        Ok(SimStation {
            station,
            pumps,
            balance,
        })
    }

    /// The pump with this id.
    pub fn pump(&self, id: &str) -> Option<&RunningPump> {
        self.pumps.iter().find(|p| p.id == id)
    }

    /// Closes every pty.
    pub async fn shutdown(self) {
        for p in self.pumps {
            p.port.unplug().await;
        }
        if let Some(b) = self.balance {
            b.port.shutdown().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_and_crc() {
        assert_eq!(crc16(b"123456789"), 0x31C3);
        assert_eq!(format_number(2.5).as_deref(), Some("2.500"));
        assert_eq!(format_number(1234.0).as_deref(), Some("1234"));
        assert_eq!(format_number(10000.0), None);
        assert_eq!(parse_number("14.43"), Some(14.43));
        assert_eq!(parse_number("14.435"), None);
        assert_eq!(parse_number("1.2.3"), None);
        assert_eq!(parse_number(""), None);
    }
}
