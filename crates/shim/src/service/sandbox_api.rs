//! containerd 2.x's sandbox API (`containerd.runtime.sandbox.v1.Sandbox`), which containerd uses
//! for a runtime whose CRI stanza says `sandboxer = "shim"`: containerd asks the shim for the pod
//! itself (CreateSandbox, StartSandbox, ...) instead of running a pause container in it, then
//! creates the pod's containers through the Task API of the same shim. The VM boots at
//! CreateSandbox in the pod's network namespace (set up by the CRI before), and the agent holds
//! the pod's IPC, UTS and PID namespaces that a pause container would hold otherwise.

use std::sync::Arc;

use async_trait::async_trait;
use containerd_shim_protos::sandbox_api::*;
use containerd_shim_protos::sandbox_async::Sandbox as SandboxApi;
use containerd_shim_protos::types::platform::Platform;
use kata_sandbox::{Placement, Sandbox, SandboxConfig};
use protobuf::well_known_types::timestamp::Timestamp;
use tokio::sync::watch;
use tracing::Instrument;
use ttrpc::r#async::TtrpcContext;

use super::errors::{err, runtime_err};
use super::{Exit, Service};
use crate::events::now;

/// The sandbox API's state of the pod.
#[derive(Debug)]
pub(super) struct Pod {
    created_at: Timestamp,
    /// When the pod's VM stopped (StopSandbox, or it died), and with what status.
    exit: watch::Sender<Exit>,
    shut_down: bool,
}

impl Pod {
    /// Whether ShutdownSandbox was called.
    pub(super) fn is_shut_down(&self) -> bool {
        self.shut_down
    }
}

/// The exit status reported for a pod whose VM died (as for its processes).
const VM_DIED: u32 = 255;

fn platform() -> Platform {
    let architecture = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    Platform {
        os: "linux".into(),
        architecture: architecture.into(),
        ..Default::default()
    }
}

impl Service {
    fn check_id(&self, id: &str) -> Result<(), ttrpc::Error> {
        if id != self.id {
            return Err(err(
                ttrpc::Code::NOT_FOUND,
                format!("sandbox {id}: this shim serves sandbox {}", self.id),
            ));
        }
        Ok(())
    }

    /// Marks the pod stopped with `status` (once).
    async fn pod_exited(&self, status: u32) {
        if let Some(p) = &self.state.lock().await.pod {
            p.exit.send_if_modified(|e| {
                if e.is_none() {
                    *e = Some((status, now()));
                    true
                } else {
                    false
                }
            });
        }
    }

    async fn create_pod(&self, req: &CreateSandboxRequest) -> Result<(), ttrpc::Error> {
        self.check_id(&req.sandbox_id)?;
        {
            let st = self.state.lock().await;
            if st.sandbox.is_some() || st.pod.is_some() {
                return Err(err(
                    ttrpc::Code::ALREADY_EXISTS,
                    format!("sandbox {} already exists", req.sandbox_id),
                ));
            }
        }
        let pod = match req.options.as_ref() {
            Some(any) if any.type_url.ends_with("PodSandboxConfig") => {
                crate::pod::PodConfig::decode(&any.value).ok_or_else(|| {
                    err(
                        ttrpc::Code::INVALID_ARGUMENT,
                        "CreateSandbox: the pod's configuration (runtime.v1.PodSandboxConfig) does not decode",
                    )
                })?
            }
            _ => crate::pod::PodConfig::default(),
        };
        let mut annotations = pod.annotations.clone();
        annotations.extend(req.annotations.clone());
        let loaded = SandboxConfig::load(
            self.runtime_config.clone(),
            annotations.into_iter().collect(),
        )
        .map_err(|e| err(ttrpc::Code::INVALID_ARGUMENT, kata_config::error_chain(&e)))?;
        let (config, template_config) = (loaded.config, loaded.template);
        if config.runtime.enable_debug {
            crate::set_debug_logging();
        }
        let placement = Placement {
            template_config,
            netns: (!req.netns_path.is_empty()).then(|| req.netns_path.clone().into()),
            cgroups_path: Some(pod.cgroups_path(&req.sandbox_id)),
            pod_namespaces: Some(kata_sandbox::SharedNamespaces {
                hostname: pod.hostname.clone(),
                sysctls: pod.sysctls.clone(),
            }),
            ..Default::default()
        };
        let sb = Sandbox::create_in(&req.sandbox_id, &config, &placement)
            .instrument(tracing::info_span!("vm_boot"))
            .await
            .map_err(runtime_err)?;
        let sb = Arc::new(sb);
        tracing::info!(id = %req.sandbox_id, source = sb.timings().source.name(), timings = ?sb.timings(), accel = ?sb.accel(), "sandbox ready (sandbox API: no pause container)");
        let mut st = self.state.lock().await;
        st.sandbox = Some(sb.clone());
        st.pod = Some(Pod {
            created_at: now(),
            exit: watch::channel(None).0,
            shut_down: false,
        });
        drop(st);
        self.watch_oom(sb);
        Ok(())
    }
}

#[async_trait]
impl SandboxApi for Service {
    async fn create_sandbox(
        &self,
        _: &TtrpcContext,
        req: CreateSandboxRequest,
    ) -> ttrpc::Result<CreateSandboxResponse> {
        let _timer = crate::metrics::rpc_timer("create_sandbox");
        tracing::info!(rpc = "create_sandbox", id = %req.sandbox_id, netns = %req.netns_path, "sandbox API");
        self.create_pod(&req)
            .instrument(tracing::info_span!("sandbox_create", id = %req.sandbox_id))
            .await?;
        Ok(CreateSandboxResponse::new())
    }

