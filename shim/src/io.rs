//! A process's stdio: pipes between runc and containerd's fifos, or a
//! terminal whose master runc hands back through a console socket.

use std::{
    fs::File,
    io::IoSliceMut,
    os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
    time::Duration,
};

use containerd_shim::asynchronous::io::{IoTasks, Pty, Stdio};
use nix::{
    sys::socket::{recvmsg, ControlMessageOwned, MsgFlags},
    unistd::{fchown, Gid, Uid},
};
use tokio::net::{
    unix::pipe::{Receiver, Sender},
    UnixListener,
};

use crate::{
    error::{Error, Result},
    runtime::runc::ProcStdio,
};

/// How long runc may take to hand back the terminal once it succeeded.
const CONSOLE_TIMEOUT: Duration = Duration::from_secs(10);

/// The shim's side of a running process's stdio.
#[derive(Clone, Default)]
pub struct ProcessIo {
    pub tasks: IoTasks,
    pub console: Option<Pty>,
}

impl ProcessIo {
    pub fn resize(&self, width: u32, height: u32) -> Result<()> {
        let Some(pty) = &self.console else {
            return Err(Error::FailedPrecondition(
                "process does not have a terminal".into(),
            ));
        };
        let ws = libc::winsize {
            ws_row: height as u16,
            ws_col: width as u16,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        use std::os::fd::AsFd;
        // SAFETY: TIOCSWINSZ reads a winsize from a valid pointer on an open fd.
        let rc = unsafe { libc::ioctl(pty.as_fd().as_raw_fd(), libc::TIOCSWINSZ, &ws) };
        if rc < 0 {
            return Err(Error::io("resize terminal")(std::io::Error::last_os_error()));
        }
        Ok(())
    }

    pub fn close_stdin(&self) {
        self.tasks.close_input();
    }
}

/// Stdio being set up: what runc's child gets, and what is wired up once it ran.
pub struct PendingIo {
    pub child: ProcStdio,
    pub console_socket: Option<ConsoleSocket>,
    io: ProcessIo,
    stdio: Stdio,
}

/// Pipes for a process without a terminal (copies start at once), or a console
/// socket for one with a terminal (wired up in [`PendingIo::finish`]).
pub async fn prepare(stdio: &Stdio, owner: &IoOwner) -> Result<PendingIo> {
    let (io_uid, io_gid) = (owner.uid, owner.gid);
    let io = ProcessIo::default();
    let mut child = ProcStdio::default();
    let console_socket = if stdio.terminal {
        Some(ConsoleSocket::new()?)
    } else {
        if !stdio.stdin.is_empty() {
            let (r, w) = cloexec_pipe()?;
            chown_io(&r, io_uid, io_gid)?;
            let w = Sender::from_owned_fd(w).map_err(Error::io("stdin pipe"))?;
            io.tasks
                .copy_from_fifo(&stdio.stdin, w)
                .map_err(Error::shim(format!("copy stdin from {}", stdio.stdin)))?;
            child.stdin = Some(r);
        }
        if let Some(binary) = stdio.stdout.strip_prefix("binary://") {
            // One logging process takes both streams (fd 3 and 4), as with the Go shim.
            let (out, err) = spawn_log_binary(binary, owner).await?;
            child.stdout = Some(out);
            child.stderr = Some(err);
        } else {
            for (path, slot) in [
                (&stdio.stdout, &mut child.stdout),
                (&stdio.stderr, &mut child.stderr),
            ] {
                if path.is_empty() {
                    continue;
                }
                let (r, w) = cloexec_pipe()?;
                chown_io(&w, io_uid, io_gid)?;
                let r = Receiver::from_owned_fd(r).map_err(Error::io("output pipe"))?;
                if let Some(file) = path.strip_prefix("file://") {
                    copy_to_file(r, file)?;
                } else {
                    let fifo = path.strip_prefix("fifo://").unwrap_or(path);
                    io.tasks
                        .copy_to_fifo(r, fifo)
                        .map_err(Error::shim(format!("copy output to {path}")))?;
                }
                *slot = Some(w);
            }
        }
        None
    };
    Ok(PendingIo {
        child: std::mem::take(&mut child),
        console_socket,
        io,
        stdio: stdio.clone(),
    })
}

impl PendingIo {
    pub fn console_path(&self) -> Option<PathBuf> {
        self.console_socket.as_ref().map(|c| c.path.clone())
    }

