//! The one request the component may have sent: a refresh of the row its
//! transaction holds locked (WIT `token-endpoint`). The host builds it from
//! the row and the configuration alone: `grant_type=refresh_token`, the
//! row's own refresh token (opened here), the configured parameters and the
//! client credentials, POSTed to the configured token URL within the
//! provider's total time and size bounds. `wasi:http` is linked only to
//! refuse: nothing the component addresses itself leaves the host.

use crate::config::{ClientAuth, Provider};
use crate::outbound::ConnectError;
use crate::provider_connections::{Open, Origin, ProviderConnections};
use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use secrecy::{ExposeSecret, SecretString};
use std::future::Future;
use std::hash::{BuildHasher, Hash};
use std::time::Duration;
use tokenkeep_core::model::{HttpAnswer, RequestError, SealedRow};
use tokenkeep_core::provider::{form_encode_into, refresh_request_body};
use wasmtime_wasi_http::{Error, RequestOptions, WasiBody, WasiHttpHooks};

type Io = Box<dyn Future<Output = Result<(), Error>> + Send>;
type Sent = Box<dyn Future<Output = Result<(http::Response<WasiBody>, Io), Error>> + Send>;

/// A short fingerprint of what a guest asked for, so that a refusal can be
/// correlated without writing the guest's bytes (a channel out of the
/// sandbox) into the log. Keyed per process, so a guest cannot choose
/// inputs whose fingerprints spell something.
pub fn fingerprint(what: &impl Hash) -> String {
    static KEYS: std::sync::OnceLock<std::collections::hash_map::RandomState> =
        std::sync::OnceLock::new();
    format!("{:016x}", KEYS.get_or_init(Default::default).hash_one(what))
}

/// `wasi:http` hooks that refuse every request, logging the first of a call.
#[derive(Debug, Default)]
pub struct DenyAllHttp {
    logged: bool,
}

impl WasiHttpHooks for DenyAllHttp {
    fn send_request(
        &mut self,
        request: http::Request<WasiBody>,
        _options: Option<RequestOptions>,
        _fut: Io,
    ) -> Sent {
        if !std::mem::replace(&mut self.logged, true) {
            let asked = fingerprint(&(request.method().as_str(), request.uri().to_string()));
            tracing::warn!(
                request = %asked,
                "egress denied: the component may not send HTTP requests of its own"
            );
        }
        Box::new(async { Err(Error::HttpRequestDenied) })
    }
}

