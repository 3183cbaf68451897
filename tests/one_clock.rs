//! One clock: hosts whose own clocks are wrong (15 minutes fast, 15 minutes
//! slow, 3 days ahead) share a Postgres database. Expiry is judged and
//! recorded on the database's clock, so none of them serves a dead token,
//! writes a lifetime that others misread, or records a re-authorisation the
//! provider never asked for.

mod common;

use common::{Backend, World, token_set};
use secrecy::ExposeSecret;
use tokenkeep_host::Clock;

const MINUTE: i64 = 60;
const DAY: i64 = 86_400;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hosts_with_wrong_clocks_serve_no_stale_token_and_force_no_reauthorisation() {
    let w = World::new(Backend::Postgres, "one-clock").await;
    let open = |skew| {
        let w = &w;
        async move {
            common::open_keeper(
                &w.database_url,
                &w.config_path,
                common::KEYS,
                Clock::Skewed(skew),
            )
            .await
        }
    };
    let fast = open(15 * MINUTE).await;
    let slow = open(-15 * MINUTE).await;
    let far = open(3 * DAY).await;
    for keeper in [&fast, &slow, &far] {
        assert!(
            (keeper.now() - w.now()).abs() <= 2,
            "every host tells the database's time"
        );
    }

    // A host 15 minutes fast refreshes: the lifetime it records is counted
    // on the database's clock, not 15 minutes into the future.
    w.store("carol", "at-carol", Some("rt-0"), 30).await;
    let grant = fast.ensure_fresh("acme", "carol").await.unwrap();
    assert_eq!(w.provider.calls(), 1);
    let expires = grant.expires_at.unwrap();
    assert!(
        (expires - (w.now() + 3600)).abs() <= 5,
        "recorded on the database's clock: {expires} vs {}",
        w.now() + 3600
    );

    // A host 15 minutes slow sees a token that dies in 30 seconds: by its own
    // clock it has a quarter of an hour left; it refreshes all the same.
    let chain = w.provider.current_refresh_token().unwrap();
    w.store("dave", "at-dave", Some(&chain), 30).await;
    let grant = slow.ensure_fresh("acme", "dave").await.unwrap();
    assert_ne!(
        grant.access_token.expose_secret(),
        "at-dave",
        "no stale token"
    );
    assert_eq!(w.provider.calls(), 2);

    // A host 3 days ahead sees a refresh token that expires tomorrow: by its
    // own clock it died two days ago. It is valid, and it refreshes.
    let chain = w.provider.current_refresh_token().unwrap();
    let mut set = token_set("at-erin", Some(&chain), Some(w.now() - 10));
    set.refresh_token_expires_at = Some(w.now() + DAY);
    let record = w.keeper.store_tokens("acme", "erin", &set).await.unwrap();
    assert!(far.is_refresh_token_valid(&record).await.unwrap());
    let grant = far.ensure_fresh("acme", "erin").await.unwrap();
    assert_ne!(grant.access_token.expose_secret(), "at-erin");
    assert_eq!(w.provider.calls(), 3);
    let erin = w.stored("erin").await;
    assert_eq!(
        erin.health.last_failure, None,
        "no re-authorisation recorded"
    );
    assert_eq!(erin.generation, 2);
}
