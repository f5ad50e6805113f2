//! Pod semantics: which sandbox a container belongs to (from the annotations container managers
//! set), and the rewriting of a pod container's spec for the guest.
//!
//! containerd's CRI plugin starts a shim for the pod's sandbox (pause) container; the shim boots
//! the VM. For every application container of the pod it calls `start` again: that call finds the
//! running sandbox shim and returns its address, so one VM and one shim serve the whole pod.

use std::collections::HashMap;
use std::path::Path;

use crate::error::{invalid, step, ShimError};
use oci_spec::runtime::{LinuxNamespaceType, Mount, Spec};

/// containerd CRI: `sandbox` or `container`.
pub const CRI_CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
/// containerd CRI: the pod's sandbox id.
pub const CRI_SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";
/// CRI-O: `sandbox` or `container`.
pub const CRIO_CONTAINER_TYPE: &str = "io.kubernetes.cri-o.ContainerType";
/// CRI-O: the pod's sandbox id.
pub const CRIO_SANDBOX_ID: &str = "io.kubernetes.cri-o.SandboxID";
/// Kata's own: `pod_sandbox` or `pod_container`.
pub const KATA_CONTAINER_TYPE: &str = "io.katacontainers.pkg.oci.container_type";

/// Where emptyDir volumes live in the guest (the guest's memory) unless
/// `disable_guest_empty_dir`.
pub const GUEST_EPHEMERAL_DIR: &str = "/run/kata-containers/sandbox/ephemeral";

/// What a container is in its pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// Creates the VM: the pod's sandbox container, or a lone container (`ctr run`).
    Sandbox,
    /// Joins the VM of sandbox `sandbox_id`.
    Container {
        /// The pod's sandbox id.
        sandbox_id: String,
    },
}

/// The containerd namespace Docker runs its containers in.
pub const DOCKER_NAMESPACE: &str = "moby";

/// Whether the manager configures the container's network namespace through the task's pid
/// after Create: Docker (26 and later moves the veth into `/proc/<pid>/ns/net`), or a
/// `createRuntime` or `prestart` hook (nerdctl's CNI hook reads the pid from its state).
pub fn configures_netns_by_pid(containerd_namespace: &str, spec: &Spec) -> bool {
    let hooked = spec.hooks().as_ref().is_some_and(|h| {
        #[allow(deprecated)]
        let prestart = h.prestart().as_ref().is_some_and(|v| !v.is_empty());
        prestart || h.create_runtime().as_ref().is_some_and(|v| !v.is_empty())
    });
    containerd_namespace == DOCKER_NAMESPACE || hooked
}

/// The role the annotations give a container.
pub fn role(annotations: &HashMap<String, String>) -> Result<Role, ShimError> {
    let get = |k: &str| annotations.get(k).map(String::as_str);
    let is_container = matches!(get(CRI_CONTAINER_TYPE), Some("container"))
        || matches!(get(CRIO_CONTAINER_TYPE), Some("container"))
        || matches!(get(KATA_CONTAINER_TYPE), Some("pod_container"));
    if !is_container {
        return Ok(Role::Sandbox);
    }
    let id = get(CRI_SANDBOX_ID)
        .or_else(|| get(CRIO_SANDBOX_ID))
        .filter(|s| !s.is_empty())
        .ok_or_else(|| {
            invalid(format!("a pod container needs its sandbox id in the {CRI_SANDBOX_ID} (or {CRIO_SANDBOX_ID}) annotation"))
        })?;
    Ok(Role::Container {
        sandbox_id: id.to_string(),
    })
}

/// Whether the annotations mark a pod's sandbox (pause) container, which holds no workload.
pub fn is_pod_sandbox(annotations: &HashMap<String, String>) -> bool {
    let get = |k: &str| annotations.get(k).map(String::as_str);
    matches!(get(CRI_CONTAINER_TYPE), Some("sandbox"))
        || matches!(get(CRIO_CONTAINER_TYPE), Some("sandbox"))
        || matches!(get(KATA_CONTAINER_TYPE), Some("pod_sandbox"))
}

/// The role of the container whose bundle is `bundle` (its config.json's annotations).
pub fn role_of_bundle(bundle: &std::path::Path) -> Result<Role, ShimError> {
    let path = bundle.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(step(format!("read {}", path.display())))?;
    #[derive(serde::Deserialize)]
    struct Partial {
        #[serde(default)]
        annotations: HashMap<String, String>,
    }
    let p: Partial =
        serde_json::from_str(&text).map_err(step(format!("parse {}", path.display())))?;
    role(&p.annotations)
}

