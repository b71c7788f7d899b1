//! `ppud dev`: a simulated lab in the daemon's process. Every simulated device sits behind its
//! real wire protocol on a loopback socket, and the daemon reaches it through the same drivers
//! and config path as in a real lab; only the addresses come from here.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ppu_drivers::Clock;
use ppu_drivers::device::Limits;
use ppu_sim::analyser::{SimAnalyser, SimAnalyserConfig};
use ppu_sim::broker::EmbeddedBroker;
use ppu_sim::dispenser::balance::BalanceConfig;
use ppu_sim::dispenser::pump::PumpConfig;
use ppu_sim::dispenser::{PumpSpec, SimStation, StationSpec};
use ppu_sim::furnace::{FurnaceConfig, SimFurnace};
use ppu_sim::modbus::{ServerHandle, serve_tcp};
use ppu_sim::pty::{FaultConfig, PtyServer};
use ppu_sim::rtu::serve_rtu_units;
use ppu_sim::world::World;

use ppu_proto::v1 as pb;
use tokio::sync::broadcast::error::RecvError;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::app::{Daemon, Options, Security, StartError};
use ppu_drivers::analyser::sorption::config::SorptionMqttEntry;
use ppu_drivers::balance::sics::config::MtSicsEntry;
use ppu_drivers::dispenser::ne1000::Ledger;
use ppu_drivers::dispenser::ne1000::config::Ne1000Entry;
use ppu_drivers::furnace::eurotherm::config::EurothermEntry;

use crate::config::{BusConfig, Config, DeviceConfig, ModbusRtuBus, Policies, SerialBusEntry};
use crate::devices::PollSettings;
use crate::scheduler::Scheduler;
use crate::store::{Store, StoreError};

/// Seed of the simulated world (hidden material model, measurement noise).
pub const WORLD_SEED: u64 = 42;

/// A simulated sorption analyser: its bridge is a separate client of the lab's broker.
pub struct SimulatedAnalyser {
    pub id: String,
    pub sim: std::sync::Arc<SimAnalyser>,
}

/// A simulated furnace and its Modbus TCP server.
pub struct SimulatedFurnace {
    pub id: String,
    pub sim: SimFurnace,
    pub server: ServerHandle,
}

/// Id of the lab's simulated RS-485 line of furnaces, once added.
pub const DEV_RTU_BUS: &str = "rs485-a";
/// Reply timeout of the furnaces on the lab's RS-485 line, ms.
pub const DEV_RTU_TIMEOUT_MS: u64 = 250;
/// Id of the lab's simulated NE-1000 daisy chain.
pub const DEV_PUMP_BUS: &str = "pumps";

/// Every furnace of the lab on one simulated Modbus RTU line (one pty), each at its own unit
/// id. While the line exists, the daemon reaches the furnaces through it, as one bus; their
/// TCP servers keep running for other clients.
pub struct FurnaceLine {
    pub baud_rate: u32,
    pub pty: PtyServer,
}

/// The simulated lab.
pub struct DevLab {
    pub furnaces: Vec<SimulatedFurnace>,
    /// The furnaces' shared RS-485 line, once added ([`DevLab::add_furnace_line`]).
    pub furnace_line: Option<FurnaceLine>,
    /// What happened to each sample (dispenses, furnace history, degas), for the analysers.
    pub world: World,
    /// The embedded MQTT broker, once analysers are added.
    pub broker: Option<EmbeddedBroker>,
    pub analysers: Vec<SimulatedAnalyser>,
    /// The dispensing station, once added: pumps and a balance, each on a pty.
    pub dispensing: Option<SimStation>,
    /// The devices of the simulated families registered as plugins
    /// ([`ppu_sim::registry`]), once added ([`DevLab::add_plugin_families`]).
    pub plugins: Vec<PluginDevice>,
    clock: Clock,
}

/// A simulated device of a plugin family, with the configuration its real driver gets.
pub struct PluginDevice {
    pub id: String,
    /// One line for `ppud dev`'s listing.
    pub description: String,
    pub config: DeviceConfig,
    running: Box<dyn ppu_sim::registry::Running>,
}

/// Reagents of the simulated dispensing station: (pump id, reagent, density g/mL, delivery
/// error of its syringe). The pumps share one daisy chain at addresses 1, 2, … in this order.
pub const DEV_REAGENTS: [(&str, &str, f64, f64); 2] =
    [("pump-a", "A", 1.0, 0.003), ("pump-b", "B", 0.789, -0.002)];

