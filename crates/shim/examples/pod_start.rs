//! Pod start through a containerd's CRI plugin, as a kubelet drives it: RunPodSandbox, then
//! CreateContainer + StartContainer of one idle container, then StopPodSandbox and
//! RemovePodSandbox. scripts/bench.py runs it for the `kata` handler (a pause container in the
//! VM) and the `kata-sandbox-api` one (containerd 2.x's sandbox API: no pause container).
//!
//! ```text
//! pod_start SOCKET HANDLER ITERATIONS
//! ```
//!
//! Prints one JSON object: `{"run_pod_ms": [...], "pod_ready_ms": [...]}` (the second is from
//! RunPodSandbox's call to the container running). The images (`kata.local/busybox:latest`,
//! `kata.local/pause:3.6`) must be in the `k8s.io` namespace.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::Instant;

use common::cri::*;

fn usage() -> ! {
    eprintln!("usage: pod_start SOCKET HANDLER ITERATIONS");
    std::process::exit(2)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, sock, handler, n] = args.as_slice() else {
        usage()
    };
    let Ok(n) = n.parse::<usize>() else { usage() };
    let mut c = client_at(sock).await;
    let (mut run_pod_ms, mut ready_ms) = (Vec::new(), Vec::new());
    for i in 0..n {
        let name = format!("bench-pod-{handler}-{i}");
        remove_stale(&mut c, &name).await;
        let cfg = pod_config(&name, &[], &logs_dir(&name));
        let t0 = Instant::now();
        let pod = match run_pod_with(&mut c, &cfg, handler).await {
            Ok(pod) => pod,
            Err(e) => {
                eprintln!("RunPodSandbox with handler {handler}: {}", e.message());
                std::process::exit(1)
            }
        };
        run_pod_ms.push(t0.elapsed().as_millis());
        start_container(&mut c, &pod, &cfg, container_config("idle", IDLE, vec![])).await;
        ready_ms.push(t0.elapsed().as_millis());
        remove_pod(&mut c, &pod).await;
    }
    println!("{{\"run_pod_ms\": {run_pod_ms:?}, \"pod_ready_ms\": {ready_ms:?}}}");
}
