//! The launch layer: how a VM is started, the same for a sandbox's cold boot, the VM template
//! and the VMCache server's VMs. The QEMU launch ([`launch_spec`]), what the configuration puts
//! on the guest's command line ([`guest_shape`]), the agent channel, the share and its
//! virtiofsd ([`start_share`]), QEMU ([`start_qemu`]) and the wait for the agent
//! ([`wait_for_agent`]). Calls [`crate::host`] and [`crate::agent`]; knows nothing of
//! sandboxes.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kata_config::hypervisor::{HypervisorConfig, SharedFs};
use kata_config::Config;
use kata_hypervisor::probe::Accel;
use kata_hypervisor::qemu::argv::{AgentChannel, LaunchSpec, SharedFsDevice};
use kata_hypervisor::qemu::vm::Vm;
use kata_hypervisor::virtiofsd::Virtiofsd;
use tracing::Instrument;

use crate::agent::AgentClient;
use crate::error::SandboxError;
use crate::host::SandboxPaths;

/// The debug console's socket in a VM directory (beside the agent's `agent.sock`), with the
/// virtio-serial agent channel.
pub const DEBUG_CONSOLE_SOCKET: &str = "debug-console.sock";

/// Prepares the share of a VM whose directories are `paths` (see
/// [`crate::host::prepare_share`]) and starts its virtiofsd when the configuration shares with
/// virtio-fs. Returns the shared filesystem device QEMU gets.
pub(crate) async fn start_share(
    h: &HypervisorConfig,
    paths: &SandboxPaths,
) -> Result<(SharedFsDevice, Option<Virtiofsd>), SandboxError> {
    let device = shared_fs_device(h, paths)?;
    if h.shared_fs != SharedFs::None {
        crate::host::prepare_share(paths)?;
    }
    let virtiofsd = match &device {
        SharedFsDevice::VirtioFs { socket } => Some(
            Virtiofsd::start(
                h,
                socket,
                &paths.export_dir(),
                &paths.vm_dir.join("virtiofsd.log"),
            )
            .instrument(tracing::info_span!("virtiofsd_start"))
            .await?,
        ),
        _ => None,
    };
    Ok((device, virtiofsd))
}

/// A VM launched by [`boot_vm`] whose agent answered.
#[derive(Debug)]
pub(crate) struct Booted {
    /// QEMU.
    pub(crate) vm: Vm,
    /// virtiofsd, with a virtio-fs share.
    pub(crate) virtiofsd: Option<Virtiofsd>,
    /// How the agent is reached.
    pub(crate) channel: AgentChannel,
    /// The agent's client (drop it to let the agent wait for another host).
    pub(crate) agent: AgentClient,
}

/// What a launch started so far: dropped before [`Launching::done`] (a failure anywhere), it
/// kills QEMU and virtiofsd and removes the VM's directories, so no error path leaves them.
struct Launching<'a> {
    vm: Option<Vm>,
    virtiofsd: Option<Virtiofsd>,
    paths: &'a SandboxPaths,
    /// False once handed over by `done`.
    armed: bool,
}

impl Launching<'_> {
    fn done(mut self) -> (Option<Vm>, Option<Virtiofsd>) {
        self.armed = false;
        (self.vm.take(), self.virtiofsd.take())
    }
}

impl Drop for Launching<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        if let Some(vm) = &self.vm {
            vm.kill();
        }
        if let Some(v) = &self.virtiofsd {
            // All of its processes, until they have exited: the failure is reported with
            // nothing running.
            match v.group() {
                Some(pgid) => {
                    kata_hypervisor::virtiofsd::kill_group_and_wait(pgid, Duration::from_secs(2))
                }
                None => {
                    if let Some(pid) = v.pid() {
                        kata_hypervisor::qemu::vm::kill_pid(pid);
                    }
                }
            }
        }
        crate::host::cleanup_paths(self.paths);
    }
}

