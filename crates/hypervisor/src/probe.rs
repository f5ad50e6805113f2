//! The boot probe: boot the configured guest kernel with no root filesystem and wait for its
//! "VFS: Unable to mount root fs" panic. Reaching it proves the kernel ran to the point where it
//! looks for userspace; `panic=-1` and `-no-reboot` make QEMU exit right after. On a host where
//! `/dev/kvm` works but cannot run a stock kernel (nested PVM), the KVM probe shows nothing past
//! the firmware and times out; the runtime then uses TCG emulation.
//!
//! Results are cached in [`CACHE_PATH`] (a tmpfs, so once per host boot), keyed by the QEMU and
//! kernel files and the host kernel release.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::host::{kernel_release, probe_kvm_device, KvmDevice};

/// Where probe results are cached.
pub const CACHE_PATH: &str = "/run/kata-containers/accel-probe.json";
/// How long KVM may take to reach the panic (a working KVM needs well under a second).
pub const KVM_DEADLINE: Duration = Duration::from_secs(6);
/// How long KVM may take from the firmware's hand-over ([`HANDOVER`]) to the kernel's banner
/// ([`BANNER`]): a working KVM needs milliseconds; where `/dev/kvm` cannot run a stock kernel
/// (nested PVM) nothing ever comes, and the probe says so this soon instead of at
/// [`KVM_DEADLINE`].
pub const KVM_HANDOVER_DEADLINE: Duration = Duration::from_millis(2000);
/// SeaBIOS's last line before it jumps to the kernel QEMU loaded.
const HANDOVER: &str = "Booting from ROM";
/// The kernel's first line (`pr_notice`, shown with `loglevel=6`).
const BANNER: &str = "Linux version";
/// How long TCG may take (about 4 s on a 2-core host with Debian's generic kernel).
pub const TCG_DEADLINE: Duration = Duration::from_secs(40);
const MARKER: &str = "VFS: Unable to mount root fs";

/// An accelerator QEMU can use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// Hardware virtualisation.
    Kvm,
    /// Software emulation.
    Tcg,
}

impl Accel {
    /// QEMU's `-accel` name.
    pub fn name(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// Outcome of one boot attempt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootOutcome {
    /// Accelerator tried.
    pub accel: Accel,
    /// True when the kernel reached the root-mount panic.
    pub booted: bool,
    /// Milliseconds from QEMU spawn to the panic (or to giving up).
    pub elapsed_ms: u64,
    /// Why it failed, when it did.
    pub failure: Option<String>,
    /// Last lines of the console (for diagnosis).
    pub console_tail: String,
}

/// Errors of the probe itself (not of the guest).
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The QEMU binary is missing.
    #[error("hypervisor binary {0} does not exist ([hypervisor.qemu].path)")]
    NoQemu(PathBuf),
    /// The kernel is missing.
    #[error("guest kernel {0} does not exist ([hypervisor.qemu].kernel)")]
    NoKernel(PathBuf),
    /// Spawning or supervising QEMU failed.
    #[error("failed to run {path}")]
    Spawn {
        /// QEMU path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// Probe results for one (QEMU, kernel, host kernel) combination.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeReport {
    /// What the results are valid for.
    pub key: ProbeKey,
    /// `/dev/kvm` state, as text.
    pub kvm_device: String,
    /// KVM boot attempt, when `/dev/kvm` allowed one.
    pub kvm: Option<BootOutcome>,
    /// TCG boot attempt, when made.
    pub tcg: Option<BootOutcome>,
}

impl ProbeReport {
    /// The accelerator `auto` picks: KVM when it booted, else TCG when it booted (or was not
    /// tried), else none.
    pub fn chosen(&self) -> Option<Accel> {
        if self.kvm.as_ref().is_some_and(|o| o.booted) {
            Some(Accel::Kvm)
        } else if self.tcg.as_ref().is_none_or(|o| o.booted) {
            Some(Accel::Tcg)
        } else {
            None
        }
    }
}

/// Identity of the inputs of a probe.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeKey {
    /// QEMU binary.
    pub qemu: PathBuf,
    /// Kernel.
    pub kernel: PathBuf,
    /// Kernel file size and modification time (seconds).
    pub kernel_stamp: (u64, u64),
    /// Host `uname -r`.
    pub host_kernel: String,
}

impl ProbeKey {
    /// Builds the key for the given files.
    pub fn new(qemu: &Path, kernel: &Path) -> Self {
        let stamp = std::fs::metadata(kernel)
            .map(|m| {
                let mtime = m
                    .modified()
                    .ok()
                    .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                    .map(|d| d.as_secs())
                    .unwrap_or(0);
                (m.len(), mtime)
            })
            .unwrap_or((0, 0));
        ProbeKey {
            qemu: qemu.to_path_buf(),
            kernel: kernel.to_path_buf(),
            kernel_stamp: stamp,
            host_kernel: kernel_release(),
        }
    }
}

