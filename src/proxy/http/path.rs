//! Request paths: normalization (RFC 3986 §6.2.2) before routing, and the prefix a
//! route strips. Pure.

/// Why a path was refused (400).
#[derive(Debug, PartialEq, Eq)]
pub enum BadPath {
    /// `..` climbs above `/`.
    AboveRoot,
    /// Not origin-form (does not start with `/`) or a bad percent escape.
    Malformed,
}

/// The normalized form of `path` (no query): percent-encoded unreserved characters
/// decoded (other escapes kept, upper-cased, `%2F` included), `//` merged, `.` and
/// `..` segments resolved. `None` means it was already normal (no allocation).
pub fn normalize(path: &str) -> Result<Option<String>, BadPath> {
    if !path.starts_with('/') {
        return Err(BadPath::Malformed);
    }
    let b = path.as_bytes();
    let needs =
        path.contains('%') || path.contains("//") || path.split('/').any(|s| s == "." || s == "..");
    if !needs {
        return Ok(None);
    }
    // 1. Escapes.
    let mut decoded = String::with_capacity(path.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = |c: u8| (c as char).to_digit(16);
            let (Some(h), Some(l)) = (
                b.get(i + 1).and_then(|c| hex(*c)),
                b.get(i + 2).and_then(|c| hex(*c)),
            ) else {
                return Err(BadPath::Malformed);
            };
            let c = (h * 16 + l) as u8;
            if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~') {
                decoded.push(c as char);
            } else {
                decoded.push('%');
                decoded.push_str(&format!("{c:02X}"));
            }
            i += 3;
        } else {
            // The path is a &str: copy whole characters.
            let ch = path[i..].chars().next().unwrap_or('\u{fffd}');
            decoded.push(ch);
            i += ch.len_utf8().max(1);
        }
    }
    // 2. Segments.
    let trailing = decoded.ends_with('/') || decoded.ends_with("/.") || decoded.ends_with("/..");
    let mut out: Vec<&str> = Vec::new();
    for seg in decoded.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                if out.pop().is_none() {
                    return Err(BadPath::AboveRoot);
                }
            }
            s => out.push(s),
        }
    }
    let mut s = String::with_capacity(decoded.len());
    for seg in &out {
        s.push('/');
        s.push_str(seg);
    }
    if s.is_empty() || trailing {
        s.push('/');
    }
    Ok(Some(s))
}

/// `path` with `prefix` stripped (its trailing `/` kept): `/p/x` less `/p` is
/// `/x`, `/p` less `/p` is `/`.
pub fn strip<'a>(path: &'a str, prefix: &str) -> &'a str {
    let prefix = prefix.trim_end_matches('/');
    match path.strip_prefix(prefix) {
        Some("") => "/",
        Some(rest) if rest.starts_with('/') => rest,
        _ => path,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(p: &str) -> Result<String, BadPath> {
        normalize(p).map(|o| o.unwrap_or_else(|| p.to_string()))
    }

    #[test]
    fn normal_paths_are_kept_without_allocating() {
        assert_eq!(normalize("/v1/chat/completions"), Ok(None));
        assert_eq!(normalize("/"), Ok(None));
    }

    #[test]
    fn normalization() {
        assert_eq!(n("/a//b").unwrap(), "/a/b");
        assert_eq!(n("/a/./b/../c").unwrap(), "/a/c");
        assert_eq!(n("/a/b/..").unwrap(), "/a/");
        assert_eq!(n("/%7Ev1/%61").unwrap(), "/~v1/a");
        assert_eq!(n("/a%2fb").unwrap(), "/a%2Fb", "%2F stays encoded");
        assert_eq!(n("/a%20b").unwrap(), "/a%20b");
        assert_eq!(
            n("/%2e%2e/x"),
            Err(BadPath::AboveRoot),
            "encoded dots are dots"
        );
        assert_eq!(n("/.."), Err(BadPath::AboveRoot));
        assert_eq!(n("/a/../.."), Err(BadPath::AboveRoot));
        assert_eq!(n("/a%zz"), Err(BadPath::Malformed));
        assert_eq!(n("/a%4"), Err(BadPath::Malformed));
        assert_eq!(n("a"), Err(BadPath::Malformed));
        assert_eq!(n("/é//x").unwrap(), "/é/x");
    }

    #[test]
    fn stripping() {
        assert_eq!(strip("/p/x", "/p"), "/x");
        assert_eq!(strip("/p", "/p"), "/");
        assert_eq!(strip("/p/x", "/p/"), "/x");
        assert_eq!(strip("/x", "/"), "/x");
    }
}
