//! Capture: the overlay upperdir written as `rootfs-diff.tar` + `deleted.files`.
//!
//! In two steps: a [`Snapshot`] of the upper (every entry's metadata, xattrs, link targets,
//! deletions and sparse map, taken while the container is stopped), then [`Snapshot::write`],
//! the archive.
//!
//! - The copying path: the archive is written from the upper itself, in the stop.
//! - The reflink path, where the upper's filesystem clones extents (xfs, btrfs): the snapshot
//!   clones each changed file's bytes into [`Clones`], and the archive is written from them after
//!   the container goes on. A first snapshot ([`Snapshot::precopy`]) clones everything while the
//!   container runs; the one in the stop ([`Snapshot::again`]) takes again only the files whose
//!   inode, size or ctime changed since, so that the stop costs a walk of the upper, not a clone
//!   of every file. The precopy (`precopy`) records a file only if its ctime was older than a
//!   second before it began: any write after its clone gets a later ctime, so it cannot go
//!   unseen, even with coarse timestamps.
//!
//! Names are bytes throughout. deleted.files is a JSON list of strings (what
//! Podman, CRI-O and checkpointctl read), so a deleted path that is not UTF-8
//! goes into the archive instead, as an OCI whiteout `<dir>/.wh.<name>`.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    ffi::{OsStr, OsString},
    fs::{self, File},
    io::{self, BufWriter, Read, Seek},
    os::unix::{
        ffi::OsStrExt,
        fs::{FileExt, FileTypeExt, MetadataExt},
    },
    path::{Path, PathBuf},
};

use tar::{Builder, EntryType, Header, HeaderMode};

use super::{
    aligned,
    apply::WHITEOUT,
    clones::{Clones, Stored},
    precopy::{pax_key, Pax, Stamp, TakenFiles},
    sparse::{self, Segment},
    DiffStats, Overlay,
};
use crate::{
    checkpoint::layout::{DELETED_FILES, ROOTFS_DIFF},
    error::{Error, Result},
};

/// Writes the changes in `overlay.upper` into `dir` at once, from the upper itself.
pub fn capture(overlay: &Overlay, dir: &Path) -> Result<DiffStats> {
    Snapshot::copying(overlay)?.write(dir)
}

/// Where a file's bytes are read from when the archive is written.
enum Data {
    /// The upper itself (the copying path: written in the same stop).
    Live(PathBuf),
    /// The clone store.
    At(Stored),
}

/// An entry's header as the snapshot saw it: its metadata, made into a tar header only when the
/// archive is written (after the stop, on the reflink path).
enum Head {
    Of(Box<fs::Metadata>),
    /// A `.wh.` whiteout entry: an empty regular file.
    Whiteout,
}

impl Head {
    fn of(meta: &fs::Metadata) -> Self {
        Head::Of(Box::new(meta.clone()))
    }

    fn header(&self) -> Header {
        let mut header = Header::new_gnu();
        match self {
            Head::Of(meta) => header.set_metadata_in_mode(meta, HeaderMode::Complete),
            Head::Whiteout => {
                header.set_entry_type(EntryType::Regular);
                header.set_mode(0o644);
                header.set_size(0);
            }
        }
        header
    }
}

/// One archive entry, as the snapshot saw it.
enum Op {
    /// PAX xattr records for the next entry.
    Pax(Pax),
    /// A header and nothing else: a directory, a fifo, a `.wh.` whiteout.
    Empty(Head, PathBuf),
    /// A symlink.
    Symlink(Head, PathBuf, PathBuf),
    /// A hard link to an earlier entry.
    HardLink(Head, PathBuf, PathBuf),
    File {
        head: Head,
        path: PathBuf,
        size: u64,
        data: Data,
        /// The data segments of a sparse file (only they are stored).
        segments: Option<Vec<Segment>>,
    },
}

/// The upper as it was when taken: see the module doc.
pub struct Snapshot {
    ops: Vec<Op>,
    deleted: Vec<String>,
    stats: DiffStats,
    clones: Option<Clones>,
    /// A precopy's files, by path, that the next snapshot may take as they are.
    taken: TakenFiles,
    /// Files taken as the precopy left them, and files cloned by this snapshot.
    pub reused: u64,
    pub retaken: u64,
}

impl Snapshot {
    /// The copying path's snapshot, for a [`Snapshot::write`] in the same stop.
    pub fn copying(overlay: &Overlay) -> Result<Snapshot> {
        Self::take(overlay, None, HashMap::new())
    }

