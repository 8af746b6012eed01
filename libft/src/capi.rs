//! The C ABI of libft (`libft.so`, `libft.a`, `include/ft.h`), named after NT-SwiFT.
//!
//! Owns the process-wide [`Watch`] behind `ft_reg_watch`, and exposes the process-wide
//! critical memory ([`crate::critical::global`]) as `t_ftmalloc`, `ft_critical`,
//! `t_checkpoint`, `t_recover` and friends, and warm standby (`ft_role`, `ft_standby_wait`,
//! `ft_standby_apply`, `ft_promoted`). Every exported function runs inside a panic
//! boundary, NULL-checks its pointers and returns an `FT_E*` code: nothing here may unwind into
//! C, abort the process, block or allocate on the heartbeat path.

use std::collections::BTreeMap;
use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, Once, OnceLock, PoisonError, RwLock};
use std::time::{Duration, Instant};

use crate::critical::{self, CheckpointConfig, Checkpointer};
use crate::proto::WatchdMessage;
use crate::standby::{self, Follower, Role};
use crate::watch::{Error, Watch};

/// Success.
pub const FT_OK: c_int = 0;
/// FT_SOCKET is not set: the process does not run under watchd.
pub const FT_ENOSOCKET: c_int = -1;
/// watchd cannot be reached, even after one reconnect.
pub const FT_EUNREACHABLE: c_int = -2;
/// watchd's queue is full; the message was dropped.
pub const FT_EAGAIN: c_int = -3;
/// ft_reg_watch has not succeeded yet (or ft_del_watch was called).
pub const FT_ENOTREG: c_int = -4;
/// An argument is invalid (NULL pointer, text not UTF-8).
pub const FT_EINVAL: c_int = -5;
/// libft hit an internal bug; the call had no effect on the application.
pub const FT_EPANIC: c_int = -6;
/// Another I/O error on the socket to watchd.
pub const FT_EIO: c_int = -7;
// Codes from -16 on belong to critical memory and checkpoints.
/// The critical heap is exhausted, or cannot be mapped.
pub const FT_ENOMEM: c_int = -16;
/// The critical heap's fixed address range is occupied by another mapping.
pub const FT_EADDRINUSE: c_int = -17;
/// The disk holding the checkpoint store is full; the previous checkpoint is intact.
pub const FT_ENOSPC: c_int = -18;
/// Critical heap metadata or a checkpoint image is corrupt.
pub const FT_ECORRUPT: c_int = -19;
/// The checkpoint was taken by a process laid out differently (heap address or size,
/// ft_critical registrations).
pub const FT_EMISMATCH: c_int = -20;
/// The operation conflicts with one in progress (or the heap is initialised already).
pub const FT_EBUSY: c_int = -21;
/// Another checkpoint error: store I/O, the snapshot process, dirty tracking.
pub const FT_ECKPT: c_int = -22;
/// FT_HEAP_ADDR, FT_HEAP_SIZE, FT_CKPT_* or FT_DIRTY is invalid.
pub const FT_ECONFIG: c_int = -23;
/// The process is a warm standby (FT_ROLE=standby): it writes no checkpoints until promoted.
pub const FT_ESTANDBY: c_int = -24;
/// The process was not started as a standby (FT_ROLE): there is nothing to follow.
pub const FT_ENOTSTANDBY: c_int = -25;
/// The process was promoted and has written checkpoints of its own: it follows no more.
pub const FT_EPROMOTED: c_int = -26;
/// ft_role(): the process serves and writes checkpoints.
pub const FT_ROLE_PRIMARY: c_int = 0;
/// ft_role(): the process is a warm standby that follows shipped checkpoints.
pub const FT_ROLE_STANDBY: c_int = 1;

/// Alignment of `t_ftmalloc` blocks, that of `malloc` (max_align_t) on x86_64 and aarch64.
const MALLOC_ALIGN: usize = 16;
/// How often t_safe_point looks for watchd's requests (`ftctl checkpoint`): often enough for a
/// person, rare enough that the common safe point stays a clock read and a compare.
const REQUEST_POLL_INTERVAL: Duration = Duration::from_millis(100);

/// The process-wide registration. A read lock on the heartbeat path is uncontended in
/// practice (writers are only ft_reg_watch and ft_del_watch) and allocates nothing.
static WATCH: RwLock<Option<Watch>> = RwLock::new(None);

fn code_of(result: Result<(), Error>) -> c_int {
    match result {
        Ok(()) => FT_OK,
        Err(Error::NoSocket) => FT_ENOSOCKET,
        Err(Error::Unreachable(_)) => FT_EUNREACHABLE,
        Err(Error::WouldBlock) => FT_EAGAIN,
        Err(Error::InvalidArgument(_)) => FT_EINVAL,
        Err(Error::Io(_)) => FT_EIO,
    }
}

/// Runs `body` behind the panic boundary that every exported function needs.
fn boundary(body: impl FnOnce() -> c_int) -> c_int {
    boundary_or(FT_EPANIC, body)
}

/// Like [`boundary`], returning `on_panic` when `body` panics.
fn boundary_or<T>(on_panic: T, body: impl FnOnce() -> T) -> T {
    catch_unwind(AssertUnwindSafe(body)).unwrap_or(on_panic)
}

