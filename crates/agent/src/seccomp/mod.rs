//! OCI seccomp profiles (`linux.seccomp`) compiled to a classic BPF program and installed in the
//! container's process just before it execs, as runc does (libseccomp is not needed: the
//! program is small, and compiling it here keeps the agent one static binary).
//!
//! Semantics (runc/libseccomp's, for the cases real profiles use):
//! - the filter checks the architecture first: x86-64, and i386 when the profile lists
//!   `SCMP_ARCH_X86` (a 64-bit process can make i386 syscalls with `int 0x80` on a kernel with
//!   IA32 emulation, so those are filtered with the i386 numbers); any other architecture is
//!   killed, as libseccomp's "bad architecture" action does. x32 syscalls (the x32 bit set) get
//!   `ENOSYS`, what a kernel without x32 (both guest kernels) answers anyway;
//! - the entries of `syscalls` are tried in profile order and the first whose name and argument
//!   conditions match decides; otherwise the default action;
//! - a name this architecture does not have is skipped (libseccomp skips it too), and listed in
//!   [`Program::skipped`] so the caller can log it; an argument index above 5 or a
//!   `SCMP_ACT_NOTIFY` (it needs a seccomp agent on the host) is an error;
//! - an absent `valueTwo` is 0 (Go's encoder omits it: containerd's default profile has
//!   `SCMP_CMP_MASKED_EQ` conditions with no `valueTwo`);
//! - `SCMP_ACT_ERRNO` and `SCMP_ACT_TRACE` return `errnoRet` (EPERM when absent);
//! - argument comparisons are unsigned and 64-bit (32-bit for i386, as libseccomp does).

pub mod syscalls;

use oci_spec::runtime::{
    Arch, LinuxSeccomp, LinuxSeccompAction, LinuxSeccompFilterFlag, LinuxSeccompOperator,
};
use serde::{Deserialize, Serialize};

/// Why a seccomp profile cannot be compiled or installed.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The profile asks for what the guest cannot do, and what to change.
    #[error("{0}")]
    Profile(String),
    /// The compiled program is not valid (too long for the kernel, or a compiler bug).
    #[error("{0}")]
    Program(String),
    /// The kernel refused the filter.
    #[error("install the seccomp filter: {0}")]
    Install(#[source] std::io::Error),
}

/// One classic BPF instruction (`struct sock_filter`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Insn {
    /// Opcode.
    pub code: u16,
    /// Jump offset if true.
    pub jt: u8,
    /// Jump offset if false.
    pub jf: u8,
    /// Operand.
    pub k: u32,
}

/// A compiled filter and the flags to install it with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Program {
    /// The instructions.
    pub insns: Vec<Insn>,
    /// `SECCOMP_FILTER_FLAG_*`.
    pub flags: u32,
    /// Syscall names of the profile this architecture does not have.
    pub skipped: Vec<String>,
}

// Opcodes.
const LD_W_ABS: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS
const JEQ_K: u16 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
const JGT_K: u16 = 0x25;
const JGE_K: u16 = 0x35;
const JA: u16 = 0x05;
const AND_K: u16 = 0x54; // BPF_ALU | BPF_AND | BPF_K
const RET_K: u16 = 0x06;

// struct seccomp_data offsets.
const OFF_NR: u32 = 0;
const OFF_ARCH: u32 = 4;
const OFF_ARGS: u32 = 16;

/// `AUDIT_ARCH_X86_64`.
pub const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
/// `AUDIT_ARCH_I386`.
pub const AUDIT_ARCH_I386: u32 = 0x4000_0003;
/// `__X32_SYSCALL_BIT`.
pub const X32_SYSCALL_BIT: u32 = 0x4000_0000;

/// `SECCOMP_RET_KILL_PROCESS`.
pub const RET_KILL_PROCESS: u32 = 0x8000_0000;
/// `SECCOMP_RET_KILL_THREAD`.
pub const RET_KILL_THREAD: u32 = 0;
/// `SECCOMP_RET_TRAP`.
pub const RET_TRAP: u32 = 0x0003_0000;
/// `SECCOMP_RET_ERRNO`.
pub const RET_ERRNO: u32 = 0x0005_0000;
/// `SECCOMP_RET_TRACE`.
pub const RET_TRACE: u32 = 0x7ff0_0000;
/// `SECCOMP_RET_LOG`.
pub const RET_LOG: u32 = 0x7ffc_0000;
/// `SECCOMP_RET_ALLOW`.
pub const RET_ALLOW: u32 = 0x7fff_0000;

