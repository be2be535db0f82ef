//! After a `101 Switching Protocols` (WebSocket): the client's socket and the
//! upgraded upstream connection become one byte stream, in the connection's own
//! task (so it counts as the listener's session, drains and stops like one),
//! until either side closes, no byte moves for the route's `stream_idle_timeout`,
//! or the listener is cut.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::debug;

/// Runs the tunnel; `early` are client bytes read past the handshake.
pub async fn run(
    mut client: TcpStream,
    early: Bytes,
    upstream: hyper::upgrade::OnUpgrade,
    idle: Duration,
    cut: &CancellationToken,
) {
    let up = tokio::select! {
        r = upstream => r,
        _ = cut.cancelled() => return,
    };
    let Ok(up) = up else {
        return;
    };
    let mut up = TokioIo::new(up);
    let r = async {
        if !early.is_empty() {
            up.write_all(&early).await?;
        }
        copy_idle(&mut client, &mut up, idle).await
    };
    tokio::select! {
        r = r => if let Err(e) = r {
            debug!(error = %e, "websocket tunnel ended");
        },
        _ = cut.cancelled() => {}
    }
}

/// Copies both ways between `a` and `b` until both directions end, or neither
/// moves a byte for `idle`.
async fn copy_idle<A, B>(a: &mut A, b: &mut B, idle: Duration) -> std::io::Result<()>
where
    A: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    B: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut ar, mut aw) = tokio::io::split(a);
    let (mut br, mut bw) = tokio::io::split(b);
    let last = AtomicU64::new(crate::proxy::now_us());
    async fn one<R, W>(
        r: &mut R,
        w: &mut W,
        last: &AtomicU64,
        idle: Duration,
    ) -> std::io::Result<()>
    where
        R: tokio::io::AsyncRead + Unpin,
        W: tokio::io::AsyncWrite + Unpin,
    {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match tokio::time::timeout(idle, r.read(&mut buf)).await {
                Ok(r) => r?,
                Err(_) => {
                    let quiet = crate::proxy::now_us().saturating_sub(last.load(Ordering::Relaxed));
                    if Duration::from_micros(quiet) >= idle {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            "stream_idle_timeout",
                        ));
                    }
                    continue;
                }
            };
            if n == 0 {
                w.shutdown().await?;
                return Ok(());
            }
            last.store(crate::proxy::now_us(), Ordering::Relaxed);
            w.write_all(&buf[..n]).await?;
        }
    }
    let (x, y) = tokio::join!(
        one(&mut ar, &mut bw, &last, idle),
        one(&mut br, &mut aw, &last, idle)
    );
    x.and(y)
}
