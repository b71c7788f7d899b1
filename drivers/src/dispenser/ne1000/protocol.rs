//! The NE-1000 wire protocol: commands, numbers and replies, as pure encode/decode functions.
//!
//! Basic mode: `<addr><COMMAND><args>\r`, answered by `STX <2-digit addr><status>[data] ETX`.
//! Safe mode wraps the same payloads (without the `\r`) in `STX len payload CRC ETX`
//! ([`encode_safe_frame`]). Numbers carry at most four digits and a decimal point
//! ([`format_number`]). Errors (`?`, `?NA`, `?OOR`, `?COM`, `?IGN`) follow the status character;
//! alarms (`A?R`, `A?S`, `A?T`, `A?E`, `A?O`) replace it.
//!
//! Everything here is total: any byte string given to a parser yields a value or a typed
//! [`ParseError`], never a panic.

use std::fmt;

use crate::transport::serial::{PayloadTooLong, encode_safe_frame};

/// Diameters up to this many millimetres put the pump's volumes in µL, larger ones in mL
/// (the NE-1000 rule that "units follow the diameter").
pub const MICROLITRE_DIAMETER_LIMIT_MM: f64 = 14.0;
/// The pump's diameter range, mm.
pub const DIAMETER_RANGE_MM: (f64, f64) = (0.1, 80.0);
/// Highest pump address.
pub const MAX_ADDRESS: u8 = 99;

/// A number that does not fit the pump's four-digit rule.
#[derive(Debug, Clone, Copy, PartialEq, thiserror::Error)]
pub enum NumberError {
    #[error("{0} is not a finite, non-negative number")]
    Invalid(f64),
    #[error("{0} needs more than 4 digits")]
    TooLarge(f64),
}

/// Formats `value` with at most four digits plus a decimal point, keeping as many decimals as
/// fit (`1` → `1.000`, `12.345` → `12.35`, `1234` → `1234`).
pub fn format_number(value: f64) -> Result<String, NumberError> {
    if !value.is_finite() || value < 0.0 {
        return Err(NumberError::Invalid(value));
    }
    for decimals in (0..=3).rev() {
        let s = format!("{value:.decimals$}");
        if s.bytes().filter(u8::is_ascii_digit).count() <= 4 {
            return Ok(s);
        }
    }
    Err(NumberError::TooLarge(value))
}

/// The value the pump will use for `value`, after [`format_number`]'s rounding.
pub fn representable(value: f64) -> Result<f64, NumberError> {
    let s = format_number(value)?;
    s.parse::<f64>().map_err(|_| NumberError::Invalid(value))
}

/// Rate units of `RAT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RateUnit {
    /// µL/min (`UM`).
    MicrolitrePerMinute,
    /// mL/min (`MM`).
    MillilitrePerMinute,
    /// µL/h (`UH`).
    MicrolitrePerHour,
    /// mL/h (`MH`).
    MillilitrePerHour,
}

impl RateUnit {
    pub const ALL: [RateUnit; 4] = [
        RateUnit::MicrolitrePerMinute,
        RateUnit::MillilitrePerMinute,
        RateUnit::MicrolitrePerHour,
        RateUnit::MillilitrePerHour,
    ];

    pub fn code(self) -> &'static str {
        match self {
            RateUnit::MicrolitrePerMinute => "UM",
            RateUnit::MillilitrePerMinute => "MM",
            RateUnit::MicrolitrePerHour => "UH",
            RateUnit::MillilitrePerHour => "MH",
        }
    }

    pub fn from_code(code: &str) -> Option<RateUnit> {
        RateUnit::ALL
            .into_iter()
            .find(|u| u.code().eq_ignore_ascii_case(code))
    }

    /// How many of this unit make one mL/min.
    pub fn per_ml_per_min(self) -> f64 {
        match self {
            RateUnit::MicrolitrePerMinute => 1000.0,
            RateUnit::MillilitrePerMinute => 1.0,
            RateUnit::MicrolitrePerHour => 60_000.0,
            RateUnit::MillilitrePerHour => 60.0,
        }
    }

    pub fn to_ml_per_min(self, value: f64) -> f64 {
        value / self.per_ml_per_min()
    }
}

