//! Where a process's cgroups are, and the freezer the checkpoint bracket holds.

pub mod cpu_v1;
pub mod freezer;
pub mod oom;

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
pub use freezer::{FreezeGuard, Freezer};

/// A container's cgroups, as runc recorded them when it made the container
/// (`cgroup_paths` in its `state.json`): the container's own cgroup, not the
/// leaf its init happens to sit in, so that freezing it covers the whole
/// subtree (a workload with sub-cgroups: systemd, nested runtimes).
/// Freeze, OOM and crash cleanup all ask this one resolver.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerCgroup {
    pub freezer: Freezer,
    /// The v1 memory cgroup, on hosts where runc uses v1.
    pub memory_v1: Option<PathBuf>,
    /// The v2 cgroup, on hosts where runc uses cgroup v2 alone.
    pub v2: Option<PathBuf>,
    /// Every v1 controller's cgroup, by controller name (for the metrics).
    pub v1: std::collections::BTreeMap<String, PathBuf>,
}

impl ContainerCgroup {
    /// The container's cgroup as containerd-shim's metrics collectors take it.
    pub fn for_metrics(&self) -> Result<cgroups_rs::fs::Cgroup> {
        use cgroups_rs::fs::{hierarchies, Cgroup};
        let hier = hierarchies::auto();
        if let Some(dir) = &self.v2 {
            let rel = dir.strip_prefix(hier.root()).map_err(|_| {
                Error::Internal(format!(
                    "cgroup {} is not under the cgroup2 mount {}",
                    dir.display(),
                    hier.root().display()
                ))
            })?;
            return Ok(Cgroup::load(hier, rel));
        }
        let mountinfo =
            std::fs::read_to_string("/proc/self/mountinfo").map_err(Error::io("read mountinfo"))?;
        let mut relative = std::collections::HashMap::new();
        for (controller, abs) in &self.v1 {
            if let Some(rel) = v1_mount(&mountinfo, controller).and_then(|m| {
                abs.strip_prefix(m)
                    .ok()
                    .map(|r| format!("/{}", r.display()))
            }) {
                relative.insert(controller.clone(), rel);
            }
        }
        Ok(Cgroup::load_with_relative_paths(
            hier,
            Path::new("."),
            relative,
        ))
    }
}

/// The cgroups of container `id` in runc's state under `runc_root`.
pub fn of_container(runc_root: &Path, id: &str) -> Result<ContainerCgroup> {
    let state = runc_root.join(id).join("state.json");
    let bytes = std::fs::read(&state).map_err(Error::io(format!("read {}", state.display())))?;
    from_runc_state(&bytes).ok_or_else(|| {
        Error::FailedPrecondition(format!(
            "runc's state {} names no freezer cgroup for container {id}",
            state.display()
        ))
    })
}

fn from_runc_state(bytes: &[u8]) -> Option<ContainerCgroup> {
    let state: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    let paths = state.get("cgroup_paths")?;
    let path = |k: &str| {
        paths
            .get(k)
            .and_then(|v| v.as_str())
            .filter(|p| !p.is_empty())
            .map(PathBuf::from)
    };
    let unified = path("");
    if let Some(freezer) = path("freezer") {
        let v1 = paths
            .as_object()?
            .iter()
            .filter(|(k, _)| !k.is_empty())
            .filter_map(|(k, v)| Some((k.clone(), PathBuf::from(v.as_str()?))))
            .collect();
        return Some(ContainerCgroup {
            freezer: Freezer::V1(freezer),
            memory_v1: path("memory"),
            v2: None,
            v1,
        });
    }
    let v2 = unified?;
    Some(ContainerCgroup {
        freezer: Freezer::V2(v2.clone()),
        memory_v1: None,
        v2: Some(v2),
        v1: Default::default(),
    })
}

/// The freezer of the cgroup `pid` is in: v1's freezer controller when it is
/// mounted (runc puts containers there on hybrid hosts), else cgroup v2.
pub fn freezer_of(pid: i32) -> Result<Freezer> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .map_err(Error::io(format!("read cgroups of pid {pid}")))?;
    let mounts =
        std::fs::read_to_string("/proc/self/mountinfo").map_err(Error::io("read mountinfo"))?;
    freezer_from(&text, &mounts)
        .ok_or_else(|| Error::FailedPrecondition(format!("no freezer cgroup found for pid {pid}")))
}

