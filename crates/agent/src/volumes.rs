//! Block volumes hot-plugged by the runtime (direct volumes): find the device by its address
//! (a virtio-blk device's PCI path, a SCSI target and LUN; never by guessing `/dev/vdX`
//! order), mount it once per mount point and count the containers using it, report statfs,
//! and grow its filesystem online (ext4, xfs).

use crate::error::{invalid, step, GuestError};
use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a hot-plugged device may take to appear (TCG guests are slow to probe).
const APPEAR_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Default)]
struct Table {
    /// Mount point → containers using it.
    users: HashMap<PathBuf, usize>,
    /// Container → the mount points it holds.
    by_container: HashMap<String, Vec<PathBuf>>,
}

static TABLE: Mutex<Option<Table>> = Mutex::new(None);

fn with_table<T>(f: impl FnOnce(&mut Table) -> T) -> T {
    let mut g = TABLE.lock().unwrap_or_else(|e| e.into_inner());
    f(g.get_or_insert_with(Table::default))
}

/// Whether a storage driver is a block volume's.
pub fn is_block(driver: &str) -> bool {
    matches!(driver, "blk" | "scsi")
}

/// Mounts the block volume for `container` (or counts one more user of it). The table stays
/// locked meanwhile: two containers created at once never mount the same volume twice.
pub fn acquire(
    container: &str,
    driver: &str,
    address: &str,
    fstype: &str,
    options: &[String],
    mount_point: &Path,
) -> Result<(), GuestError> {
    let mut guard = TABLE.lock().unwrap_or_else(|e| e.into_inner());
    let t = guard.get_or_insert_with(Table::default);
    if t.users.get(mount_point).copied().unwrap_or(0) == 0 {
        std::fs::create_dir_all(mount_point)
            .map_err(step(format!("create {}", mount_point.display())))?;
        // A disk can show in sysfs while its driver is still setting it up (or, when the
        // virtio-scsi controller arrives with it, while the controller's own scan and the
        // hot-plug event race over the same target): opening it then fails with ENXIO or
        // ENODEV. Find it again and retry until the deadline.
        let deadline = Instant::now() + APPEAR_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let dev = find_device(driver, address, left.max(Duration::from_secs(1)))?;
            crate::init::debug(|| format!("volume {driver} {address} is {}", dev.display()));
            match crate::mounts::mount_one(&dev.display().to_string(), mount_point, fstype, options)
            {
                Ok(()) => break,
                Err(e)
                    if matches!(e.errno(), Some(nix::Error::ENXIO | nix::Error::ENODEV))
                        && Instant::now() < deadline =>
                {
                    crate::init::debug(|| format!("volume {driver} {address}: {e}; retrying"));
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => {
                    return Err(step(format!(
                        "mount {} ({driver} {address})",
                        dev.display()
                    ))(e))
                }
            }
        }
    }
    *t.users.entry(mount_point.to_path_buf()).or_insert(0) += 1;
    t.by_container
        .entry(container.to_string())
        .or_default()
        .push(mount_point.to_path_buf());
    Ok(())
}

/// Drops `container`'s uses; unmounts the volumes nobody uses any more (so that the runtime
/// can unplug them).
pub fn release(container: &str) {
    let unused: Vec<PathBuf> = with_table(|t| {
        let mine = t.by_container.remove(container).unwrap_or_default();
        let mut unused = Vec::new();
        for m in mine {
            if let Some(n) = t.users.get_mut(&m) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    t.users.remove(&m);
                    unused.push(m);
                }
            }
        }
        unused
    });
    for m in unused {
        // Written data reaches the device before it is unplugged.
        if let Err(e) = nix::mount::umount2(&m, nix::mount::MntFlags::empty()) {
            crate::init::log(&format!(
                "volume {}: unmount: {e}; detaching it",
                m.display()
            ));
            let _ = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH);
        }
        let _ = std::fs::remove_dir(&m);
    }
}

