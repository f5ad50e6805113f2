//! kata-deploy: puts the runtime on a node and takes it off again, run on the node (as a
//! DaemonSet's container) with the host's root mounted at a path it is given.
//!
//! `install`: the payload copied next to earlier releases and made current by one rename
//! ([`payload`]); the runtimes added to containerd's configuration, as a drop-in or a minimal
//! edit ([`containerd`]), its original bytes kept; the manager restarted and waited for until
//! its CRI plugin lists the runtime, the configuration rolled back if it does not come up.
//! `uninstall`: the configuration's original bytes restored, the manager restarted, the payload
//! removed. Both can be run again, and after a kill at any point.

pub mod containerd;
pub mod cri;
pub mod label;
pub mod payload;

use std::path::{Path, PathBuf};
use std::time::Duration;

/// What went wrong, and what to do.
#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    /// The manager's configuration cannot take the runtime.
    #[error("{0}")]
    Config(String),
    /// The payload is not whole, or cannot be put in place.
    #[error("{0}")]
    Payload(String),
    /// The manager did not come back with the runtime.
    #[error("{0}")]
    Manager(String),
    /// A file operation.
    #[error("{what}: {source}")]
    Io {
        /// What was done.
        what: String,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> DeployError {
    let what = what.into();
    move |source| DeployError::Io { what, source }
}

/// Where and how to install, as the command line says.
#[derive(Debug, Clone)]
pub struct Node {
    /// The host's root as mounted in the installer's container (`/` when run on the host).
    pub host_root: PathBuf,
    /// Where the runtime lives on the host (`/opt/kata`).
    pub prefix: PathBuf,
    /// containerd's configuration file, a host path.
    pub containerd_config: PathBuf,
    /// containerd's socket, a host path.
    pub containerd_socket: PathBuf,
    /// The command that restarts containerd (run with `sh -c`).
    pub restart: String,
    /// How long containerd may take to answer after a restart.
    pub restart_timeout: Duration,
    /// The node's name in the cluster (labelled through the Kubernetes API); None: not labelled.
    pub node_name: Option<String>,
    /// The Kubernetes API's URL; None: the in-cluster service account's.
    pub kube_api: Option<String>,
}

impl Node {
    fn host(&self, p: &Path) -> PathBuf {
        self.host_root.join(p.strip_prefix("/").unwrap_or(p))
    }

    /// kata-deploy's own records on the node (the configuration's original bytes, the drop-in).
    fn state_dir(&self) -> PathBuf {
        payload::releases_dir(&self.host_root, &self.prefix).join(".kata-deploy")
    }
}

/// Writes `text` to `path` by a rename, so that a kill leaves the old or the new file whole.
fn write_atomic(path: &Path, text: &[u8]) -> Result<(), DeployError> {
    let tmp = path.with_file_name(format!(
        ".{}.kata-deploy.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file")
    ));
    std::fs::write(&tmp, text).map_err(io(format!("write {}", tmp.display())))?;
    std::fs::rename(&tmp, path).map_err(io(format!("rename to {}", path.display())))
}

/// The configuration's original bytes: saved once, before the first change (a second install
/// keeps the first record); `None` in the record means there was no file.
fn save_original(node: &Node, config: &Path) -> Result<(), DeployError> {
    let dir = node.state_dir();
    std::fs::create_dir_all(&dir).map_err(io(format!("create {}", dir.display())))?;
    let (saved, absent) = (
        dir.join("containerd-config.orig"),
        dir.join("containerd-config.absent"),
    );
    if saved.exists() || absent.exists() {
        return Ok(());
    }
    match std::fs::read(config) {
        Ok(bytes) => write_atomic(&saved, &bytes),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::write(&absent, b"").map_err(io(format!("write {}", absent.display())))
        }
        Err(e) => Err(io(format!("read {}", config.display()))(e)),
    }
}

/// Puts the configuration back as it was before the first install (byte for byte) and removes
/// the drop-in; true when there was something to put back.
fn restore_original(node: &Node) -> Result<bool, DeployError> {
    let dir = node.state_dir();
    let config = node.host(&node.containerd_config);
    let mut changed = false;
    let drop_in_record = dir.join("drop-in");
    if let Ok(p) = std::fs::read_to_string(&drop_in_record) {
        let p = node.host(Path::new(p.trim()));
        if p.exists() {
            std::fs::remove_file(&p).map_err(io(format!("remove {}", p.display())))?;
            changed = true;
        }
    }
    let saved = dir.join("containerd-config.orig");
    if let Ok(bytes) = std::fs::read(&saved) {
        if std::fs::read(&config).ok().as_deref() != Some(bytes.as_slice()) {
            write_atomic(&config, &bytes)?;
            changed = true;
        }
    } else if dir.join("containerd-config.absent").exists() && config.exists() {
        std::fs::remove_file(&config).map_err(io(format!("remove {}", config.display())))?;
        changed = true;
    }
    Ok(changed)
}

