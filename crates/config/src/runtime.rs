//! `[runtime]`, `[agent.kata]`, `[factory]` and `[image]`.

use serde::{Deserialize, Serialize};

use crate::schema::{config_section, Applies, Dynamic, Support};

const N: Dynamic = Dynamic::No;
const Y: Dynamic = Dynamic::Yes;
const OK: Support = Support::Yes;
const NY: Support = Support::NotYet;
const ALL: Applies = Applies::All;

/// How the VM is connected to the container network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum InterNetworkingModel {
    /// A tap per interface, joined to the veth by tc mirred redirect filters.
    #[serde(rename = "tcfilter")]
    TcFilter,
    /// A macvtap on top of the veth.
    #[serde(rename = "macvtap")]
    Macvtap,
    /// Taps are created but not connected (for example to attach them to an OVS bridge).
    #[serde(rename = "none")]
    None,
}

/// How VFIO devices appear inside the container.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum VfioMode {
    /// Character devices under /dev/vfio, as with runc.
    #[serde(rename = "vfio")]
    Vfio,
    /// Devices bound to guest kernel drivers.
    #[serde(rename = "guest-kernel")]
    GuestKernel,
}

/// Transport of the agent API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AgentChannelKind {
    /// vsock where the host has /dev/vhost-vsock, virtio-serial otherwise.
    #[serde(rename = "auto")]
    Auto,
    /// AF_VSOCK through the host kernel's vhost-vsock.
    #[serde(rename = "vsock")]
    Vsock,
    /// A virtio-serial port backed by a unix socket.
    #[serde(rename = "virtio-serial")]
    VirtioSerial,
}

/// Default Jaeger collector endpoint.
pub const DEFAULT_JAEGER_ENDPOINT: &str = "http://localhost:14268/api/traces";
/// Default seconds to wait for the agent to answer.
pub const DEFAULT_DIAL_TIMEOUT_SECS: u32 = 30;
/// Default path of VM templates.
pub const DEFAULT_TEMPLATE_PATH: &str = "/run/vc/vm/template";
/// Default VMCache server socket.
pub const DEFAULT_VM_CACHE_ENDPOINT: &str = "/var/run/kata-containers/cache.sock";

config_section! {
    /// `[runtime]`
    pub struct RuntimeConfig {
        /// Debug logging in containerd-shim-kata-v2.
        enable_debug: bool = false, N, OK, ALL;
        /// How the VM joins the container network: `tcfilter`, `macvtap` or `none`.
        internetworking_model: InterNetworkingModel = InterNetworkingModel::TcFilter, Y, OK, ALL;
        /// Do not apply the container's seccomp profile inside the guest (the shim logs that
        /// it skipped it). Kata's default is true; the shipped files set false.
        disable_guest_seccomp: bool = true, Y, OK, ALL;
        /// Emit OpenTelemetry traces and spans.
        enable_tracing: bool = false, N, NY, ALL;
        /// Trace collector (Jaeger accepts OTLP).
        jaeger_endpoint: String = DEFAULT_JAEGER_ENDPOINT.to_string(), N, NY, ALL;
        /// Trace collector user name.
        jaeger_user: String = String::new(), N, NY, ALL;
        /// Trace collector password.
        jaeger_password: String = String::new(), N, NY, ALL;
        /// Do not create a network namespace for the shim and hypervisor (use with `none`).
        disable_new_netns: bool = false, Y, OK, ALL;
        /// Host cgroups: true puts the shim, virtiofsd and QEMU in the sandbox cgroup
        /// `<pod cgroup>/kata_<id>` (unlimited; the pod cgroup limits it); false puts only
        /// QEMU's vCPU threads there, with the sum of the containers' CPU limits, and the rest
        /// in `/kata_overhead/<id>`.
        sandbox_cgroup_only: bool = false, Y, OK, ALL;
        /// Size the VM at boot from the containers' limits instead of hot-plugging.
        static_sandbox_resource_mgmt: bool = false, N, OK, ALL;
        /// Dragonball's name for `static_sandbox_resource_mgmt`.
        static_resource_mgmt: bool = false, N, OK, ALL;
        /// Host paths bind-mounted read-only into the guest at
        /// /run/kata-containers/shared/containers/sandbox-mounts.
        sandbox_bind_mounts: Vec<String> = Vec::new(), N, NY, ALL;
        /// VFIO mode: `vfio` or `guest-kernel`.
        vfio_mode: VfioMode = VfioMode::GuestKernel, Y, NY, ALL;
        /// Create Kubernetes emptyDir volumes on the host and share them, instead of in guest memory.
        disable_guest_empty_dir: bool = false, N, OK, ALL;
        /// Experimental features to enable (none exist yet).
        experimental: Vec<String> = Vec::new(), Y, OK, ALL;
        /// Serve profiling data from the shim through kata-monitor.
        enable_pprof: bool = false, Y, NY, ALL;
        /// Regular expressions (full match) of the runtime and agent annotations that change
        /// the host or weaken a protection, which a pod author may set only when listed here:
        /// `internetworking_model`, `disable_new_netns`, `sandbox_cgroup_only`, `vfio_mode`,
        /// `experimental`, `enable_pprof`, `disable_guest_seccomp` and the agent's
        /// `kernel_modules`. Not a Kata key (Kata accepts them from anyone).
        enable_annotations: Vec<String> = Vec::new(), N, OK, ALL;
        /// Runtime name (runtime-rs files).
        name: String = String::new(), N, OK, ALL;
        /// Hypervisor name (runtime-rs files); must match the `[hypervisor.*]` section if set.
        hypervisor_name: String = String::new(), N, OK, ALL;
        /// Agent name (runtime-rs files); only `kata` exists.
        agent_name: String = String::new(), N, OK, ALL;
    }
}

