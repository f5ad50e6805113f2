//! Subcommands.

pub mod check;
pub mod direct_volume;
pub mod env;
pub mod exec;
pub mod factory;
pub mod iptables;
pub mod metrics;
pub mod overhead;
pub mod release;
pub mod shim_client;
pub mod version;

use std::collections::BTreeMap;
use std::path::PathBuf;

use kata_config::load::{FoundBy, SearchInputs};

/// The configuration search inputs for a command line (`--config` wins over the search order).
pub fn search_inputs(
    config: Option<PathBuf>,
    annotations: BTreeMap<String, String>,
) -> SearchInputs {
    SearchInputs::standard()
        .with_explicit(config, FoundBy::CommandLine)
        .with_annotations(annotations)
}

/// The search order, for `--show-default-config-paths`.
pub fn default_config_paths() -> Vec<PathBuf> {
    let s = SearchInputs::standard();
    s.env_file.into_iter().chain(s.default_paths).collect()
}

/// An `--annotation` that is not `KEY=VALUE`.
#[derive(Debug, thiserror::Error)]
#[error("expected KEY=VALUE, got {0:?}")]
pub struct NotKeyValue(String);

/// Parses `KEY=VALUE`.
pub fn parse_annotation(s: &str) -> Result<(String, String), NotKeyValue> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(NotKeyValue(s.to_string())),
    }
}
