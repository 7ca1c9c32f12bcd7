//! Integration-test harness for containerd-shim-custom-v2.
//!
//! Every test starts its own private containerd ([`Containerd::start`]: temp dir, own sockets,
//! config, namespace, the test image imported) and tears it down on drop, so tests run in
//! parallel. Scenarios are written once and run against both runtimes with [`both_runtimes!`]:
//!
//! ```ignore
//! both_runtimes!(exit_code, |rt, cd| {
//!     let out = cd.run(rt, "c1", &["sh", "-c", "exit 3"]);
//!     assert_eq!(out.status.code(), Some(3));
//! });
//! ```
//! generates `exit_code_runc` (io.containerd.runc.v2) and `exit_code_custom`
//! (io.containerd.custom.v2). Set `SHIMTEST_SKIP_CUSTOM=1` to skip the custom-shim half.
//!
//! Environment:
//! - `SHIM_BINARY`: the shim to test (default `<workspace>/target/debug/containerd-shim-custom-v2`).
//! - `SHIMTEST_IMAGE_TAR`: a prebuilt image tar (default: built by scripts/build-test-image.sh
//!   into `<target>/test-image/shimtest.tar`).
//! - `SHIMTEST_TMPDIR` (default /tmp), `SHIMTEST_LOG_LEVEL` (containerd's, default debug),
//!   `SHIMTEST_KEEP_DIR` (keep the temp dir after teardown).
//!
//! On a failing test, the tail of containerd's log (shim logs included) is printed and the whole
//! log is copied to `<target>/integration-logs/<namespace>.log`.
//!
//! containerd 2.1 / ctr facts the scenarios rely on:
//! - `ctr images import` names the image from the `io.containerd.image.name` annotation: [`IMAGE`].
//! - ctr has no `task update` any more: updates go through the gRPC API ([`Containerd::update_task`]).
//! - ctr never closes a task's stdin at EOF (no CloseIO): `echo hi | ctr run ... cat` hangs with
//!   either shim, so stdin scenarios read a known amount.
//! - ctr sends the console size (ResizePty) only after Start: a TTY process that prints its size
//!   must wait for it.
//! - `ctr task start` (attached) deletes the task after it exits; `ctr task delete` of a task that
//!   exited non-zero warns "exit with non-zero exit code N".
//! - With cgroup v1, SIGKILL to a paused task ends it without a resume (runc thaws).
//! - ctr's default IO fifos live in /run/containerd/fifo and leak when ctr is killed: the helpers
//!   pass `--fifo-dir` inside the temp dir.

pub mod checkpoint;
mod containerd;
pub mod cri;
pub mod faults;
pub mod grpc;
pub mod host;
pub mod hosts;
pub mod netns;
pub mod poll;
mod process;
mod pty;
pub mod registry;
pub mod xfs;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::Duration;

pub use containerd::{Containerd, Setup, TaskInfo, CTR_TIMEOUT, RUNC_ROOT, STATE_TIMEOUT};
pub use poll::{poll, poll_until};
pub use process::Spawned;
pub use pty::PtySpawned;

#[doc(hidden)]
pub use paste;

/// Name `ctr images import` gives the test image (from the `io.containerd.image.name`
/// annotation written by scripts/build-test-image.sh).
pub const IMAGE: &str = "docker.io/library/shimtest:latest";

/// File name containerd looks up on its PATH for runtime `io.containerd.custom.v2`.
pub const SHIM_PROGRAM: &str = "containerd-shim-custom-v2";

/// The runtime a scenario runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Runtime {
    /// containerd's reference shim, `containerd-shim-runc-v2`.
    RuncV2,
    /// This project's shim, `containerd-shim-custom-v2`.
    Custom,
}

impl Runtime {
    pub const ALL: [Runtime; 2] = [Runtime::RuncV2, Runtime::Custom];

