//! The token store's promises, each checked against a real Postgres started
//! by the harness and against SQLite, with a real loopback token endpoint.

mod common;

use common::{Backend, World, now, raw_sql, token_set};
use secrecy::ExposeSecret;
use std::process::Stdio;
use std::time::Duration;
use tokenkeep_host::{Error, TokenState};
use tokenkeep_testkit::devprovider::Behaviour;

on_both_backends!(
    a_database_migrated_by_a_newer_tokenkeep_is_refused_with_both_versions_named,
    a_fresh_token_is_returned_without_calling_the_provider,
    an_expired_token_is_refreshed_once_and_the_rotated_refresh_token_persisted,
    the_old_refresh_token_is_kept_when_the_answer_has_none,
    expiry_counts_from_when_the_request_was_sent,
    a_ciphertext_moved_to_another_row_fails_to_decrypt,
    a_revoked_refresh_token_requires_reauthorisation_and_keeps_the_row,
    a_provider_outage_is_transient_and_keeps_the_token,
    unknown_providers_and_hostile_ids_get_typed_errors,
    two_processes_refresh_an_expired_token_once,
    the_cli_reports_each_failure_class_with_its_exit_code,
    tokens_never_reach_the_logs,
    tokens_get_min_valid_refreshes_a_token_that_would_not_last,
);

async fn a_fresh_token_is_returned_without_calling_the_provider(b: Backend) {
    let w = World::new(b, "fresh").await;
    w.store("alice", "at-fresh", Some("rt-0"), 3600).await;
    let r = w.keeper.ensure_fresh("acme", "alice").await.unwrap();
    assert_eq!(r.access_token.expose_secret(), "at-fresh");
    assert_eq!(r.generation, 1);
    assert_eq!(w.provider.calls(), 0);
    let stored = w.stored("alice").await;
    assert!(w.keeper.is_access_token_valid(&stored, 60).await.unwrap());
    assert!(w.keeper.is_refresh_token_valid(&stored).await.unwrap());
}

async fn an_expired_token_is_refreshed_once_and_the_rotated_refresh_token_persisted(b: Backend) {
    let w = World::with_delay(b, "expired", Duration::from_millis(200)).await;
    w.store("alice", "at-old", Some("rt-0"), -10).await;
    // Four runtimes (own engine, own pool each), eight concurrent callers each.
    let mut keepers = vec![w.keeper.clone()];
    for _ in 0..3 {
        keepers.push(w.another_keeper().await);
    }
    let mut tasks = Vec::new();
    for k in &keepers {
        for _ in 0..8 {
            let k = k.clone();
            tasks.push(tokio::spawn(async move {
                k.ensure_fresh("acme", "alice").await
            }));
        }
    }
    let mut tokens = Vec::new();
    for t in tasks {
        let r = t.await.unwrap().unwrap();
        tokens.push(r.access_token.expose_secret().to_string());
    }
    tokens.dedup();
    assert_eq!(tokens.len(), 1, "every caller gets the one refreshed token");
    assert_ne!(tokens[0], "at-old");
    assert_eq!(
        w.provider.calls(),
        1,
        "exactly one provider call for 32 callers"
    );
    assert!(!w.provider.revoked());
    let stored = w
        .keeper
        .load_tokens("acme", "alice", true)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.generation, 2);
    assert_eq!(
        stored.tokens.refresh_token.unwrap().expose_secret(),
        &w.provider.current_refresh_token().unwrap(),
        "the rotated refresh token is what is stored"
    );
    // And now it is fresh: no further call.
    w.keeper.ensure_fresh("acme", "alice").await.unwrap();
    assert_eq!(w.provider.calls(), 1);
}

async fn the_old_refresh_token_is_kept_when_the_answer_has_none(b: Backend) {
    let w = World::with(
        b,
        "keep-rt",
        Behaviour {
            rotate: false,
            ..Default::default()
        },
        "",
    )
    .await;
    w.store("alice", "at-old", Some("rt-0"), -10).await;
    let r = w.keeper.ensure_fresh("acme", "alice").await.unwrap();
    assert_ne!(r.access_token.expose_secret(), "at-old");
    let stored = w.stored("alice").await;
    assert_eq!(stored.tokens.refresh_token.unwrap().expose_secret(), "rt-0");
    assert_eq!(
        stored.tokens.scopes,
        vec!["repo", "read:user"],
        "scopes kept when the answer has none"
    );
    assert_eq!(w.provider.calls(), 1);
}

