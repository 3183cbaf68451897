//! `tokenkeep serve`'s settings: the `[serve]` section of the configuration
//! file (the providers' file), with the listeners overridable from the
//! command line or the environment.

use crate::api_keys::{ApiKey, ApiKeys};
use crate::webhooks::Webhook;
use secrecy::SecretString;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use tokenkeep_host::Error;
use tokenkeep_host::refresher::RefresherSettings;

/// Default cap on a request body: a token response or a conversation's
/// settings are a few KiB.
pub const DEFAULT_MAX_BODY_BYTES: usize = 64 * 1024;

/// Where the service listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    /// A Unix socket (the default): reachable by whoever the file's mode
    /// lets in, and never from the network.
    Unix(PathBuf),
    /// A loopback TCP address, for runtimes in other containers of the
    /// same network namespace. Port 0 picks one.
    Tcp(SocketAddr),
}

impl Listen {
    /// `unix:PATH`, an absolute path, `tcp:HOST:PORT` or `HOST:PORT`.
    /// TCP must be loopback: the API speaks plain HTTP with bearer keys.
    pub fn parse(text: &str) -> Result<Self, Error> {
        if let Some(path) = text.strip_prefix("unix:") {
            return Ok(Listen::Unix(PathBuf::from(path)));
        }
        if text.starts_with('/') {
            return Ok(Listen::Unix(PathBuf::from(text)));
        }
        let addr = text.strip_prefix("tcp:").unwrap_or(text);
        let addr: SocketAddr = addr.parse().map_err(|_| {
            Error::Config(format!(
                "listen address {text:?} is neither unix:PATH nor tcp:IP:PORT"
            ))
        })?;
        if !addr.ip().is_loopback() {
            return Err(Error::Config(format!(
                "listen address {addr} is not loopback: the API is plain HTTP with bearer \
                 keys; listen on a Unix socket or 127.0.0.1 and put a TLS proxy in front"
            )));
        }
        Ok(Listen::Tcp(addr))
    }
}

impl std::fmt::Display for Listen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Listen::Unix(path) => write!(f, "unix:{}", path.display()),
            Listen::Tcp(addr) => write!(f, "tcp:{addr}"),
        }
    }
}

/// How long requests in flight at a stop may take by default: well inside
/// the 90 s a service manager gives a stop (deploy/tokenkeep.service).
pub const DEFAULT_DRAIN_SECONDS: u64 = 30;

/// How long token events (delivered or not) are kept by default.
pub const DEFAULT_EVENT_RETENTION_DAYS: u32 = 30;

