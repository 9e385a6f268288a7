//! Hand-out marks: what an in-process broker remembers of an upstream proxy it handed out
//! without a budget, instead of a store entry.
//!
//! An unbudgeted hand-out counts nothing that a choice reads: upstream candidates are ordered
//! round-robin or by sticky key, never by live leases (only embedded pools use
//! `least_connections`, and their hand-outs stay in the store). What the hand-out must still
//! leave behind is the fact that it happened, because feedback changes the state only of proxies
//! the broker handed out for that exchange ([`super::engine::Brokering::report`]). A store entry
//! says so at ≈ 220 bytes per (exchange, proxy) with its key; a mark says so in 16 bytes: a
//! digest of (exchange, proxy) and when it expires. At 100,000 cached keys that is ≈ 2 MB of
//! marks instead of ≈ 22 MB of entries.
//!
//! - **Fleet mode** keeps them too: an unbudgeted hand-out has nothing to check fleet-wide, and
//!   was already this replica's own (the resilient store counted it locally, never on Redis).
//!   The mark is what lets this replica apply the feedback it gets about it; the ban or failure it
//!   records then goes to the shared store as any other.
//! - **Digest**: 64 bits of foldhash's quality hash with a per-process random seed
//!   ([`RandomState`]; a hand-out computes one, so it is a fast hash rather than SipHash), so
//!   nobody outside can aim a collision; one would only make a report about a proxy never handed out count as if it
//!   had been (it then gets an entry, bounded like every entry).
//! - **Expiry**: a mark lives until the hand-out's lease ends plus [`MARK_GRACE`] (reports often
//!   come late: a feed connected for hours reports the ban that ends it), refreshed by every
//!   hand-out of the same proxy for the exchange.
//! - **Bound**: at most [`MAX_MARKS`] marks, in [`SHARDS`] mutex-guarded tables. A full shard drops
//!   its expired marks, then, if still full, the half that would expire soonest (O(n) once per n/2
//!   insertions). A dropped mark only makes a later report about that proxy count as unknown.
//! - **Listing**: marks hold no URL, so `ListProxies` shows such a proxy once feedback gave it an
//!   entry (a ban, a penalty, a failure), as for a proxy handed out long ago.

use std::fmt;
use std::hash::BuildHasher;
use std::sync::Mutex;
use std::time::Duration;

use foldhash::quality::RandomState;
use hashbrown::HashTable;
use tokio::time::Instant;

use crate::sync::lock;

/// Most marks kept (≈ 16 bytes each, plus the tables' slack).
pub const MAX_MARKS: usize = 200_000;
/// How long a mark outlives the lease of its latest hand-out.
pub const MARK_GRACE: Duration = Duration::from_secs(3600);
/// Tables the marks are spread over (one mutex each).
pub const SHARDS: usize = 16;

/// A mark: the digest and when it expires, in whole seconds after [`HandOutMarks`]'s epoch.
type Mark = (u64, u32);

/// The marks of one broker. See the module docs.
pub struct HandOutMarks {
    shards: Box<[Mutex<HashTable<Mark>>]>,
    per_shard: usize,
    seed: RandomState,
    epoch: Instant,
}

impl fmt::Debug for HandOutMarks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandOutMarks")
            .field("len", &self.len())
            .field("max", &(self.per_shard * SHARDS))
            .finish_non_exhaustive()
    }
}

impl HandOutMarks {
    /// At most `max` marks (at least one per shard); times are measured from `epoch`.
    pub fn new(max: usize, epoch: Instant) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(HashTable::new())).collect(),
            per_shard: max.div_ceil(SHARDS).max(1),
            seed: RandomState::default(),
            epoch,
        }
    }

    /// Remembers that `proxy` was handed out for `exchange` with a lease ending at `lease_end`.
    pub fn mark(&self, exchange: &str, proxy: &str, lease_end: Instant, now: Instant) {
        let digest = self.digest(exchange, proxy);
        let until = self.seconds(lease_end.checked_add(MARK_GRACE).unwrap_or(lease_end));
        let mut table = self.shard(digest);
        if let Some(mark) = table.find_mut(digest, |m| m.0 == digest) {
            mark.1 = mark.1.max(until);
            return;
        }
        if table.len() >= self.per_shard {
            make_room(&mut table, self.per_shard, self.seconds(now));
        }
        table.insert_unique(digest, (digest, until), |m| m.0);
    }

    /// Whether `proxy` was handed out for `exchange` and its mark has not expired at `now`.
    pub fn contains(&self, exchange: &str, proxy: &str, now: Instant) -> bool {
        let digest = self.digest(exchange, proxy);
        let now = self.seconds(now);
        self.shard(digest)
            .find(digest, |m| m.0 == digest)
            .is_some_and(|m| m.1 > now)
    }

    /// Marks kept (expired ones included until a full shard drops them).
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| lock(s).len()).sum()
    }

    /// Whether no mark is kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn digest(&self, exchange: &str, proxy: &str) -> u64 {
        // The exchange's length first: ("ab", "c") and ("a", "bc") differ.
        self.seed.hash_one((exchange.len(), exchange, proxy))
    }

    fn shard(&self, digest: u64) -> std::sync::MutexGuard<'_, HashTable<Mark>> {
        // Middle bits pick the shard: hashbrown uses the low bits (bucket) and the top 7 (control
        // byte) inside it, so each shard's table still sees well-spread hashes.
        let i = usize::try_from((digest >> 40) & 0xff).unwrap_or(0) % SHARDS;
        lock(&self.shards[i])
    }

    /// Whole seconds from the epoch to `t`, rounded up (saturating).
    fn seconds(&self, t: Instant) -> u32 {
        let d = t.saturating_duration_since(self.epoch);
        let s = d.as_secs() + u64::from(d.subsec_nanos() > 0);
        u32::try_from(s).unwrap_or(u32::MAX)
    }
}

