//! A pool's `source = "client"` (issue 13, transparent mode): the backend sees the
//! client's own address as the TCP peer (and as the UDP sender). Three network namespaces joined by veth
//! pairs: `client` (10.71.1.2), `lb` (10.71.1.1 towards the client, 10.71.2.1
//! towards the backend; flowgate runs here, with the routing of docs/operations.md)
//! and `backend` (10.71.2.2, default route via lb). The backend is a python3
//! listener that answers each connection with the peer address it sees; the client
//! is python3 too, run in its namespace. Needs root, `ip`, `nft` and python3; skipped (with
//! the reason printed) otherwise.
//!
//! Also: without CAP_NET_ADMIN/CAP_NET_RAW (dropped with `setpriv`) startup fails
//! with exit 1 and the reason, and a reload that adds such a pool is refused; and
//! `check` refuses "client" for pools of http listeners.

mod common;

use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::*;

/// The network namespaces of one run, deleted (with their veths) on drop.
struct Netns {
    client: String,
    lb: String,
    backend: String,
}

fn run(args: &[&str]) -> Output {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `cmd` (one shell line) in namespace `ns`.
fn in_ns(ns: &str, cmd: &str) {
    run(&["ip", "netns", "exec", ns, "sh", "-ec", cmd]);
}

impl Netns {
    fn new() -> Netns {
        let id = std::process::id();
        let n = Netns {
            client: format!("fgt-c-{id}"),
            lb: format!("fgt-lb-{id}"),
            backend: format!("fgt-b-{id}"),
        };
        for ns in [&n.client, &n.lb, &n.backend] {
            run(&["ip", "netns", "add", ns]);
            in_ns(ns, "ip link set lo up");
        }
        // veth names are at most 15 bytes: a short pid-based suffix.
        let (vc, vb) = (format!("fgc{id}"), format!("fgb{id}"));
        in_ns(
            &n.lb,
            &format!(
                "ip link add {vc}a type veth peer name {vc}b netns {c}
                 ip link add {vb}a type veth peer name {vb}b netns {b}
                 ip addr add 10.71.1.1/24 dev {vc}a; ip link set {vc}a up
                 ip addr add 10.71.2.1/24 dev {vb}a; ip link set {vb}a up
                 # docs/operations.md, \"Client address preservation\":
                 ip rule add fwmark 1 lookup 100
                 ip route add local 0.0.0.0/0 dev lo table 100
                 nft add table ip flowgate
                 nft add chain ip flowgate divert '{{ type filter hook prerouting priority mangle; }}'
                 nft add rule ip flowgate divert socket transparent 1 meta mark set 1",
                c = n.client,
                b = n.backend
            ),
        );
        in_ns(
            &n.client,
            &format!("ip addr add 10.71.1.2/24 dev {vc}b; ip link set {vc}b up"),
        );
        in_ns(
            &n.backend,
            &format!(
                "ip addr add 10.71.2.2/24 dev {vb}b; ip link set {vb}b up
                 ip route add default via 10.71.2.1"
            ),
        );
        n
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting a namespace deletes its veth ends, and with them their peers.
        for ns in [&self.client, &self.lb, &self.backend] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// Why this machine cannot run the namespace test, if it cannot.
fn cannot_run() -> Option<String> {
    if !is_root() {
        return Some("not root".into());
    }
    for tool in ["ip", "nft", "python3"] {
        if !has_tool(tool) {
            return Some(format!("no {tool} on PATH"));
        }
    }
    // Root in a container may still lack the right to make namespaces.
    let probe = format!("fgt-probe-{}", std::process::id());
    let made = Command::new("ip")
        .args(["netns", "add", &probe])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !made {
        return Some("ip netns add is not permitted here".into());
    }
    let _ = Command::new("ip").args(["netns", "del", &probe]).status();
    None
}

/// The backend: answers every TCP connection with the peer address it sees, then
/// closes, and every UDP datagram (same port) with its sender's address. A child
/// process in namespace `ns`, killed on drop.
struct Backend(std::process::Child);

impl Backend {
    fn start(ns: &str) -> Backend {
        let script = r#"
import socket, threading
l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(("10.71.2.2", 7000)); l.listen(64)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("10.71.2.2", 7000))
def udp():
    while True:
        _, peer = u.recvfrom(2048)
        u.sendto(peer[0].encode(), peer)
threading.Thread(target=udp, daemon=True).start()
print("ready", flush=True)
while True:
    c, peer = l.accept()
    c.sendall((peer[0] + "\n").encode()); c.close()
"#;
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns, "python3", "-c", script])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        use std::io::BufRead;
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "ready");
        Backend(child)
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// From namespace `ns`: connects to `addr`, sends `first` (a PROXY header, or
/// nothing), and returns what came back.
fn client(ns: &str, addr: std::net::SocketAddr, first: &str) -> String {
    let script = format!(
        r#"
import socket
c = socket.create_connection(("{ip}", {port}), timeout=30)
c.sendall(b"{first}")
out = b""
while True:
    d = c.recv(4096)
    if not d: break
    out += d
print(out.decode().strip())
"#,
        ip = addr.ip(),
        port = addr.port()
    );
    let out = run(&["ip", "netns", "exec", ns, "python3", "-c", &script]);
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// From namespace `ns`: one UDP datagram to `addr`; returns the reply.
fn udp_client(ns: &str, addr: std::net::SocketAddr) -> String {
    let script = format!(
        r#"
import socket
c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); c.settimeout(30)
c.sendto(b"who", ("{ip}", {port}))
print(c.recv(2048).decode())
"#,
        ip = addr.ip(),
        port = addr.port()
    );
    let out = run(&["ip", "netns", "exec", ns, "python3", "-c", &script]);
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn backend_sees_the_client_address() {
    if let Some(why) = cannot_run() {
        eprintln!("skipped: {why}");
        return;
    }
    let ns = Netns::new();
    let _backend = Backend::start(&ns.backend);
    let fg = Proc::spawn(
        r#"
[log]
access_log = "access.log"

[[listeners]]
name = "plain"
bind = "10.71.1.1:0"
pool = "p"

[[listeners]]
name = "behind"
bind = "10.71.1.1:0"
pool = "p"
accept_proxy = "v1"

[[listeners]]
name = "dgram"
bind = "10.71.1.1:0"
protocol = "udp"
pool = "u"

[[pools]]
name = "p"
source = "client"
backends = [ { address = "10.71.2.2:7000" } ]

[[pools]]
name = "u"
source = "client"
backends = [ { address = "10.71.2.2:7000" } ]
"#,
        &["ip", "netns", "exec", &ns.lb],
    );
    let log = fg.log();
    assert!(log.contains("flowgate started"), "{log}");

    // The TCP peer itself.
    assert_eq!(client(&ns.client, fg.addr("plain"), ""), "10.71.1.2");
    // With accept_proxy: the header's address, not the peer's. The backend's reply
    // to 10.71.1.3 never leaves lb: the socket match delivers it to flowgate.
    let header = "PROXY TCP4 10.71.1.3 10.71.1.1 5555 80\\r\\n";
    assert_eq!(client(&ns.client, fg.addr("behind"), header), "10.71.1.3");

    // A udp session's socket too: the backend's reply (to the client's address)
    // reaches flowgate, which relays it.
    assert_eq!(udp_client(&ns.client, fg.addr("dgram")), "10.71.1.2");

    // A client of another family than the backend's (a v6 header here): not sent
    // there, closed as connect_failed; flowgate does not fall back to its own
    // address.
    let header = "PROXY TCP6 2001:db8::7 2001:db8::1 5555 80\\r\\n";
    assert_eq!(client(&ns.client, fg.addr("behind"), header), "");
    let access = fg.dir.0.join("access.log");
    let line = |needle: &str| {
        std::fs::read_to_string(&access)
            .unwrap_or_default()
            .lines()
            .any(|l| l.contains(needle))
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !line("client=[2001:db8::7]:5555") && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = std::fs::read_to_string(&access).unwrap_or_default();
    let l = log
        .lines()
        .find(|l| l.contains("client=[2001:db8::7]:5555"));
    assert!(
        l.is_some_and(|l| l.contains("reason=connect_failed") && l.contains("backend=-")),
        "{log}"
    );
    // The other two, as the backend saw them.
    assert!(line("client=10.71.1.2:"), "{log}");
    assert!(line("client=10.71.1.3:5555"), "{log}");

    // A control: the routing above leaves the host's own connections (health checks
    // among them) alone; one from lb itself is seen from lb's address.
    let own = client(&ns.lb, "10.71.2.2:7000".parse().unwrap(), "");
    assert_eq!(own, "10.71.2.1");
}

const CLIENT_POOL: &str = r#"
[[pools]]
name = "p"
source = "client"
backends = [ { address = "127.0.0.1:9" } ]
"#;

/// `setpriv` dropping CAP_NET_ADMIN and CAP_NET_RAW from what flowgate gets, if
/// this machine can.
fn unprivileged() -> Option<[&'static str; 3]> {
    let pre = [
        "setpriv",
        "--inh-caps=-all",
        "--bounding-set=-net_admin,-net_raw",
    ];
    let ok = Command::new(pre[0])
        .args(&pre[1..])
        .arg("true")
        .status()
        .is_ok_and(|s| s.success());
    ok.then_some(pre)
}

#[tokio::test]
async fn without_the_privilege_startup_fails_and_reload_is_refused() {
    let Some(pre) = unprivileged() else {
        eprintln!("skipped: no setpriv that can drop capabilities here");
        return;
    };
    let mut fg = Proc::spawn(
        &format!(
            "[[listeners]]\nname = \"t\"\nbind = \"127.0.0.1:0\"\npool = \"p\"\n{CLIENT_POOL}"
        ),
        &pre,
    );
    let st = fg.exited(Duration::from_secs(30)).await.expect("exits");
    let log = fg.log();
    assert_eq!(st.code(), Some(1), "{log}");
    assert!(
        log.contains("pool \"p\" has source = \"client\", which needs IP_TRANSPARENT")
            && log.contains("CAP_NET_ADMIN"),
        "{log}"
    );

    // Running without such a pool, then a reload that adds one.
    let plain = "[[listeners]]\nname = \"t\"\nbind = \"127.0.0.1:0\"\npool = \"q\"\n\n[[pools]]\nname = \"q\"\nbackends = [ { address = \"127.0.0.1:9\" } ]\n";
    let fg = Proc::spawn(plain, &pre);
    assert!(fg.log().contains("flowgate started"), "{}", fg.log());
    std::fs::write(
        fg.dir.0.join("flowgate.toml"),
        format!("{plain}{CLIENT_POOL}"),
    )
    .unwrap();
    fg.signal(nix::sys::signal::Signal::SIGHUP);
    assert!(
        fg.logged("reload failed", Duration::from_secs(30)).await,
        "{}",
        fg.log()
    );
    let log = fg.log();
    assert!(log.contains("needs IP_TRANSPARENT"), "{log}");
}

#[test]
fn check_refuses_client_for_http_listeners_only() {
    let dir = tempdir::Dir::new();
    let check = |protocol: &str| {
        let cfg = dir.file(
            "f.toml",
            &format!("[[listeners]]\nname = \"t\"\nbind = \"127.0.0.1:0\"\nprotocol = \"{protocol}\"\npool = \"p\"\n{CLIENT_POOL}"),
        );
        Command::new(bin())
            .args(["check", "--config"])
            .arg(&cfg)
            .output()
            .unwrap()
    };
    let out = check("http");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("source = \"client\", which http listeners cannot use")
            && err.contains("this one is http"),
        "{err}"
    );
    for protocol in ["tcp", "udp"] {
        let out = check(protocol);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{protocol}: {err}");
    }
}
