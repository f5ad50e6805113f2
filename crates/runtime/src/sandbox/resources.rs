//! vCPUs and memory hot-plugged on top of the boot size, and given back.

use super::*;

/// What is hot-plugged on top of the boot size.
#[derive(Debug, Default)]
pub(super) struct Plugged {
    /// vCPU device ids, in plug order.
    cpus: Vec<String>,
    /// DIMMs (without virtio-mem).
    dimms: Vec<kata_hypervisor::qemu::vm::PluggedDimm>,
    /// The VM has a virtio-mem device (`enable_virtio_mem`).
    virtio_mem: bool,
    /// MiB the virtio-mem device has plugged.
    virtio_mem_mib: u32,
}

impl Plugged {
    /// Nothing plugged yet; `virtio_mem`: the VM has a virtio-mem device.
    pub(super) fn new(virtio_mem: bool) -> Self {
        Plugged {
            virtio_mem,
            ..Plugged::default()
        }
    }

    fn memory_mib(&self) -> u32 {
        self.virtio_mem_mib + self.dimms.iter().map(|d| d.mib).sum::<u32>()
    }
}

impl Sandbox {
    /// Whether the VM's extra vCPUs are present from boot and parked offline (TCG).
    fn parks_vcpus(&self) -> bool {
        let h = &self.config.hypervisor;
        kata_hypervisor::qemu::argv::parks_vcpus(self.accel, h, h.default_vcpus)
    }

    /// vCPUs and memory (MiB) the VM has now.
    pub fn resources(&self) -> (u32, u32) {
        (
            self.vcpus.load(Ordering::Relaxed),
            self.memory_mib.load(Ordering::Relaxed),
        )
    }

