//! Real programs no one here wrote, from Debian's packages (scripts/build-workload-image.sh): each
//! is checkpointed live and with exit, and restored into a new container, on
//! io.containerd.runc.v2 and io.containerd.custom.v2, and what matters for it is checked after the
//! restore. The programs and their clients are in integration/workloads/, bind-mounted read-only
//! at /workloads. Each writes /tmp/ready once set up, then a line per check to /tmp/client.log:
//! "<n> <what it saw>", which must go on past the checkpoint with the same value.
//!
//! The run writes docs/workloads.md: workload × shim × (live, exit) → restored whole, or why not.
//! Every row of this shim must be whole; the Go shim's rows say what it loses.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use containerd_client::types::Descriptor;
use integration::checkpoint::Api;
use integration::grpc::CheckpointOptions;
use integration::{
    poll_until, read_in_container, workload_image, workspace_root, Containerd, Runtime,
    STATE_TIMEOUT,
};

const IMAGE: &str = "docker.io/library/shimtest-workloads:latest";
const T: Duration = Duration::from_secs(60);
/// How long the client may take to show progress after a restore (it ticks every 0.1 s).
const PROGRESS: Duration = Duration::from_secs(20);

struct Workload {
    name: &'static str,
    what: &'static str,
    script: &'static str,
    privileged: bool,
    /// A volume bind-mounted from the host at /vol.
    volume: bool,
    /// Established TCP connections inside (CRIU's --tcp-established).
    tcp: bool,
    /// What the client's lines must say after the restore, read from the running original.
    expect: fn(u32) -> Option<String>,
    /// More to check in the restored container.
    after: fn(u32) -> Result<(), String>,
    /// Arguments to the script.
    args: &'static [&'static str],
    /// Why it cannot come back whole on this host, with either shim: the failure must then
    /// contain `.1`.
    known: Option<(&'static str, &'static str)>,
}

fn same(s: &str) -> Option<String> {
    Some(s.to_string())
}

fn nothing_more(_: u32) -> Result<(), String> {
    Ok(())
}

fn file_is(pid: u32, path: &str, want: &str) -> Result<(), String> {
    match read_in_container(pid, path) {
        Some(t) if t.trim() == want => Ok(()),
        other => Err(format!("{path}: {other:?}, not {want:?}")),
    }
}

/// Writes `sql` into the restored psql session's fifo and waits for `want` in its output.
fn postgres_session_goes_on(pid: u32) -> Result<(), String> {
    let fifo = format!("/proc/{pid}/root/tmp/psql.in");
    let sql = "INSERT INTO t VALUES (43); SELECT 'after', sum(v) FROM t; COMMIT; \
               SELECT 'committed', count(*) FROM kept WHERE v IN ('committed', 'in-tx');\n";
    std::fs::OpenOptions::new()
        .write(true)
        .open(&fifo)
        .and_then(|mut f| std::io::Write::write_all(&mut f, sql.as_bytes()))
        .map_err(|e| format!("write to the session's fifo: {e}"))?;
    let done = poll_until(T, || {
        let out = read_in_container(pid, "/tmp/psql.out")?;
        (out.contains("after|85") && out.contains("committed|2")).then_some(())
    });
    done.ok_or_else(|| {
        format!(
            "the session did not go on: {:?}",
            read_in_container(pid, "/tmp/psql.out")
        )
    })
}

