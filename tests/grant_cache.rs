//! The grant cache: repeated reads of a token valid beyond its refresh
//! window stay in memory, and no change another host committed longer ago
//! than the documented bound is answered from it, however the listening
//! connection fails.

mod common;

use common::{Backend, World, token_set};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokenkeep_host::grant_cache::STALENESS_BOUND;
use tokenkeep_host::{Clock, Error, Keeper};
use tokenkeep_testkit::proxy::BlackHoleProxy;

/// Reads `user` until the keeper's cache holds it (the listener has been
/// heard and a read filled it).
async fn until_cached(keeper: &Keeper, user: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        keeper.ensure_fresh("acme", user).await.unwrap();
        if keeper.cached_grants() >= Some(1) {
            return;
        }
        assert!(Instant::now() < deadline, "the cache never filled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Reads `user` on `keeper` until `done` says the answer reflects a change
/// committed at `committed`, failing if any read begun more than the bound
/// after the commit still answers `old_token`. The lag is returned.
async fn until_seen(
    keeper: &Keeper,
    user: &str,
    committed: Instant,
    old_token: &str,
    done: impl Fn(&Result<tokenkeep_host::AccessGrant, Error>) -> bool,
) -> Duration {
    use secrecy::ExposeSecret;
    let deadline = committed + Duration::from_secs(30);
    loop {
        let began = Instant::now();
        let got = keeper.ensure_fresh("acme", user).await;
        if done(&got) {
            return began - committed;
        }
        if let Ok(g) = &got {
            assert!(
                g.access_token.expose_secret() != old_token || began < committed + STALENESS_BOUND,
                "a read begun {:?} after another host's change answered the old token",
                began - committed
            );
        }
        assert!(Instant::now() < deadline, "the change was never seen");
        tokio::task::yield_now().await;
    }
}

/// Another host (the world's keeper) deletes acme/u; `cached` reads it
/// until it says so, never answering `old_token` past the bound.
async fn deleted_elsewhere(w: &World, cached: &Keeper, old_token: &str) -> Duration {
    assert!(w.keeper.delete_tokens("acme", "u").await.unwrap());
    let committed = Instant::now();
    until_seen(cached, "u", committed, old_token, |got| {
        matches!(got, Err(Error::NotFound { .. }))
    })
    .await
}

/// A world whose acme/u (`at-1`, an hour left) a keeper with a cache holds
/// cached; that keeper reaches the database through a proxy when asked.
async fn cached_u(name: &str, through_proxy: bool) -> (World, Arc<Keeper>, Option<BlackHoleProxy>) {
    let w = World::new(Backend::Postgres, name).await;
    w.store("u", "at-1", Some("rt-1"), 3600).await;
    let proxy = match through_proxy {
        true => Some(w.proxy().await),
        false => None,
    };
    let url = match &proxy {
        Some(p) => p.url_through(&w.database_url),
        None => w.database_url.clone(),
    };
    let cached = w.caching_keeper(&url).await;
    until_cached(&cached, "u").await;
    (w, cached, proxy)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_reads_of_a_fresh_token_do_not_touch_the_database() {
    let w = World::new(Backend::Postgres, "cache-reads").await;
    w.store("fresh", "at-fresh", Some("rt-fresh"), 3600).await;
    let proxy = w.proxy().await;
    let keeper = w.caching_keeper(&proxy.url_through(&w.database_url)).await;
    until_cached(&keeper, "fresh").await;

    let before = proxy.round_trips();
    for _ in 0..200 {
        keeper.ensure_fresh("acme", "fresh").await.unwrap();
    }
    let trips = proxy.round_trips() - before;
    // The listener's heartbeat may fall in the middle: one trip each.
    assert!(
        trips <= 2,
        "{trips} database round trips for 200 cached reads"
    );
    assert_eq!(w.provider.calls(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_hosts_refresh_and_delete_are_never_served_past_the_bound() {
    let (w, cached, _) = cached_u("cache-other-host", false).await;

    // Another host stores a new token (what a refresh there commits).
    w.store("u", "at-2", Some("rt-2"), 3600).await;
    let committed = Instant::now();
    let lag = until_seen(&cached, "u", committed, "at-1", |got| {
        use secrecy::ExposeSecret;
        got.as_ref()
            .is_ok_and(|g| g.access_token.expose_secret() == "at-2")
    })
    .await;
    eprintln!("a store on another host reached the cache after {lag:?}");

    until_cached(&cached, "u").await;
    let lag = deleted_elsewhere(&w, &cached, "at-2").await;
    eprintln!("a delete on another host reached the cache after {lag:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cache_cut_off_from_the_database_stops_serving_within_the_bound() {
    let (w, cached, proxy) = cached_u("cache-black-hole", true).await;
    let proxy = proxy.unwrap();

    // Every connection of the cached host, its listener's included, stops
    // forwarding without closing; then another host deletes the row.
    proxy.black_hole_existing();
    let lag = deleted_elsewhere(&w, &cached, "at-1").await;
    eprintln!("a black-holed cache learnt of the delete after {lag:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn this_hosts_own_writes_are_seen_at_once() {
    let (w, keeper, _) = cached_u("cache-own-writes", false).await;

    keeper
        .store_tokens(
            "acme",
            "u",
            &token_set("at-2", Some("rt-2"), Some(w.now() + 3600)),
        )
        .await
        .unwrap();
    let grant = keeper.ensure_fresh("acme", "u").await.unwrap();
    use secrecy::ExposeSecret;
    assert_eq!(grant.access_token.expose_secret(), "at-2");

    until_cached(&keeper, "u").await;
    assert!(keeper.delete_tokens("acme", "u").await.unwrap());
    assert!(matches!(
        keeper.ensure_fresh("acme", "u").await,
        Err(Error::NotFound { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_token_inside_its_refresh_window_is_refreshed_not_served() {
    let clock = Clock::manual(common::now());
    let w = World::build(
        Backend::Postgres,
        "cache-window",
        Default::default(),
        "",
        clock.clone(),
    )
    .await;
    w.provider.add_chain("rt-u");
    w.store("u", "at-1", Some("rt-u"), 3600).await;
    let keeper: Arc<Keeper> = w.caching_keeper(&w.database_url).await;
    until_cached(&keeper, "u").await;

    // 500 s left: inside the 600 s window.
    clock.advance(3100);
    let grant = keeper.ensure_fresh("acme", "u").await.unwrap();
    assert_eq!(w.provider.calls(), 1, "the due token went to the provider");
    assert_eq!(grant.generation, 2);
}

/// On SQLite every cached read asks the file's change counter first, so a
/// change committed by anyone else (another runtime, a writer outside
/// tokenkeep) is answered by the very next read: no bound at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_sqlite_the_next_read_answers_any_change_committed_elsewhere() {
    use secrecy::ExposeSecret;
    let w = World::new(Backend::Sqlite, "cache-sqlite").await;
    w.store("u", "at-1", Some("rt-1"), 3600).await;
    let cached = w.caching_keeper(&w.database_url).await;
    until_cached(&cached, "u").await;

    // Another runtime (the world's keeper: connections of its own).
    w.store("u", "at-2", Some("rt-2"), 3600).await;
    let got = cached.ensure_fresh("acme", "u").await.unwrap();
    assert_eq!(got.access_token.expose_secret(), "at-2");
    until_cached(&cached, "u").await;

    // A writer outside tokenkeep.
    common::raw_sql(
        &w.database_url,
        "DELETE FROM tokenkeep_tokens WHERE provider = 'acme' AND user_id = 'u'",
    )
    .await;
    assert!(matches!(
        cached.ensure_fresh("acme", "u").await,
        Err(Error::NotFound { .. })
    ));
    assert_eq!(w.provider.calls(), 0);
}

/// A connection of the test's own that listens to the change channel.
struct Ear {
    client: tokio_postgres::Client,
    heard: tokio::sync::mpsc::UnboundedReceiver<(String, String)>,
    markers: u64,
}

impl Ear {
    async fn new(database_url: &str) -> Self {
        use tokio_postgres::AsyncMessage;
        let (client, mut connection) = tokio_postgres::connect(database_url, tokio_postgres::NoTls)
            .await
            .unwrap();
        let (tell, heard) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(Ok(m)) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                if let AsyncMessage::Notification(n) = m {
                    let _ = tell.send((n.channel().to_string(), n.payload().to_string()));
                }
            }
        });
        client
            .batch_execute("LISTEN tokenkeep_tokens; LISTEN test_marker")
            .await
            .unwrap();
        Self {
            client,
            heard,
            markers: 0,
        }
    }

    /// Every change announced since the last call: notifications come in
    /// commit order, so all of them arrive before a marker sent now.
    async fn announced(&mut self) -> Vec<String> {
        self.markers += 1;
        let marker = self.markers.to_string();
        self.client
            .batch_execute(&format!("NOTIFY test_marker, '{marker}'"))
            .await
            .unwrap();
        let mut changes = Vec::new();
        loop {
            let (channel, payload) = self.heard.recv().await.unwrap();
            if channel == "test_marker" && payload == marker {
                return changes;
            }
            if channel == "tokenkeep_tokens" {
                changes.push(payload);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_are_announced_only_once_a_cache_listens() {
    let w = World::new(Backend::Postgres, "cache-announce").await;
    let mut ear = Ear::new(&w.database_url).await;
    w.store("u", "at-1", Some("rt-1"), 3600).await;
    assert_eq!(ear.announced().await, Vec::<String>::new());

    let cached = w.caching_keeper(&w.database_url).await;
    until_cached(&cached, "u").await;
    w.store("u", "at-2", Some("rt-2"), 3600).await;
    assert_eq!(ear.announced().await, vec![r#"["acme", "u"]"#.to_string()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_that_found_announcements_off_lands_before_the_first_cache_listens() {
    let w = World::new(Backend::Postgres, "cache-first-listener").await;
    w.store("u", "at-1", Some("rt-1"), 3600).await;
    let (writer, connection) = tokio_postgres::connect(&w.database_url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    // Another host deletes the row while no cache listens: its trigger
    // finds announcements off, and its commit is still to come.
    writer
        .batch_execute(
            "BEGIN; DELETE FROM tokenkeep_tokens WHERE provider = 'acme' AND user_id = 'u'",
        )
        .await
        .unwrap();
    let cached = w.caching_keeper(&w.database_url).await;
    // The first listener waits for that writer before it turns them on.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        assert!(
            Instant::now() < deadline,
            "the first listener did not wait for the writer"
        );
        let waiting: i64 = writer
            .query_one(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if waiting == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Meanwhile reads go to the database, and see the row.
    cached.ensure_fresh("acme", "u").await.unwrap();
    writer.batch_execute("COMMIT").await.unwrap();
    let committed = Instant::now();
    until_seen(&cached, "u", committed, "at-1", |got| {
        matches!(got, Err(Error::NotFound { .. }))
    })
    .await;
    // And it stays seen once the cache serves.
    let deadline = Instant::now() + Duration::from_secs(20);
    while cached.cached_grants() != Some(0) || Instant::now() < committed + 2 * STALENESS_BOUND {
        assert!(matches!(
            cached.ensure_fresh("acme", "u").await,
            Err(Error::NotFound { .. })
        ));
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
