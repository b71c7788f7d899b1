//! Furnace drivers.

pub mod eurotherm;
