//! A private containerd per test: own root, state, sockets, config and log in a temp dir; torn
//! down (tasks, daemon, shims, container processes, cgroups, mounts, dir) on drop, panic or not.

use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::{BufRead, BufReader};
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::host;
use crate::poll::{poll, poll_until};
use crate::process::{run_with_timeout, Spawned};
use crate::pty::PtySpawned;
use crate::{shim_binary, show, test_image, workspace_root, Runtime, IMAGE, SHIM_PROGRAM};

/// How long one `ctr` command may take before the test fails.
pub const CTR_TIMEOUT: Duration = Duration::from_secs(60);
/// How long containerd may take to answer `ctr version`.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Default deadline for task state changes.
pub const STATE_TIMEOUT: Duration = Duration::from_secs(20);

/// Plugins a ctr-driven test never uses: CRI, NRI, tracing, restart monitor, snapshotters that
/// cannot work here. containerd 2.1 starts without them (checked) and faster.
const CRI_PLUGINS: &[&str] = &[
    "io.containerd.grpc.v1.cri",
    "io.containerd.cri.v1.images",
    "io.containerd.cri.v1.runtime",
    "io.containerd.podsandbox.controller.v1.podsandbox",
    "io.containerd.grpc.v1.sandbox-controllers",
];
const DISABLED_PLUGINS: &[&str] = &[
    "io.containerd.nri.v1.nri",
    "io.containerd.monitor.container.v1.restart",
    "io.containerd.tracing.processor.v1.otlp",
    "io.containerd.internal.v1.tracing",
    "io.containerd.snapshotter.v1.blockfile",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.snapshotter.v1.erofs",
    "io.containerd.differ.v1.erofs",
];

/// Where containerd-shim-runc-v2 (and runc) keep container state: `<root>/<namespace>/<id>`.
pub const RUNC_ROOT: &str = "/run/containerd/runc";

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// One row of `ctr task ls`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskInfo {
    pub id: String,
    pub pid: u32,
    pub status: String,
}

/// A private containerd daemon; see the module doc.
pub struct Containerd {
    dir: PathBuf,
    root: PathBuf,
    state: PathBuf,
    address: PathBuf,
    namespace: String,
    /// Unique to this instance (`shimtest-<tag>`): the namespace of a ctr host, the cgroup
    /// parent of a CRI host's pods (whose namespace is k8s.io).
    tag: String,
    log: PathBuf,
    fifo_dir: String,
    child: Option<Child>,
    /// The network namespace containerd runs in (see [`Setup::netns`]); ctr runs there too.
    netns: Option<String>,
}

/// Config to append, made from the instance's dir.
pub type ConfigFragment = Box<dyn FnOnce(&Path) -> String>;

/// What a test needs of its containerd beyond the default ctr host.
#[derive(Default)]
pub struct Setup {
    /// Keep the CRI plugins, work in the CRI's namespace (k8s.io), and append this fragment to the
    /// config; then register io.containerd.custom.v2 in it the way `make install` does
    /// (scripts/register-runtime.sh).
    pub cri: Option<ConfigFragment>,
    /// Run containerd (and so its shims and host-network containers) in this network namespace
    /// (a `/run/netns/<name>` path), as one of the two hosts of the migration tests.
    pub netns: Option<String>,
    /// Do not import the test image: a host that must pull what it needs.
    pub no_image: bool,
    /// Where its directory (root, state, sockets) goes instead of `SHIMTEST_TMPDIR`: an
    /// [`crate::xfs::Xfs`] mount, for a root that clones extents.
    pub base: Option<PathBuf>,
}

fn config_toml(root: &Path, state: &Path, address: &Path, level: &str, cri: bool) -> String {
    let disabled: Vec<String> = DISABLED_PLUGINS
        .iter()
        .chain(if cri { &[][..] } else { CRI_PLUGINS })
        .map(|p| format!("{p:?}"))
        .collect();
    format!(
        r#"# written by the integration-test harness
version = 3
root = "{root}"
state = "{state}"
disabled_plugins = [{disabled}]

[grpc]
  address = "{address}"

[ttrpc]
  address = "{address}.ttrpc"

[debug]
  address = ""
  level = "{level}"

[metrics]
  address = ""
"#,
        root = root.display(),
        state = state.display(),
        address = address.display(),
        disabled = disabled.join(", "),
    )
}

