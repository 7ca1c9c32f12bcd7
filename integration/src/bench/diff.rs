//! The rootfs diff: capture in the checkpoint, apply at restore, with many files or one big one,
//! on the default disk (the copying path) and with containerd's root on an xfs loop filesystem
//! (the reflink path).

use integration::{xfs::Xfs, Containerd, Runtime, Setup};

use super::scenarios::*;

/// The key of a diff figure: `diff_<what>_<count>` on the default disk, `diff_<what>_xfs_<count>`
/// on xfs.
pub fn key(what: &str, fs: &str, count: u64) -> String {
    match fs {
        "" => format!("diff_{what}_{count}"),
        fs => format!("diff_{what}_{fs}_{count}"),
    }
}

/// The diff scenario again, with a second containerd whose root is on a fresh xfs loop
/// filesystem (reflink); its figures go into `b`'s results.
pub fn on_xfs(b: &mut Bench<'_>) -> Result<(), String> {
    // The blob, the checkpoint's work dir and the restored rootfs each hold the diff once or twice.
    let gib = (b.cfg.diff_mib * 8).div_ceil(1024).max(4);
    let xfs = Xfs::new(gib)?;
    let cd = Containerd::start_with(Setup {
        base: Some(xfs.path().to_path_buf()),
        ..Default::default()
    });
    let image = b.cfg.image.to_string_lossy().into_owned();
    let imported = cd.ctr(["images", "import", &image]);
    if !imported.status.success() {
        return Err(format!(
            "xfs containerd: ctr images import: {}",
            integration::show(&imported)
        ));
    }
    let mut xb = Bench::new(&cd, b.cfg.clone())?;
    xb.res = std::mem::take(&mut b.res);
    let r = xb.rootfs_diff("xfs");
    b.res = std::mem::take(&mut xb.res);
    drop(xb);
    drop(cd);
    drop(xfs);
    r
}