/// Drops the expired marks of a full table, then, if it is still full, the half that expires
/// soonest.
fn make_room(table: &mut HashTable<Mark>, max: usize, now: u32) {
    table.retain(|m| m.1 > now);
    if table.len() < max {
        return;
    }
    let mut ends: Vec<u32> = table.iter().map(|m| m.1).collect();
    let keep = ends.len() / 2;
    if keep == 0 {
        table.clear();
        return;
    }
    let at = ends.len() - keep;
    let (_, &mut cut, _) = ends.select_nth_unstable(at);
    // Everything later than the cut stays, and as many ending at it as make up `keep`.
    let later = ends.iter().filter(|&&e| e > cut).count();
    let mut ties = keep.saturating_sub(later);
    table.retain(|m| {
        if m.1 > cut {
            true
        } else if m.1 == cut && ties > 0 {
            ties -= 1;
            true
        } else {
            false
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn a_mark_says_which_proxy_was_handed_out_for_which_exchange_until_it_expires() {
        let epoch = Instant::now();
        let marks = HandOutMarks::new(1000, epoch);
        marks.mark("binance", "socks5://a:1", epoch + secs(60), epoch);
        assert!(marks.contains("binance", "socks5://a:1", epoch + secs(10)));
        assert!(!marks.contains("bybit", "socks5://a:1", epoch + secs(10)));
        assert!(!marks.contains("binance", "socks5://b:1", epoch + secs(10)));
        // Split points differ: ("binance", "x") is not ("binanc", "ex").
        assert!(!marks.contains("binanc", "esocks5://a:1", epoch + secs(10)));
        let end = epoch + secs(60) + MARK_GRACE;
        assert!(marks.contains("binance", "socks5://a:1", end - secs(1)));
        assert!(!marks.contains("binance", "socks5://a:1", end + secs(1)));
        // A later hand-out extends it; an earlier one does not shorten it.
        marks.mark("binance", "socks5://a:1", epoch + secs(600), epoch);
        marks.mark("binance", "socks5://a:1", epoch + secs(5), epoch);
        assert!(marks.contains("binance", "socks5://a:1", end + secs(500)));
        assert_eq!(marks.len(), 1);
    }

    #[test]
    fn marks_stay_within_their_bound_and_drop_the_soonest_ending_first() {
        let epoch = Instant::now();
        let marks = HandOutMarks::new(SHARDS * 100, epoch);
        for i in 0..50_000u64 {
            // Leases of 1..=50,000 s: later ones end later.
            let proxy = format!("socks5://p{i}:1080");
            marks.mark("okx", &proxy, epoch + secs(i + 1), epoch);
        }
        assert!(marks.len() <= SHARDS * 100, "{} marks", marks.len());
        assert!(marks.len() >= SHARDS * 25, "{} marks", marks.len());
        // The latest hand-out is kept; the earliest ones went first.
        assert!(marks.contains("okx", "socks5://p49999:1080", epoch));
        let early = (0..100).filter(|i| marks.contains("okx", &format!("socks5://p{i}:1080"), epoch));
        assert_eq!(early.count(), 0);
    }

    #[test]
    fn expired_marks_make_room_before_live_ones_go() {
        let epoch = Instant::now();
        let cap = SHARDS * 64;
        let marks = HandOutMarks::new(cap, epoch);
        // Enough old marks to fill every shard (the digest spreads them unevenly).
        for i in 0..(cap * 2) {
            marks.mark("okx", &format!("old{i}"), epoch + secs(1), epoch);
        }
        assert!(marks.len() <= cap);
        // Once they expired, new ones (a few per shard) push them out, not each other.
        let later = epoch + secs(1) + MARK_GRACE + secs(5);
        for i in 0..(SHARDS * 4) {
            marks.mark("okx", &format!("new{i}"), later + secs(60), later);
        }
        let live = (0..(SHARDS * 4)).filter(|i| marks.contains("okx", &format!("new{i}"), later));
        assert_eq!(live.count(), SHARDS * 4);
        assert!(marks.len() <= cap);
    }

    #[test]
    fn times_beyond_the_range_saturate() {
        let epoch = Instant::now();
        let marks = HandOutMarks::new(10, epoch);
        let far = epoch + Duration::from_secs(u64::from(u32::MAX) * 4);
        marks.mark("okx", "p", far, epoch);
        assert!(marks.contains("okx", "p", epoch + secs(1)));
        marks.mark("okx", "q", epoch, far);
        assert!(!marks.contains("okx", "q", far));
    }
}
