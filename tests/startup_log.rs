//! The log says which backends are down and why (issue 10, item 20; the README
//! promised it): at startup and after a reload, once the first probes are in, one
//! line per pool and one per backend that takes no connections, including one that
//! never came up.

mod common;

use std::time::Duration;

use common::*;
use nix::sys::signal::Signal;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_and_reload_log_what_is_down_and_why() {
    let live = TestBackend::start(Kind::Identity).await;
    let dead = dead_addr();
    let text = format!(
        "[[listeners]]\nname = \"l\"\nbind = \"127.0.0.1:0\"\npool = \"p\"\n\n\
         [[pools]]\nname = \"p\"\nbackends = [ {{ address = \"{}\" }}, {{ address = \"{dead}\" }} ]\n\
         [pools.health_check]\nkind = \"tcp\"\ninterval = \"500ms\"\ntimeout = \"300ms\"\n",
        live.addr
    );
    let fg = Proc::spawn(&text, &[]);
    let line =
        format!("backend not taking connections pool=p backend={dead} state=down reason=refused");
    assert!(
        fg.logged(&line, Duration::from_secs(10)).await,
        "{}",
        fg.log()
    );
    assert!(
        fg.logged("pool state pool=p up=1 backends=2", Duration::from_secs(10))
            .await,
        "{}",
        fg.log()
    );
    assert!(
        !fg.log()
            .contains(&format!("backend={} state=down", live.addr)),
        "{}",
        fg.log()
    );

    fg.signal(Signal::SIGHUP);
    assert!(
        wait_until(Duration::from_secs(10), || fg.log().matches(&line).count()
            == 2)
        .await,
        "logged again after the reload:\n{}",
        fg.log()
    );
}
