//! Faults: CRIU failing (an external unix socket, no `criu` on PATH, a fake `criu` that fails),
//! the shim SIGKILLed (idle, and while the container is frozen for a checkpoint), containerd
//! restarted under running containers, the disk full where the checkpoint goes. Nothing stays
//! frozen, nothing is lost, nothing partial is left, and the next operation works.

use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use integration::faults::{
    count, descendants_with_cmdline, entries_starting_with, freezer_state, list_dir,
    path_without_criu, real_criu, remove_container, run_with, runtime_dir, shim_pid,
    wait_count_advances, Api, CheckpointOptions, Daemon, RpcError, COUNTER,
};
use integration::{both_runtimes, host, poll, show, Containerd, Runtime, STATE_TIMEOUT};

const T: Duration = Duration::from_secs(30);

/// The task is RUNNING, its cgroup THAWED and its counter moving.
fn assert_running_and_thawed(cd: &Containerd, id: &str, pid: u32, what: &str) {
    let t = cd.task(id);
    assert_eq!(
        t.as_ref().map(|t| t.status.as_str()),
        Some("RUNNING"),
        "{what}: task {id} should be RUNNING: {t:?}"
    );
    assert_eq!(
        freezer_state(cd, id).as_deref(),
        Some("THAWED"),
        "{what}: cgroup of {id} should be THAWED"
    );
    wait_count_advances(pid, what);
}

/// The task is PAUSED, its cgroup FROZEN, its counter still.
fn assert_still_paused(cd: &Containerd, id: &str, pid: u32, what: &str) {
    let t = cd.task(id);
    assert_eq!(
        t.as_ref().map(|t| t.status.as_str()),
        Some("PAUSED"),
        "{what}: task {id} should still be PAUSED: {t:?}"
    );
    assert_eq!(
        freezer_state(cd, id).as_deref(),
        Some("FROZEN"),
        "{what}: cgroup of {id} should still be FROZEN"
    );
    let before = count(pid);
    // A still counter can only be shown over some time: 300 ms is 15 ticks of it.
    thread::sleep(Duration::from_millis(300));
    assert_eq!(count(pid), before, "{what}: a paused counter moved");
}

/// Absolute paths ending in `.log` that a message names.
fn log_paths(message: &str) -> Vec<String> {
    message
        .split(|c: char| c.is_whitespace() || c == '(' || c == ')' || c == '"')
        .map(|w| w.trim_end_matches([',', ':', ';']))
        .filter(|w| w.starts_with('/') && w.ends_with(".log"))
        .map(str::to_string)
        .collect()
}

/// A CRIU failure says so and names a kept CRIU log holding CRIU's own error.
fn assert_names_criu_log(err: &RpcError, what: &str) {
    assert!(
        err.message.to_lowercase().contains("criu"),
        "{what}: the error should say CRIU failed: {err}"
    );
    let logs = log_paths(&err.message);
    let kept: Vec<&String> = logs
        .iter()
        .filter(|p| {
            fs::read_to_string(p)
                .map(|t| t.contains("Error"))
                .unwrap_or(false)
        })
        .collect();
    assert!(
        !kept.is_empty(),
        "{what}: the error should name a CRIU log that exists and holds CRIU's error; named {logs:?}: {err}"
    );
}

/// Pause with ctr, checkpoint through the API (which must fail), then the task must still be
/// paused; resume, and it must run again. Returns the checkpoint's error.
fn failed_checkpoint_keeps_paused(
    cd: &Containerd,
    api: &Api,
    id: &str,
    pid: u32,
    opts: &CheckpointOptions,
    what: &str,
) -> RpcError {
    cd.ctr_ok(["tasks", "pause", id]);
    cd.wait_task_status(id, "PAUSED", STATE_TIMEOUT);
    let err = api.checkpoint(id, Some(opts.to_any())).expect_err(&format!(
        "{what}: checkpoint of the paused task should fail"
    ));
    assert_still_paused(cd, id, pid, what);
    cd.ctr_ok(["tasks", "resume", id]);
    cd.wait_task_status(id, "RUNNING", STATE_TIMEOUT);
    assert_running_and_thawed(cd, id, pid, &format!("{what}, resumed"));
    err
}

