//! Connections to token endpoints, kept open between refreshes: a run of
//! refreshes to one provider pays for one TCP (and TLS) handshake instead
//! of one each. They are opened only by [`crate::outbound::connect`], under
//! the same egress rules, and kept per provider, origin and trust settings,
//! so a connection made for one provider never carries another's request.

use bytes::Bytes;
use http_body_util::Full;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long an idle connection is kept: under the idle timeouts servers
/// and proxies commonly use (Node 5 s, HAProxy and Envoy defaults of a few
/// seconds), so that a server rarely closes a connection just as a refresh
/// is sent on it (a request of unknown fate, which a rotating provider may
/// count as spent). Long enough for a run of refreshes.
const IDLE: Duration = Duration::from_secs(2);

/// Idle connections kept per origin; more at once are closed after use.
const IDLE_PER_ORIGIN: usize = 8;

/// The request sender of an HTTP/1.1 connection.
pub(crate) type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

/// A connection in use: its sender and the task that moves its bytes,
/// which ends (closing the connection) when this is dropped.
pub(crate) struct Open {
    pub(crate) sender: Sender,
    _task: AbortOnDrop,
}

impl Open {
    pub(crate) fn new(sender: Sender, task: tokio::task::JoinHandle<()>) -> Self {
        Self {
            sender,
            _task: AbortOnDrop(task),
        }
    }
}

/// Where a connection goes and what it trusts.
#[derive(Clone)]
pub(crate) struct Origin {
    pub(crate) provider: String,
    pub(crate) scheme: String,
    pub(crate) host: String,
    pub(crate) port: u16,
    /// The provider's TLS settings, by identity (kept alive here, so no
    /// other settings can take their address): a reloaded configuration
    /// starts with connections of its own.
    pub(crate) trust: Arc<rustls::ClientConfig>,
}

impl PartialEq for Origin {
    fn eq(&self, other: &Self) -> bool {
        (&self.provider, &self.scheme, &self.host, self.port)
            == (&other.provider, &other.scheme, &other.host, other.port)
            && Arc::ptr_eq(&self.trust, &other.trust)
    }
}

impl Eq for Origin {}

impl std::hash::Hash for Origin {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        (&self.provider, &self.scheme, &self.host, self.port).hash(state);
        Arc::as_ptr(&self.trust).hash(state);
    }
}

impl Origin {
    pub(crate) fn trusting(
        provider: &str,
        scheme: &str,
        host: &str,
        port: u16,
        tls: &Arc<rustls::ClientConfig>,
    ) -> Self {
        Self {
            provider: provider.to_string(),
            scheme: scheme.to_string(),
            host: host.to_string(),
            port,
            trust: tls.clone(),
        }
    }
}

struct Idle {
    open: Open,
    since: Instant,
}

/// The idle connections of one process.
#[derive(Default)]
pub struct ProviderConnections {
    idle: Mutex<HashMap<Origin, Vec<Idle>>>,
}

impl std::fmt::Debug for ProviderConnections {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProviderConnections")
            .finish_non_exhaustive()
    }
}

impl ProviderConnections {
    /// The most recently used idle connection to `origin` that can take a
    /// request now; stale and closed ones are dropped on the way.
    pub(crate) fn take(&self, origin: &Origin) -> Option<Open> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let kept = idle.get_mut(origin)?;
        while let Some(candidate) = kept.pop() {
            let sender = &candidate.open.sender;
            if candidate.since.elapsed() < IDLE && sender.is_ready() && !sender.is_closed() {
                return Some(candidate.open);
            }
        }
        None
    }

    /// Keeps a connection whose answer was read to the end, unless the
    /// server is closing it or enough are kept already.
    pub(crate) fn put(&self, origin: Origin, open: Open) {
        if open.sender.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        // Drop what has gone stale meanwhile, for every origin.
        idle.retain(|_, kept| {
            kept.retain(|c| c.since.elapsed() < IDLE && !c.open.sender.is_closed());
            !kept.is_empty()
        });
        let kept = idle.entry(origin).or_default();
        if kept.len() < IDLE_PER_ORIGIN {
            kept.push(Idle {
                open,
                since: Instant::now(),
            });
        }
    }
}

/// A spawned task that ends when its handle is dropped.
pub(crate) struct AbortOnDrop(pub(crate) tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
