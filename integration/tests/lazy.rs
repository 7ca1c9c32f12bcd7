//! Lazy (post-copy) migration between two hosts (`integration::hosts`): the container runs on B
//! before its memory has arrived; the pages follow from the source shim's page server, pulled on
//! first touch and in the background by `criu lazy-pages`. The workload (`memhog`) fills its
//! memory with a PRNG stream and, on SIGUSR1, checks every byte of it: it touches one small page
//! per tick, so the transfer must end without it touching everything.
//!
//! Failures: a destination that never connects, or dies mid-transfer, leaves the source running
//! with its memory intact and its network unlocked; a source that dies mid-transfer kills the
//! destination's task with a reason. Never two live copies; no CRIU process, page server or
//! lazy-pages daemon left on either host; no frozen cgroup.

use std::time::Duration;

use integration::host::{processes, Proc};
use integration::hosts::{migrate_binary, TwoHosts, B_ADDR, RECEIVE_PORT};
use integration::{bench_image, poll, poll_until, read_in_container, show, stdout, Containerd};

const T: Duration = Duration::from_secs(120);
const RT: &str = "io.containerd.custom.v2";
const SEED: &str = "4242";

fn to() -> String {
    format!("tcp://{B_ADDR}:{RECEIVE_PORT}")
}

/// memhog's report: (tick, verified, bad).
fn memhog(cd: &Containerd, id: &str) -> Option<(u64, u64, u64)> {
    let t = cd.task(id).filter(|t| t.status == "RUNNING")?;
    let s = read_in_container(t.pid, "/memhog")?;
    let field = |k: &str| -> Option<u64> {
        s.split_whitespace()
            .find_map(|w| w.strip_prefix(k)?.strip_prefix('='))?
            .parse()
            .ok()
    };
    Some((field("tick")?, field("verified")?, field("bad")?))
}

/// Ticks go on past `past`.
fn ticking(cd: &Containerd, id: &str, past: u64) -> u64 {
    poll(format!("{id} ticking past {past}"), T, || {
        memhog(cd, id).map(|m| m.0).filter(|t| *t > past)
    })
}

/// Asks memhog to check all its memory; returns the words that differed (0: intact).
fn verify(cd: &Containerd, id: &str) -> u64 {
    let before = memhog(cd, id).expect("memhog reports").1;
    cd.kill(id, "SIGUSR1");
    poll(format!("{id} verifying its memory"), T, || {
        memhog(cd, id).filter(|m| m.1 > before).map(|m| m.2)
    })
}

fn start(h: &TwoHosts, id: &str, mib: u64) -> String {
    let tar = bench_image().unwrap_or_else(|e| panic!("{e}"));
    let image = h.publish(
        &tar,
        "docker.io/library/shimbench:latest",
        "shimbench:lazy",
        false,
    );
    h.a.ctr_ok([
        "run",
        "-d",
        "--runtime",
        RT,
        &image,
        id,
        "memhog",
        &mib.to_string(),
        SEED,
    ]);
    poll(format!("{id} filled"), T, || memhog(&h.a, id));
    image
}

