//! Unit tests of [`super`].

use super::*;
use kata_config::hypervisor::SharedFs;

fn spec(accel: Accel) -> LaunchSpec {
    LaunchSpec {
        id: "sb1".into(),
        accel,
        channel: AgentChannel::Serial {
            socket: "/run/s/agent.sock".into(),
        },
        shared_fs: SharedFsDevice::VirtioFs {
            socket: "/run/s/vfsd.sock".into(),
        },
        qmp_socket: "/run/s/qmp.sock".into(),
        console_log: "/run/s/console.log".into(),
        pid_file: "/run/s/pid".into(),
        vcpus: 1,
        memory_mib: 2048,
        extra_kernel_params: vec!["agent.x=1".into()],
        debug_console: None,
        netns: None,
        nics: Vec::new(),
        image_size: 0,
        memory_file: None,
        incoming: false,
    }
}

fn cfg() -> HypervisorConfig {
    HypervisorConfig {
        kernel: "/k".into(),
        initrd: "/i".into(),
        default_maxvcpus: 2,
        default_maxmemory: 24000,
        ..HypervisorConfig::default()
    }
}

fn joined(a: &[String]) -> String {
    a.join(" ")
}

#[test]
fn golden_default_tcg() {
    let a = build(&cfg(), &spec(Accel::Tcg));
    let expected = "-name sandbox-sb1 -machine q35 -accel tcg,tb-size=32 -cpu max,pmu=off -smp 2,maxcpus=2 \
-m 2048M,slots=10,maxmem=24000M -object memory-backend-memfd,id=ram0,size=2048M,share=on -numa node,memdev=ram0 \
-nodefaults -no-user-config -nographic -no-reboot -display none -vga none -serial file:/run/s/console.log \
-qmp unix:/run/s/qmp.sock,server=on,wait=off -pidfile /run/s/pid -kernel /k -initrd /i \
-append console=ttyS0 panic=1 reboot=k tsc=reliable no_timer_check noreplace-smp rcupdate.rcu_expedited=1 cryptomgr.notests i8042.direct=1 i8042.dumbkbd=1 i8042.nopnp=1 i8042.noaux=1 net.ifnames=0 iommu=off memhp_default_state=online_movable quiet maxcpus=1 agent.x=1 \
-device pci-bridge,bus=pcie.0,id=pci-bridge-0,chassis_nr=1,shpc=off,io-reserve=4k,mem-reserve=1m,pref64-reserve=1m \
-device virtio-serial-pci,id=serial0 -chardev socket,id=agent,path=/run/s/agent.sock,server=on,wait=off \
-device virtserialport,bus=serial0.0,chardev=agent,name=agent.channel.0 \
-object rng-random,id=rng0,filename=/dev/urandom -device virtio-rng-pci,rng=rng0 \
-device virtio-balloon-pci,id=balloon0,free-page-reporting=on \
-chardev socket,id=char-fs,path=/run/s/vfsd.sock -device vhost-user-fs-pci,chardev=char-fs,tag=kataShared,queue-size=1024";
    assert_eq!(joined(&a), expected);
}

#[test]
fn golden_kvm_vsock_9p_and_options() {
    let mut h = cfg();
    h.shared_fs = SharedFs::Virtio9p;
    h.machine_accelerators = "nvdimm=off".into();
    h.cpu_features = String::new();
    h.enable_iommu = true;
    h.enable_iommu_platform = true;
    h.default_bridges = 0;
    h.pcie_root_port = 2;
    h.seccompsandbox = "on,obsolete=deny".into();
    h.enable_debug = true;
    h.kernel_params = "foo=bar".into();
    h.enable_mem_prealloc = true;
    h.memory_slots = 0;
    let mut s = spec(Accel::Kvm);
    s.channel = AgentChannel::Vsock { cid: 7 };
    s.shared_fs = SharedFsDevice::Virtio9p {
        dir: "/run/s/shared".into(),
    };
    let a = joined(&build(&h, &s));
    for part in [
        "-machine q35,kernel-irqchip=split,nvdimm=off -accel kvm ",
        "-cpu host,-arch-capabilities ",
        "-m 2048M ",
        "memory-backend-ram,id=ram0,size=2048M,prealloc=on ",
        "-sandbox on,obsolete=deny ",
        "-device intel-iommu,intremap=on,caching-mode=on,device-iotlb=on ",
        "-device pcie-root-port,id=rp0,bus=pcie.0,chassis=10,slot=0,port=0 ",
        "-device pcie-root-port,id=rp1,bus=pcie.0,chassis=11,slot=1,port=1 ",
        "-device vhost-vsock-pci,id=vsock0,guest-cid=7,iommu_platform=on ",
        " debug agent.x=1 foo=bar ",
        "-fsdev local,id=fs0,path=/run/s/shared,security_model=none,multidevs=remap -device virtio-9p-pci,fsdev=fs0,mount_tag=kataShared,iommu_platform=on",
    ] {
        assert!(a.contains(part), "missing {part:?} in\n{a}");
    }
    assert!(!a.contains("-accel tcg"), "no TCG cache option under KVM");
    assert!(!a.contains("pci-bridge"));
    assert!(!a.contains(" quiet"));
}

