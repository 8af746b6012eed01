//! The application's link to watchd: registration, FtHbeat heartbeats, readiness and status.
//!
//! Owns one unbound Unix datagram socket connected to `FT_SOCKET`. Every call is one
//! non-blocking `send`; the common path takes no lock and allocates nothing. It must never
//! block, sleep, loop or panic: when watchd is gone it reconnects once and otherwise fails fast.

use std::io;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use crate::proto::{AppMessage, ENV_SOCKET, MAX_DATAGRAM, WatchdMessage};

/// `Watch::pending`: the watchd we are connected to has not received our `Register` yet.
const PENDING_REGISTER: u8 = 1;
/// `Watch::pending`: the watchd we are connected to has not received our declared `Ready` yet.
const PENDING_READY: u8 = 2;

/// Why a call to watchd failed. The application should log it and carry on: a failed heartbeat
/// never harms the application, watchd judges it by the heartbeats that do arrive.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `FT_SOCKET` is unset or empty: the process does not run under watchd.
    #[error("FT_SOCKET is not set: not running under watchd")]
    NoSocket,
    /// watchd's socket cannot be reached, even after one reconnect.
    #[error("watchd is unreachable: {0}")]
    Unreachable(#[source] io::Error),
    /// watchd's queue is full; the message was dropped.
    #[error("watchd's queue is full, message dropped")]
    WouldBlock,
    /// Any other failure of the socket.
    #[error("I/O error talking to watchd: {0}")]
    Io(#[source] io::Error),
    /// An argument was refused before anything was sent.
    #[error("invalid argument: {0}")]
    InvalidArgument(&'static str),
}

/// The calling thread's kernel thread id (`gettid`), a convenient default `tid` for heartbeats.
pub fn current_tid() -> u32 {
    // SAFETY: gettid has no preconditions and cannot fail.
    let tid = unsafe { libc::gettid() };
    // Kernel thread ids are positive, so the fallback is unreachable; 0 is still a valid tid.
    u32::try_from(tid).unwrap_or(0)
}

/// A registration with watchd, shared by all threads of the application (`Send + Sync`).
///
/// Dropping a `Watch` sends nothing, so a process that crashes or exits without
/// [`Watch::unregister`] is still judged by watchd (missed heartbeats, exit status).
#[derive(Debug)]
pub struct Watch {
    sock: UnixDatagram,
    path: PathBuf,
    /// Counts successful reconnects, so that threads that saw the same dead peer reconnect once.
    generation: AtomicU64,
    /// What a newly connected watchd has not been told yet (`PENDING_*` bits): who we are
    /// (`Register`) and, if the application declared it, that we are ready.
    pending: AtomicU8,
    /// The application called [`Watch::ready`]: replayed to every new watchd after `Register`.
    declared_ready: AtomicBool,
    /// Serialises the rare reconnect path; the common send path never takes it.
    reconnect: Mutex<()>,
}

impl Watch {
    /// Registers with the watchd named by `FT_SOCKET`.
    pub fn register() -> Result<Watch, Error> {
        Watch::connect(&socket_path_from_env()?)
    }

    /// Registers with the watchd listening on `path`.
    pub fn connect(path: &Path) -> Result<Watch, Error> {
        let (watch, registered) = Watch::connect_lenient(path)?;
        registered.map(|()| watch)
    }

    /// Like [`Watch::register`], but keeps the `Watch` when the first `Register` cannot be
    /// delivered (watchd restarting): every later call then reconnects and registers first.
    /// Fails only when `FT_SOCKET` is unset or no socket can be created; the inner result is
    /// the outcome of the first registration attempt.
    pub fn register_lenient() -> Result<(Watch, Result<(), Error>), Error> {
        Watch::connect_lenient(&socket_path_from_env()?)
    }

    /// Like [`Watch::connect`], with the lenient behaviour of [`Watch::register_lenient`].
    pub fn connect_lenient(path: &Path) -> Result<(Watch, Result<(), Error>), Error> {
        let sock = UnixDatagram::unbound().map_err(Error::Io)?;
        autobind(&sock).map_err(Error::Io)?;
        sock.set_nonblocking(true).map_err(Error::Io)?;
        let watch = Watch {
            sock,
            path: path.to_owned(),
            generation: AtomicU64::new(0),
            pending: AtomicU8::new(0),
            declared_ready: AtomicBool::new(false),
            reconnect: Mutex::new(()),
        };
        // The socket starts unconnected: the first send fails with ENOTCONN and goes through
        // the reconnect path, which is exactly "connect, then Register".
        let registered = watch.send(&AppMessage::Register);
        Ok((watch, registered))
    }

    /// FtHbeat: thread `tid` entered (or renews) a monitored region and promises its next
    /// heartbeat, or [`Watch::heartbeat_end`], within `timeout` (sent in whole milliseconds,
    /// saturating at `u32::MAX`).
    pub fn heartbeat(&self, tid: u32, timeout: Duration) -> Result<(), Error> {
        let timeout_ms = u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX);
        self.send(&AppMessage::Heartbeat { tid, timeout_ms })
    }

    /// Thread `tid` left its monitored region: watchd stops expecting its heartbeats.
    pub fn heartbeat_end(&self, tid: u32) -> Result<(), Error> {
        self.send(&AppMessage::HeartbeatEnd { tid })
    }

    /// The service finished starting up. Remembered even when it cannot be delivered, and
    /// told again to a restarted watchd after the `Register` that a reconnect sends.
    pub fn ready(&self) -> Result<(), Error> {
        self.declared_ready.store(true, Ordering::Release);
        self.send(&AppMessage::Ready)
    }

    /// A free-form status line shown by `ftctl status`; cut to fit one datagram.
    pub fn status(&self, text: &str) -> Result<(), Error> {
        self.send(&AppMessage::Status(text.to_owned()))
    }

    /// Ends the registration: watchd drops this process's heartbeat regions.
    pub fn unregister(self) -> Result<(), Error> {
        self.send(&AppMessage::Unregister)
    }

    /// Enters a monitored region for thread `tid`: sends a heartbeat now, and `HeartbeatEnd`
    /// when the returned guard is dropped.
    pub fn region(&self, tid: u32, timeout: Duration) -> Result<Region<'_>, Error> {
        self.heartbeat(tid, timeout)?;
        Ok(Region {
            watch: self,
            tid,
            timeout,
        })
    }

    /// Reports a committed checkpoint to watchd (shown by `ftctl status`).
    pub fn checkpointed(
        &self,
        stream: u32,
        seq: u64,
        bytes: u64,
        pause: Duration,
    ) -> Result<(), Error> {
        let pause_us = u32::try_from(pause.as_micros()).unwrap_or(u32::MAX);
        self.send(&AppMessage::Checkpointed {
            stream,
            seq,
            bytes,
            pause_us,
        })
    }

    /// The next request watchd sent (e.g. `ftctl checkpoint`), if any; never blocks. Datagrams
    /// that do not decode are skipped. A [`WatchdMessage::Promote`] is recorded before it is
    /// returned ([`crate::standby::promote`]): from then on the process is the primary.
    pub fn poll_command(&self) -> Result<Option<WatchdMessage>, Error> {
        let mut buf = [0u8; MAX_DATAGRAM + 1];
        loop {
            match self.sock.recv(&mut buf) {
                Ok(n) => {
                    if let Ok(m) = WatchdMessage::decode(&buf[..n]) {
                        if let WatchdMessage::Promote { epoch } = m {
                            crate::standby::promote(epoch);
                        }
                        return Ok(Some(m));
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                // Not connected yet, or the peer went away: nothing to read now.
                Err(e) if peer_gone(&e) => return Ok(None),
                Err(e) => return Err(Error::Io(e)),
            }
        }
    }

    /// Waits until a request from watchd can be read with [`Watch::poll_command`], at most
    /// `timeout`; true when one can. A maintenance loop waits here instead of sleeping, so a
    /// request (a promotion, on a failover) is seen at once.
    pub fn wait_command(&self, timeout: Duration) -> Result<bool, Error> {
        let mut pfd = libc::pollfd {
            fd: std::os::fd::AsRawFd::as_raw_fd(&self.sock),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
        // SAFETY: `pfd` is one valid pollfd that outlives the call, and the count says one.
        let rc = unsafe { libc::poll(&raw mut pfd, 1, ms) };
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            return if e.kind() == std::io::ErrorKind::Interrupted {
                Ok(false)
            } else {
                Err(Error::Io(e))
            };
        }
        Ok(rc > 0 && pfd.revents & libc::POLLIN != 0)
    }

    /// The path of watchd's socket this `Watch` talks to.
    pub fn socket_path(&self) -> &Path {
        &self.path
    }

    fn send(&self, msg: &AppMessage) -> Result<(), Error> {
        let mut buf = [0u8; MAX_DATAGRAM];
        let len = msg.encode(&mut buf);
        let datagram = &buf[..len];
        // Read before sending: if another thread reconnects after our send failed, the
        // generation tells us not to reconnect a second time.
        let seen = self.generation.load(Ordering::Acquire);
        if self.pending.load(Ordering::Acquire) != 0 {
            return self.recover(msg, datagram, seen, false);
        }
        match self.sock.send(datagram) {
            Ok(_) => Ok(()),
            Err(e) if peer_gone(&e) => self.recover(msg, datagram, seen, true),
            Err(e) => Err(classify(e)),
        }
    }

    /// The slow path, serialised by `reconnect`: connect again at most once (and only if no
    /// other thread did since `seen`), deliver what is pending, then retry `datagram`. Never
    /// loops and never sleeps.
    ///
    /// A thread on the lock-free path may slip one message to a freshly reconnected watchd just
    /// before our `Register`; watchd sees it as a message from a process not registered yet.
    fn recover(
        &self,
        msg: &AppMessage,
        datagram: &[u8],
        seen: u64,
        peer_is_gone: bool,
    ) -> Result<(), Error> {
        let _guard = self
            .reconnect
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut reconnected = false;
        if peer_is_gone && self.generation.load(Ordering::Acquire) == seen {
            self.reconnect_locked()?;
            reconnected = true;
        }
        match self.deliver_locked(msg, datagram) {
            Err(e) if peer_gone(&e) && !reconnected => {
                self.reconnect_locked()?;
                self.deliver_locked(msg, datagram).map_err(classify_retry)
            }
            other => other.map_err(classify_retry),
        }
    }

    /// Points the socket at whatever listens on the path now. Connecting a connected datagram
    /// socket again just changes its peer, so the same fd follows watchd to its new socket.
    /// Caller holds `reconnect`.
    fn reconnect_locked(&self) -> Result<(), Error> {
        self.sock.connect(&self.path).map_err(Error::Unreachable)?;
        self.pending.fetch_or(PENDING_REGISTER, Ordering::AcqRel);
        self.generation.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    /// Sends what the connected watchd has not been told yet (`Register`, then `Ready` if
    /// declared), then `datagram`, unless `msg` is one of those and just went out. A failed
    /// send leaves its bit pending for the next call. Caller holds `reconnect`.
    fn deliver_locked(&self, msg: &AppMessage, datagram: &[u8]) -> io::Result<()> {
        let mut buf = [0u8; MAX_DATAGRAM];
        if self.pending.load(Ordering::Acquire) & PENDING_REGISTER != 0 {
            let len = AppMessage::Register.encode(&mut buf);
            self.sock.send(&buf[..len])?;
            let replay = if self.declared_ready.load(Ordering::Acquire) {
                PENDING_READY
            } else {
                0
            };
            self.pending.store(replay, Ordering::Release);
            if *msg == AppMessage::Register {
                return Ok(());
            }
        }
        if self.pending.load(Ordering::Acquire) & PENDING_READY != 0 {
            let len = AppMessage::Ready.encode(&mut buf);
            self.sock.send(&buf[..len])?;
            self.pending.fetch_and(!PENDING_READY, Ordering::AcqRel);
            if *msg == AppMessage::Ready {
                return Ok(());
            }
        }
        self.sock.send(datagram).map(|_| ())
    }
}

/// A monitored region of one thread: a heartbeat was sent when it was created, `beat` renews
/// it, and dropping it sends `HeartbeatEnd` (errors ignored: a drop cannot report them).
#[derive(Debug)]
pub struct Region<'a> {
    watch: &'a Watch,
    tid: u32,
    timeout: Duration,
}

impl Region<'_> {
    /// Renews the region's promise with the timeout it was created with.
    pub fn beat(&self) -> Result<(), Error> {
        self.watch.heartbeat(self.tid, self.timeout)
    }

    /// The thread id this region heartbeats for.
    pub fn tid(&self) -> u32 {
        self.tid
    }
}

impl Drop for Region<'_> {
    fn drop(&mut self) {
        let _ = self.watch.heartbeat_end(self.tid);
    }
}

