//! The sandbox: one engine and one pre-linked component per process, a fresh
//! store and instance per call, bounded in memory and fuel, confined to the
//! rows the call is about, and given no network, files, environment or clock
//! of its own.
//!
//! Instances come from wasmtime's pooling allocator: their memories, tables
//! and stacks are reserved once and reused, so a call pays for neither mmap
//! nor munmap. Reuse shares nothing between calls: a slot's linear memory is
//! reset to zero (and the module's initial image mapped again) and its tables
//! cleared before the next instance gets it; globals, fuel and the host's
//! per-call state (the store, its resource table, the call's scope) are new
//! for every call.

use crate::bindings::KeeperCorePre;
use crate::clock::WasiWallClock;
use crate::config::Config;
use crate::error::Error;
use crate::keyring::Keyring;
use crate::linker::{KeeperCtx, KeeperCtxView, KeeperView, Scope};
use crate::provider_connections::ProviderConnections;
use crate::storage::Store;
use crate::token_endpoint::DenyAllHttp;
use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use wasmtime::component::{Component, Linker, ResourceTable};
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
    /// Fuel per unit of work (a token a call is about, or a hundred rows of
    /// a listing): wasm instructions the guest may execute (waiting in host
    /// calls for storage or HTTP costs none). About a hundred times what a
    /// refresh uses (4·10⁴), so runaway code stops within milliseconds.
    pub fuel: u64,
    /// Instances kept in the pool (calls in flight at once; more wait for
    /// a slot). Zero: no pool, each instance allocated on demand.
    pub pooled_instances: u32,
}

impl Default for SandboxLimits {
    fn default() -> Self {
        Self {
            memory_bytes: 64 << 20,
            fuel: 5_000_000,
            pooled_instances: 256,
        }
    }
}

/// Fuel between yields to the async executor: well under a millisecond.
const FUEL_YIELD_INTERVAL: u64 = 1_000_000;

/// What one instance of a component built by Rust for wasm32-wasip2 takes:
/// its main module, wit-component's shim and fixup modules, and the
/// memory and tables they share.
const CORE_INSTANCES_PER_COMPONENT: u32 = 8;
const TABLES_PER_COMPONENT: u32 = 4;
const MEMORIES_PER_COMPONENT: u32 = 1;

/// Linear memory a slot keeps resident between calls, reset with `memset`
/// rather than given back to the kernel: what a call touches, now that the
/// guest's stack is 128 KiB (component/build.rs) instead of 1 MiB. That
/// took a call with instantiation from 38 to 15 µs (`just bench`): a 1 MiB
/// `memset` of mostly idle stack went, and so did the `madvise` (with its
/// TLB shootdowns) and page faults of the heap above it. (wasmtime's
/// `PAGEMAP_SCAN` reset of only dirtied pages did as well, but in wasmtime
/// 48 it skips a dirty page that is swapped out or migrating, which would
/// show one call's memory to the next: bytecodealliance/wasmtime#14357.)
const MEMORY_KEPT_RESIDENT: usize = 512 << 10;

/// The instance allocator: pooled slots, or on demand when `slots` is zero.
fn allocation_strategy(limits: &SandboxLimits) -> wasmtime::InstanceAllocationStrategy {
    let slots = limits.pooled_instances;
    if slots == 0 {
        return wasmtime::InstanceAllocationStrategy::OnDemand;
    }
    let mut pool = wasmtime::PoolingAllocationConfig::new();
    pool.total_component_instances(slots)
        .total_core_instances(slots * CORE_INSTANCES_PER_COMPONENT)
        .total_memories(slots * MEMORIES_PER_COMPONENT)
        .total_tables(slots * TABLES_PER_COMPONENT)
        .total_stacks(slots)
        .max_core_instances_per_component(CORE_INSTANCES_PER_COMPONENT)
        .max_memories_per_component(MEMORIES_PER_COMPONENT)
        .max_tables_per_component(TABLES_PER_COMPONENT)
        .max_memory_size(limits.memory_bytes)
        .linear_memory_keep_resident(MEMORY_KEPT_RESIDENT)
        .table_keep_resident(64 << 10);
    wasmtime::InstanceAllocationStrategy::Pooling(pool)
}

/// What every store of a process shares.
pub struct Shared {
    pub store: Store,
    /// Replaced whole on a reload ([`crate::Keeper::reload_config`]); each
    /// call works with the one it started with.
    pub config: std::sync::RwLock<Arc<Config>>,
    pub keyring: Keyring,
    /// Connections to token endpoints kept between refreshes.
    pub connections: ProviderConnections,
    /// DPoP proof keys opened, and providers' nonces.
    pub proof_keys: crate::dpop::ProofKeys,
}

