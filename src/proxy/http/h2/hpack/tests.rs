//! The HPACK decoder and encoder, checked against RFC 7541's examples.

use super::*;

fn hex(s: &str) -> Vec<u8> {
    let s: String = s.split_whitespace().collect();
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn fields(d: &mut Decoder, block: &[u8]) -> Vec<(String, String)> {
    let mut v = Vec::new();
    d.decode(block, |n, val| {
        v.push((
            String::from_utf8(n.to_vec()).unwrap(),
            String::from_utf8(val.to_vec()).unwrap(),
        ))
    })
    .unwrap();
    v
}

fn pairs(v: &[(String, String)]) -> Vec<(&str, &str)> {
    v.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect()
}

/// RFC 7541 Appendix C.3 and C.4: three requests on one connection, each
/// leaning on the table the one before filled, without and with Huffman
/// codes.
#[test]
fn the_rfc_examples_decode() {
    let first = [
        (":method", "GET"),
        (":scheme", "http"),
        (":path", "/"),
        (":authority", "www.example.com"),
    ];
    let mut second = first.to_vec();
    second.push(("cache-control", "no-cache"));
    let third = [
        (":method", "GET"),
        (":scheme", "https"),
        (":path", "/index.html"),
        (":authority", "www.example.com"),
        ("custom-key", "custom-value"),
    ];
    for blocks in [
        [
            "8286 8441 0f77 7777 2e65 7861 6d70 6c65 2e63 6f6d",
            "8286 84be 5808 6e6f 2d63 6163 6865",
            "8287 85bf 400a 6375 7374 6f6d 2d6b 6579 0c63 7573 746f 6d2d 7661 6c75 65",
        ],
        [
            "8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff",
            "8286 84be 5886 a8eb 1064 9cbf",
            "8287 85bf 4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf",
        ],
    ] {
        let mut d = decoder();
        assert_eq!(pairs(&fields(&mut d, &hex(blocks[0]))), first);
        assert_eq!(d.size, 57);
        assert_eq!(pairs(&fields(&mut d, &hex(blocks[1]))), second);
        assert_eq!(d.size, 110);
        assert_eq!(pairs(&fields(&mut d, &hex(blocks[2]))), third);
        assert_eq!(d.size, 164);
    }
}

#[test]
fn the_table_evicts_the_oldest_and_obeys_size_updates() {
    let mut d = decoder();
    // Literal with incremental indexing, new name: 0x40, name, value.
    let entry = |n: &str, v: &str| {
        let mut b = vec![0x40, n.len() as u8];
        b.extend_from_slice(n.as_bytes());
        b.push(v.len() as u8);
        b.extend_from_slice(v.as_bytes());
        b
    };
    let v = "x".repeat(100);
    for i in 0..40 {
        fields(&mut d, &entry(&format!("n{i:02}"), &v));
    }
    // Each entry is 3 + 100 + 32 = 135 bytes: 30 fit in 4096.
    assert_eq!(d.table.len(), 30);
    assert_eq!(&d.table[0].0[..], b"n39");
    // Index 62 is the newest.
    assert_eq!(fields(&mut d, &[0x80 | 62])[0].0, "n39");
    // A size update at the start of a block evicts; one after a field, or
    // past SETTINGS_HEADER_TABLE_SIZE, is an error.
    fields(&mut d, &[0x3f, 0xe1, 0x01]); // 31 + 225 = 256
    assert_eq!(d.table.len(), 1);
    assert!(d.decode(&[0x82, 0x20], |_, _| {}).is_err());
    assert!(d.decode(&[0x3f, 0xe2, 0x1f], |_, _| {}).is_err()); // 4097
}

#[test]
fn broken_blocks_are_errors() {
    for b in [
        &[0x80][..],                                     // index 0
        &[0xff, 0x7f][..],                               // past both tables
        &[0x00, 0x05, b'a'][..],                         // a string longer than the block
        &[0x00][..],                                     // a literal cut short
        &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01][..], // an integer too long
        &[0x00, 0x81, 0x00, 0x00][..],                   // Huffman padding of zeros
    ] {
        assert!(decoder().decode(b, |_, _| {}).is_err(), "{b:?}");
    }
}

