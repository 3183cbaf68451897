//! Conversation settings on the host side: secret-typed, and the JSON shape
//! of the seed's `settings.provider_tokens` that the CLI reads and prints.

use crate::bindings::tokenkeep::oauth::types as wit;
use crate::error::Error;
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Map, Value, json};

/// One provider's token in a conversation. Debug redacts the tokens.
pub use tokenkeep_core::model::ProviderToken;

/// The provider tokens a runtime holds for one conversation.
#[derive(Debug, Clone, Default)]
pub struct ConversationSettings {
    pub provider_tokens: Vec<ProviderToken>,
}

impl ConversationSettings {
    /// The rows the settings name for `user_id`: (provider, user id).
    pub(crate) fn rows<'a>(&'a self, user_id: &'a str) -> Vec<(&'a str, &'a str)> {
        self.provider_tokens
            .iter()
            .map(|t| (t.provider.as_str(), user_id))
            .collect()
    }
}

/// A conversation-level failure, naming the provider it came from.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{error}", if provider.is_empty() { String::new() } else { format!("provider {provider}: ") })]
pub struct ConversationError {
    /// Empty when the failure is not about one provider (bad ids, storage).
    pub provider: String,
    pub error: Error,
}

impl ConversationError {
    /// A failure of the whole call, about no one provider.
    pub fn whole(error: Error) -> Self {
        Self {
            provider: String::new(),
            error,
        }
    }
}

/// A partial refresh: what could be refreshed, and what failed.
#[derive(Debug, Clone)]
pub struct PartialRefresh {
    pub settings: ConversationSettings,
    pub failures: Vec<ConversationError>,
}

impl ConversationSettings {
    /// Parses `{"provider_tokens": {"github": {"token": …, "refresh_token": …,
    /// "expires_at": …, "refresh_token_expires_at": …, "obtained_at": …,
    /// "scopes": [...]}}}`. Errors never quote the input.
    pub fn from_json(bytes: &[u8]) -> Result<Self, Error> {
        let bad = |what: &str| Error::InvalidInput(format!("settings: {what}"));
        let value: Value = serde_json::from_slice(bytes).map_err(|e| {
            bad(&format!(
                "not JSON (line {}, column {})",
                e.line(),
                e.column()
            ))
        })?;
        let tokens = value
            .get("provider_tokens")
            .and_then(Value::as_object)
            .ok_or_else(|| bad("no provider_tokens object"))?;
        let mut provider_tokens = Vec::with_capacity(tokens.len());
        for (provider, t) in tokens {
            let field = |name: &str| t.get(name).filter(|v| !v.is_null());
            let secret = |name: &str| -> Result<Option<SecretString>, Error> {
                match field(name) {
                    None => Ok(None),
                    Some(Value::String(s)) => Ok(Some(SecretString::from(s.clone()))),
                    Some(_) => Err(bad(&format!("{provider}.{name} is not a string"))),
                }
            };
            let time = |name: &str| -> Result<Option<i64>, Error> {
                match field(name) {
                    None => Ok(None),
                    Some(v) => v
                        .as_i64()
                        .map(Some)
                        .ok_or_else(|| bad(&format!("{provider}.{name} is not an integer"))),
                }
            };
            let scopes = match field("scopes") {
                None => Vec::new(),
                Some(Value::Array(items)) => items
                    .iter()
                    .map(|s| {
                        s.as_str()
                            .map(str::to_string)
                            .ok_or_else(|| bad(&format!("{provider}.scopes holds a non-string")))
                    })
                    .collect::<Result<_, _>>()?,
                Some(_) => return Err(bad(&format!("{provider}.scopes is not a list"))),
            };
            provider_tokens.push(ProviderToken {
                provider: provider.clone(),
                access_token: secret("token")?
                    .ok_or_else(|| bad(&format!("{provider}.token is missing")))?,
                refresh_token: secret("refresh_token")?,
                expires_at: time("expires_at")?,
                refresh_token_expires_at: time("refresh_token_expires_at")?,
                obtained_at: time("obtained_at")?,
                scopes,
            });
        }
        Ok(Self { provider_tokens })
    }

    /// The same JSON shape, tokens included: for handing to a runtime.
    pub fn to_json(&self) -> String {
        let mut tokens = Map::new();
        for t in &self.provider_tokens {
            tokens.insert(
                t.provider.clone(),
                json!({
                    "token": t.access_token.expose_secret(),
                    "refresh_token": t.refresh_token.as_ref().map(|r| r.expose_secret()),
                    "expires_at": t.expires_at,
                    "refresh_token_expires_at": t.refresh_token_expires_at,
                    "obtained_at": t.obtained_at,
                    "scopes": t.scopes,
                }),
            );
        }
        json!({ "provider_tokens": tokens }).to_string()
    }

    pub(crate) fn to_wit(&self) -> wit::ConversationSettings {
        wit::ConversationSettings {
            provider_tokens: self
                .provider_tokens
                .iter()
                .map(|t| wit::ProviderToken {
                    provider: t.provider.clone(),
                    access_token: t.access_token.expose_secret().to_string(),
                    refresh_token: t
                        .refresh_token
                        .as_ref()
                        .map(|r| r.expose_secret().to_string()),
                    expires_at: t.expires_at,
                    refresh_token_expires_at: t.refresh_token_expires_at,
                    obtained_at: t.obtained_at,
                    scopes: t.scopes.clone(),
                })
                .collect(),
        }
    }

    pub(crate) fn from_wit(s: wit::ConversationSettings) -> Self {
        Self {
            provider_tokens: s
                .provider_tokens
                .into_iter()
                .map(|t| ProviderToken {
                    provider: t.provider,
                    access_token: t.access_token.into(),
                    refresh_token: t.refresh_token.map(SecretString::from),
                    expires_at: t.expires_at,
                    refresh_token_expires_at: t.refresh_token_expires_at,
                    obtained_at: t.obtained_at,
                    scopes: t.scopes,
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_round_trip_and_debug_redacts() {
        let json = br#"{"provider_tokens":{"github":{"token":"gho_SECRET1","refresh_token":"ghr_SECRET2","expires_at":1900000000,"scopes":["repo"]}}}"#;
        let s = ConversationSettings::from_json(json).unwrap();
        let debug = format!("{s:?}");
        assert!(!debug.contains("SECRET"), "{debug}");
        let again = ConversationSettings::from_json(s.to_json().as_bytes()).unwrap();
        assert_eq!(
            again.provider_tokens[0].access_token.expose_secret(),
            "gho_SECRET1"
        );
        assert_eq!(again.provider_tokens[0].expires_at, Some(1_900_000_000));
    }

    #[test]
    fn malformed_settings_are_typed_errors_that_quote_nothing() {
        for bad in [
            &br#"{"provider_tokens":{"github":{"refresh_token":"ghr_SECRET"}}}"#[..],
            br#"{"provider_tokens":{"github":{"token":"gho_SECRET","expires_at":"soon"}}}"#,
            br#"{"tokens":{}}"#,
            br#"{"provider_tokens":{"github":{"token":"gho_SECRET""#,
        ] {
            let e = ConversationSettings::from_json(bad).unwrap_err();
            assert!(matches!(e, Error::InvalidInput(_)), "{e:?}");
            assert!(!e.to_string().contains("SECRET"), "{e}");
        }
    }
}
