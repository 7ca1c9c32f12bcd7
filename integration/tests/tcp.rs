//! Established TCP connections across a checkpoint (CRIU's `--tcp-established`, the
//! `open_tcp` option).
//!
//! runc checkpoints with `--empty-ns net`: CRIU keeps nothing of a network namespace runc made,
//! and restores into a new one whose `lo` is down, so a connection on 127.0.0.1 cannot be
//! restored ("Can't connect inet socket back: Network is unreachable"). This shim brings `lo` up
//! in CRIU's setup-namespaces step (shim/src/checkpoint/loopback.rs); the Go shim does not, and
//! its restore fails: the test says so on that runtime.

use std::time::Duration;

use containerd_client::types::Descriptor;
use integration::checkpoint::Api;
use integration::grpc::CheckpointOptions;
use integration::{both_runtimes, poll, read_in_container, Containerd, Runtime, STATE_TIMEOUT};

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
        (Runtime::RuncV2, Err(e)) => eprintln!("{what}: the Go shim cannot restore it: {e}"),
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
