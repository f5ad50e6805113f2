//! A sandbox: one VM with its agent. Every error path stops what was started and removes the
//! sandbox's state directories.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use kata_config::Config;
use kata_hypervisor::probe::Accel;
use kata_hypervisor::qemu::argv::{AgentChannel, LaunchSpec, Nic, SharedFsDevice, SHARED_FS_TAG};
use kata_hypervisor::qemu::vm::Vm;
use kata_hypervisor::virtiofsd::Virtiofsd;
use kata_protocols::agent::*;
use nix::mount::MsFlags;
use oci_spec::runtime::{Process, Spec};
use tracing::Instrument;

use crate::agent::{agent_err, ctx, AgentClient, CALL_TIMEOUT};
use crate::cgroups::{CpuLimit, HostCgroups, Layout};
use crate::error::SandboxError;
use crate::network::PodNetwork;

mod boot;
mod containers;
mod demand;
mod fence;
mod forward;
mod net;
mod resources;
mod share;
mod sources;
pub mod volumes;
pub mod watched;

pub use crate::host::*;
pub use crate::launch::{guest_shape, launch_spec, GuestShape, DEBUG_CONSOLE_SOCKET};
pub use crate::source::SourceKind;
use boot::{place_vcpus, Started};
pub use demand::{cpu_limit, Demand};
pub use fence::{Killed, SANDBOX_KILL_GRACE};
use resources::Plugged;

/// Where the agent mounts the shared filesystem in the guest.
pub const GUEST_SHARED_DIR: &str = "/run/kata-containers/shared/containers";
/// Memory hot-plug granularity (x86 memory block size).
pub const MEMORY_BLOCK_MIB: u32 = 128;
/// How long the guest has to take a chunk of a process's stdin.
const STDIN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the guest has to bring hot-plugged vCPUs and memory online.
const HOTPLUG_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the guest has to give back an unplugged vCPU or memory.
const UNPLUG_TIMEOUT: Duration = Duration::from_secs(10);

/// Where on the host a sandbox runs.
#[derive(Debug, Clone, Default)]
pub struct Placement {
    /// The pod's network namespace, whose interfaces are mirrored into the VM (as
    /// `[runtime].internetworking_model` says). None: the VM gets no network.
    pub netns: Option<PathBuf>,
    /// The manager asks for a network namespace of its own without naming one (Docker): the
    /// sandbox makes one ([`crate::network::owned_netns_path`]), QEMU runs in it, and the
    /// interfaces the manager puts there after Create reach the VM at
    /// [`Sandbox::attach_late_network`]. Ignored when `netns` names one.
    pub new_netns: bool,
    /// With `new_netns`: the manager configures that namespace through the task's pid after
    /// Create (Docker; a `createRuntime` hook, as nerdctl's). A VMCache VM cannot serve such a
    /// sandbox: its QEMU, whose pid is reported, runs outside the namespace.
    pub netns_by_pid: bool,
    /// Some: the pod has no pause container (containerd's sandbox API); the agent holds the
    /// pod's IPC, UTS and PID namespaces, as this says, at
    /// [`POD_NAMESPACES_DIR`]`/{ipc,uts,pid}`, for the pod's containers to join.
    pub pod_namespaces: Option<SharedNamespaces>,
    /// The sandbox container's `linux.cgroupsPath`. Some: the sandbox's host cgroups are made
    /// as `[runtime].sandbox_cgroup_only` says, and the calling process (the shim) joins them.
    /// None: everything stays in the caller's cgroups.
    pub cgroups_path: Option<String>,
    /// With `[factory] enable_template`: the configuration the VM template is made from (the
    /// configuration files, without the pod's annotations). None: the sandbox's own.
    pub template_config: Option<Config>,
}

/// The pod's shared namespaces the agent makes when there is no pause container: what a pause
/// container's spec would have said.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SharedNamespaces {
    /// The pod's hostname (its UTS namespace).
    pub hostname: String,
    /// The pod's sysctls, set in those namespaces; `net.*` in the guest's network namespace,
    /// which is the pod's. One outside the pod's namespaces fails the sandbox, as runc refuses it.
    pub sysctls: std::collections::BTreeMap<String, String>,
}