impl Shared {
    /// The configuration now.
    pub fn config(&self) -> Arc<Config> {
        self.config
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// The state of one store: one call into the component.
pub(crate) struct State {
    keeper: KeeperCtx,
    wasi: WasiCtx,
    http: WasiHttpCtx,
    deny: DenyAllHttp,
    table: ResourceTable,
    limits: StoreLimits,
}

impl KeeperView for State {
    fn keeper(&mut self) -> KeeperCtxView<'_> {
        KeeperCtxView {
            ctx: &mut self.keeper,
            table: &mut self.table,
        }
    }
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
            hooks: &mut self.deny,
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
    /// One per pooled instance: a call waits for a slot rather than fail.
    slots: Option<Arc<tokio::sync::Semaphore>>,
}

impl Runtime {
    /// Compiles (or loads from the cache) `wasm`, which must implement the
    /// `keeper-core` world.
    pub fn new(shared: Shared, limits: SandboxLimits, wasm: &[u8]) -> Result<Self, Error> {
        let mut config = wasmtime::Config::new();
        // Fuel, not epochs: epochs tick while the guest waits on a row lock
        // or a provider, and a long lock wait is not runaway guest code.
        config.consume_fuel(true);
        config.allocation_strategy(allocation_strategy(&limits));
        // The pool reserves address space up front (about 4 GiB a memory
        // slot); where that is refused (a low RLIMIT_AS), instances are
        // allocated on demand instead.
        let (engine, pooled) = match Engine::new(&config) {
            Ok(engine) => (engine, limits.pooled_instances > 0),
            Err(e) if limits.pooled_instances > 0 => {
                tracing::warn!(error = %e, "instance pool unavailable; allocating instances on demand");
                config.allocation_strategy(wasmtime::InstanceAllocationStrategy::OnDemand);
                (Engine::new(&config).map_err(sandbox)?, false)
            }
            Err(e) => return Err(sandbox(e)),
        };
        let component = load_component(&engine, wasm)?;
        let mut linker: Linker<State> = Linker::new(&engine);
        // Full WASI p2 (a Rust guest's std imports cli/environment, exit,
        // stdio), but the context grants no directories, sockets, arguments
        // or environment; `wasi:http` is linked only to refuse every request,
        // so that a guest built against it still gets a typed refusal.
        wasmtime_wasi::p2::add_to_linker_async(&mut linker).map_err(sandbox)?;
        wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker).map_err(sandbox)?;
        crate::linker::add_to_linker(&mut linker).map_err(sandbox)?;
        let pre = KeeperCorePre::new(linker.instantiate_pre(&component).map_err(sandbox)?)
            .map_err(sandbox)?;

        // Wall-clock bound on one token's worth of work, generous on purpose:
        // cancelling a call between the provider's answer and the commit
        // loses a rotated refresh token. Queueing for a connection (up to two
        // lock waits), the row lock, the provider, the re-read after a
        // refusal (another lock wait), and the writes.
        let config = shared.config();
        let call_budget = 4 * Duration::from_millis(u64::from(config.lock_wait_ms))
            + config.slowest_provider_call()
            + Duration::from_secs(10);
        Ok(Self {
            engine,
            pre,
            shared: Arc::new(shared),
            limits,
            call_budget,
            slots: pooled.then(|| {
                Arc::new(tokio::sync::Semaphore::new(
                    limits.pooled_instances as usize,
                ))
            }),
        })
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Runs `f` against a fresh instance confined to `scope`, which may
    /// refresh up to `tokens` tokens one after another (or, for a listing,
    /// list a hundred rows per unit). Returns what `f`
    /// returned and the call's context, to check the result against; a call
    /// that reached outside its scope was trapped and fails as `sandbox`.
    pub async fn call<T, F>(
        &self,
        scope: Scope,
        tokens: usize,
        f: F,
    ) -> Result<(T, KeeperCtx), Error>
    where
        F: AsyncFnOnce(
            &crate::bindings::KeeperCore,
            &mut wasmtime::Store<State>,
        ) -> wasmtime::Result<T>,
    {
        let budget = self.call_budget * u32::try_from(tokens.max(1)).unwrap_or(u32::MAX);
        // Held until the store (and its instance) is gone. Waiting for one
        // is bounded on its own: the call's budget starts once it runs, so
        // a late slot never cuts a refresh short before its commit.
        let _slot = match &self.slots {
            Some(slots) => Some(
                tokio::time::timeout(self.call_budget, slots.clone().acquire_owned())
                    .await
                    .map_err(|_| {
                        Error::Sandbox(format!(
                            "no instance slot free within {} ms",
                            self.call_budget.as_millis()
                        ))
                    })?
                    .map_err(|_| Error::Sandbox("the instance pool is closed".into()))?,
            ),
            None => None,
        };
        let deadline = tokio::time::Instant::now() + budget;
        let state = State {
            keeper: KeeperCtx::new(self.shared.clone(), scope),
            wasi: WasiCtx::builder()
                .wall_clock(WasiWallClock(self.shared.clone()))
                .build(),
            http: WasiHttpCtx::new(),
            deny: DenyAllHttp::default(),
            table: ResourceTable::new(),
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
        let fuel = self
            .limits
            .fuel
            .saturating_mul(u64::try_from(tokens.max(1)).unwrap_or(u64::MAX));
        store.set_fuel(fuel).map_err(sandbox)?;
        // Yield to the executor now and then, so that a guest spinning
        // through its fuel cannot hold a worker thread past the call budget.
        store
            .fuel_async_yield_interval(Some(FUEL_YIELD_INTERVAL))
            .map_err(sandbox)?;
        let run = async {
            crate::metrics::instantiation();
            let instance = self.pre.instantiate_async(&mut store).await?;
            f(&instance, &mut store).await
        };
        let outcome = tokio::time::timeout_at(deadline, run).await;
        if let Ok(left) = store.get_fuel() {
            tracing::trace!(fuel_used = fuel - left, "component call");
        }
        let value = match outcome {
            Ok(Ok(value)) => value,
            Ok(Err(trap)) => {
                crate::metrics::trap();
                tracing::error!(error = %describe_trap(&trap), "component call failed");
                return Err(Error::Sandbox(describe_trap(&trap)));
            }
            Err(_) => {
                crate::metrics::trap();
                return Err(Error::Sandbox(format!(
                    "call exceeded {} ms",
                    budget.as_millis()
                )));
            }
        };
        Ok((value, store.into_data().keeper))
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
