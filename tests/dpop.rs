//! Sender-constrained tokens (DPoP, RFC 9449) against a real server that
//! demands them: oidc-provider from npm, with a client whose tokens must be
//! DPoP-bound and nonces required at its token endpoint. The keeper makes
//! and seals one proof key per row, proves possession on every token
//! request (connect and refresh), and hands the key to a runtime that asks,
//! which then presents the token at a protected resource (the server's
//! userinfo endpoint).

mod common;

use base64::Engine as _;
use common::{Backend, KEYS, World};
use secrecy::{ExposeSecret, SecretString};
use tokenkeep_host::dpop::ProofKey;
use tokenkeep_host::{Clock, Error};
use tokenkeep_testkit::devprovider::Behaviour;
use tokenkeep_testkit::oidc_server::{OidcServer, http, request};

/// The user's provider at the server, bound with DPoP.
fn dpop_provider(server: &OidcServer) -> String {
    format!(
        "\n[providers.oidc]\ntoken_url = \"{token}\"\nauthorization_url = \"{auth}\"\n\
         device_authorization_url = \"{device}\"\n\
         client_id = \"{client}\"\nclient_auth = \"none\"\n\
         scopes = [\"openid\", \"offline_access\", \"read\"]\ndpop = true\n",
        token = server.url("/token"),
        auth = server.url("/auth"),
        device = server.url("/device/auth"),
        client = server.clients.dpop.client_id,
    )
}

async fn connected(backend: Backend, name: &str, server: &OidcServer) -> World {
    let clock = Clock::manual(common::now());
    let mut w = World::build(backend, name, Behaviour::default(), "", clock).await;
    w.add_config(&dpop_provider(server)).await;
    let out = w.connect_in_browser("oidc", "alice");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}\n{:?}",
        String::from_utf8_lossy(&out.stderr),
        server.log()
    );
    w
}

/// The server's userinfo endpoint (a protected resource) asked with
/// `token` under `scheme`, with a proof made by `key` if any.
fn userinfo(
    server: &OidcServer,
    token: &SecretString,
    scheme: &str,
    key: Option<&ProofKey>,
) -> (u16, String) {
    let url = server.url("/me");
    let authorization = format!("{scheme} {}", token.expose_secret());
    let proof = key.map(|k| k.proof("GET", &url, Some(token), None).unwrap());
    let mut headers = vec![("authorization", authorization.as_str())];
    if let Some(proof) = &proof {
        headers.push(("dpop", proof));
    }
    request(&url, None, &headers)
}

