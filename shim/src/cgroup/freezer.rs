//! The cgroup freezer, v1 (`freezer.state`) and v2 (`cgroup.freeze` with
//! `cgroup.events`), and a guard that thaws on every path out.

use std::{
    fs,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use log::{error, warn};

use crate::error::{Error, Result};

/// How long freezing may take before it is given up (and thawed back).
const FREEZE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Freezer {
    /// A v1 freezer cgroup directory.
    V1(PathBuf),
    /// A v2 cgroup directory.
    V2(PathBuf),
}

impl Freezer {
    pub fn path(&self) -> &Path {
        match self {
            Freezer::V1(p) | Freezer::V2(p) => p,
        }
    }

    pub fn is_frozen(&self) -> Result<bool> {
        match self {
            Freezer::V1(p) => Ok(read(&p.join("freezer.state"))?.trim() == "FROZEN"),
            Freezer::V2(p) => Ok(events_frozen(&read(&p.join("cgroup.events"))?)),
        }
    }

    /// Freezes and waits until every task is frozen. Freezing failed, and it
    /// is dangerous to leave a cgroup FREEZING, so any error thaws it back.
    pub fn freeze(&self) -> Result<()> {
        let result = self.freeze_and_wait();
        if result.is_err() {
            if let Err(e) = self.thaw() {
                error!("thaw {} after failed freeze: {e}", self.path().display());
            }
        }
        result
    }

    fn freeze_and_wait(&self) -> Result<()> {
        let deadline = Instant::now() + FREEZE_TIMEOUT;
        let mut delay = Duration::from_micros(100);
        match self {
            Freezer::V1(p) => {
                let state = p.join("freezer.state");
                loop {
                    // v1 may stay FREEZING when a task is busy: write again until FROZEN.
                    write(&state, "FROZEN")?;
                    if read(&state)?.trim() == "FROZEN" {
                        return Ok(());
                    }
                    if Instant::now() > deadline {
                        return Err(self.timeout());
                    }
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(Duration::from_millis(10));
                }
            }
            Freezer::V2(p) => {
                write(&p.join("cgroup.freeze"), "1")?;
                let events = p.join("cgroup.events");
                loop {
                    if events_frozen(&read(&events)?) {
                        return Ok(());
                    }
                    if Instant::now() > deadline {
                        return Err(self.timeout());
                    }
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(Duration::from_millis(10));
                }
            }
        }
    }

    pub fn thaw(&self) -> Result<()> {
        match self {
            Freezer::V1(p) => write(&p.join("freezer.state"), "THAWED"),
            Freezer::V2(p) => write(&p.join("cgroup.freeze"), "0"),
        }
    }

    fn timeout(&self) -> Error {
        Error::Internal(format!(
            "cgroup {} did not freeze within {FREEZE_TIMEOUT:?}",
            self.path().display()
        ))
    }
}

fn events_frozen(events: &str) -> bool {
    events
        .lines()
        .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["frozen", "1"])
}

fn read(path: &Path) -> Result<String> {
    fs::read_to_string(path).map_err(Error::io(format!("read {}", path.display())))
}

fn write(path: &Path, data: &str) -> Result<()> {
    fs::write(path, data).map_err(Error::io(format!("write {data} to {}", path.display())))
}

/// Holds a cgroup frozen; thaws it when dropped unless told to keep it frozen.
pub struct FreezeGuard {
    freezer: Option<Freezer>,
}

impl FreezeGuard {
    /// Freezes `freezer` now.
    pub fn freeze(freezer: Freezer) -> Result<Self> {
        freezer.freeze()?;
        Ok(Self {
            freezer: Some(freezer),
        })
    }

    /// A guard that holds nothing (the cgroup was frozen by someone else).
    pub fn none() -> Self {
        Self { freezer: None }
    }

    /// Thaws now, reporting an error (drop only logs it).
    pub fn thaw(mut self) -> Result<()> {
        match self.freezer.take() {
            Some(f) => f.thaw(),
            None => Ok(()),
        }
    }
}

impl Drop for FreezeGuard {
    fn drop(&mut self) {
        if let Some(f) = self.freezer.take() {
            if let Err(e) = f.thaw() {
                warn!("thaw {}: {e}", f.path().display());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fixture directory standing in for a v2 cgroup: the kernel would
    /// update cgroup.events itself, so the test writes it as frozen.
    #[test]
    fn v2_fixture_freeze_and_guard_thaw() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("cgroup.freeze"), "0").unwrap();
        fs::write(dir.path().join("cgroup.events"), "populated 1\nfrozen 1\n").unwrap();
        let f = Freezer::V2(dir.path().to_path_buf());
        {
            let _g = FreezeGuard::freeze(f.clone()).unwrap();
            assert_eq!(
                fs::read_to_string(dir.path().join("cgroup.freeze")).unwrap(),
                "1"
            );
        }
        assert_eq!(
            fs::read_to_string(dir.path().join("cgroup.freeze")).unwrap(),
            "0"
        );
    }

    #[test]
    fn v1_fixture_state() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("freezer.state"), "THAWED\n").unwrap();
        let f = Freezer::V1(dir.path().to_path_buf());
        assert!(!f.is_frozen().unwrap());
        let g = FreezeGuard::freeze(f.clone()).unwrap();
        assert!(f.is_frozen().unwrap());
        g.thaw().unwrap();
        assert!(!f.is_frozen().unwrap());
    }

    #[test]
    fn frozen_line_is_parsed_exactly() {
        assert!(events_frozen("populated 1\nfrozen 1\n"));
        assert!(!events_frozen("populated 1\nfrozen 0\n"));
        assert!(!events_frozen("frozen 10\n"));
    }

    /// The real v2 freezer of this machine's cgroup2 hierarchy, when there is one.
    #[test]
    fn real_v2_freezer_stops_and_thaws_a_process() {
        let Some(root) = super::super::cgroup2_mount() else {
            eprintln!("no cgroup2 mount: skipped");
            return;
        };
        let cg = root.join(format!("shim-freezer-test-{}", std::process::id()));
        if fs::create_dir(&cg).is_err() {
            eprintln!("cannot create {}: skipped", cg.display());
            return;
        }
        let mut child = std::process::Command::new("sh")
            .args(["-c", "while :; do :; done"])
            .spawn()
            .unwrap();
        fs::write(cg.join("cgroup.procs"), child.id().to_string()).unwrap();
        let f = Freezer::V2(cg.clone());
        let guard = FreezeGuard::freeze(f.clone()).unwrap();
        assert!(f.is_frozen().unwrap());
        let stat = |pid: u32| fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let ticks = |s: String| -> u64 {
            s.rsplit(')')
                .next()
                .unwrap()
                .split_whitespace()
                .nth(11)
                .unwrap()
                .parse()
                .unwrap()
        };
        let t1 = ticks(stat(child.id()));
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(t1, ticks(stat(child.id())), "a frozen task must not run");
        drop(guard);
        assert!(!f.is_frozen().unwrap());
        child.kill().unwrap();
        child.wait().unwrap();
        let _ = fs::remove_dir(&cg);
    }
}
