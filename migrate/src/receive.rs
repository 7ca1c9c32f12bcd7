//! `receive`: the destination's side of a migration: one connection at a time, the header,
//! a CRIU page server when the source asks for one, the archive (streamed, a file, or an image
//! to pull), then the restore and one reply line.

use std::io::{BufRead, BufReader, Read};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use crate::archive;
use crate::checkpoint;
use crate::client::Cd;
use crate::image;
use crate::migrate::{copy_counting, send_line, Header, Ready, Reply, Via};
use crate::progress::{wall_ms, Progress};
use crate::restore::{self, Want as RestoreWant};

pub struct ReceiveArgs {
    pub listen: String,
    pub once: bool,
    pub plain_http: bool,
    pub log_dir: Option<PathBuf>,
    /// What of an archive's spec may act on this host; its `binds` are also where a source's
    /// volume map may point.
    pub trust: crate::trust::Trust,
}

/// Serves migrations into `cd`, one at a time.
pub async fn receive(
    cd: &mut Cd,
    args: ReceiveArgs,
    work_root: &Path,
    progress: &Progress,
) -> Result<()> {
    let addr = args.listen.strip_prefix("tcp://").unwrap_or(&args.listen);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("listen on {addr}"))?;
    progress.note(&format!("receiving on {}", listener.local_addr()?));
    loop {
        let (sock, peer) = listener.accept().await?;
        let sock = sock.into_std()?;
        sock.set_nonblocking(false)?;
        progress.note(&format!("migration from {peer}"));
        let reply = match serve_one(cd, &sock, &args, work_root, progress).await {
            Ok(r) => r,
            Err(e) => {
                progress.note(&format!("failed: {e:#}"));
                Reply {
                    ok: false,
                    error: Some(format!("{e:#}")),
                    ..Default::default()
                }
            }
        };
        let mut s = sock;
        let _ = send_line(&mut s, &reply);
        let _ = s.shutdown(std::net::Shutdown::Both);
        if args.once {
            return if reply.ok {
                Ok(())
            } else {
                Err(anyhow!(reply.error.unwrap_or_default()))
            };
        }
    }
}

async fn serve_one(
    cd: &mut Cd,
    sock: &TcpStream,
    args: &ReceiveArgs,
    work_root: &Path,
    progress: &Progress,
) -> Result<Reply> {
    let s = sock.try_clone()?;
    let (header, reader) =
        tokio::task::spawn_blocking(move || -> Result<(Header, BufReader<TcpStream>)> {
            // A peer that says nothing for ten minutes is gone.
            s.set_read_timeout(Some(Duration::from_secs(600)))?;
            let mut r = BufReader::with_capacity(1 << 20, s);
            let mut line = String::new();
            (&mut r)
                .take(1 << 20)
                .read_line(&mut line)
                .context("read the migration header")?;
            if !line.ends_with('\n') {
                bail!("the migration header is not one line of at most 1 MiB");
            }
            let h: Header =
                serde_json::from_str(&line).context("the migration header is not valid")?;
            if h.version != 1 {
                bail!(
                    "migration protocol version {} (this receiver speaks 1)",
                    h.version
                );
            }
            Ok((h, r))
        })
        .await
        .map_err(|e| anyhow!("header thread: {e}"))??;
    let work = checkpoint::work_dir(work_root, "incoming")?;
    let dir = work.join("archive");
    std::fs::create_dir(&dir)?;
    let first_byte_at_ms = wall_ms();
    let result = receive_into(cd, &header, reader, &work, &dir, args, progress).await;
    let _ = std::fs::remove_dir_all(&work);
    let (r, bytes) = result?;
    Ok(Reply {
        ok: true,
        error: None,
        name: Some(r.name),
        pid: r.pid,
        restore_ms: r.restore_ms,
        start_ms: r.start_ms,
        started_at_ms: r.started_at_ms,
        first_byte_at_ms,
        bytes,
    })
}

async fn receive_into(
    cd: &mut Cd,
    header: &Header,
    mut reader: BufReader<TcpStream>,
    work: &Path,
    dir: &Path,
    args: &ReceiveArgs,
    progress: &Progress,
) -> Result<(restore::Restored, u64)> {
    // Lazy: the pages come from the source's page server, at the address it reached us from.
    let lazy_from = match header.lazy_port {
        Some(port) => Some(
            std::net::SocketAddr::new(reader.get_ref().peer_addr()?.ip().to_canonical(), port)
                .to_string(),
        ),
        None => None,
    };
    let (unpacked, bytes) = match header.via {
        Via::Registry => {
            let reference = header
                .image
                .clone()
                .ok_or_else(|| anyhow!("the header names no image"))?;
            progress.phase("pull", 0);
            let p = progress.clone();
            let plain = args.plain_http;
            image::fetch(cd, &reference, plain, dir, &mut move |n| p.bytes(n)).await?;
            (archive::check(dir)?, archive::dir_bytes(dir))
        }
        Via::Archive => {
            let file = work.join("received.tar");
            progress.phase("receive", header.size);
            let (f2, p, size) = (file.clone(), progress.clone(), header.size);
            let n = tokio::task::spawn_blocking(move || -> Result<u64> {
                let mut out = std::fs::File::create(&f2)?;
                let mut limited = (&mut reader).take(size);
                copy_counting(&mut limited, &mut out, &mut |n| p.bytes(n))
            })
            .await
            .map_err(|e| anyhow!("receive thread: {e}"))??;
            if n != header.size {
                bail!("the archive ended after {n} of {} bytes", header.size);
            }
            (restore::unpack_file(&file, dir, progress).await?, n)
        }
        Via::Stream => {
            let pages = if header.page_server {
                let mut answer = reader.get_ref().try_clone()?;
                match PageServer::start(&dir.join(archive::CHECKPOINT_DIR), reader.get_ref(), work)
                {
                    Ok(ps) => {
                        send_line(
                            &mut answer,
                            &Ready {
                                page_server: Some(ps.addr.clone()),
                                error: None,
                            },
                        )?;
                        progress.note(&format!("CRIU page server on {}", ps.addr));
                        Some(ps)
                    }
                    Err(e) => {
                        let _ = send_line(
                            &mut answer,
                            &Ready {
                                page_server: None,
                                error: Some(format!("{e:#}")),
                            },
                        );
                        return Err(e);
                    }
                }
            } else {
                None
            };
            progress.phase("receive + unpack", 0);
            let (d, p) = (dir.to_path_buf(), progress.clone());
            let counted =
                tokio::task::spawn_blocking(move || -> Result<(archive::Unpacked, u64)> {
                    let mut counter = Counting {
                        inner: reader,
                        n: 0,
                    };
                    archive::extract(&mut counter, &d, &mut |n| p.bytes(n))?;
                    Ok((archive::check(&d)?, counter.n))
                })
                .await
                .map_err(|e| anyhow!("unpack thread: {e}"))??;
            match pages {
                Some(ps) => (counted.0, counted.1 + ps.finish()?),
                None => counted,
            }
        }
    };
    finish_receive(
        cd,
        header,
        (unpacked, bytes),
        args,
        work,
        lazy_from,
        progress,
    )
    .await
}

