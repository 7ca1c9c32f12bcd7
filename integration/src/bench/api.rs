//! The gRPC calls the benchmark times, through containerd-client: Tasks.Checkpoint with no pause
//! (under a lease, so that containerd keeps the blob), and a restore into a new container made from
//! a fresh snapshot of the image — Tasks.Create with the checkpoint descriptor, then Tasks.Start,
//! each timed on its own (the custom shim applies the rootfs diff in Create, CRIU restores in Start).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use containerd_client::services::v1::containers_client::ContainersClient;
use containerd_client::services::v1::leases_client::LeasesClient;
use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use containerd_client::services::v1::snapshots::{
    MountsRequest, PrepareSnapshotRequest, StatSnapshotRequest,
};
use containerd_client::services::v1::tasks_client::TasksClient;
use containerd_client::services::v1::{
    CheckpointTaskRequest, Container, CreateContainerRequest, CreateRequest as CreateLeaseRequest,
    CreateTaskRequest, DeleteRequest as DeleteLeaseRequest, DeleteTaskRequest, GetContainerRequest,
    StartRequest, WaitRequest,
};
use containerd_client::tonic::transport::Channel;
use containerd_client::tonic::Request;
use containerd_client::types::Descriptor;
use prost::Message;
use prost_types::Any;

/// Media type of the blob containerd makes of a checkpoint directory.
pub const CRIU_CHECKPOINT_MEDIA_TYPE: &str =
    "application/vnd.containerd.container.criu.checkpoint.criu.tar";

/// `containerd.runc.v1.CheckpointOptions` (containerd's api/types/runc/options/oci.proto), only
/// the field the benchmark sets; both shims read it.
#[derive(Clone, PartialEq, Message)]
struct CheckpointOptions {
    #[prost(bool, tag = "1")]
    exit: bool,
}

/// One connection to the private containerd, in its namespace, optionally under a lease.
pub struct Api {
    rt: tokio::runtime::Runtime,
    channel: Channel,
    namespace: String,
    lease: Option<String>,
    content_root: PathBuf,
}

