//! A real OpenID Connect / OAuth 2.0 server that nobody here wrote: panva's
//! `oidc-provider` from npm (tests/oidc_server/), with PKCE, the device
//! flow, client credentials, revocation, dynamic registration, resource
//! indicators and an MCP-style protected resource. The first use runs
//! `npm ci` there (.ci/run does it up front).

use serde::Deserialize;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// One configured client.
#[derive(Debug, Deserialize, Clone)]
pub struct Client {
    pub client_id: String,
    pub client_secret: Option<String>,
}

#[derive(Debug, Deserialize, Clone)]
pub struct Clients {
    /// Public (PKCE, device flow; rotates refresh tokens).
    pub public: Client,
    /// Confidential, `client_secret_basic`, client credentials only.
    pub machine: Client,
    /// Confidential, `client_secret_post`, every grant.
    pub post: Client,
    /// `private_key_jwt`, client credentials (when started with a JWKS).
    pub jwt: Client,
    /// Confidential, `client_secret_basic`, token exchange (RFC 8693) only.
    pub exchange: Client,
    /// Public, like `public`, whose tokens must be DPoP-bound (RFC 9449).
    pub dpop: Client,
}

#[derive(Deserialize)]
struct Started {
    issuer: String,
    mcp: String,
    clients: Clients,
}

/// What the server logged: one line per request and per grant issued.
#[derive(Default)]
struct Log {
    lines: Vec<String>,
}

/// A running oidc-provider on 127.0.0.1.
pub struct OidcServer {
    pub issuer: String,
    /// The MCP server's URL (its protected-resource metadata names this
    /// server as its authorisation server).
    pub mcp: String,
    pub clients: Clients,
    log: Arc<(Mutex<Log>, Condvar)>,
    child: Child,
    /// The server exits when this closes, even if this process is killed.
    _stdin: ChildStdin,
}

pub fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../oidc_server")
}

/// Installs the server's packages once (`npm ci`), serialised between
/// test processes.
fn install() {
    let dir = dir();
    if dir.join("node_modules/oidc-provider/package.json").exists() {
        return;
    }
    // The loser of a race re-checks under the lock: a second `npm ci`
    // would remove the packages under a running server.
    let status = Command::new("flock")
        .arg(std::env::temp_dir().join("tokenkeep-oidc-server-install.lock"))
        .args([
            "sh",
            "-c",
            "test -e node_modules/oidc-provider/package.json || npm ci --no-audit --no-fund",
        ])
        .current_dir(&dir)
        .status()
        .expect("run npm ci for tests/oidc_server");
    assert!(status.success(), "npm ci in tests/oidc_server failed");
}

