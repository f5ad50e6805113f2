//! Unit tests of [`super`].

use super::*;

#[test]
fn dimms_start_on_a_memory_block_after_the_image() {
    assert_eq!(next_dimm_addr(&json!([])), None);
    let nvdimm = json!([{"type": "nvdimm", "data": {"addr": 0x1_0000_0000u64, "size": 25165824u64, "slot": 0}}]);
    assert_eq!(next_dimm_addr(&nvdimm), Some(0x1_0000_0000 + MEMORY_BLOCK));
    let both = json!([
        {"type": "nvdimm", "data": {"addr": 0x1_0000_0000u64, "size": 25165824u64}},
        {"type": "dimm", "data": {"addr": 0x1_0800_0000u64, "size": 536870912u64}},
    ]);
    assert_eq!(next_dimm_addr(&both), Some(0x1_0800_0000 + 536870912));
}

#[test]
fn cpu_threads_from_query_cpus_fast() {
    let v = json!([
        {"cpu-index": 0, "thread-id": 4321, "qom-path": "/machine/unattached/device[0]"},
        {"cpu-index": 1, "thread-id": 4330, "qom-path": "/machine/peripheral/cpu-1-0"},
        {"cpu-index": 2, "thread-id": 4321},
        {"cpu-index": 3}
    ]);
    assert_eq!(parse_cpu_threads(&v), [4321, 4330]);
    assert!(parse_cpu_threads(&json!({"error": "x"})).is_empty());
}
