//! The token store's operations and the double-checked, row-locked refresh.
//!
//! Written against [`Host`], the imports as plain Rust, so the same code runs
//! in the component and in native tests (see `tests` below: a fake host).

use crate::error::{ErrorClass, RefreshError};
use crate::model::{
    AccessGrant, Field, Health, HttpAnswer, ProviderConfig, RequestError, RowKey, RowRead,
    SealedRow, SealedTokens, SealingError, StorageError, TokenRecord, TokenSet, TokenSummary,
};
use crate::provider::{TokenResponse, judge_answer, may_repeat, salvage_refresh_token};
use crate::validity::{self, Timing};
use secrecy::{ExposeSecret, SecretString};

/// Longest provider name accepted: names are configuration keys.
pub const MAX_PROVIDER_LEN: usize = 64;
/// Longest user id accepted, in bytes.
pub const MAX_USER_ID_LEN: usize = 1024;
/// Longest token accepted, in bytes (JWT access tokens can be a few KiB).
pub const MAX_TOKEN_LEN: usize = 16 * 1024;
/// Most rows one `list-tokens` call returns: a page's sealed rows and
/// summaries stay far below the component's memory and fuel.
pub const MAX_LIST_PAGE: u32 = 1000;

/// Everything the logic needs from its host: the WIT imports as plain Rust.
pub trait Host {
    type Txn: Transaction;
    /// Seconds since the epoch on the shared clock (WIT `clock.now`).
    fn now(&self) -> i64;
    /// A random number from the host's cryptographic generator (jitter).
    fn random_u64(&self) -> u64;
    fn provider(&self, name: &str) -> Option<ProviderConfig>;
    /// Seals a row's tokens with the active key (WIT `sealing.seal-tokens`).
    fn seal(
        &self,
        provider: &str,
        user_id: &str,
        tokens: &TokenSet,
    ) -> Result<SealedTokens, SealingError>;
    /// Opens one sealed field (WIT `sealing.open`).
    fn open(
        &self,
        provider: &str,
        user_id: &str,
        field: Field,
        key_id: &str,
        sealed: &[u8],
    ) -> Result<SecretString, SealingError>;
    fn read(&self, provider: &str, user_id: &str) -> Result<RowRead, StorageError>;
    /// Up to `limit` rows after `after`, ordered by provider then user.
    fn list(&self, after: Option<&RowKey>, limit: u32) -> Result<Vec<SealedRow>, StorageError>;
    fn upsert(&self, row: &SealedRow) -> Result<u64, StorageError>;
    /// Inserts a row only if none exists; false when one does.
    fn insert(&self, row: &SealedRow) -> Result<bool, StorageError>;
    fn delete(&self, provider: &str, user_id: &str) -> Result<bool, StorageError>;
    fn begin(&self) -> Result<Self::Txn, StorageError>;
    fn conversation_entries(
        &self,
        conversation_id: &str,
    ) -> Result<Vec<crate::model::ConversationEntry>, StorageError>;
    fn put_conversation_entry(
        &self,
        entry: &crate::model::ConversationEntry,
    ) -> Result<(), StorageError>;
    /// Sends the refresh of the row `locked` holds (WIT `token-endpoint`);
    /// the host records the refresh start first.
    fn request_refresh(&self, locked: &Self::Txn) -> Result<HttpAnswer, RequestError>;
    /// Milliseconds on a monotonic clock, for retry budgets.
    fn monotonic_ms(&self) -> u64;
    /// Blocks for a backoff between attempts.
    fn sleep_ms(&self, ms: u64);
}

/// A storage transaction (WIT `storage.transaction`); dropping it rolls back.
pub trait Transaction {
    fn load_for_update(&self, provider: &str, user_id: &str) -> Result<RowRead, StorageError>;
    /// Like `load_for_update`, without waiting: none when another
    /// transaction holds the lock.
    fn try_load_for_update(
        &self,
        provider: &str,
        user_id: &str,
    ) -> Result<Option<RowRead>, StorageError>;
    fn compare_and_set(
        &self,
        row: &SealedRow,
        expected_generation: u64,
    ) -> Result<bool, StorageError>;
    fn commit(self) -> Result<(), StorageError>;
}

/// The token store over a host.
pub struct Keeper<H> {
    host: H,
}

impl<H: Host> Keeper<H> {
    pub fn new(host: H) -> Self {
        Self { host }
    }

