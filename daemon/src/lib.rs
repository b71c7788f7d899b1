//! ppu-daemon owns the lab side of the loop: the durable store and event log, the queue and
//! scheduler, submission-time safety checks, the device registry and the gRPC server. The
//! `ppud` binary wires them together; `ppuctl` is the command-line client.

pub mod allocator;
pub mod app;
pub mod auth;
pub mod board;
pub mod command;
pub mod config;
#[cfg(feature = "dev-lab")]
pub mod dev;
pub mod devices;
pub mod error;
pub mod events;
pub mod fleet;
pub mod ids;
pub mod journal;
pub mod lifecycle;
pub mod limits;
pub mod metrics;
pub mod process;
pub mod queue;
pub mod recovery;
pub mod results;
pub mod safety;
pub mod scheduler;
pub mod schema;
pub mod security;
pub mod server;
pub mod sila;
pub mod state;
pub mod store;
pub mod systemd;
pub mod tls;
