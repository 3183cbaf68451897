//! When a token is valid, and when it should be refreshed.
//!
//! Pure functions of the record's timestamps and "now" (seconds since the
//! epoch), so they behave the same in every host and are tested natively.

/// The seed's default clock skew: a token expiring within a minute is treated
/// as expired, so a request started now does not land with a dead token.
pub const DEFAULT_CLOCK_SKEW_SECONDS: u32 = 60;

/// A refresh token expiring within this is reported as "refresh token expiring".
pub const REFRESH_TOKEN_EXPIRING_SECONDS: i64 = 24 * 3600;

/// Whether an access token is still valid `skew` seconds from `now`.
/// No expiry means the token does not expire.
pub fn is_access_token_valid(expires_at: Option<i64>, now: i64, skew: u32) -> bool {
    match expires_at {
        None => true,
        Some(at) => now.saturating_add(i64::from(skew)) < at,
    }
}

/// Whether a refresh token can still be spent. No expiry means it does not
/// expire; no refresh token at all means it cannot.
pub fn is_refresh_token_valid(has_refresh_token: bool, expires_at: Option<i64>, now: i64) -> bool {
    has_refresh_token && expires_at.is_none_or(|at| now < at)
}

/// How long before expiry a token is refreshed: the configured threshold, or
/// half the token's lifetime when that is shorter, so a 2-hour token under a
/// 4-hour threshold is not refreshed on every read. Never below the skew, so a
/// token that `is_access_token_valid` rejects is always due.
pub fn refresh_window(threshold: u32, obtained_at: i64, expires_at: i64) -> i64 {
    let half_life = (expires_at.saturating_sub(obtained_at) / 2).max(0);
    i64::from(threshold)
        .min(half_life)
        .max(i64::from(DEFAULT_CLOCK_SKEW_SECONDS))
}

/// Whether a token should be refreshed now: it expires within its window.
pub fn needs_refresh(obtained_at: i64, expires_at: Option<i64>, now: i64, threshold: u32) -> bool {
    match expires_at {
        None => false,
        Some(at) => now.saturating_add(refresh_window(threshold, obtained_at, at)) >= at,
    }
}

/// Whether a token whose lifetime is unknown (no time of issue) should be
/// refreshed now: the seed's rule, expired or expiring within the threshold.
pub fn needs_refresh_by_threshold(expires_at: Option<i64>, now: i64, threshold: u32) -> bool {
    let window = i64::from(threshold).max(i64::from(DEFAULT_CLOCK_SKEW_SECONDS));
    expires_at.is_some_and(|at| now.saturating_add(window) >= at)
}

/// Where a token stands (WIT `token-state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenState {
    Fresh,
    RefreshDue,
    RefreshTokenExpiring,
    ReauthorizationRequired,
    ScopeNarrowed,
}

/// The timestamps and flags that decide a token's state.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub obtained_at: i64,
    pub access_expires_at: Option<i64>,
    pub refresh_expires_at: Option<i64>,
    pub has_refresh_token: bool,
    /// The last refresh failed definitively (e.g. `invalid_grant`).
    pub reauthorization_recorded: bool,
    /// The token's scopes fall short of what the user authorised.
    pub narrowed: bool,
}

