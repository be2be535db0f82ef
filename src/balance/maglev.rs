//! ip-hash: Maglev consistent hashing (Eisenbud et al., NSDI 2016) with weights.
//!
//! Every input is stable: the table is built from the backends' configured addresses
//! and weights with a fixed, seeded xxh3 (backends taking turns in name order, so the
//! list's order does not matter), and the client key is xxh3 of the IP's bytes. Two
//! instances with the same backends and weights therefore send a client to the same
//! backend, and so does one instance across restarts. Removing one of k backends
//! moves that backend's clients plus, with a 65537-entry table, typically well
//! under 2% of the others (the paper's bound; our test allows 5%).
//!
//! Weights: in each population round a backend earns credit equal to its weight and
//! claims one slot per `max_weight` of credit (as Envoy's weighted Maglev does), so
//! table shares follow weights.
//!
//! When the hashed backend is unusable, the key is rehashed with the next seed (up to
//! a few times), so instances that agree on health also agree on the fallback.

use std::net::IpAddr;

use xxhash_rust::xxh3::xxh3_64_with_seed;

use super::{first_usable_from, Pick, Selector};

/// A prime well above 100 x the number of backends a pool realistically has.
const TABLE_SIZE: usize = 65537;
const SEED_OFFSET: u64 = 0x666c_6f77_6761_7465; // "flowgate"
const SEED_SKIP: u64 = 0x6d61_676c_6576_0001;
const SEED_KEY: u64 = 0x6970_6861_7368_0000;
const REHASHES: u64 = 8;

pub struct Maglev {
    table: Vec<u32>,
}

impl std::fmt::Debug for Maglev {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Maglev")
            .field("slots", &self.table.len())
            .finish()
    }
}

impl Maglev {
    pub fn new(names: &[&str], weights: &[u32]) -> Maglev {
        let n = names.len();
        if n == 0 {
            return Maglev { table: Vec::new() };
        }
        let m = TABLE_SIZE as u64;
        let offset: Vec<u64> = names
            .iter()
            .map(|s| xxh3_64_with_seed(s.as_bytes(), SEED_OFFSET) % m)
            .collect();

        // Backends take their turns in name order, not list order: two instances
        // whose lists hold the same backends in another order still build the same
        // table (and runtime-added backends land where they would in the file).
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&a, &b| names[a].cmp(names[b]));
        // A backend's permutation depends on its name only (a skip that depended
        // on the other backends would change when they leave). So two backends can
        // draw the same skip, about one pair in 65,536; they then walk the same
        // cycle, and removing a third backend can move up to about half of their
        // clients (`colliding_skips_are_the_known_exception`). Envoy's and the
        // paper's Maglev share this.
        let skip: Vec<u64> = names
            .iter()
            .map(|s| xxh3_64_with_seed(s.as_bytes(), SEED_SKIP) % (m - 1) + 1)
            .collect();
        let max_w = u64::from(*weights.iter().max().unwrap_or(&1)).max(1);
        let mut credit = vec![0u64; n];
        let mut next = vec![0u64; n];
        let mut table = vec![u32::MAX; TABLE_SIZE];
        let mut filled = 0;
        while filled < TABLE_SIZE {
            for &i in &order {
                credit[i] += u64::from(weights[i]);
                while credit[i] >= max_w && filled < TABLE_SIZE {
                    credit[i] -= max_w;
                    // Claim this backend's next free slot in its permutation.
                    loop {
                        let slot = ((offset[i] + next[i] * skip[i]) % m) as usize;
                        next[i] += 1;
                        if table[slot] == u32::MAX {
                            table[slot] = i as u32;
                            filled += 1;
                            break;
                        }
                    }
                }
            }
        }
        Maglev { table }
    }

    /// The backend a key maps to with every backend usable.
    pub fn lookup(&self, client: IpAddr) -> Option<usize> {
        let h = key_hash(client, 0);
        self.table
            .get((h % TABLE_SIZE as u64) as usize)
            .map(|&i| i as usize)
    }
}

fn key_hash(ip: IpAddr, round: u64) -> u64 {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    };
    match ip {
        IpAddr::V4(a) => xxh3_64_with_seed(&a.octets(), SEED_KEY + round),
        IpAddr::V6(a) => xxh3_64_with_seed(&a.octets(), SEED_KEY + round),
    }
}

