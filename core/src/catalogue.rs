//! The built-in provider catalogue: what each provider's token endpoint
//! expects and answers, as data. A host resolves its configuration through
//! [`resolve`] (the wasmtime host links this crate natively; the values end
//! up in the WIT `provider-config` the component reads), so adding a
//! provider is adding an entry here, not a branch in the refresh logic.
//!
//! Facts come from the providers' own documentation (linked per entry) and
//! are summarised in the README's provider table.

use crate::error::ErrorClass;

/// How the client authenticates at the token endpoint (RFC 6749 §2.3.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// `client_id` and `client_secret` in the form body.
    Body,
    /// HTTP Basic with the client id and secret.
    Basic,
}

/// A configuration value a provider's entry reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Setting {
    pub name: &'static str,
    /// None: the setting is required.
    pub default: Option<&'static str>,
    /// Sent as this form parameter with every refresh request.
    pub param: Option<&'static str>,
    pub doc: &'static str,
}

/// One catalogued provider.
#[derive(Debug, Clone, Copy)]
pub struct Spec {
    /// The `kind` in configuration; also the default when the provider's
    /// configured name is this kind.
    pub kind: &'static str,
    pub display_name: &'static str,
    /// `{setting}` placeholders are filled from the settings.
    pub token_url: &'static str,
    pub settings: &'static [Setting],
    pub client_auth: ClientAuth,
    /// Whether each refresh returns a new refresh token (RFC 9700 rotation).
    pub rotates_refresh_tokens: bool,
    /// How long a spent refresh token keeps working, when the provider
    /// tolerates reuse at all (Atlassian: ten minutes).
    pub reuse_leeway_seconds: u32,
    /// Provider-specific error codes, looked up before the RFC 6749 ones.
    pub error_codes: &'static [(&'static str, ErrorClass)],
    /// Access-token lifetime to assume when an answer omits `expires_in`.
    pub default_expires_in: Option<u32>,
    /// Refresh-token lifetime to assume when a new refresh token comes
    /// without `refresh_token_expires_in` (documented or inactivity limits).
    pub default_refresh_token_expires_in: Option<u32>,
    /// How long the provider lets a refresh token sit unused before it
    /// revokes it: a keeper refreshes idle tokens well within it.
    pub refresh_token_idle_seconds: Option<u32>,
    pub docs: &'static str,
}

const DAY: u32 = 86_400;

const BASE_URL_GITHUB: Setting = Setting {
    name: "base_url",
    default: Some("https://github.com"),
    param: None,
    doc: "GitHub Enterprise Server: your instance's URL",
};

