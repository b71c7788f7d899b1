//! Read-back of the safe state (`Device::confirm_safe`) against the simulated controller over
//! real Modbus TCP: the driver must report what the registers say, not what it last wrote.

use std::time::Duration;

use ppu_drivers::analyser::{SorptionAnalyser, SorptionConfig};
use ppu_drivers::dispenser::ne1000::{Ne1000Config, Ne1000Pump};
use ppu_drivers::furnace::eurotherm::{Eurotherm, EurothermConfig, registers};
use ppu_drivers::transport::modbus::{ModbusConfig, ModbusEndpoint};
use ppu_drivers::transport::mqtt::{BrokerUrl, MqttConfig};
use ppu_drivers::transport::serial::{Framing, SerialConfig};
use ppu_drivers::{Clock, Device, Limits, SafeCheck, StepContext};
use ppu_sim::analyser::{SimAnalyser, SimAnalyserConfig};
use ppu_sim::broker::EmbeddedBroker;
use ppu_sim::dispenser::pump::PumpConfig;
use ppu_sim::dispenser::{PumpSpec, SimStation, StationSpec};
use ppu_sim::furnace::{FurnaceConfig, SimFurnace};
use ppu_sim::modbus::serve_tcp;
use ppu_sim::pty::FaultConfig;
use ppu_sim::world::World;
use tokio_util::sync::CancellationToken;

/// Upper bound on any wait (real time).
const DEADLINE: Duration = Duration::from_secs(30);

fn deviations(check: SafeCheck) -> Vec<String> {
    match check {
        SafeCheck::Safe => Vec::new(),
        SafeCheck::NotSafe(d) => d,
    }
}

#[tokio::test]
async fn a_eurotherm_is_confirmed_safe_only_when_its_registers_read_back_safe() {
    let sim = SimFurnace::new(FurnaceConfig::default(), Clock::new(1.0));
    let server = serve_tcp("127.0.0.1:0".parse().unwrap(), sim.clone())
        .await
        .expect("serve simulator");
    let mut modbus = ModbusConfig::new(ModbusEndpoint::Tcp(server.local_addr()));
    modbus.timeout = Duration::from_millis(500);
    let mut config = EurothermConfig::new("furnace-1", modbus);
    config.safe_setpoint_c = 25.0;
    let furnace = Eurotherm::new(config);

    // A controller left heating, on a rate limit, in manual: three deviations, each naming
    // its register and the value read.
    sim.write_register(registers::TARGET_SP, 1500).unwrap();
    sim.write_register(registers::SP_RATE_LIMIT, 100).unwrap();
    sim.write_register(registers::AUTO_MANUAL, 1).unwrap();
    let d = deviations(furnace.confirm_safe().await.expect("read-back"));
    assert_eq!(d.len(), 3, "{d:?}");
    assert!(d[0].contains("register 2") && d[0].contains("150"), "{d:?}");
    assert!(d[1].contains("register 35") && d[1].contains("10"), "{d:?}");
    assert!(
        d[2].contains("register 273") && d[2].contains("reads 1"),
        "{d:?}"
    );

    // The safe state written: the read-back agrees.
    furnace.safe_state().await.expect("safe state");
    assert_eq!(furnace.confirm_safe().await, Ok(SafeCheck::Safe));
    assert_eq!(sim.snapshot().target_sp_c, 25.0);

    // Below the safe value is safe too (a furnace is never heated to be safe).
    sim.write_register(registers::TARGET_SP, 0).unwrap();
    assert_eq!(furnace.confirm_safe().await, Ok(SafeCheck::Safe));

    // A power-cycled controller back at a power-up setpoint above the safe value: not safe,
    // although nothing ppud wrote failed.
    sim.write_register(registers::TARGET_SP, 400).unwrap();
    let d = deviations(furnace.confirm_safe().await.expect("read-back"));
    assert_eq!(d.len(), 1, "{d:?}");
    assert!(d[0].contains("40"), "{d:?}");

    // A silent controller: the read-back is a transient error, never "safe".
    sim.set_silent(true);
    let e = furnace.confirm_safe().await.unwrap_err();
    assert!(e.is_transient(), "{e}");
    server.shutdown().await;
}

