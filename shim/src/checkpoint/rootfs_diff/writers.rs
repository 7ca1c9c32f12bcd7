//! The regular files of an apply, written on worker threads while the archive is read on.
//!
//! Creating a file in an overlay and copying its data is kernel work, one core at a time: with
//! 10,000 files most of an apply is spent there. The reader (`apply_to`) resolves each file's
//! parent beneath the rootfs as before and hands the rest (create, data, owner, mode, xattrs,
//! times) to a writer. Only regular files go to the writers, and only while nothing else could
//! see them half-done: the reader waits for every writer ([`Writers::drain`]) before any other
//! kind of entry (a directory, link, symlink, fifo, whiteout, sparse file), before an entry whose
//! path or any parent of it is a file still being written, and at the end. So every entry sees
//! the rootfs exactly as a sequential apply would have left it, and the first error is the
//! apply's error.

use std::{
    collections::HashSet,
    ffi::{CStr, CString},
    fs::File,
    io,
    os::fd::{AsFd, BorrowedFd, OwnedFd},
    path::{Path, PathBuf},
    sync::{mpsc, Arc, Condvar, Mutex},
    thread::JoinHandle,
};

use tar::Header;

use super::{
    aligned,
    apply::{finish_fd, Xattrs},
    copy::{self, Kernel},
    fsat,
};
use crate::{
    checkpoint::layout::ROOTFS_DIFF,
    error::{Error, Result},
};

/// One regular file: `name` in `parent`, `len` bytes of the archive at `offset`.
pub(super) struct Job {
    pub parent: Arc<OwnedFd>,
    pub name: CString,
    pub rel: PathBuf,
    pub offset: u64,
    pub len: u64,
    pub header: Header,
    pub xattrs: Xattrs,
}

/// What every writer shares: the archive, the rootfs's path (for messages), the mode mask.
pub(super) struct Target {
    pub data: File,
    pub rootfs: PathBuf,
    pub mask: u32,
}

#[derive(Default)]
struct State {
    outstanding: usize,
    bytes: u64,
    error: Option<Error>,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    done: Condvar,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

pub(super) struct Writers {
    tx: Option<mpsc::SyncSender<Job>>,
    threads: Vec<JoinHandle<()>>,
    shared: Arc<Shared>,
    target: Arc<Target>,
    /// Files handed out since the last drain, and the directories above them.
    in_flight: HashSet<PathBuf>,
    dirs_in_flight: HashSet<PathBuf>,
    /// With no writer thread (one core, or none could start) the reader writes itself.
    inline: Copier,
}

impl Writers {
    /// One writer a core, at most four; none on one core.
    pub fn start(target: Target) -> Writers {
        let n = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .min(4);
        let shared = Arc::new(Shared::default());
        let target = Arc::new(target);
        let mut writers = Writers {
            tx: None,
            threads: Vec::new(),
            shared,
            target,
            in_flight: HashSet::new(),
            dirs_in_flight: HashSet::new(),
            inline: Copier::default(),
        };
        if n < 2 {
            return writers;
        }
        let (tx, rx) = mpsc::sync_channel::<Job>(64);
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..n {
            let (rx, shared, target) = (rx.clone(), writers.shared.clone(), writers.target.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("apply-{i}"))
                .spawn(move || work(&rx, &shared, &target));
            match spawned {
                Ok(t) => writers.threads.push(t),
                Err(e) => log::warn!("apply: writer thread {i}: {e}"),
            }
        }
        if !writers.threads.is_empty() {
            writers.tx = Some(tx);
        }
        writers
    }

    /// Whether `rel` is, holds or lies beneath a file a writer may still be writing.
    pub fn touches(&self, rel: &Path) -> bool {
        !self.in_flight.is_empty()
            && (self.dirs_in_flight.contains(rel)
                || rel.ancestors().any(|p| self.in_flight.contains(p)))
    }

