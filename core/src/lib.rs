//! tokenkeep's logic as plain Rust: validity checks, the single-flight
//! refresh state machine, the provider protocol and catalogue.
//!
//! No wasm here: the guest adapter (`tokenkeep-component`) turns the WIT
//! imports into a [`refresh::Host`] and its exports into calls on
//! [`refresh::Keeper`]; native tests drive the same code through a fake host.

pub mod catalogue;
pub mod conversation;
pub mod error;
#[cfg(all(feature = "sealing", not(target_arch = "wasm32")))]
pub mod fuzzing;
pub mod model;
pub mod provider;
pub mod refresh;
#[cfg(feature = "sealing")]
pub mod seal;
pub mod validity;
