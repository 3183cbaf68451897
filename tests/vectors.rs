//! The shared test vectors (tests/vectors/*.json) through the component, in
//! the Rust host and in the Node.js host (hosts/node, the same
//! tokenkeep.wasm through jco): both must give every answer the files give.

mod common;

use common::node::{self, Outcome};
use common::{Backend, World, raw_sql, token_set};
use secrecy::ExposeSecret;
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokenkeep_core::error::ErrorClass;
use tokenkeep_host::{Clock, Health, TokenRecord, TokenSet, keeper::token_state_name};
use tokenkeep_testkit::devprovider::Behaviour;

fn vectors() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/vectors")
}

fn load<T: serde::de::DeserializeOwned>(name: &str) -> T {
    let path = vectors().join(name);
    serde_json::from_slice(&std::fs::read(&path).unwrap())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[derive(Deserialize)]
struct Validity {
    now: i64,
    defaults: Defaults,
    cases: Vec<ValidityCase>,
}

#[derive(Deserialize)]
struct Defaults {
    clock_skew_seconds: u32,
    refresh_threshold_seconds: u32,
}

#[derive(Deserialize)]
struct ValidityCase {
    name: String,
    record: VectorRecord,
    clock_skew_seconds: Option<u32>,
    refresh_threshold_seconds: Option<u32>,
    expect: ValidityExpect,
}

#[derive(Deserialize)]
struct VectorRecord {
    access_token_expires_in: Option<i64>,
    refresh_token: bool,
    refresh_token_expires_in: Option<i64>,
    obtained_ago: i64,
    last_failure: Option<String>,
}

#[derive(Deserialize, Debug, PartialEq)]
struct ValidityExpect {
    access_token_valid: bool,
    refresh_token_valid: bool,
    state: String,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validity_vectors_hold_in_the_rust_host() {
    let v: Validity = load("validity.json");
    let w = World::build(
        Backend::Sqlite,
        "vectors-validity",
        Behaviour::default(),
        "",
        Clock::manual(v.now),
    )
    .await;
    assert!(v.cases.len() >= 20, "{} cases", v.cases.len());
    for case in &v.cases {
        let r = &case.record;
        let record = TokenRecord {
            provider: "acme".into(),
            user_id: "u".into(),
            tokens: TokenSet {
                access_token: "at".to_string().into(),
                refresh_token: r.refresh_token.then(|| "rt".to_string().into()),
                access_token_expires_at: r.access_token_expires_in.map(|s| v.now + s),
                refresh_token_expires_at: r.refresh_token_expires_in.map(|s| v.now + s),
                scopes: vec![],
            },
            obtained_at: v.now - r.obtained_ago,
            generation: 1,
            health: Health {
                last_failure: r.last_failure.as_deref().map(|c| {
                    ErrorClass::from_name(c).unwrap_or_else(|| panic!("{}: class {c}", case.name))
                }),
                ..Default::default()
            },
        };
        let skew = case
            .clock_skew_seconds
            .unwrap_or(v.defaults.clock_skew_seconds);
        let threshold = case
            .refresh_threshold_seconds
            .unwrap_or(v.defaults.refresh_threshold_seconds);
        let k = &w.keeper;
        let got = ValidityExpect {
            access_token_valid: k.is_access_token_valid(&record, skew).await.unwrap(),
            refresh_token_valid: k.is_refresh_token_valid(&record).await.unwrap(),
            state: token_state_name(k.classify(&record, threshold).await.unwrap()).into(),
        };
        assert_eq!(got, case.expect, "{}", case.name);
    }
}

#[derive(Deserialize)]
struct Flows {
    scenarios: Vec<Scenario>,
}

#[derive(Deserialize)]
struct Scenario {
    name: String,
    #[serde(default)]
    provider: String,
    stored: Option<Stored>,
    answers: Vec<ScriptedAnswer>,
    callers: usize,
    #[serde(default)]
    min_remaining_seconds: u32,
    expect: FlowExpect,
}

#[derive(Deserialize)]
struct Stored {
    access_token: String,
    refresh_token: Option<String>,
    access_token_expires_in: i64,
    obtained_ago: i64,
}

#[derive(Deserialize)]
struct ScriptedAnswer {
    status: u16,
    content_type: String,
    body: String,
}

#[derive(Deserialize)]
struct FlowExpect {
    result: Outcome,
    provider_calls: u64,
    refresh_tokens_sent: Option<Vec<String>>,
    stored: Option<StoredAfter>,
}

/// The row after; only the fields a scenario names are checked.
#[derive(Deserialize)]
struct StoredAfter {
    access_token: Option<String>,
    #[serde(default, deserialize_with = "some")]
    refresh_token: Option<Option<String>>,
    generation: Option<u64>,
    failed_attempts: Option<u32>,
    #[serde(default, deserialize_with = "some")]
    last_failure: Option<Option<String>>,
    access_token_expires_in: Option<i64>,
}

/// A present field, null or not, as `Some`; an absent one stays `None`.
fn some<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(d).map(Some)
}

/// Which host runs the callers of a scenario.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Host {
    /// A Rust runtime (its own keeper) per caller.
    Rust,
    /// A Node.js process (hosts/node/bin/tokenkeep-node.js) per caller.
    Node,
}

