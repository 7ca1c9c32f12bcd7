//! Protobuf types the shim needs beyond containerd-shim-protos.

/// `runtimeoptions.v1.Options`: containerd's CRI wraps a runtime's TOML options in it.
#[allow(clippy::all, unknown_lints, unused_attributes, unused_mut, missing_docs, non_camel_case_types, non_upper_case_globals)]
#[rustfmt::skip]
pub mod runtimeoptions {
    include!(concat!(env!("OUT_DIR"), "/protos/runtimeoptions.rs"));
}
