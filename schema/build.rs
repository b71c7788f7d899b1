//! Compiles the family schema options (`proto/ppu/schema/v1/options.proto`) into Rust types and
//! a file descriptor set, which seeds every schema pool.

use std::path::PathBuf;

const OPTIONS: &str = "ppu/schema/v1/options.proto";

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
        .file_descriptor_set_path(out.join("ppu_schema_v1.bin"))
        .compile_protos(&[format!("../proto/{OPTIONS}")], &["../proto".to_owned()])?;
    println!("cargo:rerun-if-changed=../proto/{OPTIONS}");
    // A made-up family for the rendering tests (its generated Rust is not used).
    let test_out = out.join("test");
    std::fs::create_dir_all(&test_out)?;
    tonic_prost_build::configure()
        .build_client(false)
        .build_server(false)
        .out_dir(&test_out)
        .file_descriptor_set_path(out.join("display_test.bin"))
        .compile_protos(&["tests/display.proto"], &["../proto", "tests"])?;
    println!("cargo:rerun-if-changed=tests/display.proto");
    Ok(())
}
