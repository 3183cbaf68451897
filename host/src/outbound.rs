//! How a token request reaches its provider: straight, or through the proxy
//! that `HTTPS_PROXY` names (an HTTP `CONNECT` tunnel) unless `NO_PROXY`
//! exempts the host; over TLS that trusts the public web roots, or only the
//! provider's own CA bundle when it has one. A certificate that is not
//! trusted is a configuration problem, not an outage: nothing was sent.

use base64::Engine as _;
use std::path::Path;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// A connection to a provider, TLS or not.
pub(crate) trait Stream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Stream for T {}

/// Why no connection came up. Either way nothing was sent.
#[derive(Debug)]
pub(crate) enum ConnectError {
    /// Could not reach the provider (or the proxy): safe to try again.
    Unreachable(String),
    /// The configuration cannot work as it is (an untrusted certificate, a
    /// proxy URL tokenkeep cannot use): an operator must act.
    Misconfigured(String),
}

/// The TLS settings of one provider: its CA bundle, or the web roots.
pub fn client_tls(ca_bundle: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_bundle {
        Some(path) => {
            use rustls_pki_types::pem::PemObject;
            let certs = rustls_pki_types::CertificateDer::pem_file_iter(path)
                .map_err(|e| format!("ca_bundle {}: {e}", path.display()))?;
            for cert in certs {
                let cert = cert.map_err(|e| format!("ca_bundle {}: {e}", path.display()))?;
                roots
                    .add(cert)
                    .map_err(|e| format!("ca_bundle {}: {e}", path.display()))?;
            }
            if roots.is_empty() {
                return Err(format!("ca_bundle {} holds no certificate", path.display()));
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| format!("TLS: {e}"))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Connects to `host:port` for `scheme`, through the environment's proxy
/// when it applies, and sets up TLS for `https`.
pub(crate) async fn connect(
    scheme: &str,
    host: &str,
    port: u16,
    tls: &Arc<rustls::ClientConfig>,
) -> Result<Box<dyn Stream>, ConnectError> {
    let https = scheme == "https";
    let proxy = if https { proxy_for(host, port)? } else { None };
    let unreachable = |e: std::io::Error| ConnectError::Unreachable(format!("{}", e.kind()));
    let tcp = match &proxy {
        Some(proxy) => {
            let mut tcp = TcpStream::connect((proxy.host.as_str(), proxy.port))
                .await
                .map_err(|e| ConnectError::Unreachable(format!("proxy: {}", e.kind())))?;
            tunnel(&mut tcp, proxy, host, port).await?;
            tcp
        }
        None => TcpStream::connect((host, port))
            .await
            .map_err(unreachable)?,
    };
    if !https {
        return Ok(Box::new(tcp));
    }
    let name = rustls_pki_types::ServerName::try_from(host.to_string())
        .map_err(|_| ConnectError::Misconfigured(format!("{host} is not a TLS server name")))?;
    match tokio_rustls::TlsConnector::from(tls.clone())
        .connect(name, tcp)
        .await
    {
        Ok(stream) => Ok(Box::new(stream)),
        Err(e) => Err(tls_error(e)),
    }
}

/// A certificate problem is the configuration's; anything else in the
/// handshake is the network's.
fn tls_error(e: std::io::Error) -> ConnectError {
    match e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        Some(rustls::Error::InvalidCertificate(why)) => ConnectError::Misconfigured(format!(
            "TLS: the provider's certificate is not trusted ({why:?}); \
             set ca_bundle if it is signed by a private CA"
        )),
        Some(other) => ConnectError::Unreachable(format!("TLS: {other}")),
        None => ConnectError::Unreachable(format!("TLS: {}", e.kind())),
    }
}

/// An HTTP proxy from the environment.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Proxy {
    host: String,
    port: u16,
    /// `Proxy-Authorization` for a proxy URL with user info.
    authorization: Option<String>,
}

/// The proxy for a request to `host:port` over https, if the environment
/// names one (`HTTPS_PROXY` or `https_proxy`) and `NO_PROXY` (or
/// `no_proxy`) does not exempt the host.
fn proxy_for(host: &str, port: u16) -> Result<Option<Proxy>, ConnectError> {
    let var = |names: [&str; 2]| {
        names
            .iter()
            .find_map(|n| std::env::var(n).ok().filter(|v| !v.trim().is_empty()))
    };
    let Some(url) = var(["HTTPS_PROXY", "https_proxy"]) else {
        return Ok(None);
    };
    if var(["NO_PROXY", "no_proxy"]).is_some_and(|list| exempt(&list, host, port)) {
        return Ok(None);
    }
    parse_proxy(&url).map(Some)
}

fn parse_proxy(url: &str) -> Result<Proxy, ConnectError> {
    // A bare host:port is an http proxy too, as curl reads it.
    let with_scheme = if url.contains("://") {
        url.to_string()
    } else {
        format!("http://{url}")
    };
    let bad = || ConnectError::Misconfigured("HTTPS_PROXY is not an http:// proxy URL".into());
    let parsed = url::Url::parse(&with_scheme).map_err(|_| bad())?;
    if parsed.scheme() != "http" {
        return Err(bad());
    }
    let host = parsed.host_str().ok_or_else(bad)?;
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let authorization = (!parsed.username().is_empty()).then(|| {
        let decode = |s: &str| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8_lossy()
                .into_owned()
        };
        let pair = format!(
            "{}:{}",
            decode(parsed.username()),
            decode(parsed.password().unwrap_or(""))
        );
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(pair)
        )
    });
    Ok(Proxy {
        host,
        port: parsed.port_or_known_default().unwrap_or(80),
        authorization,
    })
}

