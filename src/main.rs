//! The `flowgate` binary: CLI, logging, signals. Everything else is in the library.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use flowgate::config::{LogConfig, LogFormat};
use flowgate::{upgrade, Config, Flowgate};
use sd_notify::NotifyState;
use tokio::signal::unix::{signal, SignalKind};
use tracing::{error, info, warn};

/// mimalloc instead of glibc's malloc (see Cargo.toml for the measurement).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Registry};

/// What --help adds after the commands: signals, exit codes, the environment.
const AFTER_HELP: &str = "\
Signals (to `flowgate run`):
  SIGTERM, SIGINT  stop accepting, let connections finish for runtime.shutdown_timeout,
                   then close the rest; a second signal stops at once
  SIGHUP           reload the config file (like POST /api/v1/reload); an invalid
                   file is logged and the running config stays
  SIGUSR1          reopen the access-log file (after logrotate moved it), or
                   reconnect to syslog

Binary upgrade:
  flowgate run --config FILE --upgrade-from /run/flowgate/flowgate.sock
                   the new binary takes the listening sockets over from the running
                   one (runtime.upgrade_socket), which then drains for
                   runtime.shutdown_timeout and exits 0; no connection is dropped.
                   A second `flowgate run` on a live upgrade socket exits 1.

Exit codes:
  0  stopped cleanly, or `check` found the config valid
  1  runtime failure: an address cannot be bound (or another process holds it),
     worker threads cannot start, another flowgate answers on the upgrade socket,
     an upgrade was refused (nothing answers on PATH, another one in flight)
  2  invalid configuration (the message names file:line:column and the key)

Environment:
  RUST_LOG  overrides [log] level (tracing EnvFilter syntax, e.g. `info,flowgate=debug`);
            a reload does not change it then

Docs: docs/configuration.md, docs/operations.md (README.md has the map).";

/// A Layer 4 TCP/UDP load balancer.
#[derive(Parser)]
#[command(version, about, after_help = AFTER_HELP)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the balancer until SIGTERM or SIGINT.
    Run {
        /// Path to the TOML configuration.
        #[arg(long, short)]
        config: PathBuf,
        /// Zero-drop binary upgrade: take every listening socket (and the admin
        /// API's) over from the flowgate answering on this upgrade socket (its
        /// runtime.upgrade_socket), start serving, then let it drain and exit.
        /// The config is checked first: an invalid one exits 2 and the running
        /// process never notices.
        #[arg(long, value_name = "PATH")]
        upgrade_from: Option<PathBuf>,
    },
    /// Validate a configuration without binding anything; exit 2 if invalid.
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Print a shell completion script (e.g. `flowgate completions bash >
    /// /etc/bash_completion.d/flowgate`).
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff), e.g. `flowgate man > /usr/local/share/man/man1/flowgate.1`.
    Man,
}

/// Exit codes: 0 clean stop or valid config; 1 runtime failure (bind, workers);
/// 2 invalid configuration.
const EXIT_RUNTIME: u8 = 1;
const EXIT_CONFIG: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Completions { shell } => {
            use clap::CommandFactory;
            // Into a buffer first: clap_complete panics on a write error (a closed
            // pipe), and a CLI must not.
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "flowgate", &mut out);
            print_out(&out)
        }
        Command::Man => {
            use clap::CommandFactory;
            let mut out = Vec::new();
            match clap_mangen::Man::new(Cli::command()).render(&mut out) {
                Ok(()) => print_out(&out),
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(EXIT_RUNTIME)
                }
            }
        }
        Command::Check { config } => match Config::load(&config) {
            Ok(c) => {
                println!(
                    "{}: ok ({} listeners, {} pools)",
                    config.display(),
                    c.listeners.len(),
                    c.pools.len()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(EXIT_CONFIG)
            }
        },
        Command::Run {
            config,
            upgrade_from,
        } => {
            let cfg = match Config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    init_logging(&flowgate::config::LogConfig::default());
                    error!("invalid configuration: {e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            let level = init_logging(&cfg.log);
            match run(cfg, level, upgrade_from) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    error!("{e:#}");
                    ExitCode::from(EXIT_RUNTIME)
                }
            }
        }
    }
}

