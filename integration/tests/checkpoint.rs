//! Checkpoint/restore through ctr (which pauses the task around every checkpoint) on both
//! runtimes: leave-running and --exit, image and work paths, --rw restores under the same and a
//! new name, TTYs, paused tasks, file changes, memory contents, CRIU failures.
//!
//! ctr facts these scenarios rely on (containerd 2.1):
//! - `ctr task checkpoint` names its image `containerd.io/checkpoint/<id>:<date>` with a
//!   one-second resolution: a second checkpoint of the same task within the same second fails
//!   with "already exists" (after the checkpoint itself happened).
//! - A `ctr task checkpoint` image has no runtime/snapshotter annotations, so `ctr container
//!   restore` cannot use it; its CRIU blob can still be restored through Tasks.Create.
//! - `ctr container restore` takes spec and runtime from the checkpoint image: restoring under a
//!   new name reuses the original's cgroup path, so the original must be gone first.
//! - Neither shim publishes a `/tasks/checkpointed` event.

use std::thread::sleep;
use std::time::Duration;

use integration::checkpoint::{
    counter_script, read_counter, tar_list, wait_counter_past, Api, CheckpointOptions, FifoReader,
    DELETED_FILES, ROOTFS_DIFF, SHIM_METADATA,
};
use integration::{both_runtimes, read_in_container, show, Runtime, STATE_TIMEOUT};

const T: Duration = Duration::from_secs(30);

fn status(cd: &integration::Containerd, id: &str) -> Option<String> {
    cd.task(id).map(|t| t.status)
}

/// `ctr task checkpoint <args...>`: the image name ctr prints (empty with --image-path).
fn task_checkpoint(cd: &integration::Containerd, args: &[&str]) -> String {
    let mut v = vec!["tasks", "checkpoint"];
    v.extend_from_slice(args);
    cd.ctr_ok(v).trim().to_string()
}

both_runtimes!(task_checkpoint_leave_running, |rt, cd| {
    let script = counter_script("/tmp");
    let t = cd.run_detached(rt, "ck", &["sh", "-c", &script]);
    let (tok, before) = wait_counter_past(t.pid, "/tmp", 3);

    let image = task_checkpoint(cd, &["ck"]);
    assert!(
        image.starts_with("containerd.io/checkpoint/ck:"),
        "ctr task checkpoint printed {image:?}"
    );
    let index = cd.image_index(&image);
    let types: Vec<&str> = index["manifests"]
        .as_array()
        .map(|ms| ms.iter().filter_map(|m| m["mediaType"].as_str()).collect())
        .unwrap_or_default();
    for want in [
        integration::checkpoint::CRIU_CHECKPOINT_MEDIA_TYPE,
        "application/vnd.containerd.container.checkpoint.config.v1+proto",
    ] {
        assert!(types.contains(&want), "{want} missing from {index:#}");
    }

    // Left running, thawed (ctr resumed it, the shim thawed its own freeze): it counts on.
    assert_eq!(status(cd, "ck").as_deref(), Some("RUNNING"));
    let (tok2, _) = wait_counter_past(t.pid, "/tmp", before + 3);
    assert_eq!(tok, tok2);
    assert_eq!(cd.task("ck").map(|t| t.pid), Some(t.pid), "init changed");
});

both_runtimes!(task_checkpoint_exit_then_restore, |rt, cd| {
    let events = cd.spawn_ctr(["events"], false);
    let script = counter_script("/tmp");
    let t = cd.run_detached(rt, "ckx", &["sh", "-c", &script]);
    let (tok, before) = wait_counter_past(t.pid, "/tmp", 3);

    let image = task_checkpoint(cd, &["--exit", "ckx"]);
    // The usual exit: STOPPED with 137 (CRIU kills the dumped tree), a /tasks/exit event.
    cd.wait_task_status("ckx", "STOPPED", STATE_TIMEOUT);
    assert!(
        !integration::host::alive(t.pid as i32),
        "init still alive after checkpoint --exit"
    );
    let line = events.wait_for_stdout("/tasks/exit", T);
    let exit_line = line
        .lines()
        .find(|l| l.contains("/tasks/exit") && l.contains("\"ckx\""))
        .unwrap_or_else(|| panic!("no /tasks/exit for ckx in:\n{line}"));
    assert!(
        exit_line.contains("\"exit_status\":137"),
        "exit event: {exit_line}"
    );
    let del = cd.ctr(["tasks", "delete", "ckx"]);
    assert!(del.status.success(), "{}", show(&del));
    assert!(
        integration::stderr(&del).contains("exit code 137"),
        "{}",
        show(&del)
    );

    // The checkpoint is whole: restored into a new container it counts on from where it was.
    let desc = cd.checkpoint_descriptor(&image);
    let api = Api::connect(cd);
    let pid = api
        .restore_as_new("ckx", "ckx2", rt, &desc)
        .unwrap_or_else(|e| panic!("{e}"));
    cd.wait_task_status("ckx2", "RUNNING", STATE_TIMEOUT);
    // No --rw: the custom shim brings /tmp/count back itself, runc.v2 does not (the first
    // write after the restore creates it).
    let (tok2, n) = wait_counter_past(pid, "/tmp", before);
    assert_eq!(
        tok, tok2,
        "the restored process is not the checkpointed one"
    );
    assert!(n > before);
    cd.kill_and_delete_task("ckx2");
});