    /// Seals and upserts a provider's tokens (WIT `store-tokens`).
    pub fn store_tokens(
        &self,
        provider: &str,
        user_id: &str,
        tokens: TokenSet,
    ) -> Result<TokenRecord, RefreshError> {
        self.config(provider)?;
        check_user_id(user_id)?;
        check_tokens(&tokens)?;
        let now = self.host.now();
        let mut row = self.seal_row(provider, user_id, &tokens, now)?;
        row.health.last_success_at = Some(now);
        row.generation = self.host.upsert(&row)?;
        Ok(TokenRecord {
            provider: provider.into(),
            user_id: user_id.into(),
            tokens,
            obtained_at: now,
            generation: row.generation,
            health: row.health,
        })
    }

    /// Stores tokens only if none are stored for this provider and user:
    /// false when a row exists (it may hold a newer, rotated chain).
    pub fn seed_tokens(
        &self,
        provider: &str,
        user_id: &str,
        tokens: &TokenSet,
        obtained_at: i64,
    ) -> Result<bool, RefreshError> {
        self.config(provider)?;
        check_user_id(user_id)?;
        check_tokens(tokens)?;
        let now = self.host.now();
        let mut row = self.seal_row(provider, user_id, tokens, obtained_at.min(now))?;
        row.generation = 1;
        row.health.last_success_at = Some(now);
        Ok(self.host.insert(&row)?)
    }

    /// Loads and decrypts a user's tokens (WIT `load-tokens`).
    pub fn load_tokens(
        &self,
        provider: &str,
        user_id: &str,
        for_update: bool,
    ) -> Result<Option<TokenRecord>, RefreshError> {
        check_provider_name(provider)?;
        check_user_id(user_id)?;
        let read = if for_update {
            let txn = self.host.begin()?;
            let read = txn.load_for_update(provider, user_id)?;
            txn.commit()?;
            read
        } else {
            self.host.read(provider, user_id)?
        };
        read.row.map(|r| self.open_row(&r)).transpose()
    }

    /// The hot path (WIT `ensure-fresh`): an access token valid beyond its
    /// refresh window, refreshed under the row lock when needed. Opens only
    /// the access token unless it refreshes.
    pub fn ensure_fresh(&self, provider: &str, user_id: &str) -> Result<AccessGrant, RefreshError> {
        self.ensure_fresh_for(provider, user_id, 0)
    }

    /// WIT `ensure-fresh-for`: like [`Keeper::ensure_fresh`], and valid for
    /// at least `min_remaining` seconds more, refreshed first when it is
    /// not. A token that is served despite a failed refresh must meet the
    /// minimum too.
    pub fn ensure_fresh_for(
        &self,
        provider: &str,
        user_id: &str,
        min_remaining: u32,
    ) -> Result<AccessGrant, RefreshError> {
        let (grant, missing) = self.fresh(provider, user_id, min_remaining)?;
        if !missing.is_empty() {
            return Err(RefreshError::ScopeMismatch(missing));
        }
        Ok(grant)
    }

