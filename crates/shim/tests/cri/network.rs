//! The pod's network: TCP on the pod's address, rate limits, the none and macvtap models, the
//! guest's iptables.

use super::*;

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
