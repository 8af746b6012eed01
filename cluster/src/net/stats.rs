//! Counters of the transport: connections accepted and dialed, refusals by kind and direction.
//! Shared by every clone of a [`crate::net::NetConfig`]; updated with relaxed atomics because
//! they are statistics, never used to make a decision.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

use super::error::{NetError, RefusalKind};

/// A handle on one node's transport counters; clones share them.
#[derive(Debug, Clone, Default)]
pub struct NetStats(Arc<Counters>);

#[derive(Debug, Default)]
struct Counters {
    accepted: AtomicU64,
    dialed: AtomicU64,
    dial_failed: AtomicU64,
    inbound_refused: [AtomicU64; RefusalKind::ALL.len()],
    outbound_refused: [AtomicU64; RefusalKind::ALL.len()],
}

/// The counters at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct NetStatsSnapshot {
    /// Inbound connections that completed the handshake.
    pub accepted: u64,
    /// Outbound connections that completed the handshake.
    pub dialed: u64,
    /// Outbound TCP connects that failed or timed out (no handshake took place).
    pub dial_failed: u64,
    /// Inbound handshakes that failed, by reason.
    pub inbound_refused: RefusalCounts,
    /// Outbound handshakes that failed, by reason.
    pub outbound_refused: RefusalCounts,
}

/// Failed handshakes by [`RefusalKind`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct RefusalCounts {
    pub version: u64,
    pub cluster: u64,
    pub channel: u64,
    pub auth: u64,
    pub malformed: u64,
    pub oversized: u64,
    pub truncated: u64,
    pub closed: u64,
    pub timeout: u64,
    pub busy: u64,
    pub io: u64,
    pub other: u64,
}

impl RefusalCounts {
    /// The count of one kind.
    pub fn get(&self, kind: RefusalKind) -> u64 {
        match kind {
            RefusalKind::Version => self.version,
            RefusalKind::Cluster => self.cluster,
            RefusalKind::Channel => self.channel,
            RefusalKind::Auth => self.auth,
            RefusalKind::Malformed => self.malformed,
            RefusalKind::Oversized => self.oversized,
            RefusalKind::Truncated => self.truncated,
            RefusalKind::Closed => self.closed,
            RefusalKind::Timeout => self.timeout,
            RefusalKind::Busy => self.busy,
            RefusalKind::Io => self.io,
            RefusalKind::Other => self.other,
        }
    }

    /// All failed handshakes.
    pub fn total(&self) -> u64 {
        RefusalKind::ALL.iter().map(|kind| self.get(*kind)).sum()
    }

    fn from_counters(counters: &[AtomicU64; RefusalKind::ALL.len()]) -> RefusalCounts {
        let at = |kind: RefusalKind| counters[kind.index()].load(Ordering::Relaxed);
        RefusalCounts {
            version: at(RefusalKind::Version),
            cluster: at(RefusalKind::Cluster),
            channel: at(RefusalKind::Channel),
            auth: at(RefusalKind::Auth),
            malformed: at(RefusalKind::Malformed),
            oversized: at(RefusalKind::Oversized),
            truncated: at(RefusalKind::Truncated),
            closed: at(RefusalKind::Closed),
            timeout: at(RefusalKind::Timeout),
            busy: at(RefusalKind::Busy),
            io: at(RefusalKind::Io),
            other: at(RefusalKind::Other),
        }
    }
}

impl NetStats {
    /// Reads every counter.
    pub fn snapshot(&self) -> NetStatsSnapshot {
        let c = &self.0;
        NetStatsSnapshot {
            accepted: c.accepted.load(Ordering::Relaxed),
            dialed: c.dialed.load(Ordering::Relaxed),
            dial_failed: c.dial_failed.load(Ordering::Relaxed),
            inbound_refused: RefusalCounts::from_counters(&c.inbound_refused),
            outbound_refused: RefusalCounts::from_counters(&c.outbound_refused),
        }
    }

    pub(crate) fn count_accepted(&self) {
        self.0.accepted.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn count_dialed(&self) {
        self.0.dialed.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn count_dial_failed(&self) {
        self.0.dial_failed.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn count_inbound_refusal(&self, err: &NetError) {
        if let Some(kind) = err.refusal_kind() {
            self.0.inbound_refused[kind.index()].fetch_add(1, Ordering::Relaxed);
        }
    }

    pub(crate) fn count_outbound_refusal(&self, err: &NetError) {
        if let Some(kind) = err.refusal_kind() {
            self.0.outbound_refused[kind.index()].fetch_add(1, Ordering::Relaxed);
        }
    }
}
