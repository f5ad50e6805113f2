//! The debug console (`[agent.kata] debug_console_enabled`): a shell on a pty per connection,
//! as Kata's agent serves it, for `kata-runtime exec`.
//!
//! It runs only when the kernel command line has `agent.debug_console` (the runtime adds it
//! when the option is on). Transport: a virtio-serial port named
//! [`DEBUG_CONSOLE_PORT_NAME`] when the VM has one (hosts without vsock; one session at a
//! time), otherwise vsock port `agent.debug_console_vport` (Kata's 1026; sessions in parallel).
//! The shell is the first of `/bin/bash` and `/bin/sh`, in its own session with the pty as its
//! controlling terminal, as guest root in the agent's namespaces. A connection is raw (Kata's
//! protocol) unless the client opens with the hello of [`kata_protocols::console`], which adds
//! the terminal size and the shell's exit status. When the host side goes away, the shell's
//! session gets SIGHUP, then SIGKILL.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kata_protocols::console::{
    parse_hello, Frame, DEBUG_CONSOLE_PORT_NAME, DEBUG_CONSOLE_VPORT, HELLO, HELLO_WAIT_MS,
};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use crate::init::log;
use crate::reaper::{self, Reaper};

/// Shells tried, in order.
const SHELLS: [&str; 2] = ["/bin/bash", "/bin/sh"];

/// What the kernel command line asks for: `None` = no console; `Some(vport)` otherwise.
pub fn requested(cmdline: &str) -> Option<u32> {
    let words: Vec<&str> = cmdline.split_whitespace().collect();
    if !words.contains(&"agent.debug_console") {
        return None;
    }
    let vport = words
        .iter()
        .find_map(|w| w.strip_prefix("agent.debug_console_vport="))
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEBUG_CONSOLE_VPORT);
    Some(vport)
}

/// Starts the console in the background if the kernel command line asks for it.
pub fn start(reaper: Reaper, rt: tokio::runtime::Handle) {
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let Some(vport) = requested(&cmdline) else {
        return;
    };
    let ctx = Ctx { reaper, rt };
    let spawned = if let Some(port) = crate::channel::find_serial_port(DEBUG_CONSOLE_PORT_NAME) {
        log(&format!(
            "debug console on virtio-serial {}",
            port.display()
        ));
        std::thread::Builder::new()
            .name("debug-console".into())
            .spawn(move || serve_serial(&port, &ctx))
    } else if vport > 0 {
        log(&format!("debug console on vsock port {vport}"));
        std::thread::Builder::new()
            .name("debug-console".into())
            .spawn(move || serve_vsock(vport, &ctx))
    } else {
        log("debug console requested with vport 0 and no virtio-serial port: not served");
        return;
    };
    if let Err(e) = spawned {
        log(&format!("debug console: cannot start its thread: {e}"));
    }
}

/// A console connection (a virtio-serial port or a vsock socket), non-blocking underneath so
/// that neither direction can block forever: a virtio-serial write blocks while the host is
/// away, until it comes back, which would hand a new session the old one's bytes.
struct Conn(File);

