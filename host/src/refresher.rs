//! The background refresher: tokens are refreshed a little before their
//! refresh window opens, so that no reader waits for a provider, and each
//! at a moment of its own, so that tokens issued together do not refresh in
//! the same second. Refreshes go through [`Keeper::ensure_fresh_for`], the
//! readers' single-flight path: several processes running a refresher
//! against one database still make one provider call per token per expiry.
//!
//! A token is planned for a moment `at` with a minimum remaining lifetime
//! one second above what it has left at `at`. The token it holds then is
//! short of that minimum and refreshed; a token another process refreshed
//! meanwhile is younger, meets it, and is left alone.

use crate::Keeper;
use crate::config::Provider;
use crate::error::Error;
use crate::events::{self, Announced, Announcement};
use crate::keeper::RowKey;
use crate::keeper::{TokenState, TokenSummary, error_class_name, summary_key, token_state_name};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokenkeep_core::validity;

/// The refresher's name in the audit log.
pub const REFRESHER: &str = "refresher";

/// How the refresher runs.
#[derive(Debug, Clone)]
pub struct RefresherSettings {
    /// How often the token listing is read.
    pub interval: Duration,
    /// How long before a token's refresh window opens it is refreshed.
    pub lead: Duration,
    /// Tokens are spread over this much more lead, by a jitter of their own.
    pub spread: Duration,
    /// After this many failed refreshes in a row a token is left to its
    /// readers (and reported once): a failing provider is not hammered.
    pub max_failures: u32,
    /// Refreshes at once per process.
    pub concurrency: usize,
    /// Rows read per page of the listing.
    pub page: u32,
}

impl Default for RefresherSettings {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(30),
            lead: Duration::from_secs(120),
            spread: Duration::from_secs(300),
            max_failures: 8,
            concurrency: 4,
            page: 500,
        }
    }
}

/// Why a token is refreshed ahead of its readers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// Its refresh window opens soon.
    Expiry,
    /// Its provider revokes refresh tokens left unused this long.
    Idle,
}

/// One planned refresh.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Planned {
    pub row: RowKey,
    pub generation: u64,
    /// When, in seconds since the epoch on the keeper's clock.
    pub at: i64,
    /// What [`Keeper::ensure_fresh_for`] is asked for then.
    pub min_remaining: u32,
    pub reason: Reason,
}

/// When (if ever) a token should be refreshed ahead of its readers. `None`:
/// nothing to do (no refresh token, a refusal standing, too many failures,
/// or a token that neither expires nor idles out).
pub fn plan(
    s: &TokenSummary,
    provider: &Provider,
    settings: &RefresherSettings,
) -> Option<Planned> {
    let renewable = s.has_refresh_token || provider.grant.is_host_grant();
    if !renewable
        || matches!(
            s.state,
            TokenState::ReauthorizationRequired | TokenState::ScopeNarrowed
        )
        || s.health.failed_attempts >= settings.max_failures
    {
        return None;
    }
    let expires_at = s.access_token_expires_at?;
    let lifetime = expires_at.saturating_sub(s.obtained_at);
    let jitter = |spread: i64| {
        if spread <= 0 {
            0
        } else {
            (fnv(&s.provider, &s.user_id, s.generation) % (spread as u64 + 1)) as i64
        }
    };
    let secs = |d: Duration| i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
    let window = validity::refresh_window(
        provider.refresh_threshold_seconds,
        s.obtained_at,
        expires_at,
    );
    let opens = expires_at - window;
    let lead = secs(settings.lead).min(lifetime / 4);
    let spread = secs(settings.spread).min(lifetime / 4);
    let mut planned = (opens - lead - jitter(spread), Reason::Expiry);
    if let Some(idle) = provider.refresh_token_idle_seconds {
        // Well inside the provider's limit, counted from the last refresh.
        let half = i64::from(idle) / 2;
        let at = s.obtained_at + half - jitter(secs(settings.spread).min(half / 2));
        if at < planned.0 {
            planned = (at, Reason::Idle);
        }
    }
    let (mut at, reason) = planned;
    // Above what the token has left at `at`: a token refreshed since then
    // by anyone has more, and is left alone.
    let mut min_remaining = expires_at.saturating_sub(at).saturating_add(1);
    // A token refreshed by another process since the plan is at most this
    // much older than new when the planned call reaches it; and a minimum
    // is refused within the refresh window of the token's lifetime.
    let margin = (lifetime / 10).min(600).max(window);
    if min_remaining > lifetime - margin {
        // Too short-lived to plan ahead (or stored already expired): the
        // plain hot path once the window is open.
        at = opens;
        min_remaining = 0;
    }
    if let Some(not_before) = s.health.retry_not_before {
        at = at.max(not_before);
    }
    Some(Planned {
        row: summary_key(s),
        generation: s.generation,
        at,
        min_remaining: u32::try_from(min_remaining.max(0)).unwrap_or(u32::MAX),
        reason,
    })
}

