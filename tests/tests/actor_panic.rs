//! A panic inside a service's supervisor actor: the actor is restarted, the service process is
//! left alone, and supervision goes on.

use std::time::Duration;

use ftkit_tests::{Watchd, pid_alive, pid_of, q, signal};
use nix::sys::signal::Signal;

#[test]
fn injected_actor_panic_leaves_the_service_alone() {
    let services = format!(
        "[[service]]\nname = \"calm\"\ncommand = {}\nargs = [\"1000\"]\n\n\
         [[service]]\nname = \"bystander\"\ncommand = {}\nargs = [\"1000\"]\n",
        q("/bin/sleep"),
        q("/bin/sleep")
    );
    let w = Watchd::start("panic", &services);
    let pid = w.wait_running("calm");
    let other = w.wait_running("bystander");

    let answers = w.control(r#"{"op":"inject_panic","service":"calm"}"#);
    assert_eq!(answers.len(), 1, "{answers:?}");
    assert_eq!(answers[0]["result"], "ok", "{answers:?}");
    let ev = w.wait_event("calm", "actor_restarted", Duration::from_secs(5));
    assert!(
        !ev["detail"].as_str().unwrap_or_default().is_empty(),
        "{ev}"
    );

    // Same process, still running, and the new actor reports it.
    let s = w.wait_for(
        "calm",
        "running again under the new actor",
        Duration::from_secs(5),
        |s| s["state"] == "running",
    );
    assert_eq!(pid_of(&s), Some(pid), "the service was restarted: {s}");
    assert!(pid_alive(pid));
    assert!(
        w.events_of_kind("calm", "spawned").len() == 1,
        "a second spawn happened: {:?}",
        w.events_of("calm")
    );
    assert_eq!(pid_of(&w.service("bystander")), Some(other));

    // Still supervised: a crash is restarted by the new actor.
    signal(pid, Signal::SIGKILL);
    let new = w.wait_new_pid("calm", pid, Duration::from_secs(5));
    assert!(pid_alive(new));

    // Unknown service: a valid negative answer.
    let answers = w.control(r#"{"op":"inject_panic","service":"nosuch"}"#);
    assert_eq!(answers[0]["result"], "not_found", "{answers:?}");
}
