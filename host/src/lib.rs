//! tokenkeep's wasmtime host: it loads the sandboxed token-keeping component
//! and supplies its storage (Postgres or SQLite), keys, provider
//! configuration and a policed outbound HTTP client.
//!
//! [`Keeper`] is the API; the `tokenkeep` binary is a thin CLI over it.

pub mod bindings;
pub mod cli;
pub mod config;
pub mod conversation;
pub mod demo;
pub mod devprovider;
pub mod egress;
pub mod error;
pub mod keeper;
pub mod keyring;
mod runtime;
pub mod storage;

pub use config::Config;
pub use conversation::{ConversationError, ConversationSettings, PartialRefresh, ProviderToken};
pub use error::Error;
pub use keeper::{
    Keeper, KeyStatus, Options, Rotation, TokenRecord, TokenSet, TokenState, TokenSummary,
};
pub use keyring::Keyring;
pub use runtime::{COMPONENT, Clock, SandboxLimits};
