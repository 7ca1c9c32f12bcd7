//! Apply: a checkpoint's file changes written into a fresh rootfs, refusing
//! anything that would land outside it.
//!
//! The rootfs is opened once; every path from the checkpoint (tar entries,
//! hard link targets, deleted.files, and the deferred directory metadata) is
//! resolved beneath that descriptor with openat2 and RESOLVE_NO_SYMLINKS, and
//! the last component is created, removed or changed with *at calls relative
//! to its parent's descriptor. Nothing is ever done by plain path, so a
//! symlink that one entry plants cannot redirect a later one.

use std::{
    ffi::{CStr, CString, OsStr},
    fs::File,
    io,
    os::{
        fd::{AsFd, BorrowedFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::{Component, Path, PathBuf},
    sync::Arc,
};

use tar::{EntryType, Header};

use super::{
    fsat, limits, sparse,
    writers::{create_replacing, Copier, Job, Target, Writers},
    DiffStats,
};
use crate::{
    checkpoint::layout::{DELETED_FILES, ROOTFS_DIFF},
    error::{Error, Result},
};

/// The prefix of an OCI whiteout: an entry `<dir>/.wh.<name>` removes `<dir>/<name>`.
pub(super) const WHITEOUT: &[u8] = b".wh.";
const OPAQUE_WHITEOUT: &[u8] = b".wh..wh..opq";

/// A path from a checkpoint, checked to stay inside the rootfs: plain names
/// only, no `..`; a leading `/` only where `rooted` (deleted.files lists
/// paths as the container sees them, tar entries are relative).
pub fn safe_relative(name: &Path, rooted: bool) -> Result<PathBuf> {
    let mut out = PathBuf::new();
    for (i, c) in name.components().enumerate() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            // deleted.files holds absolute paths inside the container.
            Component::RootDir if i == 0 && rooted => {}
            _ => {
                return Err(Error::InvalidArgument(format!(
                    "checkpoint entry {} leaves the rootfs",
                    name.display()
                )))
            }
        }
    }
    if out.as_os_str().is_empty() {
        return Err(Error::InvalidArgument(format!(
            "checkpoint entry {:?} names the rootfs itself",
            name
        )));
    }
    if out.as_os_str().as_bytes().contains(&0) {
        return Err(Error::InvalidArgument(format!(
            "checkpoint entry {:?} has a NUL byte in its name",
            name
        )));
    }
    Ok(out)
}

/// The last component of a checked relative path, as a C string.
fn last_name(rel: &Path) -> Result<CString> {
    let name = rel.file_name().unwrap_or_default();
    fsat::cstring(name).map_err(|_| bad_name(rel))
}

fn bad_name(rel: &Path) -> Error {
    Error::InvalidArgument(format!("checkpoint entry {} has a bad name", rel.display()))
}

/// The rootfs, opened once; everything is resolved beneath this descriptor.
struct Root {
    fd: OwnedFd,
    path: PathBuf,
}

/// What to do when a parent directory of an entry is missing.
#[derive(Clone, Copy, PartialEq)]
enum Missing {
    /// Create it, one component at a time.
    Create,
    /// There is nothing there to act on (deletions, hard link targets).
    Absent,
}

