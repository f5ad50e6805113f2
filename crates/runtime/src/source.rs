//! Where a sandbox's VM comes from, behind one interface (as Kata's factory has `GetBaseVM`
//! with its direct, template and cache implementations): the VMCache server's booted VMs, a
//! clone of the VM template, or a cold boot, tried in that order ([`chain`]). A source that
//! cannot serve a sandbox passes it on with the reason; one that tried and broke is
//! invalidated (a failed clone makes the next sandbox rebuild the template) and passes it on;
//! only the last source, the cold boot, fails the sandbox. The sources themselves are in
//! [`crate::sandbox`]; this module is the order and the contract, tested without a VM.

use async_trait::async_trait;
use kata_config::Config;

use crate::error::SandboxError;

/// Which source served a sandbox's VM.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SourceKind {
    /// Booted for this sandbox.
    #[default]
    Cold,
    /// Cloned from the VM template (`[factory] enable_template`).
    Template,
    /// Taken over from the VMCache server (`[factory] vm_cache_number`).
    Cache,
}

impl SourceKind {
    /// Name in logs and metrics: `cold`, `template`, `cache`.
    pub fn name(self) -> &'static str {
        match self {
            SourceKind::Cold => "cold",
            SourceKind::Template => "template",
            SourceKind::Cache => "cache",
        }
    }
}

/// The sources a sandbox with `config` tries, in order: the VMCache when
/// `[factory] vm_cache_number` > 0, the VM template when `[factory] enable_template`, then
/// the cold boot.
pub fn chain(config: &Config) -> Vec<SourceKind> {
    let mut kinds = Vec::new();
    if config.factory.vm_cache_number > 0 {
        kinds.push(SourceKind::Cache);
    }
    if config.factory.enable_template {
        kinds.push(SourceKind::Template);
    }
    kinds.push(SourceKind::Cold);
    kinds
}

/// What a source did with a sandbox.
#[derive(Debug)]
pub(crate) enum Provision {
    /// Its VM is the sandbox's now (the source put it where the boot `B` keeps it).
    Served,
    /// It cannot serve this sandbox, for this reason; nothing of it is left.
    Passed(String),
    /// It tried and failed, for this reason; nothing of the attempt is left, and the source is
    /// invalidated before the next one is tried.
    Broke(String),
}

/// A source of VMs for the boot `B` (the sandbox being booted: what the source needs to
/// know, and where it puts the VM it serves).
#[async_trait]
pub(crate) trait VmSource<B: Send>: Send + Sync {
    /// Which source this is.
    fn kind(&self) -> SourceKind;
    /// Serves the boot `boot`, passes it on, or breaks. An error fails the sandbox (only the
    /// cold boot, the last resort, returns one).
    async fn provide(&self, boot: &mut B) -> Result<Provision, SandboxError>;
    /// Forgets what made the last attempt break (the template is rebuilt on next use).
    async fn invalidate(&self) {}
}

