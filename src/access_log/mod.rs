//! The access log: one line per finished TCP connection or UDP session.
//!
//! The data path never blocks on it and never formats: a session hands a small
//! [`Entry`] to a bounded channel with `try_send`, and a dedicated thread formats and
//! writes. When the channel is full the entry is dropped and counted
//! (`flowgate_access_log_dropped_total`). The writer reopens its file (or
//! reconnects to syslog) on [`AccessLog::reopen`] (SIGUSR1, for logrotate) and takes
//! a new destination or format on [`AccessLog::configure`] (startup and reload).
//! Each instance has its own: nothing here is process-wide.
//!
//! Text lines are logfmt (`key=value`), JSON lines one object per line. The syslog
//! destinations (`syslog.rs`) send each line as one RFC 5424 datagram.

mod syslog;

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use crate::config::{AccessLogDest, LogFormat};
use syslog::{Syslog, Target};

/// Entries that may wait for the writer; beyond this they are dropped.
const QUEUE: usize = 16 * 1024;

/// One finished connection or session.
#[derive(Debug)]
pub struct Entry {
    /// When it ended.
    pub time: SystemTime,
    pub protocol: &'static str,
    pub listener: Arc<str>,
    pub client: SocketAddr,
    pub pool: Arc<str>,
    /// The backend's configured address; `None` if none was connected.
    pub backend: Option<Arc<str>>,
    /// The address the backend's name resolved to (HAProxy's `%bi:%bp`).
    pub backend_addr: Option<SocketAddr>,
    /// Connect attempts that failed before the one that worked (or all of them).
    pub retries: u32,
    /// Sessions open on the listener when this one started, itself included
    /// (HAProxy's `%fc`).
    pub listener_conns: u32,
    /// Connections open on the backend when this one was made, itself included
    /// (HAProxy's `%bc`); 0 without a backend.
    pub backend_conns: u32,
    pub to_backend: u64,
    pub from_backend: u64,
    /// Time of the successful connect (TCP).
    pub connect: Option<Duration>,
    /// From the connect (TCP) or the first datagram (UDP) to the first byte from the
    /// backend.
    pub first_byte: Option<Duration>,
    /// Accept (or first datagram) to the end.
    pub duration: Duration,
    /// The termination reason (see docs/operations.md).
    pub reason: &'static str,
    /// TCP: the client's TLS server name, on a listener with `sni_routes` (field
    /// `sni` of tcp lines; `-` when none).
    pub sni: Option<Box<str>>,
    /// One HTTP request (http listeners): what the line adds for it.
    pub http: Option<Box<HttpFields>>,
}

/// An http listener's request: `to_backend`/`from_backend` are its body bytes,
/// `first_byte` the time from sending it to the first response body byte.
#[derive(Debug)]
pub struct HttpFields {
    pub method: String,
    /// Lower case, without the port; `-` when the request had none.
    pub host: String,
    /// Without the query.
    pub path: String,
    pub version: &'static str,
    /// The status sent to the client (499: it went away before the head).
    pub status: u16,
    /// The route's label (host and prefix), `default`, or `-`.
    pub route: String,
    pub request_id: String,
    /// Request sent -> response head.
    pub head: Option<Duration>,
}

// Entries are nearly every message; boxing them would allocate once per line.
#[allow(clippy::large_enum_variant)]
enum Msg {
    Entry(Entry),
    /// Look at the pending destination and the reopen flag (sent with `try_send`:
    /// a full queue means the writer is busy and will look anyway).
    Wake,
    /// Write and flush everything queued before this, then answer.
    Flush(SyncSender<()>),
}

/// One instance's access log: the data path's side of the channel, and what the
/// writer thread shares with it. Dropping it ends the writer thread (after it has
/// written what was queued).
pub struct AccessLog {
    /// Set when a destination other than `off` is first configured (the writer
    /// thread starts then).
    tx: OnceLock<SyncSender<Msg>>,
    enabled: AtomicBool,
    shared: Arc<Shared>,
}