/// A rate as the pump will be told it: a four-digit number and a unit.
#[derive(Debug, Clone, PartialEq)]
pub struct Rate {
    pub text: String,
    pub unit: RateUnit,
    /// What the pump will run at, mL/min (after rounding).
    pub ml_per_min: f64,
}

/// Picks the unit that represents `ml_per_min` most exactly within four digits.
pub fn encode_rate(ml_per_min: f64) -> Result<Rate, NumberError> {
    if !ml_per_min.is_finite() || ml_per_min <= 0.0 {
        return Err(NumberError::Invalid(ml_per_min));
    }
    let mut best: Option<(f64, Rate)> = None;
    for unit in RateUnit::ALL {
        let value = ml_per_min * unit.per_ml_per_min();
        let Ok(text) = format_number(value) else {
            continue;
        };
        let Ok(sent) = text.parse::<f64>() else {
            continue;
        };
        if sent <= 0.0 {
            continue;
        }
        let error = (sent - value).abs() / value;
        if best.as_ref().is_none_or(|(e, _)| error < *e) {
            best = Some((
                error,
                Rate {
                    text,
                    unit,
                    ml_per_min: unit.to_ml_per_min(sent),
                },
            ));
        }
    }
    best.map(|(_, r)| r)
        .ok_or(NumberError::TooLarge(ml_per_min))
}

/// Volume units of `VOL` and `DIS`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum VolumeUnit {
    Microlitre,
    Millilitre,
}

impl VolumeUnit {
    pub fn code(self) -> &'static str {
        match self {
            VolumeUnit::Microlitre => "UL",
            VolumeUnit::Millilitre => "ML",
        }
    }

    pub fn from_code(code: &str) -> Option<VolumeUnit> {
        if code.eq_ignore_ascii_case("UL") {
            Some(VolumeUnit::Microlitre)
        } else if code.eq_ignore_ascii_case("ML") {
            Some(VolumeUnit::Millilitre)
        } else {
            None
        }
    }

    /// The unit the pump uses for a syringe of this inner diameter.
    pub fn for_diameter(diameter_mm: f64) -> VolumeUnit {
        if diameter_mm <= MICROLITRE_DIAMETER_LIMIT_MM {
            VolumeUnit::Microlitre
        } else {
            VolumeUnit::Millilitre
        }
    }

    pub fn to_ml(self, value: f64) -> f64 {
        match self {
            VolumeUnit::Microlitre => value / 1000.0,
            VolumeUnit::Millilitre => value,
        }
    }

    pub fn from_ml(self, ml: f64) -> f64 {
        match self {
            VolumeUnit::Microlitre => ml * 1000.0,
            VolumeUnit::Millilitre => ml,
        }
    }
}

/// Pumping direction (`DIR`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    Infuse,
    Withdraw,
    /// Reverse the current direction (set only).
    Reverse,
}

impl Direction {
    pub fn code(self) -> &'static str {
        match self {
            Direction::Infuse => "INF",
            Direction::Withdraw => "WDR",
            Direction::Reverse => "REV",
        }
    }

    pub fn from_code(code: &str) -> Option<Direction> {
        [Direction::Infuse, Direction::Withdraw, Direction::Reverse]
            .into_iter()
            .find(|d| d.code().eq_ignore_ascii_case(code))
    }
}

/// One command. Values are already formatted to the four-digit rule.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// The empty command: a status poll.
    Poll,
    SetDiameter(String),
    QueryDiameter,
    SetRate(String, RateUnit),
    QueryRate,
    SetVolume(String),
    QueryVolume,
    SetDirection(Direction),
    QueryDirection,
    Run,
    Stop,
    Purge,
    /// `DIS`: volumes dispensed in each direction.
    QueryDispensed,
    /// `CLD INF|WDR`: clears one direction's dispensed volume.
    ClearDispensed(Direction),
    Version,
    /// `SAF n`: safe mode with an n-second watchdog (1–255); `SAF 0` leaves it.
    SafeMode(u8),
}

