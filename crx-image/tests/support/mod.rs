//! Test support: the real `docker-registry` and skopeo helpers of `crx-test-support`, OCI
//! layouts built here from `/bin/busybox`, and a throttling TCP proxy.
#![allow(dead_code, unused_imports)] // each test binary uses a different subset

pub mod layout;
pub mod proxy;

pub use crx_test_support::{files_under, manifest_raw, Registry};

/// Fail (never skip) when a tool the tests need is missing.
pub fn require_tools() {
    for (tool, package) in [
        ("docker-registry", "docker-registry"),
        ("skopeo", "skopeo"),
        ("umoci", "umoci"),
    ] {
        crx_test_support::require_tool(tool, package);
    }
    assert!(
        std::path::Path::new("/bin/busybox").is_file(),
        "/bin/busybox missing: apt-get install busybox-static"
    );
}
