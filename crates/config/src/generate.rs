//! Generated artefacts: the shipped `configuration-*.toml` files and `docs/configuration.md`.
//! Tests compare the committed files with these functions' output (`make generate` rewrites
//! them), so the schema stays the one source of truth.

use std::fmt::Write as _;

use serde::Serialize;

use crate::annotations::{AGENT_PREFIX, HYPERVISOR_PREFIX, RUNTIME_PREFIX};
use crate::hypervisor::BlockDeviceDriver;
use crate::schema::to_table;
use crate::schema::{Applies, Dynamic, KeySpec, Support};
use crate::{
    AgentConfig, FactoryConfig, HypervisorConfig, HypervisorKind, ImageConfig, RuntimeConfig,
};

/// `seccompsandbox` in the shipped configuration-qemu.toml.
pub const QEMU_SECCOMP_SANDBOX: &str =
    "on,obsolete=deny,spawn=deny,resourcecontrol=deny,elevateprivileges=deny";

/// Hypervisors for which a configuration file is shipped.
pub const SHIPPED: [HypervisorKind; 4] = [
    HypervisorKind::Qemu,
    HypervisorKind::Clh,
    HypervisorKind::Firecracker,
    HypervisorKind::Dragonball,
];

/// Directory of guest assets in the installed tree.
pub const ASSETS_DIR: &str = "/opt/kata/share/kata-containers";

/// The values a shipped file carries for `kind`.
pub fn profile(
    kind: HypervisorKind,
) -> (
    HypervisorConfig,
    AgentConfig,
    RuntimeConfig,
    FactoryConfig,
    ImageConfig,
) {
    let mut h = HypervisorConfig {
        path: kind.default_path().to_string(),
        ..HypervisorConfig::default()
    };
    if !h.path.is_empty() {
        h.valid_hypervisor_paths = vec![h.path.clone()];
    }
    // The rootfs image, as Kata ships: the guest runs from the host's page cache (NVDIMM, DAX)
    // instead of a copy in its own RAM. docs/architecture.md has the figures.
    h.image = format!("{ASSETS_DIR}/kata-containers.img");
    h.enable_annotations = vec!["enable_iommu".to_string()];
    h.valid_kernel_paths = vec![format!("{ASSETS_DIR}/*")];
    h.valid_initrd_paths = vec![format!("{ASSETS_DIR}/*")];
    h.valid_image_paths = vec![format!("{ASSETS_DIR}/*")];
    h.valid_virtio_fs_daemon_paths = vec![h.virtio_fs_daemon.clone()];
    h.valid_file_mem_backends = vec![String::new()];
    let mut runtime = RuntimeConfig {
        // The container's seccomp profile is applied in the guest (Kata ships true: not applied).
        disable_guest_seccomp: false,
        ..RuntimeConfig::default()
    };
    match kind {
        HypervisorKind::Qemu => {
            // QEMU's own seccomp filter, on in the shipped file (Kata leaves it commented out):
            // no obsolete system calls, no fork/exec, no scheduler or privilege changes.
            h.seccompsandbox = QEMU_SECCOMP_SANDBOX.to_string();
        }
        HypervisorKind::Acrn => {}
        HypervisorKind::Clh | HypervisorKind::Dragonball => {
            h.block_device_driver = BlockDeviceDriver::VirtioBlk
        }
        HypervisorKind::Firecracker => {
            h.block_device_driver = BlockDeviceDriver::VirtioMmio;
            h.jailer_path = "/opt/kata/bin/jailer".to_string();
            h.valid_jailer_paths = vec![h.jailer_path.clone()];
            runtime.static_sandbox_resource_mgmt = true;
        }
    }
    (
        h,
        AgentConfig::default(),
        runtime,
        FactoryConfig::default(),
        ImageConfig::default(),
    )
}

/// File name of the shipped configuration of `kind`.
pub fn file_name(kind: HypervisorKind) -> String {
    format!("configuration-{}.toml", short_name(kind))
}

fn short_name(kind: HypervisorKind) -> &'static str {
    match kind {
        HypervisorKind::Firecracker => "fc",
        k => k.name(),
    }
}

