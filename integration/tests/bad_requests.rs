//! Bad requests, through containerd's gRPC API and to the shim's own ttrpc socket: unknown
//! container and exec ids, duplicate exec ids, verbs in the wrong state, options of the wrong
//! type or undecodable. Each gets the right code and a message naming what was wrong, and the
//! shim stays up: a later request works, the container runs on, nothing is left frozen.
//!
//! io.containerd.runc.v2 is the reference where it answers the same; where it is laxer (an
//! Unknown code, a message that names nothing) only the custom shim is held to it, and what the
//! Go shim said is printed.

use containerd_client::tonic::Code;
use integration::faults::{
    freezer_state, remove_container, run_with, shim_api, shim_pid, wait_count_advances, Api,
    CheckpointOptions, RpcError, ShimClient, CHECKPOINT_OPTIONS_TYPE_URL, COUNTER,
    LINUX_RESOURCES_TYPE_URL, PROCESS_SPEC_TYPE_URL, RUNC_OPTIONS_TYPE_URL,
};
use integration::{both_runtimes, show, Containerd, Runtime, STATE_TIMEOUT};
use prost_types::Any;

/// Bytes no protobuf decoder accepts (field 1 with wire type 7).
const GARBAGE: &[u8] = b"\x0f\x0f\x0f\x0f";

/// `r` failed with `code` and a message containing every one of `names` (the latter asserted
/// for the custom shim only unless `strict`). Returns the error.
fn expect_code<T: std::fmt::Debug>(
    rt: Runtime,
    r: Result<T, RpcError>,
    code: Code,
    names: &[&str],
    what: &str,
) -> RpcError {
    let e = match r {
        Ok(v) => panic!("{rt:?}: {what}: should fail with {code:?}, got Ok({v:?})"),
        Err(e) => e,
    };
    eprintln!("{rt:?}: {what}: {e}");
    if rt == Runtime::RuncV2 && e.code != code {
        eprintln!("  (reference shim answers {:?}, not asserted)", e.code);
        return e;
    }
    assert_eq!(e.code, code, "{rt:?}: {what}: {e}");
    if rt == Runtime::Custom {
        for n in names {
            assert!(
                e.message.contains(n),
                "{rt:?}: {what}: the message should name {n:?}: {e}"
            );
        }
    }
    e
}

/// The shim of `id` still serves requests and the container runs on, thawed.
fn assert_shim_fine(cd: &Containerd, id: &str, pid: u32, what: &str) {
    let mut shim = ShimClient::connect(cd, id);
    let (shim_pid_now, task_pid) = shim
        .connect_call(id)
        .unwrap_or_else(|e| panic!("{what}: the shim no longer answers Connect: {e}"));
    assert_eq!(shim_pid_now as i32, shim_pid(cd, id), "{what}: same shim");
    assert_eq!(task_pid, pid, "{what}: task pid");
    assert_eq!(
        cd.task(id).map(|t| t.status),
        Some("RUNNING".to_string()),
        "{what}"
    );
    assert_eq!(freezer_state(cd, id).as_deref(), Some("THAWED"), "{what}");
    wait_count_advances(pid, what);
    let out = cd.exec(id, "still-there", &["true"]);
    assert!(out.status.success(), "{what}: exec: {}", show(&out));
}

