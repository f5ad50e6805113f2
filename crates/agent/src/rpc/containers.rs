//! The containers' RPCs: create (storages and volumes first, guest prestart hooks after), start,
//! remove, exec, signal, wait.

use super::*;

impl Agent {
    pub(super) async fn do_create_container(
        &self,
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
            let (ephemeral, shared): (Vec<Storage>, Vec<Storage>) = shared
                .into_iter()
                .partition(|s| s.driver == crate::volumes::EPHEMERAL_DRIVER);
            for e in &ephemeral {
                crate::volumes::mount_ephemeral(&e.mount_point, &e.options).map_err(|e| {
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
        self.created.notify_waiters();
        Ok(CreateContainerResponse {
            pid,
            ..Default::default()
        })
    }

    pub(super) async fn do_start_container(&self, req: StartContainerRequest) -> R<Empty> {
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

    pub(super) async fn do_remove_container(&self, req: RemoveContainerRequest) -> R<Empty> {
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

    pub(super) async fn do_exec_process(&self, req: ExecProcessRequest) -> R<ExecProcessResponse> {
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

    pub(super) async fn do_signal_process(&self, req: SignalProcessRequest) -> R<Empty> {
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

    pub(super) async fn do_wait_process(&self, req: WaitProcessRequest) -> R<WaitProcessResponse> {
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
}
