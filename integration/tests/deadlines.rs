//! Callers that give up. The kubelet puts a deadline on every CRI call; containerd passes it on
//! to the shim, and ttrpc drops the request when it passes. A checkpoint, a restore's Create and
//! a restore's Start own their outcome: whatever moment the deadline hits, the container ends up
//! running and thawed (or restored and tracked), nothing partial stays in the bundle or in
//! containerd's temp dir, no runc or CRIU is left, and the next operation works.
//!
//! The moments are chosen from the phase timings of a first, unhurried checkpoint of the same
//! container (the shim's record in the checkpoint): before the freeze, during the rootfs diff,
//! during the CRIU dump. Only the custom shim applies; the bound on runc and CRIU themselves
//! (`CriuTimeout`) is tested with a runc that never gets going.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use containerd_client::tonic::Code;
use integration::checkpoint::{tar_member, SHIM_METADATA};
use integration::faults::{
    count, descendants_with_cmdline, entries_starting_with, freezer_state, list_dir,
    remove_container, run_with, runtime_dir, shim_pid, wait_count_advances, Api, CheckpointOptions,
    Daemon, COUNTER,
};
use integration::{poll, run_scenario, Containerd, Runtime};

const T: Duration = Duration::from_secs(60);

/// 256 MiB held in memory (the dump takes a while), 256 MiB written to the rootfs (so does the
/// diff), and the counter.
fn heavy_script() -> String {
    let bytes = 256u64 << 20;
    format!(
        "head -c {bytes} /dev/zero > /ballast; \
         (head -c {bytes} /dev/zero; sleep 100000) | tail -c {bytes} > /dev/null & {COUNTER}"
    )
}

/// Waits until [`heavy_script`] has written its whole /ballast.
fn wait_ballast(pid: u32) {
    poll("the ballast written", T, || {
        fs::metadata(format!("/proc/{pid}/root/ballast"))
            .ok()
            .filter(|m| m.len() == 256 << 20)
            .map(drop)
    });
}

/// The task is RUNNING, its cgroup THAWED, its counter moving.
fn assert_running_and_thawed(cd: &Containerd, id: &str, pid: u32, what: &str) {
    poll(format!("{what}: {id} RUNNING and THAWED"), T, || {
        let running = cd.task(id).map(|t| t.status) == Some("RUNNING".to_string());
        (running && freezer_state(cd, id).as_deref() == Some("THAWED")).then_some(())
    });
    wait_count_advances(pid, what);
}

/// No runc or CRIU left under the shim, no CRIU work dir or image links in the bundle, nothing of
/// a checkpoint in containerd's temp dir: no staging dir of the shim, and with `containerd_dirs`
/// none of containerd's own `ctrd-checkpoint*` either (a checkpoint's is removed by containerd;
/// a restore's by the shim once restored, but containerd leaks it when its own Create fails
/// before the shim is called, which a deadline can cause).
fn assert_settled(cd: &Containerd, id: &str, shim: i32, containerd_dirs: bool, what: &str) {
    poll(
        format!("{what}: runc and CRIU under shim {shim} gone"),
        T,
        || {
            (descendants_with_cmdline(shim, "runc").is_empty()
                && descendants_with_cmdline(shim, "criu").is_empty())
            .then_some(())
        },
    );
    let bundle = cd.bundle_dir(id);
    let mut left = Vec::new();
    let settled = integration::poll_until(T, || {
        left = [
            "criu-work-",
            "checkpoint-images",
            "criu-restore",
            ".custom-shim-staging",
        ]
        .iter()
        .flat_map(|p| entries_starting_with(&bundle, p))
        .map(|p| p.display().to_string())
        .collect();
        left.extend(list_dir(&runtime_dir(cd)).into_iter().filter(|n| {
            n.contains(".staging-") || (containerd_dirs && n.contains("ctrd-checkpoint"))
        }));
        left.is_empty().then_some(())
    });
    assert!(settled.is_some(), "{what}: left behind: {left:?}");
}

