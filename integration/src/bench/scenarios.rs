//! The measurements. Each runs both runtimes in the same rounds, the order alternating from one
//! round to the next, on the one private containerd of the run.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use integration::{Containerd, Runtime, IMAGE, RUNC_ROOT};

use super::api::Api;
use super::measure::{memory_of, poll, read_report, run_ok, run_timed, tar_member};
use super::report::{num, Results, Target};

/// Set on SIGINT/SIGTERM: every round checks it and stops the run.
pub static INTERRUPTED: AtomicBool = AtomicBool::new(false);

pub(super) fn check_interrupted() -> Result<(), String> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        Err("interrupted".into())
    } else {
        Ok(())
    }
}

/// Name `ctr images import` gives bench/build-bench-image.sh's image.
pub const BENCH_IMAGE: &str = "docker.io/library/shimbench:latest";
/// The file the custom shim writes into the checkpoint.
const SHIM_METADATA: &str = "custom-shim-checkpoint.json";
const CTR_TIMEOUT: Duration = Duration::from_secs(120);
/// Long enough for the workload to write 1 GiB and touch 1 GiB on a busy machine.
const READY_TIMEOUT: Duration = Duration::from_secs(600);
const BIG_TIMEOUT: Duration = Duration::from_secs(600);

/// How much to measure.
#[derive(Clone, Debug)]
pub struct Config {
    pub quick: bool,
    pub mem_rounds: usize,
    /// Containers for the "many" figures (20 in a full run).
    pub many: usize,
    /// Idle time before shim memory is read.
    pub settle: Duration,
    pub lifecycle_samples: usize,
    /// (MiB of touched memory, rounds) of the live-checkpoint workloads.
    pub ckpt_sizes: Vec<(u64, usize)>,
    pub restore_mib: u64,
    pub restore_rounds: usize,
    pub diff_mib: u64,
    pub diff_files: Vec<u64>,
    pub diff_rounds: usize,
    /// The workload's sleep between iterations, µs (the stall's resolution).
    pub sleep_us: u64,
    /// (MiB held in memory, rounds) of the CRI checkpoint and restore.
    pub cri: (u64, usize),
    /// (MiB held in memory for each size, rounds) of the migration between two hosts.
    pub migrate: (Vec<u64>, usize),
    /// The bench image tar (`--image`).
    pub image: PathBuf,
}

impl Config {
    pub fn full() -> Config {
        Config {
            quick: false,
            mem_rounds: 3,
            many: 20,
            settle: Duration::from_millis(1500),
            lifecycle_samples: 25,
            ckpt_sizes: vec![(16, 5), (256, 5), (1024, 3)],
            restore_mib: 256,
            restore_rounds: 5,
            diff_mib: 1024,
            diff_files: vec![1, 10_000],
            diff_rounds: 2,
            sleep_us: 1000,
            cri: (256, 3),
            migrate: (vec![256, 1024], 3),
            image: PathBuf::new(),
        }
    }

    pub fn quick() -> Config {
        Config {
            quick: true,
            mem_rounds: 1,
            many: 5,
            settle: Duration::from_millis(1000),
            lifecycle_samples: 5,
            ckpt_sizes: vec![(16, 2), (64, 2)],
            restore_mib: 16,
            restore_rounds: 2,
            diff_mib: 64,
            diff_files: vec![1, 1000],
            diff_rounds: 1,
            sleep_us: 1000,
            cri: (16, 1),
            migrate: (vec![64], 1),
            image: PathBuf::new(),
        }
    }
}

impl Config {
    /// `--rounds`, `--ckpt-mib`, `--diff-mib`, `--diff-files`.
    pub fn apply_overrides(
        &mut self,
        rounds: Option<usize>,
        ckpt_mib: Option<Vec<u64>>,
        diff_mib: Option<u64>,
        diff_files: Option<Vec<u64>>,
    ) {
        if let Some(sizes) = ckpt_mib {
            let r = self.ckpt_sizes.first().map(|s| s.1).unwrap_or(1);
            self.ckpt_sizes = sizes.into_iter().map(|m| (m, r)).collect();
        }
        if let Some(r) = rounds {
            self.mem_rounds = r;
            self.lifecycle_samples = r;
            self.restore_rounds = r;
            self.diff_rounds = r;
            self.cri.1 = r;
            for s in &mut self.ckpt_sizes {
                s.1 = r;
            }
        }
        if let Some(m) = diff_mib {
            self.diff_mib = m;
        }
        if let Some(f) = diff_files {
            self.diff_files = f;
        }
    }
}

/// Round `r`'s order: Go first on even rounds, custom first on odd ones.
pub(super) fn order(r: usize) -> [Runtime; 2] {
    if r.is_multiple_of(2) {
        [Runtime::RuncV2, Runtime::Custom]
    } else {
        [Runtime::Custom, Runtime::RuncV2]
    }
}

