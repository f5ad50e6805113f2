use super::*;
use proptest::prelude::*;

fn profile(json: &str) -> LinuxSeccomp {
    serde_json::from_str(json).expect("profile parses")
}

fn nr(name: &str) -> u32 {
    number(syscalls::X86_64, name).expect("known syscall")
}

fn check(p: &Program, arch: u32, nr: u32, args: [u64; 6]) -> u32 {
    run(&p.insns, arch, nr, &args).expect("program runs")
}

#[test]
fn a_deny_list_blocks_only_what_it_names() {
    let p = compile(&profile(
        r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[
            {"names":["uname"],"action":"SCMP_ACT_ERRNO"},
            {"names":["mkdir","no_such_syscall"],"action":"SCMP_ACT_ERRNO","errnoRet":13}]}"#,
    ))
    .expect("compiles");
    assert_eq!(
        check(&p, AUDIT_ARCH_X86_64, nr("uname"), [0; 6]),
        RET_ERRNO | 1
    );
    assert_eq!(
        check(&p, AUDIT_ARCH_X86_64, nr("mkdir"), [0; 6]),
        RET_ERRNO | 13
    );
    assert_eq!(
        check(&p, AUDIT_ARCH_X86_64, nr("getpid"), [0; 6]),
        RET_ALLOW
    );
    assert_eq!(p.skipped, ["no_such_syscall"]);
    // Not listed: i386 and foreign architectures are killed, x32 gets ENOSYS.
    assert_eq!(check(&p, AUDIT_ARCH_I386, 122, [0; 6]), RET_KILL_THREAD);
    assert_eq!(check(&p, 0xc000_00b7, 63, [0; 6]), RET_KILL_THREAD);
    assert_eq!(
        check(
            &p,
            AUDIT_ARCH_X86_64,
            X32_SYSCALL_BIT | nr("getpid"),
            [0; 6]
        ),
        RET_ERRNO | ENOSYS
    );
}

#[test]
fn i386_syscalls_are_filtered_by_their_own_numbers() {
    let p = compile(&profile(
        r#"{"defaultAction":"SCMP_ACT_ALLOW","architectures":["SCMP_ARCH_X86_64","SCMP_ARCH_X86","SCMP_ARCH_X32"],
            "syscalls":[{"names":["uname"],"action":"SCMP_ACT_ERRNO"}]}"#,
    ))
    .expect("compiles");
    let uname_i386 = number(syscalls::I386, "uname").expect("i386 uname");
    assert_eq!(uname_i386, 122);
    assert_eq!(check(&p, AUDIT_ARCH_I386, 122, [0; 6]), RET_ERRNO | 1);
    // 63 is uname on x86-64 and dup2 on i386, which stays allowed.
    assert_eq!(check(&p, AUDIT_ARCH_I386, 63, [0; 6]), RET_ALLOW);
    assert_eq!(check(&p, AUDIT_ARCH_X86_64, 63, [0; 6]), RET_ERRNO | 1);
}

