//! The choice among candidates.
//!
//! The store's snapshot of each candidate decides its tier — banned or ejected for the exchange,
//! or without budget headroom: not eligible; penalised: eligible only when `allow_penalised` (the
//! caller allows it once nothing unpenalised can be had); otherwise eligible. The eligible ones are
//! ordered by the sticky key (rendezvous hashing, [`super::sticky`]) or the pool strategy
//! (`round_robin` from a rotating cursor, `random` by weight, `least_connections` by live leases),
//! and tried in that order with [`Store::try_attempt`] — one atomic check-and-count — until one is
//! admitted. A candidate whose window filled since the snapshot (another task, or another broker,
//! got there first) is skipped, so the budget holds however many tasks choose at once. An
//! unbudgeted upstream choice skips the store's count and leaves a mark instead ([`super::marks`]).

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use proxy_broker_core::redact::redact_url;
use proxy_broker_core::{ConnectionType, Strategy};
use rand::Rng;
use smallvec::SmallVec;
use tokio::time::Instant;

use super::candidates::{Candidate, MAX_CANDIDATE_TTL};
use super::lease::{lease_end, random_lease};
use super::marks::HandOutMarks;
use super::settings::Budget;
use super::sticky;
use crate::store::{Attempt, HandOut, ProxyState, Standing, StateKey, Store, StoreError};

/// Per-member scratch of one choice, on the stack up to 8 members (most sets hold one to three):
/// a cache hit allocates none of it.
type PerMember<T> = SmallVec<[T; 8]>;

/// How the eligible candidates are ordered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order<'a> {
    /// A plain `url` entry (one candidate).
    Static,
    /// A pool strategy (upstream sets use `round_robin`).
    Strategy(Strategy),
    /// Rendezvous hashing on this key.
    Sticky(&'a str),
}

/// What [`choose`] needs.
#[derive(Debug)]
pub struct Choose<'a, P> {
    /// The exchange, lower-case.
    pub exchange: &'a str,
    /// The connection type the attempt counts under.
    pub connection_type: ConnectionType,
    /// The candidates.
    pub members: &'a [Candidate<P>],
    /// How to order the eligible ones.
    pub order: Order<'a>,
    /// The round-robin cursor of this set.
    pub cursor: &'a AtomicUsize,
    /// The budget in force (`None`: unlimited).
    pub budget: Option<Budget>,
    /// Lease TTL for candidates without an expiry (embedded ones).
    pub ttl: Duration,
    /// Lease jitter, a fraction 0..=1.
    pub jitter: f64,
    /// Whether penalised candidates may be picked.
    pub allow_penalised: bool,
    /// Most of the set (percent) that may count as ejected at once
    /// (`external_service.max_ejection_percent`); ejections beyond it, soonest-ending first, are
    /// ignored, so a set never empties by ejection alone (a single proxy is never ejected at 50 %).
    pub max_ejection_percent: u8,
    /// Now, on the broker's clock.
    pub now: Instant,
    /// Where an unbudgeted hand-out is remembered instead of the store (upstream candidates and
    /// stale answers, [`super::marks`]); `None`: the store counts every hand-out (embedded
    /// members). Ignored under a budget and for `least_connections`, which read the store's counts.
    pub marks: Option<&'a HandOutMarks>,
}

/// A hand-out.
#[derive(Clone)]
pub struct Picked<P> {
    /// The proxy URL (may hold a password).
    pub url: Arc<str>,
    /// The candidate's payload.
    pub payload: P,
    /// When the feed's lease ends: now + TTL × (1 − U(0, jitter)).
    pub lease_expires_at: Instant,
    /// When the candidate itself expires (upstream answers), for the answer's `ttl_seconds`.
    pub expires_at: Option<Instant>,
    /// Attempts in the window after this one (0 when unlimited).
    pub used: u32,
    /// The budget counted against.
    pub budget: Option<Budget>,
    /// Whether the proxy is penalised for the exchange (picked as a last resort).
    pub penalised: bool,
    /// Whether a sticky key chose it.
    pub sticky: bool,
}

