//! The component's own view of tokens, rows and configuration, independent of
//! the generated bindings so that the logic is testable natively.

use crate::error::{ErrorClass, RefreshError};
use secrecy::{SecretSlice, SecretString};

/// What a provider granted (WIT `token-set`).
#[derive(Debug, Clone)]
pub struct TokenSet {
    pub access_token: SecretString,
    pub refresh_token: Option<SecretString>,
    pub access_token_expires_at: Option<i64>,
    pub refresh_token_expires_at: Option<i64>,
    pub scopes: Vec<String>,
}

/// Refresh bookkeeping kept on each row (WIT `token-health`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Health {
    pub failed_attempts: u32,
    pub last_failure_at: Option<i64>,
    pub last_failure: Option<ErrorClass>,
    pub last_success_at: Option<i64>,
    pub refresh_started_at: Option<i64>,
    /// After a failure, no refresh is tried before this time (the
    /// provider's `Retry-After`, or a backoff that grows with the failures).
    pub retry_not_before: Option<i64>,
}

/// A decrypted token with its metadata (WIT `token-record`).
#[derive(Debug, Clone)]
pub struct TokenRecord {
    pub provider: String,
    pub user_id: String,
    pub tokens: TokenSet,
    pub obtained_at: i64,
    pub generation: u64,
    pub health: Health,
}

/// What a runtime gets on the hot path: the access token and nothing else
/// secret (WIT `access-grant`).
#[derive(Debug, Clone)]
pub struct AccessGrant {
    pub provider: String,
    pub user_id: String,
    pub access_token: SecretString,
    pub expires_at: Option<i64>,
    pub scopes: Vec<String>,
    /// When it was obtained: with `expires_at`, its lifetime.
    pub obtained_at: i64,
    pub generation: u64,
}

/// A row as read, with the shared clock's time from the same round trip
/// (WIT `row-read`).
#[derive(Debug, Clone)]
pub struct RowRead {
    pub row: Option<SealedRow>,
    pub now: i64,
}

/// Which sealed column (WIT `sealing.field`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    AccessToken,
    RefreshToken,
}

/// Both tokens of a row sealed by the host with one key (WIT `sealed-tokens`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedTokens {
    pub key_id: String,
    pub access_token: Vec<u8>,
    pub refresh_token: Option<Vec<u8>>,
}

/// A row as the host stores it: ciphertexts plus plain metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedRow {
    pub provider: String,
    pub user_id: String,
    pub key_id: String,
    pub access_token: Vec<u8>,
    pub refresh_token: Option<Vec<u8>>,
    pub access_token_expires_at: Option<i64>,
    pub refresh_token_expires_at: Option<i64>,
    pub scopes: Vec<String>,
    /// The scopes the token was authorised with: a refresh that returns
    /// fewer narrows the token, which is then never served as a success.
    pub baseline_scopes: Vec<String>,
    pub obtained_at: i64,
    pub generation: u64,
    pub health: Health,
}

/// Identifies a row; the cursor of paginated scans (WIT `row-key`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RowKey {
    pub provider: String,
    pub user_id: String,
}

impl SealedRow {
    /// Scopes of the baseline the stored token lacks.
    pub fn missing_scopes(&self) -> Vec<String> {
        self.baseline_scopes
            .iter()
            .filter(|s| !self.scopes.contains(s))
            .cloned()
            .collect()
    }

    /// This row's key.
    pub fn key(&self) -> RowKey {
        RowKey {
            provider: self.provider.clone(),
            user_id: self.user_id.clone(),
        }
    }
}

/// A stored token without secrets (WIT `token-summary`).
#[derive(Debug, Clone)]
pub struct TokenSummary {
    pub row: SealedRow,
    pub state: crate::validity::TokenState,
}

