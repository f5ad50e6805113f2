//! containerd's Go-style shim flags: `-namespace N -address A -publish-binary B -id ID
//! [-bundle P] [-debug] start|delete`.

use crate::error::{invalid, ShimError};
/// Parsed command line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Args {
    /// containerd namespace.
    pub namespace: String,
    /// containerd's GRPC address.
    pub address: String,
    /// containerd binary used to publish events.
    pub publish_binary: String,
    /// Task (and, for `ctr run`, sandbox) id.
    pub id: String,
    /// Bundle directory (for `delete`; otherwise the working directory).
    pub bundle: String,
    /// Debug logging.
    pub debug: bool,
    /// `start`, `delete` or empty (daemon).
    pub action: String,
}

impl Args {
    /// Parses the flags.
    pub fn parse(args: impl Iterator<Item = String>) -> Result<Args, ShimError> {
        let mut a = Args::default();
        let mut it = args.peekable();
        while let Some(arg) = it.next() {
            let flag = arg.trim_start_matches('-');
            if !arg.starts_with('-') {
                if !a.action.is_empty() {
                    return Err(invalid(format!("unexpected argument {arg:?}")));
                }
                a.action = arg;
                continue;
            }
            let (name, inline) = match flag.split_once('=') {
                Some((n, v)) => (n.to_string(), Some(v.to_string())),
                None => (flag.to_string(), None),
            };
            if name == "debug" || name == "v" {
                if name == "v" {
                    println!("containerd-shim-kata-v2 {}", env!("CARGO_PKG_VERSION"));
                    std::process::exit(0);
                }
                a.debug = inline.map(|v| v != "false").unwrap_or(true);
                continue;
            }
            let value = match inline {
                Some(v) => v,
                None => it
                    .next()
                    .ok_or_else(|| invalid(format!("flag -{name} needs a value")))?,
            };
            match name.as_str() {
                "namespace" => a.namespace = value,
                "address" => a.address = value,
                "publish-binary" => a.publish_binary = value,
                "id" => a.id = value,
                "bundle" => a.bundle = value,
                // Accepted for compatibility, unused.
                "socket" | "containerd-binary" | "runtime-root" | "criu" | "systemd-cgroup" => {}
                other => return Err(invalid(format!("unknown flag -{other}"))),
            }
        }
        if a.id.is_empty() && !a.action.is_empty() {
            return Err(invalid("missing -id"));
        }
        if !matches!(a.action.as_str(), "" | "start" | "delete") {
            return Err(invalid(format!(
                "unknown action {:?} (expected start or delete)",
                a.action
            )));
        }
        Ok(a)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(v: &[&str]) -> Result<Args, ShimError> {
        Args::parse(v.iter().map(|s| s.to_string()))
    }

    #[test]
    fn parses_containerd_flags() {
        let a = p(&[
            "-namespace",
            "default",
            "-address",
            "/run/containerd/containerd.sock",
            "-publish-binary",
            "/usr/bin/containerd",
            "-id",
            "hello",
            "start",
        ])
        .expect("parse");
        assert_eq!(
            (a.namespace.as_str(), a.id.as_str(), a.action.as_str()),
            ("default", "hello", "start")
        );
        let a = p(&[
            "-namespace=k8s.io",
            "-id=x",
            "-bundle",
            "/b",
            "-debug",
            "delete",
        ])
        .expect("parse");
        assert!(a.debug);
        assert_eq!((a.bundle.as_str(), a.action.as_str()), ("/b", "delete"));
        assert!(p(&["-id", "x", "explode"]).is_err());
        assert!(p(&["-id"]).is_err());
        assert!(p(&["-bogus", "1", "-id", "x", "start"]).is_err());
        assert!(p(&["start"]).is_err(), "start needs an id");
    }
}
