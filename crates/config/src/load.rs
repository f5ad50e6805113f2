//! Finding, reading and merging configuration files.
//!
//! Search order: containerd's runtime option `ConfigPath`, the `io.katacontainers.config_path`
//! annotation (only without `ConfigPath`, and only for a file inside one of [`CONFIG_DIRS`]),
//! `KATA_CONF_FILE`, then the standard locations. Files in `config.d/` beside the chosen file
//! are merged over it in lexical order.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::annotations::{AnnotationError, AnnotationErrors, CONFIG_PATH};
pub use crate::schema::suggest;
use crate::schema::to_table;
use crate::schema::{KeySpec, Support};
use crate::{
    AgentConfig, Config, ConfigError, FactoryConfig, HypervisorConfig, HypervisorKind, ImageConfig,
    RuntimeConfig, UnsupportedKey, CONFIG_DIRS, DEFAULT_CONFIG_PATH, ETC_CONFIG_PATH,
    KATA_CONF_FILE_ENV, USR_SHARE_CONFIG_PATH,
};

/// Who chose the configuration file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum FoundBy {
    /// containerd's runtime option `ConfigPath`.
    RuntimeOption,
    /// The `io.katacontainers.config_path` annotation.
    Annotation,
    /// The `KATA_CONF_FILE` environment variable.
    Environment,
    /// A standard location.
    DefaultLocation,
    /// A path given on the command line.
    CommandLine,
}

impl std::fmt::Display for FoundBy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FoundBy::RuntimeOption => "containerd runtime option ConfigPath",
            FoundBy::Annotation => "annotation io.katacontainers.config_path",
            FoundBy::Environment => "environment variable KATA_CONF_FILE",
            FoundBy::DefaultLocation => "default location",
            FoundBy::CommandLine => "command line",
        })
    }
}

/// Where a configuration came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ConfigSource {
    /// The main file.
    pub path: PathBuf,
    /// Drop-in files merged over it, in order.
    pub dropins: Vec<PathBuf>,
    /// Who chose the main file.
    pub found_by: FoundBy,
}

/// Inputs of the search order.
#[derive(Debug, Clone, Default)]
pub struct SearchInputs {
    /// containerd's `ConfigPath` runtime option, or a path from the command line.
    pub explicit: Option<(PathBuf, FoundBy)>,
    /// The sandbox's OCI annotations.
    pub annotations: BTreeMap<String, String>,
    /// Value of `KATA_CONF_FILE`.
    pub env_file: Option<PathBuf>,
    /// Standard locations, in order.
    pub default_paths: Vec<PathBuf>,
    /// Directories a `config_path` annotation may point into.
    pub allowed_dirs: Vec<PathBuf>,
}

impl SearchInputs {
    /// The search order of an installed runtime, reading `KATA_CONF_FILE` from the environment.
    pub fn standard() -> Self {
        SearchInputs {
            explicit: None,
            annotations: BTreeMap::new(),
            env_file: std::env::var_os(KATA_CONF_FILE_ENV)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from),
            default_paths: [ETC_CONFIG_PATH, DEFAULT_CONFIG_PATH, USR_SHARE_CONFIG_PATH]
                .iter()
                .map(PathBuf::from)
                .collect(),
            allowed_dirs: CONFIG_DIRS.iter().map(PathBuf::from).collect(),
        }
    }

    /// Sets an explicit path (containerd's `ConfigPath` or a command-line flag).
    pub fn with_explicit(mut self, path: Option<PathBuf>, by: FoundBy) -> Self {
        self.explicit = path.filter(|p| !p.as_os_str().is_empty()).map(|p| (p, by));
        self
    }

    /// Sets the annotations.
    pub fn with_annotations(mut self, annotations: BTreeMap<String, String>) -> Self {
        self.annotations = annotations;
        self
    }
}