/// Runs every flow scenario with its callers on `host`; the provider, the
/// database file and the checks are the same for both hosts.
async fn flows_hold(host: Host) {
    let flows: Flows = load("flows.json");
    assert!(flows.scenarios.len() >= 15);
    for (i, s) in flows.scenarios.iter().enumerate() {
        let behaviour = Behaviour {
            script: s
                .answers
                .iter()
                .map(|a| (a.status, a.content_type.clone(), a.body.clone()))
                .collect(),
            ..Default::default()
        };
        let extra = format!("{}\n", s.provider);
        let w = World::with(Backend::Sqlite, &format!("flow-{i}"), behaviour, &extra).await;
        if let Some(stored) = &s.stored {
            let mut tokens = token_set(
                &stored.access_token,
                stored.refresh_token.as_deref(),
                Some(w.now() + stored.access_token_expires_in),
            );
            tokens.scopes = vec!["repo".into(), "read:user".into()];
            w.keeper.store_tokens("acme", "u", &tokens).await.unwrap();
            raw_sql(
                &w.database_url,
                &format!(
                    "UPDATE tokenkeep_tokens SET obtained_at = obtained_at - {}",
                    stored.obtained_ago
                ),
            )
            .await;
        }
        let outcomes = match host {
            Host::Rust => rust_callers(&w, s).await,
            Host::Node => node_callers(&w, s).await,
        };
        let case = format!("{host:?}: {}", s.name);
        assert_eq!(outcomes.len(), s.callers, "{case}");
        for got in &outcomes {
            assert!(
                s.expect.result.admits(got),
                "{case}: got {got:?}, want {:?}",
                s.expect.result
            );
        }
        assert_eq!(
            w.provider.calls(),
            s.expect.provider_calls,
            "{case}: provider calls"
        );
        if let Some(sent) = &s.expect.refresh_tokens_sent {
            let carried: Vec<String> = w
                .provider
                .bodies()
                .iter()
                .map(|b| {
                    url::form_urlencoded::parse(b.as_bytes())
                        .find(|(k, _)| k == "refresh_token")
                        .map(|(_, v)| v.into_owned())
                        .unwrap_or_default()
                })
                .collect();
            assert_eq!(&carried, sent, "{case}: refresh tokens sent");
        }
        if let Some(after) = &s.expect.stored {
            let row = w
                .keeper
                .load_tokens("acme", "u", false)
                .await
                .unwrap()
                .unwrap_or_else(|| panic!("{case}: no row"));
            check_stored(&case, &w, &row, after);
        }
    }
}

