//! The Prometheus exporter of one flowgate instance: its own recorder, the scrape
//! (`GET /metrics`, through the admin API) and the upkeep of its histograms.
//!
//! Counters and gauges live as plain atomics in the objects they describe
//! ([`crate::backend::BackendStats`], [`crate::proxy::tcp::ListenerShared`], the UDP
//! listeners, the access log): the data path pays one relaxed atomic add per event,
//! and never touches the registry. At each scrape, [`Exporter::render`] adds what
//! each atomic gained since the last scrape to its registry counter (gauges are
//! `set`), reading the objects from an [`Inventory`] its owner hands it, and renders
//! the registry with `metrics-exporter-prometheus`. Label values are listener, pool
//! and backend names from the configuration, never anything a client sends.
//!
//! Histograms are `metrics` handles registered once per backend or listener, inside
//! [`Exporter::scope`], so a sample is a lock-free push into this instance's
//! recorder; [`Exporter::upkeep`] folds the samples into buckets every few seconds,
//! so memory stays bounded even when nobody scrapes.
//!
//! The recorder is never installed process-wide: two instances in one process each
//! export their own objects.

use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use metrics::{counter, gauge, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusRecorder};
use metrics_util::MetricKindMask;
use tokio_util::sync::CancellationToken;

use super::names::*;
use crate::backend::{Backend, BackendState, ConnectError};
use crate::pool::Pool;
use crate::proxy::tcp::ListenerShared;
use crate::proxy::udp::UdpListenerShared;

/// Bucket bounds (seconds) for connect, first-byte and health-check times: 100 µs to
/// 10 s, fine at the low end where a healthy LAN backend sits.
const FAST_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];
/// Bucket bounds (seconds) for whole sessions: 1 ms to 4 h (inference streams last).
const SESSION_BUCKETS: &[f64] = &[
    0.001, 0.01, 0.1, 1.0, 10.0, 60.0, 300.0, 1800.0, 3600.0, 14400.0,
];
/// Bucket bounds (seconds) for HTTP requests and their time to the response head
/// and first body byte: 0.5 ms (a proxied request on loopback) to 5 minutes (a
/// long inference stream; time to first token under load).
const REQUEST_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 300.0,
];
/// How often histogram samples are folded into buckets.
pub const UPKEEP_EVERY: Duration = Duration::from_secs(5);
/// Gauges not set for this long (those of backends and listeners a reload removed)
/// leave the output.
const GAUGE_IDLE: Duration = Duration::from_secs(60);

/// The objects a scrape reads, as the instance's owner sees them now.
#[derive(Debug, Default)]
pub struct Inventory {
    pub listeners: Vec<Arc<ListenerShared>>,
    pub udp_listeners: Vec<Arc<UdpListenerShared>>,
    /// Current and retiring backends are read through their pools.
    pub pools: Vec<Arc<Pool>>,
    pub reloads: ReloadStats,
    /// Access-log lines dropped because the writer fell behind.
    pub access_log_dropped: u64,
}

/// Reload outcomes, for `flowgate_config_reloads_total`.
#[derive(Debug, Clone, Copy)]
pub struct ReloadStats {
    pub ok: u64,
    pub failed: u64,
    /// The last successful load: startup or reload.
    pub last_success: SystemTime,
}

impl Default for ReloadStats {
    fn default() -> Self {
        ReloadStats {
            ok: 0,
            failed: 0,
            last_success: SystemTime::UNIX_EPOCH,
        }
    }
}

/// One instance's recorder and what it last exported.
pub struct Exporter {
    recorder: PrometheusRecorder,
    process: metrics_process::Collector,
    /// What the previous scrapes exported. Held for a whole scrape, so scrapes run
    /// one at a time: two at once (an HA pair of Prometheus servers) would each read
    /// an atomic and race to add its gain.
    last: Mutex<Seen>,
}