/// The storage driver of a memory-backed emptyDir (Kata's): a tmpfs in the guest.
pub const EPHEMERAL_DRIVER: &str = "ephemeral";
/// Where memory-backed emptyDirs are mounted (the runtime's `GUEST_EPHEMERAL_DIR`).
const EPHEMERAL_ROOT: &str = "/run/kata-containers/sandbox/ephemeral";

static EPHEMERAL: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// The tmpfs options an ephemeral storage may carry (`size=BYTES`, `nr_inodes=N`, `mode=OCTAL`):
/// anything else is refused.
pub fn ephemeral_options(options: &[String]) -> Result<Vec<String>, GuestError> {
    options
        .iter()
        .map(|o| {
            let ok = match o.split_once('=') {
                Some(("size" | "nr_inodes", v)) => v.parse::<u64>().is_ok(),
                Some(("mode", v)) => u32::from_str_radix(v, 8).is_ok_and(|m| m <= 0o7777),
                _ => false,
            };
            if ok {
                Ok(o.clone())
            } else {
                Err(invalid(format!(
                    "ephemeral storage option {o:?} (size=BYTES, nr_inodes=N or mode=OCTAL)"
                )))
            }
        })
        .collect()
}

/// Mounts a memory-backed emptyDir's tmpfs at `mount_point` (a name under
/// [`EPHEMERAL_ROOT`]) the first time a container of the pod asks for it; later containers
/// share it. It lives as long as the pod (an emptyDir outlives its containers' restarts).
pub fn mount_ephemeral(mount_point: &str, options: &[String]) -> Result<(), GuestError> {
    mount_ephemeral_in(
        Path::new(EPHEMERAL_ROOT),
        mount_point,
        options,
        &mut |dest, opts| crate::mounts::mount_one("tmpfs", dest, "tmpfs", opts),
    )
}

/// What mounts a tmpfs at a path with options (a fake in the unit tests).
type MountTmpfs<'a> = dyn FnMut(&Path, &[String]) -> Result<(), GuestError> + 'a;

fn mount_ephemeral_in(
    root: &Path,
    mount_point: &str,
    options: &[String],
    mount: &mut MountTmpfs<'_>,
) -> Result<(), GuestError> {
    let dest = Path::new(mount_point);
    let name_ok = dest.parent() == Some(root)
        && dest
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| !n.is_empty() && n != "." && n != "..");
    if !name_ok {
        return Err(invalid(format!(
            "ephemeral storage at {mount_point}: not a name under {}",
            root.display()
        )));
    }
    let options = ephemeral_options(options)?;
    let mut done = EPHEMERAL.lock().unwrap_or_else(|e| e.into_inner());
    if done.iter().any(|d| d == dest) {
        return Ok(());
    }
    std::fs::create_dir_all(dest).map_err(step(format!("create {mount_point}")))?;
    mount(dest, &options)?;
    done.push(dest.to_path_buf());
    Ok(())
}

