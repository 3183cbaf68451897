//! The RFC 6749 section 6 refresh request and the reading of its answer.
//!
//! Providers disagree on the wire: some answer form-encoded, some report
//! errors with HTTP 200 (`{"error": ...}` or Slack's `{"ok": false}`), some
//! send `expires_in` as a string. All of it ends here as a [`TokenResponse`]
//! or one [`RefreshError`]; nothing from the body is quoted back except
//! sanitised OAuth error codes.

use crate::error::{ErrorClass, RefreshError};
use crate::model::{ProviderConfig, RequestError};
use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;

/// Longest lifetime believed from a provider (twenty years: Linear's legacy
/// tokens claim just over ten); anything longer is a malformed answer, not a
/// token that never expires.
const MAX_LIFETIME_SECONDS: i64 = 20 * 365 * 86_400;

/// A successful token response.
#[derive(Debug)]
pub struct TokenResponse {
    pub access_token: SecretString,
    /// None: keep the refresh token we had.
    pub refresh_token: Option<SecretString>,
    pub expires_in: Option<i64>,
    pub refresh_token_expires_in: Option<i64>,
    /// None: the provider did not report scopes.
    pub scopes: Option<Vec<String>>,
}

/// The form body of a refresh request. It contains the refresh token, so it
/// is a secret itself.
pub fn refresh_request_body(
    refresh_token: &SecretString,
    extra: &[(String, String)],
) -> SecretString {
    let mut body = String::from("grant_type=refresh_token&refresh_token=");
    form_encode_into(&mut body, refresh_token.expose_secret());
    for (k, v) in extra {
        if k == "grant_type" || k == "refresh_token" {
            continue;
        }
        body.push('&');
        form_encode_into(&mut body, k);
        body.push('=');
        form_encode_into(&mut body, v);
    }
    body.into()
}

/// `application/x-www-form-urlencoded` encoding of one name or value.
pub fn form_encode_into(out: &mut String, s: &str) {
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'*' => {
                out.push(b as char)
            }
            b' ' => out.push('+'),
            _ => {
                const HEX: &[u8; 16] = b"0123456789ABCDEF";
                out.push('%');
                out.push(HEX[usize::from(b >> 4)] as char);
                out.push(HEX[usize::from(b & 15)] as char);
            }
        }
    }
}

fn form_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = bytes.get(i + 1..i + 3)?;
                let hex = std::str::from_utf8(hex).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

/// Whether a token request may be sent again after its outcome (`Ok`: the
/// answer's status, content type and body): only after a transient failure,
/// and to a provider that rotates refresh tokens only when it certainly did
/// not act on the request (never sent, or it asked to be asked again), or
/// when it grants a reuse leeway that outlasts the retries (then a repeat
/// is not a reuse). The component's retries and the host that enforces them
/// decide with this one function.
pub fn may_repeat(
    outcome: Result<(u16, Option<&str>, &[u8]), &RequestError>,
    config: &ProviderConfig,
) -> bool {
    let lenient =
        u64::from(config.reuse_leeway_seconds) * 1000 >= u64::from(config.retry_budget_ms);
    let unknown_fate_is_safe = !config.rotates_refresh_tokens || lenient;
    match outcome {
        Ok((status, content_type, body)) => {
            matches!(
                judge_answer(config, status, content_type, body),
                Err(RefreshError::ProviderUnavailable(_))
            ) && (unknown_fate_is_safe || asks_to_retry(status, content_type, body))
        }
        Err(RequestError::NotSent(_)) => true,
        Err(RequestError::NoAnswer(_)) => unknown_fate_is_safe,
        // The provider acted and the answer was lost: the old token is
        // spent unless the provider still accepts it for a while.
        Err(RequestError::AnswerUnusable(_)) => config.rotates_refresh_tokens && lenient,
        Err(RequestError::Denied(_) | RequestError::Misconfigured(_)) => false,
    }
}

