//! One entry of a cloud chat's log: a signed cleartext header and an
//! optional encrypted body, kept apart.
//!
//! The header is what storage peers verify without any key: who wrote it
//! (a device certificate, which names the account), which heads the author
//! had seen (`parents`), its place in the author device's sequence, its
//! Lamport clock, its key epoch, what kind of entry it is, and the hash of
//! its body. The entry's hash is the header's, and children name their
//! parents by it: the log is a hash-linked DAG.
//!
//! A device signs its entries a run at a time: one Ed25519 signature over
//! the root of a Merkle tree whose leaves are the hashes of the run's
//! entries (at most [`MAX_RUN`]). Each entry carries the signature and its
//! path to the root ([`RunPath`]), so it still verifies alone, wherever it
//! travels without the rest of its run; a run of one is a plain signature
//! over the entry's hash. A holder that checks several entries of one run
//! checks the signature once. See `docs/cloud-chats.md`, "Signing runs".
//!
//! The body is only referenced by hash, so a purge can drop the ciphertext
//! from every disk while the header, and with it the chain, still verifies.

use std::{fmt, sync::Arc};

use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};

use super::{
    account::{MAX_ADDR_LEN, MAX_ADDRS, MAX_DEVICES, MAX_STORAGE_PEERS, StoragePeer},
    keys::{EncryptionPublicKey, WrappedKey, short_hex},
    signatures::{self, Signed},
};
use crate::{
    codec::{DecodeError, Record, bytes64},
    identity::{AccountId, DeviceCertificate, DevicePublicKey},
};

/// Most parents an entry may name.
pub const MAX_PARENTS: usize = 16;
/// Most members a chat may have.
pub const MAX_MEMBERS: usize = 512;
/// Most entries one purge may name.
pub const MAX_PURGE_TARGETS: usize = 256;
/// Largest encrypted body (content record plus the AEAD tag).
pub const MAX_BODY_CIPHERTEXT: usize = super::content::MAX_PADDED_LEN + 16;
/// Largest encoded header with its signature and run path.
pub const MAX_HEADER_LEN: usize = 128 * 1024;

/// Most entries one signature covers (a run's Merkle tree is then at most
/// [`MAX_RUN_DEPTH`] deep).
pub const MAX_RUN: usize = 256;
/// Most siblings on an entry's path to its run's root.
pub const MAX_RUN_DEPTH: usize = 8;

const SIGNATURE_DOMAIN: &[u8; 24] = b"tern cloud entry run v1\0";
/// What a device signs: the domain, the run's length, its root.
pub(crate) type RunMessage = [u8; 24 + 2 + 32];
/// Room reserved for encoding a header: a message's header (certificate,
/// parents, body hash) fits, so it is encoded without growing.
const TYPICAL_HEADER_LEN: usize = 512;
const ENTRY_HASH_CONTEXT: &str = "tern cloud entry hash v2";
const RUN_NODE_CONTEXT: &str = "tern cloud entry run node v1";
const BODY_HASH_CONTEXT: &str = "tern cloud body hash v1";

/// A cloud chat's identity: 16 random bytes drawn by its creator.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ChatId(pub [u8; 16]);

impl fmt::Debug for ChatId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChatId({})", short_hex(&self.0))
    }
}

impl fmt::Display for ChatId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&crate::identity::base32_lower(&self.0))
    }
}

/// The blake3 hash of an entry's header: its name in the log, and its leaf
/// in the run its device signed.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct EntryHash(pub [u8; 32]);

impl fmt::Debug for EntryHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EntryHash({})", short_hex(&self.0))
    }
}

/// The blake3 hash of an encrypted body.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct BodyHash(pub [u8; 32]);

impl fmt::Debug for BodyHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BodyHash({})", short_hex(&self.0))
    }
}

/// A member as the log carries it: the account, its encryption key, and the
/// chat key of the entry's epoch wrapped to that key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberGrant {
    pub account: AccountId,
    pub encryption_key: EncryptionPublicKey,
    pub wrapped_key: WrappedKey,
}

/// A new key wrapped to an existing member.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyGrant {
    pub account: AccountId,
    pub wrapped_key: WrappedKey,
}

/// An account's new encryption key sealed to one of its devices.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceKeyGrant {
    pub device: DevicePublicKey,
    pub wrapped_key: WrappedKey,
}

/// The author's account revoked some of its devices and took a new
/// encryption key: its public half, the key sealed to each device that
/// stays (the author's among them), and the devices revoked.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountKeyChange {
    /// Counts the account's keys: the one derived from the account key is
    /// 0, each revocation takes the next. The highest one known is the
    /// account's current key.
    pub generation: u32,
    pub encryption_key: EncryptionPublicKey,
    pub devices: Vec<DeviceKeyGrant>,
    pub revoked: Vec<DevicePublicKey>,
}

