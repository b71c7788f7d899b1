//! Furnace drivers.
