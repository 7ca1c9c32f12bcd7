//! Idle memory of the shims (RSS, PSS), and N containers started then removed.

use std::thread;
use std::time::Instant;

use integration::IMAGE;

use super::measure::memory_of;
use super::scenarios::*;

impl Bench<'_> {
    // ---- idle memory, and N containers started then removed --------------------------------

    pub fn memory(&mut self) -> Result<(), String> {
        let n = self.cfg.many;
        let r = &mut self.res;
        let g = "Idle shim memory";
        r.group(g)
            .lower(
                "mem_rss_1",
                "Idle shim memory (MiB)",
                "RSS, 1 container",
                "MiB",
            )
            .lower(
                "mem_pss_1",
                "Idle shim memory (MiB)",
                "PSS, 1 container",
                "MiB",
            );
        let per = format!("per shim, {n} containers");
        r.group(g)
            .lower(
                "mem_rss_n",
                "Idle shim memory (MiB)",
                format!("RSS {per}"),
                "MiB",
            )
            .lower(
                "mem_pss_n",
                "Idle shim memory (MiB)",
                format!("PSS {per}"),
                "MiB",
            );
        let all = format!("all {n} shims");
        r.group(g)
            .lower(
                "mem_rss_n_total",
                "Idle memory of N shims (MiB)",
                format!("RSS, {all}"),
                "MiB",
            )
            .lower(
                "mem_pss_n_total",
                "Idle memory of N shims (MiB)",
                format!("PSS, {all}"),
                "MiB",
            );
        let g = "Lifecycle";
        r.group(g)
            .lower(
                "life_start_n",
                "N containers (ms)",
                format!("{n} × `ctr run -d` (sequential)"),
                "ms",
            )
            .lower(
                "life_remove_n",
                "N containers (ms)",
                format!("remove {n} (`ctr task rm -f`, `ctr c rm`)"),
                "ms",
            )
            .lower(
                "life_n_total",
                "N containers (ms)",
                format!("{n} started then removed, total"),
                "ms",
            );

        for round in 0..self.cfg.mem_rounds {
            for rt in order(round) {
                check_interrupted()?;
                let id = self.id("mem1", rt);
                self.run_detached(rt, IMAGE, &id, &["sleep", "1000000"])?;
                thread::sleep(self.cfg.settle);
                let m = memory_of(self.shim_pid(&id)?)?;
                self.res.add("mem_rss_1", rt, m.rss_kib as f64 / 1024.0);
                self.res.add("mem_pss_1", rt, m.pss_kib as f64 / 1024.0);
                self.remove(&[id])?;
            }
            for rt in order(round) {
                check_interrupted()?;
                log(format!(
                    "memory round {}: {n} containers on {}",
                    round + 1,
                    rt.name()
                ));
                let ids: Vec<String> = (0..n)
                    .map(|i| self.id(&format!("mem{n}x{i}"), rt))
                    .collect();
                let t = Instant::now();
                for id in &ids {
                    self.run_detached(rt, IMAGE, id, &["sleep", "1000000"])?;
                }
                let started = t.elapsed();
                thread::sleep(self.cfg.settle);
                let (mut rss, mut pss) = (0.0, 0.0);
                for id in &ids {
                    let m = memory_of(self.shim_pid(id)?)?;
                    self.res.add("mem_rss_n", rt, m.rss_kib as f64 / 1024.0);
                    self.res.add("mem_pss_n", rt, m.pss_kib as f64 / 1024.0);
                    rss += m.rss_kib as f64 / 1024.0;
                    pss += m.pss_kib as f64 / 1024.0;
                }
                self.res.add("mem_rss_n_total", rt, rss);
                self.res.add("mem_pss_n_total", rt, pss);
                let removed = self.remove(&ids)?;
                self.res.add("life_start_n", rt, ms(started));
                self.res.add("life_remove_n", rt, ms(removed));
                self.res.add("life_n_total", rt, ms(started + removed));
            }
        }
        Ok(())
    }
}
