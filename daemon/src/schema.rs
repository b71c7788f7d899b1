//! The daemon's one schema: every registered device family's descriptors (from
//! `ppu_drivers::registry`) and ppu.v1's, in one pool. The core asks it what a command is, how
//! to check it and how to map it onto the typed v1 aliases; it never names a family itself.

use std::sync::LazyLock;

use ppu_schema::Schema;

static SCHEMA: LazyLock<Schema> = LazyLock::new(|| {
    match Schema::new(&[
        ppu_drivers::registry::FILE_DESCRIPTOR_SET,
        ppu_proto::v1::FILE_DESCRIPTOR_SET,
    ]) {
        Ok(s) => s,
        // The descriptors are compiled in; a set that does not load is a build defect, caught
        // by `the_compiled_in_schema_loads` below before anything ships.
        Err(e) => panic!("the compiled-in family schemas do not load: {e}"),
    }
});

/// The schema of every family this daemon was built with.
pub fn schema() -> &'static Schema {
    &SCHEMA
}

/// The ppu.v1 `DeviceFamily` value of `family`, 0 if v1 has none.
pub fn v1_family(family: &str) -> i32 {
    schema()
        .family(family)
        .map_or(0, |f| f.options.v1_family as i32)
}

/// The ppu.v1 `Capability` value of `capability`, if v1 has one.
pub fn v1_capability(capability: &str) -> Option<i32> {
    schema()
        .commands_of(capability)
        .map(|c| c.options.v1_capability as i32)
        .find(|n| *n != 0)
}

/// The capability that runs `cmd`, if it is a registered family's command.
pub fn capability_of(cmd: &ppu_drivers::StepCommand) -> Option<&'static str> {
    schema().command(cmd.type_name()).map(|c| c.capability())
}

/// The audit action recorded when a device of `family` is driven safe.
pub fn safe_action(family: &str) -> String {
    schema()
        .family(family)
        .map(|f| f.options.safe_action.clone())
        .filter(|a| !a.is_empty())
        .unwrap_or_else(|| format!("{family}_safe_state"))
}

/// Fills the typed ppu.v1 `DeviceLimits` fields that share a limit's name (`max_temperature_c`),
/// for v1 clients; every limit is also in `values`.
pub fn v1_limits(limits: &ppu_drivers::Limits) -> ppu_proto::v1::DeviceLimits {
    use prost::Message;
    let mut bytes = Vec::new();
    if let Some(desc) = schema().pool().get_message_by_name("ppu.v1.DeviceLimits") {
        for (name, value) in &limits.values {
            if let Some(field) = desc.get_field_by_name(name)
                && matches!(field.kind(), ppu_schema::prost_reflect::Kind::Double)
            {
                prost::encoding::double::encode(field.number(), value, &mut bytes);
            }
        }
    }
    let mut out = ppu_proto::v1::DeviceLimits::decode(bytes.as_slice()).unwrap_or_default();
    out.values = limits.values.clone().into_iter().collect();
    out.accepted = limits
        .accepted
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                ppu_proto::v1::AcceptedValues { values: v.clone() },
            )
        })
        .collect();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_compiled_in_schema_loads() {
        assert!(!schema().families().is_empty());
        assert!(schema().pool().get_message_by_name("ppu.v1.Step").is_some());
    }

    #[test]
    fn typed_v1_limits_are_filled_by_name() {
        let l = ppu_drivers::Limits::default()
            .with("max_temperature_c", 400.0)
            .with("max_flow_sccm", 200.0);
        let v1 = v1_limits(&l);
        assert_eq!(v1.max_temperature_c, Some(400.0));
        assert_eq!(v1.values.get("max_flow_sccm"), Some(&200.0));
    }
}
