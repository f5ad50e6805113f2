//! Guest hooks (`[hypervisor.*].guest_hook_path`, as Kata): executables in the guest image under
//! `<path>/{prestart,poststart,poststop}/`, run by the agent in the guest's own namespaces, in
//! the lexical order of their names, for every container: `prestart` once it is created and
//! before its process starts (a failure fails the create), `poststart` after it started and
//! `poststop` after its processes are gone (failures go to the console). Each gets the
//! container's OCI state as JSON on stdin (its `bundle` is the container's directory in the
//! shared filesystem, with the root filesystem at `<bundle>/rootfs`), its own path as argv[0] and
//! the hook kind as argv[1], and 10 seconds.

use crate::error::{invalid, step, GuestError};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How long a guest hook may run.
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// The executables of `<dir>/<kind>/`, sorted by name.
pub fn scan(dir: &Path, kind: &str) -> Vec<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir.join(kind))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            std::fs::metadata(p)
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        })
        .collect();
    out.sort();
    out
}

/// Runs the `kind` hooks of `dir` with `state` (JSON) on stdin; the first failure stops them.
/// `reaper`: the agent's; `None` waits directly (tests).
pub fn run(
    dir: &Path,
    kind: &str,
    state: &serde_json::Value,
    reaper: Option<&crate::reaper::Reaper>,
) -> Result<(), GuestError> {
    let json = serde_json::to_vec(state).map_err(step("encode the hooks' state"))?;
    for hook in scan(dir, kind) {
        let what = format!("guest {kind} hook {}", hook.display());
        let o = crate::tools::run(reaper, &hook, &[kind], &json, TIMEOUT)
            .map_err(step(what.clone()))?;
        if o.status != 0 {
            return Err(invalid(format!(
                "{what} failed (exit status {}): {}",
                o.status,
                String::from_utf8_lossy(&o.stderr).trim()
            )));
        }
    }
    Ok(())
}

/// A hook directory from the runtime: absolute, no `..`.
pub fn check_dir(path: &str) -> Result<PathBuf, GuestError> {
    let p = PathBuf::from(path);
    if !p.is_absolute() || p.components().any(|c| c == std::path::Component::ParentDir) {
        return Err(invalid(format!(
            "guest_hook_path {path:?} must be an absolute path without .."
        )));
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn hooks_run_in_name_order_with_the_state_and_a_failure_stops_them() {
        let dir = tempfile::tempdir().expect("tmp");
        let pre = dir.path().join("prestart");
        std::fs::create_dir_all(&pre).expect("mkdir");
        let log = dir.path().join("log");
        for (name, body) in [
            (
                "20-second",
                format!(
                    "#!/bin/sh\necho \"$(basename $0) $1 $(cat)\" >> {}\n",
                    log.display()
                ),
            ),
            (
                "10-first",
                format!(
                    "#!/bin/sh\necho \"$(basename $0) $1 $(cat)\" >> {}\n",
                    log.display()
                ),
            ),
            ("30-not-executable", "#!/bin/sh\nexit 1\n".to_string()),
        ] {
            let p = pre.join(name);
            std::fs::write(&p, body).expect("write");
            let mode = if name.contains("not") { 0o644 } else { 0o755 };
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).expect("chmod");
        }
        run(
            dir.path(),
            "prestart",
            &serde_json::json!({"id": "c1"}),
            None,
        )
        .expect("runs");
        assert_eq!(
            std::fs::read_to_string(&log).expect("log"),
            "10-first prestart {\"id\":\"c1\"}\n20-second prestart {\"id\":\"c1\"}\n"
        );
        std::fs::write(
            pre.join("15-fails"),
            "#!/bin/sh\necho refused >&2\nexit 2\n",
        )
        .expect("write");
        std::fs::set_permissions(pre.join("15-fails"), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        let e = run(dir.path(), "prestart", &serde_json::json!({}), None).expect_err("fails");
        assert!(
            e.to_string().contains("15-fails") && e.to_string().contains("refused"),
            "{e}"
        );
        // No directory for a kind: nothing to run.
        run(dir.path(), "poststop", &serde_json::json!({}), None).expect("none");
        assert!(check_dir("relative").is_err() && check_dir("/a/../b").is_err());
        assert!(check_dir("/usr/share/oci/hooks").is_ok());
    }
}
