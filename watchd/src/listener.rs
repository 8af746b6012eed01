//! The application listener: the datagram sockets that libft (`FT_SOCKET`) and sd_notify
//! programs (`NOTIFY_SOCKET`) send to.
//!
//! A sender is identified only by the kernel's credentials (`SO_PASSCRED` / `SCM_CREDENTIALS`),
//! mapped to a service through the [`Directory`] (main pid, ancestors, or cgroup), never by what a
//! message claims. Garbage, oversized and unattributable datagrams are dropped and counted; none
//! of them can stop the listener. Each socket has its own thread with a blocking receive, which
//! is cheaper per message than an async wake-up at high heartbeat rates.

use std::collections::HashMap;
use std::io::IoSliceMut;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use ft::proto::{AppMessage, DecodeError, MAX_DATAGRAM};
use nix::sys::socket::{self, ControlMessageOwned, MsgFlags, UnixAddr, sockopt};

use crate::api::ListenerCounters;
use crate::machine::Input;

/// libft's socket, inside the data directory.
pub const FT_SOCKET_FILE: &str = "ft.sock";
/// The sd_notify socket, inside the data directory.
pub const NOTIFY_SOCKET_FILE: &str = "notify.sock";
/// The longest sd_notify datagram accepted (systemd's own limit is about this).
pub const MAX_NOTIFY_DATAGRAM: usize = 4096;
/// Kernel receive buffer asked for, so bursts of heartbeats are absorbed.
const RECEIVE_BUFFER_BYTES: usize = 8 << 20;
/// After draining its socket the listener pauses this long before it blocks again, so that at a
/// steady rate it wakes once per batch instead of once per datagram (context switches were most
/// of watchd's CPU time with 1000 services heartbeating at 1 Hz). A burst still drains at once.
pub const COALESCE: Duration = Duration::from_millis(4);
/// How late a datagram can reach the supervisors because of [`COALESCE`] (plus scheduling
/// slack); the state machine judges deadlines only after it.
pub const DELIVERY_GRACE: Duration = Duration::from_millis(6);
/// Coalescing applies when the socket was last drained less than this long ago (a steady rate).
const COALESCE_WHEN_WITHIN: Duration = Duration::from_millis(20);
/// Shorter pauses than this are not worth a sleep: the listener just waits for data.
const MIN_PAUSE: Duration = Duration::from_micros(200);
/// The socket queue length watchd asks for: a burst of one heartbeat from each of a thousand
/// services started together fits, pause included (systemd asks for 512 for its notify socket).
pub const MIN_DGRAM_QUEUE: usize = 2048;
const DGRAM_QUEUE_SYSCTL: &str = "/proc/sys/net/unix/max_dgram_qlen";
/// How long a datagram from an unknown direct child of watchd waits for its spawn to be recorded.
const FRESH_CHILD_WAIT: Duration = Duration::from_millis(50);
/// How far up the parent chain a sender is looked for.
const MAX_ANCESTRY: usize = 32;

/// Where a message is delivered: implemented by the service actors' directory.
pub trait Deliver: Send + Sync + 'static {
    /// Delivers `input` from process `pid` to `service`; false when there is no such service.
    fn deliver(&self, service: &str, pid: u32, input: Input) -> bool;

    /// Process `pid` of `service` registered with libft from `address`: where watchd's
    /// requests to it (e.g. checkpoint now) go.
    fn registered_from(&self, _service: &str, _pid: u32, _address: UnixAddr) {}
}

/// Which processes belong to which service.
#[derive(Debug, Default)]
pub struct Directory {
    pids: RwLock<HashMap<u32, String>>,
    /// `/proc/PID/cgroup` path prefix under which each service has `<prefix>/<service>`.
    cgroup_prefix: Option<String>,
}

