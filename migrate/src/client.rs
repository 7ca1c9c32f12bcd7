//! One connection to a containerd, in one namespace, under an optional lease:
//! the gRPC calls the commands make, with errors that name the call and the
//! object.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use containerd_client::services::v1::content_client::ContentClient;
use containerd_client::services::v1::images_client::ImagesClient;
use containerd_client::services::v1::leases_client::LeasesClient;
use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use containerd_client::services::v1::snapshots::{
    PrepareSnapshotRequest, RemoveSnapshotRequest, StatSnapshotRequest,
};
use containerd_client::services::v1::transfer_client::TransferClient;
use containerd_client::services::v1::{
    containers_client::ContainersClient, tasks_client::TasksClient, CheckpointTaskRequest,
    Container, CreateContainerRequest, CreateImageRequest, CreateRequest as CreateLeaseRequest,
    CreateTaskRequest, DeleteContainerRequest, DeleteImageRequest,
    DeleteRequest as DeleteLeaseRequest, DeleteTaskRequest, GetContainerRequest, GetImageRequest,
    GetRequest, Image, KillRequest, PauseTaskRequest, ReadContentRequest, ReadContentResponse,
    ResumeTaskRequest, StartRequest, TransferOptions, TransferRequest, WaitRequest, WriteAction,
    WriteContentRequest,
};
use containerd_client::tonic::transport::Channel;
use containerd_client::tonic::{Code, Request, Response, Status};
use containerd_client::types::{Descriptor, Mount};
use prost_types::Any;

/// Task status values of containerd's API (`containerd.v1.types.Status`).
pub const TASK_RUNNING: i32 = 2;
pub const TASK_PAUSED: i32 = 4;

pub struct Cd {
    channel: Channel,
    namespace: String,
    address: String,
    lease: Option<String>,
}

fn not_found(s: &Status) -> bool {
    s.code() == Code::NotFound
}

/// A call's response, None when containerd answers NotFound; other errors name `call`.
fn unless_not_found<T>(
    r: std::result::Result<Response<T>, Status>,
    call: impl FnOnce() -> String,
) -> Result<Option<T>> {
    match r {
        Ok(r) => Ok(Some(r.into_inner())),
        Err(s) if not_found(&s) => Ok(None),
        Err(s) => Err(anyhow!(s).context(call())),
    }
}

