//! The dump: a running process's state read while all its threads are stopped, written as one
//! image of the store, the threads let go, then the image committed. Memory up to
//! `STAGING_MAX` is copied while stopped and written after; more is read after the threads run
//! again from a copy-on-write snapshot child (an injected clone, killed and reaped by the
//! target afterwards). It must never change what the process will do next: injected calls only
//! read or create what is removed again, and every register is put back.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::unistd::Pid;

use super::meta::{
    FILE_REGION_BASE, FdKind, FdState, FileSnapshot, MAPPING_REGION_BASE, META_REGION_ID,
    META_VERSION, Mapping, MappingKind, NSIG, PROC_STREAM, PROT_R, PROT_W, ProcessMeta, SigAction,
    ThreadState,
};
use super::procfs::{self, MapsLine, Pagemap};
use super::ptrace::{self, Tracee};
use super::regs;
use super::track::{Parent, Tracker};
use super::{DumpOptions, DumpSummary, ProcError, Unrestorable};
use crate::image::{ImageError, ImageHeader, RegionDesc, unix_now_ns};
use crate::store::{Pending, Plan, Store, StoreError};

/// Page size the images record (x86_64).
pub const PAGE: u64 = 4096;
/// Bytes of one read buffer of the pipelined copy (one process_vm_readv, up to IOV_MAX runs).
const READ_BATCH: usize = 4 << 20;
/// Read buffers of the pipelined copy: one being read, one being written, one ready.
const PIPE_BUFFERS: usize = 3;
/// Memory up to this size is copied into a buffer while the threads are stopped and written
/// after they run again; above it a snapshot child is forked instead (its page tables cost
/// less pause than copying that much).
const STAGING_MAX: u64 = 64 << 20;
/// Room a prepared staging buffer keeps beyond the resident memory it was sized from.
const STAGING_SLACK: u64 = 1 << 20;
/// `PAGE` as a buffer stride.
const PAGE_BYTES: usize = 4096;
/// Bytes of the `syscall` instruction: where a thread stands after an injected call.
const SYSCALL_INSN_LEN: u64 = 2;
/// Injected non-blocking `wait4` calls for a snapshot child not yet handed to its parent.
const REAP_ATTEMPTS: usize = 20;
const REAP_PAUSE: Duration = Duration::from_millis(1);
/// File bytes read per step when snapshotting a file.
const FILE_STEP: usize = 1 << 20;
/// Bytes of the injected scratch mapping (sigaction results land there).
pub const SCRATCH_LEN: u64 = 64 * 1024;
/// Bytes of a `struct kernel_sigaction` on x86_64.
pub const SIGACTION_LEN: usize = 32;
/// What an increment reads of each mapping: page runs, or None for a mapping without contents.
type Reads = Vec<Option<Vec<(u64, u64)>>>;
/// Metadata room an image keeps beyond 1.5 times its encoding, for the chain's increments.
const META_SLACK: u64 = 64 * 1024;
/// Smallest region a kept file gets (rounded up to a power of two above its size, so a file
/// that grows keeps the chain's layout for a while).
const FILE_REGION_MIN: u64 = 64 * 1024;
/// Bytes of a signal set as the kernel takes it (`_NSIG / 8`).
pub const SIGSET_LEN: u64 = 8;
/// `O_ACCMODE` bits of the open flags.
const ACCMODE: i32 = libc::O_ACCMODE;

/// How much of a mapping the image keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Contents {
    None,
    /// Only anonymous pages (copied on write from a file that still is there).
    AnonPages,
    /// Every page with data.
    Present,
    /// Every page, present or not (shared memory: its swapped pages are invisible to the
    /// page tables).
    Everything,
}

