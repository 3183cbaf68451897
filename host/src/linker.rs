//! tokenkeep's imports for any wasmtime embedder, the way wasmtime's own
//! `wasi-keyvalue` does it: a per-call context ([`KeeperCtx`]), a view onto
//! it ([`KeeperView`]) and [`add_to_linker`], so that a runtime that already
//! runs wasmtime links tokenkeep's imports into its own `Linker`.
//!
//! Each call is confined to a [`Scope`]: the rows the export was asked
//! about. Anything outside it is refused and recorded, and the embedder
//! fails the call ([`KeeperCtx::refusals`]); what the component returns is
//! checked against what this call opened or sealed ([`KeeperCtx::vouches_for`]).

use crate::bindings::tokenkeep::oauth::{
    clock, providers, sealing, storage, token_endpoint, types,
};
use crate::convert;
use crate::sandbox::Shared;
use crate::storage::Transaction;
use crate::token_endpoint::fingerprint;
use secrecy::{ExposeSecret, SecretString};
use std::sync::Arc;
use tokenkeep_core::model::{RequestError, RowKey, SealedRow, SealingError};
use tokenkeep_core::seal::Field;
use wasmtime::component::{HasData, Linker, Resource, ResourceTable};

/// What one export call may touch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Scope {
    /// No storage, no sealing (the validity checks).
    #[default]
    Nothing,
    /// These rows, and this conversation's entries if one is named.
    Rows {
        rows: Vec<RowKey>,
        conversation: Option<String>,
    },
    /// A listing: rows without opening them.
    Listing,
}

impl Scope {
    /// The one row an export about (provider, user id) may touch.
    pub fn row(provider: &str, user_id: &str) -> Self {
        Scope::Rows {
            rows: vec![RowKey {
                provider: provider.into(),
                user_id: user_id.into(),
            }],
            conversation: None,
        }
    }

    fn allows(&self, provider: &str, user_id: &str) -> bool {
        matches!(self, Scope::Rows { rows, .. }
            if rows.iter().any(|k| k.provider == provider && k.user_id == user_id))
    }

    fn allows_conversation(&self, id: &str) -> bool {
        matches!(self, Scope::Rows { conversation: Some(c), .. } if c == id)
    }
}

/// The state of one call into the component.
pub struct KeeperCtx {
    shared: Arc<Shared>,
    scope: Scope,
    /// Access tokens this call opened or sealed, by row: what it may return.
    handed: Vec<(RowKey, SecretString)>,
    /// What was refused, in the host's words (never the guest's).
    refusals: Vec<&'static str>,
}

impl KeeperCtx {
    pub(crate) fn new(shared: Arc<Shared>, scope: Scope) -> Self {
        Self {
            shared,
            scope,
            handed: Vec::new(),
            refusals: Vec::new(),
        }
    }

    /// Import calls this call made outside its scope. A call with any
    /// refusal must fail whatever the component returned.
    pub fn refusals(&self) -> &[&'static str] {
        &self.refusals
    }

    /// Whether `access_token`, returned for (provider, user id), is one this
    /// call opened or sealed for that row (`user_id` none: any row of the
    /// provider in scope, for conversations).
    pub fn vouches_for(&self, provider: &str, user_id: Option<&str>, access_token: &str) -> bool {
        self.handed.iter().any(|(k, t)| {
            k.provider == provider
                && user_id.is_none_or(|u| k.user_id == u)
                && t.expose_secret() == access_token
        })
    }

    /// Lets a token the caller handed in come back out unchanged.
    pub(crate) fn vouch(&mut self, provider: &str, user_id: &str, access_token: &SecretString) {
        self.handed.push((
            RowKey {
                provider: provider.into(),
                user_id: user_id.into(),
            },
            access_token.clone(),
        ));
    }

    fn refuse(&mut self, what: &'static str, asked: &impl std::hash::Hash) -> String {
        tracing::warn!(request = %fingerprint(asked), "component refused: {what}");
        self.refusals.push(what);
        what.to_string()
    }

