//! The node's containerd configuration: the runtimes `kata` and `kata-qemu` added, as a drop-in
//! where a version 3 configuration (containerd 2.x, which merges imports key by key) imports a
//! directory of them, else by a minimal edit of the file that keeps the rest of it, comments
//! included (parsed and written with `toml_edit`, never by text substitution). Version 2 (containerd 1.6 and 1.7) and version 3 (2.x) each have their own
//! table path; version 1 is refused.

use std::path::{Path, PathBuf};

use toml_edit::{value, Array, DocumentMut, Item, Table};

use crate::DeployError;

use crate::{Handler, HANDLERS};

/// The file name of the drop-in written into an imported directory.
pub const DROP_IN: &str = "kata-deploy.toml";

/// The CRI plugin's table that holds runtimes, for a configuration version.
pub fn runtimes_path(version: i64) -> Result<[&'static str; 4], DeployError> {
    match version {
        2 => Ok([
            "plugins",
            "io.containerd.grpc.v1.cri",
            "containerd",
            "runtimes",
        ]),
        3 => Ok([
            "plugins",
            "io.containerd.cri.v1.runtime",
            "containerd",
            "runtimes",
        ]),
        v => Err(DeployError::Config(format!(
            "containerd configuration version {v} is not supported (2 for containerd 1.6/1.7, 3 for 2.x); \
             migrate it with `containerd config migrate`"
        ))),
    }
}

/// How the runtimes get into the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// A drop-in file at this path (the configuration imports its directory); the
    /// configuration itself is untouched.
    DropIn(PathBuf),
    /// The configuration file edited in place, to this text.
    Edit(String),
}

/// The `version` of a configuration text (containerd's default for none is 1).
pub fn version_of(doc: &DocumentMut) -> i64 {
    doc.get("version").and_then(Item::as_integer).unwrap_or(1)
}

fn handler_table(prefix: &Path, h: &Handler) -> Table {
    let mut t = Table::new();
    t.insert("runtime_type", value(h.runtime_type));
    t.insert("runtime_path", value(h.shim_path(prefix)));
    t.insert("privileged_without_host_devices", value(true));
    let mut ann = Array::new();
    ann.push("io.katacontainers.*");
    t.insert("pod_annotations", value(ann));
    let mut opts = Table::new();
    opts.insert("ConfigPath", value(h.config_path(prefix)));
    t.insert("options", Item::Table(opts));
    t
}

/// The default runtime's name in `doc` (`containerd.default_runtime_name` of the CRI plugin,
/// `runc` unless set) and whether `doc` configures it.
fn default_runtime(doc: &DocumentMut, version: i64) -> Result<(String, bool), DeployError> {
    let path = runtimes_path(version)?;
    let containerd = doc
        .get(path[0])
        .and_then(|p| p.get(path[1]))
        .and_then(|c| c.get(path[2]));
    let name = containerd
        .and_then(|c| c.get("default_runtime_name"))
        .and_then(Item::as_str)
        .unwrap_or("runc")
        .to_string();
    let present = containerd
        .and_then(|c| c.get(path[3]))
        .and_then(|r| r.get(&name))
        .is_some();
    Ok((name, present))
}

/// Adds the handlers to `doc` at the runtimes table of `version` (tables made as needed,
/// implicit so that no empty headers appear); an existing handler of the same name is replaced.
/// With `default_runc`, also containerd's built-in `runc` stanza: a configured runtimes table
/// replaces containerd's built-in one, and a node whose default runtime came from it would
/// otherwise lose it (containerd refuses to start its CRI plugin then).
fn add_handlers(
    doc: &mut DocumentMut,
    version: i64,
    prefix: &Path,
    default_runc: bool,
) -> Result<(), DeployError> {
    let path = runtimes_path(version)?;
    let mut cur: &mut Table = doc.as_table_mut();
    for key in path {
        let entry = cur.entry(key).or_insert_with(|| {
            let mut t = Table::new();
            t.set_implicit(true);
            Item::Table(t)
        });
        cur = entry.as_table_mut().ok_or_else(|| {
            DeployError::Config(format!(
                "containerd configuration: `{key}` is not a table (under {})",
                path.join(".")
            ))
        })?;
    }
    if default_runc && !cur.contains_key("runc") {
        let mut runc = Table::new();
        runc.insert("runtime_type", value("io.containerd.runc.v2"));
        cur.insert("runc", Item::Table(runc));
    }
    for h in &HANDLERS {
        cur.insert(h.name, Item::Table(handler_table(prefix, h)));
    }
    Ok(())
}