    /// [`Keeper::ensure_fresh`]'s work: the grant, and the scopes of the
    /// user's authorisation it lacks (a narrowed token), for the caller to
    /// judge against what it needs (all of them, or a conversation's own).
    pub(crate) fn fresh(
        &self,
        provider: &str,
        user_id: &str,
        min_remaining: u32,
    ) -> Result<Fresh, RefreshError> {
        let config = self.config(provider)?;
        check_user_id(user_id)?;
        let want = Want {
            threshold: config.refresh_threshold_seconds,
            min_remaining,
        };

        // 1. One unlocked read, which also tells the shared clock's time.
        let RowRead { row, now } = self.host.read(provider, user_id)?;
        let row = row.ok_or(RefreshError::NotFound)?;
        want.attainable(&row, now)?;
        if !want.due(&row, now) {
            return self.grant(&row);
        }
        // A refusal stands until a new authorisation: no lock needed to say
        // so. A host grant needs no user: it is tried again after a backoff
        // (its subject token may be new, its client fixed).
        if row.health.last_failure == Some(ErrorClass::ReauthorizationRequired)
            && !config.host_grant
        {
            return self.still_valid_or(
                &row,
                now,
                want,
                recorded_failure(ErrorClass::ReauthorizationRequired),
            );
        }
        // After a failure the provider is left alone until the row says so
        // (its Retry-After, or a backoff): no stampede when it comes back.
        if let Some(backing_off) = backing_off(&row, now) {
            return self.still_valid_or(&row, now, want, backing_off);
        }
        let seen = row.health.clone();

        // 2. Lock the row and look again: another runtime may have refreshed it
        //    while we waited for the lock. A caller holding a token that is
        //    still valid does not wait: if another runtime holds the lock,
        //    that runtime is refreshing, and the token we read is good.
        let seen_generation = row.generation;
        let txn = self.host.begin()?;
        let RowRead { row, now } = if want.still_valid(&row, now) {
            match txn.try_load_for_update(provider, user_id)? {
                Some(read) => read,
                None => {
                    drop(txn);
                    return self.grant(&row);
                }
            }
        } else {
            txn.load_for_update(provider, user_id)?
        };
        let row = row.ok_or(RefreshError::NotFound)?;
        // Not due, or refreshed by another runtime while we waited and not
        // expired: that refresh is ours too (a short-lived token may be due
        // again already; refreshing it once per waiter would be a stampede).
        let refreshed_meanwhile = row.generation != seen_generation
            && row.health.last_failure.is_none()
            && validity::is_access_token_valid(
                row.access_token_expires_at,
                now,
                want.min_remaining,
            );
        if !want.due(&row, now) || refreshed_meanwhile {
            txn.commit()?;
            return self.grant(&row);
        }
        // Whatever stands in the way of a refresh, a token still valid beyond
        // the skew is served ([`Keeper::still_valid_or`]): the failure is on
        // the row for operators, and the caller gets an explicit error only
        // once the token is no good.
        if let Some(backing_off) = backing_off(&row, now) {
            txn.commit()?;
            return self.still_valid_or(&row, now, want, backing_off);
        }
        // Single flight for failures too: a definitive refusal stands until a
        // new authorisation is stored, and a failure another runtime recorded
        // while we waited for the lock is its answer for us as well.
        if let Some(class) = row.health.last_failure {
            let definitive = class == ErrorClass::ReauthorizationRequired && !config.host_grant;
            let while_we_waited = row.health.failed_attempts != seen.failed_attempts
                || row.health.last_failure_at != seen.last_failure_at;
            if definitive || while_we_waited {
                txn.commit()?;
                return self.still_valid_or(&row, now, want, recorded_failure(class));
            }
        }
        let current = self.open_row(&row)?;
        if current.tokens.refresh_token.is_none() && !config.host_grant {
            // Nothing to spend: say so, and record nothing (no provider said it).
            txn.commit()?;
            return self.still_valid_or(
                &row,
                now,
                want,
                RefreshError::ReauthorizationRequired(
                    "no refresh token is stored; store a new authorisation".into(),
                ),
            );
        }
        // A refresh from this generation started and neither committed nor
        // recorded a failure: its runtime died mid-flight.
        let interrupted = row.health.refresh_started_at.filter(|started| {
            row.health
                .last_failure_at
                .is_none_or(|failed| failed < *started)
        });

        // 3. Refresh, or say why not.
        match self.refresh_locked(&config, &current, &txn) {
            Ok((tokens, sent_at)) => {
                let now = self.host.now();
                // Obtained when the successful request was sent: its
                // lifetime counts from there, and so does the refresh window.
                let mut next = self.seal_row(provider, user_id, &tokens, sent_at)?;
                next.generation = row.generation + 1;
                // Scopes the provider silently dropped, against what the
                // user authorised. The new tokens are kept all the same: a
                // rotating provider has already spent the old refresh token,
                // so dropping the answer would kill the chain. The row keeps
                // its baseline, so the narrowed token is served to no one.
                next.baseline_scopes = row.baseline_scopes.clone();
                let missing = next.missing_scopes();
                next.health = Health {
                    last_success_at: Some(now),
                    ..Default::default()
                };
                if !missing.is_empty() {
                    next.health.failed_attempts = 1;
                    next.health.last_failure_at = Some(now);
                    next.health.last_failure = Some(ErrorClass::ScopeMismatch);
                }
                if !txn.compare_and_set(&next, row.generation)? {
                    return Err(RefreshError::Storage("row changed while locked".into()));
                }
                txn.commit()?;
                // Saved all the same: the next caller with this minimum is
                // refused without a refresh.
                if let Some(at) = tokens.access_token_expires_at
                    && want.min_remaining > 0
                {
                    want.lives_long_enough(sent_at, at)?;
                }
                let grant = AccessGrant {
                    provider: provider.into(),
                    user_id: user_id.into(),
                    access_token: tokens.access_token,
                    expires_at: tokens.access_token_expires_at,
                    scopes: tokens.scopes,
                    obtained_at: sent_at,
                    generation: next.generation,
                };
                Ok((grant, missing))
            }
            Err(Failed {
                error: err,
                salvaged,
                retry_after,
                ..
            }) => {
                let now = self.host.now();
                // Nothing reached the provider, for reasons of this host's
                // own (its configuration, its refusal): nothing to record on
                // the row that every runtime shares.
                if salvaged.is_none()
                    && matches!(
                        err,
                        RefreshError::Configuration(_) | RefreshError::EgressDenied(_)
                    )
                {
                    drop(txn);
                    return self.still_valid_or(&row, now, want, err);
                }
                let err = match (err, interrupted) {
                    (RefreshError::ReauthorizationRequired(m), Some(at))
                        if m.starts_with("provider answered") =>
                    {
                        RefreshError::ReauthorizationRequired(format!(
                            "{m} after an interrupted refresh (started at {at}, never saved): \
                             the provider most likely rotated the refresh token and the answer was lost"
                        ))
                    }
                    (err, _) => err,
                };
                let mut failed = row.clone();
                if let Some(refresh_token) = salvaged {
                    // The answer was unusable but carried a rotated refresh
                    // token: the old one is spent, so keep the new one and
                    // let the next refresh use it.
                    let kept = TokenSet {
                        refresh_token: Some(refresh_token),
                        refresh_token_expires_at: config
                            .default_refresh_token_expires_in
                            .map(|s| now + i64::from(s)),
                        ..current.tokens.clone()
                    };
                    failed = self.seal_row(provider, user_id, &kept, row.obtained_at)?;
                    failed.generation = row.generation + 1;
                    failed.baseline_scopes = row.baseline_scopes.clone();
                    failed.health = row.health.clone();
                }
                failed.health.refresh_started_at = None;
                failed.health.failed_attempts = failed.health.failed_attempts.saturating_add(1);
                failed.health.last_failure_at = Some(now);
                failed.health.last_failure = Some(err.class());
                // A refusal stands on its own; anything else waits out the
                // provider's Retry-After or a backoff before the next try.
                failed.health.retry_not_before = (config.host_grant
                    || !matches!(err, RefreshError::ReauthorizationRequired(_)))
                .then(|| now + backoff_seconds(failed.health.failed_attempts, retry_after));
                // Bookkeeping only (unless a rotated token was salvaged): the
                // tokens and the generation stay as they were.
                let salvaging = failed.generation != row.generation;
                if txn.compare_and_set(&failed, row.generation)? {
                    txn.commit()?;
                } else {
                    // Released before any re-read below.
                    drop(txn);
                    if salvaging {
                        return Err(RefreshError::Storage(
                            "the row changed while locked: a rotated refresh token from an \
                             unusable answer could not be saved"
                                .into(),
                        ));
                    }
                }
                if matches!(err, RefreshError::ReauthorizationRequired(_)) {
                    // Race or revocation? If someone wrote a newer token while
                    // we spent ours (a writer outside our lock, a new
                    // authorisation), the rejection was a race: use theirs.
                    // Best effort: if the re-read fails, the refusal still stands.
                    if let Ok(Some(newer)) =
                        self.newer_fresh_row(provider, user_id, row.generation, want)
                    {
                        return Ok(newer);
                    }
                }
                // Retries take time: judge the old token at the end of them.
                // Refreshed early and refused or unanswered: the token we
                // have is still valid, so it is not stale. Serve it; the row
                // records the failure.
                self.still_valid_or(&row, now, want, err)
            }
        }
    }

