//! `GET /api/v1/config`: the running config as TOML.
//!
//! It is the text the file was loaded from (comments and order kept, `${VAR}`s
//! expanded), edited to what runs: backends added through the API are appended to
//! their pool's list, removed ones are taken out, and API-set weights replace the
//! file's. Each change is marked with a `# runtime:` comment, and a header lists
//! them all. The result parses as a flowgate config with the running backends.

use toml_edit::{Array, ArrayOfTables, DocumentMut, InlineTable, Item, Table, Value};

use crate::config::{Config, Overrides};

/// The marker every runtime change carries.
const MARK: &str = "# runtime:";

/// Renders `cfg` (the running config) with `overrides` marked. `weight(pool,
/// backend)` gives a weight the API set, if any.
pub(super) fn render(
    cfg: &Config,
    overrides: &Overrides,
    weight: impl Fn(&str, &str) -> Option<u32>,
) -> Result<String, String> {
    let mut doc: DocumentMut = cfg
        .text
        .parse()
        .map_err(|e| format!("the loaded text no longer parses: {e}"))?;
    let mut notes = Vec::new();
    if let Some(pools) = doc.get_mut("pools").and_then(Item::as_array_of_tables_mut) {
        for table in pools.iter_mut() {
            let Some(name) = table.get("name").and_then(Item::as_str).map(String::from) else {
                continue;
            };
            let Some(pool) = cfg.pool(&name) else {
                continue;
            };
            let mut list = Backends::of(table);
            if let Some(o) = overrides.pool(&name) {
                for gone in &o.removed {
                    if list.remove(gone) {
                        notes.push(format!("pool {name:?}: backend {gone} removed"));
                    }
                }
                for b in &o.added {
                    list.add(&b.name, b.weight);
                    notes.push(format!("pool {name:?}: backend {} added", b.name));
                }
            }
            for b in &pool.backends {
                if let Some(w) = weight(&name, &b.name) {
                    if list.set_weight(&b.name, w) {
                        notes.push(format!("pool {name:?}: backend {} weight {w}", b.name));
                    }
                }
            }
        }
    }
    let mut out = String::from(
        "# flowgate: the running configuration. The file as loaded, ${VAR}s expanded,\n\
         # with the changes made through the admin API applied and marked \"# runtime:\".\n",
    );
    if let Some(file) = &cfg.source {
        out.push_str(&format!("# Loaded from {}.\n", file.display()));
    }
    if notes.is_empty() {
        out.push_str("# Runtime changes: none.\n");
    } else {
        out.push_str("# Runtime changes (kept across reloads, lost on restart):\n");
        for n in &notes {
            out.push_str(&format!("#   {n}\n"));
        }
    }
    out.push('\n');
    out.push_str(&doc.to_string());
    Ok(out)
}

