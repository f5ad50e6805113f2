//! The ttrpc services: `grpc.AgentService` and `grpc.Health`.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use kata_protocols::agent::*;
use kata_protocols::agent_ttrpc::{AgentService, Health};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use oci_spec::runtime::{LinuxResources, Process, Spec};
use ttrpc::r#async::TtrpcContext;

use crate::container::{self, AgentError, Container};
use crate::reaper::{self, Reaper};

/// Agent state.
#[derive(Debug)]
pub struct Agent {
    reaper: Reaper,
    containers: Mutex<HashMap<String, Arc<Container>>>,
    sandbox_mounts: Mutex<Vec<PathBuf>>,
    boot_time_us: u64,
    /// OOM kills already reported, per container.
    oom_seen: Mutex<HashMap<String, u64>>,
    /// `guest_hook_path` from CreateSandbox (see [`crate::guest_hooks`]).
    guest_hooks: Mutex<Option<PathBuf>>,
}

impl Agent {
    /// New agent state.
    pub fn new(reaper: Reaper, boot_time_us: u64) -> Self {
        Agent {
            reaper,
            containers: Mutex::default(),
            sandbox_mounts: Mutex::default(),
            boot_time_us,
            oom_seen: Mutex::default(),
            guest_hooks: Mutex::default(),
        }
    }

    fn guest_hooks(&self) -> Option<PathBuf> {
        self.guest_hooks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn container(&self, id: &str) -> Result<Arc<Container>, AgentError> {
        self.containers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
            .ok_or_else(|| AgentError::NotFound(format!("container {id} does not exist")))
    }

    /// ReadStdout / ReadStderr: waits for output; at the end of the stream a finished exec is
    /// forgotten.
    async fn read_stream(
        &self,
        req: &ReadStreamRequest,
        stderr: bool,
    ) -> ttrpc::Result<ReadStreamResponse> {
        let c = self.container(&req.container_id)?;
        let p = c.process(&req.exec_id)?;
        let stream = if stderr { &p.stderr } else { &p.stdout };
        let data = stream.read(req.len as usize).await;
        if data.is_empty() {
            c.release_if_done(&req.exec_id);
        }
        Ok(ReadStreamResponse {
            data,
            ..Default::default()
        })
    }
}

type R<T> = ttrpc::Result<T>;

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, AgentError> + Send + 'static,
) -> Result<T, AgentError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| AgentError::Failed(format!("worker failed: {e}")))?
}

fn mount_storages(storages: &[Storage]) -> Result<Vec<PathBuf>, AgentError> {
    let mut done = Vec::new();
    for s in storages {
        let fstype = match s.driver.as_str() {
            "virtio-fs" => "virtiofs",
            "9p" => "9p",
            _ => s.fstype.as_str(),
        };
        let dest = PathBuf::from(&s.mount_point);
        if let Err(e) = crate::mounts::mount_one(&s.source, &dest, fstype, &s.options) {
            for m in done.iter().rev() {
                let _ = nix::mount::umount2(m, nix::mount::MntFlags::MNT_DETACH);
            }
            return Err(AgentError::Guest(e));
        }
        done.push(dest);
    }
    Ok(done)
}

fn signal(n: u32) -> Result<Signal, AgentError> {
    Signal::try_from(n as i32).map_err(|_| AgentError::Invalid(format!("invalid signal {n}")))
}

fn online_all(dir: &str, file: &str, value: &str) -> usize {
    let mut n = 0;
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path().join(file);
            if let Ok(cur) = std::fs::read_to_string(&p) {
                let cur = cur.trim();
                if (cur == "0" || cur == "offline") && std::fs::write(&p, value).is_ok() {
                    n += 1;
                }
            }
        }
    }
    n
}

/// Onlines every offline memory block, as movable memory where the kernel allows it.
fn online_memory() {
    let Ok(entries) = std::fs::read_dir("/sys/devices/system/memory") else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path().join("state");
        if std::fs::read_to_string(&p).is_ok_and(|s| s.trim() == "offline")
            && std::fs::write(&p, "online_movable").is_err()
        {
            let _ = std::fs::write(&p, "online");
        }
    }
}

fn online_cpus() -> u32 {
    std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1)
}

fn mem_total_kb() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("MemTotal:")
                    .and_then(|v| v.split_whitespace().next().and_then(|n| n.parse().ok()))
            })
        })
        .unwrap_or(0)
}

