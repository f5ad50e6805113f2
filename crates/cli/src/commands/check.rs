//! `kata-runtime check`: can this host run Kata Containers, and how.
//!
//! Exit status: 0 = can run with KVM; 2 = can run, with TCG emulation only; 1 = cannot run.
//! With `--strict`, warnings count as failures.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use kata_config::hypervisor::{Accelerator, SharedFs};
use kata_hypervisor::host::{self, CpuInfo, KvmDevice, ModuleState};
use kata_hypervisor::probe::{self, Accel, BootOutcome};

use super::release;

/// Exit status: the host can run sandboxes with KVM.
pub const EXIT_KVM: u8 = 0;
/// Exit status: the host cannot run sandboxes.
pub const EXIT_CANNOT_RUN: u8 = 1;
/// Exit status: the host can run sandboxes, emulated (TCG) only.
pub const EXIT_EMULATED: u8 = 2;
/// Environment variable equivalent to `--no-network-checks`.
pub const NO_NETWORK_ENV: &str = "KATA_CHECK_NO_NETWORK";

/// `check` flags.
#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// Show every check, not only warnings and failures.
    #[arg(short, long)]
    pub verbose: bool,
    /// Treat warnings as failures.
    #[arg(short, long)]
    pub strict: bool,
    /// Do not run checks that need the network (same as KATA_CHECK_NO_NETWORK=1).
    #[arg(short = 'n', long)]
    pub no_network_checks: bool,
    /// Only compare the installed version with the newest release (needs the network; the
    /// releases document is read from KATA_RELEASE_URL, default Kata's GitHub releases).
    #[arg(long)]
    pub check_version_only: bool,
    /// Include pre-releases in the release lookup.
    #[arg(long)]
    pub include_all_releases: bool,
    /// Only list the available releases, `version;date;url` per line (needs the network).
    #[arg(long)]
    pub only_list_releases: bool,
    /// Skip the boot probe (then KVM is judged by /dev/kvm alone).
    #[arg(long)]
    pub no_boot_probe: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Level {
    Ok,
    Info,
    Warn,
    Fail,
}

struct Report {
    verbose: bool,
    warnings: usize,
    failures: usize,
}

impl Report {
    fn line(&mut self, level: Level, what: &str, hint: Option<&str>) {
        match level {
            Level::Warn => self.warnings += 1,
            Level::Fail => self.failures += 1,
            _ => {}
        }
        if level == Level::Ok && !self.verbose {
            return;
        }
        let tag = match level {
            Level::Ok => "ok  ",
            Level::Info => "info",
            Level::Warn => "WARN",
            Level::Fail => "FAIL",
        };
        println!("[{tag}] {what}");
        if let Some(h) = hint {
            println!("       hint: {h}");
        }
    }
}

