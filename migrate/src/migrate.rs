//! `migrate` and `receive`: a container moves from this host's containerd to
//! the one a `receive` serves, through a registry (checkpoint image), an
//! archive file, or straight across (the archive streamed over the
//! connection and unpacked as it arrives).
//!
//! The connection carries one JSON header line from the source, the archive
//! bytes (archive and stream paths), and one JSON reply line from the
//! destination. The source container is removed only after the destination
//! runs; if the destination fails, a live source is resumed and an exited
//! one keeps its checkpoint on disk, restorable.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::archive::{self, Compression};
use crate::checkpoint::{self, Want as CheckpointWant};
use crate::client::{Cd, TASK_RUNNING};
use crate::image;
use crate::progress::{human, wall_ms, Progress};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Via {
    Stream,
    Archive,
    Registry,
}

impl std::str::FromStr for Via {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "stream" => Ok(Self::Stream),
            "archive" => Ok(Self::Archive),
            "registry" => Ok(Self::Registry),
            o => bail!("unknown path {o:?}: stream, archive or registry"),
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Header {
    pub(crate) version: u32,
    pub(crate) via: Via,
    pub(crate) name: Option<String>,
    pub(crate) image: Option<String>,
    pub(crate) plain_http: bool,
    pub(crate) ignore_volumes: bool,
    pub(crate) volume_map: Vec<(String, PathBuf)>,
    /// Bytes that follow (archive path); 0: a tar stream to its end.
    pub(crate) size: u64,
    pub(crate) source_host: String,
    /// Stream path: start a CRIU page server and say where (a [`Ready`] line) before the
    /// archive comes; the archive then holds no memory pages.
    #[serde(default)]
    pub(crate) page_server: bool,
    /// Lazy: the memory pages are not in the archive; the destination pulls them from a page
    /// server on this port of the address it was reached from.
    #[serde(default)]
    pub(crate) lazy_port: Option<u16>,
}

/// The destination's answer to a header asking for a page server.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct Ready {
    pub(crate) page_server: Option<String>,
    pub(crate) error: Option<String>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct Reply {
    pub(crate) ok: bool,
    pub(crate) error: Option<String>,
    pub(crate) name: Option<String>,
    pub(crate) pid: u32,
    pub(crate) restore_ms: f64,
    #[serde(default)]
    pub(crate) start_ms: f64,
    pub(crate) started_at_ms: u64,
    pub(crate) first_byte_at_ms: u64,
    pub(crate) bytes: u64,
}

pub struct MigrateArgs {
    pub id: String,
    pub to: String,
    pub via: Via,
    pub image: Option<String>,
    pub archive: Option<PathBuf>,
    pub compress: Compression,
    pub plain_http: bool,
    pub checkpoint: CheckpointWant,
    pub name: Option<String>,
    pub volume_map: Vec<(String, PathBuf)>,
    /// Straight across and live: the memory goes to a CRIU page server on the destination
    /// during the dump.
    pub page_server: bool,
    /// Lazy (post-copy): the page server's port here, and how long it waits (s).
    pub lazy: Option<(u16, u64)>,
}

fn connect(to: &str) -> Result<TcpStream> {
    let addr = to.strip_prefix("tcp://").unwrap_or(to);
    let addrs: Vec<_> = std::net::ToSocketAddrs::to_socket_addrs(addr)
        .with_context(|| format!("destination {to}"))?
        .collect();
    let a = addrs
        .first()
        .ok_or_else(|| anyhow!("destination {to} resolves to nothing"))?;
    let s = TcpStream::connect_timeout(a, Duration::from_secs(10)).with_context(|| {
        format!("connect to the receiver at {to} (is `container-migrate receive` running there?)")
    })?;
    s.set_nodelay(true)?;
    Ok(s)
}

pub(crate) fn send_line(s: &mut TcpStream, v: &impl Serialize) -> Result<()> {
    let mut line = serde_json::to_vec(v)?;
    line.push(b'\n');
    s.write_all(&line)?;
    Ok(())
}

/// Moves container `args.id` from `cd` to the receiver at `args.to`.
pub async fn migrate(
    cd: &mut Cd,
    args: MigrateArgs,
    work_root: &Path,
    progress: &Progress,
) -> Result<()> {
    let t0 = Instant::now();
    let id = args.id.clone();
    // The source stops at the dump (and its CRIU keeps the connections'
    // packets dropped) when asked, and always with established TCP: a live
    // source would answer its peers after the dump and their bytes be lost.
    let exit = args.checkpoint.exit || args.checkpoint.tcp_established;
    if args.lazy.is_some() {
        if exit || args.via != Via::Stream {
            bail!("--lazy moves a live container straight across (--via stream, without --exit)");
        }
        return lazy_migrate(cd, args, work_root, progress, t0).await;
    }
    if exit && !args.checkpoint.exit {
        progress.note("established TCP connections: the source stops at the dump (--exit)");
    }
    let sock = connect(&args.to)?;
    cd.container(&id).await?;
    let was_running = cd.task_status(&id).await? == Some(TASK_RUNNING);
    let paused_at = wall_ms();
    let mut paused = false;
    if !exit && was_running {
        cd.pause(&id).await?;
        paused = true;
    }
    let work = checkpoint::work_dir(work_root, &id)?;
    let want = CheckpointWant {
        exit,
        ..args.checkpoint.clone()
    };
    let outcome = move_it(cd, &args, &want, &work, sock, progress).await;
    let (taken, reply) = match outcome {
        Ok(x) => x,
        Err((e, taken)) => {
            let state = after_failure(cd, &id, paused, exit, taken.then_some(&work)).await;
            if !taken {
                let _ = std::fs::remove_dir_all(&work);
            }
            return Err(e.context(state));
        }
    };
    // The destination runs: the source goes.
    progress.phase("remove source", 0);
    let removed = cd.remove_container(&id).await;
    let _ = std::fs::remove_dir_all(&work);
    if let Err(e) = removed {
        progress.note(&format!(
            "the container runs on the destination, but removing {id} here failed: {e:#}"
        ));
    }
    let stopped = if paused {
        paused_at
    } else {
        taken.stopped_at_ms
    };
    let downtime = reply.started_at_ms.saturating_sub(stopped);
    let total_ms = t0.elapsed().as_secs_f64() * 1000.0;
    let (mut v, mut table) = taken.figures();
    v["via"] = serde_json::to_value(args.via)?;
    v["destination"] = args.to.clone().into();
    v["name"] = reply.name.clone().into();
    v["downtime_ms"] = downtime.into();
    v["total_ms"] = total_ms.into();
    v["bytes_moved"] = reply.bytes.into();
    v["restore_ms"] = reply.restore_ms.into();
    v["criu_restore_ms"] = reply.start_ms.into();
    v["page_server"] = taken.shim["page_server"].clone();
    table.insert(0, ("path".into(), format!("{:?}", args.via).to_lowercase()));
    table.push((
        "restore on destination".into(),
        format!("{:.1} ms", reply.restore_ms),
    ));
    if let Some(ps) = taken.shim["page_server"].as_str() {
        table.push((
            "memory pages".into(),
            format!("to CRIU's page server at {ps}, during the dump"),
        ));
    }
    table.push(("bytes moved".into(), human(reply.bytes)));
    table.push(("downtime".into(), format!("{downtime} ms")));
    table.push(("total".into(), format!("{total_ms:.0} ms")));
    progress.result(v, &table);
    Ok(())
}

/// Puts the source back after a failed move; says what state it is in.
async fn after_failure(
    cd: &Cd,
    id: &str,
    paused: bool,
    exit: bool,
    kept: Option<&PathBuf>,
) -> String {
    let dest = "nothing of it runs on the destination";
    if exit {
        return match (cd.task_status(id).await, kept) {
            (Ok(Some(s)), _) if s == TASK_RUNNING => format!("{dest}; {id} runs on here"),
            (_, Some(dir)) => format!(
                "{dest}; {id} exited with its checkpoint, which is kept at {}: restore it with `container-migrate restore --dir {}`",
                dir.display(),
                dir.display()
            ),
            _ => format!("{dest}; {id} is not running here"),
        };
    }
    if paused {
        match cd.resume(id).await {
            Ok(()) => format!("{dest}; {id} was resumed and runs on here"),
            Err(e) => format!("{dest}; {id} is PAUSED here and resuming it failed: {e:#}"),
        }
    } else {
        format!("{dest}; {id} is as it was here")
    }
}

/// Checkpoint, hand over, wait for the destination. The error says whether
/// a checkpoint was taken (true: the work dir holds it).
async fn move_it(
    cd: &mut Cd,
    args: &MigrateArgs,
    want: &CheckpointWant,
    work: &Path,
    mut sock: TcpStream,
    progress: &Progress,
) -> std::result::Result<(checkpoint::Taken, Reply), (anyhow::Error, bool)> {
    let header = header_of(args);
    // Live and straight across: the pages go to the destination during the dump. Not with
    // `exit`: its source would keep no copy of the memory to restore from.
    let use_ps = args.via == Via::Stream && args.page_server && !want.exit;
    let mut want = want.clone();
    if use_ps {
        let ready = page_server_at(&mut sock, &header, progress)
            .await
            .map_err(|e| (e, false))?;
        want.page_server = Some(ready);
    }
    let taken = checkpoint::take(cd, &args.id, &want, work, progress)
        .await
        .map_err(|e| (e, false))?;
    let r = hand_over(cd, args, header, use_ps, &taken, &mut sock, progress).await;
    r.map(|reply| (taken, reply)).map_err(|e| (e, true))
}

fn header_of(args: &MigrateArgs) -> Header {
    Header {
        version: 1,
        via: args.via,
        name: args.name.clone(),
        image: None,
        plain_http: args.plain_http,
        ignore_volumes: args.checkpoint.ignore_volumes,
        volume_map: args.volume_map.clone(),
        size: 0,
        source_host: checkpoint::hostname(),
        page_server: false,
        lazy_port: args.lazy.map(|l| l.0),
    }
}

/// Lazy: the shim answers the checkpoint once CRIU is ready, the container
/// frozen and every image but the pages written; the archive goes across,
/// the destination runs the container and pulls the pages from the shim's
/// page server here; the shim's record says when that ended.
async fn lazy_migrate(
    cd: &mut Cd,
    args: MigrateArgs,
    work_root: &Path,
    progress: &Progress,
    t0: Instant,
) -> Result<()> {
    let id = args.id.clone();
    let Some((port, timeout)) = args.lazy else {
        bail!("not a lazy migration");
    };
    let mut sock = connect(&args.to)?;
    cd.container(&id).await?;
    let work = checkpoint::work_dir(work_root, &id)?;
    // Served to the destination alone: the address it is reached at.
    let want = CheckpointWant {
        lazy: Some(checkpoint::Lazy {
            listen: format!("0.0.0.0:{port}"),
            timeout,
            peer: sock.peer_addr()?.ip().to_string(),
        }),
        ..args.checkpoint.clone()
    };
    let taken = match checkpoint::take(cd, &id, &want, &work, progress).await {
        Ok(t) => t,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&work);
            return Err(e.context(format!(
                "nothing of it runs on the destination; {id} runs on here"
            )));
        }
    };
    let handed = hand_over(
        cd,
        &args,
        header_of(&args),
        false,
        &taken,
        &mut sock,
        progress,
    )
    .await;
    // Whatever the destination said, the shim's page server decides the source's fate.
    progress.phase("lazy pages", 0);
    let outcome = lazy_outcome(&taken.dir, Duration::from_secs(timeout)).await;
    let (reply, record) = match (handed, outcome) {
        (Ok(reply), Ok(record)) => (reply, record),
        // Every page arrived and the source let go: the destination runs, whatever its
        // receiver said (a reply lost on the way).
        (Err(e), Ok(record)) => {
            progress.note(&format!(
                "the destination's reply was lost ({e:#}), but it pulled every page: it runs there"
            ));
            (Reply::default(), record)
        }
        (handed, outcome) => {
            let _ = std::fs::remove_dir_all(&work);
            let dest = match &handed {
                Ok(r) => format!(
                    "the destination's {} did not get every page and is killed there",
                    r.name.clone().unwrap_or_default()
                ),
                Err(e) => format!("the destination could not restore ({e:#})"),
            };
            let here = match (&outcome, cd.task_status(&id).await) {
                (Err(e), Ok(Some(s))) if s == TASK_RUNNING => {
                    format!("{id} runs on here ({e:#})")
                }
                (Err(e), s) => format!("{id} here: {e:#}; its task is {s:?}"),
                (Ok(_), _) => format!("{id} exited here"),
            };
            bail!("lazy migration failed: {dest}; {here}");
        }
    };
    progress.phase("remove source", 0);
    let removed = cd.remove_container(&id).await;
    let _ = std::fs::remove_dir_all(&work);
    if let Err(e) = removed {
        progress.note(&format!(
            "the container runs on the destination, but removing {id} here failed: {e:#}"
        ));
    }
    let downtime = reply.started_at_ms.saturating_sub(taken.stopped_at_ms);
    let total_ms = t0.elapsed().as_secs_f64() * 1000.0;
    let (mut v, mut table) = taken.figures();
    v["via"] = "stream".into();
    v["lazy"] = true.into();
    v["destination"] = args.to.clone().into();
    v["name"] = reply.name.clone().into();
    v["downtime_ms"] = downtime.into();
    v["total_ms"] = total_ms.into();
    v["bytes_moved"] = (reply.bytes + record["bytes"].as_u64().unwrap_or(0)).into();
    v["lazy_bytes"] = record["bytes"].clone();
    v["lazy_transfer_ms"] = record["transfer_ms"].clone();
    v["restore_ms"] = reply.restore_ms.into();
    v["criu_restore_ms"] = reply.start_ms.into();
    table.insert(0, ("path".into(), "stream, lazy".into()));
    table.push((
        "restore on destination".into(),
        format!("{:.1} ms", reply.restore_ms),
    ));
    table.push((
        "memory pages".into(),
        format!(
            "{} pulled by the destination in {:.0} ms, after it ran",
            human(record["bytes"].as_u64().unwrap_or(0)),
            record["transfer_ms"].as_f64().unwrap_or(0.0)
        ),
    ));
    table.push(("archive bytes".into(), human(reply.bytes)));
    table.push(("downtime".into(), format!("{downtime} ms")));
    table.push(("total".into(), format!("{total_ms:.0} ms")));
    progress.result(v, &table);
    Ok(())
}

