//! The scenarios of issue 8 item 9, one module each. Each returns its tables; `all` runs them in
//! turn with their defaults.

mod big_answer;
mod feedback_urls;
mod firehose;
mod fleet;
mod fleet_redis;
mod hedge;
mod hit_cost;
mod hit_vs_health;
mod memory;
mod startup;
mod storm;
mod storm_spread;
mod watchers;

use clap::{Parser, Subcommand};

use crate::broker::BrokerCommand;
use crate::table::Table;

pub use big_answer::BigAnswerArgs;
pub use feedback_urls::FeedbackUrlsArgs;
pub use firehose::FirehoseArgs;
pub use fleet::FleetArgs;
pub use hedge::HedgeArgs;
pub use hit_cost::HitCostArgs;
pub use hit_vs_health::HitVsHealthArgs;
pub use memory::MemoryArgs;
pub use startup::StartupArgs;
pub use storm::StormArgs;
pub use storm_spread::StormSpreadArgs;
pub use watchers::WatchersArgs;

/// What every scenario shares.
#[derive(Debug)]
pub struct Ctx {
    /// How to start the broker.
    pub broker: BrokerCommand,
    /// Clock ticks per second of `/proc/<pid>/stat` CPU times.
    pub clock_ticks: u64,
}

/// The scenario to run.
#[derive(Debug, Subcommand)]
pub enum Scenario {
    /// Cache-hit RequestProxy vs the same server's Health/Check, pinned cores, alternating rounds.
    HitVsHealth(HitVsHealthArgs),
    /// Instructions the broker executes per cache hit and per Health/Check, counted by callgrind
    /// (valgrind): the cost ratio without the machine's noise. Not part of `all`.
    HitCost(HitCostArgs),
    /// N concurrent RequestProxy over K cold keys, then the same storm warm.
    Storm(StormArgs),
    /// N concurrent binance/websocket RequestProxy against an upstream rotating over P proxies:
    /// how the per-proxy connection-attempt budget spreads them.
    StormSpread(StormSpreadArgs),
    /// First endpoint black-holed, second healthy: sequential misses.
    Hedge(HedgeArgs),
    /// RSS before and after filling 100,000 cached keys.
    #[command(name = "memory-100k")]
    Memory100k(MemoryArgs),
    /// Upstream answers of 50 MB (JSON, not JSON, trickled): peak RSS and what callers get.
    BigAnswer(BigAnswerArgs),
    /// ReportFeedback with thousands of distinct long proxy URLs: RSS growth and codes.
    FeedbackUrls(FeedbackUrlsArgs),
    /// Start-up time with a 1,000-exchange embedded configuration.
    #[command(name = "startup-1000")]
    Startup1000(StartupArgs),
    /// 50k ReportFeedback/s with a slow upstream while RequestProxy p99 is measured.
    Firehose(FirehoseArgs),
    /// RSS of 10,000 idle WatchProxy streams (bytes per idle watcher).
    Watchers(WatchersArgs),
    /// Fleet mode (issue 10): replicas sharing a real redis-server against memory replicas — the storm
    /// split over them, cache-hit throughput, a budgeted hand-out's added latency, Redis round-trips
    /// per request.
    Fleet(FleetArgs),
    /// Every scenario with its defaults.
    All,
}

/// Runs `scenario`, printing each table as soon as it is ready; false if any scenario failed.
pub async fn run(ctx: &Ctx, scenario: &Scenario) -> bool {
    let mut ok = true;
    let mut report = |name: &str, result: anyhow::Result<Vec<Table>>| match result {
        Ok(tables) => {
            for table in tables {
                println!("{table}");
            }
        }
        Err(e) => {
            ok = false;
            println!("### {name}\n\nFAILED: {e:#}\n");
        }
    };
    match scenario {
        Scenario::HitVsHealth(a) => report("hit-vs-health", hit_vs_health::run(ctx, a).await),
        Scenario::HitCost(a) => report("hit-cost", hit_cost::run(ctx, a).await),
        Scenario::Storm(a) => report("storm", storm::run(ctx, a).await),
        Scenario::StormSpread(a) => report("storm-spread", storm_spread::run(ctx, a).await),
        Scenario::Hedge(a) => report("hedge", hedge::run(ctx, a).await),
        Scenario::Memory100k(a) => report("memory-100k", memory::run(ctx, a).await),
        Scenario::BigAnswer(a) => report("big-answer", big_answer::run(ctx, a).await),
        Scenario::FeedbackUrls(a) => report("feedback-urls", feedback_urls::run(ctx, a).await),
        Scenario::Startup1000(a) => report("startup-1000", startup::run(ctx, a).await),
        Scenario::Firehose(a) => report("firehose", firehose::run(ctx, a).await),
        Scenario::Watchers(a) => report("watchers", watchers::run(ctx, a).await),
        Scenario::Fleet(a) => report("fleet", fleet::run(ctx, a).await),
        Scenario::All => {
            report("hit-vs-health", hit_vs_health::run(ctx, &defaults()).await);
            report("storm", storm::run(ctx, &defaults()).await);
            report("storm-spread", storm_spread::run(ctx, &defaults()).await);
            report("hedge", hedge::run(ctx, &defaults()).await);
            report("memory-100k", memory::run(ctx, &defaults()).await);
            report("big-answer", big_answer::run(ctx, &defaults()).await);
            report("feedback-urls", feedback_urls::run(ctx, &defaults()).await);
            report("startup-1000", startup::run(ctx, &defaults()).await);
            report("firehose", firehose::run(ctx, &defaults()).await);
            report("watchers", watchers::run(ctx, &defaults()).await);
            report("fleet", fleet::run(ctx, &defaults()).await);
        }
    }
    ok
}

/// A scenario's arguments with every default, as if given no options.
fn defaults<T: Parser>() -> T {
    T::parse_from(["proxy-broker-bench"])
}

/// Progress on stderr (the tables go to stdout).
fn progress(message: &str) {
    eprintln!("[bench] {message}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_scenario_has_parseable_defaults() {
        let storm: StormArgs = defaults();
        assert_eq!((storm.calls, storm.keys), (10_000, 100));
        let hit: HitVsHealthArgs = defaults();
        assert_eq!((hit.connections, hit.streams), (8, 32));
        let _: HedgeArgs = defaults();
        let cost: HitCostArgs = defaults();
        assert_eq!((cost.connections, cost.streams), (8, 32));
        let _: MemoryArgs = defaults();
        let _: BigAnswerArgs = defaults();
        let _: FeedbackUrlsArgs = defaults();
        let _: StartupArgs = defaults();
        let _: FirehoseArgs = defaults();
        let w: WatchersArgs = defaults();
        assert_eq!((w.watchers, w.connections), (10_000, 50));
        let f: FleetArgs = defaults();
        assert_eq!((f.replicas, f.calls, f.keys), (2, 10_000, 100));
    }
}