    /// After a definitive rejection: the row as it stands once every writer
    /// queued on its lock is done, if it holds a newer, fresh token.
    fn newer_fresh_row(
        &self,
        provider: &str,
        user_id: &str,
        spent_generation: u64,
        want: Want,
    ) -> Result<Option<Fresh>, RefreshError> {
        let txn = self.host.begin()?;
        let RowRead { row, now } = txn.load_for_update(provider, user_id)?;
        txn.commit()?;
        match row {
            Some(row) if row.generation != spent_generation && !want.due(&row, now) => {
                self.grant(&row).map(Some)
            }
            _ => Ok(None),
        }
    }

    /// Spends the refresh token through the host's token endpoint; the
    /// caller holds the row lock. Returns the tokens and when the request
    /// that got them was sent. Transient failures are retried within the
    /// provider's budget. A refresh token past its recorded expiry is still
    /// offered: only the provider's refusal is definitive, never a clock.
    fn refresh_locked(
        &self,
        config: &ProviderConfig,
        current: &TokenRecord,
        locked: &H::Txn,
    ) -> Result<(TokenSet, i64), Failed> {
        let started = self.host.monotonic_ms();
        let mut attempt = 1;
        // The longest Retry-After any attempt was given.
        let mut come_back = None;
        loop {
            match self.exchange(config, &current.tokens, locked) {
                Ok(tokens) => return Ok(tokens),
                Err(mut failed) => {
                    come_back = come_back.max(failed.retry_after);
                    match self.retry_after(config, failed.repeatable, attempt, started) {
                        Some(wait) => {
                            self.host.sleep_ms(wait);
                            attempt += 1;
                        }
                        None => {
                            failed.retry_after = come_back;
                            return Err(failed);
                        }
                    }
                }
            }
        }
    }

