//! One direction of a session: read from `src`, write to `dst`, until end of stream
//! or an error, with no user-space buffer held while the direction is idle.
//!
//! Small reads go through a per-thread buffer: read, then write at once; only bytes
//! the destination cannot take right now are copied to a heap buffer owned by the
//! direction, which is freed once flushed. When a read fills the whole buffer the
//! stream is moving bulk data, and (on Linux) the direction switches to splice(2)
//! through a pooled pipe; a splice that moves less than `SPLICE_MIN` switches back.
//! This is HAProxy's "splice-auto" idea; the thresholds are in docs/performance.md.

use std::cell::RefCell;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::Interest;
use tokio::net::TcpStream;

use super::Activity;

/// Size of the per-thread copy buffer; a read that fills it switches to splice.
const COPY_BUF: usize = 16 * 1024;
/// Bytes asked of one splice into the pipe (the default pipe holds 64 KiB).
#[cfg(target_os = "linux")]
const SPLICE_CHUNK: usize = 64 * 1024;
/// A splice that moves less than this switches back to copying.
#[cfg(target_os = "linux")]
const SPLICE_MIN: usize = 4 * 1024;

thread_local! {
    static BUF: RefCell<Box<[u8]>> = RefCell::new(vec![0; COPY_BUF].into_boxed_slice());
}

pub(crate) enum PumpEnd {
    /// `src` sent FIN and everything read was written.
    Eof,
    /// Reading `src` failed (typically a reset).
    ReadError(io::Error),
    /// Writing `dst` failed (typically a reset or broken pipe).
    WriteError(io::Error),
}

enum Step {
    Moved(usize),
    Again,
    Eof,
}

pub(crate) async fn pump(
    src: &TcpStream,
    dst: &TcpStream,
    activity: &Activity,
    moved: &AtomicU64,
) -> PumpEnd {
    // Bytes read but not yet written: a heap buffer (copy path) and/or a pipe.
    let mut pending: Vec<u8> = Vec::new();
    #[cfg(target_os = "linux")]
    let mut pipe: Option<super::pipe::Pipe> = None;
    #[cfg(target_os = "linux")]
    let mut use_splice = false;

    loop {
        // Flush what is held before reading more: this is the backpressure.
        #[cfg(target_os = "linux")]
        if let Some(p) = pipe.as_mut() {
            while p.len > 0 {
                if let Err(e) = dst.writable().await {
                    return PumpEnd::WriteError(e);
                }
                match dst.try_io(Interest::WRITABLE, || p.drain(dst)) {
                    Ok(n) => {
                        moved.fetch_add(n as u64, Ordering::Relaxed);
                        activity.touch();
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return PumpEnd::WriteError(e),
                }
            }
            if let Some(p) = pipe.take() {
                p.put();
            }
        }
        while !pending.is_empty() {
            if let Err(e) = dst.writable().await {
                return PumpEnd::WriteError(e);
            }
            match dst.try_write(&pending) {
                Ok(n) => {
                    pending.drain(..n);
                    moved.fetch_add(n as u64, Ordering::Relaxed);
                    activity.touch();
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return PumpEnd::WriteError(e),
            }
        }
        if pending.capacity() > 0 {
            pending = Vec::new();
        }

        if let Err(e) = src.readable().await {
            return PumpEnd::ReadError(e);
        }

        #[cfg(target_os = "linux")]
        if use_splice {
            // Out of descriptors for a pipe: copy instead, the connection lives on.
            let Ok(p) = super::pipe::Pipe::get() else {
                use_splice = false;
                continue;
            };
            match splice_step(src, dst, p, &mut pipe, moved) {
                Ok(Step::Moved(n)) => {
                    activity.touch();
                    if n < SPLICE_MIN {
                        use_splice = false;
                    }
                }
                Ok(Step::Again) => {}
                Ok(Step::Eof) => return PumpEnd::Eof,
                Err(end) => return end,
            }
            continue;
        }

        match copy_step(src, dst, &mut pending, moved) {
            Ok(Step::Moved(n)) => {
                activity.touch();
                #[cfg(target_os = "linux")]
                if n == COPY_BUF {
                    use_splice = true;
                }
                #[cfg(not(target_os = "linux"))]
                let _ = n;
            }
            Ok(Step::Again) => {}
            Ok(Step::Eof) => return PumpEnd::Eof,
            Err(end) => return end,
        }
    }
}

/// Reads once into the thread's buffer and writes as much as `dst` takes now; the
/// rest goes to `pending`.
fn copy_step(
    src: &TcpStream,
    dst: &TcpStream,
    pending: &mut Vec<u8>,
    moved: &AtomicU64,
) -> Result<Step, PumpEnd> {
    BUF.with_borrow_mut(|buf| {
        let n = match src.try_read(buf) {
            Ok(0) => return Ok(Step::Eof),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Step::Again),
            Err(e) => return Err(PumpEnd::ReadError(e)),
        };
        let written = match dst.try_write(&buf[..n]) {
            Ok(w) => w,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
            Err(e) => return Err(PumpEnd::WriteError(e)),
        };
        moved.fetch_add(written as u64, Ordering::Relaxed);
        if written < n {
            pending.extend_from_slice(&buf[written..n]);
        }
        Ok(Step::Moved(n))
    })
}

/// Splices once from `src` into the (empty) pipe `p` and on into `dst` as far as it goes now; a
/// pipe that still holds bytes is kept in `held` for the flush loop.
#[cfg(target_os = "linux")]
fn splice_step(
    src: &TcpStream,
    dst: &TcpStream,
    mut p: super::pipe::Pipe,
    held: &mut Option<super::pipe::Pipe>,
    moved: &AtomicU64,
) -> Result<Step, PumpEnd> {
    let n = match src.try_io(Interest::READABLE, || p.fill(src, SPLICE_CHUNK)) {
        Ok(0) => {
            p.put();
            return Ok(Step::Eof);
        }
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            p.put();
            return Ok(Step::Again);
        }
        Err(e) => {
            p.put();
            return Err(PumpEnd::ReadError(e));
        }
    };
    match dst.try_io(Interest::WRITABLE, || p.drain(dst)) {
        Ok(w) => {
            moved.fetch_add(w as u64, Ordering::Relaxed);
        }
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
        Err(e) => return Err(PumpEnd::WriteError(e)),
    }
    if p.len > 0 {
        *held = Some(p);
    } else {
        p.put();
    }
    Ok(Step::Moved(n))
}
