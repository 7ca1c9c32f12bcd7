//! Signals through `ctr task kill`: SIGKILL, SIGTERM (trapped by init, default action on an
//! exec'd process), and a trapped SIGUSR1 that the shell reports.

use std::time::Duration;

use integration::{both_runtimes, code, show, STATE_TIMEOUT};

const T: Duration = Duration::from_secs(20);

/// Shell that reports `sig` every time it gets it; says "ready" once the trap is set.
fn trapping(sig: &str, then: &str) -> String {
    format!("trap 'echo got-{sig}; {then}' {sig}; echo ready; while :; do sleep 0.05; done")
}

both_runtimes!(kill_sigkill, |rt, cd| {
    let p = cd.spawn_run(rt, "k9", &["sleep", "1000"]);
    let t = cd.wait_task_status("k9", "RUNNING", STATE_TIMEOUT);
    cd.kill("k9", "SIGKILL");
    let out = p.wait(T);
    assert_eq!(code(&out), Some(137), "{}", show(&out));
    assert!(!integration::host::alive(t.pid as i32));
    cd.assert_nothing_left("k9");
});

both_runtimes!(kill_sigterm, |rt, cd| {
    // Init traps TERM and exits with a code of its own.
    let script = trapping("TERM", "exit 42");
    let p = cd.spawn_run(rt, "k15", &["sh", "-c", &script]);
    p.wait_for_stdout("ready", T);
    cd.kill("k15", "SIGTERM");
    let out = p.wait(T);
    assert_eq!(code(&out), Some(42), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("got-TERM"),
        "{}",
        show(&out)
    );
    cd.assert_nothing_left("k15");

    // An exec'd process with the default action dies of it: 128 + 15.
    cd.run_detached(rt, "k15b", &["sleep", "1000"]);
    let e = cd.spawn_exec("k15b", "sl", &["sleep", "999"]);
    integration::poll("exec'd sleep to show in ctr task ps", T, || {
        (cd.task_ps("k15b").len() >= 2).then_some(())
    });
    cd.kill_exec("k15b", "sl", "SIGTERM");
    let out = e.wait(T);
    assert_eq!(code(&out), Some(143), "{}", show(&out));
    assert_eq!(
        cd.task("k15b").map(|t| t.status),
        Some("RUNNING".to_string()),
        "init must survive"
    );
});

both_runtimes!(kill_sigusr1_trapped, |rt, cd| {
    let script = trapping("USR1", "true");
    let p = cd.spawn_run(rt, "usr1", &["sh", "-c", &script]);
    p.wait_for_stdout("ready", T);
    cd.kill("usr1", "SIGUSR1");
    p.wait_for_stdout("got-USR1", T);
    // Handled, not fatal: still running, and a second one is reported too.
    assert_eq!(
        cd.task("usr1").map(|t| t.status),
        Some("RUNNING".to_string())
    );
    cd.kill("usr1", "SIGUSR1");
    integration::poll("second got-USR1", T, || {
        (p.stdout().matches("got-USR1").count() == 2).then_some(())
    });
    cd.kill("usr1", "SIGKILL");
    let out = p.wait(T);
    assert_eq!(code(&out), Some(137), "{}", show(&out));
    cd.assert_nothing_left("usr1");
});

both_runtimes!(kill_all_processes, |rt, cd| {
    // `ctr task kill --all` signals every process of the container, exec'd ones included.
    cd.run_detached(rt, "kall", &["sleep", "1000"]);
    let e = cd.spawn_exec("kall", "sl", &["sleep", "999"]);
    integration::poll("exec'd sleep in ctr task ps", T, || {
        (cd.task_ps("kall").len() >= 2).then_some(())
    });
    cd.ctr_ok(["tasks", "kill", "--all", "-s", "SIGKILL", "kall"]);
    let out = e.wait(T);
    assert_eq!(code(&out), Some(137), "{}", show(&out));
    cd.wait_task_status("kall", "STOPPED", STATE_TIMEOUT);
});
