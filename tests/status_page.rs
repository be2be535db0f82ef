//! The status page (`GET /` on the admin API, `src/admin/status.html`) in a real
//! browser: the flowgate binary runs with two live backends and a dead address behind
//! a tcp health check, and headless Chromium loads the page and dumps the DOM its
//! JavaScript built from `GET /api/v1/pools`. Every backend must have its row with the
//! right state; after a drain through the API, the drained backend's row must say so.
//!
//! Needs Chromium (`apt-get install -y chromium`; `CHROMIUM=/path` overrides the
//! binary). Without it the test fails, saying so: it never skips. Timeouts are
//! liveness bounds, never assertions about speed.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use common::*;

/// How long something that should happen "soon" may take before the test fails.
const LIVENESS: Duration = Duration::from_secs(20);

/// The Chromium binary: `$CHROMIUM`, else `chromium` on `PATH`, else
/// `/usr/bin/chromium`. Panics with the fix when there is none.
fn chromium() -> PathBuf {
    if let Some(p) = std::env::var_os("CHROMIUM") {
        return PathBuf::from(p);
    }
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("chromium"))
            .find(|p| p.is_file())
    });
    let p = on_path.unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    assert!(
        p.is_file(),
        "the status page test needs headless Chromium, and there is none at {} or on PATH: \
         install it (Debian: apt-get install -y chromium) or set CHROMIUM=/path/to/chromium",
        p.display()
    );
    p
}

/// Loads `url` in a fresh headless Chromium and returns the DOM after the page's
/// scripts had 8 s of virtual time (enough for several 2 s polls; fetches complete
/// in real time while virtual time waits for them).
async fn dump_dom(url: &str) -> String {
    let profile = tempdir::Dir::new();
    let mut cmd = tokio::process::Command::new(chromium());
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
    ])
    .arg(format!("--user-data-dir={}", profile.0.display()))
    .args(["--virtual-time-budget=8000", "--dump-dom", url])
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .kill_on_drop(true);
    let child = cmd.spawn().unwrap_or_else(|e| {
        panic!("cannot run headless Chromium ({e}); install it: apt-get install -y chromium")
    });
    let out = tokio::time::timeout(Duration::from_secs(90), child.wait_with_output())
        .await
        .expect("chromium --dump-dom finished within 90 s")
        .expect("chromium output");
    let dom = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() && dom.contains("</html>"),
        "chromium --dump-dom {url} failed ({}):\nstderr: {}\nstdout: {dom}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    dom
}

/// A backend row of the dumped DOM.
#[derive(Debug)]
struct Row {
    pool: String,
    backend: String,
    state: String,
    /// The row's markup, from `<tr` to `</tr>`.
    html: String,
}

/// The value of attribute `name` in start tag `tag`, HTML entities decoded.
fn attr(tag: &str, name: &str) -> Option<String> {
    let needle = format!(" {name}=\"");
    let start = tag.find(&needle)? + needle.len();
    let len = tag[start..].find('"')?;
    Some(
        tag[start..start + len]
            .replace("&quot;", "\"")
            .replace("&lt;", "<")
            .replace("&gt;", ">")
            .replace("&amp;", "&"),
    )
}

/// Every `<tr>` with class `backend` in `dom`.
fn backend_rows(dom: &str) -> Vec<Row> {
    let mut rows = Vec::new();
    let mut rest = dom;
    while let Some(i) = rest.find("<tr ") {
        rest = &rest[i..];
        let tag_end = rest.find('>').map_or(rest.len(), |e| e + 1);
        let row_end = rest.find("</tr>").map_or(rest.len(), |e| e + "</tr>".len());
        let tag = &rest[..tag_end];
        let classes = attr(tag, "class").unwrap_or_default();
        if classes.split_whitespace().any(|c| c == "backend") {
            rows.push(Row {
                pool: attr(tag, "data-pool").unwrap_or_default(),
                backend: attr(tag, "data-backend").unwrap_or_default(),
                state: attr(tag, "data-state").unwrap_or_default(),
                html: rest[..row_end.max(tag_end)].to_string(),
            });
        }
        rest = &rest[tag_end..];
    }
    rows
}

