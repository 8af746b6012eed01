//! The rules of the pump on the primary, as a sans-IO state machine: which records go to which
//! backup, when ring space may be released, when a backup must be resynced, and the lag of each.
//!
//! It never touches the ring, a socket or a clock: the executor feeds it records read from the
//! ring and messages from backups, and performs the [`Action`]s. Invariants it keeps (and its
//! tests check): each backup receives records in dense sequence order with no duplicates
//! within a connection; ring space is released only through a sequence number that every
//! backup holding the release has acknowledged as durable; a backup is resynced exactly when
//! the records it needs are no longer available.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::proto::{Mode, ToBackup};
use crate::{Op, OpRecord};

/// Bytes a record is counted as beyond its data (headers, path), for windows and lag.
const RECORD_OVERHEAD: usize = 64;
/// Verification resyncs in a row before the pump gives up on converging (and says so).
const MAX_VERIFY_ROUNDS: u32 = 3;

/// Limits of the pump.
#[derive(Debug, Clone)]
pub struct PumpConfig {
    /// Async or sync.
    pub mode: Mode,
    /// Most bytes of records in one `Ops` message.
    pub max_batch_bytes: usize,
    /// Most bytes sent to one backup and not yet acknowledged.
    pub max_inflight_bytes: usize,
    /// Most bytes of records kept in memory for backups that lag or reconnect.
    pub max_retained_bytes: usize,
    /// Async mode: when the ring is fuller than this fraction (per mille), a disconnected
    /// backup stops holding ring space (it will be resumed from memory or resynced).
    pub ring_high_water_permille: u64,
}

impl Default for PumpConfig {
    fn default() -> Self {
        Self {
            mode: Mode::Async,
            max_batch_bytes: 4 << 20,
            max_inflight_bytes: 32 << 20,
            max_retained_bytes: 256 << 20,
            ring_high_water_permille: 750,
        }
    }
}

/// What happens to the pump.
#[derive(Debug, Clone)]
pub enum Input {
    /// Records read from the ring, in order, starting at the pump's next sequence number.
    Records(Vec<OpRecord>),
    /// The ring skipped record `seq` (its producer died while writing it): every backup may
    /// miss that change and is resynced.
    Abandoned { seq: u64 },
    /// How full the ring is.
    RingUsage { used: u64, capacity: u64 },
    /// A connection to `backup` is up (handshake done).
    Connected { backup: String },
    /// The connection to `backup` is gone.
    Disconnected { backup: String },
    /// The backup's answer to `Hello`.
    State {
        backup: String,
        generation: u64,
        durable: u64,
    },
    /// The backup has everything through `durable` in its durable log.
    Ack { backup: String, durable: u64 },
    /// The executor finished resyncing `backup`; the backup continues at `next_seq`.
    ResyncDone { backup: String, next_seq: u64 },
}

/// What the executor must do.
#[derive(Debug, Clone)]
pub enum Action {
    /// Send a control message.
    Send { backup: String, msg: ToBackup },
    /// Send these records (dense, in order) as one `Ops` message.
    SendOps {
        backup: String,
        records: Vec<Arc<OpRecord>>,
    },
    /// Release ring space through this sequence number (it is durable on every backup that
    /// holds the release, or nobody needs it).
    Release { through: u64 },
    /// Resync `backup`: send `ResyncBegin { next_seq }`, exchange manifests, send the
    /// differences, then report [`Input::ResyncDone`].
    StartResync { backup: String, next_seq: u64 },
    /// Close the connection to `backup` (a protocol violation), then reconnect.
    Close { backup: String, reason: String },
}

/// A backup's link as the pump sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkState {
    /// Not connected.
    Down,
    /// Hello sent, waiting for the backup's state.
    Greeting,
    /// Being resynced; records from `next_seq` are kept for it.
    Resyncing { next_seq: u64 },
    /// Receiving records; `sent` is the last sequence number sent on this connection.
    Streaming { sent: u64 },
}

