//! Lanes: a direct, encrypted TCP connection between two nodes that carries
//! a large run of `/tern/store/1` pushes (a new replica catching up, a
//! replica back after days away) beside their libp2p connection.
//!
//! Over libp2p every byte of a push goes through Yamux, which cuts it into
//! 16 KiB frames, and libp2p's Noise layer, which copies each frame twice
//! and seals it with ChaCha20-Poly1305: most of a catch-up's CPU on both
//! ends. A lane carries the same requests and answers, encoded the same
//! way, in Noise transport messages of up to 64 KiB sealed with AES-GCM
//! (which this machine class runs in hardware), one `write` per push.
//!
//! Opening one (see `docs/architecture.md`, "Lanes"):
//! 1. The pusher asks over libp2p (`StoreRequest::OpenLane`); the receiver
//!    answers with a [`LaneOffer`]: a port, a one-time lane id and a fresh
//!    32-byte key. libp2p authenticated both ends and encrypted the answer,
//!    so only that peer knows the key.
//! 2. The pusher connects to the port at the receiver's address and sends
//!    [`MAGIC`], the lane id and the first message of a
//!    `Noise_NNpsk0_25519_AESGCM_SHA256` handshake keyed with that key; the
//!    prologue names both peers. The receiver takes the id out of its table
//!    (a replayed id finds nothing), and a wrong key or peer fails the
//!    handshake. Both ends then hold keys no one else has, from a fresh
//!    Diffie-Hellman exchange.
//! 3. The pusher sends requests; the receiver hands each to the cloud
//!    service as if it came over libp2p from that peer (same checks, same
//!    hosting policy) and writes the answers back in order.
//!
//! A message on a lane is its length (4 bytes, big-endian) and its bytes,
//! cut into Noise transport messages of at most 65,535 bytes, each sent as
//! a 2-byte length and the sealed bytes. Nonces count up from zero in each
//! direction; a frame altered, dropped or replayed does not open, and the
//! lane closes.

use std::{
    collections::HashMap,
    io::IoSlice,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use libp2p::PeerId;
use ring::aead;
use serde::{Deserialize, Serialize};
use snow::resolvers::{DefaultResolver, FallbackResolver, RingResolver};
use tern_protocol::Record;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{
        TcpListener, TcpStream,
        tcp::{OwnedReadHalf, OwnedWriteHalf},
    },
    sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot, watch},
};
use tracing::{debug, info, warn};
use zeroize::Zeroize;

use crate::{
    cloud::{
        service::{Answer, InboundStore},
        wire::{EncodedPush, StoreRequest, StoreResponse},
    },
    metrics::LaneMetrics,
};

/// The Noise protocol of a lane's handshake and transport.
const NOISE_PARAMS: &str = "Noise_NNpsk0_25519_AESGCM_SHA256";
/// What a lane connection starts with.
const MAGIC: &[u8; 8] = b"tern-ln1";
/// Largest Noise message, and the tag each carries.
const NOISE_MAX: usize = 65_535;
const TAG: usize = 16;
/// Plaintext bytes per frame.
const CHUNK: usize = NOISE_MAX - TAG;
/// Time to finish the handshake once connected.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Most connections in their handshake at once: strangers cannot hold
/// the lanes' slots, which are taken only after it.
const MAX_HANDSHAKES: usize = 8;
/// Longest wait for an answer, or for the other end to take a message: as
/// over libp2p, after this the request fails (and the lane closes).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);
/// An offer not taken up within this is forgotten.
const OFFER_TTL: Duration = Duration::from_secs(30);
/// Most offers waiting to be taken up, in all and per peer.
const MAX_OFFERS: usize = 64;
const MAX_OFFERS_PER_PEER: usize = 2;
/// Most lanes a node serves at once, and to one peer (offers waiting
/// included).
const MAX_LANES: usize = 32;
const MAX_LANES_PER_PEER: usize = 2;
/// Most requests a lane carries before their answers come back (the
/// pusher sends at most four).
const MAX_LANE_IN_FLIGHT: usize = 4;
/// A lane with no request for this long is closed by the pusher; the
/// receiver closes one silent for twice as long.
const IDLE: Duration = Duration::from_secs(30);

/// What a receiver offers a pusher: where to connect and with what key.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LaneOffer {
    pub port: u16,
    pub id: [u8; 16],
    pub key: [u8; 32],
}