// ---- 1. CRIU fails -----------------------------------------------------------------------------

both_runtimes!(criu_fails_on_external_unix_socket, |rt, cd| {
    // crond -S logs through syslog(3), which keeps a datagram socket connected to /dev/log:
    // here a socket of this test process, outside the container. CRIU cannot dump it ("Unix
    // socket ... without peer": the peer lives in the host's network namespace, so not even
    // external_unix_sockets helps) and fails after it seized the tasks.
    let sock_dir = cd.dir().join("sock");
    fs::create_dir(&sock_dir).unwrap();
    let host_sock = UnixDatagram::bind(sock_dir.join("log")).expect("bind host socket");
    host_sock.set_read_timeout(Some(T)).unwrap();
    let mount = format!(
        "type=bind,src={},dst=/sock,options=rbind:rw",
        sock_dir.display()
    );
    let script =
        format!("ln -sf /sock/log /dev/log; mkdir -p /tmp/cr; crond -f -S -c /tmp/cr & {COUNTER}");
    let id = "extsock";
    let pid = run_with(cd, rt, id, &["--mount", &mount], &["sh", "-c", &script]);
    let mut buf = [0u8; 512];
    let n = host_sock
        .recv(&mut buf)
        .expect("crond's first log line on the host socket");
    assert!(
        String::from_utf8_lossy(&buf[..n]).contains("crond"),
        "unexpected datagram: {:?}",
        String::from_utf8_lossy(&buf[..n])
    );
    wait_count_advances(pid, "before the checkpoint");

    let api = Api::connect(cd);
    let plain = CheckpointOptions::default();
    let err = api
        .checkpoint(id, Some(plain.to_any()))
        .expect_err("CRIU cannot dump a socket connected outside the container");
    eprintln!("{rt:?}: checkpoint with an external unix socket: {err}");
    assert_names_criu_log(&err, "external unix socket");
    assert_running_and_thawed(cd, id, pid, "after the failed checkpoint");

    let err = failed_checkpoint_keeps_paused(cd, &api, id, pid, &plain, "paused, external socket");
    assert_names_criu_log(&err, "paused, external socket");

    // CRIU cannot dump it even with external_unix_sockets (the peer is in another network
    // namespace: "without peer"). Without crond the same checkpoint works.
    let out = cd.exec(id, "stop-crond", &["killall", "crond"]);
    assert!(out.status.success(), "killall crond: {}", show(&out));
    api.checkpoint(id, Some(plain.to_any()))
        .unwrap_or_else(|e| panic!("checkpoint once the socket is closed: {e}"));
    assert_running_and_thawed(cd, id, pid, "after a good checkpoint");
    remove_container(cd, id);
});

/// Restarts `cd`'s containerd with `criu_bin` first on PATH and no directory holding a criu.
fn restart_without_criu<'a>(cd: &'a Containerd, criu_bin: &Path) -> Daemon<'a> {
    fs::create_dir_all(criu_bin).unwrap();
    let mut daemon = Daemon::new(cd);
    let path = path_without_criu(&daemon.path(), criu_bin);
    daemon.restart(Some(&path));
    daemon
}

/// The checkpoint of `id` fails (running and paused), the task is unharmed; then with the real
/// criu put at `criu_bin/criu`, a checkpoint works.
fn criu_unusable_then_back(cd: &Containerd, id: &str, pid: u32, criu_bin: &Path, what: &str) {
    let api = Api::connect(cd);
    let opts = CheckpointOptions::default();
    let err = api
        .checkpoint(id, Some(opts.to_any()))
        .expect_err(&format!("{what}: checkpoint should fail"));
    eprintln!("{what}: {err}");
    assert!(
        err.message.to_lowercase().contains("criu"),
        "{what}: the error should name CRIU: {err}"
    );
    assert_running_and_thawed(cd, id, pid, what);
    let err = failed_checkpoint_keeps_paused(cd, &api, id, pid, &opts, what);
    assert!(
        err.message.to_lowercase().contains("criu"),
        "{what}, paused: the error should name CRIU: {err}"
    );

    let _ = fs::remove_file(criu_bin.join("criu"));
    symlink(real_criu(), criu_bin.join("criu")).unwrap();
    api.checkpoint(id, Some(opts.to_any()))
        .unwrap_or_else(|e| panic!("{what}: checkpoint with the real criu back: {e}"));
    assert_running_and_thawed(cd, id, pid, &format!("{what}: after a good checkpoint"));
}

