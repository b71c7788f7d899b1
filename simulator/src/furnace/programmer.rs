//! The 2400-series setpoint programmer: stored programs of 16 segments and the state machine
//! that runs one of them, driving the controller's working setpoint.
//!
//! Written from the 2000-series register description (see the reference's §2): program number
//! 22, program state 23 (bit-coded 1 reset, 2 run, 4 hold, 8 holdback, 16 complete), current
//! segment 56, its type 29, segment time remaining 36, program time remaining 58, and program
//! data at `8192 + 136·program + 8·segment` (segment types 0 end, 1 ramp at a rate, 2 ramp in a
//! time, 3 dwell, 4 step; `+1` target, `+2` rate or duration). Block 0 of a program (`segment`
//! 0) holds the program's general data, kept as plain words; blocks 1–16 are its segments.

use tokio_modbus::ExceptionCode;

/// First register of the program data region.
pub(crate) const PROGRAM_BASE: u16 = 8192;
/// Registers per program: a general block and 16 segments of 8 registers each.
pub(crate) const PROGRAM_STRIDE: u16 = 136;
/// Registers per segment.
pub(crate) const SEGMENT_STRIDE: u16 = 8;
/// Segments per program.
pub(crate) const SEGMENTS: usize = 16;
/// Most programs a 2400 stores.
pub(crate) const MAX_PROGRAMS: u16 = 20;
/// End (exclusive) of the program data region for [`MAX_PROGRAMS`] programs.
pub(crate) const PROGRAM_END: u16 = PROGRAM_BASE + PROGRAM_STRIDE * (MAX_PROGRAMS + 1);

/// Segment types (program data offset +0).
pub(crate) mod segment_type {
    pub const END: u16 = 0;
    pub const RAMP_RATE: u16 = 1;
    pub const RAMP_TIME: u16 = 2;
    pub const DWELL: u16 = 3;
    pub const STEP: u16 = 4;
}

/// Program states as register 23 codes them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProgramState {
    Reset,
    Run,
    Hold,
    Complete,
}

impl ProgramState {
    /// The bit register 23 shows for this state.
    pub fn bits(self) -> u16 {
        match self {
            ProgramState::Reset => 1,
            ProgramState::Run => 2,
            ProgramState::Hold => 4,
            ProgramState::Complete => 16,
        }
    }
}

/// One segment, in engineering units.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct SegmentData {
    pub kind: u16,
    /// Target, °C (ramps and steps).
    pub target_c: f64,
    /// Rate in °C/min (ramp at rate) or duration in s (ramp in time, dwell).
    pub value: f64,
    /// Offsets +3..=+7: stored, not interpreted.
    pub spare: [u16; 5],
}

#[derive(Clone, Debug, Default)]
struct Program {
    general: [u16; 8],
    segments: [SegmentData; SEGMENTS],
}

/// Where a running program is.
#[derive(Clone, Copy, Debug)]
struct Position {
    /// Index of the current segment, 0-based.
    segment: usize,
    elapsed_s: f64,
    /// Programmer setpoint when the segment started, °C.
    start_c: f64,
    /// Programmer setpoint now, °C.
    sp_c: f64,
}

/// Stored programs and the one running (or held, or complete).
#[derive(Clone, Debug)]
pub(crate) struct Programmer {
    programs: Vec<Program>,
    /// Selected program, 1-based (register 22).
    number: u16,
    state: ProgramState,
    position: Option<Position>,
}

impl Programmer {
    pub fn new(programs: u16) -> Self {
        Self {
            programs: vec![Program::default(); usize::from(programs.max(1))],
            number: 1,
            state: ProgramState::Reset,
            position: None,
        }
    }

    pub fn count(&self) -> u16 {
        self.programs.len() as u16
    }

    pub fn state(&self) -> ProgramState {
        self.state
    }

    pub fn number(&self) -> u16 {
        self.number
    }

    /// Selects the program to run; only while none is running or held.
    pub fn select(&mut self, number: u16) -> Result<(), ExceptionCode> {
        if !(1..=self.count()).contains(&number)
            || matches!(self.state, ProgramState::Run | ProgramState::Hold)
        {
            return Err(ExceptionCode::IllegalDataValue);
        }
        self.number = number;
        Ok(())
    }

    /// A write to register 23: 1 reset, 2 run (from reset, hold or complete), 4 hold (a
    /// running program). Run starts from `pv_c` ("servo to PV").
    pub fn command(&mut self, bits: u16, pv_c: f64) -> Result<(), ExceptionCode> {
        match (bits, self.state) {
            (1, _) => {
                self.state = ProgramState::Reset;
                self.position = None;
            }
            (2, ProgramState::Reset | ProgramState::Complete) => {
                self.state = ProgramState::Run;
                self.position = Some(Position {
                    segment: 0,
                    elapsed_s: 0.0,
                    start_c: pv_c,
                    sp_c: pv_c,
                });
                // A program whose first segment is an end completes at once.
                self.advance(0.0);
            }
            (2, ProgramState::Hold) => self.state = ProgramState::Run,
            (2, ProgramState::Run) => {}
            (4, ProgramState::Run | ProgramState::Hold) => self.state = ProgramState::Hold,
            _ => return Err(ExceptionCode::IllegalDataValue),
        }
        Ok(())
    }