#[async_trait]
impl AgentService for Agent {
    async fn create_sandbox(&self, _: &TtrpcContext, req: CreateSandboxRequest) -> R<Empty> {
        crate::init::debug(|| "CreateSandbox".to_string());
        // The pod's containers share the guest's network namespace: its loopback must be up.
        crate::network::loopback_up()?;
        if !req.hostname.is_empty() {
            nix::unistd::sethostname(&req.hostname)
                .map_err(|e| AgentError::Failed(format!("sethostname: {e}")))?;
        }
        for m in &req.kernel_modules {
            crate::init::modprobe(m).map_err(AgentError::Guest)?;
        }
        if !req.guest_hook_path.is_empty() {
            let dir =
                crate::guest_hooks::check_dir(&req.guest_hook_path).map_err(AgentError::Guest)?;
            *self.guest_hooks.lock().unwrap_or_else(|e| e.into_inner()) = Some(dir);
        }
        if !req.dns.is_empty() {
            let text: String = req.dns.iter().map(|l| format!("{l}\n")).collect();
            let _ = std::fs::create_dir_all("/etc");
            std::fs::write("/etc/resolv.conf", text)
                .map_err(|e| AgentError::Failed(format!("write /etc/resolv.conf: {e}")))?;
        }
        if req.sandbox_pidns {
            // No pause container: the pod's IPC, UTS and PID namespaces come from a holder.
            let (reaper, hostname) = (self.reaper.clone(), req.hostname.clone());
            let sysctls = req.sysctls.clone();
            let pid = blocking(move || {
                crate::podns::start(&reaper, &hostname, &sysctls).map_err(AgentError::Guest)
            })
            .await?;
            crate::init::debug(|| format!("CreateSandbox: pod namespaces held by pid {pid}"));
        }
        let storages = req.storages.clone();
        let mounts = blocking(move || mount_storages(&storages)).await?;
        crate::init::debug(|| format!("CreateSandbox: {} storages mounted", mounts.len()));
        self.sandbox_mounts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(mounts);
        Ok(Empty::new())
    }

    async fn destroy_sandbox(&self, _: &TtrpcContext, _: DestroySandboxRequest) -> R<Empty> {
        let all: Vec<Arc<Container>> = self
            .containers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
            .map(|(_, c)| c)
            .collect();
        for c in all {
            for pid in container::cgroup_pids(&c.cgroup) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
        // Answer first, then power off.
        tokio::spawn(async {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            crate::init::power_off();
        });
        Ok(Empty::new())
    }

    async fn create_container(
        &self,
        _: &TtrpcContext,
        req: CreateContainerRequest,
    ) -> R<CreateContainerResponse> {
        let id = req.container_id.clone();
        if id.is_empty() || id.contains('/') || id == "." || id == ".." {
            return Err(AgentError::Invalid(format!("invalid container id {id:?}")).into());
        }
        if self
            .containers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(&id)
        {
            return Err(AgentError::Exists(format!("container {id} already exists")).into());
        }
        crate::init::debug(|| format!("CreateContainer {id}"));
        let spec: Spec = serde_json::from_slice(&req.oci_spec_json)
            .map_err(|e| AgentError::Invalid(format!("invalid OCI spec: {e}")))?;
        let reaper = self.reaper.clone();
        let storages = req.storages.clone();
        let cid = id.clone();
        let hooks = self.guest_hooks();
        let hook_reaper = self.reaper.clone();
        let c = blocking(move || {
            let (blocks, shared): (Vec<Storage>, Vec<Storage>) = storages
                .into_iter()
                .partition(|s| crate::volumes::is_block(&s.driver));
            for b in &blocks {
                crate::volumes::acquire(
                    &cid,
                    &b.driver,
                    &b.source,
                    &b.fstype,
                    &b.options,
                    Path::new(&b.mount_point),
                )
                .map_err(|e| {
                    crate::volumes::release(&cid);
                    AgentError::Guest(e)
                })?;
            }
            let mounts = mount_storages(&shared).inspect_err(|_| crate::volumes::release(&cid))?;
            let c = container::create(&reaper, &cid, spec, mounts.clone()).inspect_err(|_| {
                for m in mounts.iter().rev() {
                    let _ = nix::mount::umount2(m, nix::mount::MntFlags::MNT_DETACH);
                }
                crate::volumes::release(&cid);
            })?;
            if let Some(dir) = hooks {
                let state = c.hook_state("created", c.init()?.pid);
                if let Err(e) =
                    crate::guest_hooks::run(&dir, "prestart", &state, Some(&hook_reaper))
                {
                    container::discard(&c);
                    crate::volumes::release(&cid);
                    return Err(AgentError::Guest(e));
                }
            }
            Ok(c)
        })
        .await?;
        let pid = c.init()?.pid as u32;
        self.containers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, Arc::new(c));
        Ok(CreateContainerResponse {
            pid,
            ..Default::default()
        })
    }

