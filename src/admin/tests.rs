//! Property tests of the admin API's input parsing: path segments (`decode`) and the
//! weight body (`parse_weight`) never panic on arbitrary input, and valid input
//! round-trips.

use super::*;
use percent_encoding::{percent_encode, utf8_percent_encode, NON_ALPHANUMERIC};
use proptest::prelude::*;

/// JSON whitespace, up to three characters.
fn ws() -> impl Strategy<Value = String> {
    "[ \t\r\n]{0,3}"
}

proptest! {
    #[test]
    fn decode_never_panics(s in any::<String>(), p in "(%[0-9a-fA-F]{0,2}|%[0-9a-zA-Z]{2}|[^%]){0,40}") {
        let _ = decode(&s);
        let _ = decode(&p);
    }

    /// Percent-encoding any string (every byte but ASCII letters and digits) and
    /// decoding it gives the string back.
    #[test]
    fn decode_inverts_percent_encoding(s in any::<String>()) {
        let encoded = utf8_percent_encode(&s, NON_ALPHANUMERIC).to_string();
        prop_assert_eq!(decode(&encoded), Some(s));
    }

    /// Any bytes, percent-encoded: decoded exactly when they are UTF-8.
    #[test]
    fn decode_accepts_exactly_utf8(bytes in prop::collection::vec(any::<u8>(), 0..32)) {
        let encoded = percent_encode(&bytes, NON_ALPHANUMERIC).to_string();
        prop_assert_eq!(decode(&encoded), String::from_utf8(bytes).ok());
    }

    /// An address written raw (no `%`) is its own decoding.
    #[test]
    fn raw_address_decodes_to_itself(s in "[A-Za-z0-9.:_\\[\\]-]{0,40}") {
        prop_assert_eq!(decode(&s), Some(s.clone()));
    }

    #[test]
    fn parse_weight_never_panics(
        bytes in prop::collection::vec(any::<u8>(), 0..64),
        json in r#"\{ ?("weight"|"w"|"") ?: ?(-?[0-9]{0,25}(\.[0-9]+)?(e[0-9]+)?|"[0-9]*"|null|true|\[\]|\{\})( ?, ?"[a-z]*" ?: ?[0-9]*)?\}?"#,
    ) {
        let _ = parse_weight(&bytes);
        let _ = parse_weight(json.as_bytes());
    }

    /// `{"weight": N}` for any N in 1..=1000, with any JSON whitespace, parses to N.
    #[test]
    fn parse_weight_round_trips(w in 1u32..=1000, a in ws(), b in ws(), c in ws(), d in ws(), e in ws()) {
        let body = format!(r#"{a}{{{b}"weight"{c}:{d}{w}{e}}}{a}"#);
        prop_assert_eq!(parse_weight(body.as_bytes()), Ok(w));
    }

    /// Any integer outside 1..=1000 is refused with the range in the message.
    #[test]
    fn parse_weight_refuses_out_of_range(w in prop_oneof![i64::MIN..=0, 1001..=i64::MAX]) {
        let err = parse_weight(format!(r#"{{"weight": {w}}}"#).as_bytes()).unwrap_err();
        prop_assert!(err.contains("1..=1000"), "{}", err);
    }

    /// An extra field is refused, whatever its name.
    #[test]
    fn parse_weight_refuses_unknown_fields(w in 1u32..=1000, key in "[a-z_]{1,10}") {
        prop_assume!(key != "weight");
        let body = format!(r#"{{"weight": {w}, "{key}": 1}}"#);
        prop_assert!(parse_weight(body.as_bytes()).is_err());
    }
}
