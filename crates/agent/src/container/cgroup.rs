//! A container's cgroup in the guest (cgroup v2 under `/sys/fs/cgroup/kata`): made, limited as
//! `linux.resources` says (devices through an eBPF program), read for stats and pids.

use super::*;

/// Creates the cgroup of a container and applies its limits.
pub fn create_cgroup(id: &str, resources: Option<&LinuxResources>) -> Result<PathBuf, AgentError> {
    let root = prepare_cgroup_root()?;
    let dir = root.join(id);
    std::fs::create_dir_all(&dir).map_err(io("create the container's cgroup"))?;
    if let Some(r) = resources {
        let applied = apply_resources(&dir, r).and_then(|_| apply_devices(&dir, r));
        if let Err(e) = applied {
            let _ = std::fs::remove_dir(&dir);
            return Err(e);
        }
    }
    Ok(dir)
}

/// The container's device rules as a BPF program on its cgroup (see [`crate::devcg`]).
pub(super) fn apply_devices(dir: &Path, r: &LinuxResources) -> Result<(), AgentError> {
    let Some(list) = r.devices().as_ref().filter(|l| !l.is_empty()) else {
        return Ok(());
    };
    let mut rules = crate::devcg::rules(list).map_err(|e| AgentError::Guest(e.into()))?;
    // As runc: its standard devices are allowed whatever the spec says.
    rules.extend(crate::devcg::runc_defaults());
    let fd = std::fs::File::open(dir).map_err(io("open the container's cgroup"))?;
    use std::os::fd::AsFd;
    crate::devcg::attach(&crate::devcg::assemble(&rules), fd.as_fd())
        .map_err(|e| AgentError::Guest(e.into()))
}

/// Creates the containers' parent cgroup with every controller enabled for its children. The
/// agent does it once at start, off the path of the first container create (enabling the
/// controllers costs tens of ms under TCG); later calls find it done.
pub fn prepare_cgroup_root() -> Result<&'static Path, AgentError> {
    static READY: Mutex<bool> = Mutex::new(false);
    let root = Path::new(CGROUP_ROOT);
    let mut ready = READY.lock().unwrap_or_else(|e| e.into_inner());
    if !*ready {
        std::fs::create_dir_all(root).map_err(io("create the containers' cgroup"))?;
        if let Ok(ctrl) = std::fs::read_to_string(root.join("cgroup.controllers")) {
            let enable: Vec<String> = ctrl.split_whitespace().map(|c| format!("+{c}")).collect();
            let _ = std::fs::write(root.join("cgroup.subtree_control"), enable.join(" "));
        }
        *ready = true;
    }
    Ok(root)
}

/// Writes OCI resources into a cgroup v2 directory.
pub fn apply_resources(dir: &Path, r: &LinuxResources) -> Result<(), AgentError> {
    let write = |file: &str, value: String| {
        std::fs::write(dir.join(file), &value)
            .map_err(|e| AgentError::Failed(format!("set {file} = {value}: {e}")))
    };
    if let Some(m) = r.memory() {
        if let Some(limit) = m.limit() {
            write(
                "memory.max",
                if limit < 0 {
                    "max".into()
                } else {
                    limit.to_string()
                },
            )?;
        }
        if let Some(swap) = m.swap() {
            if let Some(limit) = m.limit() {
                if swap > 0 && limit > 0 && swap >= limit {
                    let _ = write("memory.swap.max", (swap - limit).to_string());
                }
            }
        }
    }
    if let Some(c) = r.cpu() {
        if let Some(q) = c.quota() {
            let period = c.period().unwrap_or(100_000);
            write(
                "cpu.max",
                if q <= 0 {
                    format!("max {period}")
                } else {
                    format!("{q} {period}")
                },
            )?;
        }
        if let Some(shares) = c.shares() {
            // cgroup v1 shares (2..262144) to v2 weight (1..10000), as runc converts.
            let weight = 1 + ((shares.clamp(2, 262_144) - 2) * 9999) / 262_142;
            write("cpu.weight", weight.to_string())?;
        }
    }
    if let Some(p) = r.pids() {
        let l = p.limit();
        write(
            "pids.max",
            if l <= 0 { "max".into() } else { l.to_string() },
        )?;
    }
    Ok(())
}

pub(super) fn read_u64(dir: &Path, file: &str) -> u64 {
    std::fs::read_to_string(dir.join(file))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

pub(super) fn keyed(dir: &Path, file: &str, key: &str) -> u64 {
    std::fs::read_to_string(dir.join(file))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(key).and_then(|v| v.trim().parse().ok()))
        })
        .unwrap_or(0)
}

/// The OOM kills counted in cgroup `dir` (memory.events' oom_kill).
pub fn oom_kills(dir: &Path) -> u64 {
    keyed(dir, "memory.events", "oom_kill ")
}

/// Statistics of a container's cgroup.
pub fn stats(dir: &Path) -> kata_protocols::agent::StatsContainerResponse {
    let limit = std::fs::read_to_string(dir.join("memory.max"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(u64::MAX);
    let oom_kills = oom_kills(dir);
    kata_protocols::agent::StatsContainerResponse {
        memory_usage: read_u64(dir, "memory.current"),
        memory_limit: limit,
        cpu_usage_usec: keyed(dir, "cpu.stat", "usage_usec "),
        pids_current: read_u64(dir, "pids.current"),
        oom_killed: oom_kills > 0,
        oom_kills,
        ..Default::default()
    }
}

/// Pids in a cgroup.
pub fn cgroup_pids(dir: &Path) -> Vec<i32> {
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .map(|s| s.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}
