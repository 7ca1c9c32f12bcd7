//! Hostile checkpoints on restore. A checkpoint blob is a tar of the checkpoint directory;
//! containerd unpacks it (safely) and passes the directory to the shim's Create, whose
//! `rootfs-diff.tar` and `deleted.files` are the attacker's. Each case writes a crafted blob to
//! the content store (under a lease) and calls Tasks.Create with it: Create must fail with
//! InvalidArgument, and a canary on the host, beside the containerd root the container's rootfs
//! lives in, must be unchanged (content, mode, link count, the directory's listing), as must the
//! dirs an escape would land in. Only the custom shim applies rootfs diffs: the Go shim ignores
//! those files, so there is nothing to compare.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use containerd_client::tonic::Code;
use integration::faults::{
    checkpoint_blob, list_dir, tar_archive, Api, Daemon, RpcError, TarEntry,
    CRIU_CHECKPOINT_MEDIA_TYPE, DELETED_FILES, ROOTFS_DIFF,
};
use integration::{run_scenario, Containerd, Runtime};

/// The host side: `<dir>/host/canary`, and what they look like when planted.
struct Canary {
    dir: PathBuf,
    file: PathBuf,
    dir_meta: (u32, i64),
    file_mtime: i64,
}

const CANARY_TEXT: &str = "untouched";

impl Canary {
    fn plant(cd: &Containerd) -> Canary {
        let dir = cd.dir().join("host");
        fs::create_dir(&dir).unwrap();
        let file = dir.join("canary");
        fs::write(&file, CANARY_TEXT).unwrap();
        fs::set_permissions(&file, fs::Permissions::from_mode(0o644)).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        let dm = fs::metadata(&dir).unwrap();
        let fm = fs::metadata(&file).unwrap();
        Canary {
            dir_meta: (dm.mode() & 0o7777, dm.mtime()),
            file_mtime: fm.mtime(),
            dir,
            file,
        }
    }

    /// Puts the canary back as planted (after a case changed it, so the next ones are judged
    /// on their own).
    fn restore(&self) {
        let _ = fs::remove_dir_all(&self.dir);
        let _ = fs::remove_file(&self.dir);
        fs::create_dir(&self.dir).unwrap();
        fs::write(&self.file, CANARY_TEXT).unwrap();
        fs::set_permissions(&self.file, fs::Permissions::from_mode(0o644)).unwrap();
        fs::set_permissions(&self.dir, fs::Permissions::from_mode(0o755)).unwrap();
        set_mtime(&self.file, self.file_mtime);
        set_mtime(&self.dir, self.dir_meta.1);
    }

    fn assert_untouched(&self, what: &str) {
        let text = fs::read_to_string(&self.file)
            .unwrap_or_else(|e| panic!("{what}: canary {} gone: {e}", self.file.display()));
        assert_eq!(text, CANARY_TEXT, "{what}: canary overwritten");
        let m = fs::symlink_metadata(&self.file).unwrap();
        assert!(m.is_file(), "{what}: canary is no longer a regular file");
        assert_eq!(m.nlink(), 1, "{what}: canary got a hard link");
        assert_eq!(
            m.mode() & 0o7777,
            0o644,
            "{what}: canary mode changed to {:o}",
            m.mode() & 0o7777
        );
        assert_eq!(m.mtime(), self.file_mtime, "{what}: canary mtime changed");
        let dm = fs::metadata(&self.dir).unwrap();
        assert_eq!(
            (dm.mode() & 0o7777, dm.mtime()),
            self.dir_meta,
            "{what}: the canary's directory changed mode or mtime (mode now {:o})",
            dm.mode() & 0o7777
        );
        assert_eq!(
            list_dir(&self.dir),
            vec!["canary".to_string()],
            "{what}: something was written next to the canary"
        );
    }
}

fn set_mtime(path: &Path, secs: i64) {
    let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    let t = [
        libc::timespec {
            tv_sec: secs,
            tv_nsec: 0,
        },
        libc::timespec {
            tv_sec: secs,
            tv_nsec: 0,
        },
    ];
    // SAFETY: utimensat with a valid path and two timespecs.
    unsafe {
        libc::utimensat(libc::AT_FDCWD, c.as_ptr(), t.as_ptr(), 0);
    }
}

