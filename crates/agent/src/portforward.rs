//! Port forwarding (the kubelet's `port-forward`, relayed by the runtime): TCP connections from
//! the guest's loopback to a port of the pod, in the network namespace the pod's containers
//! share, held by id while the runtime relays their bytes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

use crate::container::AgentError;

/// At most this many connections at once.
pub const MAX_CONNECTIONS: usize = 1024;
/// The largest read answered at once.
pub const MAX_READ: usize = 256 * 1024;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

struct Conn {
    reader: tokio::sync::Mutex<OwnedReadHalf>,
    writer: tokio::sync::Mutex<Option<OwnedWriteHalf>>,
}

/// The open connections.
#[derive(Default)]
pub struct Forwards {
    next: AtomicU64,
    conns: Mutex<HashMap<u64, Arc<Conn>>>,
}

impl std::fmt::Debug for Forwards {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forwards")
            .field("open", &self.conns.lock().map(|c| c.len()).unwrap_or(0))
            .finish()
    }
}

fn gone(id: u64) -> AgentError {
    AgentError::NotFound(format!("no port-forward connection {id}"))
}

impl Forwards {
    fn get(&self, id: u64) -> Result<Arc<Conn>, AgentError> {
        self.conns
            .lock()
            .map_err(|_| AgentError::Failed("port-forward table poisoned".into()))?
            .get(&id)
            .cloned()
            .ok_or_else(|| gone(id))
    }

    /// Connects to `port` on the guest's loopback (127.0.0.1, then ::1); returns its id.
    pub async fn open(&self, port: u32) -> Result<u64, AgentError> {
        let port = u16::try_from(port)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| AgentError::Invalid(format!("port {port} is not a TCP port")))?;
        if self.conns.lock().map(|c| c.len()).unwrap_or(0) >= MAX_CONNECTIONS {
            return Err(AgentError::Failed(format!(
                "{MAX_CONNECTIONS} port-forward connections are open already"
            )));
        }
        let connect = |addr: &'static str| async move {
            match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect((addr, port))).await {
                Ok(r) => r,
                Err(_) => Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "no answer in 5 s",
                )),
            }
        };
        let stream = match connect("127.0.0.1").await {
            Ok(s) => s,
            Err(v4) => connect("::1").await.map_err(|_| {
                AgentError::Failed(format!(
                    "connect to port {port} in the pod (guest loopback): {v4}"
                ))
            })?,
        };
        let _ = stream.set_nodelay(true);
        let (r, w) = stream.into_split();
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let conn = Arc::new(Conn {
            reader: tokio::sync::Mutex::new(r),
            writer: tokio::sync::Mutex::new(Some(w)),
        });
        self.conns
            .lock()
            .map_err(|_| AgentError::Failed("port-forward table poisoned".into()))?
            .insert(id, conn);
        Ok(id)
    }

    /// Writes all of `data`; empty `data` closes the connection for writing.
    pub async fn write(&self, id: u64, data: &[u8]) -> Result<(), AgentError> {
        let conn = self.get(id)?;
        let mut w = conn.writer.lock().await;
        if data.is_empty() {
            if let Some(mut w) = w.take() {
                let _ = w.shutdown().await;
            }
            return Ok(());
        }
        let Some(w) = w.as_mut() else {
            return Err(AgentError::Invalid(format!(
                "port-forward connection {id} is closed for writing"
            )));
        };
        w.write_all(data)
            .await
            .map_err(|e| AgentError::Failed(format!("port-forward {id}: write: {e}")))
    }

    /// Waits for the next bytes (at most `len`); empty once the guest side closed.
    pub async fn read(&self, id: u64, len: u32) -> Result<Vec<u8>, AgentError> {
        let conn = self.get(id)?;
        let mut r = conn.reader.lock().await;
        let mut buf = vec![0; (len as usize).clamp(1, MAX_READ)];
        match r.read(&mut buf).await {
            Ok(n) => {
                buf.truncate(n);
                Ok(buf)
            }
            // A reset ends the stream as a close does.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(Vec::new()),
            Err(e) => Err(AgentError::Failed(format!("port-forward {id}: read: {e}"))),
        }
    }

    /// Forgets a connection (closing it); an unknown id is fine.
    pub fn close(&self, id: u64) {
        if let Ok(mut c) = self.conns.lock() {
            c.remove(&id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn relays_both_ways_and_closes_each_direction() {
        let server = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = server.local_addr().expect("addr").port();
        let echo = tokio::spawn(async move {
            let (mut s, _) = server.accept().await.expect("accept");
            let mut got = Vec::new();
            s.read_to_end(&mut got).await.expect("read");
            s.write_all(&got).await.expect("write");
            s.write_all(b"!").await.expect("write");
        });
        let f = Forwards::default();
        let id = f.open(u32::from(port)).await.expect("open");
        f.write(id, b"ping").await.expect("write");
        f.write(id, b"").await.expect("half-close");
        assert!(f.write(id, b"more").await.is_err());
        let mut got = Vec::new();
        loop {
            let d = f.read(id, 3).await.expect("read");
            if d.is_empty() {
                break;
            }
            got.extend(d);
        }
        assert_eq!(got, b"ping!");
        echo.await.expect("echo");
        f.close(id);
        assert!(matches!(f.read(id, 1).await, Err(AgentError::NotFound(_))));
        assert!(matches!(f.open(0).await, Err(AgentError::Invalid(_))));
        assert!(matches!(f.open(70000).await, Err(AgentError::Invalid(_))));
    }
}
