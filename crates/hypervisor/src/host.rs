//! Host facts, read from /proc, /sys and `/dev/kvm`. Parsers take text so they are tested
//! without the files.

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::path::Path;

use serde::Serialize;

/// CPU description from /proc/cpuinfo.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct CpuInfo {
    /// `vendor_id`, for example `GenuineIntel`.
    pub vendor: String,
    /// `model name`.
    pub model: String,
    /// Flags of the first CPU.
    pub flags: Vec<String>,
    /// Number of processors listed.
    pub cpus: u32,
}

impl CpuInfo {
    /// Parses /proc/cpuinfo text.
    pub fn parse(text: &str) -> Self {
        let mut info = CpuInfo::default();
        for line in text.lines() {
            let Some((k, v)) = line.split_once(':') else {
                continue;
            };
            let (k, v) = (k.trim(), v.trim());
            match k {
                "processor" => info.cpus += 1,
                "vendor_id" if info.vendor.is_empty() => info.vendor = v.to_string(),
                "model name" if info.model.is_empty() => info.model = v.to_string(),
                "flags" if info.flags.is_empty() => {
                    info.flags = v.split_whitespace().map(str::to_string).collect()
                }
                _ => {}
            }
        }
        info
    }

    /// Reads this host's CPU description.
    pub fn read() -> Self {
        Self::parse(&std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default())
    }

    /// True when `flag` is present.
    pub fn has(&self, flag: &str) -> bool {
        self.flags.iter().any(|f| f == flag)
    }

    /// The hardware virtualisation flag of this vendor (`vmx` or `svm`).
    pub fn virt_flag(&self) -> &'static str {
        if self.vendor == "AuthenticAMD" {
            "svm"
        } else {
            "vmx"
        }
    }
}

/// Whether a kernel module is available.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum ModuleState {
    /// Loaded (in /sys/module).
    Loaded,
    /// Built into the kernel.
    Builtin,
    /// Neither.
    Missing,
}

/// Looks a module up under `/sys/module` and in `modules.builtin`.
pub fn module_state(name: &str) -> ModuleState {
    module_state_in(Path::new("/sys/module"), &builtin_list(), name)
}

fn builtin_list() -> String {
    let release = kernel_release();
    std::fs::read_to_string(format!("/lib/modules/{release}/modules.builtin")).unwrap_or_default()
}

/// [`module_state`] over explicit inputs.
pub fn module_state_in(sys_module: &Path, builtin: &str, name: &str) -> ModuleState {
    // A module's sysfs directory exists when loaded; built-in modules with parameters have one
    // too, so check `initstate` to tell them apart when possible.
    let dir = sys_module.join(name);
    let in_builtin = builtin.lines().any(|l| {
        l.rsplit('/')
            .next()
            .and_then(|f| f.strip_suffix(".ko"))
            .is_some_and(|m| m.replace('-', "_") == name)
    });
    if in_builtin {
        ModuleState::Builtin
    } else if dir.join("initstate").exists() || dir.exists() {
        ModuleState::Loaded
    } else {
        ModuleState::Missing
    }
}

/// `uname -r`.
pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Distribution name and version from os-release text.
pub fn parse_os_release(text: &str) -> (String, String) {
    let get = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
            .map(|v| v.trim_matches('"').to_string())
            .unwrap_or_default()
    };
    (get("NAME"), get("VERSION_ID"))
}

/// Memory figures in KiB from /proc/meminfo.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct MemInfo {
    /// MemTotal.
    pub total: u64,
    /// MemFree.
    pub free: u64,
    /// MemAvailable.
    pub available: u64,
}

impl MemInfo {
    /// Parses /proc/meminfo text.
    pub fn parse(text: &str) -> Self {
        let get = |key: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| {
                    v.trim_start_matches(':')
                        .split_whitespace()
                        .next()
                        .and_then(|n| n.parse().ok())
                })
                .unwrap_or(0)
        };
        MemInfo {
            total: get("MemTotal"),
            free: get("MemFree"),
            available: get("MemAvailable"),
        }
    }

    /// Reads this host's memory figures.
    pub fn read() -> Self {
        Self::parse(&std::fs::read_to_string("/proc/meminfo").unwrap_or_default())
    }
}

/// Result of opening `/dev/kvm` and asking it for a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum KvmDevice {
    /// `/dev/kvm` does not exist.
    Missing,
    /// It exists but could not be opened.
    NoAccess(String),
    /// `KVM_GET_API_VERSION` returned something other than 12.
    BadApiVersion(i32),
    /// `KVM_CREATE_VM` failed.
    CreateVmFailed(String),
    /// A VM file descriptor was created.
    Ok,
}

const KVM_GET_API_VERSION: libc::c_ulong = 0xAE00;
const KVM_CREATE_VM: libc::c_ulong = 0xAE01;
const KVM_API_VERSION: i32 = 12;