    /// Refuses (provider, user id) unless it is in scope.
    fn check_row(&mut self, provider: &str, user_id: &str) -> Result<(), String> {
        if self.scope.allows(provider, user_id) {
            Ok(())
        } else {
            Err(self.refuse("a row outside the call's scope", &(provider, user_id)))
        }
    }
}

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

fn refused<T>(m: String) -> Res<T, storage::StorageError> {
    Ok(Err(storage::StorageError::Refused(m)))
}

fn storage_error(e: crate::storage::StorageError) -> storage::StorageError {
    match e {
        crate::storage::StorageError::LockTimeout => storage::StorageError::LockTimeout,
        crate::storage::StorageError::Unavailable(m) => storage::StorageError::Unavailable(m),
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
        if let Err(m) = self.ctx.check_row(&provider, &user_id) {
            return refused(m);
        }
        Ok(self
            .ctx
            .shared
            .store
            .read(&provider, &user_id)
            .await
            .map(convert::read_to_wit)
            .map_err(storage_error))
    }

    async fn list_rows(
        &mut self,
        after: Option<types::RowKey>,
        limit: u32,
    ) -> Res<Vec<storage::SealedRow>, storage::StorageError> {
        if self.ctx.scope != Scope::Listing {
            let m = self.ctx.refuse("a scan outside a listing", &limit);
            return refused(m);
        }
        let after = after.map(convert::key_from_wit);
        Ok(self
            .ctx
            .shared
            .store
            .list(after.as_ref(), limit.min(10_000))
            .await
            .map(|rows| rows.into_iter().map(convert::row_to_wit).collect())
            .map_err(storage_error))
    }

    async fn upsert(&mut self, row: storage::SealedRow) -> Res<u64, storage::StorageError> {
        if let Err(m) = self.ctx.check_row(&row.provider, &row.user_id) {
            return refused(m);
        }
        let row = convert::row_from_wit(row);
        Ok(self
            .ctx
            .shared
            .store
            .upsert(&row)
            .await
            .map_err(storage_error))
    }

    async fn insert(&mut self, row: storage::SealedRow) -> Res<bool, storage::StorageError> {
        if let Err(m) = self.ctx.check_row(&row.provider, &row.user_id) {
            return refused(m);
        }
        let row = convert::row_from_wit(row);
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
        if let Err(m) = self.ctx.check_row(&provider, &user_id) {
            return refused(m);
        }
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
            let m = self.ctx.refuse("another conversation", &conversation_id);
            return refused(m);
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
            let m = self
                .ctx
                .refuse("another conversation", &entry.conversation_id);
            return refused(m);
        }
        if let Err(m) = self.ctx.check_row(&entry.provider, &entry.user_id) {
            return refused(m);
        }
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
            let m = self.ctx.refuse("a transaction in a call about no row", &());
            return refused(m);
        }
        match self.ctx.shared.store.begin().await {
            Ok(txn) => Ok(Ok(self.table.push(LockedTxn {
                txn: Some(txn),
                locked: None,
                key: None,
            })?)),
            Err(e) => Ok(Err(storage_error(e))),
        }
    }
}