fn restart(node: &Node) -> Result<(), DeployError> {
    let st = std::process::Command::new("sh")
        .arg("-c")
        .arg(&node.restart)
        .status()
        .map_err(io(format!("run `{}`", node.restart)))?;
    if !st.success() {
        return Err(DeployError::Manager(format!(
            "`{}` failed ({st})",
            node.restart
        )));
    }
    Ok(())
}

/// The handlers the running containerd's CRI plugin has, once it answers.
fn wait_for_manager(node: &Node) -> Result<Vec<String>, DeployError> {
    let socket = node.host(&node.containerd_socket);
    cri::runtime_handlers(&socket, node.restart_timeout)
}

/// `kata-deploy install`.
pub fn install(node: &Node, payload_dir: &Path, release: &str) -> Result<(), DeployError> {
    let dest = payload::install(payload_dir, &node.host_root, &node.prefix, release)?;
    eprintln!("kata-deploy: release {release} in {}", dest.display());
    let config = node.host(&node.containerd_config);
    save_original(node, &config)?;
    // Planned from the original, so that a second install writes the same bytes.
    let original = std::fs::read_to_string(node.state_dir().join("containerd-config.orig"))
        .unwrap_or_default();
    let (plan, drop_in) = containerd::plan(&original, &node.prefix)?;
    match (plan, drop_in) {
        (containerd::Plan::DropIn(path), Some(text)) => {
            let on_host = node.host(&path);
            if let Some(dir) = on_host.parent() {
                std::fs::create_dir_all(dir).map_err(io(format!("create {}", dir.display())))?;
            }
            std::fs::write(node.state_dir().join("drop-in"), path.display().to_string())
                .map_err(io("record the drop-in"))?;
            write_atomic(&on_host, text.as_bytes())?;
            eprintln!(
                "kata-deploy: runtimes kata, kata-qemu in {}",
                path.display()
            );
        }
        (containerd::Plan::Edit(text), _) => {
            write_atomic(&config, text.as_bytes())?;
            eprintln!(
                "kata-deploy: runtimes kata, kata-qemu added to {}",
                node.containerd_config.display()
            );
        }
        (containerd::Plan::DropIn(_), None) => {
            return Err(DeployError::Config("a drop-in without text".into()))
        }
    }
    let up = restart(node).and_then(|()| wait_for_manager(node));
    match up {
        Ok(handlers)
            if containerd::HANDLERS
                .iter()
                .all(|(h, _)| handlers.iter().any(|x| x == h)) =>
        {
            eprintln!(
                "kata-deploy: containerd answers with handlers {}",
                handlers.join(", ")
            );
            Ok(())
        }
        other => {
            let why = match other {
                Ok(h) => format!("containerd came back without the kata handlers (it has {h:?})"),
                Err(e) => e.to_string(),
            };
            // Roll back: the node's manager must keep running.
            restore_original(node)?;
            let back = restart(node).and_then(|()| wait_for_manager(node));
            Err(DeployError::Manager(format!(
                "{why}; the configuration was rolled back{}",
                match back {
                    Ok(_) => " and containerd runs again".to_string(),
                    Err(e) => format!(", but containerd did not come back either: {e}"),
                }
            )))
        }
    }
}

/// `kata-deploy uninstall`.
pub fn uninstall(node: &Node) -> Result<(), DeployError> {
    if let Some(name) = &node.node_name {
        label::set(name, None, node.kube_api.as_deref())?;
        eprintln!(
            "kata-deploy: label {} removed from node {name}",
            label::LABEL
        );
    }
    if restore_original(node)? {
        restart(node)?;
        let handlers = wait_for_manager(node)?;
        eprintln!(
            "kata-deploy: containerd answers with handlers {}",
            handlers.join(", ")
        );
    }
    payload::uninstall(&node.host_root, &node.prefix)?;
    eprintln!("kata-deploy: removed {}", node.prefix.display());
    Ok(())
}

/// `kata-deploy status`: the current release and the handlers containerd has.
pub fn status(node: &Node) -> Result<String, DeployError> {
    let link = payload::prefix_on_host(&node.host_root, &node.prefix);
    let release = std::fs::read_link(&link)
        .ok()
        .and_then(|t| t.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "none".into());
    let handlers =
        cri::runtime_handlers(&node.host(&node.containerd_socket), Duration::from_secs(5))
            .map(|h| h.join(", "))
            .unwrap_or_else(|e| format!("unknown ({e})"));
    let qemu = [
        "/usr/bin/qemu-system-x86_64",
        "/usr/local/bin/qemu-system-x86_64",
    ]
    .iter()
    .find(|q| node.host(Path::new(q)).exists())
    .map(|q| q.to_string())
    .unwrap_or_else(|| "missing (install Debian's qemu-system-x86 on the node)".into());
    Ok(format!(
        "release: {release}\nprefix: {}\ncontainerd handlers: {handlers}\nqemu: {qemu}\n",
        node.prefix.display()
    ))
}
