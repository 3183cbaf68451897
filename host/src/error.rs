//! The host's typed errors: the component's `refresh-error` classes plus the
//! failures only a host can have (configuration, the sandbox itself).

use thiserror::Error;

/// Everything a [`crate::Keeper`] call can fail with.
///
/// No variant ever carries a token, a client secret, a key or a raw provider
/// body; messages are safe to log.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Error {
    #[error("no token stored for {provider}/{user_id}")]
    NotFound { provider: String, user_id: String },
    #[error("re-authorisation required: {0}")]
    ReauthorizationRequired(String),
    #[error("provider unavailable: {0}")]
    ProviderUnavailable(String),
    #[error("provider rejected the client: {0}")]
    ProviderRejectedClient(String),
    #[error("scope mismatch: provider dropped {}", .0.join(" "))]
    ScopeMismatch(Vec<String>),
    #[error("lock timeout: another runtime held the token's lock longer than the lock wait")]
    LockTimeout,
    #[error("storage: {0}")]
    Storage(String),
    #[error("decryption failed: {0}")]
    Decryption(String),
    #[error("invalid provider response: {0}")]
    InvalidProviderResponse(String),
    #[error("unknown provider: {0}")]
    UnknownProvider(String),
    #[error("invalid input: {0}")]
    InvalidInput(String),
    #[error("configuration: {0}")]
    Config(String),
    /// The component trapped, ran out of memory or time, or could not be
    /// instantiated. The host stays up; the call failed.
    #[error("sandbox: {0}")]
    Sandbox(String),
}

impl Error {
    /// The process exit code the CLI uses for this class (documented in the README).
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::NotFound { .. } => 3,
            Error::ReauthorizationRequired(_) => 4,
            Error::ProviderUnavailable(_) => 5,
            Error::ProviderRejectedClient(_) => 6,
            Error::ScopeMismatch(_) => 7,
            Error::LockTimeout => 8,
            Error::Storage(_) => 9,
            Error::Decryption(_) => 10,
            Error::InvalidProviderResponse(_) => 11,
            Error::UnknownProvider(_) => 12,
            Error::InvalidInput(_) => 13,
            Error::Config(_) => 14,
            Error::Sandbox(_) => 15,
        }
    }

    /// A short stable name of the class, for scripts and logs.
    pub fn class(&self) -> &'static str {
        match self {
            Error::NotFound { .. } => "not-found",
            Error::ReauthorizationRequired(_) => "reauthorization-required",
            Error::ProviderUnavailable(_) => "provider-unavailable",
            Error::ProviderRejectedClient(_) => "provider-rejected-client",
            Error::ScopeMismatch(_) => "scope-mismatch",
            Error::LockTimeout => "lock-timeout",
            Error::Storage(_) => "storage",
            Error::Decryption(_) => "decryption",
            Error::InvalidProviderResponse(_) => "invalid-provider-response",
            Error::UnknownProvider(_) => "unknown-provider",
            Error::InvalidInput(_) => "invalid-input",
            Error::Config(_) => "configuration",
            Error::Sandbox(_) => "sandbox",
        }
    }
}

impl From<crate::storage::StorageError> for Error {
    fn from(e: crate::storage::StorageError) -> Self {
        match e {
            crate::storage::StorageError::LockTimeout => Error::LockTimeout,
            crate::storage::StorageError::Unavailable(m) => Error::Storage(m),
        }
    }
}

/// The contract's class for one of the component crate's classes (the
/// catalogue's provider-specific error codes are handed over as WIT).
pub(crate) fn class_to_wit(
    class: tokenkeep_component::error::ErrorClass,
) -> crate::bindings::tokenkeep::oauth::types::ErrorClass {
    use crate::bindings::tokenkeep::oauth::types::ErrorClass as W;
    use tokenkeep_component::error::ErrorClass as C;
    match class {
        C::NotFound => W::NotFound,
        C::ReauthorizationRequired => W::ReauthorizationRequired,
        C::ProviderUnavailable => W::ProviderUnavailable,
        C::ProviderRejectedClient => W::ProviderRejectedClient,
        C::ScopeMismatch => W::ScopeMismatch,
        C::LockTimeout => W::LockTimeout,
        C::Storage => W::Storage,
        C::Decryption => W::Decryption,
        C::InvalidProviderResponse => W::InvalidProviderResponse,
        C::UnknownProvider => W::UnknownProvider,
        C::InvalidInput => W::InvalidInput,
    }
}
