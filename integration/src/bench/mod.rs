//! `make bench` (bench/run.sh): the custom shim measured against containerd's Go runc shim in one
//! run, on one private containerd, interleaved. Compiled into the `bench` binary only (the
//! binary includes this directory with `#[path]`), so the integration library stays as it is.

pub mod api;
pub mod cri;
pub mod measure;
pub mod migrate;
pub mod report;
pub mod scenarios;
pub mod stats;
