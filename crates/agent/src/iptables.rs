//! The guest's packet filter (Kata's GetIPTables / SetIPTables): `ip(6)tables-save` and
//! `ip(6)tables-restore --wait 5` from the guest image (xtables-legacy-multi and its libraries,
//! copied by `kata-guest-image --iptables`), run on the guest's network namespace, which is the
//! pod's.

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::reaper::Reaper;

/// Where the guest image puts the tools.
pub const SBIN: &str = "/sbin";

/// What a tool printed and how it ended.
#[derive(Debug)]
pub struct Output {
    /// Exit status (128 + signal for a signal).
    pub status: i32,
    /// Its stdout.
    pub stdout: Vec<u8>,
    /// Its stderr.
    pub stderr: Vec<u8>,
}

/// Runs `program` with `args`, `input` on stdin, for at most `timeout`; its exit comes from the
/// agent's reaper (PID 1 reaps every child).
pub fn run(
    reaper: &Reaper,
    program: &Path,
    args: &[&str],
    input: &[u8],
    timeout: Duration,
) -> Result<Output, String> {
    let what = program.display().to_string();
    if !program.exists() {
        return Err(format!(
            "{what} is not in the guest image (build it with kata-guest-image --iptables)"
        ));
    }
    let mut child = Command::new(program)
        .args(args)
        .env_clear()
        .env("PATH", "/sbin:/bin:/usr/sbin:/usr/bin")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{what}: {e}"))?;
    let exit = reaper.register(child.id() as i32);
    let mut stdin = child.stdin.take();
    let input = input.to_vec();
    let writer = std::thread::spawn(move || {
        if let Some(s) = stdin.as_mut() {
            let _ = s.write_all(&input);
        }
    });
    let drain = |r: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut buf);
            }
            buf
        })
    };
    let out = drain(
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    );
    let err = drain(
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    );
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(e) = *exit.borrow() {
            break e.status();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            return Err(format!("{what} did not finish in {} s", timeout.as_secs()));
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let _ = writer.join();
    Ok(Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    })
}

fn tool(v6: bool, what: &str) -> std::path::PathBuf {
    Path::new(SBIN).join(format!(
        "{}{what}",
        if v6 { "ip6tables" } else { "iptables" }
    ))
}

/// `ip(6)tables-save`.
pub fn save(reaper: &Reaper, v6: bool) -> Result<Vec<u8>, String> {
    let o = run(
        reaper,
        &tool(v6, "-save"),
        &[],
        &[],
        Duration::from_secs(10),
    )?;
    if o.status != 0 {
        return Err(format!(
            "{}-save failed: {}",
            if v6 { "ip6tables" } else { "iptables" },
            String::from_utf8_lossy(&o.stderr).trim()
        ));
    }
    Ok(o.stdout)
}

/// `ip(6)tables-restore --wait 5` of `rules`; on a bad file the restore's error, rules unchanged
/// (restore commits a table only when all of it parsed).
pub fn restore(reaper: &Reaper, v6: bool, rules: &[u8]) -> Result<Vec<u8>, String> {
    let o = run(
        reaper,
        &tool(v6, "-restore"),
        &["--wait", "5"],
        rules,
        Duration::from_secs(10),
    )?;
    if o.status != 0 {
        return Err(format!(
            "{}-restore refused the rules: {}",
            if v6 { "ip6tables" } else { "iptables" },
            String::from_utf8_lossy(&o.stderr).trim()
        ));
    }
    Ok(o.stdout)
}