/// Runs `check`.
pub fn run(config: Option<PathBuf>, args: CheckArgs) -> anyhow::Result<ExitCode> {
    let no_network =
        args.no_network_checks || std::env::var_os(NO_NETWORK_ENV).is_some_and(|v| !v.is_empty());
    if args.check_version_only || args.only_list_releases {
        return Ok(release_lookup(
            no_network,
            args.only_list_releases,
            args.include_all_releases,
        ));
    }
    let mut r = Report {
        verbose: args.verbose,
        warnings: 0,
        failures: 0,
    };

    // CPU.
    let cpu = CpuInfo::read();
    r.line(
        Level::Ok,
        &format!(
            "CPU vendor {} ({}), {} CPUs",
            cpu.vendor, cpu.model, cpu.cpus
        ),
        None,
    );
    for (flag, what) in [("lm", "64-bit CPU"), ("sse4_1", "SSE4.1")] {
        if cpu.has(flag) {
            r.line(
                Level::Ok,
                &format!("CPU property found: {flag} ({what})"),
                None,
            );
        } else {
            r.line(
                Level::Fail,
                &format!("CPU property missing: {flag} ({what})"),
                Some("the guest kernel needs an x86-64 CPU with this feature"),
            );
        }
    }
    let virt = cpu.virt_flag();
    let has_virt = cpu.has(virt);
    let pvm = host::module_state("kvm_pvm") != ModuleState::Missing;
    if has_virt {
        r.line(
            Level::Ok,
            &format!("CPU property found: {virt} (hardware virtualisation)"),
            None,
        );
    } else if pvm {
        r.line(Level::Info, &format!("CPU property missing: {virt}; KVM is provided by kvm_pvm (PVM, paravirtualised nested KVM)"), None);
    } else {
        r.line(Level::Warn, &format!("CPU property missing: {virt} (hardware virtualisation)"), Some("enable VT-x/AMD-V in the firmware or nested virtualisation in the parent hypervisor; without it VMs run emulated (TCG)"));
    }

    // Kernel modules.
    let (kvm_vendor, vendor_what) = match (pvm, virt) {
        (true, _) => (
            "kvm_pvm",
            "KVM through PVM (runs only PVM-enabled guest kernels)",
        ),
        (false, "svm") => ("kvm_amd", "KVM for AMD CPUs"),
        _ => ("kvm_intel", "KVM for Intel CPUs"),
    };
    for (module, what, hint) in [
        ("kvm", "Kernel-based Virtual Machine", "modprobe kvm"),
        (kvm_vendor, vendor_what, "modprobe the vendor KVM module"),
        (
            "vhost",
            "Host kernel accelerator for virtio",
            "modprobe vhost",
        ),
        (
            "vhost_net",
            "Host kernel accelerator for virtio network",
            "modprobe vhost_net; without it virtio-net runs in QEMU (vhost=off)",
        ),
        (
            "vhost_vsock",
            "Host support for Linux VM sockets",
            "modprobe vhost_vsock; without it the agent channel uses a virtio-serial port",
        ),
    ] {
        match host::module_state(module) {
            ModuleState::Loaded | ModuleState::Builtin => r.line(
                Level::Ok,
                &format!("kernel module found: {module} ({what})"),
                None,
            ),
            ModuleState::Missing => r.line(
                Level::Warn,
                &format!("kernel module missing: {module} ({what})"),
                Some(hint),
            ),
        }
    }

    // /dev/kvm.
    let device = host::probe_kvm_device(Path::new("/dev/kvm"));
    match &device {
        KvmDevice::Ok => r.line(
            Level::Ok,
            "/dev/kvm opens and creates a VM (KVM_CREATE_VM)",
            None,
        ),
        KvmDevice::Missing => r.line(
            Level::Warn,
            "/dev/kvm does not exist",
            Some("load kvm and kvm_intel/kvm_amd; without KVM, VMs run emulated (TCG)"),
        ),
        KvmDevice::NoAccess(e) => r.line(
            Level::Warn,
            &format!("/dev/kvm cannot be opened: {e}"),
            Some("run as root or add the user to the kvm group"),
        ),
        KvmDevice::BadApiVersion(v) => r.line(
            Level::Warn,
            &format!("/dev/kvm has API version {v}, expected 12"),
            Some("upgrade the host kernel"),
        ),
        KvmDevice::CreateVmFailed(e) => r.line(
            Level::Warn,
            &format!("/dev/kvm refuses KVM_CREATE_VM: {e}"),
            Some("another hypervisor may hold VT-x; VMs run emulated (TCG)"),
        ),
    }

    // Configuration.
    let config = match super::env::effective_config(config, &[]) {
        Ok(c) => c,
        Err(e) => {
            r.line(
                Level::Fail,
                &format!("configuration: {}", crate::chain(&e)),
                Some("fix the file, or point KATA_CONF_FILE / --config at a valid one"),
            );
            return Ok(finish(&r, None, args.strict));
        }
    };
    r.line(
        Level::Ok,
        &format!(
            "configuration {} loads ({} drop-ins)",
            config.source.path.display(),
            config.source.dropins.len()
        ),
        None,
    );
    for w in &config.warnings {
        r.line(Level::Info, &format!("configuration: {w}"), None);
    }
    for u in &config.unsupported {
        r.line(
            Level::Warn,
            &format!(
                "configuration: [{}].{} is set but not supported by this runtime yet",
                u.section, u.key
            ),
            Some("remove the key or set it back to its default"),
        );
    }
    let kind = config.hypervisor_kind;
    if !kind.is_supported() {
        r.line(
            Level::Fail,
            &format!("hypervisor {kind} is not supported by this runtime"),
            Some("use configuration-qemu.toml"),
        );
        return Ok(finish(&r, None, args.strict));
    }
    let h = &config.hypervisor;
    let qemu = PathBuf::from(h.effective_path(kind));
    match host::binary_version(&qemu) {
        Ok(v) => r.line(
            Level::Ok,
            &format!("hypervisor {} runs: {v}", qemu.display()),
            None,
        ),
        Err(e) => r.line(
            Level::Fail,
            &format!(
                "hypervisor {} ([hypervisor.{kind}].path) cannot run: {e}",
                qemu.display()
            ),
            Some("install QEMU (make install) or fix [hypervisor.qemu].path"),
        ),
    }
    for (key, path) in [
        ("kernel", &h.kernel),
        ("initrd", &h.initrd),
        ("image", &h.image),
    ] {
        if path.is_empty() {
            continue;
        }
        if Path::new(path).exists() {
            r.line(Level::Ok, &format!("guest {key} {path} exists"), None);
        } else {
            r.line(
                Level::Fail,
                &format!("guest {key} {path} ([hypervisor.{kind}].{key}) does not exist"),
                Some("build and install the guest with 'make install'"),
            );
        }
    }
    if h.shared_fs == SharedFs::VirtioFs {
        let d = Path::new(&h.virtio_fs_daemon);
        if d.exists() {
            r.line(
                Level::Ok,
                &format!("virtio-fs daemon {} exists", d.display()),
                None,
            );
        } else {
            r.line(
                Level::Fail,
                &format!(
                    "virtio-fs daemon {} ([hypervisor.{kind}].virtio_fs_daemon) does not exist",
                    d.display()
                ),
                Some("install virtiofsd (make install) or set shared_fs = \"virtio-9p\""),
            );
        }
    }
    if host::has_vhost_vsock() {
        r.line(
            Level::Ok,
            "/dev/vhost-vsock exists: the agent channel uses kernel vsock",
            None,
        );
    } else {
        r.line(
            Level::Info,
            "/dev/vhost-vsock is missing: the agent channel will use a virtio-serial port",
            None,
        );
    }
    if !host::has_vhost_net() {
        r.line(
            Level::Info,
            "/dev/vhost-net is missing: virtio-net runs in QEMU (vhost=off)",
            None,
        );
    }
    containerd_line(&mut r);
    if no_network {
        r.line(
            Level::Info,
            "network checks skipped (--no-network-checks / KATA_CHECK_NO_NETWORK)",
            None,
        );
    }

    // Accelerator.
    let accel = match h.accelerator {
        Accelerator::Tcg => {
            r.line(
                Level::Info,
                "[hypervisor.qemu].accelerator = \"tcg\": VMs always run emulated",
                None,
            );
            Some(Accel::Tcg)
        }
        _ if args.no_boot_probe => {
            if device == KvmDevice::Ok {
                Some(Accel::Kvm)
            } else {
                Some(Accel::Tcg)
            }
        }
        _ => boot_probe(&mut r, &qemu, Path::new(&h.kernel), h.accelerator, pvm),
    };
    let accel = match (h.accelerator, accel) {
        (Accelerator::Kvm, Some(Accel::Tcg)) => {
            r.line(
                Level::Fail,
                "[hypervisor.qemu].accelerator = \"kvm\" but KVM cannot boot the guest here",
                Some("set accelerator = \"auto\" to fall back to TCG emulation"),
            );
            None
        }
        (_, a) => a,
    };
    Ok(finish(&r, accel, args.strict))
}

