//! Reading a UDP socket a batch at a time: `recvmmsg` on Linux (one datagram per
//! call elsewhere), with what the kernel dropped on the socket for a full receive
//! buffer from the same call. What a read keeps per socket is a [`RecvState`]. The
//! listener's receive loop (recv.rs) and each session's reply path (replies.rs)
//! read their sockets through [`recv_batch`].

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicBool, AtomicU32};

use tokio::net::UdpSocket;

#[cfg(not(target_os = "linux"))]
use super::RECV_BUF;

#[cfg(not(target_os = "linux"))]
thread_local! {
    /// Where a datagram is received when there is no recvmmsg.
    static BUF: std::cell::RefCell<Box<[u8]>> =
        std::cell::RefCell::new(vec![0; RECV_BUF].into_boxed_slice());
}

/// What [`recv_batch`] keeps for one socket (a listener's, a session's): its
/// address family, and the datagrams the kernel dropped on it because its receive
/// buffer was full. With SO_RXQ_OVFL ([`report_drops`], Linux) every datagram
/// queued after the socket's first drop carries the socket's drops so far, a
/// wrapping `u32`; the difference from the last one seen is what was lost in
/// between. Only the task that receives on the socket touches it (atomics because
/// the socket's owner is shared).
#[derive(Debug)]
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
pub(super) struct RecvState {
    /// An IPv6 socket: read on the headers kept for IPv6 (see `mmsg::Headers`).
    v6: bool,
    /// The socket has dropped: its datagrams carry the count now, and are received
    /// with room for it.
    counting: AtomicBool,
    /// The count as last seen.
    last: AtomicU32,
}

#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
impl RecvState {
    /// For a socket of `addr`'s family.
    pub(super) fn new(addr: SocketAddr) -> RecvState {
        RecvState {
            v6: addr.is_ipv6(),
            counting: AtomicBool::new(false),
            last: AtomicU32::new(0),
        }
    }

    /// Datagrams dropped since the count was last seen, given the newest count.
    fn since(&self, count: u32) -> u64 {
        u64::from(count.wrapping_sub(self.last.swap(count, Relaxed)))
    }
}

/// Asks the kernel to say, with each datagram it queues on `socket`, how many it
/// dropped (SO_RXQ_OVFL; Linux only). Best effort: without it those drops are not
/// counted, as before.
pub(super) fn report_drops(socket: &socket2::Socket) {
    #[cfg(target_os = "linux")]
    let _ = nix::sys::socket::setsockopt(socket, nix::sys::socket::sockopt::RxqOvfl, &1);
    #[cfg(not(target_os = "linux"))]
    let _ = socket;
}

/// Receives what is queued on `socket` without blocking, up to a batch, and calls
/// `f` with the datagrams and how many the kernel dropped on `socket` since the
/// last call (as far as `rx` can tell; 0 where it cannot). `WouldBlock` when
/// nothing was queued.
#[cfg(target_os = "linux")]
pub(super) fn recv_batch(
    socket: &UdpSocket,
    rx: &RecvState,
    f: impl FnOnce(&[(&[u8], SocketAddr)], u64),
) -> io::Result<usize> {
    use std::os::fd::AsRawFd;
    mmsg::recv(socket.as_raw_fd(), rx, f)
}

#[cfg(not(target_os = "linux"))]
pub(super) fn recv_batch(
    socket: &UdpSocket,
    _rx: &RecvState,
    f: impl FnOnce(&[(&[u8], SocketAddr)], u64),
) -> io::Result<usize> {
    BUF.with_borrow_mut(|buf| {
        let (n, from) = socket.try_recv_from(buf)?;
        f(&[(&buf[..n], from)], 0);
        Ok(1)
    })
}

/// [`recv_batch`], and a batch shorter than a full one says the socket is drained:
/// that is reported as `WouldBlock` too, after `f` ran, so that tokio's `try_io`
/// clears the readiness without one more recvmmsg that would only find EAGAIN
/// (issue 12). Safe: tokio clears it only if no readiness event came since the
/// one this call started from, and a datagram queued after the short batch brings
/// a new edge. (Elsewhere one datagram per call says nothing: no such shortcut.)
pub(super) fn recv_drain(
    socket: &UdpSocket,
    rx: &RecvState,
    f: impl FnOnce(&[(&[u8], SocketAddr)], u64),
) -> io::Result<usize> {
    let n = recv_batch(socket, rx, f)?;
    crate::proxy::busy::note_work();
    if cfg!(target_os = "linux") && n < super::BATCH {
        return Err(io::ErrorKind::WouldBlock.into());
    }
    Ok(n)
}

/// recvmmsg(2): one syscall for up to [`mmsg::BATCH`] datagrams (Linux), with the
/// socket's drop count ([`RecvState`]) from the same call.
#[cfg(target_os = "linux")]
mod mmsg {
    use std::cell::RefCell;
    use std::io::{self, IoSliceMut};
    use std::net::SocketAddr;
    use std::os::fd::RawFd;
    use std::sync::atomic::Ordering::Relaxed;