    pub fn take_child(&mut self) -> ProcStdio {
        std::mem::take(&mut self.child)
    }

    /// Runs `spawn` (the runc command) while receiving the terminal, if any.
    pub async fn run<F>(mut self, spawn: F) -> Result<ProcessIo>
    where
        F: std::future::Future<Output = Result<()>>,
    {
        let Some(console) = self.console_socket.take() else {
            return match spawn.await {
                Ok(()) => Ok(self.io),
                Err(e) => {
                    self.io.tasks.abort().await;
                    Err(e)
                }
            };
        };
        let mut receive = tokio::spawn(async move { console.receive().await });
        if let Err(e) = spawn.await {
            receive.abort();
            return Err(e);
        }
        let master = match tokio::time::timeout(CONSOLE_TIMEOUT, &mut receive).await {
            Ok(joined) => {
                joined.map_err(|e| Error::Internal(format!("console receiver: {e}")))??
            }
            Err(_) => {
                // The listener and its temp dir go with the task.
                receive.abort();
                return Err(Error::Internal("runc did not send the terminal".into()));
            }
        };
        let pty = Pty::new(master).map_err(Error::shim("terminal"))?;
        if !self.stdio.stdin.is_empty() {
            self.io
                .tasks
                .copy_from_fifo(&self.stdio.stdin, pty.clone())
                .map_err(Error::shim("copy stdin to terminal"))?;
        }
        if !self.stdio.stdout.is_empty() {
            self.io
                .tasks
                .copy_to_fifo(pty.clone(), &self.stdio.stdout)
                .map_err(Error::shim("copy terminal to stdout"))?;
        }
        self.io.console = Some(pty);
        Ok(self.io)
    }
}

/// Who the stdio belongs to: owner of the pipes, and what a logging binary is told.
pub struct IoOwner {
    pub uid: u32,
    pub gid: u32,
    pub container_id: String,
    pub namespace: String,
}

/// How long a `binary://` logger may take to say it is ready, as the Go shim allows.
const LOGGER_READY_TIMEOUT_MS: u16 = 10_000;

/// Pipes never leak into runc or other containers: only the dup'ed stdio does.
fn cloexec_pipe() -> Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(Error::nix("pipe"))
}

/// `file:///path` log URIs: output appended to a file the shim opens.
fn copy_to_file(mut from: Receiver, path: &str) -> Result<()> {
    let path = Path::new(path);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(Error::io(format!("create {}", dir.display())))?;
    }
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(Error::io(format!("open log file {}", path.display())))?;
    let mut file = tokio::fs::File::from_std(file);
    tokio::spawn(async move {
        if let Err(e) = tokio::io::copy(&mut from, &mut file).await {
            log::warn!("copy output to log file: {e}");
        }
    });
    Ok(())
}

