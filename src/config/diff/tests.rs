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

/// The plan from `BASE` to `new`.
fn plan(new: &str) -> ReloadPlan {
    diff(&parse(BASE), &parse(new))
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

/// The plan of a reload that keeps everything in `BASE`.
fn noop() -> ReloadPlan {
    ReloadPlan {
        listeners: changes(&["web", "dns"], &[], &[]),
        pools: changes(&["app", "spare"], &[], &[]),
        ..ReloadPlan::default()
    }
}

#[test]
fn identical_configs_are_a_noop() {
    let p = plan(BASE);
    assert_eq!(p, noop());
    assert!(p.is_noop());
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
    let p = plan(&new);
    assert_eq!(p, noop());
    assert!(p.is_noop());
}

#[test]
fn listener_added() {
    let new = format!(
        "{BASE}\n[[listeners]]\nname = \"extra\"\nbind = \"127.0.0.1:7001\"\npool = \"spare\"\n"
    );
    let mut want = noop();
    want.listeners = changes(&["web", "dns"], &["extra"], &[]);
    let p = plan(&new);
    assert_eq!(p, want);
    assert!(!p.is_noop());
}

#[test]
fn listener_removed() {
    let new = edit(
        "[[listeners]]\nname = \"dns\"\nbind = \"127.0.0.1:7053\"\nprotocol = \"udp\"\npool = \"app\"\n",
        "",
    );
    let mut want = noop();
    want.listeners = changes(&["web"], &[], &["dns"]);
    assert_eq!(plan(&new), want);
}

#[test]
fn listener_renamed_is_removed_and_added() {
    let mut want = noop();
    want.listeners = changes(&["dns"], &["www"], &["web"]);
    assert_eq!(plan(&edit("name = \"web\"", "name = \"www\"")), want);
}

#[test]
fn bind_changed_is_removed_and_added_under_one_name() {
    let mut want = noop();
    want.listeners = changes(&["dns"], &["web"], &["web"]);
    assert_eq!(plan(&edit("127.0.0.1:7000", "127.0.0.1:7002")), want);
}

#[test]
fn protocol_changed_on_the_same_bind_is_removed_and_added() {
    let new = edit("pool = \"app\"\n", "protocol = \"udp\"\npool = \"app\"\n");
    let mut want = noop();
    want.listeners = changes(&["dns"], &["web"], &["web"]);
    assert_eq!(plan(&new), want);
}

#[test]
fn pool_added() {
    let new = format!(
        "{BASE}\n[[pools]]\nname = \"more\"\nbackends = [{{ address = \"127.0.0.1:9201\" }}]\n"
    );
    let mut want = noop();
    want.pools = changes(&["app", "spare"], &["more"], &[]);
    assert_eq!(plan(&new), want);
}

#[test]
fn pool_removed() {
    let new = edit(
        "[[pools]]\nname = \"spare\"\nbackends = [{ address = \"127.0.0.1:9101\" }]\n",
        "",
    );
    let mut want = noop();
    want.pools = changes(&["app"], &[], &["spare"]);
    assert_eq!(plan(&new), want);
}

#[test]
fn backend_added_in_a_kept_pool() {
    let new = edit(
        "{ address = \"127.0.0.1:9101\" }",
        "{ address = \"127.0.0.1:9101\" }, { address = \"127.0.0.1:9102\" }",
    );
    let mut want = noop();
    want.backends = vec![PoolBackends {
        pool: "spare".into(),
        added: names(&["127.0.0.1:9102"]),
        removed: vec![],
    }];
    assert_eq!(plan(&new), want);
}

#[test]
fn backend_removed_from_a_kept_pool() {
    let new = edit("  { address = \"127.0.0.1:9001\" },\n", "");
    let mut want = noop();
    want.backends = vec![PoolBackends {
        pool: "app".into(),
        added: vec![],
        removed: names(&["127.0.0.1:9001"]),
    }];
    assert_eq!(plan(&new), want);
}

#[test]
fn backend_address_changed_is_removed_and_added() {
    let mut want = noop();
    want.backends = vec![PoolBackends {
        pool: "app".into(),
        added: names(&["127.0.0.1:9003"]),
        removed: names(&["127.0.0.1:9002"]),
    }];
    assert_eq!(plan(&edit("127.0.0.1:9002", "127.0.0.1:9003")), want);
}

#[test]
fn backends_of_added_or_removed_pools_are_not_listed() {
    let new = edit("name = \"spare\"", "name = \"other\"");
    let mut want = noop();
    want.pools = changes(&["app"], &["other"], &["spare"]);
    assert_eq!(plan(&new), want);
}

#[test]
fn weight_change_alone_changes_no_backend() {
    let p = plan(&edit("weight = 2", "weight = 7"));
    assert_eq!(p, noop());
    assert!(p.is_noop());
}

#[test]
fn each_restart_key() {
    let admin = "\n[admin]\nbind = \"127.0.0.1:7100\"\n";
    let with_admin = format!("{BASE}{admin}");
    let cases = [
        (
            BASE.to_string(),
            edit("workers = 2", "workers = 3"),
            RestartKey::Workers,
        ),
        (
            BASE.to_string(),
            edit("workers = 2", "workers = 2\nworker_model = \"shared\""),
            RestartKey::WorkerModel,
        ),
        (
            with_admin.clone(),
            with_admin.replace("7100", "7101"),
            RestartKey::AdminBind,
        ),
        (
            BASE.to_string(),
            edit("workers = 2", "workers = 2\nsplice = false"),
            RestartKey::Splice,
        ),
    ];
    for (old, new, key) in cases {
        let mut want = noop();
        want.restart_only = vec![key];
        let p = diff(&parse(&old), &parse(&new));
        assert_eq!(p, want, "{}", key.key());
        assert!(!p.is_noop());
    }
}

#[test]
fn log_format_needs_a_restart_and_reopens_the_access_log() {
    let new = format!("{BASE}\n[log]\nformat = \"json\"\n");
    let mut want = noop();
    want.restart_only = vec![RestartKey::LogFormat];
    want.access_log_changed = true;
    assert_eq!(plan(&new), want);
}

#[test]
fn restart_keys_come_in_a_fixed_order() {
    let new = edit(
        "workers = 2",
        "workers = 4\nsplice = false\nworker_model = \"shared\"",
    );
    let new = format!("{new}\n[log]\nformat = \"json\"\n");
    assert_eq!(
        plan(&new).restart_only,
        [
            RestartKey::Workers,
            RestartKey::WorkerModel,
            RestartKey::Splice,
            RestartKey::LogFormat
        ]
    );
    let all = [
        RestartKey::Workers,
        RestartKey::WorkerModel,
        RestartKey::AdminBind,
        RestartKey::Splice,
        RestartKey::LogFormat,
    ];
    let keys: Vec<_> = all.iter().map(|k| k.to_string()).collect();
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
    let new = format!("{BASE}\n[log]\naccess_log = \"stdout\"\n");
    let mut want = noop();
    want.access_log_changed = true;
    assert_eq!(plan(&new), want);
}

#[test]
fn log_level_change() {
    let new = format!("{BASE}\n[log]\nlevel = \"debug\"\n");
    let mut want = noop();
    want.log_level_changed = true;
    assert_eq!(plan(&new), want);
}

#[test]
fn admin_added_needs_a_restart_for_bind_and_metrics() {
    let new = format!("{BASE}\n[admin]\nbind = \"127.0.0.1:7100\"\n");
    let mut want = noop();
    want.restart_only = vec![RestartKey::AdminBind];
    want.metrics_need_restart = true;
    assert_eq!(plan(&new), want);
    // Taking [admin] away again is a restart-only change too, but metrics go on.
    let mut back = noop();
    back.restart_only = vec![RestartKey::AdminBind];
    assert_eq!(diff(&parse(&new), &parse(BASE)), back);
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
    let (a, b) = (parse(&config("one")), parse(&config("two")));
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(diff(&a, &a), noop());
    let mut want = noop();
    want.admin_token_changed = true;
    assert_eq!(diff(&a, &b), want);
}
