//! What the VM holds for its containers. Each container's memory and CPU limits are its demand
//! from its create until its removal; the VM is resized to their sum (hot-plug, and give-back
//! when a demand goes), and the host sandbox cgroup gets the sum of the counted containers' CPU
//! limits. The ledger is kept here, in the sandbox, so that every caller (a task's Create or
//! Update, containerd's sandbox API) resizes the same way and in order.

use std::collections::HashMap;

use oci_spec::runtime::LinuxResources;

use super::*;

/// What a container asks of the VM: memory (MiB) and vCPUs on top of the boot size.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Demand {
    /// Memory limit, MiB (rounded up).
    pub memory_mib: u32,
    /// vCPUs: the CPU quota over its period, rounded up.
    pub vcpus: u32,
}

impl Demand {
    /// The demand of a spec's resources (nothing without limits).
    pub fn of(resources: Option<&LinuxResources>) -> Demand {
        let Some(r) = resources else {
            return Demand::default();
        };
        let memory_mib = r
            .memory()
            .as_ref()
            .and_then(|m| m.limit())
            .filter(|l| *l > 0)
            .map(|l| (l as u64).div_ceil(1 << 20).min(u64::from(u32::MAX)) as u32)
            .unwrap_or(0);
        let vcpus = cpu_limit(Some(r))
            .map(|l| (l.quota as u64).div_ceil(l.period).min(u64::from(u32::MAX)) as u32)
            .unwrap_or(0);
        Demand { memory_mib, vcpus }
    }

    fn is_none(self) -> bool {
        self == Demand::default()
    }
}

/// The CPU limit (quota, period) of a spec's resources.
pub fn cpu_limit(resources: Option<&LinuxResources>) -> Option<CpuLimit> {
    let cpu = resources?.cpu().as_ref()?;
    match (cpu.quota(), cpu.period()) {
        (Some(quota), Some(period)) if quota > 0 && period > 0 => Some(CpuLimit { quota, period }),
        _ => None,
    }
}

/// Every container's demand and, for those the host cgroup counts, CPU limit.
#[derive(Debug, Default)]
pub(crate) struct Ledger {
    demands: HashMap<String, Demand>,
    /// Counted containers' CPU limits (a pod's sandbox container is not counted).
    cpu: HashMap<String, Option<CpuLimit>>,
}

impl Ledger {
    /// Records container `id`'s demand (none: forgets it); returns the one it replaces.
    fn set(&mut self, id: &str, demand: Demand) -> Demand {
        let before = if demand.is_none() {
            self.demands.remove(id)
        } else {
            self.demands.insert(id.to_string(), demand)
        };
        before.unwrap_or_default()
    }

    /// The sum of every demand.
    fn total(&self) -> Demand {
        self.demands
            .values()
            .fold(Demand::default(), |t, d| Demand {
                memory_mib: t.memory_mib.saturating_add(d.memory_mib),
                vcpus: t.vcpus.saturating_add(d.vcpus),
            })
    }

    fn cpu_limits(&self) -> Vec<Option<CpuLimit>> {
        self.cpu.values().copied().collect()
    }
}

