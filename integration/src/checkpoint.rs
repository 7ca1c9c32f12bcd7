//! Checkpoint/restore through containerd's gRPC API, the way clients other than ctr do it:
//! Tasks.Checkpoint with no client-side pause (the shim's own freeze is all there is), under a
//! lease so that containerd keeps the checkpoint blob, and a restore into a NEW container made
//! from a fresh snapshot of the image (no rw layer carried by the client) through Tasks.Create
//! with the checkpoint descriptor, then Tasks.Start.
//!
//! What the restore does mirrors containerd's Go client (`client.Restore` with
//! `WithRestoreImage` + `WithRestoreSpec`, then `NewTask(..., WithTaskCheckpoint(...))`):
//! `Snapshots.Prepare(new_id, <image chain id>)`, `Containers.Create` with the original spec,
//! `Snapshots.Mounts` as the task's rootfs, `CreateTaskRequest.checkpoint` = the descriptor of
//! the `application/vnd.containerd.container.criu.checkpoint.criu.tar` blob. Unlike
//! `WithRestoreSpec` it points `linux.cgroupsPath` at the new container (ctr's spec names the
//! original's cgroup, which a leave-running original still uses), and it can pick the runtime.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use containerd_client::services::v1::CreateTaskRequest;
use containerd_client::types::Descriptor;

use crate::grpc::Client;
pub use crate::grpc::{
    CheckpointOptions, CHECKPOINT_OPTIONS_TYPE_URL, CRIU_CHECKPOINT_MEDIA_TYPE, DELETED_FILES,
    ROOTFS_DIFF, SHIM_METADATA,
};
use crate::process::run_with_timeout;
use crate::{show, Containerd, Runtime};

/// The container annotation that turns the custom shim's freeze off (test only).
pub const NO_FREEZE_ANNOTATION: &str = "dev.custom-shim.test/no-freeze";

/// A connection to one containerd, in its namespace, optionally under a lease: the shared
/// [`Client`] (lease, Containers.Get, blob paths, ...) plus the checkpoint/restore calls, errors
/// as text.
pub struct Api {
    client: Client,
}

crate::deref_to_grpc_client!(Api);

impl Api {
    /// Connects to `cd`'s gRPC socket.
    pub fn connect(cd: &Containerd) -> Api {
        Api {
            client: Client::connect_to(cd),
        }
    }

    /// Tasks.Checkpoint of container `id`, nothing else around it (no pause). `opts` None sends
    /// no options at all. Returns the descriptors containerd made (the checkpoint blob and the
    /// spec), or the gRPC error as text.
    pub fn checkpoint(
        &self,
        id: &str,
        opts: Option<&CheckpointOptions>,
    ) -> Result<Vec<Descriptor>, String> {
        self.checkpoint_task(id, opts.map(CheckpointOptions::to_any))
            .map_err(|s| format!("Tasks.Checkpoint({id}): {} ({:?})", s.message(), s.code()))
    }

    /// Like [`Self::checkpoint`], asserting success, returning the checkpoint blob's descriptor.
    pub fn checkpoint_ok(&self, id: &str, opts: Option<&CheckpointOptions>) -> Descriptor {
        let descs = self.checkpoint(id, opts).unwrap_or_else(|e| panic!("{e}"));
        descs
            .iter()
            .find(|d| d.media_type == CRIU_CHECKPOINT_MEDIA_TYPE)
            .cloned()
            .unwrap_or_else(|| panic!("no {CRIU_CHECKPOINT_MEDIA_TYPE} descriptor in {descs:?}"))
    }

    /// Creates container `new_id` like `template` (same image, same spec but its own cgroup,
    /// `annotations` added) on runtime `rt`, with a FRESH snapshot of the image (the parent of
    /// the template's snapshot), as containerd's `client.Restore` does.
    pub fn create_container_like(
        &self,
        template: &str,
        new_id: &str,
        rt: Runtime,
        annotations: &[(&str, &str)],
    ) {
        self.try_clone_container(template, new_id, Some(rt.name()), annotations)
            .unwrap_or_else(|e| panic!("{e}"));
    }

