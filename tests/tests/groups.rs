//! Resource groups end to end: three real watchd nodes, each in its own network namespace, run
//! a group of an exec resource (a shell agent writing a state file), an ip resource (a virtual
//! address on the node's interface) and a service resource (a long-running program that watchd
//! supervises), with dependencies. Faults: the owner host dies (watchd and its processes killed,
//! its network gone), it comes back (immediate failback), an operator move, a partition of the
//! owner, a node pause (drain), an agent that hangs on start, and bad group files. An invariant
//! checker reads every node's group journal (`groups.jsonl`, kept across kills) and asserts that
//! no two nodes ever ran the group at overlapping times and that epochs only grow.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use ftkit_tests::cluster::{Cluster, NAMES, SETTLE, pids_in_netns};
use ftkit_tests::{json_lines, q, unix_ms, wait_until};
use serde_json::Value;

/// How long a group may take to come online somewhere after a fault (failure detection,
/// regroup, the fence wait of a lost owner: the forced stop of its service and address 0.25 s
/// + the exec resource's 1 s offline timeout + 0.15 s margin, then the resources).
const MOVE: Duration = Duration::from_secs(30);

/// An OCF-style agent: `start` writes `<dir>/<instance>.<netns>` (the epoch), `stop` removes
/// it, `monitor` checks it; with `OCF_RESKEY_hang=1` its start never ends, with
/// `OCF_RESKEY_fail_once=1` its first start on each node fails.
const AGENT: &str = r#"#!/bin/sh
node=$(ip netns identify $$ 2>/dev/null)
f="$OCF_RESKEY_dir/$OCF_RESOURCE_INSTANCE.$node"
case "$1" in
start)
    if [ "$OCF_RESKEY_hang" = "1" ]; then exec sleep 1000; fi
    if [ "$OCF_RESKEY_fail_once" = "1" ] && [ ! -e "$f.failed" ]; then : > "$f.failed"; exit 1; fi
    echo "$FT_EPOCH" > "$f"; exit 0 ;;
stop) rm -f "$f"; exit 0 ;;
monitor) if [ -f "$f" ]; then exit 0; fi; exit 7 ;;
*) exit 3 ;;
esac
"#;

struct Groups {
    c: Cluster,
    dir: PathBuf,
    agent: PathBuf,
    /// When a node was killed (its run of any group ends there), by node index.
    deaths: Vec<(usize, u64)>,
}

impl Groups {
    fn new(label: &str) -> Groups {
        let mut c = Cluster::new(label, 3, 1, false);
        let dir = c.shared.path().join("state");
        std::fs::create_dir_all(&dir).expect("state dir");
        let agent = c.shared.write("agent.sh", AGENT);
        set_executable(&agent);
        // The app writes the epoch and group it was started for, then runs until stopped.
        c.extra = format!(
            "[[service]]\nname = \"app\"\ncommand = \"/bin/sh\"\nargs = [\"-c\", {}]\nautostart = false\n\n[service.stop]\ngrace = \"1s\"\n",
            q(format!(
                "echo \"$FT_EPOCH $FT_GROUP\" > {}/app.$(ip netns identify $$); exec sleep 1000000",
                dir.display()
            ))
        );
        c.start_all();
        c.wait_view(&[0, 1, 2], &[0, 1, 2]);
        Groups {
            c,
            dir,
            agent,
            deaths: Vec::new(),
        }
    }

    /// The virtual address of the lab (outside every node's own address).
    fn vip(&self) -> String {
        let own = self.c.lab.addr(0).octets();
        format!("{}.{}.{}.200", own[0], own[1], own[2])
    }

    fn write_file(&self, name: &str, text: &str) -> PathBuf {
        self.c.shared.write(name, text)
    }

