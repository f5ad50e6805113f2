//! The guest rootfs disk image (Kata's `kata-containers.img`): the same tree as the initrd in an
//! ext4 filesystem, laid out so QEMU can map it into the guest as an NVDIMM and the guest
//! kernel can run straight from it with DAX, or attach it as a plain virtio-blk disk.
//!
//! Layout (all offsets from the start of the file; every size a multiple of 2 MiB, the guest's
//! memory-hotplug granularity):
//!
//! ```text
//! 0        MBR: partition 1 = [3 MiB, end)        seen by virtio-blk: /dev/vda1
//! 4 KiB    NVDIMM PFN info block, data offset 2 MiB
//! 2 MiB    MBR: partition 1 = [1 MiB, end)        seen through the NVDIMM: /dev/pmem0p1
//! 3 MiB    ext4, 4 KiB blocks, no journal (the root is mounted read-only)
//! ```
//!
//! The info block turns the label-less NVDIMM namespace into a "pfn" namespace whose pages have
//! `struct page`s (kept in guest RAM, `PFN_MODE_RAM`, so the read-only device is never written),
//! which is what ext4's `dax` mount option needs; the block device the guest sees starts after
//! it, at 2 MiB. Kata's image builder writes the same header (its `nsdax` tool).
//!
//! `mke2fs -d` fills the filesystem; `debugfs` then adds the device nodes and clears the times
//! mke2fs takes from the clock and from the staging files' ctime, so the same inputs give the
//! same bytes.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::cpio::{Entry, Kind};
use crate::BuildError;

const MIB: u64 = 1024 * 1024;
/// Size of the DAX header (where the NVDIMM's data starts).
pub const DAX_HEADER: u64 = 2 * MIB;
/// Offset of the partition inside the disk the guest sees.
pub const PART_START: u64 = MIB;
/// Alignment of the image size and of the NVDIMM's data (the guest's subsection size).
pub const ALIGN: u64 = 2 * MIB;
/// Offset of the PFN info block in the namespace.
const PFN_SB_OFFSET: usize = 4096;
/// Fixed identifiers, so the image is reproducible.
const FS_UUID: &str = "6b617461-2d72-7300-0000-726f6f746673";
const HASH_SEED: &str = "6b617461-2d72-7300-0000-686173687365";
const PFN_UUID: [u8; 16] = *b"kata-rs pfn info";
const DISK_SIGNATURE: u32 = 0x6b61_7461;
/// `enum nd_pfn_mode`: struct pages in guest RAM.
const PFN_MODE_RAM: u32 = 1;

/// What was built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    /// Size of the image file in bytes.
    pub size: u64,
    /// Size of the ext4 filesystem in bytes.
    pub fs_size: u64,
    /// Bytes of file contents in it.
    pub content: u64,
}

fn tool_error(tool: &str, detail: String) -> BuildError {
    BuildError::Tool {
        tool: tool.to_string(),
        detail,
    }
}

