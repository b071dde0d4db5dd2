//! The secret-chat session: a Noise XX handshake bound to both devices'
//! certified identities, then a ratchet that erases every message key after
//! use and re-keys with fresh Diffie-Hellman at least every 100 messages or
//! every week.
//!
//! Sans-IO: frames in, frames out; time and randomness are inputs.
//!
//! - **Identity binding.** Each side's handshake payload carries its device
//!   certificate and a device-key signature over (chat id, its Noise static
//!   key). Noise authenticates the static keys; the signature binds them to
//!   the certified device the caller expected, so a man in the middle
//!   without that device's key is refused outright.
//! - **Ratchet.** Per direction, a BLAKE3 chain: each message key is derived
//!   from the chain key, which is then replaced by a one-way successor. What
//!   a device holds now cannot decrypt what it received before.
//! - **Order.** Frames are numbered per direction and must arrive in order:
//!   a replay or an old frame is refused, a gap is reported so the caller
//!   asks for a resend, a tampered frame fails authentication. None of these
//!   changes the session.
//! - **Re-key.** Inside the ordered stream, one side offers a fresh X25519
//!   key, the other answers with its own; both mix the shared secret into
//!   the root key and start new chains (a new epoch).

use chacha20poly1305::{
    KeyInit, XChaCha20Poly1305, XNonce,
    aead::{Aead, Payload},
};
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use super::fingerprint::Fingerprint;
use crate::{
    codec::{Record, bytes64},
    identity::{DeviceCertificate, DevicePublicKey},
};

const NOISE_PARAMS: &str = "Noise_XX_25519_ChaChaPoly_BLAKE2s";
/// Re-key after this many messages in one epoch, both directions together…
pub const REKEY_AFTER_MESSAGES: u32 = 100;
/// …or after this long, whichever comes first.
pub const REKEY_AFTER_MS: u64 = 7 * 24 * 3600 * 1000;
/// Largest payload one frame carries.
pub const MAX_PAYLOAD: usize = 32 * 1024;
const MAX_HANDSHAKE_MESSAGE: usize = 1024;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SessionError {
    #[error("handshake failed: {0}")]
    Handshake(String),
    #[error("the peer proved to be another device than the one expected")]
    WrongPeer,
    #[error("the peer's identity proof does not verify")]
    BadIdentityProof,
    #[error("frame {got} was already received (replay)")]
    Replay { got: u64 },
    #[error("frame {got} arrived but {expected} was expected: ask for a resend from {expected}")]
    Gap { expected: u64, got: u64 },
    #[error("frame is for key epoch {got}, which this session does not hold")]
    UnknownEpoch { got: u32 },
    #[error("frame failed authentication (tampered or forged)")]
    Tampered,
    #[error("payload of {0} bytes is larger than the {MAX_PAYLOAD} allowed")]
    TooLarge(usize),
    #[error("malformed frame: {0}")]
    Malformed(String),
}

/// Proof, inside the Noise handshake, that a static key belongs to a device.
#[derive(Serialize, Deserialize)]
struct IdentityProof {
    certificate: DeviceCertificate,
    #[serde(with = "bytes64")]
    signature: [u8; 64],
}

impl Record for IdentityProof {
    const VERSION: u8 = 1;
    const MAX_LEN: usize = 512;
}

fn proof_message(secret_id: &[u8; 16], static_key: &[u8]) -> Vec<u8> {
    let mut m = b"tern secret-chat static key v1\0".to_vec();
    m.extend_from_slice(secret_id);
    m.extend_from_slice(static_key);
    m
}

/// Feeds snow the caller's randomness instead of the operating system's.
struct SeededRng(blake3::OutputReader);

impl snow::types::Random for SeededRng {
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), snow::Error> {
        self.0.fill(dest);
        Ok(())
    }
}

struct SeededResolver {
    seed: [u8; 32],
}

impl snow::resolvers::CryptoResolver for SeededResolver {
    fn resolve_rng(&self) -> Option<Box<dyn snow::types::Random>> {
        let stream = blake3::Hasher::new_keyed(&self.seed).finalize_xof();
        Some(Box::new(SeededRng(stream)))
    }
    fn resolve_dh(&self, c: &snow::params::DHChoice) -> Option<Box<dyn snow::types::Dh>> {
        snow::resolvers::DefaultResolver.resolve_dh(c)
    }
    fn resolve_hash(&self, c: &snow::params::HashChoice) -> Option<Box<dyn snow::types::Hash>> {
        snow::resolvers::DefaultResolver.resolve_hash(c)
    }
    fn resolve_cipher(
        &self,
        c: &snow::params::CipherChoice,
    ) -> Option<Box<dyn snow::types::Cipher>> {
        snow::resolvers::DefaultResolver.resolve_cipher(c)
    }
}

/// What this device brings to a handshake.
pub struct LocalDevice<'a> {
    pub signing_key: &'a SigningKey,
    pub certificate: &'a DeviceCertificate,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    Initiator,
    Responder,
}

/// A handshake in progress.
pub struct Handshake {
    state: snow::HandshakeState,
    role: Role,
    secret_id: [u8; 16],
    expected_peer: DevicePublicKey,
    proof: Vec<u8>,
}

