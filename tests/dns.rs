//! Backends given by hostname follow their DNS records (issue 13,
//! `resolve_interval`): a real dnsmasq serves the name, flowgate resolves it
//! through the system resolver (its own `/etc/resolv.conf`, bind-mounted in a
//! private mount namespace, so the host's resolver is untouched), and the test
//! changes the record by restarting dnsmasq with a new hosts file. The new address
//! takes new connections, the old one drains without cutting its connection, and a
//! dead resolver keeps the last good address with one warning per episode.

mod common;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;

const DNS: &str = "127.0.83.1";
const NAME: &str = "api.flowgate.test";

/// Whether this machine can run the test: root (mount namespaces, port 53),
/// `unshare` and dnsmasq.
fn can_run() -> bool {
    let root = is_root();
    // A mount namespace can be made here (root in a container without
    // CAP_SYS_ADMIN cannot).
    let unshare = root
        && Command::new("unshare")
            .args(["-m", "true"])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
    unshare && has_tool("dnsmasq")
}

struct Dnsmasq(Child);

impl Dnsmasq {
    /// dnsmasq on DNS:53 answering `NAME` with `ip` (and nothing else).
    fn start(dir: &tempdir::Dir, ip: &str) -> Dnsmasq {
        let hosts = dir.file("hosts", &format!("{ip} {NAME}\n"));
        let child = Command::new("dnsmasq")
            .args([
                "--no-daemon",
                "--keep-in-foreground",
                "--no-resolv",
                "--no-hosts",
                "--bind-interfaces",
                &format!("--listen-address={DNS}"),
                "--port=53",
                "--user=root",
                "--pid-file",
                "--local-ttl=0",
            ])
            .arg(format!("--addn-hosts={}", hosts.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start dnsmasq");
        let d = Dnsmasq(child);
        // Serving once `dig`-free: a UDP query gets an answer.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !answers(ip) {
            assert!(
                std::time::Instant::now() < deadline,
                "dnsmasq never answered"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        d
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Whether the DNS server answers an A query for `NAME` with `ip` (a hand-made
/// query, so the test needs no resolver tool of its own).
fn answers(ip: &str) -> bool {
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut q = vec![0x12, 0x34, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in NAME.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    if sock.send_to(&q, (DNS, 53)).is_err() {
        return false;
    }
    let mut buf = [0u8; 512];
    let Ok(n) = sock.recv(&mut buf) else {
        return false;
    };
    let want: Vec<u8> = ip.split('.').map(|o| o.parse().unwrap()).collect();
    n >= 4 && buf[..n].ends_with(&want)
}

fn spawn(dir: &tempdir::Dir, port: u16) -> Proc {
    let resolv = dir.file("resolv.conf", &format!("nameserver {DNS}\n"));
    // A private mount namespace whose /etc/resolv.conf names dnsmasq.
    let script = format!(
        "mount --bind {} /etc/resolv.conf && exec \"$0\" \"$@\"",
        resolv.display()
    );
    Proc::spawn(
        &listener_and_pool(
            "",
            &format!("{{ address = \"{NAME}:{port}\" }}"),
            "resolve_interval = \"200ms\"\ndrain_timeout = \"600s\"",
        ),
        &["unshare", "-m", "sh", "-c", &script],
    )
}

async fn backends(admin: SocketAddr) -> Vec<serde_json::Value> {
    backends_of(&get_pools(admin).await, "p")
}

/// Waits until the pool's backends (current and removed) are `want`: (name, removed).
async fn backends_become(admin: SocketAddr, want: &[(&str, bool)]) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let now = backends(admin).await;
        let mut got: Vec<(String, bool)> = now
            .iter()
            .map(|b| {
                (
                    b["address"].as_str().unwrap().to_string(),
                    b["removed"].as_bool().unwrap(),
                )
            })
            .collect();
        got.sort();
        let mut w: Vec<(String, bool)> = want.iter().map(|(n, r)| (n.to_string(), *r)).collect();
        w.sort();
        if got == w {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "backends stayed {now:?}, expected {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn hostname_backends_follow_their_records() {
    if !can_run() {
        eprintln!("skipped: needs root, a mount namespace (unshare -m) and dnsmasq");
        return;
    }
    let a = TestBackend::start_on("127.0.83.10:0".parse().unwrap(), Kind::Identity).await;
    let port = a.addr.port();
    let b = TestBackend::start_on(
        SocketAddr::new([127, 0, 83, 11].into(), port),
        Kind::Identity,
    )
    .await;
    let dir = tempdir::Dir::new();
    let dns = Dnsmasq::start(&dir, "127.0.83.10");
    let fg = spawn(&dir, port);
    let (t, admin) = (fg.addr("t"), fg.admin());

    // Resolved at load: one backend per address, named by it, with its hostname.
    let entry = format!("{NAME}:{port}");
    let now = backends(admin).await;
    assert_eq!(now.len(), 1, "{now:?}");
    assert_eq!(now[0]["address"], a.name.as_str());
    assert_eq!(now[0]["hostname"], entry.as_str());
    let (mut held, who) = connect_identity(t).await;
    assert_eq!(who, a.name);

    // The resolver dies: the last good address stays, with one warning.
    drop(dns);
    assert!(
        fg.logged("cannot resolve", Duration::from_secs(30)).await,
        "no warning for the failing resolver:\n{}",
        fg.log()
    );
    // Several more rounds fail (200 ms apart); still one warning.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        fg.log().matches("cannot resolve").count(),
        1,
        "{}",
        fg.log()
    );
    let (_, who) = connect_identity(t).await;
    assert_eq!(who, a.name, "the last good address serves");

    // The record moves: the new address joins, the old one drains.
    let _dns = Dnsmasq::start(&dir, "127.0.83.11");
    backends_become(admin, &[(&b.name, false), (&a.name, true)]).await;
    assert!(
        fg.logged("hostname resolves again", Duration::from_secs(30))
            .await
    );
    assert_eq!(
        fg.log().matches("resolves again").count(),
        1,
        "{}",
        fg.log()
    );
    for _ in 0..5 {
        let (_, who) = connect_identity(t).await;
        assert_eq!(who, b.name, "a new connection went to the old address");
    }
    // The connection on the old address was not cut.
    echo(&mut held, b"again\n")
        .await
        .expect("the drained connection still works");
}
