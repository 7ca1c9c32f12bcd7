//! The OCI runtime the shim drives.

pub mod runc;