impl Drop for LaneOffer {
    fn drop(&mut self) {
        self.key.zeroize();
    }
}

impl std::fmt::Debug for LaneOffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LaneOffer")
            .field("port", &self.port)
            .field("id", &crate::hex::hex(&self.id))
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LaneError {
    #[error("lane I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("lane handshake failed: {0}")]
    Handshake(String),
    #[error("a lane message of {0} bytes is over the limit of {1}")]
    TooLong(usize, usize),
    #[error("a lane frame does not open (altered, dropped or replayed)")]
    Decrypt,
    #[error("a lane frame is malformed: {0}")]
    Malformed(&'static str),
    #[error("bad message on a lane: {0}")]
    Decode(String),
    #[error("the lane timed out")]
    Timeout,
    #[error("the lane is closed")]
    Closed,
}

fn handshake_error(e: snow::Error) -> LaneError {
    LaneError::Handshake(e.to_string())
}

/// A handshake for a lane keyed with `key`, its prologue naming the lane
/// and both peers.
fn handshake_state(
    key: &[u8; 32],
    prologue: &[u8],
    initiator: bool,
) -> Result<snow::HandshakeState, LaneError> {
    let params = NOISE_PARAMS.parse().expect("valid Noise parameters");
    // Ring for AES-GCM and SHA-256 (hardware AES), snow's own X25519.
    let resolver = FallbackResolver::new(Box::new(RingResolver), Box::new(DefaultResolver));
    let builder = snow::Builder::with_resolver(params, Box::new(resolver))
        .psk(0, key)
        .map_err(handshake_error)?
        .prologue(prologue)
        .map_err(handshake_error)?;
    if initiator {
        builder.build_initiator()
    } else {
        builder.build_responder()
    }
    .map_err(handshake_error)
}

fn prologue(id: &[u8; 16], receiver: &PeerId, pusher: &PeerId) -> Vec<u8> {
    let mut p = MAGIC.to_vec();
    p.extend_from_slice(id);
    for peer in [receiver, pusher] {
        let bytes = peer.to_bytes();
        p.push(bytes.len() as u8);
        p.extend_from_slice(&bytes);
    }
    p
}

// ------------------------------------------------------------------ frames

/// One direction's transport key after the handshake: AES-256-GCM exactly
/// as Noise's transport messages use it (nonce: four zero bytes and the
/// counter, big-endian; no associated data). Sealed and opened in the
/// message's own buffer: snow's transport copies every frame into another
/// buffer first, two of a catch-up's passes over its bytes.
struct Direction {
    key: aead::LessSafeKey,
    nonce: u64,
}

impl Direction {
    fn new(key: &[u8; 32]) -> Self {
        let unbound = aead::UnboundKey::new(&aead::AES_256_GCM, key).expect("a 32-byte key");
        Self {
            key: aead::LessSafeKey::new(unbound),
            nonce: 0,
        }
    }

    fn next_nonce(&mut self) -> aead::Nonce {
        let mut n = [0u8; 12];
        n[4..].copy_from_slice(&self.nonce.to_be_bytes());
        // 2^64 frames of 64 KiB are never sent on one lane.
        self.nonce += 1;
        aead::Nonce::assume_unique_for_key(n)
    }

    fn seal(&mut self, plain: &mut [u8]) -> aead::Tag {
        let nonce = self.next_nonce();
        self.key
            .seal_in_place_separate_tag(nonce, aead::Aad::empty(), plain)
            .expect("a frame is far below AES-GCM's limit")
    }

    /// Opens `frame` (its sealed bytes and tag) in place; the plaintext is
    /// its first `frame.len() - TAG` bytes.
    fn open(&mut self, frame: &mut [u8]) -> Result<usize, LaneError> {
        let nonce = self.next_nonce();
        self.key
            .open_in_place(nonce, aead::Aad::empty(), frame)
            .map(|plain| plain.len())
            .map_err(|_| LaneError::Decrypt)
    }
}

/// The keys of both directions from a finished handshake.
fn directions(hs: &mut snow::HandshakeState) -> Result<(Direction, Direction), LaneError> {
    if !hs.is_handshake_finished() {
        return Err(LaneError::Handshake("the handshake did not finish".into()));
    }
    let (mut initiator_sends, mut responder_sends) = hs.dangerously_get_raw_split();
    let (send, receive) = if hs.is_initiator() {
        (&initiator_sends, &responder_sends)
    } else {
        (&responder_sends, &initiator_sends)
    };
    let directions = (Direction::new(send), Direction::new(receive));
    // ring keeps its own copy of each key.
    initiator_sends.zeroize();
    responder_sends.zeroize();
    Ok(directions)
}

/// A message ready to go on a lane: its length (4 bytes, big-endian) and
/// its bytes, in the one buffer that is sealed in place.
pub(super) struct Outgoing(Vec<u8>);

impl Outgoing {
    /// `record`'s encoding, written once, straight after its length.
    pub fn record<R: Record>(record: &R) -> Self {
        let mut buf = Vec::with_capacity(4 + record.encoded_len());
        buf.extend_from_slice(&[0; 4]);
        record.encode_into(&mut buf);
        Self::with_length(buf)
    }

    /// A request; a push built from kept records is sent from its own
    /// buffer, its length written in the room left for it.
    pub fn request(request: StoreRequest) -> Self {
        match request {
            StoreRequest::EncodedPush(push) => {
                const { assert!(EncodedPush::HEADROOM == 4) };
                Self::with_length(push.into_buffer())
            }
            request => Self::record(&request),
        }
    }

    #[cfg(test)]
    fn bytes(msg: &[u8]) -> Self {
        let mut buf = Vec::with_capacity(4 + msg.len());
        buf.extend_from_slice(&[0; 4]);
        buf.extend_from_slice(msg);
        Self::with_length(buf)
    }

    fn with_length(mut buf: Vec<u8>) -> Self {
        // Requests and answers are a few MiB at most; were one 4 GiB, the
        // receiver would refuse it from this length.
        let len = u32::try_from(buf.len() - 4).unwrap_or(u32::MAX);
        buf[..4].copy_from_slice(&len.to_be_bytes());
        Self(buf)
    }
}

/// Sends messages on a lane.
struct Sealer {
    half: OwnedWriteHalf,
    key: Direction,
}

/// A message's frames once sealed: each is its 2-byte length, its chunk
/// of the message (sealed in place) and its tag.
struct Sealed {
    msg: Vec<u8>,
    heads: Vec<[u8; 2]>,
    tags: Vec<aead::Tag>,
}

impl Sealed {
    fn slices(&self) -> Vec<IoSlice<'_>> {
        let mut slices = Vec::with_capacity(3 * self.heads.len());
        for ((head, chunk), tag) in self
            .heads
            .iter()
            .zip(self.msg.chunks(CHUNK))
            .zip(&self.tags)
        {
            slices.push(IoSlice::new(head));
            slices.push(IoSlice::new(chunk));
            slices.push(IoSlice::new(tag.as_ref()));
        }
        slices
    }
}

