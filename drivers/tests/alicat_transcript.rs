//! The Alicat driver's codec against the golden transcript taken from Alicat's manuals
//! (`tests/transcripts/alicat.toml`): the driver sends exactly the request bytes the transcript
//! shows, and every reply parses to the transcript's meaning. Uses only the driver's protocol
//! code, never the simulator's.

use ppu_drivers::mfc::alicat::protocol::{Command, Reply, Status, UnitId, parse_reply};
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
    command: Option<String>,
    meaning: Meaning,
}

#[derive(Debug, Deserialize)]
struct Meaning {
    kind: String,
    pressure: Option<f64>,
    temperature: Option<f64>,
    volumetric: Option<f64>,
    mass: Option<f64>,
    setpoint: Option<f64>,
    gas: Option<String>,
    #[serde(default)]
    status: Vec<String>,
}

fn load() -> Vec<Exchange> {
    let t: Transcript = toml::from_str(TRANSCRIPT).unwrap_or_else(|e| panic!("transcript: {e}"));
    assert!(t.exchange.len() >= 8);
    t.exchange
}

fn command(text: &str) -> Command {
    let mut words = text.split_whitespace();
    match (words.next(), words.next()) {
        (Some("poll"), None) => Command::Poll,
        (Some("setpoint"), Some(v)) => Command::Setpoint(v.parse().expect("setpoint value")),
        (Some("gas"), Some(n)) => Command::Gas(n.parse().expect("gas number")),
        _ => panic!("unknown command {text:?}"),
    }
}

#[test]
fn the_driver_sends_the_manual_requests() {
    let unit = UnitId::default();
    let mut checked = 0;
    for x in load() {
        let Some(name) = &x.command else { continue };
        assert_eq!(
            String::from_utf8_lossy(&command(name).encode(unit)),
            x.request,
            "{}",
            x.section
        );
        checked += 1;
    }
    assert!(checked >= 7);
}

#[test]
fn every_reply_parses_to_its_meaning() {
    for x in load() {
        let m = &x.meaning;
        if m.kind == "none" {
            assert!(x.reply.is_empty(), "{}", x.section);
            continue;
        }
        let line = x
            .reply
            .strip_suffix('\r')
            .unwrap_or_else(|| panic!("{}: reply must end in CR", x.section));
        assert!(
            !line.contains('\r') && !line.contains('\n'),
            "{}",
            x.section
        );
        let reply = parse_reply(line.as_bytes()).unwrap_or_else(|e| panic!("{}: {e}", x.section));
        if let Some(unit) = reply.unit() {
            assert_eq!(unit, UnitId::default(), "{}", x.section);
        }
        match (m.kind.as_str(), reply) {
            ("unknown", Reply::Unknown(_)) => {}
            ("data", Reply::Data(d)) => {
                let close = |got: f64, want: Option<f64>, field: &str| {
                    let want =
                        want.unwrap_or_else(|| panic!("{}: meaning lacks {field}", x.section));
                    assert!(
                        (got - want).abs() < 1e-9,
                        "{}: {field} {got} != {want}",
                        x.section
                    );
                };
                close(d.pressure_psia, m.pressure, "pressure");
                close(d.temperature_c, m.temperature, "temperature");
                close(d.volumetric_flow, m.volumetric, "volumetric");
                close(d.mass_flow, m.mass, "mass");
                close(d.setpoint, m.setpoint, "setpoint");
                assert_eq!(Some(&d.gas), m.gas.as_ref(), "{}", x.section);
                let want: Vec<Status> = m
                    .status
                    .iter()
                    .map(|w| Status::parse(w).unwrap_or_else(|| panic!("{}: {w}", x.section)))
                    .collect();
                assert_eq!(d.status, want, "{}", x.section);
            }
            (kind, other) => panic!("{}: meaning {kind}, parsed {other:?}", x.section),
        }
    }
}

#[test]
fn a_corrupted_transcript_reply_is_an_error_not_a_panic() {
    for x in load() {
        let line = x.reply.trim_end_matches('\r').as_bytes().to_vec();
        // Every single-byte deletion either still parses or is a typed error.
        for i in 0..line.len() {
            let mut cut = line.clone();
            cut.remove(i);
            let _ = parse_reply(&cut);
        }
    }
}