/// Opens `/dev/kvm`, checks its API version and creates (then closes) a VM.
pub fn probe_kvm_device(path: &Path) -> KvmDevice {
    if !path.exists() {
        return KvmDevice::Missing;
    }
    let file = match OpenOptions::new().read(true).write(true).open(path) {
        Ok(f) => f,
        Err(e) => return KvmDevice::NoAccess(e.to_string()),
    };
    let fd = file.as_raw_fd();
    // SAFETY: KVM_GET_API_VERSION takes no argument and only returns an integer.
    let version = unsafe { libc::ioctl(fd, KVM_GET_API_VERSION as _, 0) };
    if version != KVM_API_VERSION {
        return KvmDevice::BadApiVersion(version);
    }
    // SAFETY: KVM_CREATE_VM takes the machine type (0) and returns a new fd or -1.
    let vm = unsafe { libc::ioctl(fd, KVM_CREATE_VM as _, 0) };
    if vm < 0 {
        return KvmDevice::CreateVmFailed(std::io::Error::last_os_error().to_string());
    }
    // SAFETY: `vm` is a file descriptor we own and close exactly once.
    unsafe { libc::close(vm) };
    KvmDevice::Ok
}

/// True when the host kernel offers AF_VSOCK through `/dev/vhost-vsock`.
pub fn has_vhost_vsock() -> bool {
    Path::new("/dev/vhost-vsock").exists()
}

/// `[agent.kata].channel = "vsock"` on a host without vhost-vsock.
#[derive(Debug, thiserror::Error)]
#[error("[agent.kata].channel = \"vsock\" but /dev/vhost-vsock does not exist; load vhost_vsock or use \"auto\"")]
pub struct NoVsock;

/// The agent transport a configured channel resolves to on this host: `"vsock"` or
/// `"virtio-serial"`, or why it cannot be used.
pub fn resolve_agent_channel(
    kind: kata_config::runtime::AgentChannelKind,
) -> Result<&'static str, NoVsock> {
    use kata_config::runtime::AgentChannelKind as K;
    match kind {
        K::VirtioSerial => Ok("virtio-serial"),
        K::Vsock if has_vhost_vsock() => Ok("vsock"),
        K::Vsock => Err(NoVsock),
        K::Auto if has_vhost_vsock() => Ok("vsock"),
        K::Auto => Ok("virtio-serial"),
    }
}

/// True when `/dev/vhost-net` exists.
pub fn has_vhost_net() -> bool {
    Path::new("/dev/vhost-net").exists()
}

/// Why `<binary> --version` gave no version.
#[derive(Debug, thiserror::Error)]
pub enum VersionError {
    /// It ran and failed.
    #[error("exited with {status}: {stderr}")]
    Failed {
        /// How it exited.
        status: std::process::ExitStatus,
        /// What it said.
        stderr: String,
    },
    /// It could not be run.
    #[error("{0}")]
    Run(#[source] std::io::Error),
}

/// First line of `<binary> --version`, or the error.
pub fn binary_version(path: &Path) -> Result<String, VersionError> {
    match std::process::Command::new(path).arg("--version").output() {
        Ok(out) if out.status.success() => Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .unwrap_or("")
            .trim()
            .to_string()),
        Ok(out) => Err(VersionError::Failed {
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        }),
        Err(e) => Err(VersionError::Run(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cpuinfo() {
        let text = "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Xeon\nflags\t\t: fpu vmx lm sse4_1\n\nprocessor\t: 1\nvendor_id\t: GenuineIntel\nflags\t\t: fpu\n";
        let c = CpuInfo::parse(text);
        assert_eq!(
            (c.vendor.as_str(), c.model.as_str(), c.cpus),
            ("GenuineIntel", "Xeon", 2)
        );
        assert!(c.has("vmx") && c.has("sse4_1") && !c.has("svm"));
        assert_eq!(c.virt_flag(), "vmx");
        assert_eq!(
            CpuInfo::parse("vendor_id : AuthenticAMD\n").virt_flag(),
            "svm"
        );
    }

    #[test]
    fn parses_meminfo_and_os_release() {
        let m =
            MemInfo::parse("MemTotal:       24000000 kB\nMemFree:  100 kB\nMemAvailable: 200 kB\n");
        assert_eq!(
            m,
            MemInfo {
                total: 24000000,
                free: 100,
                available: 200
            }
        );
        let (n, v) = parse_os_release(
            "PRETTY_NAME=\"Debian GNU/Linux 12\"\nNAME=\"Debian GNU/Linux\"\nVERSION_ID=\"12\"\n",
        );
        assert_eq!((n.as_str(), v.as_str()), ("Debian GNU/Linux", "12"));
    }

    #[test]
    fn module_states() {
        let dir = tempfile::tempdir().expect("tmp");
        std::fs::create_dir_all(dir.path().join("kvm")).expect("mkdir");
        let builtin = "kernel/drivers/vhost/vhost.ko\nkernel/net/vmw_vsock/vmw-vsock-virtio.ko\n";
        assert_eq!(
            module_state_in(dir.path(), builtin, "kvm"),
            ModuleState::Loaded
        );
        assert_eq!(
            module_state_in(dir.path(), builtin, "vhost"),
            ModuleState::Builtin
        );
        assert_eq!(
            module_state_in(dir.path(), builtin, "vmw_vsock_virtio"),
            ModuleState::Builtin
        );
        assert_eq!(
            module_state_in(dir.path(), builtin, "vhost_net"),
            ModuleState::Missing
        );
    }

    #[test]
    fn missing_kvm_device() {
        assert_eq!(
            probe_kvm_device(Path::new("/nonexistent/kvm")),
            KvmDevice::Missing
        );
    }

    #[test]
    fn version_of_missing_binary_is_an_error() {
        assert!(binary_version(Path::new("/nonexistent/qemu")).is_err());
    }
}
