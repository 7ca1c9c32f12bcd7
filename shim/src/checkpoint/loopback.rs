//! The loopback of a restored container.
//!
//! runc leaves network namespaces to the runtime: it checkpoints with CRIU's
//! `--empty-ns net`, so CRIU saves nothing of a namespace runc made for the
//! container, and at restore it makes a new one whose `lo` is down. runc's
//! own start brings `lo` up; its restore does not. So every socket on
//! 127.0.0.1 fails: an established connection cannot be restored ("Can't
//! connect inet socket back: Network is unreachable"), and a restored server
//! cannot be reached from inside its own container.
//!
//! The shim brings `lo` up in CRIU's `setup-namespaces` step, after the
//! namespace exists and before any socket is restored, through a CRIU action
//! script: the shim binary itself ([`run_action`]). It is named in a CRIU
//! config file for that one restore, handed to CRIU in its environment
//! (`CRIU_CONFIG_FILE`, which `criu swrk` reads at start): the bundle is not
//! touched, and runc still passes the user's own CRIU config (the
//! `org.criu.config` annotation, or `/etc/criu/runc.conf`), which CRIU reads
//! as well. The script is named `/proc/<shim pid>/exe`: no quoting, and the
//! running binary even after an upgrade replaced the file.
//!
//! A namespace the container joins by path (a CNI-made one, a pod's) is
//! external to the checkpoint: whoever made it configured it.

use std::{
    fs,
    path::{Path, PathBuf},
};

use crate::error::{Error, Result};

/// The config the shim writes for a restore, in the bundle.
const RESTORE_CRIU_CONFIG: &str = "criu-restore.conf";

/// Whether runc makes the container's network namespace itself (a "network"
/// entry without a path): then CRIU restores into an empty one.
pub fn own_network_namespace(spec: &serde_json::Value) -> bool {
    spec["linux"]["namespaces"].as_array().is_some_and(|nss| {
        nss.iter().any(|ns| {
            ns["type"].as_str() == Some("network")
                && ns["path"].as_str().map(str::is_empty).unwrap_or(true)
        })
    })
}

/// The CRIU config of one restore, removed on drop.
pub struct Installed {
    path: PathBuf,
}

