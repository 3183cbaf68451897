//! Binding the listeners and serving until told to stop: in-flight
//! requests finish, then the keeper's refreshes in flight commit.

use crate::api::{ApiState, router};
use crate::settings::{Listen, ServeSettings};
use crate::webhooks::Webhook;
use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokenkeep_host::refresher::{Refresher, RefresherSettings};
use tokenkeep_host::{Error, Keeper};
use tokio::net::{TcpListener, UnixListener};
use tracing::Instrument;

/// Applies a new configuration to a running service: the API keys and the
/// providers. Requests in flight finish with what they started with.
/// Listeners, the refresher's settings and webhooks need a restart.
#[derive(Clone)]
pub struct Reloader {
    state: Arc<ApiState>,
}

impl Reloader {
    pub fn reload(
        &self,
        config: tokenkeep_host::Config,
        settings: ServeSettings,
    ) -> Result<(), Error> {
        self.state.keeper.reload_config(config)?;
        *self.state.keys.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(settings.keys);
        Ok(())
    }
}

/// Mode of the Unix socket: its owner and group may connect (the key is
/// still required).
const SOCKET_MODE: u32 = 0o660;

/// The service with its listeners bound, not yet answering.
pub struct Server {
    listeners: Vec<Bound>,
    state: Arc<ApiState>,
    refresher: Option<RefresherSettings>,
    webhooks: Vec<Webhook>,
    event_retention_days: Option<u32>,
    drain: Duration,
}

enum Bound {
    Unix(UnixListener, PathBuf),
    Tcp(TcpListener),
}

/// The socket file this service bound: removed at exit only if it is still
/// that file (a service started meanwhile may have replaced it).
struct SocketFile {
    path: PathBuf,
    inode: Option<(u64, u64)>,
}

impl SocketFile {
    fn of(path: PathBuf) -> Self {
        let inode = file_id(&path);
        Self { path, inode }
    }