pub fn dump(
    pid: i32,
    store: &Store,
    opts: &DumpOptions,
    mut tracker: Option<&mut Tracker>,
) -> Result<DumpSummary, ProcError> {
    let started = Instant::now();
    if pid <= 0 || !Path::new(&format!("/proc/{pid}")).exists() {
        return Err(ProcError::NoSuchProcess { pid });
    }
    let p = Pid::from_raw(pid);
    if procfs::is_zombie(p) {
        return Err(ProcError::Exited { pid });
    }
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let tgid = status
        .lines()
        .find_map(|l| l.strip_prefix("Tgid:"))
        .and_then(|v| v.trim().parse::<i32>().ok());
    if tgid.is_some_and(|t| t != pid) {
        return Err(ProcError::Unsupported {
            reason: format!(
                "{pid} is a thread of process {}, not a process",
                tgid.unwrap_or(0)
            ),
        });
    }

    // Forgotten until this dump commits: a failed dump (whose scan may have re-protected
    // pages it then did not save) makes the next one full.
    let parent = tracker.as_deref_mut().and_then(|t| t.take_parent(pid));
    // Backed before the stop: memory taken anew inside it would be faulted in during it.
    let mut staging = match tracker.as_deref_mut() {
        Some(t) if !t.staging.0.is_empty() => std::mem::take(&mut t.staging.0),
        _ => prepared_staging(p),
    };
    let mut threads = ptrace::seize_all(p)?;
    let paused = Instant::now();

    let mut states = Vec::with_capacity(threads.len());
    for t in &threads {
        states.push(ThreadState {
            tid: t.tid.as_raw(),
            regs: regs::to_words(&regs::resumable(&t.regs, false)),
            xstate: t.xstate()?,
            sigmask: t.sigmask()?,
            restarted_syscall: match regs::restart_of(&t.regs) {
                regs::Restart::None => None,
                regs::Restart::Again { nr } | regs::Restart::Block { nr } => Some(nr),
            },
            rseq: t.rseq()?,
            robust_list: t.robust_list()?,
            clear_child_tid: None,
        });
    }

    let main = threads
        .first_mut()
        .expect("seize_all returns at least the main thread");
    let before = procfs::maps(p)?;
    let syscall_ip = find_syscall_insn(p, &before)?;
    let (sigactions, brk) = query_kernel_state(main, syscall_ip)?;
    // Only a thread itself can report its clear_child_tid (a restore of its other threads
    // needs it).
    for (state, t) in states.iter_mut().zip(threads.iter_mut()) {
        state.clear_child_tid = t.tid_address(syscall_ip)?;
    }

    let lines = procfs::maps(p)?;
    let mut mm = procfs::mm_layout(p)?;
    mm.brk = brk;
    let pagemap = Pagemap::open(p)?;
    let mut mappings = Vec::with_capacity(lines.len());
    for line in &lines {
        let (mut mapping, c) = classify(p, line);
        if mapping.has_contents {
            mapping.runs = Some(match c {
                Contents::None => Vec::new(),
                Contents::AnonPages => pagemap.data_runs(mapping.start, mapping.end, true)?,
                Contents::Present => pagemap.data_runs(mapping.start, mapping.end, false)?,
                Contents::Everything => vec![(mapping.start, mapping.end)],
            });
        }
        mappings.push(mapping);
    }

    let mut fds = procfs::fds(p)?;
    mark_excluded(&mut fds, opts);
    let unrestorable: Vec<Unrestorable> = fds
        .iter()
        .filter(|f| f.kind.reopen_path().is_none())
        .map(|f| Unrestorable {
            fd: f.fd,
            what: f.kind.describe(),
        })
        .collect();
    let mut files: Vec<FileSnapshot> = Vec::new();
    let mut file_sources: Vec<(i32, u64)> = Vec::new();
    let mut files_size_only = Vec::new();
    let mut files_excluded: Vec<String> = Vec::new();
    for f in &fds {
        let FdKind::File { path } = &f.kind else {
            continue;
        };
        if f.excluded {
            if !files_excluded.contains(path) {
                files_excluded.push(path.clone());
            }
            continue;
        }
        if f.flags & ACCMODE == libc::O_RDONLY
            || files.iter().any(|s| (s.dev, s.ino) == (f.dev, f.ino))
        {
            continue;
        }
        let link = format!("/proc/{pid}/fd/{}", f.fd);
        let size = std::fs::metadata(&link)
            .map_err(|source| ProcError::File {
                op: "stat",
                path: link.clone(),
                source,
            })?
            .len();
        let keep = opts.snapshot_files && size <= opts.max_file_snapshot;
        if !keep {
            files_size_only.push(path.clone());
        }
        files.push(FileSnapshot {
            path: path.clone(),
            dev: f.dev,
            ino: f.ino,
            size,
            has_contents: keep,
        });
        file_sources.push((f.fd, size));
    }

    let meta = ProcessMeta {
        version: META_VERSION,
        pid,
        comm: procfs::comm(p)?,
        exe: procfs::link(p, "exe")?,
        cwd: procfs::link(p, "cwd")?,
        threads: states,
        mappings,
        fds,
        files,
        sigactions,
        mm,
        auxv: procfs::auxv(p)?,
    };
    let meta_bytes = meta.encode();

    let plan = store.plan()?;
    let meta_cap = match &parent {
        Some(pa) => pa.regions.first().map_or(0, |r| r.len),
        None => meta_capacity(meta_bytes.len()),
    };
    let regions = image_regions(&meta, meta_cap)?;
    // What an increment would read of each mapping (None: a full image is written, and why).
    let mut increment: Option<(u64, Reads)> = None;
    let mut full_reason = None;
    if let Some(t) = tracker.as_deref_mut() {
        match plan_increment(
            t,
            parent.as_ref(),
            &plan,
            &meta,
            &meta_bytes,
            &regions,
            &pagemap,
        ) {
            Ok(reads) => {
                increment = Some((parent.as_ref().map_or(0, |pa| pa.seq), reads));
            }
            Err(reason) => full_reason = Some(reason),
        }
    }
    let (regions, meta_cap) = if increment.is_none() && parent.is_some() {
        let cap = meta_capacity(meta_bytes.len());
        (image_regions(&meta, cap)?, cap)
    } else {
        (regions, meta_cap)
    };
    if increment.is_none()
        && let Some(t) = tracker.as_deref_mut()
        && t.disabled.is_none()
    {
        // Armed while the target is stopped and before its memory is read: every write
        // after it resumes is recorded for the next dump.
        let ranges: Vec<(u64, u64)> = meta
            .mappings
            .iter()
            .filter(|m| trackable(m))
            .map(|m| (m.start, m.end))
            .collect();
        let main = threads
            .first_mut()
            .expect("seize_all returns at least the main thread");
        if let Err(reason) = t.arm(main, syscall_ip, &ranges) {
            full_reason = Some(format!("write tracking unavailable: {reason}"));
        }
    }

    let header = ImageHeader {
        app: store.app().to_owned(),
        stream: PROC_STREAM,
        seq: plan.seq,
        parent: increment.as_ref().map(|i| i.0),
        created_unix_ns: unix_now_ns(),
        page_size: u32::try_from(PAGE).expect("the page size fits u32"),
        regions: regions.clone(),
    };
    let mut pending = store.begin(&header)?;
    // Zero-padded to the region: what a chain leaves there is the newest encoding only.
    let mut padded = meta_bytes;
    padded.resize(usize::try_from(meta_cap).unwrap_or(padded.len()), 0);
    pending.chunk(0, 0, &padded)?;

    let mut mapping_region: HashMap<usize, u32> = HashMap::new();
    let mut file_region = Vec::new();
    for (index, r) in regions.iter().enumerate().skip(1) {
        let index = region_index(index)?;
        if r.id >= FILE_REGION_BASE {
            file_region.push(((r.id - FILE_REGION_BASE) as usize, index));
        } else {
            mapping_region.insert((r.id - MAPPING_REGION_BASE) as usize, index);
        }
    }
    // What to copy of each mapping: pages the process can read go through process_vm_readv
    // (from a snapshot child after the threads are let go, or staged while they are stopped);
    // the few it cannot read are copied at once through /proc/PID/mem.
    let mut pages = 0u64;
    let mut pieces: Vec<Piece> = Vec::new();
    let mut unreadable: Vec<Piece> = Vec::new();
    for (i, m) in meta.mappings.iter().enumerate() {
        let Some(&region) = mapping_region.get(&i) else {
            continue;
        };
        let runs = match &increment {
            Some((_, reads)) => reads.get(i).and_then(Option::as_ref),
            None => m.runs.as_ref(),
        };
        for &(s, e) in runs.into_iter().flatten() {
            pages += (e - s) / PAGE;
            let piece = Piece {
                mapping: i,
                region,
                offset: s - m.start,
                addr: s,
                len: e - s,
            };
            if m.prot & PROT_R != 0 {
                pieces.push(piece);
            } else {
                unreadable.push(piece);
            }
        }
    }
    copy_unreadable(p, &unreadable, &mut pending)?;
    let bytes: u64 = pieces.iter().map(|x| x.len).sum();
    let mut snapshot = None;
    if bytes > STAGING_MAX && !has_userfaultfd(&meta.fds) && !filters_syscalls(p) {
        let main = threads
            .first_mut()
            .expect("seize_all returns at least the main thread");
        snapshot = Snapshot::take(main, syscall_ip);
    }
    let held = match &snapshot {
        // Pages the snapshot child lacks (MADV_DONTFORK, MADV_WIPEONFORK) are read now.
        Some(child) => {
            let (later, now) = child.split(&pieces, &meta.mappings);
            pieces = later;
            now
        }
        None if bytes <= STAGING_MAX => std::mem::take(&mut pieces),
        None => Vec::new(),
    };
    let during_pause = (|| -> Result<(usize, u64), ProcError> {
        let staged = stage(p, &held, &mut staging)?;
        if snapshot.is_none() && !pieces.is_empty() {
            // No snapshot: the rest is copied while the threads are stopped, read and write
            // overlapped.
            copy_pipelined(&Source::Stopped(p), &pieces, &mut pending)?;
            pieces.clear();
        }
        let file_bytes = snapshot_files(pid, &file_region, &file_sources, &mut pending)?;
        Ok((staged, file_bytes))
    })();
    let (staged, file_bytes) = match during_pause {
        Ok(v) => v,
        Err(e) => {
            if let Some(child) = snapshot {
                let main = threads
                    .first_mut()
                    .expect("seize_all returns at least the main thread");
                child.discard_held(main, syscall_ip);
            }
            return Err(e);
        }
    };

    let mut released = Ok(());
    for t in threads {
        released = released.and(t.release());
    }
    let pause = paused.elapsed();
    let after_pause = released.and_then(|()| {
        write_staged(&held, &staging[..staged], &mut pending)?;
        if let Some(child) = &snapshot {
            copy_pipelined(&child.source()?, &pieces, &mut pending)?;
        }
        Ok(())
    });
    let (info, reap_stop) = match (snapshot, after_pause) {
        (None, result) => {
            result?;
            (pending.commit(), Duration::ZERO)
        }
        (Some(child), Err(e)) => {
            child.discard(p, syscall_ip);
            return Err(e);
        }
        // The commit's fdatasync and the child's teardown overlap (ptrace stays on this
        // thread).
        (Some(child), Ok(())) => std::thread::scope(|s| {
            let commit = s.spawn(move || pending.commit());
            let stop = child.discard(p, syscall_ip);
            let info = commit
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            (info, stop)
        }),
    };
    let info = info?;
    let pause = pause + reap_stop;
    if let Some(t) = tracker.as_deref_mut() {
        t.staging.0 = staging;
    }
    if let Some(t) = tracker
        && t.disabled.is_none()
    {
        t.parent = Some(Parent {
            seq: info.seq,
            regions,
            layout: layout_of(&meta.mappings),
            files: file_identities(&meta.files),
        });
    }
    Ok(DumpSummary {
        pid,
        seq: info.seq,
        path: info.path,
        threads: meta.threads.len(),
        mappings: meta.mappings.len(),
        pages,
        parent: header.parent,
        full_reason,
        file_bytes,
        image_bytes: info.file_bytes,
        pause,
        total: started.elapsed(),
        unrestorable,
        files_size_only,
        files_excluded,
    })
}

