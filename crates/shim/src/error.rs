//! The shim's own errors, outside the Task API (whose errors are the runtime's, mapped in
//! [`crate::service`]): starting and deleting a shim, its arguments, the monitor socket, OCI
//! hooks, the rootfs mounts. Each names the step and what it was about; the system's reason is
//! its source (and ends its message).

use std::error::Error as StdError;

/// A step of the shim that failed.
#[derive(Debug, thiserror::Error)]
pub enum ShimError {
    /// A step that failed for a reason of the system.
    #[error("{what}: {source}")]
    Step {
        /// The step and what it was about (`write <bundle>/address`).
        what: String,
        /// The reason.
        #[source]
        source: Box<dyn StdError + Send + Sync>,
    },
    /// A bad argument, annotation, hook or request, and what to do.
    #[error("{0}")]
    Invalid(String),
    /// Something the shim waited for that did not come (a daemon that does not listen, a pod
    /// sandbox's shim that does not answer, a hook that does not finish).
    #[error("{0}")]
    Unavailable(String),
}

/// The step `what` failed for the reason `e`: for `map_err`.
pub fn step<E>(what: impl Into<String>) -> impl FnOnce(E) -> ShimError
where
    E: StdError + Send + Sync + 'static,
{
    let what = what.into();
    move |e| ShimError::Step {
        what,
        source: Box::new(e),
    }
}

/// `ShimError::Invalid` from a message.
pub fn invalid(msg: impl Into<String>) -> ShimError {
    ShimError::Invalid(msg.into())
}

/// The step `what` failed with the calling thread's last OS error.
pub fn last_os_error(what: impl Into<String>) -> ShimError {
    step(what)(std::io::Error::last_os_error())
}
