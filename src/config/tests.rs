use super::*;

fn parse(s: &str) -> Result<Config, ConfigError> {
    Config::parse(s, Path::new("t.toml"))
}

const GOOD: &str = r#"
[runtime]
workers = 2
shutdown_timeout = "30s"

[[listeners]]
name = "inference"
bind = "127.0.0.1:7000"
protocol = "tcp"
pool = "gpu"
connect_timeout = "3s"
idle_timeout = "350s"
max_connections = 10000

[[pools]]
name = "gpu"
algorithm = "round-robin"
connect_attempts = 3
backends = [
  { address = "127.0.0.1:9001", weight = 2 },
  { address = "127.0.0.1:9002" },
]
"#;

#[test]
fn good_config_parses() {
    let c = parse(GOOD).unwrap();
    assert_eq!(c.runtime.workers, 2);
    assert_eq!(c.listeners[0].idle_timeout, Duration::from_secs(350));
    assert_eq!(c.pools[0].backends[0].weight, 2);
    assert_eq!(c.pools[0].backends[1].weight, 1);
    assert_eq!(c.listeners[0].max_connections, Some(10000));
}

#[test]
fn error_has_line_column_and_path() {
    let bad = GOOD.replace("weight = 2", "weight = 0");
    let e = parse(&bad).unwrap_err().to_string();
    assert!(e.starts_with("t.toml:20:"), "{e}");
    assert!(e.contains("pools[0].backends[0].weight"), "{e}");
    assert!(e.contains("1..=1000"), "{e}");
}

#[test]
fn line_col_counts_from_one() {
    assert_eq!(line_col("ab\ncd", 0), (1, 1));
    assert_eq!(line_col("ab\ncd", 4), (2, 2));
}

/// Any mangling of a valid file gives Ok or a positioned error, never a panic.
#[test]
fn mangled_input_never_panics() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::SmallRng::seed_from_u64(7);
    let bytes = GOOD.as_bytes();
    for _ in 0..3000 {
        let mut b = bytes.to_vec();
        for _ in 0..rng.gen_range(1..6) {
            let i = rng.gen_range(0..b.len());
            match rng.gen_range(0..3) {
                0 => b[i] = rng.gen(),
                1 => {
                    b.remove(i);
                }
                _ => b.truncate(i),
            }
            if b.is_empty() {
                break;
            }
        }
        let text = String::from_utf8_lossy(&b);
        if let Err(ConfigError::Invalid { line, column, .. }) = parse(&text) {
            assert!(line >= 1 && column >= 1);
        }
    }
}
