//! The Alicat serial ASCII protocol (mass-flow controllers), as pure encode/parse functions.
//!
//! Read from Alicat's documentation, not from the simulator:
//!
//! - *MC-Series Mass Flow Controller Operating Manual*, "RS-232 / RS-485 Output and Input":
//!   "Polling Mode" (`(unit ID)<CR>` answers a data frame; unit ids `A`–`Z`, commands are not
//!   case-sensitive), "MC-Series Mass Flow Controller Data Format" (the example
//!   `A +014.70 +025.00 +02.004 +02.004 2.004 Air`: unit id, pressure, temperature,
//!   volumetric flow, mass flow, setpoint, gas; "additional columns, including status codes,
//!   may be present to the right of the gas selection column"; on units with a totalizer the
//!   totalized flow is column seven and the gas moves to column eight), "Changing the gas
//!   selection" (`(unit ID)G(gas number)<CR>`, "Helium has a gas number of 7 … type AG7<CR>"),
//!   "Sending a Setpoint" (`(unit ID)S(floating point number)<CR>` in device units; "once a
//!   setpoint is accepted, the data frame will be returned with the setpoint column changed
//!   accordingly"), and "Gas Lists with Viscosities, Densities and Compressibilities" (gas
//!   numbers).
//! - *Alicat Serial Communications Primer* (Rev. 2, Feb. 2023), "Command Description Format"
//!   (every command starts with the unit id and ends with `<CR>`; a space separates a command
//!   from its arguments: `AS 50.0`), "The Alicat Data Frame" and "Status/Error Codes" (the
//!   three-letter words after the gas: `ADC`, `EXH`, `HLD`, `LCK`, `MOV`, `OPL`, `OVR`, `POV`,
//!   `TMF`, `TOV`, `VOV`), and the quick command reference, where an unrecognised command is
//!   answered `?`. Whether the unit id precedes it (`A ?`) is not spelled out; both forms are
//!   accepted (the bare `?` is what the widely used `numat/alicat` client compares against).
//! - Units: pressure in PSIA, temperature in °C, flows in the device's engineering units
//!   (SCCM or SLPM for a mass-flow controller, fixed at order time), as the manual's data
//!   format section says the frame shows "units shown on the display".
//!
//! Replies are one line ending in `<CR>` (the transport's [`Framing::Cr`]). Every parser is
//! total: arbitrary bytes give a value or a typed [`ParseError`], never a panic.
//!
//! [`Framing::Cr`]: crate::transport::serial::Framing::Cr

use std::fmt;

use crate::device::DeviceError;

/// Gas numbers of the standard gas table (MC-Series manual, "Gas Lists with Viscosities,
/// Densities and Compressibilities"; the same numbers in the Serial Primer's "Gas" section).
/// Names are as the data frame prints them.
pub const GASES: &[(u8, &str)] = &[
    (0, "Air"),
    (1, "Ar"),
    (2, "CH4"),
    (3, "CO"),
    (4, "CO2"),
    (5, "C2H6"),
    (6, "H2"),
    (7, "He"),
    (8, "N2"),
    (9, "N2O"),
    (10, "Ne"),
    (11, "O2"),
    (12, "C3H8"),
    (13, "nC4H10"),
    (14, "C2H2"),
    (15, "C2H4"),
    (16, "iC4H10"),
    (17, "Kr"),
    (18, "Xe"),
    (19, "SF6"),
];

/// The gas number of `name` (case-insensitive, as the frame prints it: `CO2`, `He`).
pub fn gas_number(name: &str) -> Option<u8> {
    GASES
        .iter()
        .find(|(_, n)| n.eq_ignore_ascii_case(name.trim()))
        .map(|(i, _)| *i)
}

/// The name the data frame prints for gas number `n`.
pub fn gas_name(n: u8) -> Option<&'static str> {
    GASES.iter().find(|(i, _)| *i == n).map(|(_, name)| *name)
}

