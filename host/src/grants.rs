//! Getting tokens in the first place, and giving them back: the
//! authorisation-code grant with PKCE (RFC 7636) through a redirect, the
//! device authorisation grant (RFC 8628), the client-credentials grant, and
//! revocation (RFC 7009) when tokens are deleted.
//!
//! These are the host's, not the component's: they are an operator's or a
//! user's act, not a race between runtimes, and they need what the sandbox
//! must never hold (the client's credentials, a code, a verifier). What
//! they get is stored through the component like any token, and renewed by
//! it from then on.

use crate::config::{Grant, Provider};
use crate::dpop::ProofKey;
use crate::error::Error;
use crate::keeper::{Keeper, TokenRecord, TokenSet};
use crate::token_endpoint::{Dpop, Form, oauth_error, send_form};
use base64::Engine as _;
use secrecy::{ExposeSecret, SecretString};
use std::time::Duration;
use tokenkeep_core::model::HttpAnswer;

/// The device grant's `grant_type` (RFC 8628 section 3.4).
const DEVICE_CODE_GRANT: &str = "urn:ietf:params:oauth:grant-type:device_code";
/// RFC 8628 section 3.5: the wait between polls when the server names none,
/// and what `slow_down` adds to it.
const DEVICE_POLL_SECONDS: u64 = 5;
/// The longest a device code is waited for, and between two polls.
const DEVICE_MAX_SECONDS: u64 = 3600;
const DEVICE_MAX_INTERVAL: u64 = 60;

/// An authorisation-code request waiting for the user's redirect. Holds the
/// PKCE verifier and the `state`, which never leave this value.
pub struct PendingAuthorization {
    /// Where to send the user.
    pub url: String,
    pub provider: String,
    pub redirect_uri: String,
    scopes: Vec<String>,
    state: SecretString,
    verifier: SecretString,
}

impl std::fmt::Debug for PendingAuthorization {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingAuthorization")
            .field("provider", &self.provider)
            .field("redirect_uri", &self.redirect_uri)
            .finish_non_exhaustive()
    }
}

impl PendingAuthorization {
    /// Whether a redirect's `state` is this request's (constant time).
    pub fn is_for(&self, state: &str) -> bool {
        let ours = self.state.expose_secret().as_bytes();
        ours.len() == state.len()
            && ours
                .iter()
                .zip(state.as_bytes())
                .fold(0u8, |d, (a, b)| d | (a ^ b))
                == 0
    }
}

/// What the redirect brought back (its query parameters).
#[derive(Default, Clone)]
pub struct Callback {
    pub code: Option<SecretString>,
    pub state: Option<String>,
    pub error: Option<String>,
    pub error_description: Option<String>,
}

impl std::fmt::Debug for Callback {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Callback")
            .field("error", &self.error)
            .finish_non_exhaustive()
    }
}

impl Callback {
    /// Reads a redirect's query string.
    pub fn from_query(query: &str) -> Self {
        let mut c = Callback::default();
        for (k, v) in url::form_urlencoded::parse(query.as_bytes()) {
            match &*k {
                "code" => c.code = Some(SecretString::from(v.into_owned())),
                "state" => c.state = Some(v.into_owned()),
                "error" => c.error = Some(v.into_owned()),
                "error_description" => c.error_description = Some(v.into_owned()),
                _ => {}
            }
        }
        c
    }
}

/// A device authorisation in progress: what to show the user, and what to
/// poll with.
pub struct DeviceAuthorization {
    pub provider: String,
    pub user_code: String,
    pub verification_uri: String,
    /// The URI with the code filled in, when the server gives one.
    pub verification_uri_complete: Option<String>,
    /// Seconds from the start until the codes expire.
    pub expires_in: u64,
    interval: u64,
    scopes: Vec<String>,
    device_code: SecretString,
}

impl std::fmt::Debug for DeviceAuthorization {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceAuthorization")
            .field("provider", &self.provider)
            .field("verification_uri", &self.verification_uri)
            .finish_non_exhaustive()
    }
}

/// What became of one token at the provider's revocation endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Revocation {
    Revoked,
    /// Not confirmed (not sent, refused, or the stored token could not be
    /// read): why. The token may stay valid at the provider until it expires.
    Failed(String),
}

/// The outcome of deleting a user's tokens: what was revoked at the
/// provider, refresh token first. `None`: no revocation was tried (the
/// provider has no revocation endpoint or is not configured, or there was
/// no such token), and a token stays valid there until it expires.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deletion {
    pub deleted: bool,
    pub refresh_token: Option<Revocation>,
    pub access_token: Option<Revocation>,
}

