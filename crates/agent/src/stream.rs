//! Output buffers between a process's stdout/stderr and ReadStdout/ReadStderr. A reader thread
//! drains the pipe (or pty) into the buffer, so a process never blocks on a slow host and no byte
//! is lost at exit: the host reads until end of stream.

use std::collections::VecDeque;
use std::io::Read;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

#[derive(Default)]
struct Inner {
    data: VecDeque<u8>,
    eof: bool,
    /// A reader was told end of stream (or no reader needs to be: a closed stream).
    delivered: bool,
}

/// One output stream.
#[derive(Clone, Default)]
pub struct OutputBuffer {
    inner: Arc<Mutex<Inner>>,
    notify: Arc<Notify>,
}

impl std::fmt::Debug for OutputBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OutputBuffer")
    }
}

impl OutputBuffer {
    /// Starts a thread copying `source` into a new buffer until end of file (or EIO, which a pty
    /// master returns once the slave side is closed).
    pub fn pump(mut source: impl Read + Send + 'static) -> Self {
        let buf = OutputBuffer::default();
        let b = buf.clone();
        std::thread::spawn(move || {
            let mut chunk = [0u8; 32 * 1024];
            loop {
                match source.read(&mut chunk) {
                    Ok(0) => break,
                    Ok(n) => b.push(&chunk[..n]),
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(_) => break,
                }
            }
            b.close();
        });
        buf
    }

    /// A buffer that is already at end of stream (a process with no such stream).
    pub fn closed() -> Self {
        let b = OutputBuffer::default();
        b.close();
        b.inner.lock().unwrap_or_else(|e| e.into_inner()).delivered = true;
        b
    }

    /// Whether a reader has been given the end of the stream: nothing more will be read.
    pub fn delivered(&self) -> bool {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .delivered
    }

    fn push(&self, bytes: &[u8]) {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .data
            .extend(bytes);
        self.notify.notify_waiters();
    }

    fn close(&self) {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).eof = true;
        self.notify.notify_waiters();
    }

    /// Waits for data; returns at most `max` bytes, or an empty vector at end of stream.
    pub async fn read(&self, max: usize) -> Vec<u8> {
        let max = max.clamp(1, 1 << 20);
        loop {
            let notified = self.notify.notified();
            {
                let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
                if !g.data.is_empty() {
                    let n = max.min(g.data.len());
                    return g.data.drain(..n).collect();
                }
                if g.eof {
                    g.delivered = true;
                    return Vec::new();
                }
            }
            notified.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn delivers_everything_then_eof() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let buf = OutputBuffer::pump(std::io::Cursor::new(data.clone()));
        assert!(!buf.delivered());
        let mut got = Vec::new();
        loop {
            let chunk = buf.read(7000).await;
            if chunk.is_empty() {
                break;
            }
            assert!(chunk.len() <= 7000);
            got.extend(chunk);
        }
        assert_eq!(got, data);
        assert!(buf.delivered());
        assert!(buf.read(10).await.is_empty(), "EOF is sticky");
        assert!(OutputBuffer::closed().delivered());
        assert!(OutputBuffer::closed().read(1).await.is_empty());
    }
}
