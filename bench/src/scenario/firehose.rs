//! `firehose`: 50k `ReportFeedback`/s for 10 s with a slow upstream feedback endpoint, while a
//! side loop measures cache-hit `RequestProxy` latency; compared with the same side loop alone.
//! The firehose runs on its own thread (own single-threaded runtime) so it does not delay the
//! side loop's own measurements.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use tokio::sync::Semaphore;
use tokio::time::MissedTickBehavior;

use super::{Ctx, progress};
use crate::broker::{Broker, cpu_ticks_of, metric_sum};
use crate::config::ConfigSpec;
use crate::load::{Recorder, Rpc, Stub, closed_loop, connect};
use crate::stats::{count, mib, ms, summarize};
use crate::table::Table;
use crate::upstream::{Upstream, UpstreamOptions};

/// The broker's default `proxy.external_service.feedback_queue_size`.
const DEFAULT_QUEUE_SIZE: u64 = 10_000;

/// Options of `firehose`.
#[derive(Debug, Clone, Parser)]
pub struct FirehoseArgs {
    /// Target ReportFeedback calls per second.
    #[arg(long, default_value_t = 50_000)]
    pub rate: u64,
    /// Firehose (and each side-loop run) length.
    #[arg(long, default_value_t = 10.0)]
    pub seconds: f64,
    /// Upper bound of firehose calls.
    #[arg(long, default_value_t = 500_000)]
    pub max_calls: u64,
    /// Upstream feedback endpoint latency.
    #[arg(long, default_value_t = 200)]
    pub feedback_delay_ms: u64,
    /// Firehose HTTP/2 connections.
    #[arg(long, default_value_t = 8)]
    pub connections: usize,
    /// Firehose calls in flight at most (beyond it a due call is counted as not sent).
    #[arg(long, default_value_t = 8192)]
    pub max_in_flight: usize,
    /// Side-loop RequestProxy calls in flight.
    #[arg(long, default_value_t = 4)]
    pub side_streams: usize,
    /// Send the reports on `ReportFeedbackStream` calls (one per connection) instead of one
    /// `ReportFeedback` call each.
    #[arg(long)]
    pub stream: bool,
    /// Control run: send `grpc.health.v1.Health/Check` at the same rate instead of
    /// `ReportFeedback` (the same number of unary calls, none of the feedback path), to tell the
    /// cost of the calls themselves from the cost of the feedback they carry.
    #[arg(long, conflicts_with = "stream")]
    pub health: bool,
}

struct Fire {
    /// Reports sent (calls started, or messages put on a stream).
    sent: u64,
    /// Reports the broker took (stream mode: the sum of the streams' `accepted`).
    accepted: Option<u64>,
    not_sent: u64,
    /// Sending window (calls were started during it).
    window: Duration,
    /// Until the last call in flight ended.
    wall: Duration,
    /// CPU seconds of the firehose thread.
    cpu_seconds: f64,
    recorder: Recorder,
}

