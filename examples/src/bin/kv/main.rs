//! kv: a small TCP key-value server whose table survives crashes and host loss. The table lives
//! in libft's critical memory (checkpointed after every write with `--checkpoint per-request`,
//! periodically otherwise), every write is appended to `DIR/kv.log` through `ft::fs` (so it is
//! replicated when DIR is a watchd fileset; in sync mode a write returns once the backups have
//! it) and synced before it is acknowledged. Under watchd (FT_SOCKET set) it heartbeats and
//! reports ready once recovered; standalone it runs the same without them.
//!
//! Protocol: one request per line, one reply line each (see `ftkit_examples::kvproto`):
//!
//! ```text
//! SET key value → OK <seq>  (only once durable)      GET key → VALUE <value> | NONE
//! DEL key       → OK <seq>                            COUNT   → COUNT <n>
//! DIGEST        → DIGEST <hex> (FNV-1a, sorted table) PING    → PONG primary | PONG standby
//! bad line      → ERR <why> (the connection stays)    line over 8 KiB → ERR line too long
//! ```
//!
//! Start-up prints `recovered seq S count C digest D` (S: the checkpoint image) or
//! `fresh start`, then replays the log records after the checkpoint's offset (a torn last
//! record, from a crash in the middle of an append, fails its checksum and is ignored). With
//! `FT_ROLE=standby` it recovers, then applies every checkpoint watchd ships into its
//! checkpoint directory as it arrives (printing `applied checkpoint S: seq Q count C`), and
//! answers only `PING` (`PONG standby`), refusing the rest with `ERR standby`; watchd's
//! `Promote` (`ftctl promote kv`, or a failover) makes it a primary in place
//! (`Server::promote`, on a thread of its own so that heartbeats go on: the last shipped
//! checkpoint, then the log after it) with no restart. `--preload` fills the table of a primary
//! that starts fresh, whether it started as one or as a standby promoted before any state
//! reached it (watchd runs standbys on every possible owner of a group that has none yet, so
//! the group's first owner is often such a standby).

/// Prints one line and flushes at once, so that a supervisor's log shows it before a crash.
macro_rules! say {
    ($($arg:tt)*) => {
        ftkit_examples::service::say($crate::PROGRAM, format_args!($($arg)*))
    };
}

mod log;
mod store;

use std::io::{BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, TryLockError};
use std::time::{Duration, Instant};

use ft::Watch;
use ft::critical::{CheckpointConfig, ENV_CKPT_DIR};
use ft::proto::WatchdMessage;
use ft::standby::{ENV_ROLE, Follower};
use ftkit_examples::kvproto::{LineRead, MAX_LINE, Reply, Request, Role, parse_request, read_line};
use ftkit_examples::service::{Complaint, register};

use crate::log::Op;
use crate::store::{STREAM, Start, Store, WriteError};

/// The name on every output line.
pub const PROGRAM: &str = "kv";
/// The thread id the program heartbeats for.
const TID: u32 = 1;
/// Default heartbeat deadline.
const DEFAULT_HEARTBEAT_TIMEOUT_MS: u64 = 2000;
/// Heartbeats (and idle-time safe points, watchd's requests) this often.
const HEARTBEAT_INTERVAL: Duration = Duration::from_millis(100);
/// A standby looks for shipped checkpoints in waits this long, between which a promotion can
/// take the follower over.
const FOLLOW_WAIT: Duration = Duration::from_millis(20);
/// The maintenance loop runs at most this often (requests wake it early).
const MIN_MAINTENANCE_GAP: Duration = Duration::from_millis(5);
/// The status line shown by `ftctl status` is refreshed this often.
const STATUS_INTERVAL: Duration = Duration::from_secs(1);
/// A request holding the store longer than this means the server is stuck: heartbeats stop,
/// so that watchd restarts it. Longer than a sync-mode write may wait for its backups
/// (`FT_REPL_SYNC_TIMEOUT`, 10 s by default) plus a checkpoint.
const STUCK_AFTER: Duration = Duration::from_secs(30);
/// Periodic checkpoints when neither `--checkpoint` nor watchd (`FT_CKPT_EVERY`) says.
const DEFAULT_CHECKPOINT_EVERY: Duration = Duration::from_secs(1);
/// Connections served at once; more are refused with `ERR busy`.
const MAX_CLIENTS: usize = 256;
/// Pending connections the listening socket queues.
const LISTEN_BACKLOG: i32 = 128;
/// A connection that sends nothing for this long is closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// Read buffer of one connection.
const READ_BUFFER: usize = 16 << 10;
/// Exit status when the state cannot be recovered or kept.
const EXIT_FATAL: u8 = 1;
/// Exit status for bad options or an address that cannot be bound.
const EXIT_USAGE: u8 = 2;

