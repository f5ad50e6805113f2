//! `modules.dep` and dependency closures.

use std::collections::{BTreeMap, BTreeSet};

use crate::BuildError;

/// Module path (relative to `/lib/modules/<release>`) → its direct dependencies' paths.
pub type Deps = BTreeMap<String, Vec<String>>;

/// Parses `modules.dep`.
pub fn parse_modules_dep(text: &str) -> Deps {
    let mut deps = Deps::new();
    for line in text.lines() {
        let Some((module, rest)) = line.split_once(':') else {
            continue;
        };
        deps.insert(
            module.trim().to_string(),
            rest.split_whitespace().map(str::to_string).collect(),
        );
    }
    deps
}

/// Module name of a path (`kernel/fs/9p/9p.ko` → `9p`), with `-` folded to `_`.
pub fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split(".ko").next().unwrap_or(file);
    stem.replace('-', "_")
}

/// The modules named in `wanted` and everything they depend on, dependencies first.
pub fn closure(deps: &Deps, wanted: &[String]) -> Result<Vec<String>, BuildError> {
    let by_name: BTreeMap<String, &String> = deps.keys().map(|p| (module_name(p), p)).collect();
    let mut order = Vec::new();
    let mut seen = BTreeSet::new();
    fn visit(path: &str, deps: &Deps, seen: &mut BTreeSet<String>, order: &mut Vec<String>) {
        if !seen.insert(path.to_string()) {
            return;
        }
        // modules.dep lists the deepest dependencies last: load them first.
        for d in deps.get(path).into_iter().flatten().rev() {
            visit(d, deps, seen, order);
        }
        order.push(path.to_string());
    }
    for name in wanted {
        let path = by_name
            .get(&name.replace('-', "_"))
            .ok_or_else(|| BuildError::UnknownModule(name.clone()))?;
        visit(path, deps, &mut seen, &mut order);
    }
    Ok(order)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEP: &str = "kernel/fs/9p/9p.ko: kernel/net/9p/9pnet.ko kernel/fs/fscache/fscache.ko kernel/fs/netfs/netfs.ko\n\
kernel/net/9p/9pnet.ko:\nkernel/fs/fscache/fscache.ko: kernel/fs/netfs/netfs.ko\nkernel/fs/netfs/netfs.ko:\n\
kernel/net/9p/9pnet_virtio.ko: kernel/net/9p/9pnet.ko kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko\n\
kernel/drivers/virtio/virtio_ring.ko:\nkernel/drivers/virtio/virtio.ko:\n";

    #[test]
    fn closure_loads_dependencies_first_once() {
        let deps = parse_modules_dep(DEP);
        let order = closure(&deps, &["9p".into(), "9pnet_virtio".into()]).expect("closure");
        let pos = |m: &str| {
            order
                .iter()
                .position(|p| p.ends_with(m))
                .unwrap_or(usize::MAX)
        };
        assert!(pos("netfs.ko") < pos("fscache.ko") && pos("fscache.ko") < pos("/9p.ko"));
        assert!(pos("9pnet.ko") < pos("/9p.ko") && pos("virtio.ko") < pos("9pnet_virtio.ko"));
        assert_eq!(order.len(), 7, "each module once: {order:?}");
        assert!(matches!(
            closure(&deps, &["nope".into()]),
            Err(BuildError::UnknownModule(_))
        ));
        assert_eq!(
            module_name("kernel/net/vmw_vsock/vmw_vsock_virtio_transport.ko"),
            "vmw_vsock_virtio_transport"
        );
    }
}
