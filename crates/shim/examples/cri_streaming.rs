//! What a kubelet's users feel of a pod through containerd's CRI plugin, for one runtime
//! handler: ExecSync latency, port-forward throughput (over the streaming server's websocket, as
//! `kubectl port-forward` through a kubelet), and how long a ConfigMap update takes to reach
//! the running container. scripts/bench.py runs it for `runc` and `kata`.
//!
//! ```text
//! cri_streaming SOCKET NETNS HANDLER ITERATIONS
//! ```
//!
//! NETNS is the network namespace containerd runs in (`scripts/containerd.sh netns`), where its
//! streaming server listens. Prints one JSON object: `{"exec_ms": [...], "port_forward_mib_s":
//! [...], "configmap_ms": [...]}`. The ConfigMap latency is from the host's rename of `..data`
//! to the container's log line showing the new value (the container polls its file every
//! 10 ms; the log line's time is containerd's). `kata.local/busybox:latest` must be in the
//! `k8s.io` namespace.

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::cri::*;
use common::ws;
use k8s_cri::v1::*;

const BLOB_MIB: usize = 32;

fn usage() -> ! {
    eprintln!("usage: cri_streaming SOCKET NETNS HANDLER ITERATIONS");
    std::process::exit(2)
}

fn fail(what: &str) -> ! {
    eprintln!("cri_streaming: {what}");
    std::process::exit(1)
}

/// The kubelet's atomic update of a ConfigMap volume: `key` = `value` in a new directory,
/// `..data` swapped to it; returns the time of the swap.
fn kubelet_write(dir: &Path, n: usize, value: &str) -> SystemTime {
    let old = std::fs::read_link(dir.join("..data")).ok();
    let stamp = format!("..2026_12_05_00_00_00.{n}");
    let ts = dir.join(&stamp);
    let io = |r: std::io::Result<()>, what: &str| {
        if let Err(e) = r {
            fail(&format!("{what}: {e}"))
        }
    };
    io(std::fs::create_dir_all(&ts), "mkdir");
    io(std::fs::write(ts.join("key"), value), "write");
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    io(std::os::unix::fs::symlink(&stamp, &tmp), "symlink");
    let at = SystemTime::now();
    io(std::fs::rename(&tmp, dir.join("..data")), "rename");
    if !dir.join("key").exists() {
        io(
            std::os::unix::fs::symlink("..data/key", dir.join("key")),
            "symlink",
        );
    }
    if let Some(old) = old {
        let _ = std::fs::remove_dir_all(dir.join(old));
    }
    at
}

/// Seconds since the epoch of an RFC 3339 UTC time (`2026-12-05T13:33:00.123456789Z`, as the
/// CRI log writes it).
fn rfc3339(s: &str) -> Option<f64> {
    let (date, time) = s.strip_suffix('Z')?.split_once('T')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>());
    let (y, m, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let mut t = time.split(':');
    let (h, min) = (
        t.next()?.parse::<f64>().ok()?,
        t.next()?.parse::<f64>().ok()?,
    );
    let sec = t.next()?.parse::<f64>().ok()?;
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146097 + doe - 719468;
    Some(days as f64 * 86400.0 + h * 3600.0 + min * 60.0 + sec)
}