const USAGE: &str = "usage: kv --listen ADDR --data DIR [--checkpoint per-request|every=MS]
          [--heartbeat-timeout-ms T] [--preload BYTES]
  A TCP key-value server (SET/GET/DEL/COUNT/DIGEST/PING, one line each). The table lives in
  libft critical memory, checkpointed after every write (per-request) or every MS ms (default:
  FT_CKPT_EVERY from watchd, else 1000); every write is appended to DIR/kv.log through ft::fs
  and synced before `OK`. Checkpoints go to $FT_CKPT_DIR, standalone to DIR/ckpt.
  FT_ROLE=standby: recover, apply the checkpoints shipped into the checkpoint directory as they
  arrive, and answer only PING until watchd promotes it (`ftctl promote`).
  --preload BYTES: a primary that starts fresh (or a standby promoted with nothing recovered,
  shipped or logged) first fills its table with about BYTES of values (keys pre-0, pre-1, ...;
  suffixes K, M, G) and checkpoints it (for benchmarks).";

/// How the table is checkpointed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CheckpointMode {
    /// A synchronous checkpoint after every write.
    PerRequest,
    /// At the first safe point after each period.
    Every(Duration),
    /// What watchd configured (`FT_CKPT_EVERY`), else [`DEFAULT_CHECKPOINT_EVERY`].
    Default,
}

#[derive(Debug)]
struct Options {
    listen: SocketAddr,
    data: PathBuf,
    checkpoint: CheckpointMode,
    heartbeat_timeout: Duration,
    /// Bytes of values a fresh primary starts with (0: none).
    preload: u64,
}

/// `1048576`, `1024K`, `100M`, `1G`: bytes.
fn parse_bytes(value: &str) -> Option<u64> {
    let (digits, shift) = match value.char_indices().last()? {
        (i, 'K' | 'k') => (&value[..i], 10),
        (i, 'M' | 'm') => (&value[..i], 20),
        (i, 'G' | 'g') => (&value[..i], 30),
        _ => (value, 0),
    };
    digits.parse::<u64>().ok()?.checked_mul(1 << shift)
}

fn parse_options(mut args: impl Iterator<Item = String>) -> Result<Options, String> {
    let (mut listen, mut data) = (None, None);
    let mut checkpoint = CheckpointMode::Default;
    let mut heartbeat_timeout = Duration::from_millis(DEFAULT_HEARTBEAT_TIMEOUT_MS);
    let mut preload = 0;
    while let Some(flag) = args.next() {
        if flag == "--help" || flag == "-h" {
            return Err(String::new());
        }
        let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--listen" => {
                listen = Some(
                    value
                        .parse::<SocketAddr>()
                        .map_err(|e| format!("--listen {value:?}: {e} (e.g. 127.0.0.1:7700)"))?,
                );
            }
            "--data" => data = Some(PathBuf::from(value)),
            "--checkpoint" => {
                checkpoint = match value.as_str() {
                    "per-request" => CheckpointMode::PerRequest,
                    other => {
                        let ms = other
                            .strip_prefix("every=")
                            .and_then(|ms| ms.parse::<u64>().ok())
                            .filter(|ms| *ms > 0)
                            .ok_or_else(|| {
                                format!("--checkpoint {other:?}: per-request or every=MS (MS > 0)")
                            })?;
                        CheckpointMode::Every(Duration::from_millis(ms))
                    }
                }
            }
            "--heartbeat-timeout-ms" => {
                let ms = value
                    .parse::<u32>()
                    .ok()
                    .filter(|ms| *ms > 0)
                    .ok_or_else(|| format!("{flag}: {value:?} is not a number of ms"))?;
                heartbeat_timeout = Duration::from_millis(ms.into());
            }
            "--preload" => {
                preload = parse_bytes(&value)
                    .ok_or_else(|| format!("{flag}: {value:?} is not a size (e.g. 100M)"))?;
            }
            _ => return Err(format!("unknown option {flag}")),
        }
    }
    Ok(Options {
        listen: listen.ok_or("--listen is required")?,
        data: data.ok_or("--data is required")?,
        checkpoint,
        heartbeat_timeout,
        preload,
    })
}

