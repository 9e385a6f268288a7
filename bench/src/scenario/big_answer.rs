//! `big-answer`: the upstream answers 50 MB (valid JSON padded in `metadata`, or not JSON), or
//! trickles its body slowly. What is the broker's peak RSS, and what do callers get?

use std::time::Duration;

use clap::Parser;

use super::{Ctx, progress};
use crate::broker::Broker;
use crate::config::{ConfigSpec, exchange_id};
use crate::load::{Rpc, batch, connect};
use crate::stats::{count, mib, ms, summarize};
use crate::table::Table;
use crate::upstream::{Answer, Upstream, UpstreamOptions};

/// Options of `big-answer`.
#[derive(Debug, Clone, Parser)]
pub struct BigAnswerArgs {
    /// Size of the upstream's answer, MB (10^6 bytes).
    #[arg(long, default_value_t = 50)]
    pub answer_mb: usize,
    /// Sequential RequestProxy calls per variant, each for a new key.
    #[arg(long, default_value_t = 3)]
    pub calls: usize,
}

/// Runs the scenario.
pub async fn run(ctx: &Ctx, a: &BigAnswerArgs) -> anyhow::Result<Vec<Table>> {
    let bytes = a.answer_mb.max(1) * 1_000_000;
    let variants = [
        (
            format!("{} MB valid JSON (huge metadata)", a.answer_mb),
            Answer::Huge { bytes, json: true },
            None,
        ),
        (
            format!("{} MB not JSON", a.answer_mb),
            Answer::Huge { bytes, json: false },
            None,
        ),
        (
            format!(
                "slow body: 1 KiB every 10 ms (up to {} MB), timeout_seconds 1",
                a.answer_mb
            ),
            Answer::Trickle {
                chunk: 1024,
                every: Duration::from_millis(10),
                total: bytes,
            },
            Some(1),
        ),
    ];
    let mut table = Table::new(
        "big-answer: oversized and slow upstream answers",
        &[
            "upstream answer",
            "calls",
            "codes",
            "answers by source",
            "max latency",
            "VmRSS before",
            "VmHWM (peak) after",
            "VmRSS after",
        ],
    );
    for (name, answer, timeout_seconds) in variants {
        progress(&format!("big-answer: {name}"));
        let upstream = Upstream::start(UpstreamOptions {
            answer,
            ..UpstreamOptions::default()
        })
        .await?;
        let mut spec = ConfigSpec::delegation(vec![upstream.url.clone()]);
        // A fallback answer is visible as EMBEDDED.
        spec.embedded_default = Some("socks5://fallback.embedded.test:1080".into());
        spec.fallback_to_embedded = Some(true);
        spec.timeout_seconds = timeout_seconds;
        let broker = Broker::start(&ctx.broker, &spec, None).await?;
        let channels = connect(broker.addr, 1).await?;
        let before = broker.memory()?;
        let rpcs = (0..a.calls)
            .map(|i| Rpc::request_proxy(exchange_id("big", i)))
            .collect();
        // Default client limits (4 MiB decoded message), as a feed would have.
        let mut recorder = batch(&channels, rpcs, 1, Duration::from_secs(30)).await;
        let after = broker.memory()?;
        broker.stop().await;
        let s = summarize(&mut recorder.micros);
        table.row([
            name,
            count(recorder.calls()),
            recorder.codes_text(),
            recorder.sources_text(),
            ms(s.max),
            mib(before.rss_kib),
            mib(after.hwm_kib),
            mib(after.rss_kib),
        ]);
    }
    table
        .note(
            "one fresh broker per row (VmHWM is per process); fallback_to_embedded true with an embedded default, \
             so a rejected answer shows as EMBEDDED; calls are sequential, each for a new key",
        )
        .note("goal (issue 8 item 5): a 50 MB upstream answer keeps peak RSS < 48 MiB (64 KiB body limit)");
    Ok(vec![table])
}
