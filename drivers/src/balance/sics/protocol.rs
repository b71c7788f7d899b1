//! The MT-SICS wire protocol (level 0/1 subset): commands and replies as pure encode/decode
//! functions. Commands and replies are ASCII lines ending in `\r\n`.
//!
//! A reply starts with a reply identifier, then a status token (MT-SICS Reference Manual,
//! "Format of responses with/without weight value" and the level 0/1 command descriptions):
//! `S S     100.00 g` (stable weight), `S D …` (dynamic), `Z A` (done), `S I` (not executable
//! now), `S +` / `S -` (overload / underload), `I4 A "0123456789"` (information, `B` for one line
//! of several). `ES`, `ET` and `EL` are the syntax, transmission and logical errors that may
//! answer any command.
//!
//! The identifier is not always the command's name: `SI` is answered with `S` (`S S …` or
//! `S D …`, never `SI …`), and `@` with `I4`. A reply therefore cannot say which of `S` and
//! `SI` it answers; the link runs one exchange at a time, and [`Command::accepts`] says which
//! replies the manual defines for the command that was sent.
//!
//! Every parser is total: arbitrary input yields a value or a typed [`ParseError`].

use std::fmt;

/// One command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Command {
    /// Stable weight (waits for stability up to the balance's own timeout).
    Weigh,
    /// Weight immediately, stable or dynamic.
    WeighImmediate,
    /// Zero (waits for stability).
    Zero,
    /// Zero immediately.
    ZeroImmediate,
    /// Tare with the current (stable) weight.
    Tare,
    /// Query the tare value.
    TareValue,
    /// Clear the tare.
    ClearTare,
    /// Reset (cancel pending commands, clear tare); answers with the serial number.
    Reset,
    /// Identification `I0`–`I5`: command list, level/versions, model, software version,
    /// serial number, software identification.
    Info(u8),
}

impl Command {
    /// The command as sent, without `\r\n`.
    pub fn text(&self) -> String {
        match self {
            Command::Weigh => "S".to_owned(),
            Command::WeighImmediate => "SI".to_owned(),
            Command::Zero => "Z".to_owned(),
            Command::ZeroImmediate => "ZI".to_owned(),
            Command::Tare => "T".to_owned(),
            Command::TareValue => "TA".to_owned(),
            Command::ClearTare => "TAC".to_owned(),
            Command::Reset => "@".to_owned(),
            Command::Info(n) => format!("I{n}"),
        }
    }

    /// The bytes on the wire.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = self.text().into_bytes();
        out.extend_from_slice(b"\r\n");
        out
    }

    /// The identifier its reply starts with: `SI` is answered as `S`, `@` as `I4`.
    pub fn reply_id(&self) -> String {
        match self {
            Command::WeighImmediate => "S".to_owned(),
            Command::Reset => "I4".to_owned(),
            other => other.text(),
        }
    }

    /// Whether the manual defines `reply` as an answer to this command. `ES`/`ET`/`EL` may
    /// answer any command.
    pub fn accepts(&self, reply: &Reply) -> bool {
        if matches!(
            reply,
            Reply::SyntaxError | Reply::TransmissionError | Reply::LogicalError
        ) {
            return true;
        }
        if reply.id() != Some(self.reply_id().as_str()) {
            return false;
        }
        let range = matches!(
            reply,
            Reply::NotExecutable { .. } | Reply::Overload { .. } | Reply::Underload { .. }
        );
        match self {
            // `S` only ever answers with a stable weight.
            Command::Weigh => {
                range || matches!(reply, Reply::Weight { weight, .. } if weight.stable)
            }
            Command::WeighImmediate | Command::Tare => {
                range || matches!(reply, Reply::Weight { .. })
            }
            Command::Zero | Command::ZeroImmediate => range || matches!(reply, Reply::Done { .. }),
            Command::TareValue => matches!(
                reply,
                Reply::Weight { .. } | Reply::NotExecutable { .. } | Reply::Logical { .. }
            ),
            Command::ClearTare => {
                matches!(reply, Reply::Done { .. } | Reply::NotExecutable { .. })
            }
            Command::Reset => matches!(reply, Reply::Info { .. }),
            Command::Info(_) => {
                matches!(reply, Reply::Info { .. } | Reply::NotExecutable { .. })
            }
        }
    }

    /// Parses a command line as a balance receives it (without `\r\n`).
    pub fn parse(line: &str) -> Option<Command> {
        Some(match line.trim() {
            "S" => Command::Weigh,
            "SI" => Command::WeighImmediate,
            "Z" => Command::Zero,
            "ZI" => Command::ZeroImmediate,
            "T" => Command::Tare,
            "TA" => Command::TareValue,
            "TAC" => Command::ClearTare,
            "@" => Command::Reset,
            other => {
                let n = other.strip_prefix('I')?.parse::<u8>().ok()?;
                if n > 5 {
                    return None;
                }
                Command::Info(n)
            }
        })
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text())
    }
}

