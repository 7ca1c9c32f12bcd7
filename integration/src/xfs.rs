//! An xfs filesystem with reflink on a loop device, for a containerd whose root must clone
//! extents (the rootfs diff's reflink path): `mkfs.xfs` from Debian's xfsprogs (`make deps`).

use std::path::{Path, PathBuf};
use std::process::Command;

/// A sparse image file, formatted xfs (`-m reflink=1`) and loop-mounted; unmounted and removed on
/// drop. Start a [`crate::Containerd`] with [`crate::Setup::base`] set to [`Xfs::path`], and drop
/// it before this.
pub struct Xfs {
    dir: PathBuf,
    mnt: PathBuf,
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    match out.status.success() {
        true => Ok(()),
        false => Err(format!(
            "{cmd:?}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )),
    }
}

impl Xfs {
    /// `gib` GiB, taken on the host's disk only as it is written. In `SHIMTEST_TMPDIR` (or /tmp).
    pub fn new(gib: u64) -> Result<Xfs, String> {
        let base = std::env::var_os("SHIMTEST_TMPDIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/tmp"));
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let dir = base.join(format!("shimtest-xfs-{}-{n}", std::process::id()));
        let mnt = dir.join("m");
        std::fs::create_dir_all(&mnt).map_err(|e| format!("create {}: {e}", mnt.display()))?;
        let image = dir.join("xfs.img");
        let made = Self::make(&image, &mnt, gib);
        if let Err(e) = made {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e);
        }
        Ok(Xfs { dir, mnt })
    }

    fn make(image: &Path, mnt: &Path, gib: u64) -> Result<(), String> {
        let file =
            std::fs::File::create(image).map_err(|e| format!("create {}: {e}", image.display()))?;
        file.set_len(gib << 30)
            .map_err(|e| format!("size {}: {e}", image.display()))?;
        drop(file);
        run(Command::new("mkfs.xfs")
            .args(["-q", "-m", "reflink=1"])
            .arg(image))
        .map_err(|e| format!("{e} (mkfs.xfs is Debian's xfsprogs: `make deps`)"))?;
        run(Command::new("mount")
            .args(["-o", "loop"])
            .arg(image)
            .arg(mnt))
    }

    /// Where it is mounted.
    pub fn path(&self) -> &Path {
        &self.mnt
    }
}

impl Drop for Xfs {
    fn drop(&mut self) {
        // Lazy: a process still holding a file (a shim on its way out) does not keep the loop
        // device, the image file goes with the temp dir all the same.
        let _ = run(Command::new("umount").arg("-l").arg(&self.mnt));
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
