//! tokenkeep's guest adapter: the WIT imports become a
//! [`tokenkeep_core::refresh::Host`], the exports call the
//! [`tokenkeep_core::refresh::Keeper`]. Bindings and conversions only; the
//! logic lives in `tokenkeep-core`. Natively this crate is empty.

#![cfg(target_arch = "wasm32")]

use secrecy::{ExposeSecret, SecretString};
use tokenkeep_core::error::{ErrorClass, RefreshError};
use tokenkeep_core::model::{
    self, Field, HttpAnswer, ProviderConfig, RequestError, RowKey, RowRead, SealedRow,
    SealedTokens, SealingError, StorageError,
};
use tokenkeep_core::refresh::{Host, Keeper};
use tokenkeep_core::validity::TokenState;

wit_bindgen::generate!({
    world: "keeper-core",
    path: "../wit",
    // The WASI interfaces of the world are the wasip2 crate's, which the
    // standard library's runtime shares.
    with: {
        "wasi:random/random@0.2.12": wasip2::random::random,
        "wasi:clocks/monotonic-clock@0.2.12": wasip2::clocks::monotonic_clock,
        "wasi:io/poll@0.2.12": wasip2::io::poll,
        "wasi:io/error@0.2.12": wasip2::io::error,
        "wasi:io/streams@0.2.12": wasip2::io::streams,
        "wasi:cli/environment@0.2.12": wasip2::cli::environment,
        "wasi:cli/exit@0.2.12": wasip2::cli::exit,
        "wasi:cli/stdin@0.2.12": wasip2::cli::stdin,
        "wasi:cli/stdout@0.2.12": wasip2::cli::stdout,
        "wasi:cli/stderr@0.2.12": wasip2::cli::stderr,
        "wasi:cli/terminal-input@0.2.12": wasip2::cli::terminal_input,
        "wasi:cli/terminal-output@0.2.12": wasip2::cli::terminal_output,
        "wasi:cli/terminal-stdin@0.2.12": wasip2::cli::terminal_stdin,
        "wasi:cli/terminal-stdout@0.2.12": wasip2::cli::terminal_stdout,
        "wasi:cli/terminal-stderr@0.2.12": wasip2::cli::terminal_stderr,
    },
});

use exports::tokenkeep::oauth::conversations::Guest as Conversations;
use exports::tokenkeep::oauth::token_store::Guest;
use tokenkeep::oauth::{clock, providers, sealing, storage, token_endpoint, types as wit};

struct Component;
export!(Component);

/// The imports, as the logic sees them.
struct Imports;

struct Txn(storage::Transaction);

impl tokenkeep_core::refresh::Transaction for Txn {
    fn load_for_update(&self, provider: &str, user_id: &str) -> Result<RowRead, StorageError> {
        self.0
            .load_for_update(provider, user_id)
            .map(read_from_wit)
            .map_err(storage_error)
    }
    fn try_load_for_update(
        &self,
        provider: &str,
        user_id: &str,
    ) -> Result<Option<RowRead>, StorageError> {
        self.0
            .try_load_for_update(provider, user_id)
            .map(|read| read.map(read_from_wit))
            .map_err(storage_error)
    }
    fn compare_and_set(
        &self,
        row: &SealedRow,
        expected_generation: u64,
    ) -> Result<bool, StorageError> {
        self.0
            .compare_and_set(&row_to_wit(row), expected_generation)
            .map_err(storage_error)
    }
    fn commit(self) -> Result<(), StorageError> {
        self.0.commit().map_err(storage_error)
    }
}

impl Host for Imports {
    type Txn = Txn;

    fn now(&self) -> i64 {
        clock::now()
    }

    fn random_u64(&self) -> u64 {
        wasip2::random::random::get_random_u64()
    }

