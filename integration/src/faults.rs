//! What the fault and hostile-input scenarios need beyond the harness (tests/faults.rs,
//! hostile.rs, bad_requests.rs, load.rs):
//!
//! - [`Daemon`]: restart a test's containerd (SIGTERM, then a new one on the same root, state,
//!   config and log), optionally with another `PATH` (so that the shims it starts find no `criu`,
//!   or a fake one);
//! - [`Api`]: the gRPC calls ctr cannot make (raw options, no client-side pause, crafted content
//!   written to the content store under a lease, restore as a new container), errors kept as
//!   code + message ([`RpcError`]);
//! - [`ShimClient`]: the shim's own ttrpc Task API, called directly (unknown container ids never
//!   reach a shim through containerd, nor do options containerd refuses itself);
//! - [`TarEntry`] / [`tar_archive`]: tar archives written byte by byte, hostile names included
//!   (`..`, absolute, through a symlink, hard links out, devices, absurd sizes, GNU long names,
//!   PAX paths);
//! - what the host shows: freezer state, open fds, RSS, zombies, leftover work dirs.

use std::collections::HashMap;
use std::fmt;
use std::fs::{self, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use containerd_client::services::v1::containers_client::ContainersClient;
use containerd_client::services::v1::content_client::ContentClient;
use containerd_client::services::v1::leases_client::LeasesClient;
use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use containerd_client::services::v1::snapshots::{
    MountsRequest, PrepareSnapshotRequest, StatSnapshotRequest,
};
use containerd_client::services::v1::tasks_client::TasksClient;
use containerd_client::services::v1::{
    container::Runtime as ContainerRuntime, CheckpointTaskRequest, Container,
    CreateContainerRequest, CreateRequest as CreateLeaseRequest, CreateTaskRequest,
    DeleteProcessRequest, DeleteTaskRequest, ExecProcessRequest, GetContainerRequest, GetRequest,
    KillRequest, PauseTaskRequest, ResizePtyRequest, ResumeTaskRequest, StartRequest,
    UpdateTaskRequest, WriteAction, WriteContentRequest,
};
use containerd_client::tonic::transport::Channel;
use containerd_client::tonic::{Code, Request};
use containerd_client::types::{Descriptor, Mount};
use prost::Message;
use prost_types::Any;

use crate::host;
use crate::poll::{poll, poll_until};
use crate::process::{run_with_timeout, wait_child};
use crate::{Containerd, Runtime, IMAGE};

/// Media type of the blob containerd makes of a checkpoint directory.
pub const CRIU_CHECKPOINT_MEDIA_TYPE: &str =
    "application/vnd.containerd.container.criu.checkpoint.criu.tar";
/// Type URL of the runc checkpoint options (both shims know it).
pub const CHECKPOINT_OPTIONS_TYPE_URL: &str = "containerd.runc.v1.CheckpointOptions";
/// Type URL of the runc runtime options.
pub const RUNC_OPTIONS_TYPE_URL: &str = "containerd.runc.v1.Options";
/// Type URL of an OCI process spec (Tasks.Exec).
pub const PROCESS_SPEC_TYPE_URL: &str = "types.containerd.io/opencontainers/runtime-spec/1/Process";
/// Type URL of OCI LinuxResources (Tasks.Update).
pub const LINUX_RESOURCES_TYPE_URL: &str =
    "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources";
/// Files the custom shim adds to a checkpoint.
pub const ROOTFS_DIFF: &str = "rootfs-diff.tar";
pub const DELETED_FILES: &str = "deleted.files";

/// A counter that writes `i` to /count about 50 times a second.
pub const COUNTER: &str = "i=0; while :; do i=$((i+1)); echo $i > /count; sleep 0.02; done";

const T: Duration = Duration::from_secs(30);

// ---- containerd, restarted ---------------------------------------------------------------------

/// pid of the containerd serving `cd` (the live process whose `--config` is `cd`'s config).
pub fn containerd_pid(cd: &Containerd) -> Option<i32> {
    let config = cd.dir().join("config.toml").to_string_lossy().into_owned();
    host::processes()
        .into_iter()
        .find(|p| {
            p.program_name() == "containerd"
                && p.flag("--config") == Some(config.as_str())
                && host::alive(p.pid)
        })
        .map(|p| p.pid)
}

fn environ(pid: i32) -> Vec<(String, String)> {
    let raw = fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
    raw.split(|b| *b == 0)
        .filter_map(|kv| {
            let kv = String::from_utf8_lossy(kv);
            let (k, v) = kv.split_once('=')?;
            Some((k.to_string(), v.to_string()))
        })
        .collect()
}

/// `path` without the directories holding a `criu`, with `first` in front.
pub fn path_without_criu(path: &str, first: &Path) -> String {
    let mut dirs = vec![first.to_string_lossy().into_owned()];
    dirs.extend(
        path.split(':')
            .filter(|d| !d.is_empty() && !Path::new(d).join("criu").exists())
            .map(str::to_string),
    );
    dirs.join(":")
}

/// The real `criu` on our PATH (and the usual places).
pub fn real_criu() -> PathBuf {
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path
        .split(':')
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin"])
        .map(|d| Path::new(d).join("criu"))
        .find(|p| p.is_file());
    found.expect("criu is installed (scripts/install-deps.sh)")
}

/// Restarts the containerd of a test. The first restart stops the harness's daemon; later ones
/// stop the one started here. Dropped before the [`Containerd`] it borrows (declare it after),
/// it removes the tasks and containers through the daemon it runs and stops it, so that the
/// harness's teardown finds a stopped daemon and cleans up the rest.
pub struct Daemon<'a> {
    cd: &'a Containerd,
    child: Option<Child>,
}

