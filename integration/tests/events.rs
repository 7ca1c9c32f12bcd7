//! The events containerd expects, in order, and OOM reporting — on both runtimes.

use std::time::Duration;

use integration::{both_runtimes, Spawned, STATE_TIMEOUT};

/// The topics `ctr events` printed that concern container `id`, in order.
fn topics_for(events: &Spawned, id: &str) -> Vec<String> {
    events
        .stdout()
        .lines()
        .filter(|l| l.contains(id))
        .filter_map(|l| {
            l.split_whitespace()
                .find(|w| w.starts_with("/tasks/"))
                .map(str::to_string)
        })
        .collect()
}

fn wait_for_topic(events: &Spawned, id: &str, topic: &str) -> Vec<String> {
    integration::poll(format!("event {topic} for {id}"), STATE_TIMEOUT, || {
        let t = topics_for(events, id);
        t.iter().any(|x| x == topic).then_some(t)
    })
}

both_runtimes!(task_events_in_order, |rt, cd| {
    let events = cd.spawn_ctr(["events"], false);
    // `ctr events` subscribes asynchronously: wait until an event of our own shows up.
    cd.create_container(rt, "ev0", &["true"]);
    cd.ctr_ok(["containers", "delete", "ev0"]);
    integration::poll("ctr events to be subscribed", STATE_TIMEOUT, || {
        events.stdout().contains("ev0").then_some(())
    });

    cd.run_detached(rt, "ev", &["sleep", "1000"]);
    cd.exec("ev", "x1", &["sh", "-c", "exit 3"]);
    cd.ctr_ok(["tasks", "pause", "ev"]);
    cd.wait_task_status("ev", "PAUSED", STATE_TIMEOUT);
    cd.ctr_ok(["tasks", "resume", "ev"]);
    cd.wait_task_status("ev", "RUNNING", STATE_TIMEOUT);
    cd.kill("ev", "SIGKILL");
    cd.wait_task_status("ev", "STOPPED", STATE_TIMEOUT);
    cd.ctr_ok(["tasks", "delete", "ev"]);
    // The Go shim's /tasks/delete sometimes never reaches `ctr events` (seen with containerd
    // 2.1.9): the reference is held to everything up to the last exit; ours to the delete too.
    let last = if rt == integration::Runtime::Custom {
        9
    } else {
        8
    };
    let got = integration::poll_until(STATE_TIMEOUT, || {
        let t = topics_for(&events, "ev");
        (t.len() >= last).then_some(t)
    })
    .unwrap_or_else(|| panic!("missing events for ev; events:\n{}", events.stdout()));
    let want = [
        "/tasks/create",
        "/tasks/start",
        "/tasks/exec-added",
        "/tasks/exec-started",
        "/tasks/exit",
        "/tasks/paused",
        "/tasks/resumed",
        "/tasks/exit",
        "/tasks/delete",
    ];
    // `ctr task exec` deletes its exec process; that delete is not a task event.
    let got: Vec<&str> = got.iter().map(String::as_str).take(last).collect();
    assert_eq!(got, want[..last], "events for ev:\n{}", events.stdout());
    cd.ctr_ok(["containers", "delete", "ev"]);
});

both_runtimes!(exec_exit_published_before_init_exit, |rt, cd| {
    let events = cd.spawn_ctr(["events"], false);
    cd.create_container(rt, "oz0", &["true"]);
    cd.ctr_ok(["containers", "delete", "oz0"]);
    integration::poll("ctr events to be subscribed", STATE_TIMEOUT, || {
        events.stdout().contains("oz0").then_some(())
    });
    cd.run_detached(rt, "ord", &["sleep", "1000"]);
    let exec = cd.spawn_exec("ord", "long", &["sleep", "1000"]);
    wait_for_topic(&events, "ord", "/tasks/exec-started");
    // Killing the init kills the exec with it (pid namespace): its exit must come first.
    cd.kill("ord", "SIGKILL");
    cd.wait_task_status("ord", "STOPPED", STATE_TIMEOUT);
    let lines: Vec<String> = integration::poll("two exit events", STATE_TIMEOUT, || {
        let l: Vec<String> = events
            .stdout()
            .lines()
            .filter(|l| l.contains("/tasks/exit") && l.contains("ord"))
            .map(str::to_string)
            .collect();
        (l.len() >= 2).then_some(l)
    });
    assert!(
        lines[0].contains("long"),
        "the exec's exit must be published first:\n{}",
        lines.join("\n")
    );
    drop(exec);
    cd.ctr_ok(["tasks", "delete", "ord"]);
    cd.ctr_ok(["containers", "delete", "ord"]);
});

both_runtimes!(oom_is_reported, |rt, cd| {
    let events = cd.spawn_ctr(["events"], false);
    // 16 MiB limit; the shell then builds a string far larger than that.
    let mut args = vec![
        "run",
        "-d",
        "--null-io",
        "--memory-limit",
        "16777216",
        "--runtime",
        rt.name(),
    ];
    args.extend([
        integration::IMAGE,
        "oom",
        "sh",
        "-c",
        "sleep 0.3; x=a; while :; do x=$x$x; done",
    ]);
    cd.ctr_ok(args);
    let got = integration::poll("an OOM event", Duration::from_secs(30), || {
        let t = topics_for(&events, "oom");
        t.iter().any(|x| x == "/tasks/oom").then_some(t)
    });
    assert!(got.contains(&"/tasks/oom".to_string()));
    cd.wait_task_status("oom", "STOPPED", STATE_TIMEOUT);
    cd.ctr_ok(["tasks", "delete", "oom"]);
    cd.ctr_ok(["containers", "delete", "oom"]);
});