impl Deletion {
    /// The tokens whose revocation failed, with why: they may still be
    /// valid at the provider.
    pub fn not_revoked(&self) -> Vec<(&'static str, &str)> {
        [
            ("refresh token", &self.refresh_token),
            ("access token", &self.access_token),
        ]
        .into_iter()
        .filter_map(|(name, r)| match r {
            Some(Revocation::Failed(why)) => Some((name, why.as_str())),
            _ => None,
        })
        .collect()
    }
}

impl Keeper {
    /// Starts an authorisation-code grant with PKCE (S256) for `provider`:
    /// the URL to send the user to, and what [`Keeper::complete_authorization`]
    /// needs. `redirect_uri` is where the provider sends the user back (a
    /// loopback listener's, RFC 8252, or a service's callback).
    pub fn authorization_request(
        &self,
        provider: &str,
        redirect_uri: &str,
        scopes: Option<&[String]>,
    ) -> Result<PendingAuthorization, Error> {
        let p = self.provider(provider)?;
        let scopes = scopes.map_or_else(|| p.scopes.clone(), <[String]>::to_vec);
        let state = random_token()?;
        let verifier = random_token()?;
        let url = authorization_url(&p, redirect_uri, &scopes, state.expose_secret(), &verifier)?;
        Ok(PendingAuthorization {
            url,
            provider: provider.into(),
            redirect_uri: redirect_uri.into(),
            scopes,
            state,
            verifier,
        })
    }

    /// Exchanges the code a redirect brought for tokens, and stores them
    /// for `user_id` (replacing any). A redirect whose `state` is not the
    /// request's is refused before anything is sent.
    pub async fn complete_authorization(
        &self,
        pending: PendingAuthorization,
        user_id: &str,
        callback: Callback,
    ) -> Result<TokenRecord, Error> {
        tokenkeep_core::refresh::check_user_id(user_id)
            .map_err(|e| Error::from_refresh(e, &pending.provider, user_id))?;
        if !callback.state.as_deref().is_some_and(|s| pending.is_for(s)) {
            return Err(Error::InvalidInput(
                "the redirect's state is not this authorisation's: it is not the answer to our request".into(),
            ));
        }
        let code = code_of(callback)?;
        self.exchange_code(
            &pending.provider,
            user_id,
            &pending.redirect_uri,
            &pending.verifier,
            &pending.scopes,
            &code,
        )
        .await
    }

    /// [`Keeper::authorization_request`] for a service, whose redirect may
    /// reach another of its processes: the request's verifier, provider,
    /// user and expiry travel in the `state`, sealed with the active key,
    /// so any process with the keyring completes it
    /// ([`Keeper::complete_sealed_authorization`]) and nothing is kept in
    /// between. Returns the URL to send the user to.
    pub fn sealed_authorization_request(
        &self,
        provider: &str,
        user_id: &str,
        redirect_uri: &str,
        scopes: Option<&[String]>,
        valid_for_seconds: u32,
    ) -> Result<String, Error> {
        tokenkeep_core::refresh::check_user_id(user_id)
            .map_err(|e| Error::from_refresh(e, provider, user_id))?;
        let p = self.provider(provider)?;
        let scopes = scopes.map_or_else(|| p.scopes.clone(), <[String]>::to_vec);
        let verifier = random_token()?;
        let state = SealedState {
            id: random_token()?.expose_secret().to_string(),
            provider: provider.into(),
            user_id: user_id.into(),
            redirect_uri: redirect_uri.into(),
            scopes: scopes.clone(),
            verifier: verifier.expose_secret().to_string(),
            expires_at: self.now() + i64::from(valid_for_seconds),
        };
        let state = self.seal_state(&state)?;
        authorization_url(&p, redirect_uri, &scopes, &state, &verifier)
    }