/// Runs `call` on the registered Watch, or returns FT_ENOTREG.
fn with_watch(call: impl FnOnce(&Watch) -> Result<(), Error>) -> c_int {
    boundary(|| {
        let guard = WATCH.read().unwrap_or_else(PoisonError::into_inner);
        match guard.as_ref() {
            Some(watch) => code_of(call(watch)),
            None => FT_ENOTREG,
        }
    })
}

/// Registers the process with the watchd named by the FT_SOCKET environment variable.
///
/// Returns FT_OK when watchd received the registration. FT_ENOSOCKET (FT_SOCKET unset) and
/// FT_EIO from creating the socket register nothing. Any other error (FT_EUNREACHABLE while
/// watchd restarts, FT_EAGAIN) is the fate of the first message only: the registration is
/// kept, and later calls reconnect and register first, so a program may carry on. Calling it
/// again replaces the registration with a fresh one.
#[unsafe(no_mangle)]
pub extern "C" fn ft_reg_watch() -> c_int {
    boundary(|| match Watch::register_lenient() {
        Ok((watch, first)) => {
            *WATCH.write().unwrap_or_else(PoisonError::into_inner) = Some(watch);
            code_of(first)
        }
        Err(e) => code_of(Err(e)),
    })
}

/// FtHbeat: thread `tid` entered (or renews) a monitored region and promises its next
/// heartbeat, or ft_hbeat_end, within `timeout_ms` milliseconds. One non-blocking send.
#[unsafe(no_mangle)]
pub extern "C" fn ft_hbeat(tid: u32, timeout_ms: u32) -> c_int {
    with_watch(|w| w.heartbeat(tid, Duration::from_millis(u64::from(timeout_ms))))
}

/// Thread `tid` left its monitored region: watchd stops expecting its heartbeats.
#[unsafe(no_mangle)]
pub extern "C" fn ft_hbeat_end(tid: u32) -> c_int {
    with_watch(|w| w.heartbeat_end(tid))
}

/// The service finished starting up.
#[unsafe(no_mangle)]
pub extern "C" fn ft_ready() -> c_int {
    with_watch(Watch::ready)
}

/// Sets the status line shown by `ftctl status`. `text` is a NUL-terminated UTF-8 string,
/// cut to fit one datagram (about 1 KiB). NULL or invalid UTF-8 gives FT_EINVAL.
///
/// # Safety
/// `text` must be NULL or point to a NUL-terminated string valid for the duration of the call.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ft_status(text: *const c_char) -> c_int {
    boundary(|| {
        if text.is_null() {
            return FT_EINVAL;
        }
        // SAFETY: `text` is non-NULL and, by this function's contract, points to a
        // NUL-terminated string that stays valid and unmodified while the call runs.
        let Ok(text) = unsafe { CStr::from_ptr(text) }.to_str() else {
            return FT_EINVAL;
        };
        with_watch(|w| w.status(text))
    })
}

/// Unregisters: sends Unregister to watchd and forgets the registration. Later calls return
/// FT_ENOTREG until ft_reg_watch is called again. The registration is forgotten even when the
/// message cannot be delivered.
#[unsafe(no_mangle)]
pub extern "C" fn ft_del_watch() -> c_int {
    boundary(|| {
        let taken = WATCH.write().unwrap_or_else(PoisonError::into_inner).take();
        match taken {
            Some(watch) => code_of(watch.unregister()),
            None => FT_ENOTREG,
        }
    })
}

fn critical_code(e: &critical::Error) -> c_int {
    use critical::Error as E;
    if e.is_storage_full() {
        return FT_ENOSPC;
    }
    match e {
        E::AddressInUse { .. } => FT_EADDRINUSE,
        E::Map { .. } | E::OutOfMemory { .. } => FT_ENOMEM,
        E::Config(_) => FT_ECONFIG,
        E::InvalidPointer(_) | E::InvalidArgument(_) | E::Value { .. } => FT_EINVAL,
        E::Corrupt(_) => FT_ECORRUPT,
        E::Mismatch(_) => FT_EMISMATCH,
        E::Busy(_) => FT_EBUSY,
        E::Standby => FT_ESTANDBY,
        E::Store(_) | E::Image(_) | E::Snapshot(_) | E::Tracking(_) | E::Writer(_) => FT_ECKPT,
    }
}

/// The process-wide critical memory, created from the environment on first use; its committed
/// images are reported to watchd (when registered with ft_reg_watch) for `ftctl status`.
fn critical_global() -> Result<&'static Checkpointer, &'static critical::Error> {
    static HOOKED: Once = Once::new();
    let c = critical::global()?;
    HOOKED.call_once(|| {
        c.set_commit_hook(Some(Box::new(|stream, info, pause| {
            let guard = WATCH.read().unwrap_or_else(PoisonError::into_inner);
            if let Some(watch) = guard.as_ref() {
                // Best effort, like every message to watchd: a lost report harms nothing.
                let _ = watch.checkpointed(stream, info.seq, info.file_bytes, pause);
            }
        })));
    });
    Ok(c)
}

/// Checkpoint streams watchd asked for and t_safe_point has not taken yet.
static REQUESTED: Mutex<Vec<u32>> = Mutex::new(Vec::new());

