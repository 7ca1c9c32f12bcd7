//! Large files in `rootfs-diff.tar` with their data on a 4 KiB boundary of the archive.
//!
//! A tar entry's data follows its 512-byte header, so it lands wherever the entries before it
//! ended. For a large file the capture pads the entry's pax header (a `comment` record, which
//! every reader ignores) until the data starts on a 4 KiB boundary, and copies the data with
//! `copy_file_range`. The archive stays an ordinary tar. What the boundary buys: on the reflink
//! path the archive is written from the clone store after the thaw, and on the same file system
//! (xfs, btrfs) `copy_file_range` then clones the store's extents into the archive instead of
//! copying them. Elsewhere it copies in the kernel, without passing the data through a buffer.
//!
//! The padding costs at most 4.5 KiB per file of at least [`ALIGN_MIN`] (under 0.5%).
//!
//! The apply clones out of the archive only what is already on disk: on the rootfs's file system,
//! `copy_file_range` would clone an aligned file too, but containerd has just written the
//! archive, and a clone makes the file system write those dirty pages to disk first, inside
//! Create. On a slow disk that is far slower than a copy into the page cache; such a file is
//! copied (see `writers::Copier`).

use std::{
    fs::File,
    io::{self, BufWriter, Seek, SeekFrom, Write},
    path::Path,
};

use tar::{Builder, Header, HeaderMode};

use super::{copy, precopy::Pax};

/// Files this large or larger get aligned data.
pub(super) const ALIGN_MIN: u64 = 1 << 20;
/// The boundary: the block size of the file systems that clone extents (a larger one is rare,
/// and then only the clone is lost, not the copy).
pub(super) const BLOCK: u64 = 4096;

/// The bytes of an entry before its data (pax header, GNU long name, header), with the pax header
/// padded so that, written at `pos` of the archive, the data starts on a [`BLOCK`] boundary.
/// `None` if no padding gets there (never seen; the entry is then written as any other).
pub(super) fn prelude(
    pos: u64,
    header: &Header,
    path: &Path,
    pax: Option<&Pax>,
) -> io::Result<Option<Vec<u8>>> {
    // Each added byte of the comment adds one to the pax data, so the gap closes in a step or
    // two; a record length that gains a digit can push it a block further.
    let mut pad = 0usize;
    for _ in 0..8 {
        let bytes = unpadded(header, path, pax, pad)?;
        let gap = (BLOCK - (pos + bytes.len() as u64) % BLOCK) % BLOCK;
        if gap == 0 {
            return Ok(Some(bytes));
        }
        pad += gap as usize;
    }
    Ok(None)
}

/// The entry's header bytes with a `comment` of `pad` bytes (none at 0).
fn unpadded(header: &Header, path: &Path, pax: Option<&Pax>, pad: usize) -> io::Result<Vec<u8>> {
    let mut b = Builder::new(Vec::new());
    b.mode(HeaderMode::Complete);
    b.follow_symlinks(false);
    let filler = vec![b'0'; pad];
    let mut records: Vec<(&str, &[u8])> = pax
        .into_iter()
        .flatten()
        .map(|(k, v)| (k.as_str(), v.as_slice()))
        .collect();
    if pad > 0 {
        records.push(("comment", &filler));
    }
    if !records.is_empty() {
        b.append_pax_extensions(records)?;
    }
    let mut h = header.clone();
    b.append_data(&mut h, path, io::empty())?;
    let mut bytes = b.into_inner()?;
    // into_inner ends the archive: two zero blocks that are not the entry's.
    bytes.truncate(bytes.len().saturating_sub(1024));
    Ok(bytes)
}

