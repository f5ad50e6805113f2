//! VMCache (`[factory] vm_cache_number = N`): a server (`kata-runtime factory init`, in the
//! foreground) keeps N VMs booted, their agents answering, and hands one to each new sandbox
//! over Kata's gRPC `cache.CacheService` on a unix socket (`vm_cache_endpoint`, mode 0600).
//!
//! A cached VM is a cold boot of the configuration without a sandbox: its directories are
//! `/run/vc/vm/vmcache-<hex>` and `/run/kata-containers/shared/sandboxes/vmcache-<hex>` (the
//! share, empty, with its own virtiofsd for virtio-fs or QEMU's 9p export), and the file
//! [`OWNER_FILE`] names the server that owns it. `GetBaseVM` takes one out of the pool (never
//! twice: the pool is one list under one lock), marks it handed over, closes the server's QMP
//! session and answers with its id and pids; the sandbox renames its directories to its own,
//! adopts QEMU and virtiofsd (process descriptors: they stay the server's children), moves
//! them into its cgroups and hot-plugs the pod's NICs by descriptor (QEMU is not in the pod's
//! network namespace). The server boots a replacement at once.
//!
//! Failures never fail a pod: an unreachable server, an empty cache or a pod whose VM settings
//! differ from the cache's means a cold boot. A cached VM whose QEMU dies is dropped from the
//! pool and replaced. When the server dies without stopping its VMs (SIGKILL), the first
//! sandbox that finds it gone stops them ([`reap_orphans`]).

use std::collections::VecDeque;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use kata_config::Config;
use kata_hypervisor::probe::Accel;
use kata_hypervisor::qemu::vm::Vm;
use kata_hypervisor::virtiofsd::Virtiofsd;
use serde::{Deserialize, Serialize};
use tokio::sync::{watch, Notify};
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::error::SandboxError;
use crate::host::{cleanup_paths, cleanup_stale, SandboxPaths, VM_STATE_ROOT};

/// The generated `cache.CacheService` API (Kata's field numbers).
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod proto {
    tonic::include_proto!("cache");
}

use proto::cache_service_client::CacheServiceClient;
use proto::cache_service_server::{CacheService, CacheServiceServer};
use proto::{GrpcStatus, GrpcVm, GrpcVmConfig, GrpcVmStatus};

/// Prefix of a cached VM's id.
pub const CACHE_ID_PREFIX: &str = "vmcache-";
/// In a cached VM's directory: `server <pid> <start time>` while the server holds it,
/// `handed <unix time>` once it was handed to a sandbox.
pub const OWNER_FILE: &str = "vmcache-owner";
/// How long a sandbox may take to rename a VM it was handed (after that, a VM still under its
/// cache name is an orphan).
const HANDOVER_GRACE: Duration = Duration::from_secs(60);
/// How long a sandbox waits for the server's answers.
const TAKE_TIMEOUT: Duration = Duration::from_secs(3);

/// What `GetBaseVM`'s `hypervisor` bytes carry (JSON): Kata's `ID` and `QmpChannelpath`, and
/// what a sandbox needs to take the VM over.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct HandedVm {
    /// The VM's id (`vmcache-<hex>`).
    #[serde(rename = "ID")]
    pub id: String,
    /// Its QMP socket (under its cache name).
    #[serde(rename = "QmpChannelpath")]
    pub qmp_channel_path: String,
    /// QEMU's pid.
    pub qemu_pid: u32,
    /// virtiofsd's pid (virtio-fs).
    pub virtiofsd_pid: Option<u32>,
    /// `unix://<agent socket>` or `vsock://<cid>:<port>`.
    pub agent_url: String,
}

/// A VM taken from the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Taken {
    /// Its id: its directories are still [`SandboxPaths::for_id`] of it.
    pub id: String,
    /// QEMU's pid.
    pub qemu_pid: u32,
    /// virtiofsd's pid.
    pub virtiofsd_pid: Option<u32>,
    /// How to reach its agent.
    pub agent_url: String,
    /// vCPUs and memory (MiB) it was booted with.
    pub cpu: u32,
    /// Memory (MiB).
    pub memory: u32,
}

/// Why the VMCache server could not be asked, or its answer not used.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// No server socket.
    #[error("{} does not exist (is kata-runtime factory init running?)", .0.display())]
    NoServer(PathBuf),
    /// The socket did not take the connection.
    #[error("cannot connect to {}: {source}", endpoint.display())]
    Connect {
        /// The server's socket.
        endpoint: PathBuf,
        /// Why.
        #[source]
        source: tonic::transport::Error,
    },
    /// A call that the server answered with an error.
    #[error("{call}: {}", status.message())]
    Call {
        /// The call (`GetBaseVM`, `Status`...).
        call: &'static str,
        /// The server's status.
        #[source]
        status: Box<tonic::Status>,
    },
    /// A call that the server did not answer in time.
    #[error("{} did not answer {call} within {} s", endpoint.display(), TAKE_TIMEOUT.as_secs())]
    Timeout {
        /// The server's socket.
        endpoint: PathBuf,
        /// The call.
        call: &'static str,
    },
    /// An answer this runtime cannot use, and why.
    #[error("{0}")]
    Declined(String),
    /// The server did not stop.
    #[error("the VMCache server (pid {0}) did not stop within 30 s")]
    DidNotStop(i64),
}

