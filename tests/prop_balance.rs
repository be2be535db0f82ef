//! Property tests of the selectors' invariants through the public API
//! (`balance::build`, `Selector::select`). Maglev's table properties need the table
//! and live next to it, in src/balance/maglev.rs.

use std::net::IpAddr;
use std::sync::Arc;

use flowgate::backend::Backend;
use flowgate::balance::{self, Pick, Selector};
use flowgate::config::{Algorithm, BackendConfig};
use proptest::prelude::*;

fn backends(weights: &[u32]) -> Vec<Arc<Backend>> {
    weights
        .iter()
        .enumerate()
        .map(|(i, &weight)| {
            let name = format!("10.0.0.{}:80", i + 1);
            Backend::new(
                &BackendConfig {
                    addr: name.parse().unwrap(),
                    name,
                    weight,
                    max_connections: None,
                    hostname: None,
                },
                "p",
            )
        })
        .collect()
}

fn select(
    sel: &dyn Selector,
    bs: &[Arc<Backend>],
    client: IpAddr,
    usable: &[bool],
) -> Option<usize> {
    sel.select(&Pick {
        backends: bs,
        client,
        usable: &|i| usable[i],
    })
}

const CLIENT: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1));

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// Over one full cycle (sum of weights picks) with every backend usable, each
    /// backend is picked exactly `weight` times.
    #[test]
    fn weighted_full_cycle_gives_exact_shares(weights in prop::collection::vec(1u32..=20, 1..=16)) {
        let bs = backends(&weights);
        let sel = balance::build(Algorithm::WeightedRoundRobin, &bs);
        let all = vec![true; bs.len()];
        let mut picks = vec![0u32; bs.len()];
        for _ in 0..weights.iter().sum::<u32>() {
            picks[select(&*sel, &bs, CLIENT, &all).unwrap()] += 1;
        }
        prop_assert_eq!(picks, weights);
    }

    /// With some backends unusable, weighted round-robin never picks one of them, and
    /// picks nothing only when none is usable.
    #[test]
    fn weighted_never_picks_unusable(
        backends_usable in prop::collection::vec((1u32..=20, any::<bool>()), 1..=16),
    ) {
        let (weights, usable): (Vec<u32>, Vec<bool>) = backends_usable.into_iter().unzip();
        let bs = backends(&weights);
        let sel = balance::build(Algorithm::WeightedRoundRobin, &bs);
        for _ in 0..2 * weights.iter().sum::<u32>() {
            match select(&*sel, &bs, CLIENT, &usable) {
                Some(i) => prop_assert!(usable[i], "picked unusable {} of {:?}", i, usable),
                None => prop_assert!(!usable.contains(&true), "none picked of {:?}", usable),
            }
        }
    }

    /// The same for every algorithm, from arbitrary clients.
    #[test]
    fn no_algorithm_picks_unusable(
        algorithm in prop::sample::select(&Algorithm::ALL[..]),
        backends_usable in prop::collection::vec((1u32..=20, any::<bool>()), 1..=16),
        clients in prop::collection::vec(any::<IpAddr>(), 1..=32),
    ) {
        let (weights, usable): (Vec<u32>, Vec<bool>) = backends_usable.into_iter().unzip();
        let bs = backends(&weights);
        let sel = balance::build(algorithm, &bs);
        for client in clients {
            match select(&*sel, &bs, client, &usable) {
                Some(i) => prop_assert!(usable[i], "{:?} picked unusable {} of {:?}", algorithm, i, usable),
                None => prop_assert!(!usable.contains(&true), "{:?} picked none of {:?}", algorithm, usable),
            }
        }
    }
}
