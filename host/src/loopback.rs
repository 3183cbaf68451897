//! The redirect of a native app (RFC 8252 section 7.3): a listener on
//! 127.0.0.1 that receives the one request the user's browser makes after
//! authorising, and answers it with a page saying the window can close.

use crate::error::Error;
use crate::grants::Callback;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// The path of the redirect URI.
const CALLBACK_PATH: &str = "/callback";
/// The most a browser's request line and headers may take.
const MAX_REQUEST_BYTES: usize = 16 * 1024;
/// How long one connection may take to send its request.
const REQUEST_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// A listener waiting for the redirect.
pub struct Loopback {
    listener: TcpListener,
    redirect_uri: String,
}

impl Loopback {
    /// Listens on 127.0.0.1 at `port` (0: any free port).
    pub async fn bind(port: u16) -> Result<Self, Error> {
        let listener = TcpListener::bind(("127.0.0.1", port))
            .await
            .map_err(|e| Error::Config(format!("cannot listen on 127.0.0.1:{port}: {e}")))?;
        let port = listener
            .local_addr()
            .map_err(|e| Error::Config(format!("loopback listener: {e}")))?
            .port();
        Ok(Self {
            listener,
            redirect_uri: format!("http://127.0.0.1:{port}{CALLBACK_PATH}"),
        })
    }

    /// The redirect URI to register and send.
    pub fn redirect_uri(&self) -> &str {
        &self.redirect_uri
    }

    /// Waits for the redirect and reads it. Requests for other paths (a
    /// browser's favicon) get a 404 and the wait goes on.
    pub async fn receive(self) -> Result<Callback, Error> {
        loop {
            let (mut stream, _) = self
                .listener
                .accept()
                .await
                .map_err(|e| Error::Config(format!("loopback listener: {e}")))?;
            // A connection that sends nothing does not hold up the browser's.
            let read = tokio::time::timeout(REQUEST_WAIT, read_request_target(&mut stream));
            let Ok(Some(target)) = read.await else {
                continue;
            };
            let (path, query) = target.split_once('?').unwrap_or((&target, ""));
            if path != CALLBACK_PATH {
                let _ = stream
                    .write_all(
                        b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                    )
                    .await;
                continue;
            }
            let callback = Callback::from_query(query);
            let page: &[u8] = if callback.error.is_some() {
                b"<!doctype html><title>tokenkeep</title><p>The authorisation was not granted. You can close this window."
            } else {
                b"<!doctype html><title>tokenkeep</title><p>Authorised. You can close this window."
            };
            let head = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: text/html; charset=utf-8\r\ncontent-length: {}\r\ncache-control: no-store\r\nconnection: close\r\n\r\n",
                page.len()
            );
            let _ = stream.write_all(head.as_bytes()).await;
            let _ = stream.write_all(page).await;
            let _ = stream.shutdown().await;
            return Ok(callback);
        }
    }
}

/// The target of a `GET` request (`/callback?code=...`), or none for
/// anything else.
async fn read_request_target(stream: &mut tokio::net::TcpStream) -> Option<String> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 2048];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        if buf.len() > MAX_REQUEST_BYTES {
            return None;
        }
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let line = buf.split(|b| *b == b'\n').next()?;
    let line = std::str::from_utf8(line).ok()?.trim_end();
    let mut parts = line.split(' ');
    match (parts.next(), parts.next()) {
        (Some("GET"), Some(target)) => Some(target.to_string()),
        _ => None,
    }
}
