//! The consistent checkpoint: freeze → rootfs diff → CRIU dump through runc
//! → thaw, all inside one bracket the shim holds; and the restore that
//! brings files back at Create and memory back at Start.
//!
//! This module sees a container only through [`Target`]: its id, bundle,
//! rootfs, runc and init. The container decides when an operation runs (its
//! lock, its state, an owned task: see `container/checkpoint.rs`).

mod criu_conf;
pub mod criu_stop;
pub mod layout;
pub mod lazy;
pub mod loopback;
mod restore;
pub mod rootfs_diff;
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
use layout::{DUMP_CONFIG, DUMP_LOG, METADATA};
pub use restore::{wait_for_removals, RestoreSource};
use rootfs_diff::DiffStats;

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

#[derive(Debug, Default, Clone, Serialize)]
struct Phases {
    freeze_ms: f64,
    /// The files' part of the stop: the whole capture on the copying path, the snapshot (the
    /// walk and the clones) on the reflink path.
    diff_ms: f64,
    dump_ms: f64,
    thaw_ms: f64,
    total_ms: f64,
    /// Reflink path only: the precopy before the dump (the upper's filesystem flushed and every
    /// changed file cloned, the container running), and the archive written from the clones
    /// after it (the container running).
    #[serde(skip_serializing_if = "Option::is_none")]
    precopy_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    archive_ms: Option<f64>,
}

/// How the rootfs diff's bytes were taken (see `rootfs_diff::capture`).
#[derive(Debug, Clone, Serialize)]
struct DiffCapture {
    /// `reflink`: cloned in the stop, archived after it; `copy`: archived in the stop.
    path: &'static str,
    /// Reflink path: bytes cloned, and bytes copied because the filesystem refused a clone.
    cloned_bytes: u64,
    copied_bytes: u64,
    /// Reflink path: the time the clones took, precopy and stop together (the stop's part of
    /// the walk is `diff_ms`); files the stop took as the precopy left them, and files it cloned
    /// again (changed since).
    #[serde(skip_serializing_if = "Option::is_none")]
    clone_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    files_from_precopy: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    files_cloned_in_stop: Option<u64>,
}

impl DiffCapture {
    fn of(snap: &rootfs_diff::Snapshot) -> Self {
        let (cloned_bytes, copied_bytes, took) = snap.cloned_copied();
        DiffCapture {
            path: snap.path(),
            cloned_bytes,
            copied_bytes,
            clone_ms: snap.cloned().then(|| ms(took)),
            files_from_precopy: snap.cloned().then_some(snap.reused),
            files_cloned_in_stop: snap.cloned().then_some(snap.retaken),
        }
    }

    /// The copying path with no clones (the shim's own freeze).
    fn copy() -> Self {
        DiffCapture {
            path: "copy",
            cloned_bytes: 0,
            copied_bytes: 0,
            clone_ms: None,
            files_from_precopy: None,
            files_cloned_in_stop: None,
        }
    }
}

/// The rootfs diff as the stop left it.
enum Files {
    /// Not captured (why is said beside it).
    None,
    /// Archived in the stop (the copying path).
    Written(DiffStats, DiffCapture),
    /// Cloned in the stop, to be archived after it (the reflink path).
    Later(rootfs_diff::Snapshot),
}

/// The CRIU flags a dump used; the restore must use them too.
#[derive(Debug, Default, Clone, Copy, Serialize, Deserialize)]
#[serde(default)]
struct DumpFlags {
    tcp_established: bool,
    ext_unix_sk: bool,
    shell_job: bool,
    file_locks: bool,
}

