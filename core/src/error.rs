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
    #[error("egress denied: {0}")]
    EgressDenied(String),
    #[error("configuration: {0}")]
    Configuration(String),
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
    EgressDenied,
    Configuration,
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
            Self::EgressDenied(_) => ErrorClass::EgressDenied,
            Self::Configuration(_) => ErrorClass::Configuration,
        }
    }

    /// An error of `class` with `message` (classes without a message ignore it).
    pub fn of_class(class: ErrorClass, message: String) -> Self {
        match class {
            ErrorClass::NotFound => Self::NotFound,
            ErrorClass::ReauthorizationRequired => Self::ReauthorizationRequired(message),
            ErrorClass::ProviderUnavailable => Self::ProviderUnavailable(message),
            ErrorClass::ProviderRejectedClient => Self::ProviderRejectedClient(message),
            ErrorClass::ScopeMismatch => Self::ScopeMismatch(Vec::new()),
            ErrorClass::LockTimeout => Self::LockTimeout,
            ErrorClass::Storage => Self::Storage(message),
            ErrorClass::Decryption => Self::Decryption(message),
            ErrorClass::InvalidProviderResponse => Self::InvalidProviderResponse(message),
            ErrorClass::UnknownProvider => Self::UnknownProvider(message),
            ErrorClass::InvalidInput => Self::InvalidInput(message),
            ErrorClass::EgressDenied => Self::EgressDenied(message),
            ErrorClass::Configuration => Self::Configuration(message),
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

impl ErrorClass {
    /// Every class, in the order of the WIT `error-class` enum.
    pub const ALL: [ErrorClass; 13] = [
        ErrorClass::NotFound,
        ErrorClass::ReauthorizationRequired,
        ErrorClass::ProviderUnavailable,
        ErrorClass::ProviderRejectedClient,
        ErrorClass::ScopeMismatch,
        ErrorClass::LockTimeout,
        ErrorClass::Storage,
        ErrorClass::Decryption,
        ErrorClass::InvalidProviderResponse,
        ErrorClass::UnknownProvider,
        ErrorClass::InvalidInput,
        ErrorClass::EgressDenied,
        ErrorClass::Configuration,
    ];

    /// The stable name: the WIT case, stored on rows, printed for scripts.
    pub fn name(self) -> &'static str {
        match self {
            ErrorClass::NotFound => "not-found",
            ErrorClass::ReauthorizationRequired => "reauthorization-required",
            ErrorClass::ProviderUnavailable => "provider-unavailable",
            ErrorClass::ProviderRejectedClient => "provider-rejected-client",
            ErrorClass::ScopeMismatch => "scope-mismatch",
            ErrorClass::LockTimeout => "lock-timeout",
            ErrorClass::Storage => "storage",
            ErrorClass::Decryption => "decryption",
            ErrorClass::InvalidProviderResponse => "invalid-provider-response",
            ErrorClass::UnknownProvider => "unknown-provider",
            ErrorClass::InvalidInput => "invalid-input",
            ErrorClass::EgressDenied => "egress-denied",
            ErrorClass::Configuration => "configuration",
        }
    }

    /// The class of a stable name; none for a name no class has.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.name() == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_class_round_trips_through_its_name_and_an_error() {
        for class in ErrorClass::ALL {
            assert_eq!(ErrorClass::from_name(class.name()), Some(class));
            assert_eq!(RefreshError::of_class(class, "m".into()).class(), class);
        }
        assert_eq!(ErrorClass::from_name("no-such-class"), None);
    }
}