    fn provider(&self, name: &str) -> Option<ProviderConfig> {
        providers::lookup(name).map(|c| ProviderConfig {
            name: c.name,
            refresh_threshold_seconds: c.refresh_threshold_seconds,
            timeout_ms: c.timeout_ms,
            max_response_bytes: c.max_response_bytes,
            kind: c.kind,
            error_codes: c
                .error_codes
                .into_iter()
                .map(|(code, class)| (code, class_from_wit(class)))
                .collect(),
            default_expires_in: c.default_expires_in,
            default_refresh_token_expires_in: c.default_refresh_token_expires_in,
            rotates_refresh_tokens: c.rotates_refresh_tokens,
            max_attempts: c.max_attempts,
            retry_budget_ms: c.retry_budget_ms,
            bare_4xx_is_refusal: c.bare_4xx_is_refusal,
            reuse_leeway_seconds: c.reuse_leeway_seconds,
            host_grant: c.host_grant,
        })
    }

    fn seal(
        &self,
        provider: &str,
        user_id: &str,
        tokens: &model::TokenSet,
    ) -> Result<SealedTokens, SealingError> {
        sealing::seal_tokens(
            provider,
            user_id,
            tokens.access_token.expose_secret(),
            tokens.refresh_token.as_ref().map(|t| t.expose_secret()),
        )
        .map(|s| SealedTokens {
            key_id: s.key_id,
            access_token: s.access_token,
            refresh_token: s.refresh_token,
        })
        .map_err(sealing_error)
    }

    fn open(
        &self,
        provider: &str,
        user_id: &str,
        field: Field,
        key_id: &str,
        sealed: &[u8],
    ) -> Result<SecretString, SealingError> {
        let field = match field {
            Field::AccessToken => sealing::Field::AccessToken,
            Field::RefreshToken => sealing::Field::RefreshToken,
        };
        sealing::open(provider, user_id, field, key_id, sealed)
            .map(SecretString::from)
            .map_err(sealing_error)
    }

    fn monotonic_ms(&self) -> u64 {
        wasip2::clocks::monotonic_clock::now() / 1_000_000
    }

    fn sleep_ms(&self, ms: u64) {
        wasip2::clocks::monotonic_clock::subscribe_duration(ms.saturating_mul(1_000_000)).block();
    }

    fn read(&self, provider: &str, user_id: &str) -> Result<RowRead, StorageError> {
        storage::read(provider, user_id)
            .map(read_from_wit)
            .map_err(storage_error)
    }

    fn list(&self, after: Option<&RowKey>, limit: u32) -> Result<Vec<SealedRow>, StorageError> {
        Ok(storage::list_rows(after.map(key_to_wit).as_ref(), limit)
            .map_err(storage_error)?
            .into_iter()
            .map(row_from_wit)
            .collect())
    }

    fn upsert(&self, row: &SealedRow) -> Result<u64, StorageError> {
        storage::upsert(&row_to_wit(row)).map_err(storage_error)
    }

    fn insert(&self, row: &SealedRow) -> Result<bool, StorageError> {
        storage::insert(&row_to_wit(row)).map_err(storage_error)
    }

    fn delete(&self, provider: &str, user_id: &str) -> Result<bool, StorageError> {
        storage::delete(provider, user_id).map_err(storage_error)
    }

    fn conversation_entries(
        &self,
        conversation_id: &str,
    ) -> Result<Vec<model::ConversationEntry>, StorageError> {
        Ok(storage::conversation_entries(conversation_id)
            .map_err(storage_error)?
            .into_iter()
            .map(entry_from_wit)
            .collect())
    }

    fn put_conversation_entry(&self, entry: &model::ConversationEntry) -> Result<(), StorageError> {
        storage::put_conversation_entry(&entry_to_wit(entry)).map_err(storage_error)
    }

    fn begin(&self) -> Result<Txn, StorageError> {
        storage::begin().map(Txn).map_err(storage_error)
    }

