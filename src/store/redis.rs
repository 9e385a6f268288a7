//! [`RedisStore`]: the [`Store`] shared by a fleet of brokers, on Redis (or Valkey, or a managed
//! Redis-compatible service), standalone or Redis Cluster.
//!
//! - **One script per operation** (`lua/*.lua`, each prefixed with `lua/common.lua`): the check
//!   and the change happen in one atomic step on the server, so concurrent brokers never admit
//!   more than a budget, and a ban's doubling counts each strike once.
//! - **The server owns time**: scripts read `TIME`; durations go in, remaining times come out, and
//!   [`RedisStore`] turns "ends in 37 s" into an instant of the caller's clock.
//! - **Keys**: `{key_prefix}{exchange/digest}:e` (the entry hash: URL, exchange, deadlines,
//!   counters), `:wh` / `:ww` (the HTTP / WebSocket sliding windows: sorted sets of attempt
//!   instants, exactly like [`super::window`]), `:l` (leases: a sorted set of lease ends). The
//!   digest is 128 bits of SHA-256 of the proxy URL: the URL (which may hold a password) is never
//!   in a key name, only in the entry's `url` field, for listings. The `{...}` hash tag puts an
//!   entry's four keys in one Cluster slot, as a script needs; different entries spread over slots.
//! - **Expiry**: every script sets every key of its entry to expire when the entry goes idle (the
//!   memory store's rule, plus a second). Nothing lives without a TTL.
//! - **Listing** pages over one index, `{key_prefix}index`: a sorted set of `exchange,digest`
//!   members read in lexical order (so pages come in the memory store's order: exchange, then
//!   digest, and page tokens are interchangeable). Scripts say when an entry needs (re)indexing (on
//!   creation and hourly while it lives: one more round trip then); each add also samples a few
//!   members, in the background, to drop those whose entry expired; listings drop the dead
//!   members they meet. The index itself expires [`INDEX_TTL`] after its last add.
//! - **Changes** are published on `{key_prefix}changes` by the scripts themselves and turned into
//!   the [`Store::subscribe`] feed by a task holding a pub/sub connection that reconnects; a
//!   broker's own changes reach its feed at once, without the round trip.
//! - **Shared answers** live at `{key_prefix}{a:digest}`, flight locks at `{key_prefix}{f:digest}`
//!   (`SET NX PX`, value = this broker's id), flight ends on `{key_prefix}flights`. A key's shared
//!   candidates ([`Store::add_answer`]) live under the answer's hash tag, so one script reaches
//!   both keys in one Cluster slot: `{key_prefix}{a:digest}:se` (a sorted set: proxy digest →
//!   the answer's end on the server's clock) and `:sa` (a hash: proxy digest → the answer's
//!   bytes); both expire with their longest-lived answer.
//!
//! Errors never show the URL's password: the client's messages are passed through
//! [`redact_text`], and the connection settings' `Debug` masks it.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

use ::redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use ::redis::cluster_async::ClusterConnection;
use ::redis::{Cmd, Pipeline, RedisFuture, Script, Value};
use aws_lc_rs::digest;
use futures_util::future::try_join_all;
use proxy_broker_core::ConnectionType;
use proxy_broker_core::embedded::{EJECTION_BASE, EJECTION_MAX};
use proxy_broker_core::redact::redact_text;
use tokio::sync::broadcast;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_stream::StreamExt;

use super::memory::{BAN_MEMORY, CHANGE_FEED_CAPACITY, EJECTION_MEMORY, FAILURE_MEMORY, MAX_LEASES};
use super::{
    Attempt, BanLength, Change, ChangeKind, DEFAULT_PAGE_SIZE, HandOut, Listed, MAX_ANSWER_BYTES,
    MAX_ANSWER_TTL, MAX_PAGE_SIZE, MAX_SHARED_ANSWERS, MAX_SHARED_ANSWERS_BYTES, OutageReport, OutageStatus,
    Page, ProxyState, StateKey, Store, StoreError, Transition, WindowState,
};
use crate::brokering::outage::{
    MAX_EXCHANGES as MAX_OUTAGE_EXCHANGES, MAX_REPORTERS as MAX_OUTAGE_REPORTERS,
    MAX_REPORTS as MAX_OUTAGE_EJECTIONS,
};
use crate::brokering::settings::{Budget, MAX_BAN, OutageSettings};
use crate::clock::Clock;

/// How long the listing index lives after its last add (longer than any entry can live without
/// being re-indexed: entries re-index hourly).
pub const INDEX_TTL: Duration = Duration::from_secs(2 * 24 * 3600 + 3600);
/// An entry asks to be re-indexed this long after its last index add.
const REINDEX_AFTER: Duration = Duration::from_secs(3600);
/// Keys live this much longer than the entry's idle deadline.
const MIN_TTL: Duration = Duration::from_secs(1);
/// Index members checked (and dropped when dead) per index add.
const INDEX_SAMPLE: usize = 3;
/// Index members a listing may scan per page beyond the rows it returns (dead members it drops).
const LIST_SCAN_FACTOR: usize = 4;
/// Pub/sub reconnect backoff.
const RESUBSCRIBE_MIN: Duration = Duration::from_millis(100);
const RESUBSCRIBE_MAX: Duration = Duration::from_secs(2);
/// How often the pub/sub connection is pinged (a silent network partition ends it too).
const PUBSUB_PING: Duration = Duration::from_secs(5);

/// Where the store connects. Built by [`crate::store::config`] (which reads the password).
// Built once at start-up and consumed by `RedisStore::new`: its size does not matter.
#[allow(clippy::large_enum_variant)]
pub enum Target {
    /// One server (or a proxy in front of several).
    Single(::redis::Client),
    /// A Redis Cluster: the cluster client, and one plain client per seed node for pub/sub
    /// (classic `PUBLISH` reaches every node of a cluster, so any one will do).
    Cluster {
        /// Routes each script to its slot's primary.
        client: ::redis::cluster::ClusterClient,
        /// The seed nodes, for the pub/sub connection (tried in turn).
        seeds: Vec<::redis::Client>,
    },
}