/// `n` times `../`: from `<bundle>/rootfs` up to the test's dir.
fn up_to_test_dir(cd: &Containerd, id: &str) -> String {
    let rootfs = cd.bundle_dir(id).join("rootfs");
    let depth = rootfs
        .strip_prefix(cd.dir())
        .expect("rootfs under the test dir")
        .components()
        .count();
    "../".repeat(depth)
}

/// What a case puts in the checkpoint directory.
enum Diff {
    Tar(Vec<TarEntry>),
    Raw(Vec<u8>),
}

struct Case {
    name: &'static str,
    diff: Option<Diff>,
    deleted: Option<Vec<u8>>,
}

fn tar_case(name: &'static str, entries: Vec<TarEntry>) -> Case {
    Case {
        name,
        diff: Some(Diff::Tar(entries)),
        deleted: None,
    }
}

fn deleted_case(name: &'static str, list: &[String]) -> Case {
    Case {
        name,
        diff: None,
        deleted: Some(serde_json::to_vec(list).unwrap()),
    }
}

/// Creates container `id` (custom runtime), writes the case's checkpoint blob and calls
/// Tasks.Create with it. Returns Create's result; the task, if made, is left for the caller.
fn create_from(cd: &Containerd, api: &Api, id: &str, case: &Case) -> Result<u32, RpcError> {
    cd.create_container(Runtime::Custom, id, &["sleep", "1000"]);
    let mut files: Vec<(&str, Vec<u8>)> = Vec::new();
    match &case.diff {
        Some(Diff::Tar(entries)) => files.push((ROOTFS_DIFF, tar_archive(entries))),
        Some(Diff::Raw(bytes)) => files.push((ROOTFS_DIFF, bytes.clone())),
        None => {}
    }
    if let Some(d) = &case.deleted {
        files.push((DELETED_FILES, d.clone()));
    }
    let desc = api.write_blob(&checkpoint_blob(&files), CRIU_CHECKPOINT_MEDIA_TYPE);
    api.create_task(id, Some(desc), None)
}

/// Snapshot of the dirs an escape from `<bundle>/rootfs` would reach first: the test dir, the
/// state dir, the namespace's bundle dir (bundles of other containers aside).
fn around(cd: &Containerd) -> Vec<(PathBuf, Vec<String>)> {
    let ns_dir = cd
        .state_dir()
        .join("io.containerd.runtime.v2.task")
        .join(cd.namespace());
    [cd.dir().to_path_buf(), cd.state_dir().to_path_buf(), ns_dir]
        .into_iter()
        .map(|d| {
            let l = list_dir(&d);
            (d, l)
        })
        .collect()
}

/// Like [`around`] before the case, the bundle of the case's own container (`id`) aside.
fn assert_around_unchanged(
    cd: &Containerd,
    before: &[(PathBuf, Vec<String>)],
    id: &str,
    what: &str,
) {
    for ((dir, was), (_, mut now)) in before.iter().zip(around(cd)) {
        now.retain(|n| n != id);
        assert_eq!(&now, was, "{what}: {} changed", dir.display());
    }
}

fn cleanup(cd: &Containerd, api: &Api, id: &str, created: bool) {
    if created {
        api.delete_task(id)
            .unwrap_or_else(|e| panic!("{id}: Tasks.Delete of the created task: {e}"));
    }
    cd.ctr_ok(["containers", "delete", id]);
    cd.assert_nothing_left(id);
}

