//! The seed's AuthTokenStore, line by line: validity to the second, the
//! refresh window, idempotency, typed failures, compare-and-set, race versus
//! revocation and key rotation. On the harness's Postgres and on SQLite.

mod common;

use common::{Backend, KEYS, World, raw_sql, token_set};
use secrecy::ExposeSecret;
use std::time::Duration;
use tokenkeep_host::storage::{Store, StoreOptions};
use tokenkeep_host::{Clock, Error};
use tokenkeep_testkit::devprovider::Behaviour;

const T0: i64 = 1_900_000_000;
/// k2 is a new active key; k1 and k0 stay readable.
const ROTATED_KEYS: &str = "k2=AwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwM=\nk1=AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=\nk0=AgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgI=\n";

async fn frozen(b: Backend, name: &str, behaviour: Behaviour, extra: &str) -> World {
    World::build(b, name, behaviour, extra, Clock::manual(T0)).await
}

on_both_backends!(
    the_clock_skew_is_exact_at_59_60_and_61_seconds,
    refresh_tokens_with_and_without_expiry,
    the_window_is_the_threshold_or_half_the_lifetime,
    refreshing_a_fresh_token_is_a_no_op,
    a_waiter_that_outlasts_the_lock_wait_gets_a_lock_timeout_and_readers_never_wait,
    a_slow_writer_loses_the_compare_and_set_to_a_newer_write,
    a_write_under_the_lock_is_read_back_and_is_what_the_next_holder_reads,
    a_narrowed_scope_is_reported_and_the_rotated_chain_kept,
    keys_rotate_online_and_an_interrupted_rotation_finishes_on_rerun,
    tampered_rows_and_unknown_keys_fail_to_decrypt_and_stay_as_they_were,
    the_cli_lists_states_and_deletes,
    a_runtime_killed_mid_refresh_is_reported_as_a_lost_rotation,
    a_failed_refresh_is_single_flight_too,
    a_three_second_token_is_refreshed_once_per_expiry_however_many_ask,
    generations_never_repeat_across_a_delete,
);

async fn generations_never_repeat_across_a_delete(b: Backend) {
    let w = World::new(b, "tombstone").await;
    w.store("alice", "at-1", Some("rt-0"), -10).await;
    assert_eq!(
        w.keeper
            .ensure_fresh("acme", "alice")
            .await
            .unwrap()
            .generation,
        2
    );
    assert!(w.keeper.delete_tokens("acme", "alice").await.unwrap());
    // A new authorisation after the delete continues the count: nothing
    // recorded against generation 1 or 2 (a refresh start, a conversation's
    // last token) can be mistaken for the new row's.
    w.store("alice", "at-again", Some("rt-again"), 3600).await;
    assert_eq!(w.stored("alice").await.generation, 3);
    assert!(w.keeper.delete_tokens("acme", "alice").await.unwrap());
    w.store("alice", "at-third", Some("rt-third"), 3600).await;
    assert_eq!(w.stored("alice").await.generation, 4);
    // Other users are untouched by alice's history.
    w.store("bob", "at-bob", Some("rt-bob"), 3600).await;
    assert_eq!(w.stored("bob").await.generation, 1);
}

async fn a_three_second_token_is_refreshed_once_per_expiry_however_many_ask(b: Backend) {
    // A slow provider, so that callers pile up on the lock behind it.
    let w = frozen(
        b,
        "short-lived",
        Behaviour {
            expires_in: 3,
            delay: Duration::from_millis(200),
            ..Default::default()
        },
        "",
    )
    .await;
    w.store("alice", "at-0", Some("rt-0"), -1).await;
    for round in 1..=3 {
        let callers: Vec<_> = (0..20)
            .map(|_| {
                let keeper = w.keeper.clone();
                tokio::spawn(async move { keeper.ensure_fresh("acme", "alice").await })
            })
            .collect();
        let mut tokens = std::collections::BTreeSet::new();
        for caller in callers {
            let grant = caller.await.unwrap().unwrap();
            tokens.insert(grant.access_token.expose_secret().to_string());
        }
        assert_eq!(w.provider.calls(), round, "one refresh in round {round}");
        assert_eq!(tokens.len(), 1, "every caller got the same token");
        assert!(!w.provider.revoked());
        // The token dies; the next round finds it expired.
        w.clock.advance(3);
    }
}

