//! [`BrokerClient::watch`]: the broker's `WatchProxy` as a stream of assignments that survives
//! the broker going away.
//!
//! One background task per watch holds the `WatchProxy` stream and forwards each assignment. When
//! the stream ends or the broker cannot be reached, the task reconnects at once, then with a
//! jittered exponential backoff ([`MIN_BACKOFF`] doubling to [`MAX_BACKOFF`]); meanwhile the
//! watch yields, once per outage, what [`BrokerClient::resolve`] would answer without the broker
//! (its last answer, the local configuration, a direct connection if allowed, or
//! [`Error::NoRoute`]). A broker that does not know `WatchProxy` (UNIMPLEMENTED: older than the
//! RPC) is polled with `RequestProxy` at each lease end instead. A refusal (INVALID_ARGUMENT,
//! UNAUTHENTICATED, …) is yielded as [`Error::Broker`] and ends the watch: it is the feed's
//! misconfiguration, which retrying would not fix. Dropping the stream stops the task.

use std::collections::hash_map::RandomState;
use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use proxy_broker_core::ConnectionType;
use proxy_broker_core::redact::redact_text;
use proxy_broker_core::validate::{check_exchange_id, check_sticky_key};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::client::{BrokerClient, cache_key, check_region, falls_back};
use crate::error::Error;
use crate::feedback::pb_connection_type;
use crate::pb;
use crate::resolve::{Key, Resolved};

/// First wait before reconnecting after a failed attempt (the first reconnect is immediate).
pub const MIN_BACKOFF: Duration = Duration::from_millis(250);
/// Longest wait between reconnect attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Shortest wait between two polls of a broker without `WatchProxy`.
const MIN_POLL: Duration = Duration::from_secs(1);
/// Assignments the task may have ready before the feed reads them (it waits for the feed then).
const BUFFERED: usize = 4;

/// What to watch besides the exchange and connection type ([`BrokerClient::watch`]).
#[derive(Debug, Clone, Default)]
pub struct WatchOptions {
    /// Preferred region (overrides the client's).
    pub region: Option<String>,
    /// Keeps this feed on one proxy while it stays eligible (the request's `sticky_key`: at most
    /// 128 printable ASCII characters).
    pub sticky_key: Option<String>,
}

/// The stream [`BrokerClient::watch`] returns: `Ok` assignments (the broker's, or the fallback's
/// while the broker is unreachable) and `Err` for an outage with nowhere to fall back
/// ([`Error::NoRoute`], the watch goes on) or a refusal ([`Error::Broker`], the last item).
/// Reconnect when an assignment's route differs from the one in use ([`Resolved::same_route`]).
pub struct Assignments {
    rx: mpsc::Receiver<Result<Resolved, Error>>,
    task: JoinHandle<()>,
}

impl fmt::Debug for Assignments {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Assignments")
            .field("ready", &self.rx.len())
            .field("running", &!self.task.is_finished())
            .finish()
    }
}

impl Drop for Assignments {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl futures_core::Stream for Assignments {
    type Item = Result<Resolved, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx)
    }
}

