//! The MT-SICS driver against the golden transcript taken from the manual
//! (`tests/transcripts/mt-sics.toml`): every reply parses to the meaning the transcript gives,
//! is accepted as an answer to the command that was sent, and the driver sends exactly the
//! request bytes the transcript shows. Uses only the driver's protocol code, never the
//! simulator's (a shared misreading would pass both: it happened with `SI`).

use ppu_drivers::balance::sics::protocol::{Command, Reply, Unit, parse_reply};
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
    command: Option<String>,
    meaning: OneOrMany,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(Meaning),
    Many(Vec<Meaning>),
}

#[derive(Debug, Deserialize)]
struct Meaning {
    kind: String,
    stable: Option<bool>,
    value: Option<f64>,
    unit: Option<String>,
    text: Option<String>,
    more: Option<bool>,
}

fn load() -> Vec<Exchange> {
    let t: Transcript = toml::from_str(TRANSCRIPT).unwrap_or_else(|e| panic!("transcript: {e}"));
    assert!(!t.exchange.is_empty());
    t.exchange
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

/// The driver's command for the transcript's name for it.
fn command(name: &str) -> Command {
    match name {
        "weigh" => Command::Weigh,
        "weigh_immediate" => Command::WeighImmediate,
        "zero" => Command::Zero,
        "zero_immediate" => Command::ZeroImmediate,
        "tare" => Command::Tare,
        "tare_value" => Command::TareValue,
        "clear_tare" => Command::ClearTare,
        "reset" => Command::Reset,
        other => {
            let n = other
                .strip_prefix("info")
                .and_then(|n| n.parse::<u8>().ok())
                .unwrap_or_else(|| panic!("unknown command name {other:?}"));
            Command::Info(n)
        }
    }
}

fn check_meaning(section: &str, line: &str, reply: &Reply, m: &Meaning) {
    let ctx = format!("{section}: {line:?} parsed as {reply:?}");
    match (m.kind.as_str(), reply) {
        ("weight", Reply::Weight { weight, .. }) => {
            assert_eq!(Some(weight.stable), m.stable, "{ctx}");
            let value = m.value.unwrap_or_else(|| panic!("{ctx}: value"));
            assert!((weight.value - value).abs() < 1e-9, "{ctx}");
            let unit = match m.unit.as_deref() {
                Some("g") => Unit::Gram,
                Some("mg") => Unit::Milligram,
                Some("kg") => Unit::Kilogram,
                other => panic!("{ctx}: unit {other:?}"),
            };
            assert_eq!(weight.unit, unit, "{ctx}");
        }
        ("done", Reply::Done { .. })
        | ("not_executable", Reply::NotExecutable { .. })
        | ("overload", Reply::Overload { .. })
        | ("underload", Reply::Underload { .. })
        | ("logical", Reply::Logical { .. })
        | ("syntax_error", Reply::SyntaxError)
        | ("transmission_error", Reply::TransmissionError)
        | ("logical_error", Reply::LogicalError) => {}
        ("info", Reply::Info { text, more, .. }) => {
            assert_eq!(Some(text.as_str()), m.text.as_deref(), "{ctx}");
            assert_eq!(Some(*more), m.more, "{ctx}");
        }
        (kind, _) => panic!("{ctx}: expected a {kind}"),
    }
}

#[test]
fn every_reply_in_the_transcript_parses_to_its_meaning() {
    let mut checked = 0;
    for x in load() {
        let lines: Vec<&str> = x
            .reply
            .strip_suffix("\r\n")
            .unwrap_or_else(|| panic!("{}: reply must end in CR LF", x.section))
            .split("\r\n")
            .collect();
        let meanings = match &x.meaning {
            OneOrMany::One(m) => std::slice::from_ref(m),
            OneOrMany::Many(ms) => ms.as_slice(),
        };
        assert_eq!(lines.len(), meanings.len(), "{}", x.section);
        for (line, m) in lines.iter().zip(meanings) {
            let reply = parse_reply(line.as_bytes())
                .unwrap_or_else(|e| panic!("{}: {line:?}: {e}", x.section));
            check_meaning(&x.section, line, &reply, m);
            if let Some(name) = &x.command {
                assert!(
                    command(name).accepts(&reply),
                    "{}: the driver does not take {line:?} as an answer to {name}",
                    x.section
                );
            }
            checked += 1;
        }
    }
    assert!(checked >= 25, "{checked}");
}

#[test]
fn the_driver_sends_the_requests_the_transcript_shows() {
    let mut checked = 0;
    for x in load() {
        let bytes = request_bytes(&x);
        if let Some(name) = &x.command {
            assert_eq!(
                command(name).encode(),
                bytes,
                "{}: the driver's {name}",
                x.section
            );
            checked += 1;
        }
    }
    assert!(checked >= 20, "{checked}");
}

/// The reply the issue was about: `SI` is answered `S S …` / `S D …`; both `S` and `SI` take
/// the same identifier, so only the command sent tells them apart.
#[test]
fn si_replies_carry_the_s_identifier() {
    let si: Vec<Exchange> = load()
        .into_iter()
        .filter(|x| x.command.as_deref() == Some("weigh_immediate"))
        .collect();
    assert!(si.len() >= 3);
    for x in &si {
        let line = x.reply.trim_end();
        let reply = parse_reply(line.as_bytes()).unwrap();
        assert_eq!(reply.id(), Some("S"), "{}", x.section);
        assert!(Command::WeighImmediate.accepts(&reply), "{}", x.section);
    }
    assert!(si.iter().any(|x| x.reply.starts_with("S D ")));
    assert!(si.iter().any(|x| x.reply.starts_with("S S ")));
}

/// A balance that answers each command with a line taken from the transcript, nothing else:
/// the driver's status polling and weighing, over a real pty, against the manual's replies
/// rather than against the simulator's reading of the manual.
struct ScriptedBalance {
    replies: std::sync::Mutex<std::collections::HashMap<String, String>>,
    input: std::sync::Mutex<Vec<u8>>,
}

impl ScriptedBalance {
    fn set(&self, command: &str, reply: &str) {
        let known = load().iter().any(|x| x.reply == reply);
        assert!(known, "{reply:?} is not in the transcript");
        self.replies
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(command.to_owned(), reply.to_owned());
    }
}

impl ppu_sim::pty::SerialDevice for ScriptedBalance {
    fn receive(&self, bytes: &[u8]) -> Vec<ppu_sim::pty::Request> {
        let mut input = self.input.lock().unwrap_or_else(|p| p.into_inner());
        input.extend_from_slice(bytes);
        let mut out = Vec::new();
        while let Some(i) = input.windows(2).position(|w| w == b"\r\n") {
            let line: Vec<u8> = input.drain(..i + 2).take(i).collect();
            out.push(ppu_sim::pty::Request {
                bytes: line,
                kind: ppu_sim::pty::RequestKind::Plain,
            });
        }
        out
    }

    fn answer(&self, request: ppu_sim::pty::Request) -> ppu_sim::pty::ReplyFuture {
        let command = String::from_utf8_lossy(&request.bytes).into_owned();
        let reply = self
            .replies
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&command)
            .cloned()
            .unwrap_or_else(|| "ES\r\n".to_owned());
        Box::pin(std::future::ready(Some(reply.into_bytes())))
    }
}