async fn the_clock_skew_is_exact_at_59_60_and_61_seconds(b: Backend) {
    let w = frozen(b, "skew", Behaviour::default(), "").await;
    let check = async |secs: i64| {
        let user = format!("u{secs}");
        let r = w
            .keeper
            .store_tokens("acme", &user, &token_set("at", Some("rt"), Some(T0 + secs)))
            .await
            .unwrap();
        w.keeper.is_access_token_valid(&r, 60).await.unwrap()
    };
    assert!(check(61).await);
    assert!(!check(60).await);
    assert!(!check(59).await);
    let never = w
        .keeper
        .store_tokens("acme", "never", &token_set("at", None, None))
        .await
        .unwrap();
    assert!(
        w.keeper.is_access_token_valid(&never, 60).await.unwrap(),
        "no expiry: valid"
    );
}

async fn refresh_tokens_with_and_without_expiry(b: Backend) {
    let w = frozen(
        b,
        "rt-expiry",
        Behaviour {
            refresh_expires_in: Some(15_897_600),
            ..Default::default()
        },
        "",
    )
    .await;
    let mut set = token_set("at", Some("rt-0"), Some(T0 - 10));
    let r = w.keeper.store_tokens("acme", "alice", &set).await.unwrap();
    assert!(
        w.keeper.is_refresh_token_valid(&r).await.unwrap(),
        "no expiry stored: never expires"
    );
    w.clock.advance(10 * 365 * 86_400);
    let refreshed = w.keeper.ensure_fresh("acme", "alice").await.unwrap();
    assert_eq!(
        w.provider.calls(),
        1,
        "a non-expiring refresh token still refreshes ten years on"
    );
    assert_eq!(refreshed.generation, 2);
    assert_eq!(
        w.stored("alice").await.tokens.refresh_token_expires_at,
        Some(w.now() + 15_897_600),
        "refresh_token_expires_in is tracked"
    );

    set.refresh_token_expires_at = Some(w.now());
    set.access_token_expires_at = Some(w.now() - 10);
    let r = w.keeper.store_tokens("acme", "bob", &set).await.unwrap();
    assert!(!w.keeper.is_refresh_token_valid(&r).await.unwrap());
    // Past its recorded expiry by the clock, but only the provider's refusal
    // is definitive: it is offered once, and the provider's answer recorded.
    let e = w.keeper.ensure_fresh("acme", "bob").await.unwrap_err();
    assert!(
        matches!(e, Error::ReauthorizationRequired(ref m) if m.contains("provider answered")),
        "{e:?}"
    );
    assert_eq!(w.provider.calls(), 2, "offered to the provider once");
    let again = w.keeper.ensure_fresh("acme", "bob").await.unwrap_err();
    assert!(matches!(again, Error::ReauthorizationRequired(_)));
    assert_eq!(w.provider.calls(), 2, "and the refusal stands");
    let none = w
        .keeper
        .store_tokens("acme", "carol", &token_set("at", None, Some(w.now() - 1)))
        .await
        .unwrap();
    assert!(!w.keeper.is_refresh_token_valid(&none).await.unwrap());
    assert!(matches!(
        w.keeper.ensure_fresh("acme", "carol").await,
        Err(Error::ReauthorizationRequired(_))
    ));
}