impl Root {
    fn open(path: &Path) -> Result<Root> {
        let c = fsat::cstring(path.as_os_str())
            .map_err(|_| Error::Internal(format!("rootfs {} has a NUL", path.display())))?;
        // SAFETY: plain open of the rootfs the caller names (trusted).
        let fd = unsafe {
            libc::open(
                c.as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(Error::io(format!("open rootfs {}", path.display()))(
                io::Error::last_os_error(),
            ));
        }
        // SAFETY: the kernel just gave us this descriptor.
        let fd = unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) };
        Ok(Root {
            fd,
            path: path.to_path_buf(),
        })
    }

    fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// The directory holding `rel`, resolved beneath the rootfs with no
    /// symlink in any component, afresh: a component an earlier entry replaced
    /// is seen as it is now (`apply_to` keeps only the last entry's parent, for
    /// the next entry in the same directory).
    /// `None` when a component is missing (or not a directory) and `missing`
    /// is `Absent`.
    fn parent(&self, rel: &Path, missing: Missing) -> Result<Option<OwnedFd>> {
        let parent = rel.parent().unwrap_or(Path::new(""));
        if parent.as_os_str().is_empty() {
            return self
                .fd
                .try_clone()
                .map(Some)
                .map_err(Error::io("duplicate rootfs descriptor"));
        }
        let c = fsat::cstring(parent.as_os_str()).map_err(|_| bad_name(rel))?;
        match fsat::open_beneath(self.fd(), &c, libc::O_RDONLY | libc::O_DIRECTORY) {
            Ok(fd) => return Ok(Some(fd)),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => return self.resolve_error(rel, parent, missing, e),
        }
        // Missing somewhere: walk (and create) one component at a time.
        let mut cur = self
            .fd
            .try_clone()
            .map_err(Error::io("duplicate rootfs descriptor"))?;
        let mut so_far = PathBuf::new();
        for comp in parent.components() {
            so_far.push(comp);
            let name = fsat::cstring(comp.as_os_str()).map_err(|_| bad_name(rel))?;
            let next = match fsat::open_dir(cur.as_fd(), &name) {
                Ok(fd) => fd,
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                    if missing == Missing::Absent {
                        return Ok(None);
                    }
                    match fsat::mkdir_at(cur.as_fd(), &name, 0o755) {
                        Ok(()) => {}
                        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
                        Err(e) => {
                            return Err(Error::io(format!(
                                "create directory {}",
                                self.show(&so_far)
                            ))(e))
                        }
                    }
                    match fsat::open_dir(cur.as_fd(), &name) {
                        Ok(fd) => fd,
                        Err(e) => return self.resolve_error(rel, &so_far, missing, e),
                    }
                }
                Err(e) => return self.resolve_error(rel, &so_far, missing, e),
            };
            cur = next;
        }
        Ok(Some(cur))
    }

    /// Why `at` (a parent of `rel`) could not be resolved, in words.
    fn resolve_error<T>(
        &self,
        rel: &Path,
        at: &Path,
        missing: Missing,
        e: io::Error,
    ) -> Result<Option<T>> {
        match e.raw_os_error() {
            // Not a directory, and no symlink on the way: nothing there to act on.
            Some(libc::ENOTDIR) if missing == Missing::Absent && !self.has_symlink(at)? => Ok(None),
            Some(libc::ELOOP | libc::EXDEV | libc::ENOTDIR) => {
                Err(Error::InvalidArgument(format!(
                    "checkpoint entry {} goes through {}, which is a symlink or not a directory: \
                     it could lead outside the rootfs",
                    rel.display(),
                    at.display()
                )))
            }
            Some(libc::ENAMETOOLONG) => Err(Error::InvalidArgument(format!(
                "checkpoint entry {} has a path too long",
                rel.display()
            ))),
            _ => Err(Error::io(format!("open {}", self.show(at)))(e)),
        }
    }

    /// Whether a component of `rel` is a symlink (a symlink opened with
    /// O_DIRECTORY|O_NOFOLLOW fails with ENOTDIR, as a file does).
    fn has_symlink(&self, rel: &Path) -> Result<bool> {
        let mut cur = self
            .fd
            .try_clone()
            .map_err(Error::io("duplicate rootfs descriptor"))?;
        for comp in rel.components() {
            let name = fsat::cstring(comp.as_os_str()).map_err(|_| bad_name(rel))?;
            match fsat::lstat_at(cur.as_fd(), &name) {
                Ok(Some(st)) if st.st_mode & libc::S_IFMT == libc::S_IFLNK => return Ok(true),
                Ok(Some(st)) if fsat::is_dir(&st) => {}
                _ => return Ok(false),
            }
            cur = match fsat::open_dir(cur.as_fd(), &name) {
                Ok(fd) => fd,
                Err(_) => return Ok(false),
            };
        }
        Ok(false)
    }

    fn show(&self, rel: &Path) -> String {
        self.path.join(rel).display().to_string()
    }
}

/// `deleted.files`, bounded, if the checkpoint has one.
fn read_deleted_files(path: &Path) -> Result<Option<Vec<u8>>> {
    use std::io::Read;
    let Some(file) = limits::open_regular(path)? else {
        return Ok(None);
    };
    let mut bytes = Vec::new();
    file.take(limits::MAX_DELETED_FILES + 1)
        .read_to_end(&mut bytes)
        .map_err(Error::io(format!("read {}", path.display())))?;
    if bytes.len() as u64 > limits::MAX_DELETED_FILES {
        return Err(Error::InvalidArgument(format!(
            "{DELETED_FILES} is larger than {} bytes",
            limits::MAX_DELETED_FILES
        )));
    }
    Ok(Some(bytes))
}

