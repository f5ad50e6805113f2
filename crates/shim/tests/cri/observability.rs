//! Observability: Prometheus scraping kata-monitor with the pods' CRI labels.

use super::*;

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
