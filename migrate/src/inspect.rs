//! `inspect`: what a checkpoint holds: the container, its base image, sizes,
//! the CRIU and shim versions, and the process tree read from CRIU's images.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use anyhow::{bail, Context, Result};
use prost::Message;

use crate::archive::{self, Unpacked};
use crate::progress::human;

const IMG_COMMON_MAGIC: u32 = 0x5456_4319;
const PSTREE_MAGIC: u32 = 0x5027_3030;
const CORE_MAGIC: u32 = 0x5505_3847;

#[derive(Clone, PartialEq, Message)]
struct PstreeEntry {
    #[prost(uint32, tag = "1")]
    pid: u32,
    #[prost(uint32, tag = "2")]
    ppid: u32,
    #[prost(uint32, tag = "3")]
    pgid: u32,
    #[prost(uint32, tag = "4")]
    sid: u32,
    #[prost(uint32, repeated, tag = "5")]
    threads: Vec<u32>,
}

#[derive(Clone, PartialEq, Message)]
struct TaskCoreEntry {
    #[prost(string, tag = "6")]
    comm: String,
}

#[derive(Clone, PartialEq, Message)]
struct CoreEntry {
    #[prost(message, optional, tag = "3")]
    tc: Option<TaskCoreEntry>,
}

/// The protobuf entries of a CRIU image file with magic `magic`.
fn entries(path: &Path, magic: u32) -> Result<Vec<Vec<u8>>> {
    let b = fs::read(path).with_context(|| format!("read {}", path.display()))?;
    let word = |at: usize| -> Option<u32> {
        Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
    };
    if word(0) != Some(IMG_COMMON_MAGIC) || word(4) != Some(magic) {
        bail!("{} is not the CRIU image it should be", path.display());
    }
    let mut at = 8;
    let mut out = Vec::new();
    while at < b.len() {
        let Some(len) = word(at) else {
            bail!("{}: truncated entry", path.display())
        };
        let len = len as usize;
        let body = b
            .get(at + 4..at + 4 + len)
            .with_context(|| format!("{}: truncated entry", path.display()))?;
        out.push(body.to_vec());
        at += 4 + len;
    }
    Ok(out)
}

#[derive(Debug, serde::Serialize)]
pub struct Proc {
    pub pid: u32,
    pub ppid: u32,
    pub threads: usize,
    pub comm: String,
}

/// The processes in CRIU's `pstree.img`, with their names from `core-<pid>.img`.
pub fn process_tree(images: &Path) -> Result<Vec<Proc>> {
    let mut out = Vec::new();
    for e in entries(&images.join("pstree.img"), PSTREE_MAGIC)? {
        let p = PstreeEntry::decode(&e[..]).context("pstree.img entry")?;
        let comm = entries(&images.join(format!("core-{}.img", p.pid)), CORE_MAGIC)
            .ok()
            .and_then(|v| v.into_iter().next())
            .and_then(|c| CoreEntry::decode(&c[..]).ok())
            .and_then(|c| c.tc)
            .map(|tc| tc.comm)
            .unwrap_or_default();
        out.push(Proc {
            pid: p.pid,
            ppid: p.ppid,
            threads: p.threads.len(),
            comm,
        });
    }
    Ok(out)
}

fn size_of(dir: &Path, rel: &str) -> u64 {
    let p = dir.join(rel);
    match fs::metadata(&p) {
        Ok(m) if m.is_file() => m.len(),
        Ok(m) if m.is_dir() => fs::read_dir(&p)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| size_of(&p, &e.file_name().to_string_lossy()))
            .sum(),
        _ => 0,
    }
}

/// The figures of an unpacked archive, as JSON and as a table.
pub fn describe(u: &Unpacked) -> Result<(serde_json::Value, Vec<(String, String)>)> {
    let images = u.dir.join(archive::CHECKPOINT_DIR);
    let procs = process_tree(&images).unwrap_or_default();
    let memory = archive::pages_bytes(&images);
    let shim = u.shim.clone().unwrap_or_default();
    let own = u.own.clone().unwrap_or_default();
    let labels: BTreeMap<_, _> = own.labels.clone();
    let v = serde_json::json!({
        "container": u.config["name"],
        "id": u.config["id"],
        "image": u.config["rootfsImageName"],
        "runtime": u.config["runtime"],
        "created": u.config["createdTime"],
        "checkpointed": u.config["checkpointedTime"],
        "labels": labels,
        "source_host": own.source_host,
        "live": own.live,
        "shim_version": shim["shim_version"],
        "criu_version": shim["criu_version"],
        "tool_version": own.tool_version,
        "tcp_established": shim["dump_flags"]["tcp_established"],
        "memory_pages_bytes": memory,
        "checkpoint_bytes": size_of(&u.dir, archive::CHECKPOINT_DIR),
        "rootfs_diff_bytes": size_of(&u.dir, archive::ROOTFS_DIFF),
        "volumes": own.volumes,
        "volumes_bytes": size_of(&u.dir, archive::VOLUMES),
        "processes": procs,
    });
    let s = |k: &str| v[k].as_str().unwrap_or("-").to_string();
    let mut t = vec![
        ("container".to_string(), s("container")),
        ("image".into(), s("image")),
        ("runtime".into(), s("runtime")),
        ("created".into(), s("created")),
        ("checkpointed".into(), s("checkpointed")),
        ("source host".into(), own.source_host.clone()),
        ("shim version".into(), s("shim_version")),
        ("CRIU version".into(), s("criu_version")),
        ("memory pages".into(), human(memory)),
        (
            "CRIU images".into(),
            human(v["checkpoint_bytes"].as_u64().unwrap_or(0)),
        ),
        (
            "rootfs diff".into(),
            human(v["rootfs_diff_bytes"].as_u64().unwrap_or(0)),
        ),
        (
            "volumes".into(),
            format!(
                "{} ({})",
                own.volumes.join(", "),
                human(v["volumes_bytes"].as_u64().unwrap_or(0))
            ),
        ),
    ];
    for (k, val) in &labels {
        t.push((format!("label {k}"), val.clone()));
    }
    t.push(("processes".into(), String::new()));
    let by_parent = |ppid: u32| procs.iter().filter(move |p| p.ppid == ppid);
    fn tree<'a>(
        t: &mut Vec<(String, String)>,
        p: &'a Proc,
        depth: usize,
        by_parent: &dyn Fn(u32) -> Vec<&'a Proc>,
    ) {
        t.push((
            format!("{}{}", "  ".repeat(depth + 1), p.pid),
            format!(
                "{} ({} thread{})",
                p.comm,
                p.threads,
                if p.threads == 1 { "" } else { "s" }
            ),
        ));
        // A hostile pstree can make cycles: depth and rows are bounded.
        for c in by_parent(p.pid) {
            if depth < 64 && t.len() < 10_000 && c.pid != p.pid {
                tree(t, c, depth + 1, by_parent);
            }
        }
    }
    let kids = |ppid: u32| by_parent(ppid).collect::<Vec<_>>();
    for root in procs
        .iter()
        .filter(|p| !procs.iter().any(|q| q.pid == p.ppid))
    {
        tree(&mut t, root, 0, &kids);
    }
    Ok((v, t))
}