impl fmt::Debug for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Addresses only (no password: the client's own `Debug` would show the settings).
        match self {
            Target::Single(c) => f
                .debug_tuple("Single")
                .field(&c.get_connection_info().addr().to_string())
                .finish(),
            Target::Cluster { seeds, .. } => f
                .debug_struct("Cluster")
                .field(
                    "seeds",
                    &seeds
                        .iter()
                        .map(|c| c.get_connection_info().addr().to_string())
                        .collect::<Vec<_>>(),
                )
                .finish(),
        }
    }
}

/// The scripts, each compiled once (its SHA-1 computed) with the common prelude and constants.
#[derive(Debug)]
struct Scripts {
    try_attempt: Script,
    ban: Script,
    penalise: Script,
    record_failure: Script,
    record_success: Script,
    eject: Script,
    lift_ejection: Script,
    release: Script,
    snapshot: Script,
    get_answer: Script,
    end_flight: Script,
    outage: Script,
    add_answer: Script,
    get_answers: Script,
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Scripts {
    fn new() -> Self {
        let prelude = format!(
            "local BAN_MEMORY = {}\nlocal EJECTION_MEMORY = {}\nlocal FAILURE_MEMORY = {}\n\
             local REINDEX_AFTER = {}\nlocal MAX_LEASES = {}\nlocal MIN_TTL = {}\nlocal MAX_BAN = {}\n{}",
            ms(BAN_MEMORY),
            ms(EJECTION_MEMORY),
            ms(FAILURE_MEMORY),
            ms(REINDEX_AFTER),
            MAX_LEASES,
            ms(MIN_TTL),
            ms(MAX_BAN),
            concat!(
                include_str!("lua/clock.lua"),
                "\n",
                include_str!("lua/common.lua")
            ),
        );
        let entry = |body: &str| Script::new(&format!("{prelude}\n{body}"));
        Self {
            try_attempt: entry(include_str!("lua/try_attempt.lua")),
            ban: entry(include_str!("lua/ban.lua")),
            penalise: entry(include_str!("lua/penalise.lua")),
            record_failure: entry(include_str!("lua/record_failure.lua")),
            record_success: entry(include_str!("lua/record_success.lua")),
            eject: entry(include_str!("lua/eject.lua")),
            lift_ejection: entry(include_str!("lua/lift_ejection.lua")),
            release: entry(include_str!("lua/release.lua")),
            snapshot: entry(include_str!("lua/snapshot.lua")),
            get_answer: Script::new(include_str!("lua/get_answer.lua")),
            end_flight: Script::new(include_str!("lua/end_flight.lua")),
            outage: Script::new(concat!(
                include_str!("lua/clock.lua"),
                "\n",
                include_str!("lua/outage.lua")
            )),
            add_answer: Script::new(include_str!("lua/add_answer.lua")),
            get_answers: Script::new(include_str!("lua/get_answers.lua")),
        }
    }
}

/// A connection to either kind of deployment (both reconnect by themselves).
#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// The shared store. See the module docs. Dropping it stops its pub/sub task.
pub struct RedisStore {
    inner: Arc<Inner>,
    subscriber: JoinHandle<()>,
}

struct Inner {
    conn: Conn,
    cluster: bool,
    prefix: String,
    changes_channel: String,
    flights_channel: String,
    index_key: String,
    /// This broker's id: the value of its flight locks, and the origin of its messages.
    origin: String,
    scripts: Scripts,
    clock: Arc<dyn Clock>,
    changes: broadcast::Sender<Change>,
    flights: broadcast::Sender<Arc<str>>,
    /// Added to the server's clock in scripts: 0 except in tests, which move time with it.
    skew_ms: AtomicI64,
    /// Whether the pub/sub connection is subscribed (changes of other brokers arrive).
    subscribed: Arc<AtomicBool>,
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("cluster", &self.inner.cluster)
            .field("key_prefix", &self.inner.prefix)
            .finish_non_exhaustive()
    }
}

impl Drop for RedisStore {
    fn drop(&mut self) {
        self.subscriber.abort();
    }
}

/// A Redis client error as a store error, with any URL's userinfo masked.
fn unavailable(e: &::redis::RedisError) -> StoreError {
    StoreError::Unavailable(redact_text(&e.to_string()))
}

fn bad_reply(what: &str) -> StoreError {
    StoreError::Unavailable(format!("unexpected reply from Redis to {what}"))
}

/// 128 bits of SHA-256 over the length-prefixed `text`, as 32 hex digits. Its first 16 digits are
/// [`crate::brokering::sticky::digest64`] of the same text, the memory store's listing order.
fn digest_hex(text: &str) -> String {
    let mut ctx = digest::Context::new(&digest::SHA256);
    ctx.update(&u64::try_from(text.len()).unwrap_or(u64::MAX).to_be_bytes());
    ctx.update(text.as_bytes());
    let d = ctx.finish();
    d.as_ref().iter().take(16).map(|b| format!("{b:02x}")).collect()
}

fn int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(i) => Some(*i),
        Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
        Value::SimpleString(s) => s.parse().ok(),
        _ => None,
    }
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

fn u32_of(v: &Value) -> Option<u32> {
    int(v).map(|i| u32::try_from(i.max(0)).unwrap_or(u32::MAX))
}

/// Decodes a script's array reply of integers.
fn ints(reply: &Value, what: &str) -> Result<Vec<i64>, StoreError> {
    match reply {
        Value::Array(items) => items
            .iter()
            .map(|v| int(v).ok_or_else(|| bad_reply(what)))
            .collect(),
        _ => Err(bad_reply(what)),
    }
}

/// What a per-entry script call carries besides its own arguments.
struct EntryCall<'a> {
    key: StateKey<'a>,
    create: bool,
}

