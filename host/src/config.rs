//! Provider configuration from a TOML file, and the knobs of the host.

use crate::error::Error;
use secrecy::SecretString;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::Path;
use tokenkeep_core::catalogue;

/// Default proactive refresh threshold (capped at half a token's lifetime).
pub const DEFAULT_REFRESH_THRESHOLD_SECONDS: u32 = 600;
/// Default total time for one provider call.
pub const DEFAULT_TIMEOUT_MS: u32 = 15_000;
/// Default cap on a token response.
pub const DEFAULT_MAX_RESPONSE_BYTES: u32 = 64 * 1024;
/// Default row-lock wait: comfortably longer than a provider call, so waiters
/// outlast the runtime that refreshes instead of giving up on a healthy token.
pub const DEFAULT_LOCK_WAIT_MS: u32 = 45_000;

/// How the client authenticates at the authorisation server's endpoints
/// (RFC 6749 section 2.3.1, RFC 7523): always attached by the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum ClientAuth {
    /// `client_id` and `client_secret` in the form body
    /// (`client_secret_post`).
    #[default]
    #[serde(alias = "client-secret-post")]
    Body,
    /// HTTP Basic with the client id and secret (`client_secret_basic`).
    #[serde(alias = "client-secret-basic")]
    Basic,
    /// A public client: only `client_id` in the form body.
    None,
    /// A JWT signed with the host's private key (`private_key_jwt`).
    PrivateKeyJwt,
}

/// How the keeper gets and renews a provider's tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Grant {
    /// A user authorises (`connect`, or tokens put from outside); the
    /// refresh token renews them.
    #[default]
    AuthorizationCode,
    /// A machine client: the client-credentials grant gets and renews the
    /// token, and no refresh token is kept.
    ClientCredentials,
    /// RFC 8693: the token is got and renewed by exchanging the same
    /// user's access token at `subject_provider`; no refresh token is kept.
    TokenExchange,
}

impl Grant {
    /// Whether the host renews with a grant of its own (WIT `host-grant`).
    pub fn is_host_grant(self) -> bool {
        self != Grant::AuthorizationCode
    }
}

/// Default number of provider calls per refresh (the first included).
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;

/// One configured provider: its catalogue entry (or custom definition)
/// resolved, and its client credentials read.
#[derive(Debug, Clone)]
pub struct Provider {
    pub name: String,
    /// The catalogue entry, or `custom`.
    pub kind: String,
    /// Empty for an MCP server's provider until it is registered.
    pub token_url: String,
    /// Empty until registered, for an MCP server's provider without one.
    pub client_id: String,
    /// An MCP server whose authorisation server is discovered (RFC 9728).
    pub mcp_url: Option<String>,
    /// The authorisation server an MCP server must name: required when the
    /// client has credentials, which go to whatever server it names.
    pub issuer: Option<String>,
    /// The client registered with the discovered server, once there is one.
    pub registration: Option<crate::storage::Registration>,
    /// Attached by the host to the outgoing request; never enters the sandbox.
    pub client_secret: Option<SecretString>,
    /// The `client_secret_env` variable that was not set: this provider's
    /// refreshes are refused until it is.
    pub client_secret_missing: Option<String>,
    pub client_auth: ClientAuth,
    /// For `private_key_jwt`: the key the host signs client assertions with.
    pub signing_key: Option<std::sync::Arc<crate::client_assertion::SigningKey>>,
    pub grant: Grant,
    /// Where a user authorises (RFC 6749 section 3.1), for `connect`.
    pub authorization_url: Option<String>,
    /// The device authorisation endpoint (RFC 8628), for `connect --device`.
    pub device_authorization_url: Option<String>,
    /// The revocation endpoint (RFC 7009): deleted tokens are revoked there.
    pub revocation_url: Option<String>,
    /// The scopes `connect` and the client-credentials grant ask for.
    pub scopes: Vec<String>,
    /// The RFC 8707 resource indicator sent with every authorisation and
    /// token request (an MCP server's URL).
    pub resource: Option<String>,
    /// For a token exchange: the provider whose access token (for the same
    /// user) is the subject token.
    pub subject_provider: Option<String>,
    /// For a token exchange: the `audience` asked for (RFC 8693 §2.1).
    pub audience: Option<String>,
    /// Tokens bound to a per-row proof key (DPoP, RFC 9449): every token
    /// request carries a proof, and runtimes present the key with the token.
    pub dpop: bool,
    /// TLS for the token URL: the web roots, or only `ca_bundle`'s CAs.
    pub tls: std::sync::Arc<rustls::ClientConfig>,
    pub extra_params: Vec<(String, String)>,
    pub refresh_threshold_seconds: u32,
    pub timeout_ms: u32,
    pub max_response_bytes: u32,
    pub rotates_refresh_tokens: bool,
    /// How long the provider still accepts a spent refresh token.
    pub reuse_leeway_seconds: u32,
    /// Whether a 4xx answer without an OAuth error is a refusal.
    pub bare_4xx_is_refusal: bool,
    pub error_codes: Vec<(String, tokenkeep_core::error::ErrorClass)>,
    pub default_expires_in: Option<u32>,
    pub default_refresh_token_expires_in: Option<u32>,
    /// How long the provider lets a refresh token sit unused before it
    /// revokes it (the catalogue's, or configured): the background
    /// refresher keeps idle tokens alive within it.
    pub refresh_token_idle_seconds: Option<u32>,
    pub max_attempts: u32,
    /// Filled from the lock wait: retries end well before waiters give up.
    pub retry_budget_ms: u32,
}