#[test]
fn hostile_checkpoints_are_refused() {
    run_scenario(Runtime::Custom, |_, cd| {
        let mut daemon = Daemon::new(cd);
        daemon.restart_with_private_runtime_dir();
        let canary = Canary::plant(cd);
        let mut api = Api::connect(cd);
        api.use_new_lease("hostile");
        let host = canary.dir.to_str().unwrap().to_string();
        let abs_canary = canary.file.to_str().unwrap().to_string();
        // All containers are named hNN: same depth.
        let up = up_to_test_dir(cd, "h00");
        let long_dir = "d".repeat(120);

        let cases = vec![
            tar_case(
                "file ../ up to the canary",
                vec![TarEntry::file(&format!("{up}host/canary"), b"pwned")],
            ),
            tar_case("file ../x", vec![TarEntry::file("../x", b"pwned")]),
            tar_case("file ../../x", vec![TarEntry::file("../../x", b"pwned")]),
            tar_case(
                "file etc/../../x",
                vec![TarEntry::file("etc/../../x", b"pwned")],
            ),
            tar_case(
                "file at the canary's absolute path",
                vec![TarEntry::file(&abs_canary, b"pwned")],
            ),
            tar_case(
                "new file at an absolute host path",
                vec![TarEntry::file(&format!("{host}/new"), b"pwned")],
            ),
            tar_case(
                "absolute symlink out, then a file through it",
                vec![
                    TarEntry::symlink("esc", &host),
                    TarEntry::file("esc/canary", b"pwned"),
                ],
            ),
            tar_case(
                "relative symlink out, then a new file through it",
                vec![
                    TarEntry::symlink("esc", &format!("{up}host")),
                    TarEntry::file("esc/new", b"pwned"),
                ],
            ),
            tar_case(
                "symlink out, then a directory through it",
                vec![TarEntry::symlink("esc", &host), TarEntry::dir("esc/sub")],
            ),
            tar_case(
                "symlink out, then a symlink through it",
                vec![
                    TarEntry::symlink("esc", &host),
                    TarEntry::symlink("esc/evil", "/etc/shadow"),
                ],
            ),
            tar_case(
                "symlink out, then a fifo through it",
                vec![TarEntry::symlink("esc", &host), TarEntry::fifo("esc/fifo")],
            ),
            tar_case(
                "symlink out, then a hard link through it",
                vec![
                    TarEntry::symlink("esc", &host),
                    TarEntry::hard_link("esc/h", "bin/busybox"),
                ],
            ),
            tar_case(
                "directory, then a symlink out in its place, then a file through it",
                vec![
                    TarEntry::dir("esc"),
                    TarEntry::file("esc/a", b"inside"),
                    TarEntry::symlink("esc", &host),
                    TarEntry::file("esc/canary", b"pwned"),
                ],
            ),
            tar_case(
                "directory, then a file in its place, then a file under that",
                vec![
                    TarEntry::file("esc/a", b"inside"),
                    TarEntry::file("esc", b"now a file"),
                    TarEntry::file("esc/b", b"under a file"),
                ],
            ),
            tar_case(
                "hard link to the canary's absolute path",
                vec![TarEntry::hard_link("h", &abs_canary)],
            ),
            tar_case(
                "hard link ../ up to the canary",
                vec![TarEntry::hard_link("h", &format!("{up}host/canary"))],
            ),
            tar_case(
                "hard link through a symlink out",
                vec![
                    TarEntry::symlink("esc", &host),
                    TarEntry::hard_link("h", "esc/canary"),
                ],
            ),
            tar_case(
                "char device /dev/mem",
                vec![TarEntry::char_device("mem", 1, 1)],
            ),
            tar_case(
                "block device 8:0",
                vec![TarEntry::block_device("sda", 8, 0)],
            ),
            tar_case(
                "absurd size (2^62, base-256 header)",
                vec![TarEntry::file("big", b"").with_header_size(1 << 62)],
            ),
            tar_case(
                "size beyond the archive (8 GiB octal header)",
                vec![
                    TarEntry::file("big", b"x").with_header_size(0o77777777776),
                    TarEntry::file("after", b"y"),
                ],
            ),
            tar_case(
                "GNU long name climbing out",
                vec![TarEntry::file(
                    &format!("{long_dir}/../{up}host/canary"),
                    b"pwned",
                )],
            ),
            tar_case(
                "PAX path climbing out",
                vec![
                    TarEntry::file("innocent", b"pwned").with_pax_path(&format!("{up}host/canary"))
                ],
            ),
            Case {
                name: "rootfs-diff.tar that is not a tar",
                diff: Some(Diff::Raw(
                    (0..4096u32).map(|i| (i * 7 + 13) as u8).collect(),
                )),
                deleted: None,
            },
            deleted_case(
                "deleted.files /../ up to the canary",
                &[format!("/{up}host/canary")],
            ),
            deleted_case(
                "deleted.files ../ up to the canary",
                &[format!("{up}host/canary")],
            ),
            deleted_case("deleted.files /etc/../../x", &["/etc/../../x".to_string()]),
            deleted_case("deleted.files naming the rootfs itself", &["/".to_string()]),
            Case {
                name: "deleted.files that is not JSON",
                diff: None,
                deleted: Some(b"/etc/passwd\n/etc/group\n".to_vec()),
            },
        ];

        let mut failures = Vec::new();
        for (i, case) in cases.iter().enumerate() {
            let id = format!("h{i:02}");
            let before = around(cd);
            let result = create_from(cd, &api, &id, case);
            eprintln!("{}: {:?}", case.name, result);
            canary.assert_untouched(case.name);
            assert_around_unchanged(cd, &before, &id, case.name);
            match &result {
                Err(e) if e.code == Code::InvalidArgument && !e.message.is_empty() => {}
                other => failures.push(format!("{}: {other:?}", case.name)),
            }
            cleanup(cd, &api, &id, result.is_ok());
        }
        assert!(
            failures.is_empty(),
            "Create from these checkpoints should fail with InvalidArgument and leave the host alone:\n  {}",
            failures.join("\n  ")
        );
    });
}

