//! Sending datagrams without queueing them, both ways: runs of same-size datagrams
//! from one client as one `sendmsg` with `UDP_SEGMENT` (GSO, Linux), or one send
//! each; and telling a backend that cannot be reached from trouble with one datagram.
//!
//! Nothing here waits: a datagram the socket will not take now is the caller's to
//! drop and count.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;

#[cfg(target_os = "linux")]
use tracing::warn;

use tokio::net::UdpSocket;

/// Datagrams one run may hold: a receive batch.
#[cfg(target_os = "linux")]
pub(super) const MAX_RUN: usize = super::BATCH;
#[cfg(not(target_os = "linux"))]
pub(super) const MAX_RUN: usize = 1;

/// How many datagrams at the start of `batch` go out as one run: same client, all
/// the size of the first but the last (which may be shorter), at most 64 KiB in
/// all, none empty. What UDP GSO can send as one buffer.
pub(super) fn run_len(batch: &[(&[u8], SocketAddr)]) -> usize {
    let (first, client) = (batch[0].0.len(), batch[0].1);
    if first == 0 {
        return 1;
    }
    let mut total = first;
    let mut n = 1;
    while n < batch.len().min(MAX_RUN) {
        let (d, c) = batch[n];
        if c != client || d.is_empty() || d.len() > first || total + d.len() > 65_507 {
            break;
        }
        total += d.len();
        n += 1;
        if d.len() < first {
            break;
        }
    }
    n
}

/// Calls `f` with each run of `batch` (see [`run_len`]): the run's datagrams and the
/// address they share.
pub(super) fn for_each_run(batch: &[(&[u8], SocketAddr)], mut f: impl FnMut(&[&[u8]], SocketAddr)) {
    let mut i = 0;
    while i < batch.len() {
        let n = run_len(&batch[i..]);
        let mut run = [&[][..]; MAX_RUN];
        for (k, (d, _)) in batch[i..i + n].iter().enumerate() {
            run[k] = d;
        }
        f(&run[..n], batch[i].1);
        i += n;
    }
}

/// Sends a run (see [`run_len`]) now, on a connected socket (`to` = `None`) or to
/// `to`: one sendmsg with UDP_SEGMENT, the kernel cutting it into the datagrams
/// (Linux, while `gso` holds), or one send each. `gso` is the listener's: the first
/// send that finds GSO unsupported turns it off for good.
/// Returns how many went, and the error that stopped the rest.
pub(super) fn send_run(
    s: &UdpSocket,
    run: &[&[u8]],
    to: Option<SocketAddr>,
    gso: &AtomicBool,
) -> (usize, Option<io::Error>) {
    #[cfg(target_os = "linux")]
    if run.len() > 1 && gso.load(std::sync::atomic::Ordering::Relaxed) {
        use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags, SockaddrStorage};
        use std::os::fd::AsRawFd;
        use std::sync::atomic::Ordering::Relaxed;
        let seg = run[0].len() as u16;
        let mut iov = [std::io::IoSlice::new(&[]); MAX_RUN];
        for (k, d) in run.iter().enumerate() {
            iov[k] = std::io::IoSlice::new(d);
        }
        let cmsg = [ControlMessage::UdpGsoSegments(&seg)];
        let dest = to.map(SockaddrStorage::from);
        match sendmsg::<SockaddrStorage>(
            s.as_raw_fd(),
            &iov[..run.len()],
            &cmsg,
            MsgFlags::MSG_DONTWAIT,
            dest.as_ref(),
        ) {
            // All or nothing: the kernel takes the whole buffer or none of it.
            Ok(_) => return (run.len(), None),
            // No GSO here (kernel or device): never again on this listener.
            Err(e @ (nix::Error::EIO | nix::Error::EOPNOTSUPP | nix::Error::ENOPROTOOPT)) => {
                if gso.swap(false, Relaxed) {
                    warn!(error = %e, "UDP GSO is not available; sending datagrams one by one");
                }
            }
            // This run does not fit (a segment over the path MTU, say): send it
            // datagram by datagram; the next run may well fit.
            Err(nix::Error::EINVAL | nix::Error::EMSGSIZE) => {}
            Err(e) => return (0, Some(e.into())),
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = gso; // No UDP GSO off Linux.
    for (k, d) in run.iter().enumerate() {
        let r = match to {
            None => send(s, d),
            Some(to) => send_to(s, d, to),
        };
        if let Err(e) = r {
            return (k, Some(e));
        }
    }
    (run.len(), None)
}

/// Whether a socket error says the backend cannot be reached (ICMP port or host
/// unreachable), as opposed to trouble with one datagram.
pub(super) fn unreachable(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(nix::libc::ECONNREFUSED | nix::libc::EHOSTUNREACH | nix::libc::ENETUNREACH)
    )
}

/// Sends on a connected socket now, or fails with `WouldBlock`. A direct syscall:
/// tokio's `try_send` would refuse until it has seen the socket writable once, and
/// a datagram that cannot go now is dropped (and counted) anyway, never queued.
fn send(s: &UdpSocket, data: &[u8]) -> io::Result<usize> {
    socket2::SockRef::from(s).send(data)
}

/// Sends a reply to `to` from the listener's socket now (see [`send`]).
fn send_to(s: &UdpSocket, data: &[u8], to: SocketAddr) -> io::Result<usize> {
    socket2::SockRef::from(s).send_to(data, &to.into())
}