async fn the_window_is_the_threshold_or_half_the_lifetime(b: Backend) {
    let w = frozen(
        b,
        "window",
        Behaviour::default(),
        "refresh_threshold_seconds = 14400\n",
    )
    .await;
    // A 2-hour token under a 4-hour threshold: refreshed at half-life, not on every read.
    w.store("gitlab-user", "at-2h", Some("rt-0"), 2 * 3600)
        .await;
    w.clock.advance(3599);
    w.keeper.ensure_fresh("acme", "gitlab-user").await.unwrap();
    assert_eq!(w.provider.calls(), 0);
    w.clock.advance(1);
    w.keeper.ensure_fresh("acme", "gitlab-user").await.unwrap();
    assert_eq!(w.provider.calls(), 1);

    // An 8-hour token: refreshed with four hours to go.
    w.provider.reset_chain("rt-8h");
    let start = w.now();
    w.store("github-user", "at-8h", Some("rt-8h"), 8 * 3600)
        .await;
    w.clock.advance(4 * 3600 - 1);
    w.keeper.ensure_fresh("acme", "github-user").await.unwrap();
    assert_eq!(w.provider.calls(), 1);
    w.clock.advance(1);
    let r = w.keeper.ensure_fresh("acme", "github-user").await.unwrap();
    assert_eq!(w.provider.calls(), 2);
    assert_eq!(w.now() - start, 4 * 3600);
    assert_eq!(r.expires_at, Some(w.now() + 3600));
}

async fn refreshing_a_fresh_token_is_a_no_op(b: Backend) {
    let w = frozen(b, "idempotent", Behaviour::default(), "").await;
    w.store("alice", "at", Some("rt-0"), 3600).await;
    let before = w.keeper.list_tokens().await.unwrap();
    for _ in 0..3 {
        let r = w.keeper.ensure_fresh("acme", "alice").await.unwrap();
        assert_eq!(r.generation, 1);
        assert_eq!(r.access_token.expose_secret(), "at");
    }
    w.keeper.load_tokens("acme", "alice", true).await.unwrap();
    let after = w.keeper.list_tokens().await.unwrap();
    assert_eq!(w.provider.calls(), 0);
    assert_eq!(
        format!("{before:?}"),
        format!("{after:?}"),
        "no write: same generation, same bookkeeping"
    );
}

async fn a_waiter_that_outlasts_the_lock_wait_gets_a_lock_timeout_and_readers_never_wait(
    b: Backend,
) {
    let w = World::with(
        b,
        "lock-timeout",
        Behaviour::default(),
        "timeout_ms = 500\n",
    )
    .await;
    std::fs::write(
        &w.config_path,
        format!(
            "lock_wait_ms = 1000\n{}",
            std::fs::read_to_string(&w.config_path).unwrap()
        ),
    )
    .unwrap();
    let keeper = w.another_keeper().await;
    w.store("alice", "at-old", Some("rt-0"), -10).await;
    w.store("bob", "at-bob", Some("rt-0"), 3600).await;
    // Another runtime holds alice's row lock (on SQLite: the write lock).
    let store = Store::open(&w.database_url, StoreOptions::default(), w.clock.clone())
        .await
        .unwrap();
    let mut held = store.begin().await.unwrap();
    held.load_for_update("acme", "alice")
        .await
        .unwrap()
        .row
        .unwrap();

    let started = std::time::Instant::now();
    let fresh = keeper.ensure_fresh("acme", "bob").await.unwrap();
    assert_eq!(fresh.access_token.expose_secret(), "at-bob");
    assert!(
        started.elapsed() < Duration::from_millis(900),
        "the hot path takes no lock"
    );

    let e = keeper.ensure_fresh("acme", "alice").await.unwrap_err();
    assert_eq!(e, Error::LockTimeout);
    assert_eq!(w.provider.calls(), 0);
    // Storing and deleting wait for the lock too, and no longer.
    let stored = keeper
        .store_tokens(
            "acme",
            "alice",
            &common::token_set("at-new", Some("rt-new"), Some(w.now() + 3600)),
        )
        .await;
    assert_eq!(stored.unwrap_err(), Error::LockTimeout);
    assert_eq!(
        keeper.delete_tokens("acme", "alice").await.unwrap_err(),
        Error::LockTimeout
    );
    drop(held);
    let r = keeper.ensure_fresh("acme", "alice").await.unwrap();
    assert_ne!(
        r.access_token.expose_secret(),
        "at-old",
        "the timeout harmed nothing"
    );
}

