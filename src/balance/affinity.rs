//! Session affinity with bounded load (issue 14, `[pools.affinity]`): a session key
//! (a header's or cookie's value) goes to the backend that ranks it highest under
//! weighted rendezvous hashing (highest random weight). Removing a backend moves
//! only the sessions it had; adding one takes only the sessions it now ranks first
//! for. With bounded load (Mirrokni et al., "Consistent Hashing with Bounded
//! Loads"), a backend whose in-flight count would exceed
//! `max_load_factor × (total + 1) / usable` is passed over for the key's next
//! ranked backend, so one hot session cannot pile onto one server.
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
}
