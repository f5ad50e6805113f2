//! The containerd found on the host, as `kata-runtime check` and `env` report it: its version,
//! and whether that version's series is one the runtime is tested with (scripts/managers.sh
//! runs the same series in `make test`).

use std::path::{Path, PathBuf};
use std::process::Command;

/// The containerd series `make test` runs the runtime under (scripts/managers.sh).
pub const TESTED_SERIES: &[(u64, u64)] = &[(1, 6), (1, 7), (2, 1)];

/// Where containerd is looked for when it is not on PATH (Debian's, a manual install's, and
/// the static tarball's).
const FALLBACK_DIRS: &[&str] = &["/usr/bin", "/usr/local/bin", "/opt/containerd/bin"];

/// What was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    /// No containerd binary on PATH or in the usual places.
    Missing,
    /// A binary whose `--version` could not be read or parsed.
    Unreadable { path: PathBuf, output: String },
    /// containerd of this version.
    Version {
        path: PathBuf,
        /// The version text as the binary prints it (`1.6.20~ds1`, `2.1.9+unknown`).
        text: String,
        major: u64,
        minor: u64,
        patch: u64,
    },
}

impl Found {
    /// Whether the version's series is among [`TESTED_SERIES`].
    pub fn tested(&self) -> bool {
        match self {
            Found::Version { major, minor, .. } => TESTED_SERIES.contains(&(*major, *minor)),
            _ => false,
        }
    }
}

/// The series list as people write it: `1.6, 1.7, 2.1`.
pub fn tested_list() -> String {
    TESTED_SERIES
        .iter()
        .map(|(a, b)| format!("{a}.{b}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Parses `containerd --version` output: `containerd github.com/containerd/containerd
/// 1.7.24~ds1 1.7.24~ds1-6` or `containerd github.com/containerd/containerd/v2 v2.1.9 ...`.
/// Returns (text, major, minor, patch).
pub fn parse_version(output: &str) -> Option<(String, u64, u64, u64)> {
    let line = output.lines().find(|l| l.starts_with("containerd "))?;
    let text = line.split_whitespace().nth(2)?;
    let digits = text.strip_prefix('v').unwrap_or(text);
    let mut parts = digits.splitn(3, '.');
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    let patch_text = parts.next()?;
    let end = patch_text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(patch_text.len());
    let patch = patch_text[..end].parse().ok()?;
    Some((text.to_string(), major, minor, patch))
}

/// The containerd binary: the first on PATH, else one of the usual places.
fn binary() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(FALLBACK_DIRS.iter().map(PathBuf::from))
        .map(|d| d.join("containerd"))
        .find(|p| p.is_file())
}

/// Runs `containerd --version` of the containerd found on the host.
pub fn detect() -> Found {
    match binary() {
        None => Found::Missing,
        Some(p) => detect_at(&p),
    }
}

/// [`detect`] for the binary at `path`.
pub fn detect_at(path: &Path) -> Found {
    let output = match Command::new(path).arg("--version").output() {
        Ok(o) => String::from_utf8_lossy(&o.stdout).into_owned(),
        Err(e) => {
            return Found::Unreadable {
                path: path.to_path_buf(),
                output: e.to_string(),
            }
        }
    };
    match parse_version(&output) {
        Some((text, major, minor, patch)) => Found::Version {
            path: path.to_path_buf(),
            text,
            major,
            minor,
            patch,
        },
        None => Found::Unreadable {
            path: path.to_path_buf(),
            output: output.trim().to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debian_and_upstream_version_lines_parse() {
        for (out, want) in [
            (
                "containerd github.com/containerd/containerd 1.6.20~ds1 1.6.20~ds1-1+b1\n",
                ("1.6.20~ds1", 1, 6, 20),
            ),
            (
                "containerd github.com/containerd/containerd 1.7.24~ds1 1.7.24~ds1-6+deb13u1\n",
                ("1.7.24~ds1", 1, 7, 24),
            ),
            (
                "containerd github.com/containerd/containerd/v2 2.1.9+unknown \n",
                ("2.1.9+unknown", 2, 1, 9),
            ),
            (
                "containerd containerd.io v2.0.4 1a43cb6a1035441f9aca8f5666a9b3ef9e70ab20\n",
                ("v2.0.4", 2, 0, 4),
            ),
        ] {
            let (text, a, b, c) = parse_version(out).expect(out);
            assert_eq!((text.as_str(), a, b, c), want);
        }
    }

    #[test]
    fn garbage_does_not_parse() {
        for out in ["", "containerd\n", "containerd x y\n", "dockerd 28.5.2\n"] {
            assert_eq!(parse_version(out), None, "{out:?}");
        }
    }

    #[test]
    fn only_the_tested_series_are_tested() {
        let v = |major, minor| Found::Version {
            path: PathBuf::from("/usr/bin/containerd"),
            text: String::new(),
            major,
            minor,
            patch: 0,
        };
        assert!(v(1, 6).tested() && v(1, 7).tested() && v(2, 1).tested());
        assert!(!v(2, 0).tested() && !v(1, 5).tested() && !v(2, 2).tested());
        assert!(!Found::Missing.tested());
        assert_eq!(tested_list(), "1.6, 1.7, 2.1");
    }

    #[test]
    fn a_binary_that_is_not_containerd_is_unreadable_not_a_version() {
        match detect_at(Path::new("/bin/true")) {
            Found::Unreadable { path, .. } => assert_eq!(path, Path::new("/bin/true")),
            other => panic!("{other:?}"),
        }
    }
}
