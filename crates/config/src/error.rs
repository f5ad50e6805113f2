//! Errors of the configuration library.

use std::error::Error as StdError;
use std::path::PathBuf;

use crate::annotations::AnnotationErrors;
use crate::validate::ValidationError;

/// Everything that can go wrong while producing a [`crate::Config`].
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// No file in the search order exists.
    #[error("no Kata configuration file found (looked at {}); install one with 'make install' or set KATA_CONF_FILE", list(.searched))]
    NotFound {
        /// Paths tried, in order.
        searched: Vec<PathBuf>,
    },
    /// A file named explicitly (ConfigPath, annotation, KATA_CONF_FILE) does not exist.
    #[error("configuration file {path} (from {origin}) does not exist")]
    Missing {
        /// The path.
        path: PathBuf,
        /// Who named it.
        origin: String,
    },
    /// A file could not be read.
    #[error("failed to read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// TOML syntax or type error.
    #[error("{path}:{line}:{column}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// What the TOML parser said.
        message: String,
    },
    /// A key the schema does not know.
    #[error("{path}:{line}: unknown key `{key}` in [{section}]{}", hint(.suggestion))]
    UnknownKey {
        /// The file.
        path: PathBuf,
        /// 1-based line (0 when it could not be located).
        line: usize,
        /// Section, for example `hypervisor.qemu`.
        section: String,
        /// The key.
        key: String,
        /// Closest known key.
        suggestion: Option<String>,
    },
    /// A section the schema does not know.
    #[error("{path}:{line}: unknown section [{section}]{}", hint(.suggestion))]
    UnknownSection {
        /// The file.
        path: PathBuf,
        /// 1-based line (0 when it could not be located).
        line: usize,
        /// The section.
        section: String,
        /// Closest known section.
        suggestion: Option<String>,
    },
    /// No `[hypervisor.*]` section.
    #[error("{path}: no [hypervisor.<name>] section; add one of [hypervisor.qemu], [hypervisor.clh], [hypervisor.firecracker], [hypervisor.dragonball]")]
    NoHypervisor {
        /// The file.
        path: PathBuf,
    },
    /// More than one `[hypervisor.*]` section.
    #[error("{path}: {} hypervisor sections ({}); keep exactly one", .found.len(), .found.join(", "))]
    ManyHypervisors {
        /// The file.
        path: PathBuf,
        /// Section names found.
        found: Vec<String>,
    },
    /// An `[agent.*]` section other than `[agent.kata]`.
    #[error("{path}: unknown agent section [agent.{name}]; the only agent is [agent.kata]")]
    UnknownAgent {
        /// The file.
        path: PathBuf,
        /// The agent name.
        name: String,
    },
    /// Validation failed.
    #[error("invalid configuration {path}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        #[source]
        source: ValidationError,
    },
    /// Annotations were refused.
    #[error("refused annotations for configuration {path}")]
    Annotations {
        /// The file the annotations were applied to.
        path: PathBuf,
        /// Each refused annotation.
        #[source]
        source: AnnotationErrors,
    },
}

fn list(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

fn hint(s: &Option<String>) -> String {
    match s {
        Some(s) => format!(" (did you mean `{s}`?)"),
        None => String::new(),
    }
}

/// Formats an error and its sources once, joined by ": ".
pub fn error_chain(err: &(dyn StdError + 'static)) -> String {
    let mut out = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        let s = e.to_string();
        if !out.ends_with(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        cur = e.source();
    }
    out
}