/// The block device for an address, waiting for it to appear.
pub fn find_device(driver: &str, address: &str, timeout: Duration) -> Result<PathBuf, GuestError> {
    let deadline = Instant::now() + timeout;
    let mut rescanned = false;
    loop {
        let found = match driver {
            "blk" => pci_block_device(Path::new("/sys/devices/pci0000:00"), address)?,
            "scsi" => scsi_block_device(Path::new("/sys/bus/scsi/devices"), address)?,
            other => return Err(invalid(format!("unknown block volume driver {other:?}"))),
        };
        // A disk whose capacity is not known yet is not ready.
        let found = found.filter(|name| {
            std::fs::read_to_string(format!("/sys/class/block/{name}/size"))
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .is_some_and(|sectors| sectors > 0)
        });
        if let Some(name) = found {
            let dev = PathBuf::from("/dev").join(&name);
            if dev.exists() {
                return Ok(dev);
            }
            // devtmpfs makes the node with the device; make it if it is not there.
            make_node(&name, &dev)?;
            return Ok(dev);
        }
        if driver == "scsi" && !rescanned && Instant::now() + timeout / 2 > deadline {
            scan_scsi(address);
            rescanned = true;
        }
        if Instant::now() >= deadline {
            return Err(invalid(format!(
                "{driver} device {address} did not appear in the guest within {} s",
                timeout.as_secs()
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn make_node(name: &str, dev: &Path) -> Result<(), GuestError> {
    let nums = std::fs::read_to_string(format!("/sys/class/block/{name}/dev"))
        .map_err(step(name.to_string()))?;
    let (maj, min) = nums
        .trim()
        .split_once(':')
        .and_then(|(a, b)| Some((a.parse::<u64>().ok()?, b.parse::<u64>().ok()?)))
        .ok_or_else(|| invalid(format!("{name}: bad device numbers {nums:?}")))?;
    match nix::sys::stat::mknod(
        dev,
        nix::sys::stat::SFlag::S_IFBLK,
        nix::sys::stat::Mode::from_bits_truncate(0o600),
        nix::sys::stat::makedev(maj, min),
    ) {
        // devtmpfs made it meanwhile (the kernel adds the node right after the disk).
        Ok(()) | Err(nix::errno::Errno::EEXIST) => Ok(()),
        Err(e) => Err(step(format!("mknod {}", dev.display()))(e)),
    }
}

/// Parses a PCI path: slots from the root bus down, two hex digits each (`02/01`).
pub fn parse_pci_path(path: &str) -> Result<Vec<u8>, GuestError> {
    let slots: Result<Vec<u8>, _> = path
        .split('/')
        .map(|s| {
            if s.len() == 2 {
                u8::from_str_radix(s, 16).ok().filter(|v| *v < 32)
            } else {
                None
            }
            .ok_or(())
        })
        .collect();
    match slots {
        Ok(v) if !v.is_empty() => Ok(v),
        _ => Err(invalid(format!(
            "bad PCI path {path:?} (expected slots like \"02/01\")"
        ))),
    }
}

/// Walks the PCI path from `root` (`/sys/devices/pci0000:00`); the virtio-blk disk's name.
fn pci_block_device(root: &Path, address: &str) -> Result<Option<String>, GuestError> {
    let slots = parse_pci_path(address)?;
    let mut dir = root.to_path_buf();
    for slot in slots {
        let suffix = format!(":{slot:02x}.0");
        let Some(next) = std::fs::read_dir(&dir)
            .ok()
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.len() == 12 && n.ends_with(&suffix))
            })
        else {
            return Ok(None);
        };
        dir = next;
    }
    // <device>/virtioN/block/<name>
    for e in std::fs::read_dir(&dir).ok().into_iter().flatten().flatten() {
        let name = e.file_name();
        if name.to_string_lossy().starts_with("virtio") {
            if let Some(b) = first_entry(&e.path().join("block")) {
                return Ok(Some(b));
            }
        }
    }
    Ok(None)
}

/// `<host>:0:<id>:<lun>/block/<name>` under `/sys/bus/scsi/devices`.
fn scsi_block_device(root: &Path, address: &str) -> Result<Option<String>, GuestError> {
    let (id, lun) = parse_scsi_address(address)?;
    let want = ["0".to_string(), id.to_string(), lun.to_string()];
    for e in std::fs::read_dir(root).ok().into_iter().flatten().flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        let f: Vec<&str> = n.split(':').collect();
        if f.len() == 4 && f[1..] == want {
            if let Some(b) = first_entry(&e.path().join("block")) {
                return Ok(Some(b));
            }
        }
    }
    Ok(None)
}

/// Parses `<scsi-id>:<lun>`.
pub fn parse_scsi_address(address: &str) -> Result<(u32, u32), GuestError> {
    address
        .split_once(':')
        .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)))
        .ok_or_else(|| {
            invalid(format!(
                "bad SCSI address {address:?} (expected \"<scsi-id>:<lun>\")"
            ))
        })
}

fn scan_scsi(address: &str) {
    let Ok((id, lun)) = parse_scsi_address(address) else {
        return;
    };
    for e in std::fs::read_dir("/sys/class/scsi_host")
        .ok()
        .into_iter()
        .flatten()
        .flatten()
    {
        let _ = std::fs::write(e.path().join("scan"), format!("0 {id} {lun}"));
    }
}