#[tokio::test]
async fn an_ne1000_is_confirmed_safe_only_when_it_reports_stopped() {
    let clock = Clock::new(10.0);
    let station = SimStation::start(
        StationSpec {
            pumps: vec![PumpSpec {
                id: "pump-a".into(),
                config: PumpConfig {
                    reagent: "A".into(),
                    ..PumpConfig::default()
                },
            }],
            balance: None,
            faults: FaultConfig::default(),
            link_dir: None,
            world: None,
            chain: None,
        },
        clock,
    )
    .await
    .expect("station starts");
    let mut serial = SerialConfig::new(station.pumps[0].port.path(), Framing::Ne1000);
    serial.timeout = Duration::from_millis(300);
    let mut config = Ne1000Config::new("pump-a", serial, "A");
    config.fill_ml = 10.0;
    config.limits = Limits::default()
        .with("max_rate_ml_per_min", 20.0)
        .with("max_volume_ml", 10.0);
    let pump = std::sync::Arc::new(Ne1000Pump::new(config, None));
    assert_eq!(pump.confirm_safe().await, Ok(SafeCheck::Safe));

    // A slow dispense (5 mL at 0.1 mL/min: 50 min physical, 5 min real) runs in the
    // background; while it infuses the pump is not safe.
    let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
    let cancel = CancellationToken::new();
    let ctx = StepContext {
        clock,
        updates: tx,
        cancel: cancel.clone(),
        sample_id: "S-1".into(),
        experiment_id: "E-1".into(),
    };
    let running = {
        let pump = pump.clone();
        tokio::spawn(async move {
            let step = ppu_drivers::dispenser::StepKind::Dispense {
                reagent: "A".into(),
                volume_ml: 5.0,
                rate_ml_per_min: 0.1,
            }
            .pack();
            pump.execute(&step, ctx).await
        })
    };
    let give_up = tokio::time::Instant::now() + DEADLINE;
    let d = loop {
        if let Ok(SafeCheck::NotSafe(d)) = pump.confirm_safe().await {
            break d;
        }
        assert!(tokio::time::Instant::now() < give_up, "the pump never ran");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(d[0].contains("'I'"), "{d:?}");

    // STP: stopped, and the read-back says so.
    pump.safe_state().await.expect("safe state");
    assert_eq!(pump.confirm_safe().await, Ok(SafeCheck::Safe));
    cancel.cancel();
    let _ = running.await;
    station.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_analyser_is_confirmed_safe_only_when_its_bridge_reports_idle() {
    let broker = EmbeddedBroker::start("127.0.0.1:0".parse().unwrap())
        .await
        .expect("embedded broker");
    let url: BrokerUrl = broker.url().parse().expect("broker url");
    let prefix = format!("test/safe/{}", std::process::id());
    let clock = Clock::new(1000.0);
    let mut sc = SimAnalyserConfig::new(url.host.clone(), url.port, "asap-1");
    sc.topic_prefix = prefix.clone();
    sc.client_id = format!("sim-safe-{}", std::process::id());
    let _sim = SimAnalyser::start(sc, World::new(42), clock);
    let mut mqtt = MqttConfig::new(url.clone(), format!("ppud-safe-{}", std::process::id()));
    mqtt.reconnect_max = Duration::from_millis(500);
    mqtt.ack_timeout = Duration::from_secs(2);
    let mut dc = SorptionConfig::new("analyser-1", mqtt);
    dc.topic_prefix = prefix;
    dc.bridge_id = "asap-1".into();
    let analyser = std::sync::Arc::new(SorptionAnalyser::new(dc));

    let give_up = tokio::time::Instant::now() + DEADLINE;
    while analyser.confirm_safe().await != Ok(SafeCheck::Safe) {
        assert!(
            tokio::time::Instant::now() < give_up,
            "the bridge never came up idle"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // A long degas (4 h physical, ~15 s real) keeps the bridge busy: not safe.
    let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
    let ctx = StepContext {
        clock,
        updates: tx,
        cancel: CancellationToken::new(),
        sample_id: "ref-13X-1".into(),
        experiment_id: "E-1".into(),
    };
    let running = {
        let analyser = analyser.clone();
        tokio::spawn(async move {
            let step = ppu_drivers::analyser::StepKind::Degas {
                temperature_c: 300.0,
                duration_s: 4.0 * 3600.0,
            }
            .pack();
            analyser.execute(&step, ctx).await
        })
    };
    let d = loop {
        if let Ok(SafeCheck::NotSafe(d)) = analyser.confirm_safe().await {
            break d;
        }
        assert!(tokio::time::Instant::now() < give_up, "the degas never ran");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(d[0].contains("busy"), "{d:?}");

    // The abort: the bridge reports idle again (after its operation has wound down).
    analyser.safe_state().await.expect("abort acknowledged");
    while analyser.confirm_safe().await != Ok(SafeCheck::Safe) {
        assert!(
            tokio::time::Instant::now() < give_up,
            "still busy after the abort"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let outcome = running.await.expect("step task");
    assert!(
        outcome.is_err(),
        "an aborted degas cannot succeed: {outcome:?}"
    );
}
