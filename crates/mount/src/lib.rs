//! Mounts across a trust boundary, shared by the agent (mounts in a container's root, which an
//! image wrote) and the runtime (binds into the directory shared with a guest).
//!
//! - [`options`]: OCI mount options as runc reads them, `rro` and the other recursive
//!   attributes included; what a bind mount cannot honour is an error.
//! - [`safe`]: mount points resolved inside a root with `openat2(RESOLVE_IN_ROOT)`, created
//!   below descriptors, returned as descriptors.
//! - [`bind`]: bind mounts made whole (read-only, attributes) before they are attached;
//! - [`error`]: what went wrong ([`MountError`]), with the system's reason as its source.

pub mod bind;
pub mod error;
pub mod options;
pub mod safe;

pub use bind::{bind, finish_fs_mount, mount_fs};
pub use error::MountError;
pub use options::{parse, Attr, MountOptions};
pub use safe::{create_in_root, open_dir, open_in_root, Kind};
