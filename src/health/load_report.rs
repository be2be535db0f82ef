//! The load feed of a `least-load` pool (issue 14), on the control runtime: every
//! `load_report.interval` each backend's report is read (a Prometheus scrape over a
//! kept-alive connection, or an agent's line), and every tick each backend's speed
//! is learned from flowgate's own counts. A failed or stale report never marks a
//! backend down (health checks do that): the score falls back to in-flight counts.
//!
//! The same loop runs for any pool with `[pools.passive] slow_factor`: a backend
//! whose time-to-first-byte p90 stays over `slow_factor` × the pool's median for
//! `slow_for` loses weight (halved each tick, down to a tenth), and gets it back
//! gradually (a tenth per tick) once it is no longer slow.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::exposition::{agent_line, Reader};
use crate::backend::Backend;
use crate::config::{LoadKind, LoadReportConfig, MAX_EXPOSITION_BYTES};
use crate::load::{relate, LoadError, Report};
use crate::pool::Pool;
use crate::tasks::Tasks;

/// The speed estimator's tick without reports.
const TICK: Duration = Duration::from_millis(500);

type Conn = SendRequest<Empty<Bytes>>;

/// Starts the pool's load loop (until `stop`).
pub fn spawn(pool: &Arc<Pool>, stop: &CancellationToken, tasks: &Tasks) {
    let (pool, stop, t) = (pool.clone(), stop.clone(), tasks.clone());
    tasks.spawn(async move {
        tokio::select! {
            _ = stop.cancelled() => {}
            _ = run(pool, t) => {}
        }
    });
}

async fn run(pool: Arc<Pool>, tasks: Tasks) {
    let cfg = pool.config().load_report.clone().map(Arc::new);
    let tick = cfg.as_ref().map_or(TICK, |r| r.interval);
    let mut conns: HashMap<u64, Conn> = HashMap::new();
    let mut slow_since: HashMap<u64, Instant> = HashMap::new();
    let mut last = Instant::now();
    loop {
        tokio::time::sleep(tick).await;
        if let Some(r) = &cfg {
            let backends = pool.backends();
            conns.retain(|id, _| backends.iter().any(|b| b.id == *id));
            let mut set = JoinSet::new();
            for b in backends {
                let conn = conns.remove(&b.id);
                let (r, t) = (r.clone(), tasks.clone());
                set.spawn(async move {
                    // What flowgate had in flight when the server counted: some
                    // time between sending the scrape and reading the answer. The
                    // larger of the two ends, so a request that ended meanwhile is
                    // not taken for someone else's (the score would count it until
                    // the next report).
                    let before = b.active();
                    let (result, conn) = read(&b, &r, conn, &t).await;
                    let in_flight = before.max(b.active());
                    (b, result, conn, in_flight)
                });
            }
            while let Some(done) = set.join_next().await {
                let Ok((b, result, conn, in_flight)) = done else {
                    continue;
                };
                match result {
                    Ok(rep) => b.load.report(rep, in_flight),
                    Err(e) => {
                        debug!(pool = %pool.name, backend = %b.name, reason = e.as_str(), "load report failed");
                        b.load.errors[e as usize].fetch_add(1, Relaxed);
                    }
                }
                if let Some(c) = conn {
                    conns.insert(b.id, c);
                }
            }
        }
        let stale_after = cfg.as_ref().map(|r| r.stale_after);
        let dt = last.elapsed();
        last = Instant::now();
        let backends = pool.backends();
        let seen: Vec<_> = backends
            .iter()
            .map(|b| (&b.load, b.load.observe(b.active(), dt, stale_after)))
            .collect();
        relate(&seen);
        drop(seen);
        if let Some((factor, slow_for)) = pool.config().passive.as_ref().and_then(|p| p.slow) {
            if watch_slow(&pool, &backends, factor, slow_for, &mut slow_since) {
                pool.reweigh();
            }
        }
    }
}