/// Id of the simulated station's balance.
pub const DEV_BALANCE: &str = "balance-1";

/// The `nats-server` the fleet's tests and bench start: `$PPU_NATS_SERVER` (`.ci/run` sets
/// it), else Debian's package path or one on `PATH`; `None` when none is installed.
pub fn nats_server_binary() -> Option<std::path::PathBuf> {
    use std::path::PathBuf;
    if let Some(p) = std::env::var_os("PPU_NATS_SERVER").map(PathBuf::from) {
        return p.exists().then_some(p);
    }
    [
        "/usr/sbin/nats-server",
        "/usr/bin/nats-server",
        "/usr/local/bin/nats-server",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
    .or_else(|| {
        std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join("nats-server"))
                .find(|p| p.exists())
        })
    })
}

/// The simulated dispensing station of `ppud dev`: a pump per reagent of [`DEV_REAGENTS`] (full
/// 10 mL syringes, daisy-chained on one line as [`DEV_PUMP_BUS`], already powered: no `A?R`)
/// over the balance [`DEV_BALANCE`], without faults; what it delivers is filed in `world` when
/// given. Tests that run the station outside the daemon use the same spec.
pub fn dev_station_spec(world: Option<World>) -> StationSpec {
    let pumps = DEV_REAGENTS
        .iter()
        .zip(1u8..)
        .map(|((id, reagent, density, error), address)| PumpSpec {
            id: (*id).to_owned(),
            config: PumpConfig {
                address,
                reagent: (*reagent).to_owned(),
                density_g_per_ml: *density,
                delivery_error: *error,
                // Powered up long before: a bench whose pumps were switched on this morning,
                // not a power cut. A fresh `ppud dev` must not page anyone with "pump reset
                // (power-up)" (A?R); the drivers' and simulator's tests cover that alarm.
                power_up_alarm: false,
                ..PumpConfig::default()
            },
        })
        .collect();
    StationSpec {
        pumps,
        balance: Some((DEV_BALANCE.to_owned(), BalanceConfig::default())),
        faults: FaultConfig::default(),
        link_dir: None,
        world,
        chain: Some(DEV_PUMP_BUS.to_owned()),
    }
}

/// The `[[buses]]` and `[[devices]]` tables of a station started from [`dev_station_spec`]
/// outside the daemon, as a lab's `ppud serve` config names its serial ports: the pumps on one
/// chain ([`DEV_PUMP_BUS`]) at their addresses, the balance on its own port, and the limits of
/// [`pump_limits`]. Used by the crash tests and `ppu-soak`, whose devices outlive the daemon.
pub fn station_config(station: &SimStation) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    if let Some(first) = station.pumps.first() {
        let _ = write!(
            out,
            "[[buses]]\nid = \"{DEV_PUMP_BUS}\"\nkind = \"serial\"\nport = \"{}\"\n\n",
            first.port.path()
        );
    }
    let balance = station.balance.as_ref();
    if let Some(b) = balance {
        let _ = write!(
            out,
            "[[devices]]\ndriver = \"mt_sics\"\nid = \"{}\"\nport = \"{}\"\n\n",
            b.id,
            b.port.path()
        );
    }
    let limits = pump_limits();
    for p in &station.pumps {
        let c = p.sim.config();
        let _ = write!(
            out,
            "[[devices]]\ndriver = \"ne1000\"\nid = \"{}\"\nbus = \"{DEV_PUMP_BUS}\"\naddress = {}\n\
             reagent = \"{}\"\ndensity_g_per_ml = {:?}\nsyringe_inner_diameter_mm = {:?}\n\
             syringe_volume_ml = {:?}\nfill_ml = {:?}\n",
            p.id,
            c.address,
            c.reagent,
            c.density_g_per_ml,
            c.diameter_mm,
            c.syringe_volume_ml,
            c.contents_ml,
        );
        if let Some(b) = balance {
            let _ = writeln!(out, "balance = \"{}\"", b.id);
        }
        let _ = write!(
            out,
            "\n[devices.limits]\nmax_rate_ml_per_min = {:?}\nmax_volume_ml = {:?}\n\n",
            limits.get("max_rate_ml_per_min").unwrap_or(20.0),
            limits.get("max_volume_ml").unwrap_or(10.0),
        );
    }
    out
}

