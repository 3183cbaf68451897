//! Refreshers at the edges: callers that give up mid-refresh, processes
//! told to stop, many callers of one process on one slow token, and
//! refreshers cut off from the database.

mod common;

use common::{Backend, KEYS, World};
use secrecy::ExposeSecret;
use std::process::Stdio;
use std::time::Instant;
use tokenkeep_host::Clock;
use tokenkeep_testkit::devprovider::Behaviour;

on_both_backends!(
    a_caller_that_gives_up_mid_refresh_does_not_lose_the_rotated_token,
    sigterm_lets_a_refresh_in_flight_commit_before_the_cli_exits,
    a_valid_token_is_served_at_once_while_another_runtime_refreshes_it,
    a_refused_refresh_serves_the_still_valid_token_and_the_row_records_it,
    listing_and_key_status_page_through_two_hundred_thousand_rows,
    after_an_outage_new_callers_wait_out_the_retry_after_instead_of_stampeding,
);

async fn after_an_outage_new_callers_wait_out_the_retry_after_instead_of_stampeding(b: Backend) {
    let w = World::new(b, "retry-after").await;
    w.store("alice", "at-old", Some("rt-0"), -10).await;
    w.provider.set(|b| {
        b.raw = Some(
            b"HTTP/1.1 503 Service Unavailable\r\nretry-after: 120\r\ncontent-length: 0\r\n\r\n"
                .to_vec(),
        )
    });
    let e = w.keeper.ensure_fresh("acme", "alice").await.unwrap_err();
    assert!(
        matches!(e, tokenkeep_host::Error::ProviderUnavailable(_)),
        "{e}"
    );
    let calls = w.provider.calls();
    // The provider is back, but asked not to be asked for two minutes: the
    // callers of two runtimes get the recorded outage and send nothing.
    w.provider.set(|b| b.raw = None);
    let other = w.another_keeper().await;
    let callers: Vec<_> = (0..20)
        .map(|i| {
            let keeper = if i % 2 == 0 {
                w.keeper.clone()
            } else {
                other.clone()
            };
            tokio::spawn(async move { keeper.ensure_fresh("acme", "alice").await })
        })
        .collect();
    for caller in callers {
        let e = caller.await.unwrap().unwrap_err();
        assert!(
            matches!(e, tokenkeep_host::Error::ProviderUnavailable(_)),
            "{e}"
        );
    }
    assert_eq!(w.provider.calls(), calls, "no stampede");
    let listed = w.keeper.list_tokens().await.unwrap();
    let until = listed[0].health.retry_not_before.unwrap();
    assert!((119..=121).contains(&(until - w.now())), "{until}");
}

/// Stores alice's token valid for `expires_in` seconds more, obtained an
/// hour earlier: inside its refresh window, but valid.
async fn store_due_but_valid(w: &World, expires_in: i64) {
    w.store("alice", "at-old", Some("rt-0"), expires_in).await;
    common::raw_sql(
        &w.database_url,
        "UPDATE tokenkeep_tokens SET obtained_at = obtained_at - 3600",
    )
    .await;
}

async fn a_valid_token_is_served_at_once_while_another_runtime_refreshes_it(b: Backend) {
    let w = World::new(b, "no-wait").await;
    store_due_but_valid(&w, 300).await;
    w.provider.hold_answers();
    let other = w.another_keeper().await;
    let refresher = tokio::spawn(async move { other.ensure_fresh("acme", "alice").await });
    // The other runtime holds the row lock while its provider stalls ...
    w.provider.wait_until(|p| p.calls() == 1).await;
    // ... and this one is served the token it read, valid for minutes, at
    // once: not after the other's refresh, and not a lock timeout.
    let grant = w.keeper.ensure_fresh("acme", "alice").await.unwrap();
    assert_eq!(grant.access_token.expose_secret(), "at-old");
    assert_eq!(grant.generation, 1);
    w.provider.release_answers();
    assert_eq!(refresher.await.unwrap().unwrap().generation, 2);
    assert_eq!(w.provider.calls(), 1);
}