async fn a_slow_writer_loses_the_compare_and_set_to_a_newer_write(b: Backend) {
    let w = World::new(b, "cas").await;
    w.store("alice", "at-1", Some("rt-0"), 3600).await;
    let store = Store::open(&w.database_url, StoreOptions::default(), w.clock.clone())
        .await
        .unwrap();
    let stale = store.read("acme", "alice").await.unwrap().row.unwrap();
    assert_eq!(stale.generation, 1);
    // A newer token lands (generation 2) ...
    w.store("alice", "at-2", Some("rt-0"), 3600).await;
    // ... and the slow runtime's write, based on generation 1, is refused.
    let mut tx = store.begin().await.unwrap();
    let mut overwrite = stale.clone();
    overwrite.generation = 2;
    assert!(!tx.compare_and_set(&overwrite, 1).await.unwrap());
    tx.commit().await.unwrap();
    let r = w.stored("alice").await;
    assert_eq!(r.tokens.access_token.expose_secret(), "at-2");
    assert_eq!(r.generation, 2);
}

/// On Postgres a write that expects the generation its transaction locked
/// is sent with the commit, in one round trip: it must still come before
/// the commit (even on a connection that has not prepared it yet), and a
/// read in the same transaction must still see it.
async fn a_write_under_the_lock_is_read_back_and_is_what_the_next_holder_reads(b: Backend) {
    let w = World::new(b, "held-write").await;
    w.store("alice", "at-1", Some("rt-0"), 3600).await;
    let open = || Store::open(&w.database_url, StoreOptions::default(), w.clock.clone());
    let next = |row: &tokenkeep_host::storage::SealedRow| {
        let mut next = row.clone();
        next.generation += 1;
        next
    };

    // Read back in the same transaction.
    let store = open().await.unwrap();
    let mut tx = store.begin().await.unwrap();
    let locked = locked_alice(&mut tx).await;
    assert!(tx.compare_and_set(&next(&locked), 1).await.unwrap());
    let again = locked_alice(&mut tx).await;
    assert_eq!(again.generation, 2, "a read after the write sees it");
    tx.commit().await.unwrap();

    // Another runtime queued on the lock reads what the holder wrote. Fresh
    // connections: the write is not prepared on any of them yet. A commit
    // that overtook its write would lose the race for the row only now and
    // then (the waiter must wake first), so it runs several times.
    for generation in 2..8 {
        let (holder, other) = (open().await.unwrap(), open().await.unwrap());
        let mut tx = holder.begin().await.unwrap();
        let locked = locked_alice(&mut tx).await;
        let waiter = tokio::spawn(async move {
            let mut tx = other.begin().await.unwrap();
            let read = locked_alice(&mut tx).await;
            tx.commit().await.unwrap();
            read.generation
        });
        if b == Backend::Postgres {
            wait_for_a_lock_waiter(&w.database_url).await;
        }
        assert!(
            tx.compare_and_set(&next(&locked), generation)
                .await
                .unwrap()
        );
        tx.commit().await.unwrap();
        assert_eq!(
            waiter.await.unwrap(),
            generation + 1,
            "the next holder reads the write"
        );
    }
    assert_eq!(w.stored("alice").await.generation, 8);
}

/// acme/alice, locked by `tx`.
async fn locked_alice(
    tx: &mut tokenkeep_host::storage::Transaction,
) -> tokenkeep_host::storage::SealedRow {
    tx.load_for_update("acme", "alice")
        .await
        .unwrap()
        .row
        .unwrap()
}

/// Until a session of the test's database waits for a row lock.
async fn wait_for_a_lock_waiter(database_url: &str) {
    use sqlx::Connection;
    let mut c = sqlx::PgConnection::connect(database_url).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        assert!(
            std::time::Instant::now() < deadline,
            "nobody waited for the lock"
        );
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .fetch_one(&mut c)
        .await
        .unwrap();
        if waiting > 0 {
            return;
        }
        tokio::task::yield_now().await;
    }
}

