//! Moving a container from host A to host B (integration::hosts: two containerds in network
//! namespaces of their own, a registry between them), side by side:
//!
//! - *custom*: `container-migrate migrate --via stream` with io.containerd.custom.v2;
//! - *Go*: the same move by hand with `ctr` and io.containerd.runc.v2, as the containerd docs
//!   have it: `ctr container checkpoint --task --rw` (a checkpoint image), `ctr images push`, on B
//!   `ctr images pull` and `ctr container restore --live --rw`.
//!
//! Downtime is the time from the source's stop (our pause, or the start of ctr's checkpoint,
//! which pauses) to the destination's task running; the base image is on B beforehand for both.
//! "raw" is what CRIU itself takes for the same workload: a local dump to disk (a live checkpoint
//! of the container just before the move, the shim's record) plus the restore in the move (the
//! destination's Start).
//!
//! *lazy* (ours only: no other engine has it): `migrate --lazy` of `memhog` (memory filled from a
//! PRNG stream), its memory checked byte for byte on the destination after the move; the goal is
//! a downtime of at most a quarter of the full move's of the same size.

use std::process::Command;
use std::time::{Duration, Instant};

use integration::hosts::{TwoHosts, B_ADDR, RECEIVE_PORT};
use integration::{read_in_container, Runtime};

use super::measure::{poll, run_ok};
use super::report::{num, Target};
use super::scenarios::{check_interrupted, log, ms, order, settle_disk, Bench, BENCH_IMAGE};

const T: Duration = Duration::from_secs(600);

impl Bench<'_> {
    pub fn migrate(&mut self) -> Result<(), String> {
        let (sizes, rounds) = self.cfg.migrate.clone();
        let g = "Migration between two hosts (two containerds, a registry)";
        for mib in &sizes {
            let what = |s: &str| format!("{mib} MiB: {s}");
            let r = &mut self.res;
            r.group(g)
                .lower(
                    format!("mig_down_{mib}"),
                    "migration (ms)",
                    what("downtime (source stops → destination runs)"),
                    "ms",
                )
                .lower(
                    format!("mig_total_{mib}"),
                    "migration (ms)",
                    what("total"),
                    "ms",
                )
                .lower(
                    format!("mig_lazy_down_{mib}"),
                    "migration (ms)",
                    what("lazy: downtime (runs on the destination before its memory arrived)"),
                    "ms",
                )
                .lower(
                    format!("mig_lazy_total_{mib}"),
                    "migration (ms)",
                    what("lazy: total (until the destination has every page)"),
                    "ms",
                )
                .lower(
                    format!("mig_raw_{mib}"),
                    "migration (ms)",
                    what("raw CRIU dump (local disk) + restore"),
                    "ms",
                );
        }
        let h = TwoHosts::start();
        let image = h.publish(&self.cfg.image, BENCH_IMAGE, "shimbench:latest", true);
        for mib in sizes {
            for round in 0..rounds {
                log(format!("migrate {mib} MiB, round {}/{rounds}", round + 1));
                for rt in order(round) {
                    check_interrupted()?;
                    settle_disk();
                    let id = format!(
                        "mig-{}-{mib}-{round}",
                        if rt == Runtime::Custom { "cu" } else { "go" }
                    );
                    run_workload(&h, rt, &image, &id, mib)?;
                    let (down, total, raw) = match rt {
                        Runtime::Custom => move_ours(&h, &id)?,
                        Runtime::RuncV2 => move_by_hand(&h, &id, round)?,
                    };
                    self.res.add(&format!("mig_down_{mib}"), rt, down);
                    self.res.add(&format!("mig_total_{mib}"), rt, total);
                    if let Some(raw) = raw {
                        self.res.add(&format!("mig_raw_{mib}"), rt, raw);
                    }
                    h.b.ctr(["tasks", "kill", "-s", "KILL", &id]);
                    poll("the moved task gone", T, || {
                        h.b.task(&id)
                            .is_none_or(|t| t.status == "STOPPED")
                            .then_some(())
                    })?;
                    h.b.ctr(["tasks", "delete", &id]);
                    h.b.ctr(["containers", "delete", &id]);
                }
                // Lazy, ours only (no other engine has it): memory filled from a PRNG stream,
                // every byte checked on the destination once the pages are all there.
                check_interrupted()?;
                let id = format!("mig-lazy-{mib}-{round}");
                run_memhog(&h, &image, &id, mib)?;
                let (down, total) = move_lazy(&h, &id)?;
                self.res
                    .add(&format!("mig_lazy_down_{mib}"), Runtime::Custom, down);
                self.res
                    .add(&format!("mig_lazy_total_{mib}"), Runtime::Custom, total);
                h.b.ctr(["tasks", "kill", "-s", "KILL", &id]);
                poll("the moved task gone", T, || {
                    h.b.task(&id)
                        .is_none_or(|t| t.status == "STOPPED")
                        .then_some(())
                })?;
                h.b.ctr(["tasks", "delete", &id]);
                h.b.ctr(["containers", "delete", &id]);
            }
            let r = &self.res;
            let cu = Runtime::Custom;
            // The goal is set where memory dominates the downtime (1 GiB and up).
            if let (true, Some(lazy), Some(full)) = (
                mib >= 1024,
                r.median(&format!("mig_lazy_down_{mib}"), cu),
                r.median(&format!("mig_down_{mib}"), cu),
            ) {
                let total = r.median(&format!("mig_lazy_total_{mib}"), cu);
                self.res.targets.push(Target {
                    what: format!("{mib} MiB: lazy migration downtime ≤ 25% of the full one's"),
                    measured: format!(
                        "{} ms vs {} ms full ({:.0}%); the pages all arrived {} ms after the start, every byte checked",
                        num(lazy),
                        num(full),
                        100.0 * lazy / full,
                        total.map(num).unwrap_or_else(|| "—".into())
                    ),
                    met: Some(lazy <= full * 0.25),
                });
            }
            let r = &self.res;
            if let (Some(d), Some(raw)) = (
                r.median(&format!("mig_down_{mib}"), cu),
                r.median(&format!("mig_raw_{mib}"), cu),
            ) {
                let go = r.median(&format!("mig_down_{mib}"), Runtime::RuncV2);
                self.res.targets.push(Target {
                    what: format!("{mib} MiB: migration downtime ≤ raw CRIU dump + restore + 20%"),
                    measured: format!(
                        "{} ms vs raw {} ms (×{:.2}; limit {} ms); by hand with ctr and the Go shim {} ms",
                        num(d),
                        num(raw),
                        d / raw,
                        num(raw * 1.2),
                        go.map(num).unwrap_or_else(|| "—".into())
                    ),
                    met: Some(d <= raw * 1.2),
                });
            }
        }
        Ok(())
    }
}

