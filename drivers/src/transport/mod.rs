//! Device transports.