/// Applies a checkpoint's `deleted.files` then `rootfs-diff.tar` (either may
/// be missing: a checkpoint of the Go shim has neither) to `rootfs`.
pub fn apply(dir: &Path, rootfs: &Path) -> Result<DiffStats> {
    apply_to(dir, rootfs, false, false)
}

/// [`apply`] from an archive that is the apply's to use up: containerd's own unpacked copy of
/// the checkpoint (`ctrd-checkpoint*`), which the shim removes after Start and nobody reads
/// again. Its large files are copied last, from the archive's end backwards, and the archive is
/// cut short behind each piece (see [`Consumed`]).
pub fn apply_consuming(dir: &Path, rootfs: &Path) -> Result<DiffStats> {
    apply_to(dir, rootfs, false, true)
}

/// [`apply`] into a directory of the host (a volume's bind-mount source):
/// no setuid, setgid or sticky bits, and no `security.*` or `trusted.*`
/// xattrs (file capabilities among them) come from the archive.
pub fn apply_to_host_dir(dir: &Path, target: &Path) -> Result<DiffStats> {
    apply_to(dir, target, true, false)
}

fn apply_to(dir: &Path, rootfs: &Path, host: bool, consume: bool) -> Result<DiffStats> {
    let mask = if host { 0o777 } else { 0o7777 };
    let root = Root::open(rootfs)?;
    let mut stats = DiffStats::default();
    let del_path = dir.join(DELETED_FILES);
    match read_deleted_files(&del_path) {
        Ok(Some(bytes)) => {
            let list: Vec<String> = serde_json::from_slice(&bytes)
                .map_err(|e| Error::InvalidArgument(format!("{DELETED_FILES}: {e}")))?;
            for name in list {
                let rel = safe_relative(Path::new(&name), true)?;
                remove(&root, &rel)?;
                stats.deleted += 1;
            }
        }
        Ok(None) => {}
        Err(e) => return Err(e),
    }
    let tar_path = dir.join(ROOTFS_DIFF);
    // An archive that cannot be opened for writing (a read-only file system, a mode) is applied
    // as any other, and left whole.
    let (opened, consume) = match consume {
        true => match limits::open_regular_rw(&tar_path) {
            Ok(f) => (f, true),
            Err(Error::Io { .. }) => (limits::open_regular(&tar_path)?, false),
            Err(e) => return Err(e),
        },
        false => (limits::open_regular(&tar_path)?, false),
    };
    let Some(file) = opened else {
        return Ok(stats);
    };
    // What the tar reader would hold in memory whole is bounded first.
    limits::check_archive(&file)?;
    // File data is copied in the kernel straight from the archive (see
    // `Copier`): a second handle for that, and a seeking iterator that
    // skips over the data instead of reading it.
    let data = file
        .try_clone()
        .map_err(Error::io(format!("open {}", tar_path.display())))?;
    // Only headers pass through this buffer, and every entry's seek over its data empties it:
    // a large one would read (and drop) that much of each file's data again.
    let mut archive = tar::Archive::new(io::BufReader::with_capacity(16 << 10, file));
    let entries = archive
        .entries_with_seek()
        .map_err(|e| Error::InvalidArgument(format!("{ROOTFS_DIFF}: {e}")))?;
    // Directory metadata is set last (once their contents are in), by
    // resolving each directory afresh.
    let mut dirs: Vec<(PathBuf, Header, Xattrs)> = Vec::new();
    // The last entry's parent, resolved: the next entry in the same directory uses it again. No
    // entry can have changed it in between: an entry changes only its own path, and one whose
    // parent is this directory is beneath it, never it or above it (an entry elsewhere resolves
    // its own parent, and takes the place here).
    let mut last_parent: Option<(PathBuf, Arc<OwnedFd>)> = None;
    // Regular files are written on worker threads (see `writers`).
    let mut writers = Writers::start(Target {
        data,
        rootfs: rootfs.to_path_buf(),
        mask,
    });
    let target = writers.target();
    let data = &target.data;
    let mut consumed = Consumed::new(consume);
    for entry in entries {
        // Given back only once this entry's parent is resolved: an entry that goes another way
        // (a whiteout) drops it.
        let cached = last_parent.take();
        let mut entry = entry.map_err(|e| Error::InvalidArgument(format!("{ROOTFS_DIFF}: {e}")))?;
        let name = PathBuf::from(OsStr::from_bytes(&entry.path_bytes()));
        let header = entry.header().clone();
        let kind = header.entry_type();
        if kind == EntryType::XGlobalHeader {
            // A pax global header describes the archive, not a file.
            continue;
        }
        let rel = safe_relative(&name, false)?;
        // Only plain files are written by the writers, and never two at a path: anything else
        // waits until they are done, and so does a file at or beneath one being written.
        // (A whiteout is a regular file in the archive, and removes another path.)
        let base = rel.file_name().unwrap_or_default().as_bytes();
        let plain = matches!(kind, EntryType::Regular | EntryType::Continuous)
            && !base.starts_with(WHITEOUT);
        if !plain || writers.touches(&rel) {
            writers.drain()?;
        }
        if let Some(target) = base.strip_prefix(WHITEOUT) {
            whiteout(&root, &rel, target)?;
            stats.deleted += 1;
            continue;
        }
        if !matches!(
            kind,
            EntryType::Regular
                | EntryType::Continuous
                | EntryType::GNUSparse
                | EntryType::Directory
                | EntryType::Symlink
                | EntryType::Link
                | EntryType::Fifo
        ) {
            return Err(Error::InvalidArgument(format!(
                "checkpoint entry {} is {}: only regular files, directories, symlinks, \
                 hard links and fifos are restored",
                rel.display(),
                kind_in_words(kind)
            )));
        }
        let mut xattrs = xattrs_of(&mut entry, &rel)?;
        if host {
            xattrs.retain(|(k, _)| {
                let k = k.as_bytes();
                !k.starts_with(b"security.") && !k.starts_with(b"trusted.")
            });
        }
        let parent_rel = rel.parent().unwrap_or(Path::new(""));
        let parent = match cached {
            Some((p, fd)) if p == parent_rel => fd,
            _ => Arc::new(
                root.parent(&rel, Missing::Create)?
                    .ok_or_else(|| Error::Internal(format!("no parent for {}", rel.display())))?,
            ),
        };
        let pfd_arc = last_parent
            .insert((parent_rel.to_path_buf(), parent))
            .1
            .clone();
        let pfd = pfd_arc.as_fd();
        let cname = last_name(&rel)?;
        let io_err = |what: &str| Error::io(format!("{what} {}", root.show(&rel)));
        match kind {
            EntryType::Directory => {
                match fsat::lstat_at(pfd, &cname).map_err(io_err("stat"))? {
                    Some(st) if fsat::is_dir(&st) => {}
                    other => {
                        if other.is_some() {
                            fsat::remove_at(pfd, &cname).map_err(io_err("remove"))?;
                        }
                        fsat::mkdir_at(pfd, &cname, 0o755).map_err(io_err("mkdir"))?;
                    }
                }
                dirs.push((rel, header, xattrs));
            }
            EntryType::Regular | EntryType::Continuous if consumed.takes(entry.size()) => {
                let file = create_replacing(pfd, &cname, || root.show(&rel))?;
                consumed.push(Later {
                    file,
                    rel,
                    offset: entry.raw_file_position(),
                    len: entry.size(),
                    header,
                    xattrs,
                });
            }
            EntryType::Regular | EntryType::Continuous => {
                writers.write(Job {
                    parent: pfd_arc.clone(),
                    name: cname,
                    rel,
                    offset: entry.raw_file_position(),
                    len: entry.size(),
                    header,
                    xattrs,
                })?;
            }
            EntryType::GNUSparse => {
                let f = create_replacing(pfd, &cname, || root.show(&rel))?;
                stats.bytes += write_sparse(data, &entry, &f, &rel, writers.copier())?;
                finish_fd(f.as_fd(), &header, &xattrs, &rel, mask)?;
            }
            EntryType::Fifo => {
                fsat::remove_at(pfd, &cname).map_err(io_err("remove"))?;
                fsat::mkfifo_at(pfd, &cname).map_err(io_err("mkfifo"))?;
                let fd = fsat::open_nofollow(pfd, &cname).map_err(io_err("open"))?;
                finish_fd(fd.as_fd(), &header, &xattrs, &rel, mask)?;
            }
            EntryType::Symlink => {
                let target = entry.link_name_bytes().ok_or_else(|| {
                    Error::InvalidArgument(format!("symlink {} has no target", rel.display()))
                })?;
                let target = CString::new(target.into_owned()).map_err(|_| bad_name(&rel))?;
                fsat::remove_at(pfd, &cname).map_err(io_err("remove"))?;
                fsat::symlink_at(&target, pfd, &cname).map_err(io_err("symlink"))?;
                finish_symlink(pfd, &cname, &header, &xattrs, &rel)?;
            }
            EntryType::Link => {
                hard_link(&root, &entry, &rel, pfd, &cname)?;
            }
            _ => unreachable!("entry types are checked above"),
        }
        stats.entries += 1;
    }
    writers.drain()?;
    stats.bytes += writers.bytes();
    let used_up = consumed.finish(data, writers.copier(), &root, mask)?;
    stats.bytes += used_up;
    stats.used_up = used_up;
    for (rel, header, xattrs) in dirs.into_iter().rev() {
        let c = fsat::cstring(rel.as_os_str()).map_err(|_| bad_name(&rel))?;
        let fd = match fsat::open_beneath(root.fd(), &c, libc::O_RDONLY | libc::O_DIRECTORY) {
            Ok(fd) => fd,
            // Removed by a later whiteout: nothing left to set.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ELOOP | libc::EXDEV | libc::ENOTDIR)
                ) =>
            {
                return Err(Error::InvalidArgument(format!(
                    "checkpoint entry {} was redirected by a later entry: \
                     it or one of its parents is no longer a directory",
                    rel.display()
                )))
            }
            Err(e) => return Err(Error::io(format!("open {}", root.show(&rel)))(e)),
        };
        finish_fd(fd.as_fd(), &header, &xattrs, &rel, mask)?;
    }
    Ok(stats)
}

