//! tokenkeep's imports for any wasmtime embedder, the way wasmtime's own
//! `wasi-keyvalue` does it: a per-call context ([`KeeperCtx`]), a view onto
//! it ([`KeeperView`]) and [`add_to_linker`], so that a runtime that already
//! runs wasmtime links tokenkeep's imports into its own `Linker`.
//!
//! Each call is confined to a [`Scope`]: the rows the export was asked
//! about. Anything outside it traps the component ([`REFUSED`]); what the
//! component returns is checked against what this call opened or sealed
//! ([`KeeperCtx::vouches_for`], [`KeeperCtx::leaks`]).

use crate::bindings::tokenkeep::oauth::{
    clock, providers, sealing, storage, token_endpoint, types,
};
use crate::config::Grant;
use crate::convert;
use crate::error::Error;
use crate::sandbox::Shared;
use crate::storage::Transaction;
use crate::token_endpoint::{Renewal, fingerprint};
use secrecy::{ExposeSecret, SecretString};
use std::sync::Arc;
use tokenkeep_core::model::{RequestError, RowKey, SealedRow, SealingError};
use tokenkeep_core::provider::{may_repeat, salvage_refresh_token};
use tokenkeep_core::refresh::MAX_TOKEN_LEN;
use tokenkeep_core::seal::Field;
use tokenkeep_core::validity;
use wasmtime::component::{HasData, Linker, Resource, ResourceTable};

/// What one export call may touch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Scope {
    /// No storage, no sealing (the validity checks).
    #[default]
    Nothing,
    /// These rows, and this conversation's entries if one is named.
    /// `writes`: whether the call may write rows outside a transaction
    /// (storing, deleting, seeding), which only some exports need.
    Rows {
        rows: Vec<RowKey>,
        conversation: Option<String>,
        writes: bool,
    },
    /// One page of a listing: rows without opening them, at most `limit`
    /// after `after`.
    Listing { after: Option<RowKey>, limit: u32 },
    /// One row's summary: a first page of one row, that row alone.
    Summary(RowKey),
}

impl Scope {
    /// The one row an export about (provider, user id) may touch, through
    /// reads and its transaction only.
    pub fn row(provider: &str, user_id: &str) -> Self {
        Scope::Rows {
            rows: vec![RowKey {
                provider: provider.into(),
                user_id: user_id.into(),
            }],
            conversation: None,
            writes: false,
        }
    }

    /// The one row an export that stores or deletes it may touch.
    pub fn writable_row(provider: &str, user_id: &str) -> Self {
        match Self::row(provider, user_id) {
            Scope::Rows {
                rows, conversation, ..
            } => Scope::Rows {
                rows,
                conversation,
                writes: true,
            },
            other => other,
        }
    }

    fn allows_writes(&self) -> bool {
        matches!(self, Scope::Rows { writes: true, .. })
    }

    fn allows(&self, provider: &str, user_id: &str) -> bool {
        matches!(self, Scope::Rows { rows, .. }
            if rows.iter().any(|k| k.provider == provider && k.user_id == user_id))
    }

    fn allows_conversation(&self, id: &str) -> bool {
        matches!(self, Scope::Rows { conversation: Some(c), .. } if c == id)
    }
}

/// Most access or refresh tokens one call may open or seal: a conversation's worth.
const MAX_HANDED: usize = 256;

/// Shortest refresh token looked for inside returned text: shorter ones
/// would match honest words.
const MIN_LEAK_LEN: usize = 8;

/// The state of one call into the component.
pub struct KeeperCtx {
    shared: Arc<Shared>,
    /// The configuration as the call started (a reload does not change a
    /// call midway).
    config: Arc<crate::Config>,
    scope: Scope,
    /// Access tokens this call opened or sealed, by row: what it may return.
    handed: Vec<(RowKey, SecretString)>,
    /// Refresh tokens this call saw (opened, sealed, spent, or granted by a
    /// provider): none of them may leave in what the call returns.
    kept: Vec<SecretString>,
    /// The row the live transaction locked, and whether one is live: one
    /// live transaction at a time.
    live: Option<Option<RowKey>>,
    /// Token requests per row in this call: (row, sent, closed).
    requests: Vec<(RowKey, u32, bool)>,
    /// Scopes each row held or was given in this call: what a grant of it
    /// may list.
    scopes: Vec<(RowKey, Vec<String>)>,
    /// The baselines (scopes authorised) of the rows this call saw: what a
    /// scope mismatch may name.
    baselines: Vec<(RowKey, Vec<String>)>,
}

