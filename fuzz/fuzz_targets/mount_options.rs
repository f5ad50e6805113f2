//! Any option list of an OCI mount, and any destination path: parsed or refused, never a panic;
//! a bind mount never carries filesystem data; a cleaned path never climbs out of its root.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let options: Vec<String> = text.split(',').map(str::to_string).collect();
    for bind in [false, true] {
        if let Ok(o) = kata_mount::parse(&options, bind) {
            if o.bind {
                assert!(o.data.is_empty(), "a bind mount with data: {options:?}");
            }
        }
    }
    let cleaned = kata_mount::safe::clean(std::path::Path::new(&*text));
    assert!(cleaned.is_relative());
    assert!(!cleaned
        .components()
        .any(|c| matches!(c, std::path::Component::ParentDir)));
});
