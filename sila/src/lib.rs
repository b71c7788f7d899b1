//! SiLA 2 for ppu, independent of the daemon and of any driver.
//!
//! Owns what both directions share: ppud serving its device families as SiLA 2 features
//! ("out"), and the `sila2` driver family driving a third-party SiLA 2 server ("in").
//!
//! - [`fdl`]: the Feature Definition model, written to and read from FDL XML.
//! - [`descriptor`]: the standard's Part B mapping of a feature to its gRPC service and
//!   messages, as protobuf descriptors built at run time (features are generated, so there is
//!   no `.proto` to compile).
//! - [`framework`]: the SiLA framework messages (`sila2.org.silastandard`): the basic types,
//!   command execution, ExecutionInfo and errors.
//! - [`error`]: SiLA errors as they cross the wire (a `SiLAError` in the details of an
//!   `ABORTED` status).
//! - [`value`]: SiLA values as plain data, to and from the dynamic messages, checked against
//!   a data type's constraints.
//! - [`family`]: the feature generated from a device family's schema (`ppu.schema.v1`).

pub mod descriptor;
pub mod error;
pub mod family;
pub mod fdl;
pub mod framework;
pub mod value;
