use std::collections::{BTreeMap, BTreeSet};

use super::*;
use crate::db::{Failback, Resource};
use crate::membership::tests::sim::Rng;

const MINUTE: u64 = 60_000;
const HOUR: u64 = 60 * MINUTE;
/// Midnight UTC of some day.
const DAY0: u64 = 19_700 * 24 * HOUR;
/// 10:00 UTC.
const NOW: u64 = DAY0 + 10 * HOUR;

/// Builds a database through real, validated updates, so every state a scenario starts from
/// is one the cluster can reach.
#[derive(Debug, Clone, Default)]
struct Lab {
    db: DbContent,
}

impl Lab {
    fn new(nodes: &[&str]) -> Lab {
        let mut lab = Lab::default();
        for n in nodes {
            lab.apply(Update::AddNode { node: (*n).into() });
        }
        lab
    }

    fn apply(&mut self, u: Update) -> &mut Lab {
        if let Err(e) = self.db.apply(&u) {
            panic!("{u:?}: {e}");
        }
        self
    }

    fn group(
        &mut self,
        name: &str,
        preferred: &[&str],
        policy: impl FnOnce(&mut Group),
    ) -> &mut Lab {
        let mut g = Group {
            name: name.into(),
            preferred_owners: preferred.iter().map(|n| (*n).to_string()).collect(),
            ..Group::default()
        };
        policy(&mut g);
        self.apply(Update::AddGroup(g))
    }

    fn epoch(&self, group: &str) -> u64 {
        self.db.ownership_of(group).epoch
    }

    /// Assigns `group` to `owner` at `at_ms` (a failover when `failover`).
    fn assign(&mut self, group: &str, owner: &str, at_ms: u64, failover: bool) -> &mut Lab {
        let epoch = self.epoch(group) + 1;
        self.apply(Update::AssignGroup {
            group: group.into(),
            epoch,
            owner: Some(owner.into()),
            at_ms,
            reason: "test".into(),
            failover,
        })
    }

    fn report(&mut self, group: &str, state: GroupState) -> &mut Lab {
        let epoch = self.epoch(group);
        self.apply(Update::ReportGroup {
            group: group.into(),
            epoch,
            state,
        })
    }

    /// Assigns and reports online.
    fn online(&mut self, group: &str, owner: &str) -> &mut Lab {
        self.assign(group, owner, NOW - HOUR * 2, false)
            .report(group, GroupState::Online)
    }

    fn release(&mut self, group: &str, to: Option<&str>) -> &mut Lab {
        let epoch = self.epoch(group);
        self.apply(Update::ReleaseGroup {
            group: group.into(),
            epoch,
            to: to.map(Into::into),
            reason: "test".into(),
        })
    }

    /// `owner` reports `value` (`EPOCH:NODES`) for `fileset`'s backups in sync.
    fn in_sync(&mut self, owner: &str, fileset: &str, value: &str) -> &mut Lab {
        self.apply(Update::SetProperty {
            key: in_sync_key(owner, fileset),
            value: value.into(),
        })
    }

    fn desired(&mut self, group: &str, desired: Desired) -> &mut Lab {
        self.apply(Update::SetGroupDesired {
            group: group.into(),
            desired,
        })
    }
}

fn set(nodes: &[&str]) -> BTreeSet<NodeId> {
    nodes.iter().map(|n| (*n).to_string()).collect()
}

fn assign(group: &str, epoch: u64, owner: Option<&str>, failover: bool, reason: &str) -> Decision {
    Decision::Assign {
        group: group.into(),
        epoch,
        owner: owner.map(Into::into),
        at_ms: NOW,
        failover,
        reason: reason.into(),
    }
}

fn release(group: &str, epoch: u64, to: Option<&str>, reason: &str) -> Decision {
    Decision::Release {
        group: group.into(),
        epoch,
        to: to.map(Into::into),
        reason: reason.into(),
    }
}

fn give_up(group: &str, epoch: u64, reason: &str) -> Decision {
    Decision::GiveUp {
        group: group.into(),
        epoch,
        at_ms: NOW,
        reason: reason.into(),
    }
}