    fn request_refresh(&self, locked: &Txn) -> Result<HttpAnswer, RequestError> {
        use token_endpoint::RequestError as E;
        token_endpoint::request_refresh(&locked.0)
            .map(|a| HttpAnswer {
                status: a.status,
                content_type: a.content_type,
                retry_after: a.retry_after,
                body: a.body.into(),
            })
            .map_err(|e| match e {
                E::Denied(m) => RequestError::Denied(m),
                E::Misconfigured(m) => RequestError::Misconfigured(m),
                E::NotSent(m) => RequestError::NotSent(m),
                E::NoAnswer(m) => RequestError::NoAnswer(m),
                E::AnswerUnusable(m) => RequestError::AnswerUnusable(m),
            })
    }
}

impl Guest for Component {
    fn store_tokens(
        provider: String,
        user_id: String,
        tokens: wit::TokenSet,
    ) -> Result<wit::TokenRecord, wit::RefreshError> {
        keeper()
            .store_tokens(&provider, &user_id, tokens_from_wit(tokens))
            .map(record_to_wit)
            .map_err(error_to_wit)
    }

    fn load_tokens(
        provider: String,
        user_id: String,
        for_update: bool,
    ) -> Result<Option<wit::TokenRecord>, wit::RefreshError> {
        keeper()
            .load_tokens(&provider, &user_id, for_update)
            .map(|r| r.map(record_to_wit))
            .map_err(error_to_wit)
    }

    fn is_access_token_valid(record: wit::TokenRecord, clock_skew_seconds: u32) -> bool {
        tokenkeep_core::validity::is_access_token_valid(
            record.tokens.access_token_expires_at,
            Imports.now(),
            clock_skew_seconds,
        )
    }

    fn is_refresh_token_valid(record: wit::TokenRecord) -> bool {
        tokenkeep_core::validity::is_refresh_token_valid(
            record.tokens.refresh_token.is_some(),
            record.tokens.refresh_token_expires_at,
            Imports.now(),
        )
    }

    fn classify(record: wit::TokenRecord, refresh_threshold_seconds: u32) -> wit::TokenState {
        state_to_wit(keeper().token_state(&record_from_wit(record), refresh_threshold_seconds))
    }

    fn ensure_fresh(
        provider: String,
        user_id: String,
    ) -> Result<wit::AccessGrant, wit::RefreshError> {
        Self::ensure_fresh_for(provider, user_id, 0)
    }

    fn ensure_fresh_for(
        provider: String,
        user_id: String,
        min_remaining_seconds: u32,
    ) -> Result<wit::AccessGrant, wit::RefreshError> {
        keeper()
            .ensure_fresh_for(&provider, &user_id, min_remaining_seconds)
            .map(|g| wit::AccessGrant {
                provider: g.provider,
                user_id: g.user_id,
                access_token: g.access_token.expose_secret().to_string(),
                expires_at: g.expires_at,
                scopes: g.scopes,
                obtained_at: g.obtained_at,
                generation: g.generation,
            })
            .map_err(error_to_wit)
    }

    fn delete_tokens(provider: String, user_id: String) -> Result<bool, wit::RefreshError> {
        keeper()
            .delete_tokens(&provider, &user_id)
            .map_err(error_to_wit)
    }

    fn list_tokens(
        after: Option<wit::RowKey>,
        limit: u32,
    ) -> Result<Vec<wit::TokenSummary>, wit::RefreshError> {
        let after = after.map(|k| RowKey {
            provider: k.provider,
            user_id: k.user_id,
        });
        let list = keeper()
            .list_tokens(after.as_ref(), limit)
            .map_err(error_to_wit)?;
        Ok(list
            .into_iter()
            .map(|s| wit::TokenSummary {
                has_refresh_token: s.row.refresh_token.is_some(),
                provider: s.row.provider,
                user_id: s.row.user_id,
                access_token_expires_at: s.row.access_token_expires_at,
                refresh_token_expires_at: s.row.refresh_token_expires_at,
                scopes: s.row.scopes,
                baseline_scopes: s.row.baseline_scopes,
                obtained_at: s.row.obtained_at,
                generation: s.row.generation,
                key_id: s.row.key_id,
                state: state_to_wit(s.state),
                health: health_to_wit(&s.row.health),
            })
            .collect())
    }
}

