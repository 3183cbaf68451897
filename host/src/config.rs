//! Provider configuration from a TOML file, and the knobs of the host.

use crate::error::Error;
use secrecy::SecretString;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::Path;

/// Default proactive refresh threshold (capped at half a token's lifetime).
pub const DEFAULT_REFRESH_THRESHOLD_SECONDS: u32 = 600;
/// Default total time for one provider call.
pub const DEFAULT_TIMEOUT_MS: u32 = 15_000;
/// Default cap on a token response.
pub const DEFAULT_MAX_RESPONSE_BYTES: u32 = 64 * 1024;
/// Default row-lock wait: comfortably longer than a provider call, so waiters
/// outlast the runtime that refreshes instead of giving up on a healthy token.
pub const DEFAULT_LOCK_WAIT_MS: u32 = 45_000;

/// How the client authenticates at the token endpoint (RFC 6749 section 2.3.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum ClientAuth {
    /// `client_id` and `client_secret` in the form body.
    #[default]
    Body,
    /// HTTP Basic with the client id and secret.
    Basic,
}

/// One configured provider, with its client credentials resolved.
#[derive(Debug, Clone)]
pub struct Provider {
    pub name: String,
    pub token_url: String,
    pub client_id: String,
    /// Attached by the host to the outgoing request; never enters the sandbox.
    pub client_secret: Option<SecretString>,
    pub client_auth: ClientAuth,
    pub extra_params: Vec<(String, String)>,
    pub refresh_threshold_seconds: u32,
    pub timeout_ms: u32,
    pub max_response_bytes: u32,
}

/// The whole configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub providers: BTreeMap<String, Provider>,
    /// How long a runtime waits for another's row lock.
    pub lock_wait_ms: u32,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            providers: BTreeMap::new(),
            lock_wait_ms: DEFAULT_LOCK_WAIT_MS,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    lock_wait_ms: Option<u32>,
    #[serde(default)]
    providers: BTreeMap<String, RawProvider>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProvider {
    token_url: String,
    client_id: String,
    client_secret: Option<String>,
    client_secret_env: Option<String>,
    #[serde(default)]
    client_auth: ClientAuth,
    #[serde(default)]
    extra_params: BTreeMap<String, String>,
    refresh_threshold_seconds: Option<u32>,
    timeout_ms: Option<u32>,
    max_response_bytes: Option<u32>,
}

impl Config {
    /// Reads and checks a TOML configuration file.
    pub fn load(path: &Path) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Config(format!("cannot read {}: {e}", path.display())))?;
        Self::parse(&text)
    }

    /// Parses and checks TOML configuration text.
    pub fn parse(text: &str) -> Result<Self, Error> {
        // toml's messages can quote the offending value, which may be a
        // secret: say where, never what.
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let at = e
                .span()
                .map(|s| {
                    let line = text[..s.start.min(text.len())].matches('\n').count() + 1;
                    format!(" at line {line}")
                })
                .unwrap_or_default();
            Error::Config(format!("configuration is not valid TOML for tokenkeep{at}"))
        })?;
        let mut providers = BTreeMap::new();
        for (name, p) in raw.providers {
            providers.insert(name.clone(), Provider::resolve(name, p)?);
        }
        let lock_wait_ms = raw.lock_wait_ms.unwrap_or(DEFAULT_LOCK_WAIT_MS);
        if let Some(slow) = providers.values().find(|p| p.timeout_ms >= lock_wait_ms) {
            return Err(Error::Config(format!(
                "lock_wait_ms ({lock_wait_ms}) must exceed provider {}'s timeout_ms ({}): \
                 waiters must outlast the runtime that refreshes",
                slow.name, slow.timeout_ms
            )));
        }
        Ok(Config {
            providers,
            lock_wait_ms,
        })
    }
}

