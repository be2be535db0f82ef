//! Zero-drop binary upgrade and the single-instance lock, over one unix socket
//! (`runtime.upgrade_socket`, mode 0600).
//!
//! Every running instance listens there ([`UpgradeSocket::claim`]); a second
//! `flowgate run` that finds a process answering refuses to start. A new binary
//! started with `--upgrade-from PATH` ([`take_over`]) asks the process there for
//! its sockets:
//!
//! 1. new -> old: `{"hello":"upgrade","pid":N}`. The old refuses a second upgrade
//!    while one is in flight: `{"error":"..."}`.
//! 2. old -> new: `{"pid":M,"sockets":[{"kind":"tcp"|"udp"|"admin"|"upgrade",...,"count":K}]}`,
//!    then every descriptor, in that order, with SCM_RIGHTS (`fdpass`).
//! 3. The new process serves them ([`crate::runtime::Inherited`]), then sends
//!    `{"ready":true}`. The old one stops accepting (the sockets stay open: the new
//!    one holds them), answers `{"done":true}`, and drains for up to
//!    `shutdown_timeout`. Closing the connection before `ready` (a failed start)
//!    leaves the old process serving as before.
//!
//! The upgrade socket itself is handed over too, so the lock is never free during
//! an upgrade.

mod fdpass;

use std::io;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::runtime::{Inherited, ListenerKey};
use crate::Flowgate;

/// How long either side waits for the other's next message during a handover.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the old process waits for the new one to start serving.
const READY_TIMEOUT: Duration = Duration::from_secs(300);

/// What the upgrade socket can fail with.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error("another flowgate is running: it answers on the upgrade socket {path} (runtime.upgrade_socket); to replace it, use `flowgate run --config FILE --upgrade-from {path}`")]
    AlreadyRunning { path: PathBuf },
    #[error("upgrade socket {path}: {error}")]
    Socket { path: PathBuf, error: io::Error },
    #[error("upgrade refused: no flowgate answers on {path}: {error}")]
    NoAnswer { path: PathBuf, error: io::Error },
    #[error("upgrade refused by the flowgate on {path}: {reason}")]
    Refused { path: PathBuf, reason: String },
    #[error("upgrade from {path} failed: {error}")]
    Exchange { path: PathBuf, error: io::Error },
}

/// A listening upgrade socket, held for the life of the process.
#[derive(Debug)]
pub struct UpgradeSocket {
    listener: UnixListener,
    path: PathBuf,
}