impl Directory {
    /// A directory; `cgroup_prefix` is watchd's cgroup root as seen in `/proc/PID/cgroup`
    /// (e.g. `/ftkit-abc`), when services have cgroups.
    pub fn new(cgroup_prefix: Option<String>) -> Directory {
        Directory {
            pids: RwLock::default(),
            cgroup_prefix,
        }
    }

    /// Records `pid` as the main process of `service`.
    pub fn insert(&self, pid: u32, service: &str) {
        self.pids
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(pid, service.to_owned());
    }

    /// Forgets `pid`.
    pub fn remove(&self, pid: u32) {
        self.pids
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&pid);
    }

    /// The service `pid` belongs to: itself a main pid, a descendant of one, or in a service's
    /// cgroup.
    pub fn resolve(&self, pid: u32) -> Option<String> {
        {
            let pids = self
                .pids
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(s) = pids.get(&pid) {
                return Some(s.clone());
            }
            let mut p = pid;
            for _ in 0..MAX_ANCESTRY {
                match parent_of(p) {
                    Some(pp) if pp > 1 => {
                        if let Some(s) = pids.get(&pp) {
                            return Some(s.clone());
                        }
                        p = pp;
                    }
                    _ => break,
                }
            }
        }
        let prefix = self.cgroup_prefix.as_deref()?;
        let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
        let path = text.lines().find_map(|l| l.strip_prefix("0::"))?;
        let rest = path.strip_prefix(prefix)?.strip_prefix('/')?;
        let service = rest.split('/').next()?;
        (!service.is_empty()).then(|| service.to_owned())
    }

    /// [`resolve`](Self::resolve), waiting briefly when the sender is a direct child of watchd
    /// that is not known yet: a service just spawned may speak before its spawn is recorded.
    fn resolve_fresh(&self, pid: u32) -> Option<String> {
        if let Some(s) = self.resolve(pid) {
            return Some(s);
        }
        if parent_of(pid) != Some(std::process::id()) {
            return None;
        }
        let deadline = std::time::Instant::now() + FRESH_CHILD_WAIT;
        while std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_micros(200));
            if let Some(s) = self.resolve(pid) {
                return Some(s);
            }
        }
        None
    }
}

fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which may itself contain spaces and parentheses.
    let after = &stat[stat.rfind(')')? + 2..];
    after.split(' ').nth(1)?.parse().ok()
}

/// The listener's counters.
#[derive(Debug, Default)]
pub struct Counters {
    accepted: AtomicU64,
    garbage: AtomicU64,
    oversized: AtomicU64,
    rejected_sender: AtomicU64,
}

impl Counters {
    /// A snapshot.
    pub fn snapshot(&self) -> ListenerCounters {
        ListenerCounters {
            accepted: self.accepted.load(Ordering::Relaxed),
            garbage: self.garbage.load(Ordering::Relaxed),
            oversized: self.oversized.load(Ordering::Relaxed),
            rejected_sender: self.rejected_sender.load(Ordering::Relaxed),
        }
    }
}

/// Which protocol a socket speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// libft's binary datagrams.
    Ft,
    /// sd_notify's `KEY=VALUE` lines.
    Notify,
}

/// Binds `path` (replacing a stale socket file) and serves it on a new thread. Returns a handle
/// of the same socket for sending replies (a connected libft socket accepts only its peer).
pub fn start(
    path: &Path,
    protocol: Protocol,
    directory: Arc<Directory>,
    deliver: Arc<dyn Deliver>,
    counters: Arc<Counters>,
) -> std::io::Result<UnixDatagram> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    // The queue length of a datagram socket is fixed when it is created.
    let queue = ensure_dgram_queue();
    let sock = UnixDatagram::bind(path)?;
    // Services may run as other users; they are told apart by credentials, not by access.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))?;
    socket::setsockopt(&sock, sockopt::PassCred, &true).map_err(std::io::Error::from)?;
    // Best effort: the kernel caps it at rmem_max unless we may force it.
    if socket::setsockopt(&sock, sockopt::RcvBufForce, &RECEIVE_BUFFER_BYTES).is_err() {
        let _ = socket::setsockopt(&sock, sockopt::RcvBuf, &RECEIVE_BUFFER_BYTES);
    }
    let name = match protocol {
        Protocol::Ft => "ft-listener",
        Protocol::Notify => "notify-listener",
    };
    let replies = sock.try_clone()?;
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            serve(
                &sock,
                protocol,
                queue,
                &directory,
                deliver.as_ref(),
                &counters,
            )
        })?;
    Ok(replies)
}