impl Provider {
    /// What the component and the shared retry rules know of this provider.
    pub fn contract(&self) -> tokenkeep_core::model::ProviderConfig {
        tokenkeep_core::model::ProviderConfig {
            name: self.name.clone(),
            refresh_threshold_seconds: self.refresh_threshold_seconds,
            timeout_ms: self.timeout_ms,
            max_response_bytes: self.max_response_bytes,
            kind: self.kind.clone(),
            error_codes: self.error_codes.clone(),
            default_expires_in: self.default_expires_in,
            default_refresh_token_expires_in: self.default_refresh_token_expires_in,
            rotates_refresh_tokens: self.rotates_refresh_tokens,
            max_attempts: self.max_attempts,
            retry_budget_ms: self.retry_budget_ms,
            bare_4xx_is_refusal: self.bare_4xx_is_refusal,
            reuse_leeway_seconds: self.reuse_leeway_seconds,
            host_grant: self.grant.is_host_grant(),
        }
    }
}

/// The whole configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub providers: BTreeMap<String, Provider>,
    /// How long a runtime waits for another's row lock.
    pub lock_wait_ms: u32,
    /// How long audit entries are kept; `None`: for ever.
    pub audit_retention_days: Option<u32>,
}

/// Default retention of the audit log.
pub const DEFAULT_AUDIT_RETENTION_DAYS: u32 = 90;

