//! Token events: written with the change that causes them, delivered to a
//! webhook signed, at least once, in order per token, across a receiver
//! outage and a `serve` restart.

mod common;

use base64::Engine as _;
use common::service::{self, OPS_KEY, Service, request};
use common::{Backend, World, raw_sql, token_set};
use hmac::{Hmac, Mac};
use serde_json::Value;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokenkeep_host::refresher::{Refresher, RefresherSettings};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// What the receiver does with a delivery.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Takes it: 204.
    Up,
    /// Answers 503 and keeps nothing.
    Failing,
}

/// A delivery as received: its headers (names lower case) and body.
type Delivery = (Vec<(String, String)>, Vec<u8>);

/// A webhook receiver on a loopback port that can go away and come back on
/// the same port.
struct Receiver {
    port: u16,
    got: Arc<Mutex<Vec<Delivery>>>,
    refused: Arc<Mutex<u64>>,
    mode: Arc<Mutex<Mode>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Receiver {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut r = Receiver {
            port: listener.local_addr().unwrap().port(),
            got: Arc::default(),
            refused: Arc::default(),
            mode: Arc::new(Mutex::new(Mode::Up)),
            task: None,
        };
        r.serve(listener);
        r
    }

    fn serve(&mut self, listener: tokio::net::TcpListener) {
        let (got, refused, mode) = (self.got.clone(), self.refused.clone(), self.mode.clone());
        self.task = Some(tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                let (got, refused, mode) = (got.clone(), refused.clone(), mode.clone());
                tokio::spawn(async move {
                    let mut socket = tokio::io::BufReader::new(socket);
                    let mut headers = Vec::new();
                    let mut line = String::new();
                    loop {
                        line.clear();
                        if socket.read_line(&mut line).await.unwrap_or(0) == 0 {
                            return;
                        }
                        let l = line.trim_end();
                        if l.is_empty() {
                            break;
                        }
                        if let Some((n, v)) = l.split_once(':') {
                            headers.push((n.trim().to_ascii_lowercase(), v.trim().to_string()));
                        }
                    }
                    let length: usize = headers
                        .iter()
                        .find(|(n, _)| n == "content-length")
                        .map_or(0, |(_, v)| v.parse().unwrap());
                    let mut body = vec![0; length];
                    socket.read_exact(&mut body).await.unwrap();
                    let answer = if *mode.lock().unwrap() == Mode::Up {
                        got.lock().unwrap().push((headers, body));
                        "HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n"
                    } else {
                        *refused.lock().unwrap() += 1;
                        "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    };
                    let _ = socket.get_mut().write_all(answer.as_bytes()).await;
                });
            }
        }));
    }

    /// No one listens on the port any more: connections are refused.
    fn go_away(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }

    /// Listens on the same port again.
    async fn come_back(&mut self) {
        let listener = loop {
            match tokio::net::TcpListener::bind(("127.0.0.1", self.port)).await {
                Ok(l) => break l,
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        };
        self.serve(listener);
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/hooks/tokenkeep", self.port)
    }

    /// The deliveries taken so far, their signatures checked.
    fn events(&self) -> Vec<Value> {
        let key = base64::engine::general_purpose::STANDARD
            .decode(SECRET.trim_start_matches("whsec_"))
            .unwrap();
        self.got
            .lock()
            .unwrap()
            .iter()
            .map(|(headers, body)| {
                let h = |n: &str| headers.iter().find(|(k, _)| k == n).unwrap().1.clone();
                let (id, ts) = (h("webhook-id"), h("webhook-timestamp"));
                let mut mac = Hmac::<sha2::Sha256>::new_from_slice(&key).unwrap();
                mac.update(format!("{id}.{ts}.").as_bytes());
                mac.update(body);
                let expected =
                    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
                assert_eq!(
                    h("webhook-signature"),
                    format!("v1,{expected}"),
                    "a valid signature"
                );
                assert!((ts.parse::<i64>().unwrap() - common::now()).abs() < 300);
                let event: Value = serde_json::from_slice(body).unwrap();
                assert_eq!(
                    event["data"]["event_id"].as_i64(),
                    id.strip_prefix("evt_").unwrap().parse().ok()
                );
                event
            })
            .collect()
    }
}

