//! The device cgroup of a container (`linux.resources.devices`) on the guest's cgroup v2: an eBPF
//! program of type `BPF_PROG_TYPE_CGROUP_DEVICE` attached to the container's cgroup, as runc
//! does on cgroup v2.
//!
//! Semantics are cgroup v1's, which the OCI rules were written for: a new cgroup allows
//! everything; the rules apply in order, so for each access a request asks for (mknod, read,
//! write) the last rule that matches the device and includes that access decides; the request is
//! allowed when every access it asks for is. (containerd's rules start with `deny a *:* rwm`, so
//! only what follows is allowed.)

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use oci_spec::runtime::{LinuxDeviceCgroup, LinuxDeviceType};

/// Why a container's device rules cannot be enforced.
#[derive(Debug, thiserror::Error)]
pub enum DevcgError {
    /// A rule of `linux.resources.devices` that the cgroup cannot express, and what to change.
    #[error("{0}")]
    Rule(String),
    /// The program is not valid (a bug of its assembler; tests run it).
    #[error("{0}")]
    Program(String),
    /// The kernel refused to load the program (its verifier's last lines).
    #[error("load the device cgroup program: {source}: {verifier}")]
    Load {
        /// The end of the verifier's log.
        verifier: String,
        /// The kernel's reason.
        #[source]
        source: io::Error,
    },
    /// The kernel refused to attach the program to the container's cgroup.
    #[error("attach the device cgroup program: {0}")]
    Attach(#[source] io::Error),
}

/// `BPF_DEVCG_ACC_MKNOD`.
pub const ACC_MKNOD: u32 = 1;
/// `BPF_DEVCG_ACC_READ`.
pub const ACC_READ: u32 = 2;
/// `BPF_DEVCG_ACC_WRITE`.
pub const ACC_WRITE: u32 = 4;
/// `BPF_DEVCG_DEV_BLOCK`.
pub const DEV_BLOCK: u32 = 1;
/// `BPF_DEVCG_DEV_CHAR`.
pub const DEV_CHAR: u32 = 2;

/// One rule, reduced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    /// Allow or deny.
    pub allow: bool,
    /// `DEV_BLOCK`, `DEV_CHAR`, or `None` for all.
    pub typ: Option<u32>,
    /// Major number, `None` for any.
    pub major: Option<u32>,
    /// Minor number, `None` for any.
    pub minor: Option<u32>,
    /// `ACC_*` bits.
    pub access: u32,
}

/// The devices runc always allows on top of a spec's rules (libcontainer's `AllowedDevices`):
/// mknod of any node, and the standard devices it makes in /dev (null, zero, full, random,
/// urandom, tty, console, ptmx, the ptys, tun).
pub fn runc_defaults() -> Vec<Rule> {
    let c = |major: Option<u32>, minor: Option<u32>, access: u32| Rule {
        allow: true,
        typ: Some(DEV_CHAR),
        major,
        minor,
        access,
    };
    let rwm = ACC_READ | ACC_WRITE | ACC_MKNOD;
    vec![
        c(None, None, ACC_MKNOD),
        Rule {
            allow: true,
            typ: Some(DEV_BLOCK),
            major: None,
            minor: None,
            access: ACC_MKNOD,
        },
        c(Some(1), Some(3), rwm),
        c(Some(1), Some(8), rwm),
        c(Some(1), Some(7), rwm),
        c(Some(5), Some(0), rwm),
        c(Some(1), Some(5), rwm),
        c(Some(1), Some(9), rwm),
        c(Some(5), Some(1), rwm),
        c(Some(136), None, rwm),
        c(Some(5), Some(2), rwm),
        c(Some(10), Some(200), rwm),
    ]
}

/// Reduces the OCI rules; an access letter other than r, w, m or a device type the kernel's
/// program cannot see is an error.
pub fn rules(list: &[LinuxDeviceCgroup]) -> Result<Vec<Rule>, DevcgError> {
    let mut out = Vec::new();
    for (i, d) in list.iter().enumerate() {
        let typ = match d.typ().unwrap_or(LinuxDeviceType::A) {
            LinuxDeviceType::A => None,
            LinuxDeviceType::B => Some(DEV_BLOCK),
            LinuxDeviceType::C | LinuxDeviceType::U => Some(DEV_CHAR),
            LinuxDeviceType::P => {
                return Err(DevcgError::Rule(format!(
                "linux.resources.devices[{i}]: type p (FIFO) is not a device the cgroup controls; remove the rule"
            )))
            }
        };
        let mut access = 0;
        for ch in d.access().as_deref().unwrap_or("rwm").chars() {
            access |= match ch {
                'r' => ACC_READ,
                'w' => ACC_WRITE,
                'm' => ACC_MKNOD,
                other => {
                    return Err(DevcgError::Rule(format!(
                        "linux.resources.devices[{i}]: access {other:?} is not r, w or m; use only those letters"
                    )))
                }
            };
        }
        let num = |v: Option<i64>| -> Result<Option<u32>, DevcgError> {
            match v {
                None => Ok(None),
                Some(n) if n < 0 => Ok(None),
                Some(n) => u32::try_from(n).map(Some).map_err(|_| {
                    DevcgError::Rule(format!(
                        "linux.resources.devices[{i}]: device number {n} is out of range"
                    ))
                }),
            }
        };
        out.push(Rule {
            allow: d.allow(),
            typ,
            major: num(d.major())?,
            minor: num(d.minor())?,
            access,
        });
    }
    Ok(out)
}

