//! The access log's syslog destinations: one RFC 5424 datagram per entry, to the
//! local daemon's socket (`/dev/log`) or over UDP to a remote receiver (RFC 5426).
//!
//! The header (`<PRI>1 TIMESTAMP HOSTNAME flowgate PID MSGID -`) is written by
//! `syslog_fmt`, a formatter that leaves the transport to its caller, so the writer
//! thread owns a plain std socket here. The MSG is the line a file would get (text
//! or JSON), cut at a character boundary so that a datagram never exceeds
//! [`MAX_DATAGRAM`] bytes. It goes without the UTF-8 BOM that RFC 5424 allows
//! before a MSG (MSG-UTF8): rsyslog keeps a BOM in the message text, so it would
//! start every line of the files it writes. A send that fails drops the entry
//! (counted by the caller); the writer goes on.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use syslog_fmt::v5424::{self, Formatter, Msg, Timestamp};
use syslog_fmt::{Facility, Severity};

use crate::config::{AccessLogDest, DEV_LOG};

/// The largest datagram sent: what RFC 5426 says every receiver should accept.
pub(super) const MAX_DATAGRAM: usize = 2048;

/// How long a send may wait on a local daemon's full socket before the entry is
/// dropped: a stuck daemon costs entries, never a stuck writer (a reload's switch
/// and the flush at exit wait for the writer).
const SEND_TIMEOUT: Duration = Duration::from_secs(1);

/// Where the datagrams go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Target {
    /// A local daemon's datagram socket: [`DEV_LOG`], or a test's own.
    Local(PathBuf),
    Udp(SocketAddr),
}

impl Target {
    /// The target and facility of `dest`, if it is a syslog destination.
    pub(super) fn of(dest: &AccessLogDest) -> Option<(Target, u8)> {
        match *dest {
            AccessLogDest::Syslog { facility } => Some((Target::Local(DEV_LOG.into()), facility)),
            AccessLogDest::SyslogUdp { addr, facility } => Some((Target::Udp(addr), facility)),
            _ => None,
        }
    }

    /// A socket connected to the target: fails if no daemon listens locally (or
    /// `/dev/log` is missing), or the remote address has no route.
    pub(super) fn connect(&self) -> io::Result<Socket> {
        match self {
            Target::Local(path) => {
                let s = UnixDatagram::unbound()?;
                s.connect(path)?;
                s.set_write_timeout(Some(SEND_TIMEOUT))?;
                Ok(Socket::Unix(s))
            }
            Target::Udp(addr) => {
                let any = match addr {
                    SocketAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
                    SocketAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
                };
                let s = UdpSocket::bind(SocketAddr::new(any, 0))?;
                s.connect(addr)?;
                Ok(Socket::Udp(s))
            }
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Local(p) => write!(f, "{}", p.display()),
            Target::Udp(a) => write!(f, "udp://{a}"),
        }
    }
}

pub(super) enum Socket {
    Unix(UnixDatagram),
    Udp(UdpSocket),
}

impl Socket {
    fn send(&self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Socket::Unix(s) => s.send(buf),
            Socket::Udp(s) => s.send(buf),
        }
    }
}

/// The writer thread's syslog output.
pub(super) struct Syslog {
    target: Target,
    /// `None` while the target cannot be connected to (tried again on the next
    /// entry).
    socket: Option<Socket>,
    header: Formatter,
    /// The datagram being built, reused.
    buf: Vec<u8>,
    /// Whether the last entry was lost: one warning when sends start failing and
    /// one note when they work again, not a warning per entry.
    failing: bool,
}

impl Syslog {
    /// Connects to `target`; if that fails, says so and tries again with each entry.
    pub(super) fn new(target: Target, facility: u8) -> Syslog {
        let hostname = hostname();
        let pid = std::process::id().to_string();
        let header = v5424::Config {
            // The config admits only codes the crate has a variant for.
            facility: Facility::try_from(facility).unwrap_or_default(),
            hostname: Some(&hostname),
            app_name: Some("flowgate"),
            proc_id: Some(&pid),
        }
        .into_formatter();
        let mut s = Syslog {
            target,
            socket: None,
            header,
            buf: Vec::with_capacity(MAX_DATAGRAM),
            failing: false,
        };
        s.reconnect();
        s
    }

    /// Connects afresh (SIGUSR1, after the daemon restarted); returns whether it
    /// worked.
    pub(super) fn reconnect(&mut self) -> bool {
        match self.target.connect() {
            Ok(s) => {
                self.socket = Some(s);
                true
            }
            Err(e) => {
                self.socket = None;
                self.failed(&e);
                false
            }
        }
    }

    /// Sends one entry as one datagram; returns whether it went out. `msgid` is the
    /// entry's protocol, `msg` its formatted line.
    pub(super) fn send(&mut self, time: SystemTime, msgid: &str, msg: &str) -> bool {
        format(&self.header, time, msgid, msg, &mut self.buf);
        if self.socket.is_none() && !self.reconnect() {
            return false;
        }
        let mut r = self.socket.as_ref().map_or(Ok(0), |s| s.send(&self.buf));
        // A local daemon that restarted left our socket connected to its old one:
        // connect to the new one and try once more. A full socket (the timeout)
        // is not that.
        if let (Err(e), Target::Local(_)) = (&r, &self.target) {
            if !matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) && self.reconnect()
            {
                r = self.socket.as_ref().map_or(Ok(0), |s| s.send(&self.buf));
            }
        }
        match r {
            Ok(_) => {
                if self.failing {
                    self.failing = false;
                    tracing::info!(dest = %self.target, "access log: syslog sends work again");
                }
                true
            }
            Err(e) => {
                self.failed(&e);
                false
            }
        }
    }

    fn failed(&mut self, e: &io::Error) {
        if !self.failing {
            self.failing = true;
            tracing::warn!(dest = %self.target, error = %e, "access log: cannot send to syslog; entries are dropped and counted until it works again");
        }
    }
}