/// What renews a row's tokens: its refresh token, or (for a machine
/// client) the client's own credentials.
pub enum Renewal<'a> {
    RefreshToken(&'a SecretString),
    ClientCredentials,
    /// RFC 8693, with the same user's access token at the subject provider.
    TokenExchange(&'a SecretString),
}

/// Sends the renewal of `locked`, the row `txn` holds locked.
pub async fn request_refresh(
    connections: &ProviderConnections,
    provider: &Provider,
    locked: &SealedRow,
    txn: &mut crate::storage::Transaction,
    renewal: Renewal<'_>,
    dpop: Option<Dpop<'_>>,
) -> Result<HttpAnswer, RequestError> {
    // Durably, before the request leaves: if this runtime dies before its
    // commit, the next one can tell a lost rotation from a revocation. And
    // right before the token is spent, the lock is still ours: a database
    // that ended our session (it looked abandoned) has let another runtime
    // take the row, which may be spending the same token.
    txn.start_refresh(&locked.provider, &locked.user_id, locked.generation)
        .await
        .map_err(|e| RequestError::NotSent(format!("the refresh could not be started: {e}")))?;
    let form = match renewal {
        Renewal::RefreshToken(token) => {
            let mut form = Form::from(refresh_request_body(token, &[]));
            form.grant_params(provider);
            form
        }
        Renewal::ClientCredentials => client_credentials_form(provider),
        Renewal::TokenExchange(subject) => token_exchange_form(provider, subject),
    };
    send_form(connections, provider, &provider.token_url, form, dpop).await
}

/// The client-credentials grant's request: the configured scopes and
/// parameters.
pub(crate) fn client_credentials_form(provider: &Provider) -> Form {
    let mut form = Form::new("client_credentials");
    if !provider.scopes.is_empty() {
        form.push("scope", &provider.scopes.join(" "));
    }
    form.grant_params(provider);
    form
}

/// The token exchange's request (RFC 8693 section 2.1): the subject's
/// access token, and the configured audience, scopes and parameters.
pub(crate) fn token_exchange_form(provider: &Provider, subject: &SecretString) -> Form {
    let mut form = Form::new(TOKEN_EXCHANGE_GRANT);
    form.push("subject_token", subject.expose_secret());
    form.push("subject_token_type", ACCESS_TOKEN_TYPE);
    form.push("requested_token_type", ACCESS_TOKEN_TYPE);
    if let Some(audience) = &provider.audience {
        form.push("audience", audience);
    }
    if !provider.scopes.is_empty() {
        form.push("scope", &provider.scopes.join(" "));
    }
    form.grant_params(provider);
    form
}

/// RFC 8693's grant type and the token type of access tokens.
const TOKEN_EXCHANGE_GRANT: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
const ACCESS_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:access_token";

/// A form body for the authorisation server. It may carry a token or a
/// code, so it is kept as a secret.
#[derive(Clone)]
pub struct Form(SecretString);

impl From<SecretString> for Form {
    fn from(body: SecretString) -> Self {
        Self(body)
    }
}

impl Form {
    /// A token request for `grant_type`.
    pub fn new(grant_type: &str) -> Self {
        let mut form = Self(SecretString::from(String::new()));
        form.push("grant_type", grant_type);
        form
    }

    /// An empty form (revocation, device authorisation).
    pub fn empty() -> Self {
        Self(SecretString::from(String::new()))
    }

    pub fn push(&mut self, name: &str, value: &str) {
        let mut body = self.0.expose_secret().to_string();
        if !body.is_empty() {
            body.push('&');
        }
        form_encode_into(&mut body, name);
        body.push('=');
        form_encode_into(&mut body, value);
        self.0 = body.into();
    }

    /// What every token request of the provider carries: its configured
    /// parameters and its resource indicator (RFC 8707), except a name the
    /// request already has (RFC 6749 §3.2: no parameter twice).
    pub fn grant_params(&mut self, provider: &Provider) {
        let resource = provider.resource.iter().map(|r| ("resource", r.as_str()));
        let extra = provider
            .extra_params
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()));
        for (k, v) in extra.chain(resource) {
            if !self.has(k) {
                self.push(k, v);
            }
        }
    }

    /// Whether the form has a parameter of this name.
    fn has(&self, name: &str) -> bool {
        let mut encoded = String::new();
        form_encode_into(&mut encoded, name);
        self.0
            .expose_secret()
            .split('&')
            .any(|pair| pair.split('=').next() == Some(encoded.as_str()))
    }
}

/// POSTs a form to one of the provider's endpoints with the client's
/// authentication, bounded by the provider's total time (connect to last
/// byte) and response size. With `dpop`, the request carries a proof made
/// with the row's key, and the server's nonce: a server that asks for a
/// (new) nonce gets the request once more with it, which is safe because
/// it refused the first before acting on it (RFC 9449 section 8).
pub async fn send_form(
    connections: &ProviderConnections,
    provider: &Provider,
    url: &str,
    form: Form,
    dpop: Option<Dpop<'_>>,
) -> Result<HttpAnswer, RequestError> {
    // One deadline for the request and any repeat: the provider's total
    // time is what lock waits and retry budgets count on.
    let deadline =
        tokio::time::Instant::now() + Duration::from_millis(u64::from(provider.timeout_ms));
    let Some(dpop) = dpop else {
        return post_form(connections, provider, url, form, None, deadline)
            .await
            .map(|(answer, _)| answer);
    };
    let prove = async |nonce: Option<&str>| {
        let proof = dpop
            .key
            .proof("POST", url, None, nonce)
            .map_err(RequestError::Misconfigured)?;
        let (answer, given) = post_form(
            connections,
            provider,
            url,
            form.clone(),
            Some(proof),
            deadline,
        )
        .await?;
        if let Some(given) = &given {
            dpop.nonces.set_nonce(&provider.name, given);
        }
        Ok::<_, RequestError>((answer, given))
    };
    let nonce = dpop.nonces.nonce(&provider.name);
    let (answer, given) = prove(nonce.as_deref()).await?;
    match given {
        Some(given)
            if given.as_str() != nonce.as_deref().unwrap_or_default()
                && oauth_error(&answer).as_deref() == Some("use_dpop_nonce") =>
        {
            prove(Some(&given)).await.map(|(answer, _)| answer)
        }
        _ => Ok(answer),
    }
}