impl RedisStore {
    /// A store on `target` whose keys start with `key_prefix`; replies slower than
    /// `response_timeout` are errors. Connects lazily (an unreachable server is an error per
    /// operation, not here). Must run inside a Tokio runtime (it starts the pub/sub task).
    pub fn new(
        target: Target,
        key_prefix: &str,
        response_timeout: Duration,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, StoreError> {
        let connect_timeout = response_timeout.max(Duration::from_secs(1));
        let (conn, cluster, pubsub_clients) = match target {
            Target::Single(client) => {
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(connect_timeout))
                    .set_response_timeout(Some(connect_timeout))
                    .set_number_of_retries(2)
                    .set_max_delay(Duration::from_millis(500));
                let manager = ConnectionManager::new_lazy_with_config(client.clone(), config)
                    .map_err(|e| unavailable(&e))?;
                (Conn::Single(manager), false, vec![client])
            }
            Target::Cluster { client, seeds } => {
                let config = ::redis::cluster::ClusterConfig::new()
                    .set_connection_timeout(connect_timeout)
                    .set_response_timeout(connect_timeout);
                let conn = client.get_pending_async_connection_with_config(config);
                (Conn::Cluster(conn), true, seeds)
            }
        };
        let (changes, _) = broadcast::channel(CHANGE_FEED_CAPACITY);
        let (flights, _) = broadcast::channel(CHANGE_FEED_CAPACITY);
        let origin = format!("{:016x}", rand::random::<u64>());
        let inner = Arc::new(Inner {
            conn,
            cluster,
            prefix: key_prefix.to_owned(),
            changes_channel: format!("{key_prefix}changes"),
            flights_channel: format!("{key_prefix}flights"),
            index_key: format!("{key_prefix}index"),
            origin,
            scripts: Scripts::new(),
            clock,
            changes,
            flights,
            skew_ms: AtomicI64::new(0),
            subscribed: Arc::new(AtomicBool::new(false)),
        });
        let subscriber = tokio::spawn(subscribe_loop(
            pubsub_clients,
            Feeds {
                changes_channel: inner.changes_channel.clone(),
                flights_channel: inner.flights_channel.clone(),
                origin: inner.origin.clone(),
                changes: inner.changes.clone(),
                flights: inner.flights.clone(),
                clock: inner.clock.clone(),
                subscribed: inner.subscribed.clone(),
            },
        ));
        Ok(Self { inner, subscriber })
    }

    /// Whether the change feed is connected: other brokers' changes arrive (a broker's own
    /// always do). False until the first subscription, and while it reconnects.
    pub fn is_subscribed(&self) -> bool {
        self.inner.subscribed.load(Ordering::Relaxed)
    }

    /// `PING`: whether the server answers (the resilient wrapper's probe).
    pub async fn ping(&self) -> Result<(), StoreError> {
        let mut conn = self.inner.conn.clone();
        let pong: String = ::redis::cmd("PING")
            .query_async(&mut conn)
            .await
            .map_err(|e| unavailable(&e))?;
        if pong == "PONG" {
            Ok(())
        } else {
            Err(bad_reply("PING"))
        }
    }

    /// Moves the store's notion of the server's time by `by` (tests only: windows, bans and
    /// leases then pass without waiting; key TTLs still run on the server's real clock).
    #[cfg(test)]
    pub(crate) fn advance(&self, by: Duration) {
        let by = i64::try_from(ms(by)).unwrap_or(i64::MAX);
        self.inner.skew_ms.fetch_add(by, Ordering::Relaxed);
    }
}

impl Inner {
    fn tag(&self, exchange: &str, digest: &str) -> String {
        format!("{}{{{exchange}/{digest}}}", self.prefix)
    }

    fn entry_keys(&self, exchange: &str, digest: &str) -> [String; 4] {
        let tag = self.tag(exchange, digest);
        [
            format!("{tag}:e"),
            format!("{tag}:wh"),
            format!("{tag}:ww"),
            format!("{tag}:l"),
        ]
    }

    /// The instant `remaining_ms` from now on the caller's clock (`None` when not positive).
    fn at(&self, remaining_ms: i64) -> Option<Instant> {
        let left = Duration::from_millis(u64::try_from(remaining_ms).ok().filter(|&m| m > 0)?);
        let now = self.clock.now();
        Some(now.checked_add(left).unwrap_or(now + MAX_BAN))
    }

    /// Runs a per-entry script; returns its reply.
    async fn entry(
        &self,
        script: &Script,
        call: EntryCall<'_>,
        args: &[String],
        what: &str,
    ) -> Result<Vec<i64>, StoreError> {
        let digest = digest_hex(call.key.proxy);
        let keys = self.entry_keys(call.key.exchange, &digest);
        let mut invocation = script.prepare_invoke();
        for k in &keys {
            invocation.key(k);
        }
        invocation
            .arg(self.skew_ms.load(Ordering::Relaxed))
            .arg(call.key.proxy)
            .arg(call.key.exchange)
            .arg(if call.create { "1" } else { "0" })
            .arg(&self.changes_channel)
            .arg(&self.origin);
        for a in args {
            invocation.arg(a);
        }
        let mut conn = self.conn.clone();
        let reply: Value = invocation
            .invoke_async(&mut conn)
            .await
            .map_err(|e| unavailable(&e))?;
        ints(&reply, what)
    }

    /// After a script said the entry needs (re)indexing (on creation, then hourly): adds it to
    /// the listing index (awaited, so a listing right after a hand-out shows it), then, in the
    /// background, samples a few members and drops those whose entry expired.
    async fn reindex(self: &Arc<Self>, exchange: &str, proxy: &str) {
        let member = format!("{exchange},{}", digest_hex(proxy));
        let mut conn = self.conn.clone();
        // Best effort: a failed add is retried by the entry's next hourly re-index.
        let added: Result<(), _> = ::redis::pipe()
            .cmd("ZADD")
            .arg(&self.index_key)
            .arg(0)
            .arg(&member)
            .ignore()
            .cmd("PEXPIRE")
            .arg(&self.index_key)
            .arg(ms(INDEX_TTL))
            .ignore()
            .query_async(&mut conn)
            .await;
        if added.is_ok() {
            let inner = self.clone();
            tokio::spawn(async move {
                let _ = inner.prune_index_sample().await;
            });
        }
    }

