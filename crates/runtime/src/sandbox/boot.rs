//! Where a sandbox's VM comes from: a cold boot, or a clone of the VM template (see
//! [`crate::template`]). Everything around the VM (directories, host cgroups, the share,
//! virtiofsd, the pod network) is the same for both; the shim only sees which one served it.

use super::*;

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
        let mut source = VmSource::Cold;
        let mut adopted_channel = None;
        let t = Instant::now();
        if config.factory.vm_cache_number > 0
            && placement.new_netns
            && placement.netns_by_pid
            && placement.netns.is_none()
        {
            // A cached VM's QEMU runs outside any namespace of this sandbox, and the manager
            // configures the namespace of the pid this sandbox reports: QEMU's.
            tracing::info!("VMCache not used: the manager configures the network namespace of QEMU's pid after Create; booting cold");
        } else if config.factory.vm_cache_number > 0 {
            if let Some(a) = take_cached(config, accel, paths)
                .instrument(tracing::info_span!("vmcache_take"))
                .await
            {
                started.vm = Some(a.vm);
                started.virtiofsd = a.virtiofsd;
                adopted_channel = Some(a.channel);
                source = VmSource::Cache;
            }
        }
        let taken_ms = ms(t);
        // A cached VM's directories are there already (renamed).
        if source != VmSource::Cache {
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
            let cg = started.cgroups.insert(std::sync::Arc::new(cg));
            if source == VmSource::Cache {
                // Taken over as if started here: they join the shim's cgroup.
                let mut pids: Vec<u32> = started.vm.iter().map(|vm| vm.pid).collect();
                if let Some(v) = &started.virtiofsd {
                    pids.push(v.pid);
                    pids.extend(v.pid().filter(|p| *p != v.pid));
                }
                cg.adopt(&pids)?;
            }
        }
        let shared_fs = shared_fs_device(h, paths)?;
        let t = Instant::now();
        if source != VmSource::Cache {
            if h.shared_fs != SharedFs::None {
                prepare_share(paths)?;
            }
            if let SharedFsDevice::VirtioFs { socket } = &shared_fs {
                let v = Virtiofsd::start(
                    h,
                    socket,
                    &paths.export_dir(),
                    &paths.vm_dir.join("virtiofsd.log"),
                )
                .instrument(tracing::info_span!("virtiofsd_start"))
                .await?;
                started.virtiofsd = Some(v);
            }
        }
        timings.virtiofsd_ms = ms(t);
        let channel = match adopted_channel {
            Some(c) => c,
            None => agent_channel(config, &paths.vm_dir)?,
        };
        if guest_shape(config).debug_console {
            tracing::info!("debug console enabled (kata-runtime exec {id})");
        }
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
                started.owned_netns = Some(p.clone());
                Some(p)
            }
            (None, false) => None,
        };
        let network = match &netns {
            // A namespace made just now holds nothing yet: its interfaces come after Create.
            Some(_) if started.owned_netns.is_some() => None,
            Some(ns) if !config.runtime.disable_new_netns => {
                let (ns, model) = (ns.to_path_buf(), config.runtime.internetworking_model);
                let (rx, tx) = (h.rx_rate_limiter_max_rate, h.tx_rate_limiter_max_rate);
                let n =
                    tokio::task::spawn_blocking(move || PodNetwork::prepare(&ns, model, rx, tx))
                        .instrument(tracing::info_span!("network_setup"))
                        .await
                        .map_err(|e| SandboxError::Network(format!("setup task failed: {e}")))??;
                started.network = Some(n.clone());
                Some(n)
            }
            _ => None,
        };
        let vhost = !h.disable_vhost_net && Path::new("/dev/vhost-net").exists();
        // Macvtaps are handed to QEMU as open descriptors of their character devices; these
        // stay open until QEMU has started.
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
        let mut spec = launch_spec(
            id,
            config,
            accel,
            &paths.vm_dir,
            channel.clone(),
            shared_fs.clone(),
        );
        spec.netns = network
            .as_ref()
            .map(|n| n.netns.clone())
            .or_else(|| started.owned_netns.clone());
        spec.nics = nics;
        let t = Instant::now();
        let mut vm = started.vm.take();
        if vm.is_none() && config.factory.enable_template {
            vm = clone_template(config, placement, accel, &spec, paths)
                .instrument(tracing::info_span!("template_clone"))
                .await;
            if vm.is_some() {
                source = VmSource::Template;
            }
        }
        let vm = match vm {
            Some(vm) => vm,
            None => {
                Vm::start(&qemu, h, &spec, &paths.vm_dir.join("qemu.stderr"))
                    .instrument(tracing::info_span!("qemu_start"))
                    .await?
            }
        };
        timings.qemu_ms = ms(t) + taken_ms;
        if let Some(cg) = &started.cgroups {
            if let Err(e) = place_vcpus(&vm, cg).await {
                started.vm = Some(vm);
                return Err(e);
            }
        }
        let t = Instant::now();
        let dial_timeout = config.agent.dial_timeout;
        let deadline = Instant::now() + Duration::from_secs(dial_timeout.into());
        let dial = dial_agent(&channel, deadline);
        let agent = tokio::select! {
            r = dial.instrument(tracing::info_span!("agent_connect")) => r,
            e = vm.wait_exit() => Err(SandboxError::Vm(e)),
        };
        let agent = match agent {
            Ok(a) => a,
            Err(SandboxError::AgentDial { reason }) => {
                // A dead guest resets the connection: report QEMU's exit, with the console.
                let exit = tokio::time::timeout(Duration::from_secs(2), vm.wait_exit()).await;
                if let Ok(e) = exit {
                    started.vm = Some(vm);
                    return Err(SandboxError::Vm(e));
                }
                let console = vm.console_tail(12);
                started.vm = Some(vm);
                return Err(SandboxError::AgentTimeout {
                    timeout: dial_timeout,
                    reason,
                    console,
                });
            }
            Err(e) => {
                started.vm = Some(vm);
                return Err(e);
            }
        };
        timings.agent_ms = ms(t);
        timings.source = source;
        if source != VmSource::Cold {
            let t = Instant::now();
            let span = match source {
                VmSource::Template => tracing::info_span!("clone_personalize"),
                _ => tracing::info_span!("cache_personalize"),
            };
            let netns = match source {
                VmSource::Cache => Some(spec.netns.as_deref().unwrap_or(Path::new(""))),
                _ => None,
            };
            if let Err(e) = personalize(&vm, &agent, &spec.nics, source, netns)
                .instrument(span)
                .await
            {
                started.vm = Some(vm);
                return Err(e);
            }
            timings.personalize_ms = ms(t);
        }
        drop(macvtaps);
        let t = Instant::now();
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
                    format!("msize={}", h.msize_9p),
                    "cache=mmap".into(),
                    "nodev".into(),
                ],
                mount_point: GUEST_SHARED_DIR.into(),
                ..Default::default()
            }),
            SharedFsDevice::None => None,
        };
        let req = CreateSandboxRequest {
            sandbox_id: id.to_string(),
            storages: storage.into_iter().collect(),
            kernel_modules: config.agent.kernel_modules.clone(),
            guest_hook_path: config.hypervisor.guest_hook_path.clone(),
            sandbox_pidns: placement.pod_namespaces.is_some(),
            hostname: placement
                .pod_namespaces
                .as_ref()
                .map(|p| p.hostname.clone())
                .unwrap_or_default(),
            sysctls: placement
                .pod_namespaces
                .as_ref()
                .map(|p| p.sysctls.clone().into_iter().collect())
                .unwrap_or_default(),
            ..Default::default()
        };
        let created = agent
            .agent
            .create_sandbox(ctx(CALL_TIMEOUT), &req)
            .instrument(tracing::info_span!("agent_create_sandbox"))
            .await
            .map_err(agent_err("CreateSandbox"));
        if let Err(e) = created {
            started.vm = Some(vm);
            return Err(e);
        }
        timings.create_sandbox_ms = ms(t);
        if let Some(n) = &network {
            if let Err(e) = configure_guest_network(&agent, n)
                .instrument(tracing::info_span!("guest_network"))
                .await
            {
                started.vm = Some(vm);
                return Err(e);
            }
        }
        Ok(Sandbox {
            id: id.to_string(),
            config: config.clone(),
            accel,
            paths: paths.clone(),
            vm,
            virtiofsd: tokio::sync::Mutex::new(started.virtiofsd.take()),
            channel: channel.clone(),
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
            volumes: tokio::sync::Mutex::new(crate::volumes::Attached::default()),
            ledger: std::sync::Mutex::new(demand::Ledger::default()),
            resizing: tokio::sync::Mutex::new(()),
        })
    }
}

