//! The mutual challenge/response handshake: the messages, the proofs, and one small state
//! machine per side (messages in, messages out, no I/O, no clock), plus the thin async driver
//! that runs a machine over a socket. It never lets a connection through before both proofs
//! verified, and never compares a proof other than in constant time.

use futures_util::{SinkExt, StreamExt};
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::time::{Duration, timeout};
use tokio_util::codec::{FramedRead, FramedWrite};

use super::error::NetError;
use super::frame::{FrameCodec, decode_body, open_envelope};
use super::{NetConfig, PROTOCOL_VERSION, Secret, wire_name};

/// Bytes of a nonce and of a proof (HMAC-SHA256 output).
pub(crate) const NONCE_LEN: usize = 32;
pub(crate) const PROOF_LEN: usize = 32;
/// Domain separation of the proofs from any other use of the secret.
const PROOF_LABEL: &[u8] = b"ftkit-net-handshake\0";
/// How long this node tries to tell a refused peer why, so that a peer that does not read
/// cannot hold the refusing task.
const REFUSAL_WRITE_TIMEOUT: Duration = Duration::from_secs(1);
/// The longest `detail` of a refusal this node sends; the frame must fit the handshake limit.
const MAX_REFUSAL_DETAIL: usize = 512;

pub(crate) type Nonce = [u8; NONCE_LEN];
pub(crate) type Proof = [u8; PROOF_LEN];
pub(crate) type FrameReader = FramedRead<OwnedReadHalf, FrameCodec>;
pub(crate) type FrameWriter = FramedWrite<OwnedWriteHalf, FrameCodec>;

type HmacSha256 = Hmac<Sha256>;

/// The handshake messages (bodies of the envelope); see the module doc of [`crate::net`] for
/// their encoding.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum HandshakeMsg {
    Hello {
        cluster: String,
        node: String,
        channel: String,
        #[serde(with = "serde_bytes")]
        nonce: Nonce,
    },
    Challenge {
        node: String,
        #[serde(with = "serde_bytes")]
        nonce: Nonce,
        #[serde(with = "serde_bytes")]
        proof: Proof,
    },
    Response {
        #[serde(with = "serde_bytes")]
        proof: Proof,
    },
    Welcome {},
    Refuse {
        code: String,
        detail: String,
    },
}

impl HandshakeMsg {
    fn kind(&self) -> &'static str {
        match self {
            HandshakeMsg::Hello { .. } => "hello",
            HandshakeMsg::Challenge { .. } => "challenge",
            HandshakeMsg::Response { .. } => "response",
            HandshakeMsg::Welcome {} => "welcome",
            HandshakeMsg::Refuse { .. } => "refuse",
        }
    }

    /// The refusal that tells the peer why this node ends the handshake with `err`, if the
    /// error is one that is told.
    pub(crate) fn refusal_for(err: &NetError) -> Option<HandshakeMsg> {
        let code = err.refuse_code()?;
        let mut detail = err.to_string();
        if detail.len() > MAX_REFUSAL_DETAIL {
            let mut end = MAX_REFUSAL_DETAIL;
            while !detail.is_char_boundary(end) {
                end -= 1;
            }
            detail.truncate(end);
        }
        Some(HandshakeMsg::Refuse {
            code: code.to_owned(),
            detail,
        })
    }
}

/// Decodes a handshake frame. A frame of another version is a version mismatch, unless it is a
/// refusal (whose layout every version keeps): then the peer's reason is passed on.
pub(crate) fn decode_handshake(frame: &[u8]) -> Result<HandshakeMsg, NetError> {
    let (version, body) = open_envelope(frame)?;
    if version != PROTOCOL_VERSION {
        return match decode_body::<HandshakeMsg>(body) {
            Ok(refuse @ HandshakeMsg::Refuse { .. }) => Ok(refuse),
            _ => Err(NetError::Version {
                ours: PROTOCOL_VERSION,
                theirs: version,
            }),
        };
    }
    decode_body(body)
}

