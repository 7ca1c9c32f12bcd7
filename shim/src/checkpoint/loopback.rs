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
//! script: the shim binary itself ([`run_action`]), named in a CRIU config
//! file that runc hands to CRIU (the `org.criu.config` annotation). The
//! config keeps what the user's own CRIU config says (their annotation, or
//! runc's default `/etc/criu/runc.conf`), and the bundle's `config.json` is
//! put back as it was once runc is done.
//!
//! A namespace the container joins by path (a CNI-made one, a pod's) is
//! external to the checkpoint: whoever made it configured it.

use std::{
    fs,
    path::{Path, PathBuf},
};

use log::{info, warn};

use crate::error::{Error, Result};

/// The annotation runc reads its CRIU config file from.
const CRIU_CONFIG_ANNOTATION: &str = "org.criu.config";
/// runc's CRIU config when the annotation is absent.
const RUNC_DEFAULT_CRIU_CONFIG: &str = "/etc/criu/runc.conf";
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

/// The bundle's `config.json` as it was before [`install`], written back on
/// drop.
pub struct Installed {
    config: PathBuf,
    original: Vec<u8>,
    ours: PathBuf,
}

impl Drop for Installed {
    fn drop(&mut self) {
        if let Err(e) = write_atomically(&self.config, &self.original) {
            warn!("put back {}: {e}", self.config.display());
        }
        let _ = fs::remove_file(&self.ours);
    }
}

/// Points runc's restore in `bundle` at a CRIU config that runs this shim as
/// the action script, if the container has a network namespace of its own.
/// None when there is nothing to do.
pub fn install(bundle: &Path) -> Result<Option<Installed>> {
    let config = bundle.join("config.json");
    let original = fs::read(&config).map_err(Error::io(format!("read {}", config.display())))?;
    let mut spec: serde_json::Value = serde_json::from_slice(&original)
        .map_err(Error::json(format!("parse {}", config.display())))?;
    if !own_network_namespace(&spec) {
        return Ok(None);
    }
    let shim = std::env::current_exe().map_err(Error::io("find the shim binary"))?;
    let users = spec["annotations"][CRIU_CONFIG_ANNOTATION]
        .as_str()
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(RUNC_DEFAULT_CRIU_CONFIG));
    let mut text = match fs::read_to_string(&users) {
        Ok(t) => format!("# from {}\n{t}\n", users.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => {
            return Err(Error::io(format!("read CRIU config {}", users.display()))(
                e,
            ));
        }
    };
    text.push_str(&format!(
        "# containerd-shim-custom-v2: bring lo up in the restored network namespace\naction-script {}\n",
        quote(&shim.to_string_lossy())
    ));
    let ours = bundle.join(RESTORE_CRIU_CONFIG);
    write_atomically(&ours, text.as_bytes())?;
    let Some(obj) = spec.as_object_mut() else {
        return Err(Error::InvalidArgument(format!(
            "{} is not a JSON object",
            config.display()
        )));
    };
    let annotations = obj
        .entry("annotations")
        .or_insert_with(|| serde_json::json!({}));
    if let Some(a) = annotations.as_object_mut() {
        a.insert(
            CRIU_CONFIG_ANNOTATION.into(),
            ours.to_string_lossy().into_owned().into(),
        );
    }
    let bytes = serde_json::to_vec(&spec).map_err(Error::json("encode config.json"))?;
    write_atomically(&config, &bytes)?;
    Ok(Some(Installed {
        config,
        original,
        ours,
    }))
}

/// A CRIU config value in quotes, its quotes and backslashes escaped.
fn quote(v: &str) -> String {
    format!("\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\""))
}

fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp-custom-shim");
    fs::write(&tmp, bytes)
        .and_then(|_| fs::rename(&tmp, path))
        .map_err(|e| {
            let _ = fs::remove_file(&tmp);
            Error::io(format!("write {}", path.display()))(e)
        })
}

/// Whether this process was started by CRIU as an action script.
pub fn is_action() -> bool {
    std::env::var_os("CRTOOLS_SCRIPT_ACTION").is_some()
}

/// The action script: at `setup-namespaces`, `lo` up in the network
/// namespace of the restored init (`CRTOOLS_INIT_PID`); every other action
/// has nothing to do. Returns the exit code.
pub fn run_action() -> i32 {
    let action = std::env::var("CRTOOLS_SCRIPT_ACTION").unwrap_or_default();
    if action != "setup-namespaces" {
        return 0;
    }
    let pid = std::env::var("CRTOOLS_INIT_PID").unwrap_or_default();
    match loopback_up(&pid) {
        Ok(()) => {
            info!("lo up in the network namespace of {pid}");
            0
        }
        Err(e) => {
            eprintln!("containerd-shim-custom-v2: bring lo up in the restored container: {e}");
            1
        }
    }
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
    fn the_users_criu_config_is_kept_and_config_json_put_back() {
        let dir = tempfile::tempdir().unwrap();
        let users = dir.path().join("user.conf");
        fs::write(&users, "tcp-close\n").unwrap();
        let original = serde_json::json!({
            "linux": {"namespaces": [{"type": "network"}]},
            "annotations": {"org.criu.config": users.to_str().unwrap()},
        })
        .to_string();
        let config = dir.path().join("config.json");
        fs::write(&config, &original).unwrap();
        let installed = install(dir.path()).unwrap().expect("installed");
        let now: serde_json::Value = serde_json::from_slice(&fs::read(&config).unwrap()).unwrap();
        let ours = dir.path().join(RESTORE_CRIU_CONFIG);
        assert_eq!(
            now["annotations"]["org.criu.config"],
            ours.to_str().unwrap()
        );
        let text = fs::read_to_string(&ours).unwrap();
        assert!(text.contains("tcp-close\n"), "{text}");
        assert!(text.contains("action-script \"/"), "{text}");
        drop(installed);
        assert_eq!(fs::read_to_string(&config).unwrap(), original);
        assert!(!ours.exists());
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
