//! MCP servers as providers, against a real authorisation server nobody
//! here wrote (oidc-provider from npm) behind an MCP-style protected
//! resource: discovery (RFC 9728, RFC 8414), dynamic registration of a
//! public client (RFC 7591), the resource indicator (RFC 8707) on every
//! request, and several processes of one agent sharing the tokens with one
//! refresh per expiry.

mod common;

use common::{Backend, World};
use secrecy::ExposeSecret;
use tokenkeep_host::Clock;
use tokenkeep_testkit::devprovider::Behaviour;
use tokenkeep_testkit::oidc_server::{OidcServer, http};

/// The MCP server's answer to a request with `token`: its status.
fn mcp_status(server: &OidcServer, token: &str) -> u16 {
    http(&server.mcp, None, Some(token)).0
}

async fn four_processes_share_a_discovered_mcp_servers_tokens(b: Backend) {
    let server = OidcServer::start(3600, None);
    let mut w = World::build(b, "mcp", Behaviour::default(), "", Clock::System).await;
    w.add_config(&format!(
        "\n[providers.mcp]\nmcp_url = \"{}\"\n",
        server.mcp
    ))
    .await;
    // A runtime that started before anything was registered.
    let early = w.keeper.clone();

    let out = w.connect_in_browser("mcp", "alice");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}\n{:?}", server.log());
    let registrations = server
        .log()
        .iter()
        .filter(|l| l.starts_with("POST /reg 201"))
        .count();
    assert_eq!(registrations, 1, "one public client registered");

    // The token is for the MCP server: `resource` went with the request.
    assert_eq!(server.grants_for_mcp("authorization_code"), 1);
    let first = early.ensure_fresh("mcp", "alice").await.unwrap();
    assert_eq!(mcp_status(&server, first.access_token.expose_secret()), 200);
    let stored = early
        .load_tokens("mcp", "alice", false)
        .await
        .unwrap()
        .unwrap();
    assert!(
        stored.tokens.refresh_token.is_some(),
        "offline_access was asked for"
    );

    let mut previous = first.access_token.expose_secret().to_string();
    // Four agents' processes; on SQLite the last round mixes in the Node
    // host, which reads the registration the Rust host made.
    let rounds = if b == Backend::Sqlite { 4 } else { 3 };
    for round in 1..=rounds {
        // The token expires under all four.
        common::raw_sql(
            &w.database_url,
            &format!(
                "UPDATE tokenkeep_tokens SET access_token_expires_at = {} WHERE provider = 'mcp'",
                common::now() - 10
            ),
        )
        .await;
        let agents: Vec<_> = (0..4)
            .map(|i| {
                let mut agent = if round == 4 && i % 2 == 1 {
                    common::node::get(&w, "mcp", "alice", 0)
                } else {
                    let mut c = tokio::process::Command::from(w.cli());
                    c.args(["tokens", "get", "mcp", "alice"]);
                    c
                };
                agent
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        let mut tokens = std::collections::HashSet::new();
        for agent in agents {
            let out = agent.wait_with_output().await.unwrap();
            assert_eq!(
                out.status.code(),
                Some(0),
                "round {round}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            tokens.insert(String::from_utf8(out.stdout).unwrap().trim().to_string());
        }
        assert_eq!(tokens.len(), 1, "round {round}: four processes, one token");
        let token = tokens.into_iter().next().unwrap();
        assert_ne!(token, previous, "round {round}: refreshed");
        assert_eq!(
            server.grants("refresh_token"),
            round,
            "round {round}: one refresh at the server"
        );
        // Refreshed with `resource`: still a token for the MCP server.
        assert_eq!(server.grants_for_mcp("refresh_token"), round);
        assert_eq!(mcp_status(&server, &token), 200, "round {round}");
        previous = token;
    }
    assert_eq!(
        server
            .log()
            .iter()
            .filter(|l| l.starts_with("POST /reg"))
            .count(),
        1,
        "the registration is shared, never repeated"
    );
}

on_both_backends!(four_processes_share_a_discovered_mcp_servers_tokens);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn discovery_refuses_metadata_naming_another_resource_or_an_unpinned_issuer() {
    let server = OidcServer::start(3600, None);
    let post = &server.clients.post;
    let mut w = World::build(
        Backend::Sqlite,
        "mcp-refusals",
        Behaviour::default(),
        "",
        Clock::System,
    )
    .await;
    w.add_config(&format!(
        "\n[providers.elsewhere]\nmcp_url = \"{}/other\"\n\
         \n[providers.pinned]\nmcp_url = \"{}\"\nissuer = \"http://127.0.0.1:1\"\n\
         client_id = \"{}\"\nclient_secret = \"{}\"\nclient_auth = \"client-secret-post\"\n",
        server.issuer,
        server.mcp,
        post.client_id,
        post.client_secret.as_deref().unwrap()
    ))
    .await;
    // The metadata found for /other names /mcp: not this resource.
    let out = w
        .cli()
        .args(["connect", "elsewhere", "alice", "--no-browser"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(11), "{stderr}");
    assert!(stderr.contains("another resource"), "{stderr}");
    // The server names an authorisation server other than the pinned one:
    // the client's secret goes nowhere.
    let out = w
        .cli()
        .args(["connect", "pinned", "alice", "--no-browser"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(11), "{stderr}");
    assert!(stderr.contains("configured issuer"), "{stderr}");
    assert_eq!(
        server
            .log()
            .iter()
            .filter(|l| l.starts_with("POST /reg") || l.starts_with("POST /token"))
            .count(),
        0,
        "nothing registered, no token requested"
    );

    // A client with a secret for an MCP server must pin its issuer.
    std::fs::write(
        &w.config_path,
        format!(
            "[providers.unpinned]\nmcp_url = \"{}\"\nclient_id = \"x\"\nclient_secret = \"s3cret\"\n",
            server.mcp
        ),
    )
    .unwrap();
    let out = w.cli().args(["tokens", "list"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(14), "{stderr}");
    assert!(
        stderr.contains("needs issuer") && !stderr.contains("s3cret"),
        "{stderr}"
    );
}
