//! MCP servers as providers: from a server's URL to its authorisation
//! server's endpoints and a client registered there, as the MCP
//! authorisation spec has clients do it. The protected-resource metadata
//! (RFC 9728) names the authorisation server; its metadata (RFC 8414, or
//! OpenID Connect discovery) names the endpoints; when no client is
//! configured, a public one is registered (RFC 7591). The registration is
//! kept in the database, so that every process of every host uses the same
//! client (tokens are bound to the client that got them), and the resource
//! indicator (RFC 8707) goes with every authorisation and token request.

use crate::config::Provider;
use crate::error::Error;
use crate::keeper::Keeper;
use crate::storage::Registration;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// The largest metadata document or registration answer read.
const MAX_METADATA_BYTES: usize = 256 * 1024;

/// What discovery found: the endpoints and scopes, kept with the
/// registration (no secrets).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Discovered {
    /// The protected resource's identifier: the `resource` sent.
    pub resource: String,
    pub issuer: String,
    pub authorization_endpoint: Option<String>,
    pub token_endpoint: String,
    pub device_authorization_endpoint: Option<String>,
    pub revocation_endpoint: Option<String>,
    pub registration_endpoint: Option<String>,
    /// What to ask for: the resource's scopes, and `offline_access` where
    /// the server offers it (so that it issues a refresh token).
    pub scopes: Vec<String>,
}

#[derive(Deserialize)]
struct ResourceMetadata {
    resource: String,
    #[serde(default)]
    authorization_servers: Vec<String>,
    #[serde(default)]
    scopes_supported: Vec<String>,
}

#[derive(Deserialize)]
struct ServerMetadata {
    issuer: String,
    authorization_endpoint: Option<String>,
    token_endpoint: Option<String>,
    device_authorization_endpoint: Option<String>,
    revocation_endpoint: Option<String>,
    registration_endpoint: Option<String>,
    #[serde(default)]
    scopes_supported: Vec<String>,
    #[serde(default)]
    code_challenge_methods_supported: Vec<String>,
}

/// Where a well-known document of `url` may be (RFC 8414 section 3.1,
/// RFC 9728 section 3.1): the suffix inserted between the host and the
/// path, then (for a URL with a path) at the root.
fn well_known(url: &url::Url, suffix: &str) -> Vec<String> {
    let origin = url.origin().ascii_serialization();
    let path = url.path().trim_end_matches('/');
    let mut out = Vec::new();
    if !path.is_empty() {
        out.push(format!("{origin}/.well-known/{suffix}{path}"));
    }
    out.push(format!("{origin}/.well-known/{suffix}"));
    out
}

impl Keeper {
    /// Makes a provider configured with `mcp_url` ready to connect: its
    /// registration from the database, or discovery and registration now.
    /// Other providers are ready as they are.
    pub async fn prepare(&self, provider: &str) -> Result<Provider, Error> {
        self.prepare_with_redirect(provider, None).await
    }

    /// [`Keeper::prepare`] for a service, whose callback (`redirect_uri`)
    /// is registered too when this call registers the client. A client
    /// registered earlier by a command line keeps its redirects: connect
    /// such a provider where it was registered.
    pub async fn prepare_with_redirect(
        &self,
        provider: &str,
        redirect_uri: Option<&str>,
    ) -> Result<Provider, Error> {
        let p = self.provider(provider)?;
        let Some(mcp_url) = p.mcp_url.clone() else {
            return Ok(p);
        };
        if p.registration.is_some() {
            return Ok(p);
        }
        if let Some(p) = self.load_registration(provider).await? {
            return Ok(p);
        }
        let discovered = self.discover(&p, &mcp_url).await?;
        let client_id = if p.client_id.is_empty() {
            self.register(&p, &discovered, redirect_uri).await?
        } else {
            p.client_id.clone()
        };
        let metadata = serde_json::to_string(&discovered)
            .map_err(|e| Error::Config(format!("discovered metadata: {e}")))?;
        let registration = Registration {
            provider: provider.into(),
            resource: mcp_url,
            metadata,
            client_id,
            registered_at: self.now(),
        };
        // The first process to register wins; the others use its client.
        let kept = self
            .store()
            .register_client(&registration)
            .await
            .map_err(Error::from)?;
        tracing::info!(
            provider,
            "registered with the MCP server's authorisation server"
        );
        self.apply_registration(provider, &kept)
    }

    /// A registration another process made, applied to this keeper's
    /// configuration; none when there is none yet.
    pub(crate) async fn load_registration(
        &self,
        provider: &str,
    ) -> Result<Option<Provider>, Error> {
        let Some(r) = self
            .store()
            .registration(provider)
            .await
            .map_err(Error::from)?
        else {
            return Ok(None);
        };
        let p = self.provider(provider)?;
        if p.mcp_url.as_deref() != Some(r.resource.as_str()) {
            // Made for another server than the one configured now.
            return Ok(None);
        }
        self.apply_registration(provider, &r).map(Some)
    }

