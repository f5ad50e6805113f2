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
//! network namespace). The server boots a replacement a moment later (at once when the pool
//! is empty).
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

mod server;
pub use server::serve;

#[cfg(test)]
mod tests;
