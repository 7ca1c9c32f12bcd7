//! Lazy (post-copy) migration with stock CRIU.
//!
//! **Source.** `runc checkpoint --lazy-pages` dumps everything but the
//! memory pages, tells runc through its status fd, and then serves the pages
//! to the destination's `criu lazy-pages` daemon until it closes the
//! connection. Stock CRIU then kills the dumped tasks — also when the
//! destination merely went away before it had every page (a lazy page
//! server takes an end of file for the end of the transfer). So the page
//! server CRIU runs listens on 127.0.0.1 only (a CRIU config file for this
//! dump sets its address) and the shim's [`PageRelay`] stands between it
//! and the destination: it forwards the destination's end only after the
//! destination said `PS_IOV_CLOSE` (it has every page). If the destination
//! never connects, or goes away before that, the relay kills CRIU first:
//! the tasks it held are let go, the shim unlocks their network (CRIU locked
//! it for the dump and does not unlock it after a lazy dump) and thaws them.
//!
//! **Destination.** Start runs `criu lazy-pages` pointed at the source's
//! page server in the restore's work dir ([`LazyDaemon`]), waits for its
//! socket, and restores with `runc restore --lazy-pages`: the container runs
//! while its memory streams in. If the daemon fails (the source went away),
//! the container's memory is incomplete, and the shim kills it.

use std::{
    fs::File,
    net::SocketAddr,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicI32, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use log::{info, warn};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

use crate::{
    error::{Error, Result},
    reaper::{ExitStatus, Reaper},
    runtime::runc::{kill_group, own_group_dying_with_shim},
};

/// The CRIU config a lazy dump runs with (its page server on loopback only).
pub const DUMP_CONFIG: &str = "criu-lazy-dump.conf";
/// The lazy-pages daemon's log, in the restore's work dir.
pub const DAEMON_LOG: &str = "lazy-pages.log";
/// The socket the restoring CRIU hands its userfaultfds to.
const DAEMON_SOCKET: &str = "lazy-pages.socket";

/// CRIU's page server protocol (criu/page-xfer.c): every request is a
/// `struct page_server_iov { u32 cmd; u64 nr_pages; u64 vaddr; u64 dst_id; }`,
/// 32 bytes with its padding; the lazy-pages daemon sends nothing else.
const IOV_SIZE: usize = 32;
const PS_CMD_MASK: u32 = 0xffff;
const PS_IOV_CLOSE: u32 = 0x1023;
const PS_IOV_FORCE_CLOSE: u32 = 0x1024;

/// The pipes CRIU's lazy page server makes (`PIPE_MAX_SIZE` pages, criu/page-pipe.h).
const CRIU_PIPE_BYTES: u64 = 819 * 4096;

/// A lazy dump's page server needs pipes past the default `fs.pipe-max-size`: allowed with
/// CAP_SYS_RESOURCE or a raised sysctl. Without either CRIU fails only when the destination asks
/// for its first page; this says so before anything stops.
pub fn check_pipe_size() -> Result<()> {
    let max: u64 = std::fs::read_to_string("/proc/sys/fs/pipe-max-size")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    if max >= CRIU_PIPE_BYTES || has_cap_sys_resource() {
        return Ok(());
    }
    Err(Error::FailedPrecondition(format!(
        "a lazy checkpoint needs pipes of {CRIU_PIPE_BYTES} bytes for CRIU's page server, but \
         fs.pipe-max-size is {max} and the shim lacks CAP_SYS_RESOURCE: raise it \
         (`sysctl fs.pipe-max-size=4194304`; `make deps` does)"
    )))
}

fn has_cap_sys_resource() -> bool {
    const CAP_SYS_RESOURCE: u32 = 24;
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << CAP_SYS_RESOURCE) != 0)
}

/// What crossed the relay.
#[derive(Debug, Default, Clone, Copy)]
pub struct Transfer {
    /// Bytes sent to the destination (page headers and pages).
    pub bytes: u64,
    pub connect_ms: f64,
    pub transfer_ms: f64,
}

