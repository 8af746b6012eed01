//! Quorum: who may act. Votes are the configured nodes plus, where configured, one quorum disk
//! whose vote goes to the node that holds its lease. This module owns the vote count
//! ([`Votes`]) and the quorum disk's lease protocol ([`QuorumDisk`], a sans-IO state machine over
//! block reads and writes, with [`Disk`] implementations in memory and on a file or device).
//! It never decides membership (that is [`crate::membership`]), never takes a lock (a shared
//! disk has none), and never trusts a sector whose checksum does not match.
//!
//! # The lease protocol (delta leases: only reads, writes and each node's own clock)
//!
//! The disk holds one *slot* per configured node, each two sectors written alternately (a torn
//! write destroys at most the older copy). A sector holds `(node, state, generation, counter,
//! epoch)` and a CRC32C; anything that does not check out reads as *unknown*, never as a lease.
//! Every node reads all slots every `renew_interval` and remembers the bytes of the other
//! slots and the moment they last changed.
//!
//! - **Acquire.** A node that wants the disk waits until no other slot changed for
//!   `takeover_delay` (measured from the completion of the read that saw the last change to the
//!   start of a read that saw none), writes a *claim* into its own slot (generation = highest
//!   seen + 1), waits `settle`, reads again and owns the disk only if no other slot changed
//!   since its watch began. Otherwise it watches again, for `takeover_delay` plus a random
//!   time below `claim_backoff`.
//!   Because `settle > io_timeout`, of two claims at most one survives: each claimant sees the
//!   other's claim unless that claim started after its own confirming read.
//! - **Renew.** The owner rewrites its slot every `renew_interval`. A renewal that started at
//!   `s` and completed within `io_timeout` extends the lease to `s + lease_time -
//!   safety_margin`: at that instant the owner stops acting, whether or not later renewals
//!   failed ([`DiskEvent::Lost`]).
//! - **Why nobody takes over early.** A challenger claims only after `takeover_delay` without
//!   any change; every successful renewal lands within `io_timeout` of its start, and
//!   `takeover_delay > lease_time + max_clock_drift + io_timeout`, so the owner's last lease
//!   ended before the challenger's claim even with clocks running at slightly different rates.
//! - **Epochs.** Writes carry the highest membership epoch the writer knows; membership asks
//!   the owner to publish an epoch before it accepts a view that counts the disk's vote, and a
//!   new owner starts above every epoch it read (see [`crate::membership`]).

use std::collections::BTreeSet;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::membership::{MAX_NODES, NodeId, View};

/// The votes of a cluster: one per configured node, and one for the quorum disk when there is
/// one (the tie-breaker that lets a two-node cluster survive the loss of either node).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Votes {
    nodes: BTreeSet<NodeId>,
    disk: bool,
}

impl Votes {
    /// The votes of `nodes` (every configured node), plus the disk's when `disk`.
    pub fn new(nodes: impl IntoIterator<Item = NodeId>, disk: bool) -> Votes {
        Votes {
            nodes: nodes.into_iter().collect(),
            disk,
        }
    }

    /// Whether a quorum disk votes.
    pub fn has_disk(&self) -> bool {
        self.disk
    }

    /// All votes.
    pub fn total(&self) -> usize {
        self.nodes.len() + usize::from(self.disk)
    }

    /// The votes a partition needs: more than half of [`Votes::total`].
    pub fn majority(&self) -> usize {
        self.total() / 2 + 1
    }

    /// The votes `members` hold: one per configured member, plus the disk's when the disk is
    /// configured and owned by one of them. Unknown names hold no vote.
    pub fn count(&self, members: &BTreeSet<NodeId>, disk_owner: Option<&str>) -> usize {
        let nodes = members.iter().filter(|m| self.nodes.contains(*m)).count();
        let disk = self.disk && disk_owner.is_some_and(|o| members.contains(o));
        nodes + usize::from(disk)
    }

    /// Whether `members` hold a majority of the votes, counting the disk when `disk_owner` is
    /// one of them.
    pub fn has_quorum_of(&self, members: &BTreeSet<NodeId>, disk_owner: Option<&str>) -> bool {
        self.count(members, disk_owner) >= self.majority()
    }

    /// Whether the members of `view` hold quorum while `disk_owner` owns the quorum disk.
    pub fn has_quorum(&self, view: &View, disk_owner: Option<&str>) -> bool {
        self.has_quorum_of(&view.members, disk_owner)
    }
}

/// The size of one sector of the quorum disk: the largest logical block size of common
/// devices, so direct I/O works on 512-byte and 4K devices alike.
pub const SECTOR_SIZE: usize = 4096;
/// Sectors per node slot (two copies written alternately).
pub const SECTORS_PER_SLOT: u64 = 2;
/// Default of [`DiskConfig::renew_interval`].
pub const DEFAULT_RENEW_INTERVAL: Duration = Duration::from_millis(120);
/// Default of [`DiskConfig::lease_time`].
pub const DEFAULT_LEASE_TIME: Duration = Duration::from_millis(450);
/// Default of [`DiskConfig::safety_margin`].
pub const DEFAULT_SAFETY_MARGIN: Duration = Duration::from_millis(100);
/// Default of [`DiskConfig::io_timeout`].
pub const DEFAULT_IO_TIMEOUT: Duration = Duration::from_millis(80);
/// Default of [`DiskConfig::max_clock_drift`].
pub const DEFAULT_MAX_CLOCK_DRIFT: Duration = Duration::from_millis(50);
/// Default of [`DiskConfig::takeover_delay`].
pub const DEFAULT_TAKEOVER_DELAY: Duration = Duration::from_millis(600);
/// Default of [`DiskConfig::settle`].
pub const DEFAULT_SETTLE: Duration = Duration::from_millis(100);
/// Default of [`DiskConfig::claim_backoff`].
pub const DEFAULT_CLAIM_BACKOFF: Duration = Duration::from_millis(500);

