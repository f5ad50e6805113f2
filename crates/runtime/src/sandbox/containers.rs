//! A sandbox's containers and processes, through the agent: create, start, exec, signal, wait,
//! stdio, stats, updates, terminals, the guest's packet filter, remove.

use super::*;

impl Sandbox {
    /// Creates a container from a host root filesystem and an OCI spec. Returns its pid.
    pub async fn create_container(
        &self,
        container_id: &str,
        mut spec: Spec,
        host_rootfs: &Path,
        storages: Vec<Storage>,
    ) -> Result<u32, SandboxError> {
        let guest_root = self.share_rootfs(container_id, host_rootfs)?;
        let mut root = spec.root().clone().unwrap_or_default();
        root.set_path(guest_root);
        spec.set_root(Some(root));
        let json = serde_json::to_vec(&spec)
            .map_err(|e| SandboxError::Invalid(format!("encode OCI spec: {e}")))?;
        let req = CreateContainerRequest {
            container_id: container_id.to_string(),
            oci_spec_json: json,
            storages,
            ..Default::default()
        };
        match self
            .agent
            .agent
            .create_container(ctx(CALL_TIMEOUT), &req)
            .await
        {
            Ok(r) => Ok(r.pid),
            Err(e) => {
                self.unshare(container_id);
                self.release_volumes(container_id).await;
                Err(agent_err("CreateContainer")(e))
            }
        }
    }

    /// Starts a created container.
    pub async fn start_container(&self, container_id: &str) -> Result<(), SandboxError> {
        let req = StartContainerRequest {
            container_id: container_id.to_string(),
            ..Default::default()
        };
        self.agent
            .agent
            .start_container(ctx(CALL_TIMEOUT), &req)
            .await
            .map_err(agent_err("StartContainer"))?;
        Ok(())
    }

    /// Runs another process in a container.
    pub async fn exec(
        &self,
        container_id: &str,
        exec_id: &str,
        process: &Process,
    ) -> Result<u32, SandboxError> {
        let json = serde_json::to_vec(process)
            .map_err(|e| SandboxError::Invalid(format!("encode OCI process: {e}")))?;
        let req = ExecProcessRequest {
            container_id: container_id.into(),
            exec_id: exec_id.into(),
            process_json: json,
            ..Default::default()
        };
        Ok(self
            .agent
            .agent
            .exec_process(ctx(CALL_TIMEOUT), &req)
            .await
            .map_err(agent_err("ExecProcess"))?
            .pid)
    }

    /// Sends a signal.
    pub async fn signal(
        &self,
        container_id: &str,
        exec_id: &str,
        signal: u32,
        all: bool,
    ) -> Result<(), SandboxError> {
        let req = SignalProcessRequest {
            container_id: container_id.into(),
            exec_id: exec_id.into(),
            signal,
            all,
            ..Default::default()
        };
        self.agent
            .agent
            .signal_process(ctx(CALL_TIMEOUT), &req)
            .await
            .map_err(agent_err("SignalProcess"))?;
        Ok(())
    }

    /// The guest's OOM kills, for a watcher that must not keep the sandbox alive.
    pub fn oom_events(&self) -> crate::agent::OomEvents {
        crate::agent::OomEvents::of(&self.agent)
    }

    /// Waits for a process; returns (status, signal).
    pub async fn wait(
        &self,
        container_id: &str,
        exec_id: &str,
    ) -> Result<(i32, u32), SandboxError> {
        let req = WaitProcessRequest {
            container_id: container_id.into(),
            exec_id: exec_id.into(),
            ..Default::default()
        };
        // No deadline: processes run as long as they like.
        let r = self
            .agent
            .agent
            .wait_process(ttrpc::context::with_timeout(0), &req)
            .await
            .map_err(agent_err("WaitProcess"))?;
        Ok((r.status, r.signal))
    }

    /// The next chunk of a process's stdout (or stderr), waiting for it; empty once the
    /// stream ended.
    pub async fn read_output(
        &self,
        container_id: &str,
        exec_id: &str,
        stderr: bool,
    ) -> Result<Vec<u8>, SandboxError> {
        let req = ReadStreamRequest {
            container_id: container_id.into(),
            exec_id: exec_id.into(),
            len: 64 * 1024,
            ..Default::default()
        };
        let ctx = ttrpc::context::with_timeout(0);
        let r = if stderr {
            self.agent
                .agent
                .read_stderr(ctx, &req)
                .await
                .map_err(agent_err("ReadStderr"))?
        } else {
            self.agent
                .agent
                .read_stdout(ctx, &req)
                .await
                .map_err(agent_err("ReadStdout"))?
        };
        Ok(r.data)
    }

    /// Reads a process's stdout (or stderr) to the end.
    pub async fn read_all(
        &self,
        container_id: &str,
        exec_id: &str,
        stderr: bool,
    ) -> Result<Vec<u8>, SandboxError> {
        let mut out = Vec::new();
        loop {
            let data = self.read_output(container_id, exec_id, stderr).await?;
            if data.is_empty() {
                return Ok(out);
            }
            out.extend(data);
        }
    }