/// Writes an entry whose data is `size` bytes taken from `pieces` (file, offset, length, in
/// order; a piece shorter than its length leaves zeros), after `prelude`; the data goes straight
/// from file to file.
pub(super) fn append(
    w: &mut BufWriter<File>,
    prelude: &[u8],
    pieces: &[(&File, u64, u64)],
    size: u64,
) -> io::Result<()> {
    w.write_all(prelude)?;
    w.flush()?;
    let start = w.stream_position()?;
    let out = w.get_ref();
    let mut at = start;
    for &(src, off, len) in pieces {
        copy::copy_exact(src, off, out, at, len)?;
        at += len;
    }
    if at < start + size {
        copy::zeros(out, at, start + size - at)?;
    }
    let end = start + size;
    w.get_mut().seek(SeekFrom::Start(end))?;
    let pad = (512 - end % 512) % 512;
    w.write_all(&[0u8; 512][..pad as usize])
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    /// Entries of every shape (short and long names, with and without xattrs) written at every
    /// 512-byte position of a block: the data starts on the boundary and reads back whole.
    #[test]
    fn data_lands_on_the_boundary_and_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let src_path = dir.path().join("src");
        let data: Vec<u8> = (0..(ALIGN_MIN + 777)).map(|i| (i % 251) as u8).collect();
        std::fs::write(&src_path, &data).unwrap();
        let src = File::open(&src_path).unwrap();
        let long = "d/".repeat(90) + "big";
        let xattrs: Pax = vec![("SCHILY.xattr.user.k".into(), vec![b'v'; 300])];
        for lead in 0..8u64 {
            for (name, pax) in [
                ("big", None),
                (long.as_str(), None),
                ("big", Some(&xattrs)),
                (long.as_str(), Some(&xattrs)),
            ] {
                let tar_path = dir.path().join("a.tar");
                let mut w = BufWriter::new(File::create(&tar_path).unwrap());
                // `lead` empty entries first, to start at every 512-byte offset of a block.
                let mut b = Builder::new(w);
                for i in 0..lead {
                    let mut h = Header::new_gnu();
                    h.set_size(0);
                    h.set_mode(0o644);
                    b.append_data(&mut h, format!("e{i}"), io::empty()).unwrap();
                }
                w = b.into_inner().unwrap();
                // into_inner ended the archive: go back over its end.
                let pos = w.stream_position().unwrap() - 1024;
                w.seek(SeekFrom::Start(pos)).unwrap();
                let mut h = Header::new_gnu();
                h.set_size(data.len() as u64);
                h.set_mode(0o600);
                let pre = prelude(pos, &h, Path::new(name), pax).unwrap().unwrap();
                assert_eq!((pos + pre.len() as u64) % BLOCK, 0, "lead {lead} {name}");
                append(
                    &mut w,
                    &pre,
                    &[(&src, 0, data.len() as u64)],
                    data.len() as u64,
                )
                .unwrap();
                w.write_all(&[0u8; 1024]).unwrap();
                w.flush().unwrap();
                drop(w);
                let mut a = tar::Archive::new(File::open(&tar_path).unwrap());
                let mut found = false;
                for e in a.entries().unwrap() {
                    let mut e = e.unwrap();
                    if e.path_bytes().as_ref() != name.as_bytes() {
                        continue;
                    }
                    assert_eq!(e.raw_file_position() % BLOCK, 0);
                    let mut got = Vec::new();
                    e.read_to_end(&mut got).unwrap();
                    assert!(got == data, "lead {lead} {name}: data differs");
                    let keys: Vec<String> = e
                        .pax_extensions()
                        .unwrap()
                        .into_iter()
                        .flatten()
                        .map(|x| x.unwrap().key().unwrap().to_string())
                        .collect();
                    assert_eq!(keys.contains(&"SCHILY.xattr.user.k".into()), pax.is_some());
                    found = true;
                }
                assert!(found, "lead {lead} {name}: entry missing");
                // GNU tar reads it too (the padding is a pax record it ignores).
                let x = dir.path().join(format!("x{lead}"));
                let _ = std::fs::remove_dir_all(&x);
                std::fs::create_dir(&x).unwrap();
                let out = std::process::Command::new("tar")
                    .arg("-xf")
                    .arg(&tar_path)
                    .arg("-C")
                    .arg(&x)
                    .output()
                    .expect("GNU tar");
                assert!(
                    out.status.success(),
                    "{}",
                    String::from_utf8_lossy(&out.stderr)
                );
                assert!(
                    std::fs::read(x.join(name)).unwrap() == data,
                    "GNU tar: {name}"
                );
            }
        }
    }
}