fn check_stored(case: &str, w: &World, row: &TokenRecord, after: &StoredAfter) {
    if let Some(at) = &after.access_token {
        assert_eq!(row.tokens.access_token.expose_secret(), at, "{case}");
    }
    if let Some(rt) = &after.refresh_token {
        let got = row
            .tokens
            .refresh_token
            .as_ref()
            .map(|r| r.expose_secret().to_string());
        assert_eq!(&got, rt, "{case}: refresh token");
    }
    if let Some(g) = after.generation {
        assert_eq!(row.generation, g, "{case}: generation");
    }
    if let Some(n) = after.failed_attempts {
        assert_eq!(row.health.failed_attempts, n, "{case}: failed attempts");
    }
    if let Some(f) = &after.last_failure {
        let got = row.health.last_failure.map(|c| c.name().to_string());
        assert_eq!(&got, f, "{case}: last failure");
    }
    if let Some(secs) = after.access_token_expires_in {
        let at = row.tokens.access_token_expires_at.unwrap();
        assert!(
            (at - (w.now() + secs)).abs() <= 2,
            "{case}: expires in {} not {secs}",
            at - w.now()
        );
    }
}

/// What a Rust runtime's call gave, as the vectors name outcomes.
fn rust_outcome(got: &Result<tokenkeep_host::AccessGrant, tokenkeep_host::Error>) -> Outcome {
    match got {
        Ok(g) => Outcome::Ok(g.access_token.expose_secret().to_string()),
        Err(e) => Outcome::Error(e.class().to_string()),
    }
}

async fn rust_callers(w: &World, s: &Scenario) -> Vec<Outcome> {
    let mut keepers = Vec::new();
    for _ in 0..s.callers {
        keepers.push(w.another_keeper().await);
    }
    let calls = keepers.iter().map(|k| async move {
        rust_outcome(
            &k.ensure_fresh_for("acme", "u", s.min_remaining_seconds)
                .await,
        )
    });
    futures::future::join_all(calls).await
}