/// Writes generated text to stdout; a closed pipe (`| head`) is not an error.
fn print_out(bytes: &[u8]) -> ExitCode {
    use std::io::Write;
    match std::io::stdout().write_all(bytes) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            eprintln!("error: {e}");
            ExitCode::from(EXIT_RUNTIME)
        }
        _ => ExitCode::SUCCESS,
    }
}

/// Changes the log level of the running process (reload).
type LevelHandle = Option<reload::Handle<EnvFilter, Registry>>;

/// Logs to stderr at `[log] level`, as text or JSON lines (`[log] format`); `RUST_LOG`,
/// when set, wins over the file and is not changed by a reload.
fn init_logging(log: &LogConfig) -> LevelHandle {
    let from_env = EnvFilter::try_from_default_env().ok();
    let env_set = from_env.is_some();
    let filter = from_env.unwrap_or_else(|| EnvFilter::new(&log.level));
    let (filter, handle) = reload::Layer::new(filter);
    let json = log.format == LogFormat::Json;
    let text = (!json).then(|| {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal())
    });
    let json = json.then(|| {
        tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
    });
    tracing_subscriber::registry()
        .with(filter)
        .with(text)
        .with(json)
        .init();
    (!env_set).then_some(handle)
}

/// Tells systemd (`Type=notify`, `$NOTIFY_SOCKET`) about a state change; nothing
/// without the variable. A failure is logged, never fatal.
fn notify(state: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(state) {
        warn!(error = %e, "cannot notify systemd ($NOTIFY_SOCKET)");
    }
}

/// The upgrade socket of `cfg` (taken from `handover` when it is the same path).
/// Without an explicit `runtime.upgrade_socket`, a default path that cannot be
/// made (an unprivileged user and `/run`) only costs upgrades and the lock: a
/// warning, not a failure.
fn upgrade_socket(
    cfg: &Config,
    handover: Option<&mut upgrade::Handover>,
) -> anyhow::Result<Option<upgrade::UpgradeSocket>> {
    let path = cfg.runtime.upgrade_socket_path();
    if let Some(s) = handover.and_then(|h| h.upgrade_socket(&path)) {
        return Ok(Some(s));
    }
    match upgrade::UpgradeSocket::claim(&path) {
        Ok(s) => Ok(Some(s)),
        Err(e @ upgrade::UpgradeError::AlreadyRunning { .. }) => Err(e.into()),
        Err(e) if cfg.runtime.upgrade_socket.is_some() => Err(e.into()),
        Err(e) => {
            warn!("{e}; binary upgrades and the single-instance lock are off (set runtime.upgrade_socket to a writable path)");
            Ok(None)
        }
    }
}

