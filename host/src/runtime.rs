//! The sandbox: one engine and one pre-linked component per process, a fresh
//! store per call, bounded in memory and time, with the imports implemented
//! over the shared storage, keyring and configuration.

use crate::bindings::KeeperCorePre;
use crate::bindings::tokenkeep::oauth::{keyring, providers, storage, types};
use crate::config::Config;
use crate::egress::Egress;
use crate::error::Error;
use crate::keyring::Keyring;
use crate::storage::{StorageError, Store, TxnSlot};
use secrecy::ExposeSecret;
use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;
use wasmtime::component::{Component, HasSelf, Linker, Resource, ResourceTable};
use wasmtime::{Engine, StoreLimits, StoreLimitsBuilder};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

/// The component built from `component/`, embedded in the binary.
pub static COMPONENT: &[u8] = include_bytes!(env!("TOKENKEEP_COMPONENT_PATH"));

/// Bounds on one call into the component.
#[derive(Debug, Clone, Copy)]
pub struct SandboxLimits {
    /// Linear memory the component may grow to.
    pub memory_bytes: usize,
    /// Fuel per call: wasm instructions the guest may execute (waiting in host
    /// calls for storage or HTTP costs none). A refresh uses well under 1%.
    pub fuel: u64,
}

impl Default for SandboxLimits {
    fn default() -> Self {
        Self {
            memory_bytes: 64 << 20,
            fuel: 2_000_000_000,
        }
    }
}

/// The wall clock the component sees: the system's, or one that tests set
/// and move to check expiry boundaries to the second.
#[derive(Clone, Debug, Default)]
pub enum Clock {
    #[default]
    System,
    Manual(Arc<AtomicI64>),
}

impl Clock {
    /// A clock frozen at `seconds` since the epoch until moved.
    pub fn manual(seconds: i64) -> Self {
        Clock::Manual(Arc::new(AtomicI64::new(seconds)))
    }

    /// Moves a manual clock by `seconds` (no-op on the system clock).
    pub fn advance(&self, seconds: i64) {
        if let Clock::Manual(t) = self {
            t.fetch_add(seconds, Ordering::SeqCst);
        }
    }

    /// Seconds since the epoch.
    pub fn now(&self) -> i64 {
        match self {
            Clock::System => std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or_default(),
            Clock::Manual(t) => t.load(Ordering::SeqCst),
        }
    }
}

impl wasmtime_wasi::HostWallClock for Clock {
    fn resolution(&self) -> Duration {
        match self {
            Clock::System => Duration::from_nanos(1),
            Clock::Manual(_) => Duration::from_secs(1),
        }
    }

    fn now(&self) -> Duration {
        match self {
            Clock::System => std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default(),
            Clock::Manual(t) => Duration::from_secs(t.load(Ordering::SeqCst).max(0) as u64),
        }
    }
}

/// What every store of a process shares.
pub(crate) struct Shared {
    pub store: Store,
    pub config: Arc<Config>,
    pub keyring: Keyring,
    pub clock: Clock,
}

/// The state of one store: one call into the component.
pub(crate) struct State {
    shared: Arc<Shared>,
    wasi: WasiCtx,
    http: WasiHttpCtx,
    table: ResourceTable,
    egress: Egress,
    limits: StoreLimits,
}

impl WasiView for State {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for State {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.egress,
        }
    }
}

/// The compiled, pre-linked component and what its calls need.
pub(crate) struct Runtime {
    engine: Engine,
    pre: KeeperCorePre<State>,
    shared: Arc<Shared>,
    limits: SandboxLimits,
    call_budget: Duration,
}