#[derive(Debug, Clone, Serialize)]
struct Metadata {
    dump_flags: DumpFlags,
    shim_version: &'static str,
    criu_version: Option<String>,
    container_id: String,
    leave_running: bool,
    /// Where the memory pages went, when not into this directory.
    page_server: Option<String>,
    frozen_by_shim: bool,
    /// Who captured the rootfs changes (containerd's CRI keeps its own copy
    /// outside this directory).
    rootfs_diff_by: FilesBy,
    /// Why the rootfs diff is missing, when it is.
    rootfs_diff_skipped: Option<String>,
    /// Files of the rootfs the diff does not carry (sockets, device nodes), and why.
    rootfs_diff_left_out: Vec<String>,
    phases: Phases,
    rootfs_diff_bytes: u64,
    rootfs_diff_entries: u64,
    deleted_files: u64,
    /// Bytes of the bind-mounted volumes captured (`volumes/`), and what of them was left out.
    volumes_bytes: u64,
    volumes_left_out: Vec<String>,
    images_bytes: u64,
    /// False in the record written before the dump, true once CRIU finished
    /// (for a lazy checkpoint: once every image but the pages was written).
    complete: bool,
    /// Where the rootfs changes and volumes were captured: in CRIU's own stop, its processes
    /// seized, beginning at its `criu-network-lock` or `criu-post-dump` action (see
    /// `criu_stop`), `shim-freeze` (in a freeze the shim holds around the whole dump), or `none`
    /// (the CRI path, where containerd takes the files).
    files_captured_in: &'static str,
    /// CRIU's network lock around the dump: `skip` (nothing for it to keep, see
    /// `criu_conf::NetworkLock::for_dump`), `iptables` (a lazy dump), or `criu` (CRIU's own
    /// default, or a method the user set in a CRIU config).
    network_lock: &'static str,
    /// How the rootfs diff's bytes were taken, when the shim took them.
    #[serde(skip_serializing_if = "Option::is_none")]
    rootfs_diff_capture: Option<DiffCapture>,
    /// A lazy checkpoint's transfer: `serving`, then `complete` (the
    /// container exited) or `failed` (it runs on).
    #[serde(skip_serializing_if = "Option::is_none")]
    lazy: Option<LazyRecord>,
}

#[derive(Debug, Clone, Serialize)]
struct LazyRecord {
    state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    bytes: u64,
    connect_ms: f64,
    transfer_ms: f64,
}

/// Told to the caller of a lazy checkpoint once CRIU is ready (or failed before).
pub type Ready = Option<tokio::sync::oneshot::Sender<Result<()>>>;

impl Metadata {
    /// The record written before the dump: the flags CRIU will use, the versions, where the
    /// files are taken; the figures come after.
    fn before_dump(
        t: &Target<'_>,
        opts: &CheckpointOptions,
        files: FilesBy,
        frozen_by_shim: bool,
        files_captured_in: &'static str,
        network_lock: criu_conf::NetworkLock,
    ) -> Self {
        Metadata {
            dump_flags: DumpFlags {
                tcp_established: opts.open_tcp,
                ext_unix_sk: opts.external_unix_sockets,
                shell_job: opts.terminal,
                file_locks: opts.file_locks,
            },
            shim_version: env!("CARGO_PKG_VERSION"),
            criu_version: None,
            container_id: t.id.to_string(),
            leave_running: !opts.exit,
            page_server: Some(opts.page_server.clone()).filter(|p| !p.is_empty()),
            frozen_by_shim,
            rootfs_diff_by: files,
            rootfs_diff_skipped: None,
            rootfs_diff_left_out: Vec::new(),
            phases: Phases::default(),
            rootfs_diff_bytes: 0,
            rootfs_diff_entries: 0,
            deleted_files: 0,
            volumes_bytes: 0,
            volumes_left_out: Vec::new(),
            images_bytes: 0,
            complete: false,
            files_captured_in,
            network_lock: match opts.lazy {
                true => "iptables",
                false => network_lock.name(),
            },
            rootfs_diff_capture: None,
            lazy: None,
        }
    }

    /// What the rootfs diff and the volumes captured (or why the diff is missing).
    fn files(&mut self, diff: &DiffStats, skipped: Option<String>, vols: DiffStats) {
        self.rootfs_diff_skipped = skipped;
        self.rootfs_diff_left_out = diff.skipped.clone();
        self.rootfs_diff_bytes = diff.bytes;
        self.rootfs_diff_entries = diff.entries;
        self.deleted_files = diff.deleted;
        self.volumes_bytes = vols.bytes;
        self.volumes_left_out = vols.skipped;
    }
}

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

