//! Network namespaces for tests that need hosts of their own (`ip netns`, iproute2): created with
//! a unique name, deleted on drop.

use std::process::Command;
use std::time::Duration;

use crate::process::run_with_timeout;
use crate::show;

/// A named network namespace (`/run/netns/<name>`), its `lo` up.
pub struct NetNs {
    name: String,
}

fn ip(args: &[&str]) -> Result<String, String> {
    let mut c = Command::new(crate::host::which("ip"));
    c.args(args);
    let out = run_with_timeout(&mut c, None, Duration::from_secs(30))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!("ip {}: {}", args.join(" "), show(&out)))
    }
}

impl NetNs {
    /// `ip netns add <prefix>-<pid>-<n>`, with `lo` up.
    pub fn add(prefix: &str) -> NetNs {
        let name = format!("{prefix}-{}-{}", std::process::id(), crate::unique());
        ip(&["netns", "add", &name]).unwrap_or_else(|e| panic!("{e}"));
        let ns = NetNs { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its path, for a spec's network namespace or `ctr run --with-ns network:PATH`.
    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// `ip -n <name> ARGS`, which must succeed; returns stdout.
    pub fn ip(&self, args: &[&str]) -> String {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        ip(&all).unwrap_or_else(|e| panic!("{e}"))
    }

    /// A command run inside this namespace (`ip netns exec`).
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new(crate::host::which("ip"));
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// A veth pair between `self` and `peer`, each end up with its address (`10.x.y.z/24`).
    pub fn veth_to(&self, addr: &str, peer: &NetNs, peer_addr: &str) {
        let n = crate::unique();
        let (a, b) = (format!("st{n}a"), format!("st{n}b"));
        ip(&[
            "link", "add", &a, "netns", &self.name, "type", "veth", "peer", "name", &b, "netns",
            &peer.name,
        ])
        .unwrap_or_else(|e| panic!("{e}"));
        self.ip(&["addr", "add", addr, "dev", &a]);
        self.ip(&["link", "set", &a, "up"]);
        peer.ip(&["addr", "add", peer_addr, "dev", &b]);
        peer.ip(&["link", "set", &b, "up"]);
    }
}

/// Runs `f` on a thread of its own that has joined network namespace `path` (sockets it makes
/// live there; the test's other threads stay where they are).
pub fn in_netns<T: Send + 'static>(
    path: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, String> {
    let path = path.to_string();
    std::thread::spawn(move || {
        use std::os::fd::AsRawFd;
        let ns = std::fs::File::open(&path).map_err(|e| format!("open {path}: {e}"))?;
        // SAFETY: a valid fd of a network namespace; it moves only this thread.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(format!("setns {path}: {}", std::io::Error::last_os_error()));
        }
        Ok(f())
    })
    .join()
    .map_err(|_| "thread in the network namespace panicked".to_string())?
}

/// Whether the process `pid` sees a TCP socket listening on `port` in its network namespace
/// (its `/proc/<pid>/net/tcp` and `tcp6`): a check that, unlike a probe connection, the listener
/// never sees.
pub fn listening(pid: u32, port: u16) -> bool {
    let want = format!(":{port:04X} ");
    let table = |f: &str| std::fs::read_to_string(format!("/proc/{pid}/net/{f}")).ok();
    table("tcp")
        .into_iter()
        .chain(table("tcp6"))
        .flat_map(|t| t.lines().map(str::to_string).collect::<Vec<_>>())
        .any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && format!("{} ", f[1]).ends_with(&want) && f[3] == "0A"
        })
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            eprintln!("{e}");
        }
    }
}