    /// Applies `r` to the configuration running now (not a copy taken
    /// earlier, which a reload may have replaced meanwhile), if the
    /// provider still names the same MCP server.
    fn apply_registration(&self, provider: &str, r: &Registration) -> Result<Provider, Error> {
        self.update_config(|config| {
            let p = config
                .providers
                .get_mut(provider)
                .ok_or_else(|| Error::UnknownProvider(provider.into()))?;
            if p.mcp_url.as_deref() != Some(r.resource.as_str()) {
                return Err(Error::Config(format!(
                    "provider {provider} names another MCP server now"
                )));
            }
            p.apply_registration(r)?;
            Ok(p.clone())
        })
    }

    async fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        p: &Provider,
        url: &str,
    ) -> Result<Option<T>, Error> {
        let fetched = crate::outbound::fetch(
            http::Method::GET,
            url,
            &[("accept", "application/json".into())],
            Vec::new(),
            &p.tls,
            Duration::from_millis(u64::from(p.timeout_ms)),
            MAX_METADATA_BYTES,
        )
        .await
        .map_err(|e| Error::ProviderUnavailable(format!("discovery: {e}")))?;
        match fetched.status {
            200 => serde_json::from_slice(&fetched.body)
                .map(Some)
                .map_err(|_| {
                    Error::InvalidProviderResponse(format!("discovery: {url} is not metadata JSON"))
                }),
            s if s >= 500 => Err(Error::ProviderUnavailable(format!(
                "discovery: {url} answered {s}"
            ))),
            // Not here (404, 401, …): the next place is tried.
            _ => Ok(None),
        }
    }

    /// RFC 9728 then RFC 8414 (or OpenID Connect discovery), with the
    /// checks both require: the documents name the resource and the issuer
    /// they were fetched for.
    async fn discover(&self, p: &Provider, mcp_url: &str) -> Result<Discovered, Error> {
        let url = url::Url::parse(mcp_url)
            .map_err(|_| Error::Config(format!("provider {}: mcp_url", p.name)))?;
        // What a server names is checked like configuration, and more: an
        // https MCP server cannot send the keeper to plain http (loopback
        // included), and a client with credentials only talks to the
        // authorisation server its configuration pins.
        let endpoint = |what: &str, u: &str| -> Result<String, Error> {
            let checked = crate::config::endpoint_url(&p.name, what, u)?;
            if url.scheme() == "https" && !checked.starts_with("https:") {
                return Err(Error::InvalidProviderResponse(format!(
                    "the MCP server's metadata names a {what} that is not https"
                )));
            }
            Ok(checked)
        };
        let mut resource = None;
        for candidate in well_known(&url, "oauth-protected-resource") {
            if let Some(m) = self.get_json::<ResourceMetadata>(p, &candidate).await? {
                resource = Some(m);
                break;
            }
        }
        let resource = resource.ok_or_else(|| {
            Error::Config(format!(
                "provider {}: {mcp_url} publishes no protected-resource metadata (RFC 9728)",
                p.name
            ))
        })?;
        if !same_url(&resource.resource, mcp_url) {
            return Err(Error::InvalidProviderResponse(
                "the protected-resource metadata names another resource than the MCP server's URL"
                    .into(),
            ));
        }
        let issuer = resource
            .authorization_servers
            .first()
            .cloned()
            .ok_or_else(|| {
                Error::InvalidProviderResponse(
                    "the protected-resource metadata names no authorisation server".into(),
                )
            })?;
        if let Some(pinned) = &p.issuer
            && !same_url(pinned, &issuer)
        {
            return Err(Error::InvalidProviderResponse(format!(
                "the MCP server names another authorisation server than the configured issuer {pinned}"
            )));
        }
        let issuer_url = endpoint("authorization server", &issuer)?;
        let issuer_url = url::Url::parse(&issuer_url)
            .map_err(|_| Error::Config(format!("provider {}: authorization server", p.name)))?;
        let mut candidates = well_known(&issuer_url, "oauth-authorization-server");
        candidates.extend(well_known(&issuer_url, "openid-configuration"));
        candidates.push(format!(
            "{}/.well-known/openid-configuration",
            issuer.trim_end_matches('/')
        ));
        let mut server = None;
        for candidate in candidates {
            if let Some(m) = self.get_json::<ServerMetadata>(p, &candidate).await? {
                server = Some(m);
                break;
            }
        }
        let server = server.ok_or_else(|| {
            Error::InvalidProviderResponse(format!(
                "the authorisation server {issuer} publishes no metadata (RFC 8414)"
            ))
        })?;
        if !same_url(&server.issuer, &issuer) {
            return Err(Error::InvalidProviderResponse(
                "the authorisation server's metadata names another issuer".into(),
            ));
        }
        if server.authorization_endpoint.is_some()
            && !server
                .code_challenge_methods_supported
                .iter()
                .any(|m| m == "S256")
        {
            return Err(Error::InvalidProviderResponse(
                "the authorisation server does not say it supports PKCE with S256".into(),
            ));
        }
        let token_endpoint = server.token_endpoint.ok_or_else(|| {
            Error::InvalidProviderResponse("the authorisation server has no token endpoint".into())
        })?;
        let check = |what: &str, u: Option<String>| u.map(|u| endpoint(what, &u)).transpose();
        let mut scopes = resource.scopes_supported;
        if server
            .scopes_supported
            .iter()
            .any(|s| s == "offline_access")
            && !scopes.iter().any(|s| s == "offline_access")
        {
            scopes.push("offline_access".into());
        }
        Ok(Discovered {
            resource: mcp_url.to_string(),
            issuer,
            authorization_endpoint: check("authorization_endpoint", server.authorization_endpoint)?,
            token_endpoint: crate::config::endpoint_url(
                &p.name,
                "token_endpoint",
                &token_endpoint,
            )?,
            device_authorization_endpoint: check(
                "device_authorization_endpoint",
                server.device_authorization_endpoint,
            )?,
            revocation_endpoint: check("revocation_endpoint", server.revocation_endpoint)?,
            registration_endpoint: check("registration_endpoint", server.registration_endpoint)?,
            scopes,
        })
    }

    /// Registers a public native client (RFC 7591, RFC 8252): loopback
    /// redirects on any port, PKCE, refresh tokens, the device flow where
    /// the server has one.
    async fn register(
        &self,
        p: &Provider,
        d: &Discovered,
        redirect_uri: Option<&str>,
    ) -> Result<String, Error> {
        let Some(endpoint) = &d.registration_endpoint else {
            return Err(Error::Config(format!(
                "provider {}: the authorisation server takes no dynamic registration; \
                 configure client_id",
                p.name
            )));
        };
        let mut grant_types = vec!["authorization_code", "refresh_token"];
        if d.device_authorization_endpoint.is_some() {
            grant_types.push("urn:ietf:params:oauth:grant-type:device_code");
        }
        let mut redirect_uris = vec!["http://127.0.0.1/callback"];
        redirect_uris.extend(redirect_uri);
        let mut request = serde_json::json!({
            "client_name": "tokenkeep",
            "application_type": "native",
            "redirect_uris": redirect_uris,
            "grant_types": grant_types,
            "response_types": ["code"],
            "token_endpoint_auth_method": "none",
        });
        if !d.scopes.is_empty() {
            request["scope"] = d.scopes.join(" ").into();
        }
        let fetched = crate::outbound::fetch(
            http::Method::POST,
            endpoint,
            &[
                ("content-type", "application/json".into()),
                ("accept", "application/json".into()),
            ],
            request.to_string().into_bytes(),
            &p.tls,
            Duration::from_millis(u64::from(p.timeout_ms)),
            MAX_METADATA_BYTES,
        )
        .await
        .map_err(|e| Error::ProviderUnavailable(format!("client registration: {e}")))?;
        #[derive(Deserialize)]
        struct Registered {
            client_id: String,
        }
        match fetched.status {
            200 | 201 => serde_json::from_slice::<Registered>(&fetched.body)
                .map(|r| r.client_id)
                .map_err(|_| {
                    Error::InvalidProviderResponse(
                        "the registration answer names no client_id".into(),
                    )
                }),
            s if s >= 500 => Err(Error::ProviderUnavailable(format!(
                "client registration answered {s}"
            ))),
            s => Err(Error::ProviderRejectedClient(format!(
                "client registration refused ({s})"
            ))),
        }
    }
}

/// URLs equal but for a trailing slash.
fn same_url(a: &str, b: &str) -> bool {
    a.trim_end_matches('/') == b.trim_end_matches('/')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn well_known_documents_go_between_the_host_and_the_path() {
        let u = url::Url::parse("https://mcp.example.com/v1/mcp").unwrap();
        assert_eq!(
            well_known(&u, "oauth-protected-resource"),
            [
                "https://mcp.example.com/.well-known/oauth-protected-resource/v1/mcp",
                "https://mcp.example.com/.well-known/oauth-protected-resource",
            ]
        );
        let root = url::Url::parse("https://as.example.com").unwrap();
        assert_eq!(
            well_known(&root, "oauth-authorization-server"),
            ["https://as.example.com/.well-known/oauth-authorization-server"]
        );
    }
}
