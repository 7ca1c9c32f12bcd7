//! Looking at (and cleaning up) the host: mounts, processes, cgroups.

use std::collections::BTreeSet;
use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::poll::poll_until;

/// One line of /proc/self/mountinfo.
#[derive(Debug, Clone)]
pub struct MountInfo {
    pub mount_point: String,
    pub fs_type: String,
    pub source: String,
    pub super_options: String,
}

fn unescape(s: &str) -> String {
    // mountinfo escapes space, tab, newline and backslash as \ooo.
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 4 <= b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = b[i + 1..i + 4]
                .iter()
                .fold(0u32, |acc, c| acc * 8 + u32::from(c - b'0'));
            if let Ok(v) = u8::try_from(v) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses the mount table of `pid` ("self" for ours).
pub fn mountinfo(pid: &str) -> Vec<MountInfo> {
    let Ok(text) = fs::read_to_string(format!("/proc/{pid}/mountinfo")) else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|line| {
            let (pre, post) = line.split_once(" - ")?;
            let pre: Vec<&str> = pre.split(' ').collect();
            let post: Vec<&str> = post.split(' ').collect();
            Some(MountInfo {
                mount_point: unescape(pre.get(4)?),
                fs_type: post.first()?.to_string(),
                source: unescape(post.get(1).unwrap_or(&"")),
                super_options: post.get(2).unwrap_or(&"").to_string(),
            })
        })
        .collect()
}

/// Mount points at or below `dir` in our mount namespace.
pub fn mounts_under(dir: &Path) -> Vec<MountInfo> {
    let prefix = dir.to_string_lossy().trim_end_matches('/').to_string();
    mountinfo("self")
        .into_iter()
        .filter(|m| m.mount_point == prefix || m.mount_point.starts_with(&format!("{prefix}/")))
        .collect()
}

/// Unmounts everything at or below `dir`, deepest first; a lazy (MNT_DETACH) unmount is the last
/// resort for a busy mount. Returns the mount points that could not be removed.
pub fn unmount_all_under(dir: &Path) -> Vec<String> {
    for _round in 0..5 {
        let mut points: Vec<String> = mounts_under(dir)
            .into_iter()
            .map(|m| m.mount_point)
            .collect();
        if points.is_empty() {
            return Vec::new();
        }
        points.sort_by_key(|p| std::cmp::Reverse(p.matches('/').count()));
        points.dedup();
        for p in points {
            let Ok(c) = CString::new(p.as_bytes()) else {
                continue;
            };
            // SAFETY: umount2 with a valid NUL-terminated path.
            let rc = unsafe { libc::umount2(c.as_ptr(), 0) };
            if rc != 0 {
                // SAFETY: as above.
                unsafe {
                    libc::umount2(c.as_ptr(), libc::MNT_DETACH);
                }
            }
        }
    }
    mounts_under(dir)
        .into_iter()
        .map(|m| m.mount_point)
        .collect()
}

/// A process and its argument vector.
#[derive(Debug, Clone)]
pub struct Proc {
    pub pid: i32,
    pub argv: Vec<String>,
}

impl Proc {
    /// Value following `flag` in argv (e.g. `-id`).
    pub fn flag(&self, flag: &str) -> Option<&str> {
        self.argv
            .iter()
            .position(|a| a == flag)
            .and_then(|i| self.argv.get(i + 1))
            .map(|s| s.as_str())
    }

    pub fn program_name(&self) -> &str {
        self.argv
            .first()
            .map(|a| a.rsplit('/').next().unwrap_or(a))
            .unwrap_or("")
    }
}

/// All processes (zombies and kernel threads have an empty cmdline and are left out).
pub fn processes() -> Vec<Proc> {
    let Ok(rd) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.filter_map(|e| {
        let e = e.ok()?;
        let pid: i32 = e.file_name().to_str()?.parse().ok()?;
        let raw = fs::read(e.path().join("cmdline")).ok()?;
        if raw.is_empty() {
            return None;
        }
        let argv = raw
            .split(|b| *b == 0)
            .filter(|s| !s.is_empty())
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .collect();
        Some(Proc { pid, argv })
    })
    .collect()
}

/// Shim processes (program `containerd-shim-*`) started by the containerd at `address`.
pub fn shims_of(address: &Path) -> Vec<Proc> {
    let addr = address.to_string_lossy();
    processes()
        .into_iter()
        .filter(|p| {
            p.program_name().starts_with("containerd-shim") && p.flag("-address") == Some(&addr)
        })
        .collect()
}

