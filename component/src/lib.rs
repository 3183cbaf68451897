//! tokenkeep's guest: validity checks, the single-flight refresh flow, the
//! provider protocol and the sealing of tokens, compiled to a WASI component.
//!
//! Everything but [`bindings`] is plain Rust that `cargo test` runs natively;
//! [`bindings`] adapts the WIT imports and exports to it.

pub mod catalogue;
pub mod conversation;
pub mod error;
#[cfg(not(target_arch = "wasm32"))]
pub mod fuzzing;
pub mod model;
pub mod provider;
pub mod refresh;
pub mod seal;
pub mod validity;

#[cfg(target_arch = "wasm32")]
mod bindings;
#[cfg(target_arch = "wasm32")]
mod http;
