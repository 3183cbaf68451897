//! [`Keeper`]: the host API that the CLI, services and tests all use.

use crate::bindings::tokenkeep::oauth::types as wit;
use crate::config::Config;
use crate::conversation::{
    ConversationEntry, ConversationError, ConversationSettings, PartialRefresh,
};
use crate::error::Error;
use crate::keyring::Keyring;
use crate::runtime::{Clock, Runtime, SandboxLimits, Shared};
use crate::storage::{Store, StoreOptions};
use secrecy::{ExposeSecret, SecretString};
use std::sync::Arc;
use std::time::Duration;

pub use crate::bindings::tokenkeep::oauth::types::{
    ErrorClass, TokenHealth, TokenState, TokenSummary,
};

/// What a provider granted. Debug redacts the tokens.
#[derive(Debug, Clone)]
pub struct TokenSet {
    pub access_token: SecretString,
    pub refresh_token: Option<SecretString>,
    pub access_token_expires_at: Option<i64>,
    pub refresh_token_expires_at: Option<i64>,
    pub scopes: Vec<String>,
}

/// A stored token with its metadata. Debug redacts the tokens.
#[derive(Debug, Clone)]
pub struct TokenRecord {
    pub provider: String,
    pub user_id: String,
    pub tokens: TokenSet,
    pub obtained_at: i64,
    pub generation: u64,
    pub health: TokenHealth,
}

/// How to open a [`Keeper`].
#[derive(Clone)]
pub struct Options {
    /// `postgres://…` or `sqlite:path`.
    pub database_url: String,
    pub config: Config,
    pub keyring: Keyring,
    pub limits: SandboxLimits,
    /// Database connections per process.
    pub max_connections: u32,
    /// The component's wall clock (tests use a manual one).
    pub clock: Clock,
}

impl std::fmt::Debug for Options {
    // Not derived: the database URL may carry a password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let url = match url::Url::parse(&self.database_url) {
            Ok(mut u) if u.password().is_some() => {
                let _ = u.set_password(Some("REDACTED"));
                u.to_string()
            }
            Ok(u) => u.to_string(),
            Err(_) => "(unparsable)".into(),
        };
        f.debug_struct("Options")
            .field("database_url", &url)
            .field("config", &self.config)
            .field("keyring", &self.keyring)
            .field("limits", &self.limits)
            .field("max_connections", &self.max_connections)
            .finish_non_exhaustive()
    }
}

/// The outcome of a key rotation run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rotation {
    pub examined: u64,
    pub resealed: u64,
    /// Rows that did not decrypt and were left as they were.
    pub undecryptable: Vec<(String, String)>,
}

/// Which keys the stored rows are sealed with.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyStatus {
    pub active: String,
    /// Row counts per key id, including keys the keyring no longer holds.
    pub rows_per_key: std::collections::BTreeMap<String, u64>,
    /// Key ids rows use that the keyring does not hold: those rows cannot be read.
    pub missing_keys: Vec<String>,
}

/// The token keeper of one process: a sandboxed component over a database.
/// Cheap to share (`Arc`); every call runs in a fresh component instance.
pub struct Keeper {
    runtime: Runtime,
}

impl Keeper {
    /// Connects to the database, migrates it and compiles (or loads) the component.
    pub async fn open(options: Options) -> Result<Arc<Self>, Error> {
        Self::open_with_component(options, crate::runtime::COMPONENT).await
    }

    /// Like [`Keeper::open`], with another build of the component: a fork,
    /// or (in the sandbox tests) a hostile one. It must implement the
    /// `keeper-core` world; it gets the same sandbox and egress policy.
    pub async fn open_with_component(options: Options, wasm: &[u8]) -> Result<Arc<Self>, Error> {
        let store_options = StoreOptions {
            lock_wait: Duration::from_millis(u64::from(options.config.lock_wait_ms)),
            max_connections: options.max_connections,
        };
        let store = Store::open(&options.database_url, store_options).await?;
        let shared = Shared {
            store,
            config: Arc::new(options.config),
            keyring: options.keyring,
            clock: options.clock,
        };
        // Compiling (or loading the cached machine code) happens once per process.
        let runtime = Runtime::new(shared, options.limits, wasm)?;
        Ok(Arc::new(Self { runtime }))
    }

