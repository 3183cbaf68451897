//! The sandbox holds against a hostile component (tests/rogue): it runs out
//! of memory and fuel, reaches for files and the environment, posts its own
//! requests, touches rows it was not asked about and returns tokens that are
//! not the row's. Every attempt is refused with a typed error, nothing it
//! chose reaches a log, and the host keeps serving.

mod common;

use common::{Backend, KEYS, World};
use secrecy::{ExposeSecret, SecretString};
use std::io::Write;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use tokenkeep_host::{Clock, Config, Error, Keeper, Keyring, Options, SandboxLimits};

/// Builds the rogue guest once per test process, the way host/build.rs
/// builds the real one.
fn rogue_component() -> &'static [u8] {
    static WASM: OnceLock<Vec<u8>> = OnceLock::new();
    WASM.get_or_init(|| {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
        let target_dir = root.join("target/wasm");
        let mut cmd = Command::new(option_env!("CARGO").unwrap_or("cargo"));
        cmd.current_dir(&root)
            .args([
                "build",
                "-q",
                "-p",
                "tokenkeep-rogue",
                "--target",
                "wasm32-wasip2",
            ])
            .args(["--profile", "component", "--target-dir"])
            .arg(&target_dir);
        for var in [
            "RUSTFLAGS",
            "CARGO_ENCODED_RUSTFLAGS",
            "CARGO_BUILD_RUSTFLAGS",
            "CARGO_TARGET_DIR",
            "CARGO_BUILD_TARGET",
            "RUSTC_WRAPPER",
            "RUSTC_WORKSPACE_WRAPPER",
        ] {
            cmd.env_remove(var);
        }
        assert!(
            cmd.status().unwrap().success(),
            "building the rogue component"
        );
        std::fs::read(target_dir.join("wasm32-wasip2/component/tokenkeep_rogue.wasm")).unwrap()
    })
}

async fn rogue_keeper(w: &World, limits: SandboxLimits) -> Arc<Keeper> {
    Keeper::open_with_component(
        Options {
            database_url: w.database_url.clone(),
            config: Config::load(&w.config_path).unwrap(),
            keyring: Keyring::parse(&SecretString::from(KEYS.to_string())).unwrap(),
            limits,
            max_connections: 4,
            clock: Clock::System,
            grant_cache: false,
            audit_as: None,
        },
        rogue_component(),
    )
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hostile_component_is_contained_and_the_host_keeps_serving() {
    let w = World::new(Backend::Sqlite, "sandbox").await;
    w.store("alice", "at-alice", Some("rt-0"), 3600).await;
    let limits = SandboxLimits {
        memory_bytes: 16 << 20,
        fuel: 200_000_000,
        ..Default::default()
    };
    let rogue = rogue_keeper(&w, limits).await;
    let healthy = |rogue: Arc<Keeper>| async move {
        // The same host, right after: a fresh instance answers normally.
        assert!(matches!(
            rogue.ensure_fresh("ok", "anyone").await,
            Err(Error::NotFound { .. })
        ));
    };

    // Memory: capped by StoreLimits, the grow fails and the guest traps.
    let e = rogue.ensure_fresh("memory", "u").await.unwrap_err();
    assert!(
        matches!(&e, Error::Sandbox(m) if m.contains("memory limit")),
        "{e}"
    );
    healthy(rogue.clone()).await;

    // CPU: the fuel runs out and the guest traps.
    let e = rogue.ensure_fresh("spin", "u").await.unwrap_err();
    assert!(matches!(&e, Error::Sandbox(m) if m.contains("fuel")), "{e}");
    healthy(rogue.clone()).await;

    // No filesystem and no environment (the host's may hold secrets).
    let e = rogue
        .ensure_fresh("filesystem", "/etc/passwd")
        .await
        .unwrap_err();
    assert!(
        matches!(&e, Error::InvalidInput(m) if m == "no filesystem"),
        "{e}"
    );
    let e = rogue.ensure_fresh("env", "u").await.unwrap_err();
    assert!(
        matches!(&e, Error::InvalidInput(m) if m == "0 environment variables"),
        "{e}"
    );

    // The real component on the same host process and database is unharmed.
    let record = w.keeper.ensure_fresh("acme", "alice").await.unwrap();
    assert_eq!(record.generation, 1);
}

/// Everything every test in this binary logs, at trace level for tokenkeep.
fn captured_logs() -> Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        struct Sink(Arc<Mutex<Vec<u8>>>);
        impl Write for Sink {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let sink = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter("tokenkeep_host=trace,tokenkeep=trace,info")
            .with_writer(move || Sink(sink.clone()))
            .finish();
        tracing::subscriber::set_global_default(subscriber).unwrap();
        buf
    })
    .clone()
}

