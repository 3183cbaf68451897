//! tokenkeep's wasmtime host, as a library: it loads the sandboxed
//! token-keeping component and supplies its imports (storage over Postgres or
//! SQLite, sealing with keys the component never sees, the database's clock,
//! provider configuration, and the one request it may make: a refresh).
//!
//! [`Keeper`] is the API the CLI, services and tests use. A runtime that
//! already embeds wasmtime can link the imports into its own `Linker` with
//! [`linker::add_to_linker`] instead.

pub mod audit;
pub mod bindings;
pub mod client_assertion;
pub mod clock;
pub mod config;
pub mod conversation;
mod convert;
pub mod discovery;
pub mod dpop;
pub mod error;
pub mod events;
pub mod grant_cache;
pub mod grants;
pub mod keeper;
pub mod keyring;
pub mod linker;
pub mod loopback;
pub mod metrics;
pub mod outbound;
pub mod provider_connections;
pub mod refresher;
pub mod sandbox;
mod sealing;
pub mod storage;
pub mod token_endpoint;
pub mod token_response;

pub use clock::Clock;
pub use config::Config;
pub use conversation::{ConversationError, ConversationSettings, PartialRefresh, ProviderToken};
pub use error::Error;
pub use keeper::{
    AccessGrant, ConversationEntry, Health, Keeper, KeyStatus, Options, Rotation, RowKey,
    TokenRecord, TokenSet, TokenState, TokenSummary,
};
pub use keyring::Keyring;
pub use sandbox::{COMPONENT, SandboxLimits};
