//! The VMCache server (`kata-runtime factory init`): keeps `vm_cache_number` VMs booted on the
//! launch layer, hands one to each sandbox that asks (`GetBaseVM`), stops them when told (`Quit`).

use super::*;

/// A booted VM in the pool.
#[derive(Debug)]
struct Cached {
    id: String,
    paths: SandboxPaths,
    vm: Vm,
    virtiofsd: Option<Virtiofsd>,
    agent_url: String,
    cpu: u32,
    memory: u32,
}

impl Cached {
    async fn discard(self) {
        self.vm.stop(Duration::from_millis(500)).await;
        if let Some(v) = self.virtiofsd {
            v.stop().await;
        }
        cleanup_paths(&self.paths);
    }
}

fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        use std::io::Read;
        let _ = f.read_exact(&mut b);
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl Fn(std::io::Error) -> SandboxError + 'a {
    move |source| SandboxError::Io {
        what,
        path: path.display().to_string(),
        source,
    }
}

/// Boots one VM for the cache: directories, share, virtiofsd, QEMU, until the agent answers;
/// then the server lets go of the agent (the sandbox connects afresh). Nothing stays behind
/// on failure.
async fn boot_one(config: &Config, accel: Accel) -> Result<Cached, SandboxError> {
    let id = format!("{CACHE_ID_PREFIX}{}", random_hex(6));
    let paths = SandboxPaths::for_id(&id);
    let owner = paths.vm_dir.join(OWNER_FILE);
    let made = crate::host::create_private_dirs(&paths).and_then(|()| {
        std::fs::write(&owner, owner_record()).map_err(io("failed to write", &owner))
    });
    if let Err(e) = made {
        cleanup_paths(&paths);
        return Err(e);
    }
    // Nothing is left of a failed boot (the launch layer's guard).
    let booted = crate::launch::boot_vm(&id, config, accel, &paths).await?;
    let t = Instant::now();
    let warm = warm_up(&booted.agent)
        .instrument(tracing::info_span!("vmcache_warm_up"))
        .await;
    if warm.is_ok() {
        let ms = t.elapsed().as_millis() as u64;
        tracing::info!(vm = %id, warm_up_ms = ms, "warm-up container created, started and removed");
    }
    // The agent goes back to waiting for a host: the sandbox connects afresh.
    drop(booted.agent);
    let cached = Cached {
        id,
        paths,
        vm: booted.vm,
        virtiofsd: booted.virtiofsd,
        agent_url: crate::launch::agent_url(&booted.channel),
        cpu: config.hypervisor.default_vcpus,
        memory: config.hypervisor.default_memory,
    };
    match warm {
        Ok(()) => Ok(cached),
        Err(e) => {
            cached.discard().await;
            Err(e)
        }
    }
}

/// The throw-away container a cached VM runs before it is offered.
const WARM_UP_ID: &str = "vmcache-warm-up";
/// Its root in the guest: an empty tmpfs.
const WARM_UP_ROOT: &str = "/run/kata-containers/vmcache-warm-up";
/// Its program, which does not exist: the start fails at `execve`, after everything else.
const WARM_UP_PROGRAM: &str = "/vmcache-warm-up-exits-at-exec";

/// The OCI spec of the throw-away container: the default namespaces (the network one is the
/// VM's own, as for every container), mounts, masked and read-only paths of an OCI runtime.
fn warm_up_spec() -> oci_spec::runtime::Spec {
    use oci_spec::runtime::{LinuxNamespaceType, Process, Root, Spec};
    let mut spec = Spec::default();
    let mut process = Process::default();
    process.set_args(Some(vec![WARM_UP_PROGRAM.to_string()]));
    spec.set_process(Some(process));
    let mut root = Root::default();
    root.set_path(WARM_UP_ROOT.into());
    root.set_readonly(Some(false));
    spec.set_root(Some(root));
    if let Some(linux) = spec.linux_mut() {
        let kept = linux.namespaces().clone().map(|list| {
            list.into_iter()
                .filter(|n| n.typ() != LinuxNamespaceType::Network)
                .collect()
        });
        linux.set_namespaces(kept);
    }
    spec
}