impl KeeperCtx {
    pub(crate) fn new(shared: Arc<Shared>, scope: Scope) -> Self {
        Self {
            config: shared.config(),
            shared,
            scope,
            handed: Vec::new(),
            kept: Vec::new(),
            live: None,
            requests: Vec::new(),
            scopes: Vec::new(),
            baselines: Vec::new(),
        }
    }

    /// The rows this call sent token requests for: its refreshes.
    pub(crate) fn refreshed(&self) -> impl Iterator<Item = &RowKey> {
        self.requests
            .iter()
            .filter(|(_, sent, _)| *sent > 0)
            .map(|(k, ..)| k)
    }

    /// Whether `access_token`, returned for (provider, user id), is one this
    /// call opened or sealed for that row as an access token (`user_id` none:
    /// any row of the provider in scope, for conversations), and no refresh
    /// token.
    pub fn vouches_for(&self, provider: &str, user_id: Option<&str>, access_token: &str) -> bool {
        !self.is_kept(access_token)
            && self.handed.iter().any(|(k, t)| {
                k.provider == provider
                    && user_id.is_none_or(|u| k.user_id == u)
                    && t.expose_secret() == access_token
            })
    }

    /// Whether `text` quotes a refresh token this call saw.
    pub fn leaks(&self, text: &str) -> bool {
        self.kept.iter().any(|t| {
            let t = t.expose_secret();
            t == text || (t.len() >= MIN_LEAK_LEN && text.contains(t))
        })
    }

    /// Whether `scopes` are a scope list this call saw for a row of
    /// `provider` (`user_id` none: any user's in scope).
    pub fn saw_scopes(&self, provider: &str, user_id: Option<&str>, scopes: &[String]) -> bool {
        self.scopes.iter().any(|(k, s)| {
            k.provider == provider && user_id.is_none_or(|u| k.user_id == u) && s == scopes
        })
    }

    /// Whether each of `scopes` is one this call saw on a row of `provider`
    /// (none: of any provider).
    pub fn saw_each_scope(&self, provider: Option<&str>, scopes: &[String]) -> bool {
        scopes.iter().all(|scope| {
            self.scopes
                .iter()
                .chain(&self.baselines)
                .any(|(k, s)| provider.is_none_or(|p| k.provider == p) && s.contains(scope))
        })
    }

    /// Whether `provider` is one this call is about.
    pub fn is_about(&self, provider: &str) -> bool {
        matches!(&self.scope, Scope::Rows { rows, .. } if rows.iter().any(|k| k.provider == provider))
    }

    /// A row written outside a lock is a new authorisation: its baseline
    /// is the scopes it holds, and nothing holds refreshes back.
    fn check_new_authorisation(&mut self, row: &SealedRow) -> wasmtime::Result<()> {
        if row.baseline_scopes != row.scopes || row.health.retry_not_before.is_some() {
            return Err(self.refuse(
                "a stored row whose baseline or backoff is not a new authorisation's",
                &(&row.provider, &row.user_id),
            ));
        }
        Ok(())
    }

    fn saw_row(&mut self, row: &SealedRow) {
        let key = row.key();
        if !self
            .scopes
            .iter()
            .any(|(k, s)| *k == key && *s == row.scopes)
        {
            self.scopes.push((key.clone(), row.scopes.clone()));
        }
        if !self
            .baselines
            .iter()
            .any(|(k, s)| *k == key && *s == row.baseline_scopes)
        {
            self.baselines.push((key, row.baseline_scopes.clone()));
        }
    }

    fn is_kept(&self, token: &str) -> bool {
        self.kept.iter().any(|t| t.expose_secret() == token)
    }

    fn vouch(
        &mut self,
        provider: &str,
        user_id: &str,
        access_token: &SecretString,
    ) -> wasmtime::Result<()> {
        let known = self.handed.iter().any(|(k, t)| {
            k.provider == provider
                && k.user_id == user_id
                && t.expose_secret() == access_token.expose_secret()
        });
        if !known {
            if self.handed.len() >= MAX_HANDED {
                return Err(self.refuse("more tokens than a call can need", &()));
            }
            self.handed.push((
                RowKey {
                    provider: provider.into(),
                    user_id: user_id.into(),
                },
                access_token.clone(),
            ));
        }
        Ok(())
    }

