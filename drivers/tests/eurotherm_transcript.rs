//! The Eurotherm driver against the golden transcript `tests/transcripts/eurotherm-modbus.toml`
//! (frames built from the 2000-series communications handbook). Two checks, neither using the
//! simulator:
//!
//! - the driver's register numbers and scaling against each exchange's stated meaning;
//! - the real driver, over Modbus RTU on a real pseudo-terminal, against a tiny server made of
//!   the transcript alone: it answers a request only if it is byte for byte one of the
//!   transcript's (CRC included) and then with the transcript's reply. So every frame the driver
//!   sends must be the manual's, and every value it reports must be the manual's meaning.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ppu_drivers::DeviceError;
use ppu_drivers::furnace::eurotherm::{
    Eurotherm, EurothermConfig, KNOWN_IDENTS, decode_scaled, encode_scaled, registers,
};
use ppu_drivers::transport::modbus::{ModbusConfig, ModbusEndpoint};
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_serial::{SerialPort as _, SerialStream};

const TRANSCRIPT: &str = include_str!("../../tests/transcripts/eurotherm-modbus.toml");

#[derive(Deserialize)]
struct Transcript {
    exchange: Vec<Exchange>,
}

#[derive(Deserialize)]
struct Exchange {
    section: String,
    request_hex: String,
    reply_hex: String,
    meaning: Meaning,
}

#[derive(Deserialize)]
struct Meaning {
    register: u16,
    parameter: toml::Value,
    #[serde(default)]
    raw: Option<toml::Value>,
    #[serde(default)]
    dp: Option<toml::Value>,
    #[serde(default)]
    value: Option<toml::Value>,
    #[serde(default)]
    write: bool,
    #[serde(default)]
    float: bool,
    #[serde(default)]
    exception: Option<u8>,
    #[serde(default)]
    bits: Vec<u16>,
}

fn transcript() -> Transcript {
    toml::from_str(TRANSCRIPT).expect("transcript parses")
}

fn bytes(hex: &str) -> Vec<u8> {
    hex.split_whitespace()
        .map(|b| u8::from_str_radix(b, 16).unwrap_or_else(|_| panic!("bad hex byte {b:?}")))
        .collect()
}

/// A scalar or a list of scalars as a list.
fn list(v: &Option<toml::Value>) -> Vec<f64> {
    let one = |v: &toml::Value| match v {
        toml::Value::Integer(i) => *i as f64,
        toml::Value::Float(f) => *f,
        other => panic!("not a number: {other:?}"),
    };
    match v {
        None => Vec::new(),
        Some(toml::Value::Array(items)) => items.iter().map(one).collect(),
        Some(v) => vec![one(v)],
    }
}

fn names(v: &toml::Value) -> Vec<String> {
    match v {
        toml::Value::String(s) => vec![s.clone()],
        toml::Value::Array(items) => items
            .iter()
            .map(|i| i.as_str().unwrap_or_default().to_owned())
            .collect(),
        other => panic!("not a parameter name: {other:?}"),
    }
}

/// The driver's register for a handbook parameter name, where the driver uses it.
fn driver_register(parameter: &str) -> Option<u16> {
    Some(match parameter {
        "PV" => registers::PV,
        "target setpoint" => registers::TARGET_SP,
        "output power" => registers::OUTPUT,
        "working setpoint" => registers::WORKING_SP,
        "setpoint rate limit" => registers::SP_RATE_LIMIT,
        "instrument status" => registers::STATUS,
        "instrument ident" => registers::IDENT,
        "auto/manual" => registers::AUTO_MANUAL,
        _ => return None,
    })
}

#[test]
fn register_numbers_and_scaling_agree_with_the_transcript() {
    let mut checked = 0;
    for ex in transcript().exchange {
        let m = &ex.meaning;
        let what = &ex.section;
        let params = names(&m.parameter);
        // Register numbers: consecutive parameters from `register` (a multi-word read), or
        // the float image at 0x8000 + 2n.
        for (i, name) in params.iter().enumerate() {
            if let Some(reg) = driver_register(name) {
                let at = if m.float {
                    0x8000 + 2 * reg
                } else {
                    reg - i as u16
                };
                assert_eq!(at, m.register, "{what}: register of {name}");
                checked += 1;
            }
        }
        // Scaling of the integer region.
        let (raw, dp, value) = (list(&m.raw), list(&m.dp), list(&m.value));
        if m.float || dp.is_empty() {
            continue;
        }
        for ((raw, dp), value) in raw.iter().zip(&dp).zip(&value) {
            let (raw, dp) = (*raw as u16, *dp as u8);
            assert_eq!(decode_scaled(raw, dp), *value, "{what}: decode {raw}");
            if m.write {
                assert_eq!(
                    encode_scaled(*value, dp),
                    Some(raw),
                    "{what}: encode {value}"
                );
            }
            checked += 1;
        }
        // Status bits the driver calls alarms: "ramp running" (13) is not one.
        if m.register == registers::STATUS {
            assert_eq!(m.bits, [13], "{what}");
        }
    }
    assert!(checked >= 15, "only {checked} checks");
}

/// Answers the transcript's requests, and only those, on the master side of a pty.
struct TranscriptServer {
    path: String,
    unknown: Arc<Mutex<Vec<Vec<u8>>>>,
    _slave: SerialStream,
}

