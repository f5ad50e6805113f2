//! One host process's families from `/proc/<pid>`: `<prefix>_threads`, `<prefix>_fds`,
//! `<prefix>_proc_status{item}`, `<prefix>_proc_stat{item}`, `<prefix>_io_stat{item}` and, when
//! asked, `<prefix>_netdev{interface,item}` (the devices of the process's network namespace).
//! Item names are Kata's (operations reference §2).

use std::path::{Path, PathBuf};

use crate::{gauge_family, MetricsError};

/// `/proc/<pid>/status` fields reported in `proc_status`, with Kata's item names; the `kB`
/// values are converted to bytes.
const STATUS_FIELDS: &[(&str, &str)] = &[
    ("VmPeak", "vmpeak"),
    ("VmSize", "vmsize"),
    ("VmLck", "vmlck"),
    ("VmPin", "vmpin"),
    ("VmHWM", "vmhwm"),
    ("VmRSS", "vmrss"),
    ("RssAnon", "rssanon"),
    ("RssFile", "rssfile"),
    ("RssShmem", "rssshmem"),
    ("VmData", "vmdata"),
    ("VmStk", "vmstk"),
    ("VmExe", "vmexe"),
    ("VmLib", "vmlib"),
    ("VmPTE", "vmpte"),
    ("VmPMD", "vmpmd"),
    ("VmSwap", "vmswap"),
    ("HugetlbPages", "hugetlbpages"),
    ("voluntary_ctxt_switches", "voluntary_ctxt_switches"),
    ("nonvoluntary_ctxt_switches", "nonvoluntary_ctxt_switches"),
];

/// `/proc/<pid>/io` fields, with Kata's (Go runtime's) item names.
const IO_FIELDS: &[(&str, &str)] = &[
    ("rchar", "rchar"),
    ("wchar", "wchar"),
    ("syscr", "syscr"),
    ("syscw", "syscw"),
    ("read_bytes", "readbytes"),
    ("write_bytes", "writebytes"),
    ("cancelled_write_bytes", "cancelledwritebytes"),
];

/// `/proc/<pid>/net/dev` columns, in order, with Kata's item names.
pub const NETDEV_ITEMS: &[&str] = &[
    "recv_bytes",
    "recv_packets",
    "recv_errs",
    "recv_drop",
    "recv_fifo",
    "recv_frame",
    "recv_compressed",
    "recv_multicast",
    "sent_bytes",
    "sent_packets",
    "sent_errs",
    "sent_drop",
    "sent_fifo",
    "sent_colls",
    "sent_carrier",
    "sent_compressed",
];

/// Where a process's `/proc` entry is.
#[derive(Debug, Clone)]
pub struct ProcessSource {
    /// `/proc/<pid>` (or a fake tree in tests).
    pub dir: PathBuf,
}

impl ProcessSource {
    /// The process `pid` under `/proc`.
    pub fn pid(pid: u32) -> Self {
        Self {
            dir: PathBuf::from(format!("/proc/{pid}")),
        }
    }

    /// This process.
    pub fn this() -> Self {
        Self {
            dir: PathBuf::from("/proc/self"),
        }
    }

    /// Whether the process (still) exists.
    pub fn exists(&self) -> bool {
        self.dir.join("stat").exists()
    }

    /// CPU time (user and system) in seconds; 0 when the process is gone.
    pub fn cpu_seconds(&self) -> f64 {
        std::fs::read_to_string(self.dir.join("stat"))
            .map(|t| {
                parse_stat(&t)
                    .iter()
                    .filter(|(i, _)| *i == "utime" || *i == "stime")
                    .map(|(_, v)| v)
                    .sum::<f64>()
                    / crate::USER_HZ
            })
            .unwrap_or(0.0)
    }

    /// One `proc_status` item (`vmrss`, `vmsize`, ...) in bytes, if the process has it.
    pub fn status_item(&self, item: &str) -> Option<f64> {
        let text = std::fs::read_to_string(self.dir.join("status")).ok()?;
        parse_status(&text)
            .1
            .iter()
            .find(|(i, _)| *i == item)
            .map(|(_, v)| *v)
    }
}