    fn keep(&mut self, refresh_token: SecretString) -> wasmtime::Result<()> {
        if refresh_token.expose_secret().len() > MAX_TOKEN_LEN {
            return Err(self.refuse("a token longer than any token", &()));
        }
        if !self.is_kept(refresh_token.expose_secret()) {
            if self.kept.len() >= MAX_HANDED {
                return Err(self.refuse("more tokens than a call can need", &()));
            }
            self.kept.push(refresh_token);
        }
        Ok(())
    }

    /// Ends the call: a component that reached outside its call is trapped,
    /// so it can neither go on nor pretend it was not refused. Logs the kind
    /// of refusal and a fingerprint of what was asked, never the asking.
    fn refuse(&self, what: &'static str, asked: &impl std::hash::Hash) -> wasmtime::Error {
        tracing::warn!(request = %fingerprint(asked), "component refused: {what}");
        wasmtime::Error::msg(format!("{REFUSED}: {what}"))
    }

    /// Refuses (provider, user id) unless it is in scope.
    fn check_row(&mut self, provider: &str, user_id: &str) -> wasmtime::Result<()> {
        if self.scope.allows(provider, user_id) {
            Ok(())
        } else {
            Err(self.refuse("a row outside the call's scope", &(provider, user_id)))
        }
    }

    /// Refuses a write through the pool outside the scope, or to the row the
    /// live transaction holds locked (it would wait on its own lock).
    fn check_write(&mut self, provider: &str, user_id: &str) -> wasmtime::Result<()> {
        self.check_row(provider, user_id)?;
        if !self.scope.allows_writes() {
            return Err(self.refuse(
                "a write outside a transaction in a call that only reads",
                &(provider, user_id),
            ));
        }
        let locked =
            matches!(&self.live, Some(Some(k)) if k.provider == provider && k.user_id == user_id);
        if locked {
            return Err(self.refuse(
                "a write beside the transaction that locks the row",
                &(provider, user_id),
            ));
        }
        Ok(())
    }
}

/// What a call that reached outside its scope fails with (the trap's message).
pub const REFUSED: &str = "the component reached outside its call";

/// A transaction as the component holds it: the row it locked (at most
/// one), which is all `compare-and-set` may write and `token-endpoint` may
/// refresh.
pub struct LockedTxn {
    txn: Option<Transaction>,
    locked: Option<SealedRow>,
    /// (provider, user id) once a load asked for it, row or no row.
    key: Option<(String, String)>,
}

/// Gives the linker the [`KeeperCtx`] and resource table of a store.
pub trait KeeperView: Send {
    fn keeper(&mut self) -> KeeperCtxView<'_>;
}

/// A borrow of a store's [`KeeperCtx`] and its resource table.
pub struct KeeperCtxView<'a> {
    pub ctx: &'a mut KeeperCtx,
    pub table: &'a mut ResourceTable,
}

struct HasKeeper;

impl HasData for HasKeeper {
    type Data<'a> = KeeperCtxView<'a>;
}

/// Links `clock`, `storage`, `sealing`, `providers` and `token-endpoint`
/// into `linker`. WASI (and, if the embedder wants it, a `wasi:http` that
/// refuses everything: [`crate::token_endpoint::DenyAllHttp`]) are the
/// embedder's to link.
pub fn add_to_linker<T: KeeperView + 'static>(linker: &mut Linker<T>) -> wasmtime::Result<()> {
    types::add_to_linker::<T, HasKeeper>(linker, T::keeper)?;
    clock::add_to_linker::<T, HasKeeper>(linker, T::keeper)?;
    storage::add_to_linker::<T, HasKeeper>(linker, T::keeper)?;
    sealing::add_to_linker::<T, HasKeeper>(linker, T::keeper)?;
    providers::add_to_linker::<T, HasKeeper>(linker, T::keeper)?;
    token_endpoint::add_to_linker::<T, HasKeeper>(linker, T::keeper)?;
    Ok(())
}

type Res<T, E> = wasmtime::Result<Result<T, E>>;