/// The end of a handshake: the session, and for the initiator the last
/// handshake message to send.
pub struct Established {
    pub reply: Option<Vec<u8>>,
    pub session: SecretSession,
    /// The peer's certificate, proven by the handshake: which account the
    /// device at the other end belongs to.
    pub peer: DeviceCertificate,
}

impl Handshake {
    fn build(
        role: Role,
        secret_id: [u8; 16],
        local: &LocalDevice,
        expected_peer: DevicePublicKey,
        seed: [u8; 32],
    ) -> Result<Self, SessionError> {
        let err = |e: snow::Error| SessionError::Handshake(e.to_string());
        let params = NOISE_PARAMS.parse().map_err(err)?;
        // A fresh static key per secret chat, from the caller's randomness.
        let static_secret =
            Zeroizing::new(blake3::derive_key("tern secret-chat static key v1", &seed));
        let static_public =
            x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from(*static_secret));
        let signature = local
            .signing_key
            .sign(&proof_message(&secret_id, static_public.as_bytes()));
        let proof = IdentityProof {
            certificate: local.certificate.clone(),
            signature: signature.to_bytes(),
        }
        .encode();
        let mut prologue = b"tern secret-chat v1\0".to_vec();
        prologue.extend_from_slice(&secret_id);
        let rng_seed = blake3::derive_key("tern secret-chat handshake rng v1", &seed);
        let builder =
            snow::Builder::with_resolver(params, Box::new(SeededResolver { seed: rng_seed }))
                .local_private_key(static_secret.as_ref())
                .map_err(err)?
                .prologue(&prologue)
                .map_err(err)?;
        let state = match role {
            Role::Initiator => builder.build_initiator(),
            Role::Responder => builder.build_responder(),
        }
        .map_err(err)?;
        Ok(Self {
            state,
            role,
            secret_id,
            expected_peer,
            proof,
        })
    }

    /// Starts a handshake as the device that created the secret chat.
    /// `seed` must be 32 fresh random bytes.
    pub fn initiate(
        secret_id: [u8; 16],
        local: &LocalDevice,
        expected_peer: DevicePublicKey,
        seed: [u8; 32],
    ) -> Result<(Self, Vec<u8>), SessionError> {
        let mut hs = Self::build(Role::Initiator, secret_id, local, expected_peer, seed)?;
        let first = hs.write(&[])?;
        Ok((hs, first))
    }

    /// Answers the first handshake message as the device that accepted.
    pub fn respond(
        secret_id: [u8; 16],
        local: &LocalDevice,
        expected_peer: DevicePublicKey,
        seed: [u8; 32],
        first: &[u8],
    ) -> Result<(Self, Vec<u8>), SessionError> {
        let mut hs = Self::build(Role::Responder, secret_id, local, expected_peer, seed)?;
        hs.read(first)?;
        let proof = hs.proof.clone();
        let second = hs.write(&proof)?;
        Ok((hs, second))
    }

    /// Handles the peer's handshake message (the second for the initiator,
    /// the third for the responder), which completes the handshake.
    pub fn on_message(mut self, msg: &[u8], now_ms: u64) -> Result<Established, SessionError> {
        let payload = self.read(msg)?;
        let peer = self.check_proof(&payload)?;
        let reply = match self.role {
            Role::Initiator => {
                let proof = self.proof.clone();
                Some(self.write(&proof)?)
            }
            Role::Responder => None,
        };
        if !self.state.is_handshake_finished() {
            return Err(SessionError::Handshake("handshake did not finish".into()));
        }
        let session = SecretSession::new(self.role, self.state.get_handshake_hash(), now_ms);
        Ok(Established {
            reply,
            session,
            peer,
        })
    }

    fn write(&mut self, payload: &[u8]) -> Result<Vec<u8>, SessionError> {
        let mut buf = vec![0u8; MAX_HANDSHAKE_MESSAGE];
        let n = self
            .state
            .write_message(payload, &mut buf)
            .map_err(|e| SessionError::Handshake(e.to_string()))?;
        buf.truncate(n);
        Ok(buf)
    }

    fn read(&mut self, msg: &[u8]) -> Result<Vec<u8>, SessionError> {
        if msg.len() > MAX_HANDSHAKE_MESSAGE {
            return Err(SessionError::Handshake("handshake message too long".into()));
        }
        let mut buf = vec![0u8; MAX_HANDSHAKE_MESSAGE];
        let n = self
            .state
            .read_message(msg, &mut buf)
            .map_err(|e| SessionError::Handshake(e.to_string()))?;
        buf.truncate(n);
        Ok(buf)
    }

    fn check_proof(&self, payload: &[u8]) -> Result<DeviceCertificate, SessionError> {
        // Record::decode checks the certificate's own signature.
        let proof = IdentityProof::decode(payload).map_err(|_| SessionError::BadIdentityProof)?;
        if proof.certificate.device != self.expected_peer {
            return Err(SessionError::WrongPeer);
        }
        let remote_static = self
            .state
            .get_remote_static()
            .ok_or_else(|| SessionError::Handshake("no remote static key".into()))?;
        let key = VerifyingKey::from_bytes(proof.certificate.device.as_bytes())
            .map_err(|_| SessionError::BadIdentityProof)?;
        key.verify_strict(
            &proof_message(&self.secret_id, remote_static),
            &Signature::from_bytes(&proof.signature),
        )
        .map_err(|_| SessionError::BadIdentityProof)?;
        Ok(proof.certificate)
    }
}