/// Why no VM came from the cache.
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub struct Miss {
    /// Said in the shim's log.
    #[source]
    pub error: CacheError,
    /// The server did not answer at all (its VMs may be orphans).
    pub server_gone: bool,
}

/// What the server's `Config` answers (JSON in `GrpcVMConfig.Data`).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ServedConfig {
    /// [`crate::template::identity`] of the configuration the VMs were booted from.
    identity: String,
    vm_cache_number: u32,
}

async fn connect(
    endpoint: &Path,
) -> Result<CacheServiceClient<tonic::transport::Channel>, CacheError> {
    if !endpoint.exists() {
        return Err(CacheError::NoServer(endpoint.to_path_buf()));
    }
    let path = endpoint.to_path_buf();
    let connect = |source| CacheError::Connect {
        endpoint: endpoint.to_path_buf(),
        source,
    };
    let channel = tonic::transport::Endpoint::from_static("http://[::]:50051")
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?))
            }
        }))
        .await
        .map_err(connect)?;
    Ok(CacheServiceClient::new(channel))
}

/// Takes a VM from the server at `endpoint` if it serves VMs booted from a configuration whose
/// identity is `identity`.
pub async fn take(endpoint: &Path, identity: &str) -> Result<Taken, Miss> {
    let gone = |error| Miss {
        error,
        server_gone: true,
    };
    let declined = |error| Miss {
        error,
        server_gone: false,
    };
    let call = |call: &'static str| {
        move |status| {
            declined(CacheError::Call {
                call,
                status: Box::new(status),
            })
        }
    };
    let work = async {
        let mut client = connect(endpoint).await.map_err(gone)?;
        let served = client
            .config(())
            .await
            .map_err(call("Config"))?
            .into_inner();
        let served: ServedConfig = serde_json::from_slice(&served.data).map_err(|e| {
            declined(CacheError::Declined(format!(
                "the server's Config is not this runtime's: {e}"
            )))
        })?;
        if served.identity != identity {
            return Err(declined(CacheError::Declined(
                "this pod's VM settings (annotations, static resources) or the runtime, kernel, initrd or QEMU differ from the cached VMs'"
                    .into(),
            )));
        }
        let vm = client
            .get_base_vm(())
            .await
            .map_err(call("GetBaseVM"))?
            .into_inner();
        parse_handed(&vm).map_err(declined)
    };
    match tokio::time::timeout(TAKE_TIMEOUT, work).await {
        Ok(r) => r,
        Err(_) => Err(declined(CacheError::Timeout {
            endpoint: endpoint.to_path_buf(),
            call: "GetBaseVM",
        })),
    }
}

/// Checks a `GetBaseVM` answer: a cache VM id (it becomes paths), pids.
fn parse_handed(vm: &GrpcVm) -> Result<Taken, CacheError> {
    let h: HandedVm = serde_json::from_slice(&vm.hypervisor).map_err(|e| {
        CacheError::Declined(format!(
            "GetBaseVM: the hypervisor field is not this runtime's: {e}"
        ))
    })?;
    if h.id != vm.id || !h.id.starts_with(CACHE_ID_PREFIX) || !crate::ids::is_valid(&h.id) {
        return Err(CacheError::Declined(format!(
            "GetBaseVM: {:?} is not a cached VM's id",
            vm.id
        )));
    }
    if h.qemu_pid == 0 {
        return Err(CacheError::Declined("GetBaseVM: no QEMU pid".into()));
    }
    Ok(Taken {
        id: h.id,
        qemu_pid: h.qemu_pid,
        virtiofsd_pid: h.virtiofsd_pid,
        agent_url: h.agent_url,
        cpu: vm.cpu,
        memory: vm.memory,
    })
}

/// The server's answer to `Status`, for `kata-runtime factory status`.
pub async fn status(endpoint: &Path) -> Result<GrpcStatus, CacheError> {
    let mut client = connect(endpoint).await?;
    let s = tokio::time::timeout(TAKE_TIMEOUT, client.status(()))
        .await
        .map_err(|_| CacheError::Timeout {
            endpoint: endpoint.to_path_buf(),
            call: "Status",
        })?
        .map_err(|status| CacheError::Call {
            call: "Status",
            status: Box::new(status),
        })?;
    Ok(s.into_inner())
}

