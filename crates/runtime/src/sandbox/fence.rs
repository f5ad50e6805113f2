//! SIGKILL never fails and always ends the process, as with runc: when the guest cannot make it
//! so, the VM is killed, which ends every process in it (each reported as killed) and lets the
//! kubelet stop the pod.

use std::future::Future;
use std::sync::Arc;

use super::*;

/// How long the guest has to reap the sandbox's own process after a SIGKILL before the VM is
/// killed (a stuck guest must not hold a pod that is being stopped).
pub const SANDBOX_KILL_GRACE: Duration = Duration::from_secs(30);

/// What [`Sandbox::kill`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Killed {
    /// The agent delivered the signal.
    Signalled,
    /// The agent did not answer a SIGKILL (a hung or stopped guest): the VM was killed.
    VmKilled,
}

impl Sandbox {
    /// Sends `signal` to a process (all of the container's with `all`). A SIGKILL the agent
    /// does not answer kills the VM instead of failing: nothing could run in that guest any
    /// more. Any other failure is returned.
    pub async fn kill(
        &self,
        container_id: &str,
        exec_id: &str,
        signal: u32,
        all: bool,
    ) -> Result<Killed, SandboxError> {
        match self.signal(container_id, exec_id, signal, all).await {
            Ok(()) => Ok(Killed::Signalled),
            Err(e) if signal == libc::SIGKILL as u32 && e.unanswered() => {
                tracing::error!(
                    container = %container_id,
                    exec = %exec_id,
                    error = %kata_config::error_chain(&e),
                    "the agent did not answer SIGKILL: killing the VM"
                );
                self.vm.kill();
                Ok(Killed::VmKilled)
            }
            Err(e) => Err(e),
        }
    }

    /// After a SIGKILL to the sandbox's own process: a guest that took it but cannot reap the
    /// process (stuck in the guest kernel, e.g. on a shared filesystem whose virtiofsd died)
    /// would hold the pod forever, so unless `reaped` completes within `grace` the VM is
    /// killed. Runs in the background; holds the sandbox only weakly.
    pub fn fence_after_kill(
        self: &Arc<Self>,
        grace: Duration,
        reaped: impl Future<Output = ()> + Send + 'static,
    ) {
        let sandbox = Arc::downgrade(self);
        tokio::spawn(async move {
            if tokio::time::timeout(grace, reaped).await.is_ok() {
                return;
            }
            if let Some(sb) = sandbox.upgrade() {
                tracing::error!(
                    sandbox = %sb.id,
                    grace_s = grace.as_secs(),
                    "the guest did not reap the sandbox's process after SIGKILL: killing the VM"
                );
                sb.vm.kill();
            }
        });
    }
}
