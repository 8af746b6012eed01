//! Operators' group requests: the group file of `ftctl group apply` (groups and their resources
//! in TOML) turned into global updates, `group status` / `resource status` reports, `group move`
//! and `group online|offline`.
//!
//! A group file is validated as a whole against a copy of the database before the first update
//! goes out, so a bad file changes nothing; applying the same file again changes nothing either.
//! Nothing here decides ownership: moves and desired states go to the failover policy as updates.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use cluster::db::{
    DbContent, Desired, Failback, Group, GroupState, MAX_UPDATE_BYTES, MINUTES_PER_DAY, Resource,
    ResourceKind, Update,
};
use serde::{Deserialize, Serialize};

use super::executor::{GroupsHandle, LocalRun};
use super::service::ServiceCatalog;
use crate::api::Response;
use crate::node::NodeRequestError;

/// A group file: `[[group]]` tables, each with its `[[group.resource]]` tables.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupFile {
    /// The groups.
    #[serde(default, rename = "group")]
    pub groups: Vec<GroupSpec>,
}

/// One `[[group]]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupSpec {
    /// Its name.
    pub name: String,
    /// Preferred owners, best first.
    #[serde(default)]
    pub preferred_owners: Vec<String>,
    /// After them, any other node of the cluster may own it.
    #[serde(default)]
    pub any_owner: bool,
    /// `"never"`, `"immediate"` or `{ window = "22:00-06:00" }` (UTC).
    #[serde(default)]
    pub failback: Option<FailbackSpec>,
    /// More failovers than this within the period leave it failed.
    #[serde(default)]
    pub failover_threshold: Option<u32>,
    /// The period the threshold counts over (e.g. `"1h"`).
    #[serde(default, with = "humantime_serde")]
    pub failover_period: Option<Duration>,
    /// Free-form settings.
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
    /// Its resources.
    #[serde(default, rename = "resource")]
    pub resources: Vec<ResourceSpec>,
}

/// A group's failback policy as written in the file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum FailbackSpec {
    /// `"never"` or `"immediate"`.
    Named(String),
    /// `{ window = "HH:MM-HH:MM" }` in UTC; it may wrap past midnight.
    Window {
        /// The window.
        window: String,
    },
}

/// One `[[group.resource]]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResourceSpec {
    /// Its name (unique across groups).
    pub name: String,
    /// service, fileset, checkpoint, ip or exec.
    pub kind: String,
    /// Resources of the same group that must be online before it.
    #[serde(default)]
    pub depends_on: Vec<String>,
    /// Its settings (the kind's required ones and any the agent understands).
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
    /// Its timeouts and check intervals.
    #[serde(default)]
    pub timeouts: TimeoutSpec,
}

/// `timeouts = { online = "30s", offline = "10s", looks_alive = "5s", is_alive = "1m" }`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimeoutSpec {
    /// How long bringing it online may take.
    #[serde(default, with = "humantime_serde")]
    pub online: Option<Duration>,
    /// How long taking it offline may take.
    #[serde(default, with = "humantime_serde")]
    pub offline: Option<Duration>,
    /// The interval of the cheap check.
    #[serde(default, with = "humantime_serde")]
    pub looks_alive: Option<Duration>,
    /// The interval of the thorough check.
    #[serde(default, with = "humantime_serde")]
    pub is_alive: Option<Duration>,
}

/// The group requests of the control protocol.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "group_op", rename_all = "snake_case", deny_unknown_fields)]
pub enum GroupRequest {
    /// Define or change groups and resources.
    Apply {
        /// The parsed group file.
        file: GroupFile,
    },
    /// Every group and resource.
    Status,
    /// Move a group gracefully (to the best other node when `to` is absent).
    Move {
        /// The group.
        group: String,
        /// Where to.
        to: Option<String>,
    },
    /// Set what operators want of a group.
    Desired {
        /// The group.
        group: String,
        /// Online or offline.
        desired: Desired,
    },
}

