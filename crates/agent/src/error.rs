//! What fails in the guest outside a container's bookkeeping: a step of a container's setup
//! (mounts, devices, namespaces, the terminal), a volume, a tool the agent runs. Each error
//! names the step and what it was about; the system's reason is its source (and ends its
//! message, so that the text sent to the host is whole).

use std::error::Error as StdError;

/// A step in the guest that failed.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    /// A step that failed for a reason of the system (an I/O error, an errno, a mount).
    #[error("{what}: {source}")]
    Step {
        /// The step and what it was about (`open /dev/ptmx`, `mount /proc (proc proc)`).
        what: String,
        /// The system's reason.
        #[source]
        source: Box<dyn StdError + Send + Sync>,
    },
    /// What the spec or the request asks for that cannot be done here, and what to do.
    #[error("{0}")]
    Invalid(String),
    /// A seccomp profile that cannot be compiled or installed.
    #[error(transparent)]
    Seccomp(#[from] crate::seccomp::SeccompError),
    /// Device rules that cannot be enforced.
    #[error(transparent)]
    Devcg(#[from] crate::devcg::DevcgError),
    /// Something the guest does not have (a device, a volume's block device) or that did not
    /// happen in time.
    #[error("{0}")]
    Missing(String),
}

impl GuestError {
    /// The errno at the root of the error, if the system gave one.
    pub fn errno(&self) -> Option<nix::Error> {
        let mut cur: Option<&(dyn StdError + 'static)> = Some(self);
        while let Some(e) = cur {
            if let Some(n) = e.downcast_ref::<nix::Error>() {
                return Some(*n);
            }
            if let Some(code) = e
                .downcast_ref::<std::io::Error>()
                .and_then(std::io::Error::raw_os_error)
            {
                return Some(nix::Error::from_raw(code));
            }
            cur = e.source();
        }
        None
    }
}

/// The step `what` failed for the reason `e`: for `map_err`.
pub fn step<E>(what: impl Into<String>) -> impl FnOnce(E) -> GuestError
where
    E: StdError + Send + Sync + 'static,
{
    let what = what.into();
    move |e| GuestError::Step {
        what,
        source: Box::new(e),
    }
}

/// The step `what` failed with the calling thread's last OS error.
pub fn last_os_error(what: impl Into<String>) -> GuestError {
    step(what)(std::io::Error::last_os_error())
}

/// `GuestError::Invalid` from a message.
pub fn invalid(msg: impl Into<String>) -> GuestError {
    GuestError::Invalid(msg.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_step_keeps_its_cause_and_its_text() {
        let e = step("open /dev/ptmx")(std::io::Error::from_raw_os_error(libc::ENOENT));
        assert_eq!(
            e.to_string(),
            "open /dev/ptmx: No such file or directory (os error 2)"
        );
        let cause = e.source().and_then(|s| s.downcast_ref::<std::io::Error>());
        assert_eq!(cause.and_then(|c| c.raw_os_error()), Some(libc::ENOENT));
        let e = step("mount /x")(nix::Error::EPERM);
        assert!(e.source().is_some_and(|s| s.is::<nix::Error>()), "{e:?}");
    }
}