impl Sandbox {
    /// Mirrors into the VM the interfaces a container manager put into the sandbox's own
    /// network namespace after Create (Docker moves the container's veth into
    /// `/proc/<task pid>/ns/net`, QEMU's namespace, and sets its addresses and routes before
    /// Start): taps as `[runtime].internetworking_model` says, a NIC hot-plugged per interface,
    /// and the guest's addresses and routes. Returns how many interfaces were attached. Does
    /// nothing for a sandbox whose namespace was named at Create (a CRI pod's), once the
    /// network is attached, or while the namespace holds no interface (`--network none`). On
    /// error the taps are removed again.
    pub async fn attach_late_network(&self) -> Result<usize, SandboxError> {
        let Some(ns) = self.owned_netns.clone() else {
            return Ok(0);
        };
        let attached = self
            .network
            .lock()
            .map(|n| n.as_ref().is_some_and(|n| !n.endpoints.is_empty()))
            .unwrap_or(true);
        if attached {
            return Ok(0);
        }
        let h = &self.config.hypervisor;
        let (model, rx, tx) = (
            self.config.runtime.internetworking_model,
            h.rx_rate_limiter_max_rate,
            h.tx_rate_limiter_max_rate,
        );
        let n = tokio::task::spawn_blocking(move || PodNetwork::prepare(&ns, model, rx, tx))
            .await
            .map_err(|e| SandboxError::Network(format!("setup task failed: {e}")))??;
        let count = n.endpoints.len();
        let plugged = async {
            let vhost = !h.disable_vhost_net && Path::new("/dev/vhost-net").exists();
            for (i, e) in n.endpoints.iter().enumerate() {
                let nic = Nic {
                    tap: e.tap.clone(),
                    mac: e.mac.clone(),
                    vhost,
                    fd: None,
                };
                match e.macvtap_dev {
                    Some(dev) => {
                        let f = open_char_device(&self.paths.vm_dir.join(&e.tap), dev)?;
                        use std::os::fd::AsFd;
                        self.vm.add_nic_fd(i, &nic, f.as_fd()).await?;
                    }
                    None => self.vm.add_nic(i, &nic).await?,
                }
            }
            if count > 0 {
                configure_guest_network(&self.agent, &n).await?;
            }
            Ok::<(), SandboxError>(())
        }
        .instrument(tracing::info_span!("late_network", interfaces = count))
        .await;
        if let Err(e) = plugged {
            let _ = tokio::task::spawn_blocking(move || n.teardown()).await;
            return Err(e);
        }
        if count > 0 {
            tracing::info!(
                interfaces = count,
                netns = %n.netns.display(),
                "network the manager configured after Create attached to the VM"
            );
        }
        if let Ok(mut slot) = self.network.lock() {
            *slot = Some(n);
        }
        Ok(count)
    }

