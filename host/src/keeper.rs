//! [`Keeper`]: the host API that the CLI, services and tests all use.

use crate::audit::{Action, AuditLog, Entry as AuditEntry, Filter};
use crate::bindings::KeeperCore;
use crate::bindings::tokenkeep::oauth::types as wit;
use crate::clock::Clock;
use crate::config::Config;
use crate::conversation::{ConversationError, ConversationSettings, PartialRefresh};
use crate::convert;
use crate::error::Error;
use crate::keyring::Keyring;
use crate::linker::{KeeperCtx, Scope};
use crate::sandbox::{Runtime, SandboxLimits, Shared, State};
use crate::storage::{Store, StoreOptions};
use secrecy::ExposeSecret;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokenkeep_core::error::RefreshError;
use tokio::sync::watch;
use tokio_util::task::TaskTracker;

pub use crate::bindings::tokenkeep::oauth::types::{TokenState, TokenSummary};
pub use tokenkeep_core::model::{
    AccessGrant, ConversationEntry, Health, RowKey, TokenRecord, TokenSet,
};

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
    /// Serve repeated reads of a token valid beyond its refresh window from
    /// memory ([`crate::grant_cache`]), kept current by Postgres' change
    /// notifications within [`crate::grant_cache::STALENESS_BOUND`], or by
    /// SQLite's change counter, asked at every read.
    pub grant_cache: bool,
    /// Record every token read, refresh, store and delete in the audit log
    /// ([`crate::audit`]), attributed to this caller unless the calling
    /// task names one ([`crate::audit::as_caller`]); `None`: no audit log.
    pub audit_as: Option<String>,
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
            .field("grant_cache", &self.grant_cache)
            .field("audit_as", &self.audit_as)
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
/// Cheap to share (`Arc`); every call runs in a fresh component instance
/// confined to the rows it is about.
pub struct Keeper {
    runtime: Arc<Runtime>,
    /// Refreshing calls run on tasks of their own, tracked here: a caller
    /// that stops waiting (a timeout, a `select!`, a deploy's SIGTERM) never
    /// cancels a refresh between the provider's answer and the commit, and
    /// [`Keeper::shutdown`] waits for them.
    detached: TaskTracker,
    /// `ensure_fresh` calls in flight, per row: callers in this process
    /// for the same token share one call (one connection, one refresh).
    flights: Arc<Mutex<HashMap<RowKey, (Flight, u32)>>>,
    /// Where reads, refreshes, stores and deletes are recorded.
    audit: Option<AuditLog>,
}

/// How long [`Keeper::shutdown`] waits for the audit log's last entries
/// (the database may be away).
const AUDIT_FLUSH_WAIT: Duration = Duration::from_secs(10);

/// How many calls in flight a caller joins before it calls on its own.
const FLIGHTS_JOINED: usize = 3;

/// The answer of an `ensure_fresh` call in flight, once it has one.
type Flight = watch::Receiver<Option<Result<AccessGrant, Error>>>;

/// Takes the flights map even if a task panicked holding it.
fn flights(
    map: &Mutex<HashMap<RowKey, (Flight, u32)>>,
) -> MutexGuard<'_, HashMap<RowKey, (Flight, u32)>> {
    map.lock().unwrap_or_else(|p| p.into_inner())
}

/// Takes a flight off the map when its task ends, however it ends (a panic
/// included), and only that flight.
struct Landing {
    flights: Arc<Mutex<HashMap<RowKey, (Flight, u32)>>>,
    key: RowKey,
    flight: Flight,
}

impl Drop for Landing {
    fn drop(&mut self) {
        let mut map = flights(&self.flights);
        if map
            .get(&self.key)
            .is_some_and(|(f, _)| f.same_channel(&self.flight))
        {
            map.remove(&self.key);
        }
    }
}

impl Keeper {
    /// Connects to the database, migrates it and compiles (or loads) the component.
    pub async fn open(options: Options) -> Result<Arc<Self>, Error> {
        Self::open_with_component(options, crate::sandbox::COMPONENT).await
    }

    /// Like [`Keeper::open`], with another build of the component: a fork,
    /// or (in the sandbox tests) a hostile one. It must implement the
    /// `keeper-core` world; it gets the same sandbox and the same checks.
    pub async fn open_with_component(options: Options, wasm: &[u8]) -> Result<Arc<Self>, Error> {
        let store_options = StoreOptions {
            lock_wait: Duration::from_millis(u64::from(options.config.lock_wait_ms)),
            max_connections: options.max_connections,
            hold: options.config.slowest_provider_call(),
        };
        let mut store = Store::open(&options.database_url, store_options, options.clock).await?;
        if options.grant_cache {
            store.cache_grants()?;
        }
        // MCP servers' providers that some process registered already.
        let mut config = options.config;
        for (name, p) in &mut config.providers {
            if let Some(url) = p.mcp_url.clone()
                && let Some(r) = store.registration(name).await?
                && r.resource == url
            {
                p.apply_registration(&r)?;
            }
        }
        let shared = Shared {
            store,
            config: std::sync::RwLock::new(Arc::new(config)),
            keyring: options.keyring,
            connections: Default::default(),
            proof_keys: Default::default(),
        };
        let retention = shared
            .config()
            .audit_retention_days
            .map(|days| Duration::from_secs(u64::from(days) * 86_400));
        // Compiling (or loading the cached machine code) happens once per process.
        let runtime = Runtime::new(shared, options.limits, wasm)?;
        let audit = options
            .audit_as
            .as_deref()
            .map(|caller| AuditLog::start(runtime.shared().clone(), caller, retention));
        Ok(Arc::new(Self {
            runtime: Arc::new(runtime),
            detached: TaskTracker::new(),
            flights: Arc::default(),
            audit,
        }))
    }

    /// The configuration this keeper runs with now.
    pub fn config(&self) -> Arc<Config> {
        self.runtime.shared().config()
    }