fn run(tool: &str, cmd: &mut Command) -> Result<(), BuildError> {
    let out = cmd.env("E2FSPROGS_FAKE_TIME", "1").output().map_err(|e| {
        tool_error(
            tool,
            format!("cannot run it ({e}); install e2fsprogs (scripts/install-deps.sh)"),
        )
    })?;
    if !out.status.success() {
        return Err(tool_error(
            tool,
            format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        ));
    }
    Ok(())
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> BuildError + '_ {
    move |source| BuildError::Read {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes the tree into `dir`, except the device nodes (debugfs adds them, which needs no
/// privilege), and returns the bytes of file contents.
fn stage(files: &BTreeMap<String, Entry>, dir: &Path) -> Result<u64, BuildError> {
    use std::os::unix::fs::PermissionsExt;
    let mut content = 0;
    for (path, entry) in files {
        let dest = dir.join(path);
        match entry.kind() {
            Kind::Dir(perm) => {
                std::fs::create_dir_all(&dest).map_err(io(&dest))?;
                std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(perm))
                    .map_err(io(&dest))?;
            }
            Kind::File(perm, data) => {
                std::fs::write(&dest, data).map_err(io(&dest))?;
                std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(perm))
                    .map_err(io(&dest))?;
                content += data.len() as u64;
            }
            Kind::Symlink(target) => {
                std::os::unix::fs::symlink(target, &dest).map_err(io(&dest))?;
            }
            Kind::CharDevice(..) => {}
        }
    }
    Ok(content)
}

/// The debugfs script: device nodes, then every inode's times to 0.
fn fixups(files: &BTreeMap<String, Entry>) -> String {
    let mut script = String::new();
    for (path, entry) in files {
        if let Kind::CharDevice(perm, major, minor) = entry.kind() {
            // debugfs's mknod takes a name in the current directory, not a path.
            let (parent, name) = path.rsplit_once('/').unwrap_or(("", path.as_str()));
            script.push_str(&format!(
                "cd /{parent}\nmknod {name} c {major} {minor}\ncd /\n"
            ));
            script.push_str(&format!("sif /{path} mode 0{:o}\n", 0o020000 | perm));
        }
    }
    let all = std::iter::once("/".to_string()).chain(files.keys().map(|p| format!("/{p}")));
    for path in all {
        for field in ["atime", "mtime", "ctime", "crtime"] {
            script.push_str(&format!("sif {path} {field} 0\n"));
        }
    }
    script
}

/// A master boot record with one Linux partition of `sectors` starting at `start` (in 512-byte
/// sectors).
pub fn mbr(start: u64, sectors: u64) -> [u8; 512] {
    let mut b = [0u8; 512];
    b[440..444].copy_from_slice(&DISK_SIGNATURE.to_le_bytes());
    let e = &mut b[446..462];
    e[0] = 0x00; // not bootable
    e[1..4].copy_from_slice(&[0xfe, 0xff, 0xff]); // CHS: use LBA
    e[4] = 0x83; // Linux
    e[5..8].copy_from_slice(&[0xfe, 0xff, 0xff]);
    e[8..12].copy_from_slice(&(start as u32).to_le_bytes());
    e[12..16].copy_from_slice(&(sectors as u32).to_le_bytes());
    b[510] = 0x55;
    b[511] = 0xaa;
    b
}

/// The kernel's `nd_fletcher64` over little-endian 32-bit words.
fn fletcher64(data: &[u8]) -> u64 {
    let mut lo: u32 = 0;
    let mut hi: u64 = 0;
    for w in data.chunks_exact(4) {
        lo = lo.wrapping_add(u32::from_le_bytes([w[0], w[1], w[2], w[3]]));
        hi = hi.wrapping_add(u64::from(lo));
    }
    (hi << 32) | u64::from(lo)
}

/// The NVDIMM PFN info block (`struct nd_pfn_sb`, version 1.4) for a namespace of `size`
/// bytes whose data starts at [`DAX_HEADER`].
pub fn pfn_info_block(size: u64) -> [u8; 4096] {
    let mut b = [0u8; 4096];
    b[0..16].copy_from_slice(b"NVDIMM_PFN_INFO\0");
    b[16..32].copy_from_slice(&PFN_UUID);
    // parent_uuid (32..48) stays zero: a label-less namespace has the null uuid.
    b[52..54].copy_from_slice(&1u16.to_le_bytes()); // version_major
    b[54..56].copy_from_slice(&4u16.to_le_bytes()); // version_minor
    b[56..64].copy_from_slice(&DAX_HEADER.to_le_bytes()); // dataoff
    b[64..72].copy_from_slice(&((size - DAX_HEADER) / 4096).to_le_bytes()); // npfns
    b[72..76].copy_from_slice(&PFN_MODE_RAM.to_le_bytes());
    // start_pad, end_trunc: 0
    b[84..88].copy_from_slice(&(ALIGN as u32).to_le_bytes()); // align
    b[88..92].copy_from_slice(&4096u32.to_le_bytes()); // page_size
    b[92..94].copy_from_slice(&64u16.to_le_bytes()); // page_struct_size
    let sum = fletcher64(&b);
    b[4088..4096].copy_from_slice(&sum.to_le_bytes());
    b
}

/// Size of the filesystem for `content` bytes in `entries` files: the contents with room for
/// metadata, so that the whole image is a multiple of [`ALIGN`].
fn fs_size(content: u64, entries: usize) -> u64 {
    let want = content + content / 4 + (entries as u64) * 8192 + 4 * MIB;
    let total = (DAX_HEADER + PART_START + want).div_ceil(ALIGN) * ALIGN;
    total - DAX_HEADER - PART_START
}

/// Builds the image for `files` at `output` (written to a temporary file, then renamed).
pub fn build_image(
    files: &BTreeMap<String, Entry>,
    output: &Path,
) -> Result<ImageInfo, BuildError> {
    let work = tempdir(output)?;
    let result = build_in(files, output, &work);
    let _ = std::fs::remove_dir_all(&work);
    result
}

fn tempdir(output: &Path) -> Result<PathBuf, BuildError> {
    let parent = output
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let dir = parent.join(format!(
        ".{}.work-{}",
        output
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default(),
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    Ok(dir)
}

fn build_in(
    files: &BTreeMap<String, Entry>,
    output: &Path,
    work: &Path,
) -> Result<ImageInfo, BuildError> {
    let root = work.join("root");
    std::fs::create_dir_all(&root).map_err(io(&root))?;
    let content = stage(files, &root)?;
    let fs_size = fs_size(content, files.len());
    let fs = work.join("fs.ext4");
    std::fs::File::create(&fs)
        .and_then(|f| f.set_len(fs_size))
        .map_err(io(&fs))?;
    run(
        "mke2fs",
        Command::new("mke2fs")
            .args(["-q", "-F", "-t", "ext4", "-b", "4096", "-m", "0"])
            // No journal: the guest mounts it read-only.
            .args(["-O", "^has_journal", "-L", "kata-rootfs", "-U", FS_UUID])
            .arg("-E")
            .arg(format!("hash_seed={HASH_SEED},root_owner=0:0"))
            .arg("-d")
            .arg(&root)
            .arg(&fs),
    )?;
    let script = work.join("fixups.debugfs");
    std::fs::write(&script, fixups(files)).map_err(io(&script))?;
    run(
        "debugfs",
        Command::new("debugfs")
            .arg("-w")
            .arg("-f")
            .arg(&script)
            .arg(&fs),
    )?;
    run("e2fsck", Command::new("e2fsck").args(["-f", "-n"]).arg(&fs))?;

    let size = DAX_HEADER + PART_START + fs_size;
    let tmp = work.join("image");
    let mut out = std::fs::File::create(&tmp).map_err(io(&tmp))?;
    let mut header = vec![0u8; DAX_HEADER as usize];
    header[..512].copy_from_slice(&mbr((DAX_HEADER + PART_START) / 512, fs_size / 512));
    header[PFN_SB_OFFSET..PFN_SB_OFFSET + 4096].copy_from_slice(&pfn_info_block(size));
    let mut inner = vec![0u8; PART_START as usize];
    inner[..512].copy_from_slice(&mbr(PART_START / 512, fs_size / 512));
    out.write_all(&header)
        .and_then(|_| out.write_all(&inner))
        .map_err(io(&tmp))?;
    let mut fs_file = std::fs::File::open(&fs).map_err(io(&fs))?;
    std::io::copy(&mut fs_file, &mut out).map_err(io(&tmp))?;
    out.sync_all().map_err(io(&tmp))?;
    drop(out);
    std::fs::rename(&tmp, output).map_err(io(output))?;
    Ok(ImageInfo {
        size,
        fs_size,
        content,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pfn_block_checks_out_as_the_kernel_checks_it() {
        let b = pfn_info_block(64 * MIB);
        let stored = u64::from_le_bytes(b[4088..4096].try_into().expect("8 bytes"));
        let mut zeroed = b;
        zeroed[4088..4096].fill(0);
        assert_eq!(stored, fletcher64(&zeroed));
        assert_eq!(&b[..16], b"NVDIMM_PFN_INFO\0");
        assert_eq!(
            u64::from_le_bytes(b[64..72].try_into().expect("8")),
            (64 - 2) * 256,
            "npfns: the pages after the header"
        );
        // A known fletcher64 value: words 1, 2 → lo = 3, hi = 1 + 3.
        let mut w = [0u8; 8];
        w[0] = 1;
        w[4] = 2;
        assert_eq!(fletcher64(&w), (4u64 << 32) | 3);
    }

    #[test]
    fn the_partition_tables_point_at_the_filesystem() {
        let m = mbr(6144, 1000);
        assert_eq!(&m[510..], &[0x55, 0xaa]);
        assert_eq!(m[446 + 4], 0x83);
        assert_eq!(u32::from_le_bytes(m[454..458].try_into().expect("4")), 6144);
        assert_eq!(u32::from_le_bytes(m[458..462].try_into().expect("4")), 1000);
    }

    #[test]
    fn the_image_is_reproducible_and_holds_the_tree() {
        if Command::new("mke2fs").arg("-V").output().is_err() {
            eprintln!("skipped: no mke2fs (scripts/install-deps.sh installs e2fsprogs)");
            return;
        }
        let dir = tempfile::tempdir().expect("tmp");
        let mut files = BTreeMap::new();
        files.insert("dev".to_string(), Entry::dir(0o755));
        files.insert("dev/console".to_string(), Entry::char_device(0o600, 5, 1));
        files.insert("etc".to_string(), Entry::dir(0o755));
        files.insert("etc/x".to_string(), Entry::file(0o640, b"hello".to_vec()));
        files.insert("init".to_string(), Entry::file(0o755, vec![7u8; 300_000]));
        files.insert("sbin".to_string(), Entry::dir(0o755));
        files.insert("sbin/init".to_string(), Entry::symlink("/init"));
        let one = dir.path().join("one.img");
        let two = dir.path().join("two.img");
        let info = build_image(&files, &one).expect("build");
        std::thread::sleep(std::time::Duration::from_millis(1100));
        build_image(&files, &two).expect("build again");
        let a = std::fs::read(&one).expect("read");
        assert_eq!(
            a,
            std::fs::read(&two).expect("read"),
            "same inputs, same bytes"
        );
        assert_eq!(a.len() as u64, info.size);
        assert_eq!(info.size % ALIGN, 0);
        assert_eq!(&a[4096..4112], b"NVDIMM_PFN_INFO\0");
        assert_eq!(&a[510..512], &[0x55, 0xaa]);
        let inner = (DAX_HEADER as usize) + 510;
        assert_eq!(&a[inner..inner + 2], &[0x55, 0xaa]);
        // The filesystem at 3 MiB holds the tree: carve it out and ask debugfs.
        let fs = dir.path().join("fs");
        std::fs::write(&fs, &a[(DAX_HEADER + PART_START) as usize..]).expect("fs");
        let out = Command::new("debugfs")
            .args(["-R", "stat /dev/console"])
            .arg(&fs)
            .output()
            .expect("debugfs");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("Type: character special") && text.contains("Mode:  0600"),
            "{text}"
        );
        let out = Command::new("debugfs")
            .args(["-R", "cat /etc/x"])
            .arg(&fs)
            .output()
            .expect("debugfs");
        assert_eq!(out.stdout, b"hello");
        assert!(Command::new("e2fsck")
            .args(["-f", "-n"])
            .arg(&fs)
            .status()
            .expect("e2fsck")
            .success());
    }

    #[test]
    fn sizes_are_aligned() {
        for content in [0, 1, 5 * MIB, 17 * MIB + 3] {
            let fs = fs_size(content, 100);
            assert!(fs >= content + 4 * MIB);
            assert_eq!((DAX_HEADER + PART_START + fs) % ALIGN, 0);
        }
    }
}
