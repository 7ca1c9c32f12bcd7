//! Bounds on what a checkpoint's diff files may make the shim hold in memory.
//! The tar reader keeps a pax header, a GNU long name and a sparse map whole:
//! their sizes come from the archive, so they are checked here first, by a
//! walk over the headers alone (the data is never read).

use std::{
    fs::File,
    io,
    os::unix::fs::{FileExt, OpenOptionsExt},
    path::Path,
};

use tar::{EntryType, Header};

use crate::error::{Error, Result};

/// The most a pax header or GNU long name/link entry may hold.
pub const MAX_META_ENTRY: u64 = 1 << 20;
/// The most extended sparse blocks (21 segments each) one entry may have.
pub const MAX_EXT_BLOCKS: u64 = 1 << 12;
/// The most data segments a sparse entry may have (4 in the header).
pub const MAX_SPARSE_SEGMENTS: usize = 4 + 21 * MAX_EXT_BLOCKS as usize;
/// The largest `deleted.files` read.
pub const MAX_DELETED_FILES: u64 = 64 << 20;

/// Opens a diff file of the checkpoint: a regular file, never through a
/// symlink, never blocking on a fifo. None if it is not there.
pub fn open_regular(path: &Path) -> Result<Option<File>> {
    open_checked(path, false)
}

/// [`open_regular`], for writing too (an archive the apply consumes as it goes).
pub fn open_regular_rw(path: &Path) -> Result<Option<File>> {
    open_checked(path, true)
}

fn open_checked(path: &Path, write: bool) -> Result<Option<File>> {
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Err(Error::InvalidArgument(format!(
                "checkpoint file {} is a symlink",
                path.display()
            )))
        }
        Err(e) => return Err(Error::io(format!("open {}", path.display()))(e)),
    };
    let meta = file
        .metadata()
        .map_err(Error::io(format!("stat {}", path.display())))?;
    if !meta.is_file() {
        return Err(Error::InvalidArgument(format!(
            "checkpoint file {} is not a regular file",
            path.display()
        )));
    }
    Ok(Some(file))
}

fn bad(what: String) -> Error {
    Error::InvalidArgument(format!("rootfs-diff.tar: {what}"))
}

fn round_up(n: u64) -> Option<u64> {
    n.checked_add(511).map(|n| n / 512 * 512)
}

/// Walks every header of the archive, refusing metadata entries over
/// [`MAX_META_ENTRY`] and sparse maps over [`MAX_EXT_BLOCKS`] blocks.
pub fn check_archive(file: &File) -> Result<()> {
    let len = file
        .metadata()
        .map_err(Error::io("stat rootfs-diff.tar"))?
        .len();
    let mut pos: u64 = 0;
    // A pax `size` record gives the next file entry's data length.
    let mut pax_size: Option<u64> = None;
    let mut block = [0u8; 512];
    let read = |block: &mut [u8; 512], at: u64| -> Result<bool> {
        if at.checked_add(512).is_none_or(|end| end > len) {
            // Truncated: the reader says so in its own words.
            return Ok(false);
        }
        file.read_exact_at(block, at)
            .map_err(Error::io("read rootfs-diff.tar"))?;
        Ok(true)
    };
    loop {
        if !read(&mut block, pos)? || block.iter().all(|b| *b == 0) {
            return Ok(());
        }
        let header = Header::from_byte_slice(&block);
        let size = header
            .entry_size()
            .map_err(|e| bad(format!("entry at byte {pos}: {e}")))?;
        let kind = header.entry_type();
        pos += 512;
        let meta = matches!(
            kind,
            EntryType::XHeader
                | EntryType::XGlobalHeader
                | EntryType::GNULongName
                | EntryType::GNULongLink
        );
        if meta {
            if size > MAX_META_ENTRY {
                return Err(bad(format!(
                    "a metadata entry of {size} bytes at byte {pos} (at most {MAX_META_ENTRY})"
                )));
            }
            if kind == EntryType::XHeader {
                let mut data = vec![0u8; size as usize];
                if pos.checked_add(size).is_some_and(|end| end <= len) {
                    file.read_exact_at(&mut data, pos)
                        .map_err(Error::io("read rootfs-diff.tar"))?;
                    pax_size = pax_record(&data, b"size");
                }
            }
            pos = round_up(size)
                .and_then(|s| pos.checked_add(s))
                .ok_or_else(|| bad("sizes overflow".into()))?;
            continue;
        }
        if kind == EntryType::GNUSparse {
            // isextended: byte 482 of the GNU header, byte 504 of each extended block.
            let mut extended = block[482] != 0;
            let mut blocks = 0;
            while extended {
                blocks += 1;
                if blocks > MAX_EXT_BLOCKS {
                    return Err(bad(format!(
                        "a sparse map of more than {MAX_EXT_BLOCKS} extended blocks"
                    )));
                }
                if !read(&mut block, pos)? {
                    return Ok(());
                }
                extended = block[504] != 0;
                pos += 512;
            }
        }
        let stored = pax_size.take().unwrap_or(size);
        pos = round_up(stored)
            .and_then(|s| pos.checked_add(s))
            .ok_or_else(|| bad("sizes overflow".into()))?;
    }
}

