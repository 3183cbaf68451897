//! `tokenkeep serve`: the token keeper as an HTTP service on a Unix socket
//! or a loopback port, for runtimes that do not embed wasmtime (Python,
//! Node, shells in sandboxes). Each caller presents a named API key, which
//! may be limited to providers and user ids; every token decision is the
//! [`tokenkeep_host::Keeper`]'s.

pub mod api;
pub mod api_error;
pub mod api_keys;
pub mod server;
pub mod settings;
pub mod webhooks;

pub use api_error::ApiError;
pub use api_keys::{ApiKey, ApiKeys};
pub use server::Server;
pub use settings::{Listen, ServeSettings};
