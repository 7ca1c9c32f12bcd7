//! The ttrpc Task service: one thin adapter a method, protobuf ⇄ domain.

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{Arc, Mutex, MutexGuard},
};

use async_trait::async_trait;
use containerd_shim::{
    asynchronous::{io::Stdio, ExitSignal},
    util::convert_to_timestamp,
};
use containerd_shim_protos::{
    api::{self, Empty},
    events::task::{TaskCreate, TaskDelete, TaskExecAdded, TaskIO, TaskPaused, TaskResumed},
    protobuf::{well_known_types::any::Any, Message, MessageField},
    shim::oci::ProcessDetails,
    shim_async::Task,
    ttrpc::{self, r#async::TtrpcContext},
};
use log::{debug, info};

use crate::{
    container::{lifecycle::CreateConfig, Container, Shared},
    error::{Error, Result},
    options::{CheckpointOptions, RuntimeOptions},
    owned,
};

type TtrpcResult<T> = std::result::Result<T, ttrpc::Error>;

type Containers = Arc<Mutex<HashMap<String, Arc<Container>>>>;

/// Creates under way, by container id: held by the owned create until it
/// registered the container or took it back.
type Creating = Arc<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>>;

pub struct Service {
    shared: Shared,
    containers: Containers,
    creating: Creating,
    exit: Arc<ExitSignal>,
}

fn lock_all(all: &Containers) -> MutexGuard<'_, HashMap<String, Arc<Container>>> {
    all.lock().unwrap_or_else(|p| p.into_inner())
}

impl Service {
    pub fn new(shared: Shared, exit: Arc<ExitSignal>) -> Self {
        Self {
            shared,
            containers: Arc::new(Mutex::new(HashMap::new())),
            creating: Arc::new(Mutex::new(HashMap::new())),
            exit,
        }
    }