    fn remove(self) {
        if self.inode.is_some() && file_id(&self.path) == self.inode {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn file_id(path: &std::path::Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

impl Server {
    /// Binds every listener of `settings`; fails if one cannot be bound
    /// (a socket another live service answers on is not taken over).
    pub async fn bind(keeper: Arc<Keeper>, settings: ServeSettings) -> Result<Self, Error> {
        let mut listeners = Vec::new();
        for listen in &settings.listen {
            listeners.push(match listen {
                Listen::Unix(path) => Bound::Unix(bind_unix(path).await?, path.clone()),
                Listen::Tcp(addr) => Bound::Tcp(
                    TcpListener::bind(addr)
                        .await
                        .map_err(|e| Error::Config(format!("cannot listen on {listen}: {e}")))?,
                ),
            });
        }
        Ok(Self {
            listeners,
            refresher: settings.refresher,
            webhooks: settings.webhooks,
            event_retention_days: settings.event_retention_days,
            drain: settings.drain,
            state: Arc::new(ApiState {
                keeper,
                keys: std::sync::RwLock::new(Arc::new(settings.keys)),
                max_body_bytes: settings.max_body_bytes,
                connect_redirect: settings
                    .public_url
                    .as_ref()
                    .map(|u| format!("{u}{}", crate::api::CONNECT_CALLBACK)),
                metrics: crate::api::metrics_recorder()?,
                closed: Default::default(),
            }),
        })
    }

    /// What a reload (SIGHUP) replaces while the service answers.
    pub fn reloader(&self) -> Reloader {
        Reloader {
            state: self.state.clone(),
        }
    }

    /// Where the service answers (a TCP port 0 resolved to the port taken).
    pub fn addresses(&self) -> Vec<Listen> {
        self.listeners
            .iter()
            .filter_map(|l| match l {
                Bound::Unix(_, path) => Some(Listen::Unix(path.clone())),
                Bound::Tcp(t) => t.local_addr().ok().map(Listen::Tcp),
            })
            .collect()
    }

    /// Answers (and runs the background refresher) until `stop` completes;
    /// then stops accepting and planning, lets the requests in flight
    /// finish, waits for the keeper's refreshes in flight, and removes its
    /// Unix sockets.
    pub async fn run(self, stop: impl Future<Output = ()> + Send + 'static) -> Result<(), Error> {
        let app = router(self.state.clone()).route_layer(axum::middleware::from_fn(trace));
        let (stopping, stopped) = tokio::sync::watch::channel(false);
        let mut serving = tokio::task::JoinSet::new();
        let mut sockets = Vec::new();
        for listener in self.listeners {
            let mut stopped = stopped.clone();
            let signal = async move {
                let _ = stopped.wait_for(|s| *s).await;
            };
            let app = app.clone();
            match listener {
                Bound::Unix(l, path) => {
                    sockets.push(SocketFile::of(path));
                    serving.spawn(async move {
                        axum::serve(l, app).with_graceful_shutdown(signal).await
                    });
                }
                Bound::Tcp(l) => {
                    serving.spawn(async move {
                        axum::serve(l, app).with_graceful_shutdown(signal).await
                    });
                }
            }
        }
        let refreshing = self.refresher.map(|settings| {
            let refresher = Arc::new(Refresher::new(self.state.keeper.clone(), settings));
            let mut stopped = stopped.clone();
            tokio::spawn(refresher.run(async move {
                let _ = stopped.wait_for(|s| *s).await;
            }))
        });
        // Deliveries run until the stop, finishing the one in flight.
        let holder = format!(
            "{}-{}-{:x}",
            hostname(),
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos())
        );
        let mut delivering = tokio::task::JoinSet::new();
        for webhook in self.webhooks {
            delivering.spawn(crate::webhooks::deliver(
                self.state.keeper.clone(),
                webhook,
                holder.clone(),
                stopped.clone(),
            ));
        }
        if let Some(days) = self.event_retention_days {
            delivering.spawn(crate::webhooks::prune(
                self.state.keeper.clone(),
                days,
                stopped.clone(),
            ));
        }
        tokio::spawn(async move {
            stop.await;
            let _ = stopping.send(true);
        });
        let mut failed = None;
        // Requests in flight at the stop get the drain time; one whose
        // client never finishes it (a body that does not come) does not
        // hold the stop for ever.
        let mut drained = stopped.clone();
        let drain = self.drain;
        let deadline = async move {
            let _ = drained.wait_for(|s| *s).await;
            tokio::time::sleep(drain).await;
        };
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                done = serving.join_next() => match done {
                    None => break,
                    Some(Ok(Err(e))) => {
                        failed.get_or_insert(e);
                    }
                    Some(_) => {}
                },
                () = &mut deadline => {
                    // The connections still open run on (axum owns their
                    // tasks) until the process exits; none of their requests
                    // may start a refresh the keeper's shutdown would not
                    // wait for.
                    self.state.closed.store(true, std::sync::atomic::Ordering::SeqCst);
                    tracing::warn!(
                        drain_seconds = drain.as_secs(),
                        "requests still open when the drain time ran out were cut off"
                    );
                    serving.abort_all();
                    while serving.join_next().await.is_some() {}
                    break;
                }
            }
        }
        while delivering.join_next().await.is_some() {}
        // The refresher has stopped planning before the keeper waits for the
        // refreshes in flight: none starts after that wait.
        if let Some(refreshing) = refreshing {
            let _ = refreshing.await;
        }
        self.state.keeper.shutdown().await;
        for socket in sockets {
            socket.remove();
        }
        match failed {
            Some(e) => Err(Error::Config(format!("the listener failed: {e}"))),
            None => Ok(()),
        }
    }
}

/// Binds a Unix socket at `path`, replacing a stale socket file that no
/// live service answers on.
async fn bind_unix(path: &std::path::Path) -> Result<UnixListener, Error> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let fail =
        |e: std::io::Error| Error::Config(format!("cannot listen on unix:{}: {e}", path.display()));
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(fail)?;
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(Error::Config(format!(
                "cannot listen on unix:{}: a file that is not a socket is there",
                path.display()
            )));
        }
        // Stale only if nothing listens there: any other failure (a
        // socket we may not connect to) is someone else's live socket.
        match tokio::net::UnixStream::connect(path).await {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
            _ => {
                return Err(Error::Config(format!(
                    "cannot listen on unix:{}: another service answers there",
                    path.display()
                )));
            }
        }
        std::fs::remove_file(path).map_err(fail)?;
    }
    let listener = UnixListener::bind(path).map_err(fail)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(SOCKET_MODE)).map_err(fail)?;
    Ok(listener)
}

/// One span per request (method, route, the key's name once known) and
/// one line when it is answered: never a path's ids, a body or a header.
async fn trace(req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("-", |p| p.as_str())
        .to_owned();
    let span = tracing::info_span!(
        "request",
        method = %req.method(),
        route = %route,
        key = tracing::field::Empty,
    );
    let started = Instant::now();
    span.in_scope(|| tracing::debug!("request begun"));
    let response = next.run(req).instrument(span.clone()).await;
    let took = started.elapsed();
    tokenkeep_host::metrics::http_request(&route, response.status().as_u16(), took);
    span.in_scope(|| {
        tracing::info!(
            status = response.status().as_u16(),
            micros = took.as_micros() as u64,
            "answered"
        )
    });
    response
}

/// This machine's name, to tell lease holders apart in the database.
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "host".into())
}
