//! Resource agents against the real world: `exec` agents as shell scripts (good, hanging,
//! garbage-printing, not running, missing) and the `ip` resource in network namespaces, where a
//! third node must reach the virtual address and follow it (by gratuitous ARP) when it moves.

use std::collections::BTreeMap;
use std::os::fd::AsFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use ftkit_tests::netns::Lab;
use ftkit_tests::{pid_alive, wait_gone, wait_until};
use serde_json::Value;
use watchd::group::resource::OUTPUT_TAIL;
use watchd::group::{Action, Health, Resource, ResourceError, Timeouts};

/// Bounds for agents that behave: generous for a loaded 2-core machine.
const RELAXED: Timeouts = Timeouts {
    online: Duration::from_secs(10),
    offline: Duration::from_secs(10),
    looks_alive: Duration::from_secs(10),
    is_alive: Duration::from_secs(10),
};
/// Bounds for agents that hang.
const TIGHT: Timeouts = Timeouts {
    online: Duration::from_millis(400),
    offline: Duration::from_millis(400),
    looks_alive: Duration::from_millis(400),
    is_alive: Duration::from_millis(400),
};
/// How much later than its timeout a cut-off call may return on a loaded machine.
const SLACK: Duration = Duration::from_secs(2);

fn props(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// Writes an executable shell script.
fn agent(dir: &Path, name: &str, body: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).expect("write agent");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    path
}

fn exec_resource(name: &str, agent: &Path, extra: &[(&str, &str)], timeouts: Timeouts) -> Resource {
    let mut properties = props(extra);
    properties.insert("agent".into(), agent.display().to_string());
    Resource::from_properties(name, "exec", &properties, timeouts).expect("valid exec resource")
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn read_pid(path: &Path) -> u32 {
    wait_until(&format!("{} to be written", path.display()), SLACK, || {
        std::fs::read_to_string(path).ok()?.trim().parse().ok()
    })
}

#[test]
fn a_good_agent_round_trips_with_the_ocf_environment() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    let script = agent(
        dir.path(),
        "good",
        r#"state="$OCF_RESKEY_state"
case "$1" in
start) echo "$FT_EPOCH $OCF_RESOURCE_INSTANCE $OCF_RESKEY_color $OCF_RA_VERSION_MAJOR" > "$state"; exit 0 ;;
stop) rm -f "$state"; exit 0 ;;
monitor) [ -f "$state" ] || exit 7; echo "$OCF_CHECK_LEVEL" >> "$state.levels"; exit 0 ;;
*) exit 3 ;;
esac"#,
    );
    let state_text = state.display().to_string();
    let r = exec_resource(
        "web",
        &script,
        &[("state", &state_text), ("color", "blue")],
        RELAXED,
    );
    let rt = runtime();
    rt.block_on(async {
        assert_eq!(r.looks_alive().await.expect("monitor"), Health::Offline);
        r.online(42).await.expect("start");
        assert_eq!(
            std::fs::read_to_string(&state).expect("state file"),
            "42 web blue 1\n"
        );
        assert_eq!(r.looks_alive().await.expect("monitor"), Health::Online);
        assert_eq!(r.is_alive().await.expect("monitor"), Health::Online);
        assert_eq!(
            std::fs::read_to_string(dir.path().join("state.levels")).expect("levels"),
            "0\n20\n"
        );
        r.offline().await.expect("stop");
        assert!(!state.exists());
        // Stop is idempotent.
        r.offline().await.expect("second stop");
        assert_eq!(r.looks_alive().await.expect("monitor"), Health::Offline);
    });
}

