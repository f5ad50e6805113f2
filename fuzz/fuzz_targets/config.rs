//! Any configuration file text: loaded or refused with a message, never a panic.
#![no_main]
use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(mut c) = kata_config::load::load_str(Path::new("/fuzz.toml"), &text) {
        let _ = c.validate(&kata_config::HostLimits::current());
    }
});