/// Weight units a balance may print, converted to grams.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Unit {
    Gram,
    Milligram,
    Kilogram,
}

impl Unit {
    pub fn code(self) -> &'static str {
        match self {
            Unit::Gram => "g",
            Unit::Milligram => "mg",
            Unit::Kilogram => "kg",
        }
    }

    pub fn from_code(code: &str) -> Option<Unit> {
        match code {
            "g" => Some(Unit::Gram),
            "mg" => Some(Unit::Milligram),
            "kg" => Some(Unit::Kilogram),
            _ => None,
        }
    }

    pub fn to_grams(self, value: f64) -> f64 {
        match self {
            Unit::Gram => value,
            Unit::Milligram => value / 1000.0,
            Unit::Kilogram => value * 1000.0,
        }
    }
}

/// A weight value with its stability.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Weight {
    pub value: f64,
    pub unit: Unit,
    /// `S` (stable) rather than `D` (dynamic).
    pub stable: bool,
}

impl Weight {
    pub fn grams(&self) -> f64 {
        self.unit.to_grams(self.value)
    }
}

/// A decoded reply.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// `S S …`, `S D …` (answering `S` or `SI`), `T S …`, `TA A …`: a weight.
    Weight { id: String, weight: Weight },
    /// `Z A`, `ZI S`/`ZI D`, `TAC A`: done.
    Done { id: String },
    /// `X I`: not executable now (busy, or no stability before the balance's timeout).
    NotExecutable { id: String },
    /// `X +`: overload, or the upper limit of a zero/tare range.
    Overload { id: String },
    /// `X -`: underload, or the lower limit of a zero/tare range.
    Underload { id: String },
    /// `X L`: logical error for this command (e.g. a parameter not allowed).
    Logical { id: String },
    /// `Ix A "text"` (last or only line) or `Ix B "text"` (more lines follow). `text` is the
    /// content of a single quoted field, or the arguments as sent when there are several.
    Info {
        id: String,
        text: String,
        more: bool,
    },
    /// `ES`: the balance did not recognise the command.
    SyntaxError,
    /// `ET`: the balance received a corrupt command (parity, framing).
    TransmissionError,
    /// `EL`: the command cannot be executed (logical error).
    LogicalError,
}

impl Reply {
    /// The command identifier the reply starts with (`ES`/`ET`/`EL` have none).
    pub fn id(&self) -> Option<&str> {
        match self {
            Reply::Weight { id, .. }
            | Reply::Done { id }
            | Reply::NotExecutable { id }
            | Reply::Overload { id }
            | Reply::Underload { id }
            | Reply::Logical { id }
            | Reply::Info { id, .. } => Some(id),
            Reply::SyntaxError | Reply::TransmissionError | Reply::LogicalError => None,
        }
    }

