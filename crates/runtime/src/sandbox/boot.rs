//! A sandbox's boot: the host side (directories, host cgroups, the share and virtiofsd, the
//! network namespace and the pod network, the QEMU launch) prepared once ([`Boot::host`]), a
//! VM from the first source of [`crate::source::chain`] that serves it ([`super::sources`]),
//! then the agent, a served VM's personalization, `CreateSandbox` and the guest network.
//! Whatever was started is in [`Started`], which [`Sandbox::create_in`] stops on failure.

use super::net::{configure_guest_network, open_char_device};
use super::sources::{CacheSource, ColdSource, TemplateSource};
use super::*;
use crate::source::{first_served, SourceKind, VmSource};

impl Sandbox {
    pub(super) async fn boot(
        id: &str,
        config: &Config,
        placement: &Placement,
        paths: &SandboxPaths,
        started: &mut Started,
    ) -> Result<Sandbox, SandboxError> {
        let h = &config.hypervisor;
        let qemu = PathBuf::from(h.effective_path(config.hypervisor_kind));
        let mut timings = BootTimings::default();
        let t = Instant::now();
        let accel =
            tracing::info_span!("accel_choose").in_scope(|| crate::accel::choose(h, &qemu))?;
        timings.accel_ms = ms(t);
        if crate::launch::guest_shape(config).debug_console {
            tracing::info!("debug console enabled (kata-runtime exec {id})");
        }
        let mut boot = Boot {
            id,
            config,
            placement,
            accel,
            paths,
            started,
            adopted_channel: None,
            host: None,
            virtiofsd_ms: 0,
        };
        let t = Instant::now();
        let (cache, template, cold) = (CacheSource, TemplateSource::of(config), ColdSource);
        let sources: Vec<&dyn VmSource<Boot>> = crate::source::chain(config)
            .into_iter()
            .map(|kind| -> &dyn VmSource<Boot> {
                match kind {
                    SourceKind::Cache => &cache,
                    SourceKind::Template => &template,
                    SourceKind::Cold => &cold,
                }
            })
            .collect();
        let source = first_served(&sources, &mut boot).await?;
        // A cached VM came with its directories and virtiofsd: the rest of the host side now.
        boot.host().await?;
        timings.virtiofsd_ms = boot.virtiofsd_ms;
        timings.qemu_ms = ms(t).saturating_sub(boot.virtiofsd_ms);
        timings.source = source;
        let Some(Host {
            spec,
            channel,
            shared_fs,
            network,
            macvtaps,
        }) = boot.host.take()
        else {
            return Err(SandboxError::Invalid(
                "the sandbox's host side is not ready".into(),
            ));
        };
        let Some(vm) = started.vm.as_ref() else {
            return Err(SandboxError::Invalid(format!(
                "the {} source served no VM",
                source.name()
            )));
        };
        if let Some(cg) = &started.cgroups {
            place_vcpus(vm, cg).await?;
        }
        let t = Instant::now();
        let agent = crate::launch::wait_for_agent(vm, &channel, config.agent.dial_timeout).await?;
        timings.agent_ms = ms(t);
        if source != SourceKind::Cold {
            let t = Instant::now();
            let span = match source {
                SourceKind::Template => tracing::info_span!("clone_personalize"),
                _ => tracing::info_span!("cache_personalize"),
            };
            let netns = match source {
                SourceKind::Cache => Some(spec.netns.as_deref().unwrap_or(Path::new(""))),
                _ => None,
            };
            personalize(vm, &agent, &spec.nics, source, netns)
                .instrument(span)
                .await?;
            timings.personalize_ms = ms(t);
        }
        drop(macvtaps);
        let t = Instant::now();
        let req = create_sandbox_request(id, config, placement, &shared_fs);
        agent
            .agent
            .create_sandbox(ctx(CALL_TIMEOUT), &req)
            .instrument(tracing::info_span!("agent_create_sandbox"))
            .await
            .map_err(agent_err("CreateSandbox"))?;
        timings.create_sandbox_ms = ms(t);
        if let Some(n) = &network {
            configure_guest_network(&agent, n)
                .instrument(tracing::info_span!("guest_network"))
                .await?;
        }
        // The kubelet's port-forward dials the pod's loopback in its network namespace.
        let relay = spec
            .netns
            .as_deref()
            .map(|ns| super::forward::start(ns, &agent));
        let Some(vm) = started.vm.take() else {
            return Err(SandboxError::Invalid("the sandbox's VM is gone".into()));
        };
        Ok(Sandbox {
            id: id.to_string(),
            config: config.clone(),
            accel,
            paths: paths.clone(),
            vm,
            virtiofsd: tokio::sync::Mutex::new(started.virtiofsd.take()),
            channel,
            network: std::sync::Mutex::new(started.network.take()),
            owned_netns: started.owned_netns.take(),
            agent,
            cgroups: started.cgroups.take(),
            vcpus: AtomicU32::new(h.default_vcpus),
            memory_mib: AtomicU32::new(h.default_memory),
            plugged: tokio::sync::Mutex::new(Plugged::new(
                kata_hypervisor::qemu::argv::virtio_mem_mib(h, h.default_memory) > 0,
            )),
            timings,
            volumes: tokio::sync::Mutex::new(super::volumes::Attached::default()),
            ledger: std::sync::Mutex::new(demand::Ledger::default()),
            resizing: tokio::sync::Mutex::new(()),
            watchers: super::watched::Watchers::default(),
            _relay: relay,
        })
    }
}

