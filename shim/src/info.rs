//! The `-info` action: what the runtime is and what its runc can do.

use containerd_shim::Error as ShimError;
use containerd_shim_protos::{
    protobuf::{well_known_types::any::Any, MessageField},
    types::introspection::{RuntimeInfo, RuntimeVersion},
};
use log::debug;

use crate::options::RuntimeOptions;

/// The type URL containerd's typeurl gives the OCI features struct (JSON-encoded).
pub const FEATURES_TYPE_URL: &str =
    "types.containerd.io/opencontainers/runtime-spec/1/features/Features";

pub fn runtime_info(runtime_id: &str, options: Option<&Any>) -> Result<RuntimeInfo, ShimError> {
    let opts = RuntimeOptions::from_any(options)
        .map_err(|e| ShimError::InvalidArgument(format!("runtime options: {e}")))?;
    let mut info = RuntimeInfo {
        name: runtime_id.to_string(),
        version: MessageField::some(RuntimeVersion {
            version: env!("CARGO_PKG_VERSION").to_string(),
            revision: env!("SHIM_GIT_REVISION").to_string(),
            ..Default::default()
        }),
        ..Default::default()
    };
    if let Some(o) = options.filter(|a| !a.type_url.is_empty()) {
        info.options = MessageField::some(o.clone());
    }
    // A runc without `features` (or another runtime) leaves them out, as with the Go shim.
    match features(&opts.runc_binary()) {
        Ok(json) => {
            info.features = MessageField::some(Any {
                type_url: FEATURES_TYPE_URL.to_string(),
                value: json,
                ..Default::default()
            })
        }
        Err(e) => debug!("runtime features unavailable: {e}"),
    }
    Ok(info)
}

/// `runc features`, checked to be a JSON object.
fn features(runc: &std::path::Path) -> Result<Vec<u8>, String> {
    let out = std::process::Command::new(runc)
        .arg("features")
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| format!("run {} features: {e}", runc.display()))?;
    if !out.status.success() {
        return Err(format!(
            "{} features: {}",
            runc.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    match serde_json::from_slice::<serde_json::Value>(&out.stdout) {
        Ok(v) if v.is_object() => Ok(out.stdout),
        _ => Err(format!("{} features: not a JSON object", runc.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_names_the_runtime_and_its_version() {
        let info = runtime_info("io.containerd.custom.v2", None).unwrap();
        assert_eq!(info.name, "io.containerd.custom.v2");
        assert_eq!(info.version.version, env!("CARGO_PKG_VERSION"));
        // runc is installed by `make deps`: its features must be there, as runc's JSON.
        let f = info
            .features
            .as_ref()
            .expect("runc's features (is runc on PATH? `make deps` installs it)");
        assert_eq!(f.type_url, FEATURES_TYPE_URL);
        let v: serde_json::Value = serde_json::from_slice(&f.value).unwrap();
        assert!(v.get("ociVersionMin").is_some(), "{v}");
    }

    #[test]
    fn a_runc_that_cannot_say_leaves_features_out() {
        assert!(features(std::path::Path::new("/bin/false")).is_err());
        assert!(features(std::path::Path::new("/nonexistent/runc")).is_err());
    }
}
