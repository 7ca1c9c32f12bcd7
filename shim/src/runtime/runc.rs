//! The runc command line: typed options become argv, runc's own error line
//! comes back in the error. Exits are taken from the subreaper, never waited
//! for directly (the shim's reaper would steal them).

use std::{
    fs::File,
    io::{Read, Seek, SeekFrom},
    os::fd::OwnedFd,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use log::{debug, warn};
use serde::Deserialize;

use crate::{
    error::{Error, Result},
    reaper::Reaper,
};

/// A container process's stdio as runc's own stdio: the container inherits it.
#[derive(Default)]
pub struct ProcStdio {
    pub stdin: Option<OwnedFd>,
    pub stdout: Option<OwnedFd>,
    pub stderr: Option<OwnedFd>,
}

#[derive(Clone, Debug)]
pub struct Runc {
    pub binary: PathBuf,
    pub root: PathBuf,
    pub systemd_cgroup: bool,
    /// runc's JSON log for this container, read back for error messages.
    pub log: PathBuf,
    /// The bound on one `runc checkpoint` / `runc restore`, CRIU included.
    pub criu_timeout: Duration,
    reaper: Reaper,
}

#[derive(Default, Debug)]
pub struct CreateOpts {
    pub pid_file: PathBuf,
    pub console_socket: Option<PathBuf>,
    pub no_pivot: bool,
    pub no_new_keyring: bool,
}

#[derive(Default, Debug, Clone)]
pub struct CheckpointOpts {
    pub image_path: PathBuf,
    pub work_path: PathBuf,
    pub parent_path: Option<PathBuf>,
    pub leave_running: bool,
    pub tcp_established: bool,
    pub ext_unix_sk: bool,
    pub shell_job: bool,
    pub file_locks: bool,
    pub empty_ns: Vec<String>,
    pub manage_cgroups_mode: Option<String>,
    /// `ADDRESS:PORT` of a CRIU page server the memory pages go to (dump only).
    pub page_server: Option<String>,
}

#[derive(Default, Debug)]
pub struct RestoreOpts {
    pub checkpoint: CheckpointOpts,
    pub pid_file: PathBuf,
    pub console_socket: Option<PathBuf>,
    pub no_pivot: bool,
    /// A CRIU config file for this restore only, handed to CRIU in its
    /// environment (`CRIU_CONFIG_FILE`): runc passes the user's own CRIU
    /// config as ever, and CRIU reads both.
    pub criu_config: Option<PathBuf>,
    /// Memory pages come from a `criu lazy-pages` daemon in the work dir.
    pub lazy_pages: bool,
}

pub struct Output {
    pub stdout: Vec<u8>,
}

impl Runc {
    pub fn new(
        binary: impl Into<PathBuf>,
        root: impl Into<PathBuf>,
        systemd_cgroup: bool,
        log: impl Into<PathBuf>,
        reaper: Reaper,
    ) -> Self {
        Self {
            binary: binary.into(),
            root: root.into(),
            systemd_cgroup,
            log: log.into(),
            criu_timeout: crate::options::DEFAULT_CRIU_TIMEOUT,
            reaper,
        }
    }

    /// Where the exits of the processes the shim starts are delivered.
    pub fn reaper(&self) -> &Reaper {
        &self.reaper
    }

    pub fn with_criu_timeout(mut self, limit: Duration) -> Self {
        self.criu_timeout = limit;
        self
    }

    fn global_args(&self) -> Vec<String> {
        let mut args = vec![
            "--root".to_string(),
            self.root.display().to_string(),
            "--log".to_string(),
            self.log.display().to_string(),
            "--log-format".to_string(),
            "json".to_string(),
        ];
        if self.systemd_cgroup {
            args.push("--systemd-cgroup".to_string());
        }
        args
    }

    pub async fn create(
        &self,
        id: &str,
        bundle: &Path,
        opts: &CreateOpts,
        stdio: ProcStdio,
    ) -> Result<()> {
        let mut args = vec![
            "create".to_string(),
            "--bundle".into(),
            bundle.display().to_string(),
            "--pid-file".into(),
            opts.pid_file.display().to_string(),
        ];
        if let Some(s) = &opts.console_socket {
            args.extend(["--console-socket".into(), s.display().to_string()]);
        }
        if opts.no_pivot {
            args.push("--no-pivot".into());
        }
        if opts.no_new_keyring {
            args.push("--no-new-keyring".into());
        }
        args.push(id.into());
        self.run(args, Some(stdio)).await.map(drop)
    }

    pub async fn start(&self, id: &str) -> Result<()> {
        self.run(vec!["start".into(), id.into()], None)
            .await
            .map(drop)
    }

    pub async fn exec(
        &self,
        id: &str,
        process_json: &Path,
        pid_file: &Path,
        console_socket: Option<&Path>,
        stdio: ProcStdio,
    ) -> Result<()> {
        let mut args = vec![
            "exec".to_string(),
            "--detach".into(),
            "--process".into(),
            process_json.display().to_string(),
            "--pid-file".into(),
            pid_file.display().to_string(),
        ];
        if let Some(s) = console_socket {
            args.extend(["--console-socket".into(), s.display().to_string()]);
        }
        args.push(id.into());
        self.run(args, Some(stdio)).await.map(drop)
    }

    pub async fn kill(&self, id: &str, signal: u32, all: bool) -> Result<()> {
        let mut args = vec!["kill".to_string()];
        if all {
            args.push("--all".into());
        }
        args.extend([id.to_string(), signal.to_string()]);
        self.run(args, None).await.map(drop)
    }

    pub async fn pause(&self, id: &str) -> Result<()> {
        self.run(vec!["pause".into(), id.into()], None)
            .await
            .map(drop)
    }

    pub async fn resume(&self, id: &str) -> Result<()> {
        self.run(vec!["resume".into(), id.into()], None)
            .await
            .map(drop)
    }

    pub async fn delete(&self, id: &str, force: bool) -> Result<()> {
        let mut args = vec!["delete".to_string()];
        if force {
            args.push("--force".into());
        }
        args.push(id.into());
        self.run(args, None).await.map(drop)
    }

    pub async fn ps(&self, id: &str) -> Result<Vec<i32>> {
        let out = self
            .run(
                vec!["ps".into(), "--format".into(), "json".into(), id.into()],
                None,
            )
            .await?;
        let pids: Option<Vec<i32>> =
            serde_json::from_slice(&out.stdout).map_err(Error::json("decode runc ps"))?;
        Ok(pids.unwrap_or_default())
    }

    pub async fn update(&self, id: &str, resources_json: &Path) -> Result<()> {
        self.run(
            vec![
                "update".into(),
                "--resources".into(),
                resources_json.display().to_string(),
                id.into(),
            ],
            None,
        )
        .await
        .map(drop)
    }

    /// `env`: variables for runc and the CRIU it runs (a CRIU config file of
    /// the dump's own, what its action script needs).
    pub async fn checkpoint(
        &self,
        id: &str,
        opts: &CheckpointOpts,
        env: &[(&str, &Path)],
    ) -> Result<()> {
        let mut args = vec!["checkpoint".to_string()];
        args.extend(criu_args(opts));
        if opts.leave_running {
            args.push("--leave-running".into());
        }
        if let Some(ps) = &opts.page_server {
            args.push("--page-server".into());
            args.push(ps.clone());
        }
        args.push(id.into());
        self.run_bounded(args, None, Some(self.criu_timeout), env)
            .await
            .map(drop)
    }

    /// Starts a lazy `runc checkpoint`: CRIU dumps everything but the memory
    /// pages, says so through runc's status fd, then serves the pages on
    /// `page_server` until the destination has them all (or fails). The
    /// returned handle waits for either; runc and CRIU run in a process group
    /// of their own, which [`LazyDump::kill`] kills. `criu_config` is a CRIU
    /// config file for this dump only (`CRIU_CONFIG_FILE`), read besides the
    /// user's own.
    pub fn checkpoint_lazy(
        &self,
        id: &str,
        opts: &CheckpointOpts,
        criu_config: &Path,
    ) -> Result<LazyDump> {
        use std::os::fd::AsRawFd;
        let page_server = opts.page_server.clone().ok_or_else(|| {
            Error::InvalidArgument("a lazy checkpoint needs a page server address".into())
        })?;
        let mut args = self.global_args();
        args.push("checkpoint".into());
        args.extend(criu_args(opts));
        args.extend([
            "--lazy-pages".into(),
            "--page-server".into(),
            page_server,
            "--status-fd".into(),
            "3".into(),
            id.into(),
        ]);
        let (status_rd, status_wr) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| Error::io("status pipe")(e.into()))?;
        let mut cmd = Command::new(&self.binary);
        cmd.args(&args)
            .env("CRIU_CONFIG_FILE", criu_config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        own_group_dying_with_shim(&mut cmd, Some(status_wr.as_raw_fd()));
        debug!("runc {} (lazy)", args.join(" "));
        let log_offset = std::fs::metadata(&self.log).map(|m| m.len()).unwrap_or(0);
        let started = Instant::now();
        let child = cmd.spawn().map_err(Error::io(format!(
            "spawn {} checkpoint",
            self.binary.display()
        )))?;
        drop(cmd);
        // Only runc (and its CRIU) hold the write end now: EOF means they are gone.
        drop(status_wr);
        let pid = child.id() as i32;
        Ok(LazyDump {
            pid,
            exit: Some(self.reaper.claim(pid, started)),
            status: Some(File::from(status_rd)),
            log: self.log.clone(),
            log_offset,
        })
    }

    pub async fn restore(
        &self,
        id: &str,
        bundle: &Path,
        opts: &RestoreOpts,
        stdio: ProcStdio,
    ) -> Result<()> {
        let mut args = vec![
            "restore".to_string(),
            "--detach".into(),
            "--bundle".into(),
            bundle.display().to_string(),
            "--pid-file".into(),
            opts.pid_file.display().to_string(),
        ];
        args.extend(criu_args(&opts.checkpoint));
        if let Some(s) = &opts.console_socket {
            args.extend(["--console-socket".into(), s.display().to_string()]);
        }
        if opts.no_pivot {
            args.push("--no-pivot".into());
        }
        if opts.lazy_pages {
            args.push("--lazy-pages".into());
        }
        args.push(id.into());
        let env: Vec<(&str, &Path)> = opts
            .criu_config
            .as_ref()
            .map(|c| ("CRIU_CONFIG_FILE", c.as_path()))
            .into_iter()
            .collect();
        self.run_bounded(args, Some(stdio), Some(self.criu_timeout), &env)
            .await
            .map(drop)
    }

    async fn run(&self, args: Vec<String>, stdio: Option<ProcStdio>) -> Result<Output> {
        self.run_bounded(args, stdio, None, &[]).await
    }

    /// Runs runc with `args`. With `stdio` the child's stdio is the
    /// container's (runc's errors then reach us only through its log).
    ///
    /// runc leads a process group of its own, which the CRIU it starts joins:
    /// past `limit` the whole group is killed and waited for, and the error is
    /// DeadlineExceeded. The future is not meant to be dropped half-way (the
    /// operations that run runc own their outcome); if it is, runc runs on.
    async fn run_bounded(
        &self,
        args: Vec<String>,
        stdio: Option<ProcStdio>,
        limit: Option<Duration>,
        env: &[(&str, &Path)],
    ) -> Result<Output> {
        let command = args.first().cloned().unwrap_or_default();
        let mut cmd = Command::new(&self.binary);
        cmd.args(self.global_args()).args(&args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let capture = stdio.is_none();
        match stdio {
            Some(s) => {
                cmd.stdin(s.stdin.map(Stdio::from).unwrap_or_else(Stdio::null));
                cmd.stdout(s.stdout.map(Stdio::from).unwrap_or_else(Stdio::null));
                cmd.stderr(s.stderr.map(Stdio::from).unwrap_or_else(Stdio::null));
            }
            None => {
                cmd.stdin(Stdio::null())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped());
            }
        }
        // runc (and the CRIU it runs) must not outlive a killed shim: a checkpoint
        // left running would go on dumping a container containerd is deleting.
        own_group_dying_with_shim(&mut cmd, None);
        debug!("runc {}", args.join(" "));
        let log_offset = std::fs::metadata(&self.log).map(|m| m.len()).unwrap_or(0);
        let started = Instant::now();
        let mut child = cmd.spawn().map_err(Error::io(format!(
            "spawn {} {command}",
            self.binary.display()
        )))?;
        // The Command still holds the container's ends of the stdio: drop it
        // so that only the container keeps them.
        drop(cmd);
        let pid = child.id() as i32;
        let mut exit = self.reaper.claim(pid, started);
        let out = child.stdout.take();
        let err = child.stderr.take();
        let finished = async {
            let (stdout, stderr) = if capture {
                tokio::task::spawn_blocking(move || (read_all(out), read_all(err)))
                    .await
                    .map_err(|e| Error::Internal(format!("runc output reader: {e}")))?
            } else {
                (Vec::new(), Vec::new())
            };
            let status = (&mut exit)
                .await
                .map_err(|_| Error::Internal(format!("exit of runc {command} was lost")))?;
            Ok::<_, Error>((stdout, stderr, status))
        };
        let outcome = match limit {
            None => finished.await,
            Some(limit) => match tokio::time::timeout(limit, finished).await {
                Ok(r) => r,
                Err(_) => {
                    // runc and its CRIU: the whole group, then wait for runc's exit
                    // so that nothing of it is left when the caller puts things back.
                    warn!("runc {command} ran past {limit:?}: killing its process group {pid}");
                    kill_group(pid);
                    let _ = exit.await;
                    return Err(Error::DeadlineExceeded(format!(
                        "runc {command} did not finish within {limit:?} (the runtime option \
                         CriuTimeout sets this bound); it was killed with its CRIU"
                    )));
                }
            },
        };
        let (stdout, stderr, status) = outcome?;
        if status.code != 0 {
            let message = last_log_error(&self.log, log_offset)
                .or_else(|| last_line(&stderr))
                .unwrap_or_else(|| format!("exit status {}", status.code));
            return Err(Error::Runc { command, message });
        }
        Ok(Output { stdout })
    }
}

/// A lazy `runc checkpoint` under way (see [`Runc::checkpoint_lazy`]).
pub struct LazyDump {
    pid: i32,
    exit: Option<tokio::sync::oneshot::Receiver<crate::reaper::ExitStatus>>,
    status: Option<File>,
    log: PathBuf,
    log_offset: u64,
}

impl LazyDump {
    /// Waits until CRIU has written every image but the lazy pages: true;
    /// false if runc ended first (then [`Self::wait`] tells why).
    pub async fn ready(&mut self) -> Result<bool> {
        let Some(mut status) = self.status.take() else {
            return Ok(false);
        };
        tokio::task::spawn_blocking(move || {
            let mut b = [0u8; 1];
            loop {
                match status.read(&mut b) {
                    Ok(0) => return Ok(false),
                    Ok(_) if b[0] == 0 => return Ok(true),
                    Ok(_) => continue,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(Error::io("read runc's status fd")(e)),
                }
            }
        })
        .await
        .map_err(|e| Error::Internal(format!("status reader: {e}")))?
    }

    /// runc's and CRIU's process group, killed: CRIU lets go of the tasks it
    /// holds, which go on as they were (frozen if their cgroup is).
    pub fn kill(&self) {
        kill_group(self.pid);
    }

    /// runc's end: Ok when CRIU served every page and the container's
    /// processes were killed by it, else runc's error.
    pub async fn wait(&mut self) -> Result<()> {
        let Some(exit) = self.exit.take() else {
            return Err(Error::Internal("lazy checkpoint waited for twice".into()));
        };
        let status = exit
            .await
            .map_err(|_| Error::Internal("exit of runc checkpoint was lost".into()))?;
        if status.code != 0 {
            let message = last_log_error(&self.log, self.log_offset)
                .unwrap_or_else(|| format!("exit status {}", status.code));
            return Err(Error::Runc {
                command: "checkpoint".into(),
                message,
            });
        }
        Ok(())
    }
}

/// Makes `cmd` lead a process group of its own (which what it starts joins:
/// [`kill_group`] kills them all) and die with the shim. A shim that died
/// between fork and prctl is caught by the parent check (the child was
/// reparented already, so the death signal never comes). `fd3`: a descriptor
/// the child gets as fd 3.
pub fn own_group_dying_with_shim(cmd: &mut Command, fd3: Option<std::os::fd::RawFd>) {
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: dup2, prctl and getppid are async-signal-safe; nothing else runs
    // between fork and exec.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.process_group(0);
        cmd.pre_exec(move || {
            if let Some(fd) = fd3 {
                // dup2 leaves the new fd without FD_CLOEXEC: the child keeps it.
                if libc::dup2(fd, 3) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
}

/// SIGKILL to the process group `pid` leads (see [`own_group_dying_with_shim`]).
pub fn kill_group(pid: i32) {
    let _ = nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    );
}

fn criu_args(opts: &CheckpointOpts) -> Vec<String> {
    let mut args = vec![
        "--image-path".to_string(),
        opts.image_path.display().to_string(),
        "--work-path".into(),
        opts.work_path.display().to_string(),
    ];
    if let Some(p) = &opts.parent_path {
        args.extend(["--parent-path".into(), p.display().to_string()]);
    }
    if opts.tcp_established {
        args.push("--tcp-established".into());
    }
    if opts.ext_unix_sk {
        args.push("--ext-unix-sk".into());
    }
    if opts.shell_job {
        args.push("--shell-job".into());
    }
    if opts.file_locks {
        args.push("--file-locks".into());
    }
    for ns in &opts.empty_ns {
        args.extend(["--empty-ns".into(), ns.clone()]);
    }
    if let Some(mode) = &opts.manage_cgroups_mode {
        args.extend(["--manage-cgroups-mode".into(), mode.clone()]);
    }
    args
}

fn read_all<R: Read>(r: Option<R>) -> Vec<u8> {
    let mut buf = Vec::new();
    if let Some(mut r) = r {
        let _ = r.read_to_end(&mut buf);
    }
    buf
}

fn last_line(bytes: &[u8]) -> Option<String> {
    String::from_utf8_lossy(bytes)
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .map(str::to_string)
}

/// The last error runc logged after `offset` (its log holds every command's lines).
fn last_log_error(log: &Path, offset: u64) -> Option<String> {
    let mut f = File::open(log).ok()?;
    f.seek(SeekFrom::Start(offset)).ok()?;
    let mut text = String::new();
    f.read_to_string(&mut text).ok()?;
    parse_last_error(&text)
}

fn parse_last_error(text: &str) -> Option<String> {
    #[derive(Deserialize)]
    struct Line {
        level: String,
        msg: String,
    }
    text.lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<Line>(l).ok())
        .find(|l| l.level == "error" || l.level == "fatal")
        .map(|l| l.msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_error_line_is_taken() {
        let log = r#"{"level":"info","msg":"starting","time":"t"}
{"level":"error","msg":"first","time":"t"}
{"level":"warning","msg":"w","time":"t"}
{"level":"error","msg":"container not running","time":"t"}
{"level":"info","msg":"done","time":"t"}"#;
        assert_eq!(
            parse_last_error(log).as_deref(),
            Some("container not running")
        );
        assert_eq!(parse_last_error("garbage\n"), None);
    }

    #[test]
    fn criu_options_become_flags() {
        let args = criu_args(&CheckpointOpts {
            image_path: "/img".into(),
            work_path: "/work".into(),
            tcp_established: true,
            ext_unix_sk: true,
            shell_job: true,
            file_locks: true,
            empty_ns: vec!["network".into()],
            manage_cgroups_mode: Some("soft".into()),
            ..Default::default()
        })
        .join(" ");
        assert_eq!(
            args,
            "--image-path /img --work-path /work --tcp-established --ext-unix-sk \
             --shell-job --file-locks --empty-ns network --manage-cgroups-mode soft"
        );
    }

    #[tokio::test]
    async fn failing_binary_reports_exit_and_keeps_running() {
        // /bin/false stands in for runc: no log, no stderr, a non-zero exit.
        let reaper = Reaper::default();
        let dir = tempfile::tempdir().unwrap();
        let runc = Runc::new(
            "/bin/false",
            dir.path(),
            false,
            dir.path().join("log.json"),
            reaper.clone(),
        );
        // No subreaper signal loop in unit tests: feed the exit by hand.
        let waiter = tokio::spawn({
            let runc = runc.clone();
            async move { runc.start("x").await }
        });
        // Reap whatever child exits and hand it to the reaper (ECHILD until runc is forked).
        let status = tokio::task::spawn_blocking(|| {
            let until = std::time::Instant::now() + Duration::from_secs(10);
            loop {
                match nix::sys::wait::wait() {
                    Err(nix::errno::Errno::ECHILD) if std::time::Instant::now() < until => {
                        std::thread::sleep(Duration::from_millis(5))
                    }
                    other => return other,
                }
            }
        })
        .await
        .unwrap()
        .unwrap();
        if let nix::sys::wait::WaitStatus::Exited(pid, code) = status {
            reaper.exited(pid.as_raw(), code);
        }
        let err = waiter.await.unwrap().unwrap_err();
        assert!(
            err.to_string().contains("runc start failed: exit status 1"),
            "{err}"
        );
    }
}
