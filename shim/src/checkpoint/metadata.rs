//! The checkpoint's record (`custom-shim-metadata.json` beside the images): how it was taken, and
//! what each phase cost.

use std::{fs, path::Path};

use serde::{Deserialize, Serialize};

use super::{criu_conf, layout::METADATA, ms, rootfs_diff, FilesBy, Target};
use crate::{
    error::{Error, Result},
    options::CheckpointOptions,
};
use rootfs_diff::DiffStats;

#[derive(Debug, Default, Clone, Serialize)]
pub(super) struct Phases {
    pub(super) freeze_ms: f64,
    /// The files' part of the stop: the whole capture on the copying path, the snapshot (the
    /// walk and the clones) on the reflink path.
    pub(super) diff_ms: f64,
    pub(super) dump_ms: f64,
    pub(super) thaw_ms: f64,
    pub(super) total_ms: f64,
    /// Reflink path only: the precopy before the dump (the upper's filesystem flushed and every
    /// changed file cloned, the container running), and the archive written from the clones
    /// after it (the container running).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) precopy_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) archive_ms: Option<f64>,
}

/// How the rootfs diff's bytes were taken (see `rootfs_diff::capture`).
#[derive(Debug, Clone, Serialize)]
pub(super) struct DiffCapture {
    /// `reflink`: cloned in the stop, archived after it; `copy`: archived in the stop.
    pub(super) path: &'static str,
    /// Reflink path: bytes cloned, and bytes copied because the filesystem refused a clone.
    pub(super) cloned_bytes: u64,
    pub(super) copied_bytes: u64,
    /// Reflink path: the time the clones took, precopy and stop together (the stop's part of
    /// the walk is `diff_ms`); files the stop took as the precopy left them, and files it cloned
    /// again (changed since).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) clone_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) files_from_precopy: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) files_cloned_in_stop: Option<u64>,
}

impl DiffCapture {
    pub(super) fn of(snap: &rootfs_diff::Snapshot) -> Self {
        let (cloned_bytes, copied_bytes, took) = snap.cloned_copied();
        DiffCapture {
            path: snap.path(),
            cloned_bytes,
            copied_bytes,
            clone_ms: snap.cloned().then(|| ms(took)),
            files_from_precopy: snap.cloned().then_some(snap.reused),
            files_cloned_in_stop: snap.cloned().then_some(snap.retaken),
        }
    }

    /// The copying path with no clones (the shim's own freeze).
    pub(super) fn copy() -> Self {
        DiffCapture {
            path: "copy",
            cloned_bytes: 0,
            copied_bytes: 0,
            clone_ms: None,
            files_from_precopy: None,
            files_cloned_in_stop: None,
        }
    }
}

/// The rootfs diff as the stop left it.
pub(super) enum Files {
    /// Not captured (why is said beside it).
    None,
    /// Archived in the stop (the copying path).
    Written(DiffStats, DiffCapture),
    /// Cloned in the stop, to be archived after it (the reflink path).
    Later(rootfs_diff::Snapshot),
}

/// The CRIU flags a dump used; the restore must use them too.
#[derive(Debug, Default, Clone, Copy, Serialize, Deserialize)]
#[serde(default)]
pub(super) struct DumpFlags {
    pub(super) tcp_established: bool,
    pub(super) ext_unix_sk: bool,
    pub(super) shell_job: bool,
    pub(super) file_locks: bool,
}