/// Marks the regular files `opts` leaves out of the snapshot: those at an excluded descriptor
/// number or path, and every other descriptor of the same file (device and inode).
fn mark_excluded(fds: &mut [FdState], opts: &DumpOptions) {
    if opts.exclude_paths.is_empty() && opts.exclude_fds.is_empty() {
        return;
    }
    let mut names: Vec<String> = Vec::new();
    let mut identities: Vec<(u64, u64)> = Vec::new();
    for path in &opts.exclude_paths {
        names.push(path.to_string_lossy().into_owned());
        // The fd's link is the canonical path: a relative or symlinked one only matches so.
        if let Ok(canonical) = std::fs::canonicalize(path) {
            names.push(canonical.to_string_lossy().into_owned());
        }
        if let Ok(st) = std::fs::metadata(path) {
            identities.push((st.dev(), st.ino()));
        }
    }
    for f in fds.iter() {
        let FdKind::File { path } = &f.kind else {
            continue;
        };
        if opts.exclude_fds.contains(&f.fd) || names.iter().any(|n| n == path) {
            identities.push((f.dev, f.ino));
        }
    }
    for f in fds.iter_mut() {
        if matches!(f.kind, FdKind::File { .. }) && identities.contains(&(f.dev, f.ino)) {
            f.excluded = true;
        }
    }
}

/// Bytes of the metadata region of a full image whose encoding is `len` bytes: room for the
/// increments of its chain, whose metadata must fit the same region.
fn meta_capacity(len: usize) -> u64 {
    let want = len as u64 + len as u64 / 2 + META_SLACK;
    want.div_ceil(PAGE) * PAGE
}