both_runtimes!(
    container_checkpoint_rw_restore_same_and_new_name,
    |rt, cd| {
        let script = counter_script("/tmp");
        let t = cd.run_detached(rt, "cr", &["sh", "-c", &script]);
        let (tok, before) = wait_counter_past(t.pid, "/tmp", 3);
        cd.ctr_ok([
            "containers",
            "checkpoint",
            "--task",
            "--rw",
            "cr",
            "ckpt/cr:1",
        ]);
        assert_eq!(status(cd, "cr").as_deref(), Some("RUNNING"));
        cd.kill_and_delete_task("cr");
        cd.ctr_ok(["containers", "delete", "cr"]);

        // Same name.
        cd.ctr_ok(["containers", "restore", "--live", "--rw", "cr", "ckpt/cr:1"]);
        let r = cd.wait_task_status("cr", "RUNNING", STATE_TIMEOUT);
        let (tok2, _) = wait_counter_past(r.pid, "/tmp", before);
        assert_eq!(
            tok, tok2,
            "restored under the same name: not the checkpointed process"
        );
        cd.kill_and_delete_task("cr");
        cd.ctr_ok(["containers", "delete", "cr"]);
        cd.assert_nothing_left("cr");

        // A new name, from the same checkpoint (the spec keeps the original's cgroup path: the
        // original is gone, see the module doc).
        cd.ctr_ok([
            "containers",
            "restore",
            "--live",
            "--rw",
            "cr-new",
            "ckpt/cr:1",
        ]);
        let r2 = cd.wait_task_status("cr-new", "RUNNING", STATE_TIMEOUT);
        let (tok3, _) = wait_counter_past(r2.pid, "/tmp", before);
        assert_eq!(
            tok, tok3,
            "restored under a new name: not the checkpointed process"
        );
        cd.kill_and_delete_task("cr-new");
        cd.ctr_ok(["containers", "delete", "cr-new"]);
        cd.assert_nothing_left("cr-new");
    }
);

both_runtimes!(tty_checkpoint_restore, |rt, cd| {
    let mut p = cd.run_tty(rt, "tty", 24, 80, &["sh"]);
    p.wait_for("# ", T);
    p.write(b"X=kept-$((6*7)); echo ready-$X\r");
    p.wait_for("ready-kept-42", T);

    cd.ctr_ok([
        "containers",
        "checkpoint",
        "--task",
        "--rw",
        "tty",
        "ckpt/tty:1",
    ]);
    assert_eq!(status(cd, "tty").as_deref(), Some("RUNNING"));
    // Output still flows on the original's terminal after the checkpoint.
    p.write(b"echo still-$((40+2))\r");
    p.wait_for("still-42", T);

    cd.kill("tty", "SIGKILL");
    let out = p.wait(T);
    assert_eq!(
        out.status.code(),
        Some(137),
        "{:?}",
        integration::stdout(&out)
    );
    cd.wait_task_gone("tty", STATE_TIMEOUT);
    // `ctr run --rm` removed the container.
    assert!(!cd.containers().iter().any(|c| c == "tty"));

    // ctr restore of a terminal task attaches to the console it runs on and waits for the exit.
    let mut r = cd.pty_ctr(
        [
            "containers",
            "restore",
            "--live",
            "--rw",
            "tty",
            "ckpt/tty:1",
        ],
        24,
        80,
    );
    cd.wait_task_status("tty", "RUNNING", STATE_TIMEOUT);
    r.write(b"echo back-$X\r");
    r.wait_for("back-kept-42", T);
    r.write(b"exit 3\r");
    let out = r.wait(T);
    assert_eq!(
        out.status.code(),
        Some(3),
        "restored tty: {:?}",
        integration::stdout(&out)
    );
    cd.wait_task_gone("tty", STATE_TIMEOUT);
    cd.ctr_ok(["containers", "delete", "tty"]);
    cd.assert_nothing_left("tty");
});