#[test]
fn a_hanging_agent_is_killed_at_its_timeout_with_its_whole_group() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().display();
    let script = agent(
        dir.path(),
        "hang",
        &format!(
            r#"case "$1" in
stop) exit 0 ;;
esac
sleep 300 &
echo $! > {d}/bg.tmp && mv {d}/bg.tmp {d}/bg.$1
echo $$ > {d}/pid.tmp && mv {d}/pid.tmp {d}/pid.$1
echo "stuck in $1" >&2
exec sleep 300"#
        ),
    );
    let r = exec_resource("stuck", &script, &[], TIGHT);
    let rt = runtime();
    for (action, call) in [(Action::Online, "start"), (Action::LooksAlive, "monitor")] {
        let started = Instant::now();
        let err = rt
            .block_on(async {
                match action {
                    Action::Online => r.online(1).await.map(|()| Health::Online),
                    _ => r.looks_alive().await,
                }
            })
            .expect_err("the agent hangs");
        let took = started.elapsed();
        assert!(
            took >= TIGHT.of(action) && took < TIGHT.of(action) + SLACK,
            "{call}: {took:?}"
        );
        match &err {
            ResourceError::Timeout {
                action: a, output, ..
            } => {
                assert_eq!(*a, action);
                assert_eq!(output, &format!("stuck in {call}"));
            }
            other => panic!("{call}: {other:?}"),
        }
        assert!(
            err.to_string()
                .starts_with(&format!("{action} timed out after 400ms")),
            "{err}"
        );
        // The agent and the child it left in the background are both gone.
        let leader = read_pid(&dir.path().join(format!("pid.{call}")));
        let background = read_pid(&dir.path().join(format!("bg.{call}")));
        wait_gone(leader, SLACK);
        wait_gone(background, SLACK);
    }
    // This process is unharmed, and the resource still answers.
    rt.block_on(r.offline()).expect("stop answers at once");
    assert!(pid_alive(std::process::id()));
}

#[test]
fn garbage_and_megabytes_of_output_are_bounded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let script = agent(
        dir.path(),
        "noisy",
        r#"head -c 3000000 /dev/urandom
head -c 3000000 /dev/urandom >&2
case "$1" in
monitor) exit 0 ;;
start) printf '\033[31m\001the real reason\n' >&2; exit 1 ;;
*) exit 0 ;;
esac"#,
    );
    let r = exec_resource("noisy", &script, &[], RELAXED);
    let rt = runtime();
    assert_eq!(
        rt.block_on(r.looks_alive()).expect("garbage is ignored"),
        Health::Online
    );
    let err = rt.block_on(r.online(1)).expect_err("start fails");
    let text = err.to_string();
    assert!(
        text.starts_with(&format!(
            "agent {} start failed with exit code 1 (OCF_ERR_GENERIC: generic error): ...",
            script.display()
        )),
        "{}",
        &text[..text.len().min(300)]
    );
    assert!(text.ends_with("\\u{1b}[31m\\u{1}the real reason"), "{text}");
    // Escaping may grow the kept tail, but never beyond a small multiple of it.
    assert!(text.len() < 12 * OUTPUT_TAIL, "{} bytes", text.len());
    assert!(!text.chars().any(char::is_control));
}

#[test]
fn exit_codes_become_states_and_clear_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let script = agent(
        dir.path(),
        "stopped",
        r#"case "$1" in
monitor) exit 7 ;;
stop) exit 7 ;;
start) echo "missing config file" >&2; exit 6 ;;
esac"#,
    );
    let r = exec_resource("db", &script, &[], RELAXED);
    let rt = runtime();
    assert_eq!(
        rt.block_on(r.looks_alive()).expect("monitor"),
        Health::Offline
    );
    assert_eq!(rt.block_on(r.is_alive()).expect("monitor"), Health::Offline);
    rt.block_on(r.offline())
        .expect("stop of a stopped resource succeeds");
    let err = rt.block_on(r.online(3)).expect_err("not configured");
    assert_eq!(
        err.to_string(),
        format!(
            "agent {} start failed with exit code 6 (OCF_ERR_CONFIGURED: not configured): missing config file",
            script.display()
        )
    );

    let failing = agent(dir.path(), "failing", "exit 1");
    let r = exec_resource("db2", &failing, &[], RELAXED);
    let err = rt.block_on(r.is_alive()).expect_err("monitor failed");
    assert!(
        err.to_string()
            .contains("monitor failed with exit code 1 (OCF_ERR_GENERIC"),
        "{err}"
    );
    assert!(matches!(Health::of(Err(err)), Health::Failed(_)));
}

