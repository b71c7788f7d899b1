//! The simulated NE-1000 pump against the golden transcript taken from the manual
//! (`tests/transcripts/ne1000.toml`): the requests, sent in order to one freshly powered pump
//! as the host would send them, get exactly the transcript's replies — basic and safe-mode
//! frames, CRCs, errors, alarms, addressing and `ADR`. Uses only the simulator's own reading of
//! the manual, never the driver's protocol code.

use std::time::Duration;

use ppu_drivers::Clock;
use ppu_sim::dispenser::pump::{PumpConfig, SimPump};
use ppu_sim::pty::SerialDevice;
use serde::Deserialize;

const TRANSCRIPT: &str = include_str!("../../tests/transcripts/ne1000.toml");

#[derive(Debug, Deserialize)]
struct Transcript {
    exchange: Vec<Exchange>,
}

#[derive(Debug, Deserialize)]
struct Exchange {
    section: String,
    request: Option<String>,
    request_hex: Option<String>,
    reply: Option<String>,
    reply_hex: Option<String>,
    #[serde(default)]
    no_reply: bool,
    #[serde(default)]
    sim: Sim,
}

#[derive(Debug, Default, Deserialize)]
struct Sim {
    advance_s: Option<f64>,
}

fn bytes(section: &str, text: &Option<String>, hex: &Option<String>) -> Option<Vec<u8>> {
    match (text, hex) {
        (Some(t), None) => Some(t.as_bytes().to_vec()),
        (None, Some(h)) => Some(
            h.split_whitespace()
                .map(|b| u8::from_str_radix(b, 16).unwrap_or_else(|e| panic!("{section}: {e}")))
                .collect(),
        ),
        (None, None) => None,
        _ => panic!("{section}: both text and hex"),
    }
}

/// Sends `bytes` as the host would and collects every reply they produce.
async fn exchange(pump: &SimPump, bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for request in pump.receive(bytes) {
        if let Some(reply) = pump.answer(request).await {
            out.extend_from_slice(&reply);
        }
    }
    out
}

/// Paused tokio time: the plunger moves only as far as the transcript lets time pass.
#[tokio::test(start_paused = true)]
async fn the_simulated_pump_answers_as_the_transcript_shows() {
    let t: Transcript = toml::from_str(TRANSCRIPT).unwrap_or_else(|e| panic!("transcript: {e}"));
    // The transcript's pump: address 0, 10 mL syringe (14.43 mm), power-up alarm pending.
    let pump = SimPump::new(PumpConfig::default(), Clock::real(), None);
    let mut replies = 0;
    for x in &t.exchange {
        if let Some(s) = x.sim.advance_s {
            tokio::time::advance(Duration::from_secs_f64(s)).await;
        }
        let request = bytes(&x.section, &x.request, &x.request_hex)
            .unwrap_or_else(|| panic!("{}: request", x.section));
        let got = exchange(&pump, &request).await;
        match bytes(&x.section, &x.reply, &x.reply_hex) {
            Some(want) => {
                assert_eq!(
                    got,
                    want,
                    "{}: got {:?}, want {:?}",
                    x.section,
                    String::from_utf8_lossy(&got),
                    String::from_utf8_lossy(&want)
                );
                replies += 1;
            }
            None => {
                assert!(x.no_reply, "{}: a reply or no_reply", x.section);
                assert!(got.is_empty(), "{}: unexpected {got:02X?}", x.section);
            }
        }
    }
    assert!(replies >= 25, "{replies}");
}
