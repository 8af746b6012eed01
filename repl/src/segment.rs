//! The bcplog's segment log: checksummed records `[len u32][crc32c u32][seq u64][payload]` in
//! files `<dir>/<first_seq:020>.seg`, appended densely by sequence number, made durable by group
//! commit (append a batch, `sync` once) and verified on open. Owns the on-disk format and its
//! recovery; it must never hand out a record that failed its checksum or broke the sequence, and
//! never keep anything after the first bad record.
//!
//! Blocking std I/O: callers run it on a blocking thread.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Bytes of a record header: payload length, checksum, sequence number.
pub const RECORD_HEADER_BYTES: usize = 16;
/// Largest payload accepted in one record; a header announcing more is corruption.
pub const MAX_RECORD_BYTES: usize = 64 << 20;
/// Default size after which a new segment file is started.
pub const DEFAULT_SEGMENT_BYTES: u64 = 64 << 20;
/// Highest valid sequence number (so that `seq + 1` never overflows); the lowest is 1.
pub const MAX_SEQ: u64 = u64::MAX - 1;
/// Appended records are buffered up to this many bytes, then written with one `pwrite`.
const WRITE_BUFFER_BYTES: usize = 1 << 20;
/// The lock file that keeps a second process from opening the same log.
pub const LOCK_FILE: &str = "LOCK";

/// How long `open` waits for the lock: a process forked by another thread of the previous
/// holder keeps a copy of the lock until it execs.
pub const LOCK_WAIT: Duration = Duration::from_secs(1);
const LOCK_POLL: Duration = Duration::from_millis(10);

const SEGMENT_SUFFIX: &str = ".seg";
const SEGMENT_DIGITS: usize = 20;
/// Read buffer of the sequential readers (recovery and `read_from`).
const READ_BUFFER_BYTES: usize = 256 << 10;

/// Tuning of a [`SegmentLog`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentOptions {
    /// A new segment file is started once the current one holds at least this many bytes
    /// (a single larger record still goes into one segment). Default [`DEFAULT_SEGMENT_BYTES`].
    pub segment_bytes: u64,
}

impl Default for SegmentOptions {
    fn default() -> Self {
        Self {
            segment_bytes: DEFAULT_SEGMENT_BYTES,
        }
    }
}

/// What was wrong with the bytes at some position of a segment.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Corruption {
    /// fewer bytes than a record header remain at the end of the file (a torn append)
    #[error("torn record header: only {have} of {RECORD_HEADER_BYTES} bytes present")]
    TornHeader { have: u64 },
    /// the payload announced by the header is cut short by the end of the file (a torn append)
    #[error("torn record: payload of {len} bytes announced, {have} present")]
    TornPayload { len: u64, have: u64 },
    /// the header announces a payload larger than [`MAX_RECORD_BYTES`]
    #[error("record length {len} exceeds the maximum of {MAX_RECORD_BYTES}")]
    TooLong { len: u64 },
    /// the checksum over sequence number and payload does not match
    #[error("checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    BadChecksum { stored: u32, computed: u32 },
    /// the record's sequence number is not the one that must come next
    #[error("sequence number {found} where {expected} was expected")]
    WrongSeq { expected: u64, found: u64 },
    /// a segment file does not start where the previous one ended
    #[error("segment starts at {found} where {expected} was expected")]
    SegmentGap { expected: u64, found: u64 },
}

impl Corruption {
    /// Whether this is what an interrupted append leaves behind (as opposed to damage).
    pub fn is_torn(&self) -> bool {
        matches!(
            self,
            Corruption::TornHeader { .. } | Corruption::TornPayload { .. }
        )
    }
}

