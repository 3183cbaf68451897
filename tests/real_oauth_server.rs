//! The refresh flow against a real OAuth 2.0 server that nobody here wrote
//! (django-oauth-toolkit, rotation and reuse detection on): several runtimes
//! refreshing one expired token must spend it once and leave the chain alive.

mod common;

use common::{Backend, World};
use secrecy::ExposeSecret;
use std::collections::HashSet;
use tokenkeep_host::{Clock, Error, TokenSet};
use tokenkeep_testkit::devprovider::Behaviour;
use tokenkeep_testkit::oauth_server::OauthServer;

fn seeded(access: &str, refresh: &str, expires_at: i64) -> TokenSet {
    TokenSet {
        access_token: access.to_string().into(),
        refresh_token: Some(refresh.to_string().into()),
        access_token_expires_at: Some(expires_at),
        refresh_token_expires_at: None,
        scopes: vec!["read".into(), "write".into()],
    }
}

async fn several_runtimes_keep_a_real_servers_token_chain_alive(b: Backend) {
    let server = OauthServer::start(2);
    // A manual clock lets the test age tokens without waiting; the server
    // keeps its own time and never sees ours.
    let clock = Clock::manual(common::now());
    let mut w = World::build(b, "real-oauth", Behaviour::default(), "", clock.clone()).await;
    w.add_config(&server.provider_toml("dot", "")).await;
    w.add_config(&server.provider_toml("dot-basic", "client_auth = \"basic\"\n"))
        .await;
    let alice = &server.tokens[0];
    w.keeper
        .store_tokens(
            "dot",
            &alice.user,
            &seeded(&alice.access_token, &alice.refresh_token, w.now() - 10),
        )
        .await
        .unwrap();

    let runtimes = [
        w.keeper.clone(),
        w.another_keeper().await,
        w.another_keeper().await,
    ];
    let rounds = 3;
    let mut issued = HashSet::new();
    for round in 0..rounds {
        let mut tasks = Vec::new();
        for k in &runtimes {
            for _ in 0..8 {
                let (k, user) = (k.clone(), alice.user.clone());
                tasks.push(tokio::spawn(
                    async move { k.ensure_fresh("dot", &user).await },
                ));
            }
        }
        let mut seen = HashSet::new();
        for t in tasks {
            let record = t
                .await
                .unwrap()
                .unwrap_or_else(|e| panic!("round {round}: {e}\nserver log: {:?}", server.log()));
            seen.insert(record.access_token.expose_secret().to_string());
        }
        assert_eq!(seen.len(), 1, "round {round}: 24 callers, one token");
        assert_eq!(
            server.token_requests(),
            round + 1,
            "round {round}: one refresh at the server for 24 callers in 3 runtimes"
        );
        issued.extend(seen);
        // Age the token into its refresh window for the next round.
        clock.advance(3600);
    }
    assert_eq!(issued.len(), rounds, "each round got a new token");

    // HTTP Basic client authentication against the same server.
    let bob = &server.tokens[1];
    w.keeper
        .store_tokens(
            "dot-basic",
            &bob.user,
            &seeded(&bob.access_token, &bob.refresh_token, w.now() - 10),
        )
        .await
        .unwrap();
    let refreshed = w.keeper.ensure_fresh("dot-basic", &bob.user).await.unwrap();
    assert_ne!(refreshed.access_token.expose_secret(), bob.access_token);

    // The control: the server's reuse detection is live. Replaying alice's
    // spent first refresh token (as a duplicate refresh would) is refused
    // and revokes her whole chain, newest token included.
    w.keeper
        .store_tokens(
            "dot",
            "replayer",
            &seeded("x", &alice.refresh_token, w.now() - 10),
        )
        .await
        .unwrap();
    let replay = w.keeper.ensure_fresh("dot", "replayer").await.unwrap_err();
    assert!(
        matches!(replay, Error::ReauthorizationRequired(_)),
        "{replay}"
    );
    let revoked = w.keeper.ensure_fresh("dot", &alice.user).await.unwrap_err();
    assert!(
        matches!(revoked, Error::ReauthorizationRequired(_)),
        "{revoked}"
    );
}

on_both_backends!(several_runtimes_keep_a_real_servers_token_chain_alive);
