//! The Alicat MFC driver against the simulated controller over a real pseudo-terminal: the
//! driver opens the pty (through a stable symlink) exactly as it would `/dev/ttyUSB0`. No
//! sleeps for synchronisation: every wait is on a condition or a reply, with a deadline.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use ppu_drivers::mfc::alicat::{AlicatConfig, AlicatMfc};
use ppu_drivers::transport::serial::{Framing, SerialConfig};
use ppu_drivers::{Clock, DeviceError, SafeCheck};
use ppu_sim::mfc::{MfcConfig, MfcFault, RunningMfc};
use ppu_sim::pty::FaultConfig;
use tokio_util::sync::CancellationToken;

/// Physical seconds per real second.
const SCALE: f64 = 200.0;
/// Upper bound on any test step (real time).
const DEADLINE: Duration = Duration::from_secs(30);

/// A directory removed on drop (for the stable symlink to the pty).
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "ppu-mfc-sim-{}-{}",
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

struct Rig {
    clock: Clock,
    sim: RunningMfc,
    mfc: AlicatMfc,
    _dir: TempDir,
}

async fn rig() -> Rig {
    let dir = TempDir::new();
    let clock = Clock::new(SCALE);
    let sim = RunningMfc::start(
        "mfc-1",
        MfcConfig {
            full_scale: 500.0,
            tau_s: 0.5,
            noise_fs: 0.001,
            ..MfcConfig::default()
        },
        FaultConfig::default(),
        Some(dir.0.clone()),
        clock,
    )
    .await
    .unwrap();
    let mut serial = SerialConfig::new(sim.path(), Framing::Cr);
    serial.timeout = Duration::from_millis(200);
    serial.retries = 1;
    let mut config = AlicatConfig::new("mfc-1", serial, 500.0);
    config.gases = vec!["N2".into(), "CO2".into(), "He".into()];
    config.sample_interval_s = 0.5;
    let mfc = AlicatMfc::new(config);
    Rig {
        clock,
        sim,
        mfc,
        _dir: dir,
    }
}

async fn within<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(DEADLINE, f)
        .await
        .expect("test step exceeded its deadline")
}

#[tokio::test]
async fn a_gas_flow_converges_to_its_setpoint_and_stops_at_the_end() {
    let rig = rig().await;
    let mut fractions = Vec::new();
    let cancel = CancellationToken::new();
    let trace = within(rig.mfc.run_gas_flow(
        "n2",
        100.0,
        20.0,
        &rig.clock,
        &cancel,
        |fraction, _frame| fractions.push(fraction),
    ))
    .await
    .unwrap();
    assert_eq!(trace.gas, "N2");
    assert_eq!(rig.sim.sim.gas(), "N2");
    assert!(trace.samples.len() >= 10, "{}", trace.samples.len());
    // First-order response: starts near 0, ends at the setpoint (20 s = 40 τ).
    assert!(
        trace.samples[0].mass_flow_sccm < 5.0,
        "{:?}",
        trace.samples[0]
    );
    let last = trace.samples.last().unwrap();
    assert!((last.mass_flow_sccm - 100.0).abs() < 2.0, "{last:?}");
    assert!((last.t_s - 20.0).abs() < 1e-9);
    assert!(trace.settled, "{trace:?}");
    assert!((trace.settled_flow_sccm - 100.0).abs() < 2.0);
    assert!(trace.mean_flow_sccm < trace.settled_flow_sccm + 1.0);
    assert!(trace.samples.iter().all(|s| s.setpoint_sccm == 100.0));
    assert!(trace.samples.windows(2).all(|w| w[0].t_s <= w[1].t_s));
    assert!(
        trace
            .samples
            .iter()
            .all(|s| s.pressure_psia == 14.70 && s.temperature_c == 25.0)
    );
    assert_eq!(fractions.first(), Some(&0.0));
    assert_eq!(fractions.last(), Some(&1.0));
    // The flow stops at the end of the step.
    assert_eq!(rig.sim.sim.setpoint(), 0.0);
    rig.sim.shutdown().await;
}