/// The QEMU arguments of a probe boot (pure, tested).
pub fn probe_args(kernel: &Path, accel: Accel) -> Vec<String> {
    let cpu = match accel {
        // QEMU 7.2 aborts on a bare `-cpu host` on these hosts (MSR 0x10a).
        Accel::Kvm => "host,pmu=off,-arch-capabilities",
        Accel::Tcg => "max",
    };
    [
        "-accel",
        accel.name(),
        "-machine",
        "q35",
        "-cpu",
        cpu,
        "-m",
        "256",
        "-smp",
        "1",
        "-nodefaults",
        "-nographic",
        "-no-reboot",
        "-serial",
        "stdio",
        "-kernel",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([
        kernel.display().to_string(),
        "-append".to_string(),
        // loglevel 6 shows the banner (notice) and the panic, not the info lines.
        "console=ttyS0 panic=-1 loglevel=6 root=/dev/kata-probe-no-root".to_string(),
    ])
    .collect()
}

/// Boots `kernel` with `accel` and waits up to `deadline` for the root-mount panic.
pub fn boot_once(
    qemu: &Path,
    kernel: &Path,
    accel: Accel,
    deadline: Duration,
) -> Result<BootOutcome, ProbeError> {
    if !qemu.exists() {
        return Err(ProbeError::NoQemu(qemu.to_path_buf()));
    }
    if !kernel.exists() {
        return Err(ProbeError::NoKernel(kernel.to_path_buf()));
    }
    let spawn_err = |source| ProbeError::Spawn {
        path: qemu.to_path_buf(),
        source,
    };
    let start = Instant::now();
    let mut child = Command::new(qemu)
        .args(probe_args(kernel, accel))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn_err)?;
    let mut stdout = child
        .stdout
        .take()
        .ok_or_else(|| spawn_err(std::io::Error::other("no stdout pipe")))?;
    // Read the console on a thread; the main thread enforces the deadline.
    let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let mut console = Vec::new();
    let mut booted = false;
    let mut failure = None;
    // When the firmware handed over to the kernel, until the kernel's banner shows.
    let mut handed_over: Option<Instant> = None;
    let mut kernel_started = false;
    loop {
        let left = deadline.saturating_sub(start.elapsed());
        match rx.recv_timeout(left.min(Duration::from_millis(100))) {
            Ok(chunk) => {
                console.extend_from_slice(&chunk);
                let text = String::from_utf8_lossy(&console);
                if text.contains(MARKER) {
                    booted = true;
                    break;
                }
                kernel_started = kernel_started || text.contains(BANNER);
                if handed_over.is_none() && text.contains(HANDOVER) {
                    handed_over = Some(Instant::now());
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                let status = child.wait().map_err(spawn_err)?;
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    let _ = e.read_to_string(&mut err);
                }
                failure = Some(format!(
                    "QEMU exited ({status}) before the kernel booted: {}",
                    err.trim()
                ));
                break;
            }
        }
        if accel == Accel::Kvm && !kernel_started {
            if let Some(t) = handed_over.filter(|t| t.elapsed() >= KVM_HANDOVER_DEADLINE) {
                failure = Some(format!(
                    "the kernel printed nothing within {} ms of the firmware handing over to it",
                    t.elapsed().as_millis()
                ));
                break;
            }
        }
        if start.elapsed() >= deadline {
            failure = Some(format!(
                "the kernel printed nothing past the firmware within {} s",
                deadline.as_secs()
            ));
            break;
        }
    }
    let elapsed_ms = start.elapsed().as_millis() as u64;
    let _ = child.kill();
    let _ = child.wait();
    let _ = reader.join();
    let text = String::from_utf8_lossy(&console);
    let tail: Vec<&str> = text.lines().rev().take(6).collect();
    let console_tail = tail.into_iter().rev().collect::<Vec<_>>().join("\n");
    Ok(BootOutcome {
        accel,
        booted,
        elapsed_ms,
        failure,
        console_tail,
    })
}

/// How much of the probe to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeScope {
    /// KVM, and TCG as well (`kata-runtime check` with `accelerator = "auto"`).
    KvmAndTcg,
    /// KVM, and TCG only when KVM fails.
    KvmThenTcg,
    /// KVM only: the runtime's `auto` choice when nothing is cached (TCG needs no probe to be
    /// chosen).
    KvmOnly,
}

