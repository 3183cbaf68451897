//! The Postgres connection that keeps a [`GrantCache`] current: it turns
//! on the announcements of migration 11 (a trigger that notifies every
//! commit that changes a row), listens for them, and proves every
//! [`HEARTBEAT`] that it still hears them.
//!
//! The proof is a notification the listener sends itself on a channel of
//! its own. Postgres delivers notifications in commit order from one queue,
//! so when the heartbeat comes back, every change committed before it was
//! sent has been applied to the cache (the connection driver applies them
//! before it reads on). A connection that closes, stalls or is cut off
//! stops the heartbeats; the cache then stops serving within its bound and
//! is emptied, and the listener connects again.

use super::StorageError;
use super::postgres::{STATEMENT_BOUND, bounded, error, within};
use crate::clock::SharedClock;
use crate::grant_cache::{GrantCache, HEARTBEAT};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_postgres::{AsyncMessage, NoTls, SimpleQueryMessage};

/// The channel the trigger notifies, with `["provider","user_id"]` or `*`.
pub(crate) const CHANNEL: &str = "tokenkeep_tokens";

/// Waits between attempts to reconnect, doubling up to the last.
const RECONNECT: [Duration; 4] = [
    Duration::from_millis(100),
    Duration::from_millis(400),
    Duration::from_secs(1),
    Duration::from_secs(2),
];

/// A task that ends when this is dropped: the store owns its listener.
#[derive(Debug)]
pub struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Failed connections in a row after which the cache being off is logged.
const FAILURES_LOGGED: usize = 3;

/// Starts listening for `cache`, for as long as the returned guard lives.
/// The heartbeats also bring the database's time, which keeps the shared
/// clock current while reads are served from memory.
pub(crate) fn spawn(
    connect: &tokio_postgres::Config,
    cache: Arc<GrantCache>,
    clock: Arc<SharedClock>,
) -> AbortOnDrop {
    let connect = connect.clone();
    AbortOnDrop(tokio::spawn(async move {
        let mut failures = 0;
        loop {
            let mut heard = false;
            let ended = listen(&connect, &cache, &clock, &mut heard).await;
            cache.deafen();
            if let Err(e) = &ended {
                tracing::debug!(error = %e, "grant cache listener lost the database");
            }
            failures = if heard { 0 } else { failures + 1 };
            if failures == FAILURES_LOGGED {
                tracing::warn!(
                    "the grant cache is off: its listening connection keeps failing \
                     (every read goes to the database until it is back)"
                );
            }
            tokio::time::sleep(RECONNECT[failures.min(RECONNECT.len() - 1)]).await;
        }
    }))
}

/// One connection's life, until it fails; `heard` once a heartbeat came back.
async fn listen(
    connect: &tokio_postgres::Config,
    cache: &Arc<GrantCache>,
    clock: &SharedClock,
    heard: &mut bool,
) -> Result<(), StorageError> {
    let (client, mut connection) = bounded(STATEMENT_BOUND, connect.connect(NoTls)).await?;
    let (acks, mut acked) = tokio::sync::mpsc::unbounded_channel::<u64>();
    let applier = cache.clone();
    let _driver = AbortOnDrop(tokio::spawn(async move {
        loop {
            let message = std::future::poll_fn(|cx| connection.poll_message(cx)).await;
            match message {
                Some(Ok(AsyncMessage::Notification(n))) if n.channel() == CHANNEL => {
                    invalidate(&applier, n.payload());
                }
                // Only the heartbeat channel is left.
                Some(Ok(AsyncMessage::Notification(n))) => {
                    if let Ok(k) = n.payload().parse() {
                        let _ = acks.send(k);
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return,
            }
        }
    }));
    let pid: i32 = bounded(
        STATEMENT_BOUND,
        client.query_one("SELECT pg_backend_pid()", &[]),
    )
    .await?
    .try_get(0)
    .map_err(error)?;
    let heartbeat = format!("tokenkeep_heartbeat_{pid}");
    // Once for the database (migration 11): from here on every commit that
    // changes a row announces it, and every one that did not has landed.
    // The server probes this client too: a backend whose listener is gone
    // must not hold back the trimming of the NOTIFY queue for long.
    bounded(
        STATEMENT_BOUND,
        client.batch_execute(
            "SET tcp_keepalives_idle = 5; SET tcp_keepalives_interval = 1; \
             SET tcp_keepalives_count = 3; SET tcp_user_timeout = 5000; \
             SELECT tokenkeep_announce_changes()",
        ),
    )
    .await?;
    bounded(
        STATEMENT_BOUND,
        client.batch_execute(&format!("LISTEN {CHANNEL}; LISTEN {heartbeat}")),
    )
    .await?;
    // What changed before the LISTEN was not heard.
    cache.invalidate_all();
    for n in 1u64.. {
        let sent = Instant::now();
        let answer = bounded(
            STATEMENT_BOUND,
            client.simple_query(&format!(
                "NOTIFY {heartbeat}, '{n}'; SELECT floor(extract(epoch FROM clock_timestamp()))"
            )),
        )
        .await?;
        let db_now = answer.iter().find_map(|m| match m {
            SimpleQueryMessage::Row(r) => r.get(0)?.parse::<f64>().ok(),
            _ => None,
        });
        // Against the host's clock now, while the reading is fresh.
        clock.observe(db_now.map(|t| t as i64));
        within(STATEMENT_BOUND, async {
            loop {
                match acked.recv().await {
                    Some(k) if k == n => return Ok(()),
                    Some(_) => {}
                    None => {
                        return Err(StorageError::ConnectionLost(
                            "postgres: the listening connection closed".into(),
                        ));
                    }
                }
            }
        })
        .await?;
        cache.confirm(sent);
        *heard = true;
        tokio::time::sleep_until((sent + HEARTBEAT).into()).await;
    }
    Ok(())
}

/// Applies one change notification.
fn invalidate(cache: &GrantCache, payload: &str) {
    match serde_json::from_str::<(String, String)>(payload) {
        Ok((provider, user_id)) => cache.invalidate(&provider, &user_id),
        // `*`, or anything unexpected: assume everything changed.
        Err(_) => cache.invalidate_all(),
    }
}
