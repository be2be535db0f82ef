//! One running balancer: the [`Runtime`] and, with `[admin]`, the admin API
//! served on the runtime's control tasks. This is the top of the library: it owns
//! the runtime, so the admin server (which operates on the runtime) is started
//! here, not from inside the runtime.

use std::net::SocketAddr;
use std::ops::Deref;
use std::os::fd::OwnedFd;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::admin;
use crate::config::Config;
use crate::runtime::{BindError, Inherited, Runtime, StartError};

/// A running balancer. Cheap to clone: clones share the same instance. Dropping the
/// last clone stops it at once (use [`Flowgate::shutdown`] for a graceful stop).
///
/// It dereferences to its [`Runtime`], which has the queries, operator actions and
/// reload.
#[derive(Clone, Debug)]
pub struct Flowgate {
    rt: Runtime,
    admin_addr: Option<SocketAddr>,
    admin: Option<Arc<AdminSocket>>,
}

/// The admin API's socket as a binary upgrade hands it over.
#[derive(Debug)]
struct AdminSocket {
    /// `admin.bind` as written (what the new process's config must match).
    bind: SocketAddr,
    /// A duplicate of the listening socket, to give away.
    copy: OwnedFd,
    /// Stops this process's accept loop on it.
    stop: CancellationToken,
}

impl Flowgate {
    /// Binds every listener and the admin API (failing fast, with the address and
    /// the OS error), then starts serving.
    pub fn start(config: Config) -> Result<Flowgate, StartError> {
        Flowgate::start_with(config, Inherited::default())
    }

    /// [`Flowgate::start`] on the sockets a binary upgrade handed over (see
    /// [`Inherited`]): the admin socket too when `admin.bind` is the same.
    pub fn start_with(config: Config, mut inherited: Inherited) -> Result<Flowgate, StartError> {
        let given_admin = match (&config.admin, inherited.admin.take()) {
            (Some(a), Some((bind, fd))) if bind == a.bind => Some(std::net::TcpListener::from(fd)),
            _ => None,
        };
        let admin = match &config.admin {
            Some(a) if given_admin.is_some() => given_admin.map(|s| (s, a.clone())),
            Some(a) => Some((
                admin::bind(a.bind).map_err(|error| BindError {
                    listener: "admin".into(),
                    addr: a.bind,
                    error: match crate::runtime::holder(a.bind, false) {
                        Some(who) if error.kind() == std::io::ErrorKind::AddrInUse => {
                            std::io::Error::new(error.kind(), format!("{error}: {who} holds it"))
                        }
                        _ => error,
                    },
                })?,
                a.clone(),
            )),
            None => None,
        };
        let rt = Runtime::start_with(config, inherited)?;
        let mut handle = None;
        let admin_addr = admin.and_then(|(sock, cfg)| {
            let addr = sock.local_addr().ok();
            let stop = CancellationToken::new();
            match sock.try_clone() {
                Ok(copy) => {
                    handle = Some(Arc::new(AdminSocket {
                        bind: cfg.bind,
                        copy: copy.into(),
                        stop: stop.clone(),
                    }))
                }
                Err(e) => {
                    warn!(error = %e, "cannot keep a copy of the admin socket: an upgrade will bind it anew")
                }
            }
            rt.control()
                .spawn_until_stop(admin::run(sock, rt.downgrade(), cfg, stop));
            if let Some(addr) = addr {
                info!(%addr, "admin API listening");
            }
            addr
        });
        Ok(Flowgate {
            rt,
            admin_addr,
            admin: handle,
        })
    }

    /// Duplicates of every listening socket, the admin API's included, for a
    /// binary upgrade (see [`Runtime::handover_sockets`]).
    pub fn handover(&self) -> Inherited {
        Inherited {
            listeners: self.rt.handover_sockets().into_iter().collect(),
            admin: self
                .admin
                .as_ref()
                .and_then(|a| a.copy.try_clone().ok().map(|fd| (a.bind, fd))),
            upgraded_from: Some(std::process::id()),
        }
    }

    /// A new process serves every socket now: stop accepting, on the admin socket
    /// too; then [`Flowgate::shutdown`] drains.
    pub fn hand_over(&self) {
        if let Some(a) = &self.admin {
            a.stop.cancel();
        }
        self.rt.hand_over();
    }

    /// The address the admin API is bound to (its port when the config said 0).
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// Stops accepting, waits up to `shutdown_timeout` for sessions to finish, then
    /// closes the rest, and stops the admin API. Returns whether every session
    /// finished within the grace period.
    pub async fn shutdown(self) -> bool {
        self.rt.shutdown().await
    }
}

impl Deref for Flowgate {
    type Target = Runtime;

    fn deref(&self) -> &Runtime {
        &self.rt
    }
}
