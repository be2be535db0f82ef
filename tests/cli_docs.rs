//! What the binary says about itself (issue 10, item 20): `--help` covers signals,
//! exit codes and `RUST_LOG`; `flowgate completions SHELL` and `flowgate man` print
//! a completion script and a man page generated from the same definitions.

mod common;

use std::process::Command;

fn run(args: &[&str]) -> (bool, String) {
    let out = Command::new(common::bin())
        .args(args)
        .output()
        .expect("run flowgate");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn help_covers_signals_exit_codes_and_rust_log() {
    let (ok, help) = run(&["--help"]);
    assert!(ok, "{help}");
    for needle in [
        "SIGHUP",
        "SIGUSR1",
        "SIGTERM",
        "Exit codes",
        "RUST_LOG",
        "completions",
        "man",
    ] {
        assert!(help.contains(needle), "{needle} in:\n{help}");
    }
}

#[test]
fn completions_and_man_page_are_generated() {
    let (ok, bash) = run(&["completions", "bash"]);
    assert!(ok && bash.contains("complete -F _flowgate"), "{bash}");
    for shell in ["zsh", "fish"] {
        let (ok, text) = run(&["completions", shell]);
        assert!(
            ok && text.contains("check") && text.contains("run"),
            "{shell}: {text}"
        );
    }
    let (ok, man) = run(&["man"]);
    assert!(ok, "{man}");
    assert!(man.contains(".TH flowgate 1"), "{man}");
    assert!(
        man.contains("SIGHUP"),
        "the man page has the signals too:\n{man}"
    );
    let (ok, _) = run(&["completions", "nosuchshell"]);
    assert!(!ok, "an unknown shell is an error");
}
