//! The runtime under each container manager users run (scripts/managers.sh): containerd 1.6
//! (Debian 12's), 1.7 (Debian trixie's) and 2.1 (Debian sid's, with a version 3 configuration),
//! each private (own socket, root, state and network namespace, scripts/containerd.sh). For each:
//! the guide's `ctr run ... free -h` and `--memory-limit` commands with that version's ctr, and
//! a representative CRI pod through that containerd's CRI plugin (IP, two containers, exec, the
//! pod reached from the host side of its network, stop/remove, a QEMU SIGKILL), with nothing left
//! behind. Needs root, QEMU and `make install` (make test provides them).

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::*;
use tonic::transport::Channel;

mod common;
use common::cri::*;

/// One private containerd of the matrix.
struct Containerd {
    version: &'static str,
    sock: String,
    netns: String,
    ctr: PathBuf,
}

fn containerd_sh(args: &[&str]) -> String {
    common::containerd(args)
}

impl Containerd {
    fn start(version: &'static str) -> Containerd {
        let sock = containerd_sh(&["start", version]);
        let netns = containerd_sh(&["netns", version]);
        let ctr = PathBuf::from(containerd_sh(&["bin", version])).join("ctr");
        let c = Containerd {
            version,
            sock,
            netns,
            ctr,
        };
        // The manager really is the version asked for.
        let v = c.ctr(&["version"]);
        let text = String::from_utf8_lossy(&v.stdout);
        let server = text.split("Server:").nth(1).unwrap_or_default();
        assert!(
            server.contains(&format!("Version:  {version}."))
                || server.contains(&format!("Version:  v{version}.")),
            "containerd {version} asked for, running: {text}"
        );
        for ns in ["default", "k8s.io"] {
            common::import_image_with(&c.ctr, &c.sock, ns, IMAGE, None);
        }
        let pause =
            r#"["/bin/sh","-c","trap 'exit 0' TERM INT; while :; do sleep 3600 & wait $!; done"]"#;
        common::import_image_with(&c.ctr, &c.sock, "k8s.io", PAUSE, Some(pause));
        c
    }

    fn ctr(&self, args: &[&str]) -> Output {
        Command::new(&self.ctr)
            .arg("-a")
            .arg(&self.sock)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("ctr runs")
    }

    /// An id unique to this manager, so the matrix can run side by side.
    fn id(&self, what: &str) -> String {
        format!("mgr{}-{what}", self.version.replace('.', ""))
    }

    /// Stops a manager of its own (1.6 is the one every other test binary shares: it stays).
    fn stop(self) {
        if self.version != "1.6" {
            containerd_sh(&["stop", self.version]);
            assert!(
                !std::path::Path::new(&format!("/run/netns/{}", self.netns)).exists(),
                "containerd {}'s network namespace left",
                self.version
            );
        }
    }
}

fn mem_total_mib(free_h_and_meminfo: &str) -> u64 {
    free_h_and_meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0)
        / 1024
}

/// The guide's two commands, with this manager's ctr.
fn the_guides_commands(m: &Containerd) {
    let script = "free -h; grep MemTotal /proc/meminfo";
    let mut sizes = Vec::new();
    for (what, extra) in [
        ("plain", &[][..]),
        ("grown", &["--memory-limit", "536870912"][..]),
    ] {
        let id = m.id(what);
        let mut args = vec!["run", "--runtime", "io.containerd.kata.v2", "--rm"];
        args.extend(extra);
        args.extend([IMAGE, &id, "sh", "-c", script]);
        let t = Instant::now();
        let out = m.ctr(&args);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "containerd {}: ctr run {what}: {}{text}",
            m.version,
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(text.contains("Mem:"), "free -h printed: {text}");
        eprintln!(
            "containerd {}: ctr run --rm ({what}) {} ms",
            m.version,
            t.elapsed().as_millis()
        );
        sizes.push(mem_total_mib(&text));
        common::assert_sandbox_gone(&id, Duration::from_secs(10));
    }
    assert!(
        sizes[0] > 0 && sizes[1] >= sizes[0] + 500,
        "containerd {}: --memory-limit 512 MiB grows the VM: {} -> {} MiB",
        m.version,
        sizes[0],
        sizes[1]
    );
}

