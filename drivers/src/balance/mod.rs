//! Balances: the `weigh` capability, and the gravimetric check of dispensing stations (see
//! [`crate::dispenser`] for how the two compose).

pub mod sics;
