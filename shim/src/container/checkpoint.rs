//! The container's side of checkpoint and restore: when they may run (an
//! owned operation, under the container's lock, in a state that allows
//! them) and the [`Target`] they see of it. What they do is in
//! `crate::checkpoint`.

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use containerd_shim_protos::events::task::TaskResumed;
use log::{debug, info, warn};

use super::{lock, Container, Status};
use crate::{
    checkpoint::{self, FilesBy, RestoreSource, Target},
    error::{Error, Result},
    options::CheckpointOptions,
    owned,
};

impl Container {
    /// All that checkpoint and restore may use of this container.
    pub(super) fn target(&self) -> Target<'_> {
        Target {
            id: &self.id,
            bundle: &self.bundle,
            rootfs: &self.rootfs,
            runc: &self.runc,
            init_pid: self.init.pid(),
        }
    }

    /// Checkpoints the container into `path`. The work runs to completion or
    /// rolls back in a task of its own: a caller that gives up (a deadline, a
    /// closed connection) leaves the container as it was — running and
    /// thawed, or paused if it was — with no partial files. On containerd's
    /// CRI path the pause is containerd's, and it is ended (see
    /// [`Self::end_cri_pause`]).
    pub async fn checkpoint(
        self: &Arc<Self>,
        path: PathBuf,
        opts: CheckpointOptions,
        deadline: Option<Duration>,
    ) -> Result<()> {
        let this = self.clone();
        // Seen now, in the request: containerd makes the directory before it
        // asks, and removes it when its caller gives up.
        if opts.image_path.is_empty() && !path.as_os_str().is_empty() && !path.is_dir() {
            // Gone already: its caller gave up before the request got here.
            // Never make it anew.
            return Err(Error::FailedPrecondition(format!(
                "checkpoint path {} does not exist (its caller gave up?); nothing was done",
                path.display()
            )));
        }
        let arrived = Instant::now();
        // A pause that came just before this request, of a CRI container
        // asked with no options: containerd's CRI paused it for this checkpoint.
        if opts.lazy {
            return self.checkpoint_lazy(path, opts, deadline).await;
        }
        let pauses = *lock(&self.pauses);
        let cri_pause = (self.cri_container && !opts.given)
            .then_some(pauses)
            .filter(|p| {
                p.since
                    .is_some_and(|t| t.elapsed() < FilesBy::CRI_PAUSE_WINDOW)
            })
            .map(|p| p.generation);
        owned::run_within(deadline, move |caller| async move {
            let result = async {
                let _op = this.ops.lock().await;
                caller.check("the checkpoint")?;
                let status = this
                    .init
                    .require(&[Status::Running, Status::Paused], "checkpoint")?;
                let files =
                    FilesBy::at_checkpoint(this.cri_container, &opts, status, cri_pause.is_some());
                let target = this.target();
                checkpoint::dump(&target, &path, &opts, status, files, &caller, &mut None).await
            }
            .await;
            if let Some(generation) = cri_pause {
                let ends = if caller.gone() {
                    Some(Instant::now())
                } else {
                    deadline.map(|d| arrived + d)
                };
                if let Some(at) = ends {
                    this.end_cri_pause(generation, at);
                }
            }
            result
        })
        .await
    }

    /// A lazy checkpoint: answered once CRIU is ready (every image but the
    /// memory pages written, the rootfs diff in the same freeze), while the
    /// container stays frozen, under its lock, until the destination has
    /// every page (the container then exits) or fails (it runs on).
    async fn checkpoint_lazy(
        self: &Arc<Self>,
        path: PathBuf,
        opts: CheckpointOptions,
        deadline: Option<Duration>,
    ) -> Result<()> {
        let this = self.clone();
        owned::run_within(deadline, move |caller| async move {
            let (tx, rx) = tokio::sync::oneshot::channel();
            tokio::spawn(async move {
                let mut ready = Some(tx);
                let _op = this.ops.lock().await;
                let result = async {
                    caller.check("the checkpoint")?;
                    let status = this
                        .init
                        .require(&[Status::Running, Status::Paused], "checkpoint")?;
                    let target = this.target();
                    checkpoint::dump(
                        &target,
                        &path,
                        &opts,
                        status,
                        FilesBy::Shim,
                        &caller,
                        &mut ready,
                    )
                    .await
                }
                .await;
                match ready.take() {
                    Some(tx) => {
                        let _ = tx.send(result);
                    }
                    None => match result {
                        Ok(()) => info!("container {}: lazy migration complete", this.id),
                        Err(e) => warn!("container {}: lazy migration: {e}", this.id),
                    },
                }
            });
            rx.await.map_err(|_| {
                Error::Internal("the lazy checkpoint ended without an answer".into())
            })?
        })
        .await
    }

    /// containerd's CRI paused the task only to checkpoint it, and resumes it
    /// when done — with the same context, whose deadline may have passed by
    /// then. This shim honours such a late Resume (the Go shim refuses it and
    /// the container stays paused for good), but a containerd that died or
    /// lost its connection sends none. So at the caller's deadline (`at`), or
    /// at once if it is gone already, the shim ends that same pause itself:
    /// only if no Pause or Resume came since (`generation`), so that a pause
    /// of anyone else's stays.
    fn end_cri_pause(self: &Arc<Self>, generation: u64, at: Instant) {
        let this = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until(at.into()).await;
            let _op = this.ops.lock().await;
            if lock(&this.pauses).generation != generation {
                return;
            }
            match this.resume_locked().await {
                Ok(()) => {
                    info!(
                        "container {}: the CRI checkpoint's caller is gone; resumed the task containerd paused for it",
                        this.id
                    );
                    this.shared.publisher.publish(TaskResumed {
                        container_id: this.id.clone(),
                        ..Default::default()
                    });
                }
                // Gone, or exited with the checkpoint.
                Err(e) => debug!(
                    "container {}: no resume after the CRI checkpoint: {e}",
                    this.id
                ),
            }
        });
    }

    /// Applies a checkpoint's files at Create; its memory comes back at Start.
    pub(super) async fn prepare_restore(
        &self,
        image: PathBuf,
        parent: Option<PathBuf>,
    ) -> Result<()> {
        let files = FilesBy::at_restore(self.cri_container, &image);
        let source = RestoreSource::prepare(
            &image,
            parent,
            &self.target(),
            &self.options.criu_work_path,
            files,
        )
        .await?;
        *lock(&self.restore) = Some(source);
        Ok(())
    }
}
