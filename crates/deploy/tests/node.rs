//! kata-deploy as the DaemonSet runs it, on a node of each containerd the tests know: 1.6 (its
//! version 2 configuration edited in place), 1.7 (version 2 with `imports`, still edited in
//! place: 1.x replaces a plugin's whole section with an imported file's) and 2.1 (version 3
//! with `imports`: a drop-in).
//!
//! A node is a scratch host root `S` (`/tmp/kata-deploy-node-<v>`): `S/etc/containerd`, `S/opt`
//! and `S/usr-local-bin` are bind-mounted on `/etc/containerd`, `/opt` and `/usr/local/bin` in
//! the mount namespace its containerd runs in (its own network namespace too), so it sees
//! nothing of the `/opt/kata` that `make install` laid. The kata-deploy image
//! (`scripts/deploy-image.sh`, built twice: same bytes) is imported into that containerd, and
//! its installer runs there as a container with the DaemonSet's mounts and capabilities
//! (deploy/kata-deploy.yaml). It asks for containerd's restart as the DaemonSet asks systemd:
//! through a request on the host's `/run` that this test carries out (a containerd started
//! inside the installer's container would die with it).
//!
//! For each node: an install killed by SIGKILL while it copies, containerd still running with
//! the old configuration; the install again, whole; containerd restarted with the `kata` and
//! `kata-qemu` handlers; `ctr run --runtime io.containerd.kata.v2` (and `kata-qemu`) running a
//! VM from the installed payload; a CRI pod with the `kata` handler; `uninstall`, after which
//! the configuration's bytes and the host tree are what they were.
//! Needs root, containerd 1.6/1.7/2.1, QEMU and `make install` (make test provides them).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_cri::v1::{
    ContainerConfig, ContainerMetadata, CreateContainerRequest, ExecSyncRequest, ImageSpec,
    LinuxContainerConfig, LinuxPodSandboxConfig, PodSandboxConfig, PodSandboxMetadata,
    RemovePodSandboxRequest, RunPodSandboxRequest, StartContainerRequest, StopPodSandboxRequest,
};
use kata_deploy::{cri, Manager};

const RELEASE: &str = "0.0.1-test";
const IMAGE: &str = "kata.local/busybox:latest";
const PAUSE: &str = "kata.local/pause:3.6";
/// The capabilities deploy/kata-deploy.yaml gives the installer, and ctr's defaults it drops.
const CAPS: &str = r#"add: ["CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "SYS_CHROOT"]"#;
const CAP_EFF: u64 = 1 << 0 | 1 << 1 | 1 << 3 | 1 << 4 | 1 << 18;
const CAPS_DROPPED: [&str; 9] = [
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn try_run(cmd: &mut Command) -> Result<String, String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn run(cmd: &mut Command) -> String {
    try_run(cmd).unwrap_or_else(|e| panic!("{e}"))
}

fn sha256(p: &Path) -> String {
    run(Command::new("sha256sum").arg(p))
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// Every entry under `dir` (relative), with a file's SHA-256 or a link's target.
fn tree(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            let rel = p.strip_prefix(dir).unwrap_or(&p).display().to_string();
            let Ok(md) = std::fs::symlink_metadata(&p) else {
                continue;
            };
            if md.file_type().is_symlink() {
                let t = std::fs::read_link(&p).unwrap_or_default();
                out.push(format!("{rel} -> {}", t.display()));
            } else if md.is_dir() {
                out.push(format!("{rel}/"));
                todo.push(p);
            } else {
                out.push(format!("{rel} {}", sha256(&p)));
            }
        }
    }
    out.sort();
    out
}