both_runtimes!(criu_missing_from_path, |rt, cd| {
    let criu_bin = cd.dir().join("criu-bin");
    let _daemon = restart_without_criu(cd, &criu_bin);
    let id = "nocriu";
    let pid = run_with(cd, rt, id, &[], &["sh", "-c", COUNTER]);
    criu_unusable_then_back(cd, id, pid, &criu_bin, "no criu on PATH");
    remove_container(cd, id);
});

both_runtimes!(fake_criu_fails, |rt, cd| {
    let criu_bin = cd.dir().join("criu-bin");
    fs::create_dir_all(&criu_bin).unwrap();
    let fake = criu_bin.join("criu");
    fs::write(
        &fake,
        "#!/bin/sh\necho \"fake criu: refusing $*\" >&2\nexit 1\n",
    )
    .unwrap();
    fs::set_permissions(&fake, fs::Permissions::from_mode(0o755)).unwrap();
    let _daemon = restart_without_criu(cd, &criu_bin);
    let id = "fakecriu";
    let pid = run_with(cd, rt, id, &[], &["sh", "-c", COUNTER]);
    criu_unusable_then_back(cd, id, pid, &criu_bin, "a criu that exits 1");
    remove_container(cd, id);
});

// ---- 2. the shim SIGKILLed ---------------------------------------------------------------------

/// What containerd's cleanup after the dead shim of `id` (the shim's `delete` action) left of
/// it: task, init process, frozen or live cgroup, runc state, rootfs mount, runc or CRIU
/// processes. Polled: empty once the cleanup is done (containerd gives it 5 seconds).
fn dead_shim_leftovers(cd: &Containerd, id: &str, init: u32) -> Vec<String> {
    let ns = cd.namespace().to_string();
    let mut last = Vec::new();
    let _ = integration::poll_until(Duration::from_secs(15), || {
        last.clear();
        if let Some(t) = cd.task(id).filter(|t| t.status != "STOPPED") {
            last.push(format!("task {t:?}"));
        }
        if host::alive(init as i32) {
            last.push(format!("init {init} alive"));
        }
        if let Some(s) = freezer_state(cd, id) {
            let procs = fs::read_to_string(format!(
                "/sys/fs/cgroup/freezer/{}/cgroup.procs",
                cd.cgroup_rel(id)
            ))
            .unwrap_or_default();
            let procs: Vec<String> = procs
                .lines()
                .filter_map(|p| p.trim().parse::<i32>().ok())
                .map(|p| format!("{p}{:?}", integration::faults::state_and_ppid(p)))
                .collect();
            last.push(format!(
                "freezer cgroup still there, {s}, processes (state, ppid): {procs:?}"
            ));
        }
        if cd.runc_state_dir(id).exists() {
            last.push(format!("runc state {}", cd.runc_state_dir(id).display()));
        }
        for m in host::mounts_under(cd.dir()) {
            if m.mount_point.split('/').any(|c| c == id) {
                last.push(format!("mount {}", m.mount_point));
            }
        }
        // containerd removes its checkpoint temp dir when the call fails; a CRIU that outlived
        // its shim writes on into it.
        let tmp = runtime_dir(cd);
        for d in entries_starting_with(&tmp, "ctrd-checkpoint") {
            last.push(format!(
                "checkpoint temp dir {} holding {:?}",
                d.display(),
                list_dir(&d)
            ));
        }
        for p in host::processes() {
            let line = p.argv.join(" ");
            if (line.starts_with("runc") || line.starts_with("criu"))
                && (line.contains(&ns)
                    || line.contains(&format!(" -t {init} "))
                    || fs::read_link(format!("/proc/{}/cwd", p.pid))
                        .map(|c| c.starts_with(cd.dir()))
                        .unwrap_or(false))
            {
                last.push(format!("process {}: {line}", p.pid));
            }
        }
        last.is_empty().then_some(())
    });
    last
}

