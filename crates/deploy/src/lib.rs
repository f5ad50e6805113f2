//! kata-deploy: puts the runtime on a node and takes it off again, run on the node (as a
//! DaemonSet's container) with the host's root mounted at a path it is given.
//!
//! `install`: the payload copied next to earlier releases and made current by one rename
//! ([`payload`]); the shims linked where the manager finds them by name; the runtimes added to
//! containerd's configuration, as a drop-in or a minimal edit ([`containerd`]), its original
//! bytes kept, or to CRI-O's as a drop-in ([`crio`]); the manager restarted and waited for
//! until it lists the runtimes, the configuration rolled back if it does not come up; the node
//! labelled. `uninstall`: all of it taken back, the configuration byte for byte. Both can be
//! run again, and after a kill at any point.

pub mod containerd;
pub mod cri;
pub mod crio;
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

/// A [`DeployError::Manager`] saying `what`.
pub(crate) fn manager(what: impl Into<String>) -> DeployError {
    DeployError::Manager(what.into())
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> DeployError {
    let what = what.into();
    move |source| DeployError::Io { what, source }
}

/// A runtime handler the installer adds: its name in the manager, the shim binary the manager
/// runs for it (containerd resolves `runtime_type` `io.containerd.<x>.v2` to
/// `containerd-shim-<x>-v2`), and the configuration file it runs with.
#[derive(Debug)]
pub struct Handler {
    /// The handler's name (a RuntimeClass's `handler`).
    pub name: &'static str,
    /// The shim binary's name in `<prefix>/bin`.
    pub shim: &'static str,
    /// containerd's `runtime_type`.
    pub runtime_type: &'static str,
    /// The configuration file in `<prefix>/share/defaults/kata-containers`.
    pub config: &'static str,
}

impl Handler {
    /// The shim's path under `prefix`.
    pub fn shim_path(&self, prefix: &Path) -> String {
        prefix.join("bin").join(self.shim).display().to_string()
    }

    /// The configuration file's path under `prefix`.
    pub fn config_path(&self, prefix: &Path) -> String {
        prefix
            .join("share/defaults/kata-containers")
            .join(self.config)
            .display()
            .to_string()
    }
}

/// The handlers added: `kata` (the default configuration) and `kata-qemu`, as Kata names them.
pub const HANDLERS: [Handler; 2] = [
    Handler {
        name: "kata",
        shim: "containerd-shim-kata-v2",
        runtime_type: "io.containerd.kata.v2",
        config: "configuration.toml",
    },
    Handler {
        name: "kata-qemu",
        shim: "containerd-shim-kata-qemu-v2",
        runtime_type: "io.containerd.kata-qemu.v2",
        config: "configuration-qemu.toml",
    },
];

/// The node's container manager.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Manager {
    /// containerd 1.6, 1.7 (configuration version 2) or 2.x (version 3).
    Containerd,
    /// CRI-O (a drop-in in `crio.conf.d`).
    Crio,
}

impl std::fmt::Display for Manager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Manager::Containerd => "containerd",
            Manager::Crio => "crio",
        })
    }
}

impl Manager {
    /// The manager of the node at `host_root`: containerd when its configuration file exists,
    /// CRI-O when `crio.conf` or a file in `crio.conf.d` does, else an error that says which
    /// files were looked for (`--manager` names it).
    pub fn detect(
        host_root: &Path,
        containerd_config: &Path,
        crio_dir: &Path,
    ) -> Result<Manager, DeployError> {
        let host = |p: &Path| host_root.join(p.strip_prefix("/").unwrap_or(p));
        if host(containerd_config).exists() {
            return Ok(Manager::Containerd);
        }
        let crio_conf = crio_dir.with_file_name("crio.conf");
        let drop_ins = std::fs::read_dir(host(crio_dir))
            .map(|d| d.flatten().any(|e| e.file_name() != crio::DROP_IN))
            .unwrap_or(false);
        if host(&crio_conf).exists() || drop_ins {
            return Ok(Manager::Crio);
        }
        Err(DeployError::Config(format!(
            "found neither containerd's configuration {} nor CRI-O's {} or {}: \
             pass --manager containerd|crio (and --containerd-config or --crio-config-dir)",
            containerd_config.display(),
            crio_conf.display(),
            crio_dir.display()
        )))
    }

    /// The manager's CRI socket by default.
    pub fn default_socket(self) -> &'static str {
        match self {
            Manager::Containerd => "/run/containerd/containerd.sock",
            Manager::Crio => "/run/crio/crio.sock",
        }
    }

    /// The command that restarts the manager by default: systemd's, through the host's root
    /// when that is mounted elsewhere (the DaemonSet's container).
    pub fn default_restart(self, host_root: &Path) -> String {
        if host_root == Path::new("/") {
            format!("systemctl restart {self}")
        } else {
            format!("chroot {} systemctl restart {self}", host_root.display())
        }
    }
}