/// The large files of an archive the apply uses up, written last.
///
/// containerd unpacks the checkpoint for every Create, so when the apply begins, its copy of the
/// archive is in the page cache, dirty, beside containerd's own copy of the blob. Copying a 1 GiB
/// file from it adds another 1 GiB of dirty pages: past the kernel's dirty limits, every write
/// of the apply then waits on the disk's writeback, which is mostly writing an archive that is
/// about to be deleted. So where the archive is the apply's to use up, each large file is created
/// in its turn (every path is still resolved in archive order, and later entries see it there),
/// but its data is copied once every other entry is applied: the files from the last to the
/// first, each from its end in [`Consumed::PIECE`]s, the archive truncated behind every piece.
/// Truncating drops those pages, dirty or not, and nothing of them is ever written to disk: the
/// page cache holds about one copy of the data instead of two.
struct Consumed {
    on: bool,
    later: Vec<Later>,
}

/// A large file created in its turn, its data still in the archive.
struct Later {
    file: File,
    rel: PathBuf,
    offset: u64,
    len: u64,
    header: Header,
    xattrs: Xattrs,
}

impl Consumed {
    /// Files this large or larger wait.
    const MIN: u64 = super::aligned::ALIGN_MIN;
    /// At most this many wait (each holds its file open, and one shim can restore several
    /// containers at once); later ones are written in their turn.
    const MAX_FILES: usize = 64;
    /// Copied and cut off at a time.
    const PIECE: u64 = if cfg!(test) { 1 << 20 } else { 64 << 20 };

