//! kata-runtime as a user runs it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_kata-runtime"))
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn shipped() -> PathBuf {
    repo().join("config/configuration-qemu.toml")
}

fn run(cmd: &mut Command) -> (Output, String, String) {
    let out = cmd
        .env_remove("KATA_CONF_FILE")
        .output()
        .expect("run kata-runtime");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    (out, stdout, stderr)
}

#[test]
fn env_json_is_valid_and_complete() {
    let (out, stdout, stderr) = run(bin()
        .args(["--config"])
        .arg(shipped())
        .args(["env", "--json"]));
    assert!(out.status.success(), "{stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout).expect("valid JSON");
    for section in [
        "Kernel",
        "Meta",
        "Image",
        "Initrd",
        "Hypervisor",
        "Runtime",
        "Host",
        "Agent",
    ] {
        assert!(v.get(section).is_some(), "missing {section}");
    }
    assert_eq!(v["Hypervisor"]["Name"], "qemu");
    assert_eq!(v["Hypervisor"]["MachineType"], "q35");
    assert_eq!(v["Runtime"]["Config"]["FoundBy"], "command line");
    assert_eq!(v["Agent"]["DialTimeout"], 30);
    assert_eq!(v["Agent"]["Channel"], "auto");
    let expected = if Path::new("/dev/vhost-vsock").exists() {
        "vsock"
    } else {
        "virtio-serial"
    };
    assert_eq!(v["Agent"]["ChannelInUse"], expected);
    assert!(v["Host"]["CPU"]["CPUs"].as_u64().unwrap_or(0) >= 1);
}

#[test]
fn env_toml_has_the_guide_sections() {
    let (out, stdout, stderr) = run(bin().arg("--config").arg(shipped()).arg("env"));
    assert!(out.status.success(), "{stderr}");
    let v: toml::Table = toml::from_str(&stdout).expect("valid TOML");
    assert_eq!(v["Meta"]["Version"].as_str(), Some("1.0.26"));
    assert!(stdout.contains("[Runtime.Version.Version]"));
}

#[test]
fn env_annotation_shows_what_a_pod_would_get() {
    let dir = tempfile::tempdir().expect("tmp");
    let cfg = dir.path().join("configuration.toml");
    let text = std::fs::read_to_string(shipped()).expect("read").replace(
        "enable_annotations = [\"enable_iommu\"]",
        "enable_annotations = [\"enable_iommu\", \"default_vcpus\"]",
    );
    std::fs::write(&cfg, text).expect("write");
    let (out, stdout, stderr) = run(bin().arg("--config").arg(&cfg).args([
        "env",
        "--json",
        "--annotation",
        "io.katacontainers.config.hypervisor.default_vcpus=2",
    ]));
    assert!(out.status.success(), "{stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout).expect("json");
    assert_eq!(v["Hypervisor"]["DefaultVcpus"], 2);

    let (out, stdout, stderr) = run(bin().arg("--config").arg(&cfg).args([
        "env",
        "--annotation",
        "io.katacontainers.config.hypervisor.default_memory=4096",
    ]));
    assert!(!out.status.success(), "refused annotation must fail");
    assert!(stdout.is_empty());
    assert!(
        stderr.contains("io.katacontainers.config.hypervisor.default_memory=\"4096\" is refused")
            && stderr.contains("enable_annotations"),
        "{stderr}"
    );
    let (out, _, stderr) =
        run(bin()
            .arg("--config")
            .arg(&cfg)
            .args(["env", "--annotation", "novalue"]));
    assert!(!out.status.success());
    assert!(stderr.contains("expected KEY=VALUE"), "{stderr}");
}

#[test]
fn bad_config_is_reported_with_position() {
    let dir = tempfile::tempdir().expect("tmp");
    let cfg = dir.path().join("bad.toml");
    std::fs::write(
        &cfg,
        "[hypervisor.qemu]\ninitrd = \"/i\"\ndefault_vcpu = 2\n",
    )
    .expect("write");
    let (out, _, stderr) = run(bin().arg("--config").arg(&cfg).arg("env"));
    assert!(!out.status.success());
    assert!(stderr.contains("bad.toml:3: unknown key `default_vcpu` in [hypervisor.qemu] (did you mean `default_vcpus`?)"), "{stderr}");
}

#[test]
fn kata_conf_file_is_honoured() {
    let out = bin()
        .args(["env", "--json"])
        .env("KATA_CONF_FILE", shipped())
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(
        v["Runtime"]["Config"]["FoundBy"],
        "environment variable KATA_CONF_FILE"
    );
}

#[test]
fn completion_script_names_the_subcommands() {
    let (out, stdout, _) = run(bin().args(["completion", "bash"]));
    assert!(out.status.success());
    assert!(stdout.contains("kata-runtime") && stdout.contains("check") && stdout.contains("env"));
}

#[test]
fn version_prints_katas_three_lines() {
    let (out, version, _) = run(bin().arg("version"));
    assert!(out.status.success());
    let lines: Vec<&str> = version.lines().collect();
    assert_eq!(lines.len(), 3, "{version}");
    assert!(lines[0].starts_with("kata-runtime  : 0."), "{version}");
    assert!(lines[1].starts_with("   commit   : "), "{version}");
    assert!(lines[2].starts_with("   OCI specs: 1."), "{version}");
    for flag in ["--version", "-v"] {
        let (out, same, _) = run(bin().arg(flag));
        assert!(out.status.success());
        assert_eq!(same, version, "{flag}");
    }
}

#[test]
fn metrics_of_an_unknown_or_hostile_sandbox_id_is_a_clear_error() {
    let (out, _, stderr) = run(bin().args(["metrics", "no-such-sandbox"]));
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr.contains("sandbox no-such-sandbox not found")
            && stderr.contains("/run/vc/sbs/no-such-sandbox/shim-monitor.sock"),
        "{stderr}"
    );
    let (out, _, stderr) = run(bin().args(["metrics", "../../etc"]));
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr.contains("is not a sandbox id"), "{stderr}");
}

