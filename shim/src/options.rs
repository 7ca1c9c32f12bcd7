//! Runtime and checkpoint options as containerd sends them, decoded into one
//! domain type each. Bad options are InvalidArgument, never a panic.

use std::path::{Path, PathBuf};

use containerd_shim_protos::{
    protobuf::{well_known_types::any::Any, Message},
    shim::oci::{CheckpointOptions as ProtoCheckpointOptions, Options as ProtoOptions},
};
use serde::{Deserialize, Serialize};
use shim_protos::runtimeoptions::Options as CriOptions;

use crate::error::{Error, Result};

/// Where runc keeps container state unless the options say otherwise; the
/// namespace is appended, as the Go shim does.
pub const DEFAULT_RUNC_ROOT: &str = "/run/containerd/runc";

/// The runtime options a container was created with, kept in the bundle as
/// `options.json` so that the `delete` action finds runc's root after a crash.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RuntimeOptions {
    #[serde(alias = "BinaryName")]
    pub binary_name: String,
    #[serde(alias = "Root")]
    pub root: String,
    #[serde(alias = "SystemdCgroup")]
    pub systemd_cgroup: bool,
    #[serde(alias = "NoPivotRoot")]
    pub no_pivot_root: bool,
    #[serde(alias = "NoNewKeyring")]
    pub no_new_keyring: bool,
    #[serde(alias = "ShimCgroup")]
    pub shim_cgroup: String,
    #[serde(alias = "IoUid")]
    pub io_uid: u32,
    #[serde(alias = "IoGid")]
    pub io_gid: u32,
    #[serde(alias = "CriuImagePath")]
    pub criu_image_path: String,
    #[serde(alias = "CriuWorkPath")]
    pub criu_work_path: String,
    /// How long one `runc checkpoint` or `runc restore` (and the CRIU under
    /// it) may run, in seconds; 0 means [`DEFAULT_CRIU_TIMEOUT`]. Past it the
    /// shim kills them, puts the container back and reports DeadlineExceeded.
    /// Only the CRI's TOML options can carry it (`CriuTimeout = 120`).
    #[serde(alias = "CriuTimeout")]
    pub criu_timeout: u64,
    /// This shim's extension (field 1001 of `containerd.runc.v1.Options`,
    /// given as task options at Create): `ADDRESS:PORT` of the page server
    /// of a lazy checkpoint's source. Start then restores with
    /// `runc restore --lazy-pages`, the memory pulled from there on first
    /// touch and in the background by a `criu lazy-pages` daemon.
    pub lazy_pages_from: String,
}

/// The time runc and CRIU get for one checkpoint or restore unless the
/// runtime options say otherwise: generous, since a dump of a large container
/// to a slow disk takes minutes, but bounded.
pub const DEFAULT_CRIU_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);

impl RuntimeOptions {
    pub fn runc_binary(&self) -> PathBuf {
        if self.binary_name.is_empty() {
            PathBuf::from("runc")
        } else {
            PathBuf::from(&self.binary_name)
        }
    }

    pub fn criu_timeout(&self) -> std::time::Duration {
        if self.criu_timeout == 0 {
            DEFAULT_CRIU_TIMEOUT
        } else {
            std::time::Duration::from_secs(self.criu_timeout)
        }
    }

    pub fn runc_root(&self, namespace: &str) -> PathBuf {
        let root = if self.root.is_empty() {
            DEFAULT_RUNC_ROOT
        } else {
            &self.root
        };
        Path::new(root).join(namespace)
    }

