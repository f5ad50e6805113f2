//! Per-pod overrides from OCI annotations.
//!
//! - `io.katacontainers.config.hypervisor.<key>`: only keys the guide marks dynamic, only when
//!   the name fully matches a regex of `enable_annotations`, and for path-valued keys only when
//!   the value matches a glob(3) pattern of the matching `valid_*` list;
//! - `io.katacontainers.config.runtime.<key>` and `io.katacontainers.config.agent.<key>`: keys
//!   the guide marks dynamic; those that change the host or weaken a protection
//!   ([`GATED_KEYS`]) only when the key fully matches a regex of `[runtime].enable_annotations`;
//! - `io.katacontainers.container.resource.{swappiness,swap_in_bytes}`;
//! - `io.katacontainers.pkg.oci.{container_type,bundle_path}` and `io.katacontainers.config_path`.
//!
//! Any other annotation under `io.katacontainers.` is refused, never ignored: a setting that
//! silently has no effect is worse than an error.

use std::collections::BTreeMap;
use std::fmt;

use serde::Serialize;

use crate::schema::{find_key, Dynamic, KeySpec};
use crate::{AgentConfig, Config, ConfigError, HypervisorConfig, RuntimeConfig};

/// Runtime and agent keys whose annotations change the host (its network namespaces and
/// cgroups, the guest kernel's modules, the shim's endpoints) or weaken a protection a cluster
/// may enforce (the guest seccomp): a pod author may set them only when
/// `[runtime].enable_annotations` allows them.
pub const GATED_KEYS: &[(&str, &str)] = &[
    ("runtime", "internetworking_model"),
    ("runtime", "disable_new_netns"),
    ("runtime", "sandbox_cgroup_only"),
    ("runtime", "vfio_mode"),
    ("runtime", "experimental"),
    ("runtime", "enable_pprof"),
    ("runtime", "disable_guest_seccomp"),
    ("agent.kata", "kernel_modules"),
];

/// Prefix of every Kata annotation.
pub const KATA_PREFIX: &str = "io.katacontainers.";
/// Hypervisor overrides.
pub const HYPERVISOR_PREFIX: &str = "io.katacontainers.config.hypervisor.";
/// Runtime overrides.
pub const RUNTIME_PREFIX: &str = "io.katacontainers.config.runtime.";
/// Agent overrides.
pub const AGENT_PREFIX: &str = "io.katacontainers.config.agent.";
/// Container resources.
pub const CONTAINER_RESOURCE_PREFIX: &str = "io.katacontainers.container.resource.";
/// Configuration file choice.
pub const CONFIG_PATH: &str = "io.katacontainers.config_path";
/// OCI bundle path.
pub const BUNDLE_PATH: &str = "io.katacontainers.pkg.oci.bundle_path";
/// `pod_sandbox` or `pod_container`.
pub const CONTAINER_TYPE: &str = "io.katacontainers.pkg.oci.container_type";
/// Swappiness of the container.
pub const SWAPPINESS: &str = "io.katacontainers.container.resource.swappiness";
/// Swap limit of the container.
pub const SWAP_IN_BYTES: &str = "io.katacontainers.container.resource.swap_in_bytes";

/// Kata's annotation names that differ from the TOML key.
const HYPERVISOR_ALIASES: [(&str, &str); 1] = [("default_max_vcpus", "default_maxvcpus")];

/// Kata annotations for asset hashes, which this runtime does not verify yet.
const UNSUPPORTED_HYPERVISOR: [&str; 7] = [
    "asset_hash_type",
    "kernel_hash",
    "image_hash",
    "initrd_hash",
    "firmware_hash",
    "hypervisor_hash",
    "jailer_hash",
];

/// `io.katacontainers.pkg.oci.container_type` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum ContainerType {
    /// The sandbox (pause) container: it creates the VM.
    #[serde(rename = "pod_sandbox")]
    PodSandbox,
    /// An application container joining a sandbox.
    #[serde(rename = "pod_container")]
    PodContainer,
}

/// Container-level values read from annotations.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ContainerAnnotations {
    /// `Resources.Memory.Swappiness` (0 to 100).
    pub swappiness: Option<u64>,
    /// `Resources.Memory.Swap` in bytes.
    pub swap_in_bytes: Option<u64>,
    /// Container type.
    pub container_type: Option<ContainerType>,
    /// OCI bundle path.
    pub bundle_path: Option<String>,
}