/// What the writer thread and the instance share.
#[derive(Default)]
struct Shared {
    dropped: AtomicU64,
    /// A reopen asked for (SIGUSR1) and not yet done.
    reopen: AtomicBool,
    /// A destination and format to switch to (startup, reload).
    pending: Mutex<Option<(AccessLogDest, LogFormat)>>,
}

impl std::fmt::Debug for AccessLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessLog")
            .field("enabled", &self.enabled())
            .field("dropped", &self.dropped())
            .finish_non_exhaustive()
    }
}

impl AccessLog {
    /// An access log that is off until [`AccessLog::configure`]d.
    pub fn new() -> Arc<AccessLog> {
        Arc::new(AccessLog {
            tx: OnceLock::new(),
            enabled: AtomicBool::new(false),
            shared: Arc::default(),
        })
    }

    /// Whether entries are wanted; sessions skip building one when not.
    #[inline]
    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    /// Entries dropped because the writer fell behind.
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    /// Queues an entry without ever blocking; drops and counts it if the queue is
    /// full.
    pub fn log(&self, e: Entry) {
        let Some(tx) = self.tx.get() else { return };
        match tx.try_send(Msg::Entry(e)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.shared.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Sets the destination and format (startup and reload). Starts the writer
    /// thread on first use; opening a file happens on the writer thread, and a
    /// failure to open is logged there, with entries dropped and counted until a
    /// reopen succeeds.
    pub fn configure(&self, dest: &AccessLogDest, format: LogFormat) -> io::Result<()> {
        self.prepare(dest)?;
        self.switch(dest, format);
        Ok(())
    }

    /// Everything about switching to `dest` that can fail, done before anything
    /// changes: a file is opened (and created if missing), a syslog socket
    /// connected (a missing `/dev/log` is an error), so a bad destination fails
    /// startup or reload loudly, and the writer thread starts if none runs yet.
    pub fn prepare(&self, dest: &AccessLogDest) -> io::Result<()> {
        if let AccessLogDest::File(p) = dest {
            check(p)?;
        }
        if let Some((target, _)) = Target::of(dest) {
            target.connect()?;
        }
        if *dest != AccessLogDest::Off && self.tx.get().is_none() {
            let (tx, rx) = sync_channel(QUEUE);
            let writer = Writer::new(rx, self.shared.clone());
            std::thread::Builder::new()
                .name("flowgate-access-log".into())
                .spawn(move || writer.run())?;
            let _ = self.tx.set(tx);
        }
        Ok(())
    }

    /// Switches to `dest` and `format` after [`AccessLog::prepare`]; never fails
    /// and never blocks.
    pub fn switch(&self, dest: &AccessLogDest, format: LogFormat) {
        let Some(tx) = self.tx.get() else {
            return; // off, and never on
        };
        self.enabled
            .store(*dest != AccessLogDest::Off, Ordering::Relaxed);
        *self
            .shared
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some((dest.clone(), format));
        // Never blocks: a writer stuck on a full pipe must not hold up a reload.
        let _ = tx.try_send(Msg::Wake);
    }

    /// Waits (up to `limit`) until everything logged so far is written and
    /// flushed: the last lines of a stopping process are not lost.
    pub fn flush(&self, limit: Duration) {
        let Some(tx) = self.tx.get() else { return };
        let deadline = std::time::Instant::now() + limit;
        let (done, wait) = sync_channel(1);
        let mut msg = Msg::Flush(done);
        loop {
            match tx.try_send(msg) {
                Ok(()) => break,
                Err(TrySendError::Full(m)) if std::time::Instant::now() < deadline => {
                    msg = m;
                    // Called by the binary as it exits, after the runtime stopped
                    // serving: a short blocking wait for the writer thread.
                    #[allow(clippy::disallowed_methods)]
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(_) => return,
            }
        }
        let _ = wait.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()));
    }

    /// Reopens the log file (after logrotate moved it) or reconnects to syslog
    /// (after the daemon restarted). No-op for stdout or off.
    pub fn reopen(&self) {
        if let Some(tx) = self.tx.get() {
            self.shared.reopen.store(true, Ordering::Relaxed);
            // Never blocks: the signal loop must stay free for SIGTERM.
            let _ = tx.try_send(Msg::Wake);
        }
    }
}

/// Whether `p` can be opened for appending (created if missing).
pub fn check(p: &std::path::Path) -> io::Result<()> {
    open(p).map(drop)
}

enum Out {
    Off,
    Stdout(io::Stdout),
    File(PathBuf, Option<BufWriter<File>>),
    Syslog(Syslog),
}

struct Writer {
    rx: Receiver<Msg>,
    shared: Arc<Shared>,
    out: Out,
    format: LogFormat,
    line: String,
}

/// Opens the log for appending: created `0640` (the log names clients and
/// backends), and never through a symlink (`O_NOFOLLOW`), so whoever can write the
/// directory cannot point flowgate's writes at another file.
fn open(p: &std::path::Path) -> io::Result<File> {
    let mut o = OpenOptions::new();
    o.create(true).append(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        o.mode(0o640).custom_flags(nix::libc::O_NOFOLLOW);
    }
    o.open(p)
}

impl Writer {
    fn new(rx: Receiver<Msg>, shared: Arc<Shared>) -> Writer {
        Writer {
            rx,
            shared,
            out: Out::Off,
            format: LogFormat::Text,
            line: String::with_capacity(512),
        }
    }

