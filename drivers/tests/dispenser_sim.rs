//! The NE-1000 and MT-SICS drivers against the simulated station, over real pseudo-terminals:
//! the drivers open `/dev/pts/N` (or a symlink to it) exactly as they would open
//! `/dev/ttyUSB0`. No sleeps for synchronisation: every wait is on a condition with a deadline.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use ppu_drivers::balance::schema::WeighResult;
use ppu_drivers::balance::sics::{SicsBalance, SicsConfig, SicsError};
use ppu_drivers::device::StepOutput;
use ppu_drivers::dispenser::ne1000::protocol::{Command, PumpError};
use ppu_drivers::dispenser::ne1000::{Ne1000Config, Ne1000Error, Ne1000Pump};
use ppu_drivers::dispenser::schema::DispenseResult;
use ppu_drivers::transport::serial::{Framing, OpenError, SerialConfig, SerialTransport};
use ppu_drivers::{Clock, Device, DeviceError, Limits, StepCommand, StepContext, StepUpdate};
use ppu_sim::dispenser::balance::BalanceConfig;
use ppu_sim::dispenser::pump::PumpConfig;
use ppu_sim::dispenser::{PumpSpec, SimStation, StationSpec};
use ppu_sim::pty::FaultConfig;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Physical seconds per real second: 2.5 mL at 1 mL/min (150 s) takes 0.75 s.
const SCALE: f64 = 200.0;
/// Upper bound on any wait (real time).
const DEADLINE: Duration = Duration::from_secs(30);

struct Rig {
    clock: Clock,
    station: SimStation,
    balance: Arc<SicsBalance>,
    pump_a: Arc<Ne1000Pump>,
    pump_b: Arc<Ne1000Pump>,
    _dir: Option<TempDir>,
}

/// A directory removed on drop (for stable symlinks to the ptys).
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "ppu-dispenser-sim-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn pump_sim(address: u8, reagent: &str, density: f64) -> PumpConfig {
    PumpConfig {
        address,
        reagent: reagent.to_owned(),
        density_g_per_ml: density,
        ..PumpConfig::default()
    }
}

fn serial(path: String, framing: Framing) -> SerialConfig {
    let mut s = SerialConfig::new(path, framing);
    s.timeout = Duration::from_millis(200);
    s.retries = 2;
    s
}

fn pump_config(id: &str, path: String, reagent: &str, density: f64) -> Ne1000Config {
    let mut c = Ne1000Config::new(id, serial(path, Framing::Ne1000), reagent);
    c.density_g_per_ml = density;
    c.fill_ml = 10.0;
    c.tolerance = 0.01;
    c.limits = Limits::default()
        .with("max_rate_ml_per_min", 20.0)
        .with("max_volume_ml", 10.0);
    c.poll_interval_s = 5.0;
    c.min_poll = Duration::from_millis(5);
    c.transient_grace = Duration::from_secs(2);
    c.weigh_timeout = Duration::from_secs(10);
    c
}

async fn rig_with(
    configure: impl FnOnce(&mut StationSpec),
    pump_tweak: impl Fn(&mut Ne1000Config),
) -> Rig {
    let clock = Clock::new(SCALE);
    let mut spec = StationSpec {
        pumps: vec![
            PumpSpec {
                id: "pump-a".into(),
                config: pump_sim(0, "A", 1.0),
            },
            PumpSpec {
                id: "pump-b".into(),
                config: pump_sim(0, "B", 0.789),
            },
        ],
        balance: Some((
            "balance-1".into(),
            BalanceConfig {
                noise_g: 0.00005,
                ..BalanceConfig::default()
            },
        )),
        faults: FaultConfig::default(),
        link_dir: None,
        world: None,
        chain: None,
    };
    configure(&mut spec);
    let dir = spec
        .link_dir
        .is_some()
        .then(|| TempDir(spec.link_dir.clone().unwrap()));
    let station = SimStation::start(spec, clock)
        .await
        .expect("station starts");
    let balance_port = station.balance.as_ref().unwrap().port.path();
    let balance = Arc::new(SicsBalance::new(SicsConfig::new(
        "balance-1",
        serial(balance_port, Framing::CrLf),
    )));
    let mut a = pump_config("pump-a", station.pumps[0].port.path(), "A", 1.0);
    let mut b = pump_config("pump-b", station.pumps[1].port.path(), "B", 0.789);
    pump_tweak(&mut a);
    pump_tweak(&mut b);
    Rig {
        clock,
        pump_a: Arc::new(Ne1000Pump::new(a, Some(balance.clone()))),
        pump_b: Arc::new(Ne1000Pump::new(b, Some(balance.clone()))),
        balance,
        station,
        _dir: dir,
    }
}

