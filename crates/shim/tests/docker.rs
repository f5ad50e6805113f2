//! Docker 28 (Debian sid's, private: scripts/docker.sh) running the runtime with
//! `docker run --runtime io.containerd.kata.v2`, side by side with runc as the oracle: the same
//! commands must give the same observable results. Covers the default bridge network (eth0's
//! address and route, `-p HOST:CONTAINER` from the daemon's side, container to container, kata to
//! runc), `docker exec -it`, `docker logs`, `docker stop` (SIGTERM, then SIGKILL after the
//! timeout), `--memory` (an OOM kill), `--cpus`, `--cgroupns private`, `--rm`, and the
//! daemon.json `runtimes` stanza; after every kata container nothing of its sandbox is left.
//! Needs root, QEMU, `make install` and `make managers` (make test provides them).

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

mod common;

const IMAGE: &str = "kata.local/busybox:latest";
const KATA: &str = "io.containerd.kata.v2";
/// The oracle first, then the runtime under test.
const RUNTIMES: [&str; 2] = ["runc", KATA];

struct Docker {
    bin: PathBuf,
    sock: String,
    netns: String,
}

fn docker_sh(args: &[&str]) -> String {
    let out = Command::new(common::repo().join("scripts/docker.sh"))
        .args(args)
        .output()
        .expect("scripts/docker.sh");
    assert!(
        out.status.success(),
        "docker.sh {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The private daemon, started once, with the test image loaded.
fn docker() -> &'static Docker {
    static D: OnceLock<Docker> = OnceLock::new();
    D.get_or_init(|| {
        let d = Docker {
            sock: docker_sh(&["start"]),
            bin: PathBuf::from(docker_sh(&["bin"])).join("docker"),
            netns: docker_sh(&["netns"]),
        };
        let v = d.ok(&["version", "--format", "{{.Server.Version}}"]);
        assert!(v.starts_with("28."), "Docker 28 asked for, running {v}");
        let tar = std::env::temp_dir().join(format!("kata-test-docker-{}.tar", std::process::id()));
        let st = Command::new(common::repo().join("scripts/busybox-image.sh"))
            .arg(&tar)
            .arg(IMAGE)
            .stdout(Stdio::null())
            .status()
            .expect("busybox-image.sh");
        assert!(st.success());
        d.ok(&["load", "-i", &tar.display().to_string()]);
        let _ = std::fs::remove_file(&tar);
        d
    })
}

impl Docker {
    fn run(&self, args: &[&str]) -> Output {
        Command::new(&self.bin)
            .arg("-H")
            .arg(format!("unix://{}", self.sock))
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("docker")
    }

    /// Runs `docker ARGS`, which must succeed; its stdout, trimmed.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "docker {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    fn inspect(&self, name: &str, format: &str) -> String {
        self.ok(&["inspect", "-f", format, name])
    }

    /// `wget -qO- URL` run in the daemon's network namespace (the "host" of its bridge and
    /// published ports), retried for up to 20 s while the server starts.
    fn fetch(&self, url: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let out = Command::new("ip")
                .args(["netns", "exec", &self.netns, "wget", "-T", "3", "-qO-", url])
                .output()
                .expect("ip netns exec wget");
            if out.status.success() {
                return String::from_utf8_lossy(&out.stdout).trim().to_string();
            }
            assert!(
                Instant::now() < deadline,
                "{url} from {}: {}",
                self.netns,
                String::from_utf8_lossy(&out.stderr)
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Removes container `name`; for a kata one, waits until its sandbox left nothing.
    fn remove(&self, name: &str, runtime: &str) {
        let id = self.inspect(name, "{{.Id}}");
        self.ok(&["rm", "-f", name]);
        if runtime != "runc" {
            common::assert_sandbox_gone(&id, Duration::from_secs(15));
        }
    }
}

fn short(runtime: &str) -> &'static str {
    if runtime == "runc" {
        "runc"
    } else {
        "kata"
    }
}

const WEB: &str =
    "mkdir -p /www && echo hello-from-$0 > /www/index.html && exec httpd -f -p 8080 -h /www";

/// The default bridge: eth0 has its address from the bridge's range and the default route
/// through the bridge; a published port reaches the server from the daemon's side; containers
/// reach each other, kata and runc alike. For kata the task pid Docker is given is QEMU's, whose
/// network namespace is the sandbox's own.
#[test]
#[ignore = "needs root, QEMU, make install and Debian sid's Docker (make test runs it)"]
fn the_bridge_network_as_with_runc() {
    let d = docker();
    let mut ips = Vec::new();
    for (i, rt) in RUNTIMES.iter().enumerate() {
        let name = format!("dk-web-{}", short(rt));
        let _ = d.run(&["rm", "-f", &name]);
        let port = format!("{}:8080", 18081 + i);
        d.ok(&[
            "run",
            "-d",
            "--name",
            &name,
            "--runtime",
            rt,
            "-p",
            &port,
            IMAGE,
            "sh",
            "-c",
            WEB,
            short(rt),
        ]);
        let ip = d.inspect(&name, "{{.NetworkSettings.IPAddress}}");
        assert!(ip.starts_with("203.0.113."), "{rt}: address {ip}");
        // eth0 and the route, as the container sees them.
        let addr = d.ok(&["exec", &name, "ip", "-4", "-o", "addr", "show", "eth0"]);
        assert!(addr.contains(&format!("inet {ip}/24")), "{rt}: {addr}");
        let routes = d.ok(&["exec", &name, "ip", "route"]);
        assert!(routes.contains("default via 203.0.113.1"), "{rt}: {routes}");
        // The published port, from the daemon's side (docker-proxy on loopback, DNAT on the
        // bridge's address).
        let host_port = 18081 + i;
        let want = format!("hello-from-{}", short(rt));
        assert_eq!(
            d.fetch(&format!("http://127.0.0.1:{host_port}/")),
            want,
            "{rt}"
        );
        assert_eq!(
            d.fetch(&format!("http://203.0.113.1:{host_port}/")),
            want,
            "{rt}"
        );
        ips.push((name, ip, *rt));
    }
    // Container to container on the bridge, each runtime to each server. (nc, not busybox's
    // wget, which crashes under runc on this host: a static glibc resolving the address.)
    for client in RUNTIMES {
        for (_, ip, server) in &ips {
            let got = d.ok(&[
                "run",
                "--rm",
                "--runtime",
                client,
                IMAGE,
                "sh",
                "-c",
                &format!("printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 5 {ip} 8080 | tail -1"),
            ]);
            assert_eq!(
                got,
                format!("hello-from-{}", short(server)),
                "{client} → {server}"
            );
        }
    }
    // The pid Docker configured the network of: QEMU, in the sandbox's own namespace.
    let (kata_name, _, _) = &ips[1];
    let id = d.inspect(kata_name, "{{.Id}}");
    let pid = d.inspect(kata_name, "{{.State.Pid}}");
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).expect("comm of the task pid");
    assert!(comm.starts_with("qemu-system"), "task pid {pid} is {comm}");
    let ns = |p: String| std::fs::metadata(&p).map(|m| std::os::linux::fs::MetadataExt::st_ino(&m));
    let owned = format!("/run/netns/kata-net-{id}");
    assert_eq!(
        ns(format!("/proc/{pid}/ns/net")).expect("QEMU's namespace"),
        ns(owned.clone()).expect("the sandbox's namespace"),
        "QEMU is not in {owned}"
    );
    for (name, _, rt) in &ips {
        d.remove(name, rt);
    }
}