impl<P> fmt::Debug for Picked<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Picked")
            .field("url", &redact_url(&self.url))
            .field("lease_expires_at", &self.lease_expires_at)
            .field("used", &self.used)
            .field("budget", &self.budget)
            .field("penalised", &self.penalised)
            .field("sticky", &self.sticky)
            .finish_non_exhaustive()
    }
}

/// Why nothing was picked, and what would help.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Shortfall {
    /// Every candidate not picked (for `metadata.exclude_proxies` when asking upstream).
    pub exclude: Vec<Arc<str>>,
    /// The earliest a candidate becomes usable again (its window frees, or its ban or ejection
    /// ends); `None` when there were no candidates.
    pub retry_after: Option<Duration>,
    /// Candidates whose window was full.
    pub no_headroom: usize,
    /// Candidates banned for the exchange.
    pub banned: usize,
    /// Candidates ejected for the exchange.
    pub ejected: usize,
    /// Candidates penalised for the exchange (not counted as full, banned or ejected).
    pub penalised: usize,
    /// Candidates considered.
    pub total: usize,
}

impl fmt::Debug for Shortfall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shortfall")
            .field(
                "exclude",
                &self.exclude.iter().map(|u| redact_url(u)).collect::<Vec<_>>(),
            )
            .field("retry_after", &self.retry_after)
            .field("no_headroom", &self.no_headroom)
            .field("banned", &self.banned)
            .field("ejected", &self.ejected)
            .field("penalised", &self.penalised)
            .field("total", &self.total)
            .finish()
    }
}

/// The outcome of [`choose`].
#[derive(Debug, Clone)]
pub enum Choice<P> {
    /// One was handed out (its attempt is counted).
    Picked(Picked<P>),
    /// None could be.
    Short(Shortfall),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tier {
    Eligible,
    Penalised,
    Out,
}

/// Chooses one of `input.members` and counts its attempt (see the module docs).
pub async fn choose<P: Clone>(store: &dyn Store, input: Choose<'_, P>) -> Result<Choice<P>, StoreError> {
    let urls: PerMember<&str> = input.members.iter().map(|m| &*m.url).collect();
    let states = match store.choice_states_now(input.exchange, &urls) {
        Some(states) => states,
        None => store.choice_states(input.exchange, &urls).await?,
    };
    let mut plan = Plan::new(&input, &states);
    if let Some(marks) = marked(&input) {
        return Ok(plan.hand_out_marked(&input, marks));
    }
    let Choose {
        exchange,
        connection_type,
        members,
        order,
        budget,
        ttl,
        jitter,
        allow_penalised,
        now,
        ..
    } = input;
    for &pass in passes(allow_penalised) {
        for &i in &plan.ranked {
            if plan.tiers[i] != pass || plan.tried[i] {
                continue;
            }
            plan.tried[i] = true;
            let member = &members[i];
            let lease = random_lease(lease_ttl(member, ttl, now), jitter);
            let key = StateKey {
                proxy: &member.url,
                exchange,
            };
            let hand_out = HandOut {
                connection_type,
                budget,
                lease,
            };
            match store.try_attempt(key, hand_out).await? {
                Attempt::Admitted { used, budget } => {
                    return Ok(Choice::Picked(Picked {
                        url: member.url.clone(),
                        payload: member.payload.clone(),
                        lease_expires_at: lease_end(now, lease),
                        expires_at: member.expires_at,
                        used,
                        budget,
                        penalised: pass == Tier::Penalised,
                        sticky: matches!(order, Order::Sticky(_)),
                    }));
                }
                Attempt::Exhausted { retry_after } => {
                    // Filled since the snapshot.
                    plan.short.no_headroom += 1;
                    let at = now + retry_after;
                    plan.usable_at = Some(plan.usable_at.map_or(at, |u| u.min(at)));
                }
            }
        }
    }
    Ok(plan.into_short(members, now))
}

/// [`choose`] at once, when it needs nothing that waits: the store has the states at hand
/// ([`Store::choice_states_now`]) and the hand-out is only marked (no budget or lease count to
/// make in the store). `None`: call [`choose`]. A cache hit of an unbudgeted exchange is chosen
/// this way, without a future.
pub fn choose_now<P: Clone>(store: &dyn Store, input: &Choose<'_, P>) -> Option<Choice<P>> {
    let marks = marked(input)?;
    if let [only] = input.members {
        // Most keys hold one answer: its state alone, without a vector.
        let state = store.choice_state_now(input.exchange, &only.url)?;
        // Nothing against it: the choice a plan would make, without building one. The
        // round-robin cursor moves as ranking would move it.
        if state
            .as_ref()
            .is_none_or(|s| matches!(s.standing(input.now), Standing::Ok))
        {
            if let Order::Strategy(Strategy::RoundRobin) = input.order {
                input.cursor.fetch_add(1, Ordering::Relaxed);
            }
            return Some(Choice::Picked(hand_out_marked(
                input,
                marks,
                only,
                Tier::Eligible,
            )));
        }
        return Some(Plan::new(input, std::slice::from_ref(&state)).hand_out_marked(input, marks));
    }
    let urls: PerMember<&str> = input.members.iter().map(|m| &*m.url).collect();
    let states = store.choice_states_now(input.exchange, &urls)?;
    Some(Plan::new(input, &states).hand_out_marked(input, marks))
}

/// Hands out `member` from tier `pass`, marking it in `marks` (nothing in the store).
fn hand_out_marked<P: Clone>(
    input: &Choose<'_, P>,
    marks: &HandOutMarks,
    member: &Candidate<P>,
    pass: Tier,
) -> Picked<P> {
    let now = input.now;
    let lease = random_lease(lease_ttl(member, input.ttl, now), input.jitter);
    let lease_expires_at = lease_end(now, lease);
    marks.mark(input.exchange, &member.url, lease_expires_at, now);
    Picked {
        url: member.url.clone(),
        payload: member.payload.clone(),
        lease_expires_at,
        expires_at: member.expires_at,
        used: 0,
        budget: None,
        penalised: pass == Tier::Penalised,
        sticky: matches!(input.order, Order::Sticky(_)),
    }
}

/// Where `input`'s hand-out is remembered when it is not counted in the store.
fn marked<'a, P>(input: &Choose<'a, P>) -> Option<&'a HandOutMarks> {
    input.marks.filter(|_| {
        input.budget.is_none() && !matches!(input.order, Order::Strategy(Strategy::LeastConnections))
    })
}