/// One refused annotation.
#[derive(Debug, thiserror::Error)]
pub enum AnnotationError {
    /// Unknown name under a Kata prefix.
    #[error("annotation {annotation} is unknown{}", hint(.suggestion))]
    Unknown {
        /// Full annotation name.
        annotation: String,
        /// Closest known annotation.
        suggestion: Option<String>,
    },
    /// A known key that only the configuration file may set.
    #[error("annotation {annotation} is refused: [{section}].{key} can only be set in the configuration file")]
    NotDynamic {
        /// Full annotation name.
        annotation: String,
        /// Section.
        section: String,
        /// Key.
        key: String,
    },
    /// A hypervisor annotation that `enable_annotations` does not allow.
    #[error("annotation {annotation}={value:?} is refused: add a regular expression matching \"{key}\" to [{section}].enable_annotations (now {allowed:?})")]
    NotEnabled {
        /// Full annotation name.
        annotation: String,
        /// Value.
        value: String,
        /// Section.
        section: String,
        /// Key.
        key: String,
        /// The regexes in force.
        allowed: Vec<String>,
    },
    /// A path-valued annotation outside the allowed globs.
    #[error("annotation {annotation}={value:?} is refused: the path matches no pattern of [{section}].{list_key} (now {patterns:?}); add a glob(3) pattern matching it there")]
    PathNotAllowed {
        /// Full annotation name.
        annotation: String,
        /// Value.
        value: String,
        /// Section.
        section: String,
        /// The `valid_*` key.
        list_key: String,
        /// The patterns in force.
        patterns: Vec<String>,
    },
    /// The value does not parse as the key's type.
    #[error("annotation {annotation}={value:?} has an invalid value: {reason}")]
    BadValue {
        /// Full annotation name.
        annotation: String,
        /// Value.
        value: String,
        /// What was expected.
        reason: String,
    },
    /// A Kata annotation this runtime does not implement.
    #[error("annotation {annotation} is not supported by this runtime; remove it")]
    Unsupported {
        /// Full annotation name.
        annotation: String,
    },
    /// `io.katacontainers.config_path` was refused.
    #[error("annotation io.katacontainers.config_path={value:?} is refused: {reason}")]
    ConfigPathRefused {
        /// Value.
        value: String,
        /// Why.
        reason: String,
    },
}

/// Every refused annotation of a sandbox.
#[derive(Debug)]
pub struct AnnotationErrors(pub Vec<AnnotationError>);

impl fmt::Display for AnnotationErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.0.iter().map(|e| e.to_string()).collect();
        f.write_str(&parts.join("; "))
    }
}

impl std::error::Error for AnnotationErrors {}

fn hint(s: &Option<String>) -> String {
    match s {
        Some(s) => format!(" (did you mean {s}?)"),
        None => String::new(),
    }
}

/// Every annotation name this runtime understands (for suggestions and documentation).
pub fn known_annotations() -> Vec<String> {
    let mut out = vec![
        CONFIG_PATH.to_string(),
        BUNDLE_PATH.to_string(),
        CONTAINER_TYPE.to_string(),
        SWAPPINESS.to_string(),
        SWAP_IN_BYTES.to_string(),
    ];
    let dynamic = |keys: &'static [KeySpec], prefix: &str, out: &mut Vec<String>| {
        for k in keys.iter().filter(|k| k.dynamic != Dynamic::No) {
            out.push(format!("{prefix}{}", k.name));
        }
    };
    dynamic(HypervisorConfig::KEYS, HYPERVISOR_PREFIX, &mut out);
    dynamic(RuntimeConfig::KEYS, RUNTIME_PREFIX, &mut out);
    dynamic(AgentConfig::KEYS, AGENT_PREFIX, &mut out);
    out
}

impl Config {
    /// Applies a sandbox's annotations. All refused annotations are reported together; on error
    /// the configuration is left unchanged.
    pub fn apply_annotations(
        &mut self,
        annotations: &BTreeMap<String, String>,
    ) -> Result<ContainerAnnotations, ConfigError> {
        let mut next = self.clone();
        let mut errors = Vec::new();
        let mut container = ContainerAnnotations::default();
        for (name, value) in annotations {
            if !name.starts_with(KATA_PREFIX) {
                continue;
            }
            if let Err(e) = next.apply_one(name, value, &mut container) {
                errors.push(e);
            }
        }
        if !errors.is_empty() {
            return Err(ConfigError::Annotations {
                path: self.source.path.clone(),
                source: AnnotationErrors(errors),
            });
        }
        next.refresh_unsupported();
        *self = next;
        Ok(container)
    }

