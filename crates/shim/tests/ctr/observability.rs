//! What an operator sees: the monitor socket's metrics (promtool), the debug console.

use super::*;

/// The value of the first sample of `family` (with `labels`, e.g. `{item="mem_total"}`).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[test]
#[ignore = "needs root, containerd, QEMU and make install (make test runs it)"]
fn the_monitor_socket_serves_metrics_that_promtool_accepts() {
    use std::os::unix::fs::PermissionsExt;
    let id = "monitor-kata";
    force_remove(id);
    run_detached(KATA, id, &[], &["sleep", "1000"]);
    let sock = std::path::PathBuf::from(format!("/run/vc/sbs/{id}/shim-monitor.sock"));
    let mode =
        |p: &std::path::Path| std::fs::metadata(p).expect("exists").permissions().mode() & 0o777;
    assert_eq!(mode(&sock), 0o600, "socket mode");
    assert_eq!(mode(sock.parent().expect("dir")), 0o700, "directory mode");

    // kata-runtime metrics prints the shim's /metrics; promtool accepts it.
    let (text, err, code) = common::kata_runtime(&["metrics", id]);
    assert_eq!(code, 0, "{err}");
    let problems = common::promtool_problems(&text);
    assert!(problems.is_empty(), "promtool: {problems:#?}\n{text}");
    assert!(
        sample(&text, "kata_hypervisor_fds").is_some_and(|v| v > 0.0),
        "{text}"
    );
    assert!(sample(&text, "kata_hypervisor_threads").is_some_and(|v| v > 1.0));
    assert!(sample(&text, "kata_virtiofsd_threads").is_some_and(|v| v > 0.0));
    assert!(sample(&text, "kata_shim_fds").is_some_and(|v| v > 0.0));
    assert!(sample(&text, "kata_hypervisor_proc_status{item=\"vmrss\"}").is_some_and(|v| v > 1e6));
    assert!(sample(&text, "kata_hypervisor_io_stat{item=\"rchar\"}").is_some());
    assert!(
        sample(
            &text,
            "kata_shim_rpc_durations_histogram_milliseconds_count{action=\"create\"}"
        ) == Some(1.0)
    );
    assert!(sample(&text, "kata_agent_scrape_count").is_some_and(|v| v >= 1.0));
    assert!(sample(&text, "kata_agent_total_rss").is_some_and(|v| v > 0.0));
    assert!(sample(&text, "kata_guest_load{item=\"load1\"}").is_some());
    assert!(sample(&text, "kata_guest_cpu_time{cpu=\"total\",item=\"user\"}").is_some());
    assert!(
        sample(&text, "kata_shim_pod_overhead_memory_in_bytes").is_some(),
        "{text}"
    );
    // The guest's MemTotal, as the container sees it in /proc/meminfo.
    let out = ctr(&[
        "task",
        "exec",
        "--exec-id",
        "m",
        id,
        "grep",
        "MemTotal",
        "/proc/meminfo",
    ]);
    let kib: f64 = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .expect("MemTotal");
    assert_eq!(
        sample(&text, "kata_guest_meminfo{item=\"mem_total\"}"),
        Some(kib * 1024.0)
    );
    // A second scrape has the CPU overhead (it needs two samples).
    let (text2, _, _) = common::kata_runtime(&["metrics", id]);
    assert!(
        sample(&text2, "kata_shim_pod_overhead_cpu").is_some_and(|v| v >= 0.0),
        "{text2}"
    );
    assert!(sample(&text2, "kata_agent_scrape_count") > sample(&text, "kata_agent_scrape_count"));

    // Routes: agent URL, unknown path, wrong method.
    let (status, url) = common::http_unix(&sock, "GET", "/agent-url");
    assert_eq!(status, 200);
    assert!(
        url == format!("unix:///run/vc/vm/{id}/agent.sock") || url.starts_with("vsock://"),
        "{url}"
    );
    assert_eq!(common::http_unix(&sock, "GET", "/no-such-route").0, 404);
    assert_eq!(common::http_unix(&sock, "POST", "/metrics").0, 405);

    // QEMU killed: the shim still answers, with what it can and the error counted.
    let qemu = common::processes_with(&format!("-name sandbox-{id} "));
    assert_eq!(qemu.len(), 1, "{qemu:?}");
    let pid: Vec<u32> = std::fs::read_dir("/proc")
        .expect("proc")
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|p| p.parse().ok()))
        .filter(|p: &u32| {
            std::fs::read(format!("/proc/{p}/cmdline"))
                .map(|c| {
                    String::from_utf8_lossy(&c)
                        .replace('\0', " ")
                        .contains(&format!("-name sandbox-{id} "))
                })
                .unwrap_or(false)
        })
        .collect();
    // The shipped configuration runs QEMU under its own seccomp filter (-sandbox on,...).
    let status = std::fs::read_to_string(format!("/proc/{}/status", pid[0])).expect("status");
    assert!(
        status.contains("Seccomp:\t2"),
        "QEMU has no seccomp filter:\n{status}"
    );
    assert!(
        qemu[0].contains("-sandbox on,obsolete=deny,spawn=deny"),
        "{}",
        qemu[0]
    );
    // SAFETY: SIGKILL of the sandbox's QEMU, which the test started.
    unsafe { libc::kill(pid[0] as i32, libc::SIGKILL) };
    std::thread::sleep(Duration::from_millis(300));
    // The task is not deleted yet, so its shim (and the socket) are still there.
    assert!(sock.exists(), "the shim went away with its VM");
    let t = Instant::now();
    let (status, body) = common::http_unix(&sock, "GET", "/metrics");
    assert_eq!(status, 200, "{body}");
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "scrape took {:?}",
        t.elapsed()
    );
    assert!(sample(&body, "kata_shim_threads").is_some(), "{body}");
    assert!(sample(&body, "kata_hypervisor_threads").is_none(), "{body}");
    assert!(common::promtool_problems(&body).is_empty(), "{body}");
    // The task exited with its VM: remove it and its container.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ctr(&["task", "rm", "-f", id]).status.success() {
        assert!(Instant::now() < deadline, "task {id} could not be removed");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(ctr(&["container", "rm", id]).status.success());
    assert_no_leftovers(id);

    // An unknown sandbox: a clear error naming the socket, non-zero exit.
    let (_, err, code) = common::kata_runtime(&["metrics", "no-such-sandbox"]);
    assert_ne!(code, 0);
    assert!(
        err.contains("/run/vc/sbs/no-such-sandbox/shim-monitor.sock"),
        "{err}"
    );
}