/// One golden case: the database, the view and the time, and exactly what the policy decides.
struct Scenario {
    name: &'static str,
    db: DbContent,
    members: &'static [&'static str],
    paused: &'static [&'static str],
    now: u64,
    want: Vec<Decision>,
}

fn scenarios() -> Vec<Scenario> {
    let abc = ["a", "b", "c"];
    let web_ab = |f: fn(&mut Group)| {
        let mut l = Lab::new(&abc);
        l.group("web", &["a", "b"], f);
        l
    };
    let mut out = Vec::new();
    let mut case = |name, lab: &Lab, members, paused, now, want| {
        out.push(Scenario {
            name,
            db: lab.db.clone(),
            members,
            paused,
            now,
            want,
        });
    };

    let fresh = web_ab(|_| {});
    case(
        "initial placement goes to the first preferred owner",
        &fresh,
        &["a", "b", "c"],
        &[],
        NOW,
        vec![assign("web", 1, Some("a"), false, "placed on a")],
    );
    case(
        "initial placement skips paused and absent preferred owners",
        &fresh,
        &["a", "c", "b"],
        &["a"],
        NOW,
        vec![assign("web", 1, Some("b"), false, "placed on b")],
    );

    let mut on_a = web_ab(|_| {});
    on_a.online("web", "a");
    case(
        "a group online on its live, preferred owner stays",
        &on_a,
        &["a", "b", "c"],
        &[],
        NOW,
        vec![],
    );
    case(
        "owner lost: failover to the next preferred owner, counted",
        &on_a,
        &["b", "c"],
        &[],
        NOW,
        vec![assign(
            "web",
            2,
            Some("b"),
            true,
            "owner a lost: failover to b",
        )],
    );
    let mut failed_on_a = on_a.clone();
    failed_on_a.report("web", GroupState::Failed);
    case(
        "owner failed locally: failover skips it",
        &failed_on_a,
        &["a", "b", "c"],
        &[],
        NOW,
        vec![assign(
            "web",
            2,
            Some("b"),
            true,
            "a failed the group: failover to b",
        )],
    );
    case(
        "owner failed locally and no other possible owner: it tries again",
        &failed_on_a,
        &["a", "c"],
        &[],
        NOW,
        vec![assign(
            "web",
            2,
            Some("a"),
            true,
            "a failed the group; no other possible owner: a tries again",
        )],
    );
    case(
        "owner failed locally, the other possible owner is paused and it is itself paused: wait",
        &failed_on_a,
        &["a", "b", "c"],
        &["a", "b"],
        NOW,
        vec![],
    );
    let mut failing_on_a = web_ab(|g| g.failover_threshold = 2);
    failing_on_a
        .online("web", "a")
        .assign("web", "a", NOW - 2 * MINUTE, true)
        .report("web", GroupState::Failed)
        .assign("web", "a", NOW - MINUTE, true)
        .report("web", GroupState::Failed);
    case(
        "tries in place count as failovers: one more than the threshold gives up",
        &failing_on_a,
        &["a", "c"],
        &[],
        NOW,
        vec![give_up(
            "web",
            4,
            "a failed the group: more than 2 failovers within 3600000 ms; giving up",
        )],
    );
    case(
        "no possible owner: the others are absent or paused",
        &on_a,
        &["b", "c"],
        &["b"],
        NOW,
        vec![],
    );

    // Two failovers 30 and 20 minutes ago, threshold 2 per hour: the third gives up.
    let mut flapping = Lab::new(&abc);
    flapping.group("web", &["a", "b"], |g| g.failover_threshold = 2);
    flapping
        .online("web", "a")
        .assign("web", "b", NOW - 30 * MINUTE, true)
        .report("web", GroupState::Online)
        .assign("web", "a", NOW - 20 * MINUTE, true)
        .report("web", GroupState::Online);
    case(
        "more failovers than the threshold within the period: give up",
        &flapping,
        &["b", "c"],
        &[],
        NOW,
        vec![give_up(
            "web",
            4,
            "owner a lost: more than 2 failovers within 3600000 ms; giving up",
        )],
    );
    case(
        "a failover older than the period no longer counts",
        &flapping,
        &["b", "c"],
        &[],
        NOW + 31 * MINUTE,
        vec![Decision::Assign {
            group: "web".into(),
            epoch: 4,
            owner: Some("b".into()),
            at_ms: NOW + 31 * MINUTE,
            failover: true,
            reason: "owner a lost: failover to b".into(),
        }],
    );
    let mut given_up = flapping.clone();
    given_up.apply(give_up("web", 4, "test").to_update());
    case(
        "a group the cluster gave up on stays failed",
        &given_up,
        &["a", "b", "c"],
        &[],
        NOW + 2 * HOUR,
        vec![],
    );
    let mut retried = given_up.clone();
    retried.desired("web", Desired::Online);
    case(
        "an operator's retry places a given-up group again",
        &retried,
        &["a", "b", "c"],
        &[],
        NOW,
        vec![assign("web", 5, Some("a"), false, "placed on a")],
    );

    let mut cascade = Lab::new(&abc);
    cascade.group("db", &["a", "b", "c"], |_| {});
    cascade.online("db", "a");
    case(
        "cascading: a and b lost, c takes over",
        &cascade,
        &["c"],
        &[],
        NOW,
        vec![assign(
            "db",
            2,
            Some("c"),
            true,
            "owner a lost: failover to c",
        )],
    );
    let mut cascade_b = cascade.clone();
    cascade_b
        .assign("db", "b", NOW - MINUTE, true)
        .report("db", GroupState::Online);
    case(
        "cascading: then b lost, c takes over",
        &cascade_b,
        &["a", "c"],
        &["a"],
        NOW,
        vec![assign(
            "db",
            3,
            Some("c"),
            true,
            "owner b lost: failover to c",
        )],
    );

    let mut n1 = Lab::new(&["n1", "n2", "n3", "spare"]);
    for (g, own) in [("g1", "n1"), ("g2", "n2"), ("g3", "n3")] {
        n1.group(g, &[own, "spare"], |g| g.failback = Failback::Immediate);
        n1.online(g, own);
    }
    case(
        "N+1: only the lost node's group moves to the spare",
        &n1,
        &["n1", "n3", "spare"],
        &[],
        NOW,
        vec![assign(
            "g2",
            2,
            Some("spare"),
            true,
            "owner n2 lost: failover to spare",
        )],
    );
    let mut n1_back = n1.clone();
    n1_back
        .assign("g2", "spare", NOW - MINUTE, true)
        .report("g2", GroupState::Online);
    case(
        "N+1: the node is back, its group fails back",
        &n1_back,
        &["n1", "n2", "n3", "spare"],
        &[],
        NOW,
        vec![release("g2", 2, Some("n2"), "failback to n2 (immediate)")],
    );

    let mut any = Lab::new(&["a", "b", "c", "d"]);
    any.group("web", &["a"], |g| g.any_owner = true);
    any.online("web", "a");
    case(
        "any owner: after the preferred ones, other known members in name order",
        &any,
        &["d", "c"],
        &[],
        NOW,
        vec![assign(
            "web",
            2,
            Some("c"),
            true,
            "owner a lost: failover to c",
        )],
    );
    case(
        "any owner: members the database does not know are not possible owners",
        &any,
        &["x"],
        &[],
        NOW,
        vec![],
    );

    case(
        "a paused owner is drained to the next owner",
        &on_a,
        &["a", "b", "c"],
        &["a"],
        NOW,
        vec![release("web", 1, Some("b"), "a paused: draining to b")],
    );
    case(
        "a paused owner with nowhere to drain to takes the group offline",
        &on_a,
        &["a", "c"],
        &["a"],
        NOW,
        vec![release(
            "web",
            1,
            None,
            "a paused: no other possible owner; offline",
        )],
    );
    let mut drained = on_a.clone();
    drained.release("web", Some("b"));
    case(
        "a release in progress waits for the owner's report",
        &drained,
        &["a", "b", "c"],
        &["a"],
        NOW,
        vec![],
    );
    drained.report("web", GroupState::Offline);
    case(
        "after the owner reported offline, the move goes to its target",
        &drained,
        &["a", "b", "c"],
        &["a"],
        NOW,
        vec![assign("web", 2, Some("b"), false, "moved to b")],
    );
    case(
        "a move whose target left goes to the best possible owner",
        &drained,
        &["a", "c"],
        &[],
        NOW,
        vec![assign("web", 2, Some("a"), false, "placed on a")],
    );
    case(
        "the owner lost after it reported offline: placement, not a failover",
        &drained,
        &["b", "c"],
        &[],
        NOW,
        vec![assign("web", 2, Some("b"), false, "moved to b")],
    );

    let on_b = |failback: Failback| {
        let mut l = Lab::new(&abc);
        l.group("web", &["a", "b"], |g| g.failback = failback);
        l.online("web", "a")
            .assign("web", "b", NOW - MINUTE, true)
            .report("web", GroupState::Online);
        l
    };
    case(
        "failback immediate: the preferred owner is back",
        &on_b(Failback::Immediate),
        &["a", "b", "c"],
        &[],
        NOW,
        vec![release("web", 2, Some("a"), "failback to a (immediate)")],
    );
    case(
        "failback immediate: not to a paused node",
        &on_b(Failback::Immediate),
        &["a", "b", "c"],
        &["a"],
        NOW,
        vec![],
    );
    let nine_to_eleven = Failback::Window {
        start_min: 9 * 60,
        end_min: 11 * 60,
    };
    case(
        "failback inside its window",
        &on_b(nine_to_eleven),
        &["a", "b", "c"],
        &[],
        NOW,
        vec![release(
            "web",
            2,
            Some("a"),
            "failback to a (window 09:00-11:00 UTC)",
        )],
    );
    case(
        "failback outside its window: not yet",
        &on_b(nine_to_eleven),
        &["a", "b", "c"],
        &[],
        DAY0 + 11 * HOUR,
        vec![],
    );
    let night = Failback::Window {
        start_min: 22 * 60,
        end_min: 6 * 60,
    };
    case(
        "failback window wrapping midnight: outside at 10:00",
        &on_b(night),
        &["a", "b", "c"],
        &[],
        NOW,
        vec![],
    );
    for (name, at) in [
        (
            "failback window wrapping midnight: inside at 23:00",
            DAY0 + 23 * HOUR,
        ),
        (
            "failback window wrapping midnight: inside at 05:59",
            DAY0 + 6 * HOUR - MINUTE,
        ),
    ] {
        case(
            name,
            &on_b(night),
            &["a", "b", "c"],
            &[],
            at,
            vec![release(
                "web",
                2,
                Some("a"),
                "failback to a (window 22:00-06:00 UTC)",
            )],
        );
    }
    case(
        "failback never",
        &on_b(Failback::Never),
        &["a", "b", "c"],
        &[],
        NOW,
        vec![],
    );
    let mut busy = on_b(Failback::Immediate);
    busy.assign("web", "b", NOW, false);
    case(
        "a group onlining on a live owner waits, even for failback",
        &busy,
        &["a", "b", "c"],
        &[],
        NOW,
        vec![],
    );
    case(
        "a group onlining on a lost owner fails over",
        &busy,
        &["a", "c"],
        &[],
        NOW,
        vec![assign(
            "web",
            4,
            Some("a"),
            true,
            "owner b lost: failover to a",
        )],
    );

    let mut off = on_a.clone();
    off.desired("web", Desired::Offline);
    case(
        "desired offline: the owner releases it to nobody",
        &off,
        &["a", "b", "c"],
        &[],
        NOW,
        vec![release("web", 1, None, "desired offline")],
    );
    case(
        "desired offline with the owner lost: assigned to nobody",
        &off,
        &["b", "c"],
        &[],
        NOW,
        vec![assign(
            "web",
            2,
            None,
            false,
            "desired offline; owner a lost",
        )],
    );
    let mut off_failed = failed_on_a.clone();
    off_failed.desired("web", Desired::Offline);
    case(
        "desired offline on a failed group: assigned to nobody",
        &off_failed,
        &["a", "b", "c"],
        &[],
        NOW,
        vec![assign("web", 2, None, false, "desired offline")],
    );
    let mut off_done = off.clone();
    off_done
        .release("web", None)
        .report("web", GroupState::Offline);
    case(
        "desired offline and offline: nothing",
        &off_done,
        &["a", "b", "c"],
        &[],
        NOW,
        vec![],
    );
    let mut back_online = off_done.clone();
    back_online.desired("web", Desired::Online);
    case(
        "desired online again: placed anew",
        &back_online,
        &["a", "b", "c"],
        &[],
        NOW,
        vec![assign("web", 2, Some("a"), false, "placed on a")],
    );

    let mut two = Lab::new(&abc);
    two.group("a1", &["a"], |_| {})
        .group("b1", &["b", "a"], |_| {})
        .group("c1", &["c"], |g| g.desired = Desired::Offline);
    two.online("b1", "b");
    case(
        "several groups: decisions in name order, one per group",
        &two,
        &["a", "c"],
        &[],
        NOW,
        vec![
            assign("a1", 1, Some("a"), false, "placed on a"),
            assign("b1", 2, Some("a"), true, "owner b lost: failover to a"),
        ],
    );

    // Replicated files: the owner reports which backups follow its streams.
    let data = |preferred: &[&str], failback: Failback| {
        let mut l = Lab::new(&abc);
        l.group("kv", preferred, |g| g.failback = failback);
        l.apply(Update::AddResource(data_res(
            "kv-data", "kv", "fileset", "data",
        )));
        l.apply(Update::AddResource(data_res(
            "kv-ckpt",
            "kv",
            "checkpoint",
            "ckpt",
        )));
        l
    };
    let mut on_b = data(&["a", "b", "c"], Failback::Never);
    on_b.online("kv", "a")
        .release("kv", None)
        .report("kv", GroupState::Offline);
    on_b.assign("kv", "b", NOW - HOUR, true)
        .report("kv", GroupState::Online);
    on_b.in_sync("b", "data", "2:c")
        .in_sync("b", "ckpt", "2:a,c");
    case(
        "owner lost: a node still catching up is passed over for one in sync",
        &on_b,
        &["a", "c"],
        &[],
        NOW,
        vec![assign(
            "kv",
            3,
            Some("c"),
            true,
            "owner b lost: failover to c",
        )],
    );
    let mut unknown = on_b.clone();
    unknown.in_sync("b", "data", "1:c");
    case(
        "owner lost: a report of another epoch says nothing; preference order",
        &unknown,
        &["a", "c"],
        &[],
        NOW,
        vec![assign(
            "kv",
            3,
            Some("a"),
            true,
            "owner b lost: failover to a",
        )],
    );
    let mut nobody = on_b.clone();
    nobody.in_sync("b", "data", "2:");
    case(
        "owner lost: nobody in sync; preference order, and the reason says so",
        &nobody,
        &["a", "c"],
        &[],
        NOW,
        vec![assign(
            "kv",
            3,
            Some("a"),
            true,
            "owner b lost: failover to a (no node was reported in sync)",
        )],
    );
    let mut back = data(&["a", "b", "c"], Failback::Immediate);
    back.online("kv", "a")
        .release("kv", None)
        .report("kv", GroupState::Offline);
    back.assign("kv", "b", NOW - HOUR, true)
        .report("kv", GroupState::Online);
    back.in_sync("b", "data", "2:a,c")
        .in_sync("b", "ckpt", "2:c");
    case(
        "immediate failback waits until the preferred node is in sync",
        &back,
        &["a", "b", "c"],
        &[],
        NOW,
        vec![],
    );
    back.in_sync("b", "ckpt", "2:a,c");
    case(
        "immediate failback once the preferred node is in sync",
        &back,
        &["a", "b", "c"],
        &[],
        NOW,
        vec![release("kv", 2, Some("a"), "failback to a (immediate)")],
    );
    out
}