fn first_entry(dir: &Path) -> Option<String> {
    std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .next()
}

/// statfs of a guest mount: (bytes available, total, used), (inodes free, total, used).
pub fn stats(path: &Path) -> Result<([u64; 3], [u64; 3]), GuestError> {
    let st =
        nix::sys::statvfs::statvfs(path).map_err(step(format!("statfs {}", path.display())))?;
    let f = st.fragment_size();
    let total = st.blocks() * f;
    let avail = st.blocks_available() * f;
    let used = total.saturating_sub(st.blocks_free() * f);
    let itotal = st.files();
    let ifree = st.files_free();
    Ok((
        [avail, total, used],
        [ifree, itotal, itotal.saturating_sub(ifree)],
    ))
}

/// The block device a guest path is mounted from (from /proc/self/mountinfo), and its
/// filesystem type.
fn mounted_device(path: &Path) -> Result<(PathBuf, String), GuestError> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").map_err(step("read mountinfo"))?;
    let want = path.display().to_string();
    let mut found = None;
    for line in info.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        let Some(dash) = f.iter().position(|x| *x == "-") else {
            continue;
        };
        if f.get(4) == Some(&want.as_str()) && f.len() > dash + 2 {
            found = Some((PathBuf::from(f[dash + 2]), f[dash + 1].to_string()));
        }
    }
    found.ok_or_else(|| invalid(format!("{want} is not a mount point in the guest")))
}

