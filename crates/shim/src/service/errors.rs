//! How the shim answers errors: one table from the runtime's errors to ttrpc codes (which
//! containerd turns into its errdefs: NotFound, InvalidArgument, ...), and the message always
//! the whole chain of causes.

use kata_sandbox::SandboxError;

/// A ttrpc error with `code` and `msg`.
pub(super) fn err(code: ttrpc::Code, msg: impl std::fmt::Display) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, msg.to_string()))
}

/// `what` does not exist (a task, an exec).
pub(super) fn not_found(what: &str) -> ttrpc::Error {
    err(ttrpc::Code::NOT_FOUND, format!("{what} not found"))
}

/// The ttrpc code of each runtime error.
pub(super) fn code_of(e: &SandboxError) -> ttrpc::Code {
    match e {
        SandboxError::Invalid(_)
        | SandboxError::InvalidId { .. }
        | SandboxError::Share { .. }
        | SandboxError::Volume(_) => ttrpc::Code::INVALID_ARGUMENT,
        SandboxError::NotFound(_) => ttrpc::Code::NOT_FOUND,
        SandboxError::Resources { .. } => ttrpc::Code::RESOURCE_EXHAUSTED,
        SandboxError::Unsupported(_) => ttrpc::Code::FAILED_PRECONDITION,
        SandboxError::Cgroup(_)
        | SandboxError::Network(_)
        | SandboxError::Accelerator(_)
        | SandboxError::Io { .. }
        | SandboxError::Mount { .. }
        | SandboxError::Virtiofsd(_)
        | SandboxError::Vm(_)
        | SandboxError::AgentTimeout { .. }
        | SandboxError::AgentDial { .. }
        | SandboxError::Agent { .. } => ttrpc::Code::INTERNAL,
    }
}

/// A runtime error as the shim answers it.
pub(super) fn runtime_err(e: SandboxError) -> ttrpc::Error {
    err(code_of(&e), kata_config::error_chain(&e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(e: ttrpc::Error) -> (ttrpc::Code, String) {
        match e {
            ttrpc::Error::RpcStatus(s) => (s.code(), s.message().to_string()),
            other => panic!("not a status: {other:?}"),
        }
    }

    #[test]
    fn runtime_errors_keep_their_causes_and_get_their_codes() {
        let (code, msg) = status(runtime_err(SandboxError::Resources {
            memory_mib: 512,
            vcpus: 2,
            source: Box::new(SandboxError::Invalid(
                "the VM has at most 4 vCPUs ([hypervisor.qemu] default_maxvcpus)".into(),
            )),
        }));
        assert_eq!(code, ttrpc::Code::RESOURCE_EXHAUSTED);
        assert!(
            msg.starts_with("cannot give the VM the container's resources (512 MiB, 2 vCPUs)")
                && msg.contains("default_maxvcpus"),
            "{msg}"
        );
        let (code, _) = status(runtime_err(SandboxError::NotFound("block node x".into())));
        assert_eq!(code, ttrpc::Code::NOT_FOUND);
        let (code, _) = status(runtime_err(SandboxError::Invalid("bad".into())));
        assert_eq!(code, ttrpc::Code::INVALID_ARGUMENT);
        let (code, msg) = status(runtime_err(SandboxError::Agent {
            method: "SignalProcess",
            message: "timed out".into(),
            answered: false,
        }));
        assert_eq!(code, ttrpc::Code::INTERNAL);
        assert!(msg.contains("agent SignalProcess: timed out"), "{msg}");
    }
}