/// Everything both proofs cover: a proof is only valid for this cluster, channel, pair of
/// nodes and pair of nonces.
struct Transcript<'a> {
    cluster: &'a str,
    channel: &'a str,
    client_node: &'a str,
    server_node: &'a str,
    client_nonce: &'a Nonce,
    server_nonce: &'a Nonce,
}

#[derive(Debug, Clone, Copy)]
enum Role {
    Server,
    Client,
}

impl Transcript<'_> {
    fn mac(&self, secret: &Secret, role: Role) -> HmacSha256 {
        let mut mac =
            HmacSha256::new_from_slice(secret.expose()).expect("HMAC accepts keys of any length");
        mac.update(PROOF_LABEL);
        mac.update(match role {
            Role::Server => b"server",
            Role::Client => b"client",
        });
        mac.update(&[0]);
        mac.update(&PROTOCOL_VERSION.to_be_bytes());
        for part in [
            self.cluster,
            self.channel,
            self.client_node,
            self.server_node,
        ] {
            // Names are at most MAX_NAME_LEN bytes (checked before a transcript is built).
            let len = u32::try_from(part.len()).unwrap_or(u32::MAX);
            mac.update(&len.to_be_bytes());
            mac.update(part.as_bytes());
        }
        mac.update(self.client_nonce);
        mac.update(self.server_nonce);
        mac
    }

    fn prove(&self, secret: &Secret, role: Role) -> Proof {
        self.mac(secret, role).finalize().into_bytes().into()
    }

    fn verify(&self, secret: &Secret, role: Role, proof: &Proof) -> Result<(), NetError> {
        // `verify_slice` compares in constant time.
        self.mac(secret, role)
            .verify_slice(proof)
            .map_err(|_| NetError::BadProof)
    }
}

/// What a machine wants done after a message.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Step {
    /// Send this and wait for the next message.
    Send(HandshakeMsg),
    /// The handshake succeeded; send `reply` (if any), then the connection is open.
    Established(Established),
}

#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Established {
    pub(crate) reply: Option<HandshakeMsg>,
    pub(crate) peer_node: String,
    pub(crate) channel: String,
}

/// One side of the handshake: consumes the peer's messages in order.
pub(crate) trait Machine {
    fn on_message(&mut self, msg: HandshakeMsg) -> Result<Step, NetError>;
}

/// The dialing side.
#[derive(Debug)]
pub(crate) struct ClientHandshake<'a> {
    cfg: &'a NetConfig,
    channel: &'a str,
    nonce: Nonce,
    state: ClientState,
}

#[derive(Debug)]
enum ClientState {
    AwaitChallenge,
    AwaitWelcome { server_node: String },
    Finished,
}

impl<'a> ClientHandshake<'a> {
    /// Starts a handshake for `channel`; the returned `hello` is the first message to send.
    pub(crate) fn start(
        cfg: &'a NetConfig,
        channel: &'a str,
        nonce: Nonce,
    ) -> (ClientHandshake<'a>, HandshakeMsg) {
        let hello = HandshakeMsg::Hello {
            cluster: cfg.cluster.clone(),
            node: cfg.node.clone(),
            channel: channel.to_owned(),
            nonce,
        };
        let machine = ClientHandshake {
            cfg,
            channel,
            nonce,
            state: ClientState::AwaitChallenge,
        };
        (machine, hello)
    }
}

