//! What an idle connection costs in user space is mostly its session future (the
//! task stores it inline): these tests keep it small.

use std::sync::Arc;

use tokio::net::TcpStream;

use super::session::{connect, serve};
use super::shared::{ListenerSettings, ListenerShared};
use super::transfer::{splice_both, Stops};
use tokio_util::sync::CancellationToken;

/// One listener `l` of `protocol` over pool `p`, as the runtime would make it.
fn listener(
    protocol: &str,
    token: &CancellationToken,
) -> (
    crate::config::Config,
    super::Pools,
    Arc<ListenerSettings>,
    Arc<ListenerShared>,
) {
    let cfg = crate::config::Config::parse(
        &format!("[[listeners]]\nname='l'\nbind='127.0.0.1:0'\nprotocol='{protocol}'\npool='p'\n[[pools]]\nname='p'\nbackends=[{{address='127.0.0.1:1'}}]"),
        std::path::Path::new("t"),
    )
    .unwrap();
    let pools: super::Pools = [("p".to_string(), crate::pool::Pool::new(&cfg.pools[0]))].into();
    let settings = Arc::new(ListenerSettings::new(&cfg.listeners[0], &pools));
    let shared = ListenerShared::new(
        &cfg.listeners[0],
        &pools,
        crate::proxy::Context::for_tests(),
        token.clone(),
        token.clone(),
    );
    (cfg, pools, settings, shared)
}

/// A current-thread runtime with I/O and time (enter it before making sockets).
fn current_thread() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Two ends of one loopback TCP connection, non-blocking: the connecting one and
/// the accepted one.
fn loopback_pair() -> (std::net::TcpStream, std::net::TcpStream) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let accepted = l.accept().unwrap().0;
    for s in [&c, &accepted] {
        s.set_nonblocking(true).unwrap();
    }
    (c, accepted)
}

/// What an idle connection costs in user space is mostly this future (the task
/// stores it inline); keep it small. Two sockets, two directions, a timer.
#[test]
fn session_future_is_small() {
    fn size<F: std::future::Future>(_: &F) -> usize {
        std::mem::size_of::<F>()
    }
    let rt = current_thread();
    let _g = rt.enter();
    let (c, accepted) = loopback_pair();
    let mut a = TcpStream::from_std(c).unwrap();
    let mut b = TcpStream::from_std(accepted).unwrap();
    let token = CancellationToken::new();
    let backend = crate::backend::Backend::new(
        &crate::config::BackendConfig {
            name: "127.0.0.1:1".into(),
            addr: "127.0.0.1:1".parse().unwrap(),
            weight: 1,
            max_connections: None,
            hostname: None,
        },
        "p",
    );
    let (cfg, pools, settings, shared) = listener("tcp", &token);
    let stops = Stops {
        listener: shared.clone(),
        guard: backend.claim(),
        epoch: 0,
    };
    let f = splice_both(&mut a, &mut b, &settings, &stops);
    let n = size(&f);
    eprintln!("splice_both future: {n} bytes");
    assert!(n < 640, "splice_both future is {n} bytes");
    drop(f);
    let whole = serve(a, "127.0.0.1:2".parse().unwrap(), &shared, settings);
    let n = size(&whole);
    {
        let st = Arc::new(ListenerSettings::new(&cfg.listeners[0], &pools));
        let c = connect(
            &shared,
            &st,
            st.pool.as_ref(),
            "127.0.0.1:2".parse().unwrap(),
            None,
        );
        eprintln!("connect future: {} bytes", size(&c));
    }
    eprintln!("serve future: {n} bytes");
    assert!(n < 1000, "serve future is {n} bytes");
}

/// An idle kept-alive HTTP/1.1 client is parked as its connection task alone (see
/// `proxy::http::conn`), so that task's future is most of what it costs: keep it
/// small. The rare, large states (a WebSocket tunnel, an h2c connection) are boxed,
/// and the client socket's wrapper is too: it moves from one function's state to
/// the next, and the future kept room for both (2,384 bytes before, 536 after).
#[test]
fn http_connection_future_is_small() {
    let rt = current_thread();
    let _g = rt.enter();
    let (c, _accepted) = loopback_pair();
    let a = TcpStream::from_std(c).unwrap();
    let token = CancellationToken::new();
    let (_, _, settings, shared) = listener("http", &token);
    let place = super::Place::take(&shared, None).unwrap();
    let f = crate::proxy::http::serve(a, "127.0.0.1:2".parse().unwrap(), place, settings);
    let n = std::mem::size_of_val(&f);
    eprintln!("http connection future: {n} bytes");
    assert!(n < 800, "http connection future is {n} bytes");
}