/// Where the agent binds the pod's namespaces when there is no pause container (see
/// [`Placement::pod_namespaces`]).
pub const POD_NAMESPACES_DIR: &str = "/run/kata-containers/sandbox/ns";

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
    /// A clone's reseed, clock and NICs.
    pub personalize_ms: u64,
    /// Where the VM came from.
    pub source: SourceKind,
}

/// A running sandbox.
#[derive(Debug)]
pub struct Sandbox {
    id: String,
    /// Effective configuration.
    config: Config,
    accel: Accel,
    paths: SandboxPaths,
    vm: Vm,
    virtiofsd: tokio::sync::Mutex<Option<Virtiofsd>>,
    /// The agent channel.
    channel: AgentChannel,
    /// The pod network mirrored into the VM (set at boot, or late for a manager that configures
    /// the namespace after Create).
    network: std::sync::Mutex<Option<PodNetwork>>,
    /// The network namespace the sandbox made for itself (deleted with it).
    owned_netns: Option<PathBuf>,
    agent: AgentClient,
    /// The host cgroups, when the sandbox manages them.
    cgroups: Option<std::sync::Arc<HostCgroups>>,
    vcpus: AtomicU32,
    memory_mib: AtomicU32,
    plugged: tokio::sync::Mutex<Plugged>,
    timings: BootTimings,
    /// Direct volumes hot-plugged into the VM (see [`volumes`]).
    pub(crate) volumes: tokio::sync::Mutex<volumes::Attached>,
    /// What each container asks of the VM (see [`Sandbox::reserve`]).
    ledger: std::sync::Mutex<demand::Ledger>,
    /// Held while the VM is resized to the ledger's sum, so that resizes apply in order.
    resizing: tokio::sync::Mutex<()>,
    /// The containers' watched volumes being mirrored (see [`watched`]).
    watchers: watched::Watchers,
    /// The port-forward relay in the pod's network namespace (see [`forward`]).
    _relay: Option<forward::Relay>,
}

fn ms(since: Instant) -> u64 {
    since.elapsed().as_millis() as u64
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
                if started.owned_netns.take().is_some() {
                    let id = id.to_string();
                    let _ = tokio::task::spawn_blocking(move || {
                        crate::network::delete_owned_netns(&id)
                    })
                    .await;
                }
                if let Some(cg) = started.cgroups.take() {
                    let _ = tokio::task::spawn_blocking(move || cg.remove()).await;
                }
                cleanup_paths(&paths);
                Err(e)
            }
        }
    }

    /// How the host reaches the agent: `vsock://<cid>:<port>` over kernel vsock, or
    /// `unix://<socket>` for the unix socket QEMU bridges to the agent's virtio-serial port.
    pub fn agent_url(&self) -> String {
        crate::launch::agent_url(&self.channel)
    }

    /// The sandbox's pid on the host, the one a container manager is given for every task
    /// and process of the pod (as Kata does): QEMU's. Its `/proc/<pid>/ns/net` is the
    /// sandbox's network namespace.
    pub fn host_pid(&self) -> u32 {
        self.vm.pid
    }

    /// The sandbox's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The configuration the sandbox runs with (files, then the pod's annotations).
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The accelerator its VM runs with.
    pub fn accel(&self) -> Accel {
        self.accel
    }

    /// Its host directories.
    pub fn paths(&self) -> &SandboxPaths {
        &self.paths
    }

    /// Its host cgroups, when it manages them.
    pub fn cgroups(&self) -> Option<&std::sync::Arc<HostCgroups>> {
        self.cgroups.as_ref()
    }

    /// How long each phase of its boot took, and which source served its VM.
    pub fn timings(&self) -> &BootTimings {
        &self.timings
    }

    /// Why its VM stopped, once it has (None while it runs).
    pub fn vm_exit(&self) -> Option<kata_hypervisor::qemu::vm::VmError> {
        self.vm.exit_error()
    }

    /// Waits until its VM stops; why it did.
    pub async fn wait_vm_exit(&self) -> kata_hypervisor::qemu::vm::VmError {
        self.vm.wait_exit().await
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
        let network = self.network.lock().ok().and_then(|mut n| n.take());
        let owned = self.owned_netns.is_some().then(|| self.id.clone());
        let _ = tokio::task::spawn_blocking(move || {
            if let Some(n) = network {
                n.teardown();
            }
            if let Some(id) = owned {
                crate::network::delete_owned_netns(&id);
            }
        })
        .await;
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