    /// Decodes the `options` of a CreateTaskRequest.
    pub fn from_any(any: Option<&Any>) -> Result<Self> {
        let Some(any) = any.filter(|a| !a.type_url.is_empty() || !a.value.is_empty()) else {
            return Ok(Self::default());
        };
        match type_name(&any.type_url) {
            "containerd.runc.v1.Options" => {
                let o = ProtoOptions::parse_from_bytes(&any.value)
                    .map_err(Error::proto("decode containerd.runc.v1.Options"))?;
                let lazy_pages_from = extension_strings(&o, LAZY_PAGES_FROM_FIELD, "task")?
                    .pop()
                    .unwrap_or_default();
                Ok(Self {
                    binary_name: o.binary_name,
                    root: o.root,
                    systemd_cgroup: o.systemd_cgroup,
                    no_pivot_root: o.no_pivot_root,
                    no_new_keyring: o.no_new_keyring,
                    shim_cgroup: o.shim_cgroup,
                    io_uid: o.io_uid,
                    io_gid: o.io_gid,
                    criu_image_path: o.criu_image_path,
                    lazy_pages_from,
                    criu_work_path: o.criu_work_path,
                    criu_timeout: 0,
                })
            }
            "runtimeoptions.v1.Options" => {
                let o = CriOptions::parse_from_bytes(&any.value)
                    .map_err(Error::proto("decode runtimeoptions.v1.Options"))?;
                let body = if !o.config_path.is_empty() {
                    std::fs::read(&o.config_path)
                        .map_err(Error::io(format!("read runtime config {}", o.config_path)))?
                } else {
                    o.config_body
                };
                Self::from_toml(&body)
            }
            other => Err(Error::InvalidArgument(format!(
                "unsupported runtime options type {other:?}"
            ))),
        }
    }

    /// The TOML options section of containerd's runtime config, in the Go
    /// field names (`BinaryName`) or snake case.
    pub fn from_toml(body: &[u8]) -> Result<Self> {
        let text = std::str::from_utf8(body)
            .map_err(|e| Error::InvalidArgument(format!("runtime options are not UTF-8: {e}")))?;
        toml::from_str(text)
            .map_err(|e| Error::InvalidArgument(format!("runtime options TOML: {e}")))
    }

    pub fn write(&self, bundle: &Path) -> Result<()> {
        let path = bundle.join("options.json");
        let json = serde_json::to_vec(self).map_err(Error::json("encode options"))?;
        std::fs::write(&path, json).map_err(Error::io(format!("write {}", path.display())))
    }