/// Where and how to install, as the command line says.
#[derive(Debug, Clone)]
pub struct Node {
    /// The host's root as mounted in the installer's container (`/` when run on the host).
    pub host_root: PathBuf,
    /// Where the runtime lives on the host (`/opt/kata`).
    pub prefix: PathBuf,
    /// The node's container manager.
    pub manager: Manager,
    /// containerd's configuration file, a host path.
    pub containerd_config: PathBuf,
    /// CRI-O's drop-in directory, a host path.
    pub crio_config_dir: PathBuf,
    /// The manager's CRI socket, a host path.
    pub socket: PathBuf,
    /// The command that restarts the manager (run with `sh -c`).
    pub restart: String,
    /// How long the manager may take to answer after a restart.
    pub restart_timeout: Duration,
    /// Where the shims are linked by name, a host path on the manager's `PATH`
    /// (`/usr/local/bin`): `ctr run --runtime io.containerd.kata.v2` and Docker find them there.
    pub shim_dir: PathBuf,
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

/// The handlers the running manager has, once it answers.
fn wait_for_manager(node: &Node) -> Result<Vec<String>, DeployError> {
    let socket = node.host(&node.socket);
    cri::runtime_handlers(node.manager, &socket, node.restart_timeout)
}

/// Replaces `link` by a symlink to `target` in one rename.
fn symlink_atomic(target: &Path, link: &Path) -> Result<(), DeployError> {
    let tmp = link.with_file_name(format!(
        ".{}.kata-deploy.tmp",
        link.file_name().and_then(|n| n.to_str()).unwrap_or("link")
    ));
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp).map_err(io(format!("link {}", tmp.display())))?;
    std::fs::rename(&tmp, link).map_err(io(format!("rename to {}", link.display())))
}

/// Copies `from` (a file or a symlink, not followed) to `to`.
fn copy_entry(from: &Path, to: &Path) -> Result<(), DeployError> {
    let md = std::fs::symlink_metadata(from).map_err(io(format!("stat {}", from.display())))?;
    if md.file_type().is_symlink() {
        let t = std::fs::read_link(from).map_err(io(format!("readlink {}", from.display())))?;
        symlink_atomic(&t, to)
    } else {
        let tmp = to.with_file_name(format!(
            ".{}.kata-deploy.tmp",
            to.file_name().and_then(|n| n.to_str()).unwrap_or("file")
        ));
        std::fs::copy(from, &tmp).map_err(io(format!("copy {}", from.display())))?;
        std::fs::rename(&tmp, to).map_err(io(format!("rename to {}", to.display())))
    }
}