impl UpgradeSocket {
    /// Takes `path` as this instance's upgrade socket: creates a missing parent
    /// directory, refuses when a live process answers there, replaces a stale
    /// socket file (nobody answers), and leaves the socket with mode 0600.
    pub fn claim(path: &Path) -> Result<UpgradeSocket, UpgradeError> {
        let err = |error| UpgradeError::Socket {
            path: path.to_owned(),
            error,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        match std::fs::symlink_metadata(path) {
            Ok(m) if !m.file_type().is_socket() => {
                return Err(err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    "the path exists and is not a socket",
                )))
            }
            Ok(_) => match UnixStream::connect(path) {
                Ok(_) => {
                    return Err(UpgradeError::AlreadyRunning {
                        path: path.to_owned(),
                    })
                }
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    info!(path = %path.display(), "replacing a stale upgrade socket (nobody answers)");
                    std::fs::remove_file(path).map_err(err)?;
                }
                Err(e) => return Err(err(e)),
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(err(e)),
        }
        let listener = match UnixListener::bind(path) {
            Ok(l) => l,
            // Another process bound it between the check and here.
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
                return Err(UpgradeError::AlreadyRunning {
                    path: path.to_owned(),
                })
            }
            Err(e) => return Err(err(e)),
        };
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
        Ok(UpgradeSocket {
            listener,
            path: path.to_owned(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// One socket in the old process's offer.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
enum Offered {
    Tcp {
        name: String,
        bind: SocketAddr,
        count: usize,
    },
    Udp {
        name: String,
        bind: SocketAddr,
        count: usize,
    },
    Admin {
        bind: SocketAddr,
    },
    Upgrade {
        path: PathBuf,
    },
}

impl Offered {
    fn count(&self) -> usize {
        match self {
            Offered::Tcp { count, .. } | Offered::Udp { count, .. } => *count,
            Offered::Admin { .. } | Offered::Upgrade { .. } => 1,
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Hello {
    hello: String,
    pid: u32,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(untagged)]
enum Offer {
    Sockets { pid: u32, sockets: Vec<Offered> },
    Refused { error: String },
}

#[derive(Debug, Serialize, Deserialize)]
struct Ready {
    ready: bool,
}

#[derive(Debug, Serialize, Deserialize)]
struct Done {
    done: bool,
}

/// The new process's side of an upgrade in progress.
#[derive(Debug)]
pub struct Handover {
    stream: UnixStream,
    path: PathBuf,
    old_pid: u32,
    /// The old process's sockets, for [`Flowgate::start_with`].
    pub inherited: Inherited,
    upgrade: Option<(PathBuf, OwnedFd)>,
}

/// Asks the flowgate answering on `path` for its sockets (steps 1 and 2). Refused
/// when nothing answers there, or when another upgrade is in flight.
pub fn take_over(path: &Path) -> Result<Handover, UpgradeError> {
    let exchange = |error| UpgradeError::Exchange {
        path: path.to_owned(),
        error,
    };
    let mut stream = UnixStream::connect(path).map_err(|error| UpgradeError::NoAnswer {
        path: path.to_owned(),
        error,
    })?;
    stream
        .set_read_timeout(Some(STEP_TIMEOUT))
        .map_err(exchange)?;
    fdpass::write_msg(
        &mut stream,
        &Hello {
            hello: "upgrade".into(),
            pid: std::process::id(),
        },
    )
    .map_err(exchange)?;
    let offer: Offer = fdpass::read_msg(&mut stream)
        .map_err(exchange)?
        .ok_or_else(|| exchange(io::ErrorKind::UnexpectedEof.into()))?;
    let (old_pid, sockets) = match offer {
        Offer::Refused { error } => {
            return Err(UpgradeError::Refused {
                path: path.to_owned(),
                reason: error,
            })
        }
        Offer::Sockets { pid, sockets } => (pid, sockets),
    };
    let total = sockets.iter().map(Offered::count).sum();
    let mut fds = fdpass::recv_fds(&stream, total)
        .map_err(exchange)?
        .into_iter();
    let mut inherited = Inherited {
        upgraded_from: Some(old_pid),
        ..Inherited::default()
    };
    let mut upgrade = None;
    for s in sockets {
        let n = s.count();
        let mine: Vec<OwnedFd> = fds.by_ref().take(n).collect();
        let udp = matches!(s, Offered::Udp { .. });
        match s {
            Offered::Tcp { name, bind, .. } | Offered::Udp { name, bind, .. } => {
                inherited
                    .listeners
                    .insert(ListenerKey { name, bind, udp }, mine);
            }
            Offered::Admin { bind } => {
                inherited.admin = mine.into_iter().next().map(|fd| (bind, fd))
            }
            Offered::Upgrade { path } => upgrade = mine.into_iter().next().map(|fd| (path, fd)),
        }
    }
    Ok(Handover {
        stream,
        path: path.to_owned(),
        old_pid,
        inherited,
        upgrade,
    })
}

impl Handover {
    /// The process being replaced.
    pub fn old_pid(&self) -> u32 {
        self.old_pid
    }

    /// The old process's upgrade socket, when this process's is at the same
    /// `path`: taking it keeps the single-instance lock held throughout.
    pub fn upgrade_socket(&mut self, path: &Path) -> Option<UpgradeSocket> {
        match self.upgrade.take() {
            Some((p, fd)) if p == path => Some(UpgradeSocket {
                listener: UnixListener::from(fd),
                path: p,
            }),
            _ => None,
        }
    }

    /// Step 3: tells the old process this one serves, and waits until it has
    /// stopped accepting.
    pub fn finish(mut self) -> Result<u32, UpgradeError> {
        let exchange = |error| UpgradeError::Exchange {
            path: self.path.clone(),
            error,
        };
        fdpass::write_msg(&mut self.stream, &Ready { ready: true }).map_err(exchange)?;
        match fdpass::read_msg::<Done>(&mut self.stream).map_err(exchange)? {
            Some(Done { done: true }) => Ok(self.old_pid),
            _ => Err(exchange(io::Error::new(
                io::ErrorKind::InvalidData,
                "the old process did not confirm the handover",
            ))),
        }
    }
}

/// Serves the upgrade socket on `fg`'s control tasks: answers lock probes, hands
/// every socket to one new process at a time, and fires `handed` once one has
/// taken over (the caller then shuts down, which drains).
pub fn serve(sock: UpgradeSocket, fg: &Flowgate, handed: CancellationToken) {
    let control = fg.control().clone();
    let fg = fg.clone();
    let busy = Arc::new(AtomicBool::new(false));
    // A duplicate to give away: the new process listens on the very same socket.
    let copy: Arc<Option<OwnedFd>> = Arc::new(sock.listener.try_clone().ok().map(OwnedFd::from));
    control.clone().spawn_until_stop(async move {
        let path = sock.path.clone();
        let listener = match sock
            .listener
            .set_nonblocking(true)
            .and_then(|()| tokio::net::UnixListener::from_std(sock.listener))
        {
            Ok(l) => l,
            Err(e) => {
                warn!(path = %path.display(), error = %e, "upgrade socket: cannot register it; upgrades are off");
                return;
            }
        };
        loop {
            let accepted = tokio::select! {
                biased;
                _ = handed.cancelled() => return,
                r = listener.accept() => r,
            };
            let stream = match accepted.and_then(|(s, _)| s.into_std()) {
                Ok(s) => s,
                Err(e) => {
                    debug!(error = %e, "upgrade socket: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let (fg, busy, handed) = (fg.clone(), busy.clone(), handed.clone());
            let (path, copy) = (path.clone(), copy.clone());
            control.spawn(async move {
                let r = tokio::task::spawn_blocking(move || {
                    let own = (path.as_path(), (*copy).as_ref());
                    hand(stream, &fg, &busy, own)
                })
                .await;
                match r {
                    Ok(Ok(Some(new_pid))) => {
                        info!(old_pid = std::process::id(), new_pid, "upgrade complete: handed every socket over; draining");
                        handed.cancel();
                    }
                    Ok(Ok(None)) => {}
                    Ok(Err(e)) => warn!(error = %e, "upgrade failed; still serving"),
                    Err(e) => warn!(error = %e, "upgrade task failed; still serving"),
                }
            });
        }
    });
}

/// The old process's side of one connection (blocking). `Ok(None)`: a lock probe
/// or a refused second upgrade; `Ok(Some(pid))`: `pid` serves now.
fn hand(
    mut stream: UnixStream,
    fg: &Flowgate,
    busy: &AtomicBool,
    own: (&Path, Option<&OwnedFd>),
) -> io::Result<Option<u32>> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(STEP_TIMEOUT))?;
    let Some(hello) = fdpass::read_msg::<Hello>(&mut stream)? else {
        return Ok(None);
    };
    if busy.swap(true, Ordering::AcqRel) {
        info!(pid = hello.pid, "upgrade refused: another one is in flight");
        fdpass::write_msg(
            &mut stream,
            &Offer::Refused {
                error: "another upgrade is already in flight".into(),
            },
        )?;
        return Ok(None);
    }
    let r = offer(stream, fg, hello.pid, own);
    if !matches!(r, Ok(Some(_))) {
        busy.store(false, Ordering::Release);
    }
    r
}

/// Steps 2 and 3 on the old side, once this connection holds the upgrade.
fn offer(
    mut stream: UnixStream,
    fg: &Flowgate,
    new_pid: u32,
    (path, own): (&Path, Option<&OwnedFd>),
) -> io::Result<Option<u32>> {
    info!(
        new_pid,
        "upgrade requested: handing the listening sockets over"
    );
    let inherited = fg.handover();
    let mut sockets = Vec::new();
    let mut fds = Vec::new();
    let mut keys: Vec<_> = inherited.listeners.into_iter().collect();
    keys.sort_by(|a, b| a.0.name.cmp(&b.0.name));
    for (key, mine) in keys {
        let (name, bind, count) = (key.name, key.bind, mine.len());
        sockets.push(if key.udp {
            Offered::Udp { name, bind, count }
        } else {
            Offered::Tcp { name, bind, count }
        });
        fds.extend(mine);
    }
    if let Some((bind, fd)) = inherited.admin {
        sockets.push(Offered::Admin { bind });
        fds.push(fd);
    }
    if let Some(fd) = own.and_then(|fd| fd.try_clone().ok()) {
        sockets.push(Offered::Upgrade {
            path: path.to_owned(),
        });
        fds.push(fd);
    }
    fdpass::write_msg(
        &mut stream,
        &Offer::Sockets {
            pid: std::process::id(),
            sockets,
        },
    )?;
    fdpass::send_fds(&stream, &fds)?;
    drop(fds);
    stream.set_read_timeout(Some(READY_TIMEOUT))?;
    match fdpass::read_msg::<Ready>(&mut stream)? {
        Some(Ready { ready: true }) => {}
        _ => {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("the new process (pid {new_pid}) gave up before serving"),
            ))
        }
    }
    fg.hand_over();
    // The new process may be gone already: the handover has happened either way.
    let _ = fdpass::write_msg(&mut stream, &Done { done: true });
    Ok(Some(new_pid))
}
