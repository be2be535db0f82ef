//! Health probes across reloads (issue 10, item 5). Before, every reload restarted
//! every pool's probes from zero, and a restarted probe first waits an interval: with
//! reloads more frequent than the interval, a dead backend was never probed again
//! and stayed `up`. Now probes of a pool whose health check is unchanged go on.

mod common;

use std::time::Duration;

use common::*;
use flowgate::backend::BackendState;
use flowgate::Flowgate;

fn config(backends: &[std::net::SocketAddr]) -> String {
    let list: Vec<String> = backends
        .iter()
        .map(|a| format!("{{ address = \"{a}\" }}"))
        .collect();
    format!(
        "[[listeners]]\nname = \"l\"\nbind = \"127.0.0.1:0\"\npool = \"p\"\n\n\
         [[pools]]\nname = \"p\"\nbackends = [ {} ]\n\
         [pools.health_check]\nkind = \"tcp\"\ninterval = \"300ms\"\ntimeout = \"200ms\"\nrise = 2\nfall = 2\n",
        list.join(", ")
    )
}

fn state(fg: &Flowgate, name: &str) -> Option<BackendState> {
    fg.pool("p")?.find(name).map(|b| b.state())
}

async fn reload(fg: &Flowgate) {
    let fg = fg.clone();
    tokio::task::spawn_blocking(move || fg.reload())
        .await
        .unwrap()
        .expect("reload");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_backend_goes_down_while_reloads_come_faster_than_probes() {
    let [a, b]: [_; 2] = start_backends(Kind::Identity).await;
    let dir = tempdir::Dir::new();
    let (fg, _path) = start_file(&dir, "flowgate.toml", &config(&[a.addr, b.addr]));
    let up = |n: &str| state(&fg, n) == Some(BackendState::Up);
    assert!(wait_until(Duration::from_secs(10), || up(&a.name) && up(&b.name)).await);

    b.kill();
    // Reload (the same file) every 100 ms, three times per probe interval.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let mut reloads = 0;
    while state(&fg, &b.name) != Some(BackendState::Down) && tokio::time::Instant::now() < deadline
    {
        reload(&fg).await;
        reloads += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        state(&fg, &b.name),
        Some(BackendState::Down),
        "still {:?} after {reloads} reloads",
        state(&fg, &b.name)
    );
    assert!(up(&a.name), "the live backend stays up");
}

/// A backend a reload adds is probed (and comes up on its first success), and
/// the backend that stays keeps its probe: its check count goes on from where it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_probes_new_backends_and_keeps_the_others_going() {
    let [a, b]: [_; 2] = start_backends(Kind::Identity).await;
    let dir = tempdir::Dir::new();
    let (fg, path) = start_file(&dir, "flowgate.toml", &config(&[a.addr]));
    let pool = fg.pool("p").unwrap();
    let kept = pool.find(&a.name).unwrap();
    assert!(wait_until(Duration::from_secs(10), || kept.is_usable()).await);

    std::fs::write(&path, config(&[a.addr, b.addr])).unwrap();
    reload(&fg).await;
    let checks = || {
        kept.stats
            .checks_ok
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    let before = checks();
    assert!(
        wait_until(Duration::from_secs(10), || state(&fg, &b.name)
            == Some(BackendState::Up))
        .await,
        "the added backend comes up"
    );
    assert!(wait_until(Duration::from_secs(10), || checks() > before).await);
    assert!(kept.is_usable());
}
