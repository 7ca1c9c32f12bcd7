//! The checkpoint archive, in the layout Podman, CRI-O and containerd's CRI
//! write (and checkpointctl reads):
//!
//! ```text
//! config.dump            the container (checkpointctl's ContainerConfig)
//! spec.dump              its OCI runtime spec
//! container-migrate.json what containerd needs to create it again (labels, runtime, snapshotter)
//! checkpoint/            CRIU's images and the shim's record
//! rootfs-diff.tar        added and changed files of the rootfs
//! deleted.files          paths deleted from the rootfs (JSON list)
//! stats-dump             CRIU's dump statistics
//! volumes/               bind-mounted volumes, when asked for
//! container-migrate.index.json   every file's size and sha256: always the last entry
//! ```
//!
//! Reading an archive is reading input from outside: only plain files and
//! directories with relative, `..`-free names are taken, every byte is
//! checked against the index, and a checkpoint from a newer shim is refused.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub const CONFIG_DUMP: &str = "config.dump";
pub const SPEC_DUMP: &str = "spec.dump";
pub const CHECKPOINT_DIR: &str = "checkpoint";
pub const ROOTFS_DIFF: &str = "rootfs-diff.tar";
pub const DELETED_FILES: &str = "deleted.files";
pub const STATS_DUMP: &str = "stats-dump";
pub const VOLUMES: &str = "volumes";
/// The shim's record inside `checkpoint/`.
pub const SHIM_RECORD: &str = "custom-shim-checkpoint.json";
pub const OWN: &str = "container-migrate.json";
pub const INDEX: &str = "container-migrate.index.json";
/// The archive format this tool writes and the newest it reads.
pub const FORMAT: u32 = 1;

/// What containerd needs to create the container again.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct Own {
    pub format: u32,
    pub tool_version: String,
    pub namespace: String,
    pub id: String,
    pub image: String,
    pub labels: BTreeMap<String, String>,
    pub runtime: String,
    pub runtime_options_type: String,
    pub runtime_options: Vec<u8>,
    pub snapshotter: String,
    pub spec_type_url: String,
    /// Whether the container ran on after the checkpoint.
    pub live: bool,
    pub rootfs_included: bool,
    pub volumes: Vec<String>,
    /// Annotations added to `spec.dump` for other tools' sake (checkpointctl
    /// shows a containerd checkpoint's name from
    /// `io.kubernetes.cri.container-name`); a restore takes them out again.
    #[serde(default)]
    pub added_annotations: Vec<String>,
    pub checkpointed_at: String,
    pub source_host: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Zstd,
    Gzip,
}

impl std::str::FromStr for Compression {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "none" => Ok(Self::None),
            "zstd" => Ok(Self::Zstd),
            "gzip" => Ok(Self::Gzip),
            other => bail!("unknown compression {other:?}: zstd, gzip or none"),
        }
    }
}

#[derive(Debug, Default, Clone, Serialize, Deserialize, PartialEq)]
pub struct FileSum {
    pub size: u64,
    pub sha256: String,
}

/// `path → size, sha256` of every file in the archive.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Index {
    pub format: u32,
    pub files: BTreeMap<String, FileSum>,
}

