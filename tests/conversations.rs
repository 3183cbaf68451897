//! The seed's `refresh_provider_tokens` for long-running conversations: a
//! refreshed copy of the settings, single-flight per provider, scope
//! preservation, persistence for resumption on another node, no silent
//! failure. On the harness's Postgres and on SQLite.

mod common;

use common::{Backend, World, now};
use secrecy::ExposeSecret;
use std::io::Write;
use std::process::Stdio;
use std::time::Duration;
use tokenkeep_host::{Clock, ConversationSettings, Error, ProviderToken};
use tokenkeep_testkit::devprovider::{Behaviour, DevProvider};

on_both_backends!(
    only_stale_tokens_are_refreshed_once_each_even_with_several_runtimes_at_once,
    refreshing_fresh_settings_is_a_no_op,
    a_narrowed_scope_is_rejected_naming_the_missing_scope,
    a_revoked_provider_fails_the_call_with_its_name_unless_partial_results_were_asked,
    a_conversation_resumes_on_a_second_process_after_the_first_was_killed,
    the_periodic_refresher_renews_live_conversations_as_they_enter_the_window,
);

fn token(provider: &str, access: &str, refresh: Option<&str>, expires_in: i64) -> ProviderToken {
    ProviderToken {
        provider: provider.into(),
        access_token: access.to_string().into(),
        refresh_token: refresh.map(|r| r.to_string().into()),
        expires_at: Some(now() + expires_in),
        refresh_token_expires_at: None,
        obtained_at: None,
        scopes: vec!["repo".into(), "read:user".into()],
    }
}

/// acme and gamma stale, beta fresh.
async fn three_providers(
    b: Backend,
    name: &str,
    delay: Duration,
) -> (World, DevProvider, DevProvider, ConversationSettings) {
    let mut w = World::with_delay(b, name, delay).await;
    let beta = w.add_provider("beta", Behaviour::default()).await;
    let gamma = w
        .add_provider(
            "gamma",
            Behaviour {
                delay,
                ..Default::default()
            },
        )
        .await;
    let settings = ConversationSettings {
        provider_tokens: vec![
            token("acme", "at-acme-old", Some("rt-0"), -10),
            token("beta", "at-beta", Some("rt-0"), 3600),
            token("gamma", "at-gamma-old", Some("rt-0"), 30),
        ],
    };
    (w, beta, gamma, settings)
}

fn access<'a>(s: &'a ConversationSettings, provider: &str) -> &'a str {
    s.provider_tokens
        .iter()
        .find(|t| t.provider == provider)
        .unwrap()
        .access_token
        .expose_secret()
}

async fn only_stale_tokens_are_refreshed_once_each_even_with_several_runtimes_at_once(b: Backend) {
    let (w, beta, gamma, settings) =
        three_providers(b, "conv-stale", Duration::from_millis(200)).await;
    let mut tasks = Vec::new();
    for _ in 0..3 {
        let keeper = w.another_keeper().await;
        for _ in 0..4 {
            let (keeper, settings) = (keeper.clone(), settings.clone());
            tasks.push(tokio::spawn(async move {
                keeper
                    .refresh_provider_tokens(&settings, "conv-1", "alice")
                    .await
            }));
        }
    }
    let mut outputs = Vec::new();
    for t in tasks {
        outputs.push(t.await.unwrap().unwrap().to_json());
    }
    outputs.dedup();
    assert_eq!(outputs.len(), 1, "twelve callers, one refreshed copy");
    assert_eq!(
        (w.provider.calls(), beta.calls(), gamma.calls()),
        (1, 0, 1),
        "stale ones once each, the fresh one never"
    );
    let out = ConversationSettings::from_json(outputs[0].as_bytes()).unwrap();
    assert!(access(&out, "acme").starts_with("dev-at-1-"));
    assert!(access(&out, "gamma").starts_with("dev-at-1-"));
    assert_eq!(
        access(&out, "beta"),
        "at-beta",
        "a fresh token is returned as it was"
    );
    // The input copy is untouched: a runtime still holding it keeps working.
    assert_eq!(access(&settings, "acme"), "at-acme-old");
    assert_eq!(access(&settings, "gamma"), "at-gamma-old");
    let entries = w.keeper.conversation_entries("conv-1").await.unwrap();
    assert_eq!(entries.len(), 3);
}

async fn refreshing_fresh_settings_is_a_no_op(b: Backend) {
    let (w, beta, gamma, settings) = three_providers(b, "conv-idem", Duration::ZERO).await;
    let first = w
        .keeper
        .refresh_provider_tokens(&settings, "conv-1", "alice")
        .await
        .unwrap();
    let calls = (w.provider.calls(), beta.calls(), gamma.calls());
    let entries = format!(
        "{:?}",
        w.keeper.conversation_entries("conv-1").await.unwrap()
    );
    let again = w
        .keeper
        .refresh_provider_tokens(&first, "conv-1", "alice")
        .await
        .unwrap();
    assert_eq!(again.to_json(), first.to_json(), "equal output");
    assert_eq!(
        (w.provider.calls(), beta.calls(), gamma.calls()),
        calls,
        "no provider call"
    );
    assert_eq!(
        format!(
            "{:?}",
            w.keeper.conversation_entries("conv-1").await.unwrap()
        ),
        entries,
        "no write"
    );
}