    /// Replaces the provider configuration (SIGHUP): calls that start from
    /// now on use `config`; calls in flight finish with the one they began
    /// with. The lock wait and the database settings are read at open and
    /// need a restart.
    pub fn reload_config(&self, config: Config) -> Result<(), Error> {
        self.update_config(|running| {
            // The call budget and the database's patience with a silent
            // lock holder were sized at open for the slowest provider then:
            // a slower one could be cut off between its answer and the commit.
            if config.lock_wait_ms != running.lock_wait_ms
                || config.slowest_provider_call() > running.slowest_provider_call()
                || config.audit_retention_days != running.audit_retention_days
            {
                return Err(Error::Config(
                    "lock_wait_ms, audit_retention_days, or a provider slower than the slowest \
                     at start (timeout_ms and retries) need a restart"
                        .into(),
                ));
            }
            // Registrations with discovered servers carry over.
            let mut config = config;
            for (name, p) in &mut config.providers {
                if let Some(r) = running
                    .providers
                    .get(name)
                    .and_then(|p| p.registration.as_ref())
                    && p.mcp_url.as_deref() == Some(r.resource.as_str())
                {
                    p.apply_registration(r)?;
                }
            }
            *running = config;
            Ok(())
        })?;
        if let Some(cache) = self.runtime.shared().store.grant_cache() {
            // Thresholds may have changed: the cache starts over.
            cache.invalidate_all();
        }
        Ok(())
    }

    /// Changes the configuration running now, under its lock, so that no
    /// reload in between is lost; nothing changes when `change` fails.
    pub(crate) fn update_config<T>(
        &self,
        change: impl FnOnce(&mut Config) -> Result<T, Error>,
    ) -> Result<T, Error> {
        let shared = self.runtime.shared();
        let mut running = shared.config.write().unwrap_or_else(|p| p.into_inner());
        let mut config = (**running).clone();
        let got = change(&mut config)?;
        *running = Arc::new(config);
        Ok(got)
    }

    /// The keys, for what the host seals itself.
    pub(crate) fn keyring(&self) -> &crate::Keyring {
        &self.runtime.shared().keyring
    }

    /// The database.
    pub(crate) fn store(&self) -> &Store {
        &self.runtime.shared().store
    }

    /// Waits until every refresh in flight has committed or failed: call it
    /// on SIGTERM before the runtime exits. Calls made meanwhile still run
    /// and are waited for too.
    pub async fn shutdown(&self) {
        self.detached.close();
        self.detached.wait().await;
        self.detached.reopen();
        if let Some(audit) = &self.audit {
            audit.flush(AUDIT_FLUSH_WAIT).await;
        }
    }

    /// Records one audit entry, if this keeper keeps an audit log.
    fn audit<T>(
        &self,
        action: Action,
        provider: &str,
        user_id: &str,
        got: &Result<T, Error>,
        generation: impl FnOnce(&T) -> Option<u64>,
    ) {
        if let Some(audit) = &self.audit {
            let generation = got.as_ref().ok().and_then(generation);
            audit.record(action, provider, user_id, generation, outcome(got));
        }
    }

    /// Audit entries matching `filter`, oldest first: at most `limit`
    /// (capped at [`crate::audit::MAX_PAGE`]) after `filter.after_id`.
    pub async fn audit_page(&self, filter: &Filter, limit: u32) -> Result<Vec<AuditEntry>, Error> {
        let limit = limit.clamp(1, crate::audit::MAX_PAGE);
        Ok(self.runtime.shared().store.audit(filter, limit).await?)
    }