async fn a_refused_refresh_serves_the_still_valid_token_and_the_row_records_it(b: Backend) {
    let w = World::new(b, "refused-valid").await;
    store_due_but_valid(&w, 300).await;
    w.provider.set(|b| {
        b.canned = Some((
            400,
            "application/json".into(),
            r#"{"error":"invalid_grant"}"#.into(),
        ))
    });
    let grant = w.keeper.ensure_fresh("acme", "alice").await.unwrap();
    assert_eq!(grant.access_token.expose_secret(), "at-old");
    let listed = w.keeper.list_tokens().await.unwrap();
    assert_eq!(
        listed[0].state,
        tokenkeep_host::TokenState::ReauthorizationRequired,
        "nothing silent: the listing shows the refusal"
    );
    // The refusal stands: the dead refresh token is not sent again, and the
    // valid token is still served.
    let again = w.keeper.ensure_fresh("acme", "alice").await.unwrap();
    assert_eq!(again.access_token.expose_secret(), "at-old");
    assert_eq!(w.provider.calls(), 1);
}

/// The stored refresh token is the one the provider will accept next, and
/// the chain still refreshes.
async fn assert_chain_alive(w: &World, user: &str, generation: u64) {
    let stored = w.stored(user).await;
    assert_eq!(stored.generation, generation);
    assert_eq!(
        stored
            .tokens
            .refresh_token
            .as_ref()
            .map(|t| t.expose_secret().to_string()),
        w.provider.current_refresh_token(),
        "the rotated refresh token was saved"
    );
    assert_eq!(w.provider.reuses(), 0);
}

async fn a_caller_that_gives_up_mid_refresh_does_not_lose_the_rotated_token(b: Backend) {
    let w = World::new(b, "give-up").await;
    w.store("alice", "at-old", Some("rt-0"), -10).await;
    w.provider.hold_answers();
    let keeper = w.keeper.clone();
    let caller = tokio::spawn(async move { keeper.ensure_fresh("acme", "alice").await });
    // The provider has rotated the chain; its answer is on hold.
    w.provider.wait_until(|p| p.calls() == 1).await;
    caller.abort();
    assert!(caller.await.unwrap_err().is_cancelled());
    w.provider.release_answers();
    w.keeper.shutdown().await;
    assert_chain_alive(&w, "alice", 2).await;
    // The next caller is served what the abandoned refresh saved.
    let grant = w.keeper.ensure_fresh("acme", "alice").await.unwrap();
    assert_eq!(grant.generation, 2);
    assert_eq!(w.provider.calls(), 1);
}

async fn sigterm_lets_a_refresh_in_flight_commit_before_the_cli_exits(b: Backend) {
    let w = World::new(b, "sigterm").await;
    w.store("alice", "at-old", Some("rt-0"), -10).await;
    w.provider.hold_answers();
    let child = w
        .cli()
        .args(["tokens", "get", "acme", "alice"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    w.provider.wait_until(|p| p.calls() == 1).await;
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    // The signal is in; only then may the answer come.
    let exited = tokio::task::spawn_blocking(move || child.wait_with_output());
    w.provider.release_answers();
    let out = exited.await.unwrap().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(143), "stderr: {stderr}");
    assert_eq!(
        stderr.lines().collect::<Vec<_>>(),
        ["tokenkeep: interrupted: refreshes in flight were saved first"]
    );
    assert!(out.stdout.is_empty(), "no token printed after the signal");
    assert_chain_alive(&w, "alice", 2).await;
}

/// Sixty-four callers of one process on a token whose provider stalls hold
/// one transaction between them, and a token of another provider in the same
/// process refreshes meanwhile (Postgres: SQLite's write lock is the file's).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn callers_of_one_process_share_one_refresh_and_leave_connections_for_other_tokens() {
    let mut w = World::new(Backend::Postgres, "share").await;
    let other = w.add_provider("beta", Behaviour::default()).await;
    w.store("alice", "at-old", Some("rt-0"), -10).await;
    w.keeper
        .store_tokens(
            "beta",
            "bob",
            &common::token_set("at-beta", Some("rt-0"), Some(w.now() - 10)),
        )
        .await
        .unwrap();
    w.provider.hold_answers();
    let callers: Vec<_> = (0..64)
        .map(|_| {
            let keeper = w.keeper.clone();
            tokio::spawn(async move { keeper.ensure_fresh("acme", "alice").await })
        })
        .collect();
    w.provider.wait_until(|p| p.calls() == 1).await;
    let connections = tokenkeep_connections(&w.database_url).await;
    let beta = w.keeper.ensure_fresh("beta", "bob").await.unwrap();
    assert_eq!(beta.generation, 2);
    assert_eq!(other.calls(), 1);
    w.provider.release_answers();
    let mut tokens = std::collections::HashSet::new();
    for caller in callers {
        let grant = caller.await.unwrap().unwrap();
        tokens.insert(grant.access_token.expose_secret().to_string());
    }
    assert_eq!(tokens.len(), 1, "one refresh, one token for all 64");
    assert_eq!(w.provider.calls(), 1);
    // The one locked transaction; none parked on its lock.
    assert_eq!(
        connections, 1,
        "64 waiting callers held {connections} transactions"
    );
}