async fn finish_receive(
    cd: &mut Cd,
    header: &Header,
    (unpacked, bytes): (archive::Unpacked, u64),
    args: &ReceiveArgs,
    work: &Path,
    lazy_pages_from: Option<String>,
    progress: &Progress,
) -> Result<(restore::Restored, u64)> {
    // The volume map comes from the network: it may only point where this receiver allows.
    for (dest, path) in &header.volume_map {
        if !crate::trust::under(path, &args.trust.binds) {
            bail!(
                "the source maps volume {dest} to {} on this host, which is under no --allow-bind directory of this receiver",
                path.display()
            );
        }
    }
    let want = RestoreWant {
        name: header.name.clone(),
        trust: args.trust.clone(),
        ignore_volumes: header.ignore_volumes,
        volume_map: header.volume_map.clone(),
        plain_http: args.plain_http,
        log: args.log_dir.as_ref().map(|d| {
            d.join(format!(
                "{}.log",
                header
                    .name
                    .clone()
                    .or_else(|| unpacked.own.as_ref().map(|o| o.id.clone()))
                    .unwrap_or_default()
            ))
        }),
        io_root: work.parent().unwrap_or(work).join("io"),
        lazy_pages_from,
        ..Default::default()
    };
    let r = restore::restore(cd, &unpacked, &want, progress).await?;
    Ok((r, bytes))
}

/// `criu page-server` for one dump, writing the pages into a checkpoint directory.
struct PageServer {
    child: std::process::Child,
    addr: String,
    dir: PathBuf,
    log: PathBuf,
}

impl PageServer {
    /// Starts one on the address the source reached us at, on a free port, and waits until it
    /// listens.
    fn start(images: &Path, sock: &TcpStream, work: &Path) -> Result<PageServer> {
        std::fs::create_dir_all(images)?;
        let ip = sock.local_addr()?.ip();
        let port = std::net::TcpListener::bind((ip, 0))?.local_addr()?.port();
        let log = work.join("page-server.log");
        let child = std::process::Command::new("criu")
            .arg("page-server")
            .arg("--images-dir")
            .arg(images)
            .args(["--address", &ip.to_string(), "--port", &port.to_string()])
            .args(["-v4", "-o"])
            .arg(&log)
            .stdin(std::process::Stdio::null())
            .spawn()
            .context("start `criu page-server`")?;
        let mut ps = PageServer {
            child,
            addr: format!("{ip}:{port}"),
            dir: images.to_path_buf(),
            log,
        };
        let needle = format!(":{port:04X} ");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let listening = ["tcp", "tcp6"].iter().any(|t| {
                std::fs::read_to_string(format!("/proc/{}/net/{t}", ps.child.id()))
                    .unwrap_or_default()
                    .lines()
                    .any(|l| l.contains(&needle) && l.split_whitespace().nth(3) == Some("0A"))
            });
            if listening {
                return Ok(ps);
            }
            if let Ok(Some(st)) = ps.child.try_wait() {
                bail!("criu page-server exited ({st}): {}", ps.log_tail());
            }
            if Instant::now() > deadline {
                bail!("criu page-server did not listen on {} within 10 s", ps.addr);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        log.lines()
            .rfind(|l| l.contains("Error"))
            .unwrap_or("(no error in its log)")
            .to_string()
    }

    /// Waits for the page server (it ends with the dump's connection); the bytes of pages it wrote.
    fn finish(mut self) -> Result<u64> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match self.child.try_wait()? {
                Some(st) if st.success() => break,
                Some(st) => bail!("criu page-server failed ({st}): {}", self.log_tail()),
                None if Instant::now() > deadline => {
                    bail!("criu page-server still runs a minute after the archive came")
                }
                None => std::thread::sleep(Duration::from_millis(5)),
            }
        }
        Ok(archive::pages_bytes(&self.dir))
    }
}

impl Drop for PageServer {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

struct Counting<R> {
    inner: R,
    n: u64,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let k = self.inner.read(buf)?;
        self.n += k as u64;
        Ok(k)
    }
}
