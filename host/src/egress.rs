//! The outbound HTTP policy: the component may reach the token URLs of
//! configured providers and nothing else, and never sees a client secret —
//! the host attaches client credentials on the way out.

use crate::config::{ClientAuth, Config, Provider};
use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use secrecy::ExposeSecret;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};
use wasmtime_wasi_http::{Error, RequestOptions, WasiBody, WasiHttpHooks};

/// The header naming the provider a request is for; set by the component,
/// removed here before the request leaves.
pub const PROVIDER_HEADER: &str = "x-tokenkeep-provider";

/// Largest refresh request the component may send.
const MAX_REQUEST_BYTES: usize = 64 * 1024;

type Io = Box<dyn Future<Output = Result<(), Error>> + Send>;
type Sent = Box<dyn Future<Output = Result<(http::Response<WasiBody>, Io), Error>> + Send>;

/// The `wasi:http` hooks of one store.
pub struct Egress {
    config: Arc<Config>,
}

impl Egress {
    pub fn new(config: Arc<Config>) -> Self {
        Self { config }
    }
}

impl WasiHttpHooks for Egress {
    fn send_request(
        &mut self,
        request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
        _fut: Io,
    ) -> Sent {
        let config = self.config.clone();
        Box::new(async move { send(&config, request, options).await })
    }
}

async fn send(
    config: &Config,
    request: http::Request<WasiBody>,
    options: Option<RequestOptions>,
) -> Result<(http::Response<WasiBody>, Io), Error> {
    let (mut parts, body) = request.into_parts();
    let name = parts
        .headers
        .remove(PROVIDER_HEADER)
        .and_then(|v| v.to_str().ok().map(str::to_owned));
    // Logged target: no query string, which could carry anything.
    let target = format!(
        "{}://{}{}",
        parts.uri.scheme_str().unwrap_or("?"),
        parts.uri.authority().map(|a| a.as_str()).unwrap_or("?"),
        parts.uri.path()
    );
    let provider = name.as_deref().and_then(|n| config.providers.get(n));
    let Some(provider) = provider.filter(|p| allowed(p, &parts.uri)) else {
        tracing::warn!(provider = name.as_deref().unwrap_or("-"), url = %target, "egress denied: not a configured token URL");
        return Err(Error::HttpRequestDenied);
    };
    if parts.method != http::Method::POST {
        tracing::warn!(provider = %provider.name, method = %parts.method, "egress denied: token requests are POSTs");
        return Err(Error::HttpRequestDenied);
    }

    let form = Limited::new(body, MAX_REQUEST_BYTES)
        .collect()
        .await
        .map_err(|_| Error::HttpRequestBodySize(None))?
        .to_bytes();
    let mut form = form.to_vec();
    attach_client_credentials(provider, &mut parts.headers, &mut form);
    parts.headers.remove(http::header::CONTENT_LENGTH);
    parts.headers.insert(
        http::header::CONTENT_LENGTH,
        http::HeaderValue::from(form.len()),
    );
    let body = Full::new(Bytes::from(form))
        .map_err(|never| match never {})
        .boxed_unsync();
    let request = http::Request::from_parts(parts, body);

    let started = Instant::now();
    let budget = Duration::from_millis(u64::from(provider.timeout_ms));
    let (response, io) = match tokio::time::timeout(
        budget,
        wasmtime_wasi_http::default_send_request(request, options),
    )
    .await
    {
        Ok(Ok(sent)) => sent,
        Ok(Err(e)) => {
            tracing::info!(provider = %provider.name, error = ?e, "token request failed");
            return Err(e);
        }
        Err(_) => {
            tracing::info!(provider = %provider.name, timeout_ms = provider.timeout_ms, "token request timed out");
            return Err(Error::HttpResponseTimeout);
        }
    };
    tracing::debug!(provider = %provider.name, status = response.status().as_u16(), elapsed_ms = started.elapsed().as_millis() as u64, "token request answered");
    // One byte over the component's cap, so it sees and reports the excess
    // while the host never buffers more.
    let cap = provider.max_response_bytes as usize + 1;
    let response = response.map(|b| {
        Limited::new(b, cap)
            .map_err(|e| match e.downcast::<Error>() {
                Ok(inner) => *inner,
                Err(_) => Error::HttpResponseBodySize(None),
            })
            .boxed_unsync()
    });
    Ok((response, Box::new(io) as Io))
}