    async fn prune_index_sample(&self) -> Result<(), ::redis::RedisError> {
        let mut conn = self.conn.clone();
        let sample: Vec<String> = ::redis::cmd("ZRANDMEMBER")
            .arg(&self.index_key)
            .arg(INDEX_SAMPLE)
            .query_async(&mut conn)
            .await?;
        for m in sample {
            let Some((exchange, digest)) = m.split_once(',') else {
                continue;
            };
            let [entry, ..] = self.entry_keys(exchange, digest);
            let exists: bool = ::redis::cmd("EXISTS").arg(&entry).query_async(&mut conn).await?;
            if !exists {
                let _: () = ::redis::cmd("ZREM")
                    .arg(&self.index_key)
                    .arg(&m)
                    .query_async(&mut conn)
                    .await?;
            }
        }
        Ok(())
    }

    /// One entry's snapshot by its exchange and digest: its URL and state, `None` without entry.
    async fn snapshot(
        &self,
        exchange: &str,
        digest: &str,
    ) -> Result<Option<(String, String, ProxyState)>, StoreError> {
        let keys = self.entry_keys(exchange, digest);
        let mut invocation = self.scripts.snapshot.prepare_invoke();
        for k in &keys {
            invocation.key(k);
        }
        invocation.arg(self.skew_ms.load(Ordering::Relaxed));
        let mut conn = self.conn.clone();
        let reply: Value = invocation
            .invoke_async(&mut conn)
            .await
            .map_err(|e| unavailable(&e))?;
        self.decode_snapshot(&reply)
    }

    fn decode_snapshot(&self, reply: &Value) -> Result<Option<(String, String, ProxyState)>, StoreError> {
        let bad = || bad_reply("a snapshot");
        let Value::Array(v) = reply else {
            return Err(bad());
        };
        if v.first().and_then(int) != Some(1) {
            return Ok(None);
        }
        if v.len() != 21 {
            return Err(bad());
        }
        let n = |i: usize| int(&v[i]).ok_or_else(bad);
        let count = |i: usize| u32_of(&v[i]).ok_or_else(bad);
        let window = |at: usize| -> Result<Option<WindowState>, StoreError> {
            if n(at)? != 1 {
                return Ok(None);
            }
            let per = u64::try_from(n(at + 2)?).map_err(|_| bad())?;
            Ok(Some(WindowState {
                budget: Budget {
                    attempts: count(at + 1)?,
                    per: Duration::from_millis(per),
                },
                used: count(at + 3)?,
                frees_at: self.at(n(at + 4)?),
            }))
        };
        let state = ProxyState {
            banned_until: self.at(n(3)?),
            ban_strikes: count(4)?,
            penalised_until: self.at(n(5)?),
            ejected_until: self.at(n(6)?),
            ejections: count(7)?,
            consecutive_failures: count(8)?,
            live_leases: count(9)?,
            hand_outs: u64::try_from(n(10)?.max(0)).unwrap_or(0),
            http: window(11)?,
            websocket: window(16)?,
        };
        Ok(Some((
            text(&v[1]).ok_or_else(bad)?,
            text(&v[2]).ok_or_else(bad)?,
            state,
        )))
    }

    fn publish_locally(&self, key: StateKey<'_>, kind: ChangeKind) {
        // No subscriber is not an error.
        let _ = self.changes.send(Change {
            proxy: Arc::from(key.proxy),
            exchange: Arc::from(key.exchange),
            kind,
        });
    }

    fn answer_key(&self, key: &str) -> String {
        format!("{}{{a:{}}}", self.prefix, digest_hex(key))
    }

    /// The two keys of `key`'s shared candidates: the ends and the bytes.
    fn answer_set_keys(&self, key: &str) -> [String; 2] {
        let tag = self.answer_key(key);
        [format!("{tag}:se"), format!("{tag}:sa")]
    }

    fn flight_key(&self, key: &str) -> String {
        format!("{}{{f:{}}}", self.prefix, digest_hex(key))
    }

    /// The index of exchanges with outage reports (its own slot).
    fn outage_index_key(&self) -> String {
        format!("{}{{o}}:x", self.prefix)
    }

    /// Runs the outage script for one exchange (see `lua/outage.lua`).
    async fn outage(
        &self,
        exchange: &str,
        op: OutageOp<'_>,
        rule: &OutageSettings,
    ) -> Result<(Transition, OutageStatus), StoreError> {
        let tag = format!("{}{{o:{exchange}}}", self.prefix);
        let mut invocation = self.scripts.outage.prepare_invoke();
        for suffix in ["r", "f", "j", "s", "i"] {
            invocation.key(format!("{tag}:{suffix}"));
        }
        let fraction = if rule.failing_fraction.is_nan() {
            1.0
        } else {
            rule.failing_fraction.clamp(0.0, 1.0)
        };
        let (code, subject, failing) = match op {
            OutageOp::Report { proxy, failing } => ("r", digest_hex(proxy), failing),
            OutageOp::Ejection { proxy } => ("j", proxy.to_owned(), false),
            OutageOp::Status => ("s", String::new(), false),
        };
        invocation
            .arg(self.skew_ms.load(Ordering::Relaxed))
            .arg(code)
            .arg(ms(Duration::from_secs(
                rule.window_seconds.clamp(1, OUTAGE_MAX_WINDOW),
            )))
            .arg(rule.min_proxies.max(1))
            .arg(format!("{fraction}"))
            .arg(MAX_OUTAGE_REPORTERS)
            .arg(MAX_OUTAGE_EJECTIONS)
            .arg(subject)
            .arg(if failing { "1" } else { "0" });
        let mut conn = self.conn.clone();
        let reply: Value = invocation
            .invoke_async(&mut conn)
            .await
            .map_err(|e| unavailable(&e))?;
        let Value::Array(items) = reply else {
            return Err(bad_reply("outage"));
        };
        let (head, urls) = items.split_at(items.len().min(6));
        let head: Vec<i64> = head
            .iter()
            .map(|v| int(v).ok_or_else(|| bad_reply("outage")))
            .collect::<Result<_, _>>()?;
        let [transition, _in, age, reporters, failing, index] = head[..] else {
            return Err(bad_reply("outage"));
        };
        let now = self.clock.now();
        let status = OutageStatus {
            since: u64::try_from(age)
                .ok()
                .map(|a| now.checked_sub(Duration::from_millis(a)).unwrap_or(now)),
            reporters: usize::try_from(reporters).unwrap_or(0),
            failing: usize::try_from(failing).unwrap_or(0),
        };
        let transition = match transition {
            1 => {
                let mut lift: Vec<Arc<str>> = urls.iter().filter_map(text).map(Arc::from).collect();
                lift.sort();
                lift.dedup();
                Transition::Started { lift }
            }
            2 => Transition::Ended,
            _ => Transition::None,
        };
        if index == 1 {
            // Best effort: the marker asks again within half a window.
            let _: Result<(), _> = ::redis::pipe()
                .cmd("ZADD")
                .arg(self.outage_index_key())
                .arg(0)
                .arg(exchange)
                .ignore()
                .cmd("PEXPIRE")
                .arg(self.outage_index_key())
                .arg(ms(Duration::from_secs(OUTAGE_MAX_WINDOW) * 2))
                .ignore()
                .query_async(&mut conn)
                .await;
        }
        Ok((transition, status))
    }
}

