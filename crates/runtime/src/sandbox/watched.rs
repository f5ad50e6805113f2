//! Watched volumes: a Kubernetes ConfigMap, Secret, projected or downward-API volume is copied
//! into guest memory (the agent's CopyFile, under `/run/kata-containers/shared/watchable`)
//! instead of shared, and mirrored while the container lives: the host directory is scanned
//! every [`POLL`], and what changed is copied in the order the kubelet made it (directories,
//! files, then symlinks, then removals). So the kubelet's update, a new timestamped directory
//! and a swapped `..data` symlink, reaches the container as the same changes, which its inotify
//! watches see (virtio-fs shows the new content but raises no event in the guest).
//!
//! A volume over [`MAX_ENTRIES`] entries or [`MAX_BYTES`] of file data is shared as any bind
//! mount instead (its content still updates, without events); one that grows past them later
//! keeps its last mirrored state, with a warning, until it fits again.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use kata_protocols::agent::{CopyFileRequest, RemoveFileRequest};

use super::Sandbox;
use crate::agent::{agent_err, ctx, AgentClient, CALL_TIMEOUT};
use crate::error::SandboxError;

/// Where the agent keeps watched volumes.
pub const GUEST_WATCHABLE_DIR: &str = "/run/kata-containers/shared/watchable";
/// How often a watched volume is scanned on the host.
pub const POLL: Duration = Duration::from_millis(100);
/// The most entries (files, directories, links) a watched volume may have.
pub const MAX_ENTRIES: usize = 64;
/// The most file bytes a watched volume may hold.
pub const MAX_BYTES: u64 = 1 << 20;
const CHUNK: usize = 512 * 1024;

/// One entry of a volume, as far as a change matters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// A directory.
    Dir,
    /// A regular file: size, modification time (ns) and inode (a rewrite changes one).
    File(u64, i128, u64),
    /// A symbolic link and its target.
    Link(PathBuf),
}

/// An entry's kind with its owner and permissions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// What it is.
    pub kind: Kind,
    /// Permission bits.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
}

/// A volume's entries by relative path (`""` is the volume's directory).
pub type Tree = BTreeMap<PathBuf, Entry>;

/// Why a volume cannot be watched.
#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    /// Over the limits.
    #[error("{0}")]
    TooLarge(String),
    /// Could not be read.
    #[error("read {path}: {source}")]
    Io {
        /// What.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Reads the tree under `root` (never following a symlink), within the limits.
pub fn scan(root: &Path) -> Result<Tree, ScanError> {
    let mut tree = Tree::new();
    let mut bytes = 0u64;
    let mut todo = vec![PathBuf::new()];
    while let Some(rel) = todo.pop() {
        let path = root.join(&rel);
        let io = |source| ScanError::Io {
            path: path.display().to_string(),
            source,
        };
        let md = std::fs::symlink_metadata(&path).map_err(io)?;
        let ft = md.file_type();
        let kind = if ft.is_dir() {
            for e in std::fs::read_dir(&path).map_err(io)? {
                todo.push(rel.join(e.map_err(io)?.file_name()));
            }
            Kind::Dir
        } else if ft.is_symlink() {
            Kind::Link(std::fs::read_link(&path).map_err(io)?)
        } else if ft.is_file() {
            bytes += md.len();
            Kind::File(
                md.len(),
                i128::from(md.mtime()) * 1_000_000_000 + i128::from(md.mtime_nsec()),
                md.ino(),
            )
        } else {
            // Devices, fifos and sockets have no place in such a volume: not mirrored.
            continue;
        };
        tree.insert(
            rel,
            Entry {
                kind,
                mode: md.mode() & 0o7777,
                uid: md.uid(),
                gid: md.gid(),
            },
        );
        if tree.len() > MAX_ENTRIES || bytes > MAX_BYTES {
            return Err(ScanError::TooLarge(format!(
                "{} has more than {MAX_ENTRIES} entries or {MAX_BYTES} bytes",
                root.display()
            )));
        }
    }
    Ok(tree)
}

/// A step that brings the guest's copy from one tree to the next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Make (or re-own) a directory.
    Dir(PathBuf),
    /// Copy a file.
    File(PathBuf),
    /// Make a symlink.
    Link(PathBuf),
    /// Remove what is there (a whole tree).
    Remove(PathBuf),
}

/// The steps from `old` to `new`: directories first (parents before children), then files,
/// then symlinks (so that a link is swapped only once what it points to is there), then
/// removals (only the top of a removed tree).
pub fn plan(old: &Tree, new: &Tree) -> Vec<Op> {
    let changed = |(p, e): (&PathBuf, &Entry)| old.get(p) != Some(e);
    let mut ops = Vec::new();
    for (p, e) in new.iter().filter(|x| changed(*x)) {
        if e.kind == Kind::Dir {
            ops.push(Op::Dir(p.clone()));
        }
    }
    for (p, e) in new.iter().filter(|x| changed(*x)) {
        if matches!(e.kind, Kind::File(..)) {
            ops.push(Op::File(p.clone()));
        }
    }
    for (p, e) in new.iter().filter(|x| changed(*x)) {
        if matches!(e.kind, Kind::Link(_)) {
            ops.push(Op::Link(p.clone()));
        }
    }
    let gone: Vec<&PathBuf> = old.keys().filter(|p| !new.contains_key(*p)).collect();
    for p in &gone {
        if !gone.iter().any(|q| q != p && p.starts_with(q)) {
            ops.push(Op::Remove((*p).clone()));
        }
    }
    ops
}