/// Exactly the configured token URL: scheme, host, port, path and query.
fn allowed(provider: &Provider, uri: &http::Uri) -> bool {
    let (Ok(want), Ok(got)) = (
        url::Url::parse(&provider.token_url),
        url::Url::parse(&uri.to_string()),
    ) else {
        return false;
    };
    want.scheme() == got.scheme()
        && want.host() == got.host()
        && want.port_or_known_default() == got.port_or_known_default()
        && want.path() == got.path()
        && want.query() == got.query()
}

/// RFC 6749 section 2.3.1: in the body, or as HTTP Basic over the
/// form-encoded id and secret.
fn attach_client_credentials(
    provider: &Provider,
    headers: &mut http::HeaderMap,
    form: &mut Vec<u8>,
) {
    let mut push = |k: &str, v: &str| {
        let mut s = String::new();
        if !form.is_empty() {
            s.push('&');
        }
        s.push_str(k);
        s.push('=');
        s.push_str(&form_encode(v));
        form.extend_from_slice(s.as_bytes());
    };
    match (provider.client_auth, &provider.client_secret) {
        (ClientAuth::Basic, Some(secret)) => {
            let pair = format!(
                "{}:{}",
                form_encode(&provider.client_id),
                form_encode(secret.expose_secret())
            );
            let value = format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(pair)
            );
            if let Ok(mut v) = http::HeaderValue::from_str(&value) {
                v.set_sensitive(true);
                headers.insert(http::header::AUTHORIZATION, v);
            }
        }
        (_, secret) => {
            push("client_id", &provider.client_id);
            if let Some(secret) = secret {
                push("client_secret", secret.expose_secret());
            }
        }
    }
}

fn form_encode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Arc<Config> {
        Arc::new(
            Config::parse(
                "[providers.acme]\ntoken_url = \"https://auth.example/oauth/token\"\nclient_id = \"the client\"\nclient_secret = \"s3cret&=\"\n\
                 [providers.basic]\ntoken_url = \"https://auth.example/basic\"\nclient_id = \"id\"\nclient_secret = \"pw\"\nclient_auth = \"basic\"\n",
            )
            .unwrap(),
        )
    }

    fn request(provider: Option<&str>, method: &str, url: &str) -> http::Request<WasiBody> {
        let mut r = http::Request::builder().method(method).uri(url);
        if let Some(p) = provider {
            r = r.header(PROVIDER_HEADER, p);
        }
        r.body(
            Full::new(Bytes::from_static(b"grant_type=refresh_token"))
                .map_err(|never| match never {})
                .boxed_unsync(),
        )
        .unwrap()
    }

    #[tokio::test]
    async fn only_a_configured_providers_token_url_is_reachable() {
        let config = config();
        let denied = [
            (Some("acme"), "POST", "https://evil.example/oauth/token"),
            (Some("acme"), "POST", "https://auth.example/oauth/token2"),
            (Some("acme"), "POST", "http://auth.example/oauth/token"),
            (
                Some("acme"),
                "POST",
                "https://auth.example:8443/oauth/token",
            ),
            (Some("acme"), "POST", "https://auth.example/oauth/token?x=1"),
            (Some("acme"), "GET", "https://auth.example/oauth/token"),
            (Some("basic"), "POST", "https://auth.example/oauth/token"),
            (Some("nope"), "POST", "https://auth.example/oauth/token"),
            (None, "POST", "https://auth.example/oauth/token"),
        ];
        for (provider, method, url) in denied {
            let outcome = send(&config, request(provider, method, url), None).await;
            assert!(
                matches!(outcome, Err(Error::HttpRequestDenied)),
                "{method} {url} for {provider:?} must be denied"
            );
        }
    }

    #[test]
    fn client_credentials_are_attached_by_the_host() {
        let config = config();
        let mut headers = http::HeaderMap::new();
        let mut form = b"grant_type=refresh_token".to_vec();
        attach_client_credentials(&config.providers["acme"], &mut headers, &mut form);
        assert_eq!(
            String::from_utf8(form).unwrap(),
            "grant_type=refresh_token&client_id=the+client&client_secret=s3cret%26%3D"
        );
        assert!(headers.get(http::header::AUTHORIZATION).is_none());

        let mut form = b"grant_type=refresh_token".to_vec();
        attach_client_credentials(&config.providers["basic"], &mut headers, &mut form);
        assert_eq!(form, b"grant_type=refresh_token");
        let auth = headers.get(http::header::AUTHORIZATION).unwrap();
        assert!(auth.is_sensitive());
        assert_eq!(auth.to_str().unwrap(), "Basic aWQ6cHc=");
    }
}
