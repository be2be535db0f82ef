//! HTTP/2 for h2c clients, flowgate's own: frames, HPACK, streams and flow
//! control, in one task per connection. It replaced the `h2` crate on the
//! server side, whose per-request cost was about half of an h2c request's
//! instructions (docs/performance.md); `h2` (through hyper) still speaks to h2c
//! backends.

mod conn;
mod frame;
mod hpack;
mod request;
mod stream;

pub use conn::{Conn, ConnError, Settings};
pub use stream::{RecvBody, StreamHandle};