/// Every built-in provider.
pub const CATALOGUE: &[Spec] = &[
    Spec {
        kind: "github",
        display_name: "GitHub (GitHub App user tokens)",
        token_url: "{base_url}/login/oauth/access_token",
        settings: &[BASE_URL_GITHUB],
        client_auth: ClientAuth::Body,
        rotates_refresh_tokens: true,
        reuse_leeway_seconds: 0,
        error_codes: &[
            ("bad_refresh_token", ErrorClass::ReauthorizationRequired),
            (
                "incorrect_client_credentials",
                ErrorClass::ProviderRejectedClient,
            ),
            ("bad_verification_code", ErrorClass::ReauthorizationRequired),
        ],
        default_expires_in: Some(8 * 3600),
        default_refresh_token_expires_in: Some(15_811_200),
        refresh_token_idle_seconds: None,
        docs: "https://docs.github.com/en/apps/creating-github-apps/authenticating-with-a-github-app/refreshing-user-access-tokens",
    },
    Spec {
        kind: "gitlab",
        display_name: "GitLab (gitlab.com or self-managed)",
        token_url: "{base_url}/oauth/token",
        settings: &[
            Setting {
                name: "base_url",
                default: Some("https://gitlab.com"),
                param: None,
                doc: "self-managed GitLab: your instance's URL",
            },
            Setting {
                name: "redirect_uri",
                default: Some(""),
                param: Some("redirect_uri"),
                doc: "the application's callback URL, which GitLab's documentation sends with refreshes",
            },
        ],
        client_auth: ClientAuth::Body,
        rotates_refresh_tokens: true,
        reuse_leeway_seconds: 0,
        error_codes: &[],
        default_expires_in: Some(2 * 3600),
        default_refresh_token_expires_in: None,
        refresh_token_idle_seconds: None,
        docs: "https://docs.gitlab.com/api/oauth2/",
    },
    Spec {
        kind: "bitbucket",
        display_name: "Bitbucket Cloud",
        token_url: "https://bitbucket.org/site/oauth2/access_token",
        settings: &[],
        client_auth: ClientAuth::Basic,
        rotates_refresh_tokens: true,
        reuse_leeway_seconds: 0,
        error_codes: &[],
        default_expires_in: Some(2 * 3600),
        default_refresh_token_expires_in: None,
        refresh_token_idle_seconds: None,
        docs: "https://developer.atlassian.com/cloud/bitbucket/oauth-2/",
    },
    Spec {
        kind: "google",
        display_name: "Google",
        token_url: "https://oauth2.googleapis.com/token",
        settings: &[],
        client_auth: ClientAuth::Body,
        rotates_refresh_tokens: false,
        reuse_leeway_seconds: 0,
        error_codes: &[],
        default_expires_in: Some(3600),
        default_refresh_token_expires_in: None,
        refresh_token_idle_seconds: Some(180 * DAY),
        docs: "https://developers.google.com/identity/protocols/oauth2/web-server#offline",
    },
    Spec {
        kind: "slack",
        display_name: "Slack (token rotation)",
        token_url: "https://slack.com/api/oauth.v2.access",
        settings: &[],
        client_auth: ClientAuth::Body,
        rotates_refresh_tokens: true,
        reuse_leeway_seconds: 0,
        error_codes: &[
            ("invalid_refresh_token", ErrorClass::ReauthorizationRequired),
            ("token_revoked", ErrorClass::ReauthorizationRequired),
            ("token_expired", ErrorClass::ReauthorizationRequired),
            ("invalid_client_id", ErrorClass::ProviderRejectedClient),
            ("bad_client_secret", ErrorClass::ProviderRejectedClient),
            ("ratelimited", ErrorClass::ProviderUnavailable),
            ("internal_error", ErrorClass::ProviderUnavailable),
            ("fatal_error", ErrorClass::ProviderUnavailable),
        ],
        default_expires_in: Some(12 * 3600),
        default_refresh_token_expires_in: None,
        refresh_token_idle_seconds: None,
        docs: "https://api.slack.com/authentication/rotation",
    },
    Spec {
        kind: "atlassian",
        display_name: "Atlassian (Jira, Confluence)",
        token_url: "https://auth.atlassian.com/oauth/token",
        settings: &[],
        client_auth: ClientAuth::Body,
        rotates_refresh_tokens: true,
        reuse_leeway_seconds: 600,
        error_codes: &[("unauthorized_client", ErrorClass::ReauthorizationRequired)],
        default_expires_in: Some(3600),
        // Rotating tokens die after 90 days without use.
        default_refresh_token_expires_in: Some(90 * DAY),
        refresh_token_idle_seconds: Some(90 * DAY),
        docs: "https://developer.atlassian.com/cloud/jira/platform/oauth-2-3lo-apps/#use-a-refresh-token-to-get-another-access-token-and-refresh-token-pair",
    },
    Spec {
        kind: "microsoft",
        display_name: "Microsoft Entra ID / Azure DevOps",
        token_url: "https://login.microsoftonline.com/{tenant}/oauth2/v2.0/token",
        settings: &[
            Setting {
                name: "tenant",
                default: Some("common"),
                param: None,
                doc: "directory (tenant) id or domain, or common / organizations / consumers",
            },
            Setting {
                name: "scope",
                default: None,
                param: Some("scope"),
                doc: "space-separated scopes, required on every refresh (include offline_access)",
            },
        ],
        client_auth: ClientAuth::Body,
        rotates_refresh_tokens: true,
        reuse_leeway_seconds: 0,
        error_codes: &[
            ("interaction_required", ErrorClass::ReauthorizationRequired),
            ("consent_required", ErrorClass::ReauthorizationRequired),
            ("login_required", ErrorClass::ReauthorizationRequired),
        ],
        default_expires_in: Some(3600),
        default_refresh_token_expires_in: Some(90 * DAY),
        refresh_token_idle_seconds: Some(90 * DAY),
        docs: "https://learn.microsoft.com/en-us/entra/identity-platform/v2-oauth2-auth-code-flow#refresh-the-access-token",
    },
    Spec {
        kind: "linear",
        display_name: "Linear",
        token_url: "https://api.linear.app/oauth/token",
        settings: &[],
        client_auth: ClientAuth::Body,
        rotates_refresh_tokens: true,
        reuse_leeway_seconds: 0,
        error_codes: &[],
        default_expires_in: Some(DAY),
        default_refresh_token_expires_in: None,
        refresh_token_idle_seconds: None,
        docs: "https://linear.app/developers/oauth-2-0-authentication",
    },
];

/// The `kind` of providers defined entirely by configuration.
pub const CUSTOM: &str = "custom";

/// What a host needs to know about a configured provider, resolved from the
/// catalogue and the provider's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    pub kind: String,
    pub token_url: String,
    pub client_auth: ClientAuth,
    pub extra_params: Vec<(String, String)>,
    pub rotates_refresh_tokens: bool,
    pub reuse_leeway_seconds: u32,
    pub error_codes: Vec<(String, ErrorClass)>,
    pub default_expires_in: Option<u32>,
    pub default_refresh_token_expires_in: Option<u32>,
    pub refresh_token_idle_seconds: Option<u32>,
}

