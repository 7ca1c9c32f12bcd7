//! The reflink path's store: the changed files' bytes cloned (reflink) into unnamed temporary
//! files on the upper's own filesystem, so that a snapshot of the upper costs metadata, not a
//! copy of every changed byte.
//!
//! Each file's whole blocks are cloned into one store file, back to back: every clone lands at
//! the store's end, block-aligned, so that xfs has no partial block to zero past its end (a clone
//! that leaves a gap, or ends mid-block, costs it several times as much). The tail, less than a
//! block, is copied into a second file. Neither file has a name: nothing is left behind on disk,
//! whatever happens to the shim.

use super::copy;
use std::{
    fs::{self, File, OpenOptions},
    io,
    os::{
        fd::AsRawFd,
        unix::fs::{FileExt, MetadataExt, OpenOptionsExt},
    },
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

/// `FICLONERANGE`: `_IOW(0x94, 13, struct file_clone_range)`.
const FICLONERANGE: libc::c_ulong = 0x4020_940d;

#[repr(C)]
struct FileCloneRange {
    src_fd: i64,
    src_offset: u64,
    src_length: u64,
    dest_offset: u64,
}

/// Clones `len` bytes of `src` from offset 0 into `dest` at `at` (the extents are shared, and
/// copied only when one side is written).
fn clone_range(src: &File, dest: &File, at: u64, len: u64) -> io::Result<()> {
    let arg = FileCloneRange {
        src_fd: i64::from(src.as_raw_fd()),
        src_offset: 0,
        src_length: len,
        dest_offset: at,
    };
    // SAFETY: an ioctl on two open descriptors with a struct that lives through the call.
    match unsafe { libc::ioctl(dest.as_raw_fd(), FICLONERANGE, &arg) } {
        0 => Ok(()),
        _ => Err(io::Error::last_os_error()),
    }
}

/// Where one file's bytes are in the store: `head` bytes at `at` in the clones, the rest at
/// `tail_at` in the tails.
#[derive(Clone, Copy, Debug)]
pub struct Stored {
    at: u64,
    head: u64,
    tail_at: u64,
}

/// See the module doc.
pub struct Clones {
    file: File,
    tails: File,
    block: u64,
    end: u64,
    tails_end: u64,
    /// Bytes cloned, and bytes copied (tails, and whole blocks a clone was refused for).
    pub cloned: u64,
    pub copied: u64,
    /// Time spent in the clones and copies themselves.
    pub took: Duration,
}

impl Clones {
    /// Whether the upper's filesystem clones extents: a 4 KiB clone between two temporary files
    /// beside it tells. `None` where it does not (the copying path), or if the probe fails.
    pub fn probe(upper: &Path) -> Option<Clones> {
        let dir = clones_dir(upper)?;
        let tmp = || {
            OpenOptions::new()
                .read(true)
                .write(true)
                .mode(0o600)
                .custom_flags(libc::O_TMPFILE | libc::O_CLOEXEC)
                .open(&dir)
        };
        let (file, tails) = (tmp().ok()?, tmp().ok()?);
        tails.write_all_at(&[0x5a; 4096], 0).ok()?;
        clone_range(&tails, &file, 0, 4096).ok()?;
        file.set_len(0).ok()?;
        tails.set_len(0).ok()?;
        let block = file.metadata().ok()?.blksize().clamp(512, 1 << 20);
        Some(Clones {
            file,
            tails,
            block,
            end: 0,
            tails_end: 0,
            cloned: 0,
            copied: 0,
            took: Duration::ZERO,
        })
    }

    /// Flushes the upper's filesystem, the container running: a clone first writes back the
    /// source's dirty pages, and they are better written now than in the stop.
    pub fn preflush(upper: &Path) {
        if let Ok(d) = File::open(upper) {
            // SAFETY: syncfs on an open descriptor.
            unsafe { libc::syncfs(d.as_raw_fd()) };
        }
    }

    /// Takes the first `len` bytes of `src` into the store.
    pub fn take(&mut self, src: &File, len: u64) -> io::Result<Stored> {
        let t0 = Instant::now();
        let head = len / self.block * self.block;
        let at = self.end;
        if head > 0 {
            match clone_range(src, &self.file, at, head) {
                Ok(()) => self.cloned += head,
                Err(_) => {
                    copy::fill(src, 0, &self.file, at, head)?;
                    self.copied += head;
                }
            }
        }
        self.end += head;
        let tail = len - head;
        let tail_at = self.tails_end;
        if tail > 0 {
            let mut buf = vec![0u8; tail as usize];
            let mut got = 0;
            while got < buf.len() {
                match src.read_at(&mut buf[got..], head + got as u64)? {
                    0 => break, // shorter than its stat said: zeros
                    n => got += n,
                }
            }
            self.tails.write_all_at(&buf, tail_at)?;
            self.copied += tail;
        }
        self.tails_end += tail;
        self.took += t0.elapsed();
        Ok(Stored { at, head, tail_at })
    }

    /// Where a stored file of `size` bytes is: (file, offset, length) in order.
    pub fn pieces(&self, s: &Stored, size: u64) -> Vec<(&File, u64, u64)> {
        let head = s.head.min(size);
        vec![
            (&self.file, s.at, head),
            (&self.tails, s.tail_at, size - head),
        ]
    }

    /// Reads a stored file's bytes at `off` (of the file).
    pub fn read_at(&self, s: &Stored, buf: &mut [u8], off: u64) -> io::Result<usize> {
        if off < s.head {
            let n = (buf.len() as u64).min(s.head - off) as usize;
            self.file.read_at(&mut buf[..n], s.at + off)
        } else {
            self.tails.read_at(buf, s.tail_at + (off - s.head))
        }
    }
}

/// Where the temporary files go: beside the upper when that is the same filesystem (outside
/// the overlay), else in the upper itself (unnamed, they never show in the container).
fn clones_dir(upper: &Path) -> Option<PathBuf> {
    let dev = fs::metadata(upper).ok()?.dev();
    match upper.parent() {
        Some(p) if fs::metadata(p).is_ok_and(|m| m.dev() == dev) => Some(p.to_path_buf()),
        _ => Some(upper.to_path_buf()),
    }
}
