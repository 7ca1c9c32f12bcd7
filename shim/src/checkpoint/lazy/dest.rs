//! The destination's side: the `criu lazy-pages` daemon, and the relay between it and the
//! source's page server.

use super::*;

/// The destination's `criu lazy-pages` daemon, and the shim's relay between it and the
/// source's page server.
pub struct LazyDaemon {
    pid: i32,
    exit: tokio::sync::oneshot::Receiver<ExitStatus>,
    relay: tokio::task::JoinHandle<Result<Pulled>>,
    /// The restored init, once known: the transfer is ended with the source only while it
    /// lives (else the source, told the pages all arrived, would kill the only live copy).
    init: Arc<AtomicI32>,
    pub work: PathBuf,
}

impl LazyDaemon {
    /// Starts the daemon for the images in `images`, in the restore's work dir `work`, pulling
    /// through the shim's relay from `source` (`ADDRESS:PORT`), and waits until it listens for
    /// the restoring CRIU.
    pub async fn start(
        reaper: &Reaper,
        images: &Path,
        work: &Path,
        source: &str,
        transfer_timeout: Duration,
    ) -> Result<Self> {
        let source: SocketAddr = source.parse().map_err(|e| {
            Error::InvalidArgument(format!(
                "lazy pages source {source:?}: {e} (want IP:PORT of the source's page server)"
            ))
        })?;
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(Error::io("listen for the lazy-pages daemon"))?;
        let port = listener
            .local_addr()
            .map_err(Error::io("listen for the lazy-pages daemon"))?
            .port();
        let _ = std::fs::remove_file(work.join(DAEMON_SOCKET));
        let mut cmd = Command::new("criu");
        cmd.arg("lazy-pages")
            .arg("--page-server")
            .args(["--address", "127.0.0.1", "--port", &port.to_string()])
            .arg("--images-dir")
            .arg(images)
            .arg("--work-dir")
            .arg(work)
            .arg("--log-file")
            .arg(DAEMON_LOG)
            .arg("-v4")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        own_group_dying_with_shim(&mut cmd, None);
        let started = Instant::now();
        let child = cmd.spawn().map_err(Error::io("spawn criu lazy-pages"))?;
        let pid = child.id() as i32;
        let init = Arc::new(AtomicI32::new(0));
        let relay = tokio::spawn(pull(listener, source, pid, transfer_timeout));
        let mut daemon = Self {
            pid,
            exit: reaper.claim(pid, started),
            relay,
            init,
            work: work.to_path_buf(),
        };
        // Listening once its socket is there; ended if it exited first.
        let socket = work.join(DAEMON_SOCKET);
        while !socket.exists() {
            if let Ok(status) = daemon.exit.try_recv() {
                daemon.relay.abort();
                return Err(Error::Criu {
                    action: "lazy-pages",
                    message: format!(
                        "the lazy-pages daemon exited with status {} before it listened",
                        status.code
                    ),
                    log: work.join(DAEMON_LOG),
                });
            }
            if started.elapsed() > Duration::from_secs(30) {
                daemon.kill();
                return Err(Error::DeadlineExceeded(
                    "the lazy-pages daemon did not listen within 30 s".into(),
                ));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(daemon)
    }

    /// The restored init's pid: from now on the transfer may end while it lives.
    pub fn restored(&self, pid: i32) {
        self.init.store(pid, Ordering::SeqCst);
    }

    pub fn kill(&self) {
        kill_group(self.pid);
    }

    /// The daemon's end: Ok once every page arrived and the source let go of
    /// the container, else why not (the daemon's log then kept as `keep_log`,
    /// when given: the work dir goes).
    ///
    /// The daemon's own close of the transfer never reaches the source: the
    /// daemon sends it on its error paths too. Only once the daemon exited 0
    /// and the restored init still has its memory does the shim close the
    /// transfer with the source, whose CRIU then kills the source's
    /// processes; if the source does not confirm that, this copy is not
    /// sure to be the only one, and the caller kills it.
    pub async fn wait(self, keep_log: Option<&Path>) -> Result<Transfer> {
        let mut log = self.work.join(DAEMON_LOG);
        let status = self
            .exit
            .await
            .map_err(|_| Error::Internal("exit of criu lazy-pages was lost".into()))?;
        // Its relay ends with it (the daemon's connection closes).
        let relayed = match tokio::time::timeout(Duration::from_secs(10), self.relay).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => Err(Error::Internal(format!("lazy pages relay: {e}"))),
            Err(_) => Err(Error::Internal("the lazy pages relay did not end".into())),
        };
        let init = self.init.load(Ordering::SeqCst);
        let why = match (status.code, relayed) {
            (0, Ok(pulled)) if has_memory(init) => match commit(pulled.upstream).await {
                Ok(()) => return Ok(pulled.transfer),
                Err(e) => e,
            },
            (0, Ok(_)) => "the restored container died before every page arrived".to_string(),
            (_, Err(e)) => e.to_string(),
            (_, Ok(_)) => std::fs::read_to_string(&log)
                .ok()
                .and_then(|t| super::super::criu_log::criu_error_line(&t))
                .unwrap_or_default(),
        };
        if let Some(keep) = keep_log {
            if std::fs::copy(&log, keep).is_ok() {
                log = keep.to_path_buf();
            }
        }
        Err(Error::Criu {
            action: "lazy-pages",
            message: format!(
                "the lazy-pages daemon exited with status {}; the transfer did not end: {why}",
                status.code
            ),
            log,
        })
    }
}

/// What the destination's relay leaves once its daemon closed the transfer: the connection to
/// the source, still open (the source waits for the close).
pub struct Pulled {
    pub(super) upstream: TcpStream,
    pub(super) transfer: Transfer,
}

/// Closes the transfer with the source: its CRIU answers, then kills the source's processes
/// once it reads the end of the stream.
pub(super) async fn commit(mut upstream: TcpStream) -> std::result::Result<(), String> {
    let mut close = [0u8; IOV_SIZE];
    close[..4].copy_from_slice(&PS_IOV_CLOSE.to_le_bytes());
    let answered = tokio::time::timeout(Duration::from_secs(30), async {
        upstream.write_all(&close).await?;
        let mut status = [0u8; 4];
        upstream.read_exact(&mut status).await?;
        upstream.shutdown().await?;
        Ok::<i32, std::io::Error>(i32::from_le_bytes(status))
    })
    .await;
    match answered {
        Ok(Ok(0)) => Ok(()),
        Ok(Ok(s)) => Err(format!(
            "the source's page server answered the close with {s}"
        )),
        Ok(Err(e)) => Err(format!(
            "the source did not confirm the end of the transfer: {e}"
        )),
        Err(_) => Err("the source did not confirm the end of the transfer within 30 s".into()),
    }
}

/// The destination's relay: the daemon's one connection to the source's page server, through
/// the shim, until the daemon closes it (answered here, not passed on: see
/// [`LazyDaemon::wait`]). A daemon that never connects, a source that cannot be reached or goes
/// away, kills the daemon; the connection to the source then closes without the close, and the
/// source resumes.
pub(super) async fn pull(
    listener: TcpListener,
    source: SocketAddr,
    daemon: i32,
    transfer_timeout: Duration,
) -> Result<Pulled> {
    let abort = move || kill_group(daemon);
    let puller = match tokio::time::timeout(Duration::from_secs(120), listener.accept()).await {
        Ok(Ok((s, _))) => s,
        Ok(Err(e)) => {
            abort();
            return Err(Error::io("accept the lazy-pages daemon")(e));
        }
        Err(_) => {
            abort();
            return Err(Error::DeadlineExceeded(
                "the lazy-pages daemon did not connect within 120 s".into(),
            ));
        }
    };
    drop(listener);
    let server =
        match tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(source)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                abort();
                return Err(Error::io(format!(
                    "connect to the source's page server {source}"
                ))(e));
            }
            Err(_) => {
                abort();
                return Err(Error::DeadlineExceeded(format!(
                    "the source's page server {source} did not answer within 10 s"
                )));
            }
        };
    keepalive(&server);
    let _ = puller.set_nodelay(true);
    let _ = server.set_nodelay(true);
    info!("lazy pages: pulling from {source}");
    let t0 = Instant::now();
    let (mut daemon_rd, mut daemon_wr) = puller.into_split();
    let (mut source_rd, mut source_wr) = server.into_split();
    let counted = std::sync::atomic::AtomicU64::new(0);
    let relayed = tokio::time::timeout(transfer_timeout, async {
        // Daemon → source: requests, up to the daemon's close.
        let up = async {
            let mut iov = [0u8; IOV_SIZE];
            loop {
                daemon_rd
                    .read_exact(&mut iov)
                    .await
                    .map_err(|e| format!("the lazy-pages daemon's connection: {e}"))?;
                let cmd = command(&iov);
                if cmd == PS_IOV_CLOSE || cmd == PS_IOV_FORCE_CLOSE {
                    return Ok::<(), String>(());
                }
                source_wr
                    .write_all(&iov)
                    .await
                    .map_err(|e| format!("the source's page server: {e}"))?;
            }
        };
        // Source → daemon: pages, counted.
        let down = async {
            let mut buf = vec![0u8; 256 * 1024];
            let mut n_total = 0u64;
            loop {
                let n = source_rd
                    .read(&mut buf)
                    .await
                    .map_err(|e| format!("the source's page server: {e}"))?;
                if n == 0 {
                    return Err::<(), String>("the source's page server went away".into());
                }
                daemon_wr
                    .write_all(&buf[..n])
                    .await
                    .map_err(|e| format!("the lazy-pages daemon's connection: {e}"))?;
                n_total += n as u64;
                counted.store(n_total, Ordering::Relaxed);
            }
        };
        tokio::select! {
            r = up => r,
            r = down => r,
        }
    })
    .await;
    match relayed {
        Ok(Ok(())) => {}
        Ok(Err(why)) => {
            abort();
            return Err(Error::Internal(format!("lazy pages: {why}")));
        }
        Err(_) => {
            abort();
            return Err(Error::DeadlineExceeded(format!(
                "the pages did not all arrive within {transfer_timeout:?}"
            )));
        }
    }
    // The daemon's close, answered here: it finishes, and closes its end.
    let _ = daemon_wr.write_all(&0i32.to_le_bytes()).await;
    let mut rest = [0u8; 1];
    let _ = tokio::time::timeout(Duration::from_secs(10), daemon_rd.read(&mut rest)).await;
    let upstream = source_rd
        .reunite(source_wr)
        .map_err(|e| Error::Internal(format!("lazy pages relay: {e}")))?;
    Ok(Pulled {
        upstream,
        transfer: Transfer {
            bytes: counted.load(Ordering::Relaxed),
            connect_ms: 0.0,
            transfer_ms: t0.elapsed().as_secs_f64() * 1000.0,
        },
    })
}

/// Whether `pid` runs with its memory (a process that exited, or is exiting, has none).
fn has_memory(pid: i32) -> bool {
    pid > 0
        && std::fs::read_to_string(format!("/proc/{pid}/statm"))
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
            .is_some_and(|pages| pages > 0)
}