/// Parses `/proc/<pid>/status` into (item, value) pairs.
pub fn parse_status(text: &str) -> (Option<f64>, Vec<(&'static str, f64)>) {
    let mut threads = None;
    let mut items = Vec::new();
    for line in text.lines() {
        let Some((key, rest)) = line.split_once(':') else {
            continue;
        };
        let mut words = rest.split_whitespace();
        let Some(v) = words.next().and_then(|v| v.parse::<f64>().ok()) else {
            continue;
        };
        let v = if words.next() == Some("kB") {
            v * 1024.0
        } else {
            v
        };
        if key == "Threads" {
            threads = Some(v);
        } else if let Some((_, item)) = STATUS_FIELDS.iter().find(|(k, _)| *k == key) {
            items.push((*item, v));
        }
    }
    (threads, items)
}

/// Parses `/proc/<pid>/stat`: utime, stime, cutime, cstime (clock ticks).
pub fn parse_stat(text: &str) -> Vec<(&'static str, f64)> {
    // The command name (field 2) may hold spaces and parentheses: fields start after the last ')'.
    let Some(rest) = text.rfind(')').map(|i| &text[i + 1..]) else {
        return Vec::new();
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After ')': state is field 3, so utime (field 14) is index 11.
    ["utime", "stime", "cutime", "cstime"]
        .iter()
        .enumerate()
        .filter_map(|(i, name)| {
            fields
                .get(11 + i)
                .and_then(|v| v.parse::<f64>().ok())
                .map(|v| (*name, v))
        })
        .collect()
}

/// Parses `/proc/<pid>/io`.
pub fn parse_io(text: &str) -> Vec<(&'static str, f64)> {
    text.lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            let (_, item) = IO_FIELDS.iter().find(|(f, _)| *f == k.trim())?;
            Some((*item, v.trim().parse::<f64>().ok()?))
        })
        .collect()
}

/// Parses `/proc/<pid>/net/dev`: (interface, item, value); `lo` is left out.
pub fn parse_netdev(text: &str) -> Vec<(String, &'static str, f64)> {
    let mut out = Vec::new();
    for line in text.lines().skip(2) {
        let Some((name, rest)) = line.split_once(':') else {
            continue;
        };
        let name = name.trim();
        if name == "lo" || name.is_empty() {
            continue;
        }
        for (item, v) in NETDEV_ITEMS.iter().zip(rest.split_whitespace()) {
            if let Ok(v) = v.parse::<f64>() {
                out.push((name.to_string(), *item, v));
            }
        }
    }
    out
}

fn count_fds(dir: &Path) -> Option<f64> {
    std::fs::read_dir(dir.join("fd"))
        .ok()
        .map(|d| d.flatten().count() as f64)
}

