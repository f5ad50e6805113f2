//! A task's Start: its init process (the container's) or an exec; the exit is watched and the
//! start published once the process runs.

use std::sync::Arc;

use containerd_shim_protos::api::StartRequest;
use containerd_shim_protos::events::task::{TaskExecStarted, TaskStart};
use kata_sandbox::Sandbox;
use tracing::Instrument;

use super::errors::{err, not_found, runtime_err};
use super::Service;
use crate::events::now;
use crate::io;

impl Service {
    /// Starts the container's init process; returns the pid reported for it.
    pub(super) async fn start_init(
        &self,
        req: &StartRequest,
        sb: Arc<Sandbox>,
    ) -> Result<u32, ttrpc::Error> {
        if req.id == self.id {
            // Docker configured the namespace of the pid it was given after Create.
            sb.attach_late_network().await.map_err(runtime_err)?;
        }
        sb.start_container(&req.id)
            .instrument(tracing::info_span!("process_start", id = %req.id))
            .await
            .map_err(runtime_err)?;
        let mut st = self.state.lock().await;
        let t = st
            .tasks
            .get_mut(&req.id)
            .ok_or_else(|| not_found(&format!("task {}", req.id)))?;
        t.init.started = true;
        let pid = t.init.host_pid;
        let poststart = t.hooks.as_ref().and_then(|h| h.poststart().clone());
        // runc (the oracle) gives poststart hooks the state it read before the start.
        let state = crate::hooks::state(
            &t.oci_version,
            &req.id,
            "created",
            sb.host_pid(),
            &t.bundle,
            &t.annotations,
        );
        self.watch_exit(
            sb,
            req.id.clone(),
            String::new(),
            pid,
            t.init.output.take(),
            t.init.exit.clone(),
        );
        drop(st);
        crate::hooks::run_logged("poststart", poststart.as_ref(), &state).await;
        self.publisher
            .publish(
                "/tasks/start",
                &TaskStart {
                    container_id: req.id.clone(),
                    pid,
                    ..Default::default()
                },
            )
            .await;
        Ok(pid)
    }

    /// Starts exec `req.exec_id`; returns the pid reported for it.
    pub(super) async fn start_exec(
        &self,
        req: &StartRequest,
        sb: Arc<Sandbox>,
    ) -> Result<u32, ttrpc::Error> {
        let (spec, stdio) = {
            let st = self.state.lock().await;
            let p = st
                .tasks
                .get(&req.id)
                .and_then(|t| t.execs.get(&req.exec_id))
                .ok_or_else(|| not_found(&format!("exec {}", req.exec_id)))?;
            (
                p.spec
                    .clone()
                    .ok_or_else(|| err(ttrpc::Code::FAILED_PRECONDITION, "exec already started"))?,
                p.stdio.clone(),
            )
        };
        let pid = match sb.exec(&req.id, &req.exec_id, &spec).await {
            Ok(pid) => pid,
            Err(e) => {
                // As runc's shim: an exec that failed to start is finished, so Wait, Kill and
                // Delete answer at once (containerd kills and waits for it before deleting it).
                let st = self.state.lock().await;
                if let Some(p) = st
                    .tasks
                    .get(&req.id)
                    .and_then(|t| t.execs.get(&req.exec_id))
                {
                    p.exit.send_replace(Some((255, now())));
                }
                return Err(runtime_err(e));
            }
        };
        let tasks = io::start(&sb, &req.id, &req.exec_id, &stdio);
        let mut st = self.state.lock().await;
        let p = st
            .tasks
            .get_mut(&req.id)
            .and_then(|t| t.execs.get_mut(&req.exec_id))
            .ok_or_else(|| not_found(&format!("exec {}", req.exec_id)))?;
        p.pid = pid;
        p.host_pid = sb.host_pid();
        let pid = p.host_pid;
        p.started = true;
        p.spec = None;
        p.input = tasks.input;
        self.watch_exit(
            sb,
            req.id.clone(),
            req.exec_id.clone(),
            pid,
            Some(tasks.output),
            p.exit.clone(),
        );
        drop(st);
        let ev = TaskExecStarted {
            container_id: req.id.clone(),
            exec_id: req.exec_id.clone(),
            pid,
            ..Default::default()
        };
        self.publisher.publish("/tasks/exec-started", &ev).await;
        Ok(pid)
    }
}
