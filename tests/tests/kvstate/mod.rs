//! Shared by the `checkpoint_*` tests: runs the kvstate examples (Rust and C) under watchd,
//! reads what they journal and log, looks at their checkpoint store, and holds an independent
//! model of kvstate's operations, so that a recovered state is checked against what the
//! program had at that checkpoint (its journal) and against what it must be (the model).
//! Nothing here fakes an observation: every value comes from the programs' output, watchd or
//! the file system.

// Each checkpoint_* test binary uses a different part of this module.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use ftkit_tests::{
    Scratch, Watchd, binary, build_c_example, pid_alive, q, q_list, read_or_empty, signal,
    wait_until,
};
use nix::sys::signal::Signal;

/// The stream kvstate keeps its table in.
pub const STREAM: u32 = 0;
/// One operation every this many milliseconds.
pub const INTERVAL_MS: u64 = 20;
/// A synchronous, journaled checkpoint every this many operations (about every 200 ms).
pub const SYNC_EVERY: u64 = 10;
/// A heartbeat deadline that the short stops of [`freeze_consistent`] never miss.
pub const PATIENT_TIMEOUT_MS: u64 = 5000;
/// The heartbeat deadline of the hang tests.
pub const HANG_TIMEOUT_MS: u64 = 1000;
/// How long a (re)started kvstate may take to print its recovery lines.
pub const RECOVERY_TIMEOUT: Duration = Duration::from_secs(15);
/// How long the journal may take to reach a wanted length.
pub const JOURNAL_TIMEOUT: Duration = Duration::from_secs(20);
/// How long it may take to catch the program at a moment when its journal has caught up.
const FREEZE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the threads of a SIGSTOPped process may take to all stop.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

// kvstate's operations (see examples/src/bin/kvstate.rs); the model must match them exactly.
const NBUCKETS: u64 = 64;
const KEYSPACE: u64 = 500;
const DELETE_EVERY: u64 = 3;
const DELETE_STRIDE: u64 = 7;
const VALUE_PAD_CYCLE: u64 = 16;
const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0100_0000_01b3;

/// Which kvstate program.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lang {
    Rust,
    C,
}

/// A kvstate executable, with the scratch directory that holds it when it was compiled here.
#[derive(Debug)]
pub struct Program {
    pub path: PathBuf,
    _build: Option<Scratch>,
}

/// The Rust kvstate from `cargo build --workspace`, or the C one compiled now against
/// `ft.h` + `libft.so` (in a scratch directory, so parallel tests never share a build).
pub fn program(lang: Lang) -> Program {
    match lang {
        Lang::Rust => Program {
            path: binary("kvstate"),
            _build: None,
        },
        Lang::C => {
            let (build, exe) = build_c_example("kvstate.c", "kvstate-c");
            Program {
                path: exe,
                _build: Some(build),
            }
        }
    }
}

/// A `[[service]]` table running kvstate: ready by libft, heartbeat hang detection, restart
/// always; `every` adds `checkpoint = { every = .. }` (periodic checkpoints at safe points).
pub fn service(
    name: &str,
    program: &Path,
    journal: &Path,
    timeout_ms: u64,
    sync_every: u64,
    every: Option<&str>,
) -> String {
    let args = [
        "--interval-ms".to_owned(),
        INTERVAL_MS.to_string(),
        "--timeout-ms".to_owned(),
        timeout_ms.to_string(),
        "--sync-every".to_owned(),
        sync_every.to_string(),
        "--journal".to_owned(),
        journal.display().to_string(),
    ];
    let checkpoint = every.map_or_else(String::new, |e| {
        format!("checkpoint = {{ every = {} }}\n", q(e))
    });
    format!(
        "[[service]]\nname = {}\ncommand = {}\nargs = {}\n\
         ready = {{ notify = true, timeout = \"20s\" }}\nhang = {{ heartbeat = true }}\n\
         restart = {{ policy = \"always\", max_restarts = 20, window = \"60s\" }}\n{checkpoint}",
        q(name),
        q(program),
        q_list(&args)
    )
}

/// The store directory of `stream` of a service: `FT_CKPT_DIR/<stream>` with watchd's
/// `FT_CKPT_DIR = <data_dir>/ckpt/<service>`.
pub fn store_dir(w: &Watchd, service: &str, stream: u32) -> PathBuf {
    w.data_dir()
        .join("ckpt")
        .join(service)
        .join(stream.to_string())
}

/// The committed images of a store (`<seq:020>.ckpt`), oldest first.
pub fn images(dir: &Path) -> Vec<u64> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut seqs: Vec<u64> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let digits = name.strip_suffix(".ckpt")?;
            (digits.len() == 20 && digits.bytes().all(|b| b.is_ascii_digit()))
                .then(|| digits.parse().ok())?
        })
        .collect();
    seqs.sort_unstable();
    seqs
}

/// The path of image `seq` in a store.
pub fn image_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("{seq:020}.ckpt"))
}

