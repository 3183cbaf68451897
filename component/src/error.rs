//! The failure taxonomy: one variant per thing a caller can act on differently.

use thiserror::Error;

/// Why a token could not be had. Mirrors the WIT `refresh-error` variant.
///
/// Messages are for operators: they name providers, users and error codes,
/// never a token or a raw provider body.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RefreshError {
    #[error("no token stored")]
    NotFound,
    #[error("re-authorisation required: {0}")]
    ReauthorizationRequired(String),
    #[error("provider unavailable: {0}")]
    ProviderUnavailable(String),
    #[error("provider rejected the client: {0}")]
    ProviderRejectedClient(String),
    #[error("scope mismatch: provider dropped {}", .0.join(" "))]
    ScopeMismatch(Vec<String>),
    #[error("lock timeout: another runtime is refreshing this token")]
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
}

/// The class of an error, recorded on the row (WIT `error-class`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    NotFound,
    ReauthorizationRequired,
    ProviderUnavailable,
    ProviderRejectedClient,
    ScopeMismatch,
    LockTimeout,
    Storage,
    Decryption,
    InvalidProviderResponse,
    UnknownProvider,
    InvalidInput,
}

impl RefreshError {
    /// The class of this error.
    pub fn class(&self) -> ErrorClass {
        match self {
            Self::NotFound => ErrorClass::NotFound,
            Self::ReauthorizationRequired(_) => ErrorClass::ReauthorizationRequired,
            Self::ProviderUnavailable(_) => ErrorClass::ProviderUnavailable,
            Self::ProviderRejectedClient(_) => ErrorClass::ProviderRejectedClient,
            Self::ScopeMismatch(_) => ErrorClass::ScopeMismatch,
            Self::LockTimeout => ErrorClass::LockTimeout,
            Self::Storage(_) => ErrorClass::Storage,
            Self::Decryption(_) => ErrorClass::Decryption,
            Self::InvalidProviderResponse(_) => ErrorClass::InvalidProviderResponse,
            Self::UnknownProvider(_) => ErrorClass::UnknownProvider,
            Self::InvalidInput(_) => ErrorClass::InvalidInput,
        }
    }

    /// Transient failures say nothing about the token: it is kept as it is and
    /// a still-valid access token may still be served.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Self::ProviderUnavailable(_) | Self::LockTimeout | Self::Storage(_)
        )
    }
}
