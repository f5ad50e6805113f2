//! `kata-runtime overhead`: measures what one pod's sandbox really costs on this host with the
//! current configuration (a real VM is booted, idles, and is measured), and prints a Kubernetes
//! RuntimeClass whose `overhead.podFixed` carries it. Kata ships fixed 130-160Mi values that are
//! too small for many hosts; pods whose VM does not fit get OOM-killed.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use kata_sandbox::Sandbox;
use serde::Serialize;

/// Arguments of `overhead`.
#[derive(Debug, Args)]
pub struct OverheadArgs {
    /// Name of the RuntimeClass to print.
    #[arg(long, default_value = "kata")]
    pub name: String,
    /// containerd runtime handler the RuntimeClass selects (`runtimes.<handler>` in its config).
    #[arg(long, default_value = "kata")]
    pub handler: String,
    /// Seconds the idle sandbox is watched for its CPU use, after it booted.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=600))]
    pub seconds: u64,
    /// Headroom added to the measured figures, in percent (guest caches and the translation
    /// cache grow under load).
    #[arg(long, default_value_t = 25, value_parser = clap::value_parser!(u64).range(0..=500))]
    pub margin: u64,
    /// Apply a pod annotation (repeatable), to measure a pod that overrides the configuration.
    #[arg(long = "annotation", value_name = "KEY=VALUE", value_parser = super::parse_annotation)]
    pub annotations: Vec<(String, String)>,
    /// Print the measurement as JSON instead of the manifest.
    #[arg(long)]
    pub json: bool,
}

/// What was measured.
#[derive(Debug, Serialize)]
pub struct Measurement {
    /// Accelerator the sandbox ran with.
    pub accelerator: String,
    /// Guest memory (default_memory), MiB.
    pub guest_memory_mib: u32,
    /// QEMU's PSS, KiB.
    pub qemu_pss_kib: u64,
    /// virtiofsd's PSS, KiB.
    pub virtiofsd_pss_kib: u64,
    /// This process's PSS while it holds the sandbox (stands for the shim, which runs the same
    /// runtime code), KiB.
    pub runtime_pss_kib: u64,
    /// CPU used by QEMU, virtiofsd and this process while idle, millicores.
    pub idle_millicores: u64,
    /// Boot wall time, ms.
    pub boot_ms: u64,
    /// Memory for podFixed, MiB (with the margin).
    pub pod_fixed_memory_mib: u64,
    /// CPU for podFixed, millicores (with the margin; at least 10).
    pub pod_fixed_millicores: u64,
}

fn status_value(pid: u32, file: &str, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/{file}"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// PSS of a process in KiB (0 when it is gone).
pub fn pss_kib(pid: u32) -> u64 {
    status_value(pid, "smaps_rollup", "Pss:")
}

/// CPU time (user + system) of a process in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may contain spaces) start at ") ".
    let rest = stat.rsplit_once(") ").map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    n(11) + n(12) // utime, stime (fields 14 and 15 of stat)
}