const MAGIC: [u8; 4] = *b"FTQD";
const FORMAT_VERSION: u16 = 1;
/// Where the CRC32C of a sector sits (it covers every byte before it).
const CRC_OFFSET: usize = SECTOR_SIZE - 4;
const NAME_OFFSET: usize = 40;
/// Alignment of buffers and offsets for direct I/O.
const DIRECT_ALIGN: usize = 4096;

/// Errors of the quorum disk.
#[derive(Debug, thiserror::Error)]
pub enum QuorumError {
    /// A field of the configuration is invalid or the timings are unsafe.
    #[error("quorum disk configuration: {field}: {why}")]
    InvalidConfig {
        /// The field.
        field: &'static str,
        /// Why.
        why: String,
    },
    /// The disk could not be opened or prepared.
    #[error("quorum disk {path}: {source}")]
    Open {
        /// The file or device.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
}

fn invalid(field: &'static str, why: impl Into<String>) -> QuorumError {
    QuorumError::InvalidConfig {
        field,
        why: why.into(),
    }
}

/// The lease protocol's parameters; every node of the cluster must use the same values and the
/// same slot order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskConfig {
    /// The cluster's name: sectors of another cluster read as unknown.
    pub cluster: String,
    /// The nodes in slot order: a node's index is its slot. Append new nodes at the end.
    pub slots: Vec<NodeId>,
    /// How often the owner renews and every node reads the slots.
    pub renew_interval: Duration,
    /// How long one successful renewal keeps the lease, from the renewal's start.
    pub lease_time: Duration,
    /// The owner stops acting this long before its lease ends: covers a late timer.
    pub safety_margin: Duration,
    /// An I/O that takes longer counts as failed.
    pub io_timeout: Duration,
    /// The most the clocks of two nodes may drift apart over one `takeover_delay`.
    pub max_clock_drift: Duration,
    /// How long a challenger watches the slots stay unchanged before it claims.
    pub takeover_delay: Duration,
    /// How long a claimant waits after its claim before the confirming read.
    pub settle: Duration,
    /// The longest random wait after a contested claim.
    pub claim_backoff: Duration,
}

impl DiskConfig {
    /// A configuration with the default timings.
    pub fn new(cluster: impl Into<String>, slots: impl IntoIterator<Item = NodeId>) -> DiskConfig {
        DiskConfig {
            cluster: cluster.into(),
            slots: slots.into_iter().collect(),
            renew_interval: DEFAULT_RENEW_INTERVAL,
            lease_time: DEFAULT_LEASE_TIME,
            safety_margin: DEFAULT_SAFETY_MARGIN,
            io_timeout: DEFAULT_IO_TIMEOUT,
            max_clock_drift: DEFAULT_MAX_CLOCK_DRIFT,
            takeover_delay: DEFAULT_TAKEOVER_DELAY,
            settle: DEFAULT_SETTLE,
            claim_backoff: DEFAULT_CLAIM_BACKOFF,
        }
    }

    /// The sectors the slots occupy (the disk must be at least this many sectors long).
    pub fn sectors(&self) -> u64 {
        u64::try_from(self.slots.len())
            .unwrap_or(u64::MAX)
            .saturating_mul(SECTORS_PER_SLOT)
    }

