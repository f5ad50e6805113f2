//! The agent channel: a virtio-serial port named [`SERIAL_PORT_NAME`] when the VM has one,
//! otherwise AF_VSOCK port [`VSOCK_PORT`]. A serial port is one byte stream: it is served as one
//! ttrpc connection at a time and reopened when the host disconnects.

use std::fs::{File, OpenOptions};
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

/// A non-blocking serial port as a tokio stream.
pub struct SerialStream {
    fd: AsyncFd<File>,
}

impl SerialStream {
    /// Opens the port read-write, non-blocking.
    pub fn open(path: &PathBuf) -> std::io::Result<Self> {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(path)?;
        // SAFETY: the File owns its fd and lives inside the AsyncFd until it is dropped.
        let fd = unsafe { AsyncFd::register(f) }.map_err(|e| e.into_parts().1)?;
        Ok(SerialStream { fd })
    }
}

impl AsyncRead for SerialStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        loop {
            let mut guard = match self.fd.poll_read_ready(cx) {
                Poll::Ready(g) => g?,
                Poll::Pending => return Poll::Pending,
            };
            let unfilled = buf.initialize_unfilled();
            match guard.try_io(|f| f.get_ref().read(unfilled)) {
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
        // Each "accept" opens the port; the port only opens once, so wait while the previous
        // connection still holds it, and pace reconnects while the host is away (reads then
        // return EOF at once).
        let stream = async_stream(port);
        return Ok((Listener::new(stream), desc));
    }
    let listener = Listener::bind(format!("vsock://-1:{VSOCK_PORT}"))?;
    Ok((listener, format!("vsock port {VSOCK_PORT}")))
}

fn async_stream(
    port: PathBuf,
) -> impl futures_core::Stream<Item = std::io::Result<SerialStream>> + Send + 'static {
    futures_util::stream::unfold((port, true), |(port, first)| async move {
        if !first {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        loop {
            match SerialStream::open(&port) {
                Ok(s) => return Some((Ok(s), (port, false))),
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
                Err(e) => return Some((Err(e), (port, false))),
            }
        }
    })
}