fn freezer_from(proc_cgroup: &str, mountinfo: &str) -> Option<Freezer> {
    let mut v2 = None;
    for line in proc_cgroup.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let rel = path.trim_start_matches('/');
        if controllers.split(',').any(|c| c == "freezer") {
            let mount = v1_mount(mountinfo, "freezer")?;
            return Some(Freezer::V1(mount.join(rel)));
        }
        if controllers.is_empty() {
            v2 = Some(rel.to_string());
        }
    }
    let rel = v2?;
    Some(Freezer::V2(cgroup2_mount_in(mountinfo)?.join(rel)))
}

/// The v1 hierarchy that carries `controller`, from mountinfo.
fn v1_mount(mountinfo: &str, controller: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|l| {
        let (pre, post) = l.split_once(" - ")?;
        let mut post = post.split_whitespace();
        if post.next()? != "cgroup" {
            return None;
        }
        let super_opts = post.nth(1)?;
        super_opts
            .split(',')
            .any(|o| o == controller)
            .then(|| PathBuf::from(pre.split_whitespace().nth(4).unwrap_or_default()))
    })
}

fn cgroup2_mount_in(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|l| {
        let (pre, post) = l.split_once(" - ")?;
        (post.split_whitespace().next()? == "cgroup2")
            .then(|| PathBuf::from(pre.split_whitespace().nth(4).unwrap_or_default()))
    })
}

/// Where cgroup2 is mounted on this host, if it is.
#[cfg(test)]
pub fn cgroup2_mount() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    cgroup2_mount_in(&mounts)
}

/// The v2 cgroup directory of `pid` when the host runs cgroup v2 alone
/// (on a hybrid host runc puts containers in v1, and OOMs are watched there).
pub fn v2_dir_of(pid: i32) -> Option<PathBuf> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    match freezer_from(&text, &mounts)? {
        Freezer::V2(dir) if dir.join("memory.events").exists() => Some(dir),
        _ => None,
    }
}

/// The v1 memory cgroup directory of `pid`, for OOM notifications.
pub fn v1_memory_of(pid: i32) -> Option<PathBuf> {
    v1_of(pid, "memory")
}

/// The v1 cgroup of `controller` that process `pid` is in.
pub fn v1_of(pid: i32, controller: &str) -> Option<PathBuf> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let rel = text.lines().find_map(|l| {
        let mut parts = l.splitn(3, ':');
        let (_, c, p) = (parts.next()?, parts.next()?, parts.next()?);
        c.split(',')
            .any(|c| c == controller)
            .then(|| p.trim_start_matches('/').to_string())
    })?;
    Some(v1_mount(&mounts, controller)?.join(rel))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
37 31 0:34 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    #[test]
    fn runc_state_names_the_container_cgroup() {
        let hybrid = br#"{"id":"c1","cgroup_paths":{"freezer":"/sys/fs/cgroup/freezer/default/c1",
            "memory":"/sys/fs/cgroup/memory/default/c1","":"/sys/fs/cgroup/unified/default/c1"}}"#;
        let cg = from_runc_state(hybrid).unwrap();
        assert_eq!(
            cg.freezer,
            Freezer::V1("/sys/fs/cgroup/freezer/default/c1".into())
        );
        assert_eq!(
            cg.memory_v1,
            Some(PathBuf::from("/sys/fs/cgroup/memory/default/c1"))
        );
        assert_eq!(cg.v1.len(), 2, "every v1 controller: {:?}", cg.v1);
        let unified = br#"{"cgroup_paths":{"":"/sys/fs/cgroup/k8s/pod/c1"}}"#;
        let cg = from_runc_state(unified).unwrap();
        assert_eq!(cg.freezer, Freezer::V2("/sys/fs/cgroup/k8s/pod/c1".into()));
        assert_eq!(cg.v2, Some(PathBuf::from("/sys/fs/cgroup/k8s/pod/c1")));
        assert_eq!(from_runc_state(br#"{"cgroup_paths":{}}"#), None);
        assert_eq!(from_runc_state(b"not json"), None);
    }

    #[test]
    fn hybrid_host_uses_v1_freezer() {
        let cg = "6:freezer:/default/c1\n4:memory:/default/c1\n0::/\n";
        assert_eq!(
            freezer_from(cg, MOUNTINFO),
            Some(Freezer::V1("/sys/fs/cgroup/freezer/default/c1".into()))
        );
    }

    #[test]
    fn unified_host_uses_v2() {
        let cg = "0::/default/c1\n";
        let mi = "41 31 0:38 / /sys/fs/cgroup rw,relatime - cgroup2 cgroup2 rw\n";
        assert_eq!(
            freezer_from(cg, mi),
            Some(Freezer::V2("/sys/fs/cgroup/default/c1".into()))
        );
        assert_eq!(
            freezer_from("0::/x\n", MOUNTINFO),
            Some(Freezer::V2("/sys/fs/cgroup/unified/x".into()))
        );
    }
}
