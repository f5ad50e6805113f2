//! Hypervisor layer.
//!
//! - [`guest_kernel`]: a guest kernel file's version banner, read without booting it;
//! - [`host`]: what this host offers (CPU, kernel modules, `/dev/kvm`, vsock, memory);
//! - [`pidfd`]: process descriptors of processes this one did not start (VMCache);
//! - [`probe`]: the boot probe that tells whether KVM can really boot the guest kernel, and the
//!   accelerator choice that follows from it (cached per boot of the host);
//! - [`qemu`]: the QEMU command line, QMP client and VM lifecycle;
//! - [`virtiofsd`]: the per-sandbox virtio-fs daemon.

pub mod guest_kernel;
pub mod host;
pub mod pidfd;
pub mod probe;
pub mod qemu;
pub mod virtiofsd;

pub use probe::{Accel, ProbeReport};
