//! Checkpointed state survives kill -9: watchd restarts kvstate (Rust, and C through
//! `libft.so`), which recovers its hash table — linked by pointers inside the critical heap —
//! from the newest committed checkpoint, exactly as it was when that checkpoint was taken, and
//! carries on from its counter. Also: both programs and the model agree operation by
//! operation, and each program recovers the other's checkpoints.

mod kvstate;

use std::fs::File;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use ftkit_tests::{Scratch, Watchd, read_or_empty, wait_until};
use kvstate::{
    Lang, PATIENT_TIMEOUT_MS, RECOVERY_TIMEOUT, STREAM, SYNC_EVERY, StateLine,
    assert_matches_model, freeze_consistent, freeze_pid_consistent, journal, journal_line,
    kill_and_wait_restart, model_digest, program, recovery_in, service, wait_journal,
    wait_recovery, wait_status_checkpoint,
};

fn kill9_recovers_the_newest_checkpoint(lang: Lang, label: &str) {
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
            PATIENT_TIMEOUT_MS,
            SYNC_EVERY,
            None,
        ),
    );
    let first = w.wait_running(name);
    let start = wait_recovery(&w, name, first);
    assert_eq!(start.state, None, "a fresh store must give a fresh start");
    assert!(start.report.contains("no checkpoint"), "{start:?}");
    wait_journal(&journal_path, 0, 3);

    let frozen = freeze_consistent(&w, name, &journal_path);
    // What watchd was told is the same newest checkpoint.
    wait_status_checkpoint(&w, name, 0, frozen.newest);
    let expected = journal_line(&frozen.journal, frozen.newest);
    assert_eq!(expected.counter % SYNC_EVERY, 0, "{expected:?}");

    let new = kill_and_wait_restart(&w, name, frozen.pid);
    let rec = wait_recovery(&w, name, new);
    let got = rec
        .state
        .unwrap_or_else(|| panic!("no recovery after kill -9: {rec:?}"));
    assert_eq!(
        got.seq, frozen.newest,
        "recovered another checkpoint than the newest: {rec:?}"
    );
    assert_eq!(got, expected, "recovered state differs from the journal");
    assert_matches_model(got);
    assert!(
        rec.report
            .contains(&format!("recovered checkpoint {}", frozen.newest))
            && !rec.report.contains("skipped"),
        "{rec:?}"
    );

    // It carries on from its counter: the next journaled checkpoints continue the sequence.
    let lines = wait_journal(&journal_path, frozen.newest, 2);
    let after: Vec<_> = lines.iter().filter(|l| l.seq > frozen.newest).collect();
    assert_eq!(
        after[0].counter,
        got.counter + SYNC_EVERY,
        "the restarted program did not continue from counter {}: {after:?}",
        got.counter
    );
    for line in after {
        assert_matches_model(*line);
    }
}

#[test]
fn kill9_of_rust_kvstate_recovers_the_newest_checkpoint() {
    kill9_recovers_the_newest_checkpoint(Lang::Rust, "ckpt-kill-rust");
}

#[test]
fn kill9_of_c_kvstate_recovers_the_newest_checkpoint() {
    kill9_recovers_the_newest_checkpoint(Lang::C, "ckpt-kill-c");
}

/// Kills a standalone program on drop, also when the test fails.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Without watchd: the Rust and the C program journal the same digests at the same counters,
/// and both equal the model's, over enough operations to reuse every key many times.
#[test]
fn rust_and_c_kvstate_agree_with_the_model() {
    const OPERATIONS: u64 = 1500;
    const EVERY: u64 = 250;
    let c = program(Lang::C);
    let rust = program(Lang::Rust);
    let scratch = Scratch::new("kv-agree");
    let mut journals = Vec::new();
    let mut running = Vec::new();
    for (tag, prog) in [("rust", &rust), ("c", &c)] {
        let dir = scratch.file(tag);
        std::fs::create_dir(&dir).expect("create a work directory");
        let journal_path = dir.join("journal");
        let child = Command::new(&prog.path)
            .args(["--interval-ms", "1", "--sync-every", &EVERY.to_string()])
            .arg("--journal")
            .arg(&journal_path)
            .current_dir(&dir)
            .env_remove("FT_SOCKET")
            .env("FT_CKPT_DIR", dir.join("ckpt"))
            .stdout(Stdio::null())
            .spawn()
            .expect("start kvstate");
        running.push(Running(child));
        journals.push(journal_path);
    }
    let lines: Vec<_> = journals
        .iter()
        .map(|j| {
            wait_until(
                &format!("{OPERATIONS} operations in {}", j.display()),
                Duration::from_secs(60),
                || {
                    let lines = journal(j);
                    (lines.last().is_some_and(|l| l.counter >= OPERATIONS)).then_some(lines)
                },
            )
        })
        .collect();
    drop(running);
    for counter in (EVERY..=OPERATIONS).step_by(usize::try_from(EVERY).expect("small")) {
        let at = |lines: &[kvstate::StateLine]| {
            lines
                .iter()
                .find(|l| l.counter == counter)
                .copied()
                .unwrap_or_else(|| panic!("no journal line at counter {counter}: {lines:?}"))
        };
        let (r, c) = (at(&lines[0]), at(&lines[1]));
        assert_eq!(r.digest, c.digest, "Rust and C differ at counter {counter}");
        assert_eq!(r.digest, model_digest(counter), "counter {counter}");
    }
}

/// The two programs lay out the table identically, so under one identity (`FT_SERVICE`, which
/// places the heap) each recovers what the other checkpointed: C, then Rust, then C again, each
/// killed and continuing exactly from the other's newest checkpoint.
#[test]
fn rust_and_c_kvstate_recover_each_others_checkpoints() {
    let c = program(Lang::C);
    let rust = program(Lang::Rust);
    let scratch = Scratch::new("kv-swap");
    let journal_path = scratch.file("kv.journal");
    let store = scratch.file("ckpt").join(STREAM.to_string());
    let mut previous: Option<StateLine> = None;
    for (round, prog) in [&c, &rust, &c].into_iter().enumerate() {
        let out_path = scratch.file(&format!("out-{round}"));
        let out = File::create(&out_path).expect("create the output file");
        let child = Command::new(&prog.path)
            .args(["--interval-ms", "5", "--sync-every", "20", "--journal"])
            .arg(&journal_path)
            .current_dir(scratch.path())
            .env_remove("FT_SOCKET")
            .env("FT_SERVICE", "kvstate-swap")
            .env("FT_CKPT_DIR", scratch.file("ckpt"))
            .stdout(out)
            .spawn()
            .expect("start kvstate");
        let pid = child.id();
        let running = Running(child);
        let rec = wait_until(
            &format!("round {round}: kvstate[{pid}] to print its recovery"),
            RECOVERY_TIMEOUT,
            || recovery_in(&read_or_empty(&out_path), pid),
        );
        assert_eq!(rec.state, previous, "round {round}: {rec:?}");
        wait_journal(&journal_path, previous.map_or(0, |p| p.seq), 2);
        let frozen = freeze_pid_consistent(pid, &store, &journal_path);
        let line = journal_line(&frozen.journal, frozen.newest);
        assert_matches_model(line);
        previous = Some(line);
        drop(running);
    }
}