/// One group in `ftctl group status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupReport {
    /// Its name.
    pub name: String,
    /// Its owner.
    pub owner: Option<String>,
    /// The ownership epoch.
    pub epoch: u64,
    /// offline, onlining, online, offlining, failed.
    pub state: GroupState,
    /// What operators want.
    pub desired: Desired,
    /// Where a graceful move goes.
    pub moving_to: Option<String>,
    /// Why the last transition happened.
    pub reason: String,
    /// Failovers within the current period.
    pub failovers_in_period: usize,
    /// The threshold.
    pub failover_threshold: u32,
    /// Preferred owners, best first.
    pub preferred_owners: Vec<String>,
    /// Any other node may own it.
    pub any_owner: bool,
    /// The failback policy.
    pub failback: String,
    /// Its resources, in the order they come online.
    pub resources: Vec<ResourceReport>,
}

/// One resource in `ftctl group status` / `ftctl resource status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceReport {
    /// Its name.
    pub name: String,
    /// Its group.
    pub group: String,
    /// Its kind.
    pub kind: String,
    /// What it needs online first.
    pub depends_on: Vec<String>,
    /// The state on the group's owner, when this node is the owner (others do not know).
    pub state: Option<String>,
    /// Why it failed, when it did.
    pub detail: String,
}

