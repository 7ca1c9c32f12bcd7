//! Metrics (`ctr task metrics`), resource updates (Tasks.Update) and `ctr task ps`.

use std::time::Duration;

use integration::{both_runtimes, code, memory_limit_of, show, STATE_TIMEOUT};
use serde_json::Value;

const T: Duration = Duration::from_secs(20);

/// Memory usage in bytes from a metrics document (cgroup v1 or v2 layout).
fn memory_usage(m: &Value) -> Option<u64> {
    let mem = m.get("memory")?;
    mem.get("usage").and_then(|u| {
        u.get("usage")
            .and_then(Value::as_u64)
            .or_else(|| u.as_u64())
    })
}

/// Memory limit from a metrics document (v1 `memory.usage.limit`, v2 `memory.usage_limit`).
fn memory_limit(m: &Value) -> Option<u64> {
    let mem = m.get("memory")?;
    mem.get("usage")
        .and_then(|u| u.get("limit"))
        .and_then(Value::as_u64)
        .or_else(|| mem.get("usage_limit").and_then(Value::as_u64))
}

fn pids_current(m: &Value) -> Option<u64> {
    m.get("pids")?.get("current")?.as_u64()
}

both_runtimes!(metrics_memory_and_pids, |rt, cd| {
    cd.run_detached(rt, "met", &["sleep", "1000"]);
    let m = cd.metrics("met");
    let usage = memory_usage(&m).unwrap_or_else(|| panic!("no memory usage in {m:#}"));
    assert!(usage > 0, "memory usage 0: {m:#}");
    assert_eq!(pids_current(&m), Some(1), "one process expected: {m:#}");

    let _e = cd.spawn_exec("met", "s2", &["sleep", "999"]);
    integration::poll("pids.current == 2 after an exec", T, || {
        (pids_current(&cd.metrics("met")) == Some(2)).then_some(())
    });
});

both_runtimes!(update_memory_limit, |rt, cd| {
    let t = cd.run_detached(rt, "upd", &["sleep", "1000"]);
    let before = memory_limit_of(t.pid);
    assert_ne!(before, Some(64 << 20), "limit already 64 MiB?");

    cd.update_task(
        "upd",
        &serde_json::json!({"memory": {"limit": 64u64 << 20}}),
    )
    .expect("Tasks.Update");
    assert_eq!(
        memory_limit_of(t.pid),
        Some(64 << 20),
        "cgroup memory limit after update"
    );
    assert_eq!(
        memory_limit(&cd.metrics("upd")),
        Some(64 << 20),
        "metrics after update"
    );

    cd.update_task(
        "upd",
        &serde_json::json!({"memory": {"limit": 96u64 << 20}}),
    )
    .expect("second Tasks.Update");
    assert_eq!(
        memory_limit_of(t.pid),
        Some(96 << 20),
        "cgroup memory limit after second update"
    );
    assert_eq!(
        cd.task("upd").map(|t| t.status),
        Some("RUNNING".to_string())
    );
});

both_runtimes!(memory_limit_at_create, |rt, cd| {
    let mut args = vec![
        "run",
        "--fifo-dir",
        cd.fifo_dir(),
        "-d",
        "--null-io",
        "--memory-limit",
        "33554432",
        "--runtime",
        rt.name(),
    ];
    args.extend_from_slice(&[integration::IMAGE, "mlim", "sleep", "1000"]);
    cd.ctr_ok(args);
    let t = cd.wait_task_status("mlim", "RUNNING", STATE_TIMEOUT);
    assert_eq!(memory_limit_of(t.pid), Some(32 << 20));
});

both_runtimes!(ps_lists_init_and_exec, |rt, cd| {
    let t = cd.run_detached(rt, "ps", &["sleep", "1000"]);
    let ps = cd.task_ps("ps");
    assert_eq!(
        ps.iter().map(|p| p.0).collect::<Vec<_>>(),
        vec![t.pid],
        "{ps:?}"
    );

    let e = cd.spawn_exec("ps", "ex1", &["sleep", "999"]);
    let ps = integration::poll("the exec'd process in ctr task ps", T, || {
        let ps = cd.task_ps("ps");
        (ps.len() == 2).then_some(ps)
    });
    assert!(
        ps.iter().any(|p| p.0 == t.pid),
        "init pid {} missing: {ps:?}",
        t.pid
    );
    let (epid, info) = ps.iter().find(|p| p.0 != t.pid).cloned().expect("exec row");
    let cmdline =
        std::fs::read(format!("/proc/{epid}/cmdline")).expect("exec pid is a live process");
    assert_eq!(
        cmdline, b"sleep\x00999\x00",
        "pid {epid} is not the exec'd sleep"
    );
    assert!(info.contains("ex1"), "ps INFO of the exec'd process should name its exec id (runc.v2 shows exec_id:\"ex1\"): {ps:?}");

    cd.kill_exec("ps", "ex1", "SIGKILL");
    let out = e.wait(T);
    assert_eq!(code(&out), Some(137), "{}", show(&out));
    integration::poll("ps back to the init process only", T, || {
        (cd.task_ps("ps").len() == 1).then_some(())
    });
});
