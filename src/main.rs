//! The `bff` command line: `run` the sidecar, `check` policies (and print their `schema`),
//! `demo` on built-in mocks, `cache audit` the cache keys in Redis, `inject` the sidecar into
//! Kubernetes manifests, serve the sidecar-injecting admission `webhook`.
#![forbid(unsafe_code)]
#![deny(clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use bff::cache::audit;
use bff::policy::Policy;
use bff::server::{self, RunOptions};

// glibc's malloc took about a sixth of a pass-through request's CPU time under the load
// benchmark; jemalloc answered more requests than glibc and mimalloc, at an idle RSS within
// bounds where mimalloc's was not (docs/performance.md).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

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
    /// Print the JSON Schema of policy files, for editors (`bff check` stays the authority).
    Schema,
    /// Inspect the response cache.
    #[command(subcommand)]
    Cache(CacheCommand),
    /// Run the sidecar on built-in mock services and print curl commands to try it.
    Demo {
        #[arg(long, default_value = "policies/mobile.yaml")]
        policy: PathBuf,
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: String,
        #[arg(long, default_value = "127.0.0.1:9901")]
        admin: String,
    },
    /// Add the bff sidecar to Kubernetes workloads in YAML (a file, or `-`/nothing for stdin)
    /// and point the Services selecting them at it; prints the result on stdout. Comments in
    /// the input are not kept.
    Inject(InjectArgs),
    /// Serve the mutating admission webhook that injects the bff sidecar into pods (HTTPS:
    /// POST /mutate, POST /mutate-annotated, GET /healthz).
    Webhook(WebhookArgs),
}

#[derive(clap::Args)]
struct InjectArgs {
    /// Manifest file (one or many documents); `-` or nothing reads stdin.
    file: Option<PathBuf>,
    /// Sidecar image.
    #[arg(long, default_value = bff::inject::DEFAULT_IMAGE)]
    image: String,
    /// ConfigMap holding the policy, mounted read-only at /etc/bff.
    #[arg(long, default_value = "bff-policy")]
    policy_configmap: String,
    /// Key of the policy file in that ConfigMap.
    #[arg(long, default_value = "policy.yaml")]
    policy_file: String,
    /// bff's data-plane port (Services are pointed at it).
    #[arg(long, default_value_t = 8080)]
    listen_port: u16,
    /// bff's admin port (probes, metrics).
    #[arg(long, default_value_t = 9901)]
    admin_port: u16,
    /// The app's port: Service ports targeting it (by number or port name) move to bff.
    #[arg(long, default_value_t = 3000)]
    app_port: u16,
    /// A regular container (first in `containers`) instead of a native sidecar (an
    /// `initContainers` entry with `restartPolicy: Always`, Kubernetes ≥ 1.29).
    #[arg(long)]
    classic: bool,
    /// Redis of the shared L2 cache, passed to bff as BFF_REDIS_URL (written into the pod
    /// spec as given).
    #[arg(long)]
    redis_url: Option<String>,
}

#[derive(clap::Args)]
struct WebhookArgs {
    /// HTTPS listener.
    #[arg(long, env = "BFF_WEBHOOK_LISTEN", default_value = "0.0.0.0:8443")]
    listen: String,
    /// Serving certificate (PEM chain); re-read when it changes.
    #[arg(long, env = "BFF_WEBHOOK_CERT")]
    cert: PathBuf,
    /// Private key of the serving certificate (PEM); re-read when it changes.
    #[arg(long, env = "BFF_WEBHOOK_KEY")]
    key: PathBuf,
    /// Image of the injected bff sidecar.
    #[arg(long, env = "BFF_INJECT_IMAGE", default_value = bff::inject::DEFAULT_IMAGE)]
    image: String,
    /// ConfigMap holding the policy, mounted into the sidecar.
    #[arg(
        long,
        env = "BFF_INJECT_POLICY_CONFIGMAP",
        default_value = "bff-policy"
    )]
    policy_configmap: String,
    /// A pod that should be injected but cannot be: `ignore` admits it as it is (with a
    /// warning), `fail` denies it.
    #[arg(
        long,
        env = "BFF_WEBHOOK_FAILURE_POLICY",
        value_enum,
        default_value = "ignore"
    )]
    failure_policy: bff::webhook::FailurePolicy,
    /// How often the certificate files are checked for a change.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    cert_reload_interval: Duration,
    /// A request's head must arrive within this of the connection being ready (also the
    /// idle limit of a kept-alive connection), and its body within this of the head;
    /// otherwise the connection is closed (408 when the head came).
    #[arg(long, env = "BFF_WEBHOOK_REQUEST_TIMEOUT", default_value = "10s",
          value_parser = humantime::parse_duration)]
    request_timeout: Duration,
    /// Connections served at once (each may buffer a body of up to 1 MiB); further ones are
    /// closed when accepted.
    #[arg(long, env = "BFF_WEBHOOK_MAX_CONNECTIONS",
          default_value_t = bff::webhook::DEFAULT_MAX_CONNECTIONS)]
    max_connections: usize,
}

