//! Parsers of untrusted input never panic.

mod common;
use common::*;
use proptest::prelude::*;

fn key() -> impl Strategy<Value = String> {
    let known: Vec<String> = kata_config::annotations::known_annotations();
    prop_oneof![
        proptest::sample::select(known),
        "io\\.katacontainers\\.[a-z_.]{0,40}",
        ".{0,30}",
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_annotations_never_panic(pairs in proptest::collection::vec((key(), ".{0,40}"), 0..8)) {
        let mut c = parse_ok(&qemu("enable_annotations = [\".*\"]\nvalid_hypervisor_paths = [\"/*\"]"));
        let map = pairs.into_iter().collect();
        if c.apply_annotations(&map).is_ok() {
            let _ = c.validate(&HOST);
        }
    }

    #[test]
    fn arbitrary_text_never_panics(text in ".{0,300}") {
        if let Ok(mut c) = parse(&text) {
            let _ = c.validate(&HOST);
        }
    }

    #[test]
    fn arbitrary_values_of_known_keys_never_panic(
        idx in 0usize..kata_config::HypervisorConfig::KEYS.len(),
        value in prop_oneof![Just("true".to_string()), "-?[0-9]{1,12}", "\"[ -~]{0,20}\"", Just("[\"a\", 1]".to_string()), Just("{ x = 1 }".to_string())],
        vcpus in 0u32..64, mem in 0u32..40000,
    ) {
        let name = kata_config::HypervisorConfig::KEYS[idx].name;
        let text = format!("[hypervisor.qemu]\ndefault_vcpus = {vcpus}\ndefault_memory = {mem}\n{name} = {value}\n");
        if let Ok(mut c) = parse(&text) {
            let _ = c.validate(&HOST);
        }
    }
}
