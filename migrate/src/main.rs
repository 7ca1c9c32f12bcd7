//! container-migrate: checkpoint, restore, inspect and migrate containers of
//! a containerd (runtime io.containerd.custom.v2), in the checkpoint archive
//! and image format Podman, CRI-O and containerd's CRI use.

mod archive;
mod checkpoint;
mod client;
mod image;
mod inspect;
mod migrate;
mod progress;
mod receive;
mod restore;
mod trust;

use std::path::PathBuf;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Parser, Subcommand};

use archive::Compression;
use client::Cd;
use progress::{human, Progress};

#[derive(Parser)]
#[command(name = "container-migrate", version, about, long_about = None)]
struct Cli {
    /// containerd's gRPC socket.
    #[arg(
        short,
        long,
        global = true,
        env = "CONTAINERD_ADDRESS",
        default_value = "/run/containerd/containerd.sock"
    )]
    address: PathBuf,
    /// containerd namespace.
    #[arg(
        short,
        long,
        global = true,
        env = "CONTAINERD_NAMESPACE",
        default_value = "default"
    )]
    namespace: String,
    /// Progress and figures as JSON lines on stdout.
    #[arg(long, global = true)]
    json: bool,
    /// Where checkpoints are put together and unpacked (on the host of the
    /// containerd: the shim writes there).
    #[arg(long, global = true, default_value = "/var/lib/container-migrate")]
    work_dir: PathBuf,
    /// Talk to registries over plain HTTP.
    #[arg(long, global = true)]
    plain_http: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args, Clone, Default)]
struct DumpArgs {
    /// Stop the container with the checkpoint (default: it runs on).
    #[arg(long)]
    exit: bool,
    /// Checkpoint established TCP connections.
    #[arg(long)]
    tcp_established: bool,
    /// Checkpoint file locks.
    #[arg(long)]
    file_locks: bool,
    /// Leave the rootfs changes out.
    #[arg(long)]
    ignore_rootfs: bool,
    /// Leave the bind-mounted volumes out (default: every writable bind mount of a directory).
    #[arg(long)]
    ignore_volumes: bool,
    /// Take only this volume (its destination in the container); repeatable.
    #[arg(long = "volume", value_name = "DEST")]
    volumes: Vec<String>,
}

