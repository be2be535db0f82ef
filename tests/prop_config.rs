//! Property tests of the config parser: whatever the file holds, `Config::parse`
//! returns a config or an error that says where the problem is, and never panics.
//!
//! Two kinds of input: arbitrary bytes, and "TOML-ish" text assembled from lines of
//! a valid config, then mangled (characters inserted, deleted or replaced, lines
//! duplicated or dropped), which reaches the validation past the TOML parser.

use std::path::{Path, PathBuf};

use flowgate::config::{Config, ConfigError};
use proptest::prelude::*;

/// A valid config, one line per fragment; in this order they parse.
const LINES: &[&str] = &[
    "[runtime]",
    "workers = 2",
    "worker_model = \"shared\"",
    "shutdown_timeout = \"30s\"",
    "splice = false",
    "[log]",
    "level = \"debug\"",
    "format = \"json\"",
    "access_log = \"udp://127.0.0.1:514\"",
    "syslog_facility = \"local3\"",
    "[admin]",
    "bind = \"127.0.0.1:0\"",
    "[[listeners]]",
    "name = \"web\"",
    "bind = \"127.0.0.1:7000\"",
    "protocol = \"tcp\"",
    "pool = \"gpu\"",
    "connect_timeout = \"3s\"",
    "idle_timeout = \"350s\"",
    "max_connections = 10000",
    "backlog = 128",
    "accept_proxy = \"v2\"",
    "proxy_trusted = [\"10.0.0.0/8\", \"::1\"]",
    "proxy_header_timeout = \"3s\"",
    "[[listeners]]",
    "name = \"dns\"",
    "bind = \"[::1]:7053\"",
    "protocol = \"udp\"",
    "pool = \"gpu\"",
    "max_sessions = 100",
    "max_sessions_per_source = 10",
    "responses = 1",
    "[[pools]]",
    "name = \"gpu\"",
    "algorithm = \"round-robin\"",
    "connect_attempts = 3",
    "drain_timeout = \"10s\"",
    "slow_start = \"5s\"",
    "when_all_down = \"fail-open\"",
    "backends = [",
    "  { address = \"127.0.0.1:9001\", weight = 2 },",
    "  { address = \"[::1]:9002\" },",
    "]",
    "[pools.health_check]",
    "kind = \"http\"",
    "interval = \"2s\"",
    "timeout = \"1s\"",
    "rise = 2",
    "fall = 3",
    "port = 8080",
    "path = \"/healthz\"",
    "expect_status = \"200-299,304\"",
    "host = \"example.test\"",
    "[pools.passive]",
    "consecutive_failures = 5",
    "eject_for = \"30s\"",
];

/// Characters that change the structure of TOML when inserted.
const PUNCT: &[char] = &[
    '[', ']', '{', '}', '"', '\'', '=', ',', '.', ':', '#', '\n', ' ', '-', '0', '9', 'x', '\\',
    'é',
];

const FILE: &str = "t.toml";

/// Checks what every parse result must satisfy and returns the error's rendering.
/// An error names the file, a 1-based line and column inside `text`, and a key path;
/// it renders as `FILE:LINE:COLUMN: PATH: MESSAGE`.
fn check(text: &str, result: &Result<Config, ConfigError>) -> Result<(), TestCaseError> {
    let e = match result {
        Ok(_) => return Ok(()),
        Err(e) => e,
    };
    let ConfigError::Invalid {
        file,
        line,
        column,
        path,
        message,
    } = e
    else {
        return Err(TestCaseError::fail(format!(
            "parse gave a non-positional error: {e}"
        )));
    };
    prop_assert_eq!(file, Path::new(FILE));
    let lines: Vec<&str> = text.split('\n').collect();
    prop_assert!(
        (1..=lines.len()).contains(line),
        "line {} outside 1..={}: {}",
        line,
        lines.len(),
        e
    );
    let width = lines[line - 1].len();
    prop_assert!(
        (1..=width + 1).contains(column),
        "column {} outside 1..={} of line {}: {}",
        column,
        width + 1,
        line,
        e
    );
    prop_assert!(!path.is_empty(), "empty key path: {}", e);
    // `message` may be empty: see `syntax_errors_say_what_is_wrong` below.
    prop_assert_eq!(
        e.to_string(),
        format!("{FILE}:{line}:{column}: {path}: {message}")
    );
    Ok(())
}

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(text, Path::new(FILE))
}

