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

use std::process::Command;
use std::time::{Duration, Instant};

use integration::hosts::{TwoHosts, B_ADDR, RECEIVE_PORT};
use integration::{read_in_container, Runtime};

use super::measure::{poll, run_ok};
use super::report::{num, Target};
use super::scenarios::{check_interrupted, log, ms, order, Bench, BENCH_IMAGE};

const T: Duration = Duration::from_secs(600);

impl Bench<'_> {
    pub fn migrate(&mut self) -> Result<(), String> {
        let (sizes, rounds) = self.cfg.migrate.clone();
        let g = "Migration between two hosts (two containerds, a registry)";
        for mib in &sizes {
            let what = |s: &str| format!("{mib} MiB: {s}");
            let r = &mut self.res;
            r.declare(
                &format!("mig_down_{mib}"),
                g,
                "migration (ms)",
                &what("downtime (source stops → destination runs)"),
                "ms",
                false,
            );
            r.declare(
                &format!("mig_total_{mib}"),
                g,
                "migration (ms)",
                &what("total"),
                "ms",
                false,
            );
            r.declare(
                &format!("mig_raw_{mib}"),
                g,
                "migration (ms)",
                &what("raw CRIU dump (local disk) + restore"),
                "ms",
                false,
            );
        }
        let h = TwoHosts::start();
        let image = h.publish(&self.cfg.image, BENCH_IMAGE, "shimbench:latest", true);
        for mib in sizes {
            for round in 0..rounds {
                log(format!("migrate {mib} MiB, round {}/{rounds}", round + 1));
                for rt in order(round) {
                    check_interrupted()?;
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
            }
            let r = &self.res;
            let cu = Runtime::Custom;
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

/// Runs the workload holding `mib` MiB on A and waits until it touched it all.
fn run_workload(h: &TwoHosts, rt: Runtime, image: &str, id: &str, mib: u64) -> Result<(), String> {
    let out = h.a.ctr([
        "run",
        "-d",
        "--runtime",
        rt.name(),
        image,
        id,
        "workload",
        &mib.to_string(),
    ]);
    if !out.status.success() {
        return Err(format!("ctr run {id}: {}", integration::show(&out)));
    }
    poll(&format!("{id} touching {mib} MiB"), T, || {
        read_in_container(h.a.task(id)?.pid, "/maxgap").map(|_| ())
    })
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

fn move_ours(h: &TwoHosts, id: &str) -> Result<(f64, f64, Option<f64>), String> {
    let dump = local_dump_ms(h, id)?;
    let receiver = h.receiver(&[]);
    let target = format!("tcp://{B_ADDR}:{RECEIVE_PORT}");
    let out = h.run_cli(&h.a, &["--json", "migrate", id, "--to", &target]);
    let done = receiver.wait(T);
    if !out.status.success() || !done.status.success() {
        return Err(format!(
            "migrate {id}: {}\nreceiver: {}",
            integration::show(&out),
            integration::show(&done)
        ));
    }
    let r = result_line(&out.stdout).ok_or_else(|| format!("migrate {id}: no result line"))?;
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