/// The regions of an image of `meta`: metadata, each mapping with contents, each kept file
/// (sized to the power of two above its size, so a file that grows keeps the chain's layout
/// for a while).
fn image_regions(meta: &ProcessMeta, meta_cap: u64) -> Result<Vec<RegionDesc>, ProcError> {
    let mut regions = vec![RegionDesc {
        id: META_REGION_ID,
        base: 0,
        len: meta_cap,
    }];
    for (i, m) in meta.mappings.iter().enumerate() {
        if m.has_contents {
            regions.push(RegionDesc {
                id: MAPPING_REGION_BASE + region_index(i)?,
                base: m.start,
                len: m.len(),
            });
        }
    }
    for (k, f) in meta.files.iter().enumerate() {
        if f.has_contents {
            regions.push(RegionDesc {
                id: FILE_REGION_BASE + region_index(k)?,
                base: 0,
                len: f.size.max(FILE_REGION_MIN).next_power_of_two(),
            });
        }
    }
    Ok(regions)
}

/// The files an increment must keep with its parent, sizes left out (they may grow).
fn file_identities(files: &[FileSnapshot]) -> Vec<FileSnapshot> {
    files
        .iter()
        .map(|f| FileSnapshot {
            size: 0,
            ..f.clone()
        })
        .collect()
}

/// Mappings whose writes are tracked: private, writable, with contents of their own.
fn trackable(m: &Mapping) -> bool {
    m.has_contents && !m.shared && m.prot & PROT_W != 0
}

/// The layout an increment must share with its parent: the mappings without their data runs.
fn layout_of(mappings: &[Mapping]) -> Vec<Mapping> {
    mappings
        .iter()
        .map(|m| Mapping {
            runs: None,
            ..m.clone()
        })
        .collect()
}

/// Whether this dump can be an increment against `parent`, and if so what to read of each
/// mapping: the pages written since the parent (tracked mappings), all data (untracked
/// writable ones), everything (shared ones), nothing (read-only ones, which change only
/// with their protection, i.e. the layout). The reason for a full image otherwise.
fn plan_increment(
    t: &Tracker,
    parent: Option<&Parent>,
    plan: &Plan,
    meta: &ProcessMeta,
    meta_bytes: &[u8],
    regions: &[RegionDesc],
    pagemap: &Pagemap,
) -> Result<Reads, String> {
    if let Some(reason) = &t.disabled {
        return Err(format!("write tracking unavailable: {reason}"));
    }
    let Some(parent) = parent else {
        return Err("no previous tracked dump to build on".into());
    };
    if plan.parent != Some(parent.seq) {
        return Err(format!(
            "image {} is not the store's base for the next increment",
            parent.seq
        ));
    }
    if plan.compact {
        return Err("the chain holds the store's full_every increments".into());
    }
    if meta_bytes.len() as u64 > parent.regions.first().map_or(0, |r| r.len) {
        return Err("the metadata outgrew its region".into());
    }
    if parent.layout != layout_of(&meta.mappings) {
        return Err("the memory layout changed".into());
    }
    if parent.files != file_identities(&meta.files) || parent.regions != regions {
        return Err("the files open for writing changed".into());
    }
    let mut reads = Vec::with_capacity(meta.mappings.len());
    for m in &meta.mappings {
        let r = if !m.has_contents {
            None
        } else if m.shared {
            m.runs.clone()
        } else if m.prot & PROT_W == 0 {
            Some(Vec::new())
        } else if t.is_tracked(m.start, m.end) {
            Some(
                pagemap
                    .written_runs(m.start, m.end)
                    .map_err(|e| format!("write tracking lost: {e}"))?,
            )
        } else {
            m.runs.clone()
        };
        reads.push(r);
    }
    Ok(reads)
}

fn region_index(i: usize) -> Result<u32, ProcError> {
    u32::try_from(i).map_err(|_| ProcError::Unsupported {
        reason: "more regions than an image holds".into(),
    })
}

/// Bytes of the target's memory, in the image at `offset` of region `region`.
#[derive(Debug, Clone, Copy)]
struct Piece {
    /// Index of the mapping in the metadata.
    mapping: usize,
    region: u32,
    offset: u64,
    addr: u64,
    len: u64,
}

impl Piece {
    fn len_usize(&self) -> Result<usize, ProcError> {
        usize::try_from(self.len).map_err(|_| ProcError::Unsupported {
            reason: format!("a run of {} bytes does not fit this platform", self.len),
        })
    }
}

fn image_err(pending: &Pending) -> impl FnOnce(ImageError) -> ProcError + '_ {
    move |source| {
        ProcError::Store(StoreError::Image {
            path: pending.temp_path().to_owned(),
            source,
        })
    }
}

/// Pieces of a mapping the process cannot read itself (process_vm_readv refuses them), copied
/// at once through /proc/PID/mem while the threads are stopped.
fn copy_unreadable(pid: Pid, pieces: &[Piece], pending: &mut Pending) -> Result<(), ProcError> {
    if pieces.is_empty() {
        return Ok(());
    }
    let path = format!("/proc/{pid}/mem");
    let mem = File::open(&path).map_err(|source| ProcError::File {
        op: "open",
        path,
        source,
    })?;
    let mut buf = vec![0u8; READ_BATCH];
    for x in pieces {
        let mut done = 0u64;
        while done < x.len {
            let len = usize::try_from(x.len - done)
                .unwrap_or(READ_BATCH)
                .min(READ_BATCH);
            let addr = x.addr + done;
            mem.read_exact_at(&mut buf[..len], addr)
                .map_err(|e| ProcError::Memory {
                    op: "read",
                    pid: pid.as_raw(),
                    addr,
                    len,
                    errno: nix::errno::Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
                })?;
            pending.chunk(x.region, x.offset + done, &buf[..len])?;
            done += len as u64;
        }
    }
    Ok(())
}

