//! The benchmark: containerd-shim-custom-v2 against containerd-shim-runc-v2, side by side.
//!
//!   bench [--quick] [--out DIR] [--image TAR] [--only memory,lifecycle,checkpoint,restore,diff,cri]
//!         [--rounds N] [--ckpt-mib 16,256,1024] [--diff-mib N] [--diff-files 1,10000]
//!
//! The last four override the mode's sizes and rounds (for a quick look at one figure).
//!
//! Run it as root through bench/run.sh, which builds the release shim, this binary and the
//! images first. It starts ONE private containerd (the integration harness's `Containerd`: own
//! root, state, sockets, config; `SHIM_BINARY` — default the release build — first on its PATH),
//! imports the test image and the bench image (bench/build-bench-image.sh), measures every
//! figure on both runtimes in alternating order, and writes `results.json` and `results.md` to
//! the output dir (default `<workspace>/bench/results`). bench/chart.py draws chart.png from
//! results.json.

#[path = "../bench/mod.rs"]
mod bench;

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::Instant;

use bench::scenarios::{Bench, Config};
use integration::{workspace_root, Containerd};

const SCENARIOS: [&str; 7] = [
    "memory",
    "lifecycle",
    "checkpoint",
    "restore",
    "diff",
    "cri",
    "migrate",
];

struct Args {
    quick: bool,
    rounds: Option<usize>,
    ckpt_mib: Option<Vec<u64>>,
    diff_mib: Option<u64>,
    diff_files: Option<Vec<u64>>,
    out: PathBuf,
    image: PathBuf,
    only: Vec<String>,
}

fn usage() -> ! {
    eprintln!(
        "usage: bench [--quick] [--out DIR] [--image TAR] [--only {}]\n             \
         [--rounds N] [--ckpt-mib 16,256,1024] [--diff-mib N] [--diff-files 1,10000]",
        SCENARIOS.join(",")
    );
    std::process::exit(2)
}

fn parse_args() -> Args {
    let mut a = Args {
        quick: false,
        rounds: None,
        ckpt_mib: None,
        diff_mib: None,
        diff_files: None,
        out: workspace_root().join("bench/results"),
        image: workspace_root().join("target/bench-image/shimbench.tar"),
        only: SCENARIOS.iter().map(|s| s.to_string()).collect(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--quick" => a.quick = true,
            "--out" => a.out = it.next().map(PathBuf::from).unwrap_or_else(|| usage()),
            "--image" => a.image = it.next().map(PathBuf::from).unwrap_or_else(|| usage()),
            "--only" => {
                let list = it.next().unwrap_or_else(|| usage());
                a.only = list.split(',').map(str::to_string).collect();
                if a.only.iter().any(|s| !SCENARIOS.contains(&s.as_str())) {
                    usage();
                }
            }
            "--rounds" => a.rounds = Some(number(it.next())),
            "--diff-mib" => a.diff_mib = Some(number(it.next())),
            "--ckpt-mib" => a.ckpt_mib = Some(numbers(it.next())),
            "--diff-files" => a.diff_files = Some(numbers(it.next())),
            _ => usage(),
        }
    }
    a
}

fn number<T: std::str::FromStr>(arg: Option<String>) -> T {
    arg.and_then(|s| s.parse().ok()).unwrap_or_else(|| usage())
}

fn numbers(arg: Option<String>) -> Vec<u64> {
    let v: Vec<u64> = arg
        .unwrap_or_else(|| usage())
        .split(',')
        .map(|s| number(Some(s.to_string())))
        .collect();
    if v.is_empty() || v.contains(&0) {
        usage();
    }
    v
}

/// First line of `prog args...`, or "?".
fn version(prog: &str, args: &[&str]) -> String {
    Command::new(prog)
        .args(args)
        .output()
        .ok()
        .and_then(|o| {
            let text = String::from_utf8_lossy(&o.stdout).into_owned();
            text.lines().next().map(|l| l.trim().to_string())
        })
        .unwrap_or_else(|| "?".into())
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// SIGINT and SIGTERM go to one thread (blocked everywhere else, set before any other thread
/// starts): the first one stops the run after the current step, so that the private containerd
/// is torn down and what was measured is written; a second one exits at once.
fn handle_interrupts() {
    // SAFETY: plain signal-mask calls on a zeroed, then initialised, sigset.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };
    std::thread::spawn(move || loop {
        let mut sig = 0;
        // SAFETY: sigwait on the set blocked above.
        if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
            return;
        }
        if bench::scenarios::INTERRUPTED.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
        eprintln!("bench: interrupted: stopping after this step (again to exit at once)");
    });
}

