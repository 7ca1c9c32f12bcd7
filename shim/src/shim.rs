//! The shim process itself: `start` (spawn or reuse the long-lived shim),
//! `delete` (clean up after a dead shim), and the task service it serves.

use std::{path::Path, sync::Arc};

use async_trait::async_trait;
use containerd_shim::{
    asynchronous::{spawn, ExitSignal, Shim},
    publisher::RemotePublisher,
    util::{convert_to_timestamp, write_str_to_file},
    Config, Error as ShimError, Flags, StartOpts,
};
use containerd_shim_protos::{
    api::DeleteResponse,
    protobuf::{well_known_types::any::Any, MessageField},
    types::introspection::RuntimeInfo,
};
use log::{debug, warn};
use time::OffsetDateTime;

use crate::{
    container::{lifecycle::unmount_all, Shared},
    events::Publisher,
    options::RuntimeOptions,
    reaper::Reaper,
    runtime::runc::Runc,
    service::Service,
};

/// Annotations that put containers in one shim, as the Go runc shim does.
const GROUP_ANNOTATIONS: [&str; 2] = [
    "io.containerd.runc.v2.group",
    "io.kubernetes.cri.sandbox-id",
];

pub struct CustomShim {
    id: String,
    namespace: String,
    bundle: String,
    /// The ttrpc socket this shim serves (`-socket unix:///run/containerd/s/...`).
    socket: String,
    exit: Arc<ExitSignal>,
}

#[async_trait]
impl Shim for CustomShim {
    type T = Service;

    async fn new(_runtime_id: &str, args: &Flags, _config: &mut Config) -> Self {
        Self {
            id: args.id.clone(),
            namespace: args.namespace.clone(),
            bundle: args.bundle.clone(),
            socket: args.socket.clone(),
            exit: Arc::new(ExitSignal::default()),
        }
    }

    async fn start_shim(&mut self, opts: StartOpts) -> Result<String, ShimError> {
        let grouping = group_of(Path::new("config.json")).unwrap_or_else(|| opts.id.clone());
        let address = spawn(opts, &grouping, Vec::new()).await?;
        write_str_to_file("address", &address).await?;
        Ok(address)
    }

    async fn delete_shim(&mut self) -> Result<DeleteResponse, ShimError> {
        let bundle = if self.bundle.is_empty() {
            std::env::current_dir().map_err(|e| ShimError::IoError {
                context: "current dir".into(),
                err: e,
            })?
        } else {
            self.bundle.clone().into()
        };
        let options = RuntimeOptions::read(&bundle).unwrap_or_else(|e| {
            warn!("delete {}: {e}; using default runtime options", self.id);
            RuntimeOptions::default()
        });
        let reaper = Reaper::default();
        if let Err(e) = reaper.start().await {
            warn!("delete {}: {e}", self.id);
        }
        let runc = Runc::new(
            options.runc_binary(),
            options.runc_root(&self.namespace),
            options.systemd_cgroup,
            bundle.join("log.json"),
            reaper,
        );
        release_from_checkpoint(&options.runc_root(&self.namespace), &self.id);
        if let Err(e) = runc.delete(&self.id, true).await {
            warn!("runc delete {}: {e}", self.id);
        }
        unmount_all(&bundle.join("rootfs"));
        // The init's pid, as the Go shim reads it back from the bundle.
        let pid = std::fs::read_to_string(bundle.join("init.pid"))
            .ok()
            .and_then(|t| t.trim().parse::<u32>().ok())
            .unwrap_or(0);
        Ok(DeleteResponse {
            pid,
            // 128 + SIGKILL: the task died with its shim.
            exit_status: 137,
            exited_at: MessageField::some(convert_to_timestamp(Some(OffsetDateTime::now_utc()))),
            ..Default::default()
        })
    }

    async fn wait(&mut self) {
        self.exit.wait().await;
        // The crate removes the socket named in the bundle's `address` file, but
        // a shim serving a pod runs in its first container's bundle, which is
        // gone once that container was deleted: remove it by what we were given.
        remove_socket_file(&self.socket);
    }

