//! The CRIU config files the shim hands to runc's CRIU (`CRIU_CONFIG_FILE`, which `criu swrk`
//! reads at start): a config the shim itself was started with comes first in them, then the
//! shim's own lines. runc still passes the user's CRIU config (`/etc/criu/runc.conf` or the
//! `org.criu.config` annotation), which CRIU reads after these and which wins over them.

use std::path::{Path, PathBuf};

/// The text of a config the shim writes: the one in the shim's own `CRIU_CONFIG_FILE`, if
/// any, then `ours`.
pub fn with_inherited(ours: &str) -> std::io::Result<String> {
    let mut text = match std::env::var_os("CRIU_CONFIG_FILE") {
        Some(path) => std::fs::read_to_string(&path).map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("read CRIU_CONFIG_FILE {}: {e}", Path::new(&path).display()),
            )
        })?,
        None => String::new(),
    };
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    text.push_str(ours);
    Ok(text)
}

/// Writes the config at `path`: [`with_inherited`]`(ours)`.
pub fn write(path: &Path, ours: &str) -> crate::error::Result<()> {
    let context = || format!("write CRIU config {}", path.display());
    let text = with_inherited(ours).map_err(crate::error::Error::io(context()))?;
    std::fs::write(path, text).map_err(crate::error::Error::io(context()))
}

/// CRIU's network lock around a dump, as the shim asks for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetworkLock {
    /// `network-lock skip` in the dump's config.
    Skip,
    /// Nothing said: CRIU's default (iptables), or what a user's CRIU config chose.
    Criu,
}

impl NetworkLock {
    /// The lock of a dump of the container in `bundle`.
    ///
    /// CRIU locks the network namespace of a container it dumps: iptables rules that drop every
    /// packet, put in as the dump begins and taken out before the processes go on, and again
    /// around a restore of those images (the restore takes its method from the dump). That is
    /// `iptables-restore` run two to six times at each end: about 10 ms before and 75 ms after
    /// the dump on this kind of machine, all of it inside the workload's stop, and as much again
    /// in a restore. The lock keeps established TCP connections as they were dumped. CRIU dumps
    /// them only when told to (`--tcp-established`, which containerd's `open_tcp` sets, or
    /// `--tcp-close`) and refuses any other dump that holds one. Without that the lock protects
    /// nothing, and CRIU is asked to skip it.
    ///
    /// Every CRIU config that applies to the dump is read for those options and for a lock
    /// method of the user's: CRIU's global and per-user `default.conf`, the shim's own
    /// `CRIU_CONFIG_FILE`, and runc's (the `org.criu.config` annotation, or
    /// `/etc/criu/runc.conf`). If any names one, the lock is left to CRIU.
    pub fn for_dump(open_tcp: bool, bundle: &Path) -> Self {
        let user_says = || {
            user_configs(bundle)
                .iter()
                .any(|p| std::fs::read_to_string(p).is_ok_and(|text| keeps_the_lock(&text)))
        };
        if open_tcp || user_says() {
            NetworkLock::Criu
        } else {
            NetworkLock::Skip
        }
    }

    /// The line of the dump's CRIU config.
    pub fn config_line(self) -> &'static str {
        match self {
            NetworkLock::Skip => "network-lock skip\n",
            NetworkLock::Criu => "",
        }
    }

    /// As the checkpoint's record says it.
    pub fn name(self) -> &'static str {
        match self {
            NetworkLock::Skip => "skip",
            NetworkLock::Criu => "criu",
        }
    }
}

/// Whether the capture may begin at CRIU's `network-lock` action (see `criu_stop`): not if a
/// CRIU config the dump reads allows `link-remap`, with which CRIU links files into the
/// container's own filesystem while it dumps the processes (and removes them after `post-dump`):
/// a capture beside the dump would see them or not, by timing.
pub fn capture_may_begin_early(bundle: &Path) -> bool {
    !user_configs(bundle)
        .iter()
        .any(|p| std::fs::read_to_string(p).is_ok_and(|text| names(&text, &["link-remap"])))
}