/// A `kind` resource of `group` replicating `fileset`.
fn data_res(name: &str, group: &str, kind: &str, fileset: &str) -> Resource {
    let mut properties: BTreeMap<String, String> =
        [("fileset".to_string(), fileset.to_string())].into();
    if kind == "checkpoint" {
        properties.insert("service".into(), "kv".into());
    }
    Resource {
        name: name.into(),
        group: group.into(),
        kind: kind.into(),
        properties,
        ..Resource::default()
    }
}

#[test]
fn golden_scenarios() {
    let mut failures = Vec::new();
    for s in scenarios() {
        let members = set(s.members);
        let paused = set(s.paused);
        let input = PolicyInput {
            members: &members,
            paused: &paused,
            db: &s.db,
            now_unix_ms: s.now,
        };
        let got = decide(&input);
        if got != s.want {
            failures.push(format!(
                "{}:\n  want {:?}\n  got  {:?}",
                s.name, s.want, got
            ));
            continue;
        }
        // Every decision is a valid update, and deciding again on the result yields nothing.
        let mut after = s.db.clone();
        for d in &got {
            if let Err(e) = after.apply(&d.to_update()) {
                failures.push(format!("{}: {d:?} does not apply: {e}", s.name));
            }
        }
        let again = decide(&PolicyInput {
            db: &after,
            ..input
        });
        if !again.is_empty() {
            failures.push(format!("{}: not idempotent: then {again:?}", s.name));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn decisions_map_to_their_updates() {
    let d = give_up("g", 7, "why");
    assert_eq!(d.group(), "g");
    assert_eq!(
        d.to_update(),
        Update::AssignGroup {
            group: "g".into(),
            epoch: 7,
            owner: None,
            at_ms: NOW,
            reason: "why".into(),
            failover: true,
        }
    );
    assert_eq!(
        release("g", 3, Some("b"), "r").to_update(),
        Update::ReleaseGroup {
            group: "g".into(),
            epoch: 3,
            to: Some("b".into()),
            reason: "r".into(),
        }
    );
    assert_eq!(
        assign("g", 4, Some("a"), false, "p").to_update(),
        Update::AssignGroup {
            group: "g".into(),
            epoch: 4,
            owner: Some("a".into()),
            at_ms: NOW,
            reason: "p".into(),
            failover: false,
        }
    );
}

#[test]
fn a_racing_duplicate_decision_is_refused_by_the_epoch() {
    let mut lab = Lab::new(&["a", "b", "c"]);
    lab.group("web", &["a", "b", "c"], |_| {})
        .online("web", "a");
    let members = set(&["b", "c"]);
    let paused = set(&[]);
    let d1 = decide(&PolicyInput {
        members: &members,
        paused: &paused,
        db: &lab.db,
        now_unix_ms: NOW,
    });
    // Another proposer saw b paused and picked c for the same epoch.
    let paused_b = set(&["b"]);
    let d2 = decide(&PolicyInput {
        members: &members,
        paused: &paused_b,
        db: &lab.db,
        now_unix_ms: NOW,
    });
    assert_ne!(d1, d2);
    let mut db = lab.db.clone();
    db.apply(&d1[0].to_update()).expect("first wins");
    let e = db.apply(&d2[0].to_update()).expect_err("second loses");
    assert!(
        matches!(
            e,
            UpdateError::StaleEpoch {
                expected: 3,
                got: 2,
                ..
            }
        ),
        "{e}"
    );
    assert_eq!(db.ownership_of("web").owner.as_deref(), Some("b"));
}

fn res(name: &str, group: &str, deps: &[&str]) -> Resource {
    Resource {
        name: name.into(),
        group: group.into(),
        kind: "exec".into(),
        depends_on: deps.iter().map(|d| (*d).to_string()).collect(),
        properties: [("agent".to_string(), "/bin/true".to_string())].into(),
        ..Resource::default()
    }
}

#[test]
fn topo_order_puts_dependencies_first() {
    let mut lab = Lab::new(&["a"]);
    lab.group("web", &["a"], |_| {})
        .group("other", &["a"], |_| {});
    for r in [
        res("fs", "web", &[]),
        res("ip", "web", &[]),
        res("ckpt", "web", &["fs"]),
        res("svc", "web", &["ip", "ckpt"]),
        res("probe", "web", &["svc"]),
        res("lonely", "other", &[]),
    ] {
        lab.apply(Update::AddResource(r));
    }
    assert_eq!(
        topo_order(&lab.db, "web").expect("acyclic"),
        ["fs", "ckpt", "ip", "svc", "probe"]
    );
    assert_eq!(topo_order(&lab.db, "other").expect("one"), ["lonely"]);
    lab.group("empty", &[], |_| {});
    assert!(topo_order(&lab.db, "empty").expect("none").is_empty());
    assert!(matches!(
        topo_order(&lab.db, "ghost"),
        Err(UpdateError::NotFound { .. })
    ));
    // Content that validation would never produce is still an error, not a loop or a panic.
    let mut bad = lab.db.clone();
    if let Some(r) = bad.resources.get_mut("fs") {
        r.depends_on = vec!["probe".into()];
    }
    let e = topo_order(&bad, "web").expect_err("cycle");
    assert!(e.to_string().contains("cycle"), "{e}");
    let mut bad = lab.db.clone();
    if let Some(r) = bad.resources.get_mut("fs") {
        r.depends_on = vec!["lonely".into()];
    }
    assert!(matches!(
        topo_order(&bad, "web"),
        Err(UpdateError::BadDependency { .. })
    ));
}

// ---------------------------------------------------------------------------------------------
// Random views and databases.
// ---------------------------------------------------------------------------------------------

const NODES: [&str; 5] = ["n0", "n1", "n2", "n3", "n4"];

fn pick<'a>(rng: &mut Rng, from: &[&'a str]) -> &'a str {
    from[rng.index(from.len())]
}

