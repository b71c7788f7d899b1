//! Modbus RTU multi-drop: several simulated Eurotherm controllers on one RS-485 line, served
//! on one real pseudo-terminal ([`crate::pty`]).
//!
//! This is the simulator's own reading of "MODBUS over Serial Line" V1.02 and the Modbus
//! application protocol V1.1b3, written without tokio-modbus's RTU codec (the driver uses
//! that one), so a framing mistake shared by both cannot pass every test:
//!
//! - a frame is `address, function, data, CRC-16/MODBUS` (CRC low byte first, §2.5.1.2 and
//!   §6.2.2); the request's length follows from its function code (03/04/06: 8 bytes, 16:
//!   9 + byte count); a frame with a bad CRC is discarded without a reply (§2.4.2) and the
//!   receiver resynchronises one byte later;
//! - every unit hears every frame but only the addressed one answers; address 0 is a
//!   broadcast (writes applied to all, no reply); a request for an absent or silent unit gets
//!   no reply, so the master times out on that unit alone;
//! - a unit may answer only after the request frame has ended, which on the wire is known
//!   from 3.5 character times of silence (§2.5.1.1): replies are delayed by that silence and
//!   paced at the line's byte time (10 bit times per byte at 8N1), at 9600 or 19200 baud.

use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_modbus::{ExceptionCode, Request, Response};

use crate::furnace::SimFurnace;
use crate::pty::{FaultConfig, PtyServer, ReplyFuture, RequestKind, SerialDevice};

/// Longest RTU frame (§2.5.1).
const MAX_FRAME: usize = 256;

/// CRC-16/MODBUS: polynomial 0xA001 (reflected 0x8005), initial value 0xFFFF. The simulator
/// keeps its own copy so that a bug in the driver's stack cannot hide behind an identical one.
pub fn crc16_modbus(data: &[u8]) -> u16 {
    let mut crc: u16 = 0xFFFF;
    for &b in data {
        crc ^= u16::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xA001
            } else {
                crc >> 1
            };
        }
    }
    crc
}

/// Appends the CRC, low byte first.
fn with_crc(mut frame: Vec<u8>) -> Vec<u8> {
    let crc = crc16_modbus(&frame);
    frame.extend_from_slice(&crc.to_le_bytes());
    frame
}

/// The 3.5-character silence that ends a frame at `baud` (fixed 1.75 ms above 19200 baud).
pub fn frame_silence(baud: u32) -> Duration {
    if baud > 19_200 {
        Duration::from_micros(1750)
    } else {
        Duration::from_secs_f64(35.0 / f64::from(baud.max(1)))
    }
}

/// What a decoder finds at one start position.
enum Candidate {
    /// A frame of this many bytes with a good CRC.
    Frame(usize),
    /// Could become a frame when more bytes arrive.
    Incomplete,
    /// Not a frame: skip this position.
    Invalid,
}

/// The controllers on one RS-485 line, as one serial device.
pub struct RtuLine {
    furnaces: Vec<SimFurnace>,
    input: Mutex<Vec<u8>>,
}

impl std::fmt::Debug for RtuLine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let units: Vec<u8> = self.furnaces.iter().map(SimFurnace::unit_id).collect();
        f.debug_struct("RtuLine").field("units", &units).finish()
    }
}