/// The shipped configuration file of `kind`, every key with its comment.
pub fn shipped_toml(kind: HypervisorKind) -> String {
    let (h, agent, runtime, factory, image) = profile(kind);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# Kata Containers configuration for {} ({}).",
        kind.name(),
        file_name(kind)
    );
    out.push_str("#\n# Generated from the schema in crates/config by 'make generate'; edit the schema, not\n");
    out.push_str(
        "# this file. Every key is listed with its value; docs/configuration.md describes them.\n",
    );
    out.push_str(
        "# Values can be overridden by drop-in files in config.d/ beside this file, and some by\n",
    );
    out.push_str("# pod annotations (see enable_annotations).\n");
    if !kind.is_supported() {
        let _ = writeln!(out, "#\n# NOTE: this runtime cannot start {} VMs yet; this file loads so that `kata-runtime env`", kind.name());
        out.push_str(
            "# and `check` can describe it. Use configuration-qemu.toml to run containers.\n",
        );
    }
    section(
        &mut out,
        &format!("hypervisor.{}", kind.name()),
        HypervisorConfig::KEYS,
        &h,
        Some(kind),
    );
    section(&mut out, "factory", FactoryConfig::KEYS, &factory, None);
    section(&mut out, "agent.kata", AgentConfig::KEYS, &agent, None);
    section(&mut out, "runtime", RuntimeConfig::KEYS, &runtime, None);
    section(&mut out, "image", ImageConfig::KEYS, &image, None);
    out
}

fn section<T: Serialize>(
    out: &mut String,
    name: &str,
    keys: &[KeySpec],
    value: &T,
    kind: Option<HypervisorKind>,
) {
    let table = to_table(value).unwrap_or_default();
    let _ = writeln!(out, "\n[{name}]");
    for spec in keys {
        if kind.is_some_and(|k| !spec.applies_to(k)) {
            continue;
        }
        let Some(v) = table.get(spec.name) else {
            continue;
        };
        out.push('\n');
        for line in spec.doc.lines() {
            let _ = writeln!(
                out,
                "#{}{}",
                if line.starts_with(' ') || line.is_empty() {
                    ""
                } else {
                    " "
                },
                line.trim_end()
            );
        }
        if spec.support == Support::NotYet {
            out.push_str("# (Accepted for compatibility with Kata; not acted on yet.)\n");
        }
        match spec.dynamic {
            Dynamic::No => {}
            Dynamic::Yes => out.push_str("# Annotation: yes.\n"),
            Dynamic::Path(list) => {
                let _ = writeln!(out, "# Annotation: yes, when the value matches {list}.");
            }
        }
        let _ = writeln!(out, "{} = {}", spec.name, v);
    }
}

/// `docs/configuration.md`.
pub fn configuration_md() -> String {
    let mut out = String::new();
    out.push_str(DOC_INTRO);
    let (h, agent, runtime, factory, image) = profile(HypervisorKind::Qemu);
    doc_section(
        &mut out,
        "hypervisor.qemu",
        "[hypervisor.<name>]",
        HypervisorConfig::KEYS,
        &HypervisorConfig::default(),
        &h,
        Some(HYPERVISOR_PREFIX),
    );
    doc_section(
        &mut out,
        "factory",
        "[factory]",
        FactoryConfig::KEYS,
        &FactoryConfig::default(),
        &factory,
        None,
    );
    doc_section(
        &mut out,
        "agent.kata",
        "[agent.kata]",
        AgentConfig::KEYS,
        &AgentConfig::default(),
        &agent,
        Some(AGENT_PREFIX),
    );
    doc_section(
        &mut out,
        "runtime",
        "[runtime]",
        RuntimeConfig::KEYS,
        &RuntimeConfig::default(),
        &runtime,
        Some(RUNTIME_PREFIX),
    );
    doc_section(
        &mut out,
        "image",
        "[image]",
        ImageConfig::KEYS,
        &ImageConfig::default(),
        &image,
        None,
    );
    out
}