/// Per-provider settings the host supplies (WIT `provider-config`).
#[derive(Debug, Clone)]
pub struct ProviderConfig {
    pub name: String,
    pub refresh_threshold_seconds: u32,
    pub timeout_ms: u32,
    pub max_response_bytes: u32,
    /// The catalogue entry (or `custom`) this provider was resolved from.
    pub kind: String,
    /// The provider's own error codes, looked up before RFC 6749's.
    pub error_codes: Vec<(String, crate::error::ErrorClass)>,
    /// Access-token lifetime assumed when an answer omits `expires_in`.
    pub default_expires_in: Option<u32>,
    /// Lifetime assumed for a new refresh token that comes without one.
    pub default_refresh_token_expires_in: Option<u32>,
    /// Whether refreshes return a new refresh token and spend the old one:
    /// then a request whose fate is unknown (a timeout after it was sent, a
    /// 500) is never repeated, since the repeat could be a reuse.
    pub rotates_refresh_tokens: bool,
    /// Provider calls per refresh, counting the first; transient failures
    /// only are retried.
    pub max_attempts: u32,
    /// Time the retries of one refresh may take in all, in milliseconds;
    /// the host keeps it inside the lock wait so waiters outlast it.
    pub retry_budget_ms: u32,
    /// Whether a 4xx answer without an OAuth error is a definitive refusal
    /// (true) or an invalid answer (false).
    pub bare_4xx_is_refusal: bool,
    /// How long a rotating provider still accepts a spent refresh token:
    /// within it, a request of unknown fate may be repeated.
    pub reuse_leeway_seconds: u32,
    /// Renewed by a grant of the host's (client credentials, token
    /// exchange): no refresh token needed.
    pub host_grant: bool,
}

/// Why the host's token endpoint sent nothing or got no usable answer
/// (WIT `request-error`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestError {
    /// Refused by the host; nothing was sent.
    Denied(String),
    /// The host's configuration for the provider cannot make the request
    /// (a secret not set, a certificate not trusted): no token was sent.
    Misconfigured(String),
    /// Certainly never reached the provider: safe to repeat.
    NotSent(String),
    /// Sent, but no answer began: the provider may have acted.
    NoAnswer(String),
    /// The answer began but was cut off or too large: the provider acted.
    AnswerUnusable(String),
}

/// The class of a token request that failed, for the caller's error.
impl From<RequestError> for RefreshError {
    fn from(e: RequestError) -> Self {
        match e {
            RequestError::Denied(m) => RefreshError::EgressDenied(m),
            RequestError::Misconfigured(m) => RefreshError::Configuration(m),
            RequestError::NotSent(m) | RequestError::NoAnswer(m) => {
                RefreshError::ProviderUnavailable(m)
            }
            // The provider answered, so it has likely acted.
            RequestError::AnswerUnusable(m) => RefreshError::InvalidProviderResponse(m),
        }
    }
}

/// A token endpoint's raw answer.
#[derive(Debug)]
pub struct HttpAnswer {
    pub status: u16,
    pub content_type: Option<String>,
    /// The `Retry-After` header, in seconds, when the answer had one.
    pub retry_after: Option<u32>,
    /// May hold tokens: never logged or quoted.
    pub body: SecretSlice<u8>,
}

/// Storage failures as the host reports them (WIT `storage-error`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StorageError {
    LockTimeout,
    Unavailable(String),
    /// The host refused a call outside the export call's rows.
    Refused(String),
}

impl From<StorageError> for RefreshError {
    fn from(e: StorageError) -> Self {
        match e {
            StorageError::LockTimeout => Self::LockTimeout,
            StorageError::Unavailable(m) => Self::Storage(m),
            StorageError::Refused(m) => Self::Storage(format!("refused by the host: {m}")),
        }
    }
}

/// Why the host's sealing failed (WIT `sealing-error`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SealingError {
    UnknownKey(String),
    Undecryptable(String),
    Refused(String),
}

impl From<SealingError> for RefreshError {
    fn from(e: SealingError) -> Self {
        match e {
            SealingError::UnknownKey(m) | SealingError::Undecryptable(m) => Self::Decryption(m),
            SealingError::Refused(m) => Self::Storage(format!("refused by the host: {m}")),
        }
    }
}

/// One provider's token in a conversation's settings (WIT `provider-token`).
#[derive(Debug, Clone)]
pub struct ProviderToken {
    pub provider: String,
    pub access_token: SecretString,
    pub refresh_token: Option<SecretString>,
    pub expires_at: Option<i64>,
    pub refresh_token_expires_at: Option<i64>,
    pub obtained_at: Option<i64>,
    pub scopes: Vec<String>,
}

impl ProviderToken {
    /// The token as a runtime may hold it: the refresh token stays in the keeper.
    pub fn access_only(&self) -> Self {
        Self {
            refresh_token: None,
            refresh_token_expires_at: None,
            ..self.clone()
        }
    }
}

/// What is persisted for a conversation (WIT `conversation-entry`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConversationEntry {
    pub conversation_id: String,
    pub provider: String,
    pub user_id: String,
    pub scopes: Vec<String>,
    pub generation: u64,
    pub updated_at: i64,
}

/// A failure that names its provider (WIT `provider-failure`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderFailure {
    pub provider: String,
    pub error: RefreshError,
}