async fn a_narrowed_scope_is_reported_and_the_rotated_chain_kept(b: Backend) {
    let w = World::with(
        b,
        "scope",
        Behaviour {
            scope: Some("repo".into()),
            ..Default::default()
        },
        "",
    )
    .await;
    w.store("alice", "at-old", Some("rt-0"), -10).await;
    let e = w.keeper.ensure_fresh("acme", "alice").await.unwrap_err();
    assert_eq!(e, Error::ScopeMismatch(vec!["read:user".into()]));
    let stored = w.stored("alice").await;
    assert_eq!(
        stored.tokens.refresh_token.unwrap().expose_secret(),
        &w.provider.current_refresh_token().unwrap(),
        "the rotated refresh token is kept, or the chain would die"
    );
    assert_eq!(stored.tokens.scopes, vec!["repo"]);
    assert_eq!(
        stored.health.last_failure,
        Some(tokenkeep_core::error::ErrorClass::ScopeMismatch)
    );
    // The narrowed token is fresh, but served to no one: not to a second
    // caller, not to another runtime, and the listing says why.
    for keeper in [w.keeper.clone(), w.another_keeper().await] {
        let e = keeper.ensure_fresh("acme", "alice").await.unwrap_err();
        assert_eq!(e, Error::ScopeMismatch(vec!["read:user".into()]));
    }
    let listed = w.keeper.list_tokens().await.unwrap();
    assert_eq!(listed[0].state, tokenkeep_host::TokenState::ScopeNarrowed);
    assert_eq!(listed[0].baseline_scopes, ["repo", "read:user"]);
    assert_eq!(w.provider.calls(), 1);
    // A new authorisation with the scopes it has now is a new baseline.
    w.keeper
        .store_tokens(
            "acme",
            "alice",
            &tokenkeep_host::TokenSet {
                scopes: vec!["repo".into()],
                ..common::token_set("at-new", Some("rt-new"), Some(w.now() + 3600))
            },
        )
        .await
        .unwrap();
    assert!(w.keeper.ensure_fresh("acme", "alice").await.is_ok());
}

async fn keys_rotate_online_and_an_interrupted_rotation_finishes_on_rerun(b: Backend) {
    let w = World::new(b, "rotate").await;
    for user in ["a", "b", "c", "d", "e"] {
        w.store(
            user,
            &format!("at-{user}"),
            Some(&format!("rt-{user}")),
            3600,
        )
        .await;
    }
    let rotated = w.keeper_with_keys(ROTATED_KEYS).await;
    rotated
        .store_tokens(
            "acme",
            "f",
            &token_set("at-f", Some("rt-f"), Some(common::now() + 3600)),
        )
        .await
        .unwrap();
    let status = rotated.key_status().await.unwrap();
    assert_eq!(status.active, "k2");
    assert_eq!(status.rows_per_key.get("k1"), Some(&5));
    assert_eq!(
        status.rows_per_key.get("k2"),
        Some(&1),
        "new writes use the new key"
    );
    // Old rows stay readable while both keys are live.
    assert_eq!(
        rotated
            .ensure_fresh("acme", "a")
            .await
            .unwrap()
            .access_token
            .expose_secret(),
        "at-a"
    );

    // One batch, then the process "dies".
    let (first, next) = rotated.reseal_batch(None, 2).await.unwrap();
    assert_eq!((first.examined, first.resealed), (2, 2));
    assert!(next.is_some());
    assert_eq!(
        rotated.key_status().await.unwrap().rows_per_key.get("k1"),
        Some(&3)
    );

    // The rerun finishes the job and touches nothing twice.
    let rest = rotated.rotate_keys(2).await.unwrap();
    assert_eq!(rest.resealed, 3);
    assert!(rest.undecryptable.is_empty());
    let status = rotated.key_status().await.unwrap();
    assert_eq!(status.rows_per_key.len(), 1);
    assert_eq!(status.rows_per_key.get("k2"), Some(&6));
    assert_eq!(
        rotated.rotate_keys(2).await.unwrap().resealed,
        0,
        "a second run is a no-op"
    );

    // Only the new key is needed now; every token and generation is intact.
    let only_new = w
        .keeper_with_keys("k2=AwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwM=")
        .await;
    for user in ["a", "b", "c", "d", "e", "f"] {
        let r = only_new
            .load_tokens("acme", user, false)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(r.tokens.access_token.expose_secret(), &format!("at-{user}"));
        assert_eq!(
            r.tokens.refresh_token.unwrap().expose_secret(),
            &format!("rt-{user}")
        );
        assert_eq!(r.generation, 1, "re-encryption is not a new token");
    }
}

