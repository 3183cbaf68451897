//! A loopback OAuth token endpoint for the demo and the tests: it counts
//! refresh calls, rotates refresh tokens and, like real rotating providers
//! (RFC 9700), revokes the whole chain when a spent refresh token is reused.
//! Real HTTP/1.1 over TCP on 127.0.0.1; not for production.

use std::collections::HashMap;
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
    /// Answers given in this order, one per request, before `canned` or a
    /// refresh: a provider whose answers a test scripts.
    pub script: std::collections::VecDeque<(u16, String, String)>,
    /// Client credentials the endpoint requires (body or HTTP Basic).
    pub client_id: String,
    pub client_secret: String,
    /// Sent as `refresh_token_expires_in` when set.
    pub refresh_expires_in: Option<i64>,
    /// Sent as `scope` when set.
    pub scope: Option<String>,
    /// Process the refresh (rotating the chain), then wait this long before
    /// answering: a runtime that dies meanwhile loses the rotated token.
    pub answer_delay: Duration,
    /// Write these bytes as the whole answer instead of a well-formed one
    /// (truncated bodies, broken HTTP), after processing nothing; then
    /// hold the connection for `answer_delay` before closing it.
    pub raw: Option<Vec<u8>>,
    /// Write the answer a byte at a time with this pause between bytes
    /// (zero: all at once): a provider that trickles.
    pub trickle: Duration,
}

impl Default for Behaviour {
    fn default() -> Self {
        Self {
            expires_in: 3600,
            rotate: true,
            delay: Duration::ZERO,
            canned: None,
            script: Default::default(),
            client_id: "dev-client".into(),
            client_secret: "dev-secret".into(),
            refresh_expires_in: None,
            scope: None,
            answer_delay: Duration::ZERO,
            raw: None,
            trickle: Duration::ZERO,
        }
    }
}

/// One authorisation's refresh tokens, each replacing the last.
#[derive(Debug, Default)]
struct Chain {
    /// The refresh token that works now.
    current: Option<String>,
    revoked: bool,
    issued: u64,
}

#[derive(Debug, Default)]
struct Inner {
    behaviour: Behaviour,
    chains: Vec<Chain>,
    /// Every refresh token ever issued or seeded, to its chain: a spent one
    /// presented again revokes that chain.
    by_token: HashMap<String, usize>,
    /// Requests whose client hung up before they were processed.
    abandoned: u64,
    /// Requests that have arrived (counted before any delay).
    arrived: u64,
    /// Connections accepted (answers keep them open, as real endpoints do).
    connections: u64,
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
    /// Whether processed answers are held back (see [`DevProvider::hold_answers`]).
    held: Arc<tokio::sync::watch::Sender<bool>>,
    /// Woken whenever a request arrives or is processed.
    changed: Arc<tokio::sync::Notify>,
    scheme: &'static str,
}

impl DevProvider {
    /// Starts listening on 127.0.0.1 on a free port, with `first_refresh_token` valid.
    pub async fn start(behaviour: Behaviour, first_refresh_token: &str) -> std::io::Result<Self> {
        Self::start_with(behaviour, first_refresh_token, None).await
    }

    /// Like [`DevProvider::start`], over TLS with `server`'s certificate.
    pub async fn start_tls(
        behaviour: Behaviour,
        first_refresh_token: &str,
        server: Arc<rustls::ServerConfig>,
    ) -> std::io::Result<Self> {
        Self::start_with(behaviour, first_refresh_token, Some(server)).await
    }

