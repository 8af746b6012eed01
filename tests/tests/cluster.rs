//! Cluster membership and quorum end to end: real watchd processes, each in its own network
//! namespace (one or two networks), observed through `ftctl cluster status --json` and
//! `ftctl cluster events --json`. Faults: kill -9 of a watchd and its restart, a node cut off,
//! the two nodes of a two-node cluster cut from each other (with a quorum disk: a file every
//! namespace sees), one of two networks cut, and a node with the wrong secret.

use std::time::{Duration, Instant};

use ftkit_tests::cluster::{Cluster, NAMES, SETTLE, members_of, state_of};
use ftkit_tests::{Scratch, Watchd, json_lines, q};
use serde_json::Value;

#[test]
fn three_nodes_agree_on_views_across_a_kill_and_a_restart() {
    let mut c = Cluster::new("cl-kill", 3, 1, false);
    c.start_all();
    let first = c.wait_view(&[0, 1, 2], &[0, 1, 2]);
    let s = c.status(0);
    assert_eq!(s["quorum"]["votes"], 3);
    assert_eq!(s["quorum"]["needed"], 2);
    assert_eq!(state_of(&s, "c"), "online");

    // A global update through a member that is not the leader reaches every member.
    c.set(1, "color", "blue");
    for i in 0..3 {
        c.wait_property(i, "color", "blue");
    }

    c.kill9(2);
    let without = c.wait_view(&[0, 1], &[0, 1]);
    assert!(without > first, "{without} after {first}");
    c.set(0, "size", "2");
    let s = c.wait(0, "c offline", |s| state_of(s, "c") == "offline");
    assert_eq!(s["quorum"]["votes"], 2);
    assert!(
        c.events(0).iter().any(|e| e["kind"] == "suspected"),
        "a suspicion is an event"
    );

    c.restart(2);
    let back = c.wait_view(&[0, 1, 2], &[0, 1, 2]);
    assert!(back > without, "{back} after {without}");
    // The node that was away receives the database it missed.
    let db = c.wait_property(2, "size", "2");
    assert_eq!(db["content"]["properties"]["color"], "blue");
    assert_eq!(db["seq"], c.db(0)["seq"]);
    // The restarted node came back with a new incarnation.
    assert!(c.status(2)["incarnation"].as_u64() > Some(1));
}

