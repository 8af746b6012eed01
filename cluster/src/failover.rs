//! The failover policy: from the acting view, the paused nodes, the cluster database and the
//! time, which groups to place, fail over, give up, drain or fail back. Pure and deterministic:
//! it reads no clock, sends nothing and changes nothing; every [`Decision`] becomes one global
//! [`Update`] whose compare-and-set on the group's epoch makes a racing duplicate fail harmlessly.
//!
//! ```text
//!  view + paused + DbContent + now ──► decide ──► [Decision] ──► to_update ──► gum ──► DbContent
//!        ▲                                                                              │
//!        └──────────────────────── (the next round sees the result) ◄──────────────────┘
//! ```

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::db::{DbContent, Desired, Group, GroupState, Ownership, Update, UpdateError};
use crate::membership::NodeId;

/// What the policy looks at.
#[derive(Debug, Clone, Copy)]
pub struct PolicyInput<'a> {
    /// The members of the acting view.
    pub members: &'a BTreeSet<NodeId>,
    /// Members that may own no groups.
    pub paused: &'a BTreeSet<NodeId>,
    /// The cluster database.
    pub db: &'a DbContent,
    /// The proposer's clock (unix ms): failovers are recorded and counted, and failback windows
    /// checked, against it.
    pub now_unix_ms: u64,
}

/// One action of the policy; each maps to one [`Update`] ([`Decision::to_update`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "decision")]
pub enum Decision {
    /// Hand the group to `owner` ([`GroupState::Onlining`]), or to nobody (offline).
    Assign {
        /// The group.
        group: String,
        /// The new epoch (the current one plus one).
        epoch: u64,
        /// The new owner.
        owner: Option<NodeId>,
        /// When (the policy's `now_unix_ms`).
        at_ms: u64,
        /// Whether it counts as a failover (the owner was lost or failed the group).
        failover: bool,
        /// Why.
        reason: String,
    },
    /// Ask the owner to take the group offline gracefully, then hand it to `to`.
    Release {
        /// The group.
        group: String,
        /// The owner's epoch (the current one).
        epoch: u64,
        /// Where it goes next; none: it stays offline.
        to: Option<NodeId>,
        /// Why.
        reason: String,
    },
    /// Leave the group failed and offline: it failed over more often than its threshold allows
    /// within its period.
    GiveUp {
        /// The group.
        group: String,
        /// The new epoch (the current one plus one).
        epoch: u64,
        /// When (the policy's `now_unix_ms`).
        at_ms: u64,
        /// Why.
        reason: String,
    },
}

impl Decision {
    /// The group it is about.
    pub fn group(&self) -> &str {
        match self {
            Decision::Assign { group, .. }
            | Decision::Release { group, .. }
            | Decision::GiveUp { group, .. } => group,
        }
    }

    /// The global update that carries it out.
    pub fn to_update(&self) -> Update {
        match self.clone() {
            Decision::Assign {
                group,
                epoch,
                owner,
                at_ms,
                failover,
                reason,
            } => Update::AssignGroup {
                group,
                epoch,
                owner,
                at_ms,
                reason,
                failover,
            },
            Decision::Release {
                group,
                epoch,
                to,
                reason,
            } => Update::ReleaseGroup {
                group,
                epoch,
                to,
                reason,
            },
            Decision::GiveUp {
                group,
                epoch,
                at_ms,
                reason,
            } => Update::AssignGroup {
                group,
                epoch,
                owner: None,
                at_ms,
                reason,
                failover: true,
            },
        }
    }
}

