//! An async QMP client: one command at a time over QEMU's monitor socket; events are
//! collected, not interleaved with replies.

use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

/// QMP errors.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// Connecting or talking failed.
    #[error("QMP socket {path}")]
    Io {
        /// Socket.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// QEMU closed the socket.
    #[error("QEMU closed the QMP connection")]
    Closed,
    /// A reply that is not JSON or not QMP.
    #[error("invalid QMP message: {0}")]
    Protocol(String),
    /// QEMU answered with an error.
    #[error("QMP command {command} failed: {class}: {desc}")]
    Command {
        /// Command.
        command: String,
        /// Error class.
        class: String,
        /// Description.
        desc: String,
    },
    /// No answer in time.
    #[error("QMP command {0} timed out")]
    Timeout(String),
}

/// A connected, negotiated QMP session.
#[derive(Debug)]
pub struct Qmp {
    path: String,
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    /// Asynchronous events received so far.
    pub events: Vec<Value>,
}

impl Qmp {
    /// Connects and leaves capabilities-negotiation mode.
    pub async fn connect(path: &Path) -> Result<Self, QmpError> {
        let p = path.display().to_string();
        let stream = UnixStream::connect(path)
            .await
            .map_err(|source| QmpError::Io {
                path: p.clone(),
                source,
            })?;
        let (r, w) = stream.into_split();
        let mut qmp = Qmp {
            path: p,
            reader: BufReader::new(r),
            writer: w,
            events: Vec::new(),
        };
        let greeting = qmp.read_message().await?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Protocol(format!(
                "expected the QMP greeting, got {greeting}"
            )));
        }
        qmp.execute("qmp_capabilities", None).await?;
        Ok(qmp)
    }

    async fn read_message(&mut self) -> Result<Value, QmpError> {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .await
            .map_err(|source| QmpError::Io {
                path: self.path.clone(),
                source,
            })?;
        if n == 0 {
            return Err(QmpError::Closed);
        }
        parse_message(&line)
    }

    /// Runs a command and returns its `return` value.
    pub async fn execute(
        &mut self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, QmpError> {
        let mut msg = json!({ "execute": command });
        if let Some(args) = arguments {
            msg["arguments"] = args;
        }
        let mut text = msg.to_string();
        text.push('\n');
        self.writer
            .write_all(text.as_bytes())
            .await
            .map_err(|source| QmpError::Io {
                path: self.path.clone(),
                source,
            })?;
        self.read_reply(command).await
    }

    /// Runs a command with descriptor `fd` attached to it (SCM_RIGHTS), as `getfd` and
    /// `add-fd` need: the descriptor travels with the command's first byte.
    pub async fn execute_with_fd(
        &mut self,
        command: &str,
        arguments: Value,
        fd: std::os::fd::RawFd,
    ) -> Result<Value, QmpError> {
        use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags, UnixAddr};
        use std::os::fd::AsRawFd;
        let mut text = json!({ "execute": command, "arguments": arguments }).to_string();
        text.push('\n');
        let io_err = |path: &str, source: std::io::Error| QmpError::Io {
            path: path.to_string(),
            source,
        };
        let stream: &UnixStream = self.writer.as_ref();
        let sent = loop {
            stream.writable().await.map_err(|e| io_err(&self.path, e))?;
            let r = stream.try_io(tokio::io::Interest::WRITABLE, || {
                let iov = [std::io::IoSlice::new(text.as_bytes())];
                let fds = [fd];
                sendmsg::<UnixAddr>(
                    stream.as_raw_fd(),
                    &iov,
                    &[ControlMessage::ScmRights(&fds)],
                    MsgFlags::MSG_NOSIGNAL,
                    None,
                )
                .map_err(std::io::Error::from)
            });
            match r {
                Ok(n) => break n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(io_err(&self.path, e)),
            }
        };
        if sent < text.len() {
            self.writer
                .write_all(&text.as_bytes()[sent..])
                .await
                .map_err(|e| io_err(&self.path, e))?;
        }
        self.read_reply(command).await
    }

    /// Reads until the reply to `command` (keeping the events that come first).
    async fn read_reply(&mut self, command: &str) -> Result<Value, QmpError> {
        let fut = async {
            loop {
                let m = self.read_message().await?;
                if m.get("event").is_some() {
                    self.events.push(m);
                    continue;
                }
                return reply(command, m);
            }
        };
        tokio::time::timeout(Duration::from_secs(30), fut)
            .await
            .map_err(|_| QmpError::Timeout(command.to_string()))?
    }
}

/// Parses one QMP line.
pub fn parse_message(line: &str) -> Result<Value, QmpError> {
    let v: Value = serde_json::from_str(line.trim()).map_err(|e| {
        QmpError::Protocol(format!(
            "{e}: {:?}",
            line.chars().take(200).collect::<String>()
        ))
    })?;
    if !v.is_object() {
        return Err(QmpError::Protocol(format!("not an object: {v}")));
    }
    Ok(v)
}

/// Interprets a reply to `command`.
pub fn reply(command: &str, m: Value) -> Result<Value, QmpError> {
    if let Some(r) = m.get("return") {
        return Ok(r.clone());
    }
    if let Some(e) = m.get("error") {
        let s = |k: &str| e.get(k).and_then(Value::as_str).unwrap_or("").to_string();
        return Err(QmpError::Command {
            command: command.to_string(),
            class: s("class"),
            desc: s("desc"),
        });
    }
    Err(QmpError::Protocol(format!(
        "unexpected reply to {command}: {m}"
    )))
}

