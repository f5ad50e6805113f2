//! OCI hooks (`hooks` of the spec), run by the shim on the host as runc runs them: the
//! container's state as JSON on stdin, `args[0]` as argv[0], `env` as the environment when given
//! (the shim's otherwise), `timeout` in seconds when given.
//!
//! - `prestart` (deprecated), `createRuntime` and `createContainer`: after the VM is up, before
//!   the container is created in it (status `creating`); a failure fails the create;
//! - `poststart`: after the container started (status `created`, as runc reports it); a
//!   failure is logged;
//! - `poststop`: after the container was removed (status `stopped`); a failure is logged;
//! - `startContainer` hooks run inside the container's namespaces, which are in the guest, where
//!   the host's hook binaries are not: refused with a clear error (guest hooks come from
//!   `[hypervisor].guest_hook_path` instead).
//!
//! The state's `pid` is QEMU's: a host process in the pod's network namespace, which is what
//! host hooks use a pid for (`/proc/<pid>/ns/net`).

use std::collections::HashMap;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use crate::error::{invalid, step, ShimError};
use oci_spec::runtime::{Hook, Hooks};
use serde::Serialize;
use tokio::io::AsyncWriteExt;

/// The container state a hook reads on stdin (OCI runtime spec, "State").
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HookState {
    /// The spec's `ociVersion`.
    pub oci_version: String,
    /// Container id.
    pub id: String,
    /// `creating`, `created`, `running` or `stopped`.
    pub status: String,
    /// QEMU's pid.
    pub pid: u32,
    /// The bundle directory.
    pub bundle: String,
    /// The spec's annotations (omitted when there are none, as runc does).
    #[serde(skip_serializing_if = "HashMap::is_empty")]
    pub annotations: HashMap<String, String>,
}

/// Refuses what cannot run: `startContainer` hooks, and hooks whose path is not absolute.
pub fn check(hooks: &Hooks) -> Result<(), ShimError> {
    if hooks
        .start_container()
        .as_ref()
        .is_some_and(|h| !h.is_empty())
    {
        return Err(invalid(
            "startContainer hooks run inside the container's namespaces, which are in \
                    the VM, where the host's hook binaries are not; remove them, or use guest \
                    hooks ([hypervisor.qemu].guest_hook_path)",
        ));
    }
    let all = [
        hooks.prestart(),
        hooks.create_runtime(),
        hooks.create_container(),
        hooks.poststart(),
        hooks.poststop(),
    ];
    for h in all.iter().filter_map(|l| l.as_ref()).flatten() {
        if !h.path().is_absolute() {
            return Err(invalid(format!(
                "hook path {} is not absolute (the OCI spec requires it)",
                h.path().display()
            )));
        }
    }
    Ok(())
}

/// The hooks run before the container is created, in order.
pub fn create_hooks(hooks: &Hooks) -> Vec<(&'static str, Hook)> {
    let mut out = Vec::new();
    for (kind, list) in [
        ("prestart", hooks.prestart()),
        ("createRuntime", hooks.create_runtime()),
        ("createContainer", hooks.create_container()),
    ] {
        for h in list.iter().flatten() {
            out.push((kind, h.clone()));
        }
    }
    out
}

