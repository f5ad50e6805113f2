//! The agent channel: a virtio-serial port named [`SERIAL_PORT_NAME`] when the VM has one,
//! otherwise AF_VSOCK port [`VSOCK_PORT`]. A serial port is one byte stream: it is served as one
//! ttrpc connection at a time, a new one after the host disconnects. The port itself stays open
//! for good: closing it would make the guest's driver discard what a host that reconnected
//! quickly has already sent (a VM handed from the VMCache server to a sandbox, a template's
//! clone), and that host would wait for an answer forever.
//!
//! "The host is gone" is a read that returns 0, which the driver answers from its idea of the
//! host's state. That idea lags: the driver learns of a (re)connection from a control message,
//! handled apart from the data, so a host that connects and sends at once can have its request
//! read while the port still says "disconnected". A read of 0 therefore ends a connection only
//! once it has lasted [`HANGUP_GRACE`]; until then the port is checked again.

use std::fs::{File, OpenOptions};
use std::future::Future;
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::pin::Pin;
use std::task::{Context, Poll};

use kata_protocols::{SERIAL_PORT_NAME, VSOCK_PORT};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use ttrpc::asynchronous::transport::Listener;

/// Finds `/dev/vportNpM` by its name in sysfs.
pub fn find_serial_port(name: &str) -> Option<PathBuf> {
    for entry in std::fs::read_dir("/sys/class/virtio-ports").ok()?.flatten() {
        let n = std::fs::read_to_string(entry.path().join("name")).unwrap_or_default();
        if n.trim() == name {
            return Some(PathBuf::from("/dev").join(entry.file_name()));
        }
    }
    None
}

/// How long a port must keep saying "the host is gone" before the connection ends.
pub const HANGUP_GRACE: std::time::Duration = std::time::Duration::from_millis(250);
/// How often the port is checked again meanwhile.
const HANGUP_RECHECK: std::time::Duration = std::time::Duration::from_millis(10);

/// A non-blocking serial port as a tokio stream: one connection's view of the port (a
/// duplicate of the descriptor the agent keeps open).
pub struct SerialStream {
    fd: AsyncFd<File>,
    /// Since when reads have returned 0, and the timer of the next check.
    hangup: Option<(tokio::time::Instant, Pin<Box<tokio::time::Sleep>>)>,
    /// Dropped with the connection: the listener then serves the next one.
    _done: tokio::sync::oneshot::Sender<()>,
}

/// Opens the port read-write, non-blocking.
fn open_port(path: &PathBuf) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
}

impl SerialStream {
    /// A connection on `port` (a duplicate of its descriptor); `done` is dropped with it.
    fn new(port: &File, done: tokio::sync::oneshot::Sender<()>) -> std::io::Result<Self> {
        let f = port.try_clone()?;
        // SAFETY: the File owns its fd and lives inside the AsyncFd until it is dropped.
        let fd = unsafe { AsyncFd::register(f) }.map_err(|e| e.into_parts().1)?;
        Ok(SerialStream {
            fd,
            hangup: None,
            _done: done,
        })
    }
}

impl AsyncRead for SerialStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        loop {
            if let Some((_, timer)) = &mut this.hangup {
                // Between two checks of a port that said "the host is gone".
                if timer.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                let mut f = this.fd.get_ref();
                let unfilled = buf.initialize_unfilled();
                match f.read(unfilled) {
                    Ok(0) => {
                        let since = this.hangup.as_ref().map(|(s, _)| *s);
                        if since.is_some_and(|s| s.elapsed() >= HANGUP_GRACE) {
                            this.hangup = None;
                            return Poll::Ready(Ok(()));
                        }
                        if let Some((_, timer)) = &mut this.hangup {
                            timer
                                .as_mut()
                                .reset(tokio::time::Instant::now() + HANGUP_RECHECK);
                        }
                        continue;
                    }
                    Ok(n) => {
                        this.hangup = None;
                        buf.advance(n);
                        return Poll::Ready(Ok(()));
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        // The host is there after all: wait for its data.
                        this.hangup = None;
                        continue;
                    }
                    Err(e) => return Poll::Ready(Err(e)),
                }
            }
            let mut guard = match this.fd.poll_read_ready(cx) {
                Poll::Ready(g) => g?,
                Poll::Pending => return Poll::Pending,
            };
            let unfilled = buf.initialize_unfilled();
            match guard.try_io(|f| f.get_ref().read(unfilled)) {
                Ok(Ok(0)) => {
                    let now = tokio::time::Instant::now();
                    this.hangup = Some((now, Box::pin(tokio::time::sleep(HANGUP_RECHECK))));
                    continue;
                }
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for SerialStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        loop {
            let mut guard = match self.fd.poll_write_ready(cx) {
                Poll::Ready(g) => g?,
                Poll::Pending => return Poll::Pending,
            };
            match guard.try_io(|f| f.get_ref().write(buf)) {
                Ok(r) => return Poll::Ready(r),
                Err(_would_block) => continue,
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// The listener the ttrpc server accepts from, and a description of it.
pub fn listener() -> std::io::Result<(Listener, String)> {
    if let Some(port) = find_serial_port(SERIAL_PORT_NAME) {
        let desc = format!("virtio-serial {}", port.display());
        // One connection at a time: each "accept" waits until the previous connection is
        // gone, and reconnects are paced while the host is away (reads then return EOF at
        // once).
        let port = open_port(&port)?;
        let stream = async_stream(port);
        return Ok((Listener::new(stream), desc));
    }
    let listener = Listener::bind(format!("vsock://-1:{VSOCK_PORT}"))?;
    Ok((listener, format!("vsock port {VSOCK_PORT}")))
}

fn async_stream(
    port: File,
) -> impl futures_core::Stream<Item = std::io::Result<SerialStream>> + Send + 'static {
    type Previous = Option<tokio::sync::oneshot::Receiver<()>>;
    futures_util::stream::unfold(
        (port, None::<tokio::sync::oneshot::Receiver<()>>),
        |(port, previous): (File, Previous)| async move {
            if let Some(done) = previous {
                // The previous connection ends when the host goes away (EOF).
                let _ = done.await;
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            let (tx, rx) = tokio::sync::oneshot::channel();
            let next = SerialStream::new(&port, tx);
            Some((next, (port, Some(rx))))
        },
    )
}