/// Errors of the segment log.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// an I/O operation failed
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// the record was appended before
    #[error("record {seq} is a duplicate: the log already holds everything through {last}")]
    Duplicate { seq: u64, last: u64 },
    /// records between the last one and this one are missing
    #[error("record {seq} would leave a gap: the next record must be {expected}")]
    Gap { seq: u64, expected: u64 },
    /// sequence numbers run from 1 to [`MAX_SEQ`]
    #[error("sequence number {0} is invalid (valid: 1 to {MAX_SEQ})")]
    InvalidSeq(u64),
    /// the payload is larger than [`MAX_RECORD_BYTES`]
    #[error("a record of {len} bytes exceeds the maximum of {MAX_RECORD_BYTES}")]
    TooLarge { len: usize },
    /// another process has the log open
    #[error("the log directory {path} is in use by another process")]
    Locked { path: PathBuf },
    /// an earlier write or sync failed, so the log's state on disk is unknown
    #[error("the log is unusable after an earlier failure ({reason}); reopen it")]
    Poisoned { reason: String },
    /// the requested record was trimmed away or never received
    #[error("record {seq} is not held: the log starts at {first}")]
    NotHeld { seq: u64, first: u64 },
    /// a segment changed on disk after it was verified
    #[error("segment {path} is corrupt at offset {offset}: {reason}")]
    Corrupt {
        path: PathBuf,
        offset: u64,
        reason: Corruption,
    },
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> LogError + 'a {
    move |source| LogError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// Where recovery found the first bad record, and what it did about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damage {
    /// The segment file holding the bad bytes.
    pub segment: PathBuf,
    /// Byte offset of the bad record in that file (the file was truncated there, or deleted
    /// whole for a [`Corruption::SegmentGap`]).
    pub offset: u64,
    /// The sequence number the bad record should have carried.
    pub expected_seq: u64,
    /// Bytes removed from `segment` (its length minus `offset`).
    pub truncated_bytes: u64,
    /// What was wrong.
    pub reason: Corruption,
}

/// What [`SegmentLog::open`] found and repaired.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Segment files kept.
    pub segments: usize,
    /// Valid records kept.
    pub records: u64,
    /// First record kept, if any.
    pub first_seq: Option<u64>,
    /// Last sequence number covered (0 for a log that never held anything).
    pub last_seq: u64,
    /// The first bad record, if there was one: everything from it on was dropped.
    pub damage: Option<Damage>,
    /// Whole segment files deleted because they came after the damage.
    pub dropped_segments: Vec<PathBuf>,
    /// Files in the directory that are not segments; left alone.
    pub ignored: Vec<PathBuf>,
}

impl Recovery {
    /// Nothing was dropped.
    pub fn is_clean(&self) -> bool {
        self.damage.is_none() && self.dropped_segments.is_empty()
    }
}

fn segment_name(first: u64) -> String {
    format!("{first:0width$}{SEGMENT_SUFFIX}", width = SEGMENT_DIGITS)
}

fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(SEGMENT_SUFFIX)?;
    if digits.len() != SEGMENT_DIGITS || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let first: u64 = digits.parse().ok()?;
    (1..=MAX_SEQ).contains(&first).then_some(first)
}

/// Takes an exclusive `flock` on `file`, waiting up to [`LOCK_WAIT`]; `false` when another
/// holder keeps it.
pub(crate) fn lock_exclusive(file: &File) -> io::Result<bool> {
    let deadline = Instant::now() + LOCK_WAIT;
    loop {
        match rustix::fs::flock(file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => return Ok(true),
            Err(rustix::io::Errno::WOULDBLOCK) if Instant::now() < deadline => {
                std::thread::sleep(LOCK_POLL);
            }
            Err(rustix::io::Errno::WOULDBLOCK) => return Ok(false),
            Err(e) => return Err(e.into()),
        }
    }
}

fn record_crc(seq: u64, payload: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(&seq.to_le_bytes()), payload)
}

fn check_seq(seq: u64) -> Result<(), LogError> {
    if (1..=MAX_SEQ).contains(&seq) {
        Ok(())
    } else {
        Err(LogError::InvalidSeq(seq))
    }
}

/// One segment file known to hold `records` valid records `first..first+records` in `bytes`.
#[derive(Debug, Clone)]
struct Segment {
    first: u64,
    records: u64,
    bytes: u64,
    path: PathBuf,
}

