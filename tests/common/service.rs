//! `tokenkeep serve` processes for the tests, and a small HTTP/1.1 client
//! over their Unix sockets and loopback ports (written here so that the
//! tests depend on no client library's behaviour).

use std::io::BufRead;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Stdio};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// An API key of full reach, configured as `ops`.
pub const OPS_KEY: &str = "ops-key-0123456789abcdef";
/// A key limited to users `a:*` of provider `acme`, configured as `tenant-a`.
pub const TENANT_A_KEY: &str = "tenant-a-key-0123456789";

/// The `[serve]` section the service tests append to a world's config,
/// with `refresher` as the body of `[serve.refresher]`.
pub fn serve_section(refresher: &str) -> String {
    serve_section_with("", refresher)
}

/// [`serve_section`] with more `[serve]` settings (TOML lines).
pub fn serve_section_with(serve: &str, refresher: &str) -> String {
    format!(
        "\n[serve]\nmax_body_bytes = 4096\n{serve}\n\
         [serve.keys.ops]\nsecret_env = \"TK_TEST_OPS_KEY\"\n\
         [serve.keys.tenant-a]\nsecret_sha256 = \"{}\"\nproviders = [\"acme\"]\nusers = [\"a:*\"]\n\
         [serve.refresher]\n{refresher}\n",
        sha256_hex(TENANT_A_KEY)
    )
}

/// A refresher that stays out of the way of tests about the API.
pub const NO_REFRESHER: &str = "enabled = false";

fn sha256_hex(s: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(s.as_bytes()))
}

/// Where a service answers.
#[derive(Debug, Clone)]
pub enum Endpoint {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

/// A running `tokenkeep serve`, killed when dropped.
pub struct Service {
    pub child: Child,
    pub unix: PathBuf,
    pub tcp: SocketAddr,
    /// Its standard error, collected until it exits.
    pub stderr: std::sync::Arc<std::sync::Mutex<String>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Service {
    /// Starts `serve` against `world` on a socket named `name` in its
    /// scratch directory and a loopback port, and waits until it answers.
    pub fn start(world: &super::World, name: &str, log: &str) -> Self {
        Self::start_with(world, name, log, &[])
    }

    /// [`Service::start`] with more environment.
    pub fn start_with(world: &super::World, name: &str, log: &str, env: &[(&str, &str)]) -> Self {
        Self::start_on(world, name, log, env, 0)
    }

    /// [`Service::start_with`] on loopback port `port` (0: any).
    pub fn start_on(
        world: &super::World,
        name: &str,
        log: &str,
        env: &[(&str, &str)],
        port: u16,
    ) -> Self {
        let unix = world.scratch.0.join(format!("{name}.sock"));
        let mut child = world
            .cli()
            .env("TK_TEST_OPS_KEY", OPS_KEY)
            .env("TOKENKEEP_LOG", log)
            .envs(env.iter().copied())
            .args(["serve", "--listen"])
            .arg(format!("unix:{},tcp:127.0.0.1:{port}", unix.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let mut err = std::io::BufReader::new(child.stderr.take().unwrap());
        let sink = stderr.clone();
        let reader = std::thread::spawn(move || {
            let mut line = String::new();
            while err.read_line(&mut line).is_ok_and(|n| n > 0) {
                sink.lock().unwrap().push_str(&line);
                line.clear();
            }
        });
        // The listening lines come once every listener is bound.
        let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut tcp = None;
        for _ in 0..2 {
            let mut line = String::new();
            out.read_line(&mut line).unwrap();
            if let Some(addr) = line.trim().strip_prefix("listening on tcp:") {
                tcp = Some(addr.parse().unwrap());
            }
            assert!(
                line.starts_with("listening on "),
                "serve said {line:?}; stderr: {}",
                stderr.lock().unwrap()
            );
        }
        Self {
            child,
            unix,
            tcp: tcp.expect("a tcp listener"),
            stderr,
            reader: Some(reader),
        }
    }

    pub fn unix(&self) -> Endpoint {
        Endpoint::Unix(self.unix.clone())
    }

    pub fn tcp(&self) -> Endpoint {
        Endpoint::Tcp(self.tcp)
    }

    /// Sends `signal` (e.g. libc's SIGTERM number) to the process.
    pub fn signal(&self, signal: i32) {
        let status = std::process::Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the process to exit: its exit code and all it wrote on
    /// standard error.
    pub fn finish(&mut self) -> (Option<i32>, String) {
        let code = self.child.wait().unwrap().code();
        if let Some(reader) = self.reader.take() {
            reader.join().unwrap();
        }
        (code, self.stderr())
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An answer: status, headers (names lower case) and body.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "not JSON ({e}): {} {:?}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The error class of a JSON error answer.
    pub fn class(&self) -> String {
        self.json()["error"].as_str().unwrap_or("").to_string()
    }
}

/// One request on a fresh connection. `key`: the bearer key, if any.
pub async fn request(
    at: &Endpoint,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: Option<&[u8]>,
) -> Reply {
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    if let Some(key) = key {
        head.push_str(&format!("Authorization: Bearer {key}\r\n"));
    }
    if let Some(body) = body {
        head.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    head.push_str("\r\n");
    let mut wire = head.into_bytes();
    wire.extend_from_slice(body.unwrap_or_default());
    exchange(at, &wire).await
}

/// Writes `wire` as it is and reads the whole answer.
pub async fn exchange(at: &Endpoint, wire: &[u8]) -> Reply {
    let raw = match at {
        Endpoint::Unix(path) => {
            let mut s = tokio::net::UnixStream::connect(path).await.unwrap();
            talk(&mut s, wire).await
        }
        Endpoint::Tcp(addr) => {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            talk(&mut s, wire).await
        }
    };
    parse(&raw)
}

async fn talk<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    s: &mut S,
    wire: &[u8],
) -> Vec<u8> {
    // The service may answer (413) before reading all of a large body.
    let _ = s.write_all(wire).await;
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw).await;
    raw
}

fn parse(raw: &[u8]) -> Reply {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP head in {:?}", String::from_utf8_lossy(raw)));
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    if headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.contains("chunked"))
    {
        body = dechunk(&body);
    }
    Reply {
        status,
        headers,
        body,
    }
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = data.windows(2).position(|w| w == b"\r\n") {
        let size = usize::from_str_radix(String::from_utf8_lossy(&data[..eol]).trim(), 16).unwrap();
        if size == 0 {
            break;
        }
        out.extend_from_slice(&data[eol + 2..eol + 2 + size]);
        data = &data[eol + 2 + size + 2..];
    }
    out
}

/// `s` percent-encoded for a path segment.
pub fn segment(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes())
        .collect::<String>()
        .replace('+', "%20")
}

/// The sum of the samples of `name` in a Prometheus text exposition whose
/// labels include every one of `labels`.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric, rest) = series.split_once('{').unwrap_or((series, "}"));
            (metric == name
                && labels
                    .iter()
                    .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\""))))
            .then(|| value.parse::<f64>().ok())
            .flatten()
        })
        .sum()
}