/// What an entry does. In cleartext, because storage peers must check who
/// may do what without reading content.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EntryKind {
    /// The first entry: the members (each with the first chat key wrapped,
    /// epoch 0) and the admins. With no admins, any member manages
    /// membership; with admins, only they do. The body, if any, holds the
    /// encrypted title.
    Genesis {
        members: Vec<MemberGrant>,
        admins: Vec<AccountId>,
    },
    /// Encrypted content in the body: text, edit, read receipt, title.
    Message,
    /// Adds a member and gives it the chat key of this entry's epoch: it
    /// reads this epoch and what follows; earlier epochs stay closed to it.
    AddMember { member: MemberGrant },
    /// Removes a member (or the author leaves) and rotates the key: a fresh
    /// secret is wrapped to every remaining member at `new_epoch`.
    RemoveMember {
        account: AccountId,
        new_epoch: u32,
        grants: Vec<KeyGrant>,
    },
    /// Rotates the key without a membership change.
    Rekey {
        new_epoch: u32,
        grants: Vec<KeyGrant>,
    },
    /// Delete for everyone: the bodies of these entries are erased
    /// everywhere; their headers stay so the chain still verifies.
    Purge { targets: Vec<EntryHash> },
    /// The chat's storage set: the peers that keep the log and the write
    /// quorum among them. The latest one among an entry's ancestors (in
    /// display order) is in force. No body.
    Storage { peers: Vec<StoragePeer>, quorum: u8 },
    /// The author's account revoked devices: the key rotates as in
    /// `Rekey`, with the author's account's grant wrapped to its new
    /// encryption key, which every other member wraps to from now on.
    /// Entries of the revoked devices that follow this one are refused.
    /// (Last, so that the variants before it keep their encodings.)
    AccountKey {
        new_epoch: u32,
        grants: Vec<KeyGrant>,
        change: AccountKeyChange,
    },
}

impl EntryKind {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Genesis { .. } => "genesis",
            Self::Message => "message",
            Self::AddMember { .. } => "add-member",
            Self::RemoveMember { .. } => "remove-member",
            Self::Rekey { .. } => "rekey",
            Self::Purge { .. } => "purge",
            Self::Storage { .. } => "storage",
            Self::AccountKey { .. } => "account-key",
        }
    }

    /// Whether applying this entry can change who is in the chat or the key.
    pub fn changes_membership(&self) -> bool {
        matches!(
            self,
            Self::Genesis { .. }
                | Self::AddMember { .. }
                | Self::RemoveMember { .. }
                | Self::Rekey { .. }
                | Self::AccountKey { .. }
        )
    }

    /// Whether applying this entry changes the state later entries are
    /// checked against: membership, key, or storage set.
    pub fn changes_state(&self) -> bool {
        self.changes_membership() || matches!(self, Self::Storage { .. })
    }
}

/// An account key change's bounds: 1 to [`MAX_DEVICES`] devices that keep
/// the key (the author's among them) and 1 to [`MAX_DEVICES`] revoked ones,
/// each named once, none both.
fn check_account_key_change(
    change: &AccountKeyChange,
    author: &DevicePublicKey,
) -> Result<(), EntryError> {
    let bad = |why| Err(EntryError::Shape(why));
    if change.generation == 0 {
        return bad("generation 0 is the account's derived key; a change takes a later one");
    }
    let kept: Vec<DevicePublicKey> = change.devices.iter().map(|g| g.device).collect();
    if kept.is_empty() || kept.len() > MAX_DEVICES {
        return bad("an account key goes to 1 to 16 devices");
    }
    if change.revoked.is_empty() || change.revoked.len() > MAX_DEVICES {
        return bad("an account key change revokes 1 to 16 devices");
    }
    if has_duplicates(&kept) || has_duplicates(&change.revoked) {
        return bad("a device is named twice in an account key change");
    }
    if !kept.contains(author) {
        return bad("the author's own device keeps the new account key");
    }
    if change.revoked.iter().any(|d| kept.contains(d)) {
        return bad("a revoked device cannot keep the new account key");
    }
    Ok(())
}

/// A storage set's bounds: 1 to [`MAX_STORAGE_PEERS`] distinct nodes, each
/// with at most [`MAX_ADDRS`] addresses of at most [`MAX_ADDR_LEN`] bytes,
/// and a quorum from 1 to the number of peers.
pub fn check_storage_set(peers: &[StoragePeer], quorum: u8) -> Result<(), EntryError> {
    let bad = |why| Err(EntryError::Shape(why));
    if peers.is_empty() || peers.len() > MAX_STORAGE_PEERS {
        return bad("a storage set has 1 to 8 peers");
    }
    if quorum == 0 || usize::from(quorum) > peers.len() {
        return bad("a storage quorum is 1 to the number of peers");
    }
    let nodes: Vec<_> = peers.iter().map(|p| p.node).collect();
    if has_duplicates(&nodes) {
        return bad("a storage peer is listed twice");
    }
    if peers
        .iter()
        .any(|p| p.addrs.len() > MAX_ADDRS || p.addrs.iter().any(|a| a.len() > MAX_ADDR_LEN))
    {
        return bad("a storage peer has too many or too long addresses");
    }
    Ok(())
}

/// Why an entry is malformed or its signature does not hold.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EntryError {
    #[error("entry shape: {0}")]
    Shape(&'static str),
    #[error("the author's device certificate does not verify")]
    BadCertificate,
    #[error("the device signature on the header does not verify")]
    BadSignature,
    #[error("the body does not match the header's body hash")]
    BodyMismatch,
    #[error("the entry carries a body but its header names none")]
    UnexpectedBody,
}

/// The signed, cleartext part of an entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryHeader {
    pub chat: ChatId,
    /// Shared: a log holds one copy per certificate, not one per entry.
    pub author: Arc<DeviceCertificate>,
    /// The heads the author had seen; empty only for genesis.
    pub parents: Vec<EntryHash>,
    /// Per author device: 0, 1, 2, … Two entries with the same device and
    /// seq are a fork.
    pub seq: u64,
    /// 1 + the largest parent's, 0 for genesis. (lamport, hash) is the
    /// display order every holder agrees on.
    pub lamport: u64,
    /// The key epoch the body is encrypted under.
    pub epoch: u32,
    pub kind: EntryKind,
    pub body_hash: Option<BodyHash>,
}