/// A staging buffer for a dump of `pid` without a tracker: as large as the process's resident
/// memory when that is at most `STAGING_MAX` (else empty: a snapshot child is used), every
/// page written so that none is faulted in while the process is stopped.
fn prepared_staging(pid: Pid) -> Vec<u8> {
    let resident = std::fs::read_to_string(format!("/proc/{pid}/statm"))
        .ok()
        .and_then(|t| t.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(u64::MAX, |pages| pages.saturating_mul(PAGE));
    if resident > STAGING_MAX {
        return Vec::new();
    }
    let len = usize::try_from(resident + STAGING_SLACK).unwrap_or(0);
    let mut buf = vec![0u8; len];
    // calloc's pages are not backed until written.
    for b in buf.iter_mut().step_by(PAGE_BYTES) {
        *b = 1;
    }
    buf
}

/// Reads `pieces` of process `pid` (while its threads are stopped) into the start of
/// `staging`, grown if needed, to be written after they run again (`write_staged`). Returns
/// the bytes read.
fn stage(pid: Pid, pieces: &[Piece], staging: &mut Vec<u8>) -> Result<usize, ProcError> {
    let mut ranges = Vec::with_capacity(pieces.len());
    let mut total = 0usize;
    for x in pieces {
        let len = x.len_usize()?;
        ranges.push((x.addr, len));
        total += len;
    }
    if staging.len() < total {
        staging.resize(total, 0);
    }
    ptrace::read_ranges(pid, &ranges, &mut staging[..total])?;
    Ok(total)
}

/// Writes `pieces` from `staged` (as `stage` read them) as chunks of the image.
fn write_staged(pieces: &[Piece], staged: &[u8], pending: &mut Pending) -> Result<(), ProcError> {
    let mut at = 0usize;
    let mut chunks = Vec::with_capacity(pieces.len());
    for x in pieces {
        let len = x.len_usize()?;
        chunks.push((x.region, x.offset, &staged[at..at + len]));
        at += len;
    }
    let result = pending.writer().chunks(chunks);
    result.map_err(image_err(pending))
}

/// Where the pipelined copy reads the target's memory.
enum Source {
    /// The target itself, all its threads stopped: process_vm_readv, many runs per call.
    Stopped(Pid),
    /// A snapshot child, through its /proc/PID/mem. Not process_vm_readv: that pins the
    /// pages, and a read-only pin of a page shared copy-on-write with the target makes the
    /// kernel copy it first (GUP unsharing), which costs more than the read itself.
    Snapshot { pid: Pid, mem: File },
}

impl Source {
    /// Reads the ranges `(address, length)` one after the other into `buf`.
    fn read(&self, ranges: &[(u64, usize)], buf: &mut [u8]) -> Result<(), ProcError> {
        match self {
            Source::Stopped(pid) => ptrace::read_ranges(*pid, ranges, buf),
            Source::Snapshot { pid, mem } => {
                let mut at = 0usize;
                for &(addr, len) in ranges {
                    mem.read_exact_at(&mut buf[at..at + len], addr)
                        .map_err(|e| ProcError::Memory {
                            op: "read",
                            pid: pid.as_raw(),
                            addr,
                            len,
                            errno: nix::errno::Errno::from_raw(
                                e.raw_os_error().unwrap_or(libc::EIO),
                            ),
                        })?;
                    at += len;
                }
                Ok(())
            }
        }
    }
}

/// A filled read buffer on its way to the image writer: its first `used` bytes are the
/// ranges `(region, offset, len)`, in order.
struct Filled {
    buf: Vec<u8>,
    ranges: Vec<(u32, u64, usize)>,
}

/// Copies `pieces` of process `src` into the image: this thread reads them with large
/// process_vm_readv calls into one of `PIPE_BUFFERS` buffers while a writer thread checksums
/// and writes the previous one, straight from that buffer.
fn copy_pipelined(src: &Source, pieces: &[Piece], pending: &mut Pending) -> Result<(), ProcError> {
    if pieces.is_empty() {
        return Ok(());
    }
    let tmp = pending.temp_path().to_owned();
    let writer = pending.writer();
    let (full_tx, full_rx) = mpsc::sync_channel::<Filled>(PIPE_BUFFERS);
    let (free_tx, free_rx) = mpsc::channel::<Vec<u8>>();
    for _ in 0..PIPE_BUFFERS {
        free_tx
            .send(Vec::new())
            .expect("the receiver lives in this function");
    }
    let (read, wrote) = std::thread::scope(|s| {
        let w = s.spawn(move || -> Result<(), ImageError> {
            for f in full_rx {
                let mut at = 0usize;
                let buf = &f.buf;
                writer.chunks(f.ranges.iter().map(|&(region, offset, len)| {
                    let piece = (region, offset, &buf[at..at + len]);
                    at += len;
                    piece
                }))?;
                if free_tx.send(f.buf).is_err() {
                    break;
                }
            }
            Ok(())
        });
        let read = (|| -> Result<(), ProcError> {
            let mut next = 0usize;
            let mut done_in_next = 0u64;
            while next < pieces.len() {
                // The writer stopped (it failed): its error is the one reported.
                let Ok(mut buf) = free_rx.recv() else {
                    return Ok(());
                };
                buf.resize(READ_BATCH, 0);
                let mut ranges = Vec::new();
                let mut remote = Vec::new();
                let mut used = 0usize;
                while next < pieces.len() && used < READ_BATCH {
                    let x = &pieces[next];
                    let room = (READ_BATCH - used) as u64;
                    let take = (x.len - done_in_next).min(room);
                    let len = usize::try_from(take).unwrap_or(0);
                    ranges.push((x.region, x.offset + done_in_next, len));
                    remote.push((x.addr + done_in_next, len));
                    used += len;
                    done_in_next += take;
                    if done_in_next == x.len {
                        next += 1;
                        done_in_next = 0;
                    }
                }
                src.read(&remote, &mut buf[..used])?;
                buf.truncate(used);
                if full_tx.send(Filled { buf, ranges }).is_err() {
                    return Ok(());
                }
            }
            Ok(())
        })();
        drop(full_tx);
        if let Source::Snapshot { pid, .. } = src {
            // Read in full: the child's teardown may start while the last buffers are written
            // (it is reaped later, by `Snapshot::discard`).
            let _ = nix::sys::signal::kill(*pid, nix::sys::signal::Signal::SIGKILL);
        }
        let wrote = w
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        (read, wrote)
    });
    wrote.map_err(|source| ProcError::Store(StoreError::Image { path: tmp, source }))?;
    read
}

/// Copies the files open for writing that the image keeps (while the threads are stopped, so
/// no write of the process comes between its memory and its files). Returns the bytes kept.
fn snapshot_files(
    pid: i32,
    file_region: &[(usize, u32)],
    file_sources: &[(i32, u64)],
    pending: &mut Pending,
) -> Result<u64, ProcError> {
    let mut file_bytes = 0;
    for &(k, region) in file_region {
        let (fd, size) = file_sources[k];
        let link = format!("/proc/{pid}/fd/{fd}");
        let file = File::open(&link).map_err(|source| ProcError::File {
            op: "open",
            path: link.clone(),
            source,
        })?;
        let mut buf = vec![0u8; FILE_STEP];
        let mut at = 0u64;
        while at < size {
            let want = usize::try_from(size - at)
                .unwrap_or(FILE_STEP)
                .min(FILE_STEP);
            let n = file
                .read_at(&mut buf[..want], at)
                .map_err(|source| ProcError::File {
                    op: "read",
                    path: link.clone(),
                    source,
                })?;
            if n == 0 {
                // The file shrank under a stopped process: another writer. Keep what was there.
                break;
            }
            pending.chunk(region, at, &buf[..n])?;
            at += n as u64;
        }
        file_bytes += at;
    }
    Ok(file_bytes)
}

/// True unless the process is known to run without a seccomp filter: a filter might kill it
/// for the injected clone of a snapshot.
fn filters_syscalls(pid: Pid) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Seccomp:"))
                .map(|v| v.trim() != "0")
        })
        .unwrap_or(true)
}

