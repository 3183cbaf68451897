//! What the keeper counts and times, through the `metrics` facade: free
//! when no recorder is installed (a library embedder that wants none), and
//! exported by whoever installs one (`tokenkeep serve`'s `/metrics`, in the
//! Prometheus text format). Names and labels live here, once.

use std::time::Duration;

/// Refreshes by provider and outcome (`ok` or the error class).
pub const REFRESHES: &str = "tokenkeep_refreshes_total";
/// Token requests sent to providers, by provider and answer (`2xx`, `4xx`,
/// `5xx`, `error`: no answer).
pub const PROVIDER_REQUESTS: &str = "tokenkeep_provider_requests_total";
/// Seconds a token request took, by provider.
pub const PROVIDER_LATENCY: &str = "tokenkeep_provider_request_duration_seconds";
/// Seconds a runtime waited for a row lock.
pub const LOCK_WAIT: &str = "tokenkeep_lock_wait_seconds";
/// Access tokens handed out, by provider and outcome.
pub const READS: &str = "tokenkeep_token_reads_total";
/// Audit entries dropped because reads outpaced the audit writer.
pub const AUDIT_DROPPED: &str = "tokenkeep_audit_dropped_total";
/// Token events not yet delivered, by webhook.
pub const EVENTS_PENDING: &str = "tokenkeep_events_pending";
/// Webhook deliveries, by webhook and outcome (`delivered`, `failed`).
pub const DELIVERIES: &str = "tokenkeep_webhook_deliveries_total";
/// Component instances created (one per call).
pub const INSTANTIATIONS: &str = "tokenkeep_component_instantiations_total";
/// Component calls that trapped, ran out of fuel or time.
pub const TRAPS: &str = "tokenkeep_component_traps_total";
/// Stored tokens by state, as the refresher's last scan found them.
pub const TOKENS: &str = "tokenkeep_tokens";
/// Database connections by state (`open`, `idle`, `max`).
pub const DB_CONNECTIONS: &str = "tokenkeep_db_connections";

/// API requests answered, by route template and status (`tokenkeep serve`).
pub const HTTP_REQUESTS: &str = "tokenkeep_http_requests_total";
/// Seconds an API request took, by route template.
pub const HTTP_LATENCY: &str = "tokenkeep_http_request_duration_seconds";

/// The buckets (seconds) of every histogram here: from a loopback answer
/// to a provider's whole timeout.
pub const BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

pub(crate) fn refresh(provider: &str, outcome: &'static str) {
    metrics::counter!(REFRESHES, "provider" => provider.to_string(), "outcome" => outcome)
        .increment(1);
}

pub(crate) fn read(provider: &str, outcome: &'static str) {
    metrics::counter!(READS, "provider" => provider.to_string(), "outcome" => outcome).increment(1);
}

pub(crate) fn provider_request(provider: &str, answer: Option<u16>, took: Duration) {
    let answer = match answer {
        Some(s) if (200..300).contains(&s) => "2xx",
        Some(s) if (400..500).contains(&s) => "4xx",
        Some(s) if s >= 500 => "5xx",
        Some(_) => "other",
        None => "error",
    };
    metrics::counter!(PROVIDER_REQUESTS, "provider" => provider.to_string(), "answer" => answer)
        .increment(1);
    metrics::histogram!(PROVIDER_LATENCY, "provider" => provider.to_string())
        .record(took.as_secs_f64());
}

pub(crate) fn lock_wait(took: Duration) {
    metrics::histogram!(LOCK_WAIT).record(took.as_secs_f64());
}

pub(crate) fn instantiation() {
    metrics::counter!(INSTANTIATIONS).increment(1);
}

pub(crate) fn trap() {
    metrics::counter!(TRAPS).increment(1);
}

/// Sets the token counts per state (every state, zeros included).
pub fn tokens_by_state(counts: &[(&'static str, u64)]) {
    for (state, n) in counts {
        metrics::gauge!(TOKENS, "state" => *state).set(*n as f64);
    }
}

/// A database pool's connections.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolUse {
    pub open: u64,
    pub idle: u64,
    pub max: u64,
}

pub fn pool_use(p: PoolUse) {
    for (state, n) in [("open", p.open), ("idle", p.idle), ("max", p.max)] {
        metrics::gauge!(DB_CONNECTIONS, "state" => state).set(n as f64);
    }
}

/// One API request answered.
pub fn http_request(route: &str, status: u16, took: Duration) {
    metrics::counter!(HTTP_REQUESTS, "route" => route.to_string(), "status" => status.to_string())
        .increment(1);
    metrics::histogram!(HTTP_LATENCY, "route" => route.to_string()).record(took.as_secs_f64());
}

pub(crate) fn audit_dropped() {
    metrics::counter!(AUDIT_DROPPED).increment(1);
}

pub fn events_pending(webhook: &str, n: u64) {
    metrics::gauge!(EVENTS_PENDING, "webhook" => webhook.to_string()).set(n as f64);
}

pub fn delivery(webhook: &str, delivered: bool) {
    let outcome = if delivered { "delivered" } else { "failed" };
    metrics::counter!(DELIVERIES, "webhook" => webhook.to_string(), "outcome" => outcome)
        .increment(1);
}