    use nix::cmsg_space;
    use nix::sys::socket::{
        recvmmsg, ControlMessageOwned, MsgFlags, MultiHeaders, SockaddrStorage,
    };

    pub(super) use super::super::BATCH;
    use super::super::RECV_BUF;
    use super::RecvState;

    /// Headers are reused from call to call, and the kernel leaves in each the room
    /// it used, for the sender's address and for control messages (nix 0.29
    /// restores neither; nix-rust/nix PR 2813). Hence:
    ///
    /// - Headers per address family: after an IPv4 sender (16 bytes) an IPv6 one
    ///   (28) would be cut short, keeping the low half of an earlier address.
    /// - Room for the drop count survives only in headers whose every datagram
    ///   carried one. That holds for a socket that has dropped (each datagram
    ///   queued since carries its count), not for one that has not. So a socket
    ///   starts on `plain`, which has no room; a datagram that comes back
    ///   MSG_CTRUNC had a count that did not fit (the socket has dropped), and its
    ///   socket moves to `counted` for good.
    struct Headers {
        plain: MultiHeaders<SockaddrStorage>,
        /// Made on the first drop seen on this thread, remade (an allocation) only
        /// if one of its headers lost its room: a datagram with no count, which
        /// only a count that wrapped to 0 brings.
        counted: Option<MultiHeaders<SockaddrStorage>>,
    }

    struct Batch {
        /// IPv4, IPv6.
        headers: [Headers; 2],
        /// `BATCH` slots of `RECV_BUF` bytes: any datagram fits whole.
        buf: Box<[u8]>,
    }

    thread_local! {
        /// Per worker thread: the headers hold raw pointers and cannot move between
        /// threads, and a batch never outlives one call.
        static STATE: RefCell<Batch> = RefCell::new(Batch {
            headers: std::array::from_fn(|_| Headers {
                plain: MultiHeaders::preallocate(BATCH, None),
                counted: None,
            }),
            buf: vec![0; BATCH * RECV_BUF].into_boxed_slice(),
        });
    }

    fn to_std(a: &SockaddrStorage) -> Option<SocketAddr> {
        if let Some(v4) = a.as_sockaddr_in() {
            return Some(SocketAddr::V4((*v4).into()));
        }
        a.as_sockaddr_in6().map(|v6| SocketAddr::V6((*v6).into()))
    }

