//! Active health checks: one probe task per backend on the control runtime, never on
//! the data path.
//!
//! A backend goes down after `fall` failed probes in a row and comes back after
//! `rise` successes. A backend that has never been up starts down, is probed at
//! once and is used after its first success, however many probes failed before it
//! (a backend that starts late is not held back); slow start is only for a backend
//! that comes *back*, as in HAProxy. A reload leaves the probes of a pool whose
//! health check is unchanged running, with their rise/fall counts; new backends get
//! their own, and a removed backend's probe ends. Each flip is logged once with the
//! reason, and flips only ever happen through [`Verdict::record`], which says
//! whether the state changed. Probe intervals are jittered (±10%) so a large pool
//! is not probed in lock-step.

mod exposition;
pub mod load_report;
mod probe;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rand::Rng;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::backend::{flag, Backend, CheckRecord};
use crate::config::HealthCheckConfig;
use crate::pool::Pool;
use crate::tasks::Tasks;

pub use probe::{probe, ProbeError};

/// The rise/fall counter of one backend.
#[derive(Debug, Clone)]
pub struct Verdict {
    rise: u32,
    fall: u32,
    up: bool,
    /// Never been up: the first success is enough.
    fresh: bool,
    streak: u32,
}

impl Verdict {
    pub fn new(rise: u32, fall: u32, up: bool, fresh: bool) -> Verdict {
        Verdict {
            rise,
            fall,
            up,
            fresh,
            streak: 0,
        }
    }

    /// Records one probe result; returns the new state when it flipped.
    pub fn record(&mut self, ok: bool) -> Option<bool> {
        if ok == self.up {
            self.streak = 0;
            return None;
        }
        self.streak += 1;
        if self.streak >= self.needed(ok) {
            self.up = ok;
            self.streak = 0;
            if ok {
                self.fresh = false;
            }
            Some(ok)
        } else {
            None
        }
    }

    pub fn is_up(&self) -> bool {
        self.up
    }

    /// Probes in a row with result `ok` that flip the state now (for the log).
    pub fn needed(&self, ok: bool) -> u32 {
        match (ok, self.fresh) {
            (true, true) => 1,
            (true, false) => self.rise,
            (false, _) => self.fall,
        }
    }
}

/// Starts probing the backends of `pool` with `cfg` until `stop` fires or the
/// backend leaves the pool: every backend with `all` (new probes replace ones
/// being stopped), otherwise those with no probe running (a reload that kept the
/// health check). Probes (and the slow-start ramps they start) run on `tasks`,
/// tracked.
pub fn spawn(
    pool: &Arc<Pool>,
    cfg: Arc<HealthCheckConfig>,
    stop: &CancellationToken,
    tasks: &Tasks,
    all: bool,
) {
    for backend in pool.backends() {
        if !all && backend.is_probed() {
            continue;
        }
        // Counted now, not when the task first runs: a reload right behind this one
        // must see it probed.
        let running = backend.probe_guard();
        let probe = check_loop(
            running,
            pool.clone(),
            backend,
            cfg.clone(),
            stop.clone(),
            tasks.clone(),
        );
        tasks.spawn(probe);
    }
}

async fn check_loop(
    _running: crate::backend::ProbeGuard,
    pool: Arc<Pool>,
    b: Arc<Backend>,
    cfg: Arc<HealthCheckConfig>,
    stop: CancellationToken,
    tasks: Tasks,
) {
    let checked_before = b.last_check().is_some();
    let healthy = b.flags() & flag::UNHEALTHY == 0;
    let mut verdict = Verdict::new(cfg.rise, cfg.fall, healthy, !b.been_up());
    // A backend whose probes restart (its health check changed) keeps its state:
    // no immediate re-probe.
    if checked_before && sleep_or_stop(jittered(cfg.interval), &stop).await {
        return;
    }
    loop {
        if !pool.contains(&b) {
            return; // a reload removed it
        }
        let t0 = std::time::Instant::now();
        let result = tokio::select! {
            _ = stop.cancelled() => return,
            r = probe(&cfg, &b, pool.send_proxy()) => r,
        };
        b.histograms.health_check.record(t0.elapsed());
        let counter = if result.is_ok() {
            &b.stats.checks_ok
        } else {
            &b.stats.checks_failed
        };
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        b.record_check(CheckRecord {
            ok: result.is_ok(),
            at: SystemTime::now(),
            detail: match &result {
                Ok(()) => "ok".to_string(),
                Err(e) => e.to_string(),
            },
        });
        let needed = verdict.needed(result.is_ok());
        if let Some(up) = verdict.record(result.is_ok()) {
            flip(&pool, &b, up, needed, result.err(), &tasks);
        }
        // Also without a flip: a pool whose backends never came up is all down too.
        pool.report_all_down();
        if sleep_or_stop(jittered(cfg.interval), &stop).await {
            return;
        }
    }
}

/// Applies and logs a health flip, once.
fn flip(
    pool: &Arc<Pool>,
    b: &Arc<Backend>,
    up: bool,
    // Probes in a row that did it: 1 for a backend's first time up.
    streak: u32,
    why: Option<ProbeError>,
    tasks: &Tasks,
) {
    if up {
        if b.clear_flag(flag::UNHEALTHY) {
            info!(pool = %pool.name, backend = %b.name, rise = streak, "backend up: health check passed");
            // Slow start is for a backend coming back, not for its first time up.
            if b.been_up() {
                slow_start(pool, b, tasks);
            }
            b.set_been_up();
        }
    } else if b.set_flag(flag::UNHEALTHY) {
        warn!(
            pool = %pool.name,
            backend = %b.name,
            reason = %why.map_or_else(|| "unknown".to_string(), |e| e.to_string()),
            fall = streak,
            "backend down: health check failed"
        );
    }
}

