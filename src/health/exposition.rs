//! A streaming reader of the Prometheus text exposition that keeps only the
//! wanted gauge families: lines are scanned as they arrive, others skipped by
//! their first bytes, and nothing else is stored. A body over the size cap, or a
//! line over the line cap, is an error, not a growing buffer.

use crate::config::Families;
use crate::load::{LoadError, Report};

/// Longest line kept across reads (a wanted series with its labels).
const MAX_LINE: usize = 64 * 1024;

/// Sums per wanted name.
pub struct Reader<'a> {
    families: &'a Families,
    /// Per name in `families` order (waiting, running, cache): sum (max for cache),
    /// and whether seen.
    values: Vec<(f64, bool)>,
    partial: Vec<u8>,
    total: usize,
    cap: usize,
}

impl<'a> Reader<'a> {
    pub fn new(families: &'a Families, cap: usize) -> Reader<'a> {
        let n = families.waiting.len() + families.running.len() + families.cache.len();
        Reader {
            families,
            values: vec![(0.0, false); n],
            partial: Vec::new(),
            total: 0,
            cap,
        }
    }

    fn names(&self) -> impl Iterator<Item = (usize, &String, bool)> {
        let f = self.families;
        let nw = f.waiting.len();
        let nr = f.running.len();
        f.waiting
            .iter()
            .chain(&f.running)
            .chain(&f.cache)
            .enumerate()
            .map(move |(i, n)| (i, n, i >= nw + nr))
    }

    /// Takes the next chunk of the body.
    pub fn feed(&mut self, chunk: &[u8]) -> Result<(), LoadError> {
        self.total += chunk.len();
        if self.total > self.cap {
            return Err(LoadError::TooLarge);
        }
        let mut rest = chunk;
        while let Some(nl) = rest.iter().position(|&c| c == b'\n') {
            if self.partial.is_empty() {
                self.line(&rest[..nl])?;
            } else {
                let mut line = std::mem::take(&mut self.partial);
                line.extend_from_slice(&rest[..nl]);
                self.line(&line)?;
            }
            rest = &rest[nl + 1..];
        }
        if self.partial.len() + rest.len() > MAX_LINE {
            return Err(LoadError::Malformed);
        }
        self.partial.extend_from_slice(rest);
        Ok(())
    }

    fn line(&mut self, line: &[u8]) -> Result<(), LoadError> {
        if line.first().is_none_or(|&c| c == b'#') {
            return Ok(());
        }
        let hit = self.names().find(|(_, n, _)| {
            line.starts_with(n.as_bytes()) && matches!(line.get(n.len()), Some(b'{' | b' ' | b'\t'))
        });
        let Some((i, name, is_cache)) = hit.map(|(i, n, c)| (i, n.len(), c)) else {
            return Ok(());
        };
        let after = &line[name..];
        // Past the labels (quoted values may hold '}' and spaces).
        let rest = if after.first() == Some(&b'{') {
            let mut quoted = false;
            let mut escaped = false;
            let mut end = None;
            for (k, &c) in after.iter().enumerate() {
                match c {
                    _ if escaped => escaped = false,
                    b'\\' if quoted => escaped = true,
                    b'"' => quoted = !quoted,
                    b'}' if !quoted => {
                        end = Some(k);
                        break;
                    }
                    _ => {}
                }
            }
            &after[end.ok_or(LoadError::Malformed)? + 1..]
        } else {
            after
        };
        let text = std::str::from_utf8(rest).map_err(|_| LoadError::Malformed)?;
        let v: f64 = text
            .split_whitespace()
            .next()
            .and_then(|t| t.parse().ok())
            .ok_or(LoadError::Malformed)?;
        if !v.is_finite() {
            return Ok(());
        }
        let slot = &mut self.values[i];
        slot.0 = if !slot.1 {
            v
        } else if is_cache {
            slot.0.max(v)
        } else {
            slot.0 + v
        };
        slot.1 = true;
        Ok(())
    }

    /// The report: each signal from its first name present (current names come
    /// first in the presets). `Missing` when none of the names appeared.
    pub fn finish(mut self) -> Result<Report, LoadError> {
        if !self.partial.is_empty() {
            let last = std::mem::take(&mut self.partial);
            self.line(&last)?;
        }
        if !self.values.iter().any(|(_, seen)| *seen) {
            return Err(LoadError::Missing);
        }
        let f = self.families;
        let (nw, nr) = (f.waiting.len(), f.running.len());
        let first = |range: std::ops::Range<usize>| {
            self.values[range]
                .iter()
                .find(|(_, seen)| *seen)
                .map_or(0.0, |(v, _)| *v)
        };
        Ok(Report {
            waiting: first(0..nw),
            running: first(nw..nw + nr),
            cache: first(nw + nr..self.values.len()),
            weight: None,
            counts: true,
        })
    }
}

/// An agent's line: `load=<0..1>` and optionally `weight=<1..1000>`, in any order,
/// separated by spaces or commas. `load` may also be a percentage (`75%`).
pub fn agent_line(line: &str) -> Option<Report> {
    let mut load = None;
    let mut weight = None;
    for word in line.split([' ', ',', '\t']).filter(|w| !w.is_empty()) {
        if let Some(v) = word.strip_prefix("load=") {
            let x: f64 = match v.strip_suffix('%') {
                Some(p) => p.parse::<f64>().ok()? / 100.0,
                None => v.parse().ok()?,
            };
            if !(0.0..=1.0).contains(&x) {
                return None;
            }
            load = Some(x);
        } else if let Some(v) = word.strip_prefix("weight=") {
            let w: u32 = v.parse().ok()?;
            if !(1..=1000).contains(&w) {
                return None;
            }
            weight = Some(w);
        }
    }
    Some(Report {
        waiting: load? * crate::load::AGENT_SCALE,
        running: 0.0,
        cache: 0.0,
        weight,
        counts: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{preset_families, Preset};

    const VLLM_OLD: &str = "# HELP vllm:num_requests_waiting Number of requests waiting.\n\
# TYPE vllm:num_requests_waiting gauge\n\
vllm:num_requests_waiting{model_name=\"m a}\"} 3.0\n\
vllm:num_requests_waiting{model_name=\"n\"} 2\n\
vllm:num_requests_running{model_name=\"m\"} 4.0\n\
vllm:num_requests_running_total 99\n\
vllm:gpu_cache_usage_perc{model_name=\"m\"} 0.5\n\
vllm:gpu_cache_usage_perc{model_name=\"n\"} 0.7\n\
vllm:time_to_first_token_seconds_bucket{le=\"0.1\"} 1e9\n";

    fn read(body: &[u8], chunk: usize) -> Result<Report, LoadError> {
        let f = preset_families(Preset::Vllm);
        let mut r = Reader::new(&f, 1 << 20);
        for c in body.chunks(chunk) {
            r.feed(c)?;
        }
        r.finish()
    }

    #[test]
    fn reads_the_wanted_gauges_under_the_former_name_in_any_chunking() {
        for chunk in [1, 2, 7, 4096] {
            let r = read(VLLM_OLD.as_bytes(), chunk).unwrap();
            assert_eq!((r.waiting, r.running, r.cache), (5.0, 4.0, 0.7), "{chunk}");
        }
        let new = VLLM_OLD.replace("gpu_cache_usage_perc", "kv_cache_usage_perc");
        assert_eq!(read(new.as_bytes(), 3).unwrap().cache, 0.7);
    }

    #[test]
    fn bounded_and_malformed_bodies_are_errors() {
        let f = preset_families(Preset::Vllm);
        let mut r = Reader::new(&f, 100);
        assert_eq!(r.feed(&[b'x'; 101]), Err(LoadError::TooLarge));
        let mut r = Reader::new(&f, 1 << 20);
        assert_eq!(r.feed(&vec![b'a'; MAX_LINE + 1]), Err(LoadError::Malformed));
        assert_eq!(
            read(b"vllm:num_requests_waiting{a=\"b\"} x\n", 5),
            Err(LoadError::Malformed)
        );
        assert_eq!(read(b"other_metric 1\n", 5), Err(LoadError::Missing));
    }

    #[test]
    fn agent_lines() {
        assert_eq!(agent_line("load=0.5").unwrap().waiting, 5.0);
        let r = agent_line("weight=20, load=75%\n".trim()).unwrap();
        assert_eq!((r.waiting, r.weight), (7.5, Some(20)));
        assert!(agent_line("load=2").is_none());
        assert!(agent_line("weight=3").is_none());
        assert!(agent_line("up").is_none());
    }
}
