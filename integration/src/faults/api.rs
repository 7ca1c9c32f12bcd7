//! The gRPC calls the fault scenarios make that ctr cannot: raw options, no client-side pause,
//! crafted content written to the content store under a lease, restore as a new container. Errors
//! are kept as code + message ([`RpcError`]); the connection, lease and the calls shared with the
//! checkpoint scenarios and the bench are the [`Client`] this derefs to.

use std::collections::HashMap;

use containerd_client::services::v1::content_client::ContentClient;
use containerd_client::services::v1::{
    CreateTaskRequest, DeleteProcessRequest, ExecProcessRequest, GetRequest, KillRequest,
    PauseTaskRequest, ResizePtyRequest, ResumeTaskRequest, UpdateTaskRequest, WriteAction,
    WriteContentRequest,
};
use containerd_client::types::{Descriptor, Mount};
use prost_types::Any;

use super::RpcError;
use crate::grpc::{CheckpointOptions, Client, CRIU_CHECKPOINT_MEDIA_TYPE, PROCESS_SPEC_TYPE_URL};
use crate::{Containerd, Runtime};

/// A connection to one containerd, in its namespace, optionally under a lease.
pub struct Api {
    client: Client,
}

crate::deref_to_grpc_client!(Api);

impl Api {
    pub fn connect(cd: &Containerd) -> Api {
        Api {
            client: Client::connect_to(cd),
        }
    }

    /// Tasks.Checkpoint with `options` as given (no pause around it).
    pub fn checkpoint(&self, id: &str, options: Option<Any>) -> Result<Vec<Descriptor>, RpcError> {
        Ok(self.checkpoint_task(id, options)?)
    }

    /// Tasks.Checkpoint; the descriptor of the CRIU checkpoint blob.
    pub fn checkpoint_blob(
        &self,
        id: &str,
        opts: &CheckpointOptions,
    ) -> Result<Descriptor, RpcError> {
        let descs = self.checkpoint(id, Some(opts.to_any()))?;
        Ok(descs
            .into_iter()
            .find(|d| d.media_type == CRIU_CHECKPOINT_MEDIA_TYPE)
            .expect("a CRIU checkpoint descriptor in the Tasks.Checkpoint response"))
    }

    pub fn pause(&self, id: &str) -> Result<(), RpcError> {
        let req = self.request(PauseTaskRequest {
            container_id: id.to_string(),
        });
        let mut c = self.tasks();
        self.block_on(c.pause(req))?;
        Ok(())
    }

    pub fn resume(&self, id: &str) -> Result<(), RpcError> {
        let req = self.request(ResumeTaskRequest {
            container_id: id.to_string(),
        });
        let mut c = self.tasks();
        self.block_on(c.resume(req))?;
        Ok(())
    }

    pub fn kill(&self, id: &str, exec_id: &str, signal: u32) -> Result<(), RpcError> {
        let req = self.request(KillRequest {
            container_id: id.to_string(),
            exec_id: exec_id.to_string(),
            signal,
            all: false,
        });
        let mut c = self.tasks();
        self.block_on(c.kill(req))?;
        Ok(())
    }

    /// Tasks.Exec of `args` (no IO) with the process spec of the container's init otherwise.
    pub fn exec(&self, id: &str, exec_id: &str, args: &[&str]) -> Result<(), RpcError> {
        let spec = self.container(id).spec.expect("container spec");
        let spec: serde_json::Value = serde_json::from_slice(&spec.value).expect("spec is JSON");
        let mut process = spec["process"].clone();
        process["args"] = serde_json::json!(args);
        process["terminal"] = serde_json::Value::Bool(false);
        self.exec_raw(
            id,
            exec_id,
            Some(Any {
                type_url: PROCESS_SPEC_TYPE_URL.to_string(),
                value: serde_json::to_vec(&process).expect("encode process"),
            }),
        )
    }

    pub fn exec_raw(&self, id: &str, exec_id: &str, spec: Option<Any>) -> Result<(), RpcError> {
        let req = self.request(ExecProcessRequest {
            container_id: id.to_string(),
            exec_id: exec_id.to_string(),
            spec,
            ..Default::default()
        });
        let mut c = self.tasks();
        self.block_on(c.exec(req))?;
        Ok(())
    }

    pub fn start(&self, id: &str, exec_id: &str) -> Result<u32, RpcError> {
        Ok(self.start_process(id, exec_id)?)
    }

    /// Tasks.Get: (pid, status as containerd's enum number).
    pub fn get(&self, id: &str, exec_id: &str) -> Result<(u32, i32), RpcError> {
        let req = self.request(GetRequest {
            container_id: id.to_string(),
            exec_id: exec_id.to_string(),
        });
        let mut c = self.tasks();
        let p = self
            .block_on(c.get(req))?
            .into_inner()
            .process
            .expect("process in Tasks.Get response");
        Ok((p.pid, p.status))
    }

