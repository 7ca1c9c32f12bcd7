//! Waiting for a state by polling it against a deadline: the only kind of waiting the tests do.

use std::fmt::Display;
use std::thread;
use std::time::{Duration, Instant};

/// Calls `f` until it returns `Some`, backing off from 2 ms to 50 ms between calls. `None` when
/// `timeout` passes first.
pub fn poll_until<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(2);
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        let now = Instant::now();
        if now >= deadline {
            return None;
        }
        thread::sleep(pause.min(deadline - now));
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// Like [`poll_until`] but panics naming `what` on timeout.
pub fn poll<T>(what: impl Display, timeout: Duration, f: impl FnMut() -> Option<T>) -> T {
    poll_until(timeout, f)
        .unwrap_or_else(|| panic!("timed out after {timeout:?} waiting for {what}"))
}
