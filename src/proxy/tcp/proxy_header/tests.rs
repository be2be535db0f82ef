//! The header rules on bytes alone: versions, partial headers, sizes, addresses,
//! CRC32C, and what `send_proxy` builds from what came in.

use proptest::prelude::*;

use super::*;

const V2_SIG: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";

fn peer() -> SocketAddr {
    "192.0.2.9:4000".parse().unwrap()
}

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// A v2 PROXY header from `src` to `dst` over TCP with `tlvs` (encoded) after the
/// addresses; `command` 0x21 (PROXY) or 0x20 (LOCAL).
fn v2(command: u8, src: SocketAddr, dst: SocketAddr, tlvs: &[u8]) -> Vec<u8> {
    let mut h = V2_SIG.to_vec();
    h.push(command);
    let mut addrs = Vec::new();
    match (src, dst) {
        (SocketAddr::V4(s), SocketAddr::V4(d)) => {
            h.push(0x11);
            addrs.extend(s.ip().octets());
            addrs.extend(d.ip().octets());
        }
        (SocketAddr::V6(s), SocketAddr::V6(d)) => {
            h.push(0x21);
            addrs.extend(s.ip().octets());
            addrs.extend(d.ip().octets());
        }
        _ => unreachable!("one family"),
    }
    addrs.extend(src.port().to_be_bytes());
    addrs.extend(dst.port().to_be_bytes());
    h.extend(((addrs.len() + tlvs.len()) as u16).to_be_bytes());
    h.extend(addrs);
    h.extend(tlvs);
    h
}

fn tlv(kind: u8, value: &[u8]) -> Vec<u8> {
    let mut v = vec![kind];
    v.extend((value.len() as u16).to_be_bytes());
    v.extend(value);
    v
}

/// `header` with its CRC32C TLV (the last TLV) filled in.
fn with_crc(mut header: Vec<u8>) -> Vec<u8> {
    let at = header.len() - 4;
    let sum = crc32c(&header, at);
    header[at..].copy_from_slice(&sum.to_be_bytes());
    header
}

/// The TLVs of a complete v2 header, as (type, value).
fn tlvs_of(header: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let h = v2::Header::try_from(header).expect("a v2 header");
    h.tlvs()
        .map(|t| {
            let t = t.expect("whole TLV");
            (t.kind, t.value.to_vec())
        })
        .collect()
}

fn inbound(header: &[u8], rest: &[u8]) -> Inbound {
    let p = parse(header, peer(), AcceptProxy::Any).unwrap().unwrap();
    let mut buf = header.to_vec();
    buf.extend(rest);
    Inbound {
        client: p.client,
        dest: p.dest,
        buf,
        tlvs: p.tlvs,
        len: p.len,
    }
}

/// What `send_proxy = "v2"` sends for `inb` (with `authority` from SNI, if any),
/// checked to be a valid header (CRC32C included) naming the inbound addresses.
fn forward_v2(inb: &Inbound, authority: Option<&[u8]>) -> Vec<u8> {
    let dest = inb.dest.unwrap();
    let out = outbound(SendProxy::V2, inb.client, dest, Some(inb), authority).unwrap();
    let p = parse(&out, peer(), AcceptProxy::V2).unwrap().unwrap();
    assert_eq!(
        (p.client, p.dest, p.len),
        (inb.client, Some(dest), out.len())
    );
    out
}

#[test]
fn crc32c_is_castagnoli() {
    // The check value of CRC-32/ISCSI.
    assert_eq!(CRC32C.checksum(b"123456789"), 0xE306_9283);
}