    /// Checks every field and the safety relations between the timings, for node `me`.
    pub fn validate(&self, me: &str) -> Result<(), QuorumError> {
        if self.cluster.is_empty() || self.cluster.len() > crate::net::MAX_NAME_LEN {
            return Err(invalid("cluster", "must be 1 to 255 bytes"));
        }
        if self.slots.is_empty() || self.slots.len() > MAX_NODES {
            return Err(invalid(
                "slots",
                format!("{} slots; 1 to {MAX_NODES} are supported", self.slots.len()),
            ));
        }
        let mut seen = BTreeSet::new();
        for n in &self.slots {
            if n.is_empty() || n.len() > crate::net::MAX_NAME_LEN || n.chars().any(char::is_control)
            {
                return Err(invalid("slots", format!("{n:?} is not a valid node name")));
            }
            if !seen.insert(n) {
                return Err(invalid("slots", format!("{n:?} has two slots")));
            }
        }
        if !seen.contains(&me.to_owned()) {
            return Err(invalid("slots", format!("this node {me:?} has no slot")));
        }
        for (field, d) in [
            ("renew_interval", self.renew_interval),
            ("lease_time", self.lease_time),
            ("safety_margin", self.safety_margin),
            ("io_timeout", self.io_timeout),
            ("max_clock_drift", self.max_clock_drift),
            ("takeover_delay", self.takeover_delay),
            ("settle", self.settle),
            ("claim_backoff", self.claim_backoff),
        ] {
            if d.is_zero() {
                return Err(invalid(field, "must be longer than zero"));
            }
        }
        if self.io_timeout >= self.renew_interval {
            return Err(invalid(
                "io_timeout",
                format!(
                    "({:?}) must be shorter than renew_interval ({:?}): one renewal at a time",
                    self.io_timeout, self.renew_interval
                ),
            ));
        }
        if self.renew_interval.saturating_mul(2) >= self.lease_time {
            return Err(invalid(
                "renew_interval",
                format!(
                    "({:?}) must be shorter than half of lease_time ({:?}): one failed renewal must not lose the lease",
                    self.renew_interval, self.lease_time
                ),
            ));
        }
        let cycle = self.safety_margin + self.renew_interval + self.io_timeout;
        if cycle >= self.lease_time {
            return Err(invalid(
                "safety_margin",
                format!(
                    "safety_margin + renew_interval + io_timeout ({cycle:?}) must be shorter than lease_time ({:?}), or the owner stops acting between two good renewals",
                    self.lease_time
                ),
            ));
        }
        let bound = self.lease_time + self.max_clock_drift + self.io_timeout;
        if self.takeover_delay <= bound {
            return Err(invalid(
                "takeover_delay",
                format!(
                    "({:?}) must be longer than lease_time + max_clock_drift + io_timeout ({bound:?}), or a challenger could take the disk while the owner still acts",
                    self.takeover_delay
                ),
            ));
        }
        if self.settle <= self.io_timeout {
            return Err(invalid(
                "settle",
                format!(
                    "({:?}) must be longer than io_timeout ({:?}), or two claimants could both miss each other's claim",
                    self.settle, self.io_timeout
                ),
            ));
        }
        Ok(())
    }

    /// The cluster's identity on the disk: sectors (and the cluster database's area) of another
    /// cluster carry another hash and read as unknown.
    pub fn cluster_hash(&self) -> u64 {
        let digest = Sha256::digest(self.cluster.as_bytes());
        let mut b = [0u8; 8];
        b.copy_from_slice(&digest[..8]);
        u64::from_le_bytes(b)
    }
}

/// What a slot's record says about its node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotState {
    /// It claims the disk.
    Claiming,
    /// It owns the disk and renews.
    Owner,
    /// It neither claims nor owns.
    Idle,
}

impl SlotState {
    fn code(self) -> u8 {
        match self {
            SlotState::Claiming => 1,
            SlotState::Owner => 2,
            SlotState::Idle => 3,
        }
    }

    fn from_code(c: u8) -> Option<SlotState> {
        match c {
            1 => Some(SlotState::Claiming),
            2 => Some(SlotState::Owner),
            3 => Some(SlotState::Idle),
            _ => None,
        }
    }
}

/// One node's record in its slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotRecord {
    /// The node that wrote it.
    pub node: NodeId,
    /// Its state.
    pub state: SlotState,
    /// The lease generation (a fencing token: higher for every acquisition).
    pub generation: u64,
    /// Increases with every write of the node.
    pub counter: u64,
    /// The highest membership epoch the node knew.
    pub epoch: u64,
}

/// What a sector holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sector {
    /// Never written (all zero).
    Empty,
    /// A record whose checksum matches.
    Valid(SlotRecord),
    /// Anything else: torn, garbled, of another cluster or format.
    Unknown(&'static str),
}

/// Encodes `rec` into one sector of the cluster with hash `cluster_hash`.
pub fn encode_sector(cluster_hash: u64, rec: &SlotRecord) -> Box<[u8; SECTOR_SIZE]> {
    let mut s = Box::new([0u8; SECTOR_SIZE]);
    s[0..4].copy_from_slice(&MAGIC);
    s[4..6].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    s[6] = rec.state.code();
    let name = rec.node.as_bytes();
    let len = name.len().min(crate::net::MAX_NAME_LEN);
    s[7] = u8::try_from(len).unwrap_or(u8::MAX);
    s[8..16].copy_from_slice(&cluster_hash.to_le_bytes());
    s[16..24].copy_from_slice(&rec.generation.to_le_bytes());
    s[24..32].copy_from_slice(&rec.counter.to_le_bytes());
    s[32..40].copy_from_slice(&rec.epoch.to_le_bytes());
    s[NAME_OFFSET..NAME_OFFSET + len].copy_from_slice(&name[..len]);
    let crc = crc32c::crc32c(&s[..CRC_OFFSET]);
    s[CRC_OFFSET..].copy_from_slice(&crc.to_le_bytes());
    s
}

fn u64_at(s: &[u8; SECTOR_SIZE], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&s[at..at + 8]);
    u64::from_le_bytes(b)
}