    /// The sandbox's pid on the host, the one a container manager is given for every task
    /// and process of the pod (as Kata does): QEMU's. Its `/proc/<pid>/ns/net` is the
    /// sandbox's network namespace.
    pub fn host_pid(&self) -> u32 {
        self.vm.pid
    }
}

/// The agent channel of a VM whose sockets are in `vm_dir`. A template clone speaks to its
/// agent over virtio-serial: the template's port is part of the state every clone loads (a
/// vsock CID is not per clone).
pub(crate) fn agent_channel(config: &Config, vm_dir: &Path) -> Result<AgentChannel, SandboxError> {
    let serial = AgentChannel::Serial {
        socket: vm_dir.join("agent.sock"),
    };
    if config.factory.enable_template {
        return Ok(serial);
    }
    match kata_hypervisor::host::resolve_agent_channel(config.agent.channel)
        .map_err(SandboxError::Unsupported)?
    {
        "vsock" => Ok(AgentChannel::Vsock { cid: random_cid() }),
        _ => Ok(serial),
    }
}

/// Connects to the agent over `channel`, waiting until it answers or `deadline` passes.
pub(crate) async fn dial_agent(
    channel: &AgentChannel,
    deadline: Instant,
) -> Result<AgentClient, SandboxError> {
    match channel {
        AgentChannel::Serial { socket } => AgentClient::dial_serial(socket, deadline).await,
        AgentChannel::Vsock { cid } => {
            AgentClient::dial_vsock(*cid, kata_protocols::VSOCK_PORT, deadline).await
        }
    }
}