    /// Completes a [`Keeper::sealed_authorization_request`] from its
    /// redirect: a state that does not open, or has expired, is refused
    /// before anything is sent. Returns the stored record.
    pub async fn complete_sealed_authorization(
        &self,
        callback: Callback,
    ) -> Result<TokenRecord, Error> {
        let state = callback
            .state
            .as_deref()
            .and_then(|s| self.open_state(s))
            .ok_or_else(|| {
                Error::InvalidInput(
                    "the redirect's state is not one of ours: it is not the answer to our request"
                        .into(),
                )
            })?;
        if state.expires_at < self.now() {
            return Err(Error::ReauthorizationRequired(
                "the authorisation was not completed in time; start it again".into(),
            ));
        }
        // Once: a copy of the URL completed with another account cannot
        // replace the user's tokens afterwards (or before: then the user's
        // own attempt fails, visibly).
        if !self
            .store()
            .consume_authorization(&state.id, state.expires_at)
            .await?
        {
            return Err(Error::InvalidInput(
                "this authorisation was already completed; start it again".into(),
            ));
        }
        let code = code_of(callback)?;
        self.exchange_code(
            &state.provider,
            &state.user_id,
            &state.redirect_uri,
            &SecretString::from(state.verifier),
            &state.scopes,
            &code,
        )
        .await
    }

    fn seal_state(&self, state: &SealedState) -> Result<String, Error> {
        let plain = SecretString::from(
            serde_json::to_string(state).map_err(|e| Error::Config(e.to_string()))?,
        );
        let (key_id, sealed) = self
            .keyring()
            .seal_host_secret(STATE_LABEL, "", &plain)
            .map_err(|e| Error::Config(format!("the state could not be sealed: {e:?}")))?;
        Ok(format!(
            "{key_id}~{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sealed)
        ))
    }

    /// Whether `state` is a sealed state of this keeper's (for a
    /// [`crate::loopback::Loopback`] waiting for a sealed request).
    pub fn is_sealed_state(&self, state: &str) -> bool {
        self.open_state(state).is_some()
    }

    fn open_state(&self, state: &str) -> Option<SealedState> {
        let (key_id, sealed) = state.split_once('~')?;
        let sealed = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(sealed)
            .ok()?;
        let plain = self
            .keyring()
            .open_host_secret(STATE_LABEL, "", key_id, &sealed)
            .ok()?;
        serde_json::from_str(plain.expose_secret()).ok()
    }

    /// The code for tokens (RFC 6749 section 4.1.3, RFC 7636 section 4.5),
    /// stored for `user_id`.
    async fn exchange_code(
        &self,
        provider: &str,
        user_id: &str,
        redirect_uri: &str,
        verifier: &SecretString,
        scopes: &[String],
        code: &SecretString,
    ) -> Result<TokenRecord, Error> {
        let p = self.provider(provider)?;
        let mut form = Form::new("authorization_code");
        form.push("code", code.expose_secret());
        form.push("redirect_uri", redirect_uri);
        form.push("code_verifier", verifier.expose_secret());
        form.grant_params(&p);
        let tokens = self.token_request(&p, user_id, form, scopes).await?;
        self.store_tokens(provider, user_id, &tokens).await
    }

    /// Starts a device authorisation (RFC 8628) for `provider`: the code and
    /// URL to show the user. [`Keeper::await_device_authorization`] polls.
    pub async fn device_authorization(
        &self,
        provider: &str,
        scopes: Option<&[String]>,
    ) -> Result<DeviceAuthorization, Error> {
        let p = self.provider(provider)?;
        let Some(endpoint) = &p.device_authorization_url else {
            return Err(Error::Config(format!(
                "provider {provider} has no device_authorization_url: it has no device flow here"
            )));
        };
        let scopes = scopes.map_or_else(|| p.scopes.clone(), <[String]>::to_vec);
        let mut form = Form::empty();
        if !scopes.is_empty() {
            form.push("scope", &scopes.join(" "));
        }
        if let Some(resource) = &p.resource {
            form.push("resource", resource);
        }
        let answer = self.send(&p, endpoint, form, None).await?;
        if !(200..300).contains(&answer.status) {
            return Err(answer_error(&p, &answer));
        }
        #[derive(serde::Deserialize)]
        struct Answer {
            device_code: String,
            user_code: String,
            #[serde(alias = "verification_url")]
            verification_uri: String,
            verification_uri_complete: Option<String>,
            expires_in: u64,
            interval: Option<u64>,
        }
        let a: Answer = serde_json::from_slice(answer.body.expose_secret()).map_err(|_| {
            Error::InvalidProviderResponse(
                "the device authorisation answer is not RFC 8628 JSON".into(),
            )
        })?;
        Ok(DeviceAuthorization {
            provider: provider.into(),
            user_code: a.user_code,
            verification_uri: a.verification_uri,
            verification_uri_complete: a.verification_uri_complete,
            // A server's numbers, bounded: an hour at most to authorise, a
            // minute at most between polls.
            expires_in: a.expires_in.min(DEVICE_MAX_SECONDS),
            interval: a
                .interval
                .unwrap_or(DEVICE_POLL_SECONDS)
                .clamp(1, DEVICE_MAX_INTERVAL),
            scopes,
            device_code: SecretString::from(a.device_code),
        })
    }

