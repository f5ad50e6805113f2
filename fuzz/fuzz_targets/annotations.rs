//! Any set of pod annotations against a configuration that allows every hypervisor key:
//! applied or refused with errors, never a panic; validation never panics either.
#![no_main]
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

const BASE: &str = "[hypervisor.qemu]\npath = \"/usr/bin/qemu-system-x86_64\"\nkernel = \"/k\"\ninitrd = \"/i\"\nenable_annotations = [\".*\"]\nvalid_hypervisor_paths = [\"/*\"]\n[runtime]\nenable_annotations = [\".*\"]\n";

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut map = BTreeMap::new();
    for line in text.lines() {
        if let Some((k, v)) = line.split_once('=') {
            let k = if k.starts_with("io.") {
                k.to_string()
            } else {
                format!("io.katacontainers.{k}")
            };
            map.insert(k, v.to_string());
        }
    }
    static BASE_CONFIG: OnceLock<kata_config::Config> = OnceLock::new();
    let mut c = BASE_CONFIG
        .get_or_init(|| {
            kata_config::load::load_str(Path::new("/fuzz.toml"), BASE).expect("the base loads")
        })
        .clone();
    if c.apply_annotations(&map).is_ok() {
        let _ = c.validate(&kata_config::HostLimits::current());
    }
});