/// Limits ppud dev declares for its pumps: 10 mL syringes, at most 20 mL/min.
pub fn pump_limits() -> Limits {
    Limits::default()
        .with("max_rate_ml_per_min", 20.0)
        .with("max_volume_ml", 10.0)
}

/// Limits ppud dev declares for its furnaces: a typical lab box furnace.
pub fn furnace_limits() -> Limits {
    Limits::default()
        .with("max_temperature_c", 1100.0)
        .with("min_temperature_c", 0.0)
        .with("max_rate_c_per_min", 20.0)
        .with("max_hold_s", 48.0 * 3600.0)
}

impl DevLab {
    /// Starts `furnaces` simulated Eurotherm controllers (unit ids 1, 2, …) on loopback ports
    /// chosen by the OS.
    pub async fn start(clock: Clock, furnaces: usize) -> std::io::Result<DevLab> {
        let world = World::new(WORLD_SEED);
        let mut out = Vec::with_capacity(furnaces);
        for i in 1..=furnaces {
            let config = FurnaceConfig {
                unit_id: u8::try_from(i).unwrap_or(u8::MAX).min(247),
                ..FurnaceConfig::default()
            };
            let sim = SimFurnace::new(config, clock);
            let server = serve_tcp(SocketAddr::from(([127, 0, 0, 1], 0)), sim.clone()).await?;
            let id = format!("furnace-{i}");
            sim.set_observer(Some(world.furnace_observer(&id)));
            out.push(SimulatedFurnace { id, sim, server });
        }
        Ok(DevLab {
            furnaces: out,
            furnace_line: None,
            world,
            broker: None,
            analysers: Vec::new(),
            dispensing: None,
            plugins: Vec::new(),
            clock,
        })
    }

    /// Puts every furnace on one simulated Modbus RTU line at `baud_rate` (a pty; replies
    /// paced at that rate), which the daemon then uses as the bus [`DEV_RTU_BUS`]. A no-op if
    /// the line exists.
    pub async fn add_furnace_line(&mut self, baud_rate: u32) -> std::io::Result<()> {
        if self.furnace_line.is_some() {
            return Ok(());
        }
        let sims = self.furnaces.iter().map(|f| f.sim.clone()).collect();
        let pty = serve_rtu_units(sims, baud_rate, None).await?;
        self.furnace_line = Some(FurnaceLine { baud_rate, pty });
        Ok(())
    }

    /// Adds the dispensing station: two NE-1000 pumps (reagents of [`DEV_REAGENTS`], full 10 mL
    /// syringes) daisy-chained on one pseudo-terminal, over one MT-SICS balance on another. What the pumps
    /// deliver goes into the balance's vessel and into the world's record of the sample placed
    /// at the pump. A no-op if the station exists.
    pub async fn add_dispensing_station(&mut self) -> std::io::Result<()> {
        if self.dispensing.is_some() {
            return Ok(());
        }
        let spec = dev_station_spec(Some(self.world.clone()));
        self.dispensing = Some(SimStation::start(spec, self.clock).await?);
        Ok(())
    }

    /// Config entries for the simulated station, as `ppud serve` would have them.
    fn dispensing_configs(&self) -> Vec<DeviceConfig> {
        let Some(station) = &self.dispensing else {
            return Vec::new();
        };
        let mut out: Vec<DeviceConfig> = Vec::new();
        if let Some(b) = &station.balance {
            out.push(Box::new(MtSicsEntry::new(b.id.clone(), b.port.path())));
        }
        for p in &station.pumps {
            let sim = p.sim.config();
            let mut e =
                Ne1000Entry::on_bus(p.id.clone(), DEV_PUMP_BUS, sim.address, sim.reagent.clone());
            e.density_g_per_ml = sim.density_g_per_ml;
            e.syringe_inner_diameter_mm = sim.diameter_mm;
            e.syringe_volume_ml = sim.syringe_volume_ml;
            e.fill_ml = sim.contents_ml;
            e.balance = station.balance.as_ref().map(|b| b.id.clone());
            e.limits = pump_limits();
            out.push(Box::new(e));
        }
        out
    }

