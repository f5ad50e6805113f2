//! The VM template's state: saved by its QEMU, loaded by each clone's (QMP migration to and from a
//! file).

use super::*;

impl Vm {
    /// VM templating: pauses the VM and writes its device state to `state` (`x-ignore-shared`:
    /// the RAM, a shared file, is not copied). The VM stays paused. The stream goes through the
    /// unix socket `via`, which the caller listens on (QEMU's seccomp sandbox forbids the
    /// `exec:` transport: it spawns a shell).
    pub async fn save_state(&self, state: &Path, via: &Path) -> Result<(), VmError> {
        let _ = std::fs::remove_file(via);
        let listener = tokio::net::UnixListener::bind(via)
            .map_err(|e| VmError::Migration(format!("cannot listen on {}: {e}", via.display())))?;
        self.qmp("stop", None).await?;
        self.qmp("migrate-set-capabilities", Some(ignore_shared()))
            .await?;
        self.qmp(
            "migrate",
            Some(json!({ "uri": format!("unix:{}", via.display()) })),
        )
        .await?;
        let copy = async {
            let (mut conn, _) = listener.accept().await?;
            let mut out = tokio::fs::File::create(state).await?;
            tokio::io::copy(&mut conn, &mut out).await?;
            out.sync_all().await?;
            Ok::<_, std::io::Error>(())
        };
        stream_state(SAVING, state, via, copy).await?;
        let deadline = Instant::now() + MIGRATION_TIMEOUT;
        loop {
            let v = self.qmp("query-migrate", None).await?;
            match v.get("status").and_then(|s| s.as_str()).unwrap_or("") {
                "completed" => return Ok(()),
                "failed" | "cancelled" => {
                    return Err(VmError::Migration(format!(
                        "{SAVING} {} failed: {}",
                        state.display(),
                        v.get("error-desc")
                            .and_then(|s| s.as_str())
                            .unwrap_or("no reason given")
                    )))
                }
                _ if Instant::now() >= deadline => return Err(too_slow(SAVING, state)),
                _ => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
    }

    /// A template clone (started with [`LaunchSpec::incoming`]): loads the device state from
    /// `state`, streamed through the unix socket `via` QEMU listens on, and runs the VM.
    pub async fn restore_state(&self, state: &Path, via: &Path) -> Result<(), VmError> {
        let _ = std::fs::remove_file(via);
        self.qmp("migrate-set-capabilities", Some(ignore_shared()))
            .await?;
        self.qmp(
            "migrate-incoming",
            Some(json!({ "uri": format!("unix:{}", via.display()) })),
        )
        .await?;
        let copy = async {
            let mut input = tokio::fs::File::open(state).await?;
            let mut conn = tokio::net::UnixStream::connect(via).await?;
            tokio::io::copy(&mut input, &mut conn).await?;
            tokio::io::AsyncWriteExt::shutdown(&mut conn).await?;
            Ok::<_, std::io::Error>(())
        };
        stream_state(LOADING, state, via, copy).await?;
        let deadline = Instant::now() + MIGRATION_TIMEOUT;
        loop {
            if let Some(e) = self.exit_error() {
                return Err(e);
            }
            let v = self.qmp("query-status", None).await?;
            match v.get("status").and_then(|s| s.as_str()).unwrap_or("") {
                "inmigrate" if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(5)).await
                }
                "inmigrate" => return Err(too_slow(LOADING, state)),
                "paused" | "prelaunch" | "postmigrate" => break,
                other => {
                    return Err(VmError::Migration(format!(
                        "{LOADING} {} left the VM {other}",
                        state.display()
                    )))
                }
            }
        }
        let m = self.qmp("query-migrate", None).await?;
        if let Some(status @ ("failed" | "cancelled")) = m.get("status").and_then(|s| s.as_str()) {
            return Err(VmError::Migration(format!(
                "{LOADING} {} {status}: {}",
                state.display(),
                m.get("error-desc")
                    .and_then(|s| s.as_str())
                    .unwrap_or("no reason given")
            )));
        }
        self.qmp("cont", None).await?;
        Ok(())
    }
}

pub(super) fn too_slow(what: &str, state: &Path) -> VmError {
    VmError::Migration(format!(
        "{what} {} took more than {} s",
        state.display(),
        MIGRATION_TIMEOUT.as_secs()
    ))
}

fn ignore_shared() -> serde_json::Value {
    json!({ "capabilities": [{ "capability": "x-ignore-shared", "state": true }] })
}