impl Command {
    /// The command text without address or terminator, e.g. `RAT1.000MM`.
    pub fn body(&self) -> String {
        match self {
            Command::Poll => String::new(),
            Command::SetDiameter(v) => format!("DIA{v}"),
            Command::QueryDiameter => "DIA".to_owned(),
            Command::SetRate(v, unit) => format!("RAT{v}{}", unit.code()),
            Command::QueryRate => "RAT".to_owned(),
            Command::SetVolume(v) => format!("VOL{v}"),
            Command::QueryVolume => "VOL".to_owned(),
            Command::SetDirection(d) => format!("DIR{}", d.code()),
            Command::QueryDirection => "DIR".to_owned(),
            Command::Run => "RUN".to_owned(),
            Command::Stop => "STP".to_owned(),
            Command::Purge => "PUR".to_owned(),
            Command::QueryDispensed => "DIS".to_owned(),
            Command::ClearDispensed(d) => format!("CLD{}", d.code()),
            Command::Version => "VER".to_owned(),
            Command::SafeMode(n) => format!("SAF{n}"),
        }
    }

    /// The payload for pump `address`, e.g. `0RAT1.000MM`.
    pub fn payload(&self, address: u8) -> String {
        format!("{address}{}", self.body())
    }

    /// Basic-mode bytes: payload and `\r`.
    pub fn encode_basic(&self, address: u8) -> Vec<u8> {
        let mut out = self.payload(address).into_bytes();
        out.push(b'\r');
        out
    }

    /// Safe-mode bytes: the payload in a CRC-checked frame.
    pub fn encode_safe(&self, address: u8) -> Result<Vec<u8>, PayloadTooLong> {
        encode_safe_frame(self.payload(address).as_bytes())
    }
}

/// What the pump is doing (the status character).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Status {
    Infusing,
    Withdrawing,
    Purging,
    Stopped,
    Paused,
    /// Paused in a pause phase of a program.
    PausePhase,
    /// Waiting for a user trigger.
    WaitingForTrigger,
}

impl Status {
    pub fn code(self) -> char {
        match self {
            Status::Infusing => 'I',
            Status::Withdrawing => 'W',
            Status::Purging => 'X',
            Status::Stopped => 'S',
            Status::Paused => 'P',
            Status::PausePhase => 'T',
            Status::WaitingForTrigger => 'U',
        }
    }

    pub fn from_code(c: u8) -> Option<Status> {
        Some(match c {
            b'I' => Status::Infusing,
            b'W' => Status::Withdrawing,
            b'X' => Status::Purging,
            b'S' => Status::Stopped,
            b'P' => Status::Paused,
            b'T' => Status::PausePhase,
            b'U' => Status::WaitingForTrigger,
            _ => return None,
        })
    }

    /// True while the plunger moves.
    pub fn is_moving(self) -> bool {
        matches!(
            self,
            Status::Infusing | Status::Withdrawing | Status::Purging
        )
    }
}

/// An error the pump reports after its status character.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum PumpError {
    #[error("unknown command (?)")]
    Unknown,
    #[error("not applicable now (?NA)")]
    NotApplicable,
    #[error("out of range (?OOR)")]
    OutOfRange,
    #[error("communication error (?COM)")]
    Communication,
    #[error("command ignored (?IGN)")]
    Ignored,
}

impl PumpError {
    pub fn code(self) -> &'static str {
        match self {
            PumpError::Unknown => "?",
            PumpError::NotApplicable => "?NA",
            PumpError::OutOfRange => "?OOR",
            PumpError::Communication => "?COM",
            PumpError::Ignored => "?IGN",
        }
    }

    pub fn from_code(code: &str) -> Option<PumpError> {
        Some(match code {
            "?" => PumpError::Unknown,
            "?NA" => PumpError::NotApplicable,
            "?OOR" => PumpError::OutOfRange,
            "?COM" => PumpError::Communication,
            "?IGN" => PumpError::Ignored,
            _ => return None,
        })
    }
}

/// An alarm, reported once in place of the status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum Alarm {
    #[error("pump reset (power-up) (A?R)")]
    Reset,
    #[error("motor stall (A?S)")]
    Stall,
    #[error("safe-mode communication timeout (A?T)")]
    SafeModeTimeout,
    #[error("pumping program error (A?E)")]
    ProgramError,
    #[error("pumping program phase out of range (A?O)")]
    PhaseOutOfRange,
}