/// Everything the connection threads and the heartbeat thread share.
#[derive(Debug)]
struct Server {
    store: Mutex<Store>,
    /// A standby's follower of the shipped checkpoints; taken by the promotion. Locked before
    /// `store` when both are.
    follower: Mutex<Option<Follower<'static>>>,
    /// A promotion wants `follower`: the follower thread stops taking it (a mutex is not fair,
    /// and that thread takes it again at once after each wait).
    promoting: AtomicBool,
    /// [`Role`] as a number (0 primary, 1 standby); it only ever goes from standby to
    /// primary, in [`Server::promote`].
    role: AtomicU8,
    /// Bytes of values a primary that starts fresh fills its table with (`--preload`).
    preload: u64,
    /// When the request holding the store took it (ms since `epoch`, plus one); 0 = idle.
    busy_since: AtomicU64,
    epoch: Instant,
    clients: AtomicUsize,
}

const ROLE_PRIMARY: u8 = 0;
const ROLE_STANDBY: u8 = 1;

/// Marks the store busy while a request holds it (see [`STUCK_AFTER`]).
#[derive(Debug)]
struct Busy<'a>(&'a AtomicU64);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.store(0, Ordering::Release);
    }
}

impl Server {
    fn role(&self) -> Role {
        if self.role.load(Ordering::Acquire) == ROLE_STANDBY {
            Role::Standby
        } else {
            Role::Primary
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX - 1)
    }

    fn lock(&self) -> (MutexGuard<'_, Store>, Busy<'_>) {
        let store = self.store.lock().unwrap_or_else(PoisonError::into_inner);
        self.busy_since.store(self.now_ms() + 1, Ordering::Release);
        (store, Busy(&self.busy_since))
    }

    /// Whether one request has held the store for longer than [`STUCK_AFTER`].
    fn stuck(&self) -> Option<Duration> {
        let since = self.busy_since.load(Ordering::Acquire);
        let held = Duration::from_millis(self.now_ms().saturating_sub(since.checked_sub(1)?));
        (since != 0 && held > STUCK_AFTER).then_some(held)
    }

    /// Makes a standby the primary in place: the store takes the last checkpoint shipped,
    /// replays what the log gained after it and opens it for writing, preloads when that left
    /// it fresh (`--preload`), then requests are served. Also the start of a process started
    /// as the primary. A primary stays one.
    fn promote(&self) -> Result<(), store::StoreError> {
        self.promoting.store(true, Ordering::Release);
        let mut follower = self.follower.lock().unwrap_or_else(PoisonError::into_inner);
        let (mut store, _busy) = self.lock();
        if let Some(f) = follower.as_mut()
            && let Some(image) = store.follow(f)?
        {
            say!(
                "applied checkpoint {image}: seq {} count {}",
                store.seq(),
                store.count()
            );
        }
        *follower = None;
        store.promote()?;
        // A fresh table here means no checkpoint, shipped image or log record ever reached
        // this process: it is a primary that starts fresh, whichever role it started in
        // (`Store::preload` adds nothing to a table that holds anything).
        let added = store.preload(self.preload)?;
        if added > 0 {
            say!(
                "preloaded {added} entries ({} bytes asked) and checkpointed them",
                self.preload
            );
        }
        self.role.store(ROLE_PRIMARY, Ordering::Release);
        say!(
            "serving as primary: seq {} count {}",
            store.seq(),
            store.count()
        );
        Ok(())
    }

