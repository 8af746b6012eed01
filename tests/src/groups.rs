//! The resource-group invariant checker shared by the group tests: it reads every node's group
//! journal (`<data_dir>/groups.jsonl`, which survives kills) and asserts that no two nodes ever
//! ran one group at overlapping times and that every node saw its epochs only grow. It only
//! reads journals and the test's record of host deaths; it never asks a running watchd, so it
//! also judges nodes that were killed or cut off.

use std::path::Path;

use serde_json::Value;

use crate::cluster::NAMES;
use crate::{json_lines, unix_ms};

/// The journal's file name in a node's data directory (`watchd::group::executor::JOURNAL_FILE`).
pub const JOURNAL_FILE: &str = "groups.jsonl";
/// Where watchd moves the journal aside when it grows too big (its older records).
pub const JOURNAL_ROTATED: &str = "groups.jsonl.1";

/// One node's run of a group: from its `onlining` record to its `offline` record (`fenced`, in a
/// forced stop: only resources fenced by epoch were left), or to the node's death when that
/// came first (a dead host runs nothing).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    /// The node's index (into [`NAMES`]).
    pub node: usize,
    /// The ownership epoch it ran at.
    pub epoch: u64,
    /// Unix ms of its start.
    pub start_ms: u64,
    /// Unix ms of its end (now, for a run still going on).
    pub end_ms: u64,
}

/// Every record of the journal of the node whose data directory is `data_dir`, oldest first
/// (the rotated part first); empty when it has none yet.
pub fn journal(data_dir: &Path) -> Vec<Value> {
    [JOURNAL_ROTATED, JOURNAL_FILE]
        .iter()
        .flat_map(|name| {
            json_lines(&std::fs::read_to_string(data_dir.join(name)).unwrap_or_default())
        })
        .collect()
}