    pub fn recv(
        fd: RawFd,
        rx: &RecvState,
        f: impl FnOnce(&[(&[u8], SocketAddr)], u64),
    ) -> io::Result<usize> {
        STATE.with_borrow_mut(|st| {
            let counting = rx.counting.load(Relaxed);
            let mut got = [(0usize, None::<SocketAddr>); BATCH];
            // The newest drop count in the batch (the socket's queue is in order).
            let mut count = None;
            // Plain: a count did not fit. Counted: a header has lost its room.
            let mut switch = false;
            let family = &mut st.headers[usize::from(rx.v6)];
            let n = {
                let headers = if counting {
                    family.counted.get_or_insert_with(|| {
                        MultiHeaders::preallocate(BATCH, Some(cmsg_space!(u32)))
                    })
                } else {
                    &mut family.plain
                };
                let mut chunks = st.buf.chunks_mut(RECV_BUF);
                let mut iovs: [[IoSliceMut<'_>; 1]; BATCH] =
                    std::array::from_fn(|_| [IoSliceMut::new(chunks.next().expect("BATCH slots"))]);
                let results = recvmmsg(fd, headers, iovs.iter_mut(), MsgFlags::MSG_DONTWAIT, None)
                    .map_err(io::Error::from)?;
                let mut n = 0;
                for (slot, r) in got.iter_mut().zip(results) {
                    *slot = (r.bytes, r.address.as_ref().and_then(to_std));
                    if counting {
                        let c = r.cmsgs().into_iter().flatten().find_map(|c| match c {
                            ControlMessageOwned::RxqOvfl(c) => Some(c),
                            _ => None,
                        });
                        switch |= c.is_none();
                        count = c.or(count);
                    } else {
                        switch |= r.flags.contains(MsgFlags::MSG_CTRUNC);
                    }
                    n += 1;
                }
                n
            };
            if switch {
                if counting {
                    family.counted = None;
                } else {
                    rx.counting.store(true, Relaxed);
                }
            }
            let lost = count.map_or(0, |c| rx.since(c));
            let mut batch = [(&[][..], SocketAddr::from(([0, 0, 0, 0], 0))); BATCH];
            let mut k = 0;
            for (i, (len, from)) in got[..n].iter().enumerate() {
                if let Some(from) = from {
                    let start = i * RECV_BUF;
                    batch[k] = (&st.buf[start..start + len], *from);
                    k += 1;
                }
            }
            f(&batch[..k], lost);
            Ok(n)
        })
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[test]
    fn drops_are_the_difference_of_a_wrapping_count() {
        let r = RecvState::new(SocketAddr::from(([127, 0, 0, 1], 0)));
        assert_eq!(r.since(3), 3);
        assert_eq!(r.since(3), 0);
        assert_eq!(r.since(u32::MAX - 1), u64::from(u32::MAX - 4));
        assert_eq!(r.since(5), 7, "across the wrap");
    }

    /// One batch read through [`recv_batch`]: (datagrams, drops it reported).
    async fn read(s: &UdpSocket, rx: &RecvState) -> (usize, u64) {
        let mut out = (0, 0);
        loop {
            s.readable().await.unwrap();
            match s.try_io(tokio::io::Interest::READABLE, || {
                recv_batch(s, rx, |b, lost| out = (b.len(), lost))
            }) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                r => break r.map(|_| out).unwrap(),
            }
        }
    }

    /// What the kernel drops on a full socket is reported with the datagrams that
    /// come after, and counted once: a socket whose buffer holds one large datagram
    /// (nothing reads it during a burst) drops the rest of the burst.
    #[tokio::test]
    async fn a_sockets_drops_come_with_its_later_datagrams() {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).unwrap();
        report_drops(&s);
        s.set_recv_buffer_size(4096).unwrap();
        s.set_nonblocking(true).unwrap();
        s.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
            .unwrap();
        let s = UdpSocket::from_std(s.into()).unwrap();
        let to = s.local_addr().unwrap();
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let big = vec![0u8; 60_000];
        let burst = |n: usize| {
            for _ in 0..n {
                tx.send_to(&big, to).unwrap();
            }
        };
        let rx = RecvState::new(to);

        burst(10);
        assert_eq!(
            read(&s, &rx).await,
            (1, 0),
            "the first fits, before any drop"
        );
        // The next datagram carries the count (9) but finds no room for it: the
        // socket is read with room from now on, and the count comes with the next.
        tx.send_to(b"a", to).unwrap();
        assert_eq!(read(&s, &rx).await, (1, 0));
        assert!(rx.counting.load(Relaxed));
        tx.send_to(b"b", to).unwrap();
        assert_eq!(read(&s, &rx).await, (1, 9));
        tx.send_to(b"c", to).unwrap();
        assert_eq!(read(&s, &rx).await, (1, 0), "counted once");
        // Later drops are reported by the first datagram after them (the one that
        // fitted came before them).
        burst(5);
        assert_eq!(read(&s, &rx).await, (1, 0));
        for _ in 0..3 {
            tx.send_to(b"d", to).unwrap();
        }
        assert_eq!(read(&s, &rx).await, (3, 4));
        // A socket that never dropped keeps reading on the headers without room
        // (also after this thread's other socket moved to the ones with it).
        let quiet = RecvState::new(to);
        let q = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        tx.send_to(b"e", q.local_addr().unwrap()).unwrap();
        assert_eq!(read(&q, &quiet).await, (1, 0));
        assert!(!quiet.counting.load(Relaxed));
        burst(3);
        assert_eq!(read(&s, &rx).await, (1, 0));
        tx.send_to(b"f", to).unwrap();
        assert_eq!(
            read(&s, &rx).await,
            (1, 2),
            "the counted headers kept their room"
        );
    }

    /// The address of the one datagram queued on `s`, read through [`recv_batch`].
    async fn sender(s: &UdpSocket, rx: &RecvState) -> SocketAddr {
        let mut from = None;
        loop {
            s.readable().await.unwrap();
            match s.try_io(tokio::io::Interest::READABLE, || {
                recv_batch(s, rx, |b, _| from = b.first().map(|d| d.1))
            }) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                r => break r.map(|_| from.expect("a datagram")).unwrap(),
            }
        }
    }

    /// An IPv6 sender's address arrives whole after this thread read an IPv4
    /// datagram (which leaves room for 16 bytes of address where the kernel is
    /// told how much there is): without that, the address kept the low 64 bits of
    /// the last IPv6 address read there (issue 10, item 12, found on the way).
    #[tokio::test]
    async fn an_ipv6_senders_address_survives_an_ipv4_read() {
        let Ok(six) = std::net::UdpSocket::bind("[::1]:0") else {
            eprintln!("NOTE: no IPv6 loopback; skipped");
            return;
        };
        // Dual-stack, so an IPv4 sender arrives as ::ffff:127.0.0.1.
        let s6 = socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::DGRAM, None).unwrap();
        s6.set_only_v6(false).unwrap();
        s6.set_nonblocking(true).unwrap();
        s6.bind(&SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0)).into())
            .unwrap();
        let s6 = UdpSocket::from_std(s6.into()).unwrap();
        let port = s6.local_addr().unwrap().port();
        let s4 = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let four = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let (rx6, rx4) = (
            RecvState::new(s6.local_addr().unwrap()),
            RecvState::new(s4.local_addr().unwrap()),
        );

        four.send_to(b"a", ("127.0.0.1", port)).unwrap();
        let mapped = sender(&s6, &rx6).await;
        assert_eq!(
            mapped.ip(),
            "::ffff:127.0.0.1".parse::<std::net::IpAddr>().unwrap()
        );
        four.send_to(b"b", s4.local_addr().unwrap()).unwrap();
        assert_eq!(sender(&s4, &rx4).await, four.local_addr().unwrap());
        six.send_to(b"c", ("::1", port)).unwrap();
        assert_eq!(sender(&s6, &rx6).await, six.local_addr().unwrap());
    }
}