    /// Tasks.Create for container `id` (rootfs from its snapshot, no IO) with `checkpoint` as
    /// the checkpoint to restore, then Tasks.Start. Returns the restored init's pid.
    pub fn create_task_from_checkpoint(
        &self,
        id: &str,
        checkpoint: &Descriptor,
    ) -> Result<u32, String> {
        self.create_task_from_checkpoint_with_io(id, checkpoint, "", "")
    }

    /// Like [`Self::create_task_from_checkpoint`] with the task's stdout and stderr (fifo paths
    /// or log URIs such as `file:///path`).
    pub fn create_task_from_checkpoint_with_io(
        &self,
        id: &str,
        checkpoint: &Descriptor,
        stdout: &str,
        stderr: &str,
    ) -> Result<u32, String> {
        let mounts = self.rootfs_mounts_of(&self.container(id))?;
        self.create_task_with(CreateTaskRequest {
            container_id: id.to_string(),
            rootfs: mounts,
            checkpoint: Some(checkpoint.clone()),
            stdout: stdout.to_string(),
            stderr: stderr.to_string(),
            ..Default::default()
        })
        .map_err(|s| format!("Tasks.Create({id}) from a checkpoint: {}", s.message()))?;
        self.start_process(id, "")
            .map_err(|s| format!("Tasks.Start({id}) (restore): {}", s.message()))
    }

    /// [`Self::create_container_like`] + [`Self::create_task_from_checkpoint`].
    pub fn restore_as_new(
        &self,
        template: &str,
        new_id: &str,
        rt: Runtime,
        checkpoint: &Descriptor,
    ) -> Result<u32, String> {
        self.create_container_like(template, new_id, rt, &[]);
        self.create_task_from_checkpoint(new_id, checkpoint)
    }
}

