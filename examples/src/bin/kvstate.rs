//! kvstate: a stateful service whose whole state lives in libft's critical memory, for trying
//! checkpoint and recovery by hand and in end-to-end tests. `examples/c/kvstate.c` is the same
//! program in C (same options, operations, digest and output lines).
//!
//! The state is a hash table of chained entries: a registered global (the `ft_critical`
//! region) points to the table in the critical heap, the table to its bucket array, buckets to
//! entries, entries to the next entry and to their key and value strings — all `t_ftmalloc`
//! blocks linked by raw pointers, which stay valid after recovery because the heap lives at a
//! fixed address. At start-up it recovers the newest good checkpoint and prints
//! `recovered seq S counter C digest D` (or `fresh start`) and libft's recovery report. Then
//! each step applies one deterministic operation (a pure function of the counter), heartbeats,
//! and calls the safe point (periodic checkpoints from `FT_CKPT_EVERY`, and those asked for by
//! `ftctl checkpoint`); every `--sync-every` operations it takes a synchronous checkpoint and
//! appends `checkpoint seq S counter C digest D` to `--journal`. Only those are journaled.
//! D is an FNV-1a digest of the whole table, computed by walking the pointers.
//! The table's layout is the C program's, so under one identity (`FT_SERVICE`, which places
//! the heap) each program recovers the other's checkpoints.
//!
//! SIGUSR1 crashes it at once (abort), SIGUSR2 makes it hang (no more heartbeats).

use std::fs::File;
use std::io::Write;
use std::process::ExitCode;
use std::ptr::NonNull;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ft::critical::{Checkpointer, CriticalBox, CriticalHeap};
use ft::proto::WatchdMessage;
use ft::{Error, Watch};

/// The thread id the program heartbeats for.
const TID: u32 = 1;
/// The checkpoint stream holding the state (`$FT_CKPT_DIR/0`).
const STREAM: u32 = 0;
const DEFAULT_INTERVAL_MS: u64 = 20;
const DEFAULT_TIMEOUT_MS: u32 = 1000;
const DEFAULT_SYNC_EVERY: u64 = 50;
/// How one sleep of a hung program lasts; it sleeps in a loop forever.
const HANG_NAP: Duration = Duration::from_secs(3600);
/// How often the main loop looks for watchd's requests (`ftctl checkpoint`), as libft's C API
/// does in `t_safe_point`.
const REQUEST_POLL_INTERVAL: Duration = Duration::from_millis(100);

/// Buckets of the hash table.
const NBUCKETS: u64 = 64;
/// Keys are `k0` .. `k<KEYSPACE-1>`, which bounds the table however long the program runs.
const KEYSPACE: u64 = 500;
/// Every DELETE_EVERY-th operation also deletes a key.
const DELETE_EVERY: u64 = 3;
/// The deleted key is `k<(counter * DELETE_STRIDE) % KEYSPACE>`.
const DELETE_STRIDE: u64 = 7;
/// Values are `v<counter>` followed by `counter % VALUE_PAD_CYCLE` `+` characters, so their
/// blocks vary in size and replacing one frees and allocates.
const VALUE_PAD_CYCLE: u64 = 16;
/// Alignment of every heap block, that of `t_ftmalloc` in the C program.
const BLOCK_ALIGN: usize = 16;
/// Marks an initialised table and global.
const TABLE_MAGIC: u64 = u64::from_le_bytes(*b"KVTABLE1");
const GLOBAL_MAGIC: u64 = u64::from_le_bytes(*b"KVGLOBL1");
const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0100_0000_01b3;

const USAGE: &str =
    "usage: kvstate [--interval-ms I] [--timeout-ms T] [--sync-every N] [--journal PATH]
  Recovers its key-value table from the newest good checkpoint in $FT_CKPT_DIR/0, registers
  with watchd (FT_SOCKET), reports ready, then applies one operation every I ms (default 20),
  heartbeating thread 1 with a deadline of T ms (default 1000) and calling the safe point.
  Every N operations (default 50, 0 = never) it takes a synchronous checkpoint and appends
  `checkpoint seq S counter C digest D` to PATH. SIGUSR1 aborts now, SIGUSR2 hangs now.";