    /// Polls until the user has authorised the device (at the server's
    /// interval, slower after each `slow_down`), then stores the tokens for
    /// `user_id`. Fails when the user denies it or the codes expire.
    pub async fn await_device_authorization(
        &self,
        device: DeviceAuthorization,
        user_id: &str,
    ) -> Result<TokenRecord, Error> {
        tokenkeep_core::refresh::check_user_id(user_id)
            .map_err(|e| Error::from_refresh(e, &device.provider, user_id))?;
        let p = self.provider(&device.provider)?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(device.expires_in);
        let mut interval = device.interval;
        let proof_key = self.proof_key_for(&p, user_id).await?;
        loop {
            let next = tokio::time::Instant::now() + Duration::from_secs(interval);
            if next > deadline {
                return Err(Error::ReauthorizationRequired(
                    "the device code expired before the user authorised it".into(),
                ));
            }
            tokio::time::sleep_until(next).await;
            let mut form = Form::new(DEVICE_CODE_GRANT);
            form.push("device_code", device.device_code.expose_secret());
            form.grant_params(&p);
            let answer = self
                .send(&p, &p.token_url, form, proof_key.as_deref())
                .await?;
            match oauth_error(&answer).as_deref() {
                Some("authorization_pending") => continue,
                Some("slow_down") => {
                    interval = (interval + DEVICE_POLL_SECONDS).min(DEVICE_MAX_INTERVAL);
                    continue;
                }
                Some("expired_token") => {
                    return Err(Error::ReauthorizationRequired(
                        "the device code expired before the user authorised it".into(),
                    ));
                }
                Some("access_denied") => return Err(refused_by_user("access_denied")),
                _ => {}
            }
            let tokens = self.tokens_from(&p, &answer, &device.scopes)?;
            return self.store_tokens(&device.provider, user_id, &tokens).await;
        }
    }

    /// Gets a token with the provider's host grant and stores it under
    /// `user_id`: the client-credentials grant of a machine client (the
    /// user id is the name runtimes ask for it by), or a token exchange of
    /// the user's access token at the subject provider, made fresh first.
    pub async fn obtain_host_grant(
        &self,
        provider: &str,
        user_id: &str,
    ) -> Result<TokenRecord, Error> {
        let p = self.provider(provider)?;
        tokenkeep_core::refresh::check_user_id(user_id)
            .map_err(|e| Error::from_refresh(e, provider, user_id))?;
        let form = match (p.grant, &p.subject_provider) {
            (Grant::ClientCredentials, _) => crate::token_endpoint::client_credentials_form(&p),
            (Grant::TokenExchange, Some(subject)) => {
                let grant = Box::pin(self.ensure_fresh(subject, user_id)).await?;
                crate::token_endpoint::token_exchange_form(&p, &grant.access_token)
            }
            _ => {
                return Err(Error::Config(format!(
                    "provider {provider} has no host grant (grant = \"client-credentials\" \
                     or \"token-exchange\")"
                )));
            }
        };
        let mut tokens = self.token_request(&p, user_id, form, &p.scopes).await?;
        // Renewed by the same grant, never by a refresh token.
        tokens.refresh_token = None;
        tokens.refresh_token_expires_at = None;
        self.store_tokens(provider, user_id, &tokens).await
    }

    /// Deletes a user's tokens and revokes them at the provider where it
    /// has a revocation endpoint (RFC 7009), refresh token first. The row
    /// is deleted whatever the provider says; [`Deletion`] tells what may
    /// still be valid there.
    pub async fn delete_and_revoke(
        &self,
        provider: &str,
        user_id: &str,
    ) -> Result<Deletion, Error> {
        let mut outcome = Deletion {
            deleted: false,
            refresh_token: None,
            access_token: None,
        };
        // A provider no longer configured, or one without the endpoint:
        // deleted all the same.
        let revoking = self
            .config()
            .providers
            .get(provider)
            .filter(|p| p.revocation_url.is_some())
            .cloned();
        if let Some(p) = revoking {
            self.revoke_row(&p, user_id, &mut outcome).await;
        }
        outcome.deleted = self.delete_tokens(provider, user_id).await?;
        Ok(outcome)
    }

