//! The rootfs diff captured inside CRIU's own stop.
//!
//! runc has CRIU freeze the container's cgroup and seize its processes, as
//! with the Go shim; once CRIU has dumped the memory it runs its `post-dump`
//! action scripts, with every process still seized (ptrace-stopped: CRIU has
//! thawed the cgroup by then, so a process that joins it, a new exec, would
//! run, as with the Go shim), before it unlocks the network and lets them go.
//! The shim's binary is such a script (named in a CRIU config file of the
//! dump's own, handed to CRIU in its environment: the user's own CRIU config
//! is read as well). Started by CRIU at `post-dump`, it asks the shim over a
//! socket in a private directory of the dump's work dir to capture the rootfs
//! diff and the volumes, and waits: memory and files describe one instant,
//! and the workload stops no longer than CRIU stops it plus the capture. A
//! failed capture fails the script, and CRIU then lets the processes go on
//! and reports the dump failed.

use std::{
    io::{BufRead, BufReader, Write},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
};

use log::warn;
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt},
    net::UnixListener,
};

use crate::error::{Error, Result};

/// The socket the action script finds the shim at (in runc's, then CRIU's, environment).
pub const SOCKET_ENV: &str = "CUSTOM_SHIM_POST_DUMP";
const CONFIG: &str = "criu-dump.conf";
const SOCKET: &str = "s";

/// The shim's end: a socket and the config naming the script, in a directory of their own
/// (removed on drop).
pub struct Stop {
    listener: UnixListener,
    /// The socket as the script names it: through this process's descriptor of the directory
    /// (a bundle path can be longer than a socket address may be).
    pub socket: PathBuf,
    pub config: PathBuf,
    dir: tempfile::TempDir,
    _dir_fd: std::fs::File,
    /// Set once a capture began: the dump waits for it to end before anything is put back.
    pub began: Arc<AtomicBool>,
    /// Set when the dump ended without it: a capture not yet begun never begins.
    pub cancelled: Arc<AtomicBool>,
}

impl Stop {
    /// In a private directory of the dump's work dir.
    /// `extra`: more lines for CRIU's config.
    pub fn prepare(work: &Path, extra: &str) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("criu-stop-")
            .tempdir_in(work)
            .map_err(Error::io(format!(
                "create a directory in {}",
                work.display()
            )))?;
        let dir_fd = std::fs::File::open(dir.path())
            .map_err(Error::io(format!("open {}", dir.path().display())))?;
        let fd = dir_fd.as_raw_fd();
        let listener = UnixListener::bind(format!("/proc/self/fd/{fd}/{SOCKET}")).map_err(
            Error::io(format!("listen on {}", dir.path().join(SOCKET).display())),
        )?;
        let socket = PathBuf::from(format!("/proc/{}/fd/{fd}/{SOCKET}", std::process::id()));
        let config = dir.path().join(CONFIG);
        // The running binary, even after an upgrade replaced the file. A CRIU config the shim
        // itself was given in its environment still applies: this one takes its place there.
        let script = format!("/proc/{}/exe", std::process::id());
        super::criu_conf::write(&config, &format!("action-script {script}\n{extra}"))?;
        Ok(Self {
            listener,
            socket,
            config,
            dir,
            _dir_fd: dir_fd,
            began: Arc::new(AtomicBool::new(false)),
            cancelled: Arc::new(AtomicBool::new(false)),
        })
    }

    /// Waits for CRIU's `post-dump`, runs `capture` inside it and answers the script. Only a
    /// root process asking `post-dump` is taken; anything else is closed and the wait goes on.
    /// The capture's result is returned as well as answered.
    pub async fn serve<T: Send + 'static>(
        &self,
        capture: impl FnOnce() -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let (rd, mut wr) = loop {
            let (stream, _) = self
                .listener
                .accept()
                .await
                .map_err(Error::io("accept CRIU's post-dump action"))?;
            if !stream.peer_cred().is_ok_and(|c| c.uid() == 0) {
                warn!(
                    "post-dump socket in {}: a caller not root, closed",
                    self.dir.path().display()
                );
                continue;
            }
            let (rd, wr) = stream.into_split();
            let mut rd = tokio::io::BufReader::new(rd);
            let mut line = String::new();
            if rd.read_line(&mut line).await.is_ok() && line.trim() == "post-dump" {
                break (rd, wr);
            }
            warn!(
                "post-dump socket: an unexpected request {:?}, closed",
                line.trim()
            );
        };
        drop(rd);
        let result = if self.cancelled.load(Ordering::SeqCst) {
            Err(Error::Cancelled(
                "the dump ended before its post-dump action".into(),
            ))
        } else {
            self.began.store(true, Ordering::SeqCst);
            tokio::task::spawn_blocking(capture)
                .await
                .map_err(|e| Error::Internal(format!("capture task: {e}")))
                .and_then(|r| r)
        };
        let answer = match &result {
            Ok(_) => "ok\n".to_string(),
            Err(e) => format!("error: {}\n", e.to_string().replace('\n', " ")),
        };
        let _ = wr.write_all(answer.as_bytes()).await;
        result
    }
}

/// The action script's side, at `post-dump`: the shim captures; exit 0 if it did.
pub fn run_action(socket: &str) -> i32 {
    let asked = (|| -> std::io::Result<String> {
        let mut s = std::os::unix::net::UnixStream::connect(socket)?;
        s.write_all(b"post-dump\n")?;
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line)?;
        Ok(line)
    })();
    match asked {
        Ok(line) if line.trim() == "ok" => 0,
        Ok(line) => {
            eprintln!(
                "Error (containerd-shim-custom-v2): the rootfs diff in CRIU's stop: {}",
                line.trim()
            );
            1
        }
        Err(e) => {
            eprintln!("Error (containerd-shim-custom-v2): reach the shim at {socket}: {e}");
            1
        }
    }
}