const WORKLOADS: &[Workload] = &[
    Workload {
        name: "redis",
        what: "keys in memory only and saved to the rootfs; a client's connection (TCP on lo)",
        script: "redis.sh",
        privileged: false,
        volume: false,
        tcp: true,
        expect: |_| same("in-memory-only"),
        after: |pid| {
            std::fs::metadata(format!("/proc/{pid}/root/var/lib/redis/dump.rdb"))
                .map(drop)
                .map_err(|e| format!("dump.rdb: {e}"))
        },
        args: &[],
        known: None,
    },
    Workload {
        name: "postgresql",
        what: "a committed table; a session with a temp table and an open transaction that commits after",
        script: "postgres.sh",
        privileged: false,
        volume: false,
        tcp: false,
        expect: |_| None,
        after: postgres_session_goes_on,
        args: &[],
        known: Some((
            "PostgreSQL refuses to run as root, and CRIU cannot read the limits of a process of \
             another user without CAP_SYS_RESOURCE, which this host does not grant",
            "Can't get rlimit",
        )),
    },
    Workload {
        name: "nginx",
        what: "a file written after start, served over a keep-alive connection (TCP on lo)",
        script: "nginx.sh",
        privileged: false,
        volume: false,
        tcp: true,
        expect: |pid| read_in_container(pid, "/var/www/html/token.txt").map(|t| t.trim().to_string()),
        after: nothing_more,
        args: &[],
        known: None,
    },
    Workload {
        name: "python",
        what: "threads, a multiprocessing pool, pipe, socketpair, flock, fcntl lock, eventfd, /dev/shm",
        script: "python.py",
        privileged: false,
        volume: false,
        tcp: false,
        expect: |_| same("ok"),
        after: nothing_more,
        args: &[],
        known: None,
    },
    Workload {
        name: "python-timerfd",
        what: "the same program, also reading a periodic timerfd",
        script: "python.py",
        privileged: false,
        volume: false,
        tcp: false,
        expect: |_| same("ok"),
        after: nothing_more,
        args: &["--timerfd"],
        known: Some((
            "a periodic CLOCK_MONOTONIC timerfd stops firing some ticks after the restore (CRIU 4.2 \
             restores it into the container's time namespace); the program blocks reading it",
            "no progress after the restore",
        )),
    },
    Workload {
        name: "mounts",
        what: "tmpfs, bind mount and nested mount namespace made inside (privileged); a host volume",
        script: "mounts.sh",
        privileged: true,
        volume: true,
        tcp: false,
        expect: |_| same("ok"),
        after: |pid| file_is(pid, "/vol/file", "volume-data"),
        args: &[],
        known: None,
    },
];

/// The last "<n> <rest>" line of /tmp/client.log.
fn last_line(pid: u32) -> Option<(u64, String)> {
    let log = read_in_container(pid, "/tmp/client.log")?;
    let line = log.lines().last()?;
    let (n, rest) = line.split_once(' ')?;
    Some((n.parse().ok()?, rest.to_string()))
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Live,
    Exit,
}

struct Run<'a> {
    cd: &'a Containerd,
    api: &'a Api,
    rt: Runtime,
    w: &'a Workload,
    mode: Mode,
}