impl Selector for Maglev {
    fn select(&self, pick: &Pick<'_>) -> Option<usize> {
        if self.table.is_empty() {
            return None;
        }
        let mut first = 0;
        for round in 0..REHASHES {
            let i =
                self.table[(key_hash(pick.client, round) % TABLE_SIZE as u64) as usize] as usize;
            if round == 0 {
                first = i;
            }
            if (pick.usable)(i) {
                return Some(i);
            }
        }
        first_usable_from(pick, first)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::net::Ipv4Addr;

    fn clients(n: u32) -> Vec<IpAddr> {
        (0..n)
            .map(|i| IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i * 7919)))
            .collect()
    }

    /// Two of these backends hash to the same skip (42096): removing the third moves
    /// 45% of their clients, where distinct skips move under 1% (see `new`). This
    /// pins the exception down, so a change to the hashing that makes it worse or
    /// fixes it shows up here.
    #[test]
    fn colliding_skips_are_the_known_exception() {
        let names = ["0.0.0.0:80", "21.40.61.181:80", "139.177.228.226:80"];
        let m = TABLE_SIZE as u64;
        let skip = |s: &str| xxh3_64_with_seed(s.as_bytes(), SEED_SKIP) % (m - 1) + 1;
        assert_eq!(skip(names[1]), skip(names[2]));
        let before = Maglev::new(&names, &[1, 1, 1]);
        let after = Maglev::new(&names[1..], &[1, 1]);
        let (mut others, mut moved) = (0, 0);
        for (&was, &now) in before.table.iter().zip(&after.table) {
            if was != 0 {
                others += 1;
                if names[was as usize] != names[1 + now as usize] {
                    moved += 1;
                }
            }
        }
        assert!(
            moved * 100 > others * 40,
            "{moved} of {others} others moved"
        );
    }

    /// The same backends listed in another order: every client maps to the same name.
    #[test]
    fn list_order_does_not_matter() {
        let names = ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80", "10.0.0.4:80"];
        let weights = [1, 2, 1, 3];
        let a = Maglev::new(&names, &weights);
        let perm = [2, 0, 3, 1];
        let shuffled: Vec<&str> = perm.iter().map(|&i| names[i]).collect();
        let sw: Vec<u32> = perm.iter().map(|&i| weights[i]).collect();
        let b = Maglev::new(&shuffled, &sw);
        for c in clients(20_000) {
            let (x, y) = (a.lookup(c).unwrap(), b.lookup(c).unwrap());
            assert_eq!(names[x], shuffled[y], "{c}");
        }
    }

    #[test]
    fn stable_across_builds() {
        let names = ["a:1", "b:1", "c:1"];
        let a = Maglev::new(&names, &[1, 1, 1]);
        let b = Maglev::new(&names, &[1, 1, 1]);
        for c in clients(1000) {
            assert_eq!(a.lookup(c), b.lookup(c));
        }
    }

    #[test]
    fn weights_shape_shares() {
        let t = Maglev::new(&["a:1", "b:1"], &[1, 3]);
        let b = t.table.iter().filter(|&&i| i == 1).count() as f64 / TABLE_SIZE as f64;
        assert!((b - 0.75).abs() < 0.01, "share {b}");
    }

    #[test]
    fn removal_moves_few_others() {
        let names = ["a:1", "b:1", "c:1", "d:1", "e:1"];
        let before = Maglev::new(&names, &[1; 5]);
        let after_names = ["a:1", "b:1", "d:1", "e:1"];
        let after = Maglev::new(&after_names, &[1; 4]);
        let mut moved = 0;
        let mut others = 0;
        for c in clients(20000) {
            let was = names[before.lookup(c).unwrap()];
            let now = after_names[after.lookup(c).unwrap()];
            if was != "c:1" {
                others += 1;
                if was != now {
                    moved += 1;
                }
            }
        }
        let frac = moved as f64 / others as f64;
        assert!(frac < 0.05, "{frac}");
        let _ = HashMap::<u8, u8>::new();
    }
}