fn tail_lines(path: &Path, n: usize) -> String {
    let Ok(f) = File::open(path) else {
        return format!("(no log at {})", path.display());
    };
    let lines: Vec<String> = BufReader::new(f).lines().map_while(Result::ok).collect();
    let start = lines.len().saturating_sub(n);
    lines[start..].join("\n")
}

fn parse_table(text: &str) -> Vec<Vec<String>> {
    text.lines()
        .skip(1)
        .map(|l| l.split_whitespace().map(str::to_string).collect::<Vec<_>>())
        .filter(|r| !r.is_empty())
        .collect()
}

impl Containerd {
    /// Starts a private containerd (config version 3), waits until `ctr version` answers, and
    /// imports the test image ([`IMAGE`]). Panics with containerd's log tail if that fails.
    pub fn start() -> Containerd {
        Self::start_with(Setup::default())
    }

    /// [`Self::start`] with more than the default ctr host: see [`Setup`].
    pub fn start_with(setup: Setup) -> Containerd {
        let image = test_image().unwrap_or_else(|e| panic!("test image: {e}"));
        let base = setup.base.clone().unwrap_or_else(|| {
            std::env::var_os("SHIMTEST_TMPDIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("/tmp"))
        });
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let pid = std::process::id();
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let tag = format!("{pid}-{n}-{:04x}", nanos & 0xffff);
        let dir = base.join(format!("shimtest-{tag}"));
        let cri = setup.cri;
        let no_image = setup.no_image;
        let namespace = match cri {
            Some(_) => "k8s.io".to_string(),
            None => format!("shimtest-{tag}"),
        };
        fs::create_dir_all(&base).expect("create temp base dir");
        fs::create_dir(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        let mut cd = Containerd {
            root: dir.join("root"),
            state: dir.join("state"),
            address: dir.join("containerd.sock"),
            namespace,
            tag: format!("shimtest-{tag}"),
            log: dir.join("containerd.log"),
            fifo_dir: dir.join("fifo").to_string_lossy().into_owned(),
            child: None,
            netns: setup.netns.clone(),
            dir,
        };
        // sun_path holds 108 bytes; containerd adds ".ttrpc" to the second socket.
        assert!(
            cd.address.as_os_str().len() < 100,
            "socket path too long: {} (set SHIMTEST_TMPDIR to a shorter dir)",
            cd.address.display()
        );
        let bin = cd.dir.join("bin");
        for d in [&cd.root, &cd.state, &bin] {
            fs::create_dir_all(d).expect("create containerd dirs");
        }
        // containerd resolves io.containerd.custom.v2 to `containerd-shim-custom-v2` on its PATH.
        if let Ok(shim) = shim_binary() {
            symlink(&shim, bin.join(SHIM_PROGRAM)).expect("link shim binary");
        }
        let level = std::env::var("SHIMTEST_LOG_LEVEL").unwrap_or_else(|_| "debug".to_string());
        let config = cd.dir.join("config.toml");
        let mut toml = config_toml(&cd.root, &cd.state, &cd.address, &level, cri.is_some());
        if let Some(extra) = cri {
            toml.push_str(&extra(&cd.dir));
        }
        fs::write(&config, toml).expect("write config.toml");
        if cd.namespace != cd.tag {
            let script = workspace_root().join("scripts").join("register-runtime.sh");
            let mut c = Command::new("bash");
            c.arg(&script).arg(&config);
            let out = run_with_timeout(&mut c, None, CTR_TIMEOUT).unwrap_or_else(|e| panic!("{e}"));
            assert!(out.status.success(), "{}: {}", script.display(), show(&out));
        }

        let path = format!(
            "{}:{}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            bin.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let log = File::create(&cd.log).expect("create containerd.log");
        let log2 = log.try_clone().expect("dup log fd");
        let mut command = match &cd.netns {
            Some(path) => {
                let mut c = Command::new(crate::host::which("nsenter"));
                c.arg(format!("--net={path}")).arg("containerd");
                c
            }
            None => Command::new("containerd"),
        };
        let child = command
            .arg("--config")
            .arg(&config)
            .env("PATH", path)
            // containerd unpacks checkpoints for restores under XDG_RUNTIME_DIR (else /tmp)
            // and does not always remove them: keep them in the test's own dir.
            .env("XDG_RUNTIME_DIR", cd.dir())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start containerd (scripts/install-deps.sh installs it): {e}")
            });
        cd.child = Some(child);
        cd.wait_ready();
        if no_image {
            return cd;
        }

        let out = cd.ctr([
            "images",
            "import",
            image.to_str().expect("utf-8 image path"),
        ]);
        assert!(
            out.status.success(),
            "ctr images import {}: {}",
            image.display(),
            show(&out)
        );
        let refs = cd.ctr_ok(["images", "ls", "-q"]);
        assert!(
            refs.lines().any(|l| l.trim() == IMAGE),
            "after import the image is not named {IMAGE}; ctr images ls -q gave:\n{refs}"
        );
        cd
    }

    fn wait_ready(&mut self) {
        let res = poll_until(START_TIMEOUT, || {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(st)) = child.try_wait() {
                    return Some(Err(format!("containerd exited early: {st}")));
                }
            }
            let mut cmd = Command::new("ctr");
            cmd.arg("--address").arg(&self.address).arg("version");
            match run_with_timeout(&mut cmd, None, Duration::from_secs(5)) {
                Ok(o) if o.status.success() => Some(Ok(())),
                _ => None,
            }
        });
        match res {
            Some(Ok(())) => {}
            Some(Err(e)) => panic!("{e}\ncontainerd log:\n{}", tail_lines(&self.log, 40)),
            None => panic!(
                "containerd did not answer `ctr version` within {START_TIMEOUT:?}\ncontainerd log:\n{}",
                tail_lines(&self.log, 40)
            ),
        }
    }

    // ---- accessors -------------------------------------------------------------------------

    /// The temp dir holding everything of this containerd.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
    pub fn root_dir(&self) -> &Path {
        &self.root
    }
    pub fn state_dir(&self) -> &Path {
        &self.state
    }
    /// gRPC socket.
    pub fn address(&self) -> &Path {
        &self.address
    }
    /// The namespace every helper uses (unique per instance; k8s.io on a CRI host).
    pub fn namespace(&self) -> &str {
        &self.namespace
    }
    /// `shimtest-<tag>`, unique per instance: a CRI host's pods use it as their cgroup parent.
    pub fn tag(&self) -> &str {
        &self.tag
    }
    pub fn log_path(&self) -> &Path {
        &self.log
    }
    /// Last `n` lines of containerd's log (shim logs included: they go through containerd).
    pub fn log_tail(&self, n: usize) -> String {
        tail_lines(&self.log, n)
    }
    /// Bundle dir of a task: `<state>/io.containerd.runtime.v2.task/<ns>/<id>`.
    pub fn bundle_dir(&self, id: &str) -> PathBuf {
        self.state
            .join("io.containerd.runtime.v2.task")
            .join(&self.namespace)
            .join(id)
    }
    /// runc state dir of a container started by containerd-shim-runc-v2.
    pub fn runc_state_dir(&self, id: &str) -> PathBuf {
        Path::new(RUNC_ROOT).join(&self.namespace).join(id)
    }
    /// cgroup path ctr gives a container (`/<ns>/<id>`), without the leading slash.
    pub fn cgroup_rel(&self, id: &str) -> String {
        format!("{}/{id}", self.tag)
    }

    // ---- ctr ---------------------------------------------------------------------------------

    /// `ctr --address <ours> --namespace <ours>`, ready for arguments.
    pub fn ctr_command(&self) -> Command {
        let mut c = match &self.netns {
            Some(path) => {
                let mut c = Command::new(crate::host::which("nsenter"));
                c.arg(format!("--net={path}")).arg("ctr");
                c
            }
            None => Command::new("ctr"),
        };
        c.arg("--address")
            .arg(&self.address)
            .arg("--namespace")
            .arg(&self.namespace);
        c
    }

    fn ctr_try<I, S>(
        &self,
        args: I,
        stdin: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<Output, String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut c = self.ctr_command();
        c.args(args);
        run_with_timeout(&mut c, stdin, timeout)
    }

    /// Runs ctr with `args` (stdin /dev/null); panics only if it hangs for [`CTR_TIMEOUT`].
    pub fn ctr<I, S>(&self, args: I) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.ctr_try(args, None, CTR_TIMEOUT)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Runs ctr with `stdin` piped in.
    pub fn ctr_with_stdin<I, S>(&self, args: I, stdin: &[u8]) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.ctr_try(args, Some(stdin), CTR_TIMEOUT)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Runs ctr, asserts success, returns stdout.
    pub fn ctr_ok<I, S>(&self, args: I) -> String
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let args: Vec<S> = args.into_iter().collect();
        let shown: Vec<String> = args
            .iter()
            .map(|a| a.as_ref().to_string_lossy().into_owned())
            .collect();
        let out = self.ctr(args);
        assert!(
            out.status.success(),
            "ctr {} failed: {}",
            shown.join(" "),
            show(&out)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Starts ctr in the background, output captured (see [`Spawned`]).
    pub fn spawn_ctr<I, S>(&self, args: I, with_stdin: bool) -> Spawned
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut c = self.ctr_command();
        c.args(args);
        Spawned::spawn(&mut c, with_stdin)
    }

    /// Starts ctr on a fresh pty of `rows` x `cols` (for `-t`).
    pub fn pty_ctr<I, S>(&self, args: I, rows: u16, cols: u16) -> PtySpawned
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut c = self.ctr_command();
        c.args(args);
        PtySpawned::spawn(&mut c, rows, cols)
    }

    // ---- containers and tasks ------------------------------------------------------------------

    /// Where ctr creates the IO fifos of the processes it starts (`--fifo-dir`): inside our temp
    /// dir, so a ctr killed by a failing test leaves nothing in /run/containerd/fifo.
    pub fn fifo_dir(&self) -> &str {
        &self.fifo_dir
    }

    fn run_args<'a>(
        &'a self,
        rt: Runtime,
        flags: &[&'a str],
        id: &'a str,
        cmd: &[&'a str],
    ) -> Vec<&'a str> {
        let mut v = vec!["run", "--fifo-dir", self.fifo_dir()];
        v.extend_from_slice(flags);
        v.extend_from_slice(&["--runtime", rt.name(), IMAGE, id]);
        v.extend_from_slice(cmd);
        v
    }

    /// `ctr run --rm --runtime <rt> IMAGE <id> <cmd...>` to completion (ctr returns the task's
    /// exit code).
    pub fn run(&self, rt: Runtime, id: &str, cmd: &[&str]) -> Output {
        self.ctr(self.run_args(rt, &["--rm"], id, cmd))
    }

    /// Like [`Self::run`] with `stdin` piped in.
    pub fn run_with_stdin(&self, rt: Runtime, id: &str, stdin: &[u8], cmd: &[&str]) -> Output {
        self.ctr_with_stdin(self.run_args(rt, &["--rm"], id, cmd), stdin)
    }

    /// `ctr run --rm` attached, in the background.
    pub fn spawn_run(&self, rt: Runtime, id: &str, cmd: &[&str]) -> Spawned {
        self.spawn_ctr(self.run_args(rt, &["--rm"], id, cmd), false)
    }

    /// `ctr run -t --rm` on a pty of `rows` x `cols`.
    pub fn run_tty(&self, rt: Runtime, id: &str, rows: u16, cols: u16, cmd: &[&str]) -> PtySpawned {
        self.pty_ctr(self.run_args(rt, &["-t", "--rm"], id, cmd), rows, cols)
    }

    /// `ctr run -d` (null IO), then waits for RUNNING; returns the task.
    pub fn run_detached(&self, rt: Runtime, id: &str, cmd: &[&str]) -> TaskInfo {
        self.ctr_ok(self.run_args(rt, &["-d", "--null-io"], id, cmd));
        self.wait_task_status(id, "RUNNING", STATE_TIMEOUT)
    }

    /// `ctr container create --runtime <rt> IMAGE <id> <cmd...>`.
    pub fn create_container(&self, rt: Runtime, id: &str, cmd: &[&str]) {
        let mut v = vec!["containers", "create", "--runtime", rt.name(), IMAGE, id];
        v.extend_from_slice(cmd);
        self.ctr_ok(v);
    }

    /// `ctr task start [-d] <id>` (attached: waits and returns the exit code, deleting the task).
    pub fn start_task(&self, id: &str, detach: bool) -> Output {
        let mut v = vec!["tasks", "start", "--fifo-dir", self.fifo_dir()];
        if detach {
            v.push("-d");
        }
        v.push(id);
        self.ctr(v)
    }

    /// `ctr task exec --exec-id <exec_id> <id> <cmd...>` to completion (returns its exit code).
    pub fn exec(&self, id: &str, exec_id: &str, cmd: &[&str]) -> Output {
        let mut v = vec![
            "tasks",
            "exec",
            "--fifo-dir",
            self.fifo_dir(),
            "--exec-id",
            exec_id,
            id,
        ];
        v.extend_from_slice(cmd);
        self.ctr(v)
    }

    /// `ctr task exec` attached, in the background.
    pub fn spawn_exec(&self, id: &str, exec_id: &str, cmd: &[&str]) -> Spawned {
        let mut v = vec![
            "tasks",
            "exec",
            "--fifo-dir",
            self.fifo_dir(),
            "--exec-id",
            exec_id,
            id,
        ];
        v.extend_from_slice(cmd);
        self.spawn_ctr(v, false)
    }

    /// `ctr task exec -t` on a pty.
    pub fn exec_tty(
        &self,
        id: &str,
        exec_id: &str,
        rows: u16,
        cols: u16,
        cmd: &[&str],
    ) -> PtySpawned {
        let mut v = vec![
            "tasks",
            "exec",
            "--fifo-dir",
            self.fifo_dir(),
            "-t",
            "--exec-id",
            exec_id,
            id,
        ];
        v.extend_from_slice(cmd);
        self.pty_ctr(v, rows, cols)
    }

    fn try_tasks(&self) -> Result<Vec<TaskInfo>, String> {
        let out = self.ctr_try(["tasks", "ls"], None, CTR_TIMEOUT)?;
        if !out.status.success() {
            return Err(format!("ctr tasks ls: {}", show(&out)));
        }
        Ok(parse_table(&String::from_utf8_lossy(&out.stdout))
            .into_iter()
            .filter(|r| r.len() >= 3)
            .map(|r| TaskInfo {
                id: r[0].clone(),
                pid: r[1].parse().unwrap_or(0),
                status: r[2].clone(),
            })
            .collect())
    }

    /// `ctr task ls`.
    pub fn tasks(&self) -> Vec<TaskInfo> {
        self.try_tasks().unwrap_or_else(|e| panic!("{e}"))
    }

    /// The task `id`, if there is one.
    pub fn task(&self, id: &str) -> Option<TaskInfo> {
        self.tasks().into_iter().find(|t| t.id == id)
    }

    /// Polls `ctr task ls` until task `id` has `status` (RUNNING, PAUSED, STOPPED, CREATED).
    pub fn wait_task_status(&self, id: &str, status: &str, timeout: Duration) -> TaskInfo {
        let mut last = None;
        poll_until(timeout, || {
            let t = self.task(id);
            last = t.clone();
            t.filter(|t| t.status == status)
        })
        .unwrap_or_else(|| panic!("task {id} not {status} within {timeout:?}; last seen: {last:?}"))
    }

    /// Polls until task `id` is no longer listed.
    pub fn wait_task_gone(&self, id: &str, timeout: Duration) {
        poll(format!("task {id} to disappear"), timeout, || {
            self.task(id).is_none().then_some(())
        });
    }

    /// `ctr task ps <id>`: (pid, info) rows.
    pub fn task_ps(&self, id: &str) -> Vec<(u32, String)> {
        parse_table(&self.ctr_ok(["tasks", "ps", id]))
            .into_iter()
            .filter_map(|r| {
                Some((
                    r.first()?.parse().ok()?,
                    r.get(1).cloned().unwrap_or_default(),
                ))
            })
            .collect()
    }

    /// `ctr task kill -s <signal> <id>` (asserts success).
    pub fn kill(&self, id: &str, signal: &str) {
        self.ctr_ok(["tasks", "kill", "-s", signal, id]);
    }

    /// `ctr task kill --exec-id <exec_id> -s <signal> <id>`.
    pub fn kill_exec(&self, id: &str, exec_id: &str, signal: &str) {
        self.ctr_ok(["tasks", "kill", "--exec-id", exec_id, "-s", signal, id]);
    }

    /// `ctr task metrics --format json <id>`, parsed.
    pub fn metrics(&self, id: &str) -> serde_json::Value {
        let text = self.ctr_ok(["tasks", "metrics", "--format", "json", id]);
        serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("metrics of {id} are not JSON ({e}):\n{text}"))
    }

    /// Tasks.Update through the gRPC API (ctr 2.1 has no `task update`); `resources` is an OCI
    /// `LinuxResources` JSON object, e.g. `{"memory": {"limit": 67108864}}`.
    pub fn update_task(&self, id: &str, resources: &serde_json::Value) -> Result<(), String> {
        crate::grpc::update_task(&self.address, &self.namespace, id, resources)
    }

    /// `ctr containers ls -q`.
    pub fn containers(&self) -> Vec<String> {
        self.ctr_ok(["containers", "ls", "-q"])
            .lines()
            .map(|l| l.trim().to_string())
            .filter(|l| !l.is_empty())
            .collect()
    }

    /// Shim processes serving container `id` of this containerd.
    pub fn shims_for(&self, id: &str) -> Vec<host::Proc> {
        host::shims_of(&self.address)
            .into_iter()
            .filter(|p| p.flag("-id") == Some(id))
            .collect()
    }

    // ---- nothing left behind -----------------------------------------------------------------

    /// What container `id` left behind: mounts under our dir with a path component `id` (the
    /// rootfs at `<bundle>/rootfs`), any path named `id` in the state dir (bundle dir, a shim's own
    /// state), runc state, its cgroups (`/<ns>/<id>` in every hierarchy), its shim process, the
    /// container record. Empty when clean. (So ids must differ from file names such as `rootfs`.)
    pub fn leftovers(&self, id: &str) -> Vec<String> {
        let mut left = Vec::new();
        for m in host::mounts_under(&self.dir) {
            if m.mount_point.split('/').any(|c| c == id) {
                left.push(format!("mount {} ({})", m.mount_point, m.fs_type));
            }
        }
        for p in host::find_named(&self.state, id) {
            left.push(format!("state path {}", p.display()));
        }
        if self.runc_state_dir(id).exists() {
            left.push(format!("runc state {}", self.runc_state_dir(id).display()));
        }
        for d in host::cgroup_dirs(&self.cgroup_rel(id)) {
            left.push(format!("cgroup {}", d.display()));
        }
        for p in self.shims_for(id) {
            left.push(format!("shim pid {}: {}", p.pid, p.argv.join(" ")));
        }
        if self.containers().iter().any(|c| c == id) {
            left.push(format!("container record {id}"));
        }
        left
    }

    /// Asserts that [`Self::leftovers`] becomes empty (polled: a shim exits shortly after delete).
    pub fn assert_nothing_left(&self, id: &str) {
        let mut last = Vec::new();
        let ok = poll_until(Duration::from_secs(10), || {
            last = self.leftovers(id);
            last.is_empty().then_some(())
        });
        assert!(
            ok.is_some(),
            "container {id} left behind:\n  {}",
            last.join("\n  ")
        );
    }

    // ---- teardown ------------------------------------------------------------------------------

    fn daemon_alive(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// Kills and deletes every task and container through containerd (best effort). Returns the
    /// init processes seen (pid, start time) so that teardown can make sure they are gone.
    fn remove_all_tasks(&mut self) -> Vec<(i32, u64)> {
        let quick = Duration::from_secs(20);
        let Ok(tasks) = self.try_tasks() else {
            return Vec::new();
        };
        let inits: Vec<(i32, u64)> = tasks
            .iter()
            .filter_map(|t| {
                let pid = i32::try_from(t.pid).ok().filter(|p| *p > 0)?;
                Some((pid, host::start_time(pid)?))
            })
            .collect();
        for t in &tasks {
            if t.status == "PAUSED" || t.status == "PAUSING" {
                let _ = self.ctr_try(["tasks", "resume", &t.id], None, quick);
            }
            if t.status != "STOPPED" {
                let _ = self.ctr_try(["tasks", "kill", "-a", "-s", "SIGKILL", &t.id], None, quick);
            }
        }
        let _ = poll_until(Duration::from_secs(5), || {
            let ts = self.try_tasks().ok()?;
            ts.iter().all(|t| t.status == "STOPPED").then_some(())
        });
        for t in &tasks {
            let _ = self.ctr_try(["tasks", "delete", "-f", &t.id], None, quick);
        }
        if let Ok(out) = self.ctr_try(["containers", "ls", "-q"], None, quick) {
            for c in String::from_utf8_lossy(&out.stdout)
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
            {
                let _ = self.ctr_try(["containers", "delete", c], None, quick);
            }
        }
        inits
    }

    fn stop_daemon(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Ok(None) = child.try_wait() {
            // SAFETY: kill(2) on our own unreaped child.
            unsafe {
                libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
            }
            if crate::process::wait_child(&mut child, Duration::from_secs(5)).is_none() {
                let _ = child.kill();
            }
        }
        let _ = child.wait();
    }

    fn teardown(&mut self) {
        let panicking = std::thread::panicking();
        if panicking {
            eprintln!(
                "---- containerd log tail ({}) ----\n{}\n---- end of containerd log ----",
                self.log.display(),
                self.log_tail(60)
            );
            let keep = workspace_root().join("target").join("integration-logs");
            if fs::create_dir_all(&keep).is_ok() {
                let dest = keep.join(format!("{}.log", self.tag));
                if fs::copy(&self.log, &dest).is_ok() {
                    eprintln!("full containerd log kept at {}", dest.display());
                }
            }
        }
        let inits = if self.daemon_alive() {
            self.remove_all_tasks()
        } else {
            Vec::new()
        };
        self.stop_daemon();

        let mut problems = Vec::new();
        // Both shims: whatever still runs for this containerd's address.
        let shims: Vec<i32> = host::shims_of(&self.address)
            .iter()
            .map(|p| p.pid)
            .collect();
        if !shims.is_empty() {
            if !panicking {
                problems.push(format!(
                    "shim processes still running after teardown: {shims:?}"
                ));
            }
            host::kill_and_wait(&shims, Duration::from_secs(5));
        }
        // Container processes of a killed shim: kill through the cgroups ctr (or the pods) asked for.
        for d in host::destroy_cgroups(&self.tag) {
            problems.push(format!("cgroup not removed: {}", d.display()));
        }
        // Init processes that escaped all of the above (e.g. moved out of their cgroup).
        let escaped: Vec<i32> = inits
            .iter()
            .filter(|(pid, start)| host::alive(*pid) && host::start_time(*pid) == Some(*start))
            .map(|(pid, _)| *pid)
            .collect();
        if !escaped.is_empty() {
            host::kill_and_wait(&escaped, Duration::from_secs(5));
        }
        let runc_ns = Path::new(RUNC_ROOT).join(&self.namespace);
        // k8s.io is shared by every CRI host: only our own containers (bundles in our state dir).
        let shared = self.namespace != self.tag;
        // runc records the bundle as the kernel resolves it.
        let state_dir = fs::canonicalize(&self.state).unwrap_or_else(|_| self.state.clone());
        let ours = |id: &OsStr| {
            let state = runc_ns.join(id).join("state.json");
            let bundle = fs::read(state)
                .ok()
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                .and_then(|v| {
                    v["config"]["labels"].as_array().and_then(|labels| {
                        labels
                            .iter()
                            .filter_map(|l| l.as_str()?.strip_prefix("bundle="))
                            .map(PathBuf::from)
                            .next()
                    })
                });
            bundle.is_some_and(|b| b.starts_with(&state_dir))
        };
        if let Ok(rd) = fs::read_dir(&runc_ns) {
            for e in rd.flatten().filter(|e| !shared || ours(&e.file_name())) {
                let mut c = Command::new("runc");
                c.arg("--root")
                    .arg(&runc_ns)
                    .args(["delete", "--force"])
                    .arg(e.file_name());
                let _ = run_with_timeout(&mut c, None, Duration::from_secs(10));
            }
            if !shared {
                let _ = fs::remove_dir_all(&runc_ns);
            }
        }
        let stuck = host::unmount_all_under(&self.dir);
        if !stuck.is_empty() {
            problems.push(format!("could not unmount: {stuck:?}"));
        }
        if std::env::var_os("SHIMTEST_KEEP_DIR").is_some() {
            eprintln!("SHIMTEST_KEEP_DIR: keeping {}", self.dir.display());
        } else if let Err(e) = fs::remove_dir_all(&self.dir) {
            problems.push(format!("remove {}: {e}", self.dir.display()));
        }
        if !problems.is_empty() {
            eprintln!("teardown of {}: {}", self.tag, problems.join("; "));
        }
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        self.teardown();
    }
}