/// Runs the scenario.
pub async fn run(ctx: &Ctx, a: &FirehoseArgs) -> anyhow::Result<Vec<Table>> {
    let upstream = Upstream::start(UpstreamOptions {
        feedback_delay: Duration::from_millis(a.feedback_delay_ms),
        ..UpstreamOptions::default()
    })
    .await?;
    let broker = Broker::start(
        &ctx.broker,
        &ConfigSpec::delegation(vec![upstream.url.clone()]),
        None,
    )
    .await?;
    let side = connect(broker.addr, 1).await?;
    // An exchange without a connection-attempt budget (binance's built-in 300 per 5 minutes would
    // turn the side loop into RESOURCE_EXHAUSTED answers after 300 calls, as in hit-vs-health).
    let hit = Rpc::request_proxy("kucoin");
    let timeout = Duration::from_secs(5);
    let mut stub = Stub::new(side[0].clone());
    stub.call(&hit, timeout).await?;
    // The URL the upstream hands out for kucoin: feedback is about a proxy the broker gave out.
    let proxy_url = "socks5://kucoin.proxy.test:1080".to_owned();
    let duration = Duration::from_secs_f64(a.seconds.clamp(1.0, 120.0));
    let side_max = 10_000_000;

    progress(&format!(
        "firehose: baseline, side loop alone for {:.0} s",
        duration.as_secs_f64()
    ));
    let mut baseline = closed_loop(&side, a.side_streams, &hit, duration, side_max, timeout).await;
    anyhow::ensure!(
        baseline.errors() == 0,
        "the side loop alone got {} errors ({}): its latency would not be a cache hit's",
        baseline.errors(),
        baseline.errors_text()
    );

    progress(&format!(
        "firehose: {} {}/s for {:.0} s",
        a.rate,
        if a.health {
            "Health/Check"
        } else {
            "ReportFeedback"
        },
        duration.as_secs_f64()
    ));
    let broker_ticks = broker.cpu_ticks()?;
    let fire_started = Instant::now();
    let fire = {
        let (addr, a, proxy_url, ticks) = (broker.addr, a.clone(), proxy_url.clone(), ctx.clock_ticks);
        std::thread::spawn(move || -> anyhow::Result<Fire> {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(async {
                    if a.stream {
                        streamed(addr, &a, duration, proxy_url, ticks).await
                    } else {
                        firehose(addr, &a, duration, proxy_url, ticks).await
                    }
                })
        })
    };
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        let broker = &broker;
        async move {
            let mut peak = 0u64;
            // Bounded: at most one sample per 250 ms for the firehose's length plus its drain.
            for _ in 0..((duration.as_secs() + 30) * 4) {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                if let Ok(stats) = broker.feedback_stats().await {
                    peak = peak.max(stats.queued);
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            peak
        }
    };
    let side_loop = async {
        let recorder = closed_loop(&side, a.side_streams, &hit, duration, side_max, timeout).await;
        stop.store(true, Ordering::Relaxed);
        recorder
    };
    let (mut loaded, peak_queued) = tokio::join!(side_loop, sampler);
    let fire = tokio::task::spawn_blocking(move || fire.join())
        .await?
        .map_err(|_| anyhow::anyhow!("the firehose thread panicked"))??;
    let broker_busy = (broker.cpu_ticks()? - broker_ticks) as f64
        / ctx.clock_ticks as f64
        / fire_started.elapsed().as_secs_f64();
    let metrics = broker.metrics().await.unwrap_or_default();
    let stats = broker.feedback_stats().await.unwrap_or_default();
    let memory = broker.memory()?;
    broker.stop().await;

    let b = summarize(&mut baseline.micros);
    let l = summarize(&mut loaded.micros);
    let how = if a.stream {
        "feedback reports/s on ReportFeedbackStream"
    } else if a.health {
        "Health/Check/s (control: no feedback)"
    } else {
        "ReportFeedback/s"
    };
    let mut latency = Table::new(
        format!(
            "firehose: cache-hit RequestProxy latency, alone vs during {} {how} (upstream feedback {} ms)",
            count(a.rate),
            a.feedback_delay_ms
        ),
        &["side loop", "calls", "errors", "p50", "p99", "max"],
    );
    for (name, r, s) in [
        ("alone (baseline)", &baseline, b),
        ("during the firehose", &loaded, l),
    ] {
        latency.row([
            name.to_owned(),
            count(r.calls()),
            r.errors_text(),
            ms(s.p50),
            ms(s.p99),
            ms(s.max),
        ]);
    }
    let ratio = |x: Duration, y: Duration| format!("{:.2}", x.as_secs_f64() / y.as_secs_f64().max(1e-9));
    latency.row([
        "during / alone".to_owned(),
        String::new(),
        String::new(),
        ratio(l.p50, b.p50),
        ratio(l.p99, b.p99),
        ratio(l.max, b.max),
    ]);
    latency
        .note(format!(
            "side loop: {} cache-hit calls in flight on one connection, {:.0} s each run; the firehose runs on a second \
             thread with {} connections, at most {} calls in flight",
            a.side_streams,
            duration.as_secs_f64(),
            a.connections,
            count(a.max_in_flight as u64)
        ))
        .note("goal (issue 8 item 9): p99 during the firehose within 20 % of the baseline (ratio ≤ 1.20)");

    let mut feed = Table::new(
        "firehose: the feedback path",
        &[
            "target rate",
            "started",
            "started/s",
            "completed/s",
            "codes",
            "call p50 / p99",
            "due but not sent",
            "queue peak (sampled)",
            "queue bound",
            "dropped",
            "forwarded",
            "upstream received",
            "broker VmHWM",
        ],
    );
    let dropped = metric_sum(&metrics, "proxy_broker_feedback_dropped_total");
    let mut fire = fire;
    let f = summarize(&mut fire.recorder.micros);
    feed.row([
        format!("{}/s", count(a.rate)),
        count(fire.sent),
        format!(
            "{}/s",
            count((fire.sent as f64 / fire.window.as_secs_f64()).round() as u64)
        ),
        format!(
            "{}/s",
            count(
                (fire.accepted.unwrap_or(fire.recorder.calls()) as f64 / fire.wall.as_secs_f64()).round()
                    as u64
            )
        ),
        match fire.accepted {
            Some(n) => format!(
                "{} streams: {}; {} reports taken",
                a.connections,
                fire.recorder.codes_text(),
                count(n)
            ),
            None => fire.recorder.codes_text(),
        },
        if fire.accepted.is_some() {
            "(one call per stream)".to_owned()
        } else {
            format!("{} / {}", ms(f.p50), ms(f.p99))
        },
        count(fire.not_sent),
        count(peak_queued),
        format!("{} (feedback_queue_size default)", count(DEFAULT_QUEUE_SIZE)),
        dropped.map_or_else(
            || format!("{} (ListUpstreams)", count(stats.dropped)),
            |d| count(d as u64),
        ),
        count(stats.forwarded),
        count(upstream.counters.feedback()),
        mib(memory.hwm_kib),
    ]);
    let feedback_metrics: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("proxy_broker_feedback"))
        .collect();
    feed.note(format!(
        "CPU: firehose thread {:.0} % of a core over its run, broker {:.0} % of one core (of {} cores) from the \
         firehose's start to its end; \"due but not sent\": calls due at the target rate while {} were already in \
         flight (stream mode: reports due while their stream's 1,024-report send buffer was full, i.e. the \
         broker's flow control held the sender back); completed/s counts until the last call in flight ended",
        fire.cpu_seconds / fire.wall.as_secs_f64() * 100.0,
        broker_busy * 100.0,
        crate::machine::nproc(),
        count(a.max_in_flight as u64)
    ));
    feed.note(format!(
        "dropped is proxy_broker_feedback_dropped_total from /metrics; queue peak samples ListUpstreams.feedback.queued \
         every 250 ms; /metrics feedback series at the end: {}",
        if feedback_metrics.is_empty() { "none".into() } else { format!("`{}`", feedback_metrics.join("`, `")) }
    ));
    Ok(vec![latency, feed])
}