/// The lazy dump up to CRIU's ready: what is left runs in [`LazyRest`].
#[allow(clippy::too_many_arguments)]
async fn lazy_dump(
    t: &Target<'_>,
    image: &Path,
    work: &Path,
    mut criu: CheckpointOpts,
    relay: lazy::PageRelay,
    opts: &CheckpointOptions,
    (guard, frozen_before): (Option<FreezeGuard>, bool),
    mut metadata: Metadata,
    mut phases: Phases,
    started: Instant,
) -> Result<LazyRest> {
    let t0 = Instant::now();
    criu.leave_running = false;
    criu.page_server = Some(relay.criu_page_server());
    let config = relay.write_config(work)?;
    let mut relay = relay;
    let mut dump = t.runc.checkpoint_lazy(t.id, &criu, &config)?;
    let ready = tokio::time::timeout(t.runc.criu_timeout, dump.ready()).await;
    let failed = match ready {
        // CRIU's one connection is taken at once: nobody else gets at the pages.
        Ok(Ok(true)) => match relay.connect_criu().await {
            Ok(()) => None,
            Err(e) => {
                dump.kill();
                let _ = dump.wait().await;
                Some(e)
            }
        },
        Ok(Ok(false)) => Some(match dump.wait().await {
            Err(e) => criu_failure("dump", e, work, DUMP_LOG, t.bundle),
            Ok(()) => Error::Internal("runc checkpoint ended without saying ready".into()),
        }),
        Ok(Err(e)) => {
            dump.kill();
            let _ = dump.wait().await;
            Some(e)
        }
        Err(_) => {
            dump.kill();
            let _ = dump.wait().await;
            Some(criu_failure(
                "dump",
                Error::DeadlineExceeded(format!(
                    "runc checkpoint was not ready within {:?} (the runtime option CriuTimeout sets this bound); it was killed with its CRIU",
                    t.runc.criu_timeout
                )),
                work,
                DUMP_LOG,
                t.bundle,
            ))
        }
    };
    let mut rest = LazyRest {
        dump,
        relay: Some(relay),
        guard,
        metadata: Metadata {
            lazy: None,
            ..metadata.clone()
        },
        peer: opts.lazy_peer.parse().ok(),
        connect_timeout: match opts.lazy_connect_timeout {
            0 => crate::options::DEFAULT_LAZY_CONNECT_TIMEOUT,
            s => Duration::from_secs(s),
        },
        transfer_timeout: t.runc.criu_timeout,
        work: work.to_path_buf(),
        frozen_before,
        freezer: None,
    };
    if let Some(e) = failed {
        // runc and CRIU are gone; CRIU may have locked the network first.
        return Err(rest.put_back(t, e).await);
    }
    phases.dump_ms = ms(t0.elapsed());
    phases.total_ms = ms(started.elapsed());
    metadata.phases = phases;
    metadata.criu_version = criu_version(&work.join(DUMP_LOG));
    metadata.images_bytes = dir_size(image);
    metadata.complete = true;
    metadata.lazy = Some(LazyRecord {
        state: "serving",
        error: None,
        bytes: 0,
        connect_ms: 0.0,
        transfer_ms: 0.0,
    });
    info!(
        "container {} checkpointed lazily, serving its pages: {:?}",
        t.id, metadata.phases
    );
    write_metadata(image, &metadata)?;
    rest.metadata = metadata;
    // CRIU thawed the cgroup once it had the processes stopped: frozen again, it holds anything
    // that joins it (an exec) until the transfer ends.
    match t.freezer().and_then(|f| f.freeze().map(|()| f)) {
        Ok(f) => rest.freezer = Some(f),
        Err(e) => warn!("container {}: freeze while the pages are served: {e}", t.id),
    }
    Ok(rest)
}

/// A lazy checkpoint after CRIU's ready: the container frozen, CRIU serving
/// its pages behind the relay.
pub struct LazyRest {
    dump: crate::runtime::runc::LazyDump,
    relay: Option<lazy::PageRelay>,
    guard: Option<FreezeGuard>,
    metadata: Metadata,
    peer: Option<std::net::IpAddr>,
    connect_timeout: Duration,
    transfer_timeout: Duration,
    work: PathBuf,
    /// Frozen before (paused by its user): CRIU thawed the cgroup it seized, and a killed CRIU
    /// does not freeze it again, so the shim does.
    frozen_before: bool,
    /// The container's freezer, frozen again once CRIU is ready (CRIU thaws the cgroup once the
    /// processes are ptrace-stopped: a new exec would run), thawed for CRIU's end.
    freezer: Option<Freezer>,
}