    /// Runtime name for `ctr run --runtime`.
    pub fn name(self) -> &'static str {
        match self {
            Runtime::RuncV2 => "io.containerd.runc.v2",
            Runtime::Custom => "io.containerd.custom.v2",
        }
    }

    /// Program name of the shim process.
    pub fn shim_program(self) -> &'static str {
        match self {
            Runtime::RuncV2 => "containerd-shim-runc-v2",
            Runtime::Custom => SHIM_PROGRAM,
        }
    }
}

/// The workspace root (parent of this crate).
pub fn workspace_root() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    here.parent().unwrap_or(here).to_path_buf()
}

pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// The shim binary under test: `$SHIM_BINARY`, else `<target>/debug/containerd-shim-custom-v2`.
pub fn shim_binary() -> Result<PathBuf, String> {
    let p = match std::env::var_os("SHIM_BINARY") {
        Some(p) => PathBuf::from(p),
        None => target_dir().join("debug").join(SHIM_PROGRAM),
    };
    if p.is_file() {
        Ok(p.canonicalize().unwrap_or(p))
    } else {
        Err(format!(
            "shim binary {} not found: run `make build` (or `cargo build -p containerd-shim-custom-v2`), \
             or point SHIM_BINARY at it, or set SHIMTEST_SKIP_CUSTOM=1 to run only the runc half",
            p.display()
        ))
    }
}

/// The test image tar, built once per test process by scripts/build-test-image.sh (which skips
/// the work when the tar is up to date) unless `SHIMTEST_IMAGE_TAR` names an existing one.
pub fn test_image() -> Result<PathBuf, String> {
    static IMAGE_TAR: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    IMAGE_TAR
        .get_or_init(|| {
            if let Some(p) = std::env::var_os("SHIMTEST_IMAGE_TAR").map(PathBuf::from) {
                return if p.is_file() {
                    Ok(p)
                } else {
                    Err(format!("SHIMTEST_IMAGE_TAR={} does not exist", p.display()))
                };
            }
            built_image("")
        })
        .clone()
}

/// An image tar built by scripts/build-test-image.sh with `flag` ("" for the test image,
/// "--pause" for the CRI sandbox image) into `<target>/test-image/`; the script does nothing
/// when the tar is up to date.
pub fn built_image(flag: &str) -> Result<PathBuf, String> {
    let name = if flag.is_empty() {
        "shimtest.tar".to_string()
    } else {
        format!("{}.tar", flag.trim_start_matches('-'))
    };
    let tar = target_dir().join("test-image").join(name);
    let script = workspace_root().join("scripts").join("build-test-image.sh");
    let mut cmd = Command::new("bash");
    cmd.arg(&script);
    if !flag.is_empty() {
        cmd.arg(flag);
    }
    cmd.arg(&tar);
    let out = process::run_with_timeout(&mut cmd, None, Duration::from_secs(300))?;
    if !out.status.success() || !tar.is_file() {
        return Err(format!("{} failed: {}", script.display(), show(&out)));
    }
    Ok(tar)
}

/// The benchmark image (`/bin/workload`, `/bin/memhog` on the test image), built once per test
/// process by bench/build-bench-image.sh into `<target>/bench-image/` (nothing is done when it
/// is up to date).
pub fn bench_image() -> Result<PathBuf, String> {
    static IMAGE_TAR: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    IMAGE_TAR
        .get_or_init(|| {
            let base = test_image()?;
            let tar = target_dir().join("bench-image").join("shimbench.tar");
            let script = workspace_root().join("bench").join("build-bench-image.sh");
            let mut cmd = Command::new("bash");
            cmd.arg(&script).arg(&tar).env("BASE_IMAGE_TAR", &base);
            let out = process::run_with_timeout(&mut cmd, None, Duration::from_secs(300))?;
            if !out.status.success() || !tar.is_file() {
                return Err(format!("{} failed: {}", script.display(), show(&out)));
            }
            Ok(tar)
        })
        .clone()
}