/// Sends ReportFeedback at `a.rate` per second (open loop) for `duration`, `a.max_calls` at most.
async fn firehose(
    addr: std::net::SocketAddr,
    a: &FirehoseArgs,
    duration: Duration,
    proxy_url: String,
    clock_ticks: u64,
) -> anyhow::Result<Fire> {
    let thread_ticks = cpu_ticks_of("/proc/thread-self/stat")?;
    let channels = connect(addr, a.connections).await?;
    let rpc = if a.health {
        Rpc::HealthCheck
    } else {
        Rpc::feedback(proxy_url, "kucoin", true)
    };
    let permits = Arc::new(Semaphore::new(a.max_in_flight.clamp(1, Semaphore::MAX_PERMITS)));
    let recorder = Arc::new(Mutex::new(Recorder::default()));
    let started = Instant::now();
    let (sent, not_sent) = paced(a, duration, |sent| {
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            return false;
        };
        let mut stub = Stub::new(channels[(sent as usize) % channels.len()].clone());
        let (rpc, recorder) = (rpc.clone(), recorder.clone());
        tokio::spawn(async move {
            let t = Instant::now();
            let result = stub.call(&rpc, Duration::from_secs(5)).await;
            if let Ok(mut r) = recorder.lock() {
                r.record(t.elapsed(), &result);
            }
            drop(permit);
        });
        true
    })
    .await;
    let window = started.elapsed();
    // Wait (bounded by the calls' own 5 s deadline) for every call in flight.
    let all = u32::try_from(a.max_in_flight.clamp(1, Semaphore::MAX_PERMITS)).unwrap_or(u32::MAX);
    let _ = tokio::time::timeout(Duration::from_secs(10), permits.acquire_many(all)).await;
    let wall = started.elapsed();
    let cpu_seconds = (cpu_ticks_of("/proc/thread-self/stat")? - thread_ticks) as f64 / clock_ticks as f64;
    let recorder = recorder.lock().map(|r| r.clone()).unwrap_or_default();
    Ok(Fire {
        sent,
        accepted: None,
        not_sent,
        window,
        wall,
        cpu_seconds,
        recorder,
    })
}

