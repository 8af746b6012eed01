//! Reloading the configuration: added services start, removed ones stop, unchanged ones keep
//! their process; an invalid file is refused and nothing changes. SIGHUP does the same.

use std::time::Duration;

use ftkit_tests::{Watchd, pid_alive, pid_of, q, wait_gone};
use nix::sys::signal::Signal;

fn sleeper(name: &str) -> String {
    format!(
        "[[service]]\nname = {}\ncommand = {}\nargs = [\"1000\"]\nstop = {{ grace = \"1s\" }}\n\n",
        q(name),
        q("/bin/sleep")
    )
}

fn names(w: &Watchd) -> Vec<String> {
    let mut n: Vec<String> = w
        .status()
        .iter()
        .filter_map(|s| s["name"].as_str().map(str::to_owned))
        .collect();
    n.sort();
    n
}

#[test]
fn reload_adds_removes_and_keeps() {
    let w = Watchd::start("reload", &(sleeper("keep") + &sleeper("gone")));
    let keep = w.wait_running("keep");
    let gone = w.wait_running("gone");

    w.write_services(&(sleeper("keep") + &sleeper("added")));
    let out = w.ftctl_ok(&["reload"]);
    assert!(out.contains("added"), "{out}");
    let added = w.wait_running("added");
    wait_gone(gone, Duration::from_secs(5));
    ftkit_tests::wait_until("`gone` to leave the status", Duration::from_secs(5), || {
        (names(&w) == ["added", "keep"]).then_some(())
    });
    assert_eq!(
        pid_of(&w.service("keep")),
        Some(keep),
        "unchanged service was restarted"
    );
    assert!(pid_alive(keep) && pid_alive(added));
    w.wait_event("added", "added", Duration::from_secs(2));
    w.wait_event("gone", "removed", Duration::from_secs(2));

    // An invalid file: refused with the error, exit 2, nothing touched.
    let seq = w.last_seq();
    w.write_config_raw(
        &w.config_text(&(sleeper("keep") + "[[service]]\nname = \"x\"\ncomand = \"/bin/true\"\n")),
    );
    let out = w.ftctl(&["reload"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "invalid reload: {err}");
    assert!(
        err.contains(&w.config_path().display().to_string()) && err.contains("comand"),
        "the refusal should name the file and the field: {err}"
    );
    let refused: Vec<_> = w
        .events()
        .into_iter()
        .filter(|e| e["kind"] == "reload_refused" && e["seq"].as_u64() > Some(seq))
        .collect();
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(names(&w), ["added", "keep"]);
    assert_eq!(pid_of(&w.service("keep")), Some(keep));
    assert_eq!(pid_of(&w.service("added")), Some(added));

    // SIGHUP reloads like `ftctl reload`.
    w.write_services(&(sleeper("keep") + &sleeper("added") + &sleeper("hup")));
    w.signal_watchd(Signal::SIGHUP);
    let hup = w.wait_running("hup");
    assert!(pid_alive(hup));
    assert_eq!(pid_of(&w.service("keep")), Some(keep));
    assert_eq!(pid_of(&w.service("added")), Some(added));

    // SIGHUP with an invalid file changes nothing and watchd stays up.
    w.write_config_raw("this is = = not toml");
    let seq = w.last_seq();
    w.signal_watchd(Signal::SIGHUP);
    ftkit_tests::wait_until("a reload_refused event", Duration::from_secs(5), || {
        w.events()
            .into_iter()
            .find(|e| e["kind"] == "reload_refused" && e["seq"].as_u64() > Some(seq))
    });
    assert_eq!(names(&w), ["added", "hup", "keep"]);
    assert_eq!(pid_of(&w.service("keep")), Some(keep));
}
