//! Release lookup for `kata-runtime check --check-version-only | --only-list-releases`.
//!
//! The releases document is the GitHub releases API's JSON (an array of releases, each with
//! `tag_name`, `prerelease`, `published_at`, `html_url` and `assets`). The default URL is Kata
//! Containers' own; `KATA_RELEASE_URL` points the lookup at a mirror or at a project's own
//! releases (any `http://` or `https://` URL, unlike Kata 3.0, which accepts only GitHub's).
//! Output lines are Kata's: `version;date;url` for the list, `Newer <kind> release available:
//! V (url: U, date: D)` or `No newer release available` for the check.

use std::time::Duration;

use anyhow::{bail, Context};
use semver::Version;

/// Where releases are looked up unless `KATA_RELEASE_URL` says otherwise.
pub const DEFAULT_RELEASE_URL: &str =
    "https://api.github.com/repos/kata-containers/kata-containers/releases";
/// Environment variable overriding [`DEFAULT_RELEASE_URL`].
pub const RELEASE_URL_ENV: &str = "KATA_RELEASE_URL";
/// The largest releases document read (GitHub's first page is ~1 MB with assets).
const MAX_BODY: u64 = 16 << 20;

/// One usable release.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Release {
    /// Its version (the tag, without a leading `v`).
    pub version: Version,
    /// When it was published (or its first asset created).
    pub date: String,
    /// Where to get it (its first asset, or its page).
    pub url: String,
}

/// The releases URL in effect.
pub fn release_url() -> String {
    match std::env::var(RELEASE_URL_ENV) {
        Ok(v) if !v.trim().is_empty() => v.trim().to_string(),
        _ => DEFAULT_RELEASE_URL.to_string(),
    }
}

/// Fetches and parses the releases document at `url`.
pub fn fetch(url: &str, include_all: bool) -> anyhow::Result<Vec<Release>> {
    if !(url.starts_with("https://") || url.starts_with("http://")) {
        bail!(
            "release URL {url:?} is not an http:// or https:// URL (set {RELEASE_URL_ENV} to one)"
        );
    }
    let agent = ureq::AgentBuilder::new()
        .timeout_connect(Duration::from_secs(5))
        .timeout(Duration::from_secs(20))
        .user_agent(concat!("kata-runtime/", env!("CARGO_PKG_VERSION")))
        .build();
    let response = match agent
        .get(url)
        .set("Accept", "application/vnd.github+json")
        .call()
    {
        Ok(r) => r,
        Err(ureq::Error::Status(code, r)) => {
            let body = r.into_string().unwrap_or_default();
            if code == 403 && body.contains("rate limit") {
                bail!("{url} refused the lookup: API rate limit exceeded (HTTP 403); try again later or set {RELEASE_URL_ENV} to a mirror");
            }
            bail!(
                "{url} answered HTTP {code}: {}",
                body.chars().take(200).collect::<String>().trim()
            );
        }
        Err(ureq::Error::Transport(t)) => {
            let why = match t.message() {
                Some(m) => format!("{}: {m}", t.kind()),
                None => t.kind().to_string(),
            };
            bail!(
                "cannot reach {url} to look up releases ({why}); this host may have no network access to it: set {RELEASE_URL_ENV} to a reachable mirror, or skip the lookup"
            )
        }
    };
    let mut body = Vec::new();
    std::io::Read::read_to_end(
        &mut std::io::Read::take(response.into_reader(), MAX_BODY),
        &mut body,
    )
    .with_context(|| format!("reading the releases document from {url}"))?;
    parse(&body, include_all).with_context(|| format!("the releases document at {url}"))
}

/// Parses a releases document: every release with a semantic-version tag, sorted ascending;
/// pre-releases only with `include_all`. Entries without a usable tag are skipped (as Kata does).
pub fn parse(body: &[u8], include_all: bool) -> anyhow::Result<Vec<Release>> {
    let doc: serde_json::Value =
        serde_json::from_slice(body).context("not JSON (expected GitHub's releases array)")?;
    let Some(items) = doc.as_array() else {
        bail!("expected a JSON array of releases, got {}", kind(&doc));
    };
    let mut out = Vec::new();
    for item in items {
        let Some(tag) = item.get("tag_name").and_then(|t| t.as_str()) else {
            continue;
        };
        let Ok(version) = Version::parse(tag.strip_prefix('v').unwrap_or(tag)) else {
            tracing::debug!(
                tag,
                "ignoring a release whose tag is not a semantic version"
            );
            continue;
        };
        if item.get("draft").and_then(|d| d.as_bool()) == Some(true) {
            continue;
        }
        let pre = !version.pre.is_empty()
            || item.get("prerelease").and_then(|p| p.as_bool()) == Some(true);
        if pre && !include_all {
            continue;
        }
        let asset = item
            .get("assets")
            .and_then(|a| a.as_array())
            .and_then(|a| a.first());
        let field = |v: Option<&serde_json::Value>, key: &str| {
            v.and_then(|v| v.get(key))
                .and_then(|s| s.as_str())
                .filter(|s| !s.is_empty())
                .map(str::to_string)
        };
        let url = field(asset, "browser_download_url")
            .or_else(|| field(Some(item), "html_url"))
            .unwrap_or_default();
        let date = field(Some(item), "published_at")
            .or_else(|| field(asset, "created_at"))
            .unwrap_or_default();
        out.push(Release { version, date, url });
    }
    out.sort_by(|a, b| a.version.cmp(&b.version));
    out.dedup_by(|a, b| a.version == b.version);
    Ok(out)
}