impl<'a> Daemon<'a> {
    pub fn new(cd: &'a Containerd) -> Daemon<'a> {
        Daemon { cd, child: None }
    }

    /// pid of the running daemon.
    pub fn pid(&self) -> i32 {
        containerd_pid(self.cd).expect("containerd of this test is running")
    }

    /// The PATH of the running daemon (which the shims it starts inherit).
    pub fn path(&self) -> String {
        environ(self.pid())
            .into_iter()
            .find(|(k, _)| k == "PATH")
            .map(|(_, v)| v)
            .unwrap_or_default()
    }

    /// Stops the running containerd with SIGTERM (shims and containers keep running) and starts
    /// a new one with the same config and environment, `PATH` replaced by `path` if given. Waits
    /// until it answers `ctr tasks ls`.
    pub fn restart(&mut self, path: Option<&str>) {
        match path {
            Some(p) => self.restart_with_env(&[("PATH", p)]),
            None => self.restart_with_env(&[]),
        }
    }

    /// Restarts containerd with `XDG_RUNTIME_DIR` in the test's dir ([`runtime_dir`]), where
    /// it makes its temporary checkpoint dirs: the restore ones it never removes (containerd
    /// 2.1's Tasks.Create) go with the test's dir, and a test can see what is left there.
    pub fn restart_with_private_runtime_dir(&mut self) {
        let dir = runtime_dir(self.cd);
        fs::create_dir_all(&dir).expect("create runtime dir");
        let dir = dir.to_string_lossy().into_owned();
        self.restart_with_env(&[("XDG_RUNTIME_DIR", &dir)]);
    }

    /// Like [`Self::restart`], with the variables `vars` set (replacing the old values).
    pub fn restart_with_env(&mut self, vars: &[(&str, &str)]) {
        let old = self.pid();
        let mut env = environ(old);
        for (k, v) in vars {
            env.retain(|(name, _)| name != k);
            env.push((k.to_string(), v.to_string()));
        }
        // SAFETY: kill(2) on a pid we just looked up.
        unsafe {
            libc::kill(old, libc::SIGTERM);
        }
        poll(format!("containerd {old} to exit after SIGTERM"), T, || {
            (!host::alive(old)).then_some(())
        });
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
        let log = OpenOptions::new()
            .append(true)
            .create(true)
            .open(self.cd.log_path())
            .expect("open containerd log");
        let log2 = log.try_clone().expect("dup log fd");
        let mut child = Command::new("containerd")
            .arg("--config")
            .arg(self.cd.dir().join("config.toml"))
            .env_clear()
            .envs(env)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .expect("start containerd again");
        let ready = poll_until(T, || {
            if let Ok(Some(st)) = child.try_wait() {
                return Some(Err(format!("containerd exited at restart: {st}")));
            }
            let mut c = self.cd.ctr_command();
            c.args(["tasks", "ls"]);
            match run_with_timeout(&mut c, None, Duration::from_secs(10)) {
                Ok(o) if o.status.success() => Some(Ok(())),
                _ => None,
            }
        });
        self.child = Some(child);
        match ready {
            Some(Ok(())) => {}
            Some(Err(e)) => panic!("{e}\n{}", self.cd.log_tail(40)),
            None => panic!(
                "restarted containerd does not answer within {T:?}\n{}",
                self.cd.log_tail(40)
            ),
        }
    }

    fn cleanup(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Ok(None) = child.try_wait() {
            let quick = Duration::from_secs(20);
            let ctr = |args: &[&str]| {
                let mut c = self.cd.ctr_command();
                c.args(args);
                run_with_timeout(&mut c, None, quick).ok()
            };
            let list = |args: &[&str]| -> Vec<Vec<String>> {
                ctr(args)
                    .map(|o| {
                        String::from_utf8_lossy(&o.stdout)
                            .lines()
                            .skip(1)
                            .map(|l| l.split_whitespace().map(str::to_string).collect())
                            .filter(|r: &Vec<String>| !r.is_empty())
                            .collect()
                    })
                    .unwrap_or_default()
            };
            let tasks = list(&["tasks", "ls"]);
            for t in &tasks {
                if t.get(2).map(String::as_str) == Some("PAUSED") {
                    ctr(&["tasks", "resume", &t[0]]);
                }
                ctr(&["tasks", "kill", "-a", "-s", "SIGKILL", &t[0]]);
            }
            let _ = poll_until(Duration::from_secs(5), || {
                list(&["tasks", "ls"])
                    .iter()
                    .all(|t| t.get(2).map(String::as_str) == Some("STOPPED"))
                    .then_some(())
            });
            for t in &tasks {
                ctr(&["tasks", "delete", "-f", &t[0]]);
            }
            for c in list(&["containers", "ls"]) {
                ctr(&["containers", "delete", &c[0]]);
            }
            // SAFETY: kill(2) on our own unreaped child.
            unsafe {
                libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
            }
            if wait_child(&mut child, Duration::from_secs(10)).is_none() {
                let _ = child.kill();
            }
        }
        let _ = child.wait();
    }
}

impl Drop for Daemon<'_> {
    fn drop(&mut self) {
        self.cleanup();
    }
}