    async fn start_container(&self, _: &TtrpcContext, req: StartContainerRequest) -> R<Empty> {
        let c = self.container(&req.container_id)?;
        let hooks = self.guest_hooks();
        let reaper = self.reaper.clone();
        blocking(move || {
            container::start(&c)?;
            if let Some(dir) = hooks {
                let state = c.hook_state("running", c.init()?.pid);
                if let Err(e) = crate::guest_hooks::run(&dir, "poststart", &state, Some(&reaper)) {
                    eprintln!("kata-agent: container {}: {e}", c.id);
                }
            }
            Ok(())
        })
        .await?;
        Ok(Empty::new())
    }

    async fn remove_container(&self, _: &TtrpcContext, req: RemoveContainerRequest) -> R<Empty> {
        let c = self.container(&req.container_id)?;
        let init = c.init()?;
        if init.exit.borrow().is_none() {
            for pid in container::cgroup_pids(&c.cgroup) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
            let _ = kill(Pid::from_raw(init.pid), Signal::SIGKILL);
            let wait = reaper::wait(init.exit.clone());
            let secs = if req.timeout == 0 {
                10
            } else {
                req.timeout.into()
            };
            if tokio::time::timeout(std::time::Duration::from_secs(secs), wait)
                .await
                .is_err()
            {
                return Err(AgentError::Failed(format!(
                    "container {} did not stop within {secs} s",
                    c.id
                ))
                .into());
            }
        }
        // Let the kernel move the last processes out before removing the cgroup.
        for _ in 0..50 {
            if std::fs::remove_dir(&c.cgroup).is_ok() || !c.cgroup.exists() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        if let Some(dir) = self.guest_hooks() {
            let state = c.hook_state("stopped", init.pid);
            let id = c.id.clone();
            let reaper = self.reaper.clone();
            let _ = blocking(move || {
                if let Err(e) = crate::guest_hooks::run(&dir, "poststop", &state, Some(&reaper)) {
                    eprintln!("kata-agent: container {id}: {e}");
                }
                Ok(())
            })
            .await;
        }
        for m in c.mounts.iter().rev() {
            let _ = nix::mount::umount2(m, nix::mount::MntFlags::MNT_DETACH);
        }
        let id = c.id.clone();
        blocking(move || {
            crate::volumes::release(&id);
            Ok(())
        })
        .await?;
        self.containers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&req.container_id);
        // What the container used is free now, in small pieces all over the guest's RAM; the
        // host gets back only whole free 2 MiB blocks (free page reporting). In the background:
        // forget the removed root filesystem's cached inodes, then compact.
        tokio::task::spawn_blocking(crate::reclaim::reclaim_freed_memory);
        Ok(Empty::new())
    }

    async fn exec_process(
        &self,
        _: &TtrpcContext,
        req: ExecProcessRequest,
    ) -> R<ExecProcessResponse> {
        let c = self.container(&req.container_id)?;
        let process: Process = serde_json::from_slice(&req.process_json)
            .map_err(|e| AgentError::Invalid(format!("invalid OCI process: {e}")))?;
        let reaper = self.reaper.clone();
        let exec_id = req.exec_id.clone();
        let pid = blocking(move || container::exec(&reaper, &c, &exec_id, process)).await?;
        crate::init::debug(|| {
            format!("ExecProcess {}/{} pid {pid}", req.container_id, req.exec_id)
        });
        Ok(ExecProcessResponse {
            pid: pid as u32,
            ..Default::default()
        })
    }