async fn tampered_rows_and_unknown_keys_fail_to_decrypt_and_stay_as_they_were(b: Backend) {
    let w = World::new(b, "tamper").await;
    for user in ["flip", "unknown", "relabel", "ok"] {
        w.store(user, &format!("at-{user}"), Some("rt"), 3600).await;
    }
    let flip = match b {
        Backend::Postgres => {
            "UPDATE tokenkeep_tokens SET access_token = set_byte(access_token, 20, get_byte(access_token, 20) # 1) WHERE user_id = 'flip'"
        }
        Backend::Sqlite => {
            "UPDATE tokenkeep_tokens SET access_token = substr(access_token, 1, 20) || X'00' || substr(access_token, 22) WHERE user_id = 'flip'"
        }
    };
    raw_sql(&w.database_url, flip).await;
    raw_sql(
        &w.database_url,
        "UPDATE tokenkeep_tokens SET key_id = 'k9' WHERE user_id = 'unknown'",
    )
    .await;
    raw_sql(
        &w.database_url,
        "UPDATE tokenkeep_tokens SET key_id = 'k0' WHERE user_id = 'relabel'",
    )
    .await;
    let before = w.keeper.list_tokens().await.unwrap();
    for user in ["flip", "unknown", "relabel"] {
        let e = w.keeper.ensure_fresh("acme", user).await.unwrap_err();
        assert!(matches!(e, Error::Decryption(_)), "{user}: {e:?}");
        assert!(!e.to_string().contains("at-"), "no plaintext in the error");
    }
    assert!(w.keeper.ensure_fresh("acme", "ok").await.is_ok());
    let rotated = w.keeper_with_keys(ROTATED_KEYS).await;
    let r = rotated.rotate_keys(10).await.unwrap();
    assert_eq!(r.resealed, 1, "only the intact row is re-encrypted");
    let mut bad: Vec<_> = r.undecryptable.iter().map(|(_, u)| u.as_str()).collect();
    bad.sort();
    assert_eq!(bad, vec!["flip", "relabel", "unknown"]);
    let after = w.keeper.list_tokens().await.unwrap();
    for user in ["flip", "unknown", "relabel"] {
        let was = before.iter().find(|s| s.user_id == user).unwrap();
        let now = after.iter().find(|s| s.user_id == user).unwrap();
        assert_eq!(
            format!("{was:?}"),
            format!("{now:?}"),
            "{user} left exactly as it was"
        );
    }
}