#[test]
fn a_missing_or_unrunnable_agent_is_a_clear_error() {
    let rt = runtime();
    let r = exec_resource("ghost", Path::new("/nonexistent/ftkit-agent"), &[], RELAXED);
    let err = rt.block_on(r.online(1)).expect_err("no agent");
    assert_eq!(
        err.to_string(),
        "cannot run /nonexistent/ftkit-agent: No such file or directory (os error 2)"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let plain = dir.path().join("plain");
    std::fs::write(&plain, "#!/bin/sh\nexit 0\n").expect("write");
    let r = exec_resource("plain", &plain, &[], RELAXED);
    let err = rt.block_on(r.looks_alive()).expect_err("not executable");
    assert!(err.to_string().contains("Permission denied"), "{err}");

    let err =
        Resource::from_properties("x", "exec", &props(&[("agent", "relative/agent")]), RELAXED)
            .expect_err("relative");
    assert_eq!(
        err.to_string(),
        "property `agent`: `relative/agent` is not an absolute path"
    );
}

// ---- ip ----

/// Runs `work` on a thread inside node `i`'s network namespace, on a runtime of its own: every
/// command and socket the resource creates there belongs to that namespace.
fn on_node<T: Send>(lab: &Lab, i: usize, work: impl Future<Output = T> + Send) -> T {
    let path = format!("/run/netns/{}", lab.netns(i));
    std::thread::scope(|s| {
        s.spawn(move || {
            let ns = std::fs::File::open(&path).expect("open the namespace");
            nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                .expect("enter the namespace");
            runtime().block_on(work)
        })
        .join()
        .expect("node thread")
    })
}

/// `ip -n NS ARGS...`'s stdout, panicking when it fails.
fn ip_in(lab: &Lab, i: usize, args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(["-n", lab.netns(i)])
        .args(args)
        .output()
        .expect("run ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

fn mac_of(lab: &Lab, i: usize) -> String {
    let links: Value =
        serde_json::from_str(&ip_in(lab, i, &["-j", "link", "show", "eth0"])).expect("ip json");
    links[0]["address"].as_str().expect("a MAC").to_owned()
}

/// Node `i`'s neighbour entry for `addr`: its MAC, if it has one.
fn neighbour(lab: &Lab, i: usize, addr: &str) -> Option<String> {
    let entries: Value = serde_json::from_str(&ip_in(
        lab,
        i,
        &["-j", "neigh", "show", addr, "dev", "eth0"],
    ))
    .expect("ip json");
    entries[0]["lladdr"].as_str().map(str::to_owned)
}

fn has_address(lab: &Lab, i: usize, addr: &str) -> bool {
    ip_in(lab, i, &["addr", "show", "dev", "eth0"]).contains(&format!(" {addr}/"))
}

fn ping(lab: &Lab, from: usize, to: &str) -> bool {
    let mut cmd = Command::new("ping");
    cmd.args(["-c", "1", "-W", "1", to]);
    lab.enter(from, &mut cmd);
    cmd.output().expect("run ping").status.success()
}

#[test]
fn a_virtual_address_is_reachable_and_neighbours_follow_it_when_it_moves() {
    // Nodes 0 and 1 own the address in turn; node 2 is a client.
    let lab = Lab::new(3);
    let o = lab.addr(0).octets();
    let vip = format!("{}.{}.{}.100", o[0], o[1], o[2]);
    let properties = props(&[("address", &format!("{vip}/24")), ("interface", "eth0")]);
    let r0 = Resource::from_properties("vip", "ip", &properties, RELAXED).expect("valid");
    let r1 = Resource::from_properties("vip", "ip", &properties, RELAXED).expect("valid");
    let (mac0, mac1) = (mac_of(&lab, 0), mac_of(&lab, 1));
    let stale = "02:00:5e:00:00:01";
    assert!(mac0 != stale && mac1 != stale);

    assert_eq!(
        on_node(&lab, 0, r0.looks_alive()).expect("check"),
        Health::Offline
    );
    // The client believes (stale) that the address is somewhere else.
    ip_in(
        &lab,
        2,
        &[
            "neigh", "replace", &vip, "lladdr", stale, "dev", "eth0", "nud", "stale",
        ],
    );
    on_node(&lab, 0, r0.online(1)).expect("online on node 0");
    assert!(has_address(&lab, 0, &vip));
    wait_until("the client to learn node 0's MAC", SLACK, || {
        (neighbour(&lab, 2, &vip).as_deref() == Some(mac0.as_str())).then_some(())
    });
    assert!(ping(&lab, 2, &vip), "the address does not answer");
    let (looks, is) = on_node(&lab, 0, async {
        (r0.looks_alive().await, r0.is_alive().await)
    });
    assert_eq!(looks.expect("check"), Health::Online);
    assert_eq!(is.expect("check"), Health::Online);
    // Online again changes nothing.
    on_node(&lab, 0, r0.online(1)).expect("online is idempotent");

    // Move: offline on node 0, online on node 1; the client follows by gratuitous ARP alone.
    on_node(&lab, 0, r0.offline()).expect("offline on node 0");
    assert!(!has_address(&lab, 0, &vip));
    on_node(&lab, 0, r0.offline()).expect("offline is idempotent");
    assert_eq!(
        on_node(&lab, 0, r0.looks_alive()).expect("check"),
        Health::Offline
    );
    assert_eq!(neighbour(&lab, 2, &vip).as_deref(), Some(mac0.as_str()));
    on_node(&lab, 1, r1.online(2)).expect("online on node 1");
    wait_until("the client to learn node 1's MAC", SLACK, || {
        (neighbour(&lab, 2, &vip).as_deref() == Some(mac1.as_str())).then_some(())
    });
    assert!(ping(&lab, 2, &vip), "the moved address does not answer");

    // Cut off its network, the address is still there but no longer alive.
    lab.cut(1);
    let (looks, is) = on_node(&lab, 1, async {
        (r1.looks_alive().await, r1.is_alive().await)
    });
    assert_eq!(looks.expect("check"), Health::Online);
    assert_eq!(
        is.expect("check"),
        Health::Failed("interface eth0 has no carrier".into())
    );
    lab.heal(1);
    on_node(&lab, 1, r1.offline()).expect("offline on node 1");
    assert!(!has_address(&lab, 1, &vip));
    assert!(!ping(&lab, 2, &vip), "the address answers after offline");
}

#[test]
fn an_interface_carrying_hundreds_of_addresses_is_read_whole() {
    // The addresses of such an interface come in several netlink messages (and were once far
    // longer than an agent's kept output as `ip -j` JSON): the resource must read them all.
    let lab = Lab::new(1);
    let batch: String = (0..300)
        .map(|i| format!("addr add 10.251.{}.{}/32 dev eth0\n", i / 200, 1 + i % 200))
        .collect();
    let file = std::env::temp_dir().join(ftkit_tests::unique("ip-batch"));
    std::fs::write(&file, batch).expect("batch file");
    let added = Command::new("ip")
        .args(["-n", lab.netns(0), "-batch"])
        .arg(&file)
        .status();
    let _ = std::fs::remove_file(&file);
    assert!(added.expect("ip -batch runs").success());
    let r = Resource::from_properties(
        "vip",
        "ip",
        &props(&[("address", "10.252.0.1/24"), ("interface", "eth0")]),
        RELAXED,
    )
    .expect("valid properties");
    assert_eq!(
        on_node(&lab, 0, r.looks_alive()).expect("check"),
        Health::Offline
    );
    on_node(&lab, 0, r.online(1)).expect("online");
    assert_eq!(
        on_node(&lab, 0, r.is_alive()).expect("check"),
        Health::Online
    );
    on_node(&lab, 0, r.offline()).expect("offline");
    assert!(!has_address(&lab, 0, "10.252.0.1"));
}

/// An offline that cannot finish within its bound (1 ms, on a runtime too busy to take the
/// answers to its requests in time) is an error, and the address still goes away, in the
/// background: a forced stop on a busy host must not leave a group's address behind. An online
/// of the address cancels such a removal.
#[test]
fn an_address_an_overrun_offline_left_is_removed_in_the_background() {
    // Netlink answers within a millisecond on an idle host: what overruns is a runtime that
    // cannot poll in time. Each request needs a poll of its own after it is sent, so a stall
    // after the first poll puts every offline past its bound.
    const STALL: Duration = Duration::from_millis(20);
    let lab = Lab::new(1);
    let o = lab.addr(0).octets();
    let vip = format!("{}.{}.{}.101", o[0], o[1], o[2]);
    let properties = props(&[("address", &format!("{vip}/24")), ("interface", "eth0")]);
    let hasty = Timeouts {
        offline: Duration::from_millis(1),
        ..RELAXED
    };
    let r = Resource::from_properties("vip", "ip", &properties, RELAXED).expect("valid");
    let r_hasty = Resource::from_properties("vip", "ip", &properties, hasty).expect("valid");
    // The background removal lives on the node's runtime: the checks run inside it.
    on_node(&lab, 0, async {
        r.online(1).await.expect("online");
        assert!(has_address(&lab, 0, &vip));
        stall_runtime(STALL);
        let err = r_hasty
            .offline()
            .await
            .expect_err("the answers come after the bound");
        assert!(err.to_string().contains("timed out"), "{err}");
        let end = Instant::now() + Duration::from_secs(10);
        while has_address(&lab, 0, &vip) {
            assert!(
                Instant::now() < end,
                "the address is still there after 10 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        // Again, and an online comes first: the address stays.
        r.online(2).await.expect("online");
        stall_runtime(STALL);
        r_hasty
            .offline()
            .await
            .expect_err("the answers come after the bound");
        r.online(3).await.expect("online again");
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(
            has_address(&lab, 0, &vip),
            "a removal left from before took the address of a later online"
        );
        r.offline().await.expect("offline");
    });
    assert!(!has_address(&lab, 0, &vip));
}

/// Blocks the current (current-thread) runtime for `how_long` as soon as the caller first waits:
/// a host too loaded to run a call's task in time.
fn stall_runtime(how_long: Duration) {
    tokio::spawn(async move { std::thread::sleep(how_long) });
}

#[test]
fn an_unknown_interface_fails_online_but_not_offline() {
    let lab = Lab::new(1);
    let r = Resource::from_properties(
        "vip",
        "ip",
        &props(&[("address", "10.250.0.1/24"), ("interface", "nosuch0")]),
        RELAXED,
    )
    .expect("valid properties");
    let err = on_node(&lab, 0, r.online(1)).expect_err("no such interface");
    assert_eq!(
        err.to_string(),
        "network interface `nosuch0` does not exist"
    );
    assert_eq!(
        on_node(&lab, 0, r.looks_alive()).expect("check"),
        Health::Offline
    );
    on_node(&lab, 0, r.offline()).expect("nothing to remove");
}

/// An address someone else put there (with another prefix) is taken as online, and offline
/// removes it with the prefix it has, leaving the interface's other addresses alone.
#[test]
fn an_address_already_there_is_taken_and_removed_alone() {
    let lab = Lab::new(1);
    let o = lab.addr(0).octets();
    let (vip, other) = (
        format!("{}.{}.{}.103", o[0], o[1], o[2]),
        format!("{}.{}.{}.104", o[0], o[1], o[2]),
    );
    ip_in(
        &lab,
        0,
        &["addr", "add", &format!("{vip}/32"), "dev", "eth0"],
    );
    ip_in(
        &lab,
        0,
        &["addr", "add", &format!("{other}/24"), "dev", "eth0"],
    );
    let properties = props(&[("address", &format!("{vip}/24")), ("interface", "eth0")]);
    let r = Resource::from_properties("vip", "ip", &properties, RELAXED).expect("valid");
    on_node(&lab, 0, async {
        assert_eq!(r.looks_alive().await.expect("check"), Health::Online);
        r.online(1).await.expect("online of a present address");
        assert_eq!(r.is_alive().await.expect("check"), Health::Online);
        r.offline().await.expect("offline");
        assert_eq!(r.looks_alive().await.expect("check"), Health::Offline);
    });
    let left = ip_in(&lab, 0, &["addr", "show", "dev", "eth0"]);
    assert!(!left.contains(&format!(" {vip}/")), "{left}");
    assert!(left.contains(&format!(" {other}/24 ")), "{left}");
    assert!(left.contains(&format!(" {}/", lab.addr(0))), "{left}");
}

#[test]
fn an_ipv6_address_comes_and_goes() {
    let lab = Lab::new(2);
    let o = lab.addr(0).octets();
    let vip = format!("fd00:{:x}::100", o[1]);
    let properties = props(&[("address", &format!("{vip}/64")), ("interface", "eth0")]);
    let r = Resource::from_properties("vip6", "ip", &properties, RELAXED).expect("valid");
    ip_in(
        &lab,
        1,
        &[
            "addr",
            "add",
            &format!("fd00:{:x}::2/64", o[1]),
            "dev",
            "eth0",
            "nodad",
        ],
    );
    on_node(&lab, 0, r.online(1)).expect("online");
    assert!(has_address(&lab, 0, &vip));
    // Online at once: added with `nodad`, it is never tentative.
    assert_eq!(
        on_node(&lab, 0, r.is_alive()).expect("check"),
        Health::Online
    );
    wait_until("the v6 address to answer", SLACK * 2, || {
        ping(&lab, 1, &vip).then_some(())
    });
    on_node(&lab, 0, r.offline()).expect("offline");
    assert!(!has_address(&lab, 0, &vip));
}

/// What one call of the `ip` resource costs (median and worst of a few rounds), for a person
/// comparing implementations: `cargo nextest run -p ftkit-tests --run-ignored only -E
/// 'test(ip_resource_call_times)' --no-capture`. Not a timed test: it asserts nothing of speed.
#[test]
#[ignore = "a measurement, not a check"]
fn ip_resource_call_times() {
    const ROUNDS: usize = 30;
    let lab = Lab::new(1);
    let o = lab.addr(0).octets();
    let vip = format!("{}.{}.{}.102", o[0], o[1], o[2]);
    let properties = props(&[("address", &format!("{vip}/24")), ("interface", "eth0")]);
    let r = Resource::from_properties("vip", "ip", &properties, RELAXED).expect("valid");
    let mut times: BTreeMap<&str, Vec<Duration>> = BTreeMap::new();
    on_node(&lab, 0, async {
        for _ in 0..ROUNDS {
            let started = Instant::now();
            r.online(1).await.expect("online");
            times.entry("online").or_default().push(started.elapsed());
            let started = Instant::now();
            assert_eq!(r.looks_alive().await.expect("check"), Health::Online);
            times
                .entry("looks_alive")
                .or_default()
                .push(started.elapsed());
            let started = Instant::now();
            assert_eq!(r.is_alive().await.expect("check"), Health::Online);
            times.entry("is_alive").or_default().push(started.elapsed());
            let started = Instant::now();
            r.offline().await.expect("offline");
            times.entry("offline").or_default().push(started.elapsed());
        }
    });
    for (call, mut took) in times {
        took.sort();
        println!(
            "{call:<12} median {:>10?}  worst {:>10?}  ({ROUNDS} rounds)",
            took[took.len() / 2],
            took[took.len() - 1]
        );
    }
}
