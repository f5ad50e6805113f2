//! The sandbox's RPCs: CreateSandbox (storages, kernel modules, guest hooks, the pod's namespaces),
//! DestroySandbox, hot-plugged CPUs and memory online, guest details, the clock, OOM events,
//! metrics.

use super::*;

impl Agent {
    pub(super) async fn do_create_sandbox(&self, req: CreateSandboxRequest) -> R<Empty> {
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

    pub(super) async fn do_destroy_sandbox(&self, _req: DestroySandboxRequest) -> R<Empty> {
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

    pub(super) async fn do_online_cpu_mem(
        &self,
        req: OnlineCPUMemRequest,
    ) -> R<OnlineCPUMemResponse> {
        let want = req.nb_cpus;
        let cpu_only = req.cpu_only;
        let deadline = std::time::Instant::now()
            + std::time::Duration::from_secs(if req.wait { 10 } else { 0 });
        if req.exact_cpus {
            blocking(move || set_online_cpus(Path::new(CPU_SYSFS), want)).await?;
        }
        loop {
            if !req.exact_cpus {
                online_all(CPU_SYSFS, "online", "1");
            }
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

    pub(super) async fn do_get_guest_details(
        &self,
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

    pub(super) async fn do_set_guest_date_time(&self, req: SetGuestDateTimeRequest) -> R<Empty> {
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

    pub(super) async fn do_get_oom_event(&self, _req: GetOOMEventRequest) -> R<OOMEvent> {
        // Long poll: the next container whose cgroup counts a new OOM kill. Between looks it
        // sleeps on the cgroups' memory.events (inotify) and on new containers, never a timer.
        let watch = crate::oom::OomWatch::new()
            .map_err(|e| AgentError::Failed(format!("inotify for OOM events: {e}")))?;
        loop {
            // Registered before the look, so a container made during it still wakes the wait.
            let created = self.created.notified();
            tokio::pin!(created);
            created.as_mut().enable();
            let containers: Vec<Arc<Container>> = self
                .containers
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .values()
                .cloned()
                .collect();
            for c in containers {
                watch.add(&c.cgroup);
                let kills = container::oom_kills(&c.cgroup);
                let last = c.oom_reported.fetch_max(kills, Ordering::SeqCst);
                if kills > last {
                    return Ok(OOMEvent {
                        container_id: c.id.clone(),
                        ..Default::default()
                    });
                }
            }
            tokio::select! {
                changed = watch.changed() => changed
                    .map_err(|e| AgentError::Failed(format!("inotify for OOM events: {e}")))?,
                _ = &mut created => {}
            }
        }
    }

    pub(super) async fn do_get_metrics(&self, _req: GetMetricsRequest) -> R<Metrics> {
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

pub(super) fn mount_storages(storages: &[Storage]) -> Result<Vec<PathBuf>, AgentError> {
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

/// Where the kernel lists the CPUs.
const CPU_SYSFS: &str = "/sys/devices/system/cpu";

/// The CPUs online now (`/sys/devices/system/cpu/online`, a list such as `0-2,4`).
fn online_cpus() -> u32 {
    std::fs::read_to_string(Path::new(CPU_SYSFS).join("online"))
        .map(|s| count_cpu_list(&s))
        .unwrap_or_else(|_| {
            std::thread::available_parallelism()
                .map(|n| n.get() as u32)
                .unwrap_or(1)
        })
}

/// How many CPUs a kernel CPU list (`0-2,4`) names.
pub(super) fn count_cpu_list(list: &str) -> u32 {
    list.trim()
        .split(',')
        .filter(|r| !r.is_empty())
        .map(|r| match r.split_once('-') {
            Some((a, b)) => match (a.parse::<u32>(), b.parse::<u32>()) {
                (Ok(a), Ok(b)) if b >= a => b - a + 1,
                _ => 0,
            },
            None => u32::from(r.parse::<u32>().is_ok()),
        })
        .sum()
}

/// Brings exactly `want` CPUs online (at least one): the lowest-numbered offline ones are
/// onlined, the highest-numbered online ones offlined (never cpu0, which has no `online`
/// file). Used when the VM's vCPUs are all present from boot and "hot-plug" is onlining
/// (under TCG, where QEMU cannot hot-plug vCPUs reliably). Returns how many are online.
pub(super) fn set_online_cpus(sysfs: &Path, want: u32) -> Result<u32, AgentError> {
    let mut cpus: Vec<(u32, PathBuf, bool)> = std::fs::read_dir(sysfs)
        .map_err(|e| AgentError::Failed(format!("read {}: {e}", sysfs.display())))?
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let n: u32 = name.strip_prefix("cpu")?.parse().ok()?;
            let file = e.path().join("online");
            let online = std::fs::read_to_string(&file).ok()?.trim() == "1";
            Some((n, file, online))
        })
        .collect();
    cpus.sort_by_key(|c| c.0);
    // cpu0 (no `online` file) is always online.
    let mut online = 1 + cpus.iter().filter(|c| c.2).count() as u32;
    let want = want.max(1);
    let write = |file: &Path, v: &str| {
        std::fs::write(file, v)
            .map_err(|e| AgentError::Failed(format!("write {v} to {}: {e}", file.display())))
    };
    for (_, file, _) in cpus.iter().filter(|c| !c.2) {
        if online >= want {
            break;
        }
        write(file, "1")?;
        online += 1;
    }
    for (_, file, _) in cpus.iter().rev().filter(|c| c.2) {
        if online <= want {
            break;
        }
        write(file, "0")?;
        online -= 1;
    }
    Ok(online)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_are_counted() {
        assert_eq!(count_cpu_list("0\n"), 1);
        assert_eq!(count_cpu_list("0-3"), 4);
        assert_eq!(count_cpu_list("0-2,4,6-7\n"), 6);
        assert_eq!(count_cpu_list(""), 0);
        assert_eq!(count_cpu_list("3-1,x"), 0);
    }

    /// A fake `/sys/devices/system/cpu` with cpu0 (no `online` file) and cpu1..=n.
    fn sysfs(online: &[bool]) -> tempfile::TempDir {
        let d = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(d.path().join("cpu0")).expect("cpu0");
        for (i, on) in online.iter().enumerate() {
            let c = d.path().join(format!("cpu{}", i + 1));
            std::fs::create_dir(&c).expect("cpu dir");
            std::fs::write(c.join("online"), if *on { "1\n" } else { "0\n" }).expect("online");
        }
        std::fs::create_dir(d.path().join("cpufreq")).expect("not a cpu");
        d
    }

    fn states(d: &tempfile::TempDir, n: usize) -> Vec<bool> {
        (1..=n)
            .map(|i| {
                std::fs::read_to_string(d.path().join(format!("cpu{i}/online")))
                    .map(|s| s.trim() == "1")
                    .unwrap_or(false)
            })
            .collect()
    }

    #[test]
    fn exactly_the_wanted_cpus_come_online_lowest_first_and_go_highest_first() {
        let d = sysfs(&[false, false, false]);
        assert_eq!(set_online_cpus(d.path(), 3).ok(), Some(3));
        assert_eq!(states(&d, 3), vec![true, true, false]);
        assert_eq!(set_online_cpus(d.path(), 4).ok(), Some(4));
        assert_eq!(states(&d, 3), vec![true, true, true]);
        assert_eq!(set_online_cpus(d.path(), 2).ok(), Some(2));
        assert_eq!(states(&d, 3), vec![true, false, false]);
        // cpu0 stays: never fewer than one, never more than there are.
        assert_eq!(set_online_cpus(d.path(), 0).ok(), Some(1));
        assert_eq!(states(&d, 3), vec![false, false, false]);
        assert_eq!(set_online_cpus(d.path(), 9).ok(), Some(4));
    }
}