/// Reads every message watchd sent: checkpoint requests are queued for t_safe_point, a
/// promotion is recorded by the Watch itself (`ft::standby`). Never blocks.
fn poll_watchd() {
    let guard = WATCH.read().unwrap_or_else(PoisonError::into_inner);
    let Some(watch) = guard.as_ref() else {
        return;
    };
    while let Ok(Some(message)) = watch.poll_command() {
        match message {
            WatchdMessage::CheckpointNow { stream } => REQUESTED
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(stream),
            WatchdMessage::Promote { .. } => {}
        }
    }
}

/// Takes the checkpoints watchd asked for (`ftctl checkpoint`), looking at most every
/// REQUEST_POLL_INTERVAL.
fn serve_watchd_requests(c: &Checkpointer) -> Result<(), critical::Error> {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    static NEXT_POLL_NS: AtomicU64 = AtomicU64::new(0);
    let now =
        u64::try_from(EPOCH.get_or_init(Instant::now).elapsed().as_nanos()).unwrap_or(u64::MAX);
    if now < NEXT_POLL_NS.load(Ordering::Relaxed) {
        return Ok(());
    }
    let interval = u64::try_from(REQUEST_POLL_INTERVAL.as_nanos()).unwrap_or(u64::MAX);
    NEXT_POLL_NS.store(now.saturating_add(interval), Ordering::Relaxed);
    poll_watchd();
    let mut streams =
        std::mem::take(&mut *REQUESTED.lock().unwrap_or_else(PoisonError::into_inner));
    streams.sort_unstable();
    streams.dedup();
    for stream in streams {
        c.checkpoint(stream)?;
    }
    Ok(())
}

/// Runs `call` on the process-wide critical memory (created from the environment on first
/// use) and maps the result to an FT_* code.
fn with_critical(call: impl FnOnce(&Checkpointer) -> Result<(), critical::Error>) -> c_int {
    boundary(|| match critical_global() {
        Ok(c) => call(c).map_or_else(|e| critical_code(&e), |()| FT_OK),
        Err(e) => critical_code(e),
    })
}

/// Initialises critical memory with an explicit heap address and size, before any other
/// critical-memory call (which would initialise it from FT_HEAP_ADDR / FT_HEAP_SIZE or their
/// defaults). `addr` 0 or `size` 0 keeps that value from the environment or default.
/// FT_EBUSY once critical memory exists; FT_EADDRINUSE when the range is occupied.
#[unsafe(no_mangle)]
pub extern "C" fn t_ftheap_init(addr: u64, size: u64) -> c_int {
    boundary(|| {
        let mut config = match CheckpointConfig::from_env() {
            Ok(c) => c,
            Err(e) => return critical_code(&e),
        };
        if addr != 0 {
            let Ok(addr) = usize::try_from(addr) else {
                return FT_EINVAL;
            };
            config.heap.addr = addr;
        }
        if size != 0 {
            let Ok(size) = usize::try_from(size) else {
                return FT_EINVAL;
            };
            config.heap.size = size;
        }
        match critical::init_global(config) {
            Ok(_) => FT_OK,
            Err(e) => critical_code(&e),
        }
    })
}

/// Allocates `size` bytes (16-byte aligned, not zeroed) in the critical heap, which lives at
/// the same fixed address in every run, so pointers stored in critical memory stay valid after
/// t_recover. Returns NULL (errno ENOMEM) when the heap is exhausted or unavailable. Thread-safe.
#[unsafe(no_mangle)]
pub extern "C" fn t_ftmalloc(size: usize) -> *mut c_void {
    boundary_or(std::ptr::null_mut(), || {
        let allocated = critical_global()
            .map_err(|_| ())
            .and_then(|c| c.heap().alloc(size, MALLOC_ALIGN).map_err(|_| ()));
        match allocated {
            Ok(p) => p.as_ptr().cast(),
            Err(()) => {
                set_errno(libc::ENOMEM);
                std::ptr::null_mut()
            }
        }
    })
}

/// Frees a block from t_ftmalloc. NULL is ignored; a pointer that is not a live block of the
/// critical heap is ignored too (with one warning on stderr), never a crash.
///
/// # Safety
/// `ptr` must be NULL or come from t_ftmalloc, and must not be used afterwards.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn t_ftfree(ptr: *mut c_void) {
    static WARNED: AtomicBool = AtomicBool::new(false);
    let _ = catch_unwind(AssertUnwindSafe(|| {
        let Some(ptr) = std::ptr::NonNull::new(ptr.cast::<u8>()) else {
            return;
        };
        let Ok(c) = critical_global() else {
            return;
        };
        // SAFETY: by this function's contract `ptr` came from t_ftmalloc (the same heap) and
        // is not used afterwards; `free` refuses what its block header shows is not a block.
        if let Err(e) = unsafe { c.heap().free(ptr) }
            && !WARNED.swap(true, Ordering::Relaxed)
        {
            eprintln!("libft: t_ftfree ignored: {e}");
        }
    }));
}

/// Registers `len` bytes at `ptr` (a global or static variable) as critical memory: saved by
/// every checkpoint, restored by t_recover. Registration order gives region ids (1, 2, ...);
/// a program must register the same regions, in the same order and with the same sizes,
/// before calling t_recover. The region may move between runs (ASLR): its contents are
/// restored where it is now, so store pointers into the critical heap, not into regions.
/// FT_EINVAL for NULL, zero length, overlaps, or memory that is not mapped read-write.
///
/// # Safety
/// The memory must stay valid for the rest of the process's life.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ft_critical(ptr: *mut c_void, len: usize) -> c_int {
    if ptr.is_null() || len == 0 {
        return FT_EINVAL;
    }
    // SAFETY: the caller promises the memory stays valid for the life of the process, which
    // is the life of the process-wide Checkpointer.
    with_critical(|c| unsafe { c.register(ptr.cast(), len) }.map(|_| ()))
}

