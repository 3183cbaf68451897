//! The sandbox holds against a hostile component (tests/rogue): it runs out
//! of memory and fuel, reaches for other URLs, files and the environment;
//! every attempt ends in a typed error and the host keeps serving.

mod common;

use common::{Backend, KEYS, World};
use secrecy::SecretString;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use tokenkeep::{Clock, Config, Error, Keeper, Keyring, Options, SandboxLimits};

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

    // Network: a URL that is not a configured token URL is refused by the
    // host, claimed provider or not, and never sees a connection.
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
    let other_path = format!("{}/elsewhere", token_url.trim_end_matches("/token"));
    for target in [format!("http://127.0.0.1:{port}/steal"), other_path] {
        let e = rogue.ensure_fresh("egress", &target).await.unwrap_err();
        assert!(
            matches!(&e, Error::Config(m) if m.contains("egress denied")),
            "{target}: {e}"
        );
    }
    assert_eq!(connections.load(Ordering::SeqCst), 0);
    assert_eq!(w.provider.arrived(), 0, "not even the provider's host");

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
        },
        max_connections: 4,
        clock: Clock::System,
    })
    .await
    .unwrap();
    let record = tight.ensure_fresh("acme", "alice").await.unwrap();
    assert_eq!(record.generation, 2);
}
