//! The token request over `wasi:http/outgoing-handler`, bounded in time and size.

use crate::error::RefreshError;
use crate::model::{HttpAnswer, PostFailure, ProviderConfig};
use secrecy::{ExposeSecret, SecretString};
use wasip2::http::outgoing_handler;
use wasip2::http::types::{
    ErrorCode, Fields, Method, OutgoingBody, OutgoingRequest, RequestOptions, Scheme,
};
use wasip2::io::streams::StreamError;

/// The header that tells the host which provider's client credentials to
/// attach; the host removes it before the request leaves.
pub const PROVIDER_HEADER: &str = "x-tokenkeep-provider";

/// What a request the host's egress policy refused is reported as; hosts
/// surface it as a configuration error.
pub const EGRESS_DENIED: &str = "egress denied: the host allows only configured token URLs";

/// POSTs `body` as a form to the provider's token URL.
pub fn post_form(
    provider: &ProviderConfig,
    body: &SecretString,
) -> Result<HttpAnswer, PostFailure> {
    // Until the request is complete on the wire, the provider cannot have
    // acted on it; after that, a failure leaves its fate unknown.
    let sent = |error: RefreshError| PostFailure {
        error,
        maybe_delivered: true,
    };
    let (scheme, authority, path) = split_url(&provider.token_url)?;
    let headers = Fields::from_list(&[
        (
            "content-type".into(),
            b"application/x-www-form-urlencoded".to_vec(),
        ),
        ("accept".into(), b"application/json".to_vec()),
        (PROVIDER_HEADER.into(), provider.name.as_bytes().to_vec()),
    ])
    .map_err(|e| RefreshError::ProviderRejectedClient(format!("request headers refused: {e:?}")))?;
    let request = OutgoingRequest::new(headers);
    let rejected = |what: &str| {
        RefreshError::ProviderRejectedClient(format!("token URL has an invalid {what}"))
    };
    request
        .set_method(&Method::Post)
        .map_err(|()| rejected("method"))?;
    request
        .set_scheme(Some(&scheme))
        .map_err(|()| rejected("scheme"))?;
    request
        .set_authority(Some(authority))
        .map_err(|()| rejected("authority"))?;
    request
        .set_path_with_query(Some(path))
        .map_err(|()| rejected("path"))?;

    let timeout_ns = u64::from(provider.timeout_ms) * 1_000_000;
    let options = RequestOptions::new();
    // Each bound is the whole budget; the host enforces the total.
    let _ = options.set_connect_timeout(Some(timeout_ns));
    let _ = options.set_first_byte_timeout(Some(timeout_ns));
    let _ = options.set_between_bytes_timeout(Some(timeout_ns));

    let outgoing = request
        .body()
        .map_err(|()| unavailable("request body unavailable"))?;
    let future = outgoing_handler::handle(request, Some(options)).map_err(http_error)?;
    {
        let stream = outgoing
            .write()
            .map_err(|()| unavailable("request stream unavailable"))?;
        for chunk in body.expose_secret().as_bytes().chunks(4096) {
            stream
                .blocking_write_and_flush(chunk)
                .map_err(|_| unavailable("connection failed while sending"))?;
        }
    }
    OutgoingBody::finish(outgoing, None).map_err(http_error)?;

    future.subscribe().block();
    let response = future
        .get()
        .ok_or_else(|| sent(unavailable("no response")))?
        .map_err(|()| sent(unavailable("response taken twice")))?
        .map_err(|code| PostFailure {
            maybe_delivered: !never_connected(&code),
            error: http_error(code),
        })?;
    let status = response.status();
    let content_type = response
        .headers()
        .get("content-type")
        .first()
        .and_then(|v| String::from_utf8(v.clone()).ok());
    let incoming = response
        .consume()
        .map_err(|()| sent(unavailable("response body unavailable")))?;
    let stream = incoming
        .stream()
        .map_err(|()| sent(unavailable("response stream unavailable")))?;
    let cap = provider.max_response_bytes as usize;
    let mut buf = Vec::new();
    loop {
        match stream.blocking_read(64 * 1024) {
            Ok(chunk) => {
                if buf.len() + chunk.len() > cap {
                    return Err(sent(RefreshError::InvalidProviderResponse(format!(
                        "answer larger than {cap} bytes"
                    ))));
                }
                buf.extend_from_slice(&chunk);
            }
            Err(StreamError::Closed) => break,
            Err(StreamError::LastOperationFailed(_)) => {
                // The provider answered, so it has likely acted on the
                // request: report the answer as unusable and never repeat it.
                return Err(sent(RefreshError::InvalidProviderResponse(format!(
                    "answer cut off after {} bytes",
                    buf.len()
                ))));
            }
        }
    }
    drop(stream);
    Ok(HttpAnswer {
        status,
        content_type,
        body: buf.into(),
    })
}

/// Failures that happen before a request can reach the provider.
fn never_connected(code: &ErrorCode) -> bool {
    matches!(
        code,
        ErrorCode::HttpRequestDenied
            | ErrorCode::DnsTimeout
            | ErrorCode::DnsError(_)
            | ErrorCode::DestinationNotFound
            | ErrorCode::DestinationUnavailable
            | ErrorCode::DestinationIpProhibited
            | ErrorCode::DestinationIpUnroutable
            | ErrorCode::ConnectionRefused
            | ErrorCode::ConnectionTimeout
            | ErrorCode::ConnectionLimitReached
            | ErrorCode::TlsProtocolError
            | ErrorCode::TlsCertificateError
            | ErrorCode::TlsAlertReceived(_)
            | ErrorCode::HttpRequestUriInvalid
            | ErrorCode::HttpRequestMethodInvalid
    )
}

impl From<RefreshError> for PostFailure {
    /// Failures while building or sending the request: it never arrived whole.
    fn from(error: RefreshError) -> Self {
        PostFailure {
            error,
            maybe_delivered: false,
        }
    }
}

fn unavailable(what: &str) -> RefreshError {
    RefreshError::ProviderUnavailable(what.to_string())
}

fn http_error(e: ErrorCode) -> RefreshError {
    match e {
        ErrorCode::HttpRequestDenied => RefreshError::ProviderRejectedClient(EGRESS_DENIED.into()),
        ErrorCode::HttpResponseBodySize(_) => {
            RefreshError::InvalidProviderResponse("answer too large".into())
        }
        ErrorCode::HttpProtocolError | ErrorCode::HttpResponseIncomplete => {
            RefreshError::ProviderUnavailable("malformed or truncated HTTP answer".into())
        }
        ErrorCode::ConnectionTimeout
        | ErrorCode::ConnectionReadTimeout
        | ErrorCode::ConnectionWriteTimeout
        | ErrorCode::HttpResponseTimeout
        | ErrorCode::DnsTimeout => unavailable("timed out"),
        other => {
            let mut name = format!("{other:?}");
            name.truncate(80);
            RefreshError::ProviderUnavailable(name)
        }
    }
}

/// Splits `scheme://authority/path?query`.
fn split_url(url: &str) -> Result<(Scheme, &str, &str), RefreshError> {
    let bad =
        || RefreshError::ProviderRejectedClient("token URL is not an absolute http(s) URL".into());
    let (scheme, rest) = url.split_once("://").ok_or_else(bad)?;
    let scheme = match scheme {
        "https" => Scheme::Https,
        "http" => Scheme::Http,
        _ => return Err(bad()),
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, "/"),
    };
    if authority.is_empty() {
        return Err(bad());
    }
    Ok((scheme, authority, path))
}
