//! What a token costs the database and the provider, counted rather than
//! timed (times are `just bench`'s): database round trips per fresh read and
//! per refresh on Postgres, and provider connections per run of refreshes.

mod common;

use common::{Backend, KEYS, World};
use tokenkeep_host::Clock;

/// Round trips: each time the runtime spoke to the database after the
/// database last spoke (pipelined requests count once), counted by a proxy
/// between them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_read_costs_one_database_round_trip_and_a_refresh_four() {
    let w = World::new(Backend::Postgres, "round-trips").await;
    w.store("warm", "at-warm", Some("rt-0"), -10).await;
    w.store("fresh", "at-fresh", Some("rt-fresh"), 3600).await;
    const REFRESHES: u64 = 10;
    for i in 0..REFRESHES {
        w.provider.add_chain(&format!("rt-u{i}"));
        w.store(&format!("u{i}"), "at-old", Some(&format!("rt-u{i}")), -10)
            .await;
    }
    let proxy = w.proxy().await;
    let keeper = common::open_keeper(
        &proxy.url_through(&w.database_url),
        &w.config_path,
        KEYS,
        Clock::System,
    )
    .await;
    // Connections opened and statements prepared once.
    keeper.ensure_fresh("acme", "warm").await.unwrap();
    keeper.ensure_fresh("acme", "fresh").await.unwrap();

    let before = proxy.round_trips();
    for _ in 0..10 {
        keeper.ensure_fresh("acme", "fresh").await.unwrap();
    }
    let reads = proxy.round_trips() - before;
    assert_eq!(reads, 10, "round trips for ten reads of a fresh token");

    let before = proxy.round_trips();
    for i in 0..REFRESHES {
        let grant = keeper.ensure_fresh("acme", &format!("u{i}")).await.unwrap();
        assert_eq!(grant.generation, 2);
    }
    let per_refresh = (proxy.round_trips() - before) as f64 / REFRESHES as f64;
    eprintln!("{per_refresh} database round trips per refresh");
    // The unlocked read; BEGIN with the locking read; the refresh-start
    // record with its check; the write with the commit.
    assert_eq!(per_refresh, 4.0, "database round trips per refresh");
}

/// A run of refreshes to one provider goes over one connection, counted by
/// the loopback endpoint; so do the refreshes of several runs in a row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_refreshes_to_one_provider_share_one_connection() {
    let w = World::new(Backend::Sqlite, "keep-alive").await;
    const REFRESHES: u64 = 10;
    for i in 0..REFRESHES {
        w.provider.add_chain(&format!("rt-u{i}"));
        w.store(&format!("u{i}"), "at-old", Some(&format!("rt-u{i}")), -10)
            .await;
    }
    for i in 0..REFRESHES {
        let grant = w
            .keeper
            .ensure_fresh("acme", &format!("u{i}"))
            .await
            .unwrap();
        assert_eq!(grant.generation, 2);
    }
    assert_eq!(w.provider.calls(), REFRESHES);
    assert_eq!(
        w.provider.connections(),
        1,
        "connections for {REFRESHES} refreshes in a row"
    );
}