/// True when the process holds a userfaultfd: one of its own may want fork events, and an
/// injected fork would then wait for a handler thread that is stopped.
fn has_userfaultfd(fds: &[FdState]) -> bool {
    fds.iter()
        .any(|f| matches!(&f.kind, FdKind::Other { target } if target.contains("userfaultfd")))
}

/// A copy-on-write snapshot of the target's memory: a child forked by an injected `clone`
/// while every thread is stopped, traced from birth (`CLONE_PTRACE`) so it never runs a
/// single instruction, sharing the descriptor table (`CLONE_FILES`, so it holds no extra
/// reference to any file) and sending no signal at its end (exit signal 0). Its memory is
/// read after the target runs again; the target only pays a copy-on-write fault for each page
/// it writes meanwhile. `discard` kills it and has the target reap it.
#[derive(Debug)]
struct Snapshot {
    child: Tracee,
}

impl Snapshot {
    /// Forks the stopped target; None when the kernel refuses (memory, pid or seccomp limits)
    /// or the child is not as expected (the dump then reads the target while it is stopped).
    fn take(main: &mut Tracee, syscall_ip: u64) -> Option<Snapshot> {
        let flags = (libc::CLONE_PTRACE | libc::CLONE_FILES).cast_unsigned();
        let r = main
            .inject(syscall_ip, libc::SYS_clone, &[u64::from(flags), 0, 0, 0, 0])
            .ok()?;
        let pid = Pid::from_raw(i32::try_from(r).ok().filter(|&c| c > 0)?);
        let Ok(child) = Tracee::adopt_clone(pid) else {
            reap_in(main, syscall_ip, pid);
            return None;
        };
        let child = Snapshot { child };
        // Stopped on its way out of the clone, before any instruction of its own.
        if child.child.regs.rip != syscall_ip + SYSCALL_INSN_LEN || child.child.regs.rax != 0 {
            child.discard_held(main, syscall_ip);
            return None;
        }
        #[cfg(test)]
        tests::SNAPSHOTS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Some(child)
    }

    fn pid(&self) -> Pid {
        self.child.tid
    }

    /// Where its memory is read.
    fn source(&self) -> Result<Source, ProcError> {
        let path = format!("/proc/{}/mem", self.pid());
        let mem = File::open(&path).map_err(|source| ProcError::File {
            op: "open",
            path,
            source,
        })?;
        Ok(Source::Snapshot {
            pid: self.pid(),
            mem,
        })
    }

    /// Splits `pieces` into those the child holds as they are now (read from it later) and
    /// the others, read from the target now: shared memory, and mappings the fork did not copy
    /// (MADV_DONTFORK, MADV_WIPEONFORK).
    fn split(&self, pieces: &[Piece], mappings: &[Mapping]) -> (Vec<Piece>, Vec<Piece>) {
        let mut later = Vec::with_capacity(pieces.len());
        let mut now = Vec::new();
        let child = Pagemap::open(self.pid()).ok();
        let mut i = 0;
        while i < pieces.len() {
            let mi = pieces[i].mapping;
            let end = pieces[i..]
                .iter()
                .position(|x| x.mapping != mi)
                .map_or(pieces.len(), |n| i + n);
            let group = &pieces[i..end];
            // Shared memory is the same memory in the child: it changes once the target runs.
            let held = mappings.get(mi).filter(|m| !m.shared).and_then(|m| {
                child
                    .as_ref()
                    .and_then(|pm| pm.data_runs(m.start, m.end, false).ok())
            });
            let covered = held.is_some_and(|runs| {
                group.iter().all(|x| {
                    let k = runs.partition_point(|&(_, e)| e <= x.addr);
                    runs.get(k)
                        .is_some_and(|&(s, e)| s <= x.addr && x.addr + x.len <= e)
                })
            });
            if covered {
                later.extend_from_slice(group);
            } else {
                now.extend_from_slice(group);
            }
            i = end;
        }
        (later, now)
    }

    /// Kills the child and has the target (whose main thread is still held) reap it.
    fn discard_held(self, main: &mut Tracee, syscall_ip: u64) {
        let pid = self.pid();
        self.child.kill_and_reap();
        reap_in(main, syscall_ip, pid);
    }

    /// Kills the child and has the target reap it: the target's threads are seized again for
    /// the one injected `wait4`, a short second stop, whose length it returns. Best effort: a
    /// target that exited took its zombie child with it.
    fn discard(self, target: Pid, syscall_ip: u64) -> Duration {
        let pid = self.pid();
        self.child.kill_and_reap();
        let stopped = Instant::now();
        if let Ok(mut threads) = ptrace::seize_all(target) {
            if let Some(main) = threads.first_mut() {
                main.set_resume(regs::resumable(&main.regs, true));
                reap_in(main, syscall_ip, pid);
            }
            for t in threads {
                let _ = t.release();
            }
        }
        stopped.elapsed()
    }
}

