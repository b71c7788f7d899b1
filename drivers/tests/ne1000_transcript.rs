//! The NE-1000 driver against the golden transcript taken from the manual
//! (`tests/transcripts/ne1000.toml`): every reply frame (basic and safe mode) decodes to the
//! meaning the transcript gives, the driver encodes its commands to exactly the request bytes
//! shown, and the driver's CRC agrees with every request frame (one of them quoted from the
//! manual). Uses only the driver's protocol code, never the simulator's.

use ppu_drivers::dispenser::ne1000::protocol::{
    Alarm, Command, Direction, PumpError, RateUnit, ReplyBody, Status, VolumeUnit, parse_dispensed,
    parse_rate, parse_reply, parse_volume,
};
use ppu_drivers::transport::serial::{FrameDecoder, Framing, crc16_ccitt};
use serde::Deserialize;

const TRANSCRIPT: &str = include_str!("../../tests/transcripts/ne1000.toml");
const STX: u8 = 0x02;
const ETX: u8 = 0x03;

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
    corrupt_request: bool,
    mode: Option<String>,
    command: Option<String>,
    arg: Option<String>,
    unit: Option<String>,
    meaning: Option<Meaning>,
}

#[derive(Debug, Deserialize)]
struct Meaning {
    address: u8,
    status: Option<String>,
    error: Option<String>,
    alarm: Option<String>,
    data: Option<String>,
    diameter_mm: Option<f64>,
    rate: Option<Quantity>,
    volume: Option<Quantity>,
    dispensed: Option<Dispensed>,
}

#[derive(Debug, Deserialize)]
struct Quantity {
    value: f64,
    unit: String,
}

#[derive(Debug, Deserialize)]
struct Dispensed {
    infused: f64,
    withdrawn: f64,
    unit: String,
}

fn load() -> Vec<Exchange> {
    let t: Transcript = toml::from_str(TRANSCRIPT).unwrap_or_else(|e| panic!("transcript: {e}"));
    assert!(!t.exchange.is_empty());
    t.exchange
}

fn hex(section: &str, h: &str) -> Vec<u8> {
    h.split_whitespace()
        .map(|b| u8::from_str_radix(b, 16).unwrap_or_else(|e| panic!("{section}: {h}: {e}")))
        .collect()
}

fn bytes(section: &str, text: &Option<String>, hex_text: &Option<String>) -> Option<Vec<u8>> {
    match (text, hex_text) {
        (Some(t), None) => Some(t.as_bytes().to_vec()),
        (None, Some(h)) => Some(hex(section, h)),
        (None, None) => None,
        _ => panic!("{section}: both text and hex"),
    }
}

fn command(x: &Exchange) -> Option<Command> {
    let name = x.command.as_deref()?;
    let arg = || {
        x.arg
            .clone()
            .unwrap_or_else(|| panic!("{}: {name} needs arg", x.section))
    };
    let direction = |code: &str| {
        Direction::from_code(code).unwrap_or_else(|| panic!("{}: direction {code}", x.section))
    };
    Some(match name {
        "poll" => Command::Poll,
        "set_diameter" => Command::SetDiameter(arg()),
        "query_diameter" => Command::QueryDiameter,
        "set_rate" => {
            let unit = x.unit.as_deref().unwrap_or_default();
            let unit = RateUnit::from_code(unit)
                .unwrap_or_else(|| panic!("{}: rate unit {unit}", x.section));
            Command::SetRate(arg(), unit)
        }
        "query_rate" => Command::QueryRate,
        "set_volume" => Command::SetVolume(arg()),
        "query_volume" => Command::QueryVolume,
        "set_direction" => Command::SetDirection(direction(&arg())),
        "query_direction" => Command::QueryDirection,
        "run" => Command::Run,
        "stop" => Command::Stop,
        "purge" => Command::Purge,
        "query_dispensed" => Command::QueryDispensed,
        "clear_dispensed" => Command::ClearDispensed(direction(&arg())),
        "version" => Command::Version,
        "safe_mode" => Command::SafeMode(
            arg()
                .parse()
                .unwrap_or_else(|e| panic!("{}: {e}", x.section)),
        ),
        other => panic!("{}: unknown command name {other:?}", x.section),
    })
}

fn status(name: &str) -> Status {
    match name {
        "infusing" => Status::Infusing,
        "withdrawing" => Status::Withdrawing,
        "purging" => Status::Purging,
        "stopped" => Status::Stopped,
        "paused" => Status::Paused,
        "pause_phase" => Status::PausePhase,
        "waiting_for_trigger" => Status::WaitingForTrigger,
        other => panic!("unknown status {other:?}"),
    }
}

fn error(name: &str) -> PumpError {
    match name {
        "unknown" => PumpError::Unknown,
        "not_applicable" => PumpError::NotApplicable,
        "out_of_range" => PumpError::OutOfRange,
        "communication" => PumpError::Communication,
        "ignored" => PumpError::Ignored,
        other => panic!("unknown error {other:?}"),
    }
}

fn alarm(name: &str) -> Alarm {
    match name {
        "reset" => Alarm::Reset,
        "stall" => Alarm::Stall,
        "safe_mode_timeout" => Alarm::SafeModeTimeout,
        "program_error" => Alarm::ProgramError,
        "phase_out_of_range" => Alarm::PhaseOutOfRange,
        other => panic!("unknown alarm {other:?}"),
    }
}

fn volume_unit(code: &str) -> VolumeUnit {
    VolumeUnit::from_code(code).unwrap_or_else(|| panic!("volume unit {code}"))
}

