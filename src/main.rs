//! The `bff` command line: `run` the sidecar, `check` policies, `demo` on built-in mocks.
#![forbid(unsafe_code)]
#![deny(clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use bff::policy::Policy;
use bff::server::{self, RunOptions};

#[derive(Parser)]
#[command(name = "bff", version, about = "Backend-for-Frontend sidecar proxy")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the sidecar.
    Run(RunArgs),
    /// Validate policy files: prints `file:line:col: message` for each problem.
    Check {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Run the sidecar on built-in mock services and print curl commands to try it.
    Demo {
        #[arg(long, default_value = "policies/mobile.yaml")]
        policy: PathBuf,
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: String,
        #[arg(long, default_value = "127.0.0.1:9901")]
        admin: String,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// Policy file of this client type.
    #[arg(long, env = "BFF_POLICY")]
    policy: PathBuf,
    /// Data-plane listener (client traffic).
    #[arg(long, env = "BFF_LISTEN", default_value = "127.0.0.1:8080")]
    listen: String,
    /// Admin listener: /metrics, /healthz, /readyz, /policy.
    #[arg(long, env = "BFF_ADMIN", default_value = "127.0.0.1:9901")]
    admin: String,
    /// Redis of the shared L2 cache: redis://host:port, or redis+cluster://host:port,host:port
    /// for a Redis Cluster (without it the cache is in-process only).
    #[arg(long, env = "BFF_REDIS_URL")]
    redis: Option<String>,
    /// Worker threads of the data plane.
    #[arg(long, env = "BFF_THREADS", default_value_t = 1)]
    threads: usize,
    /// Longest wait for in-flight requests after SIGTERM.
    #[arg(long, env = "BFF_GRACE_PERIOD", default_value = "20s", value_parser = humantime::parse_duration)]
    grace_period: Duration,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => {
            init_logging();
            let policy = match Policy::load(&args.policy) {
                Ok(policy) => policy,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::FAILURE;
                }
            };
            let redis = match args.redis.as_deref().map(bff::cache::Target::parse) {
                None => None,
                Some(Ok(target)) => Some(target),
                Some(Err(e)) => {
                    eprintln!("bff: --redis: {e}");
                    return ExitCode::FAILURE;
                }
            };
            server::run(
                RunOptions {
                    policy: args.policy,
                    listen: args.listen,
                    admin: args.admin,
                    threads: args.threads,
                    grace_period: args.grace_period,
                    redis,
                },
                policy,
            )
        }
        Command::Check { files } => {
            let mut failed = false;
            for file in &files {
                match Policy::load(file) {
                    Ok(_) => println!("{}: ok", file.display()),
                    Err(e) => {
                        eprintln!("{e}");
                        failed = true;
                    }
                }
            }
            if failed {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
        Command::Demo {
            policy,
            listen,
            admin,
        } => bff::demo::run(&policy, &listen, &admin),
    }
}

/// Human-readable logs, or one JSON object per line with `BFF_LOG_FORMAT=json`; the level
/// filter comes from `BFF_LOG` (default `info`).
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("BFF_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()));
    if std::env::var("BFF_LOG_FORMAT").as_deref() == Ok("json") {
        builder.json().flatten_event(true).init();
    } else {
        builder.init();
    }
}