/// Connections of tokenkeep's to the test's database that hold a
/// transaction open or wait for a lock.
async fn tokenkeep_connections(database_url: &str) -> i64 {
    use sqlx::Connection;
    let mut c = sqlx::PgConnection::connect(database_url).await.unwrap();
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity \
         WHERE datname = current_database() AND application_name = 'tokenkeep' \
         AND (state = 'idle in transaction' OR wait_event_type = 'Lock')",
    )
    .fetch_one(&mut c)
    .await
    .unwrap()
}

/// A refresher whose database connection goes silent (a partition, a
/// dropped NAT entry) after the provider rotated the token: it releases the
/// row lock within the statement bound and the rotated token is saved.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refresher_cut_off_from_the_database_releases_the_lock_and_saves_the_rotated_token() {
    let w = World::new(Backend::Postgres, "black-hole").await;
    w.store("alice", "at-old", Some("rt-0"), -10).await;
    let proxy = w.proxy().await;
    let cut_off = common::open_keeper(
        &proxy.url_through(&w.database_url),
        &w.config_path,
        KEYS,
        Clock::System,
    )
    .await;
    w.provider.hold_answers();
    let refresher = tokio::spawn(async move { cut_off.ensure_fresh("acme", "alice").await });
    w.provider.wait_until(|p| p.calls() == 1).await;
    proxy.black_hole_existing();
    let cut = Instant::now();
    w.provider.release_answers();
    // Another runtime, with a working connection, waits for the row's lock.
    let seen = w
        .keeper
        .load_tokens("acme", "alice", true)
        .await
        .unwrap()
        .unwrap();
    let held = cut.elapsed();
    assert_eq!(seen.generation, 2, "the rotated tokens were saved");
    let grant = refresher.await.unwrap().unwrap();
    assert_eq!(grant.generation, 2);
    assert_eq!(
        grant.access_token.expose_secret(),
        seen.tokens.access_token.expose_secret()
    );
    assert_chain_alive(&w, "alice", 2).await;
    eprintln!("row lock held {held:?} after the cut; the rotated token was saved");
}

/// The write of a refresh goes with the commit; when the database refuses
/// it there (here a trigger of the test's that refuses the first update of
/// any row; in production a lock or statement timeout), the rotated token
/// is still saved another way, as when the connection is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refreshed_row_the_database_refuses_at_commit_is_saved_another_way() {
    let w = World::new(Backend::Postgres, "refused-at-commit").await;
    w.store("alice", "at-old", Some("rt-0"), -10).await;
    for sql in [
        "CREATE SEQUENCE refuse_once",
        "CREATE FUNCTION refuse_once() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
         IF nextval('refuse_once') = 1 THEN RAISE EXCEPTION 'refused once'; END IF; \
         RETURN NEW; END $$",
        "CREATE TRIGGER refuse_once BEFORE UPDATE ON tokenkeep_tokens \
         FOR EACH ROW EXECUTE FUNCTION refuse_once()",
    ] {
        common::raw_sql(&w.database_url, sql).await;
    }
    let grant = w.keeper.ensure_fresh("acme", "alice").await.unwrap();
    assert_eq!(grant.generation, 2);
    assert_chain_alive(&w, "alice", 2).await;
}

