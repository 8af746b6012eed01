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
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ft::Watch;
use ft::critical::{Checkpointer, CriticalHeap};
use ft::proto::WatchdMessage;
use ftkit_examples::service::{Complaint, register};
use ftkit_examples::table::{HashTable, Table, TableError};

/// The name on every output line.
const PROGRAM: &str = "kvstate";
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

/// Keys are `k0` .. `k<KEYSPACE-1>`, which bounds the table however long the program runs.
const KEYSPACE: u64 = 500;
/// Every DELETE_EVERY-th operation also deletes a key.
const DELETE_EVERY: u64 = 3;
/// The deleted key is `k<(counter * DELETE_STRIDE) % KEYSPACE>`.
const DELETE_STRIDE: u64 = 7;
/// Values are `v<counter>` followed by `counter % VALUE_PAD_CYCLE` `+` characters, so their
/// blocks vary in size and replacing one frees and allocates.
const VALUE_PAD_CYCLE: u64 = 16;
/// Marks an initialised global.
const GLOBAL_MAGIC: u64 = u64::from_le_bytes(*b"KVGLOBL1");

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
    ($($arg:tt)*) => {
        ftkit_examples::service::say(PROGRAM, format_args!($($arg)*))
    };
}

/// Operation number `counter + 1`: a pure function of the counter, identical in C.
fn step(state: &mut HashTable<'_>) -> Result<(), TableError> {
    let c = state.counter() + 1;
    let key = format!("k{}", c % KEYSPACE);
    let pad = usize::try_from(c % VALUE_PAD_CYCLE).unwrap_or(0);
    let value = format!("v{c}{}", "+".repeat(pad));
    state.put(key.as_bytes(), value.as_bytes())?;
    if c.is_multiple_of(DELETE_EVERY) {
        let victim = format!("k{}", (c * DELETE_STRIDE) % KEYSPACE);
        state.delete(victim.as_bytes());
    }
    state.set_counter(c);
    Ok(())
}

/// The table the recovered global points to.
fn open(heap: &CriticalHeap) -> Result<HashTable<'_>, TableError> {
    if GLOBAL.magic.load(Ordering::Relaxed) != GLOBAL_MAGIC {
        return Err(TableError::Corrupt(
            "the recovered global holds no table".into(),
        ));
    }
    HashTable::open(heap, GLOBAL.table.load(Ordering::Relaxed))
}

/// An empty table, made the global's target.
fn create(heap: &CriticalHeap) -> Result<HashTable<'_>, TableError> {
    let table = HashTable::create(heap)?;
    GLOBAL.table.store(table.as_ptr(), Ordering::Relaxed);
    GLOBAL.magic.store(GLOBAL_MAGIC, Ordering::Relaxed);
    Ok(table)
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

/// Registers the global and recovers: the recovered table, or a fresh one.
fn recover(ckpt: &'static Checkpointer) -> Result<HashTable<'static>, String> {
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
            let state = open(heap).map_err(|e| e.to_string())?;
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
            create(heap).map_err(|e| e.to_string())?
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
    state: &HashTable<'_>,
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

    let watch = register(PROGRAM);
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

    let mut hbeat = Complaint::new(PROGRAM);
    let mut safe_point = Complaint::new(PROGRAM);
    let mut requested = Complaint::new(PROGRAM);
    let mut synced = Complaint::new(PROGRAM);
    let mut next_poll = Instant::now();
    loop {
        if HANG_REQUESTED.load(Ordering::SeqCst) {
            hang_forever();
        }
        if let Err(e) = step(&mut state) {
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