    /// The reply line (without `\r\n`), as a balance prints it.
    pub fn line(&self) -> String {
        match self {
            Reply::Weight { id, weight } => {
                let status = match (id.as_str(), weight.stable) {
                    ("TA", _) => "A",
                    (_, true) => "S",
                    (_, false) => "D",
                };
                // Shortest exact form, right-aligned as balances print it.
                format!("{id} {status} {:>10} {}", weight.value, weight.unit.code())
            }
            Reply::Done { id } if id == "ZI" => "ZI S".to_owned(),
            Reply::Done { id } => format!("{id} A"),
            Reply::NotExecutable { id } => format!("{id} I"),
            Reply::Overload { id } => format!("{id} +"),
            Reply::Underload { id } => format!("{id} -"),
            Reply::Logical { id } => format!("{id} L"),
            Reply::Info { id, text, more } => {
                let status = if *more { "B" } else { "A" };
                if text.contains('"') {
                    // Several fields, kept as sent.
                    format!("{id} {status} {text}")
                } else {
                    format!("{id} {status} \"{text}\"")
                }
            }
            Reply::SyntaxError => "ES".to_owned(),
            Reply::TransmissionError => "ET".to_owned(),
            Reply::LogicalError => "EL".to_owned(),
        }
    }

    /// The bytes on the wire.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = self.line().into_bytes();
        out.extend_from_slice(b"\r\n");
        out
    }
}

/// A line that is not an MT-SICS reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("empty reply")]
    Empty,
    #[error("reply is not printable ASCII")]
    NotAscii,
    #[error("unknown reply identifier {0:?}")]
    UnknownId(String),
    #[error("reply {0:?} has no status")]
    NoStatus(String),
    #[error("unknown status {status:?} in {line:?}")]
    BadStatus { line: String, status: String },
    #[error("bad weight value in {0:?}")]
    BadValue(String),
    #[error("unknown unit {0:?}")]
    BadUnit(String),
    #[error("bad information text in {0:?}")]
    BadText(String),
}

/// Reply identifiers of the level 0/1 commands. There is no `SI`: `SI` is answered with `S`.
const IDS: [&str; 12] = [
    "S", "Z", "ZI", "T", "TA", "TAC", "I0", "I1", "I2", "I3", "I4", "I5",
];

/// Decodes one reply line (without `\r\n`).
pub fn parse_reply(line: &[u8]) -> Result<Reply, ParseError> {
    if !line.iter().all(|b| (0x20..=0x7E).contains(b)) {
        return Err(ParseError::NotAscii);
    }
    let text = std::str::from_utf8(line).map_err(|_| ParseError::NotAscii)?;
    let trimmed = text.trim();
    match trimmed {
        "" => return Err(ParseError::Empty),
        "ES" => return Ok(Reply::SyntaxError),
        "ET" => return Ok(Reply::TransmissionError),
        "EL" => return Ok(Reply::LogicalError),
        _ => {}
    }
    let (id, rest) = trimmed.split_once(' ').unwrap_or((trimmed, ""));
    if !IDS.contains(&id) {
        return Err(ParseError::UnknownId(id.to_owned()));
    }
    let id_owned = id.to_owned();
    let rest = rest.trim_start();
    let (status, args) = rest.split_once(' ').unwrap_or((rest, ""));
    let args = args.trim();
    let bad_status = || ParseError::BadStatus {
        line: trimmed.to_owned(),
        status: status.to_owned(),
    };
    if status.is_empty() {
        return Err(ParseError::NoStatus(trimmed.to_owned()));
    }
    // Status tokens that mean the same for every command.
    let simple = match status {
        "I" => Some(Reply::NotExecutable {
            id: id_owned.clone(),
        }),
        "+" => Some(Reply::Overload {
            id: id_owned.clone(),
        }),
        "-" => Some(Reply::Underload {
            id: id_owned.clone(),
        }),
        "L" => Some(Reply::Logical {
            id: id_owned.clone(),
        }),
        _ => None,
    };
    if let Some(reply) = simple {
        return if args.is_empty() {
            Ok(reply)
        } else {
            Err(bad_status())
        };
    }
    match id {
        "S" | "T" | "TA" => {
            let stable = match (id, status) {
                ("TA", "A") => true,
                ("TA", _) => return Err(bad_status()),
                (_, "S") => true,
                ("S", "D") => false,
                _ => return Err(bad_status()),
            };
            let weight = parse_weight(args, stable, trimmed)?;
            Ok(Reply::Weight {
                id: id_owned,
                weight,
            })
        }
        "Z" | "TAC" => match (status, args.is_empty()) {
            ("A", true) => Ok(Reply::Done { id: id_owned }),
            _ => Err(bad_status()),
        },
        // ZI answers S (zeroed while stable) or D (zeroed with a dynamic weight).
        "ZI" => match (status, args.is_empty()) {
            ("S" | "D", true) => Ok(Reply::Done { id: id_owned }),
            _ => Err(bad_status()),
        },
        _ => {
            // I0–I5.
            let more = match status {
                "A" => false,
                "B" => true,
                _ => return Err(bad_status()),
            };
            Ok(Reply::Info {
                id: id_owned,
                text: parse_text(args, trimmed)?,
                more,
            })
        }
    }
}

