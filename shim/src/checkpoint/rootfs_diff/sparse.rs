//! GNU sparse entries (old GNU format, type 'S'): a file whose holes are not
//! stored. The header holds up to 4 (offset, length) data segments and the
//! real size; more segments follow in extended blocks of 21 each. The data
//! of the segments follows, back to back, padded to 512 bytes at the end.

use std::{
    fs::File,
    io::{self, Write},
    os::{fd::AsRawFd, unix::fs::FileExt},
};

use tar::{EntryType, GnuExtSparseHeader, Header};

const BLOCK: u64 = 512;
const IN_HEADER: usize = 4;
const PER_EXT: usize = 21;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub offset: u64,
    pub len: u64,
}

/// The data segments of `file` (of `size` bytes), found with SEEK_DATA and
/// SEEK_HOLE, widened to 512-byte boundaries (the tar readers want every
/// segment but the last to be a multiple of 512 long) and merged.
pub fn data_segments(file: &File, size: u64) -> io::Result<Vec<Segment>> {
    let fd = file.as_raw_fd();
    let mut out: Vec<Segment> = Vec::new();
    let mut pos: u64 = 0;
    while pos < size {
        // SAFETY: lseek on an open descriptor.
        let data = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // only a hole is left
            }
            return Err(e);
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(io::Error::last_os_error());
        }
        let (data, hole) = (data as u64, (hole as u64).min(size));
        if hole <= data {
            break;
        }
        let start = data / BLOCK * BLOCK;
        let end = hole.div_ceil(BLOCK).saturating_mul(BLOCK).min(size);
        match out.last_mut() {
            Some(last) if start <= last.offset + last.len => {
                last.len = end.max(last.offset + last.len) - last.offset;
            }
            _ => out.push(Segment {
                offset: start,
                len: end - start,
            }),
        }
        pos = hole;
    }
    Ok(out)
}

/// Writes a file as a GNU sparse entry named `name` (raw bytes) into `w`,
/// with `header` already filled from its metadata; its bytes are read from
/// `src`. Returns the data bytes stored.
pub fn write_entry<W: Write>(
    w: &mut W,
    mut header: Header,
    name: &[u8],
    src: &super::capture::Source<'_>,
    size: u64,
    segments: &[Segment],
) -> io::Result<u64> {
    let stored: u64 = segments.iter().map(|s| s.len).sum();
    // The map ends at the real size: a last, empty segment there when the
    // file ends in a hole (GNU tar does the same; the tar crate requires it).
    let mut map = segments.to_vec();
    if map.last().map(|s| s.offset + s.len) != Some(size) {
        map.push(Segment {
            offset: size,
            len: 0,
        });
    }
    if name.len() > 100 {
        write_longname(w, name)?;
    }
    header.set_entry_type(EntryType::GNUSparse);
    header.set_size(stored);
    {
        let bytes = header.as_mut_bytes();
        bytes[..100].fill(0);
        let n = name.len().min(100);
        bytes[..n].copy_from_slice(&name[..n]);
    }
    let gnu = header
        .as_gnu_mut()
        .ok_or_else(|| io::Error::other("sparse entry needs a GNU header"))?;
    for (slot, seg) in gnu.sparse.iter_mut().zip(map.iter()) {
        slot.set_offset(seg.offset);
        slot.set_length(seg.len);
    }
    gnu.set_real_size(size);
    gnu.set_is_extended(map.len() > IN_HEADER);
    header.set_cksum();
    w.write_all(header.as_bytes())?;
    let rest: Vec<&[Segment]> = map
        .get(IN_HEADER..)
        .unwrap_or(&[])
        .chunks(PER_EXT)
        .collect();
    for (i, chunk) in rest.iter().enumerate() {
        let mut ext = GnuExtSparseHeader::new();
        for (slot, seg) in ext.sparse.iter_mut().zip(chunk.iter()) {
            slot.set_offset(seg.offset);
            slot.set_length(seg.len);
        }
        ext.set_is_extended(i + 1 < rest.len());
        w.write_all(ext.as_bytes())?;
    }
    let mut buf = vec![0u8; 1 << 20];
    for seg in segments {
        let mut off = seg.offset;
        let mut left = seg.len;
        while left > 0 {
            let want = left.min(buf.len() as u64) as usize;
            let n = src.read_at(&mut buf[..want], off)?;
            if n == 0 {
                // The file shrank while being read: keep the archive
                // consistent with its header.
                buf[..want].fill(0);
                w.write_all(&buf[..want])?;
                off += want as u64;
                left -= want as u64;
                continue;
            }
            w.write_all(&buf[..n])?;
            off += n as u64;
            left -= n as u64;
        }
    }
    pad(w, stored)?;
    Ok(stored)
}

