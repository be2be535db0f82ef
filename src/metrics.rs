//! Prometheus metrics, served as `GET /metrics` by the admin API.
//!
//! Counters and gauges live as plain atomics in the objects they describe
//! ([`crate::backend::BackendStats`], [`crate::listener::ListenerShared`], the UDP
//! listeners, the access log): the data path pays one relaxed atomic add per event,
//! and never touches the `metrics` registry. At each scrape, [`render`] adds what
//! each atomic gained since the last scrape to its registry counter (gauges are
//! `set`) and renders the registry with `metrics-exporter-prometheus`. Label values are listener, pool and
//! backend names from the configuration, never anything a client sends.
//!
//! Histograms are `metrics` handles registered once per backend or listener, so a
//! sample is a lock-free push; [`upkeep`] folds the samples into buckets every few
//! seconds, so memory stays bounded even when nobody scrapes.
//!
//! The recorder is installed only when an admin listener is configured. Without one
//! the histogram handles are no-ops and the atomics are still counted (the API and
//! the access log use them).

use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use metrics::{counter, gauge, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use metrics_util::MetricKindMask;

use crate::backend::{Backend, BackendState, ConnectError};
use crate::runtime::Flowgate;

/// Metric names: the user contract (docs/metrics.md).
pub mod names {
    pub const BUILD_INFO: &str = "flowgate_build_info";
    pub const CONNECTIONS: &str = "flowgate_connections_total";
    pub const CONNECTIONS_ACTIVE: &str = "flowgate_connections_active";
    pub const CONNECTIONS_REJECTED: &str = "flowgate_connections_rejected_total";
    pub const BACKEND_UP: &str = "flowgate_backend_up";
    pub const BACKEND_STATE: &str = "flowgate_backend_state";
    pub const BACKEND_ACTIVE: &str = "flowgate_backend_connections_active";
    pub const BACKEND_CONNECTIONS: &str = "flowgate_backend_connections_total";
    pub const BACKEND_CONNECT_ERRORS: &str = "flowgate_backend_connect_errors_total";
    pub const BACKEND_BYTES: &str = "flowgate_backend_bytes_total";
    pub const BACKEND_CONNECT_DURATION: &str = "flowgate_backend_connect_duration_seconds";
    pub const BACKEND_FIRST_BYTE_DURATION: &str = "flowgate_backend_first_byte_duration_seconds";
    pub const SESSION_DURATION: &str = "flowgate_session_duration_seconds";
    pub const HEALTH_CHECKS: &str = "flowgate_health_checks_total";
    pub const HEALTH_CHECK_DURATION: &str = "flowgate_health_check_duration_seconds";
    pub const CONFIG_RELOADS: &str = "flowgate_config_reloads_total";
    pub const CONFIG_LAST_RELOAD: &str = "flowgate_config_last_reload_success_timestamp_seconds";
    pub const ACCESS_LOG_DROPPED: &str = "flowgate_access_log_dropped_total";
    pub const UDP_SESSIONS_ACTIVE: &str = "flowgate_udp_sessions_active";
    pub const UDP_SESSIONS: &str = "flowgate_udp_sessions_total";
    pub const UDP_DATAGRAMS: &str = "flowgate_udp_datagrams_total";
    pub const UDP_BYTES: &str = "flowgate_udp_bytes_total";
    pub const UDP_DROPPED: &str = "flowgate_udp_dropped_total";
    pub const BACKEND_UDP_SESSIONS_ACTIVE: &str = "flowgate_backend_udp_sessions_active";
    pub const BACKEND_UDP_SESSIONS: &str = "flowgate_backend_udp_sessions_total";
}
use names::*;

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
/// How often histogram samples are folded into buckets.
pub const UPKEEP_EVERY: Duration = Duration::from_secs(5);
/// Gauges not set for this long (those of backends and listeners a reload removed)
/// leave the output.
const GAUGE_IDLE: Duration = Duration::from_secs(60);

struct Exporter {
    handle: PrometheusHandle,
    process: metrics_process::Collector,
}

static EXPORTER: OnceLock<Option<Exporter>> = OnceLock::new();

/// Installs the process-wide recorder (once; later calls are no-ops). Must run
/// before backends and listeners are created, so their histogram handles record.
pub fn install() {
    EXPORTER.get_or_init(|| {
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
            b =
                b.set_buckets_for_metric(Matcher::Full(SESSION_DURATION.into()), SESSION_BUCKETS)?;
            b.install_recorder()
        })();
        match built {
            Ok(handle) => {
                describe();
                let process = metrics_process::Collector::default();
                process.describe();
                Some(Exporter { handle, process })
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot install the metrics recorder; /metrics is off");
                None
            }
        }
    });
}

/// Whether a recorder is installed.
pub fn enabled() -> bool {
    matches!(EXPORTER.get(), Some(Some(_)))
}

/// Folds histogram samples into buckets; run every [`UPKEEP_EVERY`].
pub async fn upkeep() {
    let Some(Some(e)) = EXPORTER.get() else {
        return;
    };
    let mut tick = tokio::time::interval(UPKEEP_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        e.handle.run_upkeep();
    }
}

