//! The Eurotherm driver and Modbus transport against the simulated controller, over real
//! Modbus TCP on loopback. Waits are on conditions with deadlines, never on fixed sleeps.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ppu_drivers::furnace::Segment;
use ppu_drivers::furnace::eurotherm::{Eurotherm, EurothermConfig, IdentCheck, registers};
use ppu_drivers::furnace::schema::FurnaceResult;
use ppu_drivers::transport::modbus::{ModbusConfig, ModbusEndpoint};
use ppu_drivers::{
    Clock, Device, DeviceError, Limits, StepCommand, StepContext, StepOutput, StepUpdate,
};
use ppu_sim::furnace::{FurnaceConfig, SimFurnace};
use ppu_sim::modbus::{ServerHandle, serve_tcp};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Physical seconds per real second: a 40-minute program runs in about a second.
const FAST: f64 = 2000.0;

struct Rig {
    sim: SimFurnace,
    server: ServerHandle,
    addr: SocketAddr,
    clock: Clock,
}

async fn rig(scale: f64) -> Rig {
    rig_with(scale, FurnaceConfig::default()).await
}

async fn rig_with(scale: f64, furnace: FurnaceConfig) -> Rig {
    let clock = Clock::new(scale);
    let sim = SimFurnace::new(furnace, clock);
    let server = serve_tcp("127.0.0.1:0".parse().unwrap(), sim.clone())
        .await
        .expect("serve simulator");
    let addr = server.local_addr();
    Rig {
        sim,
        server,
        addr,
        clock,
    }
}

fn config(addr: SocketAddr) -> EurothermConfig {
    let mut modbus = ModbusConfig::new(ModbusEndpoint::Tcp(addr));
    modbus.timeout = Duration::from_millis(200);
    modbus.retries = 1;
    let mut config = EurothermConfig::new("furnace-1", modbus);
    config.limits = Limits::default()
        .with("max_temperature_c", 1100.0)
        .with("max_rate_c_per_min", 20.0);
    config.min_poll = Duration::from_millis(5);
    config
}

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

