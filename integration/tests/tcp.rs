//! Established TCP connections across a checkpoint (CRIU's `--tcp-established`, the
//! `open_tcp` option).
//!
//! - Inside the container, on 127.0.0.1. runc checkpoints with `--empty-ns net`: CRIU keeps
//!   nothing of a network namespace runc made, and restores into a new one whose `lo` is down, so
//!   the connection cannot come back ("Can't connect inet socket back: Network is unreachable").
//!   This shim brings `lo` up in CRIU's setup-namespaces step (shim/src/checkpoint/loopback.rs).
//! - A client in another namespace, the server in a container whose namespace is given by path
//!   (as a CNI plugin makes one): the server moves to a new namespace with the same address, the
//!   client keeps its connection. runc hands CRIU the new namespace as the external one.
//!
//! The Go shim restores neither: it keeps no record of the dump's flags and restores without
//! `--tcp-established` ("Connected TCP socket in image"), and it leaves `lo` down. The tests say
//! so on that runtime and check the rest.

use std::time::Duration;

use containerd_client::types::Descriptor;
use integration::checkpoint::Api;
use integration::grpc::CheckpointOptions;
use integration::netns::{listening, NetNs};
use integration::{
    both_runtimes, poll, read_in_container, Containerd, Runtime, Spawned, STATE_TIMEOUT,
};

const T: Duration = Duration::from_secs(60);

/// A server and a client inside the container, on 127.0.0.1:5000: the client sends a counter
/// every 0.1 s over one connection, the server writes what it receives to /tmp/got.
const LOOPBACK_PAIR: &str = "sleep 100000 | nc -l -p 5000 > /tmp/got & sleep 0.5; \
     i=0; while :; do i=$((i+1)); echo $i; sleep 0.1; done | nc 127.0.0.1 5000";

/// The last number the server of [`LOOPBACK_PAIR`] in `pid`'s container received.
fn received(pid: u32) -> Option<u64> {
    read_in_container(pid, "/tmp/got")?
        .lines()
        .last()?
        .trim()
        .parse()
        .ok()
}

/// The connection carries numbers past `n` (the client's counter went on over it).
fn assert_connection_goes_on(pid: u32, n: u64, what: &str) {
    poll(format!("{what}: the server receiving past {n}"), T, || {
        received(pid).filter(|m| *m > n + 5)
    });
}

fn lo_is_up(pid: u32) -> bool {
    read_in_container(pid, "/sys/class/net/lo/flags")
        .and_then(|f| u64::from_str_radix(f.trim().trim_start_matches("0x"), 16).ok())
        .is_some_and(|flags| flags & 1 != 0)
}

/// `iptables ARGS` in `ns`, which must succeed.
fn iptables(ns: &NetNs, args: &[&str]) {
    let out = ns.command("iptables").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "iptables {args:?}: {}",
        integration::show(&out)
    );
}

/// The error of a failed restore with the error lines of the CRIU log it names, if any.
fn criu_errors(e: &str) -> String {
    let log = e
        .split_whitespace()
        .skip_while(|w| *w != "file:")
        .nth(1)
        .and_then(|p| std::fs::read_to_string(p).ok())
        .unwrap_or_default();
    let errors: Vec<&str> = log.lines().filter(|l| l.contains("Error")).collect();
    format!("{e}\n  {}", errors.join("\n  "))
}

/// The container the scenario checkpoints.
const ID: &str = "tcp";

/// Restores `desc` as container `new` (like [`ID`]); on the custom shim the connection goes on
/// past `n`, on the Go shim the restore fails.
fn restore(cd: &Containerd, api: &Api, rt: Runtime, desc: &Descriptor, n: u64, new: &str) {
    let what = format!("restored as {new}");
    match (rt, api.restore_as_new(ID, new, rt, desc)) {
        (Runtime::Custom, Ok(pid)) => {
            assert!(lo_is_up(pid), "{what}: lo is up in the restored container");
            assert_connection_goes_on(pid, n, &what);
            cd.kill(new, "SIGKILL");
            cd.wait_task_status(new, "STOPPED", STATE_TIMEOUT);
        }
        (Runtime::Custom, Err(e)) => panic!("{what}: {e}"),
        (Runtime::RuncV2, Ok(_)) => panic!(
            "{what}: the Go shim restored an established connection on lo, \
             which this test says it cannot: update the test"
        ),
        (Runtime::RuncV2, Err(e)) => {
            eprintln!("{what}: the Go shim cannot restore it: {}", criu_errors(&e))
        }
    }
}