#[test]
fn an_allow_list_with_argument_conditions() {
    // As in containerd's default profile: personality only with some values, clone without
    // namespace flags, everything else refused with EPERM.
    let p = compile(&profile(
        r#"{"defaultAction":"SCMP_ACT_ERRNO","defaultErrnoRet":1,"syscalls":[
            {"names":["read","write","exit_group"],"action":"SCMP_ACT_ALLOW"},
            {"names":["personality"],"action":"SCMP_ACT_ALLOW","args":[{"index":0,"value":0,"op":"SCMP_CMP_EQ"}]},
            {"names":["personality"],"action":"SCMP_ACT_ALLOW","args":[{"index":0,"value":4294967295,"op":"SCMP_CMP_EQ"}]},
            {"names":["clone"],"action":"SCMP_ACT_ALLOW","args":[{"index":0,"value":2114060288,"valueTwo":0,"op":"SCMP_CMP_MASKED_EQ"}]},
            {"names":["socket"],"action":"SCMP_ACT_ERRNO","errnoRet":97,"args":[{"index":0,"value":16,"op":"SCMP_CMP_EQ"}]},
            {"names":["socket"],"action":"SCMP_ACT_ALLOW"}]}"#,
    ))
    .expect("compiles");
    let x = AUDIT_ARCH_X86_64;
    assert_eq!(check(&p, x, nr("read"), [0; 6]), RET_ALLOW);
    assert_eq!(check(&p, x, nr("getpid"), [0; 6]), RET_ERRNO | 1);
    assert_eq!(check(&p, x, nr("personality"), [0; 6]), RET_ALLOW);
    assert_eq!(
        check(&p, x, nr("personality"), [0xffff_ffff, 0, 0, 0, 0, 0]),
        RET_ALLOW
    );
    assert_eq!(
        check(&p, x, nr("personality"), [8, 0, 0, 0, 0, 0]),
        RET_ERRNO | 1
    );
    // The high word counts: 0x1_0000_0000 is not 0.
    assert_eq!(
        check(&p, x, nr("personality"), [1 << 32, 0, 0, 0, 0, 0]),
        RET_ERRNO | 1
    );
    let clone_newns = 0x0002_0000;
    assert_eq!(check(&p, x, nr("clone"), [0x11, 0, 0, 0, 0, 0]), RET_ALLOW);
    assert_eq!(
        check(&p, x, nr("clone"), [clone_newns, 0, 0, 0, 0, 0]),
        RET_ERRNO | 1
    );
    // First match in profile order: AF_NETLINK refused, others allowed.
    assert_eq!(
        check(&p, x, nr("socket"), [16, 0, 0, 0, 0, 0]),
        RET_ERRNO | 97
    );
    assert_eq!(check(&p, x, nr("socket"), [2, 0, 0, 0, 0, 0]), RET_ALLOW);
}

