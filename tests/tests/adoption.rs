//! watchd's own crash: kill -9 of watchd leaves the services running; a new watchd re-adopts
//! them (same pids) and supervises them as before, heartbeats included.

use std::time::Duration;

use ftkit_tests::{Watchd, binary, pid_alive, pid_of, q, signal, unix_ms, wait_gone, wait_stopped};
use nix::sys::signal::Signal;

#[test]
fn new_watchd_adopts_and_keeps_supervising() {
    let services = format!(
        "[[service]]\nname = \"sleeper\"\ncommand = {}\nargs = [\"1000\"]\n\n\
         [[service]]\nname = \"hb\"\ncommand = {}\nargs = [\"--interval-ms\", \"100\", \
         \"--timeout-ms\", \"500\"]\nready = {{ notify = true }}\n",
        q("/bin/sleep"),
        q(binary("hbdemo"))
    );
    let mut w = Watchd::start("adopt", &services);
    let sleeper = w.wait_running("sleeper");
    let hb = w.wait_running("hb");
    let first_watchd = w.watchd_pid();

    w.kill9();
    assert!(!pid_alive(first_watchd));
    // The services outlive their supervisor.
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        pid_alive(sleeper) && pid_alive(hb),
        "services died with watchd"
    );

    w.restart();
    assert_ne!(w.watchd_pid(), first_watchd);
    w.wait_event("sleeper", "adopted", Duration::from_secs(5));
    w.wait_event("hb", "adopted", Duration::from_secs(5));
    let s = w.wait_state("sleeper", "running", Duration::from_secs(5));
    assert_eq!(
        pid_of(&s),
        Some(sleeper),
        "sleeper was restarted, not adopted: {s}"
    );
    let s = w.wait_state("hb", "running", Duration::from_secs(5));
    assert_eq!(pid_of(&s), Some(hb), "hb was restarted, not adopted: {s}");
    assert!(w.events_of_kind("sleeper", "spawned").is_empty());
    assert!(w.events_of_kind("hb", "spawned").is_empty());

    // The new watchd watches the adopted process: a crash is restarted.
    signal(sleeper, Signal::SIGKILL);
    let new_sleeper = w.wait_new_pid("sleeper", sleeper, Duration::from_secs(5));
    assert!(pid_alive(new_sleeper));

    // hbdemo's libft reaches the new watchd's socket: its heartbeats are honoured again.
    let s = w.wait_for(
        "hb",
        "heartbeating to the new watchd",
        Duration::from_secs(10),
        |s| s["heartbeats"].as_array().is_some_and(|h| !h.is_empty()),
    );
    assert_eq!(pid_of(&s), Some(hb));
    let seq = w.last_seq();
    let t0 = unix_ms();
    signal(hb, Signal::SIGSTOP);
    wait_stopped(hb, Duration::from_secs(2));
    let hang = w.wait_event_after(seq, "hb", "hang", Duration::from_secs(3));
    let after = hang["time_ms"].as_u64().unwrap_or(0).saturating_sub(t0);
    assert!(after <= 1500, "hang declared {after} ms after SIGSTOP");
    wait_gone(hb, Duration::from_secs(3));
    let new_hb = w.wait_new_pid("hb", hb, Duration::from_secs(5));
    assert!(pid_alive(new_hb));
}

/// A second watchd on the same data directory is refused while the first runs.
#[test]
fn second_watchd_on_the_same_data_dir_is_refused() {
    let services = format!(
        "[[service]]\nname = \"sleeper\"\ncommand = {}\nargs = [\"1000\"]\n",
        q("/bin/sleep")
    );
    let w = Watchd::start("lock", &services);
    let pid = w.wait_running("sleeper");
    let out = std::process::Command::new(binary("watchd"))
        .arg("--config")
        .arg(w.config_path())
        .output()
        .expect("run a second watchd");
    assert!(
        !out.status.success(),
        "a second watchd started on the same data dir"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("another watchd"), "{err}");
    // The first one and its service are untouched.
    assert_eq!(pid_of(&w.service("sleeper")), Some(pid));
}
