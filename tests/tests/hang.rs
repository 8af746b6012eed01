//! Hang detection by libft heartbeats: a SIGSTOPped program misses its deadline and its tree is
//! killed (although stopped) and restarted. Both the Rust hbdemo and a C program built against
//! `ft.h` + `libft.so`.

use std::path::Path;
use std::time::Duration;

use ftkit_tests::{
    Watchd, binary, build_c_example, pid_alive, proc_state, q, signal, unix_ms, wait_gone,
    wait_stopped,
};
use nix::sys::signal::Signal;

/// The heartbeat deadline hbdemo promises.
const HB_TIMEOUT_MS: u64 = 500;
/// hbdemo's heartbeat interval.
const HB_INTERVAL_MS: u64 = 100;
/// Allowed lateness of the hang verdict beyond the deadline (timer, scheduling, a loaded CI).
const MARGIN_MS: u64 = 1000;

fn hbdemo_service(name: &str, program: &Path) -> String {
    format!(
        "[[service]]\nname = {}\ncommand = {}\nargs = [\"--interval-ms\", \"{HB_INTERVAL_MS}\", \
         \"--timeout-ms\", \"{HB_TIMEOUT_MS}\"]\nready = {{ notify = true, timeout = \"10s\" }}\n\
         hang = {{ heartbeat = true }}\n",
        q(name),
        q(program)
    )
}

/// Waits until the service runs, has registered and has an open heartbeat region.
fn wait_heartbeating(w: &Watchd, name: &str) -> u32 {
    let s = w.wait_for(name, "heartbeating", Duration::from_secs(10), |s| {
        s["state"] == "running"
            && s["registered"] == true
            && s["heartbeats"].as_array().is_some_and(|h| !h.is_empty())
    });
    ftkit_tests::pid_of(&s).expect("a running service has a pid")
}

/// SIGSTOP → hang verdict within the deadline + margin → old pid killed → new pid running.
pub fn sigstop_is_a_hang(w: &Watchd, name: &str) {
    let old = wait_heartbeating(w, name);
    let seq = w.last_seq();
    let t0 = unix_ms();
    signal(old, Signal::SIGSTOP);
    wait_stopped(old, Duration::from_secs(2));
    let hang = w.wait_event_after(
        seq,
        name,
        "hang",
        Duration::from_millis(HB_TIMEOUT_MS + MARGIN_MS + 1000),
    );
    let at = hang["time_ms"].as_u64().expect("events carry time_ms");
    let after = at.saturating_sub(t0);
    // The last beat was at most one interval before the stop, so the deadline is at least
    // timeout - interval after it: an earlier verdict would be a false alarm.
    assert!(
        after + HB_INTERVAL_MS + 50 >= HB_TIMEOUT_MS,
        "hang declared {after} ms after SIGSTOP, before the {HB_TIMEOUT_MS} ms deadline: {hang}"
    );
    assert!(
        after <= HB_TIMEOUT_MS + MARGIN_MS,
        "hang declared {after} ms after SIGSTOP (deadline {HB_TIMEOUT_MS} ms): {hang}"
    );
    let detail = hang["detail"].as_str().unwrap_or_default();
    assert!(detail.contains(&old.to_string()), "{hang}");
    // SIGKILL works on a stopped process: the old one must be gone, not left frozen.
    wait_gone(old, Duration::from_secs(3));
    let new = w.wait_new_pid(name, old, Duration::from_secs(5));
    assert!(pid_alive(new));
    assert_ne!(proc_state(new), Some('T'));
    // And the new one heartbeats again.
    let again = wait_heartbeating(w, name);
    assert_eq!(again, new);
}

#[test]
fn sigstop_of_hbdemo_is_a_hang() {
    let w = Watchd::start("hang-rust", &hbdemo_service("hb", &binary("hbdemo")));
    sigstop_is_a_hang(&w, "hb");
    let log = w.service_log("hb");
    assert!(log.contains("registered with watchd"), "{log}");
}

#[test]
fn c_program_heartbeats_through_libft_so() {
    let (_build, exe) = build_c_example("hbdemo.c", "hbdemo-c");
    let w = Watchd::start("hang-c", &hbdemo_service("hbc", &exe));
    let pid = wait_heartbeating(&w, "hbc");
    let s = w.service("hbc");
    assert_eq!(
        s["status_text"], "heartbeat every 100 ms",
        "ft_status did not arrive: {s}"
    );
    assert!(w.service_log("hbc").contains("registered with watchd"));
    // It really is the C program, linked against our libft.so.
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
    assert!(
        maps.contains("libft.so"),
        "the C program does not map libft.so"
    );
    sigstop_is_a_hang(&w, "hbc");
}
