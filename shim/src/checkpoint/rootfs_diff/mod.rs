//! The container's file changes: captured from the overlay upperdir as
//! `rootfs-diff.tar` + `deleted.files` (the names Podman and CRI-O use), and
//! applied to a fresh rootfs without ever writing outside it.

mod aligned;
mod apply;
mod capture;
mod clones;
mod copy;
mod fsat;
pub(crate) mod limits;
mod precopy;
mod sparse;
#[cfg(test)]
mod tests;
mod writers;

use std::{
    fs,
    path::{Path, PathBuf},
};

use crate::error::{Error, Result};
pub use apply::{apply, apply_consuming, apply_to_host_dir};
pub use capture::{capture, Snapshot};
#[cfg(test)]
use clones::Clones;

/// Whether xattr `name` is the overlay's own (`trusted.overlay.*`, `user.overlay.*`): never
/// archived, never restored.
fn overlay_own_xattr(name: &[u8]) -> bool {
    name.starts_with(b"trusted.overlay.") || name.starts_with(b"user.overlay.")
}

/// What a capture wrote, or an apply restored.
#[derive(Clone, Default, Debug)]
pub struct DiffStats {
    /// Archive entries written (capture) or restored (apply), whiteouts not counted.
    pub entries: u64,
    /// File data bytes (for sparse files, only the data segments).
    pub bytes: u64,
    /// Paths deleted: deleted.files entries plus `.wh.` whiteout entries.
    pub deleted: u64,
    /// Capture only: upper entries left out because a restore could not
    /// recreate them, each as "/path (reason)", e.g. "/tmp/app.sock (socket)".
    /// For the checkpoint metadata.
    pub skipped: Vec<String>,
    /// Apply only: bytes of large files copied from an archive the apply used up (see
    /// `apply::Consumed`), the archive cut short behind them.
    pub used_up: u64,
}

/// The upperdir and lowerdirs of the overlay mounted at `rootfs`.
#[derive(Clone, Debug)]
pub struct Overlay {
    pub upper: PathBuf,
    pub lowers: Vec<PathBuf>,
}

/// Reads the overlay options of the mount at `rootfs` from mountinfo.
pub fn overlay_of(rootfs: &Path) -> Result<Overlay> {
    let mountinfo =
        fs::read_to_string("/proc/self/mountinfo").map_err(Error::io("read mountinfo"))?;
    let target = rootfs.to_string_lossy();
    // The last mount on the path is the one in effect.
    let line = mountinfo
        .lines()
        .rfind(|l| l.split_whitespace().nth(4) == Some(&*target))
        .ok_or_else(|| {
            Error::FailedPrecondition(format!("rootfs {target} is not a mount point"))
        })?;
    let (_, post) = line
        .split_once(" - ")
        .ok_or_else(|| Error::Internal(format!("bad mountinfo line: {line}")))?;
    let mut post = post.split_whitespace();
    let fstype = post.next().unwrap_or_default();
    let super_opts = post.nth(1).unwrap_or_default();
    if fstype != "overlay" {
        return Err(Error::FailedPrecondition(format!(
            "rootfs {target} is {fstype}, not overlay: its changes cannot be captured"
        )));
    }
    let mut upper = None;
    let mut lowers = Vec::new();
    for opt in super_opts.split(',') {
        if let Some(u) = opt.strip_prefix("upperdir=") {
            upper = Some(PathBuf::from(u));
        } else if let Some(l) = opt.strip_prefix("lowerdir=") {
            lowers.extend(l.split(':').map(PathBuf::from));
        }
    }
    let upper = upper.ok_or_else(|| {
        Error::FailedPrecondition(format!("rootfs {target} is a read-only overlay"))
    })?;
    Ok(Overlay { upper, lowers })
}