    /// Reads back what [`Self::write`] stored; defaults if there is nothing.
    pub fn read(bundle: &Path) -> Result<Self> {
        let path = bundle.join("options.json");
        match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b)
                .map_err(Error::json(format!("decode {}", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(Error::io(format!("read {}", path.display()))(e)),
        }
    }
}

/// What a checkpoint was asked to do, from `containerd.runc.v1.CheckpointOptions`.
#[derive(Clone, Debug, PartialEq)]
pub struct CheckpointOptions {
    pub exit: bool,
    pub open_tcp: bool,
    pub external_unix_sockets: bool,
    pub terminal: bool,
    pub file_locks: bool,
    pub empty_namespaces: Vec<String>,
    pub cgroups_mode: String,
    pub image_path: String,
    pub work_path: String,
    /// This shim's extension (field 1001 of the message, which containerd
    /// passes through untouched and other shims ignore): bind-mount
    /// destinations whose contents go into the checkpoint, or `*` for every
    /// writable bind mount of a directory.
    pub volumes: Vec<String>,
    /// This shim's extension (field 1002): `ADDRESS:PORT` of a CRIU page
    /// server that takes the memory pages during the dump (a migration
    /// streams them to the destination while the container is frozen).
    pub page_server: String,
    /// This shim's extension (field 1003): a lazy (post-copy) checkpoint.
    /// The request returns once CRIU is ready, with every image but the
    /// memory pages; a page server on `page_server`'s port serves those to
    /// the destination's `criu lazy-pages` while the container stays frozen.
    /// When the destination has them all the container exits; if it never
    /// connects, or goes away before it has them all, the container resumes.
    pub lazy: bool,
    /// This shim's extension (field 1004): how long a lazy checkpoint's page
    /// server waits for the destination, in seconds (0: [`DEFAULT_LAZY_CONNECT_TIMEOUT`]).
    pub lazy_connect_timeout: u64,
    /// This shim's extension (field 1005): the IP address the destination
    /// connects from. A lazy checkpoint's page server serves the pages to
    /// that peer only (empty: to the first that connects).
    pub lazy_peer: String,
    /// Whether the request carried options at all. containerd's CRI sends
    /// none for a runtime not named runc; `ctr` always sends them.
    pub given: bool,
}

impl Default for CheckpointOptions {
    /// No options at all (containerd's CRI sends none for a runtime not named
    /// runc) means: leave running, with file locks.
    fn default() -> Self {
        Self {
            exit: false,
            open_tcp: false,
            external_unix_sockets: false,
            terminal: false,
            file_locks: true,
            empty_namespaces: Vec::new(),
            cgroups_mode: String::new(),
            image_path: String::new(),
            work_path: String::new(),
            volumes: Vec::new(),
            page_server: String::new(),
            lazy: false,
            lazy_connect_timeout: 0,
            lazy_peer: String::new(),
            given: false,
        }
    }
}

impl CheckpointOptions {
    pub fn from_any(any: Option<&Any>) -> Result<Self> {
        let Some(any) = any.filter(|a| !a.type_url.is_empty() || !a.value.is_empty()) else {
            return Ok(Self::default());
        };
        match type_name(&any.type_url) {
            "containerd.runc.v1.CheckpointOptions" => {
                let o = ProtoCheckpointOptions::parse_from_bytes(&any.value)
                    .map_err(Error::proto("decode containerd.runc.v1.CheckpointOptions"))?;
                let volumes = extension_strings(&o, VOLUMES_FIELD, "checkpoint")?;
                let page_server = extension_strings(&o, PAGE_SERVER_FIELD, "checkpoint")?
                    .pop()
                    .unwrap_or_default();
                let lazy = extension_varint(&o, LAZY_FIELD)?.is_some_and(|v| v != 0);
                let lazy_connect_timeout =
                    extension_varint(&o, LAZY_CONNECT_TIMEOUT_FIELD)?.unwrap_or(0);
                let lazy_peer = extension_strings(&o, LAZY_PEER_FIELD, "checkpoint")?
                    .pop()
                    .unwrap_or_default();
                if !lazy_peer.is_empty() && lazy_peer.parse::<std::net::IpAddr>().is_err() {
                    return Err(Error::InvalidArgument(format!(
                        "lazy peer {lazy_peer:?} is not an IP address (field {LAZY_PEER_FIELD})"
                    )));
                }
                if lazy && page_server.is_empty() {
                    return Err(Error::InvalidArgument(
                        "a lazy checkpoint needs the page server's ADDRESS:PORT (field 1002)"
                            .into(),
                    ));
                }
                if lazy && o.open_tcp {
                    return Err(Error::InvalidArgument(
                        "a lazy checkpoint cannot keep established TCP connections: \
                         `open_tcp` is not given with it"
                            .into(),
                    ));
                }
                if lazy && o.exit {
                    return Err(Error::InvalidArgument(
                        "a lazy checkpoint exits once the destination has the pages; \
                         `exit` is not given with it"
                            .into(),
                    ));
                }
                Ok(Self {
                    exit: o.exit,
                    open_tcp: o.open_tcp,
                    external_unix_sockets: o.external_unix_sockets,
                    terminal: o.terminal,
                    file_locks: o.file_locks,
                    empty_namespaces: o.empty_namespaces,
                    cgroups_mode: o.cgroups_mode,
                    image_path: o.image_path,
                    volumes,
                    page_server,
                    lazy,
                    lazy_connect_timeout,
                    lazy_peer,
                    work_path: o.work_path,
                    given: true,
                })
            }
            other => Err(Error::InvalidArgument(format!(
                "unsupported checkpoint options type {other:?}"
            ))),
        }
    }
}

/// The field number of [`CheckpointOptions::volumes`] in `containerd.runc.v1.CheckpointOptions`.
pub const VOLUMES_FIELD: u32 = 1001;
/// The field number of [`CheckpointOptions::page_server`].
pub const PAGE_SERVER_FIELD: u32 = 1002;

/// The field number of [`CheckpointOptions::lazy`].
pub const LAZY_FIELD: u32 = 1003;
/// The field number of [`CheckpointOptions::lazy_connect_timeout`].
pub const LAZY_CONNECT_TIMEOUT_FIELD: u32 = 1004;
/// The field number of [`CheckpointOptions::lazy_peer`].
pub const LAZY_PEER_FIELD: u32 = 1005;
/// The field number of [`RuntimeOptions::lazy_pages_from`] in `containerd.runc.v1.Options`.
pub const LAZY_PAGES_FROM_FIELD: u32 = 1001;
/// How long a lazy checkpoint's page server waits for the destination.
pub const DEFAULT_LAZY_CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// The last value of an unknown varint (extension) field of `msg`, if any.
fn extension_varint(msg: &ProtoCheckpointOptions, field: u32) -> Result<Option<u64>> {
    use containerd_shim_protos::protobuf::UnknownValueRef;
    let mut last = None;
    for (n, v) in msg.special_fields.unknown_fields().iter() {
        if n != field {
            continue;
        }
        match v {
            UnknownValueRef::Varint(v) => last = Some(v),
            _ => {
                return Err(Error::InvalidArgument(format!(
                    "checkpoint option field {field} is not a number"
                )))
            }
        }
    }
    Ok(last)
}

/// The strings of an unknown (extension) field of `msg`.
fn extension_strings(
    msg: &dyn containerd_shim_protos::protobuf::MessageDyn,
    field: u32,
    what: &str,
) -> Result<Vec<String>> {
    use containerd_shim_protos::protobuf::UnknownValueRef;
    msg.special_fields_dyn()
        .unknown_fields()
        .iter()
        .filter(|(n, _)| *n == field)
        .map(|(_, v)| match v {
            UnknownValueRef::LengthDelimited(b) => String::from_utf8(b.to_vec())
                .map_err(|e| Error::InvalidArgument(format!("{what} option field {field}: {e}"))),
            _ => Err(Error::InvalidArgument(format!(
                "{what} option field {field} is not a string"
            ))),
        })
        .collect()
}

/// containerd sends type URLs both bare and with a `host/` prefix.
fn type_name(url: &str) -> &str {
    url.rsplit('/').next().unwrap_or(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn any(url: &str, msg: &dyn containerd_shim_protos::protobuf::MessageDyn) -> Any {
        Any {
            type_url: url.into(),
            value: msg.write_to_bytes_dyn().unwrap(),
            ..Default::default()
        }
    }

    #[test]
    fn runc_options_with_and_without_prefix() {
        let o = ProtoOptions {
            binary_name: "/usr/sbin/runc".into(),
            systemd_cgroup: true,
            criu_image_path: "/img".into(),
            ..Default::default()
        };
        for url in [
            "containerd.runc.v1.Options",
            "types.containerd.io/containerd.runc.v1.Options",
        ] {
            let r = RuntimeOptions::from_any(Some(&any(url, &o))).unwrap();
            assert_eq!(r.binary_name, "/usr/sbin/runc");
            assert!(r.systemd_cgroup);
            assert_eq!(r.criu_image_path, "/img");
        }
    }

    #[test]
    fn cri_toml_options() {
        let cri = CriOptions {
            type_url: "runtimeoptions.v1.Options".into(),
            config_body:
                b"BinaryName = \"/opt/runc\"\nSystemdCgroup = true\nRoot = \"/r\"\nCriuTimeout = 7\n"
                    .to_vec(),
            ..Default::default()
        };
        let r = RuntimeOptions::from_any(Some(&any("runtimeoptions.v1.Options", &cri))).unwrap();
        assert_eq!(r.binary_name, "/opt/runc");
        assert_eq!(r.root, "/r");
        assert!(r.systemd_cgroup);
        assert_eq!(r.runc_root("k8s.io"), PathBuf::from("/r/k8s.io"));
        assert_eq!(r.criu_timeout(), std::time::Duration::from_secs(7));
        assert_eq!(
            RuntimeOptions::default().criu_timeout(),
            DEFAULT_CRIU_TIMEOUT
        );
    }

    #[test]
    fn garbage_is_invalid_argument() {
        let bad = Any {
            type_url: "containerd.runc.v1.Options".into(),
            value: vec![0xff, 0xff, 0xff],
            ..Default::default()
        };
        let e = RuntimeOptions::from_any(Some(&bad)).unwrap_err();
        assert_eq!(
            e.code(),
            containerd_shim_protos::ttrpc::Code::INVALID_ARGUMENT
        );
        let other = Any {
            type_url: "something.Else".into(),
            value: vec![],
            ..Default::default()
        };
        assert!(matches!(
            CheckpointOptions::from_any(Some(&other)),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            RuntimeOptions::from_toml(b"BinaryName = ["),
            Err(Error::InvalidArgument(_))
        ));
    }

    #[test]
    fn no_checkpoint_options_means_leave_running_with_locks() {
        let o = CheckpointOptions::from_any(None).unwrap();
        assert!(!o.exit);
        assert!(o.file_locks);
        let o = CheckpointOptions::from_any(Some(&any(
            "containerd.runc.v1.CheckpointOptions",
            &ProtoCheckpointOptions {
                exit: true,
                empty_namespaces: vec!["network".into()],
                cgroups_mode: "soft".into(),
                ..Default::default()
            },
        )))
        .unwrap();
        assert!(o.exit && !o.file_locks);
        assert_eq!(o.empty_namespaces, vec!["network".to_string()]);
        assert_eq!(o.cgroups_mode, "soft");
    }

    #[test]
    fn volumes_ride_in_extension_field_1001() {
        let mut value = ProtoCheckpointOptions {
            exit: true,
            ..Default::default()
        }
        .write_to_bytes()
        .unwrap();
        for v in ["/data", "*"] {
            // Key: field 1001, wire type 2 (length-delimited), as a varint.
            value.extend_from_slice(&[0xca, 0x3e, v.len() as u8]);
            value.extend_from_slice(v.as_bytes());
        }
        let o = CheckpointOptions::from_any(Some(&Any {
            type_url: "containerd.runc.v1.CheckpointOptions".into(),
            value: value.clone(),
            ..Default::default()
        }))
        .unwrap();
        assert!(o.exit);
        assert_eq!(o.volumes, vec!["/data".to_string(), "*".to_string()]);
        // Not a string: refused, not ignored.
        value.extend_from_slice(&[0xc8, 0x3e, 0x01]);
        assert!(CheckpointOptions::from_any(Some(&Any {
            type_url: "containerd.runc.v1.CheckpointOptions".into(),
            value,
            ..Default::default()
        }))
        .is_err());
    }

    #[test]
    fn lazy_rides_in_extension_fields_1002_to_1005() {
        let base = ProtoCheckpointOptions::default().write_to_bytes().unwrap();
        let field = |n: u32, wire: u32| {
            let mut key = Vec::new();
            let mut k = (n << 3 | wire) as u64;
            while k >= 0x80 {
                key.push((k as u8) | 0x80);
                k >>= 7;
            }
            key.push(k as u8);
            key
        };
        let string = |n: u32, v: &str| {
            let mut b = field(n, 2);
            b.push(v.len() as u8);
            b.extend_from_slice(v.as_bytes());
            b
        };
        let varint = |n: u32, v: u8| {
            let mut b = field(n, 0);
            b.push(v);
            b
        };
        let decode = |extra: &[Vec<u8>]| {
            let mut value = base.clone();
            for e in extra {
                value.extend_from_slice(e);
            }
            CheckpointOptions::from_any(Some(&Any {
                type_url: "containerd.runc.v1.CheckpointOptions".into(),
                value,
                ..Default::default()
            }))
        };
        let o = decode(&[
            string(PAGE_SERVER_FIELD, "0.0.0.0:7073"),
            varint(LAZY_FIELD, 1),
            varint(LAZY_CONNECT_TIMEOUT_FIELD, 5),
            string(LAZY_PEER_FIELD, "10.0.0.2"),
        ])
        .unwrap();
        assert!(o.lazy);
        assert_eq!(o.lazy_connect_timeout, 5);
        assert_eq!(o.lazy_peer, "10.0.0.2");
        // Lazy needs a page server; a peer must be an IP; a flag must be a number.
        assert!(decode(&[varint(LAZY_FIELD, 1)]).is_err());
        assert!(decode(&[
            string(PAGE_SERVER_FIELD, "0.0.0.0:7073"),
            varint(LAZY_FIELD, 1),
            string(LAZY_PEER_FIELD, "somewhere")
        ])
        .is_err());
        assert!(decode(&[string(LAZY_FIELD, "yes")]).is_err());
        // The destination's side: field 1001 of runc's Options.
        let mut value = ProtoOptions::default().write_to_bytes().unwrap();
        value.extend_from_slice(&string(LAZY_PAGES_FROM_FIELD, "10.0.0.1:7073"));
        let r = RuntimeOptions::from_any(Some(&Any {
            type_url: "containerd.runc.v1.Options".into(),
            value,
            ..Default::default()
        }))
        .unwrap();
        assert_eq!(r.lazy_pages_from, "10.0.0.1:7073");
    }

    #[test]
    fn options_round_trip_through_bundle() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            RuntimeOptions::read(dir.path()).unwrap(),
            RuntimeOptions::default()
        );
        let o = RuntimeOptions {
            root: "/x".into(),
            ..Default::default()
        };
        o.write(dir.path()).unwrap();
        assert_eq!(RuntimeOptions::read(dir.path()).unwrap(), o);
    }
}
