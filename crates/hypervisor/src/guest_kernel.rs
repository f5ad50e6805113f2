//! What a guest kernel file says about itself: its version banner, read from an ELF `vmlinux`
//! (the `Linux version ...` string in its read-only data) or from a bzImage's setup header
//! (the `kernel_version` pointer), without booting it.

use std::path::Path;

/// The setup header's magic (`HdrS`) and where it and the version pointer sit in a bzImage.
const HDRS_OFFSET: usize = 0x202;
const VERSION_PTR_OFFSET: usize = 0x20e;

/// The kernel's version banner, e.g. `6.1.176-kata-rs (kata@kata-rs) (gcc ...) #1 SMP ...`;
/// `None` when the file cannot be read or carries no banner.
pub fn version_banner(path: &Path) -> Option<String> {
    let bytes = std::fs::read(path).ok()?;
    banner_of(&bytes)
}

/// The release alone (the banner's first word), as `uname -r` shows it in the guest.
pub fn release(path: &Path) -> Option<String> {
    version_banner(path).and_then(|b| b.split_whitespace().next().map(str::to_string))
}

/// [`version_banner`] on bytes.
pub fn banner_of(bytes: &[u8]) -> Option<String> {
    if bytes.starts_with(b"\x7fELF") {
        let needle = b"Linux version ";
        let at = bytes.windows(needle.len()).position(|w| w == needle)?;
        return c_string(&bytes[at + needle.len()..]);
    }
    if bytes.get(HDRS_OFFSET..HDRS_OFFSET + 4) == Some(b"HdrS") {
        let ptr = bytes.get(VERSION_PTR_OFFSET..VERSION_PTR_OFFSET + 2)?;
        let at = u16::from_le_bytes([ptr[0], ptr[1]]) as usize + 0x200;
        return c_string(bytes.get(at..)?);
    }
    None
}

fn c_string(bytes: &[u8]) -> Option<String> {
    let end = bytes
        .iter()
        .position(|&b| b == 0 || b == b'\n')
        .unwrap_or(bytes.len())
        .min(512);
    let s = String::from_utf8_lossy(&bytes[..end]).trim().to_string();
    (!s.is_empty()).then_some(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_banner_of_an_elf_kernel() {
        let mut b = b"\x7fELF\x02\x01\x01".to_vec();
        b.extend_from_slice(&[0u8; 64]);
        b.extend_from_slice(b"Linux version 6.1.176-kata-rs (kata@kata-rs) #1 SMP\n\0rest");
        assert_eq!(
            banner_of(&b).as_deref(),
            Some("6.1.176-kata-rs (kata@kata-rs) #1 SMP")
        );
    }

    #[test]
    fn reads_the_version_pointer_of_a_bzimage() {
        let mut b = vec![0u8; 0x400];
        b[HDRS_OFFSET..HDRS_OFFSET + 4].copy_from_slice(b"HdrS");
        // The pointer is relative to the start of the setup header (0x200).
        b[VERSION_PTR_OFFSET..VERSION_PTR_OFFSET + 2].copy_from_slice(&0x100u16.to_le_bytes());
        b[0x300..0x300 + 15].copy_from_slice(b"6.1.0-50-amd64 ");
        assert_eq!(banner_of(&b).as_deref(), Some("6.1.0-50-amd64"));
    }

    #[test]
    fn anything_else_has_no_banner() {
        assert_eq!(banner_of(b""), None);
        assert_eq!(banner_of(b"\x7fELF no banner here"), None);
        assert_eq!(banner_of(&[0xffu8; 0x300]), None);
        let mut truncated = vec![0u8; 0x210];
        truncated[HDRS_OFFSET..HDRS_OFFSET + 4].copy_from_slice(b"HdrS");
        truncated[VERSION_PTR_OFFSET..VERSION_PTR_OFFSET + 2]
            .copy_from_slice(&0xfff0u16.to_le_bytes());
        assert_eq!(banner_of(&truncated), None);
    }
}