fn boot_probe(
    r: &mut Report,
    qemu: &Path,
    kernel: &Path,
    mode: Accelerator,
    pvm: bool,
) -> Option<Accel> {
    if !qemu.exists() || !kernel.exists() {
        r.line(
            Level::Fail,
            "boot probe not run: the hypervisor or the kernel is missing",
            None,
        );
        return None;
    }
    let report = match probe::probe(
        qemu,
        kernel,
        if mode == Accelerator::Auto {
            probe::ProbeScope::KvmAndTcg
        } else {
            probe::ProbeScope::KvmThenTcg
        },
    ) {
        Ok(rep) => rep,
        Err(e) => {
            r.line(
                Level::Fail,
                &format!("boot probe failed: {}", kata_config::error_chain(&e)),
                None,
            );
            return None;
        }
    };
    let name = kata_hypervisor::guest_kernel::release(kernel)
        .map(|r| format!("the guest kernel {r}"))
        .unwrap_or_else(|| "the guest kernel".to_string());
    let describe = |o: &BootOutcome| {
        if o.booted {
            format!(
                "{name} boots with {} ({} ms from QEMU start to the root-mount stage)",
                o.accel.name(),
                o.elapsed_ms
            )
        } else {
            format!(
                "{name} does not boot with {}: {}",
                o.accel.name(),
                o.failure.clone().unwrap_or_default()
            )
        }
    };
    if let Some(k) = &report.kvm {
        if k.booted {
            r.line(Level::Ok, &describe(k), None);
        } else {
            let hint = if pvm {
                "/dev/kvm is provided by kvm_pvm (PVM), which cannot run a stock guest kernel. The runtime falls back to TCG emulation"
            } else {
                "/dev/kvm works but cannot run a stock kernel: typical of nested or paravirtualised KVM (for example PVM). The runtime falls back to TCG emulation"
            };
            r.line(Level::Warn, &describe(k), Some(hint));
        }
    }
    if let Some(t) = &report.tcg {
        r.line(
            if t.booted { Level::Ok } else { Level::Fail },
            &describe(t),
            (!t.booted).then_some("check the QEMU installation and the kernel file"),
        );
        if t.booted && report.chosen() == Some(Accel::Tcg) {
            let secs = Duration::from_millis(t.elapsed_ms).as_secs_f64();
            r.line(Level::Info, &format!("VMs will run under TCG emulation: about {secs:.1} s of kernel boot per sandbox and several times slower guest CPU than KVM"), None);
        }
    }
    report.chosen()
}