/// The `XDG_RUNTIME_DIR` [`Daemon::restart_with_private_runtime_dir`] gives containerd.
pub fn runtime_dir(cd: &Containerd) -> PathBuf {
    cd.dir().join("xdg")
}

// ---- the host's view ---------------------------------------------------------------------------

/// `freezer.state` of container `id` (v1 freezer: `/sys/fs/cgroup/freezer/<ns>/<id>`); None
/// when the cgroup is gone.
pub fn freezer_state(cd: &Containerd, id: &str) -> Option<String> {
    fs::read_to_string(format!(
        "/sys/fs/cgroup/freezer/{}/freezer.state",
        cd.cgroup_rel(id)
    ))
    .ok()
    .map(|s| s.trim().to_string())
}

/// The value of a [`COUNTER`] in the container of `pid`.
pub fn count(pid: u32) -> Option<u64> {
    crate::read_in_container(pid, "/count")?.trim().parse().ok()
}

/// Waits until the counter of `pid` moves past the value it has now; returns the new value.
pub fn wait_count_advances(pid: u32, what: &str) -> u64 {
    let now = poll(format!("{what}: a counter value in pid {pid}"), T, || {
        count(pid)
    });
    poll(
        format!("{what}: counter of pid {pid} to move past {now}"),
        T,
        || count(pid).filter(|c| *c > now),
    )
}

/// Number of open fds of `pid`.
pub fn fd_count(pid: i32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|rd| rd.count())
        .unwrap_or(0)
}

/// Resident set size of `pid` in KiB.
pub fn rss_kib(pid: i32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

/// (state, ppid) of `pid` from /proc/<pid>/stat.
pub fn state_and_ppid(pid: i32) -> Option<(char, i32)> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    let mut f = rest.split_whitespace();
    let state = f.next()?.chars().next()?;
    let ppid = f.next()?.parse().ok()?;
    Some((state, ppid))
}

/// Zombie processes whose parent is one of `parents`.
pub fn zombies_of(parents: &[i32]) -> Vec<i32> {
    let Ok(rd) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| matches!(state_and_ppid(*pid), Some(('Z', pp)) if parents.contains(&pp)))
        .collect()
}

/// Live descendants of `pid` whose command line (argv joined by spaces) starts with `prefix`
/// (CRIU retitles itself: `criu: dump --rpc -t <pid> -D <dir>` while dumping). One scan of
/// /proc/*/stat, then the tree in memory.
pub fn descendants_with_cmdline(pid: i32, prefix: &str) -> Vec<i32> {
    let Ok(rd) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let parent: Vec<(i32, i32)> = rd
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|p| Some((p, state_and_ppid(p)?.1)))
        .collect();
    let mut found = Vec::new();
    let mut level = vec![pid];
    for _ in 0..6 {
        let next: Vec<i32> = parent
            .iter()
            .filter(|(_, pp)| level.contains(pp))
            .map(|(p, _)| *p)
            .collect();
        for &p in &next {
            let argv = fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
            let line = String::from_utf8_lossy(&argv).replace('\0', " ");
            if line.starts_with(prefix) && host::alive(p) {
                found.push(p);
            }
        }
        if next.is_empty() {
            break;
        }
        level = next;
    }
    found
}

