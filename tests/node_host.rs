//! The Node.js host (hosts/node) beside the Rust one: processes of both
//! sharing one SQLite file and one expiring token, and the Node host's own
//! test suite.

mod common;

use common::node::{self, Outcome};
use common::{Backend, World, raw_sql};
use std::time::Duration;
use tokenkeep_testkit::devprovider::Behaviour;

/// The Rust CLI's `tokens get`, as a command to run.
fn rust_get(w: &World) -> tokio::process::Command {
    let mut c = tokio::process::Command::from(w.cli());
    c.args(["tokens", "get", "acme", "alice"])
        .kill_on_drop(true);
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn four_node_and_four_rust_processes_refresh_one_expiring_token_once() {
    // The provider answers after a second, so that most processes arrive
    // while the refresh is in flight (the count holds either way: a late
    // one reads the refreshed token).
    let w = World::with(
        Backend::Sqlite,
        "node-and-rust",
        Behaviour {
            delay: Duration::from_secs(1),
            ..Default::default()
        },
        "",
    )
    .await;
    w.store("alice", "at-0", Some("rt-0"), -10).await;
    for round in 1..=3u64 {
        let mut runs = Vec::new();
        for i in 0..8 {
            let mut c = if i % 2 == 0 {
                node::get(&w, "acme", "alice", 0)
            } else {
                rust_get(&w)
            };
            runs.push(async move {
                let out = tokio::time::timeout(Duration::from_secs(60), c.output())
                    .await
                    .expect("every process answers within a minute")
                    .unwrap();
                (i % 2 == 0, node::outcome(&out))
            });
        }
        let got = futures::future::join_all(runs).await;
        assert_eq!(
            w.provider.calls(),
            round,
            "round {round}: one provider call"
        );
        let tokens: std::collections::HashSet<&Outcome> = got.iter().map(|(_, o)| o).collect();
        assert_eq!(tokens.len(), 1, "round {round}: one token for all: {got:?}");
        let Some(Outcome::Ok(token)) = tokens.into_iter().next() else {
            panic!("round {round}: {got:?}");
        };
        assert!(token.starts_with("dev-at-"), "round {round}: {token}");
        // The token expires again: the next round refreshes it again.
        raw_sql(
            &w.database_url,
            "UPDATE tokenkeep_tokens SET access_token_expires_at = unixepoch() - 10",
        )
        .await;
    }
    assert_eq!(
        w.provider.reuses(),
        0,
        "no spent refresh token presented again"
    );
}

#[test]
fn the_node_hosts_own_tests_pass() {
    let dir = node::host()
        .parent()
        .and_then(|bin| bin.parent())
        .unwrap()
        .to_path_buf();
    let out = std::process::Command::new("npm")
        .arg("test")
        .current_dir(&dir)
        .env_remove("TOKENKEEP_DATABASE")
        .env_remove("TOKENKEEP_CONFIG")
        .env_remove("TOKENKEEP_KEYS")
        .env_remove("TOKENKEEP_KEYS_FILE")
        .env("TOKENKEEP_RUST_CLI", env!("CARGO_BIN_EXE_tokenkeep"))
        .output()
        .unwrap();
    let said = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "npm test failed:\n{said}");
    // Here everything they need is present: none may be skipped.
    assert!(said.contains("skipped 0"), "tests were skipped:\n{said}");
}