impl Sealer {
    fn seal(&mut self, msg: Outgoing) -> Sealed {
        let mut msg = msg.0;
        let frames = msg.len().div_ceil(CHUNK);
        let (mut heads, mut tags) = (Vec::with_capacity(frames), Vec::with_capacity(frames));
        for chunk in msg.chunks_mut(CHUNK) {
            heads.push(((chunk.len() + TAG) as u16).to_be_bytes());
            tags.push(self.key.seal(chunk));
        }
        Sealed { msg, heads, tags }
    }

    /// Seals `msg` and hands all of its frames to the socket at once.
    async fn send(&mut self, msg: Outgoing) -> Result<(), LaneError> {
        let sealed = self.seal(msg);
        let mut slices = sealed.slices();
        let mut rest = &mut slices[..];
        while !rest.is_empty() {
            let n = self.half.write_vectored(rest).await?;
            if n == 0 {
                return Err(std::io::Error::from(std::io::ErrorKind::WriteZero).into());
            }
            IoSlice::advance_slices(&mut rest, n);
        }
        Ok(())
    }
}

/// Receives messages on a lane.
struct Opener {
    half: OwnedReadHalf,
    key: Direction,
    /// A message's first frame, which carries its length.
    first: Box<[u8]>,
}

impl Opener {
    /// The next frame's length; `None` if the lane ended before it began.
    async fn frame_len(&mut self) -> Result<Option<usize>, LaneError> {
        let mut len = [0u8; 2];
        match self.half.read_exact(&mut len).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e.into()),
        }
        let n = u16::from_be_bytes(len) as usize;
        if n < TAG {
            return Err(LaneError::Malformed("frame shorter than its tag"));
        }
        Ok(Some(n))
    }

    /// The next message, if its length is at most `max`; `None` once the
    /// other end closed between messages.
    async fn recv(&mut self, max: usize) -> Result<Option<Vec<u8>>, LaneError> {
        let Some(n) = self.frame_len().await? else {
            return Ok(None);
        };
        self.half.read_exact(&mut self.first[..n]).await?;
        let m = self.key.open(&mut self.first[..n])?;
        if m < 4 {
            return Err(LaneError::Malformed("first frame without a length"));
        }
        let len = u32::from_be_bytes(self.first[..4].try_into().expect("4 bytes")) as usize;
        if len > max {
            return Err(LaneError::TooLong(len, max));
        }
        if m - 4 > len {
            return Err(LaneError::Malformed("frame beyond its message"));
        }
        // Room for the last frame's tag, which opens in place.
        let mut msg = Vec::with_capacity(len + TAG);
        msg.extend_from_slice(&self.first[4..m]);
        while msg.len() < len {
            let n = self
                .frame_len()
                .await?
                .ok_or(LaneError::Malformed("the lane ended inside a message"))?;
            let at = msg.len();
            if n == TAG || at + n - TAG > len {
                return Err(LaneError::Malformed("frame beyond its message"));
            }
            // Read into the message's spare room: nothing zeroed first.
            while msg.len() < at + n {
                let want = (at + n - msg.len()) as u64;
                if (&mut self.half).take(want).read_buf(&mut msg).await? == 0 {
                    return Err(LaneError::Malformed("the lane ended inside a message"));
                }
            }
            let m = self.key.open(&mut msg[at..])?;
            msg.truncate(at + m);
        }
        Ok(Some(msg))
    }
}

