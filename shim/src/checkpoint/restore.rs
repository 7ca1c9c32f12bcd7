//! The restore: a checkpoint's files applied at Create, its memory brought
//! back at Start by `runc restore`, reading the images where the caller put them.

use std::{
    fs,
    path::{Path, PathBuf},
    sync::Mutex,
    thread::JoinHandle,
    time::Instant,
};

use log::{info, warn};
use serde::Deserialize;

use super::{
    criu_failure,
    layout::{DELETED_FILES, METADATA, RESTORE_LOG, RESTORE_RECORD, ROOTFS_DIFF},
    ms, rootfs_diff, volumes, DumpFlags, FilesBy, Target,
};
use crate::{
    error::{Error, Result},
    runtime::runc::CheckpointOpts,
};

/// A checkpoint a container was created from, restored at Start. The images
/// are read where the caller put them: never copied, never moved.
pub struct RestoreSource {
    /// The checkpoint directory as the caller handed it.
    origin: PathBuf,
    /// What runc reads: `origin`, or a directory of links to its images plus
    /// CRIU's `parent` link (runc restore takes no parent path).
    images: PathBuf,
    linked: bool,
    flags: DumpFlags,
    work: PathBuf,
    own_work: bool,
}

impl RestoreSource {
    /// Applies the rootfs diff of `checkpoint` to the container's rootfs
    /// (files first, memory at Start) and gets the images ready for runc.
    pub async fn prepare(
        checkpoint: &Path,
        parent: Option<PathBuf>,
        t: &Target<'_>,
        work_path: &str,
        files: FilesBy,
    ) -> Result<Self> {
        match fs::metadata(checkpoint) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(Error::InvalidArgument(format!(
                    "checkpoint {} is not a directory",
                    checkpoint.display()
                )))
            }
            Err(e) => {
                return Err(Error::InvalidArgument(format!(
                    "checkpoint {}: {e}",
                    checkpoint.display()
                )))
            }
        }
        let (images, linked) = match &parent {
            None => (checkpoint.to_path_buf(), false),
            Some(parent) => (link_images(checkpoint, parent, t.bundle)?, true),
        };
        let unlink = |images: &Path| {
            if linked {
                let _ = fs::remove_dir_all(images);
            }
        };
        let started = Instant::now();
        let (dir, rootfs) = (files_dir(checkpoint), t.rootfs.to_path_buf());
        let bundle = t.bundle.to_path_buf();
        // containerd's own copy, removed after Start: the apply may use up its archive.
        let consume = containerd_temp(checkpoint) && dir == checkpoint;
        let applied = match files {
            FilesBy::Shim => tokio::task::spawn_blocking(move || {
                let mut stats = match consume {
                    true => rootfs_diff::apply_consuming(&dir, &rootfs)?,
                    false => rootfs_diff::apply(&dir, &rootfs)?,
                };
                let vols = volumes::apply(&dir, &bundle)?;
                stats.bytes += vols.bytes;
                stats.entries += vols.entries;
                Ok(stats)
            })
            .await
            .map_err(|e| Error::Internal(format!("rootfs diff task: {e}")))
            .and_then(|r| r),
            FilesBy::ContainerdCri => {
                info!(
                    "container {}: containerd applies {} itself before Start; the checkpoint's own copy, if any, is not applied",
                    t.id,
                    checkpoint.with_file_name(super::layout::ROOTFS_DIFF).display()
                );
                Ok(Default::default())
            }
        };
        let stats = match applied {
            Ok(stats) => stats,
            Err(e) => {
                unlink(&images);
                return Err(e);
            }
        };
        let apply_ms = ms(started.elapsed());
        let record = serde_json::json!({
            "rootfs_diff_by": files,
            "apply_ms": apply_ms,
            // Large files copied from containerd's own copy of the archive, cut short behind them.
            "archive_used_up": stats.used_up > 0,
            "archive_used_up_bytes": stats.used_up,
            "rootfs_diff_bytes": stats.bytes,
            "rootfs_diff_entries": stats.entries,
            "deleted_files": stats.deleted,
        });
        if let Err(e) = fs::write(t.bundle.join(RESTORE_RECORD), record.to_string()) {
            warn!("container {}: write {RESTORE_RECORD}: {e}", t.id);
        }
        info!(
            "container {}: rootfs diff applied in {:.1} ms ({} entries, {} bytes, {} deleted)",
            t.id, apply_ms, stats.entries, stats.bytes, stats.deleted
        );
        let own_work = work_path.is_empty();
        let work = if own_work {
            t.bundle.join("criu-restore")
        } else {
            PathBuf::from(work_path)
        };
        if let Err(e) = fs::create_dir_all(&work) {
            unlink(&images);
            return Err(Error::io(format!("create {}", work.display()))(e));
        }
        // Our own checkpoints say how they were dumped; the Go shim's say nothing.
        #[derive(Deserialize)]
        struct Saved {
            dump_flags: DumpFlags,
        }
        let flags = fs::read(checkpoint.join(METADATA))
            .ok()
            .and_then(|b| serde_json::from_slice::<Saved>(&b).ok())
            .map(|s| s.dump_flags)
            .unwrap_or_default();
        Ok(Self {
            origin: checkpoint.to_path_buf(),
            images,
            linked,
            flags,
            work,
            own_work,
        })
    }

    pub fn criu_opts(&self) -> CheckpointOpts {
        CheckpointOpts {
            image_path: self.images.clone(),
            work_path: self.work.clone(),
            parent_path: None,
            leave_running: false,
            tcp_established: self.flags.tcp_established,
            ext_unix_sk: self.flags.ext_unix_sk,
            shell_job: self.flags.shell_job,
            file_locks: self.flags.file_locks,
            empty_ns: Vec::new(),
            manage_cgroups_mode: None,
            page_server: None,
        }
    }

    /// The images runc and CRIU read.
    pub fn images(&self) -> &Path {
        &self.images
    }

    /// CRIU's work dir for the restore (a lazy-pages daemon shares it).
    pub fn work(&self) -> &Path {
        &self.work
    }

    pub fn explain_failure(&self, e: Error, bundle: &Path) -> Error {
        criu_failure("restore", e, &self.work, RESTORE_LOG, bundle)
    }

    /// After a successful restore nothing of the checkpoint stays with the
    /// container: the links and work dir the shim made go, and so does
    /// containerd's own unpacked copy (`ctrd-checkpoint*`, which containerd
    /// 2.x never removes). Any other directory is the caller's, left as it is.
    /// The images go on a thread of their own (see [`Self::discard`]).
    pub fn finish(self) {
        self.discard();
    }

    /// The restore will not happen (the container goes first): the same
    /// clean-up; a caller that tries again hands over a new checkpoint dir.
    ///
    /// containerd's copy holds every memory image: unlinking a few hundred
    /// MiB takes the filesystem tens to hundreds of milliseconds, which Start
    /// would otherwise spend after the container already runs. It is removed
    /// on a thread of its own, which the shim waits for before it exits
    /// ([`wait_for_removals`]).
    pub fn discard(self) {
        if self.linked {
            let _ = fs::remove_dir_all(&self.images);
        }
        if self.own_work {
            let _ = fs::remove_dir_all(&self.work);
        }
        if containerd_temp(&self.origin) {
            remove_in_background(self.origin);
        }
    }
}