/// A GNU long name entry ('L', "././@LongLink") for names over 100 bytes.
fn write_longname<W: Write>(w: &mut W, name: &[u8]) -> io::Result<()> {
    let mut h = Header::new_gnu();
    {
        let bytes = h.as_mut_bytes();
        let link = b"././@LongLink";
        bytes[..link.len()].copy_from_slice(link);
    }
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_entry_type(EntryType::GNULongName);
    let len = name.len() as u64 + 1;
    h.set_size(len);
    h.set_cksum();
    w.write_all(h.as_bytes())?;
    w.write_all(name)?;
    w.write_all(&[0])?;
    pad(w, len)
}

fn pad<W: Write>(w: &mut W, len: u64) -> io::Result<()> {
    let rem = (len % BLOCK) as usize;
    if rem != 0 {
        w.write_all(&[0u8; BLOCK as usize][..BLOCK as usize - rem])?;
    }
    Ok(())
}

/// A sparse entry's map, read back from the archive.
#[derive(Debug)]
pub struct Map {
    pub segments: Vec<Segment>,
    pub real_size: u64,
    /// Where the segments' data starts in the archive.
    pub data_start: u64,
}

impl Map {
    pub fn data_len(&self) -> u64 {
        self.segments.iter().map(|s| s.len).sum()
    }
}

use super::limits::MAX_EXT_BLOCKS;

/// Reads the sparse map of the entry whose header is at `header_pos`, and
/// checks it: segments in order, not overlapping, inside the real size, their
/// lengths adding up to the entry's size.
pub fn read_map(archive: &File, header_pos: u64) -> io::Result<Map> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_string());
    let mut header = Header::new_gnu();
    archive.read_exact_at(header.as_mut_bytes(), header_pos)?;
    let stored = header.entry_size()?;
    let gnu = header
        .as_gnu()
        .ok_or_else(|| bad("sparse entry without a GNU header"))?;
    let real_size = gnu.real_size()?;
    let mut segments = Vec::new();
    let mut end = 0u64;
    let mut add = |s: &tar::GnuSparseHeader| -> io::Result<()> {
        if s.is_empty() {
            return Ok(());
        }
        let (offset, len) = (s.offset()?, s.length()?);
        let seg_end = offset
            .checked_add(len)
            .ok_or_else(|| bad("segment past the largest size"))?;
        if offset < end {
            return Err(bad("segments out of order or overlapping"));
        }
        if seg_end > real_size {
            return Err(bad("segment past the file's size"));
        }
        end = seg_end;
        if len > 0 {
            segments.push(Segment { offset, len });
        }
        Ok(())
    };
    for s in gnu.sparse.iter() {
        add(s)?;
    }
    let mut pos = header_pos + BLOCK;
    let mut extended = gnu.is_extended();
    let mut blocks = 0;
    while extended {
        blocks += 1;
        if blocks > MAX_EXT_BLOCKS {
            return Err(bad("too many extended sparse headers"));
        }
        let mut ext = GnuExtSparseHeader::new();
        archive.read_exact_at(ext.as_mut_bytes(), pos)?;
        pos += BLOCK;
        for s in ext.sparse.iter() {
            add(s)?;
        }
        extended = ext.is_extended();
    }
    let map = Map {
        segments,
        real_size,
        data_start: pos,
    };
    if map.data_len() != stored {
        return Err(bad("segment lengths do not add up to the entry's size"));
    }
    Ok(map)
}