impl Runtime {
    /// Compiles (or loads from the cache) `wasm`, which must implement the
    /// `keeper-core` world.
    pub fn new(shared: Shared, limits: SandboxLimits, wasm: &[u8]) -> Result<Self, Error> {
        let mut config = wasmtime::Config::new();
        // Fuel, not epochs: epochs tick while the guest waits on a row lock
        // or a provider, and a long lock wait is not runaway guest code.
        config.consume_fuel(true);
        let engine = Engine::new(&config).map_err(sandbox)?;
        let component = load_component(&engine, wasm)?;
        let mut linker: Linker<State> = Linker::new(&engine);
        // Full WASI p2 (a Rust guest's std imports cli/environment, exit, stdio),
        // but without preopened directories or sockets: the context grants none.
        wasmtime_wasi::p2::add_to_linker_async(&mut linker).map_err(sandbox)?;
        wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker).map_err(sandbox)?;
        storage::add_to_linker::<_, HasSelf<State>>(&mut linker, |s| s).map_err(sandbox)?;
        keyring::add_to_linker::<_, HasSelf<State>>(&mut linker, |s| s).map_err(sandbox)?;
        providers::add_to_linker::<_, HasSelf<State>>(&mut linker, |s| s).map_err(sandbox)?;
        types::add_to_linker::<_, HasSelf<State>>(&mut linker, |s| s).map_err(sandbox)?;
        let pre = KeeperCorePre::new(linker.instantiate_pre(&component).map_err(sandbox)?)
            .map_err(sandbox)?;

        // The longest a refresh may talk to its provider, retries included.
        let slowest = shared
            .config
            .providers
            .values()
            .map(|p| p.timeout_ms.max(p.retry_budget_ms))
            .max()
            .unwrap_or(0);
        // Wall-clock bound on one token's worth of work, generous on purpose:
        // cancelling a call between the provider's answer and the commit
        // loses a rotated refresh token. Queueing for a connection (up to two
        // lock waits), the row lock, the provider, the re-read after a
        // refusal (another lock wait), and the writes.
        let call_budget = Duration::from_millis(
            4 * u64::from(shared.config.lock_wait_ms) + u64::from(slowest) + 10_000,
        );
        Ok(Self {
            engine,
            pre,
            shared: Arc::new(shared),
            limits,
            call_budget,
        })
    }

    pub fn shared(&self) -> &Shared {
        &self.shared
    }

    /// Runs `f` against a fresh instance of the component.
    pub async fn call<T, F>(&self, f: F) -> Result<T, Error>
    where
        F: AsyncFnOnce(
            &crate::bindings::KeeperCore,
            &mut wasmtime::Store<State>,
        ) -> wasmtime::Result<T>,
    {
        self.call_scaled(1, f).await
    }

    /// Runs `f`, which may refresh up to `tokens` tokens one after another.
    pub async fn call_scaled<T, F>(&self, tokens: usize, f: F) -> Result<T, Error>
    where
        F: AsyncFnOnce(
            &crate::bindings::KeeperCore,
            &mut wasmtime::Store<State>,
        ) -> wasmtime::Result<T>,
    {
        let budget = self.call_budget * u32::try_from(tokens.max(1)).unwrap_or(u32::MAX);
        let state = State {
            shared: self.shared.clone(),
            wasi: WasiCtx::builder()
                .wall_clock(self.shared.clock.clone())
                .build(),
            http: WasiHttpCtx::new(),
            table: ResourceTable::new(),
            egress: Egress::new(self.shared.config.clone()),
            limits: StoreLimitsBuilder::new()
                .memory_size(self.limits.memory_bytes)
                .instances(16)
                .tables(64)
                .memories(8)
                .trap_on_grow_failure(true)
                .build(),
        };
        let mut store = wasmtime::Store::new(&self.engine, state);
        store.limiter(|s| &mut s.limits);
        store.set_fuel(self.limits.fuel).map_err(sandbox)?;
        let run = async {
            let instance = self.pre.instantiate_async(&mut store).await?;
            f(&instance, &mut store).await
        };
        let outcome = tokio::time::timeout(budget, run).await;
        if let Ok(left) = store.get_fuel() {
            tracing::trace!(fuel_used = self.limits.fuel - left, "component call");
        }
        match outcome {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(trap)) => {
                tracing::error!(error = %trap, "component call failed");
                Err(Error::Sandbox(describe_trap(&trap)))
            }
            Err(_) => Err(Error::Sandbox(format!(
                "call exceeded {} ms",
                budget.as_millis()
            ))),
        }
    }
}

