//! The device families' schema, as the daemon serves it (`DeviceService.GetSchema`).
//!
//! ppuctl is compiled with no family: it reads every family's commands, results, units and
//! summaries from the daemon it talks to, so a family added to the daemon shows in `ppuctl` with
//! no rebuild. The schema is fetched at most once per invocation, by the commands that show
//! steps or results, and is the one schema every rendering of this process reads ([`get`]).

use std::sync::OnceLock;

use ppu_proto::v1 as pb;
use ppu_proto::v1::device_service_client::DeviceServiceClient;
use ppu_schema::prost_reflect::DynamicMessage;
use ppu_schema::{Command, Schema};
use ppuctl::batch_file;
use prost::Message;

use crate::conn::Channel;

static SCHEMA: OnceLock<Schema> = OnceLock::new();

/// The schema renderings read: the daemon's once [`fetch`]ed, else ppu.v1's alone (typed
/// steps and results still render, without the families' units).
pub fn get() -> &'static Schema {
    #[cfg(test)]
    return for_tests();
    #[cfg(not(test))]
    SCHEMA.get_or_init(batch_file::offline_schema)
}

/// Fetches the daemon's schema (once per process) and makes it the one [`get`] returns.
///
/// A daemon that cannot be asked (unreachable, or older than `GetSchema`) leaves ppu.v1's
/// schema in place: the command's own call then reports the daemon's state, and a batch file
/// is still checked against ppu.v1 first.
pub async fn fetch(ch: Channel) -> &'static Schema {
    if let Some(schema) = SCHEMA.get() {
        return schema;
    }
    let mut client = DeviceServiceClient::new(ch);
    let fetched = match client.get_schema(pb::GetSchemaRequest {}).await {
        Ok(reply) => {
            let set = reply.into_inner().file_descriptor_set;
            Schema::new(&[pb::FILE_DESCRIPTOR_SET, &set])
                .map_err(|e| {
                    eprintln!(
                        "warning: the daemon's schema does not load ({e}); showing ppu.v1 only"
                    )
                })
                .ok()
        }
        Err(_) => None,
    };
    SCHEMA.get_or_init(|| fetched.unwrap_or_else(batch_file::offline_schema))
}

/// ppu.v1 and the families the drivers register, as a daemon serves them: the schema unit
/// tests render with.
#[cfg(test)]
pub fn for_tests() -> &'static Schema {
    SCHEMA.get_or_init(|| {
        Schema::new(&[
            pb::FILE_DESCRIPTOR_SET,
            ppu_drivers::registry::FILE_DESCRIPTOR_SET,
        ])
        .expect("the drivers' schema loads")
    })
}

/// The family command a step runs, decoded as its family's message: a typed v1 member is
/// re-read from its bytes as the command whose `v1_step_field` is its field number, a
/// `Step.command` through the pool. `None` for a transfer, an empty step, or a command the
/// schema does not declare.
pub fn step_command(step: &pb::Step) -> Option<(&'static Command, DynamicMessage)> {
    let schema = get();
    match &step.kind {
        None | Some(pb::step::Kind::Transfer(_)) => None,
        Some(pb::step::Kind::Command(any)) => {
            let c = schema.command(&any.type_url)?;
            Some((c, schema.decode(&any.type_url, &any.value).ok()?))
        }
        Some(_) => {
            let bytes = step.encode_to_vec();
            let field = ppu_schema::wire::len_fields(&bytes)?
                .into_iter()
                .find(|f| schema.command_by_v1_step(f.number).is_some())?;
            let c = schema.command_by_v1_step(field.number)?;
            Some((c, schema.decode(c.full_name(), field.payload).ok()?))
        }
    }
}

/// A step's result decoded as its family's result message, with the command it answers; as
/// [`step_command`], from the typed v1 member (by `v1_result_field`) or `StepResult.output`.
pub fn step_output(r: &pb::StepResult) -> Option<(&'static Command, DynamicMessage)> {
    let schema = get();
    match &r.result {
        None | Some(pb::step_result::Result::Transfer(_)) => None,
        Some(pb::step_result::Result::Output(any)) => {
            let c = schema.command_by_result(&any.type_url)?;
            Some((c, schema.decode(&any.type_url, &any.value).ok()?))
        }
        Some(_) => {
            let bytes = r.encode_to_vec();
            let fields = ppu_schema::wire::len_fields(&bytes)?;
            fields.into_iter().find_map(|f| {
                let c = schema
                    .commands()
                    .iter()
                    .find(|c| c.options.v1_result_field == f.number && f.number != 0)?;
                let result = c.result.as_ref()?;
                Some((c, schema.decode(result.full_name(), f.payload).ok()?))
            })
        }
    }
}

/// An Any decoded through the schema (an intermediate response, say); `None` if its type is
/// not in the daemon's schema.
pub fn decode_any(any: &prost_types::Any) -> Option<DynamicMessage> {
    get().decode(&any.type_url, &any.value).ok()
}

/// The name of the member set in `message`'s oneof `oneof` (`Event.kind` → `step_started`), read
/// from the message's descriptor; `None` when none is set.
pub fn oneof_member<M: Message>(full_name: &str, message: &M, oneof: &str) -> Option<String> {
    let m = get().decode(full_name, &message.encode_to_vec()).ok()?;
    let desc = ppu_schema::prost_reflect::ReflectMessage::descriptor(&m);
    let o = desc.oneofs().find(|o| o.name() == oneof)?;
    o.fields()
        .find(|f| m.has_field(f))
        .map(|f| f.name().to_owned())
}
