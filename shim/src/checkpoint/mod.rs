//! The consistent checkpoint: freeze → CRIU dump through runc → rootfs diff
//! → thaw, all inside one bracket the shim holds; and the restore that
//! brings files back at Create and memory back at Start.

pub mod layout;
pub mod rootfs_diff;

use std::{
    fs,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use log::{info, warn};
use serde::{Deserialize, Serialize};

use crate::{
    cgroup::{self, FreezeGuard},
    container::{Container, Status},
    error::{Error, Result},
    options::CheckpointOptions,
    runtime::runc::CheckpointOpts,
};
use layout::{DUMP_LOG, METADATA, RESTORE_LOG, RESTORE_RECORD};

/// A container annotation that switches the shim's freeze off, for the test
/// that shows what the bracket prevents. Never set it in production.
pub const NO_FREEZE_ANNOTATION: &str = "dev.custom-shim.test/no-freeze";

#[derive(Debug, Default, Serialize)]
struct Phases {
    freeze_ms: f64,
    dump_ms: f64,
    diff_ms: f64,
    thaw_ms: f64,
    total_ms: f64,
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

#[derive(Debug, Serialize)]
struct Metadata {
    dump_flags: DumpFlags,
    shim_version: &'static str,
    criu_version: Option<String>,
    container_id: String,
    leave_running: bool,
    frozen_by_shim: bool,
    /// Why the rootfs diff is missing, when it is.
    rootfs_diff_skipped: Option<String>,
    phases: Phases,
    rootfs_diff_bytes: u64,
    rootfs_diff_entries: u64,
    deleted_files: u64,
    images_bytes: u64,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

impl Container {
    /// Checkpoints the container into `path` (or the options' image path).
    pub async fn checkpoint(self: &Arc<Self>, path: &Path, opts: CheckpointOptions) -> Result<()> {
        let _op = self.ops.lock().await;
        let status = self
            .init
            .require(&[Status::Running, Status::Paused], "checkpoint")?;
        let image = if opts.image_path.is_empty() {
            path.to_path_buf()
        } else {
            PathBuf::from(&opts.image_path)
        };
        if image.as_os_str().is_empty() {
            return Err(Error::InvalidArgument("checkpoint path is empty".into()));
        }
        fs::create_dir_all(&image).map_err(Error::io(format!("create {}", image.display())))?;
        // What was there before is the caller's; only what this checkpoint adds is removed on failure.
        let existing = entry_names(&image);
        // A work dir of our own (CRIU's logs), kept on failure under the bundle.
        let work = if opts.work_path.is_empty() {
            tempfile::Builder::new()
                .prefix("criu-work-")
                .tempdir_in(&self.bundle)
                .map_err(Error::io("create CRIU work dir"))?
                .keep()
        } else {
            PathBuf::from(&opts.work_path)
        };
        fs::create_dir_all(&work).map_err(Error::io(format!("create {}", work.display())))?;
        let result = self.checkpoint_bracket(&image, &work, &opts, status).await;
        let own_work = opts.work_path.is_empty();
        match &result {
            Ok(()) if own_work => {
                let _ = fs::remove_dir_all(&work);
            }
            Ok(()) => {}
            Err(_) => {
                // Nothing partial stays where the checkpoint was to go.
                remove_new_entries(&image, &existing);
                if own_work {
                    let _ = fs::remove_dir_all(&work);
                }
            }
        }
        result
    }

    async fn checkpoint_bracket(
        self: &Arc<Self>,
        image: &Path,
        work: &Path,
        opts: &CheckpointOptions,
        status: Status,
    ) -> Result<()> {
        let started = Instant::now();
        let mut phases = Phases::default();
        // Found before freezing, so that a rootfs we cannot diff fails nothing.
        let overlay = match rootfs_diff::overlay_of(&self.rootfs) {
            Ok(o) => Ok(o),
            Err(e) => {
                warn!("container {}: rootfs diff skipped: {e}", self.id);
                Err(e.to_string())
            }
        };
        let freezer = cgroup::freezer_of(self.init.pid())?;
        // Frozen already (paused, or by someone else): it stays as it is.
        let freeze =
            status == Status::Running && !self.freeze_disabled() && !freezer.is_frozen()?;
        let mut guard = Some(if freeze {
            let t = Instant::now();
            let g = tokio::task::spawn_blocking(move || FreezeGuard::freeze(freezer))
                .await
                .map_err(|e| Error::Internal(format!("freeze task: {e}")))??;
            phases.freeze_ms = ms(t.elapsed());
            g
        } else {
            FreezeGuard::none()
        });

        let t = Instant::now();
        let criu = CheckpointOpts {
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
        };
        if let Err(e) = self.runc.checkpoint(&self.id, &criu).await {
            // The guard thaws on drop: running stays running, paused stays paused.
            drop(guard);
            return Err(criu_failure("dump", e, work, DUMP_LOG, &self.bundle));
        }
        phases.dump_ms = ms(t.elapsed());

        if opts.exit {
            // The processes are gone; thaw so that the v1 freezer lets them die.
            let t = Instant::now();
            thaw(guard.take())?;
            phases.thaw_ms = ms(t.elapsed());
        }
        let t = Instant::now();
        let (diff, skipped) = match overlay {
            Ok(overlay) => {
                let dir = image.to_path_buf();
                let stats =
                    tokio::task::spawn_blocking(move || rootfs_diff::capture(&overlay, &dir))
                        .await
                        .map_err(|e| Error::Internal(format!("rootfs diff task: {e}")))?;
                (Some(stats?), None)
            }
            Err(why) => (None, Some(why)),
        };
        phases.diff_ms = ms(t.elapsed());
        if !opts.exit {
            let t = Instant::now();
            thaw(guard.take())?;
            phases.thaw_ms = ms(t.elapsed());
        }
        phases.total_ms = ms(started.elapsed());
        let diff = diff.unwrap_or_default();
        let metadata = Metadata {
            dump_flags: DumpFlags {
                tcp_established: opts.open_tcp,
                ext_unix_sk: opts.external_unix_sockets,
                shell_job: opts.terminal,
                file_locks: opts.file_locks,
            },
            shim_version: env!("CARGO_PKG_VERSION"),
            criu_version: criu_version(&work.join(DUMP_LOG)),
            container_id: self.id.clone(),
            leave_running: !opts.exit,
            frozen_by_shim: freeze,
            rootfs_diff_skipped: skipped,
            rootfs_diff_bytes: diff.bytes,
            rootfs_diff_entries: diff.entries,
            deleted_files: diff.deleted,
            images_bytes: dir_size(image),
            phases,
        };
        info!("container {} checkpointed: {:?}", self.id, metadata.phases);
        let json = serde_json::to_vec_pretty(&metadata).map_err(Error::json("encode metadata"))?;
        fs::write(image.join(METADATA), json).map_err(Error::io("write checkpoint metadata"))?;
        Ok(())
    }

    fn freeze_disabled(&self) -> bool {
        let Ok(bytes) = fs::read(self.bundle.join("config.json")) else {
            return false;
        };
        let Ok(spec) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
            return false;
        };
        spec["annotations"][NO_FREEZE_ANNOTATION].as_str() == Some("true")
    }
}

/// CRIU's error, with its first meaningful log line and a copy of the log
/// kept in the bundle (the work dir may be gone by the time anyone looks).
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
    text.lines()
        .filter(|l| l.contains("Error") || l.contains("error"))
        .find(|l| !l.contains("rlimit:") && !l.contains("exited, status="))
        .map(|l| {
            // Drop CRIU's "(00.012345) " timestamp prefix.
            match l.split_once(") ") {
                Some((ts, rest)) if ts.starts_with('(') => rest.trim().to_string(),
                _ => l.trim().to_string(),
            }
        })
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

fn entry_names(dir: &Path) -> std::collections::HashSet<std::ffi::OsString> {
    fs::read_dir(dir)
        .map(|rd| rd.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default()
}

fn remove_new_entries(dir: &Path, keep: &std::collections::HashSet<std::ffi::OsString>) {
    for name in entry_names(dir).difference(keep) {
        let p = dir.join(name);
        let removed = match fs::symlink_metadata(&p) {
            Ok(m) if m.is_dir() => fs::remove_dir_all(&p),
            _ => fs::remove_file(&p),
        };
        if let Err(e) = removed {
            warn!("remove partial checkpoint file {}: {e}", p.display());
        }
    }
}

/// A checkpoint a container was created from, restored at Start.
pub struct RestoreSource {
    image: PathBuf,
    flags: DumpFlags,
    work: PathBuf,
}

impl RestoreSource {
    /// Keeps the images in the bundle (they must outlive Create until Start)
    /// and applies the rootfs diff: files first, memory at Start.
    pub fn prepare(checkpoint: &Path, parent: Option<PathBuf>, c: &Container) -> Result<Self> {
        let image = c.bundle.join("checkpoint");
        if image.exists() {
            fs::remove_dir_all(&image).map_err(Error::io("clear old checkpoint copy"))?;
        }
        copy_images(checkpoint, &image)?;
        // containerd 2.x unpacks the checkpoint blob into a `ctrd-checkpoint*` temp
        // dir and never removes it; with the images ours now, it is not needed.
        if checkpoint
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("ctrd-checkpoint"))
        {
            if let Err(e) = fs::remove_dir_all(checkpoint) {
                warn!("remove {}: {e}", checkpoint.display());
            }
        }
        // runc restore takes no parent path: CRIU follows a `parent` link among the images.
        if let Some(parent) = &parent {
            let kept = c.bundle.join("checkpoint-parent");
            if kept.exists() {
                fs::remove_dir_all(&kept).map_err(Error::io("clear old parent checkpoint"))?;
            }
            copy_images(parent, &kept)?;
            std::os::unix::fs::symlink("../checkpoint-parent", image.join("parent"))
                .map_err(Error::io("link parent checkpoint"))?;
        }
        let t = Instant::now();
        let stats = rootfs_diff::apply(&image, &c.rootfs)?;
        let apply_ms = ms(t.elapsed());
        let record = serde_json::json!({
            "apply_ms": apply_ms,
            "rootfs_diff_bytes": stats.bytes,
            "rootfs_diff_entries": stats.entries,
            "deleted_files": stats.deleted,
        });
        if let Err(e) = fs::write(c.bundle.join(RESTORE_RECORD), record.to_string()) {
            warn!("container {}: write {RESTORE_RECORD}: {e}", c.id);
        }
        info!(
            "container {}: rootfs diff applied in {:.1} ms ({} entries, {} bytes, {} deleted)",
            c.id, apply_ms, stats.entries, stats.bytes, stats.deleted
        );
        let work = if c.options.criu_work_path.is_empty() {
            c.bundle.join("criu-restore")
        } else {
            PathBuf::from(&c.options.criu_work_path)
        };
        fs::create_dir_all(&work).map_err(Error::io(format!("create {}", work.display())))?;
        // Our own checkpoints say how they were dumped; the Go shim's say nothing.
        #[derive(Deserialize)]
        struct Saved {
            dump_flags: DumpFlags,
        }
        let flags = fs::read(image.join(METADATA))
            .ok()
            .and_then(|b| serde_json::from_slice::<Saved>(&b).ok())
            .map(|s| s.dump_flags)
            .unwrap_or_default();
        Ok(Self { image, flags, work })
    }

    pub fn criu_opts(&self) -> CheckpointOpts {
        CheckpointOpts {
            image_path: self.image.clone(),
            work_path: self.work.clone(),
            parent_path: None,
            leave_running: false,
            tcp_established: self.flags.tcp_established,
            ext_unix_sk: self.flags.ext_unix_sk,
            shell_job: self.flags.shell_job,
            file_locks: self.flags.file_locks,
            empty_ns: Vec::new(),
            manage_cgroups_mode: None,
        }
    }

    pub fn explain_failure(&self, e: Error, bundle: &Path) -> Error {
        criu_failure("restore", e, &self.work, RESTORE_LOG, bundle)
    }
}

/// Moves (or copies, across file systems) the flat image files of a checkpoint.
fn copy_images(from: &Path, to: &Path) -> Result<()> {
    fs::create_dir_all(to).map_err(Error::io(format!("create {}", to.display())))?;
    let entries =
        fs::read_dir(from).map_err(Error::io(format!("read checkpoint {}", from.display())))?;
    for e in entries {
        let e = e.map_err(Error::io("read checkpoint"))?;
        let ft = e.file_type().map_err(Error::io("read checkpoint"))?;
        if !ft.is_file() {
            // CRIU images are flat files; anything else is not ours to carry.
            continue;
        }
        let dst = to.join(e.file_name());
        if fs::hard_link(e.path(), &dst).is_err() {
            fs::copy(e.path(), &dst).map_err(Error::io(format!("copy {}", e.path().display())))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(
            criu_error_line("(00.1) Error (criu/sk-unix.c:1): unix: Can't dump external socket")
                .as_deref(),
            Some("Error (criu/sk-unix.c:1): unix: Can't dump external socket")
        );
    }
}
