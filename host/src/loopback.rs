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

    /// Waits for the redirect whose `state` `is_ours` accepts, and reads
    /// it. Anything else (a browser's favicon, a local process guessing
    /// the port, a redirect of another attempt) gets a 404 and the wait
    /// goes on; connections are served side by side, so one that sends
    /// nothing holds up no other.
    pub async fn receive(self, is_ours: impl Fn(&str) -> bool) -> Result<Callback, Error> {
        let (tx, mut rx) = tokio::sync::mpsc::channel(16);
        let mut reading = tokio::task::JoinSet::new();
        loop {
            tokio::select! {
                accepted = self.listener.accept() => {
                    let (mut stream, _) = accepted
                        .map_err(|e| Error::Config(format!("loopback listener: {e}")))?;
                    let tx = tx.clone();
                    reading.spawn(async move {
                        let read = tokio::time::timeout(REQUEST_WAIT, read_request_target(&mut stream));
                        if let Ok(Some(target)) = read.await {
                            let _ = tx.send((stream, target)).await;
                        }
                    });
                }
                Some((mut stream, target)) = rx.recv() => {
                    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
                    let callback = Callback::from_query(query);
                    if path != CALLBACK_PATH || !callback.state.as_deref().is_some_and(&is_ours) {
                        let _ = stream
                            .write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                            .await;
                        continue;
                    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    async fn get(port: u16, target: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        s.write_all(format!("GET {target} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).await.unwrap();
        answer
    }

    #[tokio::test]
    async fn only_the_redirect_with_our_state_is_taken_and_a_silent_connection_holds_up_nothing() {
        let loopback = Loopback::bind(0).await.unwrap();
        let port: u16 = loopback
            .redirect_uri()
            .trim_start_matches("http://127.0.0.1:")
            .trim_end_matches("/callback")
            .parse()
            .unwrap();
        let waiting = tokio::spawn(loopback.receive(|s| s == "ours"));
        // A connection that never sends anything.
        let _silent = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        assert!(get(port, "/favicon.ico").await.starts_with("HTTP/1.1 404"));
        assert!(
            get(port, "/callback?code=theirs&state=guess")
                .await
                .starts_with("HTTP/1.1 404")
        );
        assert!(
            get(port, "/callback?code=good&state=ours")
                .await
                .starts_with("HTTP/1.1 200")
        );
        let callback = waiting.await.unwrap().unwrap();
        assert_eq!(callback.code.unwrap().expose_secret(), "good");
    }
}