/// containerd's CRI settings for this node, in the configuration's version.
fn config_text(version: &str, dir: &Path, run: &Path) -> String {
    // As scripts/containerd.sh: a confined host cannot lower oom_score_adj.
    let capeff = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .unwrap_or(0);
    let restrict_oom = capeff >> 24 & 1 == 0;
    let (r, d) = (run.display(), dir.display());
    let common = format!(
        "root = \"{d}/root\"\nstate = \"{r}/state\"\n\n[grpc]\n  address = \"{r}/containerd.sock\"\n\n\
         [ttrpc]\n  address = \"{r}/containerd.sock.ttrpc\"\n"
    );
    // 1.7 and 2.1 import a directory of drop-ins (only 2.x merges them key by key).
    let imports = if version == "1.6" {
        ""
    } else {
        "imports = [\"/etc/containerd/conf.d/*.toml\"]\n"
    };
    match version {
        "2.1" => format!(
            "# The node's containerd (a test's), configuration version 3.\nversion = 3\n{imports}{common}\n\
             [plugins.'io.containerd.cri.v1.images'.pinned_images]\n  sandbox = \"{PAUSE}\"\n\n\
             [plugins.'io.containerd.cri.v1.runtime']\n  restrict_oom_score_adj = {restrict_oom}\n\
             [plugins.'io.containerd.cri.v1.runtime'.cni]\n  bin_dirs = [\"/usr/lib/cni\"]\n  \
             conf_dir = \"{d}/etc/cni/net.d\"\n"
        ),
        _ => {
            format!(
                "# The node's containerd (a test's), configuration version 2.\nversion = 2\n{imports}{common}\n\
                 [plugins.\"io.containerd.grpc.v1.cri\"]\n  sandbox_image = \"{PAUSE}\"\n  \
                 restrict_oom_score_adj = {restrict_oom}\n  [plugins.\"io.containerd.grpc.v1.cri\".cni]\n    \
                 bin_dir = \"/usr/lib/cni\"\n    conf_dir = \"{d}/etc/cni/net.d\"\n"
            )
        }
    }
}

/// A node with containerd `version`.
struct Node {
    version: &'static str,
    /// The scratch host root.
    dir: PathBuf,
    /// Its containerd's state, socket, log and the restart requests (the host's /run, as the
    /// installer's container sees it at /host/run).
    run: PathBuf,
    netns: String,
    /// containerd's namespace of the installer's and ctr's containers (runc keeps their state
    /// in /run/containerd/runc/<namespace>, which every containerd shares).
    ns: String,
    bin: PathBuf,
    stop: Arc<AtomicBool>,
    watcher: Option<std::thread::JoinHandle<()>>,
}

