//! One running balancer: the [`Runtime`] and, with `[admin]`, the admin API
//! served on the runtime's control tasks. This is the top of the library: it owns
//! the runtime, so the admin server (which operates on the runtime) is started
//! here, not from inside the runtime.

use std::net::SocketAddr;
use std::ops::Deref;

use tracing::info;

use crate::admin;
use crate::config::Config;
use crate::runtime::{BindError, Runtime, StartError};

/// A running balancer. Cheap to clone: clones share the same instance. Dropping the
/// last clone stops it at once (use [`Flowgate::shutdown`] for a graceful stop).
///
/// It dereferences to its [`Runtime`], which has the queries, operator actions and
/// reload.
#[derive(Clone, Debug)]
pub struct Flowgate {
    rt: Runtime,
    admin_addr: Option<SocketAddr>,
}

impl Flowgate {
    /// Binds every listener and the admin API (failing fast, with the address and
    /// the OS error), then starts serving.
    pub fn start(config: Config) -> Result<Flowgate, StartError> {
        let admin = match &config.admin {
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
        let rt = Runtime::start(config)?;
        let admin_addr = admin.and_then(|(sock, cfg)| {
            let addr = sock.local_addr().ok();
            rt.control()
                .spawn_until_stop(admin::run(sock, rt.downgrade(), cfg));
            if let Some(addr) = addr {
                info!(%addr, "admin API listening");
            }
            addr
        });
        Ok(Flowgate { rt, admin_addr })
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