impl EntryHeader {
    /// Structural rules that need no other entry. Storage and member logs
    /// both call this first.
    pub fn check_shape(&self) -> Result<(), EntryError> {
        let bad = |why| Err(EntryError::Shape(why));
        if self.parents.len() > MAX_PARENTS {
            return bad("too many parents");
        }
        if has_duplicates(&self.parents) {
            return bad("a parent is named twice");
        }
        let genesis = matches!(self.kind, EntryKind::Genesis { .. });
        if genesis != self.parents.is_empty() {
            return bad("genesis, and only genesis, has no parents");
        }
        if genesis && (self.seq != 0 || self.lamport != 0 || self.epoch != 0) {
            return bad("genesis has seq, lamport and epoch 0");
        }
        if !genesis && self.lamport == 0 {
            return bad("only genesis has lamport 0");
        }
        match &self.kind {
            EntryKind::Genesis { members, admins } => {
                if members.len() < 2 || members.len() > MAX_MEMBERS {
                    return bad("a chat has 2 to 512 members");
                }
                let accounts: Vec<_> = members.iter().map(|m| m.account).collect();
                if has_duplicates(&accounts) {
                    return bad("a member is listed twice");
                }
                if has_duplicates(admins) || admins.iter().any(|a| !accounts.contains(a)) {
                    return bad("admins must be distinct members");
                }
            }
            EntryKind::Message => {
                if self.body_hash.is_none() {
                    return bad("a message has a body");
                }
            }
            EntryKind::AddMember { .. } => {}
            EntryKind::RemoveMember {
                new_epoch, grants, ..
            }
            | EntryKind::Rekey { new_epoch, grants }
            | EntryKind::AccountKey {
                new_epoch, grants, ..
            } => {
                if self.epoch.checked_add(1) != Some(*new_epoch) {
                    return bad("a rotation opens the epoch after its own");
                }
                if grants.len() > MAX_MEMBERS {
                    return bad("too many key grants");
                }
                let accounts: Vec<_> = grants.iter().map(|g| g.account).collect();
                if has_duplicates(&accounts) {
                    return bad("a key grant is listed twice");
                }
                if let EntryKind::AccountKey { change, .. } = &self.kind {
                    check_account_key_change(change, &self.author.device)?;
                }
            }
            EntryKind::Purge { targets } => {
                if targets.is_empty() || targets.len() > MAX_PURGE_TARGETS {
                    return bad("a purge names 1 to 256 entries");
                }
                if has_duplicates(targets) {
                    return bad("a purge target is named twice");
                }
            }
            EntryKind::Storage { peers, quorum } => check_storage_set(peers, *quorum)?,
        }
        let may_have_body = matches!(self.kind, EntryKind::Genesis { .. } | EntryKind::Message);
        if !may_have_body && self.body_hash.is_some() {
            return bad("only genesis and messages have bodies");
        }
        Ok(())
    }

    /// The entry's name: blake3 over the encoded header.
    pub fn hash(&self) -> EntryHash {
        // Plain structs and enums: postcard cannot fail on them.
        let encoded = postcard::to_extend(self, Vec::with_capacity(TYPICAL_HEADER_LEN))
            .expect("headers are serialisable");
        let mut hasher = blake3::Hasher::new_derive_key(ENTRY_HASH_CONTEXT);
        hasher.update(&encoded);
        EntryHash(*hasher.finalize().as_bytes())
    }

    /// Signs the header alone with the author device's key: a run of one.
    pub fn sign(self, device_key: &SigningKey) -> SignedHeader {
        let (signature, run) = sign_run(&[self.hash()], device_key)
            .pop()
            .expect("one proof per hash");
        SignedHeader {
            header: self,
            signature,
            run,
        }
    }

    /// The header before it is signed, for a run its device signs later
    /// ([`crate::cloud::ChatMember::sign_composed`]). It verifies nowhere until then.
    pub(crate) fn unsigned(self) -> SignedHeader {
        SignedHeader {
            header: self,
            signature: [0; 64],
            run: RunPath::default(),
        }
    }
}

/// Where an entry sits in the run of its device's entries that one
/// signature covers: its index among the run's `len` leaves and the
/// sibling hashes from its leaf up to the root. Odd nodes out at a level
/// move up unpaired, so a run of any length has a tree and no leaf is
/// repeated. `len` 0 marks a header not signed yet.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunPath {
    pub index: u16,
    pub len: u16,
    pub siblings: Vec<[u8; 32]>,
}

impl RunPath {
    /// The run's root from this entry's hash, or `None` when the path
    /// does not fit the run's shape (index, length and sibling count).
    fn root(&self, leaf: &EntryHash) -> Option<[u8; 32]> {
        self.check_bounds().ok()?;
        let (mut index, mut len) = (usize::from(self.index), usize::from(self.len));
        let mut node = leaf.0;
        let mut siblings = self.siblings.iter();
        while len > 1 {
            if index % 2 == 1 {
                node = run_node(siblings.next()?, &node);
            } else if index + 1 < len {
                node = run_node(&node, siblings.next()?);
            }
            index /= 2;
            len = len.div_ceil(2);
        }
        siblings.next().is_none().then_some(node)
    }

