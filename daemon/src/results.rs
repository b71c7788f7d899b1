//! Driver results to API results, generic over families. A family's result is its own
//! message, packed as `Any`; where its command has a typed ppu.v1 alias (declared in its
//! schema as `v1_result_field` / `v1_intermediate_event`), the same bytes go into that typed
//! field, so v1 clients see exactly what they always saw. Everything else travels as `Any`.

use pb::event::Kind;
use pb::step_result::Result as R;
use ppu_drivers::device::StepOutput;
use ppu_proto::v1 as pb;
use ppu_schema::{Schema, wire};
use prost::Message;

/// The API form of a step's typed result.
pub fn to_proto(schema: &Schema, out: StepOutput) -> R {
    let any = out.0;
    let alias = schema
        .command_by_result(&any.type_url)
        .map(|c| c.options.v1_result_field)
        .filter(|n| *n != 0);
    if let Some(field) = alias
        && let Ok(typed) = pb::StepResult::decode(wire::len_field(field, &any.value).as_slice())
        && let Some(r) = typed.result
    {
        return r;
    }
    R::Output(any)
}

/// The event for the `index`-th intermediate response of step `step_index`.
pub fn intermediate(schema: &Schema, step_index: u32, index: u32, value: prost_types::Any) -> Kind {
    let alias = schema
        .commands()
        .iter()
        .find(|c| {
            c.intermediate
                .as_ref()
                .is_some_and(|m| m.full_name() == ppu_schema::type_name(&value.type_url))
        })
        .map(|c| c.options.v1_intermediate_event)
        .filter(|n| *n != 0);
    if let Some(field) = alias {
        // The v1 alias event is { step_index = 1, index = 2, message = 3 }, like
        // StepIntermediate with the message unpacked.
        let mut event = wire::varint_field(1, u64::from(step_index));
        event.extend(wire::varint_field(2, u64::from(index)));
        event.extend(wire::len_field(3, &value.value));
        if let Ok(typed) = pb::Event::decode(wire::len_field(field, &event).as_slice())
            && let Some(kind) = typed.kind
        {
            return kind;
        }
    }
    Kind::StepIntermediate(pb::StepIntermediate {
        step_index,
        index,
        value: Some(value),
    })
}