    /// Runs `work` on a tracked task of its own, so that dropping the
    /// caller's future does not cancel it.
    async fn detached<T: Send + 'static>(
        &self,
        work: impl Future<Output = Result<T, Error>> + Send + 'static,
    ) -> Result<T, Error> {
        self.detached
            .spawn(work)
            .await
            .map_err(|_| Error::Sandbox("the call's task panicked".into()))?
    }

    /// What a detached call takes with it.
    fn owned(&self, conversation_id: &str, user_id: &str) -> (Arc<Runtime>, String, String) {
        (
            self.runtime.clone(),
            conversation_id.to_string(),
            user_id.to_string(),
        )
    }

    /// Takes or renews the lease on delivering `webhook`'s events (see
    /// [`crate::events`]): false while another process holds it.
    pub async fn lease_webhook(&self, webhook: &str, holder: &str) -> Result<bool, Error> {
        let store = &self.runtime.shared().store;
        Ok(store
            .lease_webhook(webhook, holder, crate::events::LEASE_SECONDS)
            .await?)
    }

    /// Gives up this holder's lease on `webhook`, if it holds it.
    pub async fn release_webhook(&self, webhook: &str, holder: &str) -> Result<(), Error> {
        let store = &self.runtime.shared().store;
        store
            .lease_webhook(webhook, holder, -crate::events::LEASE_SECONDS)
            .await?;
        Ok(())
    }

    /// The oldest event not yet delivered to `webhook`.
    pub async fn next_event(&self, webhook: &str) -> Result<Option<crate::events::Event>, Error> {
        Ok(self.runtime.shared().store.next_event(webhook).await?)
    }

    /// Records an event as delivered, if `holder` still holds the lease.
    pub async fn mark_delivered(
        &self,
        webhook: &str,
        holder: &str,
        event_id: i64,
    ) -> Result<bool, Error> {
        let store = &self.runtime.shared().store;
        Ok(store.mark_delivered(webhook, holder, event_id).await?)
    }

    /// Events not yet delivered to `webhook`.
    pub async fn pending_events(&self, webhook: &str) -> Result<u64, Error> {
        Ok(self.runtime.shared().store.pending_events(webhook).await?)
    }

    /// Makes `webhook` known: the first time, its deliveries start after
    /// the events written so far.
    pub async fn register_webhook(&self, webhook: &str) -> Result<(), Error> {
        Ok(self
            .runtime
            .shared()
            .store
            .register_webhook(webhook)
            .await?)
    }

    /// Deletes the events written more than `days` ago, and their
    /// deliveries: how many events.
    pub async fn prune_events(&self, days: u32) -> Result<u64, Error> {
        let before = self.now() - i64::from(days) * 86_400;
        Ok(self.runtime.shared().store.prune_events(before).await?)
    }

    /// The states announced for the rows from `first` to `last`.
    pub(crate) async fn announced(
        &self,
        first: &RowKey,
        last: &RowKey,
    ) -> Result<Vec<crate::events::Announced>, Error> {
        Ok(self.runtime.shared().store.announced(first, last).await?)
    }

    /// Announces a state time decided, if the row is as the scan saw it.
    pub(crate) async fn announce(&self, a: &crate::events::Announcement) -> Result<bool, Error> {
        Ok(self.runtime.shared().store.announce(a).await?)
    }

    /// The database connections this process holds, for metrics.
    pub fn pool_use(&self) -> crate::metrics::PoolUse {
        self.runtime.shared().store.pool_use()
    }

    /// How many grants the grant cache holds; none without a cache.
    pub fn cached_grants(&self) -> Option<usize> {
        self.runtime.shared().store.grant_cache().map(|c| c.len())
    }

    /// One round trip to the database (a point read of a row that cannot
    /// exist: provider names are never empty): a readiness probe.
    pub async fn check_database(&self) -> Result<(), Error> {
        self.runtime.shared().store.read("", "").await?;
        Ok(())
    }

    /// The shared time (the database's clock), seconds since the epoch.
    pub fn now(&self) -> i64 {
        self.runtime.shared().store.now()
    }

    /// The proof keys this process opened, and providers' DPoP nonces.
    pub(crate) fn proof_keys(&self) -> &crate::dpop::ProofKeys {
        &self.runtime.shared().proof_keys
    }

    /// The kept-alive connections to providers, for the host's own requests.
    pub(crate) fn connections(&self) -> &crate::provider_connections::ProviderConnections {
        &self.runtime.shared().connections
    }

    /// Runs one export about one row.
    async fn on_row<T, F>(
        &self,
        provider: &str,
        user_id: &str,
        f: F,
    ) -> Result<(T, KeeperCtx), Error>
    where
        F: AsyncFnOnce(&KeeperCore, &mut wasmtime::Store<State>) -> wasmtime::Result<T>,
    {
        self.runtime.call(Scope::row(provider, user_id), 1, f).await
    }

    /// Seals and stores a provider's tokens for a user, replacing older ones.
    pub async fn store_tokens(
        &self,
        provider: &str,
        user_id: &str,
        tokens: &TokenSet,
    ) -> Result<TokenRecord, Error> {
        let got = self.store_tokens_unaudited(provider, user_id, tokens).await;
        self.audit(Action::Store, provider, user_id, &got, |r| {
            Some(r.generation)
        });
        got
    }

    async fn store_tokens_unaudited(
        &self,
        provider: &str,
        user_id: &str,
        tokens: &TokenSet,
    ) -> Result<TokenRecord, Error> {
        let input = convert::tokens_to_wit(tokens);
        let (r, ctx) = self
            .runtime
            .call(Scope::writable_row(provider, user_id), 1, async |k, s| {
                k.tokenkeep_oauth_token_store()
                    .call_store_tokens(s, provider, user_id, &input)
                    .await
            })
            .await?;
        let record = r.map_err(|e| refresh_error(&ctx, e, provider, user_id))?;
        // What was stored is what was given: nothing else comes back.
        let (got, given) = (&record.tokens, &input);
        if (
            &got.access_token,
            &got.refresh_token,
            got.access_token_expires_at,
            got.refresh_token_expires_at,
            &got.scopes,
        ) != (
            &given.access_token,
            &given.refresh_token,
            given.access_token_expires_at,
            given.refresh_token_expires_at,
            &given.scopes,
        ) {
            return Err(not_the_rows());
        }
        checked_record(record, &ctx, provider, user_id)
    }

    /// Loads a user's tokens, the refresh token included (the seed's explicit
    /// API; runtimes want [`Keeper::ensure_fresh`]); with `for_update`, after
    /// any refresh in flight.
    pub async fn load_tokens(
        &self,
        provider: &str,
        user_id: &str,
        for_update: bool,
    ) -> Result<Option<TokenRecord>, Error> {
        let (r, ctx) = self
            .on_row(provider, user_id, async |k, s| {
                k.tokenkeep_oauth_token_store()
                    .call_load_tokens(s, provider, user_id, for_update)
                    .await
            })
            .await?;
        r.map_err(|e| refresh_error(&ctx, e, provider, user_id))?
            .map(|record| checked_record(record, &ctx, provider, user_id))
            .transpose()
    }

    /// An access token valid beyond its refresh window, refreshed first if
    /// needed; one provider call however many runtimes ask. The refresh
    /// token stays in the keeper.
    pub async fn ensure_fresh(&self, provider: &str, user_id: &str) -> Result<AccessGrant, Error> {
        self.ensure_fresh_for(provider, user_id, 0).await
    }

    /// [`Keeper::ensure_fresh`] for a caller that needs the token to stay
    /// valid for `min_remaining` seconds more: refreshed first when it would
    /// not. A minimum longer than the token's whole lifetime is
    /// [`Error::InvalidInput`].
    pub async fn ensure_fresh_for(
        &self,
        provider: &str,
        user_id: &str,
        min_remaining: u32,
    ) -> Result<AccessGrant, Error> {
        // The configuration once per read: its threshold for the cache, its
        // names for the metrics label.
        let mut config = self.config();
        // An MCP server's provider that another process registered since
        // this one started.
        if config
            .providers
            .get(provider)
            .is_some_and(|p| p.mcp_url.is_some() && p.registration.is_none())
            && let Ok(Some(_)) = self.load_registration(provider).await
        {
            config = self.config();
        }
        let configured = config.providers.get(provider);
        let threshold = configured.map(|p| p.refresh_threshold_seconds);
        let mut got = self
            .fresh_for(provider, user_id, min_remaining, threshold)
            .await;
        // A token exchange whose subject token (the user's at the subject
        // provider) is not valid right now: that token made fresh first,
        // then once more. Only then, so that a valid exchanged token is
        // served whatever becomes of the subject's refresh.
        if let Some(subject) = configured.and_then(|p| p.subject_provider.as_deref())
            && matches!(got, Err(Error::EgressDenied(_) | Error::NotFound { .. }))
        {
            got = match Box::pin(self.ensure_fresh(subject, user_id)).await {
                Ok(_) => {
                    self.fresh_for(provider, user_id, min_remaining, threshold)
                        .await
                }
                Err(e) => Err(e),
            };
        }
        // A host grant's first token is got on first demand. Callers that
        // race for it may each get one (harmless: nothing is spent);
        // renewals from then on are single-flight.
        if matches!(got, Err(Error::NotFound { .. }))
            && configured.is_some_and(|p| p.grant.is_host_grant())
        {
            got = match self.obtain_host_grant(provider, user_id).await {
                Ok(_) => {
                    self.fresh_for(provider, user_id, min_remaining, threshold)
                        .await
                }
                Err(e) => Err(e),
            };
        }
        let label = if threshold.is_some() {
            provider
        } else {
            "unknown"
        };
        crate::metrics::read(label, outcome(&got));
        self.audit(Action::Read, provider, user_id, &got, |g| {
            Some(g.generation)
        });
        got
    }

    /// [`Keeper::ensure_fresh_for`] from the cache, or the database.
    async fn fresh_for(
        &self,
        provider: &str,
        user_id: &str,
        min_remaining: u32,
        threshold: Option<u32>,
    ) -> Result<AccessGrant, Error> {
        let shared = self.runtime.shared();
        let Some(cache) = shared.store.grant_cache() else {
            return self
                .ensure_fresh_shared(provider, user_id, min_remaining)
                .await;
        };
        let now = shared.store.now();
        if let Some(threshold) = threshold
            && let Some(grant) = cache.get(provider, user_id, now, threshold)
            && grant
                .expires_at
                .is_none_or(|at| at.saturating_sub(now) >= i64::from(min_remaining))
        {
            return Ok(grant);
        }
        self.ensure_fresh_shared(provider, user_id, min_remaining)
            .await
    }

    /// [`Keeper::ensure_fresh_for`] from the database, one call per row in
    /// flight: a caller joins the call in flight for its row, and if that
    /// call's answer (made for another caller's minimum) falls short of its
    /// own, it starts or joins the next one, a few times at most, then
    /// calls on its own.
    async fn ensure_fresh_shared(
        &self,
        provider: &str,
        user_id: &str,
        min_remaining: u32,
    ) -> Result<AccessGrant, Error> {
        self.prepare_proof_keys(&[(provider, user_id)]).await;
        let row = RowKey {
            provider: provider.to_string(),
            user_id: user_id.to_string(),
        };
        for _ in 0..FLIGHTS_JOINED {
            let (got, asked) = self.fly(&row, min_remaining).await;
            let now = self.runtime.shared().store.now();
            match got {
                Ok(g)
                    if g.expires_at
                        .is_some_and(|at| at.saturating_sub(now) < i64::from(min_remaining)) => {}
                // A failure of a call that asked for more than this caller
                // does (a token still good enough for it may be served).
                Err(_) if asked > min_remaining => {}
                other => return other,
            }
        }
        // Detached like a flight: a caller that stops waiting never cancels
        // a refresh between the provider's answer and the commit.
        let (runtime, provider, user_id) = self.owned(provider, user_id);
        let audit = self.audit.clone();
        let caller = crate::audit::current_caller();
        self.detached(async move {
            let (got, refreshed) =
                ensure_fresh_once(&runtime, &provider, &user_id, min_remaining).await;
            if refreshed {
                record_refresh(audit.as_ref(), caller, &provider, &user_id, &got);
            }
            got
        })
        .await
    }

    /// Joins the call in flight for `row`, or starts one for
    /// `min_remaining`: its answer.
    async fn fly(&self, row: &RowKey, min_remaining: u32) -> (Result<AccessGrant, Error>, u32) {
        let key = row.clone();
        let (mut flight, asked) = {
            let mut map = flights(&self.flights);
            match map.get(&key) {
                Some((flight, asked)) => (flight.clone(), *asked),
                None => {
                    let (answer, flight) = watch::channel(None);
                    map.insert(key.clone(), (flight.clone(), min_remaining));
                    let landing = Landing {
                        flights: self.flights.clone(),
                        key,
                        flight: flight.clone(),
                    };
                    let runtime = self.runtime.clone();
                    // The refresh is this caller's, though others share it.
                    let audit = self
                        .audit
                        .clone()
                        .map(|log| (log, crate::audit::current_caller()));
                    self.detached.spawn(async move {
                        let row = &landing.key;
                        // Taken before the read: the fill is dropped if any
                        // row changed meanwhile.
                        let cache = runtime.shared().store.grant_cache();
                        let epoch = cache.map(|c| c.epoch());
                        let (got, refreshed) =
                            ensure_fresh_once(&runtime, &row.provider, &row.user_id, min_remaining)
                                .await;
                        if refreshed {
                            let (log, caller) = audit.map_or((None, None), |(l, c)| (Some(l), c));
                            record_refresh(log.as_ref(), caller, &row.provider, &row.user_id, &got);
                        }
                        if let (Some(cache), Some(epoch), Ok(grant)) = (cache, epoch, &got) {
                            cache.fill(epoch, grant);
                        }
                        // Later callers start a flight of their own: this
                        // answer may be older than what they ask for.
                        drop(landing);
                        answer.send_replace(Some(got));
                    });
                    (flight, min_remaining)
                }
            }
        };
        let got = match flight.wait_for(Option::is_some).await {
            Ok(landed) => match &*landed {
                Some(got) => got.clone(),
                None => Err(Error::Sandbox(
                    "the call's task ended without an answer".into(),
                )),
            },
            Err(_) => Err(Error::Sandbox("the call's task panicked".into())),
        };
        (got, asked)
    }

    /// Deletes a user's tokens; false when there were none.
    pub async fn delete_tokens(&self, provider: &str, user_id: &str) -> Result<bool, Error> {
        let got = self.delete_tokens_unaudited(provider, user_id).await;
        let got_audited = match &got {
            Ok(false) => Err(Error::NotFound {
                provider: provider.into(),
                user_id: user_id.into(),
            }),
            other => other.clone(),
        };
        self.audit(Action::Delete, provider, user_id, &got_audited, |_| None);
        got
    }

    async fn delete_tokens_unaudited(&self, provider: &str, user_id: &str) -> Result<bool, Error> {
        let (r, ctx) = self
            .runtime
            .call(Scope::writable_row(provider, user_id), 1, async |k, s| {
                k.tokenkeep_oauth_token_store()
                    .call_delete_tokens(s, provider, user_id)
                    .await
            })
            .await?;
        r.map_err(|e| refresh_error(&ctx, e, provider, user_id))
    }

    /// Every stored token, without secrets: [`Keeper::list_tokens_page`]
    /// until the last page. Listings of many rows are better streamed page
    /// by page.
    pub async fn list_tokens(&self) -> Result<Vec<TokenSummary>, Error> {
        let mut all: Vec<TokenSummary> = Vec::new();
        loop {
            let after = all.last().map(summary_key);
            let page = self.list_tokens_page(after, LIST_PAGE).await?;
            let last = page.len() < LIST_PAGE as usize;
            all.extend(page);
            if last {
                return Ok(all);
            }
        }
    }

    /// One page of stored tokens, without secrets: at most `limit` (capped at
    /// the component's page size) after `after`, ordered by provider then
    /// user id. A page shorter than `limit` is the last.
    pub async fn list_tokens_page(
        &self,
        after: Option<RowKey>,
        limit: u32,
    ) -> Result<Vec<TokenSummary>, Error> {
        let limit = limit.clamp(1, LIST_PAGE);
        let cursor = after.as_ref().map(|k| wit::RowKey {
            provider: k.provider.clone(),
            user_id: k.user_id.clone(),
        });
        let scope = Scope::Listing {
            after: after.clone(),
            limit,
        };
        // Fuel and time by the hundred rows.
        let units = limit.div_ceil(100) as usize;
        let (r, ctx) = self
            .runtime
            .call(scope, units, async |k, s| {
                k.tokenkeep_oauth_token_store()
                    .call_list_tokens(s, cursor.as_ref(), limit)
                    .await
            })
            .await?;
        let page = r.map_err(|e| refresh_error(&ctx, e, "", ""))?;
        // No more than asked for, none twice, and not the cursor again. (The
        // order is the database's collation, which Rust's byte order need
        // not match.)
        let mut seen = std::collections::HashSet::new();
        if page.len() > limit as usize
            || !page.iter().all(|s| {
                let key = (s.provider.as_str(), s.user_id.as_str());
                let cursor = after
                    .as_ref()
                    .map(|a| (a.provider.as_str(), a.user_id.as_str()));
                Some(key) != cursor && seen.insert(key)
            })
        {
            return Err(not_the_rows());
        }
        Ok(page)
    }

    /// One stored token's summary, without secrets; `None` when there is none.
    pub async fn token_summary(
        &self,
        provider: &str,
        user_id: &str,
    ) -> Result<Option<TokenSummary>, Error> {
        let key = RowKey {
            provider: provider.to_string(),
            user_id: user_id.to_string(),
        };
        let (r, ctx) = self
            .runtime
            .call(Scope::Summary(key), 1, async |k, s| {
                k.tokenkeep_oauth_token_store()
                    .call_list_tokens(s, None, 1)
                    .await
            })
            .await?;
        let mut page = r.map_err(|e| refresh_error(&ctx, e, provider, user_id))?;
        match page.pop() {
            None => Ok(None),
            Some(s) if page.is_empty() && s.provider == provider && s.user_id == user_id => {
                Ok(Some(s))
            }
            Some(_) => Err(not_the_rows()),
        }
    }

    /// Re-encrypts every row sealed with an older key to the active key, in
    /// batches of `batch` rows, each row in its own short transaction. Safe to
    /// interrupt and rerun; readers never wait. Keys are the host's business,
    /// so this runs in the host, not the component.
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
                None => break,
            }
        }
        // The rows' proof keys (DPoP), sealed with the same keys.
        let keys = self.reseal_proof_keys(batch).await?;
        total.examined += keys.examined;
        total.resealed += keys.resealed;
        total.undecryptable.extend(keys.undecryptable);
        Ok(total)
    }

    /// One batch of [`Keeper::rotate_keys`]: rows after `after`, at most `limit`.
    pub async fn reseal_batch(
        &self,
        after: Option<(String, String)>,
        limit: u32,
    ) -> Result<(Rotation, Option<(String, String)>), Error> {
        let shared = self.runtime.shared();
        let limit = limit.clamp(1, 10_000);
        let cursor = after.map(|(provider, user_id)| RowKey { provider, user_id });
        let rows = shared.store.list(cursor.as_ref(), limit).await?;
        let active = shared.keyring.active_id();
        let mut rotation = Rotation {
            examined: rows.len() as u64,
            ..Default::default()
        };
        let next = (rows.len() == limit as usize)
            .then(|| rows.last().map(|r| (r.provider.clone(), r.user_id.clone())))
            .flatten();
        for listed in rows.iter().filter(|r| r.key_id != active) {
            let mut txn = shared.store.begin().await?;
            // Look again under the lock: a refresh may have resealed it already.
            let Some(row) = txn
                .load_for_update(&listed.provider, &listed.user_id)
                .await?
                .row
            else {
                continue;
            };
            if row.key_id == active {
                continue;
            }
            let Ok(resealed) = shared.keyring.reseal_row(&row) else {
                rotation
                    .undecryptable
                    .push((row.provider.clone(), row.user_id.clone()));
                continue;
            };
            if txn.compare_and_set(&resealed, row.generation).await? {
                txn.commit().await?;
                rotation.resealed += 1;
            }
        }
        Ok((rotation, next))
    }

    /// Row counts per key id.
    pub async fn key_status(&self) -> Result<KeyStatus, Error> {
        let shared = self.runtime.shared();
        let mut status = KeyStatus {
            active: shared.keyring.active_id().to_string(),
            ..Default::default()
        };
        status.rows_per_key = shared.store.rows_per_key().await?.into_iter().collect();
        status.missing_keys = status
            .rows_per_key
            .keys()
            .filter(|id| shared.keyring.key(id).is_none())
            .cloned()
            .collect();
        Ok(status)
    }

    /// The seed's `refresh_provider_tokens`: a refreshed copy of `settings`
    /// (which is only borrowed, so a runtime holding it keeps working),
    /// persisted for the conversation. The copy carries access tokens only:
    /// refresh tokens handed in seed the keeper and stay there. One provider
    /// that cannot be refreshed fails the call with an error naming it.
    pub async fn refresh_provider_tokens(
        &self,
        settings: &ConversationSettings,
        conversation_id: &str,
        user_id: &str,
    ) -> Result<ConversationSettings, ConversationError> {
        self.prepare_proof_keys(&settings.rows(user_id)).await;
        let input = settings.to_wit();
        let scope = conversation_scope(conversation_id, settings, user_id);
        let (runtime, conversation, user) = self.owned(conversation_id, user_id);
        let (r, ctx) = self
            .detached(async move {
                runtime
                    .call(scope, input.provider_tokens.len(), async |k, s| {
                        k.tokenkeep_oauth_conversations()
                            .call_refresh_provider_tokens(s, &input, &conversation, &user)
                            .await
                    })
                    .await
            })
            .await
            .map_err(ConversationError::whole)?;
        let got = r
            .map_err(|f| failure_from_wit(&ctx, f, user_id))
            .and_then(|out| {
                checked_settings(out, &ctx, settings).map_err(ConversationError::whole)
            });
        match &got {
            Ok(out) => self.conversation_done(&ctx, &[], &handed(out, |_| user_id)),
            Err(e) => self.conversation_done(&ctx, &[(e.provider.clone(), e.error.class())], &[]),
        }
        got
    }

    /// A provider's name as a metrics label: a configured one, or
    /// `unknown` (a label per name a caller makes up would grow without
    /// bound).
    fn provider_label<'a>(&self, provider: &'a str) -> &'a str {
        if self.config().providers.contains_key(provider) {
            provider
        } else {
            "unknown"
        }
    }

    /// Counts and records what a conversation call did: its refreshes (each
    /// with the failure of its provider, if `failed` names one, else `ok`),
    /// and the access tokens it handed out, by (provider, user id).
    fn conversation_done(
        &self,
        ctx: &KeeperCtx,
        failed: &[(String, &'static str)],
        handed: &[(String, String)],
    ) {
        for row in ctx.refreshed() {
            let outcome = failed
                .iter()
                .find(|(p, _)| *p == row.provider || p.is_empty())
                .map_or("ok", |(_, class)| *class);
            crate::metrics::refresh(self.provider_label(&row.provider), outcome);
            if let Some(audit) = &self.audit {
                audit.record(Action::Refresh, &row.provider, &row.user_id, None, outcome);
            }
        }
        for (provider, user_id) in handed {
            crate::metrics::read(self.provider_label(provider), "ok");
            if let Some(audit) = &self.audit {
                audit.record(Action::Read, provider, user_id, None, "ok");
            }
        }
    }

    /// Like [`Keeper::refresh_provider_tokens`], but keeps going past failures
    /// and lists them, for callers that asked for partial results.
    pub async fn refresh_provider_tokens_partial(
        &self,
        settings: &ConversationSettings,
        conversation_id: &str,
        user_id: &str,
    ) -> Result<PartialRefresh, Error> {
        self.prepare_proof_keys(&settings.rows(user_id)).await;
        let input = settings.to_wit();
        let scope = conversation_scope(conversation_id, settings, user_id);
        let (runtime, conversation, user) = self.owned(conversation_id, user_id);
        let (r, ctx) = self
            .detached(async move {
                runtime
                    .call(scope, input.provider_tokens.len(), async |k, s| {
                        k.tokenkeep_oauth_conversations()
                            .call_refresh_provider_tokens_partial(s, &input, &conversation, &user)
                            .await
                    })
                    .await
            })
            .await?;
        let partial = PartialRefresh {
            settings: checked_settings(r.settings, &ctx, settings)?,
            failures: r
                .failures
                .into_iter()
                .map(|f| failure_from_wit(&ctx, f, user_id))
                .collect(),
        };
        let failed: Vec<(String, &'static str)> = partial
            .failures
            .iter()
            .map(|f| (f.provider.clone(), f.error.class()))
            .collect();
        self.conversation_done(&ctx, &failed, &handed(&partial.settings, |_| user_id));
        Ok(partial)
    }

    /// A conversation's persisted settings, refreshed first; `None` for a
    /// conversation never seen. For a runtime that resumes or replays it.
    pub async fn resume(
        &self,
        conversation_id: &str,
    ) -> Result<Option<ConversationSettings>, ConversationError> {
        // The rows it may touch are the ones the conversation names.
        let entries = self
            .runtime
            .shared()
            .store
            .conversation_entries(conversation_id)
            .await
            .map_err(|e| ConversationError::whole(e.into()))?;
        let resumed: Vec<(String, String)> = entries
            .iter()
            .map(|e| (e.provider.clone(), e.user_id.clone()))
            .collect();
        let rows: Vec<(&str, &str)> = resumed
            .iter()
            .map(|(p, u)| (p.as_str(), u.as_str()))
            .collect();
        self.prepare_proof_keys(&rows).await;
        let scope = Scope::Rows {
            rows: entries
                .iter()
                .map(|e| RowKey {
                    provider: e.provider.clone(),
                    user_id: e.user_id.clone(),
                })
                .collect(),
            conversation: Some(conversation_id.to_string()),
            writes: false,
        };
        let (runtime, conversation, _) = self.owned(conversation_id, "");
        let (r, ctx) = self
            .detached(async move {
                runtime
                    .call(scope, entries.len(), async |k, s| {
                        k.tokenkeep_oauth_conversations()
                            .call_resume(s, &conversation)
                            .await
                    })
                    .await
            })
            .await
            .map_err(ConversationError::whole)?;
        let got = r
            .map_err(|f| failure_from_wit(&ctx, f, ""))
            .and_then(|out| {
                out.map(|out| {
                    checked_settings(out, &ctx, &ConversationSettings::default())
                        .map_err(ConversationError::whole)
                })
                .transpose()
            });
        match &got {
            Ok(Some(out)) => {
                let user_of = |provider: &str| {
                    resumed
                        .iter()
                        .find(|(p, _)| p == provider)
                        .map_or("", |(_, u)| u.as_str())
                };
                self.conversation_done(&ctx, &[], &handed(out, user_of));
            }
            Ok(None) => {}
            Err(e) => self.conversation_done(&ctx, &[(e.provider.clone(), e.error.class())], &[]),
        }
        got
    }

    /// What is persisted for a conversation, without secrets.
    pub async fn conversation_entries(
        &self,
        conversation_id: &str,
    ) -> Result<Vec<ConversationEntry>, Error> {
        let scope = Scope::Rows {
            rows: Vec::new(),
            conversation: Some(conversation_id.to_string()),
            writes: false,
        };
        let (r, ctx) = self
            .runtime
            .call(scope, 1, async |k, s| {
                k.tokenkeep_oauth_conversations()
                    .call_entries(s, conversation_id)
                    .await
            })
            .await?;
        r.map(|v| v.into_iter().map(convert::entry_from_wit).collect())
            .map_err(|e| refresh_error(&ctx, e, "", ""))
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

    /// The seed's `is_access_token_valid`, evaluated by the component on the
    /// shared clock.
    pub async fn is_access_token_valid(
        &self,
        record: &TokenRecord,
        clock_skew_seconds: u32,
    ) -> Result<bool, Error> {
        let record = record_to_wit(record);
        let (valid, _) = self
            .runtime
            .call(Scope::Nothing, 1, async |k, s| {
                k.tokenkeep_oauth_token_store()
                    .call_is_access_token_valid(s, &record, clock_skew_seconds)
                    .await
            })
            .await?;
        Ok(valid)
    }

    /// The seed's `is_refresh_token_valid`, evaluated by the component on the
    /// shared clock.
    pub async fn is_refresh_token_valid(&self, record: &TokenRecord) -> Result<bool, Error> {
        let record = record_to_wit(record);
        let (valid, _) = self
            .runtime
            .call(Scope::Nothing, 1, async |k, s| {
                k.tokenkeep_oauth_token_store()
                    .call_is_refresh_token_valid(s, &record)
                    .await
            })
            .await?;
        Ok(valid)
    }

    /// Where `record` stands now on the shared clock, given its provider's
    /// refresh threshold (WIT `classify`).
    pub async fn classify(
        &self,
        record: &TokenRecord,
        refresh_threshold_seconds: u32,
    ) -> Result<TokenState, Error> {
        let record = record_to_wit(record);
        let (state, _) = self
            .runtime
            .call(Scope::Nothing, 1, async |k, s| {
                k.tokenkeep_oauth_token_store()
                    .call_classify(s, &record, refresh_threshold_seconds)
                    .await
            })
            .await?;
        Ok(state)
    }
}

/// One `ensure-fresh-for` call into the component, its answer checked, and
/// whether it asked the provider.
async fn ensure_fresh_once(
    runtime: &Runtime,
    provider: &str,
    user_id: &str,
    min_remaining: u32,
) -> (Result<AccessGrant, Error>, bool) {
    let called = runtime
        .call(Scope::row(provider, user_id), 1, async |k, s| {
            k.tokenkeep_oauth_token_store()
                .call_ensure_fresh_for(s, provider, user_id, min_remaining)
                .await
        })
        .await;
    match called {
        Ok((r, ctx)) => {
            let refreshed = ctx.refreshed().next().is_some();
            (checked_grant(r, &ctx, provider, user_id), refreshed)
        }
        Err(e) => (Err(e), false),
    }
}

fn checked_grant(
    r: Result<wit::AccessGrant, wit::RefreshError>,
    ctx: &KeeperCtx,
    provider: &str,
    user_id: &str,
) -> Result<AccessGrant, Error> {
    let g = r.map_err(|e| refresh_error(ctx, e, provider, user_id))?;
    if g.provider != provider
        || g.user_id != user_id
        || !ctx.vouches_for(provider, Some(user_id), &g.access_token)
        || !ctx.saw_scopes(provider, Some(user_id), &g.scopes)
    {
        return Err(not_the_rows());
    }
    Ok(AccessGrant {
        provider: g.provider,
        user_id: g.user_id,
        access_token: g.access_token.into(),
        expires_at: g.expires_at,
        scopes: g.scopes,
        obtained_at: g.obtained_at,
        generation: g.generation,
    })
}

/// The (provider, user id) of each token a conversation call handed out.
fn handed<'a>(
    settings: &ConversationSettings,
    user_of: impl Fn(&str) -> &'a str,
) -> Vec<(String, String)> {
    settings
        .provider_tokens
        .iter()
        .map(|t| (t.provider.clone(), user_of(&t.provider).to_string()))
        .collect()
}

/// Counts a refresh, and records it for `caller` when there is a log.
fn record_refresh(
    audit: Option<&AuditLog>,
    caller: Option<Arc<str>>,
    provider: &str,
    user_id: &str,
    got: &Result<AccessGrant, Error>,
) {
    crate::metrics::refresh(provider, outcome(got));
    if let Some(log) = audit {
        log.record_as(
            caller,
            Action::Refresh,
            provider,
            user_id,
            got.as_ref().ok().map(|g| g.generation),
            outcome(got),
        );
    }
}

/// A call's outcome as the audit log and the metrics name it.
fn outcome<T>(got: &Result<T, Error>) -> &'static str {
    match got {
        Ok(_) => "ok",
        Err(e) => e.class(),
    }
}

/// The rows a conversation call may touch: each provider's row of `user_id`.
fn conversation_scope(
    conversation_id: &str,
    settings: &ConversationSettings,
    user_id: &str,
) -> Scope {
    Scope::Rows {
        rows: settings
            .provider_tokens
            .iter()
            .map(|t| RowKey {
                provider: t.provider.clone(),
                user_id: user_id.to_string(),
            })
            .collect(),
        conversation: Some(conversation_id.to_string()),
        // A token the keeper has never seen seeds its row.
        writes: true,
    }
}

/// Rows per component call when listing: the component's largest page.
const LIST_PAGE: u32 = tokenkeep_core::refresh::MAX_LIST_PAGE;

/// The documented name of a class as listings carry it.
pub fn error_class_name(class: wit::ErrorClass) -> &'static str {
    convert::class_from_wit(class).name()
}