#[derive(Subcommand)]
enum CacheCommand {
    /// Report each route's keys in Redis (live, orphaned, unversioned, foreign, locks, without
    /// TTL, memory) against the policies; exit 0, 1 on a bad policy, 2 when Redis fails.
    Audit(AuditArgs),
}

#[derive(clap::Args)]
struct AuditArgs {
    /// `redis://host:port[/db]` for one node, `redis+cluster://host:port[,host:port…]` for a
    /// Redis Cluster (every master is walked).
    #[arg(long, env = "BFF_REDIS_URL")]
    redis: String,
    /// Policy files: one per client, or several of one client (e.g. old and new during a
    /// rolling deploy; the keys of each are live).
    #[arg(long, required = true, num_args = 1..)]
    policy: Vec<PathBuf>,
    /// Print one JSON document instead of tables.
    #[arg(long)]
    json: bool,
    /// UNLINK orphans (older versions or shapes, routes not in the policies), 100 at a time.
    #[arg(long)]
    delete_orphans: bool,
    /// Longest wait for any one Redis call.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

#[derive(clap::Args)]
struct RunArgs {
    /// Policy file of this client type.
    #[arg(long, env = "BFF_POLICY")]
    policy: PathBuf,
    /// Data-plane listener (client traffic).
    #[arg(long, env = "BFF_LISTEN", default_value = "127.0.0.1:8080")]
    listen: String,
    /// Admin listener: /metrics, /healthz, /readyz, /policy, DELETE /cache/….
    #[arg(long, env = "BFF_ADMIN", default_value = "127.0.0.1:9901")]
    admin: String,
    /// File holding the bearer token of the admin port's /policy and DELETE /cache/… (re-read
    /// when it changes); without it they answer only on a loopback admin port.
    #[arg(long, env = "BFF_ADMIN_TOKEN_FILE")]
    admin_token_file: Option<PathBuf>,
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
    /// Largest request head (request line and headers) in bytes; a larger one is answered 431.
    #[arg(long, env = "BFF_MAX_HEADER_BYTES", default_value_t = 64 * 1024, value_parser = clap::value_parser!(u32).range(1024..))]
    max_header_bytes: u32,
    /// Longest a request head may take to arrive; the connection is closed when it passes.
    #[arg(long, env = "BFF_HEADER_TIMEOUT", default_value = "10s", value_parser = positive_duration)]
    header_timeout: Duration,
    /// Longest a kept-alive client connection may wait for its next request.
    #[arg(long, env = "BFF_IDLE_TIMEOUT", default_value = "60s", value_parser = positive_duration)]
    idle_timeout: Duration,
    /// Most client connections open at once; more are closed as soon as they are accepted.
    /// One costs ~12 KiB idle and ~130 KiB with a full head: 512 stay within the manifests'
    /// 192 MiB beside the 64 MiB cache.
    #[arg(long, env = "BFF_MAX_CONNECTIONS", default_value_t = 512, value_parser = clap::value_parser!(u32).range(1..))]
    max_connections: u32,
}

/// A duration of at least a millisecond: a zero timeout would close every connection.
fn positive_duration(value: &str) -> Result<Duration, String> {
    let duration = humantime::parse_duration(value).map_err(|e| e.to_string())?;
    if duration < Duration::from_millis(1) {
        return Err("must be at least 1ms".into());
    }
    Ok(duration)
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
            let redis = match args.redis.as_deref().map(bff::cache::RedisTarget::parse) {
                None => None,
                Some(Ok(target)) => Some(target),
                Some(Err(e)) => {
                    eprintln!("bff: {e}");
                    return ExitCode::FAILURE;
                }
            };
            server::run(
                RunOptions {
                    policy: args.policy,
                    listen: args.listen,
                    admin: args.admin,
                    admin_token_file: args.admin_token_file,
                    threads: args.threads,
                    grace_period: args.grace_period,
                    redis,
                    client_limits: bff::listener::ClientLimits {
                        max_header_bytes: args.max_header_bytes as usize,
                        header_timeout: args.header_timeout,
                        idle_timeout: args.idle_timeout,
                        max_connections: args.max_connections as usize,
                    },
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
        Command::Schema => match serde_json::to_string_pretty(&bff::policy::raw::json_schema()) {
            Ok(json) => {
                println!("{json}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("bff schema: cannot write the schema as JSON: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Cache(CacheCommand::Audit(args)) => cache_audit(args),
        Command::Demo {
            policy,
            listen,
            admin,
        } => bff::demo::run(&policy, &listen, &admin),
        Command::Inject(args) => inject(args),
        Command::Webhook(args) => webhook(args),
    }
}

fn webhook(args: WebhookArgs) -> ExitCode {
    init_logging();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("bff webhook: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let options = bff::webhook::ServeOptions {
        listen: args.listen,
        cert: args.cert,
        key: args.key,
        failure_policy: args.failure_policy,
        cert_reload_interval: args.cert_reload_interval,
        request_timeout: args.request_timeout,
        max_connections: args.max_connections,
        webhook: bff::webhook::WebhookOptions {
            image: args.image,
            policy_configmap: args.policy_configmap,
        },
    };
    match runtime.block_on(bff::webhook::serve(options)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bff webhook: {e}");
            ExitCode::FAILURE
        }
    }
}

fn inject(args: InjectArgs) -> ExitCode {
    use std::io::{Read, Write};

    let options = bff::inject::InjectOptions {
        image: args.image,
        policy_configmap: args.policy_configmap,
        policy_file: args.policy_file,
        listen_port: args.listen_port,
        admin_port: args.admin_port,
        app_port: args.app_port,
        mode: if args.classic {
            bff::inject::SidecarMode::Classic
        } else {
            bff::inject::SidecarMode::Native
        },
        redis_url: args.redis_url,
    };
    if let Err(e) = options.validate() {
        eprintln!("bff inject: {e}");
        return ExitCode::FAILURE;
    }
    let (source, read) = match args.file.filter(|f| f.as_os_str() != "-") {
        Some(file) => (file.display().to_string(), std::fs::read_to_string(&file)),
        None => {
            let mut input = String::new();
            let read = std::io::stdin().read_to_string(&mut input).map(|_| input);
            ("stdin".to_string(), read)
        }
    };
    let input = match read {
        Ok(input) => input,
        Err(e) => {
            eprintln!("bff inject: cannot read {source}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let output = match bff::inject::inject_yaml(&input, &options) {
        Ok(output) => output,
        Err(e) => {
            eprintln!("bff inject: {source}: {e}");
            return ExitCode::FAILURE;
        }
    };
    for note in &output.notes {
        eprintln!("{note}");
    }
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = stdout
        .write_all(output.yaml.as_bytes())
        .and_then(|()| stdout.flush())
    {
        eprintln!("bff inject: cannot write the output: {e}");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

/// Exit codes of `cache audit`: a bad policy is 1 (like `check`), a Redis problem 2.
const EXIT_BAD_POLICY: u8 = 1;
const EXIT_REDIS: u8 = 2;

fn cache_audit(args: AuditArgs) -> ExitCode {
    let mut policies = Vec::new();
    let mut failed = false;
    for file in &args.policy {
        match Policy::load(file) {
            Ok(policy) => policies.push(policy),
            Err(e) => {
                eprintln!("{e}");
                failed = true;
            }
        }
    }
    if failed {
        return ExitCode::from(EXIT_BAD_POLICY);
    }
    let target = match bff::cache::RedisTarget::parse(&args.redis) {
        Ok(target) => target,
        Err(e) => {
            eprintln!("bff cache audit: {e}");
            return ExitCode::from(EXIT_REDIS);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("bff cache audit: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let options = audit::AuditOptions {
        delete_orphans: args.delete_orphans,
        timeout: args.timeout,
    };
    let report = match runtime.block_on(audit::audit(&target, &policies, &options)) {
        Ok(report) => report,
        Err(e) => {
            eprintln!("bff cache audit: {e}");
            return ExitCode::from(EXIT_REDIS);
        }
    };
    if args.json {
        match serde_json::to_string_pretty(&report) {
            Ok(json) => println!("{json}"),
            Err(e) => {
                eprintln!("bff cache audit: cannot write the report as JSON: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        print!("{}", report.render_text());
    }
    ExitCode::SUCCESS
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