/// The directory of the first `imports` entry of the form `DIR/*.toml`, if any.
pub fn import_dir(doc: &DocumentMut) -> Option<PathBuf> {
    doc.get("imports")?.as_array()?.iter().find_map(|v| {
        let s = v.as_str()?;
        let dir = s.strip_suffix("/*.toml")?;
        (!dir.is_empty() && !dir.contains('*')).then(|| PathBuf::from(dir))
    })
}

/// What to do with the configuration `text` (the node's, as read) for runtimes installed at
/// `prefix`; with the drop-in, also its text.
pub fn plan(text: &str, prefix: &Path) -> Result<(Plan, Option<String>), DeployError> {
    let doc: DocumentMut = text
        .parse()
        .map_err(|e| DeployError::Config(format!("containerd configuration is not TOML: {e}")))?;
    let version = version_of(&doc);
    let (default, configured) = default_runtime(&doc, version)?;
    if !configured && default != "runc" {
        return Err(DeployError::Config(format!(
            "containerd's default runtime {default:?} is not configured in this file; \
             configure it before adding kata"
        )));
    }
    let default_runc = !configured;
    // A drop-in only where containerd merges it key by key: 2.x (configuration version 3).
    // containerd 1.6/1.7 replace a plugin's whole section with an imported file's, so a
    // drop-in there would take the node's own CRI settings away (its sandbox image, CNI,
    // registries): version 2 is edited in place even when it imports a directory.
    if let Some(dir) = import_dir(&doc).filter(|_| version >= 3) {
        let mut drop_in = DocumentMut::new();
        drop_in.insert("version", value(version));
        add_handlers(&mut drop_in, version, prefix, default_runc)?;
        let text =
            format!("# Written by kata-deploy; removed by `kata-deploy uninstall`.\n{drop_in}");
        return Ok((Plan::DropIn(dir.join(DROP_IN)), Some(text)));
    }
    let mut doc = doc;
    add_handlers(&mut doc, version, prefix, default_runc)?;
    Ok((Plan::Edit(doc.to_string()), None))
}

/// The `imports` entries of a configuration text (file paths or `DIR/PATTERN` globs).
pub fn imports(text: &str) -> Vec<String> {
    text.parse::<DocumentMut>()
        .ok()
        .and_then(|doc| {
            doc.get("imports")?.as_array().map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect()
            })
        })
        .unwrap_or_default()
}

/// Whether a configuration text sets the CRI plugin of configuration version 2 (whose section
/// an imported file replaces whole in containerd 1.x).
pub fn sets_cri_v2(text: &str) -> bool {
    text.parse::<DocumentMut>()
        .ok()
        .and_then(|doc| {
            doc.get("plugins")?
                .get("io.containerd.grpc.v1.cri")
                .map(|_| ())
        })
        .is_some()
}

