//! Every annotation rule: allowed, refused by regex, refused by glob, malformed value, unknown
//! key, not dynamic, priority, container-level annotations.

mod common;
use common::*;
use kata_config::annotations::ContainerType;

const HV: &str = "io.katacontainers.config.hypervisor.";

fn cfg(extra: &str) -> kata_config::Config {
    parse_ok(&qemu(extra))
}

#[test]
fn allowed_annotation_overrides_the_file() {
    let mut c =
        cfg("default_vcpus = 1\nenable_annotations = [\"default_vcpus\", \"default_memory\"]");
    annotate(
        &mut c,
        &[
            ("io.katacontainers.config.hypervisor.default_vcpus", "5"),
            ("io.katacontainers.config.hypervisor.default_memory", "1024"),
        ],
    )
    .expect("allowed");
    assert_eq!(c.hypervisor.default_vcpus, 5, "annotation > file");
    assert_eq!(c.hypervisor.default_memory, 1024);
}

#[test]
fn file_beats_default_and_default_applies_without_either() {
    let c = cfg("default_memory = 4096");
    assert_eq!(c.hypervisor.default_memory, 4096);
    assert_eq!(cfg("").hypervisor.default_memory, 2048);
}

#[test]
fn regexes_match_the_whole_name() {
    let mut c = cfg("enable_annotations = [\"default_.*\", \"enable_iommu\"]");
    annotate(
        &mut c,
        &[
            (&format!("{HV}default_maxvcpus"), "4"),
            (&format!("{HV}enable_iommu"), "true"),
        ],
    )
    .expect("allowed");
    assert!(c.hypervisor.enable_iommu);
    let e = annotate(&mut c, &[(&format!("{HV}enable_iommu_platform"), "true")])
        .expect_err("prefix only");
    assert!(e.contains("add a regular expression matching \"enable_iommu_platform\" to [hypervisor.qemu].enable_annotations"), "{e}");
}

#[test]
fn refused_by_regex_names_annotation_value_and_key() {
    let mut c = cfg("enable_annotations = [\"enable_iommu\"]");
    let e = annotate(&mut c, &[(&format!("{HV}default_vcpus"), "5")]).expect_err("refused");
    assert_eq!(
        e,
        "refused annotations for configuration /test/configuration.toml: annotation io.katacontainers.config.hypervisor.default_vcpus=\"5\" is refused: add a regular expression matching \"default_vcpus\" to [hypervisor.qemu].enable_annotations (now [\"enable_iommu\"])"
    );
    assert_eq!(c.hypervisor.default_vcpus, 1, "nothing applied on error");
}

#[test]
fn path_annotations_need_a_matching_glob() {
    let mut c = cfg("enable_annotations = [\"path\", \"kernel\", \"virtio_fs_daemon\"]\nvalid_hypervisor_paths = [\"/usr/bin/qemu-*\"]");
    annotate(
        &mut c,
        &[(&format!("{HV}path"), "/usr/bin/qemu-system-x86_64")],
    )
    .expect("glob matches");
    assert_eq!(c.hypervisor.path, "/usr/bin/qemu-system-x86_64");
    let e = annotate(&mut c, &[(&format!("{HV}path"), "/tmp/evil")]).expect_err("glob");
    assert!(e.contains("path=\"/tmp/evil\" is refused: the path matches no pattern of [hypervisor.qemu].valid_hypervisor_paths (now [\"/usr/bin/qemu-*\"])"), "{e}");
    let e = annotate(
        &mut c,
        &[(&format!("{HV}path"), "/usr/bin/qemu-x/../../tmp/evil")],
    )
    .expect_err("* does not cross /");
    assert!(e.contains("valid_hypervisor_paths"), "{e}");
    let e = annotate(&mut c, &[(&format!("{HV}kernel"), "/k2")]).expect_err("empty list refuses");
    assert!(e.contains("valid_kernel_paths (now [])"), "{e}");
    let e = annotate(&mut c, &[(&format!("{HV}virtio_fs_daemon"), "/bin/sh")]).expect_err("daemon");
    assert!(e.contains("valid_virtio_fs_daemon_paths"), "{e}");
}

#[test]
fn entropy_source_uses_its_list() {
    let mut c = cfg("enable_annotations = [\"entropy_source\"]");
    annotate(&mut c, &[(&format!("{HV}entropy_source"), "/dev/random")]).expect("default list");
    assert_eq!(c.hypervisor.entropy_source, "/dev/random");
    assert!(annotate(&mut c, &[(&format!("{HV}entropy_source"), "/dev/sda")]).is_err());
}

