//! The in-sync report: on a node that runs a group's filesets as their primary, which backups
//! follow each pump's stream (their link is `streaming`), written into the cluster database's
//! properties under [`in_sync_key`] (this node, the fileset). The failover policy reads it: a
//! lost owner's successor is picked among those nodes first, and failback waits for them. It
//! only reads the replication status and proposes updates when a value changes; it never
//! changes a role.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use cluster::db::Update;
use cluster::failover::in_sync_key;

use crate::node::NodeHandle;
use crate::repl::{FilesetReport, ReplMsg, Role};
use crate::supervisor::Shared;

/// How often the replication status is read for the report.
pub const REPORT_INTERVAL: Duration = Duration::from_millis(200);
/// How long one status query of the replication supervisor may take, ms.
const STATUS_TIMEOUT_MS: u64 = 5000;

/// The value this node reports for `report`: `EPOCH:NODE,NODE` (the backups whose link is
/// streaming, in name order) when it is the fileset's primary; else nothing.
pub fn value_of(report: &FilesetReport) -> Option<String> {
    if report.role != Role::Primary || report.epoch == 0 {
        return None;
    }
    let pump = report.pump.as_ref()?;
    let streaming: BTreeSet<&str> = pump
        .backups
        .iter()
        .filter(|b| b.connected && b.state == "streaming")
        .map(|b| b.name.as_str())
        .collect();
    let names: Vec<&str> = streaming.into_iter().collect();
    Some(format!("{}:{}", report.epoch, names.join(",")))
}

/// Reports, until aborted, every change of the in-sync backups of the filesets that group
/// resources name and this node is the primary of.
pub async fn run(node: Arc<NodeHandle>, shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(REPORT_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(repl) = shared.repl.get().cloned() else {
            continue;
        };
        let db = node.db().content;
        let named: BTreeSet<&str> = db
            .resources
            .values()
            .filter(|r| matches!(r.kind.as_str(), "fileset" | "checkpoint"))
            .filter_map(|r| r.properties.get("fileset").map(String::as_str))
            .collect();
        if named.is_empty() {
            continue;
        }
        let reports = match ractor::call_t!(repl, ReplMsg::Status, STATUS_TIMEOUT_MS) {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(error = %e, "in-sync report: no replication status");
                continue;
            }
        };
        // Every change of this round in one update: a node that just became the primary of
        // many filesets reports them in one global update round, not one round each.
        let changed: Vec<Update> = reports
            .iter()
            .filter(|r| named.contains(r.name.as_str()))
            .filter_map(|r| {
                let value = value_of(r)?;
                let key = in_sync_key(&shared.node, &r.name);
                (db.properties.get(&key) != Some(&value))
                    .then_some(Update::SetProperty { key, value })
            })
            .collect();
        for run in Update::runs_for_batches(changed) {
            let n = run.len();
            let Some(update) = Update::batch(run) else {
                continue;
            };
            match node.update(update).await {
                Ok(_) => tracing::debug!(filesets = n, "in-sync backups reported"),
                Err(e) => {
                    tracing::debug!(filesets = n, error = %e, "in-sync report not committed; trying again");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use repl::primary::{BackupLinkStatus, PrimaryStatus};

    use super::*;

    fn link(name: &str, state: &str) -> BackupLinkStatus {
        BackupLinkStatus {
            name: name.into(),
            connected: state != "down",
            state: state.into(),
            ..BackupLinkStatus::default()
        }
    }

    fn report(role: Role, epoch: u64, links: Vec<BackupLinkStatus>) -> FilesetReport {
        FilesetReport {
            name: "data".into(),
            role,
            mode: "replay".into(),
            sync: true,
            path: "/d".into(),
            primary_node: "a".into(),
            epoch,
            pump: Some(PrimaryStatus {
                backups: links,
                epoch,
                ..PrimaryStatus::default()
            }),
            bcplog: None,
            error: None,
        }
    }

    #[test]
    fn only_streaming_backups_of_a_primary_are_in_sync_in_name_order() {
        let r = report(
            Role::Primary,
            7,
            vec![
                link("c", "streaming"),
                link("b", "resyncing"),
                link("d", "down"),
                link("a", "streaming"),
            ],
        );
        assert_eq!(value_of(&r).as_deref(), Some("7:a,c"));
        let none = report(Role::Primary, 7, vec![link("b", "greeting")]);
        assert_eq!(value_of(&none).as_deref(), Some("7:"));
        assert_eq!(value_of(&report(Role::Backup, 0, vec![])), None);
    }
}
