//! Rejuvenation: proactive restarts when memory passes a limit or on a schedule.

use std::time::Duration;

use ftkit_tests::{Watchd, binary, pid_alive, q, wait_gone};

#[test]
fn memory_limit_rejuvenates() {
    let services = format!(
        "[[service]]\nname = \"hog\"\ncommand = {}\nargs = [\"--mb\", \"20\", \"--every-ms\", \"300\"]\n\
         rejuvenate = {{ max_rss = \"50MiB\", check_every = \"100ms\" }}\n",
        q(binary("memhog"))
    );
    let w = Watchd::start("rejuv-rss", &services);
    let old = w.wait_running("hog");
    let ev = w.wait_event("hog", "rejuvenate", Duration::from_secs(10));
    assert!(
        ev["detail"].as_str().unwrap_or_default().contains("memory"),
        "{ev}"
    );
    // It held at least 40 MiB when it was restarted (50 MiB limit, 20 MiB steps).
    let log = w.service_log("hog");
    assert!(log.contains("holding 40 MiB"), "{log}");
    wait_gone(old, Duration::from_secs(5));
    let new = w.wait_new_pid("hog", old, Duration::from_secs(5));
    assert!(pid_alive(new));
}

#[test]
fn schedule_rejuvenates_after_every() {
    let services = format!(
        "[[service]]\nname = \"aging\"\ncommand = {}\nargs = [\"1000\"]\n\
         rejuvenate = {{ every = \"1s\" }}\n",
        q("/bin/sleep")
    );
    let w = Watchd::start("rejuv-every", &services);
    let old = w.wait_running("aging");
    let new = w.wait_new_pid("aging", old, Duration::from_secs(6));
    wait_gone(old, Duration::from_secs(3));
    assert!(pid_alive(new));
    // Measured on watchd's own clock: from the first spawn to the rejuvenation verdict.
    let spawned = w.wait_event("aging", "spawned", Duration::from_secs(1));
    let rejuvenate = w.wait_event("aging", "rejuvenate", Duration::from_secs(1));
    let took =
        rejuvenate["time_ms"].as_u64().unwrap_or(0) - spawned["time_ms"].as_u64().unwrap_or(0);
    assert!(
        took >= 950,
        "rejuvenated {took} ms after the spawn, before `every = 1s`"
    );
    assert!(took <= 3000, "rejuvenated only {took} ms after the spawn");
    assert_eq!(w.service("aging")["state"], "running");
    // A rejuvenation is not a failure: nothing is held against the budget.
    let s = w.service("aging");
    assert_eq!(s["consecutive_failures"], 0, "{s}");
}