async fn node_callers(w: &World, s: &Scenario) -> Vec<Outcome> {
    let runs = (0..s.callers).map(|_| {
        let mut c = node::get(w, "acme", "u", s.min_remaining_seconds);
        async move {
            let out = tokio::time::timeout(Duration::from_secs(60), c.output())
                .await
                .expect("a node caller answers within a minute")
                .unwrap();
            node::outcome(&out)
        }
    });
    futures::future::join_all(runs).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn flow_vectors_hold_in_the_rust_host() {
    flows_hold(Host::Rust).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn flow_vectors_hold_in_the_node_host() {
    flows_hold(Host::Node).await;
}

#[derive(Deserialize)]
struct Sealing {
    key_hex: String,
    cases: Vec<SealCase>,
    refused: Vec<Refused>,
    tampered: Vec<Tampered>,
}

#[derive(Deserialize)]
struct SealCase {
    name: String,
    binding: VectorBinding,
    nonce: String,
    plaintext: String,
    sealed: String,
}

#[derive(Deserialize)]
struct VectorBinding {
    provider: String,
    user_id: String,
    field: String,
    key_id: String,
}

impl VectorBinding {
    fn binding(&self) -> tokenkeep_core::seal::Binding<'_> {
        use tokenkeep_core::seal::Field;
        tokenkeep_core::seal::Binding {
            provider: &self.provider,
            user_id: &self.user_id,
            field: match self.field.as_str() {
                "access_token" => Field::AccessToken,
                "refresh_token" => Field::RefreshToken,
                other => panic!("field {other}"),
            },
            key_id: &self.key_id,
        }
    }
}

#[derive(Deserialize)]
struct Refused {
    name: String,
    sealed_from: usize,
    binding: VectorBinding,
}

#[derive(Deserialize)]
struct Tampered {
    name: String,
    sealed: String,
}

#[test]
fn sealing_vectors_hold_in_the_rust_host() {
    use tokenkeep_core::seal::{open, seal};
    let v: Sealing = load("sealing.json");
    let key = hex::decode(&v.key_hex).unwrap();
    for c in &v.cases {
        let nonce: [u8; 12] = hex::decode(&c.nonce).unwrap().try_into().unwrap();
        let plaintext = secrecy::SecretString::from(c.plaintext.clone());
        let sealed = seal(&key, nonce, &c.binding.binding(), &plaintext).unwrap();
        assert_eq!(hex::encode(&sealed), c.sealed, "{}", c.name);
        let opened = open(&key, &c.binding.binding(), &sealed).unwrap();
        assert_eq!(opened.expose_secret(), c.plaintext, "{}", c.name);
    }
    for r in &v.refused {
        let sealed = hex::decode(&v.cases[r.sealed_from].sealed).unwrap();
        assert!(
            open(&key, &r.binding.binding(), &sealed).is_err(),
            "{}",
            r.name
        );
    }
    let first = &v.cases[0].binding;
    for t in &v.tampered {
        let sealed = hex::decode(&t.sealed).unwrap();
        assert!(open(&key, &first.binding(), &sealed).is_err(), "{}", t.name);
    }
}

/// A catalogued provider's recorded answers (tests/vectors/providers).
#[derive(Deserialize)]
struct Recorded {
    kind: String,
    /// TOML settings of the provider; `{loopback}` is the test endpoint.
    config: std::collections::BTreeMap<String, String>,
    request: RecordedRequest,
    answers: Vec<RecordedAnswer>,
}

#[derive(Deserialize)]
struct RecordedRequest {
    client_auth: String,
    params: std::collections::BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct RecordedAnswer {
    name: String,
    status: u16,
    content_type: String,
    body: String,
    expect: RecordedExpect,
}

#[derive(Deserialize)]
#[serde(rename_all = "lowercase")]
enum RecordedExpect {
    Ok(Granted),
    Error(String),
}

#[derive(Deserialize)]
struct Granted {
    access_token: String,
    /// `kept`: the answer has none and the old one stays.
    refresh_token: String,
    expires_in: i64,
    refresh_token_expires_in: Option<i64>,
    /// Absent: the answer reports none and the old scopes stay.
    scopes: Option<Vec<String>>,
}

fn recorded() -> Vec<Recorded> {
    let dir = vectors().join("providers");
    let mut out: Vec<Recorded> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| {
            let path = e.unwrap().path();
            serde_json::from_slice(&std::fs::read(&path).unwrap())
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        })
        .collect();
    out.sort_by(|a, b| a.kind.cmp(&b.kind));
    out
}

#[test]
fn every_catalogued_provider_has_recorded_answers() {
    let recorded: Vec<String> = recorded().into_iter().map(|f| f.kind).collect();
    let mut catalogued: Vec<String> = tokenkeep_core::catalogue::CATALOGUE
        .iter()
        .map(|s| s.kind.to_string())
        .collect();
    catalogued.sort();
    assert_eq!(recorded, catalogued);
}

/// One `ensure-fresh` of (`provider`, `user`) by `host`, and what it said
/// besides the token (an error's message, the command's standard error).
async fn get_once(host: Host, w: &World, provider: &str, user: &str) -> (Outcome, String) {
    match host {
        Host::Rust => {
            let got = w.keeper.ensure_fresh(provider, user).await;
            let said = got.as_ref().err().map(ToString::to_string);
            (rust_outcome(&got), said.unwrap_or_default())
        }
        Host::Node => {
            let out = node::get(w, provider, user, 0).output().await.unwrap();
            (
                node::outcome(&out),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        }
    }
}

/// Every recorded answer of every catalogued provider, replayed by the
/// loopback endpoint, maps onto the contract in `host`; every request
/// carries what that provider expects; a failure loses and quotes nothing.
async fn recorded_answers_hold(host: Host) {
    let mut w = World::new(Backend::Sqlite, &format!("recorded-{host:?}")).await;
    let mut checked = 0;
    for fx in recorded() {
        let mut lines = format!("kind = \"{}\"\nmax_attempts = 1\n", fx.kind);
        for (k, v) in &fx.config {
            lines.push_str(&format!("{k} = \"{v}\"\n"));
        }
        let endpoint = w
            .add_provider_toml(&fx.kind, Behaviour::default(), &lines)
            .await;
        for (i, answer) in fx.answers.iter().enumerate() {
            let case = format!("{host:?}: {} / {}", fx.kind, answer.name);
            let user = format!("user-{i}");
            endpoint.set(|b| {
                b.canned = Some((
                    answer.status,
                    answer.content_type.clone(),
                    answer.body.clone(),
                ))
            });
            // An answer that reports no scopes keeps the old ones: old ones
            // there are, so that keeping can be told from clearing.
            let old_scopes: Vec<String> = match &answer.expect {
                RecordedExpect::Ok(g) if g.scopes.is_none() => vec!["old-scope".into()],
                _ => Vec::new(),
            };
            let stale = token_set("at-old", Some("rt-old"), Some(w.now() - 10));
            let stale = TokenSet {
                scopes: old_scopes.clone(),
                ..stale
            };
            w.keeper
                .store_tokens(&fx.kind, &user, &stale)
                .await
                .unwrap();
            let calls = endpoint.calls();
            let (result, said) = get_once(host, &w, &fx.kind, &user).await;
            for secret in ["rt-old", "at-old", "dev-secret"] {
                assert!(!said.contains(secret), "{case}: quoted a secret: {said}");
            }
            assert_eq!(endpoint.calls(), calls + 1, "{case}: one call");

            // What was sent: the grant, the provider's parameters, and the
            // client credentials where this provider wants them.
            let body = endpoint.bodies().pop().unwrap();
            let form: Vec<(String, String)> = url::form_urlencoded::parse(body.as_bytes())
                .into_owned()
                .collect();
            let has = |k: &str, v: &str| form.iter().any(|(fk, fv)| fk == k && fv == v);
            assert!(has("grant_type", "refresh_token"), "{case}");
            assert!(has("refresh_token", "rt-old"), "{case}");
            for (k, v) in &fx.request.params {
                assert!(has(k, v), "{case}: parameter {k}");
            }
            let authorization = endpoint.authorizations().pop().unwrap();
            if fx.request.client_auth == "basic" {
                assert!(
                    authorization
                        .as_deref()
                        .is_some_and(|a| a.starts_with("Basic ")),
                    "{case}"
                );
                assert!(!form.iter().any(|(k, _)| k == "client_secret"), "{case}");
            } else {
                assert_eq!(authorization, None, "{case}");
                assert!(has("client_id", "dev-client"), "{case}");
                assert!(has("client_secret", "dev-secret"), "{case}");
            }

            let stored = w
                .keeper
                .load_tokens(&fx.kind, &user, false)
                .await
                .unwrap()
                .unwrap();
            let near = |got: Option<i64>, want: Option<i64>| match (got, want) {
                (Some(g), Some(w)) => (g - w).abs() <= 2,
                (g, w) => g == w,
            };
            match &answer.expect {
                RecordedExpect::Ok(granted) => {
                    assert_eq!(result, Outcome::Ok(granted.access_token.clone()), "{case}");
                    let now = w.now();
                    let want_refresh = match granted.refresh_token.as_str() {
                        "kept" => "rt-old",
                        other => other,
                    };
                    let t = &stored.tokens;
                    assert_eq!(
                        t.refresh_token.as_ref().unwrap().expose_secret(),
                        want_refresh,
                        "{case}"
                    );
                    assert!(
                        near(t.access_token_expires_at, Some(now + granted.expires_in)),
                        "{case}: expires_at"
                    );
                    assert!(
                        near(
                            t.refresh_token_expires_at,
                            granted.refresh_token_expires_in.map(|s| now + s)
                        ),
                        "{case}: refresh_token_expires_at"
                    );
                    assert_eq!(
                        t.scopes,
                        granted.scopes.clone().unwrap_or(old_scopes),
                        "{case}"
                    );
                    assert_eq!(stored.generation, 2, "{case}: persisted");
                    assert_eq!(
                        t.access_token.expose_secret(),
                        granted.access_token,
                        "{case}"
                    );
                }
                RecordedExpect::Error(want) => {
                    assert_eq!(result, Outcome::Error(want.clone()), "{case}");
                    // A failed refresh loses nothing.
                    assert_eq!(stored.generation, 1, "{case}");
                    assert_eq!(stored.tokens.access_token.expose_secret(), "at-old");
                    assert_eq!(
                        stored.tokens.refresh_token.unwrap().expose_secret(),
                        "rt-old",
                        "{case}"
                    );
                }
            }
            checked += 1;
        }
    }
    assert!(
        checked >= 3 * tokenkeep_core::catalogue::CATALOGUE.len(),
        "{checked} answers"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn recorded_provider_answers_hold_in_the_rust_host() {
    recorded_answers_hold(Host::Rust).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn recorded_provider_answers_hold_in_the_node_host() {
    recorded_answers_hold(Host::Node).await;
}