/// The page server the destination connects to, in front of CRIU's.
pub struct PageRelay {
    listener: TcpListener,
    criu_port: u16,
    /// The relay's one connection to CRIU's page server, made as soon as CRIU is ready (CRIU
    /// accepts exactly one, and no one else may take it).
    criu: Option<TcpStream>,
}

impl PageRelay {
    /// Listens on `addr` (`ADDRESS:PORT`, the address the destination
    /// dials) and picks a free loopback port for CRIU's own page server.
    pub async fn bind(addr: &str) -> Result<Self> {
        let public: SocketAddr = addr.parse().map_err(|e| {
            Error::InvalidArgument(format!("page server address {addr:?}: {e} (want IP:PORT)"))
        })?;
        let listener = TcpListener::bind(public)
            .await
            .map_err(Error::io(format!("listen on {public} for the destination")))?;
        let criu_port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(Error::io("pick a port for CRIU's page server"))?
            .port();
        Ok(Self {
            listener,
            criu_port,
            criu: None,
        })
    }

    /// What runc is given as `--page-server` (CRIU keeps only the port in a
    /// lazy dump; the config file keeps it on loopback).
    pub fn criu_page_server(&self) -> String {
        format!("127.0.0.1:{}", self.criu_port)
    }

    /// Writes the CRIU config of the dump into `work`: its page server on loopback, and the
    /// network lock the shim knows how to remove should CRIU be stopped.
    pub fn write_config(&self, work: &Path) -> Result<PathBuf> {
        let path = work.join(DUMP_CONFIG);
        std::fs::write(&path, "address 127.0.0.1\nnetwork-lock iptables\n")
            .map_err(Error::io(format!("write {}", path.display())))?;
        Ok(path)
    }

    /// Takes CRIU's one connection, once it is ready. Closed abortively (SO_LINGER 0): if the
    /// shim dies, CRIU reads a reset, not the end of a transfer, and lets the tasks go alive.
    pub async fn connect_criu(&mut self) -> Result<()> {
        let s = TcpStream::connect(("127.0.0.1", self.criu_port))
            .await
            .map_err(Error::io("connect to CRIU's page server"))?;
        reset_on_close(s.as_raw_fd());
        self.criu = Some(s);
        Ok(())
    }

    /// Relays one destination to CRIU's page server until the destination
    /// has every page. Before the destination's close, any failure runs
    /// `abort` (which kills CRIU) while CRIU's connection is still open, so
    /// that CRIU never takes the failure for the end of the transfer and
    /// kills the tasks. After the close CRIU is let finish whatever happens:
    /// the destination runs with every page.
    ///
    /// Only `peer` (when given) is served: a connection from anywhere else is closed, and the
    /// wait goes on.
    /// `before_end` runs once the destination closed, before CRIU reads the end it waits for.
    pub async fn serve(
        self,
        peer: Option<std::net::IpAddr>,
        connect_timeout: Duration,
        transfer_timeout: Duration,
        abort: impl Fn(),
        before_end: impl Fn(),
    ) -> Result<Transfer> {
        let Some(criu) = self.criu else {
            abort();
            return Err(Error::Internal(
                "the relay has no connection to CRIU".into(),
            ));
        };
        let t0 = Instant::now();
        let accepted = tokio::time::timeout(connect_timeout, async {
            loop {
                match self.listener.accept().await {
                    Ok((_, from)) if peer.is_some_and(|p| p != from.ip()) => {
                        warn!("lazy pages: refused a connection from {from} (not the destination)");
                    }
                    other => return other,
                }
            }
        })
        .await;
        drop(self.listener);
        let (dest, from) = match accepted {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                abort();
                return Err(Error::io("accept the destination's connection")(e));
            }
            Err(_) => {
                abort();
                return Err(Error::DeadlineExceeded(format!(
                    "the destination did not connect to the page server within {connect_timeout:?}"
                )));
            }
        };
        let connect_ms = t0.elapsed().as_secs_f64() * 1000.0;
        info!("lazy pages: destination {from} connected");
        keepalive(&dest);
        let mut transfer = relay_to_criu(dest, criu, transfer_timeout, abort, before_end).await?;
        transfer.connect_ms = connect_ms;
        Ok(transfer)
    }
}