/// What was exported, kept between scrapes, and only for objects that still exist.
#[derive(Default)]
struct Seen {
    /// Per counter series and object: the value exported and the scrape it was in.
    counters: HashMap<String, (u64, u64)>,
    /// The labels of each backend exported, by object.
    backends: HashMap<u64, Labels>,
    /// Scrapes so far.
    scrape: u64,
}

type Labels = Vec<(&'static str, String)>;

impl std::fmt::Debug for Exporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exporter").finish_non_exhaustive()
    }
}

impl Exporter {
    /// A new recorder, or `None` (with a warning) if it cannot be built. Build it
    /// before backends and listeners exist, and create them in [`Exporter::scope`],
    /// so their histogram handles record here.
    pub fn new() -> Option<Arc<Exporter>> {
        let built = (|| {
            let mut b =
                PrometheusBuilder::new().idle_timeout(MetricKindMask::GAUGE, Some(GAUGE_IDLE));
            for name in [
                BACKEND_CONNECT_DURATION,
                BACKEND_FIRST_BYTE_DURATION,
                HEALTH_CHECK_DURATION,
            ] {
                b = b.set_buckets_for_metric(Matcher::Full(name.into()), FAST_BUCKETS)?;
            }
            // Without buckets the exporter would write these as summaries (its
            // default), which cannot be summed over instances and cost a
            // quantile sketch update per sample.
            for name in [HTTP_DURATION, HTTP_FIRST_BYTE, HTTP_HEAD] {
                b = b.set_buckets_for_metric(Matcher::Full(name.into()), REQUEST_BUCKETS)?;
            }
            b.set_buckets_for_metric(Matcher::Full(SESSION_DURATION.into()), SESSION_BUCKETS)
        })();
        match built {
            Ok(b) => {
                let e = Exporter {
                    recorder: b.build_recorder(),
                    process: metrics_process::Collector::default(),
                    last: Mutex::new(Seen::default()),
                };
                e.scope(|| {
                    describe();
                    e.process.describe();
                });
                Some(Arc::new(e))
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot build the metrics recorder; /metrics is off");
                None
            }
        }
    }

    /// Runs `f` with this instance's recorder as the one `metrics` macros use (on
    /// this thread): histogram handles registered in it record here.
    pub fn scope<T>(&self, f: impl FnOnce() -> T) -> T {
        metrics::with_local_recorder(&self.recorder, f)
    }

