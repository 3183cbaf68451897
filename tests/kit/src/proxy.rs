//! A TCP forwarder owned by a test, standing between a runtime and its
//! database: it can stop forwarding without closing anything, which is
//! what a partition or a dropped NAT entry looks like to both ends. It also
//! counts round trips: the times a client speaks after its server did.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// A running forwarder to one target.
pub struct BlackHoleProxy {
    addr: SocketAddr,
    /// Connections accepted before this epoch are black-holed.
    cut: watch::Sender<u64>,
    /// Black-holed sockets, kept open (never read, never closed) until the
    /// proxy is dropped.
    swallowed: Arc<Mutex<Vec<TcpStream>>>,
    accepting: tokio::task::JoinHandle<()>,
    turns: Arc<AtomicU64>,
}

impl BlackHoleProxy {
    /// Listens on 127.0.0.1 and forwards every connection to `target`.
    pub async fn start(target: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let cut = watch::Sender::new(0u64);
        let swallowed = Arc::new(Mutex::new(Vec::new()));
        let (epochs, holes) = (cut.clone(), swallowed.clone());
        let turns = Arc::new(AtomicU64::new(0));
        let counted = turns.clone();
        let accepting = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(target).await else {
                    continue;
                };
                let epoch = epochs.subscribe();
                let holes = holes.clone();
                tokio::spawn(forward(client, server, epoch, holes, counted.clone()));
            }
        });
        Ok(Self {
            addr,
            cut,
            swallowed,
            accepting,
            turns,
        })
    }

    /// Round trips over every connection so far: each time a client sent
    /// something after its server last did (or first). Requests a client
    /// pipelines before the answer comes count once.
    pub fn round_trips(&self) -> u64 {
        self.turns.load(Ordering::SeqCst)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `url` (a `postgres://` URL) with its host and port replaced by the proxy's.
    pub fn url_through(&self, url: &str) -> String {
        let mut u = url::Url::parse(url).expect("a database URL");
        u.set_host(Some("127.0.0.1")).expect("a host");
        u.set_port(Some(self.addr.port())).expect("a port");
        u.to_string()
    }

    /// Every connection open now stops forwarding in both directions, with
    /// both ends left open; connections made later are forwarded.
    pub fn black_hole_existing(&self) {
        self.cut.send_modify(|epoch| *epoch += 1);
    }
}

impl Drop for BlackHoleProxy {
    fn drop(&mut self) {
        self.accepting.abort();
        self.swallowed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }
}

async fn forward(
    mut client: TcpStream,
    mut server: TcpStream,
    mut epoch: watch::Receiver<u64>,
    swallowed: Arc<Mutex<Vec<TcpStream>>>,
    turns: Arc<AtomicU64>,
) {
    let born = *epoch.borrow_and_update();
    // Whether the client spoke last.
    let mut client_last = false;
    let (mut up, mut down) = ([0u8; 8192], [0u8; 8192]);
    loop {
        tokio::select! {
            changed = epoch.changed() => {
                if changed.is_err() || *epoch.borrow() > born {
                    break;
                }
            }
            n = client.read(&mut up) => match n {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if !std::mem::replace(&mut client_last, true) {
                        turns.fetch_add(1, Ordering::SeqCst);
                    }
                    if server.write_all(&up[..n]).await.is_err() { return }
                }
            },
            n = server.read(&mut down) => match n {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    client_last = false;
                    if client.write_all(&down[..n]).await.is_err() { return }
                }
            },
        }
    }
    let mut holes = swallowed.lock().unwrap_or_else(|p| p.into_inner());
    holes.push(client);
    holes.push(server);
}

/// An HTTP proxy that opens `CONNECT` tunnels, as corporate egress proxies
/// do, and counts them.
pub struct ConnectProxy {
    addr: SocketAddr,
    tunnels: Arc<std::sync::atomic::AtomicU64>,
    accepting: tokio::task::JoinHandle<()>,
}

impl ConnectProxy {
    pub async fn start() -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let tunnels = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counted = tunnels.clone();
        let accepting = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let counted = counted.clone();
                tokio::spawn(async move {
                    let _ = tunnel(client, counted).await;
                });
            }
        });
        Ok(Self {
            addr,
            tunnels,
            accepting,
        })
    }

    /// `http://127.0.0.1:PORT`, for `HTTPS_PROXY`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Tunnels opened so far.
    pub fn tunnels(&self) -> u64 {
        self.tunnels.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for ConnectProxy {
    fn drop(&mut self) {
        self.accepting.abort();
    }
}

async fn tunnel(
    mut client: TcpStream,
    tunnels: Arc<std::sync::atomic::AtomicU64>,
) -> std::io::Result<()> {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") && head.len() < 8192 {
        head.push(client.read_u8().await?);
    }
    let text = String::from_utf8_lossy(&head).to_string();
    let mut words = text.split_whitespace();
    let (Some("CONNECT"), Some(target)) = (words.next(), words.next()) else {
        return client
            .write_all(b"HTTP/1.1 405 Method Not Allowed\r\ncontent-length: 0\r\n\r\n")
            .await;
    };
    let Ok(mut server) = TcpStream::connect(target).await else {
        return client
            .write_all(b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\n\r\n")
            .await;
    };
    tunnels.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    client
        .write_all(b"HTTP/1.1 200 Connection Established\r\n\r\n")
        .await?;
    tokio::io::copy_bidirectional(&mut client, &mut server).await?;
    Ok(())
}
