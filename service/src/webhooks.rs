//! Token events delivered to webhooks, signed in the manner of the
//! Standard Webhooks specification (`webhook-id`, `webhook-timestamp`,
//! `webhook-signature: v1,base64(HMAC-SHA256(secret, "id.timestamp.body"))`),
//! at least once and in order per token: one process at a time delivers a
//! webhook's events (a lease in the database), oldest first, and retries
//! the oldest undelivered event with backoff until the receiver answers
//! 2xx. A restart resumes where the deliveries recorded in the database
//! stop.

use base64::Engine as _;
use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretSlice};
use sha2::Sha256;
use std::sync::Arc;
use std::time::Duration;
use tokenkeep_host::events::Event;
use tokenkeep_host::{Error, Keeper};

/// How long one delivery may take.
pub const DELIVERY_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest wait between two attempts at one event.
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// How often an idle deliverer looks for new events.
pub const POLL: Duration = Duration::from_millis(250);

/// One configured webhook.
#[derive(Clone)]
pub struct Webhook {
    pub name: String,
    pub url: String,
    /// The signing key (the bytes of a `whsec_…` secret).
    pub secret: SecretSlice<u8>,
}

impl std::fmt::Debug for Webhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhook")
            .field("name", &self.name)
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

impl Webhook {
    /// A webhook whose secret is `whsec_` and base64 (the Standard
    /// Webhooks form), or any other text, taken as the key's bytes.
    pub fn new(name: &str, url: &str, secret: &str) -> Result<Self, Error> {
        let key = match secret.strip_prefix("whsec_") {
            Some(b64) => base64::engine::general_purpose::STANDARD
                .decode(b64)
                .map_err(|_| {
                    Error::Config(format!("webhook {name}: the whsec_ secret is not base64"))
                })?,
            None => secret.as_bytes().to_vec(),
        };
        if key.len() < 16 {
            return Err(Error::Config(format!(
                "webhook {name}: the secret is shorter than 16 bytes"
            )));
        }
        let parsed: http::Uri = url
            .parse()
            .map_err(|_| Error::Config(format!("webhook {name}: {url:?} is not a URL")))?;
        match parsed.scheme_str() {
            Some("https") => {}
            Some("http") if parsed.host().is_some_and(is_loopback) => {}
            _ => {
                return Err(Error::Config(format!(
                    "webhook {name}: the URL must be https (http only on loopback)"
                )));
            }
        }
        Ok(Self {
            name: name.to_string(),
            url: url.to_string(),
            secret: key.into(),
        })
    }