impl LazyRest {
    /// Serves the pages to the destination. When it has them all CRIU kills
    /// the container's processes (their exit is the task's exit); if not,
    /// they are put back as they were.
    async fn finish(mut self, t: &Target<'_>, target: &Path) -> Result<()> {
        let Some(relay) = self.relay.take() else {
            return Err(Error::Internal("lazy checkpoint finished twice".into()));
        };
        let (dump, freezer) = (&self.dump, &self.freezer);
        let served = relay
            .serve(
                self.peer,
                self.connect_timeout,
                self.transfer_timeout,
                || dump.kill(),
                // CRIU kills the (ptrace-stopped) processes and waits for them to die.
                || {
                    if let Some(f) = freezer {
                        if let Err(e) = f.thaw() {
                            warn!("container {}: thaw for CRIU's end: {e}", t.id);
                        }
                    }
                },
            )
            .await;
        let (transfer, result) = match served {
            // The destination runs with every page: this copy must not run on, whatever CRIU
            // does now (it kills the processes; if it fails or hangs, the shim does).
            Ok(transfer) => {
                let waited = tokio::time::timeout(self.transfer_timeout, self.dump.wait()).await;
                if !matches!(waited, Ok(Ok(()))) {
                    let why = match waited {
                        Ok(Err(e)) => {
                            criu_failure("dump", e, &self.work, DUMP_LOG, t.bundle).to_string()
                        }
                        _ => format!("CRIU did not end within {:?}", self.transfer_timeout),
                    };
                    warn!(
                        "container {}: the destination has every page, but CRIU did not end the source ({why}); killing it",
                        t.id
                    );
                    self.dump.kill();
                    if let Some(f) = &self.freezer {
                        let _ = f.thaw();
                    }
                    if let Err(e) = t.runc.kill(t.id, libc::SIGKILL as u32, true).await {
                        warn!("container {}: kill: {e}", t.id);
                    }
                }
                (transfer, Ok(()))
            }
            Err(e) => {
                let _ = self.dump.wait().await;
                (Default::default(), Err(e))
            }
        };
        let mut record = LazyRecord {
            state: "complete",
            error: None,
            bytes: transfer.bytes,
            connect_ms: transfer.connect_ms,
            transfer_ms: transfer.transfer_ms,
        };
        let result = match result {
            Ok(()) => {
                // CRIU killed the processes and runc removed the cgroup.
                let _ = thaw(self.guard.take());
                info!(
                    "container {}: the destination has every page ({} bytes in {:.0} ms); the container exited",
                    t.id, transfer.bytes, transfer.transfer_ms
                );
                Ok(())
            }
            Err(e) => {
                record.state = "failed";
                record.error = Some(e.to_string());
                Err(self.put_back(t, e).await)
            }
        };
        let mut metadata = self.metadata.clone();
        metadata.lazy = Some(record);
        if let Err(e) = write_metadata(target, &metadata) {
            warn!("container {}: final checkpoint record: {e}", t.id);
        }
        result
    }

    /// CRIU is stopped before it served anything (the images could not be handed over).
    async fn abort(self, t: &Target<'_>, e: Error) -> Result<()> {
        self.dump.kill();
        let mut this = self;
        let _ = this.dump.wait().await;
        Err(this.put_back(t, e).await)
    }

    /// The processes CRIU let go of run on: their network unlocked (CRIU
    /// does not after a lazy dump) and thawed, or paused if they were.
    async fn put_back(&mut self, t: &Target<'_>, e: Error) -> Error {
        if t.init_pid > 0 {
            if let Err(u) = lazy::unlock_network(t.runc.reaper(), t.init_pid).await {
                warn!("container {}: unlock its network: {u}", t.id);
            }
        }
        if let Err(th) = thaw(self.guard.take()) {
            warn!(
                "container {}: thaw after the failed lazy checkpoint: {th}",
                t.id
            );
        }
        if self.frozen_before {
            if let Err(f) = t.freezer().and_then(|f| f.freeze()) {
                warn!("container {}: freeze it again, as it was: {f}", t.id);
            }
        }
        warn!(
            "container {}: lazy checkpoint failed, the container runs on: {e}",
            t.id
        );
        e
    }
}

