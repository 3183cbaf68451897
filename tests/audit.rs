//! The audit log: one line per token read (through the API, the CLI or the
//! library), refresh, store and delete, with who asked; queryable and
//! pruned after its retention.

mod common;

use common::service::{self, OPS_KEY, Service, TENANT_A_KEY, request, segment};
use common::{Backend, World};
use serde_json::Value;

/// `tokenkeep audit --json ARGS` as parsed lines.
fn audit_lines(w: &World, args: &[&str]) -> Vec<Value> {
    let mut all = vec!["audit", "--json"];
    all.extend_from_slice(args);
    let (code, out, err) = w.cli_traced(&all, "");
    assert_eq!(code, 0, "{err}");
    out.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn summary(lines: &[Value]) -> Vec<String> {
    lines
        .iter()
        .map(|l| {
            format!(
                "{} {} {}/{} {} {}",
                l["caller"].as_str().unwrap(),
                l["action"].as_str().unwrap(),
                l["provider"].as_str().unwrap(),
                l["user_id"].as_str().unwrap(),
                l["generation"],
                l["outcome"].as_str().unwrap()
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_read_refresh_store_and_delete_is_recorded_with_the_key_that_made_it() {
    let mut w = World::new(Backend::Sqlite, "audit-keys").await;
    w.add_config(&service::serve_section(service::NO_REFRESHER))
        .await;
    w.store("a:ann", "at-ann", Some("rt-0"), -10).await;
    w.store("bob", "at-bob", Some("rt-bob"), 3600).await;
    let mut s = Service::start(&w, "api", "warn");
    let at = s.unix();
    let read = |key: &'static str, user: &'static str| {
        let at = at.clone();
        async move {
            request(
                &at,
                "GET",
                &format!("/v1/tokens/acme/{}/access-token", segment(user)),
                Some(key),
                None,
            )
            .await
            .status
        }
    };
    // tenant-a reads ann's token twice (the first refreshes it), ops reads
    // bob's once and a token that is not there; tenant-a may not read bob's.
    assert_eq!(read(TENANT_A_KEY, "a:ann").await, 200);
    assert_eq!(read(TENANT_A_KEY, "a:ann").await, 200);
    assert_eq!(read(OPS_KEY, "bob").await, 200);
    assert_eq!(read(OPS_KEY, "nobody").await, 404);
    assert_eq!(read(TENANT_A_KEY, "bob").await, 403);
    let stored = request(
        &at,
        "PUT",
        "/v1/tokens/acme/carol",
        Some(OPS_KEY),
        Some(br#"{"access_token":"at-carol","refresh_token":"rt-carol"}"#),
    )
    .await;
    assert_eq!(stored.status, 200);
    let deleted = request(&at, "DELETE", "/v1/tokens/acme/carol", Some(OPS_KEY), None).await;
    assert_eq!(deleted.status, 204);
    // SIGTERM writes what is pending.
    s.signal(15);
    let (code, _) = tokio::task::spawn_blocking(move || s.finish())
        .await
        .unwrap();
    assert_eq!(code, Some(0));
    // And the command line records its own reads as `cli`.
    let (code, _, err) = w.cli_traced(&["tokens", "get", "acme", "bob"], "");
    assert_eq!(code, 0, "{err}");

    let lines = audit_lines(&w, &["--provider", "acme"]);
    let library: Vec<String> = summary(&lines)
        .into_iter()
        .filter(|l| !l.starts_with("library"))
        .collect();
    assert_eq!(
        library,
        [
            "tenant-a refresh acme/a:ann 2 ok",
            "tenant-a read acme/a:ann 2 ok",
            "tenant-a read acme/a:ann 2 ok",
            "ops read acme/bob 1 ok",
            "ops read acme/nobody null not-found",
            "ops store acme/carol 1 ok",
            "ops delete acme/carol null ok",
            "cli read acme/bob 1 ok",
        ]
    );
    let ids: Vec<i64> = lines.iter().map(|l| l["id"].as_i64().unwrap()).collect();
    assert!(ids.windows(2).all(|p| p[0] < p[1]), "in the order written");
    // Filters: one user, one caller, a time window.
    assert_eq!(audit_lines(&w, &["--user", "a:ann"]).len(), 3);
    assert_eq!(audit_lines(&w, &["--caller", "cli"]).len(), 1);
    let first_at = lines[0]["at"].as_i64().unwrap();
    assert_eq!(
        audit_lines(&w, &["--until", &first_at.to_string(), "--caller", "ops"]).len(),
        0
    );
    assert_eq!(audit_lines(&w, &["--limit", "2"]).len(), 2);
    // The table for people: a header and one line per entry, no secret.
    let (code, table, _) = w.cli_traced(&["audit"], "");
    assert_eq!(code, 0);
    assert!(table.starts_with("AT "), "{table}");
    assert!(table.contains("tenant-a") && !table.contains("at-ann") && !table.contains("rt-"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_past_the_retention_are_pruned_and_newer_ones_kept() {
    let w = World::new(Backend::Postgres, "audit-retention").await;
    let config = std::fs::read_to_string(&w.config_path).unwrap();
    std::fs::write(
        &w.config_path,
        format!("audit_retention_days = 30\n{config}"),
    )
    .unwrap();
    let old = common::now() - 31 * 86_400;
    let recent = common::now() - 29 * 86_400;
    common::raw_sql(
        &w.database_url,
        &format!(
            "INSERT INTO tokenkeep_audit (at, caller, action, provider, user_id, generation, outcome) \
             VALUES ({old}, 'old', 'read', 'acme', 'alice', 1, 'ok'), \
                    ({recent}, 'recent', 'read', 'acme', 'alice', 1, 'ok')"
        ),
    )
    .await;
    w.store("alice", "at-alice", Some("rt-0"), 3600).await;
    // Any command's writer prunes when it first writes.
    let (code, _, err) = w.cli_traced(&["tokens", "get", "acme", "alice"], "");
    assert_eq!(code, 0, "{err}");
    let callers: Vec<String> = audit_lines(&w, &[])
        .iter()
        .map(|l| l["caller"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(callers, ["recent", "cli"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_library_caller_is_recorded_under_its_own_name_or_a_tasks() {
    use secrecy::SecretString;
    use tokenkeep_host::{Config, Keeper, Keyring, Options, SandboxLimits, audit};
    let w = World::new(Backend::Postgres, "audit-library").await;
    w.store("alice", "at-alice", Some("rt-0"), 3600).await;
    let keeper = Keeper::open(Options {
        database_url: w.database_url.clone(),
        config: Config::load(&w.config_path).unwrap(),
        keyring: Keyring::parse(&SecretString::from(common::KEYS.to_string())).unwrap(),
        limits: SandboxLimits::default(),
        max_connections: 4,
        clock: Default::default(),
        grant_cache: true,
        audit_as: Some("runtime-7".into()),
    })
    .await
    .unwrap();
    keeper.ensure_fresh("acme", "alice").await.unwrap();
    // Served from the grant cache: still a read.
    keeper.ensure_fresh("acme", "alice").await.unwrap();
    audit::as_caller("conversation-42", keeper.ensure_fresh("acme", "alice"))
        .await
        .unwrap();
    keeper.shutdown().await;
    let page = keeper
        .audit_page(&audit::Filter::default(), 10)
        .await
        .unwrap();
    let seen: Vec<(&str, &str)> = page
        .iter()
        .map(|e| (e.caller.as_str(), e.action.name()))
        .collect();
    assert_eq!(
        seen,
        [
            ("runtime-7", "read"),
            ("runtime-7", "read"),
            ("conversation-42", "read")
        ]
    );
    assert!(
        page.iter()
            .all(|e| e.generation == Some(1) && e.outcome == "ok")
    );
}