async fn expiry_counts_from_when_the_request_was_sent(b: Backend) {
    let w = World::with(
        b,
        "sent-at",
        Behaviour {
            delay: Duration::from_secs(2),
            expires_in: 3600,
            ..Default::default()
        },
        "",
    )
    .await;
    w.store("alice", "at-old", Some("rt-0"), -10).await;
    let before = now();
    let r = w.keeper.ensure_fresh("acme", "alice").await.unwrap();
    let at = r.expires_at.unwrap();
    assert!(
        at >= before + 3600 && at <= before + 3601,
        "expiry {at} counts from the send at ~{before}, not the answer 2 s later"
    );
}

async fn a_ciphertext_moved_to_another_row_fails_to_decrypt(b: Backend) {
    let w = World::new(b, "moved").await;
    w.store("alice", "at-alice", Some("rt-a"), 3600).await;
    w.store("bob", "at-bob", Some("rt-b"), 3600).await;
    raw_sql(
        &w.database_url,
        "UPDATE tokenkeep_tokens SET access_token = (SELECT access_token FROM tokenkeep_tokens WHERE user_id = 'alice') WHERE user_id = 'bob'",
    )
    .await;
    let e = w.keeper.ensure_fresh("acme", "bob").await.unwrap_err();
    assert!(matches!(e, Error::Decryption(_)), "{e:?}");
    assert!(matches!(
        w.keeper.load_tokens("acme", "bob", false).await,
        Err(Error::Decryption(_))
    ));
    // A refresh token swapped into the access token column fails too.
    raw_sql(
        &w.database_url,
        "UPDATE tokenkeep_tokens SET access_token = refresh_token WHERE user_id = 'alice'",
    )
    .await;
    assert!(matches!(
        w.keeper.ensure_fresh("acme", "alice").await,
        Err(Error::Decryption(_))
    ));
    // Nothing was deleted.
    assert_eq!(w.keeper.list_tokens().await.unwrap().len(), 2);
}

async fn a_revoked_refresh_token_requires_reauthorisation_and_keeps_the_row(b: Backend) {
    let w = World::new(b, "revoked").await;
    w.store("alice", "at-old", Some("rt-not-in-chain"), -10)
        .await;
    let e = w.keeper.ensure_fresh("acme", "alice").await.unwrap_err();
    assert!(matches!(e, Error::ReauthorizationRequired(_)), "{e:?}");
    let list = w.keeper.list_tokens().await.unwrap();
    assert_eq!(
        list.len(),
        1,
        "a dead token is reported, never silently deleted"
    );
    assert_eq!(list[0].state, TokenState::ReauthorizationRequired);
    assert_eq!(list[0].health.failed_attempts, 1);
    assert_eq!(list[0].generation, 1);
    // Storing a new authorisation heals it.
    w.provider.reset_chain("rt-new");
    w.store("alice", "at-new", Some("rt-new"), -10).await;
    assert!(w.keeper.ensure_fresh("acme", "alice").await.is_ok());
}

async fn a_provider_outage_is_transient_and_keeps_the_token(b: Backend) {
    let w = World::new(b, "outage").await;
    w.provider
        .set(|b| b.canned = Some((503, "text/html".into(), "<html>down</html>".into())));
    w.store("alice", "at-old", Some("rt-0"), -10).await;
    let e = w.keeper.ensure_fresh("acme", "alice").await.unwrap_err();
    assert!(matches!(e, Error::ProviderUnavailable(_)), "{e:?}");
    let row = w.stored("alice").await;
    assert_eq!(row.tokens.refresh_token.unwrap().expose_secret(), "rt-0");
    assert_eq!(row.health.failed_attempts, 1);

    // Inside the window but still valid: the outage does not take it away.
    w.store("bob", "at-bob", Some("rt-0"), 300).await;
    let r = w.keeper.ensure_fresh("acme", "bob").await.unwrap();
    assert_eq!(r.access_token.expose_secret(), "at-bob");

    // Meanwhile no caller asks the provider again ...
    let calls = w.provider.calls();
    let e = w.keeper.ensure_fresh("acme", "alice").await.unwrap_err();
    assert!(matches!(e, Error::ProviderUnavailable(_)), "{e:?}");
    assert_eq!(w.provider.calls(), calls, "callers wait out the backoff");
    // ... until the backoff is over; the provider is back, and the kept
    // refresh token still works.
    w.provider.set(|b| b.canned = None);
    w.backoff_over().await;
    let r = w.keeper.ensure_fresh("acme", "alice").await.unwrap();
    assert_ne!(r.access_token.expose_secret(), "at-old");
    assert_eq!(w.stored("alice").await.health.failed_attempts, 0);
}

