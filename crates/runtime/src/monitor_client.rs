//! A client of a shim's monitor socket (`/run/vc/sbs/<sandbox-id>/shim-monitor.sock`): one
//! HTTP/1.1 request over the unix socket. Used by `kata-runtime` and `kata-monitor`.

use std::path::Path;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

/// Errors of a request.
#[derive(Debug, thiserror::Error)]
pub enum MonitorClientError {
    /// The socket did not accept the connection.
    #[error("connect to {path}")]
    Connect {
        /// The socket.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The HTTP exchange failed.
    #[error("HTTP request {uri} on {path}")]
    Http {
        /// The socket.
        path: String,
        /// The request URI.
        uri: String,
        /// Cause.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// Sends `method uri` (path and query) with `body`; returns the status and the body.
pub async fn request(
    sock: &Path,
    method: hyper::Method,
    uri: &str,
    body: Vec<u8>,
) -> Result<(u16, Vec<u8>), MonitorClientError> {
    let path = sock.display().to_string();
    let http = |source: Box<dyn std::error::Error + Send + Sync>| MonitorClientError::Http {
        path: path.clone(),
        uri: uri.to_string(),
        source,
    };
    let stream = tokio::net::UnixStream::connect(sock)
        .await
        .map_err(|source| MonitorClientError::Connect {
            path: path.clone(),
            source,
        })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| http(Box::new(e)))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = hyper::Request::builder()
        .method(method)
        .uri(uri)
        .header(hyper::header::HOST, "shim")
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| http(Box::new(e)))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| http(Box::new(e)))?;
    let status = resp.status().as_u16();
    let bytes = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| http(Box::new(e)))?
        .to_bytes();
    Ok((status, bytes.to_vec()))
}