    async fn start_with(
        behaviour: Behaviour,
        first_refresh_token: &str,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let inner = Arc::new(Mutex::new(Inner {
            behaviour,
            ..Default::default()
        }));
        let held = Arc::new(tokio::sync::watch::Sender::new(false));
        let changed = Arc::new(tokio::sync::Notify::new());
        let state = inner.clone();
        let (gate, events) = (held.clone(), changed.clone());
        let acceptor = tls.clone().map(tokio_rustls::TlsAcceptor::from);
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                let state = state.clone();
                let (gate, events) = (gate.subscribe(), events.clone());
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let _ = match acceptor {
                        None => serve(socket, addr, hung_up, state, gate, events).await,
                        Some(acceptor) => match acceptor.accept(socket).await {
                            // A client that refused our certificate never gets here.
                            Ok(tls) => serve(tls, addr, |_| false, state, gate, events).await,
                            Err(_) => Ok(()),
                        },
                    };
                });
            }
        });
        let provider = Self {
            addr,
            inner,
            held,
            changed,
            scheme: if tls.is_some() { "https" } else { "http" },
        };
        provider.reset_chain(first_refresh_token);
        Ok(provider)
    }

    /// `http://127.0.0.1:PORT`: the endpoint answers on any path.
    pub fn base_url(&self) -> String {
        format!("{}://{}", self.scheme, self.addr)
    }

    /// The URL of the token endpoint.
    pub fn token_url(&self) -> String {
        format!("{}/token", self.base_url())
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// From now on, process each refresh (rotating the chain) and then hold
    /// its answer until [`DevProvider::release_answers`]: the window in which
    /// a refresher that dies, is cut off or is cancelled loses the rotation.
    pub fn hold_answers(&self) {
        self.held.send_replace(true);
    }

    /// Sends every held answer and holds no more.
    pub fn release_answers(&self) {
        self.held.send_replace(false);
    }

    /// Waits until `done` holds, re-checking whenever a request arrives or
    /// is processed: an event, not a poll.
    pub async fn wait_until(&self, mut done: impl FnMut(&Self) -> bool) {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if done(self) {
                return;
            }
            changed.await;
        }
    }

    /// Requests that have arrived so far, answered or still delayed.
    pub fn arrived(&self) -> u64 {
        self.lock().arrived
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.lock().connections
    }

    /// Refresh requests answered so far.
    pub fn calls(&self) -> u64 {
        self.lock().calls
    }

    /// Reuses of spent refresh tokens detected so far.
    pub fn reuses(&self) -> u64 {
        self.lock().reuses
    }

    /// Whether reuse detection has revoked any chain.
    pub fn revoked(&self) -> bool {
        self.lock().chains.iter().any(|c| c.revoked)
    }

    /// Chains that reuse detection has revoked.
    pub fn revoked_chains(&self) -> usize {
        self.lock().chains.iter().filter(|c| c.revoked).count()
    }

    /// The refresh token that currently works in the first chain.
    pub fn current_refresh_token(&self) -> Option<String> {
        self.lock().chains.first().and_then(|c| c.current.clone())
    }

    /// Refresh tokens issued per chain, in the order the chains were added.
    pub fn issued_per_chain(&self) -> Vec<u64> {
        self.lock().chains.iter().map(|c| c.issued).collect()
    }

    /// Requests whose client hung up before they were processed.
    pub fn abandoned(&self) -> u64 {
        self.lock().abandoned
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

    /// Forgets every chain and makes `token` the refresh token that works
    /// (as a new authorisation would).
    pub fn reset_chain(&self, token: &str) {
        let mut s = self.lock();
        s.chains.clear();
        s.by_token.clear();
        drop(s);
        self.add_chain(token);
    }

    /// Adds another authorisation whose refresh token is `token`.
    pub fn add_chain(&self, token: &str) {
        let mut s = self.lock();
        let id = s.chains.len();
        s.chains.push(Chain {
            current: Some(token.into()),
            ..Default::default()
        });
        s.by_token.insert(token.into(), id);
    }
}

/// Serves one connection: its requests one after another, until the client
/// closes it or an answer closes it.
async fn serve<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    mut socket: S,
    local: SocketAddr,
    hung_up: fn(&S) -> bool,
    state: Arc<Mutex<Inner>>,
    mut held: tokio::sync::watch::Receiver<bool>,
    events: Arc<tokio::sync::Notify>,
) -> std::io::Result<()> {
    state.lock().unwrap_or_else(|p| p.into_inner()).connections += 1;
    while serve_one(&mut socket, local, hung_up, &state, &mut held, &events).await? {}
    Ok(())
}

