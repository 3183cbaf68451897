//! Between the host's generated WIT types and tokenkeep-core's model, which
//! storage and sealing speak. One function per type and direction.

use crate::bindings::tokenkeep::oauth::{storage as wit_storage, types as wit};
use secrecy::{ExposeSecret, SecretString};
use tokenkeep_core::error::ErrorClass;
use tokenkeep_core::model::{ConversationEntry, Health, RowKey, RowRead, SealedRow, TokenSet};

pub fn class_to_wit(c: ErrorClass) -> wit::ErrorClass {
    use wit::ErrorClass as W;
    match c {
        ErrorClass::NotFound => W::NotFound,
        ErrorClass::ReauthorizationRequired => W::ReauthorizationRequired,
        ErrorClass::ProviderUnavailable => W::ProviderUnavailable,
        ErrorClass::ProviderRejectedClient => W::ProviderRejectedClient,
        ErrorClass::ScopeMismatch => W::ScopeMismatch,
        ErrorClass::LockTimeout => W::LockTimeout,
        ErrorClass::Storage => W::Storage,
        ErrorClass::Decryption => W::Decryption,
        ErrorClass::InvalidProviderResponse => W::InvalidProviderResponse,
        ErrorClass::UnknownProvider => W::UnknownProvider,
        ErrorClass::InvalidInput => W::InvalidInput,
        ErrorClass::EgressDenied => W::EgressDenied,
        ErrorClass::Configuration => W::Configuration,
    }
}

pub fn provider_to_wit(
    p: tokenkeep_core::model::ProviderConfig,
) -> crate::bindings::tokenkeep::oauth::providers::ProviderConfig {
    crate::bindings::tokenkeep::oauth::providers::ProviderConfig {
        name: p.name,
        refresh_threshold_seconds: p.refresh_threshold_seconds,
        timeout_ms: p.timeout_ms,
        max_response_bytes: p.max_response_bytes,
        kind: p.kind,
        error_codes: p
            .error_codes
            .into_iter()
            .map(|(code, class)| (code, class_to_wit(class)))
            .collect(),
        default_expires_in: p.default_expires_in,
        default_refresh_token_expires_in: p.default_refresh_token_expires_in,
        rotates_refresh_tokens: p.rotates_refresh_tokens,
        max_attempts: p.max_attempts,
        retry_budget_ms: p.retry_budget_ms,
        bare_4xx_is_refusal: p.bare_4xx_is_refusal,
        reuse_leeway_seconds: p.reuse_leeway_seconds,
        host_grant: p.host_grant,
    }
}

/// The WIT enum lists the classes in `ErrorClass::ALL` order.
pub fn class_from_wit(c: wit::ErrorClass) -> ErrorClass {
    ErrorClass::ALL[c as usize]
}

pub fn health_to_wit(h: &Health) -> wit::TokenHealth {
    wit::TokenHealth {
        failed_attempts: h.failed_attempts,
        last_failure_at: h.last_failure_at,
        last_failure: h.last_failure.map(class_to_wit),
        last_success_at: h.last_success_at,
        refresh_started_at: h.refresh_started_at,
        retry_not_before: h.retry_not_before,
    }
}

pub fn health_from_wit(h: &wit::TokenHealth) -> Health {
    Health {
        failed_attempts: h.failed_attempts,
        last_failure_at: h.last_failure_at,
        last_failure: h.last_failure.map(class_from_wit),
        last_success_at: h.last_success_at,
        refresh_started_at: h.refresh_started_at,
        retry_not_before: h.retry_not_before,
    }
}

pub fn row_to_wit(r: SealedRow) -> wit_storage::SealedRow {
    wit_storage::SealedRow {
        health: health_to_wit(&r.health),
        provider: r.provider,
        user_id: r.user_id,
        key_id: r.key_id,
        access_token: r.access_token,
        refresh_token: r.refresh_token,
        access_token_expires_at: r.access_token_expires_at,
        refresh_token_expires_at: r.refresh_token_expires_at,
        scopes: r.scopes,
        baseline_scopes: r.baseline_scopes,
        obtained_at: r.obtained_at,
        generation: r.generation,
    }
}

pub fn row_from_wit(r: wit_storage::SealedRow) -> SealedRow {
    SealedRow {
        health: health_from_wit(&r.health),
        provider: r.provider,
        user_id: r.user_id,
        key_id: r.key_id,
        access_token: r.access_token,
        refresh_token: r.refresh_token,
        access_token_expires_at: r.access_token_expires_at,
        refresh_token_expires_at: r.refresh_token_expires_at,
        scopes: r.scopes,
        baseline_scopes: r.baseline_scopes,
        obtained_at: r.obtained_at,
        generation: r.generation,
    }
}

pub fn read_to_wit(r: RowRead) -> wit_storage::RowRead {
    wit_storage::RowRead {
        row: r.row.map(row_to_wit),
        now: r.now,
    }
}

pub fn key_from_wit(k: wit::RowKey) -> RowKey {
    RowKey {
        provider: k.provider,
        user_id: k.user_id,
    }
}

pub fn entry_to_wit(e: ConversationEntry) -> wit::ConversationEntry {
    wit::ConversationEntry {
        conversation_id: e.conversation_id,
        provider: e.provider,
        user_id: e.user_id,
        scopes: e.scopes,
        generation: e.generation,
        updated_at: e.updated_at,
    }
}

pub fn entry_from_wit(e: wit::ConversationEntry) -> ConversationEntry {
    ConversationEntry {
        conversation_id: e.conversation_id,
        provider: e.provider,
        user_id: e.user_id,
        scopes: e.scopes,
        generation: e.generation,
        updated_at: e.updated_at,
    }
}

pub fn tokens_to_wit(t: &TokenSet) -> wit::TokenSet {
    wit::TokenSet {
        access_token: t.access_token.expose_secret().to_string(),
        refresh_token: t
            .refresh_token
            .as_ref()
            .map(|r| r.expose_secret().to_string()),
        access_token_expires_at: t.access_token_expires_at,
        refresh_token_expires_at: t.refresh_token_expires_at,
        scopes: t.scopes.clone(),
    }
}

pub fn tokens_from_wit(t: wit::TokenSet) -> TokenSet {
    TokenSet {
        access_token: t.access_token.into(),
        refresh_token: t.refresh_token.map(SecretString::from),
        access_token_expires_at: t.access_token_expires_at,
        refresh_token_expires_at: t.refresh_token_expires_at,
        scopes: t.scopes,
    }
}