#[tokio::test]
async fn out_of_range_values_are_refused_before_the_wire() {
    let rig = rig().await;
    let cancel = CancellationToken::new();
    for flow in [600.0, -1.0, f64::NAN, f64::INFINITY] {
        let err = rig.mfc.set_flow(flow).await.unwrap_err();
        let DeviceError::Limit { field, .. } = &err else {
            panic!("{flow}: {err:?}");
        };
        assert_eq!(field, "flow_sccm");
        let err = rig
            .mfc
            .run_gas_flow("N2", flow, 10.0, &rig.clock, &cancel, |_, _| {})
            .await
            .unwrap_err();
        assert!(matches!(err, DeviceError::Limit { .. }), "{err:?}");
    }
    let err = rig
        .mfc
        .run_gas_flow("N2", 10.0, 0.0, &rig.clock, &cancel, |_, _| {})
        .await
        .unwrap_err();
    assert!(
        matches!(&err, DeviceError::Limit { field, .. } if field == "duration_s"),
        "{err:?}"
    );
    // A gas in the table but not plumbed to this rig, and one not in the table at all.
    for gas in ["Xe", "unobtainium"] {
        let err = rig.mfc.select_gas(gas).await.unwrap_err();
        let DeviceError::Refused { what, reason } = &err else {
            panic!("{gas}: {err:?}");
        };
        assert!(
            what.contains("gas") && reason.contains("N2, CO2, He"),
            "{err}"
        );
    }
    assert_eq!(rig.sim.sim.commands(), 0, "nothing reached the controller");
    assert_eq!(rig.sim.port.faults().requests(), 0);
    let limits = rig.mfc.limits();
    assert_eq!(limits.max_flow_sccm, 500.0);
    assert_eq!(limits.gases, ["N2", "CO2", "He"]);
    rig.sim.shutdown().await;
}

#[tokio::test]
async fn a_status_fault_stops_the_run_and_the_flow() {
    let rig = rig().await;
    let cancel = CancellationToken::new();
    let sim = rig.sim.sim.clone();
    let mut frames = 0;
    let err = within(
        rig.mfc
            .run_gas_flow("CO2", 250.0, 1_000.0, &rig.clock, &cancel, |_, _| {
                frames += 1;
                if frames == 5 {
                    sim.set_fault(Some(MfcFault::Sensor));
                }
            }),
    )
    .await
    .unwrap_err();
    let DeviceError::Fault(msg) = &err else {
        panic!("{err:?}");
    };
    assert!(msg.contains("ADC") && msg.contains("mfc-1"), "{msg}");
    assert_eq!(frames, 6, "the first frame with ADC stops the run");
    // The setpoint went back to 0 even though the sensor is faulty.
    assert_eq!(rig.sim.sim.setpoint(), 0.0);
    rig.sim.sim.set_fault(None);
    assert_eq!(
        within(rig.mfc.confirm_safe()).await.unwrap(),
        SafeCheck::Safe
    );
    rig.sim.shutdown().await;
}

#[tokio::test]
async fn cancelling_a_run_aborts_it_at_setpoint_zero() {
    let rig = rig().await;
    let cancel = CancellationToken::new();
    let token = cancel.clone();
    let err = within(rig.mfc.run_gas_flow(
        "He",
        50.0,
        100_000.0,
        &rig.clock,
        &cancel,
        move |fraction, _| {
            if fraction > 0.0 {
                token.cancel();
            }
        },
    ))
    .await
    .unwrap_err();
    assert!(matches!(err, DeviceError::Aborted), "{err:?}");
    assert_eq!(rig.sim.sim.setpoint(), 0.0);
    rig.sim.shutdown().await;
}

#[tokio::test]
async fn safe_state_is_confirmed_by_reading_the_setpoint_back() {
    let rig = rig().await;
    let frame = within(rig.mfc.set_flow(200.0)).await.unwrap();
    assert_eq!(frame.setpoint, 200.0);
    let SafeCheck::NotSafe(why) = within(rig.mfc.confirm_safe()).await.unwrap() else {
        panic!("a 200 SCCM setpoint is not safe");
    };
    assert!(why[0].contains("200"), "{why:?}");
    let (readings, alarms) = rig.mfc.readings(&within(rig.mfc.poll()).await.unwrap());
    assert!(readings.contains(&("setpoint_sccm", 200.0)), "{readings:?}");
    assert!(alarms.is_empty());
    rig.sim.sim.set_fault(Some(MfcFault::OverPressure));
    let (_, alarms) = rig.mfc.readings(&within(rig.mfc.poll()).await.unwrap());
    assert_eq!(alarms, ["OPL: over pressure limit"]);
    rig.sim.sim.set_fault(None);
    within(rig.mfc.safe_state()).await.unwrap();
    assert_eq!(rig.sim.sim.setpoint(), 0.0);
    assert_eq!(
        within(rig.mfc.confirm_safe()).await.unwrap(),
        SafeCheck::Safe
    );
    rig.sim.shutdown().await;
}

