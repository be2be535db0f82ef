//! `[pools.load_report]`: where a `least-load` pool reads its backends' own load
//! (an inference server's Prometheus gauges, or an agent's line), and how the score
//! weighs it (issue 14).

use std::time::Duration;

use toml::Spanned;

use super::types::{DurationStr, LoadKind, Preset};

use super::raw::{RawAffinity, RawLoadReport};
use super::validate::Source;
use super::ConfigError;

/// The gauges read from an exposition: each signal by any of its names (the
/// series of a family are summed; `cache` takes the largest).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Families {
    pub waiting: Vec<String>,
    pub running: Vec<String>,
    pub cache: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LoadReportConfig {
    pub kind: LoadKind,
    pub families: Families,
    pub path: String,
    /// Default: the backend's own port.
    pub port: Option<u16>,
    pub interval: Duration,
    /// Reports older than this are ignored: the backend is scored on flowgate's
    /// own in-flight count.
    pub stale_after: Duration,
    pub timeout: Duration,
    pub weights: LoadWeights,
}

/// How the score weighs the reported signals (see docs/configuration.md).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoadWeights {
    pub queue: f64,
    pub running: f64,
    pub cache: f64,
}

impl Default for LoadWeights {
    fn default() -> Self {
        LoadWeights {
            queue: 1.0,
            running: 0.25,
            cache: 2.0,
        }
    }
}

/// Largest body read from `/metrics`; larger ones are an error (`too_large`).
pub const MAX_EXPOSITION_BYTES: usize = 4 << 20;

fn names(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// The gauges of `preset`, current names first, then former ones.
pub fn preset_families(preset: Preset) -> Families {
    match preset {
        Preset::Vllm => Families {
            waiting: names(&["vllm:num_requests_waiting"]),
            running: names(&["vllm:num_requests_running"]),
            // Renamed in vLLM 0.10: the old name is still read.
            cache: names(&["vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"]),
        },
        Preset::Sglang => Families {
            waiting: names(&["sglang:num_queue_reqs"]),
            running: names(&["sglang:num_running_reqs"]),
            cache: names(&["sglang:token_usage"]),
        },
        Preset::Tgi => Families {
            waiting: names(&["tgi_queue_size"]),
            running: names(&["tgi_batch_current_size"]),
            cache: Vec::new(),
        },
        Preset::Triton => Families {
            waiting: names(&["nv_inference_pending_request_count"]),
            running: Vec::new(),
            cache: Vec::new(),
        },
        Preset::Custom => Families::default(),
    }
}

/// Validates `pools[i].load_report`.
pub(super) fn load_report(
    src: &Source<'_>,
    r: &RawLoadReport,
    at: &dyn Fn(&str) -> String,
) -> Result<LoadReportConfig, ConfigError> {
    let key = |k: &str| at(&format!("load_report.{k}"));
    let dur = |v: &Option<Spanned<DurationStr>>,
               k: &str,
               default: Duration,
               min: Duration,
               max: Duration|
     -> Result<Duration, ConfigError> {
        match v {
            None => Ok(default),
            Some(d) if (min..=max).contains(&d.get_ref().0) => Ok(d.get_ref().0),
            Some(d) => Err(src.err(
                d.span(),
                key(k),
                format!(
                    "{:?} is out of range: expected {min:?}..={max:?}",
                    d.get_ref().0
                ),
            )),
        }
    };
    let interval = dur(
        &r.interval,
        "interval",
        Duration::from_secs(1),
        Duration::from_millis(50),
        Duration::from_secs(60),
    )?;
    let stale_after = dur(
        &r.stale_after,
        "stale_after",
        interval * 3,
        interval,
        Duration::from_secs(600),
    )?;
    let timeout = dur(
        &r.timeout,
        "timeout",
        interval.min(Duration::from_secs(1)),
        Duration::from_millis(10),
        Duration::from_secs(60),
    )?;
    let port = match &r.port {
        None => None,
        Some(p) if (1..=65535).contains(p.get_ref()) => Some(*p.get_ref() as u16),
        Some(p) => {
            return Err(src.err(
                p.span(),
                key("port"),
                format!("{} is out of range: expected 1..=65535", p.get_ref()),
            ))
        }
    };
    let mut weights = LoadWeights::default();
    for (v, k, slot) in [
        (&r.queue_weight, "queue_weight", &mut weights.queue),
        (&r.running_weight, "running_weight", &mut weights.running),
        (&r.cache_weight, "cache_weight", &mut weights.cache),
    ] {
        if let Some(w) = v {
            let x = *w.get_ref();
            if !(0.0..=1000.0).contains(&x) {
                return Err(src.err(
                    w.span(),
                    key(k),
                    format!("{x} is out of range: expected 0..=1000"),
                ));
            }
            *slot = x;
        }
    }
    let custom = [
        (&r.queue, "queue"),
        (&r.running, "running"),
        (&r.cache, "cache"),
    ];
    let families = match r.kind {
        LoadKind::Agent => {
            if let Some((v, k)) = custom.iter().find_map(|(v, k)| v.as_ref().map(|v| (v, k))) {
                return Err(src.err(
                    v.span(),
                    key(k),
                    "metric names are for kind = \"prometheus\"; an agent reports load=<0..1>"
                        .into(),
                ));
            }
            Families::default()
        }
        LoadKind::Prometheus => {
            let Some(preset) = &r.preset else {
                return Err(src.err(
                    0..0,
                    key("preset"),
                    "kind = \"prometheus\" needs a preset: vllm, sglang, tgi, triton, or custom (with queue/running/cache metric names)".into(),
                ));
            };
            let mut f = preset_families(*preset.get_ref());
            if *preset.get_ref() == Preset::Custom {
                for (v, k) in custom {
                    if let Some(name) = v {
                        let n = name.get_ref().trim();
                        let ok = !n.is_empty()
                            && n.chars()
                                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':');
                        if !ok {
                            return Err(src.err(
                                name.span(),
                                key(k),
                                format!("{n:?} is not a metric name"),
                            ));
                        }
                        let slot = match k {
                            "queue" => &mut f.waiting,
                            "running" => &mut f.running,
                            _ => &mut f.cache,
                        };
                        slot.push(n.to_string());
                    }
                }
                if f.waiting.is_empty() && f.running.is_empty() && f.cache.is_empty() {
                    return Err(src.err(
                        preset.span(),
                        key("preset"),
                        "preset = \"custom\" needs at least one of queue, running, cache (metric names)".into(),
                    ));
                }
            } else if let Some((v, k)) = custom.iter().find_map(|(v, k)| v.as_ref().map(|v| (v, k)))
            {
                return Err(src.err(
                    v.span(),
                    key(k),
                    "metric names are for preset = \"custom\"".into(),
                ));
            }
            f
        }
    };
    let path = match &r.path {
        None => "/metrics".to_string(),
        Some(p) if p.get_ref().starts_with('/') => p.get_ref().clone(),
        Some(p) => {
            return Err(src.err(
                p.span(),
                key("path"),
                format!("{:?} must start with /", p.get_ref()),
            ))
        }
    };
    Ok(LoadReportConfig {
        kind: r.kind,
        families,
        path,
        port,
        interval,
        stale_after,
        timeout,
        weights,
    })
}