impl Provider {
    fn resolve(name: String, p: RawProvider) -> Result<Self, Error> {
        let bad = |what: String| Err(Error::Config(format!("provider {name}: {what}")));
        let valid_name = !name.is_empty()
            && name.len() <= 64
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        if !valid_name {
            return bad("name must be 1-64 characters of [A-Za-z0-9._-]".into());
        }
        let url = url::Url::parse(&p.token_url)
            .map_err(|e| Error::Config(format!("provider {name}: token_url: {e}")))?;
        if !matches!(url.scheme(), "https" | "http") || url.host_str().is_none() {
            return bad("token_url must be an absolute http(s) URL".into());
        }
        if url.scheme() == "http" && !is_loopback(&url) {
            return bad("token_url must use https (plain http is allowed on loopback only)".into());
        }
        let client_secret = match (p.client_secret, p.client_secret_env) {
            (Some(_), Some(_)) => {
                return bad("set client_secret or client_secret_env, not both".into());
            }
            (Some(s), None) => Some(SecretString::from(s)),
            (None, Some(var)) => match std::env::var(&var) {
                Ok(s) if !s.is_empty() => Some(SecretString::from(s)),
                _ => {
                    return bad(format!(
                        "environment variable {var} (client_secret_env) is not set"
                    ));
                }
            },
            (None, None) => None,
        };
        if p.client_auth == ClientAuth::Basic && client_secret.is_none() {
            return bad("client_auth = \"basic\" needs a client secret".into());
        }
        Ok(Provider {
            token_url: url.to_string(),
            client_id: p.client_id,
            client_secret,
            client_auth: p.client_auth,
            extra_params: p.extra_params.into_iter().collect(),
            refresh_threshold_seconds: p
                .refresh_threshold_seconds
                .unwrap_or(DEFAULT_REFRESH_THRESHOLD_SECONDS),
            timeout_ms: p.timeout_ms.unwrap_or(DEFAULT_TIMEOUT_MS).max(1),
            max_response_bytes: p
                .max_response_bytes
                .unwrap_or(DEFAULT_MAX_RESPONSE_BYTES)
                .max(256),
            name,
        })
    }
}

fn is_loopback(url: &url::Url) -> bool {
    match url.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        Some(url::Host::Domain(d)) => d == "localhost",
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    #[test]
    fn a_provider_with_defaults() {
        let c = Config::parse(
            r#"
            [providers.gitlab]
            token_url = "https://gitlab.example.com/oauth/token"
            client_id = "abc"
            client_secret = "s3cret"
            "#,
        )
        .unwrap();
        let p = &c.providers["gitlab"];
        assert_eq!(p.client_auth, ClientAuth::Body);
        assert_eq!(p.client_secret.as_ref().unwrap().expose_secret(), "s3cret");
        assert_eq!(
            p.refresh_threshold_seconds,
            DEFAULT_REFRESH_THRESHOLD_SECONDS
        );
        assert!(!format!("{c:?}").contains("s3cret"));
    }

    #[test]
    fn plain_http_is_refused_off_loopback() {
        let e = Config::parse(
            "[providers.x]\ntoken_url = \"http://example.com/token\"\nclient_id = \"a\"\n",
        );
        assert!(matches!(e, Err(Error::Config(_))));
    }

    #[test]
    fn a_lock_wait_shorter_than_the_provider_timeout_is_refused() {
        let e = Config::parse(
            "lock_wait_ms = 1000\n[providers.x]\ntoken_url = \"https://a.example/t\"\nclient_id = \"a\"\ntimeout_ms = 5000\n",
        );
        assert!(matches!(e, Err(Error::Config(m)) if m.contains("lock_wait_ms")));
    }

    #[test]
    fn parse_errors_do_not_quote_the_file() {
        for text in [
            "[providers.x]\nclient_secret = \"hunter2\" garbage\n",
            "[providers.x]\ntoken_url = \"https://a.example/t\"\nclient_id = \"a\"\nclient_secret = 9876543210\n",
        ] {
            let e = Config::parse(text).unwrap_err();
            let msg = e.to_string();
            assert!(
                !msg.contains("hunter2") && !msg.contains("9876543210"),
                "{msg}"
            );
        }
    }
}