impl Machine for ClientHandshake<'_> {
    fn on_message(&mut self, msg: HandshakeMsg) -> Result<Step, NetError> {
        // Any error leaves the machine finished: a failed handshake is never resumed.
        let state = std::mem::replace(&mut self.state, ClientState::Finished);
        match (state, msg) {
            (_, HandshakeMsg::Refuse { code, detail }) => {
                Err(NetError::PeerRefused { code, detail })
            }
            (ClientState::AwaitChallenge, HandshakeMsg::Challenge { node, nonce, proof }) => {
                wire_name("server node name", &node)?;
                let transcript = Transcript {
                    cluster: &self.cfg.cluster,
                    channel: self.channel,
                    client_node: &self.cfg.node,
                    server_node: &node,
                    client_nonce: &self.nonce,
                    server_nonce: &nonce,
                };
                transcript.verify(&self.cfg.secret, Role::Server, &proof)?;
                let proof = transcript.prove(&self.cfg.secret, Role::Client);
                self.state = ClientState::AwaitWelcome { server_node: node };
                Ok(Step::Send(HandshakeMsg::Response { proof }))
            }
            (ClientState::AwaitWelcome { server_node }, HandshakeMsg::Welcome {}) => {
                Ok(Step::Established(Established {
                    reply: None,
                    peer_node: server_node,
                    channel: self.channel.to_owned(),
                }))
            }
            (state, msg) => Err(NetError::UnexpectedMessage {
                expected: match state {
                    ClientState::AwaitChallenge => "challenge",
                    ClientState::AwaitWelcome { .. } => "welcome",
                    ClientState::Finished => "nothing (the handshake is over)",
                },
                got: msg.kind(),
            }),
        }
    }
}

/// The listening side. `channel_open` tells whether a channel has a receiver; it is asked only
/// after the client proved the secret.
pub(crate) struct ServerHandshake<'a, F> {
    cfg: &'a NetConfig,
    nonce: Nonce,
    channel_open: F,
    state: ServerState,
    claimed: Option<(String, String)>,
}

impl<F> std::fmt::Debug for ServerHandshake<'_, F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerHandshake")
            .field("state", &self.state)
            .field("claimed", &self.claimed)
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
enum ServerState {
    AwaitHello,
    AwaitResponse {
        client_node: String,
        channel: String,
        client_nonce: Nonce,
    },
    Finished,
}

impl<'a, F: Fn(&str) -> bool> ServerHandshake<'a, F> {
    pub(crate) fn new(cfg: &'a NetConfig, nonce: Nonce, channel_open: F) -> Self {
        ServerHandshake {
            cfg,
            nonce,
            channel_open,
            state: ServerState::AwaitHello,
            claimed: None,
        }
    }

    /// The node and channel the client named in its `hello` (unauthenticated until the
    /// handshake succeeds): for log lines about a refusal.
    pub(crate) fn claimed(&self) -> Option<(&str, &str)> {
        self.claimed
            .as_ref()
            .map(|(node, channel)| (node.as_str(), channel.as_str()))
    }
}

impl<F: Fn(&str) -> bool> Machine for ServerHandshake<'_, F> {
    fn on_message(&mut self, msg: HandshakeMsg) -> Result<Step, NetError> {
        let state = std::mem::replace(&mut self.state, ServerState::Finished);
        match (state, msg) {
            (_, HandshakeMsg::Refuse { code, detail }) => {
                Err(NetError::PeerRefused { code, detail })
            }
            (
                ServerState::AwaitHello,
                HandshakeMsg::Hello {
                    cluster,
                    node,
                    channel,
                    nonce,
                },
            ) => {
                wire_name("cluster name", &cluster)?;
                wire_name("client node name", &node)?;
                wire_name("channel name", &channel)?;
                self.claimed = Some((node.clone(), channel.clone()));
                if cluster != self.cfg.cluster {
                    return Err(NetError::WrongCluster {
                        ours: self.cfg.cluster.clone(),
                        theirs: cluster,
                    });
                }
                let proof = Transcript {
                    cluster: &self.cfg.cluster,
                    channel: &channel,
                    client_node: &node,
                    server_node: &self.cfg.node,
                    client_nonce: &nonce,
                    server_nonce: &self.nonce,
                }
                .prove(&self.cfg.secret, Role::Server);
                self.state = ServerState::AwaitResponse {
                    client_node: node,
                    channel,
                    client_nonce: nonce,
                };
                Ok(Step::Send(HandshakeMsg::Challenge {
                    node: self.cfg.node.clone(),
                    nonce: self.nonce,
                    proof,
                }))
            }
            (
                ServerState::AwaitResponse {
                    client_node,
                    channel,
                    client_nonce,
                },
                HandshakeMsg::Response { proof },
            ) => {
                Transcript {
                    cluster: &self.cfg.cluster,
                    channel: &channel,
                    client_node: &client_node,
                    server_node: &self.cfg.node,
                    client_nonce: &client_nonce,
                    server_nonce: &self.nonce,
                }
                .verify(&self.cfg.secret, Role::Client, &proof)?;
                if !(self.channel_open)(&channel) {
                    return Err(NetError::UnknownChannel { channel });
                }
                Ok(Step::Established(Established {
                    reply: Some(HandshakeMsg::Welcome {}),
                    peer_node: client_node,
                    channel,
                }))
            }
            (state, msg) => Err(NetError::UnexpectedMessage {
                expected: match state {
                    ServerState::AwaitHello => "hello",
                    ServerState::AwaitResponse { .. } => "response",
                    ServerState::Finished => "nothing (the handshake is over)",
                },
                got: msg.kind(),
            }),
        }
    }
}

