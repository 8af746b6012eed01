//! The restart budget: a service that keeps failing is restarted with growing backoff, then
//! marked failed and escalated (the on_escalate hook runs).

use std::time::Duration;

use ftkit_tests::{Watchd, q, q_list, read_or_empty, wait_until};

const MAX_RESTARTS: usize = 3;
const BACKOFF_INITIAL_MS: f64 = 100.0;

#[test]
fn exhausted_budget_fails_and_escalates_with_growing_backoff() {
    let scratch = ftkit_tests::Scratch::new("budget-hook");
    let hook_out = scratch.file("hook.out");
    let hook = format!("echo \"$FT_SERVICE $FT_EVENT\" > {}", hook_out.display());
    let services = format!(
        "[[service]]\nname = \"flaky\"\ncommand = {}\nargs = [\"-c\", \"exit 1\"]\n\
         on_escalate = {}\n\
         restart = {{ policy = \"on-failure\", max_restarts = {MAX_RESTARTS}, window = \"60s\", \
         backoff_initial = \"100ms\", backoff_factor = 2.0, jitter = 0.1 }}\n",
        q("/bin/sh"),
        q_list(&["/bin/sh", "-c", hook.as_str()])
    );
    let w = Watchd::start("budget", &services);
    let s = w.wait_state("flaky", "failed", Duration::from_secs(10));
    assert!(s["pid"].is_null(), "{s}");
    assert!(
        s["failed_reason"].as_str().is_some_and(|r| !r.is_empty()),
        "{s}"
    );
    assert_eq!(s["last_exit"]["code"], 1, "{s}");

    w.wait_event("flaky", "failed", Duration::from_secs(2));
    w.wait_event("flaky", "escalated", Duration::from_secs(2));
    let text = wait_until(
        "the escalation hook's output",
        Duration::from_secs(5),
        || {
            let t = read_or_empty(&hook_out);
            t.ends_with('\n').then_some(t)
        },
    );
    assert_eq!(
        text.trim(),
        "flaky escalate",
        "hook saw the wrong environment"
    );
    assert!(w.events_of_kind("flaky", "hook_failed").is_empty());

    // One start plus exactly max_restarts restarts: the next would exceed the budget.
    let spawned: Vec<u64> = w
        .events_of_kind("flaky", "spawned")
        .iter()
        .filter_map(|e| e["time_ms"].as_u64())
        .collect();
    assert_eq!(
        spawned.len(),
        MAX_RESTARTS + 1,
        "spawns at {spawned:?}; events:\n{:#?}",
        w.events_of("flaky")
    );
    let gaps: Vec<u64> = spawned.windows(2).map(|p| p[1] - p[0]).collect();
    // The restart delays proper: from each exit to the next spawn (the gaps between spawns
    // also hold the short run of `sh`, which a loaded machine stretches).
    let events = w.events_of("flaky");
    let delays: Vec<u64> = events
        .iter()
        .enumerate()
        .filter(|(_, e)| e["kind"] == "exited")
        .filter_map(|(i, exited)| {
            let next = events[i..].iter().find(|e| e["kind"] == "spawned")?;
            Some(next["time_ms"].as_u64()? - exited["time_ms"].as_u64()?)
        })
        .collect();
    assert_eq!(
        delays.len(),
        MAX_RESTARTS,
        "delays {delays:?}; events:\n{events:#?}"
    );
    // First restart immediate, then backoff_initial * 2^k (±10 % jitter).
    assert!(
        f64::from(u32::try_from(delays[0]).expect("small delay")) < BACKOFF_INITIAL_MS,
        "the first restart was not immediate: delays {delays:?}"
    );
    for k in 1..MAX_RESTARTS {
        let configured = BACKOFF_INITIAL_MS * 2f64.powi(i32::try_from(k - 1).expect("small"));
        for (what, measured) in [("delay", delays[k]), ("gap between spawns", gaps[k])] {
            assert!(
                f64::from(u32::try_from(measured).expect("small")) >= 0.8 * configured,
                "{what} {k} was {measured} ms, configured {configured} ms: delays {delays:?}, \
                 gaps {gaps:?}"
            );
        }
    }
    assert!(
        delays.windows(2).all(|p| p[1] > p[0]),
        "backoff does not grow: delays {delays:?}"
    );
    // Growth is asserted on the delays, not on the gaps between spawns: a loaded machine can
    // stretch one run of `sh` by more than a backoff step.
    // Failed stays failed: no more spawns.
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(w.events_of_kind("flaky", "spawned").len(), MAX_RESTARTS + 1);
    assert_eq!(w.service("flaky")["state"], "failed");

    // An operator start gives it a fresh chance.
    let seq = w.last_seq();
    w.ftctl_ok(&["start", "flaky"]);
    w.wait_event_after(seq, "flaky", "spawned", Duration::from_secs(5));
}
