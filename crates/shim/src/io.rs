//! containerd's FIFOs bridged to the agent's streams. stdout and stderr are copied to the end
//! of stream before a process's exit is reported, so no output is lost.

use std::sync::Arc;

use kata_sandbox::Sandbox;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinHandle;

/// FIFO paths of a process.
#[derive(Debug, Clone, Default)]
pub struct StdioPaths {
    /// stdin FIFO (empty: none).
    pub stdin: String,
    /// stdout FIFO.
    pub stdout: String,
    /// stderr FIFO.
    pub stderr: String,
    /// A terminal (stderr goes to stdout).
    pub terminal: bool,
}

async fn open_fifo(path: &str, write: bool) -> Option<tokio::fs::File> {
    let p = path.to_string();
    // Output FIFOs are opened read-write, as containerd's own shims do: the open does not wait
    // for a reader, and a reader that goes away (`ctr run -d`) does not break the FIFO for the
    // next one (`ctr task attach`). stdin is opened read-only, which waits for a writer: on a
    // blocking thread.
    let f = tokio::task::spawn_blocking(move || {
        std::fs::OpenOptions::new().read(true).write(write).open(p)
    })
    .await
    .ok()?;
    match f {
        Ok(f) => Some(tokio::fs::File::from_std(f)),
        Err(e) => {
            tracing::warn!(path, error = %e, "cannot open FIFO");
            None
        }
    }
}

async fn copy_out(sb: Arc<Sandbox>, cid: String, exec_id: String, path: String, stderr: bool) {
    let mut fifo = if path.is_empty() {
        None
    } else {
        open_fifo(&path, true).await
    };
    loop {
        match sb.read_output(&cid, &exec_id, stderr).await {
            Ok(data) if !data.is_empty() => {
                if let Some(f) = fifo.as_mut() {
                    if f.write_all(&data).await.is_err() {
                        fifo = None; // the reader went away; keep draining
                    }
                }
            }
            _ => break,
        }
    }
    if let Some(mut f) = fifo {
        let _ = f.flush().await;
    }
}

async fn copy_in(sb: Arc<Sandbox>, cid: String, exec_id: String, path: String) {
    if let Some(mut fifo) = open_fifo(&path, false).await {
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            match fifo.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if sb
                        .write_stdin(&cid, &exec_id, buf[..n].to_vec())
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
            }
        }
    }
    let _ = sb.close_stdin(&cid, &exec_id).await;
}

/// The copy tasks of one process.
#[derive(Debug)]
pub struct IoTasks {
    /// Completes when stdout and stderr reached end of stream.
    pub output: JoinHandle<()>,
    /// Copies stdin until EOF, then closes the process's stdin.
    pub input: Option<JoinHandle<()>>,
}

/// Starts copying a process's stdio.
pub fn start(sb: &Arc<Sandbox>, cid: &str, exec_id: &str, paths: &StdioPaths) -> IoTasks {
    let out = tokio::spawn(copy_out(
        sb.clone(),
        cid.into(),
        exec_id.into(),
        paths.stdout.clone(),
        false,
    ));
    let err = (!paths.terminal).then(|| {
        tokio::spawn(copy_out(
            sb.clone(),
            cid.into(),
            exec_id.into(),
            paths.stderr.clone(),
            true,
        ))
    });
    let output = tokio::spawn(async move {
        let _ = out.await;
        if let Some(e) = err {
            let _ = e.await;
        }
    });
    let input = if paths.stdin.is_empty() {
        let (sb, cid, eid) = (sb.clone(), cid.to_string(), exec_id.to_string());
        tokio::spawn(async move {
            let _ = sb.close_stdin(&cid, &eid).await;
        });
        None
    } else {
        Some(tokio::spawn(copy_in(
            sb.clone(),
            cid.into(),
            exec_id.into(),
            paths.stdin.clone(),
        )))
    };
    IoTasks { output, input }
}