/// The phase timings of a checkpoint blob, from the shim's record in it.
fn phases(api: &Api, desc: &containerd_client::types::Descriptor) -> serde_json::Value {
    let blob = api.blob_path(desc);
    let meta = tar_member(&blob, SHIM_METADATA).expect("the shim's record in the checkpoint");
    let meta: serde_json::Value = serde_json::from_slice(&meta).expect("record is JSON");
    assert_eq!(meta["complete"], serde_json::json!(true), "{meta:#}");
    meta["phases"].clone()
}

/// The call failed on its deadline: gRPC's DeadlineExceeded (containerd's answer), or the
/// client's own Cancelled "Timeout expired" when the client stopped waiting first.
fn assert_gave_up(err: &integration::faults::RpcError, what: &str) {
    assert!(
        matches!(err.code, Code::DeadlineExceeded | Code::Cancelled),
        "{what}: the call should fail on its deadline: {err}"
    );
}

fn ms(v: &serde_json::Value, k: &str) -> f64 {
    v[k].as_f64().unwrap_or(0.0)
}

#[test]
fn checkpoint_deadline_at_every_moment_custom() {
    run_scenario(Runtime::Custom, |rt, cd| {
        let mut daemon = Daemon::new(cd);
        daemon.restart_with_private_runtime_dir();
        let id = "late";
        let pid = run_with(cd, rt, id, &[], &["sh", "-c", &heavy_script()]);
        wait_ballast(pid);
        wait_count_advances(pid, "before");
        let shim = shim_pid(cd, id);
        let mut api = Api::connect(cd);
        api.use_new_lease("deadlines");
        let opts = Some(CheckpointOptions::default().to_any());

        let first = api
            .checkpoint_blob(id, &CheckpointOptions::default())
            .unwrap_or_else(|e| panic!("an unhurried checkpoint: {e}"));
        let p = phases(&api, &first);
        eprintln!("phases of an unhurried checkpoint: {p}");
        // The files are taken in CRIU's stop, at its post-dump action: the diff is the end of
        // the dump (CRIU then only unlocks the network and lets the processes go).
        let diff_mid = ms(&p, "dump_ms") - ms(&p, "diff_ms") / 2.0;
        let dump_mid = (ms(&p, "dump_ms") - ms(&p, "diff_ms")) / 2.0;
        assert!(
            ms(&p, "diff_ms") > 20.0 && ms(&p, "dump_ms") > 20.0,
            "the diff and the dump must take long enough to be hit: {p}"
        );

        for (moment, deadline_ms) in [
            ("before the freeze", 1.0),
            ("during the CRIU dump", dump_mid),
            ("during the rootfs diff, in CRIU's stop", diff_mid),
        ] {
            let deadline = Duration::from_micros((deadline_ms * 1000.0) as u64);
            api.set_timeout(Some(deadline));
            let started = Instant::now();
            let result = api.checkpoint(id, opts.clone());
            api.set_timeout(None);
            eprintln!(
                "deadline {deadline:?} ({moment}): {:?} after {:?}",
                result.as_ref().map(|_| "ok"),
                started.elapsed()
            );
            let err = result.expect_err("a checkpoint cannot beat a deadline this short");
            assert_gave_up(&err, moment);

            assert_running_and_thawed(cd, id, pid, moment);
            assert_settled(cd, id, shim, true, moment);
            // The next checkpoint works and is whole.
            let next = api
                .checkpoint_blob(id, &CheckpointOptions::default())
                .unwrap_or_else(|e| panic!("the checkpoint after a deadline {moment}: {e}"));
            phases(&api, &next);
            assert_running_and_thawed(cd, id, pid, &format!("after the checkpoint {moment}"));
            assert_settled(
                cd,
                id,
                shim,
                true,
                &format!("after the checkpoint {moment}"),
            );
        }
        remove_container(cd, id);
    });
}