/// Seconds since the epoch as an RFC 3339 UTC time.
pub fn rfc3339(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

pub fn now_rfc3339() -> String {
    rfc3339(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    )
}

/// The files of an arranged archive directory, in archive order.
fn ordered_files(dir: &Path) -> Result<Vec<(String, bool)>> {
    let mut out = Vec::new();
    for top in [CONFIG_DUMP, SPEC_DUMP, OWN] {
        if dir.join(top).is_file() {
            out.push((top.to_string(), false));
        }
    }
    for sub in [CHECKPOINT_DIR, VOLUMES] {
        if dir.join(sub).is_dir() {
            walk(dir, Path::new(sub), &mut out)?;
        }
        if sub == CHECKPOINT_DIR {
            for f in [ROOTFS_DIFF, DELETED_FILES, STATS_DUMP] {
                if dir.join(f).is_file() {
                    out.push((f.to_string(), false));
                }
            }
        }
    }
    Ok(out)
}

fn walk(root: &Path, rel: &Path, out: &mut Vec<(String, bool)>) -> Result<()> {
    out.push((rel.to_string_lossy().into_owned(), true));
    let mut names: Vec<_> = fs::read_dir(root.join(rel))
        .with_context(|| format!("read {}", root.join(rel).display()))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<io::Result<_>>()?;
    names.sort();
    for n in names {
        let r = rel.join(&n);
        let meta = fs::symlink_metadata(root.join(&r))?;
        if meta.is_dir() {
            walk(root, &r, out)?;
        } else if meta.is_file() {
            out.push((r.to_string_lossy().into_owned(), false));
        } else {
            bail!(
                "{}: only files and directories go into a checkpoint archive",
                root.join(&r).display()
            );
        }
    }
    Ok(())
}

/// Total bytes of the files of an arranged directory.
pub fn dir_bytes(dir: &Path) -> u64 {
    ordered_files(dir)
        .unwrap_or_default()
        .iter()
        .filter(|(_, d)| !d)
        .filter_map(|(p, _)| fs::metadata(dir.join(p)).ok())
        .map(|m| m.len())
        .sum()
}

/// Bytes of CRIU's memory pages (`pages-*.img`) in the images directory `images`.
pub fn pages_bytes(images: &Path) -> u64 {
    fs::read_dir(images)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("pages-"))
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum()
}

/// A reader that hashes and counts what passes through it.
struct Hashing<R> {
    inner: R,
    hash: Sha256,
    n: u64,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let k = self.inner.read(buf)?;
        self.hash.update(&buf[..k]);
        self.n += k as u64;
        Ok(k)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes the arranged directory `dir` as a tar (compressed as asked) to
/// `out`; `progress` gets the bytes of file data written so far.
pub fn write<W: Write>(
    dir: &Path,
    out: W,
    compression: Compression,
    progress: &mut dyn FnMut(u64),
) -> Result<W> {
    match compression {
        Compression::None => write_tar(dir, out, progress),
        Compression::Zstd => {
            let mut enc = zstd::Encoder::new(out, 1)?;
            let _ = enc.multithread(2);
            let enc = write_tar(dir, enc, progress)?;
            Ok(enc.finish()?)
        }
        Compression::Gzip => {
            let enc = flate2::write::GzEncoder::new(out, flate2::Compression::fast());
            Ok(write_tar(dir, enc, progress)?.finish()?)
        }
    }
}

fn write_tar<W: Write>(dir: &Path, out: W, progress: &mut dyn FnMut(u64)) -> Result<W> {
    let mut tar = tar::Builder::new(out);
    tar.mode(tar::HeaderMode::Deterministic);
    let mut index = Index {
        format: FORMAT,
        files: BTreeMap::new(),
    };
    let mut done = 0u64;
    for (rel, is_dir) in ordered_files(dir)? {
        let full = dir.join(&rel);
        let mut h = tar::Header::new_gnu();
        if is_dir {
            h.set_entry_type(tar::EntryType::Directory);
            h.set_mode(0o755);
            h.set_size(0);
            h.set_mtime(0);
            tar.append_data(&mut h, &rel, io::empty())
                .with_context(|| format!("archive {rel}"))?;
            continue;
        }
        let f = File::open(&full).with_context(|| format!("open {}", full.display()))?;
        let size = f.metadata()?.len();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o600);
        h.set_size(size);
        h.set_mtime(0);
        let mut r = Hashing {
            inner: f,
            hash: Sha256::new(),
            n: 0,
        };
        tar.append_data(&mut h, &rel, &mut r)
            .with_context(|| format!("archive {rel}"))?;
        done += r.n;
        progress(done);
        index.files.insert(
            rel,
            FileSum {
                size: r.n,
                sha256: hex(&r.hash.finalize()),
            },
        );
    }
    let body = serde_json::to_vec_pretty(&index)?;
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mode(0o600);
    h.set_size(body.len() as u64);
    h.set_mtime(0);
    tar.append_data(&mut h, INDEX, &body[..])?;
    Ok(tar.into_inner()?)
}