/// Names of the entries of tar file `tar` as `tar -tf` prints them.
pub fn tar_list(tar: &Path) -> Vec<String> {
    let mut c = Command::new("tar");
    c.arg("-tf").arg(tar);
    let out = run_with_timeout(&mut c, None, Duration::from_secs(30)).expect("tar -tf");
    assert!(
        out.status.success(),
        "tar -tf {}: {}",
        tar.display(),
        show(&out)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect()
}

/// `name` as an absolute path, whatever prefix (`./`, `/`, none) the tar used.
pub fn tar_name_to_path(name: &str) -> String {
    format!(
        "/{}",
        name.trim_start_matches("./")
            .trim_start_matches('/')
            .trim_end_matches('/')
    )
}

/// The content of the entry of tar file `tar` naming absolute path `path`; None when absent.
pub fn tar_member(tar: &Path, path: &str) -> Option<Vec<u8>> {
    let name = tar_list(tar)
        .into_iter()
        .find(|n| tar_name_to_path(n) == tar_name_to_path(path))?;
    let mut c = Command::new("tar");
    c.arg("-xOf").arg(tar).arg(&name);
    let out = run_with_timeout(&mut c, None, Duration::from_secs(30)).expect("tar -xOf");
    out.status.success().then_some(out.stdout)
}

/// Entry `member` of the tar stored as entry `inner` of tar `outer` (the rootfs diff inside a
/// checkpoint blob), written to `scratch` on the way.
pub fn nested_tar_member(
    outer: &Path,
    inner: &str,
    member: &str,
    scratch: &Path,
) -> Option<Vec<u8>> {
    let bytes = tar_member(outer, inner)?;
    std::fs::write(scratch, bytes).ok()?;
    let r = tar_member(scratch, member);
    let _ = std::fs::remove_file(scratch);
    r
}

// ---- workloads and ctr helpers shared by the checkpoint scenarios --------------------------------

/// A counter that keeps `<token> <i>` in `<dir>/count` (`dir` inside the container), ticking
/// every ~20 ms. The token is drawn once at start and kept in memory: a restored process writes
/// the original's token, a process that started over a new one. The file is overwritten in
/// place (`1<>`, no truncation; the text only grows) because ext4 flushes a file truncated and
/// rewritten on close (auto_da_alloc).
pub fn counter_script(dir: &str) -> String {
    format!(
        "tok=$(head -c 8 /dev/urandom | od -An -tx1 | tr -d ' \\n'); i=0; \
         while :; do i=$((i+1)); echo \"$tok $i\" 1<> {dir}/count; sleep 0.02; done"
    )
}

/// `(token, count)` of a [`counter_script`] counter, read through `/proc/<pid>/root`.
pub fn read_counter(pid: u32, dir: &str) -> Option<(String, u64)> {
    let text = crate::read_in_container(pid, &format!("{dir}/count"))?;
    let mut parts = text.split_whitespace();
    let tok = parts.next()?.to_string();
    let n = parts.next()?.parse().ok()?;
    Some((tok, n))
}

/// Waits until the counter of `pid` is past `n`; returns it.
pub fn wait_counter_past(pid: u32, dir: &str, n: u64) -> (String, u64) {
    crate::poll(
        format!("counter {dir}/count of pid {pid} past {n}"),
        Duration::from_secs(30),
        || read_counter(pid, dir).filter(|(_, c)| *c > n),
    )
}

impl Containerd {
    /// `ctr run -d --null-io <flags> --runtime <rt> IMAGE <id> <cmd...>`, then waits for RUNNING.
    pub fn run_detached_with(
        &self,
        rt: Runtime,
        id: &str,
        flags: &[&str],
        cmd: &[&str],
    ) -> crate::TaskInfo {
        let mut args = vec!["run", "--fifo-dir", self.fifo_dir(), "-d", "--null-io"];
        args.extend_from_slice(flags);
        args.extend_from_slice(&["--runtime", rt.name(), crate::IMAGE, id]);
        args.extend_from_slice(cmd);
        self.ctr_ok(args);
        self.wait_task_status(id, "RUNNING", crate::STATE_TIMEOUT)
    }

    /// Kills task `id` (SIGKILL), waits for STOPPED, deletes the task.
    pub fn kill_and_delete_task(&self, id: &str) {
        self.kill(id, "SIGKILL");
        self.wait_task_status(id, "STOPPED", crate::STATE_TIMEOUT);
        self.ctr_ok(["tasks", "delete", id]);
    }

    /// The digest of image `reference` (`ctr images ls`).
    pub fn image_digest(&self, reference: &str) -> Option<String> {
        let out = self.ctr_ok(["images", "ls"]);
        out.lines().skip(1).find_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            (cols.first() == Some(&reference))
                .then(|| {
                    cols.iter()
                        .find(|c| c.starts_with("sha256:"))
                        .map(|c| c.to_string())
                })
                .flatten()
        })
    }

    /// The OCI index of image `reference` (`ctr content get`), parsed.
    pub fn image_index(&self, reference: &str) -> serde_json::Value {
        let digest = self
            .image_digest(reference)
            .unwrap_or_else(|| panic!("no image {reference} in ctr images ls"));
        let text = self.ctr_ok(["content", "get", &digest]);
        serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("index of {reference} is not JSON ({e}): {text}"))
    }

    /// The descriptor of the CRIU checkpoint blob in checkpoint image `reference`.
    pub fn checkpoint_descriptor(&self, reference: &str) -> Descriptor {
        let index = self.image_index(reference);
        let m = index["manifests"]
            .as_array()
            .and_then(|ms| {
                ms.iter()
                    .find(|m| m["mediaType"] == CRIU_CHECKPOINT_MEDIA_TYPE)
            })
            .unwrap_or_else(|| {
                panic!("no {CRIU_CHECKPOINT_MEDIA_TYPE} in the index of {reference}: {index:#}")
            });
        Descriptor {
            media_type: CRIU_CHECKPOINT_MEDIA_TYPE.to_string(),
            digest: m["digest"].as_str().expect("digest").to_string(),
            size: m["size"].as_i64().expect("size"),
            annotations: HashMap::new(),
        }
    }
}