/// A fresh nonce from the thread's CSPRNG (ChaCha, seeded and reseeded from the OS).
pub(crate) fn fresh_nonce() -> Nonce {
    rand::random()
}

/// Runs `machine` over a connection until it is established or fails; `first` is sent before
/// the first message is awaited. No timeout here: the caller bounds the whole handshake.
pub(crate) async fn drive(
    machine: &mut impl Machine,
    first: Option<HandshakeMsg>,
    rd: &mut FrameReader,
    wr: &mut FrameWriter,
) -> Result<Established, NetError> {
    if let Some(msg) = first {
        wr.send(&msg).await?;
    }
    loop {
        let frame = rd.next().await.ok_or(NetError::Closed)??;
        let msg = decode_handshake(&frame)?;
        match machine.on_message(msg)? {
            Step::Send(reply) => wr.send(&reply).await?,
            Step::Established(established) => {
                if let Some(reply) = &established.reply {
                    wr.send(reply).await?;
                }
                return Ok(established);
            }
        }
    }
}

/// Tells the peer why the handshake ends (when the error is one that is told) and closes this
/// side's writing half; best effort and bounded in time.
pub(crate) async fn refuse(wr: &mut FrameWriter, err: &NetError) {
    if let Some(msg) = HandshakeMsg::refusal_for(err) {
        // The peer may be gone or not reading; either way there is nothing more to do.
        let _ = timeout(REFUSAL_WRITE_TIMEOUT, wr.send(&msg)).await;
    }
    let _ = timeout(REFUSAL_WRITE_TIMEOUT, wr.get_mut().shutdown()).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::{NetConfig, Secret};

    fn cfg(cluster: &str, node: &str, secret: &[u8]) -> NetConfig {
        NetConfig::new(cluster, node, Secret::new(secret).expect("long enough")).expect("valid")
    }

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";
    const OTHER_SECRET: &[u8] = b"fedcba9876543210fedcba9876543210";

    /// Runs both machines against each other without sockets; returns each side's outcome.
    fn exchange(
        client_cfg: &NetConfig,
        server_cfg: &NetConfig,
        channel: &str,
        open: &[&str],
    ) -> (Result<Established, NetError>, Result<Established, NetError>) {
        let open_fn = |ch: &str| open.contains(&ch);
        let (mut client, hello) = ClientHandshake::start(client_cfg, channel, [1; NONCE_LEN]);
        let mut server = ServerHandshake::new(server_cfg, [2; NONCE_LEN], open_fn);
        let mut to_server = Some(hello);
        let mut client_result = None;
        let mut server_result = None;
        for _ in 0..4 {
            let Some(msg) = to_server.take() else { break };
            let to_client = match server.on_message(msg) {
                Ok(Step::Send(m)) => m,
                Ok(Step::Established(e)) => {
                    let welcome = e.reply.clone().expect("server replies welcome");
                    server_result = Some(Ok(e));
                    welcome
                }
                Err(e) => {
                    let refusal = HandshakeMsg::refusal_for(&e);
                    server_result = Some(Err(e));
                    match refusal {
                        Some(r) => r,
                        None => break,
                    }
                }
            };
            match client.on_message(to_client) {
                Ok(Step::Send(m)) => to_server = Some(m),
                Ok(Step::Established(e)) => client_result = Some(Ok(e)),
                Err(e) => {
                    to_server = HandshakeMsg::refusal_for(&e);
                    client_result = Some(Err(e));
                }
            }
        }
        (
            client_result.expect("client finished"),
            server_result.expect("server finished"),
        )
    }

    #[test]
    fn matching_secrets_establish_both_sides() {
        let a = cfg("prod", "a", SECRET);
        let b = cfg("prod", "b", SECRET);
        let (client, server) = exchange(&a, &b, "repl/data", &["repl/data"]);
        let client = client.expect("client established");
        let server = server.expect("server established");
        assert_eq!(client.peer_node, "b");
        assert_eq!(server.peer_node, "a");
        assert_eq!(client.channel, "repl/data");
        assert_eq!(server.channel, "repl/data");
    }

    #[test]
    fn wrong_secret_is_caught_by_the_client_and_told_to_the_server() {
        let a = cfg("prod", "a", OTHER_SECRET);
        let b = cfg("prod", "b", SECRET);
        let (client, server) = exchange(&a, &b, "x", &["x"]);
        assert!(matches!(client, Err(NetError::BadProof)));
        match server {
            Err(e @ NetError::PeerRefused { .. }) => {
                assert_eq!(e.refusal_kind(), Some(crate::net::RefusalKind::Auth));
            }
            other => panic!("server: {other:?}"),
        }
    }

    #[test]
    fn wrong_cluster_and_unknown_channel_are_refused_by_the_server() {
        let a = cfg("test", "a", SECRET);
        let b = cfg("prod", "b", SECRET);
        let (client, server) = exchange(&a, &b, "x", &["x"]);
        assert!(matches!(server, Err(NetError::WrongCluster { .. })));
        assert!(matches!(client, Err(NetError::PeerRefused { ref code, .. }) if code == "cluster"));

        let a = cfg("prod", "a", SECRET);
        let (client, server) = exchange(&a, &b, "nope", &["x"]);
        assert!(matches!(server, Err(NetError::UnknownChannel { .. })));
        assert!(matches!(client, Err(NetError::PeerRefused { ref code, .. }) if code == "channel"));
    }

    #[test]
    fn a_response_replayed_from_another_connection_is_refused() {
        let a = cfg("prod", "a", SECRET);
        let b = cfg("prod", "b", SECRET);
        let open = |_: &str| true;
        // Record a good session.
        let (mut client, hello) = ClientHandshake::start(&a, "x", [1; NONCE_LEN]);
        let mut server = ServerHandshake::new(&b, [2; NONCE_LEN], open);
        let Ok(Step::Send(challenge)) = server.on_message(hello.clone()) else {
            panic!("challenge expected")
        };
        let Ok(Step::Send(response)) = client.on_message(challenge) else {
            panic!("response expected")
        };
        // Replay it against a server with a fresh nonce.
        let mut server2 = ServerHandshake::new(&b, [3; NONCE_LEN], open);
        assert!(matches!(server2.on_message(hello), Ok(Step::Send(_))));
        assert!(matches!(
            server2.on_message(response),
            Err(NetError::BadProof)
        ));
    }

    #[test]
    fn a_tampered_challenge_is_refused_by_the_client() {
        let a = cfg("prod", "a", SECRET);
        let b = cfg("prod", "b", SECRET);
        let (mut client, hello) = ClientHandshake::start(&a, "x", [1; NONCE_LEN]);
        let mut server = ServerHandshake::new(&b, [2; NONCE_LEN], |_: &str| true);
        let Ok(Step::Send(HandshakeMsg::Challenge { nonce, proof, .. })) = server.on_message(hello)
        else {
            panic!("challenge expected")
        };
        let forged = HandshakeMsg::Challenge {
            node: "c".into(),
            nonce,
            proof,
        };
        assert!(matches!(client.on_message(forged), Err(NetError::BadProof)));
    }

    #[test]
    fn messages_out_of_order_are_refused() {
        let a = cfg("prod", "a", SECRET);
        let (mut client, hello) = ClientHandshake::start(&a, "x", [1; NONCE_LEN]);
        assert!(matches!(
            client.on_message(HandshakeMsg::Welcome {}),
            Err(NetError::UnexpectedMessage {
                expected: "challenge",
                got: "welcome"
            })
        ));
        let mut server = ServerHandshake::new(&a, [2; NONCE_LEN], |_: &str| true);
        assert!(matches!(
            server.on_message(HandshakeMsg::Response { proof: [0; 32] }),
            Err(NetError::UnexpectedMessage { .. })
        ));
        // A finished machine accepts nothing more.
        assert!(server.on_message(hello).is_err());
    }

    #[test]
    fn bad_names_in_a_hello_are_malformed() {
        let b = cfg("prod", "b", SECRET);
        for (cluster, node, channel) in [
            ("", "a", "x"),
            ("prod", "a\nb", "x"),
            ("prod", "a", &*"c".repeat(256)),
        ] {
            let mut server = ServerHandshake::new(&b, [2; NONCE_LEN], |_: &str| true);
            let hello = HandshakeMsg::Hello {
                cluster: cluster.into(),
                node: node.into(),
                channel: channel.into(),
                nonce: [0; NONCE_LEN],
            };
            assert!(matches!(
                server.on_message(hello),
                Err(NetError::Malformed { .. })
            ));
        }
    }

    #[test]
    fn the_documented_hello_frame_is_what_is_sent() {
        use bytes::BytesMut;
        use tokio_util::codec::Encoder;

        let hello = HandshakeMsg::Hello {
            cluster: "c".into(),
            node: "n".into(),
            channel: "x".into(),
            nonce: [0; NONCE_LEN],
        };
        let mut buf = BytesMut::new();
        FrameCodec::new(4096)
            .encode(&hello, &mut buf)
            .expect("encodes");
        let mut expected = vec![0, 0, 0, 0x32, 0x92, 0x01, 0x81, 0xa5];
        expected.extend_from_slice(b"hello");
        expected.extend_from_slice(&[0x94, 0xa1, b'c', 0xa1, b'n', 0xa1, b'x', 0xc4, 0x20]);
        expected.extend_from_slice(&[0; 32]);
        assert_eq!(&buf[..], &expected[..]);
        assert_eq!(decode_handshake(&buf[4..]).expect("decodes"), hello);
        // `welcome` is an empty array under its name.
        let mut buf = BytesMut::new();
        FrameCodec::new(4096)
            .encode(&HandshakeMsg::Welcome {}, &mut buf)
            .expect("encodes");
        let mut expected = vec![0, 0, 0, 12, 0x92, 0x01, 0x81, 0xa7];
        expected.extend_from_slice(b"welcome");
        expected.push(0x90);
        assert_eq!(&buf[..], &expected[..]);
    }

    #[test]
    fn a_refusal_in_another_version_is_passed_on_other_frames_are_a_mismatch() {
        use bytes::BytesMut;
        use tokio_util::codec::Encoder;

        let mut codec = FrameCodec::new(4096).with_version(PROTOCOL_VERSION + 1);
        let mut buf = BytesMut::new();
        let refuse = HandshakeMsg::Refuse {
            code: "version".into(),
            detail: "speak 2".into(),
        };
        codec.encode(&refuse, &mut buf).expect("encodes");
        assert_eq!(decode_handshake(&buf[4..]).expect("refusal"), refuse);
        let mut buf = BytesMut::new();
        codec
            .encode(&HandshakeMsg::Welcome {}, &mut buf)
            .expect("encodes");
        assert!(matches!(
            decode_handshake(&buf[4..]),
            Err(NetError::Version { ours: 1, theirs: 2 })
        ));
    }
}