/// The documented name of a token state as listings carry it.
pub fn token_state_name(s: TokenState) -> &'static str {
    match s {
        TokenState::Fresh => "fresh",
        TokenState::RefreshDue => "refresh-due",
        TokenState::RefreshTokenExpiring => "refresh-token-expiring",
        TokenState::ReauthorizationRequired => "reauthorization-required",
        TokenState::ScopeNarrowed => "scope-narrowed",
    }
}

/// The row a summary describes: the cursor of the next page after it.
pub fn summary_key(s: &TokenSummary) -> RowKey {
    RowKey {
        provider: s.provider.clone(),
        user_id: s.user_id.clone(),
    }
}

/// An access token as the API and `tokens get --dpop` hand it out: the
/// access token, so the value is a secret to its holder.
pub fn grant_json(g: &AccessGrant) -> serde_json::Value {
    serde_json::json!({
        "provider": g.provider,
        "user_id": g.user_id,
        "access_token": g.access_token.expose_secret(),
        "expires_at": g.expires_at,
        "scopes": g.scopes,
        "obtained_at": g.obtained_at,
        "generation": g.generation,
    })
}

/// A token's summary as JSON listings (`tokens list --json`, the API) carry
/// it: never a secret.
pub fn summary_json(s: &TokenSummary) -> serde_json::Value {
    serde_json::json!({
        "provider": s.provider,
        "user_id": s.user_id,
        "state": token_state_name(s.state),
        "access_token_expires_at": s.access_token_expires_at,
        "refresh_token_expires_at": s.refresh_token_expires_at,
        "has_refresh_token": s.has_refresh_token,
        "scopes": s.scopes,
        "baseline_scopes": s.baseline_scopes,
        "obtained_at": s.obtained_at,
        "generation": s.generation,
        "key_id": s.key_id,
        "failed_attempts": s.health.failed_attempts,
        "last_failure": s.health.last_failure.map(error_class_name),
        "last_failure_at": s.health.last_failure_at,
        "last_success_at": s.health.last_success_at,
        "retry_not_before": s.health.retry_not_before,
    })
}