/// A pool's `backends`, written either as an array of inline tables or as
/// `[[pools.backends]]` tables.
enum Backends<'a> {
    Inline(&'a mut Array),
    Tables(&'a mut ArrayOfTables),
    None,
}

impl<'a> Backends<'a> {
    fn of(pool: &'a mut Table) -> Self {
        match pool.get_mut("backends") {
            Some(Item::Value(Value::Array(a))) => Backends::Inline(a),
            Some(Item::ArrayOfTables(t)) => Backends::Tables(t),
            _ => Backends::None,
        }
    }

    /// Takes `name` out of the list; false if it is not there.
    fn remove(&mut self, name: &str) -> bool {
        match self {
            Backends::Inline(a) => {
                let Some(i) = a.iter().position(|v| inline_address(v) == Some(name)) else {
                    return false;
                };
                a.remove(i);
                let trailing = a.trailing().as_str().unwrap_or("").to_string();
                a.set_trailing(format!(
                    "{trailing}\n  {MARK} removed through the admin API: {name:?}\n"
                ));
                true
            }
            Backends::Tables(t) => {
                let Some(i) = t
                    .iter()
                    .position(|b| b.get("address").and_then(Item::as_str) == Some(name))
                else {
                    return false;
                };
                t.remove(i);
                true
            }
            Backends::None => false,
        }
    }

    fn add(&mut self, name: &str, weight: u32) {
        match self {
            Backends::Inline(a) => {
                let mut t = InlineTable::new();
                t.insert("address", name.into());
                t.insert("weight", i64::from(weight).into());
                let mut v = Value::InlineTable(t);
                v.decor_mut()
                    .set_prefix(format!("\n  {MARK} added through the admin API\n  "));
                // A comment after the last element stays with it, not with the new one.
                let trailing = a.trailing().as_str().unwrap_or("").to_string();
                if trailing.contains('#') {
                    if let Some(last) = a.iter_mut().last() {
                        let suffix = last.decor().suffix().and_then(|s| s.as_str()).unwrap_or("");
                        let suffix = format!("{suffix}{}", trailing.trim_end_matches([' ', '\n']));
                        last.decor_mut().set_suffix(format!("{suffix}\n  "));
                        a.set_trailing("\n");
                    }
                }
                a.push_formatted(v);
            }
            Backends::Tables(aot) => {
                let mut t = Table::new();
                t.insert("address", toml_edit::value(name));
                t.insert("weight", toml_edit::value(i64::from(weight)));
                t.decor_mut()
                    .set_prefix(format!("\n{MARK} added through the admin API\n"));
                aot.push(t);
            }
            Backends::None => {}
        }
    }

    /// Writes `weight` for `name`; false if it is not there.
    fn set_weight(&mut self, name: &str, weight: u32) -> bool {
        let mark = |old: Option<&str>| match old.map(str::trim_start) {
            Some(o) if !o.is_empty() => format!(" {MARK} weight set through the admin API\n  {o}"),
            _ => format!(" {MARK} weight set through the admin API\n  "),
        };
        match self {
            Backends::Inline(a) => {
                for v in a.iter_mut() {
                    if inline_address(v) != Some(name) {
                        continue;
                    }
                    if let Value::InlineTable(t) = v {
                        t.insert("weight", i64::from(weight).into());
                    }
                    let old = v
                        .decor()
                        .suffix()
                        .and_then(|s| s.as_str())
                        .map(String::from);
                    v.decor_mut().set_suffix(mark(old.as_deref()));
                    return true;
                }
                false
            }
            Backends::Tables(aot) => {
                for t in aot.iter_mut() {
                    if t.get("address").and_then(Item::as_str) != Some(name) {
                        continue;
                    }
                    t.insert("weight", toml_edit::value(i64::from(weight)));
                    if let Some(mut key) = t.key_mut("weight") {
                        key.leaf_decor_mut()
                            .set_prefix(format!("{MARK} weight set through the admin API\n"));
                    }
                    return true;
                }
                false
            }
            Backends::None => false,
        }
    }
}

/// The `address` of an inline-table backend.
fn inline_address(v: &Value) -> Option<&str> {
    v.as_inline_table()?.get("address")?.as_str()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::BackendConfig;
    use std::path::Path;

    fn backend(name: &str, weight: u32) -> BackendConfig {
        BackendConfig {
            name: name.into(),
            addr: name.parse().unwrap(),
            weight,
            max_connections: None,
            hostname: None,
        }
    }

    fn backends(c: &Config) -> Vec<(String, u32)> {
        c.pools[0]
            .backends
            .iter()
            .map(|b| (b.name.clone(), b.weight))
            .collect()
    }

    /// Renders `text` with :1 removed, :9 added (weight 3) and :2's weight set to
    /// 7, and parses the result back.
    fn round_trip(text: &str) -> (String, Config) {
        let file = Config::parse(text, Path::new("t.toml")).unwrap();
        let mut o = Overrides::default();
        o.remove("p", "127.0.0.1:1");
        o.add("p", backend("127.0.0.1:9", 3));
        let running = o.applied(file);
        let out = render(&running, &o, |_, b| (b == "127.0.0.1:2").then_some(7)).unwrap();
        let back =
            Config::parse(&out, Path::new("out.toml")).unwrap_or_else(|e| panic!("{e}\n{out}"));
        (out, back)
    }

    const HEAD: &str = "[[listeners]]\nname = \"l\"\nbind = \"127.0.0.1:1000\"\npool = \"p\"\n\n";

    #[test]
    fn inline_backends_round_trip_with_marks() {
        let text = format!(
            "{HEAD}[[pools]]\nname = \"p\" # the pool\nbackends = [\n  {{ address = \"127.0.0.1:1\" }},\n  {{ address = \"127.0.0.1:2\", weight = 2 }}, # second\n]\n"
        );
        let (out, back) = round_trip(&text);
        assert_eq!(
            backends(&back),
            [("127.0.0.1:2".into(), 7), ("127.0.0.1:9".into(), 3)],
            "{out}"
        );
        assert!(out.contains("# the pool"), "comments kept:\n{out}");
        // The header's mention, and one per change.
        assert_eq!(out.matches(MARK).count(), 4, "{out}");
        assert!(out.contains("backend 127.0.0.1:1 removed"), "{out}");
    }

    #[test]
    fn table_backends_round_trip_with_marks() {
        let text = format!(
            "{HEAD}[[pools]]\nname = \"p\"\n\n[[pools.backends]]\naddress = \"127.0.0.1:1\"\n\n[[pools.backends]]\naddress = \"127.0.0.1:2\"\nweight = 2\n"
        );
        let (out, back) = round_trip(&text);
        assert_eq!(
            backends(&back),
            [("127.0.0.1:2".into(), 7), ("127.0.0.1:9".into(), 3)],
            "{out}"
        );
        assert!(out.matches(MARK).count() >= 2, "{out}");
    }

    #[test]
    fn no_overrides_is_the_file_as_loaded() {
        let text = format!(
            "{HEAD}[[pools]]\nname = \"p\"\nbackends = [{{ address = \"127.0.0.1:1\" }}]\n"
        );
        let file = Config::parse(&text, Path::new("t.toml")).unwrap();
        let out = render(&file, &Overrides::default(), |_, _| None).unwrap();
        assert!(out.ends_with(&text), "{out}");
        assert!(out.contains("Runtime changes: none."));
    }
}
