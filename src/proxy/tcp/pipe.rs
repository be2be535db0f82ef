//! Linux zero-copy path: splice(2) through pipes taken from a shared pool.
//!
//! A direction holds a pipe only while bytes sit in it; an idle connection holds
//! none, so idle connections cost no pipe descriptors or kernel pipe buffers.

use std::io;
use std::os::fd::{AsFd, OwnedFd};

use crossbeam_queue::ArrayQueue;
use nix::fcntl::{splice, OFlag, SpliceFFlags};
use std::sync::OnceLock;

/// Pipes kept for reuse at most; beyond this they are closed when released. Each
/// idle pipe holds two descriptors, so the pool is also held to a sixteenth of the
/// open-files limit.
const POOL_CAPACITY: usize = 1024;

pub struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    /// Bytes spliced in and not yet out.
    pub len: usize,
}

fn pool() -> &'static ArrayQueue<Pipe> {
    static POOL: OnceLock<ArrayQueue<Pipe>> = OnceLock::new();
    POOL.get_or_init(|| {
        let by_limit = (crate::fd::limit() / 16).max(16) as usize;
        ArrayQueue::new(POOL_CAPACITY.min(by_limit))
    })
}

impl Pipe {
    /// An empty pipe from the pool, or a new one.
    pub fn get() -> io::Result<Pipe> {
        if let Some(p) = pool().pop() {
            return Ok(p);
        }
        let (read, write) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        Ok(Pipe {
            read,
            write,
            len: 0,
        })
    }

    /// Returns an empty pipe to the pool. A pipe with bytes left in it is closed
    /// instead, so stale bytes can never reach another connection.
    pub fn put(self) {
        if self.len == 0 {
            let _ = pool().push(self);
        }
    }

    /// Splices up to `max` bytes from `src` into the pipe. 0 means end of stream.
    pub fn fill(&mut self, src: impl AsFd, max: usize) -> io::Result<usize> {
        let n = splice(
            src,
            None,
            &self.write,
            None,
            max,
            SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK,
        )?;
        self.len += n;
        Ok(n)
    }

    /// Splices what the pipe holds into `dst`; returns the bytes moved.
    pub fn drain(&mut self, dst: impl AsFd) -> io::Result<usize> {
        let n = splice(
            &self.read,
            None,
            dst,
            None,
            self.len,
            SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK,
        )?;
        self.len -= n;
        Ok(n)
    }
}
