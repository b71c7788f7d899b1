//! ppuctl batch files, TOML and JSON: parsing and conversion to specs, with the field path of
//! every refusal, through ppuctl's own library.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ppuctl::batch_file;

fuzz_target!(|data: &[u8]| {
    // ppu.v1 alone: the families' schema comes from a daemon, which a fuzz run has not.
    let schema = batch_file::offline_schema();
    let _ = batch_file::parse(data, batch_file::Format::Toml, &schema);
    let _ = batch_file::parse(data, batch_file::Format::Json, &schema);
});
