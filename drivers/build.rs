//! Compiles every device family's schema (`src/**/*.proto`, one per family, beside its
//! driver) into Rust types and one file descriptor set. A new family's `.proto` is picked up
//! here without an edit: the folder is the registration.

use std::path::{Path, PathBuf};

fn protos(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            protos(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "proto") {
            out.push(path);
        }
    }
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("PROTOC").is_none() {
        let protoc = protoc_bin_vendored::protoc_bin_path()?;
        // SAFETY: build scripts are single-threaded; nothing else reads the environment yet.
        unsafe { std::env::set_var("PROTOC", protoc) };
    }
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let mut files = Vec::new();
    protos(Path::new("src"), &mut files)?;
    files.sort();
    let mut config = tonic_prost_build::Config::new();
    // `prost::Name`, so a driver packs and unpacks its messages as `google.protobuf.Any`.
    config.enable_type_names();
    tonic_prost_build::configure()
        .build_client(false)
        .build_server(false)
        .file_descriptor_set_path(out.join("ppu_families.bin"))
        .compile_with_config(
            config,
            &files,
            &[PathBuf::from("src"), PathBuf::from("../proto")],
        )?;
    println!("cargo:rerun-if-changed=src");
    println!("cargo:rerun-if-changed=../proto/ppu/schema");
    Ok(())
}