/// The tiers to pick from, best first.
fn passes(allow_penalised: bool) -> &'static [Tier] {
    if allow_penalised {
        &[Tier::Eligible, Tier::Penalised]
    } else {
        &[Tier::Eligible]
    }
}

/// A member's lease TTL: until it expires (upstream answers), else `ttl`.
fn lease_ttl<P>(member: &Candidate<P>, ttl: Duration, now: Instant) -> Duration {
    member
        .expires_at
        .map_or(ttl, |e| e.saturating_duration_since(now))
        .min(MAX_CANDIDATE_TTL)
}

/// What a choice knows before handing out: each member's tier, the preferred order, and the
/// shortfall so far.
struct Plan {
    tiers: PerMember<Tier>,
    ranked: PerMember<usize>,
    tried: PerMember<bool>,
    short: Shortfall,
    usable_at: Option<Instant>,
}

impl Plan {
    fn new<P>(input: &Choose<'_, P>, states: &[Option<ProxyState>]) -> Self {
        let Choose {
            connection_type,
            members,
            order,
            cursor,
            budget,
            max_ejection_percent,
            now,
            ..
        } = *input;
        let clean = ProxyState::default();
        let state = |i: usize| states.get(i).and_then(Option::as_ref).unwrap_or(&clean);
        let ejected = counted_ejections(members.len(), max_ejection_percent, |i| {
            state(i).ejected_until.filter(|&t| t > now)
        });
        let mut short = Shortfall {
            total: members.len(),
            ..Shortfall::default()
        };
        let mut usable_at: Option<Instant> = None;
        let tiers: PerMember<Tier> = (0..members.len())
            .map(|i| {
                // A store answering with fewer states than asked counts the rest as clean slates.
                let st = state(i);
                let window = st.window(connection_type);
                let full = match (budget, window) {
                    (Some(b), Some(w)) => !w.has_headroom(b),
                    (Some(b), None) => b.attempts == 0,
                    (None, _) => false,
                };
                let mut at: Option<Instant> = None;
                let mut later = |t: Option<Instant>| {
                    if let Some(t) = t {
                        at = Some(at.map_or(t, |a| a.max(t)));
                    }
                };
                let banned = st.banned_until.is_some_and(|t| t > now);
                let ejected = ejected[i];
                if banned {
                    later(st.banned_until);
                }
                if ejected {
                    later(st.ejected_until);
                }
                if full {
                    later(
                        window
                            .and_then(|w| w.frees_at)
                            .or_else(|| budget.map(|b| now + b.per)),
                    );
                }
                if let Some(at) = at {
                    usable_at = Some(usable_at.map_or(at, |u| u.min(at)));
                }
                if banned {
                    short.banned += 1;
                    Tier::Out
                } else if ejected {
                    short.ejected += 1;
                    Tier::Out
                } else if full {
                    short.no_headroom += 1;
                    Tier::Out
                } else if st.penalised_until.is_some_and(|t| t > now) {
                    short.penalised += 1;
                    Tier::Penalised
                } else {
                    Tier::Eligible
                }
            })
            .collect();
        Self {
            ranked: rank(members, order, cursor, states),
            tried: smallvec::smallvec![false; members.len()],
            tiers,
            short,
            usable_at,
        }
    }