/// The agent's `CreateSandbox`: the shared filesystem to mount, the configuration's kernel
/// modules and guest hooks, and the pod's namespaces when there is no pause container.
fn create_sandbox_request(
    id: &str,
    config: &Config,
    placement: &Placement,
    shared_fs: &SharedFsDevice,
) -> CreateSandboxRequest {
    let storage = match shared_fs {
        SharedFsDevice::VirtioFs { .. } => Some(Storage {
            driver: "virtio-fs".into(),
            source: SHARED_FS_TAG.into(),
            fstype: "virtiofs".into(),
            options: vec!["nodev".into()],
            mount_point: GUEST_SHARED_DIR.into(),
            ..Default::default()
        }),
        SharedFsDevice::Virtio9p { .. } => Some(Storage {
            driver: "9p".into(),
            source: SHARED_FS_TAG.into(),
            fstype: "9p".into(),
            options: vec![
                "trans=virtio".into(),
                "version=9p2000.L".into(),
                format!("msize={}", config.hypervisor.msize_9p),
                "cache=mmap".into(),
                "nodev".into(),
            ],
            mount_point: GUEST_SHARED_DIR.into(),
            ..Default::default()
        }),
        SharedFsDevice::None => None,
    };
    let pod = placement.pod_namespaces.as_ref();
    CreateSandboxRequest {
        sandbox_id: id.to_string(),
        storages: storage.into_iter().collect(),
        kernel_modules: config.agent.kernel_modules.clone(),
        guest_hook_path: config.hypervisor.guest_hook_path.clone(),
        sandbox_pidns: pod.is_some(),
        hostname: pod.map(|p| p.hostname.clone()).unwrap_or_default(),
        sysctls: pod
            .map(|p| p.sysctls.clone().into_iter().collect())
            .unwrap_or_default(),
        ..Default::default()
    }
}

/// A sandbox being booted: what the VM sources need to know, and what was started so far.
pub(super) struct Boot<'a> {
    id: &'a str,
    pub(super) config: &'a Config,
    pub(super) placement: &'a Placement,
    pub(super) accel: Accel,
    pub(super) paths: &'a SandboxPaths,
    pub(super) started: &'a mut Started,
    /// The agent channel of a VM taken from the VMCache (its own).
    pub(super) adopted_channel: Option<AgentChannel>,
    host: Option<Host>,
    virtiofsd_ms: u64,
}

/// The host side of a sandbox, ready for its VM.
pub(super) struct Host {
    /// The QEMU launch of a VM booted (or cloned) for the sandbox: its sockets, share, agent
    /// channel, network namespace and NICs.
    pub(super) spec: LaunchSpec,
    channel: AgentChannel,
    shared_fs: SharedFsDevice,
    network: Option<PodNetwork>,
    /// Macvtaps are handed to QEMU as open descriptors of their character devices; these stay
    /// open until QEMU has them.
    macvtaps: Vec<std::fs::File>,
}

