//! The shim's own ttrpc Task API, called directly: unknown container ids never reach a shim
//! through containerd, nor do options containerd refuses itself.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use containerd_client::tonic::Code;
use prost::Message;

use super::RpcError;
use crate::Containerd;

/// Requests of the shim's Task service (containerd/api/runtime/task/v3/shim.proto, which
/// containerd 2 speaks: `"version":3` in the bundle's bootstrap.json).
pub mod shim_api {
    use prost::Message;
    use prost_types::Any;

    pub const SERVICE: &str = "containerd.task.v3.Task";

    /// CreateTaskRequest without rootfs mounts.
    #[derive(Clone, PartialEq, Message)]
    pub struct CreateTaskRequest {
        #[prost(string, tag = "1")]
        pub id: String,
        #[prost(string, tag = "2")]
        pub bundle: String,
        #[prost(string, tag = "8")]
        pub checkpoint: String,
        #[prost(message, optional, tag = "10")]
        pub options: Option<Any>,
    }

    #[derive(Clone, PartialEq, Message)]
    pub struct IdRequest {
        #[prost(string, tag = "1")]
        pub id: String,
        #[prost(string, tag = "2")]
        pub exec_id: String,
    }

    #[derive(Clone, PartialEq, Message)]
    pub struct KillRequest {
        #[prost(string, tag = "1")]
        pub id: String,
        #[prost(string, tag = "2")]
        pub exec_id: String,
        #[prost(uint32, tag = "3")]
        pub signal: u32,
        #[prost(bool, tag = "4")]
        pub all: bool,
    }

    #[derive(Clone, PartialEq, Message)]
    pub struct CheckpointTaskRequest {
        #[prost(string, tag = "1")]
        pub id: String,
        #[prost(string, tag = "2")]
        pub path: String,
        #[prost(message, optional, tag = "3")]
        pub options: Option<Any>,
    }

    #[derive(Clone, PartialEq, Message)]
    pub struct UpdateTaskRequest {
        #[prost(string, tag = "1")]
        pub id: String,
        #[prost(message, optional, tag = "2")]
        pub resources: Option<Any>,
    }

    #[derive(Clone, PartialEq, Message)]
    pub struct ExecProcessRequest {
        #[prost(string, tag = "1")]
        pub id: String,
        #[prost(string, tag = "2")]
        pub exec_id: String,
        #[prost(bool, tag = "3")]
        pub terminal: bool,
        #[prost(string, tag = "4")]
        pub stdin: String,
        #[prost(string, tag = "5")]
        pub stdout: String,
        #[prost(string, tag = "6")]
        pub stderr: String,
        #[prost(message, optional, tag = "7")]
        pub spec: Option<Any>,
    }

    #[derive(Clone, PartialEq, Message)]
    pub struct StateResponse {
        #[prost(string, tag = "1")]
        pub id: String,
        #[prost(string, tag = "2")]
        pub bundle: String,
        #[prost(uint32, tag = "3")]
        pub pid: u32,
        #[prost(int32, tag = "4")]
        pub status: i32,
    }

    #[derive(Clone, PartialEq, Message)]
    pub struct ConnectResponse {
        #[prost(uint32, tag = "1")]
        pub shim_pid: u32,
        #[prost(uint32, tag = "2")]
        pub task_pid: u32,
        #[prost(string, tag = "3")]
        pub version: String,
    }
}

#[derive(Clone, PartialEq, Message)]
struct TtrpcRequest {
    #[prost(string, tag = "1")]
    service: String,
    #[prost(string, tag = "2")]
    method: String,
    #[prost(bytes = "vec", tag = "3")]
    payload: Vec<u8>,
    #[prost(int64, tag = "4")]
    timeout_nano: i64,
}

#[derive(Clone, PartialEq, Message)]
struct TtrpcStatus {
    #[prost(int32, tag = "1")]
    code: i32,
    #[prost(string, tag = "2")]
    message: String,
}

