//! Register numbers, parameter kinds and their 16-bit / float encodings.

use tokio_modbus::ExceptionCode;

use super::reg;

/// A controller parameter reachable over Modbus.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Param {
    Pv,
    TargetSp,
    Output,
    WorkingOutput,
    WorkingSp,
    Xp,
    Ti,
    Td,
    SpSelect,
    Sp1,
    Sp2,
    RemoteSp,
    RateLimit,
    Error,
    FastStatus,
    Status,
    Firmware,
    Ident,
    InputMv,
    AutoManual,
    AckAlarms,
    ProgramNumber,
    ProgramState,
    SegmentType,
    SegmentTimeLeft,
    ProgramSegment,
    ProgramTimeLeft,
    /// A register of the program data region (its address); the model knows what it holds.
    ProgramData(u16),
}

/// How a parameter is represented on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    /// Signed, scaled by `10^dp` (temperatures, temperature differences and rates).
    Temp,
    /// Signed, one fixed decimal (percent).
    Pct,
    /// Whole seconds (integer region) / u32 milliseconds (float region).
    Seconds,
    /// Signed, two fixed decimals (millivolts).
    Millivolts,
    /// A plain unsigned word (status, enumerations, versions).
    Word,
    /// Programmer durations: whole programmer time units (integer region) / u32 milliseconds
    /// (float region). The value is in seconds.
    ProgramTime,
}

impl Param {
    pub(crate) fn from_reg(n: u16) -> Option<Self> {
        Some(match n {
            reg::PV => Param::Pv,
            reg::TARGET_SP => Param::TargetSp,
            reg::OUTPUT => Param::Output,
            reg::WORKING_OUTPUT => Param::WorkingOutput,
            reg::WORKING_SP => Param::WorkingSp,
            reg::XP => Param::Xp,
            reg::TI => Param::Ti,
            reg::TD => Param::Td,
            reg::SP_SELECT => Param::SpSelect,
            reg::SP1 => Param::Sp1,
            reg::SP2 => Param::Sp2,
            reg::REMOTE_SP => Param::RemoteSp,
            reg::RATE_LIMIT => Param::RateLimit,
            reg::ERROR => Param::Error,
            reg::FAST_STATUS => Param::FastStatus,
            reg::STATUS => Param::Status,
            reg::FIRMWARE => Param::Firmware,
            reg::IDENT => Param::Ident,
            reg::INPUT_MV => Param::InputMv,
            reg::AUTO_MANUAL => Param::AutoManual,
            reg::ACK_ALARMS => Param::AckAlarms,
            reg::PROGRAM_NUMBER => Param::ProgramNumber,
            reg::PROGRAM_STATE => Param::ProgramState,
            reg::SEGMENT_TYPE => Param::SegmentType,
            reg::SEGMENT_TIME_LEFT => Param::SegmentTimeLeft,
            reg::PROGRAM_SEGMENT => Param::ProgramSegment,
            reg::PROGRAM_TIME_LEFT => Param::ProgramTimeLeft,
            n if (super::programmer::PROGRAM_BASE..super::programmer::PROGRAM_END).contains(&n) => {
                Param::ProgramData(n)
            }
            _ => return None,
        })
    }

    pub(crate) fn kind(self) -> Kind {
        match self {
            Param::Pv
            | Param::TargetSp
            | Param::WorkingSp
            | Param::Sp1
            | Param::Sp2
            | Param::RemoteSp
            | Param::RateLimit
            | Param::Error => Kind::Temp,
            Param::Output | Param::WorkingOutput | Param::Xp => Kind::Pct,
            Param::Ti | Param::Td => Kind::Seconds,
            Param::InputMv => Kind::Millivolts,
            Param::SpSelect
            | Param::FastStatus
            | Param::Status
            | Param::Firmware
            | Param::Ident
            | Param::AutoManual
            | Param::AckAlarms
            | Param::ProgramNumber
            | Param::ProgramState
            | Param::SegmentType
            | Param::ProgramSegment
            // Program data: the model decides per cell.
            | Param::ProgramData(_) => Kind::Word,
            Param::SegmentTimeLeft | Param::ProgramTimeLeft => Kind::ProgramTime,
        }
    }
}

/// Where a register address points.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Slot {
    Int(Param),
    /// Float region: the parameter and which word (false = high word).
    Float(Param, bool),
}