impl Node {
    fn new(version: &'static str) -> Node {
        let dir = PathBuf::from(format!("/tmp/kata-deploy-node-{version}"));
        let run_dir = PathBuf::from(format!("/run/kata-deploy-node-{version}"));
        let bin = PathBuf::from(
            try_run(
                Command::new(repo().join("scripts/managers.sh"))
                    .args(["dir", &format!("containerd-{version}")]),
            )
            .unwrap_or_else(|e| panic!("containerd {version}: {e}"))
            .trim(),
        );
        let mut node = Node {
            version,
            dir,
            run: run_dir,
            netns: format!("kata-deploy-{version}"),
            ns: format!("kata-deploy-{version}"),
            bin,
            stop: Arc::new(AtomicBool::new(false)),
            watcher: None,
        };
        node.stop_containerd();
        node.remove_runc_leftovers();
        let _ = std::fs::remove_dir_all(&node.dir);
        let _ = std::fs::remove_dir_all(&node.run);
        for d in [
            "etc/containerd",
            "etc/cni/net.d",
            "opt",
            "usr-local-bin",
            "logs",
        ] {
            std::fs::create_dir_all(node.dir.join(d)).expect("mkdir");
        }
        std::fs::create_dir_all(&node.run).expect("mkdir");
        if version != "1.6" {
            std::fs::create_dir_all(node.dir.join("etc/containerd/conf.d")).expect("mkdir");
        }
        let cni = std::fs::read_to_string(repo().join("config/cni/10-kata.conflist"))
            .expect("conflist")
            .replace("\"name\": \"kata-pods\"", "\"name\": \"kata-deploy-pods\"");
        std::fs::write(node.dir.join("etc/cni/net.d/10-kata.conflist"), cni).expect("cni");
        std::fs::write(
            node.dir.join("etc/containerd/config.toml"),
            config_text(version, &node.dir, &node.run),
        )
        .expect("config");
        let (d, r, b, ns) = (
            node.dir.display(),
            node.run.display(),
            node.bin.display(),
            &node.netns,
        );
        // What `systemctl restart containerd` does on this node: stop it, start it in the node's
        // mount namespace (the scratch root's directories in place) and network namespace.
        std::fs::write(
            node.restart_script(),
            format!(
                "#!/bin/sh\nif [ -f {r}/pid ]; then kill $(cat {r}/pid) 2>/dev/null; \
                 while kill -0 $(cat {r}/pid) 2>/dev/null; do sleep 0.1; done; fi\n\
                 PATH={b}:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin setsid unshare -m --propagation slave \
                 sh -c 'mount --bind {d}/opt /opt && mount --bind {d}/etc/containerd /etc/containerd && \
                 mount --bind {d}/usr-local-bin /usr/local/bin && \
                 exec nsenter --net=/run/netns/{ns} {b}/containerd --config /etc/containerd/config.toml' \
                 >>{r}/containerd.log 2>&1 </dev/null &\necho $! > {r}/pid\n"
            ),
        )
        .expect("restart script");
        run(Command::new("chmod").arg("+x").arg(node.restart_script()));
        // Made anew: a name left by a previous boot is a plain file, no longer a namespace.
        let _ = Command::new("ip").args(["netns", "del", ns]).output();
        run(Command::new("ip").args(["netns", "add", ns]));
        run(Command::new("ip").args(["-n", ns, "link", "set", "lo", "up"]));
        // The restart requests from the installer's container.
        let (stop, script, req) = (node.stop.clone(), node.restart_script(), node.run.clone());
        node.watcher = Some(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if req.join("restart.req").exists() {
                    let rc = Command::new(&script)
                        .status()
                        .map(|s| s.code().unwrap_or(1))
                        .unwrap_or(1);
                    let _ = std::fs::write(req.join("restart.rc"), rc.to_string());
                    let _ = std::fs::remove_file(req.join("restart.req"));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }));
        run(&mut Command::new(node.restart_script()));
        node.wait_up();
        node
    }

    fn restart_script(&self) -> PathBuf {
        self.dir.join("restart.sh")
    }

    fn socket(&self) -> PathBuf {
        self.run.join("containerd.sock")
    }

    fn config(&self) -> PathBuf {
        self.dir.join("etc/containerd/config.toml")
    }

    fn ctr(&self, namespace: &str) -> Command {
        let mut c = Command::new(self.bin.join("ctr"));
        c.arg("-a").arg(self.socket()).args(["-n", namespace]);
        c
    }

    fn wait_up(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match try_run(self.ctr(&self.ns).arg("version")) {
                Ok(_) => return,
                Err(e) if Instant::now() > deadline => panic!(
                    "containerd {} did not come up: {e}\n{}",
                    self.version,
                    std::fs::read_to_string(self.run.join("containerd.log")).unwrap_or_default()
                ),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// Containers an earlier, failed run left in runc's state for this node's namespace.
    fn remove_runc_leftovers(&self) {
        let root = format!("/run/containerd/runc/{}", self.ns);
        let ids =
            try_run(Command::new("runc").args(["--root", &root, "list", "-q"])).unwrap_or_default();
        for id in ids.lines().filter(|l| !l.is_empty()) {
            let _ = Command::new("runc")
                .args(["--root", &root, "delete", "--force", id])
                .output();
        }
    }

    /// Every task and container of this node's namespace, killed and deleted.
    fn remove_containers(&self) {
        let ids = try_run(self.ctr(&self.ns).args(["containers", "ls", "-q"])).unwrap_or_default();
        for id in ids.lines().filter(|l| !l.is_empty()) {
            self.remove_installer(id);
        }
    }

    fn stop_containerd(&self) {
        // Only a containerd is signalled: the number may be another process's after a reboot.
        let pid = std::fs::read_to_string(self.run.join("pid")).unwrap_or_default();
        let comm =
            std::fs::read_to_string(format!("/proc/{}/comm", pid.trim())).unwrap_or_default();
        if !pid.trim().is_empty() && comm.trim() == "containerd" {
            let _ = Command::new("kill").arg(pid.trim()).output();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Path::new(&format!("/proc/{}", pid.trim())).exists() && Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }

    /// The host tree the installer may change (the configuration, /opt, /usr/local/bin).
    fn host_tree(&self) -> Vec<String> {
        ["etc", "opt", "usr-local-bin"]
            .iter()
            .flat_map(|d| {
                tree(&self.dir.join(d))
                    .into_iter()
                    .map(move |l| format!("{d}/{l}"))
            })
            .collect()
    }

    /// The installer's container, as the DaemonSet runs it: the host's root read-only at
    /// /host, writable where it writes, the manifest's capabilities, a read-only root.
    fn start_installer(&self, id: &str, verb: &[&str]) {
        let r = format!("/host{}", self.run.display());
        let restart = format!(
            "r={r}; : > $r/restart.req; while [ -e $r/restart.req ]; do sleep 0.1; done; \
             exit $(cat $r/restart.rc)"
        );
        let _ = std::fs::remove_file(self.run.join(format!("{id}.log")));
        let mut c = self.ctr(&self.ns);
        c.args(["run", "-d", "--read-only"]);
        for cap in CAPS_DROPPED {
            c.args(["--cap-drop", cap]);
        }
        c.args([
            "--mount",
            "type=bind,src=/,dst=/host,options=rbind:ro",
            "--mount",
            "type=bind,src=/opt,dst=/host/opt,options=rbind:rw",
            "--mount",
            "type=bind,src=/etc/containerd,dst=/host/etc/containerd,options=rbind:rw",
            "--mount",
            "type=bind,src=/usr/local/bin,dst=/host/usr/local/bin,options=rbind:rw",
            "--mount",
            "type=bind,src=/run,dst=/host/run,options=rbind:rw",
            "--env",
            &format!("KATA_RELEASE={RELEASE}"),
            "--log-uri",
            &format!("file://{}/{id}.log", self.run.display()),
            &format!("kata.local/kata-deploy:{RELEASE}"),
            id,
            "/usr/bin/kata-deploy",
        ])
        .args(verb)
        .args(["--host-root", "/host"])
        .arg("--socket")
        .arg(self.socket())
        .args(["--restart", &restart]);
        run(&mut c);
    }

    fn installer_log(&self, id: &str) -> String {
        std::fs::read_to_string(self.run.join(format!("{id}.log"))).unwrap_or_default()
    }

    /// The installer's pid and status, as `ctr task ls` shows them (None while containerd
    /// restarts).
    fn installer_task(&self, id: &str) -> Option<(u32, String)> {
        let out = try_run(self.ctr(&self.ns).args(["task", "ls"])).ok()?;
        out.lines().find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.first() == Some(&id)).then(|| {
                (
                    f.get(1).and_then(|p| p.parse().ok()).unwrap_or(0),
                    f.get(2).unwrap_or(&"").to_string(),
                )
            })
        })
    }

    /// Waits until the installer says it is done and stays (Ok: its pid), or stops (Err).
    fn wait_installer(&self, id: &str) -> Result<u32, String> {
        let deadline = Instant::now() + Duration::from_secs(180);
        while Instant::now() < deadline {
            let log = self.installer_log(id);
            let task = self.installer_task(id);
            if log.contains("staying until stopped") {
                if let Some((pid, _)) = task {
                    return Ok(pid);
                }
            }
            if let Some((_, status)) = task {
                if status == "STOPPED" {
                    std::thread::sleep(Duration::from_millis(200));
                    return Err(format!(
                        "the installer stopped:\n{}",
                        self.installer_log(id)
                    ));
                }
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Err(format!(
            "the installer did not finish in 180 s:\n{}",
            self.installer_log(id)
        ))
    }

    fn remove_installer(&self, id: &str) {
        let _ = self
            .ctr(&self.ns)
            .args(["task", "kill", "-s", "SIGKILL", id])
            .output();
        let deadline = Instant::now() + Duration::from_secs(20);
        while try_run(self.ctr(&self.ns).args(["task", "delete", id])).is_err()
            && self.installer_task(id).is_some()
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self
            .ctr(&self.ns)
            .args(["container", "delete", id])
            .output();
    }

    fn handlers(&self) -> Vec<String> {
        cri::runtime_handlers(Manager::Containerd, &self.socket(), Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("containerd {}: {e}", self.version))
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(w) = self.watcher.take() {
            let _ = w.join();
        }
        self.remove_containers();
        self.stop_containerd();
        self.remove_runc_leftovers();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .output();
    }
}

/// The pid of a running `kata-deploy VERB` (the installer's process, seen from the host).
fn installer_pid(verb: &str) -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
        cmd.starts_with(format!("/usr/bin/kata-deploy\0{verb}\0").as_bytes())
            .then_some(pid)
    })
}