/// Decodes one sector; only a sector whose checksum, magic, version and cluster match is a
/// record.
pub fn decode_sector(cluster_hash: u64, s: &[u8; SECTOR_SIZE]) -> Sector {
    if s.iter().all(|b| *b == 0) {
        return Sector::Empty;
    }
    let mut crc = [0u8; 4];
    crc.copy_from_slice(&s[CRC_OFFSET..]);
    if crc32c::crc32c(&s[..CRC_OFFSET]) != u32::from_le_bytes(crc) {
        return Sector::Unknown("checksum mismatch (torn or garbled sector)");
    }
    if s[0..4] != MAGIC {
        return Sector::Unknown("not a quorum disk sector");
    }
    if s[4..6] != FORMAT_VERSION.to_le_bytes() {
        return Sector::Unknown("unknown format version");
    }
    if u64_at(s, 8) != cluster_hash {
        return Sector::Unknown("sector of another cluster");
    }
    let Some(state) = SlotState::from_code(s[6]) else {
        return Sector::Unknown("unknown slot state");
    };
    let len = usize::from(s[7]);
    let Ok(node) = std::str::from_utf8(&s[NAME_OFFSET..NAME_OFFSET + len]) else {
        return Sector::Unknown("node name is not UTF-8");
    };
    Sector::Valid(SlotRecord {
        node: node.to_owned(),
        state,
        generation: u64_at(s, 16),
        counter: u64_at(s, 24),
        epoch: u64_at(s, 32),
    })
}

/// A read or a write of the quorum disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskOp {
    /// Read `count` sectors from `first`.
    Read {
        /// The first sector.
        first: u64,
        /// How many.
        count: u64,
    },
    /// Write one sector.
    Write {
        /// The sector.
        sector: u64,
        /// Its new contents.
        data: Box<[u8; SECTOR_SIZE]>,
    },
}

/// The outcome of a [`DiskOp`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskReply {
    /// A read finished.
    Read {
        /// The request's id.
        id: u64,
        /// The sectors, or why not.
        result: Result<Vec<[u8; SECTOR_SIZE]>, String>,
    },
    /// A write finished (the data is on stable storage).
    Write {
        /// The request's id.
        id: u64,
        /// Success, or why not.
        result: Result<(), String>,
    },
}

/// What happens to the disk machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskInput {
    /// The time of [`QuorumDisk::next_deadline`] came.
    Tick,
    /// Membership wants (true) or gives up (false) the disk.
    Want(bool),
    /// Publish this membership epoch in this node's slot (the owner only).
    Publish(u64),
    /// An I/O finished.
    Io(DiskReply),
}

/// Something to report about the disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskEvent {
    /// This node owns the disk.
    Acquired {
        /// The lease generation.
        generation: u64,
        /// The highest epoch read from any slot.
        max_epoch: u64,
    },
    /// The lease ended (renewals failed or came late); this node stopped acting as owner.
    Lost {
        /// Why.
        reason: String,
    },
    /// This node gave the disk up (membership no longer needs it).
    Released,
    /// The epoch is on the disk.
    Published {
        /// The epoch.
        epoch: u64,
    },
    /// Another node wrote while this node claimed: it backs off.
    Contested,
    /// A renewal failed or came late (the lease holds until its end).
    RenewalFailed {
        /// Why.
        why: String,
    },
    /// A read failed.
    ReadFailed {
        /// Why.
        why: String,
    },
    /// A slot could not be read (torn, garbled, or written by the wrong node).
    Unreadable {
        /// The slot's node.
        slot: NodeId,
        /// Why.
        why: String,
    },
}

/// What the executor must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskAction {
    /// Perform `op` and report [`DiskInput::Io`] with the same `id` (at most one at a time;
    /// a reply after `io_timeout` is ignored).
    Io {
        /// The request's id.
        id: u64,
        /// The operation.
        op: DiskOp,
    },
    /// Report this.
    Event(DiskEvent),
}

/// The lease as membership needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskStatus {
    /// This node owns the disk and may act as its owner until then.
    pub valid_until: Option<Instant>,
    /// The highest epoch read from or written to the disk.
    pub max_epoch: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum IoKind {
    Monitor,
    Claim,
    Confirm,
    Renew { epoch: u64 },
}

#[derive(Debug, Clone, Copy)]
struct Outstanding {
    id: u64,
    started: Instant,
    kind: IoKind,
}

#[derive(Debug, Clone, Copy)]
enum Phase {
    Monitoring,
    /// The claim is on the disk; the confirming read starts at `until`.
    Settling {
        claim_started: Instant,
        until: Instant,
    },
    /// The confirming read (or the claim write) is outstanding.
    Claiming {
        claim_started: Instant,
    },
    Owner {
        valid_until: Instant,
        next_renew: Instant,
    },
}

/// The quorum disk lease machine of one node.
#[derive(Debug)]
pub struct QuorumDisk {
    cfg: DiskConfig,
    slot: usize,
    cluster_hash: u64,
    rng: u64,
    phase: Phase,
    io: Option<Outstanding>,
    next_id: u64,
    want: bool,
    /// The other slots' sectors as last read.
    baseline: Option<Vec<[u8; SECTOR_SIZE]>>,
    /// Completion of the read that first saw the baseline.
    quiet_since: Option<Instant>,
    next_read: Instant,
    /// Added to `takeover_delay` after a contested claim, so claimants stop colliding.
    backoff: Duration,
    counter: u64,
    generation: u64,
    max_generation: u64,
    max_epoch: u64,
    publish: Option<u64>,
    /// Unreadable slots already reported.
    reported: BTreeSet<usize>,
}

