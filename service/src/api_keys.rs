//! API keys: who may call the service, and which tokens each caller may
//! reach. A key is named (the name is what logs and the audit trail show)
//! and may be limited to providers and to user ids matching patterns, so
//! one tenant's agent cannot read another tenant's tokens.

use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// One configured key.
#[derive(Debug, Clone)]
pub struct ApiKey {
    pub name: String,
    /// SHA-256 of the secret: the configuration may hold only this, and a
    /// presented key is compared by its digest, in constant time.
    digest: [u8; 32],
    /// Provider names this key may reach; `None`: all.
    providers: Option<Vec<String>>,
    /// User id patterns (`*` matches any run of characters); `None`: all.
    users: Option<Vec<String>>,
}

impl ApiKey {
    /// A key whose secret is known (from the environment or the file).
    pub fn with_secret(
        name: &str,
        secret: &SecretString,
        providers: Option<Vec<String>>,
        users: Option<Vec<String>>,
    ) -> Self {
        Self::with_digest(name, digest(secret.expose_secret()), providers, users)
    }

    /// A key known by the SHA-256 of its secret only.
    pub fn with_digest(
        name: &str,
        digest: [u8; 32],
        providers: Option<Vec<String>>,
        users: Option<Vec<String>>,
    ) -> Self {
        Self {
            name: name.to_string(),
            digest,
            providers,
            users,
        }
    }

    /// Whether this key may reach (provider, user id).
    pub fn allows(&self, provider: &str, user_id: &str) -> bool {
        self.allows_provider(provider)
            && self
                .users
                .as_ref()
                .is_none_or(|patterns| patterns.iter().any(|p| glob(p, user_id)))
    }

    /// Whether this key may reach some user's tokens of `provider`.
    pub fn allows_provider(&self, provider: &str) -> bool {
        self.providers
            .as_ref()
            .is_none_or(|names| names.iter().any(|n| n == provider))
    }

    /// Whether this key is limited to some users' tokens.
    pub fn limited_to_users(&self) -> bool {
        self.users.is_some()
    }

    /// Whether this key reaches every token (no limits).
    pub fn unlimited(&self) -> bool {
        self.providers.is_none() && self.users.is_none()
    }
}

/// The configured keys.
#[derive(Debug, Clone, Default)]
pub struct ApiKeys {
    keys: Vec<ApiKey>,
}

impl ApiKeys {
    pub fn new(keys: Vec<ApiKey>) -> Self {
        Self { keys }
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The key whose secret is `presented`. Every key's digest is compared,
    /// in constant time, whichever matches.
    pub fn authenticate(&self, presented: &str) -> Option<&ApiKey> {
        let presented = digest(presented);
        let mut found = None;
        for key in &self.keys {
            if bool::from(key.digest.ct_eq(&presented)) {
                found = Some(key);
            }
        }
        found
    }
}

/// SHA-256 of a secret, as keys are compared.
pub fn digest(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// `*` matches any run of characters (none included); everything else
/// matches itself.
fn glob(pattern: &str, text: &str) -> bool {
    let mut parts = pattern.split('*');
    let Some(first) = parts.next() else {
        return text.is_empty();
    };
    let Some(mut rest) = text.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        // No `*`: the whole text must be the pattern.
        return rest.is_empty();
    };
    for part in middle {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_whole_user_ids() {
        assert!(glob("tenant-a:*", "tenant-a:alice"));
        assert!(glob("tenant-a:*", "tenant-a:"));
        assert!(!glob("tenant-a:*", "tenant-ab:alice"));
        assert!(!glob("tenant-a:*", "x-tenant-a:alice"));
        assert!(glob("alice", "alice"));
        assert!(!glob("alice", "alice2"));
        assert!(glob("*", ""));
        assert!(glob("*@example.com", "bob@example.com"));
        assert!(!glob("*@example.com", "bob@example.com.evil"));
        assert!(glob("a*b*c", "a-b-b-c"));
        assert!(!glob("a*b*c", "a-c"));
        assert!(
            !glob("ab*ba", "aba"),
            "the prefix and suffix may not overlap"
        );
    }

    #[test]
    fn a_key_is_found_by_its_secret_and_limited_to_its_scope() {
        let keys = ApiKeys::new(vec![
            ApiKey::with_secret(
                "tenant-a",
                &SecretString::from("s3cret-a"),
                Some(vec!["github".into()]),
                Some(vec!["a:*".into()]),
            ),
            ApiKey::with_digest("ops", digest("s3cret-ops"), None, None),
        ]);
        let a = keys.authenticate("s3cret-a").map(|k| k.name.as_str());
        assert_eq!(a, Some("tenant-a"));
        assert_eq!(
            keys.authenticate("s3cret-ops").map(|k| k.name.as_str()),
            Some("ops")
        );
        assert!(keys.authenticate("s3cret-").is_none());
        assert!(keys.authenticate("").is_none());
        let a = keys.authenticate("s3cret-a").unwrap();
        assert!(a.allows("github", "a:alice"));
        assert!(!a.allows("github", "b:bob"));
        assert!(!a.allows("gitlab", "a:alice"));
        assert!(!a.unlimited());
    }
}
