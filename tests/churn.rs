//! Pool churn (issue 10, item 7): adding and removing an ip-hash pool over and over
//! leaked its Maglev table (about 256 KiB) each time, because removed pools were
//! kept for good. Now a removed pool is let go once its connections are gone, and
//! the metrics exporter forgets what removed objects exported. Also: a removed
//! backend's `flowgate_backend_up` drops to 0 at once rather than staying 1.

mod common;

use std::time::Duration;

use common::*;

fn config(backend: std::net::SocketAddr, with_q: bool) -> String {
    let q = if with_q {
        format!(
            "\n[[listeners]]\nname = \"lq\"\nbind = \"127.0.0.1:0\"\npool = \"q\"\n\n\
             [[pools]]\nname = \"q\"\nalgorithm = \"ip-hash\"\nbackends = [ {{ address = \"{backend}\" }} ]\n"
        )
    } else {
        String::new()
    };
    format!(
        "[admin]\nbind = \"127.0.0.1:0\"\n\n\
         [[listeners]]\nname = \"l\"\nbind = \"127.0.0.1:0\"\npool = \"p\"\n\n\
         [[pools]]\nname = \"p\"\nalgorithm = \"ip-hash\"\nbackends = [ {{ address = \"{backend}\" }} ]\n{q}"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adding_and_removing_a_pool_many_times_keeps_memory_flat() {
    let be = TestBackend::start(Kind::Identity).await;
    let fg = Proc::spawn(&config(be.addr, false), &[]);
    let admin = fg.admin();
    let cfg = fg.dir.0.join("flowgate.toml");
    let cycle = |with_q: bool| {
        let cfg = cfg.clone();
        let text = config(be.addr, with_q);
        async move {
            std::fs::write(&cfg, text).unwrap();
            let r = curl(admin, "POST", "/api/v1/reload", None, None).await;
            assert_eq!(r.status, 200, "{r:?}");
            // A scrape between reloads, so the exporter sees every object come and go.
            assert_eq!(curl(admin, "GET", "/metrics", None, None).await.status, 200);
        }
    };
    const WARM: usize = 20;
    const CYCLES: usize = 120;
    let mut after_warm = 0;
    for i in 0..CYCLES {
        cycle(true).await;
        cycle(false).await;
        if i + 1 == WARM {
            after_warm = rss_kib(fg.pid());
        }
    }
    let end = rss_kib(fg.pid());
    let growth = end.saturating_sub(after_warm);
    eprintln!("RSS after {WARM} add/remove cycles: {after_warm} KiB, after {CYCLES}: {end} KiB");
    // 100 more cycles leaked about 25 MiB before; allow a few MiB of allocator noise.
    assert!(
        growth < 6 * 1024,
        "RSS grew {growth} KiB over {} add/remove cycles of an ip-hash pool",
        CYCLES - WARM
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_backend_is_reported_down_at_once() {
    let [a, b]: [_; 2] = start_backends(Kind::Identity).await;
    let text = |backends: &[std::net::SocketAddr]| {
        let list: Vec<String> = backends
            .iter()
            .map(|x| format!("{{ address = \"{x}\" }}"))
            .collect();
        format!(
            "[admin]\nbind = \"127.0.0.1:0\"\n\n\
             [[listeners]]\nname = \"l\"\nbind = \"127.0.0.1:0\"\npool = \"p\"\n\n\
             [[pools]]\nname = \"p\"\nbackends = [ {} ]\n",
            list.join(", ")
        )
    };
    let dir = tempdir::Dir::new();
    let (fg, path) = start_file(&dir, "flowgate.toml", &text(&[a.addr, b.addr]));
    let admin = fg.admin_addr().unwrap();
    let up_line =
        |name: &str, v: u8| format!("flowgate_backend_up{{pool=\"p\",backend=\"{name}\"}} {v}");
    let scrape = || async { curl(admin, "GET", "/metrics", None, None).await.text };
    let text0 = scrape().await;
    assert!(text0.lines().any(|l| l == up_line(&b.name, 1)), "{text0}");

    std::fs::write(&path, text(&[a.addr])).unwrap();
    let fg2 = fg.clone();
    tokio::task::spawn_blocking(move || fg2.reload())
        .await
        .unwrap()
        .unwrap();
    // No connection on b: its drain ends at once and it leaves the pool.
    assert!(
        wait_until(Duration::from_secs(10), || fg
            .pool("p")
            .unwrap()
            .retiring()
            .is_empty())
        .await
    );
    let text1 = scrape().await;
    assert!(text1.lines().any(|l| l == up_line(&b.name, 0)), "{text1}");
    assert!(text1.lines().any(|l| l == up_line(&a.name, 1)), "{text1}");
}
