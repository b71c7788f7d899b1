//! Several devices on one shared line, against the simulators on a real pty: two Eurotherm
//! controllers on one Modbus RTU line (RS-485 multi-drop, paced at 9600 and 19200 baud) and
//! two NE-1000 pumps daisy-chained on one RS-232 line. One transport serves each line; each
//! device has its own address and timeout, and one unplugged device fails only its own step.
//! Waits are on conditions and step updates with deadlines, never on fixed sleeps.

use std::sync::Arc;
use std::time::Duration;

use ppu_drivers::dispenser::ne1000::{Ne1000Config, Ne1000Pump};
use ppu_drivers::furnace::Segment;
use ppu_drivers::furnace::eurotherm::{Eurotherm, EurothermConfig};
use ppu_drivers::transport::modbus::{ModbusBus, ModbusConfig, ModbusEndpoint};
use ppu_drivers::transport::serial::{Framing, SerialBus, SerialConfig};
use ppu_drivers::{Clock, Device, DeviceError, Limits, StepCommand, StepContext, StepUpdate};
use ppu_sim::dispenser::pump::PumpConfig;
use ppu_sim::dispenser::{PumpSpec, SimStation, StationSpec};
use ppu_sim::furnace::{FurnaceConfig, SimFurnace};
use ppu_sim::pty::{FaultConfig, PtyServer};
use ppu_sim::rtu::serve_rtu_units;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Physical seconds per real second.
const FAST: f64 = 2000.0;
/// Upper bound on any wait (real time).
const DEADLINE: Duration = Duration::from_secs(60);

fn context(clock: Clock) -> (StepContext, mpsc::UnboundedReceiver<StepUpdate>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let ctx = StepContext {
        clock,
        updates: tx,
        cancel: CancellationToken::new(),
        sample_id: "S-1".into(),
        experiment_id: "E-1".into(),
    };
    (ctx, rx)
}