#[test]
fn malformed_values_are_refused() {
    let mut c = cfg("enable_annotations = [\".*\"]");
    for (key, value, expect) in [
        ("default_vcpus", "five", "expected an integer"),
        ("default_vcpus", "-1", "u32"),
        ("enable_iommu", "yes", "expected true or false"),
        ("shared_fs", "nfs", "virtio-fs"),
        ("virtio_fs_extra_args", "[1, 2]", "JSON array of strings"),
    ] {
        let e = annotate(&mut c, &[(&format!("{HV}{key}"), value)]).expect_err(key);
        assert!(
            e.contains(&format!("{HV}{key}={value:?} has an invalid value")) && e.contains(expect),
            "{key}: {e}"
        );
    }
}

#[test]
fn list_values_accept_json_or_semicolons() {
    let mut c = cfg("enable_annotations = [\"virtio_fs_extra_args\"]");
    annotate(
        &mut c,
        &[(&format!("{HV}virtio_fs_extra_args"), "[\"-o\", \"xattr\"]")],
    )
    .expect("json");
    assert_eq!(c.hypervisor.virtio_fs_extra_args, vec!["-o", "xattr"]);
    c.runtime.enable_annotations = vec!["kernel_modules".into()];
    annotate(
        &mut c,
        &[(
            "io.katacontainers.config.agent.kernel_modules",
            "e1000e EEE=1; i915",
        )],
    )
    .expect("agent");
    assert_eq!(c.agent.kernel_modules, vec!["e1000e EEE=1", "i915"]);
}

#[test]
fn unknown_and_not_dynamic_keys_are_refused() {
    let mut c = cfg("enable_annotations = [\".*\"]");
    let e = annotate(&mut c, &[(&format!("{HV}default_vcpu"), "2")]).expect_err("unknown");
    assert!(e.contains("annotation io.katacontainers.config.hypervisor.default_vcpu is unknown (did you mean io.katacontainers.config.hypervisor.default_vcpus?)"), "{e}");
    let e = annotate(&mut c, &[(&format!("{HV}default_bridges"), "2")]).expect_err("static");
    assert!(
        e.contains("[hypervisor.qemu].default_bridges can only be set in the configuration file"),
        "{e}"
    );
    let e = annotate(
        &mut c,
        &[("io.katacontainers.config.runtime.enable_debug", "true")],
    )
    .expect_err("static");
    assert!(
        e.contains("[runtime].enable_debug can only be set in the configuration file"),
        "{e}"
    );
    let e = annotate(&mut c, &[("io.katacontainers.something", "x")]).expect_err("unknown prefix");
    assert!(
        e.contains("annotation io.katacontainers.something is unknown"),
        "{e}"
    );
    let e = annotate(&mut c, &[(&format!("{HV}kernel_hash"), "abc")]).expect_err("unsupported");
    assert!(e.contains("is not supported by this runtime"), "{e}");
}

#[test]
fn all_refusals_are_reported_together() {
    let mut c = cfg("");
    let e = annotate(
        &mut c,
        &[
            (&format!("{HV}default_vcpus"), "2"),
            ("io.katacontainers.config.runtime.nope", "1"),
        ],
    )
    .expect_err("two");
    assert!(
        e.contains("default_vcpus") && e.contains("runtime.nope"),
        "{e}"
    );
}

#[test]
fn kata_alias_default_max_vcpus() {
    let mut c = cfg("enable_annotations = [\"default_max_vcpus\"]");
    annotate(&mut c, &[(&format!("{HV}default_max_vcpus"), "3")]).expect("alias");
    assert_eq!(c.hypervisor.default_maxvcpus, 3);
}

#[test]
fn runtime_and_agent_annotations_that_stay_in_the_guest_need_no_allow_list() {
    let mut c = cfg("");
    annotate(
        &mut c,
        &[
            ("io.katacontainers.config.agent.enable_tracing", "1"),
            (
                "io.katacontainers.config.agent.container_pipe_size",
                "65536",
            ),
        ],
    )
    .expect("runtime/agent");
    assert!(c.agent.enable_tracing);
    assert_eq!(c.agent.container_pipe_size, 65536);
}