/// Both halves of a lane from its connection and finished handshake.
fn split(stream: TcpStream, mut hs: snow::HandshakeState) -> Result<(Sealer, Opener), LaneError> {
    let (send, receive) = directions(&mut hs)?;
    drop(hs);
    stream.set_nodelay(true)?;
    let (read, write) = stream.into_split();
    Ok((
        Sealer {
            half: write,
            key: send,
        },
        Opener {
            half: read,
            key: receive,
            first: vec![0; NOISE_MAX].into_boxed_slice(),
        },
    ))
}

/// The pusher's half of the handshake's two messages.
async fn initiate(stream: &mut TcpStream, hs: &mut snow::HandshakeState) -> Result<(), LaneError> {
    let mut msg = [0u8; 256];
    let n = hs.write_message(&[], &mut msg).map_err(handshake_error)?;
    write_handshake_message(stream, &msg[..n]).await?;
    let n = read_handshake_message(stream, &mut msg).await?;
    hs.read_message(&msg[..n], &mut [0u8; 256])
        .map_err(handshake_error)?;
    Ok(())
}

/// The receiver's half: a wrong key or peer fails on the first message.
async fn respond(stream: &mut TcpStream, hs: &mut snow::HandshakeState) -> Result<(), LaneError> {
    let mut msg = [0u8; 256];
    let n = read_handshake_message(stream, &mut msg).await?;
    hs.read_message(&msg[..n], &mut [0u8; 256])
        .map_err(|_| LaneError::Handshake("wrong key or peer".into()))?;
    let n = hs.write_message(&[], &mut msg).map_err(handshake_error)?;
    write_handshake_message(stream, &msg[..n]).await?;
    Ok(())
}

async fn read_handshake_message(
    stream: &mut TcpStream,
    buf: &mut [u8; 256],
) -> Result<usize, LaneError> {
    let mut len = [0u8; 2];
    stream.read_exact(&mut len).await?;
    let n = u16::from_be_bytes(len) as usize;
    if n > buf.len() {
        return Err(LaneError::Handshake("handshake message too long".into()));
    }
    stream.read_exact(&mut buf[..n]).await?;
    Ok(n)
}

