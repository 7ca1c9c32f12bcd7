//! File names inside a checkpoint directory.

/// Added and changed files of the rootfs (the name Podman and CRI-O use).
pub const ROOTFS_DIFF: &str = "rootfs-diff.tar";
/// JSON list of paths deleted from the rootfs (the name Podman and CRI-O use).
pub const DELETED_FILES: &str = "deleted.files";
/// This shim's own record of the checkpoint: versions, phase timings, sizes.
pub const METADATA: &str = "custom-shim-checkpoint.json";
/// CRIU's logs, written by runc into the work directory.
pub const DUMP_LOG: &str = "dump.log";
pub const RESTORE_LOG: &str = "restore.log";
/// The CRIU config of a dump the shim freezes for itself (in the work dir).
pub const DUMP_CONFIG: &str = "criu-dump.conf";
/// Written in the bundle at a restore: how long applying the rootfs diff took, and its size.
pub const RESTORE_RECORD: &str = "custom-shim-restore.json";
