//! `checkpoint`: containerd's Tasks.Checkpoint into a directory of ours,
//! arranged into the ecosystem's archive layout, then exported to a file or
//! built into a checkpoint image and pushed.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use prost::Message;
use prost_types::Any;

use crate::archive::{self, Compression, Own};
use crate::client::{Cd, TASK_PAUSED, TASK_RUNNING};
use crate::progress::{human, Progress};

/// The annotation checkpointctl shows a containerd checkpoint's name from.
const NAME_ANNOTATION: &str = "io.kubernetes.cri.container-name";

/// `containerd.runc.v1.CheckpointOptions`, with this shim's extension field
/// 1001 (`volumes`), which containerd passes to the shim as it is.
#[derive(Clone, PartialEq, Message)]
pub struct CheckpointOptions {
    #[prost(bool, tag = "1")]
    pub exit: bool,
    #[prost(bool, tag = "2")]
    pub open_tcp: bool,
    #[prost(bool, tag = "3")]
    pub external_unix_sockets: bool,
    #[prost(bool, tag = "4")]
    pub terminal: bool,
    #[prost(bool, tag = "5")]
    pub file_locks: bool,
    #[prost(string, repeated, tag = "6")]
    pub empty_namespaces: Vec<String>,
    #[prost(string, tag = "7")]
    pub cgroups_mode: String,
    #[prost(string, tag = "8")]
    pub image_path: String,
    #[prost(string, tag = "9")]
    pub work_path: String,
    #[prost(string, repeated, tag = "1001")]
    pub volumes: Vec<String>,
    /// This shim's extension: `ADDRESS:PORT` of the CRIU page server the pages go to.
    #[prost(string, tag = "1002")]
    pub page_server: String,
    /// This shim's extension: a lazy checkpoint, its pages served from `page_server`'s port.
    #[prost(bool, tag = "1003")]
    pub lazy: bool,
    /// This shim's extension: how long the lazy page server waits for the destination (s).
    #[prost(uint64, tag = "1004")]
    pub lazy_connect_timeout: u64,
    /// This shim's extension: the only IP the lazy page server serves.
    #[prost(string, tag = "1005")]
    pub lazy_peer: String,
}

#[derive(Debug, Clone, Default)]
pub struct Want {
    pub exit: bool,
    pub tcp_established: bool,
    pub file_locks: bool,
    pub ignore_rootfs: bool,
    pub ignore_volumes: bool,
    /// Destinations of the volumes to take; empty: every writable bind mount.
    pub volumes: Vec<String>,
    /// Send the memory pages to this CRIU page server during the dump.
    pub page_server: Option<String>,
    /// Lazy: serve the pages until the destination has them (the call returns before).
    pub lazy: Option<Lazy>,
}

#[derive(Debug, Clone, Default)]
pub struct Lazy {
    /// `ADDRESS:PORT` the page server listens on.
    pub listen: String,
    /// How long it waits for the destination (s).
    pub timeout: u64,
    /// The destination's IP, the only one served.
    pub peer: String,
}

/// A checkpoint arranged in the archive layout in `dir`.
pub struct Taken {
    pub dir: PathBuf,
    pub own: Own,
    pub shim: serde_json::Value,
    pub checkpoint_ms: f64,
    /// When the container stopped making progress (wall clock, ms): the
    /// freeze (or our pause) began.
    pub stopped_at_ms: u64,
}