    fn apply_one(
        &mut self,
        name: &str,
        value: &str,
        container: &mut ContainerAnnotations,
    ) -> Result<(), AnnotationError> {
        if let Some(key) = name.strip_prefix(HYPERVISOR_PREFIX) {
            return self.apply_hypervisor(name, key, value);
        }
        if let Some(key) = name.strip_prefix(RUNTIME_PREFIX) {
            let spec = lookup(RuntimeConfig::KEYS, name, key, RUNTIME_PREFIX)?;
            dynamic_or_refuse(spec, name, "runtime")?;
            self.gate(name, "runtime", spec.name, value)?;
            return set_field(&mut self.runtime, spec.name, name, value);
        }
        if let Some(key) = name.strip_prefix(AGENT_PREFIX) {
            let spec = lookup(AgentConfig::KEYS, name, key, AGENT_PREFIX)?;
            dynamic_or_refuse(spec, name, "agent.kata")?;
            self.gate(name, "agent.kata", spec.name, value)?;
            return set_field(&mut self.agent, spec.name, name, value);
        }
        match name {
            // Handled by the search order in `load::resolve`.
            CONFIG_PATH => Ok(()),
            BUNDLE_PATH => {
                if !value.starts_with('/') {
                    return Err(bad(name, value, "expected an absolute path"));
                }
                container.bundle_path = Some(value.to_string());
                Ok(())
            }
            CONTAINER_TYPE => {
                container.container_type = Some(match value {
                    "pod_sandbox" => ContainerType::PodSandbox,
                    "pod_container" => ContainerType::PodContainer,
                    _ => return Err(bad(name, value, "expected pod_sandbox or pod_container")),
                });
                Ok(())
            }
            SWAPPINESS => {
                let v: u64 = value
                    .trim()
                    .parse()
                    .ok()
                    .filter(|v| *v <= 100)
                    .ok_or_else(|| bad(name, value, "expected an integer from 0 to 100"))?;
                container.swappiness = Some(v);
                Ok(())
            }
            SWAP_IN_BYTES => {
                let v: u64 = value
                    .trim()
                    .parse()
                    .map_err(|_| bad(name, value, "expected a byte count (unsigned integer)"))?;
                container.swap_in_bytes = Some(v);
                Ok(())
            }
            _ => Err(AnnotationError::Unknown {
                annotation: name.to_string(),
                suggestion: suggest_annotation(name),
            }),
        }
    }

    /// Refuses a [`GATED_KEYS`] annotation that `[runtime].enable_annotations` does not allow.
    fn gate(
        &self,
        name: &str,
        section: &str,
        key: &str,
        value: &str,
    ) -> Result<(), AnnotationError> {
        if !GATED_KEYS.contains(&(section, key)) {
            return Ok(());
        }
        let allowed = &self.runtime.enable_annotations;
        if allowed.iter().any(|re| full_match(re, key)) {
            return Ok(());
        }
        Err(AnnotationError::NotEnabled {
            annotation: name.to_string(),
            value: value.to_string(),
            section: "runtime".to_string(),
            key: key.to_string(),
            allowed: allowed.clone(),
        })
    }

    fn apply_hypervisor(
        &mut self,
        name: &str,
        key: &str,
        value: &str,
    ) -> Result<(), AnnotationError> {
        if UNSUPPORTED_HYPERVISOR.contains(&key) {
            return Err(AnnotationError::Unsupported {
                annotation: name.to_string(),
            });
        }
        let canonical = HYPERVISOR_ALIASES
            .iter()
            .find(|(alias, _)| *alias == key)
            .map(|(_, k)| *k)
            .unwrap_or(key);
        let spec = lookup(HypervisorConfig::KEYS, name, canonical, HYPERVISOR_PREFIX)?;
        let section = format!("hypervisor.{}", self.hypervisor_kind.name());
        dynamic_or_refuse(spec, name, &section)?;
        let allowed = &self.hypervisor.enable_annotations;
        if !allowed
            .iter()
            .any(|re| full_match(re, key) || full_match(re, canonical))
        {
            return Err(AnnotationError::NotEnabled {
                annotation: name.to_string(),
                value: value.to_string(),
                section,
                key: canonical.to_string(),
                allowed: allowed.clone(),
            });
        }
        if let Dynamic::Path(list_key) = spec.dynamic {
            let patterns = self.hypervisor_list(list_key);
            if !patterns.iter().any(|p| glob_match(p, value)) {
                return Err(AnnotationError::PathNotAllowed {
                    annotation: name.to_string(),
                    value: value.to_string(),
                    section,
                    list_key: list_key.to_string(),
                    patterns,
                });
            }
        }
        set_field(&mut self.hypervisor, spec.name, name, value)
    }

    fn hypervisor_list(&self, list_key: &str) -> Vec<String> {
        crate::schema::to_table(&self.hypervisor)
            .and_then(|t| t.get(list_key).cloned())
            .and_then(|v| v.try_into::<Vec<String>>().ok())
            .unwrap_or_default()
    }
}