/// The state time has moved `s` into, if it is not the one announced for
/// it: `None` when there is nothing to announce. A token that this pass
/// refreshes (`refreshing`) is not announced as due: it will not be for
/// long. A refusal is left to the writes (a new token is `recovered`).
fn announcement(
    s: &TokenSummary,
    refreshing: bool,
    announced: &HashMap<RowKey, Announced>,
) -> Option<Announcement> {
    let row = summary_key(s);
    let seen = announced
        .get(&row)
        .filter(|a| a.generation == s.generation)?;
    let reason = match s.state {
        TokenState::RefreshDue if refreshing => return None,
        TokenState::ScopeNarrowed => return None,
        TokenState::Fresh | TokenState::RefreshTokenExpiring => None,
        TokenState::RefreshDue => s.health.last_failure.map(error_class_name),
        // With nothing to refresh it, the class a reader gets.
        TokenState::ReauthorizationRequired => Some(
            s.health
                .last_failure
                .map_or("reauthorization-required", error_class_name),
        ),
    };
    let to = token_state_name(s.state);
    let from = seen.state.as_deref().unwrap_or(events::FRESH);
    if from == to || from == "reauthorization-required" {
        return None;
    }
    Some(Announcement {
        row,
        generation: s.generation,
        from: seen.state.clone(),
        to,
        reason: reason.map(str::to_string),
    })
}