/// The real-program image (redis, postgresql, nginx, python3 from Debian), built once per machine
/// by scripts/build-workload-image.sh into its cache (or `SHIMTEST_WORKLOAD_IMAGE_TAR`).
pub fn workload_image() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("SHIMTEST_WORKLOAD_IMAGE_TAR").map(PathBuf::from) {
        return Ok(p);
    }
    let script = workspace_root()
        .join("scripts")
        .join("build-workload-image.sh");
    let mut cmd = Command::new("bash");
    cmd.arg(&script);
    let out = process::run_with_timeout(&mut cmd, None, Duration::from_secs(1200))?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let path = text
        .lines()
        .filter_map(|l| l.split_whitespace().find(|w| w.ends_with(".tar")))
        .next_back()
        .map(PathBuf::from);
    match path {
        Some(p) if out.status.success() && p.is_file() => Ok(p),
        _ => Err(format!("{} failed: {}", script.display(), show(&out))),
    }
}

/// A number no other call in this process gets (for unique names).
pub fn unique() -> usize {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
}

/// True when the custom-shim half of the scenarios is to be skipped (`SHIMTEST_SKIP_CUSTOM`).
pub fn skip_custom() -> bool {
    std::env::var("SHIMTEST_SKIP_CUSTOM")
        .map(|v| !v.is_empty() && v != "0")
        .unwrap_or(false)
}

/// Runs one scenario on `rt` with a fresh containerd (torn down afterwards, also on panic).
pub fn run_scenario(rt: Runtime, scenario: impl FnOnce(Runtime, &Containerd)) {
    if rt == Runtime::Custom {
        if skip_custom() {
            eprintln!("skipped: SHIMTEST_SKIP_CUSTOM is set");
            return;
        }
        if let Err(e) = shim_binary() {
            panic!("{e}");
        }
    }
    let cd = Containerd::start();
    scenario(rt, &cd);
}

/// Writes a scenario once, runs it on both runtimes: `both_runtimes!(name, |rt, cd| { ... })`
/// defines the tests `name_runc` and `name_custom`.
#[macro_export]
macro_rules! both_runtimes {
    ($(#[$meta:meta])* $name:ident, |$rt:ident, $cd:ident| $body:block) => {
        $crate::paste::paste! {
            $(#[$meta])*
            #[test]
            fn [<$name _runc>]() {
                $crate::run_scenario($crate::Runtime::RuncV2, |$rt: $crate::Runtime, $cd: &$crate::Containerd| $body);
            }

            $(#[$meta])*
            #[test]
            fn [<$name _custom>]() {
                $crate::run_scenario($crate::Runtime::Custom, |$rt: $crate::Runtime, $cd: &$crate::Containerd| $body);
            }
        }
    };
}

/// Exit status, stdout and stderr of `out`, for assertion messages.
pub fn show(out: &Output) -> String {
    format!(
        "{}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// stdout as a String.
pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// stderr as a String.
pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Exit code (None when killed by a signal).
pub fn code(out: &Output) -> Option<i32> {
    out.status.code()
}

/// The memory limit in force for process `pid`, read on the host from its cgroup (v1
/// `memory.limit_in_bytes` or v2 `memory.max`; None for "max").
pub fn memory_limit_of(pid: u32) -> Option<u64> {
    let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    for line in cg.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, ctrls, path) = (parts.next()?, parts.next()?, parts.next()?);
        if ctrls.split(',').any(|c| c == "memory") {
            let v = std::fs::read_to_string(format!(
                "/sys/fs/cgroup/memory{path}/memory.limit_in_bytes"
            ))
            .ok()?;
            return v.trim().parse().ok();
        }
    }
    // Pure v2: "0::/path".
    let path = cg.lines().find_map(|l| l.strip_prefix("0::"))?;
    for root in ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"] {
        if let Ok(v) = std::fs::read_to_string(format!("{root}{path}/memory.max")) {
            return v.trim().parse().ok();
        }
    }
    None
}

/// Reads a file inside the container of process `pid` through `/proc/<pid>/root`.
pub fn read_in_container(pid: u32, path: &str) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/root/{}", path.trim_start_matches('/'))).ok()
}