    /// Answers one request line.
    fn handle(&self, line: &[u8]) -> Reply {
        let request = match parse_request(line) {
            Ok(r) => r,
            Err(e) => return Reply::Err(e.to_string()),
        };
        let role = self.role();
        match (&request, role) {
            (Request::Ping, _) => return Reply::Pong(role),
            (_, Role::Standby) => return Reply::Err(WriteError::Standby.to_string()),
            _ => {}
        }
        let (mut store, _busy) = self.lock();
        let written = match request {
            Request::Set { key, value } => store.write(Op::Set {
                key: key.to_vec(),
                value: value.to_vec(),
            }),
            Request::Del { key } => store.write(Op::Del { key: key.to_vec() }),
            Request::Get { key } => {
                return store.get(key).map_or(Reply::None, Reply::Value);
            }
            Request::Count => return Reply::Count(store.count()),
            Request::Digest => {
                return match store.digest() {
                    Ok(d) => Reply::Digest(d),
                    Err(e) => Reply::Err(e.to_string()),
                };
            }
            Request::Ping => return Reply::Pong(role),
        };
        match written {
            Ok(seq) => Reply::Ok(seq),
            Err(WriteError::Fatal(why)) => {
                say!("fatal: {why}; exiting so that recovery sorts it out");
                std::process::exit(i32::from(EXIT_FATAL));
            }
            Err(e) => Reply::Err(e.to_string()),
        }
    }
}

/// Serves one connection until the peer leaves, goes idle, or breaks the stream.
fn serve(server: &Server, stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let _ = stream.set_read_timeout(Some(IDLE_TIMEOUT));
    let Ok(read_half) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::with_capacity(READ_BUFFER, read_half);
    let mut writer = stream;
    let mut line = Vec::with_capacity(MAX_LINE);
    loop {
        let reply = match read_line(&mut reader, &mut line, MAX_LINE) {
            Ok(LineRead::Line) => server.handle(&line),
            Ok(LineRead::TooLong) => Reply::Err(format!("line too long (over {MAX_LINE} bytes)")),
            Ok(LineRead::Eof) | Err(_) => return,
        };
        if writer.write_all(&reply.to_line()).is_err() {
            return;
        }
    }
}

/// Counts a connection for [`MAX_CLIENTS`] while it lives.
#[derive(Debug)]
struct Client(Arc<Server>);