/// One throw-away container cycle in a freshly booted VM: create (namespaces, cgroup, mounts,
/// `pivot_root`), start (fails at `execve`), remove. Under TCG a new QEMU starts with an empty
/// translation cache, and the guest kernel's and the agent's container paths are translated
/// the first time they run: here, in the background, instead of in the first sandbox's
/// container create. An error means the VM is not offered (the agent may hold the container).
async fn warm_up(agent: &crate::agent::AgentClient) -> Result<(), SandboxError> {
    use crate::agent::{agent_err, ctx, CALL_TIMEOUT};
    use kata_protocols::agent::{
        CreateContainerRequest, RemoveContainerRequest, StartContainerRequest, Storage,
    };
    let spec = serde_json::to_vec(&warm_up_spec())
        .map_err(|e| SandboxError::Invalid(format!("encode the warm-up OCI spec: {e}")))?;
    let root = Storage {
        driver: "local".into(),
        source: "tmpfs".into(),
        fstype: "tmpfs".into(),
        options: vec!["size=1m".into(), "mode=0755".into()],
        mount_point: WARM_UP_ROOT.into(),
        ..Default::default()
    };
    let create = CreateContainerRequest {
        container_id: WARM_UP_ID.into(),
        oci_spec_json: spec,
        storages: vec![root],
        ..Default::default()
    };
    agent
        .agent
        .create_container(ctx(CALL_TIMEOUT), &create)
        .await
        .map_err(agent_err("CreateContainer (cache warm-up)"))?;
    let start = StartContainerRequest {
        container_id: WARM_UP_ID.into(),
        ..Default::default()
    };
    // Expected to fail: the program does not exist.
    let started = agent.agent.start_container(ctx(CALL_TIMEOUT), &start).await;
    tracing::debug!(
        failed_as_expected = started.is_err(),
        "warm-up container started"
    );
    let remove = RemoveContainerRequest {
        container_id: WARM_UP_ID.into(),
        timeout: 10,
        ..Default::default()
    };
    agent
        .agent
        .remove_container(ctx(CALL_TIMEOUT), &remove)
        .await
        .map_err(agent_err("RemoveContainer (cache warm-up)"))?;
    Ok(())
}

/// How long the refill waits after a VM was taken, while the pool still holds one: the
/// sandbox that took it creates its container meanwhile, and on a small host a VM booting beside
/// it slows that down (on 2 CPUs under TCG a VMCache start took 545-571 ms with the refill at
/// once, 423-442 ms with it a moment later). With the pool empty the refill starts at once.
const REFILL_QUIET: Duration = Duration::from_millis(1000);

/// The server's state.
struct Server {
    config: Config,
    accel: Accel,
    identity: String,
    number: u32,
    pool: Mutex<VecDeque<Cached>>,
    booting: AtomicU32,
    refill: Notify,
    /// When a VM was last taken.
    last_take: Mutex<Option<Instant>>,
    stop: watch::Sender<Option<&'static str>>,
}