/// Chooses the configuration file.
pub fn resolve(inputs: &SearchInputs) -> Result<(PathBuf, FoundBy), ConfigError> {
    let annotated = inputs.annotations.get(CONFIG_PATH);
    if let Some((path, by)) = &inputs.explicit {
        if let Some(value) = annotated {
            return Err(config_path_refused(
                path,
                value,
                format!(
                    "the configuration is fixed by the {by} ({})",
                    path.display()
                ),
            ));
        }
        return existing(path, *by);
    }
    if let Some(value) = annotated {
        let candidate = PathBuf::from(value);
        let canonical = candidate.canonicalize().map_err(|e| {
            config_path_refused(&candidate, value, format!("cannot resolve the path: {e}"))
        })?;
        let allowed = inputs
            .allowed_dirs
            .iter()
            .filter_map(|d| d.canonicalize().ok())
            .any(|d| canonical.starts_with(d));
        if !allowed || !canonical.is_file() {
            let dirs: Vec<String> = inputs
                .allowed_dirs
                .iter()
                .map(|d| d.display().to_string())
                .collect();
            return Err(config_path_refused(
                &candidate,
                value,
                format!("it must name a file inside {}", dirs.join(", ")),
            ));
        }
        return Ok((canonical, FoundBy::Annotation));
    }
    if let Some(path) = &inputs.env_file {
        return existing(path, FoundBy::Environment);
    }
    for path in &inputs.default_paths {
        if path.exists() {
            return Ok((path.clone(), FoundBy::DefaultLocation));
        }
    }
    Err(ConfigError::NotFound {
        searched: inputs.default_paths.clone(),
    })
}

fn existing(path: &Path, by: FoundBy) -> Result<(PathBuf, FoundBy), ConfigError> {
    if path.exists() {
        Ok((path.to_path_buf(), by))
    } else {
        Err(ConfigError::Missing {
            path: path.to_path_buf(),
            origin: by.to_string(),
        })
    }
}

fn config_path_refused(path: &Path, value: &str, reason: String) -> ConfigError {
    ConfigError::Annotations {
        path: path.to_path_buf(),
        source: AnnotationErrors(vec![AnnotationError::ConfigPathRefused {
            value: value.to_string(),
            reason,
        }]),
    }
}

/// Resolves and loads a configuration (files only; see [`load_effective`]).
pub fn load(inputs: &SearchInputs) -> Result<Config, ConfigError> {
    let (path, by) = resolve(inputs)?;
    load_path(&path, by)
}

/// Loads `path`, merges its drop-ins, applies the annotations and validates against `host`.
/// Returns the configuration and the container-level annotations.
pub fn load_effective(
    inputs: &SearchInputs,
    host: &crate::HostLimits,
) -> Result<(Config, crate::ContainerAnnotations), ConfigError> {
    let mut config = load(inputs)?;
    let container = config.apply_annotations(&inputs.annotations)?;
    config.validate(host)?;
    Ok((config, container))
}

/// The document model: one struct per file, every field optional through `Default`.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct TomlConfig {
    hypervisor: BTreeMap<String, HypervisorConfig>,
    agent: BTreeMap<String, AgentConfig>,
    runtime: RuntimeConfig,
    factory: FactoryConfig,
    image: ImageConfig,
}

/// Reads one file and its `config.d/` drop-ins.
pub fn load_path(path: &Path, found_by: FoundBy) -> Result<Config, ConfigError> {
    let text = read(path)?;
    let mut merged = parse_checked(path, &text)?;
    let dropins = dropin_files(path)?;
    for dropin in &dropins {
        let text = read(dropin)?;
        let table = parse_checked(dropin, &text)?;
        merge(&mut merged, table);
    }
    let doc: TomlConfig = toml::Value::Table(merged)
        .try_into()
        .map_err(|e: toml::de::Error| ConfigError::Parse {
            path: path.to_path_buf(),
            line: 0,
            column: 0,
            message: e.message().to_string(),
        })?;
    let source = ConfigSource {
        path: path.to_path_buf(),
        dropins,
        found_by,
    };
    from_document(doc, source)
}

/// Parses configuration text as if it were the file `path` (no drop-ins).
pub fn load_str(path: &Path, text: &str) -> Result<Config, ConfigError> {
    let table = parse_checked(path, text)?;
    let doc: TomlConfig = toml::Value::Table(table)
        .try_into()
        .map_err(|e: toml::de::Error| ConfigError::Parse {
            path: path.to_path_buf(),
            line: 0,
            column: 0,
            message: e.message().to_string(),
        })?;
    let source = ConfigSource {
        path: path.to_path_buf(),
        dropins: Vec::new(),
        found_by: FoundBy::CommandLine,
    };
    from_document(doc, source)
}