    /// The programmer's setpoint while a program is running, held or complete (it stays at
    /// its last value until reset).
    pub fn setpoint(&self) -> Option<f64> {
        self.position.map(|p| p.sp_c)
    }

    fn running_program(&self) -> Option<&Program> {
        self.programs.get(usize::from(self.number) - 1)
    }

    fn current_segment(&self) -> Option<SegmentData> {
        let position = self.position?;
        if self.state == ProgramState::Complete {
            return None;
        }
        self.running_program()?
            .segments
            .get(position.segment)
            .copied()
    }

    /// Current segment, 1-based (register 56); 0 when reset.
    pub fn segment_number(&self) -> u16 {
        self.position.map_or(0, |p| p.segment as u16 + 1)
    }

    /// Type of the current segment (register 29); end when none runs.
    pub fn segment_type(&self) -> u16 {
        self.current_segment()
            .map_or(segment_type::END, |segment| segment.kind)
    }

    /// True while the current segment moves the setpoint.
    pub fn ramping(&self) -> bool {
        self.state == ProgramState::Run
            && matches!(
                self.segment_type(),
                segment_type::RAMP_RATE | segment_type::RAMP_TIME
            )
    }

    /// Seconds left in the current segment (register 36).
    pub fn segment_time_left_s(&self) -> f64 {
        match (self.position, self.current_segment()) {
            (Some(position), Some(segment)) => remaining_s(&segment, position),
            _ => 0.0,
        }
    }

    /// Seconds left in the whole program (register 58): the current segment's remaining
    /// time and the planned time of the later ones.
    pub fn program_time_left_s(&self) -> f64 {
        let (Some(position), Some(program)) = (self.position, self.running_program()) else {
            return 0.0;
        };
        if self.state == ProgramState::Complete {
            return 0.0;
        }
        let mut total = self.segment_time_left_s();
        let mut from = match program.segments.get(position.segment) {
            Some(segment) if segment.kind != segment_type::DWELL => segment.target_c,
            _ => position.sp_c,
        };
        for segment in program.segments.iter().skip(position.segment + 1) {
            match segment.kind {
                segment_type::END => break,
                segment_type::RAMP_RATE if segment.value > 0.0 => {
                    total += (segment.target_c - from).abs() / segment.value * 60.0;
                }
                segment_type::RAMP_TIME | segment_type::DWELL => total += segment.value,
                _ => {}
            }
            if segment.kind != segment_type::DWELL {
                from = segment.target_c;
            }
        }
        total
    }

    /// Moves a running program on by `dt` seconds.
    pub fn advance(&mut self, mut dt: f64) {
        if self.state != ProgramState::Run {
            return;
        }
        let Some(program) = self.running_program().cloned() else {
            return;
        };
        let Some(mut position) = self.position else {
            return;
        };
        // Several segments may end within one step (steps, zero-length dwells).
        for _ in 0..=SEGMENTS {
            let Some(segment) = program.segments.get(position.segment).copied() else {
                self.state = ProgramState::Complete;
                break;
            };
            let done = match segment.kind {
                segment_type::RAMP_RATE if segment.value > 0.0 => {
                    let max_step = segment.value / 60.0 * dt;
                    let diff = segment.target_c - position.sp_c;
                    if diff.abs() <= max_step {
                        dt -= diff.abs() / (segment.value / 60.0);
                        position.sp_c = segment.target_c;
                        true
                    } else {
                        position.sp_c += max_step.copysign(diff);
                        dt = 0.0;
                        false
                    }
                }
                segment_type::RAMP_TIME | segment_type::DWELL => {
                    let left = (segment.value - position.elapsed_s).max(0.0);
                    let used = left.min(dt);
                    position.elapsed_s += used;
                    dt -= used;
                    if segment.kind == segment_type::RAMP_TIME {
                        let fraction = if segment.value > 0.0 {
                            (position.elapsed_s / segment.value).min(1.0)
                        } else {
                            1.0
                        };
                        position.sp_c =
                            position.start_c + (segment.target_c - position.start_c) * fraction;
                    }
                    position.elapsed_s >= segment.value
                }
                // A step, or a ramp at rate 0 (no rate: a step).
                segment_type::STEP | segment_type::RAMP_RATE => {
                    position.sp_c = segment.target_c;
                    true
                }
                _ => {
                    self.state = ProgramState::Complete;
                    break;
                }
            };
            if !done {
                break;
            }
            position.segment += 1;
            position.elapsed_s = 0.0;
            position.start_c = position.sp_c;
            if position.segment >= SEGMENTS {
                self.state = ProgramState::Complete;
                position.segment = SEGMENTS - 1;
                break;
            }
        }
        self.position = Some(position);
    }