/// What the outage script is asked.
#[derive(Clone, Copy)]
enum OutageOp<'a> {
    Report { proxy: &'a str, failing: bool },
    Ejection { proxy: &'a str },
    Status,
}

/// Longest outage window the store keeps (longer ones are cut to it: a day).
const OUTAGE_MAX_WINDOW: u64 = 24 * 3600;

/// Lexical bounds of the index range a listing reads (`ZRANGEBYLEX` syntax).
fn list_bounds(exchange: Option<&str>, after: Option<&(String, u64)>) -> (String, String) {
    let (mut lo, hi) = match exchange {
        // Members are `exchange,digest`; ',' sorts before every character an exchange id may
        // hold, so one exchange's members are exactly those in ["x,", "x-").
        Some(x) => (format!("[{x},"), format!("({x}-")),
        None => ("-".to_owned(), "+".to_owned()),
    };
    if let Some((x, d)) = after {
        // After every member whose digest starts with the token's 16 digits ('g' sorts after
        // every hex digit).
        let from = format!("({x},{d:016x}g");
        if lo == "-" || from[1..] >= lo[1..] {
            lo = from;
        }
    }
    (lo, hi)
}

#[tonic::async_trait]
impl Store for RedisStore {
    async fn try_attempt(&self, key: StateKey<'_>, hand_out: HandOut) -> Result<Attempt, StoreError> {
        let kind = match hand_out.connection_type {
            ConnectionType::Http => "h",
            ConnectionType::Websocket => "w",
        };
        let (has, attempts, per) = match hand_out.budget {
            Some(b) => ("1", b.attempts, ms(b.per)),
            None => ("0", 0, 0),
        };
        let args = [
            kind.to_owned(),
            has.to_owned(),
            attempts.to_string(),
            per.to_string(),
            ms(hand_out.lease.min(MAX_ANSWER_TTL)).to_string(),
        ];
        let r = self
            .inner
            .entry(
                &self.inner.scripts.try_attempt,
                EntryCall { key, create: true },
                &args,
                "try_attempt",
            )
            .await?;
        let [admitted, n, reindex] = r[..] else {
            return Err(bad_reply("try_attempt"));
        };
        if reindex == 1 {
            self.inner.reindex(key.exchange, key.proxy).await;
        }
        if admitted == 1 {
            Ok(Attempt::Admitted {
                used: u32::try_from(n.max(0)).unwrap_or(u32::MAX),
                budget: hand_out.budget,
            })
        } else {
            Ok(Attempt::Exhausted {
                retry_after: Duration::from_millis(u64::try_from(n.max(1)).unwrap_or(1)),
            })
        }
    }

    async fn states(&self, exchange: &str, proxies: &[&str]) -> Result<Vec<Option<ProxyState>>, StoreError> {
        // Concurrent calls share the multiplexed connection: one round trip for all of them.
        let snapshots = try_join_all(proxies.iter().map(|proxy| {
            let digest = digest_hex(proxy);
            async move { self.inner.snapshot(exchange, &digest).await }
        }))
        .await?;
        Ok(snapshots
            .into_iter()
            .map(|s| s.map(|(_, _, state)| state))
            .collect())
    }

    async fn ban(
        &self,
        key: StateKey<'_>,
        length: BanLength,
        create: bool,
    ) -> Result<Option<Instant>, StoreError> {
        let args = match length {
            BanLength::Exactly(d) => vec!["x".to_owned(), ms(d.min(MAX_BAN)).to_string()],
            BanLength::Doubling { base, cap } => vec![
                "d".to_owned(),
                ms(base.min(MAX_BAN)).to_string(),
                ms(cap.min(MAX_BAN)).to_string(),
            ],
        };
        let r = self
            .inner
            .entry(&self.inner.scripts.ban, EntryCall { key, create }, &args, "ban")
            .await?;
        self.deadline(key, &r, ChangeKind::Banned, "ban").await
    }

    async fn penalise(
        &self,
        key: StateKey<'_>,
        length: Duration,
        create: bool,
    ) -> Result<Option<Instant>, StoreError> {
        let args = [ms(length.min(MAX_BAN)).to_string()];
        let r = self
            .inner
            .entry(
                &self.inner.scripts.penalise,
                EntryCall { key, create },
                &args,
                "penalise",
            )
            .await?;
        self.deadline(key, &r, ChangeKind::Penalised, "penalise").await
    }

    async fn record_failure(&self, key: StateKey<'_>, create: bool) -> Result<Option<u32>, StoreError> {
        let r = self
            .inner
            .entry(
                &self.inner.scripts.record_failure,
                EntryCall { key, create },
                &[],
                "record_failure",
            )
            .await?;
        match r[..] {
            [0] => Ok(None),
            [1, count, reindex] => {
                if reindex == 1 {
                    self.inner.reindex(key.exchange, key.proxy).await;
                }
                Ok(Some(u32::try_from(count.max(0)).unwrap_or(u32::MAX)))
            }
            _ => Err(bad_reply("record_failure")),
        }
    }

    async fn record_success(&self, key: StateKey<'_>) -> Result<(), StoreError> {
        self.inner
            .entry(
                &self.inner.scripts.record_success,
                EntryCall { key, create: false },
                &[],
                "record_success",
            )
            .await?;
        Ok(())
    }

    async fn eject(&self, key: StateKey<'_>, create: bool) -> Result<Option<Instant>, StoreError> {
        let args = [ms(EJECTION_BASE).to_string(), ms(EJECTION_MAX).to_string()];
        let r = self
            .inner
            .entry(
                &self.inner.scripts.eject,
                EntryCall { key, create },
                &args,
                "eject",
            )
            .await?;
        self.deadline(key, &r, ChangeKind::Ejected, "eject").await
    }

    async fn lift_ejection(&self, key: StateKey<'_>) -> Result<bool, StoreError> {
        let r = self
            .inner
            .entry(
                &self.inner.scripts.lift_ejection,
                EntryCall { key, create: false },
                &[],
                "lift_ejection",
            )
            .await?;
        let lifted = r.first() == Some(&1);
        if lifted {
            self.inner.publish_locally(key, ChangeKind::Lifted);
        }
        Ok(lifted)
    }

    async fn release(&self, key: StateKey<'_>) -> Result<bool, StoreError> {
        let r = self
            .inner
            .entry(
                &self.inner.scripts.release,
                EntryCall { key, create: false },
                &[],
                "release",
            )
            .await?;
        Ok(r.first() == Some(&1))
    }

    async fn list(
        &self,
        exchange: Option<&str>,
        page_token: Option<&str>,
        page_size: usize,
    ) -> Result<Page, StoreError> {
        let after = page_token
            .filter(|t| !t.is_empty())
            .map(super::memory::parse_token)
            .transpose()?;
        let limit = match page_size {
            0 => DEFAULT_PAGE_SIZE,
            n => n.min(MAX_PAGE_SIZE),
        };
        let (mut lo, hi) = list_bounds(exchange, after.as_ref());
        let mut conn = self.inner.conn.clone();
        let mut rows: Vec<(String, Listed)> = Vec::with_capacity(limit + 1);
        let mut scanned = 0usize;
        let mut last_scanned: Option<String> = None;
        let mut exhausted = false;
        while rows.len() <= limit {
            if scanned >= limit.saturating_mul(LIST_SCAN_FACTOR) {
                break;
            }
            let batch = (limit + 1 - rows.len()).min(MAX_PAGE_SIZE);
            let members: Vec<String> = ::redis::cmd("ZRANGEBYLEX")
                .arg(&self.inner.index_key)
                .arg(&lo)
                .arg(&hi)
                .arg("LIMIT")
                .arg(0)
                .arg(batch)
                .query_async(&mut conn)
                .await
                .map_err(|e| unavailable(&e))?;
            if members.is_empty() {
                exhausted = true;
                break;
            }
            scanned += members.len();
            let snapshots = try_join_all(members.iter().map(|m| async move {
                match m.split_once(',') {
                    Some((x, d)) => self.inner.snapshot(x, d).await,
                    None => Ok(None),
                }
            }))
            .await?;
            let mut dead = Vec::new();
            for (member, snapshot) in members.iter().zip(snapshots) {
                match snapshot {
                    Some((url, x, state)) => rows.push((
                        member.clone(),
                        Listed {
                            proxy: Arc::from(url),
                            exchange: Arc::from(x),
                            state,
                        },
                    )),
                    None => dead.push(member.clone()),
                }
            }
            if !dead.is_empty() {
                let _: Result<(), _> = ::redis::cmd("ZREM")
                    .arg(&self.inner.index_key)
                    .arg(&dead)
                    .query_async(&mut conn)
                    .await;
            }
            let last = members.last().cloned().unwrap_or_default();
            lo = format!("({last}");
            last_scanned = Some(last);
            if members.len() < batch {
                exhausted = true;
                break;
            }
        }
        let more_rows = rows.len() > limit;
        rows.truncate(limit);
        let token_of = |member: &str| {
            member
                .split_once(',')
                .map(|(x, d)| format!("{x}/{}", d.chars().take(16).collect::<String>()))
        };
        let next_page_token = if more_rows {
            rows.last().and_then(|(m, _)| token_of(m))
        } else if !exhausted {
            // The scan budget ran out before the page filled: go on from the last member seen.
            last_scanned.as_deref().and_then(token_of)
        } else {
            None
        };
        Ok(Page {
            entries: rows.into_iter().map(|(_, l)| l).collect(),
            next_page_token,
        })
    }

    fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.inner.changes.subscribe()
    }

    async fn put_answer(&self, key: &str, bytes: &[u8], ttl: Duration) -> Result<(), StoreError> {
        let ttl = ms(ttl.min(MAX_ANSWER_TTL));
        if bytes.len() > MAX_ANSWER_BYTES || ttl == 0 {
            return Ok(());
        }
        let mut conn = self.inner.conn.clone();
        let _: () = ::redis::cmd("SET")
            .arg(self.inner.answer_key(key))
            .arg(bytes)
            .arg("PX")
            .arg(ttl)
            .query_async(&mut conn)
            .await
            .map_err(|e| unavailable(&e))?;
        Ok(())
    }

    async fn get_answer(&self, key: &str) -> Result<Option<(Vec<u8>, Duration)>, StoreError> {
        let mut conn = self.inner.conn.clone();
        let reply: Value = self
            .inner
            .scripts
            .get_answer
            .key(self.inner.answer_key(key))
            .invoke_async(&mut conn)
            .await
            .map_err(|e| unavailable(&e))?;
        match reply {
            Value::Nil => Ok(None),
            Value::Array(v) => match &v[..] {
                [Value::BulkString(bytes), left] => {
                    let left = int(left).ok_or_else(|| bad_reply("get_answer"))?;
                    // -1 (no TTL) cannot happen (answers are set with one); -2: gone meanwhile.
                    Ok(u64::try_from(left)
                        .ok()
                        .filter(|&l| l > 0)
                        .map(|l| (bytes.clone(), Duration::from_millis(l))))
                }
                _ => Err(bad_reply("get_answer")),
            },
            _ => Err(bad_reply("get_answer")),
        }
    }

    async fn add_answer(
        &self,
        key: &str,
        proxy: &str,
        bytes: &[u8],
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let ttl = ms(ttl.min(MAX_ANSWER_TTL));
        if bytes.len() > MAX_ANSWER_BYTES || ttl == 0 {
            return Ok(());
        }
        let [ends, answers] = self.inner.answer_set_keys(key);
        let mut conn = self.inner.conn.clone();
        let _: Value = self
            .inner
            .scripts
            .add_answer
            .key(ends)
            .key(answers)
            .arg(self.inner.skew_ms.load(Ordering::Relaxed))
            .arg(digest_hex(proxy))
            .arg(bytes)
            .arg(ttl)
            .arg(MAX_SHARED_ANSWERS)
            .arg(MAX_SHARED_ANSWERS_BYTES)
            .invoke_async(&mut conn)
            .await
            .map_err(|e| unavailable(&e))?;
        Ok(())
    }

    async fn get_answers(&self, key: &str) -> Result<Vec<(Vec<u8>, Duration)>, StoreError> {
        let [ends, answers] = self.inner.answer_set_keys(key);
        let mut conn = self.inner.conn.clone();
        let reply: Value = self
            .inner
            .scripts
            .get_answers
            .key(ends)
            .key(answers)
            .arg(self.inner.skew_ms.load(Ordering::Relaxed))
            .invoke_async(&mut conn)
            .await
            .map_err(|e| unavailable(&e))?;
        let bad = || bad_reply("get_answers");
        let Value::Array(items) = reply else {
            return Err(bad());
        };
        if items.len() % 2 != 0 || items.len() > 2 * MAX_SHARED_ANSWERS {
            return Err(bad());
        }
        items
            .chunks(2)
            .map(|pair| match pair {
                [Value::BulkString(bytes), left] => {
                    let left = u64::try_from(int(left).ok_or_else(bad)?).map_err(|_| bad())?;
                    Ok((bytes.clone(), Duration::from_millis(left.max(1))))
                }
                _ => Err(bad()),
            })
            .collect()
    }

    async fn lead_flight(&self, key: &str, lock_ttl: Duration) -> Result<bool, StoreError> {
        let mut conn = self.inner.conn.clone();
        let reply: Value = ::redis::cmd("SET")
            .arg(self.inner.flight_key(key))
            .arg(&self.inner.origin)
            .arg("NX")
            .arg("PX")
            .arg(ms(lock_ttl.min(MAX_ANSWER_TTL)).max(1))
            .query_async(&mut conn)
            .await
            .map_err(|e| unavailable(&e))?;
        Ok(matches!(reply, Value::Okay))
    }

    async fn end_flight(&self, key: &str) -> Result<(), StoreError> {
        let mut conn = self.inner.conn.clone();
        let _: Value = self
            .inner
            .scripts
            .end_flight
            .key(self.inner.flight_key(key))
            .arg(&self.inner.origin)
            .arg(&self.inner.flights_channel)
            .arg(format!("{} {key}", self.inner.origin))
            .invoke_async(&mut conn)
            .await
            .map_err(|e| unavailable(&e))?;
        let _ = self.inner.flights.send(Arc::from(key));
        Ok(())
    }

    fn flights(&self) -> broadcast::Receiver<Arc<str>> {
        self.inner.flights.subscribe()
    }

    fn shares_answers(&self) -> bool {
        true
    }

    async fn outage_report(
        &self,
        exchange: &str,
        proxy: &str,
        failing: bool,
        rule: &OutageSettings,
    ) -> Result<OutageReport, StoreError> {
        let (transition, status) = self
            .inner
            .outage(exchange, OutageOp::Report { proxy, failing }, rule)
            .await?;
        Ok(OutageReport {
            transition,
            in_outage: status.since.is_some(),
        })
    }

    async fn outage_note_ejection(
        &self,
        exchange: &str,
        proxy: &str,
        rule: &OutageSettings,
    ) -> Result<bool, StoreError> {
        let (_, status) = self
            .inner
            .outage(exchange, OutageOp::Ejection { proxy }, rule)
            .await?;
        Ok(status.since.is_some())
    }

    async fn outages(
        &self,
        exchange: Option<&str>,
        rule: &OutageSettings,
    ) -> Result<Vec<(Arc<str>, OutageStatus)>, StoreError> {
        let inner = &self.inner;
        let ids: Vec<String> = match exchange {
            Some(x) => vec![x.to_owned()],
            None => {
                let mut conn = inner.conn.clone();
                ::redis::cmd("ZRANGE")
                    .arg(inner.outage_index_key())
                    .arg(0)
                    .arg(MAX_OUTAGE_EXCHANGES - 1)
                    .query_async(&mut conn)
                    .await
                    .map_err(|e| unavailable(&e))?
            }
        };
        let statuses = try_join_all(
            ids.iter()
                .map(|x| async move { inner.outage(x, OutageOp::Status, rule).await.map(|(_, st)| st) }),
        )
        .await?;
        let mut gone = Vec::new();
        let mut all: Vec<(Arc<str>, OutageStatus)> = Vec::new();
        for (x, st) in ids.into_iter().zip(statuses) {
            if st.reporters == 0 && st.since.is_none() {
                gone.push(x);
            } else {
                all.push((Arc::from(x), st));
            }
        }
        if exchange.is_none() && !gone.is_empty() {
            // Exchanges whose reports all aged out leave the index (best effort; a report
            // re-adds one).
            let mut conn = inner.conn.clone();
            let _: Result<(), _> = ::redis::cmd("ZREM")
                .arg(inner.outage_index_key())
                .arg(&gone)
                .query_async(&mut conn)
                .await;
        }
        all.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(all)
    }
}