/// Whether `checkpoint` is containerd's own unpacked copy of a checkpoint blob
/// (`ctrd-checkpoint*`, made for one Create and never removed by containerd 2.x): the shim's to
/// use up and remove. Any other directory is the caller's.
fn containerd_temp(checkpoint: &Path) -> bool {
    checkpoint
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with("ctrd-checkpoint"))
}

/// Removals of containerd's copies of the images still under way.
static REMOVING: Mutex<Vec<JoinHandle<()>>> = Mutex::new(Vec::new());

fn remove_in_background(dir: PathBuf) {
    let remove = |dir: &Path| {
        if let Err(e) = fs::remove_dir_all(dir) {
            warn!("remove {}: {e}", dir.display());
        }
    };
    let spawned = std::thread::Builder::new()
        .name("remove-images".into())
        .spawn({
            let dir = dir.clone();
            move || remove(&dir)
        });
    match spawned {
        Ok(handle) => {
            let mut removing = REMOVING.lock().unwrap_or_else(|p| p.into_inner());
            removing.retain(|h| !h.is_finished());
            removing.push(handle);
        }
        Err(e) => {
            warn!(
                "no thread to remove {} ({e}): removing it here",
                dir.display()
            );
            remove(&dir);
        }
    }
}

/// Waits for the removals [`RestoreSource::discard`] left running: the shim
/// calls it before it exits, which would cut them short.
pub fn wait_for_removals() {
    let handles = std::mem::take(&mut *REMOVING.lock().unwrap_or_else(|p| p.into_inner()));
    for h in handles {
        let _ = h.join();
    }
}