/// Serves one request; true when the connection stays open for another.
async fn serve_one<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    socket: &mut S,
    local: SocketAddr,
    hung_up: fn(&S) -> bool,
    state: &Arc<Mutex<Inner>>,
    held: &mut tokio::sync::watch::Receiver<bool>,
    events: &Arc<tokio::sync::Notify>,
) -> std::io::Result<bool> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let header_end = loop {
        let n = socket.read(&mut chunk).await?;
        if n == 0 {
            return Ok(false);
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > 64 * 1024 {
            return Ok(false);
        }
    };
    let head = String::from_utf8_lossy(&buf[..header_end]).to_string();
    let mut content_length = 0usize;
    let mut authorization = None;
    let mut host = None;
    for line in head.lines().skip(1) {
        if let Some((k, v)) = line.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                content_length = v.trim().parse().unwrap_or(0);
            } else if k.eq_ignore_ascii_case("authorization") {
                authorization = Some(v.trim().to_string());
            } else if k.eq_ignore_ascii_case("host") {
                host = Some(v.trim().to_string());
            }
        }
    }
    // Like every real front end: HTTP/1.1 without the right Host is a 400.
    if host.as_deref() != Some(local.to_string().as_str()) {
        let reply = "HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";
        socket.write_all(reply.as_bytes()).await?;
        socket.shutdown().await?;
        return Ok(false);
    }
    while buf.len() < header_end + content_length {
        let n = socket.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = String::from_utf8_lossy(&buf[header_end..]).to_string();
    let (delay, answer_delay, raw, trickle) = {
        let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
        s.arrived += 1;
        (
            s.behaviour.delay,
            s.behaviour.answer_delay,
            s.behaviour.raw.clone(),
            s.behaviour.trickle,
        )
    };
    events.notify_waiters();
    pause(delay).await;
    // A client that hung up while we stalled: its request is never processed.
    if hung_up(socket) {
        state.lock().unwrap_or_else(|p| p.into_inner()).abandoned += 1;
        return Ok(false);
    }
    if let Some(raw) = raw {
        state.lock().unwrap_or_else(|p| p.into_inner()).calls += 1;
        write_out(socket, &raw, trickle).await?;
        // A stall mid-answer, when asked for; then the connection closes
        // (a raw answer may not say where it ends).
        pause(answer_delay).await;
        socket.shutdown().await?;
        return Ok(false);
    }
    let (status, content_type, answer) = respond(state, &body, authorization);
    events.notify_waiters();
    let _ = held.wait_for(|held| !held).await;
    pause(answer_delay).await;
    let reply = format!(
        "HTTP/1.1 {status} X\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\n\r\n{answer}",
        answer.len()
    );
    write_out(socket, reply.as_bytes(), trickle).await?;
    Ok(true)
}

/// Sleeps for `d`, not at all for zero: a zero sleep still waits for the
/// timer's next millisecond, which would make a zero-latency provider
/// answer 1 ms late.
async fn pause(d: Duration) {
    if !d.is_zero() {
        tokio::time::sleep(d).await;
    }
}

/// Writes `bytes` at once, or the head at once and then the body a byte
/// at a time `trickle` apart.
async fn write_out<S: tokio::io::AsyncWrite + Unpin>(
    socket: &mut S,
    bytes: &[u8],
    trickle: Duration,
) -> std::io::Result<()> {
    if trickle.is_zero() {
        return socket.write_all(bytes).await;
    }
    let head = bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(0, |i| i + 4);
    socket.write_all(&bytes[..head]).await?;
    for byte in &bytes[head..] {
        socket.write_all(std::slice::from_ref(byte)).await?;
        tokio::time::sleep(trickle).await;
    }
    Ok(())
}

/// Whether the peer has closed its end (a read would return end of file).
fn hung_up(socket: &tokio::net::TcpStream) -> bool {
    let mut probe = [0u8; 1];
    matches!(socket.try_read(&mut probe), Ok(0))
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
    if let Some(next) = s.behaviour.script.pop_front() {
        return next;
    }
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
    let Some(id) = s.by_token.get(&presented).copied() else {
        return json(400, serde_json::json!({"error": "invalid_grant"}));
    };
    if s.chains[id].revoked {
        return json(400, serde_json::json!({"error": "invalid_grant"}));
    }
    if s.chains[id].current.as_deref() != Some(presented.as_str()) {
        // Reuse detection: the whole chain dies, the newest token included.
        s.reuses += 1;
        s.chains[id].revoked = true;
        s.chains[id].current = None;
        return json(
            400,
            serde_json::json!({"error": "invalid_grant", "error_description": "refresh token reused"}),
        );
    }
    s.chains[id].issued += 1;
    let n = s.chains[id].issued;
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
        s.chains[id].current = Some(next.clone());
        s.by_token.insert(next.clone(), id);
        answer["refresh_token"] = serde_json::Value::String(next);
    }
    json(200, answer)
}

fn nonce() -> String {
    use rand::Rng;
    format!("{:016x}", rand::rng().random::<u64>())
}
