//! The connect path's pure work: every selector's `select` through the `Selector`
//! trait, and the Maglev table build that a pool change triggers, at 2, 16 and 256
//! backends (all usable, all weight 1 except where the algorithm uses weights).

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use flowgate::backend::Backend;
use flowgate::balance::{self, Maglev, Pick};
use flowgate::config::{Algorithm, BackendConfig};

const SIZES: [usize; 3] = [2, 16, 256];

/// Backend `i`'s weight: 1 to 4, so the weighted algorithms have something to weigh.
fn weight(i: usize) -> u32 {
    (i % 4) as u32 + 1
}

fn backends(n: usize) -> Vec<Arc<Backend>> {
    (0..n)
        .map(|i| {
            let name = format!("10.0.{}.{}:80", i / 250, i % 250 + 1);
            Backend::new(
                &BackendConfig {
                    addr: name.parse().unwrap(),
                    name,
                    weight: weight(i),
                    max_connections: None,
                    hostname: None,
                },
                "bench",
            )
        })
        .collect()
}

fn select(c: &mut Criterion) {
    let mut g = c.benchmark_group("select");
    for algorithm in Algorithm::ALL {
        for n in SIZES {
            let bs = backends(n);
            let selector = balance::build(algorithm, &bs);
            let all = |_: usize| true;
            // A different client each time, so ip-hash does not hit one cached slot.
            let mut k: u32 = 0;
            g.bench_with_input(BenchmarkId::new(algorithm.as_str(), n), &n, |b, _| {
                b.iter(|| {
                    k = k.wrapping_add(0x9e37_79b9);
                    let pick = Pick {
                        backends: &bs,
                        client: IpAddr::V4(Ipv4Addr::from(k)),
                        usable: &all,
                    };
                    selector.select(black_box(&pick))
                })
            });
        }
    }
    g.finish();
}

fn maglev_build(c: &mut Criterion) {
    let mut g = c.benchmark_group("maglev_build");
    for n in SIZES {
        let names: Vec<String> = backends(n).iter().map(|b| b.name.to_string()).collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let weights: Vec<u32> = (0..n).map(weight).collect();
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| Maglev::new(black_box(&names), black_box(&weights)))
        });
    }
    g.finish();
}

criterion_group!(benches, select, maglev_build);
criterion_main!(benches);
