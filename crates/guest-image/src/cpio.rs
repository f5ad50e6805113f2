//! A deterministic cpio `newc` writer (the format the kernel unpacks as an initramfs).

/// One archive member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    mode: u32,
    rdev: (u32, u32),
    data: Vec<u8>,
}

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

impl Entry {
    /// A directory.
    pub fn dir(perm: u32) -> Self {
        Entry {
            mode: S_IFDIR | perm,
            rdev: (0, 0),
            data: Vec::new(),
        }
    }
    /// A regular file.
    pub fn file(perm: u32, data: Vec<u8>) -> Self {
        Entry {
            mode: S_IFREG | perm,
            rdev: (0, 0),
            data,
        }
    }
    /// A symbolic link to `target`.
    pub fn symlink(target: &str) -> Self {
        Entry {
            mode: S_IFLNK | 0o777,
            rdev: (0, 0),
            data: target.as_bytes().to_vec(),
        }
    }
    /// A character device.
    pub fn char_device(perm: u32, major: u32, minor: u32) -> Self {
        Entry {
            mode: S_IFCHR | perm,
            rdev: (major, minor),
            data: Vec::new(),
        }
    }
}

/// What an [`Entry`] is, for writers of other formats (the disk image).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind<'a> {
    /// A directory with its permission bits.
    Dir(u32),
    /// A regular file: permission bits and contents.
    File(u32, &'a [u8]),
    /// A symbolic link and its target.
    Symlink(&'a str),
    /// A character device: permission bits, major, minor.
    CharDevice(u32, u32, u32),
}

impl Entry {
    /// The entry's type and contents.
    pub fn kind(&self) -> Kind<'_> {
        let perm = self.mode & 0o7777;
        match self.mode & 0o170000 {
            S_IFDIR => Kind::Dir(perm),
            S_IFLNK => Kind::Symlink(std::str::from_utf8(&self.data).unwrap_or("")),
            S_IFCHR => Kind::CharDevice(perm, self.rdev.0, self.rdev.1),
            _ => Kind::File(perm, &self.data),
        }
    }
}

fn pad(out: &mut Vec<u8>) {
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

fn header(out: &mut Vec<u8>, ino: u32, e: &Entry, name: &str) {
    let nlink = if e.mode & S_IFDIR != 0 { 2 } else { 1 };
    let fields = [
        ino,
        e.mode,
        0,
        0,
        nlink,
        0,
        e.data.len() as u32,
        0,
        0,
        e.rdev.0,
        e.rdev.1,
        name.len() as u32 + 1,
        0,
    ];
    out.extend_from_slice(b"070701");
    for f in fields {
        out.extend_from_slice(format!("{f:08x}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    pad(out);
}

/// Writes the members (in the given order, parents before children) and the trailer.
pub fn write<'a>(entries: impl Iterator<Item = (&'a str, &'a Entry)>) -> Vec<u8> {
    let mut out = Vec::new();
    for (ino, (name, e)) in (1..).zip(entries) {
        header(&mut out, ino, e, name);
        out.extend_from_slice(&e.data);
        pad(&mut out);
    }
    header(
        &mut out,
        0,
        &Entry {
            mode: 0,
            rdev: (0, 0),
            data: Vec::new(),
        },
        "TRAILER!!!",
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_is_newc() {
        let f = Entry::file(0o755, b"hello".to_vec());
        let bytes = write([("init", &f)].into_iter());
        assert!(bytes.starts_with(b"070701"));
        let text = String::from_utf8_lossy(&bytes);
        assert!(text.contains("init\0"));
        assert!(text.contains("hello"));
        assert!(text.contains("TRAILER!!!"));
        assert_eq!(bytes.len() % 4, 0);
        // mode field (second) of the first header is S_IFREG|0755.
        assert_eq!(&bytes[14..22], b"000081ed");
    }
}
