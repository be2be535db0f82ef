//! Tests of `diff`: each parses two small configs and compares the whole plan.

use std::path::Path;

use super::*;

/// Two listeners (tcp, udp) on one pool, a second pool with no listener.
const BASE: &str = r#"
[runtime]
workers = 2

[[listeners]]
name = "web"
bind = "127.0.0.1:7000"
pool = "app"

[[listeners]]
name = "dns"
bind = "127.0.0.1:7053"
protocol = "udp"
pool = "app"

[[pools]]
name = "app"
backends = [
  { address = "127.0.0.1:9001" },
  { address = "127.0.0.1:9002", weight = 2 },
]

[[pools]]
name = "spare"
backends = [{ address = "127.0.0.1:9101" }]
"#;

fn parse(text: &str) -> Config {
    Config::parse(text, Path::new("t.toml")).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

/// `BASE` with `from` replaced by `to` (which must occur).
fn edit(from: &str, to: &str) -> String {
    assert!(BASE.contains(from), "{from:?} is not in BASE");
    BASE.replacen(from, to, 1)
}

fn names(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn changes(kept: &[&str], added: &[&str], removed: &[&str]) -> Changes {
    Changes {
        kept: names(kept),
        added: names(added),
        removed: names(removed),
    }
}

fn backends(pool: &str, added: &[&str], removed: &[&str]) -> Vec<PoolBackends> {
    vec![PoolBackends {
        pool: pool.into(),
        added: names(added),
        removed: names(removed),
    }]
}

/// The plan of a reload that keeps everything in `BASE`.
fn noop() -> ReloadPlan {
    ReloadPlan {
        listeners: changes(&["web", "dns"], &[], &[]),
        pools: changes(&["app", "spare"], &[], &[]),
        ..ReloadPlan::default()
    }
}

/// Asserts that the plan from `old` to `new` is `noop()` with `change` made to it,
/// and that `is_noop` says so exactly when `change` changed nothing.
fn expect_from(old: &str, new: &str, change: impl FnOnce(&mut ReloadPlan)) {
    let mut want = noop();
    change(&mut want);
    let plan = diff(&parse(old), &parse(new));
    assert_eq!(plan, want, "\n--- old\n{old}\n--- new\n{new}");
    assert_eq!(plan.is_noop(), want == noop(), "{plan:?}");
}

/// `expect_from(BASE, new, change)`.
fn expect(new: &str, change: impl FnOnce(&mut ReloadPlan)) {
    expect_from(BASE, new, change);
}

#[test]
fn identical_configs_are_a_noop() {
    expect(BASE, |_| {});
}

#[test]
fn settings_of_kept_listeners_and_pools_are_not_changes() {
    let new = edit(
        "pool = \"app\"\n",
        "pool = \"spare\"\nidle_timeout = \"5s\"\n",
    )
    .replace(
        "name = \"spare\"\n",
        "name = \"spare\"\nalgorithm = \"random\"\n",
    );
    expect(&new, |_| {});
}

#[test]
fn listener_added() {
    let new = format!(
        "{BASE}\n[[listeners]]\nname = \"extra\"\nbind = \"127.0.0.1:7001\"\npool = \"spare\"\n"
    );
    expect(&new, |p| {
        p.listeners = changes(&["web", "dns"], &["extra"], &[]);
    });
}

#[test]
fn listener_removed() {
    let new = edit(
        "[[listeners]]\nname = \"dns\"\nbind = \"127.0.0.1:7053\"\nprotocol = \"udp\"\npool = \"app\"\n",
        "",
    );
    expect(&new, |p| p.listeners = changes(&["web"], &[], &["dns"]));
}

#[test]
fn listener_renamed_is_removed_and_added() {
    expect(&edit("name = \"web\"", "name = \"www\""), |p| {
        p.listeners = changes(&["dns"], &["www"], &["web"]);
    });
}

#[test]
fn bind_changed_is_removed_and_added_under_one_name() {
    expect(&edit("127.0.0.1:7000", "127.0.0.1:7002"), |p| {
        p.listeners = changes(&["dns"], &["web"], &["web"]);
    });
}

#[test]
fn protocol_changed_on_the_same_bind_is_removed_and_added() {
    let new = edit("pool = \"app\"\n", "protocol = \"udp\"\npool = \"app\"\n");
    expect(&new, |p| {
        p.listeners = changes(&["dns"], &["web"], &["web"])
    });
}

#[test]
fn pool_added() {
    let new = format!(
        "{BASE}\n[[pools]]\nname = \"more\"\nbackends = [{{ address = \"127.0.0.1:9201\" }}]\n"
    );
    expect(&new, |p| {
        p.pools = changes(&["app", "spare"], &["more"], &[])
    });
}

#[test]
fn pool_removed() {
    let new = edit(
        "[[pools]]\nname = \"spare\"\nbackends = [{ address = \"127.0.0.1:9101\" }]\n",
        "",
    );
    expect(&new, |p| p.pools = changes(&["app"], &[], &["spare"]));
}

#[test]
fn backend_added_in_a_kept_pool() {
    let new = edit(
        "{ address = \"127.0.0.1:9101\" }",
        "{ address = \"127.0.0.1:9101\" }, { address = \"127.0.0.1:9102\" }",
    );
    expect(&new, |p| {
        p.backends = backends("spare", &["127.0.0.1:9102"], &[])
    });
}

#[test]
fn backend_removed_from_a_kept_pool() {
    let new = edit("  { address = \"127.0.0.1:9001\" },\n", "");
    expect(&new, |p| {
        p.backends = backends("app", &[], &["127.0.0.1:9001"])
    });
}

#[test]
fn backend_address_changed_is_removed_and_added() {
    expect(&edit("127.0.0.1:9002", "127.0.0.1:9003"), |p| {
        p.backends = backends("app", &["127.0.0.1:9003"], &["127.0.0.1:9002"]);
    });
}

#[test]
fn backends_of_added_or_removed_pools_are_not_listed() {
    expect(&edit("name = \"spare\"", "name = \"other\""), |p| {
        p.pools = changes(&["app"], &["other"], &["spare"]);
    });
}

#[test]
fn weight_change_alone_changes_no_backend() {
    expect(&edit("weight = 2", "weight = 7"), |_| {});
}

#[test]
fn each_restart_key() {
    let with_admin = format!("{BASE}\n[admin]\nbind = \"127.0.0.1:7100\"\n");
    let cases = [
        (
            BASE,
            edit("workers = 2", "workers = 3"),
            RestartKey::Workers,
        ),
        (
            BASE,
            edit("workers = 2", "workers = 2\nworker_model = \"shared\""),
            RestartKey::WorkerModel,
        ),
        (
            &with_admin,
            with_admin.replace("7100", "7101"),
            RestartKey::AdminBind,
        ),
        (
            BASE,
            edit("workers = 2", "workers = 2\nsplice = false"),
            RestartKey::Splice,
        ),
    ];
    for (old, new, key) in cases {
        expect_from(old, &new, |p| p.restart_only = vec![key]);
    }
}

#[test]
fn log_format_needs_a_restart_and_reopens_the_access_log() {
    expect(&format!("{BASE}\n[log]\nformat = \"json\"\n"), |p| {
        p.restart_only = vec![RestartKey::LogFormat];
        p.access_log_changed = true;
    });
}

#[test]
fn restart_keys_come_in_a_fixed_order() {
    let new = edit(
        "workers = 2",
        "workers = 4\nsplice = false\nworker_model = \"shared\"",
    );
    let new = format!("{new}\n[log]\nformat = \"json\"\n");
    use RestartKey::*;
    assert_eq!(
        diff(&parse(BASE), &parse(&new)).restart_only,
        [Workers, WorkerModel, Splice, LogFormat]
    );
    let keys: Vec<_> = [Workers, WorkerModel, AdminBind, Splice, LogFormat]
        .iter()
        .map(|k| k.to_string())
        .collect();
    assert_eq!(
        keys,
        [
            "runtime.workers",
            "runtime.worker_model",
            "admin.bind",
            "runtime.splice",
            "log.format"
        ]
    );
}

#[test]
fn access_log_change() {
    expect(&format!("{BASE}\n[log]\naccess_log = \"stdout\"\n"), |p| {
        p.access_log_changed = true;
    });
}

#[test]
fn log_level_change() {
    expect(&format!("{BASE}\n[log]\nlevel = \"debug\"\n"), |p| {
        p.log_level_changed = true;
    });
}

#[test]
fn admin_added_or_removed_needs_a_restart() {
    let new = format!("{BASE}\n[admin]\nbind = \"127.0.0.1:7100\"\n");
    expect(&new, |p| p.restart_only = vec![RestartKey::AdminBind]);
    // Taking [admin] away again is a restart-only change too. (Whether metrics are
    // on is the running instance's to say, not the plan's.)
    expect_from(&new, BASE, |p| p.restart_only = vec![RestartKey::AdminBind]);
}

#[test]
fn admin_token_change() {
    let dir = std::env::temp_dir().join(format!("flowgate-diff-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = |token: &str| {
        let file = dir.join(format!("{token}.token"));
        std::fs::write(&file, token).unwrap();
        format!(
            "{BASE}\n[admin]\nbind = \"127.0.0.1:7100\"\ntoken_file = {:?}\n",
            file.display().to_string()
        )
    };
    let (one, two) = (config("one"), config("two"));
    expect_from(&one, &one, |_| {});
    expect_from(&one, &two, |p| p.admin_token_changed = true);
    std::fs::remove_dir_all(&dir).unwrap();
}