both_runtimes!(paused_task_stays_paused, |rt, cd| {
    let script = counter_script("/tmp");
    let t = cd.run_detached(rt, "pz", &["sh", "-c", &script]);
    wait_counter_past(t.pid, "/tmp", 3);
    cd.ctr_ok(["tasks", "pause", "pz"]);
    cd.wait_task_status("pz", "PAUSED", STATE_TIMEOUT);
    let (_, c1) = read_counter(t.pid, "/tmp").expect("counter");

    // ctr sees PAUSED and neither pauses nor resumes.
    task_checkpoint(cd, &["pz"]);
    assert_eq!(
        status(cd, "pz").as_deref(),
        Some("PAUSED"),
        "after ctr task checkpoint"
    );
    // Straight through the API too (no client at all around it).
    let mut api = Api::connect(cd);
    api.use_new_lease("paused");
    let desc = api.checkpoint_ok("pz", Some(&CheckpointOptions::default()));
    assert_eq!(
        status(cd, "pz").as_deref(),
        Some("PAUSED"),
        "after Tasks.Checkpoint"
    );
    // Nothing to poll for when the point is that nothing moves: the counter ticks every ~20 ms.
    sleep(Duration::from_millis(300));
    assert_eq!(
        read_counter(t.pid, "/tmp").map(|c| c.1),
        Some(c1),
        "counter moved while PAUSED"
    );

    cd.ctr_ok(["tasks", "resume", "pz"]);
    cd.wait_task_status("pz", "RUNNING", STATE_TIMEOUT);
    let (tok, _) = wait_counter_past(t.pid, "/tmp", c1 + 3);

    // A checkpoint taken while paused restores to a running task.
    cd.kill_and_delete_task("pz");
    let pid = api
        .restore_as_new("pz", "pz2", rt, &desc)
        .unwrap_or_else(|e| panic!("{e}"));
    cd.wait_task_status("pz2", "RUNNING", STATE_TIMEOUT);
    let (tok2, _) = wait_counter_past(pid, "/tmp", c1);
    assert_eq!(tok, tok2, "not the checkpointed process");
    cd.kill_and_delete_task("pz2");
});

both_runtimes!(paused_task_checkpoint_exit, |rt, cd| {
    let script = counter_script("/tmp");
    let t = cd.run_detached(rt, "pzx", &["sh", "-c", &script]);
    wait_counter_past(t.pid, "/tmp", 3);
    cd.ctr_ok(["tasks", "pause", "pzx"]);
    cd.wait_task_status("pzx", "PAUSED", STATE_TIMEOUT);
    task_checkpoint(cd, &["--exit", "pzx"]);
    // The dumped processes die although the task was frozen.
    cd.wait_task_status("pzx", "STOPPED", STATE_TIMEOUT);
    integration::poll("the init to be gone", T, || {
        (!integration::host::alive(t.pid as i32)).then_some(())
    });
    cd.ctr_ok(["tasks", "delete", "pzx"]);
    cd.ctr_ok(["containers", "delete", "pzx"]);
    cd.assert_nothing_left("pzx");
});

// A restored container checkpointed again, restored again: the second checkpoint holds what
// the first restore brought back (for the custom shim, files included).
both_runtimes!(restored_container_checkpoints_again, |rt, cd| {
    let script = format!("echo zero > /gen0; {}", counter_script("/tmp"));
    let t = cd.run_detached(rt, "g0", &["sh", "-c", &script]);
    let (tok, _) = wait_counter_past(t.pid, "/tmp", 3);
    let mut api = Api::connect(cd);
    api.use_new_lease("generations");
    let d0 = api.checkpoint_ok("g0", None);
    cd.kill_and_delete_task("g0");

    let p1 = api
        .restore_as_new("g0", "g1", rt, &d0)
        .unwrap_or_else(|e| panic!("first restore: {e}"));
    cd.wait_task_status("g1", "RUNNING", STATE_TIMEOUT);
    let (_, n1) = wait_counter_past(p1, "/tmp", 3);
    let d1 = api.checkpoint_ok("g1", None);
    cd.kill_and_delete_task("g1");

    let p2 = api
        .restore_as_new("g1", "g2", rt, &d1)
        .unwrap_or_else(|e| panic!("second restore: {e}"));
    cd.wait_task_status("g2", "RUNNING", STATE_TIMEOUT);
    let (tok2, _) = wait_counter_past(p2, "/tmp", n1);
    assert_eq!(tok, tok2, "not the process of the first generation");
    if rt == Runtime::Custom {
        assert_eq!(
            read_in_container(p2, "/gen0").as_deref(),
            Some("zero\n"),
            "a file of the first generation did not survive two restores"
        );
    }
    cd.kill_and_delete_task("g2");
});