/// Waits until container `id` has exited; its exit code.
async fn exited(c: &mut RuntimeServiceClient<Channel>, id: &str, within: Duration) -> i32 {
    let deadline = Instant::now() + within;
    loop {
        let st = container_status(c, id).await;
        if st.state() == ContainerState::ContainerExited {
            return st.exit_code;
        }
        assert!(
            Instant::now() < deadline,
            "container {id} still {:?} after {within:?}",
            st.state()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A representative pod through this manager's CRI plugin with runtime handler `handler`, then
/// a pod whose QEMU is killed. Returns the time RunPodSandbox took (ms).
async fn a_pod(m: &Containerd, handler: &str) -> u128 {
    let mut c = client_at(&m.sock).await;
    let name = m.id(&format!("{handler}-pod"));
    remove_stale(&mut c, &name).await;
    let cfg = pod_config(&name, &[], &logs_dir(&name));
    let t = Instant::now();
    let pod = run_pod_with(&mut c, &cfg, handler)
        .await
        .expect("RunPodSandbox");
    let run_pod_ms = t.elapsed().as_millis();
    let script =
        "mkdir -p /www && echo hello-from-kata > /www/index.html && exec httpd -f -p 8080 -h /www";
    let web = start_container(
        &mut c,
        &pod,
        &cfg,
        container_config("web", &["sh", "-c", script], vec![]),
    )
    .await;
    let side = start_container(
        &mut c,
        &pod,
        &cfg,
        container_config("sidecar", IDLE, vec![]),
    )
    .await;
    eprintln!(
        "containerd {} ({handler}): RunPodSandbox {run_pod_ms} ms; pod with two containers running in {} ms",
        m.version,
        t.elapsed().as_millis()
    );
    let ip = pod_status(&mut c, &pod)
        .await
        .network
        .map(|n| n.ip)
        .unwrap_or_default();
    assert!(ip.starts_with("198.51.100."), "pod IP: {ip:?}");
    // One VM for the pod; the containers share its network (the sidecar reaches the web server
    // on the pod's loopback) and run on the guest kernel.
    assert_eq!(
        common::processes_with(&format!("sandbox-{pod} ")).len(),
        1,
        "one QEMU"
    );
    let guest = common::guest_kernel_release();
    let (out, code) = exec(&mut c, &side, &["uname", "-r"]).await;
    assert_eq!((out.trim(), code), (guest.as_str(), 0));
    let mut seen = String::new();
    for _ in 0..50 {
        let (out, _) = exec(
            &mut c,
            &side,
            &["wget", "-q", "-O", "-", "http://127.0.0.1:8080/index.html"],
        )
        .await;
        seen = out;
        if seen == "hello-from-kata\n" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        seen, "hello-from-kata\n",
        "sidecar -> web on the pod's loopback"
    );
    let body = fetch_in_when_up(&m.netns, &format!("http://{ip}:8080/index.html"));
    assert_eq!(String::from_utf8_lossy(&body), "hello-from-kata\n");
    let (out, code) = exec(&mut c, &web, &["sh", "-c", "echo out; exit 5"]).await;
    assert_eq!((out.as_str(), code), ("out\n", 5));
    let netns = named_netns_of(qemu_of(&pod));
    for id in [&web, &side] {
        stop_and_remove(&mut c, id).await;
    }
    remove_pod(&mut c, &pod).await;
    assert!(!netns.exists(), "{} left", netns.display());

    // A pod whose QEMU is SIGKILLed: its container is reported exited, the kubelet's stop and
    // remove succeed, and nothing is left.
    let name = m.id(&format!("{handler}-killed"));
    remove_stale(&mut c, &name).await;
    let cfg = pod_config(&name, &[], &logs_dir(&name));
    let pod = run_pod_with(&mut c, &cfg, handler)
        .await
        .expect("RunPodSandbox");
    let app = start_container(&mut c, &pod, &cfg, container_config("app", IDLE, vec![])).await;
    assert_eq!(exec(&mut c, &app, &["true"]).await.1, 0);
    let qemu = qemu_of(&pod);
    let netns = named_netns_of(qemu);
    let st = Command::new("kill")
        .args(["-KILL", &qemu.to_string()])
        .status()
        .expect("kill");
    assert!(st.success());
    let code = exited(&mut c, &app, Duration::from_secs(30)).await;
    assert_ne!(
        code, 0,
        "a container whose VM died exited with an error code"
    );
    let ps = pod_status(&mut c, &pod).await;
    assert_eq!(ps.state(), PodSandboxState::SandboxNotready);
    let t = Instant::now();
    remove_pod(&mut c, &pod).await;
    eprintln!(
        "containerd {}: pod with a killed QEMU removed in {} ms",
        m.version,
        t.elapsed().as_millis()
    );
    // The pod's namespace, where its tap was, went with it (other tests' pods may run meanwhile,
    // so only this pod's is looked at).
    assert!(!netns.exists(), "{} left", netns.display());
    common::assert_sandbox_gone(&pod, Duration::from_secs(10));
    run_pod_ms
}

async fn matrix_entry(version: &'static str) {
    let m = Containerd::start(version);
    the_guides_commands(&m);
    let without = a_pod(&m, "kata").await;
    if version == "2.1" {
        let with = a_pod(&m, SANDBOX_API).await;
        eprintln!(
            "containerd 2.1: RunPodSandbox {without} ms with a pause container, {with} ms through the sandbox API"
        );
        a_pod_without_a_pause_container(&m).await;
    }
    m.stop();
}

/// containerd 2.x's handler for the runtime through the sandbox API (`sandboxer = "shim"`,
/// scripts/containerd.sh).
const SANDBOX_API: &str = "kata-sandbox-api";

/// The 64-hex-digit ids (sandboxes, containers) a message names.
fn hex_ids(text: &str) -> Vec<String> {
    text.split(|ch: char| !ch.is_ascii_hexdigit())
        .filter(|w| w.len() == 64)
        .map(str::to_string)
        .collect()
}

fn with_pid(name: &str, mode: NamespaceMode) -> ContainerConfig {
    let mut cfg = container_config(name, IDLE, vec![]);
    cfg.linux = Some(LinuxContainerConfig {
        security_context: Some(LinuxContainerSecurityContext {
            namespace_options: Some(NamespaceOption {
                pid: mode as i32,
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    });
    cfg
}

/// Through the sandbox API containerd runs no pause container: the pod is the shim's, and the
/// pod's containers share the IPC and UTS namespaces (with the pod's hostname) the agent holds,
/// each with a PID namespace of its own, as with a pause container.
async fn a_pod_without_a_pause_container(m: &Containerd) {
    let mut c = client_at(&m.sock).await;
    let mut pods = Vec::new();
    for handler in ["kata", SANDBOX_API] {
        let name = m.id(&format!("{handler}-ns"));
        remove_stale(&mut c, &name).await;
        let mut cfg = pod_config(&name, &[], &logs_dir(&name));
        // The pod's sysctls: set in the pause container's namespaces, or in those the agent
        // holds for the pod.
        cfg.linux = Some(LinuxPodSandboxConfig {
            sysctls: [
                ("net.ipv4.ip_unprivileged_port_start", "1000"),
                ("kernel.shm_rmid_forced", "1"),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
            ..Default::default()
        });
        let pod = run_pod_with(&mut c, &cfg, handler)
            .await
            .expect("RunPodSandbox");
        // The kubelet's default: a PID namespace per container.
        let a = start_container(&mut c, &pod, &cfg, with_pid("a", NamespaceMode::Container)).await;
        let b = start_container(&mut c, &pod, &cfg, with_pid("b", NamespaceMode::Container)).await;
        let probe = "hostname; for n in ipc uts pid; do readlink /proc/self/ns/$n; done; \
                     tr '\\0' ' ' < /proc/1/cmdline";
        let (out_a, code_a) = exec(&mut c, &a, &["sh", "-c", probe]).await;
        let (out_b, code_b) = exec(&mut c, &b, &["sh", "-c", probe]).await;
        assert_eq!((code_a, code_b), (0, 0), "{handler}: {out_a}{out_b}");
        let (la, lb): (Vec<&str>, Vec<&str>) = (out_a.lines().collect(), out_b.lines().collect());
        assert_eq!(la.len(), 5, "{handler}: {out_a}");
        assert_eq!(la[0], name, "{handler}: the pod's hostname");
        assert_eq!(lb[0], name, "{handler}: the pod's hostname");
        assert_eq!(la[1], lb[1], "{handler}: one IPC namespace for the pod");
        assert_eq!(la[2], lb[2], "{handler}: one UTS namespace for the pod");
        assert_ne!(la[3], lb[3], "{handler}: a PID namespace per container");
        assert!(
            la[4].starts_with("tail -f"),
            "{handler}: PID 1 is the container's own: {}",
            la[4]
        );
        let sysctls =
            "/proc/sys/net/ipv4/ip_unprivileged_port_start /proc/sys/kernel/shm_rmid_forced";
        for id in [&a, &b] {
            let (out, code) = exec(&mut c, id, &["sh", "-c", &format!("cat {sysctls}")]).await;
            assert_eq!(
                (out.as_str(), code),
                ("1000\n1\n", 0),
                "{handler}: the pod's sysctls"
            );
        }
        // shareProcessNamespace: the pod's PID namespace, whose PID 1 is the pod's (the pause
        // container's init, or the agent's holder), not the container's.
        let d = start_container(&mut c, &pod, &cfg, with_pid("d", NamespaceMode::Pod)).await;
        let e = start_container(&mut c, &pod, &cfg, with_pid("e", NamespaceMode::Pod)).await;
        let (out_d, _) = exec(&mut c, &d, &["sh", "-c", probe]).await;
        let (out_e, _) = exec(&mut c, &e, &["sh", "-c", probe]).await;
        let (ld, le): (Vec<&str>, Vec<&str>) = (out_d.lines().collect(), out_e.lines().collect());
        assert_eq!(ld.len(), 5, "{handler}: {out_d}");
        assert_eq!(ld[3], le[3], "{handler}: one PID namespace for the pod");
        assert_ne!(
            ld[3], la[3],
            "{handler}: the pod's PID namespace is not a's"
        );
        assert!(
            !ld[4].starts_with("tail -f"),
            "{handler}: PID 1 is the pod's: {}",
            ld[4]
        );
        let (ps, _) = exec(&mut c, &d, &["ps", "-o", "args"]).await;
        assert_eq!(
            ps.lines().filter(|l| l.starts_with("tail -f")).count(),
            2,
            "{handler}: d sees e's process: {ps}"
        );
        // containerd's view: a pause container for the podsandbox handler only.
        let listed =
            String::from_utf8_lossy(&m.ctr(&["-n", "k8s.io", "containers", "ls", "-q"]).stdout)
                .to_string();
        assert_eq!(
            listed.lines().any(|l| l == pod),
            handler == "kata",
            "{handler}: pause container of {pod} in {listed}"
        );
        pods.push((pod, vec![a, b, d, e]));
    }
    // A sysctl outside the pod's namespaces is refused, as runc refuses it, and leaves nothing.
    for handler in ["kata", SANDBOX_API] {
        let name = m.id(&format!("{handler}-badsysctl"));
        remove_stale(&mut c, &name).await;
        let mut cfg = pod_config(&name, &[], &logs_dir(&name));
        cfg.linux = Some(LinuxPodSandboxConfig {
            sysctls: [("kernel.pid_max".to_string(), "65536".to_string())].into(),
            ..Default::default()
        });
        let e = run_pod_with(&mut c, &cfg, handler)
            .await
            .expect_err("a pod with kernel.pid_max");
        assert!(e.message().contains("kernel.pid_max"), "{handler}: {e:?}");
        for id in hex_ids(e.message()) {
            common::assert_sandbox_gone(&id, Duration::from_secs(10));
        }
    }
    for (pod, containers) in pods {
        for id in &containers {
            stop_and_remove(&mut c, id).await;
        }
        remove_pod(&mut c, &pod).await;
        common::assert_sandbox_gone(&pod, Duration::from_secs(10));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root, QEMU and make install (make test runs it)"]
async fn containerd_1_6_runs_the_guide_and_a_pod() {
    matrix_entry("1.6").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root, QEMU, make install and Debian trixie's containerd (make test runs it)"]
async fn containerd_1_7_runs_the_guide_and_a_pod() {
    matrix_entry("1.7").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root, QEMU, make install and Debian sid's containerd (make test runs it)"]
async fn containerd_2_1_runs_the_guide_and_a_pod() {
    matrix_entry("2.1").await;
}

/// A lone container that asks for a network namespace of its own without naming one (what
/// `ctr run` and Docker ask for) gets one made by the sandbox: the task pid containerd is given
/// is QEMU's, QEMU runs in `/run/netns/kata-net-<id>`, and the namespace goes with the sandbox.
/// (Docker then configures that namespace: tests/docker.rs.)
#[test]
#[ignore = "needs root, containerd, QEMU and make install (make test runs it)"]
fn a_sandbox_makes_the_network_namespace_it_is_asked_for_and_reports_qemus_pid() {
    let sock = containerd_sh(&["start"]);
    common::import_image(&sock, "default", IMAGE, None);
    let id = "mgr-own-netns";
    let ctr = |args: &[&str]| {
        Command::new("ctr")
            .args(["-a", &sock])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("ctr")
    };
    let _ = ctr(&["task", "kill", "-s", "9", id]);
    let _ = ctr(&["task", "delete", id]);
    let _ = ctr(&["container", "delete", id]);
    let out = ctr(&[
        "run",
        "-d",
        "--runtime",
        "io.containerd.kata.v2",
        IMAGE,
        id,
        "sleep",
        "600",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ls = String::from_utf8_lossy(&ctr(&["task", "ls"]).stdout).to_string();
    let pid: u32 = ls
        .lines()
        .find(|l| l.starts_with(id))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no pid for {id} in {ls}"));
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    assert!(
        comm.starts_with("qemu-system"),
        "task pid {pid} is {comm:?}"
    );
    let ino = |p: &str| {
        std::fs::metadata(p)
            .map(|m| std::os::linux::fs::MetadataExt::st_ino(&m))
            .unwrap_or_else(|e| panic!("{p}: {e}"))
    };
    let owned = format!("/run/netns/kata-net-{id}");
    assert_eq!(ino(&format!("/proc/{pid}/ns/net")), ino(&owned));
    assert_ne!(ino(&owned), ino("/proc/self/ns/net"));
    let out = ctr(&["task", "kill", "-s", "9", id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while !String::from_utf8_lossy(&ctr(&["task", "ls"]).stdout)
        .lines()
        .any(|l| l.starts_with(id) && l.contains("STOPPED"))
    {
        assert!(Instant::now() < deadline, "{id} did not stop");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(ctr(&["task", "delete", id]).status.success());
    assert!(ctr(&["container", "delete", id]).status.success());
    common::assert_sandbox_gone(id, Duration::from_secs(10));
    assert!(!std::path::Path::new(&owned).exists(), "{owned} left");
}