async fn write_handshake_message(stream: &mut TcpStream, msg: &[u8]) -> Result<(), LaneError> {
    let mut out = (msg.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(msg);
    stream.write_all(&out).await?;
    Ok(())
}

// ------------------------------------------------------------------ pusher

/// The pusher's end of a lane: requests go in, answers come back in order.
/// Cheap to clone; the lane closes when every clone is dropped or after
/// [`IDLE`] without a request.
#[derive(Clone)]
pub struct Lane {
    tx: mpsc::Sender<(Outgoing, AnswerTo)>,
    /// Set by either half when the lane fails or ends.
    closed: Arc<std::sync::atomic::AtomicBool>,
}

/// Where the answer to a request sent on a lane goes.
type AnswerTo = oneshot::Sender<Result<StoreResponse, String>>;

impl Lane {
    /// Connects to `addr` with what the receiver `peer` offered over libp2p.
    pub async fn connect(
        addr: SocketAddr,
        me: PeerId,
        peer: PeerId,
        offer: &LaneOffer,
    ) -> Result<Lane, LaneError> {
        let opening = async {
            let mut stream = TcpStream::connect(addr).await?;
            let prologue = prologue(&offer.id, &peer, &me);
            let mut hs = handshake_state(&offer.key, &prologue, true)?;
            let mut hello = MAGIC.to_vec();
            hello.extend_from_slice(&offer.id);
            stream.write_all(&hello).await?;
            initiate(&mut stream, &mut hs).await?;
            Ok::<_, LaneError>((stream, hs))
        };
        let (stream, hs) = tokio::time::timeout(HANDSHAKE_TIMEOUT, opening)
            .await
            .map_err(|_| LaneError::Timeout)??;
        let (mut sealer, mut opener) = split(stream, hs)?;
        let (tx, mut rx) = mpsc::channel::<(Outgoing, AnswerTo)>(MAX_LANE_IN_FLIGHT);
        let (wait_tx, mut wait_rx) = mpsc::channel::<AnswerTo>(MAX_LANE_IN_FLIGHT);
        let closed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let close = |flag: &std::sync::atomic::AtomicBool| {
            flag.store(true, std::sync::atomic::Ordering::Relaxed)
        };
        let flag = closed.clone();
        tokio::spawn(async move {
            loop {
                let Ok(Some((msg, reply))) = tokio::time::timeout(IDLE, rx.recv()).await else {
                    break;
                };
                if wait_tx.send(reply).await.is_err() {
                    break;
                }
                match tokio::time::timeout(ANSWER_TIMEOUT, sealer.send(msg)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        debug!(%peer, "lane closed while sending: {e}");
                        break;
                    }
                    Err(_) => {
                        debug!(%peer, "lane closed: the peer took nothing for {ANSWER_TIMEOUT:?}");
                        break;
                    }
                }
            }
            close(&flag);
            let _ = sealer.half.shutdown().await;
        });
        let flag = closed.clone();
        tokio::spawn(async move {
            // On a failure the answers still waiting are dropped with
            // `wait_rx`: their requests fail as "lane closed".
            while let Some(reply) = wait_rx.recv().await {
                let answer =
                    match tokio::time::timeout(ANSWER_TIMEOUT, opener.recv(StoreResponse::MAX_LEN))
                        .await
                    {
                        Ok(Ok(Some(bytes))) => StoreResponse::decode(&bytes)
                            .map_err(|e| format!("bad answer on a lane: {e}")),
                        Ok(Ok(None)) => Err(LaneError::Closed.to_string()),
                        Ok(Err(e)) => Err(e.to_string()),
                        Err(_) => Err(LaneError::Timeout.to_string()),
                    };
                let failed = answer.is_err();
                let _ = reply.send(answer);
                if failed {
                    break;
                }
            }
            close(&flag);
        });
        Ok(Lane { tx, closed })
    }

    /// Sends `request` and waits for its answer.
    pub async fn ask(&self, request: StoreRequest) -> Result<StoreResponse, String> {
        if self.is_closed() {
            return Err(LaneError::Closed.to_string());
        }
        let (reply, answer) = oneshot::channel();
        self.tx
            .send((Outgoing::request(request), reply))
            .await
            .map_err(|_| LaneError::Closed.to_string())?;
        answer.await.map_err(|_| LaneError::Closed.to_string())?
    }

    /// Whether the lane has closed (idle, or the connection failed).
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed() || self.closed.load(std::sync::atomic::Ordering::Relaxed)
    }
}

// ---------------------------------------------------------------- receiver

struct Offered {
    peer: PeerId,
    key: [u8; 32],
    at: Instant,
}

impl Drop for Offered {
    fn drop(&mut self) {
        self.key.zeroize();
    }
}