impl Conversations for Component {
    fn refresh_provider_tokens(
        settings: wit::ConversationSettings,
        conversation_id: String,
        user_id: String,
    ) -> Result<wit::ConversationSettings, wit::ProviderFailure> {
        let tokens: Vec<_> = settings
            .provider_tokens
            .into_iter()
            .map(provider_token_from_wit)
            .collect();
        let (out, _) = keeper()
            .refresh_provider_tokens(&tokens, &conversation_id, &user_id, false)
            .map_err(failure_to_wit)?;
        Ok(settings_to_wit(out))
    }

    fn refresh_provider_tokens_partial(
        settings: wit::ConversationSettings,
        conversation_id: String,
        user_id: String,
    ) -> wit::PartialRefresh {
        let tokens: Vec<_> = settings
            .provider_tokens
            .into_iter()
            .map(provider_token_from_wit)
            .collect();
        match keeper().refresh_provider_tokens(&tokens, &conversation_id, &user_id, true) {
            Ok((out, failures)) => wit::PartialRefresh {
                settings: settings_to_wit(out),
                failures: failures.into_iter().map(failure_to_wit).collect(),
            },
            // Failures of the whole call (bad ids, storage): every token kept.
            Err(failure) => wit::PartialRefresh {
                settings: settings_to_wit(
                    tokens
                        .iter()
                        .map(model::ProviderToken::access_only)
                        .collect(),
                ),
                failures: vec![failure_to_wit(failure)],
            },
        }
    }

    fn resume(
        conversation_id: String,
    ) -> Result<Option<wit::ConversationSettings>, wit::ProviderFailure> {
        keeper()
            .resume(&conversation_id)
            .map(|o| o.map(settings_to_wit))
            .map_err(failure_to_wit)
    }

    fn entries(conversation_id: String) -> Result<Vec<wit::ConversationEntry>, wit::RefreshError> {
        keeper()
            .conversation_entries(&conversation_id)
            .map(|v| v.iter().map(entry_to_wit).collect())
            .map_err(error_to_wit)
    }
}

fn provider_token_from_wit(t: wit::ProviderToken) -> model::ProviderToken {
    model::ProviderToken {
        provider: t.provider,
        access_token: t.access_token.into(),
        refresh_token: t.refresh_token.map(SecretString::from),
        expires_at: t.expires_at,
        refresh_token_expires_at: t.refresh_token_expires_at,
        obtained_at: t.obtained_at,
        scopes: t.scopes,
    }
}

fn settings_to_wit(tokens: Vec<model::ProviderToken>) -> wit::ConversationSettings {
    wit::ConversationSettings {
        provider_tokens: tokens
            .into_iter()
            .map(|t| wit::ProviderToken {
                provider: t.provider,
                access_token: t.access_token.expose_secret().to_string(),
                refresh_token: t.refresh_token.map(|r| r.expose_secret().to_string()),
                expires_at: t.expires_at,
                refresh_token_expires_at: t.refresh_token_expires_at,
                obtained_at: t.obtained_at,
                scopes: t.scopes,
            })
            .collect(),
    }
}

fn failure_to_wit(f: model::ProviderFailure) -> wit::ProviderFailure {
    wit::ProviderFailure {
        provider: f.provider,
        error: error_to_wit(f.error),
    }
}

fn entry_from_wit(e: wit::ConversationEntry) -> model::ConversationEntry {
    model::ConversationEntry {
        conversation_id: e.conversation_id,
        provider: e.provider,
        user_id: e.user_id,
        scopes: e.scopes,
        generation: e.generation,
        updated_at: e.updated_at,
    }
}