/// True while /proc/<pid> exists and is not a zombie.
pub fn alive(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            // state is the field after the ")" that closes comm.
            let state = stat
                .rsplit_once(')')
                .and_then(|(_, r)| r.split_whitespace().next());
            state != Some("Z") && state != Some("X")
        }
        Err(_) => false,
    }
}

/// Start time of `pid` (field 22 of /proc/<pid>/stat, clock ticks since boot): with the pid it
/// names one process, pid reuse notwithstanding.
pub fn start_time(pid: i32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    // rest starts at field 3 (state); start time is field 22.
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// SIGKILLs `pids` and waits (up to `timeout`) until they are gone.
pub fn kill_and_wait(pids: &[i32], timeout: Duration) -> bool {
    for &pid in pids {
        // SAFETY: kill(2); a vanished pid just fails.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
        }
    }
    poll_until(timeout, || pids.iter().all(|&p| !alive(p)).then_some(())).is_some()
}

/// Cgroup hierarchy roots: every v1 controller mount (deduplicated), the v2 one, all of them where
/// `/sys/fs/cgroup` is a pure cgroup2 mount.
pub fn cgroup_roots() -> Vec<PathBuf> {
    let mut seen = BTreeSet::new();
    let mut roots = Vec::new();
    for m in mountinfo("self") {
        if (m.fs_type == "cgroup" || m.fs_type == "cgroup2")
            && m.mount_point.starts_with("/sys/fs/cgroup")
        {
            let p = PathBuf::from(&m.mount_point);
            let key = fs::canonicalize(&p).unwrap_or_else(|_| p.clone());
            if seen.insert(key) {
                roots.push(p);
            }
        }
    }
    roots
}

fn subdirs_deepest_first(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    fn walk(d: &Path, out: &mut Vec<PathBuf>) {
        if let Ok(rd) = fs::read_dir(d) {
            for e in rd.flatten() {
                if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    walk(&e.path(), out);
                }
            }
        }
        out.push(d.to_path_buf());
    }
    if dir.is_dir() {
        walk(dir, &mut out);
    }
    out
}

/// The cgroup directories named by `rel` (e.g. "ns/id") under every hierarchy that has them.
pub fn cgroup_dirs(rel: &str) -> Vec<PathBuf> {
    cgroup_roots()
        .into_iter()
        .map(|r| r.join(rel))
        .filter(|p| p.is_dir())
        .collect()
}

/// Kills every process in the cgroups `rel` (all hierarchies, thawing them first) and removes the
/// cgroup directories. Returns the directories that are still there.
pub fn destroy_cgroups(rel: &str) -> Vec<PathBuf> {
    let dirs = cgroup_dirs(rel);
    if dirs.is_empty() {
        return Vec::new();
    }
    let mut pids = BTreeSet::new();
    for d in &dirs {
        for sub in subdirs_deepest_first(d) {
            let _ = fs::write(sub.join("freezer.state"), "THAWED");
            let _ = fs::write(sub.join("cgroup.freeze"), "0");
            if let Ok(procs) = fs::read_to_string(sub.join("cgroup.procs")) {
                pids.extend(procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
            }
        }
    }
    let pids: Vec<i32> = pids.into_iter().collect();
    kill_and_wait(&pids, Duration::from_secs(5));
    let mut left = Vec::new();
    for d in &dirs {
        for sub in subdirs_deepest_first(d) {
            let ok = poll_until(Duration::from_secs(2), || {
                fs::remove_dir(&sub).is_ok().then_some(())
            })
            .is_some()
                || !sub.exists();
            if !ok {
                left.push(sub);
            }
        }
    }
    left
}

/// Removes `dir` if it exists and is empty (ignores errors).
pub fn remove_if_empty(dir: &Path) {
    let _ = fs::remove_dir(dir);
}

/// Paths at or below `root` having a component equal to `name` (no symlinks followed).
pub fn find_named(root: &Path, name: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    fn walk(d: &Path, name: &str, out: &mut Vec<PathBuf>, depth: usize) {
        if depth > 12 {
            return;
        }
        let Ok(rd) = fs::read_dir(d) else { return };
        for e in rd.flatten() {
            let p = e.path();
            if e.file_name().as_bytes() == name.as_bytes() {
                out.push(p.clone());
            }
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                walk(&p, name, out, depth + 1);
            }
        }
    }
    walk(root, name, &mut out, 0);
    out
}

/// The path of `program` on `PATH` (panics when it is not there: the tests need it).
pub fn which(program: &str) -> String {
    std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .map(|d| Path::new(d).join(program))
        .find(|p| p.is_file())
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| panic!("{program} not on PATH"))
}