const EPERM: u32 = 1;
const ENOSYS: u32 = 38;
/// Longest run of syscall numbers that share one return (jump offsets are 8-bit).
const CHUNK: usize = 200;

fn action(a: LinuxSeccompAction, errno: Option<u32>) -> Result<u32, SeccompError> {
    use LinuxSeccompAction::*;
    let data = errno.unwrap_or(EPERM) & 0xffff;
    Ok(match a {
        ScmpActKill | ScmpActKillThread => RET_KILL_THREAD,
        ScmpActKillProcess => RET_KILL_PROCESS,
        ScmpActTrap => RET_TRAP,
        ScmpActErrno => RET_ERRNO | data,
        ScmpActTrace => RET_TRACE | data,
        ScmpActLog => RET_LOG,
        ScmpActAllow => RET_ALLOW,
        ScmpActNotify => {
            return Err(SeccompError::Profile(
                "SCMP_ACT_NOTIFY needs a seccomp agent on the host (listenerPath), which a VM \
                 guest cannot reach; remove it from the profile"
                    .into(),
            ))
        }
    })
}

/// One argument condition, checked on the raw 64-bit argument.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cond {
    /// Argument index (0-5).
    pub index: u32,
    /// Operator.
    pub op: LinuxSeccompOperator,
    /// Value (the mask for `SCMP_CMP_MASKED_EQ`).
    pub value: u64,
    /// Second value (the datum for `SCMP_CMP_MASKED_EQ`).
    pub value_two: u64,
}

impl Cond {
    /// Whether `arg` satisfies the condition (`wide`: compare 64 bits, else the low 32).
    pub fn holds(&self, arg: u64, wide: bool) -> bool {
        let m = if wide { u64::MAX } else { u64::from(u32::MAX) };
        let (a, v, v2) = (arg & m, self.value & m, self.value_two & m);
        use LinuxSeccompOperator::*;
        match self.op {
            ScmpCmpNe => a != v,
            ScmpCmpLt => a < v,
            ScmpCmpLe => a <= v,
            ScmpCmpEq => a == v,
            ScmpCmpGe => a >= v,
            ScmpCmpGt => a > v,
            ScmpCmpMaskedEq => a & v == v2,
        }
    }
}

/// A rule for one syscall number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// Syscall number.
    pub nr: u32,
    /// All must hold.
    pub conds: Vec<Cond>,
    /// The `SECCOMP_RET_*` value.
    pub ret: u32,
}

/// A profile reduced to what the filter checks, per architecture.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rules {
    /// The default `SECCOMP_RET_*`.
    pub default: u32,
    /// x86-64 rules in profile order.
    pub x86_64: Vec<Rule>,
    /// i386 rules, when the profile lists `SCMP_ARCH_X86`.
    pub i386: Option<Vec<Rule>>,
    /// Names skipped (not a syscall of x86-64).
    pub skipped: Vec<String>,
}

fn number(table: &[(&str, u32)], name: &str) -> Option<u32> {
    table
        .binary_search_by(|(n, _)| (*n).cmp(name))
        .ok()
        .map(|i| table[i].1)
}

/// Reduces an OCI profile to rules (validates it).
pub fn rules(s: &LinuxSeccomp) -> Result<Rules, SeccompError> {
    let default = action(s.default_action(), s.default_errno_ret())?;
    let arches = s.architectures().clone().unwrap_or_default();
    let want_i386 = arches.contains(&Arch::ScmpArchX86);
    let mut out = Rules {
        default,
        x86_64: Vec::new(),
        i386: want_i386.then(Vec::new),
        skipped: Vec::new(),
    };
    for (i, entry) in s.syscalls().iter().flatten().enumerate() {
        let ret = action(entry.action(), entry.errno_ret())
            .map_err(|e| SeccompError::Profile(format!("seccomp syscalls[{i}]: {e}")))?;
        let mut conds = Vec::new();
        for a in entry.args().iter().flatten() {
            if a.index() > 5 {
                return Err(SeccompError::Profile(format!(
                    "seccomp syscalls[{i}]: argument index {} is out of range (0-5)",
                    a.index()
                )));
            }
            conds.push(Cond {
                index: a.index() as u32,
                op: a.op(),
                value: a.value(),
                value_two: a.value_two().unwrap_or(0),
            });
        }
        for name in entry.names() {
            match number(syscalls::X86_64, name) {
                Some(nr) => out.x86_64.push(Rule {
                    nr,
                    conds: conds.clone(),
                    ret,
                }),
                None => out.skipped.push(name.clone()),
            }
            if let (Some(r), Some(nr)) = (out.i386.as_mut(), number(syscalls::I386, name)) {
                r.push(Rule {
                    nr,
                    conds: conds.clone(),
                    ret,
                });
            }
        }
    }
    Ok(out)
}