/// The command of a page server request.
fn command(iov: &[u8; IOV_SIZE]) -> u32 {
    u32::from_le_bytes([iov[0], iov[1], iov[2], iov[3]]) & PS_CMD_MASK
}

/// The source's relay: the destination's requests up to CRIU, pages down, until the
/// destination's close, which commits the move (see [`PageRelay::serve`]).
async fn relay_to_criu(
    dest: TcpStream,
    criu: TcpStream,
    transfer_timeout: Duration,
    abort: impl Fn(),
    before_end: impl Fn(),
) -> Result<Transfer> {
    let _ = dest.set_nodelay(true);
    let _ = criu.set_nodelay(true);
    let t1 = Instant::now();
    let closed = AtomicBool::new(false);
    let (mut dest_rd, mut dest_wr) = dest.into_split();
    let (mut criu_rd, mut criu_wr) = criu.into_split();
    // Destination → CRIU: requests, checked for the close that ends the transfer. Once the
    // close is through, any end of the destination's stream is the end CRIU waits for.
    let up = async {
        let mut iov = [0u8; IOV_SIZE];
        loop {
            let read = dest_rd.read_exact(&mut iov).await;
            if closed.load(Ordering::SeqCst) {
                if read.is_ok() {
                    warn!("lazy pages: the destination sent more after its close");
                }
                before_end();
                let _ = criu_wr.shutdown().await;
                return Ok::<(), String>(());
            }
            match read {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    return Err(
                        "the destination closed the connection before it had every page".into(),
                    )
                }
                Err(e) => return Err(format!("the destination's connection failed: {e}")),
            }
            let cmd = command(&iov);
            if cmd == PS_IOV_CLOSE || cmd == PS_IOV_FORCE_CLOSE {
                closed.store(true, Ordering::SeqCst);
            }
            if let Err(e) = criu_wr.write_all(&iov).await {
                return Err(format!("CRIU's page server: {e}"));
            }
        }
    };
    // CRIU → destination: pages, counted; after the close, CRIU's answer is passed on if it
    // can be, and CRIU is read to its end.
    let down = async {
        let mut buf = vec![0u8; 256 * 1024];
        let mut n_total = 0u64;
        let mut dest_gone = false;
        loop {
            let n = match criu_rd.read(&mut buf).await {
                Ok(n) => n,
                Err(e) => return Err(format!("CRIU's page server: {e}")),
            };
            if n == 0 {
                let _ = dest_wr.shutdown().await;
                return match closed.load(Ordering::SeqCst) {
                    true => Ok(n_total),
                    false => Err("CRIU's page server closed the connection".into()),
                };
            }
            if !dest_gone {
                match dest_wr.write_all(&buf[..n]).await {
                    Ok(()) => n_total += n as u64,
                    Err(_) if closed.load(Ordering::SeqCst) => dest_gone = true,
                    Err(e) => return Err(format!("sending pages to the destination failed: {e}")),
                }
            }
        }
    };
    tokio::pin!(up);
    tokio::pin!(down);
    let ended = async {
        tokio::select! {
            r = &mut up => match r {
                // The close went through and CRIU got its end: it answers, then finishes.
                Ok(()) => (&mut down).await,
                Err(e) => Err(e),
            },
            // Ok only after the close, when CRIU finished.
            r = &mut down => r,
        }
    };
    tokio::pin!(ended);
    // Bounded until the close; after it, CRIU ends on its own (it reads the end it waits for).
    let deadline = tokio::time::Instant::now() + transfer_timeout;
    let relayed = tokio::select! {
        r = &mut ended => r,
        _ = tokio::time::sleep_until(deadline) => {
            if closed.load(Ordering::SeqCst) {
                (&mut ended).await
            } else {
                Err(format!("the destination did not take every page within {transfer_timeout:?}"))
            }
        }
    };
    let transfer_ms = t1.elapsed().as_secs_f64() * 1000.0;
    match relayed {
        Ok(bytes) => Ok(Transfer {
            bytes,
            connect_ms: 0.0,
            transfer_ms,
        }),
        Err(why) if closed.load(Ordering::SeqCst) => {
            // Committed: the destination has every page; CRIU finishes (and kills the tasks).
            warn!("lazy pages: after the destination's close: {why}");
            Ok(Transfer {
                bytes: 0,
                connect_ms: 0.0,
                transfer_ms,
            })
        }
        Err(why) => {
            abort();
            Err(Error::Internal(format!("lazy migration failed: {why}")))
        }
    }
}

