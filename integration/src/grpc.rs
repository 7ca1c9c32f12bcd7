//! containerd's gRPC API (containerd-client) as the tests and the benchmark call it: the message
//! types and type URLs containerd-client does not provide, and [`Client`], one connection to a
//! containerd in its namespace, optionally under a lease, with the calls the checkpoint, fault
//! and bench clients share. Those clients ([`crate::checkpoint::Api`], [`crate::faults::Api`],
//! the bench's `Api`) deref to a [`Client`] and add their own calls and error styles.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use containerd_client::services::v1::containers_client::ContainersClient;
use containerd_client::services::v1::leases_client::LeasesClient;
use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use containerd_client::services::v1::snapshots::{
    MountsRequest, PrepareSnapshotRequest, StatSnapshotRequest,
};
use containerd_client::services::v1::tasks_client::TasksClient;
use containerd_client::services::v1::{
    container::Runtime as ContainerRuntime, CheckpointTaskRequest, Container,
    CreateContainerRequest, CreateRequest as CreateLeaseRequest, CreateTaskRequest,
    DeleteRequest as DeleteLeaseRequest, DeleteTaskRequest, GetContainerRequest, StartRequest,
    UpdateTaskRequest,
};
use containerd_client::tonic::transport::Channel;
use containerd_client::tonic::{Request, Status};
use containerd_client::types::{Descriptor, Mount};
use prost::Message;
use prost_types::Any;

use crate::Containerd;

/// Media type of the blob containerd makes of a checkpoint directory.
pub const CRIU_CHECKPOINT_MEDIA_TYPE: &str =
    "application/vnd.containerd.container.criu.checkpoint.criu.tar";
/// Type URL under which containerd and both shims know the runc checkpoint options.
pub const CHECKPOINT_OPTIONS_TYPE_URL: &str = "containerd.runc.v1.CheckpointOptions";
/// Type URL of the runc runtime options.
pub const RUNC_OPTIONS_TYPE_URL: &str = "containerd.runc.v1.Options";
/// Type URL of an OCI process spec (Tasks.Exec).
pub const PROCESS_SPEC_TYPE_URL: &str = "types.containerd.io/opencontainers/runtime-spec/1/Process";
/// Type URL under which containerd (typeurl) registers `specs.LinuxResources` (Tasks.Update);
/// the value is JSON.
pub const LINUX_RESOURCES_TYPE_URL: &str =
    "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources";
/// Files the custom shim adds to a checkpoint directory.
pub const ROOTFS_DIFF: &str = "rootfs-diff.tar";
pub const DELETED_FILES: &str = "deleted.files";
pub const SHIM_METADATA: &str = "custom-shim-checkpoint.json";

/// `containerd.runc.v1.CheckpointOptions` (api/types/runc/options/oci.proto), which
/// containerd-client does not generate.
#[derive(Clone, PartialEq, Message)]
pub struct CheckpointOptions {
    #[prost(bool, tag = "1")]
    pub exit: bool,
    #[prost(bool, tag = "2")]
    pub open_tcp: bool,
    #[prost(bool, tag = "3")]
    pub external_unix_sockets: bool,
    #[prost(bool, tag = "4")]
    pub terminal: bool,
    #[prost(bool, tag = "5")]
    pub file_locks: bool,
    #[prost(string, repeated, tag = "6")]
    pub empty_namespaces: Vec<String>,
    #[prost(string, tag = "7")]
    pub cgroups_mode: String,
    #[prost(string, tag = "8")]
    pub image_path: String,
    #[prost(string, tag = "9")]
    pub work_path: String,
}

impl CheckpointOptions {
    pub fn to_any(&self) -> Any {
        Any {
            type_url: CHECKPOINT_OPTIONS_TYPE_URL.to_string(),
            value: self.encode_to_vec(),
        }
    }
}

/// `impl Deref<Target = Client>` and `DerefMut` for a client type `$t` whose field `client` is
/// the shared [`Client`]: its own calls come first, the shared ones through the deref.
#[macro_export]
macro_rules! deref_to_grpc_client {
    ($t:ty) => {
        impl ::std::ops::Deref for $t {
            type Target = $crate::grpc::Client;
            fn deref(&self) -> &$crate::grpc::Client {
                &self.client
            }
        }

        impl ::std::ops::DerefMut for $t {
            fn deref_mut(&mut self) -> &mut $crate::grpc::Client {
                &mut self.client
            }
        }
    };
}