impl Run<'_> {
    fn id(&self) -> String {
        let rt = match self.rt {
            Runtime::RuncV2 => "go",
            Runtime::Custom => "custom",
        };
        let mode = match self.mode {
            Mode::Live => "live",
            Mode::Exit => "exit",
        };
        format!("{}-{rt}-{mode}", self.w.name)
    }

    fn start(&self, id: &str) -> Result<u32, String> {
        let workloads = workspace_root().join("integration").join("workloads");
        let mut args: Vec<String> = vec![
            "run".into(),
            "--fifo-dir".into(),
            self.cd.fifo_dir().into(),
            "-d".into(),
            "--log-uri".into(),
            format!("file://{}", self.output(id).display()),
            "--mount".into(),
            format!(
                "type=bind,src={},dst=/workloads,options=rbind:ro",
                workloads.display()
            ),
        ];
        if self.w.privileged {
            args.push("--privileged".into());
        }
        if self.w.volume {
            let vol = self.cd.dir().join(format!("vol-{id}"));
            std::fs::create_dir_all(&vol).map_err(|e| format!("volume dir: {e}"))?;
            args.push("--mount".into());
            args.push(format!(
                "type=bind,src={},dst=/vol,options=rbind:rw",
                vol.display()
            ));
        }
        let program = if self.w.script.ends_with(".py") {
            "python3"
        } else {
            "bash"
        };
        args.extend([
            "--runtime".into(),
            self.rt.name().into(),
            IMAGE.into(),
            id.into(),
            program.into(),
            format!("/workloads/{}", self.w.script),
        ]);
        args.extend(self.w.args.iter().map(|a| a.to_string()));
        let out = self.cd.ctr(&args);
        if !out.status.success() {
            return Err(format!("ctr run: {}", integration::show(&out)));
        }
        let pid = self.cd.wait_task_status(id, "RUNNING", STATE_TIMEOUT).pid;
        poll_until(Duration::from_secs(30), || {
            read_in_container(pid, "/tmp/ready").map(drop)
        })
        .ok_or_else(|| {
            let out = std::fs::read_to_string(self.output(id)).unwrap_or_default();
            let tail: Vec<&str> = out.lines().rev().take(5).collect();
            format!("{} did not get ready: {}", self.w.name, tail.join(" / "))
        })?;
        Ok(pid)
    }

    /// Where the container's stdout and stderr go.
    fn output(&self, id: &str) -> PathBuf {
        self.cd.dir().join(format!("{id}.out"))
    }

    /// Runs the scenario: Ok, or why it is not whole (one line).
    fn outcome(&self) -> Result<(), String> {
        let id = self.id();
        let pid = self.start(&id)?;
        let before = if (self.w.expect)(pid).is_some() {
            Some(
                poll_until(T, || last_line(pid).filter(|(n, _)| *n >= 3))
                    .ok_or("the client made no progress before the checkpoint")?,
            )
        } else {
            None
        };
        let expect = (self.w.expect)(pid);
        let opts = CheckpointOptions {
            exit: self.mode == Mode::Exit,
            open_tcp: self.w.tcp,
            file_locks: true,
            ..Default::default()
        };
        let desc = self
            .api
            .checkpoint(&id, Some(&opts))
            .map_err(|e| format!("checkpoint: {e}"))?
            .into_iter()
            .find(|d| d.media_type == integration::grpc::CRIU_CHECKPOINT_MEDIA_TYPE)
            .ok_or("no checkpoint blob")?;
        let restored = self.restore(&id, &desc)?;
        if let (Some((n0, _)), Some(want)) = (before, expect) {
            let seen = poll_until(PROGRESS, || {
                last_line(restored).filter(|(n, v)| *n > n0 + 5 || v != &want)
            });
            match seen {
                Some((n, v)) if v == want && n > n0 => {}
                Some((n, v)) => return Err(format!("after the restore, line {n} says {v:?}")),
                None => {
                    return Err(format!(
                        "the client made no progress after the restore (last: {:?})",
                        last_line(restored)
                    ))
                }
            }
        }
        (self.w.after)(restored)
    }

    /// Into a new container (a fresh rootfs from the image), after the original is gone with an
    /// exit checkpoint.
    fn restore(&self, id: &str, desc: &Descriptor) -> Result<u32, String> {
        if self.mode == Mode::Exit {
            self.cd.wait_task_status(id, "STOPPED", STATE_TIMEOUT);
        }
        let new = format!("{id}-r");
        self.api
            .try_clone_container(id, &new, Some(self.rt.name()), &[])?;
        self.api.create_task_from_checkpoint(&new, desc)
    }

    /// Everything of this run goes (tasks killed and deleted, containers deleted).
    fn clean(&self) {
        let id = self.id();
        for c in [format!("{id}-r"), id] {
            if let Some(t) = self.cd.task(&c) {
                if t.status == "PAUSED" {
                    let _ = self.cd.ctr(["tasks", "resume", &c]);
                }
                let _ = self.cd.ctr(["tasks", "kill", "-a", "-s", "SIGKILL", &c]);
                let _ = poll_until(T, || {
                    (self.cd.task(&c).map(|t| t.status).as_deref() == Some("STOPPED")).then_some(())
                });
                let _ = self.cd.ctr(["tasks", "delete", "-f", &c]);
            }
            let _ = self.cd.ctr(["containers", "delete", &c]);
        }
    }
}

/// The first line of an error, and CRIU's first error from the log it names (the Go shim's
/// messages say only "criu failed: type NOTIFY errno 0").
fn one_line(e: &str) -> String {
    let criu = e
        .split_whitespace()
        .skip_while(|w| *w != "file:" && *w != "path=")
        .nth(1)
        .and_then(|p| std::fs::read_to_string(p).ok())
        .and_then(|log| {
            log.lines()
                .filter(|l| l.contains("Error (") && !l.contains("RLIMIT_NOFILE for self"))
                .find(|l| !l.contains("exited, status="))
                .and_then(|l| l.split_once("Error (").map(|(_, r)| format!("Error ({r}")))
        });
    let first = match criu {
        Some(c) if !e.contains(&c) => format!("{}: {c}", e.lines().next().unwrap_or_default()),
        _ => e.lines().next().unwrap_or_default().to_string(),
    };
    let first = first.as_str();
    let mut s: String = first.chars().take(240).collect();
    if s.len() < first.len() {
        s.push('…');
    }
    s.replace('|', "\\|")
}

