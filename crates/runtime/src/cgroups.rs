//! The sandbox's cgroups on the host (`[runtime].sandbox_cgroup_only`).
//!
//! The container manager gives the sandbox container a `linux.cgroupsPath`; its parent is the
//! pod's cgroup, which the kubelet sizes (with the RuntimeClass overhead). Kata's two layouts:
//!
//! - `sandbox_cgroup_only = true`: the sandbox cgroup `<parent>/kata_<id>` holds every process
//!   of the sandbox (shim, virtiofsd, QEMU with all its threads). The runtime sets no limit on
//!   it; the pod cgroup above it limits the whole sandbox.
//! - `false` (default): the shim, virtiofsd and QEMU run in the overhead cgroup
//!   `/kata_overhead/<id>`, unconstrained; only QEMU's vCPU threads go to the sandbox cgroup
//!   `<parent>/kata_<id>` (cpu, cpuacct and cpuset controllers), which carries the sum of the
//!   containers' CPU limits. On the unified hierarchy (cgroup v2) threads of one process cannot
//!   be split between domain cgroups, so there the whole QEMU process goes to the sandbox cgroup.
//!
//! The shim joins its cgroup before it starts virtiofsd and QEMU, which inherit it. On stop it
//! returns to the cgroups it came from and removes the directories it created (the leaf ones; a
//! parent such as the pod cgroup belongs to whoever made it). The directories are recorded in
//! the sandbox's state directory so that `containerd-shim-kata-v2 delete` can remove them after
//! a crash.

use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

use crate::error::SandboxError;

/// The overhead cgroups' parent (`false` layout).
pub const OVERHEAD_PARENT: &str = "/kata_overhead";
/// v1 controllers the runtime places the sandbox in.
const V1_CONTROLLERS: [&str; 6] = ["cpu", "cpuacct", "cpuset", "memory", "pids", "blkio"];
/// v1 controllers that take the vCPU threads in the `false` layout.
const V1_VCPU_CONTROLLERS: [&str; 3] = ["cpu", "cpuacct", "cpuset"];
/// v2 controllers enabled down to the sandbox cgroup.
const V2_CONTROLLERS: [&str; 5] = ["cpu", "cpuset", "memory", "pids", "io"];
/// The file in the sandbox's state directory listing the cgroup directories to remove.
pub const RECORD_FILE: &str = "cgroups";

/// A mounted cgroup hierarchy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hierarchy {
    /// Mount point.
    pub mount: PathBuf,
    /// v1 controllers (empty for the unified hierarchy).
    pub controllers: Vec<String>,
    /// The cgroup of the mount's root (mountinfo's root field; `/` on the host).
    pub root: String,
    /// This process's cgroup in the hierarchy (from /proc/self/cgroup).
    pub own: String,
}

impl Hierarchy {
    fn has(&self, c: &str) -> bool {
        self.controllers.iter().any(|x| x == c)
    }

    /// The directory of cgroup `path` (absolute within the hierarchy) in this mount.
    fn dir(&self, path: &str) -> PathBuf {
        let rel = path
            .strip_prefix(self.root.trim_end_matches('/'))
            .unwrap_or(path)
            .trim_start_matches('/');
        self.mount.join(rel)
    }
}

/// The host's cgroup hierarchies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layout {
    /// cgroup v1 (or hybrid): one hierarchy per controller group.
    V1(Vec<Hierarchy>),
    /// The unified hierarchy (cgroup v2 only).
    V2(Hierarchy),
}

impl Layout {
    /// Reads this host's layout.
    pub fn current() -> Result<Layout, SandboxError> {
        let read = |p: &str| {
            std::fs::read_to_string(p).map_err(|source| SandboxError::Io {
                what: "failed to read",
                path: p.into(),
                source,
            })
        };
        Layout::parse(&read("/proc/self/mountinfo")?, &read("/proc/self/cgroup")?)
    }