impl storage::HostTransaction for KeeperCtxView<'_> {
    async fn load_for_update(
        &mut self,
        tx: Resource<LockedTxn>,
        provider: String,
        user_id: String,
    ) -> Res<storage::RowRead, storage::StorageError> {
        if let Err(m) = self.ctx.check_row(&provider, &user_id) {
            return refused(m);
        }
        let slot = self.table.get_mut(&tx)?;
        if slot
            .key
            .as_ref()
            .is_some_and(|(p, u)| *p != provider || *u != user_id)
        {
            let m = self
                .ctx
                .refuse("a second row in one transaction", &(provider, user_id));
            return refused(m);
        }
        let Some(txn) = slot.txn.as_mut() else {
            return Ok(Err(committed()));
        };
        let read = match txn.load_for_update(&provider, &user_id).await {
            Ok(read) => read,
            Err(e) => return Ok(Err(storage_error(e))),
        };
        slot.locked = read.row.clone();
        slot.key = Some((provider, user_id));
        Ok(Ok(convert::read_to_wit(read)))
    }

    async fn compare_and_set(
        &mut self,
        tx: Resource<LockedTxn>,
        row: storage::SealedRow,
        expected_generation: u64,
    ) -> Res<bool, storage::StorageError> {
        let slot = self.table.get_mut(&tx)?;
        let locked_this_row = slot
            .locked
            .as_ref()
            .is_some_and(|l| l.provider == row.provider && l.user_id == row.user_id);
        if !locked_this_row {
            let m = self.ctx.refuse(
                "a write to a row the transaction did not lock",
                &(&row.provider, &row.user_id),
            );
            return refused(m);
        }
        let Some(txn) = slot.txn.as_mut() else {
            return Ok(Err(committed()));
        };
        let row = convert::row_from_wit(row);
        match txn.compare_and_set(&row, expected_generation).await {
            Ok(written) => {
                if written {
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
        Ok(txn.commit().await.map_err(storage_error))
    }

    async fn drop(&mut self, tx: Resource<LockedTxn>) -> wasmtime::Result<()> {
        // An uncommitted transaction rolls back as it drops.
        self.table.delete(tx)?;
        Ok(())
    }
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
        if let Err(m) = self.ctx.check_row(&provider, &user_id) {
            return Ok(Err(sealing::SealingError::Refused(m)));
        }
        let access_token = SecretString::from(access_token);
        let refresh_token = refresh_token.map(SecretString::from);
        let sealed = self.ctx.shared.keyring.seal_tokens(
            &provider,
            &user_id,
            &access_token,
            refresh_token.as_ref(),
        );
        if sealed.is_ok() {
            self.ctx.vouch(&provider, &user_id, &access_token);
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
        if let Err(m) = self.ctx.check_row(&provider, &user_id) {
            return Ok(Err(sealing::SealingError::Refused(m)));
        }
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
                if field == Field::AccessToken {
                    self.ctx.vouch(&provider, &user_id, &token);
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
            .shared
            .config
            .providers
            .get(&name)
            .map(|p| providers::ProviderConfig {
                name: p.name.clone(),
                refresh_threshold_seconds: p.refresh_threshold_seconds,
                timeout_ms: p.timeout_ms,
                max_response_bytes: p.max_response_bytes,
                kind: p.kind.clone(),
                error_codes: p
                    .error_codes
                    .iter()
                    .map(|(code, class)| (code.clone(), convert::class_to_wit(*class)))
                    .collect(),
                default_expires_in: p.default_expires_in,
                default_refresh_token_expires_in: p.default_refresh_token_expires_in,
                rotates_refresh_tokens: p.rotates_refresh_tokens,
                max_attempts: p.max_attempts,
                retry_budget_ms: p.retry_budget_ms,
            }))
    }
}

impl token_endpoint::Host for KeeperCtxView<'_> {
    async fn request_refresh(
        &mut self,
        locked: Resource<LockedTxn>,
    ) -> Res<token_endpoint::ProviderAnswer, token_endpoint::RequestError> {
        use token_endpoint::RequestError as E;
        let slot = self.table.get(&locked)?;
        let row = match (&slot.txn, &slot.locked) {
            (Some(_), Some(row)) => row.clone(),
            _ => {
                let m = self.ctx.refuse("a refresh without a locked row", &());
                return Ok(Err(E::Denied(m)));
            }
        };
        let shared = self.ctx.shared.clone();
        Ok(crate::token_endpoint::request_refresh(&shared, &row)
            .await
            .map(|a| token_endpoint::ProviderAnswer {
                status: a.status,
                content_type: a.content_type,
                body: a.body.expose_secret().to_vec(),
            })
            .map_err(|e| match e {
                RequestError::Denied(m) => E::Denied(m),
                RequestError::NotSent(m) => E::NotSent(m),
                RequestError::NoAnswer(m) => E::NoAnswer(m),
                RequestError::AnswerUnusable(m) => E::AnswerUnusable(m),
            }))
    }
}