impl Drop for Client {
    fn drop(&mut self) {
        self.0.clients.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Listens on `addr` with `IP_FREEBIND`: a warm standby runs, and listens, on every node that
/// may own its group, before the group's virtual address comes to that node.
fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv4() {
        socket.set_freebind_v4(true)?;
    } else {
        socket.set_freebind_v6(true)?;
    }
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(socket.into())
}

fn accept_loop(server: &Arc<Server>, listener: &TcpListener) {
    let mut accepting = Complaint::new(PROGRAM);
    for conn in listener.incoming() {
        let mut stream = match conn {
            Ok(s) => s,
            Err(e) => {
                accepting.check("accept", Err(e));
                // EMFILE and the like: do not spin while the condition lasts.
                std::thread::sleep(HEARTBEAT_INTERVAL);
                continue;
            }
        };
        accepting.check("accept", Ok::<(), std::io::Error>(()));
        if server.clients.fetch_add(1, Ordering::AcqRel) >= MAX_CLIENTS {
            server.clients.fetch_sub(1, Ordering::AcqRel);
            let _ = stream.write_all(&Reply::Err("busy: too many clients".into()).to_line());
            continue;
        }
        let client = Client(Arc::clone(server));
        let spawned = std::thread::Builder::new()
            .name("kv-client".into())
            .spawn(move || serve(&client.0, stream));
        if let Err(e) = spawned {
            say!("cannot start a connection thread: {e}");
        }
    }
}

/// Heartbeats (unless a request is stuck), takes due checkpoints while idle, answers watchd's
/// checkpoint requests and refreshes the status line. Never blocks on the store.
fn maintenance(server: &Arc<Server>, watch: Option<Arc<Watch>>, timeout: Duration) {
    let watch = watch.as_ref();
    let mut hbeat = Complaint::new(PROGRAM);
    let mut stuck_said = false;
    let mut next_status = Instant::now();
    let mut last = Instant::now();
    // watchd's checkpoint requests not yet taken (the store was busy).
    let mut checkpoints = Vec::new();
    loop {
        // A request from watchd (a promotion, on a failover) wakes the loop at once.
        match watch {
            Some(w) => {
                if let Err(e) = w.wait_command(HEARTBEAT_INTERVAL) {
                    say!("waiting for watchd's requests failed: {e}");
                    std::thread::sleep(HEARTBEAT_INTERVAL);
                }
            }
            None => std::thread::sleep(HEARTBEAT_INTERVAL),
        }
        // A request left unread (the store was busy) must not make the loop spin.
        if let Some(rest) = MIN_MAINTENANCE_GAP.checked_sub(last.elapsed()) {
            std::thread::sleep(rest);
        }
        last = Instant::now();
        match server.stuck() {
            Some(held) => {
                if !stuck_said {
                    say!(
                        "a request has held the store for {} ms: no more heartbeats",
                        held.as_millis()
                    );
                    stuck_said = true;
                }
            }
            None => {
                stuck_said = false;
                if let Some(w) = watch {
                    hbeat.check("ft_hbeat", w.heartbeat(TID, timeout));
                }
            }
        }
        // watchd's requests first, without the store: a standby applying shipped checkpoints
        // back to back holds the store most of the time, and a promotion must not wait for a
        // moment it is free (it takes the store on a thread of its own).
        if let Some(w) = watch {
            let mut promoted = None;
            while let Ok(Some(message)) = w.poll_command() {
                match message {
                    WatchdMessage::CheckpointNow { stream } => checkpoints.push(stream),
                    WatchdMessage::Promote { epoch } => promoted = Some(epoch),
                }
            }
            if let Some(epoch) = promoted
                && server.role() == Role::Standby
                && !server.promoting.swap(true, Ordering::AcqRel)
            {
                say!("promoted by watchd (epoch {epoch})");
                // Taking over (a large shipped image, a long log, a preload) may outlast the
                // heartbeat deadline: this thread keeps heartbeating meanwhile.
                let promoting = Arc::clone(server);
                let told = Arc::clone(w);
                let spawned = std::thread::Builder::new()
                    .name("kv-promote".into())
                    .spawn(move || take_over(&promoting, &told));
                if let Err(e) = spawned {
                    say!("cannot start the promotion thread ({e}); promoting here");
                    take_over(server, w);
                }
            }
        }
        let mut store = match server.store.try_lock() {
            Ok(s) => s,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) => continue,
        };
        if server.role() == Role::Primary {
            store.safe_point();
        }
        for stream in checkpoints.drain(..) {
            if server.role() == Role::Primary {
                store.checkpoint(stream);
            } else {
                say!("checkpoint of stream {stream} not taken: a standby writes none");
            }
        }
        if let Some(w) = watch
            && Instant::now() >= next_status
        {
            next_status = Instant::now() + STATUS_INTERVAL;
            let _ = w.status(&format!(
                "{}: seq {}, {} keys",
                server.role().as_str(),
                store.seq(),
                store.count()
            ));
        }
    }
}