/// Has the stopped thread `main` reap its dead child `child` (an injected `wait4` with
/// `__WALL`, never blocking).
fn reap_in(main: &mut Tracee, syscall_ip: u64, child: Pid) {
    let flags = (libc::__WALL | libc::WNOHANG).cast_unsigned();
    let pid = u64::from(child.as_raw().cast_unsigned());
    for _ in 0..REAP_ATTEMPTS {
        match main.inject(syscall_ip, libc::SYS_wait4, &[pid, 0, u64::from(flags), 0]) {
            // Not yet reported dead to its parent: the tracer's reap is a moment ahead.
            Ok(0) => std::thread::sleep(REAP_PAUSE),
            _ => return,
        }
    }
}

/// The mapping as the image records it, and how much of it to keep.
fn classify(pid: Pid, line: &MapsLine) -> (Mapping, Contents) {
    let mut m = Mapping {
        start: line.start,
        end: line.end,
        prot: line.prot,
        shared: line.shared,
        offset: line.offset,
        kind: MappingKind::Anon {
            name: line.path.clone(),
        },
        has_contents: true,
        runs: None,
    };
    if line.is_special() {
        m.kind = MappingKind::Special {
            name: line.path.clone(),
        };
        m.has_contents = false;
        return (m, Contents::None);
    }
    let anon_contents = if line.shared {
        Contents::Everything
    } else {
        Contents::Present
    };
    if line.inode == 0 || !line.path.starts_with('/') || line.path.ends_with(" (deleted)") {
        return (m, anon_contents);
    }
    // The file the mapping really holds (map_files) must still be the one at its path;
    // otherwise it is kept whole, as anonymous memory.
    let mapped = std::fs::metadata(format!(
        "/proc/{pid}/map_files/{:x}-{:x}",
        line.start, line.end
    ));
    let named = std::fs::metadata(&line.path);
    match (mapped, named) {
        (Ok(a), Ok(b)) if a.dev() == b.dev() && a.ino() == b.ino() => {
            m.kind = MappingKind::File {
                path: line.path.clone(),
                dev: b.dev(),
                ino: b.ino(),
                size: b.len(),
                mtime_ns: i128::from(b.mtime()) * 1_000_000_000 + i128::from(b.mtime_nsec()),
            };
            if line.shared {
                m.has_contents = false;
                (m, Contents::None)
            } else {
                (m, Contents::AnonPages)
            }
        }
        _ => (m, anon_contents),
    }
}

/// The address of a `syscall` instruction (0f 05) in the process: in the vDSO if it has one
/// (always mapped, never changed by the program), else in any executable mapping. Any such
/// byte pair works, even one inside another instruction: the thread is single-stepped over
/// exactly those two bytes.
pub fn find_syscall_insn(pid: Pid, maps: &[MapsLine]) -> Result<u64, ProcError> {
    let vdso = maps.iter().filter(|m| m.path == "[vdso]");
    let others = maps
        .iter()
        .filter(|m| m.path != "[vdso]" && m.prot & super::meta::PROT_X != 0 && !m.is_special());
    let limit = 1u64 << 20;
    for m in vdso.chain(others) {
        let len = usize::try_from((m.end - m.start).min(limit)).unwrap_or(0);
        let mut buf = vec![0u8; len];
        if ptrace::read_mem(pid, m.start, &mut buf).is_err() {
            continue;
        }
        if let Some(i) = buf.windows(2).position(|w| w == [0x0f, 0x05]) {
            return Ok(m.start + i as u64);
        }
    }
    Err(ProcError::Unsupported {
        reason: format!("process {pid} has no syscall instruction to run injected calls with"),
    })
}

