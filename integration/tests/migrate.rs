//! Moving a running container from host A to host B (two containerds in network namespaces of
//! their own, a registry between them: `integration::hosts`) with `container-migrate`, by each
//! path: straight across, an archive file, the registry. What must survive: memory (a token only
//! the shell's memory holds), the counter going on, the rootfs changes, a bind-mounted volume
//! (restored into B's own directory), the name and the labels. The source goes only once the
//! destination runs; when the destination fails, the source runs on (live) or its checkpoint is
//! kept, restorable (exit). Bad archives are refused with nothing created.

use std::path::{Path, PathBuf};
use std::time::Duration;

use integration::hosts::{TwoHosts, B_ADDR, RECEIVE_PORT};
use integration::netns::listening;
use integration::{poll, read_in_container, show, stdout, Containerd};

const T: Duration = Duration::from_secs(60);
const RT: &str = "io.containerd.custom.v2";

/// The token lives only in the shell's memory; the counter goes to /counter and the volume.
const WORKLOAD: &str = "token=$RANDOM$RANDOM$RANDOM; i=0; echo changed > /etc/motd; rm /etc/group; \
     while :; do i=$((i+1)); echo \"$token $i\" > /counter; echo \"$token $i\" > /data/counter; sleep 0.1; done";

fn to() -> String {
    format!("tcp://{B_ADDR}:{RECEIVE_PORT}")
}

/// (token, counter) of container `id` on `cd`; None while the workload rewrites the file (its
/// `>` truncates first): callers poll ([`wait_counter`]).
fn counter(cd: &Containerd, id: &str) -> Option<(String, u64)> {
    let pid = cd.task(id)?.pid;
    let s = read_in_container(pid, "/counter")?;
    let (t, n) = s.trim().split_once(' ')?;
    Some((t.to_string(), n.parse().ok()?))
}

fn wait_counter(cd: &Containerd, id: &str, past: u64) -> (String, u64) {
    poll(format!("{id} counting past {past}"), T, || {
        counter(cd, id).filter(|(_, n)| *n > past)
    })
}

/// Runs the workload on A as `id` (label app=mig, volume `vol` at /data) from `image`.
fn run_on_a(h: &TwoHosts, id: &str, image: &str, vol: &Path) {
    std::fs::create_dir_all(vol).unwrap();
    std::fs::write(vol.join("seed"), "from A\n").unwrap();
    let mount = format!("type=bind,src={},dst=/data,options=rbind:rw", vol.display());
    h.a.ctr_ok([
        "run",
        "-d",
        "--runtime",
        RT,
        "--label",
        "app=mig",
        "--mount",
        &mount,
        image,
        id,
        "sh",
        "-c",
        WORKLOAD,
    ]);
    wait_counter(&h.a, id, 5);
}

/// The `{"event":"result"}` line of a `--json` run.
fn result_of(out: &std::process::Output) -> serde_json::Value {
    stdout(out)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["event"] == "result")
        .unwrap_or_else(|| panic!("no result line: {}", show(out)))
}

/// A live checkpoint of `id` on A as an uncompressed archive in the harness's dir.
fn export_plain(h: &TwoHosts, id: &str) -> PathBuf {
    let file = h.dir().join(format!("{id}.tar"));
    let f = file.display().to_string();
    let out = h.run_cli(
        &h.a,
        &["checkpoint", id, "--export", &f, "--compress", "none"],
    );
    assert!(out.status.success(), "checkpoint: {}", show(&out));
    file
}

/// Unpacks `archive` into `dir` (made) with tar, then changes its JSON file `rel` with `edit`;
/// returns `dir` as a string, for `restore --dir`.
fn unpack_edited(
    archive: &Path,
    dir: &Path,
    rel: &str,
    edit: &dyn Fn(&mut serde_json::Value),
) -> String {
    std::fs::create_dir_all(dir).unwrap();
    let out = std::process::Command::new("tar")
        .arg("-xf")
        .arg(archive)
        .arg("-C")
        .arg(dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "tar: {}", show(&out));
    let p = dir.join(rel);
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(&p, v.to_string()).unwrap();
    dir.display().to_string()
}

fn labels(cd: &Containerd, id: &str) -> serde_json::Value {
    let info: serde_json::Value =
        serde_json::from_str(&cd.ctr_ok(["containers", "info", id])).expect("container info");
    info["Labels"].clone()
}