    /// The layout from mountinfo and /proc/self/cgroup text.
    pub fn parse(mountinfo: &str, proc_cgroup: &str) -> Result<Layout, SandboxError> {
        let own = |key: &dyn Fn(&str) -> bool| -> String {
            proc_cgroup
                .lines()
                .filter_map(|l| {
                    let mut f = l.splitn(3, ':');
                    let (_, ctl, path) = (f.next()?, f.next()?, f.next()?);
                    key(ctl).then(|| path.to_string())
                })
                .next()
                .unwrap_or_else(|| "/".into())
        };
        let mut v1 = Vec::new();
        let mut v2 = None;
        for line in mountinfo.lines() {
            let Some((left, right)) = line.split_once(" - ") else {
                continue;
            };
            let l: Vec<&str> = left.split_whitespace().collect();
            let r: Vec<&str> = right.split_whitespace().collect();
            if l.len() < 5 || r.len() < 3 {
                continue;
            }
            let (root, mount) = (l[3].to_string(), PathBuf::from(l[4].replace("\\040", " ")));
            match r[0] {
                "cgroup" => {
                    let controllers: Vec<String> = r[2]
                        .split(',')
                        .filter(|o| V1_CONTROLLERS.contains(o))
                        .map(String::from)
                        .collect();
                    if controllers.is_empty()
                        || v1.iter().any(|h: &Hierarchy| h.controllers == controllers)
                    {
                        continue;
                    }
                    let set = controllers.clone();
                    let own = own(&|c: &str| {
                        let mine: Vec<&str> = c.split(',').collect();
                        set.iter().all(|s| mine.contains(&s.as_str()))
                    });
                    v1.push(Hierarchy {
                        mount,
                        controllers,
                        root,
                        own,
                    });
                }
                "cgroup2" if v2.is_none() => {
                    v2 = Some(Hierarchy {
                        mount,
                        controllers: Vec::new(),
                        root,
                        own: own(&|c: &str| c.is_empty()),
                    });
                }
                _ => {}
            }
        }
        if !v1.is_empty() {
            return Ok(Layout::V1(v1));
        }
        v2.map(Layout::V2).ok_or_else(|| {
            SandboxError::Cgroup(
                "no cgroup hierarchy is mounted (neither v1 controllers nor cgroup2 in /proc/self/mountinfo); mount cgroupfs or set up the host's cgroups".into(),
            )
        })
    }

    fn hierarchies(&self) -> Vec<&Hierarchy> {
        match self {
            Layout::V1(h) => h.iter().collect(),
            Layout::V2(h) => vec![h],
        }
    }
}

/// Where the sandbox cgroup goes, from the sandbox container's `linux.cgroupsPath`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxCgroupPath {
    /// The parent (the pod's cgroup), absolute, or relative to the shim's own cgroup.
    pub parent: String,
    /// `parent` is relative to the shim's cgroup.
    pub relative: bool,
}

impl SandboxCgroupPath {
    /// Parses a cgroupfs path (`/kubepods/pod1/<id>`) or a systemd one
    /// (`kubepods-pod1.slice:cri-containerd:<id>`, expanded to its slice directories).
    pub fn parse(cgroups_path: &str) -> Result<SandboxCgroupPath, SandboxError> {
        let bad = |why: &str| {
            SandboxError::Invalid(format!(
                "linux.cgroupsPath {cgroups_path:?} {why}; give a cgroupfs path such as /kubepods/pod<uid>/<id> or a systemd one such as kubepods-pod<uid>.slice:cri-containerd:<id>"
            ))
        };
        if cgroups_path.is_empty() {
            return Ok(SandboxCgroupPath {
                parent: "/".into(),
                relative: false,
            });
        }
        let parts: Vec<&str> = cgroups_path.split(':').collect();
        if parts.len() == 3 && !parts[0].contains('/') {
            let slice = parts[0];
            if slice.is_empty() || slice == "-.slice" {
                return Ok(SandboxCgroupPath {
                    parent: "/".into(),
                    relative: false,
                });
            }
            let Some(name) = slice.strip_suffix(".slice") else {
                return Err(bad("names a systemd slice that does not end in .slice"));
            };
            if name.is_empty() || name.split('-').any(str::is_empty) {
                return Err(bad("names a malformed systemd slice"));
            }
            let mut parent = String::new();
            let mut prefix = String::new();
            for word in name.split('-') {
                if !prefix.is_empty() {
                    prefix.push('-');
                }
                prefix.push_str(word);
                parent.push('/');
                parent.push_str(&prefix);
                parent.push_str(".slice");
            }
            return Ok(SandboxCgroupPath {
                parent,
                relative: false,
            });
        }
        if parts.len() > 1 {
            return Err(bad("has a ':' but is not slice:prefix:name"));
        }
        let path = Path::new(cgroups_path);
        if path
            .components()
            .any(|c| matches!(c, Component::ParentDir | Component::CurDir))
        {
            return Err(bad("contains '.' or '..'"));
        }
        let parent = path
            .parent()
            .map(|p| p.to_string_lossy().to_string())
            .unwrap_or_default();
        let relative = !path.is_absolute();
        Ok(SandboxCgroupPath {
            parent: if parent.is_empty() && !relative {
                "/".into()
            } else {
                parent
            },
            relative,
        })
    }
}