#[test]
fn later_entries_cannot_redirect_earlier_ones() {
    run_scenario(Runtime::Custom, |_, cd| {
        let mut daemon = Daemon::new(cd);
        daemon.restart_with_private_runtime_dir();
        let canary = Canary::plant(cd);
        let mut api = Api::connect(cd);
        api.use_new_lease("sneaky");
        let host = canary.dir.to_str().unwrap().to_string();
        let abs_canary = canary.file.to_str().unwrap().to_string();

        // Entries that are fine one by one: Create may accept them, but nothing may reach the
        // host (a directory's mode and times are set last, after a later entry may have turned
        // its path into a symlink).
        let sneaky = [
            tar_case(
                "directory turned into a symlink to a host dir",
                vec![
                    TarEntry::dir("d").with_mode(0o777),
                    TarEntry::symlink("d", &host),
                ],
            ),
            tar_case(
                "directory turned into a symlink to a host file",
                vec![
                    TarEntry::dir("d").with_mode(0o6777),
                    TarEntry::symlink("d", &abs_canary),
                ],
            ),
            tar_case(
                "hard link to a symlink pointing out",
                vec![
                    TarEntry::symlink("s", &abs_canary),
                    TarEntry::hard_link("h", "s"),
                ],
            ),
            tar_case(
                "file written over a symlink pointing out",
                vec![
                    TarEntry::symlink("s", &abs_canary),
                    TarEntry::file("s", b"pwned"),
                ],
            ),
            tar_case(
                "fifo over a symlink pointing out",
                vec![TarEntry::symlink("s", &abs_canary), TarEntry::fifo("s")],
            ),
            tar_case(
                "directory over a symlink pointing out",
                vec![
                    TarEntry::symlink("s", &host),
                    TarEntry::dir("s").with_mode(0o700),
                ],
            ),
        ];
        let mut failures = Vec::new();
        for (i, case) in sneaky.iter().enumerate() {
            let id = format!("s{i:02}");
            let before = around(cd);
            let result = create_from(cd, &api, &id, case);
            eprintln!("{}: {:?}", case.name, result);
            let touched = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                canary.assert_untouched(case.name);
                assert_around_unchanged(cd, &before, &id, case.name);
            }));
            if let Err(p) = touched {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .unwrap_or_else(|| "?".to_string());
                failures.push(format!("{} (Create: {result:?}): {msg}", case.name));
                canary.restore();
            }
            match &result {
                Ok(_) => {}
                Err(e) if e.code == Code::InvalidArgument => {}
                Err(e) => failures.push(format!("{}: unexpected error {e}", case.name)),
            }
            cleanup(cd, &api, &id, result.is_ok());
        }

        assert!(
            failures.is_empty(),
            "these checkpoints reached the host through a path a later entry redirected:\n  {}",
            failures.join("\n  ")
        );
    });
}