/// Opens `input` with the compression its first bytes say (zstd, gzip or none).
pub fn decompress<'a, R: Read + 'a>(input: R) -> Result<Box<dyn Read + 'a>> {
    let mut r = BufReader::with_capacity(1 << 20, input);
    let head = r.fill_buf().context("read the archive")?;
    if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Ok(Box::new(zstd::Decoder::with_buffer(r)?))
    } else if head.starts_with(&[0x1f, 0x8b]) {
        Ok(Box::new(flate2::bufread::MultiGzDecoder::new(r)))
    } else {
        Ok(Box::new(r))
    }
}

/// Entries an archive may have (CRIU writes a few files per process).
const MAX_ENTRIES: usize = 1_000_000;

/// Directories only root reads: they hold a process's memory.
fn create_private_dirs(p: &Path) -> Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(p)
        .with_context(|| format!("create {}", p.display()))
}

/// A relative name with no `..`, no root and no empty parts.
fn safe_name(name: &Path) -> Result<PathBuf> {
    let mut out = PathBuf::new();
    for c in name.components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::CurDir => {}
            _ => bail!("entry {} leaves the archive directory", name.display()),
        }
    }
    if out.as_os_str().is_empty() {
        bail!("entry with an empty name");
    }
    Ok(out)
}

/// Unpacks an archive (any compression) into the empty directory `dest`.
/// `progress` gets the bytes of file data read so far. Returns the index
/// when the archive has one (ours always do).
pub fn extract<R: Read>(
    input: R,
    dest: &Path,
    progress: &mut dyn FnMut(u64),
) -> Result<Option<Index>> {
    let mut tar = tar::Archive::new(decompress(input)?);
    let mut seen: BTreeMap<String, FileSum> = BTreeMap::new();
    let mut index: Option<Index> = None;
    let mut done = 0u64;
    let mut entries_seen = 0usize;
    let entries = tar.entries().context("read the archive")?;
    for entry in entries {
        let mut entry = entry.context("read the archive (corrupt or truncated)")?;
        entries_seen += 1;
        if entries_seen > MAX_ENTRIES {
            bail!("the archive has more than {MAX_ENTRIES} entries");
        }
        let raw = std::str::from_utf8(&entry.path_bytes())
            .map(PathBuf::from)
            .map_err(|_| anyhow!("an entry name is not UTF-8"))?;
        let rel = safe_name(&raw)?;
        let key = rel.to_string_lossy().into_owned();
        if index.is_some() {
            bail!("entry {key} after the archive's index: not an archive this tool wrote");
        }
        let kind = entry.header().entry_type();
        let target = dest.join(&rel);
        match kind {
            tar::EntryType::Directory => {
                create_private_dirs(&target)?;
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                if key == INDEX {
                    let mut body = Vec::new();
                    entry.take(64 << 20).read_to_end(&mut body)?;
                    index = Some(
                        serde_json::from_slice(&body)
                            .with_context(|| format!("{INDEX} is not valid"))?,
                    );
                    continue;
                }
                if let Some(parent) = target.parent() {
                    create_private_dirs(parent)?;
                }
                // create_new: an entry never replaces another (nor follows anything).
                let mut out = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&target)
                    .with_context(|| {
                        format!("create {} (twice in the archive?)", target.display())
                    })?;
                let mut r = Hashing {
                    inner: &mut entry,
                    hash: Sha256::new(),
                    n: 0,
                };
                let mut buf = vec![0u8; 1 << 20];
                loop {
                    let k = r
                        .read(&mut buf)
                        .with_context(|| format!("read {key} from the archive (truncated?)"))?;
                    if k == 0 {
                        break;
                    }
                    out.write_all(&buf[..k])
                        .with_context(|| format!("write {}", target.display()))?;
                    done += k as u64;
                    progress(done);
                }
                seen.insert(
                    key,
                    FileSum {
                        size: r.n,
                        sha256: hex(&r.hash.finalize()),
                    },
                );
            }
            tar::EntryType::XGlobalHeader | tar::EntryType::XHeader => {}
            other => bail!(
                "entry {key} is a {other:?}: a checkpoint archive holds only files and directories"
            ),
        }
    }
    let ours = dest.join(OWN).is_file();
    match &index {
        Some(ix) => {
            for (k, want) in &ix.files {
                match seen.get(k) {
                    None => bail!("the archive lacks {k}, which its index lists (truncated?)"),
                    Some(got) if got != want => bail!(
                        "{k} does not match the archive's index: {} bytes, sha256 {} instead of {} bytes, sha256 {} (corrupted)",
                        got.size, got.sha256, want.size, want.sha256
                    ),
                    Some(_) => {}
                }
            }
            if let Some(extra) = seen.keys().find(|k| !ix.files.contains_key(*k)) {
                bail!("{extra} is in the archive but not in its index");
            }
        }
        None if ours => bail!("the archive ends before its index ({INDEX}): it is truncated"),
        None => {}
    }
    Ok(index)
}