/// A [`SecretSession`] at rest. Erased from memory when dropped; on disk it
/// belongs in storage that really deletes (each new snapshot replaces and
/// wipes the previous one, so older chain keys do not linger).
#[derive(Clone, Serialize, Deserialize, Zeroize, ZeroizeOnDrop)]
pub struct SessionSnapshot {
    initiator: bool,
    fingerprint: [u8; 32],
    short_code_key: [u8; 32],
    rekey_base: [u8; 32],
    epoch: u32,
    epoch_started_ms: u64,
    messages_in_epoch: u32,
    send: (u32, [u8; 32]),
    send_n: u64,
    recv: (u32, [u8; 32]),
    recv_previous: Option<(u32, [u8; 32])>,
    recv_n: u64,
    pending_offer: Option<[u8; 32]>,
    rekeys: u32,
}

impl Record for SessionSnapshot {
    const VERSION: u8 = 2;
    const MAX_LEN: usize = 512;
}

/// One numbered, encrypted frame of a secret chat.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretFrame {
    pub epoch: u32,
    pub n: u64,
    pub ciphertext: Vec<u8>,
}

impl Record for SecretFrame {
    const VERSION: u8 = 1;
    const MAX_LEN: usize = MAX_PAYLOAD + 128;
}

/// Inside a frame: application data or a step of a re-key.
const KIND_DATA: u8 = 0;
const KIND_REKEY_OFFER: u8 = 1;
const KIND_REKEY_ACCEPT: u8 = 2;

#[derive(Clone)]
struct Chain {
    epoch: u32,
    key: Zeroizing<[u8; 32]>,
}

impl Chain {
    fn new(root: &[u8; 32], epoch: u32, direction: &str) -> Self {
        let mut h = blake3::Hasher::new_derive_key(direction);
        h.update(root);
        Self {
            epoch,
            key: Zeroizing::new(*h.finalize().as_bytes()),
        }
    }

    /// The key for the next message, without advancing.
    fn message_key(&self) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(blake3::keyed_hash(&self.key, b"message").into())
    }

    /// Replaces the chain key by its one-way successor; the old one is erased.
    fn advance(&mut self) {
        self.key = Zeroizing::new(blake3::keyed_hash(&self.key, b"chain").into());
    }
}

fn cipher(key: &[u8; 32]) -> XChaCha20Poly1305 {
    XChaCha20Poly1305::new(key.into())
}

fn aad(epoch: u32, n: u64) -> [u8; 12] {
    let mut a = [0u8; 12];
    a[..4].copy_from_slice(&epoch.to_le_bytes());
    a[4..].copy_from_slice(&n.to_le_bytes());
    a
}

fn rekey_base(root: &[u8; 32]) -> Zeroizing<[u8; 32]> {
    Zeroizing::new(blake3::derive_key("tern secret-chat rekey base v1", root))
}

/// An established secret chat between two devices.
pub struct SecretSession {
    role: Role,
    fingerprint: [u8; 32],
    /// Binds the short-code exchange to this handshake; one-way from the
    /// handshake hash, so it reveals no key.
    short_code_key: [u8; 32],
    /// What the next re-key mixes its Diffie-Hellman output into. One-way
    /// from the epoch's root, which is dropped once the chains are derived:
    /// a captured state cannot re-derive this epoch's earlier message keys.
    rekey_base: Zeroizing<[u8; 32]>,
    epoch: u32,
    epoch_started_ms: u64,
    messages_in_epoch: u32,
    send: Chain,
    send_n: u64,
    recv: Chain,
    /// The peer's previous-epoch chain, kept until its first new-epoch frame.
    recv_previous: Option<Chain>,
    recv_n: u64,
    /// Our half of a re-key we offered and the peer has not answered yet.
    pending_offer: Option<Zeroizing<[u8; 32]>>,
    rekeys: u32,
}

/// What opening a frame produced.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Opened {
    /// Application data, if the frame carried some.
    pub payload: Option<Vec<u8>>,
    /// Frames to send back (a re-key answer).
    pub reply: Vec<SecretFrame>,
}

impl SecretSession {
    fn new(role: Role, handshake_hash: &[u8], now_ms: u64) -> Self {
        let mut hh = [0u8; 32];
        let len = handshake_hash.len().min(32);
        hh[..len].copy_from_slice(&handshake_hash[..len]);
        let root = Zeroizing::new(blake3::derive_key("tern secret-chat root v1", &hh));
        let (send, recv) = Self::chains(role, &root, 0);
        let fingerprint = *Fingerprint::from_handshake_hash(&hh).as_bytes();
        let short_code_key = blake3::derive_key("tern secret-chat short code key v1", &hh);
        hh.zeroize();
        Self {
            role,
            fingerprint,
            short_code_key,
            rekey_base: rekey_base(&root),
            epoch: 0,
            epoch_started_ms: now_ms,
            messages_in_epoch: 0,
            send,
            send_n: 0,
            recv,
            recv_previous: None,
            recv_n: 0,
            pending_offer: None,
            rekeys: 0,
        }
    }