/// The component returned a token this call never opened or sealed for the
/// row it was asked about.
fn not_the_rows() -> Error {
    Error::Sandbox("the component returned a token that is not the requested row's".into())
}

fn checked_record(
    r: wit::TokenRecord,
    ctx: &KeeperCtx,
    provider: &str,
    user_id: &str,
) -> Result<TokenRecord, Error> {
    if r.provider != provider
        || r.user_id != user_id
        || !ctx.vouches_for(provider, Some(user_id), &r.tokens.access_token)
    {
        return Err(not_the_rows());
    }
    Ok(TokenRecord {
        provider: r.provider,
        user_id: r.user_id,
        health: convert::health_from_wit(&r.health),
        tokens: convert::tokens_from_wit(r.tokens),
        obtained_at: r.obtained_at,
        generation: r.generation,
    })
}

/// Settings the component returned: each token is one it opened or sealed
/// for that provider in this call, or one the caller handed in; none
/// carries a refresh token.
fn checked_settings(
    out: wit::ConversationSettings,
    ctx: &KeeperCtx,
    input: &ConversationSettings,
) -> Result<ConversationSettings, Error> {
    for t in &out.provider_tokens {
        let handed_in = input
            .provider_tokens
            .iter()
            .any(|i| i.provider == t.provider && i.access_token.expose_secret() == t.access_token);
        if t.refresh_token.is_some()
            || !(handed_in || ctx.vouches_for(&t.provider, None, &t.access_token))
            || t.scopes.iter().any(|s| ctx.leaks(s))
        {
            return Err(not_the_rows());
        }
    }
    Ok(ConversationSettings::from_wit(out))
}