fn subset(rng: &mut Rng, from: &[&str], permille: u64) -> BTreeSet<NodeId> {
    from.iter()
        .filter(|_| rng.chance(permille))
        .map(|n| (*n).to_string())
        .collect()
}

fn random_group(rng: &mut Rng, name: &str) -> Group {
    let mut preferred: Vec<NodeId> = Vec::new();
    for _ in 0..rng.below(4) {
        let n = pick(rng, &NODES).to_string();
        if !preferred.contains(&n) {
            preferred.push(n);
        }
    }
    let failback = match rng.below(4) {
        0 => Failback::Never,
        1 => Failback::Immediate,
        _ => {
            let start = u16::try_from(rng.below(1440)).unwrap_or(0);
            let end = (start + 1 + u16::try_from(rng.below(1439)).unwrap_or(0)) % 1440;
            Failback::Window {
                start_min: start,
                end_min: end,
            }
        }
    };
    Group {
        name: name.into(),
        preferred_owners: preferred,
        any_owner: rng.chance(300),
        failover_threshold: u32::try_from(rng.below(4)).unwrap_or(0),
        failover_period_ms: (1 + rng.below(6)) * 10 * MINUTE,
        failback,
        desired: if rng.chance(150) {
            Desired::Offline
        } else {
            Desired::Online
        },
        ..Group::default()
    }
}

