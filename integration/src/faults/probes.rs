//! What the host shows of containers, shims and daemons: freezer state, counters, open fds, RSS,
//! zombies, CRIU helpers, leftover work dirs.

use std::fs;
use std::path::{Path, PathBuf};

use super::T;
use crate::host;
use crate::poll::poll;
use crate::Containerd;

/// `freezer.state` of container `id` (v1 freezer: `/sys/fs/cgroup/freezer/<ns>/<id>`); None
/// when the cgroup is gone.
pub fn freezer_state(cd: &Containerd, id: &str) -> Option<String> {
    fs::read_to_string(format!(
        "/sys/fs/cgroup/freezer/{}/freezer.state",
        cd.cgroup_rel(id)
    ))
    .ok()
    .map(|s| s.trim().to_string())
}

/// The value of a [`COUNTER`] in the container of `pid`.
pub fn count(pid: u32) -> Option<u64> {
    crate::read_in_container(pid, "/count")?.trim().parse().ok()
}

/// Waits until the counter of `pid` moves past the value it has now; returns the new value.
pub fn wait_count_advances(pid: u32, what: &str) -> u64 {
    let now = poll(format!("{what}: a counter value in pid {pid}"), T, || {
        count(pid)
    });
    poll(
        format!("{what}: counter of pid {pid} to move past {now}"),
        T,
        || count(pid).filter(|c| *c > now),
    )
}

/// Number of open fds of `pid`.
pub fn fd_count(pid: i32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|rd| rd.count())
        .unwrap_or(0)
}

/// Resident set size of `pid` in KiB.
pub fn rss_kib(pid: i32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

/// (state, ppid) of `pid` from /proc/<pid>/stat.
pub fn state_and_ppid(pid: i32) -> Option<(char, i32)> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    let mut f = rest.split_whitespace();
    let state = f.next()?.chars().next()?;
    let ppid = f.next()?.parse().ok()?;
    Some((state, ppid))
}

/// Zombie processes whose parent is one of `parents`.
pub fn zombies_of(parents: &[i32]) -> Vec<i32> {
    let Ok(rd) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| matches!(state_and_ppid(*pid), Some(('Z', pp)) if parents.contains(&pp)))
        .collect()
}

/// Live descendants of `pid` whose command line (argv joined by spaces) starts with `prefix`
/// (CRIU retitles itself: `criu: dump --rpc -t <pid> -D <dir>` while dumping). One scan of
/// /proc/*/stat, then the tree in memory.
pub fn descendants_with_cmdline(pid: i32, prefix: &str) -> Vec<i32> {
    let Ok(rd) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let parent: Vec<(i32, i32)> = rd
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|p| Some((p, state_and_ppid(p)?.1)))
        .collect();
    let mut found = Vec::new();
    let mut level = vec![pid];
    for _ in 0..6 {
        let next: Vec<i32> = parent
            .iter()
            .filter(|(_, pp)| level.contains(pp))
            .map(|(p, _)| *p)
            .collect();
        for &p in &next {
            let argv = fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
            let line = String::from_utf8_lossy(&argv).replace('\0', " ");
            if line.starts_with(prefix) && host::alive(p) {
                found.push(p);
            }
        }
        if next.is_empty() {
            break;
        }
        level = next;
    }
    found
}

/// Entries of `dir` whose name starts with `prefix`.
pub fn entries_starting_with(dir: &Path, prefix: &str) -> Vec<PathBuf> {
    fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

/// Names in `dir`, sorted.
pub fn list_dir(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}