/// The host's containerd: its version, and a warning for a series `make test` does not run.
fn containerd_line(r: &mut Report) {
    use crate::containerd::{self, Found};
    let found = containerd::detect();
    match &found {
        Found::Missing => r.line(
            Level::Info,
            "no containerd found on PATH (nor in /usr/bin, /usr/local/bin, /opt/containerd/bin)",
            Some("the runtime plugs into containerd as runtime type io.containerd.kata.v2 (docs/containerd.md)"),
        ),
        Found::Unreadable { path, output } => r.line(
            Level::Warn,
            &format!(
                "containerd {} did not tell its version: {output:?}",
                path.display()
            ),
            Some("check that it is containerd and that it runs"),
        ),
        Found::Version { path, text, .. } if found.tested() => r.line(
            Level::Ok,
            &format!(
                "containerd {text} ({}): a tested version ({})",
                path.display(),
                containerd::tested_list()
            ),
            None,
        ),
        Found::Version { path, text, .. } => r.line(
            Level::Warn,
            &format!(
                "containerd {text} ({}) is not a version this runtime is tested with ({})",
                path.display(),
                containerd::tested_list()
            ),
            Some("it may work; docs/containerd.md has the configuration for 1.6/1.7 (version 2) and 2.x (version 3)"),
        ),
    }
}

fn finish(r: &Report, accel: Option<Accel>, strict: bool) -> ExitCode {
    let failed = r.failures > 0 || (strict && r.warnings > 0);
    println!();
    if failed || accel.is_none() {
        println!(
            "System cannot run Kata Containers ({} failures, {} warnings{})",
            r.failures,
            r.warnings,
            if strict { ", --strict" } else { "" }
        );
        return ExitCode::from(EXIT_CANNOT_RUN);
    }
    println!("System is capable of running Kata Containers");
    match accel {
        Some(Accel::Kvm) => {
            println!("System can currently create Kata Containers with KVM");
            ExitCode::from(EXIT_KVM)
        }
        _ => {
            println!("System can currently create Kata Containers with TCG emulation only (no usable KVM)");
            ExitCode::from(EXIT_EMULATED)
        }
    }
}

fn release_lookup(no_network: bool, list: bool, include_all: bool) -> ExitCode {
    if no_network {
        eprintln!("kata-runtime: release lookup needs the network, and network checks are disabled (--no-network-checks or {NO_NETWORK_ENV})");
        return ExitCode::from(EXIT_CANNOT_RUN);
    }
    let current = match semver::Version::parse(crate::VERSION) {
        Ok(v) => v,
        Err(e) => {
            eprintln!(
                "kata-runtime: this build's version {:?} is not a semantic version: {e}",
                crate::VERSION
            );
            return ExitCode::from(EXIT_CANNOT_RUN);
        }
    };
    let url = release::release_url();
    tracing::info!(url, "looking for releases");
    match release::fetch(&url, include_all) {
        Ok(releases) => {
            if list {
                for line in release::list_lines(&releases) {
                    println!("{line}");
                }
            } else {
                println!("{}", release::check_line(&current, &releases));
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("kata-runtime: {}", crate::chain(&e));
            ExitCode::from(EXIT_CANNOT_RUN)
        }
    }
}
