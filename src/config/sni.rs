//! A tcp listener's `[[listeners.sni_routes]]` and `sni_required`: TLS passthrough
//! routed by the ClientHello's server_name. Names are checked here (lower case, no
//! trailing dot, `*.x` wildcards only as the first label, each name once per
//! listener); matching is [`crate::proxy::tcp::sni`]'s.

use std::collections::HashMap;
use std::time::Duration;

use super::raw;
use super::validate::{known_pool, Source};
use super::{ConfigError, PoolConfig, Protocol};

/// A listener's SNI routing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SniConfig {
    /// In file order.
    pub routes: Vec<SniRouteConfig>,
    /// Clients without SNI, or whose name no route matches, are closed instead of
    /// going to the listener's pool.
    pub required: bool,
    /// `proxy_header_timeout`: from accept to a complete ClientHello (and PROXY
    /// header before it, with `accept_proxy`).
    pub timeout: Duration,
}

/// One `[[listeners.sni_routes]]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SniRouteConfig {
    /// Lower case, without a trailing dot; `*.x` for a wildcard.
    pub server_names: Vec<String>,
    pub pool: String,
}

/// The SNI settings of listener `l` (`None` without `sni_routes`), or the error of a
/// key that does not apply or a name that is malformed or listed twice.
pub(super) fn sni(
    src: &Source<'_>,
    l: &raw::Listener,
    at: &dyn Fn(&str) -> String,
    pools: &[PoolConfig],
) -> Result<Option<SniConfig>, ConfigError> {
    let protocol = *l.protocol.get_ref();
    let raw = l.sni_routes.get_ref();
    if raw.is_empty() {
        if let Some(r) = &l.sni_required {
            return Err(src.err(
                r.span(),
                at("sni_required"),
                "sni_required applies with [[listeners.sni_routes]]; this listener routes no SNI"
                    .into(),
            ));
        }
        return Ok(None);
    }
    if protocol != Protocol::Tcp {
        return Err(src.err(
            l.sni_routes.span(),
            at("sni_routes"),
            format!(
                "sni_routes applies to tcp listeners (TLS passthrough); this one is {}",
                protocol.as_str()
            ),
        ));
    }
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut routes = Vec::with_capacity(raw.len());
    for (j, r) in raw.iter().enumerate() {
        let path = |key: &str| at(&format!("sni_routes[{j}].{key}"));
        known_pool(src, &r.pool, &path("pool"), pools)?;
        if r.server_names.get_ref().is_empty() {
            return Err(src.err(
                r.server_names.span(),
                path("server_names"),
                "an empty list matches no client: list at least one name".into(),
            ));
        }
        let mut names = Vec::with_capacity(r.server_names.get_ref().len());
        for (k, n) in r.server_names.get_ref().iter().enumerate() {
            let key = format!("server_names[{k}]");
            let name = server_name(n.get_ref()).map_err(|m| src.err(n.span(), path(&key), m))?;
            if let Some(first) = seen.insert(name.clone(), j) {
                return Err(src.err(
                    n.span(),
                    path(&key),
                    format!("{name:?} is already routed by sni_routes[{first}]: a name may appear once per listener"),
                ));
            }
            names.push(name);
        }
        routes.push(SniRouteConfig {
            server_names: names,
            pool: r.pool.get_ref().clone(),
        });
    }
    Ok(Some(SniConfig {
        routes,
        required: l.sni_required.as_ref().is_some_and(|r| *r.get_ref()),
        timeout: super::proxy::header_timeout(src, l, at)?,
    }))
}