fn virtiofsd_pid(vm_dir: &std::path::Path) -> Option<u32> {
    std::fs::read_to_string(vm_dir.join("vfsd.sock.pid"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Rounds up to a multiple of `step`.
fn round_up(v: u64, step: u64) -> u64 {
    v.div_ceil(step) * step
}

/// The RuntimeClass manifest.
pub fn manifest(a: &OverheadArgs, m: &Measurement, host: &str) -> String {
    format!(
        "# Measured by `kata-runtime overhead` on {host} ({accel}, default_memory {gm} MiB): idle
# sandbox PSS QEMU {q:.1} MiB + virtiofsd {v:.1} MiB + runtime {r:.1} MiB, idle CPU {c}m
# over {s} s, boot {b} ms; podFixed adds a {margin}% margin.
apiVersion: node.k8s.io/v1
kind: RuntimeClass
metadata:
  name: {name}
handler: {handler}
overhead:
  podFixed:
    memory: \"{mem}Mi\"
    cpu: \"{cpu}m\"
scheduling:
  nodeSelector:
    katacontainers.io/kata-runtime: \"true\"
",
        accel = m.accelerator,
        gm = m.guest_memory_mib,
        q = m.qemu_pss_kib as f64 / 1024.0,
        v = m.virtiofsd_pss_kib as f64 / 1024.0,
        r = m.runtime_pss_kib as f64 / 1024.0,
        c = m.idle_millicores,
        s = a.seconds,
        b = m.boot_ms,
        margin = a.margin,
        name = a.name,
        handler = a.handler,
        mem = m.pod_fixed_memory_mib,
        cpu = m.pod_fixed_millicores,
    )
}

/// Idle CPU (millicores) over `seconds`, then the PSS (KiB) of QEMU, virtiofsd and this process.
async fn measure(sb: &Sandbox, seconds: u64) -> (u64, u64, u64, u64) {
    let me = std::process::id();
    let vfsd = virtiofsd_pid(&sb.paths().vm_dir);
    let pids: Vec<u32> = [Some(sb.host_pid()), vfsd, Some(me)]
        .into_iter()
        .flatten()
        .collect();
    let before: u64 = pids.iter().map(|p| cpu_ticks(*p)).sum();
    let t = Instant::now();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let ticks = pids
        .iter()
        .map(|p| cpu_ticks(*p))
        .sum::<u64>()
        .saturating_sub(before);
    // SAFETY: sysconf has no preconditions.
    let hz = match unsafe { libc::sysconf(libc::_SC_CLK_TCK) } {
        n if n > 0 => n as u64,
        _ => 100,
    };
    let millicores = ticks * 1000 * 1000 / hz / (t.elapsed().as_millis().max(1) as u64);
    (
        millicores,
        pss_kib(sb.host_pid()),
        vfsd.map(pss_kib).unwrap_or(0),
        pss_kib(me),
    )
}

/// Runs `overhead`.
pub fn run(config: Option<PathBuf>, args: OverheadArgs) -> anyhow::Result<ExitCode> {
    let config = super::env::effective_config(config, &args.annotations)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("failed to start the async runtime")?;
    let id = format!("kata-overhead-{}", std::process::id());
    let m = rt.block_on(async {
        let t = Instant::now();
        // On error, Sandbox::create has stopped and removed what it started; an interrupt
        // while it boots leaves it half-way, for cleanup_stale.
        let sb = tokio::select! {
            r = Sandbox::create(&id, &config) => {
                r.context("failed to boot a measurement sandbox (see 'kata-runtime check')")?
            }
            _ = tokio::signal::ctrl_c() => {
                kata_sandbox::sandbox::cleanup_stale(&id);
                anyhow::bail!("interrupted while the measurement sandbox booted; it was removed");
            }
        };
        let boot_ms = t.elapsed().as_millis() as u64;
        // Let the guest settle (free page reporting, lazy work), then watch it idle; an
        // interrupt stops the sandbox rather than leaving its QEMU behind.
        let watched = async {
            tokio::time::sleep(Duration::from_secs(3)).await;
            measure(&sb, args.seconds).await
        };
        let measured = tokio::select! {
            m = watched => Ok(m),
            _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted; the measurement sandbox was stopped")),
        };
        let accelerator = sb.accel().name().to_string();
        sb.stop().await;
        let (idle_millicores, qemu, vfsd, own) = measured?;
        let total_mib = (qemu + vfsd + own).div_ceil(1024);
        let m = Measurement {
            accelerator,
            guest_memory_mib: config.hypervisor.default_memory,
            qemu_pss_kib: qemu,
            virtiofsd_pss_kib: vfsd,
            runtime_pss_kib: own,
            idle_millicores,
            boot_ms,
            pod_fixed_memory_mib: round_up(total_mib * (100 + args.margin) / 100, 8),
            pod_fixed_millicores: round_up(
                (idle_millicores * (100 + args.margin) / 100).max(10),
                5,
            ),
        };
        anyhow::Ok(m)
    })?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&m).context("failed to encode JSON")?
        );
    } else {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        print!("{}", manifest(&args, &m, host.trim()));
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_carries_the_figures() {
        let a = OverheadArgs {
            name: "kata".into(),
            handler: "kata".into(),
            seconds: 10,
            margin: 25,
            annotations: Vec::new(),
            json: false,
        };
        let m = Measurement {
            accelerator: "tcg".into(),
            guest_memory_mib: 2048,
            qemu_pss_kib: 250 * 1024,
            virtiofsd_pss_kib: 4 * 1024,
            runtime_pss_kib: 10 * 1024,
            idle_millicores: 20,
            boot_ms: 2500,
            pod_fixed_memory_mib: 336,
            pod_fixed_millicores: 25,
        };
        let y = manifest(&a, &m, "node1");
        assert!(y.contains("handler: kata\n"));
        assert!(y.contains("    memory: \"336Mi\"\n    cpu: \"25m\"\n"));
        assert!(y.contains("apiVersion: node.k8s.io/v1\nkind: RuntimeClass\n"));
        assert_eq!(round_up(330, 8), 336);
    }

    #[test]
    fn own_process_is_measured() {
        let me = std::process::id();
        assert!(pss_kib(me) > 0);
        // Spin for 100 ms of CPU: at least a few clock ticks show up.
        let t = std::time::Instant::now();
        let mut x = 0u64;
        while t.elapsed() < Duration::from_millis(100) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        assert!(cpu_ticks(me) > 0, "{x}");
        assert_eq!((pss_kib(u32::MAX), cpu_ticks(u32::MAX)), (0, 0));
    }
}