/// A directory in the bundle with a link to each image of `checkpoint` and
/// CRIU's `parent` link to `parent`: no image is copied.
/// Where a checkpoint's files (`rootfs-diff.tar`, `deleted.files`,
/// `volumes/`) are: in the images directory as this shim writes it, or one up
/// when the images are the `checkpoint/` of an archive in the layout Podman,
/// CRI-O and containerd's CRI export (and the companion CLI imports).
fn files_dir(images: &Path) -> PathBuf {
    let own = [ROOTFS_DIFF, DELETED_FILES, volumes::DIR]
        .iter()
        .any(|f| images.join(f).exists());
    match images.parent() {
        Some(parent)
            if !own
                && images.file_name().is_some_and(|n| n == "checkpoint")
                && [ROOTFS_DIFF, DELETED_FILES, volumes::DIR]
                    .iter()
                    .any(|f| parent.join(f).exists()) =>
        {
            parent.to_path_buf()
        }
        _ => images.to_path_buf(),
    }
}

fn link_images(checkpoint: &Path, parent: &Path, bundle: &Path) -> Result<PathBuf> {
    let dir = bundle.join("checkpoint-images");
    if dir.exists() {
        fs::remove_dir_all(&dir).map_err(Error::io(format!("clear {}", dir.display())))?;
    }
    fs::create_dir(&dir).map_err(Error::io(format!("create {}", dir.display())))?;
    let linked = (|| {
        let entries = fs::read_dir(checkpoint).map_err(Error::io(format!(
            "read checkpoint {}",
            checkpoint.display()
        )))?;
        for e in entries {
            let e = e.map_err(Error::io("read checkpoint"))?;
            let ft = e.file_type().map_err(Error::io("read checkpoint"))?;
            // CRIU images are flat files; anything else is not CRIU's.
            if !ft.is_file() {
                continue;
            }
            let dst = dir.join(e.file_name());
            if fs::hard_link(e.path(), &dst).is_err() {
                std::os::unix::fs::symlink(e.path(), &dst)
                    .map_err(Error::io(format!("link {}", e.path().display())))?;
            }
        }
        let parent = fs::canonicalize(parent)
            .map_err(Error::io(format!("parent checkpoint {}", parent.display())))?;
        std::os::unix::fs::symlink(parent, dir.join("parent"))
            .map_err(Error::io("link parent checkpoint"))
    })();
    match linked {
        Ok(()) => Ok(dir),
        Err(e) => {
            let _ = fs::remove_dir_all(&dir);
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(origin: &Path, work: &Path) -> RestoreSource {
        RestoreSource {
            origin: origin.to_path_buf(),
            images: origin.to_path_buf(),
            linked: false,
            flags: DumpFlags::default(),
            work: work.to_path_buf(),
            own_work: true,
        }
    }

    #[test]
    fn files_are_found_in_the_archive_layout_and_in_our_own() {
        let t = tempfile::tempdir().unwrap();
        let images = t.path().join("checkpoint");
        fs::create_dir(&images).unwrap();
        // Nothing anywhere: the images dir.
        assert_eq!(files_dir(&images), images);
        // The ecosystem's layout: one up.
        fs::write(t.path().join(ROOTFS_DIFF), b"").unwrap();
        assert_eq!(files_dir(&images), t.path());
        // Our own layout wins when the images dir has them.
        fs::write(images.join(DELETED_FILES), b"[]").unwrap();
        assert_eq!(files_dir(&images), images);
        // A dir not named checkpoint never looks up.
        let other = t.path().join("imgs");
        fs::create_dir(&other).unwrap();
        assert_eq!(files_dir(&other), other);
    }

    #[test]
    fn only_containerds_own_temp_copy_and_the_shims_dirs_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        // containerd's CRI restores from a directory it owns and removes itself.
        let cri = dir.path().join("ctrd-restore").join("checkpoint");
        let temp = dir.path().join("ctrd-checkpoint4711");
        let user = dir.path().join("my-checkpoint");
        for d in [&cri, &temp, &user] {
            fs::create_dir_all(d).unwrap();
            fs::write(d.join("pstree.img"), b"x").unwrap();
        }
        for (origin, removed) in [(&cri, false), (&temp, true), (&user, false)] {
            let work = dir.path().join("criu-restore");
            fs::create_dir_all(&work).unwrap();
            source(origin, &work).finish();
            wait_for_removals();
            assert!(!work.exists(), "the shim's work dir goes");
            assert_eq!(!origin.exists(), removed, "{}", origin.display());
        }
        assert!(cri.join("pstree.img").is_file());
    }
}
