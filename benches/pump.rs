//! The session's byte pump on TCP loopback: one message of 1 KiB, 64 KiB or 1 MiB
//! written into one connection, moved by the pump to a second connection, read out
//! at its far end; with splice(2) off (the copy path) and, on Linux, on (a read that
//! fills the 16 KiB copy buffer switches to splice). The time includes the bench's
//! own write and read at the two ends.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use flowgate::proxy::tcp::bench_api;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;

const SIZES: [(&str, usize); 3] = [("1KiB", 1 << 10), ("64KiB", 64 << 10), ("1MiB", 1 << 20)];

/// Both ends of one loopback TCP connection, Nagle off.
async fn connected_pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (a, b) = tokio::join!(TcpStream::connect(l.local_addr().unwrap()), l.accept());
    let (a, (b, _)) = (a.unwrap(), b.unwrap());
    a.set_nodelay(true).unwrap();
    b.set_nodelay(true).unwrap();
    (a, b)
}

fn pump(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut g = c.benchmark_group("pump");
    let paths: &[(&str, bool)] = if cfg!(target_os = "linux") {
        &[("copy", false), ("splice", true)]
    } else {
        &[("copy", false)]
    };
    for &(path, splice) in paths {
        for (label, size) in SIZES {
            g.throughput(Throughput::Bytes(size as u64));
            g.bench_function(BenchmarkId::new(path, label), |b| {
                one_way(b, &rt, size, splice);
            });
        }
    }
    g.finish();
}

/// Times moving `size` bytes writer -> (src, pump, dst) -> reader.
fn one_way(b: &mut criterion::Bencher<'_>, rt: &Runtime, size: usize, splice: bool) {
    let ((mut writer, mut src), (mut dst, mut reader)) =
        rt.block_on(async { tokio::join!(connected_pair(), connected_pair()) });
    let msg = vec![0x5a; size];
    let mut buf = vec![0; size];
    b.iter(|| {
        rt.block_on(async {
            let (w, p, r) = tokio::join!(
                writer.write_all(&msg),
                bench_api::pump(&mut src, &mut dst, size as u64, splice),
                reader.read_exact(&mut buf),
            );
            w.unwrap();
            p.unwrap();
            r.unwrap();
        });
        black_box(&buf);
    });
}

criterion_group!(benches, pump);
criterion_main!(benches);
