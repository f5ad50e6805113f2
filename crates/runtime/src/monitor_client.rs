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

/// The value of query parameter `key`, percent-decoded.
pub fn query_param(query: Option<&str>, key: &str) -> Option<String> {
    query?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (k == key).then(|| percent_decode(v))
    })
}

/// Decodes `%XX` escapes and `+` (a space); a malformed escape stays as it is.
pub fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let escaped = (b[i] == b'%')
            .then(|| b.get(i + 1..i + 3))
            .flatten()
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (escaped, b[i]) {
            (Some(v), _) => {
                out.push(v);
                i += 3;
            }
            (None, b'+') => {
                out.push(b' ');
                i += 1;
            }
            (None, c) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).to_string()
}

/// Percent-encodes a query value (all but unreserved characters and `/`).
pub fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_parameters_are_found_and_decoded() {
        assert_eq!(
            query_param(Some("sandbox=abc"), "sandbox").as_deref(),
            Some("abc")
        );
        assert_eq!(
            query_param(
                Some("x=1&filter_family=kata_guest%2Ckata_hyp"),
                "filter_family"
            )
            .as_deref(),
            Some("kata_guest,kata_hyp")
        );
        assert_eq!(
            query_param(Some("path=%2Fdev%2Floop3&x=1"), "path").as_deref(),
            Some("/dev/loop3")
        );
        assert_eq!(query_param(Some("x=1"), "sandbox"), None);
        assert_eq!(query_param(None, "sandbox"), None);
        assert_eq!(percent_decode("a%2"), "a%2");
        assert_eq!(percent_decode("%zz"), "%zz");
        assert_eq!(percent_decode("%"), "%");
        assert_eq!(percent_decode("a+b%20c"), "a b c");
    }

    #[test]
    fn encoding_round_trips() {
        assert_eq!(percent_encode("/dev/loop3"), "/dev/loop3");
        assert_eq!(
            percent_encode("/dev/disk/by-id/a b&c"),
            "/dev/disk/by-id/a%20b%26c"
        );
        for s in ["/dev/disk/by-id/a b&c+d%e", "ünï"] {
            assert_eq!(percent_decode(&percent_encode(s)), s);
        }
    }
}
