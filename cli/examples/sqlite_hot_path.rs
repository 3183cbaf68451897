//! `just bench-vs-main`'s probe: the SQLite hot path (`ensure_fresh` on a
//! fresh token) with 8 concurrent callers, one line of operations per
//! second per run. It is built twice, from this tree and from the previous
//! main's, so it uses only the API both have (the recipe deletes the lines
//! marked `previous main: none` before building the old one).
//!
//! Usage: `sqlite_hot_path <database file> <runs> [cached]` (`cached`:
//! with the grant cache, which the previous main did not have).

use secrecy::SecretString;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokenkeep_host::{Config, Keeper, Keyring, Options, SandboxLimits, TokenSet};

/// Concurrent callers.
const CALLERS: usize = 8;
/// How long each run lasts.
const WINDOW: Duration = Duration::from_millis(700);

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (path, runs, cached) = match &args[..] {
        [_, path, runs] => (path, runs, false),
        [_, path, runs, cached] if cached == "cached" => (path, runs, true),
        _ => {
            eprintln!("usage: sqlite_hot_path <database file> <runs> [cached]");
            std::process::exit(2);
        }
    };
    let runs: usize = runs.parse().expect("runs: a number");
    let config = Config::parse(
        "[providers.bench]\ntoken_url = \"http://127.0.0.1:9/token\"\nclient_id = \"bench\"\n",
    )
    .expect("config");
    let keys = SecretString::from("k1=AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=".to_string());
    let keeper = Arc::new(
        Keeper::open(Options {
            database_url: format!("sqlite:{path}"),
            config,
            keyring: Keyring::parse(&keys).expect("keys"),
            limits: SandboxLimits::default(),
            max_connections: 16,
            clock: Default::default(),
            grant_cache: cached, // previous main: none
            audit_as: None,      // previous main: none
        })
        .await
        .expect("keeper"),
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64;
    keeper
        .store_tokens(
            "bench",
            "fresh",
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
    // A warm-up run, then the measured ones.
    for run in 0..=runs {
        let start = Instant::now();
        let callers: Vec<_> = (0..CALLERS)
            .map(|_| {
                let keeper = keeper.clone();
                tokio::spawn(async move {
                    let mut ops = 0u64;
                    while start.elapsed() < WINDOW {
                        keeper.ensure_fresh("bench", "fresh").await.expect("read");
                        ops += 1;
                        tokio::task::yield_now().await;
                    }
                    ops
                })
            })
            .collect();
        let mut ops = 0;
        for c in callers {
            ops += c.await.expect("caller");
        }
        if run > 0 {
            println!("{:.0}", ops as f64 / start.elapsed().as_secs_f64());
        }
    }
}