/// One backup's replication state, for `ftctl repl status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupView {
    /// The backup's node name.
    pub name: String,
    /// Its link.
    pub link: LinkState,
    /// Whether it is connected.
    pub connected: bool,
    /// Last sequence number it acknowledged as durable.
    pub acked: u64,
    /// Operations read from the ring and not yet acknowledged by it.
    pub lag_ops: u64,
    /// Bytes of those operations (counted while they are retained in memory).
    pub lag_bytes: u64,
    /// How long the oldest operation it has not acknowledged has been waiting.
    pub lag_time: Duration,
    /// Whether ring space waits for its acknowledgements.
    pub holds_release: bool,
    /// Resyncs started for it.
    pub resyncs: u64,
}

#[derive(Debug)]
struct Retained {
    rec: Arc<OpRecord>,
    weight: usize,
    read_at: Instant,
}

#[derive(Debug)]
struct Backup {
    link: LinkState,
    acked: u64,
    holds_release: bool,
    inflight: usize,
    resyncs: u64,
    /// When `acked` last reached the newest record read (for the time lag when nothing is
    /// retained any more).
    behind_since: Option<Instant>,
    /// A resync overlapped renames or links (see [`Pump::on_resync_done`]): once the backup has
    /// acknowledged this seq, it is compared again.
    verify_at: Option<u64>,
    /// Verification resyncs in a row.
    verify_rounds: u32,
}

/// The pump of one fileset.
#[derive(Debug)]
pub struct Pump {
    cfg: PumpConfig,
    fileset: String,
    generation: u64,
    epoch: u64,
    /// Records read and kept for backups, dense, ending at `next_seq - 1`.
    retained: VecDeque<Retained>,
    retained_bytes: usize,
    next_seq: u64,
    released: u64,
    backups: BTreeMap<String, Backup>,
}

impl Pump {
    /// A pump for `fileset` whose ring (of `generation`) next delivers `head_seq`; `backups`
    /// are the backup node names.
    pub fn new(
        cfg: PumpConfig,
        fileset: impl Into<String>,
        generation: u64,
        epoch: u64,
        head_seq: u64,
        backups: impl IntoIterator<Item = String>,
    ) -> Self {
        let head_seq = head_seq.max(1);
        let backups = backups
            .into_iter()
            .map(|name| {
                (
                    name,
                    Backup {
                        link: LinkState::Down,
                        acked: 0,
                        // Until a backup says where it is, unread ring records may be what it
                        // needs after a restart of the pump: hold them (async) like a
                        // disconnected backup does.
                        holds_release: cfg.mode == Mode::Async,
                        inflight: 0,
                        resyncs: 0,
                        behind_since: None,
                        verify_at: None,
                        verify_rounds: 0,
                    },
                )
            })
            .collect();
        Self {
            cfg,
            fileset: fileset.into(),
            generation,
            epoch,
            retained: VecDeque::new(),
            retained_bytes: 0,
            next_seq: head_seq,
            released: head_seq - 1,
            backups,
        }
    }

    /// The sequence number the next record read from the ring must carry.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Ring space released through this sequence number.
    pub fn released(&self) -> u64 {
        self.released
    }

    /// Records kept in memory: (count, bytes).
    pub fn retained(&self) -> (usize, usize) {
        (self.retained.len(), self.retained_bytes)
    }

    /// The retained records from `from` on (for a resync's catch-up and tests).
    pub fn retained_from(&self, from: u64) -> Vec<Arc<OpRecord>> {
        self.retained
            .iter()
            .filter(|r| r.rec.seq >= from)
            .map(|r| r.rec.clone())
            .collect()
    }