/// One edit of the assembled text, at a position taken modulo its length.
#[derive(Debug, Clone)]
enum Edit {
    Insert(usize, char),
    Delete(usize),
    Replace(usize, char),
    /// Cut everything from here on.
    Truncate(usize),
}

fn edit() -> impl Strategy<Value = Edit> {
    let at = any::<usize>();
    let ch = prop::sample::select(PUNCT);
    prop_oneof![
        (at, ch.clone()).prop_map(|(i, c)| Edit::Insert(i, c)),
        at.prop_map(Edit::Delete),
        (at, ch).prop_map(|(i, c)| Edit::Replace(i, c)),
        at.prop_map(Edit::Truncate),
    ]
}

/// Applies `edits` on char boundaries, so the result stays a `String`.
fn apply(text: &str, edits: &[Edit]) -> String {
    let mut chars: Vec<char> = text.chars().collect();
    for e in edits {
        let n = chars.len();
        match *e {
            Edit::Insert(i, c) => chars.insert(i % (n + 1), c),
            Edit::Delete(i) if n > 0 => {
                chars.remove(i % n);
            }
            Edit::Replace(i, c) if n > 0 => chars[i % n] = c,
            Edit::Truncate(i) => chars.truncate(i % (n + 1)),
            _ => {}
        }
    }
    chars.into_iter().collect()
}

/// Lines of `LINES` in order, maybe one dropped and one repeated (a repeated key is
/// a TOML error, so not often), some values moved to another key, then mangled.
fn tomlish() -> impl Strategy<Value = String> {
    let line = || 0..LINES.len();
    let drop = prop::option::weighted(0.3, line());
    let repeat = prop::option::weighted(0.2, line());
    let moves = prop::collection::vec((line(), line()), 0..3);
    let edits = prop::collection::vec(edit(), 0..3);
    (drop, repeat, moves, edits).prop_map(|(drop, repeat, moves, edits)| {
        let mut lines: Vec<String> = LINES.iter().map(|l| l.to_string()).collect();
        // `key = value` of line `to` takes the value of line `from`.
        for (from, to) in moves {
            if let (Some((_, v)), Some((k, _))) =
                (LINES[from].split_once(" = "), LINES[to].split_once(" = "))
            {
                lines[to] = format!("{k} = {v}");
            }
        }
        if let Some(i) = repeat {
            lines.insert(i, lines[i].clone());
        }
        if let Some(i) = drop {
            lines.remove(i);
        }
        apply(&lines.join("\n"), &edits)
    })
}

/// A scratch directory, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Scratch {
        let p = std::env::temp_dir().join(format!("flowgate-prop-config-{}", std::process::id()));
        std::fs::create_dir_all(&p).unwrap();
        Scratch(p)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn the_fragments_in_order_are_a_valid_config() {
    let text = LINES.join("\n");
    if let Err(e) = parse(&text) {
        panic!("{e}");
    }
}