fn ppid(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// CRIU processes (dump, page server, lazy-pages daemon) under the shims of `cd`, and lazy-pages
/// daemons whose images are in `cd`'s dir.
fn criu_of(cd: &Containerd) -> Vec<Proc> {
    let shims: Vec<i32> = integration::host::shims_of(cd.address())
        .iter()
        .map(|p| p.pid)
        .collect();
    let dir = cd.dir().display().to_string();
    processes()
        .into_iter()
        // CRIU retitles itself ("criu: dump --rpc ...").
        .filter(|p| {
            p.program_name().starts_with("criu") || p.argv.iter().any(|a| a == "lazy-pages")
        })
        .filter(|p| {
            let mut at = p.pid;
            for _ in 0..16 {
                match ppid(at) {
                    Some(pp) if shims.contains(&pp) => return true,
                    Some(pp) if pp > 1 => at = pp,
                    _ => break,
                }
            }
            p.argv.iter().any(|a| a.contains(&dir))
        })
        .collect()
}

fn assert_no_criu(h: &TwoHosts) {
    let mut left = Vec::new();
    let gone = poll_until(Duration::from_secs(20), || {
        left = [&h.a, &h.b].iter().flat_map(|cd| criu_of(cd)).collect();
        left.is_empty().then_some(())
    });
    assert!(gone.is_some(), "CRIU processes left: {left:?}");
}

fn freezer_state(cd: &Containerd, id: &str) -> Option<String> {
    integration::host::cgroup_dirs(&cd.cgroup_rel(id))
        .into_iter()
        .find_map(|d| std::fs::read_to_string(d.join("freezer.state")).ok())
        .map(|s| s.trim().to_string())
}

/// What the source must be after a lazy move that failed: running, thawed, its memory whole, its
/// network unlocked (no CRIU chain left in its namespace).
fn assert_source_runs_on(h: &TwoHosts, id: &str) {
    let t = poll(format!("{id} running on A"), T, || {
        h.a.task(id).filter(|t| t.status == "RUNNING")
    });
    let tick = ticking(&h.a, id, 0);
    ticking(&h.a, id, tick + 3);
    assert_eq!(freezer_state(&h.a, id).as_deref(), Some("THAWED"));
    let mut c = std::process::Command::new("nsenter");
    c.arg(format!("--net=/proc/{}/ns/net", t.pid))
        .args(["iptables", "-w", "-S"]);
    let out = c.output().expect("run iptables");
    assert!(out.status.success(), "iptables -S: {}", show(&out));
    assert!(
        !stdout(&out).contains("CRIU"),
        "CRIU's network lock is still in {id}'s namespace:\n{}",
        stdout(&out)
    );
    assert_eq!(verify(&h.a, id), 0, "the source's memory changed");
}

fn migrate_lazy(h: &TwoHosts, id: &str, extra: &[&str]) -> integration::Spawned {
    let target = to();
    let mut c = h.cli(&h.a);
    c.args(["--json", "migrate", id, "--to", &target, "--lazy"])
        .args(extra);
    integration::Spawned::spawn(&mut c, false)
}

#[test]
fn lazy_migration_runs_the_container_before_its_memory_arrives() {
    let _ = migrate_binary();
    let h = TwoHosts::start();
    let id = "lazy-ok";
    start(&h, id, 256);
    let receiver = h.receiver(&[]);
    let out = migrate_lazy(&h, id, &[]).wait(T);
    assert!(out.status.success(), "migrate --lazy: {}", show(&out));
    let done = receiver.wait(T);
    assert!(done.status.success(), "receiver: {}", show(&done));
    let r = stdout(&out)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["event"] == "result")
        .unwrap_or_else(|| panic!("no result: {}", show(&out)));
    assert_eq!(r["lazy"], true, "{r}");
    // The pages came after the restore, not in the archive.
    let lazy = r["lazy_bytes"].as_u64().unwrap_or(0);
    assert!(lazy > 256 << 20, "only {lazy} bytes pulled lazily: {r}");
    assert!(
        r["bytes_moved"].as_u64().unwrap_or(0) < lazy + (64 << 20),
        "{r}"
    );
    // The source is gone, the destination runs, every byte intact.
    assert!(!h.a.containers().iter().any(|c| c == id));
    let tick = ticking(&h.b, id, 0);
    ticking(&h.b, id, tick + 3);
    assert_eq!(verify(&h.b, id), 0, "memory changed in the lazy move");
    assert_no_criu(&h);
}

#[test]
fn lazy_source_resumes_when_the_destination_never_connects() {
    let _ = migrate_binary();
    let h = TwoHosts::start();
    let id = "lazy-nocon";
    start(&h, id, 64);
    // The receiver refuses before it restores (a volume map outside its --allow-bind): nobody
    // dials the page server.
    let receiver = h.receiver(&[]);
    let out = migrate_lazy(
        &h,
        id,
        &["--lazy-timeout", "3", "--volume-map", "/data=/not-allowed"],
    )
    .wait(T);
    assert!(!out.status.success(), "migrate --lazy: {}", show(&out));
    let err = integration::stderr(&out);
    assert!(
        err.contains("did not connect") && err.contains("runs on here"),
        "{err}"
    );
    let _ = receiver.wait(T);
    assert!(h.b.task(id).is_none(), "a task on B");
    assert_source_runs_on(&h, id);
    assert_no_criu(&h);
}

