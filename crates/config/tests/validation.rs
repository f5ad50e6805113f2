//! Every validation rule, each with the message a user sees.

mod common;
use common::*;
use kata_config::Warning;

#[test]
fn minimal_file_is_valid_and_takes_defaults() {
    let c = valid(&qemu(""));
    assert_eq!(c.hypervisor.default_vcpus, 1);
    assert_eq!(c.hypervisor.default_memory, 2048);
    assert_eq!(
        c.hypervisor.default_maxvcpus, HOST.cpus,
        "0 means the host's CPUs"
    );
    assert_eq!(
        u64::from(c.hypervisor.default_maxmemory),
        HOST.memory_mib,
        "0 means the host's memory"
    );
    assert!(c.warnings.is_empty());
}

#[test]
fn image_and_initrd_are_exclusive() {
    let e = invalid(&qemu("image = \"/img\""));
    assert!(e.contains("sets both image (/img) and initrd (/i)"), "{e}");
    let e = invalid("[hypervisor.qemu]\ninitrd = \"\"\nimage = \"\"\n");
    assert!(e.contains("sets neither image nor initrd"), "{e}");
}

#[test]
fn vcpus_rules() {
    let e = invalid(&qemu("default_vcpus = 0"));
    assert!(
        e.contains("default_vcpus = 0; it must be at least 1"),
        "{e}"
    );
    let e = invalid(&qemu("default_vcpus = 4\ndefault_maxvcpus = 2"));
    assert!(
        e.contains("default_vcpus = 4 exceeds default_maxvcpus = 2"),
        "{e}"
    );
    // More vCPUs than host CPUs are honoured (the guide's 5-vCPU pod), with a warning; the
    // implicit maximum follows, an explicit lower one is an error.
    let c = valid(&qemu("default_vcpus = 64"));
    assert_eq!(
        (c.hypervisor.default_vcpus, c.hypervisor.default_maxvcpus),
        (64, 64)
    );
    assert!(c.warnings.contains(&Warning::VcpusOversubscribed {
        requested: 64,
        host: HOST.cpus
    }));
    let e = invalid(&qemu("default_vcpus = 300"));
    assert!(
        e.contains("default_vcpus = 300 is more than the 240 vCPUs a guest can have; lower it"),
        "{e}"
    );
    let c = valid(&qemu("default_maxvcpus = 100"));
    assert_eq!(c.hypervisor.default_maxvcpus, HOST.cpus);
    assert!(c.warnings.contains(&Warning::MaxVcpusClamped {
        requested: 100,
        effective: HOST.cpus
    }));
    let c = valid(&qemu("default_vcpus = 2\ndefault_maxvcpus = 4"));
    assert_eq!(
        (c.hypervisor.default_vcpus, c.hypervisor.default_maxvcpus),
        (2, 4)
    );
}

#[test]
fn negative_vcpus_is_a_type_error_with_position() {
    let e = parse(&qemu("default_vcpus = -1")).expect_err("negative");
    let s = kata_config::error_chain(&e);
    assert!(s.starts_with("/test/configuration.toml:5:"), "{s}");
}

#[test]
fn memory_rules() {
    let e = invalid(&qemu("default_memory = 64"));
    assert!(
        e.contains("default_memory = 64 MiB is below the minimum of 128 MiB"),
        "{e}"
    );
    let e = invalid(&qemu("default_memory = 999999"));
    assert!(e.contains("exceeds 16384 MiB (the host's memory)"), "{e}");
    let e = invalid(&qemu("default_memory = 4096\ndefault_maxmemory = 2048"));
    assert!(e.contains("exceeds 2048 MiB (default_maxmemory)"), "{e}");
    let c = valid(&qemu("default_maxmemory = 999999"));
    assert_eq!(c.hypervisor.default_maxmemory, 16384);
    assert!(c.warnings.contains(&Warning::MaxMemoryClamped {
        requested: 999999,
        effective: 16384
    }));
    let e = invalid(&qemu("memory_slots = 0"));
    assert!(e.contains("memory_slots = 0 leaves no slot"), "{e}");
    valid(&format!(
        "{}[runtime]\nstatic_sandbox_resource_mgmt = true\n",
        qemu("memory_slots = 0")
    ));
}

#[test]
fn bridges_and_msize() {
    valid(&qemu("default_bridges = 5"));
    let e = invalid(&qemu("default_bridges = 6"));
    assert!(
        e.contains("default_bridges = 6; allowed values are 0 to 5"),
        "{e}"
    );
    let e = invalid(&qemu("msize_9p = 100"));
    assert!(
        e.contains("msize_9p = 100; allowed values are 4096 to 1048576"),
        "{e}"
    );
}

#[test]
fn enums_refuse_other_values_and_name_the_allowed_ones() {
    for (key, bad, allowed) in [
        ("block_device_driver", "ide", "virtio-scsi"),
        ("block_device_aio", "posix", "io_uring"),
        ("shared_fs", "nfs", "virtio-9p"),
        ("virtio_fs_cache", "sometimes", "auto"),
        ("accelerator", "hvf", "tcg"),
    ] {
        let e = parse(&qemu(&format!("{key} = \"{bad}\""))).expect_err(key);
        let s = kata_config::error_chain(&e);
        assert!(
            s.contains(bad) && s.contains(allowed) && s.contains("configuration.toml:5:"),
            "{key}: {s}"
        );
    }
    for (key, bad, allowed) in [
        ("internetworking_model", "bridged", "macvtap"),
        ("vfio_mode", "direct", "guest-kernel"),
    ] {
        let e = parse(&format!("{}[runtime]\n{key} = \"{bad}\"\n", qemu(""))).expect_err(key);
        let s = kata_config::error_chain(&e);
        assert!(s.contains(bad) && s.contains(allowed), "{key}: {s}");
    }
    let c = valid(&qemu("virtio_fs_cache = \"never\""));
    assert_eq!(c.hypervisor.virtio_fs_cache.virtiofsd_name(), "never");
}

