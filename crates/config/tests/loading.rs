//! File structure, unknown keys, the search order and drop-ins.

mod common;
use std::collections::BTreeMap;
use std::path::PathBuf;

use common::*;
use kata_config::load::{load, load_path, resolve, FoundBy, SearchInputs};
use kata_config::HypervisorKind;

#[test]
fn unknown_key_names_file_line_and_suggestion() {
    let e = parse(&qemu("defualt_vcpus = 2")).expect_err("typo");
    assert_eq!(
        kata_config::error_chain(&e),
        "/test/configuration.toml:5: unknown key `defualt_vcpus` in [hypervisor.qemu] (did you mean `default_vcpus`?)"
    );
    let e = parse(&format!(
        "{}[runtime]\n\ninternetworking_mode = \"none\"\n",
        qemu("")
    ))
    .expect_err("typo");
    assert!(kata_config::error_chain(&e).contains(":8: unknown key `internetworking_mode` in [runtime] (did you mean `internetworking_model`?)"));
    let e = parse(&qemu("completely_unrelated_thing = 1")).expect_err("unknown");
    assert!(!kata_config::error_chain(&e).contains("did you mean"));
}

#[test]
fn unknown_sections_are_errors() {
    let e = parse("[hypervisor.qemuu]\n").expect_err("section");
    assert!(kata_config::error_chain(&e)
        .contains(":1: unknown section [hypervisor.qemuu] (did you mean `hypervisor.qemu`?)"));
    let e = parse(&format!("{}[runtim]\n", qemu(""))).expect_err("section");
    assert!(
        kata_config::error_chain(&e).contains("unknown section [runtim] (did you mean `runtime`?)")
    );
    let e = parse(&format!("{}[agent.other]\n", qemu(""))).expect_err("agent");
    assert!(kata_config::error_chain(&e).contains("unknown section [agent.other]"));
}

#[test]
fn syntax_errors_have_positions() {
    let e = parse("[hypervisor.qemu]\npath = \n").expect_err("syntax");
    let s = kata_config::error_chain(&e);
    assert!(s.starts_with("/test/configuration.toml:2:"), "{s}");
}

#[test]
fn a_value_of_the_wrong_type_or_variant_names_its_key() {
    let e = parse("[hypervisor.qemu]\nshared_fs = \"nfs\"\n").expect_err("nfs");
    let s = kata_config::error_chain(&e);
    assert!(
        s.starts_with("/test/configuration.toml:2:13: `shared_fs` in [hypervisor.qemu]: unknown variant `nfs`, expected one of `virtio-fs`"),
        "{s}"
    );
    let e = parse(&format!(
        "{}# a comment\n[runtime]\n# another\nenable_debug = \"yes\"\n",
        qemu("")
    ))
    .expect_err("type");
    let s = kata_config::error_chain(&e);
    assert!(
        s.contains("`enable_debug` in [runtime]: invalid type: string \"yes\", expected a boolean"),
        "{s}"
    );
    // A value that spans lines: the key on the line that opened it.
    let e =
        parse("[hypervisor.qemu]\nenable_annotations = [\n  \"a\",\n  2,\n]\n").expect_err("array");
    let s = kata_config::error_chain(&e);
    assert!(
        s.contains(":4:3: `enable_annotations` in [hypervisor.qemu]:"),
        "{s}"
    );
}

#[test]
fn exactly_one_hypervisor_section() {
    let e = parse("[runtime]\n").expect_err("none");
    assert!(kata_config::error_chain(&e).contains("no [hypervisor.<name>] section"));
    let e = parse("[hypervisor.qemu]\n[hypervisor.clh]\n").expect_err("two");
    assert!(kata_config::error_chain(&e)
        .contains("2 hypervisor sections ([hypervisor.clh], [hypervisor.qemu]); keep exactly one"));
    assert_eq!(
        parse_ok("[hypervisor.firecracker]\n").hypervisor_kind,
        HypervisorKind::Firecracker
    );
}

#[test]
fn unsupported_keys_are_reported_not_refused() {
    let c = parse_ok(&qemu("enable_iothreads = true\njailer_path = \"/j\""));
    let keys: Vec<&str> = c.unsupported.iter().map(|u| u.key.as_str()).collect();
    assert_eq!(keys, ["jailer_path", "enable_iothreads"]);
}

struct Tree {
    _dir: tempfile::TempDir,
    root: PathBuf,
}

fn tree(files: &[(&str, &str)]) -> Tree {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().to_path_buf();
    for (rel, text) in files {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        std::fs::write(&p, text).expect("write");
    }
    Tree { _dir: dir, root }
}