/// Written to a temp file and renamed: the record is whole or the old one.
fn write_metadata(image: &Path, metadata: &Metadata) -> Result<()> {
    let json = serde_json::to_vec_pretty(metadata).map_err(Error::json("encode metadata"))?;
    let tmp = image.join(format!(".{METADATA}.tmp"));
    fs::write(&tmp, json)
        .and_then(|_| fs::rename(&tmp, image.join(METADATA)))
        .map_err(|e| {
            let _ = fs::remove_file(&tmp);
            Error::io("write checkpoint metadata")(e)
        })
}

/// Where a checkpoint is written before it is moved into its target.
struct Staging {
    dir: PathBuf,
    keep: bool,
}

impl Staging {
    /// Beside the target on the same file system when it can be (a caller
    /// that removes the target leaves it alone; entries move in by rename),
    /// else inside the target (a mount point of its own).
    fn new(target: &Path) -> Result<Self> {
        use std::os::unix::fs::MetadataExt;
        let dev = |p: &Path| fs::metadata(p).map(|m| m.dev()).ok();
        let name = target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if let Some(parent) = target.parent().filter(|p| !p.as_os_str().is_empty()) {
            if let Ok(dir) = tempfile::Builder::new()
                .prefix(&format!(".{name}.staging-"))
                .tempdir_in(parent)
            {
                let dir = dir.keep();
                if dev(&dir).is_some() && dev(&dir) == dev(target) {
                    return Ok(Self { dir, keep: false });
                }
                let _ = fs::remove_dir(&dir);
            }
        }
        let dir = tempfile::Builder::new()
            .prefix(".custom-shim-staging-")
            .tempdir_in(target)
            .map_err(Error::io(format!(
                "create staging dir in {}",
                target.display()
            )))?
            .keep();
        Ok(Self { dir, keep: false })
    }

    /// Moves every entry into `target`; on failure, what was moved is taken back.
    fn commit(&self, target: &Path) -> Result<()> {
        let names: Vec<_> = fs::read_dir(&self.dir)
            .map_err(Error::io("read staging dir"))?
            .flatten()
            .map(|e| e.file_name())
            .collect();
        for (i, name) in names.iter().enumerate() {
            if let Err(e) = fs::rename(self.dir.join(name), target.join(name)) {
                for back in &names[..i] {
                    let _ = fs::rename(target.join(back), self.dir.join(back));
                }
                return Err(Error::io(format!(
                    "move {:?} into {}",
                    name,
                    target.display()
                ))(e));
            }
        }
        Ok(())
    }

    fn keep(mut self) -> PathBuf {
        self.keep = true;
        self.dir.clone()
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.keep {
            if let Err(e) = fs::remove_dir_all(&self.dir) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    warn!("remove staging dir {}: {e}", self.dir.display());
                }
            }
        }
    }
}

/// CRIU's error, with its first meaningful log line and a copy of the log
/// kept in the bundle (the work dir may be gone by the time anyone looks).
/// A runc that ran past its time stays DeadlineExceeded, with the log named.
fn criu_failure(
    action: &'static str,
    e: Error,
    work: &Path,
    log_name: &str,
    bundle: &Path,
) -> Error {
    let log = work.join(log_name);
    let kept = bundle.join(format!("criu-{log_name}"));
    if fs::copy(&log, &kept).is_err() {
        return e;
    }
    if let Error::DeadlineExceeded(m) = e {
        let last = fs::read_to_string(&kept)
            .ok()
            .and_then(|t| {
                t.lines()
                    .rev()
                    .find(|l| !l.trim().is_empty())
                    .map(str::to_string)
            })
            .unwrap_or_default();
        return Error::DeadlineExceeded(format!(
            "{m}; CRIU's log is kept at {} (its last line: {})",
            kept.display(),
            last.trim()
        ));
    }
    let message = first_criu_error(&kept).unwrap_or_else(|| e.to_string());
    // runc names the log in the work dir: name the kept copy instead.
    let runc_said = e
        .to_string()
        .replace(&log.display().to_string(), &kept.display().to_string());
    Error::Criu {
        action,
        message: format!("{message} ({runc_said})"),
        log: kept,
    }
}

