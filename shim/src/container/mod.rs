//! One container: its init, its execs, and what happens when they exit.

mod checkpoint;
mod exec;
pub mod lifecycle;
pub mod process;

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{Arc, Mutex, MutexGuard},
    time::Instant,
};

use containerd_shim::util::convert_to_timestamp;
use containerd_shim_protos::events::task::{TaskExecStarted, TaskExit, TaskOOM, TaskStart};
use log::{debug, info, warn};

pub use self::process::{Process, Status};
use crate::{
    checkpoint::RestoreSource,
    error::{Error, Result},
    events::Publisher,
    options::RuntimeOptions,
    reaper::{ExitStatus, Reaper},
    runtime::runc::Runc,
};

/// What every container of this shim shares.
#[derive(Clone)]
pub struct Shared {
    pub namespace: String,
    pub publisher: Publisher,
    pub reaper: Reaper,
}

/// One container. Its state and locks are its own: the service and the
/// checkpoint code reach it through methods (checkpoint and restore through
/// [`crate::checkpoint::Target`], built in `checkpoint.rs` beside this file).
pub struct Container {
    id: String,
    bundle: PathBuf,
    rootfs: PathBuf,
    /// Whether the shim mounted `rootfs` itself (from the request's mounts).
    rootfs_mounted: bool,
    options: RuntimeOptions,
    runc: Runc,
    init: Arc<Process>,
    shared: Shared,
    execs: Mutex<HashMap<String, Arc<Process>>>,
    /// The init's exit, held back until every running exec's exit is out.
    deferred_init_exit: Mutex<Option<ExitStatus>>,
    /// Serializes the operations that drive runc for this container. Held
    /// by owned operations (see [`crate::owned`]), never by a request future.
    ops: tokio::sync::Mutex<()>,
    /// Set when the container was created from a checkpoint: Start restores.
    restore: Mutex<Option<RestoreSource>>,
    /// The spec gives the container no pid namespace of its own: what is left
    /// when the init exits is killed.
    kill_all_on_exit: bool,
    /// An application container of containerd's CRI (see [`is_cri_container`]).
    cri_container: bool,
    /// Which pause the task is in, and since when.
    pauses: Mutex<Pauses>,
}

/// Pauses and resumes, counted, so that the shim can tell one pause from the
/// next (containerd's CRI pausing for a checkpoint, or someone else).
#[derive(Clone, Copy, Debug, Default)]
struct Pauses {
    /// Bumped by every pause and resume.
    generation: u64,
    /// When the current pause began; None while not paused by a Pause request.
    since: Option<Instant>,
}

/// Whether a container's processes outlive its init (Go's `ShouldKillAllOnExit`):
/// true unless the spec asks for a new pid namespace (a "pid" entry without a path).
pub fn should_kill_all_on_exit(spec: &serde_json::Value) -> bool {
    let Some(namespaces) = spec["linux"]["namespaces"].as_array() else {
        return true;
    };
    !namespaces.iter().any(|ns| {
        ns["type"].as_str() == Some("pid") && ns["path"].as_str().map(str::is_empty).unwrap_or(true)
    })
}