#[test]
fn release_lookup_without_network_is_explained() {
    let (out, _, stderr) =
        run(bin().args(["check", "--check-version-only", "--no-network-checks"]));
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr.contains("release lookup needs the network"),
        "{stderr}"
    );
}

/// Serves `body` with `status` over HTTP on a loopback port, for `requests` requests; returns
/// the URL and the request lines seen.
fn serve(
    status: &'static str,
    body: &'static str,
    requests: usize,
) -> (String, std::thread::JoinHandle<Vec<String>>) {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!(
        "http://{}/repos/kata-containers/kata-containers/releases",
        listener.local_addr().expect("addr")
    );
    let handle = std::thread::spawn(move || {
        let mut seen = Vec::new();
        for _ in 0..requests {
            let (mut conn, _) = listener.accept().expect("accept");
            let mut reader = BufReader::new(conn.try_clone().expect("clone"));
            let mut line = String::new();
            reader.read_line(&mut line).expect("request line");
            seen.push(line.trim().to_string());
            loop {
                let mut h = String::new();
                if reader.read_line(&mut h).expect("header") == 0 || h == "\r\n" {
                    break;
                }
            }
            write!(
                conn,
                "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
            .expect("reply");
        }
        seen
    });
    (url, handle)
}

const RELEASES: &str = r#"[
  {"tag_name":"99.1.0-rc0","prerelease":true,"published_at":"2030-02-01T00:00:00Z","html_url":"https://example.org/99.1.0-rc0"},
  {"tag_name":"99.0.1","prerelease":false,"published_at":"2030-01-01T00:00:00Z","html_url":"https://example.org/99.0.1",
   "assets":[{"browser_download_url":"https://example.org/dl/99.0.1.tar.zst","created_at":"2029-12-31T00:00:00Z"}]},
  {"tag_name":"0.0.1","published_at":"2020-01-01T00:00:00Z","html_url":"https://example.org/0.0.1"}
]"#;