/// A row's proof key and the nonces its provider gave, for [`send_form`].
#[derive(Clone, Copy)]
pub struct Dpop<'a> {
    pub key: &'a crate::dpop::ProofKey,
    pub nonces: &'a crate::dpop::ProofKeys,
}

/// An OAuth error answer's `error` code (RFC 6749 section 5.2), when it
/// is one that may be repeated into messages.
pub(crate) fn oauth_error(answer: &HttpAnswer) -> Option<String> {
    if (200..300).contains(&answer.status) {
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(answer.body.expose_secret()).ok()?;
    let code = v.get("error")?.as_str()?;
    // A code is a short token of printable ASCII; anything else is not
    // repeated into messages.
    (code.len() <= 64 && code.bytes().all(|b| b.is_ascii_graphic())).then(|| code.to_string())
}

/// One POST of [`send_form`]: the answer, and the `DPoP-Nonce` it gave.
async fn post_form(
    connections: &ProviderConnections,
    provider: &Provider,
    url: &str,
    form: Form,
    proof: Option<String>,
    deadline: tokio::time::Instant,
) -> Result<(HttpAnswer, Option<String>), RequestError> {
    let mut form = form;
    let mut headers = http::HeaderMap::new();
    attach_client_credentials(provider, &mut headers, &mut form)?;
    if let Some(proof) = proof {
        let mut value = http::HeaderValue::from_str(&proof)
            .map_err(|_| RequestError::Misconfigured("the DPoP proof is not a header".into()))?;
        value.set_sensitive(true);
        headers.insert(DPOP, value);
    }
    let form = form.0.expose_secret().as_bytes().to_vec();
    let uri: http::Uri = url
        .parse()
        .map_err(|_| RequestError::Denied("the configured URL is not a valid URI".into()))?;
    // HTTP/1.1 requires Host (host and port, never user info); hyper's
    // client connection does not add it.
    let (Some(host_name), Some(scheme)) = (uri.host(), uri.scheme_str()) else {
        return Err(RequestError::Denied(
            "the configured URL has no host".into(),
        ));
    };
    let host = match uri.port_u16() {
        Some(port) => format!("{host_name}:{port}"),
        None => host_name.to_string(),
    };
    let port = uri
        .port_u16()
        .unwrap_or(if scheme == "https" { 443 } else { 80 });
    let target = host_name
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    // Origin-form on the wire: the path and query only.
    let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_string();
    let mut request = http::Request::builder()
        .method(http::Method::POST)
        .uri(path)
        .header(http::header::HOST, host)
        .header(
            http::header::CONTENT_TYPE,
            "application/x-www-form-urlencoded",
        )
        .header(http::header::ACCEPT, "application/json")
        .header(http::header::CONTENT_LENGTH, form.len())
        .body(Full::new(Bytes::from(form)))
        .map_err(|_| RequestError::Denied("the configured URL is not a valid URI".into()))?;
    request.headers_mut().extend(headers);

    let total = deadline.saturating_duration_since(tokio::time::Instant::now());
    let started = std::time::Instant::now();
    let origin = Origin::trusting(&provider.name, scheme, &target, port, &provider.tls);
    let (response, open) = loop {
        let (mut open, reused) = match connections.take(&origin) {
            Some(open) => (open, true),
            None => (
                connect(provider, scheme, &target, port, total).await?,
                false,
            ),
        };
        match tokio::time::timeout_at(deadline, open.sender.try_send_request(request)).await {
            Ok(Ok(response)) => break (response, open),
            Ok(Err(mut e)) => match e.take_message() {
                // A kept connection the server closed meanwhile: nothing
                // was written, so the request goes out on a new one.
                Some(unsent) if reused => request = unsent,
                Some(_) => {
                    tracing::info!(provider = %provider.name, "token request not sent: the connection closed");
                    return Err(RequestError::NotSent("the connection closed".into()));
                }
                None => {
                    let e = e.into_error();
                    tracing::info!(provider = %provider.name, error = %e, "token request failed");
                    return Err(RequestError::NoAnswer(format!("no answer: {}", short(&e))));
                }
            },
            Err(_) => {
                tracing::info!(provider = %provider.name, timeout_ms = provider.timeout_ms, "token request timed out");
                return Err(RequestError::NoAnswer("timed out".into()));
            }
        }
    };
    let status = response.status().as_u16();
    // Delta-seconds only; an HTTP-date is rare at token endpoints and is
    // left to the backoff.
    let retry_after = response
        .headers()
        .get(http::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u32>().ok());
    let header = |name| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let content_type = header(http::header::CONTENT_TYPE);
    let nonce = header(DPOP_NONCE).filter(|n| is_nonce(n));
    let cap = provider.max_response_bytes as usize;
    let mut body = response.into_body();
    let mut buf = Vec::new();
    let read = async {
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| format!("answer cut off: {}", short(&e)))?;
            if let Ok(data) = frame.into_data() {
                if buf.len() + data.len() > cap {
                    return Err(format!("answer larger than {cap} bytes"));
                }
                buf.extend_from_slice(&data);
            }
        }
        Ok(())
    };
    match tokio::time::timeout_at(deadline, read).await {
        Ok(Ok(())) => {}
        // The provider answered, so it has likely acted on the request:
        // never repeated.
        Ok(Err(why)) => return Err(RequestError::AnswerUnusable(why)),
        Err(_) => {
            return Err(RequestError::AnswerUnusable(format!(
                "answer cut off after {} bytes: timed out",
                buf.len()
            )));
        }
    }
    tracing::debug!(provider = %provider.name, status, elapsed_ms = started.elapsed().as_millis() as u64, "token request answered");
    // Read to the end: the connection can carry the next refresh.
    connections.put(origin, open);
    Ok((
        HttpAnswer {
            status,
            content_type,
            retry_after,
            body: buf.into(),
        },
        nonce,
    ))
}