/// One watched volume: its host directory, its guest copy, and the tree last mirrored.
struct Mirror {
    host: PathBuf,
    guest: PathBuf,
    tree: Tree,
}

impl Mirror {
    fn guest_path(&self, rel: &Path) -> String {
        if rel.as_os_str().is_empty() {
            self.guest.display().to_string()
        } else {
            self.guest.join(rel).display().to_string()
        }
    }

    /// Applies `plan(self.tree, new)` through the agent.
    async fn apply(&mut self, agent: &AgentClient, new: Tree) -> Result<(), SandboxError> {
        for op in plan(&self.tree, &new) {
            match &op {
                Op::Remove(rel) => {
                    let req = RemoveFileRequest {
                        path: self.guest_path(rel),
                        ..Default::default()
                    };
                    agent
                        .agent
                        .remove_file(ctx(CALL_TIMEOUT), &req)
                        .await
                        .map_err(agent_err("RemoveFile"))?;
                }
                Op::Dir(rel) | Op::File(rel) | Op::Link(rel) => {
                    let Some(e) = new.get(rel) else { continue };
                    self.copy(agent, rel, e).await?;
                }
            }
        }
        self.tree = new;
        Ok(())
    }

    async fn copy(&self, agent: &AgentClient, rel: &Path, e: &Entry) -> Result<(), SandboxError> {
        let base = CopyFileRequest {
            path: self.guest_path(rel),
            dir_mode: 0o755,
            uid: e.uid as i32,
            gid: e.gid as i32,
            ..Default::default()
        };
        let call = |req: CopyFileRequest| async move {
            agent
                .agent
                .copy_file(ctx(CALL_TIMEOUT), &req)
                .await
                .map_err(agent_err("CopyFile"))
                .map(|_| ())
        };
        match &e.kind {
            Kind::Dir => {
                call(CopyFileRequest {
                    file_mode: libc::S_IFDIR | e.mode,
                    ..base
                })
                .await
            }
            Kind::Link(target) => {
                use std::os::unix::ffi::OsStrExt;
                call(CopyFileRequest {
                    file_mode: libc::S_IFLNK | 0o777,
                    data: target.as_os_str().as_bytes().to_vec(),
                    ..base
                })
                .await
            }
            Kind::File(..) => {
                let path = self.host.join(rel);
                let data = read_file(&path).map_err(|e| SandboxError::Share {
                    source_path: path.display().to_string(),
                    target: base.path.clone(),
                    source: kata_mount::MountError::io("read a watched file", e),
                })?;
                let size = data.len() as i64;
                let mut offset = 0usize;
                loop {
                    let end = (offset + CHUNK).min(data.len());
                    call(CopyFileRequest {
                        file_mode: libc::S_IFREG | e.mode,
                        file_size: size,
                        offset: offset as i64,
                        data: data[offset..end].to_vec(),
                        ..base.clone()
                    })
                    .await?;
                    offset = end;
                    if offset >= data.len() {
                        return Ok(());
                    }
                }
            }
        }
    }
}

/// A file's bytes, never through a symlink, at most [`MAX_BYTES`].
fn read_file(path: &Path) -> std::io::Result<Vec<u8>> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    let mut data = Vec::new();
    f.take(MAX_BYTES + 1).read_to_end(&mut data)?;
    Ok(data)
}

/// The sandbox's watchers, by container.
#[derive(Debug, Default)]
pub struct Watchers(std::sync::Mutex<HashMap<String, Vec<tokio::task::JoinHandle<()>>>>);

