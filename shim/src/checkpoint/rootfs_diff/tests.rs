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

/// Captures an upper dir with no lower layers into a new dir `out`.
fn capture_upper(upper: &Path, out: &Path) -> DiffStats {
    fs::create_dir(out).unwrap();
    capture(
        &Overlay {
            upper: upper.to_path_buf(),
            lowers: vec![],
        },
        out,
    )
    .unwrap()
}

/// A sandbox dir holding a small rootfs (`rootfs/etc/keep`).
fn rootfs_sandbox() -> (tempfile::TempDir, PathBuf) {
    let top = tempfile::tempdir().unwrap();
    let rootfs = top.path().join("rootfs");
    fs::create_dir_all(rootfs.join("etc")).unwrap();
    fs::write(rootfs.join("etc/keep"), "keep").unwrap();
    (top, rootfs)
}

/// A rootfs in a sandbox dir, with a canary beside it standing for the host.
fn sandbox() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let (top, rootfs) = rootfs_sandbox();
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

// ---------------------------------------------------------------------------
// The class of redirect attacks: every entry kind × every redirect.
// ---------------------------------------------------------------------------

/// Everything about one file that an escape could change (atime aside).
#[derive(Debug, PartialEq)]
struct Node {
    path: Vec<u8>,
    mode: u32,
    uid: u32,
    gid: u32,
    size: u64,
    nlink: u64,
    ino: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
    content: Vec<u8>,
    link: Option<PathBuf>,
    xattrs: Vec<(std::ffi::OsString, Vec<u8>)>,
}

fn node(path: &std::path::Path, rel: &std::path::Path) -> Node {
    use std::os::unix::ffi::OsStrExt;
    let m = fs::symlink_metadata(path).unwrap();
    let mut xattrs: Vec<_> = xattr::list(path)
        .map(|l| l.collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .map(|n| {
            let v = xattr::get(path, &n).ok().flatten().unwrap_or_default();
            (n, v)
        })
        .collect();
    xattrs.sort();
    Node {
        path: rel.as_os_str().as_bytes().to_vec(),
        mode: m.mode(),
        uid: m.uid(),
        gid: m.gid(),
        size: m.size(),
        nlink: m.nlink(),
        ino: m.ino(),
        mtime: (m.mtime(), m.mtime_nsec()),
        ctime: (m.ctime(), m.ctime_nsec()),
        content: if m.is_file() {
            fs::read(path).unwrap()
        } else {
            Vec::new()
        },
        link: fs::read_link(path).ok(),
        xattrs,
    }
}

/// The sandbox's top directory and everything in it but the rootfs.
fn outside(top: &std::path::Path) -> Vec<Node> {
    fn walk(top: &std::path::Path, rel: &std::path::Path, out: &mut Vec<Node>) {
        let full = top.join(rel);
        out.push(node(&full, rel));
        if fs::symlink_metadata(&full).unwrap().is_dir() {
            let mut names: Vec<_> = fs::read_dir(&full)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            names.sort();
            for n in names {
                if rel.as_os_str().is_empty() && n == "rootfs" {
                    continue;
                }
                walk(top, &rel.join(n), out);
            }
        }
    }
    let mut out = Vec::new();
    walk(top, std::path::Path::new(""), &mut out);
    out
}

/// A canary directory beside the rootfs, standing for the host: a file and
/// a subdirectory with owners, modes, times and xattrs of their own.
fn canary_sandbox() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let (top, rootfs) = rootfs_sandbox();
    let canary = top.path().join("canary");
    fs::create_dir_all(canary.join("sub")).unwrap();
    fs::write(canary.join("f"), "canary file").unwrap();
    fs::write(canary.join("sub/g"), "canary sub file").unwrap();
    let chown = |p: &std::path::Path, id: u32| {
        std::os::unix::fs::lchown(p, Some(id), Some(id + 1)).unwrap();
    };
    chown(&canary.join("f"), 1111);
    chown(&canary.join("sub"), 2222);
    chown(&canary.join("sub/g"), 3333);
    fs::set_permissions(canary.join("f"), fs::Permissions::from_mode(0o640)).unwrap();
    fs::set_permissions(canary.join("sub"), fs::Permissions::from_mode(0o750)).unwrap();
    xattr::set(canary.join("f"), "user.canary", b"file").unwrap();
    xattr::set(canary.join("sub"), "trusted.canary", b"dir").unwrap();
    for (p, t) in [
        (canary.join("sub/g"), 1_000_000),
        (canary.join("f"), 2_000_000),
        (canary.join("sub"), 3_000_000),
        (canary.clone(), 4_000_000),
    ] {
        let ts = nix::sys::time::TimeSpec::new(t, 0);
        nix::sys::stat::utimensat(
            nix::fcntl::AT_FDCWD,
            &p,
            &ts,
            &ts,
            nix::sys::stat::UtimensatFlags::NoFollowSymlink,
        )
        .unwrap();
    }
    (top, rootfs, canary)
}

#[derive(Clone)]
enum Op {
    File(String),
    Dir(String),
    Sym(String, String),
    Link(String, String),
    Fifo(String),
    XattrFile(String),
}

fn hostile_entry(
    b: &mut Builder<Vec<u8>>,
    name: &str,
    kind: EntryType,
    link: Option<&str>,
    mode: u32,
    data: &[u8],
) {
    let mut h = Header::new_gnu();
    let bytes = h.as_mut_bytes();
    assert!(name.len() <= 100 && link.map_or(0, str::len) <= 100);
    bytes[..name.len()].copy_from_slice(name.as_bytes());
    if let Some(l) = link {
        bytes[157..157 + l.len()].copy_from_slice(l.as_bytes());
    }
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_uid(4242);
    h.set_gid(4242);
    h.set_mtime(12345);
    h.set_size(data.len() as u64);
    h.set_cksum();
    b.append(&h, data).unwrap();
}

