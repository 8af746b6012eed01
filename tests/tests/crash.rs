//! Crash detection: a supervised process killed with SIGKILL is restarted at once.

use std::time::Duration;

use ftkit_tests::{Watchd, binary, pid_alive, q, signal, wait_gone};
use nix::sys::signal::Signal;

#[test]
fn kill9_of_a_service_restarts_it() {
    let services = format!(
        "[[service]]\nname = \"sleeper\"\ncommand = {}\nargs = [\"1000\"]\n",
        q("/bin/sleep")
    );
    let w = Watchd::start("crash", &services);
    let old = w.wait_running("sleeper");
    assert!(pid_alive(old), "status names pid {old}, which is not alive");
    let before = w.service("sleeper");
    assert_eq!(before["restarts"], 0, "{before}");

    signal(old, Signal::SIGKILL);
    let new = w.wait_new_pid("sleeper", old, Duration::from_secs(5));
    wait_gone(old, Duration::from_secs(2));
    assert!(pid_alive(new), "new pid {new} is not alive");

    let after = w.service("sleeper");
    assert_eq!(after["state"], "running", "{after}");
    assert_eq!(after["restarts"], 1, "{after}");
    assert_eq!(after["last_exit"]["signal"], 9, "{after}");

    let events = w.events_of("sleeper");
    let kinds: Vec<&str> = events.iter().filter_map(|e| e["kind"].as_str()).collect();
    let exited = kinds
        .iter()
        .position(|k| *k == "exited")
        .unwrap_or_else(|| panic!("no exited event: {kinds:?}"));
    let respawned = kinds
        .iter()
        .skip(exited)
        .position(|k| *k == "spawned")
        .unwrap_or_else(|| panic!("no spawned event after exited: {kinds:?}"));
    assert!(respawned > 0);
    let exited_detail = events[exited]["detail"].as_str().unwrap_or_default();
    assert!(
        exited_detail.contains(&old.to_string()),
        "exited event should name pid {old}: {exited_detail}"
    );
    // The binary the harness found is the one under test.
    assert!(binary("watchd").is_file());
}