/// Property tests of the table: full, shares follow weights, minimal disruption on
/// removal, deterministic picks.
#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;
    use std::net::Ipv4Addr;

    /// Distinct backend names (`ip:80`) with weights 1..=`max_weight`, `n` of them.
    fn pool(
        n: std::ops::RangeInclusive<usize>,
        max_weight: u32,
    ) -> impl Strategy<Value = (Vec<String>, Vec<u32>)> {
        prop::collection::btree_map(any::<u32>(), 1..=max_weight, n).prop_map(
            |m: BTreeMap<u32, u32>| {
                m.into_iter()
                    .map(|(ip, w)| (format!("{}:80", Ipv4Addr::from(ip)), w))
                    .unzip()
            },
        )
    }

    fn build(names: &[String], weights: &[u32]) -> Maglev {
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        Maglev::new(&names, weights)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// Every slot names a backend, and each backend's slots are within 2% of its
        /// weighted fair share (fair shares here are >= 170 slots; 150 random pools
        /// stayed within 0.997..1.001).
        #[test]
        fn table_full_and_shares_follow_weights((names, weights) in pool(1..=48, 8)) {
            let t = build(&names, &weights);
            prop_assert_eq!(t.table.len(), TABLE_SIZE);
            let mut slots = vec![0usize; names.len()];
            for &i in &t.table {
                prop_assert!((i as usize) < names.len(), "slot holds {}", i);
                slots[i as usize] += 1;
            }
            let total: u32 = weights.iter().sum();
            for (i, &got) in slots.iter().enumerate() {
                let fair = TABLE_SIZE as f64 * f64::from(weights[i]) / f64::from(total);
                let ratio = got as f64 / fair;
                prop_assert!(
                    (0.98..=1.02).contains(&ratio),
                    "backend {} (weight {}): {} slots, fair {:.1}", i, weights[i], got, fair
                );
            }
        }

        /// Removing one backend out of N moves at most 3% of the keys that were not
        /// on it (150 random pools: at most 0.6%; a modulo hash moves about
        /// (N-2)/(N-1) of them, half or more already at N = 3).
        #[test]
        fn removal_moves_few_others(
            (names, weights) in pool(2..=48, 4),
            removed in any::<prop::sample::Index>(),
        ) {
            // Pools where two backends share a skip are the documented exception
            // (`colliding_skips_are_the_known_exception`); random names hit one
            // about once in 65,536 pairs, so often enough over many runs.
            let m = TABLE_SIZE as u64;
            let mut skips: Vec<u64> = names
                .iter()
                .map(|s| xxh3_64_with_seed(s.as_bytes(), SEED_SKIP) % (m - 1) + 1)
                .collect();
            skips.sort_unstable();
            skips.dedup();
            prop_assume!(skips.len() == names.len());
            let before = build(&names, &weights);
            let r = removed.index(names.len());
            let (mut after_names, mut after_weights) = (names.clone(), weights.clone());
            after_names.remove(r);
            after_weights.remove(r);
            let after = build(&after_names, &after_weights);
            // Keys hash uniformly onto slots, so comparing slots compares key shares.
            let (mut others, mut moved) = (0usize, 0usize);
            for (&was, &now) in before.table.iter().zip(&after.table) {
                if was as usize != r {
                    others += 1;
                    if names[was as usize] != after_names[now as usize] {
                        moved += 1;
                    }
                }
            }
            let frac = moved as f64 / others as f64;
            prop_assert!(frac <= 0.03, "{} of {} others moved ({:.4})", moved, others, frac);
        }

        /// A client gets the same pick from the same selector every time and from
        /// another build of the same pool, with or without unusable backends; an
        /// IPv4-mapped IPv6 client gets its IPv4 address's pick.
        #[test]
        fn same_client_same_pick(
            (names, weights) in pool(1..=32, 4),
            usable in prop::collection::vec(any::<bool>(), 32),
            clients in prop::collection::vec(any::<Ipv4Addr>(), 1..=64),
        ) {
            let (a, b) = (build(&names, &weights), build(&names, &weights));
            let bs = super::super::testutil::backends(&weights);
            let ok = |i: usize| usable[i];
            for v4 in clients {
                let pick = |client: IpAddr| Pick { backends: &bs, client, usable: &ok };
                let first = a.select(&pick(IpAddr::V4(v4)));
                prop_assert_eq!(first, a.select(&pick(IpAddr::V4(v4))));
                prop_assert_eq!(first, b.select(&pick(IpAddr::V4(v4))));
                prop_assert_eq!(first, a.select(&pick(IpAddr::V6(v4.to_ipv6_mapped()))));
                prop_assert_eq!(a.lookup(IpAddr::V4(v4)), b.lookup(IpAddr::V4(v4)));
            }
        }
    }
}