/// The decisions for every group, in group name order, at most one per group.
///
/// - Desired online, no live owner (none, lost from the view, or the owner failed the group
///   locally): assign it to the best possible owner (preferred order, then with `any_owner`
///   the other members the database knows in name order; never a paused node, a non-member or
///   the node that just failed it; a graceful move's target first; in a failover, the nodes the
///   owner reported in sync before the others). Replacing a lost or failed owner is a
///   failover: one more than the threshold within the period gives up instead. An owner that
///   failed the group and is its only possible owner gets it again (a failover in place, which
///   counts the same: its local restart budget starts afresh, and a group that keeps failing
///   is given up). With no possible owner it waits. A group the cluster gave up on stays
///   failed until an operator sets its desired state again.
/// - Desired online on a live owner: a paused owner is drained (released to the next owner, or
///   offline when there is none); a more preferred member that is back takes it over by the
///   group's failback policy (released to it), once the owner reports its replicas in sync
///   when the group has filesets ([`IN_SYNC_PROPERTY_PREFIX`]).
/// - Desired offline: an online group is released to nobody; a failed one, or one whose owner
///   was lost, is assigned to nobody.
/// - A group onlining or offlining on a live owner waits for the owner's report.
///
/// Deciding again on the database that results from applying these decisions yields nothing.
pub fn decide(input: &PolicyInput<'_>) -> Vec<Decision> {
    input
        .db
        .groups
        .values()
        .filter_map(|g| decide_group(input, g))
        .collect()
}

/// Why a running group needs a new owner.
enum Loss<'a> {
    /// Its owner left the view.
    Lost(&'a str),
    /// Its owner reported it failed.
    Failed(&'a str),
}

impl Loss<'_> {
    fn node(&self) -> &str {
        match self {
            Loss::Lost(n) | Loss::Failed(n) => n,
        }
    }

    fn why(&self) -> String {
        match self {
            Loss::Lost(n) => format!("owner {n} lost"),
            Loss::Failed(n) => format!("{n} failed the group"),
        }
    }
}

fn decide_group(input: &PolicyInput<'_>, g: &Group) -> Option<Decision> {
    let own = input.db.ownership_of(&g.name);
    // An exhausted epoch cannot change owner any more (validation refuses it as well).
    let next = own.epoch.checked_add(1)?;
    let now = input.now_unix_ms;
    let assign = |owner: Option<NodeId>, failover: bool, reason: String| Decision::Assign {
        group: g.name.clone(),
        epoch: next,
        owner,
        at_ms: now,
        failover,
        reason,
    };
    let release = |to: Option<NodeId>, reason: String| Decision::Release {
        group: g.name.clone(),
        epoch: own.epoch,
        to,
        reason,
    };
    let owner = own.owner.as_deref();
    let live = owner.filter(|o| input.members.contains(*o));
    match g.desired {
        Desired::Offline => match (owner, live, own.state) {
            (None, _, _) | (Some(_), _, GroupState::Offline) => None,
            (Some(o), None, _) => Some(assign(
                None,
                false,
                format!("desired offline; owner {o} lost"),
            )),
            (Some(_), Some(_), GroupState::Online) => Some(release(None, "desired offline".into())),
            (Some(_), Some(_), GroupState::Failed) => {
                Some(assign(None, false, "desired offline".into()))
            }
            (Some(_), Some(_), GroupState::Onlining | GroupState::Offlining) => None,
        },
        Desired::Online => match (owner, live, own.state) {
            // The cluster gave up on it: an operator decides when to try again.
            (None, _, GroupState::Failed) => None,
            (None, _, _) | (Some(_), _, GroupState::Offline) => {
                place(input, g, &own, None).map(|(n, why)| assign(Some(n), false, why))
            }
            (Some(o), None, _) => fail_over(input, g, &own, &Loss::Lost(o), next),
            (Some(o), Some(_), GroupState::Failed) => {
                fail_over(input, g, &own, &Loss::Failed(o), next)
            }
            (Some(_), Some(_), GroupState::Onlining | GroupState::Offlining) => None,
            (Some(o), Some(_), GroupState::Online) => {
                if input.paused.contains(o) {
                    let to = candidates(input, g, Some(o)).into_iter().next();
                    let why = match &to {
                        Some(n) => format!("{o} paused: draining to {n}"),
                        None => format!("{o} paused: no other possible owner; offline"),
                    };
                    return Some(release(to, why));
                }
                failback(input, g, o, own.epoch).map(|n| {
                    let why = format!("failback to {n} ({})", g.failback);
                    release(Some(n), why)
                })
            }
        },
    }
}

/// Where a group that runs nowhere goes: a graceful move's target if it still qualifies, else
/// the best possible owner; with the reason.
fn place(
    input: &PolicyInput<'_>,
    g: &Group,
    own: &Ownership,
    exclude: Option<&str>,
) -> Option<(NodeId, String)> {
    place_among(input, g, own, exclude, None)
}