/// Statuses that, without an OAuth error, a provider uses to refuse a
/// refresh token (some servers answer every failed refresh with a bare 400).
/// Others (404, 405, 413, 415, …) say the request or the URL is wrong, not
/// the token.
const BARE_REFUSAL_STATUSES: [u16; 4] = [400, 403, 410, 422];

/// Reads a token endpoint's answer under the provider's rules: its own
/// error codes, and whether a bare 4xx is a refusal.
pub fn judge_answer(
    config: &ProviderConfig,
    status: u16,
    content_type: Option<&str>,
    body: &[u8],
) -> Result<TokenResponse, RefreshError> {
    // An HTML page is a front end's (a WAF challenge, a proxy's error), not
    // the token endpoint's verdict on the token.
    let html = content_type.is_some_and(|ct| ct.to_ascii_lowercase().starts_with("text/html"));
    parse_token_response(status, content_type, body, &config.error_codes).map_err(|e| match e {
        RefreshError::InvalidProviderResponse(_)
            if config.bare_4xx_is_refusal && !html && BARE_REFUSAL_STATUSES.contains(&status) =>
        {
            RefreshError::ReauthorizationRequired(format!(
                "provider answered status {status} without an OAuth error: taken as a refusal"
            ))
        }
        other => other,
    })
}

/// Reads a token endpoint's answer. `provider_codes` are the provider's own
/// error codes (from the catalogue), looked up before the RFC 6749 ones.
pub fn parse_token_response(
    status: u16,
    content_type: Option<&str>,
    body: &[u8],
    provider_codes: &[(String, ErrorClass)],
) -> Result<TokenResponse, RefreshError> {
    let fields = decode_body(content_type, body);
    if let Some(code) = fields.as_ref().and_then(error_code) {
        if let Some((_, class)) = provider_codes.iter().find(|(c, _)| *c == code) {
            return Err(error_of_class(*class, &code));
        }
        return Err(classify_error_code(&code, status));
    }
    if !(200..300).contains(&status) {
        return Err(classify_status(status));
    }
    let fields = fields.ok_or_else(|| {
        RefreshError::InvalidProviderResponse(format!(
            "status {status}, body is neither JSON nor form-encoded ({} bytes)",
            body.len()
        ))
    })?;
    token_from_fields(&fields)
}

fn decode_body(content_type: Option<&str>, body: &[u8]) -> Option<serde_json::Map<String, Value>> {
    let text = std::str::from_utf8(body).ok()?;
    let trimmed = text.trim_start();
    if trimmed.starts_with('{') {
        return match serde_json::from_str::<Value>(text) {
            Ok(Value::Object(map)) => Some(map),
            _ => None,
        };
    }
    let form = content_type
        .map(|ct| {
            ct.to_ascii_lowercase()
                .starts_with("application/x-www-form-urlencoded")
        })
        .unwrap_or(false);
    if !form && !looks_like_form(trimmed) {
        return None;
    }
    let mut map = serde_json::Map::new();
    for pair in trimmed.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=')?;
        map.insert(form_decode(k)?, Value::String(form_decode(v)?));
    }
    (!map.is_empty()).then_some(map)
}

fn looks_like_form(s: &str) -> bool {
    s.contains('=')
        && s.bytes().all(|b| b.is_ascii_graphic())
        && (s.starts_with("access_token=")
            || s.starts_with("error=")
            || s.contains("&access_token="))
}

fn error_code(fields: &serde_json::Map<String, Value>) -> Option<String> {
    let slack_failure = matches!(fields.get("ok"), Some(Value::Bool(false)));
    match fields.get("error") {
        Some(Value::String(code)) => Some(sanitise_code(code)),
        Some(Value::Object(obj)) => obj.get("code").and_then(Value::as_str).map(sanitise_code),
        Some(Value::Null) | None if slack_failure => Some("unknown_error".into()),
        _ => None,
    }
}

/// Error codes are quoted in messages; keep only what an error code looks like.
fn sanitise_code(code: &str) -> String {
    let clean: String = code
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '.' || *c == '-')
        .take(64)
        .collect();
    if clean.is_empty() {
        "unnamed_error".into()
    } else {
        clean
    }
}

