//! The agent is PID 1: it reaps every child. Exits of processes the agent tracks are delivered
//! through a watch channel (with `send_replace`, so an exit that happens before anyone waits
//! is kept); an exit that arrives before its pid is registered is parked until it is.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::sync::watch;

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Exited with a code.
    Code(i32),
    /// Killed by a signal.
    Signal(i32),
}

impl Exit {
    /// Shell-style status: the code, or 128 + signal.
    pub fn status(self) -> i32 {
        match self {
            Exit::Code(c) => c,
            Exit::Signal(s) => 128 + s,
        }
    }
}

#[derive(Default)]
struct Table {
    waiting: HashMap<i32, watch::Sender<Option<Exit>>>,
    early: HashMap<i32, Exit>,
}

/// The reaper.
#[derive(Clone, Default)]
pub struct Reaper {
    table: Arc<Mutex<Table>>,
}

impl std::fmt::Debug for Reaper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Reaper")
    }
}

impl Reaper {
    /// Starts reaping on SIGCHLD.
    pub fn start() -> std::io::Result<Self> {
        let reaper = Reaper::default();
        let mut sigchld = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child())?;
        let r = reaper.clone();
        tokio::spawn(async move {
            loop {
                r.reap_all();
                if sigchld.recv().await.is_none() {
                    break;
                }
            }
        });
        Ok(reaper)
    }

    /// Registers `pid`; the receiver yields its exit.
    pub fn register(&self, pid: i32) -> watch::Receiver<Option<Exit>> {
        let mut t = self.table.lock().unwrap_or_else(|e| e.into_inner());
        let (tx, rx) = watch::channel(None);
        crate::init::debug(|| {
            format!(
                "watching pid {pid} (exited already: {})",
                t.early.contains_key(&pid)
            )
        });
        if let Some(exit) = t.early.remove(&pid) {
            tx.send_replace(Some(exit));
        } else {
            t.waiting.insert(pid, tx);
        }
        rx
    }

    /// Reaps every exited child now.
    pub fn reap_all(&self) {
        loop {
            let exit = match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => (pid.as_raw(), Exit::Code(code)),
                Ok(WaitStatus::Signaled(pid, sig, _)) => (pid.as_raw(), Exit::Signal(sig as i32)),
                Ok(WaitStatus::StillAlive) | Err(_) => return,
                Ok(_) => continue,
            };
            crate::init::debug(|| format!("reaped pid {} ({:?})", exit.0, exit.1));
            let mut t = self.table.lock().unwrap_or_else(|e| e.into_inner());
            match t.waiting.remove(&exit.0) {
                Some(tx) => {
                    tx.send_replace(Some(exit.1));
                }
                None => {
                    // Either not registered yet, or an orphan reparented to PID 1. Keep a
                    // bounded number of unclaimed exits.
                    if t.early.len() > 4096 {
                        t.early.clear();
                    }
                    t.early.insert(exit.0, exit.1);
                }
            }
        }
    }
}

/// Waits for the exit on `rx`.
pub async fn wait(mut rx: watch::Receiver<Option<Exit>>) -> Option<Exit> {
    loop {
        if let Some(e) = *rx.borrow_and_update() {
            return Some(e);
        }
        if rx.changed().await.is_err() {
            return *rx.borrow();
        }
    }
}