/// [`place`], with the nodes of `first` (when known) ahead of the others.
fn place_among(
    input: &PolicyInput<'_>,
    g: &Group,
    own: &Ownership,
    exclude: Option<&str>,
    first: Option<&BTreeSet<NodeId>>,
) -> Option<(NodeId, String)> {
    let mut c = candidates(input, g, exclude);
    if let Some(first) = first {
        // A stable sort: the preference order holds within each part.
        c.sort_by_key(|n| !first.contains(n));
    }
    if let Some(m) = own.moving_to.as_ref().filter(|m| c.contains(m)) {
        return Some((m.clone(), format!("moved to {m}")));
    }
    c.into_iter().next().map(|n| {
        let why = format!("placed on {n}");
        (n, why)
    })
}

/// The cluster property in which the owner of a group reports, per fileset, the backups whose
/// replicas follow its stream: key `PREFIX/OWNER/FILESET` ([`in_sync_key`]), value
/// `EPOCH:NODE,NODE` (the group's ownership epoch, the nodes in name order). watchd writes it;
/// the policy prefers those nodes when the owner is lost, and fails back only to them.
pub const IN_SYNC_PROPERTY_PREFIX: &str = "ftkit.repl.in_sync";

/// The key of `owner`'s in-sync report for `fileset` (node and fileset names hold no `/`).
pub fn in_sync_key(owner: &str, fileset: &str) -> String {
    format!("{IN_SYNC_PROPERTY_PREFIX}/{owner}/{fileset}")
}

/// The names of the filesets of `g`'s `fileset` and `checkpoint` resources.
fn data_filesets<'a>(db: &'a DbContent, g: &Group) -> Vec<&'a str> {
    db.resources
        .values()
        .filter(|r| r.group == g.name && matches!(r.kind.as_str(), "fileset" | "checkpoint"))
        .filter_map(|r| r.properties.get("fileset").map(String::as_str))
        .collect()
}

/// The nodes whose replicas of every fileset of `g` followed the stream of `owner` at `epoch`,
/// as `owner` last reported; `None` when `g` has no fileset or a report is missing or of
/// another epoch (nothing is known).
fn in_sync(
    input: &PolicyInput<'_>,
    g: &Group,
    owner: &str,
    epoch: u64,
) -> Option<BTreeSet<NodeId>> {
    let filesets = data_filesets(input.db, g);
    if filesets.is_empty() {
        return None;
    }
    let mut out: Option<BTreeSet<NodeId>> = None;
    for f in filesets {
        let value = input.db.properties.get(&in_sync_key(owner, f))?;
        let (e, nodes) = value.split_once(':')?;
        if e.parse::<u64>().ok()? != epoch {
            return None;
        }
        let nodes: BTreeSet<NodeId> = nodes
            .split(',')
            .filter(|n| !n.is_empty())
            .map(str::to_owned)
            .collect();
        out = Some(match out {
            None => nodes,
            Some(o) => o.intersection(&nodes).cloned().collect(),
        });
    }
    out
}

/// A failover away from a lost or failed owner, or giving up when it would exceed the
/// threshold; nothing while no other node may own the group. The nodes the owner reported
/// in sync (every replica of the group following its stream) go first: a node still catching
/// up would lack writes the owner acknowledged.
fn fail_over(
    input: &PolicyInput<'_>,
    g: &Group,
    own: &Ownership,
    loss: &Loss<'_>,
    next: u64,
) -> Option<Decision> {
    let now = input.now_unix_ms;
    let count = own.failovers_within(g.failover_period_ms, now);
    if count >= usize::try_from(g.failover_threshold).unwrap_or(usize::MAX) {
        return Some(Decision::GiveUp {
            group: g.name.clone(),
            epoch: next,
            at_ms: now,
            reason: format!(
                "{}: more than {} failovers within {} ms; giving up",
                loss.why(),
                g.failover_threshold,
                g.failover_period_ms
            ),
        });
    }
    let fresh = in_sync(input, g, loss.node(), own.epoch);
    let (owner, reason) = match place_among(input, g, own, Some(loss.node()), fresh.as_ref()) {
        Some((to, _)) => {
            let behind = match &fresh {
                Some(f) if !f.contains(&to) => " (no node was reported in sync)",
                _ => "",
            };
            let reason = format!("{}: failover to {to}{behind}", loss.why());
            (to, reason)
        }
        None => match loss {
            // Nowhere else to go: the owner that failed it tries again rather than leave it
            // failed until an operator or another node comes.
            Loss::Failed(o) if candidates(input, g, None).iter().any(|c| c == o) => {
                let reason = format!("{}; no other possible owner: {o} tries again", loss.why());
                ((*o).to_owned(), reason)
            }
            _ => return None,
        },
    };
    Some(Decision::Assign {
        group: g.name.clone(),
        epoch: next,
        reason,
        owner: Some(owner),
        at_ms: now,
        failover: true,
    })
}

