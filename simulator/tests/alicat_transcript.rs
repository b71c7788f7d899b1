//! The simulated Alicat controller against the golden transcript taken from Alicat's manuals
//! (`tests/transcripts/alicat.toml`): each request, sent with the controller in the state the
//! transcript names, gets the transcript's reply byte for byte. Uses only the simulator's own
//! reading of the manual, never the driver's protocol code.

use std::time::Duration;

use ppu_drivers::Clock;
use ppu_sim::mfc::{MfcConfig, MfcFault, SimMfc};
use ppu_sim::pty::SerialDevice;
use serde::Deserialize;

const TRANSCRIPT: &str = include_str!("../../tests/transcripts/alicat.toml");

#[derive(Debug, Deserialize)]
struct Transcript {
    exchange: Vec<Exchange>,
}

#[derive(Debug, Deserialize)]
struct Exchange {
    section: String,
    request: String,
    reply: String,
    #[serde(default)]
    sim: Sim,
}

#[derive(Debug, Default, Deserialize)]
struct Sim {
    settle_s: Option<f64>,
    fault: Option<String>,
    #[serde(default)]
    skip: bool,
}

/// The controller the transcript's header describes.
fn controller() -> SimMfc {
    let cfg = MfcConfig {
        unit_id: 'A',
        full_scale: 500.0,
        tau_s: 0.5,
        pressure_psia: 14.70,
        temperature_c: 25.0,
        gas: 4,
        noise_fs: 0.0,
        ..MfcConfig::default()
    };
    SimMfc::new(cfg, Clock::new(1.0))
}

#[tokio::test(start_paused = true)]
async fn the_simulator_answers_as_the_manual_shows() {
    let t: Transcript = toml::from_str(TRANSCRIPT).unwrap_or_else(|e| panic!("transcript: {e}"));
    let mfc = controller();
    let mut checked = 0;
    for x in &t.exchange {
        if x.sim.skip {
            continue;
        }
        if let Some(s) = x.sim.settle_s {
            tokio::time::advance(Duration::from_secs_f64(s)).await;
        }
        let fault = x.sim.fault.as_deref().map(|f| match f {
            "sensor" => MfcFault::Sensor,
            "overpressure" => MfcFault::OverPressure,
            other => panic!("{}: unknown fault {other}", x.section),
        });
        mfc.set_fault(fault);
        let mut got = Vec::new();
        for request in mfc.receive(x.request.as_bytes()) {
            if let Some(reply) = mfc.answer(request).await {
                got.extend_from_slice(&reply);
            }
        }
        mfc.set_fault(None);
        assert_eq!(String::from_utf8_lossy(&got), x.reply, "{}", x.section);
        checked += 1;
    }
    assert!(checked >= 9, "{checked}");
}
