//! Failpoints: named places in the commit and compaction paths where a test can make this process crash
//! (SIGKILL on itself) or fail with an injected I/O error, selected by `FT_CKPT_FAILPOINT`.
//! Owns the parsing and caching of that variable; it must never cost more than one atomic
//! load when the variable is unset, and must never panic on a malformed value.

use std::io;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU8, Ordering};

/// The environment variable that selects failpoints: `name=action[,name=action…]`.
pub const ENV_VAR: &str = "FT_CKPT_FAILPOINT";

/// After the temp file of a new image was created (in `Store::begin`).
pub const COMMIT_CREATED: &str = "commit.created";
/// After data and footer were written and flushed, before `fdatasync`.
pub const COMMIT_WRITTEN: &str = "commit.written";
/// After `fdatasync` of the temp file, before the rename.
pub const COMMIT_SYNCED: &str = "commit.synced";
/// After the rename to the final name, before the directory fsync.
pub const COMMIT_RENAMED: &str = "commit.renamed";
/// After the directory fsync, before retention.
pub const COMMIT_DIR_SYNCED: &str = "commit.dir_synced";

/// Every failpoint of the commit path, in the order a commit passes them.
pub const COMMIT_POINTS: [&str; 5] = [
    COMMIT_CREATED,
    COMMIT_WRITTEN,
    COMMIT_SYNCED,
    COMMIT_RENAMED,
    COMMIT_DIR_SYNCED,
];

/// After the temp file of a compacted image was created (in `Store::compact`).
pub const COMPACT_CREATED: &str = "compact.created";
/// After the compacted image was written whole, before `fdatasync`.
pub const COMPACT_WRITTEN: &str = "compact.written";
/// After `fdatasync` of the compacted image, before it replaces the increment.
pub const COMPACT_SYNCED: &str = "compact.synced";
/// After the rename over the increment, before the directory fsync.
pub const COMPACT_RENAMED: &str = "compact.renamed";
/// After the directory fsync, before retention.
pub const COMPACT_DIR_SYNCED: &str = "compact.dir_synced";

/// Every failpoint of the compaction path, in the order a compaction passes them.
pub const COMPACT_POINTS: [&str; 5] = [
    COMPACT_CREATED,
    COMPACT_WRITTEN,
    COMPACT_SYNCED,
    COMPACT_RENAMED,
    COMPACT_DIR_SYNCED,
];

/// What happens when a selected failpoint is hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Raise SIGKILL on this process: a crash at exactly that step.
    Kill,
    /// Return an injected I/O error from `hit`.
    Error,
}

/// One `name=action` entry of the spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub name: String,
    pub action: Action,
}

/// A spec entry that could not be understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("failpoint spec entry {entry:?}: {reason}")]
pub struct SpecError {
    pub entry: String,
    pub reason: &'static str,
}

const STATE_UNKNOWN: u8 = 0;
const STATE_NONE: u8 = 1;
const STATE_SOME: u8 = 2;

static STATE: AtomicU8 = AtomicU8::new(STATE_UNKNOWN);
static TABLE: OnceLock<Vec<Entry>> = OnceLock::new();

/// Parses `name=action[,name=action…]`; blank entries are ignored. Every malformed entry is
/// reported, the well-formed ones are returned.
pub fn parse_spec(spec: &str) -> (Vec<Entry>, Vec<SpecError>) {
    let mut entries = Vec::new();
    let mut errors = Vec::new();
    for raw in spec.split(',') {
        let item = raw.trim();
        if item.is_empty() {
            continue;
        }
        let Some((name, action)) = item.split_once('=') else {
            errors.push(SpecError {
                entry: item.to_owned(),
                reason: "expected name=action",
            });
            continue;
        };
        let name = name.trim();
        if name.is_empty() {
            errors.push(SpecError {
                entry: item.to_owned(),
                reason: "empty failpoint name",
            });
            continue;
        }
        let action = match action.trim() {
            "kill" => Action::Kill,
            "error" => Action::Error,
            _ => {
                errors.push(SpecError {
                    entry: item.to_owned(),
                    reason: "unknown action (expected kill or error)",
                });
                continue;
            }
        };
        entries.push(Entry {
            name: name.to_owned(),
            action,
        });
    }
    (entries, errors)
}

fn table() -> &'static [Entry] {
    TABLE.get_or_init(|| {
        let spec = std::env::var(ENV_VAR).unwrap_or_default();
        let (entries, errors) = parse_spec(&spec);
        // A typo in a test's failpoint spec must be visible, and this facility is only ever
        // switched on by hand or by a test, so stderr is the right place.
        for e in &errors {
            eprintln!("ckpt: ignoring {ENV_VAR}: {e}");
        }
        entries
    })
}

/// Checks the failpoint `name`: does nothing unless `FT_CKPT_FAILPOINT` selects it; with action
/// `kill` the process dies by SIGKILL here, with `error` an injected I/O error is returned.
pub fn hit(name: &'static str) -> Result<(), io::Error> {
    match STATE.load(Ordering::Relaxed) {
        STATE_NONE => return Ok(()),
        STATE_SOME => {}
        _ => {
            let state = if table().is_empty() {
                STATE_NONE
            } else {
                STATE_SOME
            };
            STATE.store(state, Ordering::Relaxed);
            if state == STATE_NONE {
                return Ok(());
            }
        }
    }
    match table().iter().find(|e| e.name == name).map(|e| e.action) {
        None => Ok(()),
        Some(Action::Error) => Err(io::Error::other(format!(
            "injected failure at failpoint {name}"
        ))),
        Some(Action::Kill) => {
            // Ignoring the result is right: if SIGKILL on ourselves could fail there is no
            // crash to simulate, and the abort below still ends the process at this step.
            let _ = rustix::process::kill_process(
                rustix::process::getpid(),
                rustix::process::Signal::KILL,
            );
            std::process::abort()
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    #[test]
    fn parses_list_and_reports_bad_entries() {
        let (entries, errors) =
            parse_spec(" commit.written=kill, ,commit.synced = error,bogus,x=explode,=kill");
        assert_eq!(
            entries,
            vec![
                Entry {
                    name: "commit.written".into(),
                    action: Action::Kill
                },
                Entry {
                    name: "commit.synced".into(),
                    action: Action::Error
                },
            ]
        );
        assert_eq!(errors.len(), 3);
        assert_eq!(errors[0].entry, "bogus");
        assert_eq!(errors[1].reason, "unknown action (expected kill or error)");
        assert_eq!(errors[2].reason, "empty failpoint name");
    }

    #[test]
    fn empty_spec_selects_nothing() {
        let (entries, errors) = parse_spec("");
        assert!(entries.is_empty());
        assert!(errors.is_empty());
    }

    #[test]
    fn unselected_point_passes() {
        // The test binary never sets the variable for itself, so no point is selected.
        for name in COMMIT_POINTS.iter().chain(&COMPACT_POINTS) {
            assert!(hit(name).is_ok());
        }
    }
}