/// The datagrams a Unix socket queues before senders get EAGAIN (`net.unix.max_dgram_qlen`).
/// The kernel's default of 10 drops heartbeats in any burst; like systemd, watchd raises it to
/// [`MIN_DGRAM_QUEUE`] (in its network namespace) when it may, and says so.
fn ensure_dgram_queue() -> usize {
    let read = || {
        std::fs::read_to_string(DGRAM_QUEUE_SYSCTL)
            .ok()
            .and_then(|s| s.trim().parse::<usize>().ok())
    };
    let current = read().unwrap_or(MIN_DGRAM_QUEUE);
    if current >= MIN_DGRAM_QUEUE {
        return current;
    }
    match std::fs::write(DGRAM_QUEUE_SYSCTL, MIN_DGRAM_QUEUE.to_string()) {
        Ok(()) => {
            tracing::info!(
                from = current,
                to = MIN_DGRAM_QUEUE,
                "raised {DGRAM_QUEUE_SYSCTL} so bursts of heartbeats are not dropped"
            );
            read().unwrap_or(current)
        }
        Err(e) => {
            tracing::warn!(current, error = %e, "cannot raise {DGRAM_QUEUE_SYSCTL}: heartbeats may be dropped in bursts");
            current
        }
    }
}

fn serve(
    sock: &UnixDatagram,
    protocol: Protocol,
    queue: usize,
    directory: &Directory,
    deliver: &dyn Deliver,
    counters: &Counters,
) {
    // One byte more than the largest valid datagram, so oversize shows even without MSG_TRUNC.
    let limit = match protocol {
        Protocol::Ft => MAX_DATAGRAM,
        Protocol::Notify => MAX_NOTIFY_DATAGRAM,
    };
    let mut buf = vec![0u8; limit + 1];
    let mut cmsg = nix::cmsg_space!(socket::UnixCredentials);
    // When the socket was found empty the previous time, and whether anything came since.
    let mut last_empty = std::time::Instant::now();
    let mut received_since = 0usize;
    loop {
        let mut iov = [IoSliceMut::new(&mut buf)];
        let received = socket::recvmsg::<UnixAddr>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_TRUNC | MsgFlags::MSG_CMSG_CLOEXEC | MsgFlags::MSG_DONTWAIT,
        );
        if let Err(nix::errno::Errno::EAGAIN) = received {
            // Drained. At a steady rate, let the next datagrams gather for a moment instead of
            // waking for each; when traffic is sparse, just wait for the next one.
            let since = last_empty.elapsed();
            last_empty = std::time::Instant::now();
            let pause = coalescing_pause(received_since, since, queue);
            received_since = 0;
            if let Some(pause) = pause {
                std::thread::sleep(pause);
            } else {
                let mut fds = [nix::poll::PollFd::new(
                    sock.as_fd(),
                    nix::poll::PollFlags::POLLIN,
                )];
                let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::NONE);
            }
            continue;
        }
        received_since += 1;
        let (len, truncated, pid, from) = match received {
            Ok(msg) => {
                let pid = msg.cmsgs().ok().and_then(|mut c| {
                    c.find_map(|m| match m {
                        ControlMessageOwned::ScmCredentials(cred) => u32::try_from(cred.pid()).ok(),
                        _ => None,
                    })
                });
                (
                    msg.bytes,
                    msg.flags.contains(MsgFlags::MSG_TRUNC),
                    pid,
                    msg.address,
                )
            }
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                tracing::error!(error = %e, "application socket receive failed");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        if truncated || len > limit {
            counters.oversized.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let data = &buf[..len];
        let inputs = match protocol {
            Protocol::Ft => match AppMessage::decode(data) {
                Ok(m) => vec![input_of(m)],
                Err(DecodeError::Oversized) => {
                    counters.oversized.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                Err(_) => {
                    counters.garbage.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
            },
            Protocol::Notify => match parse_notify(data) {
                Some(inputs) => inputs,
                None => {
                    counters.garbage.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
            },
        };
        let service = pid
            .filter(|p| *p > 0)
            .and_then(|p| directory.resolve_fresh(p));
        let pid = pid.unwrap_or(0);
        let delivered = service.is_some_and(|service| {
            if let (Some(addr), Some(Input::Register)) = (from, inputs.first()) {
                deliver.registered_from(&service, pid, addr);
            }
            // An sd_notify datagram of only unknown keys is still a valid message.
            inputs
                .into_iter()
                .all(|input| deliver.deliver(&service, pid, input))
        });
        if delivered {
            counters.accepted.fetch_add(1, Ordering::Relaxed);
        } else {
            counters.rejected_sender.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(
                pid,
                "datagram from a process that is not a supervised service; dropped"
            );
        }
    }
}

/// How long to let datagrams gather before draining again: `None` (just wait for the next one)
/// when traffic is sparse; otherwise [`COALESCE`], shortened so that the datagrams expected
/// meanwhile, at the rate just seen, fill at most half the socket's queue.
fn coalescing_pause(received: usize, over: Duration, queue: usize) -> Option<Duration> {
    if received == 0 || over >= COALESCE_WHEN_WITHIN {
        return None;
    }
    let rate = received as f64 / over.as_secs_f64().max(1e-6);
    let room = (queue / 2) as f64;
    let pause = COALESCE.min(Duration::from_secs_f64(room / rate));
    (pause >= MIN_PAUSE).then_some(pause)
}

fn input_of(m: AppMessage) -> Input {
    match m {
        AppMessage::Register => Input::Register,
        AppMessage::Heartbeat { tid, timeout_ms } => Input::Heartbeat {
            tid,
            timeout: Duration::from_millis(u64::from(timeout_ms)),
        },
        AppMessage::HeartbeatEnd { tid } => Input::HeartbeatEnd { tid },
        AppMessage::Ready => Input::Ready,
        AppMessage::Status(s) => Input::Status(s),
        AppMessage::Unregister => Input::Unregister,
        AppMessage::Checkpointed {
            stream,
            seq,
            bytes,
            pause_us,
        } => Input::Checkpointed {
            stream,
            seq,
            bytes,
            pause: Duration::from_micros(u64::from(pause_us)),
        },
    }
}

/// Parses an sd_notify datagram. `None` when it is not sd_notify at all; unknown keys are
/// allowed (and ignored), as systemd does.
pub fn parse_notify(data: &[u8]) -> Option<Vec<Input>> {
    let text = std::str::from_utf8(data).ok()?;
    let mut inputs = Vec::new();
    let mut any = false;
    for line in text.split('\n').filter(|l| !l.is_empty()) {
        let (key, value) = line.split_once('=')?;
        if key.is_empty()
            || !key
                .bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
        {
            return None;
        }
        any = true;
        match (key, value) {
            ("READY", "1") => inputs.push(Input::Ready),
            ("WATCHDOG", "1") => inputs.push(Input::Watchdog),
            ("WATCHDOG", "trigger") => inputs.push(Input::WatchdogTrigger),
            ("STATUS", s) => inputs.push(Input::Status(s.to_owned())),
            _ => {}
        }
    }
    any.then_some(inputs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Sink(Mutex<Vec<(String, u32, Input)>>);
    impl Deliver for Sink {
        fn deliver(&self, service: &str, pid: u32, input: Input) -> bool {
            self.0
                .lock()
                .expect("lock")
                .push((service.to_owned(), pid, input));
            true
        }
    }

    fn wait_for(cond: impl Fn() -> bool) {
        for _ in 0..200 {
            if cond() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("condition not reached");
    }

    #[test]
    fn coalescing_pause_fits_the_queue() {
        let ms = Duration::from_millis;
        assert_eq!(coalescing_pause(0, ms(1), 512), None, "nothing came");
        assert_eq!(coalescing_pause(3, ms(50), 512), None, "sparse traffic");
        assert_eq!(
            coalescing_pause(4, ms(4), 512),
            Some(COALESCE),
            "1000/s: full pause"
        );
        // 200,000/s into a queue of 512: at most 256 expected during the pause.
        let p = coalescing_pause(200, ms(1), 512).expect("a pause");
        assert!(p <= Duration::from_micros(1281), "{p:?}");
        assert_eq!(
            coalescing_pause(100, ms(1), 10),
            None,
            "a tiny queue allows no pause"
        );
    }

    #[test]
    fn notify_parsing() {
        assert_eq!(
            parse_notify(b"READY=1\nSTATUS=ok now\n"),
            Some(vec![Input::Ready, Input::Status("ok now".into())])
        );
        assert_eq!(parse_notify(b"WATCHDOG=1"), Some(vec![Input::Watchdog]));
        assert_eq!(
            parse_notify(b"WATCHDOG=trigger"),
            Some(vec![Input::WatchdogTrigger])
        );
        assert_eq!(parse_notify(b"MAINPID=5\nSTOPPING=1"), Some(vec![]));
        assert_eq!(parse_notify(b"hello"), None);
        assert_eq!(parse_notify(b"\xff\xfe"), None);
        assert_eq!(parse_notify(b"=1"), None);
        assert_eq!(parse_notify(b""), None);
    }

    #[test]
    fn own_process_is_attributed_and_strangers_rejected() {
        let dir = tempfile::tempdir().expect("tempdir");
        let directory = Arc::new(Directory::new(None));
        let sink = Arc::new(Sink::default());
        let counters = Arc::new(Counters::default());
        let ft = dir.path().join("ft.sock");
        start(
            &ft,
            Protocol::Ft,
            directory.clone(),
            sink.clone(),
            counters.clone(),
        )
        .expect("start");
        let client = UnixDatagram::unbound().expect("socket");
        let mut buf = [0u8; MAX_DATAGRAM];
        let n = AppMessage::Heartbeat {
            tid: 4,
            timeout_ms: 250,
        }
        .encode(&mut buf);

        // Not yet a service: rejected and counted.
        client.send_to(&buf[..n], &ft).expect("send");
        wait_for(|| counters.snapshot().rejected_sender == 1);

        directory.insert(std::process::id(), "svc");
        client.send_to(&buf[..n], &ft).expect("send");
        client.send_to(b"garbage!", &ft).expect("send");
        client
            .send_to(&[0u8; MAX_DATAGRAM + 100], &ft)
            .expect("send");
        wait_for(|| counters.snapshot().accepted == 1 && counters.snapshot().garbage == 1);
        wait_for(|| counters.snapshot().oversized == 1);
        let got = sink.0.lock().expect("lock").clone();
        assert_eq!(
            got,
            vec![(
                "svc".into(),
                std::process::id(),
                Input::Heartbeat {
                    tid: 4,
                    timeout: Duration::from_millis(250)
                }
            )]
        );
    }

    #[test]
    fn children_of_a_service_are_attributed_to_it() {
        let directory = Directory::new(None);
        // This test process stands in for a service's main pid; a child of it belongs to it.
        directory.insert(std::process::id(), "svc");
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .expect("spawn");
        assert_eq!(directory.resolve(child.id()), Some("svc".into()));
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(directory.resolve(1), None);
    }
}