impl QuorumDisk {
    /// The machine of node `me`; `seed` drives the backoff after contested claims. Feed it a
    /// [`DiskInput::Tick`] right after creating it: its first read is due at once.
    pub fn new(
        cfg: DiskConfig,
        me: &str,
        seed: u64,
        now: Instant,
    ) -> Result<QuorumDisk, QuorumError> {
        cfg.validate(me)?;
        let slot = cfg
            .slots
            .iter()
            .position(|n| n == me)
            .ok_or_else(|| invalid("slots", format!("this node {me:?} has no slot")))?;
        Ok(QuorumDisk {
            cluster_hash: cfg.cluster_hash(),
            cfg,
            slot,
            // Mixed with the slot so that two nodes never share a backoff sequence, even when
            // their seeds collide.
            rng: (seed
                ^ u64::try_from(slot)
                    .unwrap_or(0)
                    .wrapping_mul(0x9E37_79B9_7F4A_7C15))
            .wrapping_mul(0xBF58_476D_1CE4_E5B9)
                | 1,
            phase: Phase::Monitoring,
            io: None,
            next_id: 1,
            want: false,
            baseline: None,
            quiet_since: None,
            next_read: now,
            backoff: Duration::ZERO,
            counter: 0,
            generation: 0,
            max_generation: 0,
            max_epoch: 0,
            publish: None,
            reported: BTreeSet::new(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &DiskConfig {
        &self.cfg
    }

    /// The lease as membership needs it.
    pub fn status(&self, now: Instant) -> DiskStatus {
        let valid_until = match self.phase {
            Phase::Owner { valid_until, .. } if now < valid_until => Some(valid_until),
            _ => None,
        };
        DiskStatus {
            valid_until,
            max_epoch: self.max_epoch,
        }
    }

    /// Whether this node owns the disk now.
    pub fn is_owner(&self, now: Instant) -> bool {
        self.status(now).valid_until.is_some()
    }

    /// The generation of the current (or last) lease of this node.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// When the machine next needs a [`DiskInput::Tick`].
    pub fn next_deadline(&self, now: Instant) -> Option<Instant> {
        let mut times = vec![
            self.io
                .and_then(|o| o.started.checked_add(self.cfg.io_timeout)),
        ];
        match self.phase {
            Phase::Monitoring => times.push(Some(self.next_read)),
            Phase::Settling { until, .. } => times.push(Some(until)),
            Phase::Claiming { .. } => {}
            Phase::Owner {
                valid_until,
                next_renew,
            } => {
                times.push(Some(valid_until));
                times.push(Some(next_renew));
            }
        }
        times.into_iter().flatten().filter(|t| *t > now).min()
    }

    /// Feeds one input and returns what to do.
    pub fn step(&mut self, now: Instant, input: DiskInput) -> Vec<DiskAction> {
        let mut out = Vec::new();
        match input {
            DiskInput::Tick => {}
            DiskInput::Want(w) => {
                self.want = w;
                if !w && matches!(self.phase, Phase::Owner { .. }) {
                    self.restart_watch(now);
                    out.push(DiskAction::Event(DiskEvent::Released));
                }
            }
            DiskInput::Publish(e) => {
                self.max_epoch = self.max_epoch.max(e);
                self.publish = Some(self.publish.map_or(e, |p| p.max(e)));
            }
            DiskInput::Io(reply) => self.on_reply(now, reply, &mut out),
        }
        self.drive(now, &mut out);
        out
    }

    fn random_below(&mut self, d: Duration) -> Duration {
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        let x = self.rng.wrapping_mul(0x2545_F491_4F6C_DD1D);
        let span = u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1);
        Duration::from_micros(x % span)
    }

    fn restart_watch(&mut self, now: Instant) {
        self.phase = Phase::Monitoring;
        // Watch again from scratch: the next read sets the baseline.
        self.baseline = None;
        self.quiet_since = None;
        self.next_read = now;
    }

    fn start(&mut self, now: Instant, kind: IoKind, op: DiskOp, out: &mut Vec<DiskAction>) {
        let id = self.next_id;
        self.next_id += 1;
        self.io = Some(Outstanding {
            id,
            started: now,
            kind,
        });
        out.push(DiskAction::Io { id, op });
    }

    fn read_all(&self) -> DiskOp {
        DiskOp::Read {
            first: 0,
            count: self.cfg.sectors(),
        }
    }

    fn own_write(&mut self, state: SlotState, epoch: u64) -> DiskOp {
        self.counter += 1;
        let rec = SlotRecord {
            node: self.cfg.slots.get(self.slot).cloned().unwrap_or_default(),
            state,
            generation: self.generation,
            counter: self.counter,
            epoch,
        };
        let slot = u64::try_from(self.slot).unwrap_or(u64::MAX);
        DiskOp::Write {
            sector: slot * SECTORS_PER_SLOT + self.counter % SECTORS_PER_SLOT,
            data: encode_sector(self.cluster_hash, &rec),
        }
    }

    fn drive(&mut self, now: Instant, out: &mut Vec<DiskAction>) {
        if let Some(o) = self.io
            && o.started
                .checked_add(self.cfg.io_timeout)
                .is_some_and(|t| now >= t)
        {
            self.io = None;
            self.failed(now, o, "timed out".into(), out);
        }
        if let Phase::Owner { valid_until, .. } = self.phase
            && now >= valid_until
        {
            self.restart_watch(now);
            out.push(DiskAction::Event(DiskEvent::Lost {
                reason: "the lease was not renewed in time".into(),
            }));
        }
        if self.io.is_some() {
            return;
        }
        match self.phase {
            Phase::Monitoring => {
                if now >= self.next_read {
                    self.next_read = now.checked_add(self.cfg.renew_interval).unwrap_or(now);
                    let op = self.read_all();
                    self.start(now, IoKind::Monitor, op, out);
                }
            }
            Phase::Settling {
                claim_started,
                until,
            } => {
                if now >= until {
                    self.phase = Phase::Claiming { claim_started };
                    let op = self.read_all();
                    self.start(now, IoKind::Confirm, op, out);
                }
            }
            Phase::Claiming { .. } => {}
            Phase::Owner {
                valid_until,
                next_renew,
            } => {
                let publish = self.publish.filter(|e| *e > 0);
                if now >= next_renew || publish.is_some() {
                    let epoch = self.max_epoch;
                    self.phase = Phase::Owner {
                        valid_until,
                        next_renew: now.checked_add(self.cfg.renew_interval).unwrap_or(now),
                    };
                    let op = self.own_write(SlotState::Owner, epoch);
                    self.start(now, IoKind::Renew { epoch }, op, out);
                }
            }
        }
    }

    fn failed(&mut self, now: Instant, o: Outstanding, why: String, out: &mut Vec<DiskAction>) {
        match o.kind {
            IoKind::Monitor => out.push(DiskAction::Event(DiskEvent::ReadFailed { why })),
            IoKind::Claim | IoKind::Confirm => {
                // The claim may still land: watch again from scratch before the next one.
                self.restart_watch(now);
                out.push(DiskAction::Event(DiskEvent::ReadFailed { why }));
            }
            IoKind::Renew { .. } => {
                out.push(DiskAction::Event(DiskEvent::RenewalFailed { why }));
            }
        }
    }

    fn on_reply(&mut self, now: Instant, reply: DiskReply, out: &mut Vec<DiskAction>) {
        let id = match &reply {
            DiskReply::Read { id, .. } | DiskReply::Write { id, .. } => *id,
        };
        let Some(o) = self.io.filter(|o| o.id == id) else {
            return;
        };
        self.io = None;
        match reply {
            DiskReply::Read { result: Err(e), .. } | DiskReply::Write { result: Err(e), .. } => {
                self.failed(now, o, e, out);
            }
            DiskReply::Read {
                result: Ok(sectors),
                ..
            } => {
                if !matches!(o.kind, IoKind::Monitor | IoKind::Confirm) {
                    return self.failed(now, o, "a read answered a write".into(), out);
                }
                if u64::try_from(sectors.len()).ok() != Some(self.cfg.sectors()) {
                    return self.failed(now, o, "short read".into(), out);
                }
                self.on_read(now, o, sectors, out);
            }
            DiskReply::Write { result: Ok(()), .. } => self.on_written(now, o, out),
        }
    }

    fn on_written(&mut self, now: Instant, o: Outstanding, out: &mut Vec<DiskAction>) {
        match (o.kind, self.phase) {
            (IoKind::Claim, Phase::Claiming { claim_started }) => {
                self.phase = Phase::Settling {
                    claim_started,
                    until: now.checked_add(self.cfg.settle).unwrap_or(now),
                };
            }
            (
                IoKind::Renew { epoch },
                Phase::Owner {
                    valid_until,
                    next_renew,
                },
            ) => {
                let end = o
                    .started
                    .checked_add(self.cfg.lease_time)
                    .and_then(|t| t.checked_sub(self.cfg.safety_margin))
                    .unwrap_or(valid_until);
                self.phase = Phase::Owner {
                    valid_until: valid_until.max(end),
                    next_renew,
                };
                if let Some(p) = self.publish
                    && p <= epoch
                {
                    self.publish = None;
                    out.push(DiskAction::Event(DiskEvent::Published { epoch: p }));
                }
            }
            _ => {}
        }
    }

    /// Decodes all slots: remembers the highest generation and epoch, this node's own
    /// counter, and reports unreadable slots.
    fn learn(&mut self, sectors: &[[u8; SECTOR_SIZE]], out: &mut Vec<DiskAction>) {
        let per_slot = usize::try_from(SECTORS_PER_SLOT).unwrap_or(2);
        for (i, copies) in sectors.chunks(per_slot).enumerate() {
            let Some(name) = self.cfg.slots.get(i) else {
                continue;
            };
            let mut problem = None;
            let mut any = false;
            for s in copies {
                match decode_sector(self.cluster_hash, s) {
                    Sector::Empty => any = true,
                    Sector::Valid(r) if r.node == *name => {
                        any = true;
                        self.max_generation = self.max_generation.max(r.generation);
                        self.max_epoch = self.max_epoch.max(r.epoch);
                        if i == self.slot {
                            self.counter = self.counter.max(r.counter);
                        }
                    }
                    Sector::Valid(_) => problem = Some("written by another node"),
                    Sector::Unknown(why) => problem = Some(why),
                }
            }
            match problem {
                Some(why) if !any || why == "written by another node" => {
                    if self.reported.insert(i) {
                        out.push(DiskAction::Event(DiskEvent::Unreadable {
                            slot: name.clone(),
                            why: why.into(),
                        }));
                    }
                }
                _ => {
                    self.reported.remove(&i);
                }
            }
        }
    }

    /// The other slots' sectors (this node's own writes are no sign of anybody else).
    fn others(&self, sectors: Vec<[u8; SECTOR_SIZE]>) -> Vec<[u8; SECTOR_SIZE]> {
        let per_slot = usize::try_from(SECTORS_PER_SLOT).unwrap_or(2);
        sectors
            .into_iter()
            .enumerate()
            .filter(|(i, _)| i / per_slot != self.slot)
            .map(|(_, s)| s)
            .collect()
    }

    fn on_read(
        &mut self,
        now: Instant,
        o: Outstanding,
        sectors: Vec<[u8; SECTOR_SIZE]>,
        out: &mut Vec<DiskAction>,
    ) {
        self.learn(&sectors, out);
        let others = self.others(sectors);
        let changed = self.baseline.as_ref() != Some(&others);
        match (o.kind, self.phase) {
            (IoKind::Monitor, Phase::Monitoring) => {
                if changed {
                    self.baseline = Some(others);
                    self.quiet_since = Some(now);
                    return;
                }
                let quiet = self
                    .quiet_since
                    .and_then(|q| q.checked_add(self.cfg.takeover_delay + self.backoff))
                    .is_some_and(|t| o.started >= t);
                if self.want && quiet {
                    self.generation = self.max_generation.saturating_add(1);
                    self.max_generation = self.generation;
                    self.phase = Phase::Claiming { claim_started: now };
                    let op = self.own_write(SlotState::Claiming, self.max_epoch);
                    self.start(now, IoKind::Claim, op, out);
                }
            }
            (IoKind::Confirm, Phase::Claiming { claim_started }) => {
                let end = claim_started
                    .checked_add(self.cfg.lease_time)
                    .and_then(|t| t.checked_sub(self.cfg.safety_margin));
                if changed {
                    self.phase = Phase::Monitoring;
                    self.baseline = Some(others);
                    self.quiet_since = Some(now);
                    self.backoff = self.random_below(self.cfg.claim_backoff);
                    out.push(DiskAction::Event(DiskEvent::Contested));
                } else if let Some(end) = end.filter(|e| now < *e && self.want) {
                    self.backoff = Duration::ZERO;
                    self.phase = Phase::Owner {
                        valid_until: end,
                        next_renew: now,
                    };
                    out.push(DiskAction::Event(DiskEvent::Acquired {
                        generation: self.generation,
                        max_epoch: self.max_epoch,
                    }));
                } else {
                    self.restart_watch(now);
                }
            }
            _ => {}
        }
    }
}

/// Block access to the quorum disk, performed by the executor (on a blocking thread).
pub trait Disk {
    /// Reads `count` sectors starting at `first`.
    fn read_sectors(&mut self, first: u64, count: u64) -> io::Result<Vec<[u8; SECTOR_SIZE]>>;
    /// Writes one sector durably.
    fn write_sector(&mut self, sector: u64, data: &[u8; SECTOR_SIZE]) -> io::Result<()>;
}

/// Performs one [`DiskAction::Io`] on `disk` and returns the input for the machine.
pub fn perform(disk: &mut dyn Disk, id: u64, op: &DiskOp) -> DiskReply {
    match op {
        DiskOp::Read { first, count } => DiskReply::Read {
            id,
            result: disk.read_sectors(*first, *count).map_err(|e| e.to_string()),
        },
        DiskOp::Write { sector, data } => DiskReply::Write {
            id,
            result: disk.write_sector(*sector, data).map_err(|e| e.to_string()),
        },
    }
}

/// A quorum disk in memory, for tests and simulations.
#[derive(Debug, Clone)]
pub struct MemDisk {
    sectors: Vec<[u8; SECTOR_SIZE]>,
}

impl MemDisk {
    /// A zeroed disk of `sectors` sectors.
    pub fn new(sectors: u64) -> MemDisk {
        MemDisk {
            sectors: vec![[0u8; SECTOR_SIZE]; usize::try_from(sectors).unwrap_or(0)],
        }
    }

    /// A copy of sector `i` (zeros beyond the end).
    pub fn sector(&self, i: u64) -> [u8; SECTOR_SIZE] {
        usize::try_from(i)
            .ok()
            .and_then(|i| self.sectors.get(i))
            .copied()
            .unwrap_or([0u8; SECTOR_SIZE])
    }

    /// Overwrites sector `i` (ignored beyond the end).
    pub fn put(&mut self, i: u64, data: &[u8; SECTOR_SIZE]) {
        if let Some(s) = usize::try_from(i)
            .ok()
            .and_then(|i| self.sectors.get_mut(i))
        {
            *s = *data;
        }
    }

    /// Flips bit `bit` of sector `i`.
    pub fn flip_bit(&mut self, i: u64, bit: usize) {
        if let Some(s) = usize::try_from(i)
            .ok()
            .and_then(|i| self.sectors.get_mut(i))
            && let Some(b) = s.get_mut(bit / 8)
        {
            *b ^= 1 << (bit % 8);
        }
    }
}

impl Disk for MemDisk {
    fn read_sectors(&mut self, first: u64, count: u64) -> io::Result<Vec<[u8; SECTOR_SIZE]>> {
        Ok((first..first.saturating_add(count))
            .map(|i| self.sector(i))
            .collect())
    }

    fn write_sector(&mut self, sector: u64, data: &[u8; SECTOR_SIZE]) -> io::Result<()> {
        if usize::try_from(sector)
            .ok()
            .is_none_or(|s| s >= self.sectors.len())
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "sector beyond the end of the disk",
            ));
        }
        self.put(sector, data);
        Ok(())
    }
}

