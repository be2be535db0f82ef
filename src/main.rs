//! The `flowgate` binary: CLI, logging, signals. Everything else is in the library.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use flowgate::{Config, Flowgate};
use tokio::signal::unix::{signal, SignalKind};
use tracing::{error, info, warn};

/// A Layer 4 TCP load balancer.
#[derive(Parser)]
#[command(version, about)]
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
    },
    /// Validate a configuration without binding anything; exit 2 if invalid.
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
}

/// Exit codes: 0 clean stop or valid config; 1 runtime failure (bind, workers);
/// 2 invalid configuration.
const EXIT_RUNTIME: u8 = 1;
const EXIT_CONFIG: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
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
        Command::Run { config } => {
            init_logging();
            let cfg = match Config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    error!("invalid configuration: {e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            match run(cfg) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    error!("{e:#}");
                    ExitCode::from(EXIT_RUNTIME)
                }
            }
        }
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

fn run(cfg: Config) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut hup = signal(SignalKind::hangup())?;
        let fg = Flowgate::start(cfg)?;
        info!(version = env!("CARGO_PKG_VERSION"), "flowgate started");
        let sig = loop {
            tokio::select! {
                _ = term.recv() => break "SIGTERM",
                _ = int.recv() => break "SIGINT",
                _ = hup.recv() => {
                    info!("SIGHUP: reloading configuration");
                    let fg2 = fg.clone();
                    match tokio::task::spawn_blocking(move || fg2.reload()).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => error!("reload failed; keeping the running configuration: {e}"),
                        Err(e) => error!("reload task failed: {e}"),
                    }
                }
            }
        };
        info!(signal = sig, "graceful stop");
        // A second signal skips the rest of the grace period.
        let graceful = tokio::select! {
            g = fg.shutdown() => g,
            _ = term.recv() => { warn!("second signal: stopping now"); false }
            _ = int.recv() => { warn!("second signal: stopping now"); false }
        };
        info!(graceful, "stopped");
        Ok(())
    })
}
