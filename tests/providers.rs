//! The provider catalogue: retries, requests of unknown fate, configuration
//! errors and hostile answers. (The recorded answers of every catalogued
//! provider, tests/vectors/providers, are run by tests/vectors.rs in both
//! hosts.)

mod common;

use common::{Backend, World};
use secrecy::ExposeSecret;
use std::time::Duration;
use tokenkeep_core::catalogue::CATALOGUE;
use tokenkeep_host::{Error, TokenSet};
use tokenkeep_testkit::devprovider::Behaviour;

fn stale(now: i64) -> TokenSet {
    TokenSet {
        access_token: "at-old".to_string().into(),
        refresh_token: Some("rt-old".to_string().into()),
        access_token_expires_at: Some(now - 10),
        refresh_token_expires_at: None,
        scopes: Vec::new(),
    }
}

#[test]
fn the_catalogue_file_other_hosts_read_is_the_catalogue() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../host/schema/catalogue.json");
    let current = tokenkeep_host::config::catalogue_json();
    if std::env::var_os("TOKENKEEP_BLESS").is_some() {
        std::fs::write(path, &current).unwrap();
    }
    let committed = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        committed == current,
        "host/schema/catalogue.json is stale: rerun with TOKENKEEP_BLESS=1"
    );
}

#[test]
fn the_readme_lists_every_catalogued_provider_as_catalogued() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    for spec in CATALOGUE {
        let row = readme
            .lines()
            .find(|l| l.starts_with(&format!("| `{}` |", spec.kind)))
            .unwrap_or_else(|| panic!("README has no row for {}", spec.kind));
        assert!(row.contains(spec.token_url), "{}: token URL", spec.kind);
        let auth = match spec.client_auth {
            tokenkeep_core::catalogue::ClientAuth::Basic => "| basic |",
            tokenkeep_core::catalogue::ClientAuth::Body => "| body |",
        };
        assert!(row.contains(auth), "{}: client auth", spec.kind);
        for setting in spec.settings {
            assert!(
                row.contains(setting.name),
                "{}: {}",
                spec.kind,
                setting.name
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn transient_failures_are_retried_with_backoff_and_refusals_are_not() {
    let mut w = World::new(Backend::Sqlite, "retries").await;
    let flaky = w
        .add_provider_toml(
            "flaky",
            Behaviour::default(),
            "token_url = \"{loopback}/token\"\nmax_attempts = 3\n",
        )
        .await;
    // Two 503s, then the endpoint recovers: the third attempt refreshes.
    flaky.set(|b| b.canned = Some((503, "text/html".into(), "<h1>busy</h1>".into())));
    w.keeper
        .store_tokens("flaky", "u", &stale(w.now()))
        .await
        .unwrap();
    let recover = flaky.clone();
    tokio::spawn(async move {
        while recover.calls() < 2 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        recover.set(|b| b.canned = None);
        recover.reset_chain("rt-old");
    });
    let started = std::time::Instant::now();
    let got = w.keeper.ensure_fresh("flaky", "u").await.unwrap();
    let waited = started.elapsed();
    assert_eq!(flaky.calls(), 3, "two transient failures, then success");
    assert_ne!(got.access_token.expose_secret(), "at-old");
    // Exponential backoff with jitter: at least 200 ms, then 400 ms.
    assert!(waited >= Duration::from_millis(600), "{waited:?}");

    // Always busy: three attempts, then the typed error; the token stays.
    flaky.set(|b| b.canned = Some((503, "text/plain".into(), "busy".into())));
    w.keeper
        .store_tokens("flaky", "v", &stale(w.now()))
        .await
        .unwrap();
    let before = flaky.calls();
    let e = w.keeper.ensure_fresh("flaky", "v").await.unwrap_err();
    assert!(matches!(e, Error::ProviderUnavailable(_)), "{e}");
    assert_eq!(flaky.calls() - before, 3);
    let kept = w.keeper.load_tokens("flaky", "v", false).await.unwrap();
    assert_eq!(kept.unwrap().generation, 1);

    // A refusal says something about the token: never repeated.
    flaky.set(|b| {
        b.canned = Some((
            400,
            "application/json".into(),
            r#"{"error":"invalid_grant"}"#.into(),
        ))
    });
    w.keeper
        .store_tokens("flaky", "x", &stale(w.now()))
        .await
        .unwrap();
    let before = flaky.calls();
    let e = w.keeper.ensure_fresh("flaky", "x").await.unwrap_err();
    assert!(matches!(e, Error::ReauthorizationRequired(_)), "{e}");
    assert_eq!(flaky.calls() - before, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_request_whose_fate_is_unknown_is_repeated_only_to_providers_that_do_not_rotate() {
    let mut w = World::new(Backend::Sqlite, "fate").await;
    let rotating = w
        .add_provider_toml(
            "rotating",
            Behaviour::default(),
            "token_url = \"{loopback}/token\"\nmax_attempts = 3\ntimeout_ms = 300\n",
        )
        .await;
    let steady = w
        .add_provider_toml(
            "steady",
            Behaviour::default(),
            "token_url = \"{loopback}/token\"\nmax_attempts = 3\ntimeout_ms = 300\nrotates_refresh_tokens = false\n",
        )
        .await;
    type Fate = (&'static str, fn(&mut Behaviour));
    let unknown_fates: [Fate; 2] = [
        ("a 500", |b| {
            b.canned = Some((500, "text/plain".into(), "oops".into()))
        }),
        // The provider acts, then answers after the timeout.
        ("a timeout after the provider acted", |b| {
            b.answer_delay = Duration::from_secs(2)
        }),
    ];
    for (i, (fate, set)) in unknown_fates.iter().enumerate() {
        for (name, provider, attempts) in [("rotating", &rotating, 1), ("steady", &steady, 3)] {
            let user = format!("u{i}");
            provider.reset_chain("rt-old");
            provider.set(|b| {
                *b = Behaviour::default();
                b.rotate = name == "rotating";
            });
            provider.set(*set);
            w.keeper
                .store_tokens(name, &user, &stale(w.now()))
                .await
                .unwrap();
            let before = provider.arrived();
            let e = w.keeper.ensure_fresh(name, &user).await.unwrap_err();
            assert!(
                matches!(e, Error::ProviderUnavailable(_)),
                "{fate}, {name}: {e}"
            );
            assert_eq!(
                provider.arrived() - before,
                attempts,
                "{fate}, {name}: requests sent"
            );
            assert_eq!(provider.reuses(), 0, "{fate}, {name}: never a reuse");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unusable_answer_that_rotated_keeps_the_new_refresh_token() {
    let mut w = World::new(Backend::Sqlite, "salvage").await;
    let p = w
        .add_provider_toml(
            "odd",
            Behaviour::default(),
            "token_url = \"{loopback}/token\"\n",
        )
        .await;
    // 2xx with a new refresh token but a nonsense lifetime: the old refresh
    // token is spent, so the new one must not be dropped.
    p.set(|b| {
        b.canned = Some((
            200,
            "application/json".into(),
            r#"{"access_token":"at-odd","expires_in":"soon","refresh_token":"rt-rotated"}"#.into(),
        ))
    });
    w.keeper
        .store_tokens("odd", "u", &stale(w.now()))
        .await
        .unwrap();
    let e = w.keeper.ensure_fresh("odd", "u").await.unwrap_err();
    assert!(matches!(e, Error::InvalidProviderResponse(_)), "{e}");
    let row = w
        .keeper
        .load_tokens("odd", "u", false)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        row.tokens.refresh_token.unwrap().expose_secret(),
        "rt-rotated"
    );
    assert_eq!(row.generation, 2);
    // The next refresh, after the backoff, spends the kept token, and works.
    p.set(|b| b.canned = None);
    p.reset_chain("rt-rotated");
    w.backoff_over().await;
    let got = w.keeper.ensure_fresh("odd", "u").await.unwrap();
    assert_ne!(got.access_token.expose_secret(), "at-old");
    assert_eq!(p.reuses(), 0);
}

#[tokio::test]
async fn configuration_names_the_problem_without_quoting_secrets() {
    use tokenkeep_host::Config;
    let err = |text: &str| Config::parse(text).unwrap_err().to_string();
    assert!(err("[providers.microsoft]\nclient_id = \"a\"\n").contains("scope"));
    assert!(
        err("[providers.gitlab]\nclient_id = \"a\"\nbase_url = \"ftp://x\"\n").contains("http")
    );
    assert!(err("[providers.gh]\nkind = \"githb\"\nclient_id = \"a\"\n").contains("github"));
    assert!(err("[providers.acme]\nclient_id = \"a\"\n").contains("token_url"));
    assert!(err("[providers.google]\nclient_id = \"a\"\ntenant = \"x\"\n").contains("tenant"));
    let ok = Config::parse(
        "[providers.work-gitlab]\nkind = \"gitlab\"\nbase_url = \"https://git.example.com\"\nclient_id = \"a\"\n\
         [providers.bitbucket]\nclient_id = \"b\"\nclient_secret = \"hunter2\"\n",
    )
    .unwrap();
    assert_eq!(
        ok.providers["work-gitlab"].token_url,
        "https://git.example.com/oauth/token"
    );
    assert_eq!(
        ok.providers["bitbucket"].client_auth,
        tokenkeep_host::config::ClientAuth::Basic
    );
    assert!(!format!("{ok:?}").contains("hunter2"));

    // Before the catalogue, Microsoft's scope went in extra_params: still
    // accepted, and sent once.
    let ms = Config::parse(
        "[providers.microsoft]\nclient_id = \"a\"\nextra_params = { scope = \"offline_access x\" }\n",
    )
    .unwrap();
    assert_eq!(
        ms.providers["microsoft"].extra_params,
        vec![("scope".to_string(), "offline_access x".to_string())]
    );
    let gl = Config::parse(
        "[providers.gitlab]\nclient_id = \"a\"\nredirect_uri = \"https://a/cb\"\nextra_params = { redirect_uri = \"https://b/cb\" }\n",
    )
    .unwrap();
    assert_eq!(
        gl.providers["gitlab"].extra_params,
        vec![("redirect_uri".to_string(), "https://b/cb".to_string())],
        "the configuration's parameter wins and is not sent twice"
    );
    assert!(
        err("[providers.gitlab]\nclient_id = \"a\"\nbase_url = \"https://g.example\"\ntoken_url = \"https://h.example/t\"\n")
            .contains("set one")
    );
    assert!(err("[providers.acme]\ntoken_url = \"https://a.example/t\"\nclient_id = \"a\"\nmax_attempts = 0\n").contains("max_attempts"));
}

/// The guest's stack is small (component/build.rs): the deepest answer the
/// JSON parser accepts still parses, and a deeper one is an invalid answer,
/// not a trap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deeply_nested_answers_parse_or_are_refused_without_exhausting_the_guest_stack() {
    let w = World::new(Backend::Sqlite, "deep-json").await;
    let nested = |open: &str, close: &str, depth: usize| {
        format!(
            r#"{{"access_token":"at-deep","token_type":"bearer","expires_in":3600,"extra":{}0{}}}"#,
            open.repeat(depth),
            close.repeat(depth)
        )
    };
    let answer = |depth: usize| nested("[", "]", depth);
    // serde_json's limit is 128 levels, the answer object one of them:
    // arrays, and objects (whose maps take more stack per level).
    for (user, body) in [
        ("deep", answer(126)),
        ("deep-objects", nested(r#"{"a":"#, "}", 126)),
    ] {
        w.provider
            .set(|b| b.canned = Some((200, "application/json".into(), body.clone())));
        w.store(user, "at-old", Some("rt-0"), -10).await;
        let grant = w.keeper.ensure_fresh("acme", user).await.unwrap();
        assert_eq!(grant.access_token.expose_secret(), "at-deep");
    }

    w.provider
        .set(|b| b.canned = Some((200, "application/json".into(), answer(5_000))));
    w.store("deeper", "at-old", Some("rt-0"), -10).await;
    match w.keeper.ensure_fresh("acme", "deeper").await {
        Err(Error::InvalidProviderResponse(_)) => {}
        other => panic!("expected an invalid provider answer, got {other:?}"),
    }
}