impl Server {
    fn pool(&self) -> std::sync::MutexGuard<'_, VecDeque<Cached>> {
        self.pool.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Keeps `number` VMs booted or booting, one boot at a time.
    async fn fill(self: Arc<Self>) {
        let mut failures = 0u32;
        loop {
            let have = self.pool().len() as u32 + self.booting.load(Ordering::SeqCst);
            if have >= self.number {
                self.refill.notified().await;
                continue;
            }
            if let Some(wait) = self.refill_wait() {
                tokio::time::sleep(wait).await;
                continue;
            }
            self.booting.fetch_add(1, Ordering::SeqCst);
            let t = Instant::now();
            let r = boot_one(&self.config, self.accel)
                .instrument(tracing::info_span!("vmcache_boot"))
                .await;
            self.booting.fetch_sub(1, Ordering::SeqCst);
            match r {
                Ok(c) => {
                    failures = 0;
                    tracing::info!(vm = %c.id, qemu = c.vm.pid, ms = t.elapsed().as_millis() as u64, "VM cached");
                    let watched = kata_hypervisor::pidfd::PidFd::open(c.vm.pid);
                    let id = c.id.clone();
                    self.pool().push_back(c);
                    if let Ok(p) = watched {
                        tokio::spawn(self.clone().watch(id, p));
                    }
                }
                Err(e) => {
                    failures += 1;
                    let wait = Duration::from_secs(u64::from(failures.min(30)));
                    tracing::warn!(error = %kata_config::error_chain(&e), retry_in_s = wait.as_secs(), "booting a VM for the cache failed");
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    /// Drops VM `id` from the pool when its QEMU dies there, and boots a replacement.
    async fn watch(self: Arc<Self>, id: String, qemu: kata_hypervisor::pidfd::PidFd) {
        let _ = qemu.wait().await;
        let gone = {
            let mut pool = self.pool();
            pool.iter()
                .position(|c| c.id == id)
                .and_then(|i| pool.remove(i))
        };
        if let Some(c) = gone {
            tracing::warn!(vm = %id, qemu = qemu.pid, "a cached VM's QEMU died; replacing it");
            c.discard().await;
            self.refill.notify_one();
        }
    }

    /// How long the refill still waits after the last take (see [`REFILL_QUIET`]).
    fn refill_wait(&self) -> Option<Duration> {
        if self.pool().is_empty() {
            return None;
        }
        let last = *self.last_take.lock().unwrap_or_else(|e| e.into_inner());
        last.and_then(|t| REFILL_QUIET.checked_sub(t.elapsed()))
            .filter(|d| !d.is_zero())
    }

    /// Takes the oldest live VM out of the pool.
    fn take(&self) -> Option<Cached> {
        let mut dead = Vec::new();
        let taken = {
            let mut pool = self.pool();
            loop {
                match pool.pop_front() {
                    None => break None,
                    Some(c) if c.vm.exit_error().is_some() => dead.push(c),
                    Some(c) => break Some(c),
                }
            }
        };
        for c in dead {
            tracing::warn!(vm = %c.id, "a cached VM's QEMU died; replacing it");
            tokio::spawn(c.discard());
        }
        if taken.is_some() {
            *self.last_take.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        }
        self.refill.notify_one();
        taken
    }
}

struct Service(Arc<Server>);

#[tonic::async_trait]
impl CacheService for Service {
    async fn config(&self, _: Request<()>) -> Result<Response<GrpcVmConfig>, Status> {
        let served = ServedConfig {
            identity: self.0.identity.clone(),
            vm_cache_number: self.0.number,
        };
        let data = serde_json::to_vec(&served).map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(GrpcVmConfig {
            data,
            agent_config: Vec::new(),
        }))
    }

    async fn get_base_vm(&self, _: Request<()>) -> Result<Response<GrpcVm>, Status> {
        let c = self.0.take().ok_or_else(|| {
            Status::unavailable(format!(
                "the VM cache is empty ({} of {} VMs booting)",
                self.0.booting.load(Ordering::SeqCst),
                self.0.number
            ))
        })?;
        let owner = c.paths.vm_dir.join(OWNER_FILE);
        let _ = std::fs::write(&owner, format!("handed {}\n", unix_now()));
        let handed = HandedVm {
            id: c.id.clone(),
            qmp_channel_path: c.paths.vm_dir.join("qmp.sock").display().to_string(),
            qemu_pid: c.vm.pid,
            virtiofsd_pid: c.virtiofsd.as_ref().map(|v| v.pid),
            agent_url: c.agent_url.clone(),
        };
        let reply = GrpcVm {
            id: c.id.clone(),
            hypervisor: serde_json::to_vec(&handed).map_err(|e| Status::internal(e.to_string()))?,
            proxy_pid: i64::from(c.vm.pid),
            proxy_url: c.agent_url.clone(),
            cpu: c.cpu,
            memory: c.memory,
            cpu_delta: 0,
        };
        tracing::info!(vm = %c.id, qemu = c.vm.pid, "VM handed over");
        // Closing QMP lets the new owner connect; QEMU and virtiofsd stay this process's
        // children, reaped here when they exit.
        drop(c.vm);
        if let Some(v) = c.virtiofsd {
            v.release();
        }
        Ok(Response::new(reply))
    }

    async fn status(&self, _: Request<()>) -> Result<Response<GrpcStatus>, Status> {
        let vmstatus = self
            .0
            .pool()
            .iter()
            .map(|c| GrpcVmStatus {
                pid: i64::from(c.vm.pid),
                cpu: c.cpu,
                memory: c.memory,
            })
            .collect();
        Ok(Response::new(GrpcStatus {
            pid: i64::from(std::process::id()),
            vmstatus,
        }))
    }

    async fn quit(&self, _: Request<()>) -> Result<Response<()>, Status> {
        self.0.stop.send_replace(Some("Quit"));
        Ok(Response::new(()))
    }
}

/// Runs the VMCache server for `config` (`kata-runtime factory init`) until SIGINT, SIGTERM or
/// `Quit`; then stops its cached VMs (VMs handed to sandboxes keep running) and removes its
/// socket. `ready` is called once the socket listens.
pub async fn serve(
    config: &Config,
    accel: Accel,
    ready: impl FnOnce(&Path),
) -> Result<(), SandboxError> {
    let number = config.factory.vm_cache_number;
    let endpoint = PathBuf::from(&config.factory.vm_cache_endpoint);
    if number == 0 {
        return Err(SandboxError::Invalid(
            "[factory].vm_cache_number = 0: VMCache is off".into(),
        ));
    }
    if endpoint.exists() {
        if tokio::net::UnixStream::connect(&endpoint).await.is_ok() {
            return Err(SandboxError::Invalid(format!(
                "a VMCache server already serves {} (kata-runtime factory status shows it, factory destroy stops it)",
                endpoint.display()
            )));
        }
        // A killed server's socket.
        std::fs::remove_file(&endpoint)
            .map_err(io("failed to remove the stale socket", &endpoint))?;
    }
    let reaped = tokio::task::spawn_blocking(reap_orphans)
        .await
        .unwrap_or_default();
    if !reaped.is_empty() {
        tracing::warn!(vms = ?reaped, "stopped the VMs a dead VMCache server left");
    }
    if let Some(parent) = endpoint.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(parent)
            .map_err(io("failed to create", parent))?;
    }
    let listener =
        tokio::net::UnixListener::bind(&endpoint).map_err(io("failed to listen on", &endpoint))?;
    std::fs::set_permissions(&endpoint, std::fs::Permissions::from_mode(0o600))
        .map_err(io("failed to set the mode of", &endpoint))?;
    let (stop, mut stopped) = watch::channel(None);
    let server = Arc::new(Server {
        config: config.clone(),
        accel,
        identity: crate::template::identity(config, accel),
        number,
        pool: Mutex::new(VecDeque::new()),
        booting: AtomicU32::new(0),
        refill: Notify::new(),
        last_take: Mutex::new(None),
        stop,
    });
    let filler = tokio::spawn(server.clone().fill());
    let signals = {
        let server = server.clone();
        use tokio::signal::unix::{signal, SignalKind};
        let mut int = signal(SignalKind::interrupt()).map_err(io("signal", Path::new("SIGINT")))?;
        let mut term =
            signal(SignalKind::terminate()).map_err(io("signal", Path::new("SIGTERM")))?;
        tokio::spawn(async move {
            let why = tokio::select! {
                _ = int.recv() => "SIGINT",
                _ = term.recv() => "SIGTERM",
            };
            server.stop.send_replace(Some(why));
        })
    };
    ready(&endpoint);
    let mut shutdown = stopped.clone();
    let served = tonic::transport::Server::builder()
        .add_service(CacheServiceServer::new(Service(server.clone())))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::UnixListenerStream::new(listener),
            async move {
                let _ = shutdown.wait_for(Option::is_some).await;
            },
        );
    // Open client connections may hold a graceful shutdown: give them a moment only.
    let result = tokio::select! {
        r = served => r.map_err(|e| SandboxError::Invalid(format!("VMCache server: {}", kata_config::error_chain(&e)))),
        _ = async {
            let _ = stopped.wait_for(Option::is_some).await;
            tokio::time::sleep(Duration::from_secs(2)).await;
        } => Ok(()),
    };
    let why = (*stopped.borrow()).unwrap_or("error");
    tracing::info!(reason = why, "VMCache server stopping");
    filler.abort();
    signals.abort();
    let _ = filler.await;
    let cached: Vec<Cached> = server.pool().drain(..).collect();
    for c in cached {
        c.discard().await;
    }
    // A boot the stop interrupted.
    let me = std::process::id();
    tokio::task::spawn_blocking(move || reap(Some(me)))
        .await
        .unwrap_or_default();
    let _ = std::fs::remove_file(&endpoint);
    result
}

#[cfg(test)]
mod warm_up_tests {
    use super::*;
    use oci_spec::runtime::LinuxNamespaceType;

