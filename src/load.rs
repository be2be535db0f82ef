//! A backend's load as `least-load` scores it (issue 14): what the backend last
//! reported (queue, running, cache), what flowgate had in flight then, and a speed
//! flowgate learns from what it sees.
//!
//! The data path only counts (a completion when the counted connection or request
//! ends) and reads the score's inputs; the control runtime
//! writes reports and the learned speed. Everything is an atomic.
//!
//! **Score**: the expected time to a new request's first token there, in seconds
//! (docs/configuration.md, `least-load`): `(first_token × (1 + running_weight ×
//! busy / concurrency) + (queue_weight × wait + cache_weight × cache) × slot_time /
//! concurrency) / weight`. What is *present* is flowgate's own in-flight count plus
//! what a fresh report shows beyond it; *concurrency* is learned from reports (1
//! until known); *busy* = present, at most concurrency; *ahead* = present + 1 −
//! concurrency, at least 0: the slots that must free before the new request
//! starts. One frees every `slot_time / concurrency` on average, the first after
//! *left* / concurrency, so *wait* = *left* / slot_time + ahead − 1 (0 while a slot
//! is free), *left* being the mean time left to flowgate's requests in service
//! there (slot time less their mean time since their first body byte; half a slot
//! time when none is seen). *cache* is the reported KV-cache use beyond the
//! reported running requests' share of the slots. `first_token` is the backend's
//! time to the first body byte for a request that found a free slot and
//! `slot_time` the mean time a request holds a slot (first token plus the rest of
//! the response), both learned from what flowgate sees of its own HTTP requests;
//! without such samples (L4, or a new backend) `slot_time` is Little's law over
//! flowgate's counts and `first_token` a tenth of it.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::config::LoadWeights;

/// Milliseconds since a process-wide epoch (0 is "never").
pub fn now_ms() -> u64 {
    epoch().elapsed().as_millis() as u64
}

/// Microseconds since the same epoch as [`now_ms`].
pub fn now_us() -> u64 {
    epoch().elapsed().as_micros() as u64
}

fn epoch() -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(|| Instant::now() - Duration::from_millis(1))
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
    /// Times to the first body byte of requests that found a free slot (sum in
    /// µs, count): the data path adds, the estimator reads the growth.
    first_token_us: AtomicU64,
    first_token_n: AtomicU64,
    /// Times from the first body byte to the response's end (sum in µs, count).
    rest_us: AtomicU64,
    rest_n: AtomicU64,
    /// flowgate's requests there past their first body byte and not ended (in a
    /// slot), and the sum of when their first byte came ([`now_us`]).
    in_service: AtomicU64,
    in_service_since_us: AtomicU64,
    /// Learned (control runtime): seconds to the first token on a free slot.
    first_token: AtomicU64,
    /// Learned (control runtime): seconds a request holds a slot.
    slot_time: AtomicU64,
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
            first_token_us: AtomicU64::new(0),
            first_token_n: AtomicU64::new(0),
            rest_us: AtomicU64::new(0),
            rest_n: AtomicU64::new(0),
            in_service: AtomicU64::new(0),
            in_service_since_us: AtomicU64::new(0),
            first_token: AtomicU64::new((FREE_SLOT * UNKNOWN_SLOT_TIME).to_bits()),
            slot_time: AtomicU64::new(UNKNOWN_SLOT_TIME.to_bits()),
        }
    }
}

/// Exponentially decayed sums: for Little's law (in-flight × time, and
/// completions), and of the per-request times the data path records.
#[derive(Debug, Default)]
struct Estimator {
    busy: f64,
    done: f64,
    last_completed: u64,
    first_token: Decayed,
    rest: Decayed,
}

/// A decayed mean of samples the data path adds to a (sum, count) pair of counters.
#[derive(Debug, Default)]
struct Decayed {
    sum: f64,
    n: f64,
    last_sum: u64,
    last_n: u64,
}

impl Decayed {
    /// Folds in what `sum` and `n` grew by since the last step; the mean in
    /// seconds once there is half a sample's weight.
    fn step(&mut self, sum: &AtomicU64, n: &AtomicU64, decay: f64) -> Option<f64> {
        let (s, c) = (sum.load(Relaxed), n.load(Relaxed));
        let (ds, dc) = (s.wrapping_sub(self.last_sum), c.wrapping_sub(self.last_n));
        (self.last_sum, self.last_n) = (s, c);
        self.sum = self.sum * decay + ds as f64 / 1e6;
        self.n = self.n * decay + dc as f64;
        (self.n >= 0.5).then(|| self.sum / self.n)
    }
}