    /// The configuration this keeper runs with.
    pub fn config(&self) -> &Config {
        &self.runtime.shared().config
    }

    /// Seals and stores a provider's tokens for a user, replacing older ones.
    pub async fn store_tokens(
        &self,
        provider: &str,
        user_id: &str,
        tokens: &TokenSet,
    ) -> Result<TokenRecord, Error> {
        let tokens = tokens_to_wit(tokens);
        let r = self
            .runtime
            .call(async |k, s| {
                k.tokenkeep_oauth_token_store()
                    .call_store_tokens(s, provider, user_id, &tokens)
                    .await
            })
            .await?;
        r.map(record_from_wit)
            .map_err(|e| error_from_wit(e, provider, user_id))
    }

    /// Loads a user's tokens; with `for_update`, after any refresh in flight.
    pub async fn load_tokens(
        &self,
        provider: &str,
        user_id: &str,
        for_update: bool,
    ) -> Result<Option<TokenRecord>, Error> {
        let r = self
            .runtime
            .call(async |k, s| {
                k.tokenkeep_oauth_token_store()
                    .call_load_tokens(s, provider, user_id, for_update)
                    .await
            })
            .await?;
        r.map(|o| o.map(record_from_wit))
            .map_err(|e| error_from_wit(e, provider, user_id))
    }

    /// A record whose access token is valid beyond its refresh window,
    /// refreshed first if needed; one provider call however many runtimes ask.
    pub async fn ensure_fresh(&self, provider: &str, user_id: &str) -> Result<TokenRecord, Error> {
        let r = self
            .runtime
            .call(async |k, s| {
                k.tokenkeep_oauth_token_store()
                    .call_ensure_fresh(s, provider, user_id)
                    .await
            })
            .await?;
        r.map(record_from_wit)
            .map_err(|e| error_from_wit(e, provider, user_id))
    }

    /// Deletes a user's tokens; false when there were none.
    pub async fn delete_tokens(&self, provider: &str, user_id: &str) -> Result<bool, Error> {
        let r = self
            .runtime
            .call(async |k, s| {
                k.tokenkeep_oauth_token_store()
                    .call_delete_tokens(s, provider, user_id)
                    .await
            })
            .await?;
        r.map_err(|e| error_from_wit(e, provider, user_id))
    }

    /// Every stored token, without secrets.
    pub async fn list_tokens(&self) -> Result<Vec<TokenSummary>, Error> {
        let r = self
            .runtime
            .call(async |k, s| k.tokenkeep_oauth_token_store().call_list_tokens(s).await)
            .await?;
        r.map_err(|e| error_from_wit(e, "", ""))
    }

    /// Re-encrypts every row sealed with an older key to the active key, in
    /// batches of `batch` rows, each row in its own short transaction. Safe to
    /// interrupt and rerun; readers never wait.
    pub async fn rotate_keys(&self, batch: u32) -> Result<Rotation, Error> {
        let mut total = Rotation::default();
        let mut after = None;
        loop {
            let (r, next) = self.reseal_batch(after, batch).await?;
            total.examined += r.examined;
            total.resealed += r.resealed;
            total.undecryptable.extend(r.undecryptable);
            tracing::info!(
                examined = total.examined,
                resealed = total.resealed,
                "key rotation progress"
            );
            match next {
                Some(next) => after = Some(next),
                None => return Ok(total),
            }
        }
    }

    /// One batch of [`Keeper::rotate_keys`]: rows after `after`, at most `limit`.
    pub async fn reseal_batch(
        &self,
        after: Option<(String, String)>,
        limit: u32,
    ) -> Result<(Rotation, Option<(String, String)>), Error> {
        let cursor = after.map(|(provider, user_id)| wit::RowKey { provider, user_id });
        let r = self
            .runtime
            .call(async |k, s| {
                k.tokenkeep_oauth_token_store()
                    .call_reseal_batch(s, cursor.as_ref(), limit)
                    .await
            })
            .await?
            .map_err(|e| error_from_wit(e, "", ""))?;
        let rotation = Rotation {
            examined: u64::from(r.examined),
            resealed: u64::from(r.resealed),
            undecryptable: r
                .undecryptable
                .into_iter()
                .map(|k| (k.provider, k.user_id))
                .collect(),
        };
        Ok((rotation, r.next.map(|k| (k.provider, k.user_id))))
    }

