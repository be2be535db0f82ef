//! Active health checks: one probe task per backend on the control runtime, never on
//! the data path.
//!
//! A backend goes down after `fall` failed probes in a row and comes back after
//! `rise` successes. A backend that has never been checked starts down, is probed at
//! once and is used after its first success. Each flip is logged once with the
//! reason, and flips only ever happen through [`Verdict::record`], which says
//! whether the state changed. Probe intervals are jittered (±10%) so a large pool
//! is not probed in lock-step.

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
        let needed = if ok {
            if self.fresh {
                1
            } else {
                self.rise
            }
        } else {
            self.fall
        };
        if self.streak >= needed {
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
}

/// Starts probing every backend of `pool` with `cfg` until `stop` fires.
/// Probes (and the slow-start ramps they start) run on `tasks`, tracked.
pub fn spawn(
    pool: &Arc<Pool>,
    cfg: Arc<HealthCheckConfig>,
    stop: &CancellationToken,
    tasks: &Tasks,
) {
    for backend in pool.backends() {
        let probe = check_loop(
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
    pool: Arc<Pool>,
    b: Arc<Backend>,
    cfg: Arc<HealthCheckConfig>,
    stop: CancellationToken,
    tasks: Tasks,
) {
    let checked_before = b.last_check().is_some();
    let healthy = b.flags() & flag::UNHEALTHY == 0;
    let mut verdict = Verdict::new(cfg.rise, cfg.fall, healthy, !checked_before && !healthy);
    // A backend carried over by a reload keeps its state: no immediate re-probe.
    if checked_before && sleep_or_stop(jittered(cfg.interval), &stop).await {
        return;
    }
    loop {
        let t0 = std::time::Instant::now();
        let result = tokio::select! {
            _ = stop.cancelled() => return,
            r = probe(&cfg, &b) => r,
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
        if let Some(up) = verdict.record(result.is_ok()) {
            flip(&pool, &b, up, result.err(), &cfg, &tasks);
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
    why: Option<ProbeError>,
    cfg: &HealthCheckConfig,
    tasks: &Tasks,
) {
    if up {
        if b.clear_flag(flag::UNHEALTHY) {
            info!(pool = %pool.name, backend = %b.name, rise = cfg.rise, "backend up: health check passed");
            slow_start(pool, b, tasks);
        }
    } else if b.set_flag(flag::UNHEALTHY) {
        warn!(
            pool = %pool.name,
            backend = %b.name,
            reason = %why.map_or_else(|| "unknown".to_string(), |e| e.to_string()),
            fall = cfg.fall,
            "backend down: health check failed"
        );
    }
}

/// Ramps a recovered backend's weight from 10% to 100% over the pool's `slow_start`,
/// rebuilding the pool's selector at each step.
fn slow_start(pool: &Arc<Pool>, b: &Arc<Backend>, tasks: &Tasks) {
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

    /// With paused time: a recovered backend starts at 10% of its weight and reaches
    /// 100% after `slow_start`, in steps.
    #[tokio::test(start_paused = true)]
    async fn recovered_backend_ramps_up_over_slow_start() {
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
        let pool = Pool::new(&cfg.pools[0]);
        let b = pool.backends()[0].clone();
        let hc = cfg.pools[0].health_check.clone().unwrap();
        let tasks = Tasks::new(tokio::runtime::Handle::current());
        flip(&pool, &b, true, None, &hc, &tasks);
        assert!(b.is_usable());
        assert_eq!(b.weight(), 10);
        tokio::time::sleep(Duration::from_millis(5_500)).await;
        let mid = b.weight();
        assert!((40..=70).contains(&mid), "half-way weight {mid}");
        tokio::time::sleep(Duration::from_secs(6)).await;
        assert_eq!(b.weight(), 100);
        assert_eq!(b.base_weight(), 100);
    }
}