/// A CPU limit: `quota` µs of CPU time per `period` µs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuLimit {
    /// Quota (µs).
    pub quota: i64,
    /// Period (µs).
    pub period: u64,
}

/// The sandbox cgroup's CPU limit: the sum of the containers' limits over a 100 ms period, or
/// none when any container is unlimited (as the kubelet sizes a pod cgroup).
pub fn sum_cpu_limits(limits: &[Option<CpuLimit>]) -> Option<CpuLimit> {
    const PERIOD: u64 = 100_000;
    if limits.is_empty() {
        return None;
    }
    let mut quota: i64 = 0;
    for l in limits {
        let l = (*l)?;
        if l.quota <= 0 || l.period == 0 {
            return None;
        }
        let scaled = i128::from(l.quota) * i128::from(PERIOD) / i128::from(l.period);
        quota = quota.saturating_add(i64::try_from(scaled).unwrap_or(i64::MAX));
    }
    // The kernel's minimum quota is 1 ms.
    Some(CpuLimit {
        quota: quota.max(1000),
        period: PERIOD,
    })
}

/// The host cgroups of one sandbox.
#[derive(Debug)]
pub struct HostCgroups {
    only: bool,
    layout: Layout,
    /// Sandbox cgroup directories, one per hierarchy it is in.
    sandbox: Vec<(Hierarchy, PathBuf)>,
    /// Overhead cgroup directories (`false` layout).
    overhead: Vec<(Hierarchy, PathBuf)>,
    record: PathBuf,
}

fn cg_err(what: &str, path: &Path, e: std::io::Error) -> SandboxError {
    SandboxError::Cgroup(format!("{what} {}: {e}", path.display()))
}

fn write(path: &Path, value: &str) -> Result<(), SandboxError> {
    std::fs::write(path, value).map_err(|e| cg_err(&format!("cannot write {value:?} to"), path, e))
}

/// Creates `dir` and its missing parents below `mount`; in a v1 cpuset hierarchy each new
/// directory gets its parent's cpus and mems (a new cpuset is empty and takes no task).
fn create(h: &Hierarchy, dir: &Path, v2: bool) -> Result<(), SandboxError> {
    let rel = dir.strip_prefix(&h.mount).unwrap_or(dir);
    let mut cur = h.mount.clone();
    for c in rel.components() {
        let parent = cur.clone();
        cur.push(c);
        if v2 {
            // Hand the controllers down; a parent holding processes refuses, which only
            // leaves the limits out.
            for ctl in V2_CONTROLLERS {
                let _ = std::fs::write(parent.join("cgroup.subtree_control"), format!("+{ctl}"));
            }
        }
        if cur.is_dir() {
            continue;
        }
        std::fs::create_dir(&cur).map_err(|e| cg_err("cannot create cgroup", &cur, e))?;
        if h.has("cpuset") {
            for f in ["cpuset.cpus", "cpuset.mems"] {
                let mine = std::fs::read_to_string(cur.join(f)).unwrap_or_default();
                if mine.trim().is_empty() {
                    let theirs = std::fs::read_to_string(parent.join(f)).unwrap_or_default();
                    write(&cur.join(f), theirs.trim())?;
                }
            }
        }
    }
    Ok(())
}