    /// The body and headers of `event`'s delivery at `timestamp`.
    pub fn signed(&self, event: &Event, timestamp: i64) -> (Vec<u8>, Vec<(&'static str, String)>) {
        let id = format!("evt_{}", event.id);
        let body = serde_json::json!({
            "type": format!("token.{}", event.state),
            "timestamp": tokenkeep_host::clock::utc(event.at),
            "data": {
                "event_id": event.id,
                "provider": event.provider,
                "user_id": event.user_id,
                "state": event.state,
                "reason": event.reason,
                "generation": event.generation,
                "conversations": event.conversations,
            },
        })
        .to_string()
        .into_bytes();
        let signature = sign(self.secret.expose_secret(), &id, timestamp, &body);
        let headers = vec![
            ("webhook-id", id),
            ("webhook-timestamp", timestamp.to_string()),
            ("webhook-signature", format!("v1,{signature}")),
        ];
        (body, headers)
    }
}

fn is_loopback(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// base64(HMAC-SHA256(key, "{id}.{timestamp}.{body}")).
pub fn sign(key: &[u8], id: &str, timestamp: i64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(format!("{id}.{timestamp}.").as_bytes());
    mac.update(body);
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

/// Delivers `webhook`'s events until `stop` says so; a delivery in flight
/// finishes first.
pub async fn deliver(
    keeper: Arc<Keeper>,
    webhook: Webhook,
    holder: String,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut backoff = Duration::ZERO;
    let mut reported = false;
    // A webhook seen for the first time starts at the events written from
    // now on; one the database knows resumes where its deliveries stop.
    while let Err(e) = keeper.register_webhook(&webhook.name).await {
        backoff = (backoff * 2).clamp(POLL, MAX_BACKOFF);
        if !reported {
            reported = true;
            tracing::warn!(webhook = %webhook.name, class = e.class(), "webhook not registered yet: {e}");
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            _ = stop.changed() => {}
        }
        if *stop.borrow() {
            return;
        }
    }
    (backoff, reported) = (Duration::ZERO, false);
    loop {
        if *stop.borrow() {
            // Another process may take over at once.
            let _ = keeper.release_webhook(&webhook.name, &holder).await;
            return;
        }
        let pause = match deliver_one(&keeper, &webhook, &holder).await {
            Ok(Some(true)) => {
                backoff = Duration::ZERO;
                reported = false;
                Duration::ZERO
            }
            // Nothing to deliver, or another process delivers.
            Ok(None) => POLL,
            Ok(Some(false)) | Err(_) => {
                backoff = (backoff * 2).clamp(Duration::from_millis(250), MAX_BACKOFF);
                backoff
            }
        };
        if let Ok(n) = keeper.pending_events(&webhook.name).await {
            tokenkeep_host::metrics::events_pending(&webhook.name, n);
        }
        if pause.is_zero() {
            continue;
        }
        if backoff >= MAX_BACKOFF && !reported {
            reported = true;
            tracing::warn!(webhook = %webhook.name, "webhook deliveries keep failing; retrying every minute");
        }
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            _ = stop.changed() => {}
        }
    }
}

/// Deletes the events older than `days` days, and their deliveries, at
/// start and every hour until `stop` says so: an event a receiver has not
/// taken in that time is given up.
pub async fn prune(keeper: Arc<Keeper>, days: u32, mut stop: tokio::sync::watch::Receiver<bool>) {
    while !*stop.borrow() {
        match keeper.prune_events(days).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(pruned = n, "token events past retention pruned"),
            Err(e) => tracing::warn!(class = e.class(), "event pruning failed: {e}"),
        }
        tokio::select! {
            () = tokio::time::sleep(PRUNE_EVERY) => {}
            _ = stop.changed() => {}
        }
    }
}

/// How often events past the retention are pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

/// One step: the oldest undelivered event, delivered. `None`: nothing to
/// do (no event, or another process holds the lease); `Some(false)`: the
/// receiver did not take it.
async fn deliver_one(
    keeper: &Keeper,
    webhook: &Webhook,
    holder: &str,
) -> Result<Option<bool>, Error> {
    // A read first: an idle deliverer writes nothing (on SQLite a write
    // would start every grant cache over).
    if keeper.next_event(&webhook.name).await?.is_none() {
        return Ok(None);
    }
    if !keeper.lease_webhook(&webhook.name, holder).await? {
        return Ok(None);
    }
    // Again under the lease: the holder before may have delivered it.
    let Some(event) = keeper.next_event(&webhook.name).await? else {
        return Ok(None);
    };
    let now = keeper.now();
    let (body, headers) = webhook.signed(&event, now);
    let answer =
        tokenkeep_host::outbound::post(&webhook.url, &headers, body, DELIVERY_TIMEOUT).await;
    let delivered = matches!(answer, Ok(status) if (200..300).contains(&status));
    tokenkeep_host::metrics::delivery(&webhook.name, delivered);
    if !delivered {
        let why = match answer {
            Ok(status) => format!("answered {status}"),
            Err(e) => e,
        };
        tracing::info!(webhook = %webhook.name, event = event.id, "webhook delivery failed: {why}");
        return Ok(Some(false));
    }
    keeper
        .mark_delivered(&webhook.name, holder, event.id)
        .await?;
    Ok(Some(true))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_follow_the_standard_webhooks_example() {
        // The specification's published example.
        let key = base64::engine::general_purpose::STANDARD
            .decode("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
            .unwrap();
        let body = br#"{"test": 2432232314}"#;
        assert_eq!(
            sign(&key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body),
            "g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    #[test]
    fn webhooks_need_https_or_loopback_and_a_real_secret() {
        assert!(
            Webhook::new(
                "a",
                "http://127.0.0.1:9/hook",
                "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
            )
            .is_ok()
        );
        assert!(Webhook::new("a", "https://hooks.example.com/x", "0123456789abcdef").is_ok());
        assert!(Webhook::new("a", "http://hooks.example.com/x", "0123456789abcdef").is_err());
        assert!(Webhook::new("a", "https://hooks.example.com/x", "short").is_err());
        let debug = format!(
            "{:?}",
            Webhook::new("a", "https://h.example/x", "0123456789abcdefSECRET").unwrap()
        );
        assert!(!debug.contains("SECRET"), "{debug}");
    }
}
