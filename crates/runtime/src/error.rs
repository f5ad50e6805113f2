//! Errors of the runtime core.

use kata_hypervisor::qemu::vm::VmError;
use kata_hypervisor::virtiofsd::VirtiofsdError;

/// Everything that can fail while running a sandbox.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// The configuration cannot run here.
    #[error("{0}")]
    Unsupported(String),
    /// An id that cannot name a directory safely.
    #[error("invalid {kind} id {id:?}: use letters, digits, '_', '+', '-' and '.' (not '.' or '..'), at most 128 characters")]
    InvalidId {
        /// What it identifies.
        kind: &'static str,
        /// The id (truncated).
        id: String,
    },
    /// The sandbox's host cgroups could not be set up.
    #[error("host cgroups ([runtime].sandbox_cgroup_only): {0}")]
    Cgroup(String),
    /// The pod network could not be set up.
    #[error("pod network: {0}")]
    Network(String),
    /// The accelerator choice failed.
    #[error("no usable accelerator: {0}")]
    Accelerator(String),
    /// A file or directory operation failed.
    #[error("{what} {path}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// Path.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A mount failed.
    #[error("failed to mount {source_path} on {target}: {errno}")]
    Mount {
        /// Source.
        source_path: String,
        /// Target.
        target: String,
        /// Error.
        errno: nix::errno::Errno,
    },
    /// A host path could not be shared with the guest (a bad option, a mount point that cannot
    /// be made safely, or the bind itself).
    #[error("cannot share {source_path} with the guest (at {target}): {source}")]
    Share {
        /// Source.
        source_path: String,
        /// Target.
        target: String,
        /// Why.
        #[source]
        source: kata_mount::MountError,
    },
    /// virtiofsd failed.
    #[error("virtiofsd")]
    Virtiofsd(#[from] VirtiofsdError),
    /// QEMU failed.
    #[error("hypervisor")]
    Vm(#[from] VmError),
    /// The agent did not answer.
    #[error("the agent did not answer ({reason}); waited up to {timeout} s ([agent.kata].dial_timeout); guest console: {console}")]
    AgentTimeout {
        /// Seconds waited.
        timeout: u32,
        /// Last error.
        reason: String,
        /// Tail of the guest console.
        console: String,
    },
    /// Dialing failed (wrapped into AgentTimeout with the console by the sandbox).
    #[error("agent dial: {reason}")]
    AgentDial {
        /// Cause.
        reason: String,
    },
    /// An agent call failed.
    #[error("agent {method}: {message}")]
    Agent {
        /// Method.
        method: &'static str,
        /// The agent's message.
        message: String,
        /// The agent answered (with an error). False: no answer came (a timeout, a lost
        /// connection): the guest is hung, stopped or gone.
        answered: bool,
    },
    /// The VM cannot be given what a container asks for.
    #[error("cannot give the VM the container's resources ({memory_mib} MiB, {vcpus} vCPUs)")]
    Resources {
        /// Memory asked for, MiB.
        memory_mib: u32,
        /// vCPUs asked for.
        vcpus: u32,
        /// Why.
        #[source]
        source: Box<SandboxError>,
    },
    /// Bad OCI spec or request.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// Unknown container or process.
    #[error("{0} not found")]
    NotFound(String),
    /// A direct volume cannot be used.
    #[error("direct volume")]
    Volume(#[from] crate::direct_volume::VolumeError),
}

impl SandboxError {
    /// An agent call that got no answer (see [`SandboxError::Agent`]).
    pub fn unanswered(&self) -> bool {
        matches!(
            self,
            SandboxError::Agent {
                answered: false,
                ..
            }
        )
    }
}