/// After the shim of `id` was killed: containerd's cleanup leaves nothing (asserted for the
/// custom shim; for the Go shim, reported).
fn assert_cleaned_after_dead_shim(cd: &Containerd, rt: Runtime, id: &str, init: u32) {
    let left = dead_shim_leftovers(cd, id, init);
    if rt == Runtime::RuncV2 && !left.is_empty() {
        eprintln!(
            "reference shim: after its shim was killed, {id} left behind (not asserted):\n  {}",
            left.join("\n  ")
        );
        return;
    }
    assert!(
        left.is_empty(),
        "after the shim of {id} was killed, left behind:\n  {}",
        left.join("\n  ")
    );
    cd.ctr_ok(["containers", "delete", id]);
    cd.assert_nothing_left(id);
}

/// A container on its own shim, untouched by what happened to another one.
fn assert_bystander_fine(cd: &Containerd, id: &str, pid: u32) {
    assert_running_and_thawed(cd, id, pid, "bystander");
    let out = cd.exec(id, "look", &["cat", "/count"]);
    assert!(
        out.status.success(),
        "exec in the bystander: {}",
        show(&out)
    );
}

both_runtimes!(shim_killed_while_idle, |rt, cd| {
    let mut daemon = Daemon::new(cd);
    daemon.restart_with_private_runtime_dir();
    let victim = run_with(cd, rt, "victim", &[], &["sh", "-c", COUNTER]);
    let other = run_with(cd, rt, "bystander", &[], &["sh", "-c", COUNTER]);
    let shim = shim_pid(cd, "victim");
    assert_ne!(shim, shim_pid(cd, "bystander"), "one shim per container");
    assert!(host::kill_and_wait(&[shim], Duration::from_secs(5)));
    assert_cleaned_after_dead_shim(cd, rt, "victim", victim);
    assert_bystander_fine(cd, "bystander", other);
    remove_container(cd, "bystander");
});

/// Holds `mib` MiB in memory (a tail buffering that much of a pipe that stays open), next to
/// the counter.
fn big_memory_script(mib: u64) -> String {
    let bytes = mib << 20;
    format!("(head -c {bytes} /dev/zero; sleep 100000) | tail -c {bytes} > /dev/null & {COUNTER}")
}

fn memory_usage(cd: &Containerd, id: &str) -> u64 {
    fs::read_to_string(format!(
        "/sys/fs/cgroup/memory/{}/memory.usage_in_bytes",
        cd.cgroup_rel(id)
    ))
    .ok()
    .and_then(|s| s.trim().parse().ok())
    .unwrap_or(0)
}