impl Conn {
    fn new(f: File) -> std::io::Result<Conn> {
        let fd = f.as_raw_fd();
        // SAFETY: fcntl on a descriptor owned by f.
        unsafe {
            let flags = libc::fcntl(fd, libc::F_GETFL);
            if flags < 0 || libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(Conn(f))
    }

    fn try_clone(&self) -> std::io::Result<Conn> {
        Ok(Conn(self.0.try_clone()?))
    }

    /// Waits for `events`; POLLHUP alone (no POLLIN) means the peer is gone.
    fn wait(&self, events: PollFlags, timeout: PollTimeout) -> std::io::Result<PollFlags> {
        let mut fds = [PollFd::new(self.0.as_fd(), events)];
        loop {
            match poll(&mut fds, timeout) {
                Ok(_) => return Ok(fds[0].revents().unwrap_or(PollFlags::empty())),
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            match self.0.read(buf) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    self.wait(PollFlags::POLLIN, PollTimeout::NONE)?;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                r => return r,
            }
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        loop {
            match self.0.write(buf) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    let r = self.wait(PollFlags::POLLOUT, PollTimeout::from(1000u16))?;
                    if r.contains(PollFlags::POLLHUP) && !r.contains(PollFlags::POLLOUT) {
                        return Err(std::io::ErrorKind::BrokenPipe.into());
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                r => return r,
            }
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[derive(Clone)]
struct Ctx {
    reaper: Reaper,
    rt: tokio::runtime::Handle,
}

/// Serves the virtio-serial port: one session per host connection.
fn serve_serial(port: &Path, ctx: &Ctx) {
    // Opened once for good: opening a virtio-serial port discards what the host has sent, and
    // a client that connects while the previous session winds down has already sent its hello.
    let conn = loop {
        match OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(port)
            .and_then(Conn::new)
        {
            Ok(c) => break c,
            Err(e) => {
                log(&format!("debug console: {}: {e}", port.display()));
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    };
    loop {
        if let Err(e) = wait_for_host(&conn.0) {
            log(&format!("debug console: waiting for the host: {e}"));
            std::thread::sleep(Duration::from_secs(1));
            continue;
        }
        match conn.try_clone().and_then(|r| Ok((r, conn.try_clone()?))) {
            Ok((reader, writer)) => session(reader, writer, None, ctx),
            Err(e) => log(&format!("debug console: {e}")),
        }
    }
}

/// Blocks until the host side of the port is connected. A virtio-serial port polls as
/// POLLHUP while the host is away, and its wait queue is woken when the host connects: an
/// edge-triggered epoll waits for that without spinning.
fn wait_for_host(f: &File) -> std::io::Result<()> {
    // SAFETY: plain syscalls on descriptors owned here.
    let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if ep < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: ep was just created and is owned by nothing else.
    let ep = unsafe { OwnedFd::from_raw_fd(ep) };
    let mut ev = libc::epoll_event {
        events: (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLET) as u32,
        u64: 0,
    };
    // SAFETY: valid descriptors and a valid event.
    if unsafe { libc::epoll_ctl(ep.as_raw_fd(), libc::EPOLL_CTL_ADD, f.as_raw_fd(), &mut ev) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    loop {
        let mut fds = [PollFd::new(f.as_fd(), PollFlags::POLLOUT)];
        poll(&mut fds, PollTimeout::ZERO)?;
        let hup = fds[0]
            .revents()
            .is_some_and(|r| r.contains(PollFlags::POLLHUP));
        if !hup {
            return Ok(());
        }
        let mut out = [libc::epoll_event { events: 0, u64: 0 }];
        // SAFETY: out has room for one event. A 10 s bound re-checks in case a wake-up is
        // ever missed.
        let n = unsafe { libc::epoll_wait(ep.as_raw_fd(), out.as_mut_ptr(), 1, 10_000) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

/// Serves vsock port `vport`: a session per connection, in parallel.
fn serve_vsock(vport: u32, ctx: &Ctx) {
    use nix::sys::socket::{
        accept, bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType, VsockAddr,
    };
    let listener = match socket(
        AddressFamily::Vsock,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .and_then(|s| {
        bind(s.as_raw_fd(), &VsockAddr::new(libc::VMADDR_CID_ANY, vport))?;
        listen(&s, Backlog::new(8).unwrap_or(Backlog::MAXCONN))?;
        Ok(s)
    }) {
        Ok(s) => s,
        Err(e) => {
            log(&format!("debug console: vsock port {vport}: {e}"));
            return;
        }
    };
    loop {
        let fd = match accept(listener.as_raw_fd()) {
            Ok(fd) => fd,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                log(&format!("debug console: accept: {e}"));
                std::thread::sleep(Duration::from_secs(1));
                continue;
            }
        };
        // SAFETY: accept returned a new descriptor owned by nobody else.
        let conn = unsafe { File::from_raw_fd(fd) };
        let ctx = ctx.clone();
        let _ = std::thread::Builder::new()
            .name("debug-console-session".into())
            .spawn(move || {
                let raw = conn.as_raw_fd();
                if let Ok((reader, writer)) = Conn::new(conn).and_then(|c| Ok((c.try_clone()?, c)))
                {
                    session(reader, writer, Some(raw), &ctx);
                }
            });
    }
}

/// Reads the client's first line for up to [`HELLO_WAIT_MS`]: `Ok((Some(hello), rest))` for a
/// framed client, `Ok((None, bytes))` for a raw one (the bytes go to the shell).
/// A framed client's hello: rows, columns, TERM.
type Hello = (u16, u16, String);

fn read_hello(conn: &mut Conn) -> std::io::Result<(Option<Hello>, Vec<u8>)> {
    let deadline = Instant::now() + Duration::from_millis(HELLO_WAIT_MS);
    let mut buf = Vec::new();
    loop {
        if let Some(nl) = buf.iter().position(|b| *b == b'\n') {
            let line = String::from_utf8_lossy(&buf[..nl]).into_owned();
            return Ok(match parse_hello(&line) {
                Some(h) => (Some(h), buf[nl + 1..].to_vec()),
                None => (None, buf),
            });
        }
        // Not a hello (or no longer one): raw.
        if buf.len() >= 128
            || !HELLO
                .as_bytes()
                .starts_with(&buf[..buf.len().min(HELLO.len())])
        {
            return Ok((None, buf));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok((None, buf));
        }
        let ms = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
        if conn
            .wait(PollFlags::POLLIN, PollTimeout::from(ms))?
            .is_empty()
        {
            return Ok((None, buf));
        }
        let mut chunk = [0u8; 128];
        match conn.read(&mut chunk)? {
            0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            n => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// One console session on a connection (`reader` and `writer` are the same connection).
/// `socket`: shut the connection down at the end (vsock), so a blocked read ends.
fn session(mut reader: Conn, writer: Conn, socket: Option<i32>, ctx: &Ctx) {
    let (hello, early) = match read_hello(&mut reader) {
        Ok(h) => h,
        Err(_) => return,
    };
    let framed = hello.is_some();
    let (rows, cols, term) = hello.unwrap_or((24, 80, "linux".into()));
    let writer = Arc::new(Mutex::new(writer));
    // Set when the host side hangs up: nothing is written after that, so that a client who
    // connects next never receives this session's bytes.
    let gone = Arc::new(AtomicBool::new(false));
    let send = {
        let writer = writer.clone();
        let gone = gone.clone();
        move |data: &[u8]| -> bool {
            if gone.load(Ordering::SeqCst) {
                return false;
            }
            let mut w = writer.lock().unwrap_or_else(|e| e.into_inner());
            let r = if framed {
                Frame::Data(data.to_vec()).write_to(&mut *w)
            } else {
                w.write_all(data)
            };
            r.is_ok()
        }
    };
    let Some(shell) = SHELLS.iter().map(Path::new).find(|p| p.exists()) else {
        let msg = "kata-agent: no shell in the guest image (/bin/bash, /bin/sh)\r\n";
        send(msg.as_bytes());
        if framed {
            let mut w = writer.lock().unwrap_or_else(|e| e.into_inner());
            let _ = Frame::Exit(127).write_to(&mut *w);
        }
        finish(socket, reader);
        return;
    };
    let (master, pid) = match spawn_shell(shell, rows, cols, &term) {
        Ok(x) => x,
        Err(e) => {
            send(format!("kata-agent: cannot start {}: {e}\r\n", shell.display()).as_bytes());
            if framed {
                let mut w = writer.lock().unwrap_or_else(|e| e.into_inner());
                let _ = Frame::Exit(126).write_to(&mut *w);
            }
            finish(socket, reader);
            return;
        }
    };
    let exit_rx = ctx.reaper.register(pid);
    log(&format!(
        "debug console: {} started (pid {pid}, {})",
        shell.display(),
        if framed { "framed" } else { "raw" }
    ));
    if framed {
        let mut w = writer.lock().unwrap_or_else(|e| e.into_inner());
        let _ = Frame::Ready(shell.display().to_string()).write_to(&mut *w);
    }
    let exited = Arc::new(AtomicBool::new(false));
    let mut master_in = match master.try_clone() {
        Ok(m) => m,
        Err(e) => {
            log(&format!("debug console: {e}"));
            kill_session(pid, libc::SIGKILL);
            return;
        }
    };
    if !early.is_empty() {
        let _ = master_in.write_all(&early);
    }
    // Host → shell. Ends when the host goes away (or after the session, when it closes).
    let input = {
        let exited = exited.clone();
        let gone = gone.clone();
        let winsize_fd = master_in.as_raw_fd();
        std::thread::spawn(move || {
            let mut reader = reader;
            if framed {
                while let Ok(Some(frame)) = Frame::read_from(&mut reader) {
                    match frame {
                        Frame::Data(d) if master_in.write_all(&d).is_err() => break,
                        Frame::WindowSize { rows, cols } => set_winsize(winsize_fd, rows, cols),
                        _ => {}
                    }
                }
            } else {
                let mut buf = [0u8; 4096];
                loop {
                    match reader.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if master_in.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                    }
                }
            }
            // The host hung up: end the shell's session, as a terminal hang-up does.
            gone.store(true, Ordering::SeqCst);
            if !exited.load(Ordering::SeqCst) {
                kill_session(pid, libc::SIGHUP);
                std::thread::sleep(Duration::from_secs(2));
                if !exited.load(Ordering::SeqCst) {
                    kill_session(pid, libc::SIGKILL);
                }
            }
            reader
        })
    };
    // Shell → host. Ends when every holder of the pty's slave side is gone (EIO).
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    {
        let mut master = master;
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                match master.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        if !send(&buf[..n]) {
                            break;
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
            let _ = done_tx.send(());
        });
    }
    let status = ctx
        .rt
        .block_on(reaper::wait(exit_rx))
        .map(|e| e.status())
        .unwrap_or(255);
    exited.store(true, Ordering::SeqCst);
    // The shell's output up to its exit, then whatever it left behind in its session.
    if done_rx.recv_timeout(Duration::from_secs(1)).is_err() {
        kill_session_members(pid);
        let _ = done_rx.recv_timeout(Duration::from_secs(1));
    }
    log(&format!(
        "debug console: shell {pid} ended with status {status}"
    ));
    if framed {
        let mut w = writer.lock().unwrap_or_else(|e| e.into_inner());
        let _ = Frame::Exit(status).write_to(&mut *w);
    }
    if let Some(fd) = socket {
        // SAFETY: fd is the connection, still open (writer holds it).
        unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
    }
    // The reader ends when the host disconnects (a framed client does after Exit); a serial
    // port cannot be reopened before that.
    let _ = input.join();
}

fn finish(socket: Option<i32>, reader: Conn) {
    if let Some(fd) = socket {
        // SAFETY: fd is the open connection.
        unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
    }
    drop(reader);
}

/// Starts `shell` on a new pty in its own session; returns the pty's master and the pid.
fn spawn_shell(shell: &Path, rows: u16, cols: u16, term: &str) -> std::io::Result<(File, i32)> {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    let pty = nix::pty::openpty(Some(&ws), None)?;
    let master = File::from(pty.master);
    let slave = File::from(pty.slave);
    let _ = nix::fcntl::fcntl(
        master.as_raw_fd(),
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    );
    let mut cmd = Command::new(shell);
    cmd.env_clear()
        .env("TERM", term)
        .env("HOME", "/root")
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .env("PS1", "[kata-guest \\w]# ")
        .current_dir("/")
        .stdin(Stdio::from(slave.try_clone()?))
        .stdout(Stdio::from(slave.try_clone()?))
        .stderr(Stdio::from(slave));
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn()?;
    Ok((master, child.id() as i32))
}

fn set_winsize(fd: i32, rows: u16, cols: u16) {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: fd is the pty master, ws a valid winsize.
    unsafe { libc::ioctl(fd, libc::TIOCSWINSZ, &ws) };
}

/// Signals the shell's process group (its session leader's).
fn kill_session(pid: i32, sig: i32) {
    // SAFETY: plain kill(2).
    unsafe { libc::kill(-pid, sig) };
}

/// SIGKILLs every process still in the shell's session (background jobs in other process
/// groups included).
fn kill_session_members(sid: i32) {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        if session_of(&stat) == Some(sid) {
            // SAFETY: plain kill(2).
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// The session id field of a /proc/PID/stat line.
fn session_of(stat: &str) -> Option<i32> {
    let after = &stat[stat.rfind(')')? + 1..];
    // state ppid pgrp session
    after.split_whitespace().nth(3)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernel_command_line_turns_it_on() {
        assert_eq!(requested("console=hvc0 agent.log=debug"), None);
        assert_eq!(requested("agent.debug_console"), Some(1026));
        assert_eq!(
            requested("agent.debug_console agent.debug_console_vport=2000"),
            Some(2000)
        );
        assert_eq!(
            requested("agent.debug_console agent.debug_console_vport=x"),
            Some(1026)
        );
        assert_eq!(requested("agent.debug_console_vport=2000"), None);
    }

    #[test]
    fn session_field_of_stat() {
        assert_eq!(session_of("12 (a b) c) S 1 12 12 0 -1"), Some(12));
        assert_eq!(session_of("garbage"), None);
    }
}