/// Where an HTTP request's session key comes from (`[pools.affinity]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AffinityKey {
    /// A request header (lower case).
    Header(String),
    /// A cookie's value.
    Cookie(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct AffinityConfig {
    pub key: AffinityKey,
    /// No backend takes more than this times the mean in-flight count (plus one).
    pub max_load_factor: f64,
}

/// Validates `pools[i].affinity`.
pub(super) fn affinity(
    src: &Source<'_>,
    a: &Spanned<RawAffinity>,
    at: &dyn Fn(&str) -> String,
) -> Result<AffinityConfig, ConfigError> {
    let r = a.get_ref();
    let key = match (&r.header, &r.cookie) {
        (Some(h), None) => {
            let name = h.get_ref().trim().to_ascii_lowercase();
            if hyper::header::HeaderName::from_bytes(name.as_bytes()).is_err() {
                return Err(src.err(
                    h.span(),
                    at("affinity.header"),
                    format!("{name:?} is not a header name"),
                ));
            }
            AffinityKey::Header(name)
        }
        (None, Some(c)) => {
            let name = c.get_ref().trim();
            let ok = !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&b));
            if !ok {
                return Err(src.err(
                    c.span(),
                    at("affinity.cookie"),
                    format!("{name:?} is not a cookie name"),
                ));
            }
            AffinityKey::Cookie(name.to_string())
        }
        _ => {
            return Err(src.err(
                a.span(),
                at("affinity"),
                "give exactly one of header = \"NAME\" or cookie = \"NAME\"".into(),
            ))
        }
    };
    let max_load_factor = match &r.max_load_factor {
        None => 1.25,
        Some(f) if (1.0..=100.0).contains(f.get_ref()) => *f.get_ref(),
        Some(f) => {
            return Err(src.err(
                f.span(),
                at("affinity.max_load_factor"),
                format!("{} is out of range: expected 1.0..=100", f.get_ref()),
            ))
        }
    };
    Ok(AffinityConfig {
        key,
        max_load_factor,
    })
}
