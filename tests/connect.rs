//! Getting tokens in the first place, against a real OpenID Connect server
//! nobody here wrote (panva's oidc-provider from npm): `connect` with PKCE
//! through a loopback redirect, the device flow, a machine client's
//! client-credentials grant (with a secret, and with `private_key_jwt`),
//! and revocation when tokens are deleted.

mod common;

use common::{Backend, World};
use secrecy::ExposeSecret;
use std::io::{BufRead, BufReader};
use std::process::Stdio;
use tokenkeep_host::grants::{Callback, Revocation};
use tokenkeep_host::{Clock, Error};
use tokenkeep_testkit::devprovider::Behaviour;
use tokenkeep_testkit::oidc_server::OidcServer;

/// A user's provider at the server: the public client (PKCE, device flow).
fn user_provider(server: &OidcServer, name: &str, client: &str, extra: &str) -> String {
    format!(
        "\n[providers.{name}]\ntoken_url = \"{token}\"\nauthorization_url = \"{auth}\"\n\
         device_authorization_url = \"{device}\"\nrevocation_url = \"{revoke}\"\n\
         client_id = \"{client}\"\nscopes = [\"offline_access\", \"read\"]\n{extra}\n",
        token = server.url("/token"),
        auth = server.url("/auth"),
        device = server.url("/device/auth"),
        revoke = server.url("/token/revocation"),
    )
}

async fn world_with(name: &str, toml: &str) -> World {
    let clock = Clock::manual(common::now());
    let mut w = World::build(Backend::Sqlite, name, Behaviour::default(), "", clock).await;
    w.add_config(toml).await;
    w
}

