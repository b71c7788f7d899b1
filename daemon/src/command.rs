//! A step's command, resolved against the family schema once, at submission, and carried from
//! there to dispatch and to the driver (parse once): which command it is, the capability that
//! runs it, its packed message and its decoded form for the generic checks.
//!
//! Nothing here names a family: a typed ppu.v1 alias (`Step.furnace`) is found by its field
//! number among the commands' declared `v1_step_field`s and re-read as the family's message
//! (same bytes), and `Step.command` by its type URL.

use ppu_drivers::StepCommand;
use ppu_proto::v1 as pb;
use ppu_schema::prost_reflect::DynamicMessage;
use ppu_schema::{Schema, validate, wire};
use prost::Message;

use crate::error::Rejection;

/// Field number of `ppu.v1.Step.device_id`: the one length-delimited field of a step that is
/// not its kind.
const STEP_DEVICE_ID: u32 = 1;

/// A resolved, structurally valid command.
#[derive(Debug, Clone, PartialEq)]
pub struct Command {
    /// The step key (`furnace`, `gas_flow`): the path element of its fields in refusals.
    pub name: &'static str,
    /// The capability a device needs to run it.
    pub capability: &'static str,
    /// What the driver gets.
    pub step: StepCommand,
    /// The same, decoded, for the schema's generic checks.
    pub message: DynamicMessage,
    /// Why it must not run twice (a dispense), if so.
    pub not_rerunnable: Option<&'static str>,
    /// Whether recovery may re-attach to it.
    pub adoptable: bool,
}

/// What a submitted step is.
#[derive(Debug, Clone)]
pub enum Resolved {
    Command(Command),
    /// A sample move, inserted by the scheduler.
    Transfer(pb::Transfer),
}

/// Resolves `step` (at `path`) against `schema`, without checking its values.
pub fn resolve(
    schema: &'static Schema,
    step: &pb::Step,
    path: &str,
) -> Result<Resolved, Rejection> {
    let (command, bytes) = match &step.kind {
        None => {
            let names: Vec<&str> = schema.commands().iter().map(|c| c.name()).collect();
            return Err(Rejection::invalid(
                path,
                format!("no step kind set (one of {})", names.join(", ")),
            ));
        }
        Some(pb::step::Kind::Transfer(t)) => return Ok(Resolved::Transfer(t.clone())),
        Some(pb::step::Kind::Command(any)) => {
            let command = schema.command(&any.type_url).ok_or_else(|| {
                Rejection::invalid(
                    format!("{path}.command"),
                    format!(
                        "{:?} is not a command of any device family this daemon knows \
                         (DeviceService.GetSchema lists them)",
                        any.type_url
                    ),
                )
            })?;
            (command, any.value.clone())
        }
        Some(_) => {
            // A typed v1 alias: the set kind field is the step's one length-delimited field
            // besides `device_id`.
            let encoded = step.encode_to_vec();
            let fields = wire::len_fields(&encoded).unwrap_or_default();
            let found = fields
                .iter()
                .filter(|f| f.number != STEP_DEVICE_ID)
                .find_map(|f| Some((schema.command_by_v1_step(f.number)?, f.payload.to_vec())));
            found.ok_or_else(|| {
                Rejection::invalid(path, "a step kind no device family of this daemon declares")
            })?
        }
    };
    let message =
        DynamicMessage::decode(command.message.clone(), bytes.as_slice()).map_err(|e| {
            Rejection::invalid(
                format!("{path}.{}", command.name()),
                format!("does not decode: {e}"),
            )
        })?;
    Ok(Resolved::Command(Command {
        name: command.name(),
        capability: command.capability(),
        step: StepCommand(prost_types::Any {
            type_url: ppu_schema::type_url(command.full_name()),
            value: bytes,
        }),
        message,
        not_rerunnable: command.not_rerunnable(),
        adoptable: command.options.adoptable,
    }))
}

/// Resolves `step` and checks what needs no device (finite numbers, static bounds, required
/// text, least list lengths).
pub fn resolve_checked(
    schema: &'static Schema,
    step: &pb::Step,
    path: &str,
) -> Result<Resolved, Rejection> {
    let resolved = resolve(schema, step, path)?;
    if let Resolved::Command(c) = &resolved {
        validate::structure(schema, &c.message, &format!("{path}.{}", c.name))
            .map_err(|e| Rejection::invalid(e.path, e.reason))?;
    }
    Ok(resolved)
}

/// Resolves `step` and checks its sizes against the daemon's `[limits]` (`limit` by key).
pub fn check_bounds(
    schema: &'static Schema,
    step: &pb::Step,
    path: &str,
    limit: &dyn Fn(&str) -> Option<usize>,
) -> Result<(), Rejection> {
    // A list item or a text byte takes at least one byte on the wire: a step whose whole
    // encoding is no longer than the smallest of these bounds cannot exceed any of them, and
    // needs no decoding here (the common case, checked on every submission).
    let smallest = schema
        .items_limits()
        .iter()
        .map(String::as_str)
        .chain(["max_text_bytes"])
        .filter_map(limit)
        .min();
    if smallest.is_some_and(|m| step.encoded_len() <= m) {
        return Ok(());
    }
    if let Resolved::Command(c) = resolve(schema, step, path)? {
        validate::bounds(schema, &c.message, &format!("{path}.{}", c.name), limit)
            .map_err(|e| Rejection::invalid(e.path, e.reason))?;
    }
    Ok(())
}