    /// The state of every backup.
    pub fn view(&self, now: Instant) -> Vec<BackupView> {
        self.backups
            .iter()
            .map(|(name, b)| {
                let newest = self.next_seq - 1;
                let unacked = self.retained.iter().filter(|r| r.rec.seq > b.acked);
                let lag_bytes = unacked.clone().map(|r| r.weight as u64).sum();
                let oldest = unacked.map(|r| r.read_at).next().or(if b.acked < newest {
                    b.behind_since
                } else {
                    None
                });
                BackupView {
                    name: name.clone(),
                    link: b.link,
                    connected: b.link != LinkState::Down,
                    acked: b.acked,
                    lag_ops: newest.saturating_sub(b.acked),
                    lag_bytes,
                    lag_time: oldest.map_or(Duration::ZERO, |t| now.saturating_duration_since(t)),
                    holds_release: b.holds_release,
                    resyncs: b.resyncs,
                }
            })
            .collect()
    }

    /// Feeds one input; returns what to do, in order.
    pub fn step(&mut self, now: Instant, input: Input) -> Vec<Action> {
        let mut out = Vec::new();
        match input {
            Input::Records(records) => self.on_records(now, records, &mut out),
            Input::Abandoned { seq } => self.on_abandoned(seq, &mut out),
            Input::RingUsage { used, capacity } => {
                let high = capacity.saturating_mul(self.cfg.ring_high_water_permille) / 1000;
                if used > high {
                    for b in self.backups.values_mut() {
                        if !matches!(b.link, LinkState::Streaming { .. }) {
                            b.holds_release = false;
                        }
                    }
                }
            }
            Input::Connected { backup } => {
                if let Some(b) = self.backups.get_mut(&backup) {
                    b.link = LinkState::Greeting;
                    b.inflight = 0;
                    out.push(Action::Send {
                        backup,
                        msg: ToBackup::Hello {
                            fileset: self.fileset.clone(),
                            generation: self.generation,
                            epoch: self.epoch,
                            mode: self.cfg.mode,
                        },
                    });
                }
            }
            Input::Disconnected { backup } => {
                if let Some(b) = self.backups.get_mut(&backup) {
                    let was_streaming = matches!(b.link, LinkState::Streaming { .. });
                    b.link = LinkState::Down;
                    b.inflight = 0;
                    // Sync mode waits only for reachable backups; async mode keeps the ring
                    // for a streaming backup that drops out briefly (until the high-water mark).
                    b.holds_release = self.cfg.mode == Mode::Async && was_streaming;
                }
            }
            Input::State {
                backup,
                generation,
                durable,
            } => self.on_state(now, backup, generation, durable, &mut out),
            Input::Ack { backup, durable } => self.on_ack(now, backup, durable, &mut out),
            Input::ResyncDone { backup, next_seq } => {
                self.on_resync_done(now, backup, next_seq, &mut out)
            }
        }
        self.release_and_trim(&mut out);
        out
    }

    fn on_records(&mut self, now: Instant, records: Vec<OpRecord>, out: &mut Vec<Action>) {
        for rec in records {
            if rec.seq != self.next_seq {
                // The reader is ours; a wrong seq is a bug there, not input to tolerate
                // silently: resync everyone from the record we were given.
                tracing::error!(
                    fileset = %self.fileset,
                    expected = self.next_seq,
                    got = rec.seq,
                    "ring delivered a record out of sequence; resyncing the backups"
                );
                self.on_abandoned(rec.seq.saturating_sub(1), out);
                if rec.seq != self.next_seq {
                    continue;
                }
            }
            let weight = rec.op.data_len() + RECORD_OVERHEAD;
            self.retained_bytes += weight;
            self.retained.push_back(Retained {
                rec: Arc::new(rec),
                weight,
                read_at: now,
            });
            self.next_seq += 1;
        }
        for b in self.backups.values_mut() {
            if b.behind_since.is_none() && b.acked < self.next_seq - 1 {
                b.behind_since = Some(now);
            }
        }
        let names: Vec<String> = self.backups.keys().cloned().collect();
        for name in names {
            self.send_more(&name, out);
        }
    }