    /// The reflink path's first snapshot, the container running: `None` where the upper's
    /// filesystem cannot clone extents. The filesystem is flushed first (a clone writes the
    /// source's dirty pages back, better now than in the stop), every changed file cloned (see
    /// `precopy`), and the filesystem flushed again (the clones' metadata: CRIU writes its images
    /// to the same filesystem, often, and would wait for the log otherwise). Only the files are
    /// kept, for [`Snapshot::again`].
    pub fn precopy(overlay: &Overlay) -> Result<Option<Snapshot>> {
        let Some(mut clones) = Clones::probe(&overlay.upper) else {
            return Ok(None);
        };
        Clones::preflush(&overlay.upper);
        let taken = super::precopy::precopy(&overlay.upper, &mut clones).map_err(Error::io(
            format!("precopy the rootfs diff from {}", overlay.upper.display()),
        ))?;
        Clones::preflush(&overlay.upper);
        Ok(Some(Snapshot {
            ops: Vec::new(),
            deleted: Vec::new(),
            stats: DiffStats::default(),
            retaken: taken.len() as u64,
            clones: Some(clones),
            taken,
            reused: 0,
        }))
    }

    /// The snapshot in the stop, after [`Snapshot::precopy`]: files unchanged since are taken
    /// from it, the others cloned anew.
    pub fn again(self, overlay: &Overlay) -> Result<Snapshot> {
        Self::take(overlay, self.clones, self.taken)
    }

    fn take(overlay: &Overlay, clones: Option<Clones>, before: TakenFiles) -> Result<Snapshot> {
        let mut state = Capture {
            overlay,
            ops: Vec::new(),
            clones,
            before,
            reused: 0,
            retaken: 0,
            links: HashMap::new(),
            deleted: Vec::new(),
            seen_deleted: HashSet::new(),
            stats: DiffStats::default(),
        };
        state.walk(Path::new("")).map_err(Error::io(format!(
            "capture rootfs diff from {}",
            overlay.upper.display()
        )))?;
        Ok(Snapshot {
            ops: state.ops,
            deleted: state.deleted,
            stats: state.stats,
            clones: state.clones,
            taken: HashMap::new(),
            reused: state.reused,
            retaken: state.retaken,
        })
    }

    /// The path the bytes took: "reflink" (cloned, archived after the stop) or "copy".
    pub fn path(&self) -> &'static str {
        match self.clones {
            Some(_) => "reflink",
            None => "copy",
        }
    }

    /// Bytes cloned and bytes copied into the clone store (both 0 on the copying path), and the
    /// time that took.
    pub fn cloned_copied(&self) -> (u64, u64, std::time::Duration) {
        self.clones
            .as_ref()
            .map(|c| (c.cloned, c.copied, c.took))
            .unwrap_or_default()
    }

    /// The snapshot's bytes are in the clone store: the archive can wait for the thaw.
    pub fn cloned(&self) -> bool {
        self.clones.is_some()
    }

    /// Writes `rootfs-diff.tar` and `deleted.files` into `dir`.
    pub fn write(self, dir: &Path) -> Result<DiffStats> {
        let tar_path = dir.join(ROOTFS_DIFF);
        let out =
            File::create(&tar_path).map_err(Error::io(format!("create {}", tar_path.display())))?;
        let mut builder = Builder::new(BufWriter::with_capacity(1 << 20, out));
        builder.mode(HeaderMode::Complete);
        builder.follow_symlinks(false);
        let store = self.clones.as_ref();
        // A pax header is held back for its entry: a large file's takes its padding (see
        // `aligned`), and a reader allows only one before each entry.
        let mut pax: Option<Pax> = None;
        for op in self.ops {
            let wrote = match op {
                Op::Pax(p) => {
                    let earlier = pax.replace(p);
                    earlier.map_or(Ok(()), |p| write_op(&mut builder, Op::Pax(p), store))
                }
                op => write_entry(&mut builder, op, pax.take(), store),
            };
            wrote.map_err(Error::io(format!("write {}", tar_path.display())))?;
        }
        if let Some(p) = pax {
            write_op(&mut builder, Op::Pax(p), store)
                .map_err(Error::io(format!("write {}", tar_path.display())))?;
        }
        // No fsync: containerd reads the directory into its content store at once,
        // and a flush here would only lengthen the checkpoint.
        builder
            .finish()
            .and_then(|_| {
                builder
                    .into_inner()?
                    .into_inner()
                    .map_err(|e| e.into_error())
                    .map(drop)
            })
            .map_err(Error::io(format!("write {}", tar_path.display())))?;
        let list =
            serde_json::to_vec(&self.deleted).map_err(Error::json("encode deleted files"))?;
        let del_path = dir.join(DELETED_FILES);
        fs::write(&del_path, list).map_err(Error::io(format!("write {}", del_path.display())))?;
        Ok(self.stats)
    }
}