/// Whether `NO_PROXY` exempts `host:port`: `*`, the host itself, or a
/// domain it is under (`example.com` and `.example.com` both cover
/// `api.example.com`), each optionally with `:port`.
fn exempt(list: &str, host: &str, port: u16) -> bool {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    list.split(',')
        .map(|e| e.trim().to_ascii_lowercase())
        .filter(|e| !e.is_empty())
        .any(|entry| {
            if entry == "*" {
                return true;
            }
            let (name, entry_port) = match entry.rsplit_once(':') {
                Some((n, p)) if !n.contains(':') => (n.to_string(), p.parse::<u16>().ok()),
                _ => (entry.clone(), None),
            };
            if entry_port.is_some_and(|p| p != port) {
                return false;
            }
            let name = name.trim_start_matches('.').trim_end_matches('.');
            host == name || host.ends_with(&format!(".{name}"))
        })
}

/// Opens a `CONNECT` tunnel to `host:port` through the proxy.
async fn tunnel(
    tcp: &mut TcpStream,
    proxy: &Proxy,
    host: &str,
    port: u16,
) -> Result<(), ConnectError> {
    let mut request = format!("CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n");
    if let Some(auth) = &proxy.authorization {
        request.push_str(&format!("Proxy-Authorization: {auth}\r\n"));
    }
    request.push_str("\r\n");
    let lost = |e: std::io::Error| ConnectError::Unreachable(format!("proxy: {}", e.kind()));
    tcp.write_all(request.as_bytes()).await.map_err(lost)?;
    // The proxy's answer head, byte by byte so that nothing of the tunnel's
    // first bytes is read past it; bounded.
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() > 8 * 1024 {
            return Err(ConnectError::Unreachable("proxy: answer too long".into()));
        }
        let byte = tcp.read_u8().await.map_err(lost)?;
        head.push(byte);
    }
    let status = std::str::from_utf8(&head)
        .ok()
        .and_then(|h| h.split_whitespace().nth(1))
        .and_then(|s| s.parse::<u16>().ok());
    match status {
        Some(200..=299) => Ok(()),
        Some(407) => Err(ConnectError::Misconfigured(
            "the proxy wants credentials (407); put them in HTTPS_PROXY".into(),
        )),
        Some(code) => Err(ConnectError::Unreachable(format!(
            "proxy refused the tunnel (status {code})"
        ))),
        None => Err(ConnectError::Unreachable(
            "proxy: not an HTTP answer".into(),
        )),
    }
}