/// A unit id, `A`–`Z` (MC-Series manual, "Polling Mode": "Unit IDs between A and Z").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct UnitId(u8);

impl UnitId {
    /// `A`–`Z`, case-insensitive.
    pub fn new(c: char) -> Option<UnitId> {
        let c = c.to_ascii_uppercase();
        c.is_ascii_uppercase().then_some(UnitId(c as u8))
    }

    pub fn as_char(self) -> char {
        char::from(self.0)
    }
}

impl Default for UnitId {
    /// `A`, the factory default.
    fn default() -> Self {
        UnitId(b'A')
    }
}

impl fmt::Display for UnitId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.as_char())
    }
}

/// One command to one controller.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Command {
    /// Poll the data frame: `A\r`.
    Poll,
    /// New setpoint in device units: `AS 50.0\r`. Answered with a data frame.
    Setpoint(f64),
    /// Select the gas by number: `AG4\r`. Answered with a data frame.
    Gas(u8),
}

impl Command {
    /// The command as sent for `unit`, without the `\r`.
    pub fn text(&self, unit: UnitId) -> String {
        match self {
            Command::Poll => format!("{unit}"),
            Command::Setpoint(v) => format!("{unit}S {}", format_setpoint(*v)),
            Command::Gas(n) => format!("{unit}G{n}"),
        }
    }

    /// The bytes on the wire.
    pub fn encode(&self, unit: UnitId) -> Vec<u8> {
        let mut out = self.text(unit).into_bytes();
        out.push(b'\r');
        out
    }
}

/// A setpoint as the controller reads it: a plain decimal, at most three decimals, at least
/// one (`50.0`, `4.54`, `0.0`). Never an exponent (the firmware reads none).
pub fn format_setpoint(v: f64) -> String {
    let v = if v.is_finite() { v } else { 0.0 };
    let s = format!("{v:.3}");
    let trimmed = s.trim_end_matches('0');
    if trimmed.ends_with('.') {
        format!("{trimmed}0")
    } else {
        trimmed.to_owned()
    }
}

/// A status word after the gas column (Serial Primer, "Status/Error Codes").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Status {
    /// `ADC`: analog-to-digital converter error (a sensor fault).
    Adc,
    /// `EXH`: exhaust mode (the valve is driven open to exhaust).
    Exh,
    /// `HLD`: the valve is held (the setpoint is not being followed).
    Hld,
    /// `LCK`: the front display is locked (information only).
    Lck,
    /// `MOV`: mass flow beyond the measurable range.
    Mov,
    /// `OPL`: over the pressure limit.
    Opl,
    /// `OVR`: totalizer rolled over (information only).
    Ovr,
    /// `POV`: pressure beyond the measurable range.
    Pov,
    /// `TMF`: totalizer missed flow beyond its range (information only).
    Tmf,
    /// `TOV`: temperature beyond the measurable range.
    Tov,
    /// `VOV`: volumetric flow beyond the measurable range.
    Vov,
}

impl Status {
    pub fn parse(word: &str) -> Option<Status> {
        Some(match word {
            "ADC" => Status::Adc,
            "EXH" => Status::Exh,
            "HLD" => Status::Hld,
            "LCK" => Status::Lck,
            "MOV" => Status::Mov,
            "OPL" => Status::Opl,
            "OVR" => Status::Ovr,
            "POV" => Status::Pov,
            "TMF" => Status::Tmf,
            "TOV" => Status::Tov,
            "VOV" => Status::Vov,
            _ => return None,
        })
    }