/// The furthest ahead a write may put a row's next refresh: the longest
/// backoff (five minutes) and a little clock slack.
const LONGEST_BACKOFF_SECONDS: i64 = 300 + 60;

fn storage_error(e: crate::storage::StorageError) -> storage::StorageError {
    match e {
        crate::storage::StorageError::LockTimeout => storage::StorageError::LockTimeout,
        crate::storage::StorageError::Unavailable(m)
        | crate::storage::StorageError::ConnectionLost(m) => storage::StorageError::Unavailable(m),
        e @ crate::storage::StorageError::SchemaTooNew { .. } => {
            storage::StorageError::Unavailable(e.to_string())
        }
    }
}

fn committed() -> storage::StorageError {
    storage::StorageError::Unavailable("transaction already committed".into())
}

impl types::Host for KeeperCtxView<'_> {}

impl clock::Host for KeeperCtxView<'_> {
    async fn now(&mut self) -> wasmtime::Result<i64> {
        Ok(self.ctx.shared.store.now())
    }
}

impl storage::Host for KeeperCtxView<'_> {
    async fn read(
        &mut self,
        provider: String,
        user_id: String,
    ) -> Res<storage::RowRead, storage::StorageError> {
        self.ctx.check_row(&provider, &user_id)?;
        let read = self.ctx.shared.store.read(&provider, &user_id).await;
        if let Ok(Some(row)) = read.as_ref().map(|r| r.row.as_ref()) {
            self.ctx.saw_row(row);
        }
        Ok(read.map(convert::read_to_wit).map_err(storage_error))
    }

    async fn list_rows(
        &mut self,
        after: Option<types::RowKey>,
        limit: u32,
    ) -> Res<Vec<storage::SealedRow>, storage::StorageError> {
        let after = after.map(convert::key_from_wit);
        let store = &self.ctx.shared.store;
        let rows = match &self.ctx.scope {
            Scope::Listing {
                after: page,
                limit: most,
            } if after == *page && limit <= *most => store.list(after.as_ref(), limit).await,
            Scope::Summary(key) if after.is_none() && limit >= 1 => store
                .read(&key.provider, &key.user_id)
                .await
                .map(|read| read.row.into_iter().collect()),
            Scope::Listing { .. } | Scope::Summary(_) => {
                return Err(self.ctx.refuse("a scan beyond the page asked for", &limit));
            }
            _ => return Err(self.ctx.refuse("a scan outside a listing", &limit)),
        };
        Ok(rows
            .map(|rows| rows.into_iter().map(convert::row_to_wit).collect())
            .map_err(storage_error))
    }

    async fn upsert(&mut self, row: storage::SealedRow) -> Res<u64, storage::StorageError> {
        self.ctx.check_write(&row.provider, &row.user_id)?;
        let row = convert::row_from_wit(row);
        self.ctx.check_new_authorisation(&row)?;
        Ok(self
            .ctx
            .shared
            .store
            .upsert(&row)
            .await
            .map_err(storage_error))
    }

    async fn insert(&mut self, row: storage::SealedRow) -> Res<bool, storage::StorageError> {
        self.ctx.check_write(&row.provider, &row.user_id)?;
        let row = convert::row_from_wit(row);
        self.ctx.check_new_authorisation(&row)?;
        Ok(self
            .ctx
            .shared
            .store
            .insert(&row)
            .await
            .map_err(storage_error))
    }

    async fn delete(
        &mut self,
        provider: String,
        user_id: String,
    ) -> Res<bool, storage::StorageError> {
        self.ctx.check_write(&provider, &user_id)?;
        Ok(self
            .ctx
            .shared
            .store
            .delete(&provider, &user_id)
            .await
            .map_err(storage_error))
    }

    async fn conversation_entries(
        &mut self,
        conversation_id: String,
    ) -> Res<Vec<types::ConversationEntry>, storage::StorageError> {
        if !self.ctx.scope.allows_conversation(&conversation_id) {
            return Err(self.ctx.refuse("another conversation", &conversation_id));
        }
        Ok(self
            .ctx
            .shared
            .store
            .conversation_entries(&conversation_id)
            .await
            .map(|v| v.into_iter().map(convert::entry_to_wit).collect())
            .map_err(storage_error))
    }

    async fn put_conversation_entry(
        &mut self,
        entry: types::ConversationEntry,
    ) -> Res<(), storage::StorageError> {
        if !self.ctx.scope.allows_conversation(&entry.conversation_id) {
            return Err(self
                .ctx
                .refuse("another conversation", &entry.conversation_id));
        }
        self.ctx.check_row(&entry.provider, &entry.user_id)?;
        let entry = convert::entry_from_wit(entry);
        Ok(self
            .ctx
            .shared
            .store
            .put_conversation_entry(&entry)
            .await
            .map_err(storage_error))
    }

    async fn begin(&mut self) -> Res<Resource<LockedTxn>, storage::StorageError> {
        if !matches!(self.ctx.scope, Scope::Rows { .. }) {
            return Err(self.ctx.refuse("a transaction in a call about no row", &()));
        }
        if self.ctx.live.is_some() {
            return Err(self.ctx.refuse("a second transaction in one call", &()));
        }
        match self.ctx.shared.store.begin().await {
            Ok(txn) => {
                self.ctx.live = Some(None);
                Ok(Ok(self.table.push(LockedTxn {
                    txn: Some(txn),
                    locked: None,
                    key: None,
                })?))
            }
            Err(e) => Ok(Err(storage_error(e))),
        }
    }
}