impl RtuLine {
    /// Unit ids must be distinct, 1–247.
    pub fn new(furnaces: Vec<SimFurnace>) -> io::Result<Self> {
        let mut seen = std::collections::HashSet::new();
        for f in &furnaces {
            let unit = f.unit_id();
            if !(1..=247).contains(&unit) || !seen.insert(unit) {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("unit id {unit} is invalid or used twice"),
                ));
            }
        }
        Ok(Self {
            furnaces,
            input: Mutex::new(Vec::new()),
        })
    }

    /// What the bytes at the start of `buf` are.
    fn frame_at(buf: &[u8]) -> Candidate {
        let (Some(&unit), Some(&function)) = (buf.first(), buf.get(1)) else {
            return Candidate::Incomplete;
        };
        if unit > 247 {
            return Candidate::Invalid;
        }
        let crc_ok =
            |n: usize| crc16_modbus(&buf[..n - 2]).to_le_bytes() == [buf[n - 2], buf[n - 1]];
        let len = match function {
            0x03 | 0x04 | 0x06 => 8,
            0x10 => match buf.get(6) {
                Some(n) => 9 + usize::from(*n),
                None => return Candidate::Incomplete,
            },
            // A function this line does not parse: the frame ends where a CRC first matches
            // (on the wire, where the silence falls).
            _ => {
                return match (4..=buf.len().min(MAX_FRAME)).find(|&n| crc_ok(n)) {
                    Some(n) => Candidate::Frame(n),
                    None if buf.len() >= MAX_FRAME => Candidate::Invalid,
                    None => Candidate::Incomplete,
                };
            }
        };
        if buf.len() < len {
            Candidate::Incomplete
        } else if crc_ok(len) {
            Candidate::Frame(len)
        } else {
            Candidate::Invalid
        }
    }

    /// Answers one checked frame (address, function, data; CRC stripped).
    fn respond(&self, frame: &[u8]) -> Option<Vec<u8>> {
        let (&unit, pdu) = frame.split_first()?;
        let request = decode_request(pdu);
        if unit == 0 {
            if let Ok(req) = &request {
                for f in self.furnaces.iter().filter(|f| !f.is_silent()) {
                    let _ = match req {
                        Request::WriteSingleRegister(a, v) => f.write_register(*a, *v),
                        Request::WriteMultipleRegisters(a, vs) => f.write_registers(*a, vs),
                        _ => Ok(()),
                    };
                }
            }
            return None;
        }
        let furnace = self.furnaces.iter().find(|f| f.unit_id() == unit)?;
        if furnace.is_silent() {
            tracing::trace!(unit, "silent; not answering");
            return None;
        }
        let function = pdu.first().copied().unwrap_or(0);
        let result = request.and_then(|req| crate::modbus::dispatch(furnace, req));
        let mut out = vec![unit];
        match result {
            Ok(Response::ReadHoldingRegisters(words) | Response::ReadInputRegisters(words)) => {
                out.push(function);
                out.push(u8::try_from(words.len() * 2).unwrap_or(u8::MAX));
                for w in words {
                    out.extend_from_slice(&w.to_be_bytes());
                }
            }
            Ok(Response::WriteSingleRegister(a, v)) => {
                out.push(function);
                out.extend_from_slice(&a.to_be_bytes());
                out.extend_from_slice(&v.to_be_bytes());
            }
            Ok(Response::WriteMultipleRegisters(a, n)) => {
                out.push(function);
                out.extend_from_slice(&a.to_be_bytes());
                out.extend_from_slice(&n.to_be_bytes());
            }
            Ok(_) | Err(_) => {
                let code = match result {
                    Err(e) => u8::from(e),
                    Ok(_) => u8::from(ExceptionCode::ServerDeviceFailure),
                };
                out.push(function | 0x80);
                out.push(code);
            }
        }
        Some(with_crc(out))
    }
}

/// Decodes the PDU of a request this line answers; anything else is exception 01.
fn decode_request(pdu: &[u8]) -> Result<Request<'static>, ExceptionCode> {
    let word = |i: usize| -> Result<u16, ExceptionCode> {
        match (pdu.get(i), pdu.get(i + 1)) {
            (Some(hi), Some(lo)) => Ok(u16::from_be_bytes([*hi, *lo])),
            _ => Err(ExceptionCode::IllegalDataValue),
        }
    };
    match pdu.first() {
        Some(0x03) => Ok(Request::ReadHoldingRegisters(word(1)?, word(3)?)),
        Some(0x04) => Ok(Request::ReadInputRegisters(word(1)?, word(3)?)),
        Some(0x06) => Ok(Request::WriteSingleRegister(word(1)?, word(3)?)),
        Some(0x10) => {
            let (addr, count) = (word(1)?, word(3)?);
            let bytes = usize::from(*pdu.get(5).ok_or(ExceptionCode::IllegalDataValue)?);
            if bytes != usize::from(count) * 2 || pdu.len() != 6 + bytes {
                return Err(ExceptionCode::IllegalDataValue);
            }
            let values = (0..usize::from(count))
                .map(|k| word(6 + 2 * k))
                .collect::<Result<Vec<u16>, _>>()?;
            Ok(Request::WriteMultipleRegisters(addr, values.into()))
        }
        _ => Err(ExceptionCode::IllegalFunction),
    }
}

impl SerialDevice for RtuLine {
    fn receive(&self, bytes: &[u8]) -> Vec<crate::pty::Request> {
        let mut input = self.input.lock().unwrap_or_else(|p| p.into_inner());
        input.extend_from_slice(bytes);
        let mut out = Vec::new();
        loop {
            // The earliest complete frame wins; bytes before it were noise or a frame cut
            // short (discarded without a reply, §2.4.2).
            let mut first_incomplete = None;
            let mut found = None;
            for start in 0..input.len() {
                match Self::frame_at(&input[start..]) {
                    Candidate::Frame(len) => {
                        found = Some((start, len));
                        break;
                    }
                    Candidate::Incomplete => {
                        first_incomplete.get_or_insert(start);
                    }
                    Candidate::Invalid => {}
                }
            }
            let Some((start, len)) = found else {
                let keep = first_incomplete.unwrap_or(input.len());
                input.drain(..keep);
                break;
            };
            if start > 0 {
                tracing::debug!(discarded = start, "rtu: noise before a frame");
            }
            out.push(crate::pty::Request {
                bytes: input[start..start + len - 2].to_vec(),
                kind: RequestKind::Framed,
            });
            input.drain(..start + len);
        }
        out
    }