    fn containers(&self) -> MutexGuard<'_, HashMap<String, Arc<Container>>> {
        lock_all(&self.containers)
    }

    fn creating(&self) -> MutexGuard<'_, HashMap<String, Arc<tokio::sync::Mutex<()>>>> {
        self.creating.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Claims `id` for a create, atomically against other creates and the
    /// containers already there. A Delete that comes for it meanwhile
    /// (containerd cleaning up after a Create whose caller gave up) waits for
    /// the claim to go: by then the container is registered, or taken back
    /// and unmounted.
    fn claim_create(&self, id: &str) -> Result<CreatingEntry> {
        let mut creating = self.creating();
        if creating.contains_key(id) || self.containers().contains_key(id) {
            return Err(Error::AlreadyExists(format!("container {id}")));
        }
        let gate = Arc::new(tokio::sync::Mutex::new(()));
        let held = gate
            .clone()
            .try_lock_owned()
            .map_err(|e| Error::Internal(format!("claim container {id}: {e}")))?;
        creating.insert(id.to_string(), gate);
        Ok(CreatingEntry {
            all: self.creating.clone(),
            id: id.to_string(),
            _held: held,
        })
    }

    fn get(&self, id: &str) -> Result<Arc<Container>> {
        self.containers()
            .get(id)
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("container {id}")))
    }

    async fn do_create(
        &self,
        req: api::CreateTaskRequest,
        deadline: Option<std::time::Duration>,
    ) -> Result<api::CreateTaskResponse> {
        if req.id.is_empty() {
            return Err(Error::InvalidArgument(
                "container id must not be empty".into(),
            ));
        }
        let creating = self.claim_create(&req.id)?;
        let options = RuntimeOptions::from_any(req.options.as_ref())?;
        let checkpoint = Some(req.checkpoint.clone())
            .filter(|c| !c.is_empty())
            .or_else(|| Some(options.criu_image_path.clone()).filter(|c| !c.is_empty()))
            .map(PathBuf::from);
        let cfg = CreateConfig {
            id: req.id.clone(),
            bundle: PathBuf::from(&req.bundle),
            mounts: req.rootfs.clone(),
            stdio: Stdio::new(&req.stdin, &req.stdout, &req.stderr, req.terminal),
            options,
            checkpoint,
            parent_checkpoint: Some(req.parent_checkpoint.clone())
                .filter(|c| !c.is_empty())
                .map(PathBuf::from),
        };
        let shared = self.shared.clone();
        let containers = self.containers.clone();
        // Owned: a caller that gives up mid-way gets nothing half-made (the
        // container is taken back), and one that waits gets it whole.
        owned::run_within(deadline, move |caller| async move {
            let _creating = creating;
            let container = Container::create(shared.clone(), cfg).await?;
            if let Err(e) = caller.check("the create") {
                container.abandon().await;
                return Err(e);
            }
            let pid = container.init().pid();
            // The claim keeps the id free: no other create can take it meanwhile.
            lock_all(&containers).insert(req.id.clone(), container.clone());
            if pid != 0 {
                container.watch_oom();
            }
            shared.publisher.publish(TaskCreate {
                container_id: req.id.clone(),
                bundle: req.bundle.clone(),
                rootfs: req.rootfs.clone(),
                io: MessageField::some(TaskIO {
                    stdin: req.stdin.clone(),
                    stdout: req.stdout.clone(),
                    stderr: req.stderr.clone(),
                    terminal: req.terminal,
                    ..Default::default()
                }),
                checkpoint: req.checkpoint.clone(),
                pid: pid as u32,
                ..Default::default()
            });
            info!("container {} created, pid {pid}", req.id);
            Ok(api::CreateTaskResponse {
                pid: pid as u32,
                ..Default::default()
            })
        })
        .await
    }

    async fn do_start(&self, req: &api::StartRequest) -> Result<api::StartResponse> {
        let c = self.get(&req.id)?;
        let pid = if req.exec_id.is_empty() {
            let restoring = c.init().pid() == 0;
            let pid = c.start().await?;
            if restoring {
                c.watch_oom();
            }
            pid
        } else {
            let exec_id = req.exec_id.clone();
            owned::run(move |_caller| async move { c.start_exec(&exec_id).await }).await?
        };
        Ok(api::StartResponse {
            pid: pid as u32,
            ..Default::default()
        })
    }

    async fn do_delete(&self, req: &api::DeleteRequest) -> Result<api::DeleteResponse> {
        let gate = self.creating().get(&req.id).cloned();
        if let Some(gate) = gate {
            // Still being created: let it end first (registered, or taken back).
            drop(gate.lock().await);
        }
        let c = self.get(&req.id)?;
        let process = if req.exec_id.is_empty() {
            c.delete_init().await?;
            self.containers().remove(&req.id);
            c.init().clone()
        } else {
            c.delete_exec(&req.exec_id).await?
        };
        let exit = process.exit();
        let (code, at) = exit.map(|e| (e.code, Some(e.at))).unwrap_or((0, None));
        let pid = process.pid() as u32;
        if req.exec_id.is_empty() {
            self.shared.publisher.publish(TaskDelete {
                container_id: c.id().to_string(),
                id: c.id().to_string(),
                pid,
                exit_status: code as u32,
                exited_at: MessageField::some(convert_to_timestamp(at)),
                ..Default::default()
            });
        }
        Ok(api::DeleteResponse {
            pid,
            exit_status: code as u32,
            exited_at: MessageField::some(convert_to_timestamp(at)),
            ..Default::default()
        })
    }

    fn do_state(&self, req: &api::StateRequest) -> Result<api::StateResponse> {
        let c = self.get(&req.id)?;
        let p = c.process(&req.exec_id)?;
        let st = p.state();
        let (code, at) = st.exit.map(|e| (e.code, Some(e.at))).unwrap_or((0, None));
        Ok(api::StateResponse {
            id: if p.is_init() {
                c.id().to_string()
            } else {
                p.exec_id.clone()
            },
            bundle: c.bundle().display().to_string(),
            pid: st.pid as u32,
            status: api::Status::from(st.status).into(),
            stdin: p.stdio.stdin.clone(),
            stdout: p.stdio.stdout.clone(),
            stderr: p.stdio.stderr.clone(),
            terminal: p.stdio.terminal,
            exit_status: code as u32,
            exited_at: MessageField::some(convert_to_timestamp(at)),
            exec_id: p.exec_id.clone(),
            ..Default::default()
        })
    }

    async fn do_pids(&self, req: &api::PidsRequest) -> Result<api::PidsResponse> {
        let c = self.get(&req.id)?;
        let pids = c.pids().await?;
        let execs = c.exec_ids();
        let mut processes = Vec::with_capacity(pids.len());
        for pid in pids {
            let mut info = api::ProcessInfo {
                pid: pid as u32,
                ..Default::default()
            };
            if let Some((exec_id, _)) = execs.iter().find(|(_, p)| *p == pid) {
                let details = ProcessDetails {
                    exec_id: exec_id.clone(),
                    ..Default::default()
                };
                info.info = MessageField::some(Any {
                    type_url: "containerd.runc.v1.ProcessDetails".into(),
                    value: details
                        .write_to_bytes()
                        .map_err(Error::proto("encode process details"))?,
                    ..Default::default()
                });
            }
            processes.push(info);
        }
        Ok(api::PidsResponse {
            processes,
            ..Default::default()
        })
    }

    fn do_exec(&self, req: &api::ExecProcessRequest) -> Result<()> {
        let c = self.get(&req.id)?;
        let spec = req
            .spec
            .as_ref()
            .map(|a| a.value.clone())
            .ok_or_else(|| Error::InvalidArgument("exec without a process spec".into()))?;
        c.add_exec(
            &req.exec_id,
            Stdio::new(&req.stdin, &req.stdout, &req.stderr, req.terminal),
            spec,
        )?;
        self.shared.publisher.publish(TaskExecAdded {
            container_id: c.id().to_string(),
            exec_id: req.exec_id.clone(),
            ..Default::default()
        });
        Ok(())
    }

    fn do_shutdown(&self, now: bool) {
        // `now` is containerd giving up on this shim: exit whatever it still holds.
        if !now && !self.containers().is_empty() {
            debug!("shutdown ignored: containers remain");
            return;
        }
        // An operation still running here is a Create whose caller gave up:
        // containerd's own clean-up (the `delete` action: runc delete, unmount)
        // takes over from it once this shim is gone.
        info!("shutting down");
        self.exit.signal();
    }
}

