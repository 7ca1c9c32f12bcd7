//! `restore`: an unpacked, checked archive becomes a container again: the
//! base image (pulled when missing), a fresh snapshot, the container record
//! with its labels, and a task created from the images (files at Create,
//! memory at Start, both by the shim). Any failure removes what was made.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use containerd_client::services::v1::{container::Runtime, Container, CreateTaskRequest};
use prost::Message;
use prost_types::Any;

use crate::archive::{self, Unpacked};
use crate::client::Cd;
use crate::image;
use crate::progress::{wall_ms, Progress};
use crate::trust::{self, Trust};

pub const RUNC_OPTIONS: &str = "containerd.runc.v1.Options";

/// `criu_image_path` of `containerd.runc.v1.Options`, on its own.
#[derive(Clone, PartialEq, Message)]
struct CriuImagePath {
    #[prost(string, tag = "10")]
    criu_image_path: String,
    /// The shim's extension: `ADDRESS:PORT` of a lazy checkpoint's page server.
    #[prost(string, tag = "1001")]
    lazy_pages_from: String,
}

#[derive(Debug, Clone, Default)]
pub struct Want {
    pub name: Option<String>,
    pub ignore_rootfs: bool,
    pub ignore_volumes: bool,
    /// `destination → host path` for the new container's bind mounts.
    pub volume_map: Vec<(String, PathBuf)>,
    pub runtime: Option<String>,
    pub plain_http: bool,
    /// Where the task's stdout and stderr go; none: `<io_root>/<ns>/<name>/output.log`.
    pub log: Option<PathBuf>,
    /// Where restored tasks get their stdin fifo (and default log).
    pub io_root: PathBuf,
    /// What of the archive's spec may act on this host (see `trust`).
    pub trust: Trust,
    /// Lazy: the memory pages come from this `ADDRESS:PORT` (the source's page server).
    pub lazy_pages_from: Option<String>,
}

pub struct Restored {
    pub name: String,
    pub pid: u32,
    pub restore_ms: f64,
    /// Of it, the task's Start: CRIU's restore of the memory.
    pub start_ms: f64,
    /// When the restored task was started (wall clock, ms).
    pub started_at_ms: u64,
    /// Its stdout and stderr.
    pub log: PathBuf,
}

fn name_of(u: &Unpacked, want: &Want) -> Result<String> {
    let name = want
        .name
        .clone()
        .or_else(|| u.own.as_ref().map(|o| o.id.clone()))
        .or_else(|| u.config["name"].as_str().map(String::from))
        .ok_or_else(|| anyhow!("the archive names no container: say --name"))?;
    if !trust::is_identifier(&name) {
        bail!("{name:?} is not a container name containerd takes");
    }
    Ok(name)
}

/// The spec for the new container: its own cgroup, the mapped volumes.
fn new_spec(u: &Unpacked, name: &str, ns: &str, want: &Want) -> Result<serde_json::Value> {
    let mut spec = u.spec.clone();
    for a in u.own.iter().flat_map(|o| &o.added_annotations) {
        if let Some(m) = spec["annotations"].as_object_mut() {
            m.remove(a);
        }
    }
    trust::sanitize_spec(&mut spec, ns, name);
    for (dest, src) in &want.volume_map {
        let mut found = false;
        for m in spec["mounts"].as_array_mut().into_iter().flatten() {
            if m["destination"].as_str().map(|d| d.trim_end_matches('/'))
                == Some(dest.trim_end_matches('/'))
            {
                m["source"] = src.display().to_string().into();
                found = true;
            }
        }
        if !found {
            bail!("--volume {dest}=…: the container has no mount at {dest}");
        }
        if !src.is_dir() {
            bail!(
                "--volume {dest}={}: no such directory on this host",
                src.display()
            );
        }
    }
    Ok(spec)
}

/// Refuses what of `spec` would act on this host outside the container (`trust`).
pub fn guard(spec: &serde_json::Value, want: &Want) -> Result<()> {
    let mapped: Vec<PathBuf> = want
        .volume_map
        .iter()
        .filter_map(|(_, p)| trust::plain_abs(p))
        .collect();
    trust::check_spec(spec, &want.trust, &mapped)
}

/// Task options: `criu_image_path` only (the archive's runtime options are not taken: a
/// `BinaryName` there would be run as runc).
fn task_options(images: &Path, lazy_pages_from: Option<&str>) -> Any {
    Any {
        type_url: RUNC_OPTIONS.into(),
        value: CriuImagePath {
            criu_image_path: images.display().to_string(),
            lazy_pages_from: lazy_pages_from.unwrap_or_default().to_string(),
        }
        .encode_to_vec(),
    }
}