impl RedisStore {
    /// Decodes a deadline reply (`{0}` or `{1, remaining_ms, reindex}`), publishes the change
    /// locally and schedules the index add.
    async fn deadline(
        &self,
        key: StateKey<'_>,
        reply: &[i64],
        kind: fn(Instant) -> ChangeKind,
        what: &str,
    ) -> Result<Option<Instant>, StoreError> {
        match reply[..] {
            [0] => Ok(None),
            [1, remaining, reindex] => {
                if reindex == 1 {
                    self.inner.reindex(key.exchange, key.proxy).await;
                }
                let until = self
                    .inner
                    .at(remaining.max(1))
                    .unwrap_or_else(|| self.inner.clock.now());
                self.inner.publish_locally(key, kind(until));
                Ok(Some(until))
            }
            _ => Err(bad_reply(what)),
        }
    }
}

/// What the pub/sub task feeds.
struct Feeds {
    changes_channel: String,
    flights_channel: String,
    origin: String,
    changes: broadcast::Sender<Change>,
    flights: broadcast::Sender<Arc<str>>,
    clock: Arc<dyn Clock>,
    subscribed: Arc<AtomicBool>,
}

impl Feeds {
    /// One pub/sub message; anything malformed is ignored (it came from outside the process).
    fn deliver(&self, channel: &str, payload: &[u8]) {
        let Ok(payload) = std::str::from_utf8(payload) else {
            return;
        };
        if channel == self.flights_channel {
            if let Some((origin, key)) = payload.split_once(' ')
                && origin != self.origin
            {
                let _ = self.flights.send(Arc::from(key));
            }
            return;
        }
        let mut parts = payload.splitn(5, ' ');
        let (Some(origin), Some(kind), Some(left), Some(exchange), Some(proxy)) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return;
        };
        if origin == self.origin {
            return; // already delivered when the operation returned
        }
        let Ok(left) = left.parse::<u64>() else {
            return;
        };
        let now = self.clock.now();
        let until = now
            .checked_add(Duration::from_millis(left).min(MAX_BAN))
            .unwrap_or(now);
        let kind = match kind {
            "b" => ChangeKind::Banned(until),
            "p" => ChangeKind::Penalised(until),
            "e" => ChangeKind::Ejected(until),
            "l" => ChangeKind::Lifted,
            _ => return,
        };
        let _ = self.changes.send(Change {
            proxy: Arc::from(proxy),
            exchange: Arc::from(exchange),
            kind,
        });
    }
}