/// Where the pod's shared namespaces are in the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PodNamespaces {
    /// Those of the pod's sandbox (pause) container, whose init has this guest pid.
    PauseContainer(u32),
    /// Those the agent holds for a pod without a pause container (containerd's sandbox API),
    /// bound at [`kata_sandbox::sandbox::POD_NAMESPACES_DIR`].
    Holder,
    /// None: a namespace given by path is created new (a lone container, the pause itself).
    None,
}

/// Rewrites namespaces for the guest: the network namespace is the VM's own (it holds the pod's
/// interfaces), and a namespace given by a host path (the pod's, shared with its sandbox)
/// becomes the same namespace of the pod in the guest, as `shared` says.
pub fn guest_namespaces(spec: &mut Spec, shared: PodNamespaces) {
    let Some(linux) = spec.linux_mut() else {
        return;
    };
    let Some(list) = linux.namespaces().clone() else {
        return;
    };
    let mut out = Vec::with_capacity(list.len());
    for mut ns in list {
        // The namespaces a pod shares with its sandbox container.
        let shared_name = match ns.typ() {
            LinuxNamespaceType::Network | LinuxNamespaceType::User => continue,
            LinuxNamespaceType::Ipc => Some("ipc"),
            LinuxNamespaceType::Uts => Some("uts"),
            LinuxNamespaceType::Pid => Some("pid"),
            _ => None,
        };
        let path = match (ns.path(), shared_name, shared) {
            (Some(_), Some(name), PodNamespaces::PauseContainer(pid)) => {
                Some(format!("/proc/{pid}/ns/{name}").into())
            }
            (Some(_), Some(name), PodNamespaces::Holder) => {
                Some(Path::new(kata_sandbox::sandbox::POD_NAMESPACES_DIR).join(name))
            }
            _ => None,
        };
        ns.set_path(path);
        out.push(ns);
    }
    linux.set_namespaces(Some(out));
}

/// What the runtime takes from the CRI's `PodSandboxConfig`, which containerd's sandbox API
/// passes as CreateSandbox's options (`runtime.v1.PodSandboxConfig`).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PodConfig {
    /// The pod's hostname (field 2).
    pub hostname: String,
    /// The pod's annotations (field 7), where Kata's per-pod settings are.
    pub annotations: HashMap<String, String>,
    /// `linux.cgroup_parent` (fields 8, 1).
    pub cgroup_parent: String,
    /// `linux.sysctls` (fields 8, 3).
    pub sysctls: std::collections::BTreeMap<String, String>,
}

/// A protobuf map entry of strings (key 1, value 2).
fn map_entry(b: &[u8]) -> Option<(String, String)> {
    let entry = crate::rootfs::len_fields(b)?;
    let get = |n: u64| {
        entry
            .iter()
            .rev()
            .find(|(k, _)| *k == n)
            .map(|(_, v)| String::from_utf8(v.to_vec()).ok())
            .unwrap_or(Some(String::new()))
    };
    Some((get(1)?, get(2)?))
}