#[test]
fn release_lookup_reads_the_release_url() {
    let (url, server) = serve("200 OK", RELEASES, 3);
    let (out, stdout, stderr) = run(bin()
        .args(["check", "--check-version-only"])
        .env("KATA_RELEASE_URL", &url)
        .env_remove("KATA_CHECK_NO_NETWORK"));
    assert!(out.status.success(), "{stderr}");
    assert_eq!(
        stdout.trim(),
        "Newer major release available: 99.0.1 (url: https://example.org/dl/99.0.1.tar.zst, date: 2030-01-01T00:00:00Z)"
    );
    let (out, stdout, stderr) = run(bin()
        .args(["check", "--only-list-releases"])
        .env("KATA_RELEASE_URL", &url));
    assert!(out.status.success(), "{stderr}");
    assert_eq!(
        stdout.lines().collect::<Vec<_>>(),
        [
            "0.0.1;2020-01-01T00:00:00Z;https://example.org/0.0.1",
            "99.0.1;2030-01-01T00:00:00Z;https://example.org/dl/99.0.1.tar.zst"
        ]
    );
    let (out, stdout, stderr) = run(bin()
        .args(["check", "--only-list-releases", "--include-all-releases"])
        .env("KATA_RELEASE_URL", &url));
    assert!(out.status.success(), "{stderr}");
    assert_eq!(
        stdout.lines().last(),
        Some("99.1.0-rc0;2030-02-01T00:00:00Z;https://example.org/99.1.0-rc0")
    );
    let seen = server.join().expect("server");
    assert!(
        seen.iter()
            .all(|l| l == "GET /repos/kata-containers/kata-containers/releases HTTP/1.1"),
        "{seen:?}"
    );
}

#[test]
fn release_lookup_failures_are_explained() {
    // Nothing listens: the error names the URL and the variable to set.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let dead = format!("http://{}/releases", closed.local_addr().expect("addr"));
    drop(closed);
    let (out, stdout, stderr) = run(bin()
        .args(["check", "--check-version-only"])
        .env("KATA_RELEASE_URL", &dead));
    assert_eq!(out.status.code(), Some(1));
    assert!(stdout.is_empty(), "{stdout}");
    assert!(stderr.contains(&format!("cannot reach {dead}")), "{stderr}");
    assert!(stderr.contains("KATA_RELEASE_URL"), "{stderr}");
    // A server that answers with something other than a releases array.
    let (url, server) = serve("200 OK", r#"{"message":"Not Found"}"#, 1);
    let (out, _, stderr) = run(bin()
        .args(["check", "--check-version-only"])
        .env("KATA_RELEASE_URL", &url));
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr.contains("expected a JSON array of releases, got an object"),
        "{stderr}"
    );
    server.join().expect("server");
    // GitHub's rate limit.
    let (url, server) = serve(
        "403 Forbidden",
        r#"{"message":"API rate limit exceeded for 192.0.2.1."}"#,
        1,
    );
    let (out, _, stderr) = run(bin()
        .args(["check", "--check-version-only"])
        .env("KATA_RELEASE_URL", &url));
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr.contains("API rate limit exceeded (HTTP 403)"),
        "{stderr}"
    );
    server.join().expect("server");
}

/// A config pointing at the real QEMU and the guest kernel built by scripts/guest-kernel.sh.
fn probe_config(dir: &Path, kernel: &Path) -> PathBuf {
    let initrd = dir.join("initrd.img");
    std::fs::write(&initrd, b"placeholder: the boot probe does not use it").expect("initrd");
    let cfg = dir.join("configuration.toml");
    std::fs::write(
        &cfg,
        format!(
            "[hypervisor.qemu]\npath = \"/usr/bin/qemu-system-x86_64\"\nkernel = \"{}\"\ninitrd = \"{}\"\nshared_fs = \"virtio-9p\"\n",
            kernel.display(),
            initrd.display()
        ),
    )
    .expect("config");
    cfg
}

fn test_kernel() -> PathBuf {
    let dir = std::env::var_os("KATA_TEST_KERNEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("build/kernel"));
    let entry = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}; run scripts/guest-kernel.sh", dir.display()))
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinux-"))
        });
    entry.unwrap_or_else(|| {
        panic!(
            "no vmlinux-* in {}; run scripts/guest-kernel.sh",
            dir.display()
        )
    })
}