/// The part of `dom` worth showing in a failure message: `<main>` and the banner.
fn excerpt(dom: &str) -> &str {
    let start = dom.find("<div id=\"banner\"").unwrap_or(0);
    let end = dom[start..]
        .find("<script")
        .map_or(dom.len(), |e| start + e);
    let s = &dom[start..end];
    &s[..s.len().min(20_000)]
}

/// Loads the page until its rows for pool "p" show `want` (backend, state) — a few
/// tries, as a slow machine may not have polled yet — and returns the rows and DOM.
async fn page_shows(admin: SocketAddr, want: &[(&str, &str)]) -> (Vec<Row>, String) {
    let url = format!("http://{admin}/");
    let mut last = String::new();
    for _ in 0..4 {
        let dom = dump_dom(&url).await;
        let rows = backend_rows(&dom);
        let ok = want.iter().all(|(b, st)| {
            rows.iter()
                .any(|r| r.pool == "p" && r.backend == *b && r.state == *st)
        });
        if ok {
            return (rows, dom);
        }
        last = dom;
    }
    panic!(
        "the status page never showed {want:?} as backend rows of pool \"p\"; rows: {:#?}\nDOM:\n{}",
        backend_rows(&last),
        excerpt(&last)
    );
}

/// Asserts that the row of `backend` in pool "p" shows `state`, as its attribute and
/// as visible text, and that it is the only row for that backend.
fn assert_row(rows: &[Row], backend: &str, state: &str) {
    let mine: Vec<_> = rows
        .iter()
        .filter(|r| r.pool == "p" && r.backend == backend)
        .collect();
    assert_eq!(mine.len(), 1, "one row for {backend}: {rows:#?}");
    let r = mine[0];
    assert_eq!(r.state, state, "{r:#?}");
    assert!(
        r.html.contains(&format!(">{state}</span>")),
        "the row shows its state as text: {r:#?}"
    );
    assert!(
        r.html.contains(backend),
        "the row shows its address: {r:#?}"
    );
}