/// One tick of `slow_factor`: returns whether a weight changed.
fn watch_slow(
    pool: &Pool,
    backends: &[Arc<Backend>],
    factor: f64,
    slow_for: Duration,
    since: &mut HashMap<u64, Instant>,
) -> bool {
    since.retain(|id, _| backends.iter().any(|b| b.id == *id));
    let mut p90s: Vec<Duration> = backends.iter().filter_map(|b| b.load.ttfb_p90()).collect();
    if p90s.len() < 2 {
        return false;
    }
    p90s.sort();
    let median = p90s[p90s.len() / 2];
    let now = Instant::now();
    let mut changed = false;
    for b in backends {
        let slow = b
            .load
            .ttfb_p90()
            .is_some_and(|p| p.as_secs_f64() > factor * median.as_secs_f64());
        let before = b.load.slow_penalty();
        let after = if slow {
            let at = *since.entry(b.id).or_insert(now);
            if now.duration_since(at) >= slow_for {
                (before / 2).max(100)
            } else {
                before
            }
        } else {
            since.remove(&b.id);
            (before + 100).min(1000)
        };
        if after != before {
            changed = true;
            b.load.set_slow_penalty(after);
            if before == 1000 {
                warn!(pool = %pool.name, backend = %b.name, p90 = ?b.load.ttfb_p90(), median = ?median, "backend slow to first byte: lowering its weight");
            } else if after == 1000 {
                info!(pool = %pool.name, backend = %b.name, "backend no longer slow: full weight again");
            }
        }
    }
    changed
}

/// One report from `b`, within the timeout; hands back a kept-alive connection.
async fn read(
    b: &Backend,
    r: &LoadReportConfig,
    conn: Option<Conn>,
    tasks: &Tasks,
) -> (Result<Report, LoadError>, Option<Conn>) {
    let addr = SocketAddr::new(b.addr.ip(), r.port.unwrap_or(b.addr.port()));
    let attempt = async {
        match r.kind {
            LoadKind::Agent => (agent(addr).await, None),
            LoadKind::Prometheus => scrape(addr, r, conn, tasks).await,
        }
    };
    match tokio::time::timeout(r.timeout, attempt).await {
        Ok(x) => x,
        Err(_) => (Err(LoadError::Timeout), None),
    }
}

async fn agent(addr: SocketAddr) -> Result<Report, LoadError> {
    let mut s = TcpStream::connect(addr)
        .await
        .map_err(|_| LoadError::Connect)?;
    let mut buf = [0u8; 256];
    let mut got = 0;
    loop {
        let n = s
            .read(&mut buf[got..])
            .await
            .map_err(|_| LoadError::Connect)?;
        got += n;
        if n == 0 || buf[..got].contains(&b'\n') || got == buf.len() {
            break;
        }
    }
    let text = std::str::from_utf8(&buf[..got]).map_err(|_| LoadError::Malformed)?;
    agent_line(text.lines().next().unwrap_or("").trim()).ok_or(LoadError::Malformed)
}

async fn scrape(
    addr: SocketAddr,
    r: &LoadReportConfig,
    conn: Option<Conn>,
    tasks: &Tasks,
) -> (Result<Report, LoadError>, Option<Conn>) {
    let mut sender = match conn {
        Some(c) if c.is_ready() => c,
        _ => match connect(addr, tasks).await {
            Ok(c) => c,
            Err(e) => return (Err(e), None),
        },
    };
    let req = match hyper::Request::get(r.path.as_str())
        .header(hyper::header::HOST, addr.to_string())
        .header(hyper::header::USER_AGENT, "flowgate-load-report")
        .header(hyper::header::ACCEPT, "text/plain")
        .body(Empty::<Bytes>::new())
    {
        Ok(req) => req,
        Err(_) => return (Err(LoadError::Malformed), None),
    };
    let resp = match sender.send_request(req).await {
        Ok(resp) => resp,
        Err(_) => return (Err(LoadError::Connect), None),
    };
    if !resp.status().is_success() {
        // Read no body: the connection is dropped, not reused.
        return (Err(LoadError::Status), None);
    }
    let mut reader = Reader::new(&r.families, MAX_EXPOSITION_BYTES);
    let mut body = resp.into_body();
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else {
            return (Err(LoadError::Connect), None);
        };
        if let Some(data) = frame.data_ref() {
            if let Err(e) = reader.feed(data) {
                return (Err(e), None);
            }
        }
    }
    (reader.finish(), Some(sender))
}

async fn connect(addr: SocketAddr, tasks: &Tasks) -> Result<Conn, LoadError> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|_| LoadError::Connect)?;
    let _ = stream.set_nodelay(true);
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|_| LoadError::Connect)?;
    tasks.spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}