    /// Bounds checked at decode, before any hashing.
    fn check_bounds(&self) -> Result<(), EntryError> {
        let len = usize::from(self.len);
        if len == 0 || len > MAX_RUN || self.index >= self.len {
            return Err(EntryError::Shape("a run has 1 to 256 entries"));
        }
        if self.siblings.len() > MAX_RUN_DEPTH {
            return Err(EntryError::Shape("a run path is at most 8 deep"));
        }
        Ok(())
    }
}

fn run_node(left: &[u8; 32], right: &[u8; 32]) -> [u8; 32] {
    let mut hasher = blake3::Hasher::new_derive_key(RUN_NODE_CONTEXT);
    hasher.update(left);
    hasher.update(right);
    *hasher.finalize().as_bytes()
}

fn run_message(len: u16, root: &[u8; 32]) -> RunMessage {
    let mut m = [0u8; 24 + 2 + 32];
    m[..24].copy_from_slice(SIGNATURE_DOMAIN);
    m[24..26].copy_from_slice(&len.to_le_bytes());
    m[26..].copy_from_slice(root);
    m
}

/// Signs the entries named by `hashes` (one device's, in order) a run at a
/// time, at most [`MAX_RUN`] per signature: each entry's signature and
/// path, in the same order.
pub fn sign_run(hashes: &[EntryHash], device_key: &SigningKey) -> Vec<([u8; 64], RunPath)> {
    let mut proofs = Vec::with_capacity(hashes.len());
    for run in hashes.chunks(MAX_RUN) {
        let len = u16::try_from(run.len()).expect("a run is at most MAX_RUN long");
        let mut paths: Vec<RunPath> = (0..len)
            .map(|index| RunPath {
                index,
                len,
                siblings: Vec::new(),
            })
            .collect();
        // Each node of the level with the leaves under it (a range).
        let mut level: Vec<([u8; 32], std::ops::Range<usize>)> = run
            .iter()
            .enumerate()
            .map(|(i, h)| (h.0, i..i + 1))
            .collect();
        while level.len() > 1 {
            let mut next = Vec::with_capacity(level.len().div_ceil(2));
            for pair in level.chunks(2) {
                match pair {
                    [(left, l), (right, r)] => {
                        for path in &mut paths[l.clone()] {
                            path.siblings.push(*right);
                        }
                        for path in &mut paths[r.clone()] {
                            path.siblings.push(*left);
                        }
                        next.push((run_node(left, right), l.start..r.end));
                    }
                    [odd] => next.push(odd.clone()),
                    _ => unreachable!("chunks of two"),
                }
            }
            level = next;
        }
        let signature = device_key.sign(&run_message(len, &level[0].0)).to_bytes();
        proofs.extend(paths.into_iter().map(|path| (signature, path)));
    }
    proofs
}

fn has_duplicates<T: Ord + Clone>(items: &[T]) -> bool {
    let mut sorted = items.to_vec();
    sorted.sort();
    sorted.windows(2).any(|w| w[0] == w[1])
}

/// A header and its author device's signature: over the root of the run
/// the entry belongs to, with the entry's path to that root.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedHeader {
    pub header: EntryHeader,
    #[serde(with = "bytes64")]
    pub signature: [u8; 64],
    pub run: RunPath,
}

impl SignedHeader {
    /// Whether `record` (an [`Entry`]'s encoding, version byte included,
    /// as kept on disk) is the entry of this header with a body, found by
    /// comparing bytes: a holder can send such a record on without decoding
    /// the body (whoever receives it checks the body).
    pub fn heads_record_with_body(&self, record: &[u8]) -> bool {
        let mut header = Vec::with_capacity(TYPICAL_HEADER_LEN);
        crate::codec::encode_nested(self, &mut header);
        // The version, the header, then the body's `Some`.
        record
            .strip_prefix(&[Entry::VERSION])
            .and_then(|r| r.strip_prefix(header.as_slice()))
            .and_then(|body| body.first())
            == Some(&1)
    }

    /// The entry's name: the header's hash ([`EntryHeader::hash`]). The
    /// signature is not part of it: only the device can sign, and a
    /// header with a forged signature names the same entry and is refused.
    pub fn hash(&self) -> EntryHash {
        self.header.hash()
    }

    /// Whether the device has signed this header (it may still be waiting
    /// for the rest of its run, on its author's device only).
    pub fn is_signed(&self) -> bool {
        self.run.len > 0
    }

    /// What the device signed, given the entry's hash: the run's root.
    pub(crate) fn signed_message(&self, hash: &EntryHash) -> Result<RunMessage, EntryError> {
        let root = self.run.root(hash).ok_or(EntryError::BadSignature)?;
        Ok(run_message(self.run.len, &root))
    }

    /// Checks the certificate (the account vouches for the device) and the
    /// device's signature over the header.
    pub fn verify(&self) -> Result<(), EntryError> {
        self.header
            .author
            .verify()
            .map_err(|_| EntryError::BadCertificate)?;
        self.verify_signature()
    }

    /// The device's signature only, for a caller that already verified
    /// this exact certificate. The rule is [`super::signatures`]'s.
    pub fn verify_signature(&self) -> Result<(), EntryError> {
        self.verify_signature_of(&self.hash())
    }

    /// [`Self::verify_signature`] with the entry's hash already known.
    pub fn verify_signature_of(&self, hash: &EntryHash) -> Result<(), EntryError> {
        self.verify_message(&self.signed_message(hash)?)
    }