/// Tries `sources` in order until one serves `boot`; returns which one did.
pub(crate) async fn first_served<B: Send>(
    sources: &[&dyn VmSource<B>],
    boot: &mut B,
) -> Result<SourceKind, SandboxError> {
    let mut reasons = Vec::new();
    for (i, source) in sources.iter().enumerate() {
        let next = match sources.get(i + 1).map(|s| s.kind()) {
            Some(SourceKind::Cold) => "booting cold",
            Some(SourceKind::Template) => "trying the VM template",
            Some(SourceKind::Cache) => "trying the VMCache",
            None => "no source left",
        };
        match source.provide(boot).await? {
            Provision::Served => return Ok(source.kind()),
            Provision::Passed(reason) => {
                tracing::info!(source = source.kind().name(), "{reason}; {next}");
                reasons.push(format!("{}: {reason}", source.kind().name()));
            }
            Provision::Broke(reason) => {
                tracing::warn!(source = source.kind().name(), "{reason}; {next}");
                source.invalidate().await;
                reasons.push(format!("{}: {reason}", source.kind().name()));
            }
        }
    }
    Err(SandboxError::Unsupported(format!(
        "no VM source served the sandbox ({})",
        reasons.join("; ")
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// What the fake boot saw: the sources asked, in order, and who served.
    #[derive(Default)]
    struct Boot {
        asked: Vec<SourceKind>,
        vm: Option<SourceKind>,
    }

    enum Does {
        Serve,
        Pass,
        Break,
        Fail,
    }

    struct Fake {
        kind: SourceKind,
        does: Does,
        invalidated: AtomicU32,
    }

    fn fake(kind: SourceKind, does: Does) -> Fake {
        Fake {
            kind,
            does,
            invalidated: AtomicU32::new(0),
        }
    }

    #[async_trait]
    impl VmSource<Boot> for Fake {
        fn kind(&self) -> SourceKind {
            self.kind
        }
        async fn provide(&self, boot: &mut Boot) -> Result<Provision, SandboxError> {
            boot.asked.push(self.kind);
            match self.does {
                Does::Serve => {
                    boot.vm = Some(self.kind);
                    Ok(Provision::Served)
                }
                Does::Pass => Ok(Provision::Passed(format!("{} is empty", self.kind.name()))),
                Does::Break => Ok(Provision::Broke(format!("{} broke", self.kind.name()))),
                Does::Fail => Err(SandboxError::Invalid("QEMU did not start".into())),
            }
        }
        async fn invalidate(&self) {
            self.invalidated.fetch_add(1, Ordering::SeqCst);
        }
    }

    async fn run(sources: &[&Fake]) -> (Result<SourceKind, SandboxError>, Boot) {
        let dyns: Vec<&dyn VmSource<Boot>> = sources.iter().map(|s| *s as _).collect();
        let mut boot = Boot::default();
        let r = first_served(&dyns, &mut boot).await;
        (r, boot)
    }

    #[tokio::test]
    async fn the_cache_serves_first_and_the_others_are_not_asked() {
        let (c, t, d) = (
            fake(SourceKind::Cache, Does::Serve),
            fake(SourceKind::Template, Does::Serve),
            fake(SourceKind::Cold, Does::Serve),
        );
        let (r, boot) = run(&[&c, &t, &d]).await;
        assert_eq!(r.ok(), Some(SourceKind::Cache));
        assert_eq!(boot.asked, vec![SourceKind::Cache]);
        assert_eq!(boot.vm, Some(SourceKind::Cache));
    }

    #[tokio::test]
    async fn an_empty_cache_passes_to_the_template() {
        let (c, t, d) = (
            fake(SourceKind::Cache, Does::Pass),
            fake(SourceKind::Template, Does::Serve),
            fake(SourceKind::Cold, Does::Serve),
        );
        let (r, boot) = run(&[&c, &t, &d]).await;
        assert_eq!(r.ok(), Some(SourceKind::Template));
        assert_eq!(boot.asked, vec![SourceKind::Cache, SourceKind::Template]);
        assert_eq!(c.invalidated.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn a_failed_clone_invalidates_its_template_and_the_sandbox_boots_cold() {
        let (c, t, d) = (
            fake(SourceKind::Cache, Does::Pass),
            fake(SourceKind::Template, Does::Break),
            fake(SourceKind::Cold, Does::Serve),
        );
        let (r, boot) = run(&[&c, &t, &d]).await;
        assert_eq!(r.ok(), Some(SourceKind::Cold));
        assert_eq!(
            boot.asked,
            vec![SourceKind::Cache, SourceKind::Template, SourceKind::Cold]
        );
        assert_eq!(t.invalidated.load(Ordering::SeqCst), 1);
        assert_eq!(c.invalidated.load(Ordering::SeqCst), 0);
        assert_eq!(boot.vm, Some(SourceKind::Cold));
    }

    #[tokio::test]
    async fn a_failed_cold_boot_fails_the_sandbox() {
        let (t, d) = (
            fake(SourceKind::Template, Does::Pass),
            fake(SourceKind::Cold, Does::Fail),
        );
        let (r, boot) = run(&[&t, &d]).await;
        let e = r.expect_err("the cold boot failed");
        assert!(e.to_string().contains("QEMU did not start"), "{e}");
        assert_eq!(boot.vm, None);
    }

    #[tokio::test]
    async fn when_every_source_passes_the_error_gives_each_reason() {
        let (c, d) = (
            fake(SourceKind::Cache, Does::Pass),
            fake(SourceKind::Cold, Does::Break),
        );
        let (r, _) = run(&[&c, &d]).await;
        let e = r.expect_err("nothing served").to_string();
        assert!(
            e.contains("cache: cache is empty") && e.contains("cold: cold broke"),
            "{e}"
        );
        assert_eq!(d.invalidated.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn the_chain_follows_the_factory_settings() {
        let mut config =
            kata_config::load::load_str(std::path::Path::new("test.toml"), "[hypervisor.qemu]\n")
                .expect("a minimal configuration loads");
        assert_eq!(chain(&config), vec![SourceKind::Cold]);
        config.factory.enable_template = true;
        assert_eq!(chain(&config), vec![SourceKind::Template, SourceKind::Cold]);
        config.factory.vm_cache_number = 2;
        assert_eq!(
            chain(&config),
            vec![SourceKind::Cache, SourceKind::Template, SourceKind::Cold]
        );
        config.factory.enable_template = false;
        assert_eq!(chain(&config), vec![SourceKind::Cache, SourceKind::Cold]);
    }
}