    /// `ftctl group status --json` of node `i`, the object of group `g`.
    fn group(&self, i: usize, g: &str) -> Value {
        json_lines(&self.c.node(i).ftctl_ok(&["group", "status", "--json"]))
            .into_iter()
            .find(|x| x["name"] == g)
            .unwrap_or(Value::Null)
    }

    /// Waits until node `i` sees group `g` online on `owner`; returns its status.
    fn wait_online(&self, i: usize, g: &str, owner: usize, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.group(i, g);
            if s["state"] == "online" && s["owner"] == NAMES[owner] {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "group {g} not online on {} within {timeout:?} (as {} sees it): {s:#}\njournals:\n{}",
                NAMES[owner],
                NAMES[i],
                self.journals_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn journal(&self, i: usize) -> Vec<Value> {
        let path = self.c.node(i).data_dir().join("groups.jsonl");
        json_lines(&std::fs::read_to_string(path).unwrap_or_default())
    }

    fn journals_text(&self) -> String {
        (0..3)
            .flat_map(|i| self.journal(i))
            .map(|r| r.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The order in which node `i`'s run of `g` at `epoch` brought resources to `state`.
    fn resource_order(&self, i: usize, g: &str, epoch: u64, state: &str) -> Vec<String> {
        self.journal(i)
            .iter()
            .filter(|r| {
                r["kind"] == "resource"
                    && r["group"] == g
                    && r["epoch"] == epoch
                    && r["state"] == state
            })
            .filter_map(|r| r["resource"].as_str().map(str::to_owned))
            .collect()
    }

    /// The host of node `i` dies: watchd and its processes are killed, its network is gone.
    fn kill_host(&mut self, i: usize) -> u64 {
        let at = self.c.kill_host(i);
        self.deaths.push((i, at));
        at
    }

    /// The host of node `i` boots again: fresh network state (no leftover address, no state
    /// files of its agents), then watchd.
    fn boot_host(&mut self, i: usize) {
        let ns = self.c.lab.netns(i).to_owned();
        let _ = Command::new("ip")
            .args([
                "-n",
                &ns,
                "addr",
                "del",
                &format!("{}/24", self.vip()),
                "dev",
                "eth0",
            ])
            .output();
        for e in std::fs::read_dir(&self.dir).expect("state dir").flatten() {
            if e.file_name().to_string_lossy().ends_with(&ns) {
                let _ = std::fs::remove_file(e.path());
            }
        }
        self.c.boot_host(i);
    }

    /// Whether node `i`'s interface holds the virtual address.
    fn has_vip(&self, i: usize) -> bool {
        self.c.lab.has_address(i, &format!("{}/24", self.vip()))
    }

    /// The invariants over every node's journal (see [`ftkit_tests::groups`]).
    fn check_invariants(&self, g: &str) {
        let journals: Vec<Vec<Value>> = (0..3).map(|i| self.journal(i)).collect();
        let runs = ftkit_tests::groups::check_invariants(&journals, &self.deaths, g);
        assert!(runs.len() >= 2, "the checker saw runs: {runs:?}");
    }
}

fn set_executable(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
}

fn group_file(name: &str, agent: &Path, dir: &Path, vip: &str, extra: &str) -> String {
    format!(
        r#"
[[group]]
name = "{name}"
preferred_owners = ["a", "b", "c"]
failback = "immediate"
{extra}

[[group.resource]]
name = "{name}-app"
kind = "service"
depends_on = ["{name}-vip"]
properties = {{ service = "app" }}
timeouts = {{ online = "10s", offline = "1s", looks_alive = "300ms", is_alive = "1s" }}

[[group.resource]]
name = "{name}-vip"
kind = "ip"
depends_on = ["{name}-data"]
properties = {{ address = "{vip}/24", interface = "eth0" }}
timeouts = {{ online = "5s", offline = "1s", looks_alive = "300ms", is_alive = "1s" }}

[[group.resource]]
name = "{name}-data"
kind = "exec"
properties = {{ agent = "{agent}", dir = "{dir}" }}
timeouts = {{ online = "5s", offline = "1s", looks_alive = "300ms", is_alive = "1s" }}
"#,
        agent = agent.display(),
        dir = dir.display()
    )
}

#[test]
fn a_group_fails_over_fails_back_moves_and_survives_a_partition() {
    let mut t = Groups::new("grp-main");
    let vip = t.vip();

    // Bad input first: nothing is applied, the errors say why.
    let good = group_file("g", &t.agent, &t.dir, &vip, "");
    let cyclic = good.replace(
        "kind = \"exec\"",
        "kind = \"exec\"\ndepends_on = [\"g-app\"]",
    );
    let path = t.write_file("cyclic.toml", &cyclic);
    let out =
        t.c.node(0)
            .ftctl(&["group", "apply", path.to_str().expect("utf-8")]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("form a cycle") && err.contains("nothing changed"),
        "{err}"
    );
    let unknown = good.replace("kind = \"exec\"", "kind = \"teleporter\"");
    let path = t.write_file("unknown.toml", &unknown);
    let out =
        t.c.node(1)
            .ftctl(&["group", "apply", path.to_str().expect("utf-8")]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("unknown kind \"teleporter\""), "{err}");
    let garbage = t.write_file("garbage.toml", "[[group]]\nname = 3\n");
    let out =
        t.c.node(1)
            .ftctl(&["group", "apply", garbage.to_str().expect("utf-8")]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("garbage.toml") && err.contains("line 2"),
        "{err}"
    );
    assert_eq!(t.c.db(0)["content"]["groups"], serde_json::json!({}));

    // The group comes online on its first preferred owner, in dependency order.
    let path = t.write_file("g.toml", &good);
    let out =
        t.c.node(1)
            .ftctl_ok(&["group", "apply", path.to_str().expect("utf-8")]);
    assert!(out.contains("applied: 5 updates"), "{out}");
    let again =
        t.c.node(2)
            .ftctl_ok(&["group", "apply", path.to_str().expect("utf-8")]);
    assert!(again.contains("nothing to change"), "{again}");
    let s = t.wait_online(1, "g", 0, MOVE);
    let e1 = s["epoch"].as_u64().expect("epoch");
    assert_eq!(
        t.resource_order(0, "g", e1, "online"),
        ["g-data", "g-vip", "g-app"]
    );
    assert!(t.has_vip(0) && !t.has_vip(1));
    let app = std::fs::read_to_string(t.dir.join(format!("app.{}", t.c.lab.netns(0))))
        .expect("the app wrote its epoch");
    assert_eq!(app.trim(), format!("{e1} g"));
    // The owner knows its resources' states; `resource status` lists them.
    let res = json_lines(&t.c.node(0).ftctl_ok(&["resource", "status", "--json"]));
    assert_eq!(res.len(), 3);
    assert!(
        res.iter()
            .all(|r| r["state"] == "online" && r["owner"] == "a"),
        "{res:?}"
    );
    let table = t.c.node(0).ftctl_ok(&["group", "status"]);
    assert!(
        table.contains("GROUP") && table.contains("g-vip"),
        "{table}"
    );

    // The owner host dies: the group moves to the next preferred owner.
    let died = t.kill_host(0);
    let s = t.wait_online(1, "g", 1, MOVE);
    let took = unix_ms() - died;
    println!("failover after the owner host's death: {took} ms (fence wait included)");
    let e2 = s["epoch"].as_u64().expect("epoch");
    assert!(e2 > e1);
    assert_eq!(s["failovers_in_period"], 1, "{s:#}");
    assert!(t.has_vip(1));
    assert_eq!(
        t.resource_order(1, "g", e2, "online"),
        ["g-data", "g-vip", "g-app"]
    );

    // It comes back: immediate failback, gracefully (offline in reverse on b, online on a).
    t.boot_host(0);
    t.c.wait_view(&[0, 1, 2], &[0, 1, 2]);
    let s = t.wait_online(1, "g", 0, MOVE);
    let e3 = s["epoch"].as_u64().expect("epoch");
    let mut order = t.resource_order(1, "g", e2, "offline");
    let forced = t.journal(1).iter().any(|r| {
        r["kind"] == "group"
            && r["epoch"] == e2
            && r["state"] == "offlining"
            && r["detail"]
                .as_str()
                .is_some_and(|d| d.starts_with("by force"))
    });
    if forced {
        // A view change that marks b as joined anew fences its run (before the release is
        // seen): by force, the service and the address at once, then the exec resource.
        let cut = order.len().min(2);
        order[..cut].sort();
    }
    assert_eq!(order, ["g-app", "g-vip", "g-data"]);
    assert_eq!(
        t.resource_order(0, "g", e3, "online"),
        ["g-data", "g-vip", "g-app"]
    );
    assert!(t.has_vip(0) && !t.has_vip(1));

    // An operator moves it.
    let out = t.c.node(1).ftctl_ok(&["group", "move", "g", "--to", "c"]);
    assert!(out.contains("moves to c"), "{out}");
    // Failback is immediate: it returns to a once it is online on c, which may last only a
    // few milliseconds, too short to poll for; c's journal shows the stop there.
    let s = wait_until("the group back on a", MOVE, || {
        let s = t.group(0, "g");
        (s["owner"] == "a" && s["state"] == "online" && s["epoch"].as_u64() > Some(e3)).then_some(s)
    });
    let e5 = s["epoch"].as_u64().expect("epoch");
    let on_c: Vec<u64> = t
        .journal(2)
        .iter()
        .filter(|r| r["kind"] == "group" && r["group"] == "g" && r["state"] == "online")
        .filter_map(|r| r["epoch"].as_u64())
        .filter(|e| *e > e3 && *e < e5)
        .collect();
    assert_eq!(
        on_c.len(),
        1,
        "one run on c between {e3} and {e5}: {on_c:?}"
    );
    assert_eq!(
        t.resource_order(2, "g", on_c[0], "online"),
        ["g-data", "g-vip", "g-app"]
    );

    // The owner is cut off: it stops acting and takes its resources offline; the majority
    // brings the group up on b.
    t.c.lab.cut(0);
    let s = t.wait_online(1, "g", 1, MOVE);
    assert!(s["epoch"].as_u64() > Some(e5));
    // By force: the service and the address at once, then the exec resource.
    wait_until("a took its resources offline", MOVE, || {
        let mut order = t.resource_order(0, "g", e5, "offline");
        let cut = order.len().min(2);
        order[..cut].sort();
        (!t.has_vip(0) && order == ["g-app", "g-vip", "g-data"]).then_some(())
    });
    t.c.lab.heal(0);
    t.c.wait_view(&[0, 1, 2], &[0, 1, 2]);
    t.wait_online(1, "g", 0, MOVE);

    t.check_invariants("g");
}

#[test]
fn pause_drains_a_hanging_agent_gives_up_and_the_cluster_keeps_working() {
    let t = Groups::new("grp-ops");
    let agent = t.agent.display().to_string();
    let dir = t.dir.display().to_string();
    let file = format!(
        r#"
[[group]]
name = "h"
preferred_owners = ["a", "b", "c"]

[[group.resource]]
name = "h-data"
kind = "exec"
properties = {{ agent = "{agent}", dir = "{dir}" }}
timeouts = {{ online = "5s", offline = "1s", looks_alive = "300ms" }}

[[group]]
name = "stuck"
preferred_owners = ["c", "b", "a"]
failover_threshold = 1

[[group.resource]]
name = "stuck-data"
kind = "exec"
properties = {{ agent = "{agent}", dir = "{dir}", hang = "1" }}
timeouts = {{ online = "1s", offline = "1s" }}

[[group]]
name = "lone"
preferred_owners = ["a"]

[[group.resource]]
name = "lone-data"
kind = "exec"
properties = {{ agent = "{agent}", dir = "{dir}", fail_once = "1" }}
timeouts = {{ online = "5s", offline = "1s" }}
"#
    );
    let path = t.write_file("ops.toml", &file);
    t.c.node(0)
        .ftctl_ok(&["group", "apply", path.to_str().expect("utf-8")]);
    t.wait_online(0, "h", 0, MOVE);

    // A group that fails on its only possible owner is tried there again (a failover in
    // place), not left failed.
    t.wait_online(0, "lone", 0, MOVE);
    let runs: Vec<(String, u64)> = t
        .journal(0)
        .into_iter()
        .filter(|r| r["kind"] == "group" && r["group"] == "lone")
        .filter(|r| r["state"] == "failed" || r["state"] == "online")
        .filter_map(|r| Some((r["state"].as_str()?.to_owned(), r["epoch"].as_u64()?)))
        .collect();
    match runs.as_slice() {
        [(failed, e1), .., (online, e2)] if failed == "failed" && online == "online" => {
            assert!(e2 > e1, "{runs:?}");
        }
        _ => panic!("expected a failed run, then an online one, on a: {runs:?}"),
    }
    assert!(
        t.journal(0).iter().any(|r| r["kind"] == "ownership"
            && r["group"] == "lone"
            && r["detail"]
                .as_str()
                .is_some_and(|d| d.contains("no other possible owner: a tries again"))),
        "{}",
        t.journals_text()
    );

    // Pausing the owner drains its group to the next preferred owner.
    let out = t.c.node(0).ftctl_ok(&["node", "pause", "a"]);
    assert!(out.contains("pause"), "{out}");
    t.wait_online(0, "h", 1, MOVE);
    assert!(!t.dir.join(format!("h-data.{}", t.c.lab.netns(0))).exists());
    t.c.node(0).ftctl_ok(&["node", "resume", "a"]);

    // The hanging agent fails on c, then on b; one failover is the threshold: given up.
    let s = wait_until("the stuck group given up", MOVE, || {
        let s = t.group(1, "stuck");
        (s["state"] == "failed" && s["owner"].is_null()).then_some(s)
    });
    assert!(
        s["reason"]
            .as_str()
            .is_some_and(|r| r.contains("giving up")),
        "{s:#}"
    );
    let tried: BTreeMap<String, u64> = (0..3)
        .flat_map(|i| t.journal(i))
        .filter(|r| r["kind"] == "group" && r["group"] == "stuck" && r["state"] == "failed")
        .filter_map(|r| Some((r["node"].as_str()?.to_owned(), r["epoch"].as_u64()?)))
        .collect();
    assert!(
        tried.contains_key("c") && tried.contains_key("b"),
        "{tried:?}"
    );
    // No agent of it is left hanging anywhere: each timed-out start was killed.
    wait_until("no hanging agent left", SETTLE, || {
        let hanging: Vec<u32> = (0..3)
            .flat_map(|i| pids_in_netns(t.c.lab.netns(i)))
            .filter(|pid| {
                std::fs::read(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|c| c == b"sleep\x001000\x00")
            })
            .collect();
        hanging.is_empty().then_some(())
    });
    // The cluster keeps working: updates commit, the other group is untouched.
    let out =
        t.c.node(2)
            .ftctl_ok(&["cluster", "set", "still", "working"]);
    assert!(out.contains("committed"), "{out}");
    t.wait_online(2, "h", 1, SETTLE);
    // An operator's retry clears the history: it is tried again (and fails again).
    t.c.node(0).ftctl_ok(&["group", "online", "stuck"]);
    wait_until("the retry", MOVE, || {
        let s = t.group(0, "stuck");
        (s["epoch"].as_u64() > Some(3)).then_some(())
    });
}