both_runtimes!(image_path_and_work_path, |rt, cd| {
    let script = counter_script("/tmp");
    let t = cd.run_detached(rt, "ip", &["sh", "-c", &script]);
    wait_counter_past(t.pid, "/tmp", 3);
    let images = cd.dir().join("ckpt-images");
    let work = cd.dir().join("ckpt-work");
    let before: Vec<String> = cd
        .ctr_ok(["images", "ls", "-q"])
        .lines()
        .map(String::from)
        .collect();
    task_checkpoint(
        cd,
        &[
            "--image-path",
            images.to_str().unwrap(),
            "--work-path",
            work.to_str().unwrap(),
            "ip",
        ],
    );
    let names = |d: &std::path::Path| -> Vec<String> {
        std::fs::read_dir(d)
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    let in_images = names(&images);
    for f in ["inventory.img", "descriptors.json"] {
        assert!(in_images.iter().any(|n| n == f), "{f} not in {in_images:?}");
    }
    assert!(
        in_images.iter().any(|n| n.starts_with("pages-")),
        "no pages-*.img in {in_images:?}"
    );
    let in_work = names(&work);
    assert!(
        in_work.iter().any(|n| n == "dump.log"),
        "CRIU's dump.log not in the work path: {in_work:?}"
    );
    if rt == Runtime::Custom {
        for f in [ROOTFS_DIFF, DELETED_FILES, SHIM_METADATA] {
            assert!(in_images.iter().any(|n| n == f), "{f} not in {in_images:?}");
        }
        assert!(
            !in_images.iter().any(|n| n == "dump.log"),
            "dump.log belongs in the work path: {in_images:?}"
        );
        let diff = tar_list(&images.join(ROOTFS_DIFF));
        assert!(
            diff.iter()
                .any(|n| n.trim_start_matches("./") == "tmp/count"),
            "/tmp/count not in the rootfs diff: {diff:?}"
        );
    }
    // With an image path containerd stores no checkpoint content. containerd's Go client only
    // knows that for io.containerd.runc.v1/v2 (isCheckpointPathExist): for any other runtime
    // ctr still writes an image, of the image layers and the rw layer, without a CRIU blob.
    let after: Vec<String> = cd
        .ctr_ok(["images", "ls", "-q"])
        .lines()
        .map(String::from)
        .collect();
    let new: Vec<&String> = after.iter().filter(|i| !before.contains(i)).collect();
    match rt {
        Runtime::RuncV2 => assert!(new.is_empty(), "ctr made images: {new:?}"),
        Runtime::Custom => {
            for image in new {
                let index = cd.image_index(image);
                assert!(
                    !index
                        .to_string()
                        .contains(integration::checkpoint::CRIU_CHECKPOINT_MEDIA_TYPE),
                    "a CRIU blob in {image} although the images went to --image-path: {index:#}"
                );
            }
        }
    }
    assert_eq!(status(cd, "ip").as_deref(), Some("RUNNING"));
    let (_, c) = read_counter(t.pid, "/tmp").expect("counter");
    wait_counter_past(t.pid, "/tmp", c + 3);
});

/// Changes the rootfs in every way a diff must carry: a new file (with a mode), a changed one,
/// a deleted one, a directory from the image replaced (its content gone, a new file in it).
const FILE_CHANGES: &str = "echo new > /newfile; chmod 0741 /newfile; \
echo changed > /etc/hostname; rm /etc/group; \
rm -rf /var; mkdir /var; echo inside > /var/only; \
echo done > /ready; exec sleep 100000";

/// Checkpoints the FILE_CHANGES container, removes it, restores it (with or without the
/// client's rw layer) and checks every change came back.
fn file_changes(cd: &integration::Containerd, rt: Runtime, rw: bool) {
    let t = cd.run_detached(rt, "fc", &["sh", "-c", FILE_CHANGES]);
    integration::poll("/ready", T, || read_in_container(t.pid, "/ready"));
    let rw: &[&str] = if rw { &["--rw"] } else { &[] };
    let mut args = vec!["containers", "checkpoint", "--task"];
    args.extend_from_slice(rw);
    args.extend_from_slice(&["fc", "ckpt/fc:1"]);
    cd.ctr_ok(args);
    cd.kill_and_delete_task("fc");
    cd.ctr_ok(["containers", "delete", "fc"]);

    let mut args = vec!["containers", "restore", "--live"];
    args.extend_from_slice(rw);
    args.extend_from_slice(&["fc", "ckpt/fc:1"]);
    cd.ctr_ok(args);
    let r = cd.wait_task_status("fc", "RUNNING", STATE_TIMEOUT);
    let root = format!("/proc/{}/root", r.pid);
    let path = |p: &str| std::path::PathBuf::from(format!("{root}{p}"));
    assert_eq!(
        read_in_container(r.pid, "/newfile").as_deref(),
        Some("new\n")
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path("/newfile"))
        .expect("/newfile")
        .permissions()
        .mode();
    assert_eq!(mode & 0o7777, 0o741, "mode of /newfile: {mode:o}");
    assert_eq!(
        read_in_container(r.pid, "/etc/hostname").as_deref(),
        Some("changed\n")
    );
    assert!(!path("/etc/group").exists(), "/etc/group came back");
    assert!(
        path("/etc/passwd").is_file(),
        "/etc/passwd (unchanged) missing"
    );
    assert_eq!(
        read_in_container(r.pid, "/var/only").as_deref(),
        Some("inside\n")
    );
    let var: Vec<String> = std::fs::read_dir(path("/var"))
        .expect("/var")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        var,
        vec!["only".to_string()],
        "/var was replaced by a directory with one file"
    );
    cd.kill_and_delete_task("fc");
}

