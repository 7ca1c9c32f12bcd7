//! `ctr run --rm` latency.

use std::time::Duration;

use integration::{Runtime, IMAGE};

use super::measure::run_ok;
use super::scenarios::*;

impl Bench<'_> {
    // ---- ctr run --rm ------------------------------------------------------------------------

    pub fn lifecycle(&mut self) -> Result<(), String> {
        self.res.group("Lifecycle").lower(
            "life_run_rm",
            "ctr run --rm (ms)",
            "`ctr run --rm IMAGE id true`",
            "ms",
        );
        let fifo = self.cd.fifo_dir().to_string();
        let once = |this: &mut Self, rt: Runtime| -> Result<Duration, String> {
            let id = this.id("run", rt);
            let args = [
                "run",
                "--rm",
                "--fifo-dir",
                &fifo,
                "--runtime",
                rt.name(),
                IMAGE,
                &id,
                "true",
            ];
            let (_, took) = run_ok(this.cd.ctr_command().args(args), CTR_TIMEOUT)?;
            Ok(took)
        };
        for rt in Runtime::ALL {
            once(self, rt)?; // warm-up: binaries and image in the page cache
        }
        log(format!(
            "lifecycle: {} × ctr run --rm per runtime",
            self.cfg.lifecycle_samples
        ));
        for i in 0..self.cfg.lifecycle_samples {
            for rt in order(i) {
                check_interrupted()?;
                let took = once(self, rt)?;
                self.res.add("life_run_rm", rt, ms(took));
            }
        }
        Ok(())
    }
}