/// The reference semantics: whether a request is allowed.
pub fn evaluate(rules: &[Rule], typ: u32, major: u32, minor: u32, access: u32) -> bool {
    [ACC_MKNOD, ACC_READ, ACC_WRITE]
        .into_iter()
        .filter(|bit| access & bit != 0)
        .all(|bit| {
            rules
                .iter()
                .rev()
                .find(|r| {
                    r.access & bit != 0
                        && r.typ.is_none_or(|t| t == typ)
                        && r.major.is_none_or(|m| m == major)
                        && r.minor.is_none_or(|m| m == minor)
                })
                .is_none_or(|r| r.allow)
        })
}

/// One eBPF instruction (`struct bpf_insn`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub struct Insn {
    /// Opcode.
    pub code: u8,
    /// dst_reg (low 4 bits) and src_reg (high 4 bits).
    pub regs: u8,
    /// Offset.
    pub off: i16,
    /// Immediate.
    pub imm: i32,
}

const LDX_W: u8 = 0x61; // BPF_LDX | BPF_MEM | BPF_W
const AND_K: u8 = 0x57; // BPF_ALU64 | BPF_AND | BPF_K
const RSH_K: u8 = 0x77; // BPF_ALU64 | BPF_RSH | BPF_K
const MOV_X: u8 = 0xbf; // BPF_ALU64 | BPF_MOV | BPF_X
const MOV_K: u8 = 0xb7; // BPF_ALU64 | BPF_MOV | BPF_K
const JEQ_K: u8 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
const JNE_K: u8 = 0x55; // BPF_JMP | BPF_JNE | BPF_K
const JA: u8 = 0x05;
const EXIT: u8 = 0x95;

fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: dst | (src << 4),
        off,
        imm,
    }
}

/// Compiles rules to the program (r2 type, r3 access, r4 major, r5 minor).
pub fn assemble(rules: &[Rule]) -> Vec<Insn> {
    let mut p = vec![
        insn(LDX_W, 2, 1, 0, 0),
        insn(AND_K, 2, 0, 0, 0xffff),
        insn(LDX_W, 3, 1, 0, 0),
        insn(RSH_K, 3, 0, 0, 16),
        insn(LDX_W, 4, 1, 4, 0),
        insn(LDX_W, 5, 1, 8, 0),
    ];
    for bit in [ACC_MKNOD, ACC_READ, ACC_WRITE] {
        // Jumps to the end of this bit's block are patched once its length is known.
        let mut to_done = Vec::new();
        p.push(insn(MOV_X, 6, 3, 0, 0));
        p.push(insn(AND_K, 6, 0, 0, bit as i32));
        to_done.push(p.len());
        p.push(insn(JEQ_K, 6, 0, 0, 0));
        for r in rules.iter().rev().filter(|r| r.access & bit != 0) {
            let mut to_next = Vec::new();
            for (reg, want) in [(2u8, r.typ), (4, r.major), (5, r.minor)] {
                if let Some(v) = want {
                    to_next.push(p.len());
                    p.push(insn(JNE_K, reg, 0, 0, v as i32));
                }
            }
            if r.allow {
                to_done.push(p.len());
                p.push(insn(JA, 0, 0, 0, 0));
            } else {
                p.push(insn(MOV_K, 0, 0, 0, 0));
                p.push(insn(EXIT, 0, 0, 0, 0));
            }
            // A rule that matches every device decides every request that reached it: the
            // earlier rules can never be reached, and the kernel's verifier refuses a program
            // with unreachable instructions (Docker's rules hold a second `deny a *:* rwm`).
            if to_next.is_empty() {
                break;
            }
            let next = p.len();
            for at in to_next {
                p[at].off = (next - at - 1) as i16;
            }
        }
        let done = p.len();
        for at in to_done {
            p[at].off = (done - at - 1) as i16;
        }
    }
    p.push(insn(MOV_K, 0, 0, 0, 1));
    p.push(insn(EXIT, 0, 0, 0, 0));
    p
}