    pub fn code(self) -> &'static str {
        match self {
            Status::Adc => "ADC",
            Status::Exh => "EXH",
            Status::Hld => "HLD",
            Status::Lck => "LCK",
            Status::Mov => "MOV",
            Status::Opl => "OPL",
            Status::Ovr => "OVR",
            Status::Pov => "POV",
            Status::Tmf => "TMF",
            Status::Tov => "TOV",
            Status::Vov => "VOV",
        }
    }

    /// True for a condition that invalidates a flow run: a sensor or range error, the valve
    /// held or exhausting, the pressure limit. Display lock and totalizer words are not.
    pub fn is_alarm(self) -> bool {
        !matches!(self, Status::Lck | Status::Ovr | Status::Tmf)
    }

    /// What the word means, for alarms and errors.
    pub fn describe(self) -> &'static str {
        match self {
            Status::Adc => "ADC: analog-to-digital converter (sensor) error",
            Status::Exh => "EXH: exhaust mode",
            Status::Hld => "HLD: valve held",
            Status::Lck => "LCK: display locked",
            Status::Mov => "MOV: mass flow over range",
            Status::Opl => "OPL: over pressure limit",
            Status::Ovr => "OVR: totalizer rolled over",
            Status::Pov => "POV: pressure over range",
            Status::Tmf => "TMF: totalizer missed flow",
            Status::Tov => "TOV: temperature over range",
            Status::Vov => "VOV: volumetric flow over range",
        }
    }
}

/// One data frame, in the device's units (flows in its engineering unit, SCCM or SLPM).
#[derive(Debug, Clone, PartialEq)]
pub struct DataFrame {
    pub unit: UnitId,
    /// Absolute pressure, PSIA.
    pub pressure_psia: f64,
    /// Gas temperature, °C.
    pub temperature_c: f64,
    /// Volumetric flow, device units.
    pub volumetric_flow: f64,
    /// Mass flow, device units.
    pub mass_flow: f64,
    /// Setpoint, device units.
    pub setpoint: f64,
    /// Totalized flow, on units with a totalizer.
    pub totalizer: Option<f64>,
    /// The selected gas as printed (`CO2`).
    pub gas: String,
    pub status: Vec<Status>,
}

impl DataFrame {
    /// The status words that are alarms ([`Status::is_alarm`]).
    pub fn alarms(&self) -> Vec<Status> {
        self.status
            .iter()
            .copied()
            .filter(|s| s.is_alarm())
            .collect()
    }
}

/// A parsed reply line.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    Data(DataFrame),
    /// `A ?` (or a bare `?`, which names no unit): the controller did not recognise the
    /// command.
    Unknown(Option<UnitId>),
}

impl Reply {
    /// The unit that answered, when the reply names it.
    pub fn unit(&self) -> Option<UnitId> {
        match self {
            Reply::Data(d) => Some(d.unit),
            Reply::Unknown(u) => *u,
        }
    }
}

/// Why a reply line does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("empty reply")]
    Empty,
    #[error("reply is not printable ASCII")]
    NotAscii,
    #[error("reply does not start with a unit id A-Z and a space: {0:?}")]
    NoUnitId(String),
    #[error("field {field} ({name}) is not a number: {text:?}")]
    Number {
        field: usize,
        name: &'static str,
        text: String,
    },
    #[error("data frame has {0} fields; it needs unit id, five readings and the gas")]
    TooShort(usize),
    #[error("unknown status word {0:?} after the gas")]
    Status(String),
    #[error("gas {0:?} is not a gas name")]
    Gas(String),
}

impl ParseError {
    /// The error as a driver reports it: a corrupt reply to `what`.
    pub fn corrupt(&self, what: &str) -> DeviceError {
        DeviceError::Corrupt {
            what: what.to_owned(),
            reason: self.to_string(),
        }
    }
}

/// Reads one reading: optional sign, digits, at most one decimal point; nothing else (no
/// exponent, no `nan`/`inf`).
pub fn parse_number(s: &str) -> Option<f64> {
    let body = s.strip_prefix(['+', '-']).unwrap_or(s);
    let digits = body.bytes().filter(u8::is_ascii_digit).count();
    let points = body.bytes().filter(|b| *b == b'.').count();
    if digits == 0 || points > 1 || digits + points != body.len() {
        return None;
    }
    s.parse().ok()
}

