//! `kata-monitor`: serves the metrics of every Kata sandbox on this host (see the library).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, ValueEnum};
use kata_monitor::discovery::Discovery;
use kata_monitor::scrape::{Monitor, Own, SHIM_TIMEOUT};

/// Log levels, as Kata's kata-monitor names them.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogLevel {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
    Fatal,
    Panic,
}

impl LogLevel {
    fn filter(self) -> &'static str {
        match self {
            LogLevel::Trace => "trace",
            LogLevel::Debug => "debug",
            LogLevel::Info => "info",
            LogLevel::Warn => "warn",
            // tracing has no levels above error.
            LogLevel::Error | LogLevel::Fatal | LogLevel::Panic => "error",
        }
    }
}

/// Metrics of every Kata Containers sandbox on this host, over HTTP.
#[derive(Debug, Parser)]
#[command(name = "kata-monitor", version = kata_monitor::VERSION)]
struct Args {
    /// Address to listen on for HTTP requests.
    #[arg(long, default_value = "127.0.0.1:8090")]
    listen_address: String,
    /// The CRI runtime service socket (pod names and namespaces come from its ListPodSandbox).
    #[arg(long, default_value = "/run/containerd/containerd.sock")]
    runtime_endpoint: String,
    /// Log level.
    #[arg(long, value_enum, default_value = "info")]
    log_level: LogLevel,
    /// Directory of the shims' monitor sockets.
    #[arg(long, default_value = kata_sandbox::sandbox::MONITOR_DIR)]
    sandboxes_dir: PathBuf,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(args.log_level.filter()))
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .try_init();
    let endpoint = PathBuf::from(
        args.runtime_endpoint
            .strip_prefix("unix://")
            .unwrap_or(&args.runtime_endpoint),
    );
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kata-monitor: start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        let listener = match tokio::net::TcpListener::bind(&args.listen_address).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!(
                    "kata-monitor: cannot listen on {} ({e}); choose another --listen-address",
                    args.listen_address
                );
                return ExitCode::FAILURE;
            }
        };
        let own = match Own::new() {
            Ok(o) => o,
            Err(e) => {
                eprintln!("kata-monitor: {e}");
                return ExitCode::FAILURE;
            }
        };
        tracing::info!(
            app = "kata-monitor",
            arch = std::env::consts::ARCH,
            os = std::env::consts::OS,
            version = kata_monitor::VERSION,
            listen_address = %args.listen_address,
            log_level = args.log_level.filter(),
            runtime_endpoint = %endpoint.display(),
            "announce"
        );
        let m = Arc::new(Monitor {
            discovery: Discovery::new(args.sandboxes_dir, endpoint),
            own,
            timeout: SHIM_TIMEOUT,
        });
        kata_monitor::server::serve(listener, m).await;
        ExitCode::SUCCESS
    })
}
