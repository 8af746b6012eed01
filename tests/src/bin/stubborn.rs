//! stubborn: a test service that ignores SIGTERM (it logs each one and carries on), so that only
//! the SIGKILL after the stop grace ends it.

use std::sync::atomic::Ordering;
use std::time::Duration;

use ftkit_tests::{say, signal_flag};

const NAME: &str = "stubborn";
const NAP: Duration = Duration::from_millis(10);

fn main() {
    let term = signal_flag(libc::SIGTERM);
    say(NAME, "running; SIGTERM will be ignored");
    loop {
        if term.swap(false, Ordering::SeqCst) {
            say(NAME, "got SIGTERM, ignoring it");
        }
        std::thread::sleep(NAP);
    }
}