/// What owners and operators do between two policy rounds: reports that fit the state, now
/// and then an operator's desired state or move. Only valid updates are applied.
fn random_events(rng: &mut Rng, db: &mut DbContent, members: &BTreeSet<NodeId>) {
    let groups: Vec<String> = db.groups.keys().cloned().collect();
    for g in groups {
        let own = db.ownership_of(&g);
        let owner_live = own.owner.as_ref().is_some_and(|o| members.contains(o));
        let mut candidates: Vec<Update> = Vec::new();
        if owner_live {
            let to = match own.state {
                GroupState::Onlining => Some(if rng.chance(800) {
                    GroupState::Online
                } else {
                    GroupState::Failed
                }),
                GroupState::Online if rng.chance(100) => Some(GroupState::Failed),
                GroupState::Offlining => Some(if rng.chance(900) {
                    GroupState::Offline
                } else {
                    GroupState::Failed
                }),
                _ => None,
            };
            if let Some(state) = to.filter(|_| rng.chance(700)) {
                candidates.push(Update::ReportGroup {
                    group: g.clone(),
                    epoch: own.epoch,
                    state,
                });
            }
        }
        if rng.chance(40) {
            let desired = if rng.chance(500) {
                Desired::Online
            } else {
                Desired::Offline
            };
            candidates.push(Update::SetGroupDesired {
                group: g.clone(),
                desired,
            });
        }
        if rng.chance(40) {
            candidates.push(Update::ReleaseGroup {
                group: g.clone(),
                epoch: own.epoch,
                to: Some(pick(rng, &NODES).to_string()),
                reason: "operator move".into(),
            });
        }
        for u in candidates {
            // Refused ones (a move to an unknown node, a release of an offline group) change
            // nothing, as in the cluster.
            let _ = db.apply(&u);
        }
    }
}