both_runtimes!(
    established_loopback_tcp_survives_checkpoint_and_restore,
    |rt, cd| {
        let id = "tcp";
        let pid = cd.run_detached(rt, id, &["sh", "-c", LOOPBACK_PAIR]).pid;
        poll("the connection carrying numbers", T, || {
            received(pid).filter(|n| *n > 3)
        });
        let mut api = Api::connect(cd);
        api.use_new_lease("tcp");

        // Live: the original keeps its connection, the copy gets its own.
        let live = CheckpointOptions {
            open_tcp: true,
            file_locks: true,
            ..Default::default()
        };
        let n = received(pid).unwrap();
        let desc = api.checkpoint_ok(id, Some(&live));
        assert_connection_goes_on(pid, n, "the original after a live checkpoint");
        restore(cd, &api, rt, &desc, n, "tcp-live");

        // With exit: the connection lives on only in the restored container.
        let exit = CheckpointOptions { exit: true, ..live };
        let n = received(pid).unwrap();
        let desc = api.checkpoint_ok(id, Some(&exit));
        cd.wait_task_status(id, "STOPPED", STATE_TIMEOUT);
        restore(cd, &api, rt, &desc, n, "tcp-exit");
    }
);

/// The last number the server in `pid`'s container wrote to /dev/shm/got (a tmpfs: CRIU keeps
/// its contents, so either shim restores it).
fn received_shm(pid: u32) -> Option<u64> {
    read_in_container(pid, "/dev/shm/got")?
        .lines()
        .last()?
        .trim()
        .parse()
        .ok()
}

both_runtimes!(
    a_client_outside_keeps_its_connection_when_the_server_moves,
    |rt, cd| {
        // Three hosts: the client's namespace, the server's first home, its destination. The
        // destination gets the same address, as a CNI plugin with a static address would give it.
        let client_ns = NetNs::add("stc");
        let first = NetNs::add("sta");
        client_ns.veth_to("10.123.0.1/24", &first, "10.123.0.2/24");
        let id = "srv";
        let with_ns = format!("network:{}", first.path());
        let pid = cd
            .run_detached_with(
                rt,
                id,
                &["--with-ns", &with_ns],
                &["sh", "-c", "sleep 100000 | nc -l -p 5000 > /dev/shm/got"],
            )
            .pid;
        poll("the server listening", T, || {
            listening(pid, 5000).then_some(())
        });
        let mut client = client_ns.command("/bin/busybox");
        client.args([
        "sh",
        "-c",
        "i=0; while :; do i=$((i+1)); echo $i; sleep 0.1; done | /bin/busybox nc 10.123.0.2 5000",
    ]);
        let mut client = Spawned::spawn(&mut client, false);
        poll("the connection carrying numbers", T, || {
            received_shm(pid).filter(|n| *n > 3)
        });

        let mut api = Api::connect(cd);
        api.use_new_lease("tcp-move");
        let opts = CheckpointOptions {
            exit: true,
            open_tcp: true,
            file_locks: true,
            ..Default::default()
        };
        let n = received_shm(pid).unwrap();
        let desc = api.checkpoint_ok(id, Some(&opts));
        cd.wait_task_status(id, "STOPPED", STATE_TIMEOUT);
        // The first home goes (its veth with it); the destination comes up with the same address.
        drop(first);
        // Until the server's socket is back, the destination must not answer the client's
        // retransmissions (a RST would end the connection): its input is dropped, as CRIU's
        // network lock does on the source, and opened once the restore is done.
        let dest = NetNs::add("stb");
        let drop_input = ["-w", "-I", "INPUT", "-p", "tcp", "-j", "DROP"];
        iptables(&dest, &drop_input);
        client_ns.veth_to("10.123.0.1/24", &dest, "10.123.0.2/24");
        let dest_path = dest.path();
        api.try_clone_container_with(id, "srv2", Some(rt.name()), |spec| {
            for ns in spec["linux"]["namespaces"]
                .as_array_mut()
                .into_iter()
                .flatten()
            {
                if ns["type"] == "network" {
                    ns["path"] = serde_json::Value::String(dest_path.clone());
                }
            }
        })
        .unwrap_or_else(|e| panic!("{e}"));
        let pid2 = match (rt, api.create_task_from_checkpoint("srv2", &desc)) {
            (_, Ok(pid)) => {
                iptables(&dest, &["-w", "-D", "INPUT", "-p", "tcp", "-j", "DROP"]);
                pid
            }
            (Runtime::Custom, Err(e)) => panic!("restore into the destination: {e}"),
            (Runtime::RuncV2, Err(e)) => {
                eprintln!("the Go shim cannot restore it: {}", criu_errors(&e));
                return;
            }
        };
        let moved = integration::poll_until(T, || received_shm(pid2).filter(|m| *m > n + 5));
        if moved.is_none() {
            let ss = client_ns.command("ss").args(["-tino"]).output().unwrap();
            let ss2 = dest.command("ss").args(["-tino"]).output().unwrap();
            panic!(
                "the moved server got {:?} (past {n} expected); client running: {}, {}\nclient side:\n{}\nserver side:\n{}",
                received_shm(pid2),
                client.is_running(),
                client.stderr(),
                String::from_utf8_lossy(&ss.stdout),
                String::from_utf8_lossy(&ss2.stdout),
            );
        }
        assert!(
            client.is_running(),
            "the client kept its connection: {}",
            client.stderr()
        );
        cd.kill("srv2", "SIGKILL");
        cd.wait_task_status("srv2", "STOPPED", STATE_TIMEOUT);
    }
);