impl KeeperCtxView<'_> {
    /// `load-for-update` and `try-load-for-update`: one row per transaction,
    /// in the call's scope; none when `wait` is false and the lock is held.
    async fn lock_row(
        &mut self,
        tx: Resource<LockedTxn>,
        provider: String,
        user_id: String,
        wait: bool,
    ) -> Res<Option<storage::RowRead>, storage::StorageError> {
        self.ctx.check_row(&provider, &user_id)?;
        let slot = self.table.get_mut(&tx)?;
        if slot
            .key
            .as_ref()
            .is_some_and(|(p, u)| *p != provider || *u != user_id)
        {
            return Err(self
                .ctx
                .refuse("a second row in one transaction", &(provider, user_id)));
        }
        let Some(txn) = slot.txn.as_mut() else {
            return Ok(Err(committed()));
        };
        let read = if wait {
            txn.load_for_update(&provider, &user_id).await.map(Some)
        } else {
            txn.try_load_for_update(&provider, &user_id).await
        };
        let read = match read {
            Ok(Some(read)) => read,
            Ok(None) => return Ok(Ok(None)),
            Err(e) => return Ok(Err(storage_error(e))),
        };
        slot.locked = read.row.clone();
        if let Some(row) = &read.row {
            self.ctx.saw_row(row);
        }
        self.ctx.live = Some(Some(RowKey {
            provider: provider.clone(),
            user_id: user_id.clone(),
        }));
        slot.key = Some((provider, user_id));
        Ok(Ok(Some(convert::read_to_wit(read))))
    }
}

