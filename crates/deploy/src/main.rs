//! `kata-deploy install|uninstall|status|manifest`: see the crate's documentation and
//! docs/kubernetes.md ("Installing on a cluster").

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use kata_deploy::{payload, DeployError, Manager, Node};

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
    /// The node's container manager: `auto` takes containerd when its configuration file
    /// exists, else CRI-O when its configuration does.
    #[arg(long, value_enum, default_value_t = ManagerArg::Auto)]
    manager: ManagerArg,
    /// containerd's configuration file (a host path).
    #[arg(long, default_value = "/etc/containerd/config.toml")]
    containerd_config: PathBuf,
    /// CRI-O's drop-in directory (a host path); kata-deploy writes `99-kata-deploy` there.
    #[arg(long, default_value = "/etc/crio/crio.conf.d")]
    crio_config_dir: PathBuf,
    /// The manager's CRI socket (a host path; default: /run/containerd/containerd.sock for
    /// containerd, /run/crio/crio.sock for CRI-O).
    #[arg(long, alias = "containerd-socket")]
    socket: Option<PathBuf>,
    /// The command that restarts the manager, run with `sh -c` (default: `systemctl restart
    /// containerd` or `crio`, through `chroot <host-root>` when the host's root is elsewhere).
    #[arg(long)]
    restart: Option<String>,
    /// Seconds the manager may take to answer after a restart.
    #[arg(long, default_value_t = 60)]
    restart_timeout: u64,
    /// Where the shims are linked by name (a host path on the manager's PATH), so that
    /// `ctr run --runtime io.containerd.kata.v2` and Docker find them.
    #[arg(long, default_value = "/usr/local/bin")]
    shim_dir: PathBuf,
    /// The node's name, to label it `katacontainers.io/kata-runtime=true` (the DaemonSet passes
    /// `spec.nodeName`); unset: the node is not labelled.
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    /// The Kubernetes API's URL (default: the in-cluster service account's).
    #[arg(long)]
    kube_api: Option<String>,
}

#[derive(Clone, Copy, ValueEnum)]
enum ManagerArg {
    Auto,
    Containerd,
    Crio,
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

fn node(a: NodeArgs) -> Result<Node, DeployError> {
    let manager = match a.manager {
        ManagerArg::Containerd => Manager::Containerd,
        ManagerArg::Crio => Manager::Crio,
        ManagerArg::Auto => {
            Manager::detect(&a.host_root, &a.containerd_config, &a.crio_config_dir)?
        }
    };
    Ok(Node {
        manager,
        socket: a
            .socket
            .unwrap_or_else(|| PathBuf::from(manager.default_socket())),
        restart: a
            .restart
            .unwrap_or_else(|| manager.default_restart(&a.host_root)),
        host_root: a.host_root,
        prefix: a.prefix,
        containerd_config: a.containerd_config,
        crio_config_dir: a.crio_config_dir,
        restart_timeout: Duration::from_secs(a.restart_timeout),
        shim_dir: a.shim_dir,
        node_name: a.node_name,
        kube_api: a.kube_api,
    })
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
        } => node(n)
            .and_then(|n| kata_deploy::install(&n, &payload, &release))
            .map(|()| stay_if(stay)),
        Command::Uninstall { node: n, stay } => node(n)
            .and_then(|n| kata_deploy::uninstall(&n))
            .map(|()| stay_if(stay)),
        Command::Status { node: n } => node(n)
            .and_then(|n| kata_deploy::status(&n))
            .map(|s| print!("{s}")),
        Command::Manifest { payload: p } => payload::write_manifest(&p),
    };
    if let Err(e) = r {
        eprintln!("kata-deploy: {e}");
        std::process::exit(1);
    }
}
