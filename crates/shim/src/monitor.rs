//! The shim's monitor socket: HTTP over the unix socket
//! `/run/vc/sbs/<sandbox-id>/shim-monitor.sock` (Kata 3.0's path; mode 0600, its directory
//! 0700), which `kata-runtime metrics` and `kata-monitor` read.
//!
//! Routes (see docs/monitoring.md): `GET /metrics` (Prometheus text), `GET /agent-url` (how
//! the host reaches the agent), `/iptables` and `/ip6tables` (GET, PUT), `/direct-volume/stats`
//! and `/direct-volume/resize`. An unknown path answers 404, a known path with another method
//! 405 with an `Allow` header. The route table is [`ROUTES`]; a handler never fails the pod.

use std::convert::Infallible;
use std::os::unix::fs::PermissionsExt;
#[cfg(test)]
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;

use crate::service::Service;

use crate::error::{invalid, step, ShimError};
use kata_sandbox::monitor_client::query_param;
pub use kata_sandbox::sandbox::{monitor_socket as socket_path, MONITOR_DIR as SANDBOXES_DIR};

/// A route: its path and the methods it answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// `/metrics`.
    Metrics,
    /// `/agent-url`.
    AgentUrl,
    /// `/iptables` (false) and `/ip6tables` (true): GET the rules, PUT new ones.
    IpTables(bool),
    /// `/direct-volume/stats?path=<device>`: a direct volume's statfs in the guest (JSON).
    VolumeStats,
    /// `/direct-volume/resize` with `{"VolumePath": <device>, "Size": <bytes>}`.
    VolumeResize,
}

/// The route table: path, route, allowed methods.
pub const ROUTES: &[(&str, Route, &[Method])] = &[
    ("/metrics", Route::Metrics, &[Method::GET]),
    ("/agent-url", Route::AgentUrl, &[Method::GET]),
    (
        "/iptables",
        Route::IpTables(false),
        &[Method::GET, Method::PUT],
    ),
    (
        "/ip6tables",
        Route::IpTables(true),
        &[Method::GET, Method::PUT],
    ),
    // Kata's Go client sends GET, runtime-rs POST.
    (
        "/direct-volume/stats",
        Route::VolumeStats,
        &[Method::GET, Method::POST],
    ),
    (
        "/direct-volume/resize",
        Route::VolumeResize,
        &[Method::POST, Method::PUT],
    ),
];

/// A resize request in either client's shape: Kata's Go `{"VolumePath","Size"}` or
/// runtime-rs' `{"volume_guest_path","size"}`.
pub fn parse_resize(body: &[u8]) -> Result<(String, u64), ShimError> {
    let v: serde_json::Value =
        serde_json::from_slice(body).map_err(step("the resize request is not JSON"))?;
    let path = ["VolumePath", "volume_path", "volume_guest_path"]
        .iter()
        .find_map(|k| v.get(k).and_then(|p| p.as_str()))
        .ok_or_else(|| invalid("the resize request has no \"VolumePath\""))?;
    let size = ["Size", "size"]
        .iter()
        .find_map(|k| v.get(k).and_then(|s| s.as_u64()))
        .ok_or_else(|| invalid("the resize request has no \"Size\" (bytes, a positive integer)"))?;
    Ok((path.to_string(), size))
}

/// Largest rules file a PUT may carry.
pub const MAX_RULES: usize = 4 << 20;

/// What routing a request gives.
#[derive(Debug, PartialEq, Eq)]
pub enum Routed {
    /// Handle it.
    To(Route),
    /// Known path, other method: 405 with these methods.
    MethodNotAllowed(&'static [Method]),
    /// Unknown path: 404.
    NotFound,
}

/// Routes a request by path and method (queries are ignored for routing).
pub fn route(method: &Method, path: &str) -> Routed {
    match ROUTES.iter().find(|(p, _, _)| *p == path) {
        None => Routed::NotFound,
        Some((_, r, methods)) if methods.contains(method) => Routed::To(*r),
        Some((_, _, methods)) => Routed::MethodNotAllowed(methods),
    }
}

/// Removes sandbox `id`'s monitor directory (at teardown, and by crash cleanup).
pub fn remove(id: &str) {
    let sock = socket_path(id);
    let _ = std::fs::remove_file(&sock);
    if let Some(dir) = sock.parent() {
        let _ = std::fs::remove_dir(dir);
    }
}

/// Serves the monitor socket of sandbox `id` until the task is aborted.
pub fn start(id: &str, service: Arc<Service>) -> Result<tokio::task::JoinHandle<()>, ShimError> {
    let path = socket_path(id);
    let dir = path
        .parent()
        .ok_or_else(|| invalid(format!("no directory for {}", path.display())))?;
    std::fs::create_dir_all(dir).map_err(step(format!("create {}", dir.display())))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(step(format!("chmod {}", dir.display())))?;
    let _ = std::fs::remove_file(&path);
    let listener = tokio::net::UnixListener::bind(&path)
        .map_err(step(format!("listen on {}", path.display())))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .map_err(step(format!("chmod {}", path.display())))?;
    Ok(tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let service = service.clone();
            tokio::spawn(async move {
                let handler = hyper::service::service_fn(move |req| {
                    let service = service.clone();
                    async move { Ok::<_, Infallible>(handle(req, &service).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), handler)
                    .await;
            });
        }
    }))
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r
}