// The custom shim carries the files in the checkpoint itself: no --rw. containerd-shim-runc-v2
// needs the client's rw layer.
both_runtimes!(file_changes_come_back, |rt, cd| {
    file_changes(cd, rt, rt == Runtime::RuncV2);
});

/// The custom shim's diff applied on top of the rw layer containerd already applied.
#[test]
fn file_changes_come_back_with_rw_too_custom() {
    integration::run_scenario(Runtime::Custom, |rt, cd| file_changes(cd, rt, true));
}

/// Holds ~5 MiB of random text in a shell variable, checksums it at start and every ~200 ms
/// after, counting good checks in /ok and writing /bad on a mismatch. The data exists only in
/// the shell's memory.
const MEMORY_CHECK: &str = "x=$(head -c 4000000 /dev/urandom | base64 -w0); \
s1=$(printf %s \"$x\" | md5sum); n=0; \
while :; do \
  s=$(printf %s \"$x\" | md5sum); \
  if [ \"$s\" = \"$s1\" ]; then n=$((n+1)); echo $n 1<> /ok; else echo \"$s != $s1\" > /bad; fi; \
  sleep 0.2; \
done";

fn ok_count(pid: u32) -> Option<u64> {
    read_in_container(pid, "/ok")?.trim().parse().ok()
}

both_runtimes!(memory_is_intact_after_restore, |rt, cd| {
    let t = cd.run_detached(rt, "mem", &["sh", "-c", MEMORY_CHECK]);
    let before = integration::poll("first checksums", T, || ok_count(t.pid).filter(|n| *n >= 2));
    cd.ctr_ok([
        "containers",
        "checkpoint",
        "--task",
        "--rw",
        "mem",
        "ckpt/mem:1",
    ]);
    cd.kill_and_delete_task("mem");
    cd.ctr_ok(["containers", "delete", "mem"]);
    cd.ctr_ok([
        "containers",
        "restore",
        "--live",
        "--rw",
        "mem",
        "ckpt/mem:1",
    ]);
    let r = cd.wait_task_status("mem", "RUNNING", STATE_TIMEOUT);
    // More good checks after the restore, on the restored memory, and never a bad one.
    integration::poll("checksums after restore", T, || {
        ok_count(r.pid).filter(|n| *n >= before + 3)
    });
    assert_eq!(
        read_in_container(r.pid, "/bad"),
        None,
        "checksum mismatch after restore"
    );
    cd.kill_and_delete_task("mem");
});

