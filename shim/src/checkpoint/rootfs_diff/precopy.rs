//! The reflink path's precopy: every regular file of the upper cloned into the store while the
//! container runs, for the snapshot in the stop to take as it is when unchanged (see
//! `capture`'s module doc).
//!
//! The container changes its upper meanwhile, and may do so to mislead the walk: everything is
//! reached through directory descriptors, no symlink is ever followed, a file is opened
//! `O_NOFOLLOW|O_NONBLOCK` (a fifo swapped in does not block) and taken only if the descriptor is
//! the inode the walk saw. A file goes unrecorded (left for the stop) when anything about it is
//! unclear: changed within the second before the precopy began (a write still under way could
//! be torn), swapped, or with an xattr name the archive cannot carry.

use std::{
    collections::HashMap,
    ffi::{CStr, OsStr},
    fs::{self, File},
    io,
    os::{
        fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
        unix::{
            ffi::{OsStrExt, OsStringExt},
            fs::MetadataExt,
        },
    },
    path::{Path, PathBuf},
};

use xattr::FileExt as _;

use super::{
    clones::{Clones, Stored},
    fsat,
    sparse::{self, Segment},
};

/// PAX records (`SCHILY.xattr.<name>`, value) of an entry's xattrs.
pub(super) type Pax = Vec<(String, Vec<u8>)>;

/// What says a regular file has not changed: any write, truncation, chmod, chown or xattr change
/// moves its ctime (a write through a shared mapping too, once the page was written back: see
/// [`take_file`]).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    ctime: (i64, i64),
}

impl Stamp {
    pub(super) fn of(m: &fs::Metadata) -> Self {
        Stamp {
            dev: m.dev(),
            ino: m.ino(),
            size: m.len(),
            ctime: (m.ctime(), m.ctime_nsec()),
        }
    }
}

/// A regular file as the precopy took it.
pub(super) struct Taken {
    pub stamp: Stamp,
    pub pax: Option<Pax>,
    pub stored: Stored,
    pub segments: Option<Vec<Segment>>,
}

/// How deep the walk goes (one descriptor open per level); deeper files are left for the stop.
const MAX_DEPTH: usize = 256;

/// CLOCK_REALTIME_COARSE, the clock the kernel stamps ctimes with (a fine-grained ctime is never
/// older): (seconds, nanoseconds).
fn coarse_now() -> (i64, i64) {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_REALTIME_COARSE, &mut ts) };
    (ts.tv_sec, ts.tv_nsec)
}

/// A precopy's files by path (relative to the upper, as bytes: the stop looks each file up).
pub(super) type TakenFiles = HashMap<Vec<u8>, Taken>;

/// Clones the regular files of `upper` into `clones`; returns them by path.
pub(super) fn precopy(upper: &Path, clones: &mut Clones) -> io::Result<TakenFiles> {
    // Only a file whose ctime is older than this is taken: a write after its clone gets a ctime
    // of at least the clock now, so cannot go unseen, and a write that began a second before is
    // done (its ctime is set when it begins).
    let (s, ns) = coarse_now();
    let settled = (s - 1, ns);
    let root = File::open(upper)?;
    let mut walk = Walk {
        clones,
        settled,
        taken: HashMap::new(),
    };
    walk.dir(OwnedFd::from(root), PathBuf::new(), 0)?;
    Ok(walk.taken)
}

struct Walk<'a> {
    clones: &'a mut Clones,
    settled: (i64, i64),
    taken: TakenFiles,
}

impl Walk<'_> {
    fn dir(&mut self, dir: OwnedFd, rel: PathBuf, depth: usize) -> io::Result<()> {
        if depth > MAX_DEPTH {
            return Ok(());
        }
        for name in fsat::list_dir(&dir)? {
            // Gone, or changed into something else, since the listing: nothing to take.
            let Ok(Some(st)) = fsat::lstat_at(dir.as_fd(), &name) else {
                continue;
            };
            let child = rel.join(OsStr::from_bytes(name.to_bytes()));
            if fsat::is_dir(&st) {
                if let Ok(sub) = fsat::open_dir(dir.as_fd(), &name) {
                    self.dir(sub, child, depth + 1)?;
                }
            } else if fsat::is_reg(&st) {
                if let Some(t) = self.take_file(dir.as_fd(), &name, &st)? {
                    self.taken.insert(child.into_os_string().into_vec(), t);
                }
            }
        }
        Ok(())
    }

    /// The file `name` in `dir`, if it is the one `st` describes and has settled.
    fn take_file(
        &mut self,
        dir: BorrowedFd<'_>,
        name: &CStr,
        st: &libc::stat,
    ) -> io::Result<Option<Taken>> {
        // SAFETY: a plain openat on a valid descriptor with a NUL-terminated name.
        let fd = unsafe {
            libc::openat(
                dir.as_raw_fd(),
                name.as_ptr(),
                libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Ok(None);
        }
        // SAFETY: the kernel just gave us this descriptor.
        let file = unsafe { File::from_raw_fd(fd) };
        let meta = file.metadata()?;
        if !meta.is_file() || (meta.dev(), meta.ino()) != (st.st_dev, st.st_ino) {
            return Ok(None);
        }
        // Stamped first: whatever changes it later moves its ctime.
        let stamp = Stamp::of(&meta);
        if stamp.ctime >= self.settled {
            return Ok(None);
        }
        let Some(pax) = pax_of(&file)? else {
            return Ok(None);
        };
        // Dirty pages written back, so that a store through a shared mapping faults again (and
        // moves the ctime): the clone does this for its whole blocks, not for the tail it copies.
        // SAFETY: sync_file_range on a valid descriptor, whole file.
        unsafe {
            libc::sync_file_range(
                file.as_raw_fd(),
                0,
                0,
                libc::SYNC_FILE_RANGE_WAIT_BEFORE
                    | libc::SYNC_FILE_RANGE_WRITE
                    | libc::SYNC_FILE_RANGE_WAIT_AFTER,
            )
        };
        let size = stamp.size;
        let segments = match meta.blocks().saturating_mul(512) < size {
            true => sparse::data_segments(&file, size)
                .ok()
                .filter(|s| s.len() <= super::limits::MAX_SPARSE_SEGMENTS),
            false => None,
        };
        let stored = self.clones.take(&file, size)?;
        Ok(Some(Taken {
            stamp,
            pax: Some(pax).filter(|p| !p.is_empty()),
            stored,
            segments,
        }))
    }
}

/// The PAX key the archive keeps xattr `name` under; `None` for the overlay's own, which must
/// never be restored.
pub(super) fn pax_key(name: &str) -> Option<String> {
    match super::overlay_own_xattr(name.as_bytes()) {
        true => None,
        false => Some(format!("SCHILY.xattr.{name}")),
    }
}

/// The xattrs the archive keeps of `file` (as `capture` takes them); `None` when one has a name
/// that is not UTF-8 (the stop takes such a file, and says what it left out).
fn pax_of(file: &File) -> io::Result<Option<Pax>> {
    let mut pax = Pax::new();
    // Not every file system supports xattrs; then there are none to keep.
    let Ok(names) = file.list_xattr() else {
        return Ok(Some(pax));
    };
    for name in names {
        let Some(n) = name.to_str() else {
            return Ok(None);
        };
        let Some(key) = pax_key(n) else {
            continue;
        };
        if let Ok(Some(value)) = file.get_xattr(&name) {
            pax.push((key, value));
        }
    }
    Ok(Some(pax))
}