#[test]
fn bad_profiles_are_refused_with_the_reason() {
    let notify = compile(&profile(
        r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["uname"],"action":"SCMP_ACT_NOTIFY"}]}"#,
    ))
    .expect_err("notify refused");
    assert!(
        notify.to_string().contains("SCMP_ACT_NOTIFY")
            && notify.to_string().contains("syscalls[0]"),
        "{notify}"
    );
    let index = compile(&profile(
        r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["uname"],"action":"SCMP_ACT_ERRNO","args":[{"index":6,"value":1,"op":"SCMP_CMP_EQ"}]}]}"#,
    ))
    .expect_err("index refused");
    assert!(index.to_string().contains("index 6"), "{index}");
    // containerd's default profile: MASKED_EQ with no valueTwo means a datum of 0.
    let masked = compile(&profile(
        r#"{"defaultAction":"SCMP_ACT_ERRNO","syscalls":[{"names":["clone"],"action":"SCMP_ACT_ALLOW","args":[{"index":0,"value":2114060288,"op":"SCMP_CMP_MASKED_EQ"}]}]}"#,
    ))
    .expect("datum defaults to 0");
    assert_eq!(
        check(
            &masked,
            AUDIT_ARCH_X86_64,
            nr("clone"),
            [0x11, 0, 0, 0, 0, 0]
        ),
        RET_ALLOW
    );
    assert_eq!(
        check(
            &masked,
            AUDIT_ARCH_X86_64,
            nr("clone"),
            [0x2_0000, 0, 0, 0, 0, 0]
        ),
        RET_ERRNO | 1
    );
    assert!(serde_json::from_str::<LinuxSeccomp>(r#"{"defaultAction":"SCMP_ACT_MAYBE"}"#).is_err());
}

#[test]
fn long_allow_lists_are_split_into_reachable_chunks() {
    // Every x86-64 syscall but uname allowed, one by one: more than a jump offset reaches.
    let names: Vec<String> = syscalls::X86_64
        .iter()
        .map(|(n, _)| n.to_string())
        .filter(|n| n != "uname")
        .collect();
    let json = format!(
        r#"{{"defaultAction":"SCMP_ACT_KILL_PROCESS","syscalls":[{{"names":{},"action":"SCMP_ACT_ALLOW"}}]}}"#,
        serde_json::to_string(&names).expect("json")
    );
    let p = compile(&profile(&json)).expect("compiles");
    for (name, n) in syscalls::X86_64 {
        let want = if *name == "uname" {
            RET_KILL_PROCESS
        } else {
            RET_ALLOW
        };
        assert_eq!(check(&p, AUDIT_ARCH_X86_64, *n, [0; 6]), want, "{name}");
    }
}

fn op() -> impl Strategy<Value = LinuxSeccompOperator> {
    use LinuxSeccompOperator::*;
    prop_oneof![
        Just(ScmpCmpNe),
        Just(ScmpCmpLt),
        Just(ScmpCmpLe),
        Just(ScmpCmpEq),
        Just(ScmpCmpGe),
        Just(ScmpCmpGt),
        Just(ScmpCmpMaskedEq),
    ]
}

fn value() -> impl Strategy<Value = u64> {
    prop_oneof![
        0u64..4,
        Just(u64::MAX),
        Just(u64::from(u32::MAX)),
        Just(1u64 << 32),
        any::<u64>(),
    ]
}

fn cond() -> impl Strategy<Value = Cond> {
    (0u32..6, op(), value(), value()).prop_map(|(index, op, value, value_two)| Cond {
        index,
        op,
        value,
        value_two,
    })
}

fn ret() -> impl Strategy<Value = u32> {
    prop_oneof![
        Just(RET_ALLOW),
        Just(RET_KILL_PROCESS),
        Just(RET_LOG),
        (0u32..200).prop_map(|e| RET_ERRNO | e),
    ]
}

fn rule() -> impl Strategy<Value = Rule> {
    (0u32..8, prop::collection::vec(cond(), 0..4), ret()).prop_map(|(nr, conds, ret)| Rule {
        nr,
        conds,
        ret,
    })
}

proptest! {
    /// The compiled program returns what the profile's reference semantics say, for any
    /// rules and any syscall (numbers and arguments chosen to hit the comparisons' edges).
    #[test]
    fn the_program_agrees_with_the_profile(
        x86_64 in prop::collection::vec(rule(), 0..40),
        i386 in prop::option::of(prop::collection::vec(rule(), 0..10)),
        default in ret(),
        arch in prop_oneof![Just(AUDIT_ARCH_X86_64), Just(AUDIT_ARCH_I386), Just(0xc000_00b7u32)],
        nr in prop_oneof![0u32..10, Just(X32_SYSCALL_BIT | 1)],
        args in prop::array::uniform6(value()),
    ) {
        let r = Rules { default, x86_64, i386, skipped: Vec::new() };
        let insns = assemble(&r).expect("assembles");
        prop_assert_eq!(run(&insns, arch, nr, &args).expect("runs"), evaluate(&r, arch, nr, &args));
    }

    /// Any JSON the OCI types accept either compiles or is refused with a message; never a panic.
    #[test]
    fn arbitrary_profiles_never_panic(
        names in prop::collection::vec("[a-z_0-9]{1,12}", 0..5),
        index in 0usize..9,
        v in any::<u64>(),
    ) {
        let json = serde_json::json!({
            "defaultAction": "SCMP_ACT_ERRNO",
            "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86"],
            "syscalls": [{"names": names, "action": "SCMP_ACT_ALLOW",
                          "args": [{"index": index, "value": v, "op": "SCMP_CMP_GT"}]}]
        });
        let s: LinuxSeccomp = serde_json::from_value(json).expect("valid OCI");
        let _ = compile(&s);
    }
}

#[test]
fn containerds_default_profile_compiles_and_means_what_it_says() {
    // `ctr run --seccomp` of containerd 1.6 (Debian 12), as it reaches the runtime.
    let s: LinuxSeccomp =
        serde_json::from_str(include_str!("containerd-default.json")).expect("profile");
    let p = compile(&s).expect("compiles");
    assert!(p.insns.len() < 4096, "{} instructions", p.insns.len());
    let x = AUDIT_ARCH_X86_64;
    for allowed in ["read", "write", "execve", "clone", "uname", "mkdir"] {
        assert_eq!(check(&p, x, nr(allowed), [0; 6]), RET_ALLOW, "{allowed}");
    }
    // Namespaces and kernel-wide changes need CAP_SYS_ADMIN, which the profile does not grant.
    for refused in ["unshare", "mount", "kexec_load", "init_module", "bpf"] {
        assert_eq!(
            check(&p, x, nr(refused), [0; 6]),
            RET_ERRNO | 1,
            "{refused}"
        );
    }
    assert_eq!(
        check(&p, x, nr("clone"), [0x0002_0000, 0, 0, 0, 0, 0]),
        RET_ERRNO | 1,
        "clone(CLONE_NEWNS)"
    );
    // i386 is filtered with its own numbers (uname is 122 there).
    assert_eq!(check(&p, AUDIT_ARCH_I386, 122, [0; 6]), RET_ALLOW);
}