/// Classifies a token for listings.
pub fn token_state(t: &Timing, now: i64, threshold: u32) -> TokenState {
    let access_valid = is_access_token_valid(t.access_expires_at, now, DEFAULT_CLOCK_SKEW_SECONDS);
    let refreshable = is_refresh_token_valid(t.has_refresh_token, t.refresh_expires_at, now);
    let due = needs_refresh(t.obtained_at, t.access_expires_at, now, threshold);
    if t.reauthorization_recorded || (!access_valid && !refreshable) {
        return TokenState::ReauthorizationRequired;
    }
    if t.narrowed {
        return TokenState::ScopeNarrowed;
    }
    if due && refreshable {
        return TokenState::RefreshDue;
    }
    if t.refresh_expires_at
        .is_some_and(|at| t.has_refresh_token && at - now <= REFRESH_TOKEN_EXPIRING_SECONDS)
    {
        return TokenState::RefreshTokenExpiring;
    }
    if due {
        // Due but not refreshable, still valid for now: it will need the user.
        return TokenState::RefreshTokenExpiring;
    }
    TokenState::Fresh
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_800_000_000;

    #[test]
    fn skew_boundaries_59_60_61_seconds() {
        assert!(is_access_token_valid(Some(NOW + 61), NOW, 60));
        assert!(!is_access_token_valid(Some(NOW + 60), NOW, 60));
        assert!(!is_access_token_valid(Some(NOW + 59), NOW, 60));
    }

    #[test]
    fn a_token_without_expiry_is_valid() {
        assert!(is_access_token_valid(None, NOW, 60));
        assert!(!needs_refresh(NOW - 10, None, NOW, 600));
    }

    #[test]
    fn refresh_tokens_without_expiry_never_expire() {
        assert!(is_refresh_token_valid(true, None, NOW + 10 * 365 * 86_400));
        assert!(!is_refresh_token_valid(false, None, NOW));
        assert!(is_refresh_token_valid(true, Some(NOW + 1), NOW));
        assert!(!is_refresh_token_valid(true, Some(NOW), NOW));
    }

    #[test]
    fn a_two_hour_token_under_a_four_hour_threshold_is_not_refreshed_on_every_read() {
        let obtained = NOW;
        let expires = NOW + 2 * 3600;
        // Window = min(4 h, 1 h) = 1 h.
        assert!(!needs_refresh(obtained, Some(expires), NOW + 10, 4 * 3600));
        assert!(!needs_refresh(
            obtained,
            Some(expires),
            NOW + 3600 - 1,
            4 * 3600
        ));
        assert!(needs_refresh(obtained, Some(expires), NOW + 3600, 4 * 3600));
    }

    #[test]
    fn an_eight_hour_token_is_refreshed_well_before_it_dies() {
        let obtained = NOW;
        let expires = NOW + 8 * 3600;
        // Window = min(4 h, 4 h) = 4 h: due with four hours left.
        assert!(!needs_refresh(
            obtained,
            Some(expires),
            NOW + 4 * 3600 - 1,
            4 * 3600
        ));
        assert!(needs_refresh(
            obtained,
            Some(expires),
            NOW + 4 * 3600,
            4 * 3600
        ));
    }

    #[test]
    fn an_invalid_access_token_is_always_due() {
        // A 30-second token: half its life is below the skew, the window is the skew.
        assert!(needs_refresh(NOW, Some(NOW + 30), NOW, 600));
    }

    #[test]
    fn states() {
        let t = Timing {
            obtained_at: NOW,
            access_expires_at: Some(NOW + 3600),
            refresh_expires_at: None,
            has_refresh_token: true,
            reauthorization_recorded: false,
            narrowed: false,
        };
        assert_eq!(token_state(&t, NOW, 300), TokenState::Fresh);
        assert_eq!(token_state(&t, NOW + 3400, 300), TokenState::RefreshDue);
        let expiring = Timing {
            refresh_expires_at: Some(NOW + 3600),
            ..t
        };
        assert_eq!(
            token_state(&expiring, NOW, 300),
            TokenState::RefreshTokenExpiring
        );
        let dead = Timing {
            refresh_expires_at: Some(NOW - 1),
            ..t
        };
        assert_eq!(
            token_state(&dead, NOW + 3600, 300),
            TokenState::ReauthorizationRequired
        );
        assert_eq!(
            token_state(
                &Timing {
                    narrowed: true,
                    ..t
                },
                NOW,
                300
            ),
            TokenState::ScopeNarrowed
        );
        let revoked = Timing {
            reauthorization_recorded: true,
            narrowed: false,
            ..t
        };
        assert_eq!(
            token_state(&revoked, NOW, 300),
            TokenState::ReauthorizationRequired
        );
    }
}
