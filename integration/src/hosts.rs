//! Two hosts on one machine, for migration: containerd A and containerd B, each in a network
//! namespace of its own with its own root, state and socket, joined through a third namespace
//! (the "network": a bridge, the loopback registry both pull from and push to, and the clients of
//! the TCP tests).
//!
//! ```text
//!   host A 10.213.0.1 ──veth──┐
//!                             br0 10.213.0.254 (registry :5000, clients)
//!   host B 10.213.0.2 ──veth──┘
//! ```
//!
//! The namespaces are the test's own, so every instance uses the same addresses.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use crate::netns::NetNs;
use crate::process::run_with_timeout;
use crate::registry::Registry;
use crate::{show, Containerd, Setup, IMAGE};

pub const A_ADDR: &str = "10.213.0.1";
pub const B_ADDR: &str = "10.213.0.2";
pub const NET_ADDR: &str = "10.213.0.254";
pub const REGISTRY: &str = "10.213.0.254:5000";
/// The port the destination's `container-migrate receive` listens on.
pub const RECEIVE_PORT: u16 = 7070;

/// The companion CLI as built next to the shim (`cargo build -p container-migrate`).
pub fn migrate_binary() -> PathBuf {
    let p = std::env::var_os("MIGRATE_BINARY")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::target_dir().join("debug").join("container-migrate"));
    assert!(
        p.is_file(),
        "{} not found: run `make build` (cargo build -p container-migrate)",
        p.display()
    );
    p
}

pub struct TwoHosts {
    // Dropped in this order: containers and shims first, the network last.
    pub a: Containerd,
    pub b: Containerd,
    registry: Registry,
    pub a_ns: NetNs,
    pub b_ns: NetNs,
    pub net: NetNs,
    /// The base image as both hosts name it: in the registry, pulled on A, not on B.
    pub image: String,
    dir: PathBuf,
}

fn bridge_port(net: &NetNs, host: &NetNs, addr: &str) {
    let n = crate::unique();
    let (inside, outside) = (format!("mh{n}h"), format!("mh{n}n"));
    let out = Command::new(crate::host::which("ip"))
        .args([
            "link",
            "add",
            &inside,
            "netns",
            host.name(),
            "type",
            "veth",
            "peer",
            "name",
        ])
        .arg(&outside)
        .args(["netns", net.name()])
        .output()
        .expect("run ip link add");
    assert!(out.status.success(), "ip link add veth: {}", show(&out));
    host.ip(&["addr", "add", &format!("{addr}/24"), "dev", &inside]);
    host.ip(&["link", "set", &inside, "up"]);
    net.ip(&["link", "set", &outside, "master", "br0"]);
    net.ip(&["link", "set", &outside, "up"]);
}

impl TwoHosts {
    /// Starts the network, the registry and both containerds; pushes the test image to the
    /// registry and pulls it on A only.
    pub fn start() -> TwoHosts {
        let net = NetNs::add("mnet");
        net.ip(&["link", "add", "br0", "type", "bridge"]);
        net.ip(&["addr", "add", &format!("{NET_ADDR}/24"), "dev", "br0"]);
        net.ip(&["link", "set", "br0", "up"]);
        let a_ns = NetNs::add("mhosta");
        let b_ns = NetNs::add("mhostb");
        bridge_port(&net, &a_ns, A_ADDR);
        bridge_port(&net, &b_ns, B_ADDR);
        let dir = std::env::temp_dir().join(format!(
            "shimtest-hosts-{}-{}",
            std::process::id(),
            crate::unique()
        ));
        std::fs::create_dir_all(&dir).expect("create hosts dir");
        let registry = Registry::start_in(&dir.join("registry"), &net.path(), REGISTRY);
        let a = Containerd::start_with(Setup {
            netns: Some(a_ns.path()),
            ..Default::default()
        });
        let b = Containerd::start_with(Setup {
            netns: Some(b_ns.path()),
            no_image: true,
            ..Default::default()
        });
        let image = format!("{REGISTRY}/shimtest:latest");
        a.ctr_ok(["images", "tag", IMAGE, &image]);
        a.ctr_ok(["images", "push", "--plain-http", &image]);
        a.ctr_ok(["images", "rm", IMAGE]);
        TwoHosts {
            a,
            b,
            registry,
            a_ns,
            b_ns,
            net,
            image,
            dir,
        }
    }