/// RFC 9449's headers: the proof, and the server's nonce.
const DPOP: http::HeaderName = http::HeaderName::from_static("dpop");
const DPOP_NONCE: http::HeaderName = http::HeaderName::from_static("dpop-nonce");

/// A nonce as RFC 9449 section 8.1 allows it (NQCHAR), of a bounded length:
/// it goes into the next proof.
fn is_nonce(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 512
        && n.bytes()
            .all(|b| matches!(b, 0x21 | 0x23..=0x5b | 0x5d..=0x7e))
}

/// Opens a connection to the token endpoint. Connecting gets half the
/// budget, so that a connection that never came up ends as "not sent" (safe
/// to repeat) before the whole deadline, which means "sent, no answer".
async fn connect(
    provider: &Provider,
    scheme: &str,
    target: &str,
    port: u16,
    total: Duration,
) -> Result<Open, RequestError> {
    let connecting = async {
        let stream = crate::outbound::connect(scheme, target, port, &provider.tls).await?;
        hyper::client::conn::http1::handshake::<_, Full<Bytes>>(
            wasmtime_wasi_http::io::TokioIo::new(stream),
        )
        .await
        .map_err(|e| ConnectError::Unreachable(format!("handshake: {e}")))
    };
    match tokio::time::timeout(total / 2, connecting).await {
        // The connection's own task moves the bytes while we read.
        Ok(Ok((sender, connection))) => Ok(Open::new(
            sender,
            tokio::spawn(async move {
                let _ = connection.await;
            }),
        )),
        Ok(Err(ConnectError::Misconfigured(why))) => {
            tracing::warn!(provider = %provider.name, "token request not sent: {why}");
            Err(RequestError::Misconfigured(why))
        }
        Ok(Err(ConnectError::Unreachable(why))) => {
            tracing::info!(provider = %provider.name, "token request failed: {why}");
            Err(RequestError::NotSent(format!(
                "the provider could not be reached: {why}"
            )))
        }
        Err(_) => {
            tracing::info!(provider = %provider.name, timeout_ms = provider.timeout_ms, "token request: connect timed out");
            Err(RequestError::NotSent("connect timed out".into()))
        }
    }
}

