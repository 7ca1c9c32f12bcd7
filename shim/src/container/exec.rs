//! Exec processes: added, started through `runc exec`, deleted.

use std::{sync::Arc, time::Instant};

use containerd_shim::asynchronous::io::Stdio;

use super::{lifecycle::read_pid_file, lock, Container, Process, Status};
use crate::{
    error::{Error, Result},
    io::{self, remove_quietly},
};

/// What an exec's process spec must be for runc to take it: the OCI
/// process's fields with their types, as the Go shim's `json.Unmarshal` into
/// `specs.Process` checks them (a `null` is a zero value, unknown fields are
/// ignored); runc checks the rest. Not oci-spec's `Process`: its validation of
/// one field links a regex engine into the shim.
#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
#[allow(dead_code)] // only parsed, to check the types
struct ProcessSpec {
    terminal: Option<bool>,
    console_size: Option<ConsoleSize>,
    user: Option<User>,
    args: Option<Vec<Option<String>>>,
    command_line: Option<String>,
    env: Option<Vec<Option<String>>>,
    cwd: Option<String>,
    capabilities: Option<Capabilities>,
    rlimits: Option<Vec<Option<Rlimit>>>,
    no_new_privileges: Option<bool>,
    apparmor_profile: Option<String>,
    oom_score_adj: Option<i32>,
    scheduler: Option<serde_json::Map<String, serde_json::Value>>,
    selinux_label: Option<String>,
    io_priority: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(rename = "execCPUAffinity")]
    exec_cpu_affinity: Option<serde_json::Map<String, serde_json::Value>>,
}

#[derive(serde::Deserialize)]
#[allow(dead_code)]
struct ConsoleSize {
    height: Option<u64>,
    width: Option<u64>,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
#[allow(dead_code)]
struct User {
    uid: Option<u32>,
    gid: Option<u32>,
    umask: Option<u32>,
    additional_gids: Option<Vec<Option<u32>>>,
    username: Option<String>,
}

#[derive(serde::Deserialize)]
#[allow(dead_code)]
struct Capabilities {
    bounding: Option<Vec<Option<String>>>,
    effective: Option<Vec<Option<String>>>,
    inheritable: Option<Vec<Option<String>>>,
    permitted: Option<Vec<Option<String>>>,
    ambient: Option<Vec<Option<String>>>,
}

#[derive(serde::Deserialize)]
#[allow(dead_code)]
struct Rlimit {
    #[serde(rename = "type")]
    kind: Option<String>,
    hard: Option<u64>,
    soft: Option<u64>,
}

/// The exec's process spec as JSON, once its fields have the OCI types.
fn check_process_spec(spec: &[u8]) -> Result<serde_json::Value> {
    let bad = |e: String| Error::InvalidArgument(format!("exec process spec: {e}"));
    let json: serde_json::Value = serde_json::from_slice(spec).map_err(|e| bad(e.to_string()))?;
    if !json.is_object() {
        return Err(bad("not a JSON object".into()));
    }
    <ProcessSpec as serde::Deserialize>::deserialize(&json).map_err(|e| bad(e.to_string()))?;
    Ok(json)
}

impl Container {
    pub fn add_exec(&self, exec_id: &str, stdio: Stdio, spec: Vec<u8>) -> Result<()> {
        if exec_id.is_empty() {
            return Err(Error::InvalidArgument("exec id must not be empty".into()));
        }
        self.init
            .require(&[Status::Running, Status::Paused], "exec in")?;
        let mut json = check_process_spec(&spec)?;
        // The request decides the terminal, as with the Go shim: a TTY exec into a
        // container whose own process has none (and the reverse) must work.
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

#[cfg(test)]
mod tests {
    use super::check_process_spec;

    fn parses(json: &str) -> bool {
        check_process_spec(json.as_bytes()).is_ok()
    }

    #[test]
    fn an_exec_spec_is_checked_for_the_types_of_its_fields() {
        assert!(parses(
            r#"{"args":["sh","-c","true"],"env":["A=1"],"cwd":"/","user":{"uid":0,"gid":0},
               "terminal":false,"capabilities":{"bounding":["CAP_KILL"],"ambient":null},
               "rlimits":[{"type":"RLIMIT_NOFILE","hard":1024,"soft":1024}],
               "noNewPrivileges":true,"execCPUAffinity":{"initial":"0-1"},"unknown":1}"#
        ));
        assert!(parses("{}"));
        // What the Go shim's json.Unmarshal takes too: nulls, missing fields, unknown ones.
        assert!(parses(
            r#"{"user":{"uid":null,"umask":null},"args":[null],"rlimits":[{"type":"RLIMIT_CORE"}],
               "consoleSize":{"height":24},"capabilities":{"bounding":null,"future":7},
               "scheduler":{"policy":"SCHED_OTHER"},"ioPriority":{"class":"IOPRIO_CLASS_BE"}}"#
        ));
        assert!(!parses(r#"{"args":"sh"}"#));
        assert!(!parses(r#"{"user":{"uid":-1}}"#));
        assert!(!parses(r#"{"terminal":"yes"}"#));
        assert!(!parses(
            r#"{"rlimits":[{"type":"RLIMIT_NOFILE","hard":"x"}]}"#
        ));
        assert!(!parses(r#"{"scheduler":"fifo"}"#));
        assert!(!parses(r#"{"capabilities":{"bounding":"CAP_KILL"}}"#));
        assert!(!parses("[]"));
        assert!(!parses("not json"));
    }
}
