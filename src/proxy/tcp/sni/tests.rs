use std::collections::HashMap;
use std::time::Duration;

use super::{parse, HelloError, SniRouter};

/// What `openssl s_client -servername API.Example.com.` sent (OpenSSL 3.0): one
/// record holding the ClientHello.
const HELLO: &[u8] = include_bytes!("hello.bin");

fn name(input: &[u8]) -> Option<String> {
    parse(input).unwrap().unwrap().map(|n| n.to_string())
}

#[test]
fn a_whole_hello_gives_its_name_lower_case_without_the_dot() {
    assert_eq!(name(HELLO).as_deref(), Some("api.example.com"));
}

#[test]
fn every_prefix_is_incomplete_not_an_error() {
    for n in 0..HELLO.len() {
        assert!(matches!(parse(&HELLO[..n]), Ok(None)), "{n} bytes");
    }
}

/// The same handshake message cut into records of `size` bytes.
fn reframed(size: usize) -> Vec<u8> {
    let message = &HELLO[5..];
    let mut out = Vec::new();
    for chunk in message.chunks(size) {
        out.extend_from_slice(&[0x16, 0x03, 0x01]);
        out.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
        out.extend_from_slice(chunk);
    }
    out
}

#[test]
fn a_hello_across_records() {
    for size in [1, 3, 7, 100] {
        let input = reframed(size);
        assert_eq!(name(&input).as_deref(), Some("api.example.com"), "{size}");
        for n in 0..input.len() {
            assert!(matches!(parse(&input[..n]), Ok(None)), "{size}: {n} bytes");
        }
    }
}

#[test]
fn non_tls_bytes_are_refused_at_once() {
    for bad in [
        &b"GET / HTTP/1.1\r\n"[..],
        b"\x15\x03\x01\x00\x02\x02\x28",
        b"\x00",
    ] {
        assert!(matches!(parse(bad), Err(HelloError::NotTls(_))), "{bad:?}");
    }
    // A handshake record whose message is not a ClientHello (a ServerHello).
    let mut server = HELLO.to_vec();
    server[5] = 2;
    assert!(matches!(parse(&server), Err(HelloError::NotTls(_))));
    // Garbage inside a complete message.
    let mut garbled = HELLO.to_vec();
    for b in &mut garbled[9..] {
        *b = 0xff;
    }
    assert!(parse(&garbled).is_err());
}

#[test]
fn a_message_longer_than_the_cap_is_refused_from_its_header() {
    let input = [0x16, 0x03, 0x01, 0x00, 0x04, 0x01, 0x01, 0x00, 0x00];
    assert!(matches!(parse(&input), Err(HelloError::TooLong)));
}

fn router(names: &[(&str, usize)]) -> SniRouter {
    let mut r = SniRouter {
        routes: Vec::new(),
        exact: HashMap::new(),
        wildcard: Vec::new(),
        required: false,
        timeout: Duration::from_secs(3),
    };
    for &(n, i) in names {
        match n.strip_prefix('*') {
            Some(s) => r.wildcard.push((s.to_string(), i)),
            None => {
                r.exact.insert(n.to_string(), i);
            }
        }
    }
    r
}

#[test]
fn exact_beats_wildcard_then_file_order() {
    let r = router(&[
        ("*.example.com", 0),
        ("api.example.com", 1),
        ("*.b.example.com", 2),
    ]);
    assert_eq!(r.route("api.example.com"), Some(1));
    assert_eq!(r.route("web.example.com"), Some(0));
    assert_eq!(
        r.route("a.b.example.com"),
        Some(0),
        "first wildcard in file order"
    );
    assert_eq!(
        r.route("example.com"),
        None,
        "a wildcard never matches its bare domain"
    );
    assert_eq!(r.route("xexample.com"), None);
    assert_eq!(r.route("other.org"), None);
}

proptest::proptest! {
    /// Whatever the bytes, parsing answers (never a panic), and a hello cut
    /// anywhere into records of any size still gives its name.
    #[test]
    fn never_panics_and_any_framing_works(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..600), size in 1usize..400) {
        let _ = parse(&bytes);
        let mut tls = vec![0x16, 0x03, 0x01];
        tls.extend_from_slice(&bytes);
        let _ = parse(&tls);
        let input = reframed(size);
        let got = name(&input);
        proptest::prop_assert_eq!(got.as_deref(), Some("api.example.com"));
    }
}