fn build(ops: &[Op]) -> impl FnOnce(&mut Builder<Vec<u8>>) + '_ {
    move |b| {
        for op in ops {
            match op {
                Op::File(p) => hostile_entry(b, p, EntryType::Regular, None, 0o4777, b"pwned"),
                Op::Dir(p) => hostile_entry(b, p, EntryType::Directory, None, 0o4777, b""),
                Op::Sym(p, t) => hostile_entry(b, p, EntryType::Symlink, Some(t), 0o777, b""),
                Op::Link(p, t) => hostile_entry(b, p, EntryType::Link, Some(t), 0o644, b""),
                Op::Fifo(p) => hostile_entry(b, p, EntryType::Fifo, None, 0o666, b""),
                Op::XattrFile(p) => {
                    b.append_pax_extensions([("SCHILY.xattr.user.pwned", &b"1"[..])])
                        .unwrap();
                    hostile_entry(b, p, EntryType::Regular, None, 0o4777, b"pwned");
                }
            }
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    File,
    Dir,
    Symlink,
    HardLink,
    Fifo,
    Xattr,
    Whiteout,
    Deleted,
}

const KINDS: [Kind; 8] = [
    Kind::File,
    Kind::Dir,
    Kind::Symlink,
    Kind::HardLink,
    Kind::Fifo,
    Kind::Xattr,
    Kind::Whiteout,
    Kind::Deleted,
];

/// The entry of `kind` at `path`: tar ops, or a deleted.files line.
fn entry_of(kind: Kind, path: &str) -> (Vec<Op>, Vec<String>) {
    let p = path.to_string();
    match kind {
        Kind::File => (vec![Op::File(p)], vec![]),
        Kind::Dir => (vec![Op::Dir(p)], vec![]),
        Kind::Symlink => (vec![Op::Sym(p, "/pwned".into())], vec![]),
        Kind::HardLink => (vec![Op::Link(p, "etc/keep".into())], vec![]),
        Kind::Fifo => (vec![Op::Fifo(p)], vec![]),
        Kind::Xattr => (vec![Op::XattrFile(p)], vec![]),
        Kind::Whiteout => {
            let (dir, leaf) = match path.rsplit_once('/') {
                Some((d, l)) => (format!("{d}/"), l),
                None => (String::new(), path),
            };
            (vec![Op::File(format!("{dir}.wh.{leaf}"))], vec![])
        }
        Kind::Deleted => {
            let d = if path.starts_with('/') {
                p
            } else {
                format!("/{p}")
            };
            (vec![], vec![d])
        }
    }
}

struct Case {
    what: String,
    /// Symlinks already in the rootfs (as an image could have them).
    setup: Vec<(String, String)>,
    ops: Vec<Op>,
    deleted: Vec<String>,
    /// Whether apply must fail; otherwise it may succeed, confined.
    refuse: bool,
}

fn cases(canary: &str) -> Vec<Case> {
    let mut out = Vec::new();
    for kind in KINDS {
        for leaf in ["f", "sub"] {
            let x = |path: &str| entry_of(kind, path);
            let mut add = |what: &str,
                           setup: Vec<(String, String)>,
                           before: Vec<Op>,
                           at: String,
                           after: Vec<Op>,
                           again: bool,
                           refuse: bool| {
                let (ops_x, deleted) = x(&at);
                let mut ops = before;
                ops.extend(ops_x.clone());
                ops.extend(after);
                if again {
                    ops.extend(ops_x);
                }
                out.push(Case {
                    what: format!("{kind:?} {leaf}: {what} ({at})"),
                    setup,
                    ops,
                    deleted,
                    refuse,
                });
            };
            let sym = |p: &str, t: &str| Op::Sym(p.into(), t.into());
            let tar_kind = kind != Kind::Deleted;
            if tar_kind {
                add(
                    "earlier absolute symlink, first component",
                    vec![],
                    vec![sym("esc", canary)],
                    format!("esc/{leaf}"),
                    vec![],
                    false,
                    true,
                );
                add(
                    "earlier symlink, middle component",
                    vec![],
                    vec![Op::Dir("a".into()), sym("a/esc", canary)],
                    format!("a/esc/{leaf}"),
                    vec![],
                    false,
                    true,
                );
                add(
                    "earlier relative symlink out through ..",
                    vec![],
                    vec![Op::Dir("a".into()), sym("a/up", "../../canary")],
                    format!("a/up/{leaf}"),
                    vec![],
                    false,
                    true,
                );
                add(
                    "earlier symlink into the rootfs, then out through ..",
                    vec![],
                    vec![sym("in", "etc/../../canary")],
                    format!("in/{leaf}"),
                    vec![],
                    false,
                    true,
                );
                add(
                    "directory replaced by a symlink later, then used again",
                    vec![],
                    vec![Op::Dir("q".into())],
                    format!("q/{leaf}"),
                    vec![sym("q", canary)],
                    true,
                    true,
                );
                add(
                    "parent replaced by a symlink after the entry (deferred metadata)",
                    vec![],
                    vec![],
                    format!("q/{leaf}"),
                    vec![sym("q", canary)],
                    false,
                    kind == Kind::Dir,
                );
                add(
                    "entry itself replaced by a symlink later (deferred metadata)",
                    vec![],
                    vec![],
                    "x".into(),
                    vec![sym("x", &format!("{canary}/{leaf}"))],
                    false,
                    kind == Kind::Dir,
                );
            }
            // Symlinks the image already had: absolute, and relative out through ..
            add(
                "absolute symlink in the image",
                vec![("img".into(), canary.into())],
                vec![],
                format!("img/{leaf}"),
                vec![],
                false,
                true,
            );
            add(
                "relative symlink in the image, out through ..",
                vec![("etc/up".into(), "../../canary".into())],
                vec![],
                format!("etc/up/{leaf}"),
                vec![],
                false,
                true,
            );
            add(
                "absolute name",
                vec![],
                vec![],
                format!("{canary}/{leaf}"),
                vec![],
                false,
                kind != Kind::Deleted,
            );
            add(
                "dotdot name",
                vec![],
                vec![],
                format!("../canary/{leaf}"),
                vec![],
                false,
                true,
            );
            add(
                "dotdot inside the name",
                vec![],
                vec![],
                format!("etc/../../canary/{leaf}"),
                vec![],
                false,
                true,
            );
        }
    }
    // Hard links whose target, or the target's parent, leads outside.
    let link = |to: &str| Op::Link("h".into(), to.into());
    let sym = |p: &str, t: &str| Op::Sym(p.into(), t.into());
    let links: Vec<(&str, Vec<Op>)> = vec![
        (
            "target through an absolute symlink",
            vec![sym("esc", canary), link("esc/f")],
        ),
        (
            "target through a relative symlink",
            vec![
                Op::Dir("a".into()),
                sym("a/up", "../../canary"),
                link("a/up/f"),
            ],
        ),
        (
            "target is a symlink to a file outside",
            vec![sym("s", &format!("{canary}/f")), link("s")],
        ),
        (
            "target absolute",
            vec![Op::Link("h".into(), format!("{canary}/f"))],
        ),
        ("target dotdot", vec![link("../canary/f")]),
        ("target dotdot inside", vec![link("etc/../../canary/f")]),
        ("target a directory", vec![Op::Dir("d".into()), link("d")]),
        ("target missing", vec![link("nothing")]),
        (
            "target's parent replaced by a symlink",
            vec![Op::File("p/f".into()), sym("p", canary), link("p/f")],
        ),
    ];
    for (what, ops) in links {
        out.push(Case {
            what: format!("hard link: {what}"),
            setup: vec![],
            ops,
            deleted: vec![],
            refuse: true,
        });
    }
    out
}

#[test]
fn no_redirect_of_any_entry_kind_reaches_outside_the_rootfs() {
    let mut refused = 0;
    let all = {
        let (_top, _rootfs, canary) = canary_sandbox();
        cases(&canary.display().to_string()).len()
    };
    for i in 0..all {
        let (top, rootfs, canary) = canary_sandbox();
        let case = cases(&canary.display().to_string()).swap_remove(i);
        for (link, target) in &case.setup {
            symlink(target, rootfs.join(link)).unwrap();
        }
        let before = outside(top.path());
        let deleted: Vec<&str> = case.deleted.iter().map(String::as_str).collect();
        let ckpt = checkpoint_with(build(&case.ops), &deleted);
        let result = apply(ckpt.path(), &rootfs);
        assert_eq!(
            before,
            outside(top.path()),
            "{}: something outside the rootfs changed",
            case.what
        );
        match result {
            Err(e) => {
                assert_eq!(
                    e.code(),
                    containerd_shim_protos::ttrpc::Code::INVALID_ARGUMENT,
                    "{}: {e}",
                    case.what
                );
                refused += 1;
            }
            Ok(_) => assert!(!case.refuse, "{}: applied, must be refused", case.what),
        }
    }
    assert!(all > 150 && refused > all * 3 / 4, "{refused} of {all}");
}

#[test]
fn unsupported_entries_are_named_in_words() {
    for (kind, words) in [
        (EntryType::Block, "dev/x is a block device"),
        (EntryType::Char, "dev/x is a character device"),
        (
            EntryType::new(b' '),
            "dev/x is an entry of unknown type 0x20",
        ),
    ] {
        let (_top, rootfs, _) = sandbox();
        let ckpt = checkpoint_with(|b| raw_entry(b, "dev/x", kind, None, b""), &[]);
        let err = apply(ckpt.path(), &rootfs).unwrap_err().to_string();
        assert!(err.contains(words), "{err}");
        assert!(
            err.contains("only regular files, directories, symlinks, hard links and fifos"),
            "{err}"
        );
        assert!(
            !err.contains("Nonexhaustive") && !err.contains('('),
            "{err}"
        );
    }
}

#[test]
fn a_whiteout_entry_removes_its_file_and_is_not_created() {
    let (_top, rootfs, _) = sandbox();
    fs::create_dir(rootfs.join("etc/d")).unwrap();
    symlink("/", rootfs.join("etc/d/inner")).unwrap();
    let ckpt = checkpoint_with(
        |b| {
            raw_entry(b, "etc/.wh.keep", EntryType::Regular, None, b"");
            raw_entry(b, ".wh.etc", EntryType::Regular, None, b"");
            raw_entry(b, "missing/.wh.x", EntryType::Regular, None, b"");
        },
        &[],
    );
    let stats = apply(ckpt.path(), &rootfs).unwrap();
    assert_eq!(stats.deleted, 3);
    assert_eq!(fs::read_dir(&rootfs).unwrap().count(), 0);
}

/// Files are written on worker threads; every entry still sees what a sequential apply would
/// have left: the later of two entries at one path wins, a whiteout removes files written just
/// before it, a file replaces a directory whose files were just written, a directory replaces
/// a file, and a hard link finds its target written. Run many times: a race would show.
#[test]
fn entries_after_files_being_written_see_them_as_written() {
    for round in 0..20 {
        let (_top, rootfs, _) = sandbox();
        let big = vec![b'x'; 256 << 10];
        let ckpt = checkpoint_with(
            |b| {
                for i in 0..50 {
                    raw_entry(b, &format!("d/f{i}"), EntryType::Regular, None, &big);
                }
                raw_entry(b, "twice", EntryType::Regular, None, &big);
                raw_entry(b, "twice", EntryType::Regular, None, b"second");
                raw_entry(b, "gone/a", EntryType::Regular, None, &big);
                raw_entry(b, ".wh.gone", EntryType::Regular, None, b"");
                raw_entry(b, "d", EntryType::Regular, None, b"now a file");
                raw_entry(b, "e/f", EntryType::Regular, None, &big);
                raw_entry(b, "e/f", EntryType::Directory, None, b"");
                raw_entry(b, "src", EntryType::Regular, None, b"linked");
                raw_entry(b, "hard", EntryType::Link, Some("src"), b"");
            },
            &[],
        );
        let stats = apply(ckpt.path(), &rootfs).unwrap_or_else(|e| panic!("round {round}: {e}"));
        assert_eq!(
            fs::read(rootfs.join("twice")).unwrap(),
            b"second",
            "round {round}"
        );
        assert!(!rootfs.join("gone").exists(), "round {round}");
        assert_eq!(
            fs::read(rootfs.join("d")).unwrap(),
            b"now a file",
            "round {round}"
        );
        assert!(rootfs.join("e/f").is_dir(), "round {round}");
        assert_eq!(
            fs::read(rootfs.join("hard")).unwrap(),
            b"linked",
            "round {round}"
        );
        assert_eq!(
            fs::metadata(rootfs.join("hard")).unwrap().ino(),
            fs::metadata(rootfs.join("src")).unwrap().ino()
        );
        assert_eq!(stats.deleted, 1);
        assert_eq!(
            stats.bytes,
            53 * big.len() as u64 + 6 + 10 + 6,
            "round {round}: every file's bytes counted"
        );
    }
}

/// A writer's failure is the apply's error, and nothing queued after it is left running.
#[test]
fn a_file_that_cannot_be_written_fails_the_apply() {
    let (_top, rootfs, _) = sandbox();
    let big = vec![b'x'; 64 << 10];
    let ckpt = checkpoint_with(
        |b| {
            for i in 0..20 {
                raw_entry(b, &format!("ok{i}"), EntryType::Regular, None, &big);
            }
            // Claims more bytes than the archive holds: the last entry, cut short.
            let mut h = Header::new_gnu();
            h.set_path("short").unwrap();
            h.set_entry_type(EntryType::Regular);
            h.set_mode(0o644);
            h.set_size(1 << 20);
            h.set_cksum();
            b.append(&h, &[0u8; 512][..]).unwrap_or(());
        },
        &[],
    );
    let e = apply(ckpt.path(), &rootfs).expect_err("a cut archive");
    let text = e.to_string();
    assert!(
        text.contains("short") || text.contains(ROOTFS_DIFF),
        "the error names the entry or the archive: {text}"
    );
}

#[test]
fn removal_goes_through_descriptors_and_never_follows_a_symlink_inside() {
    let (top, rootfs, canary) = canary_sandbox();
    fs::create_dir_all(rootfs.join("victim/deep")).unwrap();
    symlink(&canary, rootfs.join("victim/deep/out")).unwrap();
    symlink(&canary, rootfs.join("victim/out")).unwrap();
    let before = outside(top.path());
    let ckpt = checkpoint_with(|_| {}, &["/victim"]);
    apply(ckpt.path(), &rootfs).unwrap();
    assert!(!rootfs.join("victim").exists());
    assert_eq!(before, outside(top.path()));
}

// ---------------------------------------------------------------------------
// Sparse entries, and a real overlay captured and restored.
// ---------------------------------------------------------------------------

/// A sparse file of `size` bytes with 4 KiB of data at each of `offsets`.
fn sparse_file(path: &std::path::Path, size: u64, offsets: &[u64]) {
    use std::os::unix::fs::FileExt;
    let f = fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    for (i, off) in offsets.iter().enumerate() {
        f.write_all_at(&[b'a' + (i % 26) as u8; 4096], *off)
            .unwrap();
    }
}

/// Compares two files without reading holes byte by byte in a debug build:
/// same length, same data segments, same data in them.
fn assert_same_sparse(a: &std::path::Path, b: &std::path::Path) {
    use std::os::unix::fs::FileExt;
    let (fa, fb) = (fs::File::open(a).unwrap(), fs::File::open(b).unwrap());
    let size = fa.metadata().unwrap().len();
    assert_eq!(size, fb.metadata().unwrap().len(), "{}", b.display());
    let sa = super::sparse::data_segments(&fa, size).unwrap();
    let sb = super::sparse::data_segments(&fb, size).unwrap();
    assert_eq!(sa, sb, "{}", b.display());
    for s in sa {
        let (mut ba, mut bb) = (vec![0; s.len as usize], vec![0; s.len as usize]);
        fa.read_exact_at(&mut ba, s.offset).unwrap();
        fb.read_exact_at(&mut bb, s.offset).unwrap();
        assert!(ba == bb, "{} differs at {}", b.display(), s.offset);
    }
}

#[test]
fn sparse_entries_are_read_back_by_the_tar_crate_and_gnu_tar() {
    use std::io::Read;
    let top = tempfile::tempdir().unwrap();
    let upper = top.path().join("upper");
    // A name over 100 bytes: the entry needs a GNU long name first.
    let dir = upper.join("d".repeat(60));
    fs::create_dir_all(&dir).unwrap();
    let name = format!("{}-sparse", "s".repeat(60));
    let file = dir.join(&name);
    // 30 segments: 4 in the header, 21 in one extended block, 5 in another;
    // the file ends in a hole.
    let offsets: Vec<u64> = (0..30).map(|i| i * (2 << 20) + 512 * (i % 3)).collect();
    sparse_file(&file, 64 << 20, &offsets);
    let small = upper.join("small");
    sparse_file(&small, 1 << 20, &[8192]);
    let out = top.path().join("out");
    let stats = capture_upper(&upper, &out);
    let archive = out.join(ROOTFS_DIFF);
    let archived = fs::metadata(&archive).unwrap().len();
    assert!(archived < 1 << 20, "archive of {archived} bytes");
    assert!(stats.bytes < 512 << 10, "{stats:?}");

    // The tar crate reads the same bytes.
    let mut a = tar::Archive::new(fs::File::open(&archive).unwrap());
    let mut seen = 0;
    for e in a.entries().unwrap() {
        let mut e = e.unwrap();
        let path = upper.join(e.path().unwrap());
        if !path.is_file() {
            continue;
        }
        assert_eq!(e.header().entry_type(), EntryType::GNUSparse);
        let mut want = fs::File::open(&path).unwrap();
        let (mut x, mut y) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
        let mut total = 0u64;
        loop {
            let n = e.read(&mut x).unwrap();
            if n == 0 {
                break;
            }
            want.read_exact(&mut y[..n]).unwrap();
            assert!(x[..n] == y[..n], "{} differs near {total}", path.display());
            total += n as u64;
        }
        assert_eq!(total, fs::metadata(&path).unwrap().len());
        seen += 1;
    }
    assert_eq!(seen, 2);

    // GNU tar too.
    let gnu = top.path().join("gnu");
    fs::create_dir(&gnu).unwrap();
    let st = std::process::Command::new("tar")
        .arg("-xf")
        .arg(&archive)
        .arg("-C")
        .arg(&gnu)
        .status()
        .unwrap();
    assert!(st.success());
    let rel = file.strip_prefix(&upper).unwrap();
    assert_eq!(
        fs::read(gnu.join(rel)).unwrap(),
        fs::read(&file).unwrap(),
        "GNU tar read other bytes"
    );
    assert_eq!(
        fs::read(gnu.join("small")).unwrap(),
        fs::read(&small).unwrap()
    );

    // And apply keeps the holes.
    let rootfs = top.path().join("rootfs");
    fs::create_dir(&rootfs).unwrap();
    apply(&out, &rootfs).unwrap();
    assert_same_sparse(&file, &rootfs.join(rel));
    let m = fs::metadata(rootfs.join(rel)).unwrap();
    assert!(m.blocks() * 512 < 1 << 20, "{} blocks", m.blocks());
}

#[test]
fn a_hostile_sparse_map_is_invalid() {
    // Two segments out of order: the map is checked before any data is written.
    let top = tempfile::tempdir().unwrap();
    let upper = top.path().join("upper");
    fs::create_dir(&upper).unwrap();
    sparse_file(&upper.join("s"), 1 << 20, &[0, 65536]);
    let out = top.path().join("out");
    capture_upper(&upper, &out);
    let p = out.join(ROOTFS_DIFF);
    let mut bytes = fs::read(&p).unwrap();
    // Swap the first two sparse slots (at 386 and 410) and fix the checksum.
    let (a, b) = (bytes[386..410].to_vec(), bytes[410..434].to_vec());
    bytes[386..410].copy_from_slice(&b);
    bytes[410..434].copy_from_slice(&a);
    let mut h = Header::new_old();
    h.as_mut_bytes().copy_from_slice(&bytes[..512]);
    h.set_cksum();
    bytes[..512].copy_from_slice(h.as_bytes());
    fs::write(&p, bytes).unwrap();
    let (_top2, rootfs, _) = sandbox();
    let err = apply(&out, &rootfs).unwrap_err();
    assert_eq!(
        err.code(),
        containerd_shim_protos::ttrpc::Code::INVALID_ARGUMENT,
        "{err}"
    );
}

/// An overlay mount, detached when dropped.
struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

fn mount_overlay(top: &std::path::Path, lower: &std::path::Path, n: &str) -> (Mounted, PathBuf) {
    let (upper, work, merged) = (
        top.join(format!("upper{n}")),
        top.join(format!("work{n}")),
        top.join(format!("merged{n}")),
    );
    for d in [&upper, &work, &merged] {
        fs::create_dir(d).unwrap();
    }
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.display(),
        upper.display(),
        work.display()
    );
    nix::mount::mount(
        Some("overlay"),
        &merged,
        Some("overlay"),
        nix::mount::MsFlags::empty(),
        Some(opts.as_str()),
    )
    .unwrap();
    (Mounted(merged.clone()), merged)
}

