//! Workers, startup and graceful shutdown.
//!
//! `Flowgate::start` binds every listener (failing fast with the address and OS error),
//! starts the workers and their accept loops, and returns a handle. Workers are OS
//! threads, each driving a tokio runtime: with `worker_model = "per-core"` (default)
//! one single-threaded runtime per worker with its own SO_REUSEPORT socket per
//! listener; with `"shared"` one multi-threaded runtime and one socket per listener.
//! docs/architecture.md has the measurements behind the default.
//!
//! Shutdown: stop accepting (close the listening sockets), let sessions finish for up
//! to the grace period (`TaskTracker::wait`), then cancel the rest.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::config::{Config, WorkerModel};
use crate::listener::{self, ListenerShared};
use crate::pool::Pool;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("listener {listener:?}: cannot bind {addr}: {source}")]
    Bind {
        listener: String,
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("cannot start worker threads: {0}")]
    Workers(#[source] io::Error),
}

/// A running balancer.
pub struct Flowgate {
    listeners: Vec<RunningListener>,
    pools: HashMap<String, Arc<Pool>>,
    shutdown_timeout: Duration,
    /// Stops accept loops (closes listening sockets).
    stop_accept: CancellationToken,
    /// Ends every session at once: the grace period is over.
    hard_stop: CancellationToken,
    /// Lets worker threads return.
    stop_workers: CancellationToken,
    accept_loops: TaskTracker,
    sessions: TaskTracker,
    workers: Vec<std::thread::JoinHandle<()>>,
}

pub struct RunningListener {
    pub shared: Arc<ListenerShared>,
    pub local_addr: SocketAddr,
}

impl Flowgate {
    pub fn start(config: Config) -> Result<Flowgate, StartError> {
        let pools: HashMap<String, Arc<Pool>> = config
            .pools
            .iter()
            .map(|p| (p.name.clone(), Pool::new(p)))
            .collect();

        // Bind everything before starting anything, so a bad address fails fast.
        let sockets_per_listener = match config.runtime.worker_model {
            WorkerModel::PerCore => config.runtime.workers,
            WorkerModel::Shared => 1,
        };
        let mut bound = Vec::new();
        for l in &config.listeners {
            let bind_err = |source| StartError::Bind {
                listener: l.name.clone(),
                addr: l.bind,
                source,
            };
            let first = listener::bind(l.bind, l.backlog).map_err(bind_err)?;
            let local_addr = first.local_addr().map_err(bind_err)?;
            let mut sockets = vec![first];
            for _ in 1..sockets_per_listener {
                sockets.push(listener::bind(local_addr, l.backlog).map_err(bind_err)?);
            }
            let shared = ListenerShared::new(l, pools[&l.pool].clone());
            bound.push((RunningListener { shared, local_addr }, sockets));
        }

        let stop_workers = CancellationToken::new();
        let (workers, handles) = spawn_workers(
            config.runtime.worker_model,
            config.runtime.workers,
            &stop_workers,
        )
        .map_err(StartError::Workers)?;

        let fg = Flowgate {
            listeners: Vec::new(),
            pools,
            shutdown_timeout: config.runtime.shutdown_timeout,
            stop_accept: CancellationToken::new(),
            hard_stop: CancellationToken::new(),
            stop_workers,
            accept_loops: TaskTracker::new(),
            sessions: TaskTracker::new(),
            workers,
        };
        let mut fg = fg;
        for (running, sockets) in bound {
            for (i, socket) in sockets.into_iter().enumerate() {
                let handle = &handles[i % handles.len()];
                let task = listener::accept_loop(
                    socket,
                    running.shared.clone(),
                    fg.stop_accept.clone(),
                    fg.hard_stop.clone(),
                    fg.sessions.clone(),
                );
                fg.accept_loops.spawn_on(task, handle);
            }
            info!(
                listener = %running.shared.name,
                addr = %running.local_addr,
                pool = %running.shared.pool.name,
                "listening"
            );
            fg.listeners.push(running);
        }
        handles[0].spawn(report_unreachable(fg.pools.values().cloned().collect()));
        Ok(fg)
    }

