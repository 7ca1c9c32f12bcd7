//! The copy loops the capture and the apply share: `copy_file_range` until the kernel refuses,
//! then a buffer.

use std::{fs::File, io, os::fd::AsRawFd, os::unix::fs::FileExt};

/// How a run of `copy_file_range` ended.
pub(super) enum Kernel {
    /// Every byte is copied.
    Done,
    /// The source ended with this much left to copy.
    Ended(u64),
    /// The kernel cannot copy between these two files (another file system, no support): this
    /// much is left to copy another way.
    Refused(u64),
}

/// Copies `len` bytes of `src` at `*off` into `out` at `*at` with copy_file_range (a clone where
/// the file system can, else a copy in the kernel), moving both offsets on by what it copied.
pub(super) fn in_kernel(
    src: &File,
    off: &mut u64,
    out: &File,
    at: &mut u64,
    len: u64,
) -> io::Result<Kernel> {
    let mut left = len;
    while left > 0 {
        let chunk = left.min(1 << 30) as usize;
        let (mut off_in, mut off_out) = (*off as libc::loff_t, *at as libc::loff_t);
        // SAFETY: both descriptors are open; the offsets are loff_ts we own.
        let n = unsafe {
            libc::copy_file_range(
                src.as_raw_fd(),
                &mut off_in,
                out.as_raw_fd(),
                &mut off_out,
                chunk,
                0,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EXDEV | libc::ENOSYS | libc::EOPNOTSUPP | libc::EINVAL) => {
                    Ok(Kernel::Refused(left))
                }
                _ => Err(e),
            };
        }
        if n == 0 {
            return Ok(Kernel::Ended(left));
        }
        (*off, *at, left) = (*off + n as u64, *at + n as u64, left - n as u64);
    }
    Ok(Kernel::Done)
}

/// Copies `len` bytes of `src` at `off` into `out` at `at`: copy_file_range (a clone where the
/// file system can, else a copy in the kernel), through a buffer where that is refused. A
/// source shorter than `len` leaves zeros.
pub(super) fn copy_exact(src: &File, off: u64, out: &File, at: u64, len: u64) -> io::Result<()> {
    let (mut off_in, mut off_out) = (off, at);
    match in_kernel(src, &mut off_in, out, &mut off_out, len)? {
        Kernel::Done => Ok(()),
        Kernel::Ended(left) => zeros(out, off_out, left),
        Kernel::Refused(left) => fill(src, off_in, out, off_out, left),
    }
}

/// Copies `left` bytes of `src` at `off` into `out` at `at` through a buffer; a source shorter
/// than that leaves zeros.
pub(super) fn fill(
    src: &File,
    mut off: u64,
    out: &File,
    mut at: u64,
    mut left: u64,
) -> io::Result<()> {
    let mut buf = vec![0u8; left.min(1 << 20) as usize];
    while left > 0 {
        let want = left.min(buf.len() as u64) as usize;
        let n = src.read_at(&mut buf[..want], off)?;
        if n == 0 {
            return zeros(out, at, left);
        }
        out.write_all_at(&buf[..n], at)?;
        (off, at, left) = (off + n as u64, at + n as u64, left - n as u64);
    }
    Ok(())
}

/// Whether the page cache holds pages of `file` in `[off, off + len)` that are not yet on disk
/// (dirty or being written back), by cachestat(2) (Linux 6.5). `None` where the kernel cannot
/// say. A clone of such a range (what `copy_file_range` does on xfs and btrfs when the offsets
/// fall on block boundaries) first makes the file system write them to disk.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
pub(super) fn unwritten(file: &File, off: u64, len: u64) -> Option<bool> {
    // The number in the generic syscall table, which x86_64 shares for calls this new.
    const SYS_CACHESTAT: libc::c_long = 451;
    #[repr(C)]
    struct Range {
        off: u64,
        len: u64,
    }
    #[repr(C)]
    #[derive(Default)]
    struct Stat {
        cache: u64,
        dirty: u64,
        writeback: u64,
        evicted: u64,
        recently_evicted: u64,
    }
    let range = Range { off, len };
    let mut stat = Stat::default();
    // SAFETY: the descriptor is open; both structs are laid out as the kernel's and outlive the
    // call.
    let r = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            file.as_raw_fd(),
            &range as *const Range,
            &mut stat as *mut Stat,
            0u32,
        )
    };
    (r == 0).then_some(stat.dirty + stat.writeback > 0)
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
pub(super) fn unwritten(_: &File, _: u64, _: u64) -> Option<bool> {
    None
}

/// Writes `left` zero bytes into `out` at `at`.
pub(super) fn zeros(out: &File, mut at: u64, mut left: u64) -> io::Result<()> {
    let buf = vec![0u8; left.min(1 << 20) as usize];
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        out.write_all_at(&buf[..n], at)?;
        (at, left) = (at + n as u64, left - n as u64);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A source shorter than the entry says leaves zeros, and the archive stays readable.
    #[test]
    fn a_short_source_leaves_zeros() {
        let dir = tempfile::tempdir().unwrap();
        let src_path = dir.path().join("src");
        std::fs::write(&src_path, vec![9u8; 5000]).unwrap();
        let src = File::open(&src_path).unwrap();
        let out = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("out"))
            .unwrap();
        copy_exact(&src, 1000, &out, 4096, 6000).unwrap();
        let mut got = vec![0u8; 10096];
        out.read_exact_at(&mut got, 0).unwrap();
        assert!(got[4096..8096].iter().all(|&b| b == 9));
        assert!(got[8096..].iter().all(|&b| b == 0));
    }
}