impl DumpArgs {
    fn want(&self) -> checkpoint::Want {
        checkpoint::Want {
            exit: self.exit,
            tcp_established: self.tcp_established,
            file_locks: self.file_locks,
            ignore_rootfs: self.ignore_rootfs,
            ignore_volumes: self.ignore_volumes,
            volumes: self.volumes.clone(),
            page_server: None,
            lazy: None,
        }
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Checkpoint a container into an archive file or a checkpoint image.
    Checkpoint {
        container: String,
        #[command(flatten)]
        dump: DumpArgs,
        /// Compression of the archive file: zstd, gzip or none.
        #[arg(long, default_value = "zstd")]
        compress: Compression,
        /// Write the archive to FILE.
        #[arg(long, value_name = "FILE")]
        export: Option<PathBuf>,
        /// Build checkpoint image REF in containerd's image store.
        #[arg(long, value_name = "REF")]
        image: Option<String>,
        /// Push the checkpoint image to its registry.
        #[arg(long, requires = "image")]
        push: bool,
    },
    /// Restore a container from an archive file, a checkpoint image or an unpacked directory.
    Restore {
        #[arg(long, value_name = "FILE", conflicts_with_all = ["image", "dir"])]
        import: Option<PathBuf>,
        #[arg(long, value_name = "REF", conflicts_with = "dir")]
        image: Option<String>,
        /// An archive unpacked (or left by a failed migration) in a directory.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
        #[command(flatten)]
        target: TargetArgs,
    },
    /// Show what a checkpoint archive or image holds.
    Inspect {
        /// An archive file, or a checkpoint image reference.
        checkpoint: String,
    },
    /// Move a container to the containerd a `receive` serves.
    Migrate {
        container: String,
        /// The receiver: tcp://HOST:PORT.
        #[arg(long)]
        to: String,
        /// stream (straight across), archive (an archive file sent over) or registry (a checkpoint image).
        #[arg(long, default_value = "stream")]
        via: migrate::Via,
        /// The checkpoint image (for --via registry).
        #[arg(long, value_name = "REF")]
        image: Option<String>,
        /// The archive file (for --via archive).
        #[arg(long, value_name = "FILE")]
        archive: Option<PathBuf>,
        #[arg(long, default_value = "none")]
        compress: Compression,
        #[command(flatten)]
        dump: DumpArgs,
        /// The container's name on the destination (default: the same).
        #[arg(long)]
        name: Option<String>,
        /// Straight across and live: send the memory after the dump, not to a CRIU page server
        /// on the destination during it.
        #[arg(long)]
        no_page_server: bool,
        /// Mount the volume at DEST from PATH on the destination; repeatable.
        #[arg(long = "volume-map", value_name = "DEST=PATH", value_parser = parse_map)]
        volume_map: Vec<(String, PathBuf)>,
        /// Lazy (post-copy): the container runs on the destination before its memory has
        /// arrived; the pages follow from a page server here, on first touch and in the
        /// background. The source stays frozen until the destination has them all, and
        /// resumes if it never gets them. Straight across only.
        #[arg(long, conflicts_with_all = ["exit", "tcp_established"])]
        lazy: bool,
        /// The port of the lazy page server here (the destination dials this host's address).
        #[arg(long, default_value_t = 7073, requires = "lazy")]
        lazy_port: u16,
        /// How long the lazy page server waits for the destination to connect, in seconds.
        #[arg(long, default_value_t = 60, requires = "lazy")]
        lazy_timeout: u64,
    },
    /// Serve migrations into this containerd.
    Receive {
        /// HOST:PORT to listen on.
        #[arg(long)]
        listen: String,
        /// Serve one migration, then exit (non-zero if it failed).
        #[arg(long)]
        once: bool,
        /// Directory for the restored containers' stdout and stderr.
        #[arg(long)]
        log_dir: Option<PathBuf>,
        /// Also what a source's --volume-map may point at: only under these directories.
        #[command(flatten)]
        trust: TrustArgs,
    },
}

#[derive(Args, Clone, Default)]
struct TargetArgs {
    /// Name of the restored container (default: the checkpointed one's).
    #[arg(long)]
    name: Option<String>,
    #[arg(long)]
    ignore_rootfs: bool,
    #[arg(long)]
    ignore_volumes: bool,
    /// Mount the volume at DEST from PATH; repeatable.
    #[arg(long = "volume", value_name = "DEST=PATH", value_parser = parse_map)]
    volume_map: Vec<(String, PathBuf)>,
    /// Runtime of the restored container (default: the checkpointed one's).
    #[arg(long)]
    runtime: Option<String>,
    /// File for the task's stdout and stderr.
    #[arg(long)]
    log: Option<PathBuf>,
    #[command(flatten)]
    trust: TrustArgs,
}

/// What of a checkpoint's spec may act on this host outside the container, allowed by the
/// operator (an archive is input from outside: by default none of it).
#[derive(Args, Clone, Default)]
struct TrustArgs {
    /// Run the OCI hooks the checkpoint's spec asks for (runc runs them on this host).
    #[arg(long)]
    allow_hooks: bool,
    /// Let the restored container bind-mount host paths under DIR (volumes mapped with
    /// --volume are always allowed); repeatable.
    #[arg(long, value_name = "DIR")]
    allow_bind: Vec<PathBuf>,
    /// Let the restored container share this host's network namespace.
    #[arg(long)]
    allow_host_network: bool,
    /// Take the checkpoint's spec as it is: its hooks, mounts, namespaces, capabilities and
    /// devices.
    #[arg(long)]
    trust_spec: bool,
}

impl TrustArgs {
    fn trust(&self) -> trust::Trust {
        trust::Trust {
            all: self.trust_spec,
            hooks: self.allow_hooks,
            host_network: self.allow_host_network,
            binds: self.allow_bind.clone(),
        }
    }
}

fn parse_map(s: &str) -> Result<(String, PathBuf)> {
    let (d, p) = s
        .split_once('=')
        .ok_or_else(|| anyhow!("{s:?} is not DEST=PATH"))?;
    if !d.starts_with('/') || !p.starts_with('/') {
        bail!("{s:?}: both DEST and PATH are absolute paths");
    }
    Ok((d.to_string(), PathBuf::from(p)))
}

fn main() {
    let cli = Cli::parse();
    let progress = Progress::new(cli.json);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("container-migrate: tokio runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = rt.block_on(run(cli, &progress)) {
        if progress.json() {
            println!(
                "{}",
                serde_json::json!({"event": "error", "error": format!("{e:#}")})
            );
        }
        eprintln!("container-migrate: {e:#}");
        std::process::exit(1);
    }
}

async fn run(cli: Cli, progress: &Progress) -> Result<()> {
    let work = cli.work_dir.clone();
    match cli.cmd {
        Cmd::Checkpoint {
            container,
            dump,
            compress,
            export,
            image,
            push,
        } => {
            if export.is_none() && image.is_none() {
                bail!("say where the checkpoint goes: --export FILE or --image REF");
            }
            let mut cd = Cd::connect(&cli.address, &cli.namespace).await?;
            let dir = checkpoint::work_dir(&work, &container)?;
            let r = checkpoint_to(
                &mut cd,
                &container,
                &dump,
                compress,
                export,
                image,
                push,
                cli.plain_http,
                &dir,
                progress,
            )
            .await;
            let _ = std::fs::remove_dir_all(&dir);
            r
        }
        Cmd::Restore {
            import,
            image,
            dir,
            target,
        } => {
            let mut cd = Cd::connect(&cli.address, &cli.namespace).await?;
            let want = restore::Want {
                name: target.name,
                ignore_rootfs: target.ignore_rootfs,
                ignore_volumes: target.ignore_volumes,
                volume_map: target.volume_map,
                runtime: target.runtime,
                plain_http: cli.plain_http,
                log: target.log,
                io_root: work.join("io"),
                trust: target.trust.trust(),
                lazy_pages_from: None,
            };
            let (unpacked, tmp) = match (import, image, dir) {
                (_, _, Some(d)) => (archive::check(&d)?, None),
                (Some(f), _, _) => {
                    let tmp = checkpoint::work_dir(&work, "import")?;
                    match restore::unpack_file(&f, &tmp, progress).await {
                        Ok(u) => (u, Some(tmp)),
                        Err(e) => {
                            let _ = std::fs::remove_dir_all(&tmp);
                            return Err(e.context("nothing was created"));
                        }
                    }
                }
                (None, Some(r), None) => {
                    let tmp = checkpoint::work_dir(&work, "image")?;
                    let p = progress.clone();
                    progress.phase("pull", 0);
                    let got = image::fetch(&cd, &r, cli.plain_http, &tmp, &mut move |n| p.bytes(n))
                        .await
                        .and_then(|_| archive::check(&tmp));
                    match got {
                        Ok(u) => (u, Some(tmp)),
                        Err(e) => {
                            let _ = std::fs::remove_dir_all(&tmp);
                            return Err(
                                e.context(format!("checkpoint image {r}; nothing was created"))
                            );
                        }
                    }
                }
                (None, None, None) => {
                    bail!("say what to restore: --import FILE, --image REF or --dir DIR")
                }
            };
            let r = restore::restore(&mut cd, &unpacked, &want, progress).await;
            if let Some(t) = tmp {
                let _ = std::fs::remove_dir_all(t);
            }
            let r = r?;
            progress.result(
                serde_json::json!({"name": r.name, "pid": r.pid, "restore_ms": r.restore_ms,
                    "log": r.log}),
                &[
                    ("restored".into(), r.name.clone()),
                    ("pid".into(), r.pid.to_string()),
                    ("restore".into(), format!("{:.1} ms", r.restore_ms)),
                    ("output".into(), r.log.display().to_string()),
                ],
            );
            Ok(())
        }
        Cmd::Inspect { checkpoint: what } => {
            let tmp = checkpoint::work_dir(&work, "inspect")?;
            let r = inspect_any(
                &cli.address,
                &cli.namespace,
                &what,
                cli.plain_http,
                &tmp,
                progress,
            )
            .await;
            let _ = std::fs::remove_dir_all(&tmp);
            let (v, t) = r?;
            progress.result(v, &t);
            Ok(())
        }
        Cmd::Migrate {
            container,
            to,
            via,
            image,
            archive,
            compress,
            dump,
            name,
            no_page_server,
            volume_map,
            lazy,
            lazy_port,
            lazy_timeout,
        } => {
            let mut cd = Cd::connect(&cli.address, &cli.namespace).await?;
            let args = migrate::MigrateArgs {
                id: container,
                to,
                via,
                image,
                archive,
                compress,
                plain_http: cli.plain_http,
                checkpoint: dump.want(),
                name,
                volume_map,
                page_server: !no_page_server,
                lazy: lazy.then_some((lazy_port, lazy_timeout)),
            };
            migrate::migrate(&mut cd, args, &work, progress).await
        }
        Cmd::Receive {
            listen,
            once,
            log_dir,
            trust,
        } => {
            let mut cd = Cd::connect(&cli.address, &cli.namespace).await?;
            let args = receive::ReceiveArgs {
                listen,
                once,
                plain_http: cli.plain_http,
                log_dir,
                trust: trust.trust(),
            };
            receive::receive(&mut cd, args, &work, progress).await
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn checkpoint_to(
    cd: &mut Cd,
    container: &str,
    dump: &DumpArgs,
    compress: Compression,
    export: Option<PathBuf>,
    image: Option<String>,
    push: bool,
    plain_http: bool,
    dir: &std::path::Path,
    progress: &Progress,
) -> Result<()> {
    let taken = checkpoint::take(cd, container, &dump.want(), dir, progress).await?;
    let (mut v, mut t) = taken.figures();
    if let Some(file) = &export {
        let n = checkpoint::export(&taken.dir, file, compress, progress)
            .await
            .map_err(|e| state(e, &dump.exit, container))?;
        v["archive"] = file.display().to_string().into();
        v["archive_bytes"] = n.into();
        t.push((
            "archive".into(),
            format!("{} ({})", file.display(), human(n)),
        ));
    }
    if let Some(reference) = &image {
        cd.lease(&format!(
            "container-migrate-{container}-{}",
            progress::wall_ms()
        ))
        .await?;
        progress.phase("image", archive::dir_bytes(&taken.dir));
        let p = progress.clone();
        let mut made = image::create(
            cd,
            &taken.dir,
            reference,
            &taken.own,
            &taken.criu_version(),
            &mut move |n| p.bytes(n),
        )
        .await;
        if made.is_ok() && push {
            progress.phase("push", 0);
            made = image::push(cd, reference, plain_http).await.map(|_| 0);
        }
        cd.end_lease().await;
        made.map_err(|e| state(e, &dump.exit, container))?;
        v["image"] = reference.clone().into();
        t.push((
            "image".into(),
            format!("{reference}{}", if push { " (pushed)" } else { "" }),
        ));
    }
    progress.result(v, &t);
    Ok(())
}

fn state(e: anyhow::Error, exit: &bool, container: &str) -> anyhow::Error {
    if *exit {
        e.context(format!(
            "{container} exited with the checkpoint, which could not be written"
        ))
    } else {
        e.context(format!("{container} runs on"))
    }
}

async fn inspect_any(
    address: &std::path::Path,
    namespace: &str,
    what: &str,
    plain_http: bool,
    tmp: &std::path::Path,
    progress: &Progress,
) -> Result<(serde_json::Value, Vec<(String, String)>)> {
    let path = std::path::Path::new(what);
    let u = if path.exists() {
        if path.is_dir() {
            archive::check(path)?
        } else {
            restore::unpack_file(path, tmp, progress).await?
        }
    } else {
        let cd = Cd::connect(address, namespace)
            .await
            .context("no such file; as an image reference it needs containerd")?;
        let p = progress.clone();
        image::fetch(&cd, what, plain_http, tmp, &mut move |n| p.bytes(n)).await?;
        archive::check(tmp)?
    };
    inspect::describe(&u)
}
