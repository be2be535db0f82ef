//! Session affinity with bounded load (issue 14, `[pools.affinity]`): a session key
//! (a header's or cookie's value) goes to the backend that ranks it highest under
//! weighted rendezvous hashing (highest random weight). Removing a backend moves
//! only the sessions it had; adding one takes only the sessions it now ranks first
//! for. With bounded load (Mirrokni et al., "Consistent Hashing with Bounded
//! Loads"), a backend whose in-flight count would exceed
//! `max_load_factor × (total + 1) / usable` is passed over for the key's next
//! ranked backend, so one hot session cannot pile onto one server.
//!
//! In a `least-load` pool the bound is on the load score instead ([`home_by_score`]):
//! a session stays on its backend while that backend has a free slot, or its score
//! (the expected time to a first token there) is at most `max_load_factor` × the
//! mean over the usable backends (the bound of bounded-load hashing, on the
//! score), and
//! otherwise goes where least-load would send any request, not to the next by
//! hash. A count of requests cannot tell a slow server from a fast one, and the
//! next by hash may be the slowest or busiest backend (`scripts/bench.sh
//! inference`: a hot session spilled a fifth of its requests onto the 4× slower
//! server).
//!
//! The rank depends only on the key and the backends' names and weights, so two
//! instances with the same config agree.

use std::sync::Arc;

use xxhash_rust::xxh3::xxh3_64_with_seed;

use crate::backend::Backend;

/// The key of a session value (fixed seed: stable across restarts and instances).
pub fn key(value: &[u8]) -> u64 {
    xxh3_64_with_seed(value, 0x5e55_10a1)
}

/// Weighted rendezvous score of `b` for `key` (higher ranks first): `-w / ln(u)`
/// with `u` uniform in (0, 1) from the hash of the key and the backend's name.
fn score(key: u64, b: &Backend) -> f64 {
    let h = xxh3_64_with_seed(b.name.as_bytes(), key);
    // 53 bits into (0, 1), never 0 or 1.
    let u = ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    -f64::from(b.weight().max(1)) / u.ln()
}

/// The backend for session `key` among those `usable` says yes to, in rank order,
/// passing over any whose in-flight count is at the bound. `None` when no backend
/// is usable. A backend over the bound is still taken when every one is.
pub fn pick(
    backends: &[Arc<Backend>],
    usable: &dyn Fn(usize) -> bool,
    key: u64,
    max_load_factor: f64,
) -> Vec<usize> {
    let mut ranked: Vec<(f64, usize)> = (0..backends.len())
        .filter(|&i| usable(i))
        .map(|i| (score(key, &backends[i]), i))
        .collect();
    ranked.sort_by(|a, b| b.0.total_cmp(&a.0));
    let total: usize = ranked.iter().map(|&(_, i)| backends[i].active()).sum();
    let bound = max_load_factor * (total + 1) as f64 / ranked.len().max(1) as f64;
    let (within, over): (Vec<usize>, Vec<usize>) = ranked
        .into_iter()
        .map(|(_, i)| i)
        .partition(|&i| (backends[i].active() + 1) as f64 <= bound.ceil());
    // Within the bound first, in rank order; then the rest, in rank order.
    within.into_iter().chain(over).collect()
}

/// Session `key`'s backend (the highest-ranked usable one) if it has a `free`
/// slot or its `score` is at most `max_load_factor` × the mean score of the
/// usable backends; `None` when it is over, or no backend is usable (the pool's
/// algorithm then picks). A free slot keeps the session whatever the learned
/// speeds say: between equal servers they differ by noise, and a session must
/// not move on noise.
pub fn home_by_score(
    backends: &[Arc<Backend>],
    usable: &dyn Fn(usize) -> bool,
    key: u64,
    max_load_factor: f64,
    score: &dyn Fn(usize) -> f64,
    free: &dyn Fn(usize) -> bool,
) -> Option<usize> {
    let candidates = || (0..backends.len()).filter(|&i| usable(i));
    let home = candidates().max_by(|&a, &b| score_key(key, backends, a, b))?;
    if free(home) {
        return Some(home);
    }
    let (sum, n) = candidates().fold((0.0, 0usize), |(s, n), i| (s + score(i), n + 1));
    (score(home) <= max_load_factor * sum / n as f64).then_some(home)
}

fn score_key(key: u64, backends: &[Arc<Backend>], a: usize, b: usize) -> std::cmp::Ordering {
    score(key, &backends[a]).total_cmp(&score(key, &backends[b]))
}

#[cfg(test)]
mod tests {
    use super::super::testutil::backends;
    use super::*;

    fn first(bs: &[Arc<Backend>], k: u64) -> usize {
        pick(bs, &|_| true, k, 1.25)[0]
    }

    #[test]
    fn removing_a_backend_moves_only_its_sessions() {
        let bs = backends(&[1, 1, 1, 1, 1]);
        let before: Vec<usize> = (0..2000)
            .map(|s| first(&bs, key(&[s as u8, (s >> 8) as u8])))
            .collect();
        // Backend 2 leaves (not usable).
        for (s, &was) in before.iter().enumerate() {
            let now = pick(&bs, &|i| i != 2, key(&[s as u8, (s >> 8) as u8]), 1.25)[0];
            if was != 2 {
                assert_eq!(now, was, "session {s} moved off a backend that stayed");
            }
        }
        // And every backend gets a fair share.
        for b in 0..5 {
            let n = before.iter().filter(|&&x| x == b).count();
            assert!((300..500).contains(&n), "backend {b}: {n} of 2000");
        }
    }

    #[test]
    fn a_backend_at_the_bound_is_passed_over() {
        let bs = backends(&[1, 1, 1, 1]);
        let k = key(b"hot-session");
        let home = first(&bs, k);
        // 8 in flight on the home backend, none elsewhere: bound 1.25 × 9 / 4 = 2.8.
        let _held: Vec<_> = (0..8).map(|_| bs[home].claim()).collect();
        let order = pick(&bs, &|_| true, k, 1.25);
        assert_ne!(order[0], home);
        assert_eq!(*order.last().unwrap(), home, "still a last resort");
    }

    #[test]
    fn by_score_a_session_stays_home_while_a_slot_is_free_or_its_score_within_the_factor() {
        let bs = backends(&[1, 1, 1, 1]);
        let k = key(b"hot-session");
        let home = first(&bs, k);
        // The others score 1; the mean with the home's x is (3 + x) / 4, and the
        // bound 1.25 × that: x ≤ 1.25 × (3 + x) / 4 holds up to x = 15 / 11.
        let full = |_| false;
        let with = |x: f64| {
            home_by_score(
                &bs,
                &|_| true,
                k,
                1.25,
                &|i| if i == home { x } else { 1.0 },
                &full,
            )
        };
        assert_eq!(with(0.5), Some(home));
        assert_eq!(with(1.36), Some(home), "within the bound");
        assert_eq!(with(1.37), None, "past it: the pool's algorithm picks");
        // A free slot at home keeps the session, whatever the score.
        let free = |i| i == home;
        assert_eq!(
            home_by_score(
                &bs,
                &|_| true,
                k,
                1.25,
                &|i| if i == home { 9.0 } else { 1.0 },
                &free
            ),
            Some(home)
        );
        // An unusable home is no home: the next ranked one is.
        let next = pick(&bs, &|i| i != home, k, 1.25)[0];
        assert_eq!(
            home_by_score(&bs, &|i| i != home, k, 1.25, &|_| 1.0, &full),
            Some(next)
        );
    }
}