    /// Folds histogram samples into buckets every [`UPKEEP_EVERY`] until `stop`.
    pub async fn upkeep(self: Arc<Self>, stop: CancellationToken) {
        let mut tick = tokio::time::interval(UPKEEP_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => self.recorder.handle().run_upkeep(),
            }
        }
    }

    /// The Prometheus text exposition of everything in `inv`.
    pub fn render(&self, inv: &Inventory) -> String {
        let mut seen = self.last.lock().unwrap_or_else(|e| e.into_inner());
        seen.scrape += 1;
        self.scope(|| {
            self.process.collect();
            Scrape { seen: &mut seen }.sync(inv);
        });
        // Objects gone since (a reload removed them): forget what they exported,
        // so churn does not grow this map.
        let now = seen.scrape;
        seen.counters.retain(|_, (_, at)| *at == now);
        self.recorder.handle().render()
    }
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_gauge!(BUILD_INFO, "flowgate build information; always 1");
    describe_counter!(
        CONNECTIONS,
        "Client connections accepted, rejected ones included"
    );
    describe_gauge!(CONNECTIONS_ACTIVE, "Client connections open now");
    describe_counter!(
        CONNECTIONS_REJECTED,
        "Client connections closed without being served, by reason"
    );
    describe_gauge!(
        BACKEND_UP,
        "1 if the backend takes new connections, 0 if down, draining or disabled"
    );
    describe_gauge!(
        BACKEND_STATE,
        "1 for the backend's current state (up, down, draining, disabled)"
    );
    describe_gauge!(BACKEND_ACTIVE, "Connections open to the backend now");
    describe_gauge!(
        BACKEND_MAX_CONNECTIONS,
        "The backend's max_connections (only for backends that have one)"
    );
    describe_gauge!(
        BACKEND_LOAD_SCORE,
        "least-load: the backend's score now (lower takes the next request)"
    );
    describe_gauge!(
        BACKEND_REPORTED,
        "least-load: the backend's last fresh report, by signal (waiting, running, cache)"
    );
    describe_counter!(
        LOAD_REPORT_ERRORS,
        "least-load: failed load reports, by reason"
    );
    describe_gauge!(
        LOAD_REPORT_AGE,
        "least-load: seconds since the backend's last good load report"
    );
    describe_gauge!(
        POOL_QUEUE_LENGTH,
        "Clients waiting for a backend slot (queue_timeout) now"
    );
    describe_counter!(
        POOL_QUEUE_TIMEOUTS,
        "Clients that waited queue_timeout for a backend slot and gave up"
    );
    describe_counter!(
        BACKEND_CONNECTIONS,
        "Connections established to the backend"
    );
    describe_counter!(
        BACKEND_CONNECT_ERRORS,
        "Failed connect attempts to the backend, by reason"
    );
    describe_counter!(
        BACKEND_BYTES,
        Unit::Bytes,
        "Bytes moved to and from the backend, counted as they move"
    );
    describe_histogram!(
        BACKEND_CONNECT_DURATION,
        Unit::Seconds,
        "Time of successful TCP connects to the backend"
    );
    describe_histogram!(
        BACKEND_FIRST_BYTE_DURATION,
        Unit::Seconds,
        "Time from the backend connect to its first byte (time to first token)"
    );
    describe_histogram!(
        SESSION_DURATION,
        Unit::Seconds,
        "Client session length, accept to close"
    );
    describe_counter!(HEALTH_CHECKS, "Active health probes, by result");
    describe_histogram!(
        HEALTH_CHECK_DURATION,
        Unit::Seconds,
        "Time of active health probes"
    );
    describe_counter!(CONFIG_RELOADS, "Configuration reloads, by result");
    describe_gauge!(
        CONFIG_LAST_RELOAD,
        "Unix time of the last successful configuration load"
    );
    describe_counter!(
        ACCESS_LOG_DROPPED,
        "Access-log lines dropped because the writer fell behind"
    );
    describe_gauge!(UDP_SESSIONS_ACTIVE, "UDP sessions open now");
    describe_gauge!(
        HTTP_IN_FLIGHT,
        "HTTP requests sent to the backend whose response has not ended"
    );
    describe_counter!(
        HTTP_REQUESTS,
        "HTTP requests by listener, route, pool, backend and status class"
    );
    describe_histogram!(
        HTTP_DURATION,
        Unit::Seconds,
        "HTTP requests, from the head's arrival to the response's end"
    );
    describe_histogram!(
        HTTP_FIRST_BYTE,
        Unit::Seconds,
        "From sending the request upstream to the first response body byte (time to first token)"
    );
    describe_histogram!(
        HTTP_HEAD,
        Unit::Seconds,
        "From sending the request upstream to the response head"
    );
    describe_counter!(UDP_SESSIONS, "UDP sessions started");
    describe_counter!(UDP_DATAGRAMS, "UDP datagrams forwarded, by direction");
    describe_counter!(
        UDP_BYTES,
        Unit::Bytes,
        "UDP payload bytes forwarded, by direction"
    );
    describe_counter!(UDP_DROPPED, "UDP datagrams dropped, by reason");
    describe_gauge!(
        BACKEND_UDP_SESSIONS_ACTIVE,
        "UDP sessions open on the backend now"
    );
    describe_counter!(BACKEND_UDP_SESSIONS, "UDP sessions started on the backend");
}

/// One scrape: adds each atomic's gain since the last one to the registry.
struct Scrape<'a> {
    seen: &'a mut Seen,
}

