//! Log URIs instead of fifos: `file://` and `binary://`, as containerd's Go shim takes them.

use integration::{both_runtimes, IMAGE, STATE_TIMEOUT};

both_runtimes!(file_log_uri_gets_both_streams, |rt, cd| {
    let log = cd.dir().join(format!("{}-out.log", rt.name()));
    let uri = format!("file://{}", log.display());
    cd.ctr_ok([
        "run",
        "-d",
        "--log-uri",
        &uri,
        "--runtime",
        rt.name(),
        IMAGE,
        "lf",
        "sh",
        "-c",
        // The Go shim can lose the output of a process that exits at once under load.
        "echo to-out; echo to-err >&2; sleep 1",
    ]);
    integration::poll("both lines in the log file", STATE_TIMEOUT, || {
        let text = std::fs::read_to_string(&log).ok()?;
        (text.contains("to-out") && text.contains("to-err")).then_some(())
    });
    cd.wait_task_status("lf", "STOPPED", STATE_TIMEOUT);
    cd.ctr_ok(["tasks", "delete", "lf"]);
    cd.ctr_ok(["containers", "delete", "lf"]);
});

both_runtimes!(binary_log_uri_gets_fds_env_and_args, |rt, cd| {
    let dir = cd.dir().join("logger");
    std::fs::create_dir_all(&dir).unwrap();
    let script = dir.join("logger.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nexec 5>&-\ncat <&3 > {d}/out &\ncat <&4 > {d}/err &\necho \"$CONTAINER_ID $CONTAINER_NAMESPACE $*\" > {d}/env\nwait\n",
            d = dir.display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let uri = format!("binary://{}?tag=x", script.display());
    cd.ctr_ok([
        "run",
        "-d",
        "--log-uri",
        &uri,
        "--runtime",
        rt.name(),
        IMAGE,
        "lb",
        "sh",
        "-c",
        "echo bin-out; echo bin-err >&2",
    ]);
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap_or_default();
    integration::poll("the logger to get both streams", STATE_TIMEOUT, || {
        (read("out").contains("bin-out") && read("err").contains("bin-err")).then_some(())
    });
    assert_eq!(read("env").trim(), format!("lb {} tag x", cd.namespace()));
    cd.wait_task_status("lb", "STOPPED", STATE_TIMEOUT);
    cd.ctr_ok(["tasks", "delete", "lb"]);
    cd.ctr_ok(["containers", "delete", "lb"]);
});