async fn a_narrowed_scope_is_rejected_naming_the_missing_scope(b: Backend) {
    let w = World::with(
        b,
        "conv-scope",
        Behaviour {
            scope: Some("repo".into()),
            ..Default::default()
        },
        "",
    )
    .await;
    let settings = ConversationSettings {
        provider_tokens: vec![token("acme", "at-old", Some("rt-0"), -10)],
    };
    let e = w
        .keeper
        .refresh_provider_tokens(&settings, "conv-1", "alice")
        .await
        .unwrap_err();
    assert_eq!(e.provider, "acme");
    assert_eq!(e.error, Error::ScopeMismatch(vec!["read:user".into()]));
    assert_eq!(
        access(&settings, "acme"),
        "at-old",
        "the caller keeps its old token"
    );
}

async fn a_revoked_provider_fails_the_call_with_its_name_unless_partial_results_were_asked(
    b: Backend,
) {
    let (w, beta, gamma, mut settings) = three_providers(b, "conv-revoked", Duration::ZERO).await;
    settings.provider_tokens[0].refresh_token = Some("rt-revoked".to_string().into());
    let e = w
        .keeper
        .refresh_provider_tokens(&settings, "conv-1", "alice")
        .await
        .unwrap_err();
    assert_eq!(e.provider, "acme");
    assert!(
        matches!(e.error, Error::ReauthorizationRequired(_)),
        "{e:?}"
    );
    assert!(e.to_string().contains("acme"), "{e}");

    let partial = w
        .keeper
        .refresh_provider_tokens_partial(&settings, "conv-2", "bob")
        .await
        .unwrap();
    assert_eq!(partial.failures.len(), 1);
    assert_eq!(partial.failures[0].provider, "acme");
    assert_eq!(
        access(&partial.settings, "acme"),
        "at-acme-old",
        "a failed provider keeps its input token"
    );
    assert!(access(&partial.settings, "gamma").starts_with("dev-at-"));
    assert_eq!(beta.calls(), 0);
    assert_eq!(
        gamma.calls(),
        1,
        "the strict call stopped at acme; the partial one refreshed gamma"
    );
}

async fn a_conversation_resumes_on_a_second_process_after_the_first_was_killed(b: Backend) {
    let mut w = World::new(b, "conv-resume").await;
    let slow = w
        .add_provider(
            "gamma",
            Behaviour {
                delay: Duration::from_secs(3),
                rotate: false,
                ..Default::default()
            },
        )
        .await;
    let settings = ConversationSettings {
        provider_tokens: vec![
            token("acme", "at-acme-old", Some("rt-0"), -10),
            token("gamma", "at-gamma-old", Some("rt-0"), -10),
        ],
    };
    // Node 1 refreshes acme, then stalls on gamma and dies.
    let mut node1 = w
        .cli()
        .args(["conversations", "refresh", "conv-9", "alice"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    node1
        .stdin
        .take()
        .unwrap()
        .write_all(settings.to_json().as_bytes())
        .unwrap();
    while slow.arrived() == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    node1.kill().unwrap();
    node1.wait().unwrap();
    assert_eq!(w.provider.calls(), 1, "acme was refreshed before the crash");
    slow.set(|b| b.delay = Duration::ZERO);

    // Node 2 resumes the conversation with nothing but its id.
    let out = w
        .cli()
        .args(["conversations", "resume", "conv-9"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let resumed = ConversationSettings::from_json(&out.stdout).unwrap();
    let stored = w.stored("alice").await;
    assert_eq!(
        access(&resumed, "acme"),
        stored.tokens.access_token.expose_secret(),
        "the latest acme token"
    );
    assert_eq!(w.provider.calls(), 1, "acme is not refreshed again");
    assert!(
        access(&resumed, "gamma").starts_with("dev-at-"),
        "gamma refreshed on resume"
    );

    let show = w
        .cli()
        .args(["conversations", "show", "conv-9"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&show.stdout);
    assert_eq!(text.lines().count(), 2, "{text}");
    assert!(
        !text.contains("dev-at-") && !text.contains("rt-0"),
        "no secret: {text}"
    );
    assert_eq!(
        w.cli()
            .args(["conversations", "resume", "never-seen"])
            .output()
            .unwrap()
            .status
            .code(),
        Some(3)
    );
}

async fn the_periodic_refresher_renews_live_conversations_as_they_enter_the_window(b: Backend) {
    let w = World::build(
        b,
        "conv-timer",
        Behaviour::default(),
        "",
        Clock::manual(1_900_000_000),
    )
    .await;
    let settings = ConversationSettings {
        provider_tokens: vec![ProviderToken {
            expires_at: Some(w.now() + 3600),
            obtained_at: Some(w.now()),
            ..token("acme", "at-1", Some("rt-0"), 0)
        }],
    };
    let first = w
        .keeper
        .refresh_provider_tokens(&settings, "live", "alice")
        .await
        .unwrap();
    assert_eq!(access(&first, "acme"), "at-1", "fresh: nothing to do");
    // The timer knows live conversations by id only; an unknown id is no error.
    let ids = vec!["live".to_string(), "unknown".to_string()];
    w.clock.advance(3600 - 601);
    for (_, r) in w.keeper.refresh_live_conversations(&ids).await {
        r.unwrap();
    }
    assert_eq!(w.provider.calls(), 0, "outside the 10-minute window");
    w.clock.advance(2);
    let results = w.keeper.refresh_live_conversations(&ids).await;
    assert!(results.iter().all(|(_, r)| r.is_ok()), "{results:?}");
    assert_eq!(w.provider.calls(), 1, "renewed as it entered the window");
    let resumed = w.keeper.resume("live").await.unwrap().unwrap();
    assert!(access(&resumed, "acme").starts_with("dev-at-1-"));
    assert_eq!(w.provider.calls(), 1);
}