    fn chains(role: Role, root: &[u8; 32], epoch: u32) -> (Chain, Chain) {
        let i2r = Chain::new(
            root,
            epoch,
            "tern secret-chat chain initiator->responder v1",
        );
        let r2i = Chain::new(
            root,
            epoch,
            "tern secret-chat chain responder->initiator v1",
        );
        match role {
            Role::Initiator => (i2r, r2i),
            Role::Responder => (r2i, i2r),
        }
    }

    /// The fingerprint both people compare (key picture, emoji, hex).
    pub fn fingerprint(&self) -> Fingerprint {
        Fingerprint::from_bytes(self.fingerprint)
    }

    /// The handshake hash, for the short-code exchange.
    pub fn short_code_key(&self) -> [u8; 32] {
        self.short_code_key
    }

    pub fn epoch(&self) -> u32 {
        self.epoch
    }

    /// Completed Diffie-Hellman re-keys.
    pub fn rekeys(&self) -> u32 {
        self.rekeys
    }

    /// The number of the next frame this side will send.
    pub fn next_send(&self) -> u64 {
        self.send_n
    }

    /// The number of the next frame expected from the peer: what a receiver
    /// acknowledges, and where a sender resumes after a gap.
    pub fn next_expected(&self) -> u64 {
        self.recv_n
    }

    /// The whole state, to keep on disk between runs. It holds the current
    /// chain keys only: what was erased stays erased.
    pub fn snapshot(&self) -> SessionSnapshot {
        SessionSnapshot {
            initiator: self.role == Role::Initiator,
            fingerprint: self.fingerprint,
            short_code_key: self.short_code_key,
            rekey_base: *self.rekey_base,
            epoch: self.epoch,
            epoch_started_ms: self.epoch_started_ms,
            messages_in_epoch: self.messages_in_epoch,
            send: (self.send.epoch, *self.send.key),
            send_n: self.send_n,
            recv: (self.recv.epoch, *self.recv.key),
            recv_previous: self.recv_previous.as_ref().map(|c| (c.epoch, *c.key)),
            recv_n: self.recv_n,
            pending_offer: self.pending_offer.as_ref().map(|k| **k),
            rekeys: self.rekeys,
        }
    }

    /// The session a [`Self::snapshot`] was taken of.
    pub fn restore(s: &SessionSnapshot) -> Self {
        let chain = |(epoch, key): (u32, [u8; 32])| Chain {
            epoch,
            key: Zeroizing::new(key),
        };
        Self {
            role: if s.initiator {
                Role::Initiator
            } else {
                Role::Responder
            },
            fingerprint: s.fingerprint,
            short_code_key: s.short_code_key,
            rekey_base: Zeroizing::new(s.rekey_base),
            epoch: s.epoch,
            epoch_started_ms: s.epoch_started_ms,
            messages_in_epoch: s.messages_in_epoch,
            send: chain(s.send),
            send_n: s.send_n,
            recv: chain(s.recv),
            recv_previous: s.recv_previous.map(chain),
            recv_n: s.recv_n,
            pending_offer: s.pending_offer.map(Zeroizing::new),
            rekeys: s.rekeys,
        }
    }

