//! A backend's load as `least-load` scores it (issue 14): what the backend last
//! reported (queue, running, cache), what flowgate had in flight then, and a speed
//! flowgate learns from what it sees.
//!
//! The data path only counts (a completion when the counted connection or request
//! ends) and reads the score's inputs; the control runtime
//! writes reports and the learned speed. Everything is an atomic.
//!
//! **Score**: an estimate of how long a new request would wait there for its first
//! token, in units of the backend's time per request (docs/configuration.md,
//! `least-load`): `slowness × (0.1 + (queue_weight × ahead + running_weight × busy
//! + cache_weight × cache) / concurrency) / weight`, where what is *present* is
//! flowgate's own in-flight count plus what a fresh report shows beyond it,
//! *concurrency* is learned from reports, *ahead* is what would wait before the new
//! request (0 while a slot is free) and `slowness` is the mean time per request
//! relative to the pool's median (Little's law over flowgate's own counts). Without
//! a fresh report: `(in flight + 1) × slowness / weight`.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::config::LoadWeights;

/// Milliseconds since a process-wide epoch (0 is "never").
pub fn now_ms() -> u64 {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let e = *EPOCH.get_or_init(|| Instant::now() - Duration::from_millis(1));
    e.elapsed().as_millis() as u64
}

fn f(a: &AtomicU64) -> f64 {
    f64::from_bits(a.load(Relaxed))
}

fn set(a: &AtomicU64, v: f64) {
    a.store(v.to_bits(), Relaxed);
}

/// Why a load report was not taken (`flowgate_load_report_errors_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadError {
    /// No connection, or it failed mid-way.
    Connect,
    /// No complete answer within `load_report.timeout`.
    Timeout,
    /// The scrape answered a status other than 2xx.
    Status,
    /// The body is larger than the cap (4 MiB).
    TooLarge,
    /// An overlong line, a wanted series without a number, a bad agent line.
    Malformed,
    /// None of the wanted families is in the body (renamed metrics, wrong path).
    Missing,
}

impl LoadError {
    pub const ALL: [LoadError; 6] = [
        LoadError::Connect,
        LoadError::Timeout,
        LoadError::Status,
        LoadError::TooLarge,
        LoadError::Malformed,
        LoadError::Missing,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            LoadError::Connect => "connect",
            LoadError::Timeout => "timeout",
            LoadError::Status => "status",
            LoadError::TooLarge => "too_large",
            LoadError::Malformed => "malformed",
            LoadError::Missing => "missing",
        }
    }
}

/// One report's values.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Report {
    pub waiting: f64,
    pub running: f64,
    /// 0..1.
    pub cache: f64,
    /// An agent's `weight=`; None: the configured weight.
    pub weight: Option<u32>,
    /// The figures count requests, flowgate's among them (a Prometheus
    /// exposition); false: a load figure on top of flowgate's count (an agent).
    pub counts: bool,
}

#[derive(Debug)]
pub struct LoadState {
    waiting: AtomicU64,
    running: AtomicU64,
    cache: AtomicU64,
    /// An agent's weight (0: none).
    agent_weight: AtomicU64,
    /// The server's concurrency as learned from reports: the running count when a
    /// queue was reported, else the most seen running (0: not known yet).
    cap: AtomicU32,
    /// flowgate's in-flight count when the last report came.
    in_flight_at_report: AtomicU32,
    /// When the last good report came ([`now_ms`]; 0: never).
    reported_at: AtomicU64,
    /// Connections (L4) or requests (L7) to this backend that ended.
    pub completed: AtomicU64,
    /// Mean time per request relative to the pool's median (1.0: unknown, or average).
    slowness: AtomicU64,
    /// The estimator's running sums (control runtime only).
    estimator: Mutex<Estimator>,
    /// Failed reports by reason ([`LoadError`] order).
    pub errors: [AtomicU64; 6],
    /// Estimated p90 of the time to the first response body byte, in µs (HTTP;
    /// 0: no sample yet).
    ttfb_p90_us: AtomicU64,
    /// `[pools.passive] slow_factor`: the share of its weight the backend keeps,
    /// per mille (1000: not slow).
    slow_penalty: AtomicU32,
}

impl Default for LoadState {
    fn default() -> Self {
        LoadState {
            waiting: AtomicU64::new(0),
            running: AtomicU64::new(0),
            cache: AtomicU64::new(0),
            agent_weight: AtomicU64::new(0),
            cap: AtomicU32::new(0),
            in_flight_at_report: AtomicU32::new(0),
            reported_at: AtomicU64::new(0),
            completed: AtomicU64::new(0),
            slowness: AtomicU64::new(1f64.to_bits()),
            estimator: Mutex::new(Estimator::default()),
            errors: Default::default(),
            ttfb_p90_us: AtomicU64::new(0),
            slow_penalty: AtomicU32::new(1000),
        }
    }
}

/// Exponentially decayed sums for Little's law: in-flight × time, and completions.
#[derive(Debug, Default)]
struct Estimator {
    busy: f64,
    done: f64,
    last_completed: u64,
}

