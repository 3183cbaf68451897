//! The seed's `refresh_provider_tokens`: refreshed copies of a conversation's
//! provider tokens, through the same single-flight refresh as `ensure-fresh`,
//! and the persistence that lets a conversation resume on another node.

use crate::error::RefreshError;
use crate::model::{AccessGrant, ConversationEntry, ProviderFailure, ProviderToken, TokenSet};
use crate::refresh::{Host, Keeper, check_user_id};
use crate::validity;

/// Longest conversation id accepted, in bytes.
pub const MAX_CONVERSATION_ID_LEN: usize = 256;

/// The outcome of a refresh: the refreshed copy, and the failures when the
/// caller asked for partial results.
pub type Refreshed = (Vec<ProviderToken>, Vec<ProviderFailure>);

impl<H: Host> Keeper<H> {
    /// Returns a refreshed copy of `settings` (the input is only borrowed).
    /// Without `partial`, the first provider that cannot be refreshed fails
    /// the call; with it, failures are listed and their input tokens kept.
    pub fn refresh_provider_tokens(
        &self,
        settings: &[ProviderToken],
        conversation_id: &str,
        user_id: &str,
        partial: bool,
    ) -> Result<Refreshed, ProviderFailure> {
        let whole = |error| ProviderFailure {
            provider: String::new(),
            error,
        };
        check_conversation_id(conversation_id).map_err(whole)?;
        check_user_id(user_id).map_err(whole)?;
        for (i, t) in settings.iter().enumerate() {
            if settings[..i].iter().any(|o| o.provider == t.provider) {
                return Err(ProviderFailure {
                    provider: t.provider.clone(),
                    error: RefreshError::InvalidInput("provider listed twice".into()),
                });
            }
        }
        let known = self
            .host()
            .conversation_entries(conversation_id)
            .map_err(|e| whole(e.into()))?;
        let now = self.now();
        // Record the conversation's providers first, so that a node that
        // dies halfway leaves a conversation another node can resume whole.
        for t in settings {
            let entry = known.iter().find(|e| e.provider == t.provider);
            if entry.is_none_or(|e| e.user_id != user_id || e.scopes != t.scopes) {
                if entry.is_none_or(|e| e.user_id != user_id) {
                    // First sight of this user's token: make sure a token row
                    // backs the entry (before writing it), so that `resume`
                    // works even if this token was fresh.
                    self.seed(t, user_id).map_err(|error| ProviderFailure {
                        provider: t.provider.clone(),
                        error,
                    })?;
                }
                let fresh_entry = ConversationEntry {
                    conversation_id: conversation_id.into(),
                    provider: t.provider.clone(),
                    user_id: user_id.into(),
                    scopes: t.scopes.clone(),
                    generation: entry
                        .filter(|e| e.user_id == user_id)
                        .map_or(0, |e| e.generation),
                    updated_at: now,
                };
                self.host()
                    .put_conversation_entry(&fresh_entry)
                    .map_err(|e| whole(e.into()))?;
            }
        }
        let mut out = Vec::with_capacity(settings.len());
        let mut failures = Vec::new();
        for t in settings {
            match self.refresh_one(t, user_id, now) {
                Ok((token, handed)) => {
                    if let Some(generation) = handed {
                        self.note_generation(
                            conversation_id,
                            &token.provider,
                            user_id,
                            &t.scopes,
                            generation,
                            &known,
                            now,
                        )
                        .map_err(|error| ProviderFailure {
                            provider: t.provider.clone(),
                            error,
                        })?;
                    }
                    out.push(token);
                }
                Err(error) => {
                    let failure = ProviderFailure {
                        provider: t.provider.clone(),
                        error,
                    };
                    if !partial {
                        return Err(failure);
                    }
                    failures.push(failure);
                    out.push(t.access_only());
                }
            }
        }
        Ok((out, failures))
    }

    /// The persisted settings of a conversation, refreshed first.
    pub fn resume(
        &self,
        conversation_id: &str,
    ) -> Result<Option<Vec<ProviderToken>>, ProviderFailure> {
        let whole = |error| ProviderFailure {
            provider: String::new(),
            error,
        };
        check_conversation_id(conversation_id).map_err(whole)?;
        let entries = self
            .host()
            .conversation_entries(conversation_id)
            .map_err(|e| whole(e.into()))?;
        if entries.is_empty() {
            return Ok(None);
        }
        let now = self.now();
        let mut out = Vec::with_capacity(entries.len());
        for e in &entries {
            let named = |error| ProviderFailure {
                provider: e.provider.clone(),
                error,
            };
            let (grant, _) = self.fresh(&e.provider, &e.user_id, 0).map_err(named)?;
            require_scopes(&e.scopes, &grant.scopes).map_err(named)?;
            if grant.generation != e.generation {
                self.note_generation(
                    conversation_id,
                    &e.provider,
                    &e.user_id,
                    &e.scopes,
                    grant.generation,
                    &entries,
                    now,
                )
                .map_err(named)?;
            }
            out.push(token_from_grant(grant));
        }
        Ok(Some(out))
    }

