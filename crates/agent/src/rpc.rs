//! The ttrpc services: `grpc.AgentService` and `grpc.Health`.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
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

mod containers;
mod sandbox;

use sandbox::mount_storages;

/// Agent state.
#[derive(Debug)]
pub struct Agent {
    reaper: Reaper,
    containers: Mutex<HashMap<String, Arc<Container>>>,
    sandbox_mounts: Mutex<Vec<PathBuf>>,
    boot_time_us: u64,
    /// Told when a container is added (GetOOMEvent then watches its cgroup too).
    created: tokio::sync::Notify,
    /// `guest_hook_path` from CreateSandbox (see [`crate::guest_hooks`]).
    guest_hooks: Mutex<Option<PathBuf>>,
    /// Port-forward connections the runtime relays.
    forwards: crate::portforward::Forwards,
}

impl Agent {
    /// New agent state.
    pub fn new(reaper: Reaper, boot_time_us: u64) -> Self {
        Agent {
            reaper,
            containers: Mutex::default(),
            sandbox_mounts: Mutex::default(),
            boot_time_us,
            created: tokio::sync::Notify::new(),
            guest_hooks: Mutex::default(),
            forwards: crate::portforward::Forwards::default(),
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

fn signal(n: u32) -> Result<Signal, AgentError> {
    Signal::try_from(n as i32).map_err(|_| AgentError::Invalid(format!("invalid signal {n}")))
}

#[async_trait]
impl AgentService for Agent {
    async fn create_sandbox(&self, _: &TtrpcContext, req: CreateSandboxRequest) -> R<Empty> {
        self.do_create_sandbox(req).await
    }

    async fn destroy_sandbox(&self, _: &TtrpcContext, req: DestroySandboxRequest) -> R<Empty> {
        self.do_destroy_sandbox(req).await
    }

    async fn create_container(
        &self,
        _: &TtrpcContext,
        req: CreateContainerRequest,
    ) -> R<CreateContainerResponse> {
        self.do_create_container(req).await
    }

    async fn start_container(&self, _: &TtrpcContext, req: StartContainerRequest) -> R<Empty> {
        self.do_start_container(req).await
    }

    async fn remove_container(&self, _: &TtrpcContext, req: RemoveContainerRequest) -> R<Empty> {
        self.do_remove_container(req).await
    }

    async fn exec_process(
        &self,
        _: &TtrpcContext,
        req: ExecProcessRequest,
    ) -> R<ExecProcessResponse> {
        self.do_exec_process(req).await
    }

    async fn signal_process(&self, _: &TtrpcContext, req: SignalProcessRequest) -> R<Empty> {
        self.do_signal_process(req).await
    }

    async fn wait_process(
        &self,
        _: &TtrpcContext,
        req: WaitProcessRequest,
    ) -> R<WaitProcessResponse> {
        self.do_wait_process(req).await
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
        self.do_online_cpu_mem(req).await
    }

    async fn get_guest_details(
        &self,
        _: &TtrpcContext,
        req: GuestDetailsRequest,
    ) -> R<GuestDetailsResponse> {
        self.do_get_guest_details(req).await
    }

    async fn set_guest_date_time(
        &self,
        _: &TtrpcContext,
        req: SetGuestDateTimeRequest,
    ) -> R<Empty> {
        self.do_set_guest_date_time(req).await
    }

    async fn reseed_random_dev(&self, _: &TtrpcContext, req: ReseedRandomDevRequest) -> R<Empty> {
        blocking(move || crate::random::reseed_random(&req.data)).await?;
        Ok(Empty::new())
    }

    async fn get_oom_event(&self, _: &TtrpcContext, req: GetOOMEventRequest) -> R<OOMEvent> {
        self.do_get_oom_event(req).await
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

    async fn get_metrics(&self, _: &TtrpcContext, req: GetMetricsRequest) -> R<Metrics> {
        self.do_get_metrics(req).await
    }

    async fn copy_file(&self, _: &TtrpcContext, req: CopyFileRequest) -> R<Empty> {
        blocking(move || {
            crate::watched::copy_file(Path::new(crate::watched::WATCHABLE_ROOT), &req)
                .map_err(AgentError::Guest)
        })
        .await?;
        Ok(Empty::new())
    }

    async fn remove_file(&self, _: &TtrpcContext, req: RemoveFileRequest) -> R<Empty> {
        blocking(move || {
            crate::watched::remove_file(Path::new(crate::watched::WATCHABLE_ROOT), &req.path)
                .map_err(AgentError::Guest)
        })
        .await?;
        Ok(Empty::new())
    }

    async fn port_forward_open(
        &self,
        _: &TtrpcContext,
        req: PortForwardOpenRequest,
    ) -> R<PortForwardOpenResponse> {
        let id = self.forwards.open(req.port).await?;
        Ok(PortForwardOpenResponse {
            id,
            ..Default::default()
        })
    }

    async fn port_forward_write(&self, _: &TtrpcContext, req: PortForwardWriteRequest) -> R<Empty> {
        self.forwards.write(req.id, &req.data).await?;
        Ok(Empty::new())
    }

    async fn port_forward_read(
        &self,
        _: &TtrpcContext,
        req: PortForwardReadRequest,
    ) -> R<PortForwardReadResponse> {
        let data = self.forwards.read(req.id, req.len).await?;
        Ok(PortForwardReadResponse {
            data,
            ..Default::default()
        })
    }

    async fn port_forward_close(&self, _: &TtrpcContext, req: PortForwardCloseRequest) -> R<Empty> {
        self.forwards.close(req.id);
        Ok(Empty::new())
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