impl OidcServer {
    /// Starts the server; access tokens (and machine tokens) live
    /// `access_token_seconds`. `jwks`: a public JWKS file for the
    /// `private_key_jwt` client.
    pub fn start(access_token_seconds: u32, jwks: Option<&Path>) -> Self {
        install();
        let mut command = Command::new("node");
        command
            .arg(dir().join("server.mjs"))
            .args(["--access-token-seconds", &access_token_seconds.to_string()]);
        if let Some(jwks) = jwks {
            command.arg("--jwks").arg(jwks);
        }
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the oidc-provider server (node)");
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, announced) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut stdout = BufReader::new(stdout);
            let mut line = String::new();
            let _ = stdout.read_line(&mut line);
            let _ = tx.send(line);
            // oidc-provider prints notices on stdout too: keep reading, or
            // its next write fails and ends the server.
            let _ = std::io::copy(&mut stdout, &mut std::io::sink());
        });
        let log = Arc::new((Mutex::new(Log::default()), Condvar::new()));
        let lines = log.clone();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let (log, changed) = &*lines;
                log.lock().unwrap().lines.push(line);
                changed.notify_all();
            }
        });
        let line = announced
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| {
                let _ = child.kill();
                panic!("the oidc-provider server did not announce itself within a minute")
            });
        let started: Started = serde_json::from_str(&line).unwrap_or_else(|e| {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "the oidc-provider server did not start ({e}): {:?}",
                log.0.lock().unwrap().lines
            )
        });
        OidcServer {
            issuer: started.issuer,
            mcp: started.mcp,
            clients: started.clients,
            log,
            child,
            _stdin: stdin,
        }
    }

    /// The grants the server has issued so far, by `grant_type`, read after
    /// a marker request: every grant answered before this call is counted.
    pub fn grants(&self, grant_type: &str) -> usize {
        self.logged(&format!("grant {grant_type}"))
    }

    /// Those of [`OidcServer::grants`] whose request named the MCP server
    /// as its `resource` (RFC 8707).
    pub fn grants_for_mcp(&self, grant_type: &str) -> usize {
        self.logged(&format!("grant {grant_type} for the MCP server"))
    }

    /// How many times the server logged `line`, read after a marker request.
    pub fn logged(&self, line: &str) -> usize {
        static MARK: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let mark = format!(
            "mark-{}-{}",
            std::process::id(),
            MARK.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
        );
        let (status, _) = http(&self.url(&format!("/mark/{mark}")), None, None);
        assert_eq!(status, 200, "the marker request failed");
        let (log, changed) = &*self.log;
        let wanted = format!("mark {mark}");
        let log = changed
            .wait_timeout_while(log.lock().unwrap(), Duration::from_secs(30), |l| {
                !l.lines.contains(&wanted)
            })
            .unwrap()
            .0;
        log.lines.iter().filter(|l| *l == line).count()
    }

    /// The server's log, for failure messages.
    pub fn log(&self) -> Vec<String> {
        self.log.0.lock().unwrap().lines.clone()
    }

    /// Runs the user at a browser (tests/oidc_server/user.mjs) on `url`:
    /// signs in, approves, and follows the redirect back to the client.
    pub fn user_approves(url: &str) {
        let status = Command::new("node")
            .arg(dir().join("user.mjs"))
            .arg(url)
            .status()
            .expect("node user.mjs");
        assert!(status.success(), "the user could not approve {url}");
    }

    /// `$BROWSER` for the CLI: the user who approves whatever is asked.
    pub fn browser() -> String {
        format!("node {}", dir().join("user.mjs").display())
    }

    /// An endpoint of this server.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.issuer.trim_end_matches('/'))
    }
}

/// One request with Node's `fetch` (so that the tests use no HTTP client
/// of tokenkeep's): a form POST when `form` is given, else a GET, with a
/// bearer token if any. The status and the body.
pub fn http(url: &str, form: Option<&[(&str, &str)]>, bearer: Option<&str>) -> (u16, String) {
    let authorization = bearer.map(|b| format!("Bearer {b}"));
    let headers: Vec<(&str, &str)> = authorization
        .as_deref()
        .map(|a| ("authorization", a))
        .into_iter()
        .collect();
    request(url, form, &headers)
}

/// [`http`] with any request headers.
pub fn request(
    url: &str,
    form: Option<&[(&str, &str)]>,
    headers: &[(&str, &str)],
) -> (u16, String) {
    let form: Vec<String> = form
        .unwrap_or_default()
        .iter()
        .flat_map(|(k, v)| [k.to_string(), v.to_string()])
        .collect();
    let headers: serde_json::Map<String, serde_json::Value> = headers
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string().into()))
        .collect();
    let out = Command::new("node")
        .args([
            "-e",
            "const [url, headers, ...pairs] = process.argv.slice(1);
             const init = { headers: JSON.parse(headers) };
             if (pairs.length) {
               const body = new URLSearchParams();
               for (let i = 0; i < pairs.length; i += 2) body.set(pairs[i], pairs[i + 1]);
               Object.assign(init, { method: 'POST', body });
             }
             fetch(url, init).then(async (r) => console.log(JSON.stringify([r.status, await r.text()])));",
        ])
        .arg(url)
        .arg(serde_json::Value::Object(headers).to_string())
        .args(&form)
        .output()
        .expect("node");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        panic!(
            "no answer from {url}: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

impl Drop for OidcServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
