//! Checkpoint images (one layer: the archive's files, the `org.criu.checkpoint.*`
//! annotations checkpointctl and containerd's CRI look for), pushed and pulled
//! with containerd's own Transfer service; and the base image a restore needs.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use containerd_client::types::transfer::{
    ImageStore, OciRegistry, RegistryResolver, UnpackConfiguration,
};
use containerd_client::types::{Descriptor, Platform};
use sha2::{Digest, Sha256};

use crate::archive::{self, Own};
use crate::client::Cd;

pub const MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
pub const NAME_ANNOTATION: &str = "org.criu.checkpoint.container.name";

fn registry(reference: &str, plain_http: bool) -> OciRegistry {
    OciRegistry {
        reference: reference.to_string(),
        resolver: Some(RegistryResolver {
            default_scheme: if plain_http {
                "http".into()
            } else {
                String::new()
            },
            ..Default::default()
        }),
    }
}

fn platform() -> Platform {
    Platform {
        os: "linux".into(),
        architecture: std::env::consts::ARCH
            .replace("x86_64", "amd64")
            .replace("aarch64", "arm64"),
        ..Default::default()
    }
}

/// A writer that sends what it gets down a channel in 1 MiB chunks, hashing it.
struct ChanWriter {
    tx: tokio::sync::mpsc::Sender<Vec<u8>>,
    buf: Vec<u8>,
    hash: Sha256,
    n: u64,
}

impl Write for ChanWriter {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(b);
        self.hash.update(b);
        self.n += b.len() as u64;
        if self.buf.len() >= 1 << 20 {
            self.flush()?;
        }
        Ok(b.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            let chunk = std::mem::take(&mut self.buf);
            self.tx.blocking_send(chunk).map_err(|_| {
                io::Error::new(io::ErrorKind::BrokenPipe, "containerd stopped reading")
            })?;
        }
        Ok(())
    }
}

/// A reader fed by a channel of chunks.
pub struct ChanReader {
    pub rx: tokio::sync::mpsc::Receiver<Vec<u8>>,
    pub buf: Vec<u8>,
    pub pos: usize,
}

impl Read for ChanReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.buf.len() {
            match self.rx.blocking_recv() {
                Some(b) => {
                    self.buf = b;
                    self.pos = 0;
                }
                None => return Ok(0),
            }
        }
        let k = out.len().min(self.buf.len() - self.pos);
        out[..k].copy_from_slice(&self.buf[self.pos..self.pos + k]);
        self.pos += k;
        Ok(k)
    }
}