/// Checkpoint with one runtime, restore with the other, through the API (the runtime of a
/// restore is the new container's). The counter lives in /dev/shm, a tmpfs CRIU dumps itself,
/// so neither direction depends on the custom shim's rootfs diff.
fn interop(cd: &integration::Containerd, from: Runtime, to: Runtime) {
    let script = counter_script("/dev/shm");
    let t = cd.run_detached(from, "src", &["sh", "-c", &script]);
    let (tok, before) = wait_counter_past(t.pid, "/dev/shm", 3);
    let mut api = Api::connect(cd);
    api.use_new_lease("interop");
    let desc = api.checkpoint_ok("src", Some(&CheckpointOptions::default()));
    cd.kill_and_delete_task("src");
    let pid = api
        .restore_as_new("src", "dst", to, &desc)
        .unwrap_or_else(|e| {
            panic!(
                "checkpoint by {} restored by {}: {e}",
                from.name(),
                to.name()
            )
        });
    cd.wait_task_status("dst", "RUNNING", STATE_TIMEOUT);
    let shims = cd.shims_for("dst");
    assert!(
        shims.iter().any(|p| p.program_name() == to.shim_program()),
        "dst is not served by {}: {shims:?}",
        to.shim_program()
    );
    let (tok2, _) = wait_counter_past(pid, "/dev/shm", before + 3);
    assert_eq!(tok, tok2, "not the checkpointed process");
    cd.kill_and_delete_task("dst");
}

#[test]
fn interop_runc_checkpoint_custom_restore() {
    integration::run_scenario(Runtime::Custom, |_, cd| {
        interop(cd, Runtime::RuncV2, Runtime::Custom)
    });
}

#[test]
fn interop_custom_checkpoint_runc_restore() {
    integration::run_scenario(Runtime::Custom, |_, cd| {
        interop(cd, Runtime::Custom, Runtime::RuncV2)
    });
}

/// Waits for /lockhold to appear (the test copies it into the rootfs), then runs it: it holds
/// an exclusive flock on /tmp/lk and writes /locked.
const HOLD_LOCK: &str =
    "until [ -x /lockhold ]; do sleep 0.05; done; exec /lockhold /tmp/lk /locked";

both_runtimes!(criu_failure_keeps_the_task, |rt, cd| {
    let t = cd.run_detached(rt, "lk", &["sh", "-c", HOLD_LOCK]);
    let dst = format!("/proc/{}/root/lockhold.tmp", t.pid);
    std::fs::copy(integration::checkpoint::lock_holder(), &dst).expect("copy lockhold in");
    std::fs::rename(&dst, format!("/proc/{}/root/lockhold", t.pid)).expect("rename lockhold");
    integration::poll("the lock to be taken", T, || {
        read_in_container(t.pid, "/locked")
    });
    let mut api = Api::connect(cd);
    api.use_new_lease("criu-failure");
    let no_locks = CheckpointOptions::default();

    let err = api
        .checkpoint("lk", Some(&no_locks))
        .expect_err("checkpoint of a held file lock without file_locks");
    assert!(
        err.contains("log"),
        "the error does not point at CRIU's log: {err}"
    );
    if rt == Runtime::Custom {
        // The shim quotes CRIU's own reason and keeps the log.
        assert!(err.contains("file lock"), "CRIU's reason missing: {err}");
        let kept = cd.bundle_dir("lk").join("criu-dump.log");
        assert!(kept.is_file(), "{} not kept: {err}", kept.display());
    }
    assert_eq!(
        status(cd, "lk").as_deref(),
        Some("RUNNING"),
        "after a failed checkpoint"
    );
    assert!(integration::host::alive(t.pid as i32));

    cd.ctr_ok(["tasks", "pause", "lk"]);
    cd.wait_task_status("lk", "PAUSED", STATE_TIMEOUT);
    let err = api
        .checkpoint("lk", Some(&no_locks))
        .expect_err("checkpoint of a paused task holding a file lock without file_locks");
    assert!(err.contains("log"), "{err}");
    assert_eq!(
        status(cd, "lk").as_deref(),
        Some("PAUSED"),
        "after a failed checkpoint"
    );
    cd.ctr_ok(["tasks", "resume", "lk"]);
    cd.wait_task_status("lk", "RUNNING", STATE_TIMEOUT);

    // With the option, the same task checkpoints and goes on running.
    let locks = CheckpointOptions {
        file_locks: true,
        ..Default::default()
    };
    api.checkpoint_ok("lk", Some(&locks));
    assert_eq!(status(cd, "lk").as_deref(), Some("RUNNING"));
    if rt == Runtime::Custom {
        // No options at all means "leave running, with file locks" to the custom shim.
        api.checkpoint_ok("lk", None);
        assert_eq!(status(cd, "lk").as_deref(), Some("RUNNING"));
    }
    cd.kill_and_delete_task("lk");
});

