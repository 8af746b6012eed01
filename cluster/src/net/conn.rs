//! An established, authenticated connection and its two halves. It owns sending and receiving
//! typed messages and ending a connection whose byte stream can no longer be trusted; it never
//! resynchronises after a framing error (the connection is shut down instead).

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::AsyncWriteExt;

use super::PROTOCOL_VERSION;
use super::error::NetError;
use super::frame::{decode_body, open_envelope};
use super::handshake::{FrameReader, FrameWriter};

/// Who is at the other end, as established by the handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerInfo {
    /// The node name the peer gave (it proved the cluster secret, not this name).
    pub node: String,
    /// The peer's socket address.
    pub addr: SocketAddr,
    /// The channel the connection was opened for.
    pub channel: String,
}

/// An established connection. Use it as a whole for request/response, or split it so that
/// reading and writing run in separate tasks.
#[derive(Debug)]
pub struct Conn {
    tx: ConnSender,
    rx: ConnReceiver,
}

/// The sending half of a [`Conn`]. Dropping it closes the sending direction: the peer receives
/// what was flushed, then [`NetError::Closed`]. Frames queued with [`ConnSender::feed`] and not
/// flushed are lost on drop; [`ConnSender::close`] flushes first.
pub struct ConnSender {
    io: FrameWriter,
    peer: Arc<PeerInfo>,
}

/// The receiving half of a [`Conn`].
pub struct ConnReceiver {
    io: FrameReader,
    peer: Arc<PeerInfo>,
    broken: bool,
}

// By hand: the derived form would print the socket buffers (up to a whole frame of bytes).
impl fmt::Debug for ConnSender {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnSender")
            .field("peer", &self.peer)
            .field("queued_bytes", &self.io.write_buffer().len())
            .finish()
    }
}

impl fmt::Debug for ConnReceiver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnReceiver")
            .field("peer", &self.peer)
            .field("buffered_bytes", &self.io.read_buffer().len())
            .field("broken", &self.broken)
            .finish()
    }
}

impl Conn {
    pub(crate) fn new(
        mut rd: FrameReader,
        mut wr: FrameWriter,
        peer: PeerInfo,
        max_frame: usize,
    ) -> Conn {
        rd.decoder_mut().set_max_frame(max_frame);
        wr.encoder_mut().set_max_frame(max_frame);
        let peer = Arc::new(peer);
        Conn {
            tx: ConnSender {
                io: wr,
                peer: Arc::clone(&peer),
            },
            rx: ConnReceiver {
                io: rd,
                peer,
                broken: false,
            },
        }
    }

    /// The peer as established by the handshake.
    pub fn peer(&self) -> &PeerInfo {
        &self.tx.peer
    }

    /// The node name the peer gave in the handshake.
    pub fn peer_node(&self) -> &str {
        &self.tx.peer.node
    }

    /// The peer's socket address.
    pub fn peer_addr(&self) -> SocketAddr {
        self.tx.peer.addr
    }

    /// The channel this connection serves.
    pub fn channel(&self) -> &str {
        &self.tx.peer.channel
    }

    /// Sends one message; see [`ConnSender::send`].
    pub async fn send<T: Serialize + ?Sized>(&mut self, msg: &T) -> Result<(), NetError> {
        self.tx.send(msg).await
    }

    /// Receives one message; see [`ConnReceiver::recv`].
    pub async fn recv<T: DeserializeOwned>(&mut self) -> Result<T, NetError> {
        self.rx.recv().await
    }

    /// Splits the connection so that reading and writing run in separate tasks.
    pub fn into_split(self) -> (ConnSender, ConnReceiver) {
        (self.tx, self.rx)
    }
}

impl ConnSender {
    /// The peer as established by the handshake.
    pub fn peer(&self) -> &PeerInfo {
        &self.peer
    }

    /// Sends one message and flushes. A message whose frame would exceed the configured
    /// `max_frame` fails with [`NetError::FrameTooLarge`] and sends nothing; the connection stays
    /// usable. Waits while the peer does not read (TCP flow control): bound it with a timeout
    /// where a stuck peer matters. If the future is cancelled, the frame may still be queued
    /// and goes out with the next send or flush, whole.
    pub async fn send<T: Serialize + ?Sized>(&mut self, msg: &T) -> Result<(), NetError> {
        self.io.send(msg).await
    }