fn run(cfg: Config, level: LevelHandle, upgrade_from: Option<PathBuf>) -> anyhow::Result<()> {
    // Before anything is bound: a refused upgrade leaves nothing behind.
    let mut handover = match &upgrade_from {
        Some(p) => Some(upgrade::take_over(p)?),
        None => None,
    };
    let lock = upgrade_socket(&cfg, handover.as_mut())?;
    let lock_path = lock.as_ref().map(|l| l.path().to_owned());
    let inherited = handover
        .as_mut()
        .map(|h| std::mem::take(&mut h.inherited))
        .unwrap_or_default();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut hup = signal(SignalKind::hangup())?;
        let mut usr1 = signal(SignalKind::user_defined1())?;
        let (before, now) = flowgate::fd::raise_limit();
        if now > before {
            info!(from = before, to = now, "raised the open-files limit to its hard limit");
        }
        let fg = Flowgate::start_with(cfg, inherited)?;
        if let Some(h) = level {
            fg.set_log_level_hook(move |new| match h.reload(EnvFilter::new(new)) {
                Ok(()) => info!(level = new, "log level changed"),
                Err(e) => warn!(error = %e, "cannot change the log level"),
            });
        }
        info!(version = env!("CARGO_PKG_VERSION"), "flowgate started");
        if let Some(h) = handover {
            match tokio::task::spawn_blocking(move || h.finish()).await? {
                Ok(old_pid) => {
                    info!(old_pid, new_pid = std::process::id(), "upgrade complete")
                }
                Err(e) => {
                    // The old process still serves: leave it the sockets.
                    error!("{e}; stopping this process");
                    fg.shutdown().await;
                    return Err(anyhow::anyhow!("upgrade not completed"));
                }
            }
        }
        let handed = tokio_util::sync::CancellationToken::new();
        if let Some(lock) = lock {
            upgrade::serve(lock, &fg, handed.clone());
        }
        // Every listener is bound and accepting, the admin API too.
        notify(&[NotifyState::Ready, NotifyState::Status("serving")]);
        // systemd's watchdog (`WatchdogSec=`): a ping every half period, sent only
        // while every worker thread and the control thread still run a task.
        let watchdog = sd_notify::watchdog_enabled();
        let mut ping = tokio::time::interval(watchdog.map_or(Duration::from_secs(3600), |p| p / 2));
        let sig = loop {
            tokio::select! {
                _ = term.recv() => break "SIGTERM",
                _ = int.recv() => break "SIGINT",
                _ = handed.cancelled() => break "upgrade",
                _ = ping.tick(), if watchdog.is_some() => {
                    let period = watchdog.unwrap_or_default();
                    if fg.responsive(period / 4).await {
                        notify(&[NotifyState::Watchdog]);
                    } else {
                        warn!("a runtime thread did not answer within a quarter of WatchdogSec: no watchdog ping");
                    }
                }
                _ = usr1.recv() => {
                    info!("SIGUSR1: reopening the access log");
                    fg.reopen_access_log();
                }
                _ = hup.recv() => {
                    info!("SIGHUP: reloading configuration");
                    // systemd 253+ wants the monotonic time with RELOADING=1.
                    match NotifyState::monotonic_usec_now() {
                        Ok(now) => notify(&[NotifyState::Reloading, now]),
                        Err(_) => notify(&[NotifyState::Reloading]),
                    }
                    let fg2 = fg.clone();
                    let status = match tokio::task::spawn_blocking(move || fg2.reload()).await {
                        Ok(Ok(())) => "serving",
                        Ok(Err(e)) => {
                            error!("reload failed; keeping the running configuration: {e}");
                            "serving; the last reload failed, see the log"
                        }
                        Err(e) => {
                            error!("reload task failed: {e}");
                            "serving; the last reload failed, see the log"
                        }
                    };
                    notify(&[NotifyState::Ready, NotifyState::Status(status)]);
                }
            }
        };
        info!(signal = sig, "graceful stop");
        notify(&[NotifyState::Stopping]);
        // A second signal skips the rest of the grace period.
        // Kept apart from the instance, so a second signal can drop the instance
        // (cutting what is left) and the lines of those sessions still get flushed.
        let access_log = fg.access_log();
        let graceful = tokio::select! {
            g = fg.shutdown() => g,
            _ = term.recv() => { warn!("second signal: stopping now"); false }
            _ = int.recv() => { warn!("second signal: stopping now"); false }
        };
        access_log.flush(std::time::Duration::from_secs(2));
        // The socket file is the next process's after an upgrade.
        if let Some(p) = lock_path.filter(|_| !handed.is_cancelled()) {
            let _ = std::fs::remove_file(p);
        }
        info!(graceful, "stopped");
        Ok(())
    })
}
