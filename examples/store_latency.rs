//! The store's own cost, without the gRPC layer: a budgeted hand-out (`Store::try_attempt`) and a
//! state read on the memory store, on the Redis store and on the resilient fleet store, against a
//! `redis-server` this program starts on a free loopback port (Debian's package must be
//! installed). Prints a Markdown table.
//!
//! ```sh
//! cargo run --release --locked --example store_latency [-- CALLS]
//! ```
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/common/redis.rs"]
mod redis_server;

use std::sync::Arc;
use std::time::{Duration, Instant};

use proxy_broker::brokering::Budget;
use proxy_broker::clock::SystemClock;
use proxy_broker::store::redis::{RedisStore, Target};
use proxy_broker::store::resilient::ResilientStore;
use proxy_broker::store::{HandOut, MemoryStore, StateKey, Store};
use proxy_broker_core::ConnectionType;

const PROXIES: usize = 1_000;
const CONCURRENCY: usize = 64;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn us(d: Duration) -> String {
    format!("{:.1} µs", d.as_secs_f64() * 1e6)
}

async fn measure(name: &str, store: Arc<dyn Store>, calls: usize) {
    let proxies: Vec<String> = (0..PROXIES).map(|i| format!("http://p{i}:8080")).collect();
    let hand_out = HandOut {
        connection_type: ConnectionType::Websocket,
        budget: Some(Budget::new(1_000_000, 300)),
        lease: Duration::from_secs(60),
    };
    // Warm: every entry exists (creation also indexes it: one more round trip, once).
    for p in &proxies {
        store
            .try_attempt(
                StateKey {
                    proxy: p,
                    exchange: "binance",
                },
                hand_out,
            )
            .await
            .unwrap();
    }
    let mut attempt = Vec::with_capacity(calls);
    let mut read = Vec::with_capacity(calls);
    for i in 0..calls {
        let key = StateKey {
            proxy: &proxies[i % PROXIES],
            exchange: "binance",
        };
        let t = Instant::now();
        store.try_attempt(key, hand_out).await.unwrap();
        attempt.push(t.elapsed());
        let t = Instant::now();
        store.state(key).await.unwrap();
        read.push(t.elapsed());
    }
    attempt.sort();
    read.sort();
    // Throughput with CONCURRENCY callers at once.
    let start = Instant::now();
    let per_task = calls / CONCURRENCY;
    let tasks: Vec<_> = (0..CONCURRENCY)
        .map(|t| {
            let store = store.clone();
            let proxies = proxies.clone();
            tokio::spawn(async move {
                for i in 0..per_task {
                    let key = StateKey {
                        proxy: &proxies[(t * per_task + i) % PROXIES],
                        exchange: "binance",
                    };
                    store.try_attempt(key, hand_out).await.unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let rate = (per_task * CONCURRENCY) as f64 / start.elapsed().as_secs_f64();
    println!(
        "| {name} | {} | {} | {} | {} | {:.0} /s |",
        us(percentile(&attempt, 0.5)),
        us(percentile(&attempt, 0.99)),
        us(percentile(&read, 0.5)),
        us(percentile(&read, 0.99)),
        rate
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let calls: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(20_000);
    let server = redis_server::RedisServer::start();
    let redis = |prefix: &str| {
        let client = ::redis::Client::open(server.url()).unwrap();
        RedisStore::new(
            Target::Single(client),
            prefix,
            Duration::from_secs(1),
            Arc::new(SystemClock),
        )
        .unwrap()
    };
    println!(
        "{calls} sequential calls each, then {calls} with {CONCURRENCY} callers; {PROXIES} proxies, one exchange\n"
    );
    println!(
        "| store | try_attempt p50 | p99 | state p50 | p99 | try_attempt throughput ({CONCURRENCY} callers) |"
    );
    println!("|---|---|---|---|---|---|");
    measure(
        "memory",
        Arc::new(MemoryStore::new(100_000, Arc::new(SystemClock))),
        calls,
    )
    .await;
    measure("redis", Arc::new(redis("bench-r:")), calls).await;
    let resilient = ResilientStore::new(
        redis("bench-f:"),
        Duration::from_millis(50),
        Arc::new(SystemClock),
    );
    let status = resilient.status();
    measure("resilient(redis), 50 ms timeout", Arc::new(resilient), calls).await;
    assert!(
        status.is_up(),
        "an operation fell back to local state during the run"
    );
}