    /// Queues one message without flushing (it goes out when the buffer fills or on
    /// [`ConnSender::flush`]): for batches, so many small messages cost one write.
    pub async fn feed<T: Serialize + ?Sized>(&mut self, msg: &T) -> Result<(), NetError> {
        self.io.feed(msg).await
    }

    /// The raw socket, for tests that must write what no well-behaved sender writes.
    #[cfg(test)]
    pub(crate) fn io_for_tests(&mut self) -> &mut tokio::net::tcp::OwnedWriteHalf {
        self.io.get_mut()
    }

    /// Writes out every queued message.
    pub async fn flush(&mut self) -> Result<(), NetError> {
        SinkExt::<&()>::flush(&mut self.io).await
    }

    /// Flushes, then closes the sending direction; the peer reads everything sent, then
    /// [`NetError::Closed`].
    pub async fn close(&mut self) -> Result<(), NetError> {
        self.flush().await?;
        self.io.get_mut().shutdown().await?;
        Ok(())
    }
}

impl ConnReceiver {
    /// The peer as established by the handshake.
    pub fn peer(&self) -> &PeerInfo {
        &self.peer
    }

    /// Receives one message. Cancel-safe (usable in `select!`): a partly received frame stays
    /// buffered for the next call. A body that does not decode as `T` ([`NetError::Decode`],
    /// or [`NetError::Malformed`] when bytes follow the message) leaves the connection usable. [`NetError::Closed`] means the
    /// peer closed its sending direction (this side may still send). Everything else (a frame
    /// above the limit, a truncated frame, an envelope of another version or no envelope at
    /// all, a socket error) ends the connection: the socket is shut down in both directions.
    /// After any of these, later calls return [`NetError::Closed`].
    pub async fn recv<T: DeserializeOwned>(&mut self) -> Result<T, NetError> {
        let body = self.recv_body().await?;
        decode_body(&body)
    }

    /// Receives one message's body as MessagePack bytes, envelope checked and stripped, for a
    /// caller that stores or forwards bodies without decoding them (decode later with
    /// [`crate::net::decode_body`]). Same cancel-safety and errors as [`ConnReceiver::recv`].
    pub async fn recv_body(&mut self) -> Result<Bytes, NetError> {
        if self.broken {
            return Err(NetError::Closed);
        }
        let frame = match self.io.next().await {
            Some(Ok(frame)) => frame,
            Some(Err(e)) => return Err(self.fail(e)),
            None => return Err(self.fail(NetError::Closed)),
        };
        let frame = frame.freeze();
        let body_start = match open_envelope(&frame) {
            Ok((PROTOCOL_VERSION, body)) => frame.len() - body.len(),
            Ok((theirs, _)) => {
                return Err(self.fail(NetError::Version {
                    ours: PROTOCOL_VERSION,
                    theirs,
                }));
            }
            Err(e) => return Err(self.fail(e)),
        };
        Ok(frame.slice(body_start..))
    }

    fn fail(&mut self, err: NetError) -> NetError {
        if !self.broken {
            self.broken = true;
            if !matches!(err, NetError::Closed) {
                let stream: &tokio::net::TcpStream = self.io.get_ref().as_ref();
                // Both directions: a peer that sent a bad frame must not keep the connection
                // half-open. The socket may already be dead, which is fine.
                let _ = rustix::net::shutdown(stream, rustix::net::Shutdown::Both);
            }
            match &err {
                NetError::Closed => {}
                // A lost link is not the peer misbehaving.
                NetError::Io(_) => tracing::debug!(
                    peer = %self.peer.addr,
                    node = %self.peer.node,
                    channel = %self.peer.channel,
                    error = %err,
                    "connection lost"
                ),
                _ => tracing::warn!(
                    peer = %self.peer.addr,
                    node = %self.peer.node,
                    channel = %self.peer.channel,
                    error = %err,
                    "closing the connection after a bad frame"
                ),
            }
        }
        err
    }
}