/// Waits until GET /api/v1/pools reports `state` for `backend` in pool "p".
async fn api_state(admin: SocketAddr, backend: &str, state: &str) {
    let deadline = tokio::time::Instant::now() + LIVENESS;
    loop {
        let pools = get_pools(admin).await;
        let e = backend_entries(&pools, "p", backend);
        if e.len() == 1 && e[0]["state"] == state {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the API never showed {backend} as {state}: {pools}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The admin API's address, from the binary's "admin API listening addr=Some(...)".
fn admin_addr(fg: &Proc) -> SocketAddr {
    let log = fg.log();
    let line = log
        .lines()
        .find(|l| l.contains("admin API listening"))
        .unwrap_or_else(|| panic!("no admin API line in the log:\n{log}"));
    let rest = &line[line.find("addr=").expect("addr= in the admin line") + "addr=".len()..];
    let rest = rest.strip_prefix("Some(").unwrap_or(rest);
    rest.split([')', ' '])
        .next()
        .unwrap()
        .parse()
        .unwrap_or_else(|e| panic!("admin address in {line:?}: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_shows_backend_states_and_a_drain() {
    chromium(); // fail first, and clearly, without a browser
    let [a, b]: [TestBackend; 2] = start_backends(Kind::Identity).await;
    let dead = dead_addr().to_string();
    let toml = format!(
        r#"
[runtime]
workers = 2
[admin]
bind = "127.0.0.1:0"
[[listeners]]
name = "l"
bind = "127.0.0.1:0"
pool = "p"
[[pools]]
name = "p"
algorithm = "round-robin"
drain_timeout = "120s"
backends = [ {{ address = "{}" }}, {{ address = "{}" }}, {{ address = "{dead}" }} ]
[pools.health_check]
kind = "tcp"
interval = "200ms"
timeout = "200ms"
rise = 1
fall = 1
"#,
        a.name, b.name
    );
    let fg = Proc::spawn(&toml, &[]);
    let admin = admin_addr(&fg);
    for (addr, state) in [(&a.name, "up"), (&b.name, "up"), (&dead, "down")] {
        api_state(admin, addr, state).await;
    }

    let (rows, dom) = page_shows(admin, &[(&a.name, "up"), (&b.name, "up"), (&dead, "down")]).await;
    assert_eq!(rows.len(), 3, "three backend rows: {rows:#?}");
    assert_row(&rows, &a.name, "up");
    assert_row(&rows, &b.name, "up");
    assert_row(&rows, &dead, "down");
    assert!(
        dom.contains("data-listener=\"l\""),
        "the listener has its row:\n{}",
        excerpt(&dom)
    );
    assert!(
        dom.contains("updated "),
        "the header says when the data was fetched:\n{}",
        excerpt(&dom)
    );
    let banner = &dom[dom.find("id=\"banner\"").expect("an error banner element")..];
    assert!(
        banner[..banner.find('>').unwrap()].contains("hidden"),
        "no error banner while the API answers:\n{}",
        excerpt(&dom)
    );

    let r = post_action(admin, &a.name, "drain", false).await;
    assert_eq!(r.status, 200, "{r:?}");
    api_state(admin, &a.name, "draining").await;

    let (rows, _) = page_shows(
        admin,
        &[(&a.name, "draining"), (&b.name, "up"), (&dead, "down")],
    )
    .await;
    assert_eq!(rows.len(), 3, "three backend rows: {rows:#?}");
    assert_row(&rows, &a.name, "draining");
    assert_row(&rows, &b.name, "up");
    assert_row(&rows, &dead, "down");
}

/// The page is one self-contained file: served as HTML, with nothing it would fetch
/// from elsewhere (scripts, styles, fonts, images), so it works air-gapped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_is_self_contained_html() {
    let a = TestBackend::start(Kind::Identity).await;
    let fg = start(
        &(config("round-robin", &[(a.addr, 1)], "", "") + "\n[admin]\nbind = \"127.0.0.1:0\"\n"),
    );
    let admin = fg.admin_addr().expect("admin API bound");
    // -i: the reply's head, then the page.
    let r = curl_with(admin, "GET", "/", None, None, &["-i"]).await;
    assert_eq!(r.status, 200, "{r:?}");
    let (head, page) = r.text.split_once("\r\n\r\n").expect("a head and a body");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/html"),
        "{head}"
    );
    let page = page.to_ascii_lowercase();
    assert!(page.starts_with("<!doctype html>"), "{page:.200}");
    // The SVG namespace is an identifier, not something fetched.
    let page = page.replace("http://www.w3.org/2000/svg", "");
    for bad in [
        "<link", " src=", "@import", "url(", "https://", "http://", "//",
    ] {
        if bad == "//" {
            // Only as a protocol-relative reference in an attribute.
            for q in ["=\"//", "='//"] {
                assert!(
                    !page.contains(q),
                    "the page refers to an external asset ({q:?})"
                );
            }
        } else {
            assert!(
                !page.contains(bad),
                "the page refers to an external asset ({bad:?})"
            );
        }
    }
    assert!(
        page.contains("api/v1/pools"),
        "the page polls the pools API"
    );
}

/// A least-load pool's rows show each backend's score and its inputs (issue 14):
/// without a load report, "no fresh report".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_shows_least_load_scores() {
    chromium();
    let [a, b]: [TestBackend; 2] = start_backends(Kind::Identity).await;
    let fg = Proc::spawn(
        &listener_and_pool(
            "",
            &format!(
                "{{ address = \"{}\" }}, {{ address = \"{}\" }}",
                a.addr, b.addr
            ),
            "algorithm = \"least-load\"",
        ),
        &[],
    );
    let dom = dump_dom(&format!("http://{}/", fg.admin())).await;
    let rows = backend_rows(&dom);
    assert_eq!(rows.len(), 2, "{}", excerpt(&dom));
    for r in &rows {
        assert!(
            r.html.contains("data-load-score=") && r.html.contains("no fresh report"),
            "{}",
            r.html
        );
    }
}