impl Sandbox {
    fn ledger(&self) -> std::sync::MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Container `id` (counted in the host cgroup's CPU limit when `counted`, i.e. not a pod's
    /// sandbox container) asks for `resources`: the VM gets them before the container exists.
    /// If it cannot, nothing is kept and the error says what was asked (the container would
    /// run with less than its limits otherwise).
    pub async fn reserve(
        &self,
        id: &str,
        resources: Option<&LinuxResources>,
        counted: bool,
    ) -> Result<(), SandboxError> {
        let demand = Demand::of(resources);
        if !demand.is_none() {
            self.ledger().set(id, demand);
            if let Err(e) = self.resize_to_demand().await {
                self.ledger().set(id, Demand::default());
                let _ = self.resize_to_demand().await;
                return Err(SandboxError::Resources {
                    memory_mib: demand.memory_mib,
                    vcpus: demand.vcpus,
                    source: Box::new(e),
                });
            }
        }
        if counted {
            self.ledger()
                .cpu
                .insert(id.to_string(), cpu_limit(resources));
            self.apply_host_cpu_limit();
        }
        Ok(())
    }

    /// Container `id` has new limits (a resize in place): the VM follows, up or down; on
    /// failure the previous demand stays.
    pub async fn update_demand(
        &self,
        id: &str,
        resources: &LinuxResources,
    ) -> Result<(), SandboxError> {
        let before = self.ledger().set(id, Demand::of(Some(resources)));
        if let Err(e) = self.resize_to_demand().await {
            self.ledger().set(id, before);
            return Err(e);
        }
        let counted = {
            let mut l = self.ledger();
            l.cpu
                .get_mut(id)
                .map(|c| *c = cpu_limit(Some(resources)))
                .is_some()
        };
        if counted {
            self.apply_host_cpu_limit();
        }
        Ok(())
    }

    /// Container `id` is gone: its CPU limit leaves the host cgroup's, and, unless it is the
    /// sandbox's own (the VM stops with it), the VM gives back its vCPUs and the memory the
    /// guest can release.
    pub async fn release(&self, id: &str) {
        let (had, counted) = {
            let mut l = self.ledger();
            (
                !l.set(id, Demand::default()).is_none(),
                l.cpu.remove(id).is_some(),
            )
        };
        if counted {
            self.apply_host_cpu_limit();
        }
        if had && id != self.id {
            if let Err(e) = self.resize_to_demand().await {
                tracing::warn!(error = %kata_config::error_chain(&e), container = %id, "giving back the container's vCPUs and memory");
            }
        }
    }

    /// Resizes the VM's hot-plugged vCPUs and memory to the sum of the demands (nothing with
    /// static resource management: the VM was sized at boot). Resizes apply in the order
    /// their sums were taken.
    async fn resize_to_demand(&self) -> Result<(), SandboxError> {
        if self.config.runtime.static_resources() {
            return Ok(());
        }
        let _order = self.resizing.lock().await;
        let total = self.ledger().total();
        self.set_hotplugged(total.vcpus, total.memory_mib).await
    }

    /// Gives the host sandbox cgroup the sum of the counted containers' CPU limits.
    fn apply_host_cpu_limit(&self) {
        let limit = crate::cgroups::sum_cpu_limits(&self.ledger().cpu_limits());
        if let Err(e) = self.set_host_cpu_limit(limit) {
            tracing::warn!(error = %kata_config::error_chain(&e), ?limit, "cannot limit the host sandbox cgroup");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use oci_spec::runtime::{
        LinuxCpuBuilder, LinuxMemoryBuilder, LinuxResources, LinuxResourcesBuilder,
    };

    fn res(memory: Option<i64>, quota: Option<(i64, u64)>) -> LinuxResources {
        let mut b = LinuxResourcesBuilder::default();
        if let Some(m) = memory {
            b = b.memory(LinuxMemoryBuilder::default().limit(m).build().expect("mem"));
        }
        if let Some((q, p)) = quota {
            b = b.cpu(
                LinuxCpuBuilder::default()
                    .quota(q)
                    .period(p)
                    .build()
                    .expect("cpu"),
            );
        }
        b.build().expect("resources")
    }

    #[test]
    fn a_specs_demand_is_rounded_up() {
        assert_eq!(Demand::of(None), Demand::default());
        assert_eq!(
            Demand::of(Some(&res(Some(256 << 20), Some((150_000, 100_000))))),
            Demand {
                memory_mib: 256,
                vcpus: 2
            }
        );
        // One byte over a MiB is two; a quota of a tenth of a CPU is one vCPU.
        assert_eq!(
            Demand::of(Some(&res(Some((1 << 20) + 1), Some((10_000, 100_000))))),
            Demand {
                memory_mib: 2,
                vcpus: 1
            }
        );
        // No limit (-1 or 0) asks for nothing.
        assert_eq!(
            Demand::of(Some(&res(Some(-1), Some((-1, 100_000))))),
            Demand::default()
        );
        assert_eq!(cpu_limit(Some(&res(None, Some((0, 100_000))))), None);
    }

    #[test]
    fn the_ledger_sums_and_forgets() {
        let mut l = Ledger::default();
        let a = Demand {
            memory_mib: 256,
            vcpus: 1,
        };
        let b = Demand {
            memory_mib: 128,
            vcpus: 2,
        };
        assert_eq!(l.set("a", a), Demand::default());
        assert_eq!(l.set("b", b), Demand::default());
        assert_eq!(
            l.total(),
            Demand {
                memory_mib: 384,
                vcpus: 3
            }
        );
        // An update returns what it replaces (restored when the resize fails).
        let bigger = Demand {
            memory_mib: 512,
            vcpus: 1,
        };
        assert_eq!(l.set("a", bigger), a);
        assert_eq!(l.set("a", a), bigger);
        // No demand forgets the container.
        assert_eq!(l.set("b", Demand::default()), b);
        assert_eq!(l.total(), a);
        assert_eq!(l.demands.len(), 1);
        // Sums saturate instead of wrapping.
        l.set(
            "huge",
            Demand {
                memory_mib: u32::MAX,
                vcpus: u32::MAX,
            },
        );
        assert_eq!(l.total().memory_mib, u32::MAX);
    }
}
