//! Choosing the accelerator: the configuration's `accelerator`, and for `auto` the boot probe
//! (cached per host boot by `kata-runtime check` or by the first sandbox).

use std::path::Path;

use kata_config::hypervisor::{Accelerator, HypervisorConfig};
use kata_hypervisor::host::{probe_kvm_device, KvmDevice};
use kata_hypervisor::probe::{self, Accel};

use crate::error::SandboxError;

/// Picks KVM or TCG for `h`.
pub fn choose(h: &HypervisorConfig, qemu: &Path) -> Result<Accel, SandboxError> {
    let device = probe_kvm_device(Path::new("/dev/kvm"));
    match h.accelerator {
        Accelerator::Tcg => Ok(Accel::Tcg),
        Accelerator::Kvm if device == KvmDevice::Ok => Ok(Accel::Kvm),
        Accelerator::Kvm => Err(SandboxError::Accelerator(format!(
            "[hypervisor.qemu].accelerator = \"kvm\" but /dev/kvm is unusable ({device:?}); set accelerator = \"auto\" or \"tcg\""
        ))),
        Accelerator::Auto if device != KvmDevice::Ok => Ok(Accel::Tcg),
        Accelerator::Auto => {
            let kernel = Path::new(&h.kernel);
            if let Some(chosen) = probe::cached(qemu, kernel).and_then(|r| r.chosen()) {
                return Ok(chosen);
            }
            let report = probe::probe(qemu, kernel, probe::ProbeScope::KvmOnly).map_err(|e| SandboxError::Accelerator(e.to_string()))?;
            report.chosen().ok_or_else(|| SandboxError::Accelerator("neither KVM nor TCG boots the guest kernel; run 'kata-runtime check'".into()))
        }
    }
}
