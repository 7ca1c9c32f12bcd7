//! Switches that only the integration tests may use. They exist in a build
//! with the `test-hooks` cargo feature (`make build`, which the tests run);
//! the release binary (`make release`, `make install`) has none of them, so
//! no container spec can turn off what the shim guarantees.

use std::path::Path;

/// A container annotation that switches the shim's freeze off, for the test
/// that shows what the bracket prevents.
#[cfg(feature = "test-hooks")]
pub const NO_FREEZE_ANNOTATION: &str = "dev.custom-shim.test/no-freeze";

/// Whether the bundle's spec asks for no freeze (test builds only).
#[cfg(feature = "test-hooks")]
pub fn no_freeze(bundle: &Path) -> bool {
    let Ok(bytes) = std::fs::read(bundle.join("config.json")) else {
        return false;
    };
    let Ok(spec) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
        return false;
    };
    spec["annotations"][NO_FREEZE_ANNOTATION].as_str() == Some("true")
}

/// The release build always freezes.
#[cfg(not(feature = "test-hooks"))]
pub fn no_freeze(_bundle: &Path) -> bool {
    false
}