#[derive(Debug, PartialEq)]
struct View {
    path: Vec<u8>,
    kind: u32,
    mode: u32,
    uid: u32,
    gid: u32,
    size: u64,
    nlink: u64,
    mtime: i64,
    link: Option<PathBuf>,
    xattrs: Vec<(std::ffi::OsString, Vec<u8>)>,
}

/// A merged view, file by file (the root's own times aside); regular file
/// contents are compared separately.
fn view(root: &std::path::Path, dir_times: bool) -> Vec<View> {
    fn walk(root: &std::path::Path, rel: &std::path::Path, dir_times: bool, out: &mut Vec<View>) {
        use std::os::unix::ffi::OsStrExt;
        let full = root.join(rel);
        let m = fs::symlink_metadata(&full).unwrap();
        let mut xattrs: Vec<_> = xattr::list(&full)
            .map(|l| l.collect::<Vec<_>>())
            .unwrap_or_default()
            .into_iter()
            .filter(|n| !n.to_string_lossy().contains("overlay."))
            .map(|n| {
                let v = xattr::get(&full, &n).ok().flatten().unwrap_or_default();
                (n, v)
            })
            .collect();
        xattrs.sort();
        if !rel.as_os_str().is_empty() {
            out.push(View {
                path: rel.as_os_str().as_bytes().to_vec(),
                kind: m.mode() & libc::S_IFMT,
                mode: m.mode() & 0o7777,
                uid: m.uid(),
                gid: m.gid(),
                size: if m.is_dir() { 0 } else { m.size() },
                nlink: if m.is_dir() { 0 } else { m.nlink() },
                mtime: if m.is_dir() && !dir_times {
                    0
                } else {
                    m.mtime()
                },
                link: fs::read_link(&full).ok(),
                xattrs,
            });
        }
        if m.is_dir() {
            let mut names: Vec<_> = fs::read_dir(&full)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            names.sort();
            for n in names {
                walk(root, &rel.join(n), dir_times, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(root, std::path::Path::new(""), dir_times, &mut out);
    out
}

fn assert_same_contents(a: &std::path::Path, b: &std::path::Path, files: &[View]) {
    use std::os::unix::ffi::OsStrExt;
    for f in files.iter().filter(|v| v.kind == libc::S_IFREG) {
        let rel = std::path::Path::new(std::ffi::OsStr::from_bytes(&f.path));
        assert_same_sparse(&a.join(rel), &b.join(rel));
    }
}

#[test]
fn a_real_overlay_round_trips_through_capture_and_apply() {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;
    let top = tempfile::tempdir().unwrap();
    let top = top.path();
    // The image.
    let lower = top.join("lower");
    for d in ["etc", "data/sub/deeper", "tmp", "keepdir"] {
        fs::create_dir_all(lower.join(d)).unwrap();
    }
    fs::write(lower.join("etc/passwd"), "root:x:0:0").unwrap();
    fs::write(lower.join("data/sub/keep.txt"), "must not come back").unwrap();
    fs::write(lower.join("data/sub/deeper/x"), "nor this").unwrap();
    fs::write(lower.join("data/other"), "nor this").unwrap();
    fs::write(lower.join("gone.txt"), "deleted").unwrap();
    fs::write(
        lower.join(OsStr::from_bytes(b"old\xff")),
        "deleted, not UTF-8",
    )
    .unwrap();
    fs::write(lower.join("keepdir/stays"), "untouched").unwrap();

    // The container's changes, made through the overlay.
    let (m1, merged) = mount_overlay(top, &lower, "1");
    fs::write(merged.join("new.txt"), "new").unwrap();
    std::os::unix::fs::chown(merged.join("new.txt"), Some(1000), Some(1001)).unwrap();
    fs::set_permissions(merged.join("new.txt"), fs::Permissions::from_mode(0o751)).unwrap();
    xattr::set(merged.join("new.txt"), "user.test", b"value").unwrap();
    fs::hard_link(merged.join("new.txt"), merged.join("hard.txt")).unwrap();
    fs::write(merged.join("suid"), "#!/bin/sh").unwrap();
    std::os::unix::fs::chown(merged.join("suid"), Some(1234), Some(1234)).unwrap();
    fs::set_permissions(merged.join("suid"), fs::Permissions::from_mode(0o4755)).unwrap();
    fs::create_dir(merged.join("newdir")).unwrap();
    fs::write(merged.join("newdir/inside"), "in").unwrap();
    fs::set_permissions(merged.join("newdir"), fs::Permissions::from_mode(0o710)).unwrap();
    xattr::set(merged.join("newdir"), "trusted.dir", b"d").unwrap();
    symlink("new.txt", merged.join("link")).unwrap();
    symlink("/etc/passwd", merged.join("abs-link")).unwrap();
    xattr::set(merged.join("link"), "trusted.sym", b"s").unwrap();
    nix::unistd::mkfifo(
        &merged.join("fifo"),
        nix::sys::stat::Mode::from_bits_truncate(0o640),
    )
    .unwrap();
    let _sock = std::os::unix::net::UnixListener::bind(merged.join("tmp/app.sock")).unwrap();
    fs::remove_dir_all(merged.join("data")).unwrap();
    fs::create_dir_all(merged.join("data/sub")).unwrap();
    fs::write(merged.join("data/sub/new.txt"), "after rm -rf").unwrap();
    fs::remove_file(merged.join("gone.txt")).unwrap();
    fs::remove_file(merged.join(OsStr::from_bytes(b"old\xff"))).unwrap();
    fs::write(
        merged.join(OsStr::from_bytes(b"new\xfe")),
        "added, not UTF-8",
    )
    .unwrap();
    fs::create_dir(merged.join("big")).unwrap();
    let offsets: Vec<u64> = (0..7).map(|i| i * (150 << 20) + 4096 * i).collect();
    sparse_file(&merged.join("big/sparse"), 1 << 30, &offsets);
    // Times last, so that every directory's own is known.
    for (p, t) in [("newdir", 1_500_000_000), ("new.txt", 1_400_000_000)] {
        let ts = nix::sys::time::TimeSpec::new(t, 0);
        nix::sys::stat::utimensat(
            nix::fcntl::AT_FDCWD,
            &merged.join(p),
            &ts,
            &ts,
            nix::sys::stat::UtimensatFlags::NoFollowSymlink,
        )
        .unwrap();
    }
    let upper1 = top.join("upper1");
    assert!(
        matches!(xattr::get(upper1.join("data"), "trusted.overlay.opaque"), Ok(Some(v)) if v == b"y"),
        "the kernel made /data opaque"
    );

    let ckpt = top.join("ckpt");
    fs::create_dir(&ckpt).unwrap();
    let stats = capture(&overlay_of(&merged).unwrap(), &ckpt).unwrap();
    assert_eq!(stats.skipped, vec!["/tmp/app.sock (socket)".to_string()]);
    let deleted: Vec<String> =
        serde_json::from_slice(&fs::read(ckpt.join(DELETED_FILES)).unwrap()).unwrap();
    for d in [
        "/gone.txt",
        "/data/sub/keep.txt",
        "/data/sub/deeper",
        "/data/other",
    ] {
        assert!(deleted.iter().any(|x| x == d), "{d} not in {deleted:?}");
    }
    let tar_bytes = fs::read(ckpt.join(ROOTFS_DIFF)).unwrap();
    assert!(
        tar_bytes.windows(8).any(|w| w == b".wh.old\xff"),
        "the non-UTF-8 deletion is a whiteout entry"
    );
    assert!(tar_bytes.len() < 2 << 20, "{} bytes", tar_bytes.len());

    let mut want = view(&merged, true);
    want.retain(|v| v.path != b"tmp/app.sock");
    // The socket is gone after restore: the tmp dir's mtime may differ.
    for v in &mut want {
        if v.path == b"tmp" {
            v.mtime = 0;
        }
    }

    // Restore in our order: deleted.files, then the archive.
    let (_m2, merged2) = mount_overlay(top, &lower, "2");
    let applied = apply(&ckpt, &merged2).unwrap();
    assert_eq!(applied.deleted, stats.deleted, "{applied:?} {stats:?}");
    let mut got = view(&merged2, true);
    for v in &mut got {
        if v.path == b"tmp" {
            v.mtime = 0;
        }
    }
    assert_eq!(want, got);
    assert_same_contents(&merged, &merged2, &want);
    assert!(!merged2.join("data/sub/keep.txt").exists());
    assert_eq!(
        fs::metadata(merged2.join("new.txt")).unwrap().ino(),
        fs::metadata(merged2.join("hard.txt")).unwrap().ino()
    );
    let big = fs::metadata(merged2.join("big/sparse")).unwrap();
    assert_eq!(big.len(), 1 << 30);
    assert!(big.blocks() * 512 < 1 << 20, "{} blocks", big.blocks());

    // Podman's order: the archive first, then deleted.files.
    let (tar_only, del_only) = (top.join("tar-only"), top.join("del-only"));
    fs::create_dir(&tar_only).unwrap();
    fs::create_dir(&del_only).unwrap();
    fs::copy(ckpt.join(ROOTFS_DIFF), tar_only.join(ROOTFS_DIFF)).unwrap();
    fs::copy(ckpt.join(DELETED_FILES), del_only.join(DELETED_FILES)).unwrap();
    let (_m3, merged3) = mount_overlay(top, &lower, "3");
    apply(&tar_only, &merged3).unwrap();
    apply(&del_only, &merged3).unwrap();
    let mut want_no_dir_times = view(&merged, false);
    want_no_dir_times.retain(|v| v.path != b"tmp/app.sock");
    assert_eq!(want_no_dir_times, view(&merged3, false));
    assert_same_contents(&merged, &merged3, &want);
    drop(m1);
}

#[test]
fn opaque_directories_hide_every_lower_layer_at_any_depth_and_unrestorable_entries_are_reported() {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;
    let top = tempfile::tempdir().unwrap();
    let (upper, l1, l2) = (
        top.path().join("upper"),
        top.path().join("l1"),
        top.path().join("l2"),
    );
    let host = top.path().join("host");
    fs::create_dir_all(host.join("secret")).unwrap();
    fs::create_dir_all(l1.join("data")).unwrap();
    fs::write(l1.join("data/a"), "").unwrap();
    // A lower symlink where the upper has a directory: never followed.
    symlink(&host, l1.join("data/link")).unwrap();
    fs::create_dir_all(l2.join("data/sub/deep")).unwrap();
    fs::write(l2.join("data/b"), "").unwrap();
    fs::write(l2.join("data/sub/c"), "").unwrap();
    fs::write(l2.join("data/sub/deep/d"), "").unwrap();
    fs::write(l2.join(OsStr::from_bytes(b"data/sub/n\xff")), "").unwrap();
    fs::create_dir_all(l2.join("data/file-now")).unwrap();
    fs::write(l2.join("data/file-now/e"), "").unwrap();
    fs::write(l2.join("data/sock"), "").unwrap();
    fs::create_dir_all(upper.join("data/sub/deep")).unwrap();
    fs::create_dir_all(upper.join("data/link")).unwrap();
    fs::write(upper.join("data/file-now"), "replaces the dir").unwrap();
    xattr::set(upper.join("data"), "trusted.overlay.opaque", b"y").unwrap();
    let _sock = std::os::unix::net::UnixListener::bind(upper.join("data/sock")).unwrap();
    fs::write(upper.join(".wh.mine"), "").unwrap();
    nix::sys::stat::mknod(
        &upper.join("blk"),
        nix::sys::stat::SFlag::S_IFBLK,
        nix::sys::stat::Mode::from_bits_truncate(0o600),
        nix::sys::stat::makedev(7, 0),
    )
    .unwrap();
    nix::sys::stat::mknod(
        &upper.join("chr"),
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::from_bits_truncate(0o600),
        nix::sys::stat::makedev(1, 3),
    )
    .unwrap();
    let out = top.path().join("out");
    fs::create_dir(&out).unwrap();
    let stats = capture(
        &Overlay {
            upper,
            lowers: vec![l1, l2],
        },
        &out,
    )
    .unwrap();
    let mut skipped = stats.skipped.clone();
    skipped.sort();
    assert_eq!(
        skipped,
        [
            "/.wh.mine (its name starts with .wh., which marks a deletion in the archive)",
            "/blk (block device)",
            "/chr (character device)",
            "/data/sock (socket)",
        ]
    );
    let mut deleted: Vec<String> =
        serde_json::from_slice(&fs::read(out.join(DELETED_FILES)).unwrap()).unwrap();
    deleted.sort();
    assert_eq!(
        deleted,
        [
            "/data/a",
            "/data/b",
            "/data/sock",
            "/data/sub/c",
            "/data/sub/deep/d"
        ]
    );
    let mut a = tar::Archive::new(fs::File::open(out.join(ROOTFS_DIFF)).unwrap());
    let names: Vec<Vec<u8>> = a
        .entries()
        .unwrap()
        .map(|e| e.unwrap().path_bytes().into_owned())
        .collect();
    assert!(names.contains(&b"data/sub/.wh.n\xff".to_vec()), "{names:?}");
    assert!(!names
        .iter()
        .any(|n| n.starts_with(b"blk") || n.starts_with(b"chr")));
    assert_eq!(stats.deleted, 6);
}

#[test]
fn an_all_hole_file_is_a_sparse_entry_without_data() {
    let top = tempfile::tempdir().unwrap();
    let upper = top.path().join("upper");
    fs::create_dir(&upper).unwrap();
    sparse_file(&upper.join("holes"), 1 << 30, &[]);
    let out = top.path().join("out");
    let stats = capture_upper(&upper, &out);
    assert_eq!(stats.bytes, 0);
    let gnu = top.path().join("gnu");
    fs::create_dir(&gnu).unwrap();
    assert!(std::process::Command::new("tar")
        .arg("-xf")
        .arg(out.join(ROOTFS_DIFF))
        .arg("-C")
        .arg(&gnu)
        .status()
        .unwrap()
        .success());
    assert_eq!(fs::metadata(gnu.join("holes")).unwrap().len(), 1 << 30);
    let (_t, rootfs, _) = sandbox();
    apply(&out, &rootfs).unwrap();
    let m = fs::metadata(rootfs.join("holes")).unwrap();
    assert_eq!((m.len(), m.blocks()), (1 << 30, 0));
    assert_same_sparse(&upper.join("holes"), &rootfs.join("holes"));
}

/// An xfs filesystem with reflink, loop-mounted under `top` (mkfs.xfs from xfsprogs, `make deps`;
/// root). Unmounted on drop.
struct XfsMount(PathBuf);

impl XfsMount {
    fn new(top: &std::path::Path) -> Self {
        assert!(
            nix::unistd::Uid::effective().is_root(),
            "the reflink tests mount an xfs loop filesystem: run them as root"
        );
        let image = top.join("xfs.img");
        fs::File::create(&image)
            .unwrap()
            .set_len(512 << 20)
            .unwrap();
        let run = |cmd: &mut std::process::Command| {
            let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
            assert!(
                out.status.success(),
                "{cmd:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        run(std::process::Command::new("mkfs.xfs")
            .args(["-q", "-m", "reflink=1"])
            .arg(&image));
        let mnt = top.join("xfs");
        fs::create_dir(&mnt).unwrap();
        run(std::process::Command::new("mount")
            .args(["-o", "loop"])
            .arg(&image)
            .arg(&mnt));
        XfsMount(mnt)
    }
}

impl Drop for XfsMount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// The reflink path: the snapshot in the stop is the instant it was taken, whatever the upper
/// was at the precopy before it and whatever it becomes before the archive is written (the
/// container runs again by then): rewritten, grown, shrunk, sparse, hard-linked and deleted files
/// all come back as they were in the stop. Files changed between the precopy and the stop, even
/// rewritten at the same size, are cloned again; the others are the precopy's.
#[test]
fn a_reflink_snapshot_is_archived_as_it_was_taken() {
    let top = tempfile::tempdir().unwrap();
    let xfs = XfsMount::new(top.path());
    let upper = xfs.0.join("snap/fs");
    fs::create_dir_all(upper.join("dir")).unwrap();
    let big: Vec<u8> = (0..3 * 1024 * 1024 + 123)
        .map(|i| (i * 7 % 251) as u8)
        .collect();
    fs::write(upper.join("big"), &big).unwrap();
    fs::write(upper.join("dir/small"), "precopy").unwrap();
    fs::write(upper.join("dir/same-size"), "version 1").unwrap();
    fs::write(upper.join("dir/gone-later"), "still here").unwrap();
    fs::write(upper.join("dir/gone-before"), "deleted before the stop").unwrap();
    fs::write(upper.join("empty"), "").unwrap();
    symlink("dir/small", upper.join("sym")).unwrap();
    {
        let f = fs::File::create(upper.join("sparse")).unwrap();
        f.set_len(64 << 20).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, b"middle", 32 << 20).unwrap();
    }
    let overlay = Overlay {
        upper: upper.clone(),
        lowers: vec![],
    };
    // Settled (changed more than a second before the precopy): taken from it if unchanged.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let precopy = Snapshot::precopy(&overlay)
        .unwrap()
        .expect("xfs with reflink=1 clones extents");

    // The container runs on between the precopy and the stop.
    fs::write(upper.join("dir/small"), "stop").unwrap();
    fs::write(upper.join("dir/same-size"), "version 2").unwrap();
    fs::remove_file(upper.join("dir/gone-before")).unwrap();
    fs::write(upper.join("dir/new-before"), "new before the stop").unwrap();
    fs::hard_link(upper.join("dir/small"), upper.join("small-link")).unwrap();

    let snap = precopy.again(&overlay).unwrap();
    assert_eq!(snap.path(), "reflink");
    // big, sparse, empty, gone-later: as the precopy left them; small (and its new link's inode),
    // same-size and new-before: cloned again.
    assert_eq!((snap.reused, snap.retaken), (4, 3));
    let (cloned, copied, _) = snap.cloned_copied();
    assert!(cloned >= 3 * 1024 * 1024, "cloned {cloned}");
    assert!(copied < 64 * 1024, "copied {copied}");

    // The container goes on after the stop.
    fs::write(upper.join("big"), b"rewritten").unwrap();
    fs::write(upper.join("dir/small"), "after, and longer than before").unwrap();
    fs::write(upper.join("dir/same-size"), "version 3").unwrap();
    fs::remove_file(upper.join("dir/gone-later")).unwrap();
    fs::write(upper.join("dir/new-later"), "new").unwrap();
    std::os::unix::fs::FileExt::write_all_at(
        &fs::OpenOptions::new()
            .write(true)
            .open(upper.join("sparse"))
            .unwrap(),
        b"LATER!",
        32 << 20,
    )
    .unwrap();

    let out = top.path().join("out");
    fs::create_dir(&out).unwrap();
    snap.write(&out).unwrap();
    let (_t, rootfs) = rootfs_sandbox();
    apply(&out, &rootfs).unwrap();
    assert_eq!(fs::read(rootfs.join("big")).unwrap(), big);
    assert_eq!(
        fs::read_to_string(rootfs.join("dir/small")).unwrap(),
        "stop"
    );
    assert_eq!(
        fs::read_to_string(rootfs.join("dir/same-size")).unwrap(),
        "version 2"
    );
    assert_eq!(
        fs::metadata(rootfs.join("small-link")).unwrap().ino(),
        fs::metadata(rootfs.join("dir/small")).unwrap().ino()
    );
    assert_eq!(
        fs::read_to_string(rootfs.join("dir/gone-later")).unwrap(),
        "still here"
    );
    assert!(!rootfs.join("dir/gone-before").exists());
    assert_eq!(
        fs::read_to_string(rootfs.join("dir/new-before")).unwrap(),
        "new before the stop"
    );
    assert!(!rootfs.join("dir/new-later").exists());
    assert_eq!(fs::read(rootfs.join("empty")).unwrap(), b"");
    assert_eq!(
        fs::read_link(rootfs.join("sym")).unwrap(),
        PathBuf::from("dir/small")
    );
    let sparse = fs::read(rootfs.join("sparse")).unwrap();
    assert_eq!(sparse.len(), 64 << 20);
    assert_eq!(&sparse[32 << 20..(32 << 20) + 6], b"middle");
}

/// The bytes of `file` in `[from, from + len)` that FIEMAP says share their extents with
/// another file.
fn shared_bytes(file: &fs::File, from: u64, len: u64) -> u64 {
    use std::os::fd::AsRawFd;
    // struct fiemap, then its extents (56 bytes each), as the kernel lays them out.
    const FS_IOC_FIEMAP: libc::c_ulong = 0xc020_660b;
    const FIEMAP_FLAG_SYNC: u32 = 1;
    const FIEMAP_EXTENT_SHARED: u32 = 0x2000;
    const N: usize = 256;
    let mut buf = vec![0u64; (32 + 56 * N) / 8];
    buf[0] = from;
    buf[1] = len;
    // fm_flags (u32) and fm_extent_count (u32, after fm_mapped_extents).
    buf[2] = u64::from(FIEMAP_FLAG_SYNC);
    buf[3] = N as u64;
    // SAFETY: the buffer is a fiemap with room for N extents, alive through the call.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), FS_IOC_FIEMAP, buf.as_mut_ptr()) };
    assert_eq!(r, 0, "FIEMAP: {}", io::Error::last_os_error());
    let mapped = (buf[2] >> 32) as usize;
    let mut shared = 0;
    for i in 0..mapped.min(N) {
        let e = &buf[4 + i * 7..4 + (i + 1) * 7];
        let (logical, length, flags) = (e[0], e[2], e[5] as u32);
        if flags & FIEMAP_EXTENT_SHARED != 0 {
            let start = logical.max(from);
            let end = (logical + length).min(from + len);
            shared += end.saturating_sub(start);
        }
    }
    shared
}

/// The reflink path writes a large file into the archive on a block boundary, so that the archive
/// shares its extents instead of holding a copy: with the archive on the same xfs, every block of
/// its data is shared, and the file comes back whole. A small file stays where it falls.
#[test]
fn a_large_file_is_cloned_into_the_archive_on_a_block_boundary() {
    let top = tempfile::tempdir().unwrap();
    let xfs = XfsMount::new(top.path());
    let upper = xfs.0.join("snap/fs");
    fs::create_dir_all(&upper).unwrap();
    let big: Vec<u8> = (0..5 * 1024 * 1024 + 321)
        .map(|i| (i * 13 % 251) as u8)
        .collect();
    fs::write(
        upper.join("a-small"),
        "leads, so that big does not start aligned",
    )
    .unwrap();
    fs::write(upper.join("big"), &big).unwrap();
    let overlay = Overlay {
        upper: upper.clone(),
        lowers: vec![],
    };
    let snap = Snapshot::precopy(&overlay)
        .unwrap()
        .expect("xfs with reflink=1 clones extents")
        .again(&overlay)
        .unwrap();
    let out = xfs.0.join("out");
    fs::create_dir(&out).unwrap();
    snap.write(&out).unwrap();

    let tar_path = out.join(ROOTFS_DIFF);
    let mut archive = tar::Archive::new(fs::File::open(&tar_path).unwrap());
    let mut at = None;
    for e in archive.entries().unwrap() {
        let e = e.unwrap();
        match &*e.path_bytes() {
            b"big" => at = Some(e.raw_file_position()),
            b"a-small" => assert_ne!(e.raw_file_position() % 4096, 0, "no padding for it"),
            _ => {}
        }
    }
    let at = at.expect("big is in the archive");
    assert_eq!(at % 4096, 0, "big's data at {at}");
    let whole = big.len() as u64 / 4096 * 4096;
    let tar = fs::File::open(&tar_path).unwrap();
    assert_eq!(
        shared_bytes(&tar, at, whole),
        whole,
        "big's blocks are shared"
    );

    let (_t, rootfs) = rootfs_sandbox();
    apply(&out, &rootfs).unwrap();
    assert_eq!(fs::read(rootfs.join("big")).unwrap(), big);
}

/// The apply clones a large file out of an archive on the rootfs's file system only where the
/// archive is on disk. From one just written (as containerd's unpacked copy is at every Create),
/// a clone would make xfs write the archive to disk first, inside Create: the file is copied.
/// From one already on disk (a checkpoint directory the caller keeps), it is cloned.
#[test]
fn the_apply_clones_out_of_the_archive_only_what_is_on_disk() {
    let top = tempfile::tempdir().unwrap();
    let xfs = XfsMount::new(top.path());
    let upper = top.path().join("upper");
    fs::create_dir(&upper).unwrap();
    let big: Vec<u8> = (0..4 << 20).map(|i| (i * 7 % 253) as u8).collect();
    fs::write(upper.join("big"), &big).unwrap();
    let made = top.path().join("made");
    fs::create_dir(&made).unwrap();
    capture(
        &Overlay {
            upper,
            lowers: vec![],
        },
        &made,
    )
    .unwrap();
    // Written, not cloned or copied in the kernel: its pages are dirty, as containerd's are.
    let ckpt = xfs.0.join("ckpt");
    fs::create_dir(&ckpt).unwrap();
    for f in [ROOTFS_DIFF, DELETED_FILES] {
        fs::write(ckpt.join(f), fs::read(made.join(f)).unwrap()).unwrap();
    }
    let tar = fs::File::open(ckpt.join(ROOTFS_DIFF)).unwrap();
    let len = tar.metadata().unwrap().len();
    assert_eq!(super::copy::unwritten(&tar, 0, len), Some(true));

    let restored = |name: &str| {
        let rootfs = xfs.0.join(name);
        fs::create_dir(&rootfs).unwrap();
        apply(&ckpt, &rootfs).unwrap();
        let f = fs::File::open(rootfs.join("big")).unwrap();
        assert_eq!(fs::read(rootfs.join("big")).unwrap(), big, "{name}");
        shared_bytes(&f, 0, big.len() as u64)
    };
    assert_eq!(restored("from-dirty"), 0, "copied, not cloned");
    assert_eq!(
        super::copy::unwritten(&tar, 0, len),
        Some(true),
        "not flushed"
    );

    tar.sync_all().unwrap();
    assert_eq!(super::copy::unwritten(&tar, 0, len), Some(false));
    assert_eq!(restored("from-disk"), big.len() as u64, "cloned");
}

/// No reflink where the filesystem cannot clone (tmpfs): the copying path.
#[test]
fn no_clones_where_the_filesystem_cannot_make_them() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "mounts a tmpfs: run as root"
    );
    let top = tempfile::tempdir().unwrap();
    nix::mount::mount(
        Some("tmpfs"),
        top.path(),
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .unwrap();
    fs::create_dir(top.path().join("fs")).unwrap();
    let probed = Clones::probe(&top.path().join("fs"));
    nix::mount::umount2(top.path(), nix::mount::MntFlags::MNT_DETACH).unwrap();
    assert!(probed.is_none(), "tmpfs cannot clone extents");
}

/// This thread's user and system CPU time so far, in seconds (for the measures below).
fn thread_cpu() -> (f64, f64) {
    // SAFETY: getrusage fills the rusage we own.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut u) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    (tv(u.ru_utime), tv(u.ru_stime))
}

/// Not a test: a repeatable measure of the apply on its own (`cargo test --release -- --ignored
/// apply_speed --nocapture`; SHIM_APPLY_FILES, SHIM_APPLY_MIB, SHIM_APPLY_DIR), into an overlay
/// mount as a restore's rootfs is.
#[test]
#[ignore]
fn apply_speed() {
    let env = |k: &str, d: u64| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let (files, mib) = (env("SHIM_APPLY_FILES", 10_000), env("SHIM_APPLY_MIB", 1024));
    let base = std::env::var("SHIM_APPLY_DIR").unwrap_or_else(|_| "/var/tmp".into());
    let top = tempfile::tempdir_in(base).unwrap();
    let upper = top.path().join("src");
    fs::create_dir_all(upper.join("data")).unwrap();
    let per = (mib << 20) / files;
    let chunk: Vec<u8> = (0..per).map(|i| (i % 251) as u8).collect();
    for i in 0..files {
        fs::write(upper.join(format!("data/f{i:05}")), &chunk).unwrap();
    }
    let ckpt = top.path().join("ckpt");
    fs::create_dir(&ckpt).unwrap();
    capture(
        &Overlay {
            upper,
            lowers: vec![],
        },
        &ckpt,
    )
    .unwrap();
    let (lower, up, work, merged) = (
        top.path().join("l"),
        top.path().join("u"),
        top.path().join("w"),
        top.path().join("m"),
    );
    for d in [&lower, &up, &work, &merged] {
        fs::create_dir(d).unwrap();
    }
    nix::mount::mount(
        Some("overlay"),
        &merged,
        Some("overlay"),
        nix::mount::MsFlags::empty(),
        Some(
            format!(
                "lowerdir={},upperdir={},workdir={}",
                lower.display(),
                up.display(),
                work.display()
            )
            .as_str(),
        ),
    )
    .unwrap();
    let (u0, s0) = thread_cpu();
    let t0 = std::time::Instant::now();
    let stats = apply(&ckpt, &merged).unwrap();
    let took = t0.elapsed();
    let (u1, s1) = thread_cpu();
    nix::mount::umount2(&merged, nix::mount::MntFlags::MNT_DETACH).unwrap();
    // CPU time against the wall's: what is left is waiting (the disk, the journal).
    eprintln!(
        "apply: {files} files, {} bytes in {took:?}: {:.2} GB/s; cpu user {:.2} s, sys {:.2} s",
        stats.bytes,
        stats.bytes as f64 / took.as_secs_f64() / 1e9,
        u1 - u0,
        s1 - s0
    );
}

/// The precopy runs while the container does, which may have made its upper hostile: it follows
/// no symlink (to a directory or to a file), blocks on no fifo, and takes only regular files.
#[test]
fn the_precopy_follows_no_symlink_and_blocks_on_no_fifo() {
    let top = tempfile::tempdir().unwrap();
    let xfs = XfsMount::new(top.path());
    let upper = xfs.0.join("snap/fs");
    fs::create_dir_all(upper.join("dir")).unwrap();
    fs::write(upper.join("dir/file"), "mine").unwrap();
    let outside = xfs.0.join("outside");
    fs::create_dir(&outside).unwrap();
    fs::write(outside.join("host-file"), "host").unwrap();
    symlink(&outside, upper.join("to-dir")).unwrap();
    symlink(outside.join("host-file"), upper.join("to-file")).unwrap();
    nix::unistd::mkfifo(
        &upper.join("fifo"),
        nix::sys::stat::Mode::from_bits_truncate(0o644),
    )
    .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let overlay = Overlay {
        upper: upper.clone(),
        lowers: vec![],
    };
    let precopy = Snapshot::precopy(&overlay)
        .unwrap()
        .expect("xfs with reflink=1 clones extents");
    assert_eq!(
        precopy.retaken, 1,
        "only dir/file is a regular file of the upper"
    );
    let snap = precopy.again(&overlay).unwrap();
    assert_eq!((snap.reused, snap.retaken), (1, 0));
}

/// Not a test: the stop's walk of an upper the precopy took whole (`cargo test --release --
/// --ignored stop_walk_speed --nocapture`; SHIM_WALK_FILES, default 10,000 in 100 directories).
#[test]
#[ignore]
fn stop_walk_speed() {
    let files: usize = std::env::var("SHIM_WALK_FILES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let top = tempfile::tempdir().unwrap();
    let xfs = XfsMount::new(top.path());
    let upper = xfs.0.join("snap/fs");
    for i in 0..files {
        let dir = upper.join(format!("d{}", i % 100));
        if i < 100 {
            fs::create_dir_all(&dir).unwrap();
        }
        fs::write(dir.join(format!("f{i}")), vec![b'x'; 4096 + i % 512]).unwrap();
    }
    let overlay = Overlay {
        upper: upper.clone(),
        lowers: vec![],
    };
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let precopy = Snapshot::precopy(&overlay).unwrap().expect("reflink");
    let (u0, s0) = thread_cpu();
    let t0 = std::time::Instant::now();
    let snap = precopy.again(&overlay).unwrap();
    let took = t0.elapsed();
    let (u1, s1) = thread_cpu();
    assert_eq!(snap.reused, files as u64);
    eprintln!(
        "stop walk: {files} files in {took:?}: {:.1} µs a file; cpu user {:.1} ms, sys {:.1} ms",
        took.as_secs_f64() * 1e6 / files as f64,
        (u1 - u0) * 1e3,
        (s1 - s0) * 1e3
    );
}

/// Applying from an archive the apply may use up (containerd's own unpacked copy) restores the
/// same tree as any apply: large files whole, with their owner, mode, times and hard links, in
/// pieces from their end; and the archive is cut short behind them, down to the first large
/// file's data. Any other archive is left whole.
#[test]
fn a_consumed_archive_restores_the_same_files_and_is_cut_short() {
    let top = tempfile::tempdir().unwrap();
    let upper = top.path().join("upper");
    fs::create_dir_all(upper.join("d")).unwrap();
    let bytes = |n: usize, k: usize| -> Vec<u8> { (0..n).map(|i| (i * k % 251) as u8).collect() };
    let (big1, big2) = (bytes((7 << 19) + 123, 7), bytes((2 << 20) + 7, 13));
    fs::write(upper.join("a-small"), "before").unwrap();
    fs::write(upper.join("big1"), &big1).unwrap();
    fs::hard_link(upper.join("big1"), upper.join("d/link")).unwrap();
    fs::write(upper.join("d/big2"), &big2).unwrap();
    fs::set_permissions(upper.join("d/big2"), fs::Permissions::from_mode(0o640)).unwrap();
    fs::File::options()
        .write(true)
        .open(upper.join("d/big2"))
        .unwrap()
        .set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_500_000_000))
        .unwrap();
    fs::write(upper.join("z-small"), "after").unwrap();
    let out = top.path().join("ckpt");
    capture_upper(&upper, &out);
    let tar_path = out.join(ROOTFS_DIFF);
    let whole = fs::read(&tar_path).unwrap();
    let first_big = tar::Archive::new(&whole[..])
        .entries()
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.size() >= 1 << 20)
        .map(|e| e.raw_file_position())
        .min()
        .unwrap();

    let check = |rootfs: &Path| {
        assert_eq!(fs::read(rootfs.join("big1")).unwrap(), big1);
        assert_eq!(fs::read(rootfs.join("d/big2")).unwrap(), big2);
        assert_eq!(
            fs::read_to_string(rootfs.join("a-small")).unwrap(),
            "before"
        );
        assert_eq!(fs::read_to_string(rootfs.join("z-small")).unwrap(), "after");
        let m = fs::metadata(rootfs.join("d/big2")).unwrap();
        assert_eq!(m.permissions().mode() & 0o7777, 0o640);
        assert_eq!(m.mtime(), 1_500_000_000);
        let (one, two) = (
            fs::metadata(rootfs.join("big1")).unwrap(),
            fs::metadata(rootfs.join("d/link")).unwrap(),
        );
        assert_eq!(one.ino(), two.ino(), "d/link is big1's hard link");
    };
    let (_t1, rootfs) = rootfs_sandbox();
    apply(&out, &rootfs).unwrap();
    check(&rootfs);
    assert_eq!(
        fs::read(&tar_path).unwrap(),
        whole,
        "a plain apply leaves it whole"
    );

    let (_t2, rootfs) = rootfs_sandbox();
    apply_consuming(&out, &rootfs).unwrap();
    check(&rootfs);
    assert_eq!(fs::metadata(&tar_path).unwrap().len(), first_big);
}

/// A large file that waits for its data is still where the archive put it when later entries
/// are applied: one that replaces it with a directory wins, as in archive order, and the data
/// copied later goes nowhere.
#[test]
fn a_consumed_archive_keeps_archive_order() {
    let big = vec![5u8; (1 << 20) + 10];
    let ckpt = checkpoint_with(
        |b| {
            raw_entry(b, "x", EntryType::Regular, None, &big);
            raw_entry(b, "x", EntryType::Directory, None, b"");
            raw_entry(b, "y", EntryType::Regular, None, &big);
            raw_entry(b, "x/inside", EntryType::Link, Some("y"), b"");
        },
        &[],
    );
    let (_t, rootfs) = rootfs_sandbox();
    apply_consuming(ckpt.path(), &rootfs).unwrap();
    assert!(fs::metadata(rootfs.join("x")).unwrap().is_dir());
    assert_eq!(fs::read(rootfs.join("x/inside")).unwrap(), big);
    assert_eq!(fs::read(rootfs.join("y")).unwrap(), big);
}
