//! The family registry: every family's schema, in one descriptor set.
//!
//! A family registers by being a folder with a `.proto` (compiled by `build.rs`, no list to
//! edit) and one `pub mod` line in `lib.rs`. The daemon builds its [`Schema`] from
//! [`FILE_DESCRIPTOR_SET`] and never names a family.

use ppu_schema::{Schema, SchemaError};

/// Encoded `FileDescriptorSet` of every family's schema (with its imports).
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/ppu_families.bin"));

/// The schema of every registered family.
pub fn schema() -> Result<Schema, SchemaError> {
    Schema::new(&[FILE_DESCRIPTOR_SET])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_family_loads_with_its_commands() {
        let schema = schema().expect("the families' schema loads");
        let families: Vec<&str> = schema.families().iter().map(|f| f.name()).collect();
        for f in ["furnace", "dispenser", "balance", "analyser"] {
            assert!(families.contains(&f), "{f} missing from {families:?}");
        }
        for c in schema.commands() {
            assert!(
                c.result.is_some(),
                "{} has no result message",
                c.full_name()
            );
        }
        let furnace = schema.command_named("furnace").expect("furnace command");
        assert_eq!(furnace.capability(), "furnace_program");
        assert_eq!(
            schema.command_by_v1_step(12).map(|c| c.name()),
            Some("furnace")
        );
        let temp = furnace
            .message
            .get_field_by_name("segments")
            .expect("segments");
        assert_eq!(schema.field_options(&temp).min_items, 1);
    }
}
