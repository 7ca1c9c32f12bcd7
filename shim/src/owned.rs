//! Operations that own their outcome.
//!
//! ttrpc drops a request's future when the request times out or its
//! connection closes. An operation that freezes a container, runs CRIU or
//! mounts a rootfs must not stop half-way because of that: it runs in a task
//! of its own, to completion or to a rollback it decides itself, and learns
//! from a [`Caller`] whether anyone still waits for its result.

use std::{
    future::Future,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
};

use crate::error::{Error, Result};

/// Tells an owned operation whether its caller is still there.
#[derive(Clone, Debug, Default)]
pub struct Caller {
    gone: Arc<AtomicBool>,
    vanished: Option<Arc<std::path::PathBuf>>,
}

impl Caller {
    pub fn gone(&self) -> bool {
        self.gone.load(Ordering::SeqCst)
            || self
                .vanished
                .as_ref()
                .is_some_and(|p| !p.as_path().exists())
    }

    /// This caller, also counted gone once `path` (the caller's own, there
    /// when it asked) no longer exists: a caller that gives up may remove its
    /// directory before its request is seen to end.
    pub fn or_when_gone(&self, path: Option<std::path::PathBuf>) -> Self {
        Self {
            gone: self.gone.clone(),
            vanished: path.map(Arc::new),
        }
    }

    /// Cancelled when the caller gave up: the operation rolls back from here.
    pub fn check(&self, what: &str) -> Result<()> {
        if self.gone() {
            Err(Error::Cancelled(format!(
                "the caller gave up before {what} could finish; it was rolled back"
            )))
        } else {
            Ok(())
        }
    }
}

/// Marks the caller gone when the request future holding it is dropped.
struct CallerGuard(Option<Arc<AtomicBool>>);

impl CallerGuard {
    /// The caller took the result: it never gave up.
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for CallerGuard {
    fn drop(&mut self) {
        if let Some(gone) = self.0.take() {
            gone.store(true, Ordering::SeqCst);
        }
    }
}

/// [`run`], waiting at most `deadline` (the request's own timeout, which the
/// shim enforces itself rather than trust the transport to): past it the
/// caller counts as gone and the answer is DeadlineExceeded.
pub async fn run_within<T, Fut>(
    deadline: Option<std::time::Duration>,
    op: impl FnOnce(Caller) -> Fut,
) -> Result<T>
where
    Fut: Future<Output = Result<T>> + Send + 'static,
    T: Send + 'static,
{
    let Some(deadline) = deadline else {
        return run(op).await;
    };
    match tokio::time::timeout(deadline, run(op)).await {
        Ok(result) => result,
        Err(_) => Err(Error::DeadlineExceeded(format!(
            "the caller's deadline ({deadline:?}) passed; the operation is rolled back or \
             finished on its own"
        ))),
    }
}

/// Runs `op` in a task of its own and waits for it. If the waiting future is
/// dropped, `op` goes on and sees [`Caller::gone`].
pub async fn run<T, Fut>(op: impl FnOnce(Caller) -> Fut) -> Result<T>
where
    Fut: Future<Output = Result<T>> + Send + 'static,
    T: Send + 'static,
{
    let caller = Caller::default();
    let guard = CallerGuard(Some(caller.gone.clone()));
    let task = tokio::spawn(op(caller));
    let result = task
        .await
        .map_err(|e| Error::Internal(format!("operation task failed: {e}")))?;
    // Only now: the result was taken, so the caller was there to the end.
    guard.disarm();
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_dropped_caller_does_not_stop_the_operation() {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let waiting = run(|caller| async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let _ = tx.send(caller.gone());
            Ok(())
        });
        // The caller gives up after 5 ms; the operation still runs to its end.
        let _ = tokio::time::timeout(Duration::from_millis(5), waiting).await;
        assert!(
            rx.await.unwrap(),
            "the operation must see that its caller left"
        );
    }

    #[tokio::test]
    async fn a_deadline_is_enforced_by_the_shim_itself() {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let r = run_within(Some(Duration::from_millis(5)), |caller| async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let _ = tx.send(caller.gone());
            Ok(())
        })
        .await;
        assert!(matches!(r, Err(Error::DeadlineExceeded(_))), "{r:?}");
        assert!(rx.await.unwrap());
    }

    #[tokio::test]
    async fn a_caller_that_waits_is_not_gone() {
        let seen = run(|caller| async move { Ok(caller.gone()) })
            .await
            .unwrap();
        assert!(!seen);
        assert!(Caller::default().check("x").is_ok());
    }
}