fn from_document(mut doc: TomlConfig, source: ConfigSource) -> Result<Config, ConfigError> {
    let path = source.path.clone();
    let mut hypervisors: Vec<(String, HypervisorConfig)> =
        std::mem::take(&mut doc.hypervisor).into_iter().collect();
    let (name, hypervisor) = match hypervisors.len() {
        0 => return Err(ConfigError::NoHypervisor { path }),
        1 => hypervisors.remove(0),
        _ => {
            return Err(ConfigError::ManyHypervisors {
                path,
                found: hypervisors
                    .into_iter()
                    .map(|(n, _)| format!("[hypervisor.{n}]"))
                    .collect(),
            })
        }
    };
    // check_keys has already refused unknown names.
    let kind = HypervisorKind::from_name(&name).ok_or_else(|| ConfigError::UnknownSection {
        path: path.clone(),
        line: 0,
        section: format!("hypervisor.{name}"),
        suggestion: None,
    })?;
    let mut agent = AgentConfig::default();
    for (name, section) in doc.agent {
        if name != "kata" {
            return Err(ConfigError::UnknownAgent { path, name });
        }
        agent = section;
    }
    let mut config = Config {
        hypervisor_kind: kind,
        hypervisor,
        agent,
        runtime: doc.runtime,
        factory: doc.factory,
        image: doc.image,
        source,
        unsupported: Vec::new(),
        warnings: Vec::new(),
    };
    config.refresh_unsupported();
    Ok(config)
}

impl Config {
    /// Recomputes [`Config::unsupported`]: keys not acted on yet whose value is not the default.
    pub fn refresh_unsupported(&mut self) {
        let kind = self.hypervisor_kind;
        let mut out = Vec::new();
        let section = format!("hypervisor.{}", kind.name());
        diff_unsupported(
            &section,
            HypervisorConfig::KEYS,
            &self.hypervisor,
            &HypervisorConfig::default(),
            Some(kind),
            &mut out,
        );
        diff_unsupported(
            "agent.kata",
            AgentConfig::KEYS,
            &self.agent,
            &AgentConfig::default(),
            None,
            &mut out,
        );
        diff_unsupported(
            "runtime",
            RuntimeConfig::KEYS,
            &self.runtime,
            &RuntimeConfig::default(),
            None,
            &mut out,
        );
        diff_unsupported(
            "factory",
            FactoryConfig::KEYS,
            &self.factory,
            &FactoryConfig::default(),
            None,
            &mut out,
        );
        diff_unsupported(
            "image",
            ImageConfig::KEYS,
            &self.image,
            &ImageConfig::default(),
            None,
            &mut out,
        );
        self.unsupported = out;
    }
}

fn diff_unsupported<T: Serialize>(
    section: &str,
    keys: &[KeySpec],
    value: &T,
    default: &T,
    kind: Option<HypervisorKind>,
    out: &mut Vec<UnsupportedKey>,
) {
    let (Some(now), Some(base)) = (to_table(value), to_table(default)) else {
        return;
    };
    for spec in keys {
        let applies = kind.map(|k| spec.applies_to(k)).unwrap_or(true);
        if spec.support == Support::Yes && applies {
            continue;
        }
        if now.get(spec.name) != base.get(spec.name) {
            out.push(UnsupportedKey {
                section: section.to_string(),
                key: spec.name.to_string(),
            });
        }
    }
}

fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// `config.d/*.toml` beside `path`, in lexical order.
pub fn dropin_files(path: &Path) -> Result<Vec<PathBuf>, ConfigError> {
    let Some(dir) = path.parent().map(|p| p.join("config.d")) else {
        return Ok(Vec::new());
    };
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(ConfigError::Read { path: dir, source }),
    };
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| ConfigError::Read {
            path: dir.clone(),
            source,
        })?;
        let p = entry.path();
        if p.extension().is_some_and(|e| e == "toml") && p.is_file() {
            files.push(p);
        }
    }
    files.sort();
    Ok(files)
}

