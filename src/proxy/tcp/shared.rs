//! What a TCP listener's sessions share: its settings (swapped whole by a
//! reload), its counters, the tokens that stop it, and the places counted under
//! `max_connections`.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::sources::{self, SourceGuard, SourceTable};
use crate::config::{AcceptProxyConfig, ListenerConfig, SourcesConfig};
use crate::pool::Pool;
use crate::proxy::http::HttpSettings;
use crate::proxy::Context;
use crate::proxy::Termination;

/// The running pools by name.
pub type Pools = std::collections::HashMap<String, Arc<Pool>>;

/// What every session of a listener shares.
pub struct ListenerShared {
    /// Never reused (see [`crate::ids`]).
    pub id: u64,
    pub name: Arc<str>,
    /// What the runtime gave this listener: access log, control tasks, splice.
    pub ctx: Context,
    /// Replaced whole by a reload; a session keeps the settings it started with.
    settings: ArcSwap<ListenerSettings>,
    /// Stops this listener's accept loops (reload removed it, or shutdown).
    pub stop_accept: CancellationToken,
    /// Cuts this listener's sessions (a child of the process-wide hard stop).
    pub cut: CancellationToken,
    /// Set when a reload removed the listener: its sessions cut at the deadline end
    /// as `drained`, not `shutdown`.
    pub retired: AtomicBool,
    /// Sessions in progress, across all workers.
    pub active: AtomicUsize,
    /// Woken when the last session of a stopped listener ends (see
    /// [`ListenerShared::drained`]).
    idle: Notify,
    /// Accepted client connections, rejected ones included.
    pub accepted: AtomicU64,
    /// Clients closed at once because `max_connections` was reached.
    pub rejected_max_connections: AtomicU64,
    /// Clients closed because no backend was usable.
    pub rejected_no_backend: AtomicU64,
    /// Clients closed because every usable backend was at its `max_connections`
    /// (no queue, or `max_queue` reached).
    pub rejected_backends_full: AtomicU64,
    /// Clients that waited `queue_timeout` without a slot.
    pub rejected_queue_timeout: AtomicU64,
    /// Clients closed because every connect attempt failed.
    pub rejected_connect_failed: AtomicU64,
    /// Clients closed because of their PROXY header (`accept_proxy`): missing,
    /// malformed, too long, too slow, or from a peer outside `proxy_trusted`.
    pub rejected_proxy_header: AtomicU64,
    /// Clients closed by SNI routing: no complete ClientHello in time, bytes that
    /// are not TLS, or no route (with `sni_required`, or no default pool).
    pub rejected_sni: AtomicU64,
    /// Clients refused by `allow`/`deny`.
    pub rejected_acl: AtomicU64,
    /// Clients refused at `max_connections_per_source`.
    pub rejected_source_limit: AtomicU64,
    /// Clients refused over `max_rate_per_source`.
    pub rejected_source_rate: AtomicU64,
    /// Open connections and new-connection rates per source (kept across reloads).
    pub sources: Arc<SourceTable>,
    /// `flowgate_session_duration_seconds{listener}`.
    pub session_duration: metrics::Histogram,
}

impl std::fmt::Debug for ListenerShared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ListenerShared")
            .field("name", &self.name)
            .field("active", &self.active)
            .finish_non_exhaustive()
    }
}

/// A listener's settings as of the last (re)load.
#[derive(Debug)]
pub struct ListenerSettings {
    /// Where clients go (tcp); the pool of unrouted requests (http), if any.
    pub pool: Option<Arc<Pool>>,
    /// `protocol = "http"`: routes and limits; the accept loop serves HTTP then.
    pub http: Option<Arc<HttpSettings>>,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: Option<usize>,
    pub bind: SocketAddr,
    /// `accept_proxy`: the PROXY header every client connection starts with.
    pub accept_proxy: Option<AcceptProxyConfig>,
    /// `allow`, `deny` and the per-source limits.
    pub sources: Option<SourcesConfig>,
    /// `sni_routes`: the ClientHello's server_name picks the pool.
    pub sni: Option<Box<super::sni::SniRouter>>,
}

impl ListenerSettings {
    /// Settings for `cfg` over the running `pools` (run in the instance's metrics
    /// scope: http listeners create their metric handles here).
    pub fn new(cfg: &ListenerConfig, pools: &Pools) -> ListenerSettings {
        ListenerSettings {
            pool: cfg.pool.as_ref().and_then(|p| pools.get(p)).cloned(),
            http: cfg
                .http
                .as_ref()
                .map(|h| Arc::new(HttpSettings::new(cfg, h, pools))),
            connect_timeout: cfg.connect_timeout,
            idle_timeout: cfg.idle_timeout,
            max_connections: cfg.max_connections,
            bind: cfg.bind,
            accept_proxy: cfg.accept_proxy.clone(),
            sources: cfg.sources.clone(),
            sni: cfg
                .sni
                .as_ref()
                .map(|s| Box::new(super::sni::SniRouter::new(&cfg.name, s, pools))),
        }
    }

