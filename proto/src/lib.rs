//! The ppu.v1 gRPC API — the contract between the lab daemon and its clients.
//!
//! The `.proto` sources under `proto/ppu/v1/` are the documentation of record; this crate only
//! compiles them. Breaking changes go into a new package (`ppu.v2`), never into `ppu.v1`.

/// Generated messages, clients and servers of package `ppu.v1`.
pub mod v1 {
    #![allow(clippy::all, clippy::pedantic, missing_docs)]
    tonic::include_proto!("ppu.v1");

    /// Encoded `FileDescriptorSet` of ppu.v1, for gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("ppu_v1_descriptor");
}