/// What the filter returns for a syscall (the reference semantics the program implements;
/// used by the tests and the fuzz target).
pub fn evaluate(r: &Rules, arch: u32, nr: u32, args: &[u64; 6]) -> u32 {
    let (rules, wide) = match arch {
        AUDIT_ARCH_X86_64 if nr & X32_SYSCALL_BIT != 0 => return RET_ERRNO | ENOSYS,
        AUDIT_ARCH_X86_64 => (&r.x86_64, true),
        AUDIT_ARCH_I386 => match &r.i386 {
            Some(v) => (v, false),
            None => return RET_KILL_THREAD,
        },
        _ => return RET_KILL_THREAD,
    };
    rules
        .iter()
        .find(|rule| {
            rule.nr == nr
                && rule
                    .conds
                    .iter()
                    .all(|c| c.holds(args[c.index as usize], wide))
        })
        .map_or(r.default, |rule| rule.ret)
}

/// Instructions with symbolic jump targets, resolved by [`Asm::finish`].
#[derive(Default)]
struct Asm {
    insns: Vec<Insn>,
    // (instruction index, label for jt, label for jf)
    fixups: Vec<(usize, Option<usize>, Option<usize>)>,
    labels: Vec<Option<usize>>,
}

impl Asm {
    fn label(&mut self) -> usize {
        self.labels.push(None);
        self.labels.len() - 1
    }
    fn bind(&mut self, l: usize) {
        self.labels[l] = Some(self.insns.len());
    }
    fn stmt(&mut self, code: u16, k: u32) {
        self.insns.push(Insn {
            code,
            jt: 0,
            jf: 0,
            k,
        });
    }
    /// A conditional jump; `None` falls through.
    fn jump(&mut self, code: u16, k: u32, jt: Option<usize>, jf: Option<usize>) {
        self.fixups.push((self.insns.len(), jt, jf));
        self.stmt(code, k);
    }
    fn finish(mut self) -> Result<Vec<Insn>, SeccompError> {
        for (at, jt, jf) in std::mem::take(&mut self.fixups) {
            let off = |l: Option<usize>| -> Result<u8, SeccompError> {
                let Some(l) = l else { return Ok(0) };
                let target = self.labels[l]
                    .ok_or_else(|| SeccompError::Program("internal: unbound label".into()))?;
                u8::try_from(target - at - 1)
                    .map_err(|_| SeccompError::Program("internal: jump too far".into()))
            };
            self.insns[at].jt = off(jt)?;
            self.insns[at].jf = off(jf)?;
        }
        Ok(self.insns)
    }
}