/// What one estimator step learned about a backend (seconds; None: unknown).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Learned {
    /// Mean time per request by Little's law over flowgate's counts.
    pub per_request: Option<f64>,
    /// Mean time to the first body byte of requests that found a free slot.
    pub first_token: Option<f64>,
    /// Mean time from the first body byte to the end of the response.
    pub rest: Option<f64>,
}

impl Learned {
    /// The time a request holds a slot: first token plus the rest when both were
    /// seen, else Little's law.
    fn slot_time(&self) -> Option<f64> {
        match (self.first_token, self.rest) {
            (Some(f), Some(r)) => Some(f + r),
            _ => self.per_request,
        }
    }
}

/// Half-life of the learned speed: old behaviour fades over a few seconds.
const SPEED_HALF_LIFE: Duration = Duration::from_secs(5);
/// Bounds on `slowness` (a backend 10× slower than the median is as slow as counts).
const SLOWNESS_RANGE: (f64, f64) = (0.1, 10.0);
/// The first token's share of a request's slot time where it was not measured (L4,
/// a backend without samples yet): a new request on a free slot still has its
/// prefill to do, and it orders idle backends by speed.
const FREE_SLOT: f64 = 0.1;
/// How far through its slot time a request in service is on average, where
/// flowgate sees none in service (tcp: no first byte): the first of the slots a
/// new request waits for frees after this share of the spacing between two
/// (slots free at staggered times). Against a full spacing, p50 and p99 time to
/// first token both improved in `scripts/bench.sh inference` (docs/performance.md).
const HALF_DONE: f64 = 0.5;
/// The slot time of a pool where nothing is known yet (only the ratios matter).
const UNKNOWN_SLOT_TIME: f64 = 1.0;
/// Below this (a microsecond) a learned slot time is taken as unknown.
const MIN_SLOT_TIME: f64 = 1e-6;
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

    /// The learned time to the first token on a free slot, in seconds.
    pub fn first_token(&self) -> f64 {
        f(&self.first_token)
    }

    /// The learned time a request holds a slot, in seconds.
    pub fn slot_time(&self) -> f64 {
        f(&self.slot_time)
    }

    /// The server's concurrency as learned from reports (None: not yet known).
    pub fn concurrency(&self) -> Option<u32> {
        Some(self.cap.load(Relaxed)).filter(|&c| c != 0)
    }

    /// Whether a new request would find a free slot there (flowgate's in-flight
    /// count plus what a fresh report adds, under the learned concurrency).
    pub fn has_free_slot(&self, in_flight: usize, stale_after: Option<Duration>) -> bool {
        let cap = f64::from(self.cap.load(Relaxed)).max(1.0);
        let external = stale_after.and_then(|s| self.fresh(s)).map_or(0.0, |r| {
            (r.waiting + r.running - f64::from(self.in_flight_at_report.load(Relaxed))).max(0.0)
        });
        in_flight as f64 + external < cap
    }

    /// The score (lower is better): the expected seconds to a new request's first
    /// token on a backend with `in_flight` counted connections or requests and
    /// `weight`.
    pub fn score(
        &self,
        in_flight: usize,
        weight: u32,
        w: &LoadWeights,
        stale_after: Option<Duration>,
    ) -> f64 {
        let report = stale_after.and_then(|s| self.fresh(s));
        // Slots: learned from reports (the running count when a queue formed), one
        // until then.
        let cap = f64::from(self.cap.load(Relaxed)).max(1.0);
        // flowgate's own in-flight count is exact and current; a fresh report adds
        // what flowgate cannot see: requests beyond those flowgate had in flight
        // when the report came (clients that reach the server another way).
        let (external, cache, weight) = match report {
            Some(r) => (
                (r.waiting + r.running - f64::from(self.in_flight_at_report.load(Relaxed)))
                    .max(0.0),
                // Only the KV cache beyond the running requests' share of the
                // slots: a cache that fills with the slots says nothing the
                // request counts do not (and says it a report late), one that
                // fills before them (long contexts) will make a request wait.
                (r.cache - r.running / cap).max(0.0),
                r.weight.unwrap_or(weight),
            ),
            None => (0.0, 0.0, weight),
        };
        let present = in_flight as f64 + external;
        // Below the concurrency a new request starts at once (slowed a little by
        // the others); past it, it waits for `ahead` slots to free. Slots free
        // one every slot_time / cap on average, and those in service are half
        // done on average: the first frees after half a spacing.
        let ahead = (present + 1.0 - cap).max(0.0);
        let busy = present.min(cap);
        let first = self.first_token() * (1.0 + w.running * busy / cap);
        let slot = self.slot_time().max(MIN_SLOT_TIME);
        // The first slot frees after the time left to those in service, spread
        // over the slots; then one every slot_time / cap.
        let slots = if ahead > 0.0 {
            self.remaining(slot) / slot + ahead - 1.0
        } else {
            0.0
        };
        let wait = (w.queue * slots + w.cache * cache) * slot / cap;
        let score = (first + wait) / f64::from(weight.max(1));
        // A score the pick can always compare: never NaN, never below zero.
        if score.is_nan() {
            f64::INFINITY
        } else {
            score.max(0.0)
        }
    }

    /// A request that was sent with `ahead` others of flowgate's in flight there
    /// got its first body byte after `d`: a sample of the first-token time when a
    /// slot was free for it.
    pub fn record_first_token(&self, ahead: usize, d: Duration) {
        if ahead < self.cap.load(Relaxed).max(1) as usize {
            self.first_token_us
                .fetch_add(d.as_micros().min(u64::MAX as u128) as u64, Relaxed);
            self.first_token_n.fetch_add(1, Relaxed);
        }
    }

    /// The mean time left to flowgate's requests in service there: the slot time
    /// less their mean time in service so far, at least one first-token time.
    /// Without any in service (tcp, or all just sent), half a slot time: a slot is
    /// half done on average.
    fn remaining(&self, slot: f64) -> f64 {
        let n = self.in_service.load(Relaxed);
        if n == 0 {
            return HALF_DONE * slot;
        }
        let since = self.in_service_since_us.load(Relaxed) as f64 / n as f64;
        let elapsed = (now_us() as f64 - since).max(0.0) / 1e6;
        // max/min, not clamp: no bound can make this panic.
        (slot - elapsed).max(self.first_token().min(slot)).min(slot)
    }

    /// A request's first body byte came at `at` ([`now_us`]): it holds a slot
    /// until [`LoadState::service_end`] with the same `at`.
    pub fn service_start(&self, at: u64) {
        self.in_service_since_us.fetch_add(at, Relaxed);
        self.in_service.fetch_add(1, Relaxed);
    }

    pub fn service_end(&self, at: u64) {
        self.in_service_since_us.fetch_sub(at, Relaxed);
        self.in_service.fetch_sub(1, Relaxed);
    }

    /// A response ended `d` after its first body byte.
    pub fn record_rest(&self, d: Duration) {
        self.rest_us
            .fetch_add(d.as_micros().min(u64::MAX as u128) as u64, Relaxed);
        self.rest_n.fetch_add(1, Relaxed);
    }

    /// One estimator step (control runtime): `in_flight` sampled now (with a fresh
    /// report, its running count instead: the time a request holds a slot, not
    /// its wait in the server's queue), `dt` since the last step.
    pub fn observe(
        &self,
        in_flight: usize,
        dt: Duration,
        stale_after: Option<Duration>,
    ) -> Learned {
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
        let per_request = if e.done >= 0.5 {
            Some(e.busy / e.done)
        } else if e.busy >= 1.0 {
            Some(e.busy)
        } else {
            None
        };
        Learned {
            per_request,
            first_token: e
                .first_token
                .step(&self.first_token_us, &self.first_token_n, decay),
            rest: e.rest.step(&self.rest_us, &self.rest_n, decay),
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

/// Sets each backend's slot time and first-token time from what was learned, the
/// pool's median standing in for what is unknown, and its slowness (slot time
/// relative to the median: the API's figure).
pub fn relate(states: &[(&LoadState, Learned)]) {
    let median = |mut v: Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v.get(v.len() / 2).copied()
    };
    // Little's law gives 0 where every sample saw nothing in flight (short tcp
    // connections that end between two steps): such a time is unknown, not zero.
    let known = |t: Option<f64>| t.filter(|t| t.is_finite() && *t >= MIN_SLOT_TIME);
    let slot = median(
        states
            .iter()
            .filter_map(|(_, l)| known(l.slot_time()))
            .collect(),
    )
    .unwrap_or(UNKNOWN_SLOT_TIME);
    let first = median(states.iter().filter_map(|(_, l)| l.first_token).collect());
    for (s, l) in states {
        let t = known(l.slot_time()).unwrap_or(slot);
        set(&s.slot_time, t);
        set(
            &s.first_token,
            l.first_token
                .or(first.filter(|_| l.slot_time().is_none()))
                .unwrap_or(FREE_SLOT * t),
        );
        s.set_slowness(t / slot);
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
        let close = |a: f64, b: f64| (a - b).abs() < 1e-9;
        // Nothing learned yet: slot time 1, first token 0.1, one slot. 3 in flight:
        // 3 slots to free, the first half done. 0.1 × (1 + 0.25) + 2.5.
        assert!(close(s.score(3, 1, &w, fresh), 2.625));
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
        // server's concurrency. 9 there plus the new one, 6 of them past the slots
        // (the cache, half full with every slot running, adds nothing):
        // 0.1 × 1.25 + 5.5 / 4.
        assert!(close(s.score(0, 1, &w, fresh), 1.5));
        // Two more in flight from flowgate: 8 past the slots.
        assert!(close(s.score(2, 1, &w, fresh), 0.125 + 7.5 / 4.0));
        assert!(
            close(s.score(2, 2, &w, fresh), (0.125 + 7.5 / 4.0) / 2.0),
            "weight divides"
        );
        // Below the learned concurrency a new request starts at once; a cache
        // fuller than the one running request's share (0.25) counts as slots to
        // wait for: 2 × 0.5 of them.
        s.report(
            Report {
                waiting: 0.0,
                running: 1.0,
                cache: 0.75,
                weight: None,
                counts: true,
            },
            1,
        );
        // (the one running is flowgate's own)
        assert!(close(
            s.score(1, 1, &w, fresh),
            0.1 * (1.0 + 0.25 / 4.0) + 1.0 / 4.0
        ));
        // Stale: flowgate's in-flight count alone, the learned concurrency kept.
        assert!(close(
            s.score(5, 1, &w, Some(Duration::ZERO)),
            0.125 + 1.5 / 4.0
        ));
    }

    #[test]
    fn a_free_slot_on_a_slow_server_beats_a_queue_on_a_fast_one_but_not_a_slot_about_to_free() {
        // Both serve two at once; fast: first token 5 ms, the rest 50 ms; slow: 20
        // and 200 ms.
        let (fast, slow) = (LoadState::default(), LoadState::default());
        for (s, ft, rest) in [(&fast, 5, 50), (&slow, 20, 200)] {
            s.report(
                Report {
                    waiting: 1.0,
                    running: 2.0,
                    ..Report::default()
                },
                3,
            );
            for _ in 0..10 {
                s.record_first_token(0, Duration::from_millis(ft));
                s.record_first_token(5, Duration::from_millis(500)); // queued: not a sample
                s.record_rest(Duration::from_millis(rest));
            }
        }
        let tick = Duration::from_millis(100);
        let (lf, ls) = (fast.observe(0, tick, None), slow.observe(0, tick, None));
        assert_eq!(lf.first_token, Some(0.005));
        relate(&[(&fast, lf), (&slow, ls)]);
        assert!((fast.slot_time() - 0.055).abs() < 1e-9);
        let w = LoadWeights::default();
        let stale = Some(Duration::ZERO);
        // Fast with both slots taken and one queued: 5 ms × 1.25 + 1.5 × 55 / 2
        // ms. Slow with one free: 20 ms × 1.125.
        let (f, s) = (fast.score(3, 1, &w, stale), slow.score(1, 1, &w, stale));
        assert!(
            (f - 0.0475).abs() < 1e-9 && (s - 0.0225).abs() < 1e-9,
            "fast {f}, slow {s}"
        );
        // Fast with both taken, none queued: the first slot frees after a quarter
        // of its 55 ms on average (5 × 1.25 + 13.75 ms), sooner than the slow
        // server's first token.
        assert!((fast.score(2, 1, &w, stale) - 0.02).abs() < 1e-9);
        // With a slot free on both, the fast one.
        assert!(fast.score(1, 1, &w, stale) < slow.score(0, 1, &w, stale));
        // Both of the fast server's requests just got their first byte: a whole
        // slot time left to them, the first frees after half of it (27.5 ms on top
        // of 6.25), later than the slow server's first token.
        let now = now_us() + 10_000_000; // (later than the test: none elapsed)
        fast.service_start(now);
        fast.service_start(now);
        let f = fast.score(2, 1, &w, stale);
        assert!((f - 0.03375).abs() < 1e-9, "fast {f}");
        assert!(f > slow.score(1, 1, &w, stale));
        fast.service_end(now);
        fast.service_end(now);
        assert!((fast.score(2, 1, &w, stale) - 0.02).abs() < 1e-9);
    }

    #[test]
    fn a_zero_time_from_littles_law_is_unknown_and_the_score_stays_comparable() {
        // Completions seen with nothing ever in flight at a step (short tcp
        // connections): Little's law says 0 s a request. That must not become a
        // slot time of 0 (0 / 0 in the wait: a NaN score, and no pick at all).
        let states: Vec<LoadState> = (0..3).map(|_| LoadState::default()).collect();
        let learned: Vec<Learned> = states
            .iter()
            .map(|s| {
                s.completed.fetch_add(3, Relaxed);
                s.observe(0, Duration::from_millis(100), None)
            })
            .collect();
        assert_eq!(learned[0].per_request, Some(0.0));
        relate(&states.iter().zip(learned).collect::<Vec<_>>());
        let w = LoadWeights::default();
        for s in &states {
            assert!(s.slot_time() > 0.0);
            for in_flight in 0..4 {
                let score = s.score(in_flight, 1, &w, None);
                assert!(score.is_finite() && score >= 0.0, "{score}");
            }
        }
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
