//! A loopback OAuth token endpoint for the demo and the tests: it counts
//! refresh calls, rotates refresh tokens and, like real rotating providers
//! (RFC 9700), revokes the whole chain when a spent refresh token is reused.
//! Real HTTP/1.1 over TCP on 127.0.0.1; not for production.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// How the endpoint behaves; change it at any time with [`DevProvider::set`].
#[derive(Debug, Clone)]
pub struct Behaviour {
    /// Lifetime of issued access tokens.
    pub expires_in: i64,
    /// Issue a new refresh token on every refresh.
    pub rotate: bool,
    /// Delay before answering, to widen race windows.
    pub delay: Duration,
    /// Answer this instead of refreshing: (status, content type, body).
    pub canned: Option<(u16, String, String)>,
    /// Client credentials the endpoint requires (body or HTTP Basic).
    pub client_id: String,
    pub client_secret: String,
    /// Sent as `refresh_token_expires_in` when set.
    pub refresh_expires_in: Option<i64>,
    /// Sent as `scope` when set.
    pub scope: Option<String>,
}

impl Default for Behaviour {
    fn default() -> Self {
        Self {
            expires_in: 3600,
            rotate: true,
            delay: Duration::ZERO,
            canned: None,
            client_id: "dev-client".into(),
            client_secret: "dev-secret".into(),
            refresh_expires_in: None,
            scope: None,
        }
    }
}

#[derive(Debug, Default)]
struct Chain {
    /// The refresh token that works now.
    current: Option<String>,
    /// Spent refresh tokens: presenting one again revokes the chain.
    spent: HashSet<String>,
    revoked: bool,
    issued: u64,
}

#[derive(Debug, Default)]
struct Inner {
    behaviour: Behaviour,
    chain: Chain,
    /// Requests that have arrived (counted before any delay).
    arrived: u64,
    /// Refresh requests answered (well-formed or not).
    calls: u64,
    /// Reuses of spent refresh tokens detected.
    reuses: u64,
    /// Request bodies received, for tests that check what was sent.
    bodies: Vec<String>,
    authorizations: Vec<Option<String>>,
}

/// A running loopback token endpoint.
#[derive(Clone)]
pub struct DevProvider {
    addr: SocketAddr,
    inner: Arc<Mutex<Inner>>,
}

impl DevProvider {
    /// Starts listening on 127.0.0.1 on a free port, with `first_refresh_token` valid.
    pub async fn start(behaviour: Behaviour, first_refresh_token: &str) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let inner = Arc::new(Mutex::new(Inner {
            behaviour,
            chain: Chain {
                current: Some(first_refresh_token.to_string()),
                ..Default::default()
            },
            ..Default::default()
        }));
        let state = inner.clone();
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                let state = state.clone();
                tokio::spawn(async move {
                    let _ = serve(socket, state).await;
                });
            }
        });
        Ok(Self { addr, inner })
    }

    /// `http://127.0.0.1:PORT`: the endpoint answers on any path.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The URL of the token endpoint.
    pub fn token_url(&self) -> String {
        format!("http://{}/token", self.addr)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Requests that have arrived so far, answered or still delayed.
    pub fn arrived(&self) -> u64 {
        self.lock().arrived
    }

    /// Refresh requests answered so far.
    pub fn calls(&self) -> u64 {
        self.lock().calls
    }

    /// Reuses of spent refresh tokens detected so far.
    pub fn reuses(&self) -> u64 {
        self.lock().reuses
    }

    /// Whether reuse detection has revoked the chain.
    pub fn revoked(&self) -> bool {
        self.lock().chain.revoked
    }

    /// The refresh token that currently works.
    pub fn current_refresh_token(&self) -> Option<String> {
        self.lock().chain.current.clone()
    }

    /// Request bodies received.
    pub fn bodies(&self) -> Vec<String> {
        self.lock().bodies.clone()
    }

    /// `Authorization` headers received.
    pub fn authorizations(&self) -> Vec<Option<String>> {
        self.lock().authorizations.clone()
    }

    /// Changes the behaviour.
    pub fn set(&self, f: impl FnOnce(&mut Behaviour)) {
        f(&mut self.lock().behaviour);
    }

    /// Makes `token` the refresh token that works (as a new authorisation would).
    pub fn reset_chain(&self, token: &str) {
        self.lock().chain = Chain {
            current: Some(token.into()),
            ..Default::default()
        };
    }
}