fn labels(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Builds checkpoint image `reference` from the arranged directory `dir` in
/// containerd's image store (under the client's lease). Returns the layer size.
pub async fn create(
    cd: &Cd,
    dir: &Path,
    reference: &str,
    own: &Own,
    criu_version: &str,
    progress: &mut (dyn FnMut(u64) + Send),
) -> Result<u64> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Vec<u8>>(8);
    let d = dir.to_path_buf();
    // The tar is written in a thread while containerd takes it in.
    let (ptx, mut prx) = tokio::sync::mpsc::unbounded_channel::<u64>();
    let writer = tokio::task::spawn_blocking(move || -> Result<(String, u64)> {
        let w = ChanWriter {
            tx,
            buf: Vec::new(),
            hash: Sha256::new(),
            n: 0,
        };
        let mut w = archive::write(&d, w, archive::Compression::None, &mut |n| {
            let _ = ptx.send(n);
        })?;
        w.flush()?;
        let digest = format!("sha256:{}", hex(&w.hash.clone().finalize()));
        Ok((digest, w.n))
    });
    let layer_ref = format!("checkpoint-layer-{}", own.id);
    let write = cd.write_content(&layer_ref, rx, HashMap::new());
    tokio::pin!(write);
    let layer_digest = loop {
        tokio::select! {
            r = &mut write => break r?,
            Some(n) = prx.recv() => progress(n),
        }
    };
    let (digest, size) = writer.await.map_err(|e| anyhow!("archive thread: {e}"))??;
    if digest != layer_digest {
        bail!("containerd stored the layer as {layer_digest}, not {digest}");
    }
    let config = serde_json::json!({
        "architecture": platform().architecture, "os": "linux",
        "created": archive::now_rfc3339(),
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": [digest]},
    });
    let config = serde_json::to_vec(&config)?;
    let config_size = config.len();
    let config_digest = cd
        .write_blob(
            &format!("checkpoint-config-{}", own.id),
            config,
            HashMap::new(),
        )
        .await?;
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST,
        "config": {"mediaType": CONFIG, "digest": config_digest, "size": config_size},
        "layers": [{"mediaType": LAYER, "digest": digest, "size": size}],
        "annotations": {
            NAME_ANNOTATION: own.id,
            "org.criu.checkpoint.engine.name": "containerd-shim-custom-v2",
            "org.criu.checkpoint.engine.version": own.tool_version,
            "org.criu.checkpoint.rootfsImageName": own.image,
            "org.criu.checkpoint.runtime.name": own.runtime,
            "org.criu.checkpoint.criu.version": criu_version,
            "org.criu.checkpoint.host.arch": std::env::consts::ARCH,
        },
    });
    let manifest = serde_json::to_vec(&manifest)?;
    let manifest_size = manifest.len() as i64;
    let manifest_digest = cd
        .write_blob(
            &format!("checkpoint-manifest-{}", own.id),
            manifest,
            labels(&[
                ("containerd.io/gc.ref.content.config", &config_digest),
                ("containerd.io/gc.ref.content.l.0", &digest),
            ]),
        )
        .await?;
    cd.put_image(
        reference,
        Descriptor {
            media_type: MANIFEST.into(),
            digest: manifest_digest,
            size: manifest_size,
            annotations: HashMap::new(),
        },
    )
    .await?;
    Ok(size)
}

pub async fn push(cd: &Cd, reference: &str, plain_http: bool) -> Result<()> {
    cd.transfer(
        containerd_client::to_any(&ImageStore {
            name: reference.to_string(),
            ..Default::default()
        }),
        containerd_client::to_any(&registry(reference, plain_http)),
        &format!("push {reference}"),
    )
    .await
}