    /// The address a listener is bound to (its port when the config said 0).
    pub fn local_addr(&self, listener: &str) -> Option<SocketAddr> {
        self.listener(listener).map(|l| l.local_addr)
    }

    pub fn listener(&self, name: &str) -> Option<&RunningListener> {
        self.listeners.iter().find(|l| l.shared.name == name)
    }

    pub fn pool(&self, name: &str) -> Option<&Arc<Pool>> {
        self.pools.get(name)
    }

    /// Sessions in progress, all listeners together.
    pub fn active_sessions(&self) -> usize {
        self.sessions.len()
    }

    /// Stops accepting, waits up to `shutdown_timeout` for sessions to finish, then
    /// closes the rest. Returns whether every session finished within the grace period.
    pub async fn shutdown(self) -> bool {
        self.stop_accept.cancel();
        self.accept_loops.close();
        self.accept_loops.wait().await;
        self.sessions.close();
        let open = self.sessions.len();
        if open > 0 {
            info!(
                connections = open,
                grace = ?self.shutdown_timeout,
                "stopped accepting; waiting for open connections"
            );
        }
        let graceful = tokio::time::timeout(self.shutdown_timeout, self.sessions.wait())
            .await
            .is_ok();
        if !graceful {
            warn!(
                connections = self.sessions.len(),
                "shutdown_timeout expired; closing the remaining connections"
            );
            self.hard_stop.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(5), self.sessions.wait()).await;
        }
        graceful
    }
}

impl Drop for Flowgate {
    fn drop(&mut self) {
        self.stop_accept.cancel();
        self.hard_stop.cancel();
        self.stop_workers.cancel();
        for w in self.workers.drain(..) {
            // Joining from inside a runtime would block it; the threads exit on their own.
            drop(w);
        }
    }
}

/// Starts the worker threads; returns them and the handles to spawn work on.
fn spawn_workers(
    model: WorkerModel,
    workers: usize,
    stop: &CancellationToken,
) -> io::Result<(Vec<std::thread::JoinHandle<()>>, Vec<Handle>)> {
    let runtimes = match model {
        WorkerModel::PerCore => workers,
        WorkerModel::Shared => 1,
    };
    let mut threads = Vec::with_capacity(runtimes);
    let mut handles = Vec::with_capacity(runtimes);
    for i in 0..runtimes {
        let rt = match model {
            WorkerModel::PerCore => tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?,
            WorkerModel::Shared => tokio::runtime::Builder::new_multi_thread()
                .worker_threads(workers)
                .thread_name("flowgate-worker")
                .enable_all()
                .build()?,
        };
        handles.push(rt.handle().clone());
        let stop = stop.clone();
        threads.push(
            std::thread::Builder::new()
                .name(format!("flowgate-w{i}"))
                .spawn(move || {
                    rt.block_on(stop.cancelled());
                    rt.shutdown_timeout(Duration::from_millis(100));
                })?,
        );
    }
    Ok((threads, handles))
}

/// Tries each backend once at startup and says which are unreachable, so an operator
/// sees a typo'd port in the log right away. Traffic does not wait for it.
async fn report_unreachable(pools: Vec<Arc<Pool>>) {
    for pool in pools {
        for b in pool.backends() {
            let r = tokio::time::timeout(
                Duration::from_secs(2),
                tokio::net::TcpStream::connect(b.addr),
            )
            .await;
            match r {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    warn!(pool = %pool.name, backend = %b.name, error = %e, "backend unreachable")
                }
                Err(_) => {
                    warn!(pool = %pool.name, backend = %b.name, "backend unreachable: connect timed out")
                }
            }
        }
    }
}