/// Set by the SIGUSR2 handler; the main loop hangs when it sees it.
static HANG_REQUESTED: AtomicBool = AtomicBool::new(false);

/// The global registered as critical memory (the `ft_critical` region): how a recovered
/// process finds its table. Atomics give interior mutability without `static mut`; only the
/// main thread uses them.
#[repr(C)]
#[derive(Debug)]
struct Global {
    magic: AtomicU64,
    table: AtomicPtr<Table>,
}

static GLOBAL: Global = Global {
    magic: AtomicU64::new(0),
    table: AtomicPtr::new(std::ptr::null_mut()),
};

/// The table's root, in the critical heap.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct Table {
    magic: u64,
    /// Operations applied since the fresh start.
    counter: u64,
    /// Live entries.
    count: u64,
    nbuckets: u64,
    /// NBUCKETS chain heads, a heap block of its own.
    buckets: *mut *mut Entry,
}

/// One key-value pair, in the critical heap; key and value are heap blocks of their own.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct Entry {
    next: *mut Entry,
    key: *mut u8,
    value: *mut u8,
    klen: u32,
    vlen: u32,
}

#[derive(Debug)]
struct Options {
    interval: Duration,
    timeout: Duration,
    sync_every: u64,
    journal: Option<String>,
}

fn parse_options(mut args: impl Iterator<Item = String>) -> Result<Options, String> {
    let mut opts = Options {
        interval: Duration::from_millis(DEFAULT_INTERVAL_MS),
        timeout: Duration::from_millis(u64::from(DEFAULT_TIMEOUT_MS)),
        sync_every: DEFAULT_SYNC_EVERY,
        journal: None,
    };
    while let Some(flag) = args.next() {
        if flag == "--help" || flag == "-h" {
            return Err(String::new());
        }
        let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let number = |max: u64| -> Result<u64, String> {
            value
                .parse::<u64>()
                .ok()
                .filter(|n| *n <= max)
                .ok_or_else(|| format!("{flag}: {value:?} is not a number from 0 to {max}"))
        };
        match flag.as_str() {
            "--interval-ms" => opts.interval = Duration::from_millis(number(u64::MAX)?.max(1)),
            "--timeout-ms" => opts.timeout = Duration::from_millis(number(u32::MAX.into())?),
            "--sync-every" => opts.sync_every = number(u64::MAX)?,
            "--journal" => opts.journal = Some(value),
            _ => return Err(format!("unknown option {flag}")),
        }
    }
    Ok(opts)
}

/// Prints one line and flushes at once, so that a supervisor's log shows it before a crash.
macro_rules! say {
    ($($arg:tt)*) => {{
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "kvstate[{}]: {}", std::process::id(), format_args!($($arg)*));
        let _ = out.flush();
    }};
}

/// FNV-1a, 64 bits: the digest both programs compute over the table.
#[derive(Debug)]
struct Fnv(u64);

impl Fnv {
    fn bytes(&mut self, data: &[u8]) {
        for b in data {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(FNV_PRIME);
        }
    }

    fn u64(&mut self, v: u64) {
        self.bytes(&v.to_le_bytes());
    }
}

fn bucket_of(key: &[u8]) -> usize {
    let mut h = Fnv(FNV_OFFSET);
    h.bytes(key);
    // The remainder is below NBUCKETS, which fits any usize.
    usize::try_from(h.0 % NBUCKETS).unwrap_or(0)
}

/// Why the state cannot be used.
#[derive(Debug)]
enum StateError {
    /// The critical heap refused an allocation.
    Heap(ft::critical::Error),
    /// The recovered structure does not hold together.
    Corrupt(String),
}

