//! The access log's file (issue 10, item 19): created 0640, never opened through
//! a symlink.

mod common;

use std::os::unix::fs::PermissionsExt;

use common::*;
use flowgate::{Config, Flowgate};

fn text(log: &std::path::Path) -> String {
    format!(
        "[log]\naccess_log = \"{}\"\n\n\
         [[listeners]]\nname = \"l\"\nbind = \"127.0.0.1:0\"\npool = \"p\"\n\n\
         [[pools]]\nname = \"p\"\nbackends = [ {{ address = \"127.0.0.1:9\" }} ]\n",
        log.display()
    )
}

#[tokio::test]
async fn the_access_log_is_created_0640_and_never_through_a_symlink() {
    let dir = tempdir::Dir::new();
    let log = dir.0.join("access.log");
    let fg = Flowgate::start(Config::parse(&text(&log), &dir.0.join("f.toml")).unwrap())
        .expect("starts");
    let mode = std::fs::metadata(&log).unwrap().permissions().mode() & 0o777;
    // The umask may take bits away, never add them.
    assert_eq!(mode & !0o640, 0, "mode {mode:o}");
    fg.shutdown().await;

    let target = dir.0.join("elsewhere");
    std::fs::write(&target, "precious\n").unwrap();
    let link = dir.0.join("link.log");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let e = Flowgate::start(Config::parse(&text(&link), &dir.0.join("f.toml")).unwrap())
        .expect_err("a symlinked access log is refused")
        .to_string();
    assert!(e.contains("log.access_log: cannot open"), "{e}");
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "precious\n");
}