async fn the_cli_lists_states_and_deletes(b: Backend) {
    let w = World::new(b, "cli-list").await;
    w.store("fresh-user", "at", Some("rt-0"), 3600).await;
    w.store("due-user", "at", Some("rt-0"), 30).await;
    // An hour-long token with 30 seconds left (a token stored with 30
    // seconds to live is short-lived, and fresh for half of them).
    raw_sql(
        &w.database_url,
        "UPDATE tokenkeep_tokens SET obtained_at = obtained_at - 3600 WHERE user_id = 'due-user'",
    )
    .await;
    w.store("dead-user", "at", Some("rt-dead"), -10).await;
    let _ = w
        .keeper
        .ensure_fresh("acme", "dead-user")
        .await
        .unwrap_err();
    let out = w.cli().args(["tokens", "list", "--json"]).output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let state = |user: &str| {
        text.lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .find(|v| v["user_id"] == user)
            .map(|v| v["state"].as_str().unwrap().to_string())
            .unwrap()
    };
    assert_eq!(state("fresh-user"), "fresh");
    assert_eq!(state("due-user"), "refresh-due");
    assert_eq!(state("dead-user"), "reauthorization-required");
    assert!(
        !text.contains("\"at\"") && !text.contains("rt-0"),
        "no secret in the listing"
    );
    let failure = |user: &str| {
        text.lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .find(|v| v["user_id"] == user)
            .map(|v| v["last_failure"].clone())
            .unwrap()
    };
    assert_eq!(failure("dead-user"), "reauthorization-required");
    assert_eq!(failure("fresh-user"), serde_json::Value::Null);
    let table = w.cli().args(["tokens", "list"]).output().unwrap();
    let table = String::from_utf8_lossy(&table.stdout).into_owned();
    let dead = table.lines().find(|l| l.contains("dead-user")).unwrap();
    assert!(
        dead.matches("reauthorization-required").count() == 2,
        "state and last failure by their documented names: {dead}"
    );
    assert!(!table.contains("Reauthorization"), "{table}");

    assert!(
        w.cli()
            .args(["tokens", "delete", "acme", "fresh-user"])
            .status()
            .unwrap()
            .success()
    );
    let missing = w
        .cli()
        .args(["tokens", "get", "acme", "fresh-user"])
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(3));
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert_eq!(stderr.lines().count(), 1, "one line per failure: {stderr}");
    assert!(stderr.starts_with("tokenkeep: not-found: "), "{stderr}");
    assert!(
        !stderr.contains('\x1b'),
        "no colour when stderr is not a terminal"
    );
    // A class is named once, not twice.
    let down = w
        .cli()
        .env("TOKENKEEP_DATABASE", "postgres://127.0.0.1:1/none")
        .args(["tokens", "get", "acme", "fresh-user"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&down.stderr);
    assert_eq!(down.status.code(), Some(9), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("tokenkeep: storage: ") && !stderr.contains("storage: storage"),
        "{stderr}"
    );
    assert_eq!(
        w.cli()
            .args(["tokens", "delete", "acme", "fresh-user"])
            .output()
            .unwrap()
            .status
            .code(),
        Some(3)
    );
    let keys = w.cli().args(["keys", "status"]).output().unwrap();
    assert!(String::from_utf8_lossy(&keys.stdout).contains("k1: 2 rows (active)"));
    let _ = KEYS;
}

/// The race the lock cannot prevent: a writer outside tokenkeep's lock (an
/// operator storing a new authorisation) lands while a refresh is spending
/// the old token, and the provider answers `invalid_grant`. The refresher
/// re-reads the row behind the writer and returns the new token instead of
/// declaring the user logged out. Postgres only: its lock queue is FIFO,
/// which makes the interleaving deterministic.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn invalid_grant_after_another_write_returns_the_new_token() {
    let w = World::with_delay(Backend::Postgres, "race", Duration::from_millis(800)).await;
    w.store("alice", "at-old", Some("rt-spent-elsewhere"), -10)
        .await;
    let keeper = w.keeper.clone();
    let refresh = tokio::spawn(async move { keeper.ensure_fresh("acme", "alice").await });
    while w.provider.arrived() == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The refresher holds the lock and waits for the provider; the new
    // authorisation queues behind it.
    let other = w.another_keeper().await;
    let store = tokio::spawn(async move {
        other
            .store_tokens(
                "acme",
                "alice",
                &token_set(
                    "at-reauthorised",
                    Some("rt-new"),
                    Some(common::now() + 3600),
                ),
            )
            .await
    });
    let r = refresh.await.unwrap().unwrap();
    assert_eq!(r.access_token.expose_secret(), "at-reauthorised");
    assert_eq!(r.generation, 2);
    store.await.unwrap().unwrap();
}

