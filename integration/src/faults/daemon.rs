//! A test's containerd, restarted: SIGTERM, then a new one on the same root, state, config and
//! log, optionally with another environment (a `PATH` without `criu`, or with a fake one).

use std::fs::{self, OpenOptions};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::T;
use crate::host;
use crate::poll::{poll, poll_until};
use crate::process::{run_with_timeout, wait_child};
use crate::Containerd;

/// pid of the containerd serving `cd` (the live process whose `--config` is `cd`'s config).
pub fn containerd_pid(cd: &Containerd) -> Option<i32> {
    let config = cd.dir().join("config.toml").to_string_lossy().into_owned();
    host::processes()
        .into_iter()
        .find(|p| {
            p.program_name() == "containerd"
                && p.flag("--config") == Some(config.as_str())
                && host::alive(p.pid)
        })
        .map(|p| p.pid)
}

fn environ(pid: i32) -> Vec<(String, String)> {
    let raw = fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
    raw.split(|b| *b == 0)
        .filter_map(|kv| {
            let kv = String::from_utf8_lossy(kv);
            let (k, v) = kv.split_once('=')?;
            Some((k.to_string(), v.to_string()))
        })
        .collect()
}

/// `path` without the directories holding a `criu`, with `first` in front.
pub fn path_without_criu(path: &str, first: &Path) -> String {
    let mut dirs = vec![first.to_string_lossy().into_owned()];
    dirs.extend(
        path.split(':')
            .filter(|d| !d.is_empty() && !Path::new(d).join("criu").exists())
            .map(str::to_string),
    );
    dirs.join(":")
}

/// The real `criu` on our PATH (and the usual places).
pub fn real_criu() -> PathBuf {
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path
        .split(':')
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin"])
        .map(|d| Path::new(d).join("criu"))
        .find(|p| p.is_file());
    found.expect("criu is installed (scripts/install-deps.sh)")
}

/// Restarts the containerd of a test. The first restart stops the harness's daemon; later ones
/// stop the one started here. Dropped before the [`Containerd`] it borrows (declare it after),
/// it removes the tasks and containers through the daemon it runs and stops it, so that the
/// harness's teardown finds a stopped daemon and cleans up the rest.
pub struct Daemon<'a> {
    cd: &'a Containerd,
    child: Option<Child>,
}

impl<'a> Daemon<'a> {
    pub fn new(cd: &'a Containerd) -> Daemon<'a> {
        Daemon { cd, child: None }
    }

    /// pid of the running daemon.
    pub fn pid(&self) -> i32 {
        containerd_pid(self.cd).expect("containerd of this test is running")
    }

    /// The PATH of the running daemon (which the shims it starts inherit).
    pub fn path(&self) -> String {
        environ(self.pid())
            .into_iter()
            .find(|(k, _)| k == "PATH")
            .map(|(_, v)| v)
            .unwrap_or_default()
    }

    /// Stops the running containerd with SIGTERM (shims and containers keep running) and starts
    /// a new one with the same config and environment, `PATH` replaced by `path` if given. Waits
    /// until it answers `ctr tasks ls`.
    pub fn restart(&mut self, path: Option<&str>) {
        match path {
            Some(p) => self.restart_with_env(&[("PATH", p)]),
            None => self.restart_with_env(&[]),
        }
    }

    /// Restarts containerd with `XDG_RUNTIME_DIR` in the test's dir ([`runtime_dir`]), where
    /// it makes its temporary checkpoint dirs: the restore ones it never removes (containerd
    /// 2.1's Tasks.Create) go with the test's dir, and a test can see what is left there.
    pub fn restart_with_private_runtime_dir(&mut self) {
        let dir = runtime_dir(self.cd);
        fs::create_dir_all(&dir).expect("create runtime dir");
        let dir = dir.to_string_lossy().into_owned();
        self.restart_with_env(&[("XDG_RUNTIME_DIR", &dir)]);
    }

    /// Like [`Self::restart`], with the variables `vars` set (replacing the old values).
    pub fn restart_with_env(&mut self, vars: &[(&str, &str)]) {
        let old = self.pid();
        let mut env = environ(old);
        for (k, v) in vars {
            env.retain(|(name, _)| name != k);
            env.push((k.to_string(), v.to_string()));
        }
        // SAFETY: kill(2) on a pid we just looked up.
        unsafe {
            libc::kill(old, libc::SIGTERM);
        }
        poll(format!("containerd {old} to exit after SIGTERM"), T, || {
            (!host::alive(old)).then_some(())
        });
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
        let log = OpenOptions::new()
            .append(true)
            .create(true)
            .open(self.cd.log_path())
            .expect("open containerd log");
        let log2 = log.try_clone().expect("dup log fd");
        let mut child = Command::new("containerd")
            .arg("--config")
            .arg(self.cd.dir().join("config.toml"))
            .env_clear()
            .envs(env)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .expect("start containerd again");
        let ready = poll_until(T, || {
            if let Ok(Some(st)) = child.try_wait() {
                return Some(Err(format!("containerd exited at restart: {st}")));
            }
            let mut c = self.cd.ctr_command();
            c.args(["tasks", "ls"]);
            match run_with_timeout(&mut c, None, Duration::from_secs(10)) {
                Ok(o) if o.status.success() => Some(Ok(())),
                _ => None,
            }
        });
        self.child = Some(child);
        match ready {
            Some(Ok(())) => {}
            Some(Err(e)) => panic!("{e}\n{}", self.cd.log_tail(40)),
            None => panic!(
                "restarted containerd does not answer within {T:?}\n{}",
                self.cd.log_tail(40)
            ),
        }
    }

    fn cleanup(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Ok(None) = child.try_wait() {
            let quick = Duration::from_secs(20);
            let ctr = |args: &[&str]| {
                let mut c = self.cd.ctr_command();
                c.args(args);
                run_with_timeout(&mut c, None, quick).ok()
            };
            let list = |args: &[&str]| -> Vec<Vec<String>> {
                ctr(args)
                    .map(|o| {
                        String::from_utf8_lossy(&o.stdout)
                            .lines()
                            .skip(1)
                            .map(|l| l.split_whitespace().map(str::to_string).collect())
                            .filter(|r: &Vec<String>| !r.is_empty())
                            .collect()
                    })
                    .unwrap_or_default()
            };
            let tasks = list(&["tasks", "ls"]);
            for t in &tasks {
                if t.get(2).map(String::as_str) == Some("PAUSED") {
                    ctr(&["tasks", "resume", &t[0]]);
                }
                ctr(&["tasks", "kill", "-a", "-s", "SIGKILL", &t[0]]);
            }
            let _ = poll_until(Duration::from_secs(5), || {
                list(&["tasks", "ls"])
                    .iter()
                    .all(|t| t.get(2).map(String::as_str) == Some("STOPPED"))
                    .then_some(())
            });
            for t in &tasks {
                ctr(&["tasks", "delete", "-f", &t[0]]);
            }
            for c in list(&["containers", "ls"]) {
                ctr(&["containers", "delete", &c[0]]);
            }
            // SAFETY: kill(2) on our own unreaped child.
            unsafe {
                libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
            }
            if wait_child(&mut child, Duration::from_secs(10)).is_none() {
                let _ = child.kill();
            }
        }
        let _ = child.wait();
    }
}

impl Drop for Daemon<'_> {
    fn drop(&mut self) {
        self.cleanup();
    }
}

/// The `XDG_RUNTIME_DIR` [`Daemon::restart_with_private_runtime_dir`] gives containerd.
pub fn runtime_dir(cd: &Containerd) -> PathBuf {
    cd.dir().join("xdg")
}
