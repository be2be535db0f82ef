//! Listening sockets that outlive a process: a binary upgrade hands them from the
//! old process to the new one (the exchange itself is [`crate::upgrade`]'s).
//!
//! The runtime keeps a duplicate of every listening socket it serves, so it can
//! give copies away. A new process adopts the sockets it is given instead of
//! binding, matched to its config by listener name, bind address (as written) and
//! protocol; a listener only one side has is bound fresh or not taken. The old and
//! the new process hold the same sockets (one accept queue), so a connection the
//! old one did not accept is accepted by the new one: none is dropped.
//!
//! Worker counts may differ: with `worker_model = "per-core"` the new process
//! serves every socket it was given (several on one worker when it has fewer
//! workers) and binds more SO_REUSEPORT sockets when it has more workers, so each
//! worker has one. None is closed, since closing a SO_REUSEPORT socket would drop
//! the connections queued on it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::sync::atomic::Ordering;

use tracing::{info, warn};

use super::startup::Bound;
use super::{BindError, Runtime, State};
use crate::config::{ListenerConfig, Protocol};
use crate::proxy::busy;

/// Which listener a socket belongs to: what old and new config must agree on.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ListenerKey {
    pub name: String,
    /// The address as the config wrote it (port 0 included).
    pub bind: SocketAddr,
    pub udp: bool,
}

impl ListenerKey {
    pub fn of(l: &ListenerConfig) -> ListenerKey {
        ListenerKey {
            name: l.name.clone(),
            bind: l.bind,
            udp: l.protocol == Protocol::Udp,
        }
    }
}

/// What a new process took over from the one it upgrades.
#[derive(Debug, Default)]
pub struct Inherited {
    /// Each listener's sockets (one per worker of the old process, or one).
    pub listeners: HashMap<ListenerKey, Vec<OwnedFd>>,
    /// The admin API's socket, with its `admin.bind` as written.
    pub admin: Option<(SocketAddr, OwnedFd)>,
    /// The old process's id.
    pub upgraded_from: Option<u32>,
}

impl Runtime {
    /// Duplicates of every listening socket served now, for a new process.
    /// A socket that cannot be duplicated (descriptors exhausted) is left out, and
    /// its listener with it: the new process then binds that one itself.
    pub fn handover_sockets(&self) -> Vec<(ListenerKey, Vec<OwnedFd>)> {
        let st = self.inner.lock();
        let mut out = Vec::new();
        for (key, fds) in st.sockets.values() {
            match fds.iter().map(|f| f.try_clone()).collect() {
                Ok(copies) => out.push((key.clone(), copies)),
                Err(e) => {
                    warn!(listener = %key.name, error = %e, "cannot duplicate a listening socket for the upgrade")
                }
            }
        }
        out
    }

    /// A new process serves the sockets now: stop accepting and reading them
    /// (without closing them for the new process), keep UDP sessions until they
    /// are idle. The caller then shuts down ([`Runtime::shutdown`]) to drain.
    pub fn hand_over(&self) {
        self.inner.handed_over.store(true, Ordering::Release);
        self.inner.stop_accept.cancel();
        self.inner.lock().sockets.clear();
    }

    /// Whether this process handed its sockets to a new one.
    pub fn handed_over(&self) -> bool {
        self.inner.handed_over.load(Ordering::Acquire)
    }

    /// Keeps a duplicate of a listener's sockets for a later upgrade.
    pub(super) fn keep_sockets(&self, st: &mut State, l: &ListenerConfig, sockets: &Bound) {
        let copies: std::io::Result<Vec<OwnedFd>> = match sockets {
            Bound::Tcp(s) => s.iter().map(|s| s.try_clone().map(OwnedFd::from)).collect(),
            Bound::Udp(s) => s.iter().map(|s| s.try_clone().map(OwnedFd::from)).collect(),
        };
        match copies {
            Ok(c) => {
                st.sockets.insert(l.name.clone(), (ListenerKey::of(l), c));
            }
            Err(e) => {
                warn!(listener = %l.name, error = %e, "cannot keep a copy of the listening socket: an upgrade will not take it")
            }
        }
    }

    /// Serves `fds` (inherited) for `l`, adding SO_REUSEPORT sockets up to one per
    /// worker.
    pub(super) fn adopt_listener(
        &self,
        l: &ListenerConfig,
        fds: Vec<OwnedFd>,
    ) -> Result<Bound, BindError> {
        let wanted = self.sockets_per_listener();
        let given = fds.len();
        let bound = if l.protocol == Protocol::Udp {
            Bound::Udp(adopt(l, fds, socket2::Type::DGRAM, wanted, |a| {
                crate::proxy::udp::bind(a)
            })?)
        } else {
            Bound::Tcp(adopt(l, fds, socket2::Type::STREAM, wanted, |a| {
                crate::proxy::tcp::bind(a, l.backlog)
            })?)
        };
        let busy_us = self.inner.busy_poll_us;
        let total = match &bound {
            Bound::Tcp(v) => v
                .iter()
                .map(|s| busy::set_socket(s.into(), busy_us))
                .count(),
            Bound::Udp(v) => v
                .iter()
                .map(|s| busy::set_socket(s.into(), busy_us))
                .count(),
        };
        info!(listener = %l.name, given, sockets = total, "took over the listening sockets");
        Ok(bound)
    }
}

/// `fds` as sockets of `l` (checked to be of type `ty`, non-blocking), and fresh
/// ones from `bind` on the same address until there are `wanted`.
fn adopt<S: From<OwnedFd>>(
    l: &ListenerConfig,
    fds: Vec<OwnedFd>,
    ty: socket2::Type,
    wanted: usize,
    bind: impl Fn(SocketAddr) -> std::io::Result<S>,
) -> Result<Vec<S>, BindError> {
    let err = |addr, error| BindError {
        listener: l.name.clone(),
        addr,
        error,
    };
    let mut local = l.bind;
    for (i, fd) in fds.iter().enumerate() {
        let s = socket2::SockRef::from(fd);
        check_type(&s, ty).map_err(|e| err(l.bind, e))?;
        s.set_nonblocking(true).map_err(|e| err(l.bind, e))?;
        if i == 0 {
            let a = s.local_addr().map_err(|e| err(l.bind, e))?;
            local = a.as_socket().unwrap_or(l.bind);
        }
    }
    let mut v: Vec<S> = fds.into_iter().map(S::from).collect();
    while v.len() < wanted {
        v.push(bind(local).map_err(|e| err(local, e))?);
    }
    Ok(v)
}

/// A socket handed over must be of the kind the listener expects.
fn check_type(s: &socket2::SockRef<'_>, want: socket2::Type) -> std::io::Result<()> {
    let got = s.r#type()?;
    if got != want {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("the socket handed over is a {got:?} socket, not {want:?}"),
        ));
    }
    Ok(())
}