impl Bench<'_> {
    // ---- rootfs diff ------------------------------------------------------------------------------

    /// `fs`: "" on the default disk, "xfs" on [`on_xfs`]'s containerd.
    pub fn rootfs_diff(&mut self, fs: &str) -> Result<(), String> {
        let mib = self.cfg.diff_mib;
        let on = match fs {
            "" => String::new(),
            fs => format!("{fs}: "),
        };
        // Once a filesystem: how fast this machine writes into new page cache at all.
        let scratch = self.cd.dir().join("bench-write");
        let (settled, reused) = page_cache_writes(&scratch)?;
        self.res.note(
            "rootfs diff",
            format!(
                "{on}this machine writes 1 GiB into new files from a buffer at {settled:.2} GB/s, \
                 and at {reused:.2} GB/s right after 1 GiB of page cache was freed: the memory a \
                 write gets decides its speed (a VM host that takes freed memory back, 2 s after \
                 the free, makes every first write to it fault on the host)"
            ),
        );
        for count in self.cfg.diff_files.clone() {
            let what = format!(
                "{on}{mib} MiB as {count} file{}",
                if count == 1 { "" } else { "s" }
            );
            let k = |w: &str| key(w, fs, count);
            let r = &mut self.res;
            let g = "Rootfs diff (files written in the container's rootfs, live checkpoint, restore into a new container)";
            r.group(g)
                .higher(
                    k("capture"),
                    "Rootfs diff throughput (GB/s)",
                    format!("{what}: capture (bytes / diff phase)"),
                    "GB/s",
                )
                .higher(
                    k("apply"),
                    "Rootfs diff throughput (GB/s)",
                    format!("{what}: apply (bytes / Tasks.Create)"),
                    "GB/s",
                )
                .higher(
                    k("apply_shim"),
                    "Rootfs diff throughput (GB/s)",
                    format!("{what}: apply (bytes / the shim's own apply time)"),
                    "GB/s",
                )
                .higher(
                    k("copy"),
                    "Rootfs diff throughput (GB/s)",
                    format!(
                        "{what}: for scale, no shim: the bench copies the restored files into new files on the same disk (sendfile)"
                    ),
                    "GB/s",
                )
                .lower(
                    k("rpc"),
                    "Rootfs diff checkpoint (ms)",
                    format!("{what}: Tasks.Checkpoint RPC"),
                    "ms",
                )
                .lower(
                    k("stall"),
                    "Rootfs diff checkpoint (ms)",
                    format!("{what}: workload stall"),
                    "ms",
                )
                .lower(
                    k("create"),
                    "Rootfs diff checkpoint (ms)",
                    format!("{what}: Tasks.Create (restore)"),
                    "ms",
                )
                .lower(
                    k("size"),
                    "Checkpoint size (MiB)",
                    format!("{what}: checkpoint blob"),
                    "MiB",
                );
            for round in 0..self.cfg.diff_rounds {
                log(format!(
                    "rootfs diff, {what}, round {}/{}",
                    round + 1,
                    self.cfg.diff_rounds
                ));
                for rt in order(round) {
                    check_interrupted()?;
                    settle_disk();
                    let id = self.id(&format!("df{fs}{count}"), rt);
                    let mut args = Self::workload_cmd(1, self.cfg.sleep_us);
                    args.extend(["/data".to_string(), count.to_string(), mib.to_string()]);
                    let pid = self.start_workload(rt, &id, &args)?;
                    let new = format!("{id}-r");
                    self.seq += 1;
                    self.api.take_lease(&format!("bench-{}", self.seq))?;
                    let result = self.diff_round(rt, &id, pid, &new, count);
                    self.remove(&[new, id])?;
                    self.api.drop_lease()?;
                    let DiffRound {
                        rpc,
                        stall,
                        size,
                        create,
                        meta,
                        back,
                        apply_ms,
                        copy,
                    } = result?;
                    if let Some(copy) = copy {
                        self.res.add(&k("copy"), rt, copy);
                    }
                    self.files_back[rt as usize] = Some(back);
                    let path = meta
                        .as_ref()
                        .map(|m| m["rootfs_diff_capture"]["path"].clone());
                    if let (Some(path), 0) = (path, round) {
                        self.res.note(
                            "rootfs diff",
                            format!("{what}: the custom shim took the diff's bytes by {path}"),
                        );
                    }
                    self.res.add(&k("rpc"), rt, rpc);
                    self.res.add(&k("stall"), rt, stall);
                    self.res.add(&k("create"), rt, create);
                    self.res.add(&k("size"), rt, size / MIB);
                    if let Some(meta) = meta {
                        let bytes = meta["rootfs_diff_bytes"].as_f64().unwrap_or(0.0);
                        let diff_ms = meta["phases"]["diff_ms"].as_f64().unwrap_or(f64::NAN);
                        self.res
                            .add(&k("capture"), rt, bytes / (diff_ms / 1000.0) / 1e9);
                        self.res
                            .add(&k("apply"), rt, bytes / (create / 1000.0) / 1e9);
                        if let Some(apply_ms) = apply_ms {
                            self.res
                                .add(&k("apply_shim"), rt, bytes / (apply_ms / 1000.0) / 1e9);
                        }
                    }
                }
            }
        }
        let back = |rt: Runtime| match self.files_back[rt as usize] {
            Some(true) => "yes",
            Some(false) => "no",
            None => "not measured",
        };
        let line = format!(
            "{on}files written before a live checkpoint are back after a restore into a fresh rootfs: Go {}, custom {}",
            back(Runtime::RuncV2),
            back(Runtime::Custom)
        );
        self.res.note("rootfs diff", line);
        Ok(())
    }

    pub(super) fn diff_round(
        &mut self,
        rt: Runtime,
        id: &str,
        pid: u32,
        new: &str,
        count: u64,
    ) -> Result<DiffRound, String> {
        let (desc, rpc, stall, meta) = self.measured_checkpoint(rt, id, pid)?;
        let (create, _, new_pid) = self.restore_as(id, new, &desc)?;
        let last = format!("/proc/{new_pid}/root/data/f{:05}", count - 1);
        let back = std::path::Path::new(&last).is_file();
        // The shim's own apply time, without containerd unpacking the blob first.
        let record = self
            .cd
            .state_dir()
            .join("io.containerd.runtime.v2.task")
            .join(self.cd.namespace())
            .join(new)
            .join("custom-shim-restore.json");
        let apply_ms = std::fs::read(&record)
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|v| v["apply_ms"].as_f64());
        // What writing the same bytes into new files costs on this machine, after the apply and
        // on the same file system: the floor the apply's own rate is to be read against (the
        // restored files are in the page cache, as the archive was for the apply). Not at once:
        // a VM that hands freed memory back to its host (free page reporting, 2 s after the
        // free) makes the first write to every page it took back cost a fault on the host, and
        // the copy would otherwise run on the pages containerd's unpacked archive just gave up,
        // which the apply did not have.
        let copy = match (back, rt) {
            (true, Runtime::Custom) => {
                settle_disk();
                std::thread::sleep(std::time::Duration::from_secs(3));
                let scratch = self.cd.dir().join("bench-copy");
                let r = plain_copy(&format!("/proc/{new_pid}/root/data"), &scratch);
                let _ = std::fs::remove_dir_all(&scratch);
                Some(r?)
            }
            _ => None,
        };
        Ok(DiffRound {
            rpc,
            stall,
            size: desc.size as f64,
            create,
            meta,
            back,
            apply_ms,
            copy,
        })
    }
}