/// Promotes the server, or exits: a standby that cannot serve must be restarted. Once it
/// serves, it says READY again: watchd counts the promotion done (and brings the group's
/// address up) only then.
fn take_over(server: &Server, watch: &Watch) {
    if let Err(e) = server.promote() {
        say!("cannot serve as primary: {e}");
        std::process::exit(i32::from(EXIT_FATAL));
    }
    if let Err(e) = watch.ready() {
        say!("ft_ready after the promotion failed: {e}");
    }
}

/// A standby's loop: applies each checkpoint shipped into the checkpoint directory as it
/// arrives, until a promotion takes the follower.
fn follow(server: &Server) {
    let mut waiting = Complaint::new(PROGRAM);
    while !server.promoting.load(Ordering::Acquire) {
        let mut follower = server
            .follower
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let Some(f) = follower.as_mut() else {
            return;
        };
        match f.wait_for_change(FOLLOW_WAIT) {
            Ok(changed) => {
                waiting.check("watching the checkpoint directory", Ok::<_, String>(()));
                if !changed {
                    continue;
                }
            }
            Err(e) => {
                waiting.check("watching the checkpoint directory", Err(e));
                drop(follower);
                // The directory is unreadable: do not spin while that lasts.
                std::thread::sleep(FOLLOW_WAIT);
                continue;
            }
        }
        let (mut store, _busy) = server.lock();
        match store.follow(f) {
            Ok(Some(image)) => say!(
                "applied checkpoint {image}: seq {} count {}",
                store.seq(),
                store.count()
            ),
            Ok(None) => {}
            Err(e) => {
                say!("fatal: {e}; exiting so that recovery sorts it out");
                std::process::exit(i32::from(EXIT_FATAL));
            }
        }
    }
}

fn role_from_env() -> Result<Role, String> {
    match std::env::var(ENV_ROLE) {
        Err(_) => Ok(Role::Primary),
        Ok(v) if v.is_empty() => Ok(Role::Primary),
        Ok(v) => Role::parse(&v).ok_or_else(|| format!("{ENV_ROLE}={v:?}: primary or standby")),
    }
}