    fn answer(&self, request: crate::pty::Request) -> ReplyFuture {
        let reply = self.respond(&request.bytes);
        Box::pin(std::future::ready(reply))
    }

    fn reset_input(&self) {
        self.input.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }
}

/// Serves `furnaces` on one pty as a Modbus RTU line at `baud` (replies paced at that rate and
/// sent after the 3.5-character end-of-frame silence). With `link`, a stable symlink points at
/// the pty. Unplug one controller with [`SimFurnace::set_silent`]; unplug the whole line (the
/// USB adapter) with [`PtyServer::unplug`].
pub async fn serve_rtu_units(
    furnaces: Vec<SimFurnace>,
    baud: u32,
    link: Option<PathBuf>,
) -> io::Result<PtyServer> {
    let line = RtuLine::new(furnaces)?;
    let faults = FaultConfig {
        baud_rate: Some(baud),
        latency: frame_silence(baud),
        ..FaultConfig::default()
    };
    PtyServer::start(Arc::new(line), faults, link).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::furnace::FurnaceConfig;
    use ppu_drivers::Clock;

    fn line() -> RtuLine {
        let furnace = |unit_id| {
            SimFurnace::new(
                FurnaceConfig {
                    unit_id,
                    ..FurnaceConfig::default()
                },
                Clock::new(1.0),
            )
        };
        RtuLine::new(vec![furnace(1), furnace(2)]).unwrap()
    }

    #[test]
    fn crc_matches_the_specification_example() {
        // "MODBUS over Serial Line" V1.02 §6.2.2 / application notes: read of 2 registers at
        // 0x0000 from slave 1 is 01 03 00 00 00 02 C4 0B.
        assert_eq!(crc16_modbus(&[0x01, 0x03, 0x00, 0x00, 0x00, 0x02]), 0x0BC4);
        assert_eq!(
            with_crc(vec![0x01, 0x03, 0x00, 0x00, 0x00, 0x02]),
            [0x01, 0x03, 0x00, 0x00, 0x00, 0x02, 0xC4, 0x0B]
        );
    }

    #[test]
    fn only_the_addressed_unit_answers_and_noise_is_skipped() {
        let l = line();
        // Register 122 (instrument ident) of unit 2, preceded by noise, split in two reads.
        let req = with_crc(vec![0x02, 0x03, 0x00, 122, 0x00, 0x01]);
        let mut bytes = vec![0xFF, 0x00];
        bytes.extend_from_slice(&req);
        assert!(l.receive(&bytes[..5]).is_empty());
        let got = l.receive(&bytes[5..]);
        assert_eq!(got.len(), 1);
        let reply = l.respond(&got[0].bytes).unwrap();
        assert_eq!(&reply[..3], &[0x02, 0x03, 0x02]);
        assert_eq!(
            crc16_modbus(&reply[..reply.len() - 2]).to_le_bytes(),
            [reply[reply.len() - 2], reply[reply.len() - 1]]
        );
        // Unit 3 is not on the line; a silent unit 1 does not answer.
        let got = l.receive(&with_crc(vec![0x03, 0x03, 0x00, 1, 0x00, 0x01]));
        assert_eq!(l.respond(&got[0].bytes), None);
        l.furnaces[0].set_silent(true);
        let got = l.receive(&with_crc(vec![0x01, 0x03, 0x00, 1, 0x00, 0x01]));
        assert_eq!(l.respond(&got[0].bytes), None);
        // Unit 2 still answers.
        let got = l.receive(&with_crc(vec![0x02, 0x03, 0x00, 1, 0x00, 0x01]));
        assert!(l.respond(&got[0].bytes).is_some());
    }

    #[test]
    fn writes_echo_and_unknown_functions_raise_exception_01() {
        let l = line();
        let got = l.receive(&with_crc(vec![0x01, 0x10, 0x00, 2, 0x00, 1, 2, 0x03, 0xE8]));
        assert_eq!(got.len(), 1);
        let reply = l.respond(&got[0].bytes).unwrap();
        assert_eq!(&reply[..6], &[0x01, 0x10, 0x00, 2, 0x00, 1]);
        let got = l.receive(&with_crc(vec![0x01, 0x2B, 0x0E, 0x01, 0x00]));
        assert_eq!(got.len(), 1);
        let reply = l.respond(&got[0].bytes).unwrap();
        assert_eq!(&reply[..3], &[0x01, 0xAB, 0x01]);
        // A corrupted frame gets no reply.
        let mut bad = with_crc(vec![0x01, 0x03, 0x00, 1, 0x00, 0x01]);
        bad[7] ^= 0xFF;
        assert!(l.receive(&bad).is_empty());
    }

    #[test]
    fn silence_follows_the_baud_rate() {
        assert_eq!(frame_silence(9600), Duration::from_secs_f64(35.0 / 9600.0));
        assert!(frame_silence(19_200) < frame_silence(9600));
        assert_eq!(frame_silence(115_200), Duration::from_micros(1750));
    }
}