/// Entries of `dir` whose name starts with `prefix`.
pub fn entries_starting_with(dir: &Path, prefix: &str) -> Vec<PathBuf> {
    fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

/// Names in `dir`, sorted.
pub fn list_dir(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// The pid of the one shim serving container `id`.
pub fn shim_pid(cd: &Containerd, id: &str) -> i32 {
    let shims = cd.shims_for(id);
    assert_eq!(shims.len(), 1, "one shim for {id} expected: {shims:?}");
    shims[0].pid
}

/// `ctr run -d --null-io <flags> --runtime <rt> IMAGE <id> <cmd...>`, waits for RUNNING.
pub fn run_with(cd: &Containerd, rt: Runtime, id: &str, flags: &[&str], cmd: &[&str]) -> u32 {
    let mut args = vec!["run", "--fifo-dir", cd.fifo_dir(), "-d", "--null-io"];
    args.extend_from_slice(flags);
    args.extend_from_slice(&["--runtime", rt.name(), IMAGE, id]);
    args.extend_from_slice(cmd);
    cd.ctr_ok(args);
    cd.wait_task_status(id, "RUNNING", crate::STATE_TIMEOUT).pid
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

// ---- containerd's gRPC API ---------------------------------------------------------------------

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

/// `containerd.runc.v1.CheckpointOptions` (not generated by containerd-client).
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

/// A connection to one containerd, in its namespace, optionally under a lease.
pub struct Api {
    rt: tokio::runtime::Runtime,
    channel: Channel,
    namespace: String,
    lease: Option<String>,
}

impl Api {
    pub fn connect(cd: &Containerd) -> Api {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        let address = cd.address().to_path_buf();
        let channel = rt
            .block_on(containerd_client::connect(&address))
            .unwrap_or_else(|e| panic!("connect {}: {e}", address.display()));
        Api {
            rt,
            channel,
            namespace: cd.namespace().to_string(),
            lease: None,
        }
    }

    fn request<M>(&self, msg: M) -> Request<M> {
        let mut req = Request::new(msg);
        let md = req.metadata_mut();
        md.insert(
            "containerd-namespace",
            self.namespace.parse().expect("namespace as metadata"),
        );
        if let Some(lease) = &self.lease {
            md.insert(
                "containerd-lease",
                lease.parse().expect("lease as metadata"),
            );
        }
        req
    }

    fn tasks(&self) -> TasksClient<Channel> {
        TasksClient::new(self.channel.clone())
    }

    /// Leases.Create; every later request carries the lease (what it makes survives the GC).
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

    /// Tasks.Checkpoint with `options` as given (no pause around it).
    pub fn checkpoint(&self, id: &str, options: Option<Any>) -> Result<Vec<Descriptor>, RpcError> {
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
        self.rt.block_on(c.pause(req))?;
        Ok(())
    }

    pub fn resume(&self, id: &str) -> Result<(), RpcError> {
        let req = self.request(ResumeTaskRequest {
            container_id: id.to_string(),
        });
        let mut c = self.tasks();
        self.rt.block_on(c.resume(req))?;
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
        self.rt.block_on(c.kill(req))?;
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
        self.rt.block_on(c.exec(req))?;
        Ok(())
    }

    pub fn start(&self, id: &str, exec_id: &str) -> Result<u32, RpcError> {
        let req = self.request(StartRequest {
            container_id: id.to_string(),
            exec_id: exec_id.to_string(),
        });
        let mut c = self.tasks();
        Ok(self.rt.block_on(c.start(req))?.into_inner().pid)
    }

    /// Tasks.Get: (pid, status as containerd's enum number).
    pub fn get(&self, id: &str, exec_id: &str) -> Result<(u32, i32), RpcError> {
        let req = self.request(GetRequest {
            container_id: id.to_string(),
            exec_id: exec_id.to_string(),
        });
        let mut c = self.tasks();
        let p = self
            .rt
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
        self.rt.block_on(c.resize_pty(req))?;
        Ok(())
    }

    pub fn delete_process(&self, id: &str, exec_id: &str) -> Result<u32, RpcError> {
        let req = self.request(DeleteProcessRequest {
            container_id: id.to_string(),
            exec_id: exec_id.to_string(),
        });
        let mut c = self.tasks();
        Ok(self
            .rt
            .block_on(c.delete_process(req))?
            .into_inner()
            .exit_status)
    }

    pub fn delete_task(&self, id: &str) -> Result<u32, RpcError> {
        let req = self.request(DeleteTaskRequest {
            container_id: id.to_string(),
        });
        let mut c = self.tasks();
        Ok(self.rt.block_on(c.delete(req))?.into_inner().exit_status)
    }

    pub fn update(&self, id: &str, resources: Any) -> Result<(), RpcError> {
        let req = self.request(UpdateTaskRequest {
            container_id: id.to_string(),
            resources: Some(resources),
            annotations: HashMap::new(),
        });
        let mut c = self.tasks();
        self.rt.block_on(c.update(req))?;
        Ok(())
    }

    /// Containers.Get.
    pub fn container(&self, id: &str) -> Container {
        let req = self.request(GetContainerRequest { id: id.to_string() });
        self.rt
            .block_on(ContainersClient::new(self.channel.clone()).get(req))
            .unwrap_or_else(|s| panic!("Containers.Get({id}): {s}"))
            .into_inner()
            .container
            .expect("container in Containers.Get response")
    }

    /// The rootfs mounts of container `id`'s snapshot.
    pub fn rootfs_mounts(&self, id: &str) -> Vec<Mount> {
        let c = self.container(id);
        let req = self.request(MountsRequest {
            snapshotter: c.snapshotter.clone(),
            key: c.snapshot_key.clone(),
        });
        self.rt
            .block_on(SnapshotsClient::new(self.channel.clone()).mounts(req))
            .unwrap_or_else(|s| panic!("Snapshots.Mounts({}): {s}", c.snapshot_key))
            .into_inner()
            .mounts
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
        let req = self.request(CreateTaskRequest {
            container_id: id.to_string(),
            rootfs,
            checkpoint,
            options,
            ..Default::default()
        });
        let mut c = self.tasks();
        Ok(self.rt.block_on(c.create(req))?.into_inner().pid)
    }

    /// Creates container `new_id` like `template` (same image and spec, its own cgroup) on
    /// runtime `rt`, with a fresh snapshot of the image, as containerd's `client.Restore` does.
    pub fn create_container_like(&self, template: &str, new_id: &str, rt: Runtime) {
        let t = self.container(template);
        let mut snaps = SnapshotsClient::new(self.channel.clone());
        let info = self
            .rt
            .block_on(snaps.stat(self.request(StatSnapshotRequest {
                snapshotter: t.snapshotter.clone(),
                key: t.snapshot_key.clone(),
            })))
            .unwrap_or_else(|s| panic!("Snapshots.Stat({}): {s}", t.snapshot_key))
            .into_inner()
            .info
            .expect("info in Snapshots.Stat response");
        self.rt
            .block_on(snaps.prepare(self.request(PrepareSnapshotRequest {
                snapshotter: t.snapshotter.clone(),
                key: new_id.to_string(),
                parent: info.parent.clone(),
                labels: HashMap::new(),
            })))
            .unwrap_or_else(|s| panic!("Snapshots.Prepare({new_id}): {s}"));
        let spec_any = t.spec.clone().expect("template has a spec");
        let mut spec: serde_json::Value =
            serde_json::from_slice(&spec_any.value).expect("spec is JSON");
        spec["linux"]["cgroupsPath"] =
            serde_json::Value::String(format!("/{}/{new_id}", self.namespace));
        let container = Container {
            id: new_id.to_string(),
            image: t.image.clone(),
            runtime: Some(ContainerRuntime {
                name: rt.name().to_string(),
                options: t.runtime.as_ref().and_then(|r| r.options.clone()),
            }),
            spec: Some(Any {
                type_url: spec_any.type_url.clone(),
                value: serde_json::to_vec(&spec).expect("encode spec"),
            }),
            snapshotter: t.snapshotter.clone(),
            snapshot_key: new_id.to_string(),
            ..Default::default()
        };
        self.rt
            .block_on(
                ContainersClient::new(self.channel.clone()).create(self.request(
                    CreateContainerRequest {
                        container: Some(container),
                    },
                )),
            )
            .unwrap_or_else(|s| panic!("Containers.Create({new_id}): {s}"));
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
        let digest = self.rt.block_on(async {
            let mut stream = ContentClient::new(self.channel.clone())
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

// ---- the shim's ttrpc API, directly ------------------------------------------------------------

/// Requests of the shim's Task service (containerd/api/runtime/task/v3/shim.proto, which
/// containerd 2 speaks: `"version":3` in the bundle's bootstrap.json).
pub mod shim_api {
    use prost::Message;
    use prost_types::Any;

    pub const SERVICE: &str = "containerd.task.v3.Task";

    /// CreateTaskRequest without rootfs mounts.
    #[derive(Clone, PartialEq, Message)]
    pub struct CreateTaskRequest {
        #[prost(string, tag = "1")]
        pub id: String,
        #[prost(string, tag = "2")]
        pub bundle: String,
        #[prost(string, tag = "8")]
        pub checkpoint: String,
        #[prost(message, optional, tag = "10")]
        pub options: Option<Any>,
    }

    #[derive(Clone, PartialEq, Message)]
    pub struct IdRequest {
        #[prost(string, tag = "1")]
        pub id: String,
        #[prost(string, tag = "2")]
        pub exec_id: String,
    }

    #[derive(Clone, PartialEq, Message)]
    pub struct KillRequest {
        #[prost(string, tag = "1")]
        pub id: String,
        #[prost(string, tag = "2")]
        pub exec_id: String,
        #[prost(uint32, tag = "3")]
        pub signal: u32,
        #[prost(bool, tag = "4")]
        pub all: bool,
    }

    #[derive(Clone, PartialEq, Message)]
    pub struct CheckpointTaskRequest {
        #[prost(string, tag = "1")]
        pub id: String,
        #[prost(string, tag = "2")]
        pub path: String,
        #[prost(message, optional, tag = "3")]
        pub options: Option<Any>,
    }

    #[derive(Clone, PartialEq, Message)]
    pub struct UpdateTaskRequest {
        #[prost(string, tag = "1")]
        pub id: String,
        #[prost(message, optional, tag = "2")]
        pub resources: Option<Any>,
    }

    #[derive(Clone, PartialEq, Message)]
    pub struct ExecProcessRequest {
        #[prost(string, tag = "1")]
        pub id: String,
        #[prost(string, tag = "2")]
        pub exec_id: String,
        #[prost(bool, tag = "3")]
        pub terminal: bool,
        #[prost(string, tag = "4")]
        pub stdin: String,
        #[prost(string, tag = "5")]
        pub stdout: String,
        #[prost(string, tag = "6")]
        pub stderr: String,
        #[prost(message, optional, tag = "7")]
        pub spec: Option<Any>,
    }

    #[derive(Clone, PartialEq, Message)]
    pub struct StateResponse {
        #[prost(string, tag = "1")]
        pub id: String,
        #[prost(string, tag = "2")]
        pub bundle: String,
        #[prost(uint32, tag = "3")]
        pub pid: u32,
        #[prost(int32, tag = "4")]
        pub status: i32,
    }

    #[derive(Clone, PartialEq, Message)]
    pub struct ConnectResponse {
        #[prost(uint32, tag = "1")]
        pub shim_pid: u32,
        #[prost(uint32, tag = "2")]
        pub task_pid: u32,
        #[prost(string, tag = "3")]
        pub version: String,
    }
}

#[derive(Clone, PartialEq, Message)]
struct TtrpcRequest {
    #[prost(string, tag = "1")]
    service: String,
    #[prost(string, tag = "2")]
    method: String,
    #[prost(bytes = "vec", tag = "3")]
    payload: Vec<u8>,
    #[prost(int64, tag = "4")]
    timeout_nano: i64,
}

#[derive(Clone, PartialEq, Message)]
struct TtrpcStatus {
    #[prost(int32, tag = "1")]
    code: i32,
    #[prost(string, tag = "2")]
    message: String,
}

#[derive(Clone, PartialEq, Message)]
struct TtrpcResponse {
    #[prost(message, optional, tag = "1")]
    status: Option<TtrpcStatus>,
    #[prost(bytes = "vec", tag = "2")]
    payload: Vec<u8>,
}

/// A ttrpc connection to the shim serving container `id` (its address from the bundle's
/// `bootstrap.json`), speaking the Task service.
pub struct ShimClient {
    stream: UnixStream,
    next_stream: u32,
}

impl ShimClient {
    pub fn connect(cd: &Containerd, id: &str) -> ShimClient {
        let boot = cd.bundle_dir(id).join("bootstrap.json");
        let text =
            fs::read_to_string(&boot).unwrap_or_else(|e| panic!("read {}: {e}", boot.display()));
        let v: serde_json::Value = serde_json::from_str(&text).expect("bootstrap.json is JSON");
        let address = v["address"].as_str().expect("address in bootstrap.json");
        let path = address.strip_prefix("unix://").unwrap_or(address);
        let stream = UnixStream::connect(path).unwrap_or_else(|e| panic!("connect {path}: {e}"));
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .expect("socket timeout");
        ShimClient {
            stream,
            next_stream: 1,
        }
    }

    /// Calls `method` of the Task service with `req`; the response payload or the status.
    pub fn call(&mut self, method: &str, req: &impl Message) -> Result<Vec<u8>, RpcError> {
        let body = TtrpcRequest {
            service: shim_api::SERVICE.to_string(),
            method: method.to_string(),
            payload: req.encode_to_vec(),
            timeout_nano: 0,
        }
        .encode_to_vec();
        let sid = self.next_stream;
        self.next_stream += 2;
        let mut frame = Vec::with_capacity(10 + body.len());
        frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
        frame.extend_from_slice(&sid.to_be_bytes());
        frame.push(1); // request
        frame.push(0);
        frame.extend_from_slice(&body);
        self.stream.write_all(&frame).expect("write ttrpc request");
        loop {
            let mut head = [0u8; 10];
            self.stream
                .read_exact(&mut head)
                .unwrap_or_else(|e| panic!("ttrpc {method}: read header: {e}"));
            let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
            let rsid = u32::from_be_bytes([head[4], head[5], head[6], head[7]]);
            let mut buf = vec![0u8; len];
            self.stream
                .read_exact(&mut buf)
                .unwrap_or_else(|e| panic!("ttrpc {method}: read body: {e}"));
            if rsid != sid || head[8] != 2 {
                continue;
            }
            let resp = TtrpcResponse::decode(buf.as_slice())
                .unwrap_or_else(|e| panic!("ttrpc {method}: bad response: {e}"));
            return match resp.status {
                Some(s) if s.code != 0 => Err(RpcError {
                    code: Code::from(s.code),
                    message: s.message,
                }),
                _ => Ok(resp.payload),
            };
        }
    }

    /// Connect: (shim pid, task pid).
    pub fn connect_call(&mut self, id: &str) -> Result<(u32, u32), RpcError> {
        let r = self.call(
            "Connect",
            &shim_api::IdRequest {
                id: id.to_string(),
                exec_id: String::new(),
            },
        )?;
        let c = shim_api::ConnectResponse::decode(r.as_slice()).expect("ConnectResponse");
        Ok((c.shim_pid, c.task_pid))
    }

    /// State: (pid, status number: 1 created, 2 running, 3 stopped, 4 paused).
    pub fn state(&mut self, id: &str, exec_id: &str) -> Result<(u32, i32), RpcError> {
        let r = self.call(
            "State",
            &shim_api::IdRequest {
                id: id.to_string(),
                exec_id: exec_id.to_string(),
            },
        )?;
        let s = shim_api::StateResponse::decode(r.as_slice()).expect("StateResponse");
        Ok((s.pid, s.status))
    }
}

// ---- hand-made tar archives --------------------------------------------------------------------

/// One entry of a tar archive written byte by byte: names and link targets exactly as given.
#[derive(Clone, Debug)]
pub struct TarEntry {
    pub name: String,
    /// `0` file, `1` hard link, `2` symlink, `3` char device, `4` block device, `5` directory,
    /// `6` fifo.
    pub typeflag: u8,
    pub link: String,
    pub data: Vec<u8>,
    /// The size the header claims when it is not `data.len()`.
    pub header_size: Option<u64>,
    pub mode: u32,
    pub dev: (u32, u32),
    /// A PAX `path` record before the entry (readers take it over `name`).
    pub pax_path: Option<String>,
}

impl TarEntry {
    fn new(name: &str, typeflag: u8) -> TarEntry {
        TarEntry {
            name: name.to_string(),
            typeflag,
            link: String::new(),
            data: Vec::new(),
            header_size: None,
            mode: if typeflag == b'5' { 0o755 } else { 0o644 },
            dev: (0, 0),
            pax_path: None,
        }
    }
    pub fn file(name: &str, data: &[u8]) -> TarEntry {
        TarEntry {
            data: data.to_vec(),
            ..TarEntry::new(name, b'0')
        }
    }
    pub fn dir(name: &str) -> TarEntry {
        TarEntry::new(name, b'5')
    }
    pub fn symlink(name: &str, target: &str) -> TarEntry {
        TarEntry {
            link: target.to_string(),
            mode: 0o777,
            ..TarEntry::new(name, b'2')
        }
    }
    pub fn hard_link(name: &str, target: &str) -> TarEntry {
        TarEntry {
            link: target.to_string(),
            ..TarEntry::new(name, b'1')
        }
    }
    pub fn char_device(name: &str, major: u32, minor: u32) -> TarEntry {
        TarEntry {
            dev: (major, minor),
            ..TarEntry::new(name, b'3')
        }
    }
    pub fn block_device(name: &str, major: u32, minor: u32) -> TarEntry {
        TarEntry {
            dev: (major, minor),
            ..TarEntry::new(name, b'4')
        }
    }
    pub fn fifo(name: &str) -> TarEntry {
        TarEntry::new(name, b'6')
    }
    /// The header claims `size` bytes whatever the data.
    pub fn with_header_size(mut self, size: u64) -> TarEntry {
        self.header_size = Some(size);
        self
    }
    /// The mode the header gives.
    pub fn with_mode(mut self, mode: u32) -> TarEntry {
        self.mode = mode;
        self
    }
    /// A PAX `path` record says the entry's name is `path`.
    pub fn with_pax_path(mut self, path: &str) -> TarEntry {
        self.pax_path = Some(path.to_string());
        self
    }
}

fn octal(field: &mut [u8], v: u64) {
    let digits = field.len() - 1;
    let s = format!("{v:0digits$o}");
    assert!(
        s.len() <= digits,
        "{v} does not fit in {digits} octal digits"
    );
    field[..digits].copy_from_slice(s.as_bytes());
    field[digits] = 0;
}

fn header(
    name: &[u8],
    typeflag: u8,
    link: &[u8],
    size: u64,
    mode: u32,
    dev: (u32, u32),
) -> [u8; 512] {
    let mut h = [0u8; 512];
    let n = name.len().min(100);
    h[..n].copy_from_slice(&name[..n]);
    octal(&mut h[100..108], u64::from(mode));
    octal(&mut h[108..116], 0);
    octal(&mut h[116..124], 0);
    if size < 0o77777777777 {
        octal(&mut h[124..136], size);
    } else {
        // GNU base-256: high bit set, big-endian in the rest of the field.
        let f = &mut h[124..136];
        f.fill(0);
        f[4..].copy_from_slice(&size.to_be_bytes());
        f[0] = 0x80;
    }
    octal(&mut h[136..148], 1_700_000_000);
    h[156] = typeflag;
    let l = link.len().min(100);
    h[157..157 + l].copy_from_slice(&link[..l]);
    h[257..263].copy_from_slice(b"ustar ");
    h[263..265].copy_from_slice(b" \0");
    h[265..269].copy_from_slice(b"root");
    h[297..301].copy_from_slice(b"root");
    octal(&mut h[329..337], u64::from(dev.0));
    octal(&mut h[337..345], u64::from(dev.1));
    h[148..156].fill(b' ');
    let sum: u32 = h.iter().map(|b| u32::from(*b)).sum();
    let s = format!("{sum:06o}\0 ");
    h[148..156].copy_from_slice(s.as_bytes());
    h
}

fn push_padded(out: &mut Vec<u8>, data: &[u8]) {
    out.extend_from_slice(data);
    let pad = (512 - data.len() % 512) % 512;
    out.extend(std::iter::repeat_n(0u8, pad));
}

fn pax_record(key: &str, value: &str) -> Vec<u8> {
    let body = format!(" {key}={value}\n");
    let mut len = body.len() + 1;
    while format!("{len}{body}").len() != len {
        len += 1;
    }
    format!("{len}{body}").into_bytes()
}

/// A tar archive of `entries` (GNU format: names over 100 bytes go in a long-name entry).
pub fn tar_archive(entries: &[TarEntry]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in entries {
        if let Some(p) = &e.pax_path {
            let rec = pax_record("path", p);
            out.extend_from_slice(&header(
                b"PaxHeaders/x",
                b'x',
                b"",
                rec.len() as u64,
                0o644,
                (0, 0),
            ));
            push_padded(&mut out, &rec);
        }
        for (field, flag) in [(&e.name, b'L'), (&e.link, b'K')] {
            if field.len() > 100 {
                let mut v = field.as_bytes().to_vec();
                v.push(0);
                out.extend_from_slice(&header(
                    b"././@LongLink",
                    flag,
                    b"",
                    v.len() as u64,
                    0o644,
                    (0, 0),
                ));
                push_padded(&mut out, &v);
            }
        }
        let size = e.header_size.unwrap_or(e.data.len() as u64);
        out.extend_from_slice(&header(
            e.name.as_bytes(),
            e.typeflag,
            e.link.as_bytes(),
            size,
            e.mode,
            e.dev,
        ));
        push_padded(&mut out, &e.data);
    }
    out.extend(std::iter::repeat_n(0u8, 1024));
    out
}

/// A checkpoint blob as containerd stores one: a tar of the checkpoint directory, here holding
/// `files` (name, content) only.
pub fn checkpoint_blob(files: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let entries: Vec<TarEntry> = files.iter().map(|(n, d)| TarEntry::file(n, d)).collect();
    tar_archive(&entries)
}