/// Restores the checked archive in `u.dir` on `cd`.
pub async fn restore(
    cd: &mut Cd,
    u: &Unpacked,
    want: &Want,
    progress: &Progress,
) -> Result<Restored> {
    let t0 = Instant::now();
    let name = name_of(u, want)?;
    if cd.container_exists(&name).await? {
        bail!(
            "a container named {name} exists already in {}: say --name",
            cd.describe()
        );
    }
    let base = u
        .own
        .as_ref()
        .map(|o| o.image.clone())
        .or_else(|| u.config["rootfsImageName"].as_str().map(String::from))
        .unwrap_or_default();
    let snapshotter = u
        .own
        .as_ref()
        .map(|o| o.snapshotter.clone())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "overlayfs".into());
    let runtime = want
        .runtime
        .clone()
        .or_else(|| {
            u.own
                .as_ref()
                .map(|o| o.runtime.clone())
                .filter(|r| !r.is_empty())
        })
        .unwrap_or_else(|| "io.containerd.custom.v2".into());
    trust::plain_name("runtime", &runtime)?;
    trust::plain_name("snapshotter", &snapshotter)?;
    let spec = new_spec(u, &name, cd.namespace(), want)?;
    guard(&spec, want)?;
    progress.phase("base image", 0);
    let chain = image::ensure_base(cd, &base, &snapshotter, want.plain_http).await?;
    if want.ignore_rootfs {
        for f in [archive::ROOTFS_DIFF, archive::DELETED_FILES] {
            let _ = std::fs::remove_file(u.dir.join(f));
        }
    }
    if want.ignore_volumes {
        let _ = std::fs::remove_dir_all(u.dir.join(archive::VOLUMES));
    }
    progress.phase("restore", 0);
    cd.lease(&format!("container-migrate-{name}-{}", wall_ms()))
        .await?;
    let (stdin, log) = task_io(&want.io_root, cd.namespace(), &name, want.log.as_deref())?;
    let made = create(
        cd,
        u,
        &name,
        &base,
        &snapshotter,
        &chain,
        &runtime,
        spec,
        (&stdin, &log),
        want.lazy_pages_from.as_deref(),
    )
    .await;
    cd.end_lease().await;
    let (pid, start_ms) = match made {
        Ok(x) => x,
        Err(e) => {
            let undo = undo(cd, &name, &snapshotter).await;
            if let Some(dir) = stdin.parent() {
                let _ = std::fs::remove_dir_all(dir);
            }
            return Err(match undo {
                Ok(()) => e.context(format!("nothing of {name} was left on {}", cd.describe())),
                Err(u2) => e.context(format!(
                    "and removing what was made of {name} failed too: {u2:#}"
                )),
            });
        }
    };
    Ok(Restored {
        name,
        pid,
        restore_ms: t0.elapsed().as_secs_f64() * 1000.0,
        start_ms,
        started_at_ms: wall_ms(),
        log,
    })
}

#[allow(clippy::too_many_arguments)]
async fn create(
    cd: &Cd,
    u: &Unpacked,
    name: &str,
    base: &str,
    snapshotter: &str,
    chain: &str,
    runtime: &str,
    spec: serde_json::Value,
    (stdin, log): (&Path, &Path),
    lazy_pages_from: Option<&str>,
) -> Result<(u32, f64)> {
    let mounts = cd.prepare_snapshot(snapshotter, name, chain).await?;
    let own = u.own.clone().unwrap_or_default();
    let spec_type = "types.containerd.io/opencontainers/runtime-spec/1/Spec".to_string();
    let labels = trust::labels(&own.labels);
    cd.create_container(Container {
        id: name.to_string(),
        labels,
        image: base.to_string(),
        runtime: Some(Runtime {
            name: runtime.to_string(),
            options: None,
        }),
        spec: Some(Any {
            type_url: spec_type,
            value: serde_json::to_vec(&spec)?,
        }),
        snapshotter: snapshotter.to_string(),
        snapshot_key: name.to_string(),
        ..Default::default()
    })
    .await?;
    let log = format!("file://{}", log.display());
    let images = u.dir.join(archive::CHECKPOINT_DIR);
    cd.create_task(CreateTaskRequest {
        container_id: name.to_string(),
        rootfs: mounts,
        stdin: stdin.display().to_string(),
        stdout: log.clone(),
        stderr: log,
        options: Some(task_options(&images, lazy_pages_from)),
        ..Default::default()
    })
    .await
    .context("the shim could not create the task from the checkpoint")?;
    let t = Instant::now();
    let pid = cd
        .start(name)
        .await
        .context("the shim could not restore the processes")?;
    Ok((pid, t.elapsed().as_secs_f64() * 1000.0))
}

async fn undo(cd: &Cd, name: &str, snapshotter: &str) -> Result<()> {
    cd.remove_task(name).await?;
    cd.delete_container(name).await?;
    cd.remove_snapshot(snapshotter, name).await
}

/// The restored task's stdin, a fifo the shim holds open (a process reading
/// its stdin waits, as it did before the checkpoint, instead of reading
/// EOF), and its log file.
pub fn task_io(
    root: &Path,
    ns: &str,
    name: &str,
    log: Option<&Path>,
) -> Result<(PathBuf, PathBuf)> {
    let dir = root.join(ns).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let stdin = dir.join("stdin");
    let c = std::ffi::CString::new(stdin.as_os_str().as_encoded_bytes())?;
    // SAFETY: a valid NUL-terminated path.
    if unsafe { libc::mkfifo(c.as_ptr(), 0o600) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("mkfifo {}", stdin.display()));
    }
    let log = log
        .map(Path::to_path_buf)
        .unwrap_or_else(|| dir.join("output.log"));
    Ok((stdin, log))
}

/// Unpacks archive file `file` into `dir` and checks it.
pub async fn unpack_file(file: &Path, dir: &Path, progress: &Progress) -> Result<Unpacked> {
    let total = std::fs::metadata(file)
        .with_context(|| format!("archive {}", file.display()))?
        .len();
    progress.phase("unpack", total);
    let (f, d, p) = (file.to_path_buf(), dir.to_path_buf(), progress.clone());
    tokio::task::spawn_blocking(move || -> Result<Unpacked> {
        let input = std::fs::File::open(&f).with_context(|| format!("open {}", f.display()))?;
        archive::extract(input, &d, &mut |n| p.bytes(n))
            .with_context(|| format!("archive {}", f.display()))?;
        archive::check(&d).with_context(|| format!("archive {}", f.display()))
    })
    .await
    .map_err(|e| anyhow!("unpack thread: {e}"))?
}