/// Output of `script`, which gives `docker exec -it` a terminal; and its exit code.
fn with_tty(d: &Docker, args: &str) -> (String, i32) {
    let cmd = format!("{} -H unix://{} {args}", d.bin.display(), d.sock);
    let out = Command::new("script")
        .args(["-eqc", &cmd, "/dev/null"])
        .stdin(Stdio::null())
        .output()
        .expect("script");
    (
        String::from_utf8_lossy(&out.stdout).replace('\0', ""),
        out.status.code().unwrap_or(-1),
    )
}

/// exec with a terminal, logs, stop (a SIGTERM handled; a SIGTERM ignored, then the SIGKILL
/// after the timeout), and `--rm`: the same for kata as for runc.
#[test]
#[ignore = "needs root, QEMU, make install and Debian sid's Docker (make test runs it)"]
fn exec_logs_stop_and_rm_as_with_runc() {
    let d = docker();
    let mut seen = Vec::new();
    for rt in RUNTIMES {
        let name = format!("dk-life-{}", short(rt));
        let _ = d.run(&["rm", "-f", &name]);
        let script = "echo out-line; echo err-line >&2; \
                      trap 'echo got-term; exit 7' TERM; while :; do sleep 0.1; done";
        d.ok(&[
            "run",
            "-d",
            "--name",
            &name,
            "--runtime",
            rt,
            IMAGE,
            "sh",
            "-c",
            script,
        ]);
        // top: the host's view of the container's processes (for kata, the VM: QEMU).
        let top = d.ok(&["top", &name]);
        let want = if rt == "runc" {
            "sleep 0.1"
        } else {
            "qemu-system"
        };
        assert!(top.contains(want), "{rt}: {top}");
        // exec -it: a terminal, its output, its exit code.
        let (out, code) = with_tty(
            d,
            &format!("exec -it {name} sh -c 'tty; echo $((6*7)); exit 3'"),
        );
        assert_eq!(code, 3, "{rt}: {out}");
        assert!(out.contains("/dev/pts/"), "{rt}: {out}");
        assert!(
            out.contains("42\r\n"),
            "{rt}: a terminal turns \\n into \\r\\n: {out:?}"
        );
        // A plain exec without a terminal.
        let out = d.run(&["exec", &name, "sh", "-c", "tty; exit 4"]);
        assert_eq!(out.status.code(), Some(4), "{rt}");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "not a tty",
            "{rt}"
        );
        // logs keep stdout and stderr apart.
        let logs = d.run(&["logs", &name]);
        assert_eq!(
            String::from_utf8_lossy(&logs.stdout).trim(),
            "out-line",
            "{rt}"
        );
        assert_eq!(
            String::from_utf8_lossy(&logs.stderr).trim(),
            "err-line",
            "{rt}"
        );
        // stop: the process handles SIGTERM.
        let t = Instant::now();
        d.ok(&["stop", "-t", "10", &name]);
        let took = t.elapsed();
        assert!(took < Duration::from_secs(8), "{rt}: stop took {took:?}");
        assert_eq!(d.inspect(&name, "{{.State.ExitCode}}"), "7", "{rt}");
        let logs = d.ok(&["logs", &name]);
        assert!(logs.contains("got-term"), "{rt}: {logs}");
        d.remove(&name, rt);
        // stop: SIGTERM ignored (pid 1 without a handler), SIGKILL after the timeout.
        d.ok(&[
            "run",
            "-d",
            "--name",
            &name,
            "--runtime",
            rt,
            IMAGE,
            "sh",
            "-c",
            "trap '' TERM; while :; do sleep 0.1; done",
        ]);
        let t = Instant::now();
        d.ok(&["stop", "-t", "2", &name]);
        let took = t.elapsed();
        assert!(
            took >= Duration::from_secs(2) && took < Duration::from_secs(10),
            "{rt}: stop -t 2 took {took:?}"
        );
        assert_eq!(d.inspect(&name, "{{.State.ExitCode}}"), "137", "{rt}");
        d.remove(&name, rt);
        // --rm: the exit code comes back and the container is gone.
        let rm_name = format!("dk-rm-{}", short(rt));
        let out = d.run(&[
            "run",
            "--rm",
            "--name",
            &rm_name,
            "--runtime",
            rt,
            IMAGE,
            "sh",
            "-c",
            "echo bye; exit 5",
        ]);
        assert_eq!(out.status.code(), Some(5), "{rt}");
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "bye", "{rt}");
        let listed = d.ok(&["ps", "-a", "--filter", &format!("name={rm_name}"), "-q"]);
        assert!(listed.is_empty(), "{rt}: --rm left {listed}");
        seen.push(rt);
    }
    assert_eq!(seen, RUNTIMES);
}