    /// Every pool this listener sends clients or requests to.
    pub fn pools(&self) -> Vec<Arc<Pool>> {
        let mut v: Vec<Arc<Pool>> = self.pool.iter().cloned().collect();
        for r in self.sni.iter().flat_map(|s| s.routes()) {
            if !v.iter().any(|x| Arc::ptr_eq(x, &r.pool)) {
                v.push(r.pool.clone());
            }
        }
        if let Some(h) = &self.http {
            for p in h.pools() {
                if !v.iter().any(|x| Arc::ptr_eq(x, p)) {
                    v.push(p.clone());
                }
            }
        }
        v
    }

    /// The pool shown as the listener's (`-` for an http listener without one).
    pub fn pool_name(&self) -> &str {
        self.pool.as_ref().map_or("-", |p| &p.name)
    }
}

impl ListenerShared {
    pub fn new(
        cfg: &ListenerConfig,
        pools: &Pools,
        ctx: Context,
        stop_accept: CancellationToken,
        cut: CancellationToken,
    ) -> Arc<ListenerShared> {
        Arc::new(ListenerShared {
            id: crate::ids::next(),
            name: cfg.name.as_str().into(),
            ctx,
            settings: ArcSwap::from_pointee(ListenerSettings::new(cfg, pools)),
            stop_accept,
            cut,
            active: AtomicUsize::new(0),
            idle: Notify::new(),
            accepted: AtomicU64::new(0),
            retired: AtomicBool::new(false),
            rejected_max_connections: AtomicU64::new(0),
            rejected_no_backend: AtomicU64::new(0),
            rejected_connect_failed: AtomicU64::new(0),
            rejected_backends_full: AtomicU64::new(0),
            rejected_queue_timeout: AtomicU64::new(0),
            rejected_proxy_header: AtomicU64::new(0),
            rejected_sni: AtomicU64::new(0),
            rejected_acl: AtomicU64::new(0),
            rejected_source_limit: AtomicU64::new(0),
            rejected_source_rate: AtomicU64::new(0),
            sources: Default::default(),
            session_duration: metrics::histogram!(
                crate::metrics::names::SESSION_DURATION,
                "listener" => cfg.name.clone()
            ),
        })
    }

    /// The source rules `cfg` for client `ip` (see [`sources::check`]); a refusal is
    /// counted here and logged at debug.
    pub fn admit(
        &self,
        cfg: &SourcesConfig,
        ip: IpAddr,
    ) -> Result<Option<SourceGuard>, Termination> {
        sources::check(&self.sources, cfg, ip).inspect_err(|t| {
            let counter = match t {
                Termination::Acl => &self.rejected_acl,
                Termination::SourceLimit => &self.rejected_source_limit,
                _ => &self.rejected_source_rate,
            };
            counter.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(listener = %self.name, client = %ip, reason = t.as_str(), "client refused");
        })
    }

    /// Rejected clients by reason (the `reason` label of
    /// `flowgate_connections_rejected_total`).
    pub fn rejected(&self) -> [(&'static str, u64); 10] {
        [
            (
                "max_connections",
                self.rejected_max_connections.load(Ordering::Relaxed),
            ),
            (
                "no_backend",
                self.rejected_no_backend.load(Ordering::Relaxed),
            ),
            (
                "connect_failed",
                self.rejected_connect_failed.load(Ordering::Relaxed),
            ),
            (
                "backends_full",
                self.rejected_backends_full.load(Ordering::Relaxed),
            ),
            (
                "queue_timeout",
                self.rejected_queue_timeout.load(Ordering::Relaxed),
            ),
            (
                "proxy_header",
                self.rejected_proxy_header.load(Ordering::Relaxed),
            ),
            ("sni", self.rejected_sni.load(Ordering::Relaxed)),
            ("acl", self.rejected_acl.load(Ordering::Relaxed)),
            (
                "source_limit",
                self.rejected_source_limit.load(Ordering::Relaxed),
            ),
            (
                "source_rate",
                self.rejected_source_rate.load(Ordering::Relaxed),
            ),
        ]
    }

    /// Resolves once the listener no longer accepts and its last session has
    /// ended: that session's place wakes it. Nothing polls.
    pub async fn drained(&self) {
        crate::tasks::wait_for(&self.idle, || {
            self.stop_accept.is_cancelled() && self.active.load(Ordering::SeqCst) == 0
        })
        .await
    }

    pub fn settings(&self) -> Arc<ListenerSettings> {
        self.settings.load_full()
    }

    pub fn set_settings(&self, s: ListenerSettings) {
        self.settings.store(Arc::new(s));
    }
}

/// A counted place under the listener's `max_connections`.
#[derive(Debug)]
pub(crate) struct Place(pub(crate) Arc<ListenerShared>);

impl Place {
    pub(crate) fn take(shared: &Arc<ListenerShared>, max: Option<usize>) -> Option<Place> {
        let before = shared.active.fetch_add(1, Ordering::AcqRel);
        if max.is_some_and(|max| before >= max) {
            shared.active.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(Place(shared.clone()))
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        let l = &self.0;
        if l.active.fetch_sub(1, Ordering::SeqCst) == 1 && l.stop_accept.is_cancelled() {
            l.idle.notify_waiters();
        }
    }
}