impl Alarm {
    pub fn code(self) -> &'static str {
        match self {
            Alarm::Reset => "A?R",
            Alarm::Stall => "A?S",
            Alarm::SafeModeTimeout => "A?T",
            Alarm::ProgramError => "A?E",
            Alarm::PhaseOutOfRange => "A?O",
        }
    }

    pub fn from_code(code: &str) -> Option<Alarm> {
        Some(match code {
            "A?R" => Alarm::Reset,
            "A?S" => Alarm::Stall,
            "A?T" => Alarm::SafeModeTimeout,
            "A?E" => Alarm::ProgramError,
            "A?O" => Alarm::PhaseOutOfRange,
            _ => return None,
        })
    }
}

/// The part of a reply after the address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplyBody {
    /// A status, with the data a query returned (empty for settings and actions).
    Status { status: Status, data: String },
    /// The command was refused.
    Error { status: Status, error: PumpError },
    /// An alarm; the command it answers was not carried out.
    Alarm(Alarm),
}

/// One decoded reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub address: u8,
    pub body: ReplyBody,
}

impl Reply {
    /// The reply payload (between the frame delimiters), e.g. `00S2.500ML`.
    pub fn payload(&self) -> String {
        match &self.body {
            ReplyBody::Status { status, data } => {
                format!("{:02}{}{data}", self.address, status.code())
            }
            ReplyBody::Error { status, error } => {
                format!("{:02}{}{}", self.address, status.code(), error.code())
            }
            ReplyBody::Alarm(alarm) => format!("{:02}{}", self.address, alarm.code()),
        }
    }

    /// Basic-mode bytes: `STX payload ETX`.
    pub fn encode_basic(&self) -> Vec<u8> {
        let mut out = vec![crate::transport::serial::STX];
        out.extend_from_slice(self.payload().as_bytes());
        out.push(crate::transport::serial::ETX);
        out
    }

    /// Safe-mode bytes.
    pub fn encode_safe(&self) -> Result<Vec<u8>, PayloadTooLong> {
        encode_safe_frame(self.payload().as_bytes())
    }
}

/// A reply (or part of one) that does not follow the protocol.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("reply too short: {0:?}")]
    TooShort(String),
    #[error("reply is not printable ASCII")]
    NotAscii,
    #[error("bad address in {0:?}")]
    BadAddress(String),
    #[error("unknown status character {0:?}")]
    BadStatus(char),
    #[error("unknown error code {0:?}")]
    BadErrorCode(String),
    #[error("unknown alarm {0:?}")]
    BadAlarm(String),
    #[error("bad number {0:?}")]
    BadNumber(String),
    #[error("bad unit {0:?}")]
    BadUnit(String),
    #[error("unexpected data {0:?}")]
    BadData(String),
}

/// Decodes a reply payload (the bytes between `STX` and `ETX`, or a safe frame's payload).
pub fn parse_reply(payload: &[u8]) -> Result<Reply, ParseError> {
    if !payload.iter().all(|b| (0x20..=0x7E).contains(b)) {
        return Err(ParseError::NotAscii);
    }
    // Printable ASCII, so every byte is one char and slicing by byte is safe.
    let text = std::str::from_utf8(payload).map_err(|_| ParseError::NotAscii)?;
    if text.len() < 3 {
        return Err(ParseError::TooShort(text.to_owned()));
    }
    let (addr, rest) = text.split_at(2);
    if !addr.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ParseError::BadAddress(text.to_owned()));
    }
    let address = addr
        .parse::<u8>()
        .map_err(|_| ParseError::BadAddress(text.to_owned()))?;
    if rest.starts_with("A?") {
        let alarm = Alarm::from_code(rest).ok_or_else(|| ParseError::BadAlarm(rest.to_owned()))?;
        return Ok(Reply {
            address,
            body: ReplyBody::Alarm(alarm),
        });
    }
    let first = rest.as_bytes()[0];
    let status = Status::from_code(first).ok_or(ParseError::BadStatus(char::from(first)))?;
    let data = &rest[1..];
    let body = if data.starts_with('?') {
        let error =
            PumpError::from_code(data).ok_or_else(|| ParseError::BadErrorCode(data.to_owned()))?;
        ReplyBody::Error { status, error }
    } else {
        ReplyBody::Status {
            status,
            data: data.to_owned(),
        }
    };
    Ok(Reply { address, body })
}

