//! The consistent checkpoint: freeze → rootfs diff → CRIU dump through runc
//! → thaw, all inside one bracket the shim holds; and the restore that
//! brings files back at Create and memory back at Start.
//!
//! This module sees a container only through [`Target`]: its id, bundle,
//! rootfs, runc and init. The container decides when an operation runs (its
//! lock, its state, an owned task: see `container/checkpoint.rs`).

mod criu_conf;
mod criu_log;
pub mod criu_stop;
pub mod layout;
pub mod lazy;
mod lazy_dump;
pub mod loopback;
mod metadata;
mod restore;
pub mod rootfs_diff;
mod staging;
pub mod volumes;

use std::{
    fs,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use log::{info, warn};
use serde::{Deserialize, Serialize};

use crate::{
    cgroup::{self, FreezeGuard, Freezer},
    container::Status,
    error::{Error, Result},
    options::CheckpointOptions,
    owned::Caller,
    runtime::runc::{CheckpointOpts, Runc},
};
use criu_log::{criu_failure, criu_version};
use layout::{DUMP_CONFIG, DUMP_LOG};
use lazy_dump::lazy_dump;
use lazy_dump::LazyRest;
use metadata::{write_metadata, DiffCapture, DumpFlags, Files, LazyRecord, Metadata, Phases};
pub use restore::{wait_for_removals, RestoreSource};
use rootfs_diff::DiffStats;
use staging::Staging;

/// What checkpoint and restore use of a container.
pub struct Target<'a> {
    pub id: &'a str,
    pub bundle: &'a Path,
    pub rootfs: &'a Path,
    pub runc: &'a Runc,
    /// The init's pid (0 before it ran), for hosts where runc's state says nothing.
    pub init_pid: i32,
}

impl Target<'_> {
    /// The freezer of the container's own cgroup (its whole subtree), from
    /// runc's state; the init's cgroup only if runc's state names none.
    fn freezer(&self) -> Result<Freezer> {
        match cgroup::of_container(&self.runc.root, self.id) {
            Ok(cg) => Ok(cg.freezer),
            Err(e) if self.init_pid > 0 => {
                warn!("container {}: {e}; freezing the init's cgroup", self.id);
                cgroup::freezer_of(self.init_pid)
            }
            Err(e) => Err(e),
        }
    }
}

/// Who captures and applies the container's rootfs changes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FilesBy {
    /// The shim: `rootfs-diff.tar` and `deleted.files` in the checkpoint,
    /// captured in the freeze that holds the dump, applied at Create.
    Shim,
    /// containerd's CRI: it paused the task itself, writes its own
    /// `rootfs-diff.tar` from the snapshotter before it resumes, and applies
    /// that at restore. A second copy would be stored and applied twice.
    ContainerdCri,
}

impl FilesBy {
    /// How long before a checkpoint request containerd's pause can have come:
    /// its client sends Pause and Checkpoint back to back.
    pub const CRI_PAUSE_WINDOW: Duration = Duration::from_secs(3);

    /// At a checkpoint: containerd's CRI is the caller when the container is
    /// one of its application containers, still paused by a Pause that came
    /// just before the request (`paused_just_before`, within
    /// [`Self::CRI_PAUSE_WINDOW`]: a pause of its user's is older), and the
    /// request carries no options (the CRI sends none for a runtime not named
    /// runc; `ctr` and the companion tools always do).
    pub fn at_checkpoint(
        cri_container: bool,
        opts: &CheckpointOptions,
        status: Status,
        paused_just_before: bool,
    ) -> Self {
        if cri_container && !opts.given && status == Status::Paused && paused_just_before {
            FilesBy::ContainerdCri
        } else {
            FilesBy::Shim
        }
    }

    /// At a restore: containerd applies `<checkpoint>/../rootfs-diff.tar`
    /// itself, between Create and Start, when its CRI restores from a path
    /// (`<container dir>/ctrd-restore/checkpoint`).
    pub fn at_restore(cri_container: bool, checkpoint: &Path) -> Self {
        let from_cri_path = checkpoint.file_name().is_some_and(|n| n == "checkpoint")
            && checkpoint
                .parent()
                .is_some_and(|dir| dir.join(layout::ROOTFS_DIFF).is_file());
        if cri_container && from_cri_path {
            FilesBy::ContainerdCri
        } else {
            FilesBy::Shim
        }
    }
}

