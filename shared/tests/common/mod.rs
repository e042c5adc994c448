//! Helpers shared by the integration tests that read the reference data (also included by the
//! simulator's tests through `#[path]`).

use std::path::PathBuf;

/// `$MOELESS_SHARED_DIR/<sub>` (default `../shared` beside the repository); a missing directory
/// fails the test unless `MOELESS_SKIP_REFERENCE=1`, which skips it explicitly (`None`).
pub fn reference_dir(sub: &str) -> Option<PathBuf> {
    let dir = std::env::var_os("MOELESS_SHARED_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared")))
        .join(sub);
    if dir.is_dir() {
        return Some(dir);
    }
    if std::env::var("MOELESS_SKIP_REFERENCE").as_deref() == Ok("1") {
        eprintln!("skipping: {} missing and MOELESS_SKIP_REFERENCE=1", dir.display());
        return None;
    }
    panic!(
        "reference data {} is missing: set MOELESS_SHARED_DIR or MOELESS_SKIP_REFERENCE=1",
        dir.display()
    );
}

/// `$MOELESS_SHARED_DIR/data/routing`.
#[allow(dead_code)] // not every test file that includes this module reads routing traces
pub fn routing_dir() -> Option<PathBuf> {
    reference_dir("data/routing")
}
