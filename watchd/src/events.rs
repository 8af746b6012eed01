//! The event hub: every supervision event is numbered, logged through `tracing`, kept in a
//! bounded ring for `ftctl events`, and broadcast to followers.
//!
//! It never blocks a producer: a slow follower loses events (and is told how many) rather than
//! holding back the service actors.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::sync::broadcast;

use crate::api::EventRecord;
use crate::machine::EventKind;

/// Events buffered per follower before it starts losing them.
const FOLLOWER_BUFFER: usize = 4096;

/// The hub.
#[derive(Debug)]
pub struct Events {
    ring: Mutex<Ring>,
    tx: broadcast::Sender<EventRecord>,
}

#[derive(Debug)]
struct Ring {
    next_seq: u64,
    keep: usize,
    items: VecDeque<EventRecord>,
}

impl Events {
    /// A hub that keeps the last `keep` events.
    pub fn new(keep: usize) -> Events {
        let (tx, _) = broadcast::channel(FOLLOWER_BUFFER);
        Events {
            ring: Mutex::new(Ring {
                next_seq: 1,
                keep: keep.max(1),
                items: VecDeque::new(),
            }),
            tx,
        }
    }

    /// Records an event.
    pub fn emit(&self, service: Option<&str>, kind: EventKind, detail: impl Into<String>) {
        let detail = detail.into();
        let time_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0);
        let mut ring = self
            .ring
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let record = EventRecord {
            seq: ring.next_seq,
            time_ms,
            service: service.map(str::to_owned),
            kind,
            detail,
        };
        ring.next_seq += 1;
        tracing::info!(service = service.unwrap_or("-"), kind = ?record.kind, "{}", record.detail);
        if ring.items.len() == ring.keep {
            ring.items.pop_front();
        }
        ring.items.push_back(record.clone());
        // Sent under the lock so followers see events in sequence order.
        let _ = self.tx.send(record);
    }

    /// The last `last` events (all kept ones when `None`), oldest first.
    pub fn recent(&self, last: Option<usize>) -> Vec<EventRecord> {
        let ring = self
            .ring
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let skip = last.map_or(0, |n| ring.items.len().saturating_sub(n));
        ring.items.iter().skip(skip).cloned().collect()
    }

    /// The recent events and a receiver of every later one, with no gap between them.
    pub fn follow(
        &self,
        last: Option<usize>,
    ) -> (Vec<EventRecord>, broadcast::Receiver<EventRecord>) {
        let ring = self
            .ring
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let rx = self.tx.subscribe();
        let skip = last.map_or(0, |n| ring.items.len().saturating_sub(n));
        (ring.items.iter().skip(skip).cloned().collect(), rx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_keeps_the_newest_and_numbers_them() {
        let e = Events::new(3);
        for i in 0..5 {
            e.emit(Some("s"), EventKind::Spawned, format!("{i}"));
        }
        let r = e.recent(None);
        assert_eq!(r.iter().map(|x| x.seq).collect::<Vec<_>>(), vec![3, 4, 5]);
        assert_eq!(e.recent(Some(1))[0].detail, "4");
    }

    #[tokio::test]
    async fn followers_get_later_events_without_a_gap() {
        let e = Events::new(10);
        e.emit(None, EventKind::Reloaded, "a");
        let (past, mut rx) = e.follow(None);
        e.emit(None, EventKind::Reloaded, "b");
        assert_eq!(past.len(), 1);
        assert_eq!(rx.recv().await.expect("event").seq, 2);
    }
}