/// Takes a checkpoint of critical memory on stream `id` (0 = default; images go to
/// `$FT_CKPT_DIR/<id>`, default `./ft-ckpt/<id>`). The caller is paused only while the changed
/// pages are captured; the image is written and made durable in the background. Waits first
/// for the stream's previous image; if that one failed (e.g. FT_ENOSPC), returns its error
/// and takes no new checkpoint (its pages are kept for the next one: call again). No other
/// thread may be writing critical memory during the call.
#[unsafe(no_mangle)]
pub extern "C" fn t_checkpoint(id: u32) -> c_int {
    with_critical(|c| c.checkpoint(id).map(|_| ()))
}

/// Like t_checkpoint, but returns only when the image is committed (durable), with its own
/// result. An earlier asynchronous failure is superseded (its pages are in this image).
#[unsafe(no_mangle)]
pub extern "C" fn t_checkpoint_sync(id: u32) -> c_int {
    with_critical(|c| c.checkpoint_sync(id).map(|_| ()))
}

/// Waits until stream `id` has no image being written; returns the failure of the last one
/// (reported once), else FT_OK. Call it before exiting to make the last t_checkpoint durable.
#[unsafe(no_mangle)]
pub extern "C" fn t_checkpoint_wait(id: u32) -> c_int {
    with_critical(|c| c.wait(id).map(|_| ()))
}

/// The text behind t_recover_report, replaced by each t_recover.
static RECOVER_REPORT: Mutex<Option<CString>> = Mutex::new(None);

/// Restores critical memory from the newest good checkpoint of stream `id`: call it at
/// start-up, after ft_critical has registered the program's globals and before anything reads
/// critical memory. Returns the restored checkpoint's sequence number (> 0), 0 when there is
/// no checkpoint (memory untouched), or a negative FT_E* code. A corrupt newest image is
/// skipped for the previous good one; t_recover_report() says what happened.
///
/// # Safety
/// No other thread may access critical memory (heap or registered regions) during the call:
/// their contents are replaced.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn t_recover(id: u32) -> i64 {
    boundary_or(i64::from(FT_EPANIC), || {
        let (code, text) = match critical_global() {
            // SAFETY: the caller guarantees nobody accesses critical memory meanwhile.
            Ok(c) => match unsafe { c.recover(id) } {
                Ok(restored) => (
                    restored.map_or(0, |r| i64::try_from(r.seq).unwrap_or(i64::MAX)),
                    c.last_report().map(|r| r.to_string()),
                ),
                Err(e) => (
                    i64::from(critical_code(&e)),
                    c.last_report().map(|r| r.to_string()),
                ),
            },
            Err(e) => (
                i64::from(critical_code(e)),
                Some(format!("critical memory unavailable: {e}")),
            ),
        };
        let text = text.unwrap_or_default().replace('\0', " ");
        *RECOVER_REPORT
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = CString::new(text).ok();
        code
    })
}

/// A description of the last t_recover (or ft_standby_apply): what was restored from where,
/// which newer images were skipped and why, or why it failed. Never NULL; valid until the next
/// t_recover or ft_standby_apply.
#[unsafe(no_mangle)]
pub extern "C" fn t_recover_report() -> *const c_char {
    boundary_or(c"internal error in libft".as_ptr(), || {
        let report = RECOVER_REPORT
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // The CString's heap buffer stays put until the next t_recover replaces it.
        report
            .as_ref()
            .map_or(c"no recovery attempted".as_ptr(), |t| t.as_ptr())
    })
}

/// Takes an automatic checkpoint of stream `id` every `ms` milliseconds (0 stops), at the
/// first t_safe_point() after each period. FT_CKPT_EVERY (e.g. `500ms`, set by watchd from the
/// service's `checkpoint.every`) does the same for stream 0 without this call.
#[unsafe(no_mangle)]
pub extern "C" fn t_checkpoint_every(id: u32, ms: u32) -> c_int {
    with_critical(|c| {
        c.set_every(id, Some(Duration::from_millis(u64::from(ms))));
        Ok(())
    })
}

/// Marks a point of the main loop where critical memory is consistent: takes the automatic
/// checkpoints that are due, and those watchd asked for (`ftctl checkpoint`, looked for every
/// 100 ms when registered with ft_reg_watch). Cheap when none is due (a clock read and a
/// compare). Returns FT_OK, or the error of a checkpoint it started (or of the stream's
/// previous image).
#[unsafe(no_mangle)]
pub extern "C" fn t_safe_point() -> c_int {
    with_critical(|c| {
        serve_watchd_requests(c)?;
        c.safe_point().map(|_| ())
    })
}

/// The process's role: FT_ROLE_STANDBY while it is a warm standby (started with
/// FT_ROLE=standby and not promoted yet), else FT_ROLE_PRIMARY.
#[unsafe(no_mangle)]
pub extern "C" fn ft_role() -> c_int {
    boundary_or(FT_ROLE_PRIMARY, || match crate::standby::role() {
        Role::Primary => FT_ROLE_PRIMARY,
        Role::Standby => FT_ROLE_STANDBY,
    })
}