/// `ctr tasks pause`, again while runc answers "unable to freeze": right after a CRIU dump, the
/// v1 freezer can fail to settle within runc's tries (seen under load, with either shim).
fn pause(cd: &Containerd, id: &str) {
    let mut last = String::new();
    let paused = integration::poll_until(T, || {
        let out = cd.ctr(["tasks", "pause", id]);
        last = integration::show(&out);
        out.status.success().then_some(())
    });
    assert!(paused.is_some(), "ctr tasks pause {id}: {last}");
}

/// containerd's CRI pauses a task, checkpoints it with no options and resumes it with the same
/// context: once the caller's deadline has passed, that resume may come late or never (the Go
/// shim refuses a late one, and the task stays paused for good). The shim ends that pause itself.
/// A task paused by anyone else stays paused.
#[test]
fn cri_checkpoint_whose_caller_gives_up_is_resumed_by_the_shim_custom() {
    run_scenario(Runtime::Custom, |rt, cd| {
        let id = "cri";
        let cri = ["--annotation", "io.kubernetes.cri.container-type=container"];
        let pid = run_with(cd, rt, id, &cri, &["sh", "-c", &heavy_script()]);
        wait_ballast(pid);
        wait_count_advances(pid, "before");
        let mut api = Api::connect(cd);
        // A checkpoint whose caller gives up after 150 ms (a 256 MiB dump takes longer).
        let give_up_on = |api: &mut Api, opts, what: &str| {
            api.set_timeout(Some(Duration::from_millis(150)));
            let err = api
                .checkpoint(id, opts)
                .expect_err("a 256 MiB checkpoint cannot beat 150 ms");
            api.set_timeout(None);
            assert_gave_up(&err, what);
        };

        // As containerd's CRI does it, and its caller gives up.
        pause(cd, id);
        give_up_on(&mut api, None, "the CRI's checkpoint");
        assert_running_and_thawed(cd, id, pid, "after the CRI's caller gave up");

        // Paused by its user, then checkpointed with no options once the moment of a CRI
        // checkpoint's own pause has passed: the user's pause stays.
        pause(cd, id);
        std::thread::sleep(Duration::from_millis(3500)); // the CRI's pause window (3 s) passing
        give_up_on(&mut api, None, "a checkpoint of a task its user paused");
        // CRIU thaws the cgroup once it has seized the tasks and freezes it again at the end: the
        // dump, which goes on without its caller, is over when the cgroup is FROZEN again.
        let paused_and_frozen = || {
            let paused = cd.task(id).map(|t| t.status) == Some("PAUSED".to_string());
            (paused && freezer_state(cd, id).as_deref() == Some("FROZEN")).then_some(())
        };
        poll(
            "the dump ends with the task PAUSED and FROZEN",
            T,
            paused_and_frozen,
        );
        std::thread::sleep(Duration::from_secs(1)); // a resume, if one were coming, would be here
        assert_eq!(cd.task(id).map(|t| t.status).as_deref(), Some("PAUSED"));
        assert_eq!(freezer_state(cd, id).as_deref(), Some("FROZEN"));
        cd.ctr_ok(["tasks", "resume", id]);

        // A client that sends options (ctr, the kubelet through the Go shim's runtime name)
        // paused it itself: paused it stays.
        pause(cd, id);
        give_up_on(
            &mut api,
            Some(CheckpointOptions::default().to_any()),
            "a paused task's checkpoint",
        );
        poll("the task stays PAUSED and FROZEN", T, || {
            let paused = cd.task(id).map(|t| t.status) == Some("PAUSED".to_string());
            (paused && freezer_state(cd, id).as_deref() == Some("FROZEN")).then_some(())
        });
        cd.ctr_ok(["tasks", "resume", id]);
        assert_running_and_thawed(cd, id, pid, "resumed by its user");
        remove_container(cd, id);
    });
}

