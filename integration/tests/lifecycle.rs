//! Running to exit: exit codes through `ctr run --rm`, through create + `ctr task start`
//! (attached, and detached + delete), many short-lived containers, and what delete leaves behind.

use std::time::Duration;

use integration::{both_runtimes, code, host, show, stderr, stdout, STATE_TIMEOUT};

both_runtimes!(run_exit_code, |rt, cd| {
    for (id, cmd, want) in [
        ("exit0", vec!["true"], 0),
        ("exit3", vec!["sh", "-c", "exit 3"], 3),
        ("exit-false", vec!["false"], 1),
        ("exit255", vec!["sh", "-c", "exit 255"], 255),
    ] {
        let out = cd.run(rt, id, &cmd);
        assert_eq!(code(&out), Some(want), "{id}: {}", show(&out));
    }
    for id in ["exit0", "exit3", "exit-false", "exit255"] {
        cd.assert_nothing_left(id);
    }
});

both_runtimes!(run_missing_binary_fails, |rt, cd| {
    // The process cannot be started: ctr run must fail (not hang, not report success), and the
    // failed start must not leave anything behind.
    let out = cd.run(rt, "nobin", &["/no/such/binary"]);
    assert!(!out.status.success(), "{}", show(&out));
    assert!(cd.tasks().is_empty(), "tasks left: {:?}", cd.tasks());
    cd.assert_nothing_left("nobin");
});

both_runtimes!(create_start_attached_exit_code, |rt, cd| {
    cd.create_container(rt, "att", &["sh", "-c", "echo started; exit 7"]);
    // `ctr task start` without -d attaches, waits, deletes the task and returns its exit code.
    let out = cd.start_task("att", false);
    assert_eq!(code(&out), Some(7), "{}", show(&out));
    assert_eq!(stdout(&out), "started\n");
    assert!(
        cd.task("att").is_none(),
        "ctr task start left the task: {:?}",
        cd.task("att")
    );
    cd.ctr_ok(["containers", "delete", "att"]);
    cd.assert_nothing_left("att");
});

both_runtimes!(create_start_detached_then_delete, |rt, cd| {
    cd.create_container(rt, "det", &["sh", "-c", "exit 9"]);
    let out = cd.start_task("det", true);
    assert!(out.status.success(), "{}", show(&out));
    let t = cd.wait_task_status("det", "STOPPED", STATE_TIMEOUT);
    assert!(t.pid > 0, "{t:?}");
    // Delete reports the exit status the shim kept: ctr warns about a non-zero one.
    let out = cd.ctr(["tasks", "delete", "det"]);
    assert!(out.status.success(), "{}", show(&out));
    assert!(
        stderr(&out).contains("exit code 9"),
        "delete did not report exit code 9: {}",
        show(&out)
    );
    assert!(cd.task("det").is_none());
    cd.ctr_ok(["containers", "delete", "det"]);
    cd.assert_nothing_left("det");
});

both_runtimes!(short_lived_50_in_a_row, |rt, cd| {
    for i in 0..50 {
        let id = format!("short-{i}");
        let out = cd.run(rt, &id, &["true"]);
        assert_eq!(code(&out), Some(0), "run {i}: {}", show(&out));
    }
    assert!(cd.tasks().is_empty(), "tasks left: {:?}", cd.tasks());
    assert!(
        cd.containers().is_empty(),
        "containers left: {:?}",
        cd.containers()
    );
    integration::poll(
        "all shims of 50 short-lived containers to exit",
        Duration::from_secs(10),
        || host::shims_of(cd.address()).is_empty().then_some(()),
    );
    let mounts: Vec<_> = host::mounts_under(cd.state_dir());
    assert!(
        mounts.is_empty(),
        "mounts left under the state dir: {mounts:?}"
    );
    for i in [0, 24, 49] {
        cd.assert_nothing_left(&format!("short-{i}"));
    }
});

both_runtimes!(delete_leaves_nothing, |rt, cd| {
    let t = cd.run_detached(rt, "del", &["sleep", "1000"]);
    // While it runs, the checks do see it (so their passing after delete means something).
    let seen = cd.leftovers("del");
    for what in ["mount ", "shim pid ", "container record ", "cgroup "] {
        assert!(
            seen.iter().any(|l| l.starts_with(what)),
            "running container shows no {what:?}: {seen:?}"
        );
    }
    assert!(cd.bundle_dir("del").join("rootfs").is_dir());
    let shims = cd.shims_for("del");
    assert_eq!(shims.len(), 1, "{shims:?}");
    assert_eq!(shims[0].program_name(), rt.shim_program());
    assert!(host::alive(t.pid as i32));

    cd.kill("del", "SIGKILL");
    cd.wait_task_status("del", "STOPPED", STATE_TIMEOUT);
    assert!(
        !host::alive(t.pid as i32),
        "init pid {} still alive after STOPPED",
        t.pid
    );
    cd.ctr_ok(["tasks", "delete", "del"]);
    cd.ctr_ok(["containers", "delete", "del"]);
    cd.assert_nothing_left("del");
});