/// Non-zero once watchd promoted this process (a standby made primary in place, e.g. on
/// failover): then ft_role() is FT_ROLE_PRIMARY and checkpoints may be written; they continue
/// the sequence of the checkpoints applied. Looks for watchd's messages itself (when registered
/// with ft_reg_watch); never blocks.
#[unsafe(no_mangle)]
pub extern "C" fn ft_promoted() -> c_int {
    boundary_or(0, || {
        poll_watchd();
        c_int::from(crate::standby::promoted().is_some())
    })
}

/// The followers of ft_standby_wait / ft_standby_apply, one per stream.
static FOLLOWERS: Mutex<BTreeMap<u32, Follower<'static>>> = Mutex::new(BTreeMap::new());

fn standby_code(e: &standby::Error) -> c_int {
    match e {
        standby::Error::BadRole(_) | standby::Error::NotStandby => FT_ENOTSTANDBY,
        standby::Error::Promoted => FT_EPROMOTED,
        standby::Error::Dir { .. } => FT_ECKPT,
        standby::Error::Critical(e) => critical_code(e),
    }
}

/// Runs `call` on the follower of stream `id`, made on first use.
fn with_follower<T>(
    id: u32,
    call: impl FnOnce(&mut Follower<'static>) -> Result<T, standby::Error>,
) -> Result<T, c_int> {
    let c = critical_global().map_err(critical_code)?;
    let mut followers = FOLLOWERS.lock().unwrap_or_else(PoisonError::into_inner);
    let follower = match followers.entry(id) {
        std::collections::btree_map::Entry::Occupied(o) => o.into_mut(),
        std::collections::btree_map::Entry::Vacant(v) => {
            v.insert(Follower::new(c, id).map_err(|e| standby_code(&e))?)
        }
    };
    call(follower).map_err(|e| standby_code(&e))
}

/// Warm standby: waits up to `timeout_ms` milliseconds until checkpoints of stream `id` newer
/// than the one applied arrive in its store directory ($FT_CKPT_DIR/<id>, where watchd ships
/// the owner's images). Returns 1 when there are (call ft_standby_apply), 0 on timeout, or a
/// negative FT_E* code (FT_ENOTSTANDBY when FT_ROLE is not standby). Keep the timeout short
/// (about 100 ms) and check ft_promoted() between waits.
#[unsafe(no_mangle)]
pub extern "C" fn ft_standby_wait(id: u32, timeout_ms: u32) -> c_int {
    boundary(|| {
        let timeout = Duration::from_millis(u64::from(timeout_ms));
        match with_follower(id, |f| f.wait_for_change(timeout)) {
            Ok(changed) => c_int::from(changed),
            Err(code) => code,
        }
    })
}

/// Warm standby: applies the newest good checkpoint of stream `id` that arrived since the last
/// call into critical memory (heap and ft_critical regions), in place, as t_recover does
/// (incremental chains resolved; images that do not verify skipped, t_recover_report says
/// which). Returns its sequence number (> 0), 0 when nothing new was applied, or a negative
/// FT_E* code. The checkpoint t_recover restored at start-up counts as applied. After a
/// promotion call it once more, before changing critical memory, to take the last image
/// shipped; once the process writes checkpoints of its own it returns FT_EPROMOTED.
///
/// # Safety
/// No other thread may access critical memory during the call: its contents are replaced.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ft_standby_apply(id: u32) -> i64 {
    boundary_or(i64::from(FT_EPANIC), || {
        // SAFETY: the caller guarantees nobody accesses critical memory meanwhile.
        let applied = with_follower(id, |f| unsafe { f.apply_newest() });
        if let Ok(c) = critical_global()
            && let Some(report) = c.last_report()
        {
            let text = report.to_string().replace('\0', " ");
            *RECOVER_REPORT
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = CString::new(text).ok();
        }
        match applied {
            Ok(seq) => seq.map_or(0, |s| i64::try_from(s).unwrap_or(i64::MAX)),
            Err(code) => i64::from(code),
        }
    })
}

fn set_errno(code: c_int) {
    // SAFETY: __errno_location returns the calling thread's errno slot, valid to write.
    unsafe { *libc::__errno_location() = code };
}

/// A static, human-readable description of an FT_* code; never NULL, never to be freed.
#[unsafe(no_mangle)]
pub extern "C" fn ft_strerror(code: c_int) -> *const c_char {
    boundary_or(c"internal error in libft".as_ptr(), || {
        strerror(code).as_ptr()
    })
}