fn record_to_wit(r: &TokenRecord) -> wit::TokenRecord {
    wit::TokenRecord {
        provider: r.provider.clone(),
        user_id: r.user_id.clone(),
        tokens: convert::tokens_to_wit(&r.tokens),
        obtained_at: r.obtained_at,
        generation: r.generation,
        health: convert::health_to_wit(&r.health),
    }
}

fn failure_from_wit(ctx: &KeeperCtx, f: wit::ProviderFailure, user_id: &str) -> ConversationError {
    if !f.provider.is_empty() && !ctx.is_about(&f.provider) {
        return ConversationError::whole(Error::Sandbox(
            "the component named a provider the call is not about".into(),
        ));
    }
    let error = refresh_error(ctx, f.error, &f.provider, user_id);
    ConversationError {
        provider: f.provider,
        error,
    }
}

/// Longest message of the component's that the host passes on.
const MAX_GUEST_MESSAGE: usize = 200;

/// The component's words, as the host passes them on: one line of
/// printable ASCII, bounded.
fn tidy(m: String) -> String {
    let mut m: String = m
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                '?'
            }
        })
        .collect();
    if m.len() > MAX_GUEST_MESSAGE {
        m.truncate(MAX_GUEST_MESSAGE);
        m.push_str("...");
    }
    m
}