impl Segment {
    /// The last sequence number held, `None` when empty.
    fn last(&self) -> Option<u64> {
        (self.records > 0).then(|| self.first + (self.records - 1))
    }
}

/// The result of reading one record position.
enum Step {
    /// A structurally valid record with a good checksum (its payload is in the caller's buffer,
    /// unless it was skipped).
    Record { seq: u64, len: u64 },
    /// The end of the file, exactly at a record boundary.
    End,
    /// Bad bytes at this position.
    Bad(Corruption),
}

/// Reads the record at the current position of `r`, of which `remaining` bytes are left in the
/// file. With `skip_below`, a record whose seq is lower is passed over without reading (or
/// checking) its payload.
fn read_step(
    r: &mut BufReader<File>,
    remaining: u64,
    payload: &mut Vec<u8>,
    skip_below: u64,
) -> io::Result<Step> {
    if remaining == 0 {
        return Ok(Step::End);
    }
    let header_len = RECORD_HEADER_BYTES as u64;
    if remaining < header_len {
        return Ok(Step::Bad(Corruption::TornHeader { have: remaining }));
    }
    let mut header = [0u8; RECORD_HEADER_BYTES];
    r.read_exact(&mut header)?;
    let [
        l0,
        l1,
        l2,
        l3,
        c0,
        c1,
        c2,
        c3,
        s0,
        s1,
        s2,
        s3,
        s4,
        s5,
        s6,
        s7,
    ] = header;
    let len = u64::from(u32::from_le_bytes([l0, l1, l2, l3]));
    let stored = u32::from_le_bytes([c0, c1, c2, c3]);
    let seq = u64::from_le_bytes([s0, s1, s2, s3, s4, s5, s6, s7]);
    let max = MAX_RECORD_BYTES as u64;
    if len > max {
        return Ok(Step::Bad(Corruption::TooLong { len }));
    }
    let have = remaining - header_len;
    if len > have {
        return Ok(Step::Bad(Corruption::TornPayload { len, have }));
    }
    if seq < skip_below {
        let jump = i64::try_from(len).expect("len <= MAX_RECORD_BYTES fits in i64");
        r.seek_relative(jump)?;
        return Ok(Step::Record { seq, len });
    }
    let size = usize::try_from(len).expect("len <= MAX_RECORD_BYTES fits in usize");
    payload.clear();
    payload.resize(size, 0);
    r.read_exact(payload)?;
    let computed = record_crc(seq, payload);
    if computed != stored {
        return Ok(Step::Bad(Corruption::BadChecksum { stored, computed }));
    }
    Ok(Step::Record { seq, len })
}

/// Segment files as (first seq, path).
type SegmentFiles = Vec<(u64, PathBuf)>;

/// Lists the segment files of `dir` sorted by first seq, and the other entries.
fn list_dir(dir: &Path) -> Result<(SegmentFiles, Vec<PathBuf>), LogError> {
    let mut segments = Vec::new();
    let mut ignored = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err("list", dir))? {
        let entry = entry.map_err(io_err("list", dir))?;
        let path = entry.path();
        let name = entry.file_name();
        if name == LOCK_FILE {
            continue;
        }
        let is_file = entry.file_type().map_err(io_err("stat", &path))?.is_file();
        match name.to_str().and_then(parse_segment_name) {
            Some(first) if is_file => segments.push((first, path)),
            _ => ignored.push(path),
        }
    }
    segments.sort();
    ignored.sort();
    Ok((segments, ignored))
}

/// The durable, append-only, checksummed log of one fileset on a backup.
///
/// Invariants: segments are contiguous (each starts at the previous one's last + 1); only the
/// last segment (the one appended to) may be empty; `durable <= last`.
#[derive(Debug)]
pub struct SegmentLog {
    dir: PathBuf,
    dir_file: File,
    _lock: File,
    options: SegmentOptions,
    segments: Vec<Segment>,
    /// The file of the last segment, open for writing.
    active: Option<File>,
    /// The seq the next append must carry; `None` for a log that never held anything.
    next: Option<u64>,
    durable: u64,
    poisoned: Option<String>,
    /// Records appended but not yet written to the active segment's file: one `pwrite` per
    /// group instead of one per record (a record rarely ends on a page boundary, and every
    /// partial page written costs the kernel a zeroing of the rest of that page).
    pending: Vec<u8>,
    /// How many records `pending` holds.
    pending_records: u64,
}