fn inputs(t: &Tree) -> SearchInputs {
    SearchInputs {
        explicit: None,
        annotations: BTreeMap::new(),
        env_file: None,
        default_paths: vec![
            t.root.join("etc/configuration.toml"),
            t.root.join("opt/configuration.toml"),
        ],
        allowed_dirs: vec![t.root.join("etc"), t.root.join("opt")],
    }
}

#[test]
fn search_order() {
    let q = qemu("");
    let t = tree(&[
        ("etc/configuration.toml", &q),
        ("opt/configuration.toml", &q),
        ("opt/alt.toml", &q),
        ("other/x.toml", &q),
    ]);
    let mut i = inputs(&t);
    assert_eq!(
        resolve(&i).expect("default"),
        (
            t.root.join("etc/configuration.toml"),
            FoundBy::DefaultLocation
        )
    );
    std::fs::remove_file(t.root.join("etc/configuration.toml")).expect("rm");
    assert_eq!(
        resolve(&i).expect("second"),
        (
            t.root.join("opt/configuration.toml"),
            FoundBy::DefaultLocation
        )
    );
    i.env_file = Some(t.root.join("other/x.toml"));
    assert_eq!(resolve(&i).expect("env").1, FoundBy::Environment);
    i.annotations.insert(
        "io.katacontainers.config_path".into(),
        t.root.join("opt/alt.toml").display().to_string(),
    );
    let (p, by) = resolve(&i).expect("annotation");
    assert_eq!(by, FoundBy::Annotation);
    assert!(p.ends_with("opt/alt.toml"));
    // Outside the allowed directories: refused, naming the annotation.
    i.annotations.insert(
        "io.katacontainers.config_path".into(),
        t.root.join("other/x.toml").display().to_string(),
    );
    let e = kata_config::error_chain(&resolve(&i).expect_err("outside"));
    assert!(
        e.contains("annotation io.katacontainers.config_path=")
            && e.contains("must name a file inside"),
        "{e}"
    );
    // containerd's ConfigPath wins, and then the annotation is refused rather than ignored.
    i.explicit = Some((t.root.join("opt/alt.toml"), FoundBy::RuntimeOption));
    let e = kata_config::error_chain(&resolve(&i).expect_err("fixed"));
    assert!(
        e.contains("the configuration is fixed by the containerd runtime option ConfigPath"),
        "{e}"
    );
    i.annotations.clear();
    assert_eq!(resolve(&i).expect("option").1, FoundBy::RuntimeOption);
    i.explicit = Some((t.root.join("missing.toml"), FoundBy::RuntimeOption));
    let e = kata_config::error_chain(&resolve(&i).expect_err("missing"));
    assert!(
        e.contains("missing.toml (from containerd runtime option ConfigPath) does not exist"),
        "{e}"
    );
}

#[test]
fn nothing_found_lists_the_places_searched() {
    let t = tree(&[]);
    let e = kata_config::error_chain(&load(&inputs(&t)).expect_err("none"));
    assert!(
        e.starts_with("no Kata configuration file found (looked at ")
            && e.contains("etc/configuration.toml"),
        "{e}"
    );
}

#[test]
fn dropins_merge_in_lexical_order() {
    let t = tree(&[
        ("opt/configuration.toml", &qemu("default_memory = 1024\ndefault_vcpus = 1")),
        ("opt/config.d/20-b.toml", "[hypervisor.qemu]\ndefault_memory = 3072\n"),
        ("opt/config.d/10-a.toml", "[hypervisor.qemu]\ndefault_memory = 512\ndefault_vcpus = 2\n[runtime]\nenable_debug = true\n"),
        ("opt/config.d/ignored.txt", "not toml"),
    ]);
    let c = load_path(&t.root.join("opt/configuration.toml"), FoundBy::CommandLine).expect("load");
    assert_eq!(c.hypervisor.default_memory, 3072, "later drop-in wins");
    assert_eq!(c.hypervisor.default_vcpus, 2);
    assert!(c.runtime.enable_debug);
    assert_eq!(
        c.hypervisor.path, "/usr/bin/qemu-system-x86_64",
        "untouched keys keep the base value"
    );
    assert_eq!(c.source.dropins.len(), 2);
    let bad = tree(&[
        ("opt/configuration.toml", &qemu("")),
        (
            "opt/config.d/1.toml",
            "[hypervisor.qemu]\ndefualt_memory = 1\n",
        ),
    ]);
    let e = kata_config::error_chain(
        &load_path(
            &bad.root.join("opt/configuration.toml"),
            FoundBy::CommandLine,
        )
        .expect_err("typo"),
    );
    assert!(
        e.contains("config.d/1.toml:2: unknown key `defualt_memory`"),
        "{e}"
    );
}