/// Pulls `reference` into the image store; unpacked for `snapshotter` when given.
pub async fn pull(cd: &Cd, reference: &str, plain_http: bool, unpack: Option<&str>) -> Result<()> {
    let store = ImageStore {
        name: reference.to_string(),
        platforms: vec![platform()],
        unpacks: unpack
            .map(|s| {
                vec![UnpackConfiguration {
                    platform: Some(platform()),
                    snapshotter: s.to_string(),
                }]
            })
            .unwrap_or_default(),
        ..Default::default()
    };
    cd.transfer(
        containerd_client::to_any(&registry(reference, plain_http)),
        containerd_client::to_any(&store),
        &format!("pull {reference}"),
    )
    .await
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The manifest of image `name` for this platform: (manifest JSON).
async fn manifest_of(cd: &Cd, name: &str) -> Result<serde_json::Value> {
    let img = cd
        .image(name)
        .await?
        .ok_or_else(|| anyhow!("no image {name} in {}", cd.describe()))?;
    let target = img
        .target
        .ok_or_else(|| anyhow!("image {name} has no target"))?;
    let mut blob: serde_json::Value = serde_json::from_slice(&cd.read_blob(&target.digest).await?)
        .with_context(|| format!("the target of image {name} is not JSON"))?;
    if target.media_type == INDEX || target.media_type == DOCKER_LIST {
        let want = platform().architecture;
        let m = blob["manifests"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|m| m["platform"]["architecture"] == want.as_str() || m["platform"].is_null())
            .ok_or_else(|| anyhow!("image {name} has no manifest for linux/{want}"))?;
        let digest = m["digest"].as_str().unwrap_or_default().to_string();
        blob = serde_json::from_slice(&cd.read_blob(&digest).await?)
            .with_context(|| format!("manifest {digest} of {name} is not JSON"))?;
    }
    Ok(blob)
}

/// The snapshot chain ID of image `name`'s layers (its unpacked top snapshot).
async fn chain_id(cd: &Cd, name: &str) -> Result<String> {
    let manifest = manifest_of(cd, name).await?;
    let cfg_digest = manifest["config"]["digest"]
        .as_str()
        .ok_or_else(|| anyhow!("image {name}: manifest without config"))?;
    let config: serde_json::Value = serde_json::from_slice(&cd.read_blob(cfg_digest).await?)
        .with_context(|| format!("image {name}: config is not JSON"))?;
    let mut chain: Option<String> = None;
    for d in config["rootfs"]["diff_ids"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let d = d.as_str().unwrap_or_default();
        chain = Some(match chain {
            None => d.to_string(),
            Some(c) => format!(
                "sha256:{}",
                hex(&Sha256::digest(format!("{c} {d}").as_bytes()))
            ),
        });
    }
    chain.ok_or_else(|| anyhow!("image {name} has no layers"))
}

/// Makes sure base image `name` is on this host and unpacked for
/// `snapshotter`, pulling it if it is not; returns its chain ID.
pub async fn ensure_base(
    cd: &Cd,
    name: &str,
    snapshotter: &str,
    plain_http: bool,
) -> Result<String> {
    if name.is_empty() {
        bail!("the checkpoint names no base image");
    }
    if cd.image(name).await?.is_none() {
        pull(cd, name, plain_http, Some(snapshotter))
            .await
            .with_context(|| {
                format!(
                    "base image {name} is not on this host ({}) and could not be pulled",
                    cd.describe()
                )
            })?;
    }
    let chain = chain_id(cd, name).await?;
    if !cd.snapshot_exists(snapshotter, &chain).await? {
        pull(cd, name, plain_http, Some(snapshotter))
            .await
            .with_context(|| format!("unpack base image {name} for {snapshotter}"))?;
    }
    Ok(chain)
}

/// Pulls checkpoint image `reference` (if it is not here) and unpacks its
/// layer into the empty directory `dest`.
pub async fn fetch(
    cd: &Cd,
    reference: &str,
    plain_http: bool,
    dest: &Path,
    progress: &mut (dyn FnMut(u64) + Send),
) -> Result<()> {
    if cd.image(reference).await?.is_none() {
        pull(cd, reference, plain_http, None).await?;
    }
    let manifest = manifest_of(cd, reference).await?;
    if manifest["annotations"][NAME_ANNOTATION].as_str().is_none() {
        bail!("{reference} is no checkpoint image (no {NAME_ANNOTATION} annotation)");
    }
    let layers = manifest["layers"].as_array().cloned().unwrap_or_default();
    let [layer] = &layers[..] else {
        bail!(
            "checkpoint image {reference} has {} layers, not one",
            layers.len()
        );
    };
    let digest = layer["digest"].as_str().unwrap_or_default().to_string();
    let (tx, rx) = tokio::sync::mpsc::channel::<Vec<u8>>(8);
    let (ptx, mut prx) = tokio::sync::mpsc::unbounded_channel::<u64>();
    let d = dest.to_path_buf();
    let unpack = tokio::task::spawn_blocking(move || {
        let r = ChanReader {
            rx,
            buf: Vec::new(),
            pos: 0,
        };
        archive::extract(r, &d, &mut |n| {
            let _ = ptx.send(n);
        })
    });
    let read = cd.read_content_into(&digest, tx);
    tokio::pin!(read);
    let read_result = loop {
        tokio::select! {
            r = &mut read => break r,
            Some(n) = prx.recv() => progress(n),
        }
    };
    let unpacked = unpack.await.map_err(|e| anyhow!("unpack thread: {e}"))?;
    while let Ok(n) = prx.try_recv() {
        progress(n);
    }
    // A failed read explains a failed unpack better than the unpacker does.
    read_result?;
    unpacked.map(|_| ())
}