/// Every journal, one record per line, for a failure message.
pub fn journals_text(journals: &[Vec<Value>]) -> String {
    journals
        .iter()
        .flatten()
        .map(Value::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

/// Asserts the invariants of group `group` over `journals` (indexed like [`NAMES`]): runs on
/// different nodes never overlap in time, and each node saw ownership epochs, and ran epochs,
/// only grow. `deaths` lists (node index, unix ms) of every host death the test caused: a run
/// never closed in the journal ends at the node's next death. Returns the runs it saw.
pub fn check_invariants(journals: &[Vec<Value>], deaths: &[(usize, u64)], group: &str) -> Vec<Run> {
    let name = |i: usize| NAMES.get(i).copied().unwrap_or("?");
    let mut runs: Vec<Run> = Vec::new();
    for (i, journal) in journals.iter().enumerate() {
        let mut last_owner_epoch = 0;
        let mut last_run_epoch = 0;
        let mut open: Option<(u64, u64)> = None;
        for r in journal.iter().filter(|r| r["group"] == group) {
            let epoch = r["epoch"].as_u64().unwrap_or(0);
            let t = r["time_ms"].as_u64().unwrap_or(0);
            match r["kind"].as_str() {
                Some("ownership") => {
                    assert!(
                        epoch >= last_owner_epoch,
                        "{} saw epoch {epoch} after {last_owner_epoch}",
                        name(i)
                    );
                    last_owner_epoch = epoch;
                }
                Some("group") => {
                    assert!(
                        epoch >= last_run_epoch,
                        "{} ran epoch {epoch} after {last_run_epoch}",
                        name(i)
                    );
                    last_run_epoch = epoch;
                    match r["state"].as_str() {
                        Some("onlining") => {
                            if let Some((e, s)) = open.take() {
                                // A run that was never closed: the node died meanwhile.
                                runs.push(run(i, e, s, death_after(deaths, i, s)));
                            }
                            open = Some((epoch, t));
                        }
                        Some("offline" | "fenced") => {
                            // A run ends at its offline, or earlier at the node's death (a
                            // restarted watchd cleans up what the dead one left). A forced stop
                            // ends it at "fenced": only filesets and checkpoints, which their
                            // epoch fences, are left to stop, and a new owner may start.
                            if let Some((e, s)) = open.take() {
                                runs.push(run(i, e, s, t.min(death_after(deaths, i, s))));
                            }
                        }
                        _ => {}
                    }
                }
                _ => {}
            }
        }
        if let Some((e, s)) = open {
            runs.push(run(i, e, s, death_after(deaths, i, s)));
        }
    }
    for a in &runs {
        for b in runs.iter().filter(|b| a.node < b.node) {
            assert!(
                a.end_ms <= b.start_ms || b.end_ms <= a.start_ms,
                "{} (epoch {}, {}..{}) and {} (epoch {}, {}..{}) ran group {group} at once\n{}",
                name(a.node),
                a.epoch,
                a.start_ms,
                a.end_ms,
                name(b.node),
                b.epoch,
                b.start_ms,
                b.end_ms,
                journals_text(journals)
            );
        }
    }
    runs
}

fn run(node: usize, epoch: u64, start_ms: u64, end_ms: u64) -> Run {
    Run {
        node,
        epoch,
        start_ms,
        end_ms,
    }
}

/// When node `i` died at or after `t`, or now (it still runs).
fn death_after(deaths: &[(usize, u64)], i: usize, t: u64) -> u64 {
    deaths
        .iter()
        .filter(|(n, d)| *n == i && *d >= t)
        .map(|(_, d)| *d)
        .min()
        .unwrap_or_else(unix_ms)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn rec(kind: &str, state: &str, epoch: u64, t: u64) -> Value {
        json!({ "kind": kind, "group": "g", "state": state, "epoch": epoch, "time_ms": t })
    }

    #[test]
    fn runs_one_after_the_other_pass() {
        let a = vec![
            rec("group", "onlining", 1, 10),
            rec("group", "offline", 1, 20),
        ];
        let b = vec![
            rec("group", "onlining", 2, 20),
            rec("group", "offline", 2, 30),
        ];
        let runs = check_invariants(&[a, b], &[], "g");
        assert_eq!(runs.len(), 2);
    }

    #[test]
    fn a_forced_stop_ends_the_run_when_only_fenced_resources_are_left() {
        let a = vec![
            rec("group", "onlining", 1, 10),
            rec("group", "fenced", 1, 20),
            rec("group", "offline", 1, 25),
        ];
        let b = vec![
            rec("group", "waiting", 2, 12),
            rec("group", "onlining", 2, 21),
            rec("group", "offline", 2, 30),
        ];
        let runs = check_invariants(&[a.clone(), b.clone()], &[], "g");
        assert_eq!(runs[0].end_ms, 20);
        // Without the fenced record the runs overlap.
        let a: Vec<Value> = a.into_iter().filter(|r| r["state"] != "fenced").collect();
        let overlap = std::panic::catch_unwind(|| check_invariants(&[a, b], &[], "g"));
        assert!(overlap.is_err());
    }

    #[test]
    fn a_death_ends_an_open_run() {
        let a = vec![rec("group", "onlining", 1, 10)];
        let b = vec![
            rec("group", "onlining", 2, 20),
            rec("group", "offline", 2, 30),
        ];
        let runs = check_invariants(&[a, b], &[(0, 15)], "g");
        assert_eq!(runs[0].end_ms, 15);
    }

    #[test]
    #[should_panic(expected = "ran group g at once")]
    fn overlapping_runs_fail() {
        let a = vec![
            rec("group", "onlining", 1, 10),
            rec("group", "offline", 1, 25),
        ];
        let b = vec![
            rec("group", "onlining", 2, 20),
            rec("group", "offline", 2, 30),
        ];
        check_invariants(&[a, b], &[], "g");
    }

    #[test]
    #[should_panic(expected = "saw epoch 1 after 2")]
    fn a_shrinking_epoch_fails() {
        let a = vec![
            rec("ownership", "online", 2, 10),
            rec("ownership", "online", 1, 20),
        ];
        check_invariants(&[a], &[], "g");
    }
}