/// A pod with the `kata` handler and a container in it; what `uname -r` says there.
async fn cri_pod_uname(node: &Node) -> String {
    let mut c = cri::connect(&node.socket())
        .await
        .unwrap_or_else(|e| panic!("CRI: {e}"));
    let config = PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: "kata-deploy-pod".into(),
            uid: format!("uid-kata-deploy-{}", node.version),
            namespace: "default".into(),
            attempt: 0,
        }),
        hostname: "kata-deploy-pod".into(),
        log_directory: node.dir.join("logs").display().to_string(),
        linux: Some(LinuxPodSandboxConfig::default()),
        ..Default::default()
    };
    let pod = c
        .run_pod_sandbox(RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: "kata".into(),
        })
        .await
        .unwrap_or_else(|e| panic!("RunPodSandbox (kata): {e}"))
        .into_inner()
        .pod_sandbox_id;
    let id = c
        .create_container(CreateContainerRequest {
            pod_sandbox_id: pod.clone(),
            config: Some(ContainerConfig {
                metadata: Some(ContainerMetadata {
                    name: "c".into(),
                    attempt: 0,
                }),
                image: Some(ImageSpec {
                    image: IMAGE.into(),
                    ..Default::default()
                }),
                command: vec!["sleep".into(), "300".into()],
                log_path: "c.log".into(),
                linux: Some(LinuxContainerConfig::default()),
                ..Default::default()
            }),
            sandbox_config: Some(config),
        })
        .await
        .unwrap_or_else(|e| panic!("CreateContainer: {e}"))
        .into_inner()
        .container_id;
    c.start_container(StartContainerRequest {
        container_id: id.clone(),
    })
    .await
    .unwrap_or_else(|e| panic!("StartContainer: {e}"));
    let out = c
        .exec_sync(ExecSyncRequest {
            container_id: id,
            cmd: vec!["uname".into(), "-r".into()],
            timeout: 60,
        })
        .await
        .unwrap_or_else(|e| panic!("ExecSync: {e}"))
        .into_inner();
    c.stop_pod_sandbox(StopPodSandboxRequest {
        pod_sandbox_id: pod.clone(),
    })
    .await
    .unwrap_or_else(|e| panic!("StopPodSandbox: {e}"));
    c.remove_pod_sandbox(RemovePodSandboxRequest {
        pod_sandbox_id: pod,
    })
    .await
    .unwrap_or_else(|e| panic!("RemovePodSandbox: {e}"));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The images: kata-deploy's (built twice: the same bytes), busybox and the pause image.