async fn serve(mut socket: tokio::net::TcpStream, state: Arc<Mutex<Inner>>) -> std::io::Result<()> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let header_end = loop {
        let n = socket.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > 64 * 1024 {
            return Ok(());
        }
    };
    let head = String::from_utf8_lossy(&buf[..header_end]).to_string();
    let mut content_length = 0usize;
    let mut authorization = None;
    for line in head.lines().skip(1) {
        if let Some((k, v)) = line.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                content_length = v.trim().parse().unwrap_or(0);
            } else if k.eq_ignore_ascii_case("authorization") {
                authorization = Some(v.trim().to_string());
            }
        }
    }
    while buf.len() < header_end + content_length {
        let n = socket.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = String::from_utf8_lossy(&buf[header_end..]).to_string();
    let delay = {
        let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
        s.arrived += 1;
        s.behaviour.delay
    };
    tokio::time::sleep(delay).await;
    let (status, content_type, answer) = respond(&state, &body, authorization);
    let reply = format!(
        "HTTP/1.1 {status} X\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{answer}",
        answer.len()
    );
    socket.write_all(reply.as_bytes()).await?;
    socket.shutdown().await
}

fn form(body: &str) -> Vec<(String, String)> {
    url::form_urlencoded::parse(body.as_bytes())
        .into_owned()
        .collect()
}

fn respond(
    state: &Mutex<Inner>,
    body: &str,
    authorization: Option<String>,
) -> (u16, String, String) {
    let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
    s.calls += 1;
    s.bodies.push(body.to_string());
    s.authorizations.push(authorization.clone());
    if let Some(canned) = s.behaviour.canned.clone() {
        return canned;
    }
    let json =
        |status: u16, v: serde_json::Value| (status, "application/json".to_string(), v.to_string());
    let fields = form(body);
    let get = |k: &str| fields.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    let basic = authorization
        .as_deref()
        .and_then(|a| a.strip_prefix("Basic "))
        .map(str::to_string);
    let expected_basic = {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(format!(
            "{}:{}",
            s.behaviour.client_id, s.behaviour.client_secret
        ))
    };
    let client_ok = basic.as_deref() == Some(expected_basic.as_str())
        || (get("client_id").as_deref() == Some(s.behaviour.client_id.as_str())
            && get("client_secret").as_deref() == Some(s.behaviour.client_secret.as_str()));
    if !client_ok {
        return json(401, serde_json::json!({"error": "invalid_client"}));
    }
    if get("grant_type").as_deref() != Some("refresh_token") {
        return json(400, serde_json::json!({"error": "unsupported_grant_type"}));
    }
    let Some(presented) = get("refresh_token") else {
        return json(400, serde_json::json!({"error": "invalid_request"}));
    };
    if s.chain.spent.contains(&presented) {
        // Reuse detection: the whole chain dies, the newest token included.
        s.reuses += 1;
        s.chain.revoked = true;
        s.chain.current = None;
        return json(
            400,
            serde_json::json!({"error": "invalid_grant", "error_description": "refresh token reused"}),
        );
    }
    if s.chain.revoked || s.chain.current.as_deref() != Some(presented.as_str()) {
        return json(400, serde_json::json!({"error": "invalid_grant"}));
    }
    s.chain.issued += 1;
    let n = s.chain.issued;
    let mut answer = serde_json::json!({
        "access_token": format!("dev-at-{n}-{}", nonce()),
        "token_type": "bearer",
        "expires_in": s.behaviour.expires_in,
    });
    if let Some(secs) = s.behaviour.refresh_expires_in {
        answer["refresh_token_expires_in"] = serde_json::Value::from(secs);
    }
    if let Some(scope) = &s.behaviour.scope {
        answer["scope"] = serde_json::Value::String(scope.clone());
    }
    if s.behaviour.rotate {
        let next = format!("dev-rt-{n}-{}", nonce());
        s.chain.spent.insert(presented);
        s.chain.current = Some(next.clone());
        answer["refresh_token"] = serde_json::Value::String(next);
    }
    json(200, answer)
}

fn nonce() -> String {
    use rand::Rng;
    format!("{:016x}", rand::rng().random::<u64>())
}