    /// Row counts per key id.
    pub async fn key_status(&self) -> Result<KeyStatus, Error> {
        let keyring = &self.runtime.shared().keyring;
        let mut status = KeyStatus {
            active: keyring.active_id().to_string(),
            ..Default::default()
        };
        for s in self.list_tokens().await? {
            *status.rows_per_key.entry(s.key_id).or_default() += 1;
        }
        status.missing_keys = status
            .rows_per_key
            .keys()
            .filter(|id| keyring.key(id).is_none())
            .cloned()
            .collect();
        Ok(status)
    }

    /// The seed's `refresh_provider_tokens`: a refreshed copy of `settings`
    /// (which is only borrowed, so a runtime holding it keeps working),
    /// persisted for the conversation. One provider that cannot be refreshed
    /// fails the call with an error naming it.
    pub async fn refresh_provider_tokens(
        &self,
        settings: &ConversationSettings,
        conversation_id: &str,
        user_id: &str,
    ) -> Result<ConversationSettings, ConversationError> {
        let input = settings.to_wit();
        let r = self
            .runtime
            .call_scaled(input.provider_tokens.len(), async |k, s| {
                k.tokenkeep_oauth_conversations()
                    .call_refresh_provider_tokens(s, &input, conversation_id, user_id)
                    .await
            })
            .await
            .map_err(|error| ConversationError {
                provider: String::new(),
                error,
            })?;
        r.map(ConversationSettings::from_wit)
            .map_err(|f| failure_from_wit(f, user_id))
    }

    /// Like [`Keeper::refresh_provider_tokens`], but keeps going past failures
    /// and lists them, for callers that asked for partial results.
    pub async fn refresh_provider_tokens_partial(
        &self,
        settings: &ConversationSettings,
        conversation_id: &str,
        user_id: &str,
    ) -> Result<PartialRefresh, Error> {
        let input = settings.to_wit();
        let r = self
            .runtime
            .call_scaled(input.provider_tokens.len(), async |k, s| {
                k.tokenkeep_oauth_conversations()
                    .call_refresh_provider_tokens_partial(s, &input, conversation_id, user_id)
                    .await
            })
            .await?;
        Ok(PartialRefresh {
            settings: ConversationSettings::from_wit(r.settings),
            failures: r
                .failures
                .into_iter()
                .map(|f| failure_from_wit(f, user_id))
                .collect(),
        })
    }

    /// A conversation's persisted settings, refreshed first; `None` for a
    /// conversation never seen. For a runtime that resumes or replays it.
    pub async fn resume(
        &self,
        conversation_id: &str,
    ) -> Result<Option<ConversationSettings>, ConversationError> {
        let r = self
            .runtime
            // A conversation holds at most one token per configured provider.
            .call_scaled(self.config().providers.len(), async |k, s| {
                k.tokenkeep_oauth_conversations()
                    .call_resume(s, conversation_id)
                    .await
            })
            .await
            .map_err(|error| ConversationError {
                provider: String::new(),
                error,
            })?;
        r.map(|o| o.map(ConversationSettings::from_wit))
            .map_err(|f| failure_from_wit(f, ""))
    }

    /// What is persisted for a conversation, without secrets.
    pub async fn conversation_entries(
        &self,
        conversation_id: &str,
    ) -> Result<Vec<ConversationEntry>, Error> {
        self.runtime
            .call(async |k, s| {
                k.tokenkeep_oauth_conversations()
                    .call_entries(s, conversation_id)
                    .await
            })
            .await?
            .map_err(|e| error_from_wit(e, "", ""))
    }

    /// For a runtime's timer: refreshes every token of the named live
    /// conversations that is inside its refresh window, so none of them
    /// reaches a conversation stale. One result per conversation.
    pub async fn refresh_live_conversations(
        &self,
        conversation_ids: &[String],
    ) -> Vec<(String, Result<(), ConversationError>)> {
        let mut out = Vec::with_capacity(conversation_ids.len());
        for id in conversation_ids {
            let r = self.resume(id).await.map(|_| ());
            out.push((id.clone(), r));
        }
        out
    }

