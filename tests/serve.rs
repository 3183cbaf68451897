//! `tokenkeep serve`: the HTTP API on a Unix socket and a loopback port,
//! driven by concurrent clients, with real processes on a real database.

mod common;

use common::service::{self, Endpoint, OPS_KEY, Reply, Service, TENANT_A_KEY, request, segment};
use common::{Backend, World, token_set};
use secrecy::ExposeSecret;
use std::collections::{HashMap, HashSet};
use std::time::Duration;

/// A world whose configuration carries the `[serve]` section, without the
/// background refresher.
async fn served(backend: Backend, name: &str) -> World {
    let mut w = World::new(backend, name).await;
    w.add_config(&service::serve_section(service::NO_REFRESHER))
        .await;
    w
}

async fn get(at: &Endpoint, path: &str, key: Option<&str>) -> Reply {
    request(at, "GET", path, key, None).await
}

fn access_path(provider: &str, user: &str) -> String {
    format!(
        "/v1/tokens/{}/{}/access-token",
        segment(provider),
        segment(user)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_services_on_one_database_refresh_each_token_once_per_expiry() {
    const USERS: usize = 6;
    const CLIENTS_PER_USER: usize = 8;
    let w = served(Backend::Postgres, "serve-two").await;
    // Long enough that every client asks while the first refresh is out.
    w.provider.set(|p| p.delay = Duration::from_millis(300));
    w.store_chains(USERS, -10).await;
    let services = [
        Service::start(&w, "one", "warn"),
        Service::start(&w, "two", "warn"),
    ];
    let endpoints: Vec<Endpoint> = services.iter().flat_map(|s| [s.unix(), s.tcp()]).collect();
    for round in 1..=2 {
        if round == 2 {
            // Every token expires again.
            common::raw_sql(
                &w.database_url,
                &format!(
                    "UPDATE tokenkeep_tokens SET access_token_expires_at = {}",
                    common::now() - 10
                ),
            )
            .await;
        }
        let mut clients = Vec::new();
        for i in 0..USERS {
            for c in 0..CLIENTS_PER_USER {
                let at = endpoints[(i + c) % endpoints.len()].clone();
                let path = access_path("acme", &format!("user-{i}"));
                clients.push(tokio::spawn(async move {
                    (i, get(&at, &path, Some(OPS_KEY)).await)
                }));
            }
        }
        let mut tokens: HashMap<usize, HashSet<String>> = HashMap::new();
        for client in clients {
            let (i, reply) = client.await.unwrap();
            assert_eq!(reply.status, 200, "round {round}: {:?}", reply.json());
            assert_eq!(reply.header("cache-control"), Some("no-store"));
            let grant = reply.json();
            let token = grant["access_token"].as_str().unwrap().to_string();
            assert!(token.starts_with("dev-at-"), "a refreshed token: {token}");
            assert!(grant.get("refresh_token").is_none());
            tokens.entry(i).or_default().insert(token);
        }
        assert!(
            tokens.values().all(|t| t.len() == 1),
            "round {round}: every client of a user got the same token: {tokens:?}"
        );
        assert_eq!(
            w.provider.calls() as usize,
            USERS * round,
            "round {round}: one provider call per token"
        );
    }
    assert_eq!(w.provider.reuses(), 0);
    assert_eq!(w.provider.revoked_chains(), 0);
    // What the two services' /metrics say, summed, is what happened.
    let mut scraped = String::new();
    for s in &services {
        assert_eq!(get(&s.unix(), "/metrics", None).await.status, 401);
        let reply = get(&s.tcp(), "/metrics", Some(OPS_KEY)).await;
        assert_eq!(reply.status, 200);
        scraped.push_str(&String::from_utf8(reply.body).unwrap());
    }
    let m = |name: &str, labels: &[(&str, &str)]| service::metric(&scraped, name, labels) as usize;
    let calls = USERS * 2;
    let reads = USERS * CLIENTS_PER_USER * 2;
    let acme_ok = [("provider", "acme"), ("outcome", "ok")];
    assert_eq!(m("tokenkeep_refreshes_total", &acme_ok), calls);
    assert_eq!(
        m(
            "tokenkeep_provider_requests_total",
            &[("provider", "acme"), ("answer", "2xx")]
        ),
        calls
    );
    assert_eq!(
        m(
            "tokenkeep_provider_request_duration_seconds_count",
            &[("provider", "acme")]
        ),
        calls
    );
    assert_eq!(m("tokenkeep_token_reads_total", &acme_ok), reads);
    let route = ("route", "/v1/tokens/{provider}/{user}/access-token");
    assert_eq!(
        m("tokenkeep_http_requests_total", &[route, ("status", "200")]),
        reads
    );
    assert!(m("tokenkeep_component_instantiations_total", &[]) >= calls);
    assert_eq!(m("tokenkeep_component_traps_total", &[]), 0);
    assert!(m("tokenkeep_lock_wait_seconds_count", &[]) >= calls);
    assert!(m("tokenkeep_db_connections", &[("state", "max")]) > 0);
    for s in &services {
        assert_eq!(s.stderr(), "", "nothing on stderr at the default level");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_or_wrong_key_gets_401_and_nothing_else() {
    let w = served(Backend::Sqlite, "serve-401").await;
    w.store("alice", "at-alice", Some("rt-0"), 3600).await;
    let s = Service::start(&w, "api", "warn");
    let path = access_path("acme", "alice");
    for at in [s.unix(), s.tcp()] {
        for key in [None, Some("wrong-key-0123456789"), Some("")] {
            let reply = get(&at, &path, key).await;
            assert_eq!(reply.status, 401, "{key:?}");
            assert_eq!(reply.class(), "unauthorized");
            assert_eq!(
                reply.json().as_object().unwrap().len(),
                2,
                "error and message only"
            );
            assert!(!String::from_utf8_lossy(&reply.body).contains("at-alice"));
            assert_eq!(
                reply.header("www-authenticate"),
                Some("Bearer realm=\"tokenkeep\"")
            );
        }
        // Another scheme carrying the right key is still no bearer key.
        let basic = service::exchange(
            &at,
            format!(
                "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Basic {OPS_KEY}\r\n\r\n"
            )
            .as_bytes(),
        )
        .await;
        assert_eq!(basic.status, 401);
        let ok = get(&at, &path, Some(OPS_KEY)).await;
        assert_eq!(ok.status, 200);
        assert_eq!(ok.json()["access_token"], "at-alice");
    }
    // Health and readiness need no key; the API description does.
    assert_eq!(get(&s.unix(), "/healthz", None).await.status, 200);
    assert_eq!(
        get(&s.unix(), "/readyz", None).await.json()["status"],
        "ready"
    );
    assert_eq!(get(&s.unix(), "/v1/openapi.json", None).await.status, 401);
    let doc = get(&s.unix(), "/v1/openapi.json", Some(OPS_KEY))
        .await
        .json();
    assert_eq!(doc["openapi"], "3.1.0");
    assert!(doc["paths"]["/v1/tokens/{provider}/{user}/access-token"].is_object());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_outside_its_scope_gets_403_and_lists_only_its_own_tokens() {
    let mut w = served(Backend::Sqlite, "serve-403").await;
    let _other = w.add_provider("globex", Default::default()).await;
    for user in ["a:alice", "a:ann", "b:bob"] {
        w.store(user, &format!("at-{user}"), Some("rt-0"), 3600)
            .await;
    }
    w.keeper
        .store_tokens("globex", "a:alice", &token_set("at-globex", None, None))
        .await
        .unwrap();
    let s = Service::start(&w, "api", "warn");
    let at = s.unix();
    let mine = get(&at, &access_path("acme", "a:alice"), Some(TENANT_A_KEY)).await;
    assert_eq!(mine.status, 200);
    for (provider, user) in [("acme", "b:bob"), ("globex", "a:alice"), ("acme", "ab:x")] {
        let theirs = get(&at, &access_path(provider, user), Some(TENANT_A_KEY)).await;
        assert_eq!(theirs.status, 403, "{provider}/{user}");
        assert_eq!(theirs.class(), "forbidden");
        assert!(!String::from_utf8_lossy(&theirs.body).contains("at-"));
        let state = get(
            &at,
            &format!("/v1/tokens/{provider}/{}", segment(user)),
            Some(TENANT_A_KEY),
        )
        .await;
        assert_eq!(state.status, 403);
        let delete = request(
            &at,
            "DELETE",
            &format!("/v1/tokens/{provider}/{}", segment(user)),
            Some(TENANT_A_KEY),
            None,
        )
        .await;
        assert_eq!(delete.status, 403);
    }
    // Its listing holds its own tokens only, page after page.
    let mut seen = Vec::new();
    let mut next = String::from("/v1/tokens?limit=1");
    loop {
        let page = get(&at, &next, Some(TENANT_A_KEY)).await.json();
        for t in page["tokens"].as_array().unwrap() {
            assert!(t.get("access_token").is_none());
            seen.push(format!(
                "{}/{}",
                t["provider"].as_str().unwrap(),
                t["user_id"].as_str().unwrap()
            ));
        }
        match page["next"].as_object() {
            Some(n) => {
                // A cursor names one of its own rows, never another tenant's.
                assert!(n["after_user"].as_str().unwrap().starts_with("a:"), "{n:?}");
                next = format!(
                    "/v1/tokens?limit=1&after_provider={}&after_user={}",
                    segment(n["after_provider"].as_str().unwrap()),
                    segment(n["after_user"].as_str().unwrap())
                )
            }
            None => break,
        }
    }
    assert_eq!(seen, ["acme/a:alice", "acme/a:ann"]);
    let all = get(&at, "/v1/tokens", Some(OPS_KEY)).await.json();
    assert_eq!(all["tokens"].as_array().unwrap().len(), 4);
    assert!(all["next"].is_null());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_oversized_bodies_get_json_errors_and_change_nothing() {
    let w = served(Backend::Sqlite, "serve-bodies").await;
    w.store("alice", "at-alice", Some("rt-0"), 3600).await;
    let s = Service::start(&w, "api", "warn");
    let at = s.tcp();
    let path = "/v1/tokens/acme/alice";
    let put = |body: Vec<u8>| {
        let at = at.clone();
        async move { request(&at, "PUT", path, Some(OPS_KEY), Some(&body)).await }
    };
    for (body, why) in [
        (b"{not json".to_vec(), "not JSON"),
        (b"".to_vec(), "empty"),
        (br#"{"refresh_token":"rt-new"}"#.to_vec(), "no access token"),
        (
            br#"{"access_token":"at-x","expires_in":"soon"}"#.to_vec(),
            "bad expires_in",
        ),
        (br#"["access_token"]"#.to_vec(), "not an object"),
    ] {
        let reply = put(body).await;
        assert_eq!(reply.status, 400, "{why}: {:?}", reply.json());
        assert_eq!(reply.class(), "invalid-input", "{why}");
        assert!(
            !String::from_utf8_lossy(&reply.body).contains("rt-new"),
            "{why}: the body is not quoted"
        );
    }
    // Oversized, declared and chunked.
    let big = format!(r#"{{"access_token":"{}"}}"#, "x".repeat(5000));
    let reply = put(big.clone().into_bytes()).await;
    assert_eq!(reply.status, 413);
    assert_eq!(reply.class(), "body-too-large");
    let chunked = format!(
        "PUT {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer {OPS_KEY}\r\n\
         Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{big}\r\n0\r\n\r\n",
        big.len()
    );
    let reply = service::exchange(&at, chunked.as_bytes()).await;
    assert_eq!(reply.status, 413);
    assert_eq!(reply.class(), "body-too-large");
    // Hostile ids and unknown routes: typed, JSON.
    let reply = get(&at, "/v1/tokens/acme/%00alice/access-token", Some(OPS_KEY)).await;
    assert_eq!(
        (reply.status, reply.class().as_str()),
        (400, "invalid-input")
    );
    let reply = get(
        &at,
        "/v1/tokens/no%20such/alice/access-token",
        Some(OPS_KEY),
    )
    .await;
    assert_eq!(reply.status, 400, "{:?}", reply.json());
    let reply = get(&at, "/v1/tokens/nope/alice/access-token", Some(OPS_KEY)).await;
    assert_eq!(
        (reply.status, reply.class().as_str()),
        (404, "unknown-provider")
    );
    let reply = get(&at, "/v1/tokens/acme/nobody/access-token", Some(OPS_KEY)).await;
    assert_eq!((reply.status, reply.class().as_str()), (404, "not-found"));
    let reply = get(&at, "/v2/anything", Some(OPS_KEY)).await;
    assert_eq!(
        (reply.status, reply.class().as_str()),
        (404, "unknown-endpoint")
    );
    let reply = request(&at, "POST", path, Some(OPS_KEY), Some(b"{}")).await;
    assert_eq!(
        (reply.status, reply.class().as_str()),
        (405, "method-not-allowed")
    );
    // Nothing was stored: the token is what it was.
    let reply = get(&at, &access_path("acme", "alice"), Some(OPS_KEY)).await;
    assert_eq!(reply.json()["access_token"], "at-alice");
    assert_eq!(reply.json()["generation"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_stored_read_refreshed_for_a_minimum_lifetime_and_deleted() {
    let w = served(Backend::Sqlite, "serve-crud").await;
    let s = Service::start(&w, "api", "warn");
    let at = s.unix();
    // A user id with a slash, a space and a non-ASCII letter.
    let user = "team/ann é";
    let state_path = format!("/v1/tokens/acme/{}", segment(user));
    let stored = request(
        &at,
        "PUT",
        &state_path,
        Some(OPS_KEY),
        Some(br#"{"access_token":"at-1","refresh_token":"rt-0","expires_in":3600,"scope":"repo"}"#),
    )
    .await;
    assert_eq!(stored.status, 200, "{:?}", stored.json());
    let state = stored.json();
    assert_eq!(
        (state["user_id"].as_str(), state["state"].as_str()),
        (Some(user), Some("fresh"))
    );
    assert!(!String::from_utf8_lossy(&stored.body).contains("rt-0"));
    // Half an hour passes: half an hour left, outside the refresh window,
    // served as it is.
    common::raw_sql(
        &w.database_url,
        "UPDATE tokenkeep_tokens SET obtained_at = obtained_at - 1800, \
         access_token_expires_at = access_token_expires_at - 1800",
    )
    .await;
    let plain = get(&at, &access_path("acme", user), Some(OPS_KEY))
        .await
        .json();
    assert_eq!(plain["access_token"], "at-1");
    assert_eq!(w.provider.calls(), 0);
    // A caller that needs 45 minutes gets a refreshed token.
    let long = get(
        &at,
        &format!("{}?min_remaining=2700", access_path("acme", user)),
        Some(OPS_KEY),
    )
    .await;
    assert_eq!(long.status, 200, "{:?}", long.json());
    let long = long.json();
    assert_ne!(long["access_token"], "at-1");
    assert!(long["expires_at"].as_i64().unwrap() - common::now() >= 2700);
    assert_eq!(w.provider.calls(), 1);
    // More than any token of it lives: refused, nothing sent.
    let too_long = get(
        &at,
        &format!("{}?min_remaining=7200", access_path("acme", user)),
        Some(OPS_KEY),
    )
    .await;
    assert_eq!(
        (too_long.status, too_long.class().as_str()),
        (400, "invalid-input")
    );
    assert_eq!(w.provider.calls(), 1);
    let bad = get(
        &at,
        &format!("{}?min_remaining=-1", access_path("acme", user)),
        Some(OPS_KEY),
    )
    .await;
    assert_eq!((bad.status, bad.class().as_str()), (400, "invalid-input"));
    // Deleted once; the second time there is nothing.
    let deleted = request(&at, "DELETE", &state_path, Some(OPS_KEY), None).await;
    assert_eq!(deleted.status, 204);
    let again = request(&at, "DELETE", &state_path, Some(OPS_KEY), None).await;
    assert_eq!((again.status, again.class().as_str()), (404, "not-found"));
    assert_eq!(get(&at, &state_path, Some(OPS_KEY)).await.status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_the_refresh_in_flight_answers_it_and_exits() {
    let w = served(Backend::Sqlite, "serve-sigterm").await;
    w.store("alice", "at-old", Some("rt-0"), -10).await;
    let mut s = Service::start(&w, "api", "warn");
    w.provider.hold_answers();
    let at = s.unix();
    let path = access_path("acme", "alice");
    let client = tokio::spawn(async move { get(&at, &path, Some(OPS_KEY)).await });
    w.provider.wait_until(|p| p.arrived() == 1).await;
    s.signal(15);
    // It stops accepting new connections...
    while tokio::net::UnixStream::connect(&s.unix).await.is_ok() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // ...and the request in flight is answered once its refresh lands.
    w.provider.release_answers();
    let reply = client.await.unwrap();
    assert_eq!(reply.status, 200, "{:?}", reply.json());
    let token = reply.json()["access_token"].as_str().unwrap().to_string();
    assert!(token.starts_with("dev-at-"));
    let (code, stderr, socket_left) = tokio::task::spawn_blocking(move || {
        let (code, stderr) = s.finish();
        (code, stderr, s.unix.exists())
    })
    .await
    .unwrap();
    assert_eq!(
        (code, stderr.as_str(), socket_left),
        (Some(0), "", false),
        "exit 0, quiet, socket removed"
    );
    assert_eq!(
        w.stored("alice").await.tokens.access_token.expose_secret(),
        token
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_cuts_off_a_request_whose_body_never_comes_after_the_drain_time() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut w = World::new(Backend::Sqlite, "serve-drain").await;
    w.add_config(&service::serve_section_with(
        "drain_seconds = 1",
        service::NO_REFRESHER,
    ))
    .await;
    let mut s = Service::start(&w, "api", "warn,tokenkeep_service=debug");
    // A store whose declared body never comes.
    let mut stalled = tokio::net::UnixStream::connect(&s.unix).await.unwrap();
    stalled
        .write_all(
            format!(
                "PUT /v1/tokens/acme/alice HTTP/1.1\r\nHost: tokenkeep\r\n\
                 Authorization: Bearer {OPS_KEY}\r\nContent-Type: application/json\r\n\
                 Content-Length: 200\r\n\r\n{{\"access_token\":"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    while !s.stderr().contains("request begun") {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    s.signal(15);
    let (code, stderr) = tokio::task::spawn_blocking(move || s.finish())
        .await
        .unwrap();
    let warnings: Vec<&str> = stderr.lines().filter(|l| !l.contains("DEBUG")).collect();
    assert_eq!(code, Some(0));
    assert_eq!(warnings.len(), 1, "{stderr}");
    assert!(warnings[0].contains("drain time ran out"), "{stderr}");
    // The client is left with a closed connection, and nothing is stored.
    let mut rest = Vec::new();
    let _ = stalled.read_to_end(&mut rest).await;
    assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest));
    assert!(
        w.keeper
            .load_tokens("acme", "alice", false)
            .await
            .unwrap()
            .is_none()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_the_services_log_even_at_trace_level() {
    let w = served(Backend::Sqlite, "serve-log").await;
    w.store("alice", "at-SECRET-old", Some("rt-SECRET-0"), -10)
        .await;
    w.provider.reset_chain("rt-SECRET-0");
    let mut s = Service::start_with(&w, "api", "trace", &[("TOKENKEEP_LOG_FORMAT", "json")]);
    let at = s.tcp();
    let reply = get(&at, &access_path("acme", "alice"), Some(OPS_KEY)).await;
    assert_eq!(reply.status, 200, "{:?}", reply.json());
    let fresh = reply.json()["access_token"].as_str().unwrap().to_string();
    let _ = request(
        &at,
        "PUT",
        "/v1/tokens/acme/bob",
        Some(OPS_KEY),
        Some(br#"{"access_token":"at-SECRET-bob","refresh_token":"rt-SECRET-bob"}"#),
    )
    .await;
    let _ = get(
        &at,
        &access_path("acme", "bob"),
        Some("wrong-SECRET-key-123"),
    )
    .await;
    s.signal(15);
    let (_, log) = tokio::task::spawn_blocking(move || s.finish())
        .await
        .unwrap();
    assert!(log.contains("answered"), "the trace shows requests: {log}");
    for line in log.lines() {
        let line: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(line["level"].is_string(), "{line}");
    }
    assert!(
        log.contains(r#""key":"ops""#),
        "the span names the key: {log}"
    );
    for secret in ["SECRET", &fresh, OPS_KEY, "dev-secret"] {
        assert!(!log.contains(secret), "{secret} in the log:\n{log}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_client_example_reads_refreshes_and_reports_failures() {
    let w = served(Backend::Sqlite, "serve-python").await;
    w.store("alice", "at-old", Some("rt-0"), -10).await;
    let s = Service::start(&w, "api", "warn");
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/python/tokenkeep_client.py"
    );
    let run = |env: (&str, String), user: &str| {
        std::process::Command::new("python3")
            .arg(script)
            .args(["acme", user])
            .env(env.0, env.1)
            .env("TOKENKEEP_API_KEY", OPS_KEY)
            .output()
            .unwrap()
    };
    let over_socket = run(("TOKENKEEP_SOCKET", s.unix.display().to_string()), "alice");
    assert!(over_socket.status.success(), "{over_socket:?}");
    let token = String::from_utf8(over_socket.stdout).unwrap();
    assert!(token.trim().starts_with("dev-at-"), "refreshed: {token}");
    let over_tcp = run(("TOKENKEEP_URL", format!("http://{}", s.tcp)), "alice");
    assert_eq!(
        String::from_utf8(over_tcp.stdout).unwrap(),
        token,
        "the same token"
    );
    let missing = run(("TOKENKEEP_SOCKET", s.unix.display().to_string()), "nobody");
    assert_eq!(missing.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&missing.stderr),
        "tokenkeep: not-found: no token stored for acme/nobody\n"
    );
    assert_eq!(w.provider.calls(), 1);
}

/// Waits until `service` has logged `n` more refresher scans than `seen`.
async fn scans_after(service: &Service, seen: usize, n: usize) -> usize {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let scans = service.stderr().matches("refresher scan").count();
        if scans >= seen + n {
            return scans;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no scan: {}",
            service.stderr()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_services_refresh_tokens_ahead_of_their_readers_once_each() {
    const USERS: usize = 12;
    let mut w = World::new(Backend::Postgres, "serve-refresher").await;
    w.add_config(&service::serve_section(
        "interval_seconds = 1\nlead_seconds = 60\nspread_seconds = 2\n",
    ))
    .await;
    w.store_chains(USERS, 3600).await;
    // Obtained 50 minutes ago, 661 s left: outside the 600-second window,
    // so readers are served as it is, but the window opens in 61 s, within
    // the refresher's lead.
    let now = common::now();
    common::raw_sql(
        &w.database_url,
        &format!(
            "UPDATE tokenkeep_tokens SET obtained_at = {}, access_token_expires_at = {}",
            now - 3000,
            now + 661
        ),
    )
    .await;
    let log = "warn,tokenkeep_host::refresher=info";
    let services = [
        Service::start(&w, "one", log),
        Service::start(&w, "two", log),
    ];
    // Readers keep asking on both services meanwhile.
    let endpoints: Vec<Endpoint> = services.iter().flat_map(|s| [s.unix(), s.tcp()]).collect();
    let reading = {
        let endpoints = endpoints.clone();
        let provider = w.provider.clone();
        tokio::spawn(async move {
            let mut replies = 0;
            // At least one round, and on until the refresher is done.
            loop {
                for i in 0..USERS {
                    let reply = get(
                        &endpoints[i % endpoints.len()],
                        &access_path("acme", &format!("user-{i}")),
                        Some(OPS_KEY),
                    )
                    .await;
                    assert_eq!(reply.status, 200, "{:?}", reply.json());
                    let left = reply.json()["expires_at"].as_i64().unwrap() - common::now();
                    assert!(left > 600, "never a token inside its window: {left}");
                    replies += 1;
                }
                if provider.calls() as usize >= USERS {
                    break;
                }
            }
            replies
        })
    };
    tokio::time::timeout(
        Duration::from_secs(60),
        w.provider.wait_until(|p| p.calls() as usize >= USERS),
    )
    .await
    .expect("the refresher refreshes every token ahead of its window");
    assert!(reading.await.unwrap() > 0);
    // Two more scans on each service change nothing.
    for s in &services {
        let seen = scans_after(s, 0, 1).await;
        scans_after(s, seen, 2).await;
    }
    assert_eq!(
        w.provider.calls() as usize,
        USERS,
        "one provider call per token"
    );
    assert_eq!(w.provider.reuses(), 0);
    for i in 0..USERS {
        let state = w
            .keeper
            .token_summary("acme", &format!("user-{i}"))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(state.generation, 2, "user-{i} refreshed once");
        assert!(state.access_token_expires_at.unwrap() - common::now() > 3000);
    }
    for s in &services {
        let log = s.stderr();
        assert!(!log.contains("WARN"), "no failure: {log}");
        // The last scan (after the refreshes) found every token fresh.
        let scraped = get(&s.tcp(), "/metrics", Some(OPS_KEY)).await;
        let scraped = String::from_utf8(scraped.body).unwrap();
        let fresh = service::metric(&scraped, "tokenkeep_tokens", &[("state", "fresh")]);
        assert_eq!(fresh as usize, USERS, "{scraped}");
        assert_eq!(
            service::metric(&scraped, "tokenkeep_tokens", &[("state", "refresh-due")]),
            0.0
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_cannot_take_over_or_resume_another_tenants_conversation() {
    let w = served(Backend::Sqlite, "serve-conversations").await;
    w.store("b:bob", "at-bob", Some("rt-0"), 3600).await;
    w.store("a:ann", "at-ann", Some("rt-ann"), 3600).await;
    let s = Service::start(&w, "api", "warn");
    let at = s.unix();
    let settings = |user: &str, token: &str| {
        format!(
            r#"{{"user_id":"{user}","settings":{{"provider_tokens":{{"acme":{{"token":"{token}","expires_at":{}}}}}}}}}"#,
            common::now() + 3600
        )
    };
    let post = |path: String, key: &'static str, body: String| {
        let at = at.clone();
        async move { request(&at, "POST", &path, Some(key), Some(body.as_bytes())).await }
    };
    // Bob's platform keeps his conversation.
    let made = post(
        "/v1/conversations/c-bob/refresh".into(),
        OPS_KEY,
        settings("b:bob", "at-bob"),
    )
    .await;
    assert_eq!(made.status, 200, "{:?}", made.json());
    // Tenant a may not rebind it to one of its own users, resume it, or see it.
    let taken = post(
        "/v1/conversations/c-bob/refresh".into(),
        TENANT_A_KEY,
        settings("a:ann", "at-ann"),
    )
    .await;
    assert_eq!((taken.status, taken.class().as_str()), (403, "forbidden"));
    let resumed = post(
        "/v1/conversations/c-bob/resume".into(),
        TENANT_A_KEY,
        String::new(),
    )
    .await;
    assert_eq!(resumed.status, 403);
    let shown = get(&at, "/v1/conversations/c-bob", Some(TENANT_A_KEY)).await;
    assert_eq!(shown.status, 403);
    let body = String::from_utf8_lossy(&shown.body).into_owned();
    assert!(!body.contains("bob"), "a refusal names no one: {body}");
    // The conversation is still bob's.
    let mine = get(&at, "/v1/conversations/c-bob", Some(OPS_KEY))
        .await
        .json();
    assert_eq!(mine["entries"][0]["user_id"], "b:bob");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_keys_and_providers_without_dropping_a_request_in_flight() {
    const NEW_KEY: &str = "new-key-0123456789abcdef";
    let w = served(Backend::Sqlite, "serve-sighup").await;
    w.store("alice", "at-old", Some("rt-0"), -10).await;
    let s = Service::start(&w, "api", "warn");
    let at = s.unix();
    let globex = "/v1/tokens/globex/alice";
    assert_eq!(
        request(
            &at,
            "PUT",
            globex,
            Some(OPS_KEY),
            Some(br#"{"access_token":"at-g"}"#)
        )
        .await
        .class(),
        "unknown-provider"
    );
    // A request in flight across the reload.
    w.provider.hold_answers();
    let in_flight = {
        let at = at.clone();
        tokio::spawn(async move { get(&at, &access_path("acme", "alice"), Some(OPS_KEY)).await })
    };
    w.provider.wait_until(|p| p.arrived() == 1).await;
    // The new file: tenant-a's key is gone, a new key and a new provider come.
    let config = std::fs::read_to_string(&w.config_path).unwrap();
    let config = config.replace(
        "[serve.keys.tenant-a]",
        "[serve.keys.retired]\nsecret_env = \"TK_TEST_OPS_KEY\"\n[serve.keys.old-tenant-a]",
    );
    let tenant_a = format!(
        "secret_sha256 = \"{}\"",
        hex::encode(<sha2::Sha256 as sha2::Digest>::digest(TENANT_A_KEY))
    );
    let config = config.replace(
        &tenant_a,
        &format!(
            "secret_sha256 = \"{}\"",
            hex::encode(<sha2::Sha256 as sha2::Digest>::digest(NEW_KEY))
        ),
    );
    let config = format!(
        "{config}\n[providers.globex]\ntoken_url = \"{}\"\nclient_id = \"dev-client\"\nclient_secret = \"dev-secret\"\n",
        w.provider.token_url()
    );
    // acme's endpoint moves: the call in flight keeps the one it began with.
    let config = config.replacen(&w.provider.token_url(), "http://127.0.0.1:9/moved", 1);
    std::fs::write(&w.config_path, &config).unwrap();
    s.signal(1);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while get(&at, "/v1/tokens", Some(NEW_KEY)).await.status != 200 {
        assert!(
            std::time::Instant::now() < deadline,
            "the new key never worked: {}",
            s.stderr()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        get(&at, "/v1/tokens", Some(TENANT_A_KEY)).await.status,
        401,
        "the old key is gone"
    );
    w.provider.release_answers();
    let reply = in_flight.await.unwrap();
    assert_eq!(
        reply.status,
        200,
        "the request in flight was answered: {:?}",
        reply.json()
    );
    // (On SQLite the store waits for the refresh's write lock: after it.)
    let stored = request(
        &at,
        "PUT",
        globex,
        Some(OPS_KEY),
        Some(br#"{"access_token":"at-g"}"#),
    )
    .await;
    assert_eq!(stored.status, 200, "the new provider: {:?}", stored.json());
    // A file that does not parse changes nothing, and says so once.
    std::fs::write(&w.config_path, "[serve\n").unwrap();
    s.signal(1);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !s.stderr().contains("reload refused") {
        assert!(
            std::time::Instant::now() < deadline,
            "no word of the refused reload"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(get(&at, "/v1/tokens", Some(NEW_KEY)).await.status, 200);
    assert_eq!(s.stderr().lines().count(), 1, "{}", s.stderr());
}