    /// Revokes what the row holds once any refresh in flight is done. A
    /// refresh that slips in before the revocation rotates the tokens:
    /// the newer ones are revoked too. Once the latest refresh token is
    /// revoked, no refresh can write newer ones.
    async fn revoke_row(&self, p: &Provider, user_id: &str, outcome: &mut Deletion) {
        let mut revoked_generation = None;
        for _ in 0..3 {
            let record = match self.load_tokens(&p.name, user_id, true).await {
                Ok(Some(record)) => record,
                Ok(None) => return,
                // A row that does not open (tampered, its key gone) is
                // still deleted; what it held cannot be revoked.
                Err(e) => {
                    outcome.access_token = Some(Revocation::Failed(format!(
                        "the stored tokens could not be read: {e}"
                    )));
                    return;
                }
            };
            if revoked_generation == Some(record.generation) {
                return;
            }
            let tokens = &record.tokens;
            // A failure of an earlier generation's token stands: that
            // token may still be valid.
            let worst = |earlier: &mut Option<Revocation>, now: Revocation| {
                if !matches!(earlier, Some(Revocation::Failed(_))) {
                    *earlier = Some(now);
                }
            };
            if let Some(t) = &tokens.refresh_token {
                worst(
                    &mut outcome.refresh_token,
                    self.revoke(p, t, "refresh_token").await,
                );
            }
            worst(
                &mut outcome.access_token,
                self.revoke(p, &tokens.access_token, "access_token").await,
            );
            revoked_generation = Some(record.generation);
        }
    }

    async fn revoke(&self, p: &Provider, token: &SecretString, hint: &str) -> Revocation {
        let Some(endpoint) = &p.revocation_url else {
            return Revocation::Failed("the provider has no revocation endpoint".into());
        };
        let mut form = Form::empty();
        form.push("token", token.expose_secret());
        form.push("token_type_hint", hint);
        match self.send(p, endpoint, form, None).await {
            // RFC 7009 section 2.2: 200 whether or not the token was valid.
            Ok(a) if a.status == 200 => Revocation::Revoked,
            Ok(a) => Revocation::Failed(match oauth_error(&a) {
                Some(code) => format!("the provider answered {} {code}", a.status),
                None => format!("the provider answered {}", a.status),
            }),
            Err(e) => Revocation::Failed(e.to_string()),
        }
    }

    pub(crate) fn provider(&self, name: &str) -> Result<Provider, Error> {
        self.config()
            .providers
            .get(name)
            .cloned()
            .ok_or_else(|| Error::UnknownProvider(name.into()))
    }

    async fn send(
        &self,
        p: &Provider,
        url: &str,
        form: Form,
        proof_key: Option<&ProofKey>,
    ) -> Result<HttpAnswer, Error> {
        if let Some(var) = &p.client_secret_missing {
            return Err(Error::Config(format!(
                "environment variable {var} (client_secret_env) is not set"
            )));
        }
        let dpop = proof_key.map(|key| Dpop {
            key,
            nonces: self.proof_keys(),
        });
        send_form(self.connections(), p, url, form, dpop)
            .await
            .map_err(|e| Error::from_refresh(e.into(), &p.name, ""))
    }

    /// One token request, judged like a refresh's answer.
    async fn token_request(
        &self,
        p: &Provider,
        user_id: &str,
        form: Form,
        asked: &[String],
    ) -> Result<TokenSet, Error> {
        let proof_key = self.proof_key_for(p, user_id).await?;
        let answer = self
            .send(p, &p.token_url, form, proof_key.as_deref())
            .await?;
        self.tokens_from(p, &answer, asked)
    }

    /// A token answer as a token set; lifetimes count from now on the
    /// keeper's clock, and an answer without `scope` granted what was
    /// asked (RFC 6749 section 5.1).
    fn tokens_from(
        &self,
        p: &Provider,
        answer: &HttpAnswer,
        asked: &[String],
    ) -> Result<TokenSet, Error> {
        let r = tokenkeep_core::provider::judge_answer(
            &p.contract(),
            answer.status,
            answer.content_type.as_deref(),
            answer.body.expose_secret(),
        )
        .map_err(|e| Error::from_refresh(e, &p.name, ""))?;
        // A server that ignored the proof issued a bearer token, which
        // runtimes would present wrongly.
        if p.dpop && !crate::dpop::is_bound(answer.body.expose_secret()) {
            return Err(Error::Config(format!(
                "provider {}: a request with a DPoP proof got a token that is not DPoP-bound: \
                 the server does not bind tokens to proof keys (set dpop = false)",
                p.name
            )));
        }
        let now = self.now();
        let refresh_token_expires_in = r.refresh_token.as_ref().and(
            r.refresh_token_expires_in
                .or(p.default_refresh_token_expires_in.map(i64::from)),
        );
        Ok(TokenSet {
            access_token: r.access_token,
            refresh_token: r.refresh_token,
            access_token_expires_at: r
                .expires_in
                .or(p.default_expires_in.map(i64::from))
                .map(|s| now + s),
            refresh_token_expires_at: refresh_token_expires_in.map(|s| now + s),
            scopes: r.scopes.unwrap_or_else(|| asked.to_vec()),
        })
    }
}

