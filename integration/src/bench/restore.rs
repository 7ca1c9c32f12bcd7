//! Checkpoint with exit, then restore (Create + Start), and whether the files came back.

use std::time::Duration;

use integration::Runtime;

use super::measure::{poll, read_report};
use super::scenarios::*;

impl Bench<'_> {
    // ---- checkpoint with exit, restore ------------------------------------------------------------

    pub fn restore(&mut self) -> Result<(), String> {
        let mib = self.cfg.restore_mib;
        let r = &mut self.res;
        let g = "Checkpoint with exit, restore into a new container";
        r.group(g)
            .lower(
                "exit_rpc",
                "Restore (ms)",
                format!("{mib} MiB: Tasks.Checkpoint (exit) RPC"),
                "ms",
            )
            .lower(
                "exit_size",
                "Checkpoint size (MiB)",
                format!("{mib} MiB: checkpoint blob (exit)"),
                "MiB",
            )
            .lower(
                "restore_create",
                "Restore (ms)",
                format!("{mib} MiB: Tasks.Create with the checkpoint"),
                "ms",
            )
            .lower(
                "restore_start",
                "Restore (ms)",
                format!("{mib} MiB: Tasks.Start (CRIU restore)"),
                "ms",
            )
            .lower(
                "restore_total",
                "Restore (ms)",
                format!("{mib} MiB: restore latency (Create + Start)"),
                "ms",
            );
        for round in 0..self.cfg.restore_rounds {
            log(format!(
                "checkpoint --exit + restore {mib} MiB, round {}/{}",
                round + 1,
                self.cfg.restore_rounds
            ));
            for rt in order(round) {
                check_interrupted()?;
                settle_disk();
                let id = self.id("rs", rt);
                let args = Self::workload_cmd(mib, self.cfg.sleep_us);
                self.start_workload(rt, &id, &args)?;
                self.seq += 1;
                self.api.take_lease(&format!("bench-{}", self.seq))?;
                let new = format!("{id}-r");
                let result = self.exit_and_restore(rt, &id, &new);
                self.remove(&[new, id])?;
                self.api.drop_lease()?;
                let (rpc, size, create, start) = result?;
                self.res.add("exit_rpc", rt, rpc);
                self.res.add("exit_size", rt, size / MIB);
                self.res.add("restore_create", rt, create);
                self.res.add("restore_start", rt, start);
                self.res.add("restore_total", rt, create + start);
            }
        }
        Ok(())
    }

    /// Checkpoint `id` with exit, restore it as `new`: (RPC ms, blob bytes, Create ms, Start ms).
    pub(super) fn exit_and_restore(
        &mut self,
        _rt: Runtime,
        id: &str,
        new: &str,
    ) -> Result<(f64, f64, f64, f64), String> {
        let (desc, rpc) = self.api.checkpoint(id, true)?;
        self.api.wait(id)?;
        self.api.delete_task(id)?;
        let (create, start, _) = self.restore_as(id, new, &desc)?;
        Ok((ms(rpc), desc.size as f64, create, start))
    }

    /// Restores `desc` into container `new` (a fresh snapshot, like `template`) and checks the
    /// workload goes on: (Create ms, Start ms, restored pid).
    pub(super) fn restore_as(
        &mut self,
        template: &str,
        new: &str,
        desc: &containerd_client::types::Descriptor,
    ) -> Result<(f64, f64, u32), String> {
        self.api.clone_container(template, new)?;
        let create = self.api.create_from_checkpoint(new, desc)?;
        let (pid, start) = self.api.start(new)?;
        let first = poll(
            &format!("restored {new} to report"),
            Duration::from_secs(30),
            || read_report(pid),
        )?;
        poll(
            &format!("restored {new} to go on"),
            Duration::from_secs(30),
            || read_report(pid).filter(|r| r.iter > first.iter),
        )?;
        Ok((ms(create), ms(start), pid))
    }
}
