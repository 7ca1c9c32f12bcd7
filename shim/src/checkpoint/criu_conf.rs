//! The CRIU config files the shim hands to runc's CRIU (`CRIU_CONFIG_FILE`, which `criu swrk`
//! reads at start): a config the shim itself was started with comes first in them, then the
//! shim's own lines. runc still passes the user's CRIU config (`/etc/criu/runc.conf` or the
//! `org.criu.config` annotation), which CRIU reads after these and which wins over them.

use std::path::Path;

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

/// The network lock line of a dump's config.
///
/// CRIU locks the network namespace of a container it dumps: iptables rules that drop every
/// packet, put in as the dump begins and taken out before the processes go on, and again
/// around a restore of those images (the restore takes its method from the dump). That is
/// `iptables-restore` run two to six times at each end: about 10 ms before and 75 ms after the
/// dump on this kind of machine, all of it inside the workload's stop, and as much again in a
/// restore. The lock keeps established TCP connections as they were dumped; CRIU dumps them only
/// with `--tcp-established` (containerd's `open_tcp`) and refuses any other dump that has one.
/// Without it the lock protects nothing, and CRIU is asked to skip it.
///
/// A lock method the user chose stays: one in a CRIU config read before the shim's (CRIU's
/// global and per-user `default.conf`, the shim's own `CRIU_CONFIG_FILE`) means no line here,
/// and runc's own config is read after the shim's anyway.
pub fn network_lock(open_tcp: bool) -> &'static str {
    if open_tcp || user_chose_network_lock() {
        ""
    } else {
        "network-lock skip\n"
    }
}

fn user_chose_network_lock() -> bool {
    let mut configs = vec![std::path::PathBuf::from("/etc/criu/default.conf")];
    if let Some(home) = std::env::var_os("HOME") {
        configs.push(Path::new(&home).join(".criu/default.conf"));
    }
    if let Some(env) = std::env::var_os("CRIU_CONFIG_FILE") {
        configs.push(env.into());
    }
    configs
        .iter()
        .any(|p| std::fs::read_to_string(p).is_ok_and(|text| names_network_lock(&text)))
}

/// Whether a CRIU config sets the network lock (`network-lock …` or `--network-lock …`).
fn names_network_lock(config: &str) -> bool {
    config.lines().any(|l| {
        let l = l.trim_start();
        !l.starts_with('#') && l.trim_start_matches('-').starts_with("network-lock")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lock_the_user_set_is_seen_and_comments_are_not() {
        assert!(names_network_lock(
            "tcp-established\nnetwork-lock nftables\n"
        ));
        assert!(names_network_lock("  --network-lock iptables"));
        assert!(!names_network_lock("# network-lock nftables\nlog-file x\n"));
        assert!(!names_network_lock(""));
    }

    #[test]
    fn tcp_keeps_the_lock() {
        assert_eq!(network_lock(true), "");
    }
}