/// Ramps a recovered backend's weight from 10% to 100% over the pool's `slow_start`,
/// rebuilding the pool's selector at each step.
pub fn slow_start(pool: &Arc<Pool>, b: &Arc<Backend>, tasks: &Tasks) {
    let ramp = pool.config().slow_start;
    if ramp.is_zero() {
        return;
    }
    const STEPS: u32 = 10;
    b.set_ramp(1000 / STEPS);
    pool.reweigh();
    let (pool, b) = (pool.clone(), b.clone());
    tasks.spawn_until_stop(async move {
        for step in 2..=STEPS {
            tokio::time::sleep(ramp / STEPS).await;
            b.set_ramp(step * 1000 / STEPS);
            pool.reweigh();
        }
    });
}

fn jittered(d: Duration) -> Duration {
    d.mul_f64(rand::thread_rng().gen_range(0.9..1.1))
}

/// Sleeps; returns true if `stop` fired first.
async fn sleep_or_stop(d: Duration, stop: &CancellationToken) -> bool {
    tokio::select! {
        _ = stop.cancelled() => true,
        _ = tokio::time::sleep(d) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_backend_is_up_after_one_success() {
        let mut v = Verdict::new(2, 3, false, true);
        assert_eq!(v.record(true), Some(true));
    }

    #[test]
    fn falls_after_fall_failures_and_rises_after_rise() {
        let mut v = Verdict::new(2, 3, true, false);
        assert_eq!(v.record(false), None);
        assert_eq!(v.record(false), None);
        assert_eq!(v.record(false), Some(false));
        assert_eq!(v.record(false), None, "a flip is reported once");
        assert_eq!(v.record(true), None);
        assert_eq!(v.record(true), Some(true));
        assert!(v.is_up());
    }

    #[test]
    fn a_success_resets_the_failure_streak() {
        let mut v = Verdict::new(2, 3, true, false);
        v.record(false);
        v.record(false);
        assert_eq!(v.record(true), None);
        assert_eq!(v.record(false), None);
        assert_eq!(v.record(false), None);
        assert_eq!(v.record(false), Some(false));
    }
}

#[cfg(test)]
mod slow_start_tests {
    use super::*;
    use crate::config::Config;

    fn pool() -> Arc<Pool> {
        let cfg = Config::parse(
            r#"
[[listeners]]
name = "l"
bind = "127.0.0.1:0"
pool = "p"
[[pools]]
name = "p"
slow_start = "10s"
backends = [ { address = "127.0.0.1:1", weight = 100 } ]
[pools.health_check]
kind = "tcp"
"#,
            std::path::Path::new("t.toml"),
        )
        .unwrap();
        Pool::new(&cfg.pools[0])
    }

    /// With paused time: a backend that comes back starts at 10% of its weight and
    /// reaches 100% after `slow_start`, in steps.
    #[tokio::test(start_paused = true)]
    async fn recovered_backend_ramps_up_over_slow_start() {
        let pool = pool();
        let b = pool.backends()[0].clone();
        let tasks = Tasks::new(tokio::runtime::Handle::current());
        flip(&pool, &b, true, 1, None, &tasks);
        flip(&pool, &b, false, 3, None, &tasks);
        flip(&pool, &b, true, 2, None, &tasks);
        assert!(b.is_usable());
        assert_eq!(b.weight(), 10);
        tokio::time::sleep(Duration::from_millis(5_500)).await;
        let mid = b.weight();
        assert!((40..=70).contains(&mid), "half-way weight {mid}");
        tokio::time::sleep(Duration::from_secs(6)).await;
        assert_eq!(b.weight(), 100);
        assert_eq!(b.base_weight(), 100);
    }

    /// A backend's first time up (startup, or added by a reload) takes its full
    /// weight at once: slow start is for coming back (HAProxy does the same).
    #[tokio::test(start_paused = true)]
    async fn first_time_up_takes_full_weight() {
        let pool = pool();
        let b = pool.backends()[0].clone();
        let tasks = Tasks::new(tokio::runtime::Handle::current());
        flip(&pool, &b, true, 1, None, &tasks);
        assert!(b.is_usable());
        assert_eq!(b.weight(), 100);
    }

    /// A backend that has never been up comes up on its first success, however
    /// many probes failed before (not after `rise`).
    #[test]
    fn never_up_comes_up_on_the_first_success_after_failures() {
        let mut v = Verdict::new(3, 2, false, true);
        for _ in 0..5 {
            assert_eq!(v.record(false), None);
        }
        assert_eq!(v.needed(true), 1);
        assert_eq!(v.record(true), Some(true));
        // Once it has been up, coming back takes `rise`.
        assert_eq!(v.record(false), None);
        assert_eq!(v.record(false), Some(false));
        assert_eq!(v.needed(true), 3);
        assert_eq!(v.record(true), None);
        assert_eq!(v.record(true), None);
        assert_eq!(v.record(true), Some(true));
    }
}