/// Everything `serve` needs besides the keeper.
#[derive(Debug, Clone)]
pub struct ServeSettings {
    pub listen: Vec<Listen>,
    pub keys: ApiKeys,
    pub max_body_bytes: usize,
    /// The background refresher; `None` when turned off.
    pub refresher: Option<RefresherSettings>,
    /// Where token events are delivered.
    pub webhooks: Vec<Webhook>,
    /// How long token events are kept; `None`: for ever.
    pub event_retention_days: Option<u32>,
    /// How long requests in flight at a stop may take to finish.
    pub drain: Duration,
    /// Where browsers reach this service: the base of the redirect URI
    /// (`PUBLIC_URL/v1/connect/callback`) of `POST /v1/connect`.
    pub public_url: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawServe {
    #[serde(default)]
    listen: Vec<String>,
    max_body_bytes: Option<usize>,
    #[serde(default)]
    keys: BTreeMap<String, RawKey>,
    #[serde(default)]
    refresher: RawRefresher,
    #[serde(default)]
    webhooks: BTreeMap<String, RawWebhook>,
    /// 0: keep events for ever.
    event_retention_days: Option<u32>,
    drain_seconds: Option<u64>,
    public_url: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWebhook {
    url: String,
    /// The environment variable holding the signing secret (`whsec_…`).
    secret_env: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRefresher {
    #[serde(default = "yes")]
    enabled: bool,
    interval_seconds: Option<u64>,
    lead_seconds: Option<u64>,
    spread_seconds: Option<u64>,
    max_failures: Option<u32>,
    concurrency: Option<usize>,
}

fn yes() -> bool {
    true
}

impl Default for RawRefresher {
    fn default() -> Self {
        Self {
            enabled: true,
            interval_seconds: None,
            lead_seconds: None,
            spread_seconds: None,
            max_failures: None,
            concurrency: None,
        }
    }
}

impl RawRefresher {
    fn settings(self) -> Result<Option<RefresherSettings>, Error> {
        if !self.enabled {
            return Ok(None);
        }
        let d = RefresherSettings::default();
        let secs = |v: Option<u64>, default: Duration| v.map_or(default, Duration::from_secs);
        let s = RefresherSettings {
            interval: secs(self.interval_seconds, d.interval),
            lead: secs(self.lead_seconds, d.lead),
            spread: secs(self.spread_seconds, d.spread),
            max_failures: self.max_failures.unwrap_or(d.max_failures),
            concurrency: self.concurrency.unwrap_or(d.concurrency),
            page: d.page,
        };
        if s.interval.is_zero() || s.concurrency == 0 || s.max_failures == 0 {
            return Err(Error::Config(
                "serve.refresher: interval_seconds, concurrency and max_failures must be at least 1"
                    .into(),
            ));
        }
        Ok(Some(s))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKey {
    /// The environment variable holding the key.
    secret_env: Option<String>,
    /// The key's SHA-256, hex: the file then holds no secret.
    secret_sha256: Option<String>,
    providers: Option<Vec<String>>,
    users: Option<Vec<String>>,
}

impl ServeSettings {
    /// Reads the `[serve]` section of configuration text. Listeners named
    /// there are used unless `listen` overrides them; with neither, the
    /// caller's `default_listen`.
    pub fn parse(text: &str, listen: &[String], default_listen: Listen) -> Result<Self, Error> {
        // The file's other sections are the host's to check.
        let file: toml::Table = toml::from_str(text).map_err(|e| {
            Error::Config(format!(
                "configuration is not valid TOML{}",
                tokenkeep_host::config::where_in(text, &e)
            ))
        })?;
        let serve: RawServe = match file.get("serve") {
            // [serve] holds names, digests and patterns, no secret: its
            // messages may be quoted.
            Some(section) => section
                .clone()
                .try_into()
                .map_err(|e: toml::de::Error| Error::Config(format!("[serve]: {}", e.message())))?,
            None => RawServe::default(),
        };
        let named = if listen.is_empty() {
            &serve.listen
        } else {
            listen
        };
        let mut listeners = named
            .iter()
            .map(|l| Listen::parse(l))
            .collect::<Result<Vec<_>, _>>()?;
        if listeners.is_empty() {
            listeners.push(default_listen);
        }
        let mut keys = Vec::new();
        for (name, k) in serve.keys {
            keys.push(key(&name, k)?);
        }
        if keys.is_empty() {
            return Err(Error::Config(
                "serve needs at least one API key: add [serve.keys.NAME] with secret_env \
                 or secret_sha256"
                    .into(),
            ));
        }
        let max_body_bytes = serve.max_body_bytes.unwrap_or(DEFAULT_MAX_BODY_BYTES);
        if max_body_bytes < 1024 {
            return Err(Error::Config(
                "serve.max_body_bytes must be at least 1024".into(),
            ));
        }
        let public_url = serve
            .public_url
            .map(|u| {
                // Where browsers bring authorisation codes: https, unless
                // on loopback; a base URL, without query or fragment.
                url::Url::parse(&u)
                    .ok()
                    .filter(|u| {
                        let loopback =
                            matches!(u.host_str(), Some("127.0.0.1" | "[::1]" | "localhost"));
                        (u.scheme() == "https" || (u.scheme() == "http" && loopback))
                            && u.query().is_none()
                            && u.fragment().is_none()
                    })
                    .map(|u| u.as_str().trim_end_matches('/').to_string())
                    .ok_or_else(|| {
                        Error::Config(
                            "serve.public_url must be an https URL (http on loopback only) \
                             without query or fragment"
                                .into(),
                        )
                    })
            })
            .transpose()?;
        Ok(Self {
            public_url,
            listen: listeners,
            keys: ApiKeys::new(keys),
            max_body_bytes,
            refresher: serve.refresher.settings()?,
            drain: Duration::from_secs(serve.drain_seconds.unwrap_or(DEFAULT_DRAIN_SECONDS)),
            event_retention_days: match serve.event_retention_days {
                Some(0) => None,
                days => Some(days.unwrap_or(DEFAULT_EVENT_RETENTION_DAYS)),
            },
            webhooks: serve
                .webhooks
                .into_iter()
                .map(|(name, w)| {
                    let secret = std::env::var(&w.secret_env).map_err(|_| {
                        Error::Config(format!(
                            "serve.webhooks.{name}: environment variable {} is not set",
                            w.secret_env
                        ))
                    })?;
                    Webhook::new(&name, &w.url, &secret)
                })
                .collect::<Result<_, _>>()?,
        })
    }
}

fn key(name: &str, k: RawKey) -> Result<ApiKey, Error> {
    let bad = |what: &str| Error::Config(format!("serve.keys.{name}: {what}"));
    if k.providers.as_ref().is_some_and(Vec::is_empty)
        || k.users.as_ref().is_some_and(Vec::is_empty)
    {
        return Err(bad(
            "an empty providers or users list reaches nothing; leave it out to reach all",
        ));
    }
    match (k.secret_env, k.secret_sha256) {
        (Some(var), None) => {
            let secret = std::env::var(&var)
                .map_err(|_| bad(&format!("environment variable {var} is not set")))?;
            if secret.len() < 16 {
                return Err(bad(&format!(
                    "the key in {var} is shorter than 16 characters"
                )));
            }
            Ok(ApiKey::with_secret(
                name,
                &SecretString::from(secret),
                k.providers,
                k.users,
            ))
        }
        (None, Some(hex_digest)) => {
            let mut digest = [0u8; 32];
            hex::decode_to_slice(hex_digest.trim(), &mut digest)
                .map_err(|_| bad("secret_sha256 must be 64 hex digits"))?;
            Ok(ApiKey::with_digest(name, digest, k.providers, k.users))
        }
        _ => Err(bad("give exactly one of secret_env and secret_sha256")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn default() -> Listen {
        Listen::Unix("/tmp/default.sock".into())
    }

    #[test]
    fn listeners_are_unix_sockets_or_loopback_only() {
        assert_eq!(
            Listen::parse("unix:/run/tk.sock").unwrap(),
            Listen::Unix("/run/tk.sock".into())
        );
        assert_eq!(
            Listen::parse("tcp:127.0.0.1:0").unwrap(),
            Listen::Tcp("127.0.0.1:0".parse().unwrap())
        );
        assert_eq!(
            Listen::parse("[::1]:8787").unwrap(),
            Listen::Tcp("[::1]:8787".parse().unwrap())
        );
        let e = Listen::parse("0.0.0.0:8787").unwrap_err();
        assert!(e.to_string().contains("not loopback"), "{e}");
        assert!(Listen::parse("localhost:8787").is_err());
    }

    #[test]
    fn keys_come_from_the_environment_or_a_digest_never_both() {
        let digest = hex::encode(crate::api_keys::digest("a-key-of-sixteen-chars"));
        let text = format!(
            "[providers.acme]\ntoken_url = \"http://127.0.0.1:1/t\"\nclient_id = \"c\"\n\
             [serve]\nlisten = [\"tcp:127.0.0.1:0\"]\n\
             [serve.keys.ops]\nsecret_sha256 = \"{digest}\"\n"
        );
        let s = ServeSettings::parse(&text, &[], default()).unwrap();
        assert_eq!(s.listen, [Listen::Tcp("127.0.0.1:0".parse().unwrap())]);
        assert_eq!(
            s.keys
                .authenticate("a-key-of-sixteen-chars")
                .map(|k| k.name.as_str()),
            Some("ops")
        );
        assert_eq!(s.max_body_bytes, DEFAULT_MAX_BODY_BYTES);

        let both = format!("[serve.keys.x]\nsecret_sha256 = \"{digest}\"\nsecret_env = \"HOME\"\n");
        let e = ServeSettings::parse(&both, &[], default()).unwrap_err();
        assert!(e.to_string().contains("exactly one"), "{e}");
        let none = "[serve]\nlisten = []\n";
        let e = ServeSettings::parse(none, &[], default()).unwrap_err();
        assert!(e.to_string().contains("at least one API key"), "{e}");
        let unset = "[serve.keys.x]\nsecret_env = \"TOKENKEEP_TEST_SURELY_UNSET\"\n";
        let e = ServeSettings::parse(unset, &[], default()).unwrap_err();
        assert!(e.to_string().contains("is not set"), "{e}");
    }

    #[test]
    fn the_command_line_overrides_the_files_listeners() {
        let digest = hex::encode(crate::api_keys::digest("a-key-of-sixteen-chars"));
        let text = format!(
            "[serve]\nlisten = [\"tcp:127.0.0.1:1\"]\n[serve.keys.ops]\nsecret_sha256 = \"{digest}\"\n"
        );
        let s = ServeSettings::parse(&text, &["unix:/tmp/x.sock".into()], default()).unwrap();
        assert_eq!(s.listen, [Listen::Unix("/tmp/x.sock".into())]);
        let s = ServeSettings::parse(
            &format!("[serve.keys.ops]\nsecret_sha256 = \"{digest}\"\n"),
            &[],
            default(),
        )
        .unwrap();
        assert_eq!(s.listen, [default()]);
    }
}