#[test]
fn harmless_checkpoints_restore_their_files() {
    run_scenario(Runtime::Custom, |_, cd| {
        let mut daemon = Daemon::new(cd);
        daemon.restart_with_private_runtime_dir();
        let canary = Canary::plant(cd);
        let mut api = Api::connect(cd);
        api.use_new_lease("harmless");

        // The control: the same crafting makes a Create that works and applies the files.
        let id = "good";
        let case = Case {
            name: "a benign diff",
            diff: Some(Diff::Tar(vec![
                TarEntry::file("ok.txt", b"hello"),
                TarEntry::dir("newdir"),
                TarEntry::symlink("newdir/link", "../ok.txt"),
                TarEntry::hard_link("ok2", "ok.txt"),
                TarEntry::fifo("newdir/fifo"),
                TarEntry::file("etc/inside-link", b"inside"),
            ])),
            deleted: Some(serde_json::to_vec(&["/etc/group"]).unwrap()),
        };
        let pid = create_from(cd, &api, id, &case)
            .unwrap_or_else(|e| panic!("Create from a benign crafted checkpoint: {e}"));
        assert_eq!(pid, 0, "a restore has no process before Start");
        let rootfs = cd.bundle_dir(id).join("rootfs");
        assert_eq!(fs::read_to_string(rootfs.join("ok.txt")).unwrap(), "hello");
        assert_eq!(
            fs::read_link(rootfs.join("newdir/link")).unwrap(),
            Path::new("../ok.txt")
        );
        assert_eq!(
            fs::metadata(rootfs.join("ok2")).unwrap().ino(),
            fs::metadata(rootfs.join("ok.txt")).unwrap().ino()
        );
        assert!(!rootfs.join("etc/group").exists(), "deleted.files applied");
        assert!(
            rootfs.join("etc/passwd").exists(),
            "only what was listed is deleted"
        );
        cleanup(cd, &api, id, true);
        canary.assert_untouched("benign diff");

        // An absolute path in deleted.files is a path in the container: harmless.
        let id = "abs-deleted";
        let case = deleted_case(
            "deleted.files with the canary's absolute path",
            &[canary.file.to_str().unwrap().to_string()],
        );
        let r = create_from(cd, &api, id, &case);
        canary.assert_untouched(case.name);
        let created = r.is_ok();
        r.unwrap_or_else(|e| panic!("{}: {e}", case.name));
        cleanup(cd, &api, id, created);

        // Writing over an image symlink replaces the link, it does not write through it.
        let id = "over-link";
        let case = tar_case(
            "a file where the image has a symlink",
            vec![TarEntry::file("bin/sh", b"#!/bin/busybox sh\n")],
        );
        let snapshots = cd
            .root_dir()
            .join("io.containerd.snapshotter.v1.overlayfs/snapshots");
        let busybox = list_dir(&snapshots)
            .into_iter()
            .find_map(|s| fs::metadata(snapshots.join(s).join("fs/bin/busybox")).ok())
            .map(|m| m.len());
        assert!(busybox.is_some(), "busybox in the image layer");
        create_from(cd, &api, id, &case).unwrap_or_else(|e| panic!("{}: {e}", case.name));
        let rootfs = cd.bundle_dir(id).join("rootfs");
        assert!(fs::symlink_metadata(rootfs.join("bin/sh"))
            .unwrap()
            .is_file());
        assert_eq!(
            fs::metadata(rootfs.join("bin/busybox"))
                .map(|m| m.len())
                .ok(),
            busybox,
            "the symlink's target must not be overwritten"
        );
        cleanup(cd, &api, id, true);
    });
}
