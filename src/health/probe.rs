//! One probe: TCP connect (with optional send/expect) or an HTTP/1.1 GET through
//! hyper's client, all under the check's timeout. A probe of the traffic port of a
//! pool with `send_proxy` starts with a PROXY header that names no client (v1
//! `UNKNOWN`, v2 `LOCAL`), as HAProxy's checks do: such a backend refuses a
//! connection without one.

use std::io;
use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::backend::Backend;
use crate::config::{HealthCheckConfig, HealthKind, SendProxy};

/// Why a probe failed; shown in logs and the API.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("refused")]
    Refused,
    #[error("timeout")]
    Timeout,
    #[error("bad status {0}")]
    BadStatus(u16),
    #[error("unexpected reply")]
    UnexpectedReply,
    #[error("{0}")]
    Other(String),
}

impl From<io::Error> for ProbeError {
    fn from(e: io::Error) -> Self {
        match e.kind() {
            io::ErrorKind::ConnectionRefused => ProbeError::Refused,
            io::ErrorKind::TimedOut => ProbeError::Timeout,
            _ => ProbeError::Other(e.to_string()),
        }
    }
}

/// Probes `b` once; `send` is its pool's `send_proxy`.
pub async fn probe(
    cfg: &HealthCheckConfig,
    b: &Backend,
    send: SendProxy,
) -> Result<(), ProbeError> {
    let addr = SocketAddr::new(b.addr.ip(), cfg.port.unwrap_or(b.addr.port()));
    // Another port (`port`) is not the one that expects the header.
    let header = match cfg.port {
        None => crate::proxy::tcp::probe_header(send),
        Some(_) => None,
    };
    match tokio::time::timeout(cfg.timeout, run(cfg, b, addr, header)).await {
        Ok(r) => r,
        Err(_) => Err(ProbeError::Timeout),
    }
}

async fn run(
    cfg: &HealthCheckConfig,
    b: &Backend,
    addr: SocketAddr,
    header: Option<Vec<u8>>,
) -> Result<(), ProbeError> {
    let mut stream = TcpStream::connect(addr).await?;
    let _ = stream.set_nodelay(true);
    if let Some(h) = header {
        stream.write_all(&h).await?;
    }
    match cfg.kind {
        HealthKind::Tcp => {
            if let Some(send) = &cfg.send {
                stream.write_all(unescape(send).as_bytes()).await?;
            }
            if let Some(expect) = &cfg.expect {
                let expect = unescape(expect);
                let mut got = Vec::new();
                let mut buf = [0u8; 1024];
                loop {
                    let n = stream.read(&mut buf).await?;
                    if n == 0 {
                        return Err(ProbeError::UnexpectedReply);
                    }
                    got.extend_from_slice(&buf[..n]);
                    if contains(&got, expect.as_bytes()) {
                        break;
                    }
                    if got.len() > 64 * 1024 {
                        return Err(ProbeError::UnexpectedReply);
                    }
                }
            }
            Ok(())
        }
        HealthKind::Http => {
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .map_err(|e| ProbeError::Other(e.to_string()))?;
            let host = cfg.host.clone().unwrap_or_else(|| b.name.to_string());
            let req = hyper::Request::get(cfg.path.as_str())
                .header(hyper::header::HOST, host)
                .header(hyper::header::USER_AGENT, "flowgate-health-check")
                .header(hyper::header::CONNECTION, "close")
                .body(Empty::<Bytes>::new())
                .map_err(|e| ProbeError::Other(e.to_string()))?;
            let send = sender.send_request(req);
            tokio::pin!(conn, send);
            let resp = tokio::select! {
                r = &mut send => r,
                r = &mut conn => {
                    // With "Connection: close" the connection can finish in the same
                    // poll that hands the response over: the response is then ready.
                    r.map_err(|e| ProbeError::Other(e.to_string()))?;
                    send.await
                }
            }
            .map_err(|e| ProbeError::Other(e.to_string()))?;
            let status = resp.status().as_u16();
            if cfg
                .expect_status
                .iter()
                .any(|&(lo, hi)| (lo..=hi).contains(&status))
            {
                Ok(())
            } else {
                Err(ProbeError::BadStatus(status))
            }
        }
    }
}

/// `\r`, `\n`, `\t` and `\\` escapes in send/expect strings (TOML basic strings already
/// unescape these; this covers literal strings too).
fn unescape(s: &str) -> String {
    s.replace("\\r", "\r")
        .replace("\\n", "\n")
        .replace("\\t", "\t")
        .replace("\\\\", "\\")
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || hay.windows(needle.len()).any(|w| w == needle)
}
