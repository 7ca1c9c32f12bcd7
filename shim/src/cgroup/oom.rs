//! OOM notifications of a v1 memory cgroup, through an eventfd registered in
//! `cgroup.event_control`.

use std::{
    fs::File,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
};

use log::{debug, warn};
use nix::sys::eventfd::{EfdFlags, EventFd};
use tokio::io::unix::AsyncFd;

use crate::error::{Error, Result};

/// Calls `on_oom` each time the kernel reports an OOM in `memory_cgroup`,
/// until the cgroup goes away.
pub fn watch_v1<F>(memory_cgroup: PathBuf, on_oom: F) -> Result<()>
where
    F: Fn() + Send + 'static,
{
    let control = memory_cgroup.join("memory.oom_control");
    let control_file =
        File::open(&control).map_err(Error::io(format!("open {}", control.display())))?;
    let efd = EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
        .map_err(Error::nix("eventfd"))?;
    let registration = format!("{} {}", efd.as_raw_fd(), control_file.as_raw_fd());
    let event_control = memory_cgroup.join("cgroup.event_control");
    std::fs::write(&event_control, registration)
        .map_err(Error::io(format!("write {}", event_control.display())))?;
    // SAFETY: the AsyncFd owns the eventfd, so its descriptor stays open and
    // the same for as long as the registration lives.
    let efd = unsafe { AsyncFd::register(efd) }
        .map_err(std::io::Error::from)
        .map_err(Error::io("register eventfd"))?;
    tokio::spawn(async move {
        let _control = control_file;
        loop {
            let mut guard = match efd.readable().await {
                Ok(g) => g,
                Err(e) => {
                    warn!("oom eventfd: {e}");
                    return;
                }
            };
            match guard.try_io(|fd| fd.get_ref().read().map_err(std::io::Error::from)) {
                Ok(Ok(_)) => {
                    // The eventfd also fires when the cgroup is removed.
                    if !cgroup_alive(&memory_cgroup) {
                        debug!("memory cgroup {} removed", memory_cgroup.display());
                        return;
                    }
                    on_oom();
                }
                Ok(Err(e)) => {
                    warn!("oom eventfd read: {e}");
                    return;
                }
                Err(_would_block) => continue,
            }
        }
    });
    Ok(())
}

fn cgroup_alive(dir: &Path) -> bool {
    dir.join("memory.oom_control").exists()
}

/// Calls `on_oom` each time `oom_kill` grows in a v2 cgroup's `memory.events`,
/// watched with inotify, until the cgroup goes away.
pub fn watch_v2<F>(cgroup: PathBuf, on_oom: F) -> Result<()>
where
    F: Fn() + Send + 'static,
{
    use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
    let events = cgroup.join("memory.events");
    let inotify = Inotify::init(InitFlags::IN_CLOEXEC | InitFlags::IN_NONBLOCK)
        .map_err(Error::nix("inotify"))?;
    inotify
        .add_watch(&events, AddWatchFlags::IN_MODIFY)
        .map_err(Error::nix(format!("watch {}", events.display())))?;
    let mut last = oom_kills(&events).unwrap_or(0);
    // SAFETY: the AsyncFd owns the inotify instance for as long as it is registered.
    let fd = unsafe { AsyncFd::register(InotifyFd(inotify)) }
        .map_err(std::io::Error::from)
        .map_err(Error::io("register inotify"))?;
    tokio::spawn(async move {
        loop {
            let mut guard = match fd.readable().await {
                Ok(g) => g,
                Err(e) => {
                    warn!("oom inotify: {e}");
                    return;
                }
            };
            match guard.try_io(|i| i.get_ref().0.read_events().map_err(std::io::Error::from)) {
                Ok(Ok(_)) => {
                    let Some(now) = oom_kills(&events) else {
                        debug!("cgroup {} removed", cgroup.display());
                        return;
                    };
                    if now > last {
                        last = now;
                        on_oom();
                    }
                }
                Ok(Err(e)) => {
                    warn!("oom inotify read: {e}");
                    return;
                }
                Err(_would_block) => continue,
            }
        }
    });
    Ok(())
}

/// nix's Inotify is AsFd only; tokio wants AsRawFd.
struct InotifyFd(nix::sys::inotify::Inotify);

impl AsRawFd for InotifyFd {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsFd;
        self.0.as_fd().as_raw_fd()
    }
}

fn oom_kills(events: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(events).ok()?;
    Some(parse_oom_kills(&text))
}

fn parse_oom_kills(text: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix("oom_kill "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oom_kill_counter_is_read() {
        assert_eq!(
            parse_oom_kills("low 0\nhigh 0\nmax 3\noom 2\noom_kill 2\n"),
            2
        );
        assert_eq!(parse_oom_kills("low 0\n"), 0);
    }
}