async fn a_runtime_killed_mid_refresh_is_reported_as_a_lost_rotation(b: Backend) {
    // The provider rotates at once and answers two seconds later.
    let w = World::with(
        b,
        "killed",
        Behaviour {
            answer_delay: Duration::from_secs(2),
            ..Default::default()
        },
        "",
    )
    .await;
    w.store("alice", "at-old", Some("rt-0"), -10).await;
    let mut child = w
        .cli()
        .args(["tokens", "get", "acme", "alice"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while w.provider.calls() == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the refresh never reached the provider"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // SIGKILL after the provider rotated, while its answer is on the way:
    // the row lock dies with the process and the answer goes nowhere.
    child.kill().unwrap();
    child.wait().unwrap();
    w.provider.set(|b| b.answer_delay = Duration::ZERO);

    let e = w.keeper.ensure_fresh("acme", "alice").await.unwrap_err();
    match &e {
        Error::ReauthorizationRequired(m) => assert!(m.contains("interrupted refresh"), "{m}"),
        other => panic!("expected re-authorisation, got {other:?}"),
    }
    let row = w.stored("alice").await;
    assert_eq!(
        row.generation, 1,
        "the row is neither lost nor half-written"
    );
    assert_eq!(row.tokens.access_token.expose_secret(), "at-old");

    // A plain revocation, with no interrupted refresh, says so differently.
    w.store("bob", "at-bob", Some("rt-never-issued"), -10).await;
    match w.keeper.ensure_fresh("acme", "bob").await.unwrap_err() {
        Error::ReauthorizationRequired(m) => assert!(!m.contains("interrupted"), "{m}"),
        other => panic!("expected re-authorisation, got {other:?}"),
    }
}

async fn a_failed_refresh_is_single_flight_too(b: Backend) {
    let w = World::with(
        b,
        "fail-once",
        Behaviour {
            delay: Duration::from_millis(300),
            canned: Some((503, "text/plain".into(), "down".into())),
            ..Default::default()
        },
        "max_attempts = 2\n",
    )
    .await;
    let other = w.another_keeper().await;
    let burst = async |user: &str| {
        w.store(user, "at-old", Some("rt-0"), -10).await;
        let mut tasks = Vec::new();
        for k in [&w.keeper, &other] {
            for _ in 0..4 {
                let (k, user) = (k.clone(), user.to_string());
                tasks.push(tokio::spawn(
                    async move { k.ensure_fresh("acme", &user).await },
                ));
            }
        }
        let mut errors = Vec::new();
        for t in tasks {
            errors.push(t.await.unwrap().unwrap_err());
        }
        errors
    };
    // A provider outage: the waiters take the refresher's answer.
    let errors = burst("alice").await;
    assert!(
        errors
            .iter()
            .all(|e| matches!(e, Error::ProviderUnavailable(_))),
        "{errors:?}"
    );
    assert_eq!(
        w.provider.calls(),
        2,
        "eight callers, one refresher making its two attempts"
    );

    // A refusal: the dead refresh token is spent once, and the refusal stands.
    w.provider.set(|b| b.canned = None);
    w.provider.reset_chain("rt-other");
    let errors = burst("bob").await;
    assert!(
        errors
            .iter()
            .all(|e| matches!(e, Error::ReauthorizationRequired(_))),
        "{errors:?}"
    );
    assert_eq!(w.provider.calls(), 3, "a refusal is not retried");
    assert!(w.keeper.ensure_fresh("acme", "bob").await.is_err());
    assert_eq!(
        w.provider.calls(),
        3,
        "not sent again until a new authorisation"
    );
}

/// On SQLite, a process start finds the schema current with a read: a
/// `tokens get` of a fresh token does not wait behind a refresh that holds
/// the file's write lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_sqlite_a_start_does_not_wait_for_the_write_lock() {
    use sqlx::Connection;
    let w = World::new(Backend::Sqlite, "sqlite-start").await;
    w.store("alice", "at-fresh", Some("rt-0"), 3600).await;
    let path = w.database_url.trim_start_matches("sqlite:").to_string();
    let mut holder = sqlx::SqliteConnection::connect(&format!("sqlite://{path}"))
        .await
        .unwrap();
    sqlx::query("BEGIN IMMEDIATE")
        .execute(&mut holder)
        .await
        .unwrap();
    // The write lock is held (a refresh in flight): a new process starts.
    let started = tokio::time::timeout(Duration::from_secs(10), async {
        let keeper = w.another_keeper().await;
        keeper.ensure_fresh("acme", "alice").await
    })
    .await
    .expect("a start and a read of a fresh token must not wait for the write lock")
    .unwrap();
    assert_eq!(started.access_token.expose_secret(), "at-fresh");
    sqlx::query("ROLLBACK").execute(&mut holder).await.unwrap();
}