#[test]
fn a_partitioned_node_loses_quorum_and_rejoins_after_the_heal() {
    let mut c = Cluster::new("cl-cut", 3, 1, false);
    c.start_all();
    let first = c.wait_view(&[0, 1, 2], &[0, 1, 2]);

    c.lab.cut(2);
    let majority = c.wait_view(&[0, 1], &[0, 1]);
    assert!(majority > first);
    let lone = c.wait(2, "no quorum, not acting", |s| {
        s["acting"] == false && s["quorum"]["has_quorum"] == false
    });
    assert_eq!(lone["quorum"]["votes"], 1);
    // The majority keeps acting and changing the database; the cut node can do neither.
    c.set(1, "during", "cut");
    let refused = c.node(2).ftctl(&["cluster", "set", "lonely", "yes"]);
    assert!(
        !refused.status.success(),
        "a node without quorum changed the database"
    );
    for _ in 0..10 {
        assert_eq!(c.status(0)["acting"], true);
        assert_eq!(c.status(2)["acting"], false);
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(c.db(2)["content"]["properties"]["during"], Value::Null);

    c.lab.heal(2);
    let healed = c.wait_view(&[0, 1, 2], &[0, 1, 2]);
    assert!(healed > majority);
    // One database again: the majority's.
    let db = c.wait_property(2, "during", "cut");
    assert_eq!(db["content"]["properties"]["lonely"], Value::Null);
    assert_eq!(c.db(0)["seq"], db["seq"]);
}

#[test]
fn two_nodes_with_a_quorum_disk_survive_the_loss_of_either() {
    let mut c = Cluster::new("cl-disk", 2, 1, true);
    c.start_all();
    c.wait_view(&[0, 1], &[0, 1]);
    let s = c.status(0);
    assert_eq!(s["quorum"]["kind"], "disk");
    assert_eq!(s["quorum"]["total"], 3);

    c.kill9(0);
    let alone = c.wait_view(&[1], &[1]);
    let s = c.status(1);
    assert_eq!(s["quorum"]["disk_owner"], "b", "{s:#}");
    assert_eq!(s["quorum"]["votes"], 2);

    c.restart(0);
    let both = c.wait_view(&[0, 1], &[0, 1]);
    assert!(both > alone);

    c.kill9(1);
    c.wait_view(&[0], &[0]);
    assert_eq!(c.status(0)["quorum"]["disk_owner"], "a");
}

#[test]
fn a_node_that_forms_the_cluster_alone_starts_from_the_disk_s_database() {
    let mut c = Cluster::new("cl-diskdb", 2, 1, true);
    c.start_all();
    c.wait_view(&[0, 1], &[0, 1]);
    c.set(0, "x", "1");
    c.wait_property(1, "x", "1");

    // b is gone; a alone (with the disk's vote) changes the database, which b never saw.
    c.kill9(1);
    c.wait_view(&[0], &[0]);
    c.set(0, "x", "2");
    c.kill9(0);

    // b forms the cluster alone: the quorum disk gives it the newest database.
    c.restart(1);
    c.wait_view(&[1], &[1]);
    let db = c.wait_property(1, "x", "2");
    assert_eq!(db["seq"], 2, "{db:#}");
    assert!(
        c.events(1).iter().any(|e| e["kind"] == "gum_synced"),
        "the new leader synced from the disk"
    );

    // a comes back and gets it too.
    c.restart(0);
    c.wait_view(&[0, 1], &[0, 1]);
    c.wait_property(0, "x", "2");
}

#[test]
fn two_nodes_cut_from_each_other_never_both_act() {
    let mut c = Cluster::new("cl-split", 2, 1, true);
    c.start_all();
    c.wait_view(&[0, 1], &[0, 1]);

    c.lab.cut(1);
    // Exactly one side ends up acting alone, the other not at all; sample both the whole time.
    let deadline = Instant::now() + SETTLE;
    let mut settled_since: Option<Instant> = None;
    loop {
        let (a, b) = (c.status(0), c.status(1));
        assert!(
            !(a["acting"] == true && b["acting"] == true && members_of(&a) != members_of(&b)),
            "both sides act in different views: {a:#} {b:#}"
        );
        let one = (a["acting"] == true) != (b["acting"] == true);
        let winner = if a["acting"] == true { &a } else { &b };
        if one && members_of(winner).len() == 1 {
            let since = *settled_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= Duration::from_secs(2) {
                break;
            }
        } else {
            settled_since = None;
        }
        assert!(
            Instant::now() < deadline,
            "no single winner within {SETTLE:?}: {a:#} {b:#}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let (a, b) = (c.status(0), c.status(1));
    let (winner, loser) = if a["acting"] == true { (a, b) } else { (b, a) };
    assert_eq!(winner["quorum"]["disk_owner"], winner["node"]);
    assert_eq!(loser["quorum"]["has_quorum"], false, "{loser:#}");

    c.lab.heal(1);
    c.wait_view(&[0, 1], &[0, 1]);
}

#[test]
fn a_node_with_the_wrong_secret_is_refused_on_both_sides() {
    let mut c = Cluster::new("cl-secret", 3, 1, false);
    let wrong = c
        .shared
        .write("wrong-secret", "this is not the cluster secret\n");
    c.start(0);
    c.start(1);
    c.start_with_secret(2, &wrong);
    c.wait_view(&[0, 1], &[0, 1]);
    let intruder = c.wait(2, "refused everywhere", |s| {
        s["epoch"] == 0 && s["acting"] == false
    });
    assert_eq!(intruder["quorum"]["has_quorum"], false);
    let s = c.status(0);
    assert_eq!(state_of(&s, "c"), "offline", "{s:#}");
    // Both sides log the refusal.
    let refused = |i: usize| {
        let log = c.node(i).log_text();
        log.contains("authentication failed") || log.contains("(\"auth\")")
    };
    ftkit_tests::wait_until("refusals logged on both sides", SETTLE, || {
        (refused(0) && refused(2)).then_some(())
    });
    // Membership never took c in.
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(members_of(&c.status(0)), ["a", "b"]);
    assert_eq!(c.status(2)["epoch"], 0);
}

#[test]
fn losing_one_of_two_networks_changes_no_membership() {
    let mut c = Cluster::new("cl-nets", 2, 2, false);
    c.start_all();
    let epoch = c.wait_view(&[0, 1], &[0, 1]);

    // The first network carries the regroup traffic by preference: cut that one.
    c.lab.cut_link(0, 1);
    let link_down = |i: usize, peer: &str| {
        c.events(i).iter().any(|e| {
            e["kind"] == "link_down" && e["detail"].as_str().is_some_and(|d| d.contains(peer))
        })
    };
    ftkit_tests::wait_until("a link_down event on both sides", SETTLE, || {
        (link_down(0, "b") && link_down(1, "a")).then_some(())
    });
    // Messages that may take any network move to the one that works: a global update goes
    // through while the first network is down.
    c.set(0, "via", "the second network");
    c.wait_property(1, "via", "the second network");
    // Well past the suspicion time: same view, both acting.
    std::thread::sleep(Duration::from_secs(2));
    for i in 0..2 {
        let s = c.status(i);
        assert_eq!(s["epoch"], epoch, "{s:#}");
        assert_eq!(s["acting"], true, "{s:#}");
        assert!(
            !c.events(i).iter().any(|e| e["kind"] == "suspected"),
            "no suspicion with one network left"
        );
    }

    c.lab.heal_link(0, 1);
    ftkit_tests::wait_until("a link_up event", SETTLE, || {
        c.events(0)
            .iter()
            .any(|e| e["kind"] == "link_up")
            .then_some(())
    });
    assert_eq!(c.status(0)["epoch"], epoch);
}

/// Two nodes on loopback (no namespaces needed: the intruder is this test process).
fn loopback_pair(label: &str) -> (Scratch, Vec<u16>, Vec<Watchd>) {
    let shared = Scratch::new(label);
    let secret = shared.write("secret", "correct horse battery staple\n");
    let ports = [ftkit_tests::free_port(), ftkit_tests::free_port()];
    let nodes = (0..2)
        .map(|i| {
            let other = 1 - i;
            Watchd::start_node(
                None,
                &format!("{label}-{}", NAMES[i]),
                Some(NAMES[i]),
                "",
                &format!(
                    "[cluster]\nname = \"t\"\nsecret_file = {}\nlisten = [\"127.0.0.1:{}\"]\n\n\
                     [[node]]\nname = \"{}\"\naddresses = [\"127.0.0.1:{}\"]\n",
                    q(&secret),
                    ports[i],
                    NAMES[other],
                    ports[other]
                ),
            )
        })
        .collect();
    (shared, ports.to_vec(), nodes)
}

fn loopback_status(w: &Watchd) -> Value {
    serde_json::from_str(w.ftctl_ok(&["cluster", "status", "--json"]).trim()).expect("JSON")
}

#[test]
fn garbage_strangers_and_stale_messages_change_nothing() {
    use cluster::membership::{Heartbeat, Message, Proposal, View};
    use cluster::net::{NetConfig, Secret, connect_addr};

    let (_shared, ports, nodes) = loopback_pair("cl-bad");
    let agreed = || {
        let (a, b) = (loopback_status(&nodes[0]), loopback_status(&nodes[1]));
        (a["acting"] == true
            && b["acting"] == true
            && a["epoch"] == b["epoch"]
            && members_of(&a) == ["a", "b"])
        .then(|| a["epoch"].as_u64().unwrap_or(0))
    };
    let epoch = ftkit_tests::wait_until("a view of a and b", SETTLE, agreed);
    let target = format!("127.0.0.1:{}", ports[0]).parse().expect("address");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let secret = Secret::new(b"correct horse battery staple".to_vec()).expect("secret");
        let net = |name: &str| NetConfig::new("t", name, secret.clone()).expect("config");
        // A node name that is not configured: refused after the handshake.
        let mut stranger = connect_addr(&net("zz"), target, "membership")
            .await
            .expect("the secret is right");
        let _ = stranger.send(&"hello").await;
        // A configured name (the transport cannot tell a forged one): frames that are not
        // messages, a heartbeat of an incarnation older than b's, and a proposal naming a
        // node nobody configured.
        let mut forged = connect_addr(&net("b"), target, "membership")
            .await
            .expect("the secret is right");
        forged.send(&"not a message").await.expect("send");
        forged.send(&[1u8, 2, 3]).await.expect("send");
        // watchd's wire enum `{membership: message}`, as MessagePack encodes it: a one-entry
        // map.
        let wire = |m: Message| std::collections::BTreeMap::from([("membership", m)]);
        let stale = Message::Heartbeat(Heartbeat {
            incarnation: 0,
            sent_us: 1,
            echo: None,
            vouch: true,
            epoch: 1,
            leaving: true,
            disk_us: None,
        });
        forged.send(&wire(stale)).await.expect("send");
        let bogus = View {
            epoch: u64::MAX,
            prev: 0,
            members: ["a".to_owned(), "mallory".to_owned()].into(),
            paused: Default::default(),
            joined: [("a".to_owned(), 1), ("mallory".to_owned(), 1)].into(),
        };
        let proposal = Message::Propose(Box::new(Proposal {
            round: 1,
            view: bogus,
            basis: None,
            disk_holder: None,
            applied: Default::default(),
        }));
        forged.send(&wire(proposal)).await.expect("send");
        tokio::time::sleep(Duration::from_millis(500)).await;
    });
    let s = ftkit_tests::wait_until("the refusals counted", SETTLE, || {
        let s = loopback_status(&nodes[0]);
        (s["transport"]["refused_unknown_node"].as_u64() >= Some(1)
            && s["transport"]["garbage"].as_u64() >= Some(2))
        .then_some(s)
    });
    assert_eq!(s["epoch"], epoch, "nothing changed the view: {s:#}");
    assert_eq!(s["acting"], true);
    let events = json_lines(&nodes[0].ftctl_ok(&["cluster", "events", "--json"]));
    assert!(
        events.iter().any(|e| e["kind"] == "ignored"
            && e["detail"].as_str().is_some_and(|d| d.contains("unknown"))),
        "the bogus proposal is reported: {events:?}"
    );
    assert!(
        nodes[0].log_text().contains("not configured here"),
        "the stranger is logged"
    );
    // Still one view a moment later: b never looked like leaving or restarting.
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(agreed(), Some(epoch));
}