/// Waits for an update matching `pred`, failing after the deadline.
async fn wait_update(
    rx: &mut mpsc::UnboundedReceiver<StepUpdate>,
    what: &str,
    mut pred: impl FnMut(&StepUpdate) -> bool,
) {
    let found = tokio::time::timeout(DEADLINE, async {
        while let Some(update) = rx.recv().await {
            if pred(&update) {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(found, Ok(true), "no update matching {what}");
}

struct FurnaceLine {
    sims: Vec<SimFurnace>,
    devs: Vec<Arc<Eurotherm>>,
    bus: Arc<ModbusBus>,
    clock: Clock,
    _pty: PtyServer,
}

/// Units 1 and 2 on one simulated RS-485 line at `baud`, and a driver for each on one bus.
async fn furnace_line(baud: u32) -> FurnaceLine {
    let clock = Clock::new(FAST);
    let sims: Vec<SimFurnace> = (1..=2)
        .map(|unit_id| {
            SimFurnace::new(
                FurnaceConfig {
                    unit_id,
                    ..FurnaceConfig::default()
                },
                clock,
            )
        })
        .collect();
    let pty = serve_rtu_units(sims.clone(), baud, None)
        .await
        .expect("serve the line");
    let endpoint = ModbusEndpoint::Rtu {
        path: pty.path(),
        baud_rate: baud,
    };
    let bus = ModbusBus::new(endpoint.clone());
    let timeout = Duration::from_millis(300);
    let devs = sims
        .iter()
        .map(|sim| {
            let unit = sim.unit_id();
            let mut modbus = ModbusConfig::new(endpoint.clone());
            modbus.unit_id = unit;
            modbus.timeout = timeout;
            modbus.retries = 1;
            let mut config = EurothermConfig::new(format!("furnace-{unit}"), modbus);
            config.limits = Limits::default()
                .with("max_temperature_c", 1100.0)
                .with("max_rate_c_per_min", 20.0);
            config.min_poll = Duration::from_millis(5);
            config.transient_grace = Duration::from_secs(1);
            Arc::new(Eurotherm::with_transport(
                config,
                bus.unit(unit, timeout, 1),
            ))
        })
        .collect();
    FurnaceLine {
        sims,
        devs,
        bus,
        clock,
        _pty: pty,
    }
}

fn program(temperature_c: f64, hold_s: f64) -> StepCommand {
    ppu_drivers::furnace::program_command(&[
        Segment::StepTo { temperature_c },
        Segment::Hold { duration_s: hold_s },
    ])
}

async fn two_furnaces_run_programs_concurrently(baud: u32) {
    let line = furnace_line(baud).await;
    let runs: Vec<_> = line
        .devs
        .iter()
        .zip([80.0, 120.0])
        .map(|(dev, target)| {
            let dev = Arc::clone(dev);
            let (ctx, _rx) = context(line.clock);
            tokio::spawn(async move { dev.execute(&program(target, 1200.0), ctx).await })
        })
        .collect();
    for (run, target) in runs.into_iter().zip([80.0, 120.0]) {
        let out = tokio::time::timeout(DEADLINE, run)
            .await
            .expect("program finishes")
            .expect("task")
            .expect("program succeeds");
        let Some(result) = (out).decode::<ppu_drivers::furnace::schema::FurnaceResult>() else {
            panic!("a furnace returned {out:?}");
        };
        assert_eq!(result.targets.len(), 1);
        assert_eq!(result.targets[0].temperature_c, target);
    }
    // Each unit got its own program, and each ended in its safe state.
    for (sim, dev) in line.sims.iter().zip(&line.devs) {
        let snap = sim.snapshot();
        assert_eq!(
            snap.target_sp_c,
            dev.config().safe_setpoint_c,
            "unit {}",
            sim.unit_id()
        );
        assert!(dev.transport().is_connected());
    }
    assert!(line.bus.is_up());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_furnaces_on_one_rtu_line_at_9600_baud_run_programs_concurrently() {
    two_furnaces_run_programs_concurrently(9600).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_furnaces_on_one_rtu_line_at_19200_baud_run_programs_concurrently() {
    two_furnaces_run_programs_concurrently(19_200).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unplugged_unit_fails_only_its_own_program() {
    let line = furnace_line(19_200).await;
    // 6000 s of hold = 3 s real: the unplug falls inside both holds.
    let mut runs = Vec::new();
    let mut updates = Vec::new();
    for dev in &line.devs {
        let dev = Arc::clone(dev);
        let (ctx, rx) = context(line.clock);
        updates.push(rx);
        runs.push(tokio::spawn(async move {
            dev.execute(&program(60.0, 6000.0), ctx).await
        }));
    }
    for rx in &mut updates {
        wait_update(
            rx,
            "the hold",
            |u| matches!(u, StepUpdate::Progress { message, .. } if message.contains("hold")),
        )
        .await;
    }
    // Unit 2 stops answering; the line and unit 1 stay.
    line.sims[1].set_silent(true);
    let second = runs.pop().expect("two runs");
    let first = runs.pop().expect("two runs");

    let err = tokio::time::timeout(DEADLINE, second)
        .await
        .expect("unit 2's program ends")
        .expect("task")
        .expect_err("unit 2's program fails");
    assert!(
        matches!(
            err,
            DeviceError::Timeout { .. } | DeviceError::Disconnected(_)
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("unit 2"), "{err}");
    let out = tokio::time::timeout(DEADLINE, first)
        .await
        .expect("unit 1's program ends")
        .expect("task")
        .expect("unit 1's program succeeds although its neighbour is gone");
    assert!(
        out.decode::<ppu_drivers::furnace::schema::FurnaceResult>()
            .is_some_and(|r| r.targets.len() == 1)
    );

    // Unit 1 ended safe and still answers; only unit 2 looks disconnected; the bus is up.
    assert_eq!(
        line.sims[0].snapshot().target_sp_c,
        line.devs[0].config().safe_setpoint_c
    );
    assert!(line.devs[0].status().await.is_ok());
    assert!(line.devs[0].transport().is_connected());
    assert!(!line.devs[1].transport().is_connected());
    assert!(line.bus.is_up());

    // Plugged back in, unit 2 answers on the same line again.
    line.sims[1].set_silent(false);
    assert!(line.devs[1].status().await.is_ok());
    assert!(line.devs[1].transport().is_connected());
}

struct PumpChain {
    station: SimStation,
    pumps: Vec<Arc<Ne1000Pump>>,
    bus: Arc<SerialBus>,
    clock: Clock,
}

/// Pumps at addresses 1 and 2 on one simulated RS-232 chain, a driver for each on one bus.
async fn pump_chain() -> PumpChain {
    let clock = Clock::new(200.0);
    let pump_sim = |address, reagent: &str| PumpConfig {
        address,
        reagent: reagent.to_owned(),
        power_up_alarm: false,
        ..PumpConfig::default()
    };
    let spec = StationSpec {
        pumps: vec![
            PumpSpec {
                id: "pump-a".into(),
                config: pump_sim(1, "A"),
            },
            PumpSpec {
                id: "pump-b".into(),
                config: pump_sim(2, "B"),
            },
        ],
        balance: None,
        faults: FaultConfig {
            baud_rate: Some(9600),
            ..FaultConfig::default()
        },
        link_dir: None,
        world: None,
        chain: Some("chain".into()),
    };
    let station = SimStation::start(spec, clock)
        .await
        .expect("station starts");
    let path = station.pumps[0].port.path();
    assert_eq!(path, station.pumps[1].port.path(), "one pty for the chain");
    let bus = SerialBus::new(SerialConfig::new(path.clone(), Framing::Ne1000));
    let pumps = [("pump-a", 1, "A"), ("pump-b", 2, "B")]
        .into_iter()
        .map(|(id, address, reagent)| {
            let mut c = Ne1000Config::new(
                id,
                SerialConfig::new(path.clone(), Framing::Ne1000),
                reagent,
            );
            c.address = address;
            c.fill_ml = 10.0;
            c.limits = Limits::default()
                .with("max_rate_ml_per_min", 20.0)
                .with("max_volume_ml", 10.0);
            c.poll_interval_s = 5.0;
            c.min_poll = Duration::from_millis(5);
            c.transient_grace = Duration::from_secs(1);
            let transport = bus.device(Duration::from_millis(200), 1);
            Arc::new(Ne1000Pump::with_transport(c, transport, None))
        })
        .collect();
    PumpChain {
        station,
        pumps,
        bus,
        clock,
    }
}

fn dispense(reagent: &str, volume_ml: f64) -> StepCommand {
    ppu_drivers::dispenser::StepKind::Dispense {
        reagent: reagent.into(),
        volume_ml,
        rate_ml_per_min: 2.0,
    }
    .pack()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_pumps_on_one_chain_dispense_concurrently() {
    let chain = pump_chain().await;
    let runs: Vec<_> = chain
        .pumps
        .iter()
        .zip([("A", 1.0), ("B", 1.5)])
        .map(|(pump, (reagent, ml))| {
            let pump = Arc::clone(pump);
            let (ctx, _rx) = context(chain.clock);
            tokio::spawn(async move { pump.execute(&dispense(reagent, ml), ctx).await })
        })
        .collect();
    for run in runs {
        let out = tokio::time::timeout(DEADLINE, run)
            .await
            .expect("dispense finishes")
            .expect("task")
            .expect("dispense succeeds");
        assert!(
            out.decode::<ppu_drivers::dispenser::schema::DispenseResult>()
                .is_some(),
            "{out:?}"
        );
    }
    // Each pump moved its own volume: the addresses kept the commands apart.
    let a = chain.station.pump("pump-a").unwrap().sim.snapshot();
    let b = chain.station.pump("pump-b").unwrap().sim.snapshot();
    assert!((a.infused_ml - 1.0).abs() < 1e-6, "{a:?}");
    assert!((b.infused_ml - 1.5).abs() < 1e-6, "{b:?}");
    assert!(chain.pumps.iter().all(|p| p.transport().is_connected()));
    assert!(chain.bus.is_up());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pump_taken_off_the_chain_fails_only_its_own_dispense() {
    let chain = pump_chain().await;
    // 3 mL at 2 mL/min = 90 s physical, ~0.45 s real.
    let mut runs = Vec::new();
    let mut updates = Vec::new();
    for (pump, reagent) in chain.pumps.iter().zip(["A", "B"]) {
        let pump = Arc::clone(pump);
        let (ctx, rx) = context(chain.clock);
        updates.push(rx);
        runs.push(tokio::spawn(async move {
            pump.execute(&dispense(reagent, 3.0), ctx).await
        }));
    }
    // Pump B is pumping: take it off the line.
    wait_update(&mut updates[1], "pump-b pumping", |u| {
        matches!(u, StepUpdate::Progress { .. } | StepUpdate::Reading(_))
    })
    .await;
    chain.station.pump("pump-b").unwrap().set_unplugged(true);

    let b = runs.pop().expect("two runs");
    let a = runs.pop().expect("two runs");
    let err = tokio::time::timeout(DEADLINE, b)
        .await
        .expect("pump-b's step ends")
        .expect("task")
        .expect_err("pump-b's step fails");
    assert!(
        matches!(
            err,
            DeviceError::Timeout { .. } | DeviceError::Disconnected(_)
        ),
        "{err:?}"
    );
    let out = tokio::time::timeout(DEADLINE, a)
        .await
        .expect("pump-a's step ends")
        .expect("task")
        .expect("pump-a's dispense succeeds although its neighbour is gone");
    assert!(
        out.decode::<ppu_drivers::dispenser::schema::DispenseResult>()
            .is_some(),
        "{out:?}"
    );
    let a = chain.station.pump("pump-a").unwrap().sim.snapshot();
    assert!((a.infused_ml - 3.0).abs() < 1e-6, "{a:?}");
    assert!(chain.pumps[0].transport().is_connected());
    assert!(!chain.pumps[1].transport().is_connected());
    assert!(chain.bus.is_up());
}