/// A static program that takes an exclusive flock(2) on `argv[1]` (created if missing), then
/// writes `argv[2]` and waits forever: CRIU refuses to dump a held file lock unless asked to.
const LOCK_HOLDER_C: &str = r#"
#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>
int main(int argc, char **argv) {
    if (argc < 3) return 2;
    int fd = open(argv[1], O_RDWR | O_CREAT, 0644);
    if (fd < 0 || flock(fd, LOCK_EX) != 0) return 1;
    int r = open(argv[2], O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (r < 0 || write(r, "locked\n", 7) != 7) return 1;
    close(r);
    for (;;) pause();
}
"#;

/// The lock holder (see `LOCK_HOLDER_C`), built once per test process with `gcc -static` (the
/// C toolchain cargo links with) into `<target>/test-bin/`.
pub fn lock_holder() -> PathBuf {
    static BIN: std::sync::OnceLock<Result<PathBuf, String>> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        let dir = crate::workspace_root().join("target").join("test-bin");
        std::fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
        // Built under temp names and renamed: test processes may build it concurrently.
        let src = dir.join(format!("lockhold.{}.c", std::process::id()));
        let tmp = dir.join(format!("lockhold.{}.tmp", std::process::id()));
        let bin = dir.join("lockhold");
        std::fs::write(&src, LOCK_HOLDER_C).map_err(|e| e.to_string())?;
        let mut c = Command::new("gcc");
        c.args(["-static", "-O2", "-o"]).arg(&tmp).arg(&src);
        let out = run_with_timeout(&mut c, None, Duration::from_secs(120));
        let _ = std::fs::remove_file(&src);
        let out = out?;
        if !out.status.success() {
            let _ = std::fs::remove_file(&tmp);
            return Err(format!(
                "gcc -static lockhold.c (needs libc6-dev): {}",
                show(&out)
            ));
        }
        std::fs::rename(&tmp, &bin).map_err(|e| format!("rename to {}: {e}", bin.display()))?;
        Ok(bin)
    })
    .clone()
    .unwrap_or_else(|e| panic!("{e}"))
}

/// A named pipe made here and read by a thread (as ctr does for a task's stdout/stderr): its
/// path goes into a CreateTaskRequest, everything written to it is kept.
pub struct FifoReader {
    path: PathBuf,
    text: std::sync::Arc<std::sync::Mutex<String>>,
}

impl FifoReader {
    /// Makes the fifo at `path` and starts reading it (the open waits for the writer).
    pub fn new(path: &Path) -> FifoReader {
        let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).expect("fifo path");
        // SAFETY: mkfifo with a valid NUL-terminated path.
        let rc = unsafe { libc::mkfifo(c.as_ptr(), 0o600) };
        assert_eq!(
            rc,
            0,
            "mkfifo {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
        let text = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let (p, t) = (path.to_path_buf(), text.clone());
        std::thread::spawn(move || {
            use std::io::Read;
            let Ok(mut f) = std::fs::File::open(&p) else {
                return;
            };
            let mut buf = [0u8; 4096];
            while let Ok(n) = f.read(&mut buf) {
                if n == 0 {
                    break;
                }
                t.lock()
                    .expect("fifo text")
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        FifoReader {
            path: path.to_path_buf(),
            text,
        }
    }

    pub fn path(&self) -> &str {
        self.path.to_str().expect("utf-8 fifo path")
    }

    /// What was read so far.
    pub fn text(&self) -> String {
        self.text.lock().expect("fifo text").clone()
    }

    /// Polls until `f` finds what it wants in the text read so far.
    pub fn wait_for<T>(&self, what: &str, mut f: impl FnMut(&str) -> Option<T>) -> T {
        let mut last = String::new();
        crate::poll_until(Duration::from_secs(30), || {
            last = self.text();
            f(&last)
        })
        .unwrap_or_else(|| {
            let tail: String = last
                .chars()
                .rev()
                .take(400)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            panic!(
                "{what} not read from {} within 30s; last read: {tail:?}",
                self.path.display()
            )
        })
    }
}