    fn on_abandoned(&mut self, seq: u64, out: &mut Vec<Action>) {
        // Records up to `seq` can no longer be delivered densely.
        self.retained.clear();
        self.retained_bytes = 0;
        self.next_seq = self.next_seq.max(seq + 1);
        let next = self.next_seq;
        for (name, b) in &mut self.backups {
            b.holds_release = false;
            b.inflight = 0;
            if b.link != LinkState::Down {
                b.link = LinkState::Resyncing { next_seq: next };
                b.resyncs += 1;
                out.push(Action::StartResync {
                    backup: name.clone(),
                    next_seq: next,
                });
            }
        }
    }

    fn first_retained(&self) -> u64 {
        self.retained.front().map_or(self.next_seq, |r| r.rec.seq)
    }

    fn on_state(
        &mut self,
        now: Instant,
        backup: String,
        generation: u64,
        durable: u64,
        out: &mut Vec<Action>,
    ) {
        let first = self.first_retained();
        let next = self.next_seq;
        let Some(b) = self.backups.get_mut(&backup) else {
            return;
        };
        if b.link != LinkState::Greeting {
            out.push(Action::Close {
                backup,
                reason: "State outside the greeting".into(),
            });
            return;
        }
        // Resume when the backup is on our stream and everything after its durable point is
        // still here (in memory, or about to be read from the ring).
        let resumable = generation == self.generation && durable < next && durable + 1 >= first;
        if resumable {
            b.link = LinkState::Streaming { sent: durable };
            b.acked = durable;
            b.holds_release = true;
            b.behind_since = (durable < next - 1).then_some(now);
            self.send_more(&backup, out);
        } else {
            b.link = LinkState::Resyncing { next_seq: next };
            b.holds_release = false;
            b.resyncs += 1;
            out.push(Action::StartResync {
                backup,
                next_seq: next,
            });
        }
    }

    fn on_ack(&mut self, now: Instant, backup: String, durable: u64, out: &mut Vec<Action>) {
        let newest = self.next_seq - 1;
        let Some(b) = self.backups.get_mut(&backup) else {
            return;
        };
        if matches!(b.link, LinkState::Resyncing { next_seq } if durable < next_seq) {
            // The backup's ack of the resync's end can overtake the resync task's report.
            return;
        }
        let LinkState::Streaming { sent } = b.link else {
            out.push(Action::Close {
                backup,
                reason: "Ack while not streaming".into(),
            });
            return;
        };
        if durable > sent {
            out.push(Action::Close {
                backup,
                reason: format!("Ack of {durable} beyond the last record sent ({sent})"),
            });
            return;
        }
        if durable <= b.acked {
            return;
        }
        let newly: usize = self
            .retained
            .iter()
            .filter(|r| r.rec.seq > b.acked && r.rec.seq <= durable)
            .map(|r| r.weight)
            .sum();
        b.inflight = b.inflight.saturating_sub(newly);
        b.acked = durable;
        b.behind_since = (durable < newest).then_some(now);
        if b.verify_at.is_some_and(|v| durable >= v) {
            b.verify_at = None;
            b.link = LinkState::Resyncing {
                next_seq: self.next_seq,
            };
            b.holds_release = false;
            b.resyncs += 1;
            out.push(Action::StartResync {
                backup,
                next_seq: self.next_seq,
            });
            return;
        }
        self.send_more(&backup, out);
    }