/// An error's kind, short, for messages (never a body).
fn short(e: &hyper::Error) -> String {
    let mut name = e.to_string();
    name.truncate(80);
    name
}

/// RFC 6749 section 2.3.1 (in the body, or as HTTP Basic over the
/// form-encoded id and secret), RFC 7523 (a signed assertion), or the
/// client id alone for a public client.
fn attach_client_credentials(
    provider: &Provider,
    headers: &mut http::HeaderMap,
    form: &mut Form,
) -> Result<(), RequestError> {
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
        (ClientAuth::PrivateKeyJwt, _) => {
            let key = provider.signing_key.as_ref().ok_or_else(|| {
                RequestError::Misconfigured("private_key_jwt without a signing key".into())
            })?;
            let assertion = key
                .assertion(&provider.client_id, &provider.token_url)
                .map_err(RequestError::Misconfigured)?;
            form.push("client_id", &provider.client_id);
            form.push(
                "client_assertion_type",
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            );
            form.push("client_assertion", assertion.expose_secret());
        }
        (_, secret) => {
            form.push("client_id", &provider.client_id);
            if let Some(secret) = secret {
                form.push("client_secret", secret.expose_secret());
            }
        }
    }
    Ok(())
}

fn form_encode(s: &str) -> String {
    let mut out = String::new();
    form_encode_into(&mut out, s);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn config() -> Config {
        Config::parse(
            "[providers.acme]\ntoken_url = \"https://auth.example/oauth/token\"\nclient_id = \"the client\"\nclient_secret = \"s3cret&=\"\n\
             [providers.basic]\ntoken_url = \"https://auth.example/basic\"\nclient_id = \"id\"\nclient_secret = \"pw\"\nclient_auth = \"basic\"\n",
        )
        .unwrap()
    }

    #[tokio::test]
    async fn the_component_may_send_no_http_request_of_its_own() {
        for (method, url) in [
            ("POST", "https://auth.example/oauth/token"),
            ("GET", "http://127.0.0.1:1/anything"),
        ] {
            let request = http::Request::builder()
                .method(method)
                .uri(url)
                .body(
                    Full::new(Bytes::from_static(b"grant_type=client_credentials"))
                        .map_err(|never| match never {})
                        .boxed_unsync(),
                )
                .unwrap();
            let sent =
                DenyAllHttp::default().send_request(request, None, Box::new(async { Ok(()) }));
            assert!(matches!(
                Box::into_pin(sent).await,
                Err(Error::HttpRequestDenied)
            ));
        }
    }

    #[test]
    fn client_credentials_are_attached_by_the_host() {
        let config = config();
        let mut headers = http::HeaderMap::new();
        let mut form = Form::new("refresh_token");
        attach_client_credentials(&config.providers["acme"], &mut headers, &mut form).unwrap();
        assert_eq!(
            form.0.expose_secret(),
            "grant_type=refresh_token&client_id=the+client&client_secret=s3cret%26%3D"
        );
        assert!(headers.get(http::header::AUTHORIZATION).is_none());

        let mut form = Form::new("refresh_token");
        attach_client_credentials(&config.providers["basic"], &mut headers, &mut form).unwrap();
        assert_eq!(form.0.expose_secret(), "grant_type=refresh_token");
        let auth = headers.get(http::header::AUTHORIZATION).unwrap();
        assert!(auth.is_sensitive());
        assert_eq!(auth.to_str().unwrap(), "Basic aWQ6cHc=");
    }
}