impl Taken {
    pub fn criu_version(&self) -> String {
        self.shim["criu_version"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// The phase figures and sizes, as `--print-stats` shows them.
    pub fn figures(&self) -> (serde_json::Value, Vec<(String, String)>) {
        let p = &self.shim["phases"];
        let f = |k: &str| p[k].as_f64().unwrap_or(0.0);
        let n = |k: &str| self.shim[k].as_u64().unwrap_or(0);
        let archive_bytes = archive::dir_bytes(&self.dir);
        let v = serde_json::json!({
            "container": self.own.id,
            "checkpoint_ms": self.checkpoint_ms,
            "freeze_ms": f("freeze_ms"), "diff_ms": f("diff_ms"), "dump_ms": f("dump_ms"),
            "thaw_ms": f("thaw_ms"), "shim_total_ms": f("total_ms"),
            "memory_bytes": n("images_bytes").saturating_sub(n("rootfs_diff_bytes") + n("volumes_bytes")),
            "rootfs_diff_bytes": if self.own.rootfs_included { n("rootfs_diff_bytes") } else { 0 },
            "volumes_bytes": n("volumes_bytes"),
            "checkpoint_bytes": archive_bytes,
            "live": self.own.live,
        });
        let t = vec![
            ("container".into(), self.own.id.clone()),
            ("freeze".into(), format!("{:.1} ms", f("freeze_ms"))),
            (
                "rootfs diff + volumes".into(),
                format!("{:.1} ms", f("diff_ms")),
            ),
            ("CRIU dump".into(), format!("{:.1} ms", f("dump_ms"))),
            ("thaw".into(), format!("{:.1} ms", f("thaw_ms"))),
            (
                "checkpoint call".into(),
                format!("{:.1} ms", self.checkpoint_ms),
            ),
            (
                "memory".into(),
                human(v["memory_bytes"].as_u64().unwrap_or(0)),
            ),
            (
                "rootfs diff".into(),
                human(v["rootfs_diff_bytes"].as_u64().unwrap_or(0)),
            ),
            ("volumes".into(), human(n("volumes_bytes"))),
            ("checkpoint size".into(), human(archive_bytes)),
        ];
        (v, t)
    }
}

fn move_up(images: &Path, dir: &Path, name: &str, keep: bool) -> Result<()> {
    let from = images.join(name);
    if !from.exists() {
        return Ok(());
    }
    if keep {
        fs::rename(&from, dir.join(name)).with_context(|| format!("move {}", from.display()))
    } else if from.is_dir() {
        fs::remove_dir_all(&from).with_context(|| format!("remove {}", from.display()))
    } else {
        fs::remove_file(&from).with_context(|| format!("remove {}", from.display()))
    }
}

/// A fresh work directory under `root` for container `id`.
pub fn work_dir(root: &Path, id: &str) -> Result<PathBuf> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    // Checkpoints hold processes' memory: only root reads them.
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(root)
        .with_context(|| format!("create {}", root.display()))?;
    let _ = fs::set_permissions(root, fs::Permissions::from_mode(0o700));
    let dir = root.join(format!(
        "{id}-{}-{}",
        std::process::id(),
        crate::progress::wall_ms()
    ));
    fs::create_dir(&dir).with_context(|| format!("create {}", dir.display()))?;
    Ok(dir)
}

/// Checkpoints container `id` into `dir` (empty, on this host), already
/// paused by the caller when `paused_by_us`.
pub async fn take(
    cd: &Cd,
    id: &str,
    want: &Want,
    dir: &Path,
    progress: &Progress,
) -> Result<Taken> {
    let c = cd.container(id).await?;
    match cd.task_status(id).await? {
        Some(s) if s == TASK_RUNNING || s == TASK_PAUSED => {}
        Some(_) => bail!("container {id} has a task that is not running"),
        None => bail!("container {id} has no task: nothing to checkpoint"),
    }
    let images = dir.join(archive::CHECKPOINT_DIR);
    let volumes = if want.ignore_volumes {
        Vec::new()
    } else if want.volumes.is_empty() {
        vec!["*".to_string()]
    } else {
        want.volumes.clone()
    };
    let opts = CheckpointOptions {
        exit: want.exit,
        open_tcp: want.tcp_established,
        file_locks: want.file_locks,
        image_path: images.display().to_string(),
        // Lazy: CRIU works on after the call; the shim keeps its own work dir.
        work_path: match want.lazy {
            Some(_) => String::new(),
            None => dir.join("criu-work").display().to_string(),
        },
        volumes: volumes.clone(),
        page_server: match &want.lazy {
            Some(l) => l.listen.clone(),
            None => want.page_server.clone().unwrap_or_default(),
        },
        lazy: want.lazy.is_some(),
        lazy_connect_timeout: want.lazy.as_ref().map(|l| l.timeout).unwrap_or(0),
        lazy_peer: want
            .lazy
            .as_ref()
            .map(|l| l.peer.clone())
            .unwrap_or_default(),
        ..Default::default()
    };
    progress.phase("checkpoint", 0);
    let stopped_at_ms = crate::progress::wall_ms();
    let t0 = Instant::now();
    cd.checkpoint(
        id,
        Any {
            type_url: "containerd.runc.v1.CheckpointOptions".into(),
            value: opts.encode_to_vec(),
        },
    )
    .await?;
    let checkpoint_ms = t0.elapsed().as_secs_f64() * 1000.0;
    let _ = fs::remove_dir_all(dir.join("criu-work"));
    let shim: serde_json::Value = fs::read(images.join(archive::SHIM_RECORD))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    if shim.is_null() {
        bail!(
            "container {id} runs on {}, which wrote no {} (not containerd-shim-custom-v2): its rootfs and volumes are not in the checkpoint",
            c.runtime.as_ref().map(|r| r.name.as_str()).unwrap_or("?"),
            archive::SHIM_RECORD
        );
    }
    move_up(&images, dir, archive::ROOTFS_DIFF, !want.ignore_rootfs)?;
    move_up(&images, dir, archive::DELETED_FILES, !want.ignore_rootfs)?;
    move_up(&images, dir, archive::VOLUMES, !want.ignore_volumes)?;
    if images.join(archive::STATS_DUMP).is_file() {
        fs::copy(
            images.join(archive::STATS_DUMP),
            dir.join(archive::STATS_DUMP),
        )?;
    }
    let mut spec: serde_json::Value = c
        .spec
        .as_ref()
        .and_then(|s| serde_json::from_slice(&s.value).ok())
        .unwrap_or_default();
    let mut added_annotations = Vec::new();
    if spec["annotations"][NAME_ANNOTATION].is_null() {
        if !spec["annotations"].is_object() {
            spec["annotations"] = serde_json::json!({});
        }
        spec["annotations"][NAME_ANNOTATION] = id.into();
        added_annotations.push(NAME_ANNOTATION.to_string());
    }
    let created = c
        .created_at
        .as_ref()
        .map(|t| archive::rfc3339(t.seconds.max(0) as u64))
        .unwrap_or_default();
    let config = serde_json::json!({
        "id": id, "name": id,
        "rootfsImage": c.image, "rootfsImageName": c.image,
        "runtime": c.runtime.as_ref().map(|r| r.name.clone()).unwrap_or_default(),
        "createdTime": created,
        "checkpointedTime": archive::now_rfc3339(),
        "restoredTime": "0001-01-01T00:00:00Z",
        "restored": false,
    });
    let opts_any = c.runtime.as_ref().and_then(|r| r.options.clone());
    let own = Own {
        format: archive::FORMAT,
        tool_version: env!("CARGO_PKG_VERSION").into(),
        namespace: cd.namespace().into(),
        id: id.into(),
        image: c.image.clone(),
        labels: c
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect::<BTreeMap<_, _>>(),
        runtime: c
            .runtime
            .as_ref()
            .map(|r| r.name.clone())
            .unwrap_or_default(),
        runtime_options_type: opts_any
            .as_ref()
            .map(|a| a.type_url.clone())
            .unwrap_or_default(),
        runtime_options: opts_any.map(|a| a.value).unwrap_or_default(),
        snapshotter: c.snapshotter.clone(),
        spec_type_url: c
            .spec
            .as_ref()
            .map(|s| s.type_url.clone())
            .unwrap_or_default(),
        live: !want.exit && want.lazy.is_none(),
        rootfs_included: !want.ignore_rootfs,
        volumes: if want.ignore_volumes {
            Vec::new()
        } else {
            volumes
        },
        added_annotations,
        checkpointed_at: archive::now_rfc3339(),
        source_host: hostname(),
    };
    fs::write(
        dir.join(archive::CONFIG_DUMP),
        serde_json::to_vec_pretty(&config)?,
    )?;
    fs::write(
        dir.join(archive::SPEC_DUMP),
        serde_json::to_vec_pretty(&spec)?,
    )?;
    fs::write(dir.join(archive::OWN), serde_json::to_vec_pretty(&own)?)?;
    Ok(Taken {
        dir: dir.to_path_buf(),
        own,
        shim,
        checkpoint_ms,
        stopped_at_ms,
    })
}

pub fn hostname() -> String {
    nix_hostname().unwrap_or_default()
}

fn nix_hostname() -> Option<String> {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates on success.
    let r = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if r != 0 {
        return None;
    }
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    Some(String::from_utf8_lossy(&buf[..end]).into_owned())
}

/// Writes the arranged `dir` as archive `out` (whole or not at all).
pub async fn export(
    dir: &Path,
    out: &Path,
    compression: Compression,
    progress: &Progress,
) -> Result<u64> {
    let total = archive::dir_bytes(dir);
    progress.phase("export", total);
    let tmp = out.with_file_name(format!(
        ".{}.partial",
        out.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    ));
    let (d, t, p) = (dir.to_path_buf(), tmp.clone(), progress.clone());
    let r = tokio::task::spawn_blocking(move || -> Result<u64> {
        let f = fs::File::create(&t).with_context(|| format!("create {}", t.display()))?;
        let w = std::io::BufWriter::with_capacity(1 << 20, f);
        let w = archive::write(&d, w, compression, &mut |n| p.bytes(n))?;
        let f = w.into_inner().map_err(|e| e.into_error())?;
        f.sync_all()?;
        Ok(f.metadata()?.len())
    })
    .await
    .map_err(|e| anyhow::anyhow!("export thread: {e}"))?;
    match r {
        Ok(n) => {
            fs::rename(&tmp, out)
                .with_context(|| format!("move the archive to {}", out.display()))?;
            Ok(n)
        }
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            Err(e.context(format!("write {}", out.display())))
        }
    }
}
