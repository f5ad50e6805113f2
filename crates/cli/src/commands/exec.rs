//! `kata-runtime exec [--kata-debug-port N] <sandbox-id>`: a shell in the sandbox's VM through
//! the agent's debug console (`[agent.kata] debug_console_enabled = true`).
//!
//! The sandbox is found through its shim's monitor socket (`/agent-url`): `vsock://CID:PORT`
//! → vsock `CID:N`; `unix://DIR/agent.sock` (the virtio-serial transport) →
//! `DIR/debug-console.sock`; Kata's `hvsock://PATH:PORT` → `PATH` with `CONNECT N`. The local
//! terminal is put in raw mode and restored on every way out; the command's exit status is the
//! remote shell's.

use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use kata_protocols::console::{decode, hello, Frame, DEBUG_CONSOLE_VPORT};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::termios::{self, SetArg, Termios};

use super::shim_client;

/// How long the console may take to start a shell.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// Arguments of `exec`.
#[derive(Debug, Args)]
pub struct ExecArgs {
    /// The debug console's vsock port in the guest.
    #[arg(long = "kata-debug-port", default_value_t = DEBUG_CONSOLE_VPORT)]
    pub port: u32,
    /// The sandbox (pod) id.
    pub sandbox_id: String,
}

/// Where the console is.
#[derive(Debug, PartialEq, Eq)]
enum Target {
    Vsock { cid: u32, port: u32 },
    Unix(PathBuf),
    HybridVsock { path: PathBuf, port: u32 },
}

/// Maps the agent URL to the console's address.
fn target(agent_url: &str, port: u32) -> Result<Target> {
    if let Some(rest) = agent_url.strip_prefix("vsock://") {
        let cid = rest
            .split(':')
            .next()
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| anyhow!("cannot read the guest's vsock CID from {agent_url:?}"))?;
        return Ok(Target::Vsock { cid, port });
    }
    if let Some(rest) = agent_url.strip_prefix("hvsock://") {
        let path = rest.rsplit_once(':').map(|(p, _)| p).unwrap_or(rest);
        return Ok(Target::HybridVsock {
            path: PathBuf::from(path),
            port,
        });
    }
    if let Some(sock) = agent_url.strip_prefix("unix://") {
        let dir = Path::new(sock)
            .parent()
            .ok_or_else(|| anyhow!("the agent URL {agent_url:?} has no directory"))?;
        return Ok(Target::Unix(
            dir.join(kata_sandbox::sandbox::DEBUG_CONSOLE_SOCKET),
        ));
    }
    bail!("unsupported agent URL {agent_url:?} (expected vsock://, hvsock:// or unix://)")
}

fn not_enabled(id: &str, what: &str, vsock: bool) -> anyhow::Error {
    let port = if vsock {
        ", or pass the port it listens on with --kata-debug-port"
    } else {
        ""
    };
    anyhow!(
        "sandbox {id} has no debug console ({what}): it runs only when [agent.kata] debug_console_enabled = true in the configuration the sandbox started with; set it (sandboxes started afterwards get the console){port}"
    )
}

fn connect(id: &str, t: &Target) -> Result<OwnedFd> {
    match t {
        Target::Unix(path) => {
            if !path.exists() {
                return Err(not_enabled(id, &format!("no {}", path.display()), false));
            }
            let s = UnixStream::connect(path).map_err(|e| {
                not_enabled(
                    id,
                    &format!("cannot connect to {}: {e}", path.display()),
                    false,
                )
            })?;
            Ok(OwnedFd::from(s))
        }
        Target::HybridVsock { path, port } => {
            let mut s = UnixStream::connect(path)
                .with_context(|| format!("connect to the hybrid vsock {}", path.display()))?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            s.write_all(format!("CONNECT {port}\n").as_bytes())?;
            let mut reply = [0u8; 64];
            let n = s.read(&mut reply).unwrap_or(0);
            if !String::from_utf8_lossy(&reply[..n]).starts_with("OK") {
                return Err(not_enabled(id, &format!("vsock port {port} refused"), true));
            }
            s.set_read_timeout(None)?;
            Ok(OwnedFd::from(s))
        }
        Target::Vsock { cid, port } => {
            use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, VsockAddr};
            let s = socket(
                AddressFamily::Vsock,
                SockType::Stream,
                SockFlag::SOCK_CLOEXEC,
                None,
            )
            .context("create a vsock socket (is the vhost_vsock module loaded?)")?;
            connect(s.as_raw_fd(), &VsockAddr::new(*cid, *port))
                .map_err(|e| not_enabled(id, &format!("vsock {cid}:{port}: {e}"), true))?;
            Ok(s)
        }
    }
}