    fn new(on: bool) -> Self {
        Consumed {
            on,
            later: Vec::new(),
        }
    }

    /// Whether a regular file of `len` bytes waits.
    fn takes(&self, len: u64) -> bool {
        self.on && len >= Self::MIN && self.later.len() < Self::MAX_FILES
    }

    fn push(&mut self, later: Later) {
        self.later.push(later);
    }

    /// Copies every waiting file's data and sets its metadata, cutting the archive short behind
    /// each piece. Only when every other entry is written: from here on, nothing else is read
    /// from the archive. Returns the bytes written.
    fn finish(self, archive: &File, copier: &mut Copier, root: &Root, mask: u32) -> Result<u64> {
        let mut later = self.later;
        // Tar entries' data never overlap: from the last, everything past a piece's start is
        // done with once it is copied.
        later.sort_by_key(|l| std::cmp::Reverse(l.offset));
        let mut bytes = 0;
        for l in later {
            let mut end = l.len;
            while end > 0 {
                // Pieces start on multiples of PIECE from the file's start: block-aligned
                // wherever its data is, so a range already on disk can still be cloned.
                let start = (end - 1) / Self::PIECE * Self::PIECE;
                copier
                    .copy(archive, l.offset + start, &l.file, start, end - start)
                    .map_err(|e| {
                        super::writers::data_error(e, &l.rel, l.len, &root.show(&l.rel))
                    })?;
                archive
                    .set_len(l.offset + start)
                    .map_err(Error::io(format!("cut {ROOTFS_DIFF} short")))?;
                end = start;
            }
            finish_fd(l.file.as_fd(), &l.header, &l.xattrs, &l.rel, mask)?;
            bytes += l.len;
        }
        Ok(bytes)
    }
}