/// Runs a live checkpoint of a container holding 512 MiB (`id`, with a bystander on another
/// shim) through the API, SIGKILLs its shim as soon as `moment` says so (given the freezer
/// state and the shim's pid), and checks containerd's cleanup.
fn kill_shim_during_checkpoint(
    cd: &Containerd,
    rt: Runtime,
    id: &str,
    moment: impl Fn(Option<&str>, i32) -> bool,
    slow_criu: bool,
    what: &str,
) {
    let mut daemon = Daemon::new(cd);
    daemon.restart_with_private_runtime_dir();
    let victim = run_with(cd, rt, id, &[], &["sh", "-c", &big_memory_script(512)]);
    let other = run_with(cd, rt, "bystander", &[], &["sh", "-c", COUNTER]);
    poll("the victim to hold 480 MiB", T, || {
        (memory_usage(cd, id) > 480 << 20).then_some(())
    });
    let shim = shim_pid(cd, id);
    let checkpoint = {
        let api = Api::connect(cd);
        let id = id.to_string();
        thread::spawn(move || api.checkpoint(&id, Some(CheckpointOptions::default().to_any())))
    };
    let start = Instant::now();
    let mut killed_at = None;
    while start.elapsed() < T && !checkpoint.is_finished() {
        let state = freezer_state(cd, id);
        if moment(state.as_deref(), shim) {
            let criu = descendants_with_cmdline(shim, "criu: dump");
            if slow_criu {
                for &p in &criu {
                    // SAFETY: kill(2) of a CRIU process of this test's checkpoint.
                    unsafe {
                        libc::kill(p, libc::SIGSTOP);
                    }
                }
            }
            // SAFETY: kill(2) of the shim's pid.
            unsafe {
                libc::kill(shim, libc::SIGKILL);
            }
            killed_at = Some((state, criu));
            break;
        }
    }
    let result = checkpoint.join().expect("checkpoint thread");
    let Some((state, criu)) = killed_at else {
        // With either shim CRIU keeps the cgroup FROZEN only for the few ms it takes to seize
        // the tasks (the custom shim takes the files in CRIU's stop, not in a freeze of its
        // own): the checkpoint may finish before the poll catches the moment.
        eprintln!("{rt:?}: {what}: the moment never came ({result:?})");
        return;
    };
    let dumping = !criu.is_empty();
    if slow_criu {
        // CRIU goes on once containerd's cleanup of the dead shim is over (the task is gone).
        assert!(dumping, "no CRIU process to slow down");
        poll("containerd to clean up after the dead shim", T, || {
            cd.task(id).is_none().then_some(())
        });
        for &p in &criu {
            // SAFETY: as above.
            unsafe {
                libc::kill(p, libc::SIGCONT);
            }
        }
        let gone =
            integration::poll_until(T, || criu.iter().all(|p| !host::alive(*p)).then_some(()));
        if gone.is_none() {
            host::kill_and_wait(&criu, Duration::from_secs(5));
            panic!("{what}: CRIU {criu:?} did not finish within {T:?} once continued");
        }
    }
    eprintln!(
        "{rt:?}: shim killed {what}: freezer {state:?}, CRIU dumping: {dumping}; checkpoint: {:?}",
        result.as_ref().map(|_| "ok")
    );
    result.expect_err("the checkpoint cannot succeed with its shim killed");
    assert!(host::kill_and_wait(&[shim], Duration::from_secs(5)));
    assert_cleaned_after_dead_shim(cd, rt, id, victim);
    assert_bystander_fine(cd, "bystander", other);
    remove_container(cd, "bystander");
}

/// A `runc checkpoint` runs under `shim`.
fn runc_checkpoint_running(shim: i32) -> bool {
    !descendants_with_cmdline(shim, "runc").is_empty()
}

both_runtimes!(shim_killed_while_frozen_for_checkpoint, |rt, cd| {
    // With either shim the cgroup is frozen by CRIU while it seizes the tasks.
    kill_shim_during_checkpoint(
        cd,
        rt,
        "frozenvictim",
        |state, shim| state == Some("FROZEN") && runc_checkpoint_running(shim),
        false,
        "while the cgroup is FROZEN",
    );
});

both_runtimes!(shim_killed_while_criu_dumps, |rt, cd| {
    kill_shim_during_checkpoint(
        cd,
        rt,
        "dumpvictim",
        // Any moment CRIU runs: CRIU itself thaws the cgroup once it has seized the tasks, so
        // "FROZEN and dumping" is a window too short to catch reliably under load; the frozen
        // case has its own test (shim_killed_while_frozen_for_checkpoint).
        |_state, shim| !descendants_with_cmdline(shim, "criu: dump").is_empty(),
        false,
        "while CRIU dumps",
    );
});

both_runtimes!(shim_killed_while_criu_is_slow, |rt, cd| {
    // CRIU dumping a big container to slow storage outlives the 5 s containerd gives the shim's
    // `delete` action: CRIU is stopped from just before the kill until that cleanup is over.
    kill_shim_during_checkpoint(
        cd,
        rt,
        "slowvictim",
        |_state, shim| !descendants_with_cmdline(shim, "criu: dump").is_empty(),
        true,
        "while a slow CRIU dumps",
    );
});

// ---- 3. containerd restarted -------------------------------------------------------------------