    /// Adds `count` simulated sorption analysers (`analyser-1`, …), starting the embedded MQTT
    /// broker on loopback first if needed.
    pub async fn add_analysers(&mut self, count: usize) -> std::io::Result<()> {
        if count == 0 {
            return Ok(());
        }
        if self.broker.is_none() {
            self.broker = Some(EmbeddedBroker::start(SocketAddr::from(([127, 0, 0, 1], 0))).await?);
        }
        let Some(broker) = &self.broker else {
            return Ok(());
        };
        let addr = broker.addr();
        let first = self.analysers.len() + 1;
        for i in first..first + count {
            let id = format!("analyser-{i}");
            let config = SimAnalyserConfig::new(addr.ip().to_string(), addr.port(), id.clone());
            let sim = SimAnalyser::start(config, self.world.clone(), self.clock);
            self.analysers.push(SimulatedAnalyser { id, sim });
        }
        Ok(())
    }

    /// A transfer was confirmed: `sample_id` is now at `device_id`. The simulated world files
    /// what happens there (furnace temperatures, dispenses) under that sample.
    /// Starts the devices of every simulated family registered as a plugin
    /// ([`ppu_sim::registry::families`]), each configured through its driver's registered
    /// factory exactly as a `[[devices]]` table of ppud.toml would be.
    pub async fn add_plugin_families(&mut self) -> std::io::Result<()> {
        for family in ppu_sim::registry::families() {
            for d in family.start_dev(self.clock).await? {
                let mut table = d.config;
                let bad = |why: String| {
                    std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("simulated {}: {why}", family.name()),
                    )
                };
                let driver = match table.remove("driver") {
                    Some(toml::Value::String(name)) => name,
                    _ => return Err(bad("its [[devices]] table has no driver".into())),
                };
                let factory = ppu_drivers::registry::driver(&driver)
                    .ok_or_else(|| bad(format!("no driver \"{driver}\" is registered")))?;
                let config = factory.parse(table).map_err(|e| bad(e.to_string()))?;
                self.plugins.push(PluginDevice {
                    id: config.id().to_owned(),
                    description: d.description,
                    config,
                    running: d.running,
                });
            }
        }
        Ok(())
    }

    pub fn on_sample_placed(&self, sample_id: &str, device_id: &str) {
        self.world.place(sample_id, device_id);
    }

    /// Starts the daemon on this lab the way `ppud dev` and the tests do: the config entries
    /// for the simulated devices, the real drivers, the lab's clock.
    pub async fn start_daemon(
        &self,
        listen: SocketAddr,
        data_dir: &Path,
        poll: PollSettings,
        policies: &Policies,
    ) -> Result<Daemon, StartError> {
        self.start_secured_daemon(listen, data_dir, poll, policies, Security::default())
            .await
    }

    /// [`DevLab::start_daemon`] with authentication, TLS, a local socket or metrics.
    pub async fn start_secured_daemon(
        &self,
        listen: SocketAddr,
        data_dir: &Path,
        poll: PollSettings,
        policies: &Policies,
        security: Security,
    ) -> Result<Daemon, StartError> {
        self.start_configured(
            listen,
            data_dir,
            poll,
            policies,
            security,
            self.device_configs(),
        )
        .await
    }

    /// [`DevLab::start_daemon`] with `devices` instead of [`DevLab::device_configs`], e.g.
    /// those entries with a shorter outage grace for a test.
    pub async fn start_daemon_with_devices(
        &self,
        listen: SocketAddr,
        data_dir: &Path,
        poll: PollSettings,
        policies: &Policies,
        devices: Vec<DeviceConfig>,
    ) -> Result<Daemon, StartError> {
        self.start_configured(
            listen,
            data_dir,
            poll,
            policies,
            Security::default(),
            devices,
        )
        .await
    }

    async fn start_configured(
        &self,
        listen: SocketAddr,
        data_dir: &Path,
        poll: PollSettings,
        policies: &Policies,
        security: Security,
        devices: Vec<DeviceConfig>,
    ) -> Result<Daemon, StartError> {
        let config = Config {
            listen,
            data_dir: data_dir.to_owned(),
            time_scale: self.clock.scale(),
            poll: Default::default(),
            buses: self.bus_configs(),
            devices,
        };
        self.restore_syringes(data_dir).await?;
        let drivers = config.drivers().map_err(StartError::Drivers)?;
        let opts = Options {
            listen,
            data_dir: data_dir.to_owned(),
            clock: self.clock,
            poll,
            security,
        };
        Daemon::start_with(opts, policies, drivers).await
    }

    /// A real syringe keeps its contents when the daemon dies; a simulated one starts full with
    /// each `ppud dev` process. On a restart, each simulated syringe is filled to what the
    /// daemon's store last recorded for its pump (the driver restores the same record), so the
    /// two agree: a refill of a syringe the daemon thinks is 9.5 mL full must not stall against
    /// the end of one the simulator thinks is full. Call it before a daemon opens `data_dir`
    /// (the `start_*` methods do).
    pub async fn restore_syringes(&self, data_dir: &Path) -> Result<(), StartError> {
        let Some(station) = &self.dispensing else {
            return Ok(());
        };
        let path = data_dir.join(crate::app::STORE_FILE);
        if !path.exists() {
            return Ok(());
        }
        let states = tokio::task::spawn_blocking(move || Store::open(&path)?.device_states())
            .await
            .map_err(|e| StoreError::Task(e.to_string()))??;
        for (id, state) in states {
            let Some(pump) = station.pumps.iter().find(|p| p.id == id) else {
                continue;
            };
            if let Ok((_, ledger)) = Ledger::decode(&state) {
                pump.sim.set_counted_fill(ledger.fill_ml);
            }
        }
        Ok(())
    }

    /// The shared lines of the simulated lab, as `ppud serve` would have them: the furnaces'
    /// RS-485 line (once added) and the pumps' daisy chain.
    pub fn bus_configs(&self) -> Vec<BusConfig> {
        let mut out = Vec::new();
        if let Some(line) = &self.furnace_line {
            out.push(BusConfig::ModbusRtu(ModbusRtuBus {
                id: DEV_RTU_BUS.to_owned(),
                port: line.pty.path(),
                baud_rate: line.baud_rate,
            }));
        }
        if let Some(p) = self.dispensing.as_ref().and_then(|s| s.pumps.first()) {
            out.push(BusConfig::Serial(SerialBusEntry {
                id: DEV_PUMP_BUS.to_owned(),
                port: p.port.path(),
                baud_rate: 9600,
                gap_ms: 0,
            }));
        }
        out
    }

    /// Config entries pointing the real drivers at the simulated devices.
    pub fn device_configs(&self) -> Vec<DeviceConfig> {
        self.furnaces
            .iter()
            .map(|f| {
                let e = if self.furnace_line.is_some() {
                    let mut e = EurothermEntry::on_bus(
                        f.id.clone(),
                        DEV_RTU_BUS,
                        f.sim.unit_id(),
                        furnace_limits(),
                    );
                    // A pty answers within milliseconds even at 19200 baud; a short timeout
                    // keeps a silent unit from holding the shared line for long.
                    e.timeout_ms = DEV_RTU_TIMEOUT_MS;
                    e
                } else {
                    let mut e = EurothermEntry::new(
                        f.id.clone(),
                        format!("modbus-tcp://{}", f.server.local_addr()),
                        furnace_limits(),
                    );
                    e.unit_id = f.sim.unit_id();
                    e
                };
                Box::new(e) as DeviceConfig
            })
            .chain(self.analyser_configs())
            .chain(self.dispensing_configs())
            .chain(self.plugins.iter().map(|p| p.config.clone()))
            .collect()
    }

    /// Config entries for the simulated analysers, as `ppud serve` would have them.
    fn analyser_configs(&self) -> Vec<DeviceConfig> {
        let Some(broker) = &self.broker else {
            return Vec::new();
        };
        self.analysers
            .iter()
            .map(|a| {
                let mut e = SorptionMqttEntry::new(a.id.clone(), broker.url());
                // Loopback: a lost link is noticed and retried quickly.
                e.reconnect_max_ms = 1000;
                Box::new(e) as DeviceConfig
            })
            .collect()
    }

    /// Stops every simulated device's server.
    pub async fn shutdown(self) {
        if let Some(line) = self.furnace_line {
            line.pty.shutdown().await;
        }
        for f in self.furnaces {
            f.server.shutdown().await;
        }
        // The broker goes before the bridges it serves, as at a power-off: rumqttd logs a
        // bridge's clean MQTT DISCONNECT as an ERROR ("router-drop"), a closed socket as INFO.
        if let Some(b) = &self.broker {
            b.shutdown().await;
        }
        for a in &self.analysers {
            a.sim.shutdown().await;
        }
        if let Some(station) = self.dispensing {
            station.shutdown().await;
        }
        for p in self.plugins {
            p.running.shutdown().await;
        }
    }
}