/// Told to the caller of a lazy checkpoint once CRIU is ready (or failed before).
pub type Ready = Option<tokio::sync::oneshot::Sender<Result<()>>>;

/// What runc and CRIU are asked for a dump into `image` with the caller's options.
fn criu_opts(image: &Path, work: &Path, opts: &CheckpointOptions) -> CheckpointOpts {
    CheckpointOpts {
        image_path: image.to_path_buf(),
        work_path: work.to_path_buf(),
        parent_path: None,
        leave_running: !opts.exit,
        tcp_established: opts.open_tcp,
        ext_unix_sk: opts.external_unix_sockets,
        shell_job: opts.terminal,
        file_locks: opts.file_locks,
        empty_ns: opts.empty_namespaces.clone(),
        manage_cgroups_mode: Some(opts.cgroups_mode.clone()).filter(|m| !m.is_empty()),
        page_server: Some(opts.page_server.clone()).filter(|p| !p.is_empty()),
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Checkpoints `t` into `path` (or the options' image path). `status` is the
/// init's, Running or Paused; the caller holds the container's lock and runs
/// this as an owned operation.
///
/// Everything is written into a staging directory beside the target and
/// moved in at the end, so a failed, cancelled or timed-out checkpoint leaves
/// no partial files, and a caller that gives up and removes the target takes
/// none of an `exit` checkpoint's images with it.
///
/// `path` is the caller's own directory, there when it asked (the container
/// refuses a request whose path is gone already): if it vanishes meanwhile,
/// its caller removed it on giving up, and it is never made anew (nor filled).
pub async fn dump(
    t: &Target<'_>,
    path: &Path,
    opts: &CheckpointOptions,
    status: Status,
    files: FilesBy,
    caller: &Caller,
    ready: &mut Ready,
) -> Result<()> {
    let (target, watched) = if opts.image_path.is_empty() {
        (path.to_path_buf(), true)
    } else {
        (PathBuf::from(&opts.image_path), false)
    };
    let caller = &caller.or_when_gone(watched.then(|| target.clone()));
    if target.as_os_str().is_empty() {
        return Err(Error::InvalidArgument("checkpoint path is empty".into()));
    }
    // A caller that gave up may have removed its target already: never make it anew then.
    caller.check("the checkpoint")?;
    let made_target = !target.exists();
    fs::create_dir_all(&target).map_err(Error::io(format!("create {}", target.display())))?;
    let result = dump_into(t, &target, opts, status, files, caller, ready).await;
    if result.is_err() && made_target {
        // Only if empty: what is in it is not ours.
        let _ = fs::remove_dir(&target);
    }
    result
}

async fn dump_into(
    t: &Target<'_>,
    target: &Path,
    opts: &CheckpointOptions,
    status: Status,
    files: FilesBy,
    caller: &Caller,
    ready: &mut Ready,
) -> Result<()> {
    let staging = Staging::new(target)?;
    // A work dir of our own (CRIU's logs); the log is kept in the bundle on failure.
    let own_work = opts.work_path.is_empty();
    let work = if own_work {
        tempfile::Builder::new()
            .prefix("criu-work-")
            .tempdir_in(t.bundle)
            .map_err(Error::io("create CRIU work dir"))?
            .keep()
    } else {
        PathBuf::from(&opts.work_path)
    };
    let result = match fs::create_dir_all(&work) {
        Ok(()) => bracket(t, &staging.dir, &work, opts, status, files, caller).await,
        Err(e) => Err(Error::io(format!("create {}", work.display()))(e)),
    };
    let result = match result {
        Ok(Some(rest)) => {
            // Lazy: every image but the pages is there; CRIU serves those.
            let result = match staging.commit(target) {
                Ok(()) => {
                    if let Some(tx) = ready.take() {
                        let _ = tx.send(Ok(()));
                    }
                    rest.finish(t, target).await
                }
                Err(e) => rest.abort(t, e).await,
            };
            if own_work {
                let _ = fs::remove_dir_all(&work);
            }
            return result;
        }
        Ok(None) => Ok(()),
        Err(e) => Err(e),
    };
    if own_work {
        let _ = fs::remove_dir_all(&work);
    }
    result?;
    match caller.check("the checkpoint") {
        Ok(()) => match staging.commit(target) {
            Ok(()) => Ok(()),
            Err(e) if opts.exit => Err(keep_only_copy(t.id, staging, e)),
            Err(e) => Err(e),
        },
        // The processes are gone: the images are the container now.
        Err(e) if opts.exit => Err(keep_only_copy(t.id, staging, e)),
        // Live: the container runs on, thawed; the staging dir goes.
        Err(e) => Err(e),
    }
}

fn keep_only_copy(id: &str, staging: Staging, e: Error) -> Error {
    let kept = staging.keep();
    warn!(
        "container {id}: checkpoint with exit could not be handed over ({e}); its images are kept at {}",
        kept.display()
    );
    Error::Internal(format!(
        "{e}; the container exited with the checkpoint, whose images are kept at {}",
        kept.display()
    ))
}

async fn bracket(
    t: &Target<'_>,
    image: &Path,
    work: &Path,
    opts: &CheckpointOptions,
    status: Status,
    files: FilesBy,
    caller: &Caller,
) -> Result<Option<LazyRest>> {
    let started = Instant::now();
    let mut phases = Phases::default();
    // Found before freezing, so that a rootfs we cannot diff fails nothing.
    let overlay = match files {
        FilesBy::Shim => rootfs_diff::overlay_of(t.rootfs).map_err(|e| {
            warn!("container {}: rootfs diff skipped: {e}", t.id);
            e.to_string()
        }),
        FilesBy::ContainerdCri => {
            info!(
                "container {}: containerd's CRI paused the task and captures the rootfs changes itself",
                t.id
            );
            Err("captured by containerd's CRI (its own rootfs-diff.tar, taken in its pause)".into())
        }
    };
    // Named volumes that are no bind mounts fail the request before any freeze.
    let binds = volumes::select(t.bundle, &opts.volumes)?;
    // The files in CRIU's own stop: the workload stops no longer than CRIU stops it. Not for a
    // lazy checkpoint (its freeze outlasts CRIU's stop), nor where the test hook turns the
    // bracket off (the files are then taken before the dump, unfrozen).
    if files == FilesBy::Shim && !opts.lazy && !crate::test_hooks::no_freeze(t.bundle) {
        return dump_at_criu_stop(t, image, work, opts, status, (overlay, binds), caller)
            .await
            .map(|()| None);
    }
    // A lazy checkpoint's listener, bound before anything stops.
    let relay = match opts.lazy {
        true => {
            lazy::check_pipe_size()?;
            Some(lazy::PageRelay::bind(&opts.page_server).await?)
        }
        false => None,
    };
    let freezer = t.freezer()?;
    // Frozen already (paused, or by someone else): it stays as it is.
    let frozen_before = status == Status::Paused || freezer.is_frozen()?;
    let freeze =
        status == Status::Running && !crate::test_hooks::no_freeze(t.bundle) && !frozen_before;
    caller.check("the checkpoint")?;
    let mut guard = Some(if freeze {
        let t0 = Instant::now();
        let g = tokio::task::spawn_blocking(move || FreezeGuard::freeze(freezer))
            .await
            .map_err(|e| Error::Internal(format!("freeze task: {e}")))??;
        phases.freeze_ms = ms(t0.elapsed());
        g
    } else {
        FreezeGuard::none()
    });
    // From here every way out thaws (the guard), unless the task was paused.
    caller.check("the checkpoint")?;

    // Files first, in the same freeze as memory: a failure here (a full disk)
    // leaves the container running even when `exit` was asked.
    let t0 = Instant::now();
    let (diff, skipped) = match overlay {
        Ok(overlay) => {
            let dir = image.to_path_buf();
            let stats = tokio::task::spawn_blocking(move || rootfs_diff::capture(&overlay, &dir))
                .await
                .map_err(|e| Error::Internal(format!("rootfs diff task: {e}")))??;
            (stats, None)
        }
        Err(why) => (Default::default(), Some(why)),
    };
    // Volumes in the same freeze as the rootfs and memory.
    let vols = if binds.is_empty() {
        DiffStats::default()
    } else {
        let dir = image.to_path_buf();
        tokio::task::spawn_blocking(move || volumes::capture(&binds, &dir))
            .await
            .map_err(|e| Error::Internal(format!("volumes task: {e}")))??
    };
    phases.diff_ms = ms(t0.elapsed());
    caller.check("the checkpoint")?;

    let files_captured_in = match files {
        FilesBy::Shim => "shim-freeze",
        FilesBy::ContainerdCri => "none",
    };
    let network_lock = criu_conf::NetworkLock::for_dump(opts.open_tcp, t.bundle);
    let mut metadata =
        Metadata::before_dump(t, opts, files, freeze, files_captured_in, network_lock);
    if skipped.is_none() {
        metadata.rootfs_diff_capture = Some(DiffCapture::copy());
    }
    metadata.files(&diff, skipped, vols);
    // Before the dump: images of an `exit` checkpoint never lack their flags.
    write_metadata(image, &metadata)?;

    let t0 = Instant::now();
    let criu = criu_opts(image, work, opts);
    if let Some(relay) = relay {
        return lazy_dump(
            t,
            image,
            work,
            criu,
            relay,
            opts,
            (guard, frozen_before),
            metadata,
            phases,
            started,
        )
        .await
        .map(Some);
    }
    // The network lock line, in a config of its own (the lazy dump above keeps CRIU's lock).
    let config = match network_lock.config_line() {
        "" => None,
        line => {
            let path = work.join(DUMP_CONFIG);
            criu_conf::write(&path, line)?;
            Some(path)
        }
    };
    let env: Vec<(&str, &Path)> = config
        .as_deref()
        .map(|c| ("CRIU_CONFIG_FILE", c))
        .into_iter()
        .collect();
    if let Err(e) = t.runc.checkpoint(t.id, &criu, &env).await {
        // runc and CRIU are gone (finished or killed): the guard thaws.
        drop(guard);
        return Err(criu_failure("dump", e, work, DUMP_LOG, t.bundle));
    }
    phases.dump_ms = ms(t0.elapsed());
    // Thaw: live, the processes go on; with exit, the v1 freezer lets the killed ones die.
    let t0 = Instant::now();
    thaw(guard.take())?;
    phases.thaw_ms = ms(t0.elapsed());
    phases.total_ms = ms(started.elapsed());

    metadata.phases = phases;
    metadata.criu_version = criu_version(&work.join(DUMP_LOG));
    metadata.images_bytes = dir_size(image);
    metadata.complete = true;
    info!("container {} checkpointed: {:?}", t.id, metadata.phases);
    if let Err(e) = write_metadata(image, &metadata) {
        // The record from before the dump stands; the images are whole.
        warn!("container {}: final checkpoint record: {e}", t.id);
    }
    Ok(None)
}

/// The dump with the files captured in CRIU's stop (see `criu_stop`): runc has CRIU freeze and
/// seize the processes as the Go shim does; the rootfs diff and the volumes are taken while CRIU
/// holds them, from its `network-lock` action (beside the memory dump) or its `post-dump`, and
/// always before it lets them go.
async fn dump_at_criu_stop(
    t: &Target<'_>,
    image: &Path,
    work: &Path,
    opts: &CheckpointOptions,
    status: Status,
    (overlay, binds): (
        std::result::Result<rootfs_diff::Overlay, String>,
        Vec<volumes::Bind>,
    ),
    caller: &Caller,
) -> Result<()> {
    let started = Instant::now();
    let freezer = t.freezer()?;
    caller.check("the checkpoint")?;
    let network_lock = criu_conf::NetworkLock::for_dump(opts.open_tcp, t.bundle);
    let mut metadata = Metadata::before_dump(
        t,
        opts,
        FilesBy::Shim,
        false,
        "criu-post-dump",
        network_lock,
    );
    // Before the dump: images of an `exit` checkpoint never lack their flags.
    write_metadata(image, &metadata)?;
    // Where the upper's filesystem clones extents, its changed files are cloned now, the
    // container running, and the stop takes again only what changed since (see
    // `rootfs_diff::capture`). Not with `exit`: CRIU kills the processes, the stop costs nothing,
    // and the archive is whole before they go. A precopy that fails leaves the copying path.
    let mut precopy_ms = None;
    let precopy = match (&overlay, opts.exit) {
        (Ok(o), false) => {
            let o = o.clone();
            let t0 = Instant::now();
            let id = t.id.to_string();
            let precopy = tokio::task::spawn_blocking(move || {
                rootfs_diff::Snapshot::precopy(&o)
                    .map_err(|e| warn!("container {id}: rootfs diff precopy, copying instead: {e}"))
                    .ok()
                    .flatten()
            })
            .await
            .map_err(|e| Error::Internal(format!("rootfs diff precopy task: {e}")))?;
            if precopy.is_some() {
                precopy_ms = Some(ms(t0.elapsed()));
            }
            precopy
        }
        _ => None,
    };
    caller.check("the checkpoint")?;
    let stop = criu_stop::Stop::prepare(
        work,
        network_lock.config_line(),
        criu_conf::capture_may_begin_early(t.bundle),
    )?;
    let criu = criu_opts(image, work, opts);
    let (dir, late) = (image.to_path_buf(), caller.clone());
    let capture = move || {
        // A caller gone by now: the script fails, and CRIU lets the processes go on.
        late.check("the checkpoint")?;
        let t0 = Instant::now();
        let (diff, skipped) = match overlay {
            Ok(overlay) => {
                let snap = match precopy.map(|p| p.again(&overlay)) {
                    Some(Ok(snap)) => snap,
                    // A full disk, say: the processes are still stopped, the copying path
                    // takes the files all the same.
                    Some(Err(e)) => {
                        warn!("rootfs diff from the precopy: {e}; copying instead");
                        rootfs_diff::Snapshot::copying(&overlay)?
                    }
                    None => rootfs_diff::Snapshot::copying(&overlay)?,
                };
                match snap.cloned() {
                    false => {
                        let how = DiffCapture::of(&snap);
                        (Files::Written(snap.write(&dir)?, how), None)
                    }
                    true => (Files::Later(snap), None),
                }
            }
            Err(why) => (Files::None, Some(why)),
        };
        let vols = if binds.is_empty() {
            DiffStats::default()
        } else {
            volumes::capture(&binds, &dir)?
        };
        Ok((diff, skipped, vols, ms(t0.elapsed())))
    };
    let env = [
        ("CRIU_CONFIG_FILE", stop.config.as_path()),
        (criu_stop::SOCKET_ENV, stop.socket.as_path()),
    ];
    let t0 = Instant::now();
    let dump = t.runc.checkpoint(t.id, &criu, &env);
    let serve = stop.serve(capture);
    tokio::pin!(dump);
    tokio::pin!(serve);
    let mut captured = None;
    let dumped = loop {
        tokio::select! {
            r = &mut dump => break r,
            c = &mut serve, if captured.is_none() => captured = Some(c),
        }
    };
    // runc ended (or was killed) without the capture's answer: a capture not begun never
    // begins, and one under way is waited for, so that nothing writes into the staging dir
    // once it goes.
    let captured = match captured {
        Some(c) => c.transpose(),
        None => {
            stop.cancel();
            serve.await.transpose()
        }
    };
    let dump_ms = ms(t0.elapsed());
    let failed = match (dumped, captured) {
        (Ok(()), Some(Ok((stats, began)))) => {
            metadata.files_captured_in = began.as_str();
            Ok(stats)
        }
        (Ok(()), Some(Err(e))) => Err(e),
        (Ok(()), None) if opts.exit => {
            // CRIU killed the processes: the images are the container now, kept without the
            // files rather than lost.
            warn!(
                "container {}: CRIU did not run the shim's post-dump action; the checkpoint with exit is kept without the rootfs changes",
                t.id
            );
            Ok((
                Files::None,
                Some("CRIU did not run the shim's post-dump action".to_string()),
                DiffStats::default(),
                0.0,
            ))
        }
        (Ok(()), None) => Err(Error::Internal(
            "CRIU did not run the shim's post-dump action: the rootfs changes would be missing from the checkpoint".into(),
        )),
        // The capture's own error says more than CRIU's "post-dump script failed" (CRIU's log
        // is kept all the same).
        (Err(e), Some(Err(ce))) => {
            let _ = criu_failure("dump", e, work, DUMP_LOG, t.bundle);
            Err(ce)
        }
        (Err(e), _) => Err(criu_failure("dump", e, work, DUMP_LOG, t.bundle)),
    };
    let (diff, skipped, vols, diff_ms) = match failed {
        Ok(stats) => stats,
        Err(e) => {
            // CRIU let the processes go, or was killed half-way (its freeze maybe not even
            // settled): a running task is thawed, a paused one frozen again (CRIU thaws what it
            // seized).
            let put_back = match status {
                Status::Paused => freezer.freeze(),
                _ => freezer.thaw(),
            };
            match put_back {
                Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {}
                Err(pb) => warn!("container {}: after the failed dump: {pb}", t.id),
                Ok(()) => {}
            }
            return Err(e);
        }
    };
    // The reflink path's archive, from the clones, the container running again. A failure
    // here fails the checkpoint as any other would: the container runs on.
    let t0 = Instant::now();
    let (diff, how, archive_ms) = match diff {
        Files::None => (DiffStats::default(), None, None),
        Files::Written(stats, how) => (stats, Some(how), None),
        Files::Later(snap) => {
            let how = DiffCapture::of(&snap);
            let dir = image.to_path_buf();
            let stats = tokio::task::spawn_blocking(move || snap.write(&dir))
                .await
                .map_err(|e| Error::Internal(format!("rootfs diff archive task: {e}")))??;
            (stats, Some(how), Some(ms(t0.elapsed())))
        }
    };
    metadata.files(&diff, skipped, vols);
    metadata.rootfs_diff_capture = how;
    metadata.phases = Phases {
        freeze_ms: 0.0,
        diff_ms,
        dump_ms,
        thaw_ms: 0.0,
        total_ms: ms(started.elapsed()),
        precopy_ms,
        archive_ms,
    };
    metadata.criu_version = criu_version(&work.join(DUMP_LOG));
    metadata.images_bytes = dir_size(image);
    metadata.complete = true;
    info!(
        "container {} checkpointed, its files in CRIU's stop: {:?}",
        t.id, metadata.phases
    );
    if let Err(e) = write_metadata(image, &metadata) {
        warn!("container {}: final checkpoint record: {e}", t.id);
    }
    Ok(())
}

fn thaw(guard: Option<FreezeGuard>) -> Result<()> {
    let Some(guard) = guard else { return Ok(()) };
    match guard.thaw() {
        // runc removes the cgroup of a container it checkpointed with exit.
        Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

fn dir_size(dir: &Path) -> u64 {
    fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn containerd_cri_is_the_caller_only_for_its_own_paused_containers_without_options() {
        let none = CheckpointOptions::default();
        let ctr = CheckpointOptions {
            given: true,
            ..Default::default()
        };
        let cri = FilesBy::at_checkpoint;
        assert_eq!(
            cri(true, &none, Status::Paused, true),
            FilesBy::ContainerdCri
        );
        // Running: nobody paused it to take a diff of their own.
        assert_eq!(cri(true, &none, Status::Running, true), FilesBy::Shim);
        // Paused long before: its user's pause, not containerd's for this checkpoint.
        assert_eq!(cri(true, &none, Status::Paused, false), FilesBy::Shim);
        // Options sent: ctr or another client, which rely on the shim's diff.
        assert_eq!(cri(true, &ctr, Status::Paused, true), FilesBy::Shim);
        assert_eq!(cri(false, &none, Status::Paused, true), FilesBy::Shim);
    }

    #[test]
    fn containerd_applies_the_diff_only_beside_a_cri_restore_path() {
        let dir = tempfile::tempdir().unwrap();
        let restore = dir.path().join("ctrd-restore");
        let images = restore.join("checkpoint");
        fs::create_dir_all(&images).unwrap();
        // No rootfs-diff.tar of containerd's: the shim applies its own, if any.
        assert_eq!(FilesBy::at_restore(true, &images), FilesBy::Shim);
        fs::write(restore.join(layout::ROOTFS_DIFF), b"").unwrap();
        assert_eq!(FilesBy::at_restore(true, &images), FilesBy::ContainerdCri);
        assert_eq!(FilesBy::at_restore(false, &images), FilesBy::Shim);
        // A directory not named as the CRI names it.
        let other = restore.join("ctrd-checkpoint123");
        fs::create_dir_all(&other).unwrap();
        assert_eq!(FilesBy::at_restore(true, &other), FilesBy::Shim);
    }
}