/// An entry of [`Creating`], gone with the owned create that holds it.
struct CreatingEntry {
    all: Creating,
    id: String,
    _held: tokio::sync::OwnedMutexGuard<()>,
}

impl Drop for CreatingEntry {
    fn drop(&mut self) {
        self.all
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
    }
}

/// The request's own timeout, if the client set one. Go's ttrpc sends a
/// negative one when the deadline passed before the request left: then the
/// caller is gone already.
fn deadline(ctx: &TtrpcContext) -> Option<std::time::Duration> {
    match ctx.timeout_nano {
        0 => None,
        t if t < 0 => Some(std::time::Duration::ZERO),
        t => Some(std::time::Duration::from_nanos(t as u64)),
    }
}

fn empty<T>(r: Result<T>) -> TtrpcResult<Empty> {
    r.map(|_| Empty::new()).map_err(log_error)
}

fn log_error(e: Error) -> ttrpc::Error {
    debug!("request failed: {e}");
    e.into()
}

#[async_trait]
impl Task for Service {
    async fn create(
        &self,
        ctx: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        debug!("create {}", req.id);
        self.do_create(req, deadline(ctx)).await.map_err(log_error)
    }

    async fn start(
        &self,
        _ctx: &TtrpcContext,
        req: api::StartRequest,
    ) -> TtrpcResult<api::StartResponse> {
        debug!("start {} {}", req.id, req.exec_id);
        self.do_start(&req).await.map_err(log_error)
    }

    async fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> TtrpcResult<api::DeleteResponse> {
        debug!("delete {} {}", req.id, req.exec_id);
        self.do_delete(&req).await.map_err(log_error)
    }

    async fn state(
        &self,
        _ctx: &TtrpcContext,
        req: api::StateRequest,
    ) -> TtrpcResult<api::StateResponse> {
        self.do_state(&req).map_err(log_error)
    }

    async fn pids(
        &self,
        _ctx: &TtrpcContext,
        req: api::PidsRequest,
    ) -> TtrpcResult<api::PidsResponse> {
        self.do_pids(&req).await.map_err(log_error)
    }

    async fn pause(&self, _ctx: &TtrpcContext, req: api::PauseRequest) -> TtrpcResult<Empty> {
        debug!("pause {}", req.id);
        let r = async {
            let c = self.get(&req.id)?;
            c.pause().await?;
            self.shared.publisher.publish(TaskPaused {
                container_id: c.id().to_string(),
                ..Default::default()
            });
            Ok(())
        };
        empty(r.await)
    }