impl SegmentLog {
    /// Opens (creating if needed) the log in `dir`, verifies every record, truncates at the
    /// first bad one and deletes the segments after it, and makes what remains durable.
    pub fn open(dir: &Path, options: SegmentOptions) -> Result<(SegmentLog, Recovery), LogError> {
        fs::create_dir_all(dir).map_err(io_err("create directory", dir))?;
        let lock_path = dir.join(LOCK_FILE);
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_err("open", &lock_path))?;
        if !lock_exclusive(&lock).map_err(io_err("lock", &lock_path))? {
            return Err(LogError::Locked {
                path: dir.to_path_buf(),
            });
        }
        let dir_file = File::open(dir).map_err(io_err("open", dir))?;

        let (found, ignored) = list_dir(dir)?;
        for path in &ignored {
            tracing::warn!(path = %path.display(), "segment log: ignoring a file that is not a segment");
        }
        let mut recovery = Recovery {
            ignored,
            ..Recovery::default()
        };
        let mut segments: Vec<Segment> = Vec::new();
        let mut payload = Vec::new();
        let mut drop_from = found.len();
        for (index, (first, path)) in found.iter().enumerate() {
            let expected = segments.last().map(|s: &Segment| s.first + s.records);
            if let Some(expected) = expected.filter(|e| e != first) {
                recovery.damage = Some(Damage {
                    segment: path.clone(),
                    offset: 0,
                    expected_seq: expected,
                    truncated_bytes: 0,
                    reason: Corruption::SegmentGap {
                        expected,
                        found: *first,
                    },
                });
                drop_from = index;
                break;
            }
            let (segment, damage) = Self::verify_segment(*first, path, &mut payload)?;
            segments.push(segment);
            if damage.is_some() {
                recovery.damage = damage;
                drop_from = index + 1;
                break;
            }
        }
        for (_, path) in &found[drop_from..] {
            fs::remove_file(path).map_err(io_err("delete", path))?;
            recovery.dropped_segments.push(path.clone());
        }
        if let Some(d) = &recovery.damage {
            tracing::warn!(
                segment = %d.segment.display(),
                offset = d.offset,
                expected_seq = d.expected_seq,
                truncated_bytes = d.truncated_bytes,
                dropped_segments = recovery.dropped_segments.len(),
                reason = %d.reason,
                "segment log: dropped everything from the first bad record on"
            );
        }

        let active = match segments.last() {
            Some(last) => {
                let file = OpenOptions::new()
                    .write(true)
                    .open(&last.path)
                    .map_err(io_err("open", &last.path))?;
                // A process that died before its sync may have left records only in the page
                // cache: make them durable before anyone acknowledges them.
                file.sync_data().map_err(io_err("sync", &last.path))?;
                Some(file)
            }
            None => None,
        };
        dir_file.sync_all().map_err(io_err("sync", dir))?;