/// Holds a pub/sub connection on the change and flight channels, reconnecting (trying each
/// client in turn) with a capped backoff; pings it so a silent partition ends it too.
async fn subscribe_loop(clients: Vec<::redis::Client>, feeds: Feeds) {
    let mut backoff = RESUBSCRIBE_MIN;
    for client in clients.iter().cycle() {
        let connected = tokio::time::timeout(RESUBSCRIBE_MAX * 2, async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub
                .subscribe(&[&feeds.changes_channel, &feeds.flights_channel])
                .await?;
            Ok::<_, ::redis::RedisError>(pubsub)
        })
        .await;
        if let Ok(Ok(pubsub)) = connected {
            backoff = RESUBSCRIBE_MIN;
            feeds.subscribed.store(true, Ordering::Relaxed);
            let (mut sink, mut stream) = pubsub.split();
            let mut ping = tokio::time::interval(PUBSUB_PING);
            ping.tick().await;
            loop {
                tokio::select! {
                    msg = stream.next() => match msg {
                        Some(msg) => feeds.deliver(msg.get_channel_name(), msg.get_payload_bytes()),
                        None => break,
                    },
                    _ = ping.tick() => {
                        let answered = tokio::time::timeout(PUBSUB_PING, sink.ping::<Value>()).await;
                        if !matches!(answered, Ok(Ok(_))) {
                            break;
                        }
                    }
                }
            }
            feeds.subscribed.store(false, Ordering::Relaxed);
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(RESUBSCRIBE_MAX);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_digest_starts_with_the_memory_stores_listing_digest() {
        for url in ["http://p:1", "socks5://u:pw@h:1080", ""] {
            let d = digest_hex(url);
            assert_eq!(d.len(), 32);
            assert_eq!(
                &d[..16],
                format!("{:016x}", crate::brokering::sticky::digest64(&[url.as_bytes()]))
            );
        }
    }

    #[test]
    fn list_bounds_cover_one_exchange_and_start_after_the_token() {
        type Row<'a> = (
            &'a str,
            Option<&'a str>,
            Option<(&'a str, u64)>,
            (&'a str, &'a str),
        );
        // (row, exchange filter, token, expected (lo, hi))
        let rows: [Row<'_>; 4] = [
            ("all", None, None, ("-", "+")),
            ("one exchange", Some("okx"), None, ("[okx,", "(okx-")),
            (
                "all after a token",
                None,
                Some(("bybit", 0xab)),
                ("(bybit,00000000000000abg", "+"),
            ),
            (
                "a token before the filter's exchange",
                Some("okx"),
                Some(("binance", 1)),
                ("[okx,", "(okx-"),
            ),
        ];
        for (row, filter, token, (lo, hi)) in rows {
            let token = token.map(|(x, d)| (x.to_owned(), d));
            assert_eq!(
                list_bounds(filter, token.as_ref()),
                (lo.to_owned(), hi.to_owned()),
                "row {row}"
            );
        }
    }
}
