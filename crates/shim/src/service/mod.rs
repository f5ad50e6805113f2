//! The Task API over one sandbox. The first task creates the sandbox (VM): with `ctr`, that is
//! the only task; in a Kubernetes pod it is the sandbox (pause) container, and the pod's other
//! containers are further tasks of the same shim (see [`crate::pod`]). Each method decodes the
//! request, calls the runtime ([`kata_sandbox::Sandbox`]), publishes the event and maps errors
//! ([`errors`]); a task's Create is in [`create`], containerd 2.x's sandbox API in
//! [`sandbox_api`].

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use containerd_shim_protos::api::*;
use containerd_shim_protos::events::task::{TaskCreate, TaskDelete, TaskExecAdded, TaskIO};
use containerd_shim_protos::shim_async::Task;
use kata_sandbox::Sandbox;
use oci_spec::runtime::{LinuxResources, Process};
use protobuf::well_known_types::empty::Empty;
use protobuf::well_known_types::timestamp::Timestamp;
use tokio::sync::{watch, Mutex, Notify};
use tracing::Instrument;
use ttrpc::r#async::TtrpcContext;

use crate::events::{now, Publisher};
use crate::io::StdioPaths;
use crate::rootfs;
use errors::{err, not_found, runtime_err};

type Exit = Option<(u32, Timestamp)>;

mod create;
mod errors;
mod process;
mod sandbox_api;
mod watchers;
use watchers::OomReporter;

#[derive(Debug)]
struct Proc {
    /// The process's pid in the guest.
    pid: u32,
    /// The pid reported to the manager: the sandbox's on the host (QEMU's), as Kata does. A
    /// manager that configures `/proc/<pid>/ns/net` (Docker) reaches the VM's namespace.
    host_pid: u32,
    stdio: StdioPaths,
    spec: Option<Process>,
    started: bool,
    exit: watch::Sender<Exit>,
    output: Option<tokio::task::JoinHandle<()>>,
    input: Option<tokio::task::JoinHandle<()>>,
}

impl Proc {
    fn new(stdio: StdioPaths) -> Self {
        Proc {
            pid: 0,
            host_pid: 0,
            stdio,
            spec: None,
            started: false,
            exit: watch::channel(None).0,
            output: None,
            input: None,
        }
    }
}

#[derive(Debug)]
struct TaskState {
    bundle: PathBuf,
    rootfs: Option<PathBuf>,
    init: Proc,
    execs: HashMap<String, Proc>,
    /// The spec's hooks (poststart and poststop run later) and what their state carries.
    hooks: Option<oci_spec::runtime::Hooks>,
    oci_version: String,
    annotations: HashMap<String, String>,
}

#[derive(Debug, Default)]
struct State {
    sandbox: Option<Arc<Sandbox>>,
    tasks: HashMap<String, TaskState>,
    /// Set when containerd asked for the pod through the sandbox API (no pause container).
    pod: Option<sandbox_api::Pod>,
}

impl State {
    fn task(&self, id: &str) -> Result<&TaskState, ttrpc::Error> {
        self.tasks
            .get(id)
            .ok_or_else(|| not_found(&format!("task {id}")))
    }
}

impl TaskState {
    /// The init process (empty exec id) or an exec.
    fn process(&self, exec_id: &str) -> Result<&Proc, ttrpc::Error> {
        if exec_id.is_empty() {
            Ok(&self.init)
        } else {
            self.execs
                .get(exec_id)
                .ok_or_else(|| not_found(&format!("exec {exec_id}")))
        }
    }
}

/// The shim's Task service.
#[derive(Debug)]
pub struct Service {
    id: String,
    publisher: Publisher,
    shutdown: Arc<Notify>,
    state: Mutex<State>,
    oom: OomReporter,
    /// `ConfigPath` of the runtime options containerd gave `start` (the sandbox API's
    /// CreateSandbox carries none; a task's Create carries its own).
    runtime_config: Option<PathBuf>,
}

impl Service {
    /// A new service for the shim of task `id`.
    pub fn new(id: String, publisher: Publisher, shutdown: Arc<Notify>) -> Self {
        let oom = OomReporter {
            publisher: publisher.clone(),
            reported: Default::default(),
        };
        Service {
            id,
            publisher,
            shutdown,
            state: Mutex::new(State::default()),
            oom,
            runtime_config: std::env::var_os(crate::RUNTIME_CONFIG_ENV).map(PathBuf::from),
        }
    }