async fn a_compromised_component_is_refused_and_nothing_it_chose_reaches_a_log(b: Backend) {
    let logs = captured_logs();
    let w = World::new(b, "rogue").await;
    w.store("alice", "at-alice", Some("rt-alice-SECRET"), 3600)
        .await;
    w.store("bob", "at-bob", Some("rt-bob-SECRET"), -10).await;
    let alice = w.stored("alice").await;
    let rogue = rogue_keeper(&w, SandboxLimits::default()).await;

    // It asks about one row and reaches for acme/alice: reads, opens, writes,
    // deletes, locks, compare-and-sets, refreshes without a lock, scans,
    // reads another conversation. Each is refused and fails the call.
    for behaviour in [
        "read-other",
        "open-other",
        "write-other",
        "cas-other",
        "lock-other",
        "refresh-unlocked",
        "scan",
        "other-conversation",
    ] {
        let e = rogue.ensure_fresh(behaviour, "alice").await.unwrap_err();
        assert!(
            matches!(&e, Error::Sandbox(m) if m.contains("outside its call")),
            "{behaviour}: {e}"
        );
    }
    // Asked for one page of a listing, it scans from the start.
    let after = tokenkeep_host::RowKey {
        provider: "acme".into(),
        user_id: "alice".into(),
    };
    let e = rogue.list_tokens_page(Some(after), 10).await.unwrap_err();
    assert!(
        matches!(&e, Error::Sandbox(m) if m.contains("outside its call")),
        "scan beyond the page: {e}"
    );
    // It returns a token it made up, or one for another user.
    for behaviour in ["forge", "other-user"] {
        let e = rogue.ensure_fresh(behaviour, "alice").await.unwrap_err();
        assert!(
            matches!(&e, Error::Sandbox(m) if m.contains("not the requested row")),
            "{behaviour}: {e}"
        );
    }

    // Asked about its own row, it tries to get the refresh token out (sealed
    // as an access token, returned as one, in a scope, in an error), to
    // hammer the provider with it, to rewrite the row without moving its
    // generation, and to open a second transaction.
    let mut secrets = Vec::new();
    for (trick, outcome) in [
        ("leak:seal", "sealed as an access token"),
        ("leak:return", "not the requested row"),
        ("leak:scope", "not the requested row"),
        ("leak:error", "quoted a refresh token"),
        ("leak:hammer", "beyond the provider's retry rules"),
        (
            "leak:rotate-and-hammer",
            "beyond the provider's retry rules",
        ),
        ("leak:mismatch", "scopes the row never had"),
        ("leak:upsert", "a call that only reads"),
        (
            "leak:generation",
            "does not follow the locked row's generation",
        ),
        ("leak:two-transactions", "a second transaction"),
        (
            "leak:baseline",
            "does not follow the locked row's generation",
        ),
        (
            "leak:backoff",
            "does not follow the locked row's generation",
        ),
    ] {
        let secret = format!("rt-{trick}-SECRET-0123456789");
        w.store(trick, "at-own", Some(&secret), -10).await;
        let before = w.provider.calls();
        let e = rogue.ensure_fresh("acme", trick).await.unwrap_err();
        assert!(
            matches!(&e, Error::Sandbox(m) if m.contains(outcome)),
            "{trick}: {e}"
        );
        assert!(!e.to_string().contains(&secret), "{trick}: {e}");
        secrets.push(secret);
        let sent = w.provider.calls() - before;
        assert!(sent <= 1, "{trick}: {sent} token requests");
    }

    // It asks for a refresh the host denies (the row holds no refresh
    // token) and then writes tokens of its own as the next generation: a
    // denied request brought nothing, so nothing may follow it.
    w.store("leak:denied-forge", "at-own", None, -10).await;
    let e = rogue
        .ensure_fresh("acme", "leak:denied-forge")
        .await
        .unwrap_err();
    assert!(
        matches!(&e, Error::Sandbox(m) if m.contains("does not follow the locked row's generation")),
        "{e}"
    );
    let kept = w.stored("leak:denied-forge").await;
    assert_eq!(
        (kept.generation, kept.tokens.access_token.expose_secret()),
        (1, "at-own")
    );

    // It names, in a conversation's failure, a provider the call is not about.
    let settings = tokenkeep_host::ConversationSettings::from_json(
        br#"{"provider_tokens":{"acme":{"token":"at-conv","expires_at":1}}}"#,
    )
    .unwrap();
    let e = rogue
        .refresh_provider_tokens(&settings, "conv", "alice")
        .await
        .unwrap_err();
    assert!(
        matches!(&e.error, Error::Sandbox(m) if m.contains("not about")) && e.provider.is_empty(),
        "{e}"
    );

    // It posts requests of its own: another grant with our client's name on
    // it, a refresh with another row's refresh token, data in a URL.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let connections = Arc::new(AtomicUsize::new(0));
    let seen = connections.clone();
    tokio::spawn(async move {
        while listener.accept().await.is_ok() {
            seen.fetch_add(1, Ordering::SeqCst);
        }
    });
    let token_url = w.provider.token_url();
    for attempt in [
        format!("{token_url} grant_type=client_credentials&scope=SMUGGLED-scope"),
        format!("{token_url} grant_type=refresh_token&refresh_token=rt-bob-SECRET"),
        format!("http://127.0.0.1:{port}/SMUGGLED-path?q=at-alice"),
    ] {
        let e = rogue.ensure_fresh("egress", &attempt).await.unwrap_err();
        assert!(
            matches!(&e, Error::InvalidInput(m) if m.contains("HttpRequestDenied")),
            "{attempt}: {e}"
        );
    }
    assert_eq!(connections.load(Ordering::SeqCst), 0, "no connection made");
    assert_eq!(
        w.provider.arrived(),
        2,
        "nothing reached the provider but the one refresh per trick the host allowed"
    );

    // Nothing changed, and the real component serves on.
    let after = w.stored("alice").await;
    assert_eq!(after.generation, alice.generation);
    assert_eq!(
        after.tokens.refresh_token.unwrap().expose_secret(),
        "rt-alice-SECRET"
    );
    assert_eq!(w.stored("bob").await.generation, 1);
    let grant = w.keeper.ensure_fresh("acme", "alice").await.unwrap();
    assert_eq!(grant.access_token.expose_secret(), "at-alice");

    let logs = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
    assert!(logs.contains("component refused"), "refusals are logged");
    assert!(logs.contains("egress denied"), "denials are logged");
    for chosen in [
        "SMUGGLED",
        "rt-bob-SECRET",
        "rt-alice-SECRET",
        "tk-FORGED",
        "client_credentials",
    ] {
        assert!(!logs.contains(chosen), "{chosen} reached the log");
    }
    assert!(
        !logs.contains(&format!(":{port}")),
        "the guest's URL reached the log"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_compromised_component_is_refused_on_postgres() {
    a_compromised_component_is_refused_and_nothing_it_chose_reaches_a_log(Backend::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_compromised_component_is_refused_on_sqlite() {
    a_compromised_component_is_refused_and_nothing_it_chose_reaches_a_log(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_real_component_fits_its_sandbox_with_room_to_spare() {
    // A refresh under a tenth of the default fuel and a quarter of the
    // default memory: the defaults bound runaway code, not normal work.
    let w = World::new(Backend::Sqlite, "sandbox-fit").await;
    w.store("alice", "at-alice", Some("rt-0"), -10).await;
    let tight = Keeper::open(Options {
        database_url: w.database_url.clone(),
        config: Config::load(&w.config_path).unwrap(),
        keyring: Keyring::parse(&SecretString::from(KEYS.to_string())).unwrap(),
        limits: SandboxLimits {
            memory_bytes: 16 << 20,
            fuel: SandboxLimits::default().fuel / 10,
            ..Default::default()
        },
        max_connections: 4,
        clock: Clock::System,
        grant_cache: false,
        audit_as: None,
    })
    .await
    .unwrap();
    let record = tight.ensure_fresh("acme", "alice").await.unwrap();
    assert_eq!(record.generation, 2);
}

/// Instances come from a pool, and a call finds nothing of the call before
/// it in its slot: with one slot, every call reuses the same memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_instance_keeps_nothing_of_the_call_before() {
    let w = World::new(Backend::Sqlite, "sandbox-reuse").await;
    let secret = "rt-STASHED-SECRET-7f3a";
    w.store("leak:stash", "at-x", Some(secret), 3600).await;
    let limits = SandboxLimits {
        // Scanning the whole memory byte by byte takes more than a refresh.
        fuel: 500_000_000,
        pooled_instances: 1,
        ..Default::default()
    };
    let rogue = rogue_keeper(&w, limits).await;
    let reversed: String = secret.chars().rev().collect();
    for round in 0..3 {
        // The rogue opens the row's refresh token and keeps it in a static
        // and in freed heap memory; its scan finds the copies it made.
        let e = rogue.ensure_fresh("acme", "leak:stash").await.unwrap_err();
        let Error::InvalidInput(m) = &e else {
            panic!("round {round}: {e}")
        };
        let copies: usize = m
            .trim_start_matches("stashed; ")
            .trim_end_matches(" copies in memory")
            .parse()
            .unwrap();
        assert!(copies >= 1, "round {round}: the scan found no copy: {m}");
        // The next call, in the same slot, finds none of it.
        let e = rogue.ensure_fresh("remember", &reversed).await.unwrap_err();
        assert!(
            matches!(&e, Error::InvalidInput(m) if m == "stash \"\"; 0 copies in memory"),
            "round {round}: {e}"
        );
    }
}

/// Guests that spin through their fuel yield to the executor: four of them
/// on a two-worker runtime do not stall a fifth, healthy call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spinning_guests_do_not_stall_a_healthy_call() {
    let w = World::new(Backend::Sqlite, "sandbox-spin").await;
    w.store("alice", "at-alice", Some("rt-0"), 3600).await;
    // Far more fuel than the default, so that the spinners outlast the
    // healthy call: what is tested is that they yield meanwhile.
    let limits = SandboxLimits {
        fuel: 2_000_000_000,
        ..Default::default()
    };
    let rogue = rogue_keeper(&w, limits).await;
    let spinners: Vec<_> = (0..4)
        .map(|_| {
            let rogue = rogue.clone();
            tokio::spawn(async move { rogue.ensure_fresh("spin", "u").await })
        })
        .collect();
    let keeper = w.keeper.clone();
    let healthy = tokio::spawn(async move { keeper.ensure_fresh("acme", "alice").await })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(healthy.access_token.expose_secret(), "at-alice");
    assert!(
        spinners.iter().all(|s| !s.is_finished()),
        "the healthy call finished while every guest still spun"
    );
    for spinner in spinners {
        let e = spinner.await.unwrap().unwrap_err();
        assert!(matches!(&e, Error::Sandbox(m) if m.contains("fuel")), "{e}");
    }
}