fn short(rt: Runtime) -> &'static str {
    match rt {
        Runtime::RuncV2 => "go",
        Runtime::Custom => "custom",
    }
}

pub(super) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

const MIB: f64 = 1024.0 * 1024.0;

pub struct Bench<'a> {
    cd: &'a Containerd,
    api: Api,
    pub cfg: Config,
    pub res: Results,
    seq: usize,
    /// Files restored (or not) after a restore into a fresh rootfs, per runtime.
    files_back: [Option<bool>; 2],
}

pub(super) fn log(msg: impl AsRef<str>) {
    eprintln!("bench: {}", msg.as_ref());
}

/// `BENCH_VERBOSE=1`: every checkpoint's figures as they come.
fn verbose() -> bool {
    std::env::var_os("BENCH_VERBOSE").is_some_and(|v| !v.is_empty() && v != "0")
}

impl<'a> Bench<'a> {
    pub fn new(cd: &'a Containerd, cfg: Config) -> Result<Bench<'a>, String> {
        let api = Api::connect(cd.address(), cd.namespace(), cd.root_dir())?;
        Ok(Bench {
            cd,
            api,
            cfg,
            res: Results::default(),
            seq: 0,
            files_back: [None, None],
        })
    }

    fn id(&mut self, what: &str, rt: Runtime) -> String {
        self.seq += 1;
        format!("{what}-{}-{}", short(rt), self.seq)
    }

    fn ctr(&self, args: &[&str]) -> Result<(String, Duration), String> {
        run_ok(self.cd.ctr_command().args(args), CTR_TIMEOUT)
    }

    /// `ctr run -d --null-io`; returns the init's pid and how long ctr took.
    fn run_detached(
        &self,
        rt: Runtime,
        image: &str,
        id: &str,
        cmd: &[&str],
    ) -> Result<(u32, Duration), String> {
        let mut args = vec!["run", "-d", "--null-io", "--runtime", rt.name(), image, id];
        args.extend_from_slice(cmd);
        let (_, took) = self.ctr(&args)?;
        let pid = self
            .cd
            .task(id)
            .map(|t| t.pid)
            .filter(|p| *p > 0)
            .ok_or_else(|| format!("no task {id} after ctr run -d"))?;
        Ok((pid, took))
    }

    /// Kills and deletes the tasks of `ids`, then the containers (and their snapshots).
    fn remove(&self, ids: &[String]) -> Result<Duration, String> {
        let t = Instant::now();
        let mut args = vec!["tasks", "delete", "-f"];
        args.extend(ids.iter().map(String::as_str));
        // A container whose task is gone already makes ctr complain: not an error here.
        let _ = run_timed(self.cd.ctr_command().args(&args), CTR_TIMEOUT)?;
        let mut args = vec!["containers", "delete"];
        args.extend(ids.iter().map(String::as_str));
        self.ctr(&args)?;
        Ok(t.elapsed())
    }

    fn shim_pid(&self, id: &str) -> Result<i32, String> {
        let shims = self.cd.shims_for(id);
        match shims.as_slice() {
            [one] => Ok(one.pid),
            other => Err(format!(
                "expected one shim for {id}, found {:?}",
                other.iter().map(|p| p.pid).collect::<Vec<_>>()
            )),
        }
    }

    fn workload_cmd(mib: u64, sleep_us: u64) -> Vec<String> {
        vec![
            "/bin/workload".into(),
            mib.to_string(),
            sleep_us.to_string(),
        ]
    }

    /// Starts the workload and waits until its memory is touched (its report appears).
    fn start_workload(&self, rt: Runtime, id: &str, args: &[String]) -> Result<u32, String> {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (pid, _) = self.run_detached(rt, BENCH_IMAGE, id, &args)?;
        poll(&format!("workload {id} ready"), READY_TIMEOUT, || {
            read_report(pid)
        })?;
        Ok(pid)
    }

    /// Starts a new measurement in the workload (SIGUSR1); returns its generation.
    fn arm_stall(&self, pid: u32) -> Result<u64, String> {
        let before = read_report(pid).ok_or_else(|| format!("no report from pid {pid}"))?;
        // SAFETY: kill(2) with a valid signal; a vanished pid just fails.
        unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGUSR1);
        }
        let r = poll("the workload to reset", Duration::from_secs(10), || {
            read_report(pid).filter(|r| r.gen > before.gen)
        })?;
        // A baseline: the gap a quiet workload sees anyway.
        thread::sleep(Duration::from_millis(50));
        Ok(r.gen)
    }

    /// The longest gap the workload saw since [`Self::arm_stall`], ms.
    fn read_stall(&self, pid: u32, gen: u64) -> Result<f64, String> {
        let now = read_report(pid).map(|r| r.iter).unwrap_or(0);
        // The first iteration after a thaw reports the new maximum at once; wait for later ones.
        let r = poll("the workload to go on", Duration::from_secs(30), || {
            read_report(pid).filter(|r| r.iter > now + 20)
        })?;
        if r.gen != gen {
            return Err(format!("workload generation {} (expected {gen})", r.gen));
        }
        Ok(r.maxgap_us as f64 / 1000.0)
    }

    /// The custom shim's metadata in a checkpoint blob.
    fn shim_metadata(
        &self,
        desc: &containerd_client::types::Descriptor,
    ) -> Result<serde_json::Value, String> {
        let path = self.api.blob_path(desc);
        let bytes = tar_member(&path, SHIM_METADATA)?
            .ok_or_else(|| format!("no {SHIM_METADATA} in {}", path.display()))?;
        serde_json::from_slice(&bytes).map_err(|e| format!("{SHIM_METADATA}: {e}"))
    }

    /// A live checkpoint (Tasks.Checkpoint, no pause, leave running) under a lease dropped
    /// afterwards: (RPC ms, stall ms, blob bytes, the custom shim's metadata).
    fn live_checkpoint(
        &mut self,
        rt: Runtime,
        id: &str,
        pid: u32,
    ) -> Result<(f64, f64, f64, Option<serde_json::Value>), String> {
        self.seq += 1;
        self.api.take_lease(&format!("bench-{}", self.seq))?;
        let gen = self.arm_stall(pid)?;
        let result = self.api.checkpoint(id, false).and_then(|(desc, took)| {
            let stall = self.read_stall(pid, gen)?;
            let meta = match rt {
                Runtime::Custom => Some(self.shim_metadata(&desc)?),
                Runtime::RuncV2 => None,
            };
            if verbose() {
                log(format!(
                    "{id}: RPC {:.1} ms, stall {stall:.1} ms, blob {} bytes, phases {}",
                    ms(took),
                    desc.size,
                    meta.as_ref()
                        .map(|m| m["phases"].to_string())
                        .unwrap_or_default()
                ));
            }
            Ok((ms(took), stall, desc.size as f64, meta))
        });
        self.api.drop_lease()?;
        result
    }

    // ---- idle memory, and N containers started then removed --------------------------------

    pub fn memory(&mut self) -> Result<(), String> {
        let n = self.cfg.many;
        let r = &mut self.res;
        let g = "Idle shim memory";
        r.declare(
            "mem_rss_1",
            g,
            "Idle shim memory (MiB)",
            "RSS, 1 container",
            "MiB",
            false,
        );
        r.declare(
            "mem_pss_1",
            g,
            "Idle shim memory (MiB)",
            "PSS, 1 container",
            "MiB",
            false,
        );
        let per = format!("per shim, {n} containers");
        r.declare(
            "mem_rss_n",
            g,
            "Idle shim memory (MiB)",
            &format!("RSS {per}"),
            "MiB",
            false,
        );
        r.declare(
            "mem_pss_n",
            g,
            "Idle shim memory (MiB)",
            &format!("PSS {per}"),
            "MiB",
            false,
        );
        let all = format!("all {n} shims");
        r.declare(
            "mem_rss_n_total",
            g,
            "Idle memory of N shims (MiB)",
            &format!("RSS, {all}"),
            "MiB",
            false,
        );
        r.declare(
            "mem_pss_n_total",
            g,
            "Idle memory of N shims (MiB)",
            &format!("PSS, {all}"),
            "MiB",
            false,
        );
        let g = "Lifecycle";
        r.declare(
            "life_start_n",
            g,
            "N containers (ms)",
            &format!("{n} × `ctr run -d` (sequential)"),
            "ms",
            false,
        );
        r.declare(
            "life_remove_n",
            g,
            "N containers (ms)",
            &format!("remove {n} (`ctr task rm -f`, `ctr c rm`)"),
            "ms",
            false,
        );
        r.declare(
            "life_n_total",
            g,
            "N containers (ms)",
            &format!("{n} started then removed, total"),
            "ms",
            false,
        );

        for round in 0..self.cfg.mem_rounds {
            for rt in order(round) {
                check_interrupted()?;
                let id = self.id("mem1", rt);
                self.run_detached(rt, IMAGE, &id, &["sleep", "1000000"])?;
                thread::sleep(self.cfg.settle);
                let m = memory_of(self.shim_pid(&id)?)?;
                self.res.add("mem_rss_1", rt, m.rss_kib as f64 / 1024.0);
                self.res.add("mem_pss_1", rt, m.pss_kib as f64 / 1024.0);
                self.remove(&[id])?;
            }
            for rt in order(round) {
                check_interrupted()?;
                log(format!(
                    "memory round {}: {n} containers on {}",
                    round + 1,
                    rt.name()
                ));
                let ids: Vec<String> = (0..n)
                    .map(|i| self.id(&format!("mem{n}x{i}"), rt))
                    .collect();
                let t = Instant::now();
                for id in &ids {
                    self.run_detached(rt, IMAGE, id, &["sleep", "1000000"])?;
                }
                let started = t.elapsed();
                thread::sleep(self.cfg.settle);
                let (mut rss, mut pss) = (0.0, 0.0);
                for id in &ids {
                    let m = memory_of(self.shim_pid(id)?)?;
                    self.res.add("mem_rss_n", rt, m.rss_kib as f64 / 1024.0);
                    self.res.add("mem_pss_n", rt, m.pss_kib as f64 / 1024.0);
                    rss += m.rss_kib as f64 / 1024.0;
                    pss += m.pss_kib as f64 / 1024.0;
                }
                self.res.add("mem_rss_n_total", rt, rss);
                self.res.add("mem_pss_n_total", rt, pss);
                let removed = self.remove(&ids)?;
                self.res.add("life_start_n", rt, ms(started));
                self.res.add("life_remove_n", rt, ms(removed));
                self.res.add("life_n_total", rt, ms(started + removed));
            }
        }
        Ok(())
    }

    // ---- ctr run --rm ------------------------------------------------------------------------

    pub fn lifecycle(&mut self) -> Result<(), String> {
        self.res.declare(
            "life_run_rm",
            "Lifecycle",
            "ctr run --rm (ms)",
            "`ctr run --rm IMAGE id true`",
            "ms",
            false,
        );
        let fifo = self.cd.fifo_dir().to_string();
        let once = |this: &mut Self, rt: Runtime| -> Result<Duration, String> {
            let id = this.id("run", rt);
            let args = [
                "run",
                "--rm",
                "--fifo-dir",
                &fifo,
                "--runtime",
                rt.name(),
                IMAGE,
                &id,
                "true",
            ];
            let (_, took) = run_ok(this.cd.ctr_command().args(args), CTR_TIMEOUT)?;
            Ok(took)
        };
        for rt in Runtime::ALL {
            once(self, rt)?; // warm-up: binaries and image in the page cache
        }
        log(format!(
            "lifecycle: {} × ctr run --rm per runtime",
            self.cfg.lifecycle_samples
        ));
        for i in 0..self.cfg.lifecycle_samples {
            for rt in order(i) {
                check_interrupted()?;
                let took = once(self, rt)?;
                self.res.add("life_run_rm", rt, ms(took));
            }
        }
        Ok(())
    }

    // ---- live checkpoints ------------------------------------------------------------------------

    pub fn checkpoint(&mut self) -> Result<(), String> {
        let sizes = self.cfg.ckpt_sizes.clone();
        for &(mib, _) in &sizes {
            let r = &mut self.res;
            let g = "Live checkpoint (Tasks.Checkpoint, no pause, leave running)";
            r.declare(
                &format!("ckpt_rpc_{mib}"),
                g,
                "Live checkpoint (ms)",
                &format!("{mib} MiB: Tasks.Checkpoint RPC"),
                "ms",
                false,
            );
            r.declare(
                &format!("raw_runc_{mib}"),
                g,
                "Live checkpoint (ms)",
                &format!("{mib} MiB: raw `runc checkpoint --leave-running` (floor)"),
                "ms",
                false,
            );
            r.declare(
                &format!("stall_{mib}"),
                g,
                "Workload stall (ms)",
                &format!("{mib} MiB: workload stall, RPC"),
                "ms",
                false,
            );
            r.declare(
                &format!("raw_stall_{mib}"),
                g,
                "Workload stall (ms)",
                &format!("{mib} MiB: workload stall, raw runc"),
                "ms",
                false,
            );
            r.declare(
                &format!("ckpt_size_{mib}"),
                g,
                "Checkpoint size (MiB)",
                &format!("{mib} MiB: checkpoint blob"),
                "MiB",
                false,
            );
            let g = "Custom shim checkpoint phases (custom-shim-checkpoint.json)";
            for p in ["freeze", "dump", "diff", "thaw", "total"] {
                r.declare(
                    &format!("phase_{p}_{mib}"),
                    g,
                    "Custom shim phases (ms)",
                    &format!("{mib} MiB: {p}"),
                    "ms",
                    false,
                );
            }
        }
        for (mib, rounds) in sizes {
            let go = self.id(&format!("ck{mib}"), Runtime::RuncV2);
            let custom = self.id(&format!("ck{mib}"), Runtime::Custom);
            let args = Self::workload_cmd(mib, self.cfg.sleep_us);
            let go_pid = self.start_workload(Runtime::RuncV2, &go, &args)?;
            let custom_pid = self.start_workload(Runtime::Custom, &custom, &args)?;
            for round in 0..rounds {
                log(format!(
                    "live checkpoint {mib} MiB, round {}/{rounds}",
                    round + 1
                ));
                for rt in order(round) {
                    check_interrupted()?;
                    let (id, pid) = match rt {
                        Runtime::RuncV2 => (go.clone(), go_pid),
                        Runtime::Custom => (custom.clone(), custom_pid),
                    };
                    let (rpc, stall, size, meta) = self.live_checkpoint(rt, &id, pid)?;
                    self.res.add(&format!("ckpt_rpc_{mib}"), rt, rpc);
                    self.res.add(&format!("stall_{mib}"), rt, stall);
                    self.res.add(&format!("ckpt_size_{mib}"), rt, size / MIB);
                    if let Some(meta) = meta {
                        for p in ["freeze", "dump", "diff", "thaw", "total"] {
                            let v = meta["phases"][format!("{p}_ms")]
                                .as_f64()
                                .unwrap_or(f64::NAN);
                            self.res.add(&format!("phase_{p}_{mib}"), rt, v);
                        }
                    }
                    if rt == Runtime::RuncV2 {
                        let (took, stall) = self.raw_runc_checkpoint(&id, pid)?;
                        self.res.add(&format!("raw_runc_{mib}"), rt, took);
                        self.res.add(&format!("raw_stall_{mib}"), rt, stall);
                    }
                }
            }
            self.remove(&[go, custom])?;
        }
        Ok(())
    }

    /// `runc checkpoint --leave-running` straight on a container the Go shim runs: (ms, stall ms).
    fn raw_runc_checkpoint(&mut self, id: &str, pid: u32) -> Result<(f64, f64), String> {
        self.seq += 1;
        let dir = self.cd.dir().join(format!("raw-ckpt-{}", self.seq));
        let (image, work) = (dir.join("image"), dir.join("work"));
        std::fs::create_dir_all(&work).map_err(|e| format!("{}: {e}", work.display()))?;
        let gen = self.arm_stall(pid)?;
        let root = PathBuf::from(RUNC_ROOT).join(self.cd.namespace());
        let mut cmd = Command::new("runc");
        cmd.arg("--root")
            .arg(&root)
            .args(["checkpoint", "--leave-running", "--image-path"])
            .arg(&image)
            .arg("--work-path")
            .arg(&work)
            .arg(id);
        let result = run_ok(&mut cmd, BIG_TIMEOUT).and_then(|(_, took)| {
            let stall = self.read_stall(pid, gen)?;
            Ok((ms(took), stall))
        });
        let _ = std::fs::remove_dir_all(&dir);
        result
    }

    // ---- checkpoint with exit, restore ------------------------------------------------------------

    pub fn restore(&mut self) -> Result<(), String> {
        let mib = self.cfg.restore_mib;
        let r = &mut self.res;
        let g = "Checkpoint with exit, restore into a new container";
        r.declare(
            "exit_rpc",
            g,
            "Restore (ms)",
            &format!("{mib} MiB: Tasks.Checkpoint (exit) RPC"),
            "ms",
            false,
        );
        r.declare(
            "exit_size",
            g,
            "Checkpoint size (MiB)",
            &format!("{mib} MiB: checkpoint blob (exit)"),
            "MiB",
            false,
        );
        r.declare(
            "restore_create",
            g,
            "Restore (ms)",
            &format!("{mib} MiB: Tasks.Create with the checkpoint"),
            "ms",
            false,
        );
        r.declare(
            "restore_start",
            g,
            "Restore (ms)",
            &format!("{mib} MiB: Tasks.Start (CRIU restore)"),
            "ms",
            false,
        );
        r.declare(
            "restore_total",
            g,
            "Restore (ms)",
            &format!("{mib} MiB: restore latency (Create + Start)"),
            "ms",
            false,
        );
        for round in 0..self.cfg.restore_rounds {
            log(format!(
                "checkpoint --exit + restore {mib} MiB, round {}/{}",
                round + 1,
                self.cfg.restore_rounds
            ));
            for rt in order(round) {
                check_interrupted()?;
                let id = self.id("rs", rt);
                let args = Self::workload_cmd(mib, self.cfg.sleep_us);
                self.start_workload(rt, &id, &args)?;
                self.seq += 1;
                self.api.take_lease(&format!("bench-{}", self.seq))?;
                let new = format!("{id}-r");
                let result = self.exit_and_restore(rt, &id, &new);
                self.remove(&[new, id])?;
                self.api.drop_lease()?;
                let (rpc, size, create, start) = result?;
                self.res.add("exit_rpc", rt, rpc);
                self.res.add("exit_size", rt, size / MIB);
                self.res.add("restore_create", rt, create);
                self.res.add("restore_start", rt, start);
                self.res.add("restore_total", rt, create + start);
            }
        }
        Ok(())
    }

    /// Checkpoint `id` with exit, restore it as `new`: (RPC ms, blob bytes, Create ms, Start ms).
    fn exit_and_restore(
        &mut self,
        _rt: Runtime,
        id: &str,
        new: &str,
    ) -> Result<(f64, f64, f64, f64), String> {
        let (desc, rpc) = self.api.checkpoint(id, true)?;
        self.api.wait(id)?;
        self.api.delete_task(id)?;
        let (create, start, _) = self.restore_as(id, new, &desc)?;
        Ok((ms(rpc), desc.size as f64, create, start))
    }

    /// Restores `desc` into container `new` (a fresh snapshot, like `template`) and checks the
    /// workload goes on: (Create ms, Start ms, restored pid).
    fn restore_as(
        &mut self,
        template: &str,
        new: &str,
        desc: &containerd_client::types::Descriptor,
    ) -> Result<(f64, f64, u32), String> {
        self.api.clone_container(template, new)?;
        let create = self.api.create_from_checkpoint(new, desc)?;
        let (pid, start) = self.api.start(new)?;
        let first = poll(
            &format!("restored {new} to report"),
            Duration::from_secs(30),
            || read_report(pid),
        )?;
        poll(
            &format!("restored {new} to go on"),
            Duration::from_secs(30),
            || read_report(pid).filter(|r| r.iter > first.iter),
        )?;
        Ok((ms(create), ms(start), pid))
    }

    // ---- rootfs diff ------------------------------------------------------------------------------

    pub fn rootfs_diff(&mut self) -> Result<(), String> {
        let mib = self.cfg.diff_mib;
        for count in self.cfg.diff_files.clone() {
            let what = format!(
                "{mib} MiB as {count} file{}",
                if count == 1 { "" } else { "s" }
            );
            let r = &mut self.res;
            let g = "Rootfs diff (files written in the container's rootfs, live checkpoint, restore into a new container)";
            r.declare(
                &format!("diff_capture_{count}"),
                g,
                "Rootfs diff throughput (GB/s)",
                &format!("{what}: capture (bytes / diff phase)"),
                "GB/s",
                true,
            );
            r.declare(
                &format!("diff_apply_{count}"),
                g,
                "Rootfs diff throughput (GB/s)",
                &format!("{what}: apply (bytes / Tasks.Create)"),
                "GB/s",
                true,
            );
            r.declare(
                &format!("diff_apply_shim_{count}"),
                g,
                "Rootfs diff throughput (GB/s)",
                &format!("{what}: apply (bytes / the shim's own apply time)"),
                "GB/s",
                true,
            );
            r.declare(
                &format!("diff_rpc_{count}"),
                g,
                "Rootfs diff checkpoint (ms)",
                &format!("{what}: Tasks.Checkpoint RPC"),
                "ms",
                false,
            );
            r.declare(
                &format!("diff_stall_{count}"),
                g,
                "Rootfs diff checkpoint (ms)",
                &format!("{what}: workload stall"),
                "ms",
                false,
            );
            r.declare(
                &format!("diff_create_{count}"),
                g,
                "Rootfs diff checkpoint (ms)",
                &format!("{what}: Tasks.Create (restore)"),
                "ms",
                false,
            );
            r.declare(
                &format!("diff_size_{count}"),
                g,
                "Checkpoint size (MiB)",
                &format!("{what}: checkpoint blob"),
                "MiB",
                false,
            );
            for round in 0..self.cfg.diff_rounds {
                log(format!(
                    "rootfs diff, {what}, round {}/{}",
                    round + 1,
                    self.cfg.diff_rounds
                ));
                for rt in order(round) {
                    check_interrupted()?;
                    let id = self.id(&format!("df{count}"), rt);
                    let mut args = Self::workload_cmd(1, self.cfg.sleep_us);
                    args.extend(["/data".to_string(), count.to_string(), mib.to_string()]);
                    let pid = self.start_workload(rt, &id, &args)?;
                    let new = format!("{id}-r");
                    self.seq += 1;
                    self.api.take_lease(&format!("bench-{}", self.seq))?;
                    let result = self.diff_round(rt, &id, pid, &new, count);
                    self.remove(&[new, id])?;
                    self.api.drop_lease()?;
                    let (rpc, stall, size, create, meta, back, apply_ms) = result?;
                    self.files_back[rt as usize] = Some(back);
                    self.res.add(&format!("diff_rpc_{count}"), rt, rpc);
                    self.res.add(&format!("diff_stall_{count}"), rt, stall);
                    self.res.add(&format!("diff_create_{count}"), rt, create);
                    self.res.add(&format!("diff_size_{count}"), rt, size / MIB);
                    if let Some(meta) = meta {
                        let bytes = meta["rootfs_diff_bytes"].as_f64().unwrap_or(0.0);
                        let diff_ms = meta["phases"]["diff_ms"].as_f64().unwrap_or(f64::NAN);
                        self.res.add(
                            &format!("diff_capture_{count}"),
                            rt,
                            bytes / (diff_ms / 1000.0) / 1e9,
                        );
                        self.res.add(
                            &format!("diff_apply_{count}"),
                            rt,
                            bytes / (create / 1000.0) / 1e9,
                        );
                        if let Some(apply_ms) = apply_ms {
                            self.res.add(
                                &format!("diff_apply_shim_{count}"),
                                rt,
                                bytes / (apply_ms / 1000.0) / 1e9,
                            );
                        }
                    }
                }
            }
        }
        let back = |rt: Runtime| match self.files_back[rt as usize] {
            Some(true) => "yes",
            Some(false) => "no",
            None => "not measured",
        };
        let line = format!(
            "files written before a live checkpoint are back after a restore into a fresh rootfs: Go {}, custom {}",
            back(Runtime::RuncV2),
            back(Runtime::Custom)
        );
        self.res.note("rootfs diff", line);
        Ok(())
    }

    #[allow(clippy::type_complexity)]
    fn diff_round(
        &mut self,
        rt: Runtime,
        id: &str,
        pid: u32,
        new: &str,
        count: u64,
    ) -> Result<
        (
            f64,
            f64,
            f64,
            f64,
            Option<serde_json::Value>,
            bool,
            Option<f64>,
        ),
        String,
    > {
        let gen = self.arm_stall(pid)?;
        let (desc, rpc) = self.api.checkpoint(id, false)?;
        let stall = self.read_stall(pid, gen)?;
        let meta = match rt {
            Runtime::Custom => Some(self.shim_metadata(&desc)?),
            Runtime::RuncV2 => None,
        };
        if verbose() {
            log(format!(
                "{id}: RPC {:.1} ms, stall {stall:.1} ms, blob {} bytes, phases {}",
                ms(rpc),
                desc.size,
                meta.as_ref()
                    .map(|m| m["phases"].to_string())
                    .unwrap_or_default()
            ));
        }
        let (create, _, new_pid) = self.restore_as(id, new, &desc)?;
        let last = format!("/proc/{new_pid}/root/data/f{:05}", count - 1);
        let back = std::path::Path::new(&last).is_file();
        // The shim's own apply time, without containerd unpacking the blob first.
        let record = self
            .cd
            .state_dir()
            .join("io.containerd.runtime.v2.task")
            .join(self.cd.namespace())
            .join(new)
            .join("custom-shim-restore.json");
        let apply_ms = std::fs::read(&record)
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|v| v["apply_ms"].as_f64());
        Ok((
            ms(rpc),
            stall,
            desc.size as f64,
            create,
            meta,
            back,
            apply_ms,
        ))
    }

    // ---- targets and the phase table ------------------------------------------------------------

    pub fn targets(&mut self) {
        let go = Runtime::RuncV2;
        let cu = Runtime::Custom;
        let mut t = Vec::new();
        let r = &self.res;
        for (key, what) in [
            ("mem_rss_1", "idle shim RSS (1 container) ≤ 1/4 of Go's"),
            (
                "mem_rss_n",
                "idle shim RSS (per shim, many containers) ≤ 1/4 of Go's",
            ),
        ] {
            if let (Some(g), Some(c)) = (r.median(key, go), r.median(key, cu)) {
                t.push(Target {
                    what: what.into(),
                    measured: format!(
                        "{} MiB vs {} MiB (×{:.2}; limit {} MiB)",
                        num(c),
                        num(g),
                        c / g,
                        num(g / 4.0)
                    ),
                    met: Some(c <= g / 4.0),
                });
            }
        }
        for (key, what) in [
            ("life_run_rm", "`ctr run --rm` latency ≤ 0.9× Go's"),
            ("life_n_total", "N containers started + removed ≤ 0.9× Go's"),
        ] {
            if let (Some(g), Some(c)) = (r.median(key, go), r.median(key, cu)) {
                let p95 = |rt| {
                    r.metric(key)
                        .and_then(|m| m.stats(rt))
                        .map(|s| s.p95)
                        .unwrap_or(f64::NAN)
                };
                t.push(Target {
                    what: what.into(),
                    measured: format!(
                        "median {} ms vs {} ms (×{:.2}); p95 {} vs {} ms",
                        num(c),
                        num(g),
                        c / g,
                        num(p95(cu)),
                        num(p95(go))
                    ),
                    met: Some(c <= 0.9 * g),
                });
            }
        }
        for &(mib, _) in &self.cfg.ckpt_sizes {
            let rpc = r.median(&format!("ckpt_rpc_{mib}"), cu);
            let raw = r.median(&format!("raw_runc_{mib}"), go);
            let diff = r.median(&format!("phase_diff_{mib}"), cu);
            let total = r.median(&format!("phase_total_{mib}"), cu);
            let go_rpc = r.median(&format!("ckpt_rpc_{mib}"), go);
            if let (Some(rpc), Some(raw), Some(diff), Some(total), Some(go_rpc)) =
                (rpc, raw, diff, total, go_rpc)
            {
                let limit = raw + 20.0 + diff;
                t.push(Target {
                    what: format!("{mib} MiB: checkpoint RPC ≤ raw runc checkpoint + 20 ms + diff"),
                    measured: format!(
                        "RPC {} ms vs limit {} ms (raw runc {} + 20 + diff {}); Go's RPC {} ms: \
                         both include containerd's tar of the images into the content store",
                        num(rpc),
                        num(limit),
                        num(raw),
                        num(diff),
                        num(go_rpc)
                    ),
                    met: Some(rpc <= limit),
                });
                t.push(Target {
                    what: format!(
                        "{mib} MiB: the shim's bracket (freeze → thaw) ≤ raw runc checkpoint + 20 ms + diff"
                    ),
                    measured: format!("{} ms vs limit {} ms", num(total), num(limit)),
                    met: Some(total <= limit),
                });
            }
        }
        for count in &self.cfg.diff_files {
            for (kind, key) in [
                ("capture", "diff_capture"),
                ("apply, shim's own time", "diff_apply_shim"),
                ("apply, whole Tasks.Create", "diff_apply"),
            ] {
                if let Some(c) = r.median(&format!("{key}_{count}"), cu) {
                    t.push(Target {
                        what: format!(
                            "rootfs diff {kind}, {} MiB as {count} file(s) ≥ 1 GB/s",
                            self.cfg.diff_mib
                        ),
                        measured: format!("{c:.2} GB/s"),
                        met: Some(c >= 1.0),
                    });
                }
            }
        }
        if let (Some(g), Some(c)) = (r.median("restore_total", go), r.median("restore_total", cu)) {
            t.push(Target {
                what: format!(
                    "restore latency ({} MiB, Create + Start) ≤ Go's",
                    self.cfg.restore_mib
                ),
                measured: format!("{} ms vs {} ms (×{:.2})", num(c), num(g), c / g),
                met: Some(c <= g),
            });
        }
        t.append(&mut self.res.targets);
        self.res.targets = t;
    }

    /// The custom shim's phases next to the raw runc checkpoint (the floor), per size.
    pub fn phase_table(&self) -> String {
        let r = &self.res;
        let mut md = String::new();
        if self.cfg.ckpt_sizes.iter().all(|(mib, _)| {
            r.median(&format!("phase_total_{mib}"), Runtime::Custom)
                .is_none()
        }) {
            return md;
        }
        let _ = writeln!(
            md,
            "\n## Live checkpoint: the custom shim's phases next to raw runc (medians, ms)\n"
        );
        let _ = writeln!(
            md,
            "| workload | freeze | dump | diff | thaw | shim bracket | raw runc checkpoint | bracket − raw | custom RPC | Go RPC | stall custom | stall Go | stall raw runc |"
        );
        let _ = writeln!(md, "|---|---|---|---|---|---|---|---|---|---|---|---|---|");
        let f = |key: String, rt| r.median(&key, rt).map(num).unwrap_or_else(|| "—".into());
        for &(mib, _) in &self.cfg.ckpt_sizes {
            let cu = Runtime::Custom;
            let go = Runtime::RuncV2;
            let over = match (
                r.median(&format!("phase_total_{mib}"), cu),
                r.median(&format!("raw_runc_{mib}"), go),
            ) {
                (Some(a), Some(b)) => num(a - b),
                _ => "—".into(),
            };
            let _ = writeln!(
                md,
                "| {mib} MiB | {} | {} | {} | {} | {} | {} | {over} | {} | {} | {} | {} | {} |",
                f(format!("phase_freeze_{mib}"), cu),
                f(format!("phase_dump_{mib}"), cu),
                f(format!("phase_diff_{mib}"), cu),
                f(format!("phase_thaw_{mib}"), cu),
                f(format!("phase_total_{mib}"), cu),
                f(format!("raw_runc_{mib}"), go),
                f(format!("ckpt_rpc_{mib}"), cu),
                f(format!("ckpt_rpc_{mib}"), go),
                f(format!("stall_{mib}"), cu),
                f(format!("stall_{mib}"), go),
                f(format!("raw_stall_{mib}"), go),
            );
        }
        let _ = writeln!(
            md,
            "\nThe RPC time includes containerd's own work around the shim (it tars the checkpoint \
             directory into the content store), which both runtimes pay; the shim bracket is \
             what the custom shim measured from freeze to thaw. The stall is the longest pause the \
             workload saw between two iterations ({} µs sleep each).",
            self.cfg.sleep_us
        );
        md
    }
}