/// The value of `key` among pax records (`"<len> key=value\n"`), as a number.
fn pax_record(data: &[u8], key: &[u8]) -> Option<u64> {
    let mut rest = data;
    while !rest.is_empty() {
        let space = rest.iter().position(|b| *b == b' ')?;
        let len: usize = std::str::from_utf8(&rest[..space]).ok()?.parse().ok()?;
        if len <= space || len > rest.len() {
            return None;
        }
        let record = &rest[space + 1..len];
        let record = record.strip_suffix(b"\n").unwrap_or(record);
        if let Some(value) = record.strip_prefix(key).and_then(|r| r.strip_prefix(b"=")) {
            return std::str::from_utf8(value).ok()?.parse().ok();
        }
        rest = &rest[len..];
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn archive(entries: &[(EntryType, &str, u64, &[u8])]) -> File {
        let mut f = tempfile::tempfile().unwrap();
        for (kind, name, size, data) in entries {
            let mut h = Header::new_gnu();
            h.set_entry_type(*kind);
            h.set_path(name).unwrap();
            h.set_size(*size);
            h.set_cksum();
            f.write_all(h.as_bytes()).unwrap();
            f.write_all(data).unwrap();
            let pad = (512 - data.len() % 512) % 512;
            f.write_all(&vec![0u8; pad]).unwrap();
        }
        f.write_all(&[0u8; 1024]).unwrap();
        f
    }

    #[test]
    fn ordinary_archives_pass() {
        let f = archive(&[
            (EntryType::Regular, "a", 3, b"abc"),
            (EntryType::XHeader, "pax", 12, b"12 size=700\n"),
            (EntryType::Regular, "b", 0, &[0u8; 700]),
            (EntryType::Directory, "d", 0, b""),
        ]);
        check_archive(&f).unwrap();
    }

    #[test]
    fn a_huge_metadata_entry_is_refused_before_it_is_read() {
        // The header claims 8 GiB of long name: nothing of it is read.
        let f = archive(&[(EntryType::GNULongName, "././@LongLink", 8 << 30, b"")]);
        let e = check_archive(&f).unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
        assert!(e.to_string().contains("metadata entry"), "{e}");
    }

    #[test]
    fn an_endless_sparse_map_is_refused() {
        let mut f = tempfile::tempfile().unwrap();
        let mut h = Header::new_gnu();
        h.set_entry_type(EntryType::GNUSparse);
        h.set_path("s").unwrap();
        h.set_size(0);
        let mut bytes = *h.as_bytes();
        bytes[482] = 1;
        let h = Header::from_byte_slice(&bytes);
        let mut h = h.clone();
        h.set_cksum();
        f.write_all(h.as_bytes()).unwrap();
        let mut ext = [0u8; 512];
        ext[504] = 1;
        for _ in 0..(MAX_EXT_BLOCKS + 2) {
            f.write_all(&ext).unwrap();
        }
        let e = check_archive(&f).unwrap_err();
        assert!(e.to_string().contains("extended blocks"), "{e}");
    }

    #[test]
    fn pax_records_are_parsed() {
        assert_eq!(pax_record(b"12 size=700\n", b"size"), Some(700));
        assert_eq!(pax_record(b"8 a=bcd\n12 size=701\n", b"size"), Some(701));
        assert_eq!(pax_record(b"99 size=1\n", b"size"), None);
        assert_eq!(pax_record(b"garbage", b"size"), None);
    }

    #[test]
    fn diff_files_must_be_regular_files() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        assert!(matches!(
            open_regular(&fifo),
            Err(Error::InvalidArgument(_))
        ));
        let link = dir.path().join("link");
        std::os::unix::fs::symlink("/etc/hostname", &link).unwrap();
        assert!(matches!(
            open_regular(&link),
            Err(Error::InvalidArgument(_))
        ));
        assert!(open_regular(&dir.path().join("missing")).unwrap().is_none());
    }
}