/// Parses an unsigned decimal number as the pump prints it (digits, at most one point).
pub fn parse_number(text: &str) -> Result<f64, ParseError> {
    let bad = || ParseError::BadNumber(text.to_owned());
    let digits = text.bytes().filter(u8::is_ascii_digit).count();
    let points = text.bytes().filter(|b| *b == b'.').count();
    if digits == 0 || digits > 8 || points > 1 || digits + points != text.len() {
        return Err(bad());
    }
    text.parse::<f64>().map_err(|_| bad())
}

/// Splits `"2.500ML"` into the number and the trailing letters.
fn split_unit(data: &str) -> (&str, &str) {
    let cut = data
        .find(|c: char| c.is_ascii_alphabetic())
        .unwrap_or(data.len());
    data.split_at(cut)
}

/// Data of a `DIA` query, mm.
pub fn parse_diameter(data: &str) -> Result<f64, ParseError> {
    parse_number(data.trim())
}

/// Data of a `RAT` query: value and unit, e.g. `1.000MM`.
pub fn parse_rate(data: &str) -> Result<(f64, RateUnit), ParseError> {
    let (number, unit) = split_unit(data.trim());
    let unit = RateUnit::from_code(unit).ok_or_else(|| ParseError::BadUnit(unit.to_owned()))?;
    Ok((parse_number(number)?, unit))
}

/// Data of a `VOL` query: value and unit, e.g. `2.500ML`.
pub fn parse_volume(data: &str) -> Result<(f64, VolumeUnit), ParseError> {
    let (number, unit) = split_unit(data.trim());
    let unit = VolumeUnit::from_code(unit).ok_or_else(|| ParseError::BadUnit(unit.to_owned()))?;
    Ok((parse_number(number)?, unit))
}

/// Data of a `DIR` query.
pub fn parse_direction(data: &str) -> Result<Direction, ParseError> {
    match Direction::from_code(data.trim()) {
        Some(d @ (Direction::Infuse | Direction::Withdraw)) => Ok(d),
        _ => Err(ParseError::BadData(data.to_owned())),
    }
}

/// Volumes dispensed in each direction (`DIS`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Dispensed {
    pub infused: f64,
    pub withdrawn: f64,
    pub unit: VolumeUnit,
}

impl Dispensed {
    pub fn infused_ml(&self) -> f64 {
        self.unit.to_ml(self.infused)
    }

    pub fn withdrawn_ml(&self) -> f64 {
        self.unit.to_ml(self.withdrawn)
    }

    /// The `DIS` reply data, e.g. `I2.500W0.000ML`.
    pub fn encode(&self) -> Result<String, NumberError> {
        Ok(format!(
            "I{}W{}{}",
            format_number(self.infused)?,
            format_number(self.withdrawn)?,
            self.unit.code()
        ))
    }
}