fn strerror(code: c_int) -> &'static CStr {
    match code {
        FT_OK => c"success",
        FT_ENOSOCKET => c"FT_SOCKET is not set: not running under watchd",
        FT_EUNREACHABLE => c"watchd is unreachable",
        FT_EAGAIN => c"watchd's queue is full, message dropped",
        FT_ENOTREG => c"not registered: call ft_reg_watch first",
        FT_EINVAL => c"invalid argument",
        FT_EPANIC => c"internal error in libft",
        FT_EIO => c"I/O error talking to watchd",
        FT_ENOMEM => c"critical heap exhausted or cannot be mapped",
        FT_EADDRINUSE => c"the critical heap's fixed address range is in use",
        FT_ENOSPC => c"no space left for the checkpoint (previous checkpoint intact)",
        FT_ECORRUPT => c"critical heap or checkpoint image corrupt",
        FT_EMISMATCH => c"checkpoint does not match this process's heap or ft_critical regions",
        FT_EBUSY => c"busy: another checkpoint operation is in progress",
        FT_ECKPT => c"checkpoint error (store, snapshot or dirty tracking)",
        FT_ECONFIG => c"invalid critical-memory configuration (FT_HEAP_*, FT_CKPT_*, FT_DIRTY)",
        FT_ESTANDBY => c"this process is a standby: no checkpoints until it is promoted",
        FT_ENOTSTANDBY => c"not a standby (FT_ROLE is not standby): nothing to follow",
        FT_EPROMOTED => c"promoted and writing its own checkpoints: following has ended",
        FT_EBADHANDLE => c"not an open ft_create_file handle",
        FT_EFILE => c"file operation failed (see errno)",
        FT_EREPL => c"done locally, but not logged for replication (ring full or unusable)",
        FT_ETIMEDOUT => {
            c"done locally and logged, but the backups did not confirm durability in time"
        }
        _ => c"unknown libft error code",
    }
}

// Replicated files: ft_create_file and friends. Codes from -32 on belong to them.

/// Not a handle returned by ft_create_file, or closed already.
pub const FT_EBADHANDLE: c_int = -32;
/// The file operation itself failed; errno says why.
pub const FT_EFILE: c_int = -33;
/// The operation was done locally but could not be logged for replication (the fileset's ring
/// stayed full or is unusable); errno is EIO, or ENOSPC for a full ring.
pub const FT_EREPL: c_int = -34;
/// Sync-mode fileset: the operation was done locally and logged, but the backups did not
/// confirm it durable within FT_REPL_SYNC_TIMEOUT (default 10 s); errno is ETIMEDOUT. It
/// stays queued and will be replicated.
pub const FT_ETIMEDOUT: c_int = -35;

/// One open replicated file; the Mutex serialises calls on the same handle (they share its
/// offset), calls on different handles run in parallel.
type FileHandle = std::sync::Arc<Mutex<crate::fs::File>>;

/// Open handles, indexed by handle number; closed slots are reused, like descriptors.
static FILES: RwLock<Vec<Option<FileHandle>>> = RwLock::new(Vec::new());

/// Maps an error of `ft::fs` to an FT_* code and sets errno.
fn file_code(e: &std::io::Error) -> c_int {
    let replication = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<crate::fs::ReplicationError>());
    match replication {
        Some(r) if r.is_durability_timeout() => {
            set_errno(libc::ETIMEDOUT);
            FT_ETIMEDOUT
        }
        Some(_) => {
            let full = e.kind() == std::io::ErrorKind::StorageFull;
            set_errno(if full { libc::ENOSPC } else { libc::EIO });
            FT_EREPL
        }
        None => {
            set_errno(e.raw_os_error().unwrap_or(libc::EIO));
            FT_EFILE
        }
    }
}

/// `open(2)` flags and mode as `ft::fs` options; None for an invalid access mode.
fn open_options(flags: c_int, mode: u32) -> Option<crate::fs::OpenOptions> {
    let mut o = crate::fs::OpenOptions::new();
    match flags & libc::O_ACCMODE {
        libc::O_RDONLY => o.read(true),
        libc::O_WRONLY => o.write(true),
        libc::O_RDWR => o.read(true).write(true),
        _ => return None,
    };
    let creat = flags & libc::O_CREAT != 0;
    o.create(creat)
        .create_new(creat && flags & libc::O_EXCL != 0)
        .truncate(flags & libc::O_TRUNC != 0)
        .append(flags & libc::O_APPEND != 0)
        .mode(mode)
        .custom_flags(
            flags
                & !(libc::O_ACCMODE
                    | libc::O_CREAT
                    | libc::O_EXCL
                    | libc::O_TRUNC
                    | libc::O_APPEND),
        );
    Some(o)
}

fn lookup_file(handle: c_int) -> Option<FileHandle> {
    let index = usize::try_from(handle).ok()?;
    FILES
        .read()
        .unwrap_or_else(PoisonError::into_inner)
        .get(index)?
        .clone()
}

/// Runs `call` on the file behind `handle`, or returns FT_EBADHANDLE.
fn with_file(handle: c_int, call: impl FnOnce(&mut crate::fs::File) -> i64) -> i64 {
    boundary_or(i64::from(FT_EPANIC), || match lookup_file(handle) {
        Some(file) => call(&mut file.lock().unwrap_or_else(PoisonError::into_inner)),
        None => i64::from(FT_EBADHANDLE),
    })
}

/// The caller's buffer as a slice; None when it cannot be one (NULL with a length, too long).
///
/// # Safety
/// A non-NULL `buf` must be valid for `len` bytes for the lifetime `'a`.
unsafe fn caller_bytes<'a>(buf: *const c_void, len: usize) -> Option<&'a [u8]> {
    if len == 0 {
        return Some(&[]);
    }
    if buf.is_null() || isize::try_from(len).is_err() {
        return None;
    }
    // SAFETY: non-NULL, len fits isize, and the caller guarantees validity for len bytes.
    Some(unsafe { std::slice::from_raw_parts(buf.cast::<u8>(), len) })
}

