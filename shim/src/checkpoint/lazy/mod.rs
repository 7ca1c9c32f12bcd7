//! Lazy (post-copy) migration with stock CRIU.
//!
//! **Source.** `runc checkpoint --lazy-pages` dumps everything but the
//! memory pages, tells runc through its status fd, and then serves the pages
//! to the destination's `criu lazy-pages` daemon until it closes the
//! connection. Stock CRIU then kills the dumped tasks — also when the
//! destination merely went away before it had every page (a lazy page
//! server takes an end of file for the end of the transfer). So the page
//! server CRIU runs listens on 127.0.0.1 only (a CRIU config file for this
//! dump sets its address) and the shim's [`PageRelay`] stands between it
//! and the destination: it forwards the destination's end only after the
//! destination said `PS_IOV_CLOSE` (it has every page). If the destination
//! never connects, or goes away before that, the relay kills CRIU first:
//! the tasks it held are let go, the shim unlocks their network (CRIU locked
//! it for the dump and does not unlock it after a lazy dump) and thaws them.
//!
//! **Destination.** Start runs `criu lazy-pages` pointed at the source's
//! page server in the restore's work dir ([`LazyDaemon`]), waits for its
//! socket, and restores with `runc restore --lazy-pages`: the container runs
//! while its memory streams in. If the daemon fails (the source went away),
//! the container's memory is incomplete, and the shim kills it.

use std::{
    fs::File,
    net::SocketAddr,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicI32, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use log::{info, warn};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

use crate::{
    error::{Error, Result},
    reaper::{ExitStatus, Reaper},
    runtime::runc::{kill_group, own_group_dying_with_shim},
};

mod dest;
mod source;
#[cfg(test)]
mod tests;

pub use dest::LazyDaemon;
pub use source::PageRelay;

/// The CRIU config a lazy dump runs with (its page server on loopback only).
pub const DUMP_CONFIG: &str = "criu-lazy-dump.conf";
/// The lazy-pages daemon's log, in the restore's work dir.
pub const DAEMON_LOG: &str = "lazy-pages.log";
/// The socket the restoring CRIU hands its userfaultfds to.
const DAEMON_SOCKET: &str = "lazy-pages.socket";

/// CRIU's page server protocol (criu/page-xfer.c): every request is a
/// `struct page_server_iov { u32 cmd; u64 nr_pages; u64 vaddr; u64 dst_id; }`,
/// 32 bytes with its padding; the lazy-pages daemon sends nothing else.
const IOV_SIZE: usize = 32;
const PS_CMD_MASK: u32 = 0xffff;
const PS_IOV_CLOSE: u32 = 0x1023;
const PS_IOV_FORCE_CLOSE: u32 = 0x1024;

/// The pipes CRIU's lazy page server makes (`PIPE_MAX_SIZE` pages, criu/page-pipe.h).
const CRIU_PIPE_BYTES: u64 = 819 * 4096;

/// A lazy dump's page server needs pipes past the default `fs.pipe-max-size`: allowed with
/// CAP_SYS_RESOURCE or a raised sysctl. Without either CRIU fails only when the destination asks
/// for its first page; this says so before anything stops.
pub fn check_pipe_size() -> Result<()> {
    let max: u64 = std::fs::read_to_string("/proc/sys/fs/pipe-max-size")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    if max >= CRIU_PIPE_BYTES || has_cap_sys_resource() {
        return Ok(());
    }
    Err(Error::FailedPrecondition(format!(
        "a lazy checkpoint needs pipes of {CRIU_PIPE_BYTES} bytes for CRIU's page server, but \
         fs.pipe-max-size is {max} and the shim lacks CAP_SYS_RESOURCE: raise it \
         (`sysctl fs.pipe-max-size=4194304`; `make deps` does)"
    )))
}

fn has_cap_sys_resource() -> bool {
    const CAP_SYS_RESOURCE: u32 = 24;
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << CAP_SYS_RESOURCE) != 0)
}

/// What crossed the relay.
#[derive(Debug, Default, Clone, Copy)]
pub struct Transfer {
    /// Bytes sent to the destination (page headers and pages).
    pub bytes: u64,
    pub connect_ms: f64,
    pub transfer_ms: f64,
}

/// The command of a page server request.
fn command(iov: &[u8; IOV_SIZE]) -> u32 {
    u32::from_le_bytes([iov[0], iov[1], iov[2], iov[3]]) & PS_CMD_MASK
}

/// SO_LINGER 0: closing the socket (or the process dying) sends a reset, not an end of stream.
/// (Linger 0 never blocks the close.)
fn reset_on_close(fd: std::os::fd::RawFd) {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket and a linger struct of the right size.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &l as *const libc::linger as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

/// A dead destination is noticed in about 10 s even if no packet says so.
fn keepalive(s: &TcpStream) {
    let fd = s.as_raw_fd();
    for (level, name, value) in [
        (libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1),
        (libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, 4),
        (libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, 2),
        (libc::IPPROTO_TCP, libc::TCP_KEEPCNT, 3),
    ] {
        let v: libc::c_int = value;
        // SAFETY: a valid socket fd and a c_int option value of the right size.
        unsafe {
            libc::setsockopt(
                fd,
                level,
                name,
                &v as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    }
}

/// Removes the network lock CRIU put into the namespace of `pid` for the
/// dump (its `CRIU` iptables chain, IPv4 and IPv6), which a lazy dump that
/// did not end leaves behind. Nothing to remove is no error.
pub async fn unlock_network(reaper: &Reaper, pid: i32) -> Result<()> {
    let ns = File::open(format!("/proc/{pid}/ns/net"))
        .map_err(Error::io(format!("open the network namespace of {pid}")))?;
    let mut removed = 0;
    for bin in ["iptables", "ip6tables"] {
        for args in [
            &["-w", "-D", "INPUT", "-j", "CRIU"][..],
            &["-w", "-D", "OUTPUT", "-j", "CRIU"],
            &["-w", "-D", "INPUT", "-j", "CRIU"],
            &["-w", "-D", "OUTPUT", "-j", "CRIU"],
            &["-w", "-F", "CRIU"],
            &["-w", "-X", "CRIU"],
        ] {
            let mut cmd = Command::new(bin);
            cmd.args(args);
            match run_in_netns(reaper, cmd, &ns).await {
                Ok(0) => removed += 1,
                Ok(_) => {}
                Err(e) => {
                    warn!("{bin}: {e}");
                    break;
                }
            }
        }
    }
    if removed > 0 {
        info!("unlocked the network of {pid} ({removed} rules and chains of CRIU's removed)");
    }
    Ok(())
}

/// Runs `cmd` in the network namespace `ns`, its exit taken from the reaper.
async fn run_in_netns(reaper: &Reaper, mut cmd: Command, ns: &File) -> Result<i32> {
    let fd = ns.as_raw_fd();
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: setns is a plain system call; nothing else runs between fork and exec.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(move || {
            if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let started = Instant::now();
    let child = cmd.spawn().map_err(Error::io("spawn"))?;
    let exit = reaper.claim(child.id() as i32, started);
    let status = exit
        .await
        .map_err(|_| Error::Internal("exit lost".into()))?;
    Ok(status.code)
}