impl Data {
    /// Where the bytes are read from: the upper's file, opened now, or the clone store.
    fn source<'a>(&self, store: Option<&'a Clones>) -> io::Result<Source<'a>> {
        match (self, store) {
            (Data::At(s), Some(store)) => Ok(Source::Stored(store, *s)),
            (Data::At(_), None) => Err(io::Error::other("a cloned file without its clone store")),
            (Data::Live(full), _) => Ok(Source::Live(File::open(full)?)),
        }
    }
}

/// A file's bytes, wherever the snapshot left them.
pub(super) enum Source<'a> {
    Live(File),
    Stored(&'a Clones, Stored),
}

impl Source<'_> {
    /// Where the first `size` bytes are: (file, offset, length), in order.
    fn pieces(&self, size: u64) -> Vec<(&File, u64, u64)> {
        match self {
            Source::Live(f) => vec![(f, 0, size)],
            Source::Stored(c, s) => c.pieces(s, size),
        }
    }

    /// Reads at `off` of the file; a read past its end gives 0.
    pub(super) fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
        match self {
            Source::Live(f) => f.read_at(buf, off),
            Source::Stored(c, s) => c.read_at(s, buf, off),
        }
    }
}

/// Reads `left` bytes of a source from `pos`, zeros past its end (the header's size holds).
struct Exact<'a> {
    src: &'a Source<'a>,
    pos: u64,
    left: u64,
}

impl Read for Exact<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let want = (buf.len() as u64).min(self.left) as usize;
        if want == 0 {
            return Ok(0);
        }
        let n = match self.src.read_at(&mut buf[..want], self.pos)? {
            0 => {
                buf[..want].fill(0);
                want
            }
            n => n,
        };
        self.pos += n as u64;
        self.left -= n as u64;
        Ok(n)
    }
}

/// Writes `op` with the pax records held for it: a large file's data on a block boundary, every
/// other entry as [`write_op`] does.
fn write_entry(
    b: &mut Builder<BufWriter<File>>,
    op: Op,
    pax: Option<Pax>,
    store: Option<&Clones>,
) -> io::Result<()> {
    if let Op::File {
        head,
        path,
        size,
        data,
        segments: None,
    } = &op
    {
        if *size >= aligned::ALIGN_MIN {
            let mut header = head.header();
            header.set_size(*size);
            let pos = b.get_mut().stream_position()?;
            if let Some(prelude) = aligned::prelude(pos, &header, path, pax.as_ref())? {
                let src = data.source(store)?;
                return aligned::append(b.get_mut(), &prelude, &src.pieces(*size), *size);
            }
        }
    }
    if let Some(p) = pax {
        write_op(b, Op::Pax(p), store)?;
    }
    write_op(b, op, store)
}

fn write_op(b: &mut Builder<BufWriter<File>>, op: Op, store: Option<&Clones>) -> io::Result<()> {
    match op {
        Op::Pax(pax) => {
            b.append_pax_extensions(pax.iter().map(|(k, v)| (k.as_str(), v.as_slice())))
        }
        Op::Empty(head, path) => {
            let mut h = head.header();
            h.set_size(0);
            b.append_data(&mut h, path, io::empty())
        }
        Op::Symlink(head, path, target) => b.append_link(&mut head.header(), path, target),
        Op::HardLink(head, path, target) => {
            let mut h = head.header();
            h.set_entry_type(EntryType::Link);
            h.set_size(0);
            b.append_link(&mut h, path, target)
        }
        Op::File {
            head,
            path,
            size,
            data,
            segments,
        } => {
            let mut header = head.header();
            let src = data.source(store)?;
            match segments {
                Some(segments) => {
                    sparse::write_entry(
                        b.get_mut(),
                        header,
                        path.as_os_str().as_bytes(),
                        &src,
                        size,
                        &segments,
                    )?;
                    Ok(())
                }
                None => b.append_data(
                    &mut header,
                    path,
                    Exact {
                        src: &src,
                        pos: 0,
                        left: size,
                    },
                ),
            }
        }
    }
}

struct Capture<'a> {
    overlay: &'a Overlay,
    ops: Vec<Op>,
    clones: Option<Clones>,
    /// The precopy's files, when this is the snapshot in the stop.
    before: TakenFiles,
    reused: u64,
    retaken: u64,
    /// First path seen for each (dev, inode) with more than one link.
    links: HashMap<(u64, u64), PathBuf>,
    deleted: Vec<String>,
    seen_deleted: HashSet<PathBuf>,
    stats: DiffStats,
}