        let next = segments.last().map(|s| s.first + s.records);
        let last = next.map_or(0, |n| n - 1);
        recovery.segments = segments.len();
        recovery.records = segments.iter().map(|s| s.records).sum();
        recovery.first_seq = segments.iter().find(|s| s.records > 0).map(|s| s.first);
        recovery.last_seq = last;
        let log = SegmentLog {
            dir: dir.to_path_buf(),
            dir_file,
            _lock: lock,
            options,
            segments,
            active,
            next,
            durable: last,
            poisoned: None,
            pending: Vec::new(),
            pending_records: 0,
        };
        Ok((log, recovery))
    }

    /// Verifies one segment; on a bad record truncates the file there and reports it.
    fn verify_segment(
        first: u64,
        path: &Path,
        payload: &mut Vec<u8>,
    ) -> Result<(Segment, Option<Damage>), LogError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(io_err("open", path))?;
        let file_len = file.metadata().map_err(io_err("stat", path))?.len();
        let mut reader = BufReader::with_capacity(READ_BUFFER_BYTES, file);
        let mut offset = 0u64;
        let mut records = 0u64;
        let damage = loop {
            let expected = first + records;
            let step = read_step(&mut reader, file_len - offset, payload, 0)
                .map_err(io_err("read", path))?;
            let reason = match step {
                Step::End => break None,
                Step::Bad(reason) => reason,
                Step::Record { seq, .. } if seq != expected || seq > MAX_SEQ => {
                    Corruption::WrongSeq {
                        expected,
                        found: seq,
                    }
                }
                Step::Record { len, .. } => {
                    offset += RECORD_HEADER_BYTES as u64 + len;
                    records += 1;
                    continue;
                }
            };
            break Some(Damage {
                segment: path.to_path_buf(),
                offset,
                expected_seq: expected,
                truncated_bytes: file_len - offset,
                reason,
            });
        };
        if damage.is_some() {
            let file = reader.into_inner();
            file.set_len(offset).map_err(io_err("truncate", path))?;
            file.sync_all().map_err(io_err("sync", path))?;
        }
        let segment = Segment {
            first,
            records,
            bytes: offset,
            path: path.to_path_buf(),
        };
        Ok((segment, damage))
    }

    /// The log's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The first record still held, `None` when the log holds no record.
    pub fn first_seq(&self) -> Option<u64> {
        self.segments
            .iter()
            .find(|s| s.records > 0)
            .map(|s| s.first)
    }

    /// The last sequence number received: the last record appended, or for an empty log the
    /// one before the seq it expects next (after `trim_through`/`reset`); 0 for a log that
    /// never held anything.
    pub fn last_seq(&self) -> u64 {
        self.next.map_or(0, |n| n - 1)
    }

    /// The seq the next append must carry, `None` when any first seq is accepted (a log that
    /// never held anything).
    pub fn next_seq(&self) -> Option<u64> {
        self.next
    }

    /// Everything through this seq is durable (the value the bcplog acknowledges).
    pub fn durable_seq(&self) -> u64 {
        self.durable
    }

    /// Number of segment files.
    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }

    /// Bytes held in all segments.
    pub fn bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.bytes).sum()
    }

    fn check_usable(&self) -> Result<(), LogError> {
        match &self.poisoned {
            Some(reason) => Err(LogError::Poisoned {
                reason: reason.clone(),
            }),
            None => Ok(()),
        }
    }

    fn poison(&mut self, err: LogError) -> LogError {
        tracing::error!(dir = %self.dir.display(), error = %err, "segment log poisoned");
        self.poisoned = Some(err.to_string());
        err
    }

    /// Appends one record (buffered, then written in groups; not durable until
    /// [`SegmentLog::sync`]). Refuses a seq at or
    /// below the last one ([`LogError::Duplicate`]) or above the next one ([`LogError::Gap`]);
    /// a log that never held anything accepts any first seq.
    pub fn append(&mut self, seq: u64, payload: &[u8]) -> Result<(), LogError> {
        self.check_usable()?;
        check_seq(seq)?;
        if payload.len() > MAX_RECORD_BYTES {
            return Err(LogError::TooLarge { len: payload.len() });
        }
        self.append_with(seq, |buf| buf.extend_from_slice(payload))
    }

    /// Like [`SegmentLog::append`], with the payload written by `encode`, which appends it to
    /// the buffer it is given (the log's write buffer: no copy of the payload is made).
    pub fn append_with(
        &mut self,
        seq: u64,
        encode: impl FnOnce(&mut Vec<u8>),
    ) -> Result<(), LogError> {
        self.check_usable()?;
        check_seq(seq)?;
        match self.next {
            Some(next) if seq < next => {
                return Err(LogError::Duplicate {
                    seq,
                    last: next - 1,
                });
            }
            Some(next) if seq > next => {
                return Err(LogError::Gap {
                    seq,
                    expected: next,
                });
            }
            _ => {}
        }
        let roll = match self.segments.last() {
            None => true,
            Some(s) => s.records > 0 && s.bytes >= self.options.segment_bytes,
        };
        if roll {
            self.start_segment(seq)?;
        }
        if self.segments.is_empty() {
            return Err(self.poison(LogError::Poisoned {
                reason: "no active segment after starting one".to_owned(),
            }));
        }
        let start = self.pending.len();
        self.pending.extend_from_slice(&[0; RECORD_HEADER_BYTES]);
        encode(&mut self.pending);
        let payload = &self.pending[start + RECORD_HEADER_BYTES..];
        let Some(len) = u32::try_from(payload.len())
            .ok()
            .filter(|&l| l as usize <= MAX_RECORD_BYTES)
        else {
            let len = payload.len();
            self.pending.truncate(start);
            return Err(LogError::TooLarge { len });
        };
        let crc = record_crc(seq, payload);
        let header = &mut self.pending[start..start + RECORD_HEADER_BYTES];
        header[..4].copy_from_slice(&len.to_le_bytes());
        header[4..8].copy_from_slice(&crc.to_le_bytes());
        header[8..].copy_from_slice(&seq.to_le_bytes());
        let written = (self.pending.len() - start) as u64;
        let segment = self
            .segments
            .last_mut()
            .expect("checked above that a segment exists");
        segment.bytes += written;
        segment.records += 1;
        self.pending_records += 1;
        self.next = Some(seq + 1);
        if self.pending.len() >= WRITE_BUFFER_BYTES {
            self.flush()?;
        }
        Ok(())
    }

    /// Writes the appended records that are still buffered to the active segment's file (not
    /// durably: see [`SegmentLog::sync`]). A failed write poisons the log: records were
    /// accepted that are not in the file (none of them was durable, so none was acknowledged;
    /// reopening the log recovers the valid prefix).
    pub fn flush(&mut self) -> Result<(), LogError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let (Some(segment), Some(file)) = (self.segments.last(), self.active.as_ref()) else {
            return Err(self.poison(LogError::Poisoned {
                reason: "buffered records without an active segment".to_owned(),
            }));
        };
        let offset = segment.bytes - self.pending.len() as u64;
        if let Err(e) = file.write_all_at(&self.pending, offset) {
            let path = segment.path.clone();
            // A partial record must not stay in the file: cut it off (and poison either way).
            let _ = file.set_len(offset);
            return Err(self.poison(io_err("append", &path)(e)));
        }
        self.pending.clear();
        self.pending_records = 0;
        Ok(())
    }

    /// Closes the current segment (durably) and starts `<first>.seg`, made durable in the
    /// directory before any record in it can be acknowledged.
    fn start_segment(&mut self, first: u64) -> Result<(), LogError> {
        self.flush()?;
        if let (Some(file), Some(segment)) = (&self.active, self.segments.last())
            && self.durable < self.last_seq()
        {
            if let Err(e) = file.sync_data() {
                let err = io_err("sync", &segment.path)(e);
                return Err(self.poison(err));
            }
            self.durable = self.last_seq();
        }
        let path = self.dir.join(segment_name(first));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(io_err("create", &path))?;
        if let Err(e) = self.dir_file.sync_all() {
            return Err(self.poison(io_err("sync", &self.dir)(e)));
        }
        self.segments.push(Segment {
            first,
            records: 0,
            bytes: 0,
            path,
        });
        self.active = Some(file);
        Ok(())
    }

    /// Makes every appended record durable (one `fdatasync` for the whole batch) and returns
    /// the durable seq. A failed sync poisons the log: what reached the disk is unknown.
    pub fn sync(&mut self) -> Result<u64, LogError> {
        self.check_usable()?;
        self.flush()?;
        let last = self.last_seq();
        if self.durable < last {
            if let (Some(file), Some(segment)) = (&self.active, self.segments.last())
                && let Err(e) = file.sync_data()
            {
                let err = io_err("sync", &segment.path)(e);
                return Err(self.poison(err));
            }
            self.durable = last;
        }
        Ok(self.durable)
    }

    /// Deletes the segments whose records are all `<= seq`. When that covers the segment being
    /// appended to, a new empty segment is started first so the log keeps expecting the same
    /// next seq. Returns the number of segment files deleted.
    pub fn trim_through(&mut self, seq: u64) -> Result<usize, LogError> {
        self.check_usable()?;
        if let (Some(active), Some(next)) = (self.segments.last(), self.next)
            && active.last().is_some_and(|l| l <= seq)
        {
            self.start_segment(next)?;
        }
        let covered = self
            .segments
            .iter()
            .take(self.segments.len().saturating_sub(1))
            .take_while(|s| s.last().is_none_or(|l| l <= seq))
            .count();
        for segment in self.segments.drain(..covered) {
            fs::remove_file(&segment.path).map_err(io_err("delete", &segment.path))?;
        }
        if covered > 0 {
            self.dir_file
                .sync_all()
                .map_err(io_err("sync", &self.dir))?;
        }
        Ok(covered)
    }

    /// Drops every record (for a resync) and makes the log expect `next_seq`; durable when it
    /// returns. A failure on the way poisons the log (reopen it: recovery sees a valid prefix
    /// or suffix of the old segments, or the new empty one).
    pub fn reset(&mut self, next_seq: u64) -> Result<(), LogError> {
        self.check_usable()?;
        check_seq(next_seq)?;
        self.active = None;
        self.pending.clear();
        self.pending_records = 0;
        let segments = std::mem::take(&mut self.segments);
        for segment in &segments {
            if let Err(e) = fs::remove_file(&segment.path) {
                let err = io_err("delete", &segment.path)(e);
                return Err(self.poison(err));
            }
        }
        // The deletions must be durable before the new segment exists: otherwise a crash could
        // leave old segments next to a new one that does not continue them.
        if let Err(e) = self.dir_file.sync_all() {
            return Err(self.poison(io_err("sync", &self.dir)(e)));
        }
        self.next = None;
        self.durable = 0;
        if let Err(e) = self.start_segment(next_seq) {
            self.poisoned.get_or_insert_with(|| e.to_string());
            return Err(e);
        }
        self.next = Some(next_seq);
        self.durable = next_seq - 1;
        Ok(())
    }

    /// Iterates over the records from `seq` on, through the last one appended at this moment.
    /// Fails with [`LogError::NotHeld`] when `seq` is below the first record held.
    pub fn read_from(&mut self, seq: u64) -> Result<SegmentReader, LogError> {
        // The reader reads the files: buffered records must be in them.
        self.flush()?;
        let last = self.last_seq();
        let first_held = self.first_seq();
        if seq <= last && first_held.is_none_or(|f| seq < f) {
            return Err(LogError::NotHeld {
                seq,
                first: first_held.unwrap_or(last + 1),
            });
        }
        let refs = self
            .segments
            .iter()
            .filter(|s| s.records > 0 && s.last().is_some_and(|l| l >= seq))
            .map(|s| SegmentRef {
                first: s.first,
                path: s.path.clone(),
                len: Some(s.bytes),
            })
            .collect();
        Ok(SegmentReader::new(refs, seq, Some(last)))
    }
}