struct Images {
    deploy: PathBuf,
    busybox: PathBuf,
    pause: PathBuf,
}

fn images(dir: &Path) -> Images {
    std::fs::create_dir_all(dir).expect("mkdir");
    // The installer as `make build` makes it (the image carries the release binary).
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    run(Command::new(cargo).current_dir(repo()).args([
        "build",
        "--release",
        "-p",
        "kata-deploy",
        "--bin",
        "kata-deploy",
    ]));
    let build = |out: &Path| {
        let t = Instant::now();
        let said = run(Command::new(repo().join("scripts/deploy-image.sh"))
            .arg(out)
            .arg(RELEASE));
        eprintln!("{} in {:?}", said.trim(), t.elapsed());
    };
    let (a, b) = (dir.join("kata-deploy-a.tar"), dir.join("kata-deploy-b.tar"));
    build(&a);
    std::thread::sleep(Duration::from_millis(1100));
    build(&b);
    assert_eq!(
        sha256(&a),
        sha256(&b),
        "the same inputs gave two different images"
    );
    let _ = std::fs::remove_file(&b);
    let busybox = dir.join("busybox.tar");
    run(Command::new(repo().join("scripts/busybox-image.sh"))
        .arg(&busybox)
        .arg(IMAGE));
    let pause = dir.join("pause.tar");
    run(Command::new(repo().join("scripts/busybox-image.sh"))
        .arg(&pause)
        .arg(PAUSE)
        .arg(
            r#"["/bin/sh","-c","trap 'exit 0' TERM INT; while :; do sleep 3600 & wait $!; done"]"#,
        ));
    Images {
        deploy: a,
        busybox,
        pause,
    }
}

