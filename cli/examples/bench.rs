//! `just bench`: what the hot path costs, as ratios against a baseline
//! measured in the same run.
//!
//! Baseline: one raw indexed read of the row through the storage backend.
//! Measured: `Keeper::ensure_fresh` on a fresh token (instantiate the
//! component, one unlocked read, decrypt both tokens) and `load_tokens`.
//! SQLite in a temporary directory by default; set `DATABASE_URL` to a
//! Postgres URL to measure that backend instead.

use secrecy::SecretString;
use std::time::{Duration, Instant};
use tokenkeep_host::storage::{Store, StoreOptions};
use tokenkeep_host::{Config, Keeper, Keyring, Options, SandboxLimits, TokenSet};

const ITERATIONS: u32 = 2_000;

async fn time<F, Fut>(label: &str, mut f: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    for _ in 0..ITERATIONS / 10 {
        f().await;
    }
    let start = Instant::now();
    for _ in 0..ITERATIONS {
        f().await;
    }
    let per = start.elapsed() / ITERATIONS;
    println!("{label:<44} {:>9.1} µs/op", per.as_secs_f64() * 1e6);
    per
}

#[tokio::main]
async fn main() {
    let dir = std::env::temp_dir().join(format!("tokenkeep-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temporary directory");
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| format!("sqlite:{}", dir.join("bench.db").display()));
    let config = Config::parse(
        "[providers.bench]\ntoken_url = \"https://auth.invalid/token\"\nclient_id = \"bench\"\n",
    )
    .expect("config");
    let keys = SecretString::from("k1=AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=".to_string());
    let keeper = Keeper::open(Options {
        database_url: url.clone(),
        config,
        keyring: Keyring::parse(&keys).expect("keys"),
        limits: SandboxLimits::default(),
        max_connections: 4,
        clock: Default::default(),
    })
    .await
    .expect("keeper");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64;
    keeper
        .store_tokens(
            "bench",
            "alice",
            &TokenSet {
                access_token: "a".repeat(40).into(),
                refresh_token: Some("r".repeat(40).into()),
                access_token_expires_at: Some(now + 86_400),
                refresh_token_expires_at: None,
                scopes: vec!["repo".into()],
            },
        )
        .await
        .expect("store");
    let store = Store::open(&url, StoreOptions::default(), Default::default())
        .await
        .expect("store");

    println!(
        "backend: {}",
        if url.starts_with("sqlite") {
            "sqlite"
        } else {
            "postgres"
        }
    );
    println!(
        "{ITERATIONS} iterations each, after {} warm-up",
        ITERATIONS / 10
    );
    let baseline = time("baseline: raw indexed read (storage only)", || async {
        store
            .read("bench", "alice")
            .await
            .expect("read")
            .row
            .expect("row");
    })
    .await;
    let fresh = time("ensure_fresh on a fresh token (hot path)", || async {
        keeper.ensure_fresh("bench", "alice").await.expect("fresh");
    })
    .await;
    let load = time("load_tokens (unlocked)", || async {
        keeper
            .load_tokens("bench", "alice", false)
            .await
            .expect("load")
            .expect("row");
    })
    .await;
    let ratio = |d: Duration| d.as_secs_f64() / baseline.as_secs_f64();
    println!();
    println!("ensure_fresh / baseline = {:.2}x", ratio(fresh));
    println!("load_tokens  / baseline = {:.2}x", ratio(load));
    let _ = std::fs::remove_dir_all(&dir);
}