#[tokio::test]
async fn status_and_weighing_work_with_the_manuals_replies() {
    use ppu_drivers::balance::schema::WeighResult;
    use ppu_drivers::balance::sics::{SicsBalance, SicsConfig, SicsError};

    use ppu_drivers::transport::serial::{Framing, SerialConfig};
    use ppu_drivers::{Clock, Device, StepContext};
    use std::sync::Arc;
    use std::time::Duration;

    let script = Arc::new(ScriptedBalance {
        replies: Default::default(),
        input: Default::default(),
    });
    let port =
        ppu_sim::pty::PtyServer::start(script.clone(), ppu_sim::pty::FaultConfig::default(), None)
            .await
            .unwrap_or_else(|e| panic!("pty: {e}"));
    let mut serial = SerialConfig::new(port.path(), Framing::CrLf);
    serial.timeout = Duration::from_millis(500);
    serial.retries = 1;
    let balance = SicsBalance::new(SicsConfig::new("balance-1", serial));

    // Status polls with `SI`; a dynamic weight is answered `S D`.
    script.set("SI", "S D     129.07 g\r\n");
    let status = balance.status().await.unwrap_or_else(|e| panic!("{e}"));
    let reading = |name: &str| {
        status
            .readings
            .iter()
            .find(|r| r.name == name)
            .map(|r| r.value)
    };
    assert_eq!(reading("mass_g"), Some(129.07));
    assert_eq!(reading("stable"), Some(0.0));
    assert!(balance.transport().is_connected());

    // Overload while polling is an alarm of the balance, not a lost link.
    script.set("SI", "S +\r\n");
    let status = balance.status().await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        status.alarms,
        vec!["balance overload (S + in answer to SI)".to_owned()]
    );

    // A stable weight.
    script.set("S", "S S     100.00 g\r\n");
    let w = balance
        .weigh_stable(Duration::from_secs(1))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(w.stable && (w.grams() - 100.0).abs() < 1e-9, "{w:?}");

    // No stability: `S I` until the driver's timeout, then the weigh step falls back to `SI`.
    script.set("S", "S I\r\n");
    script.set("SI", "S D     129.07 g\r\n");
    let err = balance
        .weigh_stable(Duration::from_millis(200))
        .await
        .unwrap_err();
    assert!(
        matches!(err, SicsError::Unstable { last_g: Some(g), .. } if (g - 129.07).abs() < 1e-9),
        "{err:?}"
    );
    let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
    let ctx = StepContext {
        clock: Clock::real(),
        updates: tx,
        cancel: tokio_util::sync::CancellationToken::new(),
        sample_id: "S-1".into(),
        experiment_id: "E-1".into(),
    };
    let out = balance
        .execute(&ppu_drivers::balance::weigh_command(Some(0.2)), ctx)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let Some(WeighResult { mass_g, stable }) =
        (out).decode::<ppu_drivers::balance::schema::WeighResult>()
    else {
        panic!("{out:?}");
    };
    assert!(!stable && (mass_g - 129.07).abs() < 1e-9);
    port.shutdown().await;
}