    async fn signal_process(&self, _: &TtrpcContext, req: SignalProcessRequest) -> R<Empty> {
        let c = self.container(&req.container_id)?;
        let sig = signal(req.signal)?;
        if req.all {
            for pid in container::cgroup_pids(&c.cgroup) {
                let _ = kill(Pid::from_raw(pid), sig);
            }
            return Ok(Empty::new());
        }
        let p = c.process(&req.exec_id)?;
        if p.exit.borrow().is_some() {
            return Err(AgentError::NotFound(format!(
                "process {} of container {} has exited",
                req.exec_id, c.id
            ))
            .into());
        }
        kill(Pid::from_raw(p.pid), sig)
            .map_err(|e| AgentError::Failed(format!("kill {}: {e}", p.pid)))?;
        Ok(Empty::new())
    }

    async fn wait_process(
        &self,
        _: &TtrpcContext,
        req: WaitProcessRequest,
    ) -> R<WaitProcessResponse> {
        let c = self.container(&req.container_id)?;
        let p = c.process(&req.exec_id)?;
        crate::init::debug(|| {
            format!(
                "WaitProcess {}/{} pid {}",
                req.container_id, req.exec_id, p.pid
            )
        });
        let exit = reaper::wait(p.exit.clone())
            .await
            .ok_or_else(|| AgentError::Failed("the process was lost".into()))?;
        p.exited();
        c.release_if_done(&req.exec_id);
        let signal = match exit {
            reaper::Exit::Signal(s) => s as u32,
            reaper::Exit::Code(_) => 0,
        };
        Ok(WaitProcessResponse {
            status: exit.status(),
            signal,
            ..Default::default()
        })
    }

    async fn update_container(&self, _: &TtrpcContext, req: UpdateContainerRequest) -> R<Empty> {
        let c = self.container(&req.container_id)?;
        let r: LinuxResources = serde_json::from_slice(&req.resources_json)
            .map_err(|e| AgentError::Invalid(format!("invalid resources: {e}")))?;
        container::apply_resources(&c.cgroup, &r)?;
        Ok(Empty::new())
    }

    async fn stats_container(
        &self,
        _: &TtrpcContext,
        req: StatsContainerRequest,
    ) -> R<StatsContainerResponse> {
        let c = self.container(&req.container_id)?;
        Ok(container::stats(&c.cgroup))
    }

    async fn list_processes(
        &self,
        _: &TtrpcContext,
        req: ListProcessesRequest,
    ) -> R<ListProcessesResponse> {
        let c = self.container(&req.container_id)?;
        let pids = container::cgroup_pids(&c.cgroup)
            .into_iter()
            .map(|p| p as u32)
            .collect();
        Ok(ListProcessesResponse {
            pids,
            ..Default::default()
        })
    }

    async fn write_stdin(
        &self,
        _: &TtrpcContext,
        req: WriteStreamRequest,
    ) -> R<WriteStreamResponse> {
        let p = self.container(&req.container_id)?.process(&req.exec_id)?;
        let data = req.data;
        let len = data.len() as u32;
        blocking(move || {
            let mut g = p.stdin.lock().unwrap_or_else(|e| e.into_inner());
            let f = g
                .as_mut()
                .ok_or_else(|| AgentError::Invalid("stdin is closed".into()))?;
            f.write_all(&data)
                .map_err(|e| AgentError::Failed(format!("write stdin: {e}")))
        })
        .await?;
        Ok(WriteStreamResponse {
            len,
            ..Default::default()
        })
    }

    async fn read_stdout(&self, _: &TtrpcContext, req: ReadStreamRequest) -> R<ReadStreamResponse> {
        self.read_stream(&req, false).await
    }

    async fn read_stderr(&self, _: &TtrpcContext, req: ReadStreamRequest) -> R<ReadStreamResponse> {
        self.read_stream(&req, true).await
    }

    async fn close_stdin(&self, _: &TtrpcContext, req: CloseStdinRequest) -> R<Empty> {
        let p = self.container(&req.container_id)?.process(&req.exec_id)?;
        let mut g = p.stdin.lock().unwrap_or_else(|e| e.into_inner());
        if p.tty.is_some() {
            // A terminal has no separate stdin to close: send EOF (^D) instead.
            if let Some(f) = g.as_mut() {
                let _ = f.write_all(&[4]);
            }
        } else {
            g.take();
        }
        Ok(Empty::new())
    }

