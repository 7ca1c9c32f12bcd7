//! Round trips, and hostile checkpoints that must get nowhere.

use std::{
    fs, io,
    os::unix::fs::{symlink, MetadataExt, PermissionsExt},
    path::PathBuf,
};

use tar::{Builder, EntryType, Header};

use super::*;
use crate::checkpoint::layout::{DELETED_FILES, ROOTFS_DIFF};

fn raw_entry(
    b: &mut Builder<Vec<u8>>,
    name: &str,
    kind: EntryType,
    link: Option<&str>,
    data: &[u8],
) {
    let mut h = Header::new_gnu();
    // Written byte by byte: the tar crate refuses to build hostile names itself.
    let bytes = h.as_mut_bytes();
    bytes[..name.len()].copy_from_slice(name.as_bytes());
    if let Some(l) = link {
        bytes[157..157 + l.len()].copy_from_slice(l.as_bytes());
    }
    h.set_entry_type(kind);
    h.set_mode(0o644);
    h.set_size(data.len() as u64);
    h.set_cksum();
    b.append(&h, data).unwrap();
}

fn checkpoint_with(
    entries: impl FnOnce(&mut Builder<Vec<u8>>),
    deleted: &[&str],
) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let mut b = Builder::new(Vec::new());
    entries(&mut b);
    fs::write(dir.path().join(ROOTFS_DIFF), b.into_inner().unwrap()).unwrap();
    fs::write(
        dir.path().join(DELETED_FILES),
        serde_json::to_vec(deleted).unwrap(),
    )
    .unwrap();
    dir
}

/// A rootfs in a sandbox dir, with a canary beside it standing for the host.
fn sandbox() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let top = tempfile::tempdir().unwrap();
    let rootfs = top.path().join("rootfs");
    fs::create_dir_all(rootfs.join("etc")).unwrap();
    fs::write(rootfs.join("etc/keep"), "keep").unwrap();
    let canary = top.path().join("canary");
    fs::write(&canary, "untouched").unwrap();
    (top, rootfs, canary)
}

#[test]
fn capture_then_apply_round_trips_changes() {
    let top = tempfile::tempdir().unwrap();
    let (upper, lower) = (top.path().join("upper"), top.path().join("lower"));
    fs::create_dir_all(lower.join("dir")).unwrap();
    fs::write(lower.join("dir/old"), "old").unwrap();
    fs::write(lower.join("gone"), "x").unwrap();
    fs::create_dir_all(upper.join("dir")).unwrap();
    fs::write(upper.join("dir/new"), "new").unwrap();
    fs::write(upper.join("file"), "content").unwrap();
    fs::set_permissions(upper.join("file"), fs::Permissions::from_mode(0o751)).unwrap();
    fs::hard_link(upper.join("file"), upper.join("file-link")).unwrap();
    symlink("file", upper.join("sym")).unwrap();
    xattr::set(upper.join("file"), "user.test", b"v").ok();
    let root = nix::unistd::Uid::effective().is_root();
    if root {
        nix::sys::stat::mknod(
            &upper.join("gone"),
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::empty(),
            0,
        )
        .unwrap();
        xattr::set(upper.join("dir"), "trusted.overlay.opaque", b"y").unwrap();
    }
    let out = top.path().join("out");
    fs::create_dir(&out).unwrap();
    let stats = capture(
        &Overlay {
            upper,
            lowers: vec![lower.clone()],
        },
        &out,
    )
    .unwrap();
    assert!(stats.entries >= 5, "{stats:?}");

    // Apply to a copy of the lower layer: the result is the merged view.
    let rootfs = top.path().join("rootfs");
    fs::create_dir_all(rootfs.join("dir")).unwrap();
    fs::write(rootfs.join("dir/old"), "old").unwrap();
    fs::write(rootfs.join("gone"), "x").unwrap();
    apply(&out, &rootfs).unwrap();
    assert_eq!(fs::read_to_string(rootfs.join("file")).unwrap(), "content");
    assert_eq!(
        fs::metadata(rootfs.join("file")).unwrap().mode() & 0o7777,
        0o751
    );
    assert_eq!(
        fs::metadata(rootfs.join("file")).unwrap().ino(),
        fs::metadata(rootfs.join("file-link")).unwrap().ino()
    );
    assert_eq!(
        fs::read_link(rootfs.join("sym")).unwrap(),
        PathBuf::from("file")
    );
    assert_eq!(fs::read_to_string(rootfs.join("dir/new")).unwrap(), "new");
    if root {
        assert!(!rootfs.join("gone").exists(), "whiteout must delete");
        assert!(
            !rootfs.join("dir/old").exists(),
            "opaque dir hides the lower entries"
        );
    }
}

