//! The open-files limit (issue 10, item 17): flowgate raises its soft limit to the
//! hard one at startup (systemd's default soft limit is 1024), and says when the
//! configured limits cannot fit.

mod common;

use common::*;

fn text(max_connections: &str) -> String {
    format!(
        "[[listeners]]\nname = \"l\"\nbind = \"127.0.0.1:0\"\npool = \"p\"\n{max_connections}\n\n\
         [[pools]]\nname = \"p\"\nbackends = [ {{ address = \"127.0.0.1:9\" }} ]\n"
    )
}

/// The soft open-files limit of process `pid`.
fn soft_limit(pid: i32) -> u64 {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    line.split_whitespace().nth(3).unwrap().parse().unwrap()
}

#[tokio::test]
async fn the_soft_limit_is_raised_to_the_hard_one_and_the_budget_logged() {
    let fg = Proc::spawn(&text(""), &["prlimit", "--nofile=512:4096", "--"]);
    assert_eq!(soft_limit(fg.pid()), 4096, "{}", fg.log());
    let log = fg.log();
    assert!(log.contains("raised the open-files limit"), "{log}");
    assert!(log.contains("descriptor budget"), "{log}");
}

#[tokio::test]
async fn limits_that_cannot_fit_are_warned_about() {
    let fg = Proc::spawn(
        &text("max_connections = 5000"),
        &["prlimit", "--nofile=1024:1024", "--"],
    );
    let log = fg.log();
    assert!(log.contains("do not fit the open-files limit"), "{log}");
    assert!(log.contains("needed=10000"), "{log}");
}