    /// Pids of a container's processes (guest pids).
    pub async fn pids(&self, container_id: &str) -> Result<Vec<u32>, SandboxError> {
        let req = ListProcessesRequest {
            container_id: container_id.into(),
            ..Default::default()
        };
        Ok(self
            .agent
            .agent
            .list_processes(ctx(CALL_TIMEOUT), &req)
            .await
            .map_err(agent_err("ListProcesses"))?
            .pids)
    }

    /// Resource usage of a container's guest cgroup.
    pub async fn stats(&self, container_id: &str) -> Result<StatsContainerResponse, SandboxError> {
        let req = StatsContainerRequest {
            container_id: container_id.into(),
            ..Default::default()
        };
        self.agent
            .agent
            .stats_container(ctx(CALL_TIMEOUT), &req)
            .await
            .map_err(agent_err("StatsContainer"))
    }

    /// Sets the window size of a process's terminal.
    pub async fn resize(
        &self,
        container_id: &str,
        exec_id: &str,
        rows: u32,
        columns: u32,
    ) -> Result<(), SandboxError> {
        let req = TtyWinResizeRequest {
            container_id: container_id.into(),
            exec_id: exec_id.into(),
            row: rows,
            column: columns,
            ..Default::default()
        };
        self.agent
            .agent
            .tty_win_resize(ctx(CALL_TIMEOUT), &req)
            .await
            .map_err(agent_err("TtyWinResize"))?;
        Ok(())
    }

    /// The guest's packet filter rules (`ip(6)tables-save`).
    pub async fn get_iptables(&self, v6: bool) -> Result<Vec<u8>, SandboxError> {
        let req = GetIPTablesRequest {
            is_ipv6: v6,
            ..Default::default()
        };
        Ok(self
            .agent
            .agent
            .get_ip_tables(ctx(CALL_TIMEOUT), &req)
            .await
            .map_err(agent_err("GetIPTables"))?
            .data)
    }

    /// Replaces the guest's packet filter rules (`ip(6)tables-restore`); returns its output.
    pub async fn set_iptables(&self, v6: bool, rules: Vec<u8>) -> Result<Vec<u8>, SandboxError> {
        let req = SetIPTablesRequest {
            is_ipv6: v6,
            data: rules,
            ..Default::default()
        };
        Ok(self
            .agent
            .agent
            .set_ip_tables(ctx(CALL_TIMEOUT), &req)
            .await
            .map_err(agent_err("SetIPTables"))?
            .data)
    }

    /// Applies OCI `LinuxResources` (JSON) to a container's guest cgroup.
    pub async fn update(
        &self,
        container_id: &str,
        resources_json: Vec<u8>,
    ) -> Result<(), SandboxError> {
        let req = UpdateContainerRequest {
            container_id: container_id.into(),
            resources_json,
            ..Default::default()
        };
        self.agent
            .agent
            .update_container(ctx(CALL_TIMEOUT), &req)
            .await
            .map_err(agent_err("UpdateContainer"))?;
        Ok(())
    }

    /// Writes `data` to a process's stdin (waiting up to 30 s for the guest to take it: a
    /// process that does not read holds the writer back).
    pub async fn write_stdin(
        &self,
        container_id: &str,
        exec_id: &str,
        data: Vec<u8>,
    ) -> Result<(), SandboxError> {
        let req = WriteStreamRequest {
            container_id: container_id.into(),
            exec_id: exec_id.into(),
            data,
            ..Default::default()
        };
        self.agent
            .agent
            .write_stdin(ctx(STDIN_TIMEOUT), &req)
            .await
            .map_err(agent_err("WriteStdin"))?;
        Ok(())
    }

    /// Closes a process's stdin.
    pub async fn close_stdin(&self, container_id: &str, exec_id: &str) -> Result<(), SandboxError> {
        let req = CloseStdinRequest {
            container_id: container_id.into(),
            exec_id: exec_id.into(),
            ..Default::default()
        };
        self.agent
            .agent
            .close_stdin(ctx(CALL_TIMEOUT), &req)
            .await
            .map_err(agent_err("CloseStdin"))?;
        Ok(())
    }

    /// Removes a container (killing it if it runs) and its shared files.
    pub async fn remove_container(&self, container_id: &str) -> Result<(), SandboxError> {
        let req = RemoveContainerRequest {
            container_id: container_id.into(),
            timeout: 10,
            ..Default::default()
        };
        let r = self
            .agent
            .agent
            .remove_container(ctx(CALL_TIMEOUT), &req)
            .await
            .map_err(agent_err("RemoveContainer"));
        self.unshare(container_id);
        // The guest has unmounted the container's volumes: unplug those nobody uses.
        self.release_volumes(container_id).await;
        r.map(|_| ())
    }
}
