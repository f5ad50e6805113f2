//! Unit tests of [`super`].

use super::*;

fn handed(id: &str) -> GrpcVm {
    let h = HandedVm {
        id: id.into(),
        qmp_channel_path: format!("/run/vc/vm/{id}/qmp.sock"),
        qemu_pid: 42,
        virtiofsd_pid: Some(43),
        agent_url: format!("unix:///run/vc/vm/{id}/agent.sock"),
    };
    GrpcVm {
        id: id.into(),
        hypervisor: serde_json::to_vec(&h).expect("json"),
        proxy_pid: 42,
        proxy_url: h.agent_url.clone(),
        cpu: 1,
        memory: 2048,
        cpu_delta: 0,
    }
}

#[test]
fn a_handed_vm_must_be_a_cache_vm() {
    let t = parse_handed(&handed("vmcache-0a1b2c")).expect("valid");
    assert_eq!(
        (t.id.as_str(), t.qemu_pid, t.virtiofsd_pid, t.cpu, t.memory),
        ("vmcache-0a1b2c", 42, Some(43), 1, 2048)
    );
    for bad in ["../etc", "vmcache-../x", "sandbox-1", ""] {
        let e = parse_handed(&handed(bad)).expect_err(bad);
        assert!(
            e.to_string().contains("is not a cached VM's id"),
            "{bad}: {e}"
        );
    }
    let mut garbled = handed("vmcache-00");
    garbled.hypervisor = b"{}".to_vec();
    assert!(parse_handed(&garbled)
        .expect_err("garbled")
        .to_string()
        .contains("not this runtime's"));
}

#[test]
fn owner_records_tell_live_servers_from_dead_ones() {
    let t = tempfile::tempdir().expect("tempdir");
    let dir = t.path();
    std::fs::write(dir.join(OWNER_FILE), owner_record()).expect("write");
    assert!(!orphaned(dir, None), "this process is alive");
    assert!(
        orphaned(dir, Some(std::process::id())),
        "owned by this server"
    );
    assert!(!orphaned(dir, Some(1)), "not server 1's");
    let me = std::process::id();
    std::fs::write(dir.join(OWNER_FILE), format!("server {me} 1\n")).expect("write");
    assert!(orphaned(dir, None), "same pid, another start time: dead");
    std::fs::write(dir.join(OWNER_FILE), format!("handed {}\n", unix_now())).expect("write");
    assert!(!orphaned(dir, None), "just handed over");
    std::fs::write(dir.join(OWNER_FILE), "handed 1000\n").expect("write");
    assert!(orphaned(dir, None), "handed long ago, never renamed");
    std::fs::remove_file(dir.join(OWNER_FILE)).expect("rm");
    assert!(!orphaned(dir, None), "being created");
}

#[test]
fn the_proto_keeps_katas_field_numbers() {
    use prost::Message;
    let vm = GrpcVm {
        id: "a".into(),
        hypervisor: vec![1],
        proxy_pid: 2,
        proxy_url: "b".into(),
        cpu: 3,
        memory: 4,
        cpu_delta: 5,
    };
    // field 1 string, 2 bytes, 3 varint, 4 string, 5/6/7 varints.
    assert_eq!(
        vm.encode_to_vec(),
        [0x0a, 1, b'a', 0x12, 1, 1, 0x18, 2, 0x22, 1, b'b', 0x28, 3, 0x30, 4, 0x38, 5]
    );
    let s = GrpcStatus {
        pid: 7,
        vmstatus: vec![GrpcVmStatus {
            pid: 8,
            cpu: 1,
            memory: 9,
        }],
    };
    assert_eq!(
        s.encode_to_vec(),
        [0x08, 7, 0x12, 6, 0x08, 8, 0x10, 1, 0x18, 9]
    );
    let c = GrpcVmConfig {
        data: vec![1],
        agent_config: vec![2],
    };
    assert_eq!(c.encode_to_vec(), [0x0a, 1, 1, 0x12, 1, 2]);
}
