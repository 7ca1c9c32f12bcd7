//! Runs a command (`ctr run -t`, `ctr task exec -t`) on a pseudo-terminal made here, so the TTY
//! scenarios work without a terminal (CI has no stdin at all). The child gets the pty slave as
//! stdin/stdout/stderr and as controlling terminal; the test reads and writes the master.

use std::fs::File;
use std::io::Write;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::process::{describe, wait_child, Captured, Stream};

/// A process running on a pty; everything it writes to the terminal is captured as stdout.
pub struct PtySpawned {
    child: Child,
    master: File,
    captured: Arc<Captured>,
    reader: Option<JoinHandle<()>>,
    what: String,
}

fn set_cloexec(fd: libc::c_int) {
    // SAFETY: fcntl on a descriptor we own.
    unsafe {
        libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
    }
}

impl PtySpawned {
    /// Spawns `cmd` on a new pty of `rows` x `cols`.
    pub fn spawn(cmd: &mut Command, rows: u16, cols: u16) -> PtySpawned {
        let what = describe(cmd);
        let mut master: libc::c_int = -1;
        let mut slave: libc::c_int = -1;
        let ws = libc::winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: openpty writes two descriptors into the provided ints; name and termios are
        // optional (null), winsize points to a valid struct.
        let rc = unsafe {
            libc::openpty(
                &mut master,
                &mut slave,
                std::ptr::null_mut(),
                std::ptr::null(),
                &ws,
            )
        };
        assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
        set_cloexec(master);
        set_cloexec(slave);
        // SAFETY: both descriptors were just returned by openpty and are owned by nobody else.
        let (master, slave) = unsafe { (File::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
        let dup = |fd: &OwnedFd| -> Stdio { Stdio::from(fd.try_clone().expect("dup pty slave")) };
        cmd.stdin(dup(&slave))
            .stdout(dup(&slave))
            .stderr(dup(&slave));
        // SAFETY: only async-signal-safe calls (setsid, ioctl) between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn `{what}` on a pty: {e}"));
        drop(slave);
        let captured = Captured::new(1);
        let reader =
            captured.spawn_reader(Stream::Stdout, master.try_clone().expect("dup pty master"));
        PtySpawned {
            child,
            master,
            captured,
            reader: Some(reader),
            what,
        }
    }

    /// Everything written to the terminal so far.
    pub fn output(&self) -> String {
        self.captured.get(Stream::Stdout)
    }

    /// Types `data` on the terminal.
    pub fn write(&mut self, data: &[u8]) {
        self.master.write_all(data).expect("write to pty master");
    }

    /// Waits until the terminal output contains `needle`.
    pub fn wait_for(&self, needle: &str, timeout: Duration) -> String {
        self.captured.wait_for(Stream::Stdout, needle, timeout).unwrap_or_else(|seen| {
            panic!("`{}`: {needle:?} did not appear on the pty within {timeout:?}\noutput: {seen:?}", self.what)
        })
    }

    /// Waits for exit (panics after `timeout`, killing it); stdout holds the terminal output.
    pub fn wait(mut self, timeout: Duration) -> Output {
        let Some(status) = wait_child(&mut self.child, timeout) else {
            let _ = self.child.kill();
            let _ = self.child.wait();
            panic!(
                "`{}` did not exit within {timeout:?}\noutput: {:?}",
                self.what,
                self.output()
            );
        };
        // The reader sees EIO once the last slave descriptor is closed; a container process that
        // kept it cannot, but don't hang on that.
        if let Some(r) = self.reader.take() {
            if self.captured.wait_closed(Duration::from_secs(2)) {
                let _ = r.join();
            }
        }
        Output {
            status,
            stdout: self.output().into_bytes(),
            stderr: Vec::new(),
        }
    }
}

impl Drop for PtySpawned {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
