//! The measurements. Each runs both runtimes in the same rounds, the order alternating from one
//! round to the next, on the one private containerd of the run.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use integration::{Containerd, Runtime};

use super::api::Api;
use super::measure::{poll, read_report, run_ok, run_timed, tar_member};
use super::report::Results;

/// Set on SIGINT/SIGTERM: every round checks it and stops the run.
pub static INTERRUPTED: AtomicBool = AtomicBool::new(false);

pub(super) fn check_interrupted() -> Result<(), String> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        Err("interrupted".into())
    } else {
        Ok(())
    }
}

/// Before a round that writes much: the dirty pages of the rounds before are written back first,
/// so that one round's writes do not land in the next one's figures (either runtime's: the order
/// alternates).
pub(super) fn settle_disk() {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
}

/// Name `ctr images import` gives bench/build-bench-image.sh's image.
pub const BENCH_IMAGE: &str = "docker.io/library/shimbench:latest";
/// The file the custom shim writes into the checkpoint.
pub(super) const SHIM_METADATA: &str = "custom-shim-checkpoint.json";
pub(super) const CTR_TIMEOUT: Duration = Duration::from_secs(120);
/// Long enough for the workload to write 1 GiB and touch 1 GiB on a busy machine.
pub(super) const READY_TIMEOUT: Duration = Duration::from_secs(600);
pub(super) const BIG_TIMEOUT: Duration = Duration::from_secs(600);

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
            ckpt_sizes: vec![(16, 5), (256, 5), (1024, 5)],
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

pub(super) fn short(rt: Runtime) -> &'static str {
    match rt {
        Runtime::RuncV2 => "go",
        Runtime::Custom => "custom",
    }
}

pub(super) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

pub(super) const MIB: f64 = 1024.0 * 1024.0;

pub struct Bench<'a> {
    pub(super) cd: &'a Containerd,
    pub(super) api: Api,
    pub cfg: Config,
    pub res: Results,
    pub(super) seq: usize,
    /// Files restored (or not) after a restore into a fresh rootfs, per runtime.
    pub(super) files_back: [Option<bool>; 2],
}

pub(super) fn log(msg: impl AsRef<str>) {
    eprintln!("bench: {}", msg.as_ref());
}

/// `BENCH_VERBOSE=1`: every checkpoint's figures as they come.
pub(super) fn verbose() -> bool {
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

    pub(super) fn id(&mut self, what: &str, rt: Runtime) -> String {
        self.seq += 1;
        format!("{what}-{}-{}", short(rt), self.seq)
    }

    pub(super) fn ctr(&self, args: &[&str]) -> Result<(String, Duration), String> {
        run_ok(self.cd.ctr_command().args(args), CTR_TIMEOUT)
    }

    /// `ctr run -d --null-io`; returns the init's pid and how long ctr took.
    pub(super) fn run_detached(
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
    pub(super) fn remove(&self, ids: &[String]) -> Result<Duration, String> {
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

    pub(super) fn shim_pid(&self, id: &str) -> Result<i32, String> {
        let shims = self.cd.shims_for(id);
        match shims.as_slice() {
            [one] => Ok(one.pid),
            other => Err(format!(
                "expected one shim for {id}, found {:?}",
                other.iter().map(|p| p.pid).collect::<Vec<_>>()
            )),
        }
    }

    pub(super) fn workload_cmd(mib: u64, sleep_us: u64) -> Vec<String> {
        vec![
            "/bin/workload".into(),
            mib.to_string(),
            sleep_us.to_string(),
        ]
    }

    /// Starts the workload and waits until its memory is touched (its report appears).
    pub(super) fn start_workload(
        &self,
        rt: Runtime,
        id: &str,
        args: &[String],
    ) -> Result<u32, String> {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (pid, _) = self.run_detached(rt, BENCH_IMAGE, id, &args)?;
        poll(&format!("workload {id} ready"), READY_TIMEOUT, || {
            read_report(pid)
        })?;
        Ok(pid)
    }

    /// Starts a new measurement in the workload (SIGUSR1); returns its generation.
    pub(super) fn arm_stall(&self, pid: u32) -> Result<u64, String> {
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
    pub(super) fn read_stall(&self, pid: u32, gen: u64) -> Result<f64, String> {
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
    pub(super) fn shim_metadata(
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
    pub(super) fn live_checkpoint(
        &mut self,
        rt: Runtime,
        id: &str,
        pid: u32,
    ) -> Result<(f64, f64, f64, Option<serde_json::Value>), String> {
        self.seq += 1;
        self.api.take_lease(&format!("bench-{}", self.seq))?;
        let result = self
            .measured_checkpoint(rt, id, pid)
            .map(|(desc, rpc, stall, meta)| (rpc, stall, desc.size as f64, meta));
        self.api.drop_lease()?;
        result
    }

    /// A live checkpoint under the caller's lease, the workload's stall measured around it:
    /// (descriptor, RPC ms, stall ms, the custom shim's metadata). With BENCH_VERBOSE, its figures
    /// and where in the RPC the longest gap ended.
    pub(super) fn measured_checkpoint(
        &mut self,
        rt: Runtime,
        id: &str,
        pid: u32,
    ) -> Result<
        (
            containerd_client::types::Descriptor,
            f64,
            f64,
            Option<serde_json::Value>,
        ),
        String,
    > {
        let gen = self.arm_stall(pid)?;
        let t0 = super::measure::monotonic_us();
        let (desc, took) = self.api.checkpoint(id, false)?;
        let stall = self.read_stall(pid, gen)?;
        let meta = match rt {
            Runtime::Custom => Some(self.shim_metadata(&desc)?),
            Runtime::RuncV2 => None,
        };
        if verbose() {
            let gap_at = read_report(pid)
                .map(|r| (r.at_us as f64 - t0 as f64) / 1000.0)
                .unwrap_or(f64::NAN);
            log(format!(
                "{id}: RPC {:.1} ms, stall {stall:.1} ms ending {gap_at:.0} ms into the RPC, blob {} bytes, phases {}",
                ms(took),
                desc.size,
                meta.as_ref()
                    .map(|m| format!("{} {}", m["phases"], m["rootfs_diff_capture"]))
                    .unwrap_or_default()
            ));
        }
        Ok((desc, ms(took), stall, meta))
    }
}