    /// The seed's `is_access_token_valid`, evaluated by the component.
    pub async fn is_access_token_valid(
        &self,
        record: &TokenRecord,
        clock_skew_seconds: u32,
    ) -> Result<bool, Error> {
        let record = record_to_wit(record);
        self.runtime
            .call(async |k, s| {
                k.tokenkeep_oauth_token_store()
                    .call_is_access_token_valid(s, &record, clock_skew_seconds)
                    .await
            })
            .await
    }

    /// The seed's `is_refresh_token_valid`, evaluated by the component.
    pub async fn is_refresh_token_valid(&self, record: &TokenRecord) -> Result<bool, Error> {
        let record = record_to_wit(record);
        self.runtime
            .call(async |k, s| {
                k.tokenkeep_oauth_token_store()
                    .call_is_refresh_token_valid(s, &record)
                    .await
            })
            .await
    }
}

fn tokens_to_wit(t: &TokenSet) -> wit::TokenSet {
    wit::TokenSet {
        access_token: t.access_token.expose_secret().to_string(),
        refresh_token: t
            .refresh_token
            .as_ref()
            .map(|r| r.expose_secret().to_string()),
        access_token_expires_at: t.access_token_expires_at,
        refresh_token_expires_at: t.refresh_token_expires_at,
        scopes: t.scopes.clone(),
    }
}

fn record_to_wit(r: &TokenRecord) -> wit::TokenRecord {
    wit::TokenRecord {
        provider: r.provider.clone(),
        user_id: r.user_id.clone(),
        tokens: tokens_to_wit(&r.tokens),
        obtained_at: r.obtained_at,
        generation: r.generation,
        health: r.health,
    }
}

fn record_from_wit(r: wit::TokenRecord) -> TokenRecord {
    TokenRecord {
        provider: r.provider,
        user_id: r.user_id,
        tokens: TokenSet {
            access_token: r.tokens.access_token.into(),
            refresh_token: r.tokens.refresh_token.map(SecretString::from),
            access_token_expires_at: r.tokens.access_token_expires_at,
            refresh_token_expires_at: r.tokens.refresh_token_expires_at,
            scopes: r.tokens.scopes,
        },
        obtained_at: r.obtained_at,
        generation: r.generation,
        health: r.health,
    }
}

fn failure_from_wit(f: wit::ProviderFailure, user_id: &str) -> ConversationError {
    let error = error_from_wit(f.error, &f.provider, user_id);
    ConversationError {
        provider: f.provider,
        error,
    }
}

fn error_from_wit(e: wit::RefreshError, provider: &str, user_id: &str) -> Error {
    use wit::RefreshError as R;
    match e {
        R::NotFound => Error::NotFound {
            provider: provider.into(),
            user_id: user_id.into(),
        },
        R::ReauthorizationRequired(m) => Error::ReauthorizationRequired(m),
        R::ProviderUnavailable(m) => Error::ProviderUnavailable(m),
        // The egress policy refused the request: the configuration (or the
        // component) is wrong, not the provider's view of the client.
        R::ProviderRejectedClient(m) if m.starts_with("egress denied") => Error::Config(m),
        R::ProviderRejectedClient(m) => Error::ProviderRejectedClient(m),
        R::ScopeMismatch(m) => Error::ScopeMismatch(m),
        R::LockTimeout => Error::LockTimeout,
        R::Storage(m) => Error::Storage(m),
        R::Decryption(m) => Error::Decryption(m),
        R::InvalidProviderResponse(m) => Error::InvalidProviderResponse(m),
        R::UnknownProvider(m) => Error::UnknownProvider(m),
        R::InvalidInput(m) => Error::InvalidInput(m),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_redacts_tokens() {
        let record = TokenRecord {
            provider: "github".into(),
            user_id: "alice".into(),
            tokens: TokenSet {
                access_token: "gho_SECRETACCESS".to_string().into(),
                refresh_token: Some("ghr_SECRETREFRESH".to_string().into()),
                access_token_expires_at: Some(1),
                refresh_token_expires_at: None,
                scopes: vec!["repo".into()],
            },
            obtained_at: 0,
            generation: 1,
            health: TokenHealth {
                failed_attempts: 0,
                last_failure_at: None,
                last_failure: None,
                last_success_at: None,
                refresh_started_at: None,
            },
        };
        let debug = format!("{record:?} {:?}", record.tokens);
        assert!(!debug.contains("SECRET"), "{debug}");
        assert!(debug.contains("REDACTED"), "{debug}");
    }
}