/// Signal actions (all 64) and the program break, asked of the kernel by the process itself
/// (injected calls), through a scratch mapping that is removed afterwards.
fn query_kernel_state(
    main: &mut Tracee,
    syscall_ip: u64,
) -> Result<(Vec<SigAction>, u64), ProcError> {
    main.set_resume(regs::resumable(&main.regs, true));
    let scratch = main.inject_ok(
        syscall_ip,
        "mmap",
        libc::SYS_mmap,
        &[
            0,
            SCRATCH_LEN,
            (libc::PROT_READ | libc::PROT_WRITE) as u64,
            (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64,
            u64::MAX,
            0,
        ],
    )?;
    let result = (|| {
        let mut actions = Vec::with_capacity(NSIG);
        let mut raw = [0u8; SIGACTION_LEN];
        for sig in 1..=NSIG as u64 {
            main.inject_ok(
                syscall_ip,
                "rt_sigaction",
                libc::SYS_rt_sigaction,
                &[sig, 0, scratch, SIGSET_LEN],
            )?;
            main.read_mem(scratch, &mut raw)?;
            actions.push(sigaction_from(&raw));
        }
        let brk = main.inject_ok(syscall_ip, "brk", libc::SYS_brk, &[0])?;
        Ok((actions, brk))
    })();
    main.inject_ok(
        syscall_ip,
        "munmap",
        libc::SYS_munmap,
        &[scratch, SCRATCH_LEN],
    )?;
    result
}

fn word(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

pub fn sigaction_from(raw: &[u8; SIGACTION_LEN]) -> SigAction {
    SigAction {
        handler: word(raw, 0),
        flags: word(raw, 8),
        restorer: word(raw, 16),
        mask: word(raw, 24),
    }
}

pub fn sigaction_bytes(a: &SigAction) -> [u8; SIGACTION_LEN] {
    let mut raw = [0u8; SIGACTION_LEN];
    raw[0..8].copy_from_slice(&a.handler.to_le_bytes());
    raw[8..16].copy_from_slice(&a.flags.to_le_bytes());
    raw[16..24].copy_from_slice(&a.restorer.to_le_bytes());
    raw[24..32].copy_from_slice(&a.mask.to_le_bytes());
    raw
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::process::CommandExt;
    use std::process::{Command, Stdio};
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::super::{DumpOptions, RestoreOptions};
    use crate::store::{Store, StorePolicy};

    /// Snapshot children taken by this test process (the snapshot path really ran).
    pub static SNAPSHOTS: AtomicUsize = AtomicUsize::new(0);

    /// More written memory than `STAGING_MAX` (so the dump forks a snapshot child), and two
    /// regions a fork does not copy as they are: MADV_WIPEONFORK (empty in the child) and
    /// MADV_DONTFORK (absent from it). Prints checksums of the three on every input line.
    const PROGRAM: &str = r#"
#define _GNU_SOURCE
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#define BIG (80UL << 20)
#define SMALL (1UL << 20)
static unsigned long sum(const unsigned char *p, size_t n) {
    unsigned long s = 0;
    for (size_t i = 0; i < n; i += 64) s = s * 31 + p[i] + p[i + 63];
    return s;
}
int main(void) {
    int rw = PROT_READ | PROT_WRITE, anon = MAP_PRIVATE | MAP_ANONYMOUS;
    unsigned char *big = mmap(0, BIG, rw, anon, -1, 0);
    unsigned char *wipe = mmap(0, SMALL, rw, anon, -1, 0);
    unsigned char *keep = mmap(0, SMALL, rw, anon, -1, 0);
    if (big == MAP_FAILED || wipe == MAP_FAILED || keep == MAP_FAILED) return 3;
    if (madvise(wipe, SMALL, MADV_WIPEONFORK) || madvise(keep, SMALL, MADV_DONTFORK)) return 4;
    for (size_t i = 0; i < BIG; i += 4096) memset(big + i, (int)(i >> 12) | 1, 4096);
    memset(wipe, 0x5a, SMALL);
    memset(keep, 0xa5, SMALL);
    printf("ready\n");
    fflush(stdout);
    char line[64];
    while (fgets(line, sizeof line, stdin)) {
        printf("%lu %lu %lu\n", sum(big, BIG), sum(wipe, SMALL), sum(keep, SMALL));
        fflush(stdout);
    }
    return 0;
}
"#;

    struct Prog {
        pid: i32,
        input: std::fs::File,
        output: BufReader<std::fs::File>,
    }

    impl Prog {
        fn ask(&mut self) -> String {
            writeln!(self.input, "c").unwrap();
            let mut line = String::new();
            self.output.read_line(&mut line).unwrap();
            line.trim_end().to_owned()
        }

        fn kill(&self) {
            let pid = nix::unistd::Pid::from_raw(self.pid);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            let _ = nix::sys::wait::waitpid(pid, None);
        }
    }

    impl Drop for Prog {
        fn drop(&mut self) {
            self.kill();
        }
    }

    /// (the program's stdin, its stdout), (our ends).
    fn pipes() -> (
        (std::os::fd::OwnedFd, std::os::fd::OwnedFd),
        (std::fs::File, BufReader<std::fs::File>),
    ) {
        let (in_rd, in_wr) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        let (out_rd, out_wr) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        (
            (in_rd, out_wr),
            (
                std::fs::File::from(in_wr),
                BufReader::new(std::fs::File::from(out_rd)),
            ),
        )
    }

    /// Processes whose parent is `pid`.
    fn children_of(pid: i32) -> Vec<i32> {
        let mut out = Vec::new();
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            let Some(child) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
                continue;
            };
            let stat = std::fs::read_to_string(format!("/proc/{child}/stat")).unwrap_or_default();
            let ppid = stat
                .rfind(')')
                .and_then(|i| stat[i + 1..].split_whitespace().nth(1)?.parse::<i32>().ok());
            if ppid == Some(pid) {
                out.push(child);
            }
        }
        out
    }

    #[test]
    fn a_snapshot_dump_keeps_wipeonfork_and_dontfork_memory_and_leaves_no_child() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("snap.c");
        let exe = tmp.path().join("snap");
        std::fs::write(&src, PROGRAM).unwrap();
        let st = Command::new("cc")
            .args(["-O1", "-Wall", "-o"])
            .arg(&exe)
            .arg(&src)
            .status()
            .unwrap();
        assert!(st.success());
        let ((stdin, stdout), (input, output)) = pipes();
        let mut cmd = Command::new(&exe);
        // SAFETY: one async-signal-safe system call between fork and exec: descriptors the
        // test runner left without close-on-exec must not reach the program.
        unsafe {
            cmd.pre_exec(|| {
                libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
                Ok(())
            });
        }
        let child = cmd
            .stdin(Stdio::from(stdin))
            .stdout(Stdio::from(stdout))
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        drop(cmd);
        let mut prog = Prog {
            pid: i32::try_from(child.id()).unwrap(),
            input,
            output,
        };
        // Prog kills and reaps it.
        std::mem::forget(child);
        let mut ready = String::new();
        prog.output.read_line(&mut ready).unwrap();
        assert_eq!(ready.trim_end(), "ready");
        let before = prog.ask();

        let store = Store::open(tmp.path(), "snap-test", StorePolicy::default()).unwrap();
        let taken = SNAPSHOTS.load(Ordering::SeqCst);
        let d = super::super::dump(prog.pid, &store, &DumpOptions::default()).unwrap();
        assert!(
            SNAPSHOTS.load(Ordering::SeqCst) > taken,
            "no snapshot child was used"
        );
        assert!(d.pause < d.total, "{d:?}");
        assert_eq!(children_of(prog.pid), Vec::<i32>::new());
        assert_eq!(prog.ask(), before, "the dump changed the running program");
        store.verify(d.seq).unwrap();

        prog.kill();
        let ((stdin, stdout), (input, output)) = pipes();
        let r = super::super::restore(
            &store,
            Some(d.seq),
            RestoreOptions {
                fds: vec![(0, stdin), (1, stdout)],
                ..RestoreOptions::default()
            },
        )
        .unwrap();
        let mut back = Prog {
            pid: r.pid,
            input,
            output,
        };
        assert_eq!(back.ask(), before, "the restored memory differs");
    }
}