const READINGS: [&str; 5] = [
    "pressure",
    "temperature",
    "volumetric flow",
    "mass flow",
    "setpoint",
];

/// Parses one reply line (without its `\r`).
pub fn parse_reply(line: &[u8]) -> Result<Reply, ParseError> {
    if line.is_empty() {
        return Err(ParseError::Empty);
    }
    if !line.iter().all(|b| (0x20..=0x7E).contains(b)) {
        return Err(ParseError::NotAscii);
    }
    // Printable ASCII, so this cannot fail; keep it total anyway.
    let text = std::str::from_utf8(line).map_err(|_| ParseError::NotAscii)?;
    if text.trim() == "?" {
        return Ok(Reply::Unknown(None));
    }
    let mut fields = text.split_whitespace();
    let unit = fields
        .next()
        .filter(|f| f.len() == 1 && text.starts_with(f) && text.len() > 1)
        .and_then(|f| f.chars().next())
        .and_then(UnitId::new)
        .ok_or_else(|| ParseError::NoUnitId(text.to_owned()))?;
    let rest: Vec<&str> = fields.collect();
    if rest == ["?"] {
        return Ok(Reply::Unknown(Some(unit)));
    }
    if rest.len() < READINGS.len() + 1 {
        return Err(ParseError::TooShort(rest.len() + 1));
    }
    let mut values = [0.0; 5];
    for (i, name) in READINGS.iter().enumerate() {
        values[i] = parse_number(rest[i]).ok_or_else(|| ParseError::Number {
            field: i + 2,
            name,
            text: rest[i].to_owned(),
        })?;
    }
    let mut tail = &rest[READINGS.len()..];
    // A totalizer column sits between the setpoint and the gas.
    let totalizer = match tail.first().and_then(|f| parse_number(f)) {
        Some(total) => {
            tail = &tail[1..];
            Some(total)
        }
        None => None,
    };
    let Some((gas, words)) = tail.split_first() else {
        return Err(ParseError::TooShort(rest.len() + 1));
    };
    if !gas.starts_with(|c: char| c.is_ascii_alphabetic())
        || !gas
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(ParseError::Gas((*gas).to_owned()));
    }
    let status = words
        .iter()
        .map(|w| Status::parse(w).ok_or_else(|| ParseError::Status((*w).to_owned())))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Reply::Data(DataFrame {
        unit,
        pressure_psia: values[0],
        temperature_c: values[1],
        volumetric_flow: values[2],
        mass_flow: values[3],
        setpoint: values[4],
        totalizer,
        gas: (*gas).to_owned(),
        status,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(line: &str) -> DataFrame {
        match parse_reply(line.as_bytes()) {
            Ok(Reply::Data(d)) => d,
            other => panic!("{line:?}: {other:?}"),
        }
    }

    #[test]
    fn commands_encode_as_the_manual_shows() {
        let a = UnitId::default();
        assert_eq!(Command::Poll.encode(a), b"A\r");
        assert_eq!(Command::Setpoint(50.0).encode(a), b"AS 50.0\r");
        assert_eq!(Command::Setpoint(4.54).encode(a), b"AS 4.54\r");
        assert_eq!(Command::Setpoint(0.0).encode(a), b"AS 0.0\r");
        assert_eq!(Command::Setpoint(12.3456).encode(a), b"AS 12.346\r");
        assert_eq!(Command::Gas(7).encode(a), b"AG7\r");
        let b = UnitId::new('b').unwrap();
        assert_eq!(Command::Gas(4).encode(b), b"BG4\r");
        assert_eq!(UnitId::new('1'), None);
        assert_eq!(UnitId::new('@'), None);
    }

    #[test]
    fn gas_table_has_the_manual_numbers() {
        assert_eq!(gas_number("Air"), Some(0));
        assert_eq!(gas_number("co2"), Some(4));
        assert_eq!(gas_number("He"), Some(7));
        assert_eq!(gas_number("N2"), Some(8));
        assert_eq!(gas_number("O2"), Some(11));
        assert_eq!(gas_number("Xx"), None);
        assert_eq!(gas_name(10), Some("Ne"));
        assert_eq!(gas_name(200), None);
    }

    #[test]
    fn data_frames_parse() {
        let d = data("A +014.70 +025.00 +000.00 +000.00 +000.00 CO2");
        assert_eq!(d.unit, UnitId::default());
        assert_eq!(d.pressure_psia, 14.70);
        assert_eq!(d.temperature_c, 25.0);
        assert_eq!(d.setpoint, 0.0);
        assert_eq!(d.gas, "CO2");
        assert!(d.status.is_empty());
        // The manual's own example: setpoint without a sign.
        let d = data("A +014.70 +025.00 +02.004 +02.004 2.004 Air");
        assert_eq!(d.setpoint, 2.004);
        let d = data("B +014.70 +025.00 -000.02 +501.20 +050.00 N2 MOV VOV LCK");
        assert_eq!(d.mass_flow, 501.2);
        assert_eq!(d.status, [Status::Mov, Status::Vov, Status::Lck]);
        assert_eq!(d.alarms(), [Status::Mov, Status::Vov]);
        let d = data("A +014.70 +025.00 +001.00 +001.00 +001.00 +0021513.0 N2 OVR");
        assert_eq!(d.totalizer, Some(21513.0));
        assert_eq!(d.gas, "N2");
        assert!(d.alarms().is_empty());
        assert_eq!(
            parse_reply(b"A ?"),
            Ok(Reply::Unknown(Some(UnitId::default())))
        );
        assert_eq!(parse_reply(b"?"), Ok(Reply::Unknown(None)));
    }

    #[test]
    fn corrupt_frames_are_typed_errors() {
        for (line, want) in [
            ("", ParseError::Empty),
            ("??", ParseError::NoUnitId("??".into())),
            ("AB +014.70", ParseError::NoUnitId("AB +014.70".into())),
            (" A ?", ParseError::NoUnitId(" A ?".into())),
            ("A +014.70 +025.00 +000.00", ParseError::TooShort(4)),
            (
                "A +014.70 +025.00 +000.00 +000.00 +000.00",
                ParseError::TooShort(6),
            ),
        ] {
            assert_eq!(parse_reply(line.as_bytes()), Err(want), "{line:?}");
        }
        assert!(matches!(
            parse_reply(b"A +014.70 +02x.00 +000.00 +000.00 +000.00 CO2"),
            Err(ParseError::Number { field: 3, .. })
        ));
        // A dropped byte that glues two fields together.
        assert!(parse_reply(b"A +014.70 +025.00+000.00 +000.00 +000.00 CO2").is_err());
        assert!(matches!(
            parse_reply(b"A +014.70 +025.00 +000.00 +000.00 +000.00 CO2 XYZ"),
            Err(ParseError::Status(_))
        ));
        assert!(matches!(
            parse_reply(b"A +014.70 +025.00 +000.00 +000.00 +000.00 +1.0"),
            Err(ParseError::TooShort(_))
        ));
        assert_eq!(parse_reply(b"A \xff"), Err(ParseError::NotAscii));
        for s in ["nan", "inf", "1e3", "+", ".", "1.2.3", "--1"] {
            assert_eq!(parse_number(s), None, "{s}");
        }
        let e = ParseError::Empty.corrupt("poll");
        assert!(matches!(e, DeviceError::Corrupt { .. }), "{e:?}");
    }

    proptest::proptest! {
        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..120)) {
            let _ = parse_reply(&bytes);
        }

        #[test]
        fn setpoints_round_trip(v in 0.0f64..10_000.0) {
            let s = format_setpoint(v);
            let back = parse_number(&s).unwrap();
            proptest::prop_assert!((back - v).abs() <= 0.0005 + 1e-9, "{} -> {}", v, s);
        }
    }
}