/// Emits the checks of `conds`, jumping to `fail` when one does not hold.
fn emit_conds(a: &mut Asm, conds: &[Cond], wide: bool, fail: usize) {
    for c in conds {
        let lo_off = OFF_ARGS + 8 * c.index;
        let hi_off = lo_off + 4;
        let (vhi, vlo) = ((c.value >> 32) as u32, c.value as u32);
        let (dhi, dlo) = ((c.value_two >> 32) as u32, c.value_two as u32);
        let pass = a.label();
        use LinuxSeccompOperator::*;
        match c.op {
            ScmpCmpEq | ScmpCmpNe => {
                let (on_eq, on_ne) = if c.op == ScmpCmpEq {
                    (None, Some(fail))
                } else {
                    (Some(fail), Some(pass))
                };
                if wide {
                    a.stmt(LD_W_ABS, hi_off);
                    // High words differ: EQ fails, NE passes.
                    let hi_ne = if c.op == ScmpCmpEq { fail } else { pass };
                    a.jump(JEQ_K, vhi, None, Some(hi_ne));
                }
                a.stmt(LD_W_ABS, lo_off);
                a.jump(JEQ_K, vlo, on_eq, on_ne);
            }
            ScmpCmpMaskedEq => {
                let (mhi, mlo) = (vhi, vlo);
                if wide {
                    a.stmt(LD_W_ABS, hi_off);
                    a.stmt(AND_K, mhi);
                    a.jump(JEQ_K, dhi, None, Some(fail));
                }
                a.stmt(LD_W_ABS, lo_off);
                a.stmt(AND_K, mlo);
                a.jump(JEQ_K, dlo, None, Some(fail));
            }
            ScmpCmpGt | ScmpCmpGe | ScmpCmpLt | ScmpCmpLe => {
                // GT/GE pass when the argument is above; LT/LE are their negations.
                let (above, below) = match c.op {
                    ScmpCmpGt | ScmpCmpGe => (pass, fail),
                    _ => (fail, pass),
                };
                if wide {
                    a.stmt(LD_W_ABS, hi_off);
                    a.jump(JGT_K, vhi, Some(above), None);
                    a.jump(JEQ_K, vhi, None, Some(below));
                }
                a.stmt(LD_W_ABS, lo_off);
                let (code, t, f) = match c.op {
                    ScmpCmpGt => (JGT_K, pass, fail),
                    ScmpCmpGe => (JGE_K, pass, fail),
                    ScmpCmpLt => (JGE_K, fail, pass),
                    _ => (JGT_K, fail, pass),
                };
                a.jump(code, vlo, Some(t), Some(f));
            }
        }
        a.bind(pass);
    }
}

/// Emits one architecture's section: the accumulator is loaded with the syscall number.
fn emit_section(a: &mut Asm, rules: &[Rule], wide: bool, default: u32, x32_check: bool) {
    a.stmt(LD_W_ABS, OFF_NR);
    if x32_check {
        let not_x32 = a.label();
        a.jump(JGE_K, X32_SYSCALL_BIT, None, Some(not_x32));
        a.stmt(RET_K, RET_ERRNO | ENOSYS);
        a.bind(not_x32);
    }
    let mut i = 0;
    while i < rules.len() {
        if rules[i].conds.is_empty() {
            // A run of unconditional rules with the same return: one shared RET.
            let ret = rules[i].ret;
            let mut j = i;
            while j < rules.len()
                && j - i < CHUNK
                && rules[j].conds.is_empty()
                && rules[j].ret == ret
            {
                j += 1;
            }
            let hit = a.label();
            for r in &rules[i..j] {
                a.jump(JEQ_K, r.nr, Some(hit), None);
            }
            // None matched: jump over the shared RET.
            a.stmt(JA, 1);
            a.bind(hit);
            a.stmt(RET_K, ret);
            i = j;
        } else {
            let r = &rules[i];
            let skip = a.label();
            let fail = a.label();
            a.jump(JEQ_K, r.nr, None, Some(skip));
            emit_conds(a, &r.conds, wide, fail);
            a.stmt(RET_K, r.ret);
            a.bind(fail);
            // The conditions clobbered the accumulator: reload the number.
            a.stmt(LD_W_ABS, OFF_NR);
            a.bind(skip);
            i += 1;
        }
    }
    a.stmt(RET_K, default);
}

/// Compiles rules to a program: the architecture checks, then the x86-64 section, then the
/// i386 one (each section ends with the default RET, so sections never fall into each other).
pub fn assemble(r: &Rules) -> Result<Vec<Insn>, SeccompError> {
    let mut x86_64 = Asm::default();
    emit_section(&mut x86_64, &r.x86_64, true, r.default, true);
    let x86_64 = x86_64.finish()?;
    let ins = |code, jt, jf, k| Insn { code, jt, jf, k };
    let mut insns = vec![ins(LD_W_ABS, 0, 0, OFF_ARCH)];
    match &r.i386 {
        None => {
            insns.push(ins(JEQ_K, 1, 0, AUDIT_ARCH_X86_64));
            insns.push(ins(RET_K, 0, 0, RET_KILL_THREAD));
            insns.extend(x86_64);
        }
        Some(rules) => {
            let mut i386 = Asm::default();
            emit_section(&mut i386, rules, false, r.default, false);
            let i386 = i386.finish()?;
            insns.push(ins(JEQ_K, 3, 0, AUDIT_ARCH_X86_64));
            insns.push(ins(JEQ_K, 1, 0, AUDIT_ARCH_I386));
            insns.push(ins(RET_K, 0, 0, RET_KILL_THREAD));
            // The i386 section is further than a conditional jump reaches.
            insns.push(ins(JA, 0, 0, x86_64.len() as u32));
            insns.extend(x86_64);
            insns.extend(i386);
        }
    }
    check_len(insns)
}