#[test]
fn hugepages_force_prealloc() {
    let c = valid(&qemu("enable_hugepages = true"));
    assert!(c.hypervisor.enable_mem_prealloc);
    assert!(c.warnings.contains(&Warning::HugepagesForcePrealloc));
}

#[test]
fn virtio_fs_needs_a_daemon() {
    let e = invalid(&qemu("virtio_fs_daemon = \"\""));
    assert!(e.contains("needs virtio_fs_daemon"), "{e}");
    valid(&qemu("virtio_fs_daemon = \"\"\nshared_fs = \"virtio-9p\""));
}

#[test]
fn regexes_and_globs_must_compile() {
    let e = invalid(&qemu("enable_annotations = [\"(\"]"));
    assert!(
        e.contains("enable_annotations has an invalid regular expression \"(\""),
        "{e}"
    );
    let e = invalid(&qemu("valid_hypervisor_paths = [\"/usr/[bin\"]"));
    assert!(
        e.contains("valid_hypervisor_paths has an invalid glob pattern"),
        "{e}"
    );
}

#[test]
fn factory_rules() {
    let e = invalid(&format!(
        "{}[factory]\nenable_template = true\n",
        qemu("shared_fs = \"virtio-9p\"\nreclaim_guest_freed_memory = true")
    ));
    assert!(
        e.contains("reclaim_guest_freed_memory = true") && e.contains("enable_template"),
        "{e}"
    );
    let base = qemu("shared_fs = \"virtio-9p\"\nreclaim_guest_freed_memory = false");
    valid(&format!("{base}[factory]\nenable_template = true\n"));
    let e = invalid(&format!(
        "{base}[factory]\nenable_template = true\nvm_cache_number = 2\n"
    ));
    assert!(e.contains("VM templating and VMCache are exclusive"), "{e}");
    let e = invalid(&format!("{}[factory]\nenable_template = true\n", qemu("")));
    assert!(
        e.contains("needs [hypervisor.qemu].shared_fs = \"virtio-9p\" (now \"virtio-fs\")"),
        "{e}"
    );
    let e = invalid("[hypervisor.qemu]\nimage = \"/img\"\ninitrd = \"\"\nshared_fs = \"virtio-9p\"\n[factory]\nenable_template = true\n");
    assert!(e.contains("needs an initrd guest"), "{e}");
    let e = invalid("[hypervisor.clh]\ninitrd = \"/i\"\nshared_fs = \"virtio-9p\"\n[factory]\nenable_template = true\n");
    assert!(e.contains("needs the qemu hypervisor, not clh"), "{e}");
    let e = invalid(&format!(
        "{base}[agent.kata]\nchannel = \"vsock\"\n[factory]\nenable_template = true\n"
    ));
    assert!(
        e.contains("virtio-serial agent channel") && e.contains("[agent.kata].channel"),
        "{e}"
    );
    valid(&format!(
        "{base}[agent.kata]\nchannel = \"virtio-serial\"\n[factory]\nenable_template = true\n"
    ));
    for key in [
        "enable_hugepages = true",
        "file_mem_backend = \"/dev/shm\"",
        "enable_mem_prealloc = true",
    ] {
        let cfg = qemu(&format!(
            "shared_fs = \"virtio-9p\"\nreclaim_guest_freed_memory = false\n{key}"
        ));
        let e = invalid(&format!("{cfg}[factory]\nenable_template = true\n"));
        let name = key.split(' ').next().unwrap_or_default();
        assert!(
            e.contains(&format!("cannot be combined with [hypervisor.qemu].{name}")),
            "{key}: {e}"
        );
    }
    valid(&format!("{}[factory]\nvm_cache_number = 3\n", qemu("")));
    let e = invalid("[hypervisor.clh]\ninitrd = \"/i\"\n[factory]\nvm_cache_number = 3\n");
    assert!(
        e.contains("vm_cache_number = 3 needs the qemu hypervisor, not clh"),
        "{e}"
    );
    let e = invalid(&format!(
        "{}[factory]\nvm_cache_number = 1\nvm_cache_endpoint = \"cache.sock\"\n",
        qemu("")
    ));
    assert!(
        e.contains("vm_cache_endpoint = \"cache.sock\" must be an absolute path"),
        "{e}"
    );
}

#[test]
fn runtime_and_agent_rules() {
    let e = invalid(&format!("{}[agent.kata]\ndial_timeout = 0\n", qemu("")));
    assert!(e.contains("dial_timeout = 0"), "{e}");
    let e = invalid(&format!(
        "{}[runtime]\nhypervisor_name = \"clh\"\n",
        qemu("")
    ));
    assert!(
        e.contains(
            "hypervisor_name = \"clh\" but the file's hypervisor section is [hypervisor.qemu]"
        ),
        "{e}"
    );
    let e = invalid(&format!("{}[runtime]\nagent_name = \"other\"\n", qemu("")));
    assert!(e.contains("the only agent is \"kata\""), "{e}");
    let e = invalid(&format!("{}[runtime]\nexperimental = [\"x\"]\n", qemu("")));
    assert!(e.contains("no experimental features exist"), "{e}");
}