    /// Writes `job`'s file, on a writer when there is one.
    pub fn write(&mut self, job: Job) -> Result<()> {
        if self.tx.is_none() {
            let bytes = write(&job, &self.target, &mut self.inline)?;
            self.shared.lock().bytes += bytes;
            return Ok(());
        }
        // A writer failed: the apply fails with its error, once the others are done.
        if self.shared.lock().error.is_some() {
            self.drain()?;
        }
        self.shared.lock().outstanding += 1;
        for dir in job.rel.ancestors().skip(1) {
            if dir.as_os_str().is_empty() || !self.dirs_in_flight.insert(dir.to_path_buf()) {
                break;
            }
        }
        self.in_flight.insert(job.rel.clone());
        let sent = self.tx.as_ref().is_some_and(|tx| tx.send(job).is_ok());
        if !sent {
            // Every writer is gone, which only a panic does.
            self.shared.lock().outstanding -= 1;
            return Err(Error::Internal("apply: the writer threads are gone".into()));
        }
        Ok(())
    }

    /// Waits until every file handed out is written; the first error of a writer, if any.
    pub fn drain(&mut self) -> Result<()> {
        let mut s = self.shared.lock();
        while s.outstanding > 0 {
            s = self.shared.done.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        self.in_flight.clear();
        self.dirs_in_flight.clear();
        match s.error.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Bytes of file data written so far (complete after a drain).
    pub fn bytes(&self) -> u64 {
        self.shared.lock().bytes
    }

    /// The archive and the rootfs the writers write from and into.
    pub fn target(&self) -> Arc<Target> {
        self.target.clone()
    }

    /// The reader's own copier, for what it writes itself (sparse files).
    pub fn copier(&mut self) -> &mut Copier {
        &mut self.inline
    }
}

impl Drop for Writers {
    fn drop(&mut self) {
        // An apply that failed elsewhere: what is still queued is not written.
        {
            let mut s = self.shared.lock();
            if s.error.is_none() && s.outstanding > 0 {
                s.error = Some(Error::Internal("apply stopped".into()));
            }
        }
        // Closing the channel ends the writers once the queue is empty.
        self.tx = None;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn work(rx: &Mutex<mpsc::Receiver<Job>>, shared: &Shared, target: &Target) {
    let mut copier = Copier::default();
    loop {
        let job = match rx.lock().unwrap_or_else(|p| p.into_inner()).recv() {
            Ok(job) => job,
            Err(_) => return,
        };
        // After a failure the rest is not written: the apply fails anyway.
        let failed = shared.lock().error.is_some();
        let result = if failed {
            Ok(0)
        } else {
            // A panic must not leave the reader waiting for this file forever.
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                write(&job, target, &mut copier)
            }))
            .unwrap_or_else(|_| {
                Err(Error::Internal(format!(
                    "apply: writing {} panicked",
                    job.rel.display()
                )))
            })
        };
        let mut s = shared.lock();
        match result {
            Ok(bytes) => s.bytes += bytes,
            Err(e) => {
                if s.error.is_none() {
                    s.error = Some(e);
                }
            }
        }
        s.outstanding -= 1;
        if s.outstanding == 0 {
            shared.done.notify_all();
        }
    }
}

/// Creates the file (whatever is in the way is removed first), copies its data, then sets its
/// owner, mode, xattrs and times. Returns the bytes written.
fn write(job: &Job, target: &Target, copier: &mut Copier) -> Result<u64> {
    let show = || target.rootfs.join(&job.rel).display().to_string();
    let f = create_replacing(job.parent.as_fd(), &job.name, show)?;
    copier
        .copy(&target.data, job.offset, &f, 0, job.len)
        .map_err(|e| data_error(e, &job.rel, job.len, &show()))?;
    finish_fd(f.as_fd(), &job.header, &job.xattrs, &job.rel, target.mask)?;
    Ok(job.len)
}

/// Creates `name` in `dir`, at once where nothing is in the way (the common case); whatever is
/// there (even a directory tree) is removed first otherwise. `show` names it in errors.
pub(super) fn create_replacing(
    dir: BorrowedFd<'_>,
    name: &CStr,
    show: impl Fn() -> String,
) -> Result<File> {
    let created = match fsat::create_at(dir, name) {
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
            fsat::remove_at(dir, name).map_err(|e| Error::io(format!("remove {}", show()))(e))?;
            fsat::create_at(dir, name)
        }
        other => other,
    };
    let fd = created.map_err(|e| Error::io(format!("create {}", show()))(e))?;
    Ok(File::from(fd))
}

pub(super) fn data_error(e: io::Error, rel: &Path, len: u64, shown: &str) -> Error {
    match e.kind() {
        io::ErrorKind::UnexpectedEof => Error::InvalidArgument(format!(
            "{ROOTFS_DIFF}: {} claims {len} bytes the archive does not hold",
            rel.display()
        )),
        _ => Error::io(format!("write {shown}"))(e),
    }
}

/// Whether `copy_file_range` of `len` bytes at `offset` of the archive may make the file system
/// write the archive's dirty pages to disk first: where it clones (xfs, btrfs, with the rootfs on
/// the same file system), it can only from a block boundary, and a clone needs the source on
/// disk. containerd has just written the archive, so inside Create that write would cost the
/// disk's speed, not the page cache's: such a range is copied with sendfile instead, which never
/// clones. A range already on disk is cloned, which costs nothing (a checkpoint directory the
/// caller keeps, restored again). Where the kernel cannot say (before Linux 6.5), as before.
fn flushes(archive: &File, offset: u64, len: u64) -> bool {
    offset.is_multiple_of(aligned::BLOCK)
        && len >= aligned::BLOCK
        && copy::unwritten(archive, offset, len).unwrap_or(false)
}

/// Copies file data from the archive: with copy_file_range, so that the data never passes
/// through user space; where the file systems cannot do that (an overlay rootfs and the
/// archive's file system), with sendfile, which still copies in the kernel, page cache to page
/// cache (twice as fast as through a buffer here: 2.1 against 1.0 GB/s into an overlay); and
/// through one buffer if neither works. Every later file goes the way that worked at once.
#[derive(Default)]
pub(super) struct Copier {
    no_cfr: bool,
    no_sendfile: bool,
    buf: Vec<u8>,
}

impl Copier {
    /// Copies `len` bytes at `offset` of the archive into `out` at `out_offset`.
    pub(super) fn copy(
        &mut self,
        archive: &File,
        offset: u64,
        out: &File,
        out_offset: u64,
        len: u64,
    ) -> io::Result<()> {
        let (mut off, mut off_out, mut left) = (offset, out_offset, len);
        if !self.no_cfr && !flushes(archive, offset, len) {
            match copy::in_kernel(archive, &mut off, out, &mut off_out, len)? {
                Kernel::Done => left = 0,
                Kernel::Ended(_) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Kernel::Refused(l) => {
                    self.no_cfr = true;
                    left = l;
                }
            }
        }
        if left > 0 && !self.no_sendfile {
            let mut off_sf = off as libc::loff_t;
            left = self.sendfile(archive, &mut off_sf, out, off_out, left)?;
            (off, off_out) = (off_sf as u64, out_offset + len - left);
        }
        self.buffered(archive, off, out, off_out, left)
    }