/// Default real-time delay of the simulated lab's robot before it confirms a transfer.
pub const DEFAULT_TRANSFER_DELAY: Duration = Duration::from_millis(200);

/// Who the simulated robot says moved the sample.
pub const ROBOT_NAME: &str = "ppud-dev-robot";

/// The simulated lab's robot arm: it carries out every transfer the scheduler requests, a
/// fixed real-time delay after the request, by telling the simulated devices where the sample
/// now is ([`DevLab::on_sample_placed`]) and then confirming through
/// [`Scheduler::confirm_transfer`] — the same path an operator's `ConfirmTransfer` takes.
pub struct TransferRobot {
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl TransferRobot {
    /// Starts the robot, each transfer taking `delay` of real time. Transfers already pending
    /// are carried out too.
    pub fn start(lab: Arc<DevLab>, scheduler: Scheduler, delay: Duration) -> TransferRobot {
        Self::spawn(lab, scheduler, TransferTime::Real(delay))
    }

    /// Starts the robot, each transfer taking `seconds` of physical time on the lab's clock:
    /// the arm's move is physics like a furnace ramp, so a faster clock shortens it too (a
    /// fixed real-time delay would become the campaign's floor at a high time scale).
    pub fn start_physical(lab: Arc<DevLab>, scheduler: Scheduler, seconds: f64) -> TransferRobot {
        Self::spawn(lab, scheduler, TransferTime::Physical(seconds))
    }

    fn spawn(lab: Arc<DevLab>, scheduler: Scheduler, time: TransferTime) -> TransferRobot {
        let stop = CancellationToken::new();
        let task = tokio::spawn(robot(lab, scheduler, time, stop.clone()));
        TransferRobot { stop, task }
    }

    /// Stops the robot; transfers not yet carried out stay pending.
    pub async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

/// How long one transfer of the simulated robot takes.
#[derive(Debug, Clone, Copy)]
enum TransferTime {
    Real(Duration),
    /// Physical seconds on the lab's clock.
    Physical(f64),
}

async fn robot(
    lab: Arc<DevLab>,
    scheduler: Scheduler,
    time: TransferTime,
    stop: CancellationToken,
) {
    // Subscribe before listing, so a request between the two is never missed.
    let mut events = scheduler.store().subscribe();
    let moves = TaskTracker::new();
    let mut seen = HashSet::new();
    let mut pending = scheduler.list_transfers().unwrap_or_default();
    loop {
        for p in pending.drain(..) {
            // A transfer re-requested after a restart keeps its id but not its request time.
            let key = (p.id.clone(), p.requested_at.map(|t| (t.seconds, t.nanos)));
            if !seen.insert(key) {
                continue;
            }
            let (lab, scheduler, stop) = (lab.clone(), scheduler.clone(), stop.clone());
            moves.spawn(async move {
                let delay = match time {
                    TransferTime::Real(d) => d,
                    TransferTime::Physical(s) => lab.clock.to_real(s),
                };
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
                lab.on_sample_placed(&p.sample_id, &p.to_device_id);
                if let Err(e) = scheduler.confirm_transfer(&p.id, ROBOT_NAME).await {
                    // Cancelled or confirmed by someone else meanwhile.
                    tracing::debug!(transfer = %p.id, error = %e, "robot could not confirm");
                }
            });
        }
        tokio::select! {
            _ = stop.cancelled() => break,
            ev = events.recv() => match ev {
                Ok(e) => {
                    if let Some(pb::event::Kind::TransferRequested(t)) = &e.kind
                        && let Some(p) = &t.transfer
                    {
                        pending.push(p.clone());
                    }
                    // A sample with no place yet is loaded where its first step runs: the
                    // robot puts it there, so the simulated world knows what it holds.
                    if let Some(pb::event::Kind::StepStarted(st)) = &e.kind
                        && !matches!(st.step.as_ref().and_then(|s| s.kind.as_ref()), Some(pb::step::Kind::Transfer(_)))
                        && let Ok(Some(x)) = scheduler.store().get_experiment(&e.experiment_id)
                    {
                        lab.on_sample_placed(&crate::scheduler::sample_key(&x), &e.device_id);
                    }
                }
                Err(RecvError::Lagged(_)) => {
                    pending = scheduler.list_transfers().unwrap_or_default();
                }
                Err(RecvError::Closed) => break,
            },
        }
    }
    moves.close();
    moves.wait().await;
}
