//! For tests that need root (sandboxes, real cgroups): the unit tests' module
//! (`crate::test_support`) and the integration tests' (`#[path]`-included).

/// Whether this test can run: as root. Otherwise it says so and the test returns;
/// under `CI` (any value but empty, `0`, `false`, `no`) it fails instead.
pub(crate) fn root_or_skip(test: &str) -> bool {
    if nix::unistd::Uid::effective().is_root() {
        return true;
    }
    let ci = std::env::var("CI").is_ok_and(|v| {
        !matches!(
            v.trim().to_ascii_lowercase().as_str(),
            "" | "0" | "false" | "no"
        )
    });
    assert!(
        !ci,
        "{test}: needs root (CI is set: a skipped test is a failure)"
    );
    eprintln!("*** SKIPPED {test}: not running as root");
    false
}