/// A connection to one containerd, in its namespace, optionally under a lease.
pub struct Client {
    rt: tokio::runtime::Runtime,
    channel: Channel,
    namespace: String,
    lease: Option<String>,
    /// The deadline every request carries (gRPC `grpc-timeout`), if any.
    timeout: Option<std::time::Duration>,
    root: PathBuf,
}

impl Client {
    /// Connects to the gRPC socket `address`; `root` is containerd's root dir (content store).
    pub fn connect(address: &Path, namespace: &str, root: &Path) -> Result<Client, String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("tokio runtime: {e}"))?;
        let channel = rt
            .block_on(containerd_client::connect(address))
            .map_err(|e| format!("connect {}: {e}", address.display()))?;
        Ok(Client {
            rt,
            channel,
            namespace: namespace.to_string(),
            lease: None,
            timeout: None,
            root: root.to_path_buf(),
        })
    }

    /// Connects to `cd`'s gRPC socket, in its namespace; panics when that fails.
    pub fn connect_to(cd: &Containerd) -> Client {
        Client::connect(cd.address(), cd.namespace(), cd.root_dir())
            .unwrap_or_else(|e| panic!("{e}"))
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    pub fn tasks(&self) -> TasksClient<Channel> {
        TasksClient::new(self.channel.clone())
    }

    /// Runs `f` to completion on this client's runtime.
    pub fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    /// Every later request carries this deadline (None: no deadline), as the kubelet puts one
    /// on every CRI call; containerd passes it on to the shim.
    pub fn set_timeout(&mut self, timeout: Option<std::time::Duration>) {
        self.timeout = timeout;
    }

    /// `msg` with the namespace (and the lease, if any) as metadata.
    pub fn try_request<T>(&self, msg: T) -> Result<Request<T>, String> {
        let mut req = Request::new(msg);
        if let Some(t) = self.timeout {
            req.set_timeout(t);
        }
        let md = req.metadata_mut();
        md.insert(
            "containerd-namespace",
            self.namespace
                .parse()
                .map_err(|e| format!("namespace {:?} as metadata: {e}", self.namespace))?,
        );
        if let Some(lease) = &self.lease {
            md.insert(
                "containerd-lease",
                lease
                    .parse()
                    .map_err(|e| format!("lease {lease:?} as metadata: {e}"))?,
            );
        }
        Ok(req)
    }

    /// [`Self::try_request`], panicking on a namespace or lease that is no metadata value.
    pub fn request<T>(&self, msg: T) -> Request<T> {
        self.try_request(msg).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Leases.Create, then carries the lease on every later request (content and snapshots
    /// made under it survive containerd's garbage collection). Returns the lease id.
    pub fn use_new_lease(&mut self, id: &str) -> String {
        let req = self.request(CreateLeaseRequest {
            id: id.to_string(),
            labels: HashMap::new(),
        });
        let lease = self
            .rt
            .block_on(LeasesClient::new(self.channel.clone()).create(req))
            .unwrap_or_else(|s| panic!("Leases.Create({id}): {s}"))
            .into_inner()
            .lease
            .expect("lease in Leases.Create response");
        self.lease = Some(lease.id.clone());
        lease.id
    }

    /// Leases.Create; every later request carries lease `id` until [`Self::drop_lease`].
    pub fn take_lease(&mut self, id: &str) -> Result<(), String> {
        let req = self.try_request(CreateLeaseRequest {
            id: id.to_string(),
            labels: HashMap::new(),
        })?;
        self.rt
            .block_on(LeasesClient::new(self.channel.clone()).create(req))
            .map_err(|s| format!("Leases.Create({id}): {s}"))?;
        self.lease = Some(id.to_string());
        Ok(())
    }

    /// Leases.Delete (sync: containerd collects what only the lease held, e.g. checkpoint blobs).
    pub fn drop_lease(&mut self) -> Result<(), String> {
        let Some(id) = self.lease.take() else {
            return Ok(());
        };
        let req = self.try_request(DeleteLeaseRequest {
            id: id.clone(),
            sync: true,
        })?;
        self.rt
            .block_on(LeasesClient::new(self.channel.clone()).delete(req))
            .map_err(|s| format!("Leases.Delete({id}): {s}"))?;
        Ok(())
    }

    /// Tasks.Checkpoint of container `id` with `options` as given, nothing else around it (no
    /// pause). The descriptors containerd made (the checkpoint blob and the spec).
    pub fn checkpoint_task(
        &self,
        id: &str,
        options: Option<Any>,
    ) -> Result<Vec<Descriptor>, Status> {
        let req = self.request(CheckpointTaskRequest {
            container_id: id.to_string(),
            parent_checkpoint: String::new(),
            options,
        });
        let mut c = self.tasks();
        Ok(self
            .rt
            .block_on(c.checkpoint(req))?
            .into_inner()
            .descriptors)
    }

    /// Tasks.Create (`req` sent as is); the pid (0 for a restore).
    pub fn create_task_with(&self, req: CreateTaskRequest) -> Result<u32, Status> {
        let req = self.request(req);
        let mut c = self.tasks();
        Ok(self.rt.block_on(c.create(req))?.into_inner().pid)
    }

    /// Tasks.Start of process `exec_id` ("" for the init) of `id`; its pid.
    pub fn start_process(&self, id: &str, exec_id: &str) -> Result<u32, Status> {
        let req = self.request(StartRequest {
            container_id: id.to_string(),
            exec_id: exec_id.to_string(),
        });
        let mut c = self.tasks();
        Ok(self.rt.block_on(c.start(req))?.into_inner().pid)
    }

    /// Tasks.Delete; the exit status.
    pub fn delete_task_status(&self, id: &str) -> Result<u32, Status> {
        let req = self.request(DeleteTaskRequest {
            container_id: id.to_string(),
        });
        let mut c = self.tasks();
        Ok(self.rt.block_on(c.delete(req))?.into_inner().exit_status)
    }

    /// Containers.Get.
    pub fn try_container(&self, id: &str) -> Result<Container, String> {
        let req = self.try_request(GetContainerRequest { id: id.to_string() })?;
        self.rt
            .block_on(ContainersClient::new(self.channel.clone()).get(req))
            .map_err(|s| format!("Containers.Get({id}): {s}"))?
            .into_inner()
            .container
            .ok_or_else(|| format!("Containers.Get({id}): no container in the response"))
    }

    /// Containers.Get, panicking on failure.
    pub fn container(&self, id: &str) -> Container {
        self.try_container(id).unwrap_or_else(|e| panic!("{e}"))
    }

    /// The rootfs mounts of container `c`'s snapshot (Snapshots.Mounts).
    pub fn rootfs_mounts_of(&self, c: &Container) -> Result<Vec<Mount>, String> {
        let req = self.try_request(MountsRequest {
            snapshotter: c.snapshotter.clone(),
            key: c.snapshot_key.clone(),
        })?;
        Ok(self
            .rt
            .block_on(SnapshotsClient::new(self.channel.clone()).mounts(req))
            .map_err(|s| format!("Snapshots.Mounts({}): {s}", c.snapshot_key))?
            .into_inner()
            .mounts)
    }

    /// Creates container `new_id` like `template` (same image and spec but its own cgroup,
    /// `annotations` added to the spec) on runtime `runtime` (None: the template's) with the
    /// template's runtime options, with a FRESH snapshot of the image (the parent of the
    /// template's snapshot), as containerd's `client.Restore` does.
    pub fn try_clone_container(
        &self,
        template: &str,
        new_id: &str,
        runtime: Option<&str>,
        annotations: &[(&str, &str)],
    ) -> Result<(), String> {
        self.try_clone_container_with(template, new_id, runtime, |spec| {
            for (k, v) in annotations {
                if !spec["annotations"].is_object() {
                    spec["annotations"] = serde_json::json!({});
                }
                spec["annotations"][*k] = serde_json::Value::String(v.to_string());
            }
        })
    }

    /// [`Self::try_clone_container`] with the new container's spec changed by `edit` (after its
    /// cgroup is set).
    pub fn try_clone_container_with(
        &self,
        template: &str,
        new_id: &str,
        runtime: Option<&str>,
        edit: impl FnOnce(&mut serde_json::Value),
    ) -> Result<(), String> {
        let t = self.try_container(template)?;
        let mut snaps = SnapshotsClient::new(self.channel.clone());
        let info = self
            .rt
            .block_on(snaps.stat(self.try_request(StatSnapshotRequest {
                snapshotter: t.snapshotter.clone(),
                key: t.snapshot_key.clone(),
            })?))
            .map_err(|s| format!("Snapshots.Stat({}): {s}", t.snapshot_key))?
            .into_inner()
            .info
            .ok_or("no info in Snapshots.Stat response")?;
        if info.parent.is_empty() {
            return Err(format!(
                "snapshot {} of {template} has no parent",
                t.snapshot_key
            ));
        }
        self.rt
            .block_on(snaps.prepare(self.try_request(PrepareSnapshotRequest {
                snapshotter: t.snapshotter.clone(),
                key: new_id.to_string(),
                parent: info.parent.clone(),
                // A root for containerd's GC until the container record references it: without
                // a lease, a collection between Prepare and Containers.Create removes it.
                labels: HashMap::from([(
                    "containerd.io/gc.root".to_string(),
                    "integration".to_string(),
                )]),
            })?))
            .map_err(|s| format!("Snapshots.Prepare({new_id}): {s}"))?;

        let spec_any = t.spec.clone().ok_or("template has no spec")?;
        let mut spec: serde_json::Value = serde_json::from_slice(&spec_any.value)
            .map_err(|e| format!("spec is not JSON: {e}"))?;
        spec["linux"]["cgroupsPath"] =
            serde_json::Value::String(format!("/{}/{new_id}", self.namespace));
        edit(&mut spec);
        let runtime = match runtime {
            None => t.runtime.clone(),
            Some(name) => Some(ContainerRuntime {
                name: name.to_string(),
                options: t.runtime.as_ref().and_then(|r| r.options.clone()),
            }),
        };
        let container = Container {
            id: new_id.to_string(),
            image: t.image.clone(),
            runtime,
            spec: Some(Any {
                type_url: spec_any.type_url.clone(),
                value: serde_json::to_vec(&spec).map_err(|e| format!("encode spec: {e}"))?,
            }),
            snapshotter: t.snapshotter.clone(),
            snapshot_key: new_id.to_string(),
            ..Default::default()
        };
        let req = self.try_request(CreateContainerRequest {
            container: Some(container),
        })?;
        self.rt
            .block_on(ContainersClient::new(self.channel.clone()).create(req))
            .map_err(|s| format!("Containers.Create({new_id}): {s}"))?;
        Ok(())
    }

    /// Where containerd's content store keeps its sha256 blobs (under the daemon's root).
    pub fn content_dir(&self) -> PathBuf {
        self.root
            .join("io.containerd.content.v1.content/blobs/sha256")
    }

    /// Where containerd keeps the blob of `desc`; panics on a digest that is not sha256.
    pub fn blob_path(&self, desc: &Descriptor) -> PathBuf {
        let hex = desc
            .digest
            .strip_prefix("sha256:")
            .unwrap_or_else(|| panic!("unexpected digest {}", desc.digest));
        self.content_dir().join(hex)
    }
}

/// Tasks.Update with `resources` (an OCI `LinuxResources` as JSON), as `ctr task update` did in
/// containerd 1.x.
pub fn update_task(
    address: &Path,
    namespace: &str,
    id: &str,
    resources: &serde_json::Value,
) -> Result<(), String> {
    let value = serde_json::to_vec(resources).map_err(|e| e.to_string())?;
    let client = Client::connect(address, namespace, Path::new(""))?;
    let req = client.try_request(UpdateTaskRequest {
        container_id: id.to_string(),
        resources: Some(Any {
            type_url: LINUX_RESOURCES_TYPE_URL.to_string(),
            value,
        }),
        annotations: Default::default(),
    })?;
    let mut tasks = client.tasks();
    client
        .block_on(tasks.update(req))
        .map_err(|s| format!("Tasks.Update({id}): {s}"))?;
    Ok(())
}