/// The type of a refused entry, in words.
fn kind_in_words(kind: EntryType) -> String {
    match kind {
        EntryType::Char => "a character device".into(),
        EntryType::Block => "a block device".into(),
        EntryType::XHeader => "a stray pax header".into(),
        EntryType::GNULongName | EntryType::GNULongLink => "a stray GNU long name".into(),
        other => format!("an entry of unknown type {:#04x}", other.as_byte()),
    }
}

/// Removes `rel` (a deleted.files entry), if it is there.
fn remove(root: &Root, rel: &Path) -> Result<()> {
    let Some(parent) = root.parent(rel, Missing::Absent)? else {
        return Ok(());
    };
    let name = last_name(rel)?;
    fsat::remove_at(parent.as_fd(), &name).map_err(Error::io(format!("remove {}", root.show(rel))))
}

/// An OCI whiteout `<dir>/.wh.<name>`: removes `<dir>/<name>`.
fn whiteout(root: &Root, rel: &Path, target: &[u8]) -> Result<()> {
    let base = rel.file_name().unwrap_or_default().as_bytes();
    if base == OPAQUE_WHITEOUT {
        return Err(Error::InvalidArgument(format!(
            "checkpoint entry {} is an opaque-directory whiteout, which a checkpoint does not use",
            rel.display()
        )));
    }
    if target.is_empty() || target == b"." || target == b".." {
        return Err(Error::InvalidArgument(format!(
            "checkpoint entry {} is a whiteout of no file",
            rel.display()
        )));
    }
    let victim = rel.with_file_name(OsStr::from_bytes(target));
    remove(root, &victim)
}

/// A hard link to a regular file already in the rootfs, both ends resolved
/// beneath it.
fn hard_link<R: io::Read>(
    root: &Root,
    entry: &tar::Entry<'_, R>,
    rel: &Path,
    pfd: BorrowedFd<'_>,
    cname: &CStr,
) -> Result<()> {
    let target = entry.link_name_bytes().ok_or_else(|| {
        Error::InvalidArgument(format!("hard link {} has no target", rel.display()))
    })?;
    let target = PathBuf::from(OsStr::from_bytes(&target));
    let target_rel = safe_relative(&target, false)?;
    let not_in_rootfs = || {
        Error::InvalidArgument(format!(
            "hard link {} points to {}, which is not a regular file in the rootfs",
            rel.display(),
            target.display()
        ))
    };
    let tparent = root
        .parent(&target_rel, Missing::Absent)?
        .ok_or_else(not_in_rootfs)?;
    let tname = last_name(&target_rel)?;
    let tst = fsat::lstat_at(tparent.as_fd(), &tname)
        .map_err(Error::io(format!("stat {}", root.show(&target_rel))))?
        .ok_or_else(not_in_rootfs)?;
    if !fsat::is_reg(&tst) {
        return Err(not_in_rootfs());
    }
    if let Some(st) =
        fsat::lstat_at(pfd, cname).map_err(Error::io(format!("stat {}", root.show(rel))))?
    {
        if (st.st_dev, st.st_ino) == (tst.st_dev, tst.st_ino) {
            return Ok(());
        }
        fsat::remove_at(pfd, cname).map_err(Error::io(format!("remove {}", root.show(rel))))?;
    }
    fsat::link_at(tparent.as_fd(), &tname, pfd, cname)
        .map_err(Error::io(format!("link {}", root.show(rel))))
}