impl Sandbox {
    /// Copies a watched volume's directory `source` into the guest and keeps it mirrored until
    /// [`Sandbox::unwatch`]; returns its guest path. None: too large to watch (share it).
    pub async fn share_watched(
        &self,
        container_id: &str,
        index: usize,
        source: &Path,
    ) -> Result<Option<PathBuf>, SandboxError> {
        crate::ids::check("container", container_id)?;
        let tree = match scan(source) {
            Ok(t) => t,
            Err(ScanError::TooLarge(why)) => {
                tracing::warn!("{why}: shared, not watched (its updates raise no inotify event)");
                return Ok(None);
            }
            Err(e) => {
                return Err(SandboxError::Invalid(format!(
                    "watched volume of container {container_id}: {e}"
                )))
            }
        };
        let guest = Path::new(GUEST_WATCHABLE_DIR)
            .join(container_id)
            .join(index.to_string());
        let mut mirror = Mirror {
            host: source.to_path_buf(),
            guest: guest.clone(),
            tree: Tree::new(),
        };
        mirror.apply(&self.agent, tree).await?;
        let agent = self.agent.clone();
        let task = tokio::spawn(async move {
            let mut warned = false;
            loop {
                tokio::time::sleep(POLL).await;
                let host = mirror.host.clone();
                let tree = match tokio::task::spawn_blocking(move || scan(&host)).await {
                    Ok(Ok(t)) => t,
                    Ok(Err(e)) => {
                        if !warned {
                            tracing::warn!(
                                "watched volume {}: {e}; kept as it was",
                                mirror.guest.display()
                            );
                            warned = true;
                        }
                        continue;
                    }
                    Err(_) => return,
                };
                warned = false;
                if tree == mirror.tree {
                    continue;
                }
                if let Err(e) = mirror.apply(&agent, tree).await {
                    if e.unanswered() {
                        return; // The VM is gone.
                    }
                    tracing::warn!("watched volume {}: {e}", mirror.guest.display());
                    // Scanned again from scratch next time.
                    mirror.tree = Tree::new();
                }
            }
        });
        if let Ok(mut w) = self.watchers.0.lock() {
            w.entry(container_id.to_string()).or_default().push(task);
        }
        Ok(Some(guest))
    }

    /// Stops mirroring a container's watched volumes and removes their guest copies.
    pub fn unwatch(&self, container_id: &str) {
        let tasks = match self.watchers.0.lock() {
            Ok(mut w) => w.remove(container_id),
            Err(_) => None,
        };
        let Some(tasks) = tasks else { return };
        for t in tasks {
            t.abort();
        }
        let agent = self.agent.clone();
        let req = RemoveFileRequest {
            path: Path::new(GUEST_WATCHABLE_DIR)
                .join(container_id)
                .display()
                .to_string(),
            ..Default::default()
        };
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let _ = agent.agent.remove_file(ctx(CALL_TIMEOUT), &req).await;
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kubelet_write(dir: &Path, stamp: &str, files: &[(&str, &str)]) {
        let ts = dir.join(stamp);
        std::fs::create_dir_all(&ts).expect("mkdir");
        for (k, v) in files {
            std::fs::write(ts.join(k), v).expect("write");
        }
        let tmp = dir.join("..data_tmp");
        std::os::unix::fs::symlink(stamp, &tmp).expect("ln");
        std::fs::rename(&tmp, dir.join("..data")).expect("swap");
        for (k, _) in files {
            let _ = std::os::unix::fs::symlink(format!("..data/{k}"), dir.join(k));
        }
    }

    fn names(ops: &[Op]) -> Vec<String> {
        ops.iter()
            .map(|o| match o {
                Op::Dir(p) => format!("dir {}", p.display()),
                Op::File(p) => format!("file {}", p.display()),
                Op::Link(p) => format!("link {}", p.display()),
                Op::Remove(p) => format!("rm {}", p.display()),
            })
            .collect()
    }

    #[test]
    fn an_update_is_mirrored_in_the_kubelets_order() {
        let t = tempfile::tempdir().expect("tempdir");
        let v = t.path();
        kubelet_write(v, "..2026_1", &[("a", "1"), ("b", "2")]);
        let first = scan(v).expect("scan");
        assert_eq!(
            names(&plan(&Tree::new(), &first)),
            [
                "dir ",
                "dir ..2026_1",
                "file ..2026_1/a",
                "file ..2026_1/b",
                "link ..data",
                "link a",
                "link b"
            ]
        );
        assert!(plan(&first, &scan(v).expect("scan")).is_empty());
        kubelet_write(v, "..2026_2", &[("a", "10"), ("b", "2")]);
        std::fs::remove_dir_all(v.join("..2026_1")).expect("rm");
        let second = scan(v).expect("scan");
        assert_eq!(
            names(&plan(&first, &second)),
            [
                "dir ..2026_2",
                "file ..2026_2/a",
                "file ..2026_2/b",
                "link ..data",
                "rm ..2026_1"
            ]
        );
    }

    #[test]
    fn a_volume_over_the_limits_is_not_watched() {
        let t = tempfile::tempdir().expect("tempdir");
        for i in 0..=MAX_ENTRIES {
            std::fs::write(t.path().join(i.to_string()), "x").expect("write");
        }
        assert!(matches!(scan(t.path()), Err(ScanError::TooLarge(_))));
        let t = tempfile::tempdir().expect("tempdir");
        std::fs::write(t.path().join("big"), vec![0u8; MAX_BYTES as usize + 1]).expect("write");
        assert!(matches!(scan(t.path()), Err(ScanError::TooLarge(_))));
    }

    #[test]
    fn a_symlink_is_copied_as_a_link_never_read_through() {
        let t = tempfile::tempdir().expect("tempdir");
        std::os::unix::fs::symlink("/etc/shadow", t.path().join("s")).expect("ln");
        let tree = scan(t.path()).expect("scan");
        assert_eq!(
            tree.get(Path::new("s")).map(|e| e.kind.clone()),
            Some(Kind::Link("/etc/shadow".into()))
        );
        assert!(read_file(&t.path().join("s")).is_err());
    }
}