fn main() -> ExitCode {
    let opts = match parse_options(std::env::args().skip(1)) {
        Ok(o) => o,
        Err(msg) => {
            if !msg.is_empty() {
                eprintln!("kv: {msg}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let role = match role_from_env() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("kv: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    if let Err(e) = std::fs::create_dir_all(&opts.data) {
        say!("cannot create {}: {e}", opts.data.display());
        return ExitCode::from(EXIT_USAGE);
    }
    let watch = register(PROGRAM);
    let ckpt = match CheckpointConfig::from_env().and_then(|mut config| {
        if std::env::var_os(ENV_CKPT_DIR).is_none_or(|d| d.is_empty()) {
            config.dir = opts.data.join("ckpt");
        }
        ft::critical::init_global(config)
    }) {
        Ok(c) => c,
        Err(e) => {
            say!("critical memory unavailable: {e}");
            return ExitCode::from(EXIT_FATAL);
        }
    };
    match opts.checkpoint {
        CheckpointMode::PerRequest => ckpt.set_every(STREAM, None),
        CheckpointMode::Every(every) => ckpt.set_every(STREAM, Some(every)),
        CheckpointMode::Default if ckpt.config().every.is_none() => {
            ckpt.set_every(STREAM, Some(DEFAULT_CHECKPOINT_EVERY));
        }
        CheckpointMode::Default => {}
    }
    if let Some(w) = &watch {
        // Report every committed image, as libft's C API does, so `ftctl status` shows it.
        let w = Arc::clone(w);
        ckpt.set_commit_hook(Some(Box::new(move |stream, info, pause| {
            let _ = w.checkpointed(stream, info.seq, info.file_bytes, pause);
        })));
    }
    let per_request = opts.checkpoint == CheckpointMode::PerRequest;
    let recovered = Store::recover(ckpt, &opts.data, per_request).and_then(|(mut store, start)| {
        match start {
            Start::Fresh => say!("fresh start"),
            Start::Recovered {
                image,
                count,
                digest,
            } => say!("recovered seq {image} count {count} digest {digest:016x}"),
        }
        if let Some(report) = ckpt.last_report() {
            say!("recovery report: {report}");
        }
        store.catch_up()?;
        Ok(store)
    });
    let store = match recovered {
        Ok(s) => s,
        Err(e) => {
            if let Some(report) = ckpt.last_report() {
                say!("recovery report: {report}");
            }
            say!("recovery failed: {e}");
            return ExitCode::from(EXIT_FATAL);
        }
    };
    let follower = if role == Role::Standby {
        match Follower::new(ckpt, STREAM) {
            Ok(f) => Some(f),
            Err(e) => {
                say!("cannot follow the shipped checkpoints: {e}");
                return ExitCode::from(EXIT_FATAL);
            }
        }
    } else {
        None
    };
    let server = Arc::new(Server {
        store: Mutex::new(store),
        follower: Mutex::new(follower),
        promoting: AtomicBool::new(false),
        role: AtomicU8::new(ROLE_STANDBY),
        preload: opts.preload,
        busy_since: AtomicU64::new(0),
        epoch: Instant::now(),
        clients: AtomicUsize::new(0),
    });
    if role == Role::Primary
        && let Err(e) = server.promote()
    {
        say!("cannot serve as primary: {e}");
        return ExitCode::from(EXIT_FATAL);
    }
    let listener = match listen(opts.listen) {
        Ok(l) => l,
        Err(e) => {
            say!("cannot listen on {}: {e}", opts.listen);
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let local = listener.local_addr().map_or(opts.listen, |a| a);
    say!("listening on {local} as {}", server.role().as_str());
    if let Some(w) = &watch
        && let Err(e) = w.ready()
    {
        say!("ft_ready failed: {e}");
    }
    let background = Arc::clone(&server);
    let timeout = opts.heartbeat_timeout;
    let spawned = std::thread::Builder::new()
        .name("kv-maintenance".into())
        .spawn(move || maintenance(&background, watch, timeout));
    if let Err(e) = spawned {
        say!("cannot start the maintenance thread: {e}");
        return ExitCode::from(EXIT_FATAL);
    }
    if server.role() == Role::Standby {
        let follower = Arc::clone(&server);
        let spawned = std::thread::Builder::new()
            .name("kv-follower".into())
            .spawn(move || follow(&follower));
        if let Err(e) = spawned {
            say!("cannot start the follower thread: {e}");
            return ExitCode::from(EXIT_FATAL);
        }
    }
    accept_loop(&server, &listener);
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_and_without_suffixes() {
        assert_eq!(parse_bytes("4096"), Some(4096));
        assert_eq!(parse_bytes("1K"), Some(1024));
        assert_eq!(parse_bytes("100M"), Some(100 << 20));
        assert_eq!(parse_bytes("2g"), Some(2 << 30));
        assert_eq!(parse_bytes(""), None);
        assert_eq!(parse_bytes("M"), None);
        assert_eq!(parse_bytes("-1"), None);
        assert_eq!(parse_bytes("1.5M"), None);
        assert_eq!(parse_bytes("99999999999999999999G"), None);
        assert_eq!(parse_bytes("17179869184G"), None);
    }

    #[test]
    fn preload_is_an_option_and_bad_sizes_are_refused() {
        let args = |extra: &[&str]| {
            ["--listen", "127.0.0.1:1", "--data", "/tmp/x"]
                .iter()
                .chain(extra)
                .map(|s| (*s).to_owned())
                .collect::<Vec<_>>()
        };
        let o = parse_options(args(&["--preload", "1M"]).into_iter()).expect("valid");
        assert_eq!(o.preload, 1 << 20);
        let o = parse_options(args(&[]).into_iter()).expect("valid");
        assert_eq!(o.preload, 0);
        let e = parse_options(args(&["--preload", "lots"]).into_iter()).expect_err("invalid");
        assert!(e.contains("not a size"), "{e}");
    }
}