    /// The sandbox, if its VM runs, for the monitor socket. Waits at most 200 ms for the state
    /// (a scrape must never hang on a long Task API call).
    pub async fn current_sandbox(&self) -> Option<Arc<Sandbox>> {
        tokio::time::timeout(std::time::Duration::from_millis(200), self.state.lock())
            .await
            .ok()
            .and_then(|st| st.sandbox.clone())
    }

    async fn sandbox(&self) -> Result<Arc<Sandbox>, ttrpc::Error> {
        self.state.lock().await.sandbox.clone().ok_or_else(|| {
            err(
                ttrpc::Code::FAILED_PRECONDITION,
                "the sandbox is not running",
            )
        })
    }
}

fn status_of(p: &Proc) -> Status {
    if p.exit.borrow().is_some() {
        Status::STOPPED
    } else if p.started {
        Status::RUNNING
    } else {
        Status::CREATED
    }
}

#[async_trait]
impl Task for Service {
    async fn create(
        &self,
        _: &TtrpcContext,
        req: CreateTaskRequest,
    ) -> ttrpc::Result<CreateTaskResponse> {
        let _timer = crate::metrics::rpc_timer("create");
        let pid = self
            .do_create(&req)
            .instrument(tracing::info_span!("task_create", id = %req.id))
            .await?;
        let ev = TaskCreate {
            container_id: req.id.clone(),
            bundle: req.bundle.clone(),
            io: protobuf::MessageField::some(TaskIO {
                stdin: req.stdin.clone(),
                stdout: req.stdout.clone(),
                stderr: req.stderr.clone(),
                terminal: req.terminal,
                ..Default::default()
            }),
            pid,
            ..Default::default()
        };
        self.publisher.publish("/tasks/create", &ev).await;
        Ok(CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    async fn start(&self, _: &TtrpcContext, req: StartRequest) -> ttrpc::Result<StartResponse> {
        let _timer = crate::metrics::rpc_timer("start");
        tracing::info!(rpc = "start", id = %req.id, "task API");
        let sb = self.sandbox().await?;
        let pid = if req.exec_id.is_empty() {
            self.start_init(&req, sb).await?
        } else {
            self.start_exec(&req, sb).await?
        };
        Ok(StartResponse {
            pid,
            ..Default::default()
        })
    }

    async fn delete(&self, _: &TtrpcContext, req: DeleteRequest) -> ttrpc::Result<DeleteResponse> {
        let _timer = crate::metrics::rpc_timer("delete");
        tracing::info!(rpc = "delete", id = %req.id, "task API");
        let mut st = self.state.lock().await;
        if !req.exec_id.is_empty() {
            let t = st
                .tasks
                .get_mut(&req.id)
                .ok_or_else(|| not_found(&format!("task {}", req.id)))?;
            let p = t
                .execs
                .remove(&req.exec_id)
                .ok_or_else(|| not_found(&format!("exec {}", req.exec_id)))?;
            let (status, at) = p.exit.borrow().clone().unwrap_or((0, now()));
            return Ok(DeleteResponse {
                pid: p.host_pid,
                exit_status: status,
                exited_at: protobuf::MessageField::some(at),
                ..Default::default()
            });
        }
        let t = st
            .tasks
            .remove(&req.id)
            .ok_or_else(|| not_found(&format!("task {}", req.id)))?;
        let sb = st.sandbox.clone();
        drop(st);
        if let Some(sb) = &sb {
            if let Err(e) = sb.remove_container(&req.id).await {
                tracing::warn!(error = %e, "remove container");
            }
            if req.id != self.id {
                sb.release(&req.id).await;
            }
        }
        if let Some(r) = &t.rootfs {
            rootfs::unmount_rootfs(r);
        }
        if let Some(poststop) = t.hooks.as_ref().and_then(|h| h.poststop().as_ref()) {
            let pid = sb.as_ref().map_or(0, |sb| sb.host_pid());
            let state = crate::hooks::state(
                &t.oci_version,
                &req.id,
                "stopped",
                pid,
                &t.bundle,
                &t.annotations,
            );
            crate::hooks::run_logged("poststop", Some(poststop), &state).await;
        }
        let (status, at) = t.init.exit.borrow().clone().unwrap_or((128 + 9, now()));
        if req.id == self.id {
            if let Some(sb) = sb {
                sb.stop()
                    .instrument(tracing::info_span!("teardown", id = %req.id))
                    .await;
            }
            self.state.lock().await.sandbox = None;
        }
        let ev = TaskDelete {
            container_id: req.id.clone(),
            pid: t.init.host_pid,
            exit_status: status,
            exited_at: protobuf::MessageField::some(at.clone()),
            ..Default::default()
        };
        self.publisher.publish("/tasks/delete", &ev).await;
        Ok(DeleteResponse {
            pid: t.init.host_pid,
            exit_status: status,
            exited_at: protobuf::MessageField::some(at),
            ..Default::default()
        })
    }

    async fn exec(&self, _: &TtrpcContext, req: ExecProcessRequest) -> ttrpc::Result<Empty> {
        let _timer = crate::metrics::rpc_timer("exec");
        tracing::info!(rpc = "exec", id = %req.id, "task API");
        let spec: Process = match req.spec.as_ref() {
            Some(any) => serde_json::from_slice(&any.value).map_err(|e| {
                err(
                    ttrpc::Code::INVALID_ARGUMENT,
                    format!("invalid process spec: {e}"),
                )
            })?,
            None => {
                return Err(err(
                    ttrpc::Code::INVALID_ARGUMENT,
                    "exec without a process spec",
                ))
            }
        };
        let mut st = self.state.lock().await;
        let t = st
            .tasks
            .get_mut(&req.id)
            .ok_or_else(|| not_found(&format!("task {}", req.id)))?;
        if t.execs.contains_key(&req.exec_id) {
            return Err(err(
                ttrpc::Code::ALREADY_EXISTS,
                format!("exec {} already exists", req.exec_id),
            ));
        }
        let mut p = Proc::new(StdioPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        });
        p.spec = Some(spec);
        t.execs.insert(req.exec_id.clone(), p);
        drop(st);
        self.publisher
            .publish(
                "/tasks/exec-added",
                &TaskExecAdded {
                    container_id: req.id.clone(),
                    exec_id: req.exec_id.clone(),
                    ..Default::default()
                },
            )
            .await;
        Ok(Empty::new())
    }

    async fn state(&self, _: &TtrpcContext, req: StateRequest) -> ttrpc::Result<StateResponse> {
        let _timer = crate::metrics::rpc_timer("state");
        tracing::info!(rpc = "state", id = %req.id, "task API");
        let st = self.state.lock().await;
        let t = st.task(&req.id)?;
        let p = t.process(&req.exec_id)?;
        let exit = p.exit.borrow().clone();
        Ok(StateResponse {
            id: req.id.clone(),
            bundle: t.bundle.display().to_string(),
            pid: p.host_pid,
            status: status_of(p).into(),
            stdin: p.stdio.stdin.clone(),
            stdout: p.stdio.stdout.clone(),
            stderr: p.stdio.stderr.clone(),
            terminal: p.stdio.terminal,
            exit_status: exit.as_ref().map(|e| e.0).unwrap_or(0),
            exited_at: exit.map(|e| e.1).into(),
            exec_id: req.exec_id.clone(),
            ..Default::default()
        })
    }

    async fn kill(&self, _: &TtrpcContext, req: KillRequest) -> ttrpc::Result<Empty> {
        let _timer = crate::metrics::rpc_timer("kill");
        tracing::info!(rpc = "kill", id = %req.id, "task API");
        let sb = self.sandbox().await?;
        let mut exit = {
            let st = self.state.lock().await;
            let p = st.task(&req.id)?.process(&req.exec_id)?;
            if p.exit.borrow().is_some() {
                return Err(not_found("process already finished:"));
            }
            if !req.exec_id.is_empty() && !p.started {
                // An exec that never started (its start failed, e.g. a missing binary) has no
                // process to signal: say so at once, as runc's shim does.
                return Err(not_found("process not started:"));
            }
            p.exit.subscribe()
        };
        if let Err(e) = sb.kill(&req.id, &req.exec_id, req.signal, req.all).await {
            // The process may have finished meanwhile (the agent forgets a finished exec as soon
            // as its output is delivered, just before its exit is published here).
            let finished = tokio::time::timeout(
                std::time::Duration::from_secs(1),
                exit.wait_for(|e| e.is_some()),
            )
            .await;
            if matches!(finished, Ok(Ok(_))) {
                return Err(not_found("process already finished:"));
            }
            return Err(runtime_err(e));
        }
        if req.signal == 9 && req.id == self.id && req.exec_id.is_empty() {
            // The pod is being stopped: the guest must reap the sandbox's process in time.
            sb.fence_after_kill(kata_sandbox::sandbox::SANDBOX_KILL_GRACE, async move {
                let _ = exit.wait_for(|e| e.is_some()).await;
            });
        }
        Ok(Empty::new())
    }

    async fn wait(&self, _: &TtrpcContext, req: WaitRequest) -> ttrpc::Result<WaitResponse> {
        let _timer = crate::metrics::rpc_timer("wait");
        tracing::info!(rpc = "wait", id = %req.id, "task API");
        let mut rx = {
            let st = self.state.lock().await;
            let p = st.task(&req.id)?.process(&req.exec_id)?;
            p.exit.subscribe()
        };
        loop {
            if let Some((status, at)) = rx.borrow_and_update().clone() {
                return Ok(WaitResponse {
                    exit_status: status,
                    exited_at: protobuf::MessageField::some(at),
                    ..Default::default()
                });
            }
            if rx.changed().await.is_err() {
                return Err(err(ttrpc::Code::NOT_FOUND, "the process was deleted"));
            }
        }
    }

    async fn pids(&self, _: &TtrpcContext, req: PidsRequest) -> ttrpc::Result<PidsResponse> {
        let _timer = crate::metrics::rpc_timer("pids");
        tracing::info!(rpc = "pids", id = %req.id, "task API");
        let sb = self.sandbox().await?;
        self.state.lock().await.task(&req.id)?;
        // A manager reads these as host pids (`docker top` runs ps on the host with them): the
        // guest's would name unrelated host processes. As Kata: the sandbox's, QEMU's.
        let processes = vec![ProcessInfo {
            pid: sb.host_pid(),
            ..Default::default()
        }];
        Ok(PidsResponse {
            processes,
            ..Default::default()
        })
    }

    async fn close_io(&self, _: &TtrpcContext, req: CloseIORequest) -> ttrpc::Result<Empty> {
        let _timer = crate::metrics::rpc_timer("close_io");
        tracing::info!(rpc = "close_io", id = %req.id, "task API");
        let sb = self.sandbox().await?;
        if req.stdin {
            let input = {
                let mut st = self.state.lock().await;
                st.tasks.get_mut(&req.id).and_then(|t| {
                    let p = if req.exec_id.is_empty() {
                        Some(&mut t.init)
                    } else {
                        t.execs.get_mut(&req.exec_id)
                    };
                    p.and_then(|p| p.input.take())
                })
            };
            // containerd sends CloseIO once it has written all of stdin into the FIFO: let the
            // copy forward what is still in the FIFO (it ends at the FIFO's EOF), then close.
            if let Some(mut input) = input {
                if tokio::time::timeout(std::time::Duration::from_secs(2), &mut input)
                    .await
                    .is_err()
                {
                    input.abort();
                }
            }
            let _ = sb.close_stdin(&req.id, &req.exec_id).await;
        }
        Ok(Empty::new())
    }

    async fn resize_pty(&self, _: &TtrpcContext, req: ResizePtyRequest) -> ttrpc::Result<Empty> {
        let _timer = crate::metrics::rpc_timer("resize_pty");
        tracing::info!(rpc = "resize_pty", id = %req.id, "task API");
        let sb = self.sandbox().await?;
        // ctr races a resize against the process's exit: answer with an error, never crash.
        sb.resize(&req.id, &req.exec_id, req.height, req.width)
            .await
            .map_err(|e| err(ttrpc::Code::FAILED_PRECONDITION, e))?;
        Ok(Empty::new())
    }

    async fn update(&self, _: &TtrpcContext, req: UpdateTaskRequest) -> ttrpc::Result<Empty> {
        let _timer = crate::metrics::rpc_timer("update");
        tracing::info!(rpc = "update", id = %req.id, "task API");
        let sb = self.sandbox().await?;
        let any = req
            .resources
            .as_ref()
            .ok_or_else(|| err(ttrpc::Code::INVALID_ARGUMENT, "update without resources"))?;
        let resources: LinuxResources = serde_json::from_slice(&any.value).map_err(|e| {
            err(
                ttrpc::Code::INVALID_ARGUMENT,
                format!("invalid resources: {e}"),
            )
        })?;
        self.state.lock().await.task(&req.id)?;
        // The VM follows the new limits, up or down, then the guest cgroup does.
        sb.update_demand(&req.id, &resources)
            .await
            .map_err(runtime_err)?;
        sb.update(&req.id, any.value.clone())
            .await
            .map_err(runtime_err)?;
        Ok(Empty::new())
    }

    async fn stats(&self, _: &TtrpcContext, req: StatsRequest) -> ttrpc::Result<StatsResponse> {
        let _timer = crate::metrics::rpc_timer("stats");
        tracing::info!(rpc = "stats", id = %req.id, "task API");
        let sb = self.sandbox().await?;
        let r = sb.stats(&req.id).await.map_err(runtime_err)?;
        use containerd_shim_protos::cgroups_v2::metrics::{CPUStat, MemoryStat, Metrics, PidsStat};
        let m = Metrics {
            pids: protobuf::MessageField::some(PidsStat {
                current: r.pids_current,
                ..Default::default()
            }),
            cpu: protobuf::MessageField::some(CPUStat {
                usage_usec: r.cpu_usage_usec,
                ..Default::default()
            }),
            memory: protobuf::MessageField::some(MemoryStat {
                usage: r.memory_usage,
                usage_limit: r.memory_limit,
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut any = protobuf::well_known_types::any::Any::pack(&m)
            .map_err(|e| err(ttrpc::Code::INTERNAL, e))?;
        any.type_url = "io.containerd.cgroups.v2.Metrics".into();
        Ok(StatsResponse {
            stats: protobuf::MessageField::some(any),
            ..Default::default()
        })
    }

    async fn connect(
        &self,
        _: &TtrpcContext,
        req: ConnectRequest,
    ) -> ttrpc::Result<ConnectResponse> {
        let _timer = crate::metrics::rpc_timer("connect");
        let st = self.state.lock().await;
        let task_pid = st.tasks.get(&req.id).map(|t| t.init.host_pid).unwrap_or(0);
        Ok(ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            version: "2".into(),
            ..Default::default()
        })
    }

    async fn shutdown(&self, _: &TtrpcContext, _: ShutdownRequest) -> ttrpc::Result<Empty> {
        let _timer = crate::metrics::rpc_timer("shutdown");
        tracing::info!(rpc = "shutdown", "task API");
        let st = self.state.lock().await;
        // A pod asked for through the sandbox API ends with ShutdownSandbox, not with its last
        // container.
        if !st.tasks.is_empty() || st.pod.as_ref().is_some_and(|p| !p.is_shut_down()) {
            return Ok(Empty::new());
        }
        let sb = st.sandbox.clone();
        drop(st);
        if let Some(sb) = sb {
            sb.stop().await;
        }
        self.shutdown.notify_one();
        Ok(Empty::new())
    }

    async fn pause(&self, _: &TtrpcContext, _: PauseRequest) -> ttrpc::Result<Empty> {
        let _timer = crate::metrics::rpc_timer("pause");
        Err(err(
            ttrpc::Code::UNIMPLEMENTED,
            "pause is not supported by containerd-shim-kata-v2",
        ))
    }

    async fn resume(&self, _: &TtrpcContext, _: ResumeRequest) -> ttrpc::Result<Empty> {
        let _timer = crate::metrics::rpc_timer("resume");
        Err(err(
            ttrpc::Code::UNIMPLEMENTED,
            "resume is not supported by containerd-shim-kata-v2",
        ))
    }

    async fn checkpoint(&self, _: &TtrpcContext, _: CheckpointTaskRequest) -> ttrpc::Result<Empty> {
        let _timer = crate::metrics::rpc_timer("checkpoint");
        Err(err(
            ttrpc::Code::UNIMPLEMENTED,
            "checkpoint is not supported by containerd-shim-kata-v2",
        ))
    }
}
