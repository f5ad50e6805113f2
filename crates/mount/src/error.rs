//! What can go wrong mounting across a trust boundary. Each message names the path and the
//! step, and ends with the system's reason (also the error's source).

use std::io;
use std::path::{Path, PathBuf};

/// A mount that could not be made, or options that cannot be honoured.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    /// A mount option that this mount cannot honour (an error, never dropped).
    #[error("mount option {option:?} {why}")]
    Option {
        /// The option as given.
        option: String,
        /// Why it is refused, and what to do.
        why: &'static str,
    },
    /// A step that failed: resolving or making a path below a root, or a step of a mount.
    #[error("{context}: {source}{hint}")]
    Io {
        /// The step and the path it was about (`bind /src: attach it`).
        context: String,
        /// What usually causes it and what to do, when known (empty otherwise).
        hint: &'static str,
        /// The system's reason.
        #[source]
        source: io::Error,
    },
    /// A component that changed under the runtime while it was being made.
    #[error("{} {what}", path.display())]
    Raced {
        /// The component, as seen from the root.
        path: PathBuf,
        /// What happened.
        what: &'static str,
    },
    /// A new filesystem that could not be mounted.
    #[error("mount {fstype} {source_name}: {source}")]
    Filesystem {
        /// Its type.
        fstype: String,
        /// Its source (empty for a pseudo filesystem).
        source_name: String,
        /// The system's reason.
        #[source]
        source: nix::Error,
    },
}

impl MountError {
    /// `context` failed for the system's reason `source`.
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        MountError::Io {
            context: context.into(),
            hint: "",
            source,
        }
    }

    /// `path` changed while it was being made: `what` happened.
    pub(crate) fn raced(path: &Path, what: &'static str) -> Self {
        MountError::Raced {
            path: path.to_path_buf(),
            what,
        }
    }

    /// Whether the system's reason is "no such file or directory".
    pub fn is_not_found(&self) -> bool {
        match self {
            MountError::Io { source, .. } => source.raw_os_error() == Some(libc::ENOENT),
            MountError::Filesystem { source, .. } => *source == nix::Error::ENOENT,
            _ => false,
        }
    }
}