#[test]
fn v1_headers_name_the_client_and_end_at_crlf() {
    let h = b"PROXY TCP4 198.51.100.7 203.0.113.1 51000 443\r\nGET / HTTP/1.1\r\n";
    let p = parse(h, peer(), AcceptProxy::V1).unwrap().unwrap();
    assert_eq!(p.client, sa("198.51.100.7:51000"));
    assert_eq!(p.dest, Some(sa("203.0.113.1:443")));
    assert_eq!(p.len, 47);
    assert_eq!(&h[p.len..], b"GET / HTTP/1.1\r\n");

    let h = b"PROXY TCP6 2001:db8::1 2001:db8::2 1 2\r\n";
    let p = parse(h, peer(), AcceptProxy::Any).unwrap().unwrap();
    assert_eq!(p.client, sa("[2001:db8::1]:1"));
    assert_eq!(p.len, h.len());

    // UNKNOWN: the front balancer's own connection; the TCP peer is the client.
    let p = parse(b"PROXY UNKNOWN\r\n", peer(), AcceptProxy::V1)
        .unwrap()
        .unwrap();
    assert_eq!((p.client, p.dest), (peer(), None));
}

#[test]
fn v2_headers_name_the_client_local_means_the_peer() {
    let h = v2(0x21, sa("198.51.100.7:51000"), sa("203.0.113.1:443"), &[]);
    let p = parse(&h, peer(), AcceptProxy::V2).unwrap().unwrap();
    assert_eq!(p.client, sa("198.51.100.7:51000"));
    assert_eq!(p.dest, Some(sa("203.0.113.1:443")));
    assert_eq!(p.len, 28);

    let h = v2(0x21, sa("[2001:db8::7]:9"), sa("[2001:db8::1]:443"), &[]);
    let p = parse(&h, peer(), AcceptProxy::Any).unwrap().unwrap();
    assert_eq!(p.client, sa("[2001:db8::7]:9"));

    let h = v2(0x20, sa("198.51.100.7:51000"), sa("203.0.113.1:443"), &[]);
    let p = parse(&h, peer(), AcceptProxy::V2).unwrap().unwrap();
    assert_eq!((p.client, p.dest), (peer(), None));

    // UNSPEC, no addresses: the peer too.
    let mut h = V2_SIG.to_vec();
    h.extend([0x21, 0x00, 0, 0]);
    let p = parse(&h, peer(), AcceptProxy::V2).unwrap().unwrap();
    assert_eq!((p.client, p.len), (peer(), 16));
}

#[test]
fn versions_are_taken_as_configured() {
    let one = b"PROXY TCP4 198.51.100.7 203.0.113.1 1 2\r\n".to_vec();
    let two = v2(0x21, sa("198.51.100.7:1"), sa("203.0.113.1:2"), &[]);
    for (input, want, ok) in [
        (&one, AcceptProxy::V1, true),
        (&one, AcceptProxy::V2, false),
        (&one, AcceptProxy::Any, true),
        (&two, AcceptProxy::V1, false),
        (&two, AcceptProxy::V2, true),
        (&two, AcceptProxy::Any, true),
    ] {
        let r = parse(input, peer(), want);
        assert_eq!(r.is_ok(), ok, "{want:?}: {r:?}");
        if !ok {
            assert!(matches!(r, Err(HeaderError::Version { .. })), "{r:?}");
            // Known from the first byte.
            let r = parse(&input[..1], peer(), want);
            assert!(matches!(r, Err(HeaderError::Version { .. })), "{r:?}");
        }
    }
}

#[test]
fn every_split_of_a_header_waits_for_the_rest() {
    let tlvs = [tlv(0x05, b"abc"), tlv(0xE0, b"x")].concat();
    for h in [
        b"PROXY TCP4 198.51.100.7 203.0.113.1 51000 443\r\n".to_vec(),
        b"PROXY TCP6 2001:db8::1 2001:db8::2 1 2\r\n".to_vec(),
        b"PROXY UNKNOWN\r\n".to_vec(),
        v2(0x21, sa("198.51.100.7:1"), sa("203.0.113.1:2"), &tlvs),
        v2(0x21, sa("[2001:db8::7]:9"), sa("[2001:db8::1]:443"), &[]),
    ] {
        for n in 0..h.len() {
            let r = parse(&h[..n], peer(), AcceptProxy::Any);
            assert!(matches!(r, Ok(None)), "{:?}: {r:?}", &h[..n]);
        }
        let p = parse(&h, peer(), AcceptProxy::Any).unwrap().unwrap();
        assert_eq!(p.len, h.len());
    }
}

