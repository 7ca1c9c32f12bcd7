//! The container's file changes: captured from the overlay upperdir as
//! `rootfs-diff.tar` + `deleted.files` (the names Podman and CRI-O use), and
//! applied to a fresh rootfs without ever writing outside it.

use std::{
    collections::HashMap,
    ffi::OsStr,
    fs::{self, File},
    io::{self, BufWriter},
    os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt},
    path::{Component, Path, PathBuf},
};

use tar::{Builder, EntryType, Header, HeaderMode};

use super::layout::{DELETED_FILES, ROOTFS_DIFF};
use crate::error::{Error, Result};

/// What a capture wrote.
#[derive(Debug, Default, Clone, Copy)]
pub struct DiffStats {
    pub entries: u64,
    pub bytes: u64,
    pub deleted: u64,
}

/// The upperdir and lowerdirs of the overlay mounted at `rootfs`.
pub struct Overlay {
    pub upper: PathBuf,
    pub lowers: Vec<PathBuf>,
}

/// Reads the overlay options of the mount at `rootfs` from mountinfo.
pub fn overlay_of(rootfs: &Path) -> Result<Overlay> {
    let mountinfo =
        fs::read_to_string("/proc/self/mountinfo").map_err(Error::io("read mountinfo"))?;
    let target = rootfs.to_string_lossy();
    // The last mount on the path is the one in effect.
    let line = mountinfo
        .lines()
        .rfind(|l| l.split_whitespace().nth(4) == Some(&*target))
        .ok_or_else(|| {
            Error::FailedPrecondition(format!("rootfs {target} is not a mount point"))
        })?;
    let (_, post) = line
        .split_once(" - ")
        .ok_or_else(|| Error::Internal(format!("bad mountinfo line: {line}")))?;
    let mut post = post.split_whitespace();
    let fstype = post.next().unwrap_or_default();
    let super_opts = post.nth(1).unwrap_or_default();
    if fstype != "overlay" {
        return Err(Error::FailedPrecondition(format!(
            "rootfs {target} is {fstype}, not overlay: its changes cannot be captured"
        )));
    }
    let mut upper = None;
    let mut lowers = Vec::new();
    for opt in super_opts.split(',') {
        if let Some(u) = opt.strip_prefix("upperdir=") {
            upper = Some(PathBuf::from(u));
        } else if let Some(l) = opt.strip_prefix("lowerdir=") {
            lowers.extend(l.split(':').map(PathBuf::from));
        }
    }
    let upper = upper.ok_or_else(|| {
        Error::FailedPrecondition(format!("rootfs {target} is a read-only overlay"))
    })?;
    Ok(Overlay { upper, lowers })
}

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
    Ok(out)
}

/// Makes sure every directory on the way to `rel` under `root` is a real
/// directory (creating missing ones), never a symlink: nothing written
/// through a path can land outside `root`.
fn safe_parent(root: &Path, rel: &Path) -> Result<PathBuf> {
    safe_parent_cached(root, rel, &mut Checked::default())
}

/// Directories under the rootfs already checked to be real directories, so
/// that a diff of many files does not stat every parent of every entry.
/// Cleared whenever an entry could replace a directory or add a symlink.
#[derive(Default)]
struct Checked(std::collections::HashSet<PathBuf>);

fn safe_parent_cached(root: &Path, rel: &Path, checked: &mut Checked) -> Result<PathBuf> {
    let Some(parent) = rel.parent() else {
        return Ok(root.join(rel));
    };
    if checked.0.contains(parent) {
        return Ok(root.join(rel));
    }
    let mut cur = root.to_path_buf();
    let mut rel_cur = PathBuf::new();
    for c in parent.components() {
        cur.push(c);
        rel_cur.push(c);
        if checked.0.contains(&rel_cur) {
            continue;
        }
        match fs::symlink_metadata(&cur) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(Error::InvalidArgument(format!(
                    "checkpoint entry {} goes through {}, which is not a directory",
                    rel.display(),
                    cur.display()
                )))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::create_dir(&cur).map_err(Error::io(format!("create {}", cur.display())))?;
            }
            Err(e) => return Err(Error::io(format!("stat {}", cur.display()))(e)),
        }
        checked.0.insert(rel_cur.clone());
    }
    Ok(root.join(rel))
}