/// Runs `cmd` from `image` as `id` on A and waits until its report file `ready` appears (the
/// workload's memory is touched, or filled).
fn run_on_a(
    h: &TwoHosts,
    rt: Runtime,
    image: &str,
    id: &str,
    cmd: &[&str],
    ready: &str,
) -> Result<(), String> {
    let mut args = vec!["run", "-d", "--runtime", rt.name(), image, id];
    args.extend_from_slice(cmd);
    let out = h.a.ctr(&args);
    if !out.status.success() {
        return Err(format!("ctr run {id}: {}", integration::show(&out)));
    }
    poll(&format!("{id} ready ({ready})"), T, || {
        read_in_container(h.a.task(id)?.pid, ready).map(|_| ())
    })
}

/// Runs the workload holding `mib` MiB on A and waits until it touched it all.
fn run_workload(h: &TwoHosts, rt: Runtime, image: &str, id: &str, mib: u64) -> Result<(), String> {
    run_on_a(h, rt, image, id, &["workload", &mib.to_string()], "/maxgap")
}

/// Runs memhog holding `mib` MiB filled from a PRNG stream on A (custom shim), until filled.
fn run_memhog(h: &TwoHosts, image: &str, id: &str, mib: u64) -> Result<(), String> {
    let mib = mib.to_string();
    run_on_a(
        h,
        Runtime::Custom,
        image,
        id,
        &["memhog", &mib, "777"],
        "/memhog",
    )
}

/// memhog's `verified` and `bad` counts on B.
fn memhog_check(h: &TwoHosts, id: &str) -> Option<(u64, u64)> {
    let s = read_in_container(h.b.task(id)?.pid, "/memhog")?;
    let f = |k: &str| -> Option<u64> {
        s.split_whitespace()
            .find_map(|w| w.strip_prefix(k)?.strip_prefix('='))?
            .parse()
            .ok()
    };
    Some((f("verified")?, f("bad")?))
}

