//! What the shim watches while a sandbox runs: the guest's OOM kills (published as
//! `/tasks/oom`) and each process's exit (published as `/tasks/exit` once its output is
//! delivered).

use std::collections::HashMap;
use std::sync::Arc;

use containerd_shim_protos::events::task::TaskExit;
use kata_sandbox::Sandbox;
use tokio::sync::watch;

use super::{Exit, Service};
use crate::events::{now, Publisher};

/// Publishes `/tasks/oom` once per OOM kill the guest cgroup of a container counts.
#[derive(Debug, Clone)]
pub(super) struct OomReporter {
    pub(super) publisher: Publisher,
    pub(super) reported: Arc<std::sync::Mutex<HashMap<String, u64>>>,
}

impl OomReporter {
    async fn check(&self, sb: &Sandbox, cid: &str) {
        let Ok(stats) = sb.stats(cid).await else {
            return;
        };
        let new = {
            let mut r = self.reported.lock().unwrap_or_else(|e| e.into_inner());
            let seen = r.entry(cid.to_string()).or_insert(0);
            let new = stats.oom_kills > *seen;
            *seen = (*seen).max(stats.oom_kills);
            new
        };
        if new {
            tracing::info!(container = cid, "OOM in the guest");
            let ev = containerd_shim_protos::events::task::TaskOOM {
                container_id: cid.to_string(),
                ..Default::default()
            };
            self.publisher.publish("/tasks/oom", &ev).await;
        }
    }
}

impl Service {
    /// Forwards the guest's OOM kills as `/tasks/oom` events while the sandbox runs.
    pub(super) fn watch_oom(&self, sb: Arc<Sandbox>) {
        let oom = self.oom.clone();
        let sandbox = Arc::downgrade(&sb);
        let events = sb.oom_events();
        drop(sb);
        tokio::spawn(async move {
            // None: the sandbox stopped.
            while let Some(cid) = events.next().await {
                let Some(sb) = sandbox.upgrade() else { return };
                oom.check(&sb, &cid).await;
            }
        });
    }

    pub(super) fn watch_exit(
        &self,
        sb: Arc<Sandbox>,
        cid: String,
        exec_id: String,
        pid: u32,
        output: Option<tokio::task::JoinHandle<()>>,
        exit: watch::Sender<Exit>,
    ) {
        let publisher = self.publisher.clone();
        let oom = self.oom.clone();
        tokio::spawn(async move {
            let status = match sb.wait(&cid, &exec_id).await {
                Ok((status, _)) => status as u32,
                Err(e) => {
                    match sb.vm_exit() {
                        // The VM died: say why, with the guest console's last lines.
                        Some(vm) => tracing::error!(
                            container = %cid,
                            exec = %exec_id,
                            error = %kata_config::error_chain(&vm),
                            "the sandbox's VM died; the process is reported as killed (exit 255)"
                        ),
                        None => tracing::warn!(error = %e, "wait failed"),
                    }
                    255
                }
            };
            // All output is delivered before the exit is.
            if let Some(o) = output {
                let _ = o.await;
            }
            // An OOM kill is published before the exit it caused, as runc's shim does.
            oom.check(&sb, &cid).await;
            let at = now();
            exit.send_replace(Some((status, at.clone())));
            let id = if exec_id.is_empty() {
                cid.clone()
            } else {
                exec_id.clone()
            };
            let ev = TaskExit {
                container_id: cid,
                id,
                pid,
                exit_status: status,
                exited_at: protobuf::MessageField::some(at),
                ..Default::default()
            };
            publisher.publish("/tasks/exit", &ev).await;
        });
    }
}