/// The terminal's size, or 24×80.
fn window_size(fd: BorrowedFd<'_>) -> (u16, u16) {
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ fills ws.
    let ok = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCGWINSZ, &mut ws) } == 0;
    if ok && ws.ws_row > 0 && ws.ws_col > 0 {
        (ws.ws_row, ws.ws_col)
    } else {
        (24, 80)
    }
}

/// Puts the terminal back as it was, however the command ends.
struct RawMode {
    saved: Termios,
}

impl RawMode {
    fn enter() -> Option<RawMode> {
        let stdin = std::io::stdin();
        let saved = termios::tcgetattr(stdin.as_fd()).ok()?;
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        termios::tcsetattr(stdin.as_fd(), SetArg::TCSANOW, &raw).ok()?;
        Some(RawMode { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = termios::tcsetattr(std::io::stdin().as_fd(), SetArg::TCSAFLUSH, &self.saved);
    }
}

/// The write end of the signal pipe (the handler only writes the signal number to it).
static SIGNAL_PIPE: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_signal(sig: libc::c_int) {
    let fd = SIGNAL_PIPE.load(Ordering::Relaxed);
    if fd >= 0 {
        let b = sig as u8;
        // SAFETY: write(2) is async-signal-safe; b lives for the call.
        unsafe { libc::write(fd, (&b as *const u8).cast(), 1) };
    }
}

/// A pipe that receives SIGWINCH, SIGTERM, SIGHUP and SIGINT (the last only arrives when the
/// terminal is not in raw mode or from `kill`).
fn signal_pipe() -> Result<OwnedFd> {
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)
        .context("create the signal pipe")?;
    SIGNAL_PIPE.store(w.as_raw_fd(), Ordering::Relaxed);
    std::mem::forget(w);
    for sig in [libc::SIGWINCH, libc::SIGTERM, libc::SIGHUP, libc::SIGINT] {
        // SAFETY: installs a handler that only calls write(2).
        unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
    }
    Ok(r)
}

fn send(conn: &mut std::fs::File, frame: &Frame) -> Result<()> {
    frame
        .write_to(conn)
        .context("write to the debug console (the VM may have stopped)")
}

/// Runs `exec`.
pub fn run(args: ExecArgs) -> Result<ExitCode> {
    let id = args.sandbox_id.as_str();
    let (status, body) = shim_client::request(id, hyper::Method::GET, "/agent-url", Vec::new())?;
    let url = String::from_utf8_lossy(&body).trim().to_string();
    if status != 200 || url.is_empty() {
        bail!("the shim of sandbox {id} did not give its agent URL ({status}: {url})");
    }
    let target = target(&url, args.port)?;
    tracing::debug!(?target, "connecting to the debug console");
    let fd = connect(id, &target)?;
    let mut conn = std::fs::File::from(fd);
    let stdin = std::io::stdin();
    let (rows, cols) = window_size(stdin.as_fd());
    let term = std::env::var("TERM").unwrap_or_else(|_| "vt100".into());
    conn.write_all(hello(rows, cols, &term).as_bytes())
        .context("write to the debug console")?;

    // The console answers Ready once the shell runs.
    let mut buf: Vec<u8> = Vec::new();
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if let Some((frame, used)) = decode(&buf).context("the debug console's reply")? {
            buf.drain(..used);
            match frame {
                Frame::Ready(shell) => {
                    tracing::debug!(shell, "debug console ready");
                    break;
                }
                Frame::Data(d) => std::io::stderr().write_all(&d)?,
                Frame::Exit(code) => {
                    bail!("the debug console could not start a shell (status {code})")
                }
                Frame::WindowSize { .. } => {}
            }
            continue;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let ms = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
        let mut fds = [PollFd::new(conn.as_fd(), PollFlags::POLLIN)];
        if left.is_zero() || poll(&mut fds, PollTimeout::from(ms))? == 0 {
            bail!(
                "the debug console of sandbox {id} did not answer within {} s (over virtio-serial it serves one session at a time: is another 'kata-runtime exec {id}' attached?)",
                READY_TIMEOUT.as_secs()
            );
        }
        let mut chunk = [0u8; 4096];
        match conn.read(&mut chunk)? {
            0 => bail!(
                "the debug console of sandbox {id} closed the connection before a shell started"
            ),
            n => buf.extend_from_slice(&chunk[..n]),
        }
    }

    let signals = signal_pipe()?;
    let raw = RawMode::enter();
    let code = relay(&mut conn, buf, &signals, raw.is_some());
    drop(raw);
    match code {
        Ok(c) => Ok(ExitCode::from((c & 0xff) as u8)),
        Err(e) => Err(e),
    }
}

/// Relays until the remote shell exits (its status) or the connection ends (an error).
fn relay(conn: &mut std::fs::File, mut buf: Vec<u8>, signals: &OwnedFd, tty: bool) -> Result<i32> {
    let stdin = std::io::stdin();
    let mut stdout = std::io::stdout();
    let mut stdin_open = true;
    loop {
        while let Some((frame, used)) = decode(&buf).context("the debug console's frames")? {
            buf.drain(..used);
            match frame {
                Frame::Data(d) => {
                    stdout.write_all(&d)?;
                    stdout.flush()?;
                }
                Frame::Exit(code) => return Ok(code),
                Frame::Ready(_) | Frame::WindowSize { .. } => {}
            }
        }
        let mut fds = vec![
            PollFd::new(conn.as_fd(), PollFlags::POLLIN),
            PollFd::new(signals.as_fd(), PollFlags::POLLIN),
        ];
        if stdin_open {
            fds.push(PollFd::new(stdin.as_fd(), PollFlags::POLLIN));
        }
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
        let ready = |i: usize| {
            fds.get(i)
                .and_then(|f| f.revents())
                .is_some_and(|r| !r.is_empty())
        };
        let (conn_ready, sig_ready, in_ready) = (ready(0), ready(1), ready(2));
        drop(fds);
        if sig_ready {
            let mut sigs = [0u8; 16];
            // SAFETY: reads into sigs from the pipe we own.
            let n =
                unsafe { libc::read(signals.as_raw_fd(), sigs.as_mut_ptr().cast(), sigs.len()) };
            for &s in sigs.iter().take(n.max(0) as usize) {
                let s = i32::from(s);
                if s == libc::SIGWINCH {
                    let (rows, cols) = window_size(stdin.as_fd());
                    send(conn, &Frame::WindowSize { rows, cols })?;
                } else {
                    // The remote session ends with the connection (the agent hangs it up).
                    return Ok(128 + s);
                }
            }
        }
        if conn_ready {
            let mut chunk = [0u8; 8192];
            match conn.read(&mut chunk) {
                Ok(0) => bail!("the debug console closed the connection without an exit status (the VM may have stopped)"),
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e).context("read from the debug console"),
            }
        }
        if in_ready {
            let mut chunk = [0u8; 4096];
            // SAFETY: read(2) into chunk from stdin (not through std's buffered Stdin, which
            // could hold bytes poll cannot see).
            let n = unsafe { libc::read(0, chunk.as_mut_ptr().cast(), chunk.len()) };
            match n {
                n if n > 0 => send(conn, &Frame::Data(chunk[..n as usize].to_vec()))?,
                0 => {
                    // End of input: what Ctrl-D at a terminal sends, once.
                    stdin_open = false;
                    if !tty {
                        send(conn, &Frame::Data(vec![4]))?;
                    }
                }
                _ => {
                    let e = std::io::Error::last_os_error();
                    if e.kind() != std::io::ErrorKind::Interrupted {
                        stdin_open = false;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_urls_map_to_the_console() {
        assert_eq!(
            target("vsock://5:1024", 1026).expect("vsock"),
            Target::Vsock { cid: 5, port: 1026 }
        );
        assert_eq!(
            target("unix:///run/vc/vm/abc/agent.sock", 1026).expect("unix"),
            Target::Unix("/run/vc/vm/abc/debug-console.sock".into())
        );
        assert_eq!(
            target("hvsock:///run/vc/firecracker/x/root/kata.hvsock:1024", 2000).expect("hv"),
            Target::HybridVsock {
                path: "/run/vc/firecracker/x/root/kata.hvsock".into(),
                port: 2000
            }
        );
        assert!(target("vsock://x:1", 1).is_err());
        assert!(target("tcp://1.2.3.4:5", 1).is_err());
    }

    #[test]
    fn a_missing_console_names_the_option() {
        let e = connect(
            "sb",
            &Target::Unix("/nonexistent/debug-console.sock".into()),
        )
        .expect_err("missing");
        let msg = e.to_string();
        assert!(msg.contains("debug_console_enabled = true"), "{msg}");
        assert!(msg.contains("/nonexistent/debug-console.sock"), "{msg}");
    }
}