#[test]
#[ignore = "needs root, QEMU and the guest kernel (make test runs it)"]
fn check_boots_the_kernel_and_explains_the_accelerator() {
    let dir = tempfile::tempdir().expect("tmp");
    let cfg = probe_config(dir.path(), &test_kernel());
    let start = std::time::Instant::now();
    let (out, stdout, stderr) = run(bin().arg("--config").arg(&cfg).args(["check", "--verbose"]));
    let secs = start.elapsed().as_secs_f64();
    let code = out.status.code();
    assert!(
        matches!(code, Some(0) | Some(2)),
        "exit {code:?}\n{stdout}\n{stderr}"
    );
    // The kernel is named by the version banner read from the file.
    let kernel = test_kernel();
    let release = kernel
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("vmlinux-"))
        .expect("vmlinux-<release>");
    assert!(
        stdout.contains(&format!("the guest kernel {release} boots with")),
        "{stdout}"
    );
    assert!(
        stdout.contains("System is capable of running Kata Containers"),
        "{stdout}"
    );
    let kvm_hangs = stdout.contains("does not boot with kvm");
    if code == Some(2) {
        assert!(stdout.contains("with TCG emulation only"), "{stdout}");
        assert!(
            stdout.contains("VMs will run under TCG emulation"),
            "{stdout}"
        );
    }
    if kvm_hangs {
        assert_eq!(code, Some(2), "KVM hangs, so only emulation is possible");
        assert!(stdout.contains("falls back to TCG emulation"), "{stdout}");
    }
    assert!(secs < 60.0, "the probe took {secs:.1} s");
    // env now reports what the probe chose.
    let (_, env, _) = run(bin().arg("--config").arg(&cfg).args(["env", "--json"]));
    let v: serde_json::Value = serde_json::from_str(&env).expect("json");
    let expected = if code == Some(0) { "kvm" } else { "tcg" };
    assert_eq!(v["Hypervisor"]["AcceleratorInUse"], expected);
    let banner = v["Kernel"]["Version"].as_str().unwrap_or_default();
    assert!(banner.starts_with(&format!("{release} ")), "{banner}");
}

#[test]
#[ignore = "needs QEMU (make test runs it)"]
fn check_names_a_missing_kernel_and_fails() {
    let dir = tempfile::tempdir().expect("tmp");
    let cfg = probe_config(dir.path(), &dir.path().join("no-such-vmlinux"));
    let (out, stdout, _) = run(bin().arg("--config").arg(&cfg).arg("check"));
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("no-such-vmlinux ([hypervisor.qemu].kernel) does not exist"),
        "{stdout}"
    );
    assert!(
        stdout.contains("hint: build and install the guest"),
        "{stdout}"
    );
}

#[test]
#[ignore = "needs QEMU (make test runs it)"]
fn check_strict_fails_on_warnings() {
    let dir = tempfile::tempdir().expect("tmp");
    let cfg = probe_config(dir.path(), &test_kernel());
    std::fs::write(
        &cfg,
        std::fs::read_to_string(&cfg).expect("read")
            + "enable_iothreads = true\naccelerator = \"tcg\"\n",
    )
    .expect("write");
    let (out, stdout, _) = run(bin().arg("--config").arg(&cfg).args(["check"]));
    assert_eq!(
        out.status.code(),
        Some(2),
        "emulated, with a warning: {stdout}"
    );
    assert!(
        stdout.contains("[hypervisor.qemu].enable_iothreads is set but not supported"),
        "{stdout}"
    );
    let (out, stdout, _) = run(bin().arg("--config").arg(&cfg).args(["check", "--strict"]));
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("--strict"), "{stdout}");
}