/// The shared filesystem device of a VM whose share is `paths` (virtiofsd's socket in
/// `vm_dir`, or the 9p export).
pub(crate) fn shared_fs_device(
    h: &kata_config::hypervisor::HypervisorConfig,
    paths: &SandboxPaths,
) -> Result<SharedFsDevice, SandboxError> {
    Ok(match h.shared_fs {
        SharedFs::VirtioFs => SharedFsDevice::VirtioFs {
            socket: paths.vm_dir.join(VIRTIOFSD_SOCKET),
        },
        SharedFs::Virtio9p => SharedFsDevice::Virtio9p {
            dir: paths.export_dir(),
        },
        SharedFs::None => SharedFsDevice::None,
        SharedFs::VirtioFsNydus => {
            return Err(SandboxError::Unsupported(
                "shared_fs = \"virtio-fs-nydus\" is not supported yet; use virtio-fs or virtio-9p"
                    .into(),
            ))
        }
    })
}

/// virtiofsd's socket in a sandbox's VM directory.
pub(crate) const VIRTIOFSD_SOCKET: &str = "vfsd.sock";

/// Moves QEMU's vCPU threads to the sandbox cgroup.
pub(super) async fn place_vcpus(vm: &Vm, cg: &HostCgroups) -> Result<(), SandboxError> {
    let tids = vm.vcpu_threads().await?;
    cg.add_vcpu_threads(vm.pid, &tids)
}