/// `binary:///path?arg=value` log URIs: a logging program gets the process's
/// stdout and stderr as fd 3 and 4, and closes fd 5 once it is ready.
async fn spawn_log_binary(uri: &str, owner: &IoOwner) -> Result<(OwnedFd, OwnedFd)> {
    let (io_uid, io_gid) = (owner.uid, owner.gid);
    use std::os::unix::process::CommandExt;
    let (path, query) = uri.split_once('?').unwrap_or((uri, ""));
    let mut args = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        args.push(k.to_string());
        if !v.is_empty() {
            args.push(v.to_string());
        }
    }
    let (out_r, out_w) = cloexec_pipe()?;
    let (err_r, err_w) = cloexec_pipe()?;
    let (ready_r, ready_w) = cloexec_pipe()?;
    chown_io(&out_w, io_uid, io_gid)?;
    chown_io(&err_w, io_uid, io_gid)?;
    let fds = [out_r.as_raw_fd(), err_r.as_raw_fd(), ready_w.as_raw_fd()];
    let mut cmd = std::process::Command::new(path);
    cmd.args(&args)
        .env("CONTAINER_ID", &owner.container_id)
        .env("CONTAINER_NAMESPACE", &owner.namespace)
        .stdin(std::process::Stdio::null());
    // SAFETY: only async-signal-safe dup2 calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            for (i, fd) in fds.iter().enumerate() {
                let target = 3 + i as i32;
                if *fd == target {
                    // dup2(fd, fd) does nothing, so the close-on-exec flag would stay.
                    if libc::fcntl(target, libc::F_SETFD, 0) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                } else if libc::dup2(*fd, target) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    // The reaper collects its exit; nothing waits on the Child.
    let _child = cmd
        .spawn()
        .map_err(Error::io(format!("start logging binary {path}")))?;
    drop((out_r, err_r, ready_w));
    // Ready once the logger closed its end of the ready pipe (or exited). The
    // wait may take seconds: off the runtime thread, so other requests go on.
    let ready = tokio::task::spawn_blocking(move || {
        let mut pfd = [nix::poll::PollFd::new(
            ready_r.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        nix::poll::poll(&mut pfd, LOGGER_READY_TIMEOUT_MS)
    })
    .await
    .map_err(|e| Error::Internal(format!("logger readiness task: {e}")))?;
    match ready {
        Ok(0) => Err(Error::Internal(format!(
            "logging binary {path} did not get ready"
        ))),
        Ok(_) => Ok((out_w, err_w)),
        Err(e) => Err(Error::nix("wait for logging binary")(e)),
    }
}

fn chown_io(fd: &OwnedFd, uid: u32, gid: u32) -> Result<()> {
    if uid == 0 && gid == 0 {
        return Ok(());
    }
    fchown(fd, Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid)))
        .map_err(Error::nix("chown stdio pipe"))
}

/// A unix socket runc connects to with `--console-socket` to pass the pty master.
pub struct ConsoleSocket {
    pub path: PathBuf,
    listener: UnixListener,
    _dir: tempfile::TempDir,
}

impl ConsoleSocket {
    pub fn new() -> Result<Self> {
        // Short and private: socket paths are limited to 108 bytes.
        let dir = tempfile::Builder::new()
            .prefix("shim-pty")
            .tempdir()
            .map_err(Error::io("console socket dir"))?;
        let path = dir.path().join("pty.sock");
        let listener = UnixListener::bind(&path)
            .map_err(Error::io(format!("bind console socket {}", path.display())))?;
        Ok(Self {
            path,
            listener,
            _dir: dir,
        })
    }

    pub async fn receive(self) -> Result<File> {
        let (stream, _) = self
            .listener
            .accept()
            .await
            .map_err(Error::io("accept console socket"))?;
        let stream = stream.into_std().map_err(Error::io("console socket"))?;
        stream
            .set_nonblocking(false)
            .map_err(Error::io("console socket"))?;
        tokio::task::spawn_blocking(move || receive_fd(stream.as_raw_fd()))
            .await
            .map_err(|e| Error::Internal(format!("console receiver: {e}")))?
    }
}

fn receive_fd(sock: i32) -> Result<File> {
    let mut buf = [0u8; 4096];
    let mut iov = [IoSliceMut::new(&mut buf)];
    let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 1]);
    let msg = recvmsg::<()>(sock, &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC)
        .map_err(Error::nix("receive terminal"))?;
    for c in msg.cmsgs().map_err(Error::nix("receive terminal"))? {
        if let ControlMessageOwned::ScmRights(fds) = c {
            if let Some(&fd) = fds.first() {
                // SAFETY: the kernel just installed this fd for us; we own it.
                return Ok(unsafe { File::from_raw_fd(fd) });
            }
        }
    }
    Err(Error::Internal(
        "console socket message carried no fd".into(),
    ))
}

/// Removes a file, ignoring that it is already gone.
pub fn remove_quietly(path: &Path) {
    if let Err(e) = std::fs::remove_file(path) {
        if e.kind() != std::io::ErrorKind::NotFound {
            log::warn!("remove {}: {e}", path.display());
        }
    }
}