    /// The device's signature over `message` ([`Self::signed_message`]).
    pub(crate) fn verify_message(&self, message: &RunMessage) -> Result<(), EntryError> {
        let key = self.device_key()?;
        let signed = Signed {
            key: &key,
            message,
            signature: &self.signature,
        };
        match signatures::verify(&signed) {
            true => Ok(()),
            false => Err(EntryError::BadSignature),
        }
    }

    fn device_key(&self) -> Result<VerifyingKey, EntryError> {
        self.header
            .author
            .device
            .verifying_key()
            .map_err(|_| EntryError::BadCertificate)
    }

    pub fn author_account(&self) -> AccountId {
        self.header.author.account
    }

    pub fn author_device(&self) -> DevicePublicKey {
        self.header.author.device
    }
}

/// An encrypted body: the nonce and the XChaCha20-Poly1305 ciphertext.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryBody {
    pub nonce: [u8; 24],
    #[serde(with = "crate::codec::bytes_vec")]
    pub ciphertext: Vec<u8>,
}

impl EntryBody {
    /// Over the fields, not an encoding, so it is the same however the body
    /// travelled.
    pub fn hash(&self) -> BodyHash {
        let mut hasher = blake3::Hasher::new_derive_key(BODY_HASH_CONTEXT);
        hasher.update(&self.nonce);
        hasher.update(&(self.ciphertext.len() as u64).to_le_bytes());
        hasher.update(&self.ciphertext);
        BodyHash(*hasher.finalize().as_bytes())
    }
}

/// An entry as it travels and as it is stored: the signed header and the
/// body, unless the body was purged (or has not arrived yet).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub header: SignedHeader,
    pub body: Option<EntryBody>,
}

impl Entry {
    pub fn hash(&self) -> EntryHash {
        self.header.hash()
    }

    /// Shape, certificate, signature and body hash: everything that can be
    /// checked from this entry alone.
    pub fn verify_alone(&self) -> Result<(), EntryError> {
        self.header.header.check_shape()?;
        self.header.verify()?;
        self.check_body()
    }

    /// The body, if present, is the one the header names.
    pub fn check_body(&self) -> Result<(), EntryError> {
        match (&self.body, self.header.header.body_hash) {
            (Some(_), None) => Err(EntryError::UnexpectedBody),
            (Some(body), Some(expected)) if body.hash() != expected => {
                Err(EntryError::BodyMismatch)
            }
            _ => Ok(()),
        }
    }

    /// The same entry without its body.
    pub fn without_body(&self) -> Entry {
        Entry {
            header: self.header.clone(),
            body: None,
        }
    }

    /// A key under which stored entries iterate in display order, which is
    /// also an order they can be inserted in (parents first): lamport
    /// big-endian, then the hash.
    pub fn storage_key(lamport: u64, hash: &EntryHash) -> [u8; 40] {
        let mut key = [0u8; 40];
        key[..8].copy_from_slice(&lamport.to_be_bytes());
        key[8..].copy_from_slice(&hash.0);
        key
    }
}

/// An entry this process just composed and signed with its own device key
/// (only [`crate::cloud::ChatMember`] makes one). Its author's log takes it
/// without checking the signature again: nothing but this process's own
/// signing could have produced it. Entries from anywhere else are plain
/// [`Entry`] values and are always verified.
///
/// It carries its hash, computed once: the author names, keeps and pushes
/// it by that hash, and it cannot change (no mutable access).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Composed {
    entry: Entry,
    hash: EntryHash,
}

impl Composed {
    pub(crate) fn new(entry: Entry) -> Self {
        let hash = entry.hash();
        Self { entry, hash }
    }

    pub fn entry(&self) -> &Entry {
        &self.entry
    }

    /// The entry's hash ([`Entry::hash`]), computed when it was composed.
    pub fn hash(&self) -> EntryHash {
        self.hash
    }

    pub fn into_entry(self) -> Entry {
        self.entry
    }
}

impl std::ops::Deref for Composed {
    type Target = Entry;
    fn deref(&self) -> &Entry {
        &self.entry
    }
}

impl From<Composed> for Entry {
    fn from(c: Composed) -> Entry {
        c.entry
    }
}

/// An entry whose device signature over its header, and whose body
/// against the hash its header names, verified (see [`Entry::precheck`]):
/// the costly checks of an entry that need nothing but the entry. A holder
/// runs them for a large batch on several threads, then inserts the
/// entries in order with [`crate::cloud::ChatLog::insert_checked`], which
/// checks everything else.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Prechecked {
    entry: Entry,
    hash: EntryHash,
}

impl Prechecked {
    pub fn entry(&self) -> &Entry {
        &self.entry
    }

    /// The entry's hash, computed once when it was checked.
    pub fn hash(&self) -> EntryHash {
        self.hash
    }

    pub fn into_entry(self) -> Entry {
        self.entry
    }

    pub(crate) fn into_parts(self) -> (Entry, EntryHash) {
        (self.entry, self.hash)
    }
}

impl Entry {
    /// Verifies the author device's signature over the header and the body
    /// against its hash, and only those (the certificate and the entry's
    /// place in its chat are for the log). On failure the entry comes back
    /// with the reason.
    #[allow(clippy::result_large_err)]
    pub fn precheck(self) -> Result<Prechecked, (Entry, EntryError)> {
        let hash = self.hash();
        match self
            .check_body()
            .and_then(|()| self.header.verify_signature_of(&hash))
        {
            Ok(()) => Ok(Prechecked { entry: self, hash }),
            Err(e) => Err((self, e)),
        }
    }