    async fn tty_win_resize(&self, _: &TtrpcContext, req: TtyWinResizeRequest) -> R<Empty> {
        let p = self.container(&req.container_id)?.process(&req.exec_id)?;
        container::resize(
            &p,
            req.row.min(u16::MAX.into()) as u16,
            req.column.min(u16::MAX.into()) as u16,
        )?;
        Ok(Empty::new())
    }

    async fn online_cpu_mem(
        &self,
        _: &TtrpcContext,
        req: OnlineCPUMemRequest,
    ) -> R<OnlineCPUMemResponse> {
        let want = req.nb_cpus;
        let cpu_only = req.cpu_only;
        let deadline = std::time::Instant::now()
            + std::time::Duration::from_secs(if req.wait { 10 } else { 0 });
        loop {
            online_all("/sys/devices/system/cpu", "online", "1");
            if !cpu_only {
                // Movable, so the host can take it back (the kernel's own auto-online does the
                // same with memhp_default_state=online_movable); plain "online" where a block
                // cannot be movable.
                online_memory();
            }
            if online_cpus() >= want || std::time::Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        Ok(OnlineCPUMemResponse {
            online_cpus: online_cpus(),
            memory_total_kb: mem_total_kb(),
            ..Default::default()
        })
    }

    async fn get_guest_details(
        &self,
        _: &TtrpcContext,
        req: GuestDetailsRequest,
    ) -> R<GuestDetailsResponse> {
        let block = if req.mem_block_size {
            std::fs::read_to_string("/sys/devices/system/memory/block_size_bytes")
                .ok()
                .and_then(|s| u64::from_str_radix(s.trim(), 16).ok())
                .unwrap_or(0)
        } else {
            0
        };
        let release = nix::sys::utsname::uname()
            .map(|u| u.release().to_string_lossy().to_string())
            .unwrap_or_default();
        Ok(GuestDetailsResponse {
            mem_block_size_bytes: block,
            support_mem_hotplug_probe: std::path::Path::new("/sys/devices/system/memory/probe")
                .exists(),
            agent_details: protobuf::MessageField::some(AgentDetails {
                version: env!("CARGO_PKG_VERSION").to_string(),
                init_daemon: std::process::id() == 1,
                storage_handlers: vec![
                    "virtio-fs".into(),
                    "9p".into(),
                    "bind".into(),
                    "tmpfs".into(),
                ],
                ..Default::default()
            }),
            kernel_release: release,
            online_cpus: online_cpus(),
            memory_total_kb: mem_total_kb(),
            boot_time_us: self.boot_time_us,
            ..Default::default()
        })
    }

    async fn set_guest_date_time(
        &self,
        _: &TtrpcContext,
        req: SetGuestDateTimeRequest,
    ) -> R<Empty> {
        let tv = libc::timeval {
            tv_sec: req.sec,
            tv_usec: req.usec,
        };
        // SAFETY: settimeofday reads a valid timeval; no timezone.
        if unsafe { libc::settimeofday(&tv, std::ptr::null()) } != 0 {
            return Err(AgentError::Failed(format!(
                "settimeofday: {}",
                std::io::Error::last_os_error()
            ))
            .into());
        }
        Ok(Empty::new())
    }

    async fn reseed_random_dev(&self, _: &TtrpcContext, req: ReseedRandomDevRequest) -> R<Empty> {
        blocking(move || crate::random::reseed_random(&req.data)).await?;
        Ok(Empty::new())
    }

    async fn get_oom_event(&self, _: &TtrpcContext, _: GetOOMEventRequest) -> R<OOMEvent> {
        // Long poll: the next container whose cgroup counts a new OOM kill.
        loop {
            let containers: Vec<(String, PathBuf)> = self
                .containers
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .values()
                .map(|c| (c.id.clone(), c.cgroup.clone()))
                .collect();
            for (id, cgroup) in containers {
                let kills = container::stats(&cgroup).oom_kills;
                let mut seen = self.oom_seen.lock().unwrap_or_else(|e| e.into_inner());
                let last = seen.entry(id.clone()).or_insert(0);
                if kills > *last {
                    *last = kills;
                    return Ok(OOMEvent {
                        container_id: id,
                        ..Default::default()
                    });
                }
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }

    async fn update_interface(
        &self,
        _: &TtrpcContext,
        req: UpdateInterfaceRequest,
    ) -> R<Interface> {
        let i = req
            .interface
            .into_option()
            .ok_or_else(|| AgentError::Invalid("UpdateInterface without an interface".into()))?;
        let addresses: Vec<(String, u32)> = i
            .addresses
            .iter()
            .map(|a| (a.address.clone(), a.prefix))
            .collect();
        let (name, mac, mtu) = (i.name.clone(), i.hw_addr.clone(), i.mtu);
        let got = blocking(move || crate::network::update_interface(&name, &mac, mtu, &addresses))
            .await?;
        Ok(Interface { name: got, ..i })
    }

    async fn update_routes(&self, _: &TtrpcContext, req: UpdateRoutesRequest) -> R<Empty> {
        blocking(move || {
            for r in &req.routes {
                crate::network::add_route(&r.dest, &r.gateway, &r.device)?;
            }
            Ok(())
        })
        .await?;
        Ok(Empty::new())
    }

    async fn add_arp_neighbors(&self, _: &TtrpcContext, req: AddARPNeighborsRequest) -> R<Empty> {
        blocking(move || {
            for n in &req.neighbors {
                crate::network::add_neighbor(&n.address, &n.hw_addr, &n.device)?;
            }
            Ok(())
        })
        .await?;
        Ok(Empty::new())
    }

    async fn get_ip_tables(
        &self,
        _: &TtrpcContext,
        req: GetIPTablesRequest,
    ) -> R<GetIPTablesResponse> {
        let reaper = self.reaper.clone();
        let data = blocking(move || {
            crate::iptables::save(&reaper, req.is_ipv6).map_err(AgentError::Guest)
        })
        .await?;
        Ok(GetIPTablesResponse {
            data,
            ..Default::default()
        })
    }

    async fn set_ip_tables(
        &self,
        _: &TtrpcContext,
        req: SetIPTablesRequest,
    ) -> R<SetIPTablesResponse> {
        let reaper = self.reaper.clone();
        let data = blocking(move || {
            crate::iptables::restore(&reaper, req.is_ipv6, &req.data).map_err(AgentError::Guest)
        })
        .await?;
        Ok(SetIPTablesResponse {
            data,
            ..Default::default()
        })
    }

    async fn get_volume_stats(
        &self,
        _: &TtrpcContext,
        req: VolumeStatsRequest,
    ) -> R<VolumeStatsResponse> {
        let path = PathBuf::from(&req.volume_guest_path);
        let (bytes, inodes) =
            blocking(move || crate::volumes::stats(&path).map_err(AgentError::Guest)).await?;
        let usage = |v: [u64; 3], unit: volume_usage::Unit| VolumeUsage {
            available: v[0],
            total: v[1],
            used: v[2],
            unit: unit.into(),
            ..Default::default()
        };
        Ok(VolumeStatsResponse {
            usage: vec![
                usage(bytes, volume_usage::Unit::BYTES),
                usage(inodes, volume_usage::Unit::INODES),
            ],
            volume_condition: protobuf::MessageField::some(VolumeCondition {
                abnormal: false,
                message: "OK".into(),
                ..Default::default()
            }),
            ..Default::default()
        })
    }

    async fn resize_volume(&self, _: &TtrpcContext, req: ResizeVolumeRequest) -> R<Empty> {
        let path = PathBuf::from(&req.volume_guest_path);
        let size = req.size;
        blocking(move || crate::volumes::resize(&path, size).map_err(AgentError::Guest)).await?;
        Ok(Empty::new())
    }

    async fn get_metrics(&self, _: &TtrpcContext, _: GetMetricsRequest) -> R<Metrics> {
        Ok(Metrics {
            metrics: crate::metrics::render(
                self.containers
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .len(),
            ),
            ..Default::default()
        })
    }
}

#[async_trait]
impl Health for Agent {
    async fn check(&self, _: &TtrpcContext, _: CheckRequest) -> R<HealthCheckResponse> {
        Ok(HealthCheckResponse {
            status: health_check_response::ServingStatus::SERVING.into(),
            ..Default::default()
        })
    }

    async fn version(&self, _: &TtrpcContext, _: CheckRequest) -> R<VersionCheckResponse> {
        Ok(VersionCheckResponse {
            grpc_version: "ttrpc".into(),
            agent_version: env!("CARGO_PKG_VERSION").into(),
            ..Default::default()
        })
    }
}
