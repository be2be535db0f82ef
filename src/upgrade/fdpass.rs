//! The wire of the upgrade socket: JSON messages, one per line, and descriptors
//! passed with SCM_RIGHTS. Blocking I/O on a std `UnixStream` with timeouts: a
//! handover is a handful of small messages, run off the async threads.
//!
//! Lines are read a byte at a time, never buffered ahead, so that the bytes that
//! carry descriptors are left for [`recv_fds`].

use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Descriptors per message: well under the kernel's SCM_MAX_FD (253).
const PER_MESSAGE: usize = 64;

/// The longest message accepted (a list of sockets).
const MAX_LINE: usize = 1 << 20;

/// Writes `msg` as one JSON line.
pub(super) fn write_msg(s: &mut UnixStream, msg: &impl Serialize) -> io::Result<()> {
    let mut line = serde_json::to_vec(msg).map_err(io::Error::other)?;
    line.push(b'\n');
    s.write_all(&line)
}

/// Reads one JSON line; `Ok(None)` at the end of the stream before any byte.
pub(super) fn read_msg<T: DeserializeOwned>(s: &mut UnixStream) -> io::Result<Option<T>> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match s.read(&mut byte) {
            Ok(0) if line.is_empty() => return Ok(None),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) if line.len() >= MAX_LINE => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "message too long",
                ))
            }
            Ok(_) => line.push(byte[0]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    serde_json::from_slice(&line)
        .map(Some)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// Sends `fds`, [`PER_MESSAGE`] at a time, each batch on one byte.
pub(super) fn send_fds(s: &UnixStream, fds: &[OwnedFd]) -> io::Result<()> {
    for chunk in fds.chunks(PER_MESSAGE) {
        let raw: Vec<RawFd> = chunk.iter().map(|f| f.as_raw_fd()).collect();
        let cmsg = [ControlMessage::ScmRights(&raw)];
        loop {
            match sendmsg::<()>(
                s.as_raw_fd(),
                &[IoSlice::new(b"F")],
                &cmsg,
                MsgFlags::empty(),
                None,
            ) {
                Ok(_) => break,
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(())
}

/// Receives `count` descriptors sent by [`send_fds`] (close-on-exec). rustix
/// hands them over as `OwnedFd`s, so no `unsafe` is needed to own them.
pub(super) fn recv_fds(s: &UnixStream, count: usize) -> io::Result<Vec<OwnedFd>> {
    use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags};
    let mut out = Vec::with_capacity(count);
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(PER_MESSAGE))];
    while out.len() < count {
        let mut byte = [0u8; 1];
        let mut cmsg = RecvAncillaryBuffer::new(&mut space);
        let msg = match rustix::net::recvmsg(
            s,
            &mut [IoSliceMut::new(&mut byte)],
            &mut cmsg,
            RecvFlags::CMSG_CLOEXEC,
        ) {
            Ok(m) => m,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        };
        if msg.bytes == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        if msg.flags.contains(ReturnFlags::CTRUNC) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "descriptors cut short (MSG_CTRUNC): the open-files limit?",
            ));
        }
        let before = out.len();
        for m in cmsg.drain() {
            if let RecvAncillaryMessage::ScmRights(fds) = m {
                out.extend(fds);
            }
        }
        if out.len() == before {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "expected descriptors, got none",
            ));
        }
    }
    if out.len() != count {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("expected {count} descriptors, got {}", out.len()),
        ));
    }
    Ok(out)
}