#[test]
#[ignore = "needs 'make install' into /opt/kata (make test runs it)"]
fn installed_tree_has_the_kata_layout_and_loads_by_default() {
    let defaults = Path::new("/opt/kata/share/defaults/kata-containers");
    for f in [
        "configuration-qemu.toml",
        "configuration-clh.toml",
        "configuration-fc.toml",
        "configuration-dragonball.toml",
    ] {
        let installed =
            std::fs::read_to_string(defaults.join(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
        let shipped = std::fs::read_to_string(repo().join("config").join(f)).expect("shipped");
        assert_eq!(
            installed, shipped,
            "{f} is stale in /opt/kata; run make install"
        );
    }
    let link = std::fs::read_link(defaults.join("configuration.toml"))
        .expect("configuration.toml is a link");
    assert_eq!(link, Path::new("configuration-qemu.toml"));
    let assets = Path::new("/opt/kata/share/kata-containers");
    for link in ["vmlinux.container", "vmlinuz.container"] {
        let target = assets.join(std::fs::read_link(assets.join(link)).expect(link));
        assert!(target.is_file(), "{link} -> {}", target.display());
    }
    assert!(Path::new("/opt/kata/share/bash-completion/completions/kata-runtime").is_file());
    assert!(Path::new("/opt/kata/bin/qemu-system-x86_64").exists());
    // With no --config and no KATA_CONF_FILE, the installed runtime finds the default file
    // (unless an administrator's /etc file exists, which then wins).
    let out = Command::new("/opt/kata/bin/kata-runtime")
        .args(["env", "--json"])
        .env_remove("KATA_CONF_FILE")
        .output()
        .expect("installed kata-runtime runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let expected = if Path::new("/etc/kata-containers/configuration.toml").exists() {
        "/etc/kata-containers/configuration.toml"
    } else {
        "/opt/kata/share/defaults/kata-containers/configuration.toml"
    };
    assert_eq!(v["Runtime"]["Config"]["Path"], expected);
    assert_eq!(v["Runtime"]["Config"]["FoundBy"], "default location");
}

#[test]
#[ignore = "boots a real VM: needs root, QEMU and make install (make test runs it)"]
fn overhead_measures_a_real_sandbox_and_leaves_nothing() {
    let installed = PathBuf::from("/opt/kata/share/defaults/kata-containers/configuration.toml");
    let (out, stdout, stderr) =
        run(bin()
            .arg("--config")
            .arg(&installed)
            .args(["overhead", "--seconds", "1", "--json"]));
    assert!(out.status.success(), "{stderr}");
    let m: serde_json::Value = serde_json::from_str(&stdout).expect("JSON");
    let kib = |k: &str| m[k].as_u64().unwrap_or(0);
    assert!(kib("qemu_pss_kib") > 50 * 1024, "{m}");
    assert!(
        kib("virtiofsd_pss_kib") > 0 && kib("runtime_pss_kib") > 0,
        "{m}"
    );
    let total_mib =
        (kib("qemu_pss_kib") + kib("virtiofsd_pss_kib") + kib("runtime_pss_kib")) / 1024;
    assert!(
        kib("pod_fixed_memory_mib") >= total_mib * 125 / 100,
        "margin applied: {m}"
    );
    assert!(kib("pod_fixed_millicores") >= 10, "{m}");
    let left: Vec<_> = std::fs::read_dir("/run/vc/vm")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("kata-overhead-")
        })
        .collect();
    assert!(left.is_empty(), "{left:?}");
    // The manifest form.
    let (out, stdout, stderr) = run(bin().arg("--config").arg(&installed).args([
        "overhead",
        "--seconds",
        "1",
        "--name",
        "kata-measured",
    ]));
    assert!(out.status.success(), "{stderr}");
    assert!(
        stdout.contains("kind: RuntimeClass\nmetadata:\n  name: kata-measured\nhandler: kata\n"),
        "{stdout}"
    );
    assert!(stdout.contains("podFixed:\n    memory: \""), "{stdout}");
}