/// Retries `f` until it returns `Some`, failing the test after `deadline` of real time.
async fn eventually<T, F, Fut>(deadline: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let give_up = tokio::time::Instant::now() + deadline;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < give_up,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Waits for an update matching `pred`, failing after `deadline`.
async fn wait_update(
    rx: &mut mpsc::UnboundedReceiver<StepUpdate>,
    deadline: Duration,
    what: &str,
    mut pred: impl FnMut(&StepUpdate) -> bool,
) {
    let found = tokio::time::timeout(deadline, async {
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

fn furnace(output: StepOutput) -> FurnaceResult {
    match output.decode::<FurnaceResult>() {
        Some(result) => result,
        None => panic!("a furnace returned {output:?}"),
    }
}

#[tokio::test]
async fn scaled_reads_and_writes() {
    // Real time, so PV barely moves between our read and the simulator's snapshot.
    let rig = rig(1.0).await;
    let dev = Eurotherm::new(config(rig.addr));

    // The simulator is a 2404 unless told otherwise.
    assert_eq!(dev.identify().await, Ok(0x2440));

    let snap = dev.read_snapshot().await.expect("read snapshot");
    let sim = rig.sim.snapshot();
    assert!((snap.pv_c - sim.pv_c).abs() <= 0.2, "{snap:?} vs {sim:?}");
    assert_eq!(snap.target_sp_c, sim.target_sp_c);

    // 123.4 °C at one decimal place is raw 1234.
    dev.transport()
        .write_single(registers::TARGET_SP, 1234)
        .await
        .expect("write target SP");
    assert_eq!(rig.sim.snapshot().target_sp_c, 123.4);

    dev.transport()
        .write_single(registers::SP_RATE_LIMIT, 55)
        .await
        .expect("write rate limit");
    assert_eq!(rig.sim.snapshot().rate_limit_c_per_min, 5.5);

    let status = dev.status().await.expect("status");
    let reading = |name: &str| {
        status
            .readings
            .iter()
            .find(|r| r.name == name)
            .map(|r| r.value)
    };
    assert_eq!(reading("target_sp_c"), Some(123.4));
    assert_eq!(reading("rate_limit_c_per_min"), Some(5.5));
    assert!(reading("pv_c").is_some());
    assert!(reading("working_sp_c").is_some());
    assert!(reading("output_pct").is_some());
    assert!(status.active);

    dev.safe_state().await.expect("safe state");
    dev.safe_state().await.expect("safe state is idempotent");
    let sim = rig.sim.snapshot();
    assert_eq!(sim.target_sp_c, 25.0);
    assert_eq!(sim.rate_limit_c_per_min, 0.0);
    assert!(!sim.manual);
    assert!(!dev.status().await.expect("status").active);
}

#[tokio::test]
async fn illegal_register_is_refused_with_exception_02() {
    let rig = rig(FAST).await;
    let dev = Eurotherm::new(config(rig.addr));
    let err = dev.transport().read_holding(9999, 1).await.unwrap_err();
    let DeviceError::Refused { reason, .. } = &err else {
        panic!("expected Refused, got {err:?}");
    };
    assert!(reason.contains("9999"), "{reason}");
    assert!(reason.contains("exception 02"), "{reason}");
    // An exception does not break the link.
    assert!(dev.read_snapshot().await.is_ok());
}

#[tokio::test]
async fn silent_device_times_out_then_recovers() {
    let rig = rig(FAST).await;
    let dev = Eurotherm::new(config(rig.addr));
    dev.read_snapshot().await.expect("first read");

    rig.sim.set_silent(true);
    let err = dev.transport().read_holding(1, 1).await.unwrap_err();
    assert!(
        matches!(
            err,
            DeviceError::Timeout {
                timeout_ms: 200,
                ..
            }
        ),
        "{err:?}"
    );

    rig.sim.set_silent(false);
    dev.transport()
        .read_holding(1, 1)
        .await
        .expect("read after silence");
}

#[tokio::test]
async fn reconnects_after_the_server_comes_back() {
    let rig = rig(FAST).await;
    let dev = Eurotherm::new(config(rig.addr));
    dev.read_snapshot().await.expect("first read");
    assert!(dev.transport().is_connected());

    rig.server.shutdown().await;
    let err = dev.transport().read_holding(1, 1).await.unwrap_err();
    assert!(err.is_transient(), "{err:?}");

    let _server = serve_tcp(rig.addr, rig.sim.clone())
        .await
        .expect("serve again");
    eventually(Duration::from_secs(5), "a read after reconnect", || async {
        dev.transport().read_holding(1, 5).await.ok()
    })
    .await;
    assert!(dev.transport().is_connected());
}

#[tokio::test]
async fn program_runs_to_every_target_and_ends_safe() {
    let rig = rig(FAST).await;
    let dev = Eurotherm::new(config(rig.addr));
    let step = ppu_drivers::furnace::program_command(&[
        Segment::Ramp {
            temperature_c: 200.0,
            rate_c_per_min: 10.0,
        },
        Segment::Hold { duration_s: 600.0 },
        Segment::StepTo {
            temperature_c: 150.0,
        },
    ]);
    let (ctx, mut rx) = context(rig.clock);
    let result = tokio::time::timeout(Duration::from_secs(60), dev.execute(&step, ctx))
        .await
        .expect("program finishes")
        .expect("program succeeds");
    let result = furnace(result);
    let tolerance = dev.config().tolerance_c;

    let targets: Vec<_> = result
        .targets
        .iter()
        .map(|t| (t.segment_index, t.temperature_c))
        .collect();
    assert_eq!(targets, [(0, 200.0), (2, 150.0)]);
    for target in &result.targets {
        let sample = result
            .trace
            .iter()
            .find(|s| s.t_s == target.reached_at_s)
            .expect("a sample at the moment the target was reached");
        assert!(
            (sample.pv_c - target.temperature_c).abs() <= tolerance,
            "{sample:?} for {target:?}"
        );
    }
    // The ramp cannot be faster than 10 °C/min from ambient; the hold lasts 600 s.
    assert!(result.targets[0].reached_at_s >= (200.0 - 25.0 - tolerance) / 10.0 * 60.0);
    assert!(result.targets[1].reached_at_s - result.targets[0].reached_at_s >= 600.0);
    assert!(result.trace.windows(2).all(|w| w[0].t_s <= w[1].t_s));
    assert!(result.max_overshoot_c >= 0.0 && result.max_overshoot_c < 20.0);

    let sim = rig.sim.snapshot();
    assert_eq!(sim.target_sp_c, dev.config().safe_setpoint_c);
    assert_eq!(sim.rate_limit_c_per_min, 0.0);
    assert!(!sim.manual);

    let mut updates = Vec::new();
    while let Ok(update) = rx.try_recv() {
        updates.push(update);
    }
    assert!(
        updates
            .iter()
            .any(|u| matches!(u, StepUpdate::Reading(status) if !status.readings.is_empty()))
    );
    let fractions: Vec<f64> = updates
        .iter()
        .filter_map(|u| match u {
            StepUpdate::Progress { fraction, .. } => Some(*fraction),
            StepUpdate::Reading(_) | StepUpdate::Intermediate { .. } => None,
        })
        .collect();
    assert!(fractions.windows(2).all(|w| w[0] <= w[1]), "{fractions:?}");
    assert_eq!(fractions.last(), Some(&1.0));
}

#[tokio::test]
async fn cancelling_during_a_hold_aborts_and_leaves_the_furnace_safe() {
    let rig = rig(FAST).await;
    let dev = Arc::new(Eurotherm::new(config(rig.addr)));
    let step = ppu_drivers::furnace::program_command(&[
        Segment::Ramp {
            temperature_c: 100.0,
            rate_c_per_min: 20.0,
        },
        Segment::Hold {
            duration_s: 1_000_000.0,
        },
    ]);
    let (ctx, mut rx) = context(rig.clock);
    let cancel = ctx.cancel.clone();
    let run = tokio::spawn({
        let dev = Arc::clone(&dev);
        async move { dev.execute(&step, ctx).await }
    });

    wait_update(
        &mut rx,
        Duration::from_secs(30),
        "the hold",
        |u| matches!(u, StepUpdate::Progress { message, .. } if message.contains("hold")),
    )
    .await;
    assert_eq!(rig.sim.snapshot().target_sp_c, 100.0);
    cancel.cancel();

    let result = tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .expect("abort is prompt")
        .expect("task");
    assert_eq!(result, Err(DeviceError::Aborted));
    let sim = rig.sim.snapshot();
    assert_eq!(sim.target_sp_c, dev.config().safe_setpoint_c);
    assert_eq!(sim.rate_limit_c_per_min, 0.0);
}

#[tokio::test]
async fn heater_failure_fails_the_program() {
    let rig = rig(FAST).await;
    let dev = Arc::new(Eurotherm::new(config(rig.addr)));
    let step = ppu_drivers::furnace::program_command(&[Segment::Ramp {
        temperature_c: 800.0,
        rate_c_per_min: 10.0,
    }]);
    let (ctx, mut rx) = context(rig.clock);
    let run = tokio::spawn({
        let dev = Arc::clone(&dev);
        async move { dev.execute(&step, ctx).await }
    });

    // Fail the heater once the furnace is visibly heating.
    wait_update(&mut rx, Duration::from_secs(30), "heating", |u| {
        matches!(u, StepUpdate::Reading(status)
            if status.readings.iter().any(|r| r.name == "pv_c" && r.value > 40.0))
    })
    .await;
    rig.sim.set_heater_fail(true);

    let result = tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .expect("fault is detected")
        .expect("task");
    match result {
        Err(DeviceError::Fault(reason)) => assert!(reason.contains("heater"), "{reason}"),
        other => panic!("expected a heater fault, got {other:?}"),
    }
    assert_eq!(rig.sim.snapshot().target_sp_c, dev.config().safe_setpoint_c);
}

#[tokio::test]
async fn a_short_outage_during_a_hold_is_ridden_out() {
    let rig = rig(FAST).await;
    let dev = Arc::new(Eurotherm::new(config(rig.addr)));
    let step = ppu_drivers::furnace::program_command(&[
        Segment::StepTo {
            temperature_c: 60.0,
        },
        // 6000 s physical = 3 s real at FAST: the outage falls inside the hold.
        Segment::Hold { duration_s: 6000.0 },
    ]);
    let (ctx, mut rx) = context(rig.clock);
    let run = tokio::spawn({
        let dev = Arc::clone(&dev);
        async move { dev.execute(&step, ctx).await }
    });

    wait_update(
        &mut rx,
        Duration::from_secs(30),
        "the hold",
        |u| matches!(u, StepUpdate::Progress { message, .. } if message.contains("hold")),
    )
    .await;
    rig.sim.set_silent(true);
    // The length of the fault, not a synchronisation: several polls time out (200 ms each)
    // while the hold goes on, well within the driver's 10 s transient grace.
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(!run.is_finished());
    rig.sim.set_silent(false);

    let result = tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .expect("program finishes")
        .expect("task")
        .expect("the outage is tolerated");
    assert_eq!(furnace(result).targets.len(), 1);
    assert_eq!(rig.sim.snapshot().target_sp_c, 25.0);
}

#[tokio::test]
async fn a_program_over_the_limits_is_rejected_before_anything_is_sent() {
    let rig = rig(FAST).await;
    let dev = Eurotherm::new(config(rig.addr));
    let step = ppu_drivers::furnace::program_command(&[
        Segment::Ramp {
            temperature_c: 500.0,
            rate_c_per_min: 10.0,
        },
        Segment::StepTo {
            temperature_c: 1150.0,
        },
    ]);
    let (ctx, _rx) = context(rig.clock);
    let err = dev.execute(&step, ctx).await.unwrap_err();
    assert_eq!(
        err,
        DeviceError::Limit {
            field: "segments[1].step.temperature_c".into(),
            value: 1150.0,
            limit: "max_temperature_c 1100".into(),
        }
    );
    assert_eq!(rig.sim.snapshot().target_sp_c, 25.0);
}

#[tokio::test]
async fn a_step_is_held_to_the_declared_ramp_limit_by_the_controller() {
    let rig = rig(FAST).await;
    let dev = Eurotherm::new(config(rig.addr));
    let max_rate = dev
        .config()
        .limits
        .get("max_rate_c_per_min")
        .expect("rig declares a ramp limit");
    let step = ppu_drivers::furnace::program_command(&[Segment::StepTo {
        temperature_c: 300.0,
    }]);
    let (ctx, mut rx) = context(rig.clock);
    let run = tokio::spawn(async move { dev.execute(&step, ctx).await });
    // While the step runs, the controller itself carries the limit: the first reading after
    // the segment starts is taken after its setpoint writes.
    wait_update(
        &mut rx,
        Duration::from_secs(30),
        "the step segment",
        |u| matches!(u, StepUpdate::Progress { message, .. } if message.contains("step to")),
    )
    .await;
    wait_update(
        &mut rx,
        Duration::from_secs(30),
        "a reading during the step",
        |u| matches!(u, StepUpdate::Reading(_)),
    )
    .await;
    assert_eq!(rig.sim.snapshot().rate_limit_c_per_min, max_rate);
    let result = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("step finishes")
        .expect("task")
        .expect("step succeeds");
    let reached = furnace(result).targets[0].reached_at_s;
    let tolerance = 2.0;
    // Full heater power would get there in a few minutes; the limit makes it take longer.
    assert!(
        reached >= (300.0 - 25.0 - tolerance) / max_rate * 60.0,
        "reached 300 °C after {reached} s: faster than {max_rate} °C/min"
    );
}

// ---------------------------------------------------------------------------------------------
// Instrument identity (register 122)

fn fault_text(err: DeviceError) -> String {
    match err {
        DeviceError::Fault(text) => text,
        other => panic!("expected a fault, got {other:?}"),
    }
}

#[tokio::test]
async fn another_instrument_at_the_address_is_refused_before_anything_is_written() {
    let rig = rig_with(
        FAST,
        FurnaceConfig {
            ident: 0x3216,
            ..FurnaceConfig::default()
        },
    )
    .await;
    let dev = Eurotherm::new(config(rig.addr));

    let text = fault_text(dev.status().await.unwrap_err());
    assert!(text.contains("register 122"), "{text}");
    assert!(text.contains("reads 0x3216"), "{text}");
    assert!(text.contains("0x2440 (2404)"), "{text}");
    assert!(text.contains("0x2480 (2408)"), "{text}");

    // A program never reaches the setpoint register of an unverified instrument.
    let step = ppu_drivers::furnace::program_command(&[Segment::StepTo {
        temperature_c: 300.0,
    }]);
    let (ctx, _rx) = context(rig.clock);
    let text = fault_text(dev.execute(&step, ctx).await.unwrap_err());
    assert!(text.contains("reads 0x3216"), "{text}");
    assert_eq!(rig.sim.snapshot().target_sp_c, 25.0);
}

#[tokio::test]
async fn a_compatible_model_is_accepted_when_configured_and_the_check_can_be_skipped() {
    let rig = rig_with(
        FAST,
        FurnaceConfig {
            ident: 0x3216,
            ..FurnaceConfig::default()
        },
    )
    .await;
    let mut compatible = config(rig.addr);
    compatible.ident = IdentCheck::OneOf(vec![0x2440, 0x3216]);
    assert!(Eurotherm::new(compatible).status().await.is_ok());

    let mut skip = config(rig.addr);
    skip.ident = IdentCheck::Skip;
    assert!(Eurotherm::new(skip).status().await.is_ok());
}

#[tokio::test]
async fn a_different_instrument_plugged_in_after_an_outage_is_noticed() {
    let rig = rig(FAST).await;
    let dev = Eurotherm::new(config(rig.addr));
    dev.status().await.expect("the 2404 answers");

    rig.server.shutdown().await;
    let other = SimFurnace::new(
        FurnaceConfig {
            ident: 0x2260,
            ..FurnaceConfig::default()
        },
        rig.clock,
    );
    let _server = serve_tcp(rig.addr, other.clone())
        .await
        .expect("serve the other instrument");

    let err = eventually(
        Duration::from_secs(5),
        "an answer after the swap",
        || async {
            match dev.status().await {
                Err(e) if e.is_transient() => None,
                other => Some(other),
            }
        },
    )
    .await
    .unwrap_err();
    let text = fault_text(err);
    assert!(text.contains("reads 0x2260"), "{text}");
    // And it stays refused: nothing is written to it.
    assert!(dev.acknowledge_alarms().await.is_err());
    assert!(dev.read_snapshot().await.is_err());
}

// ---------------------------------------------------------------------------------------------
// Outage grace, measured from the last answer

/// A program whose hold (segment 2, after a short step, or segment 1 alone) outlasts every
/// test below by far.
fn long_hold(step_first: bool) -> StepCommand {
    let mut segments = vec![Segment::Hold {
        duration_s: 1_000_000.0,
    }];
    if step_first {
        segments.insert(
            0,
            Segment::StepTo {
                temperature_c: 60.0,
            },
        );
    }
    ppu_drivers::furnace::program_command(&segments)
}

/// The outage length named in an outage reason ("… unreachable for 1.7 s (grace …").
fn outage_s(reason: &str) -> f64 {
    let rest = reason
        .split("unreachable for ")
        .nth(1)
        .unwrap_or_else(|| panic!("no outage in {reason:?}"));
    let number = rest.split(' ').next().unwrap_or_default();
    number
        .parse()
        .unwrap_or_else(|_| panic!("no outage length in {reason:?}"))
}

async fn start_hold(
    rig: &Rig,
    config: EurothermConfig,
    step: StepCommand,
) -> tokio::task::JoinHandle<Result<StepOutput, DeviceError>> {
    let dev = Arc::new(Eurotherm::new(config));
    let (ctx, mut rx) = context(rig.clock);
    let run = tokio::spawn({
        let dev = Arc::clone(&dev);
        async move { dev.execute(&step, ctx).await }
    });
    wait_update(
        &mut rx,
        Duration::from_secs(30),
        "the hold",
        |u| matches!(u, StepUpdate::Progress { message, .. } if message.contains("hold")),
    )
    .await;
    // The hold's first sample: from here on the driver waits for the next one.
    wait_update(&mut rx, Duration::from_secs(30), "a hold sample", |u| {
        matches!(u, StepUpdate::Reading(_))
    })
    .await;
    run
}

async fn outage_reason(run: tokio::task::JoinHandle<Result<StepOutput, DeviceError>>) -> String {
    let outcome = tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .expect("the step ends")
        .expect("task");
    match outcome {
        Err(DeviceError::Disconnected(reason)) => reason,
        other => panic!("expected the step to fail on the outage, got {other:?}"),
    }
}

#[tokio::test]
async fn a_controller_frozen_longer_than_the_grace_fails_the_step_even_when_one_call_is_slow() {
    let rig = rig(FAST).await;
    let mut config = config(rig.addr);
    // One failing call takes 3 × 500 ms plus back-off: longer than the whole grace.
    config.modbus.timeout = Duration::from_millis(500);
    config.modbus.retries = 2;
    config.transient_grace = Duration::from_secs(1);
    let run = start_hold(&rig, config, long_hold(true)).await;

    rig.sim.set_silent(true);
    let reason = outage_reason(run).await;
    assert!(reason.starts_with("furnace-1 unreachable for "), "{reason}");
    assert!(
        reason.contains("(grace 1 s) during segment 2 (hold)"),
        "{reason}"
    );
    // Counted from the last answer: the first failing call alone already exceeds the grace.
    assert!(outage_s(&reason) >= 1.0, "{reason}");
}

#[tokio::test]
async fn a_freeze_hidden_inside_the_transports_retries_still_counts() {
    let rig = rig(FAST).await;
    let mut config = config(rig.addr);
    // One call may retry for over 3 s: a 1.5 s freeze ends inside it and the call succeeds.
    config.modbus.timeout = Duration::from_millis(400);
    config.modbus.retries = 6;
    config.transient_grace = Duration::from_secs(1);
    let run = start_hold(&rig, config, long_hold(true)).await;

    rig.sim.set_silent(true);
    // The length of the fault (longer than the grace), not a synchronisation.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    rig.sim.set_silent(false);

    let reason = outage_reason(run).await;
    assert!(reason.contains("during segment 2 (hold)"), "{reason}");
    assert!(outage_s(&reason) >= 1.0, "{reason}");
}

#[tokio::test]
async fn a_silent_controller_is_noticed_within_the_grace_between_samples() {
    // Real time and a sample every 10 minutes: without supervision between samples, the next
    // read would come long after the test's deadline.
    let rig = rig(1.0).await;
    let mut config = config(rig.addr);
    config.sample_interval_s = 600.0;
    config.transient_grace = Duration::from_millis(1500);
    let run = start_hold(&rig, config, long_hold(false)).await;

    rig.sim.set_silent(true);
    let reason = outage_reason(run).await;
    assert!(
        reason.contains("(grace 1.5 s) during segment 1 (hold)"),
        "{reason}"
    );
}

/// A TCP relay in front of `upstream` that holds each reply carrying the PV block (a read of
/// five holding registers: function 3, byte count 10) `delay` of real time before passing it
/// on, as a loaded host or a slow link would. Every other reply passes at once.
async fn slow_pv_replies(upstream: SocketAddr, delay: Duration) -> SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = tokio::net::TcpStream::connect(upstream).await else {
                continue;
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let (mut client_rx, mut client_tx) = client.into_split();
            let (mut server_rx, mut server_tx) = server.into_split();
            tokio::spawn(async move { tokio::io::copy(&mut client_rx, &mut server_tx).await });
            tokio::spawn(async move {
                let mut buf = [0u8; 512];
                while let Ok(n) = server_rx.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    // After the 7-byte MBAP header: function code, byte count.
                    if n > 8 && buf[7] == 3 && buf[8] == 10 {
                        tokio::time::sleep(delay).await;
                    }
                    if client_tx.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

/// A segment is judged by the physical time its sample was asked for, not by when the reply
/// came back. Here each PV reply arrives 100 ms late, 2,000 s of physical time at 20,000×,
/// longer than the ramp's whole allowance (105 s + 600 s settle): judged on arrival, the first
/// sample (PV near ambient, read as the ramp starts) would fail the ramp although the furnace
/// reaches its target in physical time. The outcome must not depend on the time scale.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reply_does_not_fail_a_ramp_the_furnace_completes_in_physical_time() {
    let rig = rig(20_000.0).await;
    let relay = slow_pv_replies(rig.addr, Duration::from_millis(100)).await;
    let mut config = config(relay);
    config.modbus.timeout = Duration::from_secs(2);
    config.settle_timeout_s = 600.0;
    let dev = Eurotherm::new(config);
    let step = ppu_drivers::furnace::program_command(&[Segment::Ramp {
        temperature_c: 60.0,
        rate_c_per_min: 20.0,
    }]);
    let (ctx, _rx) = context(rig.clock);
    let result = tokio::time::timeout(Duration::from_secs(60), dev.execute(&step, ctx))
        .await
        .expect("program finishes")
        .unwrap_or_else(|e| panic!("the ramp failed on a slow link: {e}"));
    let result = furnace(result);
    assert_eq!(result.targets.len(), 1, "{:?}", result.targets);
    assert_eq!(result.targets[0].temperature_c, 60.0);
}