#[test]
fn malformed_headers_are_refused() {
    for bad in [
        &b"GET / HTTP/1.1\r\n"[..],
        b"\x16\x03\x01",
        b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 99999\r\n",
        b"PROXY TCP4 ::1 ::2 1 2\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rX",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",
        b"PROXX",
        b"\r\n\r\n\0\r\nQUIX",
    ] {
        let r = parse(bad, peer(), AcceptProxy::Any);
        assert!(
            matches!(r, Err(HeaderError::Malformed(_) | HeaderError::NotProxy)),
            "{bad:?}: {r:?}"
        );
    }
    // v1 past its 107 bytes without a CRLF.
    let long = [b"PROXY TCP4 ".as_slice(), &[b'1'; 120]].concat();
    assert!(parse(&long, peer(), AcceptProxy::V1).is_err());
    // A v2 TLV cut short by the header's length.
    let mut h = v2(0x21, sa("1.2.3.4:1"), sa("5.6.7.8:2"), &[0xE0, 0, 9, 1]);
    let r = parse(&h, peer(), AcceptProxy::V2);
    assert!(matches!(r, Err(HeaderError::Malformed(_))), "{r:?}");
    // Version 1 in the v2 signature's version field.
    h[12] = 0x11;
    assert!(parse(&h, peer(), AcceptProxy::V2).is_err());
}

#[test]
fn a_v2_header_over_4_kib_is_refused_from_its_fixed_part() {
    let big = tlv(0xE0, &vec![7; MAX_HEADER]);
    let h = v2(0x21, sa("1.2.3.4:1"), sa("5.6.7.8:2"), &big);
    let r = parse(&h[..16], peer(), AcceptProxy::V2);
    assert!(matches!(r, Err(HeaderError::TooLong)), "{r:?}");
    // Exactly 4 KiB is taken.
    let fits = tlv(0xE0, &vec![7; MAX_HEADER - 28 - 3]);
    let h = v2(0x21, sa("1.2.3.4:1"), sa("5.6.7.8:2"), &fits);
    assert_eq!(h.len(), MAX_HEADER);
    assert!(parse(&h, peer(), AcceptProxy::V2).unwrap().is_some());
}

#[test]
fn a_v2_crc32c_must_match() {
    let tlvs = [tlv(0x05, b"id-1"), tlv(TLV_CRC32C, &[0; 4])].concat();
    let good = with_crc(v2(0x21, sa("1.2.3.4:1"), sa("5.6.7.8:2"), &tlvs));
    assert!(parse(&good, peer(), AcceptProxy::V2).unwrap().is_some());
    let mut bad = good.clone();
    bad[16] ^= 1; // the source address
    let r = parse(&bad, peer(), AcceptProxy::V2);
    assert!(matches!(r, Err(HeaderError::Malformed(_))), "{r:?}");
    let short = [tlv(TLV_CRC32C, &[0; 3])].concat();
    let h = v2(0x21, sa("1.2.3.4:1"), sa("5.6.7.8:2"), &short);
    assert!(parse(&h, peer(), AcceptProxy::V2).is_err());
}

#[test]
fn send_v1_names_client_and_destination() {
    let h = outbound(
        SendProxy::V1,
        sa("198.51.100.7:51000"),
        sa("203.0.113.1:443"),
        None,
        None,
    )
    .unwrap();
    assert_eq!(h, b"PROXY TCP4 198.51.100.7 203.0.113.1 51000 443\r\n");
    // Families mixed (an IPv6 listener, an IPv4 client from a header): mapped.
    let h = outbound(
        SendProxy::V1,
        sa("198.51.100.7:1"),
        sa("[::1]:2"),
        None,
        None,
    )
    .unwrap();
    assert_eq!(h, b"PROXY TCP6 ::ffff:198.51.100.7 ::1 1 2\r\n");
}