/// Boots VM `id` in the directories `paths` (made already) as `config` says: the share and
/// virtiofsd, QEMU, until the agent answers. On failure nothing is left: the processes are
/// killed and the directories removed. (A sandbox's own boot keeps more state and undoes it in
/// [`crate::sandbox`]; this is the VMCache server's VMs.)
pub(crate) async fn boot_vm(
    id: &str,
    config: &Config,
    accel: Accel,
    paths: &SandboxPaths,
) -> Result<Booted, SandboxError> {
    let mut launching = Launching {
        vm: None,
        virtiofsd: None,
        paths,
        armed: true,
    };
    let (shared_fs, virtiofsd) = start_share(&config.hypervisor, paths).await?;
    launching.virtiofsd = virtiofsd;
    let channel = agent_channel(config, &paths.vm_dir)?;
    let spec = launch_spec(id, config, accel, &paths.vm_dir, channel.clone(), shared_fs);
    let vm = launching
        .vm
        .insert(start_qemu(config, &spec, &paths.vm_dir).await?);
    let agent = wait_for_agent(vm, &channel, config.agent.dial_timeout).await?;
    let (vm, virtiofsd) = launching.done();
    let vm =
        vm.ok_or_else(|| SandboxError::Invalid(format!("VM {id} vanished while it booted")))?;
    Ok(Booted {
        vm,
        virtiofsd,
        channel,
        agent,
    })
}

/// Starts QEMU as `spec` says, its stderr in `dir`; returns once QMP answers.
pub(crate) async fn start_qemu(
    config: &Config,
    spec: &LaunchSpec,
    dir: &Path,
) -> Result<Vm, SandboxError> {
    let h = &config.hypervisor;
    let qemu = PathBuf::from(h.effective_path(config.hypervisor_kind));
    Ok(Vm::start(&qemu, h, spec, &dir.join("qemu.stderr"))
        .instrument(tracing::info_span!("qemu_start"))
        .await?)
}

/// Waits until the agent of `vm` answers on `channel`, for `dial_timeout` seconds. A VM that
/// exits first is reported with its exit (and console); one whose agent stays silent, with the
/// console's last lines.
pub(crate) async fn wait_for_agent(
    vm: &Vm,
    channel: &AgentChannel,
    dial_timeout: u32,
) -> Result<AgentClient, SandboxError> {
    let deadline = Instant::now() + Duration::from_secs(dial_timeout.into());
    let dialled = tokio::select! {
        r = dial_agent(channel, deadline).instrument(tracing::info_span!("agent_connect")) => r,
        e = vm.wait_exit() => Err(SandboxError::Vm(e)),
    };
    match dialled {
        Err(SandboxError::AgentDial { reason }) => {
            // A dead guest resets the connection: report QEMU's exit, with the console.
            if let Ok(e) = tokio::time::timeout(Duration::from_secs(2), vm.wait_exit()).await {
                return Err(SandboxError::Vm(e));
            }
            Err(SandboxError::AgentTimeout {
                timeout: dial_timeout,
                reason,
                console: vm.console_tail(12),
            })
        }
        other => other,
    }
}

/// The agent's address as a URL: `vsock://<cid>:<port>`, or `unix://<socket>` for the unix
/// socket QEMU bridges to the agent's virtio-serial port.
pub fn agent_url(channel: &AgentChannel) -> String {
    match channel {
        AgentChannel::Vsock { cid } => format!("vsock://{cid}:{}", kata_protocols::VSOCK_PORT),
        AgentChannel::Serial { socket } => format!("unix://{}", socket.display()),
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
        .map_err(|e| SandboxError::Unsupported(e.to_string()))?
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
    h: &HypervisorConfig,
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

/// A random guest vsock CID (3 and up; 0-2 are reserved).
pub(crate) fn random_cid() -> u32 {
    let mut b = [0u8; 4];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        use std::io::Read;
        let _ = f.read_exact(&mut b);
    }
    3 + u32::from_le_bytes(b) % (u32::MAX - 4)
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