fn main() {
    let args = parse_args();
    handle_interrupts();
    // Defaults for the harness: the release shim, and a containerd that does not log at debug
    // level (the shims log at containerd's level, and a benchmark measures no debug logging).
    if std::env::var_os("SHIM_BINARY").is_none() {
        std::env::set_var(
            "SHIM_BINARY",
            workspace_root().join("target/release/containerd-shim-custom-v2"),
        );
    }
    if std::env::var_os("SHIMTEST_LOG_LEVEL").is_none() {
        std::env::set_var("SHIMTEST_LOG_LEVEL", "info");
    }
    let shim = match integration::shim_binary() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("bench: {e}");
            std::process::exit(1);
        }
    };
    if !args.image.is_file() {
        eprintln!(
            "bench: {} not found: run bench/build-bench-image.sh",
            args.image.display()
        );
        std::process::exit(1);
    }
    if let Err(e) = std::fs::create_dir_all(&args.out) {
        eprintln!("bench: {}: {e}", args.out.display());
        std::process::exit(1);
    }
    let mut cfg = if args.quick {
        Config::quick()
    } else {
        Config::full()
    };
    cfg.apply_overrides(args.rounds, args.ckpt_mib, args.diff_mib, args.diff_files);
    cfg.image = args.image.clone();
    let started = Instant::now();
    let load_before = loadavg();
    let date = version("date", &["-u", "+%Y-%m-%d %H:%M:%S UTC"]);

    let cd = Containerd::start();
    let imported = cd.ctr([
        "images",
        "import",
        args.image.to_str().expect("utf-8 image path"),
    ]);
    // A panic (not exit) from here on: unwinding tears the containerd down.
    assert!(
        imported.status.success(),
        "ctr images import: {}",
        integration::show(&imported)
    );
    let mut b = Bench::new(&cd, cfg.clone()).unwrap_or_else(|e| panic!("{e}"));
    let mut failures = Vec::new();
    for s in SCENARIOS
        .iter()
        .filter(|s| args.only.iter().any(|o| o == *s))
    {
        if bench::scenarios::INTERRUPTED.load(Ordering::SeqCst) {
            break;
        }
        eprintln!("bench: == {s} ==");
        let t = Instant::now();
        let r = match *s {
            "memory" => b.memory(),
            "lifecycle" => b.lifecycle(),
            "checkpoint" => b.checkpoint(),
            "restore" => b.restore(),
            "cri" => b.cri(),
            "migrate" => b.migrate(),
            // BENCH_DIFF_FS=default or =xfs: one of the two.
            _ => {
                let fs = std::env::var("BENCH_DIFF_FS").unwrap_or_default();
                let default = match fs.as_str() {
                    "xfs" => Ok(()),
                    _ => b.rootfs_diff(""),
                };
                match fs.as_str() {
                    "default" => default,
                    _ => default.and_then(|()| bench::diff::on_xfs(&mut b)),
                }
            }
        };
        eprintln!("bench: {s} took {:.1} s", t.elapsed().as_secs_f64());
        if let Err(e) = r {
            eprintln!("bench: {s} FAILED: {e}");
            failures.push(format!("{s}: {e}"));
        }
    }
    b.targets();
    for f in &failures {
        b.res.note("FAILED", f.clone());
    }

    let meta: Vec<(String, String)> = vec![
        ("date".into(), date),
        (
            "mode".into(),
            if cfg.quick {
                "quick (`--quick`: fewer rounds, smaller sizes)".into()
            } else {
                "full".into()
            },
        ),
        (
            "host".into(),
            format!(
                "{} cores, kernel {}, load average {load_before} at the start, {} at the end",
                std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(0),
                version("uname", &["-r"]),
                loadavg()
            ),
        ),
        ("containerd".into(), version("containerd", &["--version"])),
        ("runc".into(), version("runc", &["--version"])),
        ("criu".into(), version("criu", &["--version"])),
        (
            "custom shim".into(),
            format!(
                "{} ({} bytes)",
                shim.display(),
                std::fs::metadata(&shim).map(|m| m.len()).unwrap_or(0)
            ),
        ),
        (
            "Go shim".into(),
            version("sh", &["-c", "command -v containerd-shim-runc-v2"]),
        ),
        ("rounds".into(), format!("{cfg:?}")),
        (
            "duration".into(),
            format!("{:.0} s", started.elapsed().as_secs_f64()),
        ),
    ];
    let meta_json = serde_json::Value::Object(
        meta.iter()
            .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
            .collect(),
    );
    let json = b.res.to_json(meta_json);
    let md = b.res.to_markdown(
        "containerd-shim-custom-v2 vs containerd-shim-runc-v2",
        &meta,
        &b.phase_table(),
    );
    let write = |name: &str, data: &[u8]| {
        let p = args.out.join(name);
        std::fs::write(&p, data).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        eprintln!("bench: wrote {}", p.display());
    };
    write(
        "results.json",
        serde_json::to_string_pretty(&json)
            .expect("json")
            .as_bytes(),
    );
    write("results.md", md.as_bytes());
    drop(b);
    drop(cd);
    if !failures.is_empty() {
        std::process::exit(1);
    }
}