impl BrokerClient {
    /// Watches the assignment for `exchange` and `connection_type`: the current one at once,
    /// then a new one whenever the broker moves this feed (its proxy was banned or ejected for
    /// the exchange, its lease ended, a reload changed the answer). Each assignment from the
    /// broker is already counted as one connection attempt: connect along it with
    /// [`crate::ConnectOptions::resolved`] rather than resolving again. See the module docs of
    /// `watch` for reconnects and fallbacks; the stream never ends on its own except after a
    /// refusal, and never panics.
    ///
    /// ```no_run
    /// # async fn f(broker: proxy_broker_client::BrokerClient) -> Result<(), proxy_broker_client::Error> {
    /// use futures_util::StreamExt;
    /// use proxy_broker_client::{ConnectOptions, ConnectionType, WatchOptions};
    ///
    /// let mut assignments = broker.watch("binance", ConnectionType::Websocket, &WatchOptions::default())?;
    /// let mut current = None;
    /// while let Some(assignment) = assignments.next().await {
    ///     let assignment = assignment?;
    ///     if current.as_ref().is_some_and(|c: &proxy_broker_client::Resolved| c.same_route(&assignment)) {
    ///         continue; // a renewed lease on the same proxy: keep the connection
    ///     }
    ///     let options = ConnectOptions { resolved: Some(assignment.clone()), ..Default::default() };
    ///     let ws = broker.connect_websocket_with("wss://stream.binance.com:9443/ws", "binance", &options).await?;
    ///     // ... swap `ws` in for the old connection ...
    ///     # drop(ws);
    ///     current = Some(assignment);
    /// }
    /// # Ok(()) }
    /// ```
    ///
    /// Fails at once (no task started) when an argument breaks the contract's rules.
    pub fn watch(
        &self,
        exchange: &str,
        connection_type: ConnectionType,
        options: &WatchOptions,
    ) -> Result<Assignments, Error> {
        check_exchange_id(exchange).map_err(|rule| Error::invalid("exchange_id", rule))?;
        let region = options
            .region
            .clone()
            .or_else(|| self.inner.region.clone())
            .filter(|r| !r.is_empty());
        if let Some(r) = &region {
            check_region(r)?;
        }
        let sticky_key = options.sticky_key.clone().filter(|k| !k.is_empty());
        if let Some(k) = &sticky_key {
            check_sticky_key(k).map_err(|rule| Error::invalid("sticky_key", rule))?;
        }
        let (tx, rx) = mpsc::channel(BUFFERED);
        let watcher = Watcher {
            client: self.clone(),
            key: cache_key(exchange, connection_type, region.as_deref()),
            request: pb::ProxyRequest {
                exchange_id: exchange.to_owned(),
                connection_type: pb_connection_type(connection_type).into(),
                region,
                client_id: self.inner.client_id.clone(),
                metadata: None,
                sticky_key,
            },
            connection_type,
            tx,
        };
        Ok(Assignments {
            rx,
            task: tokio::spawn(watcher.run()),
        })
    }
}

/// How one `WatchProxy` stream ended.
enum Ended {
    /// It ended or could not be opened for a reason that retrying may fix.
    Retry(String),
    /// The broker refused the request: the watch ends.
    Refused(Error),
    /// The broker has no `WatchProxy`: poll instead.
    Unimplemented,
    /// The feed dropped the stream.
    Gone,
}

struct Watcher {
    client: BrokerClient,
    key: Key,
    request: pb::ProxyRequest,
    connection_type: ConnectionType,
    tx: mpsc::Sender<Result<Resolved, Error>>,
}

