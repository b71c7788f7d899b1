//! Compiles our SiLA framework proto (`proto/sila2/org/silastandard/SiLAFramework.proto`) into
//! prost types and a file descriptor set: the descriptor set seeds every feature's pool (each
//! feature's file imports the framework file).
//!
//! A `PROTOC` already set in the environment wins; otherwise the vendored protoc is used.

use std::path::PathBuf;

const FRAMEWORK: &str = "sila2/org/silastandard/SiLAFramework.proto";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("PROTOC").is_none() {
        let protoc = protoc_bin_vendored::protoc_bin_path()?;
        // SAFETY: build scripts are single-threaded; nothing else reads the environment yet.
        unsafe { std::env::set_var("PROTOC", protoc) };
    }
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .build_client(false)
        .build_server(false)
        .file_descriptor_set_path(out.join("sila_framework.bin"))
        .compile_protos(&[format!("proto/{FRAMEWORK}")], &["proto".to_owned()])?;
    println!("cargo:rerun-if-changed=proto/{FRAMEWORK}");
    // A made-up family for the family tests (descriptor set only; no Rust is generated for use).
    let test_out = out.join("test");
    std::fs::create_dir_all(&test_out)?;
    tonic_prost_build::configure()
        .build_client(false)
        .build_server(false)
        .out_dir(&test_out)
        .file_descriptor_set_path(out.join("probe_test.bin"))
        .compile_protos(&["tests/data/probe.proto"], &["../proto", "tests/data"])?;
    println!("cargo:rerun-if-changed=tests/data/probe.proto");
    Ok(())
}