impl Cd {
    pub async fn connect(address: &Path, namespace: &str) -> Result<Cd> {
        let channel = containerd_client::connect(address)
            .await
            .with_context(|| format!("connect to containerd at {}", address.display()))?;
        Ok(Cd {
            channel,
            namespace: namespace.to_string(),
            address: address.display().to_string(),
            lease: None,
        })
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// Where this containerd is, for messages: "containerd at ADDRESS (namespace NS)".
    pub fn describe(&self) -> String {
        format!(
            "containerd at {} (namespace {})",
            self.address, self.namespace
        )
    }

    fn req<T>(&self, msg: T) -> Request<T> {
        let mut r = Request::new(msg);
        if let Ok(v) = self.namespace.parse() {
            r.metadata_mut().insert("containerd-namespace", v);
        }
        if let Some(lease) = self.lease.as_ref().and_then(|l| l.parse().ok()) {
            r.metadata_mut().insert("containerd-lease", lease);
        }
        r
    }

    /// Takes a lease (content and snapshots made from now on are kept until
    /// [`Self::end_lease`]), expiring by itself after an hour.
    pub async fn lease(&mut self, id: &str) -> Result<()> {
        let labels = HashMap::from([("containerd.io/gc.expire".to_string(), time_in(3600))]);
        LeasesClient::new(self.channel.clone())
            .create(self.req(CreateLeaseRequest {
                id: id.to_string(),
                labels,
            }))
            .await
            .with_context(|| format!("Leases.Create({id})"))?;
        self.lease = Some(id.to_string());
        Ok(())
    }

    pub async fn end_lease(&mut self) {
        if let Some(id) = self.lease.take() {
            let _ = LeasesClient::new(self.channel.clone())
                .delete(self.req(DeleteLeaseRequest { id, sync: false }))
                .await;
        }
    }

    /// Container `id`, None when there is none.
    pub async fn find_container(&self, id: &str) -> Result<Option<Container>> {
        let r = ContainersClient::new(self.channel.clone())
            .get(self.req(GetContainerRequest { id: id.to_string() }))
            .await;
        Ok(unless_not_found(r, || format!("Containers.Get({id})"))?.and_then(|r| r.container))
    }

    pub async fn container(&self, id: &str) -> Result<Container> {
        self.find_container(id)
            .await?
            .ok_or_else(|| anyhow!("no container {id} in {}", self.describe()))
    }

    pub async fn container_exists(&self, id: &str) -> Result<bool> {
        Ok(self.find_container(id).await?.is_some())
    }

    pub async fn create_container(&self, c: Container) -> Result<()> {
        let id = c.id.clone();
        ContainersClient::new(self.channel.clone())
            .create(self.req(CreateContainerRequest { container: Some(c) }))
            .await
            .with_context(|| format!("Containers.Create({id})"))?;
        Ok(())
    }

    pub async fn delete_container(&self, id: &str) -> Result<()> {
        let r = ContainersClient::new(self.channel.clone())
            .delete(self.req(DeleteContainerRequest { id: id.to_string() }))
            .await;
        unless_not_found(r, || format!("Containers.Delete({id})")).map(drop)
    }

    /// The task's status (containerd's enum), None when there is no task.
    pub async fn task_status(&self, id: &str) -> Result<Option<i32>> {
        let r = TasksClient::new(self.channel.clone())
            .get(self.req(GetRequest {
                container_id: id.to_string(),
                exec_id: String::new(),
            }))
            .await;
        Ok(unless_not_found(r, || format!("Tasks.Get({id})"))?
            .and_then(|r| r.process.map(|p| p.status)))
    }

    pub async fn pause(&self, id: &str) -> Result<()> {
        TasksClient::new(self.channel.clone())
            .pause(self.req(PauseTaskRequest {
                container_id: id.to_string(),
            }))
            .await
            .with_context(|| format!("Tasks.Pause({id})"))?;
        Ok(())
    }

    pub async fn resume(&self, id: &str) -> Result<()> {
        TasksClient::new(self.channel.clone())
            .resume(self.req(ResumeTaskRequest {
                container_id: id.to_string(),
            }))
            .await
            .with_context(|| format!("Tasks.Resume({id})"))?;
        Ok(())
    }

    pub async fn checkpoint(&self, id: &str, options: Any) -> Result<()> {
        TasksClient::new(self.channel.clone())
            .checkpoint(self.req(CheckpointTaskRequest {
                container_id: id.to_string(),
                parent_checkpoint: String::new(),
                options: Some(options),
            }))
            .await
            .map_err(|s| anyhow!("{}", s.message()))
            .with_context(|| format!("Tasks.Checkpoint({id})"))?;
        Ok(())
    }

    pub async fn create_task(&self, req: CreateTaskRequest) -> Result<u32> {
        let id = req.container_id.clone();
        let r = TasksClient::new(self.channel.clone())
            .create(self.req(req))
            .await
            .map_err(|s| anyhow!("{}", s.message()))
            .with_context(|| format!("Tasks.Create({id})"))?;
        Ok(r.into_inner().pid)
    }

    pub async fn start(&self, id: &str) -> Result<u32> {
        let r = TasksClient::new(self.channel.clone())
            .start(self.req(StartRequest {
                container_id: id.to_string(),
                exec_id: String::new(),
            }))
            .await
            .map_err(|s| anyhow!("{}", s.message()))
            .with_context(|| format!("Tasks.Start({id})"))?;
        Ok(r.into_inner().pid)
    }

    /// Kills the task with SIGKILL, waits for it and deletes it; no task is fine.
    pub async fn remove_task(&self, id: &str) -> Result<()> {
        let Some(status) = self.task_status(id).await? else {
            return Ok(());
        };
        let mut tasks = TasksClient::new(self.channel.clone());
        if status == TASK_RUNNING || status == TASK_PAUSED {
            let mut waiter = tasks.clone();
            let wait = waiter.wait(self.req(WaitRequest {
                container_id: id.to_string(),
                exec_id: String::new(),
            }));
            let kill = tasks.kill(self.req(KillRequest {
                container_id: id.to_string(),
                exec_id: String::new(),
                signal: libc::SIGKILL as u32,
                all: true,
            }));
            let (w, k) = tokio::join!(wait, kill);
            unless_not_found(k, || format!("Tasks.Kill({id})"))?;
            unless_not_found(w, || format!("Tasks.Wait({id})"))?;
        }
        let r = tasks
            .delete(self.req(DeleteTaskRequest {
                container_id: id.to_string(),
            }))
            .await;
        unless_not_found(r, || format!("Tasks.Delete({id})")).map(drop)
    }

    pub async fn image(&self, name: &str) -> Result<Option<Image>> {
        let r = ImagesClient::new(self.channel.clone())
            .get(self.req(GetImageRequest {
                name: name.to_string(),
            }))
            .await;
        Ok(unless_not_found(r, || format!("Images.Get({name})"))?.and_then(|r| r.image))
    }

    /// Creates (or replaces) image `name` pointing at `target`.
    pub async fn put_image(&self, name: &str, target: Descriptor) -> Result<()> {
        let _ = ImagesClient::new(self.channel.clone())
            .delete(self.req(DeleteImageRequest {
                name: name.to_string(),
                sync: false,
                target: None,
            }))
            .await;
        ImagesClient::new(self.channel.clone())
            .create(self.req(CreateImageRequest {
                image: Some(Image {
                    name: name.to_string(),
                    target: Some(target),
                    ..Default::default()
                }),
                source_date_epoch: None,
            }))
            .await
            .with_context(|| format!("Images.Create({name})"))?;
        Ok(())
    }

    /// Streams `data` (chunks from the channel) into the content store;
    /// returns the committed digest.
    pub async fn write_content(
        &self,
        reference: &str,
        mut data: tokio::sync::mpsc::Receiver<Vec<u8>>,
        labels: HashMap<String, String>,
    ) -> Result<String> {
        let (tx, rx) = tokio::sync::mpsc::channel::<WriteContentRequest>(4);
        let reference = reference.to_string();
        let r2 = reference.clone();
        let feeder = tokio::spawn(async move {
            let mut offset = 0i64;
            while let Some(chunk) = data.recv().await {
                let len = chunk.len() as i64;
                let msg = WriteContentRequest {
                    action: WriteAction::Write as i32,
                    r#ref: r2.clone(),
                    offset,
                    data: chunk,
                    ..Default::default()
                };
                if tx.send(msg).await.is_err() {
                    return;
                }
                offset += len;
            }
            let _ = tx
                .send(WriteContentRequest {
                    action: WriteAction::Commit as i32,
                    r#ref: r2,
                    total: offset,
                    offset,
                    labels,
                    ..Default::default()
                })
                .await;
        });
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
        let mut responses = ContentClient::new(self.channel.clone())
            .write(self.req(stream))
            .await
            .with_context(|| format!("Content.Write({reference})"))?
            .into_inner();
        let mut digest = String::new();
        while let Some(r) = responses
            .message()
            .await
            .with_context(|| format!("Content.Write({reference})"))?
        {
            if r.action == WriteAction::Commit as i32 {
                digest = r.digest;
            }
        }
        let _ = feeder.await;
        if digest.is_empty() {
            bail!("Content.Write({reference}): containerd committed nothing");
        }
        Ok(digest)
    }

    pub async fn write_blob(
        &self,
        reference: &str,
        bytes: Vec<u8>,
        labels: HashMap<String, String>,
    ) -> Result<String> {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tx.send(bytes).await.ok();
        drop(tx);
        self.write_content(reference, rx, labels).await
    }

    /// Content.Read's stream of blob `digest`, whole.
    async fn content_stream(
        &self,
        digest: &str,
    ) -> Result<containerd_client::tonic::Streaming<ReadContentResponse>> {
        Ok(ContentClient::new(self.channel.clone())
            .read(self.req(ReadContentRequest {
                digest: digest.to_string(),
                offset: 0,
                size: 0,
            }))
            .await
            .with_context(|| format!("Content.Read({digest})"))?
            .into_inner())
    }

    pub async fn read_blob(&self, digest: &str) -> Result<Vec<u8>> {
        let mut stream = self.content_stream(digest).await?;
        let mut out = Vec::new();
        while let Some(r) = stream
            .message()
            .await
            .with_context(|| format!("Content.Read({digest})"))?
        {
            out.extend_from_slice(&r.data);
        }
        Ok(out)
    }

    /// Reads blob `digest` into the channel (closed at the end); returns its size.
    pub async fn read_content_into(
        &self,
        digest: &str,
        tx: tokio::sync::mpsc::Sender<Vec<u8>>,
    ) -> Result<u64> {
        let mut stream = self.content_stream(digest).await?;
        let mut n = 0u64;
        while let Some(r) = stream
            .message()
            .await
            .with_context(|| format!("Content.Read({digest})"))?
        {
            n += r.data.len() as u64;
            if tx.send(r.data).await.is_err() {
                // The reader stopped: its error says why.
                break;
            }
        }
        Ok(n)
    }

    /// containerd's Transfer service (what `ctr images pull/push` use).
    pub async fn transfer(&self, source: Any, destination: Any, what: &str) -> Result<()> {
        TransferClient::new(self.channel.clone())
            .transfer(self.req(TransferRequest {
                source: Some(source),
                destination: Some(destination),
                options: Some(TransferOptions::default()),
            }))
            .await
            .map_err(|s| anyhow!("{}", s.message()))
            .with_context(|| format!("{what} (containerd's Transfer service)"))?;
        Ok(())
    }

    pub async fn snapshot_exists(&self, snapshotter: &str, key: &str) -> Result<bool> {
        let r = SnapshotsClient::new(self.channel.clone())
            .stat(self.req(StatSnapshotRequest {
                snapshotter: snapshotter.to_string(),
                key: key.to_string(),
            }))
            .await;
        Ok(unless_not_found(r, || format!("Snapshots.Stat({key})"))?.is_some())
    }

    pub async fn prepare_snapshot(
        &self,
        snapshotter: &str,
        key: &str,
        parent: &str,
    ) -> Result<Vec<Mount>> {
        let r = SnapshotsClient::new(self.channel.clone())
            .prepare(self.req(PrepareSnapshotRequest {
                snapshotter: snapshotter.to_string(),
                key: key.to_string(),
                parent: parent.to_string(),
                labels: HashMap::new(),
            }))
            .await
            .with_context(|| format!("Snapshots.Prepare({key})"))?;
        Ok(r.into_inner().mounts)
    }

    pub async fn remove_snapshot(&self, snapshotter: &str, key: &str) -> Result<()> {
        let r = SnapshotsClient::new(self.channel.clone())
            .remove(self.req(RemoveSnapshotRequest {
                snapshotter: snapshotter.to_string(),
                key: key.to_string(),
            }))
            .await;
        unless_not_found(r, || format!("Snapshots.Remove({key})")).map(drop)
    }

    /// Removes a container with its task and snapshot, as `ctr rm` with
    /// `--snapshot` cleanup would.
    pub async fn remove_container(&self, id: &str) -> Result<()> {
        let Some(c) = self.find_container(id).await? else {
            return Ok(());
        };
        self.remove_task(id).await?;
        self.delete_container(id).await?;
        if !c.snapshot_key.is_empty() {
            self.remove_snapshot(&c.snapshotter, &c.snapshot_key)
                .await?;
        }
        Ok(())
    }
}

/// An RFC 3339 time `secs` from now (UTC), for containerd's gc.expire label.
fn time_in(secs: u64) -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
        + secs;
    crate::archive::rfc3339(t)
}