/// An overlay whiteout: a character device 0/0.
fn is_whiteout(meta: &fs::Metadata) -> bool {
    meta.file_type().is_char_device() && meta.rdev() == 0
}

fn sorted_names(dir: &Path) -> io::Result<Vec<OsString>> {
    let mut names: Vec<_> = fs::read_dir(dir)?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<io::Result<_>>()?;
    names.sort();
    Ok(names)
}

impl Capture<'_> {
    fn walk(&mut self, rel: &Path) -> io::Result<()> {
        let dir = self.overlay.upper.join(rel);
        // Each entry's stat relative to its directory (fstatat), not by its whole path: the walk
        // runs in the stop.
        let mut entries: Vec<fs::DirEntry> = fs::read_dir(&dir)?.collect::<io::Result<_>>()?;
        entries.sort_by_cached_key(|e| e.file_name());
        for entry in entries {
            let name = entry.file_name();
            let rel = rel.join(&name);
            let full = entry.path();
            let meta = entry.metadata()?;
            let ft = meta.file_type();
            if is_whiteout(&meta) {
                // An overlay whiteout: the file is deleted.
                self.delete(&rel)?;
                continue;
            }
            let why = if name.as_bytes().starts_with(WHITEOUT) {
                Some("its name starts with .wh., which marks a deletion in the archive")
            } else if ft.is_socket() {
                Some("socket")
            } else if ft.is_char_device() {
                Some("character device")
            } else if ft.is_block_device() {
                Some("block device")
            } else {
                None
            };
            if let Some(why) = why {
                // Not restorable: left out, and said so in the metadata.
                self.stats
                    .skipped
                    .push(format!("/{} ({why})", rel.to_string_lossy()));
                // Whatever a lower layer has there stays hidden after restore.
                let in_lower = self
                    .overlay
                    .lowers
                    .iter()
                    .any(|l| fs::symlink_metadata(l.join(&rel)).is_ok());
                if in_lower {
                    self.delete(&rel)?;
                }
                continue;
            }
            self.append(&rel, &full, &meta)?;
            if ft.is_dir() {
                if is_opaque(&full) {
                    // The lower directories' contents are hidden.
                    self.hide_lower(&rel)?;
                }
                self.walk(&rel)?;
            }
        }
        Ok(())
    }

    /// Records `rel` as deleted: in deleted.files when its path is UTF-8, as
    /// a `.wh.` entry in the archive when not.
    fn delete(&mut self, rel: &Path) -> io::Result<()> {
        if !self.seen_deleted.insert(rel.to_path_buf()) {
            return Ok(());
        }
        self.stats.deleted += 1;
        if let Some(s) = rel.to_str() {
            self.deleted.push(format!("/{s}"));
            return Ok(());
        }
        let name = rel.file_name().unwrap_or_default();
        let mut wh = OsString::from(OsStr::from_bytes(WHITEOUT));
        wh.push(name);
        let path = rel.with_file_name(wh);
        self.ops.push(Op::Empty(Head::Whiteout, path));
        Ok(())
    }

    /// `rel` is an opaque directory in the upper: every path beneath it in
    /// any lower that the upper does not have is deleted. Where the upper has
    /// a directory too, its lower contents are hidden as well (the lower is
    /// not merged under an opaque parent); where it has anything else, the
    /// replacement covers them.
    fn hide_lower(&mut self, rel: &Path) -> io::Result<()> {
        let mut names = BTreeSet::new();
        for lower in &self.overlay.lowers {
            if !is_real_dir(lower, rel) {
                continue;
            }
            names.extend(sorted_names(&lower.join(rel))?);
        }
        for name in names {
            let child = rel.join(&name);
            match fs::symlink_metadata(self.overlay.upper.join(&child)) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => self.delete(&child)?,
                Err(e) => return Err(e),
                Ok(m) if m.is_dir() => {
                    let lower_dir =
                        self.overlay.lowers.iter().any(|l| {
                            fs::symlink_metadata(l.join(&child)).is_ok_and(|m| m.is_dir())
                        });
                    if lower_dir {
                        self.hide_lower(&child)?;
                    }
                }
                Ok(_) => {}
            }
        }
        Ok(())
    }

    fn append(&mut self, rel: &Path, full: &Path, meta: &fs::Metadata) -> io::Result<()> {
        let head = Head::of(meta);
        let ft = meta.file_type();
        if ft.is_file() && meta.nlink() > 1 {
            let key = (meta.dev(), meta.ino());
            if let Some(first) = self.links.get(&key) {
                self.ops
                    .push(Op::HardLink(head, rel.to_path_buf(), first.clone()));
                self.stats.entries += 1;
                return Ok(());
            }
            self.links.insert(key, rel.to_path_buf());
        }
        if ft.is_file() {
            return self.append_file(rel, full, meta, head);
        }
        if let Some(pax) = self.xattrs(rel, full)? {
            self.ops.push(Op::Pax(pax));
        }
        if ft.is_symlink() {
            let target = fs::read_link(full)?;
            self.ops.push(Op::Symlink(head, rel.to_path_buf(), target));
        } else {
            // Directories and fifos: the header says it all.
            self.ops.push(Op::Empty(head, rel.to_path_buf()));
        }
        self.stats.entries += 1;
        Ok(())
    }

    fn append_file(
        &mut self,
        rel: &Path,
        full: &Path,
        meta: &fs::Metadata,
        head: Head,
    ) -> io::Result<()> {
        let size = meta.len();
        let stamp = Stamp::of(meta);
        self.stats.entries += 1;
        // Unchanged since the precopy: its clone, xattrs and map stand.
        let key = rel.as_os_str().as_bytes();
        if let Some(t) = self.before.remove(key).filter(|t| t.stamp == stamp) {
            if let Some(pax) = t.pax {
                self.ops.push(Op::Pax(pax));
            }
            self.stats.bytes += stored_bytes(&t.segments, size);
            self.ops.push(Op::File {
                head,
                path: rel.to_path_buf(),
                size,
                data: Data::At(t.stored),
                segments: t.segments,
            });
            self.reused += 1;
            return Ok(());
        }
        let pax = self.xattrs(rel, full)?;
        if let Some(pax) = &pax {
            self.ops.push(Op::Pax(pax.clone()));
        }
        let sparse = meta.blocks().saturating_mul(512) < size;
        let opened = match (sparse, &self.clones) {
            (false, None) => None,
            _ => Some(File::open(full)?),
        };
        // A file in more pieces than a restore accepts is stored whole.
        let segments = match (&opened, sparse) {
            (Some(f), true) => sparse::data_segments(f, size)
                .ok()
                .filter(|s| s.len() <= super::limits::MAX_SPARSE_SEGMENTS),
            _ => None,
        };
        self.stats.bytes += stored_bytes(&segments, size);
        let data = match (&mut self.clones, &opened) {
            (Some(clones), Some(f)) => {
                self.retaken += 1;
                Data::At(clones.take(f, size)?)
            }
            _ => Data::Live(full.to_path_buf()),
        };
        self.ops.push(Op::File {
            head,
            path: rel.to_path_buf(),
            size,
            data,
            segments,
        });
        Ok(())
    }

    /// The xattrs of `full` as PAX records, if it has any to keep.
    fn xattrs(&mut self, rel: &Path, full: &Path) -> io::Result<Option<Pax>> {
        let mut pax: Pax = Vec::new();
        // Not every file system supports xattrs; then there are none to keep.
        let Ok(names) = xattr::list(full) else {
            return Ok(None);
        };
        for name in names {
            let Some(n) = name.to_str() else {
                self.stats.skipped.push(format!(
                    "/{} (xattr {} with a name that is not UTF-8)",
                    rel.to_string_lossy(),
                    name.to_string_lossy()
                ));
                continue;
            };
            let Some(key) = pax_key(n) else {
                continue;
            };
            if let Ok(Some(value)) = xattr::get(full, &name) {
                pax.push((key, value));
            }
        }
        Ok(Some(pax).filter(|p| !p.is_empty()))
    }
}

/// The data bytes an entry stores: its segments' when sparse.
fn stored_bytes(segments: &Option<Vec<Segment>>, size: u64) -> u64 {
    match segments {
        Some(s) => s.iter().map(|s| s.len).sum(),
        None => size,
    }
}

/// Whether `rel` in `lower` is a directory reached through directories only
/// (a symlink in the lower is not merged, and must not be followed on the host).
fn is_real_dir(lower: &Path, rel: &Path) -> bool {
    let mut cur = lower.to_path_buf();
    if !fs::metadata(&cur).is_ok_and(|m| m.is_dir()) {
        return false;
    }
    for c in rel.components() {
        cur.push(c);
        if !fs::symlink_metadata(&cur).is_ok_and(|m| m.is_dir()) {
            return false;
        }
    }
    true
}

fn is_opaque(dir: &Path) -> bool {
    ["trusted.overlay.opaque", "user.overlay.opaque"]
        .iter()
        .any(|n| matches!(xattr::get(dir, n), Ok(Some(v)) if v == b"y"))
}