    /// Hands out the best member and marks it in `marks` (nothing in the store), or comes up
    /// short.
    fn hand_out_marked<P: Clone>(self, input: &Choose<'_, P>, marks: &HandOutMarks) -> Choice<P> {
        for &pass in passes(input.allow_penalised) {
            if let Some(&i) = self.ranked.iter().find(|&&i| self.tiers[i] == pass) {
                return Choice::Picked(hand_out_marked(input, marks, &input.members[i], pass));
            }
        }
        self.into_short(input.members, input.now)
    }

    /// Nothing could be handed out.
    fn into_short<P>(self, members: &[Candidate<P>], now: Instant) -> Choice<P> {
        let mut short = self.short;
        short.exclude = members.iter().map(|m| m.url.clone()).collect();
        short.retry_after = self.usable_at.map(|t| t.saturating_duration_since(now));
        Choice::Short(short)
    }
}

/// Which of `n` members count as ejected: those ejected (`ejected_until(i)` is `Some`), less the
/// soonest-ending ones beyond `max_percent` of `n`.
fn counted_ejections(
    n: usize,
    max_percent: u8,
    ejected_until: impl Fn(usize) -> Option<Instant>,
) -> PerMember<bool> {
    let mut ejected: PerMember<(Instant, usize)> =
        (0..n).filter_map(|i| ejected_until(i).map(|t| (t, i))).collect();
    let allowed = n * usize::from(max_percent.min(100)) / 100;
    let mut counted: PerMember<bool> = smallvec::smallvec![false; n];
    if ejected.len() > allowed {
        // Keep the ejections that last longest; forgive the rest.
        ejected.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        ejected.truncate(allowed);
    }
    for (_, i) in ejected {
        counted[i] = true;
    }
    counted
}