fn on_node(version: &'static str, images: &Images) {
    let t0 = Instant::now();
    let node = Node::new(version);
    for (ns, tar) in [
        (node.ns.as_str(), &images.deploy),
        (node.ns.as_str(), &images.busybox),
        ("k8s.io", &images.busybox),
        ("k8s.io", &images.pause),
    ] {
        run(node.ctr(ns).args(["images", "import"]).arg(tar));
    }
    let original = std::fs::read(node.config()).expect("config");
    let before = node.host_tree();
    let host_kernel = run(Command::new("uname").arg("-r")).trim().to_string();

    // An install killed by SIGKILL while it copies the payload.
    node.start_installer(
        "kata-deploy-killed",
        &["install", "--stay", "--payload", "/kata-artifacts"],
    );
    let releases = node.dir.join("opt/kata-releases");
    let deadline = Instant::now() + Duration::from_secs(60);
    let copying = loop {
        let partial = std::fs::read_dir(&releases)
            .map(|d| {
                d.flatten()
                    .any(|e| e.file_name().to_string_lossy().ends_with(".partial"))
            })
            .unwrap_or(false);
        if partial {
            // SIGKILL to the installer itself, at once (as when its pod is killed).
            if let Some(pid) = installer_pid("install") {
                let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
                break true;
            }
        }
        if Instant::now() > deadline {
            break false;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    node.remove_installer("kata-deploy-killed");
    assert!(
        copying,
        "containerd {version}: never saw the copy under way:\n{}",
        node.installer_log("kata-deploy-killed")
    );
    run(node.ctr(&node.ns).arg("version"));
    assert!(
        std::fs::read(node.config()).expect("config") == original,
        "containerd {version}: the killed install changed the configuration:\n{}",
        std::fs::read_to_string(node.config()).unwrap_or_default()
    );

    // The install again, whole, as the DaemonSet's container.
    let t = Instant::now();
    node.start_installer(
        "kata-deploy",
        &["install", "--stay", "--payload", "/kata-artifacts"],
    );
    let pid = node
        .wait_installer("kata-deploy")
        .unwrap_or_else(|e| panic!("containerd {version}: {e}"));
    let installed_in = t.elapsed();
    // It ran with exactly the manifest's capabilities.
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let capeff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok());
    assert_eq!(
        capeff,
        Some(CAP_EFF),
        "the installer's capabilities:\n{status}"
    );
    node.remove_installer("kata-deploy");
    let log = node.installer_log("kata-deploy");
    assert!(log.contains(&format!("release {RELEASE}")), "{log}");
    let handlers = node.handlers();
    assert!(
        ["kata", "kata-qemu", "runc"]
            .iter()
            .all(|h| handlers.iter().any(|x| x == h)),
        "containerd {version} runs with handlers {handlers:?}"
    );
    // The configuration: a drop-in for 2.1 (the file imports conf.d, and containerd 2.x merges
    // it key by key), an edit that keeps the file's first lines for 1.6 and 1.7 (1.7 imports
    // conf.d too, but would replace its CRI section with the drop-in's: the pause image and
    // CNI settings above would be lost, which the CRI pod below would show).
    let edited = std::fs::read_to_string(node.config()).expect("config");
    let drop_in = node.dir.join("etc/containerd/conf.d/kata-deploy.toml");
    if version == "2.1" {
        assert!(edited.as_bytes() == original.as_slice(), "{edited}");
        assert!(drop_in.exists(), "no drop-in in conf.d");
    } else {
        assert!(!drop_in.exists(), "a drop-in for containerd {version}");
        assert!(
            edited.starts_with(std::str::from_utf8(&original[..60]).unwrap_or("?")),
            "{edited}"
        );
        assert!(edited.contains("runtime_path = \"/opt/kata/bin/containerd-shim-kata-v2\""));
    }
    let current = std::fs::read_link(node.dir.join("opt/kata")).unwrap_or_default();
    assert!(
        current.ends_with(format!("kata-releases/{RELEASE}")),
        "/opt/kata -> {}",
        current.display()
    );
    assert!(node
        .dir
        .join(format!(
            "opt/kata-releases/{RELEASE}/bin/containerd-shim-kata-v2"
        ))
        .exists());
    assert_eq!(
        std::fs::read_link(node.dir.join("usr-local-bin/containerd-shim-kata-v2")).ok(),
        Some(PathBuf::from("/opt/kata/bin/containerd-shim-kata-v2"))
    );

    // Containers in VMs from the installed payload, by runtime type (the shim found on
    // containerd's PATH, where the installer linked it) and through CRI.
    for (i, runtime) in ["io.containerd.kata.v2", "io.containerd.kata-qemu.v2"]
        .iter()
        .enumerate()
    {
        let out = run(node.ctr(&node.ns).args([
            "run",
            "--rm",
            "--runtime",
            runtime,
            IMAGE,
            &format!("kata-deploy-vm-{i}"),
            "uname",
            "-r",
        ]));
        assert!(
            !out.trim().is_empty() && out.trim() != host_kernel,
            "containerd {version}, {runtime}: the container ran on the host's kernel: {out}"
        );
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio");
    let in_pod = rt.block_on(cri_pod_uname(&node));
    assert!(
        !in_pod.is_empty() && in_pod != host_kernel,
        "containerd {version}: the kata pod ran on the host's kernel: {in_pod:?}"
    );

    // Uninstall, as the cleanup DaemonSet runs it; then again (nothing left to do).
    for round in 0..2 {
        let id = format!("kata-deploy-cleanup-{round}");
        node.start_installer(&id, &["uninstall", "--stay"]);
        node.wait_installer(&id)
            .unwrap_or_else(|e| panic!("containerd {version}, uninstall {round}: {e}"));
        node.remove_installer(&id);
    }
    assert!(
        std::fs::read(node.config()).expect("config") == original,
        "containerd {version}: the configuration's bytes differ after uninstall:\n{}",
        std::fs::read_to_string(node.config()).unwrap_or_default()
    );
    assert_eq!(
        node.host_tree(),
        before,
        "containerd {version}: the host tree differs after uninstall"
    );
    let handlers = node.handlers();
    assert!(
        !handlers.iter().any(|h| h.starts_with("kata")),
        "containerd {version} still has {handlers:?}"
    );
    eprintln!(
        "containerd {version}: install {installed_in:?}, the whole node {:?}",
        t0.elapsed()
    );
}

#[test]
#[ignore = "needs root, containerd 1.6/1.7/2.1, QEMU and make install (make test runs it)"]
fn the_daemonsets_installer_on_containerd_1_6_1_7_and_2_1_nodes() {
    let manifest =
        std::fs::read_to_string(repo().join("deploy/kata-deploy.yaml")).expect("manifest");
    assert!(
        manifest.contains(CAPS),
        "deploy/kata-deploy.yaml's capabilities changed: update CAPS, CAP_EFF and this test"
    );
    let images = images(Path::new("/tmp/kata-deploy-images"));
    for version in ["1.6", "1.7", "2.1"] {
        on_node(version, &images);
    }
}