/// One `checkpoint seq S counter C digest D` line of the journal (or `recovered ...` line).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StateLine {
    pub seq: u64,
    pub counter: u64,
    pub digest: u64,
}

/// Parses `seq S counter C digest D` (what follows `checkpoint ` or `recovered `).
fn parse_state(text: &str) -> Option<StateLine> {
    let words: Vec<&str> = text.split_whitespace().collect();
    match words.as_slice() {
        ["seq", s, "counter", c, "digest", d] => Some(StateLine {
            seq: s.parse().ok()?,
            counter: c.parse().ok()?,
            digest: u64::from_str_radix(d, 16).ok()?,
        }),
        _ => None,
    }
}

/// Every whole line of a journal, in order. A line being written is not whole yet: only lines
/// ended by a newline count.
pub fn journal(path: &Path) -> Vec<StateLine> {
    let text = read_or_empty(path);
    let whole = text.rfind('\n').map_or("", |end| &text[..end]);
    whole
        .lines()
        .map(|l| {
            l.strip_prefix("checkpoint ")
                .and_then(parse_state)
                .unwrap_or_else(|| panic!("malformed journal line {l:?} in {}", path.display()))
        })
        .collect()
}

/// The journal's newest line for image `seq` (a sequence number is used once per store, but
/// the newest line is the one that describes the image in the store now).
pub fn journal_line(lines: &[StateLine], seq: u64) -> StateLine {
    *lines
        .iter()
        .rev()
        .find(|l| l.seq == seq)
        .unwrap_or_else(|| panic!("the journal has no line for checkpoint {seq}: {lines:?}"))
}

/// Waits until the journal has at least `n` lines with a sequence number above `after`.
pub fn wait_journal(path: &Path, after: u64, n: usize) -> Vec<StateLine> {
    wait_until(
        &format!(
            "{n} journal lines after checkpoint {after} in {}",
            path.display()
        ),
        JOURNAL_TIMEOUT,
        || {
            let lines = journal(path);
            (lines.iter().filter(|l| l.seq > after).count() >= n).then_some(lines)
        },
    )
}

/// What a kvstate process printed at start-up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// `recovered seq S counter C digest D`; None for `fresh start`.
    pub state: Option<StateLine>,
    /// The `recovery report:` line (libft's `t_recover_report`).
    pub report: String,
}

/// The recovery lines process `pid` printed in `output` (its stdout), once it has printed
/// them all.
pub fn recovery_in(output: &str, pid: u32) -> Option<Recovery> {
    let prefix = format!("kvstate[{pid}]: ");
    let mine: Vec<&str> = output
        .lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .collect();
    let failure = mine.iter().find(|l| {
        ["corrupt state: ", "t_recover failed", "ft_critical failed"]
            .iter()
            .any(|p| l.starts_with(p))
    });
    assert!(
        failure.is_none(),
        "kvstate[{pid}] could not recover: {failure:?}\n{output}"
    );
    let report = mine
        .iter()
        .find_map(|l| l.strip_prefix("recovery report: "))?
        .to_owned();
    let state = mine
        .iter()
        .find_map(|l| l.strip_prefix("recovered ").and_then(parse_state));
    let fresh = mine.contains(&"fresh start");
    assert!(
        state.is_some() || fresh,
        "kvstate[{pid}] reported `{report}` but printed neither `recovered ...` nor \
         `fresh start`:\n{output}"
    );
    Some(Recovery { state, report })
}

/// Waits until process `pid` of the service has printed its recovery lines; returns them.
pub fn wait_recovery(w: &Watchd, service: &str, pid: u32) -> Recovery {
    wait_until(
        &format!("kvstate[{pid}] of `{service}` to print its recovery"),
        RECOVERY_TIMEOUT,
        || recovery_in(&w.service_log(service), pid),
    )
}

/// The program caught at a moment when everything it committed is journaled.
#[derive(Debug, Clone)]
pub struct Frozen {
    pub pid: u32,
    /// The newest committed image of the store.
    pub newest: u64,
    /// The journal at that moment.
    pub journal: Vec<StateLine>,
}

/// Waits until every thread of `pid` is stopped (or gone): a thread in a system call (the
/// checkpoint writer in fdatasync) stops only when the call returns.
pub fn wait_all_threads_stopped(pid: u32) {
    wait_until(
        &format!("every thread of {pid} to be stopped"),
        STOP_TIMEOUT,
        || {
            let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
                return Some(());
            };
            tasks
                .flatten()
                .all(|t| {
                    let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
                    let state = stat
                        .rfind(')')
                        .and_then(|i| stat.get(i + 2..))
                        .and_then(|s| s.chars().next());
                    // Gone between listing and reading, stopped, or dead: all still.
                    matches!(state, None | Some('T' | 't' | 'Z' | 'X'))
                })
                .then_some(())
        },
    )
}

