//! Load: 20 containers, each checkpointed live through the API and restored as a new container,
//! all at once, twice. Everything restored runs on from where it was, the originals keep
//! running, and afterwards the shims hold no more fds than after the first round, nothing is a
//! zombie, no CRIU work dir stays in a bundle, no mount stays of a restored container, and the
//! shims' RSS is flat-ish.

use std::thread;
use std::time::{Duration, Instant};

use integration::faults::{
    containerd_pid, count, entries_starting_with, fd_count, freezer_state, rss_kib, run_with,
    runtime_dir, shim_pid, wait_count_advances, zombies_of, Api, CheckpointOptions, Daemon,
    COUNTER,
};
use integration::{host, poll_until, run_scenario, Containerd, Runtime, STATE_TIMEOUT};

const N: usize = 20;
const ROUNDS: usize = 2;

#[derive(Debug, Clone, Copy)]
struct Usage {
    fds: usize,
    rss_kib: u64,
}

fn usage(shims: &[(String, i32)]) -> Vec<Usage> {
    shims
        .iter()
        .map(|(_, pid)| Usage {
            fds: fd_count(*pid),
            rss_kib: rss_kib(*pid),
        })
        .collect()
}

/// Checkpoints `id` (leave running, under a lease) and restores it as `new_id`; the restored
/// init's pid and the counter value the checkpoint holds at least.
fn checkpoint_and_restore(cd: &Containerd, id: &str, new_id: &str) -> Result<(u32, u64), String> {
    let mut api = Api::connect(cd);
    api.use_new_lease(new_id);
    let pid_before = cd.task(id).map(|t| t.pid).ok_or("original gone")?;
    let before = count(pid_before).unwrap_or(0);
    let desc = api
        .checkpoint_blob(id, &CheckpointOptions::default())
        .map_err(|e| format!("checkpoint {id}: {e}"))?;
    let pid = api
        .restore_as_new(id, new_id, Runtime::Custom, &desc)
        .map_err(|e| format!("restore {id} as {new_id}: {e}"))?;
    Ok((pid, before))
}