/// A segment as a reader sees it.
#[derive(Debug, Clone)]
struct SegmentRef {
    first: u64,
    path: PathBuf,
    /// Bytes known valid; `None`: read to the file's length when opened.
    len: Option<u64>,
}

#[derive(Debug)]
struct OpenSegment {
    reader: BufReader<File>,
    path: PathBuf,
    offset: u64,
    len: u64,
}

/// Iterator over `(seq, payload)` of a segment log, verifying every record it returns.
///
/// From [`SegmentLog::read_from`] it stops at the last record appended when it was created;
/// from [`SegmentReader::open`] (no log object, e.g. a replay thread separate from the bcplog)
/// it reads what the files hold and stops quietly at an incomplete record at the very end (an
/// append in progress).
#[derive(Debug)]
pub struct SegmentReader {
    pending: VecDeque<SegmentRef>,
    current: Option<OpenSegment>,
    from: u64,
    end: Option<u64>,
    expect: Option<u64>,
    payload: Vec<u8>,
    done: bool,
}

impl SegmentReader {
    fn new(refs: VecDeque<SegmentRef>, from: u64, end: Option<u64>) -> Self {
        Self {
            pending: refs,
            current: None,
            from,
            end,
            expect: None,
            payload: Vec::new(),
            done: false,
        }
    }