impl Default for Config {
    fn default() -> Self {
        Self {
            providers: BTreeMap::new(),
            lock_wait_ms: DEFAULT_LOCK_WAIT_MS,
            audit_retention_days: Some(DEFAULT_AUDIT_RETENTION_DAYS),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    lock_wait_ms: Option<u32>,
    /// 0: keep the audit log for ever.
    audit_retention_days: Option<u32>,
    #[serde(default)]
    providers: BTreeMap<String, RawProvider>,
    /// `tokenkeep serve`'s section (listeners, API keys, webhooks), read
    /// by tokenkeep-service from the same file.
    #[serde(default)]
    #[allow(dead_code)]
    serve: Option<toml::Table>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProvider {
    /// A catalogue entry; defaults to the provider's name when that is one,
    /// else `custom`.
    kind: Option<String>,
    /// Required for custom providers; overrides a catalogued one's URL
    /// (a proxy, a test endpoint).
    token_url: Option<String>,
    /// Required unless `mcp_url` registers a client.
    client_id: Option<String>,
    /// An MCP server: its authorisation server is discovered, and a public
    /// client registered with it when `client_id` is not set.
    mcp_url: Option<String>,
    issuer: Option<String>,
    client_secret: Option<String>,
    client_secret_env: Option<String>,
    client_auth: Option<ClientAuth>,
    /// PKCS#8 PEM file of the P-256 key for `client_auth = "private-key-jwt"`.
    private_key_file: Option<std::path::PathBuf>,
    /// The `kid` of that key at the provider, when it holds several.
    key_id: Option<String>,
    grant: Option<Grant>,
    authorization_url: Option<String>,
    device_authorization_url: Option<String>,
    revocation_url: Option<String>,
    #[serde(default)]
    scopes: Vec<String>,
    resource: Option<String>,
    subject_provider: Option<String>,
    audience: Option<String>,
    #[serde(default)]
    dpop: bool,
    /// PEM certificates to trust instead of the web roots (a private CA).
    ca_bundle: Option<std::path::PathBuf>,
    #[serde(default)]
    extra_params: BTreeMap<String, String>,
    refresh_threshold_seconds: Option<u32>,
    timeout_ms: Option<u32>,
    max_response_bytes: Option<u32>,
    max_attempts: Option<u32>,
    default_expires_in: Option<u32>,
    default_refresh_token_expires_in: Option<u32>,
    refresh_token_idle_seconds: Option<u32>,
    rotates_refresh_tokens: Option<bool>,
    reuse_leeway_seconds: Option<u32>,
    bare_4xx_is_refusal: Option<bool>,
    // Catalogue settings; which ones a kind reads is in its entry.
    base_url: Option<String>,
    tenant: Option<String>,
    scope: Option<String>,
    redirect_uri: Option<String>,
}

/// Where in `text` a TOML error is (` at line N`), without quoting it:
/// a value there may be a secret.
pub fn where_in(text: &str, e: &toml::de::Error) -> String {
    e.span()
        .map(|s| {
            let line = text[..s.start.min(text.len())].matches('\n').count() + 1;
            format!(" at line {line}")
        })
        .unwrap_or_default()
}

impl Config {
    /// The longest one refresh may talk to its provider, retries included:
    /// how long a refresher may hold a row lock without a word to the database.
    pub fn slowest_provider_call(&self) -> std::time::Duration {
        let ms = self
            .providers
            .values()
            .map(|p| p.timeout_ms.max(p.retry_budget_ms))
            .max()
            .unwrap_or(0);
        std::time::Duration::from_millis(u64::from(ms))
    }

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
            Error::Config(format!(
                "configuration is not valid TOML for tokenkeep{}",
                where_in(text, &e)
            ))
        })?;
        let mut providers: BTreeMap<String, Provider> = BTreeMap::new();
        for (name, p) in raw.providers {
            providers.insert(name.clone(), Provider::resolve(name, p)?);
        }
        for p in providers.values() {
            if let Some(subject) = &p.subject_provider {
                match providers.get(subject) {
                    Some(s) if s.grant == Grant::AuthorizationCode => {}
                    Some(_) => {
                        return Err(Error::Config(format!(
                            "provider {}: subject_provider {subject} must hold users' own tokens \
                             (grant = \"authorization-code\")",
                            p.name
                        )));
                    }
                    None => {
                        return Err(Error::Config(format!(
                            "provider {}: subject_provider {subject} is not configured",
                            p.name
                        )));
                    }
                }
            }
        }
        let lock_wait_ms = raw.lock_wait_ms.unwrap_or(DEFAULT_LOCK_WAIT_MS);
        if let Some(slow) = providers.values().find(|p| p.timeout_ms >= lock_wait_ms) {
            return Err(Error::Config(format!(
                "lock_wait_ms ({lock_wait_ms}) must exceed provider {}'s timeout_ms ({}): \
                 waiters must outlast the runtime that refreshes",
                slow.name, slow.timeout_ms
            )));
        }
        // Three quarters of the lock wait: retries finish while waiters
        // still wait, and their own next look at the row sees the outcome.
        let retry_budget_ms = lock_wait_ms / 4 * 3;
        for p in providers.values_mut() {
            p.retry_budget_ms = retry_budget_ms.max(p.timeout_ms);
        }
        Ok(Config {
            providers,
            lock_wait_ms,
            audit_retention_days: match raw.audit_retention_days {
                Some(0) => None,
                days => Some(days.unwrap_or(DEFAULT_AUDIT_RETENTION_DAYS)),
            },
        })
    }
}

