//! `tokenkeep demo`: a self-contained run a newcomer can watch. A token about
//! to expire is stored in a fresh SQLite file; several runtime processes ask
//! for it at once; exactly one refresh reaches the local test provider.

use std::hash::{Hash, Hasher};
use std::time::{Duration, Instant};
use tokenkeep_host::{Config, Error, Keeper, Keyring, Options, SandboxLimits, TokenSet};
use tokenkeep_testkit::devprovider::{Behaviour, DevProvider};

/// Runs the demo with `runtimes` concurrent `tokenkeep tokens get` processes.
pub async fn run(runtimes: usize) -> Result<(), Error> {
    let runtimes = runtimes.clamp(1, 64);
    let dir = std::env::temp_dir().join(format!("tokenkeep-demo-{}", std::process::id()));
    let io = |e: std::io::Error| Error::Config(format!("demo: {e}"));
    std::fs::create_dir_all(&dir).map_err(io)?;
    let result = run_in(&dir, runtimes).await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn run_in(dir: &std::path::Path, runtimes: usize) -> Result<(), Error> {
    let io = |e: std::io::Error| Error::Config(format!("demo: {e}"));
    let provider = DevProvider::start(
        Behaviour {
            delay: Duration::from_millis(400),
            ..Default::default()
        },
        "demo-rt-0",
    )
    .await
    .map_err(io)?;
    let config_path = dir.join("config.toml");
    std::fs::write(
        &config_path,
        format!(
            "[providers.demo]\ntoken_url = \"{}\"\nclient_id = \"dev-client\"\nclient_secret = \"dev-secret\"\n",
            provider.token_url()
        ),
    )
    .map_err(io)?;
    let keys_path = dir.join("keys");
    let keyring = Keyring::create(&keys_path)?;
    let database_url = format!("sqlite:{}", dir.join("tokenkeep.db").display());

    println!("tokenkeep demo");
    println!("  database        {database_url} (SQLite, WAL)");
    println!(
        "  test provider   {} (rotates refresh tokens, revokes the chain on reuse)",
        provider.token_url()
    );
    let keeper = Keeper::open(Options {
        database_url: database_url.clone(),
        config: Config::load(&config_path)?,
        keyring,
        limits: SandboxLimits::default(),
        max_connections: 4,
        clock: Default::default(),
        grant_cache: false,
        audit_as: None,
    })
    .await?;
    let now = now();
    keeper
        .store_tokens(
            "demo",
            "alice",
            &TokenSet {
                access_token: "demo-at-0".to_string().into(),
                refresh_token: Some("demo-rt-0".to_string().into()),
                access_token_expires_at: Some(now + 30),
                refresh_token_expires_at: None,
                scopes: vec!["repo".into()],
            },
        )
        .await?;
    println!(
        "  stored          demo/alice, access token expires in 30 s: inside the refresh window"
    );
    println!();
    println!("{runtimes} runtime processes run `tokenkeep tokens get demo alice` at once:");

    let exe = std::env::current_exe().map_err(io)?;
    let started = Instant::now();
    let mut children = Vec::new();
    for i in 0..runtimes {
        let child = tokio::process::Command::new(&exe)
            .args(["tokens", "get", "demo", "alice"])
            .env("TOKENKEEP_DATABASE", &database_url)
            .env("TOKENKEEP_CONFIG", &config_path)
            .env("TOKENKEEP_KEYS_FILE", &keys_path)
            .env_remove("TOKENKEEP_KEYS")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(io)?;
        children.push((i + 1, child.id().unwrap_or(0), child));
    }
    let mut fingerprints = Vec::new();
    for (n, pid, child) in children {
        let out = child.wait_with_output().await.map_err(io)?;
        let elapsed = started.elapsed().as_millis();
        if out.status.success() {
            let token = String::from_utf8_lossy(&out.stdout).trim().to_string();
            let fp = fingerprint(&token);
            println!(
                "  runtime {n:>2} (pid {pid:>7}): valid token, fingerprint {fp}, done after {elapsed} ms"
            );
            fingerprints.push(fp);
        } else {
            println!(
                "  runtime {n:>2} (pid {pid:>7}): failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
    }
    let record = keeper
        .load_tokens("demo", "alice", false)
        .await?
        .ok_or(Error::NotFound {
            provider: "demo".into(),
            user_id: "alice".into(),
        })?;
    let calls = provider.calls();
    fingerprints.sort();
    fingerprints.dedup();
    println!();
    println!("outcome");
    println!("  provider calls  {calls} for {runtimes} runtimes");
    println!(
        "  tokens served   {} distinct (every runtime got the same new token)",
        fingerprints.len()
    );
    println!(
        "  stored record   generation {}, expires in {} s",
        record.generation,
        record.tokens.access_token_expires_at.unwrap_or(0) - now
    );
    println!(
        "  token chain     {}",
        if provider.revoked() {
            "REVOKED (a refresh token was spent twice)"
        } else {
            "alive: the rotated refresh token is stored"
        }
    );
    if calls != 1 || fingerprints.len() != 1 || provider.revoked() {
        return Err(Error::Config(format!(
            "demo: expected one provider call and one token, saw {calls} calls"
        )));
    }
    Ok(())
}

/// A short stand-in for a token: the demo never prints tokens, not even prefixes.
fn fingerprint(token: &str) -> String {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    token.hash(&mut h);
    format!("{:08x}", h.finish() as u32)
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default()
}