/// Gives the guest the pod's interfaces (by MAC), addresses and routes.
async fn configure_guest_network(agent: &AgentClient, n: &PodNetwork) -> Result<(), SandboxError> {
    for e in &n.endpoints {
        let req = UpdateInterfaceRequest {
            interface: protobuf::MessageField::some(Interface {
                name: e.name.clone(),
                hw_addr: e.mac.clone(),
                mtu: e.mtu,
                addresses: e
                    .addresses
                    .iter()
                    .map(|(a, p)| IPAddress {
                        address: a.clone(),
                        prefix: *p,
                        ipv6: a.contains(':'),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            }),
            ..Default::default()
        };
        agent
            .agent
            .update_interface(ctx(CALL_TIMEOUT), &req)
            .await
            .map_err(agent_err("UpdateInterface"))?;
    }
    // Connected routes first (the kernel made them with the addresses), then via gateways.
    let mut routes: Vec<&crate::network::Route> = n.routes.iter().collect();
    routes.sort_by_key(|r| !r.gateway.is_empty());
    let req = UpdateRoutesRequest {
        routes: routes
            .into_iter()
            .map(|r| Route {
                dest: r.dest.clone(),
                gateway: r.gateway.clone(),
                device: r.device.clone(),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    agent
        .agent
        .update_routes(ctx(CALL_TIMEOUT), &req)
        .await
        .map_err(agent_err("UpdateRoutes"))?;
    Ok(())
}

/// Makes a character device node `path` for (major, minor) and opens it read-write.
fn open_char_device(
    path: &Path,
    (major, minor): (u32, u32),
) -> Result<std::fs::File, SandboxError> {
    use nix::sys::stat::{makedev, mknod, Mode, SFlag};
    let _ = std::fs::remove_file(path);
    mknod(
        path,
        SFlag::S_IFCHR,
        Mode::from_bits_truncate(0o600),
        makedev(u64::from(major), u64::from(minor)),
    )
    .map_err(|e| {
        SandboxError::Network(format!("mknod {} ({major}:{minor}): {e}", path.display()))
    })?;
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(io_err("failed to open macvtap device", path))
}

/// A random guest vsock CID (3 and up; 0-2 are reserved).
pub(crate) fn random_cid() -> u32 {
    let mut b = [0u8; 4];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        use std::io::Read;
        let _ = f.read_exact(&mut b);
    }
    3 + u32::from_le_bytes(b) % (u32::MAX - 4)
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

/// Which source served a sandbox's VM.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum VmSource {
    /// Booted for this sandbox.
    #[default]
    Cold,
    /// Cloned from the VM template (`[factory] enable_template`).
    Template,
    /// Taken over from the VMCache server (`[factory] vm_cache_number`).
    Cache,
}

impl VmSource {
    /// Name in logs and metrics: `cold`, `template`.
    pub fn name(self) -> &'static str {
        match self {
            VmSource::Cold => "cold",
            VmSource::Template => "template",
            VmSource::Cache => "cache",
        }
    }
}

/// What the configuration adds to the guest's kernel command line (agent options).
#[derive(Debug, Clone)]
pub struct GuestShape {
    /// Kernel parameters for the agent.
    pub extra_kernel_params: Vec<String>,
    /// The agent serves its debug console (`debug_console_enabled`, or Kata's kernel parameter
    /// set by hand).
    pub debug_console: bool,
}

/// The agent options `config` puts on the guest's kernel command line.
pub fn guest_shape(config: &Config) -> GuestShape {
    let mut extra = Vec::new();
    if config.agent.enable_debug {
        extra.push("agent.log=debug".to_string());
    }
    let debug_console = config.agent.debug_console_enabled
        || config
            .hypervisor
            .kernel_params
            .split_whitespace()
            .any(|w| w == "agent.debug_console");
    if config.agent.debug_console_enabled {
        extra.push("agent.debug_console".to_string());
        extra.push(format!(
            "agent.debug_console_vport={}",
            kata_protocols::console::DEBUG_CONSOLE_VPORT
        ));
    }
    GuestShape {
        extra_kernel_params: extra,
        debug_console,
    }
}

/// The QEMU launch of VM `id` whose sockets and logs are in `dir`, without network: the same
/// for a cold boot, the VM template and its clones (a clone must have the template's devices).
pub fn launch_spec(
    id: &str,
    config: &Config,
    accel: Accel,
    dir: &Path,
    channel: AgentChannel,
    shared_fs: SharedFsDevice,
) -> LaunchSpec {
    let h = &config.hypervisor;
    let shape = guest_shape(config);
    let debug_console = match (&channel, shape.debug_console) {
        (AgentChannel::Serial { .. }, true) => Some(dir.join(DEBUG_CONSOLE_SOCKET)),
        _ => None,
    };
    LaunchSpec {
        id: id.to_string(),
        accel,
        channel,
        shared_fs,
        qmp_socket: dir.join("qmp.sock"),
        console_log: dir.join("console.log"),
        pid_file: dir.join("pid"),
        vcpus: h.default_vcpus,
        memory_mib: h.default_memory,
        extra_kernel_params: shape.extra_kernel_params,
        debug_console,
        netns: None,
        nics: Vec::new(),
        image_size: 0,
        memory_file: None,
        incoming: false,
    }
}

/// A VM cloned from the template, paused-then-running, or None (with the reason logged) when
/// the sandbox must boot cold: templating cannot serve it, or the clone failed. Never fails the
/// sandbox: whatever the template's state, a cold boot follows.
async fn clone_template(
    config: &Config,
    placement: &Placement,
    accel: Accel,
    cold: &LaunchSpec,
    paths: &SandboxPaths,
) -> Option<Vm> {
    if cold.nics.iter().any(|n| n.fd.is_some()) {
        tracing::warn!("VM template not used: the pod's network uses macvtap, whose descriptors cannot be hot-plugged into a clone; booting cold");
        return None;
    }
    let template = crate::template::Template::of(config);
    // The template is made from the configuration files (no pod annotations, no static
    // resources); a pod whose settings differ from them boots cold.
    let base = placement.template_config.as_ref().unwrap_or(config);
    match template.ensure(base, accel).await {
        Ok(Some(c)) => {
            tracing::info!(ms = c.ms, tmpfs_mib = c.tmpfs_mib, path = %template.dir.display(), "VM template created")
        }
        Ok(None) => {}
        Err(e) => {
            tracing::warn!(error = %kata_config::error_chain(&e), "VM template unavailable; booting cold");
            return None;
        }
    }
    let lease = match template.lease(config, accel).await {
        Ok(Some(l)) => l,
        Ok(None) => {
            tracing::info!("this pod's VM settings (annotations or static resources) differ from the template's; booting cold");
            return None;
        }
        Err(e) => {
            tracing::warn!(error = %kata_config::error_chain(&e), "VM template unavailable; booting cold");
            return None;
        }
    };
    let mut spec = cold.clone();
    spec.nics = Vec::new();
    spec.memory_file = Some(kata_hypervisor::qemu::argv::MemoryFile {
        path: lease.memory.clone(),
        shared: false,
    });
    spec.incoming = true;
    let h = &config.hypervisor;
    let qemu = PathBuf::from(h.effective_path(config.hypervisor_kind));
    let vm = match Vm::start(&qemu, h, &spec, &paths.vm_dir.join("qemu.stderr")).await {
        Ok(vm) => vm,
        Err(e) => {
            tracing::warn!(error = %kata_config::error_chain(&e), "cloning the VM template failed; booting cold");
            return None;
        }
    };
    let restored = vm
        .restore_state(&lease.state, &paths.vm_dir.join("migrate.sock"))
        .await;
    drop(lease);
    match restored {
        Ok(()) => Some(vm),
        Err(e) => {
            tracing::warn!(error = %kata_config::error_chain(&e), "cloning the VM template failed; booting cold (the next sandbox rebuilds the template)");
            template.invalidate().await;
            vm.stop(Duration::from_millis(200)).await;
            // The cold boot reuses the same sockets and logs.
            for f in ["qmp.sock", "agent.sock", "pid", DEBUG_CONSOLE_SOCKET] {
                let _ = std::fs::remove_file(paths.vm_dir.join(f));
            }
            None
        }
    }
}

/// A VM taken over from the VMCache server.
struct Adopted {
    vm: Vm,
    virtiofsd: Option<Virtiofsd>,
    channel: AgentChannel,
}

/// Takes a VM from the VMCache server and makes it this sandbox's: its directories are renamed
/// to the sandbox's (`paths`; its sockets keep working), its QEMU and virtiofsd are watched
/// through process descriptors. None (with the reason logged) when the sandbox must boot its
/// own VM: the server is gone or empty, the pod's VM settings differ from the cache's, or the
/// take-over failed (the VM is then stopped). Never fails the sandbox.
async fn take_cached(config: &Config, accel: Accel, paths: &SandboxPaths) -> Option<Adopted> {
    let endpoint = Path::new(&config.factory.vm_cache_endpoint);
    let identity = crate::template::identity(config, accel);
    let taken = match crate::vmcache::take(endpoint, &identity).await {
        Ok(t) => t,
        Err(miss) => {
            if miss.server_gone {
                tracing::warn!(endpoint = %endpoint.display(), reason = %miss.reason, "VMCache server unreachable; booting cold");
                let reaped = tokio::task::spawn_blocking(crate::vmcache::reap_orphans)
                    .await
                    .unwrap_or_default();
                if !reaped.is_empty() {
                    tracing::warn!(vms = ?reaped, "stopped the VMs a dead VMCache server left");
                }
            } else {
                tracing::info!(reason = %miss.reason, "no VM from the VMCache; booting cold");
            }
            return None;
        }
    };
    let from = SandboxPaths::for_id(&taken.id);
    let give_up = |what: String| {
        tracing::warn!(vm = %taken.id, "{what}; booting cold");
        // Whichever name its directories have now, the VM is stopped and they are removed.
        cleanup_stale(&taken.id);
        if paths.vm_dir.join(ADOPTED_FROM).exists() {
            cleanup_stale(
                paths
                    .vm_dir
                    .file_name()
                    .and_then(|n| n.to_str())
                    .unwrap_or(""),
            );
        }
    };
    if let Err(e) = std::fs::rename(&from.vm_dir, &paths.vm_dir) {
        give_up(format!(
            "cannot take over the cached VM's directory {}: {e}",
            from.vm_dir.display()
        ));
        return None;
    }
    let _ = std::fs::write(paths.vm_dir.join(ADOPTED_FROM), &taken.id);
    if from.shared_dir.exists() {
        if let Err(e) = std::fs::rename(&from.shared_dir, &paths.shared_dir) {
            give_up(format!(
                "cannot take over the cached VM's share {}: {e}",
                from.shared_dir.display()
            ));
            return None;
        }
    }
    let h = &config.hypervisor;
    let vm = Vm::adopt(
        taken.qemu_pid,
        h,
        &taken.id,
        &paths.vm_dir.join("qmp.sock"),
        &paths.vm_dir.join("console.log"),
        &paths.vm_dir.join("qemu.stderr"),
    )
    .await;
    let vm = match vm {
        Ok(vm) => vm,
        Err(e) => {
            give_up(format!("cannot take over the cached VM: {e}"));
            return None;
        }
    };
    let virtiofsd = match taken.virtiofsd_pid {
        Some(pid) => match Virtiofsd::adopt(pid, &from.vm_dir.join(VIRTIOFSD_SOCKET)) {
            Ok(v) => Some(v),
            Err(e) => {
                vm.kill();
                give_up(format!("cannot take over the cached VM's virtiofsd: {e}"));
                return None;
            }
        },
        None => None,
    };
    let channel = match taken.agent_url.strip_prefix("vsock://") {
        Some(rest) => match rest.split(':').next().and_then(|c| c.parse().ok()) {
            Some(cid) => AgentChannel::Vsock { cid },
            None => {
                vm.kill();
                give_up(format!(
                    "the cache's agent address {} is not valid",
                    taken.agent_url
                ));
                return None;
            }
        },
        None => AgentChannel::Serial {
            socket: paths.vm_dir.join("agent.sock"),
        },
    };
    tracing::info!(vm = %taken.id, qemu = taken.qemu_pid, "took a VM from the VMCache");
    Some(Adopted {
        vm,
        virtiofsd,
        channel,
    })
}

/// Written in a sandbox's VM directory when its VM came from the VMCache: the VM's id there
/// (QEMU's `-name` and virtiofsd's socket path still carry it).
pub const ADOPTED_FROM: &str = "adopted-from";

/// What a VM that was not booted for this sandbox needs: a clone fresh randomness (it started
/// with its template's random state); both a clone and a cached VM the time and the pod's NICs.
/// A cached VM's QEMU runs outside the pod's network namespace `netns`: its taps are opened
/// there and handed to QEMU as descriptors.
async fn personalize(
    vm: &Vm,
    agent: &AgentClient,
    nics: &[Nic],
    source: VmSource,
    netns: Option<&Path>,
) -> Result<(), SandboxError> {
    if source == VmSource::Template {
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
