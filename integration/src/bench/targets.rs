//! The targets table (goals of the issues, reported, not asserted) and the phase table.

use std::fmt::Write as _;

use integration::Runtime;

use super::report::{num, Target};
use super::scenarios::*;

impl Bench<'_> {
    // ---- targets and the phase table ------------------------------------------------------------

    pub fn targets(&mut self) {
        let go = Runtime::RuncV2;
        let cu = Runtime::Custom;
        let mut t = Vec::new();
        let r = &self.res;
        for (key, what) in [
            ("mem_rss_1", "idle shim RSS (1 container) ≤ 1/4 of Go's"),
            (
                "mem_rss_n",
                "idle shim RSS (per shim, many containers) ≤ 1/4 of Go's",
            ),
        ] {
            if let (Some(g), Some(c)) = (r.median(key, go), r.median(key, cu)) {
                t.push(Target {
                    what: what.into(),
                    measured: format!(
                        "{} MiB vs {} MiB (×{:.2}; limit {} MiB)",
                        num(c),
                        num(g),
                        c / g,
                        num(g / 4.0)
                    ),
                    met: Some(c <= g / 4.0),
                });
            }
        }
        for (key, what) in [
            ("life_run_rm", "`ctr run --rm` latency ≤ 0.9× Go's"),
            ("life_n_total", "N containers started + removed ≤ 0.9× Go's"),
        ] {
            if let (Some(g), Some(c)) = (r.median(key, go), r.median(key, cu)) {
                let p95 = |rt| {
                    r.metric(key)
                        .and_then(|m| m.stats(rt))
                        .map(|s| s.p95)
                        .unwrap_or(f64::NAN)
                };
                t.push(Target {
                    what: what.into(),
                    measured: format!(
                        "median {} ms vs {} ms (×{:.2}); p95 {} vs {} ms",
                        num(c),
                        num(g),
                        c / g,
                        num(p95(cu)),
                        num(p95(go))
                    ),
                    met: Some(c <= 0.9 * g),
                });
            }
        }
        for &(mib, _) in &self.cfg.ckpt_sizes {
            let rpc = r.median(&format!("ckpt_rpc_{mib}"), cu);
            let raw = r.median(&format!("raw_runc_{mib}"), go);
            let diff = r.median(&format!("phase_diff_{mib}"), cu);
            let total = r.median(&format!("phase_total_{mib}"), cu);
            let go_rpc = r.median(&format!("ckpt_rpc_{mib}"), go);
            if let (Some(rpc), Some(raw), Some(diff), Some(total), Some(go_rpc)) =
                (rpc, raw, diff, total, go_rpc)
            {
                let limit = raw + 20.0 + diff;
                t.push(Target {
                    what: format!("{mib} MiB: checkpoint RPC ≤ raw runc checkpoint + 20 ms + diff"),
                    measured: format!(
                        "RPC {} ms vs limit {} ms (raw runc {} + 20 + diff {}); Go's RPC {} ms: \
                         both include containerd's tar of the images into the content store",
                        num(rpc),
                        num(limit),
                        num(raw),
                        num(diff),
                        num(go_rpc)
                    ),
                    met: Some(rpc <= limit),
                });
                t.push(Target {
                    what: format!(
                        "{mib} MiB: the shim's bracket (freeze → thaw) ≤ raw runc checkpoint + 20 ms + diff"
                    ),
                    measured: format!("{} ms vs limit {} ms", num(total), num(limit)),
                    met: Some(total <= limit),
                });
            }
        }
        // Consistency for free: the stall of a live checkpoint no longer than the Go shim's.
        for &(mib, _) in &self.cfg.ckpt_sizes {
            let key = format!("stall_{mib}");
            if let (Some(g), Some(c)) = (r.median(&key, go), r.median(&key, cu)) {
                t.push(Target {
                    what: format!("{mib} MiB: workload stall of a live checkpoint ≤ 1.05× Go's"),
                    measured: format!("{} ms vs {} ms (×{:.2})", num(c), num(g), c / g),
                    met: Some(c <= 1.05 * g),
                });
            }
        }
        for count in &self.cfg.diff_files {
            let mib = self.cfg.diff_mib;
            // A stall that does not grow with the diff where the filesystem clones extents (xfs):
            // the Go shim, which captures none, is the stall without it. On the default disk
            // (the copying path) the stall is reported, with no goal.
            for (fs, goal) in [("xfs", true), ("", false)] {
                let key = super::diff::key("stall", fs, *count);
                if let (Some(g), Some(c)) = (r.median(&key, go), r.median(&key, cu)) {
                    let on = match fs {
                        "" => "the default disk (copying path)",
                        _ => "xfs (reflink)",
                    };
                    t.push(Target {
                        what: format!(
                            "{on}: stall with a {mib} MiB rootfs diff as {count} file(s) ≤ 1.5× the stall without one"
                        ),
                        measured: format!(
                            "{} ms vs {} ms (the Go shim's, which captures no diff; ×{:.2})",
                            num(c),
                            num(g),
                            c / g
                        ),
                        met: goal.then_some(c <= 1.5 * g),
                    });
                }
            }
            // The copying path's capture (in the stop), an earlier goal.
            if let Some(c) = r.median(&super::diff::key("capture", "", *count), cu) {
                t.push(Target {
                    what: format!(
                        "default disk: rootfs diff capture, {mib} MiB as {count} file(s) ≥ 1 GB/s"
                    ),
                    measured: format!("{c:.2} GB/s"),
                    met: Some(c >= 1.0),
                });
            }
            let apply_goal = if *count == 1 { 1.0 } else { 0.6 };
            for fs in ["", "xfs"] {
                let on = match fs {
                    "" => "default disk",
                    _ => "xfs",
                };
                if let Some(c) = r.median(&super::diff::key("apply_shim", fs, *count), cu) {
                    t.push(Target {
                        what: format!(
                            "{on}: rootfs diff apply (the shim's own time), {mib} MiB as {count} file(s) ≥ {apply_goal} GB/s"
                        ),
                        measured: match r.median(&super::diff::key("copy", fs, *count), cu) {
                            Some(copy) => format!(
                                "{c:.2} GB/s (a plain copy of the same files on this disk: {copy:.2} GB/s)"
                            ),
                            None => format!("{c:.2} GB/s"),
                        },
                        met: Some(c >= apply_goal),
                    });
                }
            }
        }
        if let (Some(g), Some(c)) = (r.median("restore_total", go), r.median("restore_total", cu)) {
            t.push(Target {
                what: format!(
                    "restore latency ({} MiB, Create + Start) ≤ 0.9× Go's",
                    self.cfg.restore_mib
                ),
                measured: format!("{} ms vs {} ms (×{:.2})", num(c), num(g), c / g),
                met: Some(c <= 0.9 * g),
            });
        }
        t.append(&mut self.res.targets);
        self.res.targets = t;
    }

    /// The custom shim's phases next to the raw runc checkpoint (the floor), per size.
    pub fn phase_table(&self) -> String {
        let r = &self.res;
        let mut md = String::new();
        if self.cfg.ckpt_sizes.iter().all(|(mib, _)| {
            r.median(&format!("phase_total_{mib}"), Runtime::Custom)
                .is_none()
        }) {
            return md;
        }
        let _ = writeln!(
            md,
            "\n## Live checkpoint: the custom shim's phases next to raw runc (medians, ms)\n"
        );
        let _ = writeln!(
            md,
            "| workload | freeze | dump | diff | thaw | shim bracket | raw runc checkpoint | bracket − raw | custom RPC | Go RPC | stall custom | stall Go | stall raw runc |"
        );
        let _ = writeln!(md, "|---|---|---|---|---|---|---|---|---|---|---|---|---|");
        let f = |key: String, rt| r.median(&key, rt).map(num).unwrap_or_else(|| "—".into());
        for &(mib, _) in &self.cfg.ckpt_sizes {
            let cu = Runtime::Custom;
            let go = Runtime::RuncV2;
            let over = match (
                r.median(&format!("phase_total_{mib}"), cu),
                r.median(&format!("raw_runc_{mib}"), go),
            ) {
                (Some(a), Some(b)) => num(a - b),
                _ => "—".into(),
            };
            let _ = writeln!(
                md,
                "| {mib} MiB | {} | {} | {} | {} | {} | {} | {over} | {} | {} | {} | {} | {} |",
                f(format!("phase_freeze_{mib}"), cu),
                f(format!("phase_dump_{mib}"), cu),
                f(format!("phase_diff_{mib}"), cu),
                f(format!("phase_thaw_{mib}"), cu),
                f(format!("phase_total_{mib}"), cu),
                f(format!("raw_runc_{mib}"), go),
                f(format!("ckpt_rpc_{mib}"), cu),
                f(format!("ckpt_rpc_{mib}"), go),
                f(format!("stall_{mib}"), cu),
                f(format!("stall_{mib}"), go),
                f(format!("raw_stall_{mib}"), go),
            );
        }
        let _ = writeln!(
            md,
            "\nThe RPC time includes containerd's own work around the shim (it tars the checkpoint \
             directory into the content store), which both runtimes pay; the shim bracket is \
             what the custom shim measured from freeze to thaw. The stall is the longest pause the \
             workload saw between two iterations ({} µs sleep each).",
            self.cfg.sleep_us
        );
        md
    }
}
