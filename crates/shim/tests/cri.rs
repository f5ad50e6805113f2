//! Kubernetes pods through containerd's CRI plugin, with this test as the kubelet (a CRI client
//! over containerd's socket, runtime handler "kata" as a RuntimeClass would select it). Needs
//! root, containerd, QEMU, the CNI plugins and `make install` (make test provides all of them).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::*;
use tonic::transport::Channel;

mod common;
use common::cri::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root, containerd, QEMU and make install (make test runs it)"]
async fn a_pod_runs_its_containers_in_one_vm() {
    let mut c = client().await;
    let logs = logs_dir("pod1");
    remove_stale(&mut c, "kata-pod1").await;
    let cfg = pod_config("kata-pod1", &[], &logs);
    let volumes = tempfile::tempdir().expect("tmp");
    let empty_dir = volumes
        .path()
        .join("pods/uid-kata-pod1/volumes/kubernetes.io~empty-dir/cache");
    std::fs::create_dir_all(&empty_dir).expect("emptyDir");
    let t = Instant::now();
    let pod = run_pod(&mut c, &cfg).await.expect("RunPodSandbox");
    let cache = || Mount {
        container_path: "/cache".into(),
        host_path: empty_dir.display().to_string(),
        ..Default::default()
    };
    let c1 = start_container(
        &mut c,
        &pod,
        &cfg,
        container_config("app", IDLE, vec![cache()]),
    )
    .await;
    let first = t.elapsed();
    let t = Instant::now();
    let c2 = start_container(
        &mut c,
        &pod,
        &cfg,
        container_config("sidecar", IDLE, vec![cache()]),
    )
    .await;
    let second = t.elapsed();
    eprintln!(
        "RunPodSandbox -> first container running: {} ms; second container create+start: {} ms",
        first.as_millis(),
        second.as_millis()
    );

    // An ExecSync of a binary that does not exist fails at once with the exec's own error (as
    // with runc), and the container is unharmed.
    let t = Instant::now();
    let missing = c
        .exec_sync(ExecSyncRequest {
            container_id: c1.clone(),
            cmd: vec!["/no/such/binary".into()],
            timeout: 30,
        })
        .await;
    let took = t.elapsed();
    match missing {
        Err(e) => assert!(e.message().contains("/no/such/binary"), "{}", e.message()),
        Ok(r) => panic!("a missing binary ran: exit {}", r.into_inner().exit_code),
    }
    assert!(took < Duration::from_millis(900), "the error took {took:?}");
    assert_eq!(exec(&mut c, &c1, &["true"]).await.1, 0);

    // One VM and one shim serve the pod.
    assert_eq!(
        common::processes_with(&format!("sandbox-{pod} ")).len(),
        1,
        "one QEMU"
    );
    assert_eq!(
        common::processes_with("containerd-shim-kata-v2")
            .iter()
            .filter(|c| c.contains(&format!("-id {pod} "))
                || c.contains(&format!("-id {c1} "))
                || c.contains(&format!("-id {c2} ")))
            .count(),
        1,
        "one shim"
    );
    // Both run on the guest kernel, share the pod's hostname, IPC and emptyDir.
    let guest = common::guest_kernel_release();
    for id in [&c1, &c2] {
        let (out, code) = exec(&mut c, id, &["uname", "-r"]).await;
        assert_eq!((out.trim(), code), (guest.as_str(), 0));
        let (out, _) = exec(&mut c, id, &["hostname"]).await;
        assert_eq!(out.trim(), "kata-pod1");
    }
    let (ipc1, _) = exec(&mut c, &c1, &["readlink", "/proc/self/ns/ipc"]).await;
    let (ipc2, _) = exec(&mut c, &c2, &["readlink", "/proc/self/ns/ipc"]).await;
    assert_eq!(ipc1, ipc2, "the pod's containers share an IPC namespace");
    let (_, code) = exec(&mut c, &c1, &["sh", "-c", "echo shared > /cache/note"]).await;
    assert_eq!(code, 0);
    let (out, _) = exec(&mut c, &c2, &["cat", "/cache/note"]).await;
    assert_eq!(
        out, "shared\n",
        "emptyDir shared between the pod's containers"
    );
    assert!(
        std::fs::read_dir(&empty_dir)
            .expect("host dir")
            .next()
            .is_none(),
        "the emptyDir lives in guest memory, not on the host"
    );
    let (out, code) = exec(&mut c, &c2, &["sh", "-c", "exit 7"]).await;
    assert_eq!(code, 7, "{out}");

    // Status and stats.
    let st = container_status(&mut c, &c1).await;
    assert_eq!(st.state(), ContainerState::ContainerRunning);
    let ps = pod_status(&mut c, &pod).await;
    assert_eq!(ps.state(), PodSandboxState::SandboxReady);
    let stats = c
        .container_stats(ContainerStatsRequest {
            container_id: c1.clone(),
        })
        .await
        .expect("ContainerStats")
        .into_inner()
        .stats
        .expect("stats");
    let mem = stats
        .memory
        .and_then(|m| m.working_set_bytes)
        .map(|v| v.value);
    assert!(
        mem.unwrap_or(0) > 0,
        "memory working set from the guest: {mem:?}"
    );

    // Stop and remove the containers, then the pod.
    for id in [&c1, &c2] {
        stop_and_remove(&mut c, id).await;
    }
    assert_eq!(
        common::processes_with(&format!("sandbox-{pod} ")).len(),
        1,
        "the VM outlives its containers"
    );
    remove_pod(&mut c, &pod).await;
}

/// Serializes the tests that change the default configuration's drop-ins.
async fn config_lock() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: OnceLock<tokio::sync::Mutex<()>> = OnceLock::new();
    LOCK.get_or_init(|| tokio::sync::Mutex::new(()))
        .lock()
        .await
}

