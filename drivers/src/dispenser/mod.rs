//! Dispensers: syringe pumps that deliver named reagents, gravimetrically checked where a
//! balance serves their station.
//!
//! # How pumps and balances compose
//!
//! A *station* is a vessel position served by one or more pumps and, optionally, one balance.
//!
//! - Each pump is its own [`Device`](crate::Device) with the `dispense` capability and exactly
//!   one reagent (one syringe). Its [`check`](crate::Device::check) accepts only dispense and
//!   refill steps for that reagent, so the scheduler's rule "the first device with the capability
//!   whose check accepts the step" routes every reagent to its pump without a routing table, and
//!   a reagent no pump holds is refused at submission.
//! - The balance is a separate device ([`SicsBalance`](crate::balance::sics::SicsBalance), the
//!   `weigh` capability), so a recipe can also weigh on its own. The pumps of its station hold an
//!   `Arc` of the same driver object and take its station lock for tare → dispense → weigh, so a
//!   weighing always covers exactly one pump's delivery.
//! - A pump tracks its syringe's fill (a ledger of what `DIS` reported) and hands it to the
//!   daemon through [`Device::saved_state`](crate::Device::saved_state) after every step, so the
//!   fill survives restarts; a dispense that would run the syringe dry fails before anything
//!   moves, and a refill step withdraws from the reservoir.

pub mod ne1000;
