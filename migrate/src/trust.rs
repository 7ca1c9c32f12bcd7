//! What a restore takes from an archive, which is input from outside (a file, an image, a peer
//! on the network). The archive chooses what the container runs, as an image's entrypoint does;
//! it does not choose what acts on this host outside the container. So, before anything is
//! created:
//!
//! - refused unless the operator allows it (`--trust-spec` for all of it; `--allow-bind DIR`,
//!   `--allow-host-network`, `--allow-hooks` one by one): OCI hooks (runc runs them here, as root),
//!   a root other than the bundle's `rootfs`, bind mounts of host paths the operator did not map
//!   or allow, namespaces joined by path or not made (host PID, IPC, UTS, mount; host network
//!   only with `--allow-host-network`), capabilities beyond containerd's default set, device
//!   nodes and device rules beyond the defaults, non-namespaced sysctls, a negative OOM score,
//!   unmasked `/proc` paths;
//! - always replaced: the cgroup (`/<namespace>/<name>` here), `org.criu.*` annotations (runc
//!   hands `org.criu.config` to CRIU), the runtime's options (a `BinaryName` would be run as
//!   runc), labels containerd or its CRI act on (`containerd.io/…`, `io.cri-containerd…`,
//!   `io.kubernetes…`); a runtime or snapshotter name that is not a plain name is refused.

use std::path::{Component, Path, PathBuf};

use anyhow::{bail, Result};

/// containerd's default capability set (oci.WithDefaultSpec).
const DEFAULT_CAPS: [&str; 14] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// Host files a host-network container gets read-only (`ctr run --net-host`).
const HOST_NAME_FILES: [&str; 3] = ["/etc/hosts", "/etc/resolv.conf", "/etc/hostname"];

/// Label prefixes containerd, its restart monitor or its CRI act on.
const ACTED_ON_LABELS: [&str; 4] = [
    "containerd.io/",
    "io.cri-containerd",
    "io.kubernetes.",
    "io.containerd.restart",
];

#[derive(Debug, Clone, Default)]
pub struct Trust {
    pub all: bool,
    pub hooks: bool,
    pub host_network: bool,
    pub binds: Vec<PathBuf>,
}

/// A normalised absolute path (no `.` or `..`), or None.
pub fn plain_abs(p: &Path) -> Option<PathBuf> {
    if !p.is_absolute() {
        return None;
    }
    let mut out = PathBuf::from("/");
    for c in p.components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(n) => out.push(n),
            _ => return None,
        }
    }
    Some(out)
}

/// Whether `p` is one of `dirs` or beneath one (both normalised).
pub fn under(p: &Path, dirs: &[PathBuf]) -> bool {
    plain_abs(p).is_some_and(|p| {
        dirs.iter()
            .filter_map(|d| plain_abs(d))
            .any(|d| p.starts_with(d))
    })
}

/// containerd's identifier rule: `[A-Za-z0-9]+([._-][A-Za-z0-9]+)*`, at most 76 bytes.
pub fn is_identifier(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 76
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || b"._-".contains(c))
        && !b
            .windows(2)
            .any(|w| !w[0].is_ascii_alphanumeric() && !w[1].is_ascii_alphanumeric())
}

fn strs(v: &serde_json::Value) -> Vec<&str> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|x| x.as_str())
        .collect()
}

fn is_bind(m: &serde_json::Value) -> bool {
    m["type"] == "bind"
        || strs(&m["options"])
            .iter()
            .any(|o| *o == "bind" || *o == "rbind")
}

/// Sysctls a container's own namespaces scope (what runc accepts without a host namespace).
fn namespaced_sysctl(k: &str) -> bool {
    k.starts_with("net.")
        || k.starts_with("fs.mqueue.")
        || k.starts_with("kernel.shm")
        || k.starts_with("kernel.msg")
        || k == "kernel.sem"
        || k == "kernel.domainname"
        || k == "kernel.hostname"
}