    /// One request to the token endpoint and the reading of its answer.
    fn exchange(
        &self,
        config: &ProviderConfig,
        old: &TokenSet,
        locked: &H::Txn,
    ) -> Result<(TokenSet, i64), Failed> {
        // Lifetimes count from when the request was sent, not when it came back.
        let sent_at = self.host.now();
        let answer = self.host.request_refresh(locked).map_err(|e| Failed {
            repeatable: may_repeat(Err(&e), config),
            error: e.into(),
            salvaged: None,
            retry_after: None,
        })?;
        let (status, content_type) = (answer.status, answer.content_type.as_deref());
        let body = answer.body.expose_secret();
        judge_answer(config, status, content_type, body)
            .and_then(|response| {
                let tokens = tokens_from(config, old, response, sent_at);
                // Out of bounds is the answer's fault, not the caller's.
                check_tokens(&tokens).map_err(|e| match e {
                    RefreshError::InvalidInput(m) => RefreshError::InvalidProviderResponse(m),
                    other => other,
                })?;
                Ok((tokens, sent_at))
            })
            .map_err(|error| Failed {
                repeatable: may_repeat(Ok((status, content_type, body)), config),
                salvaged: matches!(error, RefreshError::InvalidProviderResponse(_))
                    .then(|| salvage_refresh_token(status, content_type, body))
                    .flatten()
                    .filter(|new| {
                        old.refresh_token
                            .as_ref()
                            .is_none_or(|spent| new.expose_secret() != spent.expose_secret())
                    }),
                retry_after: answer.retry_after,
                error,
            })
    }

    /// The backoff before another attempt, if the failure is worth one and
    /// the budget allows it: the n-th retry waits between 100·2ⁿ and 200·2ⁿ ms.
    fn retry_after(
        &self,
        config: &ProviderConfig,
        repeatable: bool,
        attempt: u32,
        started: u64,
    ) -> Option<u64> {
        if !repeatable || attempt >= config.max_attempts {
            return None;
        }
        let ceiling = 200u64 << attempt.min(8);
        let random = self.host.random_u64();
        let wait = ceiling / 2 + random % (ceiling / 2 + 1);
        let spent = self.host.monotonic_ms().saturating_sub(started);
        let worst_next = spent + wait + u64::from(config.timeout_ms);
        (worst_next <= u64::from(config.retry_budget_ms)).then_some(wait)
    }

    /// Deletes a user's tokens (WIT `delete-tokens`).
    pub fn delete_tokens(&self, provider: &str, user_id: &str) -> Result<bool, RefreshError> {
        check_provider_name(provider)?;
        check_user_id(user_id)?;
        Ok(self.host.delete(provider, user_id)?)
    }

