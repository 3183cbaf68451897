//! A provider's token response (RFC 6749 section 5.1 JSON) as a token set:
//! what `tokens put` reads on standard input and the API takes as a body.

use crate::error::Error;
use tokenkeep_core::model::TokenSet;

/// Turns a token response into a token set, expiries counted from `now`
/// (the keeper's clock).
pub fn token_set(body: &[u8], now: i64) -> Result<TokenSet, Error> {
    use tokenkeep_core::provider::parse_token_response;
    let r = parse_token_response(200, Some("application/json"), body, &[])
        .map_err(|e| Error::InvalidInput(format!("token response: {e}")))?;
    Ok(TokenSet {
        access_token: r.access_token,
        refresh_token: r.refresh_token,
        access_token_expires_at: r.expires_in.map(|s| now + s),
        refresh_token_expires_at: r.refresh_token_expires_in.map(|s| now + s),
        scopes: r.scopes.unwrap_or_default(),
    })
}