/// Refuses what of `spec` would act on this host outside the container (see the module doc);
/// `mapped` are the host directories the operator mapped volumes to.
pub fn check_spec(spec: &serde_json::Value, trust: &Trust, mapped: &[PathBuf]) -> Result<()> {
    if trust.all {
        return Ok(());
    }
    let say = |what: String, flag: &str| -> anyhow::Error {
        anyhow::anyhow!(
            "the checkpoint's spec {what}, which would act on this host outside the container; restore with {flag} if you trust the archive"
        )
    };
    let hooks: Vec<String> = spec["hooks"]
        .as_object()
        .into_iter()
        .flatten()
        .flat_map(|(kind, list)| {
            list.as_array()
                .into_iter()
                .flatten()
                .map(move |h| format!("{kind}: {}", h["path"].as_str().unwrap_or("?")))
        })
        .collect();
    if !hooks.is_empty() && !trust.hooks {
        return Err(say(
            format!("asks for OCI hooks ({})", hooks.join(", ")),
            "--allow-hooks",
        ));
    }
    let root = spec["root"]["path"].as_str().unwrap_or("");
    if root != "rootfs" {
        return Err(say(
            format!("has root {root:?}, not the bundle's rootfs"),
            "--trust-spec",
        ));
    }
    for m in spec["mounts"].as_array().into_iter().flatten() {
        if !is_bind(m) {
            continue;
        }
        let dest = m["destination"].as_str().unwrap_or("?");
        let src = m["source"].as_str().unwrap_or("");
        // What `ctr run --net-host` gives a container: the host's name files, read-only.
        let name_file =
            HOST_NAME_FILES.contains(&src) && src == dest && strs(&m["options"]).contains(&"ro");
        if name_file {
            continue;
        }
        let ok = plain_abs(Path::new(src))
            .is_some_and(|s| mapped.contains(&s) || under(&s, &trust.binds));
        if !ok {
            bail!(
                "the checkpoint's spec bind-mounts host path {src:?} at {dest}; map it with --volume {dest}=PATH (--volume-map for migrate) or allow it with --allow-bind DIR"
            );
        }
    }
    let namespaces: Vec<&serde_json::Value> = spec["linux"]["namespaces"]
        .as_array()
        .into_iter()
        .flatten()
        .collect();
    for ns in &namespaces {
        if ns["path"].as_str().is_some_and(|p| !p.is_empty()) {
            return Err(say(
                format!("joins the {} namespace at {}", ns["type"], ns["path"]),
                "--trust-spec",
            ));
        }
    }
    for want in ["pid", "ipc", "uts", "mount", "network"] {
        if namespaces.iter().any(|ns| ns["type"] == want) {
            continue;
        }
        if want == "network" && trust.host_network {
            continue;
        }
        let flag = if want == "network" {
            "--allow-host-network"
        } else {
            "--trust-spec"
        };
        return Err(say(format!("shares this host's {want} namespace"), flag));
    }
    let caps = &spec["process"]["capabilities"];
    for set in [
        "bounding",
        "effective",
        "permitted",
        "inheritable",
        "ambient",
    ] {
        if let Some(extra) = strs(&caps[set])
            .into_iter()
            .find(|c| !DEFAULT_CAPS.contains(c))
        {
            return Err(say(
                format!("grants {extra} (beyond containerd's default capabilities)"),
                "--trust-spec",
            ));
        }
    }
    if spec["linux"]["devices"]
        .as_array()
        .is_some_and(|d| !d.is_empty())
    {
        return Err(say("creates device nodes".into(), "--trust-spec"));
    }
    for rule in spec["linux"]["resources"]["devices"]
        .as_array()
        .into_iter()
        .flatten()
    {
        // containerd's defaults allow character devices by major (pts: 136, any minor); all
        // devices, block devices or any major are the host's.
        let open = rule["allow"] == true && (rule["type"] != "c" || rule["major"].is_null());
        if open {
            return Err(say(format!("allows device access {rule}"), "--trust-spec"));
        }
    }
    if let Some(k) = spec["linux"]["sysctl"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, _)| k)
        .find(|k| !namespaced_sysctl(k))
    {
        return Err(say(
            format!("sets the host-wide sysctl {k}"),
            "--trust-spec",
        ));
    }
    if spec["process"]["oomScoreAdj"]
        .as_i64()
        .is_some_and(|v| v < 0)
    {
        return Err(say("lowers the OOM score below 0".into(), "--trust-spec"));
    }
    let masked = strs(&spec["linux"]["maskedPaths"]);
    if !masked.contains(&"/proc/kcore") {
        return Err(say("leaves /proc/kcore unmasked".into(), "--trust-spec"));
    }
    Ok(())
}