async fn unknown_providers_and_hostile_ids_get_typed_errors(b: Backend) {
    let w = World::new(b, "hostile").await;
    assert!(matches!(
        w.keeper.ensure_fresh("nope", "alice").await,
        Err(Error::UnknownProvider(_))
    ));
    assert!(matches!(
        w.keeper.ensure_fresh("acme", "").await,
        Err(Error::InvalidInput(_))
    ));
    assert!(matches!(
        w.keeper.ensure_fresh("acme", "a\0b").await,
        Err(Error::InvalidInput(_))
    ));
    assert!(matches!(
        w.keeper.ensure_fresh("ac'me", "alice").await,
        Err(Error::InvalidInput(_))
    ));
    assert!(matches!(
        w.keeper.ensure_fresh("acme", &"x".repeat(5000)).await,
        Err(Error::InvalidInput(_))
    ));
    assert!(matches!(
        w.keeper.ensure_fresh("acme", "nobody").await,
        Err(Error::NotFound { .. })
    ));
    for user in [
        "x'; DROP TABLE tokenkeep_tokens; --",
        "ユーザー🙂",
        "$1 %s \\",
    ] {
        w.keeper
            .store_tokens(
                "acme",
                user,
                &token_set("at-h", Some("rt-h"), Some(now() + 3600)),
            )
            .await
            .unwrap();
        let r = w.keeper.ensure_fresh("acme", user).await.unwrap();
        assert_eq!(r.user_id, user, "stored verbatim");
    }
    assert_eq!(w.keeper.list_tokens().await.unwrap().len(), 3);
}

