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
    /// Rewrites the spec's bind mounts to guest paths of shared copies; a Kubernetes emptyDir
    /// becomes a directory in guest memory shared by the pod's containers (unless
    /// `disable_guest_empty_dir`).
    /// Shares the spec's bind mounts with the guest; a bind of a direct volume becomes its
    /// block device instead (the returned storages, for the agent to mount).
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

    pub(super) async fn do_create(&self, req: &CreateTaskRequest) -> Result<u32, ttrpc::Error> {
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
        let loaded = match (&role, &existing) {
            // A pod container runs in the VM its sandbox configured: the pod's annotations,
            // which the CRI plugin copies into every container, were applied (or refused) then.
            (crate::pod::Role::Container { sandbox_id }, Some(sb)) if *sandbox_id == self.id => {
                SandboxConfig {
                    config: sb.config().clone(),
                    template: None,
                }
            }
            (crate::pod::Role::Container { sandbox_id }, _) => {
                return Err(err(
                    ttrpc::Code::FAILED_PRECONDITION,
                    format!("container {} belongs to pod sandbox {sandbox_id}, which this shim (sandbox {}) does not run", req.id, self.id),
                ));
            }
            (crate::pod::Role::Sandbox, _) => {
                let loaded = SandboxConfig::load(
                    rootfs::config_path(req.options.as_ref()),
                    annotations.clone().into_iter().collect(),
                )
                .map_err(|e| err(ttrpc::Code::INVALID_ARGUMENT, kata_config::error_chain(&e)))?;
                if loaded.config.runtime.enable_debug {
                    crate::set_debug_logging();
                }
                loaded
            }
        };
        let (mut config, template_config) = (loaded.config, loaded.template);
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
        let demand = Demand::of(resources.as_ref());
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
        // A pod's sandbox container's limits are not the pod's: not counted in the host cgroup.
        let counted_cpu = !crate::pod::is_pod_sandbox(&annotations);
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
                        .saturating_add(demand.memory_mib)
                        .min(h.default_maxmemory);
                    h.default_vcpus = h
                        .default_vcpus
                        .saturating_add(demand.vcpus)
                        .min(h.default_maxvcpus);
                }
                match Sandbox::create_in(&req.id, &config, &placement)
                    .instrument(tracing::info_span!("vm_boot"))
                    .await
                {
                    Ok(sb) => {
                        let sb = Arc::new(sb);
                        self.state.lock().await.sandbox = Some(sb.clone());
                        self.watch_oom(sb.clone());
                        tracing::info!(id = %req.id, source = sb.timings().source.name(), timings = ?sb.timings(), accel = ?sb.accel(), "sandbox ready");
                        sb
                    }
                    Err(e) => {
                        undo(&mounted);
                        return Err(runtime_err(e));
                    }
                }
            }
        };
        // The VM gets what the container asks for before the container exists; if it cannot,
        // the create fails with the reason.
        if let Err(e) = sb.reserve(&req.id, resources.as_ref(), counted_cpu).await {
            undo(&mounted);
            if req.id == self.id {
                sb.stop().await;
                self.state.lock().await.sandbox = None;
            }
            return Err(runtime_err(e));
        }
        guest_seccomp(sb.config(), &req.id, &mut spec);
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
                    sb.host_pid(),
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
                .map_err(runtime_err)
        }
        .instrument(tracing::info_span!("container_create"))
        .await;
        let pid = match created {
            Ok(pid) => pid,
            Err(e) => {
                sb.unshare(&req.id);
                sb.release_volumes(&req.id).await;
                sb.release(&req.id).await;
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
            init,
            execs: HashMap::new(),
            hooks,
            oci_version,
            annotations,
        };
        self.state.lock().await.tasks.insert(req.id.clone(), task);
        Ok(sb.host_pid())
    }
}