fn describe_trap(e: &wasmtime::Error) -> String {
    match e.downcast_ref::<wasmtime::Trap>() {
        Some(wasmtime::Trap::OutOfFuel) => "guest exceeded its fuel (CPU) budget".into(),
        Some(trap) => format!("guest trapped: {trap}"),
        None => {
            // The outermost message is a backtrace header; the cause says what.
            let mut s = e.root_cause().to_string();
            if s.contains("growing memory") {
                s = format!("guest exceeded its memory limit ({s})");
            }
            s.truncate(200);
            s
        }
    }
}

fn sandbox(e: wasmtime::Error) -> Error {
    Error::Sandbox(e.to_string())
}

/// Compiles the component, or loads the machine code a previous process of
/// the same build cached (compiling costs far more than loading).
fn load_component(engine: &Engine, wasm: &[u8]) -> Result<Component, Error> {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    engine.precompile_compatibility_hash().hash(&mut hasher);
    wasm.hash(&mut hasher);
    let cached = cache_dir().map(|d| d.join(format!("component-{:016x}.cwasm", hasher.finish())));
    if let Some(path) = cached.as_ref().filter(|p| p.exists()) {
        // SAFETY: the file is named by the hash of this engine's settings and
        // of the component's bytes, in a directory only tokenkeep writes.
        match unsafe { Component::deserialize_file(engine, path) } {
            Ok(component) => return Ok(component),
            Err(e) => tracing::warn!(error = %e, "ignoring unreadable component cache"),
        }
    }
    let component = Component::new(engine, wasm).map_err(sandbox)?;
    if let (Some(path), Ok(bytes)) = (cached, component.serialize()) {
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        let written = path
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| std::fs::write(&tmp, bytes))
            .and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(e) = written {
            tracing::debug!(error = %e, "component cache not written");
        }
    }
    Ok(component)
}

fn cache_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("TOKENKEEP_CACHE_DIR") {
        return (!dir.is_empty()).then(|| PathBuf::from(dir));
    }
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .map(|d| d.join("tokenkeep"))
}

fn to_wit(e: StorageError) -> storage::StorageError {
    match e {
        StorageError::LockTimeout => storage::StorageError::LockTimeout,
        StorageError::Unavailable(m) => storage::StorageError::Unavailable(m),
    }
}

impl types::Host for State {}

impl storage::Host for State {
    async fn read(
        &mut self,
        provider: String,
        user_id: String,
    ) -> wasmtime::Result<Result<Option<storage::SealedRow>, storage::StorageError>> {
        Ok(self
            .shared
            .store
            .read(&provider, &user_id)
            .await
            .map_err(to_wit))
    }

    async fn list_rows(
        &mut self,
        after: Option<types::RowKey>,
        limit: u32,
    ) -> wasmtime::Result<Result<Vec<storage::SealedRow>, storage::StorageError>> {
        Ok(self
            .shared
            .store
            .list(after.as_ref(), limit)
            .await
            .map_err(to_wit))
    }

    async fn upsert(
        &mut self,
        row: storage::SealedRow,
    ) -> wasmtime::Result<Result<u64, storage::StorageError>> {
        Ok(self.shared.store.upsert(&row).await.map_err(to_wit))
    }

    async fn insert(
        &mut self,
        row: storage::SealedRow,
    ) -> wasmtime::Result<Result<bool, storage::StorageError>> {
        Ok(self.shared.store.insert(&row).await.map_err(to_wit))
    }

    async fn delete(
        &mut self,
        provider: String,
        user_id: String,
    ) -> wasmtime::Result<Result<bool, storage::StorageError>> {
        Ok(self
            .shared
            .store
            .delete(&provider, &user_id)
            .await
            .map_err(to_wit))
    }

    async fn conversation_entries(
        &mut self,
        conversation_id: String,
    ) -> wasmtime::Result<Result<Vec<types::ConversationEntry>, storage::StorageError>> {
        Ok(self
            .shared
            .store
            .conversation_entries(&conversation_id)
            .await
            .map_err(to_wit))
    }