fn lookup(
    keys: &'static [KeySpec],
    name: &str,
    key: &str,
    prefix: &str,
) -> Result<&'static KeySpec, AnnotationError> {
    find_key(keys, key).ok_or_else(|| AnnotationError::Unknown {
        annotation: name.to_string(),
        suggestion: crate::schema::suggest(
            key,
            keys.iter()
                .filter(|k| k.dynamic != Dynamic::No)
                .map(|k| k.name),
        )
        .map(|k| format!("{prefix}{k}")),
    })
}

fn dynamic_or_refuse(spec: &KeySpec, name: &str, section: &str) -> Result<(), AnnotationError> {
    if spec.dynamic == Dynamic::No {
        return Err(AnnotationError::NotDynamic {
            annotation: name.to_string(),
            section: section.to_string(),
            key: spec.name.to_string(),
        });
    }
    Ok(())
}

fn suggest_annotation(name: &str) -> Option<String> {
    let known = known_annotations();
    crate::schema::suggest(name, known.iter().map(String::as_str)).map(str::to_string)
}

fn bad(name: &str, value: &str, reason: &str) -> AnnotationError {
    AnnotationError::BadValue {
        annotation: name.to_string(),
        value: value.to_string(),
        reason: reason.to_string(),
    }
}

/// True when `re` matches the whole of `text`. An invalid regex matches nothing (validation
/// reports it).
pub fn full_match(re: &str, text: &str) -> bool {
    regex::Regex::new(&format!("^(?:{re})$"))
        .map(|r| r.is_match(text))
        .unwrap_or(false)
}

/// glob(3) match of a whole path; `*` does not cross `/`. An empty pattern matches only "".
pub fn glob_match(pattern: &str, value: &str) -> bool {
    if pattern.is_empty() {
        return value.is_empty();
    }
    let opts = glob::MatchOptions {
        case_sensitive: true,
        require_literal_separator: true,
        require_literal_leading_dot: false,
    };
    glob::Pattern::new(pattern)
        .map(|p| p.matches_with(value, opts))
        .unwrap_or(false)
}

/// Sets `key` of a section from an annotation string, typed by the key's current TOML type,
/// then re-deserialises so enums and ranges are checked by the schema itself.
fn set_field<T>(section: &mut T, key: &str, name: &str, value: &str) -> Result<(), AnnotationError>
where
    T: Serialize + serde::de::DeserializeOwned,
{
    let mut table = crate::schema::to_table(section)
        .ok_or_else(|| bad(name, value, "internal: section does not serialise"))?;
    let current = table
        .get(key)
        .cloned()
        .unwrap_or(toml::Value::String(String::new()));
    let parsed = parse_like(&current, value).map_err(|e| bad(name, value, &e.to_string()))?;
    table.insert(key.to_string(), parsed);
    *section = toml::Value::Table(table)
        .try_into()
        .map_err(|e: toml::de::Error| bad(name, value, e.message().trim()))?;
    Ok(())
}

/// Why an annotation's value does not fit its key's type.
#[derive(Debug, thiserror::Error)]
enum ValueError {
    /// Not a value of the key's type (`expected true or false`...).
    #[error("expected {0}")]
    Expected(&'static str),
    /// Not a JSON array of strings.
    #[error("expected a JSON array of strings: {0}")]
    Array(#[source] serde_json::Error),
}

fn parse_like(current: &toml::Value, value: &str) -> Result<toml::Value, ValueError> {
    let v = value.trim();
    Ok(match current {
        toml::Value::Boolean(_) => {
            toml::Value::Boolean(parse_bool(v).ok_or(ValueError::Expected("true or false"))?)
        }
        toml::Value::Integer(_) => toml::Value::Integer(
            v.parse::<i64>()
                .map_err(|_| ValueError::Expected("an integer"))?,
        ),
        toml::Value::Float(_) => toml::Value::Float(
            v.parse::<f64>()
                .map_err(|_| ValueError::Expected("a number"))?,
        ),
        toml::Value::Array(_) => {
            let items: Vec<String> = if v.starts_with('[') {
                serde_json::from_str(v).map_err(ValueError::Array)?
            } else {
                v.split(';')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .collect()
            };
            toml::Value::Array(items.into_iter().map(toml::Value::String).collect())
        }
        _ => toml::Value::String(value.to_string()),
    })
}

/// Go's `strconv.ParseBool`, which Kata uses for annotations.
fn parse_bool(v: &str) -> Option<bool> {
    match v {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Some(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Some(false),
        _ => None,
    }
}
