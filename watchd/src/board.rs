//! The heartbeat board of one service: where the listener writes heartbeat deadlines, and
//! whence the service's supervisor reads them when its timer fires.
//!
//! Renewing a heartbeat is the common message (every application thread, all the time) and it
//! only ever moves a deadline later, which cannot make anything due sooner. So the listener just
//! writes the new deadline here, and wakes the supervisor only when a deadline is earlier than
//! the timer it has armed (a new region, or a shorter timeout). The supervisor drains the board
//! before every deadline check, so a verdict never misses a heartbeat that arrived in time. The
//! board holds no rules: it orders marks per thread id, nothing more.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

/// The latest word of one application thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mark {
    /// Its next heartbeat is due by this time.
    Deadline(Instant),
    /// It left its monitored region.
    Ended,
}

/// One service's board.
#[derive(Debug, Default)]
pub struct Board {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    marks: HashMap<u32, Mark>,
    /// When the supervisor's timer fires next; `None` when it has none.
    armed: Option<Instant>,
}

impl Board {
    /// Writes a mark; returns whether the supervisor must be woken to look now.
    pub fn write(&self, tid: u32, mark: Mark) -> bool {
        let mut inner = self.lock();
        inner.marks.insert(tid, mark);
        match mark {
            Mark::Deadline(d) => inner.armed.is_none_or(|armed| d < armed),
            Mark::Ended => false,
        }
    }

    /// Takes every mark written since the last drain.
    pub fn drain(&self) -> Vec<(u32, Mark)> {
        self.lock().marks.drain().collect()
    }

    /// Forgets every mark (the process that wrote them is gone, or unregistered).
    pub fn clear(&self) {
        self.lock().marks.clear();
    }

    /// The supervisor tells when its timer fires next. Returns whether a mark written meanwhile
    /// is due before that, so the supervisor must drain the board again now.
    pub fn set_armed(&self, armed: Option<Instant>) -> bool {
        let mut inner = self.lock();
        inner.armed = armed;
        inner.marks.values().any(|m| match m {
            Mark::Deadline(d) => armed.is_none_or(|a| *d < a),
            Mark::Ended => false,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn wakes_only_for_deadlines_before_the_armed_timer() {
        let b = Board::default();
        let t0 = Instant::now();
        assert!(
            b.write(1, Mark::Deadline(t0 + Duration::from_secs(3))),
            "nothing armed yet"
        );
        assert!(
            b.set_armed(Some(t0 + Duration::from_secs(5))),
            "a pending mark is due earlier"
        );
        b.drain();
        assert!(!b.set_armed(Some(t0 + Duration::from_secs(3))));
        assert!(
            !b.write(1, Mark::Deadline(t0 + Duration::from_secs(4))),
            "a renewal moves it later"
        );
        assert!(
            b.write(2, Mark::Deadline(t0 + Duration::from_secs(1))),
            "an earlier deadline"
        );
        assert!(!b.write(1, Mark::Ended));
    }

    #[test]
    fn the_latest_mark_per_thread_wins_and_drain_empties() {
        let b = Board::default();
        let t0 = Instant::now();
        b.write(1, Mark::Deadline(t0));
        b.write(1, Mark::Ended);
        b.write(2, Mark::Deadline(t0));
        let mut marks = b.drain();
        marks.sort_by_key(|(t, _)| *t);
        assert_eq!(marks, vec![(1, Mark::Ended), (2, Mark::Deadline(t0))]);
        assert!(b.drain().is_empty());
        b.write(3, Mark::Deadline(t0));
        b.clear();
        assert!(b.drain().is_empty());
    }
}