/// The last complete line `<prefix> <token> <n>` of `text`.
fn last_tick(text: &str, prefix: &str) -> Option<(String, u64)> {
    let complete = &text[..text.rfind('\n')?];
    complete.lines().rev().find_map(|l| {
        let mut parts = l.split_whitespace();
        (parts.next()? == prefix).then_some(())?;
        Some((parts.next()?.to_string(), parts.next()?.parse().ok()?))
    })
}

const TICKS: &str = "tok=$(head -c 8 /dev/urandom | od -An -tx1 | tr -d ' \\n'); i=0; \
while :; do i=$((i+1)); echo \"out $tok $i\"; echo \"err $tok $i\" >&2; sleep 0.02; done";

both_runtimes!(output_flows_after_restore, |rt, cd| {
    // Attached, without --rm: the original writes to pipes ctr reads, and its container
    // record stays for the restore.
    let orig = cd.spawn_ctr(
        [
            "run",
            "--fifo-dir",
            cd.fifo_dir(),
            "--runtime",
            rt.name(),
            integration::IMAGE,
            "out",
            "sh",
            "-c",
            TICKS,
        ],
        false,
    );
    let (tok, n0) = integration::poll("ticks from the original", T, || {
        last_tick(&orig.stdout(), "out").filter(|t| t.1 > 3)
    });
    let mut api = Api::connect(cd);
    api.use_new_lease("output");
    let desc = api.checkpoint_ok("out", None);
    cd.kill("out", "SIGKILL");
    let out = orig.wait(T);
    assert_eq!(out.status.code(), Some(137), "{}", show(&out));
    assert!(
        integration::stderr(&out).contains(&format!("err {tok} ")),
        "stderr of the original: {}",
        show(&out)
    );
    cd.wait_task_gone("out", STATE_TIMEOUT);

    // Restored with new stdout/stderr fifos: the restored process writes to them.
    let stdout = FifoReader::new(&cd.dir().join("restored.out"));
    let stderr = FifoReader::new(&cd.dir().join("restored.err"));
    api.create_container_like("out", "out2", rt, &[]);
    api.create_task_from_checkpoint_with_io("out2", &desc, stdout.path(), stderr.path())
        .unwrap_or_else(|e| panic!("{e}"));
    cd.wait_task_status("out2", "RUNNING", STATE_TIMEOUT);
    for (fifo, prefix) in [(&stdout, "out"), (&stderr, "err")] {
        let (tok2, _) = fifo.wait_for(&format!("{prefix} ticks past {n0}"), |t| {
            last_tick(t, prefix).filter(|t| t.1 > n0 + 3)
        });
        assert_eq!(tok, tok2, "{prefix}: not the checkpointed process");
    }
    cd.kill_and_delete_task("out2");
});

/// Holds /data/f open (fd 3) from a bind mount of the host: a restore after the host file is
/// gone cannot reopen it.
const HOLD_FILE: &str = "exec 3< /data/f; echo held > /held; exec sleep 100000";

both_runtimes!(restore_failure_is_reported_and_cleaned_up, |rt, cd| {
    let data = cd.dir().join("data");
    std::fs::create_dir(&data).expect("mkdir data");
    std::fs::write(data.join("f"), "x").expect("write data/f");
    let mount = format!(
        "type=bind,src={},dst=/data,options=rbind:rw",
        data.display()
    );
    let t = cd.run_detached_with(rt, "rf", &["--mount", &mount], &["sh", "-c", HOLD_FILE]);
    integration::poll("/held", T, || read_in_container(t.pid, "/held"));
    let mut api = Api::connect(cd);
    api.use_new_lease("restore-failure");
    let desc = api.checkpoint_ok("rf", None);
    cd.kill_and_delete_task("rf");
    std::fs::remove_file(data.join("f")).expect("rm data/f");

    let err = api
        .restore_as_new("rf", "rf2", rt, &desc)
        .expect_err("restore of a process holding a file that is gone");
    eprintln!("restore error ({}): {err}", rt.name());
    assert!(
        err.contains("log"),
        "the error does not point at CRIU's log: {err}"
    );
    if rt == Runtime::Custom {
        assert!(err.contains("restore"), "{err}");
    }
    // Both shims leave the task CREATED (the restore is Start's work); it and the container
    // go away cleanly.
    assert_eq!(status(cd, "rf2").as_deref(), Some("CREATED"));
    cd.ctr_ok(["tasks", "delete", "rf2"]);
    cd.ctr_ok(["containers", "delete", "rf2"]);
    cd.assert_nothing_left("rf2");
});