    /// What is persisted for a conversation.
    pub fn conversation_entries(
        &self,
        conversation_id: &str,
    ) -> Result<Vec<ConversationEntry>, RefreshError> {
        check_conversation_id(conversation_id)?;
        Ok(self.host().conversation_entries(conversation_id)?)
    }

    /// One provider token: unchanged when fresh, otherwise the newest from its
    /// token row, refreshed under the row lock if needed. Returns the row
    /// generation handed out, if the row was involved.
    fn refresh_one(
        &self,
        t: &ProviderToken,
        user_id: &str,
        now: i64,
    ) -> Result<(ProviderToken, Option<u64>), RefreshError> {
        let config = self.config(&t.provider)?;
        let stale = match t.obtained_at {
            Some(obtained) => validity::needs_refresh(
                obtained,
                t.expires_at,
                now,
                config.refresh_threshold_seconds,
            ),
            None => validity::needs_refresh_by_threshold(
                t.expires_at,
                now,
                config.refresh_threshold_seconds,
            ),
        };
        if !stale {
            // As it came, less the refresh token: that stays in the keeper.
            return Ok((t.access_only(), None));
        }
        // The token row holds the refresh chain. A conversation that brings
        // a token tokenkeep has never seen seeds it.
        if self.host().read(&t.provider, user_id)?.row.is_none() {
            self.seed(t, user_id)?;
        }
        // What this conversation relies on decides, not the whole
        // authorisation: a scope it never used may have been narrowed away.
        let (grant, _) = self.fresh(&t.provider, user_id, 0)?;
        require_scopes(&t.scopes, &grant.scopes)?;
        let generation = grant.generation;
        Ok((token_from_grant(grant), Some(generation)))
    }

    /// Stores `t` as the user's token row unless one exists. Insert-if-absent:
    /// a concurrent caller may have seeded and refreshed it meanwhile, and its
    /// rotated chain must win.
    fn seed(&self, t: &ProviderToken, user_id: &str) -> Result<bool, RefreshError> {
        let seed = TokenSet {
            access_token: t.access_token.clone(),
            refresh_token: t.refresh_token.clone(),
            access_token_expires_at: t.expires_at,
            refresh_token_expires_at: t.refresh_token_expires_at,
            scopes: t.scopes.clone(),
        };
        // Without a time of issue, assume a lifetime of twice the threshold:
        // the half-life window is then the threshold, the seed's own rule.
        let threshold = i64::from(self.config(&t.provider)?.refresh_threshold_seconds);
        let obtained_at = t
            .obtained_at
            .or_else(|| t.expires_at.map(|at| at - 2 * threshold))
            .unwrap_or_else(|| self.now());
        self.seed_tokens(&t.provider, user_id, &seed, obtained_at)
    }

    #[allow(clippy::too_many_arguments)]
    fn note_generation(
        &self,
        conversation_id: &str,
        provider: &str,
        user_id: &str,
        scopes: &[String],
        generation: u64,
        known: &[ConversationEntry],
        now: i64,
    ) -> Result<(), RefreshError> {
        if known
            .iter()
            .any(|e| e.provider == provider && e.generation == generation && e.user_id == user_id)
        {
            return Ok(());
        }
        let entry = ConversationEntry {
            conversation_id: conversation_id.into(),
            provider: provider.into(),
            user_id: user_id.into(),
            scopes: scopes.to_vec(),
            generation,
            updated_at: now,
        };
        Ok(self.host().put_conversation_entry(&entry)?)
    }
}

/// Every scope the conversation relies on must still be granted.
fn require_scopes(required: &[String], granted: &[String]) -> Result<(), RefreshError> {
    let missing: Vec<String> = required
        .iter()
        .filter(|s| !granted.contains(s))
        .cloned()
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(RefreshError::ScopeMismatch(missing))
    }
}

/// A conversation's copy of a grant: the access token only.
fn token_from_grant(g: AccessGrant) -> ProviderToken {
    ProviderToken {
        provider: g.provider,
        access_token: g.access_token,
        refresh_token: None,
        expires_at: g.expires_at,
        refresh_token_expires_at: None,
        obtained_at: Some(g.obtained_at),
        scopes: g.scopes,
    }
}

/// Conversation ids are stored verbatim: any text without control characters.
pub fn check_conversation_id(id: &str) -> Result<(), RefreshError> {
    if id.is_empty() || id.len() > MAX_CONVERSATION_ID_LEN || id.chars().any(char::is_control) {
        return Err(RefreshError::InvalidInput(format!(
            "conversation id must be 1-{MAX_CONVERSATION_ID_LEN} bytes without control characters"
        )));
    }
    Ok(())
}