fn version(cmd: &str, args: &[&str]) -> String {
    std::process::Command::new(cmd)
        .args(args)
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or_default()
                .trim()
                .to_string()
        })
        .unwrap_or_default()
}

#[test]
fn real_programs_come_back_whole() {
    integration::shim_binary().unwrap_or_else(|e| panic!("{e}"));
    let image = workload_image().unwrap_or_else(|e| panic!("workload image: {e}"));
    let cd = Containerd::start();
    cd.ctr_ok(["images", "import", image.to_str().expect("utf-8 path")]);
    let mut api = Api::connect(&cd);
    api.use_new_lease("workloads");

    let mut table = String::new();
    let mut custom_failures = Vec::new();
    let mut known_limits = Vec::new();
    // SHIMTEST_WORKLOADS=name,name runs only those (and leaves docs/workloads.md alone).
    let only = std::env::var("SHIMTEST_WORKLOADS").ok();
    let chosen = |w: &Workload| {
        only.as_deref()
            .is_none_or(|o| o.split(',').any(|n| n == w.name))
    };
    for w in WORKLOADS.iter().filter(|w| chosen(w)) {
        for rt in Runtime::ALL {
            let mut cells = Vec::new();
            for mode in [Mode::Live, Mode::Exit] {
                let run = Run {
                    cd: &cd,
                    api: &api,
                    rt,
                    w,
                    mode,
                };
                let outcome = run.outcome();
                // Before the clean-up: the Go shim's error names a CRIU log in the bundle.
                let cell = match &outcome {
                    Ok(()) => "restored whole".to_string(),
                    Err(e) => format!("no: {}", one_line(e)),
                };
                run.clean();
                eprintln!("{} on {} ({}): {outcome:?}", w.name, rt.name(), run.id());
                cells.push(cell);
                match (&outcome, w.known) {
                    (Err(e), Some((_, sign))) if e.contains(sign) => {}
                    (Err(e), _) if rt == Runtime::Custom => {
                        custom_failures.push(format!("{} ({}): {e}", w.name, run.id()))
                    }
                    _ => {}
                }
            }
            let _ = writeln!(
                table,
                "| {} | {} | `{}` | {} | {} |",
                w.name,
                w.what,
                rt.name(),
                cells[0],
                cells[1]
            );
            if let (Runtime::Custom, Some((why, _))) = (rt, w.known) {
                known_limits.push(format!("- **{}**: {why}.", w.name));
            }
        }
    }
    if only.is_none() {
        write_doc(&table, &known_limits);
    }
    assert!(
        custom_failures.is_empty(),
        "this shim must restore every workload whole:\n  {}",
        custom_failures.join("\n  ")
    );
}

fn write_doc(table: &str, known: &[String]) {
    let doc = format!(
        "# Real workloads across a checkpoint\n\n\
         Written by `integration/tests/workloads.rs` (part of `make test`); do not edit by hand.\n\n\
         Each program comes from Debian bookworm's packages (`scripts/build-workload-image.sh`). \
         *Live*: checkpointed while it runs on; *exit*: checkpointed with exit. Either is \
         restored into a new container, on a fresh rootfs from the image: the files come back \
         only with the checkpoint (the Go shim carries none). The check after the restore is the program's own (its client's \
         lines go on with the same value) plus what is listed.\n\n\
         - CRIU: {}\n- kernel: {}\n- runc: {}\n\n\
         | workload | what is checked | runtime | live | exit |\n|---|---|---|---|---|\n{table}\n\
         What no shim can do here:\n\n{}\n\n\
         A shell job on a TTY (an interactive shell whose variable lives only in memory, \
         checkpointed and restored on its console) is `tty_checkpoint_restore` in \
         `integration/tests/checkpoint.rs`, on both runtimes.\n",
        version("criu", &["--version"]).replace("Version: ", ""),
        version("uname", &["-r"]),
        version("runc", &["--version"]),
        known.join("\n"),
    );
    let path: PathBuf = workspace_root().join("docs").join("workloads.md");
    let _ = std::fs::create_dir_all(path.parent().unwrap_or(Path::new(".")));
    if let Err(e) = std::fs::write(&path, doc) {
        eprintln!("write {}: {e}", path.display());
    }
}