async fn two_processes_refresh_an_expired_token_once(b: Backend) {
    let w = World::with_delay(b, "processes", Duration::from_millis(300)).await;
    w.store("alice", "at-old", Some("rt-0"), -10).await;
    let children: Vec<_> = (0..4)
        .map(|_| {
            w.cli()
                .args(["tokens", "get", "acme", "alice"])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let outputs: Vec<_> = tokio::task::spawn_blocking(move || {
        children
            .into_iter()
            .map(|c| c.wait_with_output().unwrap())
            .collect()
    })
    .await
    .unwrap();
    let mut tokens: Vec<String> = outputs
        .iter()
        .map(|o| {
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            String::from_utf8(o.stdout.clone()).unwrap()
        })
        .collect();
    tokens.dedup();
    assert_eq!(tokens.len(), 1);
    assert!(
        tokens[0].starts_with("dev-at-")
            && tokens[0].ends_with('\n')
            && tokens[0].lines().count() == 1
    );
    assert_eq!(w.provider.calls(), 1, "four processes, one provider call");
}

async fn tokens_get_min_valid_refreshes_a_token_that_would_not_last(b: Backend) {
    let w = World::new(b, "min-valid").await;
    // An hour-long token with 1000 s left: not due (its window is 600 s).
    w.store("alice", "at-old", Some("rt-0"), 1000).await;
    raw_sql(
        &w.database_url,
        "UPDATE tokenkeep_tokens SET obtained_at = obtained_at - 2600",
    )
    .await;
    let get = |args: &[&str]| {
        let o = w
            .cli()
            .args(["tokens", "get", "acme", "alice"])
            .args(args)
            .output()
            .unwrap();
        (
            o.status.code().unwrap(),
            String::from_utf8_lossy(&o.stdout).trim_end().to_string(),
            String::from_utf8_lossy(&o.stderr).to_string(),
        )
    };
    assert_eq!(
        get(&["--min-valid", "10m"]).1,
        "at-old",
        "it lasts 10 minutes"
    );
    assert_eq!(w.provider.calls(), 0);
    // A 30-minute step: refreshed first.
    let (code, token, stderr) = get(&["--min-valid", "30m"]);
    assert_eq!((code, stderr.as_str()), (0, ""));
    assert!(token.starts_with("dev-at-"), "{token}");
    assert_eq!(w.provider.calls(), 1);
    // More than an hour-long token less its window can promise: refused,
    // one line, no provider call.
    let (code, token, stderr) = get(&["--min-valid", "1h"]);
    assert_eq!((code, token.as_str()), (13, ""));
    assert!(stderr.starts_with("tokenkeep: invalid-input: "), "{stderr}");
    assert_eq!(stderr.lines().count(), 1);
    assert_eq!(w.provider.calls(), 1);
    let (code, _, stderr) = get(&["--min-valid", "soon"]);
    assert_eq!(code, 2, "{stderr}");
}

async fn the_cli_reports_each_failure_class_with_its_exit_code(b: Backend) {
    let w = World::new(b, "exit-codes").await;
    let code = |args: &[&str]| {
        let o = w.cli().args(args).output().unwrap();
        let stderr = String::from_utf8_lossy(&o.stderr).to_string();
        assert!(o.stdout.is_empty(), "nothing on stdout on failure");
        assert_eq!(stderr.lines().count(), 1, "one-line error: {stderr}");
        o.status.code().unwrap()
    };
    assert_eq!(code(&["tokens", "get", "nope", "alice"]), 12);
    assert_eq!(code(&["tokens", "get", "acme", "nobody"]), 3);
    w.store("alice", "at-old", Some("rt-dead"), -10).await;
    assert_eq!(code(&["tokens", "get", "acme", "alice"]), 4);
    assert_eq!(
        code(&["tokens", "get", "acme", "alice"]),
        4,
        "a refusal stands"
    );
    assert_eq!(
        w.provider.calls(),
        1,
        "and the dead refresh token is not sent again"
    );
    // A new authorisation heals it.
    w.provider.reset_chain("rt-dead");
    w.store("alice", "at-old", Some("rt-dead"), -10).await;
    w.provider
        .set(|b| b.canned = Some((502, "text/plain".into(), "bad gateway".into())));
    assert_eq!(code(&["tokens", "get", "acme", "alice"]), 5);
    w.backoff_over().await;
    w.provider
        .set(|b| b.canned = Some((200, "application/json".into(), "{\"token\":1}".into())));
    assert_eq!(code(&["tokens", "get", "acme", "alice"]), 11);
    w.backoff_over().await;
    w.provider.set(|b| {
        b.canned = Some((
            401,
            "application/json".into(),
            "{\"error\":\"invalid_client\"}".into(),
        ))
    });
    assert_eq!(code(&["tokens", "get", "acme", "alice"]), 6);
}

async fn tokens_never_reach_the_logs(b: Backend) {
    let w = World::new(b, "logs").await;
    let mut captured = String::new();
    let mut run = |args: &[&str], stdin: Option<&str>, keep_stdout: bool| {
        let (_, stdout, stderr) = w.cli_traced(args, stdin.unwrap_or_default());
        captured.push_str(&stderr);
        if keep_stdout {
            captured.push_str(&stdout);
        }
        stdout.trim().to_string()
    };
    run(
        &["tokens", "put", "acme", "alice"],
        Some(r#"{"access_token":"at-PUT-SECRET","refresh_token":"rt-0","expires_in":5}"#),
        true,
    );
    let refreshed = run(&["tokens", "get", "acme", "alice"], None, false);
    run(&["tokens", "list"], None, true);
    run(
        &["tokens", "put", "acme", "bob"],
        Some(r#"{"access_token":"at-BOB-SECRET","refresh_token":"rt-BOB-DEAD","expires_in":5}"#),
        true,
    );
    run(&["tokens", "get", "acme", "bob"], None, true);
    w.provider
        .set(|b| b.canned = Some((500, "text/plain".into(), "boom".into())));
    run(&["tokens", "get", "acme", "bob"], None, true);

    assert!(
        refreshed.starts_with("dev-at-"),
        "the refresh happened: {refreshed}"
    );
    assert!(
        captured.contains("TRACE") || captured.contains("DEBUG"),
        "trace logging was on"
    );
    let rotated = w.provider.current_refresh_token().unwrap();
    let key_material = common::KEYS
        .lines()
        .map(|l| l.split_once('=').unwrap().1.to_string());
    let secrets = [
        "at-PUT-SECRET",
        "at-BOB-SECRET",
        "rt-BOB-DEAD",
        "dev-secret",
        &refreshed,
        &rotated,
    ]
    .into_iter()
    .map(str::to_string)
    .chain(key_material);
    for secret in secrets {
        assert!(!captured.contains(&secret), "a secret reached the output");
    }
    // rt-0 is a prefix of nothing else in the output; check it separately.
    assert!(!captured.contains("\"rt-0\"") && !captured.contains("rt-0&"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sqlite_default_creates_a_private_key_file_once() {
    use std::os::unix::fs::PermissionsExt;
    let w = World::new(Backend::Sqlite, "keyfile").await;
    let db = w.scratch.0.join("fresh.db");
    let run = || {
        w.cli()
            .env("TOKENKEEP_DATABASE", format!("sqlite:{}", db.display()))
            .env_remove("TOKENKEEP_KEYS_FILE")
            .args(["tokens", "list"])
            .output()
            .unwrap()
    };
    let first = run();
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    assert!(String::from_utf8_lossy(&first.stderr).contains("created encryption key"));
    let key = db.with_extension("key");
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let second = run();
    assert!(second.status.success());
    assert!(second.stderr.is_empty(), "said once only");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_refuses_to_start_without_a_configured_key() {
    let w = World::new(Backend::Postgres, "pg-no-key").await;
    let o = w
        .cli()
        .env_remove("TOKENKEEP_KEYS_FILE")
        .args(["tokens", "list"])
        .output()
        .unwrap();
    assert_eq!(
        o.status.code(),
        Some(14),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(String::from_utf8_lossy(&o.stderr).contains("Postgres needs a configured key"));
}

/// The README's first command: eight runtime processes, one refresh.
#[test]
fn the_demo_shows_one_refresh_for_eight_runtimes() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tokenkeep"))
        .arg("demo")
        .env_remove("TOKENKEEP_DATABASE")
        .env_remove("TOKENKEEP_CONFIG")
        .env_remove("TOKENKEEP_KEYS_FILE")
        .env_remove("TOKENKEEP_KEYS")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("provider calls  1 for 8 runtimes"),
        "{stdout}"
    );
    assert!(stdout.contains("tokens served   1 distinct"), "{stdout}");
    assert!(stdout.contains("alive"), "{stdout}");
    assert_eq!(
        stdout.matches("valid token, fingerprint").count(),
        8,
        "{stdout}"
    );
}

/// `tokenkeep migrate` says which schema version the database is at; once a
/// newer tokenkeep has migrated it further, this one refuses it (library and
/// CLI, every command), naming both versions, and writes nothing.
async fn a_database_migrated_by_a_newer_tokenkeep_is_refused_with_both_versions_named(b: Backend) {
    let w = World::new(b, "schema").await;
    w.store("u", "at-1", Some("rt-1"), 3600).await;
    let migrated = w.cli().arg("migrate").output().unwrap();
    let out = String::from_utf8_lossy(&migrated.stdout);
    assert_eq!(migrated.status.code(), Some(0), "{out}");
    let known: i64 = out
        .trim()
        .strip_prefix("schema at version ")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("migrate printed {out:?}"));

    let newer = known + 1;
    raw_sql(
        &w.database_url,
        &match b {
            Backend::Postgres => format!("INSERT INTO tokenkeep_schema (version) VALUES ({newer})"),
            Backend::Sqlite => {
                format!("INSERT INTO tokenkeep_schema (version, applied_at) VALUES ({newer}, 0)")
            }
        },
    )
    .await;
    let opened = common::open_keeper_with(
        &w.database_url,
        &w.config_path,
        common::KEYS,
        w.clock.clone(),
        false,
    )
    .await;
    match opened {
        Err(Error::Config(m)) => assert!(
            m.contains(&format!("version {newer}")) && m.contains(&format!("({known})")),
            "{m}"
        ),
        Err(other) => panic!("expected a configuration error, got {other}"),
        Ok(_) => panic!("a newer schema was accepted"),
    }
    for args in [&["migrate"][..], &["tokens", "get", "acme", "u"]] {
        let o = w.cli().args(args).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(14), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: one line: {err}");
        assert!(err.contains("newer than this tokenkeep"), "{err}");
        assert!(o.stdout.is_empty(), "{args:?}");
    }
}
