//! Any JSON a pod author could put in `linux.seccomp`: compiled or refused, never a panic; when
//! it compiles, the program agrees with the profile's reference semantics.
#![no_main]
use kata_agent::seccomp::{self, AUDIT_ARCH_I386, AUDIT_ARCH_X86_64};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first 16 bytes choose the syscall to try; the rest is the profile.
    if data.len() < 16 {
        return;
    }
    let (head, json) = data.split_at(16);
    let Ok(profile) = serde_json::from_slice::<oci_spec::runtime::LinuxSeccomp>(json) else {
        return;
    };
    let Ok(rules) = seccomp::rules(&profile) else {
        return;
    };
    let Ok(insns) = seccomp::assemble(&rules) else {
        return;
    };
    let word = |i: usize| u32::from_le_bytes([head[i], head[i + 1], head[i + 2], head[i + 3]]);
    let arch = if head[0] & 1 == 0 {
        AUDIT_ARCH_X86_64
    } else {
        AUDIT_ARCH_I386
    };
    let nr = word(4) % 512;
    let a = u64::from(word(8)) | (u64::from(word(12)) << 32);
    let args = [a, !a, a >> 1, a.rotate_left(7), 0, u64::MAX];
    let got = seccomp::run(&insns, arch, nr, &args).expect("the program runs");
    assert_eq!(got, seccomp::evaluate(&rules, arch, nr, &args));
});
