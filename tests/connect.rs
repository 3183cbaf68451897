//! Getting tokens in the first place, against a real OpenID Connect server
//! nobody here wrote (panva's oidc-provider from npm): `connect` with PKCE
//! through a loopback redirect, the device flow, a machine client's
//! client-credentials grant (with a secret, and with `private_key_jwt`),
//! and revocation when tokens are deleted.

mod common;

use common::{Backend, World};
use secrecy::ExposeSecret;
use tokenkeep_host::grants::{Callback, Revocation};
use tokenkeep_host::{Clock, Error};
use tokenkeep_testkit::devprovider::Behaviour;
use tokenkeep_testkit::oidc_server::{OidcServer, http};

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
    let secret = post.client_secret.as_deref().unwrap();
    let form = [
        ("client_id", post.client_id.as_str()),
        ("client_secret", secret),
        ("token", token),
    ];
    let (status, body) = http(&server.url("/token/introspection"), Some(&form), None);
    assert_eq!(status, 200, "introspection failed: {body}");
    serde_json::from_str::<serde_json::Value>(&body).unwrap()["active"] == true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn connect_with_pkce_stores_tokens_that_the_keeper_then_refreshes() {
    let server = OidcServer::start(3600, None);
    let toml = user_provider(&server, "oidc", "tk-public", "client_auth = \"none\"");
    let w = world_with("connect-pkce", &toml).await;

    let out = w.connect_in_browser("oidc", "alice");
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
    assert!(
        stored.tokens.scopes.iter().any(|s| s == "read"),
        "{:?}",
        stored.tokens.scopes
    );
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
    assert!(
        url.query_pairs()
            .any(|(k, v)| k == "code_challenge_method" && v == "S256")
    );
    let denied = Callback::from_query(&format!("error=access_denied&state={state}"));
    let e = w
        .keeper
        .complete_authorization(pending, "alice", denied)
        .await
        .unwrap_err();
    assert!(matches!(e, Error::ReauthorizationRequired(_)), "{e}");

    assert_eq!(
        server.grants("authorization_code"),
        0,
        "nothing was exchanged"
    );
    assert!(
        w.keeper
            .load_tokens("oidc", "alice", false)
            .await
            .unwrap()
            .is_none()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn connect_device_polls_until_the_user_approves_elsewhere() {
    let server = OidcServer::start(3600, None);
    let toml = user_provider(&server, "oidc", "tk-public", "client_auth = \"none\"");
    let w = world_with("connect-device", &toml).await;

    let (first, code, rest) = w.connect_on_device("oidc", "bob");
    assert!(first.contains("confirm the code"), "{first}");
    assert_eq!(code, Some(0), "{rest:?}\n{:?}", server.log());
    assert!(
        rest.iter().any(|l| l.contains("connected oidc/bob")),
        "{rest:?}"
    );
    assert_eq!(
        server.grants("urn:ietf:params:oauth:grant-type:device_code"),
        1
    );
    let stored = w
        .keeper
        .load_tokens("oidc", "bob", false)
        .await
        .unwrap()
        .unwrap();
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
        let out = w.connect_in_browser("oidc", user);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let carol = w
        .keeper
        .load_tokens("oidc", "carol", false)
        .await
        .unwrap()
        .unwrap();
    let refresh = carol.tokens.refresh_token.clone().unwrap();
    assert!(active_at(&server, refresh.expose_secret()));
    assert!(active_at(
        &server,
        carol.tokens.access_token.expose_secret()
    ));

    let out = w
        .cli()
        .args(["tokens", "delete", "oidc", "carol"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !active_at(&server, refresh.expose_secret()),
        "refresh token revoked"
    );
    assert!(
        !active_at(&server, carol.tokens.access_token.expose_secret()),
        "access token revoked"
    );
    assert!(
        w.keeper
            .load_tokens("oidc", "carol", false)
            .await
            .unwrap()
            .is_none()
    );

    // A revocation endpoint that does not answer: deleted all the same,
    // and each token that may still be valid is named, exit 17.
    w.add_config(
        &user_provider(
            &server,
            "oidc-down",
            &post.client_id,
            &format!(
                "client_auth = \"client-secret-post\"\nclient_secret = \"{}\"\ntimeout_ms = 2000",
                post.client_secret.as_deref().unwrap()
            ),
        )
        .replace(
            &server.url("/token/revocation"),
            "http://127.0.0.1:9/revoke",
        ),
    )
    .await;
    let dave = w
        .keeper
        .load_tokens("oidc", "dave", false)
        .await
        .unwrap()
        .unwrap();
    w.keeper
        .store_tokens("oidc-down", "dave", &dave.tokens)
        .await
        .unwrap();
    let out = w
        .cli()
        .args(["tokens", "delete", "oidc-down", "dave"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(17), "{stderr}");
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("tokenkeep: "))
        .collect();
    assert_eq!(lines.len(), 2, "one line per token not revoked: {stderr}");
    assert!(
        lines[0].starts_with("tokenkeep: not-revoked: oidc-down/dave: refresh token: "),
        "{stderr}"
    );
    assert!(
        lines[1].starts_with("tokenkeep: not-revoked: oidc-down/dave: access token: "),
        "{stderr}"
    );
    assert!(
        w.keeper
            .load_tokens("oidc-down", "dave", false)
            .await
            .unwrap()
            .is_none()
    );
    assert!(active_at(
        &server,
        dave.tokens.refresh_token.as_ref().unwrap().expose_secret()
    ));

    // No such row: nothing deleted, nothing to revoke.
    let d = w.keeper.delete_and_revoke("oidc", "nobody").await.unwrap();
    assert!(!d.deleted);
    assert_eq!(d.refresh_token, None::<Revocation>);
    assert!(d.not_revoked().is_empty());

    // A row that does not open (its ciphertext tampered with) is deleted
    // all the same, and says what could not be revoked.
    w.keeper
        .store_tokens("oidc", "erin", &carol.tokens)
        .await
        .unwrap();
    common::raw_sql(
        &w.database_url,
        "UPDATE tokenkeep_tokens SET access_token = X'00' WHERE user_id = 'erin'",
    )
    .await;
    let d = w.keeper.delete_and_revoke("oidc", "erin").await.unwrap();
    assert!(d.deleted);
    assert_eq!(d.not_revoked().len(), 1, "{d:?}");
}

fn machine_provider(server: &OidcServer, name: &str, extra: &str) -> String {
    format!(
        "\n[providers.{name}]\ntoken_url = \"{}\"\nrevocation_url = \"{}\"\ngrant = \"client-credentials\"\n\
         scopes = [\"read\"]\n{extra}\n",
        server.url("/token"),
        server.url("/token/revocation"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_machine_token_is_got_on_demand_and_renewed_once_for_many_callers() {
    let server = OidcServer::start(3600, None);
    let machine = &server.clients.machine;
    let toml = machine_provider(
        &server,
        "ci",
        &format!(
            "client_id = \"{}\"\nclient_secret = \"{}\"\nclient_auth = \"client-secret-basic\"",
            machine.client_id,
            machine.client_secret.as_deref().unwrap()
        ),
    );
    let w = world_with("machine", &toml).await;
    let runtimes = [
        w.keeper.clone(),
        w.another_keeper().await,
        w.another_keeper().await,
        w.another_keeper().await,
    ];

    // Nothing stored: the first read gets the client's token.
    let first = runtimes[0].ensure_fresh("ci", "builds").await.unwrap();
    assert_eq!(first.scopes, ["read"]);
    assert_eq!(server.grants("client_credentials"), 1);
    let stored = w
        .keeper
        .load_tokens("ci", "builds", false)
        .await
        .unwrap()
        .unwrap();
    assert!(
        stored.tokens.refresh_token.is_none(),
        "a machine client keeps no refresh token"
    );

    for round in 1..=2 {
        w.clock.advance(3600);
        let mut calls = Vec::new();
        for k in &runtimes {
            for _ in 0..8 {
                let k = k.clone();
                calls.push(tokio::spawn(
                    async move { k.ensure_fresh("ci", "builds").await },
                ));
            }
        }
        let mut seen = std::collections::HashSet::new();
        for c in calls {
            let g = c
                .await
                .unwrap()
                .unwrap_or_else(|e| panic!("round {round}: {e}"));
            seen.insert(g.access_token.expose_secret().to_string());
        }
        assert_eq!(
            seen.len(),
            1,
            "round {round}: 32 callers in 4 runtimes, one token"
        );
        assert!(!seen.contains(first.access_token.expose_secret()));
        assert_eq!(
            server.grants("client_credentials"),
            1 + round,
            "round {round}: one renewal at the server"
        );
    }
    let listed = w.keeper.list_tokens().await.unwrap();
    assert_eq!(
        tokenkeep_host::keeper::token_state_name(listed[0].state),
        "fresh"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_machine_client_authenticates_with_a_key_only_the_host_holds() {
    use base64::Engine as _;
    use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};
    let scratch = tokenkeep_testkit::Scratch::new("jwt-key");
    let der = EcdsaKeyPair::generate_pkcs8(
        &ECDSA_P256_SHA256_FIXED_SIGNING,
        &ring::rand::SystemRandom::new(),
    )
    .unwrap();
    let b64 = base64::engine::general_purpose::STANDARD.encode(der.as_ref());
    let pem = format!(
        "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
        b64.as_bytes()
            .chunks(64)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect::<Vec<_>>()
            .join("\n")
    );
    let key_path = scratch.0.join("client.pem");
    std::fs::write(&key_path, pem).unwrap();
    let key =
        tokenkeep_host::client_assertion::SigningKey::load(&key_path, Some("k1".into())).unwrap();
    let jwks_path = scratch.0.join("jwks.json");
    std::fs::write(
        &jwks_path,
        serde_json::json!({ "keys": [key.public_jwk()] }).to_string(),
    )
    .unwrap();

    let server = OidcServer::start(3600, Some(&jwks_path));
    let toml = machine_provider(
        &server,
        "signed",
        &format!(
            "client_id = \"{}\"\nclient_auth = \"private-key-jwt\"\nprivate_key_file = \"{}\"\nkey_id = \"k1\"",
            server.clients.jwt.client_id,
            key_path.display()
        ),
    );
    let w = world_with("machine-jwt", &toml).await;
    let out = w
        .cli()
        .args(["connect", "signed", "deploys"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}\n{:?}", server.log());
    assert!(stderr.contains("connected signed/deploys"), "{stderr}");
    assert_eq!(server.grants("client_credentials"), 1);

    // Renewed through the component, the assertion attached by the host.
    w.clock.advance(3600);
    w.keeper.ensure_fresh("signed", "deploys").await.unwrap();
    assert_eq!(server.grants("client_credentials"), 2);

    // Another key is not ours: the server refuses the client.
    let other = EcdsaKeyPair::generate_pkcs8(
        &ECDSA_P256_SHA256_FIXED_SIGNING,
        &ring::rand::SystemRandom::new(),
    )
    .unwrap();
    let b64 = base64::engine::general_purpose::STANDARD.encode(other.as_ref());
    std::fs::write(
        &key_path,
        format!("-----BEGIN PRIVATE KEY-----\n{b64}\n-----END PRIVATE KEY-----\n"),
    )
    .unwrap();
    let out = w
        .cli()
        .args(["connect", "signed", "other"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(6),
        "provider-rejected-client: {stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_service_connects_an_account_whichever_instance_the_browser_comes_back_to() {
    use common::service::{OPS_KEY, Service, TENANT_A_KEY, request, segment, serve_section_with};
    let server = OidcServer::start(3600, None);
    let post = server.clients.post.clone();
    // The instance the browser comes back to listens where public_url says.
    let port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().port()
    };
    let toml = user_provider(
        &server,
        "oidc",
        &post.client_id,
        &format!(
            "client_auth = \"client-secret-post\"\nclient_secret = \"{}\"",
            post.client_secret.as_deref().unwrap()
        ),
    ) + &serve_section_with(
        &format!("public_url = \"http://127.0.0.1:{port}\""),
        "enabled = false",
    );
    let w = world_with("serve-connect", &toml).await;
    let started_at = Service::start(&w, "a", "warn");
    let back_at = Service::start_on(&w, "b", "warn", &[], port);

    let user = "team/ann";
    let path = format!(
        "/v1/connect/oidc/{}?scope=offline_access%20read",
        segment(user)
    );
    let tenant = request(&started_at.unix(), "POST", &path, Some(TENANT_A_KEY), None).await;
    assert_eq!(tenant.status, 403, "a key that does not reach oidc/{user}");
    let started = request(&started_at.unix(), "POST", &path, Some(OPS_KEY), None).await;
    assert_eq!(started.status, 200, "{:?}", started.json());
    let body = started.json();
    let url = body["authorization_url"].as_str().unwrap().to_string();
    assert_eq!(
        body["redirect_uri"],
        format!("http://127.0.0.1:{port}/v1/connect/callback")
    );
    assert!(!url.contains("code_verifier"));

    OidcServer::user_approves(&url);
    let stored = w
        .keeper
        .load_tokens("oidc", user, false)
        .await
        .unwrap()
        .unwrap();
    assert!(stored.tokens.refresh_token.is_some());
    assert_eq!(server.grants("authorization_code"), 1);

    // A callback with a state that is not ours is refused, and nothing is
    // exchanged; the page names the class, nothing the caller sent.
    let forged = request(
        &back_at.tcp(),
        "GET",
        "/v1/connect/callback?code=stolen&state=k1~AAAA%3Cscript%3E",
        None,
        None,
    )
    .await;
    assert_eq!(forged.status, 400);
    let page = String::from_utf8_lossy(&forged.body);
    assert!(
        page.contains("invalid-input") && !page.contains("script"),
        "{page}"
    );
    assert_eq!(server.grants("authorization_code"), 1);

    // Deleting through the API revokes at the provider.
    let refresh = stored.tokens.refresh_token.clone().unwrap();
    let state_path = format!("/v1/tokens/oidc/{}", segment(user));
    let deleted = request(&back_at.unix(), "DELETE", &state_path, Some(OPS_KEY), None).await;
    assert_eq!(deleted.status, 204);
    assert!(!active_at(&server, refresh.expose_secret()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_token_exchange_renews_with_the_users_fresh_upstream_token_once_for_many_callers() {
    const EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
    let server = OidcServer::start(3600, None);
    let exchange = &server.clients.exchange;
    let toml = user_provider(&server, "oidc", "tk-public", "client_auth = \"none\"")
        + &format!(
            "\n[providers.downstream]\ntoken_url = \"{}\"\ngrant = \"token-exchange\"\n\
             subject_provider = \"oidc\"\nscopes = [\"read\"]\nclient_id = \"{}\"\n\
             client_secret = \"{}\"\nclient_auth = \"basic\"\n",
            server.url("/token"),
            exchange.client_id,
            exchange.client_secret.as_deref().unwrap()
        );
    let w = world_with("token-exchange", &toml).await;
    let out = w.connect_in_browser("oidc", "alice");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The first read exchanges alice's token.
    let first = w.keeper.ensure_fresh("downstream", "alice").await.unwrap();
    assert_eq!(first.scopes, ["read"]);
    assert_eq!(server.grants(EXCHANGE), 1);
    assert_eq!(server.logged("exchanged a token of alice"), 1);
    // A user with no token to exchange gets none.
    let e = w
        .keeper
        .ensure_fresh("downstream", "bob")
        .await
        .unwrap_err();
    assert!(matches!(e, Error::NotFound { .. }), "{e}");

    // An hour later both have expired: many callers in two runtimes make
    // one refresh of alice's own token and one exchange.
    w.clock.advance(3600);
    let runtimes = [w.keeper.clone(), w.another_keeper().await];
    let mut calls = Vec::new();
    for k in &runtimes {
        for _ in 0..8 {
            let k = k.clone();
            calls.push(tokio::spawn(async move {
                k.ensure_fresh("downstream", "alice").await
            }));
        }
    }
    let mut seen = std::collections::HashSet::new();
    for c in calls {
        seen.insert(
            c.await
                .unwrap()
                .unwrap()
                .access_token
                .expose_secret()
                .to_string(),
        );
    }
    assert_eq!(seen.len(), 1);
    assert!(!seen.contains(first.access_token.expose_secret()));
    assert_eq!(server.grants("refresh_token"), 1, "alice's own token, once");
    assert_eq!(server.grants(EXCHANGE), 2, "one renewal by exchange");
    let kept = w
        .keeper
        .load_tokens("downstream", "alice", false)
        .await
        .unwrap()
        .unwrap();
    assert!(kept.tokens.refresh_token.is_none());

    // Alice's token is revoked at the server while the row still holds it
    // valid: the exchange is refused...
    let upstream = w
        .keeper
        .load_tokens("oidc", "alice", false)
        .await
        .unwrap()
        .unwrap();
    let token = upstream.tokens.access_token.expose_secret();
    let form = [("client_id", "tk-public"), ("token", token)];
    let (status, _) = http(&server.url("/token/revocation"), Some(&form), None);
    assert_eq!(status, 200);
    common::raw_sql(
        &w.database_url,
        &format!(
            "UPDATE tokenkeep_tokens SET access_token_expires_at = {} WHERE provider = 'downstream'",
            w.now() - 10
        ),
    )
    .await;
    let e = w
        .keeper
        .ensure_fresh("downstream", "alice")
        .await
        .unwrap_err();
    assert!(matches!(e, Error::ReauthorizationRequired(_)), "{e}");
    // ... and once alice has authorised again, it is tried again (after the
    // backoff) and recovers: a host grant's refusal does not stand for ever.
    let out = w.connect_in_browser("oidc", "alice");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    w.backoff_over().await;
    w.keeper.ensure_fresh("downstream", "alice").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sealed_state_completes_once_before_it_expires_and_only_with_our_keys() {
    let server = OidcServer::start(3600, None);
    let toml = user_provider(&server, "oidc", "tk-public", "client_auth = \"none\"");
    let w = world_with("sealed-state", &toml).await;

    // The user approves; the redirect comes to a listener of the test's.
    let approve = async |valid_for: u32| {
        let loopback = tokenkeep_host::loopback::Loopback::bind(0).await.unwrap();
        let url = w
            .keeper
            .sealed_authorization_request("oidc", "alice", loopback.redirect_uri(), None, valid_for)
            .unwrap();
        let user = std::thread::spawn(move || OidcServer::user_approves(&url));
        let callback = loopback
            .receive(|s| w.keeper.is_sealed_state(s))
            .await
            .unwrap();
        user.join().unwrap();
        callback
    };
    let callback = approve(600).await;
    w.keeper
        .complete_sealed_authorization(callback.clone())
        .await
        .unwrap();
    assert_eq!(server.grants("authorization_code"), 1);
    // The same redirect again (a copy of the URL, a replay): refused.
    let e = w
        .keeper
        .complete_sealed_authorization(callback)
        .await
        .unwrap_err();
    assert!(matches!(e, Error::InvalidInput(_)), "{e}");

    // Too late: refused before the code is exchanged.
    let late = approve(60).await;
    w.clock.advance(61);
    let e = w
        .keeper
        .complete_sealed_authorization(late)
        .await
        .unwrap_err();
    assert!(matches!(e, Error::ReauthorizationRequired(_)), "{e}");

    // Sealed under a key this keeper does not hold: not ours.
    let foreign = approve(600).await;
    let other = w
        .keeper_with_keys("k9=CQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQk=\n")
        .await;
    let e = other
        .complete_sealed_authorization(foreign)
        .await
        .unwrap_err();
    assert!(matches!(e, Error::InvalidInput(_)), "{e}");
    assert_eq!(
        server.grants("authorization_code"),
        1,
        "nothing else was exchanged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_service_key_limited_to_users_never_reaches_a_machine_token() {
    use common::service::{OPS_KEY, Service, request, serve_section_with};
    use sha2::Digest;
    let server = OidcServer::start(3600, None);
    let machine = &server.clients.machine;
    const LIMITED: &str = "builds-only-key-0123456789";
    let toml = machine_provider(
        &server,
        "ci",
        &format!(
            "client_id = \"{}\"\nclient_secret = \"{}\"\nclient_auth = \"basic\"",
            machine.client_id,
            machine.client_secret.as_deref().unwrap()
        ),
    ) + &serve_section_with("", "enabled = false")
        + &format!(
            "\n[serve.keys.builds]\nsecret_sha256 = \"{}\"\nproviders = [\"ci\"]\nusers = [\"builds\"]\n",
            hex::encode(sha2::Sha256::digest(LIMITED.as_bytes()))
        );
    let w = world_with("machine-keys", &toml).await;
    let s = Service::start(&w, "api", "warn");
    let path = "/v1/tokens/ci/builds/access-token";
    let limited = request(&s.unix(), "GET", path, Some(LIMITED), None).await;
    assert_eq!(
        limited.status, 403,
        "user patterns cannot partition a machine token"
    );
    assert_eq!(
        server.grants("client_credentials"),
        0,
        "nothing minted for it"
    );
    let ops = request(&s.unix(), "GET", path, Some(OPS_KEY), None).await;
    assert_eq!(ops.status, 200, "{:?}", ops.json());
    assert_eq!(server.grants("client_credentials"), 1);
}