/// Data of a `DIS` query: `I<float>W<float><UL|ML>`.
pub fn parse_dispensed(data: &str) -> Result<Dispensed, ParseError> {
    let bad = || ParseError::BadData(data.to_owned());
    let rest = data.trim().strip_prefix('I').ok_or_else(bad)?;
    let (infused, rest) = rest.split_once('W').ok_or_else(bad)?;
    let (withdrawn, unit) = split_unit(rest);
    let unit = VolumeUnit::from_code(unit).ok_or_else(|| ParseError::BadUnit(unit.to_owned()))?;
    Ok(Dispensed {
        infused: parse_number(infused)?,
        withdrawn: parse_number(withdrawn)?,
        unit,
    })
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Command::Poll => f.write_str("status poll"),
            other => f.write_str(&other.body()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::serial::{FrameDecoder, Framing};

    #[test]
    fn numbers_follow_the_four_digit_rule() {
        let cases = [
            (1.0, "1.000"),
            (0.125, "0.125"),
            (12.34, "12.34"),
            (12.345_1, "12.35"),
            (123.44, "123.4"),
            (1234.0, "1234"),
            (9999.0, "9999"),
            (0.0, "0.000"),
            (14.43, "14.43"),
        ];
        for (v, s) in cases {
            assert_eq!(format_number(v).unwrap(), s, "{v}");
        }
        assert_eq!(format_number(9999.6), Err(NumberError::TooLarge(9999.6)));
        assert_eq!(format_number(-1.0), Err(NumberError::Invalid(-1.0)));
        assert!(format_number(f64::NAN).is_err());
        // Rounding up that adds a digit falls back to fewer decimals.
        assert_eq!(format_number(9.9996).unwrap(), "10.00");
    }

    #[test]
    fn rate_units_keep_four_digits_and_the_most_precision() {
        let r = encode_rate(1.0).unwrap();
        assert_eq!(
            (r.text.as_str(), r.unit),
            ("1000", RateUnit::MicrolitrePerMinute)
        );
        // µL/min would need five digits.
        let r = encode_rate(20.0).unwrap();
        assert_eq!(
            (r.text.as_str(), r.unit),
            ("20.00", RateUnit::MillilitrePerMinute)
        );
        assert_eq!(r.ml_per_min, 20.0);
        let r = encode_rate(0.0001).unwrap();
        assert_eq!(
            (r.text.as_str(), r.unit),
            ("0.100", RateUnit::MicrolitrePerMinute)
        );
        // 0.00001 mL/min is 0.010 µL/min (two significant digits) but 0.600 µL/h (three).
        let r = encode_rate(0.000_012_34).unwrap();
        assert_eq!(r.unit, RateUnit::MicrolitrePerHour);
        let r = encode_rate(150.0).unwrap();
        assert_eq!(
            (r.text.as_str(), r.unit),
            ("150.0", RateUnit::MillilitrePerMinute)
        );
        let r = encode_rate(2.345_67).unwrap();
        assert!((r.ml_per_min - 2.345_67).abs() / 2.345_67 < 1e-3, "{r:?}");
        for rate in [0.001, 0.0123, 0.5, 3.3, 7.77, 19.99, 45.0, 999.0] {
            let r = encode_rate(rate).unwrap();
            assert!(r.text.bytes().filter(u8::is_ascii_digit).count() <= 4);
            assert!((r.ml_per_min - rate).abs() / rate < 1e-3, "{rate}: {r:?}");
        }
        assert!(encode_rate(0.0).is_err());
        assert!(encode_rate(20_000.0).is_err());
    }

    #[test]
    fn commands_encode_as_on_the_wire() {
        let cases: [(Command, &str); 17] = [
            (Command::Poll, "0\r"),
            (Command::SetDiameter("14.43".into()), "0DIA14.43\r"),
            (Command::QueryDiameter, "0DIA\r"),
            (
                Command::SetRate("1000".into(), RateUnit::MicrolitrePerMinute),
                "0RAT1000UM\r",
            ),
            (
                Command::SetRate("1.000".into(), RateUnit::MillilitrePerMinute),
                "0RAT1.000MM\r",
            ),
            (
                Command::SetRate("6.000".into(), RateUnit::MicrolitrePerHour),
                "0RAT6.000UH\r",
            ),
            (
                Command::SetRate("1200".into(), RateUnit::MillilitrePerHour),
                "0RAT1200MH\r",
            ),
            (Command::QueryRate, "0RAT\r"),
            (Command::SetVolume("2.500".into()), "0VOL2.500\r"),
            (Command::QueryVolume, "0VOL\r"),
            (Command::SetDirection(Direction::Infuse), "0DIRINF\r"),
            (Command::SetDirection(Direction::Withdraw), "0DIRWDR\r"),
            (Command::SetDirection(Direction::Reverse), "0DIRREV\r"),
            (Command::QueryDirection, "0DIR\r"),
            (Command::Run, "0RUN\r"),
            (Command::Stop, "0STP\r"),
            (Command::Purge, "0PUR\r"),
        ];
        for (cmd, wire) in cases {
            assert_eq!(cmd.encode_basic(0), wire.as_bytes(), "{cmd:?}");
        }
        let more: [(Command, u8, &str); 6] = [
            (Command::QueryDispensed, 0, "0DIS\r"),
            (Command::ClearDispensed(Direction::Infuse), 0, "0CLDINF\r"),
            (Command::ClearDispensed(Direction::Withdraw), 0, "0CLDWDR\r"),
            (Command::Version, 0, "0VER\r"),
            (Command::SafeMode(10), 0, "0SAF10\r"),
            (Command::Run, 12, "12RUN\r"),
        ];
        for (cmd, addr, wire) in more {
            assert_eq!(cmd.encode_basic(addr), wire.as_bytes(), "{cmd:?}");
        }
        let safe = Command::Run.encode_safe(0).unwrap();
        let mut d = FrameDecoder::new(Framing::Ne1000);
        d.push(&safe);
        let frame = d.next_frame().unwrap();
        assert!(frame.safe);
        assert_eq!(frame.payload, b"0RUN");
    }

    #[test]
    fn every_reply_form_decodes() {
        let status = |s: Status, data: &str| ReplyBody::Status {
            status: s,
            data: data.to_owned(),
        };
        let cases: Vec<(&str, ReplyBody)> = vec![
            ("00I", status(Status::Infusing, "")),
            ("00W", status(Status::Withdrawing, "")),
            ("00X", status(Status::Purging, "")),
            ("00S", status(Status::Stopped, "")),
            ("00P", status(Status::Paused, "")),
            ("00T", status(Status::PausePhase, "")),
            ("00U", status(Status::WaitingForTrigger, "")),
            ("00S14.43", status(Status::Stopped, "14.43")),
            ("00S1.000MM", status(Status::Stopped, "1.000MM")),
            (
                "00SI2.500W0.000ML",
                status(Status::Stopped, "I2.500W0.000ML"),
            ),
            ("00SNE1000V3.928", status(Status::Stopped, "NE1000V3.928")),
            (
                "00S?",
                ReplyBody::Error {
                    status: Status::Stopped,
                    error: PumpError::Unknown,
                },
            ),
            (
                "00I?NA",
                ReplyBody::Error {
                    status: Status::Infusing,
                    error: PumpError::NotApplicable,
                },
            ),
            (
                "00S?OOR",
                ReplyBody::Error {
                    status: Status::Stopped,
                    error: PumpError::OutOfRange,
                },
            ),
            (
                "00S?COM",
                ReplyBody::Error {
                    status: Status::Stopped,
                    error: PumpError::Communication,
                },
            ),
            (
                "00S?IGN",
                ReplyBody::Error {
                    status: Status::Stopped,
                    error: PumpError::Ignored,
                },
            ),
            ("00A?R", ReplyBody::Alarm(Alarm::Reset)),
            ("00A?S", ReplyBody::Alarm(Alarm::Stall)),
            ("00A?T", ReplyBody::Alarm(Alarm::SafeModeTimeout)),
            ("00A?E", ReplyBody::Alarm(Alarm::ProgramError)),
            ("00A?O", ReplyBody::Alarm(Alarm::PhaseOutOfRange)),
        ];
        for (wire, body) in cases {
            let reply = parse_reply(wire.as_bytes()).unwrap();
            assert_eq!(reply.address, 0);
            assert_eq!(reply.body, body, "{wire}");
            assert_eq!(reply.payload(), wire);
            let mut d = FrameDecoder::new(Framing::Ne1000);
            d.push(&reply.encode_basic());
            d.push(&reply.encode_safe().unwrap());
            assert_eq!(d.next_frame().unwrap().payload, wire.as_bytes());
            assert_eq!(d.next_frame().unwrap().payload, wire.as_bytes());
        }
        assert_eq!(parse_reply(b"12S").unwrap().address, 12);
    }

    #[test]
    fn malformed_replies_are_typed_errors() {
        assert!(matches!(parse_reply(b"0S"), Err(ParseError::TooShort(_))));
        assert!(matches!(
            parse_reply(b"0xS"),
            Err(ParseError::BadAddress(_))
        ));
        assert!(matches!(
            parse_reply(b"00Q"),
            Err(ParseError::BadStatus('Q'))
        ));
        assert!(matches!(
            parse_reply(b"00S?XYZ"),
            Err(ParseError::BadErrorCode(_))
        ));
        assert!(matches!(
            parse_reply(b"00A?Z"),
            Err(ParseError::BadAlarm(_))
        ));
        assert!(matches!(parse_reply(b"00S\x7f"), Err(ParseError::NotAscii)));
        assert!(matches!(
            parse_reply("00Sé".as_bytes()),
            Err(ParseError::NotAscii)
        ));
    }

    #[test]
    fn query_data_decodes() {
        assert_eq!(parse_diameter("14.43"), Ok(14.43));
        assert_eq!(
            parse_rate("1.000MM"),
            Ok((1.0, RateUnit::MillilitrePerMinute))
        );
        assert_eq!(
            parse_rate("1000UM"),
            Ok((1000.0, RateUnit::MicrolitrePerMinute))
        );
        assert_eq!(
            parse_rate("6.000UH"),
            Ok((6.0, RateUnit::MicrolitrePerHour))
        );
        assert_eq!(
            parse_rate("1200MH"),
            Ok((1200.0, RateUnit::MillilitrePerHour))
        );
        assert_eq!(parse_volume("2.500ML"), Ok((2.5, VolumeUnit::Millilitre)));
        assert_eq!(parse_volume("500.0UL"), Ok((500.0, VolumeUnit::Microlitre)));
        assert_eq!(parse_direction("INF"), Ok(Direction::Infuse));
        assert_eq!(parse_direction("WDR"), Ok(Direction::Withdraw));
        assert!(parse_direction("REV").is_err());
        let d = parse_dispensed("I2.500W0.125ML").unwrap();
        assert_eq!(
            (d.infused, d.withdrawn, d.unit),
            (2.5, 0.125, VolumeUnit::Millilitre)
        );
        assert_eq!(d.encode().unwrap(), "I2.500W0.125ML");
        let d = parse_dispensed("I250.0W0.000UL").unwrap();
        assert_eq!(d.infused_ml(), 0.25);
        for bad in [
            "",
            "I",
            "I1W",
            "I1.0W2.0",
            "I1.0W2.0XL",
            "W1I2ML",
            "I1..0W0ML",
            "I-1W0ML",
        ] {
            assert!(parse_dispensed(bad).is_err(), "{bad}");
        }
        assert!(parse_rate("1.0").is_err());
        assert!(parse_number("").is_err());
        assert!(parse_number(".").is_err());
    }

    #[test]
    fn volume_units_follow_the_diameter() {
        assert_eq!(VolumeUnit::for_diameter(4.78), VolumeUnit::Microlitre);
        assert_eq!(VolumeUnit::for_diameter(14.0), VolumeUnit::Microlitre);
        assert_eq!(VolumeUnit::for_diameter(14.43), VolumeUnit::Millilitre);
        assert_eq!(VolumeUnit::Microlitre.from_ml(2.5), 2500.0);
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic_any_parser(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..64)) {
            let _ = parse_reply(&bytes);
            let text = String::from_utf8_lossy(&bytes);
            let _ = parse_dispensed(&text);
            let _ = parse_rate(&text);
            let _ = parse_volume(&text);
            let _ = parse_diameter(&text);
            let _ = parse_direction(&text);
            let _ = parse_number(&text);
            let mut d = FrameDecoder::new(Framing::Ne1000);
            d.push(&bytes);
            while d.next_frame().is_some() {}
            proptest::prop_assert!(d.pending() <= bytes.len());
        }

        #[test]
        fn printable_replies_parse_or_fail_typed(text in "[0-9]{2}[A-Z?]{1,3}[0-9A-Z.?]{0,12}") {
            if let Ok(reply) = parse_reply(text.as_bytes()) {
                // What parses prints back to the same wire form.
                proptest::prop_assert_eq!(reply.payload(), text);
            }
        }

        #[test]
        fn numbers_round_trip(value in 0.0f64..9999.0) {
            let text = format_number(value).unwrap();
            proptest::prop_assert!(text.bytes().filter(u8::is_ascii_digit).count() <= 4);
            let back = parse_number(&text).unwrap();
            proptest::prop_assert!((back - value).abs() <= 0.5 * 10f64.powi(-(text.split('.').nth(1).map_or(0, str::len) as i32)) + 1e-9);
        }
    }
}