    fn run(mut self) {
        while let Ok(msg) = self.rx.recv() {
            self.handle(msg);
            // Write everything queued, then flush once.
            while let Ok(msg) = self.rx.try_recv() {
                self.handle(msg);
            }
            self.flush();
        }
    }

    fn handle(&mut self, msg: Msg) {
        // Control first, so entries after a reload or reopen follow it.
        self.control();
        match msg {
            Msg::Wake => {}
            Msg::Flush(done) => {
                self.flush();
                let _ = done.try_send(());
            }
            Msg::Entry(e) => {
                self.line.clear();
                match self.format {
                    LogFormat::Text => text(&e, &mut self.line),
                    LogFormat::Json => json(&e, &mut self.line),
                }
                if let Out::Syslog(s) = &mut self.out {
                    // One datagram, no newline; a failure was logged there.
                    if !s.send(e.time, e.protocol, &self.line) {
                        self.shared.dropped.fetch_add(1, Ordering::Relaxed);
                    }
                    return;
                }
                self.line.push('\n');
                let r = match &mut self.out {
                    Out::Off | Out::Syslog(_) => return,
                    Out::Stdout(s) => s.write_all(self.line.as_bytes()),
                    Out::File(_, Some(f)) => f.write_all(self.line.as_bytes()),
                    Out::File(_, None) => {
                        self.shared.dropped.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                };
                if let Err(e) = r {
                    self.shared.dropped.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(error = %e, "access log write failed");
                }
            }
        }
    }

    /// Applies a pending destination change or reopen.
    fn control(&mut self) {
        let pending = self
            .shared
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some((dest, format)) = pending {
            self.flush();
            self.format = format;
            self.out = match (Target::of(&dest), dest) {
                (Some((target, facility)), _) => Out::Syslog(Syslog::new(target, facility)),
                (None, AccessLogDest::Stdout) => Out::Stdout(io::stdout()),
                (None, AccessLogDest::File(p)) => {
                    let f = open_logged(&p);
                    Out::File(p, f)
                }
                (None, _) => Out::Off,
            };
        }
        if self.shared.reopen.swap(false, Ordering::Relaxed) {
            self.flush();
            match &mut self.out {
                Out::File(p, f) => {
                    *f = open_logged(p);
                    if f.is_some() {
                        tracing::info!(path = %p.display(), "access log reopened");
                    }
                }
                Out::Syslog(s) => {
                    if s.reconnect() {
                        tracing::info!("access log reconnected to syslog");
                    }
                }
                Out::Off | Out::Stdout(_) => {}
            }
        }
    }

    fn flush(&mut self) {
        let r = match &mut self.out {
            Out::Stdout(s) => s.flush(),
            Out::File(_, Some(f)) => f.flush(),
            _ => Ok(()),
        };
        if let Err(e) = r {
            tracing::warn!(error = %e, "access log flush failed");
        }
    }
}

fn open_logged(p: &std::path::Path) -> Option<BufWriter<File>> {
    match open(p) {
        Ok(f) => Some(BufWriter::with_capacity(64 * 1024, f)),
        Err(e) => {
            tracing::error!(path = %p.display(), error = %e, "cannot open the access log; lines are dropped until SIGUSR1 reopens it");
            None
        }
    }
}

fn ms(d: Option<Duration>) -> Option<f64> {
    d.map(|d| (d.as_secs_f64() * 1e6).round() / 1e3)
}

/// `time=… listener=… client=… …`, logfmt. Names come from the configuration and
/// may hold anything TOML can: a value with whitespace, control characters, quotes
/// or `=` is quoted and escaped, so a line stays one line.
/// When the session started: its end less its duration.
fn start(e: &Entry) -> SystemTime {
    e.time.checked_sub(e.duration).unwrap_or(e.time)
}

fn text(e: &Entry, out: &mut String) {
    use std::fmt::Write;
    let q = |s: &str| {
        if s.is_empty()
            || s.chars()
                .any(|c| c.is_whitespace() || c.is_control() || c == '"' || c == '=')
        {
            format!("{s:?}")
        } else {
            s.to_string()
        }
    };
    let opt = |v: Option<f64>| v.map_or("-".to_string(), |v| v.to_string());
    let _ = write!(
        out,
        "time={} proto={} listener={} client={} pool={} backend={} to_backend={} from_backend={} connect_ms={} first_byte_ms={} duration_ms={} start={} backend_addr={} retries={} listener_conns={} backend_conns={} {}{}{}",
        humantime::format_rfc3339_micros(e.time),
        e.protocol,
        q(&e.listener),
        e.client,
        q(&e.pool),
        e.backend.as_deref().map_or("-".to_string(), q),
        e.to_backend,
        e.from_backend,
        opt(ms(e.connect)),
        opt(ms(e.first_byte)),
        ms(Some(e.duration)).unwrap_or(0.0),
        humantime::format_rfc3339_micros(start(e)),
        e.backend_addr.map_or("-".to_string(), |a| a.to_string()),
        e.retries,
        e.listener_conns,
        e.backend_conns,
        // tcp lines: `sni`, just before `reason`.
        if e.protocol == "tcp" {
            format!("sni={} ", e.sni.as_deref().map_or("-".to_string(), q))
        } else {
            String::new()
        },
        // Last, as before these fields came: `reason` ends the line (after the
        // HTTP fields on an http line).
        if e.http.is_some() { "" } else { "reason=" },
        if e.http.is_some() { "" } else { e.reason },
    );
    if let Some(h) = &e.http {
        let _ = write!(
            out,
            "method={} host={} path={} version={} status={} route={} request_id={} head_ms={} reason={}",
            q(&h.method),
            q(&h.host),
            q(&h.path),
            h.version,
            h.status,
            q(&h.route),
            q(&h.request_id),
            opt(ms(h.head)),
            e.reason,
        );
    }
}

fn json(e: &Entry, out: &mut String) {
    let v = serde_json::json!({
        "time": humantime::format_rfc3339_micros(e.time).to_string(),
        "proto": e.protocol,
        "listener": &*e.listener,
        "client": e.client.to_string(),
        "pool": &*e.pool,
        "backend": e.backend.as_deref(),
        "to_backend": e.to_backend,
        "from_backend": e.from_backend,
        "connect_ms": ms(e.connect),
        "first_byte_ms": ms(e.first_byte),
        "duration_ms": ms(Some(e.duration)),
        "reason": e.reason,
        "start": humantime::format_rfc3339_micros(start(e)).to_string(),
        "backend_addr": e.backend_addr.map(|a| a.to_string()),
        "retries": e.retries,
        "listener_conns": e.listener_conns,
        "backend_conns": e.backend_conns,
    });
    let mut v = v;
    if let (true, Some(o)) = (e.protocol == "tcp", v.as_object_mut()) {
        o.insert("sni".into(), e.sni.as_deref().into());
    }
    if let (Some(h), Some(o)) = (&e.http, v.as_object_mut()) {
        o.insert("method".into(), h.method.clone().into());
        o.insert("host".into(), h.host.clone().into());
        o.insert("path".into(), h.path.clone().into());
        o.insert("version".into(), h.version.into());
        o.insert("status".into(), h.status.into());
        o.insert("route".into(), h.route.clone().into());
        o.insert("request_id".into(), h.request_id.clone().into());
        o.insert("head_ms".into(), serde_json::json!(ms(h.head)));
    }
    out.push_str(&v.to_string());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> Entry {
        Entry {
            time: SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000),
            protocol: "tcp",
            listener: "web front\n".into(),
            client: "127.0.0.1:5000".parse().unwrap(),
            pool: "p".into(),
            backend: Some("10.0.0.1:80".into()),
            backend_addr: Some("10.0.0.1:80".parse().unwrap()),
            retries: 1,
            listener_conns: 7,
            backend_conns: 3,
            to_backend: 10,
            from_backend: 20,
            connect: Some(Duration::from_micros(250)),
            first_byte: None,
            duration: Duration::from_millis(1500),
            reason: "client_closed",
            sni: None,
            http: None,
        }
    }