fn doc_section<T: Serialize>(
    out: &mut String,
    example_section: &str,
    title: &str,
    keys: &[KeySpec],
    default: &T,
    shipped: &T,
    prefix: Option<&str>,
) {
    let defaults = to_table(default).unwrap_or_default();
    let shipped = to_table(shipped).unwrap_or_default();
    let _ = writeln!(out, "\n## `{title}`\n");
    out.push_str("| Key | Default | Annotation | Hypervisors | Status |\n|---|---|---|---|---|\n");
    for spec in keys {
        let default = defaults
            .get(spec.name)
            .map(|v| v.to_string())
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "| [`{}`](#{}) | `{}` | {} | {} | {} |",
            spec.name,
            anchor(example_section, spec.name),
            default.replace('|', "\\|"),
            annotation_cell(spec, prefix),
            applies_cell(spec),
            if spec.support == Support::Yes {
                "supported"
            } else {
                "accepted, not acted on yet"
            },
        );
    }
    for spec in keys {
        let _ = writeln!(
            out,
            "\n<a id=\"{}\"></a>\n### `{}.{}`\n",
            anchor(example_section, spec.name),
            title.trim_matches(|c| c == '[' || c == ']'),
            spec.name
        );
        out.push_str(
            spec.doc
                .lines()
                .map(str::trim)
                .collect::<Vec<_>>()
                .join(" ")
                .as_str(),
        );
        out.push('\n');
        let value = shipped
            .get(spec.name)
            .or_else(|| defaults.get(spec.name))
            .map(|v| v.to_string())
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "\nExample:\n\n```toml\n[{example_section}]\n{} = {}\n```",
            spec.name, value
        );
        if let (Some(prefix), false) = (prefix, spec.dynamic == Dynamic::No) {
            let plain = match shipped.get(spec.name) {
                Some(toml::Value::String(s)) => s.clone(),
                Some(toml::Value::Array(a)) => a
                    .iter()
                    .filter_map(|v| v.as_str())
                    .collect::<Vec<_>>()
                    .join(";"),
                Some(v) => v.to_string(),
                None => String::new(),
            };
            let _ = writeln!(
                out,
                "\nAs a pod annotation:\n\n```yaml\n{prefix}{}: {:?}\n```",
                spec.name, plain
            );
        }
    }
}

fn anchor(section: &str, key: &str) -> String {
    format!("{}-{}", section.replace('.', "-"), key.replace('_', "-"))
}

fn annotation_cell(spec: &KeySpec, prefix: Option<&str>) -> String {
    match (spec.dynamic, prefix) {
        (Dynamic::No, _) | (_, None) => "no".to_string(),
        (Dynamic::Yes, Some(p)) if p == HYPERVISOR_PREFIX => {
            "yes, if in `enable_annotations`".to_string()
        }
        (Dynamic::Yes, Some(_)) => "yes".to_string(),
        (Dynamic::Path(list), _) => {
            format!("yes, if in `enable_annotations` and matching `{list}`")
        }
    }
}

fn applies_cell(spec: &KeySpec) -> String {
    match spec.applies {
        Applies::All => "all".to_string(),
        Applies::Only(list) => list.iter().map(|k| k.name()).collect::<Vec<_>>().join(", "),
    }
}

const DOC_INTRO: &str = r#"# Configuration reference

<!-- Generated from crates/config by 'make generate'; edit the schema, not this file. -->

The runtime reads one TOML file, Kata's format: a Kata 3.0 user's files load unchanged.

## Which file

The first of these that applies:

1. containerd's runtime option `ConfigPath` (`[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.kata.options]`);
2. the pod annotation `io.katacontainers.config_path`, only when containerd sets no `ConfigPath`, and only
   for a file inside `/etc/kata-containers`, `/opt/kata/share/defaults/kata-containers` or
   `/usr/share/defaults/kata-containers` (anything else is refused with an error);
3. the environment variable `KATA_CONF_FILE`;
4. `/etc/kata-containers/configuration.toml`;
5. `/opt/kata/share/defaults/kata-containers/configuration.toml` (a link to `configuration-qemu.toml`);
6. `/usr/share/defaults/kata-containers/configuration.toml`.

Files named `*.toml` in a `config.d/` directory beside the chosen file are merged over it in
lexical order (tables merge key by key; any other value replaces).