fn entry_to_wit(e: &model::ConversationEntry) -> wit::ConversationEntry {
    wit::ConversationEntry {
        conversation_id: e.conversation_id.clone(),
        provider: e.provider.clone(),
        user_id: e.user_id.clone(),
        scopes: e.scopes.clone(),
        generation: e.generation,
        updated_at: e.updated_at,
    }
}

fn key_to_wit(k: &RowKey) -> wit::RowKey {
    wit::RowKey {
        provider: k.provider.clone(),
        user_id: k.user_id.clone(),
    }
}

fn keeper() -> Keeper<Imports> {
    Keeper::new(Imports)
}

fn storage_error(e: storage::StorageError) -> StorageError {
    match e {
        storage::StorageError::LockTimeout => StorageError::LockTimeout,
        storage::StorageError::Unavailable(m) => StorageError::Unavailable(m),
        storage::StorageError::Refused(m) => StorageError::Refused(m),
    }
}

fn sealing_error(e: sealing::SealingError) -> SealingError {
    match e {
        sealing::SealingError::UnknownKey(m) => SealingError::UnknownKey(m),
        sealing::SealingError::Undecryptable(m) => SealingError::Undecryptable(m),
        sealing::SealingError::Refused(m) => SealingError::Refused(m),
    }
}

fn read_from_wit(r: storage::RowRead) -> RowRead {
    RowRead {
        row: r.row.map(row_from_wit),
        now: r.now,
    }
}

fn row_from_wit(r: storage::SealedRow) -> SealedRow {
    SealedRow {
        provider: r.provider,
        user_id: r.user_id,
        key_id: r.key_id,
        access_token: r.access_token,
        refresh_token: r.refresh_token,
        access_token_expires_at: r.access_token_expires_at,
        refresh_token_expires_at: r.refresh_token_expires_at,
        scopes: r.scopes,
        baseline_scopes: r.baseline_scopes,
        obtained_at: r.obtained_at,
        generation: r.generation,
        health: health_from_wit(r.health),
    }
}

fn row_to_wit(r: &SealedRow) -> storage::SealedRow {
    storage::SealedRow {
        provider: r.provider.clone(),
        user_id: r.user_id.clone(),
        key_id: r.key_id.clone(),
        access_token: r.access_token.clone(),
        refresh_token: r.refresh_token.clone(),
        access_token_expires_at: r.access_token_expires_at,
        refresh_token_expires_at: r.refresh_token_expires_at,
        scopes: r.scopes.clone(),
        baseline_scopes: r.baseline_scopes.clone(),
        obtained_at: r.obtained_at,
        generation: r.generation,
        health: health_to_wit(&r.health),
    }
}

fn health_from_wit(h: wit::TokenHealth) -> model::Health {
    model::Health {
        failed_attempts: h.failed_attempts,
        last_failure_at: h.last_failure_at,
        last_failure: h.last_failure.map(class_from_wit),
        last_success_at: h.last_success_at,
        refresh_started_at: h.refresh_started_at,
        retry_not_before: h.retry_not_before,
    }
}

fn health_to_wit(h: &model::Health) -> wit::TokenHealth {
    wit::TokenHealth {
        failed_attempts: h.failed_attempts,
        last_failure_at: h.last_failure_at,
        last_failure: h.last_failure.map(class_to_wit),
        last_success_at: h.last_success_at,
        refresh_started_at: h.refresh_started_at,
        retry_not_before: h.retry_not_before,
    }
}

fn tokens_from_wit(t: wit::TokenSet) -> model::TokenSet {
    model::TokenSet {
        access_token: t.access_token.into(),
        refresh_token: t.refresh_token.map(SecretString::from),
        access_token_expires_at: t.access_token_expires_at,
        refresh_token_expires_at: t.refresh_token_expires_at,
        scopes: t.scopes,
    }
}