/// `--memory`: a process over the limit is OOM-killed, and Docker says so; `--cpus` and
/// `--cgroupns private`: the container sees its own cgroup at /sys/fs/cgroup with its CPU quota
/// (runc on this cgroup v1 host shows v1 files, the guest is cgroup v2: the quota read is the
/// same). The daemon.json `runtimes` stanza's name (`kata`) runs the runtime too.
#[test]
#[ignore = "needs root, QEMU, make install and Debian sid's Docker (make test runs it)"]
fn memory_and_cpu_limits_as_with_runc() {
    let d = docker();
    for rt in [RUNTIMES[0], RUNTIMES[1], "kata"] {
        let name = format!("dk-oom-{rt}");
        let _ = d.run(&["rm", "-f", &name]);
        let out = d.run(&[
            "run",
            "--name",
            &name,
            "--runtime",
            rt,
            "--memory",
            "64m",
            "--memory-swap",
            "64m",
            IMAGE,
            "sh",
            "-c",
            "echo start; head -c 300m /dev/zero | tail > /dev/null; echo after $?",
        ]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(0), "{rt}: {stdout}");
        assert_eq!(stdout.trim(), "start\nafter 137", "{rt}");
        assert_eq!(d.inspect(&name, "{{.State.OOMKilled}}"), "true", "{rt}");
        let runtime = d.inspect(&name, "{{.HostConfig.Runtime}}");
        assert_eq!(runtime, rt);
        d.remove(&name, rt);

        let out = d.ok(&[
            "run", "--rm", "--runtime", rt, "--cgroupns", "private", "--cpus", "1.5", "--memory",
            "256m", IMAGE, "sh", "-c",
            "tail -1 /proc/self/cgroup; \
             cat /sys/fs/cgroup/cpu.max 2>/dev/null || cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us; \
             cat /sys/fs/cgroup/memory.max 2>/dev/null || cat /sys/fs/cgroup/memory/memory.limit_in_bytes",
        ]);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 3, "{rt}: {out}");
        assert_eq!(lines[0], "0::/", "{rt}: its own cgroup namespace: {out}");
        assert_eq!(
            lines[1].split_whitespace().next(),
            Some("150000"),
            "{rt}: CPU quota: {out}"
        );
        assert_eq!(lines[2], "268435456", "{rt}: memory limit: {out}");
    }
}
