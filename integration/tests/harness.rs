//! The harness itself: teardown must leave nothing behind even when a shim died (killed here)
//! with its container still running, or a task is left paused.

use std::time::Duration;

use integration::{
    host, poll, shim_binary, skip_custom, Containerd, Runtime, RUNC_ROOT, STATE_TIMEOUT,
};

fn teardown_cleans_up(rt: Runtime) {
    if rt == Runtime::Custom {
        if skip_custom() {
            eprintln!("skipped: SHIMTEST_SKIP_CUSTOM is set");
            return;
        }
        shim_binary().unwrap_or_else(|e| panic!("{e}"));
    }
    let cd = Containerd::start();
    let dir = cd.dir().to_path_buf();
    let ns = cd.namespace().to_string();
    let orphan = cd.run_detached(rt, "orphan", &["sleep", "1000"]);
    let paused = cd.run_detached(rt, "paused", &["sleep", "1000"]);
    cd.ctr_ok(["tasks", "pause", "paused"]);
    cd.wait_task_status("paused", "PAUSED", STATE_TIMEOUT);
    let shims = cd.shims_for("orphan");
    assert_eq!(shims.len(), 1, "{shims:?}");
    assert!(host::kill_and_wait(&[shims[0].pid], Duration::from_secs(5)));
    assert!(
        host::alive(orphan.pid as i32),
        "container init died with its shim"
    );
    let address = cd.address().to_path_buf();

    drop(cd);

    for pid in [orphan.pid, paused.pid] {
        // A killed process may linger as a zombie until init reaps it: alive() ignores those.
        poll(
            format!("container process {pid} to be gone"),
            Duration::from_secs(10),
            || (!host::alive(pid as i32)).then_some(()),
        );
    }
    assert!(
        host::shims_of(&address).is_empty(),
        "shims left: {:?}",
        host::shims_of(&address)
    );
    assert!(
        host::mounts_under(&dir).is_empty(),
        "mounts left: {:?}",
        host::mounts_under(&dir)
    );
    assert!(!dir.exists(), "{} not removed", dir.display());
    assert!(
        host::cgroup_dirs(&ns).is_empty(),
        "cgroups left: {:?}",
        host::cgroup_dirs(&ns)
    );
    assert!(
        !std::path::Path::new(RUNC_ROOT).join(&ns).exists(),
        "runc state left"
    );
}

#[test]
fn harness_teardown_after_shim_killed_runc() {
    teardown_cleans_up(Runtime::RuncV2);
}

#[test]
fn harness_teardown_after_shim_killed_custom() {
    teardown_cleans_up(Runtime::Custom);
}