    /// One page of rows without secrets (WIT `list-tokens`): at most
    /// `limit` (capped at [`MAX_LIST_PAGE`]) after `after`.
    pub fn list_tokens(
        &self,
        after: Option<&RowKey>,
        limit: u32,
    ) -> Result<Vec<TokenSummary>, RefreshError> {
        let now = self.host.now();
        let page = self.host.list(after, limit.clamp(1, MAX_LIST_PAGE))?;
        Ok(page
            .into_iter()
            .map(|row| {
                let config = self.host.provider(&row.provider);
                let threshold = config.as_ref().map_or(0, |c| c.refresh_threshold_seconds);
                let machine = config.is_some_and(|c| c.host_grant);
                let state = validity::token_state(&timing(&row, machine), now, threshold);
                TokenSummary { row, state }
            })
            .collect())
    }

    /// Where a record stands (WIT `token-state`).
    pub fn token_state(&self, record: &TokenRecord, threshold: u32) -> validity::TokenState {
        let t = Timing {
            obtained_at: record.obtained_at,
            access_expires_at: record.tokens.access_token_expires_at,
            refresh_expires_at: record.tokens.refresh_token_expires_at,
            has_refresh_token: record.tokens.refresh_token.is_some(),
            reauthorization_recorded: record.health.last_failure
                == Some(ErrorClass::ReauthorizationRequired),
            narrowed: false,
        };
        validity::token_state(&t, self.host.now(), threshold)
    }

    /// Seconds since the epoch, from the host's clock.
    pub fn now(&self) -> i64 {
        self.host.now()
    }

    pub(crate) fn host(&self) -> &H {
        &self.host
    }

    pub(crate) fn config(&self, provider: &str) -> Result<ProviderConfig, RefreshError> {
        check_provider_name(provider)?;
        self.host
            .provider(provider)
            .ok_or_else(|| RefreshError::UnknownProvider(provider.into()))
    }

    fn seal_row(
        &self,
        provider: &str,
        user_id: &str,
        tokens: &TokenSet,
        obtained_at: i64,
    ) -> Result<SealedRow, RefreshError> {
        let sealed = self.host.seal(provider, user_id, tokens)?;
        Ok(SealedRow {
            provider: provider.into(),
            user_id: user_id.into(),
            key_id: sealed.key_id,
            access_token: sealed.access_token,
            refresh_token: sealed.refresh_token,
            access_token_expires_at: tokens.access_token_expires_at,
            refresh_token_expires_at: tokens.refresh_token_expires_at,
            scopes: tokens.scopes.clone(),
            baseline_scopes: tokens.scopes.clone(),
            obtained_at,
            generation: 0,
            health: Default::default(),
        })
    }

    fn open_field(
        &self,
        row: &SealedRow,
        field: Field,
        sealed: &[u8],
    ) -> Result<SecretString, RefreshError> {
        Ok(self
            .host
            .open(&row.provider, &row.user_id, field, &row.key_id, sealed)?)
    }

    /// The row with both tokens opened.
    fn open_row(&self, row: &SealedRow) -> Result<TokenRecord, RefreshError> {
        Ok(TokenRecord {
            provider: row.provider.clone(),
            user_id: row.user_id.clone(),
            tokens: TokenSet {
                access_token: self.open_field(row, Field::AccessToken, &row.access_token)?,
                refresh_token: row
                    .refresh_token
                    .as_deref()
                    .map(|s| self.open_field(row, Field::RefreshToken, s))
                    .transpose()?,
                access_token_expires_at: row.access_token_expires_at,
                refresh_token_expires_at: row.refresh_token_expires_at,
                scopes: row.scopes.clone(),
            },
            obtained_at: row.obtained_at,
            generation: row.generation,
            health: row.health.clone(),
        })
    }

    /// The row's token while it is valid beyond the skew at `now`, else
    /// `failure`: nothing that stops a refresh takes a good token away.
    fn still_valid_or(
        &self,
        row: &SealedRow,
        now: i64,
        want: Want,
        failure: RefreshError,
    ) -> Result<Fresh, RefreshError> {
        if want.still_valid(row, now) {
            self.grant(row)
        } else {
            Err(failure)
        }
    }

    /// The row's access grant (only the access token is opened), and the
    /// scopes of the user's authorisation the token lacks.
    fn grant(&self, row: &SealedRow) -> Result<Fresh, RefreshError> {
        let grant = AccessGrant {
            provider: row.provider.clone(),
            user_id: row.user_id.clone(),
            access_token: self.open_field(row, Field::AccessToken, &row.access_token)?,
            expires_at: row.access_token_expires_at,
            scopes: row.scopes.clone(),
            obtained_at: row.obtained_at,
            generation: row.generation,
        };
        Ok((grant, row.missing_scopes()))
    }
}