impl PodConfig {
    /// Decodes the fields the runtime uses; `None` for bytes that are not a protobuf message.
    pub fn decode(b: &[u8]) -> Option<PodConfig> {
        let mut c = PodConfig::default();
        for (number, value) in crate::rootfs::len_fields(b)? {
            match number {
                2 => c.hostname = String::from_utf8(value.to_vec()).ok()?,
                7 => {
                    let (k, v) = map_entry(value)?;
                    c.annotations.insert(k, v);
                }
                8 => {
                    for (n, linux) in crate::rootfs::len_fields(value)? {
                        match n {
                            1 => c.cgroup_parent = String::from_utf8(linux.to_vec()).ok()?,
                            3 => {
                                let (k, v) = map_entry(linux)?;
                                c.sysctls.insert(k, v);
                            }
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        Some(c)
    }

    /// The pod's cgroups path, as containerd's CRI gives a pause container: `parent:cri-
    /// containerd:<id>` under a systemd slice, `<parent>/<id>` otherwise.
    pub fn cgroups_path(&self, id: &str) -> String {
        let base = Path::new(&self.cgroup_parent)
            .file_name()
            .map(|b| b.to_string_lossy().into_owned())
            .unwrap_or_default();
        if base.ends_with(".slice") {
            format!("{base}:cri-containerd:{id}")
        } else if self.cgroup_parent.is_empty() {
            id.to_string()
        } else {
            format!("{}/{id}", self.cgroup_parent.trim_end_matches('/'))
        }
    }
}

/// The volume name of a Kubernetes emptyDir mount (`.../volumes/kubernetes.io~empty-dir/NAME`),
/// or `None` for any other mount.
pub fn empty_dir_name(m: &Mount) -> Option<String> {
    let source = m.source().as_ref()?.to_str()?;
    let (_, rest) = source.split_once("/kubernetes.io~empty-dir/")?;
    let name = rest.trim_end_matches('/');
    (!name.is_empty() && !name.contains('/') && name != "." && name != "..")
        .then(|| name.to_string())
}

/// The size in bytes of the tmpfs mounted at `path` (a `medium: Memory` emptyDir, which the
/// kubelet mounts with the volume's size limit), or None when `path` is not a tmpfs.
pub fn tmpfs_size(path: &Path) -> Option<u64> {
    let st = nix::sys::statfs::statfs(path).ok()?;
    (st.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC)
        .then(|| st.blocks() * st.block_size() as u64)
}

/// The kubelet's volume plugins whose content it updates in place by swapping a `..data`
/// symlink: these volumes are watched (copied into the guest and mirrored) rather than shared.
pub const WATCHED_PLUGINS: [&str; 4] = [
    "kubernetes.io~configmap",
    "kubernetes.io~secret",
    "kubernetes.io~projected",
    "kubernetes.io~downward-api",
];

/// Whether a mount is a whole Kubernetes ConfigMap, Secret, projected or downward-API volume
/// (`.../volumes/<plugin>/NAME`; a subPath of one is a file or directory elsewhere and, as with
/// runc, is not updated).
pub fn is_watched_volume(m: &Mount) -> bool {
    let Some(source) = m.source().as_ref().and_then(|s| s.to_str()) else {
        return false;
    };
    WATCHED_PLUGINS.iter().any(|p| {
        source
            .split_once(&format!("/volumes/{p}/"))
            .is_some_and(|(_, name)| {
                let name = name.trim_end_matches('/');
                !name.is_empty() && !name.contains('/') && name != "." && name != ".."
            })
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn watched_volumes() {
        let m = |s: &str| {
            let mut m = oci_spec::runtime::Mount::default();
            m.set_source(Some(s.into()));
            m
        };
        let base = "/var/lib/kubelet/pods/u1/volumes";
        for p in super::WATCHED_PLUGINS {
            assert!(
                super::is_watched_volume(&m(&format!("{base}/{p}/cfg"))),
                "{p}"
            );
            assert!(
                !super::is_watched_volume(&m(&format!("{base}/{p}/cfg/key"))),
                "{p}"
            );
            assert!(
                !super::is_watched_volume(&m(&format!("{base}/{p}/.."))),
                "{p}"
            );
        }
        assert!(!super::is_watched_volume(&m(&format!(
            "{base}/kubernetes.io~empty-dir/cache"
        ))));
        assert!(!super::is_watched_volume(&m("/etc/hosts")));
    }

    #[test]
    fn decodes_the_pods_configuration_as_the_cri_encodes_it() {
        use k8s_cri::v1 as cri;
        use prost::Message;
        let cfg = cri::PodSandboxConfig {
            metadata: Some(cri::PodSandboxMetadata {
                name: "web".into(),
                ..Default::default()
            }),
            hostname: "web-0".into(),
            annotations: [("io.katacontainers.config.hypervisor.default_vcpus", "2")]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            linux: Some(cri::LinuxPodSandboxConfig {
                cgroup_parent: "/kubepods/burstable/pod1".into(),
                sysctls: [
                    ("kernel.shm_rmid_forced", "1"),
                    ("net.ipv4.ip_forward", "0"),
                ]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
                security_context: Some(cri::LinuxSandboxSecurityContext {
                    privileged: true,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let got = PodConfig::decode(&cfg.encode_to_vec()).expect("decodes");
        assert_eq!(got.hostname, "web-0");
        assert_eq!(
            got.annotations
                .get("io.katacontainers.config.hypervisor.default_vcpus")
                .map(String::as_str),
            Some("2")
        );
        assert_eq!(got.cgroup_parent, "/kubepods/burstable/pod1");
        assert_eq!(got.cgroups_path("p1"), "/kubepods/burstable/pod1/p1");
        assert_eq!(
            got.sysctls.into_iter().collect::<Vec<_>>(),
            vec![
                ("kernel.shm_rmid_forced".to_string(), "1".to_string()),
                ("net.ipv4.ip_forward".to_string(), "0".to_string())
            ]
        );
        assert_eq!(PodConfig::decode(&[0xff]), None, "not a message");
    }

    use super::*;
    use oci_spec::runtime::{LinuxBuilder, LinuxNamespaceBuilder, MountBuilder, SpecBuilder};
    use std::path::PathBuf;

    fn ann(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn roles() {
        assert_eq!(role(&ann(&[])).ok(), Some(Role::Sandbox));
        assert_eq!(
            role(&ann(&[(CRI_CONTAINER_TYPE, "sandbox")])).ok(),
            Some(Role::Sandbox)
        );
        assert_eq!(
            role(&ann(&[
                (CRI_CONTAINER_TYPE, "container"),
                (CRI_SANDBOX_ID, "p1")
            ]))
            .ok(),
            Some(Role::Container {
                sandbox_id: "p1".into()
            })
        );
        assert_eq!(
            role(&ann(&[
                (KATA_CONTAINER_TYPE, "pod_container"),
                (CRIO_SANDBOX_ID, "p2")
            ]))
            .ok(),
            Some(Role::Container {
                sandbox_id: "p2".into()
            })
        );
        let e = role(&ann(&[(CRI_CONTAINER_TYPE, "container")])).expect_err("no sandbox id");
        assert!(e.to_string().contains(CRI_SANDBOX_ID), "{e}");
    }

    fn ns(t: LinuxNamespaceType, path: Option<&str>) -> oci_spec::runtime::LinuxNamespace {
        let mut b = LinuxNamespaceBuilder::default().typ(t);
        if let Some(p) = path {
            b = b.path(p);
        }
        b.build().expect("namespace")
    }

    #[test]
    fn namespaces_for_the_guest() {
        let linux = LinuxBuilder::default()
            .namespaces(vec![
                ns(LinuxNamespaceType::Network, Some("/var/run/netns/cni-1")),
                ns(LinuxNamespaceType::Ipc, Some("/proc/999/ns/ipc")),
                ns(LinuxNamespaceType::Uts, Some("/proc/999/ns/uts")),
                ns(LinuxNamespaceType::Pid, None),
                ns(LinuxNamespaceType::Mount, None),
            ])
            .build()
            .expect("linux");
        let mut spec = SpecBuilder::default().linux(linux).build().expect("spec");
        let mut alone = spec.clone();
        let mut holder = spec.clone();
        guest_namespaces(&mut spec, PodNamespaces::PauseContainer(42));
        let got: Vec<_> = spec
            .linux()
            .as_ref()
            .and_then(|l| l.namespaces().clone())
            .unwrap_or_default()
            .into_iter()
            .map(|n| (n.typ(), n.path().clone()))
            .collect();
        assert_eq!(
            got,
            vec![
                (LinuxNamespaceType::Ipc, Some("/proc/42/ns/ipc".into())),
                (LinuxNamespaceType::Uts, Some("/proc/42/ns/uts".into())),
                (LinuxNamespaceType::Pid, None),
                (LinuxNamespaceType::Mount, None),
            ]
        );
        guest_namespaces(&mut holder, PodNamespaces::Holder);
        let paths: Vec<_> = holder
            .linux()
            .as_ref()
            .and_then(|l| l.namespaces().clone())
            .unwrap_or_default()
            .into_iter()
            .filter_map(|n| n.path().clone())
            .collect();
        assert_eq!(
            paths,
            vec![
                PathBuf::from("/run/kata-containers/sandbox/ns/ipc"),
                PathBuf::from("/run/kata-containers/sandbox/ns/uts"),
            ]
        );
        guest_namespaces(&mut alone, PodNamespaces::None);
        let paths: Vec<_> = alone
            .linux()
            .as_ref()
            .and_then(|l| l.namespaces().clone())
            .unwrap_or_default()
            .into_iter()
            .filter_map(|n| n.path().clone())
            .collect();
        assert!(paths.is_empty(), "{paths:?}");
    }

    #[test]
    fn empty_dirs() {
        let m = |src: &str| {
            MountBuilder::default()
                .destination("/cache")
                .source(src)
                .build()
                .expect("mount")
        };
        assert_eq!(
            empty_dir_name(&m(
                "/var/lib/kubelet/pods/u1/volumes/kubernetes.io~empty-dir/cache"
            )),
            Some("cache".into())
        );
        assert_eq!(
            empty_dir_name(&m(
                "/var/lib/kubelet/pods/u1/volumes/kubernetes.io~configmap/x"
            )),
            None
        );
        assert_eq!(
            empty_dir_name(&m("/x/kubernetes.io~empty-dir/../etc")),
            None
        );
        assert_eq!(empty_dir_name(&m("/x/kubernetes.io~empty-dir/")), None);
    }

    #[test]
    fn who_configures_the_network_namespace_through_the_pid() {
        let plain = Spec::default();
        assert!(configures_netns_by_pid(DOCKER_NAMESPACE, &plain));
        assert!(!configures_netns_by_pid("default", &plain));
        assert!(!configures_netns_by_pid("k8s.io", &plain));
        let hook = oci_spec::runtime::HookBuilder::default()
            .path("/usr/local/bin/nerdctl")
            .build()
            .expect("hook");
        let mut hooked = Spec::default();
        hooked.set_hooks(Some(
            oci_spec::runtime::HooksBuilder::default()
                .create_runtime(vec![hook])
                .build()
                .expect("hooks"),
        ));
        assert!(configures_netns_by_pid("default", &hooked));
        let mut empty = Spec::default();
        empty.set_hooks(Some(oci_spec::runtime::Hooks::default()));
        assert!(!configures_netns_by_pid("default", &empty));
    }
}