#[test]
fn a_response_head_decodes_as_it_was() {
    let mut h = HeaderMap::new();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(
        header::DATE,
        HeaderValue::from_static("Thu, 03 Dec 2026 15:00:00 GMT"),
    );
    h.insert("x-request-id", HeaderValue::from_static("abc"));
    h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive"));
    let long = "v".repeat(300);
    h.insert("x-long", HeaderValue::from_str(&long).unwrap());
    let mut sens = HeaderValue::from_static("secret");
    sens.set_sensitive(true);
    h.insert(header::SET_COOKIE, sens);
    for (code, s) in [(200, "200"), (404, "404"), (201, "201"), (503, "503")] {
        let mut out = BytesMut::new();
        encode_response(&mut out, StatusCode::from_u16(code).unwrap(), &h);
        let got = fields(&mut decoder(), &out);
        assert_eq!(got[0], (":status".into(), s.into()));
        assert_eq!(
            pairs(&got[1..]),
            vec![
                ("content-type", "text/event-stream"),
                ("date", "Thu, 03 Dec 2026 15:00:00 GMT"),
                ("x-request-id", "abc"),
                ("x-long", long.as_str()),
                ("set-cookie", "secret"),
            ]
        );
    }
}

#[test]
fn every_static_name_has_its_index() {
    for (i, (n, _)) in STATIC.iter().enumerate().skip(14) {
        let n = std::str::from_utf8(n).unwrap();
        assert_eq!(static_name(n), Some(i as u8 + 1), "{n}");
    }
}

/// Fields as literals without indexing, new names.
fn literal_block(fields: &[(&str, &str)]) -> Vec<u8> {
    let mut b = BytesMut::new();
    for (n, v) in fields {
        b.put_u8(0);
        string(&mut b, n.as_bytes());
        string(&mut b, v.as_bytes());
    }
    b.to_vec()
}

fn request(fields: &[(&str, &str)], trailers: bool, limit: usize) -> Block {
    decode(&mut decoder(), &literal_block(fields), trailers, limit).unwrap()
}

#[test]
fn a_request_block_gives_its_parts() {
    let b = request(
        &[
            (":method", "POST"),
            (":scheme", "http"),
            (":authority", "api.example.com"),
            (":path", "/v1/chat?x=1"),
            ("content-type", "application/json"),
            ("te", "trailers"),
            ("x-a", "1"),
            ("x-a", "2"),
        ],
        false,
        65536,
    );
    assert_eq!(b.malformed, None);
    assert_eq!(b.method.as_deref(), Some(&b"POST"[..]));
    assert_eq!(b.scheme.as_deref(), Some(&b"http"[..]));
    assert_eq!(b.authority.as_deref(), Some(&b"api.example.com"[..]));
    assert_eq!(b.path.as_deref(), Some(&b"/v1/chat?x=1"[..]));
    assert_eq!(b.headers.get_all("x-a").iter().count(), 2);
    assert_eq!(b.headers["content-type"], "application/json");
}

#[test]
fn malformed_blocks_are_told() {
    let cases: &[(&[(&str, &str)], bool)] = &[
        (&[(":method", "GET"), ("x", "1"), (":path", "/")], false),
        (&[(":method", "GET"), (":bogus", "1")], false),
        (&[(":method", "GET"), (":method", "GET")], false),
        (&[(":method", "GET"), ("X-Upper", "1")], false),
        (&[(":method", "GET"), ("connection", "close")], false),
        (
            &[(":method", "GET"), ("transfer-encoding", "chunked")],
            false,
        ),
        (&[(":method", "GET"), ("te", "gzip")], false),
        (&[(":method", "GET"), ("x", "a\rb")], false),
        (&[(":method", "GET"), ("x", "a\0b")], false),
        (&[("grpc-status", "0"), (":path", "/")], true),
    ];
    for (fields, trailers) in cases {
        let b = request(fields, *trailers, 65536);
        assert!(b.malformed.is_some(), "{fields:?}");
    }
    let b = request(&[("grpc-status", "0")], true, 65536);
    assert_eq!(b.malformed, None);
    assert_eq!(b.headers["grpc-status"], "0");
}

#[test]
fn a_list_over_the_limit_is_oversize() {
    let v = "x".repeat(100);
    let b = request(&[(":method", "GET"), ("a", &v), ("b", &v)], false, 200);
    assert!(b.oversize);
    let b = request(&[(":method", "GET"), ("a", &v)], false, 200);
    assert!(!b.oversize);
}

#[test]
fn a_broken_block_is_a_connection_error() {
    // An index past both tables.
    assert!(decode(&mut decoder(), &[0xff, 0x7f], false, 65536).is_err());
    // A string longer than the block.
    assert!(decode(&mut decoder(), &[0x00, 0x05, b'a'], false, 65536).is_err());
}