/// A grant and the scopes of the user's authorisation its token lacks.
pub(crate) type Fresh = (AccessGrant, Vec<String>);

/// A failed exchange with the token endpoint.
struct Failed {
    error: RefreshError,
    /// The provider's rules allow asking again ([`may_repeat`]).
    repeatable: bool,
    /// A rotated refresh token from an otherwise unusable answer.
    salvaged: Option<SecretString>,
    /// The answer's `Retry-After`, in seconds.
    retry_after: Option<u32>,
}

/// The error a waiter reports for a failure another runtime recorded.
fn recorded_failure(class: ErrorClass) -> RefreshError {
    let what = match class {
        ErrorClass::ReauthorizationRequired => {
            "the provider refused the refresh token; store a new authorisation"
        }
        ErrorClass::ProviderRejectedClient => "the provider rejected the client",
        ErrorClass::InvalidProviderResponse => "the provider answered nonsense",
        ErrorClass::ProviderUnavailable => "the provider is unavailable",
        ErrorClass::EgressDenied => "the host refused the token request",
        _ => "the last refresh failed",
    };
    RefreshError::of_class(
        class,
        format!("{what} (recorded by the last refresh attempt)"),
    )
}

/// Longest wait after failures, and the most of a `Retry-After` honoured.
const MAX_BACKOFF_SECONDS: i64 = 300;

/// Seconds to leave the provider alone after `failures` failures in a row:
/// 5, 10, 20, … up to five minutes, or the provider's `Retry-After` if longer
/// (within the same bound).
fn backoff_seconds(failures: u32, retry_after: Option<u32>) -> i64 {
    let grown = 5_i64.saturating_mul(1 << failures.saturating_sub(1).min(16));
    grown
        .max(retry_after.map_or(0, i64::from))
        .min(MAX_BACKOFF_SECONDS)
}

/// The error to report while the row says to leave the provider alone.
fn backing_off(row: &SealedRow, now: i64) -> Option<RefreshError> {
    // Never longer than the longest backoff from now: a row written with
    // a far-off time (a clock gone wrong, a bad writer) blocks nothing.
    let until = row
        .health
        .retry_not_before
        .filter(|t| now < *t && *t <= now + MAX_BACKOFF_SECONDS)?;
    let class = row.health.last_failure?;
    Some(RefreshError::of_class(
        class,
        format!(
            "the last refresh failed ({}); the next try is not before {until}",
            class.name()
        ),
    ))
}

/// What a caller of `ensure-fresh` asks of a token: its provider's refresh
/// window, and (from `ensure-fresh-for`) a lifetime it must still have.
#[derive(Debug, Clone, Copy)]
struct Want {
    threshold: u32,
    min_remaining: u32,
}

impl Want {
    /// Whether the row's access token is valid beyond the clock skew, and
    /// for the lifetime asked for, at `now`: good enough to serve.
    fn still_valid(&self, row: &SealedRow, now: i64) -> bool {
        let skew = validity::DEFAULT_CLOCK_SKEW_SECONDS.max(self.min_remaining);
        validity::is_access_token_valid(row.access_token_expires_at, now, skew)
    }

    /// Whether the row should be refreshed before it is served.
    fn due(&self, row: &SealedRow, now: i64) -> bool {
        let short = row
            .access_token_expires_at
            .is_some_and(|at| at.saturating_sub(now) < i64::from(self.min_remaining));
        short
            || validity::needs_refresh(
                row.obtained_at,
                row.access_token_expires_at,
                now,
                self.threshold,
            )
    }

    /// A minimum that leaves less than the refresh window of a token's
    /// lifetime could only be met by refreshing more often than the window
    /// allows (on every call, near the lifetime): refused before anything
    /// is done.
    fn attainable(&self, row: &SealedRow, now: i64) -> Result<(), RefreshError> {
        match row.access_token_expires_at {
            // An expired token (one stored late, say) is refreshed first:
            // its new lifetime is then what counts.
            Some(at) if self.min_remaining > 0 && at > now => {
                self.lives_long_enough(row.obtained_at, at)
            }
            _ => Ok(()),
        }
    }