/// Adds the families of process `src` named `<prefix>_*` to `registry`, with `what` in their
/// help text ("Hypervisor", "Shim", ...). A family whose `/proc` file cannot be read is left
/// out. Returns how many families were added.
pub fn register(
    registry: &prometheus::Registry,
    prefix: &str,
    what: &str,
    src: &ProcessSource,
    with_netdev: bool,
) -> Result<usize, MetricsError> {
    let mut n = 0;
    let read = |f: &str| std::fs::read_to_string(src.dir.join(f)).ok();
    if let Some(text) = read("status") {
        let (threads, items) = parse_status(&text);
        if let Some(t) = threads {
            gauge_family(
                registry,
                &format!("{prefix}_threads"),
                &format!("{what} process threads."),
                &[],
                &[(vec![], t)],
            )?;
            n += 1;
        }
        let samples: Vec<(Vec<&str>, f64)> = items.iter().map(|(i, v)| (vec![*i], *v)).collect();
        gauge_family(
            registry,
            &format!("{prefix}_proc_status"),
            &format!("{what} process /proc/<pid>/status (sizes in bytes)."),
            &["item"],
            &samples,
        )?;
        n += usize::from(!samples.is_empty());
    }
    if let Some(fds) = count_fds(&src.dir) {
        gauge_family(
            registry,
            &format!("{prefix}_fds"),
            &format!(
                "Open file descriptors of the {} process.",
                what.to_lowercase()
            ),
            &[],
            &[(vec![], fds)],
        )?;
        n += 1;
    }
    for (file, family, help, parse) in [
        (
            "stat",
            "proc_stat",
            "process /proc/<pid>/stat CPU times (clock ticks).",
            parse_stat as fn(&str) -> Vec<(&'static str, f64)>,
        ),
        (
            "io",
            "io_stat",
            "process /proc/<pid>/io counters.",
            parse_io as fn(&str) -> Vec<(&'static str, f64)>,
        ),
    ] {
        if let Some(text) = read(file) {
            let items = parse(&text);
            let samples: Vec<(Vec<&str>, f64)> =
                items.iter().map(|(i, v)| (vec![*i], *v)).collect();
            gauge_family(
                registry,
                &format!("{prefix}_{family}"),
                &format!("{what} {help}"),
                &["item"],
                &samples,
            )?;
            n += usize::from(!samples.is_empty());
        }
    }
    if with_netdev {
        if let Some(text) = read("net/dev") {
            let items = parse_netdev(&text);
            let samples: Vec<(Vec<&str>, f64)> = items
                .iter()
                .map(|(i, item, v)| (vec![i.as_str(), *item], *v))
                .collect();
            gauge_family(
                registry,
                &format!("{prefix}_netdev"),
                &format!("{what} network devices (/proc/<pid>/net/dev)."),
                &["interface", "item"],
                &samples,
            )?;
            n += usize::from(!samples.is_empty());
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_items_are_katas_and_in_bytes() {
        let (threads, items) = parse_status(
            "Name:\tqemu\nThreads:\t7\nVmRSS:\t  2048 kB\nvoluntary_ctxt_switches:\t12\nGarbage\nVmPeak: x kB\n",
        );
        assert_eq!(threads, Some(7.0));
        assert_eq!(
            items,
            vec![
                ("vmrss", 2048.0 * 1024.0),
                ("voluntary_ctxt_switches", 12.0)
            ]
        );
    }

    #[test]
    fn stat_survives_a_command_name_with_parentheses_and_spaces() {
        let line = "42 (qemu (x) y) S 1 42 42 0 -1 4194560 100 0 0 0 11 22 33 44 20 0 3 0";
        assert_eq!(
            parse_stat(line),
            vec![
                ("utime", 11.0),
                ("stime", 22.0),
                ("cutime", 33.0),
                ("cstime", 44.0)
            ]
        );
        assert!(parse_stat("garbage").is_empty());
        assert!(parse_stat("1 (x) S").is_empty());
    }

    #[test]
    fn io_and_netdev_use_katas_item_names() {
        let io =
            parse_io("rchar: 10\nwchar: 20\nread_bytes: 4096\ncancelled_write_bytes: 0\nbogus\n");
        assert_eq!(
            io,
            vec![
                ("rchar", 10.0),
                ("wchar", 20.0),
                ("readbytes", 4096.0),
                ("cancelledwritebytes", 0.0)
            ]
        );
        let dev = "Inter-|   Receive\n face |bytes\n    lo: 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16\n  eth0: 100 2 0 0 0 0 0 0 200 3 0 0 0 0 0 0\n";
        let n = parse_netdev(dev);
        assert_eq!(n.len(), 16);
        assert_eq!(n[0], ("eth0".to_string(), "recv_bytes", 100.0));
        assert_eq!(n[8], ("eth0".to_string(), "sent_bytes", 200.0));
    }

    #[test]
    fn own_process_gives_every_family_and_a_gone_one_gives_none() {
        let r = prometheus::Registry::new();
        let n = register(&r, "kata_shim", "Shim", &ProcessSource::this(), true).expect("register");
        assert!(n >= 5, "families: {n}");
        let text = crate::text::render(&r);
        for f in [
            "kata_shim_threads ",
            "kata_shim_fds ",
            "kata_shim_proc_status{item=\"vmrss\"}",
            "kata_shim_proc_stat{item=\"utime\"}",
            "kata_shim_io_stat{item=\"rchar\"}",
        ] {
            assert!(text.contains(f), "{f} missing from:\n{text}");
        }
        let gone = ProcessSource {
            dir: PathBuf::from("/proc/no-such-pid"),
        };
        let r = prometheus::Registry::new();
        assert_eq!(
            register(&r, "kata_hypervisor", "Hypervisor", &gone, true).expect("register"),
            0
        );
        assert_eq!(crate::text::render(&r), "");
    }
}