/// Whether an answer says the provider did not act and asks to come back
/// later (429, 503, `temporarily_unavailable` and kin): safe to repeat.
pub fn asks_to_retry(status: u16, content_type: Option<&str>, body: &[u8]) -> bool {
    if matches!(status, 429 | 503) {
        return true;
    }
    decode_body(content_type, body)
        .as_ref()
        .and_then(error_code)
        .is_some_and(|code| {
            matches!(
                code.as_str(),
                "temporarily_unavailable" | "slow_down" | "ratelimited" | "rate_limited"
            )
        })
}

/// A rotated refresh token from a 2xx answer that failed to parse otherwise:
/// the provider has spent the old one, so this is the only one that works.
pub fn salvage_refresh_token(
    status: u16,
    content_type: Option<&str>,
    body: &[u8],
) -> Option<SecretString> {
    if !(200..300).contains(&status) {
        return None;
    }
    let fields = decode_body(content_type, body)?;
    if error_code(&fields).is_some() {
        return None;
    }
    match fields.get("refresh_token") {
        Some(Value::String(s)) if !s.is_empty() && s.len() <= 16 * 1024 => {
            Some(SecretString::from(s.clone()))
        }
        _ => None,
    }
}

/// A provider's own code, as the class the catalogue gives it; only the
/// classes a provider can mean are honoured.
fn error_of_class(class: ErrorClass, code: &str) -> RefreshError {
    let class = match class {
        ErrorClass::ReauthorizationRequired
        | ErrorClass::ProviderRejectedClient
        | ErrorClass::ProviderUnavailable => class,
        _ => ErrorClass::InvalidProviderResponse,
    };
    RefreshError::of_class(class, format!("provider answered {code}"))
}

/// Maps an OAuth (or provider-specific) error code onto the taxonomy.
pub fn classify_error_code(code: &str, status: u16) -> RefreshError {
    match code {
        "invalid_grant"
        | "bad_refresh_token"
        | "invalid_refresh_token"
        | "token_revoked"
        | "token_expired"
        | "refresh_token_expired"
        | "expired_token"
        | "invalid_token" => {
            RefreshError::ReauthorizationRequired(format!("provider answered {code}"))
        }
        "invalid_client"
        | "unauthorized_client"
        | "unsupported_grant_type"
        | "invalid_request"
        | "invalid_scope"
        | "incorrect_client_credentials"
        | "invalid_client_id"
        | "bad_client_secret"
        | "invalid_client_secret"
        | "access_denied" => {
            RefreshError::ProviderRejectedClient(format!("provider answered {code}"))
        }
        "temporarily_unavailable"
        | "server_error"
        | "slow_down"
        | "ratelimited"
        | "rate_limited"
        | "service_unavailable" => {
            RefreshError::ProviderUnavailable(format!("provider answered {code}"))
        }
        // Unknown codes are not quoted: a provider could put anything there.
        _ if status >= 500 || status == 429 => RefreshError::ProviderUnavailable(format!(
            "status {status} with an unrecognised error code"
        )),
        _ => RefreshError::InvalidProviderResponse(format!(
            "unrecognised error code (status {status})"
        )),
    }
}

fn classify_status(status: u16) -> RefreshError {
    match status {
        429 | 500..=599 => RefreshError::ProviderUnavailable(format!("status {status}")),
        401 => RefreshError::ProviderRejectedClient("status 401".into()),
        _ => {
            RefreshError::InvalidProviderResponse(format!("status {status} without an OAuth error"))
        }
    }
}