impl Boot<'_> {
    /// Prepares the host side once: the directories (a cached VM brought its own), the host
    /// cgroups (a cached VM's processes join them), the share and virtiofsd, the network
    /// namespace and the pod network, and the launch.
    pub(super) async fn host(&mut self) -> Result<&Host, SandboxError> {
        if self.host.is_none() {
            let host = self.prepare_host().await?;
            self.host = Some(host);
        }
        self.host
            .as_ref()
            .ok_or_else(|| SandboxError::Invalid("the sandbox's host side is not ready".into()))
    }

    async fn prepare_host(&mut self) -> Result<Host, SandboxError> {
        let (id, config, placement, paths) = (self.id, self.config, self.placement, self.paths);
        let h = &config.hypervisor;
        let cached = self.started.vm.is_some();
        if !cached {
            create_private_dirs(paths)?;
        }
        // Joined before virtiofsd and QEMU start, so that they start in it.
        if let Some(path) = &placement.cgroups_path {
            let cg = tracing::info_span!("host_cgroups").in_scope(|| {
                HostCgroups::setup(
                    Layout::current()?,
                    id,
                    path,
                    config.runtime.sandbox_cgroup_only,
                    &paths.vm_dir,
                )
            })?;
            let cg = self.started.cgroups.insert(std::sync::Arc::new(cg));
            if cached {
                // Taken over as if started here: they join the shim's cgroup.
                let mut pids: Vec<u32> = self.started.vm.iter().map(|vm| vm.pid).collect();
                if let Some(v) = &self.started.virtiofsd {
                    pids.push(v.pid);
                    pids.extend(v.pid().filter(|p| *p != v.pid));
                }
                cg.adopt(&pids)?;
            }
        }
        let t = Instant::now();
        let shared_fs = if cached {
            crate::launch::shared_fs_device(h, paths)?
        } else {
            let (device, virtiofsd) = crate::launch::start_share(h, paths).await?;
            self.started.virtiofsd = virtiofsd;
            device
        };
        self.virtiofsd_ms = ms(t);
        let channel = match self.adopted_channel.clone() {
            Some(c) => c,
            None => crate::launch::agent_channel(config, &paths.vm_dir)?,
        };
        let netns = match (&placement.netns, placement.new_netns) {
            (Some(ns), _) => Some(ns.clone()),
            (None, true) if config.runtime.disable_new_netns => {
                // Kata's meaning: QEMU stays in the shim's namespace ("know what you're doing").
                tracing::warn!("the container asks for a network namespace of its own, but [runtime] disable_new_netns = true keeps QEMU in the shim's: a manager that configures the task pid's namespace after Create (Docker) configures that one");
                None
            }
            (None, true) => {
                let idc = id.to_string();
                let p =
                    tokio::task::spawn_blocking(move || crate::network::create_owned_netns(&idc))
                        .await
                        .map_err(|e| {
                            SandboxError::Network(format!("namespace task failed: {e}"))
                        })??;
                self.started.owned_netns = Some(p.clone());
                Some(p)
            }
            (None, false) => None,
        };
        let network = match &netns {
            // A namespace made just now holds nothing yet: its interfaces come after Create.
            Some(_) if self.started.owned_netns.is_some() => None,
            Some(ns) if !config.runtime.disable_new_netns => {
                let (ns, model) = (ns.to_path_buf(), config.runtime.internetworking_model);
                let (rx, tx) = (h.rx_rate_limiter_max_rate, h.tx_rate_limiter_max_rate);
                let n =
                    tokio::task::spawn_blocking(move || PodNetwork::prepare(&ns, model, rx, tx))
                        .instrument(tracing::info_span!("network_setup"))
                        .await
                        .map_err(|e| SandboxError::Network(format!("setup task failed: {e}")))??;
                self.started.network = Some(n.clone());
                Some(n)
            }
            _ => None,
        };
        let vhost = !h.disable_vhost_net && Path::new("/dev/vhost-net").exists();
        let mut macvtaps = Vec::new();
        let mut nics = Vec::new();
        for e in network.iter().flat_map(|n| n.endpoints.iter()) {
            let fd = match e.macvtap_dev {
                Some(dev) => {
                    let f = open_char_device(&paths.vm_dir.join(&e.tap), dev)?;
                    let fd = std::os::fd::AsRawFd::as_raw_fd(&f);
                    macvtaps.push(f);
                    Some(fd)
                }
                None => None,
            };
            nics.push(Nic {
                tap: e.tap.clone(),
                mac: e.mac.clone(),
                vhost,
                fd,
            });
        }
        let mut spec = crate::launch::launch_spec(
            id,
            config,
            self.accel,
            &paths.vm_dir,
            channel.clone(),
            shared_fs.clone(),
        );
        spec.netns = network
            .as_ref()
            .map(|n| n.netns.clone())
            .or_else(|| self.started.owned_netns.clone());
        spec.nics = nics;
        Ok(Host {
            spec,
            channel,
            shared_fs,
            network,
            macvtaps,
        })
    }
}

