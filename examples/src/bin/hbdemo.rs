//! hbdemo: a service that heartbeats to watchd, for trying crash and hang detection by hand
//! and in end-to-end tests. `examples/c/hbdemo.c` is the same program in C, with the same
//! options and output. It never stops because of watchd: failed calls are printed and the
//! program carries on, and without `FT_SOCKET` it runs alone after one warning.
//!
//! SIGUSR1 crashes it at once (abort), SIGUSR2 makes it hang (no more heartbeats).

use std::io::Write;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ft::{Error, Watch};

/// The thread id the demo heartbeats for.
const TID: u32 = 1;
const DEFAULT_INTERVAL_MS: u64 = 100;
const DEFAULT_TIMEOUT_MS: u32 = 500;
const DEFAULT_PRINT_EVERY: u64 = 10;
/// How long one sleep of a hung demo lasts; it sleeps in a loop forever.
const HANG_NAP: Duration = Duration::from_secs(3600);
const USAGE: &str = "usage: hbdemo [--interval-ms I] [--timeout-ms T] [--print-every N]
              [--crash-after-ms X] [--hang-after-ms X] [--exit-after-ms X]
  Registers with watchd (FT_SOCKET), reports ready, then heartbeats thread 1 every I ms
  (default 100) promising the next beat within T ms (default 500), printing every N beats
  (default 10). --crash-after-ms aborts, --hang-after-ms stops heartbeating and sleeps forever,
  --exit-after-ms exits 0. SIGUSR1 aborts now, SIGUSR2 hangs now.";

/// Set by the SIGUSR2 handler; the main loop hangs when it sees it.
static HANG_REQUESTED: AtomicBool = AtomicBool::new(false);

#[derive(Debug)]
struct Options {
    interval: Duration,
    timeout: Duration,
    print_every: u64,
    crash_after: Option<Duration>,
    hang_after: Option<Duration>,
    exit_after: Option<Duration>,
}

fn parse_options(mut args: impl Iterator<Item = String>) -> Result<Options, String> {
    let mut opts = Options {
        interval: Duration::from_millis(DEFAULT_INTERVAL_MS),
        timeout: Duration::from_millis(u64::from(DEFAULT_TIMEOUT_MS)),
        print_every: DEFAULT_PRINT_EVERY,
        crash_after: None,
        hang_after: None,
        exit_after: None,
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
            "--print-every" => opts.print_every = number(u64::MAX)?.max(1),
            "--crash-after-ms" => opts.crash_after = Some(Duration::from_millis(number(u64::MAX)?)),
            "--hang-after-ms" => opts.hang_after = Some(Duration::from_millis(number(u64::MAX)?)),
            "--exit-after-ms" => opts.exit_after = Some(Duration::from_millis(number(u64::MAX)?)),
            _ => return Err(format!("unknown option {flag}")),
        }
    }
    Ok(opts)
}

/// Prints one line and flushes at once, so that a supervisor's log shows it before a crash.
macro_rules! say {
    ($($arg:tt)*) => {{
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "hbdemo[{}]: {}", std::process::id(), format_args!($($arg)*));
        let _ = out.flush();
    }};
}

extern "C" fn on_sigusr1(_: libc::c_int) {
    const MSG: &[u8] = b"hbdemo: SIGUSR1, crashing now (abort)\n";
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
    // the point: the caller re-checks its flags and deadlines.
    unsafe { libc::nanosleep(&req, std::ptr::null_mut()) };
}

fn hang_forever() -> ! {
    say!("hanging now: no more heartbeats");
    loop {
        std::thread::sleep(HANG_NAP);
    }
}

fn main() -> ExitCode {
    let opts = match parse_options(std::env::args().skip(1)) {
        Ok(o) => o,
        Err(msg) => {
            if !msg.is_empty() {
                eprintln!("hbdemo: {msg}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    install_handler(libc::SIGUSR1, on_sigusr1);
    install_handler(libc::SIGUSR2, on_sigusr2);

    let watch = match Watch::register_lenient() {
        Ok((watch, Ok(()))) => {
            say!(
                "registered with watchd at {}",
                watch.socket_path().display()
            );
            Some(watch)
        }
        Ok((watch, Err(e))) => {
            say!("ft_reg_watch failed: {e} (will retry with the next heartbeat)");
            Some(watch)
        }
        Err(Error::NoSocket) => {
            say!("warning: FT_SOCKET is not set, running without watchd");
            None
        }
        Err(e) => {
            say!("ft_reg_watch failed: {e}; running without watchd");
            None
        }
    };
    if let Some(w) = &watch {
        report("ft_ready", w.ready());
        let status = format!("heartbeat every {} ms", opts.interval.as_millis());
        report("ft_status", w.status(&status));
    }
    say!(
        "ready: heartbeat every {} ms, timeout {} ms",
        opts.interval.as_millis(),
        opts.timeout.as_millis()
    );

    let start = Instant::now();
    let mut next_beat = start;
    let mut beats: u64 = 0;
    let mut last_failure: Option<String> = None;
    loop {
        let now = Instant::now();
        let elapsed = now - start;
        if opts.crash_after.is_some_and(|d| elapsed >= d) {
            say!("crashing now (abort) after {} ms", elapsed.as_millis());
            std::process::abort();
        }
        if HANG_REQUESTED.load(Ordering::SeqCst) || opts.hang_after.is_some_and(|d| elapsed >= d) {
            hang_forever();
        }
        if opts.exit_after.is_some_and(|d| elapsed >= d) {
            if let Some(w) = watch {
                report("ft_hbeat_end", w.heartbeat_end(TID));
                report("ft_del_watch", w.unregister());
            }
            say!("exiting (status 0) after {beats} beats");
            return ExitCode::SUCCESS;
        }
        if now >= next_beat {
            if let Some(w) = &watch {
                match w.heartbeat(TID, opts.timeout) {
                    Ok(()) => {
                        if last_failure.take().is_some() {
                            say!("ft_hbeat works again");
                        }
                    }
                    Err(e) => {
                        // Printed once per distinct failure: watchd may be down for a while.
                        let text = e.to_string();
                        if last_failure.as_ref() != Some(&text) {
                            say!("ft_hbeat failed: {text}");
                            last_failure = Some(text);
                        }
                    }
                }
            }
            beats += 1;
            if beats == 1 || beats.is_multiple_of(opts.print_every) {
                say!("beat {beats}");
            }
            // After a stall (SIGSTOP, overload) resume the rhythm instead of bursting beats.
            next_beat = (next_beat + opts.interval).max(now);
        }
        let deadlines = [opts.crash_after, opts.hang_after, opts.exit_after];
        let wake = deadlines
            .into_iter()
            .flatten()
            .map(|d| start + d)
            .fold(next_beat, Instant::min);
        nap(wake.saturating_duration_since(Instant::now()));
    }
}

fn report(call: &str, result: Result<(), Error>) {
    if let Err(e) = result {
        say!("{call} failed: {e}");
    }
}