    fn on_resync_done(
        &mut self,
        now: Instant,
        backup: String,
        next_seq: u64,
        out: &mut Vec<Action>,
    ) {
        let first = self.first_retained();
        let next = self.next_seq;
        let Some(b) = self.backups.get_mut(&backup) else {
            return;
        };
        if b.link != (LinkState::Resyncing { next_seq }) {
            return; // a stale report (the link dropped and came back meanwhile)
        }
        if next_seq < first {
            // Memory overflowed while the resync ran: what it needs is gone; go again.
            b.link = LinkState::Resyncing { next_seq: next };
            b.resyncs += 1;
            out.push(Action::StartResync {
                backup,
                next_seq: next,
            });
            return;
        }
        b.link = LinkState::Streaming { sent: next_seq - 1 };
        b.acked = next_seq - 1;
        b.holds_release = true;
        b.inflight = 0;
        // The resync copied files as they were while it ran, and the records from `next_seq`
        // on are applied on top. That converges for path-local operations, but a rename or
        // link among them may have moved a name that the copy already shows in its later
        // state: compare the trees once more when the backup has caught up with them.
        let overlapped = self.retained.iter().any(|r| {
            r.rec.seq >= next_seq && matches!(r.rec.op, Op::Rename { .. } | Op::Link { .. })
        });
        if overlapped && b.verify_rounds < MAX_VERIFY_ROUNDS {
            b.verify_at = Some(next - 1);
            b.verify_rounds += 1;
        } else {
            if overlapped {
                tracing::warn!(
                    fileset = %self.fileset, %backup,
                    "renames keep overlapping resyncs; the replica is compared again at the next resync"
                );
            }
            b.verify_at = None;
            b.verify_rounds = 0;
        }
        b.behind_since = (next_seq - 1 < next - 1).then_some(now);
        self.send_more(&backup, out);
    }

    /// Sends `backup` what it has not got yet, within its window, in batches.
    fn send_more(&mut self, backup: &str, out: &mut Vec<Action>) {
        let Some(b) = self.backups.get_mut(backup) else {
            return;
        };
        let LinkState::Streaming { sent } = b.link else {
            return;
        };
        let first = self.retained.front().map_or(self.next_seq, |r| r.rec.seq);
        let Some(start) = (sent + 1).checked_sub(first) else {
            return;
        };
        let Ok(start) = usize::try_from(start) else {
            return;
        };
        let mut batch = Vec::new();
        let mut batch_bytes = 0;
        let mut last = sent;
        for r in self.retained.iter().skip(start) {
            if b.inflight + r.weight > self.cfg.max_inflight_bytes && b.inflight > 0 {
                break;
            }
            if batch_bytes + r.weight > self.cfg.max_batch_bytes && !batch.is_empty() {
                out.push(Action::SendOps {
                    backup: backup.to_owned(),
                    records: std::mem::take(&mut batch),
                });
                batch_bytes = 0;
            }
            batch.push(r.rec.clone());
            batch_bytes += r.weight;
            b.inflight += r.weight;
            last = r.rec.seq;
        }
        if !batch.is_empty() {
            out.push(Action::SendOps {
                backup: backup.to_owned(),
                records: batch,
            });
        }
        b.link = LinkState::Streaming { sent: last };
    }

    fn release_and_trim(&mut self, out: &mut Vec<Action>) {
        let newest = self.next_seq - 1;
        let release = self
            .backups
            .values()
            .filter(|b| b.holds_release)
            .map(|b| b.acked)
            .min()
            .unwrap_or(newest)
            .min(newest);
        if release > self.released {
            self.released = release;
            out.push(Action::Release { through: release });
        }
        // Keep in memory what any backup may still ask for: from the oldest acknowledgement
        // of a backup that can resume (not one that must be resynced anyway).
        let keep_from = self
            .backups
            .values()
            .map(|b| match b.link {
                LinkState::Resyncing { next_seq } => next_seq,
                // Down and greeting backups too, within the memory budget, so a short outage
                // needs no resync.
                LinkState::Streaming { .. } | LinkState::Down | LinkState::Greeting => b.acked + 1,
            })
            .min()
            .unwrap_or(self.next_seq);
        while let Some(front) = self.retained.front() {
            let over_budget = self.retained_bytes > self.cfg.max_retained_bytes;
            if front.rec.seq >= keep_from && !over_budget {
                break;
            }
            // A streaming backup's unacknowledged records are never dropped: its window
            // bounds them.
            let needed_by_stream = self
                .backups
                .values()
                .any(|b| matches!(b.link, LinkState::Streaming { .. }) && b.acked < front.rec.seq);
            if needed_by_stream {
                break;
            }
            self.retained_bytes -= front.weight;
            self.retained.pop_front();
        }
    }
}

#[cfg(test)]
mod tests;
