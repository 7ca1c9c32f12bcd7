//! The container's side of checkpoint and restore: when they may run (an
//! owned operation, under the container's lock, in a state that allows
//! them) and the [`Target`] they see of it. What they do is in
//! `crate::checkpoint`.

use std::{path::PathBuf, sync::Arc};

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
            let _op = this.ops.lock().await;
            caller.check("the checkpoint")?;
            let status = this
                .init
                .require(&[Status::Running, Status::Paused], "checkpoint")?;
            let files = FilesBy::at_checkpoint(this.cri_container, &opts, status);
            checkpoint::dump(&this.target(), &path, &opts, status, files, &caller).await
        })
        .await
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