    #[test]
    fn text_line_is_logfmt() {
        let mut s = String::new();
        text(&entry(), &mut s);
        assert_eq!(
            s,
            "time=2027-01-15T08:00:00.000000Z proto=tcp listener=\"web front\\n\" client=127.0.0.1:5000 pool=p backend=10.0.0.1:80 to_backend=10 from_backend=20 connect_ms=0.25 first_byte_ms=- duration_ms=1500 start=2027-01-15T07:59:58.500000Z backend_addr=10.0.0.1:80 retries=1 listener_conns=7 backend_conns=3 sni=- reason=client_closed"
        );
    }

    #[test]
    fn an_http_line_adds_the_request() {
        let mut e = entry();
        e.protocol = "http";
        e.reason = "complete";
        e.http = Some(Box::new(HttpFields {
            method: "POST".into(),
            host: "api.example.com".into(),
            path: "/v1/chat completions".into(),
            version: "HTTP/1.1",
            status: 200,
            route: "/v1".into(),
            request_id: "abc".into(),
            head: Some(Duration::from_millis(2)),
        }));
        let mut s = String::new();
        text(&e, &mut s);
        assert!(
            s.ends_with(" backend_conns=3 method=POST host=api.example.com path=\"/v1/chat completions\" version=HTTP/1.1 status=200 route=/v1 request_id=abc head_ms=2 reason=complete"),
            "{s}"
        );
        let mut s = String::new();
        json(&e, &mut s);
        let v: serde_json::Value = serde_json::from_str(&s).unwrap();
        assert_eq!(v["status"], 200);
        assert_eq!(v["head_ms"], 2.0);
        assert_eq!(v["reason"], "complete");
    }

    #[test]
    fn json_line_is_one_object() {
        let mut s = String::new();
        json(&entry(), &mut s);
        let v: serde_json::Value = serde_json::from_str(&s).unwrap();
        assert_eq!(v["listener"], "web front\n");
        assert_eq!(v["to_backend"], 10);
        assert_eq!(v["connect_ms"], 0.25);
        assert!(v["first_byte_ms"].is_null());
        assert_eq!(v["start"], "2027-01-15T07:59:58.500000Z");
        assert_eq!(v["backend_addr"], "10.0.0.1:80");
        assert_eq!(v["retries"], 1);
        assert_eq!(v["listener_conns"], 7);
        assert_eq!(v["backend_conns"], 3);
        assert!(!s.contains('\n'));
    }
}
