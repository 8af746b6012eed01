//! sd_notify: READY=1 gates `starting` → `running`; a missing WATCHDOG=1 is a hang.

use std::time::Duration;

use ftkit_tests::{Watchd, binary, pid_alive, q, signal, wait_gone, wait_until};
use nix::sys::signal::Signal;

#[test]
fn missing_watchdog_is_a_hang() {
    let services = format!(
        "[[service]]\nname = \"nd\"\ncommand = {}\nargs = [\"--interval-ms\", \"100\"]\n\
         ready = {{ notify = true, timeout = \"10s\" }}\nhang = {{ watchdog = \"500ms\" }}\n",
        q(binary("notifyd"))
    );
    let w = Watchd::start("notify-wd", &services);
    let old = w.wait_running("nd");
    let s = w.service("nd");
    assert_eq!(
        s["status_text"], "notifyd up",
        "STATUS= did not arrive: {s}"
    );
    // WATCHDOG_USEC is passed to the service.
    wait_until(
        "notifyd to print its environment",
        Duration::from_secs(5),
        || {
            w.service_log("nd")
                .contains("WATCHDOG_USEC=Some(\"500000\")")
                .then_some(())
        },
    );
    // Healthy for longer than the watchdog interval: no verdict.
    std::thread::sleep(Duration::from_millis(1200));
    let s = w.service("nd");
    assert_eq!(
        ftkit_tests::pid_of(&s),
        Some(old),
        "restarted while healthy: {s}"
    );
    assert!(w.events_of_kind("nd", "hang").is_empty());

    let seq = w.last_seq();
    let t0 = ftkit_tests::unix_ms();
    signal(old, Signal::SIGUSR2);
    let hang = w.wait_event_after(seq, "nd", "hang", Duration::from_secs(3));
    let detail = hang["detail"].as_str().unwrap_or_default();
    assert!(
        detail.to_ascii_uppercase().contains("WATCHDOG"),
        "the hang event should name the watchdog: {hang}"
    );
    let after = hang["time_ms"].as_u64().unwrap_or(0).saturating_sub(t0);
    assert!(
        after <= 1500,
        "watchdog hang declared {after} ms after the last beat"
    );
    wait_gone(old, Duration::from_secs(3));
    let new = w.wait_new_pid("nd", old, Duration::from_secs(5));
    assert!(pid_alive(new));
}

#[test]
fn ready_notify_keeps_starting_until_ready() {
    let services = format!(
        "[[service]]\nname = \"late\"\ncommand = {}\nargs = [\"--interval-ms\", \"0\", \
         \"--ready-after-ms\", \"2500\"]\nready = {{ notify = true, timeout = \"20s\" }}\n",
        q(binary("notifyd"))
    );
    let w = Watchd::start("notify-ready", &services);
    let s = w.wait_for("late", "starting with a pid", Duration::from_secs(5), |s| {
        s["state"] == "starting" && ftkit_tests::pid_of(s).is_some()
    });
    let pid = ftkit_tests::pid_of(&s).expect("checked");
    // Well inside its start-up it is still starting.
    std::thread::sleep(Duration::from_millis(1000));
    let s = w.service("late");
    assert_eq!(s["state"], "starting", "running before READY=1: {s}");
    let s = w.wait_state("late", "running", Duration::from_secs(10));
    assert_eq!(ftkit_tests::pid_of(&s), Some(pid));
    let spawned = w.wait_event("late", "spawned", Duration::from_secs(1));
    let ready = w.wait_event("late", "ready", Duration::from_secs(1));
    let gap = ready["time_ms"].as_u64().unwrap_or(0) - spawned["time_ms"].as_u64().unwrap_or(0);
    assert!(
        gap >= 2400,
        "ready {gap} ms after spawn, before READY=1 was sent"
    );
    assert!(w.service_log("late").contains("sent READY=1"));
}

#[test]
fn no_ready_within_timeout_is_a_hang() {
    let services = format!(
        "[[service]]\nname = \"mute\"\ncommand = {}\nargs = [\"--interval-ms\", \"0\", \
         \"--ready-after-ms\", \"100000\"]\nready = {{ notify = true, timeout = \"700ms\" }}\n\
         restart = {{ backoff_initial = \"2s\" }}\n",
        q(binary("notifyd"))
    );
    let w = Watchd::start("notify-noready", &services);
    let first = w.wait_event("mute", "spawned", Duration::from_secs(5));
    let hang = w.wait_event("mute", "hang", Duration::from_secs(5));
    let gap = hang["time_ms"].as_u64().unwrap_or(0) - first["time_ms"].as_u64().unwrap_or(0);
    assert!(
        (600..=2000).contains(&gap),
        "no-READY verdict {gap} ms after spawn (timeout 700 ms): {hang}"
    );
    assert!(
        hang["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("READY"),
        "{hang}"
    );
}

/// Many services that say READY=1 the moment they start: every datagram is attributed to its
/// service (none arrives before watchd knows the new pid) and every service becomes running.
#[test]
fn many_services_ready_at_once() {
    const COUNT: usize = 20;
    let mut services = String::new();
    for i in 0..COUNT {
        services.push_str(&format!(
            "[[service]]\nname = \"n{i}\"\ncommand = {}\nargs = [\"--interval-ms\", \"0\"]\n\
             ready = {{ notify = true, timeout = \"20s\" }}\n\n",
            q(binary("notifyd"))
        ));
    }
    let w = Watchd::start("notify-many", &services);
    let all = wait_until(
        "every service to be running",
        Duration::from_secs(15),
        || {
            let st = w.status();
            (st.len() == COUNT && st.iter().all(|s| s["state"] == "running")).then_some(st)
        },
    );
    assert_eq!(all.len(), COUNT);
    let c = w.listener_counters();
    assert_eq!(
        c["rejected_sender"], 0,
        "READY=1 from a service was rejected: {c}"
    );
    assert!(c["accepted"].as_u64().unwrap_or(0) >= 20, "{c}");
}