impl storage::HostTransaction for KeeperCtxView<'_> {
    async fn load_for_update(
        &mut self,
        tx: Resource<LockedTxn>,
        provider: String,
        user_id: String,
    ) -> Res<storage::RowRead, storage::StorageError> {
        let asked = std::time::Instant::now();
        let locked = self.lock_row(tx, provider, user_id, true).await;
        crate::metrics::lock_wait(asked.elapsed());
        Ok(locked?.and_then(|read| read.ok_or(storage::StorageError::LockTimeout)))
    }

    async fn try_load_for_update(
        &mut self,
        tx: Resource<LockedTxn>,
        provider: String,
        user_id: String,
    ) -> Res<Option<storage::RowRead>, storage::StorageError> {
        self.lock_row(tx, provider, user_id, false).await
    }

    async fn compare_and_set(
        &mut self,
        tx: Resource<LockedTxn>,
        row: storage::SealedRow,
        expected_generation: u64,
    ) -> Res<bool, storage::StorageError> {
        let slot = self.table.get_mut(&tx)?;
        let Some(locked) = slot
            .locked
            .as_ref()
            .filter(|l| l.provider == row.provider && l.user_id == row.user_id)
        else {
            return Err(self.ctx.refuse(
                "a write to a row the transaction did not lock",
                &(&row.provider, &row.user_id),
            ));
        };
        let row = convert::row_from_wit(row);
        // Only a request that went out may have brought new tokens (one the
        // host denied, or refused as misconfigured, did not).
        let requested = self
            .ctx
            .requests
            .iter()
            .any(|(k, sent, _)| *k == row.key() && *sent > 0);
        let now = self.ctx.shared.store.now();
        if !honest_successor(locked, &row, expected_generation, requested)
            || row
                .health
                .retry_not_before
                .is_some_and(|t| t > now + LONGEST_BACKOFF_SECONDS)
        {
            return Err(self.ctx.refuse(
                "a write that does not follow the locked row's generation",
                &(&row.provider, &row.user_id, row.generation),
            ));
        }
        let Some(txn) = slot.txn.as_mut() else {
            return Ok(Err(committed()));
        };
        match txn.compare_and_set(&row, expected_generation).await {
            Ok(written) => {
                if written {
                    self.ctx.saw_row(&row);
                    // The refresh endpoint must spend the newest token.
                    slot.locked = Some(row);
                }
                Ok(Ok(written))
            }
            Err(e) => Ok(Err(storage_error(e))),
        }
    }

    async fn commit(&mut self, tx: Resource<LockedTxn>) -> Res<(), storage::StorageError> {
        let slot = self.table.get_mut(&tx)?;
        slot.locked = None;
        let Some(txn) = slot.txn.take() else {
            return Ok(Err(committed()));
        };
        self.ctx.live = None;
        Ok(txn.commit().await.map_err(storage_error))
    }

    async fn drop(&mut self, tx: Resource<LockedTxn>) -> wasmtime::Result<()> {
        // An uncommitted transaction rolls back as it drops.
        if self.table.delete(tx)?.txn.is_some() {
            self.ctx.live = None;
        }
        Ok(())
    }
}

/// A write under the lock keeps the row's baseline scopes and either keeps
/// the tokens and the generation (bookkeeping: the failure count, the class)
/// or, once this call asked the provider for the row, is the next generation.
fn honest_successor(locked: &SealedRow, row: &SealedRow, expected: u64, requested: bool) -> bool {
    // The baseline is what the user authorised: only a new authorisation
    // (a store, outside any lock) changes it.
    if expected != locked.generation || row.baseline_scopes != locked.baseline_scopes {
        return false;
    }
    if row.generation == locked.generation + 1 {
        return requested;
    }
    row.generation == locked.generation
        && row.key_id == locked.key_id
        && row.access_token == locked.access_token
        && row.refresh_token == locked.refresh_token
        && row.access_token_expires_at == locked.access_token_expires_at
        && row.refresh_token_expires_at == locked.refresh_token_expires_at
        && row.scopes == locked.scopes
        && row.obtained_at == locked.obtained_at
}

fn sealing_error(e: SealingError) -> sealing::SealingError {
    match e {
        SealingError::UnknownKey(m) => sealing::SealingError::UnknownKey(m),
        SealingError::Undecryptable(m) => sealing::SealingError::Undecryptable(m),
        SealingError::Refused(m) => sealing::SealingError::Refused(m),
    }
}

impl sealing::Host for KeeperCtxView<'_> {
    async fn seal_tokens(
        &mut self,
        provider: String,
        user_id: String,
        access_token: String,
        refresh_token: Option<String>,
    ) -> Res<sealing::SealedTokens, sealing::SealingError> {
        self.ctx.check_row(&provider, &user_id)?;
        let access_token = SecretString::from(access_token);
        let refresh_token = refresh_token.map(SecretString::from);
        if let Some(r) = &refresh_token {
            self.ctx.keep(r.clone())?;
        }
        if self.ctx.is_kept(access_token.expose_secret()) {
            return Err(self.ctx.refuse(
                "a refresh token sealed as an access token",
                &(&provider, &user_id),
            ));
        }
        let sealed = self.ctx.shared.keyring.seal_tokens(
            &provider,
            &user_id,
            &access_token,
            refresh_token.as_ref(),
        );
        if sealed.is_ok() {
            self.ctx.vouch(&provider, &user_id, &access_token)?;
        }
        Ok(sealed
            .map(|s| sealing::SealedTokens {
                key_id: s.key_id,
                access_token: s.access_token,
                refresh_token: s.refresh_token,
            })
            .map_err(sealing_error))
    }

    async fn open(
        &mut self,
        provider: String,
        user_id: String,
        field: sealing::Field,
        key_id: String,
        ciphertext: Vec<u8>,
    ) -> Res<String, sealing::SealingError> {
        self.ctx.check_row(&provider, &user_id)?;
        let field = match field {
            sealing::Field::AccessToken => Field::AccessToken,
            sealing::Field::RefreshToken => Field::RefreshToken,
        };
        let opened = self
            .ctx
            .shared
            .keyring
            .open(&provider, &user_id, field, &key_id, &ciphertext);
        match opened {
            Ok(token) => {
                let plain = token.expose_secret().to_string();
                match field {
                    Field::AccessToken => self.ctx.vouch(&provider, &user_id, &token)?,
                    Field::RefreshToken => self.ctx.keep(token)?,
                }
                Ok(Ok(plain))
            }
            Err(e) => Ok(Err(sealing_error(e))),
        }
    }
}