/// POSTs `body` to `url` (straight or through the environment's proxy,
/// TLS trusting the web roots) within `timeout`: the answer's status. For
/// the service's own deliveries (webhooks), never a token request.
pub async fn post(
    url: &str,
    headers: &[(&'static str, String)],
    body: Vec<u8>,
    timeout: std::time::Duration,
) -> Result<u16, String> {
    let mut headers = headers.to_vec();
    headers.push(("content-type", "application/json".into()));
    static WEB: std::sync::OnceLock<Result<Arc<rustls::ClientConfig>, String>> =
        std::sync::OnceLock::new();
    let tls = WEB.get_or_init(|| client_tls(None)).clone()?;
    // The status is the answer; its body is not read (a receiver may send
    // any amount): the connection is dropped with it.
    let exchange = async {
        let (response, driving) = send(http::Method::POST, url, &headers, body, &tls).await?;
        let status = response.status().as_u16();
        driving.abort();
        Ok(status)
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| format!("no answer within {} ms", timeout.as_millis()))?
}

/// An answer read whole: for metadata and registration, never a token.
pub struct Fetched {
    pub status: u16,
    pub content_type: Option<String>,
    pub body: Vec<u8>,
}

/// Sends a request to `url` with `tls` and reads the answer, at most
/// `max_bytes` of it, all within `timeout`: for discovery documents and
/// client registration.
pub async fn fetch(
    method: http::Method,
    url: &str,
    headers: &[(&'static str, String)],
    body: Vec<u8>,
    tls: &Arc<rustls::ClientConfig>,
    timeout: std::time::Duration,
    max_bytes: usize,
) -> Result<Fetched, String> {
    use http_body_util::BodyExt;
    let exchange = async {
        let (response, driving) = send(method, url, headers, body, tls).await?;
        // The connection's task ends with this read, however it ends
        // (an error, the timeout dropping it).
        let driving = AbortOnDrop(driving);
        let status = response.status().as_u16();
        let content_type = response
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let mut incoming = response.into_body();
        let mut body = Vec::new();
        while let Some(frame) = incoming.frame().await {
            let frame = frame.map_err(|e| format!("answer cut off: {e}"))?;
            if let Ok(data) = frame.into_data() {
                if body.len() + data.len() > max_bytes {
                    return Err(format!("answer larger than {max_bytes} bytes"));
                }
                body.extend_from_slice(&data);
            }
        }
        drop(driving);
        Ok(Fetched {
            status,
            content_type,
            body,
        })
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| format!("no answer within {} ms", timeout.as_millis()))?
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Opens a connection to `url`'s host and sends one request on it: the
/// answer's head, and the task that moves its bytes.
async fn send(
    method: http::Method,
    url: &str,
    headers: &[(&'static str, String)],
    body: Vec<u8>,
    tls: &Arc<rustls::ClientConfig>,
) -> Result<
    (
        http::Response<hyper::body::Incoming>,
        tokio::task::JoinHandle<()>,
    ),
    String,
> {
    use http_body_util::Full;
    let uri: http::Uri = url.parse().map_err(|_| "not a URI".to_string())?;
    let (Some(host), Some(scheme)) = (uri.host(), uri.scheme_str()) else {
        return Err("the URL has no host".into());
    };
    let port = uri
        .port_u16()
        .unwrap_or(if scheme == "https" { 443 } else { 80 });
    let authority = uri.authority().map_or(host, |a| a.as_str()).to_string();
    let target = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let mut request = http::Request::builder()
        .method(method)
        .uri(uri.path_and_query().map_or("/", |p| p.as_str()))
        .header(http::header::HOST, authority)
        .header(http::header::CONTENT_LENGTH, body.len());
    for (name, value) in headers {
        request = request.header(*name, value);
    }
    let request = request
        .body(Full::new(bytes::Bytes::from(body)))
        .map_err(|e| format!("request: {e}"))?;
    let stream = connect(scheme, &target, port, tls)
        .await
        .map_err(|e| match e {
            ConnectError::Unreachable(m) | ConnectError::Misconfigured(m) => m,
        })?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake::<_, Full<bytes::Bytes>>(
        wasmtime_wasi_http::io::TokioIo::new(stream),
    )
    .await
    .map_err(|e| format!("handshake: {e}"))?;
    let driving = tokio::spawn(async move {
        let _ = connection.await;
    });
    match sender.send_request(request).await {
        Ok(response) => Ok((response, driving)),
        Err(e) => {
            driving.abort();
            Err(format!("request: {e}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_proxy_matches_hosts_domains_ports_and_star() {
        assert!(exempt("*", "auth.example.com", 443));
        assert!(exempt("example.com", "auth.example.com", 443));
        assert!(exempt(".example.com", "auth.example.com", 443));
        assert!(exempt("Auth.Example.com", "auth.example.com", 443));
        assert!(exempt("127.0.0.1", "127.0.0.1", 8443));
        assert!(exempt("example.com:443", "example.com", 443));
        assert!(!exempt("example.com:8443", "example.com", 443));
        assert!(!exempt("ample.com", "example.com", 443));
        assert!(!exempt("other.com, example.org", "example.com", 443));
    }

    #[test]
    fn proxy_urls_are_read_like_curl_reads_them() {
        let p = parse_proxy("http://user:pw@proxy.internal:3128").unwrap();
        assert_eq!((p.host.as_str(), p.port), ("proxy.internal", 3128));
        assert_eq!(p.authorization.as_deref(), Some("Basic dXNlcjpwdw=="));
        let bare = parse_proxy("proxy.internal:8080").unwrap();
        assert_eq!(
            (bare.host.as_str(), bare.port, bare.authorization),
            ("proxy.internal", 8080, None)
        );
        assert!(matches!(
            parse_proxy("socks5://proxy:1080"),
            Err(ConnectError::Misconfigured(_))
        ));
    }
}