fn check_meaning(x: &Exchange, payload: &[u8], m: &Meaning) {
    let ctx = format!("{}: {:?}", x.section, String::from_utf8_lossy(payload));
    let reply = parse_reply(payload).unwrap_or_else(|e| panic!("{ctx}: {e}"));
    assert_eq!(reply.address, m.address, "{ctx}");
    match (&reply.body, m) {
        (
            ReplyBody::Alarm(a),
            Meaning {
                alarm: Some(want), ..
            },
        ) => assert_eq!(*a, alarm(want), "{ctx}"),
        (
            ReplyBody::Error {
                status: s,
                error: e,
            },
            Meaning {
                status: Some(want_s),
                error: Some(want_e),
                ..
            },
        ) => {
            assert_eq!(*s, status(want_s), "{ctx}");
            assert_eq!(*e, error(want_e), "{ctx}");
        }
        (
            ReplyBody::Status { status: s, data },
            Meaning {
                status: Some(want_s),
                error: None,
                alarm: None,
                ..
            },
        ) => {
            assert_eq!(*s, status(want_s), "{ctx}");
            assert_eq!(data, m.data.as_deref().unwrap_or(""), "{ctx}");
            if let Some(d) = m.diameter_mm {
                let got = ppu_drivers::dispenser::ne1000::protocol::parse_diameter(data)
                    .unwrap_or_else(|e| panic!("{ctx}: {e}"));
                assert!((got - d).abs() < 1e-9, "{ctx}");
            }
            if let Some(q) = &m.rate {
                let (v, u) = parse_rate(data).unwrap_or_else(|e| panic!("{ctx}: {e}"));
                assert!((v - q.value).abs() < 1e-9, "{ctx}");
                assert_eq!(Some(u), RateUnit::from_code(&q.unit), "{ctx}");
            }
            if let Some(q) = &m.volume {
                let (v, u) = parse_volume(data).unwrap_or_else(|e| panic!("{ctx}: {e}"));
                assert!((v - q.value).abs() < 1e-9, "{ctx}");
                assert_eq!(u, volume_unit(&q.unit), "{ctx}");
            }
            if let Some(q) = &m.dispensed {
                let d = parse_dispensed(data).unwrap_or_else(|e| panic!("{ctx}: {e}"));
                assert!((d.infused - q.infused).abs() < 1e-9, "{ctx}");
                assert!((d.withdrawn - q.withdrawn).abs() < 1e-9, "{ctx}");
                assert_eq!(d.unit, volume_unit(&q.unit), "{ctx}");
            }
        }
        (body, m) => panic!("{ctx}: decoded {body:?}, transcript says {m:?}"),
    }
}

#[test]
fn every_reply_frame_decodes_to_its_meaning() {
    let mut checked = 0;
    for x in load() {
        let Some(reply) = bytes(&x.section, &x.reply, &x.reply_hex) else {
            assert!(x.no_reply, "{}: a reply or no_reply", x.section);
            assert!(x.meaning.is_none(), "{}", x.section);
            continue;
        };
        assert!(!x.no_reply, "{}", x.section);
        let mut decoder = FrameDecoder::new(Framing::Ne1000);
        decoder.push(&reply);
        let frame = decoder
            .next_frame()
            .unwrap_or_else(|| panic!("{}: no frame in {reply:02X?}", x.section));
        assert_eq!(decoder.next_frame(), None, "{}: one frame", x.section);
        assert_eq!(decoder.discarded(), 0, "{}", x.section);
        // Hex replies are the safe-mode frames; text replies are basic STX … ETX.
        assert_eq!(frame.safe, x.reply_hex.is_some(), "{}", x.section);
        let meaning = x
            .meaning
            .as_ref()
            .unwrap_or_else(|| panic!("{}: meaning", x.section));
        check_meaning(&x, &frame.payload, meaning);
        checked += 1;
    }
    assert!(checked >= 25, "{checked}");
}

#[test]
fn the_driver_sends_the_requests_the_transcript_shows() {
    let mut checked = 0;
    for x in load() {
        let request = bytes(&x.section, &x.request, &x.request_hex)
            .unwrap_or_else(|| panic!("{}: request", x.section));
        let Some(cmd) = command(&x) else { continue };
        let encoded = match x.mode.as_deref().unwrap_or("basic") {
            "basic" => cmd.encode_basic(0),
            "safe" => cmd
                .encode_safe(0)
                .unwrap_or_else(|e| panic!("{}: {e}", x.section)),
            other => panic!("{}: mode {other}", x.section),
        };
        assert_eq!(encoded, request, "{}: the driver's {cmd:?}", x.section);
        checked += 1;
    }
    assert!(checked >= 20, "{checked}");
}

/// Every request frame carries the CRC the driver computes (the corrupt one on purpose not),
/// including the SAF0 frame quoted from the manual.
#[test]
fn the_drivers_crc_agrees_with_every_request_frame() {
    let mut quoted = false;
    for x in load() {
        let Some(h) = &x.request_hex else { continue };
        let frame = hex(&x.section, h);
        assert_eq!(frame.first(), Some(&STX), "{}", x.section);
        assert_eq!(frame.last(), Some(&ETX), "{}", x.section);
        let len = usize::from(frame[1]);
        assert_eq!(len + 1, frame.len(), "{}: length byte", x.section);
        let payload = &frame[2..frame.len() - 3];
        let crc = u16::from_be_bytes([frame[frame.len() - 3], frame[frame.len() - 2]]);
        assert_eq!(
            crc16_ccitt(payload) == crc,
            !x.corrupt_request,
            "{}",
            x.section
        );
        quoted |= payload == b"SAF0" && crc == 0x5543;
    }
    assert!(quoted, "the manual's SAF0 frame is in the transcript");
}
