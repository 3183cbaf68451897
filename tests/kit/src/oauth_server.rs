//! A real OAuth 2.0 authorization server that nobody here wrote:
//! django-oauth-toolkit from PyPI (tests/oauth_server/), with refresh-token
//! rotation and reuse detection on. The first use creates its virtualenv
//! under target/ (`tests/oauth_server/setup.sh`; .ci/run does it up front).

use serde::Deserialize;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The seeded tokens of one user; the access token has already expired.
#[derive(Debug, Deserialize, Clone)]
pub struct Seeded {
    pub user: String,
    pub access_token: String,
    pub refresh_token: String,
    pub scope: String,
}

#[derive(Deserialize)]
struct Started {
    token_url: String,
    client_id: String,
    client_secret: String,
    tokens: Vec<Seeded>,
}

/// A running django-oauth-toolkit server on 127.0.0.1.
pub struct OauthServer {
    pub token_url: String,
    pub client_id: String,
    pub client_secret: String,
    pub tokens: Vec<Seeded>,
    token_requests: Arc<AtomicUsize>,
    log: Arc<Mutex<Vec<String>>>,
    child: Child,
    /// The server exits when this closes, even if this process is killed.
    _stdin: ChildStdin,
    _dir: crate::Scratch,
}

fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn venv() -> PathBuf {
    std::env::var_os("TOKENKEEP_OAUTH_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target/oauth-venv"))
}

impl OauthServer {
    /// Installs the server if needed, starts it with `users` seeded users
    /// and waits for its announcement line.
    pub fn start(users: u32) -> Self {
        let venv = venv();
        let setup = Command::new("bash")
            .arg(workspace().join("tests/oauth_server/setup.sh"))
            .arg(&venv)
            .status()
            .expect("run tests/oauth_server/setup.sh");
        assert!(setup.success(), "installing django-oauth-toolkit failed");
        let dir = crate::Scratch::new("oauth-server");
        let mut child = Command::new(venv.join("bin/python"))
            .arg(workspace().join("tests/oauth_server/server.py"))
            .arg("--dir")
            .arg(&dir.0)
            .args(["--users", &users.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the OAuth server");
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, announced) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = announced
            .recv_timeout(Duration::from_secs(120))
            .unwrap_or_else(|_| {
                let _ = child.kill();
                panic!("the OAuth server did not announce itself within 2 minutes")
            });
        let started: Started = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("the OAuth server did not start ({e})"));
        // Its request log: method, path and status, never bodies.
        let token_requests = Arc::new(AtomicUsize::new(0));
        let log = Arc::new(Mutex::new(Vec::new()));
        let (count, lines) = (token_requests.clone(), log.clone());
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("\"POST /o/token/") {
                    count.fetch_add(1, Ordering::SeqCst);
                }
                lines.lock().unwrap().push(line);
            }
        });
        OauthServer {
            token_url: started.token_url,
            client_id: started.client_id,
            client_secret: started.client_secret,
            tokens: started.tokens,
            token_requests,
            log,
            child,
            _stdin: stdin,
            _dir: dir,
        }
    }

    /// Token requests the server has logged, once its log has settled.
    pub fn token_requests(&self) -> usize {
        let mut last = usize::MAX;
        loop {
            std::thread::sleep(Duration::from_millis(150));
            let now = self.token_requests.load(Ordering::SeqCst);
            if now == last {
                return now;
            }
            last = now;
        }
    }

    /// The server's request log, for failure messages.
    pub fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    /// The TOML of a provider served by this server.
    pub fn provider_toml(&self, name: &str, extra: &str) -> String {
        format!(
            "\n[providers.{name}]\ntoken_url = \"{}\"\nclient_id = \"{}\"\nclient_secret = \"{}\"\n{extra}\n",
            self.token_url, self.client_id, self.client_secret
        )
    }
}

impl Drop for OauthServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
