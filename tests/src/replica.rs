//! Comparing a replica with its primary: the tree hash of a directory (paths, kinds, modes,
//! contents, as `repl::manifest` sees them) and waiting until two trees are identical. Shared by
//! the replication tests; it only reads the trees.

use std::path::Path;
use std::time::{Duration, Instant};

/// How often the trees are compared while waiting.
const COMPARE_EVERY: Duration = Duration::from_millis(100);

/// The content hash of the tree under `root`; `None` when it cannot be scanned.
pub fn tree_hash(root: &Path) -> Option<u64> {
    repl::manifest::scan(root).ok().map(|m| m.content_hash())
}

/// Whether the trees under `a` and `b` become identical within `within`.
pub fn becomes_identical(a: &Path, b: &Path, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if let (Some(x), Some(y)) = (tree_hash(a), tree_hash(b))
            && x == y
        {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(COMPARE_EVERY);
    }
}
