//! ppuctl's reusable part: the batch-file reader (TOML/JSON batch files to `ppu.v1` specs, with
//! the field path of every refusal). It is a library so that the fuzz target and tests outside
//! the binary can link it rather than include the file by path; the CLI and TUI are the binary.

pub mod batch_file;