pub(crate) fn slot(addr: u16) -> Result<Slot, ExceptionCode> {
    if addr >= reg::FLOAT_BASE {
        let offset = addr - reg::FLOAT_BASE;
        let param = Param::from_reg(offset / 2).ok_or(ExceptionCode::IllegalDataAddress)?;
        Ok(Slot::Float(param, offset % 2 == 1))
    } else {
        Param::from_reg(addr)
            .map(Slot::Int)
            .ok_or(ExceptionCode::IllegalDataAddress)
    }
}

fn scaled_i16(value: f64, scale: f64) -> u16 {
    let raw = (value * scale).round();
    let raw = if raw.is_nan() {
        0.0
    } else {
        raw.clamp(f64::from(i16::MIN), f64::from(i16::MAX))
    };
    // In range by the clamp above.
    (raw as i16) as u16
}

fn dp_scale(dp: u8) -> f64 {
    10f64.powi(i32::from(dp))
}

/// Engineering value → integer-region word.
pub(crate) fn encode_int(kind: Kind, value: f64, dp: u8) -> u16 {
    match kind {
        Kind::Temp => scaled_i16(value, dp_scale(dp)),
        Kind::Pct => scaled_i16(value, 10.0),
        Kind::Millivolts => scaled_i16(value, 100.0),
        Kind::Seconds | Kind::Word | Kind::ProgramTime => {
            let v = value.round();
            if v.is_nan() {
                0
            } else {
                v.clamp(0.0, f64::from(u16::MAX)) as u16
            }
        }
    }
}

/// Integer-region word → engineering value.
pub(crate) fn decode_int(kind: Kind, word: u16, dp: u8) -> f64 {
    let signed = f64::from(word as i16);
    match kind {
        Kind::Temp => signed / dp_scale(dp),
        Kind::Pct => signed / 10.0,
        Kind::Millivolts => signed / 100.0,
        Kind::Seconds | Kind::Word | Kind::ProgramTime => f64::from(word),
    }
}

/// Engineering value → float-region register pair (high word first).
pub(crate) fn encode_float(kind: Kind, value: f64) -> [u16; 2] {
    let bits = match kind {
        Kind::Seconds | Kind::ProgramTime => {
            let ms = (value * 1000.0).round();
            if ms.is_nan() {
                0
            } else {
                ms.clamp(0.0, f64::from(u32::MAX)) as u32
            }
        }
        _ => (value as f32).to_bits(),
    };
    [(bits >> 16) as u16, bits as u16]
}

/// Float-region register pair → engineering value.
pub(crate) fn decode_float(kind: Kind, words: [u16; 2]) -> f64 {
    let bits = (u32::from(words[0]) << 16) | u32::from(words[1]);
    match kind {
        Kind::Seconds | Kind::ProgramTime => f64::from(bits) / 1000.0,
        _ => f64::from(f32::from_bits(bits)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temperatures_are_signed_and_scaled() {
        assert_eq!(encode_int(Kind::Temp, 25.0, 1), 250);
        assert_eq!(encode_int(Kind::Temp, -12.34, 2), (-1234i16) as u16);
        assert_eq!(decode_int(Kind::Temp, (-1234i16) as u16, 2), -12.34);
        // Saturates instead of wrapping.
        assert_eq!(encode_int(Kind::Temp, 1000.0, 2), i16::MAX as u16);
        assert_eq!(encode_int(Kind::Temp, f64::NAN, 1), 0);
    }

    #[test]
    fn float_region_round_trips() {
        let w = encode_float(Kind::Temp, 123.5);
        assert_eq!(w, [0x42F7, 0x0000]);
        assert_eq!(decode_float(Kind::Temp, w), 123.5);
        let w = encode_float(Kind::Seconds, 240.0);
        assert_eq!(decode_float(Kind::Seconds, w), 240.0);
        assert_eq!((u32::from(w[0]) << 16) | u32::from(w[1]), 240_000);
    }

    #[test]
    fn slots() {
        assert_eq!(slot(1), Ok(Slot::Int(Param::Pv)));
        assert_eq!(slot(0), Err(ExceptionCode::IllegalDataAddress));
        assert_eq!(slot(0x8002), Ok(Slot::Float(Param::Pv, false)));
        assert_eq!(slot(0x8003), Ok(Slot::Float(Param::Pv, true)));
        assert_eq!(slot(0x8000), Err(ExceptionCode::IllegalDataAddress));
        assert_eq!(slot(0xFFFF), Err(ExceptionCode::IllegalDataAddress));
    }
}