    async fn start_sandbox(
        &self,
        _: &TtrpcContext,
        req: StartSandboxRequest,
    ) -> ttrpc::Result<StartSandboxResponse> {
        let _timer = crate::metrics::rpc_timer("start_sandbox");
        tracing::info!(rpc = "start_sandbox", id = %req.sandbox_id, "sandbox API");
        self.check_id(&req.sandbox_id)?;
        let sb = self.sandbox().await?;
        let created_at = {
            let st = self.state.lock().await;
            let pod = st.pod.as_ref().ok_or_else(|| {
                err(
                    ttrpc::Code::FAILED_PRECONDITION,
                    "StartSandbox before CreateSandbox",
                )
            })?;
            pod.created_at.clone()
        };
        // The pod ends when its VM does: WaitSandbox answers then.
        let exit = self.state.lock().await.pod.as_ref().map(|p| p.exit.clone());
        let vm = Arc::downgrade(&sb);
        if let Some(exit) = exit {
            tokio::spawn(async move {
                let Some(sb) = vm.upgrade() else { return };
                let died = sb.wait_vm_exit().await;
                exit.send_if_modified(|e| {
                    if e.is_none() {
                        tracing::error!(error = %kata_config::error_chain(&died), "the pod's VM stopped");
                        *e = Some((VM_DIED, now()));
                        true
                    } else {
                        false
                    }
                });
            });
        }
        Ok(StartSandboxResponse {
            pid: sb.host_pid(),
            created_at: protobuf::MessageField::some(created_at),
            ..Default::default()
        })
    }

    async fn platform(
        &self,
        _: &TtrpcContext,
        req: PlatformRequest,
    ) -> ttrpc::Result<PlatformResponse> {
        self.check_id(&req.sandbox_id)?;
        Ok(PlatformResponse {
            platform: protobuf::MessageField::some(platform()),
            ..Default::default()
        })
    }

    async fn stop_sandbox(
        &self,
        _: &TtrpcContext,
        req: StopSandboxRequest,
    ) -> ttrpc::Result<StopSandboxResponse> {
        let _timer = crate::metrics::rpc_timer("stop_sandbox");
        tracing::info!(rpc = "stop_sandbox", id = %req.sandbox_id, "sandbox API");
        self.check_id(&req.sandbox_id)?;
        let sb = self.state.lock().await.sandbox.take();
        if let Some(sb) = sb {
            sb.stop()
                .instrument(tracing::info_span!("teardown", id = %req.sandbox_id))
                .await;
        }
        self.pod_exited(0).await;
        Ok(StopSandboxResponse::new())
    }

    async fn wait_sandbox(
        &self,
        _: &TtrpcContext,
        req: WaitSandboxRequest,
    ) -> ttrpc::Result<WaitSandboxResponse> {
        self.check_id(&req.sandbox_id)?;
        let mut rx = {
            let st = self.state.lock().await;
            let pod = st.pod.as_ref().ok_or_else(|| {
                err(
                    ttrpc::Code::NOT_FOUND,
                    format!("sandbox {}", req.sandbox_id),
                )
            })?;
            pod.exit.subscribe()
        };
        loop {
            if let Some((status, at)) = rx.borrow_and_update().clone() {
                return Ok(WaitSandboxResponse {
                    exit_status: status,
                    exited_at: protobuf::MessageField::some(at),
                    ..Default::default()
                });
            }
            if rx.changed().await.is_err() {
                return Err(err(ttrpc::Code::NOT_FOUND, "the sandbox was removed"));
            }
        }
    }

    async fn sandbox_status(
        &self,
        _: &TtrpcContext,
        req: SandboxStatusRequest,
    ) -> ttrpc::Result<SandboxStatusResponse> {
        self.check_id(&req.sandbox_id)?;
        let st = self.state.lock().await;
        let pod = st.pod.as_ref().ok_or_else(|| {
            err(
                ttrpc::Code::NOT_FOUND,
                format!("sandbox {}", req.sandbox_id),
            )
        })?;
        let exit = pod.exit.borrow().clone();
        let ready = exit.is_none() && st.sandbox.is_some();
        Ok(SandboxStatusResponse {
            sandbox_id: self.id.clone(),
            pid: st.sandbox.as_ref().map_or(0, |sb| sb.host_pid()),
            state: if ready {
                "SANDBOX_READY"
            } else {
                "SANDBOX_NOTREADY"
            }
            .into(),
            created_at: protobuf::MessageField::some(pod.created_at.clone()),
            exited_at: exit.map(|e| e.1).into(),
            ..Default::default()
        })
    }

    async fn ping_sandbox(
        &self,
        _: &TtrpcContext,
        req: PingRequest,
    ) -> ttrpc::Result<PingResponse> {
        self.check_id(&req.sandbox_id)?;
        self.sandbox().await?;
        Ok(PingResponse::new())
    }

    async fn shutdown_sandbox(
        &self,
        _: &TtrpcContext,
        req: ShutdownSandboxRequest,
    ) -> ttrpc::Result<ShutdownSandboxResponse> {
        let _timer = crate::metrics::rpc_timer("shutdown_sandbox");
        tracing::info!(rpc = "shutdown_sandbox", id = %req.sandbox_id, "sandbox API");
        self.check_id(&req.sandbox_id)?;
        let sb = {
            let mut st = self.state.lock().await;
            if let Some(p) = st.pod.as_mut() {
                p.shut_down = true;
            }
            st.sandbox.take()
        };
        if let Some(sb) = sb {
            sb.stop().await;
        }
        self.pod_exited(0).await;
        self.shutdown.notify_one();
        Ok(ShutdownSandboxResponse::new())
    }
}
