//! The dump: a running process's state read while all its threads are stopped, written as one
//! full image of the store (metadata region first, then memory pages, then file snapshots),
//! the threads let go, then the image committed. It must never change what the process will
//! do next: injected calls only read (rt_sigaction with no new action, brk(0)) and run on a
//! scratch mapping that is removed again, and every register is put back.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::time::Instant;

use nix::unistd::Pid;

use super::meta::{
    FILE_REGION_BASE, FdKind, FileSnapshot, MAPPING_REGION_BASE, META_REGION_ID, META_VERSION,
    Mapping, MappingKind, NSIG, PROC_STREAM, PROT_R, PROT_W, ProcessMeta, SigAction, ThreadState,
};
use super::procfs::{self, MapsLine, Pagemap};
use super::ptrace::{self, Tracee};
use super::regs;
use super::track::{Parent, Tracker};
use super::{DumpOptions, DumpSummary, ProcError, Unrestorable};
use crate::image::{ImageHeader, RegionDesc, unix_now_ns};
use crate::store::{Pending, Plan, Store, StoreError};

/// Page size the images record (x86_64).
pub const PAGE: u64 = 4096;
/// Memory read from the target per batch before it is written to the image.
const READ_BATCH: usize = 8 << 20;
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
        });
    }

    let main = threads
        .first_mut()
        .expect("seize_all returns at least the main thread");
    let before = procfs::maps(p)?;
    let syscall_ip = find_syscall_insn(p, &before)?;
    let (sigactions, brk) = query_kernel_state(main, syscall_ip)?;

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

    let fds = procfs::fds(p)?;
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
    for f in &fds {
        let FdKind::File { path } = &f.kind else {
            continue;
        };
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
    let mut pages = 0u64;
    let mut batch = Batch::new(p);
    for (i, m) in meta.mappings.iter().enumerate() {
        let Some(&region) = mapping_region.get(&i) else {
            continue;
        };
        let runs = match &increment {
            Some((_, reads)) => reads.get(i).and_then(Option::as_ref),
            None => m.runs.as_ref(),
        };
        let direct = m.prot & PROT_R != 0;
        for &(s, e) in runs.into_iter().flatten() {
            pages += (e - s) / PAGE;
            let mut at = s;
            while at < e {
                let len = usize::try_from(e - at)
                    .unwrap_or(READ_BATCH)
                    .min(READ_BATCH);
                batch.push(&mut pending, region, at - m.start, at, len, direct)?;
                at += len as u64;
            }
        }
    }
    batch.flush(&mut pending)?;

    let mut file_bytes = 0;
    for (k, region) in file_region {
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

    for t in threads {
        t.release()?;
    }
    let pause = paused.elapsed();
    let info = pending.commit()?;
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
    })
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

/// Memory ranges read from the target in one go and written as chunks.
struct Batch {
    pid: Pid,
    buf: Vec<u8>,
    /// (region index, offset in region, remote address, length) of each range in `buf`.
    ranges: Vec<(u32, u64, u64, usize)>,
    used: usize,
    mem: Option<File>,
}

impl Batch {
    fn new(pid: Pid) -> Batch {
        Batch {
            pid,
            buf: vec![0u8; READ_BATCH],
            ranges: Vec::new(),
            used: 0,
            mem: None,
        }
    }

    /// Queues a range; `direct` false reads it at once through /proc/PID/mem (a mapping the
    /// process itself may not read, which process_vm_readv refuses).
    fn push(
        &mut self,
        pending: &mut Pending,
        region: u32,
        offset: u64,
        addr: u64,
        len: usize,
        direct: bool,
    ) -> Result<(), ProcError> {
        if self.used + len > self.buf.len() {
            self.flush(pending)?;
        }
        if direct {
            self.ranges.push((region, offset, addr, len));
            self.used += len;
            return Ok(());
        }
        self.flush(pending)?;
        if self.mem.is_none() {
            let path = format!("/proc/{}/mem", self.pid);
            self.mem = Some(File::open(&path).map_err(|source| ProcError::File {
                op: "open",
                path,
                source,
            })?);
        }
        let mem = self.mem.as_ref().expect("opened just above");
        mem.read_exact_at(&mut self.buf[..len], addr)
            .map_err(|e| ProcError::Memory {
                op: "read",
                pid: self.pid.as_raw(),
                addr,
                len,
                errno: nix::errno::Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
            })?;
        pending.chunk(region, offset, &self.buf[..len])?;
        Ok(())
    }

    fn flush(&mut self, pending: &mut Pending) -> Result<(), ProcError> {
        if self.ranges.is_empty() {
            return Ok(());
        }
        let remote: Vec<(u64, usize)> = self.ranges.iter().map(|r| (r.2, r.3)).collect();
        ptrace::read_ranges(self.pid, &remote, &mut self.buf[..self.used])?;
        let mut at = 0;
        let buf = &self.buf;
        let pieces = self.ranges.iter().map(|&(region, offset, _, len)| {
            let piece = (region, offset, &buf[at..at + len]);
            at += len;
            piece
        });
        let tmp = pending.temp_path().to_owned();
        pending
            .writer()
            .chunks(pieces)
            .map_err(|source| StoreError::Image { path: tmp, source })?;
        self.ranges.clear();
        self.used = 0;
        Ok(())
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
