//! Running commands with a deadline, and background processes whose output is captured while they
//! run (so a test can wait for a line to appear instead of sleeping).

use std::io::{Read, Write};
use std::process::{Child, ChildStdin, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// Describes a command for messages: program and arguments.
pub fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs `cmd` to completion, feeding `stdin` (or /dev/null), capturing stdout and stderr. If it is
/// not done within `timeout` it is killed (SIGKILL) and an error is returned.
pub fn run_with_timeout(
    cmd: &mut Command,
    stdin: Option<&[u8]>,
    timeout: Duration,
) -> Result<Output, String> {
    let what = describe(cmd);
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot spawn `{what}`: {e}"))?;
    let pid = child.id();
    let writer = match (stdin, child.stdin.take()) {
        (Some(data), Some(mut pipe)) => {
            let data = data.to_vec();
            Some(thread::spawn(move || {
                // A process that exits without reading gives EPIPE: not an error for us.
                let _ = pipe.write_all(&data);
            }))
        }
        _ => None,
    };
    let out_reader = child.stdout.take().map(read_all_in_thread);
    let err_reader = child.stderr.take().map(read_all_in_thread);

    let (tx, rx) = mpsc::channel();
    let waiter = thread::spawn(move || {
        let r = child.wait();
        let _ = tx.send(());
        r
    });
    let timed_out = rx.recv_timeout(timeout).is_err();
    if timed_out {
        // SAFETY: plain kill(2) on the pid of our own, not yet reaped, child.
        unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGKILL);
        }
    }
    let status = waiter
        .join()
        .map_err(|_| format!("waiter thread of `{what}` panicked"))?
        .map_err(|e| format!("waiting for `{what}`: {e}"))?;
    if let Some(w) = writer {
        let _ = w.join();
    }
    let stdout = out_reader.map(join_bytes).unwrap_or_default();
    let stderr = err_reader.map(join_bytes).unwrap_or_default();
    if timed_out {
        return Err(format!(
            "`{what}` did not finish within {timeout:?} (killed)\nstdout: {}\nstderr: {}",
            String::from_utf8_lossy(&stdout),
            String::from_utf8_lossy(&stderr)
        ));
    }
    Ok(Output {
        status,
        stdout,
        stderr,
    })
}

fn read_all_in_thread<R: Read + Send + 'static>(mut r: R) -> JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        buf
    })
}

fn join_bytes(h: JoinHandle<Vec<u8>>) -> Vec<u8> {
    h.join().unwrap_or_default()
}

/// Output of a process collected by reader threads, with a condition variable signalled on every
/// chunk so that waiting for a pattern needs no sleeping.
#[derive(Default)]
pub(crate) struct Captured {
    inner: Mutex<CapturedInner>,
    cv: Condvar,
}

