//! The host's typed errors: the component's `refresh-error` classes plus the
//! failures only a host can have (configuration, the sandbox itself).

use thiserror::Error;
use tokenkeep_core::error::{ErrorClass, RefreshError};

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
    /// The host refused a token request: nothing was sent.
    #[error("egress denied: {0}")]
    EgressDenied(String),
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
            Error::EgressDenied(_) => 16,
        }
    }

    /// A short stable name of the class, for scripts and logs: the WIT
    /// `error-class` name, or a host-only class.
    pub fn class(&self) -> &'static str {
        match self {
            Error::Sandbox(_) => "sandbox",
            other => other.refresh_class().map_or("sandbox", ErrorClass::name),
        }
    }

    /// The contract's class, for the errors the component can report.
    pub fn refresh_class(&self) -> Option<ErrorClass> {
        Some(match self {
            Error::NotFound { .. } => ErrorClass::NotFound,
            Error::ReauthorizationRequired(_) => ErrorClass::ReauthorizationRequired,
            Error::ProviderUnavailable(_) => ErrorClass::ProviderUnavailable,
            Error::ProviderRejectedClient(_) => ErrorClass::ProviderRejectedClient,
            Error::ScopeMismatch(_) => ErrorClass::ScopeMismatch,
            Error::LockTimeout => ErrorClass::LockTimeout,
            Error::Storage(_) => ErrorClass::Storage,
            Error::Decryption(_) => ErrorClass::Decryption,
            Error::InvalidProviderResponse(_) => ErrorClass::InvalidProviderResponse,
            Error::UnknownProvider(_) => ErrorClass::UnknownProvider,
            Error::InvalidInput(_) => ErrorClass::InvalidInput,
            Error::EgressDenied(_) => ErrorClass::EgressDenied,
            Error::Config(_) => ErrorClass::Configuration,
            Error::Sandbox(_) => return None,
        })
    }

    /// The host's error for one the component reported about a row.
    pub fn from_refresh(e: RefreshError, provider: &str, user_id: &str) -> Self {
        match e {
            RefreshError::NotFound => Error::NotFound {
                provider: provider.into(),
                user_id: user_id.into(),
            },
            RefreshError::ReauthorizationRequired(m) => Error::ReauthorizationRequired(m),
            RefreshError::ProviderUnavailable(m) => Error::ProviderUnavailable(m),
            RefreshError::ProviderRejectedClient(m) => Error::ProviderRejectedClient(m),
            RefreshError::ScopeMismatch(m) => Error::ScopeMismatch(m),
            RefreshError::LockTimeout => Error::LockTimeout,
            RefreshError::Storage(m) => Error::Storage(m),
            RefreshError::Decryption(m) => Error::Decryption(m),
            RefreshError::InvalidProviderResponse(m) => Error::InvalidProviderResponse(m),
            RefreshError::UnknownProvider(m) => Error::UnknownProvider(m),
            RefreshError::InvalidInput(m) => Error::InvalidInput(m),
            RefreshError::EgressDenied(m) => Error::EgressDenied(m),
            RefreshError::Configuration(m) => Error::Config(m),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_contract_class_keeps_its_name_and_exit_code_through_the_host() {
        let mut codes = std::collections::BTreeSet::new();
        for class in ErrorClass::ALL {
            let e = Error::from_refresh(RefreshError::of_class(class, "m".into()), "p", "u");
            assert_eq!(e.refresh_class(), Some(class));
            assert_eq!(e.class(), class.name());
            assert!(codes.insert(e.exit_code()), "one exit code per class");
        }
        assert!(codes.insert(Error::Sandbox("m".into()).exit_code()));
    }
}