/// The nodes that may own `g` now, best first: its preferred owners, then (with `any_owner`)
/// the other members the database knows, in name order; members only, none paused, never
/// `exclude`.
fn candidates(input: &PolicyInput<'_>, g: &Group, exclude: Option<&str>) -> Vec<NodeId> {
    let ok = |n: &NodeId| {
        input.members.contains(n) && !input.paused.contains(n) && exclude != Some(n.as_str())
    };
    let mut out: Vec<NodeId> = g
        .preferred_owners
        .iter()
        .filter(|n| ok(n))
        .cloned()
        .collect();
    if g.any_owner {
        out.extend(
            input
                .members
                .iter()
                .filter(|n| ok(n) && g.preference(n).is_none() && input.db.nodes.contains_key(*n))
                .cloned(),
        );
    }
    out
}

/// The more preferred member the group on `owner` should return to, when its policy allows
/// it now.
fn failback(input: &PolicyInput<'_>, g: &Group, owner: &str, epoch: u64) -> Option<NodeId> {
    if !g.failback.allows(input.now_unix_ms) {
        return None;
    }
    let rank = g.preference(owner).unwrap_or(g.preferred_owners.len());
    let to = g.preferred_owners[..rank]
        .iter()
        .find(|n| input.members.contains(*n) && !input.paused.contains(*n))
        .cloned()?;
    // A group with replicated files waits until the owner reports the node in sync: handed
    // over earlier, the node would lack what its resync had not brought yet.
    if !data_filesets(input.db, g).is_empty()
        && !in_sync(input, g, owner, epoch).is_some_and(|s| s.contains(&to))
    {
        return None;
    }
    Some(to)
}

/// The resources of `group` in the order they come online (each after everything it depends
/// on; ties in name order). Offline order is the reverse.
pub fn topo_order(db: &DbContent, group: &str) -> Result<Vec<String>, UpdateError> {
    if !db.groups.contains_key(group) {
        return Err(UpdateError::NotFound {
            what: "group".into(),
            name: group.into(),
        });
    }
    let members: BTreeMap<&str, &crate::db::Resource> = db
        .resources
        .values()
        .filter(|r| r.group == group)
        .map(|r| (r.name.as_str(), r))
        .collect();
    // Dependencies still to come online, and who waits for each.
    let mut waiting: BTreeMap<&str, usize> = BTreeMap::new();
    let mut dependents: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (name, r) in &members {
        for d in &r.depends_on {
            if !members.contains_key(d.as_str()) {
                return Err(UpdateError::BadDependency {
                    resource: (*name).into(),
                    why: format!("depends on {d:?}, not a resource of group {group:?}"),
                });
            }
            dependents.entry(d.as_str()).or_default().push(name);
        }
        waiting.insert(name, r.depends_on.len());
    }
    let mut ready: BTreeSet<&str> = waiting
        .iter()
        .filter(|(_, n)| **n == 0)
        .map(|(name, _)| *name)
        .collect();
    let mut order = Vec::with_capacity(members.len());
    while let Some(name) = ready.pop_first() {
        order.push(name.to_owned());
        for d in dependents.get(name).into_iter().flatten() {
            if let Some(n) = waiting.get_mut(d) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    ready.insert(d);
                }
            }
        }
    }
    if order.len() < members.len() {
        let stuck = waiting
            .iter()
            .find(|(_, n)| **n > 0)
            .map_or(group, |(name, _)| *name);
        return Err(UpdateError::BadDependency {
            resource: stuck.into(),
            why: "the dependencies form a cycle".into(),
        });
    }
    Ok(order)
}

#[cfg(test)]
mod tests;
