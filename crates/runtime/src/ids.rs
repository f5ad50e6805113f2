//! Identifiers that become host paths (sandbox, container and exec ids) are checked before any
//! path is built from them, with runc's rule: letters, digits, `_`, `+`, `-` and `.`, not `.`
//! or `..`, at most [`MAX_LEN`] bytes. An id such as `../../etc` never reaches `join`,
//! `create_dir_all` or `remove_dir_all`.

/// Longest id accepted (containerd's own limit is 76; CRI ids are 64).
pub const MAX_LEN: usize = 128;

/// Whether `id` is a valid identifier.
pub fn is_valid(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_LEN
        && id != "."
        && id != ".."
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'+' | b'-' | b'.'))
}

/// Checks `id`, naming what it identifies (`sandbox`, `container`, `exec`) in the error.
pub fn check(kind: &'static str, id: &str) -> Result<(), crate::SandboxError> {
    if is_valid(id) {
        Ok(())
    } else {
        Err(crate::SandboxError::InvalidId {
            kind,
            id: id.chars().take(160).collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_that_could_escape_a_directory_are_refused() {
        for bad in [
            "",
            ".",
            "..",
            "../x",
            "a/b",
            "/abs",
            "a b",
            "a\0b",
            "a\nb",
            "é",
            &"x".repeat(MAX_LEN + 1),
        ] {
            assert!(!is_valid(bad), "{bad:?}");
        }
        for good in [
            "a",
            "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            "my-pod_1.2+x",
            "..a",
            &"x".repeat(MAX_LEN),
        ] {
            assert!(is_valid(good), "{good:?}");
        }
        let e = check("container", "../etc").expect_err("refused");
        assert!(e.to_string().contains("container id \"../etc\""), "{e}");
    }

    proptest::proptest! {
        #[test]
        fn a_valid_id_is_one_path_component(id in "\\\\PC{0,40}") {
            if is_valid(&id) {
                let p = std::path::Path::new("/base").join(&id);
                proptest::prop_assert_eq!(p.parent(), Some(std::path::Path::new("/base")));
                proptest::prop_assert!(!p.components().any(|c| matches!(c, std::path::Component::ParentDir)));
            }
        }
    }
}