#[derive(Clone, PartialEq, Message)]
struct TtrpcResponse {
    #[prost(message, optional, tag = "1")]
    status: Option<TtrpcStatus>,
    #[prost(bytes = "vec", tag = "2")]
    payload: Vec<u8>,
}

/// A ttrpc connection to the shim serving container `id` (its address from the bundle's
/// `bootstrap.json`), speaking the Task service.
pub struct ShimClient {
    stream: UnixStream,
    next_stream: u32,
}

impl ShimClient {
    pub fn connect(cd: &Containerd, id: &str) -> ShimClient {
        let boot = cd.bundle_dir(id).join("bootstrap.json");
        let text =
            fs::read_to_string(&boot).unwrap_or_else(|e| panic!("read {}: {e}", boot.display()));
        let v: serde_json::Value = serde_json::from_str(&text).expect("bootstrap.json is JSON");
        let address = v["address"].as_str().expect("address in bootstrap.json");
        let path = address.strip_prefix("unix://").unwrap_or(address);
        let stream = UnixStream::connect(path).unwrap_or_else(|e| panic!("connect {path}: {e}"));
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .expect("socket timeout");
        ShimClient {
            stream,
            next_stream: 1,
        }
    }

    /// Calls `method` of the Task service with `req`; the response payload or the status.
    pub fn call(&mut self, method: &str, req: &impl Message) -> Result<Vec<u8>, RpcError> {
        let body = TtrpcRequest {
            service: shim_api::SERVICE.to_string(),
            method: method.to_string(),
            payload: req.encode_to_vec(),
            timeout_nano: 0,
        }
        .encode_to_vec();
        let sid = self.next_stream;
        self.next_stream += 2;
        let mut frame = Vec::with_capacity(10 + body.len());
        frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
        frame.extend_from_slice(&sid.to_be_bytes());
        frame.push(1); // request
        frame.push(0);
        frame.extend_from_slice(&body);
        self.stream.write_all(&frame).expect("write ttrpc request");
        loop {
            let mut head = [0u8; 10];
            self.stream
                .read_exact(&mut head)
                .unwrap_or_else(|e| panic!("ttrpc {method}: read header: {e}"));
            let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
            let rsid = u32::from_be_bytes([head[4], head[5], head[6], head[7]]);
            let mut buf = vec![0u8; len];
            self.stream
                .read_exact(&mut buf)
                .unwrap_or_else(|e| panic!("ttrpc {method}: read body: {e}"));
            if rsid != sid || head[8] != 2 {
                continue;
            }
            let resp = TtrpcResponse::decode(buf.as_slice())
                .unwrap_or_else(|e| panic!("ttrpc {method}: bad response: {e}"));
            return match resp.status {
                Some(s) if s.code != 0 => Err(RpcError {
                    code: Code::from(s.code),
                    message: s.message,
                }),
                _ => Ok(resp.payload),
            };
        }
    }

    /// Connect: (shim pid, task pid).
    pub fn connect_call(&mut self, id: &str) -> Result<(u32, u32), RpcError> {
        let r = self.call(
            "Connect",
            &shim_api::IdRequest {
                id: id.to_string(),
                exec_id: String::new(),
            },
        )?;
        let c = shim_api::ConnectResponse::decode(r.as_slice()).expect("ConnectResponse");
        Ok((c.shim_pid, c.task_pid))
    }

    /// State: (pid, status number: 1 created, 2 running, 3 stopped, 4 paused).
    pub fn state(&mut self, id: &str, exec_id: &str) -> Result<(u32, i32), RpcError> {
        let r = self.call(
            "State",
            &shim_api::IdRequest {
                id: id.to_string(),
                exec_id: exec_id.to_string(),
            },
        )?;
        let s = shim_api::StateResponse::decode(r.as_slice()).expect("StateResponse");
        Ok((s.pid, s.status))
    }
}
