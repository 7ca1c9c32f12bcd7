//! The shim's one error type, and the one place where errors become ttrpc codes.

use std::path::PathBuf;

use containerd_shim_protos::ttrpc::{self, Code};

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0} not found")]
    NotFound(String),

    #[error("{0} already exists")]
    AlreadyExists(String),

    #[error("{0}")]
    FailedPrecondition(String),

    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    #[error("{0} is not implemented")]
    Unimplemented(String),

    /// runc or CRIU ran past its time and was killed; the container was put back.
    #[error("{0}")]
    DeadlineExceeded(String),

    /// The caller gave up before the operation could commit; it was rolled back.
    #[error("{0}")]
    Cancelled(String),

    /// runc exited non-zero; `message` is runc's own last error line.
    #[error("runc {command} failed: {message}")]
    Runc { command: String, message: String },

    /// CRIU failed under runc checkpoint/restore. `log` is the kept CRIU log.
    #[error("criu {action} failed: {message} (log: {})", log.display())]
    Criu {
        action: &'static str,
        message: String,
        log: PathBuf,
    },

    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },

    #[error("{context}: {source}")]
    Nix {
        context: String,
        #[source]
        source: nix::Error,
    },

    #[error("{context}: {source}")]
    Json {
        context: String,
        #[source]
        source: serde_json::Error,
    },

    #[error("{context}: {source}")]
    Protobuf {
        context: String,
        #[source]
        source: containerd_shim_protos::protobuf::Error,
    },

    #[error("{context}: {source}")]
    Shim {
        context: String,
        #[source]
        source: containerd_shim::Error,
    },

    #[error("{0}")]
    Internal(String),
}

impl Error {
    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let context = context.into();
        move |source| Error::Io { context, source }
    }

    pub fn nix(context: impl Into<String>) -> impl FnOnce(nix::Error) -> Error {
        let context = context.into();
        move |source| Error::Nix { context, source }
    }

    pub fn json(context: impl Into<String>) -> impl FnOnce(serde_json::Error) -> Error {
        let context = context.into();
        move |source| Error::Json { context, source }
    }

    pub fn proto(
        context: impl Into<String>,
    ) -> impl FnOnce(containerd_shim_protos::protobuf::Error) -> Error {
        let context = context.into();
        move |source| Error::Protobuf { context, source }
    }

    pub fn shim(context: impl Into<String>) -> impl FnOnce(containerd_shim::Error) -> Error {
        let context = context.into();
        move |source| Error::Shim { context, source }
    }

    /// The ttrpc code containerd turns back into its errdefs class.
    pub fn code(&self) -> Code {
        match self {
            Error::NotFound(_) => Code::NOT_FOUND,
            Error::AlreadyExists(_) => Code::ALREADY_EXISTS,
            Error::FailedPrecondition(_) => Code::FAILED_PRECONDITION,
            // Protobuf errors come from decoding what the request carried.
            Error::InvalidArgument(_) | Error::Protobuf { .. } => Code::INVALID_ARGUMENT,
            Error::Unimplemented(_) => Code::UNIMPLEMENTED,
            Error::DeadlineExceeded(_) => Code::DEADLINE_EXCEEDED,
            Error::Cancelled(_) => Code::CANCELLED,
            Error::Runc { command, message } => runc_code(command, message),
            Error::Criu { .. } => Code::INTERNAL,
            // NotFound is for unknown ids and processes already gone: a missing
            // file (the runc binary, a pid file) is the shim's own failure.
            Error::Io { .. }
            | Error::Json { .. }
            | Error::Nix { .. }
            | Error::Shim { .. }
            | Error::Internal(_) => Code::INTERNAL,
        }
    }
}

/// runc reports some state errors only as text; containerd's clients act on
/// the class. As the Go shim decides (`checkKillError`): a kill of a process
/// that is gone ("container not running" included) is NotFound, so that a CRI
/// StopContainer racing a natural exit succeeds.
fn runc_code(command: &str, message: &str) -> Code {
    let m = message.to_ascii_lowercase();
    if m.contains("container does not exist")
        || m.contains("process already finished")
        || m.contains("no such process")
        || (command == "kill" && m.contains("container not running"))
    {
        Code::NOT_FOUND
    } else if m.contains("not running") || m.contains("not paused") || m.contains("is paused") {
        Code::FAILED_PRECONDITION
    } else {
        Code::UNKNOWN
    }
}

impl From<Error> for ttrpc::Error {
    fn from(e: Error) -> Self {
        // The whole cause chain, so that a runc or CRIU message reaches the client.
        let mut message = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            let text = s.to_string();
            if !message.contains(&text) {
                message.push_str(": ");
                message.push_str(&text);
            }
            source = s.source();
        }
        ttrpc::Error::RpcStatus(ttrpc::get_status(e.code(), message))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(e: Error) -> (Code, String) {
        match ttrpc::Error::from(e) {
            ttrpc::Error::RpcStatus(s) => (s.code(), s.message),
            other => panic!("not a status: {other:?}"),
        }
    }

    #[test]
    fn codes_map_to_their_class() {
        assert_eq!(
            status(Error::NotFound("container x".into())).0,
            Code::NOT_FOUND
        );
        assert_eq!(
            status(Error::AlreadyExists("x".into())).0,
            Code::ALREADY_EXISTS
        );
        assert_eq!(
            status(Error::FailedPrecondition("paused".into())).0,
            Code::FAILED_PRECONDITION
        );
        assert_eq!(
            status(Error::InvalidArgument("bad".into())).0,
            Code::INVALID_ARGUMENT
        );
        assert_eq!(
            status(Error::Unimplemented("x".into())).0,
            Code::UNIMPLEMENTED
        );
    }

    #[test]
    fn runc_messages_keep_their_text_and_class() {
        let (code, msg) = status(Error::Runc {
            command: "kill".into(),
            message: "container not running".into(),
        });
        assert_eq!(code, Code::NOT_FOUND);
        assert!(msg.contains("container not running"), "{msg}");
        let (code, _) = status(Error::Runc {
            command: "pause".into(),
            message: "container not running".into(),
        });
        assert_eq!(code, Code::FAILED_PRECONDITION);
        let (code, _) = status(Error::Runc {
            command: "kill".into(),
            message: "process already finished".into(),
        });
        assert_eq!(code, Code::NOT_FOUND);
        let (code, _) = status(Error::Runc {
            command: "start".into(),
            message: "exec: \"nope\": executable file not found in $PATH".into(),
        });
        assert_eq!(code, Code::UNKNOWN);
    }

    #[test]
    fn internal_failures_are_not_not_found() {
        // A missing runc binary must not read as "already stopped" to the CRI.
        let e = Error::io("spawn runc")(std::io::Error::from(std::io::ErrorKind::NotFound));
        assert_eq!(status(e).0, Code::INTERNAL);
        let e = Error::json("decode runc ps")(serde_json::from_str::<u8>("x").unwrap_err());
        assert_eq!(status(e).0, Code::INTERNAL);
        assert_eq!(
            status(Error::DeadlineExceeded("slow".into())).0,
            Code::DEADLINE_EXCEEDED
        );
    }

    #[test]
    fn io_cause_is_kept() {
        let e = Error::io("open /x")(std::io::Error::from_raw_os_error(libc::ENOSPC));
        let (code, msg) = status(e);
        assert_eq!(code, Code::INTERNAL);
        assert!(
            msg.contains("open /x") && msg.contains("No space left"),
            "{msg}"
        );
    }
}
