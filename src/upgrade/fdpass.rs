//! The wire of the upgrade socket: JSON messages, one per line, and descriptors
//! passed with SCM_RIGHTS. Blocking I/O on a std `UnixStream` with timeouts: a
//! handover is a handful of small messages, run off the async threads.
//!
//! Lines are read a byte at a time, never buffered ahead, so that the bytes that
//! carry descriptors are left for [`recv_fds`].

use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
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

/// Receives `count` descriptors sent by [`send_fds`] (close-on-exec).
pub(super) fn recv_fds(s: &UnixStream, count: usize) -> io::Result<Vec<OwnedFd>> {
    let mut out = Vec::with_capacity(count);
    let mut space = nix::cmsg_space!([RawFd; PER_MESSAGE]);
    while out.len() < count {
        let mut byte = [0u8; 1];
        let mut iov = [IoSliceMut::new(&mut byte)];
        let msg = match recvmsg::<()>(
            s.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(m) => m,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        };
        if msg.bytes == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let mut got = 0;
        for c in msg.cmsgs().map_err(io::Error::from)? {
            if let ControlMessageOwned::ScmRights(fds) = c {
                for fd in fds {
                    // SAFETY: the kernel has just installed `fd` in this process's
                    // table for this message (SCM_RIGHTS); nothing else knows it,
                    // so it is owned here, exactly once.
                    out.push(unsafe { OwnedFd::from_raw_fd(fd) });
                    got += 1;
                }
            }
        }
        if got == 0 {
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