#[test]
fn checkpoint_past_criu_timeout_is_killed_and_rolled_back_custom() {
    run_scenario(Runtime::Custom, |rt, cd| {
        // A runc that takes forever to checkpoint (the shim must kill it and what it started).
        let runc = integration::host::which("runc");
        let wrapper = cd.dir().join("slow-runc");
        fs::write(
            &wrapper,
            format!(
                "#!/bin/sh\ncase \" $* \" in *\" checkpoint \"*) sleep 1000 ;; esac\nexec {} \"$@\"\n",
                runc
            ),
        )
        .unwrap();
        fs::set_permissions(&wrapper, fs::Permissions::from_mode(0o755)).unwrap();
        let config = cd.dir().join("runtime.toml");
        fs::write(
            &config,
            format!("BinaryName = \"{}\"\nCriuTimeout = 2\n", wrapper.display()),
        )
        .unwrap();
        let id = "slowrunc";
        let pid = run_with(
            cd,
            rt,
            id,
            &["--runtime-config-path", config.to_str().unwrap()],
            &["sh", "-c", COUNTER],
        );
        wait_count_advances(pid, "before");
        let shim = shim_pid(cd, id);
        let api = Api::connect(cd);
        let started = Instant::now();
        let err = api
            .checkpoint(id, Some(CheckpointOptions::default().to_any()))
            .expect_err("a checkpoint whose runc never finishes must fail");
        eprintln!("after {:?}: {err}", started.elapsed());
        assert_eq!(err.code, Code::DeadlineExceeded, "{err}");
        assert!(
            err.message.contains("did not finish within") && err.message.contains("CriuTimeout"),
            "the error should say runc ran out of time and what bounds it: {err}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the bound is 2 s: the shim did not stop waiting"
        );
        assert!(
            descendants_with_cmdline(shim, "sleep 1000").is_empty(),
            "runc's process group must be killed"
        );
        assert_running_and_thawed(cd, id, pid, "after the timeout");
        assert_settled(cd, id, shim, true, "after the timeout");
        remove_container(cd, id);
    });
}