/// Bytes done, or the code of the error that stopped the loop before any byte was done.
fn written(done: usize, error: Option<&std::io::Error>) -> i64 {
    match error {
        // A replication error is reported even after progress: the bytes are written locally
        // but the caller asked for them to be replicated (or durable) too.
        Some(e)
            if done == 0
                || e.get_ref()
                    .is_some_and(|i| i.is::<crate::fs::ReplicationError>()) =>
        {
            i64::from(file_code(e))
        }
        _ => i64::try_from(done).unwrap_or(i64::MAX),
    }
}

/// Opens (and with O_CREAT creates) a file for replicated I/O, like open(2): `flags` are
/// O_RDONLY/O_WRONLY/O_RDWR with O_CREAT, O_EXCL, O_TRUNC, O_APPEND and other open(2) flags;
/// `mode` the permission bits of a created file (before the umask). Returns a handle (>= 0)
/// for ft_write_file, ft_read_file, ft_write_file_at, ft_sync_file and ft_close_file, or a
/// negative FT_E* code (FT_EFILE with errno for a failed open, FT_EINVAL for a NULL path or
/// an invalid access mode or mode).
///
/// When the file lies beneath a directory replicated by watchd (FT_REPL_FILESETS), its
/// creation, truncation, writes and syncs are logged to watchd, which copies them to the
/// backup hosts; any other file behaves as a plain file. In a sync-mode fileset every change
/// returns only once the backups have it durable (FT_ETIMEDOUT if they do not confirm in
/// time: the change is then made locally and still queued). Thread-safe.
///
/// # Safety
/// `path` must be NULL or a NUL-terminated string valid for the duration of the call.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ft_create_file(path: *const c_char, flags: c_int, mode: c_int) -> c_int {
    boundary(|| {
        if path.is_null() {
            return FT_EINVAL;
        }
        // SAFETY: non-NULL and, by this function's contract, a NUL-terminated string that
        // stays valid while the call runs.
        let bytes = unsafe { CStr::from_ptr(path) }.to_bytes();
        let path = std::path::Path::new(
            <std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(bytes),
        );
        let Ok(mode) = u32::try_from(mode) else {
            return FT_EINVAL;
        };
        let Some(options) = open_options(flags, mode) else {
            return FT_EINVAL;
        };
        let file = match options.open(path) {
            Ok(file) => file,
            Err(e) => return file_code(&e),
        };
        let mut files = FILES.write().unwrap_or_else(PoisonError::into_inner);
        let index = match files.iter().position(Option::is_none) {
            Some(free) => free,
            None => {
                files.push(None);
                files.len() - 1
            }
        };
        let Ok(handle) = c_int::try_from(index) else {
            set_errno(libc::EMFILE);
            return FT_EFILE;
        };
        files[index] = Some(std::sync::Arc::new(Mutex::new(file)));
        handle
    })
}

/// Writes all `len` bytes of `buf` at the handle's file offset (at the end with O_APPEND),
/// retrying short writes. Returns the bytes written, or a negative FT_E* code when nothing
/// could be written (FT_EFILE + errno), the handle is unknown (FT_EBADHANDLE), or the bytes
/// were written locally but not logged (FT_EREPL) or not confirmed durable (FT_ETIMEDOUT).
///
/// # Safety
/// `buf` must be valid for reading `len` bytes for the duration of the call.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ft_write_file(handle: c_int, buf: *const c_void, len: usize) -> i64 {
    // SAFETY: the caller guarantees `buf` is valid for `len` bytes during the call.
    let Some(data) = (unsafe { caller_bytes(buf, len) }) else {
        return i64::from(FT_EINVAL);
    };
    with_file(handle, |file| {
        use std::io::Write;
        let mut done = 0;
        while done < data.len() {
            match file.write(&data[done..]) {
                Ok(0) => {
                    return written(
                        done,
                        Some(&std::io::Error::from(std::io::ErrorKind::WriteZero)),
                    );
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return written(done, Some(&e)),
            }
        }
        written(done, None)
    })
}

/// Like ft_write_file, at `offset` and without moving the file offset (pwrite).
///
/// # Safety
/// `buf` must be valid for reading `len` bytes for the duration of the call.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ft_write_file_at(
    handle: c_int,
    buf: *const c_void,
    len: usize,
    offset: u64,
) -> i64 {
    // SAFETY: the caller guarantees `buf` is valid for `len` bytes during the call.
    let Some(data) = (unsafe { caller_bytes(buf, len) }) else {
        return i64::from(FT_EINVAL);
    };
    with_file(handle, |file| {
        let mut done = 0;
        while done < data.len() {
            let at = offset.saturating_add(done as u64);
            match file.write_at(&data[done..], at) {
                Ok(0) => {
                    return written(
                        done,
                        Some(&std::io::Error::from(std::io::ErrorKind::WriteZero)),
                    );
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return written(done, Some(&e)),
            }
        }
        written(done, None)
    })
}

/// Reads up to `len` bytes at the handle's file offset into `buf`, like read(2). Returns the
/// bytes read (0 at the end of the file), or FT_EFILE (+ errno), FT_EBADHANDLE, FT_EINVAL.
///
/// # Safety
/// `buf` must be valid for writing `len` bytes for the duration of the call.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ft_read_file(handle: c_int, buf: *mut c_void, len: usize) -> i64 {
    if len > 0 && (buf.is_null() || isize::try_from(len).is_err()) {
        return i64::from(FT_EINVAL);
    }
    with_file(handle, |file| {
        use std::io::Read;
        if len == 0 {
            return 0;
        }
        // SAFETY: non-NULL, len fits isize, and the caller guarantees `buf` is valid for
        // writing len bytes and not accessed by anyone else during the call.
        let out = unsafe { std::slice::from_raw_parts_mut(buf.cast::<u8>(), len) };
        loop {
            match file.read(out) {
                Ok(n) => return i64::try_from(n).unwrap_or(i64::MAX),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return i64::from(file_code(&e)),
            }
        }
    })
}