fn remove_restored(cd: &Containerd, id: &str) -> Result<(), String> {
    let api = Api::connect(cd);
    api.kill(id, "", 9).map_err(|e| format!("kill {id}: {e}"))?;
    poll_until(STATE_TIMEOUT, || {
        (api.get(id, "").ok()?.1 == 3).then_some(())
    })
    .ok_or(format!("{id} did not stop"))?;
    api.delete_task(id)
        .map_err(|e| format!("delete task {id}: {e}"))?;
    let mut c = cd.ctr_command();
    c.args(["containers", "delete", id]);
    let out = c.output().map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!(
            "ctr containers delete {id}: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(())
}

#[test]
fn concurrent_checkpoint_and_restore_leak_nothing() {
    run_scenario(Runtime::Custom, |rt, cd| {
        let mut daemon = Daemon::new(cd);
        daemon.restart_with_private_runtime_dir();
        let started = Instant::now();
        let ids: Vec<String> = (0..N).map(|i| format!("load{i:02}")).collect();
        let pids: Vec<u32> = ids
            .iter()
            .map(|id| run_with(cd, rt, id, &[], &["sh", "-c", COUNTER]))
            .collect();
        let shims: Vec<(String, i32)> = ids
            .iter()
            .map(|id| (id.clone(), shim_pid(cd, id)))
            .collect();
        let baseline = usage(&shims);
        let mut after_round = Vec::new();
        eprintln!("{N} containers up in {:?}", started.elapsed());

        for round in 0..ROUNDS {
            let t = Instant::now();
            let results: Vec<Result<(String, u32, u64), String>> = thread::scope(|s| {
                let handles: Vec<_> = ids
                    .iter()
                    .map(|id| {
                        let new_id = format!("{id}-r{round}");
                        s.spawn(move || {
                            checkpoint_and_restore(cd, id, &new_id)
                                .map(|(pid, before)| (new_id, pid, before))
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().unwrap_or_else(|_| Err("thread panicked".into())))
                    .collect()
            });
            let errors: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
            assert!(
                errors.is_empty(),
                "round {round}: {} of {N} checkpoint+restore failed:\n  {}",
                errors.len(),
                errors
                    .iter()
                    .map(|e| e.as_str())
                    .collect::<Vec<_>>()
                    .join("\n  ")
            );
            eprintln!(
                "round {round}: {N} checkpoints + restores in {:?}",
                t.elapsed()
            );
            let restored: Vec<(String, u32, u64)> =
                results.into_iter().map(Result::unwrap).collect();
            for (new_id, pid, before) in &restored {
                let t = cd.wait_task_status(new_id, "RUNNING", STATE_TIMEOUT);
                assert_eq!(t.pid, *pid, "{new_id}");
                let now = wait_count_advances(*pid, new_id);
                assert!(
                    now > *before,
                    "{new_id} resumed at {now}, behind the original's {before} before the checkpoint"
                );
            }
            for (id, pid) in ids.iter().zip(&pids) {
                assert_eq!(freezer_state(cd, id).as_deref(), Some("THAWED"), "{id}");
                wait_count_advances(*pid, id);
            }
            let t = Instant::now();
            let removed: Vec<Result<(), String>> = thread::scope(|s| {
                let handles: Vec<_> = restored
                    .iter()
                    .map(|(new_id, _, _)| s.spawn(move || remove_restored(cd, new_id)))
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().unwrap_or_else(|_| Err("thread panicked".into())))
                    .collect()
            });
            let errors: Vec<&String> = removed.iter().filter_map(|r| r.as_ref().err()).collect();
            assert!(
                errors.is_empty(),
                "round {round}: removing restored: {errors:?}"
            );
            for (new_id, _, _) in &restored {
                cd.assert_nothing_left(new_id);
            }
            eprintln!(
                "round {round}: restored containers removed in {:?}",
                t.elapsed()
            );
            after_round.push(usage(&shims));
        }

        // fds: the second round leaves no more than the first; neither much more than before.
        let last = &after_round[ROUNDS - 1];
        let first = &after_round[0];
        let mut report = Vec::new();
        let mut leaks = Vec::new();
        for (i, (id, pid)) in shims.iter().enumerate() {
            report.push(format!(
                "{id} (shim {pid}): fds {} -> {} -> {}, RSS {} -> {} -> {} KiB",
                baseline[i].fds,
                first[i].fds,
                last[i].fds,
                baseline[i].rss_kib,
                first[i].rss_kib,
                last[i].rss_kib
            ));
            if last[i].fds > first[i].fds || last[i].fds > baseline[i].fds + 2 {
                leaks.push(format!(
                    "{id}: fds {} -> {} -> {}",
                    baseline[i].fds, first[i].fds, last[i].fds
                ));
            }
            // Generous: allocator slack, not a leak per checkpoint.
            if last[i].rss_kib > first[i].rss_kib + 8 * 1024
                || last[i].rss_kib > baseline[i].rss_kib * 2 + 8 * 1024
            {
                leaks.push(format!(
                    "{id}: RSS {} -> {} -> {} KiB",
                    baseline[i].rss_kib, first[i].rss_kib, last[i].rss_kib
                ));
            }
        }
        eprintln!("{}", report.join("\n"));
        assert!(leaks.is_empty(), "shims grew:\n  {}", leaks.join("\n  "));

        // No zombies under the shims or containerd.
        let mut parents: Vec<i32> = shims.iter().map(|(_, p)| *p).collect();
        parents.extend(containerd_pid(cd));
        let mut zombies = Vec::new();
        let none = poll_until(Duration::from_secs(5), || {
            zombies = zombies_of(&parents);
            zombies.is_empty().then_some(())
        });
        assert!(
            none.is_some(),
            "zombies of the shims or containerd: {zombies:?}"
        );

        // No CRIU work dirs or restore copies in the originals' bundles; one mount each.
        for id in &ids {
            let bundle = cd.bundle_dir(id);
            let work = entries_starting_with(&bundle, "criu-");
            assert!(
                work.is_empty(),
                "{id}: CRIU leftovers in the bundle: {work:?}"
            );
        }
        let mounts = host::mounts_under(cd.dir());
        assert_eq!(
            mounts.len(),
            N,
            "one rootfs mount per original container expected: {:?}",
            mounts.iter().map(|m| &m.mount_point).collect::<Vec<_>>()
        );
        for id in &ids {
            assert_eq!(
                cd.task(id).map(|t| t.status),
                Some("RUNNING".into()),
                "{id}"
            );
        }
        // containerd 2.1 never removes the dir it unpacks a checkpoint into for Tasks.Create.
        let leaked = entries_starting_with(&runtime_dir(cd), "ctrd-checkpoint");
        eprintln!(
            "containerd's restore temp dirs left in {}: {} (one per restore: containerd's)",
            runtime_dir(cd).display(),
            leaked.len()
        );
        eprintln!("total {:?}", started.elapsed());
    });
}
