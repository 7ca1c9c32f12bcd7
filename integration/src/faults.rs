//! What the fault and hostile-input scenarios need beyond the harness (tests/faults.rs,
//! hostile.rs, bad_requests.rs, load.rs), one seam per file:
//!
//! - [`daemon`]: [`Daemon`] restarts a test's containerd (SIGTERM, then a new one on the same
//!   root, state, config and log), optionally with another `PATH` (so that the shims it starts
//!   find no `criu`, or a fake one);
//! - [`api`]: [`Api`], the gRPC calls ctr cannot make (raw options, no client-side pause, crafted
//!   content written to the content store under a lease, restore as a new container), errors
//!   kept as code + message ([`RpcError`]), on the shared [`crate::grpc::Client`];
//! - [`ttrpc`]: [`ShimClient`], the shim's own ttrpc Task API, called directly (unknown container
//!   ids never reach a shim through containerd, nor do options containerd refuses itself);
//! - [`tar`]: [`TarEntry`] / [`tar_archive`], tar archives written byte by byte, hostile names
//!   included (`..`, absolute, through a symlink, hard links out, devices, absurd sizes, GNU long
//!   names, PAX paths);
//! - [`probes`]: what the host shows: freezer state, open fds, RSS, zombies, leftover work dirs.

use std::fmt;
use std::time::Duration;

use containerd_client::tonic::Code;

use crate::{Containerd, Runtime};

pub mod api;
pub mod daemon;
pub mod probes;
pub mod tar;
pub mod ttrpc;

pub use api::Api;
pub use daemon::{containerd_pid, path_without_criu, real_criu, runtime_dir, Daemon};
pub use probes::{
    count, descendants_with_cmdline, entries_starting_with, fd_count, freezer_state, list_dir,
    rss_kib, state_and_ppid, wait_count_advances, zombies_of,
};
pub use tar::{checkpoint_blob, tar_archive, TarEntry};
pub use ttrpc::{shim_api, ShimClient};

pub use crate::grpc::{
    CheckpointOptions, CHECKPOINT_OPTIONS_TYPE_URL, CRIU_CHECKPOINT_MEDIA_TYPE, DELETED_FILES,
    LINUX_RESOURCES_TYPE_URL, PROCESS_SPEC_TYPE_URL, ROOTFS_DIFF, RUNC_OPTIONS_TYPE_URL,
};

/// A counter that writes `i` to /count about 50 times a second.
pub const COUNTER: &str = "i=0; while :; do i=$((i+1)); echo $i > /count; sleep 0.02; done";

const T: Duration = Duration::from_secs(30);

/// A failed gRPC or ttrpc call: status code and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RpcError {
    pub code: Code,
    pub message: String,
}

impl fmt::Display for RpcError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.code, self.message)
    }
}

impl From<containerd_client::tonic::Status> for RpcError {
    fn from(s: containerd_client::tonic::Status) -> Self {
        RpcError {
            code: s.code(),
            message: s.message().to_string(),
        }
    }
}

/// The pid of the one shim serving container `id`.
pub fn shim_pid(cd: &Containerd, id: &str) -> i32 {
    let shims = cd.shims_for(id);
    assert_eq!(shims.len(), 1, "one shim for {id} expected: {shims:?}");
    shims[0].pid
}

/// `ctr run -d --null-io <flags> --runtime <rt> IMAGE <id> <cmd...>`, waits for RUNNING
/// ([`Containerd::run_detached_with`]); the task's pid.
pub fn run_with(cd: &Containerd, rt: Runtime, id: &str, flags: &[&str], cmd: &[&str]) -> u32 {
    cd.run_detached_with(rt, id, flags, cmd).pid
}

/// Kills task `id` (SIGKILL), waits for STOPPED, deletes task and container, checks that
/// nothing is left.
pub fn remove_container(cd: &Containerd, id: &str) {
    if let Some(t) = cd.task(id) {
        if t.status == "PAUSED" {
            cd.ctr_ok(["tasks", "resume", id]);
        }
        if t.status != "STOPPED" {
            cd.kill(id, "SIGKILL");
            cd.wait_task_status(id, "STOPPED", crate::STATE_TIMEOUT);
        }
        cd.ctr_ok(["tasks", "delete", id]);
    }
    cd.ctr_ok(["containers", "delete", id]);
    cd.assert_nothing_left(id);
}