#[derive(Default)]
struct CapturedInner {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    open_streams: usize,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Stream {
    Stdout,
    Stderr,
}

impl Captured {
    pub(crate) fn new(open_streams: usize) -> Arc<Self> {
        Arc::new(Captured {
            inner: Mutex::new(CapturedInner {
                open_streams,
                ..Default::default()
            }),
            cv: Condvar::new(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CapturedInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn push(&self, stream: Stream, data: &[u8]) {
        let mut g = self.lock();
        match stream {
            Stream::Stdout => g.stdout.extend_from_slice(data),
            Stream::Stderr => g.stderr.extend_from_slice(data),
        }
        self.cv.notify_all();
    }

    pub(crate) fn close(&self) {
        let mut g = self.lock();
        g.open_streams = g.open_streams.saturating_sub(1);
        self.cv.notify_all();
    }

    pub(crate) fn get(&self, stream: Stream) -> String {
        let g = self.lock();
        String::from_utf8_lossy(match stream {
            Stream::Stdout => &g.stdout,
            Stream::Stderr => &g.stderr,
        })
        .into_owned()
    }

    /// Waits until `stream` contains `needle`; Err(current text) on timeout or when every stream
    /// reached EOF without it.
    pub(crate) fn wait_for(
        &self,
        stream: Stream,
        needle: &str,
        timeout: Duration,
    ) -> Result<String, String> {
        let deadline = Instant::now() + timeout;
        let mut g = self.lock();
        loop {
            let text = String::from_utf8_lossy(match stream {
                Stream::Stdout => &g.stdout,
                Stream::Stderr => &g.stderr,
            })
            .into_owned();
            if text.contains(needle) {
                return Ok(text);
            }
            if g.open_streams == 0 {
                return Err(text);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(text);
            }
            g = self
                .cv
                .wait_timeout(g, deadline - now)
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
    }

    /// Waits until every stream reached EOF; false on timeout.
    pub(crate) fn wait_closed(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut g = self.lock();
        while g.open_streams > 0 {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            g = self
                .cv
                .wait_timeout(g, deadline - now)
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
        true
    }

    pub(crate) fn spawn_reader<R: Read + Send + 'static>(
        self: &Arc<Self>,
        stream: Stream,
        mut r: R,
    ) -> JoinHandle<()> {
        let cap = Arc::clone(self);
        thread::spawn(move || {
            let mut buf = [0u8; 8192];
            loop {
                match r.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => cap.push(stream, &buf[..n]),
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    // EIO on a pty master once the slave side is closed: EOF.
                    Err(_) => break,
                }
            }
            cap.close();
        })
    }
}

/// Waits for `child` up to `timeout`, polling `try_wait` (the child stays ours so it can be killed).
pub(crate) fn wait_child(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(1);
    loop {
        match child.try_wait() {
            Ok(Some(st)) => return Some(st),
            Ok(None) => {}
            Err(_) => return None,
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(20));
    }
}

/// A process running in the background (e.g. an attached `ctr run` or `ctr task exec`), its output
/// captured as it comes. Killed and reaped on drop if still running.
pub struct Spawned {
    child: Child,
    stdin: Option<ChildStdin>,
    captured: Arc<Captured>,
    readers: Vec<JoinHandle<()>>,
    what: String,
}

impl Spawned {
    /// Spawns `cmd` with piped stdout/stderr and, if `with_stdin`, a piped stdin (else /dev/null).
    pub fn spawn(cmd: &mut Command, with_stdin: bool) -> Spawned {
        let what = describe(cmd);
        cmd.stdin(if with_stdin {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn `{what}`: {e}"));
        let captured = Captured::new(2);
        let mut readers = Vec::new();
        if let Some(o) = child.stdout.take() {
            readers.push(captured.spawn_reader(Stream::Stdout, o));
        }
        if let Some(e) = child.stderr.take() {
            readers.push(captured.spawn_reader(Stream::Stderr, e));
        }
        let stdin = child.stdin.take();
        Spawned {
            child,
            stdin,
            captured,
            readers,
            what,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn stdout(&self) -> String {
        self.captured.get(Stream::Stdout)
    }

    pub fn stderr(&self) -> String {
        self.captured.get(Stream::Stderr)
    }

    /// Writes to the process's stdin (panics if it was spawned without one or it is closed).
    pub fn write_stdin(&mut self, data: &[u8]) {
        let w = self
            .stdin
            .as_mut()
            .expect("process spawned without stdin, or stdin closed");
        w.write_all(data).expect("write to stdin");
        w.flush().expect("flush stdin");
    }

    pub fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// Waits until stdout contains `needle`; panics with what was seen on timeout or EOF.
    pub fn wait_for_stdout(&self, needle: &str, timeout: Duration) -> String {
        self.captured.wait_for(Stream::Stdout, needle, timeout).unwrap_or_else(|seen| {
            panic!(
                "`{}`: {needle:?} did not appear on stdout within {timeout:?}\nstdout: {seen}\nstderr: {}",
                self.what,
                self.stderr()
            )
        })
    }

    /// True while the process has not exited.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits for exit (panics after `timeout`, killing it) and returns status and all output.
    pub fn wait(mut self, timeout: Duration) -> Output {
        let status = match wait_child(&mut self.child, timeout) {
            Some(st) => st,
            None => {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "`{}` did not exit within {timeout:?}\nstdout: {}\nstderr: {}",
                    self.what,
                    self.stdout(),
                    self.stderr()
                );
            }
        };
        self.stdin = None;
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        Output {
            status,
            stdout: self.stdout().into_bytes(),
            stderr: self.stderr().into_bytes(),
        }
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