/// The CRIU configs a dump of the container in `bundle` reads besides the shim's own lines.
fn user_configs(bundle: &Path) -> Vec<PathBuf> {
    let mut configs = vec![PathBuf::from("/etc/criu/default.conf")];
    if let Some(home) = std::env::var_os("HOME") {
        configs.push(Path::new(&home).join(".criu/default.conf"));
    }
    if let Some(env) = std::env::var_os("CRIU_CONFIG_FILE") {
        configs.push(env.into());
    }
    // runc's: the annotation's file (none if it is empty), else its default.
    let annotation = std::fs::read(bundle.join("config.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|spec| {
            spec["annotations"]["org.criu.config"]
                .as_str()
                .map(str::to_string)
        });
    match annotation {
        Some(path) if path.is_empty() => {}
        Some(path) => configs.push(path.into()),
        None => configs.push(PathBuf::from("/etc/criu/runc.conf")),
    }
    configs
}

/// Whether a CRIU config chooses a lock method or has established connections dumped
/// (`network-lock`, `tcp-established`, `tcp-close`, with or without the dashes).
fn keeps_the_lock(config: &str) -> bool {
    names(config, &["network-lock", "tcp-established", "tcp-close"])
}

/// Whether a CRIU config sets any of `options` (with or without the dashes; not in a comment).
fn names(config: &str, options: &[&str]) -> bool {
    config.lines().any(|l| {
        let l = l.trim_start();
        let option = l.trim_start_matches('-');
        !l.starts_with('#') && options.iter().any(|o| option.starts_with(o))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lock_or_tcp_the_user_set_is_seen_and_comments_are_not() {
        assert!(keeps_the_lock("log-file x\nnetwork-lock nftables\n"));
        assert!(keeps_the_lock("  --network-lock iptables"));
        assert!(keeps_the_lock("tcp-established"));
        assert!(keeps_the_lock("--tcp-close\n"));
        assert!(!keeps_the_lock(
            "# network-lock nftables\n#tcp-established\nlog-file x\n"
        ));
        assert!(!keeps_the_lock(""));
    }

    #[test]
    fn link_remap_in_runcs_config_keeps_the_capture_at_post_dump() {
        let dir = tempfile::tempdir().unwrap();
        let runc_conf = dir.path().join("runc.conf");
        let spec = serde_json::json!({"annotations": {"org.criu.config": runc_conf}});
        std::fs::write(dir.path().join("config.json"), spec.to_string()).unwrap();
        std::fs::write(&runc_conf, "# link-remap\n").unwrap();
        assert!(capture_may_begin_early(dir.path()));
        std::fs::write(&runc_conf, "--link-remap\n").unwrap();
        assert!(!capture_may_begin_early(dir.path()));
    }

    #[test]
    fn tcp_keeps_the_lock_and_runcs_config_is_read() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(NetworkLock::for_dump(true, dir.path()), NetworkLock::Criu);
        let runc_conf = dir.path().join("runc.conf");
        std::fs::write(&runc_conf, "tcp-established\n").unwrap();
        let spec = serde_json::json!({"annotations": {"org.criu.config": runc_conf}});
        std::fs::write(dir.path().join("config.json"), spec.to_string()).unwrap();
        assert!(user_configs(dir.path()).contains(&runc_conf));
        assert_eq!(NetworkLock::for_dump(false, dir.path()), NetworkLock::Criu);
        // An empty annotation: runc reads no config of its own.
        let spec = serde_json::json!({"annotations": {"org.criu.config": ""}});
        std::fs::write(dir.path().join("config.json"), spec.to_string()).unwrap();
        assert!(!user_configs(dir.path()).contains(&runc_conf));
        assert!(!user_configs(dir.path()).contains(&PathBuf::from("/etc/criu/runc.conf")));
    }
}