impl Watcher {
    async fn run(self) {
        let mut failures: u32 = 0;
        let mut told_fallback = false;
        loop {
            let started = tokio::time::Instant::now();
            let (ended, got_answers) = self.stream_once().await;
            if got_answers {
                told_fallback = false;
            }
            // A stream that brought answers and lasted resets the backoff; one that keeps ending
            // at once (a broker in trouble) does not, so reconnecting never spins.
            let worked = got_answers && started.elapsed() >= MIN_POLL;
            if worked {
                failures = 0;
            }
            let reason = match ended {
                Ended::Gone => return,
                Ended::Refused(e) => {
                    let _ = self.tx.send(Err(e)).await;
                    return;
                }
                Ended::Unimplemented => {
                    self.poll().await;
                    return;
                }
                Ended::Retry(reason) => reason,
            };
            // The first reconnect after a stream that worked is immediate (a broker restarting
            // or draining says UNAVAILABLE: another replica answers); after that, back off.
            if worked {
                tracing::info!(exchange = %self.request.exchange_id, %reason, "watch ended: reconnecting");
                continue;
            }
            if !got_answers {
                self.client.broker_is_down();
            }
            if !told_fallback && !got_answers {
                told_fallback = true;
                tracing::warn!(exchange = %self.request.exchange_id, %reason, "watch: broker unavailable, answering without it until it is back");
                let answer = self.client.without_broker(
                    &self.key,
                    &self.request.exchange_id,
                    self.connection_type,
                    &reason,
                );
                if self.tx.send(answer).await.is_err() {
                    return;
                }
            }
            let wait = backoff(failures);
            failures = failures.saturating_add(1);
            tokio::select! {
                () = self.tx.closed() => return,
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Opens one `WatchProxy` stream and forwards its assignments until it ends. Returns how it
    /// ended and whether it brought any assignment.
    async fn stream_once(&self) -> (Ended, bool) {
        let timeout = self.client.broker_timeout();
        // Only the first answer is awaited with the broker timeout; the stream itself has none.
        let mut stub = self.client.raw();
        let opened = tokio::select! {
            () = self.tx.closed() => return (Ended::Gone, false),
            opened = tokio::time::timeout(timeout, stub.watch_proxy(self.request.clone())) => opened,
        };
        let mut stream = match opened {
            Err(_) => return (Ended::Retry(format!("no answer within {timeout:?}")), false),
            Ok(Err(status)) => return (classify(&status), false),
            Ok(Ok(response)) => response.into_inner(),
        };
        let mut got = false;
        loop {
            let message = tokio::select! {
                () = self.tx.closed() => return (Ended::Gone, got),
                message = stream.message() => message,
            };
            let answer = match message {
                Ok(Some(answer)) => answer,
                Ok(None) => return (Ended::Retry("the broker ended the stream".into()), got),
                Err(status) => return (classify(&status), got),
            };
            got = true;
            self.client.broker_is_up();
            let resolved = Resolved::from_pb(answer);
            if let Ok(r) = &resolved {
                self.client.remember(self.key.clone(), r);
            }
            if self.tx.send(resolved).await.is_err() {
                return (Ended::Gone, got);
            }
        }
    }

    /// For a broker without `WatchProxy`: `resolve` at each lease end, yielding changed routes.
    async fn poll(&self) {
        tracing::info!(exchange = %self.request.exchange_id, "the broker has no WatchProxy: polling RequestProxy at each lease end");
        let region = self.request.region.as_deref();
        let mut last: Option<Resolved> = None;
        loop {
            let answer = self
                .client
                .resolve(&self.request.exchange_id, self.connection_type, region)
                .await;
            let wait = match &answer {
                Ok(r) => until_lease_end(r),
                Err(_) => MAX_BACKOFF,
            };
            let changed = match (&answer, &last) {
                (Ok(new), Some(old)) => !new.same_route(old),
                _ => true,
            };
            if let Ok(r) = &answer {
                last = Some(r.clone());
            }
            if changed && self.tx.send(answer).await.is_err() {
                return;
            }
            tokio::select! {
                () = self.tx.closed() => return,
                () = tokio::time::sleep(wait) => {}
            }
        }
    }
}

fn classify(status: &tonic::Status) -> Ended {
    match status.code() {
        tonic::Code::Unimplemented => Ended::Unimplemented,
        code if falls_back(code) => Ended::Retry(format!("{code:?}: {}", redact_text(status.message()))),
        code => Ended::Refused(Error::Broker {
            code,
            message: redact_text(status.message()),
        }),
    }
}

/// The wait before reconnect attempt `failures + 1`: [`MIN_BACKOFF`] × 2^failures, at most
/// [`MAX_BACKOFF`], less a random fraction of up to half (so a fleet does not come back in step).
fn backoff(failures: u32) -> Duration {
    let full = MIN_BACKOFF
        .saturating_mul(1u32.checked_shl(failures.min(16)).unwrap_or(u32::MAX))
        .min(MAX_BACKOFF);
    // A random u64 from the standard library's per-map random keys: enough for jitter, and no
    // random-number crate for one line.
    let random = RandomState::new().build_hasher().finish();
    let fraction = (random % 1_000) as f64 / 2_000.0;
    full.mul_f64(1.0 - fraction)
}

/// How long an answer may be used: until its lease end, else its TTL (at least [`MIN_POLL`]).
fn until_lease_end(r: &Resolved) -> Duration {
    let wait = r
        .lease_expires_at
        .and_then(|at| at.duration_since(SystemTime::now()).ok())
        .unwrap_or(r.ttl);
    wait.clamp(MIN_POLL, crate::resolve::MAX_TTL)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap_with_jitter_and_never_overflows() {
        // (failures, lowest, highest)
        let rows = [
            (0, MIN_BACKOFF / 2, MIN_BACKOFF),
            (1, MIN_BACKOFF, MIN_BACKOFF * 2),
            (3, MIN_BACKOFF * 4, MIN_BACKOFF * 8),
            (20, MAX_BACKOFF / 2, MAX_BACKOFF),
            (u32::MAX, MAX_BACKOFF / 2, MAX_BACKOFF),
        ];
        for (failures, low, high) in rows {
            for _ in 0..50 {
                let wait = backoff(failures);
                assert!((low..=high).contains(&wait), "{failures}: {wait:?}");
            }
        }
    }
}