/// One checkpoint and restore of the diff scenario.
pub(super) struct DiffRound {
    /// Tasks.Checkpoint, ms.
    rpc: f64,
    /// The workload's longest stall, ms.
    stall: f64,
    /// The checkpoint blob, bytes.
    size: f64,
    /// Tasks.Create of the restore, ms.
    create: f64,
    /// The custom shim's checkpoint metadata.
    meta: Option<serde_json::Value>,
    /// Whether the files are back in the restored container.
    back: bool,
    /// The custom shim's own apply time, ms.
    apply_ms: Option<f64>,
    /// The bench's plain copy of the restored files, GB/s (custom shim only).
    copy: Option<f64>,
}

/// Writes 1 GiB into a new file in `dir` from a 1 MiB buffer, twice: after `sync` and 3 s of
/// quiet, and again at once after deleting the first. GB/s each.
fn page_cache_writes(dir: &std::path::Path) -> Result<(f64, f64), String> {
    use std::io::Write;
    let err = |e: std::io::Error| format!("page cache write in {}: {e}", dir.display());
    std::fs::create_dir_all(dir).map_err(err)?;
    let buf = vec![7u8; 1 << 20];
    let write = |name: &str| -> Result<f64, String> {
        let mut f = std::fs::File::create(dir.join(name)).map_err(err)?;
        let start = std::time::Instant::now();
        for _ in 0..1024 {
            f.write_all(&buf).map_err(err)?;
        }
        Ok((1u64 << 30) as f64 / start.elapsed().as_secs_f64() / 1e9)
    };
    settle_disk();
    std::thread::sleep(std::time::Duration::from_secs(3));
    let settled = write("a")?;
    std::fs::remove_file(dir.join("a")).map_err(err)?;
    let reused = write("b")?;
    std::fs::remove_dir_all(dir).map_err(err)?;
    settle_disk();
    Ok((settled, reused))
}

/// Copies the regular files of `src` into new files in `dst` with sendfile (the apply's own
/// way when the archive and the rootfs share no file system that clones or copies in place);
/// returns the rate in GB/s.
fn plain_copy(src: &str, dst: &std::path::Path) -> Result<f64, String> {
    use std::os::fd::AsRawFd;
    let err = |what: &str, p: &dyn std::fmt::Debug, e: std::io::Error| {
        format!("plain copy: {what} {p:?}: {e}")
    };
    std::fs::create_dir_all(dst).map_err(|e| err("create", &dst, e))?;
    let mut files = Vec::new();
    for e in std::fs::read_dir(src).map_err(|e| err("read", &src, e))? {
        let e = e.map_err(|e| err("read", &src, e))?;
        if e.file_type()
            .map_err(|er| err("stat", &e.path(), er))?
            .is_file()
        {
            files.push(e.path());
        }
    }
    let start = std::time::Instant::now();
    let mut bytes = 0u64;
    for path in &files {
        let from = std::fs::File::open(path).map_err(|e| err("open", path, e))?;
        let len = from.metadata().map_err(|e| err("stat", path, e))?.len();
        let to_path = dst.join(path.file_name().unwrap_or_default());
        let to = std::fs::File::create(&to_path).map_err(|e| err("create", &to_path, e))?;
        let mut left = len;
        while left > 0 {
            let chunk = left.min(0x7fff_f000) as usize;
            // SAFETY: two open descriptors; a null offset reads at `from`'s file position.
            let n = unsafe {
                libc::sendfile(
                    to.as_raw_fd(),
                    from.as_raw_fd(),
                    std::ptr::null_mut(),
                    chunk,
                )
            };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                return Err(err("sendfile to", &to_path, e));
            }
            if n == 0 {
                return Err(format!("plain copy: {path:?} ended early"));
            }
            left -= n as u64;
        }
        bytes += len;
    }
    let secs = start.elapsed().as_secs_f64();
    Ok(bytes as f64 / secs / 1e9)
}