/// Runs a program on a request (tests): what the kernel would return.
pub fn run(p: &[Insn], typ: u32, major: u32, minor: u32, access: u32) -> Result<bool, DevcgError> {
    let ctx = [(access << 16) | typ, major, minor];
    let mut r = [0u64; 11];
    let mut pc = 0usize;
    for _ in 0..100_000 {
        let i = p
            .get(pc)
            .ok_or_else(|| DevcgError::Program("ran off the end".into()))?;
        pc += 1;
        let (dst, src) = ((i.regs & 0xf) as usize, (i.regs >> 4) as usize);
        match i.code {
            LDX_W => {
                if src != 1 {
                    return Err(DevcgError::Program(
                        "load from a register other than the context".into(),
                    ));
                }
                r[dst] = u64::from(ctx[(i.off / 4) as usize]);
            }
            AND_K => r[dst] &= i.imm as u32 as u64,
            RSH_K => r[dst] >>= i.imm,
            MOV_X => r[dst] = r[src],
            MOV_K => r[dst] = i.imm as u32 as u64,
            JEQ_K | JNE_K => {
                let eq = r[dst] == i.imm as u32 as u64;
                if eq == (i.code == JEQ_K) {
                    pc = (pc as i64 + i64::from(i.off)) as usize;
                }
            }
            JA => pc = (pc as i64 + i64::from(i.off)) as usize,
            EXIT => return Ok(r[0] != 0),
            other => return Err(DevcgError::Program(format!("unknown opcode {other:#x}"))),
        }
    }
    Err(DevcgError::Program("no exit".into()))
}

fn put32(a: &mut [u8; 128], off: usize, v: u32) {
    a[off..off + 4].copy_from_slice(&v.to_ne_bytes());
}

fn put64(a: &mut [u8; 128], off: usize, v: u64) {
    a[off..off + 8].copy_from_slice(&v.to_ne_bytes());
}

