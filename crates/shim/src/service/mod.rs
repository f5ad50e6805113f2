//! The Task API over one sandbox. The first task creates the sandbox (VM): with `ctr`, that is
//! the only task; in a Kubernetes pod it is the sandbox (pause) container, and the pod's other
//! containers are further tasks of the same shim (see [`crate::pod`]).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use containerd_shim_protos::api::*;
use containerd_shim_protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskStart,
};
use containerd_shim_protos::shim_async::Task;
use kata_config::load::{FoundBy, SearchInputs};
use kata_config::HostLimits;
use kata_protocols::agent::Storage;
use kata_sandbox::cgroups::CpuLimit;
use kata_sandbox::{Placement, Sandbox};
use oci_spec::runtime::{LinuxResources, Process, Spec};
use protobuf::well_known_types::empty::Empty;
use protobuf::well_known_types::timestamp::Timestamp;
use tokio::sync::{watch, Mutex, Notify};
use tracing::Instrument;
use ttrpc::r#async::TtrpcContext;

use crate::events::{now, Publisher};
use crate::io::{self, StdioPaths};
use crate::rootfs;

type Exit = Option<(u32, Timestamp)>;

mod resources;
mod sandbox_api;
use resources::{cpu_limit, requested};

/// How long the guest has to reap the sandbox's process after a SIGKILL before the VM is
/// killed (a stuck guest must not hold a pod that is being stopped).
const SANDBOX_KILL_GRACE: std::time::Duration = std::time::Duration::from_secs(30);

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
    /// The container's CPU limit, counted in the host sandbox cgroup's (None: not counted, as
    /// for a pod's sandbox container).
    cpu: Option<Option<CpuLimit>>,
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
    /// What each container asks of the VM beyond its boot size: (memory MiB, vCPUs), from its
    /// create until its delete. The VM is resized to their sum.
    demands: std::sync::Mutex<HashMap<String, (u32, u32)>>,
    /// Held while the VM is resized, so that resizes apply in the order their sums were taken.
    resizing: Mutex<()>,
    /// `ConfigPath` of the runtime options containerd gave `start` (the sandbox API's
    /// CreateSandbox carries none; a task's Create carries its own).
    runtime_config: Option<PathBuf>,
}

/// Publishes `/tasks/oom` once per OOM kill the guest cgroup of a container counts.
#[derive(Debug, Clone)]
struct OomReporter {
    publisher: Publisher,
    reported: Arc<std::sync::Mutex<HashMap<String, u64>>>,
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

fn err(code: ttrpc::Code, msg: impl std::fmt::Display) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, msg.to_string()))
}

fn internal(e: impl std::error::Error + 'static) -> ttrpc::Error {
    err(ttrpc::Code::INTERNAL, kata_config::error_chain(&e))
}

fn not_found(what: &str) -> ttrpc::Error {
    err(ttrpc::Code::NOT_FOUND, format!("{what} not found"))
}

/// With `[runtime] disable_guest_seccomp = true` (Kata's default in its own files) the
/// container's seccomp profile is not applied in the guest, as in Kata: said in the log, never
/// silently.
fn guest_seccomp(config: &kata_config::Config, cid: &str, spec: &mut Spec) {
    if !config.runtime.disable_guest_seccomp {
        return;
    }
    if let Some(linux) = spec.linux_mut() {
        if linux.seccomp().is_some() {
            tracing::warn!(
                container = cid,
                "the container's seccomp profile is not applied: [runtime] disable_guest_seccomp = true"
            );
            linux.set_seccomp(None);
        }
    }
}

fn annotations_of(spec: &Spec) -> HashMap<String, String> {
    spec.annotations()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect()
}