impl Installed {
    /// For `CRIU_CONFIG_FILE` in runc's environment.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Installed {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// Writes the CRIU config of a restore in `bundle` if the container's spec
/// gives it a network namespace of its own; None when there is nothing to do.
/// A `CRIU_CONFIG_FILE` the shim itself was started with comes first in it.
pub fn install(bundle: &Path) -> Result<Option<Installed>> {
    let config = bundle.join("config.json");
    let bytes = fs::read(&config).map_err(Error::io(format!("read {}", config.display())))?;
    let spec: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(Error::json(format!("parse {}", config.display())))?;
    if !own_network_namespace(&spec) {
        return Ok(None);
    }
    let path = bundle.join(RESTORE_CRIU_CONFIG);
    super::criu_conf::write(
        &path,
        &format!(
            "# containerd-shim-custom-v2: bring lo up in the restored network namespace\naction-script /proc/{}/exe\n",
            std::process::id()
        ),
    )?;
    Ok(Some(Installed { path }))
}

/// Whether this process was started by CRIU as an action script: CRIU runs
/// it with no arguments and `CRTOOLS_SCRIPT_ACTION` set; containerd always
/// passes flags.
pub fn is_action() -> bool {
    std::env::var_os("CRTOOLS_SCRIPT_ACTION").is_some() && std::env::args_os().len() == 1
}

/// The action script: at `setup-namespaces`, `lo` up in the network
/// namespace of the restored init (`CRTOOLS_INIT_PID`); every other action
/// has nothing to do. Returns the exit code: 0 even when `lo` could not come
/// up, so that a container with no socket on it still restores; the line in
/// CRIU's log (its stderr) then names the cause of a socket that fails.
pub fn run_action() -> i32 {
    let action = std::env::var("CRTOOLS_SCRIPT_ACTION").unwrap_or_default();
    // A dump whose rootfs diff the shim captures in CRIU's stop (`criu_stop`): it may begin at
    // `network-lock`, and is answered at `post-dump`.
    if action == "network-lock" {
        if let Ok(socket) = std::env::var(super::criu_stop::SOCKET_ENV) {
            return super::criu_stop::run_action(&socket, &action);
        }
    }
    if action == "post-dump" {
        if let Ok(socket) = std::env::var(super::criu_stop::SOCKET_ENV) {
            return super::criu_stop::run_action(&socket, &action);
        }
        // Configured as the script of a dump, but without the shim's socket: the files cannot
        // be taken, and CRIU must not go on as if they were.
        eprintln!(
            "Error (containerd-shim-custom-v2): post-dump without {}: the rootfs changes cannot be captured",
            super::criu_stop::SOCKET_ENV
        );
        return 1;
    }
    if action != "setup-namespaces" {
        return 0;
    }
    let pid = std::env::var("CRTOOLS_INIT_PID").unwrap_or_default();
    if let Err(e) = loopback_up(&pid) {
        eprintln!("Error (containerd-shim-custom-v2): lo could not come up in the restored network namespace: {e}");
    }
    0
}

fn loopback_up(pid: &str) -> std::result::Result<(), String> {
    use nix::sched::{setns, CloneFlags};
    let pid: u32 = pid
        .parse()
        .map_err(|_| format!("CRTOOLS_INIT_PID {pid:?} is not a pid"))?;
    let ns = fs::File::open(format!("/proc/{pid}/ns/net"))
        .map_err(|e| format!("open /proc/{pid}/ns/net: {e}"))?;
    setns(&ns, CloneFlags::CLONE_NEWNET).map_err(|e| format!("setns: {e}"))?;
    set_up("lo")
}

/// SIOCGIFFLAGS / SIOCSIFFLAGS with IFF_UP on interface `name`.
fn set_up(name: &str) -> std::result::Result<(), String> {
    // SAFETY: a plain socket, closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(format!("socket: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: ifreq is plain data; the name is shorter than IFNAMSIZ.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    // SAFETY: fd is ours, req is a valid ifreq for these ioctls.
    let r = unsafe {
        if libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut req) < 0 {
            -1
        } else {
            req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            libc::ioctl(fd, libc::SIOCSIFFLAGS, &req)
        }
    };
    let err = std::io::Error::last_os_error();
    // SAFETY: closing our own fd.
    unsafe { libc::close(fd) };
    if r < 0 {
        return Err(format!("{name} up: {err}"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(ns: serde_json::Value) -> serde_json::Value {
        serde_json::json!({"linux": {"namespaces": ns}})
    }

    #[test]
    fn only_a_namespace_runc_makes_needs_it() {
        assert!(own_network_namespace(&spec(
            serde_json::json!([{"type": "network"}])
        )));
        assert!(own_network_namespace(&spec(
            serde_json::json!([{"type": "network", "path": ""}])
        )));
        assert!(!own_network_namespace(&spec(
            serde_json::json!([{"type": "network", "path": "/run/netns/cni-1"}])
        )));
        // The host's network.
        assert!(!own_network_namespace(&spec(
            serde_json::json!([{"type": "pid"}])
        )));
    }

    #[test]
    fn a_config_naming_the_running_shim_and_nothing_else_touched() {
        let dir = tempfile::tempdir().unwrap();
        let original = serde_json::json!({
            "linux": {"namespaces": [{"type": "network"}]},
            "annotations": {"org.criu.config": "/etc/criu/mine.conf"},
        })
        .to_string();
        let config = dir.path().join("config.json");
        fs::write(&config, &original).unwrap();
        let installed = install(dir.path()).unwrap().expect("installed");
        let text = fs::read_to_string(installed.path()).unwrap();
        assert!(
            text.contains(&format!("action-script /proc/{}/exe\n", std::process::id())),
            "{text}"
        );
        // The bundle is as containerd wrote it: runc passes the user's config as ever.
        assert_eq!(fs::read_to_string(&config).unwrap(), original);
        let path = installed.path().to_path_buf();
        drop(installed);
        assert!(!path.exists());
    }

    #[test]
    fn nothing_for_a_joined_namespace() {
        let dir = tempfile::tempdir().unwrap();
        let original =
            serde_json::json!({"linux": {"namespaces": [{"type": "network", "path": "/x"}]}});
        fs::write(dir.path().join("config.json"), original.to_string()).unwrap();
        assert!(install(dir.path()).unwrap().is_none());
        assert!(!dir.path().join(RESTORE_CRIU_CONFIG).exists());
    }

    #[test]
    fn lo_comes_up_in_a_new_network_namespace() {
        fn lo_is_up() -> bool {
            // SAFETY: as in set_up.
            let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
            for (dst, src) in req.ifr_name.iter_mut().zip("lo".bytes()) {
                *dst = src as libc::c_char;
            }
            let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
            assert!(fd >= 0);
            assert!(unsafe { libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut req) } >= 0);
            unsafe { libc::close(fd) };
            (unsafe { req.ifr_ifru.ifru_flags } & libc::IFF_UP as libc::c_short) != 0
        }
        // A thread of its own: the new namespace goes with it. Needs root, as `make test` does.
        let (before, after) = std::thread::spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
                .expect("a new network namespace (run the unit tests as root)");
            let before = lo_is_up();
            set_up("lo").unwrap();
            (before, lo_is_up())
        })
        .join()
        .unwrap();
        assert!(!before && after, "lo down in a new namespace, then up");
    }
}