/// Grows the filesystem mounted at `path` to `size` bytes (or to the device's size, if
/// smaller), online. The device must already have the new size (the runtime resized it).
pub fn resize(path: &Path, size: u64) -> Result<(), GuestError> {
    let (dev, fstype) = mounted_device(path)?;
    let name = dev
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // A SCSI disk learns its new capacity on a rescan; virtio-blk from the config interrupt.
    let _ = std::fs::write(format!("/sys/class/block/{name}/device/rescan"), "1");
    let sectors = |n: &str| {
        std::fs::read_to_string(format!("/sys/class/block/{n}/size"))
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    // The new capacity may take a moment to show.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut dev_bytes = sectors(&name) * 512;
    while dev_bytes < size && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        dev_bytes = sectors(&name) * 512;
    }
    if dev_bytes < size {
        return Err(invalid(format!(
            "{} has {dev_bytes} bytes in the guest, fewer than the {size} requested (was the host device grown first?)",
            dev.display()
        )));
    }
    let dir = std::fs::File::open(path).map_err(step(format!("open {}", path.display())))?;
    let fd = dir.as_raw_fd();
    match fstype.as_str() {
        "ext4" | "ext3" => {
            let st = nix::sys::statvfs::statvfs(path).map_err(step("statfs"))?;
            let blocks: u64 = size / st.block_size().max(1);
            nix::ioctl_write_ptr!(ext4_resize_fs, b'f', 16, u64);
            // SAFETY: EXT4_IOC_RESIZE_FS takes a pointer to the new block count.
            unsafe { ext4_resize_fs(fd, &blocks) }
                .map_err(step(format!("EXT4_IOC_RESIZE_FS to {blocks} blocks")))?;
        }
        "xfs" => {
            let mut geom = [0u8; 256];
            nix::ioctl_read!(xfs_fsgeometry, b'X', 126, [u8; 256]);
            // SAFETY: XFS_IOC_FSGEOMETRY fills the 256-byte struct xfs_fsop_geom.
            unsafe { xfs_fsgeometry(fd, &mut geom) }.map_err(step("XFS_IOC_FSGEOMETRY"))?;
            let blocksize = u32::from_ne_bytes([geom[0], geom[1], geom[2], geom[3]]);
            let imaxpct = u32::from_ne_bytes([geom[28], geom[29], geom[30], geom[31]]);
            #[repr(C)]
            struct GrowData {
                newblocks: u64,
                imaxpct: u32,
            }
            let req = GrowData {
                newblocks: size / u64::from(blocksize.max(1)),
                imaxpct,
            };
            nix::ioctl_write_ptr!(xfs_growfs_data, b'X', 110, GrowData);
            // SAFETY: XFS_IOC_FSGROWFSDATA takes a struct xfs_growfs_data.
            unsafe { xfs_growfs_data(fd, &req) }.map_err(step(format!(
                "XFS_IOC_FSGROWFSDATA to {} blocks",
                req.newblocks
            )))?;
        }
        other => {
            return Err(invalid(format!(
                "cannot grow a {other} filesystem online (ext4 and xfs can be)"
            )))
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pci_paths() {
        assert_eq!(parse_pci_path("02/01").ok(), Some(vec![2, 1]));
        assert_eq!(parse_pci_path("1f").ok(), Some(vec![31]));
        for bad in ["", "2/1", "02/", "20", "zz", "02//01"] {
            assert!(parse_pci_path(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn scsi_addresses() {
        assert_eq!(parse_scsi_address("3:0").ok(), Some((3, 0)));
        assert!(parse_scsi_address("3").is_err());
        assert!(parse_scsi_address("a:b").is_err());
    }

    #[test]
    fn a_pci_path_is_walked_in_sysfs() {
        let d = tempfile::tempdir().expect("tmp");
        let root = d.path().join("pci0000:00");
        let disk = root.join("0000:00:02.0/0000:01:01.0/virtio3/block/vdb");
        std::fs::create_dir_all(&disk).expect("mkdir");
        std::fs::create_dir_all(root.join("0000:00:01.0/0000:02:01.0/virtio1/block/vda"))
            .expect("mkdir");
        assert_eq!(
            pci_block_device(&root, "02/01").expect("walk"),
            Some("vdb".to_string())
        );
        assert_eq!(pci_block_device(&root, "02/02").expect("walk"), None);
        assert_eq!(
            pci_block_device(&root, "01/01").expect("walk"),
            Some("vda".to_string())
        );
    }

    #[test]
    fn a_scsi_address_is_found_in_sysfs() {
        let d = tempfile::tempdir().expect("tmp");
        std::fs::create_dir_all(d.path().join("0:0:3:0/block/sdb")).expect("mkdir");
        std::fs::create_dir_all(d.path().join("0:0:13:0/block/sdc")).expect("mkdir");
        std::fs::create_dir_all(d.path().join("host0")).expect("mkdir");
        assert_eq!(
            scsi_block_device(d.path(), "3:0").expect("find"),
            Some("sdb".to_string())
        );
        assert_eq!(scsi_block_device(d.path(), "4:0").expect("find"), None);
    }

    #[test]
    fn ephemeral_storages_are_checked_and_mounted_once_per_pod() {
        let t = tempfile::tempdir().expect("tempdir");
        let root = t.path().join("ephemeral");
        let mounted = std::cell::RefCell::new(Vec::new());
        let mut record = |d: &Path, o: &[String]| {
            mounted.borrow_mut().push((d.to_path_buf(), o.to_vec()));
            Ok(())
        };
        let size = vec!["size=16777216".to_string()];
        let mp = root.join("mem").display().to_string();
        mount_ephemeral_in(&root, &mp, &size, &mut record).expect("first");
        mount_ephemeral_in(&root, &mp, &size, &mut record).expect("second container");
        assert_eq!(*mounted.borrow(), vec![(root.join("mem"), size.clone())]);
        for bad in [root.join("a/b"), root.join(".."), t.path().join("x")] {
            let bad = bad.display().to_string();
            assert!(
                mount_ephemeral_in(&root, &bad, &size, &mut record).is_err(),
                "{bad}"
            );
        }
        for bad in ["size=1g", "exec", "uid=0", "mode=999"] {
            assert!(ephemeral_options(&[bad.to_string()]).is_err(), "{bad}");
        }
        assert!(ephemeral_options(&["mode=1777".into(), "nr_inodes=100".into()]).is_ok());
    }
}
