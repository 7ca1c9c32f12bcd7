//! What the benchmark reads on the host: shim memory (smaps_rollup), the workload's report, a
//! member of a checkpoint tar, and commands run with a deadline and a stopwatch.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

/// Resident and proportional set size of a process, KiB.
#[derive(Clone, Copy, Debug, Default)]
pub struct Memory {
    pub rss_kib: u64,
    pub pss_kib: u64,
}

/// `Rss:` and `Pss:` of /proc/<pid>/smaps_rollup.
pub fn memory_of(pid: i32) -> Result<Memory, String> {
    let path = format!("/proc/{pid}/smaps_rollup");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
    parse_smaps_rollup(&text).ok_or_else(|| format!("{path}: no Rss/Pss lines"))
}

pub fn parse_smaps_rollup(text: &str) -> Option<Memory> {
    let field = |name: &str| {
        text.lines().find_map(|l| {
            let rest = l.strip_prefix(name)?.trim();
            rest.strip_suffix("kB")?.trim().parse::<u64>().ok()
        })
    };
    Some(Memory {
        rss_kib: field("Rss:")?,
        pss_kib: field("Pss:")?,
    })
}

/// The workload's /maxgap: `gen=G maxgap_us=M iter=I mib=N`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Report {
    pub gen: u64,
    pub maxgap_us: u64,
    pub iter: u64,
    /// CLOCK_MONOTONIC (µs) at the end of the longest gap (see [`monotonic_us`]).
    pub at_us: u64,
}

/// CLOCK_MONOTONIC now, in µs: the workload's clock for `at_us`.
pub fn monotonic_us() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1000
}

pub fn parse_report(text: &str) -> Option<Report> {
    let mut gen = None;
    let mut maxgap = None;
    let mut iter = None;
    let mut at_us = 0;
    for kv in text.split_whitespace() {
        let (k, v) = kv.split_once('=')?;
        let v: u64 = v.parse().ok()?;
        match k {
            "gen" => gen = Some(v),
            "maxgap_us" => maxgap = Some(v),
            "iter" => iter = Some(v),
            "at_us" => at_us = v,
            _ => {}
        }
    }
    Some(Report {
        gen: gen?,
        maxgap_us: maxgap?,
        iter: iter?,
        at_us,
    })
}

/// Reads the workload report of the container whose init is `pid`, through /proc/<pid>/root.
pub fn read_report(pid: u32) -> Option<Report> {
    parse_report(&integration::read_in_container(pid, "/maxgap")?)
}

/// Polls `f` every 10 ms until it gives Some, or `timeout` passes.
pub fn poll<T>(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> Option<T>,
) -> Result<T, String> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            return Err(format!("timed out after {timeout:?} waiting for {what}"));
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// Reads member `name` (leading "./" ignored) of the tar archive at `path`, seeking past the
/// others (a checkpoint blob can be GiBs). Knows ustar, GNU long names and PAX paths.
pub fn tar_member(path: &Path, name: &str) -> Result<Option<Vec<u8>>, String> {
    let err = |e: std::io::Error| format!("{}: {e}", path.display());
    let want = name.trim_start_matches("./");
    let mut f = File::open(path).map_err(err)?;
    let mut long_name: Option<String> = None;
    loop {
        let mut h = [0u8; 512];
        if f.read_exact(&mut h).is_err() || h.iter().all(|b| *b == 0) {
            return Ok(None);
        }
        let size =
            tar_size(&h[124..136]).ok_or_else(|| format!("{}: bad tar size", path.display()))?;
        let padded = size.div_ceil(512) * 512;
        let typ = h[156];
        if typ == b'L' || typ == b'x' {
            let mut data = vec![0u8; size as usize];
            f.read_exact(&mut data).map_err(err)?;
            f.seek(SeekFrom::Current((padded - size) as i64))
                .map_err(err)?;
            long_name = if typ == b'L' {
                Some(cstr(&data))
            } else {
                pax_path(&data).or(long_name)
            };
            continue;
        }
        let mut entry = long_name.take().unwrap_or_else(|| {
            let base = cstr(&h[0..100]);
            let prefix = if &h[257..262] == b"ustar" {
                cstr(&h[345..500])
            } else {
                String::new()
            };
            if prefix.is_empty() {
                base
            } else {
                format!("{prefix}/{base}")
            }
        });
        if let Some(s) = entry.strip_prefix("./") {
            entry = s.to_string();
        }
        if entry == want && (typ == b'0' || typ == 0) {
            let mut data = vec![0u8; size as usize];
            f.read_exact(&mut data).map_err(err)?;
            return Ok(Some(data));
        }
        f.seek(SeekFrom::Current(padded as i64)).map_err(err)?;
    }
}