    #[test]
    fn the_warm_up_container_fails_at_exec_in_the_vms_network_namespace() {
        let spec = warm_up_spec();
        let args = spec.process().as_ref().and_then(|p| p.args().clone());
        assert_eq!(args, Some(vec![WARM_UP_PROGRAM.to_string()]));
        let root = spec.root().as_ref().map(|r| r.path().clone());
        assert_eq!(root, Some(PathBuf::from(WARM_UP_ROOT)));
        let types: Vec<LinuxNamespaceType> = spec
            .linux()
            .as_ref()
            .and_then(|l| l.namespaces().clone())
            .unwrap_or_default()
            .iter()
            .map(|n| n.typ())
            .collect();
        assert!(!types.contains(&LinuxNamespaceType::Network), "{types:?}");
        for t in [
            LinuxNamespaceType::Pid,
            LinuxNamespaceType::Mount,
            LinuxNamespaceType::Ipc,
        ] {
            assert!(types.contains(&t), "{t:?} missing from {types:?}");
        }
        let mounts: Vec<PathBuf> = spec
            .mounts()
            .clone()
            .unwrap_or_default()
            .iter()
            .map(|m| m.destination().clone())
            .collect();
        assert!(mounts.contains(&PathBuf::from("/proc")), "{mounts:?}");
    }
}