#[derive(Debug, Clone, Serialize)]
pub(super) struct Metadata {
    pub(super) dump_flags: DumpFlags,
    pub(super) shim_version: &'static str,
    pub(super) criu_version: Option<String>,
    pub(super) container_id: String,
    pub(super) leave_running: bool,
    /// Where the memory pages went, when not into this directory.
    pub(super) page_server: Option<String>,
    pub(super) frozen_by_shim: bool,
    /// Who captured the rootfs changes (containerd's CRI keeps its own copy
    /// outside this directory).
    pub(super) rootfs_diff_by: FilesBy,
    /// Why the rootfs diff is missing, when it is.
    pub(super) rootfs_diff_skipped: Option<String>,
    /// Files of the rootfs the diff does not carry (sockets, device nodes), and why.
    pub(super) rootfs_diff_left_out: Vec<String>,
    pub(super) phases: Phases,
    pub(super) rootfs_diff_bytes: u64,
    pub(super) rootfs_diff_entries: u64,
    pub(super) deleted_files: u64,
    /// Bytes of the bind-mounted volumes captured (`volumes/`), and what of them was left out.
    pub(super) volumes_bytes: u64,
    pub(super) volumes_left_out: Vec<String>,
    pub(super) images_bytes: u64,
    /// False in the record written before the dump, true once CRIU finished
    /// (for a lazy checkpoint: once every image but the pages was written).
    pub(super) complete: bool,
    /// Where the rootfs changes and volumes were captured: in CRIU's own stop, its processes
    /// seized, beginning at its `criu-network-lock` or `criu-post-dump` action (see
    /// `criu_stop`), `shim-freeze` (in a freeze the shim holds around the whole dump), or `none`
    /// (the CRI path, where containerd takes the files).
    pub(super) files_captured_in: &'static str,
    /// CRIU's network lock around the dump: `skip` (nothing for it to keep, see
    /// `criu_conf::NetworkLock::for_dump`), `iptables` (a lazy dump), or `criu` (CRIU's own
    /// default, or a method the user set in a CRIU config).
    pub(super) network_lock: &'static str,
    /// How the rootfs diff's bytes were taken, when the shim took them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) rootfs_diff_capture: Option<DiffCapture>,
    /// A lazy checkpoint's transfer: `serving`, then `complete` (the
    /// container exited) or `failed` (it runs on).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) lazy: Option<LazyRecord>,
}

#[derive(Debug, Clone, Serialize)]
pub(super) struct LazyRecord {
    pub(super) state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) error: Option<String>,
    pub(super) bytes: u64,
    pub(super) connect_ms: f64,
    pub(super) transfer_ms: f64,
}

impl Metadata {
    /// The record written before the dump: the flags CRIU will use, the versions, where the
    /// files are taken; the figures come after.
    pub(super) fn before_dump(
        t: &Target<'_>,
        opts: &CheckpointOptions,
        files: FilesBy,
        frozen_by_shim: bool,
        files_captured_in: &'static str,
        network_lock: criu_conf::NetworkLock,
    ) -> Self {
        Metadata {
            dump_flags: DumpFlags {
                tcp_established: opts.open_tcp,
                ext_unix_sk: opts.external_unix_sockets,
                shell_job: opts.terminal,
                file_locks: opts.file_locks,
            },
            shim_version: env!("CARGO_PKG_VERSION"),
            criu_version: None,
            container_id: t.id.to_string(),
            leave_running: !opts.exit,
            page_server: Some(opts.page_server.clone()).filter(|p| !p.is_empty()),
            frozen_by_shim,
            rootfs_diff_by: files,
            rootfs_diff_skipped: None,
            rootfs_diff_left_out: Vec::new(),
            phases: Phases::default(),
            rootfs_diff_bytes: 0,
            rootfs_diff_entries: 0,
            deleted_files: 0,
            volumes_bytes: 0,
            volumes_left_out: Vec::new(),
            images_bytes: 0,
            complete: false,
            files_captured_in,
            network_lock: match opts.lazy {
                true => "iptables",
                false => network_lock.name(),
            },
            rootfs_diff_capture: None,
            lazy: None,
        }
    }

    /// What the rootfs diff and the volumes captured (or why the diff is missing).
    pub(super) fn files(&mut self, diff: &DiffStats, skipped: Option<String>, vols: DiffStats) {
        self.rootfs_diff_skipped = skipped;
        self.rootfs_diff_left_out = diff.skipped.clone();
        self.rootfs_diff_bytes = diff.bytes;
        self.rootfs_diff_entries = diff.entries;
        self.deleted_files = diff.deleted;
        self.volumes_bytes = vols.bytes;
        self.volumes_left_out = vols.skipped;
    }
}

/// Written to a temp file and renamed: the record is whole or the old one.
pub(super) fn write_metadata(image: &Path, metadata: &Metadata) -> Result<()> {
    let json = serde_json::to_vec_pretty(metadata).map_err(Error::json("encode metadata"))?;
    let tmp = image.join(format!(".{METADATA}.tmp"));
    fs::write(&tmp, json)
        .and_then(|_| fs::rename(&tmp, image.join(METADATA)))
        .map_err(|e| {
            let _ = fs::remove_file(&tmp);
            Error::io("write checkpoint metadata")(e)
        })
}
