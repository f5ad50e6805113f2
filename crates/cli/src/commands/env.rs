//! `kata-runtime env`: the effective configuration and host facts, as TOML (default) or JSON.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use kata_config::{Config, HostLimits};
use kata_hypervisor::host::{self, CpuInfo, MemInfo};
use kata_hypervisor::probe;
use serde::Serialize;

/// Format version of this output (Kata's `Meta.Version`).
pub const FORMAT_VERSION: &str = "1.0.26";

/// `env` flags.
#[derive(Debug, clap::Args)]
pub struct EnvArgs {
    /// Print JSON instead of TOML.
    #[arg(long)]
    pub json: bool,
    /// Apply an annotation as a pod would (repeatable): prints the configuration that pod would
    /// get, or the error it would get.
    #[arg(long = "annotation", value_name = "KEY=VALUE", value_parser = super::parse_annotation)]
    pub annotations: Vec<(String, String)>,
}

/// The whole report.
#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct EnvInfo {
    kernel: KernelInfo,
    meta: MetaInfo,
    image: PathInfo,
    initrd: PathInfo,
    hypervisor: HypervisorInfo,
    runtime: RuntimeInfo,
    host: HostInfo,
    agent: AgentInfo,
    factory: FactoryInfo,
}

/// `[factory]` and the VM template's state.
#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
struct FactoryInfo {
    /// `enable_template`.
    template: bool,
    template_path: String,
    /// "on" (a complete template is there), "off", or "not enabled".
    template_state: String,
    /// Kata's key names.
    #[serde(rename = "VMCacheNumber")]
    vm_cache_number: u32,
    #[serde(rename = "VMCacheEndpoint")]
    vm_cache_endpoint: String,
    /// "serving N VMs (server pid P)", "no server (...)", or "not enabled".
    #[serde(rename = "VMCacheState")]
    vm_cache_state: String,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
struct KernelInfo {
    path: String,
    parameters: String,
    /// The kernel file's version banner (`Linux version ...`), empty when it has none.
    version: String,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
struct MetaInfo {
    version: String,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
struct PathInfo {
    path: String,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
struct HypervisorInfo {
    name: String,
    supported: bool,
    machine_type: String,
    version: String,
    path: String,
    accelerator: String,
    accelerator_in_use: String,
    block_device_driver: String,
    entropy_source: String,
    #[serde(rename = "SharedFS")]
    shared_fs: String,
    #[serde(rename = "VirtioFSDaemon")]
    virtio_fs_daemon: String,
    socket_path: String,
    msize9p: u32,
    memory_slots: u32,
    default_vcpus: u32,
    default_max_vcpus: u32,
    default_memory: u32,
    default_max_memory: u32,
    #[serde(rename = "PCIeRootPort")]
    pcie_root_port: u32,
    #[serde(rename = "HotplugVFIOOnRootBus")]
    hotplug_vfio_on_root_bus: bool,
    debug: bool,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
struct RuntimeInfo {
    path: String,
    debug: bool,
    trace: bool,
    disable_guest_seccomp: bool,
    disable_new_net_ns: bool,
    sandbox_cgroup_only: bool,
    internetworking_model: String,
    static_sandbox_resource_mgmt: bool,
    warnings: Vec<String>,
    unsupported_keys: Vec<String>,
    config: RuntimeConfigInfo,
    version: RuntimeVersion,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
struct RuntimeConfigInfo {
    path: String,
    drop_ins: Vec<String>,
    found_by: String,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
struct RuntimeVersion {
    #[serde(rename = "OCI")]
    oci: String,
    version: SemVer,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
struct SemVer {
    semver: String,
    commit: String,
    major: u64,
    minor: u64,
    patch: u64,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
struct HostInfo {
    kernel: String,
    architecture: String,
    #[serde(rename = "VMContainerCapable")]
    vm_container_capable: bool,
    support_v_socks: bool,
    distro: Distro,
    #[serde(rename = "CPU")]
    cpu: Cpu,
    memory: Memory,
    containerd: ContainerdInfo,
}

/// `[Host.Containerd]`: the containerd found on the host.
#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
struct ContainerdInfo {
    /// The binary's path; empty when none was found.
    path: String,
    /// The version as it prints it; empty when none was found or it could not be read.
    version: String,
    /// Whether its series is one the runtime is tested with (1.6, 1.7, 2.1).
    tested: bool,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
struct Distro {
    name: String,
    version: String,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
struct Cpu {
    vendor: String,
    model: String,
    #[serde(rename = "CPUs")]
    cpus: u32,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
struct Memory {
    total: u64,
    free: u64,
    available: u64,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
struct AgentInfo {
    debug: bool,
    trace: bool,
    debug_console_enabled: bool,
    dial_timeout: u32,
    kernel_modules: Vec<String>,
    channel: String,
    channel_in_use: String,
}

/// Loads the effective configuration for a command line, as the shim would for a pod.
pub fn effective_config(
    config: Option<PathBuf>,
    annotations: &[(String, String)],
) -> anyhow::Result<Config> {
    let map = annotations.iter().cloned().collect();
    let inputs = super::search_inputs(config, map);
    let (config, _container) = kata_config::load::load_effective(&inputs, &HostLimits::current())?;
    Ok(config)
}

/// Runs `env`.
pub fn run(config: Option<PathBuf>, args: EnvArgs) -> anyhow::Result<ExitCode> {
    let config = effective_config(config, &args.annotations)?;
    let info = collect(&config);
    let text = if args.json {
        serde_json::to_string_pretty(&info).context("failed to encode the report as JSON")?
    } else {
        toml::to_string(&info).context("failed to encode the report as TOML")?
    };
    println!("{text}");
    Ok(ExitCode::SUCCESS)
}

/// Builds the report.
pub fn collect(c: &Config) -> EnvInfo {
    let h = &c.hypervisor;
    let kind = c.hypervisor_kind;
    let path = h.effective_path(kind);
    let version = if path.is_empty() {
        String::new()
    } else {
        host::binary_version(Path::new(&path)).unwrap_or_else(|e| format!("unknown: {e}"))
    };
    let in_use =
        match probe::cached(Path::new(&path), Path::new(&h.kernel)).and_then(|r| r.chosen()) {
            Some(a) => a.name().to_string(),
            None => "unknown (run 'kata-runtime check')".to_string(),
        };
    let cpu = CpuInfo::read();
    let mem = MemInfo::read();
    let (distro, distro_version) =
        host::parse_os_release(&std::fs::read_to_string("/etc/os-release").unwrap_or_default());
    let mut parts = crate::VERSION
        .split('.')
        .map(|p| p.parse::<u64>().unwrap_or(0));
    let template = kata_sandbox::template::Template::of(c);
    let template_state = if !c.factory.enable_template {
        "not enabled"
    } else if template.exists() {
        "on"
    } else {
        "off"
    };
    let vm_cache_state = if c.factory.vm_cache_number == 0 {
        "not enabled".to_string()
    } else {
        let endpoint = std::path::PathBuf::from(&c.factory.vm_cache_endpoint);
        match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Err(e) => format!("unknown (no async runtime: {e})"),
            Ok(rt) => match rt.block_on(kata_sandbox::vmcache::status(&endpoint)) {
                Ok(s) => format!("serving {} VMs (server pid {})", s.vmstatus.len(), s.pid),
                Err(e) => format!("no server ({e})"),
            },
        }
    };
    EnvInfo {
        kernel: KernelInfo {
            path: h.kernel.clone(),
            parameters: h.kernel_params.clone(),
            version: kata_hypervisor::guest_kernel::version_banner(Path::new(&h.kernel))
                .unwrap_or_default(),
        },
        meta: MetaInfo {
            version: FORMAT_VERSION.to_string(),
        },
        image: PathInfo {
            path: h.image.clone(),
        },
        initrd: PathInfo {
            path: h.initrd.clone(),
        },
        hypervisor: HypervisorInfo {
            name: kind.name().to_string(),
            supported: kind.is_supported(),
            machine_type: h.machine_type.clone(),
            version,
            path,
            accelerator: toml_name(&h.accelerator),
            accelerator_in_use: in_use,
            block_device_driver: toml_name(&h.block_device_driver),
            entropy_source: h.entropy_source.clone(),
            shared_fs: toml_name(&h.shared_fs),
            virtio_fs_daemon: h.virtio_fs_daemon.clone(),
            socket_path: String::new(),
            msize9p: h.msize_9p,
            memory_slots: h.memory_slots,
            default_vcpus: h.default_vcpus,
            default_max_vcpus: h.default_maxvcpus,
            default_memory: h.default_memory,
            default_max_memory: h.default_maxmemory,
            pcie_root_port: h.pcie_root_port,
            hotplug_vfio_on_root_bus: h.hotplug_vfio_on_root_bus,
            debug: h.enable_debug,
        },
        runtime: RuntimeInfo {
            path: std::env::current_exe()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            debug: c.runtime.enable_debug,
            trace: c.runtime.enable_tracing,
            disable_guest_seccomp: c.runtime.disable_guest_seccomp,
            disable_new_net_ns: c.runtime.disable_new_netns,
            sandbox_cgroup_only: c.runtime.sandbox_cgroup_only,
            internetworking_model: toml_name(&c.runtime.internetworking_model),
            static_sandbox_resource_mgmt: c.runtime.static_resources(),
            warnings: c.warnings.iter().map(|w| w.to_string()).collect(),
            unsupported_keys: c
                .unsupported
                .iter()
                .map(|u| format!("{}.{}", u.section, u.key))
                .collect(),
            config: RuntimeConfigInfo {
                path: c.source.path.display().to_string(),
                drop_ins: c
                    .source
                    .dropins
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect(),
                found_by: c.source.found_by.to_string(),
            },
            version: RuntimeVersion {
                oci: "1.0.2".to_string(),
                version: SemVer {
                    semver: crate::VERSION.to_string(),
                    commit: crate::COMMIT.to_string(),
                    major: parts.next().unwrap_or(0),
                    minor: parts.next().unwrap_or(0),
                    patch: parts.next().unwrap_or(0),
                },
            },
        },
        host: HostInfo {
            kernel: host::kernel_release(),
            architecture: arch().to_string(),
            vm_container_capable: cpu.has(cpu.virt_flag()),
            support_v_socks: host::has_vhost_vsock(),
            distro: Distro {
                name: distro,
                version: distro_version,
            },
            cpu: Cpu {
                vendor: cpu.vendor.clone(),
                model: cpu.model.clone(),
                cpus: cpu.cpus,
            },
            memory: Memory {
                total: mem.total,
                free: mem.free,
                available: mem.available,
            },
            containerd: containerd_info(),
        },
        agent: AgentInfo {
            debug: c.agent.enable_debug,
            trace: c.agent.enable_tracing,
            debug_console_enabled: c.agent.debug_console_enabled,
            dial_timeout: c.agent.dial_timeout,
            kernel_modules: c.agent.kernel_modules.clone(),
            channel: toml_name(&c.agent.channel),
            // Template clones always speak virtio-serial (see kata_sandbox::template).
            channel_in_use: if c.factory.enable_template {
                "virtio-serial".to_string()
            } else {
                host::resolve_agent_channel(c.agent.channel)
                    .map(str::to_string)
                    .unwrap_or_else(|e| format!("unusable: {e}"))
            },
        },
        factory: FactoryInfo {
            template: c.factory.enable_template,
            template_path: c.factory.template_path.clone(),
            template_state: template_state.to_string(),
            vm_cache_number: c.factory.vm_cache_number,
            vm_cache_endpoint: c.factory.vm_cache_endpoint.clone(),
            vm_cache_state,
        },
    }
}

fn containerd_info() -> ContainerdInfo {
    use crate::containerd::Found;
    let found = crate::containerd::detect();
    let tested = found.tested();
    match found {
        Found::Missing => ContainerdInfo {
            path: String::new(),
            version: String::new(),
            tested,
        },
        Found::Unreadable { path, .. } => ContainerdInfo {
            path: path.display().to_string(),
            version: String::new(),
            tested,
        },
        Found::Version { path, text, .. } => ContainerdInfo {
            path: path.display().to_string(),
            version: text,
            tested,
        },
    }
}

fn arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// The TOML spelling of a serialisable enum value.
pub fn toml_name<T: Serialize>(value: &T) -> String {
    match toml::Value::try_from(value) {
        Ok(toml::Value::String(s)) => s,
        Ok(v) => v.to_string(),
        Err(_) => String::new(),
    }
}