/// Waits until `done` holds, checking every few milliseconds, for at most
/// a minute.
async fn until(mut done: impl FnMut() -> bool, what: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !done() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn summary(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| {
            format!(
                "{} {} {} {}",
                e["type"].as_str().unwrap(),
                e["data"]["user_id"].as_str().unwrap(),
                e["data"]["reason"],
                e["data"]["conversations"]
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_revoked_token_is_announced_once_and_its_recovery_too_across_an_outage_and_a_restart() {
    let mut receiver = Receiver::start().await;
    let mut w = World::new(Backend::Postgres, "events").await;
    w.add_config(&format!(
        "{}\n[serve.webhooks.platform]\nurl = \"{}\"\nsecret_env = \"TK_TEST_WEBHOOK_SECRET\"\n",
        service::serve_section(service::NO_REFRESHER),
        receiver.url()
    ))
    .await;
    // SAFETY: set before any service starts; the test's own threads do not read it.
    unsafe { std::env::set_var("TK_TEST_WEBHOOK_SECRET", SECRET) };
    w.provider.reset_chain("rt-alice");
    w.provider.add_chain("rt-bob");
    w.store("alice", "at-alice", Some("rt-alice"), -10).await;
    w.store("bob", "at-bob", Some("rt-bob"), -10).await;
    let mut one = Service::start(&w, "one", "warn");
    let two = Service::start(&w, "two", "warn");
    // Alice's token is used by a conversation.
    let settings = br#"{"user_id":"alice","settings":{"provider_tokens":{"acme":{"token":"at-alice","expires_at":1}}}}"#;
    let c = request(
        &one.unix(),
        "POST",
        "/v1/conversations/c-1/refresh",
        Some(OPS_KEY),
        Some(settings),
    )
    .await;
    assert_eq!(c.status, 200, "{:?}", c.json());

    // The receiver goes away; the provider revokes every refresh token.
    receiver.go_away();
    let before = w.provider.calls();
    w.provider.set(|b| {
        b.canned = Some((
            400,
            "application/json".into(),
            r#"{"error":"invalid_grant"}"#.into(),
        ))
    });
    common::raw_sql(
        &w.database_url,
        &format!(
            "UPDATE tokenkeep_tokens SET access_token_expires_at = {}",
            common::now() - 10
        ),
    )
    .await;
    let mut asking = Vec::new();
    for i in 0..16 {
        let at = if i % 2 == 0 { one.unix() } else { two.tcp() };
        let user = if i % 4 < 2 { "alice" } else { "bob" };
        asking.push(tokio::spawn(async move {
            request(
                &at,
                "GET",
                &format!("/v1/tokens/acme/{user}/access-token"),
                Some(OPS_KEY),
                None,
            )
            .await
        }));
    }
    for a in asking {
        let reply = a.await.unwrap();
        assert_eq!(
            (reply.status, reply.class().as_str()),
            (409, "reauthorization-required")
        );
    }
    assert_eq!(w.provider.calls() - before, 2, "one refusal per token");

    // Deliveries fail while it is away; then it answers 503 for a while.
    let scrape = |s: &Service| {
        let at = s.tcp();
        async move {
            let m = request(&at, "GET", "/metrics", Some(OPS_KEY), None).await;
            String::from_utf8(m.body).unwrap()
        }
    };
    let mut failed = 0.0;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while failed < 2.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "no failed delivery seen"
        );
        failed = 0.0;
        for s in [&one, &two] {
            failed += service::metric(
                &scrape(s).await,
                "tokenkeep_webhook_deliveries_total",
                &[("outcome", "failed")],
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    *receiver.mode.lock().unwrap() = Mode::Failing;
    receiver.come_back().await;
    let refused = receiver.refused.clone();
    until(|| *refused.lock().unwrap() >= 2, "503s").await;
    // A restart meanwhile: the first service stops (its lease is given up)
    // and a new one starts.
    one.signal(15);
    let (code, _) = tokio::task::spawn_blocking(move || one.finish())
        .await
        .unwrap();
    assert_eq!(code, Some(0));
    let three = Service::start(&w, "three", "warn");
    *receiver.mode.lock().unwrap() = Mode::Up;
    let got = receiver.got.clone();
    until(|| got.lock().unwrap().len() >= 2, "the two revocations").await;

    // A new authorisation for each recovers it.
    for user in ["alice", "bob"] {
        let stored = request(
            &three.unix(),
            "PUT",
            &format!("/v1/tokens/acme/{user}"),
            Some(OPS_KEY),
            Some(format!(r#"{{"access_token":"at-new-{user}","refresh_token":"rt-new-{user}","expires_in":3600}}"#).as_bytes()),
        )
        .await;
        assert_eq!(stored.status, 200);
    }
    until(|| got.lock().unwrap().len() >= 4, "the two recoveries").await;
    // Nothing more comes: both services find nothing pending.
    for s in [&two, &three] {
        let mut pending = f64::NAN;
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while pending != 0.0 {
            assert!(std::time::Instant::now() < deadline, "events still pending");
            pending = service::metric(
                &scrape(s).await,
                "tokenkeep_events_pending",
                &[("webhook", "platform")],
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let events = receiver.events();
    let ids: Vec<&str> = events
        .iter()
        .map(|e| e["data"]["event_id"].as_i64())
        .map(|_| "")
        .collect();
    assert_eq!(ids.len(), 4, "each event once: {:?}", summary(&events));
    let per_user = |user: &str| -> Vec<String> {
        summary(&events)
            .into_iter()
            .filter(|s| s.contains(&format!(" {user} ")))
            .collect()
    };
    assert_eq!(
        per_user("alice"),
        [
            "token.reauthorization-required alice \"reauthorization-required\" [\"c-1\"]",
            "token.recovered alice null [\"c-1\"]",
        ]
    );
    assert_eq!(
        per_user("bob"),
        [
            "token.reauthorization-required bob \"reauthorization-required\" []",
            "token.recovered bob null []",
        ]
    );
    let bodies: String = receiver
        .got
        .lock()
        .unwrap()
        .iter()
        .map(|(_, b)| String::from_utf8_lossy(b).into_owned())
        .collect();
    assert!(
        !bodies.contains("at-") && !bodies.contains("rt-"),
        "never a secret: {bodies}"
    );
}

async fn events_follow_the_change(backend: Backend) {
    let w = World::new(backend, "events-outbox").await;
    let k = &w.keeper;
    k.register_webhook("hook").await.unwrap();
    k.register_webhook("other-hook").await.unwrap();
    w.store("alice", "at-alice", Some("rt-0"), -10).await;
    assert_eq!(
        k.next_event("hook").await.unwrap(),
        None,
        "storing is no event"
    );
    w.provider.set(|b| {
        b.canned = Some((
            400,
            "application/json".into(),
            r#"{"error":"invalid_grant"}"#.into(),
        ))
    });
    for _ in 0..3 {
        let e = k.ensure_fresh("acme", "alice").await.unwrap_err();
        assert_eq!(e.class(), "reauthorization-required");
    }
    let first = k.next_event("hook").await.unwrap().expect("an event");
    assert_eq!(
        (
            first.state.as_str(),
            first.reason.as_deref(),
            first.user_id.as_str()
        ),
        (
            "reauthorization-required",
            Some("reauthorization-required"),
            "alice"
        )
    );
    // Delivered only under a lease, and then not again.
    assert!(!k.mark_delivered("hook", "me", first.id).await.unwrap());
    assert!(k.lease_webhook("hook", "me").await.unwrap());
    assert!(!k.lease_webhook("hook", "someone-else").await.unwrap());
    assert!(k.mark_delivered("hook", "me", first.id).await.unwrap());
    assert_eq!(
        k.next_event("hook").await.unwrap(),
        None,
        "one event however many refusals"
    );
    assert_eq!(
        k.pending_events("other-hook").await.unwrap(),
        1,
        "per webhook"
    );
    // A webhook added now is not sent what came before it.
    k.register_webhook("late").await.unwrap();
    assert_eq!(k.next_event("late").await.unwrap(), None);
    assert_eq!(k.pending_events("late").await.unwrap(), 0);
    w.store("alice", "at-new", Some("rt-new"), 3600).await;
    let second = k.next_event("hook").await.unwrap().expect("recovered");
    assert_eq!((second.state.as_str(), second.reason), ("recovered", None));
    assert!(second.id > first.id && second.generation > first.generation);
    assert_eq!(
        k.next_event("late").await.unwrap().map(|e| e.id),
        Some(second.id)
    );
    k.register_webhook("late").await.unwrap();
    assert_eq!(
        k.next_event("late").await.unwrap().map(|e| e.id),
        Some(second.id),
        "registering again moves nothing"
    );
    k.release_webhook("hook", "me").await.unwrap();
    assert!(
        k.lease_webhook("hook", "someone-else").await.unwrap(),
        "released"
    );
    // Events past the retention go, with their deliveries; newer ones stay.
    raw_sql(
        &w.database_url,
        &format!(
            "UPDATE tokenkeep_events SET at = at - 31 * 86400 WHERE id = {}",
            first.id
        ),
    )
    .await;
    assert_eq!(k.prune_events(30).await.unwrap(), 1);
    assert_eq!(
        k.pending_events("other-hook").await.unwrap(),
        1,
        "only the recovery left"
    );
    assert_eq!(
        k.next_event("hook").await.unwrap().map(|e| e.id),
        Some(second.id)
    );
}

/// Every event not yet taken by `hook`, oldest first, marked delivered.
async fn drain(k: &tokenkeep_host::Keeper, hook: &str) -> Vec<tokenkeep_host::events::Event> {
    assert!(k.lease_webhook(hook, "drain").await.unwrap());
    let mut all = Vec::new();
    while let Some(e) = k.next_event(hook).await.unwrap() {
        assert!(k.mark_delivered(hook, "drain", e.id).await.unwrap());
        all.push(e);
    }
    all
}

fn states(events: &[tokenkeep_host::events::Event]) -> Vec<String> {
    let mut s: Vec<String> = events
        .iter()
        .map(|e| format!("{} {} {:?}", e.user_id, e.state, e.reason))
        .collect();
    s.sort();
    s
}

async fn time_decided_states_are_announced_once(backend: Backend) {
    let w = World::new(backend, "events-time").await;
    let k = &w.keeper;
    k.register_webhook("hook").await.unwrap();
    let other = w.another_keeper().await;
    let settings = RefresherSettings {
        max_failures: 1,
        ..Default::default()
    };
    let scanners = [
        Refresher::new(k.clone(), settings.clone()),
        Refresher::new(other, settings),
    ];
    let now = w.now();
    // Due now (inside the 60 s skew), and refused a refresh once: the
    // refresher leaves it be.
    w.store("due", "at-due", Some("rt-0"), 30).await;
    w.provider.add_chain("rt-narrow");
    w.store("narrow", "at-narrow", Some("rt-narrow"), 30).await;
    w.provider
        .set(|b| b.canned = Some((503, "text/plain".into(), String::new())));
    for user in ["due", "narrow"] {
        let e = k.ensure_fresh("acme", user).await.unwrap_err();
        assert_eq!(e.class(), "provider-unavailable");
    }
    w.provider.set(|b| b.canned = None);
    // A refresh token that ends in three hours.
    let mut ending = token_set("at-ending", Some("rt-ending"), Some(now + 3600));
    ending.refresh_token_expires_at = Some(now + 3 * 3600);
    k.store_tokens("acme", "ending", &ending).await.unwrap();
    // Expired, with nothing to refresh it.
    w.store("dead", "at-dead", None, -10).await;
    w.store("fine", "at-fine", Some("rt-fine"), 3600).await;
    assert_eq!(
        drain(k, "hook").await,
        vec![],
        "storing and failing are no events"
    );

    // Two processes scan at once: each change is announced once.
    let (a, b) = tokio::join!(scanners[0].scan(), scanners[1].scan());
    assert_eq!(a.unwrap().announced + b.unwrap().announced, 4);
    let got = drain(k, "hook").await;
    assert_eq!(
        states(&got),
        [
            "dead reauthorization-required Some(\"reauthorization-required\")",
            "due refresh-due Some(\"provider-unavailable\")",
            "ending refresh-token-expiring None",
            "narrow refresh-due Some(\"provider-unavailable\")",
        ]
    );
    for s in &scanners {
        assert_eq!(
            s.scan().await.unwrap().announced,
            0,
            "nothing changed since"
        );
    }
    assert_eq!(drain(k, "hook").await, vec![]);

    // The refresh that makes it fresh says so, in its own transaction; a
    // new token for the dead one is its recovery.
    w.backoff_over().await;
    // A refresh that saves tokens missing a scope the user authorised
    // writes a new generation, but the token is served to no one: not fresh.
    w.provider.set(|b| b.scope = Some("repo".into()));
    let e = k.ensure_fresh("acme", "narrow").await.unwrap_err();
    assert_eq!(e.class(), "scope-mismatch");
    w.provider.set(|b| b.scope = None);
    assert_eq!(
        drain(k, "hook").await,
        vec![],
        "a narrowed token is not fresh"
    );
    k.ensure_fresh("acme", "due").await.unwrap();
    w.store("dead", "at-dead-2", None, 3600).await;
    let got = drain(k, "hook").await;
    assert_eq!(
        got.iter()
            .map(|e| format!("{} {}", e.user_id, e.state))
            .collect::<Vec<_>>(),
        ["due fresh", "dead recovered"]
    );
    assert!(got[0].generation > 1);
    for s in &scanners {
        assert_eq!(s.scan().await.unwrap().announced, 0, "as announced");
    }
    assert_eq!(drain(k, "hook").await, vec![]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres_states_that_time_decides_are_announced_once_by_two_processes() {
    time_decided_states_are_announced_once(Backend::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_sqlite_states_that_time_decides_are_announced_once_by_two_processes() {
    time_decided_states_are_announced_once(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres_a_refusal_and_a_new_authorisation_are_events_written_with_the_change() {
    events_follow_the_change(Backend::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_sqlite_a_refusal_and_a_new_authorisation_are_events_written_with_the_change() {
    events_follow_the_change(Backend::Sqlite).await;
}