    /// [`Self::precheck`] for many entries at once: each body, then one
    /// check per distinct signature (the entries of one run share theirs),
    /// and those in one batch check (several times cheaper per signature
    /// than one by one). The verdicts are those each entry gets alone, in
    /// the entries' order.
    #[allow(clippy::result_large_err)]
    pub fn precheck_many(entries: Vec<Entry>) -> Vec<Result<Prechecked, (Entry, EntryError)>> {
        let hashes: Vec<EntryHash> = entries.iter().map(Entry::hash).collect();
        let prepared: Vec<Result<(VerifyingKey, RunMessage), EntryError>> = entries
            .iter()
            .zip(&hashes)
            .map(|(e, hash)| {
                e.check_body()?;
                Ok((e.header.device_key()?, e.header.signed_message(hash)?))
            })
            .collect();
        // Each entry's place among the distinct signatures, and their verdicts.
        let (slots, passed) = {
            let mut distinct = crate::collections::HashMap::default();
            let mut signed: Vec<Signed<'_>> = Vec::new();
            let slots: Vec<Option<usize>> = entries
                .iter()
                .zip(&prepared)
                .map(|(e, p)| {
                    let (key, message) = p.as_ref().ok()?;
                    let signature = &e.header.signature;
                    Some(
                        *distinct
                            .entry((key.as_bytes(), signature, message))
                            .or_insert_with(|| {
                                signed.push(Signed {
                                    key,
                                    message,
                                    signature,
                                });
                                signed.len() - 1
                            }),
                    )
                })
                .collect();
            (slots, signatures::verify_many(&signed))
        };
        entries
            .into_iter()
            .zip(hashes)
            .zip(prepared)
            .zip(slots)
            .map(|(((entry, hash), prepared), slot)| match (prepared, slot) {
                (Err(why), _) => Err((entry, why)),
                (Ok(_), Some(i)) if passed[i] => Ok(Prechecked { entry, hash }),
                (Ok(_), _) => Err((entry, EntryError::BadSignature)),
            })
            .collect()
    }
}

impl Record for Entry {
    /// 2: headers signed by runs ([`RunPath`]), entries named by the
    /// header's hash alone.
    const VERSION: u8 = 2;
    const MAX_LEN: usize = MAX_HEADER_LEN + MAX_BODY_CIPHERTEXT + 64;

