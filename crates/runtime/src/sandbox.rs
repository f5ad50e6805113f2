//! A sandbox: one VM with its agent. Every error path stops what was started and removes the
//! sandbox's state directories.

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use kata_config::hypervisor::SharedFs;
use kata_config::Config;
use kata_hypervisor::probe::Accel;
use kata_hypervisor::qemu::argv::{AgentChannel, LaunchSpec, Nic, SharedFsDevice, SHARED_FS_TAG};
use kata_hypervisor::qemu::vm::Vm;
use kata_hypervisor::virtiofsd::Virtiofsd;
use kata_protocols::agent::*;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use oci_spec::runtime::{Process, Spec};
use tracing::Instrument;

use crate::agent::{agent_err, ctx, AgentClient, CALL_TIMEOUT};
use crate::cgroups::{CpuLimit, HostCgroups, Layout};
use crate::error::SandboxError;
use crate::network::PodNetwork;

/// Where the agent mounts the shared filesystem in the guest.
pub const GUEST_SHARED_DIR: &str = "/run/kata-containers/shared/containers";
/// Host directory of VM files (sockets, logs) per sandbox.
pub const VM_STATE_ROOT: &str = "/run/vc/vm";
/// Host directory shared with each sandbox's guest.
pub const SHARED_ROOT: &str = "/run/kata-containers/shared/sandboxes";
/// Memory hot-plug granularity (x86 memory block size).
pub const MEMORY_BLOCK_MIB: u32 = 128;
/// How long the guest has to bring hot-plugged vCPUs and memory online.
const HOTPLUG_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the guest has to give back an unplugged vCPU or memory.
const UNPLUG_TIMEOUT: Duration = Duration::from_secs(10);

/// What is hot-plugged on top of the boot size.
#[derive(Debug, Default)]
struct Plugged {
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
    fn memory_mib(&self) -> u32 {
        self.virtio_mem_mib + self.dimms.iter().map(|d| d.mib).sum::<u32>()
    }
}
/// The debug console's socket in a sandbox's VM directory (beside the agent's `agent.sock`),
/// with the virtio-serial agent channel.
pub const DEBUG_CONSOLE_SOCKET: &str = "debug-console.sock";

/// A sandbox's host directories.
#[derive(Debug, Clone)]
pub struct SandboxPaths {
    /// VM sockets and logs.
    pub vm_dir: PathBuf,
    /// The sandbox's share: `mounts/` and `shared/` (see [`SandboxPaths::mounts_dir`]).
    pub shared_dir: PathBuf,
}

impl SandboxPaths {
    /// The standard locations for sandbox `id`.
    pub fn for_id(id: &str) -> Self {
        SandboxPaths {
            vm_dir: Path::new(VM_STATE_ROOT).join(id),
            shared_dir: Path::new(SHARED_ROOT).join(id),
        }
    }

    /// Where the runtime bind-mounts what it shares (root filesystems, volumes): writable by
    /// the host only, a shared mount so that every bind propagates to [`Self::export_dir`].
    pub fn mounts_dir(&self) -> PathBuf {
        self.shared_dir.join("mounts")
    }

    /// What the guest sees (virtiofsd's or 9p's export): a read-only view of `mounts/` (a slave
    /// of it), so the guest cannot create or replace anything at the top of its share; the
    /// binds inside keep their own modes (a root filesystem stays writable).
    pub fn export_dir(&self) -> PathBuf {
        self.shared_dir.join("shared")
    }
}

