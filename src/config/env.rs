//! `${NAME}` in a config file's double-quoted strings is replaced by the
//! environment variable `NAME` before the file is parsed (for secrets and per-host
//! addresses kept out of the file). An unset variable is an error at its place;
//! `$${` stands for a literal `${`. Comments and single-quoted (literal) strings are
//! left alone. The value is inserted as string content (quotes and backslashes
//! escaped), so it cannot change the file's structure; lines stay where they were,
//! columns after an expansion on the same line move by the difference in length.

use std::borrow::Cow;

/// Where an unset or malformed `${...}` is, and what is wrong.
#[derive(Debug)]
pub(super) struct EnvError {
    pub offset: usize,
    pub name: String,
    pub message: String,
}

/// `text` with every `${NAME}` in a double-quoted string expanded by `lookup`.
pub(super) fn expand(
    text: &str,
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<Cow<'_, str>, EnvError> {
    if !text.contains("${") {
        return Ok(Cow::Borrowed(text));
    }
    #[derive(PartialEq)]
    enum At {
        Normal,
        Comment,
        Basic { multi: bool },
        Literal { multi: bool },
    }
    let b = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut at = At::Normal;
    let mut i = 0;
    let mut copied = 0; // text[copied..i] is still to be copied
    while i < b.len() {
        let rest = &b[i..];
        match at {
            At::Normal => match b[i] {
                b'#' => at = At::Comment,
                b'"' if rest.starts_with(b"\"\"\"") => {
                    at = At::Basic { multi: true };
                    i += 2;
                }
                b'"' => at = At::Basic { multi: false },
                b'\'' if rest.starts_with(b"'''") => {
                    at = At::Literal { multi: true };
                    i += 2;
                }
                b'\'' => at = At::Literal { multi: false },
                _ => {}
            },
            At::Comment => {
                if b[i] == b'\n' {
                    at = At::Normal;
                }
            }
            At::Literal { multi } => {
                if multi && rest.starts_with(b"'''") {
                    at = At::Normal;
                    i += 2;
                } else if !multi && (b[i] == b'\'' || b[i] == b'\n') {
                    at = At::Normal;
                }
            }
            At::Basic { multi } => {
                if b[i] == b'\\' {
                    i += 1; // the escaped character is content
                } else if multi && rest.starts_with(b"\"\"\"") {
                    at = At::Normal;
                    i += 2;
                } else if !multi && (b[i] == b'"' || b[i] == b'\n') {
                    at = At::Normal;
                } else if rest.starts_with(b"$${") {
                    out.push_str(&text[copied..i]);
                    out.push_str("${");
                    i += 3;
                    copied = i;
                    continue;
                } else if rest.starts_with(b"${") {
                    let start = i;
                    let close = text[i + 2..].find(['}', '"', '\n']);
                    let Some(len) = close.filter(|&l| b[i + 2 + l] == b'}') else {
                        return Err(EnvError {
                            offset: start,
                            name: String::new(),
                            message: "\"${\" without a closing \"}\" (write \"$${\" for a literal \"${\")".into(),
                        });
                    };
                    let name = &text[i + 2..i + 2 + len];
                    let valid = name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
                        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
                    if !valid {
                        return Err(EnvError {
                            offset: start,
                            name: name.into(),
                            message: format!(
                                "{name:?} is not an environment variable name (letters, digits, _)"
                            ),
                        });
                    }
                    let Some(value) = lookup(name) else {
                        return Err(EnvError {
                            offset: start,
                            name: name.into(),
                            message: format!("environment variable {name} is not set"),
                        });
                    };
                    out.push_str(&text[copied..start]);
                    escape_into(&value, &mut out);
                    i += 2 + len + 1;
                    copied = i;
                    continue;
                }
            }
        }
        i += 1;
    }
    out.push_str(&text[copied.min(text.len())..]);
    Ok(Cow::Owned(out))
}

/// `value` as the content of a TOML basic string.
fn escape_into(value: &str, out: &mut String) {
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "HOST" => Some("10.0.0.7".into()),
            "TRICKY" => Some("a\"b\\c\nd".into()),
            _ => None,
        }
    }

    #[test]
    fn expands_in_basic_strings_only() {
        let t = "bind = \"${HOST}:80\" # ${UNSET} in a comment\nx = '${UNSET}'\ny = \"$${HOST}\"\n";
        let e = expand(t, env).unwrap();
        assert_eq!(
            e,
            "bind = \"10.0.0.7:80\" # ${UNSET} in a comment\nx = '${UNSET}'\ny = \"${HOST}\"\n"
        );
    }

    #[test]
    fn values_cannot_break_out_of_the_string() {
        let e = expand("k = \"${TRICKY}\"\n", env).unwrap();
        assert_eq!(e, "k = \"a\\\"b\\\\c\\u000Ad\"\n");
        assert_eq!(e.lines().count(), 1);
    }

    #[test]
    fn unset_and_malformed_are_errors_at_their_place() {
        let e = expand("a = 1\nk = \"x${NOPE}\"\n", env).unwrap_err();
        assert_eq!(e.offset, 12);
        assert!(e.message.contains("NOPE is not set"), "{e:?}");
        let e = expand("k = \"${1X}\"", env).unwrap_err();
        assert!(
            e.message.contains("not an environment variable name"),
            "{e:?}"
        );
        let e = expand("k = \"${HOST\"", env).unwrap_err();
        assert!(e.message.contains("closing"), "{e:?}");
    }

    #[test]
    fn text_without_references_is_borrowed() {
        assert!(matches!(
            expand("k = \"v\"", env).unwrap(),
            Cow::Borrowed(_)
        ));
    }
}
