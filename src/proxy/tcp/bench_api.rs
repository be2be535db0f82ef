//! For benches/ only, not a stable API: lets `benches/pump.rs` drive the session's
//! byte pump ([`Pump`]) without a balancer around it. Hidden from the docs; may change
//! or go away with any commit.

use std::io;
use std::task::Poll;

use tokio::net::TcpStream;

use super::pump::{Pump, PumpEnd};
use crate::proxy::Activity;

/// Moves `bytes` bytes from `src` to `dst` through one [`Pump`], as one direction of a
/// session does, and returns once they are all written to `dst`. The peer of `src`
/// must send exactly that many (more would be moved too, up to the next wait);
/// end of stream before that is `UnexpectedEof`. Whether bulk reads switch to
/// splice(2) follows `splice` (as `runtime.splice`).
pub async fn pump(
    src: &mut TcpStream,
    dst: &mut TcpStream,
    bytes: u64,
    splice: bool,
) -> io::Result<()> {
    let activity = Activity::new();
    let mut pump = Pump::default();
    let (mut r, _) = src.split();
    let (_, mut w) = dst.split();
    std::future::poll_fn(|cx| {
        let polled = pump.poll(cx, &mut r, &mut w, &activity, splice);
        if pump.moved >= bytes {
            return Poll::Ready(Ok(()));
        }
        match polled {
            Poll::Pending => Poll::Pending,
            Poll::Ready(PumpEnd::Eof) => Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into())),
            Poll::Ready(PumpEnd::ReadError(e) | PumpEnd::WriteError(e)) => Poll::Ready(Err(e)),
        }
    })
    .await
}