/// `"    100.00 g"` → the value and unit.
fn parse_weight(args: &str, stable: bool, line: &str) -> Result<Weight, ParseError> {
    let mut parts = args.split_whitespace();
    let (Some(value), Some(unit), None) = (parts.next(), parts.next(), parts.next()) else {
        return Err(ParseError::BadValue(line.to_owned()));
    };
    let valid = value
        .bytes()
        .all(|b| b.is_ascii_digit() || b == b'.' || b == b'-')
        && value.bytes().any(|b| b.is_ascii_digit());
    let value = valid
        .then(|| value.parse::<f64>().ok())
        .flatten()
        .filter(|v| v.is_finite())
        .ok_or_else(|| ParseError::BadValue(line.to_owned()))?;
    let unit = Unit::from_code(unit).ok_or_else(|| ParseError::BadUnit(unit.to_owned()))?;
    Ok(Weight {
        value,
        unit,
        stable,
    })
}

/// Information text: one quoted field (`"0123456789"`) yields its content; several fields
/// (`I1 A "01" "2.20" …`, `I0 B 0 "I0"`) or bare text of older firmware are kept as sent.
fn parse_text(args: &str, line: &str) -> Result<String, ParseError> {
    let Some(inner) = args.strip_prefix('"') else {
        return Ok(args.to_owned());
    };
    match inner.strip_suffix('"') {
        Some(content) if !content.contains('"') => Ok(content.to_owned()),
        _ if args.ends_with('"') => Ok(args.to_owned()),
        _ => Err(ParseError::BadText(line.to_owned())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_encode_as_on_the_wire() {
        let cases = [
            (Command::Weigh, "S\r\n"),
            (Command::WeighImmediate, "SI\r\n"),
            (Command::Zero, "Z\r\n"),
            (Command::ZeroImmediate, "ZI\r\n"),
            (Command::Tare, "T\r\n"),
            (Command::TareValue, "TA\r\n"),
            (Command::ClearTare, "TAC\r\n"),
            (Command::Reset, "@\r\n"),
            (Command::Info(0), "I0\r\n"),
            (Command::Info(4), "I4\r\n"),
            (Command::Info(5), "I5\r\n"),
        ];
        for (cmd, wire) in cases {
            assert_eq!(cmd.encode(), wire.as_bytes());
            let line = wire.trim_end();
            assert_eq!(Command::parse(line), Some(cmd));
        }
        assert_eq!(Command::Reset.reply_id(), "I4");
        assert_eq!(Command::WeighImmediate.reply_id(), "S");
        assert_eq!(Command::parse("I6"), None);
        assert_eq!(Command::parse("X"), None);
    }

    fn w(value: f64, unit: Unit, stable: bool) -> Weight {
        Weight {
            value,
            unit,
            stable,
        }
    }

    #[test]
    fn every_reply_form_decodes() {
        let weight = |id: &str, weight| Reply::Weight {
            id: id.to_owned(),
            weight,
        };
        let cases: Vec<(&str, Reply)> = vec![
            ("S S     100.00 g", weight("S", w(100.0, Unit::Gram, true))),
            (
                "S D     100.01 g",
                weight("S", w(100.01, Unit::Gram, false)),
            ),
            (
                "S S      -0.0020 g",
                weight("S", w(-0.002, Unit::Gram, true)),
            ),
            ("S S  250 mg", weight("S", w(250.0, Unit::Milligram, true))),
            ("S S  0.25 kg", weight("S", w(0.25, Unit::Kilogram, true))),
            (
                "T S    12.3456 g",
                weight("T", w(12.3456, Unit::Gram, true)),
            ),
            (
                "TA A   12.3456 g",
                weight("TA", w(12.3456, Unit::Gram, true)),
            ),
            ("S I", Reply::NotExecutable { id: "S".into() }),
            ("S +", Reply::Overload { id: "S".into() }),
            ("S -", Reply::Underload { id: "S".into() }),
            ("Z A", Reply::Done { id: "Z".into() }),
            ("Z I", Reply::NotExecutable { id: "Z".into() }),
            ("Z +", Reply::Overload { id: "Z".into() }),
            ("Z -", Reply::Underload { id: "Z".into() }),
            ("ZI S", Reply::Done { id: "ZI".into() }),
            ("ZI D", Reply::Done { id: "ZI".into() }),
            ("T I", Reply::NotExecutable { id: "T".into() }),
            ("T +", Reply::Overload { id: "T".into() }),
            ("T -", Reply::Underload { id: "T".into() }),
            ("TA I", Reply::NotExecutable { id: "TA".into() }),
            ("TA L", Reply::Logical { id: "TA".into() }),
            ("TAC A", Reply::Done { id: "TAC".into() }),
            ("TAC I", Reply::NotExecutable { id: "TAC".into() }),
            (
                "I4 A \"0123456789\"",
                Reply::Info {
                    id: "I4".into(),
                    text: "0123456789".into(),
                    more: false,
                },
            ),
            (
                "I2 A \"XPE205 Excellence 220.0000 g\"",
                Reply::Info {
                    id: "I2".into(),
                    text: "XPE205 Excellence 220.0000 g".into(),
                    more: false,
                },
            ),
            (
                "I1 A \"01\" \"2.20\" \"2.20\" \"1.00\" \"1.50\"",
                Reply::Info {
                    id: "I1".into(),
                    text: "\"01\" \"2.20\" \"2.20\" \"1.00\" \"1.50\"".into(),
                    more: false,
                },
            ),
            (
                "I0 B 0 \"I0\"",
                Reply::Info {
                    id: "I0".into(),
                    text: "0 \"I0\"".into(),
                    more: true,
                },
            ),
            ("ES", Reply::SyntaxError),
            ("ET", Reply::TransmissionError),
            ("EL", Reply::LogicalError),
        ];
        for (line, reply) in cases {
            assert_eq!(parse_reply(line.as_bytes()), Ok(reply.clone()), "{line}");
        }
    }

    #[test]
    fn printed_replies_parse_back() {
        let replies = [
            Reply::Weight {
                id: "S".into(),
                weight: w(2.4981, Unit::Gram, true),
            },
            Reply::Weight {
                id: "S".into(),
                weight: w(-0.0003, Unit::Gram, false),
            },
            Reply::Weight {
                id: "T".into(),
                weight: w(31.2, Unit::Gram, true),
            },
            Reply::Weight {
                id: "TA".into(),
                weight: w(31.2, Unit::Gram, true),
            },
            Reply::Done { id: "Z".into() },
            Reply::Done { id: "ZI".into() },
            Reply::Done { id: "TAC".into() },
            Reply::NotExecutable { id: "S".into() },
            Reply::Overload { id: "S".into() },
            Reply::Underload { id: "S".into() },
            Reply::Logical { id: "TA".into() },
            Reply::Info {
                id: "I4".into(),
                text: "B123456789".into(),
                more: false,
            },
            Reply::SyntaxError,
            Reply::TransmissionError,
            Reply::LogicalError,
        ];
        for r in replies {
            let bytes = r.encode();
            assert!(bytes.ends_with(b"\r\n"));
            assert_eq!(
                parse_reply(&bytes[..bytes.len() - 2]),
                Ok(r.clone()),
                "{r:?}"
            );
        }
    }

    #[test]
    fn si_is_answered_with_the_s_identifier_only() {
        let dynamic = parse_reply(b"S D     12.3456 g").unwrap();
        assert_eq!(
            dynamic,
            Reply::Weight {
                id: "S".into(),
                weight: w(12.3456, Unit::Gram, false),
            }
        );
        assert!(Command::WeighImmediate.accepts(&dynamic));
        // `S` waits for stability: a dynamic weight is no answer to it.
        assert!(!Command::Weigh.accepts(&dynamic));
        let stable = parse_reply(b"S S     12.3456 g").unwrap();
        assert!(Command::Weigh.accepts(&stable));
        assert!(Command::WeighImmediate.accepts(&stable));
        // No balance prints `SI …`.
        assert_eq!(
            parse_reply(b"SI S     12.3456 g"),
            Err(ParseError::UnknownId("SI".into()))
        );
        for line in ["S I", "S +", "S -", "ES", "ET", "EL"] {
            let reply = parse_reply(line.as_bytes()).unwrap();
            assert!(Command::WeighImmediate.accepts(&reply), "{line}");
            assert!(Command::Weigh.accepts(&reply), "{line}");
        }
        assert!(!Command::Tare.accepts(&stable));
        assert!(!Command::Zero.accepts(&parse_reply(b"ZI S").unwrap()));
        assert!(Command::ZeroImmediate.accepts(&parse_reply(b"ZI D").unwrap()));
        assert!(Command::Reset.accepts(&parse_reply(b"I4 A \"B1\"").unwrap()));
        assert!(!Command::Info(2).accepts(&parse_reply(b"I4 A \"B1\"").unwrap()));
    }

    #[test]
    fn malformed_replies_are_typed_errors() {
        assert_eq!(parse_reply(b""), Err(ParseError::Empty));
        assert_eq!(parse_reply(b"S\xff"), Err(ParseError::NotAscii));
        assert!(matches!(parse_reply(b"Q A"), Err(ParseError::UnknownId(_))));
        assert!(matches!(parse_reply(b"S"), Err(ParseError::NoStatus(_))));
        assert!(matches!(
            parse_reply(b"S X 1 g"),
            Err(ParseError::BadStatus { .. })
        ));
        assert!(matches!(
            parse_reply(b"S S abc g"),
            Err(ParseError::BadValue(_))
        ));
        assert!(matches!(
            parse_reply(b"S S 1.0"),
            Err(ParseError::BadValue(_))
        ));
        assert!(matches!(
            parse_reply(b"S S 1.0 lb"),
            Err(ParseError::BadUnit(_))
        ));
        assert!(matches!(
            parse_reply(b"Z D"),
            Err(ParseError::BadStatus { .. })
        ));
        assert!(matches!(
            parse_reply(b"T D 1 g"),
            Err(ParseError::BadStatus { .. })
        ));
        assert!(matches!(
            parse_reply(b"I4 A \"unterminated"),
            Err(ParseError::BadText(_))
        ));
        assert!(matches!(
            parse_reply(b"S I extra"),
            Err(ParseError::BadStatus { .. })
        ));
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic_the_parser(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..64)) {
            let _ = parse_reply(&bytes);
            let _ = Command::parse(&String::from_utf8_lossy(&bytes));
            let mut d = crate::transport::serial::FrameDecoder::new(crate::transport::serial::Framing::CrLf);
            d.push(&bytes);
            while let Some(frame) = d.next_frame() {
                let _ = parse_reply(&frame.payload);
            }
        }

        #[test]
        fn reply_shaped_lines_parse_or_fail_typed(
            id in "(S|SI|Z|ZI|T|TA|TAC|I[0-6]|ES|ET|EL|X)",
            status in "(S|D|A|B|I|L|\\+|-|Q)?",
            args in "( *-?[0-9]{1,4}\\.[0-9]{1,5} (g|mg|kg|lb))|(\"[ -~]{0,10}\"?)|([ -~]{0,20})",
        ) {
            let line = format!("{id} {status} {args}");
            if let Ok(reply) = parse_reply(line.as_bytes()) {
                // Whatever parses prints a line that parses to the same reply.
                let printed = reply.line();
                proptest::prop_assert_eq!(parse_reply(printed.as_bytes()), Ok(reply));
            }
        }
    }
}
