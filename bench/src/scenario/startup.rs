//! `startup-1000`: process spawn to the first SERVING health answer, with a generated embedded
//! configuration of 1,000 exchanges (an http and a websocket pool each) against a 1-exchange one.

use std::time::Duration;

use anyhow::ensure;
use clap::Parser;
use proxy_broker_client::pb::ProxySource;

use super::{Ctx, progress};
use crate::broker::Broker;
use crate::config::{ConfigSpec, exchange_id};
use crate::load::{Rpc, Stub};
use crate::stats::{count, mib, ms};
use crate::table::Table;

/// Options of `startup-1000`.
#[derive(Debug, Clone, Parser)]
pub struct StartupArgs {
    /// Exchanges in the large configuration.
    #[arg(long, default_value_t = 1_000)]
    pub exchanges: usize,
    /// Members of each pool.
    #[arg(long, default_value_t = 3)]
    pub pool_size: usize,
    /// Starts of each configuration (alternating).
    #[arg(long, default_value_t = 5)]
    pub starts: usize,
}

struct Sample {
    started_in: Duration,
    rss_kib: u64,
}

/// Runs the scenario.
pub async fn run(ctx: &Ctx, a: &StartupArgs) -> anyhow::Result<Vec<Table>> {
    let mut small = ConfigSpec::embedded(1);
    small.pool_size = a.pool_size;
    let mut large = ConfigSpec::embedded(a.exchanges);
    large.pool_size = a.pool_size;
    let (mut small_samples, mut large_samples) = (Vec::new(), Vec::new());
    let last = exchange_id("ex", a.exchanges.saturating_sub(1));
    for i in 0..a.starts.max(1) {
        progress(&format!("startup-1000: start {} of {}", i + 1, a.starts.max(1)));
        for (spec, samples, probe) in [
            (&small, &mut small_samples, exchange_id("ex", 0)),
            (&large, &mut large_samples, last.clone()),
        ] {
            let broker = Broker::start(&ctx.broker, spec, None).await?;
            let rss_kib = broker.memory()?.rss_kib;
            // The configuration really is served: the last exchange answers from its pool.
            let answer = Stub::new(broker.channel.clone())
                .call(&Rpc::request_proxy(probe.clone()), Duration::from_secs(5))
                .await?;
            ensure!(
                answer.source == Some(ProxySource::Embedded),
                "{probe} was answered from {:?}, not the embedded configuration",
                answer.source
            );
            samples.push(Sample {
                started_in: broker.started_in,
                rss_kib,
            });
            broker.stop().await;
        }
    }
    let mut table = Table::new(
        format!(
            "startup-1000: spawn to first SERVING health check, {} starts each",
            a.starts.max(1)
        ),
        &[
            "configuration",
            "min",
            "median",
            "max",
            "VmRSS after start (median)",
        ],
    );
    let mut medians = Vec::new();
    for (name, samples) in [
        ("1 exchange".to_owned(), &mut small_samples),
        (
            format!(
                "{} exchanges × 2 pools × {} members",
                count(a.exchanges as u64),
                a.pool_size
            ),
            &mut large_samples,
        ),
    ] {
        samples.sort_by_key(|s| s.started_in);
        let median = samples[samples.len() / 2].started_in;
        let mut rss: Vec<u64> = samples.iter().map(|s| s.rss_kib).collect();
        rss.sort_unstable();
        medians.push(median);
        table.row([
            name,
            ms(samples[0].started_in),
            ms(median),
            ms(samples[samples.len() - 1].started_in),
            mib(rss[rss.len() / 2]),
        ]);
    }
    if let [small_median, large_median] = medians[..] {
        table.note(format!(
            "large / small median: {:.2}; starts alternate between the two configurations; health polled every 2 ms",
            large_median.as_secs_f64() / small_median.as_secs_f64().max(1e-9)
        ));
    }
    Ok(vec![table])
}