#[test]
fn annotations_that_change_the_host_need_runtime_enable_annotations() {
    let host = [
        (
            "io.katacontainers.config.runtime.internetworking_model",
            "none",
        ),
        ("io.katacontainers.config.runtime.disable_new_netns", "true"),
        (
            "io.katacontainers.config.runtime.sandbox_cgroup_only",
            "true",
        ),
        (
            "io.katacontainers.config.runtime.disable_guest_seccomp",
            "true",
        ),
        ("io.katacontainers.config.agent.kernel_modules", "e1000e"),
    ];
    let mut c = cfg("");
    for (name, value) in host {
        let e = annotate(&mut c, &[(name, value)]).expect_err(name);
        let key = name.rsplit('.').next().expect("key");
        assert!(
            e.contains(&format!(
                "add a regular expression matching \"{key}\" to [runtime].enable_annotations"
            )),
            "{e}"
        );
    }
    assert!(!c.runtime.disable_new_netns, "nothing applied");
    // Allowed by the node admin: applied.
    let mut c = cfg("");
    c.runtime.enable_annotations = vec![
        "disable_.*".into(),
        "internetworking_model".into(),
        "sandbox_cgroup_only".into(),
        "kernel_modules".into(),
    ];
    annotate(&mut c, &host).expect("allowed");
    assert!(
        c.runtime.disable_new_netns
            && c.runtime.sandbox_cgroup_only
            && c.runtime.disable_guest_seccomp
    );
    assert_eq!(c.agent.kernel_modules, vec!["e1000e"]);
    // From a file: the [runtime] key itself, never from an annotation.
    let e = annotate(
        &mut cfg(""),
        &[(
            "io.katacontainers.config.runtime.enable_annotations",
            "[\".*\"]",
        )],
    )
    .expect_err("static");
    assert!(
        e.contains("can only be set in the configuration file"),
        "{e}"
    );
}

#[test]
fn container_level_annotations() {
    let mut c = cfg("");
    let out = annotate(
        &mut c,
        &[
            ("io.katacontainers.container.resource.swappiness", "60"),
            (
                "io.katacontainers.container.resource.swap_in_bytes",
                "1048576",
            ),
            ("io.katacontainers.pkg.oci.container_type", "pod_sandbox"),
            ("io.katacontainers.pkg.oci.bundle_path", "/run/bundle"),
            ("io.kubernetes.cri.sandbox-id", "ignored: not ours"),
        ],
    )
    .expect("container");
    assert_eq!(out.swappiness, Some(60));
    assert_eq!(out.swap_in_bytes, Some(1048576));
    assert_eq!(out.container_type, Some(ContainerType::PodSandbox));
    assert_eq!(out.bundle_path.as_deref(), Some("/run/bundle"));
    for (k, v) in [
        ("io.katacontainers.container.resource.swappiness", "101"),
        ("io.katacontainers.container.resource.swap_in_bytes", "-1"),
        ("io.katacontainers.pkg.oci.container_type", "sandbox"),
        ("io.katacontainers.pkg.oci.bundle_path", "relative"),
    ] {
        assert!(annotate(&mut c, &[(k, v)]).is_err(), "{k}={v}");
    }
}

#[test]
fn annotation_changes_are_validated_afterwards() {
    let mut c = cfg("enable_annotations = [\"default_memory\"]");
    annotate(&mut c, &[(&format!("{HV}default_memory"), "64")]).expect("applied");
    let e = kata_config::error_chain(&c.validate(&HOST).expect_err("too small"));
    assert!(
        e.contains("default_memory = 64 MiB is below the minimum"),
        "{e}"
    );
}

#[test]
fn the_image_annotation_needs_valid_image_paths() {
    let mut c = cfg("enable_annotations = [\"image\"]");
    let e = annotate(
        &mut c,
        &[(
            &format!("{HV}image"),
            "/opt/kata/share/kata-containers/other.img",
        )],
    )
    .expect_err("empty list refuses");
    assert!(e.contains("valid_image_paths (now [])"), "{e}");
    let mut c = cfg("enable_annotations = [\"image\"]\nvalid_image_paths = [\"/opt/kata/share/kata-containers/*\"]");
    annotate(
        &mut c,
        &[(
            &format!("{HV}image"),
            "/opt/kata/share/kata-containers/other.img",
        )],
    )
    .expect("glob matches");
    assert_eq!(
        c.hypervisor.image,
        "/opt/kata/share/kata-containers/other.img"
    );
    let e = annotate(&mut c, &[(&format!("{HV}image"), "/tmp/evil.img")]).expect_err("glob");
    assert!(
        e.contains("image=\"/tmp/evil.img\" is refused") && e.contains("valid_image_paths"),
        "{e}"
    );
    let mut c = cfg("valid_image_paths = [\"/opt/kata/share/kata-containers/*\"]");
    let e = annotate(
        &mut c,
        &[(
            &format!("{HV}image"),
            "/opt/kata/share/kata-containers/other.img",
        )],
    )
    .expect_err("not in enable_annotations");
    assert!(e.contains("enable_annotations"), "{e}");
}
