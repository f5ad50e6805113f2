//! The parts of kata-agent that need no guest, as a library: the seccomp compiler and the device
//! cgroup program (used by the agent binary, and by the fuzz targets in `fuzz/`).

pub mod devcg;
pub mod seccomp;