    /// The program data cell at `program` (1-based), `block` (0 general, 1–16 segments),
    /// `field` (0–7), or `None` outside the stored programs.
    pub fn cell(&self, program: u16, block: u16, field: u16) -> Option<Cell> {
        let p = self.programs.get(usize::from(program).checked_sub(1)?)?;
        if field >= SEGMENT_STRIDE {
            return None;
        }
        if block == 0 {
            return Some(Cell::Word(p.general[usize::from(field)]));
        }
        let segment = p.segments.get(usize::from(block) - 1)?;
        Some(match field {
            0 => Cell::Word(segment.kind),
            1 => Cell::Temp(segment.target_c),
            2 if segment.kind == segment_type::RAMP_RATE => Cell::Temp(segment.value),
            2 if matches!(segment.kind, segment_type::RAMP_TIME | segment_type::DWELL) => {
                Cell::Time(segment.value)
            }
            2 => Cell::Word(0),
            f => Cell::Word(segment.spare[usize::from(f) - 3]),
        })
    }

    /// Writes a program data cell (value already in the unit [`Self::cell`] reports for it).
    /// The running or held program cannot be edited.
    pub fn set_cell(
        &mut self,
        program: u16,
        block: u16,
        field: u16,
        value: f64,
        sp_range: (f64, f64),
        max_rate: f64,
    ) -> Result<(), ExceptionCode> {
        let editing_running =
            program == self.number && matches!(self.state, ProgramState::Run | ProgramState::Hold);
        if editing_running {
            return Err(ExceptionCode::IllegalDataValue);
        }
        let index = usize::from(program)
            .checked_sub(1)
            .ok_or(ExceptionCode::IllegalDataAddress)?;
        let p = self
            .programs
            .get_mut(index)
            .ok_or(ExceptionCode::IllegalDataAddress)?;
        let word = || {
            if value.is_finite() && value >= 0.0 && value <= f64::from(u16::MAX) {
                Ok(value.round() as u16)
            } else {
                Err(ExceptionCode::IllegalDataValue)
            }
        };
        if block == 0 {
            p.general[usize::from(field)] = word()?;
            return Ok(());
        }
        let segment = p
            .segments
            .get_mut(usize::from(block) - 1)
            .ok_or(ExceptionCode::IllegalDataAddress)?;
        match field {
            0 => {
                let kind = word()?;
                if kind > segment_type::STEP {
                    return Err(ExceptionCode::IllegalDataValue);
                }
                segment.kind = kind;
            }
            1 => {
                if !(value >= sp_range.0 - 1e-9 && value <= sp_range.1 + 1e-9) {
                    return Err(ExceptionCode::IllegalDataValue);
                }
                segment.target_c = value.clamp(sp_range.0, sp_range.1);
            }
            2 => {
                let max = if segment.kind == segment_type::RAMP_RATE {
                    max_rate
                } else {
                    f64::MAX
                };
                if !(value.is_finite() && value >= 0.0 && value <= max + 1e-9) {
                    return Err(ExceptionCode::IllegalDataValue);
                }
                segment.value = value;
            }
            f => segment.spare[usize::from(f) - 3] = word()?,
        }
        Ok(())
    }
}

/// A program data cell and how it is represented.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Cell {
    /// A plain word.
    Word(u16),
    /// A temperature or a rate (°C, °C/min), scaled like temperatures.
    Temp(f64),
    /// A duration, s (integer region: whole programmer time units).
    Time(f64),
}

fn remaining_s(segment: &SegmentData, position: Position) -> f64 {
    match segment.kind {
        segment_type::RAMP_RATE if segment.value > 0.0 => {
            (segment.target_c - position.sp_c).abs() / segment.value * 60.0
        }
        segment_type::RAMP_TIME | segment_type::DWELL => {
            (segment.value - position.elapsed_s).max(0.0)
        }
        _ => 0.0,
    }
}

/// Splits a program data address into (program, block, field), or `None` outside the region.
pub(crate) fn locate(addr: u16, programs: u16) -> Option<(u16, u16, u16)> {
    let offset = addr.checked_sub(PROGRAM_BASE)?;
    let program = offset / PROGRAM_STRIDE;
    let within = offset % PROGRAM_STRIDE;
    (1..=programs).contains(&program).then_some((
        program,
        within / SEGMENT_STRIDE,
        within % SEGMENT_STRIDE,
    ))
}