/// Runs a lazy move over a slow link (A sends at 40 Mbit/s: 128 MiB take ~25 s) and calls
/// `interrupt` once the container runs on B with its pages still coming.
fn interrupted(h: &TwoHosts, id: &str, interrupt: &dyn Fn(&TwoHosts)) -> std::process::Output {
    start(h, id, 128);
    let receiver = h.receiver(&[]);
    h.limit_rate(true, "40mbit");
    let mig = migrate_lazy(h, id, &[]);
    poll(format!("{id} running on B"), T, || memhog(&h.b, id));
    // Memory and files describe one instant: the source stays frozen while its pages go.
    assert_eq!(freezer_state(&h.a, id).as_deref(), Some("FROZEN"));
    interrupt(h);
    let out = mig.wait(T);
    let _ = receiver.wait(T);
    out
}

#[test]
fn lazy_destination_dying_mid_transfer_resumes_the_source() {
    let _ = migrate_binary();
    let h = TwoHosts::start();
    let id = "lazy-destdies";
    let out = interrupted(&h, id, &|h| {
        let daemons = criu_of(&h.b);
        assert!(!daemons.is_empty(), "no lazy-pages daemon on B");
        for p in daemons {
            // SAFETY: kill(2) on a pid just read from /proc.
            unsafe { libc::kill(p.pid, libc::SIGKILL) };
        }
    });
    assert!(!out.status.success(), "migrate --lazy: {}", show(&out));
    // The half-restored copy is dead on B (its exit reported), the source runs on A.
    let t = h.b.wait_task_status(id, "STOPPED", T);
    assert_eq!(t.status, "STOPPED");
    assert!(
        h.b.bundle_dir(id).join("lazy-pages.failed").is_file(),
        "no reason kept on B"
    );
    assert_source_runs_on(&h, id);
    assert_no_criu(&h);
}

#[test]
fn lazy_source_dying_mid_transfer_kills_the_destination() {
    let _ = migrate_binary();
    let h = TwoHosts::start();
    let id = "lazy-srcdies";
    let out = interrupted(&h, id, &|h| {
        let dumps = criu_of(&h.a);
        assert!(!dumps.is_empty(), "no CRIU on A");
        for p in dumps {
            // SAFETY: kill(2) on a pid just read from /proc.
            unsafe { libc::kill(p.pid, libc::SIGKILL) };
        }
    });
    assert!(!out.status.success(), "migrate --lazy: {}", show(&out));
    // B's copy never got all its memory: killed, with the reason kept.
    h.b.wait_task_status(id, "STOPPED", T);
    let why = std::fs::read_to_string(h.b.bundle_dir(id).join("lazy-pages.failed"))
        .expect("the reason kept on B");
    assert!(why.contains("lazy-pages"), "{why}");
    // Here only CRIU died, not the host: its tasks were let go, and run on.
    assert_source_runs_on(&h, id);
    assert_no_criu(&h);
}

#[test]
fn lazy_destination_task_killed_mid_transfer_resumes_the_source() {
    let _ = migrate_binary();
    let h = TwoHosts::start();
    let id = "lazy-destkilled";
    // The restored task dies on B: its daemon then has nothing left to pull and ends the
    // transfer as if complete. The shim on B does not let that end reach the source, which would
    // kill the only live copy.
    let out = interrupted(&h, id, &|h| h.b.kill(id, "SIGKILL"));
    assert!(!out.status.success(), "migrate --lazy: {}", show(&out));
    h.b.wait_task_status(id, "STOPPED", T);
    assert_source_runs_on(&h, id);
    assert_no_criu(&h);
}

#[test]
fn a_paused_source_stays_paused_when_a_lazy_move_fails() {
    let _ = migrate_binary();
    let h = TwoHosts::start();
    let id = "lazy-paused";
    start(&h, id, 32);
    h.a.ctr_ok(["tasks", "pause", id]);
    let receiver = h.receiver(&[]);
    let out = migrate_lazy(
        &h,
        id,
        &["--lazy-timeout", "2", "--volume-map", "/data=/not-allowed"],
    )
    .wait(T);
    assert!(!out.status.success(), "migrate --lazy: {}", show(&out));
    let _ = receiver.wait(T);
    // CRIU thawed the cgroup it seized; the shim froze it again.
    assert_eq!(h.a.task(id).map(|t| t.status).as_deref(), Some("PAUSED"));
    assert_eq!(freezer_state(&h.a, id).as_deref(), Some("FROZEN"));
    h.a.ctr_ok(["tasks", "resume", id]);
    assert_source_runs_on(&h, id);
    assert_no_criu(&h);
}
