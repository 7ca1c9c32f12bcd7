//! One process of a container (its init or an exec) and its state machine.

use std::sync::{Mutex, MutexGuard};

use containerd_shim::asynchronous::io::Stdio;
use containerd_shim_protos::api::Status as ApiStatus;
use tokio::sync::watch;

use crate::{
    error::{Error, Result},
    io::ProcessIo,
    reaper::ExitStatus,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Created,
    Running,
    Paused,
    Stopped,
}

impl From<Status> for ApiStatus {
    fn from(s: Status) -> Self {
        match s {
            Status::Created => ApiStatus::CREATED,
            Status::Running => ApiStatus::RUNNING,
            Status::Paused => ApiStatus::PAUSED,
            Status::Stopped => ApiStatus::STOPPED,
        }
    }
}

pub struct ProcState {
    pub status: Status,
    pub pid: i32,
    pub io: Option<ProcessIo>,
    pub exit: Option<ExitStatus>,
}

pub struct Process {
    pub container_id: String,
    /// Empty for the container's init process.
    pub exec_id: String,
    pub stdio: Stdio,
    /// The OCI process spec of an exec, as JSON.
    pub spec: Option<Vec<u8>>,
    state: Mutex<ProcState>,
    exited: watch::Sender<Option<ExitStatus>>,
    /// Held while the process starts: its exit is handled only after its
    /// start event is out, however fast it exits.
    pub start_gate: tokio::sync::Mutex<()>,
    /// An exec whose Start has begun: it counts as running (the init's exit
    /// waits for it), as with the Go shim, until the start settles.
    starting: std::sync::atomic::AtomicBool,
}

impl Process {
    pub fn new(container_id: &str, exec_id: &str, stdio: Stdio, spec: Option<Vec<u8>>) -> Self {
        Self {
            container_id: container_id.to_string(),
            exec_id: exec_id.to_string(),
            stdio,
            spec,
            state: Mutex::new(ProcState {
                status: Status::Created,
                pid: 0,
                io: None,
                exit: None,
            }),
            exited: watch::channel(None).0,
            start_gate: tokio::sync::Mutex::new(()),
            starting: std::sync::atomic::AtomicBool::new(false),
        }
    }

    pub fn set_starting(&self, starting: bool) {
        self.starting
            .store(starting, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn is_starting(&self) -> bool {
        self.starting.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn is_init(&self) -> bool {
        self.exec_id.is_empty()
    }

    /// "container x" or "exec y in container x", for messages.
    pub fn describe(&self) -> String {
        if self.is_init() {
            format!("container {}", self.container_id)
        } else {
            format!("exec {} in container {}", self.exec_id, self.container_id)
        }
    }

    pub fn state(&self) -> MutexGuard<'_, ProcState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn status(&self) -> Status {
        self.state().status
    }

    pub fn pid(&self) -> i32 {
        self.state().pid
    }

    pub fn io(&self) -> Option<ProcessIo> {
        self.state().io.clone()
    }

    /// Moves `from` → `to`, or says why the process is in the wrong state.
    pub fn transition(&self, from: &[Status], to: Status, verb: &str) -> Result<()> {
        let mut st = self.state();
        if !from.contains(&st.status) {
            return Err(self.wrong_state(st.status, verb));
        }
        st.status = to;
        Ok(())
    }

    pub fn require(&self, allowed: &[Status], verb: &str) -> Result<Status> {
        let status = self.status();
        if allowed.contains(&status) {
            Ok(status)
        } else {
            Err(self.wrong_state(status, verb))
        }
    }

    fn wrong_state(&self, status: Status, verb: &str) -> Error {
        let what = self.describe();
        match status {
            Status::Stopped if verb == "kill" => {
                Error::NotFound(format!("process already finished: {what}"))
            }
            s => Error::FailedPrecondition(format!(
                "cannot {verb} {what}: it is {}",
                format!("{s:?}").to_lowercase()
            )),
        }
    }

    pub fn set_started(&self, pid: i32, io: ProcessIo) {
        let mut st = self.state();
        st.pid = pid;
        st.io = Some(io);
        if st.status == Status::Created {
            st.status = Status::Running;
        }
    }

    pub fn mark_running(&self) {
        let mut st = self.state();
        if st.status == Status::Created {
            st.status = Status::Running;
        }
    }

    /// Records the pid of a created (not yet started) init.
    pub fn set_created(&self, pid: i32, io: ProcessIo) {
        let mut st = self.state();
        st.pid = pid;
        st.io = Some(io);
    }

    pub fn set_exited(&self, exit: ExitStatus) {
        {
            let mut st = self.state();
            st.status = Status::Stopped;
            st.exit = Some(exit);
        }
        self.exited.send_replace(Some(exit));
    }

    pub fn exit(&self) -> Option<ExitStatus> {
        self.state().exit
    }

    pub async fn wait(&self) -> ExitStatus {
        let mut rx = self.exited.subscribe();
        loop {
            if let Some(exit) = *rx.borrow_and_update() {
                return exit;
            }
            if rx.changed().await.is_err() {
                // The sender lives as long as the process; unreachable in practice.
                std::future::pending::<()>().await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use containerd_shim_protos::ttrpc::Code;

    #[tokio::test]
    async fn wait_returns_after_exit_and_states_are_checked() {
        let p = std::sync::Arc::new(Process::new("c", "", Stdio::default(), None));
        assert_eq!(
            p.transition(&[Status::Running], Status::Paused, "pause")
                .unwrap_err()
                .code(),
            Code::FAILED_PRECONDITION
        );
        p.set_started(10, ProcessIo::default());
        assert_eq!(p.status(), Status::Running);
        let waiter = tokio::spawn({
            let p = p.clone();
            async move { p.wait().await }
        });
        p.set_exited(ExitStatus {
            pid: 10,
            code: 3,
            at: time::OffsetDateTime::now_utc(),
        });
        assert_eq!(waiter.await.unwrap().code, 3);
        assert_eq!(p.wait().await.code, 3);
        assert_eq!(
            p.require(&[Status::Running], "kill").unwrap_err().code(),
            Code::NOT_FOUND
        );
    }
}