/// A `server_names` entry: a DNS name, or `*.` and one; lower case, without a
/// trailing dot. IP addresses are refused: TLS clients never send one as SNI
/// (RFC 6066, section 3).
fn server_name(n: &str) -> Result<String, String> {
    let name = super::http::host(n).map_err(|_| {
        format!("{n:?} is not a server name: expected a name such as \"api.example.com\" or a wildcard \"*.example.com\"")
    })?;
    if name.starts_with('[') || name.parse::<std::net::IpAddr>().is_ok() {
        return Err(format!(
            "{n:?} is an IP address: TLS clients send names only as SNI"
        ));
    }
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::server_name;
    use crate::config::Config;

    /// A tcp listener `edge` with `keys` and `routes` (TOML after the listener's
    /// table), pools `a` and `b`; the error `flowgate check` would print.
    fn error(keys: &str, routes: &str) -> String {
        let text = format!(
            "[[listeners]]\nname = \"edge\"\nbind = \"127.0.0.1:0\"\n{keys}\n{routes}\n\
             [[pools]]\nname = \"a\"\nbackends = [{{ address = \"127.0.0.1:1\" }}]\n\
             [[pools]]\nname = \"b\"\nbackends = [{{ address = \"127.0.0.1:2\" }}]\n"
        );
        match Config::parse(&text, std::path::Path::new("t.toml")) {
            Ok(_) => panic!("accepted:\n{text}"),
            Err(e) => e.to_string(),
        }
    }

    fn route(names: &str, pool: &str) -> String {
        format!("[[listeners.sni_routes]]\nserver_names = {names}\npool = \"{pool}\"\n")
    }

    #[test]
    fn check_refuses_bad_routes() {
        let two = format!(
            "{}{}",
            route(r#"["api.example.com"]"#, "a"),
            route(r#"["API.example.com."]"#, "b")
        );
        let e = error("pool = \"a\"", &two);
        assert!(
            e.contains("listeners[0].sni_routes[1].server_names[0]"),
            "{e}"
        );
        assert!(e.contains("already routed by sni_routes[0]"), "{e}");
        let e = error("", &route(r#"["x.example.com", "x.example.com"]"#, "a"));
        assert!(e.contains("already routed"), "{e}");
        for bad in ["a.*.b", "*", "*.", "10.0.0.1", "a:443"] {
            let e = error("", &route(&format!("[\"{bad}\"]"), "a"));
            assert!(e.contains("sni_routes[0].server_names[0]"), "{bad}: {e}");
        }
        let e = error("", &route("[]", "a"));
        assert!(e.contains("empty list"), "{e}");
        let e = error("", &route(r#"["x.example.com"]"#, "nope"));
        assert!(e.contains("no pool named \"nope\""), "{e}");
        let e = error(
            "protocol = \"udp\"\npool = \"a\"",
            &route(r#"["x.example.com"]"#, "a"),
        );
        assert!(e.contains("sni_routes applies to tcp listeners"), "{e}");
        let e = error("protocol = \"http\"", &route(r#"["x.example.com"]"#, "a"));
        assert!(e.contains("sni_routes applies to tcp listeners"), "{e}");
        let e = error("pool = \"a\"\nsni_required = true", "");
        assert!(e.contains("sni_required applies with"), "{e}");
        // Without sni_routes a tcp listener still needs its pool, and the timeout
        // needs accept_proxy.
        let e = error("", "");
        assert!(e.contains("listeners[0].pool"), "{e}");
        let e = error("pool = \"a\"\nproxy_header_timeout = \"1s\"", "");
        assert!(e.contains("proxy_header_timeout applies with"), "{e}");
    }

    #[test]
    fn routes_as_configured() {
        let text = "[[listeners]]\nname = \"edge\"\nbind = \"127.0.0.1:0\"\n\
                    sni_required = true\nproxy_header_timeout = \"1s\"\n\
                    [[listeners.sni_routes]]\nserver_names = [\"*.Example.com\", \"API.x.org.\"]\npool = \"a\"\n\
                    [[pools]]\nname = \"a\"\nbackends = [{ address = \"127.0.0.1:1\" }]\n";
        let c = Config::parse(text, std::path::Path::new("t.toml")).unwrap();
        let sni = c.listeners[0].sni.as_ref().unwrap();
        assert_eq!(c.listeners[0].pool, None);
        assert!(sni.required);
        assert_eq!(sni.timeout, std::time::Duration::from_secs(1));
        assert_eq!(sni.routes[0].server_names, ["*.example.com", "api.x.org"]);
        assert_eq!(sni.routes[0].pool, "a");
    }

    #[test]
    fn server_names() {
        assert_eq!(server_name("API.Example.COM.").unwrap(), "api.example.com");
        assert_eq!(server_name("*.Example.com").unwrap(), "*.example.com");
        for bad in [
            "", "*", "*.", "a.*.b", "*.*.b", "a..b", "a b", "a:443", "10.0.0.1", "[::1]", "x/y",
        ] {
            assert!(server_name(bad).is_err(), "{bad:?}");
        }
    }
}
