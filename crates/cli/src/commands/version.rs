//! `kata-runtime version` (and `--version`): the runtime's version, the commit it was built
//! from and the OCI runtime specification it implements, in Kata's format.

/// The version text, as Kata 3.0 prints it.
pub fn text() -> String {
    let commit = if crate::COMMIT.is_empty() {
        "unknown"
    } else {
        crate::COMMIT
    };
    let oci = oci_spec::runtime::Spec::default().version().clone();
    format!(
        "kata-runtime  : {}\n   commit   : {commit}\n   OCI specs: {oci}\n",
        crate::VERSION
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn three_lines_in_katas_format() {
        let t = super::text();
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3, "{t}");
        assert_eq!(lines[0], format!("kata-runtime  : {}", crate::VERSION));
        assert!(lines[1].starts_with("   commit   : "), "{t}");
        assert!(lines[2].starts_with("   OCI specs: 1."), "{t}");
    }
}
