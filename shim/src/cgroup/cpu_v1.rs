//! CPU figures of a cgroup v1 container, as containerd's Go shim reports
//! them (`io.containerd.cgroups.v1.Metrics`): usage from `cpuacct`,
//! throttling from `cpu`. containerd-shim's v1 collector reads neither, and
//! the CRI's ContainerStats (the kubelet's CPU figures) comes from here.

use std::path::Path;

use containerd_shim_protos::cgroups::metrics::{CPUStat, CPUUsage, Throttle};

/// Reads `cpuacct.usage`, `cpuacct.usage_percpu` and `cpuacct.stat` under
/// `cpuacct`, and `cpu.stat` under `cpu`. Files that cannot be read leave
/// their figures at zero (a controller not mounted, a cgroup gone).
pub fn stat(cpuacct: Option<&Path>, cpu: Option<&Path>) -> CPUStat {
    let read = |dir: Option<&Path>, name: &str| {
        dir.and_then(|d| std::fs::read_to_string(d.join(name)).ok())
            .unwrap_or_default()
    };
    let mut usage = CPUUsage::new();
    usage.total = read(cpuacct, "cpuacct.usage").trim().parse().unwrap_or(0);
    usage.per_cpu = read(cpuacct, "cpuacct.usage_percpu")
        .split_whitespace()
        .filter_map(|v| v.parse().ok())
        .collect();
    // In USER_HZ ticks.
    let ns_per_tick = match nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK) {
        Ok(Some(hz)) if hz > 0 => 1_000_000_000 / hz as u64,
        _ => 10_000_000,
    };
    for (key, value) in pairs(&read(cpuacct, "cpuacct.stat")) {
        match key {
            "user" => usage.user = value.saturating_mul(ns_per_tick),
            "system" => usage.kernel = value.saturating_mul(ns_per_tick),
            _ => {}
        }
    }
    let mut throttling = Throttle::new();
    for (key, value) in pairs(&read(cpu, "cpu.stat")) {
        match key {
            "nr_periods" => throttling.periods = value,
            "nr_throttled" => throttling.throttled_periods = value,
            "throttled_time" => throttling.throttled_time = value,
            _ => {}
        }
    }
    let mut stat = CPUStat::new();
    stat.usage = Some(usage).into();
    stat.throttling = Some(throttling).into();
    stat
}

fn pairs(text: &str) -> impl Iterator<Item = (&str, u64)> {
    text.lines().filter_map(|l| {
        let (k, v) = l.split_once(' ')?;
        Some((k, v.trim().parse().ok()?))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_and_throttling_are_read_from_their_controllers() {
        let dir = tempfile::tempdir().unwrap();
        let (acct, cpu) = (dir.path().join("cpuacct"), dir.path().join("cpu"));
        std::fs::create_dir_all(&acct).unwrap();
        std::fs::create_dir_all(&cpu).unwrap();
        std::fs::write(acct.join("cpuacct.usage"), "123456789\n").unwrap();
        std::fs::write(acct.join("cpuacct.usage_percpu"), "100 200 \n").unwrap();
        std::fs::write(acct.join("cpuacct.stat"), "user 3\nsystem 4\n").unwrap();
        std::fs::write(
            cpu.join("cpu.stat"),
            "nr_periods 10\nnr_throttled 2\nthrottled_time 5000\n",
        )
        .unwrap();
        let s = stat(Some(&acct), Some(&cpu));
        let tick = 1_000_000_000
            / nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
                .unwrap()
                .unwrap() as u64;
        assert_eq!(s.usage.total, 123456789);
        assert_eq!(s.usage.per_cpu, vec![100, 200]);
        assert_eq!((s.usage.user, s.usage.kernel), (3 * tick, 4 * tick));
        assert_eq!(
            (
                s.throttling.periods,
                s.throttling.throttled_periods,
                s.throttling.throttled_time
            ),
            (10, 2, 5000)
        );
        // Nothing to read: zeros, no error.
        assert_eq!(stat(None, None).usage.total, 0);
    }
}
