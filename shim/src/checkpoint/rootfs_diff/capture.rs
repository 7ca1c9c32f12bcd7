//! Capture: the overlay upperdir written as `rootfs-diff.tar` + `deleted.files`.
//!
//! Names are bytes throughout. deleted.files is a JSON list of strings (what
//! Podman, CRI-O and checkpointctl read), so a deleted path that is not UTF-8
//! goes into the archive instead, as an OCI whiteout `<dir>/.wh.<name>`.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    ffi::{OsStr, OsString},
    fs::{self, File},
    io::{self, BufWriter},
    os::unix::{
        ffi::OsStrExt,
        fs::{FileTypeExt, MetadataExt},
    },
    path::{Path, PathBuf},
};

use tar::{Builder, EntryType, Header, HeaderMode};

use super::{apply::WHITEOUT, sparse, DiffStats, Overlay};
use crate::{
    checkpoint::layout::{DELETED_FILES, ROOTFS_DIFF},
    error::{Error, Result},
};

/// Writes the changes in `overlay.upper` into `dir`.
pub fn capture(overlay: &Overlay, dir: &Path) -> Result<DiffStats> {
    let tar_path = dir.join(ROOTFS_DIFF);
    let out =
        File::create(&tar_path).map_err(Error::io(format!("create {}", tar_path.display())))?;
    let mut builder = Builder::new(BufWriter::with_capacity(1 << 20, out));
    builder.mode(HeaderMode::Complete);
    builder.follow_symlinks(false);
    let mut state = Capture {
        overlay,
        builder,
        links: HashMap::new(),
        deleted: Vec::new(),
        seen_deleted: HashSet::new(),
        stats: DiffStats::default(),
    };
    state.walk(Path::new("")).map_err(Error::io(format!(
        "capture rootfs diff from {}",
        overlay.upper.display()
    )))?;
    let Capture {
        mut builder,
        deleted,
        stats,
        ..
    } = state;
    // No fsync: containerd reads the directory into its content store at once,
    // and a flush here would only lengthen the freeze.
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
    let list = serde_json::to_vec(&deleted).map_err(Error::json("encode deleted files"))?;
    let del_path = dir.join(DELETED_FILES);
    fs::write(&del_path, list).map_err(Error::io(format!("write {}", del_path.display())))?;
    Ok(stats)
}

struct Capture<'a> {
    overlay: &'a Overlay,
    builder: Builder<BufWriter<File>>,
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
        for name in sorted_names(&dir)? {
            let rel = rel.join(&name);
            let full = self.overlay.upper.join(&rel);
            let meta = fs::symlink_metadata(&full)?;
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
        let mut header = Header::new_gnu();
        header.set_entry_type(EntryType::Regular);
        header.set_mode(0o644);
        header.set_size(0);
        self.builder.append_data(&mut header, &path, io::empty())?;
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
        let mut header = Header::new_gnu();
        header.set_metadata_in_mode(meta, HeaderMode::Complete);
        let ft = meta.file_type();
        if ft.is_file() && meta.nlink() > 1 {
            let key = (meta.dev(), meta.ino());
            if let Some(first) = self.links.get(&key) {
                header.set_entry_type(EntryType::Link);
                header.set_size(0);
                self.builder.append_link(&mut header, rel, first)?;
                self.stats.entries += 1;
                return Ok(());
            }
            self.links.insert(key, rel.to_path_buf());
        }
        self.append_xattrs(rel, full)?;
        if ft.is_symlink() {
            let target = fs::read_link(full)?;
            self.builder.append_link(&mut header, rel, target)?;
        } else if ft.is_file() {
            let f = File::open(full)?;
            let size = meta.len();
            let sparse = meta.blocks().saturating_mul(512) < size;
            // A file in more pieces than a restore accepts is stored whole.
            let segments = if sparse {
                sparse::data_segments(&f, size)
                    .ok()
                    .filter(|s| s.len() <= super::limits::MAX_SPARSE_SEGMENTS)
            } else {
                None
            };
            match segments {
                Some(segments) => {
                    let w = self.builder.get_mut();
                    self.stats.bytes += sparse::write_entry(
                        w,
                        header,
                        rel.as_os_str().as_bytes(),
                        &f,
                        size,
                        &segments,
                    )?;
                }
                None => {
                    self.stats.bytes += size;
                    self.builder.append_data(&mut header, rel, f)?;
                }
            }
        } else {
            // Directories and fifos: the header says it all.
            header.set_size(0);
            self.builder.append_data(&mut header, rel, io::empty())?;
        }
        self.stats.entries += 1;
        Ok(())
    }

    fn append_xattrs(&mut self, rel: &Path, full: &Path) -> io::Result<()> {
        let mut pax: Vec<(String, Vec<u8>)> = Vec::new();
        // Not every file system supports xattrs; then there are none to keep.
        let Ok(names) = xattr::list(full) else {
            return Ok(());
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
            if n.starts_with("trusted.overlay.") || n.starts_with("user.overlay.") {
                continue;
            }
            if let Ok(Some(value)) = xattr::get(full, &name) {
                pax.push((format!("SCHILY.xattr.{n}"), value));
            }
        }
        if !pax.is_empty() {
            self.builder
                .append_pax_extensions(pax.iter().map(|(k, v)| (k.as_str(), v.as_slice())))?;
        }
        Ok(())
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
