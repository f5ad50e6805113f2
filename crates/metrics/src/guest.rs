//! The guest's families, read from the guest's `/proc` by the agent: `kata_guest_load`,
//! `kata_guest_tasks`, `kata_guest_cpu_time`, `kata_guest_vm_stat`, `kata_guest_netdev_stat`,
//! `kata_guest_diskstat` and `kata_guest_meminfo` (snake_case items, bytes).

use std::path::Path;

use crate::{gauge_family, MetricsError, USER_HZ};

/// `/proc/stat` CPU columns, in order.
const CPU_ITEMS: &[&str] = &[
    "user",
    "nice",
    "system",
    "idle",
    "iowait",
    "irq",
    "softirq",
    "steal",
    "guest",
    "guest_nice",
];

/// `/proc/diskstats` columns after the device name, in order.
const DISK_ITEMS: &[&str] = &[
    "reads",
    "merged",
    "sectors_read",
    "time_reading",
    "writes",
    "writes_merged",
    "sectors_written",
    "time_writing",
    "in_progress",
    "time_in_progress",
    "weighted_time_in_progress",
    "discards",
    "discards_merged",
    "sectors_discarded",
    "time_discarding",
    "flushes",
    "time_flushing",
];

/// `MemTotal` -> `mem_total`, `SReclaimable` -> `s_reclaimable`, `Active(anon)` ->
/// `active_anon`, `DirectMap4k` -> `direct_map_4k`, `HugePages_Total` -> `huge_pages_total`.
pub fn snake_case(key: &str) -> String {
    let chars: Vec<char> = key.chars().collect();
    let mut out = String::with_capacity(key.len() + 4);
    for (i, &c) in chars.iter().enumerate() {
        let prev = i.checked_sub(1).map(|p| chars[p]);
        let next = chars.get(i + 1).copied();
        if !c.is_ascii_alphanumeric() {
            out.push('_');
        } else if c.is_ascii_uppercase() {
            let boundary = prev.is_some_and(|p| {
                p.is_ascii_lowercase()
                    || (p.is_ascii_uppercase() && next.is_some_and(|n| n.is_ascii_lowercase()))
            });
            if boundary {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else if c.is_ascii_digit() {
            if prev.is_some_and(|p| p.is_ascii_alphabetic()) {
                out.push('_');
            }
            out.push(c);
        } else {
            out.push(c);
        }
    }
    let mut collapsed = String::with_capacity(out.len());
    for c in out.chars() {
        if c == '_' && (collapsed.is_empty() || collapsed.ends_with('_')) {
            continue;
        }
        collapsed.push(c);
    }
    collapsed.trim_end_matches('_').to_string()
}

/// `/proc/meminfo` as (snake_case item, bytes).
pub fn parse_meminfo(text: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter_map(|l| {
            let (k, rest) = l.split_once(':')?;
            let mut w = rest.split_whitespace();
            let v: f64 = w.next()?.parse().ok()?;
            let v = if w.next() == Some("kB") {
                v * 1024.0
            } else {
                v
            };
            Some((snake_case(k.trim()), v))
        })
        .collect()
}

/// `/proc/stat` cpu lines as (cpu, item, seconds); `cpu` is `total` for the summary line.
pub fn parse_cpu_time(text: &str) -> Vec<(String, &'static str, f64)> {
    let mut out = Vec::new();
    for line in text.lines() {
        let mut w = line.split_whitespace();
        let Some(name) = w.next().filter(|n| n.starts_with("cpu")) else {
            continue;
        };
        let cpu = match &name[3..] {
            "" => "total".to_string(),
            n if n.chars().all(|c| c.is_ascii_digit()) => n.to_string(),
            _ => continue,
        };
        for (item, v) in CPU_ITEMS.iter().zip(w) {
            if let Ok(v) = v.parse::<f64>() {
                out.push((cpu.clone(), *item, v / USER_HZ));
            }
        }
    }
    out
}

/// `/proc/diskstats` as (disk, item, value).
pub fn parse_diskstats(text: &str) -> Vec<(String, &'static str, f64)> {
    let mut out = Vec::new();
    for line in text.lines() {
        let w: Vec<&str> = line.split_whitespace().collect();
        if w.len() < 4 {
            continue;
        }
        for (item, v) in DISK_ITEMS.iter().zip(&w[3..]) {
            if let Ok(v) = v.parse::<f64>() {
                out.push((w[2].to_string(), *item, v));
            }
        }
    }
    out
}

/// Items of a family without other labels: (item, value).
pub type Items = Vec<(&'static str, f64)>;

/// `/proc/loadavg` as the load items and the tasks items (`cur`, `max`).
pub fn parse_loadavg(text: &str) -> (Items, Items) {
    let w: Vec<&str> = text.split_whitespace().collect();
    let load = ["load1", "load5", "load15"]
        .iter()
        .zip(&w)
        .filter_map(|(i, v)| Some((*i, v.parse::<f64>().ok()?)))
        .collect();
    let tasks = w
        .get(3)
        .and_then(|t| t.split_once('/'))
        .and_then(|(c, m)| Some(vec![("cur", c.parse().ok()?), ("max", m.parse().ok()?)]))
        .unwrap_or_default();
    (load, tasks)
}

/// Adds every guest family readable under `proc` (the guest's `/proc`) to `registry`.
pub fn register(registry: &prometheus::Registry, proc: &Path) -> Result<(), MetricsError> {
    let read = |f: &str| std::fs::read_to_string(proc.join(f)).unwrap_or_default();
    let one = |items: Vec<(&'static str, f64)>| -> Vec<(Vec<&'static str>, f64)> {
        items.into_iter().map(|(i, v)| (vec![i], v)).collect()
    };
    let (load, tasks) = parse_loadavg(&read("loadavg"));
    gauge_family(
        registry,
        "kata_guest_load",
        "Guest load average.",
        &["item"],
        &one(load),
    )?;
    gauge_family(
        registry,
        "kata_guest_tasks",
        "Guest tasks: running (cur) and existing (max), from /proc/loadavg.",
        &["item"],
        &one(tasks),
    )?;
    let cpu = parse_cpu_time(&read("stat"));
    let samples: Vec<(Vec<&str>, f64)> = cpu
        .iter()
        .map(|(c, i, v)| (vec![c.as_str(), *i], *v))
        .collect();
    gauge_family(
        registry,
        "kata_guest_cpu_time",
        "Guest CPU time in seconds, per CPU and in total (/proc/stat).",
        &["cpu", "item"],
        &samples,
    )?;
    let vm: Vec<(String, f64)> = read("vmstat")
        .lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(' ')?;
            Some((k.to_string(), v.trim().parse().ok()?))
        })
        .collect();
    let samples: Vec<(Vec<&str>, f64)> = vm.iter().map(|(k, v)| (vec![k.as_str()], *v)).collect();
    gauge_family(
        registry,
        "kata_guest_vm_stat",
        "Guest /proc/vmstat.",
        &["item"],
        &samples,
    )?;
    let net = crate::process::parse_netdev(&read("net/dev"));
    let samples: Vec<(Vec<&str>, f64)> = net
        .iter()
        .map(|(i, item, v)| (vec![i.as_str(), *item], *v))
        .collect();
    gauge_family(
        registry,
        "kata_guest_netdev_stat",
        "Guest network devices (/proc/net/dev).",
        &["interface", "item"],
        &samples,
    )?;
    let disks = parse_diskstats(&read("diskstats"));
    let samples: Vec<(Vec<&str>, f64)> = disks
        .iter()
        .map(|(d, i, v)| (vec![d.as_str(), *i], *v))
        .collect();
    gauge_family(
        registry,
        "kata_guest_diskstat",
        "Guest disk statistics (/proc/diskstats).",
        &["disk", "item"],
        &samples,
    )?;
    let mem = parse_meminfo(&read("meminfo"));
    let samples: Vec<(Vec<&str>, f64)> = mem.iter().map(|(k, v)| (vec![k.as_str()], *v)).collect();
    gauge_family(
        registry,
        "kata_guest_meminfo",
        "Guest /proc/meminfo, in bytes (snake_case items).",
        &["item"],
        &samples,
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_keys_become_katas_snake_case_items() {
        for (k, want) in [
            ("MemTotal", "mem_total"),
            ("MemAvailable", "mem_available"),
            ("SReclaimable", "s_reclaimable"),
            ("KReclaimable", "k_reclaimable"),
            ("Active(anon)", "active_anon"),
            ("Inactive(file)", "inactive_file"),
            ("DirectMap4k", "direct_map_4k"),
            ("DirectMap2M", "direct_map_2m"),
            ("HugePages_Total", "huge_pages_total"),
            ("Hugepagesize", "hugepagesize"),
            ("NFS_Unstable", "nfs_unstable"),
            ("VmallocTotal", "vmalloc_total"),
            ("AnonHugePages", "anon_huge_pages"),
        ] {
            assert_eq!(snake_case(k), want, "{k}");
        }
        let m = parse_meminfo("MemTotal:  2000 kB\nHugePages_Total:   0\nbad line\n");
        assert_eq!(
            m,
            vec![
                ("mem_total".into(), 2_048_000.0),
                ("huge_pages_total".into(), 0.0)
            ]
        );
    }

    #[test]
    fn cpu_disk_and_load_parse() {
        let cpu = parse_cpu_time(
            "cpu  100 0 50 1000 0 0 0 0 0 0\ncpu0 100 0 50 1000 0 0 0 0 0 0\nintr 5\n",
        );
        assert_eq!(cpu.len(), 20);
        assert_eq!(cpu[0], ("total".into(), "user", 1.0));
        assert_eq!(cpu[10], ("0".into(), "user", 1.0));
        let d = parse_diskstats(" 254 0 vda 10 0 80 5 2 0 16 1 0 6 6 0 0 0 0 0 0\n");
        assert_eq!(d.len(), 17);
        assert_eq!(d[0], ("vda".into(), "reads", 10.0));
        let (load, tasks) = parse_loadavg("0.10 0.20 0.30 2/85 123\n");
        assert_eq!(load, vec![("load1", 0.1), ("load5", 0.2), ("load15", 0.3)]);
        assert_eq!(tasks, vec![("cur", 2.0), ("max", 85.0)]);
        assert_eq!(parse_loadavg(""), (vec![], vec![]));
    }

    #[test]
    fn this_hosts_proc_renders_every_family() {
        let r = prometheus::Registry::new();
        register(&r, Path::new("/proc")).expect("register");
        let text = crate::text::render(&r);
        for f in [
            "kata_guest_load{",
            "kata_guest_tasks{",
            "kata_guest_cpu_time{",
            "kata_guest_vm_stat{",
            "kata_guest_meminfo{item=\"mem_total\"}",
        ] {
            assert!(text.contains(f), "{f}");
        }
        let empty = tempfile::tempdir().expect("tmp");
        let r = prometheus::Registry::new();
        register(&r, empty.path()).expect("register on an empty tree");
        assert_eq!(crate::text::render(&r), "");
    }
}