    /// Structure only; signatures are checked by the log, which reports
    /// each failure distinctly.
    fn validate(&self) -> Result<(), DecodeError> {
        self.header
            .header
            .check_shape()
            .and_then(|()| self.header.run.check_bounds())
            .map_err(|e| DecodeError::Invalid(e.to_string()))?;
        match &self.body {
            Some(body) if body.ciphertext.len() > MAX_BODY_CIPHERTEXT => {
                Err(DecodeError::Invalid("body too large".into()))
            }
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;
    use crate::identity::AccountKeypair;

    fn device_key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    fn certificate(account: u8, device: u8) -> DeviceCertificate {
        let device =
            DevicePublicKey::from_bytes(device_key(device).verifying_key().to_bytes()).unwrap();
        AccountKeypair::from_secret_bytes(&[account; 32])
            .certify(device, "laptop", 1)
            .unwrap()
    }

    fn message_entry() -> Entry {
        let body = EntryBody {
            nonce: [1; 24],
            ciphertext: vec![2; 40],
        };
        let header = EntryHeader {
            chat: ChatId([3; 16]),
            author: certificate(1, 2).into(),
            parents: vec![EntryHash([4; 32])],
            seq: 1,
            lamport: 1,
            epoch: 0,
            kind: EntryKind::Message,
            body_hash: Some(body.hash()),
        }
        .sign(&device_key(2));
        Entry {
            header,
            body: Some(body),
        }
    }

    #[test]
    fn signed_entry_verifies_and_round_trips() {
        let entry = message_entry();
        entry.verify_alone().unwrap();
        let decoded = Entry::decode(&entry.encode()).unwrap();
        assert_eq!(decoded, entry);
        assert_eq!(decoded.hash(), entry.hash());
    }

    #[test]
    fn hash_covers_the_header_alone() {
        let entry = message_entry();
        assert_eq!(entry.without_body().hash(), entry.hash());
        let mut other = entry.clone();
        other.header.header.seq = 2;
        assert_ne!(other.hash(), entry.hash());
        // The signature is not part of the name: a forged one names the
        // same entry, and is refused.
        let mut forged = entry.clone();
        forged.header.signature[0] ^= 1;
        assert_eq!(forged.hash(), entry.hash());
        assert_eq!(forged.verify_alone(), Err(EntryError::BadSignature));
    }

    /// `n` message entries of device 2, each naming the one before, signed
    /// as runs.
    fn run_of(n: u64) -> Vec<Entry> {
        let headers: Vec<EntryHeader> = (1..=n)
            .map(|seq| {
                let mut h = message_entry().header.header;
                h.seq = seq;
                h.lamport = seq;
                h
            })
            .collect();
        let hashes: Vec<EntryHash> = headers.iter().map(EntryHeader::hash).collect();
        headers
            .into_iter()
            .zip(sign_run(&hashes, &device_key(2)))
            .map(|(header, (signature, run))| Entry {
                header: SignedHeader {
                    header,
                    signature,
                    run,
                },
                body: message_entry().body,
            })
            .collect()
    }

    #[test]
    fn a_run_is_signed_once_and_each_of_its_entries_verifies_alone() {
        for n in [1, 2, 3, 7, 8, 100, 256, 257, 600] {
            let run = run_of(n);
            let signatures: HashSet<[u8; 64]> = run.iter().map(|e| e.header.signature).collect();
            assert_eq!(
                signatures.len(),
                (n as usize).div_ceil(MAX_RUN),
                "run of {n}"
            );
            for e in &run {
                assert_eq!(
                    e.verify_alone(),
                    Ok(()),
                    "run of {n}, entry {}",
                    e.header.header.seq
                );
                assert!(e.header.run.siblings.len() <= MAX_RUN_DEPTH);
                assert_eq!(Entry::decode(&e.encode()).as_ref(), Ok(e));
            }
        }
    }

    #[test]
    fn a_run_path_moved_altered_or_stretched_does_not_verify() {
        let run = run_of(7);
        let refused = |e: &Entry| e.verify_alone() == Err(EntryError::BadSignature);
        // Another entry's place in the same run.
        let mut moved = run[2].clone();
        moved.header.run = run[3].header.run.clone();
        assert!(refused(&moved));
        // A header altered inside a signed run.
        let mut altered = run[4].clone();
        altered.header.header.lamport += 1;
        assert!(refused(&altered));
        // The path's index, length or siblings changed.
        for change in [
            &(|p: &mut RunPath| p.index ^= 1) as &dyn Fn(&mut RunPath),
            &|p| p.len += 1,
            &|p| p.len -= 1,
            &|p| p.siblings[0][0] ^= 1,
            &|p| p.siblings.push([0; 32]),
            &|p| {
                p.siblings.pop();
            },
            &|p| p.siblings.swap(0, 1),
        ] {
            let mut e = run[2].clone();
            change(&mut e.header.run);
            assert!(refused(&e), "{:?}", e.header.run);
        }
        // A run of one claimed by an entry of a longer run.
        let mut alone = run[0].clone();
        alone.header.run = RunPath {
            index: 0,
            len: 1,
            siblings: Vec::new(),
        };
        assert!(refused(&alone));
        // An unsigned header verifies nowhere.
        let unsigned = Entry {
            header: run[0].header.header.clone().unsigned(),
            body: None,
        };
        assert!(!unsigned.header.is_signed());
        assert!(refused(&unsigned));
    }

    #[test]
    fn run_paths_are_bounded_at_decode() {
        let entry = run_of(3).remove(1);
        for (change, why) in [
            (
                &(|p: &mut RunPath| p.len = 0) as &dyn Fn(&mut RunPath),
                "unsigned",
            ),
            (&|p| p.index = p.len, "index past the run"),
            (&|p| p.len = MAX_RUN as u16 + 1, "run too long"),
            (
                &|p| p.siblings = vec![[1; 32]; MAX_RUN_DEPTH + 1],
                "path too deep",
            ),
        ] {
            let mut e = entry.clone();
            change(&mut e.header.run);
            assert!(
                matches!(Entry::decode(&e.encode()), Err(DecodeError::Invalid(_))),
                "{why}"
            );
        }
    }

    #[test]
    fn a_batch_with_runs_gets_each_entrys_own_verdict() {
        let mut entries = run_of(40);
        entries.extend(run_of(3));
        entries[5].header.header.lamport += 100; // altered inside the run
        entries[41].header.signature[3] ^= 1; // a forged run signature
        if let Some(body) = entries[20].body.as_mut() {
            body.ciphertext[0] ^= 1; // an altered payload, its header intact
        }
        let alone: Vec<Result<(), EntryError>> = entries
            .iter()
            .map(|e| e.clone().precheck().map(drop).map_err(|(_, why)| why))
            .collect();
        let together: Vec<Result<(), EntryError>> = Entry::precheck_many(entries)
            .into_iter()
            .map(|r| r.map(drop).map_err(|(_, why)| why))
            .collect();
        assert_eq!(together, alone);
        // Only the three bad ones: the forged signature is the one copy's,
        // the rest of its run carries the good one.
        assert_eq!(together.iter().filter(|r| r.is_err()).count(), 3);
        assert_eq!(together[5], Err(EntryError::BadSignature));
        assert_eq!(together[41], Err(EntryError::BadSignature));
        assert_eq!(together[20], Err(EntryError::BodyMismatch));
    }

    /// A kept record is recognised as an entry's by its bytes alone: its
    /// own header's, with a body; not another header's, nor a record
    /// without a body, nor one of another version.
    #[test]
    fn a_record_is_known_as_its_headers_by_its_bytes() {
        let entry = message_entry();
        let record = entry.encode();
        assert!(entry.header.heads_record_with_body(&record));
        let mut other = entry.clone();
        other.header.header.lamport += 1;
        assert!(!other.header.heads_record_with_body(&record));
        assert!(
            !entry
                .header
                .heads_record_with_body(&entry.without_body().encode())
        );
        let mut old = record.clone();
        old[0] = Entry::VERSION - 1;
        assert!(!entry.header.heads_record_with_body(&old));
        assert!(
            !entry
                .header
                .heads_record_with_body(&record[..record.len() / 4])
        );
        assert!(!entry.header.heads_record_with_body(&[]));
    }

    #[test]
    fn tampering_is_caught() {
        let entry = message_entry();

        let mut altered_header = entry.clone();
        altered_header.header.header.lamport = 9;
        assert_eq!(altered_header.verify_alone(), Err(EntryError::BadSignature));

        let mut signed_by_other_device = entry.clone();
        signed_by_other_device.header = entry.header.header.clone().sign(&device_key(3));
        assert_eq!(
            signed_by_other_device.verify_alone(),
            Err(EntryError::BadSignature)
        );

        let mut other_account = entry.clone();
        Arc::make_mut(&mut other_account.header.header.author).account =
            AccountKeypair::from_secret_bytes(&[9; 32]).id();
        assert_eq!(
            other_account.verify_alone(),
            Err(EntryError::BadCertificate)
        );

        let mut altered_body = entry.clone();
        if let Some(body) = altered_body.body.as_mut() {
            body.ciphertext[0] ^= 1;
        }
        assert_eq!(altered_body.verify_alone(), Err(EntryError::BodyMismatch));
    }

    #[test]
    fn a_batch_of_entries_gets_each_entrys_own_verdict_in_order() {
        let mut entries: Vec<Entry> = (1..=12)
            .map(|seq| {
                let mut e = message_entry();
                e.header.header.seq = seq;
                e.header = e.header.header.clone().sign(&device_key(2));
                e
            })
            .collect();
        entries[2].header.header.lamport = 9;
        entries[7].header = entries[7].header.header.clone().sign(&device_key(3));
        Arc::make_mut(&mut entries[10].header.header.author).device =
            DevicePublicKey::from_bytes(device_key(4).verifying_key().to_bytes()).unwrap();
        let alone: Vec<Result<(), EntryError>> = entries
            .iter()
            .map(|e| e.header.verify_signature())
            .collect();
        let together: Vec<(u64, Result<(), EntryError>)> = Entry::precheck_many(entries)
            .into_iter()
            .map(|r| match r {
                Ok(checked) => (checked.entry().header.header.seq, Ok(())),
                Err((e, why)) => (e.header.header.seq, Err(why)),
            })
            .collect();
        let expected: Vec<(u64, Result<(), EntryError>)> = (1..=12)
            .map(|seq| match seq {
                3 | 8 | 11 => (seq, Err(EntryError::BadSignature)),
                _ => (seq, Ok(())),
            })
            .collect();
        assert_eq!(together, expected);
        assert_eq!(
            alone,
            expected.into_iter().map(|(_, r)| r).collect::<Vec<_>>()
        );
    }

    #[test]
    fn shape_rules_hold() {
        let entry = message_entry();
        let with = |f: &dyn Fn(&mut EntryHeader)| {
            let mut h = entry.header.header.clone();
            f(&mut h);
            h.check_shape()
        };
        assert!(with(&|_| {}).is_ok());
        assert!(with(&|h| h.parents = vec![EntryHash([0; 32]); 2]).is_err());
        assert!(with(&|h| h.parents = vec![]).is_err());
        assert!(
            with(&|h| h.parents = (0..=MAX_PARENTS as u8)
                .map(|i| EntryHash([i; 32]))
                .collect())
            .is_err()
        );
        assert!(with(&|h| h.lamport = 0).is_err());
        assert!(with(&|h| h.body_hash = None).is_err());
        assert!(with(&|h| h.kind = EntryKind::Purge { targets: vec![] }).is_err());
        let peer = StoragePeer {
            node: certificate(1, 5).device,
            addrs: vec![],
        };
        let storage = |peers: Vec<StoragePeer>, quorum| EntryKind::Storage { peers, quorum };
        assert!(
            with(&|h| {
                h.kind = storage(vec![peer.clone()], 1);
                h.body_hash = None;
            })
            .is_ok()
        );
        // A Storage entry has no body, and its set is bounded.
        assert!(with(&|h| h.kind = storage(vec![peer.clone()], 1)).is_err());
        for (peers, quorum) in [
            (vec![], 0),
            (vec![peer.clone()], 0),
            (vec![peer.clone()], 2),
            (vec![peer.clone(), peer.clone()], 1),
        ] {
            assert!(
                with(&|h| {
                    h.kind = storage(peers.clone(), quorum);
                    h.body_hash = None;
                })
                .is_err()
            );
        }
        assert!(
            with(&|h| {
                h.kind = EntryKind::Rekey {
                    new_epoch: 5,
                    grants: vec![],
                };
                h.body_hash = None;
            })
            .is_err()
        );
    }

    #[test]
    fn decoder_bounds_input_before_parsing() {
        let huge = vec![Entry::VERSION; Entry::MAX_LEN + 1];
        assert!(matches!(
            Entry::decode(&huge),
            Err(DecodeError::TooLong { .. })
        ));
        // A small record whose parents list claims u32::MAX items: the
        // decoder runs out of input instead of allocating for them.
        let entry = message_entry();
        let bytes = entry.encode();
        let at = 1
            + 16
            + postcard::to_allocvec(&entry.header.header.author)
                .unwrap()
                .len();
        assert_eq!(bytes[at], 1, "the parents count");
        let mut hostile = bytes[..at].to_vec();
        hostile.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0x0f]);
        hostile.extend_from_slice(&bytes[at + 1..]);
        assert!(matches!(
            Entry::decode(&hostile),
            Err(DecodeError::Malformed(_))
        ));
        for cut in 0..bytes.len() {
            assert!(Entry::decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn storage_key_sorts_by_lamport_then_hash() {
        let a = Entry::storage_key(2, &EntryHash([9; 32]));
        let b = Entry::storage_key(10, &EntryHash([1; 32]));
        let c = Entry::storage_key(10, &EntryHash([2; 32]));
        assert!(a < b && b < c);
    }
}