/// Makes the file durable (fsync) locally and, in a replicated fileset, on the replicas; in a
/// sync-mode fileset returns once the backups have every earlier change durable. FT_OK or a
/// negative FT_E* code.
#[unsafe(no_mangle)]
pub extern "C" fn ft_sync_file(handle: c_int) -> c_int {
    let code = with_file(handle, |file| match file.sync_all() {
        Ok(()) => i64::from(FT_OK),
        Err(e) => i64::from(file_code(&e)),
    });
    c_int::try_from(code).unwrap_or(FT_EPANIC)
}

/// Closes a handle of ft_create_file (the descriptor is closed once calls running on the
/// handle in other threads return). FT_OK or FT_EBADHANDLE.
#[unsafe(no_mangle)]
pub extern "C" fn ft_close_file(handle: c_int) -> c_int {
    boundary(|| {
        let Ok(index) = usize::try_from(handle) else {
            return FT_EBADHANDLE;
        };
        let taken = FILES
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .get_mut(index)
            .and_then(Option::take);
        match taken {
            Some(file) => {
                drop(file);
                FT_OK
            }
            None => FT_EBADHANDLE,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_maps_to_its_code() {
        let io = || std::io::Error::from_raw_os_error(libc::EBADF);
        assert_eq!(code_of(Ok(())), FT_OK);
        assert_eq!(code_of(Err(Error::NoSocket)), FT_ENOSOCKET);
        assert_eq!(code_of(Err(Error::Unreachable(io()))), FT_EUNREACHABLE);
        assert_eq!(code_of(Err(Error::WouldBlock)), FT_EAGAIN);
        assert_eq!(code_of(Err(Error::InvalidArgument("x"))), FT_EINVAL);
        assert_eq!(code_of(Err(Error::Io(io()))), FT_EIO);
    }

    #[test]
    fn every_critical_error_maps_to_its_code() {
        use crate::critical::Error as E;
        let io = |errno| std::io::Error::from_raw_os_error(errno);
        let cases = [
            (
                E::AddressInUse {
                    addr: 1,
                    size: 2,
                    occupant: String::new(),
                },
                FT_EADDRINUSE,
            ),
            (
                E::Map {
                    addr: 1,
                    size: 2,
                    source: io(libc::ENOMEM),
                },
                FT_ENOMEM,
            ),
            (
                E::OutOfMemory {
                    requested: 1,
                    used: 2,
                    size: 3,
                },
                FT_ENOMEM,
            ),
            (E::Config(String::new()), FT_ECONFIG),
            (E::InvalidPointer(8), FT_EINVAL),
            (E::InvalidArgument(String::new()), FT_EINVAL),
            (E::Corrupt(String::new()), FT_ECORRUPT),
            (E::Mismatch(String::new()), FT_EMISMATCH),
            (E::Busy("x"), FT_EBUSY),
            (E::Standby, FT_ESTANDBY),
            (E::Snapshot(io(libc::EAGAIN)), FT_ECKPT),
            (E::Tracking(io(libc::EPERM)), FT_ECKPT),
            (E::Writer(io(libc::EAGAIN)), FT_ECKPT),
            // A full disk is recognised through the error chain, whatever the variant.
            (E::Snapshot(io(libc::ENOSPC)), FT_ENOSPC),
            (
                E::Image(ckpt::ImageError::Poisoned {
                    kind: std::io::ErrorKind::StorageFull,
                }),
                FT_ENOSPC,
            ),
        ];
        for (error, code) in cases {
            assert_eq!(critical_code(&error), code, "{error}");
        }
    }

    #[test]
    fn a_panic_becomes_ft_epanic() {
        assert_eq!(boundary(|| panic!("injected")), FT_EPANIC);
    }

    #[test]
    fn strerror_is_never_null_and_distinct() {
        let codes = [
            FT_OK,
            FT_ENOSOCKET,
            FT_EUNREACHABLE,
            FT_EAGAIN,
            FT_ENOTREG,
            FT_EINVAL,
            FT_EPANIC,
            FT_EIO,
            FT_ENOMEM,
            FT_EADDRINUSE,
            FT_ENOSPC,
            FT_ECORRUPT,
            FT_EMISMATCH,
            FT_EBUSY,
            FT_ECKPT,
            FT_ECONFIG,
            FT_ESTANDBY,
            FT_ENOTSTANDBY,
            FT_EPROMOTED,
        ];
        let texts: Vec<String> = codes
            .iter()
            .map(|&c| {
                let p = ft_strerror(c);
                assert!(!p.is_null());
                // SAFETY: ft_strerror returns pointers to static NUL-terminated strings.
                unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
            })
            .collect();
        let mut unique = texts.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), texts.len());
        assert!(!ft_strerror(42).is_null());
    }
}
