#![allow(dead_code)]
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use kata_config::{load, Config, ConfigError, HostLimits};

pub const HOST: HostLimits = HostLimits {
    cpus: 8,
    memory_mib: 16384,
};

pub fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

/// A minimal valid QEMU file plus `extra` lines appended to `[hypervisor.qemu]`.
pub fn qemu(extra: &str) -> String {
    format!("[hypervisor.qemu]\npath = \"/usr/bin/qemu-system-x86_64\"\nkernel = \"/k\"\ninitrd = \"/i\"\n{extra}\n")
}

pub fn parse(text: &str) -> Result<Config, ConfigError> {
    load::load_str(Path::new("/test/configuration.toml"), text)
}

pub fn parse_ok(text: &str) -> Config {
    match parse(text) {
        Ok(c) => c,
        Err(e) => panic!("{}", kata_config::error_chain(&e)),
    }
}

pub fn valid(text: &str) -> Config {
    let mut c = parse_ok(text);
    if let Err(e) = c.validate(&HOST) {
        panic!("{}", kata_config::error_chain(&e));
    }
    c
}

pub fn invalid(text: &str) -> String {
    let mut c = parse_ok(text);
    match c.validate(&HOST) {
        Ok(()) => panic!("expected a validation error for:\n{text}"),
        Err(e) => kata_config::error_chain(&e),
    }
}

pub fn annotations(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

pub fn annotate(
    config: &mut Config,
    pairs: &[(&str, &str)],
) -> Result<kata_config::ContainerAnnotations, String> {
    config
        .apply_annotations(&annotations(pairs))
        .map_err(|e| kata_config::error_chain(&e))
}