    /// Encrypts `payload`. Returns the frames to send, in order: a re-key
    /// offer first when one is due. `seed` is 32 fresh random bytes (used
    /// only when a re-key starts).
    pub fn seal(
        &mut self,
        payload: &[u8],
        now_ms: u64,
        seed: [u8; 32],
    ) -> Result<Vec<SecretFrame>, SessionError> {
        if payload.len() > MAX_PAYLOAD {
            return Err(SessionError::TooLarge(payload.len()));
        }
        let mut frames = Vec::with_capacity(2);
        let due = self.messages_in_epoch >= REKEY_AFTER_MESSAGES
            || now_ms.saturating_sub(self.epoch_started_ms) >= REKEY_AFTER_MS;
        if due && self.pending_offer.is_none() {
            let secret = Zeroizing::new(blake3::derive_key("tern secret-chat rekey v1", &seed));
            let public = x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from(*secret));
            let mut body = vec![KIND_REKEY_OFFER];
            body.extend_from_slice(public.as_bytes());
            frames.push(self.seal_inner(&body));
            self.pending_offer = Some(secret);
        }
        let mut body = Vec::with_capacity(1 + payload.len());
        body.push(KIND_DATA);
        body.extend_from_slice(payload);
        frames.push(self.seal_inner(&body));
        self.messages_in_epoch = self.messages_in_epoch.saturating_add(1);
        Ok(frames)
    }

    fn seal_inner(&mut self, body: &[u8]) -> SecretFrame {
        let key = self.send.message_key();
        let n = self.send_n;
        let epoch = self.send.epoch;
        // Each key encrypts exactly one frame, so a fixed nonce is safe.
        let ciphertext = cipher(&key)
            .encrypt(
                XNonce::from_slice(&[0u8; 24]),
                Payload {
                    msg: body,
                    aad: &aad(epoch, n),
                },
            )
            // XChaCha20-Poly1305 refuses only plaintexts over 256 GiB; frame
            // bodies are bounded by MAX_PAYLOAD (checked in `seal`) plus 33.
            .expect("frame bodies are far below the AEAD's size limit");
        self.send.advance();
        self.send_n += 1;
        SecretFrame {
            epoch,
            n,
            ciphertext,
        }
    }

    /// Decrypts the next frame from the peer. On any error the session is
    /// unchanged and keeps working.
    pub fn open(
        &mut self,
        frame: &SecretFrame,
        now_ms: u64,
        seed: [u8; 32],
    ) -> Result<Opened, SessionError> {
        if frame.n < self.recv_n {
            return Err(SessionError::Replay { got: frame.n });
        }
        if frame.n > self.recv_n {
            return Err(SessionError::Gap {
                expected: self.recv_n,
                got: frame.n,
            });
        }
        let chain = if frame.epoch == self.recv.epoch {
            &self.recv
        } else {
            match &self.recv_previous {
                Some(prev) if prev.epoch == frame.epoch => prev,
                _ => return Err(SessionError::UnknownEpoch { got: frame.epoch }),
            }
        };
        let key = chain.message_key();
        let body = Zeroizing::new(
            cipher(&key)
                .decrypt(
                    XNonce::from_slice(&[0u8; 24]),
                    Payload {
                        msg: &frame.ciphertext,
                        aad: &aad(frame.epoch, frame.n),
                    },
                )
                .map_err(|_| SessionError::Tampered)?,
        );
        let (&kind, rest) = body
            .split_first()
            .ok_or_else(|| SessionError::Malformed("empty frame".into()))?;
        let peer_key: Option<[u8; 32]> =
            match kind {
                KIND_DATA => None,
                KIND_REKEY_OFFER | KIND_REKEY_ACCEPT => Some(rest.try_into().map_err(|_| {
                    SessionError::Malformed("re-key key has the wrong length".into())
                })?),
                other => {
                    return Err(SessionError::Malformed(format!(
                        "unknown frame kind {other}"
                    )));
                }
            };
        if kind == KIND_REKEY_ACCEPT && self.pending_offer.is_none() {
            return Err(SessionError::Malformed(
                "re-key answer without an offer".into(),
            ));
        }

        // Authentic and in order: now commit. The chain used moves on; a
        // frame of the current epoch retires the previous one for good.
        if frame.epoch == self.recv.epoch {
            self.recv.advance();
            self.recv_previous = None;
        } else if let Some(prev) = &mut self.recv_previous {
            prev.advance();
        }
        self.recv_n += 1;

        let mut opened = Opened::default();
        match (kind, peer_key) {
            (KIND_DATA, _) => {
                self.messages_in_epoch = self.messages_in_epoch.saturating_add(1);
                opened.payload = Some(rest.to_vec());
            }
            (KIND_REKEY_OFFER, Some(_))
                if self.pending_offer.is_some() && self.role == Role::Initiator =>
            {
                // Offers crossed. Exactly one may win, or the two sides would
                // derive different roots: the initiator's. The responder
                // drops its own offer when it sees ours, and answers ours.
            }
            (KIND_REKEY_OFFER, Some(theirs)) => {
                // Answer with our half, switch our sending to the new epoch
                // right after the answer, and expect theirs to follow.
                let ours = Zeroizing::new(blake3::derive_key("tern secret-chat rekey v1", &seed));
                let public =
                    x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from(*ours));
                let mut body = vec![KIND_REKEY_ACCEPT];
                body.extend_from_slice(public.as_bytes());
                opened.reply.push(self.seal_inner(&body));
                // We are the responder and our offer crossed theirs: theirs wins.
                self.pending_offer = None;
                self.next_epoch(&ours, &theirs, now_ms);
            }
            (KIND_REKEY_ACCEPT, Some(theirs)) => {
                if let Some(ours) = self.pending_offer.take() {
                    self.next_epoch(&ours, &theirs, now_ms);
                }
            }
            _ => {}
        }
        Ok(opened)
    }

    fn next_epoch(&mut self, ours: &[u8; 32], theirs: &[u8; 32], now_ms: u64) {
        let shared = x25519_dalek::StaticSecret::from(*ours)
            .diffie_hellman(&x25519_dalek::PublicKey::from(*theirs));
        let mut h = blake3::Hasher::new_derive_key("tern secret-chat rekey root v1");
        h.update(self.rekey_base.as_ref());
        h.update(shared.as_bytes());
        let root = Zeroizing::new(*h.finalize().as_bytes());
        self.rekey_base = rekey_base(&root);
        self.epoch += 1;
        let (send, recv) = Self::chains(self.role, &root, self.epoch);
        self.send = send;
        let old = std::mem::replace(&mut self.recv, recv);
        self.recv_previous = Some(old);
        self.epoch_started_ms = now_ms;
        self.messages_in_epoch = 0;
        self.rekeys += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::AccountKeypair;

    struct Device {
        key: SigningKey,
        cert: DeviceCertificate,
    }

    fn device(seed: u8) -> Device {
        let key = SigningKey::from_bytes(&[seed; 32]);
        let public = DevicePublicKey::from_bytes(key.verifying_key().to_bytes()).unwrap();
        let cert = AccountKeypair::from_secret_bytes(&[seed.wrapping_add(100); 32])
            .certify(public, &format!("d{seed}"), 0)
            .unwrap();
        Device { key, cert }
    }

    fn local(d: &Device) -> LocalDevice<'_> {
        LocalDevice {
            signing_key: &d.key,
            certificate: &d.cert,
        }
    }

    fn handshake(
        a: &Device,
        b: &Device,
        id: [u8; 16],
    ) -> Result<(SecretSession, SecretSession), SessionError> {
        let (hs_a, m1) = Handshake::initiate(id, &local(a), b.cert.device, [1; 32])?;
        let (hs_b, m2) = Handshake::respond(id, &local(b), a.cert.device, [2; 32], &m1)?;
        let done_a = hs_a.on_message(&m2, 0)?;
        let m3 = done_a.reply.expect("the initiator sends the third message");
        let done_b = hs_b.on_message(&m3, 0)?;
        assert!(done_b.reply.is_none());
        Ok((done_a.session, done_b.session))
    }

    /// Opens every frame waiting for `to`, in order, counting payloads and
    /// queueing its answers for the other side.
    fn deliver(
        to: &mut SecretSession,
        inbox: &mut Vec<SecretFrame>,
        outbox: &mut Vec<SecretFrame>,
        got: &mut usize,
    ) {
        for f in std::mem::take(inbox) {
            let o = to.open(&f, 0, [1; 32]).unwrap();
            *got += usize::from(o.payload.is_some());
            outbox.extend(o.reply);
        }
    }

    /// Tries every captured key on every recorded frame: none may open one.
    fn assert_no_key_opens(candidates: &[[u8; 32]], recorded: &[SecretFrame]) {
        for f in recorded {
            for key in candidates {
                let opened = cipher(key).decrypt(
                    XNonce::from_slice(&[0u8; 24]),
                    Payload {
                        msg: &f.ciphertext,
                        aad: &aad(f.epoch, f.n),
                    },
                );
                assert!(opened.is_err(), "a captured key opened frame {}", f.n);
            }
        }
    }

    /// Sends `text` from `from` to `to`, delivering every frame in order,
    /// answering re-key offers. Returns the payloads `to` received.
    fn exchange(
        from: &mut SecretSession,
        to: &mut SecretSession,
        text: &[u8],
        seed: u8,
    ) -> Vec<Vec<u8>> {
        let mut got = Vec::new();
        for f in from.seal(text, 0, [seed; 32]).unwrap() {
            let opened = to.open(&f, 0, [seed.wrapping_add(1); 32]).unwrap();
            got.extend(opened.payload);
            for r in opened.reply {
                assert!(from.open(&r, 0, [0; 32]).unwrap().payload.is_none());
            }
        }
        got
    }

    #[test]
    fn both_sides_agree_on_the_fingerprint_and_can_talk() {
        let (a, b) = (device(1), device(2));
        let (mut sa, mut sb) = handshake(&a, &b, [7; 16]).unwrap();
        assert_eq!(sa.fingerprint(), sb.fingerprint());
        assert_eq!(
            exchange(&mut sa, &mut sb, b"hello", 3),
            vec![b"hello".to_vec()]
        );
        assert_eq!(
            exchange(&mut sb, &mut sa, b"hi back", 4),
            vec![b"hi back".to_vec()]
        );
    }

    #[test]
    fn a_device_other_than_the_expected_one_is_refused() {
        let (a, b, mallory) = (device(1), device(2), device(3));
        // A expects B, but Mallory answers with her own valid certificate.
        let (hs_a, m1) = Handshake::initiate([7; 16], &local(&a), b.cert.device, [1; 32]).unwrap();
        let (_, m2) =
            Handshake::respond([7; 16], &local(&mallory), a.cert.device, [2; 32], &m1).unwrap();
        assert!(matches!(
            hs_a.on_message(&m2, 0),
            Err(SessionError::WrongPeer)
        ));
    }

    #[test]
    fn a_stolen_certificate_without_the_device_key_is_refused() {
        let (a, b, mallory) = (device(1), device(2), device(3));
        // Mallory presents B's certificate but signs with her own key.
        let forged = Device {
            key: mallory.key.clone(),
            cert: b.cert.clone(),
        };
        let (hs_a, m1) = Handshake::initiate([7; 16], &local(&a), b.cert.device, [1; 32]).unwrap();
        let (_, m2) =
            Handshake::respond([7; 16], &local(&forged), a.cert.device, [2; 32], &m1).unwrap();
        assert!(matches!(
            hs_a.on_message(&m2, 0),
            Err(SessionError::BadIdentityProof)
        ));
    }

    #[test]
    fn a_middleman_running_two_handshakes_gets_two_different_fingerprints() {
        let (a, b, m) = (device(1), device(2), device(3));
        // If A and B were each talking to M (say, each was tricked into
        // expecting M's device), the fingerprints they compare differ.
        let (sa, _) = handshake(&a, &m, [7; 16]).unwrap();
        let (_, sb) = handshake(&m, &b, [7; 16]).unwrap();
        assert_ne!(sa.fingerprint(), sb.fingerprint());
        assert_ne!(sa.fingerprint().emoji_line(), sb.fingerprint().emoji_line());
    }

    #[test]
    fn the_handshake_is_bound_to_the_chat_id() {
        let (a, b) = (device(1), device(2));
        // B believes the request was for another secret chat: A refuses B's answer.
        let (hs_a, m1) = Handshake::initiate([7; 16], &local(&a), b.cert.device, [1; 32]).unwrap();
        let (_, m2) = Handshake::respond([8; 16], &local(&b), a.cert.device, [2; 32], &m1).unwrap();
        assert!(hs_a.on_message(&m2, 0).is_err());
    }

    #[test]
    fn replayed_reordered_and_tampered_frames_are_refused_and_the_chat_goes_on() {
        let (a, b) = (device(1), device(2));
        let (mut sa, mut sb) = handshake(&a, &b, [7; 16]).unwrap();
        let f0 = sa.seal(b"zero", 0, [0; 32]).unwrap().remove(0);
        let f1 = sa.seal(b"one", 0, [0; 32]).unwrap().remove(0);
        let f2 = sa.seal(b"two", 0, [0; 32]).unwrap().remove(0);

        // Reordered: 1 before 0 is a gap, and changes nothing.
        assert_eq!(
            sb.open(&f1, 0, [0; 32]),
            Err(SessionError::Gap {
                expected: 0,
                got: 1
            })
        );
        // Tampered: every single-bit flip of the ciphertext is refused.
        for i in 0..f0.ciphertext.len() * 8 {
            let mut bad = f0.clone();
            bad.ciphertext[i / 8] ^= 1 << (i % 8);
            assert_eq!(
                sb.open(&bad, 0, [0; 32]),
                Err(SessionError::Tampered),
                "bit {i}"
            );
        }
        // A forged header (other epoch or number) does not authenticate either.
        let mut moved = f1.clone();
        moved.n = 0;
        assert_eq!(sb.open(&moved, 0, [0; 32]), Err(SessionError::Tampered));

        assert_eq!(sb.open(&f0, 0, [0; 32]).unwrap().payload.unwrap(), b"zero");
        assert_eq!(
            sb.open(&f0, 0, [0; 32]),
            Err(SessionError::Replay { got: 0 })
        );
        assert_eq!(sb.open(&f1, 0, [0; 32]).unwrap().payload.unwrap(), b"one");
        assert_eq!(sb.open(&f2, 0, [0; 32]).unwrap().payload.unwrap(), b"two");
        // Decoding bounds hold for frames off the wire.
        assert!(SecretFrame::decode(&vec![1u8; SecretFrame::MAX_LEN + 1]).is_err());
    }

    #[test]
    fn a_restored_snapshot_carries_on_where_the_session_stopped() {
        let (a, b) = (device(1), device(2));
        let (mut sa, mut sb) = handshake(&a, &b, [7; 16]).unwrap();
        // Past a re-key, with a message of B's in flight, both sides restart.
        for i in 0..130u8 {
            exchange(&mut sa, &mut sb, &[i; 8], i);
        }
        let in_flight = sb.seal(b"while restarting", 0, [3; 32]).unwrap();
        let bytes_a = sa.snapshot().encode();
        let bytes_b = sb.snapshot().encode();
        let mut sa = SecretSession::restore(&SessionSnapshot::decode(&bytes_a).unwrap());
        let mut sb = SecretSession::restore(&SessionSnapshot::decode(&bytes_b).unwrap());
        assert!(sa.rekeys() >= 1);
        assert_eq!(
            (sa.next_expected(), sb.next_send()),
            (in_flight[0].n, in_flight[0].n + 1)
        );
        let got = sa.open(&in_flight[0], 0, [0; 32]).unwrap();
        assert_eq!(got.payload.unwrap(), b"while restarting");
        assert_eq!(
            exchange(&mut sa, &mut sb, b"after", 1),
            vec![b"after".to_vec()]
        );
        assert_eq!(
            exchange(&mut sb, &mut sa, b"back", 2),
            vec![b"back".to_vec()]
        );
        // A damaged snapshot is refused, not half-loaded.
        let mut damaged = bytes_a.clone();
        damaged.truncate(bytes_a.len() - 3);
        assert!(SessionSnapshot::decode(&damaged).is_err());
    }

    #[test]
    fn re_keys_happen_every_100_messages_and_every_week() {
        let (a, b) = (device(1), device(2));
        let (mut sa, mut sb) = handshake(&a, &b, [7; 16]).unwrap();
        for i in 0..250u32 {
            let msg = format!("message {i}");
            let got = if i % 3 == 0 {
                exchange(&mut sb, &mut sa, msg.as_bytes(), i as u8)
            } else {
                exchange(&mut sa, &mut sb, msg.as_bytes(), i as u8)
            };
            assert_eq!(got, vec![msg.into_bytes()], "message {i}");
        }
        assert!(sa.rekeys() >= 2, "only {} re-keys", sa.rekeys());
        assert_eq!(sa.epoch(), sb.epoch());

        // A week of silence: the next message re-keys first.
        let before = sb.rekeys();
        let frames = sb
            .seal(b"a week later", REKEY_AFTER_MS + 1, [9; 32])
            .unwrap();
        assert_eq!(frames.len(), 2, "a re-key offer should lead");
        for f in frames {
            for r in sa.open(&f, REKEY_AFTER_MS + 1, [10; 32]).unwrap().reply {
                sb.open(&r, REKEY_AFTER_MS + 1, [0; 32]).unwrap();
            }
        }
        assert_eq!(sb.rekeys(), before + 1);
    }

    #[test]
    fn a_state_captured_mid_epoch_does_not_open_that_epochs_earlier_frames() {
        let (a, b) = (device(1), device(2));
        let (mut sa, mut sb) = handshake(&a, &b, [7; 16]).unwrap();
        let mut recorded = Vec::new();
        for i in 0..30u8 {
            for f in sa.seal(&[i; 40], 0, [i; 32]).unwrap() {
                recorded.push(f.clone());
                sb.open(&f, 0, [0; 32]).unwrap();
            }
        }
        assert_eq!(sb.epoch(), 0);
        // Everything B keeps, as it would be saved to disk, and every key
        // that can be derived forward from it.
        let saved =
            SecretSession::restore(&SessionSnapshot::decode(&sb.snapshot().encode()).unwrap());
        let mut candidates = vec![*saved.rekey_base, saved.short_code_key, saved.fingerprint];
        for chain in [&saved.recv, &saved.send] {
            let mut c = chain.clone();
            for _ in 0..200 {
                candidates.push(*c.message_key());
                candidates.push(*c.key);
                c.advance();
            }
        }
        for root_like in [*saved.rekey_base, saved.short_code_key] {
            let (s, r) = SecretSession::chains(Role::Responder, &root_like, 0);
            candidates.extend([*s.message_key(), *r.message_key()]);
        }
        assert_no_key_opens(&candidates, &recorded);
    }

    #[test]
    fn crossing_re_key_offers_settle_on_one_new_key() {
        let (a, b) = (device(1), device(2));
        let (mut sa, mut sb) = handshake(&a, &b, [7; 16]).unwrap();
        // Both sides send at once, with frames in flight both ways, past the
        // point where each offers a re-key.
        let mut to_b: Vec<SecretFrame> = Vec::new();
        let mut to_a: Vec<SecretFrame> = Vec::new();
        let (mut got_a, mut got_b) = (0, 0);
        for round in 0..150u32 {
            to_b.extend(
                sa.seal(format!("a{round}").as_bytes(), 0, [round as u8; 32])
                    .unwrap(),
            );
            to_a.extend(
                sb.seal(format!("b{round}").as_bytes(), 0, [round as u8 ^ 0xff; 32])
                    .unwrap(),
            );
            // Deliver in batches, as the node does, so offers cross.
            if round % 7 == 6 {
                deliver(&mut sb, &mut to_b, &mut to_a, &mut got_b);
                deliver(&mut sa, &mut to_a, &mut to_b, &mut got_a);
            }
        }
        while !to_a.is_empty() || !to_b.is_empty() {
            deliver(&mut sb, &mut to_b, &mut to_a, &mut got_b);
            deliver(&mut sa, &mut to_a, &mut to_b, &mut got_a);
        }
        assert_eq!((got_a, got_b), (150, 150));
        assert!(sa.rekeys() >= 2, "{} re-keys", sa.rekeys());
        assert_eq!(sa.epoch(), sb.epoch());
        assert_eq!(
            exchange(&mut sa, &mut sb, b"still", 1),
            vec![b"still".to_vec()]
        );
        assert_eq!(
            exchange(&mut sb, &mut sa, b"fine", 2),
            vec![b"fine".to_vec()]
        );
    }

    #[test]
    fn keys_captured_after_a_re_key_do_not_open_earlier_frames() {
        let (a, b) = (device(1), device(2));
        let (mut sa, mut sb) = handshake(&a, &b, [7; 16]).unwrap();
        // An eavesdropper records everything A sends in the first epoch.
        let mut recorded = Vec::new();
        for i in 0..50u8 {
            for f in sa.seal(&[i; 40], 0, [i; 32]).unwrap() {
                recorded.push(f.clone());
                sb.open(&f, 0, [0; 32]).unwrap();
            }
        }
        for i in 0..120u8 {
            exchange(&mut sa, &mut sb, &[i; 8], i);
        }
        assert!(sb.rekeys() >= 1);

        // Then captures B's whole state: root, both chains, the previous one.
        let mut candidates: Vec<[u8; 32]> = vec![*sb.rekey_base];
        for chain in [Some(&sb.recv), Some(&sb.send), sb.recv_previous.as_ref()]
            .into_iter()
            .flatten()
        {
            let mut c = chain.clone();
            for _ in 0..500 {
                candidates.push(*c.message_key());
                c.advance();
            }
        }
        assert_no_key_opens(&candidates, &recorded);
    }
}