    /// Brings what is hot-plugged on top of the boot size to `vcpus` vCPUs and `memory_mib` MiB
    /// (rounded up to the memory block size): plugs what is missing (an error if it cannot, or
    /// if the guest does not bring it online within 10 s) and unplugs what is no longer needed
    /// (vCPUs; DIMMs that the target no longer needs; virtio-mem down to the target), which
    /// the guest gives back when it can: what it keeps stays plugged and is logged, never an
    /// error.
    pub async fn set_hotplugged(&self, vcpus: u32, memory_mib: u32) -> Result<(), SandboxError> {
        let h = &self.config.hypervisor;
        let mut plugged = self.plugged.lock().await;
        let vcpus = vcpus.min(h.default_maxvcpus.saturating_sub(h.default_vcpus));
        let parked = self.parks_vcpus();
        let mut grew_cpus = false;
        if parked {
            // Every vCPU is present from boot (see kata_hypervisor::qemu::argv::build): the
            // guest onlines or offlines them.
            let want = h.default_vcpus + vcpus;
            if want != self.vcpus.load(Ordering::Relaxed) {
                let r = self
                    .agent
                    .agent
                    .online_cpu_mem(
                        ctx(CALL_TIMEOUT),
                        &OnlineCPUMemRequest {
                            wait: true,
                            nb_cpus: want,
                            cpu_only: true,
                            exact_cpus: true,
                            ..Default::default()
                        },
                    )
                    .await
                    .map_err(agent_err("OnlineCPUMem"))?;
                if r.online_cpus != want {
                    return Err(SandboxError::Invalid(format!(
                        "the guest has {} vCPUs online, not the {want} asked for",
                        r.online_cpus
                    )));
                }
                self.vcpus.store(want, Ordering::Relaxed);
            }
        } else {
            let have = plugged.cpus.len() as u32;
            if vcpus > have {
                let added = self.vm.add_vcpus(vcpus - have).await?;
                plugged.cpus.extend(added);
                grew_cpus = true;
            } else if vcpus < have {
                let extra = plugged.cpus.split_off(vcpus as usize);
                let removed = self.vm.remove_vcpus(&extra, UNPLUG_TIMEOUT).await?;
                let kept: Vec<String> =
                    extra.into_iter().filter(|c| !removed.contains(c)).collect();
                if !kept.is_empty() {
                    tracing::warn!(?kept, "the guest kept hot-plugged vCPUs");
                }
                plugged.cpus.extend(kept);
            }
            self.vcpus.store(
                h.default_vcpus + plugged.cpus.len() as u32,
                Ordering::Relaxed,
            );
        }
        if grew_cpus {
            if let Some(cg) = &self.cgroups {
                place_vcpus(&self.vm, cg).await?;
            }
        }
        let target = memory_mib.div_ceil(MEMORY_BLOCK_MIB) * MEMORY_BLOCK_MIB;
        let have = plugged.memory_mib();
        let before_kb = if target > have {
            self.memory_total_kb().await?
        } else {
            0
        };
        if target > have {
            let max = h.default_maxmemory;
            if h.default_memory + target > max {
                return Err(SandboxError::Invalid(format!(
                    "{target} MiB of hot-plugged memory would exceed default_maxmemory = {max} MiB"
                )));
            }
            if plugged.virtio_mem {
                let got = self.vm.set_virtio_mem(target, HOTPLUG_TIMEOUT).await?;
                plugged.virtio_mem_mib = got;
                if got < target {
                    self.memory_mib
                        .store(h.default_memory + plugged.memory_mib(), Ordering::Relaxed);
                    return Err(SandboxError::Invalid(format!(
                        "the guest plugged {got} of {target} MiB through virtio-mem in {} s",
                        HOTPLUG_TIMEOUT.as_secs()
                    )));
                }
            } else {
                let dimm = self.vm.add_memory(target - have).await?;
                plugged.dimms.push(dimm);
            }
        } else if target < have {
            if plugged.virtio_mem {
                let got = self.vm.set_virtio_mem(target, UNPLUG_TIMEOUT).await?;
                if got > target {
                    tracing::warn!(
                        kept_mib = got - target,
                        "the guest gave back only part of its virtio-mem memory"
                    );
                }
                plugged.virtio_mem_mib = got;
            } else {
                // The largest DIMMs the target no longer needs go first.
                let mut order: Vec<usize> = (0..plugged.dimms.len()).collect();
                order.sort_by_key(|&i| std::cmp::Reverse(plugged.dimms[i].mib));
                let mut total = have;
                let mut gone = Vec::new();
                for i in order {
                    let d = plugged.dimms[i].clone();
                    if total - d.mib < target {
                        continue;
                    }
                    match self.vm.remove_memory(&d, UNPLUG_TIMEOUT).await {
                        Ok(()) => {
                            total -= d.mib;
                            gone.push(d.device);
                        }
                        Err(e) => tracing::warn!(error = %e, "hot-plugged memory stays"),
                    }
                }
                plugged.dimms.retain(|d| !gone.contains(&d.device));
            }
        }
        let plugged_mib = plugged.memory_mib();
        self.memory_mib
            .store(h.default_memory + plugged_mib, Ordering::Relaxed);
        let grew_mem = plugged_mib.saturating_sub(have);
        drop(plugged);
        if !grew_cpus && grew_mem == 0 {
            return Ok(());
        }
        let req = OnlineCPUMemRequest {
            wait: true,
            nb_cpus: self.resources().0,
            cpu_only: grew_mem == 0,
            // With parked vCPUs, onlining memory must not online them all.
            exact_cpus: parked,
            ..Default::default()
        };
        // The guest sees hot-plugged memory asynchronously (ACPI): repeat until it is online.
        let deadline = Instant::now() + HOTPLUG_TIMEOUT;
        loop {
            let r = self
                .agent
                .agent
                .online_cpu_mem(ctx(CALL_TIMEOUT), &req)
                .await
                .map_err(agent_err("OnlineCPUMem"))?;
            let grown = r.memory_total_kb >= before_kb + u64::from(grew_mem) * 1024 * 9 / 10;
            let cpus_ok = r.online_cpus >= req.nb_cpus;
            if grown && cpus_ok {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(SandboxError::Invalid(format!(
                    "hot-plugged resources did not come online in {} s: {} of {} vCPUs online, MemTotal {} KiB (expected {} KiB more than {} KiB)",
                    HOTPLUG_TIMEOUT.as_secs(),
                    r.online_cpus,
                    req.nb_cpus,
                    r.memory_total_kb,
                    u64::from(grew_mem) * 1024,
                    before_kb
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The guest's online CPUs and MemTotal in KiB.
    pub async fn guest_resources(&self) -> Result<(u32, u64), SandboxError> {
        let req = OnlineCPUMemRequest {
            cpu_only: true,
            // Parked vCPUs stay parked: the request keeps the count as it is.
            nb_cpus: self.resources().0,
            exact_cpus: self.parks_vcpus(),
            ..Default::default()
        };
        let r = self
            .agent
            .agent
            .online_cpu_mem(ctx(CALL_TIMEOUT), &req)
            .await
            .map_err(agent_err("OnlineCPUMem"))?;
        Ok((r.online_cpus, r.memory_total_kb))
    }

    async fn memory_total_kb(&self) -> Result<u64, SandboxError> {
        let req = GuestDetailsRequest::default();
        let r = self
            .agent
            .agent
            .get_guest_details(ctx(CALL_TIMEOUT), &req)
            .await
            .map_err(agent_err("GetGuestDetails"))?;
        Ok(r.memory_total_kb)
    }
}