/// `BPF_PROG_LOAD` of a device program; `log`: the verifier's log buffer (None: no log).
fn load(p: &[Insn], log: Option<&mut [u8]>) -> Result<OwnedFd, io::Error> {
    let license = c"Apache-2.0";
    let mut attr = [0u8; 128];
    put32(&mut attr, 0, 15); // BPF_PROG_TYPE_CGROUP_DEVICE
    put32(&mut attr, 4, p.len() as u32);
    put64(&mut attr, 8, p.as_ptr() as u64);
    put64(&mut attr, 16, license.as_ptr() as u64);
    if let Some(log) = log {
        put32(&mut attr, 24, 1); // log_level
        put32(&mut attr, 28, log.len() as u32);
        put64(&mut attr, 32, log.as_mut_ptr() as u64);
    }
    // SAFETY: bpf(BPF_PROG_LOAD) reads `attr`, the instructions and the license, and writes at
    // most the log's length into the log; all alive for the call.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, 5, attr.as_ptr(), attr.len()) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a descriptor just returned by bpf(2).
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Loads the program and attaches it to the cgroup directory `cgroup`.
pub fn attach(p: &[Insn], cgroup: BorrowedFd<'_>) -> Result<(), DevcgError> {
    let prog = match load(p, None) {
        Ok(fd) => fd,
        Err(e) => {
            // Again with the verifier's log, for the reason (a log too small is ENOSPC).
            let mut log = vec![0u8; 1 << 20];
            let _ = load(p, Some(&mut log));
            let end = log.iter().position(|b| *b == 0).unwrap_or(log.len());
            let text = String::from_utf8_lossy(&log[..end]);
            let tail: Vec<&str> = text.lines().rev().take(5).collect();
            return Err(DevcgError::Load {
                verifier: tail.into_iter().rev().collect::<Vec<_>>().join(" | "),
                source: e,
            });
        }
    };
    let mut attr = [0u8; 128];
    put32(&mut attr, 0, cgroup.as_raw_fd() as u32);
    put32(&mut attr, 4, prog.as_raw_fd() as u32);
    put32(&mut attr, 8, 6); // BPF_CGROUP_DEVICE
    put32(&mut attr, 12, 2); // BPF_F_ALLOW_MULTI
                             // SAFETY: bpf(BPF_PROG_ATTACH) reads `attr`.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, 8, attr.as_ptr(), attr.len()) };
    if rc < 0 {
        return Err(DevcgError::Attach(io::Error::last_os_error()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn oci(json: &str) -> Vec<LinuxDeviceCgroup> {
        serde_json::from_str(json).expect("rules")
    }

    #[test]
    fn containerds_default_rules() {
        // What containerd writes for a non-privileged container.
        let r = rules(&oci(r#"[{"allow":false,"access":"rwm"},
                {"allow":true,"type":"c","major":1,"minor":3,"access":"rwm"},
                {"allow":true,"type":"c","major":1,"minor":5,"access":"rwm"},
                {"allow":true,"type":"c","major":5,"minor":0,"access":"rwm"},
                {"allow":true,"type":"c","major":136,"access":"rwm"},
                {"allow":true,"type":"c","access":"m"},
                {"allow":true,"type":"b","access":"m"}]"#))
        .expect("rules");
        let p = assemble(&r);
        let rw = ACC_READ | ACC_WRITE;
        for (what, typ, maj, min, acc, want) in [
            ("/dev/null rw", DEV_CHAR, 1, 3, rw, true),
            ("/dev/mem r", DEV_CHAR, 1, 1, ACC_READ, false),
            ("mknod /dev/mem", DEV_CHAR, 1, 1, ACC_MKNOD, true),
            ("a pty", DEV_CHAR, 136, 7, rw, true),
            ("/dev/vda r", DEV_BLOCK, 254, 0, ACC_READ, false),
            ("mknod vda", DEV_BLOCK, 254, 0, ACC_MKNOD, true),
        ] {
            assert_eq!(run(&p, typ, maj, min, acc).ok(), Some(want), "{what}");
            assert_eq!(evaluate(&r, typ, maj, min, acc), want, "{what}");
        }
    }

    #[test]
    fn runcs_defaults_come_on_top_of_a_deny_all() {
        // CRI's sandbox container: deny everything, nothing else; runc still makes /dev/null.
        let mut r = rules(&oci(r#"[{"allow":false,"access":"rwm"}]"#)).expect("rules");
        r.extend(runc_defaults());
        let p = assemble(&r);
        assert_eq!(
            run(&p, DEV_CHAR, 1, 3, ACC_MKNOD | ACC_READ | ACC_WRITE).ok(),
            Some(true)
        );
        assert_eq!(run(&p, DEV_CHAR, 136, 4, ACC_READ).ok(), Some(true));
        assert_eq!(
            run(&p, DEV_CHAR, 1, 1, ACC_READ).ok(),
            Some(false),
            "/dev/mem"
        );
        assert_eq!(run(&p, DEV_BLOCK, 8, 0, ACC_MKNOD).ok(), Some(true));
        assert_eq!(run(&p, DEV_BLOCK, 8, 0, ACC_WRITE).ok(), Some(false));
    }

    #[test]
    fn the_kernel_verifier_accepts_the_program() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: loading a BPF program needs root (make test runs it as root)");
            return;
        }
        let mut r = rules(&oci(
            r#"[{"allow":false,"access":"rwm"},{"allow":true,"type":"c","major":10,"minor":229,"access":"rwm"}]"#,
        ))
        .expect("rules");
        r.extend(runc_defaults());
        load(&assemble(&r), None).expect("the verifier accepts it");
        load(&assemble(&[]), None).expect("and the empty program");
    }

    /// What Docker 28.5 writes for `docker run` (its default devices, twice, each list starting
    /// with a deny-all).
    const DOCKER_28: &str = r#"[{"allow":false,"access":"rwm"},{"allow":true,"type":"c","major":1,"minor":5,"access":"rwm"},{"allow":true,"type":"c","major":1,"minor":3,"access":"rwm"},{"allow":true,"type":"c","major":1,"minor":9,"access":"rwm"},{"allow":true,"type":"c","major":1,"minor":8,"access":"rwm"},{"allow":true,"type":"c","major":5,"minor":0,"access":"rwm"},{"allow":true,"type":"c","major":5,"minor":1,"access":"rwm"},{"allow":false,"type":"c","major":10,"minor":229,"access":"rwm"},{"allow":false,"access":"rwm"},{"allow":true,"type":"c","major":1,"minor":5,"access":"rwm"},{"allow":true,"type":"c","major":1,"minor":3,"access":"rwm"},{"allow":true,"type":"c","major":1,"minor":9,"access":"rwm"},{"allow":true,"type":"c","major":1,"minor":8,"access":"rwm"},{"allow":true,"type":"c","major":5,"minor":0,"access":"rwm"},{"allow":true,"type":"c","major":5,"minor":1,"access":"rwm"},{"allow":false,"type":"c","major":10,"minor":229,"access":"rwm"}]"#;

    /// Indexes of the instructions no path from the first one reaches (the verifier's
    /// "unreachable insn").
    fn unreachable(p: &[Insn]) -> Vec<usize> {
        let mut seen = vec![false; p.len()];
        let mut todo = vec![0usize];
        while let Some(pc) = todo.pop() {
            if pc >= p.len() || seen[pc] {
                continue;
            }
            seen[pc] = true;
            let target = (pc as i64 + 1 + i64::from(p[pc].off)) as usize;
            match p[pc].code {
                EXIT => {}
                JA => todo.push(target),
                JEQ_K | JNE_K => todo.extend([pc + 1, target]),
                _ => todo.push(pc + 1),
            }
        }
        (0..p.len()).filter(|i| !seen[*i]).collect()
    }

    #[test]
    fn dockers_rules_with_a_second_deny_all_leave_no_dead_code() {
        let mut r = rules(&oci(DOCKER_28)).expect("rules");
        r.extend(runc_defaults());
        let p = assemble(&r);
        assert_eq!(unreachable(&p), Vec::<usize>::new());
        let rw = ACC_READ | ACC_WRITE;
        for (what, typ, maj, min, acc, want) in [
            ("/dev/null rw", DEV_CHAR, 1, 3, rw, true),
            ("/dev/urandom r", DEV_CHAR, 1, 9, ACC_READ, true),
            ("/dev/mem r", DEV_CHAR, 1, 1, ACC_READ, false),
            ("/dev/fuse rw", DEV_CHAR, 10, 229, rw, false),
            ("/dev/vda r", DEV_BLOCK, 254, 0, ACC_READ, false),
            (
                "mknod vda (runc's default)",
                DEV_BLOCK,
                254,
                0,
                ACC_MKNOD,
                true,
            ),
        ] {
            assert_eq!(run(&p, typ, maj, min, acc).ok(), Some(want), "{what}");
            assert_eq!(evaluate(&r, typ, maj, min, acc), want, "{what}");
        }
    }

    #[test]
    fn the_kernel_verifier_accepts_dockers_rules() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: loading a BPF program needs root (make test runs it as root)");
            return;
        }
        for list in [
            DOCKER_28,
            r#"[{"allow":true,"access":"rwm"},{"allow":false,"type":"c","major":1,"minor":1,"access":"r"}]"#,
            r#"[{"allow":false,"access":"rwm"},{"allow":true,"access":"rwm"},{"allow":false,"access":"rwm"}]"#,
        ] {
            let mut r = rules(&oci(list)).expect("rules");
            r.extend(runc_defaults());
            let p = assemble(&r);
            let mut log = vec![0u8; 1 << 16];
            if let Err(e) = load(&p, Some(&mut log)) {
                let end = log.iter().position(|b| *b == 0).unwrap_or(log.len());
                panic!("{list}: {e}: {}", String::from_utf8_lossy(&log[..end]));
            }
        }
    }

    #[test]
    fn bad_rules_are_refused() {
        let e = rules(&oci(r#"[{"allow":true,"type":"c","access":"rx"}]"#)).expect_err("x");
        assert!(e.to_string().contains("'x'"), "{e}");
        let e = rules(&oci(r#"[{"allow":true,"type":"p"}]"#)).expect_err("p");
        assert!(e.to_string().contains("FIFO"), "{e}");
    }

    fn rule() -> impl Strategy<Value = Rule> {
        (
            any::<bool>(),
            prop_oneof![Just(None), Just(Some(DEV_BLOCK)), Just(Some(DEV_CHAR))],
            prop_oneof![Just(None), (0u32..4).prop_map(Some)],
            prop_oneof![Just(None), (0u32..4).prop_map(Some)],
            1u32..8,
        )
            .prop_map(|(allow, typ, major, minor, access)| Rule {
                allow,
                typ,
                major,
                minor,
                access,
            })
    }

    proptest! {
        /// The program agrees with cgroup v1's semantics for any rules and any request.
        #[test]
        fn the_program_agrees_with_the_rules(
            rules in prop::collection::vec(rule(), 0..12),
            typ in prop_oneof![Just(DEV_BLOCK), Just(DEV_CHAR)],
            major in 0u32..5,
            minor in 0u32..5,
            access in 1u32..8,
        ) {
            let p = assemble(&rules);
            prop_assert_eq!(run(&p, typ, major, minor, access).ok(),
            Some(evaluate(&rules, typ, major, minor, access)));
            // Every instruction is reachable, as the kernel's verifier demands.
            prop_assert_eq!(unreachable(&p), Vec::<usize>::new());
        }
    }
}