both_runtimes!(containerd_restart_keeps_containers, |rt, cd| {
    let a = run_with(cd, rt, "keep-a", &[], &["sh", "-c", COUNTER]);
    let b = run_with(cd, rt, "keep-b", &[], &["sleep", "1000"]);
    let shims = (shim_pid(cd, "keep-a"), shim_pid(cd, "keep-b"));
    let mut daemon = Daemon::new(cd);
    daemon.restart(None);

    assert_eq!(
        (shim_pid(cd, "keep-a"), shim_pid(cd, "keep-b")),
        shims,
        "the shims live on"
    );
    for (id, pid) in [("keep-a", a), ("keep-b", b)] {
        let t = cd.task(id);
        assert_eq!(
            t.as_ref().map(|t| (t.pid, t.status.as_str())),
            Some((pid, "RUNNING")),
            "{id} after the restart: {t:?}"
        );
    }
    wait_count_advances(a, "after the restart");
    let out = cd.exec(
        "keep-a",
        "after-restart",
        &["sh", "-c", "echo in; cat /count"],
    );
    assert!(out.status.success(), "exec after restart: {}", show(&out));
    assert!(
        integration::stdout(&out).starts_with("in\n"),
        "{}",
        show(&out)
    );

    // A live checkpoint (ctr pauses around it; containerd stores it as an image).
    let out = cd.ctr_ok(["tasks", "checkpoint", "keep-a"]);
    assert!(
        out.contains("checkpoint/keep-a"),
        "ctr task checkpoint printed: {out}"
    );
    cd.wait_task_status("keep-a", "RUNNING", STATE_TIMEOUT);
    assert_running_and_thawed(cd, "keep-a", a, "after a checkpoint following the restart");

    // A second restart, then the usual end of life.
    daemon.restart(None);
    for id in ["keep-a", "keep-b"] {
        cd.kill(id, "SIGKILL");
        cd.wait_task_status(id, "STOPPED", STATE_TIMEOUT);
        cd.ctr_ok(["tasks", "delete", id]);
        cd.ctr_ok(["containers", "delete", id]);
        cd.assert_nothing_left(id);
    }
});

both_runtimes!(events_reach_a_restarted_containerd, |rt, cd| {
    let pid = run_with(cd, rt, "ev", &[], &["sleep", "1000"]);
    // Before the restart, the shim's events arrive.
    let before = cd.spawn_ctr(["events"], false);
    let out = cd.exec("ev", "ev-before", &["true"]);
    assert!(out.status.success(), "{}", show(&out));
    before.wait_for_stdout("\"exec_id\":\"ev-before\"", Duration::from_secs(15));
    drop(before);

    let mut daemon = Daemon::new(cd);
    daemon.restart(None);
    let events = cd.spawn_ctr(["events"], false);
    let out = cd.exec("ev", "ev-exec", &["true"]);
    assert!(out.status.success(), "{}", show(&out));
    cd.kill("ev", "SIGKILL");
    cd.wait_task_status("ev", "STOPPED", STATE_TIMEOUT);
    // The shim publishes exits to containerd's ttrpc socket: a new one after the restart.
    events.wait_for_stdout(
        "\"container_id\":\"ev\",\"id\":\"ev\"",
        Duration::from_secs(15),
    );
    let seen = events.stdout();
    assert!(
        seen.contains("/tasks/exit") && seen.contains(&format!("\"pid\":{pid}")),
        "the init's exit event: {seen}"
    );
    cd.ctr_ok(["tasks", "delete", "ev"]);
    cd.ctr_ok(["containers", "delete", "ev"]);
    cd.assert_nothing_left("ev");
});

// ---- 4. disk full --------------------------------------------------------------------------

struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Tmpfs {
        fs::create_dir_all(dir).unwrap();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .expect("mount");
        assert!(out.status.success(), "mount tmpfs: {}", show(&out));
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).output();
    }
}