async fn rig() -> Rig {
    rig_with(|_| {}, |_| {}).await
}

struct Ctx {
    ctx: StepContext,
    updates: mpsc::UnboundedReceiver<StepUpdate>,
}

fn ctx(clock: Clock) -> Ctx {
    let (tx, rx) = mpsc::unbounded_channel();
    Ctx {
        ctx: StepContext {
            clock,
            updates: tx,
            cancel: CancellationToken::new(),
            sample_id: "S-1".into(),
            experiment_id: "E-1".into(),
        },
        updates: rx,
    }
}

fn dispense(reagent: &str, volume_ml: f64, rate_ml_per_min: f64) -> StepCommand {
    ppu_drivers::dispenser::StepKind::Dispense {
        reagent: reagent.into(),
        volume_ml,
        rate_ml_per_min,
    }
    .pack()
}

async fn run(
    pump: &Ne1000Pump,
    step: StepCommand,
    clock: Clock,
) -> Result<StepOutput, DeviceError> {
    let c = ctx(clock);
    tokio::time::timeout(DEADLINE, pump.execute(&step, c.ctx))
        .await
        .expect("step finishes before the deadline")
}

fn dispensed(out: StepOutput) -> DispenseResult {
    match out.decode::<DispenseResult>() {
        Some(d) => d,
        None => panic!("expected a dispense result, got {out:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dispenses_2_5_ml_at_1_ml_per_min_within_tolerance_pumped_and_weighed() {
    let rig = rig().await;
    let mut c = ctx(rig.clock);
    let step = dispense("A", 2.5, 1.0);
    let out = tokio::time::timeout(DEADLINE, rig.pump_a.execute(&step, c.ctx.clone()))
        .await
        .unwrap()
        .unwrap();
    let d = dispensed(out);
    assert_eq!(d.reagent, "A");
    assert_eq!(d.requested_volume_ml, 2.5);
    assert!((d.pump_volume_ml - 2.5).abs() <= 0.001, "{d:?}");
    let measured = d.measured_mass_g.expect("weighed");
    assert!((measured - 2.5).abs() / 2.5 < 0.01, "{d:?}");
    assert_eq!(d.expected_mass_g, 2.5);
    let dev = d.relative_deviation.expect("deviation");
    assert!((dev - (measured - 2.5) / 2.5).abs() < 1e-12);
    assert!((d.remaining_ml - 7.5).abs() < 1e-6, "{d:?}");
    assert!((rig.pump_a.fill_ml() - 7.5).abs() < 1e-6);

    // The simulated syringe agrees, the pump is stopped, progress reached 1.
    let snap = rig.station.pumps[0].sim.snapshot();
    assert!(!snap.running);
    assert!((snap.contents_ml - 7.5).abs() < 1e-6);
    let mut last_fraction = 0.0;
    while let Ok(u) = c.updates.try_recv() {
        if let StepUpdate::Progress { fraction, .. } = u {
            assert!(fraction + 1e-9 >= last_fraction, "progress went back");
            last_fraction = fraction;
        }
    }
    assert_eq!(last_fraction, 1.0);

    // Reagent B (density 0.789) into the same vessel: the tare isolates it.
    let d = dispensed(
        run(&rig.pump_b, dispense("B", 1.2, 5.0), rig.clock)
            .await
            .unwrap(),
    );
    let measured = d.measured_mass_g.unwrap();
    assert!((d.expected_mass_g - 1.2 * 0.789).abs() < 1e-12);
    assert!(
        (measured - 1.2 * 0.789).abs() / (1.2 * 0.789) < 0.01,
        "{d:?}"
    );
    // Physical time: the 150 s dispense really took ≥ 150 s of the scaled clock.
    assert!(rig.clock.now_s() >= 150.0);
    rig.station.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stall_fails_the_step_with_motor_stall_and_the_pump_ends_stopped() {
    let rig = rig().await;
    rig.station.pumps[0].sim.stall_after(Some(1.0));
    let err = run(&rig.pump_a, dispense("A", 2.5, 1.0), rig.clock)
        .await
        .unwrap_err();
    let DeviceError::Fault(msg) = &err else {
        panic!("expected a fault, got {err:?}");
    };
    assert!(msg.contains("motor stall"), "{msg}");
    assert!(msg.contains("1.000 of 2.500 mL delivered"), "{msg}");
    let snap = rig.station.pumps[0].sim.snapshot();
    assert!(!snap.running, "pump still running after a stall");
    // What was delivered is booked, so the fill stays true.
    assert!(
        (rig.pump_a.fill_ml() - 9.0).abs() < 1e-6,
        "{}",
        rig.pump_a.fill_ml()
    );
    // The next dispense works (the alarm was reported once and is gone).
    let d = dispensed(
        run(&rig.pump_a, dispense("A", 1.0, 2.0), rig.clock)
            .await
            .unwrap(),
    );
    assert!((d.remaining_ml - 8.0).abs() < 1e-6);
    rig.station.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_reply_is_a_timeout_after_bounded_retries() {
    let rig = rig().await;
    // Settle the power-up alarm first.
    rig.pump_a.version().await.unwrap();
    let faults = rig.station.pumps[0].port.faults().clone();
    faults.set_silent(true);
    let before = faults.requests();
    let err = rig.pump_a.version().await.unwrap_err();
    assert!(
        matches!(
            &err,
            Ne1000Error::Link(DeviceError::Timeout {
                timeout_ms: 200,
                ..
            })
        ),
        "{err:?}"
    );
    // One attempt plus exactly `retries` (2) more reached the pump, no more.
    let attempts = faults.requests() - before;
    assert_eq!(attempts, 3);
    assert!(!rig.pump_a.transport().is_connected());
    // The balance too: a silent balance times out, typed as a link failure.
    let bf = rig.station.balance.as_ref().unwrap().port.faults().clone();
    bf.set_silent(true);
    let err = rig.balance.weigh_immediate().await.unwrap_err();
    assert!(
        matches!(err, SicsError::Link(DeviceError::Timeout { .. })),
        "{err:?}"
    );
    // And both recover when the line does.
    faults.set_silent(false);
    bf.set_silent(false);
    assert!(rig.pump_a.version().await.unwrap().starts_with("NE1000"));
    assert!(rig.balance.weigh_immediate().await.is_ok());
    rig.station.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_dropped_bytes_are_resynchronised_and_the_command_succeeds() {
    let rig = rig().await;
    rig.pump_a.version().await.unwrap();
    let faults = rig.station.pumps[0].port.faults().clone();
    for _ in 0..20 {
        faults.garbage_next(1);
        let before = faults.requests();
        let (status, data) = rig.pump_a.command(&Command::QueryDiameter).await.unwrap();
        assert_eq!(data, "14.43");
        assert!(!status.is_moving());
        // Garbage before the reply costs nothing: the reply is found in the same attempt.
        assert_eq!(faults.requests() - before, 1);
    }
    // A reply cut short (its ETX lost) is a partial frame: the retry gets a whole one.
    faults.truncate_next(1);
    let before = faults.requests();
    let (_, data) = rig.pump_a.command(&Command::QueryDiameter).await.unwrap();
    assert_eq!(data, "14.43");
    assert!(faults.requests() - before <= 2);

    let bf = rig.station.balance.as_ref().unwrap().port.faults().clone();
    for _ in 0..10 {
        bf.garbage_next(1);
        assert_eq!(rig.balance.serial_number().await.unwrap(), "B123456789");
    }
    // A whole dispense over a noisy line (random garbage and lost bytes, seeded).
    faults.set_config(FaultConfig {
        seed: 42,
        garbage: 0.2,
        drop_byte: 0.05,
        ..FaultConfig::default()
    });
    let d = dispensed(
        run(&rig.pump_a, dispense("A", 1.0, 2.0), rig.clock)
            .await
            .unwrap(),
    );
    assert!((d.pump_volume_ml - 1.0).abs() <= 0.001, "{d:?}");
    rig.station.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_open_of_the_same_port_is_a_clear_busy_error() {
    let rig = rig().await;
    let path = rig.station.pumps[0].port.path();
    let first = SerialTransport::new(serial(path.clone(), Framing::Ne1000));
    first.connect().await.unwrap();
    let second = SerialTransport::new(serial(path.clone(), Framing::Ne1000));
    let err = second.connect().await.unwrap_err();
    assert_eq!(err, OpenError::Busy { path: path.clone() });
    assert!(err.to_string().contains("busy"), "{err}");
    // Through a driver: the step fails with the same message, without touching the pump.
    let other = Ne1000Pump::new(pump_config("pump-x", path.clone(), "A", 1.0), None);
    let err = other.status().await.unwrap_err();
    let DeviceError::Disconnected(msg) = &err else {
        panic!("{err:?}");
    };
    assert!(msg.contains("busy") && msg.contains(&path), "{msg}");
    // Once the first holder closes, the port opens.
    first.disconnect().await;
    other.status().await.unwrap();
    rig.station.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_port_vanishing_and_coming_back_reconnects() {
    let dir = TempDir::new();
    let rig = rig_with(|s| s.link_dir = Some(dir.0.clone()), |_| {}).await;
    let port = &rig.station.pumps[0].port;
    assert!(port.path().starts_with(dir.0.to_str().unwrap()));
    rig.pump_a.version().await.unwrap();
    let first_pty = port.slave_path().unwrap();

    port.unplug().await;
    let err = rig.pump_a.version().await.unwrap_err();
    assert!(
        matches!(&err, Ne1000Error::Link(DeviceError::Disconnected(_))),
        "{err:?}"
    );
    assert!(!rig.pump_a.transport().is_connected());

    port.plug().await.unwrap();
    // The new pty usually has another number; the link follows it, like /dev/serial/by-id.
    tracing::info!(first_pty, now = ?port.slave_path(), "replugged");
    assert!(rig.pump_a.version().await.unwrap().starts_with("NE1000"));
    assert!(rig.pump_a.transport().is_connected());
    // A dispense after the outage still works end to end.
    let d = dispensed(
        run(&rig.pump_a, dispense("A", 0.5, 2.0), rig.clock)
            .await
            .unwrap(),
    );
    assert!((d.pump_volume_ml - 0.5).abs() <= 0.001);
    rig.station.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_power_cycle_is_survived_and_reported_once() {
    let rig = rig().await;
    rig.pump_a.version().await.unwrap();
    rig.station.pumps[0].sim.power_cycle();
    // The alarm surfaces in the status until the next step, which reconfigures the pump.
    let status = rig.pump_a.status().await.unwrap();
    assert_eq!(
        status.alarms,
        vec!["pump reset (power-up) (A?R)".to_owned()]
    );
    let d = dispensed(
        run(&rig.pump_a, dispense("A", 1.0, 2.0), rig.clock)
            .await
            .unwrap(),
    );
    assert!((d.pump_volume_ml - 1.0).abs() <= 0.001);
    assert!(rig.pump_a.status().await.unwrap().alarms.is_empty());
    rig.station.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_range_numbers_are_typed_pump_errors() {
    let rig = rig().await;
    rig.pump_a.version().await.unwrap();
    let err = rig
        .pump_a
        .command(&Command::SetDiameter("95.00".into()))
        .await
        .unwrap_err();
    assert!(
        matches!(
            &err,
            Ne1000Error::Pump {
                error: PumpError::OutOfRange,
                ..
            }
        ),
        "{err:?}"
    );
    let err = rig
        .pump_a
        .command(&Command::SetVolume("12.345".into()))
        .await
        .unwrap_err();
    assert!(matches!(
        &err,
        Ne1000Error::Pump {
            error: PumpError::OutOfRange,
            ..
        }
    ));
    let err = rig.pump_a.command(&Command::Purge).await;
    assert!(err.is_ok());
    let err = rig.pump_a.command(&Command::Run).await.unwrap_err();
    assert!(matches!(
        &err,
        Ne1000Error::Pump {
            error: PumpError::NotApplicable,
            ..
        }
    ));
    rig.pump_a.command(&Command::Stop).await.unwrap();
    rig.station.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refill_withdraws_and_the_fill_limits_dispenses() {
    let rig = rig().await;
    let d = dispensed(
        run(&rig.pump_a, dispense("A", 8.0, 20.0), rig.clock)
            .await
            .unwrap(),
    );
    assert!((d.remaining_ml - 2.0).abs() < 1e-6);
    // 3 mL no longer fits: refused before anything moves, naming the fill.
    let before = rig.station.pumps[0].sim.snapshot().delivered_ml;
    let err = run(&rig.pump_a, dispense("A", 3.0, 20.0), rig.clock)
        .await
        .unwrap_err();
    let DeviceError::Limit { field, limit, .. } = &err else {
        panic!("{err:?}");
    };
    assert_eq!(field, "volume_ml");
    assert!(
        limit.contains("2.000 mL") && limit.contains("refill"),
        "{limit}"
    );
    assert_eq!(rig.station.pumps[0].sim.snapshot().delivered_ml, before);

    let refill = ppu_drivers::dispenser::StepKind::Refill {
        reagent: "A".into(),
        volume_ml: None,
        rate_ml_per_min: None,
    }
    .pack();
    let Some(r) = (run(&rig.pump_a, refill, rig.clock).await.unwrap())
        .decode::<ppu_drivers::dispenser::schema::RefillResult>()
    else {
        panic!("expected a refill result");
    };
    assert!((r.volume_ml - 8.0).abs() < 1e-6, "{r:?}");
    assert!((r.fill_ml - 10.0).abs() < 1e-6, "{r:?}");
    assert!((rig.station.pumps[0].sim.snapshot().contents_ml - 10.0).abs() < 1e-6);
    // Too much for the free space.
    let over = ppu_drivers::dispenser::StepKind::Refill {
        reagent: "A".into(),
        volume_ml: Some(1.0),
        rate_ml_per_min: None,
    }
    .pack();
    let err = run(&rig.pump_a, over, rig.clock).await.unwrap_err();
    assert!(matches!(err, DeviceError::Limit { .. }), "{err:?}");
    run(&rig.pump_a, dispense("A", 3.0, 20.0), rig.clock)
        .await
        .unwrap();
    rig.station.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deviation_beyond_tolerance_fails_the_step_naming_the_numbers() {
    let rig = rig_with(|s| s.pumps[0].config.delivery_error = 0.05, |_| {}).await;
    let err = run(&rig.pump_a, dispense("A", 2.0, 4.0), rig.clock)
        .await
        .unwrap_err();
    let DeviceError::Fault(msg) = &err else {
        panic!("{err:?}");
    };
    for needle in [
        "gravimetric check failed",
        "measured 2.09",
        "expected 2.0000 g",
        "deviation +4.9",
        "tolerance of 1.00 %",
    ] {
        assert!(msg.contains(needle), "{needle:?} not in {msg}");
    }
    // The pump itself delivered what it counted; the fill follows the pump.
    assert!((rig.pump_a.fill_ml() - 8.0).abs() < 1e-6);
    rig.station.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_stops_the_pump_and_books_the_partial_volume() {
    let rig = rig().await;
    let c = ctx(rig.clock);
    let cancel = c.ctx.cancel.clone();
    let pump = rig.pump_a.clone();
    let step_ctx = c.ctx;
    let task = tokio::spawn(async move { pump.execute(&dispense("A", 5.0, 1.0), step_ctx).await });
    let sim = rig.station.pumps[0].sim.clone();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while sim.snapshot().infused_ml < 1.0 {
        assert!(tokio::time::Instant::now() < deadline, "pump never ran");
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    cancel.cancel();
    let out = tokio::time::timeout(DEADLINE, task).await.unwrap().unwrap();
    assert_eq!(out.unwrap_err(), DeviceError::Aborted);
    let snap = sim.snapshot();
    assert!(!snap.running);
    assert!((rig.pump_a.fill_ml() - (10.0 - snap.infused_ml)).abs() < 1e-3);
    rig.station.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_mid_dispense_is_booked_from_the_pump_counters() {
    let rig = rig().await;
    let saved = rig.pump_a.saved_state().unwrap();
    // The "old daemon" starts a dispense and dies without booking it.
    let sim = rig.station.pumps[0].sim.clone();
    rig.pump_a.version().await.unwrap();
    for cmd in [
        Command::SetRate(
            "10.00".into(),
            ppu_drivers::dispenser::ne1000::protocol::RateUnit::MillilitrePerMinute,
        ),
        Command::SetVolume("1.500".into()),
        Command::Run,
    ] {
        rig.pump_a.command(&cmd).await.unwrap();
    }
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while sim.snapshot().running {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    rig.pump_a.transport().disconnect().await;
    // The new daemon: the state committed before the crash, then the start-up safe state.
    let path = rig.station.pumps[0].port.path();
    let fresh = Ne1000Pump::new(pump_config("pump-a", path, "A", 1.0), None);
    fresh.restore_state(&saved).unwrap();
    fresh.safe_state().await.unwrap();
    assert!((fresh.fill_ml() - 8.5).abs() < 1e-6, "{}", fresh.fill_ml());
    // Reading again books nothing twice.
    fresh.status().await.unwrap();
    assert!((fresh.fill_ml() - 8.5).abs() < 1e-6);
    rig.station.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn safe_mode_frames_with_crc_and_the_keep_alive_holds_the_watchdog_off() {
    let rig = rig_with(|_| {}, |c| c.safe_mode_watchdog_s = Some(1)).await;
    let d = dispensed(
        run(&rig.pump_a, dispense("A", 1.0, 2.0), rig.clock)
            .await
            .unwrap(),
    );
    assert!((d.pump_volume_ml - 1.0).abs() <= 0.001);
    let sim = rig.station.pumps[0].sim.clone();
    assert!(sim.snapshot().safe_mode);
    // Idle for three watchdog periods (real time): the keep-alive keeps it from tripping.
    let faults = rig.station.pumps[0].port.faults().clone();
    let start = faults.requests();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while faults.requests() < start + 6 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no keep-alive polls"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(sim.snapshot().pending_alarm, None);
    // A truncated safe frame fails its length/CRC check and is asked for again; noise too.
    faults.truncate_next(1);
    assert!(rig.pump_a.version().await.is_ok());
    faults.garbage_next(3);
    assert!(rig.pump_a.version().await.is_ok());

    // The daemon goes away mid-run: the pump stops by itself and raises A?T.
    rig.pump_a
        .command(&Command::SetRate(
            "100.0".into(),
            ppu_drivers::dispenser::ne1000::protocol::RateUnit::MicrolitrePerMinute,
        ))
        .await
        .unwrap();
    rig.pump_a
        .command(&Command::SetVolume("5.000".into()))
        .await
        .unwrap();
    rig.pump_a.command(&Command::Run).await.unwrap();
    let rig_pump = rig.pump_a;
    drop(rig_pump);
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let snap = sim.snapshot();
        if !snap.running {
            assert_eq!(snap.pending_alarm.as_deref(), Some("A?T"));
            assert!(snap.infused_ml < 5.0);
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "watchdog never fired"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    rig.station.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_balance_weighs_tares_and_reports_overload() {
    let rig = rig().await;
    let b = &rig.balance;
    let t = Duration::from_secs(5);
    assert_eq!(b.serial_number().await.unwrap(), "B123456789");
    // The 20 g vial: tare it away, then bring it back.
    let tare = b.tare(t).await.unwrap();
    assert!((tare - 20.0).abs() < 0.001, "{tare}");
    assert!((b.tare_value().await.unwrap() - tare).abs() < 1e-9);
    assert!(b.weigh_stable(t).await.unwrap().grams().abs() < 0.001);
    b.clear_tare().await.unwrap();
    assert_eq!(b.tare_value().await.unwrap(), 0.0);
    assert!((b.weigh_stable(t).await.unwrap().grams() - 20.0).abs() < 0.001);
    b.zero(t).await.unwrap();
    let w = b.weigh_stable(t).await.unwrap();
    assert!(w.stable && w.grams().abs() < 0.001, "{w:?}");
    let c = ctx(rig.clock);
    let out = b
        .execute(&ppu_drivers::balance::weigh_command(Some(5.0)), c.ctx)
        .await
        .unwrap();
    let Some(WeighResult { stable, mass_g }) =
        (out).decode::<ppu_drivers::balance::schema::WeighResult>()
    else {
        panic!("{out:?}");
    };
    assert!(stable && mass_g.abs() < 0.001);
    let sim = rig.station.balance.as_ref().unwrap().sim.clone();
    sim.set_extra_load(500.0);
    let err = b.weigh_stable(Duration::from_secs(5)).await.unwrap_err();
    assert_eq!(
        err,
        SicsError::Overload {
            command: "S".into(),
            reply: "S +".into(),
        }
    );
    // Status polls with `SI`, which MT-SICS answers with the identifier `S`.
    let status = b.status().await.unwrap();
    assert_eq!(
        status.alarms,
        vec!["balance overload (S + in answer to SI)".to_owned()]
    );
    // A dispense onto an overloaded balance fails before pumping.
    let err = run(&rig.pump_a, dispense("A", 1.0, 2.0), rig.clock)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("overload"), "{err}");
    assert_eq!(rig.station.pumps[0].sim.snapshot().delivered_ml, 0.0);
    sim.set_extra_load(0.0);
    // The cell takes a moment to come back from the overload.
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let w = loop {
        match b.weigh_stable(t).await {
            Ok(w) => break w,
            Err(SicsError::Overload { .. }) if tokio::time::Instant::now() < deadline => {}
            Err(e) => panic!("{e}"),
        }
    };
    assert!(w.grams().abs() < 0.001, "{w:?}");
    rig.station.shutdown().await;
}