    /// Reads the log in `dir` from `seq` on without opening (or locking) it: sees what the
    /// segment files hold now. Fails with [`LogError::NotHeld`] when the first segment starts
    /// after `seq`.
    pub fn open(dir: &Path, seq: u64) -> Result<SegmentReader, LogError> {
        let (found, _) = list_dir(dir)?;
        if let Some((first, _)) = found.first()
            && seq < *first
        {
            return Err(LogError::NotHeld { seq, first: *first });
        }
        let start = found
            .iter()
            .rposition(|(first, _)| *first <= seq)
            .unwrap_or(0);
        let refs = found[start..]
            .iter()
            .map(|(first, path)| SegmentRef {
                first: *first,
                path: path.clone(),
                len: None,
            })
            .collect();
        Ok(SegmentReader::new(refs, seq, None))
    }

    fn fail(&mut self, err: LogError) -> Option<Result<(u64, Vec<u8>), LogError>> {
        self.done = true;
        Some(Err(err))
    }
}

impl Iterator for SegmentReader {
    type Item = Result<(u64, Vec<u8>), LogError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if self.done {
                return None;
            }
            if self.current.is_none() {
                let Some(seg) = self.pending.pop_front() else {
                    self.done = true;
                    return None;
                };
                if let Some(expected) = self.expect.filter(|e| *e != seg.first) {
                    return self.fail(LogError::Corrupt {
                        path: seg.path,
                        offset: 0,
                        reason: Corruption::SegmentGap {
                            expected,
                            found: seg.first,
                        },
                    });
                }
                self.expect = Some(seg.first);
                let file = match File::open(&seg.path) {
                    Ok(f) => f,
                    Err(e) => return self.fail(io_err("open", &seg.path)(e)),
                };
                let len = match seg.len {
                    Some(len) => len,
                    None => match file.metadata() {
                        Ok(m) => m.len(),
                        Err(e) => return self.fail(io_err("stat", &seg.path)(e)),
                    },
                };
                self.current = Some(OpenSegment {
                    reader: BufReader::with_capacity(READ_BUFFER_BYTES, file),
                    path: seg.path,
                    offset: 0,
                    len,
                });
            }
            let cur = self.current.as_mut().expect("opened just above");
            let step = read_step(
                &mut cur.reader,
                cur.len - cur.offset,
                &mut self.payload,
                self.from,
            );
            let step = match step {
                Ok(step) => step,
                Err(e) => {
                    let err = io_err("read", &cur.path)(e);
                    return self.fail(err);
                }
            };
            let expected = self.expect.unwrap_or(self.from);
            let reason = match step {
                Step::End => {
                    self.current = None;
                    continue;
                }
                Step::Bad(reason) => reason,
                Step::Record { seq, .. } if seq != expected || seq > MAX_SEQ => {
                    Corruption::WrongSeq {
                        expected,
                        found: seq,
                    }
                }
                Step::Record { seq, len } => {
                    cur.offset += RECORD_HEADER_BYTES as u64 + len;
                    self.expect = Some(seq + 1);
                    if seq < self.from {
                        continue;
                    }
                    if self.end.is_some_and(|end| seq > end) {
                        self.done = true;
                        return None;
                    }
                    return Some(Ok((seq, std::mem::take(&mut self.payload))));
                }
            };
            if self.end.is_none() && self.pending.is_empty() && reason.is_torn() {
                self.done = true;
                return None;
            }
            let (path, offset) = (cur.path.clone(), cur.offset);
            return self.fail(LogError::Corrupt {
                path,
                offset,
                reason,
            });
        }
    }
}

#[cfg(test)]
mod tests;
