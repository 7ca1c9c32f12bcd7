//! The rootfs diff captured inside CRIU's own stop.
//!
//! runc has CRIU freeze the container's cgroup and seize its processes, as
//! with the Go shim; once CRIU has dumped the memory it runs its `post-dump`
//! action scripts, with every process still stopped, before it unlocks the
//! network and lets them go. The shim's binary is such a script (named in a
//! CRIU config file of the dump's own, handed to CRIU in its environment:
//! the user's own CRIU config is read as well). Started by CRIU at
//! `post-dump`, it asks the shim over a socket in the dump's work dir to
//! capture the rootfs diff and the volumes, and waits: memory and files
//! describe one instant, and the workload stops no longer than CRIU stops it
//! plus the capture. A failed capture fails the script, and CRIU then lets
//! the processes go on and reports the dump failed.

use std::{
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
};

use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt},
    net::UnixListener,
};

use crate::error::{Error, Result};

/// The socket the action script finds the shim at (in runc's, then CRIU's, environment).
pub const SOCKET_ENV: &str = "CUSTOM_SHIM_POST_DUMP";
/// The CRIU config of such a dump, in its work dir.
const CONFIG: &str = "criu-dump.conf";
const SOCKET: &str = "post-dump.sock";

/// The shim's end: a socket and the config naming the script.
pub struct Stop {
    listener: UnixListener,
    /// The socket as the script names it: through this process's descriptor of the work dir
    /// (a bundle path can be longer than a socket address may be).
    pub socket: PathBuf,
    pub config: PathBuf,
    _dir: std::fs::File,
}

impl Stop {
    /// In the dump's (private) work dir.
    pub fn prepare(work: &Path) -> Result<Self> {
        use std::os::fd::AsRawFd;
        let _ = std::fs::remove_file(work.join(SOCKET));
        let dir =
            std::fs::File::open(work).map_err(Error::io(format!("open {}", work.display())))?;
        let fd = dir.as_raw_fd();
        let listener = UnixListener::bind(format!("/proc/self/fd/{fd}/{SOCKET}")).map_err(
            Error::io(format!("listen on {}", work.join(SOCKET).display())),
        )?;
        let socket = PathBuf::from(format!("/proc/{}/fd/{fd}/{SOCKET}", std::process::id()));
        let config = work.join(CONFIG);
        // The running binary, even after an upgrade replaced the file.
        let script = format!("/proc/{}/exe", std::process::id());
        std::fs::write(&config, format!("action-script {script}\n"))
            .map_err(Error::io(format!("write {}", config.display())))?;
        Ok(Self {
            listener,
            socket,
            config,
            _dir: dir,
        })
    }

    /// Waits for CRIU's `post-dump`, runs `capture` inside it and answers the
    /// script. The capture's result is returned as well as answered.
    pub async fn serve<T: Send + 'static>(
        &self,
        capture: impl FnOnce() -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let (stream, _) = self
            .listener
            .accept()
            .await
            .map_err(Error::io("accept CRIU's post-dump action"))?;
        let (rd, mut wr) = stream.into_split();
        let mut line = String::new();
        tokio::io::BufReader::new(rd)
            .read_line(&mut line)
            .await
            .map_err(Error::io("read CRIU's post-dump action"))?;
        let result = match line.trim() {
            "post-dump" => tokio::task::spawn_blocking(capture)
                .await
                .map_err(|e| Error::Internal(format!("capture task: {e}")))
                .and_then(|r| r),
            other => Err(Error::Internal(format!(
                "unexpected request from the action script: {other:?}"
            ))),
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