/// Whether a group may be running (or about to run) on a node of the view.
fn may_run(o: &Ownership, members: &BTreeSet<NodeId>) -> bool {
    o.owner.as_ref().is_some_and(|n| members.contains(n))
        && matches!(
            o.state,
            GroupState::Onlining | GroupState::Online | GroupState::Offlining
        )
}

#[test]
fn random_views_and_databases_keep_the_invariants() {
    let groups = ["g0", "g1", "g2", "g3"];
    let mut decisions = 0usize;
    for seed in 0..300u64 {
        let mut rng = Rng::new(seed);
        let mut db = DbContent::default();
        for n in NODES {
            if rng.chance(700) {
                db.apply(&Update::AddNode { node: n.into() })
                    .expect("new node");
            }
        }
        for g in groups {
            db.apply(&Update::AddGroup(random_group(&mut rng, g)))
                .expect("valid group");
        }
        let mut now = NOW + rng.below(24 * HOUR);
        let mut members = subset(&mut rng, &NODES, 700);
        for round in 0..60 {
            if rng.chance(250) {
                members = subset(&mut rng, &NODES, 700);
            }
            let paused: BTreeSet<NodeId> = members
                .iter()
                .filter(|_| rng.chance(100))
                .cloned()
                .collect();
            now += rng.below(20 * MINUTE);
            random_events(&mut rng, &mut db, &members);
            let input = PolicyInput {
                members: &members,
                paused: &paused,
                db: &db,
                now_unix_ms: now,
            };
            let out = decide(&input);
            let ctx = format!("seed {seed} round {round}: {out:?}");
            let mut seen = BTreeSet::new();
            let mut after = db.clone();
            for d in &out {
                assert!(
                    seen.insert(d.group().to_owned()),
                    "two decisions for one group: {ctx}"
                );
                let before = db.ownership_of(d.group());
                // Every decision validates against the database it was decided on.
                if let Err(e) = db.validate(&d.to_update()) {
                    panic!("{d:?} invalid: {e}; {ctx}");
                }
                match d {
                    Decision::Assign { owner, .. } => {
                        // Never two owners: a new owner only once the old one cannot be running.
                        assert!(!may_run(&before, &members), "assigned while running: {ctx}");
                        if let Some(n) = owner {
                            assert!(
                                members.contains(n) && !paused.contains(n),
                                "assigned to a node that may not own it: {ctx}"
                            );
                        }
                    }
                    Decision::GiveUp { .. } => {
                        assert!(!may_run(&before, &members), "gave up while running: {ctx}");
                    }
                    Decision::Release { to, .. } => {
                        let owner = before.owner.as_ref().expect("released an ownerless group");
                        assert!(members.contains(owner), "released on a lost owner: {ctx}");
                        if let Some(n) = to {
                            assert!(members.contains(n) && !paused.contains(n), "{ctx}");
                        }
                    }
                }
                after.apply(&d.to_update()).expect("validated");
                // Epochs only grow, and only by one per change of owner.
                let got = after.ownership_of(d.group());
                match d {
                    Decision::Release { .. } => assert_eq!(got.epoch, before.epoch, "{ctx}"),
                    _ => assert_eq!(got.epoch, before.epoch + 1, "{ctx}"),
                }
                decisions += 1;
            }
            // Idempotent: the result needs nothing more.
            let again = decide(&PolicyInput {
                db: &after,
                ..input
            });
            assert!(again.is_empty(), "{ctx} then {again:?}");
            for g in groups {
                assert!(
                    after.ownership_of(g).epoch >= db.ownership_of(g).epoch,
                    "{ctx}"
                );
            }
            db = after;
        }
    }
    // The runs are not vacuous.
    assert!(decisions > 1000, "only {decisions} decisions");
}
