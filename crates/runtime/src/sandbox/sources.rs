//! The three [`VmSource`]s of a sandbox's boot ([`Boot`]): the VMCache server's VMs
//! ([`CacheSource`]), clones of the VM template ([`TemplateSource`]) and the cold boot
//! ([`ColdSource`]). Each puts the VM it serves into the boot's [`Started`], so that a failure
//! later in the boot stops it with the rest.

use async_trait::async_trait;

use super::boot::Boot;
use super::*;
use crate::source::{Provision, SourceKind, VmSource};

/// A VM booted for this sandbox, from the launch the host preparation made.
#[derive(Debug)]
pub(super) struct ColdSource;

#[async_trait]
impl<'a> VmSource<Boot<'a>> for ColdSource {
    fn kind(&self) -> SourceKind {
        SourceKind::Cold
    }

    async fn provide(&self, boot: &mut Boot<'a>) -> Result<Provision, SandboxError> {
        let spec = boot.host().await?.spec.clone();
        let vm = crate::launch::start_qemu(boot.config, &spec, &boot.paths.vm_dir).await?;
        boot.started.vm = Some(vm);
        Ok(Provision::Served)
    }
}

/// A clone of the VM template (`[factory] enable_template`), made first if there is none. It
/// passes a sandbox it cannot serve (macvtap networking, settings that differ from the
/// template's, a template that cannot be made) and breaks when a clone fails to load the
/// template's state: the template is then invalidated, and the next sandbox rebuilds it.
#[derive(Debug)]
pub(super) struct TemplateSource {
    template: crate::template::Template,
}

impl TemplateSource {
    pub(super) fn of(config: &Config) -> Self {
        TemplateSource {
            template: crate::template::Template::of(config),
        }
    }
}

#[async_trait]
impl<'a> VmSource<Boot<'a>> for TemplateSource {
    fn kind(&self) -> SourceKind {
        SourceKind::Template
    }

    async fn provide(&self, boot: &mut Boot<'a>) -> Result<Provision, SandboxError> {
        let cold = boot.host().await?.spec.clone();
        let (config, accel, paths) = (boot.config, boot.accel, boot.paths);
        if cold.nics.iter().any(|n| n.fd.is_some()) {
            return Ok(Provision::Passed("VM template not used: the pod's network uses macvtap, whose descriptors cannot be hot-plugged into a clone".into()));
        }
        let template = &self.template;
        // The template is made from the configuration files (no pod annotations, no static
        // resources); a pod whose settings differ from them boots cold.
        let base = boot.placement.template_config.as_ref().unwrap_or(config);
        match template
            .ensure(base, accel)
            .instrument(tracing::info_span!("template_ensure"))
            .await
        {
            Ok(Some(c)) => {
                tracing::info!(ms = c.ms, tmpfs_mib = c.tmpfs_mib, path = %template.dir.display(), "VM template created")
            }
            Ok(None) => {}
            Err(e) => {
                return Ok(Provision::Passed(format!(
                    "VM template unavailable ({})",
                    kata_config::error_chain(&e)
                )))
            }
        }
        let lease = match template.lease(config, accel).await {
            Ok(Some(l)) => l,
            Ok(None) => {
                return Ok(Provision::Passed(
                    "this pod's VM settings (annotations or static resources) differ from the template's".into(),
                ))
            }
            Err(e) => {
                return Ok(Provision::Passed(format!(
                    "VM template unavailable ({})",
                    kata_config::error_chain(&e)
                )))
            }
        };
        let mut spec = cold;
        spec.nics = Vec::new();
        spec.memory_file = Some(kata_hypervisor::qemu::argv::MemoryFile {
            path: lease.memory.clone(),
            shared: false,
        });
        spec.incoming = true;
        let vm = match crate::launch::start_qemu(config, &spec, &paths.vm_dir)
            .instrument(tracing::info_span!("template_clone"))
            .await
        {
            Ok(vm) => vm,
            Err(e) => {
                return Ok(Provision::Passed(format!(
                    "cloning the VM template failed ({})",
                    kata_config::error_chain(&e)
                )))
            }
        };
        let restored = vm
            .restore_state(&lease.state, &paths.vm_dir.join("migrate.sock"))
            .await;
        drop(lease);
        match restored {
            Ok(()) => {
                boot.started.vm = Some(vm);
                Ok(Provision::Served)
            }
            Err(e) => {
                vm.stop(Duration::from_millis(200)).await;
                // The next source reuses the same sockets and logs.
                for f in [
                    "qmp.sock",
                    "agent.sock",
                    "pid",
                    crate::launch::DEBUG_CONSOLE_SOCKET,
                ] {
                    let _ = std::fs::remove_file(paths.vm_dir.join(f));
                }
                Ok(Provision::Broke(format!(
                    "cloning the VM template failed ({}); the next sandbox rebuilds the template",
                    kata_config::error_chain(&e)
                )))
            }
        }
    }

    async fn invalidate(&self) {
        self.template.invalidate().await;
    }
}

/// A VM taken over from the VMCache server (`[factory] vm_cache_number`): its directories
/// are renamed to the sandbox's (its sockets keep working), its QEMU and virtiofsd are watched
/// through process descriptors. It passes when the server is gone or empty, the pod's VM
/// settings differ from the cache's, the manager configures the network namespace of QEMU's
/// pid, or the take-over failed (the VM is then stopped).
#[derive(Debug)]
pub(super) struct CacheSource;

#[async_trait]
impl<'a> VmSource<Boot<'a>> for CacheSource {
    fn kind(&self) -> SourceKind {
        SourceKind::Cache
    }