struct Shared {
    me: PeerId,
    port: u16,
    offers: Mutex<HashMap<[u8; 16], Offered>>,
    /// Lanes open, per peer.
    open: Mutex<HashMap<PeerId, usize>>,
    handshakes: Arc<Semaphore>,
    lanes: Arc<Semaphore>,
    inbound: mpsc::Sender<InboundStore>,
    metrics: LaneMetrics,
}

/// The receiving side: a TCP listener and the offers made over libp2p.
#[derive(Clone)]
pub struct LaneServer {
    shared: Arc<Shared>,
}

impl LaneServer {
    /// Listens on `addr`; requests that arrive on lanes go to `inbound`,
    /// like those that arrive over libp2p.
    pub async fn bind(
        addr: SocketAddr,
        me: PeerId,
        inbound: mpsc::Sender<InboundStore>,
        metrics: LaneMetrics,
        shutdown: watch::Receiver<bool>,
    ) -> std::io::Result<(LaneServer, tokio::task::JoinHandle<()>)> {
        let listener = TcpListener::bind(addr).await?;
        let port = listener.local_addr()?.port();
        let server = LaneServer {
            shared: Arc::new(Shared {
                me,
                port,
                offers: Mutex::new(HashMap::new()),
                open: Mutex::new(HashMap::new()),
                handshakes: Arc::new(Semaphore::new(MAX_HANDSHAKES)),
                lanes: Arc::new(Semaphore::new(MAX_LANES)),
                inbound,
                metrics,
            }),
        };
        info!(port, "lanes listening on {}", listener.local_addr()?);
        let task = tokio::spawn(server.clone().accept(listener, shutdown));
        Ok((server, task))
    }

    pub fn port(&self) -> u16 {
        self.shared.port
    }

    /// A one-time offer for `peer`, or `None` when too many are waiting.
    pub fn offer(&self, peer: PeerId) -> Option<LaneOffer> {
        let mut offers = self.shared.offers.lock().expect("not poisoned");
        offers.retain(|_, o| o.at.elapsed() < OFFER_TTL);
        let open = self
            .shared
            .open
            .lock()
            .expect("not poisoned")
            .get(&peer)
            .copied()
            .unwrap_or(0);
        let waiting = offers.values().filter(|o| o.peer == peer).count();
        if offers.len() >= MAX_OFFERS
            || waiting >= MAX_OFFERS_PER_PEER
            || open + waiting >= MAX_LANES_PER_PEER
        {
            return None;
        }
        let id: [u8; 16] = rand::random();
        let mut key: [u8; 32] = rand::random();
        offers.insert(
            id,
            Offered {
                peer,
                key,
                at: Instant::now(),
            },
        );
        let offer = LaneOffer {
            port: self.shared.port,
            id,
            key,
        };
        key.zeroize();
        Some(offer)
    }

    fn take_offer(&self, id: &[u8; 16]) -> Option<Offered> {
        let mut offers = self.shared.offers.lock().expect("not poisoned");
        offers.remove(id).filter(|o| o.at.elapsed() < OFFER_TTL)
    }