/// The shim's record of the lazy transfer, once it ended: Ok when the
/// destination got every page (the source exited), else why not (the
/// source runs on). The shim bounds the wait itself (the connect timeout,
/// then CRIU's); this only stops polling a record that never changes.
async fn lazy_outcome(dir: &Path, connect_timeout: Duration) -> Result<serde_json::Value> {
    let record = dir
        .join(crate::archive::CHECKPOINT_DIR)
        .join(crate::archive::SHIM_RECORD);
    let give_up = Instant::now() + connect_timeout + Duration::from_secs(3600);
    loop {
        let v: serde_json::Value = std::fs::read(&record)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        match v["lazy"]["state"].as_str() {
            Some("complete") => return Ok(v["lazy"].clone()),
            Some("failed") => bail!(
                "{}",
                v["lazy"]["error"]
                    .as_str()
                    .unwrap_or("the lazy transfer failed")
            ),
            _ if Instant::now() > give_up => {
                bail!("the shim never said how the lazy transfer ended")
            }
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// Sends the header asking for a page server; returns its `ADDRESS:PORT`.
async fn page_server_at(
    sock: &mut TcpStream,
    header: &Header,
    progress: &Progress,
) -> Result<String> {
    progress.phase("page server on the destination", 0);
    let mut h = serde_json::to_value(header)?;
    h["page_server"] = true.into();
    send_line(sock, &h)?;
    let line = read_line(
        sock,
        Some(Duration::from_secs(60)),
        "the destination's page server",
    )
    .await?;
    let ready: Ready = serde_json::from_str(&line)
        .with_context(|| format!("the destination's page server answer is not valid: {line:?}"))?;
    match (ready.page_server, ready.error) {
        (Some(addr), _) => Ok(addr),
        (None, Some(e)) => bail!("the destination could not start a page server: {e}"),
        (None, None) => bail!("the destination started no page server"),
    }
}

async fn hand_over(
    cd: &mut Cd,
    args: &MigrateArgs,
    mut header: Header,
    header_sent: bool,
    taken: &checkpoint::Taken,
    sock: &mut TcpStream,
    progress: &Progress,
) -> Result<Reply> {
    match args.via {
        Via::Registry => {
            let reference = args
                .image
                .clone()
                .ok_or_else(|| anyhow!("--via registry needs --image REF"))?;
            progress.phase("image", archive::dir_bytes(&taken.dir));
            cd.lease(&format!("container-migrate-{}-{}", args.id, wall_ms()))
                .await?;
            let p = progress.clone();
            let made = image::create(
                cd,
                &taken.dir,
                &reference,
                &taken.own,
                &taken.criu_version(),
                &mut move |n| p.bytes(n),
            )
            .await;
            if let Err(e) = made {
                cd.end_lease().await;
                return Err(e);
            }
            progress.phase("push", 0);
            let pushed = image::push(cd, &reference, args.plain_http).await;
            cd.end_lease().await;
            pushed?;
            header.image = Some(reference);
            send_line(sock, &header)?;
        }
        Via::Archive => {
            let file = args
                .archive
                .clone()
                .unwrap_or_else(|| taken.dir.join("archive.tar"));
            let size = checkpoint::export(&taken.dir, &file, args.compress, progress).await?;
            header.size = size;
            send_line(sock, &header)?;
            progress.phase("send", size);
            let (mut s, p) = (sock.try_clone()?, progress.clone());
            tokio::task::spawn_blocking(move || -> Result<()> {
                let mut f = std::fs::File::open(&file)
                    .with_context(|| format!("open {}", file.display()))?;
                copy_counting(&mut f, &mut s, &mut |n| p.bytes(n))?;
                Ok(())
            })
            .await
            .map_err(|e| anyhow!("send thread: {e}"))??;
        }
        Via::Stream => {
            if !header_sent {
                send_line(sock, &header)?;
            }
            progress.phase("stream", archive::dir_bytes(&taken.dir));
            let (s, p, d, c) = (
                sock.try_clone()?,
                progress.clone(),
                taken.dir.clone(),
                args.compress,
            );
            let sent = tokio::task::spawn_blocking(move || -> Result<()> {
                let w = std::io::BufWriter::with_capacity(1 << 20, s);
                let mut w = archive::write(&d, w, c, &mut |n| p.bytes(n))?;
                w.flush()?;
                Ok(())
            })
            .await
            .map_err(|e| anyhow!("stream thread: {e}"))?;
            if let Err(e) = sent {
                // The destination stopped reading: its reply says why.
                if let Ok(Reply {
                    error: Some(why), ..
                }) = read_reply(sock, Some(Duration::from_secs(10))).await
                {
                    bail!("the destination could not restore: {why}");
                }
                return Err(e.context("stream the checkpoint to the destination"));
            }
        }
    }
    progress.phase("restore on destination", 0);
    let reply = read_reply(sock, None).await?;
    if !reply.ok {
        bail!(
            "the destination could not restore: {}",
            reply.error.clone().unwrap_or_default()
        );
    }
    Ok(reply)
}

/// The destination's one reply line.
async fn read_reply(sock: &TcpStream, timeout: Option<Duration>) -> Result<Reply> {
    let line = read_line(sock, timeout, "the destination's reply").await?;
    if line.is_empty() {
        bail!("the destination closed the connection without a reply");
    }
    serde_json::from_str(&line).context("the destination's reply is not valid")
}

/// One line from the destination, without its newline, read a byte at a time (what follows it
/// is not ours to buffer); `timeout` bounds each read and is lifted after.
async fn read_line(
    sock: &TcpStream,
    timeout: Option<Duration>,
    what: &'static str,
) -> Result<String> {
    let mut s = sock.try_clone()?;
    s.set_read_timeout(timeout)?;
    let line = tokio::task::spawn_blocking(move || -> Result<Vec<u8>> {
        let mut line = Vec::new();
        let mut b = [0u8; 1];
        while s.read(&mut b).with_context(|| format!("read {what}"))? == 1 && b[0] != b'\n' {
            line.push(b[0]);
        }
        Ok(line)
    })
    .await
    .map_err(|e| anyhow!("reply thread: {e}"))??;
    sock.set_read_timeout(None)?;
    String::from_utf8(line).with_context(|| format!("{what} is not UTF-8"))
}

pub(crate) fn copy_counting(
    r: &mut impl Read,
    w: &mut impl Write,
    progress: &mut dyn FnMut(u64),
) -> Result<u64> {
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let k = r.read(&mut buf)?;
        if k == 0 {
            break;
        }
        w.write_all(&buf[..k])?;
        n += k as u64;
        progress(n);
    }
    w.flush()?;
    Ok(n)
}
