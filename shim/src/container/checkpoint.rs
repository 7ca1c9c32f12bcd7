//! The container's side of checkpoint and restore: when they may run (an
//! owned operation, under the container's lock, in a state that allows
//! them) and the [`Target`] they see of it. What they do is in
//! `crate::checkpoint`.

use std::{path::PathBuf, sync::Arc};

use containerd_shim_protos::events::task::TaskResumed;
use log::{debug, info};

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
    /// thawed, or paused if it was — with no partial files.
    pub async fn checkpoint(
        self: &Arc<Self>,
        path: PathBuf,
        opts: CheckpointOptions,
        deadline: Option<std::time::Duration>,
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
        owned::run_within(deadline, move |caller| async move {
            let (files, result) = {
                let _op = this.ops.lock().await;
                caller.check("the checkpoint")?;
                let status = this
                    .init
                    .require(&[Status::Running, Status::Paused], "checkpoint")?;
                let files = FilesBy::at_checkpoint(this.cri_container, &opts, status);
                let target = this.target();
                let r = checkpoint::dump(&target, &path, &opts, status, files, &caller).await;
                (files, r)
            };
            if result.is_err() && caller.gone() && files == FilesBy::ContainerdCri {
                this.end_cri_pause().await;
            }
            result
        })
        .await
    }

    /// containerd's CRI paused the task only to checkpoint it, and resumes it
    /// when done — with the same context, whose deadline has passed when its
    /// caller gave up, so that resume may never come (the Go shim refuses it
    /// and the container stays paused for good). The shim ends that pause
    /// itself; a resume from containerd that comes anyway finds it running.
    async fn end_cri_pause(&self) {
        match self.resume().await {
            Ok(()) => {
                info!(
                    "container {}: the CRI checkpoint's caller gave up; resumed the task containerd paused for it",
                    self.id
                );
                self.shared.publisher.publish(TaskResumed {
                    container_id: self.id.clone(),
                    ..Default::default()
                });
            }
            // Resumed already (containerd's own resume came first), or gone.
            Err(e) => debug!(
                "container {}: no resume after the CRI checkpoint: {e}",
                self.id
            ),
        }
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