/// Removes whatever is at `path` (not following a symlink there).
fn remove_any(path: &Path) -> Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
    .map_err(Error::io(format!("remove {}", path.display())))
}

/// Applies a checkpoint's `deleted.files` then `rootfs-diff.tar` (either may
/// be missing: a checkpoint of the Go shim has neither) to `rootfs`.
pub fn apply(dir: &Path, rootfs: &Path) -> Result<DiffStats> {
    let mut stats = DiffStats::default();
    let del_path = dir.join(DELETED_FILES);
    if let Ok(bytes) = fs::read(&del_path) {
        let list: Vec<String> = serde_json::from_slice(&bytes)
            .map_err(|e| Error::InvalidArgument(format!("{DELETED_FILES}: {e}")))?;
        for name in list {
            let rel = safe_relative(Path::new(&name), true)?;
            let path = safe_parent(rootfs, &rel)?;
            remove_any(&path)?;
            stats.deleted += 1;
        }
    }
    let tar_path = dir.join(ROOTFS_DIFF);
    let file = match File::open(&tar_path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(stats),
        Err(e) => return Err(Error::io(format!("open {}", tar_path.display()))(e)),
    };
    let mut archive = tar::Archive::new(io::BufReader::with_capacity(1 << 20, file));
    let entries = archive
        .entries()
        .map_err(|e| Error::InvalidArgument(format!("{ROOTFS_DIFF}: {e}")))?;
    let mut dirs = Vec::new();
    let mut checked = Checked::default();
    for entry in entries {
        let mut entry = entry.map_err(|e| Error::InvalidArgument(format!("{ROOTFS_DIFF}: {e}")))?;
        let name = entry
            .path()
            .map_err(|e| Error::InvalidArgument(format!("{ROOTFS_DIFF}: {e}")))?
            .into_owned();
        let rel = safe_relative(&name, false)?;
        if !matches!(
            entry.header().entry_type(),
            EntryType::Regular | EntryType::Continuous | EntryType::Link
        ) {
            // This entry may replace a directory or add a symlink: check paths afresh.
            checked.0.clear();
        }
        if checked.0.contains(&rel) {
            // A directory that earlier entries went through is being replaced.
            checked.0.clear();
        }
        let path = safe_parent_cached(rootfs, &rel, &mut checked)?;
        let header = entry.header().clone();
        let mode = header.mode().unwrap_or(0o644) & 0o7777;
        let kind = header.entry_type();
        match kind {
            EntryType::Directory => {
                match fs::symlink_metadata(&path) {
                    Ok(m) if m.is_dir() => {}
                    Ok(_) => {
                        remove_any(&path)?;
                        fs::create_dir(&path).map_err(Error::io(format!("mkdir {}", path.display())))?;
                    }
                    Err(_) => fs::create_dir(&path).map_err(Error::io(format!("mkdir {}", path.display())))?,
                }
                // Permissions and times last, once the contents are in.
                dirs.push((path.clone(), header.clone()));
            }
            EntryType::Regular | EntryType::Continuous => {
                remove_any(&path)?;
                let mut f = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .custom_flags(libc::O_NOFOLLOW)
                    .mode(0o600)
                    .open(&path)
                    .map_err(Error::io(format!("create {}", path.display())))?;
                stats.bytes += io::copy(&mut entry, &mut f)
                    .map_err(Error::io(format!("write {}", path.display())))?;
            }
            EntryType::Symlink => {
                let target = entry
                    .link_name()
                    .ok()
                    .flatten()
                    .ok_or_else(|| Error::InvalidArgument(format!("symlink {} has no target", rel.display())))?
                    .into_owned();
                remove_any(&path)?;
                std::os::unix::fs::symlink(&target, &path)
                    .map_err(Error::io(format!("symlink {}", path.display())))?;
            }
            EntryType::Link => {
                let target = entry
                    .link_name()
                    .ok()
                    .flatten()
                    .ok_or_else(|| Error::InvalidArgument(format!("hard link {} has no target", rel.display())))?
                    .into_owned();
                let target_rel = safe_relative(&target, false)?;
                let target_path = safe_parent_cached(rootfs, &target_rel, &mut checked)?;
                let tm = fs::symlink_metadata(&target_path).map_err(|_| {
                    Error::InvalidArgument(format!(
                        "hard link {} points to {}, which is not in the rootfs",
                        rel.display(),
                        target.display()
                    ))
                })?;
                if !tm.is_file() {
                    return Err(Error::InvalidArgument(format!(
                        "hard link {} must point to a regular file",
                        rel.display()
                    )));
                }
                remove_any(&path)?;
                fs::hard_link(&target_path, &path)
                    .map_err(Error::io(format!("link {}", path.display())))?;
                stats.entries += 1;
                continue;
            }
            EntryType::Fifo => {
                remove_any(&path)?;
                nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(mode))
                    .map_err(Error::nix(format!("mkfifo {}", path.display())))?;
            }
            other => {
                return Err(Error::InvalidArgument(format!(
                    "checkpoint entry {} is a {:?}: only files, directories, links and fifos are restored",
                    rel.display(),
                    other
                )))
            }
        }
        if kind != EntryType::Directory {
            finish(&path, &header, kind)?;
            apply_xattrs(&mut entry, &path)?;
        } else {
            apply_xattrs(&mut entry, &path)?;
        }
        stats.entries += 1;
    }
    for (path, header) in dirs.into_iter().rev() {
        finish(&path, &header, EntryType::Directory)?;
    }
    Ok(stats)
}