/// The runtime handlers a configuration (with its drop-in, if given) defines.
pub fn handlers_in(text: &str) -> Result<Vec<String>, DeployError> {
    let doc: DocumentMut = text
        .parse()
        .map_err(|e| DeployError::Config(format!("containerd configuration is not TOML: {e}")))?;
    let path = runtimes_path(version_of(&doc))?;
    let mut cur = doc.as_item();
    for key in path {
        match cur.get(key) {
            Some(next) => cur = next,
            None => return Ok(Vec::new()),
        }
    }
    Ok(cur
        .as_table_like()
        .map(|t| t.iter().map(|(k, _)| k.to_string()).collect())
        .unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    const V2: &str = r#"# The node's own settings.
version = 2
root = "/var/lib/containerd"  # where images live

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "registry.k8s.io/pause:3.9"

  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
"#;

    #[test]
    fn a_version_2_file_is_edited_keeping_everything_else() {
        let (plan, drop_in) = plan(V2, Path::new("/opt/kata")).expect("plan");
        assert!(drop_in.is_none());
        let Plan::Edit(text) = plan else {
            panic!("expected an edit")
        };
        // Every line of the original is still there, comments and indentation included.
        for line in V2.lines() {
            assert!(text.contains(line), "lost {line:?} in\n{text}");
        }
        assert_eq!(
            handlers_in(&text).expect("parse"),
            ["runc", "kata", "kata-qemu"]
        );
        let doc: DocumentMut = text.parse().expect("toml");
        let kata = &doc["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["runtimes"]["kata"];
        assert_eq!(kata["runtime_type"].as_str(), Some("io.containerd.kata.v2"));
        assert_eq!(
            kata["runtime_path"].as_str(),
            Some("/opt/kata/bin/containerd-shim-kata-v2")
        );
        assert_eq!(
            kata["options"]["ConfigPath"].as_str(),
            Some("/opt/kata/share/defaults/kata-containers/configuration.toml")
        );
        assert_eq!(
            kata["privileged_without_host_devices"].as_bool(),
            Some(true)
        );
        // Planning again on the result changes nothing more.
        let Plan::Edit(again) = super::plan(&text, Path::new("/opt/kata")).expect("plan").0 else {
            panic!("expected an edit")
        };
        assert_eq!(again, text);
    }

    #[test]
    fn a_version_2_file_with_imports_is_edited_not_given_a_drop_in() {
        // containerd 1.x would replace the file's whole CRI section with the drop-in's.
        let v2 = format!("imports = [\"/etc/containerd/conf.d/*.toml\"]\n{V2}");
        let (plan, drop_in) = plan(&v2, Path::new("/opt/kata")).expect("plan");
        assert!(drop_in.is_none());
        let Plan::Edit(text) = plan else {
            panic!("a drop-in for version 2: {plan:?}")
        };
        assert!(text.contains("sandbox_image = \"registry.k8s.io/pause:3.9\""));
        assert_eq!(
            handlers_in(&text).expect("parse"),
            ["runc", "kata", "kata-qemu"]
        );
        assert_eq!(imports(&v2), ["/etc/containerd/conf.d/*.toml"]);
        assert!(sets_cri_v2(&v2));
        assert!(!sets_cri_v2(
            "version = 2\n[plugins.\"io.containerd.cri.v1.runtime\"]\n"
        ));
    }

    #[test]
    fn a_version_3_file_with_imports_gets_a_drop_in() {
        let v3 = "version = 3\nimports = [\"/etc/containerd/conf.d/*.toml\"]\n";
        let (plan, drop_in) = plan(v3, Path::new("/opt/kata")).expect("plan");
        assert_eq!(
            plan,
            Plan::DropIn(PathBuf::from("/etc/containerd/conf.d/kata-deploy.toml"))
        );
        let drop_in = drop_in.expect("drop-in text");
        // containerd's built-in runc written out: a configured table replaces the built-in one.
        assert_eq!(
            handlers_in(&drop_in).expect("parse"),
            ["runc", "kata", "kata-qemu"]
        );
        assert!(
            drop_in.contains("[plugins.\"io.containerd.cri.v1.runtime\".containerd.runtimes.kata]")
        );
        // One shim name per handler, as containerd resolves `io.containerd.<name>.v2`.
        let doc: DocumentMut = drop_in.parse().expect("toml");
        let qemu =
            &doc["plugins"]["io.containerd.cri.v1.runtime"]["containerd"]["runtimes"]["kata-qemu"];
        assert_eq!(
            qemu["runtime_type"].as_str(),
            Some("io.containerd.kata-qemu.v2")
        );
        assert_eq!(
            qemu["runtime_path"].as_str(),
            Some("/opt/kata/bin/containerd-shim-kata-qemu-v2")
        );
        assert_eq!(
            qemu["options"]["ConfigPath"].as_str(),
            Some("/opt/kata/share/defaults/kata-containers/configuration-qemu.toml")
        );
    }

    #[test]
    fn an_empty_or_old_or_broken_configuration() {
        // No file: containerd's defaults are version 1, which has no place for them.
        assert!(matches!(
            plan("", Path::new("/opt/kata")),
            Err(DeployError::Config(_))
        ));
        assert!(plan("version = 1\n", Path::new("/opt/kata")).is_err());
        assert!(plan("version = 2\n[plugins\n", Path::new("/opt/kata")).is_err());
        // A key in the way that is not a table.
        assert!(plan("version = 2\nplugins = 3\n", Path::new("/opt/kata")).is_err());
        let (Plan::Edit(text), _) = plan("version = 2\n", Path::new("/x")).expect("plan") else {
            panic!("expected an edit")
        };
        assert_eq!(
            handlers_in(&text).expect("parse"),
            ["runc", "kata", "kata-qemu"]
        );
        // A default runtime of the node's own that this file does not configure: refused.
        let other = "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd]\n  default_runtime_name = \"crun\"\n";
        assert!(plan(other, Path::new("/x")).is_err());
    }
}