/// The database ends the refresher's session (`pg_terminate_backend`, a
/// failover) while the provider rotates: the answer is saved all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refresher_whose_session_is_terminated_mid_call_saves_the_rotated_token() {
    let w = World::new(Backend::Postgres, "terminated").await;
    w.store("alice", "at-old", Some("rt-0"), -10).await;
    w.provider.hold_answers();
    let keeper = w.keeper.clone();
    let refresher = tokio::spawn(async move { keeper.ensure_fresh("acme", "alice").await });
    w.provider.wait_until(|p| p.calls() == 1).await;
    common::raw_sql(
        &w.database_url,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = current_database() AND application_name = 'tokenkeep' \
         AND state = 'idle in transaction'",
    )
    .await;
    w.provider.release_answers();
    let grant = refresher.await.unwrap().unwrap();
    assert_eq!(grant.generation, 2);
    assert_chain_alive(&w, "alice", 2).await;
}

async fn listing_and_key_status_page_through_two_hundred_thousand_rows(b: Backend) {
    const ROWS: usize = 200_000;
    let w = World::new(b, "200k").await;
    w.store("alice", "at-alice", Some("rt-0"), 3600).await;
    // Copies of alice's sealed row under other user ids (listings never
    // open tokens), every other one under the older key.
    let copies = "SELECT provider, 'bulk-' || n, CASE WHEN n % 2 = 0 THEN 'k0' ELSE key_id END, \
         access_token, refresh_token, access_token_expires_at, refresh_token_expires_at, scopes, \
         obtained_at, generation, failed_attempts, last_failure_at, last_failure, last_success_at, \
         refresh_started_at, updated_at FROM tokenkeep_tokens, seq WHERE user_id = 'alice'";
    let insert = "INSERT INTO tokenkeep_tokens (provider, user_id, key_id, access_token, \
         refresh_token, access_token_expires_at, refresh_token_expires_at, scopes, obtained_at, \
         generation, failed_attempts, last_failure_at, last_failure, last_success_at, \
         refresh_started_at, updated_at) ";
    let series = match b {
        Backend::Postgres => format!(
            "WITH seq AS (SELECT generate_series(1, {}) AS n) ",
            ROWS - 1
        ),
        Backend::Sqlite => format!(
            "WITH RECURSIVE seq(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM seq WHERE n < {}) ",
            ROWS - 1
        ),
    };
    common::raw_sql(&w.database_url, &format!("{series}{insert}{copies}")).await;

    let out = w.cli().args(["tokens", "list", "--json"]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut users = Vec::with_capacity(ROWS);
    for line in String::from_utf8(out.stdout).unwrap().lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        users.push(v["user_id"].as_str().unwrap().to_string());
    }
    assert_eq!(users.len(), ROWS, "every row, once");
    assert!(
        users.windows(2).all(|p| p[0] < p[1]),
        "in order, no repeats"
    );

    let out = w.cli().args(["keys", "status", "--json"]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["active"], "k1");
    // Copies 2, 4, … 199998 under k0; alice and the odd copies under k1.
    assert_eq!(status["rows_per_key"]["k0"], ROWS as u64 / 2 - 1);
    assert_eq!(status["rows_per_key"]["k1"], ROWS as u64 / 2 + 1);
}