/// Deep merge: tables merge key by key, any other value replaces.
fn merge(base: &mut toml::Table, overlay: toml::Table) {
    for (k, v) in overlay {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

/// Parses, checks every section and key name, and type-checks one file.
fn parse_checked(path: &Path, text: &str) -> Result<toml::Table, ConfigError> {
    let table: toml::Table = toml::from_str(text).map_err(|e| parse_error(path, text, &e))?;
    check_keys(path, text, &table)?;
    toml::from_str::<TomlConfig>(text).map_err(|e| {
        let mut err = parse_error(path, text, &e);
        // A value of the wrong type or variant: name the key, as every other error does.
        if let (ConfigError::Parse { message, .. }, Some((section, key))) =
            (&mut err, e.span().and_then(|s| key_at(text, s.start)))
        {
            *message = format!("`{key}` in [{section}]: {message}");
        }
        err
    })?;
    Ok(table)
}

/// The key (and its table) whose value holds byte `offset` of `text`: the nearest line at or
/// before the offset that assigns a key, and the nearest table header above it. Comments and
/// multi-line arrays are passed over; `None` when the offset is not in a key's value.
fn key_at(text: &str, offset: usize) -> Option<(String, String)> {
    let before = text.get(..offset.min(text.len()))?;
    let mut key = None;
    let mut section = None;
    for line in before.lines().rev() {
        let t = line.trim_start();
        if t.starts_with('#') || t.is_empty() {
            continue;
        }
        if t.starts_with('[') {
            let name = t.trim_start_matches('[').split(']').next()?.trim();
            if key.is_some() {
                section = Some(name.to_string());
                break;
            }
            // The offset is in a header, not in a value.
            return None;
        }
        if key.is_none() {
            if let Some((k, _)) = t.split_once('=') {
                let k = k.trim().trim_matches('"');
                if !k.is_empty()
                    && k.chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
                {
                    key = Some(k.to_string());
                }
            }
        }
    }
    Some((section.unwrap_or_default(), key?))
}

fn parse_error(path: &Path, text: &str, e: &toml::de::Error) -> ConfigError {
    let (line, column) = e.span().map(|s| line_col(text, s.start)).unwrap_or((0, 0));
    ConfigError::Parse {
        path: path.to_path_buf(),
        line,
        column,
        message: e.message().trim().to_string(),
    }
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before
        .rfind('\n')
        .map(|i| before.len() - i)
        .unwrap_or(before.len() + 1);
    (line, column)
}

const TOP_SECTIONS: [&str; 5] = ["hypervisor", "agent", "runtime", "factory", "image"];

fn check_keys(path: &Path, text: &str, table: &toml::Table) -> Result<(), ConfigError> {
    for (name, value) in table {
        match name.as_str() {
            "hypervisor" => {
                let Some(hv) = value.as_table() else { continue };
                for (kind, section) in hv {
                    let full = format!("hypervisor.{kind}");
                    if HypervisorKind::from_name(kind).is_none() {
                        let names: Vec<&str> =
                            HypervisorKind::ALL.iter().map(|k| k.name()).collect();
                        return Err(ConfigError::UnknownSection {
                            path: path.to_path_buf(),
                            line: find_line(text, &full, None),
                            suggestion: suggest(kind, names.iter().copied())
                                .map(|s| format!("hypervisor.{s}")),
                            section: full,
                        });
                    }
                    check_section(path, text, &full, section, HypervisorConfig::KEYS)?;
                }
            }
            "agent" => {
                let Some(agents) = value.as_table() else {
                    continue;
                };
                for (agent, section) in agents {
                    let full = format!("agent.{agent}");
                    if agent != "kata" {
                        return Err(ConfigError::UnknownSection {
                            path: path.to_path_buf(),
                            line: find_line(text, &full, None),
                            suggestion: Some("agent.kata".to_string()),
                            section: full,
                        });
                    }
                    check_section(path, text, &full, section, AgentConfig::KEYS)?;
                }
            }
            "runtime" => check_section(path, text, name, value, RuntimeConfig::KEYS)?,
            "factory" => check_section(path, text, name, value, FactoryConfig::KEYS)?,
            "image" => check_section(path, text, name, value, ImageConfig::KEYS)?,
            other => {
                return Err(ConfigError::UnknownSection {
                    path: path.to_path_buf(),
                    line: find_line(text, other, None),
                    section: other.to_string(),
                    suggestion: suggest(other, TOP_SECTIONS.iter().copied()).map(str::to_string),
                })
            }
        }
    }
    Ok(())
}

fn check_section(
    path: &Path,
    text: &str,
    section: &str,
    value: &toml::Value,
    keys: &'static [KeySpec],
) -> Result<(), ConfigError> {
    let Some(table) = value.as_table() else {
        return Ok(());
    };
    for key in table.keys() {
        if keys.iter().all(|k| k.name != key) {
            return Err(ConfigError::UnknownKey {
                path: path.to_path_buf(),
                line: find_line(text, section, Some(key)),
                section: section.to_string(),
                key: key.clone(),
                suggestion: suggest(key, keys.iter().map(|k| k.name)).map(str::to_string),
            });
        }
    }
    Ok(())
}

/// Best-effort 1-based line of `key` in `[section]` (or of the header when `key` is None).
fn find_line(text: &str, section: &str, key: Option<&str>) -> usize {
    let mut current = String::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.starts_with('[') && !line.starts_with("[[") {
            let inner = line.trim_start_matches('[');
            let inner = inner.split(']').next().unwrap_or("");
            current = inner
                .split('.')
                .map(|p| p.trim().trim_matches('"'))
                .collect::<Vec<_>>()
                .join(".");
            if key.is_none() && current == section {
                return i + 1;
            }
            continue;
        }
        if let Some(key) = key {
            if current == section {
                let name = line
                    .split('=')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .trim_matches('"');
                if name == key && line.contains('=') {
                    return i + 1;
                }
            }
        }
    }
    0
}