#[tokio::test]
async fn a_silent_or_unplugged_controller_times_out_then_reconnects() {
    let rig = rig().await;
    within(rig.mfc.poll()).await.unwrap();
    assert!(rig.mfc.transport().is_connected());

    // No reply: a timeout after the bounded retries, in real time, not a hang.
    rig.sim.port.faults().set_silent(true);
    let err = within(rig.mfc.poll()).await.unwrap_err();
    assert!(matches!(err, DeviceError::Timeout { .. }), "{err:?}");
    assert!(err.is_transient());
    assert!(!rig.mfc.transport().is_connected());
    rig.sim.port.faults().set_silent(false);
    within(rig.mfc.poll()).await.unwrap();

    // Noise before a reply is skipped.
    rig.sim.port.faults().garbage_next(2);
    within(rig.mfc.set_flow(10.0)).await.unwrap();

    // The adapter is pulled: the link fails cleanly; plugged back in, the same path works.
    rig.sim.port.unplug().await;
    let err = within(rig.mfc.poll()).await.unwrap_err();
    assert!(err.is_transient(), "{err:?}");
    rig.sim.port.plug().await.unwrap();
    let frame = within(rig.mfc.poll()).await.unwrap();
    assert_eq!(frame.setpoint, 10.0, "the controller kept its setpoint");
    within(rig.mfc.safe_state()).await.unwrap();
    assert_eq!(
        within(rig.mfc.confirm_safe()).await.unwrap(),
        SafeCheck::Safe
    );
    rig.sim.shutdown().await;
}

/// A line that answers every request with the same fixed reply: for replies the simulated
/// controller never sends (the driver must not depend on the simulator for them).
struct Fixed(&'static str);

impl ppu_sim::pty::SerialDevice for Fixed {
    fn receive(&self, bytes: &[u8]) -> Vec<ppu_sim::pty::Request> {
        bytes
            .iter()
            .filter(|b| **b == b'\r')
            .map(|_| ppu_sim::pty::Request {
                bytes: Vec::new(),
                kind: ppu_sim::pty::RequestKind::Plain,
            })
            .collect()
    }

    fn answer(&self, _request: ppu_sim::pty::Request) -> ppu_sim::pty::ReplyFuture {
        Box::pin(std::future::ready(Some(self.0.as_bytes().to_vec())))
    }
}

async fn fixed_line(reply: &'static str) -> (ppu_sim::pty::PtyServer, AlicatMfc) {
    let port = ppu_sim::pty::PtyServer::start(
        std::sync::Arc::new(Fixed(reply)),
        FaultConfig::default(),
        None,
    )
    .await
    .unwrap();
    let mut serial = SerialConfig::new(port.path(), Framing::Cr);
    serial.timeout = Duration::from_millis(200);
    serial.retries = 1;
    let mfc = AlicatMfc::new(AlicatConfig::new("mfc-x", serial, 500.0));
    (port, mfc)
}

#[tokio::test]
async fn a_corrupt_frame_is_asked_again_then_reported_as_corrupt() {
    let (port, mfc) = fixed_line("A +014.70 +0x5.00 +000.00 +000.00 +000.00 CO2\r").await;
    let err = within(mfc.poll()).await.unwrap_err();
    let DeviceError::Corrupt { what, reason } = &err else {
        panic!("{err:?}");
    };
    assert!(
        what.contains("mfc-x") && reason.contains("temperature"),
        "{err}"
    );
    assert_eq!(
        port.faults().requests(),
        2,
        "asked once more before giving up"
    );
    port.shutdown().await;
}

#[tokio::test]
async fn a_refusal_is_a_refused_error_and_a_neighbours_frame_is_not_an_answer() {
    let (port, mfc) = fixed_line("?\r").await;
    let err = within(mfc.set_flow(10.0)).await.unwrap_err();
    assert!(matches!(err, DeviceError::Refused { .. }), "{err:?}");
    port.shutdown().await;

    let (port, mfc) = fixed_line("B +014.70 +025.00 +000.00 +000.00 +000.00 CO2\r").await;
    let err = within(mfc.poll()).await.unwrap_err();
    assert!(matches!(err, DeviceError::Timeout { .. }), "{err:?}");
    port.shutdown().await;
}

#[tokio::test]
async fn a_setpoint_the_controller_does_not_take_is_refused() {
    // A controller whose setpoint source is analog answers with its old setpoint.
    let (port, mfc) = fixed_line("A +014.70 +025.00 +000.00 +000.00 +000.00 CO2\r").await;
    let err = within(mfc.set_flow(100.0)).await.unwrap_err();
    let DeviceError::Refused { reason, .. } = &err else {
        panic!("{err:?}");
    };
    assert!(reason.contains("setpoint 0"), "{err}");
    let err = within(mfc.select_gas("N2")).await.unwrap_err();
    assert!(
        matches!(&err, DeviceError::Refused { reason, .. } if reason.contains("CO2")),
        "{err:?}"
    );
    port.shutdown().await;
}