```shell
mkdir -p /opt/kata/share/defaults/kata-containers/config.d
printf '[hypervisor.qemu]\ndefault_memory = 1024\n' > /opt/kata/share/defaults/kata-containers/config.d/50-memory.toml
kata-runtime env | grep -A3 '\[Hypervisor\]'
```

The file must hold exactly one `[hypervisor.<name>]` section (`qemu`, `clh`, `firecracker`,
`dragonball` or `acrn`); that section chooses the hypervisor. Only QEMU can start VMs today: the
other files load, and `kata-runtime env` and `check` describe them.

An unknown key or section is an error that gives the file, the line and the closest known name.
A value of the wrong type or variant is an error that gives the file, the line and column, and
the key: ``configuration.toml:2:13: `shared_fs` in [hypervisor.qemu]: unknown variant `nfs`, expected one of ...``.
Keys listed as "accepted, not acted on yet" load, and `kata-runtime env` lists those that a file
sets to a non-default value under `[Runtime] UnsupportedKeys`.

## Priority

annotation > file > built-in default.

## Annotations

- `io.katacontainers.config.hypervisor.<key>`: keys whose Annotation column says yes, and only
  when the key fully matches one of the regular expressions of `enable_annotations` (Kata matched
  substrings; a whitelist should not). Path-valued keys must also match a glob(3) pattern of the
  named `valid_*` list; an empty list refuses every value. Kata's `default_max_vcpus` is accepted
  for `default_maxvcpus`.
- `io.katacontainers.config.runtime.<key>` and `io.katacontainers.config.agent.<key>`: keys whose
  Annotation column says yes; those that change the host or weaken a protection
  (`internetworking_model`, `disable_new_netns`, `sandbox_cgroup_only`, `vfio_mode`,
  `experimental`, `enable_pprof`, `disable_guest_seccomp`, the agent's `kernel_modules`) only
  when the key fully matches a regular expression of `[runtime].enable_annotations` (not a Kata
  key: Kata accepts them from any pod author; see [security.md](security.md)).
- `io.katacontainers.container.resource.swappiness` (0 to 100) and
  `io.katacontainers.container.resource.swap_in_bytes` (bytes).
- `io.katacontainers.pkg.oci.container_type` (`pod_sandbox` or `pod_container`) and
  `io.katacontainers.pkg.oci.bundle_path` (absolute path).

Values: booleans as Go parses them (`true`, `false`, `1`, `0`, `t`, `f`, ...), integers in
decimal, lists as a JSON array (`["-o", "xattr"]`) or `;`-separated (`e1000e EEE=1; i915`).

Every other annotation under `io.katacontainers.` is refused: the sandbox is not created and the
error names the annotation, its value, and the key that would allow it. Try one without creating
a pod:

```shell
kata-runtime env --annotation io.katacontainers.config.hypervisor.default_vcpus=2
```

## Validation

- exactly one of `image` and `initrd`;
- `1 <= default_vcpus <= default_maxvcpus` (at most 240); `default_maxvcpus = 0` means the host's
  CPU count and larger values are clamped to it (with a warning). `default_vcpus` above the
  host's CPU count is honoured with a warning (the vCPUs share the host's CPUs; Kata clamps or
  refuses it) and raises an implicit `default_maxvcpus` with it, so the guide's pod with
  `default_vcpus: "5"` gets 5 vCPUs on a 2-CPU node;
- `default_memory` of at least 128 MiB and at most the host's memory and `default_maxmemory`
  (`0` means the host's memory; larger values are clamped);
- `default_bridges` from 0 to 5; `msize_9p` from 4096 to 1048576; `memory_slots` at least 1
  unless `static_sandbox_resource_mgmt`;
- enumerations (`shared_fs`, `block_device_driver`, `block_device_aio`, `virtio_fs_cache`,
  `internetworking_model`, `vfio_mode`, `accelerator`) refuse other values;
- `enable_hugepages = true` turns `enable_mem_prealloc` on;
- VM templating (`enable_template`) and VMCache (`vm_cache_number > 0`) exclude each other;
  templating needs QEMU, an initrd and `shared_fs = "virtio-9p"`;
- `enable_annotations` entries must be valid regular expressions and `valid_*` entries valid
  glob(3) patterns.
"#;