/// Turns `file` into the updates that make the database hold it, validated in order against a
/// copy of `db`; `catalog` checks `service` resources against this node's services. Every
/// problem found is listed; on any, no update is returned.
pub fn plan_apply(
    db: &DbContent,
    file: &GroupFile,
    catalog: &ServiceCatalog,
) -> Result<Vec<Update>, Vec<String>> {
    let mut problems = Vec::new();
    let mut seen_groups = BTreeSet::new();
    let mut seen_resources = BTreeSet::new();
    for g in &file.groups {
        if !seen_groups.insert(g.name.as_str()) {
            problems.push(format!("group {:?} is defined twice", g.name));
        }
        for r in &g.resources {
            if !seen_resources.insert(r.name.as_str()) {
                problems.push(format!("resource {:?} is defined twice", r.name));
            }
            resource_problems(g, r, catalog, &mut problems);
        }
        if let Err(e) = group_of(g, db) {
            problems.push(format!("group {:?}: {e}", g.name));
        }
        if let Err(cycle) = file_order(g) {
            problems.push(format!(
                "group {:?}: the dependencies of {} form a cycle",
                g.name,
                cycle.join(", ")
            ));
        }
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    let mut updates = Vec::new();
    let mut new_groups = Vec::new();
    for g in &file.groups {
        let group = group_of(g, db).map_err(|e| vec![e])?;
        match db.groups.get(&g.name) {
            None => {
                // Added offline and wanted online only once all its resources are there: the
                // policy places a group as soon as it exists, and it must not come up without
                // its resources.
                new_groups.push(Update::SetGroupDesired {
                    group: group.name.clone(),
                    desired: group.desired,
                });
                updates.push(Update::AddGroup(Group {
                    desired: Desired::Offline,
                    ..group
                }));
            }
            Some(old) if *old != group => updates.push(Update::SetGroup(group)),
            Some(_) => {}
        }
    }
    for g in &file.groups {
        let order = file_order(g).map_err(|c| vec![format!("cycle: {}", c.join(", "))])?;
        for name in order {
            let Some(spec) = g.resources.iter().find(|r| r.name == name) else {
                continue;
            };
            let r = resource_of(g, spec);
            match db.resources.get(&r.name) {
                None => updates.push(Update::AddResource(r)),
                Some(old) if *old != r => updates.push(Update::SetResource(r)),
                Some(_) => {}
            }
        }
    }
    updates.extend(new_groups);
    let mut sim = db.clone();
    for u in &updates {
        if let Err(e) = sim.apply(u) {
            return Err(vec![e.to_string()]);
        }
    }
    Ok(updates)
}

fn resource_problems(
    g: &GroupSpec,
    r: &ResourceSpec,
    catalog: &ServiceCatalog,
    problems: &mut Vec<String>,
) {
    let at = format!("group {:?}, resource {:?}", g.name, r.name);
    let Some(kind) = ResourceKind::from_name(&r.kind) else {
        let known: Vec<&str> = ResourceKind::ALL.iter().map(|k| k.name()).collect();
        problems.push(format!(
            "{at}: unknown kind {:?} (known: {})",
            r.kind,
            known.join(", ")
        ));
        return;
    };
    for key in kind.required_properties() {
        if !r.properties.contains_key(*key) {
            problems.push(format!(
                "{at}: a {} resource needs property {key:?}",
                kind.name()
            ));
        }
    }
    if kind == ResourceKind::Service
        && let Some(s) = r.properties.get("service")
    {
        match catalog.autostart.get(s) {
            None => problems.push(format!(
                "{at}: no service {s:?} in this node's configuration"
            )),
            Some(true) => problems.push(format!(
                "{at}: service {s:?} has autostart = true; a group's service needs autostart = false"
            )),
            Some(false) => {}
        }
    }
    for d in &r.depends_on {
        if !g.resources.iter().any(|x| x.name == *d) {
            problems.push(format!(
                "{at}: depends on {d:?}, which is not a resource of this group"
            ));
        }
    }
}

/// The group's resources in an order where each comes after its dependencies; the names in a
/// cycle otherwise.
fn file_order(g: &GroupSpec) -> Result<Vec<String>, Vec<String>> {
    let mut left: BTreeMap<&str, BTreeSet<&str>> = g
        .resources
        .iter()
        .map(|r| {
            let deps = r
                .depends_on
                .iter()
                .map(String::as_str)
                .filter(|d| g.resources.iter().any(|x| x.name == *d))
                .collect();
            (r.name.as_str(), deps)
        })
        .collect();
    let mut order = Vec::new();
    loop {
        let ready: Vec<&str> = left
            .iter()
            .filter(|(_, d)| d.is_empty())
            .map(|(n, _)| *n)
            .collect();
        if ready.is_empty() {
            break;
        }
        for n in ready {
            left.remove(n);
            for deps in left.values_mut() {
                deps.remove(n);
            }
            order.push(n.to_owned());
        }
    }
    if left.is_empty() {
        Ok(order)
    } else {
        Err(left.keys().map(|n| (*n).to_owned()).collect())
    }
}

fn group_of(g: &GroupSpec, db: &DbContent) -> Result<Group, String> {
    let defaults = Group::default();
    let failback = match &g.failback {
        None => defaults.failback,
        Some(f) => parse_failback(f)?,
    };
    let period = match g.failover_period {
        None => defaults.failover_period_ms,
        Some(d) => u64::try_from(d.as_millis()).unwrap_or(u64::MAX),
    };
    Ok(Group {
        name: g.name.clone(),
        preferred_owners: g.preferred_owners.clone(),
        properties: g.properties.clone(),
        any_owner: g.any_owner,
        failover_threshold: g.failover_threshold.unwrap_or(defaults.failover_threshold),
        failover_period_ms: period,
        failback,
        // What operators set with `group online|offline` stays.
        desired: db
            .groups
            .get(&g.name)
            .map_or(defaults.desired, |old| old.desired),
    })
}

fn resource_of(g: &GroupSpec, r: &ResourceSpec) -> Resource {
    let defaults = Resource::default();
    let ms = |d: Option<Duration>, default: u64| {
        d.map_or(default, |d| {
            u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
        })
    };
    Resource {
        name: r.name.clone(),
        group: g.name.clone(),
        kind: r.kind.clone(),
        depends_on: r.depends_on.clone(),
        properties: r.properties.clone(),
        online_timeout_ms: ms(r.timeouts.online, defaults.online_timeout_ms),
        offline_timeout_ms: ms(r.timeouts.offline, defaults.offline_timeout_ms),
        looks_alive_ms: ms(r.timeouts.looks_alive, defaults.looks_alive_ms),
        is_alive_ms: ms(r.timeouts.is_alive, defaults.is_alive_ms),
    }
}

/// `never`, `immediate`, or a `HH:MM-HH:MM` window.
pub fn parse_failback(f: &FailbackSpec) -> Result<Failback, String> {
    match f {
        FailbackSpec::Named(n) if n == "never" => Ok(Failback::Never),
        FailbackSpec::Named(n) if n == "immediate" => Ok(Failback::Immediate),
        FailbackSpec::Named(n) => Err(format!(
            "failback {n:?}: expected \"never\", \"immediate\" or {{ window = \"HH:MM-HH:MM\" }}"
        )),
        FailbackSpec::Window { window } => {
            let bad = || format!("failback window {window:?}: expected HH:MM-HH:MM (UTC)");
            let (a, b) = window.split_once('-').ok_or_else(bad)?;
            let minute = |t: &str| -> Option<u16> {
                let (h, m) = t.trim().split_once(':')?;
                let (h, m) = (h.parse::<u16>().ok()?, m.parse::<u16>().ok()?);
                (h < 24 && m < 60).then_some(h * 60 + m)
            };
            let (start_min, end_min) = (minute(a).ok_or_else(bad)?, minute(b).ok_or_else(bad)?);
            if start_min == end_min || start_min >= MINUTES_PER_DAY {
                return Err(format!("failback window {window:?} is empty"));
            }
            Ok(Failback::Window { start_min, end_min })
        }
    }
}

/// The status of every group, with the resource states this node knows (those of the groups it
/// runs).
pub fn reports(
    db: &DbContent,
    runs: &BTreeMap<String, LocalRun>,
    now_unix_ms: u64,
) -> Vec<GroupReport> {
    db.groups
        .values()
        .map(|g| {
            let own = db.ownership_of(&g.name);
            let run = runs.get(&g.name).filter(|r| r.epoch == own.epoch);
            let order = cluster::failover::topo_order(db, &g.name).unwrap_or_else(|_| {
                db.resources
                    .values()
                    .filter(|r| r.group == g.name)
                    .map(|r| r.name.clone())
                    .collect()
            });
            let resources = order
                .iter()
                .filter_map(|n| db.resources.get(n))
                .map(|r| {
                    let local = run.and_then(|run| run.resources.get(&r.name));
                    ResourceReport {
                        name: r.name.clone(),
                        group: r.group.clone(),
                        kind: r.kind.clone(),
                        depends_on: r.depends_on.clone(),
                        state: local.map(|l| l.state.clone()),
                        detail: local.map(|l| l.detail.clone()).unwrap_or_default(),
                    }
                })
                .collect();
            GroupReport {
                name: g.name.clone(),
                owner: own.owner.clone(),
                epoch: own.epoch,
                state: own.state,
                desired: g.desired,
                moving_to: own.moving_to.clone(),
                reason: own.reason.clone(),
                failovers_in_period: own.failovers_within(g.failover_period_ms, now_unix_ms),
                failover_threshold: g.failover_threshold,
                preferred_owners: g.preferred_owners.clone(),
                any_owner: g.any_owner,
                failback: g.failback.to_string(),
                resources,
            }
        })
        .collect()
}

/// The best node other than the owner that may take `g` now: a member, not paused, in
/// preference order, then (with `any_owner`) the other members the database knows.
pub fn move_target(
    db: &DbContent,
    g: &Group,
    owner: Option<&str>,
    members: &BTreeSet<String>,
    paused: &BTreeSet<String>,
) -> Option<String> {
    let ok = |n: &String| members.contains(n) && !paused.contains(n) && Some(n.as_str()) != owner;
    g.preferred_owners
        .iter()
        .find(|n| ok(n))
        .cloned()
        .or_else(|| {
            g.any_owner
                .then(|| {
                    members
                        .iter()
                        .find(|n| ok(n) && db.nodes.contains_key(*n))
                        .cloned()
                })
                .flatten()
        })
}

/// Carries out a group request of `ftctl`.
pub async fn serve(groups: &GroupsHandle, request: GroupRequest) -> Response {
    let db = groups.node.db();
    let outcome: Result<String, String> = match request {
        GroupRequest::Status => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
            return Response::Groups {
                groups: reports(&db.content, &groups.board.runs(), now),
            };
        }
        GroupRequest::Apply { file } => match plan_apply(&db.content, &file, &groups.catalog) {
            Err(problems) => Err(format!(
                "the group file was not applied (nothing changed): {}",
                problems.join("; ")
            )),
            Ok(updates) if updates.is_empty() => {
                Ok("nothing to change: the database already holds this group file".into())
            }
            Ok(updates) => {
                let n = updates.len();
                // The whole file in one update when it fits (it applies whole or not at all,
                // in one global update round); else in as few batches as fit.
                let runs: Vec<(usize, Update)> = match Update::batch(updates) {
                    Some(u) if u.encoded_len().is_ok_and(|len| len <= MAX_UPDATE_BYTES) => {
                        vec![(n, u)]
                    }
                    Some(Update::Batch { updates }) => Update::runs_for_batches(updates)
                        .into_iter()
                        .filter_map(|run| {
                            let len = run.len();
                            Update::batch(run).map(|u| (len, u))
                        })
                        .collect(),
                    // One update too large on its own: the sequencer says so.
                    Some(u) => vec![(1, u)],
                    None => Vec::new(),
                };
                let mut done = 0;
                let mut failure = None;
                for (len, u) in runs {
                    match groups.node.update(u).await {
                        Ok(_) => done += len,
                        Err(e) => {
                            failure = Some(e);
                            break;
                        }
                    }
                }
                match failure {
                    None => Ok(format!("applied: {n} updates committed")),
                    Some(e) => Err(format!(
                        "{done} of {n} updates committed, then: {e} (apply the file again once the cluster acts)"
                    )),
                }
            }
        },
        GroupRequest::Move { group, to } => {
            let Some(g) = db.content.groups.get(&group) else {
                return Response::NotFound {
                    what: format!("group `{group}`"),
                };
            };
            let own = db.content.ownership_of(&group);
            let status = groups.node.status();
            let members: BTreeSet<String> = status.members.iter().cloned().collect();
            let paused: BTreeSet<String> = status
                .nodes
                .iter()
                .filter(|n| n.state == cluster::membership::NodeState::Paused)
                .map(|n| n.name.clone())
                .collect();
            let target = match to {
                Some(t) => Some(t),
                None => move_target(&db.content, g, own.owner.as_deref(), &members, &paused),
            };
            match target {
                None => Err(format!(
                    "no other node can take group {group} now (members: {})",
                    status.members.join(", ")
                )),
                Some(t) => {
                    let update = Update::ReleaseGroup {
                        group: group.clone(),
                        epoch: own.epoch,
                        to: Some(t.clone()),
                        reason: format!("operator: move to {t}"),
                    };
                    groups.node.update(update).await.map_or_else(
                        |e| Err(e.to_string()),
                        |_| {
                            Ok(format!(
                                "group {group} moves to {t}: offline on {} in order, then online there",
                                own.owner.as_deref().unwrap_or("its owner")
                            ))
                        },
                    )
                }
            }
        }
        GroupRequest::Desired { group, desired } => groups
            .node
            .update(Update::SetGroupDesired {
                group: group.clone(),
                desired,
            })
            .await
            .map(|_| format!("group {group}: desired {desired}"))
            .map_err(|e| match e {
                NodeRequestError::Update(e) => e.to_string(),
                other => other.to_string(),
            }),
    };
    match outcome {
        Ok(message) => Response::Ok { message },
        Err(message) => Response::Error { message },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> GroupFile {
        toml::from_str(text).expect("a group file")
    }

    fn catalog() -> ServiceCatalog {
        ServiceCatalog {
            autostart: [("web".to_owned(), false), ("auto".to_owned(), true)].into(),
        }
    }

    const FILE: &str = r#"
[[group]]
name = "g"
preferred_owners = ["a", "b"]
failback = { window = "22:00-06:00" }
failover_threshold = 2
failover_period = "10m"

[[group.resource]]
name = "svc"
kind = "service"
depends_on = ["addr", "data"]
properties = { service = "web" }
timeouts = { online = "5s", offline = "2s", looks_alive = "1s" }

[[group.resource]]
name = "addr"
kind = "ip"
depends_on = ["data"]
properties = { address = "10.0.0.5/24", interface = "eth0" }

[[group.resource]]
name = "data"
kind = "exec"
properties = { agent = "/bin/true" }
"#;

    #[test]
    fn a_group_file_becomes_updates_in_dependency_order_and_applies_once() {
        let mut db = DbContent::default();
        let updates = plan_apply(&db, &parse(FILE), &catalog()).expect("valid");
        let names: Vec<String> = updates
            .iter()
            .map(|u| match u {
                Update::AddGroup(g) => format!("group {}", g.name),
                Update::AddResource(r) => format!("resource {}", r.name),
                Update::SetGroupDesired { group, desired } => format!("{group} {desired}"),
                other => format!("{other:?}"),
            })
            .collect();
        // The group is wanted online only once all its resources exist.
        assert_eq!(
            names,
            [
                "group g",
                "resource data",
                "resource addr",
                "resource svc",
                "g online"
            ]
        );
        let Update::AddGroup(g) = &updates[0] else {
            panic!("a group first")
        };
        assert_eq!(
            g.failback,
            Failback::Window {
                start_min: 22 * 60,
                end_min: 6 * 60
            }
        );
        assert_eq!(g.failover_period_ms, 600_000);
        let Update::AddResource(svc) = &updates[3] else {
            panic!("svc last")
        };
        assert_eq!(
            (
                svc.online_timeout_ms,
                svc.offline_timeout_ms,
                svc.looks_alive_ms
            ),
            (5000, 2000, 1000)
        );
        for u in &updates {
            db.apply(u).expect("applies");
        }
        // Idempotent.
        assert_eq!(plan_apply(&db, &parse(FILE), &catalog()), Ok(vec![]));
        // The operator's desired state survives a re-apply.
        db.apply(&Update::SetGroupDesired {
            group: "g".into(),
            desired: Desired::Offline,
        })
        .expect("applies");
        assert_eq!(plan_apply(&db, &parse(FILE), &catalog()), Ok(vec![]));
        // A changed timeout is one SetResource.
        let changed = FILE.replace("offline = \"2s\"", "offline = \"3s\"");
        let updates = plan_apply(&db, &parse(&changed), &catalog()).expect("valid");
        assert!(
            matches!(updates.as_slice(), [Update::SetResource(r)] if r.offline_timeout_ms == 3000)
        );
    }

    #[test]
    fn bad_files_are_refused_whole_with_every_problem_named() {
        let db = DbContent::default();
        let cyclic = FILE.replace("kind = \"exec\"", "kind = \"exec\"\ndepends_on = [\"svc\"]");
        let err = plan_apply(&db, &parse(&cyclic), &catalog()).expect_err("cycle");
        assert_eq!(
            err,
            ["group \"g\": the dependencies of addr, data, svc form a cycle"]
        );
        let unknown = FILE.replace("kind = \"exec\"", "kind = \"teleporter\"");
        let err = plan_apply(&db, &parse(&unknown), &catalog()).expect_err("kind");
        assert_eq!(
            err,
            [
                "group \"g\", resource \"data\": unknown kind \"teleporter\" (known: service, fileset, checkpoint, ip, exec)"
            ]
        );
        let auto = FILE.replace("service = \"web\"", "service = \"auto\"");
        let err = plan_apply(&db, &parse(&auto), &catalog()).expect_err("autostart");
        assert!(err[0].contains("autostart = true"), "{err:?}");
        let missing = FILE.replace("service = \"web\"", "service = \"nope\"");
        let err = plan_apply(&db, &parse(&missing), &catalog()).expect_err("missing");
        assert!(err[0].contains("no service \"nope\""), "{err:?}");
        let bad_window = FILE.replace("22:00-06:00", "25:00-06:00");
        let err = plan_apply(&db, &parse(&bad_window), &catalog()).expect_err("window");
        assert!(err[0].contains("HH:MM-HH:MM"), "{err:?}");
        let bad_ip = FILE.replace("10.0.0.5/24", "10.0.0.5");
        let err = plan_apply(&db, &parse(&bad_ip), &catalog()).expect_err("cidr");
        assert!(err[0].contains("not ADDRESS/PREFIX"), "{err:?}");
    }

    #[test]
    fn a_move_goes_to_the_best_other_member() {
        let g = Group {
            name: "g".into(),
            preferred_owners: vec!["a".into(), "b".into(), "c".into()],
            ..Group::default()
        };
        let db = DbContent::default();
        let members: BTreeSet<String> = ["a", "b", "c"].map(String::from).into();
        let none = BTreeSet::new();
        assert_eq!(
            move_target(&db, &g, Some("a"), &members, &none).as_deref(),
            Some("b")
        );
        let paused: BTreeSet<String> = ["b".to_owned()].into();
        assert_eq!(
            move_target(&db, &g, Some("a"), &members, &paused).as_deref(),
            Some("c")
        );
        let alone: BTreeSet<String> = ["a".to_owned()].into();
        assert_eq!(move_target(&db, &g, Some("a"), &alone, &none), None);
    }
}
