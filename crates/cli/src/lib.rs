//! `kata-runtime`, the command line of the runtime.
//!
//! One module per subcommand under [`commands`]; this file holds the argument model and the
//! mapping of results to exit codes.

pub mod commands;
pub mod containerd;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Version of the runtime.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// Git commit the binary was built from (may be empty).
pub const COMMIT: &str = env!("KATA_COMMIT");

/// Kata Containers runtime command line.
#[derive(Debug, Parser)]
#[command(
    name = "kata-runtime",
    disable_version_flag = true,
    about = "Kata Containers runtime: check the host, show the configuration, read a sandbox's metrics"
)]
pub struct Cli {
    /// Print the version (as `kata-runtime version`).
    #[arg(short = 'v', long)]
    pub version: bool,
    /// Configuration file to use instead of the search order.
    #[arg(
        long,
        visible_alias = "kata-config",
        global = true,
        value_name = "PATH"
    )]
    pub config: Option<PathBuf>,
    /// Print the configuration search order and exit.
    #[arg(long)]
    pub show_default_config_paths: bool,
    /// Debug logging on stderr.
    #[arg(long, global = true)]
    pub debug: bool,
    /// Subcommand.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Tell whether this host can run Kata Containers, with KVM or with TCG emulation.
    #[command(visible_alias = "kata-check")]
    Check(commands::check::CheckArgs),
    /// Show the effective configuration and host facts.
    #[command(visible_alias = "kata-env")]
    Env(commands::env::EnvArgs),
    /// Open a shell in a sandbox's VM through the agent's debug console
    /// (`[agent.kata] debug_console_enabled = true`).
    Exec(commands::exec::ExecArgs),
    /// Print a sandbox's metrics (Prometheus text) from its shim's monitor socket.
    Metrics(commands::metrics::MetricsArgs),
    /// Manage direct volumes: block devices given to containers instead of shared directories.
    DirectVolume(commands::direct_volume::DirectVolumeArgs),
    /// Manage the VM factory: `init` creates the VM template (`[factory] enable_template`) or
    /// runs the VMCache server in the foreground (`vm_cache_number`), `status` reports it,
    /// `destroy` removes the template or stops the server.
    Factory(commands::factory::FactoryArgs),
    /// Get or set the packet filter (iptables, ip6tables) inside a sandbox's VM.
    Iptables(commands::iptables::IptablesArgs),
    /// Measure this host's per-pod overhead (a real sandbox, idle) and print a RuntimeClass
    /// manifest carrying it in overhead.podFixed.
    Overhead(commands::overhead::OverheadArgs),
    /// Print the runtime's version, commit and OCI specification version.
    Version,
    /// Print a shell completion script.
    Completion {
        /// Shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

/// Sets up logging on stderr.
pub fn init_logging(debug: bool) {
    let level = if debug { "debug" } else { "warn" };
    let filter = tracing_subscriber::EnvFilter::try_from_env("KATA_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> ExitCode {
    if cli.version {
        print!("{}", commands::version::text());
        return ExitCode::SUCCESS;
    }
    if cli.show_default_config_paths {
        for p in commands::default_config_paths() {
            println!("{}", p.display());
        }
        return ExitCode::SUCCESS;
    }
    let result = match cli.command {
        Some(Command::Check(args)) => commands::check::run(cli.config, args),
        Some(Command::Env(args)) => commands::env::run(cli.config, args),
        Some(Command::Overhead(args)) => commands::overhead::run(cli.config, args),
        Some(Command::Metrics(args)) => commands::metrics::run(args),
        Some(Command::Exec(args)) => commands::exec::run(args),
        Some(Command::DirectVolume(args)) => commands::direct_volume::run(args),
        Some(Command::Iptables(args)) => commands::iptables::run(args),
        Some(Command::Factory(args)) => commands::factory::run(cli.config, args),
        Some(Command::Version) => {
            print!("{}", commands::version::text());
            Ok(ExitCode::SUCCESS)
        }
        Some(Command::Completion { shell }) => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "kata-runtime", &mut std::io::stdout());
            Ok(ExitCode::SUCCESS)
        }
        None => {
            let _ = <Cli as clap::CommandFactory>::command().print_help();
            Ok(ExitCode::from(2))
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("kata-runtime: {}", chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// An error and its causes on one line, each cause once.
pub fn chain(e: &anyhow::Error) -> String {
    kata_config::error_chain(e.as_ref())
}