    /// What containerd's RuntimeInfo (and through it the CRI) reads, as the Go
    /// shim answers it: name, version and the configured runc's features
    /// (`runc features`, for containerd to validate specs against).
    fn runtime_info(runtime_id: &str, options: Option<&Any>) -> Result<RuntimeInfo, ShimError> {
        crate::info::runtime_info(runtime_id, options)
    }

    async fn create_task_service(&self, publisher: RemotePublisher) -> Self::T {
        let reaper = Reaper::default();
        if let Err(e) = reaper.start().await {
            // Without exits nothing works; say so loudly but keep serving errors.
            log::error!("{e}");
        }
        let shared = Shared {
            namespace: self.namespace.clone(),
            // Our own forwarder (ordered, reconnecting); the crate's connection is let go.
            publisher: Publisher::new(publisher.address.clone(), self.namespace.clone()),
            reaper,
        };
        Service::new(shared, self.exit.clone())
    }
}

/// A shim killed in the middle of a checkpoint leaves the container frozen and
/// perhaps still seized by a CRIU: kill the tracers of its tasks and thaw it,
/// so that `runc delete --force` can finish it off.
fn release_from_checkpoint(runc_root: &Path, id: &str) {
    let freezer = match crate::cgroup::of_container(runc_root, id) {
        Ok(cg) => cg.freezer,
        Err(e) => {
            debug!("delete {id}: {e}");
            return;
        }
    };
    let procs: Vec<i32> = std::fs::read_to_string(freezer.path().join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    for pid in &procs {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let tracer = status
            .lines()
            .find_map(|l| l.strip_prefix("TracerPid:"))
            .and_then(|v| v.trim().parse::<i32>().ok())
            .unwrap_or(0);
        if tracer > 0 && !procs.contains(&tracer) {
            warn!("delete {id}: killing tracer {tracer} of pid {pid} (an interrupted checkpoint)");
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(tracer),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
    if let Err(e) = freezer.thaw() {
        warn!("delete {id}: thaw {}: {e}", freezer.path().display());
    }
}

/// Removes the unix socket at `address` (`unix://PATH` or a path), if it is one.
fn remove_socket_file(address: &str) {
    use std::os::unix::fs::FileTypeExt;
    let path = address.strip_prefix("unix://").unwrap_or(address);
    if path.is_empty() {
        return;
    }
    if let Ok(m) = std::fs::symlink_metadata(path) {
        if m.file_type().is_socket() {
            if let Err(e) = std::fs::remove_file(path) {
                warn!("remove socket {path}: {e}");
            }
        }
    }
}

/// The grouping annotation of the bundle's spec, if any.
fn group_of(config: &Path) -> Option<String> {
    let bytes = std::fs::read(config).ok()?;
    let spec: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    GROUP_ANNOTATIONS
        .iter()
        .find_map(|k| spec["annotations"][*k].as_str().map(str::to_string))
        .filter(|g| !g.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_socket_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("s.sock");
        let _l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, "x").unwrap();
        remove_socket_file(&format!("unix://{}", file.display()));
        assert!(file.exists(), "a regular file is not ours to remove");
        remove_socket_file(&format!("unix://{}", sock.display()));
        assert!(!sock.exists());
        remove_socket_file("");
    }

    #[test]
    fn sandbox_annotation_groups_containers() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("config.json");
        std::fs::write(
            &cfg,
            r#"{"annotations":{"io.kubernetes.cri.sandbox-id":"pod1"}}"#,
        )
        .unwrap();
        assert_eq!(group_of(&cfg).as_deref(), Some("pod1"));
        std::fs::write(&cfg, r#"{"annotations":{}}"#).unwrap();
        assert_eq!(group_of(&cfg), None);
        assert_eq!(group_of(&dir.path().join("missing")), None);
    }
}