/// A command needs the secrets of the providers it refreshes, no others.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn only_the_providers_a_command_uses_need_their_secrets() {
    const UNSET: &str = "TOKENKEEP_TEST_UNSET_CLIENT_SECRET";
    let mut w = World::new(Backend::Sqlite, "unset-secret").await;
    w.add_config(&format!(
        "\n[providers.other]\ntoken_url = \"https://other.example/token\"\n\
         client_id = \"x\"\nclient_secret_env = \"{UNSET}\"\n"
    ))
    .await;
    w.store("alice", "at-alice", Some("rt-0"), -10).await;
    w.keeper
        .store_tokens(
            "other",
            "bob",
            &common::token_set("at-bob", Some("rt-bob"), Some(w.now() - 10)),
        )
        .await
        .unwrap();
    let run = |args: &[&str]| {
        w.cli()
            .args(args)
            .env_remove(UNSET)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    for args in [
        &["tokens", "list"][..],
        &["keys", "status"],
        &["tokens", "get", "acme", "alice"],
    ] {
        let out = run(args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.stderr.is_empty(),
            "{args:?}: nothing on stderr on success"
        );
    }
    // Refreshing the provider whose secret is missing is refused, with
    // nothing sent, and says which variable to set.
    let out = run(&["tokens", "get", "other", "bob"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(14), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains(UNSET), "{stderr}");
}

/// Some servers answer every failed refresh with a 400 and an empty body: a
/// refusal, recorded, and the dead refresh token is not sent again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_bare_400_is_a_refusal_that_stands() {
    let w = World::new(Backend::Sqlite, "bare-400").await;
    w.store("alice", "at-old", Some("rt-0"), -10).await;
    w.provider
        .set(|b| b.canned = Some((400, "text/plain".into(), String::new())));
    for _ in 0..3 {
        let e = w.keeper.ensure_fresh("acme", "alice").await.unwrap_err();
        assert!(
            matches!(e, tokenkeep_host::Error::ReauthorizationRequired(_)),
            "{e}"
        );
    }
    assert_eq!(
        w.provider.calls(),
        1,
        "the dead refresh token was sent once"
    );
    let listed = w.keeper.list_tokens().await.unwrap();
    assert_eq!(
        listed[0].state,
        tokenkeep_host::TokenState::ReauthorizationRequired
    );
}

/// A provider behind a private CA and a corporate proxy: an untrusted
/// certificate is a configuration error with nothing sent; with the CA
/// bundle configured the refresh works, through `HTTPS_PROXY` unless
/// `NO_PROXY` exempts the host.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_provider_behind_a_private_ca_and_a_proxy_is_reached_as_configured() {
    use tokenkeep_testkit::devprovider::DevProvider;
    use tokenkeep_testkit::proxy::ConnectProxy;
    use tokenkeep_testkit::tls::TestCa;
    let ca = TestCa::new();
    let private = DevProvider::start_tls(Behaviour::default(), "rt-a", ca.server.clone())
        .await
        .unwrap();
    private.add_chain("rt-b");
    private.add_chain("rt-c");
    let mut w = World::new(Backend::Sqlite, "private-ca").await;
    let bundle = w.scratch.0.join("company-ca.pem");
    std::fs::write(&bundle, &ca.ca_pem).unwrap();
    let url = private.token_url();
    w.add_config(&format!(
        "\n[providers.untrusted]\ntoken_url = \"{url}\"\nclient_id = \"dev-client\"\n\
         client_secret = \"dev-secret\"\n\
         \n[providers.private]\ntoken_url = \"{url}\"\nclient_id = \"dev-client\"\n\
         client_secret = \"dev-secret\"\nca_bundle = \"{}\"\n",
        bundle.display()
    ))
    .await;
    let expired = |refresh: &str| common::token_set("at-old", Some(refresh), Some(w.now() - 10));
    for (provider, user, refresh) in [
        ("untrusted", "alice", "rt-a"),
        ("private", "bob", "rt-b"),
        ("private", "carol", "rt-c"),
    ] {
        w.keeper
            .store_tokens(provider, user, &expired(refresh))
            .await
            .unwrap();
    }
    let proxy = ConnectProxy::start().await.unwrap();
    let get = |provider: &str, user: &str, env: &[(&str, &str)]| {
        let mut cmd = w.cli();
        cmd.args(["tokens", "get", provider, user])
            .env_remove("HTTPS_PROXY")
            .env_remove("https_proxy")
            .env_remove("NO_PROXY")
            .env_remove("no_proxy");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };

    let (code, stderr) = get("untrusted", "alice", &[]);
    assert_eq!(code, Some(14), "{stderr}");
    assert!(stderr.contains("ca_bundle"), "says what to do: {stderr}");
    assert_eq!(private.arrived(), 0, "nothing was sent");

    let (code, stderr) = get("private", "bob", &[("HTTPS_PROXY", &proxy.url())]);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(proxy.tunnels(), 1, "through the proxy");

    let exempt = [
        ("HTTPS_PROXY", proxy.url()),
        ("NO_PROXY", "localhost,127.0.0.1".into()),
    ];
    let exempt: Vec<(&str, &str)> = exempt.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let (code, stderr) = get("private", "carol", &exempt);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(proxy.tunnels(), 1, "NO_PROXY: straight to the provider");
    assert_eq!(private.calls(), 2);
}
