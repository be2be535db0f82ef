//! Who holds an address: when startup finds a listener's address taken, the error
//! names the process (Linux: the socket's inode in /proc/net, then the process
//! with that socket among its descriptors). Best effort: without permission to
//! read other processes' descriptors it says nothing.

use std::net::SocketAddr;

/// "pid 1234 (flowgate)" for the process holding `addr` (`udp` or TCP listening).
#[cfg(target_os = "linux")]
pub fn holder(addr: SocketAddr, udp: bool) -> Option<String> {
    let table = match (udp, addr.is_ipv6()) {
        (false, false) => "/proc/net/tcp",
        (false, true) => "/proc/net/tcp6",
        (true, false) => "/proc/net/udp",
        (true, true) => "/proc/net/udp6",
    };
    let text = std::fs::read_to_string(table).ok()?;
    let want_port = format!("{:04X}", addr.port());
    let inodes: Vec<String> = text
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (local, state, inode) = (f.get(1)?, f.get(3)?, f.get(9)?);
            let (ip, port) = local.split_once(':')?;
            let listening = udp || *state == "0A";
            (listening && port == want_port && ip_matches(ip, addr)).then(|| inode.to_string())
        })
        .collect();
    if inodes.is_empty() {
        return None;
    }
    for proc_dir in std::fs::read_dir("/proc").ok()?.flatten() {
        let pid = proc_dir.file_name();
        let Some(pid) = pid
            .to_str()
            .filter(|p| p.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(proc_dir.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(link) = std::fs::read_link(fd.path()) else {
                continue;
            };
            let link = link.to_string_lossy();
            let held = link
                .strip_prefix("socket:[")
                .and_then(|l| l.strip_suffix(']'))
                .is_some_and(|i| inodes.iter().any(|x| x == i));
            if held {
                let comm =
                    std::fs::read_to_string(proc_dir.path().join("comm")).unwrap_or_default();
                return Some(format!("pid {pid} ({})", comm.trim()));
            }
        }
    }
    None
}

#[cfg(not(target_os = "linux"))]
pub fn holder(_addr: SocketAddr, _udp: bool) -> Option<String> {
    None
}

/// Whether the hex address of /proc/net matches `addr` (or is the wildcard, which
/// holds every address of its family).
#[cfg(target_os = "linux")]
fn ip_matches(hex: &str, addr: SocketAddr) -> bool {
    let Ok(bytes) = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2).unwrap_or("zz"), 16))
        .collect::<Result<Vec<u8>, _>>()
    else {
        return false;
    };
    if bytes.iter().all(|&b| b == 0) {
        return true;
    }
    // /proc/net prints each 32-bit word in host (little-endian) order.
    let host_order: Vec<u8> = bytes
        .chunks(4)
        .flat_map(|w| w.iter().rev().copied())
        .collect();
    match addr {
        SocketAddr::V4(a) => host_order == a.ip().octets(),
        SocketAddr::V6(a) => host_order == a.ip().octets(),
    }
}
