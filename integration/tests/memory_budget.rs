//! Memory budget of an idle custom shim, as conmon-rs keeps its MAX_RSS_KB: the shim lives as long
//! as its container, one per container, so what it holds while idle is what a node pays per pod.
//!
//! Measured here (2 cores, kernel 6.18, one `sleep` container, sampled over two idle seconds
//! after start; RSS from /proc/<pid>/smaps_rollup), five runs each:
//!
//! | binary                                   | idle RSS        |
//! |------------------------------------------|-----------------|
//! | debug build (what `make test` runs)      | 14.1–14.5 MiB   |
//! | release build (opt-level "s", fat LTO)   | 5.7 MiB         |
//! | containerd-shim-runc-v2 (Go, reference)  | 17.5–18 MiB     |
//!
//! Most of the debug build's RSS is the text of a 150 MB unoptimised binary. The budget, 24 MiB,
//! leaves it ~10 MiB of headroom — enough never to flake on a busy machine or with debug logging —
//! and still catches a shim that starts holding buffers, a second runtime, or a leak at start.
//! `SHIMTEST_MAX_SHIM_RSS_KIB` sets a tighter budget, e.g. 8192 with `SHIM_BINARY` pointing at the
//! release build. `make bench` reports the release figures next to the Go shim's.

use std::time::Duration;

use integration::{run_scenario, skip_custom, Runtime};

/// Budget for the idle shim's resident set, KiB (`SHIMTEST_MAX_SHIM_RSS_KIB` overrides it).
const MAX_RSS_KIB: u64 = 24 * 1024;

fn budget_kib() -> u64 {
    std::env::var("SHIMTEST_MAX_SHIM_RSS_KIB")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(MAX_RSS_KIB)
}

fn smaps_rollup(pid: i32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    text.lines().find_map(|l| {
        l.strip_prefix(field)?
            .trim()
            .strip_suffix("kB")?
            .trim()
            .parse()
            .ok()
    })
}

#[test]
fn idle_custom_shim_stays_within_rss_budget() {
    if skip_custom() {
        eprintln!("skipped: SHIMTEST_SKIP_CUSTOM is set");
        return;
    }
    run_scenario(Runtime::Custom, |rt, cd| {
        cd.run_detached(rt, "idle", &["sleep", "100000"]);
        let shims = cd.shims_for("idle");
        assert_eq!(
            shims.len(),
            1,
            "one shim expected for the container: {shims:?}"
        );
        let pid = shims[0].pid;
        // The largest of a few samples over two idle seconds.
        let mut rss = 0;
        let mut pss = 0;
        for _ in 0..4 {
            std::thread::sleep(Duration::from_millis(500));
            rss = rss.max(smaps_rollup(pid, "Rss:").expect("Rss in smaps_rollup"));
            pss = pss.max(smaps_rollup(pid, "Pss:").expect("Pss in smaps_rollup"));
        }
        let budget = budget_kib();
        eprintln!(
            "idle custom shim (pid {pid}, {}): RSS {rss} KiB, PSS {pss} KiB, budget {budget} KiB",
            shims[0].argv.first().map(String::as_str).unwrap_or("?")
        );
        assert!(
            rss < budget,
            "idle custom shim RSS {rss} KiB is over the budget of {budget} KiB"
        );
    });
}