impl RuntimeConfig {
    /// Static resource management, under either of its names.
    pub fn static_resources(&self) -> bool {
        self.static_sandbox_resource_mgmt || self.static_resource_mgmt
    }
}

config_section! {
    /// `[agent.kata]`
    pub struct AgentConfig {
        /// Debug logging in kata-agent.
        enable_debug: bool = false, N, OK, ALL;
        /// OpenTelemetry tracing in kata-agent (not supported: the agent logs to the console;
        /// `enable_debug` gives its debug log).
        enable_tracing: bool = false, Y, NY, ALL;
        /// Kernel modules (with parameters) the agent loads at boot, for example
        /// `"e1000e InterruptThrottleRate=3000"`. As an annotation: `;`-separated.
        kernel_modules: Vec<String> = Vec::new(), Y, OK, ALL;
        /// Start a debug console in the guest, reachable with `kata-runtime exec`.
        debug_console_enabled: bool = false, N, OK, ALL;
        /// Seconds to wait for the agent to answer after the VM starts.
        dial_timeout: u32 = DEFAULT_DIAL_TIMEOUT_SECS, N, OK, ALL;
        /// Transport of the agent API: `auto` (kernel vsock where /dev/vhost-vsock exists,
        /// otherwise a virtio-serial port), `vsock` or `virtio-serial`. Not a Kata key.
        channel: AgentChannelKind = AgentChannelKind::Auto, N, OK, ALL;
        /// Size of the pipes the agent creates for container stdio (0: kernel default).
        container_pipe_size: u32 = 0, Y, NY, ALL;
    }
}

config_section! {
    /// `[factory]`
    pub struct FactoryConfig {
        /// Create new VMs by cloning a template VM (needs QEMU, an initrd and virtio-9p).
        enable_template: bool = false, N, OK, ALL;
        /// Directory of the VM template.
        template_path: String = DEFAULT_TEMPLATE_PATH.to_string(), N, OK, ALL;
        /// VMs kept booted and ready by the VMCache server that `kata-runtime factory init`
        /// runs; each sandbox takes one over instead of booting its own (0: VMCache off).
        vm_cache_number: u32 = 0, N, OK, ALL;
        /// Unix socket of the VMCache server.
        vm_cache_endpoint: String = DEFAULT_VM_CACHE_ENDPOINT.to_string(), N, OK, ALL;
    }
}

config_section! {
    /// `[image]` (confidential containers)
    pub struct ImageConfig {
        /// Pull and unpack container images inside the guest.
        service_offload: bool = false, N, NY, ALL;
        /// Provisioning data for the guest (`data:///...`).
        provision: String = String::new(), N, NY, ALL;
    }
}