/// Whether the spec is that of an application container made by containerd's
/// CRI (annotation `io.kubernetes.cri.container-type: container`; a pod's
/// sandbox says `sandbox`). On that path containerd captures and applies the
/// rootfs changes itself (see `container/checkpoint.rs`).
pub fn is_cri_container(spec: &serde_json::Value) -> bool {
    spec["annotations"]["io.kubernetes.cri.container-type"].as_str() == Some("container")
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Container {
    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn bundle(&self) -> &std::path::Path {
        &self.bundle
    }

    pub fn init(&self) -> &Arc<Process> {
        &self.init
    }

    /// Publishes an OOM event whenever the container's memory cgroup says so
    /// (its cgroup from runc's state; the init's if the state names none).
    pub fn watch_oom(&self) {
        let publisher = self.shared.publisher.clone();
        let id = self.id.clone();
        let on_oom = move || {
            info!("container {id}: OOM");
            publisher.publish(TaskOOM {
                container_id: id.clone(),
                ..Default::default()
            });
        };
        let pid = self.init.pid();
        let (memory_v1, v2) = match crate::cgroup::of_container(&self.runc.root, &self.id) {
            Ok(cg) => (cg.memory_v1, cg.v2),
            Err(_) => (
                crate::cgroup::v1_memory_of(pid),
                crate::cgroup::v2_dir_of(pid),
            ),
        };
        let watched = if let Some(memory) = memory_v1 {
            crate::cgroup::oom::watch_v1(memory, on_oom)
        } else if let Some(dir) = v2.filter(|d| d.join("memory.events").exists()) {
            crate::cgroup::oom::watch_v2(dir, on_oom)
        } else {
            debug!("container {}: no memory cgroup to watch for OOM", self.id);
            return;
        };
        if let Err(e) = watched {
            warn!("container {}: OOM events unavailable: {e}", self.id);
        }
    }

    pub fn process(&self, exec_id: &str) -> Result<Arc<Process>> {
        if exec_id.is_empty() {
            return Ok(self.init.clone());
        }
        lock(&self.execs)
            .get(exec_id)
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("exec {exec_id} in container {}", self.id)))
    }

    pub fn io_owner(&self) -> crate::io::IoOwner {
        crate::io::IoOwner {
            uid: self.options.io_uid,
            gid: self.options.io_gid,
            container_id: self.id.clone(),
            namespace: self.shared.namespace.clone(),
        }
    }

    pub fn exec_ids(&self) -> Vec<(String, i32)> {
        lock(&self.execs)
            .values()
            .map(|p| (p.exec_id.clone(), p.pid()))
            .collect()
    }

    fn running_execs(&self) -> usize {
        lock(&self.execs)
            .values()
            .filter(|p| p.is_starting() || matches!(p.status(), Status::Running | Status::Paused))
            .count()
    }

    /// An exec's start settled (failed, or its exit is handled): the init's
    /// exit, held for it, goes out once no exec is running or starting.
    fn release_init_exit(&self) {
        if self.running_execs() == 0 {
            if let Some(init_status) = lock(&self.deferred_init_exit).take() {
                self.publish_exit(&self.init, init_status);
            }
        }
    }

    /// Delivers `process`'s exit once the reaper sees pid `pid` go.
    pub fn watch_exit(self: &Arc<Self>, process: Arc<Process>, pid: i32, started: Instant) {
        let exit = self.shared.reaper.claim(pid, started);
        let this = self.clone();
        tokio::spawn(async move {
            if let Ok(status) = exit.await {
                if process.is_init() && this.kill_all_on_exit {
                    // A container without a pid namespace of its own (shared with a pod, or
                    // the host's): its other processes do not die with the init, so they are
                    // killed, as the Go shim does (ShouldKillAllOnExit), and the execs' exits
                    // release the init's.
                    if let Err(e) = this.runc.kill(&this.id, libc::SIGKILL as u32, true).await {
                        warn!(
                            "container {}: kill the rest after its init exited: {e}",
                            this.id
                        );
                    }
                }
                let _started = process.start_gate.lock().await;
                this.on_exit(&process, status);
            }
        });
    }

    fn on_exit(&self, process: &Process, status: ExitStatus) {
        info!(
            "{} exited: pid {} status {}",
            process.describe(),
            status.pid,
            status.code
        );
        if process.is_init() {
            // Execs die with the init (pid namespace); their exits go first.
            if self.running_execs() > 0 {
                *lock(&self.deferred_init_exit) = Some(status);
                return;
            }
            self.publish_exit(process, status);
        } else {
            self.publish_exit(process, status);
            self.release_init_exit();
        }
    }

    fn publish_started(&self, process: &Process, pid: i32) {
        if process.is_init() {
            self.shared.publisher.publish(TaskStart {
                container_id: self.id.clone(),
                pid: pid as u32,
                ..Default::default()
            });
        } else {
            self.shared.publisher.publish(TaskExecStarted {
                container_id: self.id.clone(),
                exec_id: process.exec_id.clone(),
                pid: pid as u32,
                ..Default::default()
            });
        }
    }

    fn publish_exit(&self, process: &Process, status: ExitStatus) {
        process.set_exited(status);
        let id = if process.is_init() {
            self.id.clone()
        } else {
            process.exec_id.clone()
        };
        self.shared.publisher.publish(TaskExit {
            container_id: self.id.clone(),
            id,
            pid: status.pid as u32,
            exit_status: status.code as u32,
            exited_at: Some(convert_to_timestamp(Some(status.at))).into(),
            ..Default::default()
        });
    }
}

#[cfg(test)]
mod tests {
    use super::should_kill_all_on_exit;

    #[test]
    fn only_a_container_with_its_own_pid_namespace_lets_its_init_go_alone() {
        let own =
            serde_json::json!({"linux": {"namespaces": [{"type": "pid"}, {"type": "mount"}]}});
        assert!(!should_kill_all_on_exit(&own));
        let own_empty_path =
            serde_json::json!({"linux": {"namespaces": [{"type": "pid", "path": ""}]}});
        assert!(!should_kill_all_on_exit(&own_empty_path));
        let joined = serde_json::json!({"linux": {"namespaces": [{"type": "pid", "path": "/proc/1/ns/pid"}]}});
        assert!(should_kill_all_on_exit(&joined));
        let host = serde_json::json!({"linux": {"namespaces": [{"type": "mount"}]}});
        assert!(should_kill_all_on_exit(&host));
        assert!(should_kill_all_on_exit(&serde_json::json!({})));
    }

    #[test]
    fn cri_containers_are_told_by_their_annotation() {
        use super::is_cri_container;
        let ann =
            |t: &str| serde_json::json!({"annotations": {"io.kubernetes.cri.container-type": t}});
        assert!(is_cri_container(&ann("container")));
        assert!(!is_cri_container(&ann("sandbox")));
        assert!(!is_cri_container(&serde_json::json!({"annotations": {}})));
        assert!(!is_cri_container(&serde_json::json!({})));
    }
}
