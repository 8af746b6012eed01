//! Checkpointed state survives a hang: a SIGSTOPped kvstate (Rust, and C through `libft.so`)
//! misses its heartbeat deadline, watchd kills and restarts it, and the new process recovers
//! the newest committed checkpoint, exactly as the journal recorded it.

mod kvstate;

use std::time::Duration;

use ftkit_tests::{Scratch, Watchd};
use kvstate::{
    HANG_TIMEOUT_MS, Lang, SYNC_EVERY, assert_matches_model, freeze_consistent, journal_line,
    program, service, wait_journal, wait_recovery, wait_status_checkpoint,
};

/// Allowed lateness of the hang verdict beyond the deadline (timer, scheduling, a loaded CI).
const VERDICT_MARGIN: Duration = Duration::from_secs(5);

fn hang_recovers_the_newest_checkpoint(lang: Lang, label: &str) {
    let prog = program(lang);
    let name = "kv";
    let scratch = Scratch::new(label);
    let journal_path = scratch.file("kv.journal");
    let w = Watchd::start(
        label,
        &service(
            name,
            &prog.path,
            &journal_path,
            HANG_TIMEOUT_MS,
            SYNC_EVERY,
            None,
        ),
    );
    let first = w.wait_running(name);
    wait_recovery(&w, name, first);
    wait_journal(&journal_path, 0, 3);
    let seq = w.last_seq();

    // The stop is the fault: it is left in place until watchd calls it a hang.
    let frozen = freeze_consistent(&w, name, &journal_path);
    wait_status_checkpoint(&w, name, 0, frozen.newest);
    let expected = journal_line(&frozen.journal, frozen.newest);
    let hang = w.wait_event_after(
        seq,
        name,
        "hang",
        Duration::from_millis(HANG_TIMEOUT_MS) + VERDICT_MARGIN,
    );
    assert!(
        hang["detail"]
            .as_str()
            .is_some_and(|d| d.contains(&frozen.pid.to_string())),
        "{hang}"
    );
    let new = w.wait_new_pid(name, frozen.pid, Duration::from_secs(15));
    let rec = wait_recovery(&w, name, new);
    let got = rec
        .state
        .unwrap_or_else(|| panic!("no recovery after the hang: {rec:?}"));
    assert_eq!(got.seq, frozen.newest, "{rec:?}");
    assert_eq!(got, expected, "recovered state differs from the journal");
    assert_matches_model(got);

    // The restarted program heartbeats and checkpoints again, from where it was.
    let lines = wait_journal(&journal_path, frozen.newest, 1);
    let next = lines
        .iter()
        .find(|l| l.seq > frozen.newest)
        .expect("waited for it");
    assert_eq!(next.counter, got.counter + SYNC_EVERY, "{lines:?}");
    assert_matches_model(*next);
}

#[test]
fn sigstop_of_rust_kvstate_recovers_the_newest_checkpoint() {
    hang_recovers_the_newest_checkpoint(Lang::Rust, "ckpt-hang-rust");
}

#[test]
fn sigstop_of_c_kvstate_recovers_the_newest_checkpoint() {
    hang_recovers_the_newest_checkpoint(Lang::C, "ckpt-hang-c");
}