/// Why a provider's configuration does not resolve. Never quotes values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CatalogueError {
    #[error("unknown provider kind {0:?}; built in: {1}")]
    UnknownKind(String, String),
    #[error("{kind} needs the setting {setting}")]
    Missing { kind: String, setting: String },
    #[error("{kind} has no setting {setting}; it reads: {known}")]
    Unexpected {
        kind: String,
        setting: String,
        known: String,
    },
}

/// The entry of a kind.
pub fn spec(kind: &str) -> Option<&'static Spec> {
    CATALOGUE.iter().find(|s| s.kind == kind)
}

/// Resolves a catalogued provider's token URL, parameters and quirks from
/// its settings (`base_url`, `tenant`, `scope`, ...). Unknown settings are
/// refused so that a typo is not silently ignored.
pub fn resolve(kind: &str, settings: &[(&str, &str)]) -> Result<Resolved, CatalogueError> {
    let spec = spec(kind).ok_or_else(|| {
        let known: Vec<&str> = CATALOGUE.iter().map(|s| s.kind).collect();
        CatalogueError::UnknownKind(kind.into(), format!("{}, or {CUSTOM}", known.join(", ")))
    })?;
    if let Some((name, _)) = settings
        .iter()
        .find(|(name, _)| !spec.settings.iter().any(|s| s.name == *name))
    {
        let known: Vec<&str> = spec.settings.iter().map(|s| s.name).collect();
        return Err(CatalogueError::Unexpected {
            kind: kind.into(),
            setting: (*name).into(),
            known: if known.is_empty() {
                "nothing".into()
            } else {
                known.join(", ")
            },
        });
    }
    let mut token_url = spec.token_url.to_string();
    let mut extra_params = Vec::new();
    for setting in spec.settings {
        let given = settings
            .iter()
            .find(|(name, _)| *name == setting.name)
            .map(|(_, v)| *v);
        let value = given
            .or(setting.default)
            .ok_or_else(|| CatalogueError::Missing {
                kind: kind.into(),
                setting: setting.name.into(),
            })?;
        let placeholder = format!("{{{}}}", setting.name);
        token_url = token_url.replace(&placeholder, value.trim_end_matches('/'));
        if let Some(param) = setting.param.filter(|_| !value.is_empty()) {
            extra_params.push((param.to_string(), value.to_string()));
        }
    }
    Ok(Resolved {
        kind: kind.into(),
        token_url,
        client_auth: spec.client_auth,
        extra_params,
        rotates_refresh_tokens: spec.rotates_refresh_tokens,
        reuse_leeway_seconds: spec.reuse_leeway_seconds,
        error_codes: spec
            .error_codes
            .iter()
            .map(|(code, class)| ((*code).to_string(), *class))
            .collect(),
        default_expires_in: spec.default_expires_in,
        default_refresh_token_expires_in: spec.default_refresh_token_expires_in,
        refresh_token_idle_seconds: spec.refresh_token_idle_seconds,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templated_urls_take_their_settings_or_defaults() {
        let gitlab = resolve("gitlab", &[("base_url", "https://git.example.com/")]).unwrap();
        assert_eq!(gitlab.token_url, "https://git.example.com/oauth/token");
        assert!(gitlab.extra_params.is_empty());
        let github = resolve("github", &[]).unwrap();
        assert_eq!(
            github.token_url,
            "https://github.com/login/oauth/access_token"
        );
        let ms = resolve(
            "microsoft",
            &[
                ("tenant", "contoso.example"),
                ("scope", "offline_access User.Read"),
            ],
        )
        .unwrap();
        assert_eq!(
            ms.token_url,
            "https://login.microsoftonline.com/contoso.example/oauth2/v2.0/token"
        );
        assert_eq!(
            ms.extra_params,
            vec![("scope".to_string(), "offline_access User.Read".to_string())]
        );
    }

    #[test]
    fn a_missing_required_setting_and_a_typo_are_refused() {
        assert_eq!(
            resolve("microsoft", &[]),
            Err(CatalogueError::Missing {
                kind: "microsoft".into(),
                setting: "scope".into()
            })
        );
        assert!(matches!(
            resolve("gitlab", &[("baseurl", "https://x")]),
            Err(CatalogueError::Unexpected { .. })
        ));
        assert!(matches!(
            resolve("gitlub", &[]),
            Err(CatalogueError::UnknownKind(..))
        ));
    }

    #[test]
    fn every_entry_resolves_with_its_required_settings() {
        for spec in CATALOGUE {
            let required: Vec<(&str, &str)> = spec
                .settings
                .iter()
                .filter(|s| s.default.is_none())
                .map(|s| (s.name, "x"))
                .collect();
            let r = resolve(spec.kind, &required).unwrap();
            assert!(r.token_url.starts_with("https://"), "{}", spec.kind);
            assert!(!r.token_url.contains('{'), "{}", spec.kind);
        }
    }
}
