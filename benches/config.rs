//! `Config::parse` (parse, validate, resolve) of a generated file with 500 backends
//! in 5 pools, one listener each: the work a reload does before it plans anything.

use std::fmt::Write;
use std::hint::black_box;
use std::path::Path;

use criterion::{criterion_group, criterion_main, Criterion};
use flowgate::Config;

const POOLS: usize = 5;
const BACKENDS_PER_POOL: usize = 100;

fn generated() -> String {
    let mut s = String::from("[runtime]\nworkers = 2\n\n");
    for p in 0..POOLS {
        writeln!(
            s,
            "[[listeners]]\nname = \"l{p}\"\nbind = \"127.0.0.1:{}\"\npool = \"p{p}\"\n",
            7000 + p
        )
        .unwrap();
    }
    for p in 0..POOLS {
        writeln!(
            s,
            "[[pools]]\nname = \"p{p}\"\nalgorithm = \"weighted-round-robin\"\nbackends = ["
        )
        .unwrap();
        for b in 0..BACKENDS_PER_POOL {
            writeln!(
                s,
                "  {{ address = \"10.{p}.{}.{}:8080\", weight = {} }},",
                b / 200,
                b % 200 + 1,
                b % 5 + 1
            )
            .unwrap();
        }
        writeln!(
            s,
            "]\n\n[pools.health_check]\nkind = \"tcp\"\ninterval = \"2s\"\n"
        )
        .unwrap();
    }
    s
}

fn parse(c: &mut Criterion) {
    let text = generated();
    let file = Path::new("bench.toml");
    let parsed = Config::parse(&text, file).expect("the generated config is valid");
    let backends: usize = parsed.pools.iter().map(|p| p.backends.len()).sum();
    assert_eq!(backends, POOLS * BACKENDS_PER_POOL);
    c.bench_function("config_parse/500_backends", |b| {
        b.iter(|| Config::parse(black_box(&text), file).unwrap())
    });
}

criterion_group!(benches, parse);
criterion_main!(benches);
