//! Stopping: SIGTERM, then SIGKILL when the grace runs out; and the whole process tree goes,
//! by cgroup or by process group.

use std::time::{Duration, Instant};

use ftkit_tests::{
    Watchd, binary, cgroup_of, parent_of, pid_alive, q, session_of, wait_gone, wait_until,
};

/// Grace configured for the stubborn service.
const GRACE: Duration = Duration::from_millis(300);

#[test]
fn stop_escalates_to_sigkill_after_the_grace() {
    let services = format!(
        "[[service]]\nname = \"stubborn\"\ncommand = {}\nstop = {{ grace = \"300ms\" }}\n",
        q(binary("stubborn"))
    );
    let w = Watchd::start("stopkill", &services);
    let pid = w.wait_running("stubborn");
    wait_until(
        "stubborn to install its handler",
        Duration::from_secs(5),
        || {
            w.service_log("stubborn")
                .contains("SIGTERM will be ignored")
                .then_some(())
        },
    );
    let seq = w.last_seq();
    let t0 = Instant::now();
    w.ftctl_ok(&["stop", "stubborn"]);
    wait_gone(pid, Duration::from_secs(5));
    let took = t0.elapsed();
    w.wait_state("stubborn", "stopped", Duration::from_secs(5));

    // It got SIGTERM and ignored it; only the SIGKILL after the grace ended it.
    wait_until(
        "stubborn to log the SIGTERM",
        Duration::from_secs(2),
        || {
            w.service_log("stubborn")
                .contains("got SIGTERM, ignoring it")
                .then_some(())
        },
    );
    assert!(
        took >= GRACE.mul_f64(0.8),
        "stubborn was gone after {took:?}, before its grace of {GRACE:?}"
    );
    assert!(
        took <= GRACE + Duration::from_millis(1500),
        "stubborn was gone only after {took:?} (grace {GRACE:?})"
    );
    let stopping = w.wait_event_after(seq, "stubborn", "stopping", Duration::from_secs(2));
    let killed = w.wait_event_after(seq, "stubborn", "killed", Duration::from_secs(2));
    let gap = killed["time_ms"].as_u64().unwrap_or(0) - stopping["time_ms"].as_u64().unwrap_or(0);
    assert!(
        (240..=1500).contains(&gap),
        "SIGKILL came {gap} ms after SIGTERM (grace 300 ms)"
    );
    // A stopped service stays stopped.
    std::thread::sleep(Duration::from_millis(300));
    let s = w.service("stubborn");
    assert_eq!(s["state"], "stopped", "{s}");
    assert!(s["pid"].is_null(), "{s}");
}

/// Starts a forker service, returns (main pid, grandchild pid) after checking both run.
fn forker_tree(w: &Watchd, name: &str) -> (u32, u32) {
    let main = w.wait_running(name);
    let (logged_main, grandchild) =
        wait_until("forker to print its pids", Duration::from_secs(5), || {
            let log = w.service_log(name);
            let line = log.lines().find(|l| l.contains("main="))?;
            let field = |key: &str| -> Option<u32> {
                let rest = &line[line.find(key)? + key.len()..];
                rest.split_whitespace().next()?.parse().ok()
            };
            Some((field("main=")?, field("grandchild=")?))
        });
    w.track_pid(grandchild);
    assert_eq!(logged_main, main, "status pid and forker's own pid differ");
    assert!(pid_alive(main) && pid_alive(grandchild));
    (main, grandchild)
}

fn forker_services(name: &str, mode: &str) -> String {
    format!(
        "[[service]]\nname = {}\ncommand = {}\nargs = [\"--mode\", {}]\nstop = {{ grace = \"2s\" }}\n",
        q(name),
        q(binary("forker")),
        q(mode)
    )
}

fn stop_kills_the_tree(label: &str, settings: &str, mode: &str, expect_cgroup: bool) {
    let w = Watchd::start_with(label, settings, &forker_services("tree", mode));
    let (main, grandchild) = forker_tree(&w, "tree");
    let s = w.service("tree");
    assert_eq!(
        s["cgroup"], expect_cgroup,
        "cgroup confinement is not as configured: {s}"
    );
    if expect_cgroup {
        let cg = cgroup_of(grandchild).unwrap_or_default();
        assert!(
            cg.ends_with("/tree") && cg.contains("/ftkit-"),
            "grandchild {grandchild} is not in the service's cgroup: {cg}"
        );
    }
    if mode != "plain" {
        assert_ne!(
            session_of(grandchild),
            session_of(main),
            "the grandchild should have its own session"
        );
    }
    if mode == "orphan" {
        assert_ne!(
            parent_of(grandchild),
            Some(main),
            "the orphan should not be forker's child"
        );
    }
    w.ftctl_ok(&["stop", "tree"]);
    wait_gone(main, Duration::from_secs(5));
    wait_gone(grandchild, Duration::from_secs(5));
    w.wait_state("tree", "stopped", Duration::from_secs(5));
}

#[test]
fn stop_kills_main_and_grandchild_with_cgroups() {
    stop_kills_the_tree("tree-cg", "", "plain", true);
}

#[test]
fn stop_kills_main_and_grandchild_by_process_group() {
    stop_kills_the_tree("tree-pg", "cgroups = false", "plain", false);
}

#[test]
fn stop_kills_a_setsid_grandchild_with_cgroups() {
    stop_kills_the_tree("tree-setsid", "", "setsid", true);
}

#[test]
fn stop_kills_a_daemonized_orphan_with_cgroups() {
    stop_kills_the_tree("tree-orphan", "", "orphan", true);
}

/// When the main process dies, what remains of its tree is killed too (cgroup mode catches
/// even a grandchild in its own session).
#[test]
fn crash_of_main_kills_the_rest_of_the_tree() {
    let w = Watchd::start("tree-crash", &forker_services("tree", "setsid"));
    let (main, grandchild) = forker_tree(&w, "tree");
    ftkit_tests::signal(main, nix::sys::signal::Signal::SIGKILL);
    wait_gone(grandchild, Duration::from_secs(5));
    let new_main = w.wait_new_pid("tree", main, Duration::from_secs(5));
    assert!(pid_alive(new_main));
}
