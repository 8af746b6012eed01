//! The dialing side: connect to one of a peer's addresses (in order, each bounded in time),
//! authenticate, and keep trying with exponential backoff and jitter. It never retries on its
//! own inside [`connect`]: only [`connect_retry`] loops, and it can be cancelled by dropping it.

use std::net::SocketAddr;
use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::net::TcpStream;
use tokio::time::{sleep, timeout};
use tokio_util::codec::{FramedRead, FramedWrite};
use tracing::{debug, info, warn};

use super::conn::{Conn, PeerInfo};
use super::error::{DialFailure, NetError};
use super::frame::FrameCodec;
use super::handshake::{ClientHandshake, drive, fresh_nonce, refuse};
use super::{HANDSHAKE_MAX_FRAME, NetConfig, config_name};

/// Default first delay of a [`Backoff`].
pub const DEFAULT_BACKOFF_INITIAL: Duration = Duration::from_millis(100);
/// Default longest delay of a [`Backoff`]: a peer back after a link flap is found within it.
pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(2);
/// Default growth of a [`Backoff`] per attempt.
pub const DEFAULT_BACKOFF_FACTOR: f64 = 2.0;
/// Default jitter of a [`Backoff`]: each delay is shortened by up to this fraction, so that
/// nodes that lost a peer together do not redial in lockstep.
pub const DEFAULT_BACKOFF_JITTER: f64 = 0.3;

/// Delays between attempts: `initial`, then growing by `factor` up to `max`; each delay is
/// drawn uniformly from `(1 - jitter) * d ..= d`.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    factor: f64,
    jitter: f64,
    current: Duration,
    rng: SmallRng,
}

impl Default for Backoff {
    fn default() -> Backoff {
        Backoff::new(
            DEFAULT_BACKOFF_INITIAL,
            DEFAULT_BACKOFF_MAX,
            DEFAULT_BACKOFF_FACTOR,
            DEFAULT_BACKOFF_JITTER,
        )
    }
}

impl Backoff {
    /// A backoff; out-of-range values are brought into range rather than refused (`max` at
    /// least `initial`, `factor` at least 1, `jitter` within 0..=1, a non-finite value
    /// replaced by its default), because a retry loop must always be able to run.
    pub fn new(initial: Duration, max: Duration, factor: f64, jitter: f64) -> Backoff {
        let factor = if factor.is_finite() {
            factor.max(1.0)
        } else {
            DEFAULT_BACKOFF_FACTOR
        };
        let jitter = if jitter.is_finite() {
            jitter.clamp(0.0, 1.0)
        } else {
            DEFAULT_BACKOFF_JITTER
        };
        Backoff {
            initial,
            max: max.max(initial),
            factor,
            jitter,
            current: initial,
            rng: SmallRng::from_rng(&mut rand::rng()),
        }
    }

    /// The same backoff with a fixed random sequence (for deterministic tests).
    pub fn with_seed(mut self, seed: u64) -> Backoff {
        self.rng = SmallRng::seed_from_u64(seed);
        self
    }

    /// The delay before the next attempt; each call moves one step up.
    pub fn next_delay(&mut self) -> Duration {
        let base = self.current;
        let shrink = self.jitter * self.rng.random::<f64>();
        let delay =
            Duration::try_from_secs_f64(base.as_secs_f64() * (1.0 - shrink)).unwrap_or(base);
        self.current = Duration::try_from_secs_f64(base.as_secs_f64() * self.factor)
            .unwrap_or(self.max)
            .min(self.max);
        delay
    }

    /// Back to the first delay (after a success).
    pub fn reset(&mut self) {
        self.current = self.initial;
    }
}

/// Connects to the peer at `addr` and authenticates for `channel`. A failed handshake is
/// logged (warn), counted in [`NetConfig::stats`] and told to the peer; a failed TCP connect is
/// only counted (the caller decides how loud an unreachable peer is).
pub async fn connect_addr(
    cfg: &NetConfig,
    addr: SocketAddr,
    channel: &str,
) -> Result<Conn, NetError> {
    cfg.validate()?;
    config_name("channel", channel)?;
    let stream = match timeout(cfg.connect_timeout, TcpStream::connect(addr)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(source)) => {
            cfg.stats.count_dial_failed();
            return Err(NetError::Connect { addr, source });
        }
        Err(_) => {
            cfg.stats.count_dial_failed();
            return Err(NetError::ConnectTimeout {
                addr,
                after: cfg.connect_timeout,
            });
        }
    };
    if let Err(e) = stream.set_nodelay(true) {
        debug!(peer = %addr, error = %e, "cannot set TCP_NODELAY");
    }
    let (r, w) = stream.into_split();
    let mut rd = FramedRead::new(r, FrameCodec::new(HANDSHAKE_MAX_FRAME));
    let mut wr = FramedWrite::new(w, FrameCodec::new(HANDSHAKE_MAX_FRAME));
    let (mut machine, hello) = ClientHandshake::start(cfg, channel, fresh_nonce());
    let outcome = match timeout(
        cfg.handshake_timeout,
        drive(&mut machine, Some(hello), &mut rd, &mut wr),
    )
    .await
    {
        Ok(outcome) => outcome,
        Err(_) => Err(NetError::HandshakeTimeout {
            after: cfg.handshake_timeout,
        }),
    };
    match outcome {
        Ok(established) => {
            cfg.stats.count_dialed();
            debug!(peer = %addr, node = %established.peer_node, channel, "connected");
            let peer = PeerInfo {
                node: established.peer_node,
                addr,
                channel: established.channel,
            };
            Ok(Conn::new(rd, wr, peer, cfg.max_frame))
        }
        Err(err) => {
            cfg.stats.count_outbound_refusal(&err);
            warn!(peer = %addr, channel, reason = %err, "handshake with a cluster peer failed");
            refuse(&mut wr, &err).await;
            Err(err)
        }
    }
}

