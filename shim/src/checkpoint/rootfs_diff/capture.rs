//! Capture: the overlay upperdir written as `rootfs-diff.tar` + `deleted.files`.

use std::{
    collections::HashMap,
    fs::{self, File},
    io::{self, BufWriter},
    os::unix::fs::{FileTypeExt, MetadataExt},
    path::{Path, PathBuf},
};

use tar::{Builder, EntryType, Header, HeaderMode};

use super::{DiffStats, Overlay};
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
        stats: DiffStats::default(),
    };
    state.walk(Path::new("")).map_err(Error::io(format!(
        "capture rootfs diff from {}",
        overlay.upper.display()
    )))?;
    let Capture {
        mut builder,
        deleted,
        mut stats,
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
    stats.deleted = deleted.len() as u64;
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
    stats: DiffStats,
}

impl Capture<'_> {
    fn walk(&mut self, rel: &Path) -> io::Result<()> {
        let dir = self.overlay.upper.join(rel);
        let mut names: Vec<_> = fs::read_dir(&dir)?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<io::Result<_>>()?;
        names.sort();
        for name in names {
            let rel = rel.join(&name);
            let full = self.overlay.upper.join(&rel);
            let meta = fs::symlink_metadata(&full)?;
            let ft = meta.file_type();
            if ft.is_char_device() && meta.rdev() == 0 {
                // An overlay whiteout: the file is deleted.
                self.deleted.push(format!("/{}", rel.display()));
                continue;
            }
            if ft.is_dir() && is_opaque(&full) {
                // The lower directory's contents are hidden: list them as deleted.
                self.hide_lower_entries(&rel)?;
            }
            self.append(&rel, &full, &meta)?;
            if ft.is_dir() {
                self.walk(&rel)?;
            }
        }
        Ok(())
    }

    fn hide_lower_entries(&mut self, rel: &Path) -> io::Result<()> {
        let upper = self.overlay.upper.join(rel);
        for lower in &self.overlay.lowers {
            let Ok(entries) = fs::read_dir(lower.join(rel)) else {
                continue;
            };
            for e in entries {
                let name = e?.file_name();
                if fs::symlink_metadata(upper.join(&name)).is_err() {
                    let path = format!("/{}", rel.join(&name).display());
                    if !self.deleted.contains(&path) {
                        self.deleted.push(path);
                    }
                }
            }
        }
        Ok(())
    }

    fn append(&mut self, rel: &Path, full: &Path, meta: &fs::Metadata) -> io::Result<()> {
        self.append_xattrs(full)?;
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
        if ft.is_symlink() {
            let target = fs::read_link(full)?;
            self.builder.append_link(&mut header, rel, target)?;
        } else if ft.is_file() {
            let f = File::open(full)?;
            self.stats.bytes += meta.len();
            self.builder.append_data(&mut header, rel, f)?;
        } else {
            // Directories, fifos, devices: the header says it all.
            header.set_size(0);
            self.builder.append_data(&mut header, rel, io::empty())?;
        }
        self.stats.entries += 1;
        Ok(())
    }

    fn append_xattrs(&mut self, full: &Path) -> io::Result<()> {
        let mut pax: Vec<(String, Vec<u8>)> = Vec::new();
        // Not every file system supports xattrs; then there are none to keep.
        let Ok(names) = xattr::list(full) else {
            return Ok(());
        };
        for name in names {
            let n = name.to_string_lossy();
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

fn is_opaque(dir: &Path) -> bool {
    ["trusted.overlay.opaque", "user.overlay.opaque"]
        .iter()
        .any(|n| matches!(xattr::get(dir, n), Ok(Some(v)) if v == b"y"))
}
