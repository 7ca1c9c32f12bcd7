//! A private image registry (Debian's `docker-registry`, installed by scripts/install-deps.sh) on
//! a loopback port, storage in a temp dir, stopped and removed on drop.
//!
//! containerd's CRI pulls a checkpoint's base image again by its repo digest at restore; an image
//! that was only imported has none, so the CRI tests push their base image here and pull it
//! through the CRI.

use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::poll::poll_until;

/// A running registry; see the module doc.
pub struct Registry {
    dir: PathBuf,
    addr: String,
    child: Option<Child>,
    /// The network namespace it serves in (`/run/netns/<name>`), if not the test's own.
    netns: Option<String>,
}

impl Registry {
    /// Starts a registry keeping its blobs in `dir` (created), on a free port of 127.0.0.1, and
    /// waits until it answers `GET /v2/`. Panics with the registry's log when it does not.
    pub fn start(dir: &Path) -> Registry {
        let mut last = String::new();
        // A port found free can be taken before the registry binds it (another test's registry):
        // then ours exits, and another port is tried.
        for _ in 0..5 {
            match Self::start_on_free_port(dir) {
                Ok(r) => return r,
                Err(e) => last = e,
            }
        }
        panic!("docker-registry would not start: {last}");
    }

    /// Starts a registry in network namespace `netns` (a `/run/netns/<name>` path) on `addr`
    /// (`IP:PORT`, free there: the namespace is the test's own).
    pub fn start_in(dir: &Path, netns: &str, addr: &str) -> Registry {
        Self::start_at(dir, addr.to_string(), Some(netns.to_string()))
            .unwrap_or_else(|e| panic!("docker-registry would not start: {e}"))
    }

    fn start_on_free_port(dir: &Path) -> Result<Registry, String> {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .map_err(|e| format!("find a free loopback port: {e}"))?;
        Self::start_at(dir, format!("127.0.0.1:{port}"), None)
    }

    fn start_at(dir: &Path, addr: String, netns: Option<String>) -> Result<Registry, String> {
        // A failed attempt's drop removed it.
        fs::create_dir_all(dir.join("storage")).map_err(|e| format!("create registry dir: {e}"))?;
        let config = dir.join("config.yml");
        fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n",
                dir.join("storage").display()
            ),
        )
        .map_err(|e| format!("write registry config: {e}"))?;
        let log_path = dir.join("registry.log");
        let log = fs::File::create(&log_path).map_err(|e| format!("create registry log: {e}"))?;
        let mut command = match &netns {
            Some(path) => {
                let mut c = Command::new(crate::host::which("nsenter"));
                c.arg(format!("--net={path}"))
                    .arg(crate::host::which("docker-registry"));
                c
            }
            None => Command::new(crate::host::which("docker-registry")),
        };
        let child = command
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| format!("dup log: {e}"))?)
            .stderr(log)
            .spawn()
            .map_err(|e| {
                format!("cannot start docker-registry (scripts/install-deps.sh installs it): {e}")
            })?;
        let mut r = Registry {
            dir: dir.to_path_buf(),
            addr,
            child: Some(child),
            netns,
        };
        // Ours answering, not whoever else holds the port: the child must be alive.
        let up = poll_until(Duration::from_secs(20), || {
            let exited = r
                .child
                .as_mut()
                .is_none_or(|c| !matches!(c.try_wait(), Ok(None)));
            if exited {
                return Some(false);
            }
            r.answers().then_some(true)
        });
        match up {
            Some(true) => Ok(r),
            _ => {
                let log = fs::read_to_string(&log_path).unwrap_or_default();
                Err(format!(
                    "docker-registry on {} did not answer:\n{log}",
                    r.addr
                ))
            }
        }
    }

    /// `127.0.0.1:PORT`: the registry part of an image reference.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Whether `GET /v2/` gets an HTTP 200.
    fn answers(&self) -> bool {
        let addr = self.addr.clone();
        let connect = move || TcpStream::connect(&addr);
        let conn = match &self.netns {
            Some(ns) => {
                crate::netns::in_netns(ns, connect).and_then(|r| r.map_err(|e| e.to_string()))
            }
            None => connect().map_err(|e| e.to_string()),
        };
        let Ok(mut s) = conn else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        let req = format!(
            "GET /v2/ HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            self.addr
        );
        if s.write_all(req.as_bytes()).is_err() {
            return false;
        }
        let mut head = [0u8; 12];
        s.read_exact(&mut head).is_ok() && head.ends_with(b"200")
    }

    /// A `hosts.toml` for containerd's registry `config_path`: plain HTTP to the registry at
    /// `addr`. Written as `<certs_d>/<addr>/hosts.toml`.
    pub fn hosts_toml(addr: &str, certs_d: &Path) {
        let d = certs_d.join(addr);
        fs::create_dir_all(&d).expect("create certs.d dir");
        fs::write(
            d.join("hosts.toml"),
            format!(
                "server = \"http://{a}\"\n\n[host.\"http://{a}\"]\n  capabilities = [\"pull\", \"resolve\", \"push\"]\n",
                a = addr
            ),
        )
        .expect("write hosts.toml");
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::env::var_os("SHIMTEST_KEEP_DIR").is_none() {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}