#[test]
fn debug_console_port_beside_the_agent_channel() {
    let mut sp = spec(Accel::Tcg);
    sp.debug_console = Some("/run/s/debug-console.sock".into());
    let a = joined(&build(&cfg(), &sp));
    assert!(
        a.contains(
            "-device virtserialport,bus=serial0.0,chardev=agent,name=agent.channel.0 \
-chardev socket,id=debugconsole,path=/run/s/debug-console.sock,server=on,wait=off \
-device virtserialport,bus=serial0.0,chardev=debugconsole,name=agent.debug_console.0 "
        ),
        "{a}"
    );
    // Over vsock the agent listens on its vsock port: no serial device.
    sp.channel = AgentChannel::Vsock { cid: 9 };
    let a = joined(&build(&cfg(), &sp));
    assert!(!a.contains("debugconsole"), "{a}");
}

#[test]
fn memory_backends() {
    let mut h = cfg();
    assert!(
        memory_backend(&h, "m", 512).starts_with("memory-backend-memfd,id=m,size=512M,share=on")
    );
    h.enable_hugepages = true;
    h.enable_mem_prealloc = true;
    assert_eq!(
        memory_backend(&h, "m", 512),
        "memory-backend-file,id=m,size=512M,mem-path=/dev/hugepages,share=on,prealloc=on"
    );
    h.enable_hugepages = false;
    h.enable_mem_prealloc = false;
    h.file_mem_backend = "/dev/shm".into();
    assert_eq!(
        memory_backend(&h, "m", 512),
        "memory-backend-file,id=m,size=512M,mem-path=/dev/shm,share=on"
    );
    h.file_mem_backend.clear();
    h.shared_fs = SharedFs::Virtio9p;
    assert_eq!(
        memory_backend(&h, "m", 512),
        "memory-backend-ram,id=m,size=512M"
    );
}

#[test]
fn template_and_clone_memory() {
    let mut h = cfg();
    h.shared_fs = SharedFs::Virtio9p;
    let mut s = spec(Accel::Tcg);
    s.memory_file = Some(MemoryFile {
        path: "/run/t/memory".into(),
        shared: true,
    });
    let template = joined(&build(&h, &s));
    assert!(
        template.contains("-object memory-backend-file,id=ram0,size=2048M,mem-path=/run/t/memory,share=on -numa node,memdev=ram0"),
        "{template}"
    );
    assert!(!template.contains("-incoming"));
    s.memory_file = Some(MemoryFile {
        path: "/run/t/memory".into(),
        shared: false,
    });
    s.incoming = true;
    let clone = joined(&build(&h, &s));
    assert!(
        clone.contains("mem-path=/run/t/memory,share=off -numa"),
        "{clone}"
    );
    assert!(clone.ends_with(" -S -incoming defer"), "{clone}");
    // Apart from the RAM's sharing and the incoming flags, the clone's devices are the
    // template's.
    assert_eq!(
        clone
            .replace("share=off", "share=on")
            .trim_end_matches(" -S -incoming defer"),
        template
    );
}

#[test]
fn nics() {
    let mut sp = spec(Accel::Tcg);
    sp.nics = vec![
        Nic {
            tap: "tap0_kata".into(),
            mac: "aa:bb:cc:dd:ee:ff".into(),
            vhost: false,
            fd: None,
        },
        Nic {
            tap: "tap1_kata".into(),
            mac: "aa:bb:cc:dd:ee:01".into(),
            vhost: false,
            fd: Some(7),
        },
    ];
    let a = joined(&build(&cfg(), &sp));
    assert!(a.contains("-netdev tap,id=net0,ifname=tap0_kata,script=no,downscript=no,vhost=off -device virtio-net-pci,netdev=net0,mac=aa:bb:cc:dd:ee:ff,romfile="), "{a}");
    assert!(a.contains("-netdev tap,id=net1,fd=7,vhost=off -device virtio-net-pci,netdev=net1,mac=aa:bb:cc:dd:ee:01,romfile="), "{a}");
}

#[test]
fn entropy_tb_size_and_balloon() {
    let mut h = cfg();
    h.entropy_source = String::new();
    h.tcg_tb_size = 0;
    h.reclaim_guest_freed_memory = false;
    let a = joined(&build(&h, &spec(Accel::Tcg)));
    assert!(!a.contains("virtio-rng") && !a.contains("tb-size") && !a.contains("balloon"));
    assert!(a.contains("-accel tcg "));
}