fn cstr(b: &[u8]) -> String {
    let end = b.iter().position(|c| *c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

fn tar_size(field: &[u8]) -> Option<u64> {
    if field[0] & 0x80 != 0 {
        // base-256
        return Some(
            field[1..]
                .iter()
                .fold(0u64, |acc, b| (acc << 8) | u64::from(*b)),
        );
    }
    let s = cstr(field);
    let s = s.trim();
    if s.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(s, 8).ok()
}

fn pax_path(data: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(data);
    text.lines().find_map(|rec| {
        let (_, kv) = rec.split_once(' ')?;
        kv.strip_prefix("path=").map(str::to_string)
    })
}

/// Runs `cmd` (stdin /dev/null, output captured) to completion, at most `timeout`; returns its
/// output and how long it ran.
pub fn run_timed(cmd: &mut Command, timeout: Duration) -> Result<(Output, Duration), String> {
    let what = format!("{cmd:?}");
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let t = Instant::now();
    let child = cmd.spawn().map_err(|e| format!("spawn {what}: {e}"))?;
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    let waiter = thread::spawn(move || {
        let r = child.wait_with_output();
        let _ = tx.send(Instant::now());
        r
    });
    match rx.recv_timeout(timeout) {
        Ok(done) => {
            let out = waiter
                .join()
                .map_err(|_| format!("{what}: waiter panicked"))?
                .map_err(|e| format!("{what}: {e}"))?;
            Ok((out, done - t))
        }
        Err(_) => {
            // SAFETY: kill(2) on our own child, still unreaped (the waiter has not returned).
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGKILL);
            }
            let _ = waiter.join();
            Err(format!("{what} did not finish within {timeout:?}"))
        }
    }
}

/// Like [`run_timed`], and the command must succeed.
pub fn run_ok(cmd: &mut Command, timeout: Duration) -> Result<(String, Duration), String> {
    let what = format!("{cmd:?}");
    let (out, took) = run_timed(cmd, timeout)?;
    if !out.status.success() {
        return Err(format!(
            "{what}: {}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok((String::from_utf8_lossy(&out.stdout).into_owned(), took))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smaps_rollup_fields() {
        let t = "00400000-7fff [rollup]\nRss:               11480 kB\nPss:                3164 kB\nPss_Anon: 100 kB\n";
        let m = parse_smaps_rollup(t).unwrap();
        assert_eq!((m.rss_kib, m.pss_kib), (11480, 3164));
    }

    #[test]
    fn workload_report() {
        let r = parse_report("gen=2 maxgap_us=1234 iter=99 mib=16 at_us=5\n").unwrap();
        assert_eq!(
            r,
            Report {
                gen: 2,
                maxgap_us: 1234,
                iter: 99,
                at_us: 5,
            }
        );
        assert!(parse_report("").is_none());
    }

    #[test]
    fn tar_member_is_found_among_others() {
        let dir = std::env::temp_dir().join(format!("bench-tar-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("in")).unwrap();
        std::fs::write(dir.join("in/big.img"), vec![7u8; 5000]).unwrap();
        std::fs::write(dir.join("in/meta.json"), b"{\"a\":1}").unwrap();
        let tar = dir.join("x.tar");
        let ok = Command::new("tar")
            .arg("-cf")
            .arg(&tar)
            .arg("-C")
            .arg(dir.join("in"))
            .args([".", "./big.img"])
            .status()
            .unwrap();
        assert!(ok.success());
        assert_eq!(
            tar_member(&tar, "meta.json").unwrap().as_deref(),
            Some(&b"{\"a\":1}"[..])
        );
        assert_eq!(tar_member(&tar, "nope").unwrap(), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