/// Runs one hook; the error names it and carries its stderr.
pub async fn run(kind: &str, hook: &Hook, state: &HookState) -> Result<(), ShimError> {
    let path = hook.path();
    let what = || format!("{kind} hook {}", path.display());
    let json = serde_json::to_vec(state).map_err(step(what()))?;
    let mut cmd = std::process::Command::new(path);
    if let Some(args) = hook.args() {
        if let Some((arg0, rest)) = args.split_first() {
            cmd.arg0(arg0);
            cmd.args(rest);
        }
    }
    if let Some(env) = hook.env() {
        cmd.env_clear();
        for kv in env {
            let (k, v) = kv.split_once('=').unwrap_or((kv.as_str(), ""));
            cmd.env(k, v);
        }
    }
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut cmd = tokio::process::Command::from(cmd);
    cmd.kill_on_drop(true);
    let mut child = cmd.spawn().map_err(step(what()))?;
    if let Some(mut stdin) = child.stdin.take() {
        // A hook that does not read its stdin is fine.
        let _ = stdin.write_all(&json).await;
    }
    let wait = child.wait_with_output();
    let out = match hook.timeout().filter(|t| *t > 0) {
        Some(secs) => tokio::time::timeout(Duration::from_secs(secs as u64), wait)
            .await
            .map_err(|_| invalid(format!("{} timed out after {secs} s", what())))?,
        None => wait.await,
    }
    .map_err(step(what()))?;
    if !out.status.success() {
        return Err(invalid(format!(
            "{} failed ({}): {}",
            what(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// Runs `hooks` in order, logging failures (poststart, poststop).
pub async fn run_logged(kind: &str, hooks: Option<&Vec<Hook>>, state: &HookState) {
    for h in hooks.into_iter().flatten() {
        if let Err(e) = run(kind, h, state).await {
            tracing::warn!(error = %e, "hook failed");
        }
    }
}

/// A state for `bundle`.
pub fn state(
    oci_version: &str,
    id: &str,
    status: &str,
    pid: u32,
    bundle: &Path,
    annotations: &HashMap<String, String>,
) -> HookState {
    HookState {
        oci_version: oci_version.to_string(),
        id: id.to_string(),
        status: status.to_string(),
        pid,
        bundle: bundle.display().to_string(),
        annotations: annotations.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hook(json: &str) -> Hook {
        serde_json::from_str(json).expect("hook")
    }

    fn st() -> HookState {
        state(
            "1.0.2",
            "c1",
            "creating",
            42,
            Path::new("/b"),
            &HashMap::from([("a".to_string(), "b".to_string())]),
        )
    }

    #[tokio::test]
    async fn a_hook_reads_the_state_and_sees_its_args_and_env() {
        let dir = tempfile::tempdir().expect("tmp");
        let out = dir.path().join("out");
        let h = hook(&format!(
            r#"{{"path":"/bin/sh","args":["hook-name","-c","cat > {}; echo \"$0 $X\" >> {}"],"env":["X=y"]}}"#,
            out.display(),
            out.display()
        ));
        run("createRuntime", &h, &st()).await.expect("runs");
        let text = std::fs::read_to_string(&out).expect("out");
        let mut values = serde_json::Deserializer::from_str(&text).into_iter::<serde_json::Value>();
        let v = values.next().expect("a value").expect("state json");
        let rest = &text[values.byte_offset()..];
        assert_eq!(v["id"], "c1");
        assert_eq!(v["status"], "creating");
        assert_eq!(v["pid"], 42);
        assert_eq!(v["ociVersion"], "1.0.2");
        assert_eq!(v["annotations"]["a"], "b");
        assert_eq!(rest.trim(), "hook-name y");
    }

    #[tokio::test]
    async fn failures_and_timeouts_name_the_hook() {
        let h = hook(r#"{"path":"/bin/sh","args":["sh","-c","echo broken >&2; exit 3"]}"#);
        let e = run("createRuntime", &h, &st()).await.expect_err("fails");
        assert!(
            e.to_string().contains("createRuntime hook /bin/sh failed")
                && e.to_string().contains("broken"),
            "{e}"
        );
        let h = hook(r#"{"path":"/bin/sleep","args":["sleep","10"],"timeout":1}"#);
        let e = run("poststart", &h, &st()).await.expect_err("times out");
        assert!(e.to_string().contains("timed out after 1 s"), "{e}");
        let e = run("prestart", &hook(r#"{"path":"/no/such/hook"}"#), &st())
            .await
            .expect_err("missing");
        assert!(e.to_string().contains("/no/such/hook"), "{e}");
    }

    #[test]
    fn start_container_hooks_and_relative_paths_are_refused() {
        let h: Hooks =
            serde_json::from_str(r#"{"startContainer":[{"path":"/bin/true"}]}"#).expect("hooks");
        assert!(check(&h)
            .expect_err("refused")
            .to_string()
            .contains("guest_hook_path"));
        let h: Hooks = serde_json::from_str(r#"{"poststop":[{"path":"true"}]}"#).expect("hooks");
        assert!(check(&h)
            .expect_err("refused")
            .to_string()
            .contains("not absolute"));
        let h: Hooks = serde_json::from_str(
            r#"{"prestart":[{"path":"/a"}],"createRuntime":[{"path":"/b"}],"createContainer":[{"path":"/c"}]}"#,
        )
        .expect("hooks");
        check(&h).expect("fine");
        let order: Vec<_> = create_hooks(&h).into_iter().map(|(k, _)| k).collect();
        assert_eq!(order, ["prestart", "createRuntime", "createContainer"]);
    }
}