/// Makes `mounts/` (host-writable, shared) and `shared/` (its read-only slave view, exported).
fn prepare_share(paths: &SandboxPaths) -> Result<(), SandboxError> {
    let (mounts, export) = (paths.mounts_dir(), paths.export_dir());
    for d in [&mounts, &export] {
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(d)
            .map_err(io_err("failed to create", d))?;
    }
    let m = |src: Option<&Path>, target: &Path, flags: MsFlags| {
        mount(src, target, None::<&str>, flags, None::<&str>).map_err(|errno| SandboxError::Mount {
            source_path: src.map(|p| p.display().to_string()).unwrap_or_default(),
            target: target.display().to_string(),
            errno,
        })
    };
    m(Some(&mounts), &mounts, MsFlags::MS_BIND)?;
    m(None, &mounts, MsFlags::MS_SHARED)?;
    m(Some(&mounts), &export, MsFlags::MS_BIND | MsFlags::MS_REC)?;
    m(
        None,
        &export,
        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
    )?;
    // A slave receives the binds made in mounts/; shared again so that virtiofsd's own mount
    // namespace (a slave of it) receives them too.
    m(None, &export, MsFlags::MS_SLAVE)?;
    m(None, &export, MsFlags::MS_SHARED)?;
    Ok(())
}

/// Where on the host a sandbox runs.
#[derive(Debug, Clone, Default)]
pub struct Placement {
    /// The pod's network namespace, whose interfaces are mirrored into the VM (as
    /// `[runtime].internetworking_model` says). None: the VM gets no network.
    pub netns: Option<PathBuf>,
    /// The sandbox container's `linux.cgroupsPath`. Some: the sandbox's host cgroups are made
    /// as `[runtime].sandbox_cgroup_only` says, and the calling process (the shim) joins them.
    /// None: everything stays in the caller's cgroups.
    pub cgroups_path: Option<String>,
}

/// How long each boot phase took.
#[derive(Debug, Clone, Copy, Default)]
pub struct BootTimings {
    /// Accelerator choice.
    pub accel_ms: u64,
    /// virtiofsd start.
    pub virtiofsd_ms: u64,
    /// QEMU spawn until QMP answers.
    pub qemu_ms: u64,
    /// QMP until the agent answers.
    pub agent_ms: u64,
    /// CreateSandbox.
    pub create_sandbox_ms: u64,
}

/// A running sandbox.
#[derive(Debug)]
pub struct Sandbox {
    /// Id.
    pub id: String,
    /// Effective configuration.
    pub config: Config,
    /// Accelerator in use.
    pub accel: Accel,
    /// Directories.
    pub paths: SandboxPaths,
    /// The VM.
    pub vm: Vm,
    virtiofsd: tokio::sync::Mutex<Option<Virtiofsd>>,
    /// The agent channel.
    channel: AgentChannel,
    /// The pod network mirrored into the VM.
    pub network: Option<PodNetwork>,
    /// The agent.
    pub agent: AgentClient,
    /// The host cgroups, when the sandbox manages them.
    pub cgroups: Option<std::sync::Arc<HostCgroups>>,
    vcpus: AtomicU32,
    memory_mib: AtomicU32,
    plugged: tokio::sync::Mutex<Plugged>,
    /// Boot timings.
    pub timings: BootTimings,
    /// Direct volumes hot-plugged into the VM (see [`crate::volumes`]).
    pub(crate) volumes: tokio::sync::Mutex<crate::volumes::Attached>,
}

fn ms(since: Instant) -> u64 {
    since.elapsed().as_millis() as u64
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl Fn(std::io::Error) -> SandboxError + 'a {
    move |source| SandboxError::Io {
        what,
        path: path.display().to_string(),
        source,
    }
}

/// Where every shim serves its monitor socket (Kata 3.0's Go runtime layout).
pub const MONITOR_DIR: &str = "/run/vc/sbs";

/// The monitor socket of sandbox `id`'s shim: `/run/vc/sbs/<id>/shim-monitor.sock`.
pub fn monitor_socket(id: &str) -> PathBuf {
    Path::new(MONITOR_DIR).join(id).join("shim-monitor.sock")
}

/// Removes a sandbox's directories, unmounting anything left inside the shared directory.
pub fn cleanup_paths(paths: &SandboxPaths) {
    unmount_under(&paths.shared_dir);
    let _ = std::fs::remove_dir_all(&paths.shared_dir);
    let _ = std::fs::remove_dir_all(&paths.vm_dir);
}

