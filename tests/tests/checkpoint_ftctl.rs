//! Checkpoints that kvstate does not take itself: `ftctl checkpoint SERVICE [--stream N]`
//! (served at the program's next safe point) and `checkpoint = { every = .. }` (periodic, at
//! safe points). Each new checkpoint shows in `ftctl status`, lands in the service's store, and
//! is what a killed program recovers — the table the model says it held at that counter.

mod kvstate;

use std::time::Duration;

use ftkit_tests::{Scratch, Watchd, wait_until};
use kvstate::{
    Lang, PATIENT_TIMEOUT_MS, STREAM, assert_matches_model, images, kill_and_wait_restart, program,
    service, store_dir, wait_all_threads_stopped, wait_recovery, wait_status_checkpoint,
};
use nix::sys::signal::Signal;

/// How long a requested checkpoint may take to be committed and reported.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// The stream of the extra checkpoint requested with `--stream`.
const OTHER_STREAM: u32 = 3;

/// Asks for a checkpoint and waits until status shows `seq` on `stream` and the store has it.
fn request(w: &Watchd, name: &str, stream: u32, seq: u64) {
    let mut args = vec!["checkpoint", name];
    let stream_arg = stream.to_string();
    if stream != STREAM {
        args.extend(["--stream", &stream_arg]);
    }
    let out = w.ftctl(&args);
    assert_eq!(out.status.code(), Some(0), "ftctl {args:?}: {out:?}");
    wait_status_checkpoint(w, name, stream, seq);
    let dir = store_dir(w, name, stream);
    wait_until(
        &format!("image {seq} in {}", dir.display()),
        REQUEST_TIMEOUT,
        || images(&dir).contains(&seq).then_some(()),
    );
}

fn ftctl_checkpoint_is_taken_and_recovered(lang: Lang, label: &str) {
    let prog = program(lang);
    let name = "kv";
    let scratch = Scratch::new(label);
    let journal_path = scratch.file("kv.journal");
    // No synchronous or periodic checkpoints: every image comes from ftctl.
    let w = Watchd::start(
        label,
        &service(name, &prog.path, &journal_path, PATIENT_TIMEOUT_MS, 0, None),
    );
    let pid = w.wait_running(name);
    wait_recovery(&w, name, pid);
    let s = w.wait_for(name, "registered", Duration::from_secs(10), |s| {
        s["registered"] == true
    });
    assert!(s["checkpoint"].is_null(), "no checkpoint yet: {s}");
    assert!(images(&store_dir(&w, name, STREAM)).is_empty());

    request(&w, name, STREAM, 1);
    request(&w, name, STREAM, 2);
    request(&w, name, OTHER_STREAM, 1);
    let table = w.ftctl_ok(&["status"]);
    assert!(table.contains(&format!("{OTHER_STREAM}:#1 ")), "{table}");

    // The newest image of stream 0 is what a killed program comes back with.
    ftkit_tests::signal(pid, Signal::SIGSTOP);
    wait_all_threads_stopped(pid);
    assert_eq!(images(&store_dir(&w, name, STREAM)).last(), Some(&2));
    let new = kill_and_wait_restart(&w, name, pid);
    let rec = wait_recovery(&w, name, new);
    let got = rec.state.unwrap_or_else(|| panic!("{rec:?}"));
    assert_eq!(got.seq, 2, "{rec:?}");
    assert!(got.counter > 0, "{rec:?}");
    assert_matches_model(got);
    assert!(
        std::fs::read_to_string(&journal_path)
            .unwrap_or_default()
            .is_empty(),
        "--sync-every 0 journals nothing"
    );
}

#[test]
fn ftctl_checkpoint_of_rust_kvstate_is_taken_and_recovered() {
    ftctl_checkpoint_is_taken_and_recovered(Lang::Rust, "ckpt-ftctl-rust");
}

#[test]
fn ftctl_checkpoint_of_c_kvstate_is_taken_and_recovered() {
    ftctl_checkpoint_is_taken_and_recovered(Lang::C, "ckpt-ftctl-c");
}

/// `checkpoint = { every = "200ms" }` reaches libft as FT_CKPT_EVERY: checkpoints keep coming
/// without the program asking, and a killed program recovers the newest of them.
fn periodic_checkpoints_are_taken_and_recovered(lang: Lang, label: &str) {
    const PERIODIC: u64 = 4;
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
            0,
            Some("200ms"),
        ),
    );
    let pid = w.wait_running(name);
    wait_recovery(&w, name, pid);
    w.wait_for(name, "periodic checkpoints", Duration::from_secs(20), |s| {
        s["checkpoint"]["seq"]
            .as_u64()
            .is_some_and(|n| n >= PERIODIC)
    });
    ftkit_tests::signal(pid, Signal::SIGSTOP);
    // Once every thread is stopped nothing more is committed; an image being written stays a
    // temp file and does not count.
    wait_all_threads_stopped(pid);
    let newest = *images(&store_dir(&w, name, STREAM))
        .last()
        .expect("status showed committed checkpoints");
    let new = kill_and_wait_restart(&w, name, pid);
    let rec = wait_recovery(&w, name, new);
    let got = rec.state.unwrap_or_else(|| panic!("{rec:?}"));
    assert_eq!(got.seq, newest, "{rec:?}");
    assert_matches_model(got);
}

#[test]
fn periodic_checkpoints_of_rust_kvstate_are_taken_and_recovered() {
    periodic_checkpoints_are_taken_and_recovered(Lang::Rust, "ckpt-every-rust");
}

#[test]
fn periodic_checkpoints_of_c_kvstate_are_taken_and_recovered() {
    periodic_checkpoints_are_taken_and_recovered(Lang::C, "ckpt-every-c");
}
