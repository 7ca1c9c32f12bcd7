//! The gRPC calls the benchmark times, through containerd-client: Tasks.Checkpoint with no pause
//! (under a lease, so that containerd keeps the blob), and a restore into a new container made from
//! a fresh snapshot of the image — Tasks.Create with the checkpoint descriptor, then Tasks.Start,
//! each timed on its own (the custom shim applies the rootfs diff in Create, CRIU restores in Start).
//! The connection, lease and container cloning are the harness's [`Client`] this derefs to.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use containerd_client::services::v1::{CreateTaskRequest, WaitRequest};
use containerd_client::types::Descriptor;
use integration::grpc::{CheckpointOptions, Client, CRIU_CHECKPOINT_MEDIA_TYPE};

/// One connection to the private containerd, in its namespace, optionally under a lease.
pub struct Api {
    client: Client,
}

integration::deref_to_grpc_client!(Api);

impl Api {
    /// Connects to the gRPC socket `address`; `root` is containerd's root dir (content store).
    pub fn connect(address: &Path, namespace: &str, root: &Path) -> Result<Api, String> {
        Ok(Api {
            client: Client::connect(address, namespace, root)?,
        })
    }

    /// Tasks.Checkpoint of `id` (no pause around it; `exit` or leave running). Returns the
    /// checkpoint blob's descriptor and how long the call took.
    pub fn checkpoint(&self, id: &str, exit: bool) -> Result<(Descriptor, Duration), String> {
        let opts = CheckpointOptions {
            exit,
            ..Default::default()
        };
        let t = Instant::now();
        let descs = self
            .checkpoint_task(id, Some(opts.to_any()))
            .map_err(|s| format!("Tasks.Checkpoint({id}): {} ({:?})", s.message(), s.code()))?;
        let took = t.elapsed();
        let d = descs
            .into_iter()
            .find(|d| d.media_type == CRIU_CHECKPOINT_MEDIA_TYPE)
            .ok_or_else(|| format!("Tasks.Checkpoint({id}): no {CRIU_CHECKPOINT_MEDIA_TYPE}"))?;
        Ok((d, took))
    }

    /// Where the content store keeps the blob of `desc`.
    pub fn blob_path(&self, desc: &Descriptor) -> PathBuf {
        let hex = desc.digest.strip_prefix("sha256:").unwrap_or(&desc.digest);
        self.content_dir().join(hex)
    }

    /// Tasks.Wait: until the init of `id` has exited.
    pub fn wait(&self, id: &str) -> Result<(), String> {
        let req = self.try_request(WaitRequest {
            container_id: id.to_string(),
            exec_id: String::new(),
        })?;
        let mut client = self.tasks();
        self.block_on(client.wait(req))
            .map_err(|s| format!("Tasks.Wait({id}): {}", s.message()))?;
        Ok(())
    }

    /// Tasks.Delete of a stopped task.
    pub fn delete_task(&self, id: &str) -> Result<(), String> {
        self.delete_task_status(id)
            .map_err(|s| format!("Tasks.Delete({id}): {}", s.message()))?;
        Ok(())
    }

    /// Container `new_id` like `template` (image, runtime and options, spec with its own cgroup)
    /// on a FRESH snapshot of the image, as containerd's `client.Restore` makes one.
    pub fn clone_container(&self, template: &str, new_id: &str) -> Result<(), String> {
        self.try_clone_container(template, new_id, None, &[])
    }

    /// Tasks.Create of `id` (rootfs: its snapshot; no IO) from `checkpoint`, timed.
    pub fn create_from_checkpoint(
        &self,
        id: &str,
        checkpoint: &Descriptor,
    ) -> Result<Duration, String> {
        let mounts = self.rootfs_mounts_of(&self.try_container(id)?)?;
        let req = CreateTaskRequest {
            container_id: id.to_string(),
            rootfs: mounts,
            checkpoint: Some(checkpoint.clone()),
            ..Default::default()
        };
        let t = Instant::now();
        self.create_task_with(req)
            .map_err(|s| format!("Tasks.Create({id}) from a checkpoint: {}", s.message()))?;
        Ok(t.elapsed())
    }

    /// Tasks.Start of `id`'s init, timed; returns its pid.
    pub fn start(&self, id: &str) -> Result<(u32, Duration), String> {
        let t = Instant::now();
        let pid = self
            .start_process(id, "")
            .map_err(|s| format!("Tasks.Start({id}): {}", s.message()))?;
        Ok((pid, t.elapsed()))
    }
}
