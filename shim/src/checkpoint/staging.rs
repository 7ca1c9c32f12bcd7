//! Where a checkpoint is written before it is moved into its target.

use std::{
    fs,
    path::{Path, PathBuf},
};

use log::warn;

use crate::error::{Error, Result};

/// Where a checkpoint is written before it is moved into its target.
pub(super) struct Staging {
    pub(super) dir: PathBuf,
    pub(super) keep: bool,
}

impl Staging {
    /// Beside the target on the same file system when it can be (a caller
    /// that removes the target leaves it alone; entries move in by rename),
    /// else inside the target (a mount point of its own).
    pub(super) fn new(target: &Path) -> Result<Self> {
        use std::os::unix::fs::MetadataExt;
        let dev = |p: &Path| fs::metadata(p).map(|m| m.dev()).ok();
        let name = target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if let Some(parent) = target.parent().filter(|p| !p.as_os_str().is_empty()) {
            if let Ok(dir) = tempfile::Builder::new()
                .prefix(&format!(".{name}.staging-"))
                .tempdir_in(parent)
            {
                let dir = dir.keep();
                if dev(&dir).is_some() && dev(&dir) == dev(target) {
                    return Ok(Self { dir, keep: false });
                }
                let _ = fs::remove_dir(&dir);
            }
        }
        let dir = tempfile::Builder::new()
            .prefix(".custom-shim-staging-")
            .tempdir_in(target)
            .map_err(Error::io(format!(
                "create staging dir in {}",
                target.display()
            )))?
            .keep();
        Ok(Self { dir, keep: false })
    }

    /// Moves every entry into `target`; on failure, what was moved is taken back.
    pub(super) fn commit(&self, target: &Path) -> Result<()> {
        let names: Vec<_> = fs::read_dir(&self.dir)
            .map_err(Error::io("read staging dir"))?
            .flatten()
            .map(|e| e.file_name())
            .collect();
        for (i, name) in names.iter().enumerate() {
            if let Err(e) = fs::rename(self.dir.join(name), target.join(name)) {
                for back in &names[..i] {
                    let _ = fs::rename(target.join(back), self.dir.join(back));
                }
                return Err(Error::io(format!(
                    "move {:?} into {}",
                    name,
                    target.display()
                ))(e));
            }
        }
        Ok(())
    }

    pub(super) fn keep(mut self) -> PathBuf {
        self.keep = true;
        self.dir.clone()
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.keep {
            if let Err(e) = fs::remove_dir_all(&self.dir) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    warn!("remove staging dir {}: {e}", self.dir.display());
                }
            }
        }
    }
}