both_runtimes!(checkpoint_disk_full, |rt, cd| {
    let id = "full";
    // 4 MiB written to the rootfs: CRIU's images of this container fit in 1 MiB, its rootfs
    // diff does not.
    let script = format!("head -c 4194304 /dev/urandom > /ballast; {COUNTER}");
    let pid = run_with(cd, rt, id, &[], &["sh", "-c", &script]);
    wait_count_advances(pid, "before");

    for (size, what) in [("16k", "CRIU's images"), ("1m", "the rootfs diff")] {
        let dir = cd.dir().join(format!("full-{size}"));
        let tmpfs = Tmpfs::mount(&dir, size);
        let out = cd.ctr([
            "tasks",
            "checkpoint",
            "--image-path",
            dir.to_str().unwrap(),
            id,
        ]);
        let left = integration::faults::list_dir(&dir);
        eprintln!(
            "{rt:?}: checkpoint into a {size} tmpfs: {}\nleft in it: {left:?}",
            show(&out)
        );
        if rt == Runtime::RuncV2 && size == "1m" {
            // The Go shim writes no rootfs diff: its checkpoint fits.
            drop(tmpfs);
            continue;
        }
        assert!(
            !out.status.success(),
            "{what} in a {size} tmpfs: the checkpoint should fail: {}",
            show(&out)
        );
        cd.wait_task_status(id, "RUNNING", STATE_TIMEOUT);
        assert_running_and_thawed(cd, id, pid, &format!("after {what} hit ENOSPC"));
        if rt == Runtime::Custom {
            let err = integration::stderr(&out);
            assert!(
                err.contains("No space left on device"),
                "the error should say the disk is full: {err}"
            );
            assert!(
                left.is_empty(),
                "nothing partial should stay in the checkpoint dir: {left:?}"
            );
            let work = integration::faults::entries_starting_with(&cd.bundle_dir(id), "criu-work-");
            assert!(
                work.is_empty(),
                "CRIU work dirs left in the bundle: {work:?}"
            );
        }
        drop(tmpfs);
    }
    // With room, the same checkpoint works.
    let dir = cd.dir().join("roomy");
    let _tmpfs = Tmpfs::mount(&dir, "64m");
    cd.ctr_ok([
        "tasks",
        "checkpoint",
        "--image-path",
        dir.to_str().unwrap(),
        id,
    ]);
    assert!(
        dir.join("pages-1.img").is_file() || !integration::faults::list_dir(&dir).is_empty(),
        "a checkpoint with room wrote nothing"
    );
    cd.wait_task_status(id, "RUNNING", STATE_TIMEOUT);
    assert_running_and_thawed(cd, id, pid, "after a checkpoint with room");
    remove_container(cd, id);
});

#[test]
fn checkpoint_with_exit_disk_full_keeps_the_container_custom() {
    // With `exit`, CRIU kills the processes once it has dumped them: a failure after that would
    // lose the only copy. The shim captures the rootfs diff first (in the same freeze), so a full
    // disk fails the diff or the dump, before anything is killed: the container runs on.
    integration::run_scenario(Runtime::Custom, |rt, cd| {
        let id = "fullexit";
        let script = format!("head -c 4194304 /dev/urandom > /ballast; {COUNTER}");
        let pid = run_with(cd, rt, id, &[], &["sh", "-c", &script]);
        wait_count_advances(pid, "before");
        // 1 MiB: the 4 MiB diff does not fit. 4200 KiB: the diff fits, CRIU's images do not.
        for size in ["1m", "4200k"] {
            let dir = cd.dir().join(format!("fullexit-{size}"));
            let tmpfs = Tmpfs::mount(&dir, size);
            let out = cd.ctr([
                "tasks",
                "checkpoint",
                "--exit",
                "--image-path",
                dir.to_str().unwrap(),
                id,
            ]);
            let left = integration::faults::list_dir(&dir);
            eprintln!(
                "exit checkpoint into {size}: {}\nleft: {left:?}",
                show(&out)
            );
            assert!(
                !out.status.success(),
                "an exit checkpoint into a {size} tmpfs should fail: {}",
                show(&out)
            );
            // CRIU words its own ENOSPC in many ways; the shim's diff says it plainly.
            assert!(
                size != "1m" || integration::stderr(&out).contains("No space left on device"),
                "the error should say the disk is full: {}",
                show(&out)
            );
            cd.wait_task_status(id, "RUNNING", STATE_TIMEOUT);
            assert_running_and_thawed(
                cd,
                id,
                pid,
                &format!("after an exit checkpoint into {size}"),
            );
            assert!(left.is_empty(), "partial files left: {left:?}");
            drop(tmpfs);
        }
        remove_container(cd, id);
    });
}