#[test]
#[ignore = "needs root, containerd, QEMU and make install"]
fn debug_console_serves_a_shell_in_the_guest() {
    let _ = socket();
    let dir = tempfile::tempdir().expect("tmp");
    let shipped =
        std::fs::read_to_string("/opt/kata/share/defaults/kata-containers/configuration-qemu.toml")
            .expect("shipped configuration");
    assert!(shipped.contains("\ndebug_console_enabled = false\n"));
    let cfg = dir.path().join("configuration-console.toml");
    std::fs::write(
        &cfg,
        shipped.replace(
            "\ndebug_console_enabled = false\n",
            "\ndebug_console_enabled = true\n",
        ),
    )
    .expect("config");
    let (id, plain) = ("debug-console", "no-debug-console");
    force_remove(id);
    force_remove(plain);
    let cfg = cfg.display().to_string();
    run_detached(
        KATA,
        id,
        &["--runtime-config-path", &cfg],
        &["sleep", "1000"],
    );
    run_detached(KATA, plain, &[], &["sleep", "1000"]);

    // Without the option there is no console, and the error says which option.
    let (_, err, code) = common::kata_runtime(&["exec", plain]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("debug_console_enabled = true"), "{err}");
    assert!(!std::path::Path::new("/run/vc/vm/no-debug-console/debug-console.sock").exists());
    let (_, err, code) = common::kata_runtime(&["exec", "no-such-sandbox"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("sandbox no-such-sandbox not found"), "{err}");

    // In a real terminal: the guest's kernel and PID 1, the terminal's size, the exit status,
    // and the host terminal as it was.
    let t = Tmux::start("kata-debug-console");
    t.wait_for("host$", 1);
    t.send(&format!("cd {}", dir.path().display()));
    t.send("stty -g > before.stty; /opt/kata/bin/kata-runtime exec debug-console; echo EXIT=$?");
    t.wait_for("[kata-guest /]#", 1);
    t.send("uname -r");
    let release = common::guest_kernel_release();
    t.wait_for(&release, 1);
    t.send("cat /proc/1/cmdline; echo; stty size; grep -c kata-agent /proc/1/exe");
    let s = t.wait_for("[kata-guest /]#", 3);
    let after: Vec<&str> = s
        .split("grep -c kata-agent /proc/1/exe")
        .nth(1)
        .expect("the command echoed")
        .lines()
        .skip(1)
        .take(3)
        .collect();
    // The kernel runs /init from an initrd, /sbin/init (a link to /init) from the image.
    let init = match shipped_root() {
        Root::Initrd => "/init",
        _ => "/sbin/init",
    };
    assert_eq!(after[0], init, "{s}");
    assert_eq!(after[1], "30 100", "{s}");
    assert!(after[2].parse::<u32>().is_ok_and(|n| n > 0), "{s}");
    t.send("exit 3");
    t.wait_for("EXIT=3", 1);
    t.send("stty -g > after.stty; cmp before.stty after.stty && echo TERMINAL-RESTORED");
    t.wait_for("TERMINAL-RESTORED", 1);

    // The host side vanishing hangs the shell up (SIGHUP: 129), and the console serves the
    // next session.
    // The first session's prompts are still on the screen: wait for one more.
    let prompts = t.screen().matches("[kata-guest /]#").count();
    t.send("/opt/kata/bin/kata-runtime exec debug-console; echo EXIT=$?");
    t.wait_for("[kata-guest /]#", prompts + 1);
    let exec = common::pid_with("kata-runtime exec debug-console").expect("exec running");
    // SAFETY: kill(2) on the pid just found.
    unsafe { libc::kill(exec as i32, libc::SIGKILL) };
    let log = "/run/vc/vm/debug-console/console.log";
    let deadline = Instant::now() + Duration::from_secs(20);
    while !std::fs::read_to_string(log)
        .unwrap_or_default()
        .contains("ended with status 129")
    {
        assert!(Instant::now() < deadline, "the shell was not hung up");
        std::thread::sleep(Duration::from_millis(200));
    }
    let (out, err, code) =
        common::kata_runtime_with_input(&["exec", id], b"echo piped-$((6*7)); exit 7\n");
    assert_eq!(code, 7, "{out}{err}");
    assert!(out.contains("piped-42"), "{out}");
    drop(t);
    kill_and_remove(id);
    kill_and_remove(plain);
    assert_no_leftovers(id);
    assert_no_leftovers(plain);
}