fn token_from_fields(
    fields: &serde_json::Map<String, Value>,
) -> Result<TokenResponse, RefreshError> {
    let invalid = |what: &str| RefreshError::InvalidProviderResponse(what.to_string());
    let access_token = match fields.get("access_token") {
        Some(Value::String(s)) if !s.is_empty() => SecretString::from(s.clone()),
        Some(_) => return Err(invalid("access_token is not a non-empty string")),
        None => return Err(invalid("no access_token")),
    };
    let refresh_token = match fields.get("refresh_token") {
        Some(Value::String(s)) if !s.is_empty() => Some(SecretString::from(s.clone())),
        Some(Value::String(_)) | Some(Value::Null) | None => None,
        Some(_) => return Err(invalid("refresh_token is not a string")),
    };
    let scopes = match fields.get("scope") {
        // An empty scope (GitHub Apps, which have none) reports nothing.
        Some(Value::String(s)) if s.trim().is_empty() => None,
        Some(Value::String(s)) => Some(split_scopes(s)),
        Some(Value::Array(items)) => Some(
            items
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| invalid("scope list holds a non-string"))
                })
                .collect::<Result<Vec<_>, _>>()?,
        ),
        Some(Value::Null) | None => None,
        Some(_) => return Err(invalid("scope is neither a string nor a list")),
    };
    Ok(TokenResponse {
        access_token,
        refresh_token,
        expires_in: lifetime(fields.get("expires_in"), "expires_in")?,
        refresh_token_expires_in: lifetime(
            fields.get("refresh_token_expires_in"),
            "refresh_token_expires_in",
        )?,
        scopes,
    })
}

/// Splits an OAuth scope string; providers use spaces, some use commas.
pub fn split_scopes(s: &str) -> Vec<String> {
    s.split([' ', ','])
        .filter(|p| !p.is_empty())
        .map(str::to_string)
        .collect()
}