fn assert_moved(h: &TwoHosts, id: &str, before: &(String, u64), vol_b: &Path) {
    // The source is gone, the destination runs with the same memory.
    assert!(
        !h.a.containers().iter().any(|c| c == id),
        "{id} still on A: {:?}",
        h.a.containers()
    );
    let (token, _) = wait_counter(&h.b, id, before.1 + 3);
    assert_eq!(token, before.0, "the token (memory) changed in the move");
    let pid = h.b.task(id).expect("task on B").pid;
    assert_eq!(
        read_in_container(pid, "/etc/motd").as_deref(),
        Some("changed\n")
    );
    assert!(
        read_in_container(pid, "/etc/group").is_none(),
        "a deleted file came back"
    );
    // The volume was restored into B's directory, and the process writes on there.
    assert_eq!(
        std::fs::read_to_string(vol_b.join("seed")).unwrap(),
        "from A\n"
    );
    poll("the volume counter going on on B", T, || {
        let s = std::fs::read_to_string(vol_b.join("counter")).ok()?;
        let (t, n) = s.trim().split_once(' ')?;
        (t == before.0 && n.parse::<u64>().ok()? > before.1).then_some(())
    });
    assert_eq!(labels(&h.b, id)["app"], "mig");
}

fn migrate_by(via: &str) {
    let h = TwoHosts::start();
    let id = format!("mig-{via}");
    let (vol_a, vol_b) = (h.dir().join("vol-a"), h.dir().join("vol-b"));
    std::fs::create_dir_all(&vol_b).unwrap();
    run_on_a(&h, &id, &h.image, &vol_a);
    let receiver = h.receiver(&[]);
    let before = wait_counter(&h.a, &id, 0);
    let map = format!("/data={}", vol_b.display());
    let target = to();
    let image = format!("{}/checkpoint-{id}:1", h.registry());
    let mut args = vec![
        "--json",
        "migrate",
        &id,
        "--to",
        &target,
        "--via",
        via,
        "--volume-map",
        &map,
    ];
    if via == "registry" {
        args.extend(["--image", &image]);
    }
    let out = h.run_cli(&h.a, &args);
    assert!(out.status.success(), "migrate: {}", show(&out));
    let r = result_of(&out);
    let done = receiver.wait(T);
    assert!(done.status.success(), "receiver: {}", show(&done));
    assert!(r["downtime_ms"].as_u64().unwrap() > 0, "{r}");
    assert!(r["bytes_moved"].as_u64().unwrap() > 0, "{r}");
    assert!(r["dump_ms"].as_f64().unwrap() > 0.0, "{r}");
    // Straight across and live, the memory went to CRIU's page server on B during the dump.
    assert_eq!(r["page_server"].is_string(), via == "stream", "{r}");
    assert_moved(&h, &id, &before, &vol_b);
}

#[test]
fn migrate_straight_across() {
    migrate_by("stream");
}

#[test]
fn migrate_through_an_archive_file() {
    migrate_by("archive");
}

#[test]
fn migrate_through_the_registry() {
    migrate_by("registry");
}

/// B cannot get the base image (the registry has no such name): the migration fails with that
/// reason, nothing of the container is on B, and A's container runs on (live) — or, with
/// --exit, its checkpoint is kept on A and restores there.
#[test]
fn destination_without_the_base_image_leaves_the_source_running_or_restorable() {
    let h = TwoHosts::start();
    let orphan = format!("{}/not-in-the-registry:1", h.registry());
    h.a.ctr_ok(["images", "tag", &h.image, &orphan]);
    let vol = h.dir().join("vol");
    run_on_a(&h, "live", &orphan, &vol);
    run_on_a(&h, "exits", &orphan, &h.dir().join("vol2"));
    let target = to();

    let receiver = h.receiver(&[]);
    let out = h.run_cli(&h.a, &["migrate", "live", "--to", &target]);
    assert!(!out.status.success(), "migrate should fail: {}", show(&out));
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        err.contains("not-in-the-registry") && err.contains("could not be pulled"),
        "{err}"
    );
    assert!(err.contains("runs on here"), "{err}");
    assert!(!receiver.wait(T).status.success());
    assert!(h.b.containers().is_empty(), "B has {:?}", h.b.containers());
    let (_, n) = wait_counter(&h.a, "live", 0);
    wait_counter(&h.a, "live", n + 3);
    assert_eq!(h.a.task("live").unwrap().status, "RUNNING");

    let receiver = h.receiver(&[]);
    let out = h.run_cli(&h.a, &["migrate", "exits", "--exit", "--to", &target]);
    assert!(!out.status.success(), "migrate should fail: {}", show(&out));
    assert!(!receiver.wait(T).status.success());
    assert!(h.b.containers().is_empty(), "B has {:?}", h.b.containers());
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    let kept = err
        .split("restore --dir ")
        .nth(1)
        .and_then(|s| s.split('`').next())
        .unwrap_or_else(|| panic!("no kept checkpoint named: {err}"))
        .to_string();
    let before = counter(&h.a, "exits");
    assert!(before.is_none() || h.a.task("exits").unwrap().status != "RUNNING");
    // Restorable on A, under another name, the memory intact.
    let allow = h.dir().display().to_string();
    let out = h.run_cli(
        &h.a,
        &[
            "restore",
            "--dir",
            &kept,
            "--name",
            "exits-again",
            "--allow-bind",
            &allow,
        ],
    );
    assert!(out.status.success(), "restore --dir: {}", show(&out));
    wait_counter(&h.a, "exits-again", 1);
}