/// FNV-1a over the row and its generation: the same jitter in every
/// process, different for each token and each of its generations.
fn fnv(provider: &str, user_id: &str, generation: u64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in provider
        .bytes()
        .chain([0])
        .chain(user_id.bytes())
        .chain(generation.to_le_bytes())
    {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// What one pass over the listing found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scan {
    pub examined: u64,
    /// Refreshes due within the next interval.
    pub planned: Vec<Planned>,
    /// Tokens (and their generations) left to their readers after too many
    /// failures.
    pub given_up: Vec<(RowKey, u64)>,
    /// Tokens per state, every state named.
    pub states: Vec<(&'static str, u64)>,
    /// States time decided that this pass announced (see [`crate::events`]).
    pub announced: u64,
}

/// The refresher of one process.
pub struct Refresher {
    keeper: Arc<Keeper>,
    settings: RefresherSettings,
    /// Planned refreshes not yet done: a later scan does not plan them twice.
    pending: Arc<Mutex<HashSet<(RowKey, u64)>>>,
    /// Tokens already reported as given up (per generation).
    reported: Mutex<HashSet<(RowKey, u64)>>,
}

impl Refresher {
    pub fn new(keeper: Arc<Keeper>, settings: RefresherSettings) -> Self {
        Self {
            keeper,
            settings,
            pending: Arc::default(),
            reported: Mutex::default(),
        }
    }

    /// One pass over every stored token: the refreshes due before the next
    /// pass.
    pub async fn scan(&self) -> Result<Scan, Error> {
        let now = self.keeper.now();
        let horizon = now + i64::try_from(self.settings.interval.as_secs()).unwrap_or(0);
        let mut scan = Scan::default();
        let mut states = std::collections::BTreeMap::new();
        for state in [
            TokenState::Fresh,
            TokenState::RefreshDue,
            TokenState::RefreshTokenExpiring,
            TokenState::ReauthorizationRequired,
            TokenState::ScopeNarrowed,
        ] {
            states.insert(token_state_name(state), 0u64);
        }
        let mut after = None;
        loop {
            let page = match self
                .keeper
                .list_tokens_page(after, self.settings.page)
                .await
            {
                Ok(page) => page,
                // What the pages before found is planned all the same.
                Err(e) if scan.examined > 0 => {
                    tracing::warn!(class = e.class(), "refresher scan cut short: {e}");
                    return Ok(scan);
                }
                Err(e) => return Err(e),
            };
            scan.examined += page.len() as u64;
            let announced = match (page.first(), page.last()) {
                (Some(first), Some(last)) => self
                    .keeper
                    .announced(&summary_key(first), &summary_key(last))
                    .await
                    .unwrap_or_else(|e| {
                        tracing::debug!(class = e.class(), "announced states unread: {e}");
                        Vec::new()
                    }),
                _ => Vec::new(),
            };
            let announced: HashMap<RowKey, Announced> =
                announced.into_iter().map(|a| (a.row.clone(), a)).collect();
            let mut changes = Vec::new();
            let config = self.keeper.config();
            for s in &page {
                *states.entry(token_state_name(s.state)).or_default() += 1;
                let Some(provider) = config.providers.get(&s.provider) else {
                    continue;
                };
                if (s.has_refresh_token || provider.grant.is_host_grant())
                    && s.health.failed_attempts >= self.settings.max_failures
                    && s.state != TokenState::ReauthorizationRequired
                {
                    scan.given_up.push((summary_key(s), s.generation));
                }
                let planned = plan(s, provider, &self.settings).filter(|p| p.at <= horizon);
                if let Some(a) = announcement(s, planned.is_some(), &announced) {
                    changes.push(a);
                }
                scan.planned.extend(planned);
            }
            for a in &changes {
                match self.keeper.announce(a).await {
                    Ok(true) => scan.announced += 1,
                    // Changed since the page was read, or being refreshed:
                    // the next pass decides.
                    Ok(false) => {}
                    Err(e) => tracing::debug!(class = e.class(), "state not announced: {e}"),
                }
            }
            match page.last() {
                Some(last) if page.len() == self.settings.page as usize => {
                    after = Some(summary_key(last));
                }
                _ => {
                    scan.states = states.into_iter().collect();
                    return Ok(scan);
                }
            }
        }
    }

    /// Scans every interval and refreshes each planned token at its moment,
    /// until `stop` completes. Refreshes already talking to a provider
    /// finish ([`Keeper::shutdown`] waits for them); planned ones are
    /// dropped.
    pub async fn run(self: Arc<Self>, stop: impl Future<Output = ()>) {
        let gate = Arc::new(tokio::sync::Semaphore::new(
            self.settings.concurrency.max(1),
        ));
        let mut tasks = tokio::task::JoinSet::new();
        let work = async {
            loop {
                match self.scan().await {
                    Ok(scan) => {
                        tracing::info!(
                            examined = scan.examined,
                            planned = scan.planned.len(),
                            "refresher scan"
                        );
                        self.report_given_up(&scan);
                        crate::metrics::tokens_by_state(&scan.states);
                        for p in scan.planned {
                            let key = (p.row.clone(), p.generation);
                            let fresh = self
                                .pending
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .insert(key.clone());
                            if fresh {
                                tasks.spawn(self.clone().refresh_at(p, key, gate.clone()));
                            }
                        }
                    }
                    Err(e) => tracing::warn!(class = e.class(), "refresher scan failed: {e}"),
                }
                while tasks.try_join_next().is_some() {}
                tokio::time::sleep(self.settings.interval).await;
            }
        };
        tokio::select! {
            () = work => {}
            () = stop => {}
        }
        // Stopped before returning: none starts a refresh after the
        // keeper's shutdown has waited for those in flight.
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
    }

    async fn refresh_at(
        self: Arc<Self>,
        p: Planned,
        key: (RowKey, u64),
        gate: Arc<tokio::sync::Semaphore>,
    ) {
        let wait = p.at.saturating_sub(self.keeper.now()).max(0);
        tokio::time::sleep(Duration::from_secs(u64::try_from(wait).unwrap_or(0))).await;
        let permit = gate.acquire_owned().await;
        // Planned on the generation the scan saw: a token refreshed since
        // (by anyone) is left alone, however long this waited for a permit.
        let got = crate::audit::as_caller(REFRESHER, async {
            match self
                .keeper
                .token_summary(&p.row.provider, &p.row.user_id)
                .await
            {
                Ok(Some(now)) if now.generation == p.generation => self
                    .keeper
                    .ensure_fresh_for(&p.row.provider, &p.row.user_id, p.min_remaining)
                    .await
                    .map(|_| ()),
                Ok(_) => Ok(()),
                Err(e) => Err(e),
            }
        })
        .await;
        drop(permit);
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&key);
        if let Err(e) = got {
            // One line per failure; the row records it and backs off.
            tracing::warn!(
                provider = %p.row.provider,
                user_id = %p.row.user_id,
                class = e.class(),
                "background refresh failed: {e}"
            );
        }
    }

    fn report_given_up(&self, scan: &Scan) {
        let mut reported = self.reported.lock().unwrap_or_else(|e| e.into_inner());
        for (row, generation) in &scan.given_up {
            if reported.insert((row.clone(), *generation)) {
                tracing::warn!(
                    provider = %row.provider,
                    user_id = %row.user_id,
                    failures = self.settings.max_failures,
                    "background refresh gave up on this token after repeated failures; \
                     readers still refresh it"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bindings::tokenkeep::oauth::types::TokenHealth;

    fn provider(threshold: u32, idle: Option<u32>) -> Provider {
        let config = crate::Config::parse(
            "[providers.acme]\ntoken_url = \"http://127.0.0.1:1/t\"\nclient_id = \"c\"\n",
        )
        .unwrap();
        let mut p = config.providers["acme"].clone();
        p.refresh_threshold_seconds = threshold;
        p.refresh_token_idle_seconds = idle;
        p
    }

    fn summary(user: &str, obtained_at: i64, expires_at: Option<i64>) -> TokenSummary {
        TokenSummary {
            provider: "acme".into(),
            user_id: user.into(),
            access_token_expires_at: expires_at,
            refresh_token_expires_at: None,
            has_refresh_token: true,
            scopes: vec![],
            baseline_scopes: vec![],
            obtained_at,
            generation: 1,
            key_id: "k1".into(),
            state: TokenState::Fresh,
            health: TokenHealth {
                failed_attempts: 0,
                last_failure_at: None,
                last_failure: None,
                last_success_at: None,
                refresh_started_at: None,
                retry_not_before: None,
            },
        }
    }

    #[test]
    fn tokens_issued_together_are_planned_apart_before_their_window_opens() {
        let settings = RefresherSettings::default();
        let p = provider(600, None);
        let mut moments = HashSet::new();
        for i in 0..50 {
            let s = summary(&format!("user-{i}"), 0, Some(3600));
            let plan = plan(&s, &p, &settings).unwrap();
            // The window opens at 3000; planned 120 s before, spread over 300 s more.
            assert!(
                (3000 - 120 - 300..=3000 - 120).contains(&plan.at),
                "{plan:?}"
            );
            assert_eq!(plan.reason, Reason::Expiry);
            // Short of the minimum at its moment; a fresh token is not.
            let left = 3600 - plan.at;
            assert!(left < i64::from(plan.min_remaining));
            assert!(3600 - 5 >= i64::from(plan.min_remaining));
            moments.insert(plan.at);
        }
        assert!(moments.len() > 30, "spread out: {moments:?}");
    }

    #[test]
    fn short_lived_tokens_are_refreshed_when_their_window_opens() {
        let settings = RefresherSettings::default();
        let short = plan(&summary("u", 0, Some(100)), &provider(600, None), &settings).unwrap();
        // A 100-second token: its window is the 60-second skew.
        assert_eq!((short.at, short.min_remaining), (40, 0));
        let expired = plan(&summary("u", 0, Some(-10)), &provider(600, None), &settings).unwrap();
        assert_eq!(expired.min_remaining, 0, "stored already expired");
    }

    #[test]
    fn idle_refresh_tokens_are_kept_alive_well_inside_the_providers_limit() {
        let settings = RefresherSettings::default();
        // A day-long access token from a provider that revokes refresh
        // tokens unused for two days.
        let s = summary("u", 0, Some(86_400));
        let day = plan(&s, &provider(600, Some(172_800)), &settings).unwrap();
        assert_eq!(day.reason, Reason::Expiry, "it expires before it idles out");
        let s = summary("u", 0, Some(30 * 86_400));
        let month = plan(&s, &provider(600, Some(172_800)), &settings).unwrap();
        assert_eq!(month.reason, Reason::Idle);
        assert!((86_400 - 300..=86_400).contains(&month.at), "{month:?}");
        assert!(30 * 86_400 - month.at < i64::from(month.min_remaining));
    }

    #[test]
    fn refusals_failures_and_tokens_without_a_refresh_token_are_left_alone() {
        let settings = RefresherSettings::default();
        let p = provider(600, None);
        let mut s = summary("u", 0, Some(3600));
        s.state = TokenState::ReauthorizationRequired;
        assert_eq!(plan(&s, &p, &settings), None);
        let mut s = summary("u", 0, Some(3600));
        s.has_refresh_token = false;
        assert_eq!(plan(&s, &p, &settings), None);
        let mut s = summary("u", 0, Some(3600));
        s.health.failed_attempts = settings.max_failures;
        assert_eq!(plan(&s, &p, &settings), None);
        assert_eq!(plan(&summary("u", 0, None), &p, &settings), None);
        let mut s = summary("u", 0, Some(3600));
        s.health.failed_attempts = 2;
        s.health.retry_not_before = Some(5000);
        assert_eq!(
            plan(&s, &p, &settings).unwrap().at,
            5000,
            "after the backoff"
        );
    }
}