/// Less common rootfs changes: symlinks (new and replacing a file), a hard link pair, a fifo,
/// an empty directory, a name with spaces, owners and a setuid mode, a directory of the image
/// deleted whole, a file replaced by a directory.
const SPECIAL_FILES: &str = "ln -s /etc/passwd /sym; rm /etc/hostname; ln -s nowhere /etc/hostname; \
echo linked > /hl1; ln /hl1 /hl2; mkfifo /fifo; mkdir -p /empty/dir; \
echo spaced > '/a name with spaces'; echo owned > /owned; chown 1234:5678 /owned; chmod 4755 /owned; \
rm -rf /root; rm /etc/hosts; mkdir /etc/hosts; echo d > /etc/hosts/inside; \
echo done > /ready; exec sleep 100000";

// As file_changes_come_back: the custom shim without --rw, containerd-shim-runc-v2 with it.
both_runtimes!(special_files_come_back, |rt, cd| {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let t = cd.run_detached(rt, "sf", &["sh", "-c", SPECIAL_FILES]);
    integration::poll("/ready", T, || read_in_container(t.pid, "/ready"));
    let rw: &[&str] = if rt == Runtime::RuncV2 {
        &["--rw"]
    } else {
        &[]
    };
    let mut args = vec!["containers", "checkpoint", "--task"];
    args.extend_from_slice(rw);
    args.extend_from_slice(&["sf", "ckpt/sf:1"]);
    cd.ctr_ok(args);
    cd.kill_and_delete_task("sf");
    cd.ctr_ok(["containers", "delete", "sf"]);
    let mut args = vec!["containers", "restore", "--live"];
    args.extend_from_slice(rw);
    args.extend_from_slice(&["sf", "ckpt/sf:1"]);
    cd.ctr_ok(args);
    let r = cd.wait_task_status("sf", "RUNNING", STATE_TIMEOUT);
    let p = |f: &str| std::path::PathBuf::from(format!("/proc/{}/root{f}", r.pid));
    let mut wrong = Vec::new();
    let mut check = |ok: bool, what: &str| {
        if !ok {
            wrong.push(what.to_string());
        }
    };
    check(
        std::fs::read_link(p("/sym")).ok() == Some("/etc/passwd".into()),
        "/sym -> /etc/passwd",
    );
    check(
        std::fs::read_link(p("/etc/hostname")).ok() == Some("nowhere".into()),
        "/etc/hostname replaced by a symlink",
    );
    let (h1, h2) = (std::fs::metadata(p("/hl1")), std::fs::metadata(p("/hl2")));
    check(
        matches!((&h1, &h2), (Ok(a), Ok(b)) if a.ino() == b.ino() && a.nlink() == 2),
        "/hl1 and /hl2 one inode with 2 links",
    );
    check(
        std::fs::symlink_metadata(p("/fifo"))
            .map(|m| m.file_type().is_fifo())
            .unwrap_or(false),
        "/fifo is a fifo",
    );
    check(p("/empty/dir").is_dir(), "/empty/dir");
    check(
        read_in_container(r.pid, "/a name with spaces").as_deref() == Some("spaced\n"),
        "/a name with spaces",
    );
    let owned = std::fs::metadata(p("/owned"));
    check(
        matches!(&owned, Ok(m) if m.uid() == 1234 && m.gid() == 5678),
        "/owned owned by 1234:5678",
    );
    check(
        matches!(&owned, Ok(m) if m.mode() & 0o7777 == 0o4755),
        &format!(
            "/owned mode 4755 (is {:o})",
            owned.as_ref().map(|m| m.mode() & 0o7777).unwrap_or(0)
        ),
    );
    check(
        !p("/root").exists(),
        "/root (a directory of the image) deleted",
    );
    check(
        read_in_container(r.pid, "/etc/hosts/inside").as_deref() == Some("d\n"),
        "/etc/hosts replaced by a directory",
    );
    assert!(wrong.is_empty(), "not restored right: {wrong:#?}");
    cd.kill_and_delete_task("sf");
});