impl providers::Host for KeeperCtxView<'_> {
    async fn lookup(
        &mut self,
        name: String,
    ) -> wasmtime::Result<Option<providers::ProviderConfig>> {
        Ok(self
            .ctx
            .config
            .providers
            .get(&name)
            .map(|p| convert::provider_to_wit(p.contract())))
    }
}

impl token_endpoint::Host for KeeperCtxView<'_> {
    async fn request_refresh(
        &mut self,
        locked: Resource<LockedTxn>,
    ) -> Res<token_endpoint::ProviderAnswer, token_endpoint::RequestError> {
        use token_endpoint::RequestError as E;
        let slot = self.table.get(&locked)?;
        let Some(row) = slot.locked.clone().filter(|_| slot.txn.is_some()) else {
            return Err(self.ctx.refuse("a refresh without a locked row", &()));
        };
        let key = row.key();
        let Some(provider) = self.ctx.config.providers.get(&row.provider).cloned() else {
            return Ok(Err(E::Denied(
                "the locked row's provider is not configured".into(),
            )));
        };
        if provider.token_url.is_empty() {
            return Ok(Err(E::Misconfigured(
                "the MCP server's authorisation server is not discovered yet: run tokenkeep connect"
                    .into(),
            )));
        }
        if let Some(var) = &provider.client_secret_missing {
            return Ok(Err(E::Misconfigured(format!(
                "environment variable {var} (client_secret_env) is not set"
            ))));
        }
        // The provider's own retry rules, held by the host: at most
        // `max-attempts` requests per row and call, and none after one whose
        // answer (or lost answer) may have spent the token ([`may_repeat`]).
        let i = match self.ctx.requests.iter().position(|(k, ..)| *k == key) {
            Some(i) => i,
            None => {
                self.ctx.requests.push((key.clone(), 0, false));
                self.ctx.requests.len() - 1
            }
        };
        let (_, sent, closed) = self.ctx.requests[i];
        if closed || sent >= provider.max_attempts {
            return Err(self.ctx.refuse(
                "a token request beyond the provider's retry rules",
                &(&key.provider, &key.user_id),
            ));
        }
        // What the request presents: the row's refresh token, the subject
        // of a token exchange, or nothing (client credentials).
        let presented = match provider.grant {
            // A machine client renews with its own credentials: nothing
            // of the row is spent.
            Grant::ClientCredentials => None,
            // The subject is the same user's access token at the subject
            // provider, which the keeper made fresh before this call: the
            // component names no token and no other user.
            Grant::TokenExchange => {
                let subject = provider.subject_provider.as_deref().unwrap_or_default();
                let read = self.ctx.shared.store.read(subject, &row.user_id).await;
                let Some(token) = read.ok().and_then(|r| {
                    let s = r.row?;
                    validity::is_access_token_valid(
                        s.access_token_expires_at,
                        r.now,
                        validity::DEFAULT_CLOCK_SKEW_SECONDS,
                    )
                    .then_some(s)
                }) else {
                    return Ok(Err(E::Denied(format!(
                        "no valid {subject} token of this user to exchange"
                    ))));
                };
                let Ok(subject_token) = self.ctx.shared.keyring.open(
                    subject,
                    &row.user_id,
                    Field::AccessToken,
                    &token.key_id,
                    &token.access_token,
                ) else {
                    return Ok(Err(E::Denied(format!(
                        "the {subject} token of this user does not open"
                    ))));
                };
                self.ctx.keep(subject_token.clone())?;
                Some(subject_token)
            }
            Grant::AuthorizationCode => {
                let Some(sealed) = row.refresh_token.as_deref() else {
                    return Ok(Err(E::Denied(
                        "the locked row holds no refresh token".into(),
                    )));
                };
                let Ok(refresh_token) = self.ctx.shared.keyring.open(
                    &row.provider,
                    &row.user_id,
                    Field::RefreshToken,
                    &row.key_id,
                    sealed,
                ) else {
                    return Ok(Err(E::Denied(
                        "the locked row's refresh token does not open".into(),
                    )));
                };
                self.ctx.keep(refresh_token.clone())?;
                Some(refresh_token)
            }
        };
        let shared = self.ctx.shared.clone();
        // A provider that binds tokens: the proof goes with the row's key,
        // which the keeper made before the call (a store write here would
        // wait for this very lock on SQLite).
        let proof_key = if provider.dpop {
            let found = shared
                .proof_keys
                .find(&shared.store, &shared.keyring, &row.provider, &row.user_id)
                .await;
            match found {
                Ok(Some(key)) => Some(key),
                Ok(None) => {
                    return Ok(Err(E::Denied(
                        "the row has no DPoP proof key: the keeper makes it when it is asked for the token"
                            .into(),
                    )));
                }
                Err(e @ (Error::Decryption(_) | Error::Config(_))) => {
                    return Ok(Err(E::Misconfigured(format!(
                        "the row's DPoP proof key: {e}"
                    ))));
                }
                Err(e) => {
                    return Ok(Err(E::NotSent(format!("the row's DPoP proof key: {e}"))));
                }
            }
        } else {
            None
        };
        let Some(txn) = self.table.get_mut(&locked)?.txn.as_mut() else {
            return Err(self.ctx.refuse("a refresh without a locked row", &()));
        };
        let sent = std::time::Instant::now();
        let outcome = crate::token_endpoint::request_refresh(
            &shared.connections,
            &provider,
            &row,
            txn,
            match (&presented, provider.grant) {
                (Some(token), Grant::TokenExchange) => Renewal::TokenExchange(token),
                (Some(token), _) => Renewal::RefreshToken(token),
                (None, _) => Renewal::ClientCredentials,
            },
            proof_key.as_deref().map(|key| crate::token_endpoint::Dpop {
                key,
                nonces: &shared.proof_keys,
            }),
        )
        .await;
        crate::metrics::provider_request(
            &provider.name,
            outcome.as_ref().ok().map(|a| a.status),
            sent.elapsed(),
        );
        // Kept all the same (a rotated refresh token must not be lost), but
        // said: runtimes are told the token is DPoP-bound.
        if let Ok(a) = &outcome
            && provider.dpop
            && (200..300).contains(&a.status)
            && !crate::dpop::is_bound(a.body.expose_secret())
        {
            tracing::warn!(
                provider = %provider.name,
                "a refresh with a DPoP proof got a token that is not DPoP-bound: the server does not bind tokens (set dpop = false)"
            );
        }
        if let Ok(a) = &outcome
            && let Some(granted) =
                salvage_refresh_token(a.status, a.content_type.as_deref(), a.body.expose_secret())
        {
            self.ctx.keep(granted)?;
        }
        let repeatable = may_repeat(
            outcome
                .as_ref()
                .map(|a| (a.status, a.content_type.as_deref(), a.body.expose_secret())),
            &provider.contract(),
        );
        let entry = &mut self.ctx.requests[i];
        entry.1 += 1;
        entry.2 = !repeatable;
        Ok(outcome
            .map(|a| token_endpoint::ProviderAnswer {
                status: a.status,
                content_type: a.content_type,
                retry_after: a.retry_after,
                body: a.body.expose_secret().to_vec(),
            })
            .map_err(|e| match e {
                RequestError::Denied(m) => E::Denied(m),
                RequestError::Misconfigured(m) => E::Misconfigured(m),
                RequestError::NotSent(m) => E::NotSent(m),
                RequestError::NoAnswer(m) => E::NoAnswer(m),
                RequestError::AnswerUnusable(m) => E::AnswerUnusable(m),
            }))
    }
}