/// The spec's own cgroup and no `org.criu.*` annotations.
pub fn sanitize_spec(spec: &mut serde_json::Value, ns: &str, name: &str) {
    let cg = spec["linux"]["cgroupsPath"].as_str().unwrap_or_default();
    let cg = if cg.contains(':') {
        format!("system.slice:{ns}:{name}")
    } else {
        format!("/{ns}/{name}")
    };
    spec["linux"]["cgroupsPath"] = cg.into();
    if let Some(a) = spec["annotations"].as_object_mut() {
        a.retain(|k, _| !k.starts_with("org.criu."));
    }
}

/// The archive's labels without the ones containerd or its CRI act on.
pub fn labels<'a>(
    labels: impl IntoIterator<Item = (&'a String, &'a String)>,
) -> std::collections::HashMap<String, String> {
    labels
        .into_iter()
        .filter(|(k, _)| !ACTED_ON_LABELS.iter().any(|p| k.starts_with(p)))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// A runtime or snapshotter name from the archive: a plain name, not a path.
pub fn plain_name(what: &str, s: &str) -> Result<()> {
    let ok = !s.is_empty()
        && s.len() <= 128
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
    if !ok {
        bail!("the checkpoint names {what} {s:?}, which is no plain name");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctr_spec() -> serde_json::Value {
        serde_json::json!({
            "root": {"path": "rootfs"},
            "process": {"capabilities": {"bounding": ["CAP_CHOWN", "CAP_KILL"]}},
            "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"}],
            "linux": {
                "namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"},
                               {"type": "mount"}, {"type": "network"}],
                "maskedPaths": ["/proc/kcore"],
                "resources": {"devices": [{"allow": false, "access": "rwm"},
                                          {"allow": true, "type": "c", "major": 1, "minor": 3},
                                          {"allow": true, "type": "c", "major": 136, "access": "rwm"}]},
            },
        })
    }

    fn refused(edit: impl Fn(&mut serde_json::Value), trust: &Trust) -> String {
        let mut s = ctr_spec();
        edit(&mut s);
        check_spec(&s, trust, &[]).unwrap_err().to_string()
    }

    #[test]
    fn a_default_spec_passes_and_each_host_reach_is_refused() {
        let t = Trust::default();
        check_spec(&ctr_spec(), &t, &[]).unwrap();
        type Edit = Box<dyn Fn(&mut serde_json::Value)>;
        let cases: Vec<(Edit, &str)> = vec![
            (
                Box::new(|s| s["hooks"] = serde_json::json!({"prestart": [{"path": "/bin/sh"}]})),
                "hooks",
            ),
            (Box::new(|s| s["root"]["path"] = "/".into()), "root"),
            (
                Box::new(|s| {
                    s["mounts"].as_array_mut().unwrap().push(serde_json::json!(
                {"destination": "/x", "type": "bind", "source": "/etc"}))
                }),
                "/etc",
            ),
            (
                Box::new(|s| s["linux"]["namespaces"][0]["path"] = "/proc/1/ns/pid".into()),
                "joins",
            ),
            (
                Box::new(|s| {
                    s["linux"]["namespaces"].as_array_mut().unwrap().pop();
                }),
                "network",
            ),
            (
                Box::new(|s| s["process"]["capabilities"]["bounding"][0] = "CAP_SYS_ADMIN".into()),
                "CAP_SYS_ADMIN",
            ),
            (
                Box::new(|s| s["linux"]["devices"] = serde_json::json!([{"path": "/dev/sda"}])),
                "device nodes",
            ),
            (
                Box::new(|s| s["linux"]["resources"]["devices"][1]["type"] = "a".into()),
                "device access",
            ),
            (
                Box::new(|s| s["linux"]["sysctl"] = serde_json::json!({"kernel.panic": "1"})),
                "kernel.panic",
            ),
            (
                Box::new(|s| s["process"]["oomScoreAdj"] = (-1000).into()),
                "OOM",
            ),
            (
                Box::new(|s| s["linux"]["maskedPaths"] = serde_json::json!([])),
                "kcore",
            ),
        ];
        for (edit, why) in cases {
            let e = refused(edit, &t);
            assert!(e.contains(why), "{why}: {e}");
        }
        // What the operator allows passes.
        let mut s = ctr_spec();
        s["mounts"].as_array_mut().unwrap().push(serde_json::json!(
            {"destination": "/x", "type": "bind", "source": "/srv/vols/x", "options": ["rbind"]}));
        s["linux"]["namespaces"].as_array_mut().unwrap().pop();
        let ok = Trust {
            host_network: true,
            binds: vec!["/srv/vols".into()],
            ..Default::default()
        };
        check_spec(&s, &ok, &[]).unwrap();
        check_spec(
            &s,
            &Trust {
                host_network: true,
                ..Default::default()
            },
            &["/srv/vols/x".into()],
        )
        .unwrap();
        // The host's name files, read-only, as ctr --net-host gives them; written to, refused.
        let mut n = ctr_spec();
        n["mounts"].as_array_mut().unwrap().push(serde_json::json!(
            {"destination": "/etc/hosts", "type": "bind", "source": "/etc/hosts", "options": ["rbind", "ro"]}));
        check_spec(&n, &Trust::default(), &[]).unwrap();
        n["mounts"][1]["options"] = serde_json::json!(["rbind", "rw"]);
        assert!(check_spec(&n, &Trust::default(), &[]).is_err());
        // `..` does not climb out of an allowed directory.
        s["mounts"][1]["source"] = "/srv/vols/../../etc".into();
        assert!(check_spec(&s, &ok, &[]).is_err());
    }

    #[test]
    fn names_labels_and_annotations() {
        for good in ["a", "web-1", "a.b_c"] {
            assert!(is_identifier(good), "{good}");
        }
        for bad in ["", ".", "..", "-a", "a-", "a..b", "a/b", &"x".repeat(77)] {
            assert!(!is_identifier(bad), "{bad}");
        }
        let l = [
            ("app".to_string(), "x".to_string()),
            (
                "containerd.io/restart.loguri".to_string(),
                "binary:///bin/sh".to_string(),
            ),
            ("io.kubernetes.pod.name".to_string(), "p".to_string()),
        ];
        let kept = labels(l.iter().map(|(k, v)| (k, v)));
        assert_eq!(kept.len(), 1);
        let mut s = serde_json::json!({"linux": {"cgroupsPath": "/elsewhere/x"},
            "annotations": {"org.criu.config": "/tmp/x", "keep": "1"}});
        sanitize_spec(&mut s, "ns", "n");
        assert_eq!(s["linux"]["cgroupsPath"], "/ns/n");
        assert_eq!(s["annotations"], serde_json::json!({"keep": "1"}));
        assert!(plain_name("runtime", "/usr/bin/evil").is_err());
        plain_name("runtime", "io.containerd.custom.v2").unwrap();
    }
}
