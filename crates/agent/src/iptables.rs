//! The guest's packet filter (Kata's GetIPTables / SetIPTables): `ip(6)tables-save` and
//! `ip(6)tables-restore --wait 5` from the guest image (xtables-legacy-multi and its libraries,
//! copied by `kata-guest-image --iptables`), run on the guest's network namespace, which is the
//! pod's.

use std::path::Path;
use std::time::Duration;

use crate::error::{invalid, GuestError};
use crate::reaper::Reaper;
use crate::tools::run;

/// Where the guest image puts the tools.
pub const SBIN: &str = "/sbin";

fn tool(v6: bool, what: &str) -> Result<std::path::PathBuf, GuestError> {
    let name = if v6 { "ip6tables" } else { "iptables" };
    let p = Path::new(SBIN).join(format!("{name}{what}"));
    if !p.exists() {
        return Err(invalid(format!(
            "{} is not in the guest image (build it with kata-guest-image --iptables)",
            p.display()
        )));
    }
    Ok(p)
}

/// `ip(6)tables-save`.
pub fn save(reaper: &Reaper, v6: bool) -> Result<Vec<u8>, GuestError> {
    let o = run(
        Some(reaper),
        &tool(v6, "-save")?,
        &[],
        &[],
        Duration::from_secs(10),
    )?;
    if o.status != 0 {
        return Err(invalid(format!(
            "{}-save failed: {}",
            if v6 { "ip6tables" } else { "iptables" },
            String::from_utf8_lossy(&o.stderr).trim()
        )));
    }
    Ok(o.stdout)
}

/// `ip(6)tables-restore --wait 5` of `rules`; on a bad file the restore's error, rules unchanged
/// (restore commits a table only when all of it parsed).
pub fn restore(reaper: &Reaper, v6: bool, rules: &[u8]) -> Result<Vec<u8>, GuestError> {
    let o = run(
        Some(reaper),
        &tool(v6, "-restore")?,
        &["--wait", "5"],
        rules,
        Duration::from_secs(10),
    )?;
    if o.status != 0 {
        return Err(invalid(format!(
            "{}-restore refused the rules: {}",
            if v6 { "ip6tables" } else { "iptables" },
            String::from_utf8_lossy(&o.stderr).trim()
        )));
    }
    Ok(o.stdout)
}