fn apply_xattrs<R: io::Read>(entry: &mut tar::Entry<'_, R>, path: &Path) -> Result<()> {
    let Ok(Some(exts)) = entry.pax_extensions() else {
        return Ok(());
    };
    for ext in exts.flatten() {
        let Ok(key) = ext.key() else { continue };
        if let Some(name) = key.strip_prefix("SCHILY.xattr.") {
            if name.starts_with("trusted.overlay.") {
                continue;
            }
            xattr::set(path, OsStr::new(name), ext.value_bytes())
                .map_err(Error::io(format!("set xattr {name} on {}", path.display())))?;
        }
    }
    Ok(())
}

/// Owner, then mode, then times: the kernel clears setuid/setgid on chown,
/// so the mode must come after it (and file capabilities, xattrs, after both).
/// Everything but a symlink is changed through a descriptor opened without
/// following links, so a later entry that turned the path into a symlink can
/// never make a change land outside the rootfs.
fn finish(path: &Path, header: &Header, kind: EntryType) -> Result<()> {
    if kind == EntryType::Symlink {
        set_owner(path, header)?;
        return set_times(path, header, true);
    }
    let mut flags = libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC;
    if kind == EntryType::Directory {
        flags |= libc::O_DIRECTORY;
    }
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(flags)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) | Some(libc::ENOTDIR) => Error::InvalidArgument(format!(
                "checkpoint entry {} was replaced by a later entry",
                path.display()
            )),
            _ => Error::io(format!("open {}", path.display()))(e),
        })?;
    let uid = header
        .uid()
        .ok()
        .map(|u| nix::unistd::Uid::from_raw(u as u32));
    let gid = header
        .gid()
        .ok()
        .map(|g| nix::unistd::Gid::from_raw(g as u32));
    nix::unistd::fchown(&file, uid, gid)
        .map_err(Error::nix(format!("chown {}", path.display())))?;
    let mode = header.mode().unwrap_or(0o644) & 0o7777;
    file.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(Error::io(format!("chmod {}", path.display())))?;
    if let Ok(mtime) = header.mtime() {
        let t = nix::sys::time::TimeSpec::new(mtime as i64, 0);
        nix::sys::stat::futimens(&file, &t, &t)
            .map_err(Error::nix(format!("set times of {}", path.display())))?;
    }
    Ok(())
}

