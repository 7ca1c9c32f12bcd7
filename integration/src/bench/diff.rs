//! The rootfs diff: capture in the checkpoint, apply at restore, with many files or one big one.

use integration::Runtime;

use super::scenarios::*;

impl Bench<'_> {
    // ---- rootfs diff ------------------------------------------------------------------------------

    pub fn rootfs_diff(&mut self) -> Result<(), String> {
        let mib = self.cfg.diff_mib;
        for count in self.cfg.diff_files.clone() {
            let what = format!(
                "{mib} MiB as {count} file{}",
                if count == 1 { "" } else { "s" }
            );
            let r = &mut self.res;
            let g = "Rootfs diff (files written in the container's rootfs, live checkpoint, restore into a new container)";
            r.group(g)
                .higher(
                    format!("diff_capture_{count}"),
                    "Rootfs diff throughput (GB/s)",
                    format!("{what}: capture (bytes / diff phase)"),
                    "GB/s",
                )
                .higher(
                    format!("diff_apply_{count}"),
                    "Rootfs diff throughput (GB/s)",
                    format!("{what}: apply (bytes / Tasks.Create)"),
                    "GB/s",
                )
                .higher(
                    format!("diff_apply_shim_{count}"),
                    "Rootfs diff throughput (GB/s)",
                    format!("{what}: apply (bytes / the shim's own apply time)"),
                    "GB/s",
                )
                .lower(
                    format!("diff_rpc_{count}"),
                    "Rootfs diff checkpoint (ms)",
                    format!("{what}: Tasks.Checkpoint RPC"),
                    "ms",
                )
                .lower(
                    format!("diff_stall_{count}"),
                    "Rootfs diff checkpoint (ms)",
                    format!("{what}: workload stall"),
                    "ms",
                )
                .lower(
                    format!("diff_create_{count}"),
                    "Rootfs diff checkpoint (ms)",
                    format!("{what}: Tasks.Create (restore)"),
                    "ms",
                )
                .lower(
                    format!("diff_size_{count}"),
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
                    let id = self.id(&format!("df{count}"), rt);
                    let mut args = Self::workload_cmd(1, self.cfg.sleep_us);
                    args.extend(["/data".to_string(), count.to_string(), mib.to_string()]);
                    let pid = self.start_workload(rt, &id, &args)?;
                    let new = format!("{id}-r");
                    self.seq += 1;
                    self.api.take_lease(&format!("bench-{}", self.seq))?;
                    let result = self.diff_round(rt, &id, pid, &new, count);
                    self.remove(&[new, id])?;
                    self.api.drop_lease()?;
                    let (rpc, stall, size, create, meta, back, apply_ms) = result?;
                    self.files_back[rt as usize] = Some(back);
                    self.res.add(&format!("diff_rpc_{count}"), rt, rpc);
                    self.res.add(&format!("diff_stall_{count}"), rt, stall);
                    self.res.add(&format!("diff_create_{count}"), rt, create);
                    self.res.add(&format!("diff_size_{count}"), rt, size / MIB);
                    if let Some(meta) = meta {
                        let bytes = meta["rootfs_diff_bytes"].as_f64().unwrap_or(0.0);
                        let diff_ms = meta["phases"]["diff_ms"].as_f64().unwrap_or(f64::NAN);
                        self.res.add(
                            &format!("diff_capture_{count}"),
                            rt,
                            bytes / (diff_ms / 1000.0) / 1e9,
                        );
                        self.res.add(
                            &format!("diff_apply_{count}"),
                            rt,
                            bytes / (create / 1000.0) / 1e9,
                        );
                        if let Some(apply_ms) = apply_ms {
                            self.res.add(
                                &format!("diff_apply_shim_{count}"),
                                rt,
                                bytes / (apply_ms / 1000.0) / 1e9,
                            );
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
            "files written before a live checkpoint are back after a restore into a fresh rootfs: Go {}, custom {}",
            back(Runtime::RuncV2),
            back(Runtime::Custom)
        );
        self.res.note("rootfs diff", line);
        Ok(())
    }

    #[allow(clippy::type_complexity)]
    pub(super) fn diff_round(
        &mut self,
        rt: Runtime,
        id: &str,
        pid: u32,
        new: &str,
        count: u64,
    ) -> Result<
        (
            f64,
            f64,
            f64,
            f64,
            Option<serde_json::Value>,
            bool,
            Option<f64>,
        ),
        String,
    > {
        let gen = self.arm_stall(pid)?;
        let (desc, rpc) = self.api.checkpoint(id, false)?;
        let stall = self.read_stall(pid, gen)?;
        let meta = match rt {
            Runtime::Custom => Some(self.shim_metadata(&desc)?),
            Runtime::RuncV2 => None,
        };
        if verbose() {
            log(format!(
                "{id}: RPC {:.1} ms, stall {stall:.1} ms, blob {} bytes, phases {}",
                ms(rpc),
                desc.size,
                meta.as_ref()
                    .map(|m| m["phases"].to_string())
                    .unwrap_or_default()
            ));
        }
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
        Ok((
            ms(rpc),
            stall,
            desc.size as f64,
            create,
            meta,
            back,
            apply_ms,
        ))
    }
}
