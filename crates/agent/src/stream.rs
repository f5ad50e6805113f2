//! Output buffers between a process's stdout/stderr and ReadStdout/ReadStderr. A reader thread
//! drains the pipe (or pty) into the buffer, and no byte is lost at exit: the host reads until
//! end of stream. The buffer is bounded ([`CAPACITY`]): when the host reads slower than the
//! process writes, the thread stops draining, the pipe fills and the process blocks in `write`,
//! as with a pipe to a slow reader. The agent's memory stays bounded whatever a container writes.

use std::collections::VecDeque;
use std::io::Read;
use std::sync::{Arc, Condvar, Mutex};

use tokio::sync::Notify;

/// Bytes buffered per stream before the writer is held back.
pub const CAPACITY: usize = 1 << 20;

#[derive(Default)]
struct Inner {
    data: VecDeque<u8>,
    eof: bool,
    /// A reader was told end of stream (or no reader needs to be: a closed stream).
    delivered: bool,
    /// Nobody will read any more (the process was removed): output is discarded, never waited
    /// on, so the pump thread drains the pipe to its end and exits.
    abandoned: bool,
}

/// One output stream.
#[derive(Clone, Default)]
pub struct OutputBuffer {
    inner: Arc<Mutex<Inner>>,
    notify: Arc<Notify>,
    /// Signalled when a reader made room.
    space: Arc<Condvar>,
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

    /// Appends `bytes`, first waiting (in the pump thread) while the buffer is full.
    fn push(&self, bytes: &[u8]) {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        while g.data.len() >= CAPACITY && !g.abandoned {
            g = self.space.wait(g).unwrap_or_else(|e| e.into_inner());
        }
        if g.abandoned {
            return;
        }
        g.data.extend(bytes);
        drop(g);
        self.notify.notify_waiters();
    }

    /// Nobody will read this stream any more: drop what is buffered and let the pump thread
    /// discard the rest of the output instead of waiting for room.
    pub fn abandon(&self) {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.abandoned = true;
        g.data = VecDeque::new();
        drop(g);
        self.space.notify_all();
    }

    /// Bytes buffered now.
    #[cfg(test)]
    fn buffered(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .data
            .len()
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
                    let out: Vec<u8> = g.data.drain(..n).collect();
                    if g.data.len() < CAPACITY {
                        self.space.notify_all();
                    }
                    if g.data.is_empty() {
                        // Give the memory of a burst back.
                        g.data.shrink_to(64 * 1024);
                    }
                    return out;
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

    /// A source that counts what the pump took from it.
    struct Counting {
        left: usize,
        taken: Arc<std::sync::atomic::AtomicUsize>,
    }

    impl Read for Counting {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = buf.len().min(self.left);
            buf[..n].fill(b'x');
            self.left -= n;
            self.taken.fetch_add(n, std::sync::atomic::Ordering::SeqCst);
            Ok(n)
        }
    }

    #[tokio::test]
    async fn a_slow_reader_holds_the_writer_back_and_loses_nothing() {
        let total = 8 * CAPACITY;
        let taken = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let buf = OutputBuffer::pump(Counting {
            left: total,
            taken: taken.clone(),
        });
        // Nobody reads: the pump stops at the capacity (plus at most one chunk).
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        let held = taken.load(std::sync::atomic::Ordering::SeqCst);
        assert!(
            held <= CAPACITY + 32 * 1024,
            "took {held} bytes with no reader"
        );
        assert!(buf.buffered() <= CAPACITY + 32 * 1024);
        // A slow reader gets every byte, and the buffer never grows past the bound.
        let mut got = 0;
        loop {
            let chunk = buf.read(100_000).await;
            if chunk.is_empty() {
                break;
            }
            assert!(chunk.iter().all(|&b| b == b'x'));
            got += chunk.len();
            assert!(buf.buffered() <= CAPACITY + 32 * 1024);
        }
        assert_eq!(got, total);
    }

    #[tokio::test]
    async fn an_abandoned_stream_is_drained_to_its_end() {
        let taken = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let total = 4 * CAPACITY;
        let buf = OutputBuffer::pump(Counting {
            left: total,
            taken: taken.clone(),
        });
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert!(taken.load(std::sync::atomic::Ordering::SeqCst) < total);
        buf.abandon();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while taken.load(std::sync::atomic::Ordering::SeqCst) < total {
            assert!(
                std::time::Instant::now() < deadline,
                "the pump stayed blocked"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(buf.buffered(), 0);
    }
}