    pub fn resize_pty(&self, id: &str, exec_id: &str) -> Result<(), RpcError> {
        let req = self.request(ResizePtyRequest {
            container_id: id.to_string(),
            exec_id: exec_id.to_string(),
            width: 80,
            height: 24,
        });
        let mut c = self.tasks();
        self.block_on(c.resize_pty(req))?;
        Ok(())
    }

    pub fn delete_process(&self, id: &str, exec_id: &str) -> Result<u32, RpcError> {
        let req = self.request(DeleteProcessRequest {
            container_id: id.to_string(),
            exec_id: exec_id.to_string(),
        });
        let mut c = self.tasks();
        Ok(self
            .block_on(c.delete_process(req))?
            .into_inner()
            .exit_status)
    }

    pub fn delete_task(&self, id: &str) -> Result<u32, RpcError> {
        Ok(self.delete_task_status(id)?)
    }

    pub fn update(&self, id: &str, resources: Any) -> Result<(), RpcError> {
        let req = self.request(UpdateTaskRequest {
            container_id: id.to_string(),
            resources: Some(resources),
            annotations: HashMap::new(),
        });
        let mut c = self.tasks();
        self.block_on(c.update(req))?;
        Ok(())
    }

    /// The rootfs mounts of container `id`'s snapshot.
    pub fn rootfs_mounts(&self, id: &str) -> Vec<Mount> {
        self.rootfs_mounts_of(&self.container(id))
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Tasks.Create of container `id` (rootfs from its snapshot, no IO), from `checkpoint` if
    /// given, with task `options` as given. Returns the pid (0 for a restore).
    pub fn create_task(
        &self,
        id: &str,
        checkpoint: Option<Descriptor>,
        options: Option<Any>,
    ) -> Result<u32, RpcError> {
        let rootfs = self.rootfs_mounts(id);
        Ok(self.create_task_with(CreateTaskRequest {
            container_id: id.to_string(),
            rootfs,
            checkpoint,
            options,
            ..Default::default()
        })?)
    }

    /// Creates container `new_id` like `template` (same image and spec, its own cgroup) on
    /// runtime `rt`, with a fresh snapshot of the image, as containerd's `client.Restore` does.
    pub fn create_container_like(&self, template: &str, new_id: &str, rt: Runtime) {
        self.try_clone_container(template, new_id, Some(rt.name()), &[])
            .unwrap_or_else(|e| panic!("{e}"));
    }

    /// [`Self::create_container_like`], Tasks.Create from `checkpoint`, Tasks.Start: the
    /// restored init's pid.
    pub fn restore_as_new(
        &self,
        template: &str,
        new_id: &str,
        rt: Runtime,
        checkpoint: &Descriptor,
    ) -> Result<u32, RpcError> {
        self.create_container_like(template, new_id, rt);
        self.create_task(new_id, Some(checkpoint.clone()), None)?;
        self.start(new_id, "")
    }

    /// Content.Write of `data` (under the lease, if any) and commit; its descriptor.
    pub fn write_blob(&self, data: &[u8], media_type: &str) -> Descriptor {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let reference = format!(
            "faults-{}-{}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
        );
        let total = data.len() as i64;
        let mut msgs = Vec::new();
        let mut offset = 0usize;
        for chunk in data.chunks(1 << 20) {
            msgs.push(WriteContentRequest {
                action: WriteAction::Write as i32,
                r#ref: reference.clone(),
                total,
                offset: offset as i64,
                data: chunk.to_vec(),
                ..Default::default()
            });
            offset += chunk.len();
        }
        msgs.push(WriteContentRequest {
            action: WriteAction::Commit as i32,
            r#ref: reference.clone(),
            total,
            offset: offset as i64,
            ..Default::default()
        });
        let req = self.request(containerd_client::tonic::codegen::tokio_stream::iter(msgs));
        let digest = self.block_on(async {
            let mut stream = ContentClient::new(self.channel())
                .write(req)
                .await
                .unwrap_or_else(|s| panic!("Content.Write: {s}"))
                .into_inner();
            let mut digest = String::new();
            while let Some(r) = stream
                .message()
                .await
                .unwrap_or_else(|s| panic!("Content.Write: {s}"))
            {
                if r.action == WriteAction::Commit as i32 {
                    digest = r.digest;
                }
            }
            digest
        });
        assert!(
            digest.starts_with("sha256:"),
            "Content.Write commit gave no digest: {digest:?}"
        );
        Descriptor {
            media_type: media_type.to_string(),
            digest,
            size: total,
            annotations: HashMap::new(),
        }
    }
}
