//! `feedback-urls`: thousands of `ReportFeedback` calls, each for a new random proxy URL
//! (20 KB, then 2,000 bytes). How much does the broker's RSS grow, and what codes come back?

use std::time::Duration;

use clap::Parser;

use super::{Ctx, progress};
use crate::broker::Broker;
use crate::config::ConfigSpec;
use crate::load::{Rpc, batch, connect};
use crate::stats::{count, mib, mib_delta};
use crate::table::Table;
use crate::upstream::{Upstream, UpstreamOptions};

/// Options of `feedback-urls`.
#[derive(Debug, Clone, Parser)]
pub struct FeedbackUrlsArgs {
    /// Reports per variant, each for a new URL.
    #[arg(long, default_value_t = 3_000)]
    pub reports: usize,
    /// Calls in flight.
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// URL lengths, bytes, one variant each.
    #[arg(long, value_delimiter = ',', default_values_t = [20_000usize, 2_000])]
    pub url_bytes: Vec<usize>,
}

/// `socks5://<random host>.test:1080`, exactly `len` bytes (at least the fixed parts).
pub fn random_proxy_url(len: usize, rng: &mut impl rand::Rng) -> String {
    const HEAD: &str = "socks5://";
    const TAIL: &str = ".test:1080";
    let host_len = len.saturating_sub(HEAD.len() + TAIL.len()).max(1);
    let host: String = (0..host_len)
        .map(|_| char::from(rng.sample(rand::distr::Alphanumeric)).to_ascii_lowercase())
        .collect();
    format!("{HEAD}{host}{TAIL}")
}

/// Runs the scenario.
pub async fn run(ctx: &Ctx, a: &FeedbackUrlsArgs) -> anyhow::Result<Vec<Table>> {
    let mut table = Table::new(
        format!(
            "feedback-urls: {} failure reports, each for a new random proxy URL",
            count(a.reports as u64)
        ),
        &[
            "URL length",
            "codes",
            "forwarded upstream",
            "VmRSS before",
            "VmRSS after",
            "growth",
            "VmHWM (peak)",
        ],
    );
    for &len in &a.url_bytes {
        progress(&format!(
            "feedback-urls: {} reports with {len}-byte URLs",
            a.reports
        ));
        let upstream = Upstream::start(UpstreamOptions::default()).await?;
        let broker = Broker::start(
            &ctx.broker,
            &ConfigSpec::delegation(vec![upstream.url.clone()]),
            None,
        )
        .await?;
        let channels = connect(broker.addr, 4).await?;
        let before = broker.memory()?;
        let rpcs: Vec<Rpc> = {
            let mut rng = rand::rng();
            (0..a.reports)
                .map(|_| Rpc::feedback(random_proxy_url(len, &mut rng), "binance", false))
                .collect()
        };
        let recorder = batch(&channels, rpcs, a.concurrency, Duration::from_secs(10)).await;
        // Measure once forwarding is done, so the queue's own contents are not counted as growth.
        let drained = broker.wait_feedback_drained(Duration::from_secs(60)).await;
        let after = broker.memory()?;
        broker.stop().await;
        table.row([
            format!("{} bytes", count(len as u64)),
            recorder.codes_text(),
            format!(
                "{}{}",
                count(upstream.counters.feedback()),
                if drained {
                    ""
                } else {
                    " (queue not drained in 60 s)"
                }
            ),
            mib(before.rss_kib),
            mib(after.rss_kib),
            mib_delta(before.rss_kib, after.rss_kib),
            mib(after.hwm_kib),
        ]);
    }
    table
        .note(format!(
            "delegation on (a fast loopback upstream takes the forwarded feedback); success false, {} in flight; \
             one fresh broker per row; \"after\" is read once ListUpstreams shows an empty feedback queue",
            a.concurrency
        ))
        .note(
            "goal (issue 8 item 5): 20 KB URLs are rejected (INVALID_ARGUMENT, over 2,048 bytes) and 3,000 reports \
             grow RSS < 16 MiB",
        );
    Ok(vec![table])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_urls_have_the_asked_length_are_valid_and_distinct() {
        let mut rng = rand::rng();
        for len in [30, 2_000, 2_048, 20_000] {
            let a = random_proxy_url(len, &mut rng);
            let b = random_proxy_url(len, &mut rng);
            assert_eq!(a.len(), len);
            assert_ne!(a, b);
            // Valid in every other respect; past 2,048 bytes the broker refuses them by length.
            let checked = proxy_broker_core::validate::check_proxy_url(&a);
            if len <= proxy_broker_core::validate::MAX_PROXY_URL_LEN {
                checked.unwrap_or_else(|e| panic!("{len}: {e}"));
            } else {
                assert!(checked.unwrap_err().contains("at most 2048"), "{len}");
            }
        }
    }
}
