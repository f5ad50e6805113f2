//! A task's Create: the sandbox's (which boots the VM with the configuration the runtime
//! loads) or a pod container's (in the VM its sandbox runs); the container's rootfs mounted,
//! its resources reserved in the VM, its mounts shared, its hooks run, then the agent creates it.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use containerd_shim_protos::api::CreateTaskRequest;
use kata_protocols::agent::Storage;
use kata_sandbox::sandbox::Demand;
use kata_sandbox::{Placement, Sandbox, SandboxConfig};
use oci_spec::runtime::Spec;
use tracing::Instrument;

use super::errors::{err, runtime_err};
use super::{Proc, Service, TaskState};
use crate::io::{self, StdioPaths};
use crate::rootfs;

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
    /// Shares the spec's bind mounts with the guest and rewrites them to guest paths: a
    /// Kubernetes emptyDir becomes a directory in guest memory shared by the pod's containers
    /// (unless `disable_guest_empty_dir`); a ConfigMap, Secret, projected or downward-API volume
    /// a mirrored copy in guest memory (see `kata_sandbox::sandbox::watched`); a bind of a
    /// direct volume its block device (the returned storages, for the agent to mount).
    pub(super) async fn share_mounts(
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
            if !sb.config().runtime.disable_guest_empty_dir {
                if let Some(name) = crate::pod::empty_dir_name(m) {
                    let guest = std::path::Path::new(crate::pod::GUEST_EPHEMERAL_DIR).join(name);
                    // `medium: Memory`: the kubelet's tmpfs, with its size limit, becomes a
                    // tmpfs of the same size in the guest.
                    if let Some(size) = m.source().as_deref().and_then(crate::pod::tmpfs_size) {
                        storages.push(Storage {
                            driver: "ephemeral".into(),
                            source: "tmpfs".into(),
                            fstype: "tmpfs".into(),
                            options: vec![format!("size={size}")],
                            mount_point: guest.display().to_string(),
                            ..Default::default()
                        });
                    }
                    m.set_source(Some(guest));
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
            if crate::pod::is_watched_volume(m) && source.is_dir() {
                let watched = sb
                    .share_watched(cid, i, &source)
                    .await
                    .map_err(|e| err(ttrpc::Code::INTERNAL, kata_config::error_chain(&e)))?;
                if let Some(guest) = watched {
                    m.set_source(Some(guest));
                    m.set_typ(Some("bind".into()));
                    continue;
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

    pub(super) async fn do_create(&self, req: &CreateTaskRequest) -> Result<u32, ttrpc::Error> {
        let bundle = PathBuf::from(&req.bundle);
        let mut spec = Spec::load(bundle.join("config.json")).map_err(|e| {
            err(
                ttrpc::Code::INVALID_ARGUMENT,
                format!("read {}/config.json: {e}", bundle.display()),
            )
        })?;
        let annotations = annotations_of(&spec);
        let role = crate::pod::role(&annotations)
            .map_err(|e| err(ttrpc::Code::INVALID_ARGUMENT, e.to_string()))?;
        let existing = self.state.lock().await.sandbox.clone();
        let loaded = self.config_for(req, &role, existing.as_deref(), &annotations)?;
        let resources = spec.linux().as_ref().and_then(|l| l.resources().clone());
        let rootfs = TaskRootfs::mount(req, &bundle, &spec)?;
        let placement = self.placement_of(&spec, &role, loaded.template.clone());
        self.join_pod_namespaces(req, &mut spec).await;
        let sb = match existing {
            Some(sb) => sb,
            None => {
                let config = loaded.sized_for(Demand::of(resources.as_ref())).config;
                match self.boot(&req.id, &config, &placement).await {
                    Ok(sb) => sb,
                    Err(e) => {
                        rootfs.unmount();
                        return Err(e);
                    }
                }
            }
        };
        // From here a failure undoes what this create did (and, for the sandbox's own task,
        // stops the VM): the guard does it unless the create succeeds.
        let undo = Undo {
            service: self,
            sb: &sb,
            id: &req.id,
            rootfs: &rootfs,
        };
        // The VM gets what the container asks for before the container exists; if it cannot,
        // the create fails with the reason. A pod's sandbox container's limits are not the
        // pod's: not counted in the host cgroup.
        let counted_cpu = !crate::pod::is_pod_sandbox(&annotations);
        if let Err(e) = sb.reserve(&req.id, resources.as_ref(), counted_cpu).await {
            undo.run(false).await;
            return Err(runtime_err(e));
        }
        guest_seccomp(sb.config(), &req.id, &mut spec);
        // The host's hooks stay on the host: the agent never sees them.
        let hooks = spec.hooks().clone();
        spec.set_hooks(None);
        let oci_version = spec.version().clone();
        let created = async {
            if let Some(h) = &hooks {
                let state = crate::hooks::state(
                    &oci_version,
                    &req.id,
                    "creating",
                    sb.host_pid(),
                    &bundle,
                    &annotations,
                );
                run_create_hooks(h, &state).await?;
            }
            let storages = Self::share_mounts(&sb, &req.id, &mut spec).await?;
            sb.create_container(&req.id, spec, &rootfs.path, storages)
                .await
                .map_err(runtime_err)
        }
        .instrument(tracing::info_span!("container_create"))
        .await;
        let pid = match created {
            Ok(pid) => pid,
            Err(e) => {
                undo.run(true).await;
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
            rootfs: rootfs.keep(),
            init,
            execs: HashMap::new(),
            hooks,
            oci_version,
            annotations,
        };
        self.state.lock().await.tasks.insert(req.id.clone(), task);
        Ok(sb.host_pid())
    }

    /// The configuration of the task's sandbox: loaded for the sandbox's own task (files, the
    /// runtime option's path, the pod's annotations); for a pod container, its sandbox's (the
    /// pod's annotations, which the CRI plugin copies into every container, were applied or
    /// refused then).
    fn config_for(
        &self,
        req: &CreateTaskRequest,
        role: &crate::pod::Role,
        existing: Option<&Sandbox>,
        annotations: &HashMap<String, String>,
    ) -> Result<SandboxConfig, ttrpc::Error> {
        match (role, existing) {
            (crate::pod::Role::Container { sandbox_id }, Some(sb)) if *sandbox_id == self.id => {
                Ok(SandboxConfig {
                    config: sb.config().clone(),
                    template: None,
                })
            }
            (crate::pod::Role::Container { sandbox_id }, _) => Err(err(
                ttrpc::Code::FAILED_PRECONDITION,
                format!("container {} belongs to pod sandbox {sandbox_id}, which this shim (sandbox {}) does not run", req.id, self.id),
            )),
            (crate::pod::Role::Sandbox, _) => {
                let loaded = SandboxConfig::load(
                    rootfs::config_path(req.options.as_ref()),
                    annotations.clone().into_iter().collect(),
                )
                .map_err(|e| err(ttrpc::Code::INVALID_ARGUMENT, kata_config::error_chain(&e)))?;
                if loaded.config.runtime.enable_debug {
                    crate::set_debug_logging();
                }
                Ok(loaded)
            }
        }
    }

    /// Where the sandbox runs on the host, from its spec: the network namespace (named, or one
    /// of its own for a manager that asks for it), the host cgroups, the template's
    /// configuration.
    fn placement_of(
        &self,
        spec: &Spec,
        role: &crate::pod::Role,
        template_config: Option<kata_config::Config>,
    ) -> Placement {
        Placement {
            template_config,
            netns: kata_sandbox::network::netns_of(spec),
            new_netns: *role == crate::pod::Role::Sandbox
                && kata_sandbox::network::wants_new_netns(spec),
            pod_namespaces: None,
            netns_by_pid: crate::pod::configures_netns_by_pid(self.publisher.namespace(), spec),
            cgroups_path: Some(
                spec.linux()
                    .as_ref()
                    .and_then(|l| l.cgroups_path().as_ref())
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
            ),
        }
    }

    /// A pod container joins the pod's namespaces in the guest: the agent's holder's (sandbox
    /// API) or the pause container's.
    async fn join_pod_namespaces(&self, req: &CreateTaskRequest, spec: &mut Spec) {
        let shared = {
            let st = self.state.lock().await;
            let sandbox_pid = st
                .tasks
                .get(&self.id)
                .map(|t| t.init.pid)
                .filter(|p| *p > 0);
            if st.pod.is_some() {
                crate::pod::PodNamespaces::Holder
            } else {
                match sandbox_pid {
                    Some(pid) if req.id != self.id => {
                        crate::pod::PodNamespaces::PauseContainer(pid)
                    }
                    _ => crate::pod::PodNamespaces::None,
                }
            }
        };
        crate::pod::guest_namespaces(spec, shared);
    }

    /// Boots the sandbox's VM and starts watching its OOM kills.
    async fn boot(
        &self,
        id: &str,
        config: &kata_config::Config,
        placement: &Placement,
    ) -> Result<Arc<Sandbox>, ttrpc::Error> {
        let sb = Sandbox::create_in(id, config, placement)
            .instrument(tracing::info_span!("vm_boot"))
            .await
            .map_err(runtime_err)?;
        let sb = Arc::new(sb);
        self.state.lock().await.sandbox = Some(sb.clone());
        self.watch_oom(sb.clone());
        tracing::info!(id = %id, source = sb.timings().source.name(), timings = ?sb.timings(), accel = ?sb.accel(), "sandbox ready");
        Ok(sb)
    }
}

/// Runs the spec's hooks of the create phase (`createRuntime`, `prestart`, then
/// `createContainer`) on the host, as runc does; the first failure fails the create.
async fn run_create_hooks(
    hooks: &oci_spec::runtime::Hooks,
    state: &crate::hooks::HookState,
) -> Result<(), ttrpc::Error> {
    crate::hooks::check(hooks).map_err(|e| err(ttrpc::Code::INVALID_ARGUMENT, e.to_string()))?;
    for (kind, hook) in crate::hooks::create_hooks(hooks) {
        crate::hooks::run(kind, &hook, state)
            .instrument(tracing::info_span!("hook", kind))
            .await
            .map_err(|e| err(ttrpc::Code::FAILED_PRECONDITION, e.to_string()))?;
    }
    Ok(())
}

/// A task's root filesystem: the snapshotter's mounts mounted on the bundle's rootfs, unmounted
/// again if the create fails.
struct TaskRootfs {
    /// Where the container's root is on the host.
    path: PathBuf,
    /// Some: mounted here (containerd gave mounts); None: the bundle's rootfs as it is.
    mounted: Option<PathBuf>,
}

impl TaskRootfs {
    fn mount(
        req: &CreateTaskRequest,
        bundle: &std::path::Path,
        spec: &Spec,
    ) -> Result<TaskRootfs, ttrpc::Error> {
        let root_path = spec
            .root()
            .as_ref()
            .map(|r| r.path().clone())
            .unwrap_or_else(|| PathBuf::from("rootfs"));
        let path = if root_path.is_absolute() {
            root_path
        } else {
            bundle.join(root_path)
        };
        if req.rootfs.is_empty() {
            return Ok(TaskRootfs {
                path,
                mounted: None,
            });
        }
        tracing::info_span!("rootfs_mount")
            .in_scope(|| rootfs::mount_rootfs(&req.rootfs, &path))
            .map_err(|e| err(ttrpc::Code::INTERNAL, e.to_string()))?;
        Ok(TaskRootfs {
            mounted: Some(path.clone()),
            path,
        })
    }

    /// Unmounts it (a failed create).
    fn unmount(&self) {
        if let Some(r) = &self.mounted {
            rootfs::unmount_rootfs(r);
        }
    }

    /// Keeps it mounted for the task (unmounted at its Delete).
    fn keep(self) -> Option<PathBuf> {
        self.mounted
    }
}

/// What a failed create undoes: the task's resources in the VM, its shares and volumes, its
/// rootfs; for the sandbox's own task, the VM.
struct Undo<'a> {
    service: &'a Service,
    sb: &'a Arc<Sandbox>,
    id: &'a str,
    rootfs: &'a TaskRootfs,
}

impl Undo<'_> {
    /// `shared`: the create got as far as sharing mounts and volumes.
    async fn run(self, shared: bool) {
        if shared {
            self.sb.unshare(self.id);
            self.sb.release_volumes(self.id).await;
            self.sb.release(self.id).await;
        }
        self.rootfs.unmount();
        if self.id == self.service.id {
            self.sb.stop().await;
            self.service.state.lock().await.sandbox = None;
        }
    }
}