/// A CPU slot QEMU can hot-plug.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HotpluggableCpu {
    /// Driver (`device_add` type).
    pub driver: String,
    /// Socket, core, thread and die ids.
    pub props: serde_json::Map<String, Value>,
    /// QOM path when plugged.
    pub qom_path: Option<String>,
}

/// Parses `query-hotpluggable-cpus`.
pub fn parse_hotpluggable_cpus(v: &Value) -> Result<Vec<HotpluggableCpu>, QmpError> {
    let list = v
        .as_array()
        .ok_or_else(|| QmpError::Protocol(format!("query-hotpluggable-cpus: not a list: {v}")))?;
    list.iter()
        .map(|c| {
            Ok(HotpluggableCpu {
                driver: c
                    .get("type")
                    .and_then(Value::as_str)
                    .ok_or_else(|| QmpError::Protocol(format!("cpu without type: {c}")))?
                    .to_string(),
                props: c
                    .get("props")
                    .and_then(Value::as_object)
                    .cloned()
                    .unwrap_or_default(),
                qom_path: c
                    .get("qom-path")
                    .and_then(Value::as_str)
                    .map(str::to_string),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A QMP peer that greets, accepts capabilities, then receives one command with a
    /// descriptor attached and writes "through" it.
    #[tokio::test]
    async fn a_descriptor_travels_with_its_command() {
        use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags, UnixAddr};
        use std::io::Read;
        use std::os::fd::{AsRawFd, FromRawFd};
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("qmp.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).expect("bind");
        let peer = std::thread::spawn(move || {
            use std::io::{BufRead, Write};
            let (mut s, _) = listener.accept().expect("accept");
            s.write_all(b"{\"QMP\": {}}\n").expect("greet");
            let mut r = std::io::BufReader::new(s.try_clone().expect("clone"));
            let mut line = String::new();
            r.read_line(&mut line).expect("capabilities");
            s.write_all(b"{\"return\": {}}\n").expect("reply");
            let mut buf = [0u8; 256];
            let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
            let mut iov = [std::io::IoSliceMut::new(&mut buf)];
            let msg =
                recvmsg::<UnixAddr>(s.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::empty())
                    .expect("recvmsg");
            let fds: Vec<i32> = msg
                .cmsgs()
                .expect("cmsgs")
                .filter_map(|c| match c {
                    ControlMessageOwned::ScmRights(f) => Some(f),
                    _ => None,
                })
                .flatten()
                .collect();
            let n = msg.bytes;
            let text = String::from_utf8_lossy(&buf[..n]).to_string();
            assert_eq!(fds.len(), 1, "one descriptor with {text}");
            // SAFETY: the descriptor was just received and is owned here.
            let mut f = unsafe { std::fs::File::from_raw_fd(fds[0]) };
            f.write_all(b"through the fd").expect("write through it");
            s.write_all(b"{\"return\": {}}\n").expect("reply");
            text
        });
        let mut q = Qmp::connect(&path).await.expect("connect");
        let (mut rd, wr) = std::os::unix::net::UnixStream::pair().expect("pair");
        q.execute_with_fd("getfd", json!({"fdname": "fd-net0"}), wr.as_raw_fd())
            .await
            .expect("getfd");
        drop(wr);
        let text = peer.join().expect("peer");
        assert!(
            text.contains("\"getfd\"") && text.contains("fd-net0"),
            "{text}"
        );
        let mut got = [0u8; 14];
        rd.read_exact(&mut got).expect("read");
        assert_eq!(&got, b"through the fd");
    }

    #[test]
    fn replies_and_errors() {
        assert_eq!(
            reply("x", json!({"return": {"a": 1}})).expect("ok"),
            json!({"a": 1})
        );
        let e = reply(
            "device_add",
            json!({"error": {"class": "GenericError", "desc": "boom"}}),
        )
        .expect_err("err");
        assert_eq!(
            e.to_string(),
            "QMP command device_add failed: GenericError: boom"
        );
        assert!(reply("x", json!({"foo": 1})).is_err());
        assert!(parse_message("not json").is_err());
        assert!(parse_message("[1]").is_err());
    }

    #[test]
    fn hotpluggable_cpus() {
        let v = json!([
            {"props": {"core-id": 0, "thread-id": 0, "socket-id": 1}, "vcpus-count": 1, "type": "max-x86_64-cpu"},
            {"props": {"core-id": 0, "thread-id": 0, "socket-id": 0}, "vcpus-count": 1, "qom-path": "/machine/unattached/device[0]", "type": "max-x86_64-cpu"}
        ]);
        let cpus = parse_hotpluggable_cpus(&v).expect("parse");
        assert_eq!(cpus.len(), 2);
        assert!(cpus[0].qom_path.is_none() && cpus[1].qom_path.is_some());
        assert_eq!(cpus[0].props["socket-id"], 1);
        assert!(parse_hotpluggable_cpus(&json!({})).is_err());
        assert!(parse_hotpluggable_cpus(&json!([{"props": {}}])).is_err());
    }
}
