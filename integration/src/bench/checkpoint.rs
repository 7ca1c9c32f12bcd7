//! Live checkpoints: the RPC, the workload's stall, the custom shim's phases, raw runc next to them.

use std::path::PathBuf;
use std::process::Command;

use integration::{Runtime, RUNC_ROOT};

use super::measure::run_ok;
use super::scenarios::*;

impl Bench<'_> {
    // ---- live checkpoints ------------------------------------------------------------------------

    pub fn checkpoint(&mut self) -> Result<(), String> {
        let sizes = self.cfg.ckpt_sizes.clone();
        for &(mib, _) in &sizes {
            let r = &mut self.res;
            let g = "Live checkpoint (Tasks.Checkpoint, no pause, leave running)";
            r.group(g)
                .lower(
                    format!("ckpt_rpc_{mib}"),
                    "Live checkpoint (ms)",
                    format!("{mib} MiB: Tasks.Checkpoint RPC"),
                    "ms",
                )
                .lower(
                    format!("raw_runc_{mib}"),
                    "Live checkpoint (ms)",
                    format!("{mib} MiB: raw `runc checkpoint --leave-running` (floor)"),
                    "ms",
                )
                .lower(
                    format!("stall_{mib}"),
                    "Workload stall (ms)",
                    format!("{mib} MiB: workload stall, RPC"),
                    "ms",
                )
                .lower(
                    format!("raw_stall_{mib}"),
                    "Workload stall (ms)",
                    format!("{mib} MiB: workload stall, raw runc"),
                    "ms",
                )
                .lower(
                    format!("ckpt_size_{mib}"),
                    "Checkpoint size (MiB)",
                    format!("{mib} MiB: checkpoint blob"),
                    "MiB",
                );
            let g = "Custom shim checkpoint phases (custom-shim-checkpoint.json)";
            for p in ["freeze", "dump", "diff", "thaw", "total"] {
                r.group(g).lower(
                    format!("phase_{p}_{mib}"),
                    "Custom shim phases (ms)",
                    format!("{mib} MiB: {p}"),
                    "ms",
                );
            }
        }
        for (mib, rounds) in sizes {
            let go = self.id(&format!("ck{mib}"), Runtime::RuncV2);
            let custom = self.id(&format!("ck{mib}"), Runtime::Custom);
            let args = Self::workload_cmd(mib, self.cfg.sleep_us);
            let go_pid = self.start_workload(Runtime::RuncV2, &go, &args)?;
            let custom_pid = self.start_workload(Runtime::Custom, &custom, &args)?;
            for round in 0..rounds {
                log(format!(
                    "live checkpoint {mib} MiB, round {}/{rounds}",
                    round + 1
                ));
                for rt in order(round) {
                    check_interrupted()?;
                    settle_disk();
                    let (id, pid) = match rt {
                        Runtime::RuncV2 => (go.clone(), go_pid),
                        Runtime::Custom => (custom.clone(), custom_pid),
                    };
                    let (rpc, stall, size, meta) = self.live_checkpoint(rt, &id, pid)?;
                    self.res.add(&format!("ckpt_rpc_{mib}"), rt, rpc);
                    self.res.add(&format!("stall_{mib}"), rt, stall);
                    self.res.add(&format!("ckpt_size_{mib}"), rt, size / MIB);
                    if let Some(meta) = meta {
                        for p in ["freeze", "dump", "diff", "thaw", "total"] {
                            let v = meta["phases"][format!("{p}_ms")]
                                .as_f64()
                                .unwrap_or(f64::NAN);
                            self.res.add(&format!("phase_{p}_{mib}"), rt, v);
                        }
                    }
                    if rt == Runtime::RuncV2 {
                        settle_disk();
                        let (took, stall) = self.raw_runc_checkpoint(&id, pid)?;
                        self.res.add(&format!("raw_runc_{mib}"), rt, took);
                        self.res.add(&format!("raw_stall_{mib}"), rt, stall);
                    }
                }
            }
            self.remove(&[go, custom])?;
        }
        Ok(())
    }

    /// `runc checkpoint --leave-running` straight on a container the Go shim runs: (ms, stall ms).
    pub(super) fn raw_runc_checkpoint(&mut self, id: &str, pid: u32) -> Result<(f64, f64), String> {
        self.seq += 1;
        let dir = self.cd.dir().join(format!("raw-ckpt-{}", self.seq));
        let (image, work) = (dir.join("image"), dir.join("work"));
        std::fs::create_dir_all(&work).map_err(|e| format!("{}: {e}", work.display()))?;
        let gen = self.arm_stall(pid)?;
        let root = PathBuf::from(RUNC_ROOT).join(self.cd.namespace());
        let mut cmd = Command::new("runc");
        cmd.arg("--root")
            .arg(&root)
            .args(["checkpoint", "--leave-running", "--image-path"])
            .arg(&image)
            .arg("--work-path")
            .arg(&work)
            .arg(id);
        let result = run_ok(&mut cmd, BIG_TIMEOUT).and_then(|(_, took)| {
            let stall = self.read_stall(pid, gen)?;
            Ok((ms(took), stall))
        });
        let _ = std::fs::remove_dir_all(&dir);
        result
    }
}