impl Scrape<'_> {
    /// Adds to a registry counter what `owner`'s atomic gained since the last scrape.
    /// A backend or listener that a reload removed and a later reload re-added is a
    /// new object starting from 0: its series then goes on growing from where the
    /// old one stopped, as Prometheus expects of a counter (`absolute` would stay
    /// stuck at the old maximum instead).
    fn export(
        &mut self,
        name: &'static str,
        labels: &[(&'static str, String)],
        owner: u64,
        now: u64,
    ) {
        let mut key = String::from(name);
        for (k, v) in labels {
            key.push_str(k);
            key.push('=');
            key.push_str(v);
            key.push(',');
        }
        // Per object: two objects with the same labels (a backend re-added by a
        // reload while its old copy still drains) both add what they gained.
        key.push_str(&format!("@{owner:x}"));
        let prev = self.seen.counters.insert(key, (now, self.seen.scrape));
        // Less than last time cannot happen for one object (ids are never reused),
        // but a counter that went back is taken as counting from 0.
        let delta = match prev {
            Some((v, _)) if now >= v => now - v,
            _ => now,
        };
        counter!(name, labels).increment(delta);
    }
    /// Copies the atomics into the registry.
    fn sync(&mut self, inv: &Inventory) {
        gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
        let r = inv.reloads;
        self.export(CONFIG_RELOADS, &[("result", "success".into())], 0, r.ok);
        self.export(CONFIG_RELOADS, &[("result", "failure".into())], 0, r.failed);
        gauge!(CONFIG_LAST_RELOAD).set(secs(r.last_success));
        self.export(ACCESS_LOG_DROPPED, &[], 0, inv.access_log_dropped);

        for s in &inv.listeners {
            let owner = s.id;
            let labels = [("listener", s.name.to_string())];
            self.export(CONNECTIONS, &labels, owner, s.accepted.load(Relaxed));
            gauge!(CONNECTIONS_ACTIVE, &labels).set(s.active.load(Relaxed) as f64);
            for (reason, n) in s.rejected() {
                let l = with(&labels, "reason", reason);
                self.export(CONNECTIONS_REJECTED, &l, owner, n);
            }
        }
        for u in &inv.udp_listeners {
            self.udp_listener(u);
        }
        for p in &inv.pools {
            let labels = [("pool", p.name.to_string())];
            gauge!(POOL_QUEUE_LENGTH, &labels).set(p.queue.len() as f64);
            let timeouts = p.queue.timeouts.load(Relaxed);
            self.export(POOL_QUEUE_TIMEOUTS, &labels, p.id, timeouts);
            for b in p.backends() {
                let Some(l) = p.load_view(&b) else { break };
                let labels = [
                    ("pool", p.name.to_string()),
                    ("backend", b.name.to_string()),
                ];
                gauge!(BACKEND_LOAD_SCORE, &labels).set(l.score);
                if let Some(r) = l.report {
                    for (signal, v) in [
                        ("waiting", r.waiting),
                        ("running", r.running),
                        ("cache", r.cache),
                    ] {
                        gauge!(BACKEND_REPORTED, &with(&labels, "signal", signal)).set(v);
                    }
                }
                if let Some(age) = l.report_age {
                    gauge!(LOAD_REPORT_AGE, &labels).set(age);
                }
                for e in crate::load::LoadError::ALL {
                    let n = b.load.errors[e as usize].load(Relaxed);
                    self.export(
                        LOAD_REPORT_ERRORS,
                        &with(&labels, "reason", e.as_str()),
                        b.id,
                        n,
                    );
                }
            }
        }
        let backends: Vec<_> = inv
            .pools
            .iter()
            // Retiring copies first, so a current backend with the same address sets
            // the gauges last.
            .flat_map(|p| p.retiring().into_iter().chain(p.backends()))
            .collect();
        // A backend gone since the last scrape (a reload removed it and its drain
        // is over) takes no connections: say so at once rather than leave its last
        // `up` for the gauges' idle timeout. Before the live ones, which may share
        // its labels.
        let live: std::collections::HashSet<u64> = backends.iter().map(|b| b.id).collect();
        self.seen.backends.retain(|owner, labels| {
            let keep = live.contains(owner);
            if !keep {
                gauge!(BACKEND_UP, &*labels).set(0.0);
                gauge!(BACKEND_ACTIVE, &*labels).set(0.0);
            }
            keep
        });
        for b in &backends {
            self.backend(b);
        }
    }

    fn udp_listener(&mut self, l: &Arc<UdpListenerShared>) {
        let owner = l.id;
        let name = l.name.to_string();
        let t = l.totals();
        let labels = [("listener", name.clone())];
        gauge!(UDP_SESSIONS_ACTIVE, &labels).set(l.active.load(Relaxed) as f64);
        self.export(UDP_SESSIONS, &labels, owner, l.sessions.load(Relaxed));
        for (dir, d, b) in [
            ("to_backend", t.datagrams_to, t.bytes_to),
            ("from_backend", t.datagrams_from, t.bytes_from),
        ] {
            let l = [("listener", name.clone()), ("direction", dir.to_string())];
            self.export(UDP_DATAGRAMS, &l, owner, d);
            self.export(UDP_BYTES, &l, owner, b);
        }
        for (reason, n) in t.dropped {
            let l = [("listener", name.clone()), ("reason", reason.to_string())];
            self.export(UDP_DROPPED, &l, owner, n);
        }
    }

    fn backend(&mut self, b: &Arc<Backend>) {
        let owner = b.id;
        let labels = [
            ("pool", b.pool.to_string()),
            ("backend", b.name.to_string()),
        ];
        self.seen.backends.insert(owner, labels.to_vec());
        let st = &b.stats;
        let state = b.state();
        gauge!(BACKEND_UP, &labels).set(if b.is_usable() { 1.0 } else { 0.0 });
        for s in [
            BackendState::Up,
            BackendState::Down,
            BackendState::Draining,
            BackendState::Disabled,
        ] {
            let on = if s == state { 1.0 } else { 0.0 };
            gauge!(BACKEND_STATE, &with(&labels, "state", s.as_str())).set(on);
        }
        gauge!(BACKEND_ACTIVE, &labels).set(b.active() as f64);
        if let Some(cap) = b.max_connections() {
            gauge!(BACKEND_MAX_CONNECTIONS, &labels).set(cap as f64);
        }
        self.export(
            BACKEND_CONNECTIONS,
            &labels,
            owner,
            st.connections.load(Relaxed),
        );
        for e in ConnectError::ALL {
            let n = st.connect_errors[e as usize].load(Relaxed);
            let l = with(&labels, "reason", e.as_str());
            self.export(BACKEND_CONNECT_ERRORS, &l, owner, n);
        }
        for (dir, n) in [
            ("to_backend", &st.bytes_to),
            ("from_backend", &st.bytes_from),
        ] {
            let l = with(&labels, "direction", dir);
            self.export(BACKEND_BYTES, &l, owner, n.load(Relaxed));
        }
        for (result, n) in [("success", &st.checks_ok), ("failure", &st.checks_failed)] {
            let l = with(&labels, "result", result);
            self.export(HEALTH_CHECKS, &l, owner, n.load(Relaxed));
        }
        gauge!(BACKEND_UDP_SESSIONS_ACTIVE, &labels).set(st.udp_active.load(Relaxed) as f64);
        // Only backends that took HTTP requests: an L4-only pool shows no series.
        if st.http_requests.load(Relaxed) > 0 {
            gauge!(HTTP_IN_FLIGHT, &labels).set(st.http_in_flight.load(Relaxed) as f64);
        }
        self.export(
            BACKEND_UDP_SESSIONS,
            &labels,
            owner,
            st.udp_sessions.load(Relaxed),
        );
    }
}

fn secs(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// `labels` plus one more.
fn with(
    labels: &[(&'static str, String)],
    key: &'static str,
    value: &str,
) -> Vec<(&'static str, String)> {
    let mut l = labels.to_vec();
    l.push((key, value.to_string()));
    l
}