fn socket_path_from_env() -> Result<PathBuf, Error> {
    match std::env::var_os(ENV_SOCKET) {
        Some(p) if !p.is_empty() => Ok(PathBuf::from(p)),
        _ => Err(Error::NoSocket),
    }
}

/// The errors that mean "the socket we were connected to is gone": watchd died (or was
/// restarted and bound a new socket at the same path), or we were never connected.
fn peer_gone(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ECONNREFUSED | libc::ENOTCONN | libc::ENOENT | libc::ECONNRESET)
    )
}

fn classify(e: io::Error) -> Error {
    if e.kind() == io::ErrorKind::WouldBlock {
        Error::WouldBlock
    } else {
        Error::Io(e)
    }
}

/// Like [`classify`], for the send after a reconnect: the peer being gone again is final.
fn classify_retry(e: io::Error) -> Error {
    if peer_gone(&e) {
        Error::Unreachable(e)
    } else {
        classify(e)
    }
}

/// Binds the socket to a fresh abstract address chosen by the kernel (autobind), so watchd can
/// answer it. Only watchd can: the socket is connected to watchd's, and a connected datagram
/// socket receives only from its peer.
fn autobind(sock: &UnixDatagram) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: zeroed bytes are a valid sockaddr_un (a plain C struct of integers and bytes).
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family =
        libc::sa_family_t::try_from(libc::AF_UNIX).expect("AF_UNIX fits in sa_family_t");
    let len = libc::socklen_t::try_from(std::mem::size_of::<libc::sa_family_t>())
        .expect("the size of sa_family_t fits in socklen_t");
    // SAFETY: the fd is an open Unix socket owned by `sock`; `addr` is a valid sockaddr_un that
    // outlives the call, and `len` (just the family) is within its size, which asks the kernel
    // to autobind an abstract address.
    let rc = unsafe {
        libc::bind(
            sock.as_raw_fd(),
            (&raw const addr).cast::<libc::sockaddr>(),
            len,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_command_wakes_when_watchd_sends_a_request() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("watchd.sock");
        let fake = UnixDatagram::bind(&path).expect("bind the fake watchd");
        fake.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let w = Watch::connect(&path).expect("connect");
        let mut buf = [0u8; MAX_DATAGRAM + 1];
        let (_, app) = fake.recv_from(&mut buf).expect("the registration");
        assert!(!w.wait_command(Duration::from_millis(20)).expect("wait"));
        let mut out = [0u8; MAX_DATAGRAM];
        let n = WatchdMessage::CheckpointNow { stream: 3 }.encode(&mut out);
        fake.send_to_addr(&out[..n], &app).expect("send");
        assert!(w.wait_command(Duration::from_secs(5)).expect("wait"));
        assert_eq!(
            w.poll_command().expect("poll"),
            Some(WatchdMessage::CheckpointNow { stream: 3 })
        );
    }

    #[test]
    fn watch_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Watch>();
        assert_send_sync::<Region<'_>>();
    }

    #[test]
    fn current_tid_is_the_kernel_tid() {
        let main = current_tid();
        assert_ne!(main, 0);
        let other = std::thread::spawn(current_tid).join().expect("thread runs");
        assert_ne!(main, other);
    }

    #[test]
    fn peer_gone_errors_are_recognised() {
        for errno in [
            libc::ECONNREFUSED,
            libc::ENOTCONN,
            libc::ENOENT,
            libc::ECONNRESET,
        ] {
            assert!(peer_gone(&io::Error::from_raw_os_error(errno)));
        }
        assert!(!peer_gone(&io::Error::from_raw_os_error(libc::EAGAIN)));
        assert!(matches!(
            classify(io::Error::from_raw_os_error(libc::EAGAIN)),
            Error::WouldBlock
        ));
        assert!(matches!(
            classify_retry(io::Error::from_raw_os_error(libc::ECONNREFUSED)),
            Error::Unreachable(_)
        ));
    }
}