/// Indices of `members` in the order `order` prefers them.
fn rank<P>(
    members: &[Candidate<P>],
    order: Order<'_>,
    cursor: &AtomicUsize,
    states: &[Option<ProxyState>],
) -> PerMember<usize> {
    let n = members.len();
    if n == 0 {
        return PerMember::new();
    }
    match order {
        Order::Static => (0..n).collect(),
        Order::Sticky(key) => {
            let weighted: Vec<(&str, f64)> = members.iter().map(|m| (&*m.url, m.weight)).collect();
            PerMember::from_vec(sticky::rank(key, &weighted))
        }
        Order::Strategy(Strategy::RoundRobin) => {
            let start = cursor.fetch_add(1, Ordering::Relaxed) % n;
            (start..n).chain(0..start).collect()
        }
        Order::Strategy(Strategy::Random) => {
            // Efraimidis–Spirakis: sorting by u^(1/w) is a weighted draw without replacement, so the
            // first is picked in proportion to its weight and the rest are its fallbacks.
            let mut rng = rand::rng();
            let mut keyed: PerMember<(f64, usize)> = members
                .iter()
                .enumerate()
                .map(|(i, m)| {
                    let w = if m.weight.is_finite() && m.weight > 0.0 {
                        m.weight
                    } else {
                        f64::MIN_POSITIVE
                    };
                    (rng.random::<f64>().powf(1.0 / w), i)
                })
                .collect();
            keyed.sort_by(|a, b| b.0.total_cmp(&a.0));
            keyed.into_iter().map(|(_, i)| i).collect()
        }
        Order::Strategy(Strategy::LeastConnections) => {
            let mut order: PerMember<usize> = (0..n).collect();
            order.sort_by_key(|&i| {
                (
                    states
                        .get(i)
                        .and_then(|s| s.as_ref())
                        .map_or(0, |s| s.live_leases),
                    i,
                )
            });
            order
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::clock::SystemClock;
    use crate::store::BanLength;
    use crate::store::memory::MemoryStore;

    const WS: ConnectionType = ConnectionType::Websocket;

    fn members(urls: &[&str]) -> Vec<Candidate<usize>> {
        urls.iter()
            .enumerate()
            .map(|(i, u)| Candidate {
                url: Arc::from(*u),
                weight: 1.0,
                expires_at: None,
                payload: i,
            })
            .collect()
    }

    fn store() -> MemoryStore {
        MemoryStore::new(10_000, Arc::new(SystemClock))
    }

    fn input<'a>(
        members: &'a [Candidate<usize>],
        order: Order<'a>,
        cursor: &'a AtomicUsize,
        budget: Option<Budget>,
        allow_penalised: bool,
    ) -> Choose<'a, usize> {
        Choose {
            exchange: "binance",
            connection_type: WS,
            members,
            order,
            cursor,
            budget,
            ttl: Duration::from_secs(300),
            jitter: 0.2,
            allow_penalised,
            max_ejection_percent: 100,
            now: Instant::now(),
            marks: None,
        }
    }

    async fn pick(store: &dyn Store, input: Choose<'_, usize>) -> Option<Arc<str>> {
        match choose(store, input).await.unwrap() {
            Choice::Picked(p) => Some(p.url),
            Choice::Short(_) => None,
        }
    }

    fn key<'a>(proxy: &'a str) -> StateKey<'a> {
        StateKey {
            proxy,
            exchange: "binance",
        }
    }

    #[tokio::test(start_paused = true)]
    async fn round_robin_rotates_and_skips_the_ineligible() {
        let s = store();
        let m = members(&["http://a:1", "http://b:1", "http://c:1"]);
        let cursor = AtomicUsize::new(0);
        s.ban(
            key("http://b:1"),
            BanLength::Exactly(Duration::from_secs(60)),
            true,
        )
        .await
        .unwrap();
        let mut got = Vec::new();
        for _ in 0..4 {
            got.push(
                pick(
                    &s,
                    input(&m, Order::Strategy(Strategy::RoundRobin), &cursor, None, true),
                )
                .await
                .unwrap(),
            );
        }
        let got: Vec<&str> = got.iter().map(|u| &**u).collect();
        assert_eq!(got, ["http://a:1", "http://c:1", "http://c:1", "http://a:1"]);
    }

    #[tokio::test(start_paused = true)]
    async fn penalised_candidates_are_a_last_resort() {
        let s = store();
        let m = members(&["http://a:1", "http://b:1"]);
        let cursor = AtomicUsize::new(0);
        let budget = Some(Budget::new(1, 60));
        s.penalise(key("http://a:1"), Duration::from_secs(30), true)
            .await
            .unwrap();
        let rr = Order::Strategy(Strategy::RoundRobin);
        assert_eq!(
            pick(&s, input(&m, rr, &cursor, budget, true)).await.as_deref(),
            Some("http://b:1")
        );
        // b is full now; a is penalised: not without permission, then yes.
        let Choice::Short(short) = choose(&s, input(&m, rr, &cursor, budget, false)).await.unwrap() else {
            panic!("picked a penalised proxy without permission");
        };
        assert_eq!((short.penalised, short.no_headroom, short.total), (1, 1, 2));
        assert_eq!(short.exclude.len(), 2);
        let Choice::Picked(p) = choose(&s, input(&m, rr, &cursor, budget, true)).await.unwrap() else {
            panic!("the penalised proxy had headroom");
        };
        assert!(p.penalised && &*p.url == "http://a:1");
    }

    #[tokio::test(start_paused = true)]
    async fn a_shortfall_says_when_the_earliest_candidate_is_usable_again() {
        let s = store();
        let m = members(&["http://a:1", "http://b:1", "http://c:1"]);
        let cursor = AtomicUsize::new(0);
        let budget = Some(Budget::new(1, 60));
        let rr = Order::Strategy(Strategy::RoundRobin);
        pick(&s, input(&m, rr, &cursor, budget, true)).await.unwrap();
        tokio::time::advance(Duration::from_secs(10)).await;
        pick(&s, input(&m, rr, &cursor, budget, true)).await.unwrap();
        s.eject(key("http://c:1"), true).await.unwrap();
        let Choice::Short(short) = choose(&s, input(&m, rr, &cursor, budget, true)).await.unwrap() else {
            panic!("over budget");
        };
        assert_eq!((short.no_headroom, short.ejected, short.banned), (2, 1, 0));
        // a frees at 60 s (50 s from now), c's ejection ends in 30 s.
        assert_eq!(short.retry_after, Some(Duration::from_secs(30)));
    }

    #[tokio::test(start_paused = true)]
    async fn least_connections_prefers_the_fewest_live_leases() {
        let s = store();
        let m = members(&["http://a:1", "http://b:1", "http://c:1"]);
        let cursor = AtomicUsize::new(0);
        let lc = Order::Strategy(Strategy::LeastConnections);
        let mut counts: HashMap<String, usize> = HashMap::new();
        for _ in 0..9 {
            let url = pick(&s, input(&m, lc, &cursor, None, true)).await.unwrap();
            *counts.entry(url.to_string()).or_default() += 1;
        }
        assert!(counts.values().all(|&n| n == 3), "{counts:?}");
        s.release(key("http://b:1")).await.unwrap();
        assert_eq!(
            pick(&s, input(&m, lc, &cursor, None, true)).await.as_deref(),
            Some("http://b:1")
        );
    }

    #[tokio::test(start_paused = true)]
    async fn random_follows_the_weights() {
        let s = store();
        let mut m = members(&["http://a:1", "http://b:1"]);
        m[1].weight = 4.0;
        let cursor = AtomicUsize::new(0);
        let mut b = 0;
        for _ in 0..2000 {
            b += usize::from(
                pick(
                    &s,
                    input(&m, Order::Strategy(Strategy::Random), &cursor, None, true),
                )
                .await
                .as_deref()
                    == Some("http://b:1"),
            );
        }
        // Expected 1600 (80 %); 5 standard deviations is ±90.
        assert!((1500..=1700).contains(&b), "{b} of 2000");
    }

    #[tokio::test(start_paused = true)]
    async fn a_sticky_key_keeps_its_proxy_while_eligible_then_moves_and_comes_back() {
        let s = store();
        let m = members(&["http://a:1", "http://b:1", "http://c:1", "http://d:1"]);
        let cursor = AtomicUsize::new(0);
        let first = pick(&s, input(&m, Order::Sticky("feed-7"), &cursor, None, true))
            .await
            .unwrap();
        for _ in 0..5 {
            assert_eq!(
                pick(&s, input(&m, Order::Sticky("feed-7"), &cursor, None, true))
                    .await
                    .unwrap(),
                first
            );
        }
        s.ban(key(&first), BanLength::Exactly(Duration::from_secs(10)), true)
            .await
            .unwrap();
        let moved = pick(&s, input(&m, Order::Sticky("feed-7"), &cursor, None, true))
            .await
            .unwrap();
        assert_ne!(moved, first);
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(
            pick(&s, input(&m, Order::Sticky("feed-7"), &cursor, None, true))
                .await
                .unwrap(),
            first
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_choices_never_hand_out_over_budget() {
        let s: Arc<dyn Store> = Arc::new(store());
        let m: Arc<Vec<Candidate<usize>>> = Arc::new(members(&["http://a:1", "http://b:1", "http://c:1"]));
        let cursor = Arc::new(AtomicUsize::new(0));
        let budget = Some(Budget::new(7, 300));
        let tasks: Vec<_> = (0..100)
            .map(|_| {
                let (s, m, cursor) = (s.clone(), m.clone(), cursor.clone());
                tokio::spawn(async move {
                    let input = Choose {
                        exchange: "binance",
                        connection_type: WS,
                        members: &m,
                        order: Order::Strategy(Strategy::RoundRobin),
                        cursor: &cursor,
                        budget,
                        ttl: Duration::from_secs(300),
                        jitter: 0.2,
                        allow_penalised: true,
                        max_ejection_percent: 100,
                        now: Instant::now(),
                        marks: None,
                    };
                    match choose(&*s, input).await.unwrap() {
                        Choice::Picked(p) => Some(p.url.to_string()),
                        Choice::Short(_) => None,
                    }
                })
            })
            .collect();
        let mut counts: HashMap<String, usize> = HashMap::new();
        let mut short = 0;
        for t in tasks {
            match t.await.unwrap() {
                Some(url) => *counts.entry(url).or_default() += 1,
                None => short += 1,
            }
        }
        assert_eq!(counts.values().sum::<usize>(), 21);
        assert!(counts.values().all(|&n| n == 7), "{counts:?}");
        assert_eq!(short, 79);
    }

    #[tokio::test(start_paused = true)]
    async fn leases_are_jittered_below_the_candidates_ttl() {
        let s = store();
        let now = Instant::now();
        let mut m = members(&["http://a:1"]);
        m[0].expires_at = Some(now + Duration::from_secs(100));
        let cursor = AtomicUsize::new(0);
        for _ in 0..50 {
            let Choice::Picked(p) = choose(&s, input(&m, Order::Static, &cursor, None, true))
                .await
                .unwrap()
            else {
                panic!("unlimited");
            };
            let lease = p.lease_expires_at - now;
            assert!(
                lease <= Duration::from_secs(100) && lease >= Duration::from_secs(80),
                "{lease:?}"
            );
        }
    }

    #[test]
    fn ejections_beyond_the_max_percent_are_forgiven_soonest_ending_first() {
        let t0 = Instant::now();
        let at = |s: u64| Some(t0 + Duration::from_secs(s));
        // (row, ejection ends per member, max percent, counted as ejected)
        type Row = (&'static str, Vec<Option<Instant>>, u8, Vec<bool>);
        let rows: Vec<Row> = vec![
            (
                "a single proxy at 50 % is never ejected",
                vec![at(30)],
                50,
                vec![false],
            ),
            ("a single proxy at 100 %", vec![at(30)], 100, vec![true]),
            ("half of two", vec![at(30), at(60)], 50, vec![false, true]),
            ("none ejected", vec![None, None], 50, vec![false, false]),
            (
                "within the limit",
                vec![at(30), None, None, None],
                50,
                vec![true, false, false, false],
            ),
            ("0 % forgives all", vec![at(30), at(60)], 0, vec![false, false]),
            ("over 100 % clamps", vec![at(30), at(60)], 255, vec![true, true]),
            ("no members", vec![], 50, vec![]),
        ];
        for (row, ends, pct, expected) in rows {
            assert_eq!(
                counted_ejections(ends.len(), pct, |i| ends[i]),
                PerMember::from_vec(expected),
                "row {row}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_static_proxy_is_not_ejected_at_the_default_max_percent() {
        let s = store();
        let m = members(&["http://a:1"]);
        let cursor = AtomicUsize::new(0);
        s.eject(key("http://a:1"), true).await.unwrap();
        let mut input = input(&m, Order::Static, &cursor, None, true);
        input.max_ejection_percent = 50;
        assert_eq!(pick(&s, input).await.as_deref(), Some("http://a:1"));
    }

    /// `choose_now`'s shortcut for a lone candidate makes the choice a plan makes, in every
    /// standing, and moves the round-robin cursor alike.
    #[tokio::test(start_paused = true)]
    async fn a_lone_candidate_is_chosen_at_once_as_a_plan_chooses_it() {
        type Setup = fn(&MemoryStore) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + '_>>;
        let cases: Vec<(&str, Setup, u8)> = vec![
            ("no state", |_| Box::pin(async {}), 100),
            (
                "ban over",
                |s| {
                    Box::pin(async move {
                        s.ban(
                            key("http://a:1"),
                            BanLength::Exactly(Duration::from_secs(5)),
                            true,
                        )
                        .await
                        .unwrap();
                        tokio::time::advance(Duration::from_secs(6)).await;
                    })
                },
                100,
            ),
            (
                "banned",
                |s| {
                    Box::pin(async move {
                        s.ban(
                            key("http://a:1"),
                            BanLength::Exactly(Duration::from_secs(60)),
                            true,
                        )
                        .await
                        .unwrap();
                    })
                },
                100,
            ),
            (
                "penalised",
                |s| {
                    Box::pin(async move {
                        s.penalise(key("http://a:1"), Duration::from_secs(30), true)
                            .await
                            .unwrap();
                    })
                },
                100,
            ),
            (
                "ejected at 100 %",
                |s| Box::pin(async move { s.eject(key("http://a:1"), true).await.map(drop).unwrap() }),
                100,
            ),
            (
                "ejected at 50 % (forgiven)",
                |s| Box::pin(async move { s.eject(key("http://a:1"), true).await.map(drop).unwrap() }),
                50,
            ),
        ];
        let outcome = |c: &Choice<usize>| match c {
            Choice::Picked(p) => format!("{} penalised={}", p.url, p.penalised),
            Choice::Short(s) => format!("short {:?}", (s.banned, s.ejected, s.penalised)),
        };
        let m = members(&["http://a:1"]);
        for (name, setup, max_ejection_percent) in cases {
            for allow_penalised in [false, true] {
                let s = store();
                setup(&s).await;
                let marks = HandOutMarks::new(100, Instant::now());
                let (fast_cursor, plan_cursor) = (AtomicUsize::new(0), AtomicUsize::new(0));
                let rr = Order::Strategy(Strategy::RoundRobin);
                let mut fast = input(&m, rr, &fast_cursor, None, allow_penalised);
                let mut plan = input(&m, rr, &plan_cursor, None, allow_penalised);
                fast.marks = Some(&marks);
                plan.marks = Some(&marks);
                fast.max_ejection_percent = max_ejection_percent;
                plan.max_ejection_percent = max_ejection_percent;
                let got = choose_now(&s, &fast).expect("the memory store has its states at hand");
                let states = s.states_now("binance", &["http://a:1"]);
                let want = Plan::new(&plan, &states).hand_out_marked(&plan, &marks);
                let case = format!("{name}, allow_penalised {allow_penalised}");
                assert_eq!(outcome(&got), outcome(&want), "{case}");
                assert_eq!(
                    fast_cursor.load(Ordering::Relaxed),
                    plan_cursor.load(Ordering::Relaxed),
                    "{case}"
                );
            }
        }
    }

    #[test]
    fn a_shortfalls_debug_never_shows_a_password() {
        let short = Shortfall {
            exclude: vec![Arc::from("socks5://u:hunter2@p:1")],
            ..Default::default()
        };
        assert!(!format!("{short:?}").contains("hunter2"));
    }
}
