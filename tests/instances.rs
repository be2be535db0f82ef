//! Two flowgate instances in one process share nothing: each has its own metrics
//! recorder, its own access log and its own settings (issue 9: process globals
//! became fields of the instance). Before, the first instance with `[admin]`
//! installed the one process-wide recorder and access log, and the second exported
//! and logged into them.

mod common;

use std::time::Duration;

use common::*;

/// A config with listener `listener` over `backend`, the admin API, and the access
/// log written to `log` as JSON.
fn instance(listener: &str, backend: std::net::SocketAddr, log: &std::path::Path) -> String {
    format!(
        "[admin]\nbind = \"127.0.0.1:0\"\n\n[log]\naccess_log = \"{}\"\nformat = \"json\"\n\n\
         [[listeners]]\nname = \"{listener}\"\nbind = \"127.0.0.1:0\"\npool = \"p\"\n\n\
         [[pools]]\nname = \"p\"\nbackends = [ {{ address = \"{backend}\" }} ]\n",
        log.display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_in_one_process_keep_their_own_metrics_and_logs() {
    let be = TestBackend::start(Kind::Identity).await;
    let dir = tempdir::Dir::new();
    let (log1, log2) = (dir.0.join("one.log"), dir.0.join("two.log"));
    let one = start(&instance("one", be.addr, &log1));
    let two = start(&instance("two", be.addr, &log2));

    // Three sessions through the first instance, one through the second.
    for _ in 0..3 {
        let (c, name) = connect_identity(one.local_addr("one").unwrap()).await;
        assert_eq!(name, be.name);
        drop(c);
    }
    let (c, _) = connect_identity(two.local_addr("two").unwrap()).await;
    drop(c);

    let lines = |p: &std::path::Path| {
        std::fs::read_to_string(p)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("a JSON line"))
            .collect::<Vec<_>>()
    };
    assert!(
        wait_until(Duration::from_secs(10), || lines(&log1).len() == 3
            && lines(&log2).len() == 1)
        .await,
        "one.log: {:?}, two.log: {:?}",
        lines(&log1),
        lines(&log2)
    );
    assert!(lines(&log1).iter().all(|l| l["listener"] == "one"));
    assert!(lines(&log2).iter().all(|l| l["listener"] == "two"));

    // Each exporter shows its own listener only, with its own count.
    for (fg, mine, other, n) in [(&one, "one", "two", 3), (&two, "two", "one", 1)] {
        let text = curl(fg.admin_addr().unwrap(), "GET", "/metrics", None, None)
            .await
            .text;
        let line = format!("flowgate_connections_total{{listener=\"{mine}\"}} {n}");
        assert!(text.lines().any(|l| l == line), "{line} in:\n{text}");
        assert!(
            !text.contains(&format!("listener=\"{other}\"")),
            "{other}'s series in {mine}'s /metrics:\n{text}"
        );
        // Its own histograms record too (registered in its own recorder).
        let count = format!("flowgate_session_duration_seconds_count{{listener=\"{mine}\"}} {n}");
        assert!(text.lines().any(|l| l == count), "{count} in:\n{text}");
    }
    one.shutdown().await;
    two.shutdown().await;
}