/// Links each handler's shim into the shim directory (`containerd-shim-kata-v2` ->
/// `<prefix>/bin/containerd-shim-kata-v2`). A file of that name that is not such a link is
/// kept in kata-deploy's records first, and put back by `uninstall`.
fn link_shims(node: &Node) -> Result<(), DeployError> {
    let dir = node.host(&node.shim_dir);
    std::fs::create_dir_all(&dir).map_err(io(format!("create {}", dir.display())))?;
    let saved_dir = node.state_dir().join("shims.orig");
    for h in &HANDLERS {
        let link = dir.join(h.shim);
        let target = PathBuf::from(h.shim_path(&node.prefix));
        match std::fs::symlink_metadata(&link) {
            Ok(md) => {
                let ours = md.file_type().is_symlink()
                    && std::fs::read_link(&link).ok().as_deref() == Some(target.as_path());
                if ours {
                    continue;
                }
                let saved = saved_dir.join(h.shim);
                if std::fs::symlink_metadata(&saved).is_err() {
                    std::fs::create_dir_all(&saved_dir)
                        .map_err(io(format!("create {}", saved_dir.display())))?;
                    copy_entry(&link, &saved)?;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(format!("stat {}", link.display()))(e)),
        }
        symlink_atomic(&target, &link)?;
    }
    Ok(())
}

/// Removes the shims' links that point into the prefix and puts back what they replaced.
fn unlink_shims(node: &Node) -> Result<(), DeployError> {
    let dir = node.host(&node.shim_dir);
    let saved_dir = node.state_dir().join("shims.orig");
    for h in &HANDLERS {
        let link = dir.join(h.shim);
        let target = PathBuf::from(h.shim_path(&node.prefix));
        if std::fs::read_link(&link).ok().as_deref() == Some(target.as_path()) {
            std::fs::remove_file(&link).map_err(io(format!("remove {}", link.display())))?;
        }
        let saved = saved_dir.join(h.shim);
        if std::fs::symlink_metadata(&saved).is_ok() {
            copy_entry(&saved, &link)?;
            std::fs::remove_file(&saved).map_err(io(format!("remove {}", saved.display())))?;
        }
    }
    Ok(())
}

/// Writes a drop-in (recorded first, so that an uninstall after a kill still removes it).
fn write_drop_in(node: &Node, path: &Path, text: &str) -> Result<(), DeployError> {
    let on_host = node.host(path);
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
    Ok(())
}

/// An imported file (a host path) that sets the version 2 CRI plugin, if the configuration
/// `text` imports one: it would replace the section the runtimes are added to.
fn cri_section_imported(node: &Node, text: &str) -> Option<PathBuf> {
    containerd::imports(text).into_iter().find_map(|pattern| {
        let pattern = PathBuf::from(pattern);
        let dir = pattern.parent()?.to_path_buf();
        let name = pattern.file_name()?.to_str()?.to_string();
        let files: Vec<PathBuf> = match name.split_once('*') {
            Some((head, tail)) => std::fs::read_dir(node.host(&dir))
                .ok()?
                .flatten()
                .filter_map(|e| {
                    let n = e.file_name().to_str()?.to_string();
                    (n.len() >= head.len() + tail.len() && n.starts_with(head) && n.ends_with(tail))
                        .then(|| dir.join(n))
                })
                .collect(),
            None => vec![pattern.clone()],
        };
        files.into_iter().find(|f| {
            std::fs::read_to_string(node.host(f))
                .map(|t| containerd::sets_cri_v2(&t))
                .unwrap_or(false)
        })
    })
}

/// Adds the runtimes to the manager's configuration.
fn configure(node: &Node) -> Result<(), DeployError> {
    let state = node.state_dir();
    std::fs::create_dir_all(&state).map_err(io(format!("create {}", state.display())))?;
    if node.manager == Manager::Crio {
        let path = crio::drop_in_path(&node.crio_config_dir);
        return write_drop_in(node, &path, &crio::drop_in(&node.prefix));
    }
    let config = node.host(&node.containerd_config);
    save_original(node, &config)?;
    // Planned from the original, so that a second install writes the same bytes.
    let original =
        std::fs::read_to_string(state.join("containerd-config.orig")).unwrap_or_default();
    match containerd::plan(&original, &node.prefix)? {
        (containerd::Plan::DropIn(path), Some(text)) => write_drop_in(node, &path, &text),
        (containerd::Plan::Edit(text), _) => {
            if let Some(file) = cri_section_imported(node, &original) {
                return Err(DeployError::Config(format!(
                    "{} imports {}, which sets the CRI plugin: containerd 1.x replaces the \
                     plugin's whole section with an imported file's, so the runtimes added to \
                     {} would be lost; pass --containerd-config {}",
                    node.containerd_config.display(),
                    file.display(),
                    node.containerd_config.display(),
                    file.display()
                )));
            }
            write_atomic(&config, text.as_bytes())?;
            eprintln!(
                "kata-deploy: runtimes kata, kata-qemu added to {}",
                node.containerd_config.display()
            );
            Ok(())
        }
        (containerd::Plan::DropIn(_), None) => {
            Err(DeployError::Config("a drop-in without text".into()))
        }
    }
}

/// `kata-deploy install`.
pub fn install(node: &Node, payload_dir: &Path, release: &str) -> Result<(), DeployError> {
    let dest = payload::install(payload_dir, &node.host_root, &node.prefix, release)?;
    eprintln!("kata-deploy: release {release} in {}", dest.display());
    link_shims(node)?;
    configure(node)?;
    let up = restart(node).and_then(|()| wait_for_manager(node));
    match up {
        Ok(handlers)
            if HANDLERS
                .iter()
                .all(|h| handlers.iter().any(|x| x == h.name)) =>
        {
            eprintln!(
                "kata-deploy: {} answers with handlers {}",
                node.manager,
                handlers.join(", ")
            );
        }
        other => {
            let why = match other {
                Ok(h) => format!(
                    "{} came back without the kata handlers (it has {h:?})",
                    node.manager
                ),
                Err(e) => e.to_string(),
            };
            // Roll back: the node's manager must keep running.
            restore_original(node)?;
            let back = restart(node).and_then(|()| wait_for_manager(node));
            return Err(DeployError::Manager(format!(
                "{why}; the configuration was rolled back{}",
                match back {
                    Ok(_) => format!(" and {} runs again", node.manager),
                    Err(e) => format!(", but {} did not come back either: {e}", node.manager),
                }
            )));
        }
    }
    if let Some(name) = &node.node_name {
        label::set(name, Some("true"), node.kube_api.as_deref())?;
        eprintln!("kata-deploy: node {name} labelled {}=true", label::LABEL);
    }
    Ok(())
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
            "kata-deploy: {} answers with handlers {}",
            node.manager,
            handlers.join(", ")
        );
    }
    unlink_shims(node)?;
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
    let handlers = cri::runtime_handlers(
        node.manager,
        &node.host(&node.socket),
        Duration::from_secs(5),
    )
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
        "release: {release}\nprefix: {}\n{} handlers: {handlers}\nqemu: {qemu}\n",
        node.prefix.display(),
        node.manager
    ))
}

#[cfg(test)]
mod tests;