#[test]
fn restore_whose_caller_gives_up_custom() {
    run_scenario(Runtime::Custom, |rt, cd| {
        let mut daemon = Daemon::new(cd);
        daemon.restart_with_private_runtime_dir();
        let pid = run_with(cd, rt, "src", &[], &["sh", "-c", &heavy_script()]);
        wait_ballast(pid);
        wait_count_advances(pid, "before");
        let mut api = Api::connect(cd);
        api.use_new_lease("restore-deadlines");
        let desc = api
            .checkpoint_blob("src", &CheckpointOptions::default())
            .unwrap_or_else(|e| panic!("checkpoint: {e}"));
        let at_checkpoint = count(pid).unwrap_or(0);

        // An unhurried restore first, to time its phases: containerd unpacks the blob and starts
        // a shim before the shim's Create applies the diff (its own time is in the bundle).
        api.create_container_like("src", "r0", Runtime::Custom);
        let started = Instant::now();
        api.create_task("r0", Some(desc.clone()), None)
            .unwrap_or_else(|e| panic!("Create r0: {e}"));
        let create_ms = started.elapsed().as_secs_f64() * 1000.0;
        let record = fs::read(cd.bundle_dir("r0").join("custom-shim-restore.json"))
            .expect("the shim's restore record in the bundle");
        let record: serde_json::Value = serde_json::from_slice(&record).unwrap();
        let apply_ms = ms(&record, "apply_ms");
        assert_eq!(
            record["archive_used_up"].as_bool(),
            Some(true),
            "the apply uses up containerd's own unpacked copy: {record}"
        );
        let started = Instant::now();
        let r0 = api
            .start("r0", "")
            .unwrap_or_else(|e| panic!("Start r0: {e}"));
        let start_ms = started.elapsed().as_secs_f64() * 1000.0;
        eprintln!("unhurried restore: Create {create_ms:.0} ms (apply {apply_ms:.0} ms), Start {start_ms:.0} ms");
        poll("r0 counts on from the checkpoint", T, || {
            count(r0).filter(|c| *c > at_checkpoint).map(drop)
        });
        remove_container(cd, "r0");
        assert!(apply_ms > 20.0, "the apply must take long enough to be hit");

        // Create gives up while the 256 MiB diff is being applied: nothing of it stays. The
        // unpack before it gets faster once the blob is in the page cache: a deadline that
        // turned out too late is tried again, earlier.
        api.create_container_like("src", "r1", Runtime::Custom);
        let mut deadline_ms = create_ms - apply_ms / 2.0;
        let err = loop {
            let deadline = Duration::from_micros((deadline_ms * 1000.0) as u64);
            api.set_timeout(Some(deadline));
            let result = api.create_task("r1", Some(desc.clone()), None);
            api.set_timeout(None);
            match result {
                Err(err) => {
                    eprintln!("Create with a deadline of {deadline:?}: {err}");
                    break err;
                }
                Ok(_) if deadline_ms > 20.0 => {
                    eprintln!("Create beat a deadline of {deadline:?}: trying earlier");
                    api.delete_task("r1")
                        .unwrap_or_else(|e| panic!("delete r1: {e}"));
                    deadline_ms *= 0.7;
                }
                Ok(_) => panic!("Create beat every deadline down to {deadline:?}"),
            }
        };
        assert_gave_up(&err, "Create");
        poll("the abandoned r1 task to be gone", T, || {
            cd.task("r1").is_none().then_some(())
        });
        let mut left = Vec::new();
        let clean = integration::poll_until(T, || {
            left = cd.leftovers("r1");
            left.retain(|l| !l.starts_with("container record"));
            left.is_empty().then_some(())
        });
        assert!(clean.is_some(), "an abandoned Create left: {left:?}");
        // The checkpoint is not lost: the same restore, unhurried, works.
        api.create_task("r1", Some(desc.clone()), None)
            .unwrap_or_else(|e| panic!("Create after an abandoned one: {e}"));
        let r1 = api
            .start("r1", "")
            .unwrap_or_else(|e| panic!("Start after an abandoned Create: {e}"));
        poll("r1 counts on from the checkpoint", T, || {
            count(r1).filter(|c| *c > at_checkpoint).map(drop)
        });

        // Start gives up while CRIU restores 256 MiB: the container is restored and tracked.
        // A deadline that turned out too late is tried again, earlier, on a new container; one
        // so early that the request never reached the shim leaves the task created, and the
        // next try starts it, later.
        let mut name = "r2".to_string();
        api.create_container_like("src", &name, Runtime::Custom);
        api.create_task(&name, Some(desc.clone()), None)
            .unwrap_or_else(|e| panic!("Create {name}: {e}"));
        let mut deadline_ms = start_ms / 2.0;
        let mut attempt = 0;
        let t = loop {
            attempt += 1;
            assert!(attempt <= 8, "no deadline hit a restore in {attempt} tries");
            let deadline = Duration::from_micros((deadline_ms * 1000.0) as u64);
            api.set_timeout(Some(deadline));
            let result = api.start(&name, "");
            api.set_timeout(None);
            match result {
                Ok(_) => {
                    eprintln!("Start beat a deadline of {deadline:?}: trying earlier");
                    remove_container(cd, &name);
                    name = format!("r2-{attempt}");
                    api.create_container_like("src", &name, Runtime::Custom);
                    api.create_task(&name, Some(desc.clone()), None)
                        .unwrap_or_else(|e| panic!("Create {name}: {e}"));
                    deadline_ms *= 0.6;
                }
                Err(err) => {
                    eprintln!("Start with a deadline of {deadline:?}: {err}");
                    assert_gave_up(&err, "Start");
                    let running = integration::poll_until(Duration::from_secs(10), || {
                        cd.task(&name).filter(|t| t.status == "RUNNING")
                    });
                    match running {
                        Some(t) => break t,
                        None => deadline_ms *= 1.5,
                    }
                }
            }
        };
        poll(
            "the restored container counts on from the checkpoint",
            T,
            || count(t.pid).filter(|c| *c > at_checkpoint).map(drop),
        );
        let shim = shim_pid(cd, &name);
        assert_settled(cd, &name, shim, false, "a restore whose Start gave up");

        for id in ["r1", name.as_str(), "src"] {
            remove_container(cd, id);
        }
    });
}