/// Archives checked before anything is created: a truncated one, one with a flipped byte, and
/// one from a newer shim are refused with a clear error and nothing on the destination.
#[test]
fn bad_archives_are_refused_with_nothing_created() {
    let h = TwoHosts::start();
    run_on_a(&h, "src", &h.image, &h.dir().join("vol"));
    let file = export_plain(&h, "src");
    let bytes = std::fs::read(&file).unwrap();

    let try_restore = |name: &str, data: &[u8]| -> String {
        let p = h.dir().join(format!("{name}.tar"));
        std::fs::write(&p, data).unwrap();
        let out = h.run_cli(
            &h.b,
            &["restore", "--import", p.to_str().unwrap(), "--name", name],
        );
        assert!(!out.status.success(), "{name} restored: {}", show(&out));
        assert!(
            h.b.containers().is_empty(),
            "{name}: B has {:?}",
            h.b.containers()
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let e = try_restore("truncated", &bytes[..bytes.len() / 2]);
    assert!(e.contains("truncated") || e.contains("corrupt"), "{e}");
    let mut flipped = bytes.clone();
    let at = bytes.len() / 3;
    flipped[at] ^= 0x55;
    let e = try_restore("flipped", &flipped);
    assert!(e.contains("corrupt") || e.contains("does not match"), "{e}");
    let e = try_restore("garbage", b"this is not an archive at all, not even a tar");
    assert!(!e.is_empty());

    // From a newer shim: its record says so.
    let dir = unpack_edited(
        &file,
        &h.dir().join("newer"),
        "checkpoint/custom-shim-checkpoint.json",
        &|v| v["shim_version"] = "99.0.0".into(),
    );
    let out = h.run_cli(&h.b, &["restore", "--dir", &dir, "--name", "newer"]);
    assert!(!out.status.success(), "newer restored: {}", show(&out));
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("99.0.0") && e.contains("newer"), "{e}");
    assert!(h.b.containers().is_empty(), "B has {:?}", h.b.containers());
}

/// What of a checkpoint's spec would act on the destination host outside the container is
/// refused unless its operator allows it: OCI hooks (runc runs them on the host), bind mounts of
/// host paths it did not allow, and a source's volume map pointing anywhere else. Nothing is
/// created.
#[test]
fn a_hostile_spec_cannot_reach_the_destination_host() {
    let h = TwoHosts::start();
    run_on_a(&h, "src", &h.image, &h.dir().join("vol"));
    let file = export_plain(&h, "src");
    let unpack = |name: &str, edit: &dyn Fn(&mut serde_json::Value)| -> String {
        unpack_edited(&file, &h.dir().join(name), "spec.dump", edit)
    };
    let allow = h.dir().display().to_string();
    let refused = |dir: &str, extra: &[&str], why: &str| {
        let mut args = vec![
            "restore",
            "--dir",
            dir,
            "--name",
            "hostile",
            "--allow-bind",
            &allow,
        ];
        args.extend_from_slice(extra);
        let out = h.run_cli(&h.b, &args);
        assert!(!out.status.success(), "restored: {}", show(&out));
        let e = String::from_utf8_lossy(&out.stderr);
        assert!(e.contains(why), "{e}");
        assert!(h.b.containers().is_empty(), "B has {:?}", h.b.containers());
    };
    let hooks = unpack("hooks", &|s| {
        s["hooks"] = serde_json::json!({"prestart": [{"path": "/bin/sh", "args": ["sh", "-c", "touch /tmp/pwned"]}]});
    });
    refused(&hooks, &[], "OCI hooks");
    let etc = unpack("etc", &|s| {
        s["mounts"].as_array_mut().unwrap().push(serde_json::json!(
            {"destination": "/host-etc", "type": "bind", "source": "/etc", "options": ["rbind", "rw"]}
        ));
    });
    refused(&etc, &[], "\"/etc\"");
    let dots = unpack("dots", &|s| {
        s["mounts"].as_array_mut().unwrap().push(serde_json::json!(
            {"destination": "/up", "type": "bind", "source": format!("{allow}/../../etc"), "options": ["rbind"]}
        ));
    });
    refused(&dots, &[], "/up");

    // Over the network: a volume map outside what the receiver allows.
    let receiver = h.receiver(&[]);
    let target = to();
    let out = h.run_cli(
        &h.a,
        &[
            "migrate",
            "src",
            "--to",
            &target,
            "--volume-map",
            "/data=/etc",
        ],
    );
    assert!(!out.status.success(), "migrate: {}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--allow-bind"),
        "{}",
        show(&out)
    );
    assert!(!receiver.wait(T).status.success());
    assert!(h.b.containers().is_empty(), "B has {:?}", h.b.containers());
    assert_eq!(h.a.task("src").unwrap().status, "RUNNING");
}