/// A lazy move of `id` A → B: (downtime, total) in ms; fails unless every byte arrived intact.
fn move_lazy(h: &TwoHosts, id: &str) -> Result<(f64, f64), String> {
    let r = migrate_to_b(h, id, &["--lazy"])?;
    h.b.ctr(["tasks", "kill", "-s", "SIGUSR1", id]);
    let (_, bad) = poll(&format!("{id} checking its memory"), T, || {
        memhog_check(h, id).filter(|(v, _)| *v > 0)
    })?;
    if bad != 0 {
        return Err(format!(
            "lazy migration of {id}: {bad} words of memory differ"
        ));
    }
    let f = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
    Ok((f("downtime_ms"), f("total_ms")))
}

/// The CRIU dump of `id` to local disk, in ms (a live checkpoint, the shim's record).
fn local_dump_ms(h: &TwoHosts, id: &str) -> Result<f64, String> {
    let file = h.dir().join(format!("{id}-local.tar"));
    let out = h.run_cli(
        &h.a,
        &[
            "--json",
            "checkpoint",
            id,
            "--compress",
            "none",
            "--export",
            file.to_str().unwrap_or(""),
        ],
    );
    let _ = std::fs::remove_file(&file);
    if !out.status.success() {
        return Err(format!(
            "local checkpoint {id}: {}",
            integration::show(&out)
        ));
    }
    result_line(&out.stdout)
        .and_then(|r| r["dump_ms"].as_f64())
        .ok_or_else(|| format!("local checkpoint {id}: no dump_ms"))
}

fn result_line(stdout: &[u8]) -> Option<serde_json::Value> {
    String::from_utf8_lossy(stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["event"] == "result")
}

/// `container-migrate migrate ID --to B ...extra` against a receiver on B; its result line.
fn migrate_to_b(h: &TwoHosts, id: &str, extra: &[&str]) -> Result<serde_json::Value, String> {
    let receiver = h.receiver(&[]);
    let target = format!("tcp://{B_ADDR}:{RECEIVE_PORT}");
    let mut args = vec!["--json", "migrate", id, "--to", &target];
    args.extend_from_slice(extra);
    let out = h.run_cli(&h.a, &args);
    let done = receiver.wait(T);
    if !out.status.success() || !done.status.success() {
        return Err(format!(
            "migrate {id} {}: {}\nreceiver: {}",
            extra.join(" "),
            integration::show(&out),
            integration::show(&done)
        ));
    }
    result_line(&out.stdout).ok_or_else(|| format!("migrate {id}: no result line"))
}

fn move_ours(h: &TwoHosts, id: &str) -> Result<(f64, f64, Option<f64>), String> {
    let dump = local_dump_ms(h, id)?;
    let r = migrate_to_b(h, id, &[])?;
    let f = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
    Ok((
        f("downtime_ms"),
        f("total_ms"),
        Some(dump + f("criu_restore_ms")),
    ))
}

fn ctr_in(h: &TwoHosts, on_b: bool, args: &[&str]) -> Result<Duration, String> {
    let host = if on_b { &h.b } else { &h.a };
    let mut c: Command = host.ctr_command();
    c.args(args);
    run_ok(&mut c, T).map(|(_, took)| took)
}

/// The move by hand with ctr: checkpoint image, push, pull, restore; the source goes after.
fn move_by_hand(h: &TwoHosts, id: &str, round: usize) -> Result<(f64, f64, Option<f64>), String> {
    let reference = format!("{}/ctr-checkpoint-{id}:{round}", h.registry());
    let t = Instant::now();
    ctr_in(
        h,
        false,
        &["containers", "checkpoint", "--task", "--rw", id, &reference],
    )?;
    // The source must not run on: it stops where the checkpoint was taken.
    h.a.ctr(["tasks", "kill", "-s", "KILL", id]);
    let stopped = t.elapsed();
    ctr_in(h, false, &["images", "push", "--plain-http", &reference])?;
    ctr_in(h, true, &["images", "pull", "--plain-http", &reference])?;
    ctr_in(
        h,
        true,
        &["containers", "restore", "--live", "--rw", id, &reference],
    )?;
    let total = t.elapsed();
    let _ = stopped;
    h.a.ctr(["tasks", "delete", "-f", id]);
    h.a.ctr(["containers", "delete", id]);
    Ok((ms(total), ms(total), None))
}