/// SIGSTOPs `pid` and returns what it committed and journaled, if the newest committed image
/// of `store` has its journal line (t_checkpoint_sync returns, then the line is written); else
/// lets it run again (SIGCONT) and returns None.
pub fn try_freeze(pid: u32, store: &Path, journal_path: &Path) -> Option<Frozen> {
    signal(pid, Signal::SIGSTOP);
    wait_all_threads_stopped(pid);
    let newest = images(store).last().copied();
    let lines = journal(journal_path);
    if let Some(newest) = newest
        && lines.iter().any(|l| l.seq == newest)
    {
        return Some(Frozen {
            pid,
            newest,
            journal: lines,
        });
    }
    signal(pid, Signal::SIGCONT);
    None
}

/// Stops `pid` at a moment when its journal has caught up with its store (see
/// [`try_freeze`]); the process is left stopped.
pub fn freeze_pid_consistent(pid: u32, store: &Path, journal_path: &Path) -> Frozen {
    wait_until(
        &format!(
            "kvstate[{pid}] stopped with its journal caught up with {}",
            store.display()
        ),
        FREEZE_TIMEOUT,
        || try_freeze(pid, store, journal_path),
    )
}

/// Stops the service's process at a moment when its journal has caught up with its store
/// (see [`try_freeze`]); the process is left stopped.
pub fn freeze_consistent(w: &Watchd, service: &str, journal_path: &Path) -> Frozen {
    let store = store_dir(w, service, STREAM);
    wait_until(
        &format!("`{service}` stopped with its journal caught up with its store"),
        FREEZE_TIMEOUT,
        || try_freeze(w.wait_running(service), &store, journal_path),
    )
}

/// Waits until `ftctl status` shows checkpoint `seq` of `stream` for the service.
pub fn wait_status_checkpoint(w: &Watchd, service: &str, stream: u32, seq: u64) {
    w.wait_for(
        service,
        &format!("reporting checkpoint {stream}:{seq}"),
        Duration::from_secs(10),
        |s| s["checkpoint"]["seq"] == seq && s["checkpoint"]["stream"] == stream,
    );
}

/// Checks a recovered state against the model: the digest of the table kvstate must hold
/// after `counter` operations.
pub fn assert_matches_model(state: StateLine) {
    assert_eq!(
        state.digest,
        model_digest(state.counter),
        "the recovered table differs from kvstate's model after {} operations: {state:?}",
        state.counter
    );
}

/// Kills the service's (stopped) process and returns the pid of the one watchd starts next.
pub fn kill_and_wait_restart(w: &Watchd, service: &str, pid: u32) -> u32 {
    signal(pid, Signal::SIGKILL);
    let new = w.wait_new_pid(service, pid, Duration::from_secs(15));
    assert!(!pid_alive(pid), "the killed process {pid} is still there");
    new
}

fn fnv(h: &mut u64, bytes: &[u8]) {
    for b in bytes {
        *h ^= u64::from(*b);
        *h = h.wrapping_mul(FNV_PRIME);
    }
}

fn bucket_of(key: &str) -> usize {
    let mut h = FNV_OFFSET;
    fnv(&mut h, key.as_bytes());
    usize::try_from(h % NBUCKETS).expect("below NBUCKETS")
}

/// kvstate's table after `counter` operations from a fresh start, built in ordinary memory
/// (chains as vectors, head first), and digested the way kvstate digests its critical heap.
pub fn model_digest(counter: u64) -> u64 {
    let n = usize::try_from(NBUCKETS).expect("NBUCKETS fits");
    let mut buckets: Vec<Vec<(String, String)>> = vec![Vec::new(); n];
    let mut count: u64 = 0;
    for c in 1..=counter {
        let key = format!("k{}", c % KEYSPACE);
        let pad = usize::try_from(c % VALUE_PAD_CYCLE).expect("below 16");
        let value = format!("v{c}{}", "+".repeat(pad));
        let chain = &mut buckets[bucket_of(&key)];
        if let Some(entry) = chain.iter_mut().find(|(k, _)| *k == key) {
            entry.1 = value;
        } else {
            chain.insert(0, (key, value));
            count += 1;
        }
        if c % DELETE_EVERY == 0 {
            let victim = format!("k{}", (c * DELETE_STRIDE) % KEYSPACE);
            let chain = &mut buckets[bucket_of(&victim)];
            if let Some(i) = chain.iter().position(|(k, _)| *k == victim) {
                chain.remove(i);
                count -= 1;
            }
        }
    }
    let mut h = FNV_OFFSET;
    fnv(&mut h, &counter.to_le_bytes());
    fnv(&mut h, &count.to_le_bytes());
    for (b, chain) in buckets.iter().enumerate() {
        for (k, v) in chain {
            let b = u64::try_from(b).expect("bucket index fits");
            let klen = u64::try_from(k.len()).expect("short key");
            let vlen = u64::try_from(v.len()).expect("short value");
            fnv(&mut h, &b.to_le_bytes());
            fnv(&mut h, &klen.to_le_bytes());
            fnv(&mut h, k.as_bytes());
            fnv(&mut h, &vlen.to_le_bytes());
            fnv(&mut h, v.as_bytes());
        }
    }
    h
}
