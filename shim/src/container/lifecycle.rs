//! Create, start, kill, pause, resume, update, stats, pids and delete of a
//! container's init.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Instant,
};

use containerd_shim::{
    asynchronous::io::Stdio,
    cgroup::{collect_metrics, collect_metrics_v2, get_cgroup},
    util::convert_to_any,
};
use containerd_shim_protos::{api::Mount, protobuf::well_known_types::any::Any};
use log::{info, warn};

use super::{Container, Process, Shared, Status};
use crate::{
    checkpoint::{lazy::LazyDaemon, RestoreSource},
    error::{Error, Result},
    io::{self, remove_quietly},
    options::RuntimeOptions,
    owned,
    runtime::runc::{CreateOpts, RestoreOpts, Runc},
};

/// What Create needs, decoded from the request.
pub struct CreateConfig {
    pub id: String,
    pub bundle: PathBuf,
    pub mounts: Vec<Mount>,
    pub stdio: Stdio,
    pub options: RuntimeOptions,
    /// A checkpoint to restore from at Start (its files are applied at Create).
    pub checkpoint: Option<PathBuf>,
    pub parent_checkpoint: Option<PathBuf>,
}

impl Container {
    pub async fn create(shared: Shared, cfg: CreateConfig) -> Result<Arc<Container>> {
        let CreateConfig {
            id,
            bundle,
            mounts,
            stdio,
            options,
            checkpoint,
            parent_checkpoint,
        } = cfg;
        options.write(&bundle)?;
        let rootfs = bundle.join("rootfs");
        let rootfs_mounted = !mounts.is_empty();
        if rootfs_mounted {
            mount_all(&mounts, &rootfs).await?;
        }
        let runc = Runc::new(
            options.runc_binary(),
            options.runc_root(&shared.namespace),
            options.systemd_cgroup,
            bundle.join("log.json"),
            shared.reaper.clone(),
        )
        .with_criu_timeout(options.criu_timeout());
        let spec = std::fs::read(bundle.join("config.json"))
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok());
        // As the Go shim reads it; a spec it cannot read means kill all (the safe side).
        let kill_all_on_exit = spec
            .as_ref()
            .map(super::should_kill_all_on_exit)
            .unwrap_or(true);
        let cri_container = spec.as_ref().is_some_and(super::is_cri_container);
        let container = Arc::new(Container {
            id: id.clone(),
            bundle: bundle.clone(),
            rootfs: rootfs.clone(),
            rootfs_mounted,
            options,
            runc,
            init: Arc::new(Process::new(&id, "", stdio, None)),
            shared,
            execs: Mutex::new(HashMap::new()),
            deferred_init_exit: Mutex::new(None),
            ops: tokio::sync::Mutex::new(()),
            restore: Mutex::new(None),
            pauses: Mutex::new(Default::default()),
            kill_all_on_exit,
            cri_container,
        });
        let created = match checkpoint {
            // Files first: the rootfs diff is applied now, memory comes back at Start.
            Some(image) => container.prepare_restore(image, parent_checkpoint).await,
            None => container.runc_create().await,
        };
        if let Err(e) = created {
            container.cleanup_rootfs();
            return Err(e);
        }
        Ok(container)
    }

    async fn runc_create(self: &Arc<Self>) -> Result<()> {
        let pid_file = self.bundle.join("init.pid");
        let mut pending = io::prepare(&self.init.stdio, &self.io_owner()).await?;
        let opts = CreateOpts {
            pid_file: pid_file.clone(),
            console_socket: pending.console_path(),
            no_pivot: self.options.no_pivot_root,
            no_new_keyring: self.options.no_new_keyring,
        };
        let child = pending.take_child();
        let started = Instant::now();
        let created = pending
            .run(self.runc.create(&self.id, &self.bundle, &opts, child))
            .await;
        let io = match created {
            Ok(io) => io,
            Err(e) => {
                // runc may have left a half-made container behind.
                let _ = self.runc.delete(&self.id, true).await;
                return Err(e);
            }
        };
        let pid = self.pid_or_undo(&pid_file, &io).await?;
        self.init.set_created(pid, io);
        self.watch_exit(self.init.clone(), pid, started);
        Ok(())
    }

    /// The init's pid from the file runc wrote; without one, its stdio and
    /// runc's container are undone.
    async fn pid_or_undo(&self, pid_file: &Path, io: &io::ProcessIo) -> Result<i32> {
        match read_pid_file(pid_file).await {
            Ok(pid) => Ok(pid),
            Err(e) => {
                io.tasks.abort().await;
                let _ = self.runc.delete(&self.id, true).await;
                Err(e)
            }
        }
    }

    /// Takes back a container that was created but that nobody will track
    /// (its Create's caller gave up): nothing of it is left.
    pub async fn abandon(&self) {
        let _op = self.ops.lock().await;
        if self.init.pid() != 0 {
            let _ = self.runc.delete(&self.id, true).await;
        }
        self.release().await;
    }

    /// What the shim holds for the init once runc's container is gone: its
    /// stdio, a restore that will not happen, the rootfs it mounted.
    async fn release(&self) {
        if let Some(io) = self.init.io() {
            io.tasks.shutdown().await;
        }
        if let Some(source) = super::lock(&self.restore).take() {
            // containerd's copy of the images goes in the background.
            source.discard();
        }
        self.cleanup_rootfs();
    }

    /// Starts the init: `runc start`, or `runc restore` for a checkpoint.
    /// Owned: once begun it runs to its end whatever the caller does, and a
    /// started (or restored) container is tracked even if no one hears it.
    pub async fn start(self: &Arc<Self>) -> Result<i32> {
        let this = self.clone();
        owned::run(move |_caller| async move { this.start_owned().await }).await
    }

    async fn start_owned(self: &Arc<Self>) -> Result<i32> {
        let _op = self.ops.lock().await;
        let _gate = self.init.start_gate.lock().await;
        self.init.require(&[Status::Created], "start")?;
        let restore = super::lock(&self.restore).take();
        let pid = if let Some(source) = restore {
            self.restore_init(source).await?
        } else {
            self.runc.start(&self.id).await?;
            // It may have exited already; its exit waits for this start event.
            self.init.mark_running();
            self.init.pid()
        };
        self.publish_started(&self.init, pid);
        Ok(pid)
    }

    async fn restore_init(self: &Arc<Self>, source: RestoreSource) -> Result<i32> {
        let pid_file = self.bundle.join("init.pid");
        remove_quietly(&pid_file);
        let mut pending = io::prepare(&self.init.stdio, &self.io_owner()).await?;
        // lo up in the namespace CRIU makes (runc does not); the config goes on drop.
        let loopback = crate::checkpoint::loopback::install(&self.bundle).unwrap_or_else(|e| {
            warn!("container {}: restore without bringing lo up: {e}", self.id);
            None
        });
        // Lazy: the daemon that pulls the pages from the source listens first.
        let lazy_from = &self.options.lazy_pages_from;
        let daemon = if lazy_from.is_empty() {
            None
        } else {
            let started = LazyDaemon::start(
                &self.shared.reaper,
                source.images(),
                source.work(),
                lazy_from,
                self.runc.criu_timeout,
            )
            .await;
            match started {
                Ok(d) => Some(d),
                Err(e) => {
                    // Kept for a retry of Start, as after a failed restore.
                    *super::lock(&self.restore) = Some(source);
                    return Err(e);
                }
            }
        };
        let opts = RestoreOpts {
            checkpoint: source.criu_opts(),
            pid_file: pid_file.clone(),
            console_socket: pending.console_path(),
            no_pivot: self.options.no_pivot_root,
            criu_config: loopback.as_ref().map(|l| l.path().to_path_buf()),
            lazy_pages: daemon.is_some(),
        };
        let child = pending.take_child();
        let started = Instant::now();
        let restored = pending
            .run(self.runc.restore(&self.id, &self.bundle, &opts, child))
            .await;
        let io = match restored {
            Ok(io) => io,
            Err(e) => {
                if let Some(d) = daemon {
                    d.kill();
                    let _ = d.wait(None).await;
                }
                let e = source.explain_failure(e, &self.bundle);
                let _ = self.runc.delete(&self.id, true).await;
                // Keep the source so that a retry of Start can try again.
                *super::lock(&self.restore) = Some(source);
                return Err(e);
            }
        };
        let pid = match self.pid_or_undo(&pid_file, &io).await {
            Ok(pid) => pid,
            Err(e) => {
                if let Some(d) = daemon {
                    d.kill();
                    let _ = d.wait(None).await;
                }
                *super::lock(&self.restore) = Some(source);
                return Err(e);
            }
        };
        self.init.set_started(pid, io);
        self.watch_exit(self.init.clone(), pid, started);
        match daemon {
            // Restored: the images are not kept for the container's life.
            None => source.finish(),
            Some(d) => {
                d.restored(pid);
                self.watch_lazy_pages(d, source, pid)
            }
        }
        info!("container {} restored as pid {pid}", self.id);
        Ok(pid)
    }

    /// The container runs while its pages arrive. If they do not all
    /// arrive (the daemon failed, the source went away) its memory is
    /// incomplete, and if the source does not confirm that it let go, it may
    /// still run the container: either way this copy is killed, and the
    /// reason is logged and kept in the bundle (`lazy-pages.failed`).
    fn watch_lazy_pages(self: &Arc<Self>, daemon: LazyDaemon, source: RestoreSource, pid: i32) {
        let this = self.clone();
        tokio::spawn(async move {
            let keep = this.bundle.join("criu-lazy-pages.log");
            match daemon.wait(Some(&keep)).await {
                Ok(t) => info!(
                    "container {}: every lazy page arrived ({} bytes in {:.0} ms); the source let go",
                    this.id, t.bytes, t.transfer_ms
                ),
                Err(e) => {
                    log::error!(
                        "container {}: its memory did not all arrive, or the source may still run it; killing it: {e}",
                        this.id
                    );
                    let _ = std::fs::write(this.bundle.join("lazy-pages.failed"), e.to_string());
                    if let Err(k) = this.runc.kill(&this.id, libc::SIGKILL as u32, true).await {
                        warn!("container {}: kill: {k}", this.id);
                        let _ = nix::sys::signal::kill(
                            nix::unistd::Pid::from_raw(pid),
                            nix::sys::signal::Signal::SIGKILL,
                        );
                    }
                }
            }
            source.finish();
        });
    }

    pub async fn kill(&self, exec_id: &str, signal: u32, all: bool) -> Result<()> {
        let process = self.process(exec_id)?;
        if !process.is_init() {
            process.require(&[Status::Running], "kill")?;
            // Any signal the kernel knows, real-time ones and 0 (a liveness probe) included.
            if signal > libc::SIGRTMAX() as u32 {
                return Err(Error::InvalidArgument(format!("invalid signal {signal}")));
            }
            // SAFETY: kill(2) with a pid this shim started and a checked signal number.
            if unsafe { libc::kill(process.pid(), signal as i32) } == 0 {
                return Ok(());
            }
            return Err(match std::io::Error::last_os_error().raw_os_error() {
                Some(libc::ESRCH) => {
                    Error::NotFound(format!("process already finished: {}", process.describe()))
                }
                _ => Error::io(format!("kill {}", process.describe()))(
                    std::io::Error::last_os_error(),
                ),
            });
        }
        let status = self.init.status();
        if status == Status::Stopped && !all {
            return Err(Error::NotFound(format!(
                "process already finished: {}",
                self.init.describe()
            )));
        }
        if status == Status::Created && self.init.pid() == 0 {
            // Created from a checkpoint and not restored yet: nothing runs.
            return Err(Error::NotFound(format!(
                "process not started: {}",
                self.init.describe()
            )));
        }
        match self.runc.kill(&self.id, signal, all).await {
            Err(Error::Runc { message, .. })
                if all && message.contains("container not running") =>
            {
                Ok(())
            }
            other => other,
        }
    }

    pub async fn pause(&self) -> Result<()> {
        let _op = self.ops.lock().await;
        self.init.require(&[Status::Running], "pause")?;
        self.runc.pause(&self.id).await?;
        self.init
            .transition(&[Status::Running], Status::Paused, "pause")?;
        let mut p = super::lock(&self.pauses);
        p.generation += 1;
        p.since = Some(Instant::now());
        Ok(())
    }

    pub async fn resume(&self) -> Result<()> {
        let _op = self.ops.lock().await;
        self.resume_locked().await
    }

    /// Resume, the container's lock held.
    pub(super) async fn resume_locked(&self) -> Result<()> {
        self.init.require(&[Status::Paused], "resume")?;
        self.runc.resume(&self.id).await?;
        self.init
            .transition(&[Status::Paused], Status::Running, "resume")?;
        let mut p = super::lock(&self.pauses);
        p.generation += 1;
        p.since = None;
        Ok(())
    }

    pub async fn update(&self, resources: &Any) -> Result<()> {
        self.init.require(
            &[Status::Created, Status::Running, Status::Paused],
            "update",
        )?;
        // The LinuxResources JSON containerd sends is exactly what runc takes.
        serde_json::from_slice::<serde_json::Value>(&resources.value)
            .map_err(|e| Error::InvalidArgument(format!("resources are not JSON: {e}")))?;
        let file = tempfile::Builder::new()
            .prefix("update-")
            .suffix(".json")
            .tempfile_in(&self.bundle)
            .map_err(Error::io("resources file"))?;
        std::fs::write(file.path(), &resources.value).map_err(Error::io("write resources"))?;
        self.runc.update(&self.id, file.path()).await
    }

    pub async fn pids(&self) -> Result<Vec<i32>> {
        self.init.require(
            &[Status::Created, Status::Running, Status::Paused],
            "list pids of",
        )?;
        // An exec being started shows up in runc's list before its pid is known
        // here: let such starts finish, and hold the others back while runc
        // lists, so that every pid it lists gets its exec id.
        let starting: Vec<_> = super::lock(&self.execs)
            .values()
            .filter(|p| p.status() == Status::Created)
            .cloned()
            .collect();
        let mut held = Vec::with_capacity(starting.len());
        for p in &starting {
            held.push(p.start_gate.lock().await);
        }
        let pids = self.runc.ps(&self.id).await;
        drop(held);
        pids
    }

    pub fn stats(&self) -> Result<Any> {
        let pid = self.init.pid();
        let status = self.init.status();
        if pid == 0 || status == Status::Stopped {
            return Err(Error::FailedPrecondition(format!(
                "cannot collect stats of {}: it is not running",
                self.init.describe()
            )));
        }
        // The container's own cgroup, from runc's state (the init's only if it names none).
        let own = crate::cgroup::of_container(&self.runc.root, &self.id).ok();
        let cgroup = match &own {
            Some(cg) => cg.for_metrics()?,
            None => get_cgroup(pid as u32).map_err(Error::shim("find cgroup"))?,
        };
        let any = if cgroup.v2() {
            convert_to_any(Box::new(
                collect_metrics_v2(&cgroup).map_err(Error::shim("collect cgroup v2 metrics"))?,
            ))
        } else {
            let mut metrics =
                collect_metrics(&cgroup).map_err(Error::shim("collect cgroup metrics"))?;
            // The collector leaves CPU usage out: from cpuacct, as the Go shim reads it.
            let dir = |c: &str| match &own {
                Some(cg) => cg.v1.get(c).cloned(),
                None => crate::cgroup::v1_of(pid, c),
            };
            let (acct, cpu) = (dir("cpuacct"), dir("cpu"));
            metrics.cpu = Some(crate::cgroup::cpu_v1::stat(acct.as_deref(), cpu.as_deref())).into();
            // The collector leaves the limit out; containerd's clients show it.
            let memory = match own {
                Some(cg) => cg.memory_v1,
                None => crate::cgroup::v1_memory_of(pid),
            };
            if let Some(limit) = memory
                .and_then(|m| std::fs::read_to_string(m.join("memory.limit_in_bytes")).ok())
                .and_then(|t| t.trim().parse::<u64>().ok())
            {
                let memory = metrics.memory.mut_or_insert_default();
                memory.usage.mut_or_insert_default().limit = limit;
            }
            convert_to_any(Box::new(metrics))
        };
        any.map_err(Error::shim("encode metrics"))
    }

    /// Deletes the init: allowed once it stopped, or before it started.
    pub async fn delete_init(&self) -> Result<()> {
        let _op = self.ops.lock().await;
        self.init
            .require(&[Status::Created, Status::Stopped], "delete")?;
        let never_ran = self.init.pid() == 0;
        if !never_ran {
            if let Err(e) = self.runc.delete(&self.id, true).await {
                // A container runc no longer knows is already gone.
                if !matches!(&e, Error::Runc { message, .. } if message.contains("does not exist"))
                {
                    return Err(e);
                }
            }
        }
        self.release().await;
        Ok(())
    }

    pub fn cleanup_rootfs(&self) {
        if self.rootfs_mounted {
            unmount_all(&self.rootfs);
        }
    }
}

async fn mount_all(mounts: &[Mount], rootfs: &Path) -> Result<()> {
    std::fs::create_dir_all(rootfs).map_err(Error::io(format!("create {}", rootfs.display())))?;
    for m in mounts {
        if let Err(e) = containerd_shim::util::mount_rootfs(m, rootfs).await {
            unmount_all(rootfs);
            return Err(Error::Shim {
                context: format!("mount {} ({}) on {}", m.source, m.type_, rootfs.display()),
                source: e,
            });
        }
    }
    Ok(())
}

/// Unmounts everything at and below `target`, deepest first.
pub fn unmount_all(target: &Path) {
    let Some(t) = target.to_str() else { return };
    if let Err(e) = containerd_shim::mount::umount_recursive(Some(t), libc::MNT_DETACH) {
        warn!("unmount {t}: {e}");
    }
}

pub(super) async fn read_pid_file(path: &Path) -> Result<i32> {
    let text = tokio::fs::read_to_string(path)
        .await
        .map_err(Error::io(format!("read pid file {}", path.display())))?;
    text.trim()
        .parse()
        .map_err(|e| Error::Internal(format!("bad pid file {}: {e}", path.display())))
}