    /// Honoured whatever its deadline says: containerd's client sends the
    /// resume that ends its checkpoint's pause with the checkpoint's context,
    /// expired when the checkpoint's caller gave up. Refusing it would leave
    /// the task paused for good (the Go shim does).
    async fn resume(&self, _ctx: &TtrpcContext, req: api::ResumeRequest) -> TtrpcResult<Empty> {
        debug!("resume {}", req.id);
        let r = async {
            let c = self.get(&req.id)?;
            c.resume().await?;
            self.shared.publisher.publish(TaskResumed {
                container_id: c.id().to_string(),
                ..Default::default()
            });
            Ok(())
        };
        empty(r.await)
    }

    async fn checkpoint(
        &self,
        ctx: &TtrpcContext,
        req: api::CheckpointTaskRequest,
    ) -> TtrpcResult<Empty> {
        debug!("checkpoint {} to {}", req.id, req.path);
        let r = async {
            let c = self.get(&req.id)?;
            let opts = CheckpointOptions::from_any(req.options.as_ref())?;
            c.checkpoint(PathBuf::from(&req.path), opts, deadline(ctx))
                .await
        };
        empty(r.await)
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<Empty> {
        debug!(
            "kill {} {} signal {} all {}",
            req.id, req.exec_id, req.signal, req.all
        );
        let r = async {
            let c = self.get(&req.id)?;
            c.kill(&req.exec_id, req.signal, req.all).await
        };
        empty(r.await)
    }

    async fn exec(&self, _ctx: &TtrpcContext, req: api::ExecProcessRequest) -> TtrpcResult<Empty> {
        debug!("exec {} {}", req.id, req.exec_id);
        empty(self.do_exec(&req))
    }

    async fn resize_pty(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResizePtyRequest,
    ) -> TtrpcResult<Empty> {
        let r = (|| {
            let c = self.get(&req.id)?;
            let p = c.process(&req.exec_id)?;
            let io = p.io().ok_or_else(|| {
                Error::FailedPrecondition(format!("{} has not started", p.describe()))
            })?;
            io.resize(req.width, req.height)
        })();
        empty(r)
    }

    async fn close_io(&self, _ctx: &TtrpcContext, req: api::CloseIORequest) -> TtrpcResult<Empty> {
        let r = (|| {
            let c = self.get(&req.id)?;
            let p = c.process(&req.exec_id)?;
            if req.stdin {
                if let Some(io) = p.io() {
                    io.close_stdin();
                }
            }
            Ok(())
        })();
        empty(r)
    }

    async fn update(&self, _ctx: &TtrpcContext, req: api::UpdateTaskRequest) -> TtrpcResult<Empty> {
        debug!("update {}", req.id);
        let r = async {
            let c = self.get(&req.id)?;
            let resources = req
                .resources
                .as_ref()
                .ok_or_else(|| Error::InvalidArgument("update without resources".into()))?;
            c.update(resources).await
        };
        empty(r.await)
    }

    async fn wait(
        &self,
        _ctx: &TtrpcContext,
        req: api::WaitRequest,
    ) -> TtrpcResult<api::WaitResponse> {
        let p = self
            .get(&req.id)
            .and_then(|c| c.process(&req.exec_id))
            .map_err(log_error)?;
        let exit = p.wait().await;
        Ok(api::WaitResponse {
            exit_status: exit.code as u32,
            exited_at: MessageField::some(convert_to_timestamp(Some(exit.at))),
            ..Default::default()
        })
    }

    async fn stats(
        &self,
        _ctx: &TtrpcContext,
        req: api::StatsRequest,
    ) -> TtrpcResult<api::StatsResponse> {
        let r = self.get(&req.id).and_then(|c| c.stats());
        r.map(|stats| api::StatsResponse {
            stats: MessageField::some(stats),
            ..Default::default()
        })
        .map_err(log_error)
    }

    async fn connect(
        &self,
        _ctx: &TtrpcContext,
        req: api::ConnectRequest,
    ) -> TtrpcResult<api::ConnectResponse> {
        let task_pid = self.get(&req.id).map(|c| c.init().pid()).unwrap_or(0);
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid: task_pid as u32,
            version: env!("CARGO_PKG_VERSION").to_string(),
            ..Default::default()
        })
    }

    async fn shutdown(&self, _ctx: &TtrpcContext, req: api::ShutdownRequest) -> TtrpcResult<Empty> {
        self.do_shutdown(req.now);
        Ok(Empty::new())
    }
}
