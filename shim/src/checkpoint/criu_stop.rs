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
//!
//! The capture begins earlier where CRIU says so: its `network-lock` action comes once every
//! process is seized, before their memory is dumped (CRIU runs it for a container with a network
//! namespace of its own, whatever the lock method). The script then only tells the shim, which
//! starts the capture beside CRIU's dump and answers at once; `post-dump` waits for it to end. The
//! processes are as stopped at one action as at the other, so the instant is the same, and the
//! stop lasts the longer of the dump and the capture rather than both.

use std::{
    io::{BufRead, BufReader, Write},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    sync::atomic::{AtomicBool, Ordering},
};

use log::warn;
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt},
    net::UnixListener,
    task::JoinHandle,
};

use crate::error::{Error, Result};

/// The socket the action script finds the shim at, at `network-lock` and `post-dump` (in runc's,
/// then CRIU's, environment; named for the action it first served).
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
    /// Set when the dump ended without it: a capture not yet begun never begins.
    cancelled: AtomicBool,
    cancel: tokio::sync::Notify,
    /// Whether the capture may begin at `network-lock` (else it waits for `post-dump`).
    early: bool,
}

impl Stop {
    /// In a private directory of the dump's work dir.
    /// `extra`: more lines for CRIU's config; `early`: the capture may begin at `network-lock`
    /// (see `criu_conf::capture_may_begin_early`).
    pub fn prepare(work: &Path, extra: &str, early: bool) -> Result<Self> {
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
            cancelled: AtomicBool::new(false),
            cancel: tokio::sync::Notify::new(),
            early,
        })
    }

    /// Serves CRIU's actions: `capture` begins at `network-lock` (answered at once) or else at
    /// `post-dump`, which is answered with its result. Only a root process is heard; anything
    /// else is closed and the wait goes on. `Ok(None)`: the dump ended (see [`Stop::cancel`])
    /// without a `post-dump`; a capture under way was waited for and its result dropped.
    pub async fn serve<T: Send + 'static>(
        &self,
        capture: impl FnOnce() -> Result<T> + Send + 'static,
    ) -> Result<Option<(T, Began)>> {
        let mut capture = Some(capture);
        let mut running = None;
        let mut began = Began::PostDump;
        let mut wr = loop {
            let accepted = tokio::select! {
                a = self.listener.accept() => a,
                _ = self.cancel.notified() => {
                    drop_capture(running).await;
                    return Ok(None);
                }
            };
            let (stream, _) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    drop_capture(running).await;
                    return Err(Error::io("accept CRIU's action script")(e));
                }
            };
            if !stream.peer_cred().is_ok_and(|c| c.uid() == 0) {
                warn!(
                    "action socket in {}: a caller not root, closed",
                    self.dir.path().display()
                );
                continue;
            }
            let (rd, mut wr) = stream.into_split();
            let mut rd = tokio::io::BufReader::new(rd);
            let mut line = String::new();
            let _ = rd.read_line(&mut line).await;
            match line.trim() {
                "post-dump" => break wr,
                "network-lock" if self.early => {
                    if running.is_none() {
                        running = self.begin(&mut capture);
                        if running.is_some() {
                            began = Began::NetworkLock;
                        }
                    }
                    let _ = wr.write_all(b"ok\n").await;
                }
                "network-lock" => {
                    let _ = wr.write_all(b"later\n").await;
                }
                other => warn!("action socket: an unexpected request {other:?}, closed"),
            }
        };
        let result = match running.or_else(|| self.begin(&mut capture)) {
            Some(task) => task
                .await
                .map_err(|e| Error::Internal(format!("capture task: {e}")))
                .and_then(|r| r),
            None => Err(Error::Cancelled(
                "the dump ended before its post-dump action".into(),
            )),
        };
        let answer = match &result {
            Ok(_) => "ok\n".to_string(),
            Err(e) => format!("error: {}\n", e.to_string().replace('\n', " ")),
        };
        let _ = wr.write_all(answer.as_bytes()).await;
        result.map(|r| Some((r, began)))
    }

    /// Starts the capture, unless it was started already or the dump has ended.
    fn begin<T: Send + 'static>(
        &self,
        capture: &mut Option<impl FnOnce() -> Result<T> + Send + 'static>,
    ) -> Option<JoinHandle<Result<T>>> {
        if self.cancelled.load(Ordering::SeqCst) {
            return None;
        }
        capture.take().map(tokio::task::spawn_blocking)
    }

    /// The dump ended without an answer from [`Stop::serve`]: a capture not begun never begins,
    /// and `serve` ends once one under way has (at once if none).
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::SeqCst);
        self.cancel.notify_one();
    }
}

