//! Generates the ppu.v1 tonic/prost code and a file descriptor set for gRPC reflection.
//!
//! A `PROTOC` already set in the environment wins; otherwise the vendored protoc is used, so a
//! fresh clone builds with no system packages.

use std::path::PathBuf;

const PROTOS: &[&str] = &[
    "ppu/v1/experiment.proto",
    "ppu/v1/queue.proto",
    "ppu/v1/devices.proto",
    "ppu/v1/events.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("PROTOC").is_none() {
        let protoc = protoc_bin_vendored::protoc_bin_path()?;
        // SAFETY: build scripts are single-threaded; nothing else reads the environment yet.
        unsafe { std::env::set_var("PROTOC", protoc) };
    }
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        // BTreeMap makes encoding deterministic, so a batch's content hash is stable.
        .btree_map(".")
        .file_descriptor_set_path(out.join("ppu_v1_descriptor.bin"))
        .compile_protos(PROTOS, &["."])?;
    for p in PROTOS {
        println!("cargo:rerun-if-changed={p}");
    }
    Ok(())
}