fn check_len(insns: Vec<Insn>) -> Result<Vec<Insn>, SeccompError> {
    // BPF_MAXINSNS
    if insns.len() > 4096 {
        return Err(SeccompError::Program(format!(
            "the seccomp profile compiles to {} BPF instructions, more than the kernel's 4096",
            insns.len()
        )));
    }
    Ok(insns)
}

/// Compiles an OCI profile.
pub fn compile(s: &LinuxSeccomp) -> Result<Program, SeccompError> {
    let r = rules(s)?;
    let insns = assemble(&r)?;
    let mut flags = 0;
    for f in s.flags().iter().flatten() {
        flags |= match f {
            LinuxSeccompFilterFlag::SeccompFilterFlagTsync => 1,
            LinuxSeccompFilterFlag::SeccompFilterFlagLog => 2,
            LinuxSeccompFilterFlag::SeccompFilterFlagSpecAllow => 4,
        };
    }
    Ok(Program {
        insns,
        flags,
        skipped: r.skipped,
    })
}

/// Installs a program on the calling thread (`seccomp(SECCOMP_SET_MODE_FILTER)`). Needs
/// no_new_privs or CAP_SYS_ADMIN.
pub fn install(p: &Program) -> Result<(), SeccompError> {
    let filters: Vec<libc::sock_filter> = p
        .insns
        .iter()
        .map(|i| libc::sock_filter {
            code: i.code,
            jt: i.jt,
            jf: i.jf,
            k: i.k,
        })
        .collect();
    let prog = libc::sock_fprog {
        len: u16::try_from(filters.len())
            .map_err(|_| SeccompError::Program("seccomp program too long".into()))?,
        filter: filters.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: seccomp(2) reads `prog`, which points at `filters`, alive for the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            1u32, // SECCOMP_SET_MODE_FILTER
            p.flags,
            &prog as *const libc::sock_fprog,
        )
    };
    if rc != 0 {
        return Err(SeccompError::Install(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// A classic BPF interpreter for seccomp programs (tests and fuzzing): what the kernel returns.
pub fn run(insns: &[Insn], arch: u32, nr: u32, args: &[u64; 6]) -> Result<u32, SeccompError> {
    let mut data = [0u8; 64];
    data[0..4].copy_from_slice(&nr.to_le_bytes());
    data[4..8].copy_from_slice(&arch.to_le_bytes());
    for (i, a) in args.iter().enumerate() {
        data[16 + 8 * i..24 + 8 * i].copy_from_slice(&a.to_le_bytes());
    }
    let mut acc: u32 = 0;
    let mut pc = 0usize;
    loop {
        let i = insns
            .get(pc)
            .ok_or_else(|| SeccompError::Program("ran off the end of the program".into()))?;
        pc += 1;
        match i.code {
            LD_W_ABS => {
                let o = i.k as usize;
                let w = data
                    .get(o..o + 4)
                    .ok_or_else(|| SeccompError::Program("load out of range".into()))?;
                acc = u32::from_le_bytes([w[0], w[1], w[2], w[3]]);
            }
            AND_K => acc &= i.k,
            RET_K => return Ok(i.k),
            JA => pc += i.k as usize,
            JEQ_K | JGT_K | JGE_K => {
                let t = match i.code {
                    JEQ_K => acc == i.k,
                    JGT_K => acc > i.k,
                    _ => acc >= i.k,
                };
                pc += usize::from(if t { i.jt } else { i.jf });
            }
            other => return Err(SeccompError::Program(format!("unknown opcode {other:#x}"))),
        }
    }
}

#[cfg(test)]
mod tests;