fn kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Object(_) => "an object",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Null => "null",
        serde_json::Value::Array(_) => "an array",
    }
}

/// The newest release above `current`, if any (`releases` sorted ascending).
pub fn newest_above<'a>(current: &Version, releases: &'a [Release]) -> Option<&'a Release> {
    releases.iter().rev().find(|r| r.version > *current)
}

/// Kata's description of how `latest` differs from `current` (`latest` > `current`).
pub fn kind_of_newer(current: &Version, latest: &Version) -> &'static str {
    let pre = !latest.pre.is_empty();
    if latest.major > current.major {
        if pre {
            "major pre-release"
        } else {
            "major"
        }
    } else if latest.minor > current.minor {
        if pre {
            "minor pre-release"
        } else {
            "minor"
        }
    } else if latest.patch > current.patch {
        if pre {
            "patch pre-release"
        } else {
            "patch"
        }
    } else if pre {
        "pre-release"
    } else {
        // Same numbers, current is a pre-release of it.
        "major"
    }
}

/// The lines `--only-list-releases` prints.
pub fn list_lines(releases: &[Release]) -> Vec<String> {
    releases
        .iter()
        .map(|r| format!("{};{};{}", r.version, r.date, r.url))
        .collect()
}

/// The line `--check-version-only` prints.
pub fn check_line(current: &Version, releases: &[Release]) -> String {
    if releases.is_empty() {
        return "No releases available".to_string();
    }
    match newest_above(current, releases) {
        None => "No newer release available".to_string(),
        Some(r) => format!(
            "Newer {} release available: {} (url: {}, date: {})",
            kind_of_newer(current, &r.version),
            r.version,
            r.url,
            r.date
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = r#"[
      {"tag_name":"3.1.0-rc0","prerelease":true,"published_at":"2023-01-10T00:00:00Z","html_url":"https://x/3.1.0-rc0","assets":[]},
      {"tag_name":"3.0.2","prerelease":false,"published_at":"2023-01-05T00:00:00Z","html_url":"https://x/3.0.2",
       "assets":[{"browser_download_url":"https://dl/3.0.2.tar.xz","created_at":"2023-01-04T00:00:00Z","name":"k.tar.xz"}]},
      {"tag_name":"v2.5.0","published_at":"2022-08-01T00:00:00Z","html_url":"https://x/2.5.0"},
      {"tag_name":"nightly","html_url":"https://x/nightly"},
      {"tag_name":"3.0.1","draft":true},
      {"name":"no tag"}
    ]"#;

    fn v(s: &str) -> Version {
        Version::parse(s).expect("test version")
    }

    #[test]
    fn stable_releases_sorted_with_their_asset_urls() {
        let r = parse(DOC.as_bytes(), false).expect("parse");
        let versions: Vec<String> = r.iter().map(|r| r.version.to_string()).collect();
        assert_eq!(versions, ["2.5.0", "3.0.2"]);
        assert_eq!(
            list_lines(&r),
            [
                "2.5.0;2022-08-01T00:00:00Z;https://x/2.5.0",
                "3.0.2;2023-01-05T00:00:00Z;https://dl/3.0.2.tar.xz"
            ]
        );
    }

    #[test]
    fn pre_releases_only_when_asked() {
        let r = parse(DOC.as_bytes(), true).expect("parse");
        assert_eq!(
            r.last().map(|r| r.version.to_string()),
            Some("3.1.0-rc0".into())
        );
        assert_eq!(
            check_line(&v("3.0.2"), &r),
            "Newer minor pre-release release available: 3.1.0-rc0 (url: https://x/3.1.0-rc0, date: 2023-01-10T00:00:00Z)"
        );
    }

    #[test]
    fn newer_kinds_as_kata_names_them() {
        assert_eq!(kind_of_newer(&v("0.1.0"), &v("3.0.0")), "major");
        assert_eq!(kind_of_newer(&v("3.0.0"), &v("3.1.0")), "minor");
        assert_eq!(kind_of_newer(&v("3.0.0"), &v("3.0.2")), "patch");
        assert_eq!(
            kind_of_newer(&v("3.0.0-rc1"), &v("3.0.0-rc2")),
            "pre-release"
        );
        assert_eq!(kind_of_newer(&v("3.0.0-rc1"), &v("3.0.0")), "major");
        let r = parse(DOC.as_bytes(), false).expect("parse");
        assert_eq!(check_line(&v("3.0.2"), &r), "No newer release available");
        assert_eq!(check_line(&v("3.0.2"), &[]), "No releases available");
    }

    #[test]
    fn bad_documents_say_what_was_expected() {
        let e = parse(b"{\"message\":\"Not Found\"}", false).expect_err("object");
        assert!(
            e.to_string()
                .contains("expected a JSON array of releases, got an object"),
            "{e}"
        );
        let e = parse(b"<html>", false).expect_err("html");
        assert!(e.to_string().contains("not JSON"), "{e}");
        let e = fetch("ftp://example.org/releases", false).expect_err("scheme");
        assert!(
            e.to_string().contains("not an http:// or https:// URL"),
            "{e}"
        );
    }
}