/// Kills what a previous, crashed instance of sandbox `id` left (QEMU by its pid file; virtiofsd
/// exits with it) and removes its directories. Returns true when something was there.
pub fn cleanup_stale(id: &str) -> bool {
    if !crate::ids::is_valid(id) {
        return false;
    }
    let paths = SandboxPaths::for_id(id);
    let existed = paths.vm_dir.exists() || paths.shared_dir.exists();
    if let Some(pid) = std::fs::read_to_string(paths.vm_dir.join("pid"))
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok())
    {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains(&format!("sandbox-{id}")) {
            // SAFETY: plain kill(2) of the QEMU this sandbox started.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            for _ in 0..100 {
                if !Path::new(&format!("/proc/{pid}")).exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline)
            .contains(&paths.vm_dir.join("vfsd.sock").display().to_string())
        {
            if let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() {
                // SAFETY: plain kill(2) of this sandbox's virtiofsd.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
    crate::cgroups::remove_recorded(&paths.vm_dir);
    cleanup_paths(&paths);
    existed
}

/// Unmounts every mount at or below `dir` (deepest first).
pub fn unmount_under(dir: &Path) {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut targets: Vec<PathBuf> = mounts
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .map(|p| PathBuf::from(p.replace("\\040", " ")))
        .filter(|p| p.starts_with(dir))
        .collect();
    targets.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for t in targets {
        let _ = umount2(&t, MntFlags::MNT_DETACH);
    }
}

impl Sandbox {
    /// Boots the VM, connects to the agent and prepares the guest.
    pub async fn create(id: &str, config: &Config) -> Result<Sandbox, SandboxError> {
        Self::create_in(id, config, &Placement::default()).await
    }

    /// Like [`Sandbox::create`], in the pod network namespace and host cgroups `placement` names.
    pub async fn create_in(
        id: &str,
        config: &Config,
        placement: &Placement,
    ) -> Result<Sandbox, SandboxError> {
        crate::ids::check("sandbox", id)?;
        let kind = config.hypervisor_kind;
        if !kind.is_supported() {
            return Err(SandboxError::Unsupported(format!(
                "hypervisor {kind} is not supported by this runtime; use configuration-qemu.toml"
            )));
        }
        let paths = SandboxPaths::for_id(id);
        if paths.vm_dir.exists() || paths.shared_dir.exists() {
            return Err(SandboxError::Invalid(format!(
                "sandbox {id} already exists ({} is present); delete it first (containerd-shim-kata-v2 delete)",
                paths.vm_dir.display()
            )));
        }
        let mut started = Started::default();
        match Self::boot(id, config, placement, &paths, &mut started).await {
            Ok(sb) => Ok(sb),
            Err(e) => {
                if let Some(vm) = started.vm.take() {
                    vm.stop(Duration::from_millis(200)).await;
                }
                if let Some(v) = started.virtiofsd.take() {
                    v.stop().await;
                }
                if let Some(n) = started.network.take() {
                    let _ = tokio::task::spawn_blocking(move || n.teardown()).await;
                }
                if let Some(cg) = started.cgroups.take() {
                    let _ = tokio::task::spawn_blocking(move || cg.remove()).await;
                }
                cleanup_paths(&paths);
                Err(e)
            }
        }
    }

    async fn boot(
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
        for dir in [&paths.vm_dir, &paths.shared_dir] {
            // Only root may enter a sandbox's state: sockets, console log, the shared tree.
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(io_err("failed to create", dir))?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                .map_err(io_err("failed to set the mode of", dir))?;
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
            started.cgroups = Some(std::sync::Arc::new(cg));
        }
        if h.shared_fs != SharedFs::None {
            prepare_share(paths)?;
        }
        let t = Instant::now();
        let shared_fs = match h.shared_fs {
            SharedFs::VirtioFs => {
                let socket = paths.vm_dir.join("vfsd.sock");
                let v = Virtiofsd::start(
                    h,
                    &socket,
                    &paths.export_dir(),
                    &paths.vm_dir.join("virtiofsd.log"),
                )
                .instrument(tracing::info_span!("virtiofsd_start"))
                .await?;
                started.virtiofsd = Some(v);
                SharedFsDevice::VirtioFs { socket }
            }
            SharedFs::Virtio9p => SharedFsDevice::Virtio9p {
                dir: paths.export_dir(),
            },
            SharedFs::None => SharedFsDevice::None,
            SharedFs::VirtioFsNydus => return Err(SandboxError::Unsupported(
                "shared_fs = \"virtio-fs-nydus\" is not supported yet; use virtio-fs or virtio-9p"
                    .into(),
            )),
        };
        timings.virtiofsd_ms = ms(t);
        let channel = match kata_hypervisor::host::resolve_agent_channel(config.agent.channel)
            .map_err(SandboxError::Unsupported)?
        {
            "vsock" => AgentChannel::Vsock { cid: random_cid() },
            _ => AgentChannel::Serial {
                socket: paths.vm_dir.join("agent.sock"),
            },
        };
        let mut extra = Vec::new();
        if config.agent.enable_debug {
            extra.push("agent.log=debug".to_string());
        }
        // The debug console: `debug_console_enabled`, or Kata's kernel parameter set by hand.
        let debug_console = config.agent.debug_console_enabled
            || h.kernel_params
                .split_whitespace()
                .any(|w| w == "agent.debug_console");
        if config.agent.debug_console_enabled {
            extra.push("agent.debug_console".to_string());
            extra.push(format!(
                "agent.debug_console_vport={}",
                kata_protocols::console::DEBUG_CONSOLE_VPORT
            ));
        }
        if debug_console {
            tracing::info!("debug console enabled (kata-runtime exec {id})");
        }
        let debug_console_socket = match (&channel, debug_console) {
            (AgentChannel::Serial { .. }, true) => Some(paths.vm_dir.join(DEBUG_CONSOLE_SOCKET)),
            _ => None,
        };
        let network = match &placement.netns {
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
        let spec = LaunchSpec {
            id: id.to_string(),
            accel,
            channel: channel.clone(),
            shared_fs: shared_fs.clone(),
            qmp_socket: paths.vm_dir.join("qmp.sock"),
            console_log: paths.vm_dir.join("console.log"),
            pid_file: paths.vm_dir.join("pid"),
            vcpus: h.default_vcpus,
            memory_mib: h.default_memory,
            extra_kernel_params: extra,
            debug_console: debug_console_socket,
            netns: network.as_ref().map(|n| n.netns.clone()),
            nics,
            image_size: 0,
        };
        let t = Instant::now();
        let vm = Vm::start(&qemu, h, &spec, &paths.vm_dir.join("qemu.stderr"))
            .instrument(tracing::info_span!("qemu_start"))
            .await?;
        timings.qemu_ms = ms(t);
        drop(macvtaps);
        if let Some(cg) = &started.cgroups {
            if let Err(e) = place_vcpus(&vm, cg).await {
                started.vm = Some(vm);
                return Err(e);
            }
        }
        let t = Instant::now();
        let dial_timeout = config.agent.dial_timeout;
        let deadline = Instant::now() + Duration::from_secs(dial_timeout.into());
        let dial = async {
            match &channel {
                AgentChannel::Serial { socket } => AgentClient::dial_serial(socket, deadline).await,
                AgentChannel::Vsock { cid } => {
                    AgentClient::dial_vsock(*cid, kata_protocols::VSOCK_PORT, deadline).await
                }
            }
        };
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
            network: started.network.take(),
            agent,
            cgroups: started.cgroups.take(),
            vcpus: AtomicU32::new(h.default_vcpus),
            memory_mib: AtomicU32::new(h.default_memory),
            plugged: tokio::sync::Mutex::new(Plugged {
                virtio_mem: kata_hypervisor::qemu::argv::virtio_mem_mib(h, h.default_memory) > 0,
                ..Plugged::default()
            }),
            timings,
            volumes: tokio::sync::Mutex::new(crate::volumes::Attached::default()),
        })
    }

    /// How the host reaches the agent: `vsock://<cid>:<port>` over kernel vsock, or
    /// `unix://<socket>` for the unix socket QEMU bridges to the agent's virtio-serial port.
    pub fn agent_url(&self) -> String {
        match &self.channel {
            AgentChannel::Vsock { cid } => format!("vsock://{cid}:{}", kata_protocols::VSOCK_PORT),
            AgentChannel::Serial { socket } => format!("unix://{}", socket.display()),
        }
    }

    /// virtiofsd's pid, when the sandbox runs one (never waits: `None` while it is being
    /// stopped).
    pub fn virtiofsd_pid(&self) -> Option<u32> {
        self.virtiofsd
            .try_lock()
            .ok()
            .and_then(|v| v.as_ref().and_then(|v| v.pid()))
    }

    /// The agent's metrics (Prometheus text).
    pub async fn agent_metrics(&self, timeout: Duration) -> Result<String, SandboxError> {
        let req = kata_protocols::agent::GetMetricsRequest::new();
        Ok(self
            .agent
            .agent
            .get_metrics(ctx(timeout), &req)
            .await
            .map_err(agent_err("GetMetrics"))?
            .metrics)
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
        let have = plugged.cpus.len() as u32;
        let mut grew_cpus = false;
        if vcpus > have {
            let added = self.vm.add_vcpus(vcpus - have).await?;
            plugged.cpus.extend(added);
            grew_cpus = true;
        } else if vcpus < have && self.accel == Accel::Tcg {
            // QEMU 7.2 under TCG frees a vCPU's state twice when a CPU is plugged again after an
            // unplug ("double free or corruption", QEMU dies): under emulation the vCPUs stay
            // plugged until the sandbox stops, and later containers reuse them (the VM never
            // holds more than its largest demand). KVM unplugs them.
            tracing::debug!(
                plugged = have,
                wanted = vcpus,
                "vCPUs are not unplugged under TCG (QEMU cannot plug one again)"
            );
        } else if vcpus < have {
            let extra = plugged.cpus.split_off(vcpus as usize);
            let removed = self.vm.remove_vcpus(&extra, UNPLUG_TIMEOUT).await?;
            let kept: Vec<String> = extra.into_iter().filter(|c| !removed.contains(c)).collect();
            if !kept.is_empty() {
                tracing::warn!(?kept, "the guest kept hot-plugged vCPUs");
            }
            plugged.cpus.extend(kept);
        }
        self.vcpus.store(
            h.default_vcpus + plugged.cpus.len() as u32,
            Ordering::Relaxed,
        );
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

    /// Shares a host root filesystem directory with the guest; returns its guest path.
    pub fn share_rootfs(
        &self,
        container_id: &str,
        host_rootfs: &Path,
    ) -> Result<PathBuf, SandboxError> {
        crate::ids::check("container", container_id)?;
        let rel = Path::new(container_id).join("rootfs");
        self.bind_into_share(&rel, host_rootfs, &["rbind".to_string()])?;
        Ok(Path::new(GUEST_SHARED_DIR).join(rel))
    }

    /// Bind-mounts `source` at `rel` inside `mounts/` (made below descriptors, never through a
    /// symlink) with OCI `options` (`ro` read-only at its top, `rro` everywhere, before it is
    /// attached; an option a bind cannot honour is an error).
    fn bind_into_share(
        &self,
        rel: &Path,
        source: &Path,
        options: &[String],
    ) -> Result<(), SandboxError> {
        let mounts = self.paths.mounts_dir();
        let fail = |reason: String| SandboxError::Share {
            source_path: source.display().to_string(),
            target: mounts.join(rel).display().to_string(),
            reason,
        };
        let mut opts = kata_mount::parse(options, true).map_err(fail)?;
        // Propagation is the container's business (applied in the guest); here the bind must
        // propagate to the export and virtiofsd.
        opts.propagation = MsFlags::empty();
        let kind = if source.is_dir() {
            kata_mount::Kind::Dir
        } else {
            kata_mount::Kind::File
        };
        let root = kata_mount::open_dir(&mounts).map_err(|e| fail(e.to_string()))?;
        use std::os::fd::AsFd;
        let target = kata_mount::create_in_root(root.as_fd(), rel, kind).map_err(fail)?;
        kata_mount::bind(source, target.as_fd(), &opts).map_err(fail)
    }

    /// Removes what [`Sandbox::share_rootfs`] and [`Sandbox::share_mount`] set up.
    pub fn unshare(&self, container_id: &str) {
        if !crate::ids::is_valid(container_id) {
            return;
        }
        let dir = self.paths.mounts_dir().join(container_id);
        unmount_under(&dir);
        unmount_under(&self.paths.export_dir().join(container_id));
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Creates a container from a host root filesystem and an OCI spec. Returns its pid.
    pub async fn create_container(
        &self,
        container_id: &str,
        mut spec: Spec,
        host_rootfs: &Path,
        storages: Vec<Storage>,
    ) -> Result<u32, SandboxError> {
        let guest_root = self.share_rootfs(container_id, host_rootfs)?;
        let mut root = spec.root().clone().unwrap_or_default();
        root.set_path(guest_root);
        spec.set_root(Some(root));
        let json = serde_json::to_vec(&spec)
            .map_err(|e| SandboxError::Invalid(format!("encode OCI spec: {e}")))?;
        let req = CreateContainerRequest {
            container_id: container_id.to_string(),
            oci_spec_json: json,
            storages,
            ..Default::default()
        };
        match self
            .agent
            .agent
            .create_container(ctx(CALL_TIMEOUT), &req)
            .await
        {
            Ok(r) => Ok(r.pid),
            Err(e) => {
                self.unshare(container_id);
                self.release_volumes(container_id).await;
                Err(agent_err("CreateContainer")(e))
            }
        }
    }

    /// Starts a created container.
    pub async fn start_container(&self, container_id: &str) -> Result<(), SandboxError> {
        let req = StartContainerRequest {
            container_id: container_id.to_string(),
            ..Default::default()
        };
        self.agent
            .agent
            .start_container(ctx(CALL_TIMEOUT), &req)
            .await
            .map_err(agent_err("StartContainer"))?;
        Ok(())
    }

    /// Runs another process in a container.
    pub async fn exec(
        &self,
        container_id: &str,
        exec_id: &str,
        process: &Process,
    ) -> Result<u32, SandboxError> {
        let json = serde_json::to_vec(process)
            .map_err(|e| SandboxError::Invalid(format!("encode OCI process: {e}")))?;
        let req = ExecProcessRequest {
            container_id: container_id.into(),
            exec_id: exec_id.into(),
            process_json: json,
            ..Default::default()
        };
        Ok(self
            .agent
            .agent
            .exec_process(ctx(CALL_TIMEOUT), &req)
            .await
            .map_err(agent_err("ExecProcess"))?
            .pid)
    }

    /// Sends a signal.
    pub async fn signal(
        &self,
        container_id: &str,
        exec_id: &str,
        signal: u32,
        all: bool,
    ) -> Result<(), SandboxError> {
        let req = SignalProcessRequest {
            container_id: container_id.into(),
            exec_id: exec_id.into(),
            signal,
            all,
            ..Default::default()
        };
        self.agent
            .agent
            .signal_process(ctx(CALL_TIMEOUT), &req)
            .await
            .map_err(agent_err("SignalProcess"))?;
        Ok(())
    }

    /// Waits for a process; returns (status, signal).
    pub async fn wait(
        &self,
        container_id: &str,
        exec_id: &str,
    ) -> Result<(i32, u32), SandboxError> {
        let req = WaitProcessRequest {
            container_id: container_id.into(),
            exec_id: exec_id.into(),
            ..Default::default()
        };
        // No deadline: processes run as long as they like.
        let r = self
            .agent
            .agent
            .wait_process(ttrpc::context::with_timeout(0), &req)
            .await
            .map_err(agent_err("WaitProcess"))?;
        Ok((r.status, r.signal))
    }

    /// Reads a process's stdout (or stderr) to the end.
    pub async fn read_all(
        &self,
        container_id: &str,
        exec_id: &str,
        stderr: bool,
    ) -> Result<Vec<u8>, SandboxError> {
        let mut out = Vec::new();
        loop {
            let req = ReadStreamRequest {
                container_id: container_id.into(),
                exec_id: exec_id.into(),
                len: 64 * 1024,
                ..Default::default()
            };
            let r = if stderr {
                self.agent
                    .agent
                    .read_stderr(ttrpc::context::with_timeout(0), &req)
                    .await
                    .map_err(agent_err("ReadStderr"))?
            } else {
                self.agent
                    .agent
                    .read_stdout(ttrpc::context::with_timeout(0), &req)
                    .await
                    .map_err(agent_err("ReadStdout"))?
            };
            if r.data.is_empty() {
                return Ok(out);
            }
            out.extend(r.data);
        }
    }

    /// Pids of a container's processes (guest pids).
    pub async fn pids(&self, container_id: &str) -> Result<Vec<u32>, SandboxError> {
        let req = ListProcessesRequest {
            container_id: container_id.into(),
            ..Default::default()
        };
        Ok(self
            .agent
            .agent
            .list_processes(ctx(CALL_TIMEOUT), &req)
            .await
            .map_err(agent_err("ListProcesses"))?
            .pids)
    }

    /// Resource usage of a container's guest cgroup.
    pub async fn stats(&self, container_id: &str) -> Result<StatsContainerResponse, SandboxError> {
        let req = StatsContainerRequest {
            container_id: container_id.into(),
            ..Default::default()
        };
        self.agent
            .agent
            .stats_container(ctx(CALL_TIMEOUT), &req)
            .await
            .map_err(agent_err("StatsContainer"))
    }

    /// Sets the window size of a process's terminal.
    pub async fn resize(
        &self,
        container_id: &str,
        exec_id: &str,
        rows: u32,
        columns: u32,
    ) -> Result<(), SandboxError> {
        let req = TtyWinResizeRequest {
            container_id: container_id.into(),
            exec_id: exec_id.into(),
            row: rows,
            column: columns,
            ..Default::default()
        };
        self.agent
            .agent
            .tty_win_resize(ctx(CALL_TIMEOUT), &req)
            .await
            .map_err(agent_err("TtyWinResize"))?;
        Ok(())
    }

    /// The guest's packet filter rules (`ip(6)tables-save`).
    pub async fn get_iptables(&self, v6: bool) -> Result<Vec<u8>, SandboxError> {
        let req = GetIPTablesRequest {
            is_ipv6: v6,
            ..Default::default()
        };
        Ok(self
            .agent
            .agent
            .get_ip_tables(ctx(CALL_TIMEOUT), &req)
            .await
            .map_err(agent_err("GetIPTables"))?
            .data)
    }

    /// Replaces the guest's packet filter rules (`ip(6)tables-restore`); returns its output.
    pub async fn set_iptables(&self, v6: bool, rules: Vec<u8>) -> Result<Vec<u8>, SandboxError> {
        let req = SetIPTablesRequest {
            is_ipv6: v6,
            data: rules,
            ..Default::default()
        };
        Ok(self
            .agent
            .agent
            .set_ip_tables(ctx(CALL_TIMEOUT), &req)
            .await
            .map_err(agent_err("SetIPTables"))?
            .data)
    }

    /// Applies OCI `LinuxResources` (JSON) to a container's guest cgroup.
    pub async fn update(
        &self,
        container_id: &str,
        resources_json: Vec<u8>,
    ) -> Result<(), SandboxError> {
        let req = UpdateContainerRequest {
            container_id: container_id.into(),
            resources_json,
            ..Default::default()
        };
        self.agent
            .agent
            .update_container(ctx(CALL_TIMEOUT), &req)
            .await
            .map_err(agent_err("UpdateContainer"))?;
        Ok(())
    }

    /// Closes a process's stdin.
    pub async fn close_stdin(&self, container_id: &str, exec_id: &str) -> Result<(), SandboxError> {
        let req = CloseStdinRequest {
            container_id: container_id.into(),
            exec_id: exec_id.into(),
            ..Default::default()
        };
        self.agent
            .agent
            .close_stdin(ctx(CALL_TIMEOUT), &req)
            .await
            .map_err(agent_err("CloseStdin"))?;
        Ok(())
    }

    /// Removes a container (killing it if it runs) and its shared files.
    pub async fn remove_container(&self, container_id: &str) -> Result<(), SandboxError> {
        let req = RemoveContainerRequest {
            container_id: container_id.into(),
            timeout: 10,
            ..Default::default()
        };
        let r = self
            .agent
            .agent
            .remove_container(ctx(CALL_TIMEOUT), &req)
            .await
            .map_err(agent_err("RemoveContainer"));
        self.unshare(container_id);
        // The guest has unmounted the container's volumes: unplug those nobody uses.
        self.release_volumes(container_id).await;
        r.map(|_| ())
    }

    /// Shares a host file or directory (a bind mount of the spec) with the guest with the
    /// mount's OCI options (`ro`, `rro`... are honoured on the host side too, so the guest cannot
    /// write through the share); returns its guest path.
    pub fn share_mount(
        &self,
        container_id: &str,
        index: usize,
        source: &Path,
        options: &[String],
    ) -> Result<PathBuf, SandboxError> {
        crate::ids::check("container", container_id)?;
        let rel = Path::new(container_id)
            .join("mounts")
            .join(index.to_string());
        self.bind_into_share(&rel, source, options)?;
        Ok(Path::new(GUEST_SHARED_DIR).join(rel))
    }

    /// Stops the VM and removes every trace of the sandbox on the host.
    pub async fn stop(&self) {
        let req = DestroySandboxRequest::new();
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            self.agent
                .agent
                .destroy_sandbox(ctx(Duration::from_secs(2)), &req),
        )
        .await;
        self.vm.stop(Duration::from_secs(3)).await;
        if let Some(v) = self.virtiofsd.lock().await.take() {
            v.stop().await;
        }
        if let Some(n) = self.network.clone() {
            let _ = tokio::task::spawn_blocking(move || n.teardown()).await;
        }
        if let Some(cg) = self.cgroups.clone() {
            let _ = tokio::task::spawn_blocking(move || cg.remove()).await;
        }
        cleanup_paths(&self.paths);
    }

    /// Sets the host sandbox cgroup's CPU limit (the sum of the containers' limits; see
    /// [`crate::cgroups`]). Does nothing when the sandbox does not manage host cgroups.
    pub fn set_host_cpu_limit(&self, limit: Option<CpuLimit>) -> Result<(), SandboxError> {
        match &self.cgroups {
            Some(cg) => cg.set_cpu_limit(limit),
            None => Ok(()),
        }
    }
}

/// Moves QEMU's vCPU threads to the sandbox cgroup.
async fn place_vcpus(vm: &Vm, cg: &HostCgroups) -> Result<(), SandboxError> {
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
fn random_cid() -> u32 {
    let mut b = [0u8; 4];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        use std::io::Read;
        let _ = f.read_exact(&mut b);
    }
    3 + u32::from_le_bytes(b) % (u32::MAX - 4)
}

/// What boot started so far (to undo on error).
#[derive(Default)]
struct Started {
    vm: Option<Vm>,
    virtiofsd: Option<Virtiofsd>,
    network: Option<PodNetwork>,
    cgroups: Option<std::sync::Arc<HostCgroups>>,
}