/// Removes cgroup directory `dir`, waiting up to 2 s for exiting tasks to leave it.
fn remove_dir(dir: &Path) {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match std::fs::remove_dir(dir) {
            Ok(()) => return,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(e) => {
                if Instant::now() >= deadline {
                    tracing::warn!(dir = %dir.display(), error = %e, "cannot remove cgroup");
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

impl HostCgroups {
    /// Creates the sandbox's cgroups in `layout` for the sandbox container's `cgroups_path`, and
    /// moves this process (the shim) into the sandbox cgroup (`only`) or the overhead cgroup.
    /// The directories are recorded in `state_dir`.
    pub fn setup(
        layout: Layout,
        id: &str,
        cgroups_path: &str,
        only: bool,
        state_dir: &Path,
    ) -> Result<HostCgroups, SandboxError> {
        let path = SandboxCgroupPath::parse(cgroups_path)?;
        let v2 = matches!(layout, Layout::V2(_));
        let leaf = format!("kata_{id}");
        let mut cg = HostCgroups {
            only,
            layout: layout.clone(),
            sandbox: Vec::new(),
            overhead: Vec::new(),
            record: state_dir.join(RECORD_FILE),
        };
        for h in layout.hierarchies() {
            let parent = if path.relative {
                format!("{}/{}", h.own.trim_end_matches('/'), path.parent)
            } else {
                path.parent.clone()
            };
            let sandbox_path = format!("{}/{leaf}", parent.trim_end_matches('/'));
            let in_sandbox = only || v2 || V1_VCPU_CONTROLLERS.iter().any(|c| h.has(c));
            if in_sandbox {
                cg.sandbox.push((h.clone(), h.dir(&sandbox_path)));
            }
            if !only {
                let overhead = format!("{OVERHEAD_PARENT}/{id}");
                cg.overhead.push((h.clone(), h.dir(&overhead)));
            }
        }
        // Someone else's directories are never touched, not even to clean up.
        if let Some((_, dir)) = cg
            .sandbox
            .iter()
            .chain(&cg.overhead)
            .find(|(_, d)| d.exists())
        {
            return Err(SandboxError::Cgroup(format!(
                "cgroup {} already exists: another sandbox with this id runs, or a crashed one left it (containerd-shim-kata-v2 delete removes it)",
                dir.display()
            )));
        }
        let result = cg.create_and_join(v2);
        if let Err(e) = result {
            cg.remove();
            return Err(e);
        }
        Ok(cg)
    }

    fn create_and_join(&self, v2: bool) -> Result<(), SandboxError> {
        let mut lines = String::new();
        for (h, dir) in self.sandbox.iter().chain(&self.overhead) {
            // Recorded before creation: a half-made set is removed too.
            lines.push_str(&format!("{}\n", dir.display()));
            std::fs::write(&self.record, &lines)
                .map_err(|e| cg_err("cannot record the cgroups in", &self.record, e))?;
            create(h, dir, v2)?;
        }
        let me = std::process::id().to_string();
        let join = if self.only {
            &self.sandbox
        } else {
            &self.overhead
        };
        for (_, dir) in join {
            write(&dir.join("cgroup.procs"), &me)?;
        }
        Ok(())
    }

    /// The sandbox cgroup directories (one per hierarchy).
    pub fn sandbox_dirs(&self) -> Vec<PathBuf> {
        self.sandbox.iter().map(|(_, d)| d.clone()).collect()
    }

    /// The overhead cgroup directories (empty with `sandbox_cgroup_only`).
    pub fn overhead_dirs(&self) -> Vec<PathBuf> {
        self.overhead.iter().map(|(_, d)| d.clone()).collect()
    }

    /// Moves processes this one did not start (a VM taken from the VMCache: QEMU, virtiofsd)
    /// where the shim is: the sandbox cgroup (`only`) or the overhead cgroup, as if they had
    /// been started here. Memory they charged before stays charged where it was.
    pub fn adopt(&self, pids: &[u32]) -> Result<(), SandboxError> {
        let join = if self.only {
            &self.sandbox
        } else {
            &self.overhead
        };
        for (_, dir) in join {
            for pid in pids {
                write(&dir.join("cgroup.procs"), &pid.to_string())?;
            }
        }
        Ok(())
    }

    /// Puts QEMU's vCPU threads `tids` (of process `qemu_pid`) in the sandbox cgroup (`false`
    /// layout; with `sandbox_cgroup_only` they are there already).
    pub fn add_vcpu_threads(&self, qemu_pid: u32, tids: &[u32]) -> Result<(), SandboxError> {
        if self.only {
            return Ok(());
        }
        for (_, dir) in &self.sandbox {
            match self.layout {
                Layout::V2(_) => write(&dir.join("cgroup.procs"), &qemu_pid.to_string())?,
                Layout::V1(_) => {
                    for tid in tids {
                        write(&dir.join("tasks"), &tid.to_string())?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Sets the sandbox cgroup's CPU limit (`false` layout only: with `sandbox_cgroup_only` the
    /// pod cgroup limits the sandbox).
    pub fn set_cpu_limit(&self, limit: Option<CpuLimit>) -> Result<(), SandboxError> {
        if self.only {
            return Ok(());
        }
        for (h, dir) in &self.sandbox {
            match self.layout {
                Layout::V2(_) => {
                    let v = match limit {
                        Some(l) => format!("{} {}", l.quota, l.period),
                        None => "max 100000".into(),
                    };
                    if dir.join("cpu.max").exists() {
                        write(&dir.join("cpu.max"), &v)?;
                    }
                }
                Layout::V1(_) if h.has("cpu") => match limit {
                    Some(l) => {
                        // Quota -1 first: a period below the current quota's is refused.
                        write(&dir.join("cpu.cfs_quota_us"), "-1")?;
                        write(&dir.join("cpu.cfs_period_us"), &l.period.to_string())?;
                        write(&dir.join("cpu.cfs_quota_us"), &l.quota.to_string())?;
                    }
                    None => write(&dir.join("cpu.cfs_quota_us"), "-1")?,
                },
                Layout::V1(_) => {}
            }
        }
        Ok(())
    }

    /// Moves this process back to the cgroups it came from and removes the sandbox's cgroup
    /// directories. Call after QEMU and virtiofsd have exited.
    pub fn remove(&self) {
        let me = std::process::id().to_string();
        for h in self.layout.hierarchies() {
            let home = h.dir(&h.own).join("cgroup.procs");
            if let Err(e) = std::fs::write(&home, &me) {
                tracing::warn!(cgroup = %home.display(), error = %e, "cannot return the shim to its cgroup");
            }
        }
        for (_, dir) in self.sandbox.iter().chain(&self.overhead) {
            remove_dir(dir);
        }
        let _ = std::fs::remove_file(&self.record);
    }
}

/// Removes the cgroup directories a crashed sandbox recorded in `state_dir` (its processes must
/// be gone). Only directories inside a mounted cgroup hierarchy are touched.
pub fn remove_recorded(state_dir: &Path) {
    let Ok(text) = std::fs::read_to_string(state_dir.join(RECORD_FILE)) else {
        return;
    };
    let Ok(layout) = Layout::current() else {
        return;
    };
    let mounts: Vec<PathBuf> = layout
        .hierarchies()
        .into_iter()
        .map(|h| h.mount.clone())
        .collect();
    for dir in text.lines().map(Path::new) {
        if mounts.iter().any(|m| dir.starts_with(m) && dir != m) {
            remove_dir(dir);
        }
    }
}

#[cfg(test)]
mod tests;