/// SO_LINGER 0: closing the socket (or the process dying) sends a reset, not an end of stream.
/// (Linger 0 never blocks the close.)
fn reset_on_close(fd: std::os::fd::RawFd) {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket and a linger struct of the right size.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &l as *const libc::linger as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

/// A dead destination is noticed in about 10 s even if no packet says so.
fn keepalive(s: &TcpStream) {
    let fd = s.as_raw_fd();
    for (level, name, value) in [
        (libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1),
        (libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, 4),
        (libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, 2),
        (libc::IPPROTO_TCP, libc::TCP_KEEPCNT, 3),
    ] {
        let v: libc::c_int = value;
        // SAFETY: a valid socket fd and a c_int option value of the right size.
        unsafe {
            libc::setsockopt(
                fd,
                level,
                name,
                &v as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    }
}

/// Removes the network lock CRIU put into the namespace of `pid` for the
/// dump (its `CRIU` iptables chain, IPv4 and IPv6), which a lazy dump that
/// did not end leaves behind. Nothing to remove is no error.
pub async fn unlock_network(reaper: &Reaper, pid: i32) -> Result<()> {
    let ns = File::open(format!("/proc/{pid}/ns/net"))
        .map_err(Error::io(format!("open the network namespace of {pid}")))?;
    let mut removed = 0;
    for bin in ["iptables", "ip6tables"] {
        for args in [
            &["-w", "-D", "INPUT", "-j", "CRIU"][..],
            &["-w", "-D", "OUTPUT", "-j", "CRIU"],
            &["-w", "-D", "INPUT", "-j", "CRIU"],
            &["-w", "-D", "OUTPUT", "-j", "CRIU"],
            &["-w", "-F", "CRIU"],
            &["-w", "-X", "CRIU"],
        ] {
            let mut cmd = Command::new(bin);
            cmd.args(args);
            match run_in_netns(reaper, cmd, &ns).await {
                Ok(0) => removed += 1,
                Ok(_) => {}
                Err(e) => {
                    warn!("{bin}: {e}");
                    break;
                }
            }
        }
    }
    if removed > 0 {
        info!("unlocked the network of {pid} ({removed} rules and chains of CRIU's removed)");
    }
    Ok(())
}

/// Runs `cmd` in the network namespace `ns`, its exit taken from the reaper.
async fn run_in_netns(reaper: &Reaper, mut cmd: Command, ns: &File) -> Result<i32> {
    let fd = ns.as_raw_fd();
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: setns is a plain system call; nothing else runs between fork and exec.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(move || {
            if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let started = Instant::now();
    let child = cmd.spawn().map_err(Error::io("spawn"))?;
    let exit = reaper.claim(child.id() as i32, started);
    let status = exit
        .await
        .map_err(|_| Error::Internal("exit lost".into()))?;
    Ok(status.code)
}

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
                .and_then(|t| super::criu_error_line(&t))
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
    upstream: TcpStream,
    transfer: Transfer,
}

/// Closes the transfer with the source: its CRIU answers, then kills the source's processes
/// once it reads the end of the stream.
async fn commit(mut upstream: TcpStream) -> std::result::Result<(), String> {
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
async fn pull(
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

#[cfg(test)]
mod tests {
    use super::*;

    fn iov(cmd: u32) -> [u8; IOV_SIZE] {
        let mut b = [0u8; IOV_SIZE];
        b[..4].copy_from_slice(&cmd.to_le_bytes());
        b
    }

    /// A relay on a free port, connected to a fake CRIU page server on its loopback port: the
    /// fake answers each request with 4 KiB, the close with a status word, and reports whether
    /// the relay had called `abort` when it saw the end of the destination's stream.
    async fn relay_and_criu() -> (
        PageRelay,
        SocketAddr,
        Arc<AtomicBool>,
        tokio::task::JoinHandle<bool>,
    ) {
        let mut relay = PageRelay::bind("127.0.0.1:0").await.unwrap();
        let public = relay.listener.local_addr().unwrap();
        let criu = TcpListener::bind(("127.0.0.1", relay.criu_port))
            .await
            .unwrap();
        let aborted = Arc::new(AtomicBool::new(false));
        let seen = aborted.clone();
        let fake = tokio::spawn(async move {
            let (mut s, _) = criu.accept().await.unwrap();
            let mut req = [0u8; IOV_SIZE];
            loop {
                if s.read_exact(&mut req).await.is_err() {
                    // The end of the destination's stream: was CRIU killed before it?
                    return seen.load(Ordering::SeqCst);
                }
                if command(&req) == PS_IOV_CLOSE {
                    s.write_all(&0i32.to_le_bytes()).await.unwrap();
                } else {
                    s.write_all(&[7u8; 4096]).await.unwrap();
                }
            }
        });
        relay.connect_criu().await.unwrap();
        (relay, public, aborted, fake)
    }

    /// The relay serving `peer` (any, when None), waiting `connect` for it; `aborted` is set
    /// when it kills CRIU.
    fn serving(
        relay: PageRelay,
        aborted: &Arc<AtomicBool>,
        peer: Option<std::net::IpAddr>,
        connect: Duration,
    ) -> tokio::task::JoinHandle<Result<Transfer>> {
        let flag = aborted.clone();
        tokio::spawn(async move {
            relay
                .serve(
                    peer,
                    connect,
                    Duration::from_secs(5),
                    move || flag.store(true, Ordering::SeqCst),
                    || {},
                )
                .await
        })
    }

    #[tokio::test]
    async fn the_end_reaches_criu_only_after_the_destination_closed() {
        let (relay, public, aborted, fake) = relay_and_criu().await;
        let serve = serving(relay, &aborted, None, Duration::from_secs(5));
        let mut dest = TcpStream::connect(public).await.unwrap();
        dest.write_all(&iov(7)).await.unwrap();
        let mut page = vec![0u8; 4096];
        dest.read_exact(&mut page).await.unwrap();
        dest.write_all(&iov(PS_IOV_CLOSE)).await.unwrap();
        let mut status = [0u8; 4];
        dest.read_exact(&mut status).await.unwrap();
        drop(dest);
        let transfer = serve.await.unwrap().unwrap();
        assert_eq!(transfer.bytes, 4096 + 4);
        assert!(
            !fake.await.unwrap(),
            "CRIU was killed after a complete transfer"
        );
        assert!(!aborted.load(Ordering::SeqCst));
    }

    #[tokio::test]
    async fn after_the_close_criu_is_let_finish_whatever_happens() {
        let (relay, public, aborted, fake) = relay_and_criu().await;
        let serve = serving(relay, &aborted, None, Duration::from_secs(5));
        let dest = std::net::TcpStream::connect(public).unwrap();
        let mut d = &dest;
        std::io::Write::write_all(&mut d, &iov(PS_IOV_CLOSE)).unwrap();
        // Gone with a reset, without reading CRIU's answer: the destination has every page.
        reset_on_close(dest.as_raw_fd());
        drop(dest);
        serve.await.unwrap().unwrap();
        assert!(!fake.await.unwrap(), "CRIU was killed after the close");
        assert!(!aborted.load(Ordering::SeqCst));
    }

    #[tokio::test]
    async fn a_destination_gone_before_the_close_kills_criu_first() {
        let (relay, public, aborted, fake) = relay_and_criu().await;
        let serve = serving(relay, &aborted, None, Duration::from_secs(5));
        let mut dest = TcpStream::connect(public).await.unwrap();
        dest.write_all(&iov(7)).await.unwrap();
        let mut page = vec![0u8; 4096];
        dest.read_exact(&mut page).await.unwrap();
        // Half a request, then gone.
        dest.write_all(&iov(7)[..10]).await.unwrap();
        drop(dest);
        let err = serve.await.unwrap().unwrap_err();
        assert!(
            err.to_string().contains("before it had every page"),
            "{err}"
        );
        assert!(
            fake.await.unwrap(),
            "CRIU saw the end before it was killed: it would kill the tasks"
        );
    }

    #[tokio::test]
    async fn a_destination_that_never_connects_is_a_deadline() {
        let (relay, _public, aborted, _fake) = relay_and_criu().await;
        let err = serving(relay, &aborted, None, Duration::from_millis(50))
            .await
            .unwrap()
            .unwrap_err();
        assert!(matches!(err, Error::DeadlineExceeded(_)), "{err}");
        assert!(aborted.load(Ordering::SeqCst));
    }

    /// The destination's side: the daemon's close is answered by the shim and never reaches the
    /// source; the source gets the close only from [`commit`].
    #[tokio::test]
    async fn the_daemons_close_is_kept_from_the_source_until_commit() {
        let source = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let source_addr = source.local_addr().unwrap();
        let fake_source = tokio::spawn(async move {
            let (mut s, _) = source.accept().await.unwrap();
            let mut req = [0u8; IOV_SIZE];
            let mut commands = Vec::new();
            while s.read_exact(&mut req).await.is_ok() {
                commands.push(command(&req));
                if command(&req) == PS_IOV_CLOSE {
                    s.write_all(&0i32.to_le_bytes()).await.unwrap();
                } else {
                    s.write_all(&[9u8; 4096]).await.unwrap();
                }
            }
            commands
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let daemon_addr = listener.local_addr().unwrap();
        // No daemon process: the pid is one no process has (pull kills it only on failure).
        let pulling = tokio::spawn(pull(
            listener,
            source_addr,
            i32::MAX,
            Duration::from_secs(5),
        ));
        let mut daemon = TcpStream::connect(daemon_addr).await.unwrap();
        daemon.write_all(&iov(7)).await.unwrap();
        let mut page = vec![0u8; 4096];
        daemon.read_exact(&mut page).await.unwrap();
        daemon.write_all(&iov(PS_IOV_CLOSE)).await.unwrap();
        let mut status = [1u8; 4];
        daemon.read_exact(&mut status).await.unwrap();
        assert_eq!(
            i32::from_le_bytes(status),
            0,
            "the shim answers the daemon's close"
        );
        drop(daemon);
        let pulled = pulling.await.unwrap().unwrap();
        assert_eq!(pulled.transfer.bytes, 4096);
        commit(pulled.upstream).await.unwrap();
        assert_eq!(fake_source.await.unwrap(), vec![7, PS_IOV_CLOSE]);
    }

    #[tokio::test]
    async fn only_the_destination_is_served() {
        let (relay, public, aborted, _fake) = relay_and_criu().await;
        // The destination is 127.0.0.2: a connection from 127.0.0.1 is closed unserved.
        let serve = serving(
            relay,
            &aborted,
            Some("127.0.0.2".parse().unwrap()),
            Duration::from_millis(300),
        );
        let mut intruder = TcpStream::connect(public).await.unwrap();
        let _ = intruder.write_all(&iov(7)).await;
        let mut b = [0u8; 1];
        assert_eq!(intruder.read(&mut b).await.unwrap_or(0), 0, "served a page");
        let err = serve.await.unwrap().unwrap_err();
        assert!(matches!(err, Error::DeadlineExceeded(_)), "{err}");
    }

    #[test]
    fn the_pipe_check_names_the_sysctl() {
        // Either this host allows CRIU's pipes, or the error says how to.
        if let Err(e) = check_pipe_size() {
            assert!(e.to_string().contains("fs.pipe-max-size"), "{e}");
        }
    }
}
