//! `kata-deploy install|uninstall|status|manifest`: see the crate's documentation and
//! docs/kubernetes.md ("Installing on a cluster").

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use kata_deploy::{payload, Node};

#[derive(Parser)]
#[command(
    name = "kata-deploy",
    version,
    about = "Installs the kata runtime on a node and removes it"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args)]
struct NodeArgs {
    /// The host's root as mounted in this container (`/` on the host itself).
    #[arg(long, default_value = "/host")]
    host_root: PathBuf,
    /// Where the runtime lives on the host.
    #[arg(long, default_value = "/opt/kata")]
    prefix: PathBuf,
    /// containerd's configuration file (a host path).
    #[arg(long, default_value = "/etc/containerd/config.toml")]
    containerd_config: PathBuf,
    /// containerd's socket (a host path).
    #[arg(long, default_value = "/run/containerd/containerd.sock")]
    containerd_socket: PathBuf,
    /// The command that restarts containerd, run with `sh -c`.
    #[arg(long, default_value = "systemctl restart containerd")]
    restart: String,
    /// Seconds containerd may take to answer after a restart.
    #[arg(long, default_value_t = 60)]
    restart_timeout: u64,
    /// The node's name, to label it `katacontainers.io/kata-runtime=true` (the DaemonSet passes
    /// `spec.nodeName`); unset: the node is not labelled.
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    /// The Kubernetes API's URL (default: the in-cluster service account's).
    #[arg(long)]
    kube_api: Option<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Copies the payload, adds the runtimes to containerd and restarts it.
    Install {
        #[command(flatten)]
        node: NodeArgs,
        /// The payload directory (`kata/` and `MANIFEST`).
        #[arg(long, default_value = "/kata-artifacts")]
        payload: PathBuf,
        /// The release's name (its directory next to earlier ones).
        #[arg(long, env = "KATA_RELEASE")]
        release: String,
        /// After installing, stay (until SIGTERM): the DaemonSet's container keeps running.
        #[arg(long)]
        stay: bool,
    },
    /// Restores containerd's configuration byte for byte, restarts it, removes the payload.
    Uninstall {
        #[command(flatten)]
        node: NodeArgs,
        /// After uninstalling, stay (until SIGTERM): the cleanup DaemonSet's container keeps
        /// running instead of being restarted.
        #[arg(long)]
        stay: bool,
    },
    /// The current release, containerd's runtime handlers, where QEMU is.
    Status {
        #[command(flatten)]
        node: NodeArgs,
    },
    /// Writes a payload directory's MANIFEST (the image build's step).
    Manifest {
        /// The payload directory.
        payload: PathBuf,
    },
}

fn node(a: NodeArgs) -> Node {
    Node {
        host_root: a.host_root,
        prefix: a.prefix,
        containerd_config: a.containerd_config,
        containerd_socket: a.containerd_socket,
        restart: a.restart,
        restart_timeout: Duration::from_secs(a.restart_timeout),
        node_name: a.node_name,
        kube_api: a.kube_api,
    }
}

/// With `--stay`: waits until the process is stopped (a DaemonSet's container must keep running).
fn stay_if(stay: bool) {
    if stay {
        eprintln!("kata-deploy: done; staying until stopped");
        loop {
            std::thread::park();
        }
    }
}

fn main() {
    let r = match Cli::parse().command {
        Command::Install {
            node: n,
            payload,
            release,
            stay,
        } => kata_deploy::install(&node(n), &payload, &release).map(|()| stay_if(stay)),
        Command::Uninstall { node: n, stay } => {
            kata_deploy::uninstall(&node(n)).map(|()| stay_if(stay))
        }
        Command::Status { node: n } => kata_deploy::status(&node(n)).map(|s| print!("{s}")),
        Command::Manifest { payload: p } => payload::write_manifest(&p),
    };
    if let Err(e) = r {
        eprintln!("kata-deploy: {e}");
        std::process::exit(1);
    }
}