impl Provider {
    fn resolve(name: String, p: RawProvider) -> Result<Self, Error> {
        let bad = |what: String| Err(Error::Config(format!("provider {name}: {what}")));
        if !tokenkeep_core::refresh::is_plain_name(&name) {
            return bad("name must be 1-64 characters of [A-Za-z0-9._-]".into());
        }
        if let Some(n) = p.max_attempts.filter(|n| !(1..=10).contains(n)) {
            return bad(format!("max_attempts must be 1-10, not {n}"));
        }
        let mut settings: Vec<(&str, &str)> = [
            ("base_url", &p.base_url),
            ("tenant", &p.tenant),
            ("scope", &p.scope),
            ("redirect_uri", &p.redirect_uri),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.as_deref().map(|v| (k, v)))
        .collect();
        let kind = match &p.kind {
            Some(kind) => kind.clone(),
            None if catalogue::spec(&name).is_some() => name.clone(),
            None if p.token_url.is_some() || p.mcp_url.is_some() => catalogue::CUSTOM.to_string(),
            None => {
                return bad(format!(
                    "not a built-in provider: set kind (one of {}) or token_url for a custom one",
                    catalogue::CATALOGUE
                        .iter()
                        .map(|s| s.kind)
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
        };
        let resolved = if kind == catalogue::CUSTOM {
            if let Some((setting, _)) = settings.first() {
                return bad(format!(
                    "{setting} is a setting of built-in providers; a custom one takes token_url and extra_params"
                ));
            }
            let token_url = match (&p.token_url, &p.mcp_url) {
                (Some(_), Some(_)) => {
                    return bad("set mcp_url (its endpoints are discovered) or token_url".into());
                }
                (Some(url), None) => url.clone(),
                // Discovered when the provider is first connected.
                (None, Some(_)) => String::new(),
                (None, None) => return bad("a custom provider needs token_url".into()),
            };
            catalogue::Resolved {
                kind: kind.clone(),
                token_url,
                client_auth: catalogue::ClientAuth::Body,
                extra_params: Vec::new(),
                rotates_refresh_tokens: p.rotates_refresh_tokens.unwrap_or(true),
                reuse_leeway_seconds: 0,
                error_codes: Vec::new(),
                default_expires_in: None,
                default_refresh_token_expires_in: None,
                refresh_token_idle_seconds: None,
            }
        } else {
            if p.rotates_refresh_tokens.is_some() {
                return bad(format!(
                    "rotates_refresh_tokens is known for {kind}; it is a setting of custom providers"
                ));
            }
            let spec = catalogue::spec(&kind);
            // A setting that is a request parameter (Microsoft's scope) may
            // also come as an extra parameter, as configurations before the
            // catalogue wrote it.
            for setting in spec.map(|s| s.settings).unwrap_or_default() {
                if let Some(param) = setting.param
                    && !settings.iter().any(|(k, _)| *k == setting.name)
                    && let Some(v) = p.extra_params.get(param)
                {
                    settings.push((setting.name, v.as_str()));
                }
            }
            let mut r = catalogue::resolve(&kind, &settings)
                .map_err(|e| Error::Config(format!("provider {name}: {e}")))?;
            if let Some(url) = &p.token_url {
                let templated = spec.is_some_and(|s| s.token_url.contains('{'));
                if let Some((setting, _)) = settings
                    .iter()
                    .find(|(k, _)| templated && matches!(*k, "base_url" | "tenant"))
                {
                    return bad(format!(
                        "token_url replaces the {kind} URL that {setting} would build: set one of them"
                    ));
                }
                r.token_url = url.clone();
            }
            r
        };
        let mcp_url = p
            .mcp_url
            .as_deref()
            .map(|u| endpoint_url(&name, "mcp_url", u))
            .transpose()?;
        if mcp_url.is_some()
            && (p.authorization_url.is_some()
                || p.device_authorization_url.is_some()
                || p.revocation_url.is_some()
                || p.resource.is_some())
        {
            return bad(
                "an MCP server's endpoints and resource are discovered from mcp_url".into(),
            );
        }
        let token_url = match &mcp_url {
            Some(_) => String::new(),
            None => endpoint_url(&name, "token_url", &resolved.token_url)?,
        };
        let Some(client_id) = p
            .client_id
            .clone()
            .or(mcp_url.as_ref().map(|_| String::new()))
        else {
            return bad("client_id is required (unless mcp_url registers one)".into());
        };
        let endpoint = |what: &str, url: &Option<String>| {
            url.as_deref()
                .map(|u| endpoint_url(&name, what, u))
                .transpose()
        };
        let authorization_url = endpoint("authorization_url", &p.authorization_url)?;
        let device_authorization_url =
            endpoint("device_authorization_url", &p.device_authorization_url)?;
        let revocation_url = endpoint("revocation_url", &p.revocation_url)?;
        let resource = endpoint("resource", &p.resource)?.or(mcp_url.clone());
        // A variable that is not set fails only the refreshes of this
        // provider: commands that use other providers, or none (listings,
        // key status), need not hold every provider's secret.
        let mut client_secret_missing = None;
        let client_secret = match (p.client_secret, p.client_secret_env) {
            (Some(_), Some(_)) => {
                return bad("set client_secret or client_secret_env, not both".into());
            }
            (Some(s), None) => Some(SecretString::from(s)),
            (None, Some(var)) => match std::env::var(&var) {
                Ok(s) if !s.is_empty() => Some(SecretString::from(s)),
                _ => {
                    client_secret_missing = Some(var);
                    None
                }
            },
            (None, None) => None,
        };
        let client_auth = p.client_auth.unwrap_or(match resolved.client_auth {
            // A registered MCP client is public.
            _ if mcp_url.is_some() && p.client_id.is_none() => ClientAuth::None,
            catalogue::ClientAuth::Body => ClientAuth::Body,
            catalogue::ClientAuth::Basic => ClientAuth::Basic,
        });
        if client_auth == ClientAuth::Basic
            && client_secret.is_none()
            && client_secret_missing.is_none()
        {
            return bad("client_auth = \"basic\" needs a client secret".into());
        }
        let signing_key = match (client_auth, &p.private_key_file) {
            (ClientAuth::PrivateKeyJwt, Some(path)) => Some(std::sync::Arc::new(
                crate::client_assertion::SigningKey::load(path, p.key_id.clone())
                    .map_err(|e| Error::Config(format!("provider {name}: {e}")))?,
            )),
            (ClientAuth::PrivateKeyJwt, None) => {
                return bad("client_auth = \"private-key-jwt\" needs private_key_file".into());
            }
            (_, Some(_)) => {
                return bad("private_key_file is for client_auth = \"private-key-jwt\"".into());
            }
            (_, None) => None,
        };
        if mcp_url.is_none() && p.issuer.is_some() {
            return bad("issuer pins an MCP server's authorisation server: set mcp_url".into());
        }
        if mcp_url.is_some()
            && p.issuer.is_none()
            && (client_secret.is_some() || client_secret_missing.is_some() || signing_key.is_some())
        {
            return bad(
                "a client with credentials for an MCP server needs issuer: its secret goes to \
                 the authorisation server the server names"
                    .into(),
            );
        }
        if matches!(client_auth, ClientAuth::None | ClientAuth::PrivateKeyJwt)
            && (client_secret.is_some() || client_secret_missing.is_some())
        {
            return bad(format!(
                "a client secret is not sent with client_auth = \"{}\"",
                if client_auth == ClientAuth::None {
                    "none"
                } else {
                    "private-key-jwt"
                }
            ));
        }
        let grant = p.grant.unwrap_or_default();
        if grant == Grant::ClientCredentials && client_auth == ClientAuth::None {
            return bad("grant = \"client-credentials\" needs a client that authenticates".into());
        }
        match (grant, &p.subject_provider) {
            (Grant::TokenExchange, None) => {
                return bad("grant = \"token-exchange\" needs subject_provider".into());
            }
            (Grant::TokenExchange, Some(_)) | (_, None) => {}
            (_, Some(_)) => {
                return bad("subject_provider is for grant = \"token-exchange\"".into());
            }
        }
        // The configuration's own parameters win over the catalogue's, and
        // no parameter is sent twice (RFC 6749 §3.1).
        let mut extra_params = resolved.extra_params;
        for (k, v) in p.extra_params {
            extra_params.retain(|(existing, _)| *existing != k);
            extra_params.push((k, v));
        }
        // The resource indicator is sent once, as `resource`.
        if resource.is_some() {
            extra_params.retain(|(k, _)| k != "resource");
        }
        Ok(Provider {
            kind,
            token_url,
            client_id,
            mcp_url,
            issuer: p
                .issuer
                .as_deref()
                .map(|u| endpoint_url(&name, "issuer", u))
                .transpose()?,
            registration: None,
            client_secret,
            client_secret_missing,
            client_auth,
            signing_key,
            grant,
            authorization_url,
            device_authorization_url,
            revocation_url,
            scopes: p.scopes,
            resource,
            subject_provider: p.subject_provider,
            audience: p.audience,
            dpop: p.dpop,
            tls: crate::outbound::client_tls(p.ca_bundle.as_deref())
                .map_err(|e| Error::Config(format!("provider {name}: {e}")))?,
            extra_params,
            rotates_refresh_tokens: resolved.rotates_refresh_tokens,
            reuse_leeway_seconds: p
                .reuse_leeway_seconds
                .unwrap_or(resolved.reuse_leeway_seconds),
            bare_4xx_is_refusal: p.bare_4xx_is_refusal.unwrap_or(true),
            error_codes: resolved.error_codes,
            default_expires_in: p.default_expires_in.or(resolved.default_expires_in),
            default_refresh_token_expires_in: p
                .default_refresh_token_expires_in
                .or(resolved.default_refresh_token_expires_in),
            refresh_token_idle_seconds: p
                .refresh_token_idle_seconds
                .or(resolved.refresh_token_idle_seconds),
            max_attempts: p.max_attempts.unwrap_or(DEFAULT_MAX_ATTEMPTS).clamp(1, 10),
            retry_budget_ms: 0,
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

impl Provider {
    /// Fills in what discovery found and the client registered for this
    /// MCP server's provider; configured values stand.
    pub fn apply_registration(&mut self, r: &crate::storage::Registration) -> Result<(), Error> {
        let d: crate::discovery::Discovered = serde_json::from_str(&r.metadata).map_err(|_| {
            Error::Config(format!(
                "provider {}: the stored registration does not read",
                self.name
            ))
        })?;
        self.token_url = d.token_endpoint;
        self.authorization_url = d.authorization_endpoint;
        self.device_authorization_url = d.device_authorization_endpoint;
        self.revocation_url = d.revocation_endpoint;
        if self.client_id.is_empty() {
            self.client_id = r.client_id.clone();
        }
        if self.scopes.is_empty() {
            self.scopes = d.scopes;
        }
        self.resource = Some(d.resource);
        self.registration = Some(r.clone());
        Ok(())
    }
}

/// An endpoint of the provider: absolute, and https unless on loopback.
pub(crate) fn endpoint_url(provider: &str, what: &str, url: &str) -> Result<String, Error> {
    let bad = |why: String| Error::Config(format!("provider {provider}: {what} {why}"));
    let url = url::Url::parse(url).map_err(|e| bad(format!("is not a URL: {e}")))?;
    if !matches!(url.scheme(), "https" | "http") || url.host_str().is_none() {
        return Err(bad("must be an absolute http(s) URL".into()));
    }
    if url.scheme() == "http" && !is_loopback(&url) {
        return Err(bad(
            "must use https (plain http is allowed on loopback only)".into(),
        ));
    }
    Ok(url.to_string())
}

fn is_loopback(url: &url::Url) -> bool {
    match url.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        Some(url::Host::Domain(d)) => d == "localhost",
        None => false,
    }
}

/// The built-in catalogue as JSON, for hosts in other languages
/// (`host/schema/catalogue.json`, checked against this by the tests): each
/// entry's fields by their Rust names, `client_auth` as `body` or `basic`,
/// error codes as `[code, class]`.
pub fn catalogue_json() -> String {
    let entries: Vec<serde_json::Value> = catalogue::CATALOGUE
        .iter()
        .map(|s| {
            serde_json::json!({
                "kind": s.kind,
                "display_name": s.display_name,
                "token_url": s.token_url,
                "settings": s.settings.iter().map(|t| serde_json::json!({
                    "name": t.name,
                    "default": t.default,
                    "param": t.param,
                    "doc": t.doc,
                })).collect::<Vec<_>>(),
                "client_auth": match s.client_auth {
                    catalogue::ClientAuth::Body => "body",
                    catalogue::ClientAuth::Basic => "basic",
                },
                "rotates_refresh_tokens": s.rotates_refresh_tokens,
                "reuse_leeway_seconds": s.reuse_leeway_seconds,
                "error_codes": s.error_codes.iter()
                    .map(|(code, class)| serde_json::json!([code, class.name()]))
                    .collect::<Vec<_>>(),
                "default_expires_in": s.default_expires_in,
                "default_refresh_token_expires_in": s.default_refresh_token_expires_in,
                "refresh_token_idle_seconds": s.refresh_token_idle_seconds,
                "docs": s.docs,
            })
        })
        .collect();
    let mut text = serde_json::to_string_pretty(&entries).unwrap_or_default();
    text.push('\n');
    text
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
