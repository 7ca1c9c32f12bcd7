//! Apply: a checkpoint's file changes written into a fresh rootfs, refusing
//! anything that would land outside it.

use std::{
    ffi::OsStr,
    fs::{self, File},
    io,
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Component, Path, PathBuf},
};

use tar::{EntryType, Header};

use super::DiffStats;
use crate::{
    checkpoint::layout::{DELETED_FILES, ROOTFS_DIFF},
    error::{Error, Result},
};

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
    // File data is copied in the kernel straight from the archive (see
    // `copy_data`): a second handle for that, and a seeking iterator that
    // skips over the data instead of reading it.
    let data = file
        .try_clone()
        .map_err(Error::io(format!("open {}", tar_path.display())))?;
    let mut archive = tar::Archive::new(io::BufReader::with_capacity(1 << 20, file));
    let entries = archive
        .entries_with_seek()
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
                let (offset, len) = (entry.raw_file_position(), entry.size());
                copy_data(&data, offset, &mut f, len)
                    .map_err(|e| match e.kind() {
                        io::ErrorKind::UnexpectedEof => Error::InvalidArgument(format!(
                            "{ROOTFS_DIFF}: {} claims {len} bytes the archive does not hold",
                            rel.display()
                        )),
                        _ => Error::io(format!("write {}", path.display()))(e),
                    })?;
                stats.bytes += len;
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

/// Copies `len` bytes at `offset` of the archive into `out`: with
/// copy_file_range, so that the data never passes through user space, or
/// with a large buffer where the file systems cannot do that.
fn copy_data(archive: &File, offset: u64, out: &mut File, len: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let mut off = offset as libc::loff_t;
    let mut left = len;
    while left > 0 {
        let chunk = left.min(1 << 30) as usize;
        // SAFETY: both descriptors are open; `off` is a valid loff_t we own.
        let n = unsafe {
            libc::copy_file_range(
                archive.as_raw_fd(),
                &mut off,
                out.as_raw_fd(),
                std::ptr::null_mut(),
                chunk,
                0,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EXDEV | libc::ENOSYS | libc::EOPNOTSUPP | libc::EINVAL) => {
                    copy_buffered(archive, off as u64, out, left)
                }
                _ => Err(e),
            };
        }
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        left -= n as u64;
    }
    Ok(())
}

fn copy_buffered(archive: &File, mut offset: u64, out: &mut File, mut left: u64) -> io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; 1 << 20];
    while left > 0 {
        let want = left.min(buf.len() as u64) as usize;
        let n = archive.read_at(&mut buf[..want], offset)?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        out.write_all(&buf[..n])?;
        offset += n as u64;
        left -= n as u64;
    }
    Ok(())
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
    let (uid, gid) = owner(header);
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

/// The owner an entry's header asks for.
fn owner(header: &Header) -> (Option<nix::unistd::Uid>, Option<nix::unistd::Gid>) {
    let uid = header
        .uid()
        .ok()
        .map(|u| nix::unistd::Uid::from_raw(u as u32));
    let gid = header
        .gid()
        .ok()
        .map(|g| nix::unistd::Gid::from_raw(g as u32));
    (uid, gid)
}

fn set_owner(path: &Path, header: &Header) -> Result<()> {
    let (uid, gid) = owner(header);
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