/// One datagram into `buf`: the RFC 5424 header at severity informational, no
/// structured data, then a space and `msg` as the MSG (MSG-ANY: no BOM), cut at a
/// character boundary so that the whole is at most [`MAX_DATAGRAM`] bytes.
pub(super) fn format(
    header: &Formatter,
    time: SystemTime,
    msgid: &str,
    msg: &str,
    buf: &mut Vec<u8>,
) {
    /// The space before the message.
    const MSG_PREFIX: usize = 1;
    buf.clear();
    let ts = humantime::format_rfc3339_micros(time).to_string();
    // Writing into a Vec cannot fail.
    let _ = header.write_header(
        buf,
        Severity::Info,
        Timestamp::PreformattedString(ts),
        Some(msgid),
    );
    let _ = v5424::write_nil_value(buf);
    let room = MAX_DATAGRAM.saturating_sub(buf.len() + MSG_PREFIX);
    let msg = &msg[..msg.floor_char_boundary(room)];
    // Bytes rather than a str: the crate would put a BOM before a str.
    let _ = v5424::write_msg(buf, Msg::NonUnicodeBytes(msg.as_bytes()));
}

/// The HOSTNAME field: the system's host name if RFC 5424 admits it (1 to 255
/// printable ASCII characters), else the nil value `-`.
fn hostname() -> String {
    let name = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_default();
    if name.is_empty() || name.len() > 255 || !name.bytes().all(|b| b.is_ascii_graphic()) {
        "-".into()
    } else {
        name
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> Formatter {
        v5424::Config {
            facility: Facility::Local0,
            hostname: Some("h"),
            app_name: Some("flowgate"),
            proc_id: Some("42"),
        }
        .into_formatter()
    }

    fn at() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_micros(1_800_000_000_000_007)
    }

    #[test]
    fn a_datagram_is_an_rfc5424_header_and_the_line() {
        let mut buf = Vec::new();
        format(&header(), at(), "tcp", "reason=client_closed", &mut buf);
        assert_eq!(
            String::from_utf8(buf).unwrap(),
            "<134>1 2027-01-15T08:00:00.000007Z h flowgate 42 tcp - reason=client_closed"
        );
    }

    #[test]
    fn a_long_line_is_cut_at_a_character_boundary_to_2048_bytes() {
        let mut buf = Vec::new();
        format(&header(), at(), "udp", "", &mut buf);
        // What the header and the space before the MSG leave for the line (an
        // empty MSG still gets its space).
        let room = MAX_DATAGRAM - buf.len();

        // A line that just fits is sent whole; one byte more is cut.
        let fits = "a".repeat(room);
        format(&header(), at(), "udp", &fits, &mut buf);
        assert_eq!(buf.len(), MAX_DATAGRAM);
        assert!(buf.ends_with(fits.as_bytes()));
        format(&header(), at(), "udp", &format!("{fits}b"), &mut buf);
        assert_eq!(buf.len(), MAX_DATAGRAM);
        assert!(buf.ends_with(fits.as_bytes()));

        // Two-byte characters from an odd offset: the cut falls inside one, so it
        // moves back to the character's start and the datagram is a byte short.
        let pad = if room.is_multiple_of(2) { "a" } else { "" };
        let line = format!("{pad}{}", "é".repeat(room));
        format(&header(), at(), "udp", &line, &mut buf);
        assert_eq!(buf.len(), MAX_DATAGRAM - 1);
        let s = String::from_utf8(buf).expect("still UTF-8");
        let msg = s.splitn(8, ' ').nth(7).unwrap();
        assert!(line.starts_with(msg), "{msg}");
        assert_eq!(msg.len(), room - 1);
    }

    /// The transport, on a socket of the test's own: one datagram per send, and a
    /// receiver that went away costs the entry, not the sender; a new receiver at
    /// the same path is found again.
    #[test]
    fn local_datagrams_survive_a_restarted_daemon() {
        let dir = std::env::temp_dir().join(format!("flowgate-syslog-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("log");
        let daemon = UnixDatagram::bind(&path).unwrap();
        let mut out = Syslog::new(Target::Local(path.clone()), 16);
        assert!(out.send(at(), "tcp", "one"));
        let mut got = [0u8; MAX_DATAGRAM];
        let n = daemon.recv(&mut got).unwrap();
        let first = std::str::from_utf8(&got[..n]).unwrap();
        assert!(
            first.starts_with("<134>1 2027-01-15T08:00:00.000007Z "),
            "{first}"
        );
        assert!(
            first.ends_with(&format!(" flowgate {} tcp - one", std::process::id())),
            "{first}"
        );

        drop(daemon);
        assert!(!out.send(at(), "tcp", "lost"), "nobody listens");
        std::fs::remove_file(&path).unwrap();
        let daemon = UnixDatagram::bind(&path).unwrap();
        assert!(
            out.send(at(), "udp", "two"),
            "reconnected to the new socket"
        );
        let n = daemon.recv(&mut got).unwrap();
        assert!(std::str::from_utf8(&got[..n])
            .unwrap()
            .ends_with(" udp - two"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