both_runtimes!(unknown_ids_are_not_found, |rt, cd| {
    let id = "known";
    let pid = run_with(cd, rt, id, &[], &["sh", "-c", COUNTER]);
    let api = Api::connect(cd);

    // containerd itself answers for a container it does not know.
    let e = expect_code(
        rt,
        api.kill("nope", "", 9),
        Code::NotFound,
        &[],
        "Kill(nope)",
    );
    assert!(e.message.contains("nope"), "{e}");

    // An unknown exec of a known container: the shim answers.
    expect_code(
        rt,
        api.kill(id, "nope", 9),
        Code::NotFound,
        &["nope"],
        "Kill(exec nope)",
    );
    expect_code(
        rt,
        api.start(id, "nope"),
        Code::NotFound,
        &["nope"],
        "Start(exec nope)",
    );
    expect_code(
        rt,
        api.get(id, "nope"),
        Code::NotFound,
        &["nope"],
        "Get(exec nope)",
    );
    expect_code(
        rt,
        api.delete_process(id, "nope"),
        Code::NotFound,
        &["nope"],
        "DeleteProcess(exec nope)",
    );
    expect_code(
        rt,
        api.resize_pty(id, "nope"),
        Code::NotFound,
        &["nope"],
        "ResizePty(exec nope)",
    );

    // An unknown container at the shim itself (containerd never sends one).
    let mut shim = ShimClient::connect(cd, id);
    let idreq = shim_api::IdRequest {
        id: "nope".into(),
        exec_id: String::new(),
    };
    expect_code(
        rt,
        shim.state("nope", ""),
        Code::NotFound,
        &["nope"],
        "shim State(nope)",
    );
    expect_code(
        rt,
        shim.call(
            "Kill",
            &shim_api::KillRequest {
                id: "nope".into(),
                signal: 9,
                ..Default::default()
            },
        ),
        Code::NotFound,
        &["nope"],
        "shim Kill(nope)",
    );
    expect_code(
        rt,
        shim.call("Pause", &idreq),
        Code::NotFound,
        &["nope"],
        "shim Pause(nope)",
    );
    expect_code(
        rt,
        shim.call(
            "Checkpoint",
            &shim_api::CheckpointTaskRequest {
                id: "nope".into(),
                path: cd.dir().join("ckpt-nope").to_string_lossy().into_owned(),
                options: None,
            },
        ),
        Code::NotFound,
        &["nope"],
        "shim Checkpoint(nope)",
    );
    assert!(
        !cd.dir().join("ckpt-nope").exists(),
        "a refused checkpoint created its directory"
    );
    expect_code(
        rt,
        shim.call("Delete", &idreq),
        Code::NotFound,
        &["nope"],
        "shim Delete(nope)",
    );
    expect_code(
        rt,
        shim.state(id, "nope"),
        Code::NotFound,
        &["nope"],
        "shim State(known, exec nope)",
    );
    assert_shim_fine(cd, id, pid, "after requests for unknown ids");
    remove_container(cd, id);
});

both_runtimes!(duplicate_exec_id_already_exists, |rt, cd| {
    let id = "dupexec";
    let pid = run_with(cd, rt, id, &[], &["sh", "-c", COUNTER]);
    let api = Api::connect(cd);
    api.exec(id, "dup", &["sleep", "1000"])
        .expect("first Exec(dup)");
    // Added, not started yet: the id is taken.
    expect_code(
        rt,
        api.exec(id, "dup", &["true"]),
        Code::AlreadyExists,
        &["dup"],
        "Exec(dup) while dup is created",
    );
    let epid = api.start(id, "dup").expect("Start(dup)");
    assert!(integration::host::alive(epid as i32));
    expect_code(
        rt,
        api.exec(id, "dup", &["true"]),
        Code::AlreadyExists,
        &["dup"],
        "Exec(dup) while dup runs",
    );
    // The running exec is the first one, untouched.
    assert_eq!(
        std::fs::read(format!("/proc/{epid}/cmdline")).unwrap_or_default(),
        b"sleep\x001000\x00"
    );
    // Once deleted, the id is free again.
    api.kill(id, "dup", 9).expect("Kill(dup)");
    integration::poll("exec dup to stop", STATE_TIMEOUT, || {
        (api.get(id, "dup").ok()?.1 == 3).then_some(())
    });
    api.delete_process(id, "dup").expect("DeleteProcess(dup)");
    api.exec(id, "dup", &["true"])
        .expect("Exec(dup) after the first was deleted");
    api.start(id, "dup").expect("Start of the second dup");
    integration::poll("the second dup to stop", STATE_TIMEOUT, || {
        (api.get(id, "dup").ok()?.1 == 3).then_some(())
    });
    api.delete_process(id, "dup")
        .expect("DeleteProcess(dup) again");
    assert_shim_fine(cd, id, pid, "after duplicate exec ids");
    remove_container(cd, id);
});