/// Runs the probe: KVM (when `/dev/kvm` can create a VM) and TCG as `scope` says. Writes the
/// cache.
pub fn probe(qemu: &Path, kernel: &Path, scope: ProbeScope) -> Result<ProbeReport, ProbeError> {
    let device = probe_kvm_device(Path::new("/dev/kvm"));
    let kvm = if device == KvmDevice::Ok {
        Some(boot_once(qemu, kernel, Accel::Kvm, KVM_DEADLINE)?)
    } else {
        None
    };
    let kvm_ok = kvm.as_ref().is_some_and(|o| o.booted);
    let with_tcg = match scope {
        ProbeScope::KvmAndTcg => true,
        ProbeScope::KvmThenTcg => !kvm_ok,
        ProbeScope::KvmOnly => false,
    };
    let tcg = if with_tcg {
        Some(boot_once(qemu, kernel, Accel::Tcg, TCG_DEADLINE)?)
    } else {
        None
    };
    let report = ProbeReport {
        key: ProbeKey::new(qemu, kernel),
        kvm_device: format!("{device:?}"),
        kvm,
        tcg,
    };
    store_cache(Path::new(CACHE_PATH), &report);
    Ok(report)
}

/// The cached report for these files, if any and still valid.
pub fn cached(qemu: &Path, kernel: &Path) -> Option<ProbeReport> {
    load_cache(Path::new(CACHE_PATH), &ProbeKey::new(qemu, kernel))
}

fn load_cache(path: &Path, key: &ProbeKey) -> Option<ProbeReport> {
    let text = std::fs::read_to_string(path).ok()?;
    let report: ProbeReport = serde_json::from_str(&text).ok()?;
    (report.key == *key).then_some(report)
}

fn store_cache(path: &Path, report: &ProbeReport) {
    let Ok(text) = serde_json::to_string_pretty(report) else {
        return;
    };
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let tmp = path.with_extension("tmp");
    if std::fs::write(&tmp, text).is_ok() {
        let _ = std::fs::rename(&tmp, path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(accel: Accel, booted: bool) -> BootOutcome {
        BootOutcome {
            accel,
            booted,
            elapsed_ms: 1,
            failure: None,
            console_tail: String::new(),
        }
    }

    fn report(kvm: Option<bool>, tcg: Option<bool>) -> ProbeReport {
        ProbeReport {
            key: ProbeKey {
                qemu: "/q".into(),
                kernel: "/k".into(),
                kernel_stamp: (1, 2),
                host_kernel: "h".into(),
            },
            kvm_device: "Ok".into(),
            kvm: kvm.map(|b| outcome(Accel::Kvm, b)),
            tcg: tcg.map(|b| outcome(Accel::Tcg, b)),
        }
    }

    #[test]
    fn choice_prefers_kvm_then_tcg() {
        assert_eq!(report(Some(true), None).chosen(), Some(Accel::Kvm));
        assert_eq!(report(Some(true), Some(true)).chosen(), Some(Accel::Kvm));
        assert_eq!(report(Some(false), Some(true)).chosen(), Some(Accel::Tcg));
        assert_eq!(report(None, Some(true)).chosen(), Some(Accel::Tcg));
        assert_eq!(report(Some(false), Some(false)).chosen(), None);
    }

    #[test]
    fn probe_args_per_accelerator() {
        let a = probe_args(Path::new("/k"), Accel::Kvm);
        assert_eq!(&a[..2], ["-accel", "kvm"]);
        assert!(a.contains(&"host,pmu=off,-arch-capabilities".to_string()));
        let t = probe_args(Path::new("/k"), Accel::Tcg);
        assert!(t.contains(&"max".to_string()) && t.contains(&"-no-reboot".to_string()));
        assert!(t.last().is_some_and(|s| s.contains("panic=-1")));
    }

    #[test]
    fn cache_round_trip_and_key_mismatch() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("sub/probe.json");
        let r = report(Some(false), Some(true));
        store_cache(&path, &r);
        assert_eq!(load_cache(&path, &r.key), Some(r.clone()));
        let mut other = r.key.clone();
        other.kernel_stamp = (9, 9);
        assert_eq!(
            load_cache(&path, &other),
            None,
            "a changed kernel invalidates the cache"
        );
    }

    #[test]
    fn missing_files_are_named() {
        let e = boot_once(
            Path::new("/nonexistent/qemu"),
            Path::new("/k"),
            Accel::Tcg,
            KVM_DEADLINE,
        )
        .expect_err("no qemu");
        assert!(e
            .to_string()
            .contains("/nonexistent/qemu does not exist ([hypervisor.qemu].path)"));
    }
}