    /// Imports the image tar `tar` (named `local` by the import) on A, pushes it to the registry
    /// as `<registry>/<name>`, and pulls it on B too when `on_b`; returns the registry name.
    pub fn publish(&self, tar: &Path, local: &str, name: &str, on_b: bool) -> String {
        let remote = format!("{REGISTRY}/{name}");
        self.a
            .ctr_ok(["images", "import", tar.to_str().expect("utf-8 path")]);
        self.a.ctr_ok(["images", "tag", local, &remote]);
        self.a.ctr_ok(["images", "push", "--plain-http", &remote]);
        if on_b {
            self.b.ctr_ok(["images", "pull", "--plain-http", &remote]);
        }
        remote
    }

    pub fn registry(&self) -> &str {
        self.registry.addr()
    }

    /// A scratch dir of this harness (removed on drop).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `container-migrate` against `host`'s containerd and namespace, run in `host`'s network
    /// namespace, with a work dir of the host's own.
    pub fn cli(&self, host: &Containerd) -> Command {
        let ns = if std::ptr::eq(host, &self.a) {
            &self.a_ns
        } else {
            &self.b_ns
        };
        let mut c = Command::new(crate::host::which("nsenter"));
        c.arg(format!("--net={}", ns.path()))
            .arg(migrate_binary())
            .arg("--address")
            .arg(host.address())
            .arg("--namespace")
            .arg(host.namespace())
            .arg("--work-dir")
            .arg(host.dir().join("migrate"))
            .arg("--plain-http");
        c
    }

    /// Runs `container-migrate ARGS` against `host`; its output whatever the exit status.
    pub fn run_cli(&self, host: &Containerd, args: &[&str]) -> Output {
        let mut c = self.cli(host);
        c.args(args);
        run_with_timeout(&mut c, None, Duration::from_secs(300)).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Limits what host A (`from_a`) or B sends to `rate` (a tc token bucket on its link), so
    /// that a transfer lasts long enough to be interrupted.
    pub fn limit_rate(&self, from_a: bool, rate: &str) {
        let ns = if from_a { &self.a_ns } else { &self.b_ns };
        let links = ns.ip(&["-o", "link", "show"]);
        let dev = links
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap_or(n).to_string())
            .find(|n| n != "lo")
            .expect("a link besides lo");
        let mut c = ns.command("tc");
        c.args(["qdisc", "replace", "dev", &dev, "root", "tbf", "rate", rate])
            .args(["burst", "64kb", "latency", "500ms"]);
        let out = run_with_timeout(&mut c, None, Duration::from_secs(30)).expect("run tc");
        assert!(out.status.success(), "tc on {dev}: {}", show(&out));
    }

    /// Starts `container-migrate receive --once` on B, listening on B's address, the harness's
    /// dir allowed for bind mounts (`--allow-bind`); waits until it listens.
    pub fn receiver(&self, extra: &[&str]) -> crate::Spawned {
        let mut c = self.cli(&self.b);
        c.args(["receive", "--once", "--listen"])
            .arg(format!("{B_ADDR}:{RECEIVE_PORT}"))
            .arg("--allow-bind")
            .arg(&self.dir)
            .args(extra);
        let spawned = crate::Spawned::spawn(&mut c, false);
        // Listening, seen from B's own socket table (a probe connection would be taken for a
        // migration).
        let pid = spawned.pid();
        let listening = crate::poll_until(Duration::from_secs(20), || {
            crate::netns::listening(pid, RECEIVE_PORT).then_some(())
        });
        assert!(
            listening.is_some(),
            "the receiver on B did not listen: {}",
            spawned.stderr()
        );
        spawned
    }
}

impl Drop for TwoHosts {
    fn drop(&mut self) {
        if std::env::var_os("SHIMTEST_KEEP_DIR").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
