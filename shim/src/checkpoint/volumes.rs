//! Bind-mounted volumes: captured in the freeze that holds the dump (when the
//! checkpoint options ask for them), applied at a restore into the new
//! container's bind-mount sources with the same hostile-input rules as the
//! rootfs diff.
//!
//! Layout: `volumes/volumes.json` lists `{destination, dir, bytes, entries}`;
//! `volumes/<dir>/rootfs-diff.tar` holds the volume's files.

use std::{
    fs,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use super::rootfs_diff::{self, DiffStats, Overlay};
use crate::error::{Error, Result};

pub const DIR: &str = "volumes";
pub const INDEX: &str = "volumes.json";
/// In the checkpoint options' `volumes`: every writable bind mount of a directory.
pub const ALL: &str = "*";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Entry {
    /// Where the volume is mounted in the container.
    pub destination: String,
    /// Its directory under `volumes/`.
    pub dir: String,
    pub bytes: u64,
    pub entries: u64,
}

/// A bind mount of the container's spec.
#[derive(Debug, Clone, PartialEq)]
pub struct Bind {
    pub destination: String,
    pub source: PathBuf,
}

/// The writable bind mounts of directories in the bundle's `config.json`.
pub fn writable_binds(bundle: &Path) -> Result<Vec<Bind>> {
    let path = bundle.join("config.json");
    let bytes = fs::read(&path).map_err(Error::io(format!("read {}", path.display())))?;
    let spec: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(Error::json(format!("decode {}", path.display())))?;
    let mut binds = Vec::new();
    for m in spec["mounts"].as_array().into_iter().flatten() {
        let opts: Vec<&str> = m["options"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|o| o.as_str())
            .collect();
        let bind = m["type"] == "bind" || opts.iter().any(|o| *o == "bind" || *o == "rbind");
        let (Some(dest), Some(src)) = (m["destination"].as_str(), m["source"].as_str()) else {
            continue;
        };
        if !bind || opts.contains(&"ro") || !Path::new(src).is_dir() {
            continue;
        }
        binds.push(Bind {
            destination: dest.to_string(),
            source: PathBuf::from(src),
        });
    }
    Ok(binds)
}

/// The bind mounts `wanted` names (destinations, or [`ALL`]); a name that is
/// no writable bind mount of a directory is InvalidArgument. Called before
/// the freeze.
pub fn select(bundle: &Path, wanted: &[String]) -> Result<Vec<Bind>> {
    if wanted.is_empty() {
        return Ok(Vec::new());
    }
    let binds = writable_binds(bundle)?;
    if wanted.iter().any(|w| w == ALL) {
        return Ok(binds);
    }
    wanted
        .iter()
        .map(|w| {
            let w = w.trim_end_matches('/');
            binds
                .iter()
                .find(|b| b.destination.trim_end_matches('/') == w)
                .cloned()
                .ok_or_else(|| {
                    Error::InvalidArgument(format!(
                        "volume {w}: the container has no writable bind mount of a directory there"
                    ))
                })
        })
        .collect()
}

/// Writes each of `binds` into `image/volumes/` (inside the caller's freeze).
pub fn capture(binds: &[Bind], image: &Path) -> Result<DiffStats> {
    let mut total = DiffStats::default();
    if binds.is_empty() {
        return Ok(total);
    }
    let root = image.join(DIR);
    fs::create_dir_all(&root).map_err(Error::io(format!("create {}", root.display())))?;
    let mut index = Vec::new();
    for (i, b) in binds.iter().enumerate() {
        let dir = i.to_string();
        let out = root.join(&dir);
        fs::create_dir_all(&out).map_err(Error::io(format!("create {}", out.display())))?;
        let overlay = Overlay {
            upper: b.source.clone(),
            lowers: Vec::new(),
        };
        let stats = rootfs_diff::capture(&overlay, &out).map_err(|e| {
            Error::Internal(format!(
                "volume {} ({}): {e}",
                b.destination,
                b.source.display()
            ))
        })?;
        total.bytes += stats.bytes;
        total.entries += stats.entries;
        total.skipped.extend(
            stats
                .skipped
                .iter()
                .map(|s| format!("{}{s}", b.destination.trim_end_matches('/'))),
        );
        index.push(Entry {
            destination: b.destination.clone(),
            dir,
            bytes: stats.bytes,
            entries: stats.entries,
        });
    }
    let json = serde_json::to_vec_pretty(&index).map_err(Error::json("encode volumes index"))?;
    let path = root.join(INDEX);
    fs::write(&path, json).map_err(Error::io(format!("write {}", path.display())))?;
    Ok(total)
}

/// Reads `dir/volumes/volumes.json`, if there is one. Every entry's `dir` must
/// be one plain name: the index is input from outside.
pub fn read_index(dir: &Path) -> Result<Option<Vec<Entry>>> {
    let path = dir.join(DIR).join(INDEX);
    let Some(mut file) = rootfs_diff::limits::open_regular(&path)? else {
        return Ok(None);
    };
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(
        &mut std::io::Read::take(&mut file, rootfs_diff::limits::MAX_DELETED_FILES),
        &mut bytes,
    )
    .map_err(Error::io(format!("read {}", path.display())))?;
    let index: Vec<Entry> = serde_json::from_slice(&bytes)
        .map_err(|e| Error::InvalidArgument(format!("{DIR}/{INDEX}: {e}")))?;
    for e in &index {
        let plain = !e.dir.is_empty()
            && e.dir != "."
            && e.dir != ".."
            && !e.dir.contains('/')
            && !e.dir.contains('\0');
        if !plain {
            return Err(Error::InvalidArgument(format!(
                "{DIR}/{INDEX}: volume directory {:?} is not a plain name",
                e.dir
            )));
        }
    }
    Ok(Some(index))
}

/// Applies the checkpoint's volumes (in `dir`) to the bind-mount sources of
/// the new container (its bundle's spec), matched by destination. A volume
/// the new container does not mount is FailedPrecondition: its files would
/// be lost silently.
pub fn apply(dir: &Path, bundle: &Path) -> Result<DiffStats> {
    let mut total = DiffStats::default();
    let Some(index) = read_index(dir)? else {
        return Ok(total);
    };
    let binds = writable_binds(bundle)?;
    let mut plan = Vec::new();
    for e in &index {
        let want = e.destination.trim_end_matches('/');
        let Some(b) = binds
            .iter()
            .find(|b| b.destination.trim_end_matches('/') == want)
        else {
            return Err(Error::FailedPrecondition(format!(
                "the checkpoint carries volume {}, but the new container has no writable bind mount of a directory there (mount one, or restore without volumes)",
                e.destination
            )));
        };
        plan.push((e, b));
    }
    for (e, b) in plan {
        let what = format!("volume {} into {}", e.destination, b.source.display());
        let stats = rootfs_diff::apply_to_host_dir(&dir.join(DIR).join(&e.dir), &b.source)
            .map_err(|err| match err {
                Error::InvalidArgument(m) => Error::InvalidArgument(format!("{what}: {m}")),
                Error::FailedPrecondition(m) => Error::FailedPrecondition(format!("{what}: {m}")),
                other => other,
            })?;
        total.bytes += stats.bytes;
        total.entries += stats.entries;
        total.deleted += stats.deleted;
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundle(dir: &Path, mounts: serde_json::Value) {
        fs::write(
            dir.join("config.json"),
            serde_json::json!({ "mounts": mounts }).to_string(),
        )
        .unwrap();
    }

    #[test]
    fn only_writable_bind_mounts_of_directories_are_volumes() {
        let t = tempfile::tempdir().unwrap();
        let (data, logs, file) = (
            t.path().join("data"),
            t.path().join("logs"),
            t.path().join("f"),
        );
        fs::create_dir(&data).unwrap();
        fs::create_dir(&logs).unwrap();
        fs::write(&file, "x").unwrap();
        bundle(
            t.path(),
            serde_json::json!([
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/data", "type": "bind", "source": data, "options": ["rbind", "rw"]},
                {"destination": "/logs", "source": logs, "options": ["rbind"]},
                {"destination": "/ro", "type": "bind", "source": logs, "options": ["rbind", "ro"]},
                {"destination": "/etc/hosts", "type": "bind", "source": file, "options": ["rbind"]},
            ]),
        );
        let all = select(t.path(), &[ALL.to_string()]).unwrap();
        let dests: Vec<_> = all.iter().map(|b| b.destination.as_str()).collect();
        assert_eq!(dests, ["/data", "/logs"]);
        let one = select(t.path(), &["/logs/".to_string()]).unwrap();
        assert_eq!(
            one,
            vec![Bind {
                destination: "/logs".into(),
                source: logs.clone()
            }]
        );
        let e = select(t.path(), &["/ro".to_string()]).unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
        assert!(select(t.path(), &[]).unwrap().is_empty());
    }

    #[test]
    fn volumes_go_back_into_the_new_containers_sources() {
        let t = tempfile::tempdir().unwrap();
        let (src, image) = (t.path().join("src"), t.path().join("image"));
        fs::create_dir_all(src.join("sub")).unwrap();
        fs::write(src.join("sub/file"), "payload").unwrap();
        fs::create_dir(&image).unwrap();
        let binds = vec![Bind {
            destination: "/data".into(),
            source: src,
        }];
        let stats = capture(&binds, &image).unwrap();
        assert_eq!(stats.bytes, 7);
        // Restored into another host's directory for the same destination.
        let (newb, dest) = (t.path().join("newbundle"), t.path().join("dest"));
        fs::create_dir(&newb).unwrap();
        fs::create_dir(&dest).unwrap();
        bundle(
            &newb,
            serde_json::json!([
                {"destination": "/data", "type": "bind", "source": dest, "options": ["rbind"]}
            ]),
        );
        apply(&image, &newb).unwrap();
        assert_eq!(
            fs::read_to_string(dest.join("sub/file")).unwrap(),
            "payload"
        );
        // A new container without that mount: refused, nothing lost silently.
        bundle(&newb, serde_json::json!([]));
        assert!(matches!(
            apply(&image, &newb),
            Err(Error::FailedPrecondition(_))
        ));
    }

    #[test]
    fn a_hostile_index_cannot_point_outside_volumes() {
        let t = tempfile::tempdir().unwrap();
        fs::create_dir_all(t.path().join(DIR)).unwrap();
        for dir in ["..", "../x", "", "a/b"] {
            let index = serde_json::json!([
                {"destination": "/data", "dir": dir, "bytes": 0, "entries": 0}
            ]);
            fs::write(t.path().join(DIR).join(INDEX), index.to_string()).unwrap();
            assert!(
                matches!(read_index(t.path()), Err(Error::InvalidArgument(_))),
                "{dir:?}"
            );
        }
    }
}