/// Whether the server still takes `token` (RFC 7662, as the
/// `client_secret_post` client).
fn active_at(server: &OidcServer, token: &str) -> bool {
    let post = &server.clients.post;
    let out = std::process::Command::new("node")
        .args([
            "-e",
            "const [url, id, secret, token] = process.argv.slice(1);
             fetch(url, { method: 'POST', body: new URLSearchParams({ client_id: id, client_secret: secret, token }) })
               .then((r) => r.json()).then((j) => console.log(j.active === true));",
        ])
        .arg(server.url("/token/introspection"))
        .arg(&post.client_id)
        .arg(post.client_secret.as_deref().unwrap())
        .arg(token)
        .output()
        .unwrap();
    assert!(out.status.success(), "introspection failed");
    String::from_utf8_lossy(&out.stdout).trim() == "true"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn connect_with_pkce_stores_tokens_that_the_keeper_then_refreshes() {
    let server = OidcServer::start(3600, None);
    let toml = user_provider(&server, "oidc", "tk-public", "client_auth = \"none\"");
    let w = world_with("connect-pkce", &toml).await;

    let out = w
        .cli()
        .env("BROWSER", OidcServer::browser())
        .args(["connect", "oidc", "alice"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}\n{:?}", server.log());
    assert!(stderr.contains("connected oidc/alice"), "{stderr}");
    assert!(out.stdout.is_empty(), "nothing on stdout");
    assert_eq!(server.grants("authorization_code"), 1);

    let stored = w
        .keeper
        .load_tokens("oidc", "alice", false)
        .await
        .unwrap()
        .unwrap();
    assert!(stored.tokens.refresh_token.is_some(), "a refresh token");
    assert!(stored.tokens.scopes.iter().any(|s| s == "read"), "{:?}", stored.tokens.scopes);
    assert!(!stderr.contains(stored.tokens.access_token.expose_secret()));

    // An hour later the keeper refreshes it at the server, once.
    w.clock.advance(3600);
    let fresh = w.keeper.ensure_fresh("oidc", "alice").await.unwrap();
    assert_ne!(
        fresh.access_token.expose_secret(),
        stored.tokens.access_token.expose_secret()
    );
    assert_eq!(server.grants("refresh_token"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redirect_that_is_not_the_answer_to_our_request_is_refused() {
    let server = OidcServer::start(3600, None);
    let toml = user_provider(&server, "oidc", "tk-public", "client_auth = \"none\"");
    let w = world_with("connect-forged", &toml).await;
    let redirect = "http://127.0.0.1:9/callback";

    let pending = w
        .keeper
        .authorization_request("oidc", redirect, None)
        .unwrap();
    let forged = Callback::from_query("code=stolen&state=not-ours");
    let e = w
        .keeper
        .complete_authorization(pending, "alice", forged)
        .await
        .unwrap_err();
    assert!(matches!(e, Error::InvalidInput(_)), "{e}");

    // The user said no: our state, the server's error.
    let pending = w
        .keeper
        .authorization_request("oidc", redirect, None)
        .unwrap();
    let url = url::Url::parse(&pending.url).unwrap();
    let state = url
        .query_pairs()
        .find(|(k, _)| k == "state")
        .unwrap()
        .1
        .into_owned();
    assert!(url.query_pairs().any(|(k, v)| k == "code_challenge_method" && v == "S256"));
    let denied = Callback::from_query(&format!("error=access_denied&state={state}"));
    let e = w
        .keeper
        .complete_authorization(pending, "alice", denied)
        .await
        .unwrap_err();
    assert!(matches!(e, Error::ReauthorizationRequired(_)), "{e}");

    assert_eq!(server.grants("authorization_code"), 0, "nothing was exchanged");
    assert!(w.keeper.load_tokens("oidc", "alice", false).await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn connect_device_polls_until_the_user_approves_elsewhere() {
    let server = OidcServer::start(3600, None);
    let toml = user_provider(&server, "oidc", "tk-public", "client_auth = \"none\"");
    let w = world_with("connect-device", &toml).await;

    let mut child = w
        .cli()
        .args(["connect", "oidc", "bob", "--device"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    // "tokenkeep: open URL and confirm the code CODE (expires in N s)"
    let url = first
        .strip_prefix("tokenkeep: open ")
        .and_then(|rest| rest.split(' ').next())
        .unwrap_or_else(|| panic!("no verification URL in {first:?}"));
    assert!(first.contains("confirm the code"), "{first}");
    OidcServer::user_approves(url);
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "{rest:?}\n{:?}", server.log());
    assert!(rest.iter().any(|l| l.contains("connected oidc/bob")), "{rest:?}");
    assert_eq!(
        server.grants("urn:ietf:params:oauth:grant-type:device_code"),
        1
    );
    let stored = w.keeper.load_tokens("oidc", "bob", false).await.unwrap().unwrap();
    assert!(stored.tokens.refresh_token.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deleting_tokens_revokes_them_at_the_provider_refresh_token_first() {
    let server = OidcServer::start(3600, None);
    let post = server.clients.post.clone();
    let toml = user_provider(
        &server,
        "oidc",
        &post.client_id,
        &format!(
            "client_auth = \"client-secret-post\"\nclient_secret = \"{}\"",
            post.client_secret.as_deref().unwrap()
        ),
    );
    let mut w = world_with("revoke", &toml).await;
    for user in ["carol", "dave"] {
        let out = w
            .cli()
            .env("BROWSER", OidcServer::browser())
            .args(["connect", "oidc", user])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let carol = w.keeper.load_tokens("oidc", "carol", false).await.unwrap().unwrap();
    let refresh = carol.tokens.refresh_token.clone().unwrap();
    assert!(active_at(&server, refresh.expose_secret()));
    assert!(active_at(&server, carol.tokens.access_token.expose_secret()));

    let out = w.cli().args(["tokens", "delete", "oidc", "carol"]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!active_at(&server, refresh.expose_secret()), "refresh token revoked");
    assert!(
        !active_at(&server, carol.tokens.access_token.expose_secret()),
        "access token revoked"
    );
    assert!(w.keeper.load_tokens("oidc", "carol", false).await.unwrap().is_none());

    // A revocation endpoint that does not answer: deleted all the same,
    // and each token that may still be valid is named, exit 17.
    w.add_config(&user_provider(
        &server,
        "oidc-down",
        &post.client_id,
        &format!(
            "client_auth = \"client-secret-post\"\nclient_secret = \"{}\"\ntimeout_ms = 2000",
            post.client_secret.as_deref().unwrap()
        ),
    )
    .replace(&server.url("/token/revocation"), "http://127.0.0.1:9/revoke"))
    .await;
    let dave = w.keeper.load_tokens("oidc", "dave", false).await.unwrap().unwrap();
    w.keeper.store_tokens("oidc-down", "dave", &dave.tokens).await.unwrap();
    let out = w.cli().args(["tokens", "delete", "oidc-down", "dave"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(17), "{stderr}");
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("tokenkeep: "))
        .collect();
    assert_eq!(lines.len(), 2, "one line per token not revoked: {stderr}");
    assert!(lines[0].starts_with("tokenkeep: not-revoked: oidc-down/dave: refresh token: "), "{stderr}");
    assert!(lines[1].starts_with("tokenkeep: not-revoked: oidc-down/dave: access token: "), "{stderr}");
    assert!(w.keeper.load_tokens("oidc-down", "dave", false).await.unwrap().is_none());
    assert!(active_at(&server, dave.tokens.refresh_token.as_ref().unwrap().expose_secret()));

    // A provider without a revocation endpoint: nothing to report.
    let d = w.keeper.delete_and_revoke("oidc", "nobody").await.unwrap();
    assert!(!d.deleted);
    assert_eq!(d.refresh_token, None::<Revocation>);
}