fn set_owner(path: &Path, header: &Header) -> Result<()> {
    let uid = header
        .uid()
        .ok()
        .map(|u| nix::unistd::Uid::from_raw(u as u32));
    let gid = header
        .gid()
        .ok()
        .map(|g| nix::unistd::Gid::from_raw(g as u32));
    nix::unistd::fchownat(
        nix::fcntl::AT_FDCWD,
        path,
        uid,
        gid,
        nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
    )
    .map_err(Error::nix(format!("chown {}", path.display())))
}

fn set_times(path: &Path, header: &Header, symlink: bool) -> Result<()> {
    if let Ok(mtime) = header.mtime() {
        let t = nix::sys::time::TimeSpec::new(mtime as i64, 0);
        let flag = if symlink {
            nix::sys::stat::UtimensatFlags::NoFollowSymlink
        } else {
            nix::sys::stat::UtimensatFlags::FollowSymlink
        };
        nix::sys::stat::utimensat(nix::fcntl::AT_FDCWD, path, &t, &t, flag)
            .map_err(Error::nix(format!("set times of {}", path.display())))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn raw_entry(
        b: &mut Builder<Vec<u8>>,
        name: &str,
        kind: EntryType,
        link: Option<&str>,
        data: &[u8],
    ) {
        let mut h = Header::new_gnu();
        // Written byte by byte: the tar crate refuses to build hostile names itself.
        let bytes = h.as_mut_bytes();
        bytes[..name.len()].copy_from_slice(name.as_bytes());
        if let Some(l) = link {
            bytes[157..157 + l.len()].copy_from_slice(l.as_bytes());
        }
        h.set_entry_type(kind);
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        h.set_cksum();
        b.append(&h, data).unwrap();
    }

    fn checkpoint_with(
        entries: impl FnOnce(&mut Builder<Vec<u8>>),
        deleted: &[&str],
    ) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let mut b = Builder::new(Vec::new());
        entries(&mut b);
        fs::write(dir.path().join(ROOTFS_DIFF), b.into_inner().unwrap()).unwrap();
        fs::write(
            dir.path().join(DELETED_FILES),
            serde_json::to_vec(deleted).unwrap(),
        )
        .unwrap();
        dir
    }

    /// A rootfs in a sandbox dir, with a canary beside it standing for the host.
    fn sandbox() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let top = tempfile::tempdir().unwrap();
        let rootfs = top.path().join("rootfs");
        fs::create_dir_all(rootfs.join("etc")).unwrap();
        fs::write(rootfs.join("etc/keep"), "keep").unwrap();
        let canary = top.path().join("canary");
        fs::write(&canary, "untouched").unwrap();
        (top, rootfs, canary)
    }

    #[test]
    fn capture_then_apply_round_trips_changes() {
        let top = tempfile::tempdir().unwrap();
        let (upper, lower) = (top.path().join("upper"), top.path().join("lower"));
        fs::create_dir_all(lower.join("dir")).unwrap();
        fs::write(lower.join("dir/old"), "old").unwrap();
        fs::write(lower.join("gone"), "x").unwrap();
        fs::create_dir_all(upper.join("dir")).unwrap();
        fs::write(upper.join("dir/new"), "new").unwrap();
        fs::write(upper.join("file"), "content").unwrap();
        fs::set_permissions(upper.join("file"), fs::Permissions::from_mode(0o751)).unwrap();
        fs::hard_link(upper.join("file"), upper.join("file-link")).unwrap();
        symlink("file", upper.join("sym")).unwrap();
        xattr::set(upper.join("file"), "user.test", b"v").ok();
        let root = nix::unistd::Uid::effective().is_root();
        if root {
            nix::sys::stat::mknod(
                &upper.join("gone"),
                nix::sys::stat::SFlag::S_IFCHR,
                nix::sys::stat::Mode::empty(),
                0,
            )
            .unwrap();
            xattr::set(upper.join("dir"), "trusted.overlay.opaque", b"y").unwrap();
        }
        let out = top.path().join("out");
        fs::create_dir(&out).unwrap();
        let stats = capture(
            &Overlay {
                upper,
                lowers: vec![lower.clone()],
            },
            &out,
        )
        .unwrap();
        assert!(stats.entries >= 5, "{stats:?}");

        // Apply to a copy of the lower layer: the result is the merged view.
        let rootfs = top.path().join("rootfs");
        fs::create_dir_all(rootfs.join("dir")).unwrap();
        fs::write(rootfs.join("dir/old"), "old").unwrap();
        fs::write(rootfs.join("gone"), "x").unwrap();
        apply(&out, &rootfs).unwrap();
        assert_eq!(fs::read_to_string(rootfs.join("file")).unwrap(), "content");
        assert_eq!(
            fs::metadata(rootfs.join("file")).unwrap().mode() & 0o7777,
            0o751
        );
        assert_eq!(
            fs::metadata(rootfs.join("file")).unwrap().ino(),
            fs::metadata(rootfs.join("file-link")).unwrap().ino()
        );
        assert_eq!(
            fs::read_link(rootfs.join("sym")).unwrap(),
            PathBuf::from("file")
        );
        assert_eq!(fs::read_to_string(rootfs.join("dir/new")).unwrap(), "new");
        if root {
            assert!(!rootfs.join("gone").exists(), "whiteout must delete");
            assert!(
                !rootfs.join("dir/old").exists(),
                "opaque dir hides the lower entries"
            );
        }
    }

    #[test]
    fn hostile_names_are_refused_and_nothing_outside_is_touched() {
        type Build = Box<dyn FnOnce(&mut Builder<Vec<u8>>)>;
        let cases: Vec<(&str, Build, Vec<&str>)> = vec![
            (
                "dotdot",
                Box::new(|b| raw_entry(b, "../canary", EntryType::Regular, None, b"pwned")),
                vec![],
            ),
            (
                "absolute",
                Box::new(|b| raw_entry(b, "/canary", EntryType::Regular, None, b"pwned")),
                vec![],
            ),
            (
                "absolute dotdot",
                Box::new(|b| raw_entry(b, "/../canary", EntryType::Regular, None, b"pwned")),
                vec![],
            ),
            (
                "hard link absolute",
                Box::new(|b| raw_entry(b, "h", EntryType::Link, Some("/etc/keep"), b"")),
                vec![],
            ),
            (
                "through symlink",
                Box::new(|b| {
                    raw_entry(b, "esc", EntryType::Symlink, Some(".."), b"");
                    raw_entry(b, "esc/canary", EntryType::Regular, None, b"pwned");
                }),
                vec![],
            ),
            (
                "hard link out",
                Box::new(|b| raw_entry(b, "h", EntryType::Link, Some("../canary"), b"")),
                vec![],
            ),
            (
                "device",
                Box::new(|b| raw_entry(b, "dev", EntryType::Block, None, b"")),
                vec![],
            ),
            ("deleted dotdot", Box::new(|_| {}), vec!["/../canary"]),
        ];
        for (what, build, deleted) in cases {
            let (_top, rootfs, canary) = sandbox();
            let ckpt = checkpoint_with(build, &deleted);
            let err = apply(ckpt.path(), &rootfs).expect_err(what);
            assert_eq!(
                err.code(),
                containerd_shim_protos::ttrpc::Code::INVALID_ARGUMENT,
                "{what}: {err}"
            );
            assert_eq!(fs::read_to_string(&canary).unwrap(), "untouched", "{what}");
        }
    }

    #[test]
    fn writing_over_a_symlink_replaces_it_instead_of_following_it() {
        let (_top, rootfs, canary) = sandbox();
        symlink(&canary, rootfs.join("etc/link")).unwrap();
        let ckpt = checkpoint_with(
            |b| raw_entry(b, "etc/link", EntryType::Regular, None, b"inside"),
            &[],
        );
        apply(ckpt.path(), &rootfs).unwrap();
        assert_eq!(fs::read_to_string(&canary).unwrap(), "untouched");
        assert_eq!(
            fs::read_to_string(rootfs.join("etc/link")).unwrap(),
            "inside"
        );
    }

    #[test]
    fn a_directory_turned_symlink_does_not_carry_its_mode_outside() {
        let (top, rootfs, canary) = sandbox();
        let host_dir = top.path().join("hostdir");
        fs::create_dir(&host_dir).unwrap();
        fs::set_permissions(&host_dir, fs::Permissions::from_mode(0o700)).unwrap();
        let target = host_dir.display().to_string();
        let ckpt = checkpoint_with(
            |b| {
                let mut h = Header::new_gnu();
                h.set_path("d").unwrap();
                h.set_entry_type(EntryType::Directory);
                h.set_mode(0o6777);
                h.set_size(0);
                h.set_cksum();
                b.append(&h, io::empty()).unwrap();
                raw_entry(b, "d", EntryType::Symlink, Some(&target), b"");
            },
            &[],
        );
        let err = apply(ckpt.path(), &rootfs).unwrap_err();
        assert_eq!(
            err.code(),
            containerd_shim_protos::ttrpc::Code::INVALID_ARGUMENT,
            "{err}"
        );
        assert_eq!(fs::metadata(&host_dir).unwrap().mode() & 0o7777, 0o700);
        assert_eq!(fs::read_to_string(&canary).unwrap(), "untouched");
    }

    #[test]
    fn replacing_a_parent_directory_with_a_file_is_invalid() {
        let (_top, rootfs, _) = sandbox();
        let ckpt = checkpoint_with(
            |b| {
                raw_entry(b, "esc/a", EntryType::Regular, None, b"a");
                raw_entry(b, "esc", EntryType::Regular, None, b"file");
                raw_entry(b, "esc/b", EntryType::Regular, None, b"b");
            },
            &[],
        );
        let err = apply(ckpt.path(), &rootfs).unwrap_err();
        assert_eq!(
            err.code(),
            containerd_shim_protos::ttrpc::Code::INVALID_ARGUMENT,
            "{err}"
        );
    }

    #[test]
    fn setuid_survives_owner_change() {
        let (_top, rootfs, _) = sandbox();
        let ckpt = checkpoint_with(
            |b| {
                let mut h = Header::new_gnu();
                h.set_path("suid").unwrap();
                h.set_entry_type(EntryType::Regular);
                h.set_mode(0o4755);
                h.set_uid(1234);
                h.set_gid(5678);
                h.set_size(1);
                h.set_cksum();
                b.append(&h, &b"x"[..]).unwrap();
            },
            &[],
        );
        apply(ckpt.path(), &rootfs).unwrap();
        let m = fs::metadata(rootfs.join("suid")).unwrap();
        if nix::unistd::Uid::effective().is_root() {
            assert_eq!((m.uid(), m.gid()), (1234, 5678));
        }
        assert_eq!(m.mode() & 0o7777, 0o4755);
    }

    #[test]
    fn checkpoint_without_diff_applies_nothing() {
        let (_top, rootfs, _) = sandbox();
        let empty = tempfile::tempdir().unwrap();
        let stats = apply(empty.path(), &rootfs).unwrap();
        assert_eq!(stats.entries + stats.deleted, 0);
        assert!(rootfs.join("etc/keep").exists());
    }

    #[test]
    fn truncated_archive_is_invalid() {
        let (_top, rootfs, _) = sandbox();
        let ckpt = checkpoint_with(
            |b| raw_entry(b, "big", EntryType::Regular, None, &[7u8; 4096]),
            &[],
        );
        let p = ckpt.path().join(ROOTFS_DIFF);
        let bytes = fs::read(&p).unwrap();
        fs::write(&p, &bytes[..1024]).unwrap();
        assert!(apply(ckpt.path(), &rootfs).is_err());
    }
}