both_runtimes!(verbs_in_the_wrong_state_fail_precondition, |rt, cd| {
    let api = Api::connect(cd);
    // Created, never started.
    let id = "states";
    cd.create_container(rt, id, &["sh", "-c", COUNTER]);
    let created_pid = api.create_task(id, None, None).expect("Tasks.Create");
    assert!(created_pid > 0);
    expect_code(
        rt,
        api.checkpoint(id, Some(CheckpointOptions::default().to_any())),
        Code::FailedPrecondition,
        &[id, "created"],
        "Checkpoint of a created task",
    );
    expect_code(
        rt,
        api.resume(id),
        Code::FailedPrecondition,
        &[id],
        "Resume of a created task",
    );
    let pid = api.start(id, "").expect("Start after the refused requests");
    assert_eq!(pid, created_pid);
    cd.wait_task_status(id, "RUNNING", STATE_TIMEOUT);
    wait_count_advances(pid, "started after a refused checkpoint");

    // Running: resume is wrong. Paused: pause and exec start are wrong, checkpoint is fine.
    expect_code(
        rt,
        api.resume(id),
        Code::FailedPrecondition,
        &[id, "running"],
        "Resume of a running task",
    );
    api.pause(id).expect("Pause");
    expect_code(
        rt,
        api.pause(id),
        Code::FailedPrecondition,
        &[id, "paused"],
        "Pause of a paused task",
    );
    assert_eq!(freezer_state(cd, id).as_deref(), Some("FROZEN"));
    api.resume(id).expect("Resume after a refused pause");
    assert_eq!(freezer_state(cd, id).as_deref(), Some("THAWED"));
    wait_count_advances(pid, "resumed");

    // Stopped.
    expect_code(
        rt,
        api.kill(id, "", 9).and_then(|_| {
            cd.wait_task_status(id, "STOPPED", STATE_TIMEOUT);
            api.checkpoint(id, Some(CheckpointOptions::default().to_any()))
        }),
        Code::FailedPrecondition,
        &[id, "stopped"],
        "Checkpoint of a stopped task",
    );
    expect_code(
        rt,
        api.pause(id),
        Code::FailedPrecondition,
        &[id, "stopped"],
        "Pause of a stopped task",
    );
    expect_code(
        rt,
        api.exec(id, "late", &["true"]),
        Code::FailedPrecondition,
        &[id],
        "Exec in a stopped task",
    );
    api.delete_task(id).expect("Delete of the stopped task");
    cd.ctr_ok(["containers", "delete", id]);
    cd.assert_nothing_left(id);
});