    /// sendfile writes at `out`'s file position: it is set to `out_offset` first. Returns what
    /// is left to copy (all of it when sendfile cannot write to `out`'s file system).
    fn sendfile(
        &mut self,
        archive: &File,
        off: &mut libc::loff_t,
        out: &File,
        out_offset: u64,
        mut left: u64,
    ) -> io::Result<u64> {
        use std::os::fd::AsRawFd;
        // SAFETY: lseek on an open descriptor.
        if unsafe { libc::lseek(out.as_raw_fd(), out_offset as libc::off_t, libc::SEEK_SET) } < 0 {
            return Err(io::Error::last_os_error());
        }
        while left > 0 {
            // sendfile moves at most 0x7ffff000 bytes a call.
            let chunk = left.min(1 << 30) as usize;
            // SAFETY: both descriptors are open; the offset is a loff_t we own.
            let n = unsafe { libc::sendfile(out.as_raw_fd(), archive.as_raw_fd(), off, chunk) };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP) => {
                        self.no_sendfile = true;
                        return Ok(left);
                    }
                    _ => return Err(e),
                }
            }
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            left -= n as u64;
        }
        Ok(left)
    }

    fn buffered(
        &mut self,
        archive: &File,
        mut offset: u64,
        out: &File,
        mut out_offset: u64,
        mut left: u64,
    ) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        if left > 0 && self.buf.is_empty() {
            self.buf = vec![0u8; 1 << 20];
        }
        while left > 0 {
            let want = left.min(self.buf.len() as u64) as usize;
            let n = archive.read_at(&mut self.buf[..want], offset)?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            out.write_all_at(&self.buf[..n], out_offset)?;
            offset += n as u64;
            out_offset += n as u64;
            left -= n as u64;
        }
        Ok(())
    }
}