/// Connects to a peer that has several addresses (one per network), trying them in order and
/// returning the first connection that authenticates. When all fail, the error lists each
/// address's failure ([`NetError::Unreachable`]).
pub async fn connect(
    cfg: &NetConfig,
    addrs: &[SocketAddr],
    channel: &str,
) -> Result<Conn, NetError> {
    if addrs.is_empty() {
        return Err(NetError::NoAddress);
    }
    let mut failures = Vec::with_capacity(addrs.len());
    for &addr in addrs {
        match connect_addr(cfg, addr, channel).await {
            Ok(conn) => return Ok(conn),
            Err(error) => {
                debug!(peer = %addr, channel, error = %error, "address failed; trying the next");
                failures.push(DialFailure { addr, error });
            }
        }
    }
    Err(NetError::Unreachable { failures })
}

/// Connects like [`connect`], retrying after each failure with `backoff` until it succeeds.
/// Never returns an error: stop it by dropping the future (for example in `select!` with a
/// shutdown signal, or under `tokio::time::timeout`). Errors that only a configuration change
/// can cure (a wrong secret, an unknown channel) are retried too, because the peer may be
/// reconfigured; they are logged at warn on every attempt. The first failure of a series is
/// logged at info, the rest at debug; `backoff` is reset on success.
pub async fn connect_retry(
    cfg: &NetConfig,
    addrs: &[SocketAddr],
    channel: &str,
    backoff: &mut Backoff,
) -> Conn {
    let mut failed_attempts: u64 = 0;
    loop {
        match connect(cfg, addrs, channel).await {
            Ok(conn) => {
                if failed_attempts > 0 {
                    info!(
                        peer = %conn.peer_addr(),
                        node = %conn.peer_node(),
                        channel,
                        failed_attempts,
                        "connected after retrying"
                    );
                }
                backoff.reset();
                return conn;
            }
            Err(error) => {
                failed_attempts += 1;
                let delay = backoff.next_delay();
                if failed_attempts == 1 {
                    info!(channel, error = %error, ?delay, "cannot reach the peer yet; retrying with backoff");
                } else {
                    debug!(channel, error = %error, ?delay, failed_attempts, "still cannot reach the peer");
                }
                sleep(delay).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_its_max_with_bounded_jitter_and_resets() {
        let initial = Duration::from_millis(100);
        let max = Duration::from_secs(1);
        for seed in 0..200 {
            let mut b = Backoff::new(initial, max, 2.0, 0.25).with_seed(seed);
            let mut nominal = initial;
            for _ in 0..10 {
                let d = b.next_delay();
                assert!(d <= nominal, "seed {seed}: {d:?} > {nominal:?}");
                assert!(
                    d >= nominal.mul_f64(0.75) - Duration::from_nanos(1),
                    "seed {seed}: {d:?} too short for {nominal:?}"
                );
                nominal = (nominal * 2).min(max);
            }
            b.reset();
            assert!(b.next_delay() <= initial);
        }
    }

    #[test]
    fn jitter_spreads_the_delays() {
        let mut b =
            Backoff::new(Duration::from_secs(1), Duration::from_secs(1), 1.0, 0.5).with_seed(7);
        let delays: std::collections::BTreeSet<Duration> =
            (0..20).map(|_| b.next_delay()).collect();
        assert!(delays.len() > 10, "{delays:?}");
    }

    #[test]
    fn nonsense_parameters_cannot_make_it_panic_or_shrink() {
        for (factor, jitter) in [
            (f64::NAN, f64::NAN),
            (f64::INFINITY, -1.0),
            (-3.0, 7.0),
            (1e300, -0.5),
        ] {
            let max = Duration::MAX;
            let mut b = Backoff::new(Duration::from_secs(3600), max, factor, jitter).with_seed(1);
            let mut nominal_floor = Duration::ZERO;
            for _ in 0..50 {
                let d = b.next_delay();
                assert!(d <= max);
                if jitter <= 0.0 {
                    // Without jitter the delays never shrink.
                    assert!(
                        d >= nominal_floor,
                        "{factor} {jitter}: {d:?} < {nominal_floor:?}"
                    );
                    nominal_floor = d;
                }
            }
        }
        // max below initial is raised to initial.
        let mut b = Backoff::new(Duration::from_secs(2), Duration::from_secs(1), 2.0, 0.0);
        assert_eq!(b.next_delay(), Duration::from_secs(2));
        assert_eq!(b.next_delay(), Duration::from_secs(2));
    }
}