/// The host's error for the component's `refresh-error`: messages tidied,
/// and none that quotes a refresh token the call saw.
fn refresh_error(ctx: &KeeperCtx, e: wit::RefreshError, provider: &str, user_id: &str) -> Error {
    use wit::RefreshError as W;
    if ctx.leaks(&format!("{e:?}")) {
        return Error::Sandbox("the component's error quoted a refresh token".into());
    }
    if let W::ScopeMismatch(missing) = &e
        && !ctx.saw_each_scope(Some(provider).filter(|p| !p.is_empty()), missing)
    {
        return Error::Sandbox("the component named scopes the row never had".into());
    }
    let e = match e {
        W::NotFound => RefreshError::NotFound,
        W::ReauthorizationRequired(m) => RefreshError::ReauthorizationRequired(tidy(m)),
        W::ProviderUnavailable(m) => RefreshError::ProviderUnavailable(tidy(m)),
        W::ProviderRejectedClient(m) => RefreshError::ProviderRejectedClient(tidy(m)),
        W::ScopeMismatch(m) => {
            RefreshError::ScopeMismatch(m.into_iter().take(64).map(tidy).collect())
        }
        W::LockTimeout => RefreshError::LockTimeout,
        W::Storage(m) => RefreshError::Storage(tidy(m)),
        W::Decryption(m) => RefreshError::Decryption(tidy(m)),
        W::InvalidProviderResponse(m) => RefreshError::InvalidProviderResponse(tidy(m)),
        W::UnknownProvider(m) => RefreshError::UnknownProvider(tidy(m)),
        W::InvalidInput(m) => RefreshError::InvalidInput(tidy(m)),
        W::EgressDenied(m) => RefreshError::EgressDenied(tidy(m)),
        W::Configuration(m) => RefreshError::Configuration(tidy(m)),
    };
    Error::from_refresh(e, provider, user_id)
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
            health: Health::default(),
        };
        let grant = AccessGrant {
            provider: "github".into(),
            user_id: "alice".into(),
            access_token: "gho_SECRETGRANT".to_string().into(),
            expires_at: None,
            scopes: vec![],
            obtained_at: 0,
            generation: 1,
        };
        let debug = format!("{record:?} {:?} {grant:?}", record.tokens);
        assert!(!debug.contains("SECRET"), "{debug}");
        assert!(debug.contains("REDACTED"), "{debug}");
    }
}