fn write_drop_in(name: &str, text: &str) -> PathBuf {
    let dir = Path::new(DEFAULT_CONFIG_DIR).join("config.d");
    std::fs::create_dir_all(&dir).expect("config.d");
    let p = dir.join(name);
    std::fs::write(&p, text).expect("drop-in");
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root, containerd, QEMU and make install (make test runs it)"]
async fn the_guides_vcpu_annotation_needs_enable_annotations() {
    let mut c = client().await;
    let logs = logs_dir("vcpus");
    let annotations = [("io.katacontainers.config.hypervisor.default_vcpus", "5")];
    let _lock = config_lock().await;
    remove_stale(&mut c, "kata-vcpus").await;
    remove_stale(&mut c, "kata-vcpus-refused").await;
    // Refused with the shipped configuration: a clear CRI error, nothing left.
    let before = common::processes_with("qemu-system").len();
    let err = run_pod(
        &mut c,
        &pod_config("kata-vcpus-refused", &annotations, &logs),
    )
    .await
    .expect_err("refused annotation");
    assert!(
        err.message().contains("enable_annotations") && err.message().contains("default_vcpus"),
        "{}",
        err.message()
    );
    // (Other tests may stop their pods meanwhile: the count must not have grown.)
    let after = common::processes_with("qemu-system").len();
    assert!(
        after <= before,
        "no QEMU left: {before} before, {after} after"
    );

    // Allowed by a drop-in, as the guide does in configuration.toml: nproc = 5 in the guest.
    let drop_in = write_drop_in(
        "90-test-vcpus.toml",
        "[hypervisor.qemu]\nenable_annotations = [\"default_vcpus\"]\n",
    );
    let cfg = pod_config("kata-vcpus", &annotations, &logs);
    let pod = run_pod(&mut c, &cfg).await;
    let _ = std::fs::remove_file(&drop_in);
    let pod = pod.expect("RunPodSandbox with default_vcpus = 5");
    let id = start_container(
        &mut c,
        &pod,
        &cfg,
        container_config("busybox", IDLE, vec![]),
    )
    .await;
    let (out, code) = exec(&mut c, &id, &["nproc"]).await;
    assert_eq!((out.trim(), code), ("5", 0));
    remove_pod(&mut c, &pod).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root, containerd, QEMU and make install (make test runs it)"]
async fn an_unknown_runtime_handler_is_a_clear_error() {
    let mut c = client().await;
    let logs = logs_dir("handler");
    let err = c
        .run_pod_sandbox(RunPodSandboxRequest {
            config: Some(pod_config("kata-nohandler", &[], &logs)),
            runtime_handler: "kata-nope".into(),
        })
        .await
        .expect_err("unknown handler");
    assert!(err.message().contains("kata-nope"), "{}", err.message());
    let listed = c
        .list_pod_sandbox(ListPodSandboxRequest { filter: None })
        .await
        .expect("ListPodSandbox")
        .into_inner()
        .items;
    assert!(
        !listed
            .iter()
            .any(|p| p.metadata.as_ref().map(|m| m.name.as_str()) == Some("kata-nohandler")),
        "no pod left"
    );
}

/// Runs `busybox wget` from containerd's network namespace (where the CNI bridge is): another
/// namespace than the pod's. Returns the body and the time it took.
fn fetch(url: &str) -> Result<(Vec<u8>, Duration), String> {
    fetch_within(url, 20)
}

/// [`fetch`] bounded by `secs` seconds.
fn fetch_within(url: &str, secs: u32) -> Result<(Vec<u8>, Duration), String> {
    fetch_in("kata-containerd", url, secs)
}

fn fetch_when_up(url: &str) -> Vec<u8> {
    fetch_in_when_up("kata-containerd", url)
}

async fn web_pod(
    c: &mut RuntimeServiceClient<Channel>,
    name: &str,
    annotations: &[(&str, &str)],
) -> (String, String) {
    remove_stale(c, name).await;
    let cfg = pod_config(name, annotations, &logs_dir(name));
    let pod = run_pod(c, &cfg).await.expect("RunPodSandbox");
    let script = "mkdir -p /www && head -c 1048576 /dev/zero > /www/blob && echo hello-from-kata > /www/index.html && exec httpd -f -p 8080 -h /www";
    start_container(
        c,
        &pod,
        &cfg,
        container_config("web", &["sh", "-c", script], vec![]),
    )
    .await;
    let ip = pod_status(c, &pod)
        .await
        .network
        .map(|n| n.ip)
        .unwrap_or_default();
    assert!(
        ip.starts_with("198.51.100."),
        "pod IP from the project's CNI config: {ip:?}"
    );
    (pod, ip)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root, containerd, QEMU and make install (make test runs it)"]
async fn a_pod_serves_tcp_on_its_network_and_rate_limits_apply() {
    let mut c = client().await;
    let _lock = config_lock().await;
    let _server = BridgeServer::start();
    let (pod, ip) = web_pod(&mut c, "kata-net", &[]).await;
    let body = fetch_when_up(&format!("http://{ip}:8080/index.html"));
    assert_eq!(String::from_utf8_lossy(&body), "hello-from-kata\n");
    // Dual stack: the pod's IPv6 address (documentation range) reaches the VM too.
    let ip6 = pod_status(&mut c, &pod)
        .await
        .network
        .and_then(|n| n.additional_ips.first().map(|i| i.ip.clone()))
        .unwrap_or_default();
    assert!(ip6.starts_with("2001:db8:5100::"), "pod IPv6: {ip6:?}");
    let body = fetch_when_up(&format!("http://[{ip6}]:8080/index.html"));
    assert_eq!(String::from_utf8_lossy(&body), "hello-from-kata\n");
    // The VM's QEMU runs in the pod's namespace, where the tap and tc filters are.
    let ns = format!("--net=/proc/{}/ns/net", qemu_of(&pod));
    let links = Command::new("nsenter")
        .args([&ns, "ip", "-o", "link"])
        .output()
        .expect("ip");
    assert!(String::from_utf8_lossy(&links.stdout).contains("tap0_kata"));
    let qd = Command::new("nsenter")
        .args([&ns, "tc", "filter", "show", "dev", "eth0", "ingress"])
        .output()
        .expect("tc");
    assert!(
        String::from_utf8_lossy(&qd.stdout).contains("tap0_kata"),
        "mirred redirect to the tap"
    );
    let mut fast = Vec::new();
    for _ in 0..3 {
        let (b, t) = fetch(&format!("http://{ip}:8080/blob")).expect("download");
        assert_eq!(b.len(), 1 << 20);
        fast.push(t);
    }
    fast.sort();
    let probe = start_probe(&mut c, &pod).await;
    // The pod's IPv6 default route is in the guest (/proc/net/ipv6_route: destination ::/0
    // via the bridge's 2001:db8:5100::1).
    let (routes, _) = exec(&mut c, &probe, &["cat", "/proc/net/ipv6_route"]).await;
    assert!(
        routes.lines().any(|l| l.starts_with(
            "00000000000000000000000000000000 00 00000000000000000000000000000000 00 20010db8510000000000000000000001"
        )),
        "{routes}"
    );
    let fast_in = download_into(&mut c, &probe).await;
    remove_pod(&mut c, &pod).await;

    // The same downloads with a pod whose rates are limited to 2 Mbit/s.
    let drop_in = write_drop_in(
        "90-test-net.toml",
        "[hypervisor.qemu]\nenable_annotations = [\"tx_rate_limiter_max_rate\", \"rx_rate_limiter_max_rate\"]\n",
    );
    let (pod, ip) = web_pod(&mut c, "kata-net-limited", &LIMITED_2MBIT).await;
    let _ = std::fs::remove_file(&drop_in);
    fetch_when_up(&format!("http://{ip}:8080/index.html"));
    let (b, slow) = fetch(&format!("http://{ip}:8080/blob")).expect("download");
    assert_eq!(b.len(), 1 << 20);
    eprintln!("1 MiB download: {:?} unlimited (median of 3), {slow:?} at tx_rate_limiter_max_rate = 2 Mbit/s", fast[1]);
    assert_limited(slow, fast[1], "out of the VM");
    let probe = start_probe(&mut c, &pod).await;
    let slow_in = download_into(&mut c, &probe).await;
    eprintln!("1 MiB into the VM: {fast_in:?} unlimited, {slow_in:?} at rx_rate_limiter_max_rate = 2 Mbit/s");
    assert_limited(slow_in, fast_in, "into the VM");
    remove_pod(&mut c, &pod).await;
    let left = taps_anywhere();
    assert!(left.is_empty(), "taps left: {left:?}");
}

fn netns_of(pid: u32) -> String {
    std::fs::read_link(format!("/proc/{pid}/ns/net"))
        .map(|p| p.display().to_string())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root, containerd, QEMU and make install (make test runs it)"]
async fn the_none_model_and_disable_new_netns() {
    let mut c = client().await;
    let _lock = config_lock().await;
    // none: the VM gets a NIC on a tap in the pod's namespace, but nothing joins them.
    let drop_in = write_drop_in(
        "90-test-none.toml",
        "[runtime]\ninternetworking_model = \"none\"\n",
    );
    let (pod, ip) = web_pod(&mut c, "kata-net-none", &[]).await;
    let _ = std::fs::remove_file(&drop_in);
    let ns = format!("--net=/proc/{}/ns/net", qemu_of(&pod));
    let links = Command::new("nsenter")
        .args([&ns, "ip", "-o", "link"])
        .output()
        .expect("ip");
    assert!(String::from_utf8_lossy(&links.stdout).contains("tap0_kata"));
    let f = Command::new("nsenter")
        .args([&ns, "tc", "filter", "show", "dev", "eth0", "ingress"])
        .output()
        .expect("tc");
    assert!(
        !String::from_utf8_lossy(&f.stdout).contains("mirred"),
        "not joined"
    );
    let probe = start_probe(&mut c, &pod).await;
    let (body, code) = exec(&mut c, &probe, &["cat", "/sys/class/net/eth0/address"]).await;
    assert_eq!(code, 0, "the guest has the NIC: {body}");
    assert!(
        fetch(&format!("http://{ip}:8080/index.html")).is_err(),
        "no path to the VM"
    );
    remove_pod(&mut c, &pod).await;

    // disable_new_netns: QEMU stays in the shim's network namespace; the VM has no NIC.
    let drop_in = write_drop_in(
        "90-test-none.toml",
        "[runtime]\ninternetworking_model = \"none\"\ndisable_new_netns = true\n",
    );
    let (pod, _) = web_pod(&mut c, "kata-net-nonetns", &[]).await;
    let _ = std::fs::remove_file(&drop_in);
    let shim = common::processes_with("containerd-shim-kata-v2")
        .iter()
        .any(|cmd| cmd.contains(&format!("-id {pod} ")));
    assert!(shim, "the pod's shim runs");
    assert_eq!(
        netns_of(qemu_of(&pod)),
        netns_of_path("/run/netns/kata-containerd"),
        "QEMU in containerd's (the shim's) network namespace"
    );
    let probe = start_probe(&mut c, &pod).await;
    let (out, _) = exec(&mut c, &probe, &["ls", "/sys/class/net"]).await;
    assert_eq!(
        out.split_whitespace().collect::<Vec<_>>(),
        vec!["lo"],
        "no NIC"
    );
    remove_pod(&mut c, &pod).await;
}

/// The namespace inode of a bind-mounted netns file, in /proc/PID/ns/net's form.
fn netns_of_path(path: &str) -> String {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path)
        .map(|m| format!("net:[{}]", m.ino()))
        .unwrap_or_default()
}

/// A second container to look around the pod with.
async fn start_probe(c: &mut RuntimeServiceClient<Channel>, pod: &str) -> String {
    let name = pod_status(c, pod)
        .await
        .metadata
        .map(|m| m.name)
        .unwrap_or_default();
    let cfg = pod_config(&name, &[], &logs_dir(&name));
    start_container(c, pod, &cfg, container_config("probe", IDLE, vec![])).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root, containerd, QEMU and make install (make test runs it)"]
async fn host_cgroups_follow_sandbox_cgroup_only() {
    let mut c = client().await;
    let _lock = config_lock().await;
    remove_stale(&mut c, "kata-cgroup").await;
    // The kubelet's part: the pod cgroup, limited to the pod's needs plus its overhead.
    let parent = "kubepods-kata-test/pod-uid-kata-cgroup";
    let memory = Path::new("/sys/fs/cgroup/memory").join(parent);
    std::fs::create_dir_all(&memory).expect("pod cgroup");
    std::fs::write(memory.join("memory.limit_in_bytes"), "3221225472").expect("limit");
    let drop_in = write_drop_in(
        "90-test-cgroup.toml",
        "[runtime]\nsandbox_cgroup_only = true\n",
    );
    let mut cfg = pod_config("kata-cgroup", &[], &logs_dir("cgroup"));
    cfg.linux = Some(LinuxPodSandboxConfig {
        cgroup_parent: format!("/{parent}"),
        ..Default::default()
    });
    let pod = run_pod(&mut c, &cfg).await;
    let _ = std::fs::remove_file(&drop_in);
    let pod = pod.expect("RunPodSandbox");
    let id = start_container(
        &mut c,
        &pod,
        &cfg,
        container_config("busybox", IDLE, vec![]),
    )
    .await;
    let (out, code) = exec(&mut c, &id, &["true"]).await;
    assert_eq!(code, 0, "{out}");

    let qemu = qemu_of(&pod);
    let shim = common::pid_with(&format!("-id {pod}")).expect("the pod's shim");
    let virtiofsd = common::virtiofsd_pids(&pod);
    assert_eq!(virtiofsd.len(), 2, "virtiofsd and its sandboxed worker");
    let mut want = vec![shim, qemu];
    want.extend(&virtiofsd);
    want.sort_unstable();
    let sandbox = memory.join(format!("kata_{pod}"));
    let mut procs = common::cgroup_members(&sandbox, "cgroup.procs");
    procs.sort_unstable();
    assert_eq!(
        procs, want,
        "shim, virtiofsd and QEMU in the sandbox cgroup"
    );
    // All of QEMU's threads, vCPUs included, are there in every controller.
    let cpu = Path::new("/sys/fs/cgroup/cpu")
        .join(parent)
        .join(format!("kata_{pod}"));
    let threads = std::fs::read_dir(format!("/proc/{qemu}/task"))
        .expect("QEMU threads")
        .count();
    let tasks = common::cgroup_members(&cpu, "tasks");
    assert!(tasks.len() >= threads, "{tasks:?}");
    assert!(common::sandbox_cgroups(&pod)
        .iter()
        .all(|d| !d.to_string_lossy().contains("kata_overhead")));
    // The runtime sets no limit of its own; the pod cgroup counts the whole VM.
    let quota = std::fs::read_to_string(cpu.join("cpu.cfs_quota_us")).expect("quota");
    assert_eq!(quota.trim(), "-1");
    let usage: u64 = std::fs::read_to_string(memory.join("memory.usage_in_bytes"))
        .expect("usage")
        .trim()
        .parse()
        .expect("number");
    assert!(
        usage > 64 << 20,
        "the pod cgroup is charged for the VM's memory: {usage} bytes"
    );

    remove_pod(&mut c, &pod).await;
    assert!(memory.exists(), "the pod cgroup is the kubelet's: it stays");

    // The shipped layout (sandbox_cgroup_only = false): the vCPU threads' cgroup under the pod
    // cgroup carries the sum of the application containers' CPU limits (the pause container
    // has none and does not count).
    remove_stale(&mut c, "kata-cgroup").await;
    let pod = run_pod(&mut c, &cfg).await.expect("RunPodSandbox");
    let cpu = Path::new("/sys/fs/cgroup/cpu")
        .join(parent)
        .join(format!("kata_{pod}"));
    let quota = || {
        std::fs::read_to_string(cpu.join("cpu.cfs_quota_us"))
            .expect("quota")
            .trim()
            .to_string()
    };
    assert_eq!(quota(), "-1", "no container yet");
    for (name, quota_us) in [("half", 50_000), ("quarter", 25_000)] {
        let mut cc = container_config(name, IDLE, vec![]);
        cc.linux = Some(LinuxContainerConfig {
            resources: Some(LinuxContainerResources {
                cpu_period: 100_000,
                cpu_quota: quota_us,
                ..Default::default()
            }),
            ..Default::default()
        });
        start_container(&mut c, &pod, &cfg, cc).await;
    }
    assert_eq!(quota(), "75000", "0.5 + 0.25 CPU");
    let vcpus = common::cgroup_members(&cpu, "tasks");
    assert!(!vcpus.is_empty(), "vCPU threads in the sandbox cgroup");
    let overhead = Path::new("/sys/fs/cgroup/memory/kata_overhead").join(&pod);
    assert!(
        common::cgroup_members(&overhead, "cgroup.procs").contains(&qemu_of(&pod)),
        "QEMU itself in the overhead cgroup"
    );
    remove_pod(&mut c, &pod).await;
    // The pod cgroup is the kubelet's and stays; remove it as the kubelet would.
    for h in ["cpu", "cpuacct", "cpuset", "memory", "pids", "blkio"] {
        let top = Path::new("/sys/fs/cgroup").join(h);
        let _ = std::fs::remove_dir(top.join(parent));
        let _ = std::fs::remove_dir(top.join("kubepods-kata-test"));
    }
}

/// Pod annotations limiting both directions to 2 Mbit/s.
const LIMITED_2MBIT: [(&str, &str); 2] = [
    (
        "io.katacontainers.config.hypervisor.tx_rate_limiter_max_rate",
        "2000000",
    ),
    (
        "io.katacontainers.config.hypervisor.rx_rate_limiter_max_rate",
        "2000000",
    ),
];

/// A 1 MiB transfer at 2 Mbit/s: 8 Mbit take 4 s, less the bucket's first 250 KB burst.
fn assert_limited(slow: Duration, fast: Duration, what: &str) {
    assert!(
        slow >= Duration::from_millis(2500) && slow > fast * 2,
        "{what}: {slow:?} limited vs {fast:?} unlimited"
    );
}

/// Serves a 1 MiB file from containerd's network namespace (the CNI bridge's address) until
/// dropped: traffic into a pod's VM.
struct BridgeServer {
    child: std::process::Child,
    _dir: tempfile::TempDir,
}

impl BridgeServer {
    const URL: &'static str = "http://198.51.100.1:8089/blob";

    fn start() -> BridgeServer {
        let dir = tempfile::tempdir().expect("tmp");
        std::fs::write(dir.path().join("blob"), vec![0u8; 1 << 20]).expect("blob");
        let child = Command::new("nsenter")
            .args([
                "--net=/run/netns/kata-containerd",
                "/bin/busybox",
                "httpd",
                "-f",
            ])
            // Every address of that namespace: the bridge may not exist before the first pod.
            .args(["-p", "8089", "-h"])
            .arg(dir.path())
            .spawn()
            .expect("httpd");
        let mut server = BridgeServer { child, _dir: dir };
        std::thread::sleep(Duration::from_millis(300));
        assert!(
            matches!(server.child.try_wait(), Ok(None)),
            "the bridge-side httpd exited at once"
        );
        server
    }
}

impl Drop for BridgeServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Downloads the bridge server's file from inside container `id`; returns how long it took.
async fn download_into(c: &mut RuntimeServiceClient<Channel>, id: &str) -> Duration {
    let t = Instant::now();
    let (out, code) = exec(
        c,
        id,
        &[
            "sh",
            "-c",
            &format!("wget -q -O - {} | wc -c", BridgeServer::URL),
        ],
    )
    .await;
    assert_eq!((out.trim(), code), ("1048576", 0), "download into the VM");
    t.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root, containerd, QEMU and make install (make test runs it)"]
async fn the_macvtap_model_serves_tcp_and_rate_limits_apply() {
    let mut c = client().await;
    let _lock = config_lock().await;
    let _server = BridgeServer::start();
    let drop_in = write_drop_in(
        "90-test-macvtap.toml",
        "[runtime]\ninternetworking_model = \"macvtap\"\n[hypervisor.qemu]\nenable_annotations = [\"rx_rate_limiter_max_rate\", \"tx_rate_limiter_max_rate\"]\n",
    );
    let (pod, ip) = web_pod(&mut c, "kata-macvtap", &[]).await;
    let body = fetch_when_up(&format!("http://{ip}:8080/index.html"));
    assert_eq!(String::from_utf8_lossy(&body), "hello-from-kata\n");
    let ns = format!("--net=/proc/{}/ns/net", qemu_of(&pod));
    let link = Command::new("nsenter")
        .args([&ns, "ip", "-d", "link", "show", "dev", "tap0_kata"])
        .output()
        .expect("ip");
    let link = String::from_utf8_lossy(&link.stdout).to_string();
    assert!(link.contains("macvtap mode passthru"), "{link}");
    let probe = start_probe(&mut c, &pod).await;
    let (_, t) = fetch(&format!("http://{ip}:8080/blob")).expect("download");
    let fast_out = t;
    let fast_in = download_into(&mut c, &probe).await;
    remove_pod(&mut c, &pod).await;

    let (pod, ip) = web_pod(&mut c, "kata-macvtap-limited", &LIMITED_2MBIT).await;
    let _ = std::fs::remove_file(&drop_in);
    fetch_when_up(&format!("http://{ip}:8080/index.html"));
    let (b, slow_out) = fetch(&format!("http://{ip}:8080/blob")).expect("download");
    assert_eq!(b.len(), 1 << 20);
    let probe = start_probe(&mut c, &pod).await;
    let slow_in = download_into(&mut c, &probe).await;
    eprintln!(
        "macvtap, 1 MiB: out of the VM {fast_out:?} unlimited, {slow_out:?} at 2 Mbit/s; into the VM {fast_in:?} unlimited, {slow_in:?} at 2 Mbit/s"
    );
    assert_limited(slow_out, fast_out, "out of the VM");
    assert_limited(slow_in, fast_in, "into the VM");
    remove_pod(&mut c, &pod).await;
    let left = taps_anywhere();
    assert!(left.is_empty(), "taps left: {left:?}");
}

/// A process the test started, killed when dropped.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A free loopback TCP port.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// GET `url` with curl: (HTTP status, body).
fn curl(url: &str) -> (u16, String) {
    let out = std::process::Command::new("curl")
        .args(["-s", "-m", "10", "-w", "\n%{http_code}", url])
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

fn start_kata_monitor(port: u16) -> Child {
    let child = std::process::Command::new("/opt/kata/bin/kata-monitor")
        .args([
            "--listen-address",
            &format!("127.0.0.1:{port}"),
            "--runtime-endpoint",
            socket(),
            "--log-level",
            "debug",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("kata-monitor");
    let deadline = Instant::now() + Duration::from_secs(10);
    while curl(&format!("http://127.0.0.1:{port}/")).0 != 200 {
        assert!(Instant::now() < deadline, "kata-monitor did not listen");
        std::thread::sleep(Duration::from_millis(100));
    }
    Child(child)
}

/// The series of a Prometheus instant query: (labels, value).
fn prom_query(port: u16, query: &str) -> Vec<(serde_json::Value, f64)> {
    let url = format!(
        "http://127.0.0.1:{port}/api/v1/query?query={}",
        query
            .bytes()
            .map(|b| match b {
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' => (b as char).to_string(),
                _ => format!("%{b:02X}"),
            })
            .collect::<String>()
    );
    let (code, body) = curl(&url);
    assert_eq!(code, 200, "{url}: {body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    v["data"]["result"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .map(|r| {
            let value = r["value"][1]
                .as_str()
                .and_then(|s| s.parse().ok())
                .unwrap_or(f64::NAN);
            (r["metric"].clone(), value)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root, containerd, QEMU, Prometheus and make install (make test runs it)"]
async fn prometheus_scrapes_kata_monitor_with_cri_labels() {
    let mut c = client().await;
    let name = "kata-monitored";
    // Serialized with the tests that count QEMU processes or change drop-ins.
    let _lock = config_lock().await;
    remove_stale(&mut c, name).await;
    let (mon_port, prom_port) = (free_port(), free_port());
    // kata-monitor starts before the pod exists; it must see the pod when it appears.
    let _monitor = start_kata_monitor(mon_port);
    let work = tempfile::tempdir().expect("tmp");
    let cfg = work.path().join("prometheus.yml");
    std::fs::write(
        &cfg,
        format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 900ms\nscrape_configs:\n  - job_name: kata\n    static_configs:\n      - targets: ['127.0.0.1:{mon_port}']\n"
        ),
    )
    .expect("prometheus.yml");
    let _prom = Child(
        std::process::Command::new("prometheus")
            .arg(format!("--config.file={}", cfg.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                work.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("prometheus (Debian package prometheus)"),
    );

    let logs = logs_dir(name);
    let config = pod_config(name, &[], &logs);
    let pod = run_pod(&mut c, &config).await.expect("RunPodSandbox");
    let cid = start_container(&mut c, &pod, &config, container_config("app", IDLE, vec![])).await;
    let (meminfo, code) = exec(&mut c, &cid, &["grep", "MemTotal", "/proc/meminfo"]).await;
    assert_eq!(code, 0);
    let mem_total: f64 = meminfo
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse::<f64>().ok())
        .expect("MemTotal")
        * 1024.0;

    // kata-monitor's own answer: promtool accepts it, every sample carries the pod's labels.
    let (code, text) = curl(&format!("http://127.0.0.1:{mon_port}/metrics"));
    assert_eq!(code, 200);
    let problems = common::promtool_problems(&text);
    assert!(problems.is_empty(), "promtool: {problems:#?}");
    assert!(
        text.contains(&format!(
            "kata_hypervisor_fds{{sandbox_id=\"{pod}\",cri_uid=\"uid-{name}\",cri_name=\"{name}\",cri_namespace=\"default\"}}"
        )),
        "{text}"
    );
    let (_, ids) = curl(&format!("http://127.0.0.1:{mon_port}/sandboxes"));
    assert!(ids.lines().any(|l| l == pod), "{ids}");
    let (code, one) = curl(&format!(
        "http://127.0.0.1:{mon_port}/metrics?sandbox={pod}"
    ));
    assert_eq!(code, 200);
    assert!(
        one.contains("kata_hypervisor_fds ") && !one.contains("sandbox_id"),
        "{one}"
    );
    let (code, url) = curl(&format!(
        "http://127.0.0.1:{mon_port}/agent-url?sandbox={pod}"
    ));
    assert_eq!(
        (code, url.as_str()),
        (200, format!("unix:///run/vc/vm/{pod}/agent.sock").as_str())
    );
    let (_, filtered) = curl(&format!(
        "http://127.0.0.1:{mon_port}/metrics?filter_family=kata_guest_meminfo"
    ));
    assert!(
        filtered.contains("kata_guest_meminfo{") && !filtered.contains("kata_hypervisor_fds"),
        "{filtered}"
    );

    // A second kata-monitor started after the pod exists sees it too.
    let late_port = free_port();
    let late = start_kata_monitor(late_port);
    let (_, late_ids) = curl(&format!("http://127.0.0.1:{late_port}/sandboxes"));
    assert!(late_ids.lines().any(|l| l == pod), "{late_ids}");
    drop(late);

    // Prometheus scraped it: the pod's QEMU has descriptors; the guest's MemTotal is the one the
    // container sees; the series carry the pod's CRI name.
    let q_fds = format!("kata_hypervisor_fds{{sandbox_id=\"{pod}\"}}");
    let q_mem = format!("kata_guest_meminfo{{sandbox_id=\"{pod}\",item=\"mem_total\"}}");
    let deadline = Instant::now() + Duration::from_secs(60);
    let fds = loop {
        let r = prom_query(prom_port, &q_fds);
        if !r.is_empty() {
            break r;
        }
        assert!(Instant::now() < deadline, "Prometheus never had {q_fds}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(fds[0].1 > 0.0, "{fds:?}");
    assert_eq!(fds[0].0["cri_name"], name);
    assert_eq!(fds[0].0["cri_namespace"], "default");
    let mem = prom_query(prom_port, &q_mem);
    assert_eq!(mem.len(), 1, "{mem:?}");
    assert_eq!(mem[0].1, mem_total);

    // The pod goes away: its series go stale at the next scrape.
    remove_pod(&mut c, &pod).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !prom_query(prom_port, &q_fds).is_empty() {
        assert!(
            Instant::now() < deadline,
            "{q_fds} still reported after the pod was removed"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // (Other tests' pods may run at the same time: look for this one only.)
    let (_, after) = curl(&format!("http://127.0.0.1:{mon_port}/sandboxes"));
    assert!(!after.lines().any(|l| l == pod), "{after}");
    let (_, text) = curl(&format!("http://127.0.0.1:{mon_port}/metrics"));
    assert!(
        !text.contains(&pod),
        "the removed pod's samples are still served"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root, containerd, QEMU and make install (make test runs it)"]
async fn pod_sysctls_reach_the_containers() {
    let mut c = client().await;
    let _lock = config_lock().await;
    let name = "kata-sysctl";
    remove_stale(&mut c, name).await;
    let mut cfg = pod_config(name, &[], &logs_dir(name));
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
    let pod = run_pod(&mut c, &cfg).await.expect("RunPodSandbox");
    let id = start_container(
        &mut c,
        &pod,
        &cfg,
        container_config("busybox", IDLE, vec![]),
    )
    .await;
    let (out, code) = exec(
        &mut c,
        &id,
        &[
            "cat",
            "/proc/sys/net/ipv4/ip_unprivileged_port_start",
            "/proc/sys/kernel/shm_rmid_forced",
        ],
    )
    .await;
    assert_eq!((out.as_str(), code), ("1000\n1\n", 0));
    remove_pod(&mut c, &pod).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root, containerd, QEMU and make install (make test runs it)"]
async fn iptables_in_the_guest_filter_the_pods_traffic() {
    let mut c = client().await;
    let _lock = config_lock().await;
    let (pod, ip) = web_pod(&mut c, "kata-iptables", &[]).await;
    let ip6 = pod_status(&mut c, &pod)
        .await
        .network
        .and_then(|n| n.additional_ips.first().map(|i| i.ip.clone()))
        .unwrap_or_default();
    let dir = tempfile::tempdir().expect("tmp");
    for (v6, url) in [
        (false, format!("http://{ip}:8080/index.html")),
        (true, format!("http://[{ip6}]:8080/index.html")),
    ] {
        let tool = if v6 { "ip6tables" } else { "iptables" };
        let flag: &[&str] = if v6 { &["--v6"] } else { &[] };
        fetch_when_up(&url);
        let set = |name: &str, text: &str| {
            let f = dir.path().join(name);
            std::fs::write(&f, text).expect("rules");
            let mut args = vec!["iptables", "set", "--sandbox-id", &pod];
            args.extend(flag);
            let f = f.display().to_string();
            args.push(&f);
            common::kata_runtime(&args)
        };
        let get = || {
            let mut args = vec!["iptables", "get", "--sandbox-id", &pod];
            args.extend(flag);
            let (out, err, code) = common::kata_runtime(&args);
            assert_eq!(code, 0, "{tool} get: {err}");
            out
        };
        let open =
            "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n";
        let (_, err, code) = set("open", open);
        assert_eq!(code, 0, "{tool} set: {err}");
        let saved = get();
        assert!(
            saved.contains("*filter") && !saved.contains("DROP"),
            "{saved}"
        );
        // A rule dropping the server's port: the host-side connection fails.
        let drop = open.replace(
            "COMMIT",
            "-A INPUT -p tcp -m tcp --dport 8080 -j DROP\nCOMMIT",
        );
        let (_, err, code) = set("drop", &drop);
        assert_eq!(code, 0, "{tool} set: {err}");
        assert!(get().contains("-A INPUT -p tcp -m tcp --dport 8080 -j DROP"));
        assert!(
            fetch_within(&url, 5).is_err(),
            "{tool}: the DROP rule stops {url}"
        );
        // A bad file: the restore's error, and the rules stay as they were.
        let (_, err, code) = set("bad", "*filter\n-A INPUT --no-such-option\nCOMMIT\n");
        assert_ne!(code, 0);
        assert!(err.contains(&format!("{tool}-restore")), "{err}");
        assert!(get().contains("--dport 8080 -j DROP"), "unchanged");
        // The saved rules back: the server answers again.
        let (_, err, code) = set("saved", &saved);
        assert_eq!(code, 0, "{tool} set: {err}");
        fetch_when_up(&url);
    }
    // Unknown sandbox: a clear error.
    let (_, err, code) = common::kata_runtime(&["iptables", "get", "--sandbox-id", "no-such-pod"]);
    assert_ne!(code, 0);
    assert!(err.contains("sandbox no-such-pod not found"), "{err}");
    remove_pod(&mut c, &pod).await;
}

/// Whether QEMU `pid` holds `dev` open (a drive still attached).
fn qemu_holds(pid: u32, dev: &str) -> bool {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
        .any(|e| std::fs::read_link(e.path()).is_ok_and(|t| t == Path::new(dev)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root, containerd, QEMU and make install (make test runs it)"]
async fn a_direct_volume_is_shared_by_a_pods_containers_and_unplugged_after_the_last() {
    let _lock = config_lock().await;
    let mut c = client().await;
    let logs = logs_dir("dv");
    remove_stale(&mut c, "kata-dv").await;
    let dir = tempfile::tempdir().expect("tmp");
    let img = common::LoopImage::new(dir.path(), "vol.img", 64, "ext4");
    let vol = dir
        .path()
        .join("kubelet/pods/uid/volumes/kubernetes.io~csi/pv1/mount");
    std::fs::create_dir_all(&vol).expect("mkdir");
    let vol = vol.display().to_string();
    let info = format!(
        r#"{{"volume-type":"block","device":"{}","fstype":"ext4"}}"#,
        img.dev
    );
    let (_, err, code) = common::kata_runtime(&[
        "direct-volume",
        "add",
        "--volume-path",
        &vol,
        "--mount-info",
        &info,
    ]);
    assert_eq!(code, 0, "{err}");
    let cfg = pod_config("kata-dv", &[], &logs);
    let pod = run_pod(&mut c, &cfg).await.expect("RunPodSandbox");
    let qemu = qemu_of(&pod);
    assert!(
        !qemu_holds(qemu, &img.dev),
        "nothing plugged before a container asks"
    );
    let mount = || Mount {
        container_path: "/data".into(),
        host_path: vol.clone(),
        ..Default::default()
    };
    let a = start_container(
        &mut c,
        &pod,
        &cfg,
        container_config("a", &["sleep", "1000"], vec![mount()]),
    )
    .await;
    let b = start_container(
        &mut c,
        &pod,
        &cfg,
        container_config("b", &["sleep", "1000"], vec![mount()]),
    )
    .await;
    assert!(
        qemu_holds(qemu, &img.dev),
        "the volume is a drive of the pod's QEMU"
    );
    let (out, code) = exec(
        &mut c,
        &a,
        &[
            "sh",
            "-c",
            "echo shared > /data/f; sync; mount | grep ' /data '",
        ],
    )
    .await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("on /data type ext4 (rw"), "{out}");
    let (out, code) = exec(&mut c, &b, &["cat", "/data/f"]).await;
    assert_eq!((out.as_str(), code), ("shared\n", 0));
    // stats through the pod's shim.
    let (out, err, code) = common::kata_runtime(&["direct-volume", "stats", "--volume-path", &vol]);
    assert_eq!(code, 0, "{err}");
    let s: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert!(
        s["usage"][0]["total"]
            .as_u64()
            .is_some_and(|t| t > 50 << 20),
        "{s}"
    );

    // The first container goes: the volume stays for the second.
    stop_and_remove(&mut c, &a).await;
    assert!(qemu_holds(qemu, &img.dev));
    let (out, code) = exec(&mut c, &b, &["cat", "/data/f"]).await;
    assert_eq!((out.as_str(), code), ("shared\n", 0));
    // The last one goes: unmounted in the guest, unplugged from QEMU.
    stop_and_remove(&mut c, &b).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while qemu_holds(qemu, &img.dev) {
        assert!(Instant::now() < deadline, "QEMU still holds {}", img.dev);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    remove_pod(&mut c, &pod).await;
    assert_eq!(img.read(dir.path(), "f"), "shared\n");
    let (_, err, code) = common::kata_runtime(&["direct-volume", "remove", "--volume-path", &vol]);
    assert_eq!(code, 0, "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root, containerd, QEMU and make install (make test runs it)"]
async fn a_pod_on_the_initrd_serves_tcp_and_execs_as_on_the_image() {
    // The suite runs on the shipped root, the rootfs image; this pod boots the initrd instead.
    let mut c = client().await;
    let _lock = config_lock().await;
    let _server = BridgeServer::start();
    let drop_in = write_drop_in(
        "90-test-initrd.toml",
        "[hypervisor.qemu]\nimage = \"\"\ninitrd = \"/opt/kata/share/kata-containers/kata-containers-initrd.img\"\n",
    );
    let (pod, ip) = web_pod(&mut c, "kata-initrd", &[]).await;
    let _ = std::fs::remove_file(&drop_in);
    let qemu = qemu_of(&pod);
    let argv = std::fs::read(format!("/proc/{qemu}/cmdline")).expect("QEMU's argv");
    let argv = String::from_utf8_lossy(&argv).replace('\0', " ");
    assert!(
        argv.contains(" -initrd ") && !argv.contains("nvdimm"),
        "{argv}"
    );
    let body = fetch_when_up(&format!("http://{ip}:8080/index.html"));
    assert_eq!(String::from_utf8_lossy(&body), "hello-from-kata\n");
    let probe = start_probe(&mut c, &pod).await;
    let (cmdline, code) = exec(&mut c, &probe, &["cat", "/proc/cmdline"]).await;
    assert_eq!(code, 0);
    assert!(!cmdline.contains("root="), "{cmdline}");
    // Out of the VM, through the pod's network, to the bridge.
    download_into(&mut c, &probe).await;
    // The pod's own network namespace (where its tap is) goes with it. Other tests' pods may
    // run meanwhile, so only this pod's namespace is looked at.
    let named = named_netns_of(qemu);
    remove_pod(&mut c, &pod).await;
    assert_pod_gone(&pod);
    assert!(!named.exists(), "{} left", named.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root, containerd, QEMU and make install (make test runs it)"]
async fn a_templated_pod_serves_tcp_and_execs_as_a_cold_one() {
    // VM templating: the pod's VM is cloned from a template the first sandbox creates, and gets
    // its NIC by hot-plug.
    let mut c = client().await;
    let _lock = config_lock().await;
    let _server = BridgeServer::start();
    let template = "/run/vc/vm/it-cri-template";
    let factory_toml = format!(
        "[hypervisor.qemu]\nimage = \"\"\ninitrd = \"/opt/kata/share/kata-containers/kata-containers-initrd.img\"\nshared_fs = \"virtio-9p\"\nreclaim_guest_freed_memory = false\n[factory]\nenable_template = true\ntemplate_path = \"{template}\"\n"
    );
    let drop_in = write_drop_in("90-test-template.toml", &factory_toml);
    let (out, _, _) = common::kata_runtime(&["factory", "destroy"]);
    assert_eq!(out, "vm factory destroyed\n");
    let started = web_pod(&mut c, "kata-template", &[]).await;
    let (status, _, _) = common::kata_runtime(&["factory", "status"]);
    let _ = std::fs::remove_file(&drop_in);
    let (pod, ip) = started;
    assert_eq!(
        status, "vm factory is on\n",
        "the first sandbox created the template"
    );
    let qemu = qemu_of(&pod);
    let argv = std::fs::read(format!("/proc/{qemu}/cmdline")).expect("QEMU's argv");
    let argv = String::from_utf8_lossy(&argv).replace('\0', " ");
    assert!(
        argv.contains("-incoming defer")
            && argv.contains(&format!("mem-path={template}/memory,share=off"))
            && !argv.contains("virtio-net-pci"),
        "a clone, with no NIC on its command line: {argv}"
    );
    let body = fetch_when_up(&format!("http://{ip}:8080/index.html"));
    assert_eq!(String::from_utf8_lossy(&body), "hello-from-kata\n");
    let probe = start_probe(&mut c, &pod).await;
    assert_guest_clock_is_the_hosts(&mut c, &probe).await;
    download_into(&mut c, &probe).await;
    remove_pod(&mut c, &pod).await;
    assert_pod_gone(&pod);
    // The template outlives its clones until it is destroyed.
    assert!(Path::new(template).join("memory").exists());
    let drop_in = write_drop_in("90-test-template.toml", &factory_toml);
    let (out, err, code) = common::kata_runtime(&["factory", "destroy"]);
    let _ = std::fs::remove_file(&drop_in);
    assert_eq!((out.as_str(), code), ("vm factory destroyed\n", 0), "{err}");
    assert!(!Path::new(template).exists(), "the template is gone");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root, containerd, QEMU and make install (make test runs it)"]
async fn a_pod_on_a_cached_vm_serves_tcp_and_execs_as_a_cold_one() {
    // VMCache: the pod's VM was booted by the server before the pod existed, outside the pod's
    // network namespace; it gets its NIC as a tap descriptor over QMP.
    let mut c = client().await;
    let _lock = config_lock().await;
    let _server = BridgeServer::start();
    let endpoint = "/run/vc/it-cri-vmcache.sock";
    let drop_in = write_drop_in(
        "90-test-vmcache.toml",
        &format!("[factory]\nvm_cache_number = 1\nvm_cache_endpoint = \"{endpoint}\"\n"),
    );
    let (out, _, _) = common::kata_runtime(&["factory", "destroy"]);
    assert_eq!(out, "vm factory destroyed\n");
    let log = std::env::temp_dir().join("it-cri-vmcache.log");
    let mut server = common::start_cache_server(None, &log);
    let ready = common::cached_vms(None, 1, &log);
    let started = web_pod(&mut c, "kata-vmcache", &[]).await;
    let _ = std::fs::remove_file(&drop_in);
    let (pod, ip) = started;
    let qemu = qemu_of(&pod);
    assert_eq!(ready, [qemu], "the pod's QEMU is the cached one");
    let argv = std::fs::read(format!("/proc/{qemu}/cmdline")).expect("QEMU's argv");
    let argv = String::from_utf8_lossy(&argv).replace('\0', " ");
    assert!(
        argv.contains("-name sandbox-vmcache-") && !argv.contains("virtio-net-pci"),
        "a cached VM, with no NIC on its command line: {argv}"
    );
    let netns = std::fs::read_link(format!("/proc/{qemu}/ns/net")).expect("QEMU's netns");
    let host = std::fs::read_link("/proc/self/ns/net").expect("our netns");
    assert_eq!(netns, host, "the cached QEMU stays in the host namespace");
    let body = fetch_when_up(&format!("http://{ip}:8080/index.html"));
    assert_eq!(String::from_utf8_lossy(&body), "hello-from-kata\n");
    let probe = start_probe(&mut c, &pod).await;
    assert_guest_clock_is_the_hosts(&mut c, &probe).await;
    download_into(&mut c, &probe).await;
    remove_pod(&mut c, &pod).await;
    assert_pod_gone(&pod);
    let drop_in = write_drop_in(
        "90-test-vmcache.toml",
        &format!("[factory]\nvm_cache_number = 1\nvm_cache_endpoint = \"{endpoint}\"\n"),
    );
    let (out, err, code) = common::kata_runtime(&["factory", "destroy"]);
    let _ = std::fs::remove_file(&drop_in);
    assert_eq!((out.as_str(), code), ("vm factory destroyed\n", 0), "{err}");
    let status = server.wait().expect("the server exits");
    assert!(status.success(), "{status}");
    assert_eq!(common::cached_vm_leftovers(), Vec::<String>::new());
}

/// The guest's clock (seen from container `probe`) is within 5 s of the host's: set for a VM
/// that did not boot for its pod (a clone, a cached VM).
async fn assert_guest_clock_is_the_hosts(c: &mut RuntimeServiceClient<Channel>, probe: &str) {
    let (date, code) = exec(c, probe, &["date", "+%s"]).await;
    assert_eq!(code, 0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64;
    let guest: i64 = date.trim().parse().expect("date");
    assert!((guest - now).abs() <= 5, "guest clock {guest}, host {now}");
}

/// Host PSS of a process in KiB (smaps_rollup).
fn pss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// QEMU's PSS once the guest has handed back what it freed (KiB): free page reporting returns
/// freed guest pages to the host in batches, about 2 s after they are freed, so a single sample
/// taken right after a removal may still hold them. The least of samples over 6 s.
async fn settled_pss_kib(pid: u32) -> u64 {
    let mut least = pss_kib(pid);
    for _ in 0..12 {
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        least = least.min(pss_kib(pid));
    }
    least
}

/// Host PSS of a process by mapping (KiB): a file's path, or `[anon N MiB]` by the mapping's
/// size for anonymous memory (the guest's RAM is one large anonymous or memfd mapping, QEMU's
/// heap and TCG cache are others).
fn pss_by_mapping(pid: u32) -> std::collections::BTreeMap<String, u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let mut out = std::collections::BTreeMap::new();
    let mut current = String::new();
    for line in text.lines() {
        let mut f = line.split_whitespace();
        let first = f.next().unwrap_or("");
        if first.contains('-') && first.chars().next().is_some_and(|c| c.is_ascii_hexdigit()) {
            let (a, b) = first.split_once('-').unwrap_or(("0", "0"));
            let size =
                u64::from_str_radix(b, 16).unwrap_or(0) - u64::from_str_radix(a, 16).unwrap_or(0);
            let path: Vec<&str> = f.skip(4).collect();
            current = if path.is_empty() {
                format!("[anon {} MiB]", size >> 20)
            } else {
                path.join(" ")
            };
        } else if first == "Pss:" {
            let kib: u64 = f.next().and_then(|v| v.parse().ok()).unwrap_or(0);
            *out.entry(current.clone()).or_insert(0) += kib;
        }
    }
    out
}

/// The mappings whose PSS grew the most between two [`pss_by_mapping`] samples.
fn growth(
    before: &std::collections::BTreeMap<String, u64>,
    after: &std::collections::BTreeMap<String, u64>,
) -> String {
    let mut d: Vec<(i64, &String)> = after
        .iter()
        .map(|(k, v)| (*v as i64 - *before.get(k).unwrap_or(&0) as i64, k))
        .filter(|(d, _)| *d != 0)
        .collect();
    d.sort_by_key(|(d, _)| std::cmp::Reverse(*d));
    d.iter()
        .take(6)
        .map(|(d, k)| format!("{k}: {d:+} KiB"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A pod's container with a memory limit and a CPU limit is created and removed `cycles` times;
/// each time the VM grows by the limits and comes back to its boot size (vCPUs and MemTotal in
/// the guest), and QEMU's host PSS does not creep. Returns QEMU's PSS after the first and the
/// last removal (KiB).
async fn resources_come_back(pod_name: &str, cycles: u32) -> (u64, u64, String) {
    let mut c = client().await;
    remove_stale(&mut c, pod_name).await;
    let cfg = pod_config(pod_name, &[], &logs_dir(pod_name));
    let pod = run_pod(&mut c, &cfg).await.expect("RunPodSandbox");
    let probe = start_probe(&mut c, &pod).await;
    let guest = |c: &mut RuntimeServiceClient<Channel>| {
        let probe = probe.clone();
        let mut c = c.clone();
        async move {
            let (out, code) = exec(
                &mut c,
                &probe,
                &["sh", "-c", "nproc; grep MemTotal /proc/meminfo"],
            )
            .await;
            assert_eq!(code, 0, "{out}");
            let mut lines = out.lines();
            let cpus: u32 = lines
                .next()
                .and_then(|l| l.trim().parse().ok())
                .expect("nproc");
            let mem: u64 = lines
                .next()
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
                .expect("MemTotal");
            (cpus, mem)
        }
    };
    let base = guest(&mut c).await;
    let qemu = qemu_of(&pod);
    // Under TCG, QEMU 7.2 cannot plug a vCPU again after an unplug, so the runtime keeps it
    // (for the next container) instead of unplugging it; under KVM it goes back.
    let argv = std::fs::read(format!("/proc/{qemu}/cmdline")).expect("QEMU's argv");
    let tcg = String::from_utf8_lossy(&argv).contains("\0tcg");
    let cpus_after = base.0 + u32::from(tcg);
    let mut first_pss = 0;
    let mut first_maps = Default::default();
    for i in 0..cycles {
        let mut cc = container_config(&format!("limited-{i}"), IDLE, vec![]);
        cc.linux = Some(LinuxContainerConfig {
            resources: Some(LinuxContainerResources {
                cpu_period: 100_000,
                cpu_quota: 100_000,
                memory_limit_in_bytes: 256 << 20,
                ..Default::default()
            }),
            ..Default::default()
        });
        let id = start_container(&mut c, &pod, &cfg, cc).await;
        // The container uses memory (a 30 MB shell variable), so pages were really handed out
        // and must really come back.
        let (out, code) = exec(
            &mut c,
            &id,
            &[
                "sh",
                "-c",
                "x=$(head -c 30000000 /dev/zero | tr '\\0' a); echo ${#x}",
            ],
        )
        .await;
        assert_eq!((out.trim(), code), ("30000000", 0), "cycle {i}");
        let (cpus, mem) = guest(&mut c).await;
        assert_eq!(cpus, base.0 + 1, "cycle {i}: one more vCPU");
        assert!(
            mem >= base.1 + 250 * 1024,
            "cycle {i}: {} -> {mem} KiB",
            base.1
        );
        stop_and_remove(&mut c, &id).await;
        assert_eq!(
            guest(&mut c).await,
            (cpus_after, base.1),
            "cycle {i}: back to the boot size"
        );
        if i == 0 {
            first_pss = settled_pss_kib(qemu).await;
            first_maps = pss_by_mapping(qemu);
        }
    }
    let last_pss = settled_pss_kib(qemu).await;
    let grew = growth(&first_maps, &pss_by_mapping(qemu));
    eprintln!("{pod_name}: QEMU PSS {first_pss} -> {last_pss} KiB; grew most: {grew}");
    remove_pod(&mut c, &pod).await;
    (first_pss, last_pss, grew)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root, containerd, QEMU and make install (make test runs it)"]
async fn a_removed_containers_vcpus_and_memory_go_back() {
    let _lock = config_lock().await;
    let cycles = std::env::var("KATA_TEST_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    // DIMMs (the default), then virtio-mem.
    let dimms = resources_come_back("kata-give-back", cycles).await;
    /// Removes the drop-in however the test ends.
    struct Removed(PathBuf);
    impl Drop for Removed {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
    let drop_in = Removed(write_drop_in(
        "90-test-virtio-mem.toml",
        "[hypervisor.qemu]\nenable_virtio_mem = true\n",
    ));
    let vmem_cycles = cycles.div_ceil(5);
    let vmem = resources_come_back("kata-give-back-vmem", vmem_cycles).await;
    drop(drop_in);
    // `make soak` keeps the figures (BENCHMARKS.md).
    if let Ok(out) = std::env::var("KATA_GIVE_BACK_OUT") {
        let entry = |(first, last, grew): &(u64, u64, String), n: u32| serde_json::json!({ "cycles": n, "first_pss_kib": first, "last_pss_kib": last, "grew_most": grew });
        let json = serde_json::json!({
            "dimms": entry(&dimms, cycles),
            "virtio_mem": entry(&vmem, vmem_cycles),
        });
        std::fs::write(&out, format!("{json:#}\n")).expect("write the give-back figures");
    }
    for (what, (first, last, grew)) in [("DIMMs", &dimms), ("virtio-mem", &vmem)] {
        assert!(
            *last <= first + first / 10,
            "{what}: QEMU's PSS crept from {first} to {last} KiB ({grew})"
        );
    }
}