fn lifetime(v: Option<&Value>, name: &str) -> Result<Option<i64>, RefreshError> {
    let secs = match v {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Number(n)) => n
            .as_i64()
            .or_else(|| n.as_f64().filter(|f| f.fract() == 0.0).map(|f| f as i64)),
        Some(Value::String(s)) => s.trim().parse::<i64>().ok(),
        Some(_) => None,
    };
    match secs {
        Some(0) => Ok(None),
        Some(s) if (1..=MAX_LIFETIME_SECONDS).contains(&s) => Ok(Some(s)),
        _ => Err(RefreshError::InvalidProviderResponse(format!(
            "{name} is not a sensible number of seconds"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_json_answer_with_rotation() {
        let body = br#"{"access_token":"a2","refresh_token":"r2","expires_in":3600,"refresh_token_expires_in":"15897600","scope":"repo user","token_type":"bearer"}"#;
        let t = parse_token_response(200, Some("application/json"), body, &[]).unwrap();
        assert_eq!(t.access_token.expose_secret(), "a2");
        assert_eq!(t.refresh_token.unwrap().expose_secret(), "r2");
        assert_eq!(t.expires_in, Some(3600));
        assert_eq!(t.refresh_token_expires_in, Some(15_897_600));
        assert_eq!(t.scopes.unwrap(), vec!["repo", "user"]);
    }

    #[test]
    fn an_answer_without_refresh_token_keeps_none() {
        let t = parse_token_response(
            200,
            None,
            br#"{"access_token":"a","expires_in":"3599"}"#,
            &[],
        )
        .unwrap();
        assert!(t.refresh_token.is_none());
        assert_eq!(t.expires_in, Some(3599));
        assert!(t.scopes.is_none());
    }

    #[test]
    fn a_form_encoded_answer() {
        let body = b"access_token=gho_a&expires_in=28800&refresh_token=ghr_b&refresh_token_expires_in=15811200&scope=&token_type=bearer";
        let t = parse_token_response(200, Some("application/x-www-form-urlencoded"), body, &[])
            .unwrap();
        assert_eq!(t.access_token.expose_secret(), "gho_a");
        assert!(t.scopes.is_none(), "an empty scope reports nothing");
    }

    #[test]
    fn errors_are_classified() {
        let e = |status, body: &[u8]| parse_token_response(status, None, body, &[]).unwrap_err();
        assert!(matches!(
            e(400, br#"{"error":"invalid_grant"}"#),
            RefreshError::ReauthorizationRequired(_)
        ));
        assert!(matches!(
            e(200, br#"{"error":"bad_refresh_token"}"#),
            RefreshError::ReauthorizationRequired(_)
        ));
        assert!(matches!(
            e(200, br#"{"ok":false,"error":"invalid_refresh_token"}"#),
            RefreshError::ReauthorizationRequired(_)
        ));
        assert!(matches!(
            e(403, br#"{"error":"invalid_grant"}"#),
            RefreshError::ReauthorizationRequired(_)
        ));
        assert!(matches!(
            e(401, br#"{"error":"invalid_client"}"#),
            RefreshError::ProviderRejectedClient(_)
        ));
        assert!(matches!(
            e(503, b"<html>down</html>"),
            RefreshError::ProviderUnavailable(_)
        ));
        assert!(matches!(
            e(400, br#"{"error":"temporarily_unavailable"}"#),
            RefreshError::ProviderUnavailable(_)
        ));
        assert!(matches!(
            e(200, b"<html>"),
            RefreshError::InvalidProviderResponse(_)
        ));
        assert!(matches!(
            e(200, br#"{"access_token":"a","expires_in":-5}"#),
            RefreshError::InvalidProviderResponse(_)
        ));
        assert!(matches!(
            e(200, br#"{"access_token":""}"#),
            RefreshError::InvalidProviderResponse(_)
        ));
        assert!(matches!(
            e(200, br#"{"access_token":"a","expires_in":36"#),
            RefreshError::InvalidProviderResponse(_)
        ));
    }

    #[test]
    fn provider_codes_come_before_the_rfc_ones() {
        let body =
            br#"{"error":"unauthorized_client","error_description":"refresh_token is invalid"}"#;
        assert!(matches!(
            parse_token_response(403, None, body, &[]),
            Err(RefreshError::ProviderRejectedClient(_))
        ));
        let atlassian = [(
            "unauthorized_client".to_string(),
            ErrorClass::ReauthorizationRequired,
        )];
        assert!(matches!(
            parse_token_response(403, None, body, &atlassian),
            Err(RefreshError::ReauthorizationRequired(_))
        ));
    }

    #[test]
    fn a_rotated_refresh_token_is_salvaged_only_from_a_success() {
        let odd = br#"{"access_token":"a","expires_in":"soon","refresh_token":"r2"}"#;
        assert!(parse_token_response(200, None, odd, &[]).is_err());
        let kept = salvage_refresh_token(200, None, odd).unwrap();
        assert_eq!(kept.expose_secret(), "r2");
        assert!(salvage_refresh_token(400, None, odd).is_none());
        let refusal = br#"{"error":"invalid_grant","refresh_token":"r2"}"#;
        assert!(salvage_refresh_token(200, None, refusal).is_none());
        assert!(salvage_refresh_token(200, None, b"<html>").is_none());
    }

    #[test]
    fn error_messages_never_quote_the_body() {
        let body = br#"{"error":"invalid_grant sk_live_SECRET","error_description":"token sk_live_SECRET"}"#;
        let msg = parse_token_response(400, None, body, &[])
            .unwrap_err()
            .to_string();
        assert!(!msg.contains("SECRET"), "{msg}");
        let t = parse_token_response(
            200,
            None,
            br#"{"access_token":"sk_live_SECRET","expires_in":"x"}"#,
            &[],
        );
        assert!(!t.unwrap_err().to_string().contains("sk_live"));
    }

    #[test]
    fn the_request_body_is_form_encoded() {
        let body = refresh_request_body(&"r/+ &=".into(), &[("scope".into(), "a b".into())]);
        assert_eq!(
            body.expose_secret(),
            "grant_type=refresh_token&refresh_token=r%2F%2B+%26%3D&scope=a+b"
        );
    }

    fn rules(rotates: bool, reuse_leeway_seconds: u32) -> ProviderConfig {
        ProviderConfig {
            name: "p".into(),
            refresh_threshold_seconds: 600,
            timeout_ms: 1000,
            max_response_bytes: 65536,
            kind: "custom".into(),
            error_codes: Vec::new(),
            default_expires_in: None,
            default_refresh_token_expires_in: None,
            rotates_refresh_tokens: rotates,
            max_attempts: 3,
            retry_budget_ms: 30_000,
            bare_4xx_is_refusal: true,
            reuse_leeway_seconds,
            host_grant: false,
        }
    }

    #[test]
    fn only_transient_failures_are_repeated_and_to_rotating_providers_only_unprocessed_ones() {
        let unavailable = br#"{"error":"server_error"}"#.as_slice();
        let json = Some("application/json");
        let (plain, rotating) = (&rules(false, 0), &rules(true, 0));
        // A 200 or 400 carrying a transient OAuth error: repeated where the
        // provider does not rotate, not where a repeat could be a reuse.
        for status in [200, 400] {
            assert!(may_repeat(Ok((status, json, unavailable)), plain));
            assert!(!may_repeat(Ok((status, json, unavailable)), rotating));
        }
        let slow_down = br#"{"error":"temporarily_unavailable"}"#.as_slice();
        assert!(may_repeat(Ok((400, json, slow_down)), rotating));
        assert!(may_repeat(Ok((503, None, b"".as_slice())), rotating));
        assert!(!may_repeat(
            Ok((400, json, br#"{"error":"invalid_grant"}"#.as_slice())),
            plain
        ));
        assert!(!may_repeat(
            Ok((200, json, br#"{"access_token":"a"}"#.as_slice())),
            plain
        ));
        let fate_unknown = RequestError::NoAnswer("timed out".into());
        assert!(may_repeat(Err(&fate_unknown), plain));
        assert!(!may_repeat(Err(&fate_unknown), rotating));
        assert!(may_repeat(
            Err(&RequestError::NotSent("refused".into())),
            rotating
        ));
        assert!(!may_repeat(
            Err(&RequestError::AnswerUnusable("cut".into())),
            plain
        ));
    }

    #[test]
    fn a_reuse_leeway_that_outlasts_the_retries_makes_an_unknown_fate_repeatable() {
        let fate_unknown = RequestError::NoAnswer("timed out".into());
        let cut = RequestError::AnswerUnusable("cut".into());
        let server_error = Ok((500, None, b"".as_slice()));
        // Atlassian-like: the spent token still works for 10 minutes.
        let lenient = &rules(true, 600);
        assert!(may_repeat(Err(&fate_unknown), lenient));
        assert!(may_repeat(Err(&cut), lenient));
        assert!(may_repeat(server_error, lenient));
        // A leeway shorter than the retries could end mid-way: no repeats.
        let short = &rules(true, 5);
        assert!(!may_repeat(Err(&fate_unknown), short));
        assert!(!may_repeat(Err(&cut), short));
        assert!(!may_repeat(server_error, short));
    }

    #[test]
    fn a_bare_4xx_is_a_refusal_unless_the_provider_says_otherwise() {
        let mut config = rules(true, 0);
        for (status, body) in [
            (400, b"".as_slice()),
            (400, b"Bad Request".as_slice()),
            (403, b"forbidden".as_slice()),
            (400, br#"{"message":"nope"}"#.as_slice()),
        ] {
            let e = judge_answer(&config, status, None, body).unwrap_err();
            assert_eq!(e.class(), ErrorClass::ReauthorizationRequired, "{status}");
        }
        // A wrong URL is not the token's fault, nor is a front end's page.
        let e = judge_answer(&config, 404, None, b"").unwrap_err();
        assert_eq!(e.class(), ErrorClass::InvalidProviderResponse);
        let e = judge_answer(
            &config,
            403,
            Some("text/html; charset=utf-8"),
            b"<h1>blocked</h1>",
        )
        .unwrap_err();
        assert_eq!(e.class(), ErrorClass::InvalidProviderResponse);
        config.bare_4xx_is_refusal = false;
        let e = judge_answer(&config, 400, None, b"").unwrap_err();
        assert_eq!(e.class(), ErrorClass::InvalidProviderResponse);
    }
}