#[test]
fn hostile_names_are_refused_and_nothing_outside_is_touched() {
    type Build = Box<dyn FnOnce(&mut Builder<Vec<u8>>)>;
    let cases: Vec<(&str, Build, Vec<&str>)> = vec![
        (
            "dotdot",
            Box::new(|b| raw_entry(b, "../canary", EntryType::Regular, None, b"pwned")),
            vec![],
        ),
        (
            "absolute",
            Box::new(|b| raw_entry(b, "/canary", EntryType::Regular, None, b"pwned")),
            vec![],
        ),
        (
            "absolute dotdot",
            Box::new(|b| raw_entry(b, "/../canary", EntryType::Regular, None, b"pwned")),
            vec![],
        ),
        (
            "hard link absolute",
            Box::new(|b| raw_entry(b, "h", EntryType::Link, Some("/etc/keep"), b"")),
            vec![],
        ),
        (
            "through symlink",
            Box::new(|b| {
                raw_entry(b, "esc", EntryType::Symlink, Some(".."), b"");
                raw_entry(b, "esc/canary", EntryType::Regular, None, b"pwned");
            }),
            vec![],
        ),
        (
            "hard link out",
            Box::new(|b| raw_entry(b, "h", EntryType::Link, Some("../canary"), b"")),
            vec![],
        ),
        (
            "device",
            Box::new(|b| raw_entry(b, "dev", EntryType::Block, None, b"")),
            vec![],
        ),
        ("deleted dotdot", Box::new(|_| {}), vec!["/../canary"]),
    ];
    for (what, build, deleted) in cases {
        let (_top, rootfs, canary) = sandbox();
        let ckpt = checkpoint_with(build, &deleted);
        let err = apply(ckpt.path(), &rootfs).expect_err(what);
        assert_eq!(
            err.code(),
            containerd_shim_protos::ttrpc::Code::INVALID_ARGUMENT,
            "{what}: {err}"
        );
        assert_eq!(fs::read_to_string(&canary).unwrap(), "untouched", "{what}");
    }
}

#[test]
fn writing_over_a_symlink_replaces_it_instead_of_following_it() {
    let (_top, rootfs, canary) = sandbox();
    symlink(&canary, rootfs.join("etc/link")).unwrap();
    let ckpt = checkpoint_with(
        |b| raw_entry(b, "etc/link", EntryType::Regular, None, b"inside"),
        &[],
    );
    apply(ckpt.path(), &rootfs).unwrap();
    assert_eq!(fs::read_to_string(&canary).unwrap(), "untouched");
    assert_eq!(
        fs::read_to_string(rootfs.join("etc/link")).unwrap(),
        "inside"
    );
}

#[test]
fn a_directory_turned_symlink_does_not_carry_its_mode_outside() {
    let (top, rootfs, canary) = sandbox();
    let host_dir = top.path().join("hostdir");
    fs::create_dir(&host_dir).unwrap();
    fs::set_permissions(&host_dir, fs::Permissions::from_mode(0o700)).unwrap();
    let target = host_dir.display().to_string();
    let ckpt = checkpoint_with(
        |b| {
            let mut h = Header::new_gnu();
            h.set_path("d").unwrap();
            h.set_entry_type(EntryType::Directory);
            h.set_mode(0o6777);
            h.set_size(0);
            h.set_cksum();
            b.append(&h, io::empty()).unwrap();
            raw_entry(b, "d", EntryType::Symlink, Some(&target), b"");
        },
        &[],
    );
    let err = apply(ckpt.path(), &rootfs).unwrap_err();
    assert_eq!(
        err.code(),
        containerd_shim_protos::ttrpc::Code::INVALID_ARGUMENT,
        "{err}"
    );
    assert_eq!(fs::metadata(&host_dir).unwrap().mode() & 0o7777, 0o700);
    assert_eq!(fs::read_to_string(&canary).unwrap(), "untouched");
}

#[test]
fn replacing_a_parent_directory_with_a_file_is_invalid() {
    let (_top, rootfs, _) = sandbox();
    let ckpt = checkpoint_with(
        |b| {
            raw_entry(b, "esc/a", EntryType::Regular, None, b"a");
            raw_entry(b, "esc", EntryType::Regular, None, b"file");
            raw_entry(b, "esc/b", EntryType::Regular, None, b"b");
        },
        &[],
    );
    let err = apply(ckpt.path(), &rootfs).unwrap_err();
    assert_eq!(
        err.code(),
        containerd_shim_protos::ttrpc::Code::INVALID_ARGUMENT,
        "{err}"
    );
}

#[test]
fn setuid_survives_owner_change() {
    let (_top, rootfs, _) = sandbox();
    let ckpt = checkpoint_with(
        |b| {
            let mut h = Header::new_gnu();
            h.set_path("suid").unwrap();
            h.set_entry_type(EntryType::Regular);
            h.set_mode(0o4755);
            h.set_uid(1234);
            h.set_gid(5678);
            h.set_size(1);
            h.set_cksum();
            b.append(&h, &b"x"[..]).unwrap();
        },
        &[],
    );
    apply(ckpt.path(), &rootfs).unwrap();
    let m = fs::metadata(rootfs.join("suid")).unwrap();
    if nix::unistd::Uid::effective().is_root() {
        assert_eq!((m.uid(), m.gid()), (1234, 5678));
    }
    assert_eq!(m.mode() & 0o7777, 0o4755);
}

#[test]
fn checkpoint_without_diff_applies_nothing() {
    let (_top, rootfs, _) = sandbox();
    let empty = tempfile::tempdir().unwrap();
    let stats = apply(empty.path(), &rootfs).unwrap();
    assert_eq!(stats.entries + stats.deleted, 0);
    assert!(rootfs.join("etc/keep").exists());
}

#[test]
fn truncated_archive_is_invalid() {
    let (_top, rootfs, _) = sandbox();
    let ckpt = checkpoint_with(
        |b| raw_entry(b, "big", EntryType::Regular, None, &[7u8; 4096]),
        &[],
    );
    let p = ckpt.path().join(ROOTFS_DIFF);
    let bytes = fs::read(&p).unwrap();
    fs::write(&p, &bytes[..1024]).unwrap();
    assert!(apply(ckpt.path(), &rootfs).is_err());
}
