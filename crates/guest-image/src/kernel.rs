//! Trimming an ELF `vmlinux` for a smaller host footprint.
//!
//! QEMU maps the kernel file and keeps its loadable bytes as a ROM for resets, so every page of a
//! `PT_LOAD` segment's file image stays resident in the host page cache, mapped by each QEMU.
//! Debian's vmlinux stores its `.bss`, `.brk` and `.init.scratch` as ~23 MB of zeros inside the
//! last segment. Lowering `p_filesz` to the last non-zero byte leaves the guest memory identical
//! (the ELF loader zero-fills up to `p_memsz`) while QEMU no longer reads those pages.

/// Errors of [`trim_zero_tails`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TrimError {
    /// Not a little-endian ELF64 file.
    #[error("not a little-endian 64-bit ELF file")]
    NotElf64,
    /// A header points outside the file.
    #[error("truncated ELF file: {0} lies outside the file")]
    Truncated(&'static str),
}

const PT_LOAD: u32 = 1;

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(off..off + 2)?.try_into().ok()?))
}
fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off + 4)?.try_into().ok()?))
}
fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(off..off + 8)?.try_into().ok()?))
}

/// Lowers each `PT_LOAD` segment's `p_filesz` past its trailing zero bytes (in place). Returns
/// how many file bytes the loader no longer reads.
pub fn trim_zero_tails(elf: &mut [u8]) -> Result<u64, TrimError> {
    if elf.len() < 64 || &elf[..4] != b"\x7fELF" || elf[4] != 2 || elf[5] != 1 {
        return Err(TrimError::NotElf64);
    }
    let phoff = u64_at(elf, 0x20).ok_or(TrimError::Truncated("e_phoff"))? as usize;
    let phentsize = u16_at(elf, 0x36).ok_or(TrimError::Truncated("e_phentsize"))? as usize;
    let phnum = u16_at(elf, 0x38).ok_or(TrimError::Truncated("e_phnum"))? as usize;
    if phentsize < 56 {
        return Err(TrimError::NotElf64);
    }
    let mut saved = 0;
    for i in 0..phnum {
        let ph = phoff
            .checked_add(i * phentsize)
            .ok_or(TrimError::Truncated("program header"))?;
        let p_type = u32_at(elf, ph).ok_or(TrimError::Truncated("program header"))?;
        if p_type != PT_LOAD {
            continue;
        }
        let offset = u64_at(elf, ph + 8).ok_or(TrimError::Truncated("program header"))? as usize;
        let filesz = u64_at(elf, ph + 32).ok_or(TrimError::Truncated("program header"))? as usize;
        let end = offset
            .checked_add(filesz)
            .filter(|e| *e <= elf.len())
            .ok_or(TrimError::Truncated("segment"))?;
        let data = &elf[offset..end];
        let used = data.iter().rposition(|b| *b != 0).map_or(0, |p| p + 1);
        if used < filesz {
            saved += (filesz - used) as u64;
            elf[ph + 32..ph + 40].copy_from_slice(&(used as u64).to_le_bytes());
        }
    }
    Ok(saved)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ELF64 with one PT_LOAD segment of `data`.
    fn elf(data: &[u8]) -> Vec<u8> {
        let mut b = vec![0u8; 64 + 56];
        b[..4].copy_from_slice(b"\x7fELF");
        b[4] = 2;
        b[5] = 1;
        b[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        b[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        b[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes());
        b[64..68].copy_from_slice(&PT_LOAD.to_le_bytes());
        b[64 + 8..64 + 16].copy_from_slice(&120u64.to_le_bytes());
        b[64 + 32..64 + 40].copy_from_slice(&(data.len() as u64).to_le_bytes());
        b[64 + 40..64 + 48].copy_from_slice(&(data.len() as u64 + 4096).to_le_bytes());
        b.extend_from_slice(data);
        b
    }

    fn filesz(b: &[u8]) -> u64 {
        u64_at(b, 64 + 32).expect("filesz")
    }

    #[test]
    fn drops_only_the_zero_tail() {
        let mut b = elf(&[1, 0, 2, 0, 0, 0]);
        assert_eq!(trim_zero_tails(&mut b), Ok(3));
        assert_eq!(filesz(&b), 3);
        // memsz untouched: the loader still zero-fills to the same size.
        assert_eq!(u64_at(&b, 64 + 40), Some(6 + 4096));
        // Idempotent.
        assert_eq!(trim_zero_tails(&mut b), Ok(0));
    }

    #[test]
    fn rejects_bad_input() {
        assert_eq!(trim_zero_tails(&mut [0u8; 10]), Err(TrimError::NotElf64));
        let mut b = elf(&[1, 2, 3]);
        b.truncate(122);
        assert_eq!(
            trim_zero_tails(&mut b),
            Err(TrimError::Truncated("segment"))
        );
    }
}