impl std::fmt::Display for StateError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StateError::Heap(e) => write!(f, "critical heap: {e}"),
            StateError::Corrupt(why) => write!(f, "corrupt state: {why}"),
        }
    }
}

/// The table in the critical heap, and the heap its blocks come from.
///
/// Invariant: `table` and every pointer reachable from it (bucket array, entries, keys,
/// values) are live blocks of `heap` owned by this structure, and only the main thread
/// touches them. `open` checks what a recovered heap holds before trusting it.
#[derive(Debug)]
struct KvState<'h> {
    heap: &'h CriticalHeap,
    table: NonNull<Table>,
}

impl<'h> KvState<'h> {
    /// An empty table, made the global's target.
    fn create(heap: &'h CriticalHeap) -> Result<KvState<'h>, StateError> {
        let nbuckets = usize::try_from(NBUCKETS).unwrap_or(usize::MAX);
        let bytes = nbuckets * size_of::<*mut Entry>();
        let buckets = heap
            .alloc(bytes, BLOCK_ALIGN)
            .map_err(StateError::Heap)?
            .cast::<*mut Entry>();
        // SAFETY: `buckets` is a fresh block of `bytes` bytes, aligned for pointers; writing
        // NBUCKETS null pointers fills exactly that block.
        unsafe { std::ptr::write_bytes(buckets.as_ptr(), 0, nbuckets) };
        let table = Table {
            magic: TABLE_MAGIC,
            counter: 0,
            count: 0,
            nbuckets: NBUCKETS,
            buckets: buckets.as_ptr(),
        };
        let table = match CriticalBox::new_in(heap, table) {
            Ok(b) => b.into_raw(),
            Err(e) => {
                // SAFETY: `buckets` came from `alloc` above and nothing refers to it.
                let _ = unsafe { heap.free(buckets.cast()) };
                return Err(StateError::Heap(e));
            }
        };
        GLOBAL.table.store(table.as_ptr(), Ordering::Relaxed);
        GLOBAL.magic.store(GLOBAL_MAGIC, Ordering::Relaxed);
        Ok(KvState { heap, table })
    }

    /// The table the recovered global points to, after checking its root.
    fn open(heap: &'h CriticalHeap) -> Result<KvState<'h>, StateError> {
        if GLOBAL.magic.load(Ordering::Relaxed) != GLOBAL_MAGIC {
            return Err(StateError::Corrupt(
                "the recovered global holds no table".into(),
            ));
        }
        let ptr = GLOBAL.table.load(Ordering::Relaxed);
        let table = NonNull::new(ptr)
            .filter(|p| heap.contains(p.as_ptr().cast()) && p.is_aligned())
            .ok_or_else(|| {
                StateError::Corrupt(format!("table pointer {ptr:p} is outside the heap"))
            })?;
        // SAFETY: the pointer is aligned and inside the heap, which is mapped for its whole
        // size; Table is plain integers and a pointer, valid for any bit pattern.
        let t = unsafe { table.as_ptr().read() };
        if t.magic != TABLE_MAGIC || t.nbuckets != NBUCKETS {
            return Err(StateError::Corrupt(format!(
                "table at {ptr:p} has magic {:#x} and {} buckets",
                t.magic, t.nbuckets
            )));
        }
        if !heap.contains(t.buckets.cast()) || !t.buckets.is_aligned() {
            return Err(StateError::Corrupt(format!(
                "bucket array {:p} is outside the heap",
                t.buckets
            )));
        }
        Ok(KvState { heap, table })
    }

    fn table(&self) -> &Table {
        // SAFETY: by the invariant, `table` is a live, initialised Table of this structure.
        unsafe { self.table.as_ref() }
    }

    fn table_mut(&mut self) -> &mut Table {
        // SAFETY: as in `table`; `&mut self` makes the access unique.
        unsafe { self.table.as_mut() }
    }

    fn counter(&self) -> u64 {
        self.table().counter
    }

    /// The head of chain `b` (< NBUCKETS).
    fn head(&self, b: usize) -> *mut *mut Entry {
        // SAFETY: the bucket array holds NBUCKETS pointers and callers pass b < NBUCKETS.
        unsafe { self.table().buckets.add(b) }
    }

    /// Copies `data` into a new heap block.
    fn alloc_bytes(&self, data: &[u8]) -> Result<NonNull<u8>, StateError> {
        let p = self
            .heap
            .alloc(data.len(), BLOCK_ALIGN)
            .map_err(StateError::Heap)?;
        // SAFETY: `p` is a fresh block of at least data.len() bytes, disjoint from `data`.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), p.as_ptr(), data.len()) };
        Ok(p)
    }

    fn free_bytes(&self, p: *mut u8) {
        if let Some(p) = NonNull::new(p) {
            // SAFETY: key and value pointers are blocks of this heap owned by their entry,
            // which no longer refers to them after this call.
            let _ = unsafe { self.heap.free(p) };
        }
    }

    /// Finds `key`: the link that points to its entry (the chain head or a `next` field).
    fn find(&self, key: &[u8]) -> Option<*mut *mut Entry> {
        let mut link = self.head(bucket_of(key));
        // SAFETY: by the invariant every link and entry on the chain is live and initialised,
        // and each key block holds klen bytes.
        unsafe {
            while !(*link).is_null() {
                let e = *link;
                let k = std::slice::from_raw_parts((*e).key, (*e).klen as usize);
                if k == key {
                    return Some(link);
                }
                link = &raw mut (*e).next;
            }
        }
        None
    }

    /// Sets `key` to `value`: replaces the value block of an existing entry, or links a new
    /// entry at the head of its chain. Allocates everything before changing anything.
    fn put(&mut self, key: &[u8], value: &[u8]) -> Result<(), StateError> {
        let vlen =
            u32::try_from(value.len()).map_err(|_| StateError::Corrupt("value too long".into()))?;
        let klen =
            u32::try_from(key.len()).map_err(|_| StateError::Corrupt("key too long".into()))?;
        let v = self.alloc_bytes(value)?;
        if let Some(link) = self.find(key) {
            // SAFETY: `find` returned a link to a live entry of this table.
            let old = unsafe {
                let e = *link;
                let old = (*e).value;
                (*e).value = v.as_ptr();
                (*e).vlen = vlen;
                old
            };
            self.free_bytes(old);
            return Ok(());
        }
        let k = match self.alloc_bytes(key) {
            Ok(k) => k,
            Err(e) => {
                self.free_bytes(v.as_ptr());
                return Err(e);
            }
        };
        let head = self.head(bucket_of(key));
        // SAFETY: `head` is a slot of the bucket array (see `head`).
        let next = unsafe { *head };
        let entry = Entry {
            next,
            key: k.as_ptr(),
            value: v.as_ptr(),
            klen,
            vlen,
        };
        let entry = match CriticalBox::new_in(self.heap, entry) {
            Ok(b) => b.into_raw(),
            Err(e) => {
                self.free_bytes(k.as_ptr());
                self.free_bytes(v.as_ptr());
                return Err(StateError::Heap(e));
            }
        };
        // SAFETY: as above; the new entry now owns its key and value and heads the chain.
        unsafe { *head = entry.as_ptr() };
        self.table_mut().count += 1;
        Ok(())
    }

    /// Unlinks and frees `key`'s entry, if there is one.
    fn delete(&mut self, key: &[u8]) {
        let Some(link) = self.find(key) else { return };
        // SAFETY: `find` returned a link to a live entry; after unlinking, nothing refers to
        // the entry, which came from CriticalBox::into_raw of an Entry in this heap.
        let (k, v) = unsafe {
            let e = *link;
            *link = (*e).next;
            let (k, v) = ((*e).key, (*e).value);
            drop(CriticalBox::from_raw(self.heap, NonNull::new_unchecked(e)));
            (k, v)
        };
        self.free_bytes(k);
        self.free_bytes(v);
        self.table_mut().count -= 1;
    }

    /// Operation number `counter + 1`: a pure function of the counter, identical in C.
    fn step(&mut self) -> Result<(), StateError> {
        let c = self.counter() + 1;
        let key = format!("k{}", c % KEYSPACE);
        let pad = usize::try_from(c % VALUE_PAD_CYCLE).unwrap_or(0);
        let value = format!("v{c}{}", "+".repeat(pad));
        self.put(key.as_bytes(), value.as_bytes())?;
        if c.is_multiple_of(DELETE_EVERY) {
            let victim = format!("k{}", (c * DELETE_STRIDE) % KEYSPACE);
            self.delete(victim.as_bytes());
        }
        self.table_mut().counter = c;
        Ok(())
    }

    /// Walks every chain and digests the counter, the entry count, and each entry's bucket,
    /// key and value in chain order. Checks every pointer it follows, so a broken recovered
    /// structure is reported instead of crashing.
    fn digest(&self) -> Result<u64, StateError> {
        let t = *self.table();
        let mut h = Fnv(FNV_OFFSET);
        h.u64(t.counter);
        h.u64(t.count);
        let mut seen: u64 = 0;
        for b in 0..usize::try_from(NBUCKETS).unwrap_or(0) {
            // SAFETY: b < NBUCKETS.
            let mut e = unsafe { *self.head(b) };
            while !e.is_null() {
                if !self.heap.contains(e.cast()) || !e.is_aligned() {
                    return Err(StateError::Corrupt(format!(
                        "entry pointer {e:p} in bucket {b}"
                    )));
                }
                seen += 1;
                if seen > t.count {
                    return Err(StateError::Corrupt(format!(
                        "more entries than the table's count {}",
                        t.count
                    )));
                }
                // SAFETY: `e` is aligned and inside the mapped heap; Entry is valid for any
                // bit pattern.
                let entry = unsafe { e.read() };
                let key = self.bytes_at(entry.key, entry.klen)?;
                let value = self.bytes_at(entry.value, entry.vlen)?;
                h.u64(b as u64);
                h.u64(u64::from(entry.klen));
                h.bytes(key);
                h.u64(u64::from(entry.vlen));
                h.bytes(value);
                e = entry.next;
            }
        }
        if seen != t.count {
            return Err(StateError::Corrupt(format!(
                "{seen} entries reachable, the table counts {}",
                t.count
            )));
        }
        Ok(h.0)
    }

    fn bytes_at(&self, p: *mut u8, len: u32) -> Result<&[u8], StateError> {
        let len = len as usize;
        let last = (p as usize).wrapping_add(len.saturating_sub(1));
        if p.is_null() || !self.heap.contains(p) || !self.heap.contains(last as *const u8) {
            return Err(StateError::Corrupt(format!(
                "string {p:p}+{len} outside the heap"
            )));
        }
        // SAFETY: the whole range lies inside the mapped heap (checked above) and is only
        // read while `self` is borrowed.
        Ok(unsafe { std::slice::from_raw_parts(p, len) })
    }
}

extern "C" fn on_sigusr1(_: libc::c_int) {
    const MSG: &[u8] = b"kvstate: SIGUSR1, crashing now (abort)\n";
    // SAFETY: write(2) and abort(3) are async-signal-safe; MSG is a valid static buffer of
    // MSG.len() bytes.
    unsafe {
        libc::write(libc::STDOUT_FILENO, MSG.as_ptr().cast(), MSG.len());
        libc::abort();
    }
}

extern "C" fn on_sigusr2(_: libc::c_int) {
    HANG_REQUESTED.store(true, Ordering::SeqCst);
}

fn install_handler(signal: libc::c_int, handler: extern "C" fn(libc::c_int)) {
    // SAFETY: `action` is fully initialised (zeroed, then mask emptied and handler set) before
    // sigaction reads it; the handlers only call async-signal-safe functions or store an atomic.
    // No SA_RESTART: a signal interrupts the nanosleep of the main loop so it reacts at once.
    let rc = unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = handler as libc::sighandler_t;
        libc::sigemptyset(&mut action.sa_mask);
        libc::sigaction(signal, &action, std::ptr::null_mut())
    };
    if rc != 0 {
        say!(
            "cannot install handler for signal {signal}: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Sleeps for `d` or until a signal arrives, whichever comes first.
fn nap(d: Duration) {
    let req = libc::timespec {
        tv_sec: libc::time_t::try_from(d.as_secs()).unwrap_or(libc::time_t::MAX),
        tv_nsec: libc::c_long::from(d.subsec_nanos()),
    };
    // SAFETY: `req` is a valid timespec (tv_nsec < 1e9); a NULL remainder is allowed. EINTR is
    // the point: the caller re-checks its flags.
    unsafe { libc::nanosleep(&req, std::ptr::null_mut()) };
}

fn hang_forever() -> ! {
    say!("hanging now: no more heartbeats");
    loop {
        std::thread::sleep(HANG_NAP);
    }
}

/// Says a failure once per distinct message (watchd may be down for a while).
#[derive(Debug, Default)]
struct Complaint(Option<String>);

impl Complaint {
    fn check<E: std::fmt::Display>(&mut self, call: &str, result: Result<(), E>) {
        match result {
            Ok(()) => {
                if self.0.take().is_some() {
                    say!("{call} works again");
                }
            }
            Err(e) => {
                let text = e.to_string();
                if self.0.as_ref() != Some(&text) {
                    say!("{call} failed: {text}");
                    self.0 = Some(text);
                }
            }
        }
    }
}

fn register() -> Option<Arc<Watch>> {
    match Watch::register_lenient() {
        Ok((watch, Ok(()))) => {
            say!(
                "registered with watchd at {}",
                watch.socket_path().display()
            );
            Some(Arc::new(watch))
        }
        Ok((watch, Err(e))) => {
            say!("ft_reg_watch failed: {e} (will retry with the next heartbeat)");
            Some(Arc::new(watch))
        }
        Err(Error::NoSocket) => {
            say!("warning: FT_SOCKET is not set, running without watchd");
            None
        }
        Err(e) => {
            say!("ft_reg_watch failed: {e}; running without watchd");
            None
        }
    }
}

/// Registers the global and recovers: the recovered table, or a fresh one.
fn recover(ckpt: &'static Checkpointer) -> Result<KvState<'static>, String> {
    let global = std::ptr::from_ref(&GLOBAL).cast_mut().cast::<u8>();
    // SAFETY: GLOBAL is a static, valid for the whole process; its fields are atomics, so
    // libft writing its bytes during recovery does not alias a Rust `&mut`.
    unsafe { ckpt.register(global, size_of::<Global>()) }
        .map_err(|e| format!("ft_critical failed: {e}"))?;
    // SAFETY: nothing refers into the heap or GLOBAL yet, and no other thread exists that
    // could touch them.
    let recovered = unsafe { ckpt.recover(STREAM) };
    let report = ckpt
        .last_report()
        .map_or_else(|| "no recovery attempted".to_owned(), |r| r.to_string());
    let heap = ckpt.heap();
    let state = match recovered {
        Ok(Some(r)) => {
            let state = KvState::open(heap).map_err(|e| e.to_string())?;
            let digest = state.digest().map_err(|e| e.to_string())?;
            say!(
                "recovered seq {} counter {} digest {digest:016x}",
                r.seq,
                state.counter()
            );
            state
        }
        Ok(None) => {
            say!("fresh start");
            KvState::create(heap).map_err(|e| e.to_string())?
        }
        Err(e) => {
            say!("recovery report: {report}");
            return Err(format!("t_recover failed: {e}"));
        }
    };
    say!("recovery report: {report}");
    Ok(state)
}

/// Takes a synchronous checkpoint and journals it.
fn sync_checkpoint(
    ckpt: &Checkpointer,
    state: &KvState<'_>,
    journal: &mut Option<File>,
    watch: Option<&Watch>,
) -> Result<(), String> {
    let info = ckpt.checkpoint_sync(STREAM).map_err(|e| e.to_string())?;
    let digest = state.digest().map_err(|e| e.to_string())?;
    let line = format!(
        "checkpoint seq {} counter {} digest {digest:016x}",
        info.seq,
        state.counter()
    );
    if let Some(file) = journal {
        // One write per line, so a killed program leaves whole lines.
        file.write_all(format!("{line}\n").as_bytes())
            .map_err(|e| format!("cannot append to the journal: {e}"))?;
    }
    say!("{line}");
    if let Some(w) = watch {
        let _ = w.status(&format!(
            "counter {}, checkpoint #{}",
            state.counter(),
            info.seq
        ));
    }
    Ok(())
}

fn main() -> ExitCode {
    let opts = match parse_options(std::env::args().skip(1)) {
        Ok(o) => o,
        Err(msg) => {
            if !msg.is_empty() {
                eprintln!("kvstate: {msg}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    install_handler(libc::SIGUSR1, on_sigusr1);
    install_handler(libc::SIGUSR2, on_sigusr2);
    let mut journal = match &opts.journal {
        None => None,
        Some(path) => match File::options().append(true).create(true).open(path) {
            Ok(f) => Some(f),
            Err(e) => {
                say!("cannot open the journal {path}: {e}");
                return ExitCode::from(2);
            }
        },
    };

    let watch = register();
    let ckpt = match ft::critical::global() {
        Ok(c) => c,
        Err(e) => {
            say!("critical memory unavailable: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(w) = &watch {
        // What libft's C API does for ft_reg_watch'ed programs: report every committed
        // image, so that `ftctl status` shows it. Best effort, like every message to watchd.
        let w = Arc::clone(w);
        ckpt.set_commit_hook(Some(Box::new(move |stream, info, pause| {
            let _ = w.checkpointed(stream, info.seq, info.file_bytes, pause);
        })));
    }
    let mut state = match recover(ckpt) {
        Ok(s) => s,
        Err(e) => {
            say!("{e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(w) = &watch {
        if let Err(e) = w.ready() {
            say!("ft_ready failed: {e}");
        }
        let _ = w.status(&format!("counter {}", state.counter()));
    }
    say!(
        "ready: one operation every {} ms, synchronous checkpoint every {} operations",
        opts.interval.as_millis(),
        opts.sync_every
    );

    let mut hbeat = Complaint::default();
    let mut safe_point = Complaint::default();
    let mut requested = Complaint::default();
    let mut synced = Complaint::default();
    let mut next_poll = Instant::now();
    loop {
        if HANG_REQUESTED.load(Ordering::SeqCst) {
            hang_forever();
        }
        if let Err(e) = state.step() {
            say!("operation {} failed: {e}", state.counter() + 1);
            return ExitCode::FAILURE;
        }
        if let Some(w) = &watch {
            hbeat.check("ft_hbeat", w.heartbeat(TID, opts.timeout));
        }
        safe_point.check("t_safe_point", ckpt.safe_point().map(|_| ()));
        if let Some(w) = watch.as_deref()
            && Instant::now() >= next_poll
        {
            next_poll = Instant::now() + REQUEST_POLL_INTERVAL;
            while let Ok(Some(WatchdMessage::CheckpointNow { stream })) = w.poll_command() {
                requested.check("requested checkpoint", ckpt.checkpoint(stream).map(|_| ()));
            }
        }
        if opts.sync_every > 0 && state.counter().is_multiple_of(opts.sync_every) {
            let result = sync_checkpoint(ckpt, &state, &mut journal, watch.as_deref());
            synced.check("checkpoint", result);
        }
        nap(opts.interval);
    }
}
