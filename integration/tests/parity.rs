//! Behaviours containerd's CRI and clients depend on, where the custom shim must answer as
//! containerd-shim-runc-v2 does (same assertions on both runtimes):
//! - an init that exits in a pid namespace it does not own (a pod's shared namespace, the
//!   host's) stops the task and takes the rest of its processes with it;
//! - an exec's terminal comes from the request, not from the process spec, and a large TTY
//!   output arrives whole;
//! - an exec can be sent any signal, real-time ones and 0;
//! - an exec that is starting holds the init's exit: a second exec can still be created, both
//!   starts fail cleanly, then the task stops (containerd issue 10589's scenario);
//! - one shim serving a pod stays responsive to one container while another is restored.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::thread;
use std::time::{Duration, Instant};

use containerd_client::services::v1::ExecProcessRequest;
use integration::checkpoint::FifoReader;
use integration::faults::{
    descendants_with_cmdline, remove_container, run_with, shim_pid, Api, CheckpointOptions,
    COUNTER, PROCESS_SPEC_TYPE_URL,
};
use integration::{both_runtimes, poll, Runtime, STATE_TIMEOUT};
use prost_types::Any;

const T: Duration = Duration::from_secs(30);

/// Processes on the host whose command line is exactly `cmdline` (args joined by spaces).
fn host_procs(cmdline: &str) -> Vec<i32> {
    fs::read_dir("/proc")
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
                .filter(|pid| {
                    fs::read(format!("/proc/{pid}/cmdline"))
                        .map(|b| {
                            let args: Vec<String> = b
                                .split(|c| *c == 0)
                                .filter(|a| !a.is_empty())
                                .map(|a| String::from_utf8_lossy(a).into_owned())
                                .collect();
                            args.join(" ") == cmdline
                        })
                        .unwrap_or(false)
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The process spec of container `id` with `args`, as an Any for ExecProcessRequest.
fn process_spec(api: &Api, id: &str, args: &[&str], terminal: bool) -> Any {
    let spec = api.container(id).spec.expect("container spec");
    let spec: serde_json::Value = serde_json::from_slice(&spec.value).expect("spec is JSON");
    let mut process = spec["process"].clone();
    process["args"] = serde_json::json!(args);
    process["terminal"] = serde_json::Value::Bool(terminal);
    Any {
        type_url: PROCESS_SPEC_TYPE_URL.to_string(),
        value: serde_json::to_vec(&process).expect("encode process"),
    }
}

both_runtimes!(
    init_exit_in_a_shared_pid_namespace_stops_the_task,
    |rt, cd| {
        // The pod's sandbox owns the pid namespace; the app joins it, as with shareProcessNamespace.
        let sandbox = run_with(cd, rt, "sandbox", &[], &["sleep", "100000"]);
        let ns = format!("pid:/proc/{sandbox}/ns/pid");
        run_with(cd, rt, "app", &["--with-ns", &ns], &["sleep", "100001"]);
        let api = Api::connect(cd);
        let marker = format!("sleep 1001{}", rt as u8);
        let args: Vec<&str> = marker.split(' ').collect();
        api.exec("app", "e1", &args)
            .unwrap_or_else(|e| panic!("exec: {e}"));
        api.start("app", "e1")
            .unwrap_or_else(|e| panic!("start exec: {e}"));
        poll("the exec runs", T, || {
            (!host_procs(&marker).is_empty()).then_some(())
        });
        // The init alone gets SIGKILL (no --all): the rest must not outlive it.
        cd.kill("app", "SIGKILL");
        cd.wait_task_status("app", "STOPPED", STATE_TIMEOUT);
        poll("the exec killed with the init", T, || {
            host_procs(&marker).is_empty().then_some(())
        });
        assert_eq!(
            cd.task("sandbox").map(|t| t.status),
            Some("RUNNING".to_string()),
            "the namespace's owner is not touched"
        );
        remove_container(cd, "app");
        remove_container(cd, "sandbox");
    }
);

both_runtimes!(exec_terminal_comes_from_the_request, |rt, cd| {
    run_with(cd, rt, "ttyexec", &[], &["sleep", "100000"]);
    let api = Api::connect(cd);
    // The CRI asks for a TTY in the request; the process spec it sends may say otherwise.
    let out = FifoReader::new(&cd.dir().join("exec-out"));
    const N: u32 = 200_000;
    let script = format!("tty; seq 1 {N}; echo done-$((6*7))");
    let req = api.request(ExecProcessRequest {
        container_id: "ttyexec".into(),
        exec_id: "t1".into(),
        terminal: true,
        stdout: out.path().to_string(),
        spec: Some(process_spec(&api, "ttyexec", &["sh", "-c", &script], false)),
        ..Default::default()
    });
    let mut c = api.tasks();
    api.block_on(c.exec(req))
        .unwrap_or_else(|s| panic!("exec with a terminal: {s}"));
    api.start("ttyexec", "t1")
        .unwrap_or_else(|e| panic!("start a TTY exec whose spec has no terminal: {e}"));
    let text = out.wait_for("the whole output", |t| {
        t.contains("done-42").then(|| t.to_string())
    });
    assert!(
        text.contains("/dev/pts/"),
        "the exec has a terminal: {:?}",
        &text[..80.min(text.len())]
    );
    let numbers: Vec<&str> = text
        .split(['\r', '\n'])
        .filter(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_digit()))
        .collect();
    assert_eq!(
        numbers.len(),
        N as usize,
        "every line of a large TTY output arrives"
    );
    assert_eq!(numbers.last().copied(), Some("200000"));
    remove_container(cd, "ttyexec");
});

both_runtimes!(exec_takes_any_signal, |rt, cd| {
    run_with(cd, rt, "sigs", &[], &["sleep", "100000"]);
    let api = Api::connect(cd);
    // SIGRTMIN+3 is 37 with glibc's SIGRTMIN (34): systemd's "halt".
    let script =
        "trap 'echo rt > /tmp/got' 37; echo ready > /tmp/ready; while :; do sleep 0.05; done";
    api.exec("sigs", "e1", &["sh", "-c", script])
        .unwrap_or_else(|e| panic!("exec: {e}"));
    let pid = api
        .start("sigs", "e1")
        .unwrap_or_else(|e| panic!("start: {e}"));
    let root = format!("/proc/{pid}/root");
    poll("the trap set", T, || {
        fs::read(format!("{root}/tmp/ready")).ok()
    });
    api.kill("sigs", "e1", 0)
        .unwrap_or_else(|e| panic!("signal 0 (is it alive?) to an exec: {e}"));
    api.kill("sigs", "e1", 37)
        .unwrap_or_else(|e| panic!("SIGRTMIN+3 to an exec: {e}"));
    poll("the real-time signal delivered", T, || {
        fs::read_to_string(format!("{root}/tmp/got")).ok()
    });
    remove_container(cd, "sigs");
});

both_runtimes!(a_starting_exec_holds_the_init_exit, |rt, cd| {
    // A runc whose `exec` takes 3 s to get going: the init is killed while an exec starts.
    let runc = integration::host::which("runc");
    let wrapper = cd.dir().join("slow-exec-runc");
    fs::write(
        &wrapper,
        format!("#!/bin/sh\ncase \" $* \" in *\" exec \"*) sleep 3 ;; esac\nexec {runc} \"$@\"\n"),
    )
    .unwrap();
    fs::set_permissions(&wrapper, fs::Permissions::from_mode(0o755)).unwrap();
    // ctr passes a runc binary to io.containerd.runc.v2 only; the custom shim reads the same
    // BinaryName from the runtime config (TOML) the CRI also uses.
    let config = cd.dir().join("slow-exec.toml");
    fs::write(&config, format!("BinaryName = \"{}\"\n", wrapper.display())).unwrap();
    let flags = match rt {
        Runtime::RuncV2 => ["--runc-binary", wrapper.to_str().unwrap()],
        Runtime::Custom => ["--runtime-config-path", config.to_str().unwrap()],
    };
    let init = run_with(cd, rt, "race", &flags, &["sleep", "100000"]);
    let shim = shim_pid(cd, "race");
    let api = Api::connect(cd);
    api.exec("race", "e1", &["sleep", "1000"])
        .unwrap_or_else(|e| panic!("exec e1: {e}"));
    let first = {
        let api = Api::connect(cd);
        thread::spawn(move || api.start("race", "e1"))
    };
    poll("runc exec under way", T, || {
        (!descendants_with_cmdline(shim, "sleep 3").is_empty()).then_some(())
    });
    // SAFETY: kill(2) of the container's init.
    unsafe {
        libc::kill(init as i32, libc::SIGKILL);
    }
    poll("the init gone", T, || {
        (!integration::host::alive(init as i32)).then_some(())
    });
    // The init's exit is held while e1 starts: a second exec can still be made.
    api.exec("race", "e2", &["sleep", "1000"])
        .unwrap_or_else(|e| panic!("a second exec while the first starts: {e}"));
    let second = api.start("race", "e2");
    let first = first.join().expect("first start thread");
    assert!(
        first.is_err(),
        "e1 cannot start in a dead container: {first:?}"
    );
    assert!(
        second.is_err(),
        "e2 cannot start in a dead container: {second:?}"
    );
    cd.wait_task_status("race", "STOPPED", STATE_TIMEOUT);
    remove_container(cd, "race");
});

both_runtimes!(a_pod_shim_answers_while_a_sibling_is_restored, |rt, cd| {
    // Two containers of one pod share a shim (the grouping annotation, as the CRI's sandbox id).
    let group = "io.containerd.runc.v2.group=pod1";
    let big = format!("head -c 314572800 /dev/zero > /ballast; {COUNTER}");
    run_with(cd, rt, "big", &["--annotation", group], &["sh", "-c", &big]);
    run_with(
        cd,
        rt,
        "small",
        &["--annotation", group],
        &["sleep", "100000"],
    );
    shim_pid(cd, "big");
    assert!(cd.shims_for("small").is_empty(), "one shim for the pod");
    let mut api = Api::connect(cd);
    api.use_new_lease("pod");
    let desc = api
        .checkpoint_blob("big", &CheckpointOptions::default())
        .unwrap_or_else(|e| panic!("checkpoint: {e}"));
    api.try_clone_container(
        "big",
        "big2",
        Some(rt.name()),
        &[("io.containerd.runc.v2.group", "pod1")],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    // Restore 300 MB of files into big2 while State goes to small on the same shim.
    let restore = {
        let api = Api::connect(cd);
        let desc = desc.clone();
        thread::spawn(move || {
            let started = Instant::now();
            let r = api.create_task("big2", Some(desc), None);
            (r, started.elapsed())
        })
    };
    let mut slowest = Duration::ZERO;
    let mut calls = 0;
    while !restore.is_finished() {
        let t = Instant::now();
        api.get("small", "")
            .unwrap_or_else(|e| panic!("State of small: {e}"));
        slowest = slowest.max(t.elapsed());
        calls += 1;
        thread::sleep(Duration::from_millis(5));
    }
    let (r, took) = restore.join().expect("restore thread");
    r.unwrap_or_else(|e| panic!("Create big2 from the checkpoint: {e}"));
    eprintln!("{rt:?}: Create took {took:?}; {calls} State calls meanwhile, slowest {slowest:?}");
    assert!(
        calls >= 3,
        "State calls should go on during a {took:?} restore: {calls}"
    );
    assert!(
        slowest < took / 2,
        "one State call waited {slowest:?} of a {took:?} restore: the shim was blocked"
    );
    // Only the Create was under test: the restore is not started (the Go shim would restore
    // without the files the workload made). The pod's shim goes last, with "big".
    api.delete_task("big2")
        .unwrap_or_else(|e| panic!("delete the created big2: {e}"));
    for id in ["big2", "small", "big"] {
        remove_container(cd, id);
    }
});

both_runtimes!(runtime_info_carries_runc_features, |rt, cd| {
    use containerd_client::services::v1::introspection_client::IntrospectionClient;
    use containerd_client::services::v1::PluginInfoRequest;
    use containerd_client::types::{RuntimeInfo, RuntimeRequest};
    use prost::Message;
    // containerd's RuntimeInfo (what the CRI reads to validate specs) runs the shim's `-info`.
    let api = Api::connect(cd);
    let request = RuntimeRequest {
        runtime_path: rt.name().to_string(),
        ..Default::default()
    };
    let req = api.request(PluginInfoRequest {
        r#type: "io.containerd.runtime.v2".into(),
        id: "task".into(),
        options: Some(Any {
            type_url: "containerd.types.RuntimeRequest".into(),
            value: request.encode_to_vec(),
        }),
    });
    let resp = api
        .block_on(IntrospectionClient::new(api.channel()).plugin_info(req))
        .unwrap_or_else(|s| panic!("Introspection.PluginInfo: {s}"))
        .into_inner();
    let extra = resp.extra.expect("runtime info in the response");
    let info = RuntimeInfo::decode(extra.value.as_slice()).expect("RuntimeInfo");
    assert_eq!(info.name, rt.name());
    assert!(
        info.version.as_ref().is_some_and(|v| !v.version.is_empty()),
        "a version: {info:?}"
    );
    let features = info.features.expect("runc's features");
    assert!(
        features
            .type_url
            .ends_with("runtime-spec/1/features/Features"),
        "{}",
        features.type_url
    );
    let json: serde_json::Value =
        serde_json::from_slice(&features.value).expect("features are JSON");
    let mount_options = json["mountOptions"].to_string();
    assert!(
        mount_options.contains("\"rro\""),
        "runc's mount options: {mount_options}"
    );
    assert!(json["linux"]["namespaces"].is_array(), "{json:#}");
});

/// A shim serving a pod runs in its first container's bundle. When that container is deleted
/// first, the shim's socket must still go when the shim exits (the crate looks for it through a
/// file in that bundle, which is gone by then).
#[test]
fn a_pod_shim_removes_its_socket_whatever_order_its_containers_go_custom() {
    integration::run_scenario(Runtime::Custom, |rt, cd| {
        let group = "io.containerd.runc.v2.group=pod2";
        run_with(
            cd,
            rt,
            "first",
            &["--annotation", group],
            &["sleep", "100000"],
        );
        run_with(
            cd,
            rt,
            "second",
            &["--annotation", group],
            &["sleep", "100001"],
        );
        let shim = shim_pid(cd, "first");
        let argv: Vec<String> = fs::read(format!("/proc/{shim}/cmdline"))
            .expect("shim cmdline")
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let socket = argv
            .iter()
            .position(|a| a == "-socket")
            .and_then(|i| argv.get(i + 1))
            .expect("-socket in the shim's argv")
            .trim_start_matches("unix://")
            .to_string();
        assert!(std::path::Path::new(&socket).exists(), "{socket}");
        // The first container (the shim's own bundle) goes first.
        cd.kill("first", "SIGKILL");
        cd.wait_task_status("first", "STOPPED", STATE_TIMEOUT);
        cd.ctr_ok(["tasks", "delete", "first"]);
        cd.ctr_ok(["containers", "delete", "first"]);
        remove_container(cd, "second");
        poll("the pod's shim to exit", T, || {
            (!integration::host::alive(shim)).then_some(())
        });
        assert!(
            !std::path::Path::new(&socket).exists(),
            "the shim's socket {socket} was left behind"
        );
    });
}