/// Our archives are the ecosystem's: checkpointctl reads them (show, and inspect with the
/// process tree and files), and `container-migrate inspect` tells the same.
#[test]
fn checkpointctl_reads_our_archives() {
    let h = TwoHosts::start();
    run_on_a(&h, "shown", &h.image, &h.dir().join("vol"));
    let f = export_plain(&h, "shown").display().to_string();
    // Live by default: it counts on.
    let (_, n) = wait_counter(&h.a, "shown", 0);
    wait_counter(&h.a, "shown", n + 3);

    let show_out = integration::cri::checkpointctl(&["show", &f]);
    assert!(
        show_out.contains("shown") && show_out.contains("shimtest"),
        "{show_out}"
    );
    let tree = integration::cri::checkpointctl(&["inspect", "--ps-tree", "--files", &f]);
    assert!(
        tree.contains("Process tree") && tree.contains("sh") && tree.contains("sleep"),
        "{tree}"
    );
    assert!(
        tree.contains("Engine: containerd") && tree.contains("ID: shown"),
        "{tree}"
    );

    let out = h.run_cli(&h.a, &["--json", "inspect", &f]);
    assert!(out.status.success(), "inspect: {}", show(&out));
    let r = result_of(&out);
    assert_eq!(r["container"], "shown");
    assert_eq!(r["labels"]["app"], "mig");
    assert!(
        r["processes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["comm"] == "sh"),
        "{r}"
    );
    assert!(r["criu_version"].as_str().unwrap().starts_with('4'), "{r}");
    assert_eq!(
        r["volumes_bytes"].as_u64().map(|b| b > 0),
        Some(true),
        "{r}"
    );
}

/// An established connection from a client on the network (a third namespace) to a server in
/// the container (host network of A, on service address 10.213.0.100, which B has too) survives
/// the move: the source stops at the dump (its CRIU keeps the peer's packets dropped), B restores
/// the socket, and once the route to the service address points at B, the client's
/// retransmissions reach it and the same connection goes on.
#[test]
fn established_tcp_connection_moves_with_the_container() {
    const VIP: &str = "10.213.0.100";
    let h = TwoHosts::start();
    h.a_ns
        .ip(&["addr", "add", &format!("{VIP}/32"), "dev", "lo"]);
    h.b_ns
        .ip(&["addr", "add", &format!("{VIP}/32"), "dev", "lo"]);
    h.net
        .ip(&["route", "add", VIP, "via", integration::hosts::A_ADDR]);
    h.a.ctr_ok([
        "run",
        "-d",
        "--net-host",
        "--runtime",
        RT,
        &h.image,
        "srv",
        "sh",
        "-c",
        // nc reads its stdin, which must not end in the move (the Go shim's and ctr's
        // detached stdin blocks; so does the restored one).
        "nc -l -p 6000 > /tmp/got",
    ]);
    let got = |cd: &Containerd| -> Option<u64> {
        read_in_container(cd.task("srv")?.pid, "/tmp/got")?
            .lines()
            .last()?
            .trim()
            .parse()
            .ok()
    };
    // The server listens before the client connects.
    poll("the server listening", T, || {
        listening(h.a.task("srv")?.pid, 6000).then_some(())
    });
    let mut client = h.net.command("/bin/busybox");
    client.args([
        "sh",
        "-c",
        &format!(
            "i=0; while :; do i=$((i+1)); echo $i; sleep 0.1; done | /bin/busybox nc {VIP} 6000"
        ),
    ]);
    let mut client = integration::Spawned::spawn(&mut client, false);
    let n = poll("the server receiving", T, || got(&h.a).filter(|n| *n > 5));

    // The server shares host A's network: B's receiver must allow that.
    let receiver = h.receiver(&["--allow-host-network"]);
    let target = to();
    let out = h.run_cli(
        &h.a,
        &[
            "--json",
            "migrate",
            "srv",
            "--to",
            &target,
            "--tcp-established",
        ],
    );
    assert!(out.status.success(), "migrate: {}", show(&out));
    assert!(receiver.wait(T).status.success());
    assert!(!h.a.containers().iter().any(|c| c == "srv"));
    // The service address now leads to B.
    h.net.ip(&["route", "replace", VIP, "via", B_ADDR]);
    poll(
        format!("the server on B receiving past {n} on the same connection"),
        T,
        || got(&h.b).filter(|m| *m > n + 10),
    );
    assert!(
        client.is_running(),
        "the client's connection broke: {}",
        client.stderr()
    );
}

/// `--volume DEST` takes only that volume; `--ignore-volumes` and `--ignore-rootfs` leave them
/// out, and a restore of such a checkpoint brings the memory back without them.
#[test]
fn the_caller_chooses_what_goes_into_the_checkpoint() {
    let h = TwoHosts::start();
    let (data, logs) = (h.dir().join("data"), h.dir().join("logs"));
    for d in [&data, &logs] {
        std::fs::create_dir_all(d).unwrap();
        std::fs::write(d.join("seed"), "seed\n").unwrap();
    }
    let m = |src: &Path, dst: &str| {
        format!("type=bind,src={},dst={dst},options=rbind:rw", src.display())
    };
    h.a.ctr_ok([
        "run",
        "-d",
        "--runtime",
        RT,
        "--mount",
        &m(&data, "/data"),
        "--mount",
        &m(&logs, "/logs"),
        &h.image,
        "pick",
        "sh",
        "-c",
        WORKLOAD,
    ]);
    let before = wait_counter(&h.a, "pick", 3);
    let inspect = |file: &Path| -> serde_json::Value {
        let out = h.run_cli(&h.a, &["--json", "inspect", file.to_str().unwrap()]);
        assert!(out.status.success(), "inspect: {}", show(&out));
        result_of(&out)
    };
    let one = h.dir().join("one.tar.gz");
    let out = h.run_cli(
        &h.a,
        &[
            "checkpoint",
            "pick",
            "--volume",
            "/logs",
            "--compress",
            "gzip",
            "--export",
            one.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "checkpoint --volume: {}", show(&out));
    let r = inspect(&one);
    assert_eq!(r["volumes"], serde_json::json!(["/logs"]), "{r}");
    assert!(r["volumes_bytes"].as_u64().unwrap() > 0, "{r}");
    assert!(r["rootfs_diff_bytes"].as_u64().unwrap() > 0, "{r}");

    let bare = h.dir().join("bare.tar.zst");
    let out = h.run_cli(
        &h.a,
        &[
            "checkpoint",
            "pick",
            "--ignore-volumes",
            "--ignore-rootfs",
            "--export",
            bare.to_str().unwrap(),
        ],
    );
    assert!(
        out.status.success(),
        "checkpoint --ignore-*: {}",
        show(&out)
    );
    let r = inspect(&bare);
    assert_eq!(r["volumes"], serde_json::json!([]), "{r}");
    assert_eq!(r["rootfs_diff_bytes"], 0, "{r}");
    // A volume name that is no bind mount is refused before anything is frozen.
    let out = h.run_cli(
        &h.a,
        &[
            "checkpoint",
            "pick",
            "--volume",
            "/nowhere",
            "--export",
            "/dev/null",
        ],
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("/nowhere"),
        "{}",
        show(&out)
    );
    assert_eq!(h.a.task("pick").unwrap().status, "RUNNING");

    // Restored on B without its files: the memory is back, the rootfs is the image's. Its bind
    // mounts are the harness's dirs, which B's operator allows.
    let allow = h.dir().display().to_string();
    let out = h.run_cli(
        &h.b,
        &[
            "restore",
            "--import",
            bare.to_str().unwrap(),
            "--name",
            "pick-bare",
            "--allow-bind",
            &allow,
        ],
    );
    assert!(out.status.success(), "restore: {}", show(&out));
    let (token, _) = wait_counter(&h.b, "pick-bare", before.1);
    assert_eq!(token, before.0);
    let pid = h.b.task("pick-bare").unwrap().pid;
    assert_ne!(
        read_in_container(pid, "/etc/motd").as_deref(),
        Some("changed\n")
    );
}
