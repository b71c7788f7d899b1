//! ppuctl batch files, TOML and JSON: parsing and conversion to specs, with the field path of
//! every refusal. The module is ppuctl's own, included by path (ppuctl is a binary).
#![no_main]

use libfuzzer_sys::fuzz_target;

#[allow(dead_code)]
#[path = "../../daemon/src/bin/ppuctl/batch_file.rs"]
mod batch_file;

fuzz_target!(|data: &[u8]| {
    let _ = batch_file::parse(data, batch_file::Format::Toml);
    let _ = batch_file::parse(data, batch_file::Format::Json);
});
