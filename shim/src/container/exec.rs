//! Exec processes: added, started through `runc exec`, deleted.

use std::{sync::Arc, time::Instant};

use containerd_shim::asynchronous::io::Stdio;

use super::{lifecycle::read_pid_file, lock, Container, Process, Status};
use crate::{
    error::{Error, Result},
    io::{self, remove_quietly},
};

impl Container {
    pub fn add_exec(&self, exec_id: &str, stdio: Stdio, spec: Vec<u8>) -> Result<()> {
        if exec_id.is_empty() {
            return Err(Error::InvalidArgument("exec id must not be empty".into()));
        }
        self.init
            .require(&[Status::Running, Status::Paused], "exec in")?;
        serde_json::from_slice::<oci_spec::runtime::Process>(&spec)
            .map_err(|e| Error::InvalidArgument(format!("exec process spec: {e}")))?;
        // The request decides the terminal, as with the Go shim: a TTY exec into a
        // container whose own process has none (and the reverse) must work.
        let mut json: serde_json::Value = serde_json::from_slice(&spec)
            .map_err(|e| Error::InvalidArgument(format!("exec process spec: {e}")))?;
        json["terminal"] = serde_json::Value::Bool(stdio.terminal);
        let spec = serde_json::to_vec(&json).map_err(Error::json("encode exec process spec"))?;
        let mut execs = lock(&self.execs);
        if execs.contains_key(exec_id) {
            return Err(Error::AlreadyExists(format!(
                "exec {exec_id} in container {}",
                self.id
            )));
        }
        execs.insert(
            exec_id.to_string(),
            Arc::new(Process::new(&self.id, exec_id, stdio, Some(spec))),
        );
        Ok(())
    }

    pub async fn start_exec(self: &Arc<Self>, exec_id: &str) -> Result<i32> {
        let process = self.process(exec_id)?;
        let _gate = process.start_gate.lock().await;
        process.require(&[Status::Created], "start")?;
        // Counted as running from here: an init that exits meanwhile holds its
        // exit until this start settles (containerd issue 10589's scenario).
        process.set_starting(true);
        let started = self.start_exec_now(&process).await;
        process.set_starting(false);
        if started.is_err() {
            self.release_init_exit();
        }
        started
    }

    async fn start_exec_now(self: &Arc<Self>, process: &Arc<Process>) -> Result<i32> {
        let exec_id = process.exec_id.as_str();
        self.init.require(&[Status::Running], "exec in")?;
        let spec_file = tempfile::Builder::new()
            .prefix(".exec-")
            .suffix(".json")
            .tempfile_in(&self.bundle)
            .map_err(Error::io("exec process file"))?;
        std::fs::write(
            spec_file.path(),
            process.spec.as_deref().unwrap_or_default(),
        )
        .map_err(Error::io("write exec process file"))?;
        let pid_file = self.bundle.join(format!("{exec_id}.pid"));
        remove_quietly(&pid_file);
        let mut pending = io::prepare(&process.stdio, &self.io_owner()).await?;
        let console = pending.console_path();
        let child = pending.take_child();
        let started = Instant::now();
        let io = pending
            .run(self.runc.exec(
                &self.id,
                spec_file.path(),
                &pid_file,
                console.as_deref(),
                child,
            ))
            .await?;
        let pid = match read_pid_file(&pid_file).await {
            Ok(pid) => pid,
            Err(e) => {
                io.tasks.abort().await;
                return Err(e);
            }
        };
        remove_quietly(&pid_file);
        process.set_started(pid, io);
        self.watch_exit(process.clone(), pid, started);
        self.publish_started(process, pid);
        Ok(pid)
    }

    pub async fn delete_exec(&self, exec_id: &str) -> Result<Arc<Process>> {
        let process = self.process(exec_id)?;
        process.require(&[Status::Created, Status::Stopped], "delete")?;
        if let Some(io) = process.io() {
            io.tasks.shutdown().await;
        }
        lock(&self.execs).remove(exec_id);
        Ok(process)
    }
}
