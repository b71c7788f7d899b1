//! The simulated MT-SICS balance against the golden transcript taken from the manual
//! (`tests/transcripts/mt-sics.toml`): each request, sent with the balance in the state the
//! transcript names, gets the transcript's reply — byte for byte where the transcript marks it
//! exact, otherwise with the same reply identifier, status and unit (a weight's digits depend
//! on the simulated cell). Uses only the simulator's own reading of the manual, never the
//! driver's protocol code.

use std::time::Duration;

use ppu_drivers::Clock;
use ppu_sim::dispenser::Station;
use ppu_sim::dispenser::balance::{BalanceConfig, SimBalance};
use ppu_sim::pty::SerialDevice;
use serde::Deserialize;

const TRANSCRIPT: &str = include_str!("../../tests/transcripts/mt-sics.toml");

#[derive(Debug, Deserialize)]
struct Transcript {
    exchange: Vec<Exchange>,
}

#[derive(Debug, Deserialize)]
struct Exchange {
    section: String,
    request: Option<String>,
    request_hex: Option<String>,
    reply: String,
    #[serde(default)]
    sim: Sim,
}

#[derive(Debug, Default, Deserialize)]
struct Sim {
    load_g: Option<f64>,
    settle_s: Option<f64>,
    #[serde(default)]
    exact: bool,
}

fn request_bytes(x: &Exchange) -> Vec<u8> {
    match (&x.request, &x.request_hex) {
        (Some(r), None) => r.as_bytes().to_vec(),
        (None, Some(h)) => h
            .split_whitespace()
            .map(|b| u8::from_str_radix(b, 16).unwrap_or_else(|e| panic!("{h}: {e}")))
            .collect(),
        _ => panic!("{}: exactly one of request / request_hex", x.section),
    }
}

/// The balance the transcript's header describes.
fn balance() -> SimBalance {
    let config = BalanceConfig {
        capacity_g: 5100.0,
        readability_g: 0.01,
        noise_g: 0.0,
        drift_g_per_s: 0.0,
        stability_timeout_s: 2.0,
        container_g: 0.0,
        serial_number: "B021002593".to_owned(),
        model: "PG5002-S".to_owned(),
        ..BalanceConfig::default()
    };
    SimBalance::new(config, Station::new(), Clock::real())
}

/// Sends `bytes` as the host would and collects the whole reply.
async fn exchange(balance: &SimBalance, bytes: &[u8]) -> String {
    let mut out = Vec::new();
    for request in balance.receive(bytes) {
        if let Some(reply) = balance.answer(request).await {
            out.extend_from_slice(&reply);
        }
    }
    String::from_utf8(out).unwrap_or_else(|e| panic!("reply is not UTF-8: {e}"))
}

/// Identifier and status of a reply line: `S S …` → ("S", "S"); `ES` → ("ES", "").
fn head(line: &str) -> (&str, &str) {
    let mut tokens = line.split_whitespace();
    (tokens.next().unwrap_or(""), tokens.next().unwrap_or(""))
}

fn same_shape(section: &str, got: &str, want: &str) {
    let got_lines: Vec<&str> = got.trim_end_matches("\r\n").split("\r\n").collect();
    let want_lines: Vec<&str> = want.trim_end_matches("\r\n").split("\r\n").collect();
    assert!(got.ends_with("\r\n"), "{section}: {got:?}");
    if want_lines.len() > 1 {
        // A list (I0): B for every line but the last, A for the last.
        let (last, rest) = got_lines
            .split_last()
            .unwrap_or_else(|| panic!("{section}"));
        let (id, _) = head(want_lines[0]);
        for line in rest {
            assert_eq!(head(line), (id, "B"), "{section}: {got:?}");
        }
        assert_eq!(head(last), (id, "A"), "{section}: {got:?}");
        return;
    }
    assert_eq!(got_lines.len(), 1, "{section}: {got:?}");
    let (g, w) = (got_lines[0], want_lines[0]);
    assert_eq!(head(g), head(w), "{section}: got {g:?}, want {w:?}");
    if w.contains('"') {
        // Information: quoted text after the status.
        let quotes = g.matches('"').count();
        assert!(quotes >= 2 && quotes % 2 == 0, "{section}: got {g:?}");
        assert!(g.ends_with('"'), "{section}: got {g:?}");
        return;
    }
    // Same unit (last token) and field count: a weight stays `<id> <status> <value> <unit>`.
    assert_eq!(
        g.split_whitespace().last(),
        w.split_whitespace().last(),
        "{section}: got {g:?}, want {w:?}"
    );
    assert_eq!(
        g.split_whitespace().count(),
        w.split_whitespace().count(),
        "{section}: got {g:?}, want {w:?}"
    );
}

/// Paused tokio time: the balance's physical clock moves only as the transcript says.
#[tokio::test(start_paused = true)]
async fn the_simulated_balance_answers_as_the_transcript_shows() {
    let t: Transcript = toml::from_str(TRANSCRIPT).unwrap_or_else(|e| panic!("transcript: {e}"));
    let b = balance();
    let mut exact = 0;
    for x in &t.exchange {
        if let Some(load) = x.sim.load_g {
            b.set_extra_load(load);
        }
        let settle = x.sim.settle_s.unwrap_or(60.0);
        tokio::time::advance(Duration::from_secs_f64(settle)).await;
        let got = exchange(&b, &request_bytes(x)).await;
        if x.sim.exact {
            assert_eq!(got, x.reply, "{}", x.section);
            exact += 1;
        } else {
            same_shape(&x.section, &got, &x.reply);
        }
    }
    assert!(exact >= 20, "{exact}");
}

/// `SI` is answered with the identifier `S`: `S S` when the balance is stable, `S D` while it
/// settles — whatever the numbers.
#[tokio::test(start_paused = true)]
async fn si_is_answered_s_s_when_stable_and_s_d_while_settling() {
    let b = balance();
    b.set_extra_load(12.3456);
    tokio::time::advance(Duration::from_secs(60)).await;
    let stable = exchange(&b, b"SI\r\n").await;
    assert_eq!(stable, "S S      12.35 g\r\n");
    b.set_extra_load(40.0);
    tokio::time::advance(Duration::from_millis(300)).await;
    let dynamic = exchange(&b, b"SI\r\n").await;
    assert_eq!(head(&dynamic), ("S", "D"), "{dynamic:?}");
    assert!(dynamic.ends_with(" g\r\n"), "{dynamic:?}");
}
