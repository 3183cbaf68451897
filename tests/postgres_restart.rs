//! Postgres restarted under load. In its own test binary: it stops the
//! harness's cluster, which the other tests of a binary share.

mod common;

use common::{Backend, World, pg};
use secrecy::ExposeSecret;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;
use tokenkeep_host::Error;
use tokenkeep_testkit::devprovider::Behaviour;

const USERS: usize = 40;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_postgres_restart_under_load_gives_typed_errors_and_loses_nothing() {
    if std::env::var_os("DATABASE_URL").is_some() {
        eprintln!("skipped: this test restarts the harness's own cluster, not DATABASE_URL");
        return;
    }
    let mut w = World::with(
        Backend::Postgres,
        "restart",
        Behaviour::default(),
        "timeout_ms = 1000\n",
    )
    .await;
    // Waits bounded to seconds, so callers fail fast while the server is down.
    let config = std::fs::read_to_string(&w.config_path).unwrap();
    std::fs::write(&w.config_path, format!("lock_wait_ms = 3000\n{config}")).unwrap();
    w.keeper = w.another_keeper().await;

    // Half the tokens stay fresh; the other half (64 s lifetimes, due once
    // less than a minute is left: 4 s from now) fall due while the server
    // is down.
    for i in 0..USERS {
        let refresh = format!("rt-{i}");
        if i == 0 {
            w.provider.reset_chain(&refresh);
        } else {
            w.provider.add_chain(&refresh);
        }
        let lifetime = if i % 2 == 0 { 64 } else { 3600 };
        w.store(
            &format!("user-{i}"),
            &format!("at-{i}"),
            Some(&refresh),
            lifetime,
        )
        .await;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, ok_after, storage) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
    );
    let back = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for t in 0..16 {
        let (k, stop, ok, ok_after, storage, back) = (
            w.keeper.clone(),
            stop.clone(),
            ok.clone(),
            ok_after.clone(),
            storage.clone(),
            back.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut other = Vec::new();
            let mut n = t;
            while !stop.load(Ordering::SeqCst) {
                let user = format!("user-{}", n % USERS);
                n += 1;
                match k.ensure_fresh("acme", &user).await {
                    Ok(r) => {
                        assert!(r.expires_at > Some(common::now()));
                        ok.fetch_add(1, Ordering::SeqCst);
                        if back.load(Ordering::SeqCst) {
                            ok_after.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                    Err(Error::Storage(_)) => {
                        storage.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(e) => other.push(e.to_string()),
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            other
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = ok.load(Ordering::SeqCst);
    assert!(before > 0, "the load is running");

    let start_again = tokio::task::spawn_blocking(pg::stop).await.unwrap();
    assert_eq!(w.provider.calls(), 0, "nothing fell due before the stop");
    tokio::time::sleep(Duration::from_secs(4)).await;
    let failed_while_down = storage.load(Ordering::SeqCst);
    tokio::task::spawn_blocking(start_again).await.unwrap();
    back.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(4)).await;
    stop.store(true, Ordering::SeqCst);
    let mut other = Vec::new();
    for t in tasks {
        other.extend(t.await.unwrap());
    }

    assert!(
        failed_while_down > 0,
        "callers got typed storage errors while the server was down"
    );
    assert!(other.is_empty(), "only storage errors: {other:?}");
    assert!(
        ok_after.load(Ordering::SeqCst) > 0,
        "the same keeper serves again after the restart"
    );
    // Nothing lost: every row is there, decrypts, and the due ones were
    // refreshed exactly once each with no reuse.
    for i in 0..USERS {
        let r = w.stored(&format!("user-{i}")).await;
        if i % 2 == 0 {
            assert_eq!(r.generation, 2, "user-{i}");
            assert!(r.tokens.access_token.expose_secret().starts_with("dev-at-"));
        } else {
            assert_eq!(r.generation, 1, "user-{i}");
            assert_eq!(r.tokens.access_token.expose_secret(), format!("at-{i}"));
        }
    }
    assert_eq!(w.provider.calls() as usize, USERS / 2);
    assert_eq!(w.provider.reuses(), 0);
    eprintln!(
        "restart: {before} ok before, {failed_while_down} storage errors while down, {} ok after",
        ok_after.load(Ordering::SeqCst)
    );
}