/// What a sealed `state` carries: everything needed to finish the
/// authorisation, wherever the redirect lands. Sealed, so secret.
#[derive(serde::Serialize, serde::Deserialize)]
struct SealedState {
    /// Random: recorded when the state is completed, so that it completes
    /// once.
    id: String,
    provider: String,
    user_id: String,
    redirect_uri: String,
    scopes: Vec<String>,
    verifier: String,
    expires_at: i64,
}

/// What a sealed state is sealed as: no token row's ciphertext opens as
/// a state, nor a state as a token.
const STATE_LABEL: &str = "tokenkeep/authorization-state";

/// The authorisation URL (RFC 6749 section 4.1.1) with PKCE (S256) and the
/// resource indicator.
fn authorization_url(
    p: &Provider,
    redirect_uri: &str,
    scopes: &[String],
    state: &str,
    verifier: &SecretString,
) -> Result<String, Error> {
    let Some(endpoint) = &p.authorization_url else {
        return Err(Error::Config(format!(
            "provider {} has no authorization_url: it cannot be connected here",
            p.name
        )));
    };
    let challenge = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(ring::digest::digest(
        &ring::digest::SHA256,
        verifier.expose_secret().as_bytes(),
    ));
    let mut url = url::Url::parse(endpoint)
        .map_err(|_| Error::Config(format!("provider {}: authorization_url", p.name)))?;
    {
        let mut q = url.query_pairs_mut();
        q.append_pair("response_type", "code")
            .append_pair("client_id", &p.client_id)
            .append_pair("redirect_uri", redirect_uri)
            .append_pair("state", state)
            .append_pair("code_challenge", &challenge)
            .append_pair("code_challenge_method", "S256");
        if !scopes.is_empty() {
            q.append_pair("scope", &scopes.join(" "));
        }
        if let Some(resource) = &p.resource {
            q.append_pair("resource", resource);
        }
    }
    Ok(url.to_string())
}

/// The code a redirect brought, or why there is none.
fn code_of(callback: Callback) -> Result<SecretString, Error> {
    if let Some(error) = callback.error {
        return Err(refused_by_user(&error));
    }
    callback.code.ok_or_else(|| {
        Error::InvalidInput("the redirect carries neither a code nor an error".into())
    })
}

/// 32 random bytes, base64url: a PKCE verifier (RFC 7636 section 4.1) or a
/// `state`.
fn random_token() -> Result<SecretString, Error> {
    let mut bytes = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map_err(|_| Error::Config("no system randomness".into()))?;
    Ok(SecretString::from(
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes),
    ))
}

/// An answer that is not the expected one, as an error of its class.
fn answer_error(p: &Provider, answer: &HttpAnswer) -> Error {
    match tokenkeep_core::provider::judge_answer(
        &p.contract(),
        answer.status,
        answer.content_type.as_deref(),
        answer.body.expose_secret(),
    ) {
        Err(e) => Error::from_refresh(e, &p.name, ""),
        Ok(_) => Error::InvalidProviderResponse(format!(
            "the provider answered {} with a token",
            answer.status
        )),
    }
}

/// The user (or the server on their behalf) said no.
fn refused_by_user(error: &str) -> Error {
    // Quoted from a redirect anyone can forge: printable and short only.
    let code: String = error
        .chars()
        .filter(|c| c.is_ascii_graphic())
        .take(64)
        .collect();
    Error::ReauthorizationRequired(match code.as_str() {
        "access_denied" => "the user did not authorise the request".into(),
        code => format!("the authorisation failed: {code}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_callback_reads_its_query_and_hides_the_code() {
        let c = Callback::from_query("code=s3cret%2Bcode&state=abc&iss=https%3A%2F%2Fas");
        assert_eq!(c.code.as_ref().unwrap().expose_secret(), "s3cret+code");
        assert_eq!(c.state.as_deref(), Some("abc"));
        assert!(!format!("{c:?}").contains("s3cret"));
    }
}