/// A buffer whose usable part starts at a [`DIRECT_ALIGN`]-aligned address.
#[derive(Debug)]
struct AlignedBuf {
    raw: Vec<u8>,
    offset: usize,
    len: usize,
}

impl AlignedBuf {
    fn new(len: usize) -> AlignedBuf {
        let raw = vec![0u8; len + DIRECT_ALIGN];
        let offset = raw.as_ptr().align_offset(DIRECT_ALIGN).min(DIRECT_ALIGN);
        AlignedBuf { raw, offset, len }
    }

    fn get(&self) -> &[u8] {
        &self.raw[self.offset..self.offset + self.len]
    }

    fn get_mut(&mut self) -> &mut [u8] {
        &mut self.raw[self.offset..self.offset + self.len]
    }
}

/// A quorum disk on a file or block device: `pread`/`pwrite` with `O_DIRECT | O_DSYNC`
/// where the file system allows it (no page cache between the nodes and the device), else
/// `O_DSYNC` alone. Blocking: run it on a dedicated thread.
#[derive(Debug)]
pub struct FileDisk {
    file: std::fs::File,
    path: PathBuf,
    direct: bool,
}

impl FileDisk {
    /// Opens (and creates, for a missing regular file) the disk at `path`, making a regular
    /// file at least `sectors` sectors long. Holds no lock.
    pub fn open(path: &Path, sectors: u64) -> Result<FileDisk, QuorumError> {
        let err = |source| QuorumError::Open {
            path: path.to_path_buf(),
            source,
        };
        let (file, direct) = match Self::open_with(path, true) {
            Ok(f) => (f, true),
            Err(e) if e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()) => {
                (Self::open_with(path, false).map_err(err)?, false)
            }
            Err(e) => return Err(err(e)),
        };
        let meta = file.metadata().map_err(err)?;
        let size = sectors.saturating_mul(SECTOR_SIZE as u64);
        if meta.is_file() && meta.len() < size {
            file.set_len(size).map_err(err)?;
        }
        Ok(FileDisk {
            file,
            path: path.to_path_buf(),
            direct,
        })
    }

    /// Whether I/O bypasses the page cache.
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    fn open_with(path: &Path, direct: bool) -> io::Result<std::fs::File> {
        use rustix::fs::{Mode, OFlags};
        let mut flags = OFlags::RDWR | OFlags::CREATE | OFlags::DSYNC | OFlags::CLOEXEC;
        if direct {
            flags |= OFlags::DIRECT;
        }
        let fd = rustix::fs::open(path, flags, Mode::from_raw_mode(0o600))?;
        Ok(std::fs::File::from(fd))
    }

    /// Falls back to buffered (still `O_DSYNC`) I/O when the device refuses direct I/O.
    fn retry_buffered(&mut self, e: &io::Error) -> bool {
        if self.direct
            && e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error())
            && let Ok(f) = Self::open_with(&self.path, false)
        {
            self.file = f;
            self.direct = false;
            return true;
        }
        false
    }

    fn offset(sector: u64) -> io::Result<u64> {
        sector
            .checked_mul(SECTOR_SIZE as u64)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "sector out of range"))
    }
}

