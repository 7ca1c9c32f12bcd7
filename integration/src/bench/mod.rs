//! `make bench` (bench/run.sh): the custom shim measured against containerd's Go runc shim in one
//! run, on one private containerd, interleaved. Compiled into the `bench` binary only (the
//! binary includes this directory with `#[path]`), so the integration library stays as it is.

pub mod api;
pub mod checkpoint;
pub mod cri;
pub mod diff;
pub mod lifecycle;
pub mod measure;
pub mod memory;
pub mod migrate;
pub mod report;
pub mod restore;
pub mod scenarios;
pub mod stats;
pub mod targets;