/// Waits for a capture whose dump ended without it, so that nothing goes on writing into the
/// staging dir once `serve` returns; its result is dropped, an error logged.
async fn drop_capture<T>(running: Option<JoinHandle<Result<T>>>) {
    if let Some(task) = running {
        match task.await {
            Ok(Err(e)) => warn!("a capture dropped with its dump: {e}"),
            Err(e) => warn!("a capture dropped with its dump: {e}"),
            Ok(Ok(_)) => {}
        }
    }
}

/// Which of CRIU's actions the capture began at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Began {
    NetworkLock,
    PostDump,
}

impl Began {
    /// As the checkpoint record says it (`files_captured_in`).
    pub fn as_str(self) -> &'static str {
        match self {
            Began::NetworkLock => "criu-network-lock",
            Began::PostDump => "criu-post-dump",
        }
    }
}

/// The action script's side, at `post-dump`: the shim captures; exit 0 if it did. At
/// `network-lock`, the shim is told to begin; exit 0 whatever it answers (`post-dump` reports).
pub fn run_action(socket: &str, action: &str) -> i32 {
    let asked = (|| -> std::io::Result<String> {
        let mut s = std::os::unix::net::UnixStream::connect(socket)?;
        // network-lock holds every process seized until it returns, and the shim answers it at
        // once: past a few seconds something is wrong, and post-dump captures instead.
        if action != "post-dump" {
            s.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
        }
        s.write_all(format!("{action}\n").as_bytes())?;
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line)?;
        Ok(line)
    })();
    match asked {
        Ok(line) if line.trim() == "ok" => 0,
        Ok(line) if action != "post-dump" && line.trim() == "later" => 0,
        other if action != "post-dump" => {
            // CRIU's log says why the capture waits for post-dump; the dump goes on.
            let why = match other {
                Ok(line) => line.trim().to_string(),
                Err(e) => e.to_string(),
            };
            eprintln!(
                "Warning (containerd-shim-custom-v2): {action}: the shim did not take the rootfs diff at once ({why}); it will at post-dump"
            );
            0
        }
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

#[cfg(test)]
mod tests {
    use std::{
        sync::{
            atomic::{AtomicUsize, Ordering},
            Arc,
        },
        time::Duration,
    };

    use super::*;

    /// CRIU's side: the action script, run as CRIU would (off the runtime: it blocks).
    async fn action(stop: &Stop, name: &'static str) -> i32 {
        let socket = stop.socket.display().to_string();
        tokio::task::spawn_blocking(move || run_action(&socket, name))
            .await
            .unwrap()
    }

    /// A stop in a work dir of its own (kept as long as the stop).
    fn stop(early: bool) -> (tempfile::TempDir, Stop) {
        let work = tempfile::tempdir().unwrap();
        let stop = Stop::prepare(work.path(), "", early).unwrap();
        (work, stop)
    }

    fn counted(runs: &Arc<AtomicUsize>) -> impl FnOnce() -> Result<usize> + Send + 'static {
        let runs = runs.clone();
        move || Ok(runs.fetch_add(1, Ordering::SeqCst) + 1)
    }

    #[tokio::test]
    async fn the_capture_begins_at_network_lock_and_post_dump_waits_for_it() {
        let (_work, stop) = stop(true);
        let runs = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let capture = {
            let runs = runs.clone();
            move || {
                // Held until the test lets it end: post-dump must wait for it.
                rx.recv_timeout(Duration::from_secs(30)).unwrap();
                Ok(runs.fetch_add(1, Ordering::SeqCst) + 1)
            }
        };
        let serve = stop.serve(capture);
        tokio::pin!(serve);
        let criu = async {
            // Answered at once, the capture still running.
            assert_eq!(action(&stop, "network-lock").await, 0);
            assert_eq!(runs.load(Ordering::SeqCst), 0);
            // A second network-lock begins nothing more.
            assert_eq!(action(&stop, "network-lock").await, 0);
            tx.send(()).unwrap();
            action(&stop, "post-dump").await
        };
        let (served, code) = tokio::join!(&mut serve, criu);
        assert_eq!(code, 0);
        assert_eq!(served.unwrap(), Some((1, Began::NetworkLock)));
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn without_network_lock_the_capture_runs_at_post_dump() {
        let (_work, stop) = stop(true);
        let runs = Arc::new(AtomicUsize::new(0));
        let (served, code) = tokio::join!(stop.serve(counted(&runs)), action(&stop, "post-dump"));
        assert_eq!(code, 0);
        assert_eq!(served.unwrap(), Some((1, Began::PostDump)));
    }

    #[tokio::test]
    async fn with_link_remap_the_capture_waits_for_post_dump() {
        let (_work, stop) = stop(false);
        let runs = Arc::new(AtomicUsize::new(0));
        let serve = stop.serve(counted(&runs));
        tokio::pin!(serve);
        let criu = async {
            assert_eq!(action(&stop, "network-lock").await, 0);
            assert_eq!(runs.load(Ordering::SeqCst), 0);
            action(&stop, "post-dump").await
        };
        let (served, code) = tokio::join!(&mut serve, criu);
        assert_eq!(code, 0);
        assert_eq!(served.unwrap(), Some((1, Began::PostDump)));
    }

    #[tokio::test]
    async fn a_capture_that_fails_at_network_lock_fails_post_dump() {
        let (_work, stop) = stop(true);
        let failing = || -> Result<()> { Err(Error::Internal("disk full".into())) };
        let (served, codes) = tokio::join!(stop.serve(failing), async {
            (
                action(&stop, "network-lock").await,
                action(&stop, "post-dump").await,
            )
        });
        // network-lock is never failed (CRIU would abort before the dump for nothing); post-dump
        // reports the capture's error, and CRIU then fails the dump.
        assert_eq!(codes, (0, 1));
        assert!(served.unwrap_err().to_string().contains("disk full"));
    }

    #[tokio::test]
    async fn a_dump_that_ends_after_network_lock_waits_for_the_capture_and_drops_it() {
        let (_work, stop) = stop(true);
        let ended = Arc::new(AtomicUsize::new(0));
        let capture = {
            let ended = ended.clone();
            move || {
                std::thread::sleep(Duration::from_millis(200));
                ended.store(1, Ordering::SeqCst);
                Ok(())
            }
        };
        let serve = stop.serve(capture);
        tokio::pin!(serve);
        tokio::select! {
            _ = &mut serve => panic!("served before post-dump"),
            code = action(&stop, "network-lock") => assert_eq!(code, 0),
        }
        // CRIU failed before post-dump: the shim cancels, and serve ends once the capture has.
        stop.cancel();
        assert!(serve.await.unwrap().is_none());
        assert_eq!(ended.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_dump_that_ends_before_any_action_begins_nothing() {
        let (_work, stop) = stop(true);
        let runs = Arc::new(AtomicUsize::new(0));
        stop.cancel();
        assert!(stop.serve(counted(&runs)).await.unwrap().is_none());
        assert_eq!(runs.load(Ordering::SeqCst), 0);
    }
}
