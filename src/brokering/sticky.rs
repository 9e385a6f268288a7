//! Sticky assignment: weighted rendezvous (highest-random-weight) hashing.
//!
//! Each (key, member) pair gets a score `−weight / ln(u)`, with `u` in (0, 1) from a hash of the
//! pair; the key goes to the member with the highest score. This is the weighted form of
//! rendezvous hashing (Schindelhauer & Schomaker): member `i` wins a share `wᵢ / Σw` of the keys,
//! a key keeps its member for as long as that member is among the eligible ones, and removing a
//! member moves only the keys it had (every other score is unchanged). No ring, no state: O(n) per
//! pick over the eligible candidates (at most `max_candidates_per_key`).
//!
//! The hash is SHA-256 (aws-lc-rs, already in the build for TLS) rather than std's `DefaultHasher`,
//! whose output may change between Rust releases: brokers of one fleet, whatever their build, must
//! send a sticky key to the same proxy.

use aws_lc_rs::digest;

/// The first 8 bytes of SHA-256 over `parts`, each prefixed with its length (so that part
/// boundaries matter). Stable across builds, platforms and processes.
pub fn digest64(parts: &[&[u8]]) -> u64 {
    let mut ctx = digest::Context::new(&digest::SHA256);
    for part in parts {
        ctx.update(&u64::try_from(part.len()).unwrap_or(u64::MAX).to_be_bytes());
        ctx.update(part);
    }
    let d = ctx.finish();
    let mut first = [0u8; 8];
    for (dst, src) in first.iter_mut().zip(d.as_ref()) {
        *dst = *src;
    }
    u64::from_be_bytes(first)
}

/// The rendezvous score of `member` for `key` with `weight` (higher wins). A weight that is not
/// a positive finite number counts as the smallest positive one.
pub fn score(key: &str, member: &str, weight: f64) -> f64 {
    let weight = if weight.is_finite() && weight > 0.0 {
        weight
    } else {
        f64::MIN_POSITIVE
    };
    let h = digest64(&[key.as_bytes(), member.as_bytes()]);
    // 53 random bits → u strictly inside (0, 1), so ln(u) is finite and negative.
    let u = ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    -weight / u.ln()
}

/// Indices of `members` (URL, weight) in the order `key` prefers them: highest score first, ties
/// by URL. The first is the key's proxy; the rest are where it goes if that one is ineligible.
pub fn rank(key: &str, members: &[(&str, f64)]) -> Vec<usize> {
    let mut scored: Vec<(f64, usize)> = members
        .iter()
        .enumerate()
        .map(|(i, (url, w))| (score(key, url, *w), i))
        .collect();
    scored.sort_by(|a, b| {
        b.0.total_cmp(&a.0)
            .then_with(|| members[a.1].0.cmp(members[b.1].0))
    });
    scored.into_iter().map(|(_, i)| i).collect()
}

/// The member `key` goes to, if any.
pub fn pick<'a>(key: &str, members: &[(&'a str, f64)]) -> Option<&'a str> {
    rank(key, members).first().map(|&i| members[i].0)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn members(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("socks5://u:p@proxy{i}:1080")).collect()
    }

    fn weighted<'a>(urls: &'a [String], w: &[f64]) -> Vec<(&'a str, f64)> {
        urls.iter().zip(w).map(|(u, w)| (u.as_str(), *w)).collect()
    }

    #[test]
    fn the_digest_is_stable_and_separates_parts() {
        // Pinned: a change here would move every sticky key of a fleet.
        assert_eq!(digest64(&[b"feed-1", b"socks5://p:1"]), 0xcb4bbda97ab1fa2a);
        assert_ne!(digest64(&[b"ab", b"c"]), digest64(&[b"a", b"bc"]));
        assert_eq!(digest64(&[]), 0xe3b0c44298fc1c14);
    }

    #[test]
    fn weights_set_each_members_share_of_keys() {
        let urls = members(3);
        let set = weighted(&urls, &[1.0, 2.0, 5.0]);
        let mut wins = [0usize; 3];
        for k in 0..8000 {
            let key = format!("feed-{k}");
            let got = pick(&key, &set).unwrap();
            wins[urls.iter().position(|u| u == got).unwrap()] += 1;
        }
        // Expected 1000 / 2000 / 5000; the hash is deterministic, so this cannot flake.
        for (i, expected) in [1000.0, 2000.0, 5000.0].iter().enumerate() {
            let share = wins[i] as f64;
            assert!((share - expected).abs() < expected * 0.1, "member {i}: {wins:?}");
        }
    }

    #[test]
    fn odd_weights_do_not_panic_and_rank_last() {
        let urls = members(3);
        let set = weighted(&urls, &[f64::NAN, -1.0, 1.0]);
        for k in 0..50 {
            assert_eq!(pick(&format!("k{k}"), &set), Some(urls[2].as_str()));
        }
        assert_eq!(pick("k", &[]), None);
    }

    proptest! {
        /// Removing a member moves only the keys it had; the others keep their proxy.
        #[test]
        fn removing_a_member_moves_only_its_keys(
            n in 2usize..12,
            removed in 0usize..12,
            weights in proptest::collection::vec(0.1f64..10.0, 12),
            keys in proptest::collection::vec("[a-z0-9]{1,12}", 1..60),
        ) {
            let urls = members(n);
            let removed = removed % n;
            let all = weighted(&urls, &weights[..n]);
            let mut rest = all.clone();
            rest.remove(removed);
            for key in &keys {
                let before = pick(key, &all).unwrap();
                let after = pick(key, &rest).unwrap();
                if before == urls[removed] {
                    prop_assert_ne!(after, before);
                } else {
                    prop_assert_eq!(after, before, "key {} moved though its member stayed", key);
                }
                // The fallback order is the full order without the removed member.
                let full: Vec<&str> = rank(key, &all).into_iter().map(|i| all[i].0).filter(|u| *u != urls[removed]).collect();
                let without: Vec<&str> = rank(key, &rest).into_iter().map(|i| rest[i].0).collect();
                prop_assert_eq!(full, without);
            }
        }

        /// Adding a member moves keys only to it.
        #[test]
        fn adding_a_member_moves_keys_only_to_it(
            n in 1usize..10,
            keys in proptest::collection::vec("[a-z0-9]{1,12}", 1..60),
        ) {
            let urls = members(n + 1);
            let before_set = weighted(&urls[..n], &vec![1.0; n]);
            let after_set = weighted(&urls, &vec![1.0; n + 1]);
            for key in &keys {
                let before = pick(key, &before_set).unwrap();
                let after = pick(key, &after_set).unwrap();
                prop_assert!(after == before || after == urls[n].as_str());
            }
        }
    }
}
