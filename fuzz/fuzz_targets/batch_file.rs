//! ppuctl batch files, TOML and JSON: parsing and conversion to specs, with the field path of
//! every refusal, through ppuctl's own library.
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use ppuctl::batch_file;

// ppu.v1 alone: the families' schema comes from a daemon, which a fuzz run has not. Loaded
// once: building the descriptor pool costs far more than a parse.
static SCHEMA: LazyLock<ppu_schema::Schema> = LazyLock::new(batch_file::offline_schema);

fuzz_target!(|data: &[u8]| {
    let _ = batch_file::parse(data, batch_file::Format::Toml, &SCHEMA);
    let _ = batch_file::parse(data, batch_file::Format::Json, &SCHEMA);
});
