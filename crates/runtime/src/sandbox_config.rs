//! The configuration a new sandbox runs with, whoever asks for it (a task's Create, containerd's
//! CreateSandbox, the CLI): the file chosen as Kata chooses it (the runtime option's
//! `ConfigPath`, the `io.katacontainers.config_path` annotation, `KATA_CONF_FILE`, the standard
//! places), the pod's annotations applied (or refused), validated against this host; and, with
//! VM templating, the configuration the template is made from (the files alone, so that one
//! template serves every pod that does not override them).

use std::collections::BTreeMap;
use std::path::PathBuf;

use kata_config::load::{FoundBy, SearchInputs};
use kata_config::{Config, ConfigError, HostLimits};

/// A new sandbox's configuration.
#[derive(Debug, Clone)]
pub struct SandboxConfig {
    /// What the sandbox runs with (files and annotations).
    pub config: Config,
    /// With `[factory] enable_template`: the files alone, which the VM template is made from.
    pub template: Option<Config>,
}

impl SandboxConfig {
    /// Loads the configuration for a sandbox: `explicit` is the runtime option's `ConfigPath`,
    /// `annotations` the pod's. Keys set in the files that the runtime does not act on are
    /// logged (said, never dropped silently).
    pub fn load(
        explicit: Option<PathBuf>,
        annotations: BTreeMap<String, String>,
    ) -> Result<SandboxConfig, ConfigError> {
        let files = SearchInputs::standard().with_explicit(explicit, FoundBy::RuntimeOption);
        let host = HostLimits::current();
        let config = tracing::info_span!("config_load")
            .in_scope(|| {
                kata_config::load::load_effective(
                    &files.clone().with_annotations(annotations),
                    &host,
                )
            })?
            .0;
        for u in &config.unsupported {
            tracing::warn!(
                section = %u.section,
                key = %u.key,
                "configuration key set but not supported by this runtime: it has no effect"
            );
        }
        let template = if config.factory.enable_template {
            kata_config::load::load_effective(&files, &host)
                .ok()
                .map(|c| c.0)
        } else {
            None
        };
        Ok(SandboxConfig { config, template })
    }

    /// With `[runtime] static_sandbox_resource_mgmt`: the VM is booted with the first
    /// container's demand on top of its default size (capped at the maximum), as Kata does,
    /// since nothing is hot-plugged later. Otherwise unchanged.
    pub fn sized_for(mut self, demand: crate::sandbox::Demand) -> SandboxConfig {
        if self.config.runtime.static_resources() {
            let h = &mut self.config.hypervisor;
            h.default_memory = h
                .default_memory
                .saturating_add(demand.memory_mib)
                .min(h.default_maxmemory);
            h.default_vcpus = h
                .default_vcpus
                .saturating_add(demand.vcpus)
                .min(h.default_maxvcpus);
        }
        self
    }
}