/// Half-life of the learned speed: old behaviour fades over a few seconds.
const SPEED_HALF_LIFE: Duration = Duration::from_secs(5);
/// Bounds on `slowness` (a backend 10× slower than the median is as slow as counts).
const SLOWNESS_RANGE: (f64, f64) = (0.1, 10.0);
/// What a free slot costs in the score, in request times: a new request there
/// still has its prefill to do (and it orders idle backends by speed).
const FREE_SLOT: f64 = 0.1;
/// An agent's `load=1` counts as this many queued requests.
pub const AGENT_SCALE: f64 = 10.0;

impl LoadState {
    /// Stores a good report (control runtime), taken while flowgate had
    /// `in_flight` there.
    pub fn report(&self, r: Report, in_flight: usize) {
        let mine = if r.counts { in_flight } else { 0 };
        self.in_flight_at_report
            .store(mine.min(u32::MAX as usize) as u32, Relaxed);
        set(&self.waiting, r.waiting.max(0.0));
        set(&self.running, r.running.max(0.0));
        set(&self.cache, r.cache.clamp(0.0, 1.0));
        self.agent_weight
            .store(r.weight.map_or(0, u64::from), Relaxed);
        let running = r.running.max(0.0).min(f64::from(u32::MAX)) as u32;
        if r.waiting >= 1.0 && running > 0 {
            // A queue formed: every slot was taken.
            self.cap.store(running, Relaxed);
        } else {
            self.cap.fetch_max(running, Relaxed);
        }
        self.reported_at.store(now_ms(), Relaxed);
    }

    /// The last report, if fresher than `stale_after`.
    pub fn fresh(&self, stale_after: Duration) -> Option<Report> {
        let at = self.reported_at.load(Relaxed);
        (at != 0 && now_ms().saturating_sub(at) < stale_after.as_millis() as u64).then(|| Report {
            waiting: f(&self.waiting),
            running: f(&self.running),
            cache: f(&self.cache),
            weight: Some(self.agent_weight.load(Relaxed) as u32).filter(|&w| w != 0),
            counts: true,
        })
    }

    /// Seconds since the last good report (None: never).
    pub fn age(&self) -> Option<f64> {
        let at = self.reported_at.load(Relaxed);
        (at != 0).then(|| now_ms().saturating_sub(at) as f64 / 1000.0)
    }

    pub fn slowness(&self) -> f64 {
        f(&self.slowness)
    }

    /// The score (lower is better) for a backend with `in_flight` counted
    /// connections or requests and `weight`.
    pub fn score(
        &self,
        in_flight: usize,
        weight: u32,
        w: &LoadWeights,
        stale_after: Option<Duration>,
    ) -> f64 {
        let report = stale_after.and_then(|s| self.fresh(s));
        let (wait, weight) = match report {
            Some(r) => {
                // Requests there now: reported, plus those sent since. Those past
                // the server's concurrency (learned: the running count when a
                // queue formed) wait for a slot, and so would this one; below it
                // a new request starts at once, slowed a little by the others.
                let cap = f64::from(self.cap.load(Relaxed)).max(1.0);
                // flowgate's own in-flight count is exact and current; the report
                // adds what flowgate cannot see: requests beyond those flowgate
                // had in flight when the report came (clients that reach the
                // server another way).
                let external = (r.waiting + r.running
                    - f64::from(self.in_flight_at_report.load(Relaxed)))
                .max(0.0);
                let present = in_flight as f64 + external;
                let ahead = (present + 1.0 - cap).max(0.0);
                let busy = present.min(cap);
                (
                    FREE_SLOT + (w.queue * ahead + w.running * busy + w.cache * r.cache) / cap,
                    r.weight.unwrap_or(weight),
                )
            }
            None => (in_flight as f64 + 1.0, weight),
        };
        wait * self.slowness() / f64::from(weight.max(1))
    }

    /// One estimator step (control runtime): `in_flight` sampled now (with a fresh
    /// report, its running count instead: the time a request holds a slot, not
    /// its wait in the server's queue), `dt` since the last step. Returns the mean
    /// time per request in seconds, when known.
    pub fn observe(
        &self,
        in_flight: usize,
        dt: Duration,
        stale_after: Option<Duration>,
    ) -> Option<f64> {
        let in_flight = match stale_after.and_then(|s| self.fresh(s)) {
            Some(r) => r.running,
            None => in_flight as f64,
        };
        let mut e = self.estimator.lock().unwrap_or_else(|p| p.into_inner());
        let completed = self.completed.load(Relaxed);
        let dc = completed.saturating_sub(e.last_completed);
        e.last_completed = completed;
        let decay = 0.5f64.powf(dt.as_secs_f64() / SPEED_HALF_LIFE.as_secs_f64());
        e.busy = e.busy * decay + in_flight * dt.as_secs_f64();
        e.done = e.done * decay + dc as f64;
        // Work in flight that never completes is slow too: a second's worth of
        // in-flight time with nothing done counts as one very long request.
        if e.done >= 0.5 {
            Some(e.busy / e.done)
        } else if e.busy >= 1.0 {
            Some(e.busy)
        } else {
            None
        }
    }