    async fn provide(&self, boot: &mut Boot<'a>) -> Result<Provision, SandboxError> {
        let p = boot.placement;
        if p.new_netns && p.netns_by_pid && p.netns.is_none() {
            // A cached VM's QEMU runs outside any namespace of this sandbox, and the manager
            // configures the namespace of the pid this sandbox reports: QEMU's.
            return Ok(Provision::Passed("VMCache not used: the manager configures the network namespace of QEMU's pid after Create".into()));
        }
        match take_cached(boot.config, boot.accel, boot.paths)
            .instrument(tracing::info_span!("vmcache_take"))
            .await
        {
            Ok(a) => {
                boot.started.vm = Some(a.vm);
                boot.started.virtiofsd = a.virtiofsd;
                boot.adopted_channel = Some(a.channel);
                Ok(Provision::Served)
            }
            Err(not_taken) => Ok(Provision::Passed(not_taken.to_string())),
        }
    }
}

/// A VM taken over from the VMCache server.
struct Adopted {
    vm: Vm,
    virtiofsd: Option<Virtiofsd>,
    channel: AgentChannel,
}

/// Why no VM of the VMCache was taken over.
#[derive(Debug, thiserror::Error)]
enum NotTaken {
    /// The server did not answer (its VMs, orphans now, were stopped).
    #[error("VMCache server unreachable at {endpoint} ({miss})")]
    ServerGone {
        endpoint: String,
        #[source]
        miss: crate::vmcache::Miss,
    },
    /// The server had no VM for this sandbox.
    #[error("no VM from the VMCache ({0})")]
    Declined(#[source] crate::vmcache::Miss),
    /// The VM it handed over could not be made the sandbox's (it was stopped).
    #[error("VMCache VM {vm}: {what}: {source}")]
    TakeOver {
        vm: String,
        what: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// Takes a VM from the VMCache server and makes it the sandbox's (directories `paths`), or
/// says why not; nothing of a failed take-over is left.
async fn take_cached(
    config: &Config,
    accel: Accel,
    paths: &SandboxPaths,
) -> Result<Adopted, NotTaken> {
    let endpoint = Path::new(&config.factory.vm_cache_endpoint);
    let identity = crate::template::identity(config, accel);
    let taken = match crate::vmcache::take(endpoint, &identity).await {
        Ok(t) => t,
        Err(miss) if miss.server_gone => {
            let reaped = tokio::task::spawn_blocking(crate::vmcache::reap_orphans)
                .await
                .unwrap_or_default();
            if !reaped.is_empty() {
                tracing::warn!(vms = ?reaped, "stopped the VMs a dead VMCache server left");
            }
            return Err(NotTaken::ServerGone {
                endpoint: endpoint.display().to_string(),
                miss,
            });
        }
        Err(miss) => return Err(NotTaken::Declined(miss)),
    };
    let from = SandboxPaths::for_id(&taken.id);
    let give_up = |what: String, source: Box<dyn std::error::Error + Send + Sync>| {
        // Whichever name its directories have now, the VM is stopped and they are removed.
        cleanup_stale(&taken.id);
        if paths.vm_dir.join(ADOPTED_FROM).exists() {
            cleanup_stale(
                paths
                    .vm_dir
                    .file_name()
                    .and_then(|n| n.to_str())
                    .unwrap_or(""),
            );
        }
        NotTaken::TakeOver {
            vm: taken.id.clone(),
            what,
            source,
        }
    };
    if let Err(e) = std::fs::rename(&from.vm_dir, &paths.vm_dir) {
        return Err(give_up(
            format!("cannot take over its directory {}", from.vm_dir.display()),
            Box::new(e),
        ));
    }
    let _ = std::fs::write(paths.vm_dir.join(ADOPTED_FROM), &taken.id);
    if from.shared_dir.exists() {
        if let Err(e) = std::fs::rename(&from.shared_dir, &paths.shared_dir) {
            return Err(give_up(
                format!("cannot take over its share {}", from.shared_dir.display()),
                Box::new(e),
            ));
        }
    }
    let h = &config.hypervisor;
    let vm = Vm::adopt(
        taken.qemu_pid,
        h,
        &taken.id,
        &paths.vm_dir.join("qmp.sock"),
        &paths.vm_dir.join("console.log"),
        &paths.vm_dir.join("qemu.stderr"),
    )
    .await
    .map_err(|e| give_up("cannot take over its QEMU".into(), Box::new(e)))?;
    let virtiofsd = match taken.virtiofsd_pid {
        Some(pid) => {
            match Virtiofsd::adopt(pid, &from.vm_dir.join(crate::launch::VIRTIOFSD_SOCKET)) {
                Ok(v) => Some(v),
                Err(e) => {
                    vm.kill();
                    return Err(give_up(
                        "cannot take over its virtiofsd".into(),
                        Box::new(e),
                    ));
                }
            }
        }
        None => None,
    };
    let channel = match taken.agent_url.strip_prefix("vsock://") {
        Some(rest) => match rest.split(':').next().and_then(|c| c.parse().ok()) {
            Some(cid) => AgentChannel::Vsock { cid },
            None => {
                vm.kill();
                return Err(give_up(
                    format!("its agent address {}", taken.agent_url),
                    "not vsock://<cid>:<port>".into(),
                ));
            }
        },
        None => AgentChannel::Serial {
            socket: paths.vm_dir.join("agent.sock"),
        },
    };
    tracing::info!(vm = %taken.id, qemu = taken.qemu_pid, "took a VM from the VMCache");
    Ok(Adopted {
        vm,
        virtiofsd,
        channel,
    })
}