impl Disk for FileDisk {
    fn read_sectors(&mut self, first: u64, count: u64) -> io::Result<Vec<[u8; SECTOR_SIZE]>> {
        use std::os::unix::fs::FileExt;
        let n = usize::try_from(count)
            .ok()
            .and_then(|c| c.checked_mul(SECTOR_SIZE))
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "read too large"))?;
        let mut buf = AlignedBuf::new(n);
        let off = Self::offset(first)?;
        let res = self.file.read_exact_at(buf.get_mut(), off);
        match res {
            Err(e) if self.retry_buffered(&e) => self.file.read_exact_at(buf.get_mut(), off)?,
            r => r?,
        }
        Ok(buf
            .get()
            .chunks_exact(SECTOR_SIZE)
            .map(|c| {
                let mut s = [0u8; SECTOR_SIZE];
                s.copy_from_slice(c);
                s
            })
            .collect())
    }

    fn write_sector(&mut self, sector: u64, data: &[u8; SECTOR_SIZE]) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        let mut buf = AlignedBuf::new(SECTOR_SIZE);
        buf.get_mut().copy_from_slice(data);
        let off = Self::offset(sector)?;
        match self.file.write_all_at(buf.get(), off) {
            Err(e) if self.retry_buffered(&e) => self.file.write_all_at(buf.get(), off),
            r => r,
        }
    }
}

#[cfg(test)]
mod tests;