#[test]
fn send_v2_makes_up_a_unique_id_per_connection() {
    let (c, d) = (sa("198.51.100.7:51000"), sa("203.0.113.1:443"));
    let a = outbound(SendProxy::V2, c, d, None, None).unwrap();
    let b = outbound(SendProxy::V2, c, d, None, None).unwrap();
    let p = parse(&a, peer(), AcceptProxy::V2).unwrap().unwrap();
    assert_eq!((p.client, p.dest, p.len), (c, Some(d), a.len()));
    let (ta, tb) = (tlvs_of(&a), tlvs_of(&b));
    assert_eq!(ta.len(), 1);
    assert_eq!(ta[0].0, TLV_UNIQUE_ID);
    assert_eq!(ta[0].1.len(), 16);
    assert_ne!(ta, tb, "16 random bytes each");
}

#[test]
fn send_v2_passes_tlvs_on_but_noop_and_recomputes_crc32c() {
    let tlvs = [
        tlv(0x01, b"h2"),
        tlv(TLV_NOOP, &[0; 5]),
        tlv(TLV_AUTHORITY, b"api.example.com"),
        tlv(TLV_UNIQUE_ID, b"front-id-42"),
        tlv(0xE3, b"vendor"),
        tlv(TLV_CRC32C, &[0; 4]),
    ]
    .concat();
    let header = with_crc(v2(
        0x21,
        sa("198.51.100.7:51000"),
        sa("203.0.113.1:443"),
        &tlvs,
    ));
    let inb = inbound(&header, b"hello");
    let out = forward_v2(&inb, None);
    let kinds: Vec<(u8, Vec<u8>)> = tlvs_of(&out);
    assert_eq!(
        kinds[..4],
        [
            (0x01, b"h2".to_vec()),
            (TLV_AUTHORITY, b"api.example.com".to_vec()),
            (TLV_UNIQUE_ID, b"front-id-42".to_vec()),
            (0xE3, b"vendor".to_vec()),
        ]
    );
    assert_eq!(kinds.len(), 5);
    assert_eq!(kinds[4].0, TLV_CRC32C);
    // A known server name (SNI) takes the authority's place.
    let out = forward_v2(&inb, Some(b"sni.example.net"));
    let t = tlvs_of(&out);
    assert_eq!(t[1], (TLV_AUTHORITY, b"sni.example.net".to_vec()));
    assert_eq!(t.iter().filter(|t| t.0 == TLV_AUTHORITY).count(), 1);
}

#[test]
fn a_v1_inbound_header_goes_on_as_v2_with_its_addresses() {
    let inb = inbound(b"PROXY TCP4 198.51.100.7 203.0.113.1 51000 443\r\n", b"");
    let out = forward_v2(&inb, None);
    assert!(tlvs_of(&out).iter().all(|t| t.0 == TLV_UNIQUE_ID));
}

#[test]
fn probes_say_the_connection_is_the_balancers_own() {
    assert_eq!(probe_header(SendProxy::Off), None);
    assert_eq!(probe_header(SendProxy::V1).unwrap(), b"PROXY UNKNOWN\r\n");
    let h = probe_header(SendProxy::V2).unwrap();
    assert_eq!(h.len(), 16);
    let p = parse(&h, peer(), AcceptProxy::V2).unwrap().unwrap();
    assert_eq!((p.client, p.dest), (peer(), None));
    assert_eq!(
        v2::Header::try_from(&h[..]).unwrap().command,
        Command::Local
    );
}

proptest! {
    /// Whatever the bytes, the parser answers (never panics) and a header it takes
    /// is within the input and the size limit.
    #[test]
    fn any_bytes_are_parsed_or_refused(
        bytes in prop::collection::vec(any::<u8>(), 0..300),
        sig in 0..3usize,
    ) {
        let input = match sig {
            0 => bytes,
            1 => [V2_SIG, &bytes].concat(),
            _ => [b"PROXY ".as_slice(), &bytes].concat(),
        };
        for want in [AcceptProxy::V1, AcceptProxy::V2, AcceptProxy::Any] {
            if let Ok(Some(p)) = parse(&input, peer(), want) {
                prop_assert!(p.len <= input.len() && p.len <= MAX_HEADER);
                prop_assert!(p.tlvs.end <= p.len);
            }
        }
    }
}