fn is_bind(m: &oci_spec::runtime::Mount) -> bool {
    m.typ().as_deref() == Some("bind")
        || m.options()
            .iter()
            .flatten()
            .any(|o| o == "bind" || o == "rbind")
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
            demands: Default::default(),
            resizing: Mutex::new(()),
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

    /// Rewrites the spec's bind mounts to guest paths of shared copies; a Kubernetes emptyDir
    /// becomes a directory in guest memory shared by the pod's containers (unless
    /// `disable_guest_empty_dir`).
    /// Shares the spec's bind mounts with the guest; a bind of a direct volume becomes its
    /// block device instead (the returned storages, for the agent to mount).
    async fn share_mounts(
        sb: &Sandbox,
        cid: &str,
        spec: &mut Spec,
    ) -> Result<Vec<Storage>, ttrpc::Error> {
        let mut storages = Vec::new();
        let volumes = kata_sandbox::direct_volume::Store::default();
        let mut mounts = spec.mounts().clone().unwrap_or_default();
        for (i, m) in mounts.iter_mut().enumerate() {
            if !is_bind(m) {
                continue;
            }
            if !sb.config.runtime.disable_guest_empty_dir {
                if let Some(name) = crate::pod::empty_dir_name(m) {
                    m.set_source(Some(
                        std::path::Path::new(crate::pod::GUEST_EPHEMERAL_DIR).join(name),
                    ));
                    m.set_typ(Some("bind".into()));
                    m.set_options(Some(vec!["rbind".into(), "rw".into()]));
                    continue;
                }
            }
            let Some(source) = m.source().clone() else {
                continue;
            };
            let options = m.options().clone().unwrap_or_default();
            let volume = source.display().to_string();
            match volumes.get(&volume) {
                Ok(Some(info)) => {
                    let (storage, guest) = sb
                        .attach_volume(cid, &volume, &info, &options)
                        .await
                        .map_err(|e| {
                            err(ttrpc::Code::INVALID_ARGUMENT, kata_config::error_chain(&e))
                        })?;
                    storages.push(storage);
                    m.set_source(Some(guest));
                    m.set_typ(Some("bind".into()));
                    continue;
                }
                Ok(None) => {}
                Err(e) => {
                    return Err(err(
                        ttrpc::Code::INVALID_ARGUMENT,
                        kata_config::error_chain(&e),
                    ))
                }
            }
            let guest = sb
                .share_mount(cid, i, &source, &options)
                .map_err(|e| err(ttrpc::Code::INVALID_ARGUMENT, kata_config::error_chain(&e)))?;
            m.set_source(Some(guest));
            m.set_typ(Some("bind".into()));
        }
        spec.set_mounts(Some(mounts));
        Ok(storages)
    }

    async fn do_create(&self, req: &CreateTaskRequest) -> Result<u32, ttrpc::Error> {
        let bundle = PathBuf::from(&req.bundle);
        let mut spec = Spec::load(bundle.join("config.json")).map_err(|e| {
            err(
                ttrpc::Code::INVALID_ARGUMENT,
                format!("read {}/config.json: {e}", bundle.display()),
            )
        })?;
        let annotations = annotations_of(&spec);
        let role =
            crate::pod::role(&annotations).map_err(|e| err(ttrpc::Code::INVALID_ARGUMENT, e))?;
        let (existing, sandbox_pid) = {
            let st = self.state.lock().await;
            let pid = st
                .tasks
                .get(&self.id)
                .map(|t| t.init.pid)
                .filter(|p| *p > 0);
            (st.sandbox.clone(), pid)
        };
        let mut config = match (&role, &existing) {
            // A pod container runs in the VM its sandbox configured: the pod's annotations,
            // which the CRI plugin copies into every container, were applied (or refused) then.
            (crate::pod::Role::Container { sandbox_id }, Some(sb)) if *sandbox_id == self.id => {
                sb.config.clone()
            }
            (crate::pod::Role::Container { sandbox_id }, _) => {
                return Err(err(
                    ttrpc::Code::FAILED_PRECONDITION,
                    format!("container {} belongs to pod sandbox {sandbox_id}, which this shim (sandbox {}) does not run", req.id, self.id),
                ));
            }
            (crate::pod::Role::Sandbox, _) => {
                let inputs = SearchInputs::standard()
                    .with_explicit(
                        rootfs::config_path(req.options.as_ref()),
                        FoundBy::RuntimeOption,
                    )
                    .with_annotations(annotations.clone().into_iter().collect());
                let config = tracing::info_span!("config_load")
                    .in_scope(|| kata_config::load::load_effective(&inputs, &HostLimits::current()))
                    .map_err(|e| err(ttrpc::Code::INVALID_ARGUMENT, kata_config::error_chain(&e)))?
                    .0;
                if config.runtime.enable_debug {
                    crate::set_debug_logging();
                }
                // Keys set in the files that the runtime does not act on: said, not dropped.
                for u in &config.unsupported {
                    tracing::warn!(
                        section = %u.section,
                        key = %u.key,
                        "configuration key set but not supported by this runtime: it has no effect"
                    );
                }
                config
            }
        };
        let root_path = spec
            .root()
            .as_ref()
            .map(|r| r.path().clone())
            .unwrap_or_else(|| PathBuf::from("rootfs"));
        let rootfs = if root_path.is_absolute() {
            root_path
        } else {
            bundle.join(root_path)
        };
        let mounted = if req.rootfs.is_empty() {
            None
        } else {
            tracing::info_span!("rootfs_mount")
                .in_scope(|| rootfs::mount_rootfs(&req.rootfs, &rootfs))
                .map_err(|e| err(ttrpc::Code::INTERNAL, e))?;
            Some(rootfs.clone())
        };
        let undo = |mounted: &Option<PathBuf>| {
            if let Some(r) = mounted {
                rootfs::unmount_rootfs(r);
            }
        };
        let resources = spec.linux().as_ref().and_then(|l| l.resources().clone());
        let (mem, cpus) = requested(resources.as_ref());
        // VM templating: the template is made from the configuration files alone, so that one
        // template serves every pod that does not override them.
        let template_config = if config.factory.enable_template && existing.is_none() {
            let inputs = SearchInputs::standard().with_explicit(
                rootfs::config_path(req.options.as_ref()),
                FoundBy::RuntimeOption,
            );
            kata_config::load::load_effective(&inputs, &HostLimits::current())
                .ok()
                .map(|c| c.0)
        } else {
            None
        };
        let placement = Placement {
            template_config,
            netns: kata_sandbox::network::netns_of(&spec),
            new_netns: role == crate::pod::Role::Sandbox
                && kata_sandbox::network::wants_new_netns(&spec),
            pod_namespaces: None,
            netns_by_pid: crate::pod::configures_netns_by_pid(self.publisher.namespace(), &spec),
            cgroups_path: Some(
                spec.linux()
                    .as_ref()
                    .and_then(|l| l.cgroups_path().as_ref())
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
            ),
        };
        let counted_cpu =
            (!crate::pod::is_pod_sandbox(&annotations)).then(|| cpu_limit(resources.as_ref()));
        let shared = if self.state.lock().await.pod.is_some() {
            crate::pod::PodNamespaces::Holder
        } else {
            match sandbox_pid {
                Some(pid) if req.id != self.id => crate::pod::PodNamespaces::PauseContainer(pid),
                _ => crate::pod::PodNamespaces::None,
            }
        };
        crate::pod::guest_namespaces(&mut spec, shared);
        let sb = match existing {
            Some(sb) => sb,
            None => {
                if config.runtime.static_resources() {
                    let h = &mut config.hypervisor;
                    h.default_memory = h
                        .default_memory
                        .saturating_add(mem)
                        .min(h.default_maxmemory);
                    h.default_vcpus = h.default_vcpus.saturating_add(cpus).min(h.default_maxvcpus);
                }
                match Sandbox::create_in(&req.id, &config, &placement)
                    .instrument(tracing::info_span!("vm_boot"))
                    .await
                {
                    Ok(sb) => {
                        let sb = Arc::new(sb);
                        self.state.lock().await.sandbox = Some(sb.clone());
                        self.watch_oom(sb.clone());
                        tracing::info!(id = %req.id, source = sb.timings.source.name(), timings = ?sb.timings, accel = ?sb.accel, "sandbox ready");
                        sb
                    }
                    Err(e) => {
                        undo(&mounted);
                        return Err(err(ttrpc::Code::INTERNAL, kata_config::error_chain(&e)));
                    }
                }
            }
        };
        if mem > 0 || cpus > 0 {
            // The VM gets what the container asks for before the container exists; if it
            // cannot, the create fails with the reason (the container would run with less
            // than its limits otherwise).
            self.set_demand(&req.id, Some((mem, cpus)));
            if let Err(e) = self.resize_vm(&sb).await {
                self.set_demand(&req.id, None);
                let _ = self.resize_vm(&sb).await;
                undo(&mounted);
                if req.id == self.id {
                    sb.stop().await;
                    self.state.lock().await.sandbox = None;
                }
                return Err(err(
                    ttrpc::Code::RESOURCE_EXHAUSTED,
                    format!(
                        "cannot give the VM the container's resources ({mem} MiB, {cpus} vCPUs): {}",
                        kata_config::error_chain(&e)
                    ),
                ));
            }
        }
        guest_seccomp(&sb.config, &req.id, &mut spec);
        // The host's hooks stay on the host: the agent never sees them.
        let hooks = spec.hooks().clone();
        spec.set_hooks(None);
        let oci_version = spec.version().clone();
        let created = async {
            if let Some(h) = &hooks {
                crate::hooks::check(h).map_err(|e| err(ttrpc::Code::INVALID_ARGUMENT, e))?;
                let state = crate::hooks::state(
                    &oci_version,
                    &req.id,
                    "creating",
                    sb.vm.pid,
                    &bundle,
                    &annotations,
                );
                for (kind, hook) in crate::hooks::create_hooks(h) {
                    crate::hooks::run(kind, &hook, &state)
                        .instrument(tracing::info_span!("hook", kind))
                        .await
                        .map_err(|e| err(ttrpc::Code::FAILED_PRECONDITION, e))?;
                }
            }
            let storages = Self::share_mounts(&sb, &req.id, &mut spec).await?;
            sb.create_container(&req.id, spec, &rootfs, storages)
                .await
                .map_err(internal)
        }
        .instrument(tracing::info_span!("container_create"))
        .await;
        let pid = match created {
            Ok(pid) => pid,
            Err(e) => {
                sb.unshare(&req.id);
                sb.release_volumes(&req.id).await;
                self.release_demand(&sb, &req.id).await;
                undo(&mounted);
                if req.id == self.id {
                    sb.stop().await;
                    self.state.lock().await.sandbox = None;
                }
                return Err(e);
            }
        };
        let stdio = StdioPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        let tasks = io::start(&sb, &req.id, "", &stdio);
        let mut init = Proc::new(stdio);
        init.pid = pid;
        init.host_pid = sb.host_pid();
        init.output = Some(tasks.output);
        init.input = tasks.input;
        let task = TaskState {
            bundle,
            rootfs: mounted,
            cpu: counted_cpu,
            init,
            execs: HashMap::new(),
            hooks,
            oci_version,
            annotations,
        };
        self.state.lock().await.tasks.insert(req.id.clone(), task);
        self.update_host_cpu_limit(&sb).await;
        Ok(sb.host_pid())
    }

    /// Forwards the guest's OOM kills as `/tasks/oom` events while the sandbox runs.
    fn watch_oom(&self, sb: Arc<Sandbox>) {
        let oom = self.oom.clone();
        let sandbox = Arc::downgrade(&sb);
        drop(sb);
        tokio::spawn(async move {
            loop {
                let Some(sb) = sandbox.upgrade() else { return };
                let client = sb.agent.agent.clone();
                drop(sb);
                let req = kata_protocols::agent::GetOOMEventRequest::new();
                match client
                    .get_oom_event(ttrpc::context::with_timeout(0), &req)
                    .await
                {
                    Ok(ev) => {
                        if let Some(sb) = sandbox.upgrade() {
                            oom.check(&sb, &ev.container_id).await;
                        }
                    }
                    Err(_) => return, // the sandbox stopped
                }
            }
        });
    }

    fn watch_exit(
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
                    match sb.vm.exit_error() {
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
        if req.exec_id.is_empty() {
            if req.id == self.id {
                // Docker configured the namespace of the pid it was given after Create.
                sb.attach_late_network()
                    .await
                    .map_err(|e| err(ttrpc::Code::INTERNAL, kata_config::error_chain(&e)))?;
            }
            sb.start_container(&req.id)
                .instrument(tracing::info_span!("process_start", id = %req.id))
                .await
                .map_err(internal)?;
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
                sb.vm.pid,
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
            return Ok(StartResponse {
                pid,
                ..Default::default()
            });
        }
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
                return Err(internal(e));
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
                self.update_host_cpu_limit(sb).await;
                self.release_demand(sb, &req.id).await;
            }
        }
        if let Some(r) = &t.rootfs {
            rootfs::unmount_rootfs(r);
        }
        if let Some(poststop) = t.hooks.as_ref().and_then(|h| h.poststop().as_ref()) {
            let pid = sb.as_ref().map_or(0, |sb| sb.vm.pid);
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
        if let Err(e) = sb.signal(&req.id, &req.exec_id, req.signal, req.all).await {
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
            // SIGKILL never fails with runc. An agent that does not answer it (a hung or
            // stopped VM) cannot run anything any more: the VM is killed, which ends every
            // process in it (reported as killed), and the kubelet can stop the pod.
            if req.signal == 9 && e.unanswered() {
                tracing::error!(
                    container = %req.id,
                    exec = %req.exec_id,
                    error = %kata_config::error_chain(&e),
                    "the agent did not answer SIGKILL: killing the VM"
                );
                kata_hypervisor::qemu::vm::kill_pid(sb.vm.pid);
                return Ok(Empty::new());
            }
            return Err(internal(e));
        }
        if req.signal == 9 && req.id == self.id && req.exec_id.is_empty() {
            // The pod is being stopped. A guest that took the SIGKILL but cannot reap the
            // sandbox's process (a process stuck in the guest kernel, e.g. on a shared
            // filesystem whose virtiofsd died) would hold the pod forever: after the grace,
            // the VM is killed, which ends every process in it (reported as killed).
            let vm = sb.clone();
            let id = req.id.clone();
            tokio::spawn(async move {
                let reaped =
                    tokio::time::timeout(SANDBOX_KILL_GRACE, exit.wait_for(|e| e.is_some())).await;
                if reaped.is_err() {
                    tracing::error!(
                        sandbox = %id,
                        grace_s = SANDBOX_KILL_GRACE.as_secs(),
                        "the guest did not reap the sandbox's process after SIGKILL: killing the VM"
                    );
                    vm.vm.kill();
                }
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
        let (mem, cpus) = requested(Some(&resources));
        {
            let mut st = self.state.lock().await;
            let t = st
                .tasks
                .get_mut(&req.id)
                .ok_or_else(|| not_found(&format!("task {}", req.id)))?;
            if t.cpu.is_some() {
                t.cpu = Some(cpu_limit(Some(&resources)));
            }
        }
        // The VM follows the new limits, up or down.
        let before = self.set_demand(&req.id, Some((mem, cpus)));
        if let Err(e) = self.resize_vm(&sb).await {
            self.set_demand(&req.id, before);
            return Err(internal(e));
        }
        sb.update(&req.id, any.value.clone())
            .await
            .map_err(internal)?;
        self.update_host_cpu_limit(&sb).await;
        Ok(Empty::new())
    }

    async fn stats(&self, _: &TtrpcContext, req: StatsRequest) -> ttrpc::Result<StatsResponse> {
        let _timer = crate::metrics::rpc_timer("stats");
        tracing::info!(rpc = "stats", id = %req.id, "task API");
        let sb = self.sandbox().await?;
        let r = sb.stats(&req.id).await.map_err(internal)?;
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