fn thaw(guard: Option<FreezeGuard>) -> Result<()> {
    let Some(guard) = guard else { return Ok(()) };
    match guard.thaw() {
        // runc removes the cgroup of a container it checkpointed with exit.
        Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// The first line of a CRIU log that says what went wrong. CRIU also logs
/// errors it shrugs off (an rlimit it cannot raise) and echoes of a helper's
/// exit status: those say nothing about the failure.
fn first_criu_error(log: &Path) -> Option<String> {
    let text = fs::read_to_string(log).ok()?;
    criu_error_line(&text)
}

fn criu_error_line(text: &str) -> Option<String> {
    // CRIU's own errors read "Error (file.c:line): ..."; a file name with "error" in it
    // (libgpg-error.so) is not one.
    let line = text
        .lines()
        .filter(|l| l.contains("Error ("))
        // Harmless: CRIU raising its own fd limit without CAP_SYS_RESOURCE.
        .filter(|l| !l.contains("Can't setup RLIMIT_NOFILE for self"))
        .find(|l| !l.contains("exited, status="))?;
    // Drop CRIU's "(00.012345) " timestamp prefix and the pid column of a restore's log.
    let line = match line.split_once("Error (") {
        Some((_, rest)) => format!("Error ({rest}"),
        None => line.trim().to_string(),
    };
    if line.contains("Can't get rlimit") && line.contains("Operation not permitted") {
        // prlimit(2) on a process of another user needs CAP_SYS_RESOURCE.
        return Some(format!(
            "{line} (CRIU cannot read the limits of a process running as another user without CAP_SYS_RESOURCE, which this host does not grant)"
        ));
    }
    Some(line)
}

fn criu_version(log: &Path) -> Option<String> {
    let text = fs::read_to_string(log).ok()?;
    text.lines()
        .find_map(|l| l.split_once("Version: ").map(|(_, v)| v.trim().to_string()))
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

    #[test]
    fn meaningful_criu_line_is_picked() {
        let log = "(00.028567) Error (criu/util.c:1533): rlimit: Can't setup RLIMIT_NOFILE for self: Operation not permitted
(00.03) Error (criu/util.c:656): exited, status=1
Error (criu/util.c:641): execvp(\"iptables-restore\", ...) failed: No such file or directory
(00.034472) Error (criu/cr-dump.c:2111): Dumping FAILED.";
        assert_eq!(
            criu_error_line(log).as_deref(),
            Some("Error (criu/util.c:641): execvp(\"iptables-restore\", ...) failed: No such file or directory")
        );
        let log = "(00.048920) Error (criu/util.c:1534): rlimit: Can't setup RLIMIT_NOFILE for self: Operation not permitted
(00.131422) Handling VMA with the following smaps entry: 7f5067e3a000-7f5067e3f000 r--p 00000000 00:30 10035910 /usr/lib/x86_64-linux-gnu/libgpg-error.so.0.33.1
(00.145821) Error (criu/cr-dump.c:389): Can't get rlimit 0: Operation not permitted
(00.236479) Error (criu/cr-dump.c:1975): Dumping FAILED.";
        let line = criu_error_line(log).unwrap();
        assert!(
            line.starts_with("Error (criu/cr-dump.c:389): Can't get rlimit 0: Operation not permitted (CRIU cannot read"),
            "{line}"
        );
        let restore = "(00.171172)     10: Error (soccr/soccr.c:529): Can't connect inet socket back: Network is unreachable";
        assert_eq!(
            criu_error_line(restore).as_deref(),
            Some(
                "Error (soccr/soccr.c:529): Can't connect inet socket back: Network is unreachable"
            )
        );
        assert_eq!(
            criu_error_line("(00.1) Error (criu/sk-unix.c:1): unix: Can't dump external socket")
                .as_deref(),
            Some("Error (criu/sk-unix.c:1): unix: Can't dump external socket")
        );
    }
}