impl Api {
    /// Connects to the gRPC socket `address`; `root` is containerd's root dir (content store).
    pub fn connect(address: &Path, namespace: &str, root: &Path) -> Result<Api, String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("tokio runtime: {e}"))?;
        let channel = rt
            .block_on(containerd_client::connect(address))
            .map_err(|e| format!("connect {}: {e}", address.display()))?;
        Ok(Api {
            rt,
            channel,
            namespace: namespace.to_string(),
            lease: None,
            content_root: root.join("io.containerd.content.v1.content/blobs/sha256"),
        })
    }

    fn request<T>(&self, msg: T) -> Result<Request<T>, String> {
        let mut req = Request::new(msg);
        let md = req.metadata_mut();
        md.insert(
            "containerd-namespace",
            self.namespace
                .parse()
                .map_err(|e| format!("namespace: {e}"))?,
        );
        if let Some(lease) = &self.lease {
            md.insert(
                "containerd-lease",
                lease.parse().map_err(|e| format!("lease: {e}"))?,
            );
        }
        Ok(req)
    }

    /// Leases.Create; every later request carries the lease until [`Self::drop_lease`].
    pub fn take_lease(&mut self, id: &str) -> Result<(), String> {
        let req = self.request(CreateLeaseRequest {
            id: id.to_string(),
            labels: HashMap::new(),
        })?;
        let mut client = LeasesClient::new(self.channel.clone());
        self.rt
            .block_on(client.create(req))
            .map_err(|s| format!("Leases.Create({id}): {s}"))?;
        self.lease = Some(id.to_string());
        Ok(())
    }

    /// Leases.Delete (sync: containerd collects what only the lease held, e.g. checkpoint blobs).
    pub fn drop_lease(&mut self) -> Result<(), String> {
        let Some(id) = self.lease.take() else {
            return Ok(());
        };
        let req = self.request(DeleteLeaseRequest {
            id: id.clone(),
            sync: true,
        })?;
        let mut client = LeasesClient::new(self.channel.clone());
        self.rt
            .block_on(client.delete(req))
            .map_err(|s| format!("Leases.Delete({id}): {s}"))?;
        Ok(())
    }

    /// Tasks.Checkpoint of `id` (no pause around it; `exit` or leave running). Returns the
    /// checkpoint blob's descriptor and how long the call took.
    pub fn checkpoint(&self, id: &str, exit: bool) -> Result<(Descriptor, Duration), String> {
        let opts = CheckpointOptions { exit };
        let req = self.request(CheckpointTaskRequest {
            container_id: id.to_string(),
            parent_checkpoint: String::new(),
            options: Some(Any {
                type_url: "containerd.runc.v1.CheckpointOptions".to_string(),
                value: opts.encode_to_vec(),
            }),
        })?;
        let mut client = TasksClient::new(self.channel.clone());
        let t = Instant::now();
        let descs = self
            .rt
            .block_on(client.checkpoint(req))
            .map_err(|s| format!("Tasks.Checkpoint({id}): {} ({:?})", s.message(), s.code()))?
            .into_inner()
            .descriptors;
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
        self.content_root.join(hex)
    }

    /// Tasks.Wait: until the init of `id` has exited.
    pub fn wait(&self, id: &str) -> Result<(), String> {
        let req = self.request(WaitRequest {
            container_id: id.to_string(),
            exec_id: String::new(),
        })?;
        let mut client = TasksClient::new(self.channel.clone());
        self.rt
            .block_on(client.wait(req))
            .map_err(|s| format!("Tasks.Wait({id}): {}", s.message()))?;
        Ok(())
    }

    /// Tasks.Delete of a stopped task.
    pub fn delete_task(&self, id: &str) -> Result<(), String> {
        let req = self.request(DeleteTaskRequest {
            container_id: id.to_string(),
        })?;
        let mut client = TasksClient::new(self.channel.clone());
        self.rt
            .block_on(client.delete(req))
            .map_err(|s| format!("Tasks.Delete({id}): {}", s.message()))?;
        Ok(())
    }

    fn container(&self, id: &str) -> Result<Container, String> {
        let req = self.request(GetContainerRequest { id: id.to_string() })?;
        let mut client = ContainersClient::new(self.channel.clone());
        self.rt
            .block_on(client.get(req))
            .map_err(|s| format!("Containers.Get({id}): {}", s.message()))?
            .into_inner()
            .container
            .ok_or_else(|| format!("Containers.Get({id}): no container"))
    }

    /// Container `new_id` like `template` (image, runtime and options, spec with its own cgroup)
    /// on a FRESH snapshot of the image, as containerd's `client.Restore` makes one.
    pub fn clone_container(&self, template: &str, new_id: &str) -> Result<(), String> {
        let t = self.container(template)?;
        let mut snaps = SnapshotsClient::new(self.channel.clone());
        let info = self
            .rt
            .block_on(snaps.stat(self.request(StatSnapshotRequest {
                snapshotter: t.snapshotter.clone(),
                key: t.snapshot_key.clone(),
            })?))
            .map_err(|s| format!("Snapshots.Stat({}): {}", t.snapshot_key, s.message()))?
            .into_inner()
            .info
            .ok_or("Snapshots.Stat: no info")?;
        self.rt
            .block_on(snaps.prepare(self.request(PrepareSnapshotRequest {
                snapshotter: t.snapshotter.clone(),
                key: new_id.to_string(),
                parent: info.parent.clone(),
                labels: HashMap::new(),
            })?))
            .map_err(|s| format!("Snapshots.Prepare({new_id}): {}", s.message()))?;
        let spec_any = t.spec.clone().ok_or("template has no spec")?;
        let mut spec: serde_json::Value =
            serde_json::from_slice(&spec_any.value).map_err(|e| format!("spec: {e}"))?;
        spec["linux"]["cgroupsPath"] = format!("/{}/{new_id}", self.namespace).into();
        let container = Container {
            id: new_id.to_string(),
            image: t.image.clone(),
            runtime: t.runtime.clone(),
            spec: Some(Any {
                type_url: spec_any.type_url.clone(),
                value: serde_json::to_vec(&spec).map_err(|e| e.to_string())?,
            }),
            snapshotter: t.snapshotter.clone(),
            snapshot_key: new_id.to_string(),
            ..Default::default()
        };
        let mut client = ContainersClient::new(self.channel.clone());
        self.rt
            .block_on(client.create(self.request(CreateContainerRequest {
                container: Some(container),
            })?))
            .map_err(|s| format!("Containers.Create({new_id}): {}", s.message()))?;
        Ok(())
    }

    /// Tasks.Create of `id` (rootfs: its snapshot; no IO) from `checkpoint`, timed.
    pub fn create_from_checkpoint(
        &self,
        id: &str,
        checkpoint: &Descriptor,
    ) -> Result<Duration, String> {
        let c = self.container(id)?;
        let mut snaps = SnapshotsClient::new(self.channel.clone());
        let mounts = self
            .rt
            .block_on(snaps.mounts(self.request(MountsRequest {
                snapshotter: c.snapshotter.clone(),
                key: c.snapshot_key.clone(),
            })?))
            .map_err(|s| format!("Snapshots.Mounts({}): {}", c.snapshot_key, s.message()))?
            .into_inner()
            .mounts;
        let req = self.request(CreateTaskRequest {
            container_id: id.to_string(),
            rootfs: mounts,
            checkpoint: Some(checkpoint.clone()),
            ..Default::default()
        })?;
        let mut tasks = TasksClient::new(self.channel.clone());
        let t = Instant::now();
        self.rt
            .block_on(tasks.create(req))
            .map_err(|s| format!("Tasks.Create({id}) from a checkpoint: {}", s.message()))?;
        Ok(t.elapsed())
    }

    /// Tasks.Start of `id`'s init, timed; returns its pid.
    pub fn start(&self, id: &str) -> Result<(u32, Duration), String> {
        let req = self.request(StartRequest {
            container_id: id.to_string(),
            exec_id: String::new(),
        })?;
        let mut tasks = TasksClient::new(self.channel.clone());
        let t = Instant::now();
        let pid = self
            .rt
            .block_on(tasks.start(req))
            .map_err(|s| format!("Tasks.Start({id}): {}", s.message()))?
            .into_inner()
            .pid;
        Ok((pid, t.elapsed()))
    }
}
