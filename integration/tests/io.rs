//! stdout/stderr, stdin, and TTYs for the init process and for exec'd processes.

use std::time::Duration;

use integration::{both_runtimes, code, show, stderr, stdout};

const T: Duration = Duration::from_secs(20);

both_runtimes!(stdout_and_stderr_separate, |rt, cd| {
    let out = cd.run(
        rt,
        "oe",
        &[
            "sh",
            "-c",
            "echo out1; echo err1 >&2; echo out2; echo err2 >&2; exit 2",
        ],
    );
    assert_eq!(code(&out), Some(2), "{}", show(&out));
    assert_eq!(stdout(&out), "out1\nout2\n", "{}", show(&out));
    assert!(stderr(&out).contains("err1\nerr2\n"), "{}", show(&out));
    assert!(!stderr(&out).contains("out1"), "{}", show(&out));
});

both_runtimes!(large_output_complete_before_exit, |rt, cd| {
    // All output must reach ctr before it reports the exit: 20000 lines, the last one included.
    let out = cd.run(rt, "big", &["seq", "1", "20000"]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines.len(),
        20000,
        "got {} lines; tail: {:?}",
        lines.len(),
        lines.last()
    );
    assert_eq!(lines.first(), Some(&"1"));
    assert_eq!(lines.last(), Some(&"20000"));
});

both_runtimes!(stdin_is_forwarded, |rt, cd| {
    // Note: `echo hi | ctr run ... cat` never ends with either shim: ctr does not close the
    // task's stdin at EOF (no CloseIO), so the scenarios read a known number of lines instead.
    let out = cd.run_with_stdin(
        rt,
        "in1",
        b"hello stdin\n",
        &["sh", "-c", "read l; echo \"got:$l\""],
    );
    assert_eq!(code(&out), Some(0), "{}", show(&out));
    assert_eq!(stdout(&out), "got:hello stdin\n", "{}", show(&out));

    let out = cd.run_with_stdin(rt, "in3", b"a\nbb\nccc\n", &["head", "-n", "3"]);
    assert_eq!(code(&out), Some(0), "{}", show(&out));
    assert_eq!(stdout(&out), "a\nbb\nccc\n", "{}", show(&out));
});

/// ctr sends the console size (Tasks.ResizePty) only after the process started, so a script that
/// prints it first waits (polling, inside the container) until the pty has a size.
/// (busybox `stty size` exits 0 even when it cannot tell a size, so the loop tests its output.)
const SIZE_WHEN_SET: &str = "s=; until [ -n \"$s\" ]; do s=$(stty size 2>/dev/null) || s=; [ -n \"$s\" ] || sleep 0.01; done; echo size=$s";

both_runtimes!(tty_run, |rt, cd| {
    let script =
        format!("tty; {SIZE_WHEN_SET}; [ -t 0 ] && [ -t 1 ] && echo both-are-ttys; exit 4");
    let p = cd.run_tty(rt, "tty1", 33, 101, &["sh", "-c", &script]);
    let out = p.wait(T);
    let text = stdout(&out);
    assert_eq!(code(&out), Some(4), "{text:?}");
    assert!(text.contains("/dev/pts/0"), "tty: {text:?}");
    assert!(
        text.contains("size=33 101"),
        "console size not passed to the container: {text:?}"
    );
    assert!(text.contains("both-are-ttys"), "{text:?}");
    cd.assert_nothing_left("tty1");
});

both_runtimes!(tty_run_interactive, |rt, cd| {
    let mut p = cd.run_tty(rt, "tty2", 24, 80, &["sh"]);
    p.wait_for("# ", T);
    p.write(b"echo $((6*7))x; exit 5\r");
    p.wait_for("42x", T);
    let out = p.wait(T);
    assert_eq!(code(&out), Some(5), "{:?}", stdout(&out));
    cd.assert_nothing_left("tty2");
});

both_runtimes!(exec_exit_code_and_output, |rt, cd| {
    cd.run_detached(rt, "ex", &["sleep", "1000"]);
    let out = cd.exec(
        "ex",
        "e1",
        &["sh", "-c", "echo eout; echo eerr >&2; exit 5"],
    );
    assert_eq!(code(&out), Some(5), "{}", show(&out));
    assert_eq!(stdout(&out), "eout\n", "{}", show(&out));
    assert!(stderr(&out).contains("eerr"), "{}", show(&out));

    let out = cd.exec("ex", "e2", &["true"]);
    assert_eq!(code(&out), Some(0), "{}", show(&out));
    // The exec id can be reused once the previous process with it is gone.
    let out = cd.exec("ex", "e1", &["sh", "-c", "exit 12"]);
    assert_eq!(code(&out), Some(12), "{}", show(&out));

    let out = cd.ctr_with_stdin(
        [
            "tasks",
            "exec",
            "--fifo-dir",
            cd.fifo_dir(),
            "--exec-id",
            "e3",
            "ex",
            "sh",
            "-c",
            "read l; echo x$l",
        ],
        b"yz\n",
    );
    assert_eq!(stdout(&out), "xyz\n", "{}", show(&out));
    // The init process is unaffected.
    assert_eq!(cd.task("ex").map(|t| t.status), Some("RUNNING".to_string()));
});

both_runtimes!(exec_tty, |rt, cd| {
    cd.run_detached(rt, "ext", &["sleep", "1000"]);
    let script = format!("tty; {SIZE_WHEN_SET}; exit 6");
    let p = cd.exec_tty("ext", "t1", 20, 70, &["sh", "-c", &script]);
    let out = p.wait(T);
    let text = stdout(&out);
    assert_eq!(code(&out), Some(6), "{text:?}");
    assert!(text.contains("/dev/pts/"), "{text:?}");
    assert!(text.contains("size=20 70"), "exec console size: {text:?}");

    let mut p = cd.exec_tty("ext", "t2", 24, 80, &["sh"]);
    p.wait_for("# ", T);
    p.write(b"echo $((7*6))y; exit 7\r");
    p.wait_for("42y", T);
    let out = p.wait(T);
    assert_eq!(code(&out), Some(7), "{:?}", stdout(&out));
});