#[test]
fn keys_the_runtime_does_not_act_on_are_reported() {
    // The shipped file with keys the runtime parses but does not act on, set by a user.
    let dir = tempfile::tempdir().expect("tmp");
    let text = std::fs::read_to_string(shipped())
        .expect("shipped")
        .replace("\nenable_tracing = false\n", "\nenable_tracing = true\n");
    assert!(
        text.contains("\nenable_tracing = true\n"),
        "the shipped file has enable_tracing"
    );
    let cfg = dir.path().join("configuration.toml");
    std::fs::write(&cfg, text).expect("write");
    let (out, stdout, stderr) = run(bin().arg("--config").arg(&cfg).args(["env", "--json"]));
    assert!(out.status.success(), "{stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout).expect("valid JSON");
    let keys: Vec<String> = v["Runtime"]["UnsupportedKeys"]
        .as_array()
        .expect("UnsupportedKeys")
        .iter()
        .filter_map(|k| k.as_str().map(String::from))
        .collect();
    assert!(
        keys.iter().any(|k| k.ends_with(".enable_tracing")),
        "{keys:?}"
    );
    // The shipped file itself sets nothing the runtime ignores.
    let (_, stdout, _) = run(bin().arg("--config").arg(shipped()).args(["env", "--json"]));
    let v: serde_json::Value = serde_json::from_str(&stdout).expect("valid JSON");
    assert_eq!(v["Runtime"]["UnsupportedKeys"], serde_json::json!([]));
}

/// `check` and `env` with PATH leading to `dir` (which holds a `containerd`).
fn check_and_env_with_containerd_in(dir: &Path) -> (String, serde_json::Value) {
    let path = format!(
        "{}:{}",
        dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let (_, check, _) = run(bin()
        .args(["--config"])
        .arg(shipped())
        .args(["check", "-v", "-n", "--no-boot-probe"])
        .env("PATH", &path));
    let (out, env, stderr) = run(bin()
        .args(["--config"])
        .arg(shipped())
        .args(["env", "--json"])
        .env("PATH", &path));
    assert!(out.status.success(), "{stderr}");
    (
        check,
        serde_json::from_str(&env).expect("env prints valid JSON"),
    )
}

#[test]
fn check_and_env_report_the_hosts_containerd_and_warn_for_an_untested_one() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tmp");
    let fake = dir.path().join("containerd");
    std::fs::write(
        &fake,
        "#!/bin/sh\necho 'containerd github.com/containerd/containerd/v2 v2.0.4 1a43cb6a'\n",
    )
    .expect("write");
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let (check, env) = check_and_env_with_containerd_in(dir.path());
    let line = check
        .lines()
        .find(|l| l.contains("containerd v2.0.4"))
        .unwrap_or_else(|| panic!("no containerd line in: {check}"));
    assert!(
        line.starts_with("[WARN]")
            && line.contains("is not a version this runtime is tested with (1.6, 1.7, 2.1)"),
        "{line}"
    );
    assert_eq!(env["Host"]["Containerd"]["Version"], "v2.0.4");
    assert_eq!(env["Host"]["Containerd"]["Tested"], false);
    assert_eq!(
        env["Host"]["Containerd"]["Path"],
        fake.display().to_string()
    );

    // Something named containerd that does not say a version.
    std::fs::write(&fake, "#!/bin/sh\necho hello\n").expect("write");
    let (check, env) = check_and_env_with_containerd_in(dir.path());
    assert!(
        check
            .lines()
            .any(|l| l.starts_with("[WARN]") && l.contains("did not tell its version")),
        "{check}"
    );
    assert_eq!(env["Host"]["Containerd"]["Version"], "");
}

#[test]
#[ignore = "needs containerd 2.1 from make managers (make test runs it)"]
fn check_calls_the_matrix_containerd_tested() {
    let out = Command::new(repo().join("scripts/managers.sh"))
        .args(["dir", "containerd-2.1"])
        .output()
        .expect("scripts/managers.sh");
    assert!(out.status.success());
    let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    let (check, env) = check_and_env_with_containerd_in(&dir);
    assert!(
        check
            .lines()
            .any(|l| l.starts_with("[ok  ] containerd 2.1.") && l.contains("a tested version")),
        "{check}"
    );
    assert_eq!(env["Host"]["Containerd"]["Tested"], true);
}
