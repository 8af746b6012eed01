//! Informal measurement of checkpoint pauses (not a timed test: it asserts nothing about
//! time). Run it in release mode:
//!   cargo test --release -p ft --test critical_pause -- --ignored --nocapture
//! It prints, per heap size and dirty-tracking method, the caller's pause and the time until
//! the image is durable, for a full checkpoint and for one with 1 % of the pages dirty.

mod critical_support;

use std::time::Instant;

use critical_support::{Rng, config, page_size};
use ft::critical::{CaptureMethod, Checkpointer, DirtyMode};

fn measure(slot: usize, size: usize, dirty: DirtyMode, staging_max: Option<usize>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut c = config(dir.path(), slot, 1 << 30, dirty);
    if let Some(max) = staging_max {
        c.staging_max = max;
    }
    let cp = Checkpointer::new(c).expect("checkpointer");
    let buf = cp.heap().alloc(size, page_size()).expect("alloc").as_ptr();
    let pages = size / page_size();
    let mut rng = Rng::new(1);
    for p in 0..pages {
        // SAFETY: inside the buffer.
        unsafe { buf.add(p * page_size()).write(rng.byte()) };
    }
    let row = |what: &str, s: &ft::critical::Started, durable: std::time::Duration| {
        let method = match s.method {
            CaptureMethod::Staging => "staging",
            CaptureMethod::Fork => "fork",
        };
        println!(
            "| {:>4} MiB | {:<8} | {what:<8} | {method:<7} | {:>6} | {:>10.3?} | {:>10.3?} |",
            size >> 20,
            format!("{:?}", cp.tracker_kind()),
            s.pages,
            s.pause,
            durable
        );
    };
    let t = Instant::now();
    let full = cp.checkpoint(0).expect("full");
    cp.wait(0).expect("durable");
    row("full", &full, t.elapsed());
    for _ in 0..pages / 100 {
        let p = rng.below(pages);
        // SAFETY: inside the buffer.
        unsafe { buf.add(p * page_size()).write(rng.byte()) };
    }
    let t = Instant::now();
    let inc = cp.checkpoint(0).expect("1% dirty");
    cp.wait(0).expect("durable");
    row("1% dirty", &inc, t.elapsed());
}

#[test]
#[ignore = "a measurement: run with --release -- --ignored --nocapture"]
fn checkpoint_pauses() {
    println!("| heap     | tracking | image    | capture | pages  | pause      | durable    |");
    println!("|----------|----------|----------|---------|--------|------------|------------|");
    let mut slot = 80;
    for size in [16 << 20, 256 << 20] {
        for dirty in [DirtyMode::Uffd, DirtyMode::Hash] {
            measure(slot, size, dirty, None);
            slot += 1;
        }
    }
    // The same 256 MiB full checkpoint copied into the staging buffer instead of forked.
    measure(slot, 256 << 20, DirtyMode::Uffd, Some(512 << 20));
}