    async fn accept(self, listener: TcpListener, mut shutdown: watch::Receiver<bool>) {
        loop {
            let accepted = tokio::select! {
                _ = shutdown.changed() => return,
                a = listener.accept() => a,
            };
            let (stream, from) = match accepted {
                Ok(s) => s,
                Err(e) => {
                    warn!("lane listener: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(permit) = self.shared.handshakes.clone().try_acquire_owned() else {
                debug!(%from, "too many lane handshakes at once; closing a new one");
                continue;
            };
            let server = self.clone();
            tokio::spawn(async move {
                match server.serve(stream, permit).await {
                    Ok(()) => {}
                    // Strangers and port scans end here.
                    Err(e @ (LaneError::Handshake(_) | LaneError::Timeout)) => {
                        debug!(%from, "lane refused: {e}")
                    }
                    Err(e) => warn!(%from, "lane closed: {e}"),
                }
            });
        }
    }

    async fn handshake(
        &self,
        stream: &mut TcpStream,
    ) -> Result<(PeerId, snow::HandshakeState), LaneError> {
        let mut hello = [0u8; 24];
        stream.read_exact(&mut hello).await?;
        if &hello[..8] != MAGIC {
            return Err(LaneError::Handshake("not a Tern lane".into()));
        }
        let id: [u8; 16] = hello[8..].try_into().expect("16 bytes");
        let offered = self.take_offer(&id).ok_or_else(|| {
            LaneError::Handshake("no such lane offer (unknown, used or expired)".into())
        })?;
        let prologue = prologue(&id, &self.shared.me, &offered.peer);
        let mut hs = handshake_state(&offered.key, &prologue, false)?;
        respond(stream, &mut hs).await?;
        Ok((offered.peer, hs))
    }

    async fn serve(
        &self,
        mut stream: TcpStream,
        handshake: OwnedSemaphorePermit,
    ) -> Result<(), LaneError> {
        let (peer, hs) = tokio::time::timeout(HANDSHAKE_TIMEOUT, self.handshake(&mut stream))
            .await
            .map_err(|_| LaneError::Timeout)??;
        drop(handshake);
        let Ok(_lane) = self.shared.lanes.clone().try_acquire_owned() else {
            return Err(LaneError::Handshake("too many lanes open".into()));
        };
        let _open = OpenLane::new(&self.shared, peer);
        debug!(%peer, "lane open");
        self.shared.metrics.opened.inc();
        let (mut sealer, mut opener) = split(stream, hs)?;
        let (wait_tx, mut wait_rx) =
            mpsc::channel::<oneshot::Receiver<StoreResponse>>(MAX_LANE_IN_FLIGHT);
        // Answers go back in the order their requests came.
        let mut writer = tokio::spawn(async move {
            while let Some(answer) = wait_rx.recv().await {
                let Ok(response) = answer.await else {
                    return Err(LaneError::Closed);
                };
                tokio::time::timeout(ANSWER_TIMEOUT, sealer.send(Outgoing::record(&response)))
                    .await
                    .map_err(|_| LaneError::Timeout)??;
            }
            let _ = sealer.half.shutdown().await;
            Ok(())
        });
        let read = async {
            loop {
                let msg = match tokio::time::timeout(2 * IDLE, opener.recv(StoreRequest::MAX_LEN))
                    .await
                {
                    Err(_) => return Err(LaneError::Timeout),
                    Ok(Ok(None)) => return Ok(()),
                    Ok(Ok(Some(m))) => m,
                    Ok(Err(e)) => return Err(e),
                };
                let request =
                    StoreRequest::decode(&msg).map_err(|e| LaneError::Decode(e.to_string()))?;
                if !matches!(request, StoreRequest::Push { .. }) {
                    return Err(LaneError::Decode("only pushes go on lanes".into()));
                }
                self.shared.metrics.requests.inc();
                let (reply, answer) = oneshot::channel();
                let inbound = InboundStore {
                    peer,
                    request,
                    answer: Answer::Lane(reply),
                };
                let handed = async {
                    self.shared.inbound.send(inbound).await.ok()?;
                    wait_tx.send(answer).await.ok()
                };
                match tokio::time::timeout(ANSWER_TIMEOUT, handed).await {
                    Ok(Some(())) => {}
                    Ok(None) => return Err(LaneError::Closed),
                    Err(_) => return Err(LaneError::Timeout),
                }
            }
        };
        let read: Result<(), LaneError> = read.await;
        drop(wait_tx);
        let written = match read {
            // The other end finished: its last answers go out.
            Ok(()) => tokio::time::timeout(ANSWER_TIMEOUT, &mut writer)
                .await
                .map_err(|_| LaneError::Timeout)
                .and_then(|w| w.map_err(|_| LaneError::Closed))
                .and_then(|w| w),
            Err(_) => Ok(()),
        };
        writer.abort();
        debug!(%peer, "lane closed");
        read.and(written)
    }
}

/// Counts a peer's open lane while it lives.
struct OpenLane<'a> {
    shared: &'a Shared,
    peer: PeerId,
}

impl<'a> OpenLane<'a> {
    fn new(shared: &'a Shared, peer: PeerId) -> Self {
        *shared
            .open
            .lock()
            .expect("not poisoned")
            .entry(peer)
            .or_default() += 1;
        Self { shared, peer }
    }
}

impl Drop for OpenLane<'_> {
    fn drop(&mut self) {
        let mut open = self.shared.open.lock().expect("not poisoned");
        if let Some(n) = open.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.peer);
            }
        }
    }
}

#[cfg(test)]
mod tests;
