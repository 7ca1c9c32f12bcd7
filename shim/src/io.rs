//! A process's stdio: pipes between runc and containerd's fifos, or a
//! terminal whose master runc hands back through a console socket.

use std::{
    fs::File,
    io::IoSliceMut,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
    time::Duration,
};

use containerd_shim::asynchronous::io::{IoTasks, Pty, Stdio};
use nix::{
    sys::socket::{recvmsg, ControlMessageOwned, MsgFlags},
    unistd::{fchown, pipe, Gid, Uid},
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
pub fn prepare(stdio: &Stdio, io_uid: u32, io_gid: u32) -> Result<PendingIo> {
    let io = ProcessIo::default();
    let mut child = ProcStdio::default();
    let console_socket = if stdio.terminal {
        Some(ConsoleSocket::new()?)
    } else {
        if !stdio.stdin.is_empty() {
            let (r, w) = pipe().map_err(Error::nix("stdin pipe"))?;
            chown_io(&r, io_uid, io_gid)?;
            let w = Sender::from_owned_fd(w).map_err(Error::io("stdin pipe"))?;
            io.tasks
                .copy_from_fifo(&stdio.stdin, w)
                .map_err(Error::shim(format!("copy stdin from {}", stdio.stdin)))?;
            child.stdin = Some(r);
        }
        for (path, slot) in [
            (&stdio.stdout, &mut child.stdout),
            (&stdio.stderr, &mut child.stderr),
        ] {
            if path.is_empty() {
                continue;
            }
            let (r, w) = pipe().map_err(Error::nix("output pipe"))?;
            chown_io(&w, io_uid, io_gid)?;
            let r = Receiver::from_owned_fd(r).map_err(Error::io("output pipe"))?;
            io.tasks
                .copy_to_fifo(r, path)
                .map_err(Error::shim(format!("copy output to {path}")))?;
            *slot = Some(w);
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
        let receive = tokio::spawn(async move { console.receive().await });
        if let Err(e) = spawn.await {
            receive.abort();
            return Err(e);
        }
        let master = tokio::time::timeout(CONSOLE_TIMEOUT, receive)
            .await
            .map_err(|_| Error::Internal("runc did not send the terminal".into()))?
            .map_err(|e| Error::Internal(format!("console receiver: {e}")))??;
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