/// What a restore needs from an unpacked archive, checked before anything
/// is created on the destination.
pub struct Unpacked {
    pub dir: PathBuf,
    pub config: serde_json::Value,
    pub spec: serde_json::Value,
    pub own: Option<Own>,
    pub shim: Option<serde_json::Value>,
}

fn read_json(dir: &Path, name: &str) -> Result<serde_json::Value> {
    let p = dir.join(name);
    let b = fs::read(&p).with_context(|| format!("the archive has no {name}"))?;
    serde_json::from_slice(&b).with_context(|| format!("{name} is not valid JSON"))
}

fn version(v: &str) -> Option<(u64, u64, u64)> {
    let mut it = v.split(['.', '-', '+']).map(|p| p.parse::<u64>());
    Some((it.next()?.ok()?, it.next()?.ok()?, it.next()?.ok()?))
}

/// True when version `theirs` is newer than `ours` (both `x.y.z`).
pub fn newer(theirs: &str, ours: &str) -> bool {
    matches!((version(theirs), version(ours)), (Some(t), Some(o)) if t > o)
}

pub fn check(dir: &Path) -> Result<Unpacked> {
    let config = read_json(dir, CONFIG_DUMP)?;
    let spec = read_json(dir, SPEC_DUMP)?;
    let own: Option<Own> = match dir.join(OWN).is_file() {
        true => Some(
            serde_json::from_value(read_json(dir, OWN)?)
                .with_context(|| format!("{OWN} is not valid"))?,
        ),
        false => None,
    };
    if let Some(o) = &own {
        if o.format > FORMAT {
            bail!(
                "the archive is in format {} (this container-migrate {} reads up to {FORMAT}): update container-migrate",
                o.format,
                env!("CARGO_PKG_VERSION")
            );
        }
    }
    // Files the shim would take from `checkpoint/` itself (its own layout) are not where this
    // layout puts them: an archive with them there would escape --ignore-rootfs/--ignore-volumes.
    for f in [ROOTFS_DIFF, DELETED_FILES, VOLUMES] {
        if fs::symlink_metadata(dir.join(CHECKPOINT_DIR).join(f)).is_ok() {
            bail!("the archive has {CHECKPOINT_DIR}/{f}: not where this layout puts it");
        }
    }
    if !dir.join(CHECKPOINT_DIR).join("inventory.img").is_file() {
        bail!("the archive has no CRIU images ({CHECKPOINT_DIR}/inventory.img is missing)");
    }
    let shim = dir
        .join(CHECKPOINT_DIR)
        .join(SHIM_RECORD)
        .is_file()
        .then(|| read_json(&dir.join(CHECKPOINT_DIR), SHIM_RECORD))
        .transpose()?;
    if let Some(v) = shim.as_ref().and_then(|s| s["shim_version"].as_str()) {
        let ours = env!("CARGO_PKG_VERSION");
        if newer(v, ours) {
            bail!(
                "the checkpoint was taken by containerd-shim-custom-v2 {v}, newer than this {ours}: its images may use what this version does not know; restore it with {v} or later"
            );
        }
    }
    if spec["process"].is_null() || spec["root"].is_null() {
        return Err(anyhow!(
            "{SPEC_DUMP} is no OCI runtime spec (no process or root)"
        ));
    }
    Ok(Unpacked {
        dir: dir.to_path_buf(),
        config,
        spec,
        own,
        shim,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(dir: &Path) {
        fs::create_dir_all(dir.join("checkpoint")).unwrap();
        fs::write(dir.join(CONFIG_DUMP), br#"{"id":"a","name":"a"}"#).unwrap();
        fs::write(dir.join(SPEC_DUMP), br#"{"process":{},"root":{}}"#).unwrap();
        fs::write(
            dir.join(OWN),
            serde_json::to_vec(&Own {
                format: 1,
                ..Default::default()
            })
            .unwrap(),
        )
        .unwrap();
        fs::write(dir.join("checkpoint/inventory.img"), vec![7u8; 5000]).unwrap();
        fs::write(dir.join(ROOTFS_DIFF), vec![1u8; 3000]).unwrap();
    }

    fn archive(c: Compression) -> (tempfile::TempDir, Vec<u8>) {
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("src");
        sample(&src);
        let out = write(&src, Vec::new(), c, &mut |_| {}).unwrap();
        (t, out)
    }

    #[test]
    fn round_trip_in_every_compression() {
        for c in [Compression::None, Compression::Zstd, Compression::Gzip] {
            let (t, bytes) = archive(c);
            let dest = t.path().join("dest");
            fs::create_dir(&dest).unwrap();
            let ix = extract(&bytes[..], &dest, &mut |_| {}).unwrap().unwrap();
            assert_eq!(ix.files.len(), 5);
            assert_eq!(fs::read(dest.join(ROOTFS_DIFF)).unwrap(), vec![1u8; 3000]);
            check(&dest).unwrap();
        }
    }

    #[test]
    fn truncated_and_corrupted_archives_are_refused() {
        let (t, bytes) = archive(Compression::None);
        for cut in [bytes.len() - 2048, bytes.len() / 2, 700] {
            let dest = t.path().join(format!("cut{cut}"));
            fs::create_dir(&dest).unwrap();
            assert!(
                extract(&bytes[..cut], &dest, &mut |_| {}).is_err(),
                "cut at {cut}"
            );
        }
        // One byte of file data flipped: the tar headers are fine, the index is not.
        let mut bad = bytes.clone();
        let at = bad.windows(4).position(|w| w == [7, 7, 7, 7]).unwrap() + 10;
        bad[at] ^= 0xff;
        let dest = t.path().join("flip");
        fs::create_dir(&dest).unwrap();
        let e = extract(&bad[..], &dest, &mut |_| {})
            .unwrap_err()
            .to_string();
        assert!(e.contains("does not match"), "{e}");
        // A zstd archive cut short.
        let (t, z) = archive(Compression::Zstd);
        let dest = t.path().join("z");
        fs::create_dir(&dest).unwrap();
        assert!(extract(&z[..z.len() - 20], &dest, &mut |_| {}).is_err());
    }

    #[test]
    fn hostile_entries_are_refused() {
        for (name, kind) in [
            ("../escape", tar::EntryType::Regular),
            ("/abs", tar::EntryType::Regular),
            ("checkpoint/link", tar::EntryType::Symlink),
            ("checkpoint/hard", tar::EntryType::Link),
            ("dev", tar::EntryType::Char),
        ] {
            let t = tempfile::tempdir().unwrap();
            let mut b = tar::Builder::new(Vec::new());
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(kind);
            h.set_size(0);
            h.set_mode(0o644);
            // set_path refuses `..`: write the raw name.
            let raw = &mut h.as_old_mut().name;
            raw[..name.len()].copy_from_slice(name.as_bytes());
            if kind.is_symlink() || kind.is_hard_link() {
                h.set_link_name("/etc/passwd").unwrap();
            }
            h.set_cksum();
            b.append(&h, io::empty()).unwrap();
            let bytes = b.into_inner().unwrap();
            assert!(
                extract(&bytes[..], t.path(), &mut |_| {}).is_err(),
                "{name}"
            );
            assert!(!t.path().parent().unwrap().join("escape").exists());
        }
    }

    #[test]
    fn newer_shim_versions() {
        assert!(newer("0.2.0", "0.1.0"));
        assert!(newer("1.0.0", "0.9.9"));
        assert!(!newer("0.1.0", "0.1.0"));
        assert!(!newer("garbage", "0.1.0"));
    }

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_796_036_400), "2026-11-30T11:00:00Z");
    }
}
