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
