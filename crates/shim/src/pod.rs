//! Pod semantics: which sandbox a container belongs to (from the annotations container managers
//! set), and the rewriting of a pod container's spec for the guest.
//!
//! containerd's CRI plugin starts a shim for the pod's sandbox (pause) container; the shim boots
//! the VM. For every application container of the pod it calls `start` again: that call finds the
//! running sandbox shim and returns its address, so one VM and one shim serve the whole pod.

use std::collections::HashMap;

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
pub fn role(annotations: &HashMap<String, String>) -> Result<Role, String> {
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
            format!("a pod container needs its sandbox id in the {CRI_SANDBOX_ID} (or {CRIO_SANDBOX_ID}) annotation")
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
pub fn role_of_bundle(bundle: &std::path::Path) -> Result<Role, String> {
    let path = bundle.join("config.json");
    let text =
        std::fs::read_to_string(&path).map_err(|e| format!("read {}: {e}", path.display()))?;
    #[derive(serde::Deserialize)]
    struct Partial {
        #[serde(default)]
        annotations: HashMap<String, String>,
    }
    let p: Partial =
        serde_json::from_str(&text).map_err(|e| format!("parse {}: {e}", path.display()))?;
    role(&p.annotations)
}

/// Rewrites namespaces for the guest: the network namespace is the VM's own (it holds the pod's
/// interfaces), and a namespace given by a host path (the sandbox container's, in a pod) becomes
/// the same namespace of the sandbox container's init process in the guest (`sandbox_pid`).
/// Without a sandbox pid such a namespace is created new.
pub fn guest_namespaces(spec: &mut Spec, sandbox_pid: Option<u32>) {
    let Some(linux) = spec.linux_mut() else {
        return;
    };
    let Some(list) = linux.namespaces().clone() else {
        return;
    };
    let mut out = Vec::with_capacity(list.len());
    for mut ns in list {
        // The namespaces a pod shares with its sandbox container.
        let shared = match ns.typ() {
            LinuxNamespaceType::Network | LinuxNamespaceType::User => continue,
            LinuxNamespaceType::Ipc => Some("ipc"),
            LinuxNamespaceType::Uts => Some("uts"),
            LinuxNamespaceType::Pid => Some("pid"),
            _ => None,
        };
        let path = match (ns.path(), shared, sandbox_pid) {
            (Some(_), Some(name), Some(pid)) => Some(format!("/proc/{pid}/ns/{name}").into()),
            _ => None,
        };
        ns.set_path(path);
        out.push(ns);
    }
    linux.set_namespaces(Some(out));
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

#[cfg(test)]
mod tests {
    use super::*;
    use oci_spec::runtime::{LinuxBuilder, LinuxNamespaceBuilder, MountBuilder, SpecBuilder};

    fn ann(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn roles() {
        assert_eq!(role(&ann(&[])), Ok(Role::Sandbox));
        assert_eq!(
            role(&ann(&[(CRI_CONTAINER_TYPE, "sandbox")])),
            Ok(Role::Sandbox)
        );
        assert_eq!(
            role(&ann(&[
                (CRI_CONTAINER_TYPE, "container"),
                (CRI_SANDBOX_ID, "p1")
            ])),
            Ok(Role::Container {
                sandbox_id: "p1".into()
            })
        );
        assert_eq!(
            role(&ann(&[
                (KATA_CONTAINER_TYPE, "pod_container"),
                (CRIO_SANDBOX_ID, "p2")
            ])),
            Ok(Role::Container {
                sandbox_id: "p2".into()
            })
        );
        let e = role(&ann(&[(CRI_CONTAINER_TYPE, "container")])).expect_err("no sandbox id");
        assert!(e.contains(CRI_SANDBOX_ID), "{e}");
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
        guest_namespaces(&mut spec, Some(42));
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
        guest_namespaces(&mut alone, None);
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
