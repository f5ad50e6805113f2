//! Kata 3.0.0's own files load unchanged; the shipped files and docs are the generated ones.

mod common;
use common::*;
use kata_config::generate::{configuration_md, file_name, shipped_toml, SHIPPED};
use kata_config::load::{load_path, FoundBy};
use kata_config::HypervisorKind;

#[test]
fn every_kata_3_0_reference_file_loads_and_validates() {
    let dir = data("kata-3.0.0");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).expect("reference dir") {
        let path = entry.expect("entry").path();
        if path.extension().is_none_or(|e| e != "toml") {
            continue;
        }
        let mut c = load_path(&path, FoundBy::CommandLine)
            .unwrap_or_else(|e| panic!("{}: {}", path.display(), kata_config::error_chain(&e)));
        c.validate(&HOST)
            .unwrap_or_else(|e| panic!("{}: {}", path.display(), kata_config::error_chain(&e)));
        seen += 1;
    }
    assert_eq!(seen, 5, "expected the five Kata 3.0.0 files");
}

#[test]
fn reference_files_select_their_hypervisor_and_keep_values() {
    let cases = [
        ("configuration-qemu.toml", HypervisorKind::Qemu),
        ("configuration-clh.toml", HypervisorKind::Clh),
        ("configuration-fc.toml", HypervisorKind::Firecracker),
        ("configuration-dragonball.toml", HypervisorKind::Dragonball),
        ("configuration-acrn.toml", HypervisorKind::Acrn),
    ];
    for (file, kind) in cases {
        let c = load_path(&data("kata-3.0.0").join(file), FoundBy::CommandLine).expect(file);
        assert_eq!(c.hypervisor_kind, kind, "{file}");
        assert_eq!(c.hypervisor.default_memory, 2048, "{file}");
    }
    let q = load_path(
        &data("kata-3.0.0/configuration-qemu.toml"),
        FoundBy::CommandLine,
    )
    .expect("qemu");
    assert_eq!(q.hypervisor.path, "/opt/kata/bin/qemu-system-x86_64");
    assert_eq!(
        q.hypervisor.image,
        "/opt/kata/share/kata-containers/kata-containers.img"
    );
    assert!(
        q.hypervisor.initrd.is_empty(),
        "a file that sets image must not inherit the default initrd"
    );
    assert_eq!(q.hypervisor.cpu_features, "pmu=off");
    assert_eq!(
        q.hypervisor.enable_annotations,
        vec!["enable_iommu".to_string()]
    );
    // Image boot is implemented: the key is not reported as unsupported.
    assert!(
        !q.unsupported.iter().any(|u| u.key == "image"),
        "{:?}",
        q.unsupported
    );
}

fn repo_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Compares (or with KATA_REGENERATE=1 rewrites) a generated file.
fn check_generated(rel: &str, expected: &str) {
    let path = repo_root().join(rel);
    if std::env::var_os("KATA_REGENERATE").is_some() {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).expect("mkdir");
        }
        std::fs::write(&path, expected).expect("write generated file");
        return;
    }
    let actual = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        actual == expected,
        "{rel} is not the generated one; run 'make generate'"
    );
}

#[test]
fn shipped_files_are_generated_from_the_schema() {
    for kind in SHIPPED {
        check_generated(&format!("config/{}", file_name(kind)), &shipped_toml(kind));
    }
}

#[test]
fn configuration_doc_is_generated_from_the_schema() {
    check_generated("docs/configuration.md", &configuration_md());
}

#[test]
fn shipped_files_load_and_validate() {
    for kind in SHIPPED {
        let mut c = parse_ok(&shipped_toml(kind));
        assert_eq!(c.hypervisor_kind, kind);
        c.validate(&HOST)
            .unwrap_or_else(|e| panic!("{kind}: {}", kata_config::error_chain(&e)));
    }
    let q = parse_ok(&shipped_toml(HypervisorKind::Qemu));
    assert!(
        q.unsupported.is_empty(),
        "the shipped qemu file must only use supported keys: {:?}",
        q.unsupported
    );
}

#[test]
fn shipped_files_document_every_applicable_key() {
    let text = shipped_toml(HypervisorKind::Qemu);
    for spec in kata_config::HypervisorConfig::KEYS
        .iter()
        .filter(|k| k.applies_to(HypervisorKind::Qemu))
    {
        let line = format!("\n{} = ", spec.name);
        let pos = text
            .find(&line)
            .unwrap_or_else(|| panic!("{} missing", spec.name));
        assert!(
            text[..pos]
                .ends_with(|c: char| c == '.' || c.is_alphanumeric() || c == ')' || c == '`'),
            "{} has no comment",
            spec.name
        );
    }
    assert!(
        !text.contains("\njailer_path"),
        "firecracker-only keys stay out of the qemu file"
    );
}