    /// Folds one time to first body byte into the p90 estimate (a stochastic
    /// quantile step: up by 9 parts when above the estimate, down by 1 when below,
    /// each part 2% of the estimate, so it settles where 10% of samples are above).
    pub fn record_ttfb(&self, d: Duration) {
        let x = d.as_micros().min(u64::MAX as u128) as u64;
        let _ = self.ttfb_p90_us.fetch_update(Relaxed, Relaxed, |est| {
            if est == 0 {
                return Some(x.max(1));
            }
            let part = (est / 50).max(1);
            Some(if x > est {
                est.saturating_add(9 * part).min(x.max(est))
            } else {
                est.saturating_sub(part).max(x).max(1)
            })
        });
    }

    /// The p90 estimate of the time to first body byte (None: no sample).
    pub fn ttfb_p90(&self) -> Option<Duration> {
        Some(self.ttfb_p90_us.load(Relaxed))
            .filter(|&us| us != 0)
            .map(Duration::from_micros)
    }

    /// The share of its weight the backend keeps for being slow, per mille.
    pub fn slow_penalty(&self) -> u32 {
        self.slow_penalty.load(Relaxed)
    }

    pub fn set_slow_penalty(&self, per_mille: u32) {
        self.slow_penalty.store(per_mille.clamp(1, 1000), Relaxed);
    }

    pub fn set_slowness(&self, s: f64) {
        set(&self.slowness, s.clamp(SLOWNESS_RANGE.0, SLOWNESS_RANGE.1));
    }
}

/// Sets each backend's slowness from its mean time per request (`None`: unknown,
/// average) relative to the median of the known ones.
pub fn relate(states: &[(&LoadState, Option<f64>)]) {
    let mut known: Vec<f64> = states.iter().filter_map(|(_, t)| *t).collect();
    if known.is_empty() {
        for (s, _) in states {
            s.set_slowness(1.0);
        }
        return;
    }
    known.sort_by(|a, b| a.total_cmp(b));
    let median = known[known.len() / 2].max(1e-6);
    for (s, t) in states {
        s.set_slowness(t.map_or(1.0, |t| t / median));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fresh_report_adds_what_flowgate_cannot_see_and_a_stale_one_falls_back() {
        let s = LoadState::default();
        let w = LoadWeights::default();
        let fresh = Some(Duration::from_secs(60));
        // No report: in flight alone.
        assert_eq!(s.score(3, 1, &w, fresh), 4.0);
        s.report(
            Report {
                waiting: 5.0,
                running: 4.0,
                cache: 0.5,
                weight: None,
                counts: true,
            },
            0,
        );
        // A queue was reported, none of it sent by flowgate: the 4 running are the
        // server's concurrency. 9 there plus the new one, 6 of them past the slots:
        // 0.1 + (6 + 0.25 × 4 + 2 × 0.5) / 4 = 2.1.
        let close = |a: f64, b: f64| (a - b).abs() < 1e-9;
        assert!(close(s.score(0, 1, &w, fresh), 2.1));
        // Two more in flight from flowgate: 8 past the slots. 0.1 + (8 + 1 + 1) / 4.
        assert!(close(s.score(2, 1, &w, fresh), 2.6));
        assert!(close(s.score(2, 2, &w, fresh), 1.3), "weight divides");
        // Below the learned concurrency a new request starts at once.
        s.report(
            Report {
                waiting: 0.0,
                running: 1.0,
                cache: 0.0,
                weight: None,
                counts: true,
            },
            1,
        );
        // (the one running is flowgate's own)
        assert!(close(s.score(1, 1, &w, fresh), 0.1 + 0.25 / 4.0));
        // Stale: back to in flight.
        assert_eq!(s.score(1, 1, &w, Some(Duration::ZERO)), 2.0);
    }

    #[test]
    fn the_slower_backend_is_scored_higher_at_equal_work() {
        let (fast, slow) = (LoadState::default(), LoadState::default());
        // Fast: 1 in flight, 10 done per second; slow: 1 in flight, 2.5 per second.
        let tick = Duration::from_millis(100);
        for i in 0..100 {
            fast.completed.fetch_add(1, Relaxed);
            if i % 4 == 0 {
                slow.completed.fetch_add(1, Relaxed);
            }
            let tf = fast.observe(1, tick, None);
            let ts = slow.observe(1, tick, None);
            let third = LoadState::default();
            third.completed.fetch_add(0, Relaxed);
            relate(&[(&fast, tf), (&slow, ts), (&third, tf)]);
        }
        let w = LoadWeights::default();
        let (f, s) = (fast.score(0, 1, &w, None), slow.score(0, 1, &w, None));
        assert!((3.5..4.5).contains(&(s / f)), "slow {s}, fast {f}");
    }
}