/// Waits for the log line `value` and returns its time.
async fn logged_at(log: &Path, value: &str, within: Duration) -> f64 {
    let deadline = Instant::now() + within;
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        // `TIME stdout F value`
        for line in text.lines() {
            let mut f = line.splitn(4, ' ');
            let (time, _, _, msg) = (f.next(), f.next(), f.next(), f.next());
            if msg == Some(value) {
                if let Some(t) = time.and_then(rfc3339) {
                    return t;
                }
            }
        }
        if Instant::now() > deadline {
            fail(&format!(
                "{value} never reached the container's log {}",
                log.display()
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, sock, netns, handler, n] = args.as_slice() else {
        usage()
    };
    let Ok(n) = n.parse::<usize>() else { usage() };
    let mut c = client_at(sock).await;
    let name = format!("bench-stream-{handler}");
    remove_stale(&mut c, &name).await;
    let logs = logs_dir(&name);
    let _ = std::fs::remove_dir_all(&logs);
    let _ = std::fs::create_dir_all(&logs);
    let cfg = pod_config(&name, &[], &logs);
    let pod = match run_pod_with(&mut c, &cfg, handler).await {
        Ok(p) => p,
        Err(e) => fail(&format!("RunPodSandbox with {handler}: {}", e.message())),
    };
    let base = std::env::temp_dir().join(format!("kata-bench-cm-{handler}"));
    let _ = std::fs::remove_dir_all(&base);
    let cm = base.join("pods/u1/volumes/kubernetes.io~configmap/cfg");
    let _ = std::fs::create_dir_all(&cm);
    kubelet_write(&cm, 0, "v0");
    let script = format!(
        "mkdir -p /www && head -c {} /dev/zero > /www/blob && httpd -p 127.0.0.1:8080 -h /www && \
         last=; while :; do v=$(cat /etc/cfg/key); [ \"$v\" != \"$last\" ] && echo \"$v\" && \
         last=$v; usleep 10000; done",
        BLOB_MIB << 20
    );
    let config = container_config(
        "server",
        &["sh", "-c", &script],
        vec![Mount {
            container_path: "/etc/cfg".into(),
            host_path: cm.display().to_string(),
            readonly: true,
            ..Default::default()
        }],
    );
    let id = start_container(&mut c, &pod, &cfg, config).await;
    let log = logs.join("server.log");
    logged_at(&log, "v0", Duration::from_secs(30)).await;

    let mut exec_ms = Vec::new();
    for _ in 0..n {
        let t = Instant::now();
        let (_, code) = exec(&mut c, &id, &["true"]).await;
        exec_ms.push(t.elapsed().as_secs_f64() * 1000.0);
        if code != 0 {
            fail("ExecSync true failed");
        }
    }

    let mut port_forward_mib_s = Vec::new();
    for _ in 0..n {
        let url = match c
            .port_forward(PortForwardRequest {
                pod_sandbox_id: pod.clone(),
                port: vec![8080],
            })
            .await
        {
            Ok(r) => r.into_inner().url,
            Err(e) => fail(&format!("PortForward: {}", e.message())),
        };
        let mut s = ws::connect_in(netns, &format!("{url}?port=8080")).await;
        let t = Instant::now();
        ws::send(&mut s, 0, b"GET /blob HTTP/1.0\r\n\r\n").await;
        let got = ws::drain(&mut s, Duration::from_secs(300)).await;
        let secs = t.elapsed().as_secs_f64();
        let bytes = got.get(&0).map(Vec::len).unwrap_or(0);
        if bytes < BLOB_MIB << 20 {
            fail(&format!(
                "port-forward gave {bytes} bytes of a {BLOB_MIB} MiB body"
            ));
        }
        port_forward_mib_s.push(BLOB_MIB as f64 / secs);
    }

    let mut configmap_ms = Vec::new();
    for i in 1..=n {
        let value = format!("v{i}");
        let at = kubelet_write(&cm, i, &value);
        let seen = logged_at(&log, &value, Duration::from_secs(30)).await;
        let at = at
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        configmap_ms.push((seen - at) * 1000.0);
    }
    remove_pod(&mut c, &pod).await;
    let _ = std::fs::remove_dir_all(&base);
    let round = |v: &[f64]| -> Vec<f64> { v.iter().map(|x| (x * 10.0).round() / 10.0).collect() };
    println!(
        "{{\"exec_ms\": {:?}, \"port_forward_mib_s\": {:?}, \"configmap_ms\": {:?}}}",
        round(&exec_ms),
        round(&port_forward_mib_s),
        round(&configmap_ms)
    );
}

#[cfg(test)]
mod tests {
    #[test]
    fn cri_log_times() {
        assert_eq!(super::rfc3339("1970-01-01T00:00:01.5Z"), Some(1.5));
        assert_eq!(super::rfc3339("2000-03-01T00:00:00Z"), Some(951868800.0));
        assert_eq!(super::rfc3339("nonsense"), None);
    }
}