async fn a_connected_token_is_bound_to_the_rows_sealed_proof_key(backend: Backend, name: &str) {
    let server = OidcServer::start(3600, None);
    let w = connected(backend, name, &server).await;
    // The server asked for a nonce, and the code exchange came back with it.
    assert!(server.logged("POST /token 400") >= 1, "{:?}", server.log());
    assert_eq!(server.grants("authorization_code"), 1);

    let bound = w
        .keeper
        .ensure_fresh_bound("oidc", "alice", 0)
        .await
        .unwrap();
    let token = &bound.grant.access_token;
    // Presented with a proof by the row's key, the token works; as a bearer
    // token, or with another key's proof, it does not.
    let (status, body) = userinfo(&server, token, "DPoP", Some(&bound.proof_key));
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("alice"), "{body}");
    assert_eq!(userinfo(&server, token, "Bearer", None).0, 401);
    let stranger = ProofKey::generate().unwrap();
    assert_eq!(userinfo(&server, token, "DPoP", Some(&stranger)).0, 401);

    // The CLI hands a runtime the same token and key.
    let out = w
        .cli()
        .args(["tokens", "get", "oidc", "alice", "--dpop"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(got["token_type"], "DPoP");
    assert_eq!(got["access_token"].as_str(), Some(token.expose_secret()));
    let jwk = SecretString::from(got["dpop_jwk"].to_string());
    let handed = ProofKey::from_jwk(&jwk).unwrap();
    assert_eq!(handed.thumbprint(), bound.proof_key.thumbprint());

    // Sealed at rest: the private scalar is nowhere in the database.
    if backend == Backend::Sqlite {
        let d = got["dpop_jwk"]["d"].as_str().unwrap();
        let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(d)
            .unwrap();
        let path = w.database_url.trim_start_matches("sqlite:");
        let file = std::fs::read(path).unwrap();
        let wal = std::fs::read(format!("{path}-wal")).unwrap_or_default();
        for bytes in [&file, &wal] {
            assert!(!bytes.windows(raw.len()).any(|w| w == raw.as_slice()));
            assert!(!bytes.windows(d.len()).any(|w| w == d.as_bytes()));
        }
    }

    // An hour later another runtime refreshes it, once, proving possession
    // of the same key (the server binds this public client's refresh token
    // to it); the new token is bound to it too.
    w.clock.advance(3600);
    let other = w.another_keeper().await;
    let again = other.ensure_fresh_bound("oidc", "alice", 0).await.unwrap();
    assert_ne!(
        again.grant.access_token.expose_secret(),
        token.expose_secret()
    );
    assert_eq!(server.grants("refresh_token"), 1, "{:?}", server.log());
    assert_eq!(again.proof_key.thumbprint(), bound.proof_key.thumbprint());
    let (status, body) = userinfo(
        &server,
        &again.grant.access_token,
        "DPoP",
        Some(&again.proof_key),
    );
    assert_eq!(status, 200, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_connected_token_is_bound_to_the_rows_sealed_proof_key_on_sqlite() {
    a_connected_token_is_bound_to_the_rows_sealed_proof_key(Backend::Sqlite, "dpop-sqlite").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_connected_token_is_bound_to_the_rows_sealed_proof_key_on_postgres() {
    a_connected_token_is_bound_to_the_rows_sealed_proof_key(Backend::Postgres, "dpop-postgres")
        .await;
}

async fn key_rotation_reseals_proof_keys_and_a_delete_takes_the_key_along(
    backend: Backend,
    name: &str,
) {
    let server = OidcServer::start(3600, None);
    let w = connected(backend, name, &server).await;
    let before = w
        .keeper
        .ensure_fresh_bound("oidc", "alice", 0)
        .await
        .unwrap();
    // The row and its proof key are both sealed with k1: k1 cannot go yet.
    let status = w.keeper.key_status().await.unwrap();
    assert_eq!(status.rows_per_key.get("k1"), Some(&2), "{status:?}");

    let k2 = "k2=AwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwM=\n";
    let rotating = w.keeper_with_keys(&format!("{k2}{KEYS}")).await;
    let rotation = rotating.rotate_keys(10).await.unwrap();
    assert_eq!(rotation.resealed, 2, "{rotation:?}");
    assert!(rotation.undecryptable.is_empty());

    // With only the new key, the same proof key opens.
    let rotated = w.keeper_with_keys(k2).await;
    let after = rotated
        .ensure_fresh_bound("oidc", "alice", 0)
        .await
        .unwrap();
    assert_eq!(after.proof_key.thumbprint(), before.proof_key.thumbprint());

    // A provider that does not bind tokens has no key to hand out.
    let e = rotated
        .ensure_fresh_bound("acme", "alice", 0)
        .await
        .unwrap_err();
    assert!(matches!(e, Error::InvalidInput(_)), "{e}");
    let e = rotated
        .ensure_fresh_bound("nowhere", "alice", 0)
        .await
        .unwrap_err();
    assert!(matches!(e, Error::UnknownProvider(_)), "{e}");

    // Deleting the tokens deletes the key: nothing is left sealed.
    assert!(rotated.delete_tokens("oidc", "alice").await.unwrap());
    let status = rotated.key_status().await.unwrap();
    assert!(status.rows_per_key.is_empty(), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn key_rotation_reseals_proof_keys_and_a_delete_takes_the_key_along_on_sqlite() {
    key_rotation_reseals_proof_keys_and_a_delete_takes_the_key_along(
        Backend::Sqlite,
        "dpop-rotation-sqlite",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn key_rotation_reseals_proof_keys_and_a_delete_takes_the_key_along_on_postgres() {
    key_rotation_reseals_proof_keys_and_a_delete_takes_the_key_along(
        Backend::Postgres,
        "dpop-rotation-postgres",
    )
    .await;
}

/// The thumbprint of the key the server bound `token` to (`cnf.jkt`, RFC
/// 7662 introspection as the `client_secret_post` client).
fn bound_to(server: &OidcServer, token: &SecretString) -> Option<String> {
    let post = &server.clients.post;
    let form = [
        ("client_id", post.client_id.as_str()),
        ("client_secret", post.client_secret.as_deref().unwrap()),
        ("token", token.expose_secret()),
    ];
    let (status, body) = http(&server.url("/token/introspection"), Some(&form), None);
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["active"], true, "{body}");
    v["cnf"]["jkt"].as_str().map(str::to_owned)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn machine_tokens_and_device_connections_are_bound_too() {
    let server = OidcServer::start(3600, None);
    let machine = &server.clients.machine;
    let clock = Clock::manual(common::now());
    let mut w = World::build(
        Backend::Sqlite,
        "dpop-machine",
        Behaviour::default(),
        "",
        clock,
    )
    .await;
    w.add_config(&format!(
        "{}\n[providers.ci]\ntoken_url = \"{}\"\ngrant = \"client-credentials\"\n\
         client_id = \"{}\"\nclient_secret = \"{}\"\nclient_auth = \"client-secret-basic\"\n\
         scopes = [\"read\"]\ndpop = true\n",
        dpop_provider(&server),
        server.url("/token"),
        machine.client_id,
        machine.client_secret.as_deref().unwrap(),
    ))
    .await;

    // A machine client's first token (the host's grant) and its renewal
    // (the component's single flight) are both bound to the row's key.
    let first = w
        .keeper
        .ensure_fresh_bound("ci", "builds", 0)
        .await
        .unwrap();
    let thumbprint = first.proof_key.thumbprint();
    assert_eq!(
        bound_to(&server, &first.grant.access_token),
        Some(thumbprint.clone())
    );
    w.clock.advance(3600);
    let renewed = w
        .keeper
        .ensure_fresh_bound("ci", "builds", 0)
        .await
        .unwrap();
    assert_ne!(
        renewed.grant.access_token.expose_secret(),
        first.grant.access_token.expose_secret()
    );
    assert_eq!(server.grants("client_credentials"), 2, "{:?}", server.log());
    assert_eq!(
        bound_to(&server, &renewed.grant.access_token),
        Some(thumbprint)
    );

    // The device flow's polls carry proofs too.
    let (_, code, rest) = w.connect_on_device("oidc", "bob");
    assert_eq!(code, Some(0), "{rest:?}\n{:?}", server.log());
    let bob = w.keeper.ensure_fresh_bound("oidc", "bob", 0).await.unwrap();
    let (status, body) = userinfo(
        &server,
        &bob.grant.access_token,
        "DPoP",
        Some(&bob.proof_key),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        bound_to(&server, &bob.grant.access_token),
        Some(bob.proof_key.thumbprint())
    );
}
