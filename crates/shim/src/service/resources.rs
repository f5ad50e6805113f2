//! What the VM holds for its containers: each container's memory and CPU limits are its demand;
//! the VM is resized to their sum (hot-plug and give-back), and the host sandbox cgroup gets the
//! sum of their CPU limits.

use super::*;

/// Memory limit (MiB) and vCPUs a spec's resources ask for.
pub(super) fn requested(resources: Option<&LinuxResources>) -> (u32, u32) {
    let Some(r) = resources else { return (0, 0) };
    let mem = r
        .memory()
        .as_ref()
        .and_then(|m| m.limit())
        .filter(|l| *l > 0)
        .map(|l| (l as u64).div_ceil(1 << 20) as u32)
        .unwrap_or(0);
    let cpus = cpu_limit(Some(r))
        .map(|l| (l.quota as u64).div_ceil(l.period) as u32)
        .unwrap_or(0);
    (mem, cpus)
}

/// The CPU limit (quota, period) of a spec's resources.
pub(super) fn cpu_limit(resources: Option<&LinuxResources>) -> Option<CpuLimit> {
    let cpu = resources?.cpu().as_ref()?;
    match (cpu.quota(), cpu.period()) {
        (Some(quota), Some(period)) if quota > 0 && period > 0 => Some(CpuLimit { quota, period }),
        _ => None,
    }
}

impl Service {
    /// Records what container `id` asks of the VM (None: nothing any more); returns what it
    /// asked before.
    pub(super) fn set_demand(&self, id: &str, demand: Option<(u32, u32)>) -> Option<(u32, u32)> {
        let mut d = self.demands.lock().unwrap_or_else(|e| e.into_inner());
        match demand {
            Some(v) if v != (0, 0) => d.insert(id.to_string(), v),
            _ => d.remove(id),
        }
    }

    /// Container `id` (not the sandbox's own) no longer needs what it asked of the VM: the VM
    /// gives back its vCPUs and the memory the guest can release.
    pub(super) async fn release_demand(&self, sb: &Sandbox, id: &str) {
        if self.set_demand(id, None).is_some() && id != self.id {
            if let Err(e) = self.resize_vm(sb).await {
                tracing::warn!(error = %kata_config::error_chain(&e), container = %id, "giving back the container's vCPUs and memory");
            }
        }
    }

    /// Resizes the VM's hot-plugged vCPUs and memory to the sum of its containers' demands
    /// (nothing with static resource management: the VM was sized at boot).
    pub(super) async fn resize_vm(&self, sb: &Sandbox) -> Result<(), kata_sandbox::SandboxError> {
        if sb.config.runtime.static_resources() {
            return Ok(());
        }
        let _order = self.resizing.lock().await;
        let (mem, cpus) = self
            .demands
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .fold((0u32, 0u32), |(m, c), (dm, dc)| {
                (m.saturating_add(*dm), c.saturating_add(*dc))
            });
        sb.set_hotplugged(cpus, mem).await
    }

    /// Gives the host sandbox cgroup the sum of the containers' CPU limits.
    pub(super) async fn update_host_cpu_limit(&self, sb: &Sandbox) {
        let limits: Vec<Option<CpuLimit>> = {
            let st = self.state.lock().await;
            st.tasks.values().filter_map(|t| t.cpu).collect()
        };
        let limit = kata_sandbox::cgroups::sum_cpu_limits(&limits);
        if let Err(e) = sb.set_host_cpu_limit(limit) {
            tracing::warn!(error = %kata_config::error_chain(&e), ?limit, "cannot limit the host sandbox cgroup");
        }
    }
}