async fn handle(req: Request<Incoming>, service: &Service) -> Response<Full<Bytes>> {
    match route(req.method(), req.uri().path()) {
        Routed::NotFound => text(StatusCode::NOT_FOUND, "URL NOT FOUND"),
        Routed::MethodNotAllowed(methods) => {
            let allow: Vec<&str> = methods.iter().map(Method::as_str).collect();
            let mut r = text(
                StatusCode::METHOD_NOT_ALLOWED,
                format!(
                    "method {} not allowed; use {}",
                    req.method(),
                    allow.join(", ")
                ),
            );
            if let Ok(v) = allow.join(", ").parse() {
                r.headers_mut().insert(hyper::header::ALLOW, v);
            }
            r
        }
        Routed::To(Route::Metrics) => {
            let sb = service.current_sandbox().await;
            let body = crate::metrics::render(sb.as_deref()).await;
            let mut r = text(StatusCode::OK, body);
            if let Ok(v) = "text/plain; version=0.0.4; charset=utf-8".parse() {
                r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
            }
            r
        }
        Routed::To(Route::IpTables(v6)) => {
            let Some(sb) = service.current_sandbox().await else {
                return text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "the sandbox's VM is not running",
                );
            };
            let put = req.method() == Method::PUT;
            let result = if put {
                use http_body_util::BodyExt;
                let body = http_body_util::Limited::new(req.into_body(), MAX_RULES);
                match body.collect().await {
                    Ok(b) => sb.set_iptables(v6, b.to_bytes().to_vec()).await,
                    Err(e) => {
                        return text(
                            StatusCode::PAYLOAD_TOO_LARGE,
                            format!("the rules could not be read (at most {MAX_RULES} bytes): {e}"),
                        )
                    }
                }
            } else {
                sb.get_iptables(v6).await
            };
            match result {
                Ok(out) => text(StatusCode::OK, out),
                Err(e) => text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    kata_config::error_chain(&e),
                ),
            }
        }
        Routed::To(Route::VolumeStats) => {
            let Some(path) = query_param(req.uri().query(), "path") else {
                return text(StatusCode::BAD_REQUEST, "Required parameter path not found");
            };
            let Some(sb) = service.current_sandbox().await else {
                return text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "the sandbox's VM is not running",
                );
            };
            match sb.volume_stats(&path).await {
                Ok(stats) => match serde_json::to_string(&stats) {
                    Ok(json) => text(StatusCode::OK, json),
                    Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
                },
                Err(e) => text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    kata_config::error_chain(&e),
                ),
            }
        }
        Routed::To(Route::VolumeResize) => {
            use http_body_util::BodyExt;
            let body = match http_body_util::Limited::new(req.into_body(), 64 << 10)
                .collect()
                .await
            {
                Ok(b) => b.to_bytes(),
                Err(e) => return text(StatusCode::PAYLOAD_TOO_LARGE, e.to_string()),
            };
            let (path, size) = match parse_resize(&body) {
                Ok(x) => x,
                Err(e) => return text(StatusCode::BAD_REQUEST, e.to_string()),
            };
            let Some(sb) = service.current_sandbox().await else {
                return text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "the sandbox's VM is not running",
                );
            };
            match sb.resize_volume(&path, size).await {
                Ok(()) => text(StatusCode::OK, ""),
                Err(e) => text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    kata_config::error_chain(&e),
                ),
            }
        }
        Routed::To(Route::AgentUrl) => match service.current_sandbox().await {
            Some(sb) => text(StatusCode::OK, sb.agent_url()),
            None => text(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the sandbox's VM is not running",
            ),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resize_requests_of_both_clients() {
        assert_eq!(
            parse_resize(br#"{"VolumePath":"/dev/loop3","Size":2048}"#).ok(),
            Some(("/dev/loop3".into(), 2048))
        );
        assert_eq!(
            parse_resize(br#"{"volume_guest_path":"/dev/sdb","size":1}"#).ok(),
            Some(("/dev/sdb".into(), 1))
        );
        assert!(parse_resize(br#"{"VolumePath":"/x"}"#)
            .expect_err("size")
            .to_string()
            .contains("Size"));
        assert!(parse_resize(b"nope").is_err());
    }

    #[test]
    fn routes_by_path_then_method() {
        assert_eq!(route(&Method::GET, "/metrics"), Routed::To(Route::Metrics));
        assert_eq!(
            route(&Method::GET, "/agent-url"),
            Routed::To(Route::AgentUrl)
        );
        assert_eq!(
            route(&Method::POST, "/metrics"),
            Routed::MethodNotAllowed(&[Method::GET])
        );
        assert_eq!(route(&Method::GET, "/nope"), Routed::NotFound);
        assert_eq!(
            route(&Method::PUT, "/ip6tables"),
            Routed::To(Route::IpTables(true))
        );
        assert_eq!(
            route(&Method::POST, "/iptables"),
            Routed::MethodNotAllowed(&[Method::GET, Method::PUT])
        );
        assert_eq!(route(&Method::GET, "/metrics/"), Routed::NotFound);
        assert_eq!(
            route(&Method::GET, "/direct-volume/stats"),
            Routed::To(Route::VolumeStats)
        );
        assert_eq!(
            route(&Method::PUT, "/direct-volume/resize"),
            Routed::To(Route::VolumeResize)
        );
        assert_eq!(
            socket_path("abc"),
            PathBuf::from("/run/vc/sbs/abc/shim-monitor.sock")
        );
    }
}
