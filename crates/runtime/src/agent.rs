//! The host side of the agent channel: dial (with the configured timeout, watching QEMU), and
//! typed calls with per-call timeouts.

use std::path::Path;
use std::time::{Duration, Instant};

use kata_protocols::agent::*;
use kata_protocols::agent_ttrpc::{AgentServiceClient, HealthClient};
use ttrpc::asynchronous::transport::Socket;
use ttrpc::context::{self, Context};

use crate::error::SandboxError;

/// Default timeout of short calls.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// A connected agent.
#[derive(Clone)]
pub struct AgentClient {
    /// The agent API.
    pub agent: AgentServiceClient,
    health: HealthClient,
}

impl std::fmt::Debug for AgentClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AgentClient")
    }
}

/// A context with a timeout.
pub fn ctx(timeout: Duration) -> Context {
    context::with_timeout(timeout.as_nanos().min(i64::MAX as u128) as i64)
}

impl AgentClient {
    /// Connects to the virtio-serial socket QEMU serves and waits until the agent answers a
    /// health check, or `deadline` passes.
    pub async fn dial_serial(socket: &Path, deadline: Instant) -> Result<Self, SandboxError> {
        let stream = loop {
            match tokio::net::UnixStream::connect(socket).await {
                Ok(s) => break s,
                Err(e) if Instant::now() >= deadline => {
                    return Err(SandboxError::AgentDial {
                        reason: format!("cannot connect to {}: {e}", socket.display()),
                    })
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        };
        let client = ttrpc::asynchronous::Client::new(Socket::new(stream));
        let c = AgentClient {
            agent: AgentServiceClient::new(client.clone()),
            health: HealthClient::new(client),
        };
        // Requests queue in QEMU until the guest opens its port, so one check with the whole
        // remaining time is enough.
        let left = deadline.saturating_duration_since(Instant::now());
        c.health
            .check(
                ctx(left.max(Duration::from_millis(100))),
                &CheckRequest::new(),
            )
            .await
            .map_err(|e| SandboxError::AgentDial {
                reason: e.to_string(),
            })?;
        Ok(c)
    }

    /// Connects over kernel vsock.
    pub async fn dial_vsock(cid: u32, port: u32, deadline: Instant) -> Result<Self, SandboxError> {
        loop {
            let attempt = async {
                let client =
                    ttrpc::asynchronous::Client::connect(&format!("vsock://{cid}:{port}")).await?;
                let c = AgentClient {
                    agent: AgentServiceClient::new(client.clone()),
                    health: HealthClient::new(client),
                };
                c.health
                    .check(ctx(Duration::from_millis(500)), &CheckRequest::new())
                    .await?;
                Ok::<_, ttrpc::Error>(c)
            };
            match attempt.await {
                Ok(c) => return Ok(c),
                Err(e) if Instant::now() >= deadline => {
                    return Err(SandboxError::AgentDial {
                        reason: e.to_string(),
                    })
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }

    /// The agent's version.
    pub async fn version(&self) -> Result<String, SandboxError> {
        let v = self
            .health
            .version(ctx(CALL_TIMEOUT), &CheckRequest::new())
            .await
            .map_err(agent_err("Version"))?;
        Ok(v.agent_version)
    }
}

/// Maps a ttrpc error of `method` to a [`SandboxError`].
pub fn agent_err(method: &'static str) -> impl Fn(ttrpc::Error) -> SandboxError {
    move |e| {
        let (message, answered) = match &e {
            ttrpc::Error::RpcStatus(s) => (s.message.clone(), true),
            other => (other.to_string(), false),
        };
        SandboxError::Agent {
            method,
            message,
            answered,
        }
    }
}

/// The guest's OOM kills, as the agent reports them, without holding the sandbox (a watcher
/// keeps this, not the [`crate::Sandbox`]).
#[derive(Clone)]
pub struct OomEvents(AgentServiceClient);

impl std::fmt::Debug for OomEvents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OomEvents")
    }
}

impl OomEvents {
    /// Of the agent `client`.
    pub fn of(client: &AgentClient) -> OomEvents {
        OomEvents(client.agent.clone())
    }

    /// Waits for the next container whose cgroup had an OOM kill; None once the agent is gone
    /// (the sandbox stopped).
    pub async fn next(&self) -> Option<String> {
        self.0
            .get_oom_event(context::with_timeout(0), &GetOOMEventRequest::new())
            .await
            .ok()
            .map(|ev| ev.container_id)
    }
}