/// As [`firehose`], but the reports go on `a.connections` `ReportFeedbackStream` calls (one per
/// connection), each fed through a buffer of 1,024 reports; a report due while its stream's
/// buffer is full is counted as not sent.
async fn streamed(
    addr: std::net::SocketAddr,
    a: &FirehoseArgs,
    duration: Duration,
    proxy_url: String,
    clock_ticks: u64,
) -> anyhow::Result<Fire> {
    use proxy_broker_client::pb::proxy_broker_client::ProxyBrokerClient;
    let thread_ticks = cpu_ticks_of("/proc/thread-self/stat")?;
    let channels = connect(addr, a.connections).await?;
    let Rpc::ReportFeedback(report) = Rpc::feedback(proxy_url, "kucoin", true) else {
        anyhow::bail!("Rpc::feedback is not a ReportFeedback");
    };
    let mut senders = Vec::new();
    let mut calls = Vec::new();
    for channel in &channels {
        let (tx, rx) = tokio::sync::mpsc::channel(1024);
        let mut client = ProxyBrokerClient::new(channel.clone());
        senders.push(tx);
        calls.push(tokio::spawn(async move {
            let t = Instant::now();
            let result = client
                .report_feedback_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
                .map(|r| r.into_inner().accepted);
            (t.elapsed(), result)
        }));
    }
    let started = Instant::now();
    let mut next = 0usize;
    let (sent, not_sent) = paced(a, duration, |_| {
        next = (next + 1) % senders.len();
        senders[next].try_send(report.clone()).is_ok()
    })
    .await;
    let window = started.elapsed();
    drop(senders);
    let mut recorder = Recorder::default();
    let mut accepted = 0u64;
    for call in calls {
        // Bounded: each stream ends once its buffer drains (the broker takes reports as they come).
        match tokio::time::timeout(Duration::from_secs(30), call).await {
            Ok(Ok((elapsed, result))) => {
                if let Ok(n) = &result {
                    accepted += n;
                }
                recorder.record(elapsed, &result.map(|_| crate::load::Answer::default()));
            }
            _ => recorder.record(
                Duration::from_secs(30),
                &Err(tonic::Status::deadline_exceeded(
                    "the stream did not end within 30 s",
                )),
            ),
        }
    }
    let wall = started.elapsed();
    let cpu_seconds = (cpu_ticks_of("/proc/thread-self/stat")? - thread_ticks) as f64 / clock_ticks as f64;
    Ok(Fire {
        sent,
        accepted: Some(accepted),
        not_sent,
        window,
        wall,
        cpu_seconds,
        recorder,
    })
}

/// Calls `send(sent so far)` at `a.rate` per second (open loop, in 1 ms ticks) for `duration`,
/// `a.max_calls` times at most; `send` says whether it sent. Returns (sent, due but not sent).
async fn paced(a: &FirehoseArgs, duration: Duration, mut send: impl FnMut(u64) -> bool) -> (u64, u64) {
    let (mut sent, mut not_sent) = (0u64, 0u64);
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let started = Instant::now();
    while started.elapsed() < duration && sent + not_sent < a.max_calls {
        tick.tick().await;
        let due = ((a.rate as f64 * started.elapsed().as_secs_f64()) as u64).min(a.max_calls);
        while sent + not_sent < due {
            if send(sent) {
                sent += 1;
            } else {
                not_sent += 1;
            }
        }
    }
    (sent, not_sent)
}