both_runtimes!(bad_options_are_invalid_arguments, |rt, cd| {
    let id = "opts";
    let pid = run_with(cd, rt, id, &[], &["sh", "-c", COUNTER]);
    let api = Api::connect(cd);
    let wrong_type = Any {
        type_url: "types.example.com/not.CheckpointOptions".into(),
        value: CheckpointOptions::default().to_any().value,
    };
    let garbage = Any {
        type_url: CHECKPOINT_OPTIONS_TYPE_URL.into(),
        value: GARBAGE.to_vec(),
    };

    // containerd decodes checkpoint options itself and refuses these before any shim.
    for (what, opts) in [("wrong type URL", &wrong_type), ("garbage bytes", &garbage)] {
        let e = api
            .checkpoint(id, Some(opts.clone()))
            .expect_err(&format!("containerd: Checkpoint with options of a {what}"));
        eprintln!("{rt:?}: containerd, Checkpoint with {what}: {e}");
    }
    assert_shim_fine(cd, id, pid, "after checkpoint options containerd refused");

    // The shim's own answer to them.
    let ckpt_dir = cd.dir().join("ckpt-bad");
    let mut shim = ShimClient::connect(cd, id);
    for (what, opts, names) in [
        (
            "wrong type URL",
            &wrong_type,
            &["not.CheckpointOptions"][..],
        ),
        ("garbage bytes", &garbage, &["CheckpointOptions"][..]),
    ] {
        expect_code(
            rt,
            shim.call(
                "Checkpoint",
                &shim_api::CheckpointTaskRequest {
                    id: id.into(),
                    path: ckpt_dir.to_string_lossy().into_owned(),
                    options: Some(opts.clone()),
                },
            ),
            Code::InvalidArgument,
            names,
            &format!("shim Checkpoint with options of a {what}"),
        );
    }
    if rt == Runtime::Custom {
        assert!(
            integration::faults::list_dir(&ckpt_dir).is_empty(),
            "a refused checkpoint wrote into its directory"
        );
    }
    assert_shim_fine(cd, id, pid, "after bad checkpoint options");

    // Update: resources that are not JSON.
    expect_code(
        rt,
        api.update(
            id,
            Any {
                type_url: LINUX_RESOURCES_TYPE_URL.into(),
                value: b"{\"memory\": ".to_vec(),
            },
        ),
        Code::InvalidArgument,
        &["JSON"],
        "Update with resources that are not JSON",
    );
    // Exec: a process spec that is not JSON.
    expect_code(
        rt,
        api.exec_raw(
            id,
            "badspec",
            Some(Any {
                type_url: PROCESS_SPEC_TYPE_URL.into(),
                value: GARBAGE.to_vec(),
            }),
        ),
        Code::InvalidArgument,
        &["spec"],
        "Exec with a process spec that is not JSON",
    );
    expect_code(
        rt,
        api.start(id, "badspec"),
        Code::NotFound,
        &["badspec"],
        "Start of the refused exec",
    );
    assert_shim_fine(cd, id, pid, "after a bad update and a bad exec");
    remove_container(cd, id);
});

both_runtimes!(bad_runtime_options_at_create, |rt, cd| {
    let api = Api::connect(cd);
    let cases = [
        (
            "wrong type URL",
            Any {
                type_url: "types.example.com/not.Options".into(),
                value: Vec::new(),
            },
        ),
        (
            "garbage bytes",
            Any {
                type_url: RUNC_OPTIONS_TYPE_URL.into(),
                value: GARBAGE.to_vec(),
            },
        ),
    ];
    // containerd decodes task options itself (typeurl) and refuses these before any shim
    // runs; nothing may be left of the attempt.
    for (i, (what, opts)) in cases.iter().enumerate() {
        let id = format!("badopts{i}");
        cd.create_container(rt, &id, &["sleep", "1000"]);
        let e = api
            .create_task(&id, None, Some(opts.clone()))
            .expect_err(&format!("Create with task options of a {what}"));
        eprintln!("{rt:?}: containerd, Create with task options of a {what}: {e}");
        assert_eq!(cd.task(&id), None, "{what}: no task after a refused Create");
        cd.ctr_ok(["containers", "delete", &id]);
        cd.assert_nothing_left(&id);
    }

    // The shim's own answer (a running shim asked to create another container).
    let id = "running";
    let pid = run_with(cd, rt, id, &[], &["sh", "-c", COUNTER]);
    let mut shim = ShimClient::connect(cd, id);
    let bundle = cd.dir().join("no-such-bundle");
    for ((what, opts), name) in cases.into_iter().zip(["not.Options", "Options"]) {
        expect_code(
            rt,
            shim.call(
                "Create",
                &shim_api::CreateTaskRequest {
                    id: "other".into(),
                    bundle: bundle.to_string_lossy().into_owned(),
                    checkpoint: String::new(),
                    options: Some(opts),
                },
            ),
            Code::InvalidArgument,
            &[name],
            &format!("shim Create with options of a {what}"),
        );
        assert!(!bundle.exists(), "a refused Create made its bundle");
    }
    assert_shim_fine(cd, id, pid, "after refused creates");
    remove_container(cd, id);
});
