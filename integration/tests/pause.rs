//! Pause/resume: a workload that counts in a file must really stop while paused.

use std::thread::sleep;
use std::time::Duration;

use integration::{both_runtimes, read_in_container, STATE_TIMEOUT};

/// Counts in /tmp/count every ~20 ms; written with a rename so that a reader (or a freeze) never
/// sees a half-written file.
const COUNTER: &str = "i=0; while :; do i=$((i+1)); echo $i > /tmp/c.new; mv -f /tmp/c.new /tmp/count; sleep 0.02; done";

fn count(pid: u32) -> Option<u64> {
    read_in_container(pid, "/tmp/count")?.trim().parse().ok()
}

both_runtimes!(pause_resume_stops_the_counter, |rt, cd| {
    let t = cd.run_detached(rt, "pz", &["sh", "-c", COUNTER]);
    integration::poll("the counter to start", STATE_TIMEOUT, || {
        count(t.pid).filter(|c| *c > 2)
    });

    cd.ctr_ok(["tasks", "pause", "pz"]);
    cd.wait_task_status("pz", "PAUSED", STATE_TIMEOUT);
    let c1 = count(t.pid).expect("counter readable while paused");
    // The one unavoidable wait: nothing to poll for when the point is that nothing changes. The
    // counter ticks every ~20 ms, so 300 ms would show ~15 increments if it were not frozen.
    sleep(Duration::from_millis(300));
    let c2 = count(t.pid).expect("counter readable while paused");
    assert_eq!(c1, c2, "counter moved while PAUSED");
    assert_eq!(cd.task("pz").map(|t| t.status), Some("PAUSED".to_string()));

    cd.ctr_ok(["tasks", "resume", "pz"]);
    cd.wait_task_status("pz", "RUNNING", STATE_TIMEOUT);
    integration::poll("the counter to advance after resume", STATE_TIMEOUT, || {
        count(t.pid).filter(|c| *c > c2 + 2)
    });

    // SIGKILL to a paused task ends it without a resume (runc thaws after sending SIGKILL).
    cd.ctr_ok(["tasks", "pause", "pz"]);
    cd.wait_task_status("pz", "PAUSED", STATE_TIMEOUT);
    cd.kill("pz", "SIGKILL");
    cd.wait_task_status("pz", "STOPPED", STATE_TIMEOUT);
    assert!(
        !integration::host::alive(t.pid as i32),
        "init still alive after SIGKILL while paused"
    );
    cd.ctr_ok(["tasks", "delete", "pz"]);
    cd.ctr_ok(["containers", "delete", "pz"]);
    cd.assert_nothing_left("pz");
});