fn serve(replies: HashMap<Vec<u8>, Vec<u8>>) -> TranscriptServer {
    let (mut master, slave) = SerialStream::pair().expect("pty pair");
    let path = slave.name().expect("pty slave name");
    let unknown = Arc::new(Mutex::new(Vec::new()));
    let longest = replies.keys().map(Vec::len).max().unwrap_or(0);
    tokio::spawn({
        let unknown = Arc::clone(&unknown);
        async move {
            let mut pending = Vec::new();
            let mut buf = [0u8; 256];
            loop {
                let n = match master.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                pending.extend_from_slice(&buf[..n]);
                if let Some(reply) = replies.get(&pending) {
                    pending.clear();
                    if master.write_all(reply).await.is_err() {
                        return;
                    }
                } else if !replies.keys().any(|k| k.starts_with(&pending))
                    || pending.len() >= longest
                {
                    // Not the manual's frame: no answer, as from a device that did not
                    // understand it (the master times out).
                    if let Ok(mut u) = unknown.lock() {
                        u.push(std::mem::take(&mut pending));
                    }
                }
            }
        }
    });
    TranscriptServer {
        path,
        unknown,
        _slave: slave,
    }
}

fn refused_code(err: DeviceError) -> String {
    match err {
        DeviceError::Refused { reason, .. } => reason,
        other => panic!("expected an exception reply, got {other:?}"),
    }
}

#[tokio::test]
async fn the_driver_speaks_the_transcripts_frames_and_reads_its_meanings() {
    let t = transcript();
    let replies: HashMap<Vec<u8>, Vec<u8>> = t
        .exchange
        .iter()
        .map(|ex| (bytes(&ex.request_hex), bytes(&ex.reply_hex)))
        .collect();
    let server = serve(replies);
    let mut modbus = ModbusConfig::new(ModbusEndpoint::Rtu {
        path: server.path.clone(),
        baud_rate: 19200,
    });
    modbus.timeout = Duration::from_secs(2);
    modbus.retries = 0;
    let config = EurothermConfig::new("furnace-1", modbus);
    let dp = config.decimal_places;
    let output_dp = config.output_decimal_places;
    let dev = Eurotherm::new(config);

    // Identity: the transcript's 2404 is one of the driver's known models.
    let ident = dev.identify().await.expect("ident");
    assert_eq!(ident, 0x2440);
    assert!(
        KNOWN_IDENTS
            .iter()
            .any(|(i, model)| *i == ident && *model == "2404")
    );

    // Registers 1..=5 and 75 in two reads, exactly as the transcript frames them.
    let snap = dev.read_snapshot().await.expect("snapshot");
    assert_eq!(snap.pv_c, 25.0);
    assert_eq!(snap.target_sp_c, 200.0);
    assert_eq!(snap.output_pct, 0.0);
    assert_eq!(snap.working_sp_c, 25.0);
    assert_eq!(snap.status_bits, 0x2000);
    assert!(snap.alarms().is_empty(), "{:?}", snap.alarms());
    assert_eq!(dev.read_rate_limit().await, Ok(10.0));
    let status = ppu_drivers::Device::status(&dev).await.expect("status");
    assert!(status.alarms.is_empty());

    // Writes: the driver's encoding of 10.0 °C/min and 200.0 °C gives the manual's frames.
    let transport = dev.transport();
    let rate = encode_scaled(10.0, dp).expect("fits");
    assert_eq!(
        transport.write_single(registers::SP_RATE_LIMIT, rate).await,
        Ok(())
    );
    let sp = encode_scaled(200.0, dp).expect("fits");
    assert_eq!(
        transport.write_single(registers::TARGET_SP, sp).await,
        Ok(())
    );
    assert_eq!(
        transport.write_single(registers::AUTO_MANUAL, 1).await,
        Ok(())
    );
    let output = transport
        .read_holding(registers::OUTPUT, 1)
        .await
        .expect("output");
    assert_eq!(decode_scaled(output[0], output_dp), 45.5);

    // The float image of PV at 0x8000 + 2 × 1.
    let words = transport
        .read_holding(0x8000 + 2 * registers::PV, 2)
        .await
        .expect("float PV");
    let pv = f32::from_bits((u32::from(words[0]) << 16) | u32::from(words[1]));
    assert_eq!(pv, 25.0);

    // Exception replies are the device's answer, named with their code.
    let mut exceptions = 0;
    for ex in t
        .exchange
        .iter()
        .filter(|ex| ex.meaning.exception.is_some())
    {
        let m = &ex.meaning;
        let outcome = if m.write {
            let value = list(&m.value)[0];
            let raw = encode_scaled(value, dp).expect("fits");
            assert_eq!(f64::from(raw), list(&m.raw)[0], "{}", ex.section);
            transport.write_single(m.register, raw).await
        } else {
            transport.read_holding(m.register, 1).await.map(|_| ())
        };
        let reason = refused_code(outcome.unwrap_err());
        let code = m.exception.unwrap_or_default();
        assert!(
            reason.contains(&format!("exception {code:02X}")),
            "{}: {reason}",
            ex.section
        );
        exceptions += 1;
    }
    assert_eq!(exceptions, 2);

    let unknown = server.unknown.lock().map(|u| u.clone()).unwrap_or_default();
    assert!(
        unknown.is_empty(),
        "frames not in the transcript: {unknown:02X?}"
    );
}
