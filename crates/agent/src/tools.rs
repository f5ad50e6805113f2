//! Short-lived programs the agent runs in the guest (iptables, guest hooks): input on stdin,
//! output captured, a deadline, and the exit from the agent's reaper (as PID 1 it reaps every
//! child, so `wait` would find nothing).

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::error::{invalid, step, GuestError};
use crate::reaper::Reaper;

/// What a program printed and how it ended.
#[derive(Debug)]
pub struct Output {
    /// Exit status (128 + signal for a signal).
    pub status: i32,
    /// Its stdout.
    pub stdout: Vec<u8>,
    /// Its stderr.
    pub stderr: Vec<u8>,
}

/// Runs `program` with `args` and a minimal environment, `input` on stdin, for at most
/// `timeout`. `reaper`: the agent's; `None` waits for the child directly (unit tests).
pub fn run(
    reaper: Option<&Reaper>,
    program: &Path,
    args: &[&str],
    input: &[u8],
    timeout: Duration,
) -> Result<Output, GuestError> {
    let what = program.display().to_string();
    let mut child = Command::new(program)
        .args(args)
        .env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(step(what.to_string()))?;
    let exit = reaper.map(|r| r.register(child.id() as i32));
    let mut stdin = child.stdin.take();
    let input = input.to_vec();
    let writer = std::thread::spawn(move || {
        if let Some(s) = stdin.as_mut() {
            // A program that does not read its stdin is fine.
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
        let done = match &exit {
            Some(rx) => rx.borrow().map(|e| e.status()),
            None => child
                .try_wait()
                .map_err(step(what.to_string()))?
                .map(|s| s.code().unwrap_or(128)),
        };
        if let Some(s) = done {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            return Err(invalid(format!(
                "{what} timed out after {} s",
                timeout.as_secs()
            )));
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