/// The Prometheus text exposition of everything, or `None` without a recorder.
pub fn render(fg: &Flowgate) -> Option<String> {
    let Some(Some(e)) = EXPORTER.get() else {
        return None;
    };
    // One scrape at a time: two at once (an HA pair of Prometheus servers) would
    // each read an atomic and race to add its gain.
    static SCRAPE: Mutex<()> = Mutex::new(());
    let _one = SCRAPE.lock().unwrap_or_else(|e| e.into_inner());
    e.process.collect();
    sync(fg);
    Some(e.handle.render())
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

/// What was last exported per counter series, and from which object.
static LAST: Mutex<Option<HashMap<String, u64>>> = Mutex::new(None);

/// Adds to a registry counter what `owner`'s atomic gained since the last scrape.
/// A backend or listener that a reload removed and a later reload re-added is a new
/// object starting from 0: its series then goes on growing from where the old one
/// stopped, as Prometheus expects of a counter (`absolute` would stay stuck at the
/// old maximum instead).
fn export(name: &'static str, labels: &[(&'static str, String)], owner: usize, now: u64) {
    let mut key = String::from(name);
    for (k, v) in labels {
        key.push_str(k);
        key.push('=');
        key.push_str(v);
        key.push(',');
    }
    // Per object: two objects with the same labels (a backend re-added by a reload
    // while its old copy still drains) both add what they gained.
    key.push_str(&format!("@{owner:x}"));
    let mut last = LAST.lock().unwrap_or_else(|e| e.into_inner());
    let last = last.get_or_insert_with(HashMap::new);
    let prev = last.insert(key, now);
    // Less than last time: a new object at a freed address; it counts from 0.
    let delta = match prev {
        Some(v) if now >= v => now - v,
        _ => now,
    };
    counter!(name, labels).increment(delta);
}

fn secs(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Copies the atomics into the registry.
fn sync(fg: &Flowgate) {
    gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    let r = fg.reload_stats();
    export(CONFIG_RELOADS, &[("result", "success".into())], 0, r.ok);
    export(CONFIG_RELOADS, &[("result", "failure".into())], 0, r.failed);
    gauge!(CONFIG_LAST_RELOAD).set(secs(r.last_success));
    export(ACCESS_LOG_DROPPED, &[], 0, crate::access_log::dropped());

    for l in fg.listeners() {
        let s = &l.shared;
        let owner = std::sync::Arc::as_ptr(s) as usize;
        let labels = [("listener", s.name.to_string())];
        export(CONNECTIONS, &labels, owner, s.accepted.load(Relaxed));
        gauge!(CONNECTIONS_ACTIVE, &labels).set(s.active.load(Relaxed) as f64);
        for (reason, n) in s.rejected() {
            let l = with(&labels, "reason", reason);
            export(CONNECTIONS_REJECTED, &l, owner, n);
        }
    }
    for u in fg.udp_listeners() {
        let owner = std::sync::Arc::as_ptr(&u.shared) as usize;
        crate::proxy::udp::export(&u.shared, |name, labels, n| export(name, labels, owner, n));
    }
    for p in fg.pools() {
        // Retiring copies first, so a current backend with the same address sets
        // the gauges last.
        for b in p.retiring().iter().chain(p.backends().iter()) {
            backend(b);
        }
    }
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

fn backend(b: &std::sync::Arc<Backend>) {
    let owner = std::sync::Arc::as_ptr(b) as usize;
    let labels = [
        ("pool", b.pool.to_string()),
        ("backend", b.name.to_string()),
    ];
    let st = &b.stats;
    let state = b.state();
    gauge!(BACKEND_UP, &labels).set(if b.is_usable() { 1.0 } else { 0.0 });
    for s in [
        BackendState::Up,
        BackendState::Down,
        BackendState::Draining,
        BackendState::Disabled,
    ] {
        gauge!(BACKEND_STATE, &with(&labels, "state", s.as_str())).set(if s == state {
            1.0
        } else {
            0.0
        });
    }
    gauge!(BACKEND_ACTIVE, &labels).set(b.active() as f64);
    export(
        BACKEND_CONNECTIONS,
        &labels,
        owner,
        st.connections.load(Relaxed),
    );
    for e in ConnectError::ALL {
        let n = st.connect_errors[e as usize].load(Relaxed);
        export(
            BACKEND_CONNECT_ERRORS,
            &with(&labels, "reason", e.as_str()),
            owner,
            n,
        );
    }
    for (dir, n) in [
        ("to_backend", &st.bytes_to),
        ("from_backend", &st.bytes_from),
    ] {
        export(
            BACKEND_BYTES,
            &with(&labels, "direction", dir),
            owner,
            n.load(Relaxed),
        );
    }
    for (result, n) in [("success", &st.checks_ok), ("failure", &st.checks_failed)] {
        export(
            HEALTH_CHECKS,
            &with(&labels, "result", result),
            owner,
            n.load(Relaxed),
        );
    }
    gauge!(BACKEND_UDP_SESSIONS_ACTIVE, &labels).set(st.udp_active.load(Relaxed) as f64);
    export(
        BACKEND_UDP_SESSIONS,
        &labels,
        owner,
        st.udp_sessions.load(Relaxed),
    );
}
