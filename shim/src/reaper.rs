//! Every exit the subreaper sees, delivered to whoever waits for that pid.
//!
//! containerd-shim's signal loop reaps all children (runc, container inits,
//! exec processes) and notifies its monitor. A process may exit before its
//! waiter knows the pid (runc returns after the process started, the pid is
//! read from a file after that), so unclaimed exits are kept for a while and
//! handed to a claim made for a process started before the exit was seen.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use containerd_shim::{
    asynchronous::monitor::monitor_subscribe,
    monitor::{Subject, Topic},
};
use log::{debug, warn};
use time::OffsetDateTime;
use tokio::sync::oneshot;

use crate::error::{Error, Result};

/// How long an unclaimed exit is kept: much longer than the window between a
/// process starting and its waiter registering, far shorter than pid reuse.
const UNCLAIMED_TTL: Duration = Duration::from_secs(60);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExitStatus {
    pub pid: i32,
    pub code: i32,
    pub at: OffsetDateTime,
}

struct Seen {
    status: ExitStatus,
    when: Instant,
}

#[derive(Default)]
struct Inner {
    unclaimed: HashMap<i32, Seen>,
    waiters: HashMap<i32, oneshot::Sender<ExitStatus>>,
}

#[derive(Clone, Default)]
pub struct Reaper {
    inner: Arc<Mutex<Inner>>,
}

impl std::fmt::Debug for Reaper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Reaper")
    }
}

impl Reaper {
    /// Starts forwarding the subreaper's exits into this reaper.
    pub async fn start(&self) -> Result<()> {
        let mut sub = monitor_subscribe(Topic::Pid)
            .await
            .map_err(Error::shim("subscribe to exits"))?;
        let this = self.clone();
        tokio::spawn(async move {
            while let Some(ev) = sub.rx.recv().await {
                if let Subject::Pid(pid) = ev.subject {
                    this.exited(pid, ev.exit_code);
                }
            }
            warn!("exit monitor closed");
        });
        Ok(())
    }

    /// Records an exit: to its waiter if there is one, else kept for a claim.
    pub fn exited(&self, pid: i32, code: i32) {
        let status = ExitStatus {
            pid,
            code,
            at: OffsetDateTime::now_utc(),
        };
        let mut inner = self.lock();
        if let Some(tx) = inner.waiters.remove(&pid) {
            if tx.send(status).is_ok() {
                return;
            }
        }
        debug!("exit of pid {pid} ({code}) not yet claimed");
        let now = Instant::now();
        inner
            .unclaimed
            .retain(|_, seen| now.duration_since(seen.when) < UNCLAIMED_TTL);
        inner.unclaimed.insert(pid, Seen { status, when: now });
    }

    /// The exit of `pid`, a process started at `started` (taken before the
    /// spawn, so that an older exit of a reused pid is never taken for it).
    pub fn claim(&self, pid: i32, started: Instant) -> oneshot::Receiver<ExitStatus> {
        let (tx, rx) = oneshot::channel();
        let mut inner = self.lock();
        match inner.unclaimed.remove(&pid) {
            Some(seen) if seen.when >= started => {
                let _ = tx.send(seen.status);
            }
            _ => {
                inner.waiters.insert(pid, tx);
            }
        }
        rx
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A poisoned lock only means a panic elsewhere; the maps stay usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn exit_before_claim_is_delivered() {
        let r = Reaper::default();
        let started = Instant::now();
        r.exited(42, 3);
        let st = r.claim(42, started).await.unwrap();
        assert_eq!((st.pid, st.code), (42, 3));
    }

    #[tokio::test]
    async fn claim_before_exit_is_delivered() {
        let r = Reaper::default();
        let rx = r.claim(7, Instant::now());
        r.exited(7, 137);
        assert_eq!(rx.await.unwrap().code, 137);
    }

    #[tokio::test]
    async fn stale_exit_of_reused_pid_is_not_taken() {
        let r = Reaper::default();
        r.exited(9, 1);
        let started = Instant::now() + Duration::from_millis(1);
        let mut rx = r.claim(9, started);
        assert!(rx.try_recv().is_err());
        r.exited(9, 0);
        assert_eq!(rx.await.unwrap().code, 0);
    }
}