/// Asks the server to stop (`kata-runtime factory destroy`) and waits until it has stopped its
/// VMs and removed its socket. Returns false when no server answered.
pub async fn quit(endpoint: &Path) -> Result<bool, CacheError> {
    let mut client = match connect(endpoint).await {
        Ok(c) => c,
        Err(_) => return Ok(false),
    };
    let pid = tokio::time::timeout(TAKE_TIMEOUT, client.status(()))
        .await
        .ok()
        .and_then(|r| r.ok())
        .map(|s| s.into_inner().pid);
    tokio::time::timeout(TAKE_TIMEOUT, client.quit(()))
        .await
        .map_err(|_| CacheError::Timeout {
            endpoint: endpoint.to_path_buf(),
            call: "Quit",
        })?
        .map_err(|status| CacheError::Call {
            call: "Quit",
            status: Box::new(status),
        })?;
    drop(client);
    let deadline = Instant::now() + Duration::from_secs(30);
    while endpoint.exists()
        || pid.is_some_and(|p| !crate::host::zombie(i32::try_from(p).unwrap_or(0)))
    {
        if Instant::now() > deadline {
            return Err(CacheError::DidNotStop(pid.unwrap_or_default()));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(true)
}

/// A process's start time (`/proc/<pid>/stat` field 22), which tells it from a later process
/// with the same pid.
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(19)?.parse().ok()
}

fn owner_record() -> String {
    let me = std::process::id();
    format!("server {me} {}\n", start_time(me).unwrap_or_default())
}

/// Whether the cached VM in `dir` has lost its owner: its server is gone, or it was handed
/// over more than a minute ago and nobody renamed it.
fn orphaned(dir: &Path, only_server: Option<u32>) -> bool {
    let record = std::fs::read_to_string(dir.join(OWNER_FILE)).unwrap_or_default();
    let f: Vec<&str> = record.split_whitespace().collect();
    match (f.first().copied(), only_server) {
        (Some("server"), Some(me)) => f.get(1).and_then(|p| p.parse().ok()) == Some(me),
        (_, Some(_)) => false,
        (Some("server"), None) => {
            let pid: Option<u32> = f.get(1).and_then(|p| p.parse().ok());
            let start: Option<u64> = f.get(2).and_then(|p| p.parse().ok());
            match (pid, start) {
                (Some(p), Some(s)) => start_time(p) != Some(s),
                _ => true,
            }
        }
        (Some("handed"), None) => {
            let at: u64 = f.get(1).and_then(|p| p.parse().ok()).unwrap_or(0);
            unix_now().saturating_sub(at) > HANDOVER_GRACE.as_secs()
        }
        // Being created (the record is written right after the directory) or garbled.
        _ => std::fs::metadata(dir)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_none_or(|age| age > HANDOVER_GRACE),
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn cache_dirs() -> Vec<(String, PathBuf)> {
    std::fs::read_dir(VM_STATE_ROOT)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_str()?.to_string();
            (name.starts_with(CACHE_ID_PREFIX) && crate::ids::is_valid(&name))
                .then(|| (name, e.path()))
        })
        .collect()
}

/// Stops the cached VMs whose server died without stopping them (killed), and those handed
/// over but never taken; returns their ids. Safe to run from several processes at once.
pub fn reap_orphans() -> Vec<String> {
    reap(None)
}

fn reap(only_server: Option<u32>) -> Vec<String> {
    let mut reaped = Vec::new();
    for (id, dir) in cache_dirs() {
        if orphaned(&dir, only_server) {
            cleanup_stale(&id);
            reaped.push(id);
        }
    }
    reaped
}

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
    let mut virtiofsd = None;
    let mut vm = None;
    let r = async {
        crate::host::create_private_dirs(&paths)?;
        let owner = paths.vm_dir.join(OWNER_FILE);
        std::fs::write(&owner, owner_record()).map_err(io("failed to write", &owner))?;
        let (shared_fs, v) = crate::launch::start_share(&config.hypervisor, &paths).await?;
        virtiofsd = v;
        let channel = crate::launch::agent_channel(config, &paths.vm_dir)?;
        let spec = crate::launch::launch_spec(
            &id,
            config,
            accel,
            &paths.vm_dir,
            channel.clone(),
            shared_fs,
        );
        let started = vm.insert(crate::launch::start_qemu(config, &spec, &paths.vm_dir).await?);
        let agent =
            crate::launch::wait_for_agent(started, &channel, config.agent.dial_timeout).await?;
        // The agent goes back to waiting for a host: the sandbox connects afresh.
        drop(agent);
        Ok(crate::launch::agent_url(&channel))
    }
    .await;
    match r {
        Ok(agent_url) => match vm {
            Some(vm) => Ok(Cached {
                id,
                paths,
                vm,
                virtiofsd,
                agent_url,
                cpu: config.hypervisor.default_vcpus,
                memory: config.hypervisor.default_memory,
            }),
            None => Err(SandboxError::Invalid("cached VM vanished".into())),
        },
        Err(e) => {
            if let Some(vm) = vm {
                vm.stop(Duration::from_millis(200)).await;
            }
            if let Some(v) = virtiofsd {
                v.stop().await;
            }
            cleanup_paths(&paths);
            Err(e)
        }
    }
}