/// What the custom shim's rootfs diff captured comes back as it was, through containerd's Tasks
/// API (no --rw: the shim's own diff is all there is): a directory removed and made anew at depth
/// stays empty (overlay marks only its top opaque), a deleted name that is not UTF-8 stays
/// deleted, a sparse file stays sparse, and a unix socket in the rootfs is left out and listed in
/// the record instead of making the checkpoint unrestorable.
#[test]
fn captured_files_restore_whole_custom() {
    use std::os::unix::fs::MetadataExt;
    integration::run_scenario(Runtime::Custom, |rt, cd| {
        let script = format!(
            "rm -rf /data; mkdir -p /data/sub; echo new > /data/sub/new.txt; \
             dd if=/dev/zero of=/sparse bs=1 count=0 seek=1073741824 2>/dev/null; \
             echo middle | dd of=/sparse bs=1 seek=104857600 conv=notrunc 2>/dev/null; \
             touch /ready; {COUNTER}"
        );
        let pid = run_with(cd, rt, "files", &[], &["sh", "-c", &script]);
        poll("/ready", T, || {
            fs::metadata(format!("/proc/{pid}/root/ready"))
                .ok()
                .map(drop)
        });
        // A unix socket file in the rootfs, bound from outside and closed: nothing holds it.
        let sock = format!("/proc/{pid}/root/tmp/app.sock");
        drop(std::os::unix::net::UnixListener::bind(&sock).expect("bind a socket in the rootfs"));
        let mut api = Api::connect(cd);
        api.use_new_lease("files");
        let desc = api
            .checkpoint_blob("files", &CheckpointOptions::default())
            .unwrap_or_else(|e| panic!("checkpoint with a socket in the rootfs: {e}"));
        let record = integration::checkpoint::tar_member(
            &api.blob_path(&desc),
            integration::checkpoint::SHIM_METADATA,
        )
        .expect("the shim's record");
        let record: serde_json::Value = serde_json::from_slice(&record).unwrap();
        let left_out = record["rootfs_diff_left_out"].to_string();
        assert!(
            left_out.contains("/tmp/app.sock") && left_out.contains("socket"),
            "the socket should be listed as left out: {record:#}"
        );
        let r = api
            .restore_as_new("files", "files2", Runtime::Custom, &desc)
            .unwrap_or_else(|e| panic!("restore: {e}"));
        let root = format!("/proc/{r}/root");
        let names = |d: &str| list_dir(Path::new(&format!("{root}{d}")));
        assert_eq!(names("/data"), vec!["sub"], "/data after restore");
        assert_eq!(
            names("/data/sub"),
            vec!["new.txt"],
            "/data/sub after restore"
        );
        let sparse = fs::metadata(format!("{root}/sparse")).expect("/sparse restored");
        assert_eq!(sparse.len(), 1 << 30, "/sparse keeps its size");
        assert!(
            sparse.blocks() * 512 < 16 << 20,
            "/sparse should stay sparse: {} bytes allocated",
            sparse.blocks() * 512
        );
        let bytes = fs::read(format!("{root}/sparse")).unwrap();
        assert_eq!(&bytes[104857600..104857607], b"middle\n", "/sparse data");
        assert!(bytes[..104857600].iter().all(|b| *b == 0), "/sparse hole");
        assert!(
            fs::symlink_metadata(format!("{root}/tmp/app.sock")).is_err(),
            "the socket is not restored"
        );
        wait_count_advances(r, "the restored counter");
        // Restored: nothing of the checkpoint is kept with the container (no image copy, no
        // CRIU work dir, no links).
        let bundle = cd.bundle_dir("files2");
        for name in [
            "checkpoint",
            "checkpoint-images",
            "checkpoint-parent",
            "criu-restore",
        ] {
            assert!(
                !bundle.join(name).exists(),
                "{name} kept in the bundle of a restored container"
            );
        }
        remove_container(cd, "files2");
        remove_container(cd, "files");
    });
}