    async fn put_conversation_entry(
        &mut self,
        entry: types::ConversationEntry,
    ) -> wasmtime::Result<Result<(), storage::StorageError>> {
        Ok(self
            .shared
            .store
            .put_conversation_entry(&entry)
            .await
            .map_err(to_wit))
    }

    async fn record_refresh_start(
        &mut self,
        provider: String,
        user_id: String,
        generation: u64,
        at: i64,
    ) -> wasmtime::Result<Result<(), storage::StorageError>> {
        Ok(self
            .shared
            .store
            .record_refresh_start(&provider, &user_id, generation, at)
            .await
            .map_err(to_wit))
    }

    async fn begin(
        &mut self,
    ) -> wasmtime::Result<Result<Resource<TxnSlot>, storage::StorageError>> {
        match self.shared.store.begin().await {
            Ok(tx) => Ok(Ok(self.table.push(TxnSlot(Some(tx)))?)),
            Err(e) => Ok(Err(to_wit(e))),
        }
    }
}

fn committed() -> storage::StorageError {
    storage::StorageError::Unavailable("transaction already committed".into())
}

impl storage::HostTransaction for State {
    async fn load_for_update(
        &mut self,
        tx: Resource<TxnSlot>,
        provider: String,
        user_id: String,
    ) -> wasmtime::Result<Result<Option<storage::SealedRow>, storage::StorageError>> {
        let Some(tx) = self.table.get_mut(&tx)?.0.as_mut() else {
            return Ok(Err(committed()));
        };
        Ok(tx
            .load_for_update(&provider, &user_id)
            .await
            .map_err(to_wit))
    }

    async fn compare_and_set(
        &mut self,
        tx: Resource<TxnSlot>,
        row: storage::SealedRow,
        expected_generation: u64,
    ) -> wasmtime::Result<Result<bool, storage::StorageError>> {
        let Some(tx) = self.table.get_mut(&tx)?.0.as_mut() else {
            return Ok(Err(committed()));
        };
        Ok(tx
            .compare_and_set(&row, expected_generation)
            .await
            .map_err(to_wit))
    }

    async fn commit(
        &mut self,
        tx: Resource<TxnSlot>,
    ) -> wasmtime::Result<Result<(), storage::StorageError>> {
        let Some(tx) = self.table.get_mut(&tx)?.0.take() else {
            return Ok(Err(committed()));
        };
        Ok(tx.commit().await.map_err(to_wit))
    }

    async fn drop(&mut self, tx: Resource<TxnSlot>) -> wasmtime::Result<()> {
        // An uncommitted transaction rolls back as it drops.
        self.table.delete(tx)?;
        Ok(())
    }
}

impl keyring::Host for State {
    async fn active_key_id(&mut self) -> wasmtime::Result<String> {
        Ok(self.shared.keyring.active_id().to_string())
    }

    async fn key(&mut self, id: String) -> wasmtime::Result<Option<Vec<u8>>> {
        Ok(self
            .shared
            .keyring
            .key(&id)
            .map(|k| k.expose_secret().to_vec()))
    }
}

impl providers::Host for State {
    async fn lookup(
        &mut self,
        name: String,
    ) -> wasmtime::Result<Option<providers::ProviderConfig>> {
        Ok(self
            .shared
            .config
            .providers
            .get(&name)
            .map(|p| providers::ProviderConfig {
                name: p.name.clone(),
                token_url: p.token_url.clone(),
                extra_params: p.extra_params.clone(),
                refresh_threshold_seconds: p.refresh_threshold_seconds,
                timeout_ms: p.timeout_ms,
                max_response_bytes: p.max_response_bytes,
                kind: p.kind.clone(),
                error_codes: p
                    .error_codes
                    .iter()
                    .map(|(code, class)| (code.clone(), crate::error::class_to_wit(*class)))
                    .collect(),
                default_expires_in: p.default_expires_in,
                default_refresh_token_expires_in: p.default_refresh_token_expires_in,
                rotates_refresh_tokens: p.rotates_refresh_tokens,
                max_attempts: p.max_attempts,
                retry_budget_ms: p.retry_budget_ms,
            }))
    }
}