/// Some TOML syntax errors reach the user with no description at all, only the
/// position: toml 0.8's `Error::message()` is empty for them (its `Display` shows
/// only the source excerpt). Found by the properties below; kept as a reproduction.
#[test]
#[ignore = "known gap: toml gives these syntax errors an empty message"]
fn syntax_errors_say_what_is_wrong() {
    for text in ["#\0", "splice =", "[runtime]\nsplice ="] {
        let e = parse(text).map(|_| ()).unwrap_err().to_string();
        assert!(!e.ends_with(": "), "{text:?}: {e:?}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    #[test]
    fn any_text_gives_a_config_or_a_positioned_error(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let text = String::from_utf8_lossy(&bytes);
        check(&text, &parse(&text))?;
    }

    #[test]
    fn mangled_config_gives_a_config_or_a_positioned_error(text in tomlish()) {
        check(&text, &parse(&text))?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Through a file: bytes that are not UTF-8 are a read error naming the file; the
    /// rest behaves exactly like `parse`.
    #[test]
    fn any_file_gives_a_config_or_an_error_naming_it(
        text in tomlish(),
        junk in prop::collection::vec(any::<u8>(), 0..4),
        at in any::<usize>(),
    ) {
        let dir = Scratch::new();
        let path = dir.0.join("flowgate.toml");
        let mut bytes = text.into_bytes();
        let i = at % (bytes.len() + 1);
        bytes.splice(i..i, junk);
        std::fs::write(&path, &bytes).unwrap();
        match (std::str::from_utf8(&bytes), Config::load(&path)) {
            (Err(_), Err(ConfigError::Read { file, source })) => {
                prop_assert_eq!(&file, &path);
                prop_assert_eq!(source.kind(), std::io::ErrorKind::InvalidData);
                let shown = ConfigError::Read { file, source }.to_string();
                prop_assert!(shown.starts_with(&format!("{}: cannot read: ", path.display())), "{}", shown);
            }
            (Err(_), other) => {
                return Err(TestCaseError::fail(format!("non-UTF-8 file gave {other:?}")));
            }
            (Ok(text), Ok(c)) => {
                prop_assert_eq!(c.source.as_deref(), Some(path.as_path()));
                prop_assert!(parse(text).is_ok());
            }
            (Ok(text), Err(e)) => {
                // Same error as parse, with the real file name.
                let expected = parse(text).map(|_| ()).unwrap_err().to_string();
                let shown = e.to_string();
                prop_assert_eq!(shown.strip_prefix(&path.display().to_string()), expected.strip_prefix(FILE));
            }
        }
    }
}

/// The longest duration any key takes (documented in docs/configuration.md).
const MAX_DURATION: std::time::Duration = std::time::Duration::from_secs(365 * 24 * 3600);

/// A number or duration far past any sensible bound, for key `line` of `LINES`.
fn huge_value() -> impl Strategy<Value = String> {
    prop_oneof![
        (1u64 << 20..u64::MAX).prop_map(|n| n.to_string()),
        (1u64..1 << 40).prop_map(|n| format!("\"{n}y\"")),
        (1u64 << 20..1 << 50).prop_map(|n| format!("\"{n}s\"")),
        (1u64 << 20..1 << 50).prop_map(|n| format!("\"{n}ms\"")),
    ]
}

/// Whether every number and duration of `c` is within its documented bound: what
/// `check` accepts, `run` can start with (issue 10: `workers = 100000000000`
/// passed `check` and panicked `run`).
fn within_bounds(c: &Config) -> bool {
    let d_ok = |d: std::time::Duration| d <= MAX_DURATION;
    c.runtime.workers <= 1024
        && d_ok(c.runtime.shutdown_timeout)
        && c.listeners.iter().all(|l| {
            d_ok(l.connect_timeout)
                && d_ok(l.idle_timeout)
                && l.max_connections.is_none_or(|m| m <= 16 << 20)
                && l.max_sessions.is_none_or(|m| m <= 16 << 20)
                && l.max_sessions_per_source.is_none_or(|m| m <= 16 << 20)
                && l.responses <= 1 << 20
                && l.backlog <= 1 << 20
                && l.accept_proxy
                    .as_ref()
                    .is_none_or(|a| d_ok(a.header_timeout) && !a.header_timeout.is_zero())
        })
        && c.pools.iter().all(|p| {
            d_ok(p.drain_timeout)
                && d_ok(p.slow_start)
                && p.connect_attempts <= 32
                && p.health_check.as_ref().is_none_or(|h| {
                    d_ok(h.interval) && d_ok(h.timeout) && h.rise <= 100 && h.fall <= 100
                })
                && p.passive.as_ref().is_none_or(|v| d_ok(v.eject_for))
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Any number or duration key set to a huge value: a positioned error, or a
    /// config within every documented bound.
    #[test]
    fn huge_numbers_and_durations_are_refused_or_within_bounds(
        line in 0..LINES.len(),
        value in huge_value(),
    ) {
        let Some((key, _)) = LINES[line].split_once(" = ") else {
            return Ok(());
        };
        let mut lines: Vec<String> = LINES.iter().map(|l| l.to_string()).collect();
        lines[line] = format!("{key} = {value}");
        let text = lines.join("\n");
        let result = parse(&text);
        check(&text, &result)?;
        if let Ok(c) = &result {
            prop_assert!(within_bounds(c), "{key} = {value} passed: {c:?}");
        }
    }
}