/// The server's state.
struct Server {
    config: Config,
    accel: Accel,
    identity: String,
    number: u32,
    pool: Mutex<VecDeque<Cached>>,
    booting: AtomicU32,
    refill: Notify,
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
mod tests {
    use super::*;

    fn handed(id: &str) -> GrpcVm {
        let h = HandedVm {
            id: id.into(),
            qmp_channel_path: format!("/run/vc/vm/{id}/qmp.sock"),
            qemu_pid: 42,
            virtiofsd_pid: Some(43),
            agent_url: format!("unix:///run/vc/vm/{id}/agent.sock"),
        };
        GrpcVm {
            id: id.into(),
            hypervisor: serde_json::to_vec(&h).expect("json"),
            proxy_pid: 42,
            proxy_url: h.agent_url.clone(),
            cpu: 1,
            memory: 2048,
            cpu_delta: 0,
        }
    }

    #[test]
    fn a_handed_vm_must_be_a_cache_vm() {
        let t = parse_handed(&handed("vmcache-0a1b2c")).expect("valid");
        assert_eq!(
            (t.id.as_str(), t.qemu_pid, t.virtiofsd_pid, t.cpu, t.memory),
            ("vmcache-0a1b2c", 42, Some(43), 1, 2048)
        );
        for bad in ["../etc", "vmcache-../x", "sandbox-1", ""] {
            let e = parse_handed(&handed(bad)).expect_err(bad);
            assert!(
                e.to_string().contains("is not a cached VM's id"),
                "{bad}: {e}"
            );
        }
        let mut garbled = handed("vmcache-00");
        garbled.hypervisor = b"{}".to_vec();
        assert!(parse_handed(&garbled)
            .expect_err("garbled")
            .to_string()
            .contains("not this runtime's"));
    }

    #[test]
    fn owner_records_tell_live_servers_from_dead_ones() {
        let t = tempfile::tempdir().expect("tempdir");
        let dir = t.path();
        std::fs::write(dir.join(OWNER_FILE), owner_record()).expect("write");
        assert!(!orphaned(dir, None), "this process is alive");
        assert!(
            orphaned(dir, Some(std::process::id())),
            "owned by this server"
        );
        assert!(!orphaned(dir, Some(1)), "not server 1's");
        let me = std::process::id();
        std::fs::write(dir.join(OWNER_FILE), format!("server {me} 1\n")).expect("write");
        assert!(orphaned(dir, None), "same pid, another start time: dead");
        std::fs::write(dir.join(OWNER_FILE), format!("handed {}\n", unix_now())).expect("write");
        assert!(!orphaned(dir, None), "just handed over");
        std::fs::write(dir.join(OWNER_FILE), "handed 1000\n").expect("write");
        assert!(orphaned(dir, None), "handed long ago, never renamed");
        std::fs::remove_file(dir.join(OWNER_FILE)).expect("rm");
        assert!(!orphaned(dir, None), "being created");
    }

    #[test]
    fn the_proto_keeps_katas_field_numbers() {
        use prost::Message;
        let vm = GrpcVm {
            id: "a".into(),
            hypervisor: vec![1],
            proxy_pid: 2,
            proxy_url: "b".into(),
            cpu: 3,
            memory: 4,
            cpu_delta: 5,
        };
        // field 1 string, 2 bytes, 3 varint, 4 string, 5/6/7 varints.
        assert_eq!(
            vm.encode_to_vec(),
            [0x0a, 1, b'a', 0x12, 1, 1, 0x18, 2, 0x22, 1, b'b', 0x28, 3, 0x30, 4, 0x38, 5]
        );
        let s = GrpcStatus {
            pid: 7,
            vmstatus: vec![GrpcVmStatus {
                pid: 8,
                cpu: 1,
                memory: 9,
            }],
        };
        assert_eq!(
            s.encode_to_vec(),
            [0x08, 7, 0x12, 6, 0x08, 8, 0x10, 1, 0x18, 9]
        );
        let c = GrpcVmConfig {
            data: vec![1],
            agent_config: vec![2],
        };
        assert_eq!(c.encode_to_vec(), [0x0a, 1, 1, 0x12, 1, 2]);
    }
}
