//! A damaged newest checkpoint is detected and skipped: after its newest image was truncated
//! (then, in a second round, had one bit flipped) and it was killed, kvstate (Rust, and C
//! through `libft.so`) recovers the previous good image, exactly as the journal recorded it,
//! and libft's recovery report names the skipped image and why.

mod kvstate;

use std::fs::OpenOptions;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

use ftkit_tests::{Scratch, Watchd};
use kvstate::{
    Lang, PATIENT_TIMEOUT_MS, STREAM, SYNC_EVERY, assert_matches_model, freeze_consistent,
    image_path, images, journal_line, kill_and_wait_restart, program, service, store_dir,
    wait_journal, wait_recovery, wait_status_checkpoint,
};

/// Cuts the file to half its length, as a torn write would leave it.
fn truncate_half(path: &Path) {
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let len = f.metadata().expect("stat the image").len();
    assert!(len > 2, "{} is nearly empty", path.display());
    f.set_len(len / 2).expect("truncate the image");
}

/// Flips the lowest bit of the byte in the middle of the file, keeping its length.
fn flip_bit(path: &Path) {
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let middle = f.metadata().expect("stat the image").len() / 2;
    let mut byte = [0u8; 1];
    f.seek(SeekFrom::Start(middle)).expect("seek");
    f.read_exact(&mut byte).expect("read a byte");
    byte[0] ^= 1;
    f.seek(SeekFrom::Start(middle)).expect("seek");
    f.write_all(&byte).expect("write the flipped byte");
    f.sync_all().expect("sync the image");
}

/// Freezes the program, damages its newest image with `damage`, kills it, and checks that the
/// new process recovered the image before (as the journal recorded it) and says why.
/// Returns the damaged image's sequence number.
fn damage_newest_and_kill(
    w: &Watchd,
    name: &str,
    journal_path: &Path,
    damage: fn(&Path),
    what: &str,
) -> u64 {
    let dir = store_dir(w, name, STREAM);
    let frozen = freeze_consistent(w, name, journal_path);
    wait_status_checkpoint(w, name, STREAM, frozen.newest);
    let bad = frozen.newest;
    let previous = bad - 1;
    assert!(
        images(&dir).contains(&previous),
        "the store no longer holds checkpoint {previous}: {:?}",
        images(&dir)
    );
    let expected = journal_line(&frozen.journal, previous);
    damage(&image_path(&dir, bad));

    let new = kill_and_wait_restart(w, name, frozen.pid);
    let rec = wait_recovery(w, name, new);
    let got = rec
        .state
        .unwrap_or_else(|| panic!("no recovery after a {what} newest image: {rec:?}"));
    assert_eq!(
        got.seq, previous,
        "a {what} checkpoint {bad} must give way to {previous}: {rec:?}"
    );
    assert_eq!(got, expected, "recovered state differs from the journal");
    assert_matches_model(got);
    assert!(
        rec.report
            .contains(&format!("recovered checkpoint {previous}")),
        "{rec:?}"
    );
    assert!(
        rec.report
            .contains(&format!("skipped newer checkpoint {bad}: ")),
        "the report does not say why checkpoint {bad} was skipped: {rec:?}"
    );
    bad
}

fn damaged_newest_gives_way_to_the_previous(lang: Lang, label: &str) {
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
    wait_recovery(&w, name, first);
    wait_journal(&journal_path, 0, 3);
    let torn = damage_newest_and_kill(&w, name, &journal_path, truncate_half, "truncated");

    // The restarted program builds on the recovered image; two more checkpoints later, the
    // image before the newest is one of them (not the torn one).
    let lines = wait_journal(&journal_path, torn, 2);
    for line in lines.iter().filter(|l| l.seq > torn) {
        assert_matches_model(*line);
    }
    damage_newest_and_kill(&w, name, &journal_path, flip_bit, "bit-flipped");
}

#[test]
fn corrupt_newest_checkpoint_of_rust_kvstate_gives_way_to_the_previous() {
    damaged_newest_gives_way_to_the_previous(Lang::Rust, "ckpt-corrupt-rust");
}

#[test]
fn corrupt_newest_checkpoint_of_c_kvstate_gives_way_to_the_previous() {
    damaged_newest_gives_way_to_the_previous(Lang::C, "ckpt-corrupt-c");
}