/// Writes a GNU sparse entry's data segments at their offsets, then sets the
/// length: the holes stay holes. Returns the data bytes written.
fn write_sparse<R: io::Read>(
    archive: &File,
    entry: &tar::Entry<'_, R>,
    out: &File,
    rel: &Path,
    copier: &mut Copier,
) -> Result<u64> {
    let map = sparse::read_map(archive, entry.raw_header_position()).map_err(|e| {
        Error::InvalidArgument(format!(
            "{ROOTFS_DIFF}: sparse entry {}: {e}",
            rel.display()
        ))
    })?;
    let mut at = map.data_start;
    for seg in &map.segments {
        copier
            .copy(archive, at, out, seg.offset, seg.len)
            .map_err(|e| match e.kind() {
                io::ErrorKind::UnexpectedEof => Error::InvalidArgument(format!(
                    "{ROOTFS_DIFF}: sparse entry {} claims data the archive does not hold",
                    rel.display()
                )),
                _ => Error::io(format!("write {}", rel.display()))(e),
            })?;
        at += seg.len;
    }
    fsat::ftruncate(out.as_fd(), map.real_size)
        .map_err(Error::io(format!("set length of {}", rel.display())))?;
    Ok(map.data_len())
}

/// Extended attributes of an entry (pax `SCHILY.xattr.*`), without the
/// overlay's own, which must never be restored.
pub(super) type Xattrs = Vec<(CString, Vec<u8>)>;

fn xattrs_of<R: io::Read>(entry: &mut tar::Entry<'_, R>, rel: &Path) -> Result<Xattrs> {
    let mut out = Vec::new();
    let exts = entry
        .pax_extensions()
        .map_err(|e| Error::InvalidArgument(format!("{ROOTFS_DIFF}: {}: {e}", rel.display())))?;
    let Some(exts) = exts else {
        return Ok(out);
    };
    for ext in exts {
        let ext = ext.map_err(|e| {
            Error::InvalidArgument(format!("{ROOTFS_DIFF}: {}: {e}", rel.display()))
        })?;
        let Some(name) = ext.key_bytes().strip_prefix(b"SCHILY.xattr.") else {
            continue;
        };
        if super::overlay_own_xattr(name) {
            continue;
        }
        let name = CString::new(name).map_err(|_| {
            Error::InvalidArgument(format!("{}: xattr name with a NUL", rel.display()))
        })?;
        out.push((name, ext.value_bytes().to_vec()));
    }
    Ok(out)
}

fn ids(header: &Header) -> (u32, u32) {
    // A field that does not parse leaves the owner as it is (-1).
    let uid = header.uid().ok().and_then(|u| u32::try_from(u).ok());
    let gid = header.gid().ok().and_then(|g| u32::try_from(g).ok());
    (uid.unwrap_or(u32::MAX), gid.unwrap_or(u32::MAX))
}

fn mtime(header: &Header) -> Option<i64> {
    header.mtime().ok().map(|m| m as i64)
}

/// Owner, then mode, then xattrs, then times, all through a descriptor of
/// the object itself: the kernel clears setuid/setgid and file capabilities
/// on chown, so the mode and xattrs come after it.
pub(super) fn finish_fd(
    fd: BorrowedFd<'_>,
    header: &Header,
    xattrs: &Xattrs,
    rel: &Path,
    mask: u32,
) -> Result<()> {
    let (uid, gid) = ids(header);
    fsat::fchown(fd, uid, gid).map_err(Error::io(format!("chown {}", rel.display())))?;
    let mode = header.mode().unwrap_or(0o644) & mask;
    fsat::fchmod(fd, mode).map_err(Error::io(format!("chmod {}", rel.display())))?;
    for (k, v) in xattrs {
        fsat::fsetxattr(fd, k, v).map_err(Error::io(format!(
            "set xattr {} on {}",
            k.to_string_lossy(),
            rel.display()
        )))?;
    }
    if let Some(t) = mtime(header) {
        fsat::set_mtime(fd, t).map_err(Error::io(format!("set times of {}", rel.display())))?;
    }
    Ok(())
}

/// A symlink's owner, xattrs and times, relative to its directory and never
/// followed.
fn finish_symlink(
    dir: BorrowedFd<'_>,
    name: &CStr,
    header: &Header,
    xattrs: &Xattrs,
    rel: &Path,
) -> Result<()> {
    let (uid, gid) = ids(header);
    fsat::chown_at(dir, name, uid, gid).map_err(Error::io(format!("chown {}", rel.display())))?;
    for (k, v) in xattrs {
        fsat::lsetxattr_at(dir, name, k, v).map_err(Error::io(format!(
            "set xattr {} on {}",
            k.to_string_lossy(),
            rel.display()
        )))?;
    }
    if let Some(t) = mtime(header) {
        fsat::set_mtime_at(dir, name, t)
            .map_err(Error::io(format!("set times of {}", rel.display())))?;
    }
    Ok(())
}