/// Moves QEMU's vCPU threads to the sandbox cgroup.
pub(super) async fn place_vcpus(vm: &Vm, cg: &HostCgroups) -> Result<(), SandboxError> {
    let tids = vm.vcpu_threads().await?;
    cg.add_vcpu_threads(vm.pid, &tids)
}

/// What boot started so far (to undo on error).
#[derive(Default)]
pub(super) struct Started {
    pub(super) vm: Option<Vm>,
    pub(super) virtiofsd: Option<Virtiofsd>,
    pub(super) network: Option<PodNetwork>,
    pub(super) owned_netns: Option<PathBuf>,
    pub(super) cgroups: Option<std::sync::Arc<HostCgroups>>,
}

/// What a VM that was not booted for this sandbox needs: a clone fresh randomness (it started
/// with its template's random state); both a clone and a cached VM the time and the pod's NICs.
/// A cached VM's QEMU runs outside the pod's network namespace `netns`: its taps are opened
/// there and handed to QEMU as descriptors.
async fn personalize(
    vm: &Vm,
    agent: &AgentClient,
    nics: &[Nic],
    source: SourceKind,
    netns: Option<&Path>,
) -> Result<(), SandboxError> {
    if source == SourceKind::Template {
        reseed(agent).await?;
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    agent
        .agent
        .set_guest_date_time(
            ctx(CALL_TIMEOUT),
            &SetGuestDateTimeRequest {
                sec: now.as_secs() as i64,
                usec: i64::from(now.subsec_micros()),
                ..Default::default()
            },
        )
        .await
        .map_err(agent_err("SetGuestDateTime"))?;
    for (i, nic) in nics.iter().enumerate() {
        match (netns, nic.fd) {
            (None, _) => vm.add_nic(i, nic).await?,
            (Some(_), Some(raw)) => {
                // SAFETY: the macvtap's descriptor stays open in `boot` until this returns.
                let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(raw) };
                vm.add_nic_fd(i, nic, fd).await?
            }
            (Some(ns), None) => {
                let (ns, tap) = (ns.to_path_buf(), nic.tap.clone());
                let fd = tokio::task::spawn_blocking(move || crate::network::open_tap(&ns, &tap))
                    .await
                    .map_err(|e| SandboxError::Network(format!("tap open task failed: {e}")))??;
                use std::os::fd::AsFd;
                vm.add_nic_fd(i, nic, fd.as_fd()).await?
            }
        }
    }
    Ok(())
}

/// Gives a clone's guest fresh randomness (RNDADDENTROPY, then a CRNG reseed).
async fn reseed(agent: &AgentClient) -> Result<(), SandboxError> {
    let mut seed = vec![0u8; 64];
    {
        use std::io::Read;
        let mut f = std::fs::File::open("/dev/urandom")
            .map_err(io_err("failed to open", Path::new("/dev/urandom")))?;
        f.read_exact(&mut seed)
            .map_err(io_err("failed to read", Path::new("/dev/urandom")))?;
    }
    agent
        .agent
        .reseed_random_dev(
            ctx(CALL_TIMEOUT),
            &ReseedRandomDevRequest {
                data: seed,
                ..Default::default()
            },
        )
        .await
        .map_err(agent_err("ReseedRandomDev"))?;
    Ok(())
}