fn record_from_wit(r: wit::TokenRecord) -> model::TokenRecord {
    model::TokenRecord {
        provider: r.provider,
        user_id: r.user_id,
        tokens: tokens_from_wit(r.tokens),
        obtained_at: r.obtained_at,
        generation: r.generation,
        health: health_from_wit(r.health),
    }
}

fn record_to_wit(r: model::TokenRecord) -> wit::TokenRecord {
    wit::TokenRecord {
        provider: r.provider,
        user_id: r.user_id,
        tokens: wit::TokenSet {
            access_token: r.tokens.access_token.expose_secret().to_string(),
            refresh_token: r
                .tokens
                .refresh_token
                .map(|t| t.expose_secret().to_string()),
            access_token_expires_at: r.tokens.access_token_expires_at,
            refresh_token_expires_at: r.tokens.refresh_token_expires_at,
            scopes: r.tokens.scopes,
        },
        obtained_at: r.obtained_at,
        generation: r.generation,
        health: health_to_wit(&r.health),
    }
}

fn state_to_wit(s: TokenState) -> wit::TokenState {
    match s {
        TokenState::Fresh => wit::TokenState::Fresh,
        TokenState::RefreshDue => wit::TokenState::RefreshDue,
        TokenState::RefreshTokenExpiring => wit::TokenState::RefreshTokenExpiring,
        TokenState::ReauthorizationRequired => wit::TokenState::ReauthorizationRequired,
        TokenState::ScopeNarrowed => wit::TokenState::ScopeNarrowed,
    }
}

fn class_to_wit(c: ErrorClass) -> wit::ErrorClass {
    use wit::ErrorClass as W;
    match c {
        ErrorClass::NotFound => W::NotFound,
        ErrorClass::ReauthorizationRequired => W::ReauthorizationRequired,
        ErrorClass::ProviderUnavailable => W::ProviderUnavailable,
        ErrorClass::ProviderRejectedClient => W::ProviderRejectedClient,
        ErrorClass::ScopeMismatch => W::ScopeMismatch,
        ErrorClass::LockTimeout => W::LockTimeout,
        ErrorClass::Storage => W::Storage,
        ErrorClass::Decryption => W::Decryption,
        ErrorClass::InvalidProviderResponse => W::InvalidProviderResponse,
        ErrorClass::UnknownProvider => W::UnknownProvider,
        ErrorClass::InvalidInput => W::InvalidInput,
        ErrorClass::EgressDenied => W::EgressDenied,
        ErrorClass::Configuration => W::Configuration,
    }
}

/// The WIT enum lists the classes in `ErrorClass::ALL` order.
fn class_from_wit(c: wit::ErrorClass) -> ErrorClass {
    ErrorClass::ALL[c as usize]
}

fn error_to_wit(e: RefreshError) -> wit::RefreshError {
    match e {
        RefreshError::NotFound => wit::RefreshError::NotFound,
        RefreshError::ReauthorizationRequired(m) => wit::RefreshError::ReauthorizationRequired(m),
        RefreshError::ProviderUnavailable(m) => wit::RefreshError::ProviderUnavailable(m),
        RefreshError::ProviderRejectedClient(m) => wit::RefreshError::ProviderRejectedClient(m),
        RefreshError::ScopeMismatch(m) => wit::RefreshError::ScopeMismatch(m),
        RefreshError::LockTimeout => wit::RefreshError::LockTimeout,
        RefreshError::Storage(m) => wit::RefreshError::Storage(m),
        RefreshError::Decryption(m) => wit::RefreshError::Decryption(m),
        RefreshError::InvalidProviderResponse(m) => wit::RefreshError::InvalidProviderResponse(m),
        RefreshError::UnknownProvider(m) => wit::RefreshError::UnknownProvider(m),
        RefreshError::InvalidInput(m) => wit::RefreshError::InvalidInput(m),
        RefreshError::EgressDenied(m) => wit::RefreshError::EgressDenied(m),
        RefreshError::Configuration(m) => wit::RefreshError::Configuration(m),
    }
}