    /// Whether a token obtained at `obtained_at` and expiring at
    /// `expires_at` can meet the minimum: its lifetime less its refresh
    /// window.
    fn lives_long_enough(&self, obtained_at: i64, expires_at: i64) -> Result<(), RefreshError> {
        let lifetime = expires_at.saturating_sub(obtained_at);
        let window = validity::refresh_window(self.threshold, obtained_at, expires_at);
        let most = lifetime.saturating_sub(window).max(0);
        if i64::from(self.min_remaining) > most {
            return Err(RefreshError::InvalidInput(format!(
                "this token lives {lifetime} s from when it was obtained: a minimum remaining \
                 lifetime of {} s cannot be met more than its {window} s refresh window \
                 before it ends (at most {most} s)",
                self.min_remaining
            )));
        }
        Ok(())
    }
}

/// A row's timing; a machine client's row is renewable without a refresh
/// token.
fn timing(row: &SealedRow, host_grant: bool) -> Timing {
    Timing {
        obtained_at: row.obtained_at,
        access_expires_at: row.access_token_expires_at,
        refresh_expires_at: row.refresh_token_expires_at,
        has_refresh_token: row.refresh_token.is_some() || host_grant,
        reauthorization_recorded: row.health.last_failure
            == Some(ErrorClass::ReauthorizationRequired),
        narrowed: !row.missing_scopes().is_empty(),
    }
}

/// The token set a successful answer gives: missing lifetimes fall back to
/// the provider's documented defaults, and a missing refresh token means the
/// old one stays (RFC 6749 §6).
fn tokens_from(
    config: &ProviderConfig,
    old: &TokenSet,
    response: TokenResponse,
    sent_at: i64,
) -> TokenSet {
    let rotated = response.refresh_token.is_some();
    let expires_in = response
        .expires_in
        .or(config.default_expires_in.map(i64::from));
    TokenSet {
        access_token: response.access_token,
        access_token_expires_at: expires_in.map(|s| sent_at + s),
        refresh_token_expires_at: match (response.refresh_token_expires_in, rotated) {
            (Some(s), _) => Some(sent_at + s),
            (None, true) => config
                .default_refresh_token_expires_in
                .map(|s| sent_at + i64::from(s)),
            // No new refresh token: the old one and its expiry stay.
            (None, false) => old.refresh_token_expires_at,
        },
        refresh_token: response.refresh_token.or_else(|| old.refresh_token.clone()),
        scopes: response.scopes.unwrap_or_else(|| old.scopes.clone()),
    }
}

/// The shape of provider names and key ids: 1-64 characters of
/// `[A-Za-z0-9._-]`, safe to quote in messages and logs.
pub fn is_plain_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_PROVIDER_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// Provider names are configuration keys: short and plain.
pub fn check_provider_name(name: &str) -> Result<(), RefreshError> {
    if is_plain_name(name) {
        Ok(())
    } else {
        Err(RefreshError::InvalidInput(format!(
            "provider name must be 1-{MAX_PROVIDER_LEN} characters of [A-Za-z0-9._-]"
        )))
    }
}

/// User ids are stored verbatim: any text without control characters.
pub fn check_user_id(user_id: &str) -> Result<(), RefreshError> {
    if user_id.is_empty() || user_id.len() > MAX_USER_ID_LEN {
        return Err(RefreshError::InvalidInput(format!(
            "user id must be 1-{MAX_USER_ID_LEN} bytes"
        )));
    }
    if user_id.chars().any(char::is_control) {
        return Err(RefreshError::InvalidInput(
            "user id contains control characters".into(),
        ));
    }
    Ok(())
}

fn check_tokens(tokens: &TokenSet) -> Result<(), RefreshError> {
    let bad = |what: &str| Err(RefreshError::InvalidInput(what.into()));
    let access = tokens.access_token.expose_secret();
    if access.is_empty() || access.len() > MAX_TOKEN_LEN {
        return bad("access token must be 1-16384 bytes");
    }
    if tokens
        .refresh_token
        .as_ref()
        .is_some_and(|r| r.expose_secret().is_empty() || r.expose_secret().len() > MAX_TOKEN_LEN)
    {
        return bad("refresh token must be 1-16384 bytes");
    }
    if tokens.scopes.len() > 256 || tokens.scopes.iter().any(|s| s.len() > 256) {
        return bad("too many or too long scopes");
    }
    Ok(())
}

#[cfg(test)]
#[path = "refresh_tests.rs"]
mod tests;
